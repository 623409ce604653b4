"""From a failed item to a debugger: what a failure carries, replay, re-run.

* In the worker, :func:`failure_context` records what the raising frame saw
  (bounded ``repr``s of its local variables) and which worker and pid ran it;
  it rides home on the ``ErrorInfo``.
* In the notebook, :func:`attach` puts a :class:`FailureInfo` on the rebuilt
  exception (``exc.failure_info``): the item's index and input (or the rank),
  the worker's locals, worker id and pid. :func:`record_map` /
  :func:`record_cell` keep the last run, with the very payload bytes its
  workers loaded, so that
* :func:`replay` (``%pdebug``) runs the failing item here, from those bytes,
  under IPython's debugger, stopped at the line that raised; and
* :func:`rerun_failed` (``%pmap --rerun-failed``) runs only the items that
  failed (or never ran) again, with the function's new definition.

Nothing here imports IPython at import time: workers import this module.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any

_log = logging.getLogger("mpmagic")

MAX_LOCALS = 20  # names kept from the raising frame
MAX_REPR = 200  # characters kept of each repr
WORKER_ID: Any = None  # set by the worker process at start (worker.main)
# Failures per unit whose locals are kept: a --errors collect chunk where every
# item fails would otherwise send up to 4 kB of reprs per item home.
LOCALS_PER_UNIT = 50
_budget = LOCALS_PER_UNIT


def new_unit() -> None:
    """A unit starts in this worker: its first failures get their locals again."""
    global _budget
    _budget = LOCALS_PER_UNIT

# --------------------------------------------------------------------------
# Worker side


def _bounded_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}: repr failed: {type(exc).__name__}>"
    return text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "..."


def _worth_showing(name: str, value: Any) -> bool:
    """Leave out the noise of a module-level frame (a cell rank's namespace)."""
    if name.startswith("__"):
        return False
    return not isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type))


def failure_context(exc: BaseException) -> dict[str, Any]:
    """What the worker knows at the failure: the raising frame's locals
    (at most MAX_LOCALS names, MAX_REPR characters each; for the first
    LOCALS_PER_UNIT failures of a unit), worker id and pid."""
    global _budget
    tb = exc.__traceback__ if _budget > 0 else None
    _budget -= 1
    frame_locals: dict[str, str] = {}
    where = None
    if tb is not None:
        while tb.tb_next is not None:
            tb = tb.tb_next
        frame = tb.tb_frame
        where = (frame.f_code.co_filename, tb.tb_lineno, frame.f_code.co_name)
        try:
            for name, value in list(frame.f_locals.items()):
                if len(frame_locals) >= MAX_LOCALS:
                    break
                if _worth_showing(name, value):
                    frame_locals[name] = _bounded_repr(value)
        except Exception:
            _log.debug("mpmagic: could not read the raising frame's locals", exc_info=True)
    return {"locals": frame_locals, "where": where, "worker": WORKER_ID if WORKER_ID is not None else _dask_worker(), "pid": os.getpid()}


def _dask_worker() -> str | None:
    """The Dask worker's address, when this runs in a Dask task."""
    if "distributed" not in sys.modules:
        return None
    try:
        return sys.modules["distributed"].get_worker().address
    except Exception:  # not in a Dask task
        return None


# --------------------------------------------------------------------------
# Notebook side: what a failure carries


@dataclass
class FailureInfo:
    """One failed item (or rank): where it ran and what its frame held.

    ``index``/``item`` for a ``pmap`` item, ``rank``/``size`` for a
    ``parallel`` rank; ``locals`` maps names in the raising frame to their
    ``repr`` in the worker; ``worker`` and ``pid`` say which process ran it.
    """

    error: BaseException
    index: int | None = None
    item: Any = None
    rank: int | None = None
    size: int | None = None
    locals: dict[str, str] = field(default_factory=dict)
    where: tuple | None = None  # (filename, line, function) of the raising frame
    worker: Any = None
    pid: int | None = None
    # The worker's frames and last line (ErrorInfo.frames / exc_text), for describe().
    frames: list = field(default_factory=list, repr=False)
    exc_text: str = ""

    @property
    def label(self) -> str:
        return f"rank {self.rank}" if self.rank is not None else f"item {self.index}"

    def __repr__(self) -> str:
        from .jobs import short_repr

        what = self.label if self.rank is not None else f"item {self.index} (input {short_repr(self.item, 40)})"
        ran = f" on worker {self.worker} (pid {self.pid})" if self.pid else ""
        return f"<FailureInfo {what}{ran}: {type(self.error).__name__}: {self.error}>"

    def describe(self) -> str:
        """The worker's traceback and the raising frame's locals, as text."""
        from .errors import map_cell_frames, render_traceback

        text = self.exc_text or f"{type(self.error).__name__}: {self.error}"
        if self.frames:  # (rendered only when asked: most failures are never described)
            text = render_traceback(map_cell_frames(self.frames), text)
        lines = [text.rstrip("\n")]
        if self.locals:
            fn = f" in {self.where[2]}" if self.where else ""
            lines.append(f"Local variables{fn} in the worker (pid {self.pid}):")
            lines += [f"    {name} = {value}" for name, value in self.locals.items()]
        return "\n".join(lines)


def attach(exc: BaseException, info: Any = None, **where: Any) -> FailureInfo:
    """Put a :class:`FailureInfo` on ``exc`` (``exc.failure_info``).

    ``info`` is the worker's ``ErrorInfo`` (None for a lost worker or a
    timeout); ``where`` gives ``index``/``item`` or ``rank``/``size``.
    """
    ctx = getattr(info, "context", None) or {}
    failure = FailureInfo(
        exc, locals=ctx.get("locals") or {}, where=ctx.get("where"), worker=ctx.get("worker"), pid=ctx.get("pid"),
        frames=getattr(info, "frames", None) or [], exc_text=getattr(info, "exc_text", "") or "", **where,
    )
    try:
        exc.failure_info = failure  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__
        _log.debug("mpmagic: cannot attach failure details to %s", type(exc).__name__)
    return failure


# --------------------------------------------------------------------------
# The last run


_MISSING = object()  # a result the failed run never produced


@dataclass
class LastRun:
    """What :func:`replay` and :func:`rerun_failed` need of the last run."""

    kind: str  # "map" or "cell"
    payload: bytes  # the function's (or cell's) bytes, exactly as the workers got them
    failures: list[FailureInfo]
    func: Any = None
    star: bool = False
    collect: bool = False
    options: dict = field(default_factory=dict)
    results: list | None = None  # map: full length, _MISSING where there is none
    inputs: Any = None  # map: the input sequence, when it was one


_last: LastRun | None = None


def _info_of(exc: BaseException, **where: Any) -> FailureInfo:
    info = getattr(exc, "failure_info", None)
    if isinstance(info, FailureInfo):
        return info
    return FailureInfo(exc, **where)


def record_map(job: Any, func: Any, results: list | None, options: dict) -> None:
    """Keep what a finished ``pmap`` needs for ``%pdebug`` and ``--rerun-failed``.

    Cheap when nothing failed: the run is remembered without its results.
    """
    global _last
    from .jobs import Failed

    failures: list[FailureInfo] = []
    full: list | None = None
    if results is not None and job.collect:
        for r in results:
            if isinstance(r, Failed):
                info = _info_of(r.error, index=r.index, item=r.item)
                info.index, info.item = r.index, r.item
                failures.append(info)
        full = results if failures else None
    elif results is None and job.failure is not None:
        # (the first failing item in input order, as serial map raises: jobs.MapJob._settle)
        failures.append(_info_of(job.failure, index=job.failure_index))
        full = _partial_results(job)
    _last = LastRun(
        "map", job.func_payload, failures, func=func, star=job.star, collect=job.collect,
        options=options, results=full, inputs=getattr(job, "_seq", None) if failures else None,
    )


def _partial_results(job: Any) -> list | None:
    """The results a failed (errors="raise") run did get, in place, gaps _MISSING."""
    seq = getattr(job, "_seq", None)
    if seq is None:
        return None
    full = [_MISSING] * len(seq)
    done = list(getattr(job, "_in_order", []))
    full[: len(done)] = done
    for start, chunk in getattr(job, "_results", {}).items():
        full[start : start + len(chunk)] = chunk
    return full


def forget() -> None:
    """A run starts: an older run's failures are no longer the last (even if
    this one is interrupted before it records its own)."""
    global _last
    _last = None


def record_cell(job: Any, spec_bytes: bytes, size: int) -> None:
    """Keep a ``parallel`` run's failed ranks and the cell's payload for ``%pdebug``."""
    global _last
    failures = [_info_of(job.failures[r], rank=r, size=size) for r in sorted(job.failures)]
    _last = LastRun("cell", spec_bytes, failures)


def last_failures() -> list[FailureInfo]:
    """The failures of the last ``pmap`` or ``parallel`` run (empty if it succeeded).

    Each :class:`FailureInfo` holds the item's index and input (or the rank),
    the exception, the worker's local variables at the raising line (as
    ``repr``s), and the worker id and pid. A ``pmap`` with ``errors="raise"``
    lists its first failure only: the rest of the run was cancelled.
    """
    return list(_last.failures) if _last is not None else []


# --------------------------------------------------------------------------
# Re-running what failed


def rerun_failed(func: Any = None, namespace: dict | None = None, **options: Any) -> list:
    """Run the failed items of the last ``pmap`` again; return the full results.

    The function is ``func`` if given, else the *current* definition of the
    last run's function name in ``namespace`` (the notebook's, by default),
    so a function fixed and redefined since is the one used. Items that
    succeeded keep their results; with ``errors="raise"``, items the failed
    run never reached run too. ``options`` override the last run's
    (``workers``, ``chunksize``, ``timeout``, ``retries``...).
    """
    global _last
    from . import api
    from .errors import UsageError
    from .jobs import Failed

    last = _last
    if last is None or last.kind != "map" or not last.failures:
        raise UsageError("no failed %pmap run to re-run: run %pmap first (the last run had no failures)")
    if last.results is None:
        raise UsageError(
            "the last run's input was an iterator that is used up, so its missing items cannot be sent "
            "again: run it with errors='collect' (or a list) to be able to re-run what failed"
        )
    func = func if func is not None else _current_definition(last.func, namespace)
    full = list(last.results)
    todo = [i for i, r in enumerate(full) if r is _MISSING or isinstance(r, Failed)]
    items = [full[i].item if isinstance(full[i], Failed) else last.inputs[i] for i in todo]
    kwargs = {**last.options, **options, "errors": "collect" if last.collect else "raise"}
    try:
        again = api.pmap(func, items, star=last.star, **kwargs)
    except KeyboardInterrupt:
        _last = last  # nothing changed: the same failures can be re-run again
        raise
    except BaseException as exc:
        info = getattr(exc, "failure_info", None)
        if isinstance(info, FailureInfo) and info.index is not None:
            info.index, info.item = todo[info.index], items[info.index]
        _remember_rerun(last, func, full, [info] if isinstance(info, FailureInfo) else [])
        raise
    failures = []
    for i, r in zip(todo, again, strict=True):
        if isinstance(r, Failed):
            r = Failed(i, r.item, r.error)
            info = _info_of(r.error)
            info.index, info.item = i, r.item
            failures.append(info)
        full[i] = r
    _remember_rerun(last, func, full, failures)
    return full


def _remember_rerun(last: LastRun, func: Any, full: list, failures: list[FailureInfo]) -> None:
    """After a re-run, the merged run is the last run (for last_failures, %pdebug)."""
    global _last
    ran = _last  # the re-run itself: its payload is the new function's
    _last = LastRun(
        "map", ran.payload if ran is not None else last.payload, failures, func=func, star=last.star,
        collect=last.collect, options=last.options, results=full if failures else None, inputs=last.inputs,
    )


def _current_definition(func: Any, namespace: dict | None) -> Any:
    """The notebook's current object under ``func``'s name, if there is one."""
    name = getattr(func, "__name__", None)
    if namespace is None:
        namespace = getattr(sys.modules.get("__main__"), "__dict__", {})
        try:
            from IPython import get_ipython

            shell = get_ipython()
            if shell is not None:
                namespace = shell.user_ns
        except ImportError:
            pass
    new = namespace.get(name) if name and name != "<lambda>" else None
    return new if callable(new) else func


# --------------------------------------------------------------------------
# Replay under the debugger


def _pick(which: int | None) -> tuple[LastRun, FailureInfo]:
    from .errors import UsageError

    last = _last
    if last is None or not last.failures:
        raise UsageError("no failure to debug: the last %pmap or %%parallel run did not fail")
    if which is None:
        return last, last.failures[0]
    for f in last.failures:
        if (f.rank if last.kind == "cell" else f.index) == which:
            return last, f
    kind = "rank" if last.kind == "cell" else "item"
    known = ", ".join(f.label for f in last.failures[:10])
    raise UsageError(f"{kind} {which} did not fail in the last run; the failures are: {known}")


def _run_again(last: LastRun, failure: FailureInfo) -> None:
    """Run the failed item or rank here, from the payload bytes the workers loaded."""
    from . import payload

    obj = payload.loads(last.payload)
    if last.kind == "cell":
        from .cell import run_cell_code

        run_cell_code(obj, failure.rank, failure.size, as_main=False)
    elif last.star:
        obj(*failure.item)
    else:
        obj(failure.item)


def replay(which: int | None = None, debugger: Any = None) -> bool:
    """Replay a failure of the last run here, under the debugger.

    ``which`` is the item index (or rank) to replay, the first failure by
    default. Stops at the line that raised, as ``%debug`` does. Returns
    True if the replay failed (and was debugged); if it succeeds here, says so
    in one line and prints the worker's traceback with its local variables.
    """
    from .errors import TaskTimeoutError, UsageError, WorkerLostError

    last, failure = _pick(which)
    if isinstance(failure.error, (WorkerLostError, TaskTimeoutError)):
        # Running it here could crash or hang the notebook itself.
        raise UsageError(
            f"{failure.label} did not raise, its worker died or ran past the timeout "
            f"({type(failure.error).__name__}): replaying it here could do the same to the notebook, "
            "so it is not replayed; call the function on that input yourself if you mean it"
        )
    if last.kind == "map" and failure.index is None:
        raise UsageError(
            f"the failure was not raised by one item ({type(failure.error).__name__}: {failure.error}): "
            "there is nothing to replay"
        )
    try:
        _run_again(last, failure)
    except Exception as exc:
        tb = exc.__traceback__.tb_next or exc.__traceback__  # start below this function
        _post_mortem(tb, debugger)
        return True
    print(
        f"mpmagic: {failure.label} did not fail when replayed here, so the failure depended on the "
        "worker (its state, environment or resources); the worker's traceback and locals:"
    )
    print(failure.describe())
    return False


def _post_mortem(tb: types.TracebackType, debugger: Any = None) -> None:
    """IPython's debugger on ``tb``, at its last frame (the raising line)."""
    if debugger is None:
        from IPython.core.debugger import Pdb

        debugger = Pdb
    p = debugger()
    p.reset()
    p.interaction(None, tb)
