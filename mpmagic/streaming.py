"""Streamed maps: ``imap(func, *iterables, ordered=True)`` yields results as they come.

The run is a background run (``background.start``) whose job keeps no
list of results: each accepted chunk goes to a :class:`Feed`, and the
iterator the user loops over takes chunks from there. Input is read lazily,
chunk by chunk, as for ``pmap``; output is bounded too: while more than
``Feed.limit`` chunks wait unconsumed (or, ordered, wait for an earlier
chunk), the job hands out no new chunk, so a slow consumer never makes the
notebook hold the whole result. The consumer makes room and wakes the
backend (``engine.Run.nudge``).

Breaking out of the loop, ``close()``, or dropping the iterator cancels the
rest of the run (its busy workers are replaced, as for an interrupt). An
interrupt while the loop waits for results cancels it too, and says so in
one line, as ``%pmap`` does.

``checkpoint=`` (``checkpoint.StreamCheckpoint``): only the items the store
lacks are computed; each accepted chunk is stored before the consumer gets
it. The stream yields the stored items too: ordered, each in its input
place (the reader puts the computed chunks, which count in the computed
items only, back among the stored ones); unordered, first, as they are found.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import queue
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

from .background import ResultStream
from .checks import check_flags, check_whole, keyword_names, unexpected_keyword
from .engine import sigint_deferred
from .errors import MPMagicError, add_note, drop_read_past_note, hide_our_frames, one_line
from .fmt import cancelled_words, stopped_words
from .interrupts import restore as restore_interrupts
from .jobs import Failed, MapJob, ToRaise

if TYPE_CHECKING:
    from .background import Run

_T = TypeVar("_T")

_END = object()


class _Count:
    """Stands in for MapJob's in-order result list: counts the items, keeps none.

    ``MapJob._complete`` only asks its length and extends it, so a stream's
    job runs the same bookkeeping (order, first error) without the list.
    """

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def extend(self, items: list) -> None:
        self.n += len(items)


class Feed:
    """Chunks from the backend (manager thread) to the consumer (the loop), bounded."""

    def __init__(self, limit: int, store: Callable[[int, list], None] | None = None) -> None:
        self.limit = limit
        self.store = store  # --checkpoint: each chunk is stored (queued for its writer) first
        self.chunks: queue.SimpleQueue = queue.SimpleQueue()
        self.held = 0  # chunks accepted and not yet consumed (a counter shared by two threads)
        self._held_lock = threading.Lock()

    def put(self, start: int, results: list, failing: bool = False) -> None:
        """A chunk accepted (``failing``: a ToRaise stands among its results)."""
        if self.store is not None:
            self.store(start, results)
        with self._held_lock:
            self.held += 1
        self.chunks.put((start, results, failing))

    def put_stored(self, start: int, results: list) -> None:
        """Stored items for an unordered stream: yielded as they come, never counted as held
        (they cost no worker time, and holding them back would not bound anything)."""
        self.chunks.put((None, results, False))

    def taken(self, n: int = 1) -> bool:
        """``n`` chunks consumed: True if that made room for more work."""
        with self._held_lock:
            was = self.held
            self.held -= n
            return was >= self.limit > self.held

    @property
    def full(self) -> bool:
        return self.held >= self.limit

    def job_class(self, *args: Any, **kwargs: Any) -> StreamJob:
        return StreamJob(*args, feed=self, **kwargs)


class StreamJob(MapJob):
    """A MapJob whose results go to a :class:`Feed` instead of a list.

    An item's failure does not end it (``per_item``): it stands in its place,
    a ``Failed`` (``errors="collect"``) or a ``ToRaise`` whose error the loop
    raises there (``errors="raise"``), and the run goes on, so that the next
    ``next()`` gives the next item's result, as serial ``map``'s does. Only what
    no item's call raised ends it: the input's own error, an item that cannot
    be sent, a function that cannot be loaded, the pool stopped under it.
    """

    def __init__(self, *args: Any, feed: Feed, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.feed = feed
        self.per_item = True
        if not self.collect:
            self._failed_type = ToRaise
        self._in_order = _Count()  # type: ignore[assignment]
        # A lazy input is read about one chunk ahead of what went out, and what
        # goes out is bounded by the feed: ramping the chunk sizes up keeps the
        # items read past the loop's last result to a few chunks of about the
        # size of those it took (serial map reads none; docs/troubleshooting.md).
        self.planner.ramp = self._iter is not None

    @property
    def has_work(self) -> bool:
        if not MapJob.has_work.fget(self):  # type: ignore[attr-defined]
            return False
        # Units sent again (a lost worker's) always go: an earlier chunk may be among them.
        return bool(self._requeued) or not self.feed.full

    def _accept(self, start: int, results: list, failed: int) -> None:
        # (in the manager thread: the feed's count holds the workers back at once)
        self.feed.put(start, results, bool(failed) and not self.collect)

    def results(self) -> list:
        __tracebackhide__ = True
        if self.failure is not None:
            raise self.failure
        return []

    def forget_work(self) -> None:
        """Cancelled: the chunks waiting in the feed will never be read (emptied, not
        replaced: the reader's end marker comes after)."""
        super().forget_work()
        while True:
            try:
                self.feed.chunks.get_nowait()
            except queue.Empty:
                return


_RELAY_EVERY = 0.1  # seconds between showing the tasks' output while the loop waits for a chunk


class _Reader:
    """Takes chunks from the feed for the stream ``imap`` returns, in input
    order (or as they come), and makes room for more work as it goes.

    It outlives each of the stream's segments (``_segment``: the generator a
    loop runs in until an item's error is raised, or the end), so the next
    segment goes on where the last one raised, with the rest of its chunk."""

    def __init__(self, run: Any, feed: Feed, ordered: bool, resume: Any = None) -> None:
        self.run = run
        self.feed = feed
        self.ordered = ordered
        self.resume = resume  # --checkpoint, ordered: puts the stored items in their places
        self.next_index = 0  # ordered: the next input index to yield
        self.waiting: dict[int, tuple[list, bool]] = {}  # ordered: chunks that came before an earlier one
        self.ended = False
        self.dropped = False  # the stream was dropped (its finalizer ran): its cancel was asked, never waited for
        # The results being yielded (the rest of a chunk whose item's error a segment raised),
        # and where the next segment goes on (-1: from the start, no ToRaise among them).
        self.held: list | None = None
        self.held_at = 0
        self.hand: list[tuple] = []  # the feed's entry taken, until its results are placed (see fill)
        self._get = functools.partial(feed.chunks.get, timeout=_RELAY_EVERY)
        self.over = False  # nothing more comes: the stream ends at the next next()
        # The run ended with an error that stopped it (not an item's own, not the input's):
        # the next next() says so, once, rather than ending as if every item had been given.
        self.stopped_by: BaseException | None = None
        # The segment being iterated (close() closes it), weakly: its finalizer holds this reader.
        self.segment: weakref.ref[Generator] | None = None
        self.guard: weakref.finalize | None = None  # that segment's finalizer (see _dropped)
        # The results the loop got (each chunk's, counted as it is handed out: by the run's
        # end every one handed out was yielded or raised in its place), for a cancel's message.
        self.given = 0
        # The thread that loops over the stream (the one that made it, until a loop runs):
        # close() from any other stops the run and lets that loop hear of it (close, below).
        self.thread = threading.get_ident()
        run.add_done_callback(lambda r: feed.chunks.put((-1, _END, False)))

    def fill(self) -> list | None:
        """The next results to yield, made ``held`` (from ``held_at``: -1, no ToRaise
        among them; they stay held until the segment yields them), or None once the
        run ended and all are out.

        Nothing is lost to a Ctrl-C on the way, so that the loop, run again, goes on
        where it was (after a run that had ended: with every result still to come).
        A feed's entry is taken into ``hand`` inside one C call (``list.extend``
        pulling it through ``islice``), where no Ctrl-C can land, and leaves it as its
        results are placed, with SIGINT deferred (``_place``): the interrupt is raised
        once they are in ``held``. ``start, results, failing = get()`` lost the entry
        when the Ctrl-C landed right after the get returned, or while the tasks'
        output was printed after it: the loop went on without that chunk's results
        (ordered, without any later one either), and without the end marker it waited
        for ever."""
        if self.held is not None:
            return self.held
        hand = self.hand
        while not self.ended:
            self.thread = threading.get_ident()  # (per chunk, not per item: the loop's thread)
            if not hand:
                self._take()
            self.run._sink.relay_here()  # what the tasks printed, in the consumer's cell
            with sigint_deferred():
                self._place(hand.pop())
            if self.held is not None:
                return self.held
        return None

    def _take(self) -> None:
        """Wait for the feed's next entry, into ``hand`` (see ``fill``)."""
        hand, get = self.hand, self._get
        while not hand:
            try:
                hand.extend(itertools.islice(iter(get, None), 1))  # (no entry is None: this takes one)
            except queue.Empty:
                # What the tasks print shows while the loop waits, as a blocking
                # %pmap shows it (it waited for the chunk's results: a task that
                # printed and then ran for a minute showed nothing for a minute).
                self.run._sink.relay_here()

    def _place(self, entry: tuple[int | None, Any, bool]) -> None:
        """A feed's entry taken: its results (in order, with those that waited for it)
        go to ``held``; a chunk that came before an earlier one waits; the end marker
        ends the reading."""
        start, results, failing = entry
        if results is _END:
            self._rest()
            return
        if start is None:  # stored items (unordered, --checkpoint)
            self._hold(results, failing)
            return
        if not self.ordered:
            self._taken(1)
            self._hold(results, failing)
            return
        # Ordered: a chunk that came before an earlier one still counts as held,
        # so a slow early chunk cannot make the notebook hold all the later ones.
        first = self.next_index
        if start == first and not self.waiting:  # the usual case: in order already, no copy
            self.next_index += len(results)
            self._taken(1)
            self._hold(self._placed(first, results), failing)
            return
        self.waiting[start] = (results, failing)
        ready: list = []
        n = 0
        any_failing = False
        while self.next_index in self.waiting:
            chunk, chunk_failing = self.waiting.pop(self.next_index)
            self.next_index += len(chunk)
            ready.extend(chunk)
            any_failing = any_failing or chunk_failing
            n += 1
        if n:
            self._taken(n)
            self._hold(self._placed(first, ready), any_failing)

    def _hold(self, results: list, failing: bool) -> None:
        """The next results to yield (none: nothing to hold), counted as handed out: by the
        run's end every one handed out was yielded or raised in its place."""
        if results:
            self.held, self.held_at = results, 0 if failing else -1
            self.given += len(results)

    def _placed(self, first: int, computed: list) -> list:
        """Computed results from computed item ``first`` on, with the stored items among them."""
        return computed if self.resume is None else self.resume.in_input_order(first, computed)

    def _taken(self, n: int) -> None:
        if self.feed.taken(n):
            self.run._engine_run.nudge()

    def _rest(self) -> None:
        """At the end: what still waits in order (ordered, after a failure: up to the gap)."""
        self.ended = True  # the end marker was taken: nothing more comes
        first = self.next_index
        rest: list = []
        failing = False
        while self.next_index in self.waiting:
            chunk, chunk_failing = self.waiting.pop(self.next_index)
            self.next_index += len(chunk)
            rest.extend(chunk)
            failing = failing or chunk_failing
        self.waiting.clear()
        if self.resume is not None and self.ordered:  # and the stored items after them
            rest = self.resume.in_input_order(first, rest) + self.resume.stored_until(self.next_index)
        self._hold(rest, failing)

    def ended_with(self, exc: BaseException) -> None:
        """The run ended with ``exc`` (raised at the stream's end): after the input's own
        error (a generator that raised is finished: serial map ends there too) the stream
        ends; after any other, a cancel too, the next ``next()`` says the run stopped there
        (a loop that logs errors and goes on must not take a StopIteration for every result
        having come: ``as_completed`` says so too)."""
        self.over = True
        if exc is not self.run._job.input_raised:
            self.over, self.stopped_by = False, exc

    def cancelled_error(self) -> CancelledError:
        """The cancelled run's error, raised where the loop reaches the first item that
        will not come: how many results the loop got, so a cancelled run does not pass for
        a complete one (``as_completed`` raises its ``CancelledError`` there too)."""
        run = self.run
        past = run._read_past(failed=False, got=self.given)  # (an iterator read past the loop's results)
        return one_line(CancelledError(
            f"run {run.id} ({run.what}) was cancelled: {cancelled_words(self.given, run.items_total, self.ordered)}"
            f"{f'; {past}' if past else ''}"))


def _note_read_past(reader: _Reader, exc: BaseException, index: int) -> None:
    """An item's error raised in the loop (``errors="raise"``), over an iterator input:
    note how far the run has read it past that item (``MapJob.read_past_line``, the
    blocking run's words). A loop the error ends has, serially, read items 0..index;
    the stream read ahead of it, and the same iterator given again would skip the items
    read and never returned. "So far" while the run still reads on (the loop may go on,
    and a stream left is cancelled only then). One note however often the same exception
    is raised (it may stand for several items: a lost worker's chunk)."""
    run = reader.run
    drop_read_past_note(exc)
    if past := run._read_past(failed=True, failed_at=index, so_far=not run.done()):
        add_note(exc, f"mpmagic: {past}")


def _segments(reader: _Reader) -> Generator[Generator[Any, None, None], None, None]:
    """The stream's segments, one after the other (``itertools.chain`` iterates them):
    each yields results until an item's error raised in its place ends it, and the
    next goes on from there. A generator that raised is finished; the chain is not."""
    while not reader.over:
        if reader.stopped_by is not None:  # (the run has ended: nothing to guard)
            reader.over = True
            yield _stopped(reader)
            return
        segment = _segment(reader)
        reader.segment = weakref.ref(segment)
        # A segment dropped unfinished (the loop left, the stream freed) cancels the run.
        reader.guard = weakref.finalize(segment, _dropped, reader)
        yield segment


def _segment(reader: _Reader) -> Generator[Any, None, None]:
    """Results until an item's error, raised here at its place, or the end. ``yield from``
    a chunk costs far less per item than a Python ``__next__`` would (100,000 tiny
    items: ~5 ms less); only a chunk holding a failed item is gone through one by one."""
    __tracebackhide__ = True
    left = False  # the segment ended as it should (the end, an item's error): nothing to cancel
    restore_interrupts()  # (a loop's first wait: its interrupt is its own, not a repeat of an earlier run's)
    try:
        while (chunk := reader.fill()) is not None:
            at = reader.held_at
            if at < 0:
                reader.held = None  # (no call from here to the first yield: a Ctrl-C lands before it or after)
                yield from chunk
                continue
            for i in range(at, len(chunk)):
                result = chunk[i]
                reader.held_at = i + 1  # the next segment goes on from there (after an error, a Ctrl-C)
                if type(result) is ToRaise:
                    left = True
                    try:  # (from the traceback it was rebuilt with, each time: one error may stand for several items)
                        raise result.error.with_traceback(result.tb)
                    except BaseException as exc:
                        hide_our_frames(exc)  # (as a blocking pmap raises it: the loop's line, the task's frames)
                        _note_read_past(reader, exc, result.index)
                        raise
                yield result
            reader.held = None
        left = True
    except KeyboardInterrupt:  # in our wait for the next chunk (the loop's own body raises in the user's frame)
        if left:  # (an item's own error, of a class deriving from it, raised in its place: not an interrupt)
            raise
        raise _interrupted(reader.run, reader.given) from None
    finally:
        if reader.guard is not None:  # (ended here: the chain dropping it later is no reason to cancel)
            reader.guard.detach()
        if not left and not reader.dropped:  # the loop was left (break, close(), an exception, Ctrl-C)
            reader.run.cancel()  # stop the rest
    run = reader.run
    try:
        run.result()  # the run's error (or CancelledError), after the results before it
    except CancelledError as exc:
        if not run.cancelled():  # (not the run's own cancel: raised as it is)
            reader.ended_with(exc)
            raise
        cancelled = reader.cancelled_error()
        reader.ended_with(cancelled)
        raise cancelled from None
    except BaseException as exc:
        reader.ended_with(exc)
        hide_our_frames(exc)  # (a script's traceback: the loop's line, then the task's frames)
        raise
    reader.over = True
    changed = run._job.input_changed()  # (the loop appended to its input list: a worklist)
    if changed is not None:
        run._warn(f"mpmagic: {changed}")
        run._sink.relay_here()


def _stopped(reader: _Reader) -> Generator[Any, None, None]:
    """The one ``next()`` after the run's error that stopped it, or its cancel: says so (an
    error, not the StopIteration a loop that logs errors and goes on would take for the end).
    After a cancel, a ``CancelledError`` again, as a cancelled future's ``result()`` raises it
    each time (and ``as_completed`` the ``next()`` after its own)."""
    __tracebackhide__ = True
    run, exc = reader.run, reader.stopped_by
    done, total = run.items_done, run.items_total
    of = f" of {total}" if total is not None else ""
    if isinstance(exc, CancelledError) and run.cancelled():
        raise one_line(CancelledError(
            f"run {run.id} ({run.what}) was cancelled (the CancelledError raised before): "
            f"{stopped_words(reader.given, total)}"))
    raise one_line(MPMagicError(
        f"imap's run {run.id} ({run.what}) ended with the {type(exc).__name__} raised before ({done}{of} items "
        "finished): the items it had not given by then did not run, and nothing more comes (an error an item "
        "raises itself does not end it: the next item's result comes after it)"))
    yield  # (a generator: the chain iterates it)


def _interrupted(run: Any, got: int) -> KeyboardInterrupt:
    """Interrupted while waiting for results: the stream's run is cancelled (its busy
    workers replaced, as for ``%pmap``), and the one line says so (and, over an iterator,
    how far it was read past the ``got`` results the loop got: ``Run._read_past``)."""
    from .background import interrupted
    from .errors import IDLE_OUTCOME, NOT_STARTED_OUTCOME, STOPPED_OUTCOME

    stopped = False
    try:
        with sigint_deferred():  # a second interrupt must not cut the cancel short
            stopped = run.cancel()
    except KeyboardInterrupt:  # (that second one, raised once the cancel is done: the same interrupt)
        pass
    if not stopped and run.state != "cancelled":  # it had just ended
        return interrupted(f"imap interrupted; its run {run.id} ({run.what}) had ended ({run.state})")
    from .pool import get_pool

    engine_run = run._engine_run
    if get_pool().name == "local":
        done = (STOPPED_OUTCOME if engine_run is None or engine_run.workers_stopped
                else IDLE_OUTCOME if engine_run.units_sent else NOT_STARTED_OUTCOME)
    elif engine_run is not None and not engine_run.units_sent:  # (it waited for its turn: no task to speak of)
        done = NOT_STARTED_OUTCOME
    else:
        done = ("its Dask tasks were cancelled; the workers running tasks already started are replaced on "
                "mpmagic's own cluster, and finish them first on a cluster it did not start (later runs leave "
                "those workers out meanwhile)")
    past = run._read_past(failed=False, got=got)
    return interrupted(f"imap interrupted: its run {run.id} ({run.what}) was cancelled, {done}"
                       f"{f'; {past}' if past else ''}")


def _cancel_quietly(run: Any, wait: bool = True) -> None:
    try:
        run._cancel(wait)
    except Exception:
        import logging

        logging.getLogger("mpmagic").warning("mpmagic: cancelling a dropped imap failed", exc_info=True)


def _dropped(reader: _Reader) -> None:
    """A stream's finalizer (its segment's, or before the first one its chain's source's):
    it was dropped (a loop left early, or the stream freed), so its run is cancelled.

    The cyclic gc frees a stream caught in a reference cycle in whatever thread
    allocates: often the pool's manager, holding the pool's lock, or a thread
    holding some other lock the manager needs. A cancel that waited there for
    the manager to end the run waited for ever, and the whole pool with it. So
    this only asks the backend, taking no lock, and waits for the end a bounded
    time, and not at all in the manager thread or under the pool's lock
    (``background.Run._cancel``). The generator's ``finally``, which runs right
    after it (CPython clears weak references before it finalizes), asks nothing more."""
    if reader.dropped:  # (the segment's and then the source's, as the chain is freed)
        return
    reader.dropped = True
    _cancel_quietly(reader.run, wait=False)


@overload
def imap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    ordered: bool = True,
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    errors: Literal["raise"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    buffer: int | None = None,
    checkpoint: bool | str | os.PathLike[str] = False,
    insights: bool = False,
    seed: int | None = None,
) -> Stream[_T]: ...


@overload
def imap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    ordered: bool = True,
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    errors: Literal["collect"],
    timeout: float | None = None,
    retries: int = 0,
    buffer: int | None = None,
    checkpoint: bool | str | os.PathLike[str] = False,
    insights: bool = False,
    seed: int | None = None,
) -> Stream[_T | Failed]: ...


@overload
def imap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    ordered: bool = True,
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    errors: Literal["raise", "collect"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    buffer: int | None = None,
    checkpoint: bool | str | os.PathLike[str] = False,
    insights: bool = False,
    seed: int | None = None,
) -> Stream[_T] | Stream[_T | Failed]: ...


def imap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    ordered: bool = True,
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    errors: Literal["raise", "collect"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    buffer: int | None = None,
    checkpoint: bool | str | os.PathLike[str] = False,
    insights: bool = False,
    seed: int | None = None,
    **refused: Any,
) -> Stream[_T] | Stream[_T | Failed]:
    """Parallel ``map`` whose results come one by one, as soon as their chunk is back.

    Tasks start running at ``imap()`` itself, before the first ``next()``
    (as ``Executor.map``; serial ``map`` is lazy), so their side effects may
    happen before the loop asks. ``ordered=True`` yields in input order (like ``map``); ``ordered=False``
    in the order chunks finish. Input is read chunk by chunk (over an
    iterator the chunks start at one item and at most double, so a loop left
    early leaves it read only a few chunks past its last result); ``buffer``
    bounds the finished chunks the notebook holds before the loop takes them
    (default: 2 per worker, at least 4): beyond it no new chunk is handed out.
    That bound counts chunks, not bytes: automatic chunks are sized by task
    time (a list's first ones, before any is measured, up to 16 items) and
    capped at 64 MB of packed items or results each, so results come in bursts
    of a chunk and big ones can pile up; ``chunksize=1`` (and a small
    ``buffer``) gives ``Pool.imap``'s one result at a time and holds at most
    ``buffer + 2 * workers + 1`` results the loop has not taken.
    An item's error is raised at its place (ordered: after the results of the
    items before it), and, as over serial ``map``, the next ``next()`` goes on
    with the next item's result: a failing item (its worker lost, or past
    ``timeout`` too) does not stop the run. What no item raised ends it: the
    input's own error ends the stream (as a generator that raised ends
    ``map``); any other (an item that cannot be sent, the pool stopped) is
    raised at its place and the next ``next()`` raises ``MPMagicError`` saying
    nothing more comes. Leaving the loop early, or the stream's
    ``close()`` (even before its first result), cancels the rest.
    ``checkpoint=True`` (or a folder) stores each finished item's result and
    yields stored ones instead of computing them again (docs/checkpoint.md):
    in their input places when ordered, first when not.
    ``insights=True`` and ``seed=S`` are ``pmap``'s (the report: ``stream.run.report()``).
    ``compare=`` and ``progress=`` are refused in one line: ``pmap(..., compare=True)``
    compares; a loop over the stream shows its own progress (wrap it in tqdm).
    """
    __tracebackhide__ = True
    from . import api, background

    _refuse(refused)

    if buffer is not None:
        buffer = check_whole("buffer", buffer)
    iterables, workers, chunksize, timeout, retries = api.check_map_args(func, iterables, workers, chunksize, timeout,
                                                                         errors, star, retries, checkpoint)
    check_flags(ordered=ordered, insights=insights)
    if not api._in_worker_process():  # (serially there: the list is the worker's own)
        api.say_copied_state(func, started=True, positional=None if star else len(iterables))
    if seed is not None:  # (before the checkpoint's key, as pmap: a seeded run is stored apart)
        func, iterables, star = api.seeded(func, iterables, star, seed)
    if api._in_worker_process():
        ignored = api._ignored_serially(timeout=timeout, workers=workers, chunksize=chunksize, retries=retries,
                                        insights=insights, buffer=buffer)
        return Stream(iter(api._serial_in_worker(func, iterables, star, errors == "collect", ignored, "imap")), None)
    n_workers = workers or api.get_pool().workers
    what = f"imap {api.func_name(func)}"
    resume = None
    if checkpoint:
        from .checkpoint import StreamCheckpoint

        try:
            resume = StreamCheckpoint(func, iterables, star=star, errors=errors, location=checkpoint)
        except ValueError:  # the function has no key (does not pickle): the run itself says why
            resume = None
    feed = Feed(buffer or max(4, 2 * n_workers), store=resume.on_chunk if resume is not None else None)
    pending = True
    if resume is not None:
        try:
            todo, pending = resume.todo()
        except BaseException:
            resume.settle()
            raise
        iterables, star = (todo,), resume.star
        if not ordered:
            resume.stored_segments(feed.put_stored)

    def make_call(forward: background.Forward) -> Any:
        call = api.map_call(func, iterables, star, workers, chunksize=chunksize, errors=errors, timeout=timeout,
                            retries=retries, insights=insights, out=forward.out, progress=forward.progress,
                            job_class=feed.job_class)
        call.caller = "imap"
        return call

    if resume is not None and not pending:  # every item stored: nothing runs
        resume.settle()
        report = resume.amend(None, 0.0)
        report.caller = "imap"
        run = background.finished(what, "map", [], report, resume, live="relay", keep_chunks=False)
    else:
        try:
            run = background.start(what, make_call, lambda call, forward: call.job.results(), workers, live="relay",
                                   keep_chunks=False, resume=resume, errors=errors, streamed=True)
        except BaseException:
            if resume is not None:
                resume.settle()
            raise
    reader = _Reader(run, feed, ordered, resume if ordered else None)
    segments = _segments(reader)
    # Dropped before its first segment started (a generator not started runs no ``finally``): cancel then too.
    weakref.finalize(segments, _dropped, reader)
    return Stream(itertools.chain.from_iterable(segments), run, reader)


def _refuse(refused: dict[str, Any]) -> None:
    """``imap`` takes ``pmap``'s options but these: one line for ``compare`` and
    ``progress``, as ``submit`` and ``apmap`` refuse theirs, Python's TypeError for the rest."""
    from .errors import UsageError

    if "compare" in refused:
        raise UsageError("imap() takes no compare=: its results come as the loop asks for them, and a serial run "
                         "here would wait for the whole input; mpmagic.pmap(..., compare=True) runs both")
    if "progress" in refused:
        raise UsageError("imap() takes no progress=: the loop over its results shows the progress; wrap it "
                         "in tqdm (for r in tqdm(mpmagic.imap(f, xs), total=len(xs)): ...)")
    if refused:
        raise one_line(unexpected_keyword("imap", refused, keyword_names(imap)))


def _running(gen: Generator) -> bool:
    """Is the generator executing now (in another thread: ``close()`` from there
    raises ``ValueError: generator already executing``)?"""
    return inspect.getgeneratorstate(gen) == inspect.GEN_RUNNING


class Stream(ResultStream, Generic[_T]):
    """What :func:`imap` returns: an iterator over the results, whose ``close()``
    cancels the rest of the run, as leaving the loop does.

    A ``for`` loop iterates the chain of segments itself (``iter()`` gives it:
    ``itertools.chain`` over ``_segments``), so the results cost no Python call
    each; after an item's error the same iterator goes on with the next item,
    as ``map``'s does. The wrapper is for ``close()`` before the first
    ``next()``: a generator not yet started ignores ``close()``, and the run
    went on to the end (on Dask, and the next run waited behind it).
    """

    __slots__ = ("_it", "_run", "_reader")

    def __init__(self, it: Iterator[_T], run: Run[list[_T]] | None, reader: _Reader | None = None) -> None:
        self._it, self._run, self._reader = it, run, reader

    def __iter__(self) -> Iterator[_T]:
        return self._it

    def __next__(self) -> _T:
        __tracebackhide__ = True
        return next(self._it)

    def close(self) -> None:
        """Stop here: the rest of the run is cancelled, and ``next()`` ends the stream.

        From another thread than the loop's (a timer's, a watchdog's) it cancels the
        run only: that loop then gets ``CancelledError`` where the results stop, as after
        ``stream.run.cancel()``. (The loop's segment, suspended while the loop's body ran,
        was closed from there too, and the loop ended as if every result had come.)"""
        reader = self._reader
        if reader is not None and reader.thread != threading.get_ident():
            if self._run is not None:
                _cancel_quietly(self._run)
            return
        if reader is not None:
            reader.over = True  # (no segment after the one running now, if any)
            segment = reader.segment() if reader.segment is not None else None
            if segment is not None and not _running(segment):
                try:
                    segment.close()
                except ValueError:  # it started running in another thread meanwhile: cancelled below
                    if not _running(segment):
                        raise
        # (a stream closed before its first segment runs none; one running in another
        # thread cannot be closed from here: its loop ends once this cancels it)
        if self._run is not None:
            _cancel_quietly(self._run)

    @property
    def run(self) -> Run[list[_T]] | None:
        """The background run behind the stream (``done()``, ``cancel()``, counts);
        None for an ``imap`` called inside a task (it ran serially there)."""
        return self._run

    def __repr__(self) -> str:
        if self._run is None:
            return "<mpmagic imap stream run serially in a task>"
        return f"<mpmagic imap stream of run {self._run.id} ({self._run.state})>"


__all__ = ["imap", "Stream", "CancelledError"]
