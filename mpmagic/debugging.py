"""What a failure carries: the worker's locals at the raising line, its id and pid.

* In the worker, :func:`failure_context` records what the raising frame saw
  (bounded ``repr``s of its local variables) and which worker and pid ran it;
  it rides home on the ``ErrorInfo`` (``worker.py``).
* In the notebook, :func:`failure_of` makes a :class:`FailureInfo` for the
  rebuilt exception: the item's index and input (or the rank), the worker's
  locals, worker id and pid (``jobs.py`` calls it where it rebuilds a task's
  exception, and keeps it beside the exception: ``Failed.info``, never as an
  attribute of the exception, whose ``vars()`` stay as serial Python's). :func:`record_map` / :func:`record_cell`
  (called by ``api.py``) keep the last blocking run, with the very payload bytes its
  workers loaded, for ``postmortem.py``: ``%pdebug`` (replay under the
  debugger) and ``--rerun-failed``; a background run or an imap stream keeps
  its failures on its handle and leaves that record as it was
  (:func:`started_in_background`). Each thread keeps its own last run
  (:class:`_ThreadRuns`), as ``last_report`` does: a run a library or a
  ``threading.Thread`` made leaves the notebook's record as it was.

This module sits below ``worker.py`` and ``jobs.py`` (both import it): it
imports no other mpmagic module at import time, never ``jobs`` or ``api``,
and never IPython (workers import it).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

_log = logging.getLogger("mpmagic")

MAX_LOCALS = 20  # names kept from the raising frame
# The local of the worker's item loops (callsite.MARK, named here: this module imports
# none of mpmagic's): a call that failed in one (a wrong number of arguments) has no
# frame of the task's; the loop's own locals, under the caller's line, are not the user's.
_CALL_SITE = "__mpmagic_call_site__"
MAX_REPR = 200  # characters kept of each repr
WORKER_ID: Any = None  # set by the worker process at start (worker.main)
# Failures per unit whose locals are kept: a --errors collect chunk where every
# item fails would otherwise send up to 4 kB of reprs per item home.
LOCALS_PER_UNIT = 50
_budget = LOCALS_PER_UNIT


#: What this worker runs now, as the user names it ("rank 1" of a %%parallel
#: cell, "a task" of a map), None between units: a helper made here carries it,
#: so that its SharedObjectGone elsewhere says where it was made (shared.base).
TASK: str | None = None


def new_unit(task: str | None = None) -> None:
    """A unit starts in this worker: its first failures get their locals again.
    ``task``: what it is (:data:`TASK`), until :func:`end_unit`."""
    global _budget, TASK
    _budget = LOCALS_PER_UNIT
    TASK = task


def end_unit() -> None:
    """The unit ended: what this worker makes from now on is no task's."""
    global TASK
    TASK = None

# --------------------------------------------------------------------------
# Worker side


def _bounded_repr(value: Any, limit: int = MAX_REPR) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}: repr failed: {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    # (the call itself failed in the item loop: no frame of the task's to show)
    if tb is not None and _CALL_SITE not in tb.tb_frame.f_code.co_varnames:
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
    ``outside`` says, for a failure that calling the function on one item
    (or running the rank's code) did not raise, where it came from instead
    (the function could not be loaded in the worker, the input raised while
    it was read): ``%pdebug`` has nothing to replay for it.
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
    outside: str = ""

    @property
    def label(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        return f"item {self.index}" if self.index is not None else "the run"

    def __repr__(self) -> str:
        if self.rank is not None or self.index is None:
            what = self.label + (f" ({self.outside})" if self.outside else "")
        else:
            what = f"item {self.index} (input {_bounded_repr(self.item, 40)})"
        ran = f" on worker {self.worker} (pid {self.pid})" if self.pid else ""
        return f"<FailureInfo {what}{ran}: {exception_line(self.error)}>"

    def describe(self) -> str:
        """The worker's traceback and the raising frame's locals, as text."""
        from .errors import cell_names, map_cell_frames, render_traceback, without_our_frames

        text = self.exc_text or exception_line(self.error)
        if self.frames:  # (rendered only when asked: most failures are never described)
            # (notebook cells named as IPython's tracebacks name them: "Cell In[4], line 6")
            text = cell_names(render_traceback(map_cell_frames(self.frames), text))
        elif self.outside and (tb := without_our_frames(self.error.__traceback__)) is not None:
            import traceback  # raised here (an input's own error): its frames here

            text = "".join(traceback.format_exception(type(self.error), self.error, tb))
        lines = [text.rstrip("\n")]
        if self.locals:
            fn = f" in {self.where[2]}" if self.where else ""
            lines.append(f"Local variables{fn} in the worker (pid {self.pid}):")
            lines += [f"    {name} = {value}" for name, value in self.locals.items()]
        return "\n".join(lines)


def exception_line(exc: BaseException) -> str:
    """``Type: message`` on one line, without notes; never raises (a broken
    ``__str__`` reads ``<exception str() failed>``, as in Python's tracebacks)."""
    try:
        text = str(exc)
    except Exception:
        text = "<exception str() failed>"
    return f"{type(exc).__qualname__}: {text}" if text else type(exc).__qualname__


def failure_of(exc: BaseException, info: Any = None, **where: Any) -> FailureInfo:
    """The :class:`FailureInfo` of ``exc``: what the worker saw when it raised.

    ``info`` is the worker's ``ErrorInfo`` (None for a lost worker, a
    timeout, or an error raised here); ``where`` gives ``index``/``item`` or
    ``rank``/``size``, or ``outside`` (see :class:`FailureInfo`). The jobs keep
    it beside the exception (``Failed.info``, ``MapJob.failure_info``,
    ``CellJob.failure_infos``), never on it: the exception's attributes stay
    the task's own.
    """
    ctx = getattr(info, "context", None) or {}
    return FailureInfo(
        exc, locals=ctx.get("locals") or {}, where=ctx.get("where"), worker=ctx.get("worker"), pid=ctx.get("pid"),
        frames=getattr(info, "frames", None) or [], exc_text=getattr(info, "exc_text", "") or "", **where,
    )


# --------------------------------------------------------------------------
# The last run


MISSING = object()  # a result the failed run never produced


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
    results: list | None = None  # map: full length, MISSING where there is none
    inputs: Any = None  # map: the input sequence, when it was one
    checkpointed: bool = False  # only the items a checkpoint store lacked ran (see renumber_last)
    # map: (shm.THRESHOLD, shm.WRITABLE) when its items' large buffers reached the workers through
    # shared memory (read-only there unless writable): %pdebug gives the replay such a copy (shm.as_lent)
    lent: tuple[int, bool] | None = None
    # loadstamps' load number when the run ended: a module reloaded after it ran new code in a replay
    loads_mark: int = 0
    # cell: the failed ranks in the order they failed (the cause first, ranks stopped because of it after)
    in_time: list[int] = field(default_factory=list)


class _ThreadRuns(threading.local):
    """Each thread's last run, as ``api.last_report`` keeps each thread's report:
    a run another thread made (a ``threading.Thread``, a library's pool, an
    ipykernel subshell) neither replaces the cells' last run nor is hidden from
    the thread that made it (its ``last_failures()``, ``rerun_failed()``)."""

    # The last *blocking* run's record. A background run or an imap stream keeps its
    # failures on its handle and leaves this as it was: a later --bg run (which may well
    # succeed) must not take away the failures the user is about to re-run or debug.
    last: LastRun | None = None
    # The background runs and streams this thread started since its last blocking run
    # started: (weak reference to the handle, errors option), newest last, at most
    # SINCE_KEPT. Only for what %pdebug and --rerun-failed say of them (see background_since).
    since: tuple[tuple[Any, str | None], ...] = ()


SINCE_KEPT = 20  # background runs remembered per thread (weakly: their results are never held)
_runs = _ThreadRuns()


def record_map(job: Any, func: Any, results: list | None, failed: list, options: dict,
               items: Any = None) -> None:
    """Keep what a finished ``pmap`` needs for ``%pdebug`` and ``--rerun-failed``.

    ``results`` is None when the run raised; ``failed`` the ``jobs.Failed``
    among them (``errors="collect"``; the caller has them, and this module
    must not import ``jobs``). ``items``: the input as a list, when the job
    read it lazily but it can be listed again (several lists zipped); only
    asked for when the run raised. Cheap when nothing failed: the run is
    remembered without its results. Each thread has its own last run
    (:class:`_ThreadRuns`).
    """
    failures: list[FailureInfo] = []
    full: list | None = None
    inputs = job.inputs
    if results is not None and failed:
        for r in failed:
            if r.info is None:  # (kept on the Failed too: a renumbering of it reaches this record, see renumber_last)
                r.info = FailureInfo(r.error)
            info = r.info
            info.index, info.item = r.index, r.item
            failures.append(info)
        full = results
        if all(r is not MISSING for r in results):
            # Every place holds a result or a Failed with its item: a re-run needs
            # nothing else of the input, which then goes with the user's last name
            # for it (as serially: what outlives a failed map() is its failing item).
            inputs = None
    elif results is None and job.failure is not None:
        # (the first failing item in input order, as serial map raises: jobs.MapJob._settle)
        failures.append(job.failure_info or FailureInfo(job.failure, index=job.failure_index))
        if inputs is None:
            inputs = items
        full = job.results_so_far(MISSING, None if inputs is None else len(inputs))
    lent = None
    if job.shared_memory:  # (a MapJob: the one kind recorded here)
        from . import shm

        lent = (shm.THRESHOLD, shm.WRITABLE)
    _runs.last = LastRun(
        "map", job.func_payload, failures, func=func, star=job.star, collect=job.collect,
        options=options, results=full, inputs=inputs if failures else None, lent=lent, loads_mark=_loads_mark(),
    )


def _loads_mark() -> int:
    """A load number later than every module load so far (``loadstamps``): a module
    whose latest reload is numbered after it was reloaded after the run."""
    from . import loadstamps

    return loadstamps.next_number()


def last_run() -> LastRun | None:
    """This thread's last run's record (for ``postmortem.py``)."""
    return _runs.last


def set_last_run(run: LastRun | None) -> None:
    """Make ``run`` this thread's last run (``postmortem.rerun_failed`` merges its re-run in)."""
    _runs.last = run


def renumber_last(positions: list[int]) -> None:
    """The last run ran only part of a larger input (``checkpoint.py`` runs the
    items its store lacks): its item ``i`` is item ``positions[i]`` of the
    whole input. Failures are renumbered to count in the whole input; the run
    cannot be re-run piecewise (running the checkpointed call again does that).

    A collecting run's failures are its ``Failed`` results' infos, which the
    caller renumbers with the ``Failed`` themselves (``checkpoint.MapCheckpoint._place``,
    as each chunk arrives, possibly before this record was made): renumbering
    them here too named item ``positions[positions[i]]``."""
    last = _runs.last
    if last is None or last.kind != "map":
        return
    for f in [] if last.collect else last.failures:
        if f.index is not None and 0 <= f.index < len(positions):
            f.index = positions[f.index]
    last.results, last.inputs, last.checkpointed = None, None, True


def forget() -> None:
    """A blocking run starts: an older run's failures are no longer the last (even if
    this one is interrupted before it records its own), and the background runs
    started before it are no longer "since the last run".
    A run another thread starts changes only that thread's record."""
    _runs.last = None
    _runs.since = ()


def started_in_background(handle: Any, errors: str | None) -> None:
    """A background run or an imap stream (``--bg``, ``submit``, ``imap``) started:
    it records nothing (its failures are on ``handle``) and leaves the last blocking
    run's record as it was; it is remembered weakly for what ``%pdebug`` and
    ``--rerun-failed`` say when it failed. ``errors``: a map's errors option
    ("raise", "collect"; None for a cell)."""
    _runs.since = (*_runs.since[-(SINCE_KEPT - 1):], (weakref.ref(handle), errors))


def background_since() -> list[tuple[Any, str | None]]:
    """(handle, errors option) of the background runs and streams this thread started
    since its last blocking run started, oldest first, those whose handle is still held."""
    return [(h, errors) for ref, errors in _runs.since if (h := ref()) is not None]


def record_cell(job: Any, spec_bytes: bytes, size: int) -> None:
    """Keep a ``parallel`` run's failed ranks and the cell's payload for ``%pdebug``
    (this thread's last run)."""
    infos = job.failure_infos
    failures = [infos.get(r) or FailureInfo(job.failures[r], rank=r, size=size) for r in sorted(job.failures)]
    # (job.failures is in the order the ranks failed: what %pdebug replays by default, errors.first_failed_rank)
    _runs.last = LastRun("cell", spec_bytes, failures, loads_mark=_loads_mark(), in_time=list(job.failures))


def last_failures() -> list[FailureInfo]:
    """The failures of the last blocking ``pmap`` or ``parallel`` run this thread made
    (empty if it succeeded). A background run or an ``imap`` stream keeps its
    failures on its handle and leaves this as it was. Each thread has its own, as
    :func:`mpmagic.last_report`: the cells' (the main thread's) are not replaced by
    a run another thread makes.

    Each :class:`FailureInfo` holds the item's index and input (or the rank),
    the exception, the worker's local variables at the raising line (as
    ``repr``s), and the worker id and pid. A ``pmap`` with ``errors="raise"``
    lists its first failure only: the rest of the run was cancelled.
    """
    last = _runs.last
    return list(last.failures) if last is not None else []
