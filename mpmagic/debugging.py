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

import collections
import contextlib
import dis
import importlib
import logging
import os
import signal
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_log = logging.getLogger("mpmagic")

MAX_LOCALS = 20  # names kept from the raising frame
# The local of the worker's item loops (callsite.MARK, named here: this module imports
# none of mpmagic's): a call that failed in one (a wrong number of arguments) has no
# frame of the task's; the loop's own locals, under the caller's line, are not the user's.
_CALL_SITE = "__mpmagic_call_site__"
MAX_REPR = 200  # characters kept of each repr
#: Seconds the reprs of one failure's locals may take in all. A ``__repr__`` that
#: sleeps or walks a large structure delayed the failure by as long (30 s for a
#: slow one); past this, such a repr is stopped (where a timer can stop it: a
#: worker's main thread) or not taken, and the local shows why instead.
REPR_SECONDS = 1.0
#: Items of a collection a bounded repr looks at before it stops (enough to fill
#: MAX_REPR characters: each item takes at least one, and a separator).
_MAX_ITEMS = MAX_REPR
#: A collection of a standard type whose repr this module does not build itself
#: (array.array, OrderedDict, Counter...) shows only its type and size past this many items.
_SUMMARY_ITEMS = 1000
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


def _bounded_repr(value: Any, limit: int = MAX_REPR, clock: _ReprClock | None = None) -> str:
    """``repr(value)`` cut to ``limit`` characters, at a cost that does not grow with ``value``.

    The repr of a large ``str``, ``bytes``, ``bytearray``, ``int`` or builtin
    collection is built only as far as ``limit`` needs (a 100 MB ``bytearray``
    local made a 400 MB string in the worker, and 2 s, for 200 characters); a
    large collection of another standard type (``array.array``,
    ``OrderedDict``, a dict's ``keys()``...) shows its type and size. Any
    other object's own ``__repr__`` runs within ``clock`` (see
    :class:`_ReprClock`; None: not timed, as in the notebook). What shows for
    an ordinary value is ``repr(value)``, cut as before.
    """
    try:
        text = _repr_start(value, limit + 1, clock, set())
    except _ReprTimeout as late:
        text = (f"<{type(value).__name__} object: its repr took over {REPR_SECONDS:g} s and was stopped>" if late.args
                else f"<{type(value).__name__} object: repr not taken, the reprs of the locals before it took the "
                     f"{REPR_SECONDS:g} s they may>")
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}: repr failed: {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ReprTimeout(BaseException):
    """A repr ran past :data:`REPR_SECONDS` (args: (True,), stopped in it) or was not
    started for lack of time (no args). A BaseException: a ``__repr__``'s own
    ``except Exception`` does not swallow it."""


def _alarm_free() -> bool:
    """Can a timer stop a slow ``__repr__`` here? In the main thread (where Python runs
    signal handlers), where SIGALRM is neither handled nor timed by the task's code."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    try:
        return signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    except (ValueError, OSError):
        return False


class _ReprClock:
    """The :data:`REPR_SECONDS` the reprs of one failure's locals may take in all.

    Used as a context manager around them. Where :func:`_alarm_free`, a
    ``__repr__`` still running when the time is up is stopped by SIGALRM (its
    handler is installed at the first such repr, until the capture ends, and
    raises only while a repr runs); elsewhere (a Dask worker's task thread) a
    repr is not stopped, but none starts once the time is up. Locals of
    builtin types alone (most failures) touch no signal.
    """

    def __init__(self, seconds: float = REPR_SECONDS) -> None:
        self.deadline = time.monotonic() + seconds
        self._armed = False
        self._saved: Any = None  # the SIGALRM handler before ours, once ours is installed
        self._can_stop: bool | None = None  # (asked at the first repr that needs it)

    def __enter__(self) -> _ReprClock:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            self._armed = False  # (a ring handled from here on raises nothing)
            signal.setitimer(signal.ITIMER_REAL, 0)
            # (a ring still pending once SIG_DFL is back is dropped by Python, not fatal:
            # the timer is off and its handler is looked up when it is handled)
            signal.signal(signal.SIGALRM, self._saved)
            self._saved = None

    def _can_ring(self) -> bool:
        """Is our SIGALRM handler in place (installed now if it can be)?"""
        if self._can_stop is None:
            self._can_stop = _alarm_free()
            if self._can_stop:
                try:
                    self._saved = signal.signal(signal.SIGALRM, self._ring)
                except (ValueError, OSError):
                    self._can_stop = False
        return self._can_stop

    def _ring(self, signum: int, frame: Any) -> None:
        if self._armed:
            self._armed = False
            raise _ReprTimeout(True)

    def repr(self, value: Any) -> str:
        """``repr(value)`` in the time left (:class:`_ReprTimeout` when there is none, or it ran out)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _ReprTimeout
        if not self._can_ring():
            return repr(value)
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            return repr(value)
        finally:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)


#: Types whose repr is short and calls no code of the user's: no time limit.
_PLAIN = frozenset({float, complex, bool, type(None), range, memoryview, type(...), type(NotImplemented)})
#: Collections whose repr :func:`_repr_start` builds itself: (opening, closing) as Python writes them.
_SEQUENCES: dict[type, tuple[str, str]] = {list: ("[", "]"), tuple: ("(", ")"), set: ("{", "}"),
                                           frozenset: ("frozenset({", "})"), collections.deque: ("deque([", "])")}
#: The types whose repr :func:`_repr_start` writes as far as needed (these, not their subclasses).
_BUILTS = frozenset({str, bytes, bytearray, int, dict, *_SEQUENCES})


def _repr_start(value: Any, room: int, clock: _ReprClock | None, seen: set[int]) -> str:
    """The start of ``repr(value)``: all of it, or at least its first ``room`` characters
    when it is longer (a collection's then lacks its end), built at a cost that
    grows with ``room``, not with ``value``. ``seen``: the collections being
    written (a collection inside itself reads ``[...]``, as Python writes it)."""
    kind: Any = type(value)
    if kind in _PLAIN:
        return repr(value)
    base: Any = kind if kind in _BUILTS else None
    if base is None:  # a subclass that writes itself as its builtin base does (not a namedtuple, an IntEnum)
        base = next((b for b in (str, bytes, list, tuple, dict, int) if issubclass(kind, b)), None)
        if base is not None and kind.__repr__ is not base.__repr__:
            base = None
    if base in (str, bytes, bytearray):
        return repr(value[:room]) if len(value) > room else repr(value)
    if base is int:
        # (str() of an int takes time that grows faster than its digits, and refuses
        # more than 4300 of them: sys.set_int_max_str_digits)
        return repr(value) if value.bit_length() <= 10_000 else f"<int of {value.bit_length()} bits>"
    if base is not None:
        return _collection_start(value, base, room, clock, seen)
    if kind.__repr__ is object.__repr__:
        return repr(value)
    if kind.__module__ in ("builtins", "collections", "array") and hasattr(value, "__len__"):
        try:
            size = len(value)
        except Exception:  # (a view of a dict that changed size...)
            size = 0
        if size > _SUMMARY_ITEMS:  # (array.array, OrderedDict, Counter, a dict's keys(): their whole repr)
            return f"<{kind.__name__} of {size} items>"
    return clock.repr(value) if clock is not None else repr(value)


def _collection_start(value: Any, kind: Any, room: int, clock: _ReprClock | None, seen: set[int]) -> str:
    """:func:`_repr_start` of a list, tuple, dict, set, frozenset or deque (``kind``)."""
    if kind is dict:
        opening, closing = "{", "}"
    else:
        opening, closing = _SEQUENCES[kind]
    if id(value) in seen:
        return "{...}" if kind is dict else "[...]" if kind in (list, collections.deque) else f"{opening}...{closing}"
    if not value and kind in (set, frozenset):
        return f"{kind.__name__}()"
    seen.add(id(value))
    try:
        text, parts = len(opening), []
        for element in (value.items() if kind is dict else value):
            if kind is dict:
                key = _repr_start(element[0], max(room - text, 1), clock, seen)
                part = f"{key}: {_repr_start(element[1], max(room - text - len(key) - 2, 1), clock, seen)}"
            else:
                part = _repr_start(element, max(room - text, 1), clock, seen)
            parts.append(part)
            text += len(part) + 2
            if text > room:  # (enough: the rest is cut off anyway)
                return opening + ", ".join(parts)
    finally:
        seen.discard(id(value))
    inner = ", ".join(parts) + ("," if kind is tuple and len(parts) == 1 else "")
    maxlen = f", maxlen={value.maxlen}" if kind is collections.deque and value.maxlen is not None else ""
    return f"{opening}{inner}{closing[:1]}{maxlen}{closing[1:]}"


def _worth_showing(name: str, value: Any) -> bool:
    """Leave out the noise of a module-level frame (a cell rank's namespace)."""
    if name.startswith("__"):
        return False
    return not isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type))


#: The instructions that read a variable (``LOAD_FAST_LOAD_FAST``, 3.13, two at once).
_READS = ("LOAD_NAME", "LOAD_GLOBAL", "LOAD_FAST", "LOAD_DEREF", "LOAD_CLASSDEREF", "LOAD_FROM_DICT")


def _names_on_line(code: types.CodeType, lineno: int) -> set[str]:
    """The variables ``code`` reads on line ``lineno`` (Python 3.11+, from its
    instructions' positions; before, none): a frame's first to send when it has more
    than MAX_LOCALS, those ``%xmode Verbose`` lists under its failing line."""
    if sys.version_info < (3, 11):
        return set()
    found: set[str] = set()
    for instruction in dis.get_instructions(code):
        if instruction.opname.startswith(_READS) and instruction.positions and instruction.positions.lineno == lineno:
            value = instruction.argval
            found.update(name for name in (value if isinstance(value, tuple) else (value,)) if isinstance(name, str))
    return found


#: Characters of argument reprs one failure sends for the frames of its traceback,
#: all frames together (see :meth:`FailureReprs.arguments`): the arguments whose
#: turn comes after show ``<not sent>``.
ARGUMENT_CHARS = 8000


class FailureReprs:
    """The reprs one failure sends home, all within one :data:`REPR_SECONDS`
    (one :class:`_ReprClock`, entered with ``with``): the raising frame's locals
    (:meth:`context`), then the arguments of the traceback's frames
    (:meth:`arguments`, for ``%xmode Verbose``), the latter also within
    :data:`ARGUMENT_CHARS`. Only for the first :data:`LOCALS_PER_UNIT`
    failures of a unit: each one made counts.
    """

    def __init__(self) -> None:
        global _budget
        self.active = _budget > 0
        _budget -= 1
        self._clock = _ReprClock()
        self._chars = ARGUMENT_CHARS
        self._raising: Any = None  # (the raising frame, its locals' reprs), once context() took them
        self._done: list[tuple[types.FrameType, Any]] = []  # (frame, its FrameValues): a frame two exceptions share

    def __enter__(self) -> FailureReprs:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raising = None
        self._done.clear()
        self._clock.__exit__(*exc)

    def context(self, exc: BaseException) -> dict[str, Any]:
        """See :func:`failure_context`."""
        tb = exc.__traceback__ if self.active else None
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
                shown = [(name, value) for name, value in list(frame.f_locals.items()) if _worth_showing(name, value)]
                if len(shown) > MAX_LOCALS:  # (those of the failing line first: %xmode Verbose lists them)
                    first = _names_on_line(frame.f_code, tb.tb_lineno)
                    kept = {name for name, _ in sorted(shown, key=lambda item: item[0] not in first)[:MAX_LOCALS]}
                    shown = [(name, value) for name, value in shown if name in kept]
                for name, value in shown:
                    frame_locals[name] = _bounded_repr(value, clock=self._clock)
            except Exception:
                _log.debug("mpmagic: could not read the raising frame's locals", exc_info=True)
            self._raising = (frame, frame_locals)
        return {"locals": frame_locals, "where": where, "worker": WORKER_ID if WORKER_ID is not None else _dask_worker(),
                "pid": os.getpid()}

    def arguments(self, frame: types.FrameType) -> Any:
        """The ``errors.FrameValues`` of ``frame``'s arguments: bounded reprs
        (:func:`_bounded_repr`, within the time :meth:`context` left), those
        :meth:`context` took of the raising frame's locals again; None when
        this failure sends none (past a unit's first failures, or its
        :data:`ARGUMENT_CHARS` spent)."""
        for seen, values in self._done:
            if seen is frame:
                return values
        if not self._room():
            return None
        from .errors import frame_values

        known = self._raising[1] if self._raising is not None and self._raising[0] is frame else None

        def take(value: Any) -> str | None:
            if not self._room():
                return None
            text = _bounded_repr(value, clock=self._clock)
            self._chars -= len(text)
            return text

        try:
            values = frame_values(frame, take, known)
        except Exception:  # (cosmetic: never an error of ours in place of the task's)
            _log.debug("mpmagic: could not read a frame's arguments", exc_info=True)
            return None
        self._done.append((frame, values))
        return values

    def _room(self) -> bool:
        # (past the time, a builtin value's repr is still taken, an object's not: _ReprClock)
        return self.active and self._chars > 0


def failure_context(exc: BaseException) -> dict[str, Any]:
    """What the worker knows at the failure: the raising frame's locals
    (at most MAX_LOCALS names, MAX_REPR characters each, in REPR_SECONDS in
    all: see :func:`_bounded_repr`; for the first LOCALS_PER_UNIT failures of
    a unit), worker id and pid. (A task's failure takes them with the
    arguments of its frames: :class:`FailureReprs`.)"""
    with FailureReprs() as reprs:
        return reprs.context(exc)


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
    # The item's pickle as the run ended (``payload.dumps_data``, as its chunk was sent), when
    # small (see keep_items_as_sent): %pdebug replays that, not the notebook's own object,
    # which the notebook may change in place after the run.
    sent: bytes | None = field(default=None, repr=False)

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
    # map: FUNC as the %pmap line wrote it (``m.transform``), when it was evaluated among the
    # notebook's names; --rerun-failed looks it up again (postmortem._rerun_function). None: pmap().
    func_text: str | None = None


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
    # started (see _Since), newest last, at most SINCE_KEPT. Only for what %pdebug and
    # --rerun-failed say of them (see background_since).
    since: tuple[_Since, ...] = ()


class _Since:
    """A background run or stream started since the last blocking run, as
    :func:`background_since` knows it: a weak reference to its handle (its
    results are never held here), its errors option, and, once it ended failed,
    ``failed``: the small record of it (``background.Finished``: its id, what
    it ran, its state and counts), set by the run's end (:func:`ended_in_background`).
    A failed ``imap`` loop drops its stream, and with it the handle: the
    record is what is left to say that it failed."""

    __slots__ = ("ref", "errors", "failed")

    def __init__(self, handle: Any, errors: str | None) -> None:
        self.ref = weakref.ref(handle)
        self.errors = errors
        self.failed: Any = None


SINCE_KEPT = 20  # background runs remembered per thread (weakly: their results are never held)
_runs = _ThreadRuns()


def record_map(job: Any, func: Any, results: list | None, failed: list, options: dict,
               items: Any = None) -> None:
    """Keep what a finished ``pmap`` needs for ``%pdebug`` and ``--rerun-failed``.

    ``results`` is None when the run raised; ``failed`` the ``jobs.Failed``
    among them (``errors="collect"``; the caller has them, and this module
    must not import ``jobs``). ``items``: the input as a list of the record's own
    (several lists zipped, a list copied, a set or dict listed: ``api._listed_again``),
    kept rather than the job's input, the user's list, which the notebook may change
    before the re-run; only asked for when the run raised. Cheap when nothing failed: the run is
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
        if items is not None:
            inputs = items
        full = job.results_so_far(MISSING, None if inputs is None else len(inputs))
    lent = None
    if job.shared_memory:  # (a MapJob: the one kind recorded here)
        shm = _module("shm")
        lent = (shm.THRESHOLD, shm.WRITABLE)
    keep_items_as_sent(failures, by_reference=lent is not None)
    _runs.last = LastRun(
        "map", job.func_payload, failures, func=func, star=job.star, collect=job.collect,
        options=options, results=full, inputs=inputs if failures else None, lent=lent, loads_mark=_loads_mark(),
    )


#: A failed item's pickle is kept (``FailureInfo.sent``) up to this size, and the pickling
#: stops once this much was pickled: a row or a dict costs ~1 us and a few hundred bytes; a
#: large array's pickle would be its memory again (it is pickled from the notebook's object
#: when replayed, as before).
SENT_KEPT_BYTES = 64 * 1024
SENT_PICKLED_BYTES = 16 * 1024 * 1024


def keep_items_as_sent(failures: list[FailureInfo], by_reference: bool = False) -> None:
    """Keep each failed item's pickle, made as its chunk's was, for ``%pdebug``.

    The replay ran on a copy pickled from the notebook's own object when
    ``%pdebug`` ran: a row the notebook changed in place after the run
    (``rows[3]['v'] = 100``) replayed in its new state, did not fail, and the
    failure was blamed on the worker. ``by_reference``: the run lent its large
    buffers (a memmap goes by its file, as to the workers)."""
    if not failures:  # (every run that did not fail: nothing to look up)
        return
    payload = _module("payload")
    pickled = 0
    for info in failures:
        if info.outside or info.sent is not None or pickled > SENT_PICKLED_BYTES:
            continue
        try:
            with payload.memmaps_by_reference() if by_reference else contextlib.nullcontext():
                data = payload.dumps_data(info.item)
        except Exception:  # (it cannot be copied: the replay says so, as before)
            continue
        pickled += len(data)
        if len(data) <= SENT_KEPT_BYTES:
            info.sent = data


def _loads_mark() -> int:
    """A load number later than every module load so far (``loadstamps``): a module
    whose latest reload is numbered after it was reloaded after the run."""
    return _module("loadstamps").next_number()


def _module(name: str) -> Any:
    """mpmagic's module ``name`` (this module imports none at import time): found in
    ``sys.modules`` as a rule, at each run (``from . import`` ran the import system's
    look-ups in Python, ~1 us each), imported when it is not there yet."""
    module = sys.modules.get(f"{__package__}.{name}")
    return module if module is not None else importlib.import_module(f".{name}", __package__)


def name_func(before: LastRun | None, text: str | None) -> None:
    """``text`` is how the ``%pmap`` line that just ran wrote FUNC: kept with the run it
    recorded (if it recorded one since ``before``, this thread's record then), for
    ``--rerun-failed`` to look that up again rather than the function's ``__name__``."""
    last = _runs.last
    if last is not None and last is not before and last.kind == "map":
        last.func_text = text


def last_run() -> LastRun | None:
    """This thread's last run's record (for ``postmortem.py``)."""
    return _runs.last


def last_run_ref() -> Callable[[], LastRun | None]:
    """This thread's last run's record, held weakly: what a ``%pmap`` line keeps of the
    record before its run (for :func:`name_func`'s ``before``). Its frame held the record
    itself, and the error of a run that failed by a time-out or a lost worker (made here,
    raised through that frame) keeps the frame in its traceback, so the record of the
    run, its inputs and its report: each such failure kept every earlier one alive."""
    last = _runs.last
    return _no_run if last is None else weakref.ref(last)


def _no_run() -> None:
    """:func:`last_run_ref` when there was no record."""
    return None


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


def started_in_background(handle: Any, errors: str | None) -> _Since:
    """A background run or an imap stream (``--bg``, ``submit``, ``imap``) started:
    it records nothing (its failures are on ``handle``) and leaves the last blocking
    run's record as it was; it is remembered weakly for what ``%pdebug`` and
    ``--rerun-failed`` say when it failed. ``errors``: a map's errors option
    ("raise", "collect"; None for a cell). Returns its entry, which the run's end
    passes to :func:`ended_in_background` (from its own thread: the entry, not
    this thread's list)."""
    entry = _Since(handle, errors)
    _runs.since = (*_runs.since[-(SINCE_KEPT - 1):], entry)
    return entry


def ended_in_background(entry: _Since, record: Any) -> None:
    """The run of ``entry`` ended failed (it raised, or has failed items): ``record``
    (its ``background.Finished``) stands for it once its handle is dropped."""
    entry.failed = record


def background_since() -> list[tuple[Any, str | None]]:
    """(handle, errors option) of the background runs and streams this thread started
    since its last blocking run started, oldest first: those whose handle is still
    held, and for those that failed and were dropped since (a failed ``imap``
    loop's stream), the record of their end in place of the handle."""
    return [(h, e.errors) for e in _runs.since if (h := e.ref() or e.failed) is not None]


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
