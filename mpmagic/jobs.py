"""What one run is, independent of where it runs.

A job hands out units of work (chunks of a map, ranks of a cell), takes back
their results, errors, output and losses, and assembles the answer in input
or rank order. Backends (``backends/local.py``, ``backends/dask.py``) only
move units to workers and report what came back, so every backend gives the
same results, errors, output and timing.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import gc
import importlib.util
import io
import itertools
import logging
import re
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from . import (
    callsite,
    context,
    debugging,
    display_relay,
    generator_items,
    payload,
    payload_cache,
    shm,
    worker_logging,
)
from .checks import run_timeout
from .chunking import ChunkPlanner
from .errors import (
    MAKE_INPUT_AGAIN,
    ParallelError,
    RankStoppedError,
    RemoteError,
    RemoteTraceback,  # noqa: F401 (imported from here by older callers)
    SerializationError,
    TaskTimeoutError,
    UsageError,
    WorkerLostError,
    add_note,
    drop_our_frames,
    fake_traceback,
    getattr_recursion,
    getattr_recursion_in,
    looked_up_name,
    note_unsent_name,
    raised_by_our_call,
    show_captured_values,
    show_without_frames,
    unloadable_results,
)
from .exc_record import rebuild
from .fmt import fmt_bytes, func_name, retried_words
from .protocol import Cell, Map
from .warmup import OneTimeCosts
from .worker import ErrorInfo

_call_ids = itertools.count(1)
log = logging.getLogger("mpmagic")

# Items faster than this (seconds, as measured) run in blocks of _FAST_BLOCK
# between crash-position marks (see MapJob._block).
_FAST_ITEM = 2e-6
_FAST_BLOCK = 32

_VIEW_NOTE_BYTES = 1 << 20  # a torch view's storage from which its item gets the note (see _note_tensor_views)

_READ_ONLY_NOTE = (
    "mpmagic: numpy arrays and pandas DataFrames / Series from the notebook (items and captured globals "
    "of 1 MB or more) reach workers read-only: they are shared, not copied. Work on a copy (`a = a.copy()`, "
    "`df = df.copy()`), "
    "or allow writes with `mpmagic.shm.configure(writable=True)` (writes stay in the worker)."
)


def _same_machine(local: bool) -> contextlib.AbstractContextManager:
    """What is pickled for workers on this machine: file-backed memmaps go as
    references the workers open again (``payload.memmaps_by_reference``); on
    Dask (workers maybe elsewhere) nothing changes."""
    return payload.memmaps_by_reference() if local else contextlib.nullcontext()


def short_repr(obj: Any, limit: int = 60) -> str:
    """A repr that fits in an error message: on one line (an xarray or pandas
    object's repr spans several: the message's line broke in the middle)."""
    try:
        r = repr(obj)
    except Exception:
        r = f"<{type(obj).__name__}>"
    if "\n" in r:
        r = _LINE_BREAK.sub(" ", r.strip())
    return r if len(r) <= limit else r[: limit - 3] + "..."


_LINE_BREAK = re.compile(r"\s*\n\s*")


def _is_iterator(obj: Any) -> bool:
    """Is ``obj`` its own iterator (a generator, a file, ``iter(...)``): read once, not anew by each run?"""
    try:
        return iter(obj) is obj
    except TypeError:
        return False


def read_past(iterables: Sequence, read: int, past: str = "") -> str:
    """The words for a run's input read ahead of what finished, or "" when none of
    ``iterables`` (what the caller passed) is an iterator.

    A run reads an iterator in chunks, ahead of the calls (the workers never wait for
    the input); serial ``map`` stopped at item k has read items 0..k. The same
    iterator given again goes on from where the run read it: the items read and not
    returned would be silently missing from the next result. A list, a range or an
    array is read anew by each run, as by serial ``map``: nothing to say. ``read``:
    items read; ``past``: what they were read past (", past the 4 that finished").
    One wording for every run that stops early: a plain run's interrupt and failure
    (:meth:`MapJob.read_past_line`), a checkpoint's interrupt (``MapCheckpoint.kept``).
    """
    if not any(_is_iterator(it) for it in iterables):
        return ""
    return f"an iterator: this one was read {read} item{'s' * (read != 1)} in{past}, and goes on from there"


def _text_of(exc: BaseException) -> str:
    """``str(exc)``, or "" when the task's exception cannot say it (its ``__str__``
    raises): read in the manager thread, whose failure would replace the task's
    own exception with ours."""
    try:
        return str(exc)
    except Exception:
        return ""


def _read_only_write(exc: BaseException) -> bool:
    """Did a write into a read-only array raise ``exc``, or an exception it
    chains (``__cause__``, ``__context__``)? xarray re-raises numpy's
    "assignment destination is read-only" as "Assignment destination is a
    view", with numpy's error as the cause."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(seen) < 10:
        seen.add(id(e))
        if isinstance(e, ValueError) and "read-only" in _text_of(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _read_only_note(exc: BaseException) -> str:
    """The read-only note, saying first what a library's rewording of it means."""
    if isinstance(exc, ValueError) and "read-only" in _text_of(exc):
        return _READ_ONLY_NOTE
    return _READ_ONLY_NOTE.replace("mpmagic: ", "mpmagic: the array written is read-only (the error above rewords "
                                                "numpy's): ", 1)


def _note_daemonic(exc: BaseException) -> None:
    """multiprocessing's refusal to start a process inside a worker, in our words."""
    if isinstance(exc, AssertionError) and "daemonic processes are not allowed to have children" in _text_of(exc):
        add_note(exc, "mpmagic: a task cannot start processes of its own (a Pool, a ProcessPoolExecutor, a "
                      "Process): the pool's workers are daemonic, as multiprocessing.Pool's are. Map the inner work "
                      "with %pmap from the notebook instead (mpmagic.pmap inside a task runs it serially)")


def shown_item(func: Any, star: bool, item: Any) -> tuple[Any, bool]:
    """(the item as serial map sees it, star) for messages and ``Failed.item``.

    ``seed=`` maps a wrapper over ``(index, item)`` pairs (seeding.Seeded):
    an error names the item itself, never the pair.
    """
    unwrap = getattr(func, "mpmagic_item", None)
    return (item, star) if unwrap is None else (unwrap(item), getattr(func, "star", False))


def unit_text(start: int, count: int, one_call: bool = False) -> str:
    """A map unit's items as every message names them: "item 3", "items 4-7", or
    "the call" (``one_call``: ``mpmagic.call``, one call and no input to number).
    The one formatter behind ``MapJob.describe_unit`` (the backends' messages) and
    this module's other messages naming a unit or an item of it (a result that
    cannot be loaded, "the results of items 4-7"; the report's slowest, "the chunk
    of items 4-7"; a lost or timed-out unit, "items 4-7 (chunk starting at 'd')";
    a rechecked block; an item or result that cannot be sent), so they agree."""
    if one_call:
        return "the call"
    return f"item {start}" if count == 1 else f"items {start}-{start + count - 1}"


def item_note(func: Any, star: bool, index: int, item: Any, one_call: bool = False) -> str:
    """The note on a map item's error: "mpmagic: raised by item 3 of the input: f(3)";
    ``one_call`` (``mpmagic.call``: one call, no input to number): "mpmagic: raised in
    the call f(3, y=2)"."""
    if one_call:
        return f"mpmagic: raised in the call {call_text(func, star, item)}"
    return f"mpmagic: raised by item {index} of the input: {call_text(func, star, item)}"


def call_text(func: Any, star: bool, item: Any) -> str:
    """The call ``func`` makes of ``item``, as the user wrote it: "f(3)".

    A ``functools.partial`` reads as the call it makes (``g([1, 2], 3)``), a
    callable object as an instance of its class called (``<Scaler object>(3)``,
    as Python's repr names an instance: ``Scaler(3)`` would read as making one),
    a ``seed=`` run by the user's function, not its wrapper.
    """
    if getattr(func, "mpmagic_item", None) is not None:  # seed= (seeding.Seeded): the user's function
        item, star = shown_item(func, star, item)
        func = func.func
    if not star:
        args = [short_repr(item)]
    elif isinstance(item, (tuple, list)) and len(item) <= 8:
        args = [short_repr(a) for a in item]
    else:  # (many arguments, or an item star cannot unpack)
        args = [f"*{short_repr(item)}"]
    while isinstance(func, functools.partial):  # (what the partial adds, around the item's own arguments)
        args = ([short_repr(a) for a in func.args] + args
                + [f"{k}={short_repr(v)}" for k, v in func.keywords.items()])
        func = func.func
    name = func_name(func) if getattr(func, "__name__", None) else f"<{type(func).__name__} object>"
    return f"{name}({', '.join(args)})"


def rebuild_exception(info: Any, where: str, called: bool = True) -> BaseException:
    """The worker's exception as the same type here, its frames as its traceback,
    with ``where`` (which item or rank) as a note.

    ``called``: the task's own call raised it (the function called on an item, a
    rank's code). Without a frame of the user's (a builtin's error, ``abs(1, 2)``; a
    call with the wrong arguments) it still shows the caller's line, where it leaves
    the API, as serial ``map``'s shows the line that called it. Else (the function or
    the cell's names failed to load in the worker, a ``--gather`` check) no call of
    the user's raised it: it shows alone (:func:`show_without_frames`), not with a
    line that did not raise it."""
    record = getattr(info, "record", None)
    if record is not None:
        exc = rebuild(record)
    else:  # an ErrorInfo made without a record (older worker): words only
        exc = RemoteError(info.type_name, info.message)
        exc.__traceback__ = fake_traceback(info.frames)
    show_captured_values(exc, getattr(info, "context", None))
    add_note(exc, where)
    if exc.__traceback__ is None and not called:  # none of its frames was the user's
        show_without_frames(exc)
    return exc


# Chunks whose (start, end) a job keeps to count the workers busy at once (then it stops keeping them).
MAX_SPANS = 20_000


def helpers_used(job: Any) -> tuple[tuple[str, Any], ...]:
    """The shared helpers ``job``'s payloads named (its function and what that
    captures, its items; a cell's names), as ``(kind, weakref or None)`` pairs:
    ``kind`` as the constructor is named ("Queue", "Value"...). While the run holds
    them (``job.kept``), from those; after it let them go, what it recorded then
    (``helpers_named``), so that ``--compare`` can ask after any backend's run."""
    if not job.kept:
        return job.helpers_named
    pairs = []
    for helper in job.kept.values():
        try:
            ref: Any = weakref.ref(helper)
        except TypeError:  # (a helper that takes no weak reference: its kind is what matters)
            ref = None
        pairs.append((payload.helper_kind(helper), ref))
    return tuple(pairs)


def add_waits(total: dict[str, float], unit: Any) -> None:
    """Add a unit's ``meta["helper_wait"]`` ({kind: seconds} blocked in mpmagic's helpers) to a job's."""
    if isinstance(unit, dict):
        for kind, seconds in unit.items():
            total[kind] = total.get(kind, 0.0) + float(seconds)


def take_unit_meta(job: MapJob | CellJob, unit: Unit, seconds: float, meta: dict | None) -> None:
    """Add what a worker said of a finished unit (``meta``: its CPU and run-queue
    seconds, time blocked in mpmagic's helpers, one-time costs, notes for the
    notebook, its span) to ``job``'s totals, the same for a map's unit and a
    cell's rank, and hand the unit to the run's insights."""
    if meta:
        if "cpu" in meta:
            job.cpu_seconds = (job.cpu_seconds or 0.0) + meta["cpu"]
        if "runq" in meta:
            job.runq_seconds = (job.runq_seconds or 0.0) + meta["runq"]
        if "helper_wait" in meta:
            add_waits(job.helper_wait, meta["helper_wait"])
        job.one_time.note(meta)
        if "notes" in meta:
            say_notes(meta["notes"], job._notes_said, job._out)
        if "end" in meta and len(job.spans) < MAX_SPANS:
            job.spans.append((meta["start"], meta["end"]))
    if job.insights is not None:
        job.insights.chunk(unit, seconds, meta)


@dataclass
class Failed:
    """Stands in the results, with ``errors="collect"``, for an item that failed.

    ``index`` is its position in the input, ``item`` its arguments, ``error``
    the exception, as the item raised it: the worker's frames are its
    ``__traceback__``, and its own ``__cause__`` and ``__context__`` are kept.
    ``info`` is what the worker saw (a ``FailureInfo``, as in
    ``mpmagic.last_failures()``), which ``locals``, ``worker`` and ``pid`` read.
    """

    index: int
    item: Any
    error: BaseException
    # What the worker saw (debugging.FailureInfo): kept here, not on the exception,
    # whose attributes stay the task's own (vars(error) is as serial Python's).
    info: Any = field(default=None, repr=False, compare=False)

    @property
    def locals(self) -> dict[str, str]:
        """The worker's local variables at the raising line, as bounded ``repr``s."""
        return self.info.locals if self.info is not None else {}

    @property
    def worker(self) -> Any:
        """The id of the worker that ran the item (None if not known)."""
        return self.info.worker if self.info is not None else None

    @property
    def pid(self) -> int | None:
        """The process id of the worker that ran the item (None if not known)."""
        return self.info.pid if self.info is not None else None

    def __repr__(self) -> str:
        # (an exception whose __str__ raises reads '<exception str() failed>', as in Python's tracebacks)
        return f"<Failed item {self.index}: input={short_repr(self.item, 40)}, {debugging.exception_line(self.error)}>"


@dataclass(repr=False)
class ToRaise(Failed):
    """A failed item of an ``imap`` stream with ``errors="raise"``: its loop raises
    ``error`` at its place, and the next ``next()`` goes on with the next item, as
    serial ``map`` does (``streaming``). Never yielded: a result of the user's
    function that is a :class:`Failed` stays a value."""

    # The error's traceback as rebuilt (the worker's frames): each raise starts from it
    # (one exception stands for every item of a unit whose worker was lost).
    tb: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.tb = self.error.__traceback__


@dataclass
class Unit:
    """One message's worth of work: a chunk of items, or one rank of a cell."""

    id: int
    start: int
    count: int
    data: bytes
    items: list = field(default_factory=list)
    attempts: int = 0
    lease: Any = None  # shared-memory segments holding its large buffers (shm.Lease)
    # Items per crash-position mark in the worker (see worker.run_items): 1
    # blames a dying worker's exact item; more makes tiny items cheaper.
    block: int = 1
    # Set on items re-run one at a time after a worker died in their block:
    # why it died, to report if they now all succeed.
    recheck: str | None = None
    # Sent again once because its worker died idle before starting it (see
    # LocalBackend._lost); a second such death is this unit's own fault.
    resent_after_idle_death: bool = False
    # Ran on a worker without the pool's %%pool setup (it failed or was skipped
    # there): the one line saying so (``Job.ran_without_setup``).
    without_setup: str | None = None
    # Ran on a Dask worker whose copy of these user modules is not the file the notebook
    # loaded (another machine's): its results are not the notebook's code's (``Job.ran_other_code``).
    other_code: tuple[str, ...] = ()
    # Items of the unit (index in it -> ErrorInfo) that raised under --errors collect,
    # told by the worker before its reply (``Job.collected``): kept if it dies.
    collected: dict | None = None
    # The worker it was last sent to and when (epoch seconds), where the backend
    # says (the local pool): --insights shows a unit lost with its worker there.
    sent_to: Any = None
    sent_at: float | None = None


class WithoutSetup(list):
    """A chunk's results computed on a worker that runs without the pool's
    ``%%pool setup`` (it failed or was skipped there). A list like any other
    for whoever reads it; ``--checkpoint`` does not store it, since the store's
    key names the setup and these results were not computed under it."""


class OtherCode(list):
    """A chunk's results computed on a Dask worker whose copy of the user's ``modules`` is
    not the file the notebook loaded (another machine's copy). A list like any other for
    whoever reads it; ``--checkpoint`` does not store it, since the store's key covers the
    notebook's file and these results came from another."""

    modules: tuple[str, ...] = ()


def _marked(results: list, unit: Unit) -> list:
    """``results`` as :class:`WithoutSetup` or :class:`OtherCode` when ``unit`` ran so (not checkpointed)."""
    if unit.without_setup is not None:
        return WithoutSetup(results)
    if unit.other_code:
        marked = OtherCode(results)
        marked.modules = unit.other_code
        return marked
    return results


def note_without_setup(exc: BaseException, unit: Unit) -> None:
    """A task's NameError on a worker that runs without the setup: add the line
    that says so (the missing name is most likely one of the setup's), once."""
    if unit.without_setup is None or looked_up_name(exc, key_errors=False) is None:
        return
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, (list, tuple)) or unit.without_setup not in notes:
        add_note(exc, unit.without_setup)


class _UnsendableItem(Exception):
    """Item ``offset`` of a chunk cannot be pickled: ``error`` says why, in the user's words."""

    def __init__(self, offset: int, error: SerializationError) -> None:
        super().__init__(offset, error)
        self.offset, self.error = offset, error


class MapJob:
    """A parallel map: chunks out in input order, results back in input order."""

    kind = "map"
    # (backends.base.Job's members of a cell: a map has no ranks, and its units go to any worker)
    size = 0
    ranks_pending = 0
    pinned = False
    abort_at: float | None = None  # (a cell's: a map's failure ends it by itself, see _check_runs)

    def __init__(
        self,
        func: Callable,
        items: Iterable,
        n_items: int | None,
        star: bool,
        workers: int,
        chunksize: int | None = None,
        collect: bool = False,
        timeout: float | None = None,
        retries: int = 0,
        func_payload: bytes | None = None,
        out: Callable[[str, str], None] | None = None,
        progress: Callable[[int], None] | None = None,
        insights: Any = None,
        shared_memory: bool = False,
        on_chunk: Callable[[int, list], None] | None = None,
        accepted: Callable[[int, list], None] | None = None,
        one_call: bool = False,
        iterables: tuple | None = None,
    ) -> None:
        self.call_id = next(_call_ids)
        self.libs = context.libraries()  # (here, in the calling thread: torch's grad mode is per thread)
        self.func = func
        # ``mpmagic.call``: one call of ``func``, not a map; its messages name the call, not "item 0".
        self.one_call = one_call
        # Both are called with (start index, results in order) as each chunk is
        # accepted: each position once, in arrival order. ``accepted`` in the
        # thread that accepts it (the local pool's manager: our own quick
        # hooks, a background handle's list; a stream's feed is StreamJob._accept's). ``on_chunk``
        # (the user's, or a checkpoint's) goes through the run's events like
        # printed output, so it runs in the thread waiting on the run: a slow
        # one delays only its own run, never the manager serving the others.
        self.accepted = accepted
        self._on_chunk = on_chunk
        # Large buffers (numpy arrays) go through shared memory: only for
        # workers on this machine (the backend says so: ``shares_memory``).
        self.shared_memory = shared_memory and shm.ENABLED
        # The shared helpers (mpmagic.Value...) its function and items were pickled
        # with, by id: held until the run ends (release_shared), so that the
        # notebook rebinding ``counter`` meanwhile cannot release the one the
        # workers are about to attach to by name (payload.keeping).
        self.kept: dict[int, Any] = {}
        # What kinds of helper those were (weakly held), recorded when the run lets them
        # go (release_shared): --compare asks after the run (helpers_used, serial_copy).
        self.helpers_named: tuple[tuple[str, Any], ...] = ()
        # Seconds spent here preparing the function's payload, and how it was served
        # (payload_cache.last_served): a warm call whose function captures a 500 MB
        # array spends them comparing it with the workers' copy, and its report says so.
        self.payload_seconds = 0.0
        self.payload_served: tuple[str, int] = ("given", 0)
        # The function's notes in the payload cache when its fast check served it (what the
        # run's notes found looking at it, to skip next time: payload_cache.last_notes), or None.
        self.payload_notes: dict | None = None
        # Of payload_seconds, freeing the copies of arrays the notebook dropped (payload_cache.last_freed).
        self.payload_freed_seconds = 0.0
        # The segment holding the payload's copy of the function's captured arrays (see
        # payload_lost), held until the run ends (release_shared; or when the job is
        # collected, if it never ran): the cache replacing its entry meanwhile (another
        # thread's first call of the same function) does not unlink it under the run.
        self._payload_segment: str | None = None
        self._let_go: weakref.finalize | None = None
        if func_payload is not None:
            self.func_payload, self.func_key = func_payload, payload.payload_key(func_payload)
        else:  # reused from the last call when nothing it captures changed
            try:
                self._build_payload()
            except SerializationError as exc:  # (a generator it reads that is its input too: said so)
                payload.mapped_input_advice(exc, func, iterables)
                raise
        self.star = star
        self.collect = collect
        # A failed item stands in its place (a Failed) and the run goes on, the chunk's
        # later items too: errors="collect", and every imap stream (whose loop raises an
        # item's error at its place and goes on, as serial map's: streaming.StreamJob).
        # Otherwise the first failure ends the run, as serial map's for loop.
        self.per_item = collect
        self._failed_type: type[Failed] = Failed
        # A plain float (or None), whoever made the job: the manager adds it to its clock
        # (an int past float's range raised OverflowError there, in every run's thread).
        self.timeout = run_timeout(timeout)
        self.retries = retries
        self.planner = ChunkPlanner(
            n_items, workers, 1 if timeout and not chunksize else chunksize, key=self.func_key
        )
        # A list, tuple or range is sliced; anything else is read lazily, about one
        # chunk ahead. (Exact types: a subclass's iteration may differ from its slices.)
        self._seq: Sequence | None = cast(Sequence, items) if type(items) in (list, tuple, range) else None
        # Its length now: the run maps that many. A list the notebook changes meanwhile (an imap
        # loop appending to its own input, a worklist) is not followed: see ``input_changed``.
        self._seq_len = len(self._seq) if self._seq is not None else 0
        self._iter: Iterator | None = iter(items) if self._seq is None else None
        # What the caller passed, when ``items`` zips several: the error for a generator another
        # thread is running names which of them it is (``shared_generator_error``).
        self._iterables = iterables or (items,)
        # A lazy input runs the user's code (a generator, a database cursor), so
        # it is read where serial map would read it: in the thread that submits
        # and waits on the run, never in the local pool's manager (where a slow
        # generator held back every run, one over a sqlite cursor failed with
        # "objects created in a thread can only be used in that same thread",
        # and one that started a pmap itself waited for ever). The manager takes
        # chunks from what was read (``_read``, batches as read, ``_read_off`` into
        # the first) and asks the waiting thread for more (``_ask_input``, set by
        # the run: ``redirect``); with nobody to ask (a driven Dask run, whose
        # loop is the waiting thread) ``next_unit`` reads itself.
        self._read: deque[list] = deque()
        self._read_off = 0
        self._read_count = 0  # items read and not yet in a unit
        self._read_lock = threading.Lock()  # batches: appended by the reader, taken by the manager
        self._reading: list | None = None  # the batch a read in progress fills (see _take_reading)
        self._reading_taken = 0  # how many of its items the manager took already
        self._reading_since = 0.0
        self._input_done = False  # the iterator ended, or raised (``_input_error``)
        self._input_error: BaseException | None = None
        # The input's own error (its iterator raised it; not one of ours about it), once it
        # is the run's: a stream ends after it, as serial map over a generator that raised.
        self.input_raised: BaseException | None = None
        self._input_own = False  # ``_input_error`` is the iterator's own
        self._input_asked = False  # a read was asked and is not done yet
        self._n_read = 0  # items read so far (positions for read_ahead_refusal's error)
        self._last_read: list = []  # the last items of the read before (reused_object)
        self._input_want = 0  # how many items that read should bring (a chunk)
        self._ask_input: Callable[[], None] | None = None
        self._next_id = 0
        self._next_start = 0
        self._requeued: deque[Unit] = deque()
        self.outstanding: dict[int, Unit] = {}
        self._results: dict[int, list] = {}  # chunks that came back ahead of an earlier one
        self._late: dict[int, list] = {}  # chunks that came back after the run failed (results_so_far only)
        # Results in input order, extended as soon as the next chunk is in, so
        # the results exist once (not once per chunk plus once assembled).
        self._in_order: list = []
        self.exhausted = False
        # Errors by input index. The run's error is the one of the first failing
        # item in input order (as serial map would raise), decided once no
        # earlier item is still out: ``failure`` is then set.
        self._errors: dict[int, BaseException] = {}
        self._infos: dict[int, debugging.FailureInfo] = {}  # what the workers saw, for those of _errors that have it
        self.failure: BaseException | None = None
        self.failure_info: debugging.FailureInfo | None = None  # the failure's (for %pdebug)
        self.failure_index: int | None = None  # input index of the failing item, when known (for the report)
        self.task_seconds = 0.0
        self.items_done = 0
        self.items_failed = 0
        self.items_total = n_items
        self.n_chunks = 0
        self._out = out or _print_stream
        self._notes_said: set[str] = set()  # the workers' lines this run showed (say_notes)
        # Given the job's writer and its dict's own test, not closures over the job:
        # those made a cycle that kept every finished job (its payload: the pickle of
        # all it captures) until a full collection. ``redirect`` follows ``_out``.
        self._lines = OpenLines(self._out, self.outstanding.__contains__)
        # The notebook's logger levels go with each unit; warnings come back through this.
        self.log_context = worker_logging.notebook_context()
        self._warnings = worker_logging.WarningRelay()
        # Where the map is called (here, in the calling thread): the workers call the
        # function from a frame that looks like that line's (callsite.py).
        self.site = callsite.caller_site()
        # A builtin eval or exec as the function reads the caller's names serially: those
        # names and whose they are, for the note on a task's NameError (_note_unsent_global); None otherwise.
        user_func = getattr(func, "func", func) if getattr(func, "mpmagic_item", None) is not None else func  # (Seeded)
        self._caller_names = callsite.caller_names() if user_func is eval or user_func is exec else None
        self._progress = progress
        # Measured for the report's advice and for --insights (an insights.Recorder).
        self.insights = insights
        self.bytes_sent = 0
        self._views_said = False  # (the note on torch views carrying their whole storage: once per run)
        # The generator objects the items held so far (see _note_shared_generator); None once said.
        self._generators: dict[int, tuple[Any, int]] | None = {}
        self.bytes_back = 0
        self.bytes_shared = 0  # numpy buffers among the items copied into shared memory
        self.cpu_seconds: float | None = None  # CPU seconds the workers reported, if they did
        # Of the task seconds, those the tasks waited for a core (meta["runq"], Linux), if the workers said
        self.runq_seconds: float | None = None
        # ...and those they were blocked in mpmagic's helpers, by kind (meta["helper_wait"]: mpmagic.waits)
        self.helper_wait: dict[str, float] = {}
        self.slowest_task = 0.0
        self.slowest_where: str | None = None
        self.one_time = OneTimeCosts()  # imports / function loading in the workers (warmup.py)
        self.spans: list[tuple[float, float]] = []  # (start, end) of chunks: how many ran at once (report)
        self.retried = 0  # items sent again after their worker died (--retries)
        self._said_retrying = False  # the one line once an item's worker died SAY_RETRIES_AT times (see lost)
        self.timed_out = 0  # items stopped at the timeout
        # Items that had finished in a chunk whose worker then died (or was stopped at
        # a timeout) before it sent the chunk's results: they went out again and ran a
        # second time, with or without --retries (the report says so: Report.ran_again).
        # Counted as they go out again (``_finished_once`` until then): a run that
        # failed first never sent some of them, and "item 4 ran again" was said of an
        # item that ran once.
        self.ran_again: list[int] = []
        self._finished_once: set[int] = set()
        # How their worker ended: "died", "was stopped at --timeout", or both ("died or was stopped...").
        self.ran_again_cause = ""
        # Positions of the items a worker died running, retried or not (--compare leaves them out of its serial run)
        self.died_under: set[int] = set()
        # Other runs held workers while this one was in flight (a background run,
        # another thread's): its wall time is not its own (the backend sets them;
        # the advice must not call that waiting a transfer cost).
        self.shared_workers = False
        self.waited_for_workers = 0.0  # seconds its first unit waited for workers busy with other runs
        # worker -> seconds its units waited there for a %%pool setup still running (see backends/base.py)
        self.setup_waits: dict[Any, float] = {}
        self.ran_on: int | None = None  # worker threads it was given, when the backend says (see backends/base.py)
        self.missing_module_advice: str | None = None  # (see backends/base.py)
        # (the function's notebook globals, the names sending it sent): read on a task's first NameError/KeyError
        self._sent_globals: tuple[dict[str, Any] | None, set[str]] | None = None

    def redirect(self, out: Callable[[str, str], None], progress: Callable[[int], None] | None,
                 chunk: Callable[[int, list], None] | None, ask_input: Callable[[], None] | None) -> tuple:
        """Send output, progress, ``on_chunk`` calls and requests to read more of a
        lazy input elsewhere (a run's event queue); returns the old four.
        ``chunk`` replaces ``on_chunk`` only where there is one (a run without
        it queues no chunk events); ``ask_input`` None: ``next_unit`` reads itself."""
        old = (self._out, self._progress, self._on_chunk, self._ask_input)
        self._out, self._progress, self._ask_input = out, progress, ask_input
        self._lines.write = out
        if self._on_chunk is not None:
            self._on_chunk = chunk
        return old

    # -- reading a lazy input (the waiting thread) ----------------------------
    def prefill(self) -> None:
        """Read the first chunk of a lazy input here, in the submitting thread,
        before the backend takes its lock (the input's code may do anything,
        start a run too), so that the submit's own step has a unit to send."""
        if self._iter is not None and not self._read_count and not self._input_done:
            # One chunk: the step sends it, and a worker computes it while the next is read.
            self.read_input(self.planner.size_hint())

    def read_input(self, n: int | None = None) -> None:
        """Read up to ``n`` more items (default: the chunk the manager last asked for).

        One chunk at a time: the backend sends it while the next is read
        (reading several before any went out left the workers idle meanwhile).
        An exception of the input is kept and raised by ``next_unit`` once the
        items before it went out (as the run's error, like serial map's), a
        ``SystemExit`` too; a KeyboardInterrupt in the main thread is not caught:
        Ctrl-C there is the waiting thread's (see :func:`input_raised_it`).
        """
        if self._iter is None or self._input_done:
            self._input_asked = False
            return
        want = max(1, self._input_want if n is None else n)
        batch: list = []
        error: BaseException | None = None
        exhausted = False
        with self._read_lock:  # (the manager may take the items read so far: see _take_reading)
            self._reading, self._reading_taken, self._reading_since = batch, 0, time.monotonic()
        try:
            exhausted = read_into(batch, self._iter, want)
        except BaseException as exc:
            if not input_raised_it(exc):
                raise
            if advanced_elsewhere(exc):  # (another run, the loop or a thread is inside the generator)
                error = shared_generator_error(self._iterables)
            else:
                drop_our_frames(exc)  # raised later, from results(): the user's generator frames only
                error = exc
        keep = len(batch)
        if (reused := read_ahead_refusal(self._iter, self._n_read, self._last_read, batch)) is not None:
            keep, error = reused  # (the items from the first changed one on would be sent as they were not read)
        self._n_read += len(batch)
        self._last_read = batch[-2:]
        with self._read_lock:  # (the end is known together with the last batch: never one without the other)
            taken = self._reading_taken
            rest = batch if not taken and keep == len(batch) else batch[taken : max(keep, taken)]
            self._reading = None
            if rest:
                self._read.append(rest)
                self._read_count += len(rest)
            if error is not None or exhausted:
                self._input_error, self._input_done = error, True
                self._input_own = reused is None
            self._input_asked = False

    def _take_reading(self, size: int) -> list:
        """Up to ``size`` of the items a read still in progress has read so far,
        once it has gone on for ``_READ_CUT`` seconds (manager, any thread).

        The reader is blocked in the input's ``next()`` (a queue another thread
        fills, and the next item is not there yet): the items it has read go
        out now, as serial map would have given their results. Left until the
        read ended, five items in a queue whose sixth came 3 s later gave their
        results 3 s late, and never if no sixth came. ``list.extend`` makes each
        item read visible in the reader's list at once (in CPython); where it
        would not, this finds nothing and the read goes out when it ends.
        """
        with self._read_lock:
            reading = self._reading
            if reading is None or time.monotonic() - self._reading_since < _READ_CUT:
                return []
            start = self._reading_taken
            items = reading[start : start + size]
            self._reading_taken = start + len(items)
            return items

    def _slow_read_has_items(self) -> bool:
        """Has a read gone on for ``_READ_CUT`` with items the manager may take?"""
        reading = self._reading
        return (reading is not None and len(reading) > self._reading_taken
                and time.monotonic() - self._reading_since >= _READ_CUT)

    def input_wait(self) -> float | None:
        """Seconds until the manager should look for items of a read in progress
        (:meth:`_take_reading`), or None when no read is going on."""
        if self._input_done or self._iter is None:
            return None
        if self._reading is None:  # asked, and the reading thread has not started yet (it wakes nobody)
            return _READ_CUT if self._input_asked else None
        return max(0.0, self._reading_since + _READ_CUT - time.monotonic()) + _READ_CUT / 2

    def _take_read(self, n: int) -> list:
        """Up to ``n`` of the items read, in input order."""
        out: list = []
        with self._read_lock:
            while len(out) < n and self._read:
                batch, off = self._read[0], self._read_off
                need = n - len(out)
                if len(batch) - off <= need:
                    out.extend(batch[off:] if off else batch)
                    self._read.popleft()
                    self._read_off = 0
                else:
                    out.extend(batch[off : off + need])
                    self._read_off = off + need
            self._read_count -= len(out)
        return out

    def _lazy_items(self, size: int) -> list | None:
        """The next chunk of a lazy input, or None when it must wait for a read."""
        if self._read_count < size and not self._input_done and self._ask_input is None:
            self.read_input(size - self._read_count)  # nobody to ask: this is the reading thread
        if not self._read_count and not self._input_done:
            early = self._take_reading(size)  # what a read blocked in the input's next() has read so far
            if early:
                return early
            self._ask_for_input(size)
            return None
        items = self._take_read(size)
        if not items and self._input_error is not None:
            error, self._input_error = self._input_error, None
            if self._input_own:
                self.input_raised = error
            self._input_failed(self._next_start, error, "the input raised it while it was read, in the notebook")
            return None
        if not self._input_done and self._read_count < size:
            self._ask_for_input(size)  # one chunk read ahead: ready when the next worker is free
        return items

    def read_past_line(self, interrupted: bool, *, failed_at: int | None = None, got: int | None = None,
                       so_far: bool = False) -> str:
        """What the line of a run that stopped early says of an iterator it read ahead:
        "make its input again (an iterator: this one was read 40 items in, past ...)",
        or "" when its input is read anew by each run (a list) or was read no further
        than serial ``map`` would have (see :func:`read_past`). ``interrupted`` (or
        cancelled): past the items that finished, or the ``got`` results a stream's loop
        got (serially, a loop that got n results has read n items); else past the failing
        item, ``failed_at`` (an ``imap`` item's, raised in its loop) or ``failure_index``.
        ``so_far``: the run still reads on (an open stream whose loop got an item's error)."""
        read = self._n_read
        if interrupted:
            finished = self.items_done if got is None else got
            if read <= finished:
                return ""
            past = (f", past the {finished} that finished" if got is None
                    else f", past the {got} result{'s' * (got != 1)} the loop got")
        else:
            index = self.failure_index if failed_at is None else failed_at
            if index is None or read <= index + 1:  # (serial map reads the failing item too; the input's own error: none)
                return ""
            past = f", past item {index}, which failed"
        words = read_past(self._iterables, read, (" so far" if so_far else "") + past)
        return f"{MAKE_INPUT_AGAIN} ({words})" if words else ""

    def _ask_for_input(self, size: int) -> None:
        if self._input_asked or self._ask_input is None:
            return
        self._input_asked = True
        self._input_want = size  # (an input is read about as far ahead as serial map would)
        self._ask_input()

    # -- handing out work --------------------------------------------------
    @property
    def failed(self) -> bool:
        return self.failure is not None

    @property
    def finished(self) -> bool:
        if self.failure is not None:
            return True
        return self.exhausted and not self._requeued and not self.outstanding

    @property
    def has_work(self) -> bool:
        if self.failure is not None:
            return False
        if self._errors:  # after an error only earlier items still go out
            first = min(self._errors)
            return any(u.start < first for u in self._requeued)
        if self._requeued:
            return True
        # (a lazy input with nothing read and a read asked: the reader wakes the backend,
        # unless that read has gone on long enough for its items so far to go: _take_reading)
        return not self.exhausted and not (self._iter is not None and not self._read_count and self._input_asked
                                           and not self._slow_read_has_items())

    def next_unit_for(self, wid: int) -> Unit | None:
        """The next unit, for worker ``wid``: any worker will do (see ``ranks.KeptCellJob``)."""
        return self.next_unit()

    def drop_orphans(self, live: set[int]) -> None:
        """Nothing to drop: no unit of a map is pinned to a worker."""

    def next_unit(self, limit: int | None = None, pair: bool = False) -> Unit | None:
        """The next chunk to send, or None; at most ``limit`` items if given (what
        the worker it goes to may still run under ``max_tasks_per_child``).

        ``pair``: the backend would queue this chunk and the next one on the same
        worker, one behind the other (``backends/local``'s pipelining): a list's,
        tuple's or range's two chunks are cut as one (``ChunkPlanner.pair_size``),
        one message and one reply fewer."""
        if self.failure is not None:
            return None
        if self._errors:
            first = min(self._errors)
            for unit in self._requeued:
                if unit.start < first:
                    self._requeued.remove(unit)
                    unit = self._at_most(unit, limit)
                    self.outstanding[unit.id] = unit
                    self._going_again(unit)
                    return unit
            return None
        if self._requeued:
            unit = self._at_most(self._requeued.popleft(), limit)
            self._going_again(unit)
        else:
            if self.exhausted:
                return None
            size = self.planner.pair_size() if pair and self._seq is not None else self.planner.next_size()
            if limit is not None:
                size = max(1, min(size, limit))
            if self._seq is not None:
                end = min(self._next_start + size, self._seq_len)
                chunk = self._seq[self._next_start : end]
                # A slice goes as it is: a range's as the range itself (a few bytes,
                # where the list of its numbers was most of the notebook's time per
                # tiny item), a tuple's uncopied; the workers iterate and index
                # either as they would a list.
                items: Any = chunk
                if end >= min(self._seq_len, len(self._seq)):  # (a list that shrank meanwhile ends sooner)
                    self.exhausted = True  # (a list's end is known now: no empty unit asked for after it)
            else:
                lazy = self._lazy_items(size)
                if lazy is None:
                    return None  # (asked the waiting thread to read more)
                items = lazy
                if self._input_done and not self._read_count and self._input_error is None:
                    self.exhausted = True
            if not items:
                return None
            # Plain numbers, strings... (the common chunk): pickled as they are, with no
            # lease (an atom never travels in shared memory) and no helper to keep.
            lease = None
            data = payload.dumps_atoms(items)
            if data is None and self._generators is not None:  # (objects: one generator in two items?)
                self._note_shared_generator(items, self._next_start)
            if data is None:
                lease = shm.Lease() if self.shared_memory else None
            try:
                if data is None:
                    data = self._pack(items, lease)
            except _UnsendableItem as bad:  # the items before it still go: one of them may fail first
                if lease is not None:
                    lease.release()
                    lease = None
                # Settled once the unit before it is out (below): settled now, with
                # nothing earlier in flight, the unpicklable item won over an
                # earlier item of its own chunk that fails.
                self._input_failed(self._next_start + bad.offset, bad.error, "the item could not be sent to a worker",
                                   settle=False)
                items = items[: bad.offset]
                if not items:
                    self._settle()
                    return None
                data = payload.dumps_data(items)
            if not self._views_said and "torch" in sys.modules and not isinstance(items, range):
                self._note_tensor_views(items, self._next_start)
            unit = Unit(self._next_id, self._next_start, len(items), data, items, lease=lease)
            unit.block = self._block()
            self.planner.note_bytes(len(items), len(unit.data) + (lease.nbytes if lease else 0))
            self._next_id += 1
            self._next_start += len(items)
            self.planner.note_sent(len(items))
            self.n_chunks += 1
            self.bytes_sent += len(unit.data)
            if lease is not None:
                self.bytes_shared += lease.copied
        self.outstanding[unit.id] = unit
        if self._errors:
            self._settle()  # (an input error: decided once this unit, before it, is back)
        return unit

    def _note_shared_generator(self, items: Any, start: int) -> None:
        """One line (once per run) when two items hold the same random generator object
        (``map(simulate, params, [rng] * n)``, as numpy advises passing a generator): each
        item gets its own copy of it, so all of them drew the same numbers, silently."""
        seen = self._generators
        line = None if seen is None else generator_items.shared_generator(items, start, seen)
        if line is not None:
            self._generators = None  # (said; the generators held meanwhile are let go)
            self._out("stderr", f"mpmagic: {line}\n")

    def _note_tensor_views(self, items: Any, start: int) -> None:
        """One line (once per run) when an item is a torch tensor viewing a much
        larger storage: torch pickles a view with its whole storage, so 100 row
        views of a 4 MB tensor sent 400 MB (numpy sends a view's own bytes)."""
        tensor = getattr(sys.modules.get("torch"), "Tensor", None)
        if not isinstance(tensor, type):
            return
        for i, item in enumerate(items):
            if type(item) is not tensor and not issubclass(type(item), tensor):
                continue
            try:
                stored, data = int(item.untyped_storage().nbytes()), int(item.nbytes)
            except Exception:
                continue
            if stored >= _VIEW_NOTE_BYTES and stored > 2 * data:
                self._views_said = True
                self._out("stderr", (
                    f"mpmagic: item {start + i} is a view of a larger torch tensor, and torch sends a view with all "
                    f"of its tensor's storage ({fmt_bytes(stored)} for {fmt_bytes(data)} of data), and so does every "
                    "such item: send copies of the views alone (`[t.clone() for t in rows]`), or indices to "
                    "slice in the task\n"))
                return

    def _input_failed(self, index: int, error: BaseException, why: str, settle: bool = True) -> None:
        """The input itself failed at position ``index`` (its iterator raised, or
        the item cannot be pickled): nothing from there on goes out. Kept like an
        item's error, so that, as in serial map, an item before it that fails
        is the run's error (before, the input's error won at once). ``why``
        says so for ``%pdebug``: no call of the function raised it."""
        self.exhausted = True
        if index not in self._errors:
            self._infos[index] = debugging.failure_of(error, outside=why)
        self._errors.setdefault(index, error)
        if settle:
            self._settle()

    def _block(self) -> int:
        """Crash-position granularity for a new chunk: per item, unless items
        were measured to take under ~2 us, where marking each one would cost
        as much as the item (the block is then re-run to find a crash)."""
        per_item = self.planner.per_item
        if self.timeout or per_item is None or per_item >= _FAST_ITEM:
            return 1
        return _FAST_BLOCK

    def _pack(self, items: list, lease: Any = None) -> bytes:
        """The chunk's items pickled; ``_UnsendableItem`` names the first that cannot be.
        Helpers among them are kept alive until the run ends (``self.kept``)."""
        try:
            with payload.keeping(self.kept), _same_machine(lease is not None):
                if lease is not None:
                    return shm.dumps_lent(items, lease, payload.dumps_data)
                return payload.dumps_data(items)
        except Exception:
            for i, item in enumerate(items):
                try:
                    payload.dumps_data(item)
                except Exception as exc:
                    index = self._next_start + i
                    what = (f"the arguments of the call {call_text(self.func, self.star, item)}" if self.one_call
                            else f"{unit_text(index, 1)} ({short_repr(item)})")
                    raise _UnsendableItem(i, SerializationError(
                        f"cannot send {what} to the workers: "
                        + payload.explain_unpicklable(item, f"item {index}", exc, item=True).split(": ", 1)[1]
                    )) from None
            raise

    def describe_unit(self, unit: Unit) -> str:
        """``unit`` in a backend's words: "item 3", "items 4-7", "the call" (``mpmagic.call``):
        :func:`unit_text`, as every other message of this job names a unit."""
        return unit_text(unit.start, unit.count, self.one_call)

    def message(self, unit: Unit) -> Map:
        # With insights the worker also times each item; ``block``: see Unit.
        # ``log_context``: the chunk's first index (labels its records) and the
        # notebook's logger levels (see worker_logging). ``item_clock``: a
        # --timeout over several items is each item's, so the worker tells when
        # each starts (a chunk of one is timed as a whole: nothing to tell).
        # ``site``: where the map was called (callsite.py).
        return Map(
            self.call_id, unit.id, self.func_key, self.star, self.per_item, unit.data, self.insights is not None,
            unit.block, (None if self.one_call else unit.start, self.log_context),  # (a call's records: no "[item 0]")
            bool(self.timeout) and unit.count > 1, self.site,
        )

    # -- taking back results -----------------------------------------------
    def _shown(self, item: Any) -> tuple[Any, bool]:
        """(the item as serial map sees it, star) for messages and ``Failed.item``."""
        return shown_item(self.func, self.star, item)

    def _note_unsent_global(self, exc: BaseException) -> None:
        """A task's NameError (or KeyError of a str key) for a notebook variable
        the function reads only by a name built at run time (``eval('K')``,
        ``globals()['K']``): that variable was not sent with the function. Say
        which, why, and what to do, as ``%%parallel`` does for a cell's
        (``errors.note_unsent_name``). The notebook's namespace is the
        function's ``__globals__``, read here, on the notebook side."""
        if looked_up_name(exc) is None:  # (most errors: no look at the function)
            return
        if self._caller_names is not None:  # map(eval, texts): serially the caller's names
            fname = "eval" if getattr(self.func, "func", self.func) is eval else "exec"
            whose = self._caller_names  # (name -> "the notebook", "the calling function")
            note_unsent_name(
                exc, whose, (),
                lambda name: (f"mpmagic: {whose[name]} has {name!r}, but {fname} runs in a worker, where "
                              f"{whose[name]}'s variables are not (serial map({fname}, ...) reads them where it is "
                              f"called): map a function that names them, lambda s: {fname}(s, {{{name!r}: {name}}}), "
                              f"or pass them as arguments"),
                key_errors=False,
            )
            return
        if self._sent_globals is None:
            func: Any = self.func
            if getattr(func, "mpmagic_item", None) is not None:  # seed= (seeding.Seeded): the user's function
                func = func.func
            self._sent_globals = payload.sent_globals(func)
        namespace, sent = self._sent_globals
        if namespace is None:
            return
        fname = getattr(self.func, "__name__", "the function")
        note_unsent_name(
            exc, namespace, sent,
            lambda name: (f"mpmagic: the notebook has {name!r}, but {fname}'s code does not name it (read by a name "
                          f"built at run time: eval, exec, globals()[...]?), so it was not sent with the function: "
                          f"use {name} in the function's code, or pass it as an argument"),
        )

    def _where(self, index: int, item: Any) -> str:
        return item_note(self.func, self.star, index, item, self.one_call)

    def done(self, unit: Unit, data: bytes, seconds: float, meta: dict | None = None) -> None:
        """A chunk's results came back. ``meta``:
        ``worker``, ``start``/``end`` (epoch seconds), ``cpu``, ``runq`` (seconds waiting for a core),
        ``helper_wait`` ({kind: seconds} blocked in mpmagic's helpers) and, with insights,
        ``item_top`` (index, seconds) of its slowest items (or ``item_seconds``, all of them) and ``transfer`` seconds;
        ``once``: one-time costs the worker paid (warmup.OneTimeCosts.note); ``notes``: its lines
        for the notebook (:func:`say_notes`); ``failed``, with
        ``per_item``: how many results are an item's ErrorInfo (absent: look for them)."""
        self.bytes_back += len(data)
        # Results count as packed items do: later chunks stay under the planner's
        # max_bytes of results too (10 MB results made time-sized chunks of 58 items,
        # and an imap's buffer of such chunks held 1.2 GB; report migrate14 finding 6).
        self.planner.note_bytes(unit.count, len(data))
        take_unit_meta(self, unit, seconds, meta)
        try:
            results = payload.loads(data)
        except Exception as exc:
            self.outstanding.pop(unit.id, None)
            plural = unit.count > 1 and not self.one_call
            what = f"the result{'s' if plural else ''} of {self.describe_unit(unit)}"
            self._fail_or_collect(unit, unloadable_results(what, exc), None)
            return
        failed = 0
        # (the worker says how many of its items failed: a chunk without any is not gone
        # through, ~10 ms per 200,000 results, every imap's chunks being per_item)
        if self.per_item and (meta is None or meta.get("failed", 1)):
            for i, r in enumerate(results):
                if type(r) is ErrorInfo:
                    results[i] = self._collected_failed(unit, r, i)
                    failed += 1
        results = _marked(results, unit)
        self._complete(unit, results, seconds, failed)

    def collected(self, unit: Unit, index: int, info: Any) -> None:
        """Item ``index`` of ``unit`` raised (``errors="collect"``; the worker told before its
        reply): if the worker dies before the reply, that error is kept (``lost``)."""
        if unit.collected is None:
            unit.collected = {}
        unit.collected[index] = info

    def _collected_failed(self, unit: Unit, info: Any, index: int) -> Failed:
        """The Failed of item ``index`` of ``unit``, from its worker's ``info``."""
        idx = unit.start + index
        item = self._shown(unit.items[index])[0]
        error = rebuild_exception(info, self._where(idx, unit.items[index]))
        self._noted(error, unit, info)
        return self._failed_type(idx, item, error, debugging.failure_of(error, info, index=idx, item=item))

    def _noted(self, exc: BaseException, unit: Unit, info: Any) -> None:
        """The notes an item's error gets here (a write to a read-only shared array, a daemonic
        process, a module only the notebook imports, a notebook name not sent, a worker without
        the setup), raised or collected. ``info``: the worker's ErrorInfo of it."""
        if self.shared_memory and _read_only_write(exc):
            add_note(exc, _read_only_note(exc))
        _note_daemonic(exc)
        note_missing_module(exc, info, self.missing_module_advice)
        self._note_unsent_global(exc)
        note_without_setup(exc, unit)

    def ran_without_setup(self, unit: Unit, note: str) -> None:
        """The worker answering ``unit`` runs without the pool's setup (``note``: one line
        saying so). Its results are not checkpointed; a NameError of its items says so."""
        unit.without_setup = note

    def ran_other_code(self, unit: Unit, modules: list[str]) -> None:
        """The Dask worker answering ``unit`` runs ``modules`` from a file that is not the one
        the notebook loaded (told before the reply, with a line in the cell): its results
        are not checkpointed."""
        unit.other_code = tuple(modules)

    def _deliver_partial(self, unit: Unit, partial: bytes) -> None:
        """The results a worker returned before the item that failed, accepted as
        a chunk of their own (at the failing chunk's start)."""
        try:
            results = payload.loads(partial)
        except Exception:
            log.debug("mpmagic: could not load the results before a failing item", exc_info=True)
            return
        if not results or unit.start < len(self._in_order):
            return
        results = _marked(results, unit)
        self._results[unit.start] = results
        self.items_done += len(results)  # they ran ("failed at item 13 after 0 of 30 items" when one chunk held 0-13)
        self._accept(unit.start, results, 0)
        if self._on_chunk is not None:
            self._on_chunk(unit.start, results)
        while len(self._in_order) in self._results:
            self._in_order.extend(self._results.pop(len(self._in_order)))

    def _complete(self, unit: Unit, results: list, seconds: float | None, failed: int = 0) -> None:
        """``unit`` is done with ``results``, which took ``seconds`` in a worker (None: no
        run was timed, a failure known without one: the chunk planner learns nothing).
        ``failed``: how many of them are the Failed of its items that failed (``per_item``)."""
        self.outstanding.pop(unit.id, None)
        self._lines.settle()
        if unit.start >= len(self._in_order):  # (a chunk already in place never counts twice)
            self._results[unit.start] = results  # by position: a split chunk stays in order
            self._accept(unit.start, results, failed)
            if self._on_chunk is not None:
                self._on_chunk(unit.start, results)
        while len(self._in_order) in self._results:
            self._in_order.extend(self._results.pop(len(self._in_order)))
        self.items_done += unit.count
        self.items_failed += failed
        if seconds is None:
            seconds = 0.0
        else:
            self.task_seconds += seconds
            self.planner.record(unit.count, seconds)
        if seconds > self.slowest_task:
            self.slowest_task = seconds
            # ("the chunk of ...": advice tells a chunk from an item, or rank, that ran alone)
            chunk = "the chunk of " if unit.count > 1 and not self.one_call else ""
            self.slowest_where = chunk + self.describe_unit(unit)
        if unit.recheck is not None:
            self._out(
                "stderr",
                f"mpmagic: a worker {unit.recheck} while running {'one of ' if unit.count > 1 else ''}"
                f"{self.describe_unit(unit)}; "
                "re-run one at a time they all succeeded, so no result is missing, but those of them that had run "
                "before it ended ran twice (which ones is not known)\n",
            )
        unit.items = []
        unit.data = b""
        unit.collected = None
        if unit.lease is not None:  # its segments serve the next chunks
            unit.lease.release()
        if self._progress:
            self._progress(unit.count)
        if self._errors:  # (_settle has nothing to decide without one)
            self._settle()

    def _accept(self, start: int, results: list, failed: int) -> None:
        """Hand a chunk accepted in place to ``accepted`` (see __init__); ``failed``: the
        number of its items' Failed among them (a stream's reader looks for them only then)."""
        if self.accepted is not None:
            self.accepted(start, results)

    def _fail(self, index: int, exc: BaseException) -> None:
        """Item ``index`` failed: keep its error; raise the first one in input order."""
        self.items_failed += 1
        if index not in self._errors:
            self._errors[index] = exc
        self._settle()

    def _settle(self) -> None:
        """Decide the run's error once no item before the first failing one is still out."""
        if not self._errors or self.failure is not None:  # (the usual: no error)
            return
        first = min(self._errors)
        if any(u.start < first for u in self.outstanding.values()) or any(u.start < first for u in self._requeued):
            return
        self.failure = self._errors[first]
        self.failure_info = self._infos.get(first)
        self.failure_index = first

    def error(self, unit: Unit, index: int, info: Any, partial: bytes, seconds: float) -> None:
        self.outstanding.pop(unit.id, None)
        self.task_seconds += seconds
        if index > 0 and partial:
            # The chunk's results before the failing item: a stream (imap,
            # on_chunk, a checkpoint) gets them, as serial map yields them before
            # it raises (an ordered imap raised some 25 items early), and
            # --rerun-failed keeps them (it ran those items, with their side
            # effects, a second time).
            self._deliver_partial(unit, partial)
        else:
            drop_partial(partial)  # results before the failing item: unlink their segments
        if index < 0:  # the chunk as a whole could not run (function failed to load)
            exc = rebuild_exception(info, _load_failure_note(info, self.missing_module_advice), called=False)
            idx = unit.start
            if idx not in self._errors:  # (no item's call raised it: %pdebug has nothing to replay)
                self._infos[idx] = debugging.failure_of(exc, info, outside=LOAD_FAILED)
        else:
            idx = unit.start + index
            exc = rebuild_exception(info, self._where(idx, unit.items[index]))
            if idx not in self._errors:
                self._infos[idx] = debugging.failure_of(exc, info, index=idx, item=self._shown(unit.items[index])[0])
            self._noted(exc, unit, info)
        if unit.lease is not None:  # no worker reads this chunk any more
            unit.lease.release()
        self._fail(idx, exc)

    def unpicklable(self, unit: Unit, index: int | None, info: Any) -> None:
        self.outstanding.pop(unit.id, None)
        where = "" if index is None else f" of {unit_text(unit.start + index, 1, self.one_call)}" + (
            f" {call_text(self.func, self.star, unit.items[index])}" if self.one_call
            else f" of the input ({short_repr(self._shown(unit.items[index])[0])})")
        text = info.exc_text.strip()
        exc = SerializationError(f"the result{where} cannot be sent back from the worker: {text}. "
                                 f"{payload.result_advice(text)}")
        self._fail_or_collect(unit, exc, index)

    def lost(
        self, unit: Unit, reason: str, timed_out: bool = False, index: int | None = None, worker_kept: bool = False
    ) -> None:
        """The worker running ``unit`` died or was stopped for a timeout.

        ``index``, when the backend knows it, is the position in the chunk of
        the item that was running: only that item is blamed, and the chunk's
        other items (whose results died with the worker) go out again.
        ``worker_kept``: a timeout the backend could not stop (a Dask cluster
        mpmagic does not own); ``reason`` then says what became of the worker.
        """
        if self.insights is not None:  # (the timeline shows it as stopped, not the worker as idle)
            self.insights.lost(unit, timed_out, self.timeout, index, replaced=not worker_kept)
        self.outstanding.pop(unit.id, None)
        if index is not None and 0 <= index < unit.count and unit.count > 1:
            # --retries counts per item: the item that was running is charged, the
            # chunk's others (finished or not started, their results died with the
            # worker) go out again uncharged. Charging the chunk spent a chunk's one
            # retry on its first death, so a second item dying once failed the run.
            if unit.lease is not None:  # its parts go out again packed inline (see _resend_part)
                unit.lease.release()
                unit.lease = None
            # The items before ``index`` had finished; their results died with the worker
            # (a chunk's results travel together: no message per item). Those whose error
            # the worker told (``collected``) keep it; the others run again (said in the report).
            again = len(self._finished_once)
            self._finished_before(unit, index)
            if len(self._finished_once) > again:
                cause = "was stopped at --timeout" if timed_out else "died"
                self.ran_again_cause = (cause if self.ran_again_cause in ("", cause)
                                        else "died or was stopped at --timeout")
            if unit.block > 1 and not timed_out:  # (which item of the block is not known yet)
                self._recheck(unit, index, reason)
                return
            unit = self._isolate(unit, index)
        if not timed_out:
            self.died_under.update(range(unit.start, unit.start + unit.count))
        if not timed_out and unit.attempts < self.retries:  # (keeps its lease, if any: sent again as is)
            # (a chunk whose dying item is not known, e.g. it died loading it, is charged as a whole)
            unit.attempts += 1
            self.retried += unit.count
            self._requeued.append(unit)
            if unit.attempts == SAY_RETRIES_AT and not self._said_retrying:
                # (a big --retries on an item that always kills its worker looked like a hang: say so, once)
                self._said_retrying = True
                left = self.retries - unit.attempts
                self._out("stderr", f"mpmagic: the worker running {self._what(unit)} died {unit.attempts} times; "
                                    f"--retries {self.retries} sends it again up to {left} more "
                                    f"time{'s' if left != 1 else ''} (interrupt to stop)\n")
            return
        if unit.lease is not None:
            unit.lease.release()
            unit.lease = None
        what = self._what(unit)
        if timed_out:
            # The item ran (at least) this long: work the serial estimate counts too.
            self.task_seconds += self.timeout or 0.0
            self.timed_out += unit.count
            fate = reason if worker_kept else "its worker was stopped and replaced"
            # (--retries re-sends what a dying worker took with it; an item that runs
            # too long would run too long again: it is not retried, and says so)
            retried = " (retries=, --retries, re-send items whose worker died, not items past the timeout)" if self.retries else ""
            exc: BaseException = TaskTimeoutError(
                f"{what} ran past the timeout of {self.timeout:g} s; {fate}{retried}")
        else:
            # (worker_kept: a Dask cluster's worker, which the pool does not replace itself)
            fate = "" if worker_kept else "; the pool replaced it"
            if unit.attempts:  # (with --retries: the last of its sends, each of which its worker died running)
                fate += f"; sent {unit.attempts + 1} times (--retries {self.retries}), its worker died each time"
            exc = WorkerLostError(f"the worker running {what} {reason}{fate}")
        self._fail_or_collect(unit, exc, None)

    def ran_again_elsewhere(self, unit: Unit, index: int) -> None:
        """The backend's engine ran ``unit`` again on another worker after its worker died or
        left running item ``index`` of it (Dask's own retry, with no --retries): that item
        ran twice, side effects too, and so did the items before it, whose results died
        with the worker. The report says so as for a --retries retry (``retried``,
        ``ran_again``); ``--compare`` leaves the item out of its serial run."""
        index = max(0, min(index, unit.count - 1))
        self.retried += 1
        self.died_under.add(unit.start + index)
        if index:
            self.ran_again.extend(range(unit.start, unit.start + index))
            self.ran_again_cause = "died" if self.ran_again_cause in ("", "died") else "died or was stopped at --timeout"

    def not_run(self, unit: Unit, reason: str) -> None:
        """``unit`` could not run at all: the backend had no worker for it (every
        worker of a Dask cluster left, and none joined in time). Its items fail
        with a ``WorkerLostError`` that says so: with ``collect``, a ``Failed`` in
        each place, beside the results of the items that did finish."""
        self.outstanding.pop(unit.id, None)
        self._fail_or_collect(unit, WorkerLostError(f"{self._what(unit)} did not run: {reason}"), None)

    def _what(self, unit: Unit) -> str:
        """``unit``'s items, for messages: "item 3 ('c')", "items 4-7 (chunk starting at 'd')",
        "the call f(3)" (``mpmagic.call``)."""
        which = self.describe_unit(unit)
        if self.one_call:
            return f"{which} {call_text(self.func, self.star, unit.items[0])}"
        shown = short_repr(self._shown(unit.items[0])[0])
        return f"{which} ({shown})" if unit.count == 1 else f"{which} (chunk starting at {shown})"

    def split(self, unit: Unit) -> list[int]:
        """Send ``unit``'s items out again one per unit, in its place; returns the new units' ids.

        For a backend that cannot tell which item of a chunk killed its worker
        (Dask has no crash position): run alone, each item either comes back
        or is the one to blame, so the chunk's other items are not lost with
        it (what ``_isolate`` does when the worker says which item it was on).
        """
        self.outstanding.pop(unit.id, None)
        if unit.lease is not None:  # the parts go out packed inline (see _resend_part)
            unit.lease.release()
            unit.lease = None
        first = self._next_id
        for i in range(unit.count):
            self._resend_part(unit, i, i + 1, block=1)
        return list(range(first, self._next_id))

    def _finished_before(self, unit: Unit, index: int) -> None:
        """The worker running ``unit`` died at item ``index`` (its block's first): the items
        before it had finished. Each whose error the worker told (``collected``) fails with it
        now; the others go out again (their retries afresh: not at fault) and are counted in
        ``ran_again`` as they go out again. ``_isolate`` and ``_recheck`` then send the rest."""
        known = unit.collected or {}
        lo = 0
        for j in sorted(k for k in known if k < index):
            self._again(unit, lo, j)
            part = self._part(unit, j, j + 1, block=1)
            self._complete(part, [self._collected_failed(unit, known[j], j)], None, 1)
            lo = j + 1
        self._again(unit, lo, index)

    def _again(self, unit: Unit, lo: int, hi: int) -> None:
        """Items ``lo:hi`` of ``unit`` ran, and their results died with its worker: they go out again."""
        self._resend_part(unit, lo, hi, attempts=0)
        self._finished_once.update(range(unit.start + lo, unit.start + hi))

    def _going_again(self, unit: Unit) -> None:
        """``unit`` goes out again: those of its items that had finished once are
        said to have run again (``ran_again``) now, not when they were queued."""
        if self._finished_once:
            again = [i for i in range(unit.start, unit.start + unit.count) if i in self._finished_once]
            if again:
                self.ran_again.extend(again)
                self._finished_once.difference_update(again)

    def _isolate(self, unit: Unit, index: int) -> Unit:
        """Split ``unit`` around item ``index``: re-send those after it, return the culprit
        (packed, with the chunk's attempts, to be sent again or to fail); those before it
        went out with ``_finished_before``."""
        # The others were not at fault: their retries start afresh.
        self._resend_part(unit, index + 1, unit.count, attempts=0)
        return self._part(unit, index, index + 1, block=1)

    def _recheck(self, unit: Unit, index: int, reason: str) -> None:
        """A worker died somewhere in the block of items starting at ``index``:
        re-send the chunk's other items as they were, and the block's items
        marking each one, so a crash that repeats is blamed on its exact item."""
        end = min(unit.count, index + unit.block)
        self._resend_part(unit, index, end, block=1, recheck=reason)
        self._resend_part(unit, end, unit.count)

    def _resend_part(
        self, unit: Unit, lo: int, hi: int, block: int | None = None, recheck: str | None = None, attempts: int | None = None
    ) -> None:
        """Queue items ``lo:hi`` of ``unit`` to go out again as a unit of their own
        (with ``unit``'s block size and attempts unless given)."""
        if lo < hi:
            self._requeued.append(self._part(unit, lo, hi, block, recheck, attempts))

    def _part(
        self, unit: Unit, lo: int, hi: int, block: int | None = None, recheck: str | None = None, attempts: int | None = None
    ) -> Unit:
        """Items ``lo:hi`` of ``unit`` as a new unit, packed inline (see ``_resend_part``)."""
        items = unit.items[lo:hi]
        tries = unit.attempts if attempts is None else attempts
        part = Unit(self._next_id, unit.start + lo, hi - lo, payload.dumps_data(items), items, tries)
        part.block = unit.block if block is None else block
        part.recheck = recheck
        self._next_id += 1
        return part

    def _fail_or_collect(self, unit: Unit, exc: BaseException, index: int | None) -> None:
        if unit.lease is not None:
            unit.lease.release()
            unit.lease = None
        if self.per_item:
            failed = [self._failed_type(unit.start + i, self._shown(it)[0], exc) for i, it in enumerate(unit.items)]
            self._complete(unit, failed, None, len(failed))
        else:
            idx = unit.start + (index or 0)
            if idx not in self._errors and unit.items:  # (last_failures() names its input, as a collect run's Failed)
                self._infos[idx] = debugging.failure_of(exc, index=idx, item=self._shown(unit.items[index or 0])[0])
            self._fail(idx, exc)

    def _at_most(self, unit: Unit, limit: int | None) -> Unit:
        """``unit`` if it has at most ``limit`` items; else its first ``limit`` items as a unit
        of their own, the rest queued to go out next (a unit sent again after its worker was
        lost, now going to a worker with less of its ``max_tasks_per_child`` left)."""
        if limit is None or unit.count <= max(1, limit):
            return unit
        limit = max(1, limit)
        if unit.lease is not None:  # the parts go out packed inline (see _resend_part)
            unit.lease.release()
            unit.lease = None
        self._requeued.appendleft(self._part(unit, limit, unit.count, recheck=unit.recheck))
        return self._part(unit, 0, limit, recheck=unit.recheck)

    def requeue(self, unit: Unit) -> None:
        """A unit that was queued behind a lost one goes out again."""
        self.outstanding.pop(unit.id, None)
        self._requeued.appendleft(unit)

    def abort(self) -> None:
        """Never called: a map's failure ends it by itself (``abort_at`` is always None)."""
        raise ValueError("a map is not aborted: its failure ends it (backends.base.Job.abort is a cell's)")

    def forget_work(self) -> None:
        """A cancelled background run, kept in ``%pool runs``' history: drop what
        it still holds (its input, the units it never ran, results nobody will
        read), keeping its counts. A stream left early kept its buffered chunks:
        25 such loops over a million items held 381 MB."""
        with self._read_lock:
            self._read.clear()
            self._read_count = 0
        self._seq = self._iter = None
        self._last_read = []
        self.outstanding, self._requeued, self._results, self._late = {}, deque(), {}, {}

    def forget_input(self) -> None:
        """A background map ended: drop its input (a copy taken at the call, of a
        numpy array maybe: ``api.owned``), which its handle would otherwise hold."""
        with self._read_lock:
            self._read.clear()
            self._read_count = 0
            self._reading = None
        self._seq = self._iter = None
        self._last_read = []

    def _build_payload(self) -> None:
        """The function's payload, from ``payload_cache`` (reused when nothing it captures changed)."""
        self._release_payload_segment()
        t0 = time.perf_counter()
        # (the run keeps the helpers it names, and memmaps go by reference here: function_payload's kept, shared)
        self.func_key, self.func_payload = payload_cache.function_payload(
            self.func, self.shared_memory, hold=True, kept=self.kept)
        self.payload_seconds += time.perf_counter() - t0
        self.payload_freed_seconds += payload_cache.last_freed()
        self.payload_served = payload_cache.last_served()
        self.payload_notes = payload_cache.last_notes()
        self._payload_segment = name = payload_cache.last_segment()
        if name is not None:  # (held: see function_payload; let go once, whichever comes first)
            self._let_go = weakref.finalize(self, shm.let_go, name)
            self._let_go.atexit = False  # (at exit shm.release_all unlinks it anyway)

    def _release_payload_segment(self) -> None:
        """Give back the hold on the payload's segment (unlinked if the cache no longer has it)."""
        let_go, self._let_go = self._let_go, None
        if let_go is not None:
            let_go()

    def payload_lost(self) -> bool:
        """Did a pool stop unlink the shared-memory copy of the captured arrays that
        the function's payload names, since the payload was built? A stop from
        another thread (``%pool restart``, ``stop_pool``) may land between ``pmap``
        building the payload and the backend taking the run: a worker of the new
        pool would find no segment by that name."""
        return self._payload_segment is not None and not shm.lent(self._payload_segment)

    def prepare_payload_again(self) -> None:
        """Build the function's payload again, for the pool as it is now (after
        :meth:`payload_lost`): the arrays are copied into a new segment."""
        self._build_payload()
        self.planner.key = self.func_key  # (what its chunks cost is remembered under the key the next call has)

    def release_shared(self) -> None:
        """The run is over (done, failed or interrupted): give back every segment.

        The backend calls this once no worker can still read this job's chunks.
        The helpers its payloads named are no longer kept: dropped in the notebook,
        they are released as before (their kinds are kept, weakly: ``helpers_named``).
        """
        self.helpers_named = helpers_used(self)
        self.kept = {}
        self._release_payload_segment()
        self._lines.end()  # (an interrupted or dead unit's partial line is shown)
        for unit in [*self.outstanding.values(), *self._requeued]:
            if unit.lease is not None:
                unit.lease.release()
                unit.lease = None

    def output(self, tag: Any, stream: str, text: str) -> None:
        if worker_logging.MARK in text:  # (a substring search: free for ordinary output)
            text = self._warnings(text)
        if display_relay.MARK in text:  # a task's display(): its bundle goes on as output of its own kind
            for displayed, piece in display_relay.split(text):
                if displayed:
                    self._out("display", piece)
                else:
                    self._lines.feed(tag, stream, piece)
            return
        self._lines.feed(tag, stream, text)

    def input_changed(self) -> str | None:
        """What became of a list input that changed length while the run read it
        (None if it did not). The run maps the items it had at the start; an
        ``imap`` loop that appends to its own input list (a worklist: serial
        ``map`` follows the list's iterator and maps them) is told so in one line."""
        seq = self._seq
        if type(seq) is not list or len(seq) == self._seq_len:
            return None
        n = len(seq) - self._seq_len
        if n > 0:
            return (f"the input list grew by {n} item{'s' if n != 1 else ''} while imap read it: "
                    f"{'they were' if n != 1 else 'it was'} not mapped (imap reads ahead of the loop and maps "
                    f"the {self._seq_len} items the list had at the start); for a worklist, feed imap from a "
                    "queue.Queue (docs/troubleshooting.md)")
        return (f"the input list shrank by {-n} item{'s' if n != -1 else ''} while imap read it: items it had "
                "not read yet were skipped (imap reads ahead of the loop)")

    @property
    def inputs(self) -> Sequence | None:
        """The items, when the input was a list or tuple (``%pdebug`` shows them); else None."""
        return self._seq

    def results_so_far(self, missing: Any, length: int | None = None) -> list | None:
        """The results a failed run did get, in input places, ``missing`` in the gaps
        (``%pdebug``); None for an input read lazily, unless the caller knows its
        ``length`` (several lists, zipped)."""
        if self._seq is not None:
            length = len(self._seq)
        if length is None:
            return None
        full = [missing] * length
        full[: len(self._in_order)] = self._in_order
        for start, chunk in (*self._results.items(), *self._late.items()):
            full[start : start + len(chunk)] = chunk
        return full

    def came_back_late(self, unit: Unit, data: bytes) -> None:
        """A chunk's results came back after the run failed: its items ran (with
        their side effects), so ``results_so_far`` has them and ``--rerun-failed``
        does not run them again. Nobody else reads them (serial map raised before
        them); a run that did not fail only frees their shared memory."""
        if self.failure is None or self.per_item:
            drop_partial(data)
            return
        try:
            self._late[unit.start] = payload.loads(data)
        except Exception:
            log.debug("mpmagic: could not load a chunk that came back after the run failed", exc_info=True)

    def results(self) -> list:
        __tracebackhide__ = True
        if self.failure is not None:
            raise self.failure
        out, self._in_order = self._in_order, []
        for k in sorted(self._results):  # nothing is left here when every chunk came back
            out.extend(self._results.pop(k))
        return out


#: Seconds a failed rank waits before a line says so while other ranks still run.
#: Once an item's worker died this many times (--retries re-sending it), the run says so in one line:
#: a big --retries on an item that always kills its worker is otherwise silent for hours.
SAY_RETRIES_AT = 10

_SAY_FAILED_AFTER = 0.5
#: Seconds the other ranks of a cell may still run after one failed (raised, lost its
#: worker, timed out) before they are stopped and their workers replaced, as an MPI job
#: aborts when a rank raises: a rank waiting on a failed one (``q.get()``) would wait for
#: ever. Ranks that end within it keep their values (``ParallelError.values``).
RANK_FAILURE_GRACE = 3.0
# What the line of a rank stopped that way says, once for the rank's own error and the cell's.
_ABORTED = "stopped, as an MPI job aborts: a rank waiting for a failed one would wait for ever"
_NEEDS_RESET = "the next --keep cell needs --reset"


def first_failed_rank(failures: dict[int, BaseException]) -> int:
    """The rank that failed first in time (``failures`` is in the order they came), the
    cause: ranks stopped because it failed, timeouts of ranks waiting on it, come after.
    Ranks stopped by an abort are never the cause."""
    for rank, exc in failures.items():
        if not isinstance(exc, RankStoppedError):
            return rank
    return min(failures)


def parallel_error_line(failures: dict[int, BaseException], size: int, retried: Sequence[int] = ()) -> str:
    """A cell's ``ParallelError`` line: how many ranks failed, the first one's error,
    which ranks were stopped because of it (``CellJob.abort``), and the ranks in
    ``retried``, which the backend ran again after their worker died (Dask's own retry,
    ``CellJob.ran_again_elsewhere``): their side effects ran twice, as the report of a
    cell that succeeded says."""
    n = len(failures)
    ranks = ", ".join(str(r) for r in sorted(failures))
    cause = first_failed_rank(failures)
    exc = failures[cause]
    text = f"{n} of {size} ranks failed (rank{'s' if n > 1 else ''} {ranks}); rank {cause}: {type(exc).__name__}: {exc}"
    stopped = sorted(r for r, e in failures.items() if isinstance(e, RankStoppedError))
    if len(stopped) == 1:
        text += f"; {failures[stopped[0]]}"
    elif stopped:  # (each one's own error says it too)
        errors = [e for r in stopped if isinstance(e := failures[r], RankStoppedError)]
        text += (f"; ranks {', '.join(map(str, stopped))} still ran {errors[0].grace:g} s after rank "
                 f"{errors[0].cause_rank} failed: {_ABORTED}")
        if any(e.kept_lost for e in errors):
            text += f"; their kept state (--keep) went with their workers: {_NEEDS_RESET}"
    if retried:
        again = sorted(set(retried))
        text += f"; {retried_words(len(retried))} (rank{'s' if len(again) != 1 else ''} {', '.join(map(str, again))})"
    return text


_REDRAWN = re.compile(r"\r(?=[^\r\n])")  # a carriage return that text overwrites the line after


class CellJob:
    """A ``%%parallel`` cell: one unit per rank, all running at once."""

    kind = "cell"
    # (backends.base.Job's members of a map: a cell has no function of its own and no chunks)
    func = None
    planner = None
    collect = False  # (a failed rank always fails the cell: ParallelError)
    pinned = False  # (ranks.KeptCellJob's are)

    def __init__(
        self,
        spec_bytes: bytes,
        size: int,
        timeout: float | None = None,
        out: Callable[[str, str], None] | None = None,
        label: bool = True,
        progress: Callable[[int], None] | None = None,
        insights: Any = None,
        kept: dict[int, Any] | None = None,
        lease: shm.Lease | None = None,
        repack: Callable[[], tuple[bytes, shm.Lease | None]] | None = None,
    ) -> None:
        self.call_id = next(_call_ids)
        self.libs = context.libraries()  # (as MapJob's)
        self.size = size
        self.kept = kept or {}  # the helpers the cell's names were pickled with (see MapJob.kept)
        self.helpers_named: tuple[tuple[str, Any], ...] = ()  # (see MapJob.helpers_named)
        # The pooled segments holding the cell's large arrays (api._pack_spec): lent until the run ends.
        self.lease = lease
        # Packs the cell's payload again, into a new lease (see prepare_payload_again). Held
        # weakly: the call that made it holds the cell's names (a Queue the notebook then
        # deletes), and a job kept after its run (the last report, %pdebug) kept them alive,
        # so a dropped Queue was never dropped for the workers (they spilled its backlog).
        self._repack: Callable[[], Callable[[], tuple[bytes, shm.Lease | None]] | None] | None = (
            None if repack is None
            else weakref.WeakMethod(repack) if isinstance(repack, types.MethodType)
            else (lambda: repack)
        )
        self.timeout = run_timeout(timeout)  # (a plain float or None, as MapJob's)
        self.func_key: bytes | None = None  # (a cell's code travels in each unit)
        self.func_payload: bytes | None = None
        self._pending = deque(Unit(r, r, 1, spec_bytes) for r in range(size))
        self.outstanding: dict[int, Unit] = {}
        self.values: dict[int, Any] = {}
        self.gathered: dict[int, dict] = {}
        self.failures: dict[int, BaseException] = {}
        self.failure_infos: dict[int, debugging.FailureInfo] = {}  # what the workers saw (for %pdebug)
        self.rank_seconds: dict[int, float] = {}
        self.ranks_without_setup: set[int] = set()  # ran on a worker without the %%pool setup (not checkpointed)
        self.ranks_other_code: dict[int, tuple[str, ...]] = {}  # rank -> user modules its worker's copy of differs
        self.task_seconds = 0.0
        self.items_done = 0
        self.items_total = size
        self.n_chunks = size
        self._out = out or _print_stream
        self._notes_said: set[str] = set()  # see MapJob
        self.log_context = worker_logging.notebook_context()  # see MapJob
        self._warnings = worker_logging.WarningRelay()
        self._label = label
        self._lines = OpenLines(self._out, self.outstanding.__contains__, label=True)  # (no cycle: see MapJob)
        self._over = False  # the run ended (its backend is done with it, or its results were taken)
        self._progress = progress  # called with 1 as each rank finishes, however it ends
        self.insights = insights
        self.bytes_sent = len(spec_bytes) * size
        self.bytes_back = 0
        self.bytes_shared = lease.copied if lease is not None else 0  # the cell's arrays, copied once for all ranks
        self.cpu_seconds: float | None = None
        self.runq_seconds: float | None = None  # (see MapJob)
        self.helper_wait: dict[str, float] = {}  # (see MapJob)
        self.slowest_task = 0.0
        self.slowest_where: str | None = None
        self.one_time = OneTimeCosts()  # imports in the workers (warmup.py)
        self.spans: list[tuple[float, float]] = []  # (start, end) of ranks: how many ran at once (report)
        self.retried = 0  # ranks Dask ran again after their worker died (ran_again_elsewhere)
        self.retried_ranks: list[int] = []  # (which: the ParallelError line names them)
        self.timed_out = 0
        self.ran_again: list[int] = []  # (a rank is one unit of one item)
        self.ran_again_cause = ""
        self.shared_workers = False  # other runs held workers meanwhile (see MapJob)
        self.waited_for_workers = 0.0
        self.setup_waits: dict[Any, float] = {}  # (see MapJob)
        self.ran_on: int | None = None  # (a map's; see backends/base.py)
        self.missing_module_advice: str | None = None  # (a map's; see backends/base.py)
        # A rank failed while others ran: when the backend stops those still running
        # (``abort``), as an MPI job aborts, and whether it is doing so now.
        self.abort_at: float | None = None
        self.aborting = False
        self._abort_after = 0.0  # the grace those ranks had (said in their error)

    def payload_lost(self) -> bool:
        """Did a pool stop (another thread's) unlink a segment of the lease holding the
        cell's large arrays, since they were packed? (See ``MapJob.payload_lost``.)"""
        return self.lease is not None and any(not shm.lent(seg.name) for seg in self.lease.segments)

    def prepare_payload_again(self) -> None:
        """Pack the cell's payload again, for the pool as it is now (after :meth:`payload_lost`)."""
        repack = self._repack() if self._repack is not None else None
        if repack is None:
            return
        if self.lease is not None:
            self.lease.release()  # (what a stop left of it goes back to the pool)
        spec_bytes, self.lease = repack()
        self._pending = deque(Unit(r, r, 1, spec_bytes) for r in range(self.size))
        self.bytes_sent = len(spec_bytes) * self.size
        self.bytes_shared = self.lease.copied if self.lease is not None else 0

    def _rank_finished(self) -> None:
        if self._progress:
            self._progress(1)

    def redirect(self, out: Callable[[str, str], None], progress: Callable[[int], None] | None,
                 chunk: Callable[[int, list], None] | None, ask_input: Callable[[], None] | None) -> tuple:
        """Send output and progress elsewhere (a run's event queue); returns the old four
        (a cell has no chunks and no lazy input: ``chunk`` and ``ask_input`` are not used)."""
        old = (self._out, self._progress, None, None)
        self._out, self._progress = out, progress
        self._lines.write = out
        return old

    @property
    def items_failed(self) -> int:
        return len(self.failures)

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    @property
    def finished(self) -> bool:
        return not self._pending and not self.outstanding

    def release_shared(self) -> None:
        """The run is over: the pooled segments holding the cell's large arrays go
        back to the pool (no rank reads them any more); no late line about a failed
        rank (see _failed_while_others_run); the helpers its names were pickled
        with are no longer kept. A rank's line left open (its worker was stopped
        or died) ends here, so what it showed stays."""
        self.flush_output()
        self.helpers_named = helpers_used(self)
        self.kept = {}
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    @property
    def has_work(self) -> bool:
        return bool(self._pending)

    @property
    def ranks_pending(self) -> int:
        """Ranks not handed out yet: each needs an idle worker of its own now."""
        return len(self._pending)

    @property
    def failure(self) -> BaseException | None:
        """The error of the rank that failed first, or None (``results`` raises them all together)."""
        return self.failures[first_failed_rank(self.failures)] if self.failures else None

    def next_unit(self, limit: int | None = None, pair: bool = False) -> Unit | None:
        """The next rank (one item: any ``limit`` fits it; ``pair`` is a map's)."""
        if not self._pending:
            return None
        unit = self._pending.popleft()
        self.outstanding[unit.id] = unit
        return unit

    def next_unit_for(self, wid: int) -> Unit | None:
        """The next rank, for worker ``wid``: any worker will do (``ranks.KeptCellJob`` pins them)."""
        return self.next_unit()

    def drop_orphans(self, live: set[int]) -> None:
        """Nothing to drop: these ranks are not pinned to a worker (``ranks.KeptCellJob``'s are)."""

    def split(self, unit: Unit) -> list[int]:
        """A rank is one unit of one item: it never splits (``MapJob.split`` is a map's)."""
        raise ValueError(f"rank {unit.id} of a %%parallel cell cannot be split into items")

    def prefill(self) -> None:
        """Nothing to read: a cell has no lazy input (``MapJob.prefill``)."""

    def read_input(self, n: int | None = None) -> None:
        """Nothing to read: a cell has no lazy input (``MapJob.read_input``)."""

    def input_wait(self) -> float | None:
        """None: a cell has no lazy input, so no read is ever in progress."""
        return None

    def describe_unit(self, unit: Unit) -> str:
        """``unit`` in a backend's words: "rank 2"."""
        return f"rank {unit.id}"

    def message(self, unit: Unit) -> Cell:
        return Cell(self.call_id, unit.id, self.size, unit.data, (None, self.log_context), self._label)

    def ran_without_setup(self, unit: Unit, note: str) -> None:
        """The worker answering rank ``unit`` runs without the pool's setup (``note``
        says so in one line, added to a NameError of the rank; its value is not checkpointed)."""
        unit.without_setup = note
        self.ranks_without_setup.add(unit.id)

    def ran_other_code(self, unit: Unit, modules: list[str]) -> None:
        """The Dask worker answering rank ``unit`` runs ``modules`` from a file that is not the
        notebook's (a line in the cell says so): the cell's values are not checkpointed."""
        self.ranks_other_code[unit.id] = tuple(modules)

    def came_back_late(self, unit: Unit, data: bytes) -> None:
        """A rank's value after the cell's run ended: nobody reads it; its shared memory is freed."""
        drop_partial(data)

    def done(self, unit: Unit, data: bytes, seconds: float, meta: dict | None = None) -> None:
        self.outstanding.pop(unit.id, None)
        self.bytes_back += len(data)
        take_unit_meta(self, unit, seconds, meta)
        try:
            self.values[unit.id], self.gathered[unit.id] = payload.loads(data)
        except Exception as exc:
            self.failures[unit.id] = unloadable_results(f"rank {unit.id}'s last value or gathered variables (gather=, --gather)", exc)
            self._rank_finished()
            self._failed_while_others_run(unit.id)
            return
        self.rank_seconds[unit.id] = seconds
        self.task_seconds += seconds
        self.items_done += 1
        if seconds > self.slowest_task:
            self.slowest_task, self.slowest_where = seconds, f"rank {unit.id}"
        self._rank_finished()

    def _failed_while_others_run(self, rank: int) -> None:
        """``rank`` failed while other ranks still run: they may wait on it (a
        queue it should have filled) for ever, so those still running
        ``RANK_FAILURE_GRACE`` seconds later are stopped (``abort_at``: the
        backend calls ``abort``), as an MPI job aborts when a rank raises. A line
        says so at once: without it the run showed nothing until it ended."""
        if not (self.outstanding or self._pending) or self.aborting:
            return  # the run ends now: its error says it all
        if self.abort_at is None:  # (the first failure sets the clock; later ones follow from it)
            self._abort_after = RANK_FAILURE_GRACE
            self.abort_at = time.monotonic() + RANK_FAILURE_GRACE
        exc = self.failures[rank]
        first = _text_of(exc).split("\n", 1)[0]
        text = (f"mpmagic: rank {rank} failed ({type(exc).__name__}{': ' + first if first else ''}) while other "
                f"ranks still run; those still running {self._abort_after:g} s after the first failure are stopped, "
                "as an MPI job aborts\n")
        # Said only if the others still run a moment later: ranks that all fail at
        # once (a name missing everywhere) get the cell's error alone, not this too.
        timer = threading.Timer(_SAY_FAILED_AFTER, self._say_still_running, (text,))
        timer.daemon = True
        timer.start()

    def _say_still_running(self, text: str) -> None:
        # (read from the timer's thread: a late line at worst; never after the run ended)
        if not self._over and not self.aborting and (self.outstanding or self._pending):
            self._out("stderr", text)

    def abort(self) -> None:
        """Stop the run, as an MPI job aborts: a rank failed ``abort_at`` - grace
        seconds ago and others still run (waiting on it, maybe for ever). The
        backend calls this, then stops the workers busy with the run's ranks
        (each rank it gives back through ``requeue`` is then stopped, not sent
        again; ranks that finish meanwhile keep their values) and ends the run.
        Ranks that never got a worker do not run."""
        self.aborting, self.abort_at = True, None
        for unit in list(self._pending):
            self._stopped(unit.id, started=False)
        self._pending.clear()

    def _stopped(self, rank: int, started: bool = True) -> None:
        """Rank ``rank`` stopped by ``abort``: its error says why (and, kept, what it lost)."""
        self.outstanding.pop(rank, None)
        cause = first_failed_rank(self.failures)
        exc = self.failures[cause]
        after = f"{self._abort_after:g} s after rank {cause} failed ({type(exc).__name__})"
        if started:
            text = f"rank {rank} still ran {after}: {_ABORTED}"
            if self.pinned:
                text += f"; its kept state (--keep, keep=True) went with its worker: {_NEEDS_RESET}"
        else:
            text = f"rank {rank} had not started {after} (no worker was free for it): not run, as an MPI job aborts"
        err = self.failures[rank] = RankStoppedError(text)
        # (for parallel_error_line's one clause about all the stopped ranks)
        err.cause_rank, err.grace, err.kept_lost = cause, self._abort_after, self.pinned and started
        self._rank_finished()

    def error(self, unit: Unit, index: int, info: Any, partial: bytes, seconds: float) -> None:
        self.outstanding.pop(unit.id, None)
        self.failures[unit.id] = rebuild_exception(info, f"mpmagic: raised by rank {unit.id} of {self.size}",
                                                   called=index == 0)  # (see `outside` below)
        if index < 0 and (recursed := getattr_recursion_in(self.failures[unit.id])) is not None:
            add_note(self.failures[unit.id], f"mpmagic: {CELL_LOAD_FAILED}: {recursed}")  # (a map's: _load_failure_note)
        if self.lease is not None and _read_only_write(self.failures[unit.id]):
            add_note(self.failures[unit.id], _read_only_note(self.failures[unit.id]))
        _note_daemonic(self.failures[unit.id])
        if index == 0:  # (the rank's own code raised it)
            note_missing_module(self.failures[unit.id], info, self.missing_module_advice)
        note_without_setup(self.failures[unit.id], unit)
        # (index -1: the cell's names could not be loaded in the worker, the rank's code never ran;
        # 1: it ran to its end, and the --gather check after it failed: neither is the code's own error)
        outside = CELL_LOAD_FAILED if index < 0 else GATHER_UNSET if index > 0 else ""
        self.failure_infos[unit.id] = debugging.failure_of(self.failures[unit.id], info, rank=unit.id, size=self.size,
                                                           outside=outside)
        self.items_done += 1
        self._rank_finished()
        self._failed_while_others_run(unit.id)

    def collected(self, unit: Unit, index: int, info: Any) -> None:
        """(Only a map's chunk under --errors collect reports an item's failure early.)"""

    def ran_again_elsewhere(self, unit: Unit, index: int) -> None:
        """Dask ran rank ``unit.id`` again after its worker died running it (the worker came
        back at the address the rank is pinned to): the rank ran twice, side effects too. The
        report says so as for a map's item (``retried``), and so does the cell's error if
        another rank fails (``parallel_error_line``)."""
        self.retried += 1
        self.retried_ranks.append(unit.id)

    def unpicklable(self, unit: Unit, index: int | None, info: Any) -> None:
        self.outstanding.pop(unit.id, None)
        self.failures[unit.id] = SerializationError(
            f"rank {unit.id}: its last value or a gathered variable (gather=, --gather) cannot be sent back: "
            f"{info.exc_text.strip()}. End the cell with plain data instead (or `None`)."
        )
        self._rank_finished()
        self._failed_while_others_run(unit.id)

    def lost(
        self, unit: Unit, reason: str, timed_out: bool = False, index: int | None = None, worker_kept: bool = False
    ) -> None:
        if self.insights is not None:  # (the timeline shows it as stopped, not the worker as idle)
            self.insights.lost(unit, timed_out, self.timeout, None, replaced=not worker_kept)
        self.outstanding.pop(unit.id, None)
        if timed_out:
            fate = reason if worker_kept else "its worker was stopped and replaced"
            self.failures[unit.id] = TaskTimeoutError(f"rank {unit.id} ran past the timeout of {self.timeout:g} s; {fate}")
        else:
            fate = "" if worker_kept else "; the pool replaced it"
            self.failures[unit.id] = WorkerLostError(f"the worker running rank {unit.id} {reason}{fate}")
        self._rank_finished()
        self._failed_while_others_run(unit.id)

    def not_run(self, unit: Unit, reason: str) -> None:
        """Rank ``unit`` could not run at all (no worker for it, for ``reason``)."""
        self.outstanding.pop(unit.id, None)
        self.failures[unit.id] = WorkerLostError(f"rank {unit.id} did not run: {reason}")
        self._rank_finished()
        self._failed_while_others_run(unit.id)

    def forget_work(self) -> None:
        """A cancelled background cell, kept in ``%pool runs``' history: the ranks it never sent go."""
        self._pending.clear()
        self.outstanding.clear()  # (in place: its OpenLines asks this dict)

    def requeue(self, unit: Unit) -> None:  # ranks never queue behind one another
        if self.aborting:  # its worker was stopped by ``abort``: the rank is not sent again
            self._stopped(unit.id)
            return
        self.outstanding.pop(unit.id, None)
        self._pending.appendleft(unit)

    def output(self, rank: Any, stream: str, text: str) -> None:
        if worker_logging.MARK in text:  # shown as Python would, then labelled like the rest
            text = self._warnings(text)
        if display_relay.MARK in text:  # a rank's display(): its bundle goes on as output of its own kind
            for displayed, piece in display_relay.split(text):
                if displayed:
                    if self._label and not display_relay.is_update(piece):
                        # (a line of its own says whose it is, as the rank's printed lines say it;
                        # an update replaces what shows in place: no line for it)
                        self._labelled(rank, "stdout", "\n")
                    self._out("display", piece)
                else:
                    self._labelled(rank, stream, piece)
            return
        self._labelled(rank, stream, text)

    def _labelled(self, rank: Any, stream: str, text: str) -> None:
        """``text`` of a rank, each line labelled ``[rank N]`` (see :class:`OpenLines`)."""
        if not self._label:
            if text:
                self._out(stream, text)
            return
        self._lines.feed(rank, stream, text)

    def flush_output(self) -> None:
        self._over = True  # (its output is all out: see release_shared)
        self._lines.end()

    def results(self) -> list:
        self.flush_output()
        if self.failures:
            first = self.failures[first_failed_rank(self.failures)]
            raise ParallelError(parallel_error_line(self.failures, self.size, self.retried_ranks),
                                dict(self.failures)) from first
        return [self.values[r] for r in range(self.size)]



class OpenLines:
    """Text of several units (a map's chunks, a cell's ranks) on the two shared
    streams of a cell, each line from one unit.

    A unit's partial line (a flushed ``end=""`` print, a tqdm bar) is shown at
    once and leaves the stream's line open, owned by that unit: its next text
    continues the line (with no new label). While the owner still runs, another
    unit's partial text waits (bars of two items do not overwrite each other),
    and its whole lines end the open line first (a newline), rather than joining it.
    A map's unit that ended leaves its line to the text that waited for it, in
    the order it came, then to whoever writes next, joined as serial output
    would be: ``print(x, end="")`` of eight items gives one line, as serially
    (the text that waited went out only at a newline, or at the run's end after
    a newline no item printed: ``<0><2>...<7>\\n<1>``). ``label``: a cell's
    ``[rank N] `` for each line (and after each ``\\r`` that redraws it); an
    open line is then always ended first.
    """

    def __init__(self, write: Callable[[str, str], None], running: Callable[[Any], bool],
                 label: bool = False) -> None:
        self.write = write
        self.running = running
        self.label = label
        self.owner: dict[str, Any] = {}  # stream -> the unit whose line is open there
        self.held: dict[tuple[Any, str], str] = {}  # (unit, stream) -> its text waiting for the line

    def _form(self, who: Any, text: str, continuing: bool) -> str:
        if not self.label:
            return text
        lines = text.split("\n")
        last = len(lines) - 1
        return "".join(
            ("" if i == 0 and continuing else f"[rank {who}] ")
            + (_REDRAWN.sub(lambda _: f"\r[rank {who}] ", line) if "\r" in line else line)
            + ("" if i == last else "\n")
            for i, line in enumerate(lines) if i < last or line
        )

    def feed(self, who: Any, stream: str, text: str) -> None:
        """``text`` that unit ``who`` wrote to ``stream``."""
        key = (who, stream)
        if self.held and not self.label:  # (text that waited for a line whose unit ended goes first)
            self.release(stream)
        text = self.held.pop(key, "") + text
        if not text:
            return
        owner = self.owner.get(stream, who)
        if owner != who:
            busy = self.running(owner)
            if "\n" not in text and busy:
                self.held[key] = text  # (its line waits for the owner's)
                return
            if busy or self.label:
                self.write(stream, "\n")  # the open line ends: this unit's lines are its own
            del self.owner[stream]
        self.write(stream, self._form(who, text, self.owner.get(stream) == who))
        if text.endswith("\n"):
            self.owner.pop(stream, None)
            for k in [k for k in self.held if k[1] == stream]:  # the line is free: text waiting for it goes
                self.feed(k[0], stream, "")
        else:
            self.owner[stream] = who

    def release(self, stream: str) -> None:
        """A map's text that waited for ``stream``'s line, in the order it came, once
        the unit that has the line ended (or none has it), joined to the line as serial
        output would be, until a unit still running has the line again."""
        while self.held:
            owner = self.owner.get(stream, _NO_OWNER)
            if owner is not _NO_OWNER and self.running(owner):
                return
            key = next((k for k in self.held if k[1] == stream), None)
            if key is None:
                return
            text = self.held.pop(key)
            self.write(stream, text)
            if text.endswith("\n"):
                self.owner.pop(stream, None)
            else:
                self.owner[stream] = key[0]

    def settle(self) -> None:
        """A map's unit ended: text that waited for its line goes now, not at the next text."""
        if self.held and not self.label:
            for stream in {k[1] for k in self.held}:
                self.release(stream)

    def end(self) -> None:
        """The run is over: open lines end (labelled ones), text that waited goes."""
        if self.label:
            for stream in sorted(self.owner):
                self.write(stream, "\n")
            for (who, stream), text in sorted(self.held.items()):
                self.write(stream, self._form(who, text, False) + "\n")
        else:
            for (who, stream), text in self.held.items():
                if stream in self.owner and self.running(self.owner[stream]):  # (cut short: an interrupt)
                    self.write(stream, "\n")
                self.write(stream, text)
                self.owner[stream] = who
        self.owner.clear()
        self.held.clear()


_NO_OWNER = object()  # (OpenLines: no unit has the stream's line)


#: Reading a chunk of a lazy input stops after this many seconds with what it has:
#: items that trickle in (a queue, a sensor, a slow query) go out as they come.
_READ_CUT = 0.02


def read_into(batch: list, items: Iterator, want: int) -> bool:
    """Read up to ``want`` items into ``batch``; True when ``items`` ran out.

    In doubling steps (1, 2, 4, ...: ``list.extend`` over ``islice``, in C),
    stopping early once the reading took ``_READ_CUT`` seconds. Reading a
    whole chunk first held every result back until the chunk filled: an
    input yielding an item every 0.25 s gave its first result after 10 s
    (chunks of 40), and never when it stopped before the chunk was full,
    where serial map had given each result as its item came. ``extend``
    keeps the items read before the input raises (they run, as in serial map).
    """
    step, t0 = 1, time.monotonic()
    while len(batch) < want:
        n = min(step, want - len(batch))
        before = len(batch)
        batch.extend(itertools.islice(items, n))
        if len(batch) - before < n:
            return True
        if time.monotonic() - t0 > _READ_CUT:
            return False
        step *= 2
    return False


def input_raised_it(exc: BaseException) -> bool:
    """Is ``exc``, raised while an input was read, the input's own error, to be raised
    after the items it gave (as serial map raises it)? All but a KeyboardInterrupt in
    the main thread: that is the user's Ctrl-C, landing while a blocking run read its
    input. A background run or a stream reads in its own thread, where no Ctrl-C lands,
    so there a KeyboardInterrupt, like a SystemExit or GeneratorExit anywhere, is the
    input's raise: it escaped the reading and ended the run at once, and the loop lost
    the results of the items before it."""
    return not (isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread())


def advanced_elsewhere(exc: BaseException) -> bool:
    """Is ``exc`` Python's refusal to run a generator input that another thread
    is running at this moment (``ValueError: generator already executing``)?

    Raised by the ``next()`` mpmagic called (no frame of the generator's ran:
    the last frame is ours), so it is not a ValueError the generator's own code
    raised, nor one a generator met while advancing another (its frame is then
    the last): those are the user's errors, shown as serial map shows them.
    """
    return type(exc) is ValueError and exc.args == ("generator already executing",) and raised_by_our_call(exc)


def shared_generator_error(iterables: tuple) -> UsageError:
    """The error for an input :func:`advanced_elsewhere` found in use: which of the
    map's ``iterables`` it is (``argument 2 of map``, counting the function as 1),
    who else may be advancing it, and what to do instead.

    Serial code that shares a generator (``zip(map(f, g), map(f, g))``, a
    ``next(g)`` in the loop) takes its items in turns; mpmagic reads an input
    ahead of the calls, in the run's own thread, so the two meet inside the
    generator. Python's own error named no input and showed only our frames.
    Taking turns under a lock would not give map's meaning back either (which
    items each run got would depend on timing), so this says how to share.
    """
    gens = [i for i, it in enumerate(iterables) if isinstance(it, types.GeneratorType)]
    running = [i for i in gens if iterables[i].gi_running]  # (it may have finished its step meanwhile)
    which = running if len(running) == 1 else gens if len(gens) == 1 else [0] if len(iterables) == 1 else []
    if not which:
        what = "a generator among the arguments of map"
    else:
        what = f"argument {which[0] + 2} of map"
        name = getattr(iterables[which[0]], "__qualname__", "") if which[0] in gens else ""
        if name.endswith("<genexpr>"):
            what += " (a generator expression)"
        elif name:
            what += f" (the generator `{name}`)"
    return UsageError(
        f"{what} was being advanced elsewhere while this run read it: by another run given the same generator "
        "(zip(imap(f, g), imap(f, g)), two submit(f, g)), by a next(g) in the loop over the results, or by "
        "another thread. A generator runs in one thread at a time, and mpmagic reads its input ahead of the "
        "calls, in the run's own thread, so the two cannot take turns as they do with map(); give each run its "
        "own input: a list made once (xs = list(g)) or a new generator for each run (itertools.tee's copies "
        "are not safe across threads either)")


# Objects a lazy input may yield twice: they cannot change between the yields.
_SHAREABLE = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset, range, type, enum.Enum,
              types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType)


def _changeable(obj: Any) -> bool:
    """Can ``obj`` be changed in place (a list, dict, array, an instance with a ``__dict__``)?"""
    if isinstance(obj, _SHAREABLE):
        return False
    return type(obj).__hash__ is None or hasattr(obj, "__dict__")


def reused_object(items: Any, n_read: int, before: list, batch: list) -> tuple[int, UsageError] | None:
    """A lazy input that yielded one changeable object twice (a reused buffer: ``buf["v"]
    = i; yield buf``), among the ends of what was just read (``batch``, the items
    from position ``n_read`` on) and the last items of the read before
    (``before``): ``(how many items of batch to keep, the error to raise)``.

    Items are read ahead of the calls and pickled when their chunk is sent, by
    then the generator has changed such an object again: serial map saw 0..9,
    pmap 0, 1, 9, 9... (silently). A few items at each end of a read cost O(1)
    per read (a set of every item's id cost 25% of a run over tiny items), and
    find the usual reuse (every item, or two buffers in turn).
    """
    n, size = len(before), len(batch)
    # (Positions counted from the start of ``before``; the batch itself is not copied.)
    ends = sorted({*range(n + min(size, 3)), *range(n + max(0, size - 3), n + size)})
    at = [before[i] if i < n else batch[i - n] for i in ends]
    for a, obj in enumerate(at):
        for b in range(a + 1, len(at)):
            if at[b] is obj and _changeable(obj):
                i = next(k for k, x in enumerate(itertools.chain(before, batch)) if x is obj)  # its first yield
                first, second = n_read - n + i, n_read - n + ends[b]
                name = getattr(items, "__qualname__", None) or type(items).__name__
                kind = type(obj).__name__
                return max(0, i - n), UsageError(
                    f"the input `{name}` yielded the same {kind} object as items {first} and {second}: "
                    f"mpmagic reads a generator ahead of the calls and sends each item later, so that {kind} "
                    f"would be computed in its last state for all of them (map() sees each state). Yield a copy "
                    f"each time (`yield copy.copy(buf)`, `buf.copy()`), or pass a list of copies; one that "
                    f"never changes goes as a list (`[obj] * n`) or bound with functools.partial")
    return None


def _iterator_at(obj: Any, depth: int = 2) -> tuple[Any, str] | None:
    """``(the iterator, where)`` when ``obj`` is an iterator (its type defines
    ``__next__``) or a tuple, list or dict holding one, ``depth`` containers deep at
    most (map's zip of several inputs holds groupby's ``(key, group)``; a generator
    may yield ``{"key": k, "rows": g}``); ``where``: "" or " (at [1]['rows'] of the
    item)". A generator or an open file is left to the pickling, whose error
    already names the item and says what to do."""
    kind = type(obj)
    if kind is tuple or kind is list or kind is dict:
        if depth:
            for key, x in (obj.items() if kind is dict else enumerate(obj)):
                if (found := _iterator_at(x, depth - 1)) is not None:
                    inner = found[1].removeprefix(" (at ").removesuffix(" of the item)")
                    return found[0], f" (at [{key!r}]{inner} of the item)"
        return None
    if getattr(kind, "__next__", None) is not None and not isinstance(obj, (types.GeneratorType, io.IOBase)):
        return obj, ""
    return None


def _shared_source(it: Any, limit: int) -> Any:
    """An iterator ``it`` draws on (directly, through the tuple of a ``map``/``zip``/
    ``chain``, or through another iterator it draws on, a few levels deep) that more
    references hold than ``it`` does (``limit``: the references this function sees on
    one nothing else holds), that is something besides ``it`` too; or None. One
    ``it`` holds twice (``zip(*[iter(s)] * 2)``, the pairing idiom) is its own."""
    seen: dict[int, list] = {}  # id -> [the iterator, how many times it is held in it]
    stack = [(it, 0)]
    obj = source = None
    while stack:
        obj, depth = stack.pop()
        for source in gc.get_referents(obj):
            if type(source) is tuple:
                if depth < 4:
                    stack.append((source, depth + 1))
            elif getattr(type(source), "__next__", None) is not None:
                if (entry := seen.get(id(source))) is not None:
                    entry[1] += 1
                    continue
                seen[id(source)] = [source, 1]
                if depth < 4:
                    stack.append((source, depth + 1))
    obj = source = entry = None
    for held, times in seen.values():
        if sys.getrefcount(held) - times > limit:
            return held
    return None


@functools.cache
def _private_refs() -> int:
    """The references :func:`_shared_source` sees on an iterator only its holder
    holds (its own among them: how many depends on the Python's bytecode),
    measured once on ``islice(iter(()), 0)``."""
    limit = 0
    while _shared_source(itertools.islice(iter(()), 0), limit) is not None:
        limit += 1
    return limit


def live_iterator(n_read: int, batch: list, ends_only: bool = True) -> tuple[int, UsageError] | None:
    """A lazy input that yielded a live iterator as an item (or in an item's tuples:
    map's zip of several inputs, ``--star``'s arguments), among the ends of what was
    just read (``batch``, the items from position ``n_read`` on): ``(how many items
    of batch to keep, the error to raise)``, as :func:`reused_object` gives.

    Items are read a chunk ahead of the calls and pickled when their chunk is sent,
    while map() calls the function on each before it reads the next, and a worker
    consumes a copy, never the notebook's iterator. An iterator drawing on something
    shared is sent in another state than map() would see it: ``itertools.groupby``'s
    groups gave ``('c', 0)`` where map gives ``('c', 3)``, silently; ``islice(it, 3)``
    items over one shared iterator each summed the same first three. Such items
    are refused, with the list to pass instead: a groupby group always, any other
    iterator drawing on an iterator something else holds too. An iterator over
    data of its own (``map(int, line.split())``) goes as before: nothing else sees
    it consumed. A list input is read as map reads it: not checked. The ends of a
    read cost O(1) per read, as in :func:`reused_object`; with ``ends_only`` False
    (``compare``'s copy of the whole input) every item is looked at.
    """
    size = len(batch)
    for i in sorted({*range(min(size, 3)), *range(max(0, size - 3), size)}) if ends_only else range(size):
        if (found := _iterator_at(batch[i])) is None:
            continue
        it, where = found
        kind = type(it)
        if kind.__module__ == "itertools" and kind.__name__ == "_grouper":
            return i, UsageError(
                f"item {n_read + i}{where} is a live iterator (itertools.groupby's group): mpmagic reads the input "
                "ahead of the calls and sends each item later, and reading the next group empties this one "
                "(map() calls the function before it reads on); pass each group as a list: "
                "((k, list(g)) for k, g in groupby(...))")
        source = _shared_source(it, _private_refs())
        if source is not None:
            return i, UsageError(
                f"item {n_read + i}{where} is an iterator ({kind.__qualname__} object) drawing on a "
                f"{type(source).__qualname__} something else holds too (the input's generator, another item): a worker "
                "consumes a copy of it, later, never that one (map() consumes it before it reads on), so the items "
                "would see it in another state; yield what it gives as a list instead (list(it))")
    return None


def read_ahead_refusal(items: Any, n_read: int, before: list, batch: list) -> tuple[int, UsageError] | None:
    """The first item among those just read that reading ahead would send changed
    (:func:`live_iterator`, :func:`reused_object`): ``(how many items of batch to
    keep, the error to raise)``, or None when there is none."""
    found = [r for r in (live_iterator(n_read, batch), reused_object(items, n_read, before, batch)) if r is not None]
    return min(found, key=lambda r: r[0]) if found else None


def drop_partial(data: bytes) -> None:
    """Results a worker packed before an error: load and drop them, so shared-memory
    segments it gave for them are unlinked now rather than at pool stop."""
    if not data:
        return
    try:
        payload.loads(data)
    except Exception:
        log.debug("mpmagic: could not load partial results to free their segments", exc_info=True)


#: Why a failure is no item's (or rank's) own (debugging.FailureInfo.outside).
LOAD_FAILED = "the function (or its items) could not be loaded in a worker"
CELL_LOAD_FAILED = "the cell's names could not be loaded in the worker"
GATHER_UNSET = ("the rank's code ran to its end without setting that variable, and mpmagic's check of the "
                "gather= (--gather) names raised it")


def _load_failure_note(info: Any, advice: str | None = None) -> str:
    """Why a worker could not load the function or its items, and what to do
    (``advice``: the backend's, when a restart cannot help: see ``Job.missing_module_advice``;
    the worker is named then, as its environment is not the notebook's)."""
    note = f"mpmagic: {LOAD_FAILED}"
    recursed = getattr_recursion(info.type_name, info.frames[-1].name if info.frames else None)
    if recursed is not None:  # (a wrapper's __getattr__: serial code never pickles the object)
        note += f": {recursed}"
    elif info.type_name in ("ModuleNotFoundError", "ImportError"):
        worker = _worker_address(info) if advice else None
        there = f"there (Dask worker {worker})" if worker else "there"
        note += f": a module the notebook imports cannot be imported {there}. " + (advice or (
            "If you installed it or changed sys.path after the pool started, run mpmagic.restart_pool() "
            "(%pool restart); otherwise install it in the environment the workers run in"))
    return note


def _worker_address(info: Any) -> str | None:
    """The Dask worker's address a failure's ``info`` says it ran on (a local worker has a number)."""
    worker = (getattr(info, "context", None) or {}).get("worker")
    return worker if isinstance(worker, str) else None


def note_missing_module(exc: BaseException, info: Any, advice: str | None) -> None:
    """A task's own ``import`` failed on a worker whose environment is not the notebook's
    (``advice`` set: a Dask cluster mpmagic connected to) for a module the notebook
    imports: serial code would not have raised, so a note names the module, that worker
    and what to do (Python's "No module named ..." alone read as if the notebook lacked it).
    A module the notebook cannot import either fails as serial code fails: no note."""
    name = getattr(exc, "name", None)
    worker = _worker_address(info)
    if not advice or not isinstance(exc, ModuleNotFoundError) or not isinstance(name, str) or worker is None:
        return
    if not _notebook_imports(name):
        return
    add_note(exc, f"mpmagic: the notebook imports {name}, but Dask worker {worker} cannot. {advice}")


def _notebook_imports(name: str) -> bool:
    """Can the notebook import module ``name``? Found as import finds it, importing nothing
    (a submodule is looked for only under a package the notebook has loaded)."""
    if name in sys.modules:
        return True
    parent = name.rpartition(".")[0]
    if parent and parent not in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def say_notes(notes: list[str], said: set[str], out: Callable[[str, str], None]) -> None:
    """A unit's ``meta["notes"]`` (its worker's lines for the notebook: a pandas option
    it could not set, ``context.take_notes``) on the run's stderr, each line once per
    run (``said``): every worker refusing the same option sent the same line."""
    for line in notes:
        if line not in said:
            said.add(line)
            out("stderr", line + "\n")


def _print_stream(stream: str, text: str) -> None:
    # A task's text, or its display() rich in the cell; backslash escapes where the
    # notebook's stream cannot encode the text (display_relay.print_output, imap's writer too).
    display_relay.print_output(stream, text)
    # No flush after each write: in a kernel, each flush is a message of its own and a wait for
    # ipykernel's IO thread (a task alternating stdout and stderr lines made one message per line,
    # 20,000 where serial code makes 26, and an interrupt waited for them all). ipykernel sends
    # what a stream holds every 0.2 s, as for serial prints; the waiting thread flushes when it
    # has nothing more to print (engine.Run.wait), and this at most every FLUSH_EVERY.
    global _flushed
    now = time.monotonic()
    if now - _flushed > FLUSH_EVERY:
        _flushed = now
        flush_stdio()


#: Seconds between flushes of the notebook's streams while a run's output keeps coming.
FLUSH_EVERY = 0.2
_flushed = 0.0


def flush_stdio() -> None:
    """Flush the notebook's ``sys.stdout`` and ``sys.stderr`` (a closed or odd one is skipped)."""
    for target in (sys.stdout, sys.stderr):
        try:
            target.flush()
        except (OSError, ValueError, AttributeError):
            pass
