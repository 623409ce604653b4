"""A run: one job in flight on a backend, as a Future-like handle.

``Backend.submit(job)`` returns a :class:`Run` at once. The backend's own
thread (the local pool's manager, see ``backends/local.py``) hands the job's
units to workers and feeds back what they return; the thread that waits on
the run (``wait`` / ``result``) prints the task output, moves the progress
bar, calls the job's ``on_chunk`` and reads a lazy input itself. That keeps printed output in the
notebook cell that started the run (ipykernel routes output by the thread's
parent message), and it keeps the manager, which serves every run in flight,
from ever blocking on a slow terminal, a slow callback or a slow input.

The handoff is a ``queue.SimpleQueue`` of events: a blocking ``get`` costs a
few microseconds per wake-up, and Ctrl-C interrupts it in the main thread.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # (no stub: the C module under signal.py)
import _thread
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from itertools import islice
from typing import Any

from . import exiting
from .jobs import flush_stdio
from .progress import redraw_after_output
from .timeouts import TimeoutError as WaitTimeout

log = logging.getLogger("mpmagic")

_END = ("end",)

#: Seconds between progress events, the first one this long after the run began.
#: Each event wakes the waiting thread, which then competes for the GIL with the
#: manager: one per chunk cost a warm 2-item map ~40 us; a bar needs ~10 a second.
PROGRESS_EVERY = 0.1


#: Output events still queued once a run is interrupted that are shown; earlier ones
#: are left out (one line says how many lines): tasks that print faster than the
#: notebook can show (stdout and stderr in turn, endless) had queued a backlog
#: whose display held the interrupt up for 20-70 s. The last ones, printed just
#: before the interrupt, are the ones shown.
KEPT_AT_INTERRUPT = 200

#: Seconds between a main-thread wait's looks at a SIGINT another thread took. The
#: kernel's interrupt (and a terminal's Ctrl-C) is sent to the process, and Linux may
#: hand it to any thread that does not block it (another one when the main thread has
#: a signal pending, as a SIGCHLD of a stopped worker): Python's handler then runs
#: there, and the main thread, blocked in its queue's get, was never woken to raise
#: the KeyboardInterrupt: a run of a loop was never interrupted (the suite hung so).
SIGNAL_POLL = 0.2


def wait_in_slices(wait: Callable[[float | None], bool], timeout: float | None = None) -> bool:
    """``wait(timeout)`` (an Event's or a Condition's ``wait``), in the main thread in
    slices of :data:`SIGNAL_POLL` seconds, so that a SIGINT another thread took raises
    its KeyboardInterrupt here (see :data:`SIGNAL_POLL`); in another thread as it is."""
    if _thread.get_ident() != threading.main_thread().ident:
        return wait(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = SIGNAL_POLL if deadline is None else min(SIGNAL_POLL, max(0.0, deadline - time.monotonic()))
        if wait(left):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


class Latch:
    """A flag set once and never cleared, waited on from any thread: ``is_set``,
    ``set``, ``wait(timeout)``, as a ``threading.Event`` that is never cleared.

    A run's end flag, made at every submit and set by the manager at its end: an
    Event is a ``Condition`` on a lock (with five bound methods copied onto it) and
    its ``set`` notifies in Python (made and set: ~3.5 us of a warm 2-item map's two
    threads on a loaded machine); here a lock made held is the gate (~0.5 us in all):
    ``set`` opens it, and each ``wait`` passes it and opens it again for the next
    waiter. Waits on it are interrupted by Ctrl-C in the main thread, as an Event's are.
    (One that lands between a wait passing the gate and opening it again leaves it shut:
    every wait reads the flag first, so only a wait already blocked then, with no
    timeout, would stay; the one wait on a run's end, ``_LocalRun.cancel``, waits in
    slices of at most ``_CANCEL_CHECK`` seconds.)
    """

    __slots__ = ("_flag", "_gate")

    def __init__(self) -> None:
        self._flag = False
        self._gate = _thread.allocate_lock()
        self._gate.acquire()

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True  # (before the gate opens: a waiter that passes it finds it set)
        self._open()

    def wait(self, timeout: float | None = None) -> bool:
        """True once set (at once if it is); False when ``timeout`` seconds passed first."""
        if self._flag:
            return True
        if self._gate.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._open()  # (the next waiter's turn)
        return self._flag

    def _open(self) -> None:
        try:
            self._gate.release()
        except RuntimeError:  # open already: two threads set it at once, or a waiter passed between them
            pass


class Run:
    """One job submitted to a backend: ``done()``, ``result(timeout)``, ``cancel()``.

    Counts: ``items_done`` / ``items_failed`` / ``items_total`` (items of a map,
    ranks of a cell; ``items_total`` is None for an input of unknown length).
    """

    #: True for a run nobody waits on in the foreground (``mpmagic.submit``, ``imap``):
    #: a backend hands a foreground run's units out first, so a quick cell is
    #: not kept waiting behind a long background map.
    background = False
    #: How messages about this run name it: a background run's handle sets
    #: ``run 3 (pmap nap)`` (None: a foreground run, named by its job).
    label: str | None = None

    def __init__(self, job: Any) -> None:
        # A backends.base.Job (typed Any here: that module imports this one); the
        # run uses only its members (items_*, redirect, read_input, results).
        self.job = job
        self.error: BaseException | None = None  # what the backend raised instead of finishing
        self.cancelled = False
        self.interrupted = False
        self.items_total: int | None = job.items_total
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        # The event the waiting thread took off the queue, until its dispatch begins (see wait).
        self._hand: list[tuple] = []
        self._ended = Latch()
        self._pumped = False  # the end event was taken by a waiting thread
        self._chunk_error = False  # on_chunk raised: the run stops with its error
        self._left_out = 0  # lines of output dropped after an interrupt (see KEPT_AT_INTERRUPT)
        self.reading_input = False  # the waiting thread is in the user's input generator now
        self.calling_back = False  # the waiting thread is in the job's on_chunk (the user's code) now
        # Set by the backend: workers it stopped (and replaced) for this run on a cancel or an
        # interrupt, and whether any unit of it ever went to a worker (an interrupt's one line).
        self.workers_stopped = 0
        self.units_sent = False
        # The thread that started it: named when a setup change is refused while it runs (setup_api).
        # A foreground run's waiting thread: the exit waits for the run while that thread lives (exiting).
        self.starter = threading.current_thread()
        self.thread = self.starter.name
        self._wait_lock = threading.Lock()  # one thread pumps the events at a time
        self._result: list | None = None
        self._progress_held = 0  # items done but not yet reported (see PROGRESS_EVERY)
        self._progress_due = time.monotonic() + PROGRESS_EVERY
        # The job's output, progress, on_chunk calls and requests to read more of
        # a lazy input (jobs.MapJob.read_input) now go through the event queue.
        self._out, self._progress, self._chunk, self._ask_input = job.redirect(
            self._emit_out, self._emit_progress, self._emit_chunk, self._emit_input
        )

    # -- counts --------------------------------------------------------------
    @property
    def items_done(self) -> int:
        return self.job.items_done

    @property
    def items_failed(self) -> int:
        return self.job.items_failed

    # -- called by the backend (any thread) ------------------------------------
    def note(self, stream: str, text: str) -> None:
        """Show ``text`` (mpmagic's own line, ending in a newline) on the run's
        ``stream`` ("stdout" or "stderr"), in order with its tasks' output: what the
        backend has to say about this run (a worker's setup failed, the pool shrank)."""
        self._events.put(("out", stream, text))

    def _emit_out(self, stream: str, text: str) -> None:  # (the job's output: see redirect)
        self._events.put(("out", stream, text))

    def _emit_input(self) -> None:
        self._events.put(("input",))

    def _emit_chunk(self, start: int, results: list) -> None:
        self._events.put(("chunk", start, results))

    def _emit_progress(self, n: int) -> None:
        if self._progress is None:
            return
        self._progress_held += n
        now = time.monotonic()
        if now >= self._progress_due:
            self._progress_due = now + PROGRESS_EVERY
            n, self._progress_held = self._progress_held, 0
            self._events.put(("progress", n))

    def _finish(self, error: BaseException | None = None) -> None:
        """The backend is done with this run (no worker holds its units any more)."""
        if self._ended.is_set():
            return
        if error is not None and self.error is None:
            self.error = error
        if self._progress_held:
            self._events.put(("progress", self._progress_held))
            self._progress_held = 0
        self._ended.set()
        self._events.put(_END)

    # -- called by the waiting thread -----------------------------------------
    def done(self) -> bool:
        return self._ended.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end, printing its output and moving its progress here.

        True when it ended; False once ``timeout`` seconds passed, even while
        output keeps coming (the progress bar is made then: ``api``). A
        KeyboardInterrupt raised in here leaves the run going: the caller
        decides (``api`` cancels it, then waits again).

        Idempotent: a run that ended stays ended for every later wait, which
        returns at once, even when an interrupt took the end event with it.
        Ctrl-C can land right after ``get`` took the end event off the queue
        (the item is then lost before it is dispatched): the ``_ended`` flag,
        set before that event was put, with the queue empty, says all the events
        before it were taken, so the end is taken here instead. The caller's
        second wait blocked on a queue nobody would fill again, under
        ``sigint_deferred`` (so more presses did nothing): the kernel hung.

        Nothing queued is lost to an interrupt: an event taken off the queue goes
        into ``_hand`` inside one C call (``list.extend`` pulling it through
        ``islice``), where no Ctrl-C can land, and leaves it only as its dispatch
        begins; the next wait (``api``'s, after the cancel) dispatches it first.
        ``ev = get()`` lost the event when the Ctrl-C landed right after the get
        returned: a rank's failure line, or what a task printed just before the
        interrupt, queued but never shown, though serial code had shown it.
        """
        __tracebackhide__ = True
        deadline = None if timeout is None else time.monotonic() + timeout
        hand = self._hand
        # (the main thread's wait wakes to act on a SIGINT another thread took: SIGNAL_POLL)
        main = _thread.get_ident() == threading.main_thread().ident
        polled = partial(self._events.get, timeout=SIGNAL_POLL) if main else None
        with self._wait_lock:
            while not self._pumped:
                if not hand:
                    if self._ended.is_set() and self._events.empty():
                        self._end_here()  # (its end event was taken by an interrupted wait, or is on its way)
                        break
                    get = self._events.get
                    if deadline is not None:
                        left = max(0.0, deadline - time.monotonic())
                        get = partial(get, timeout=min(left, SIGNAL_POLL) if main else left)
                    elif polled is not None:
                        get = polled
                    try:
                        hand.extend(islice(iter(get, None), 1))  # (no event is None: this takes one)
                    except queue.Empty:
                        if main and (deadline is None or time.monotonic() < deadline):
                            continue  # (a look at the signals: Python runs their handlers here, between calls)
                        return False
                ev = hand[0]
                self._dispatch(ev)  # (takes it out of ``_hand`` as it begins)
                if ev[0] == "out" and self._events.empty():
                    self._idle_flush()  # (output is not flushed line by line: jobs._print_stream)
                if deadline is not None and not self._pumped and time.monotonic() >= deadline:
                    return False  # (time is up, though output keeps coming: the caller's turn)
        return True

    def _dispatch(self, ev: tuple) -> None:
        del self._hand[0]  # (a statement, not a call: a Ctrl-C lands before it or after it, not in between)
        kind = ev[0]
        if kind == "out":
            if self.interrupted and self._events.qsize() > KEPT_AT_INTERRUPT:
                self._left_out += ev[2].count("\n")  # (see KEPT_AT_INTERRUPT)
                return
            if self._left_out:
                self._say_left_out()
            self._out(ev[1], ev[2])
        elif kind == "progress":
            self._progress(ev[1])
        elif kind == "chunk":
            self._call_on_chunk(ev[1], ev[2])
        elif kind == "input":  # read more of a lazy input here, as serial map would, then say so
            self.reading_input = True  # (may block in the user's generator: see background.Run cancel)
            try:
                self.job.read_input()
            finally:
                self.reading_input = False
            self.nudge()
        else:
            self._end_here()

    def _end_here(self) -> None:
        """The run's end, taken by the waiting thread: the job is ours again.

        Safe to repeat (an interrupt may cut it short): ``_pumped`` is set last."""
        if self._left_out:
            self._say_left_out()
        self.job.redirect(self._out, self._progress, self._chunk, self._ask_input)
        self._pumped = True

    def _say_left_out(self) -> None:
        n, self._left_out = self._left_out, 0
        self._out("stderr", f"mpmagic: {n} line{'s' if n != 1 else ''} the tasks printed before the interrupt "
                            "were left out: they came faster than the notebook could show them\n")

    def _idle_flush(self) -> None:
        """Nothing more to print for now: flush the notebook's streams, so what
        was printed shows while the run goes on, and draw again the text bar the
        output took off its line (``progress.clear_for_output``)."""
        redraw_after_output()
        flush_stdio()

    def _call_on_chunk(self, start: int, results: list) -> None:
        """The job's ``on_chunk``, here in the waiting thread. If it raises, the
        run stops (as a loop calling it would) and ends with its error; it is
        not called for the chunks that still arrive."""
        if self._chunk_error:
            return
        self.calling_back = True  # (may take long: see background.Run.cancel)
        try:
            self._chunk(start, results)
        except Exception as exc:
            self._chunk_error = True
            if self.error is None:
                self.error = exc
            self.cancel()
        finally:
            self.calling_back = False

    def result(self, timeout: float | None = None) -> list:
        """The job's results (raising its error), once it ended; a wait's TimeoutError
        (``timeouts``: ``multiprocessing``'s too) if not in time."""
        __tracebackhide__ = True
        if not self.wait(timeout):
            raise WaitTimeout(f"the run did not end within {timeout:g} s")
        if self.error is not None:
            raise exiting.raised(self.error)
        if self._result is None:
            self._result = self.job.results()
        return self._result

    def cancel_interrupted(self) -> bool:
        """Cancel the run a Ctrl-C hit and wait for its end (what its workers printed
        before they stopped shows; at once if it had ended), a second Ctrl-C deferred
        meanwhile: it must not cut the cleanup short. What :meth:`cancel` returned."""
        with sigint_deferred():
            stopped = self.cancel(interrupted=True)
            self.wait()
        return stopped

    def cancel(self, interrupted: bool = False, wait: bool = True) -> bool:
        """Stop the run: its queued units are dropped, workers busy with it replaced.

        ``interrupted``: the waiting thread got Ctrl-C. ``wait=False``: only ask,
        and return at once; the backend ends the run on its next turn (a
        finalizer's cancel: the cyclic gc runs it in whatever thread allocates,
        holding whatever that thread holds, the pool's manager included). A
        cancel in a thread where ``may_wait`` is False never waits either.
        True if this stopped it.
        """
        raise NotImplementedError

    def may_wait(self) -> bool:
        """May this thread wait for the run's end? Not the thread that ends it,
        nor one holding what that thread needs to end it: a wait there never ends."""
        return True

    def nudge(self) -> None:
        """The job may have work again (a stream's consumer made room): have it handed out.

        A driven run polls its job anyway; the local pool's run wakes its manager.
        """


class DrivenRun(Run):
    """A run driven by the thread that waits on it (a backend without a manager).

    ``drive`` runs the job to completion, raising what stopped it; it is
    called by the first ``wait``, so Ctrl-C lands in it as in a plain loop.
    """

    def __init__(self, job: Any, drive: Callable[[], None]) -> None:
        super().__init__(job)
        self._drive: Callable[[], None] | None = drive
        self._driven = False  # ``drive`` was called: never again, however that wait ended

    def wait(self, timeout: float | None = None) -> bool:
        """Drive the run to its end here (the first wait), or return at once (every later one).

        Idempotent, as ``Run.wait``: a Ctrl-C that lands after ``drive``
        returned but before the run was marked ended drove the job a second
        time in the caller's next wait (``api`` waits again after an interrupt).
        """
        __tracebackhide__ = True
        with self._wait_lock:
            if not (self._driven or self._ended.is_set()):
                error: BaseException | None = None
                try:
                    self._driven = True
                    # Directly: this is the waiting thread (it reads a lazy input itself, too).
                    self.job.redirect(self._out, self._progress, self._chunk, None)
                    # Driven once: not kept after (the backend's closure names this run, a cycle
                    # that kept the run, its job and the job's payload until a full collection).
                    drive, self._drive = self._drive, None
                    assert drive is not None  # (``_driven`` guards the one call)
                    drive()
                except KeyboardInterrupt:
                    self.interrupted = True
                    raise
                except BaseException as exc:
                    error = exc
                finally:
                    self._finish(error)  # (however it ended: an interrupt too)
                    self._pumped = True
            self._finish()  # (a no-op once ended: an interrupt cut the one above short)
            self._pumped = True
        return True

    #: ``cancel()`` was called: a driver in another thread (a background run's) ends the run at its next look.
    cancel_requested = False

    def cancel(self, interrupted: bool = False, wait: bool = True) -> bool:
        """False: its driver stops it. The interrupt raised in ``wait`` cancelled its futures;
        a background run's driver sees ``cancel_requested`` (``backends/dask.py``: a cell's
        loop, and a run waiting for its turn) and ends it, and a map's job is told too
        (``background._stop_driven``)."""
        self.cancel_requested = True
        return False


class sigint_deferred:
    """Cleanup that a second Ctrl-C must not cut short: defer SIGINT meanwhile.

    ``with sigint_deferred():`` a SIGINT that comes in the body is noted and
    delivered (to the handler that was in place) once the body is over. A
    no-op outside the main thread, or under a handler installed from C (it
    could not be put back). A class, not a generator: every run's submit takes
    this guard, and the generator's machinery cost more than the two calls.
    """

    __slots__ = ("_old", "_hits")

    def __enter__(self) -> None:
        self._hits: list[int] | None = None
        if threading.get_ident() != threading.main_thread().ident:
            return
        # ``_signal``, not ``signal``: the same calls without the wrapper's enum
        # conversions (~8 us a pair).
        if _signal.getsignal(signal.SIGINT) is None:  # a handler installed from C: it could not be put back
            return
        hits: list[int] = []
        try:
            self._old = _signal.signal(signal.SIGINT, lambda s, f: hits.append(s))
        except ValueError:
            return
        self._hits = hits

    def __exit__(self, *exc: object) -> None:
        hits = self._hits
        if hits is None:
            return
        self._hits = None
        old = self._old
        _signal.signal(signal.SIGINT, old)
        if hits and callable(old):
            old(signal.SIGINT, None)
        elif hits and old == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)
