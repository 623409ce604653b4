"""Background runs: ``pmap(..., block=False)``, ``%pmap --bg``, ``%%parallel --bg``.

A background run is an ordinary job submitted to the current backend; what
differs is who waits on it. Nobody in the notebook does, so each background
run gets a small daemon thread (``mpmagic-bg-N``, the *pump*) that waits on
the backend's run (``engine.Run.wait``), feeds its output and progress to a
sink, and, once it ended, builds the same results, error and timing report
as a blocking run would. The handle (:class:`Run`, ``mpmagic.Run``) only
reads what the pump left: ``done()``, ``result()``, ``report()``...

Where the output goes. ipykernel sends what a thread prints with the parent
header of the request running at that moment, so a background thread that
printed would put its output under whatever cell runs later. Instead, the
starting cell gets one display area at submit time (``display(...,
display_id=True)``), and the pump only ever *updates* that display by its id
(``update_display_data``): the frontend redraws the area in the starting
cell, whichever cell runs meanwhile. In a terminal there is no such area:
the output is kept on the handle (``run.output``) and ``repr(run)`` is a
one-line status.

The kernel's interrupt raises in the main thread only: a pump never sees it,
so an interrupt stops the foreground cell and background runs go on. A cell
interrupted while it waits on a run (``result()``, ``as_completed``) says so
in one line (:func:`interrupted`): the waiting stopped, the run did not.

The error a run ended with is raised in the notebook with the traceback it
had in the pump, less the pump's own frames (ours): the cell's line, then
the user's frames, as a blocking run shows it, however often it is raised.
"""

from __future__ import annotations

import concurrent.futures
import html
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import as_completed as futures_as_completed
from contextvars import ContextVar
from types import TracebackType
from typing import Any, NoReturn, Protocol, TypeVar, cast, overload

from . import ansi, debugging, display_relay, exiting
from .checks import wait_timeout
from .engine import wait_in_slices
from .errors import (
    MPMagicError,
    UsageError,
    add_note,
    drop_our_frames,
    hide_our_frames,
    one_line,
    one_line_interrupt,
)
from .fmt import cancelled_words, stopped_words
from .interrupts import absorb_late_interrupts
from .interrupts import restore as restore_interrupts
from .report import Report
from .timeouts import TimeoutError as WaitTimeout

log = logging.getLogger("mpmagic")

_ids = itertools.count(1)
_lock = threading.Lock()
# In flight (the handle itself) and recently finished (a Finished record: what
# ``%pool runs`` shows, and the handle only as long as the user holds it), oldest first.
_registry: dict[int, Run | Finished] = {}
#: Handles whose pump thread runs (until it has called the done-callbacks): what the exit waits for.
_pumping: set[Run] = set()
#: Finished runs listed by ``%pool`` / ``runs()`` besides those in flight (their rows: no results).
KEEP_FINISHED = 20
#: Set by ``api.apmap`` around its submit: the run's output is printed by the
#: coroutine awaiting it (``_Sink.relay_here``), as a blocking ``pmap`` prints
#: it, instead of being drawn in a live area or only kept on the handle.
relay_output: ContextVar[bool] = ContextVar("mpmagic_relay_output", default=False)
#: Seconds between redraws of a live area (each redraw is one message to the frontend).
REDRAW_EVERY = 0.25
#: Characters of task output a live area shows (the start is cut beyond it; ``run.output`` keeps all).
SHOW_OUTPUT = 20_000


def interrupted(message: str) -> KeyboardInterrupt:
    """The KeyboardInterrupt to raise (``from None``) when the user interrupts a wait
    in the notebook's thread on a run (or the workers' setup); ``message`` says what
    happened to the run and what to do.

    As ``%pmap``'s (magics._interrupted): IPython shows the one line of its
    ``_render_traceback_`` instead of a traceback through our waiting code,
    and its type stays KeyboardInterrupt. More presses of interrupt in the
    next moment are repeats of this one (interrupts.py).
    """
    absorb_late_interrupts()
    return one_line_interrupt(message)


def check_options(compare: bool = False, scaling: bool = False) -> None:
    """A background run cannot also run serially here (that needs the notebook's thread): say so,
    in the API's words and the magic's (the API has no ``scaling``)."""
    for flag, name in ((compare, "compare=True (--compare)"), (scaling, "--scaling")):
        if flag:
            raise UsageError(
                f"{name} runs serially in this thread, so it needs a blocking run: not submit() or "
                f"block=False (--bg); run it blocking"
            )


class Resume(Protocol):
    """What a checkpointed run (``--bg --checkpoint``) adds to a background run.

    ``checkpoint.MapCheckpoint`` and ``checkpoint.CellCheckpoint`` are the two
    kinds. The job computes only what the store lacks; the handle counts the
    stored items too, the pump has every accepted chunk stored (``settle``)
    before the run shows as done, so a re-run right after ``result()`` finds
    them, and ``result()`` / ``report()`` cover the whole input.
    """

    @property
    def resumed(self) -> int:
        """Items (ranks) taken from the store so far."""
        ...

    def stored_segments(self, emit: Callable[[int, list], None]) -> None:
        """``emit(start, results)`` for the stored stretches, now and as a lazy input finds more."""
        ...

    def say_to(self, warn: Callable[[str], None]) -> None:
        """What the store says while the run goes on (another process holds it) goes to
        ``warn``: the run's live area, not the cell running then."""
        ...

    def settle(self, warn: Callable[[str], None] | None = None) -> None:
        """The backend's run ended (however): wait until what it accepted is stored."""
        ...

    def value(self, computed: Any) -> Any:
        """The whole result from the computed part (stored results in their places)."""
        ...

    def failed(self, exc: BaseException, report: Any = None) -> None:
        """The run raised ``exc``: make the item it (and its ``report``, if any) names count
        in the whole input."""
        ...

    def stop(self) -> None:
        """The run is being cancelled: the user's ``on_chunk`` hears of no more chunks
        (they are still stored)."""
        ...

    def amend(self, report: Any, wall: float) -> Any:
        """The report covering the whole input ("resumed: N of M ... from the checkpoint")."""
        ...


# -- where a background run's output and progress go ---------------------------
class _Sink:
    """Collects a run's output and progress; in Jupyter it redraws a display area
    in the starting cell (by display id), elsewhere it only keeps them."""

    def __init__(self, run: Run, live: bool, relay: bool = False) -> None:
        # Weak: the handle holds this sink, and a cycle kept a finished run (its job,
        # results and function payload) alive until a full collection.
        self._run = weakref.ref(run)
        # A stream's output is printed by its consumer (the cell iterating), not drawn.
        self.relay: deque | None = deque() if relay else None
        self.parts: list[str] = []
        self.size = 0
        self.dirty = False
        self.drawn = 0.0
        self.handle: Any = None
        # Draws come from more than one thread (the pump, the thread delivering
        # events): one at a time, and none after the final one (the run's end),
        # or a state computed earlier could be sent last and show "running".
        self._draw_lock = threading.Lock()
        self.final = False
        if live:
            try:
                from IPython.display import display

                self.handle = display(self.bundle(), raw=True, display_id=True)
            except Exception:  # a broken display must never break the run
                log.warning("mpmagic: could not show the live area of a background run", exc_info=True)

    def out(self, stream: str, text: str) -> None:
        if self.relay is not None:  # (a stream's consumer prints it, rich: relay_here)
            self.relay.append((stream, text))
        if stream == "display":  # a task's display(): the live area is text, so its text form
            text = display_relay.text_form(text)
        self.parts.append(text)
        self.size += len(text)
        self.touch()

    def relay_here(self) -> None:
        """Print the output that came since the last call, in the calling thread (a stream's consumer),
        as a blocking run prints it (``display_relay.print_output``: escapes where the stream cannot encode it)."""
        while self.relay:
            display_relay.print_output(*self.relay.popleft())

    def progress(self, n: int) -> None:
        self.touch()

    def touch(self) -> None:
        self.dirty = True
        if time.monotonic() - self.drawn >= REDRAW_EVERY:
            self.draw()

    def text(self) -> str:
        return "".join(self.parts)

    def draw(self, final: bool = False) -> None:
        with self._draw_lock:
            if self.final:
                return
            self.final = final
            self.dirty = False
            self.drawn = time.monotonic()
            if self.handle is None:
                return
            try:
                self.handle.update(self.bundle(), raw=True)
            except Exception:
                log.warning("mpmagic: could not redraw a background run's live area", exc_info=True)

    def bundle(self) -> dict[str, str]:
        run = self._run()
        out = self.text()
        if run is None:  # (the handle is gone: nobody draws its area any more)
            return {"text/plain": out}
        if len(out) > SHOW_OUTPUT:
            out = "... (earlier output cut: run.output has it all)\n" + out[-SHOW_OUTPUT:]
        plain = [run.status_line()]
        body = [f"<div class='mpmagic-run'><div style='white-space:nowrap'>{html.escape(run.status_line())}</div>"]
        total = run.items_total
        if total:
            body.append(f"<progress value='{run.items_done}' max='{total}' style='width:30em'></progress>")
        if out:
            plain.append(out.rstrip("\n"))
            # (the HTML is what Jupyter shows: the tasks' ANSI colours as spans, not as "[31m")
            body.append(f"<pre style='margin:2px 0'>{ansi.to_html(out)}</pre>")
        error = run._error
        if error is not None and not isinstance(error, CancelledError):
            line = f"{type(error).__name__}: {error} (run.result() raises it)"
            plain.append(line)
            body.append(f"<pre style='color:#b00;margin:2px 0'>{ansi.to_html(line)}</pre>")
        if run._report is not None and run._show_report:
            plain.append(run._report.line())
            body.append(run._report._repr_html_() or f"<div>{html.escape(run._report.line())}</div>")
        body.append("</div>")
        return {"text/plain": "\n".join(plain), "text/html": "".join(body)}


def _in_kernel() -> bool:
    """Is there a Jupyter frontend to draw a live area in (not a terminal, not a script)?"""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


# -- the handle ------------------------------------------------------------------
#: What a run's ``result()`` gives: ``list[int]`` for a map of a function returning int.
_R = TypeVar("_R")
_T = TypeVar("_T")


def _timeout(message: str) -> BaseException:
    """A wait's time-out (:class:`mpmagic.timeouts.TimeoutError`), caught by ``except
    TimeoutError``, by ``except concurrent.futures.TimeoutError`` (the usual catch
    around ``run.result(timeout=...)``) and by ``except multiprocessing.TimeoutError``
    (ported from ``AsyncResult.get(timeout)`` / ``imap``'s ``next(timeout)``)."""
    futures_class: Any = concurrent.futures.TimeoutError  # (looked up here: tests stand in 3.10's)
    if issubclass(WaitTimeout, futures_class):
        return WaitTimeout(message)
    both = _BOTH_TIMEOUTS.get(futures_class)
    if both is None:
        both = _BOTH_TIMEOUTS[futures_class] = type(
            "TimeoutError", (futures_class, WaitTimeout), {"__module__": WaitTimeout.__module__})
    return both(message)


#: A ``concurrent.futures.TimeoutError`` other than the one of ``WaitTimeout``'s bases (a
#: test's stand-in for 3.10's): a class deriving from it and ``WaitTimeout``, by the former.
_BOTH_TIMEOUTS: dict[Any, Any] = {}


class Run(Future[_R]):
    """A run going on in the background: ``done()``, ``result(timeout)``, ``cancel()``.

    A ``concurrent.futures.Future``: ``concurrent.futures.wait`` and
    ``concurrent.futures.as_completed`` take it (several runs at once), and
    ``asyncio.wrap_future`` too. Made by ``submit`` / ``pmap(..., block=False)``
    / ``parallel(..., block=False)``, not by hand.
    ``result()`` returns what the blocking call would have returned, or raises
    what it would have raised (``CancelledError`` after ``cancel()``).
    ``report()`` is its timing report once done; ``items_done`` /
    ``items_failed`` / ``items_total`` count items (ranks of a cell), with
    ``--checkpoint`` the stored ones too (``items_resumed`` of them);
    ``output`` is what its tasks printed.
    """

    def __init__(self, what: str, call: Any, finish: Callable[[float], Any], live: bool | str | None = None,
                 keep_chunks: bool = True, resume: Resume | None = None, show_report: bool = True,
                 one_call: bool = False, streamed: bool = False) -> None:
        # The Future's own state only mirrors the end (_end): the stdlib's wait()
        # and as_completed() read it; everything else is this class's.
        super().__init__()
        self.id = next(_ids)
        self.what = what
        self._call = call
        self._job = call.job
        self._resume = resume
        self._finish_result = finish
        self._engine_run: Any = None
        self._pump_thread: threading.Thread | None = None
        # An ``imap`` stream's run: its loop makes room for its next chunks, so at exit,
        # with no loop left, it is stopped as a dropped stream is, not waited for (_waited_at_exit).
        self._streamed = streamed
        # Its entry among the runs started since the last blocking run (debugging.started_in_background).
        self._since: Any = None
        self._done = threading.Event()
        self._cancelled = False
        self._value: Any = None
        self._error: BaseException | None = None
        # The error's traceback as the pump caught it, less the pump's frames:
        # each raise here starts from it again (raising the same object adds the
        # raising frames to its ``__traceback__``: it would grow at every call).
        self._error_tb: TracebackType | None = None
        self._report: Report | None = None
        # ``mpmagic.call``: one call, not a map: its lines count no items ("run 3: call f, 1.2 s, failed")
        self._unit = "call" if one_call else "ranks" if self._job.kind == "cell" else "items"
        self._show_report = show_report  # in the live area once it ended (-q / show_report=False: not)
        self._callbacks: list[Callable[[Run], Any]] = []
        self._t0 = time.monotonic()
        self._elapsed: float | None = None
        # Chunks as they arrive, for ``as_completed`` (references, not copies).
        self._chunks: list[tuple[int, list]] | None = [] if keep_chunks else None
        self._arrived = threading.Condition()
        relay = live == "relay" or (live is None and relay_output.get())
        self._sink = _Sink(self, False if relay else _in_kernel() if live is None else bool(live), relay=relay)
        if resume is not None:
            resume.say_to(self._warn)

    # -- counts and state ------------------------------------------------------
    @property
    def items_resumed(self) -> int:
        """Items (ranks) taken from the checkpoint store instead of computed (``--checkpoint``)."""
        return self._resume.resumed if self._resume is not None else 0

    @property
    def items_done(self) -> int:
        return self._job.items_done + self.items_resumed

    @property
    def items_failed(self) -> int:
        return self._job.items_failed

    @property
    def items_total(self) -> int | None:
        total = self._job.items_total
        return None if total is None else total + self.items_resumed

    @property
    def output(self) -> str:
        """What the run's tasks printed so far (labelled ``[rank N]`` for a cell)."""
        return self._sink.text()

    @property
    def elapsed(self) -> float:
        return self._elapsed if self._elapsed is not None else time.monotonic() - self._t0

    @property
    def state(self) -> str:
        """``running``, ``done``, ``failed`` or ``cancelled``."""
        if not self._done.is_set():
            return "running"
        if self._cancelled:
            return "cancelled"
        return "failed" if self._error is not None else "done"

    def done(self) -> bool:
        """True once the run ended: finished, failed or cancelled (as
        ``concurrent.futures.Future.done``); ``result()`` then returns at once."""
        return self._done.is_set()

    def running(self) -> bool:
        """True while the run goes on (as ``concurrent.futures.Future.running``:
        a run is running from ``submit`` on; False once it ended)."""
        return not self._done.is_set()

    def cancelled(self) -> bool:
        """True if the run ended because it was cancelled (:meth:`cancel`), as
        ``concurrent.futures.Future.cancelled`` (False while a cancel is still
        stopping it: ``running()`` and ``cancelled()`` are never both True)."""
        return self._cancelled and self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the run ended (True) or ``timeout`` seconds passed (False)."""
        __tracebackhide__ = True
        return self._wait_here(timeout, "wait()")

    def result(self, timeout: float | None = None) -> _R:
        """The results (as the blocking call returns them), or the run's error raised here."""
        __tracebackhide__ = True
        if not self._wait_here(timeout, "result()"):
            raise one_line(_timeout(f"run {self.id} ({self.what}) did not end within {timeout:g} s; it goes on"))
        if self._cancelled:
            raise self._cancelled_error()
        if self._error is not None:
            ends = exiting.raised(self._error)
            if ends is not self._error:  # a daemon thread's wait the exit's stop ended: the thread ends
                raise ends
            try:
                self._raise_error()
            except BaseException as exc:
                hide_our_frames(exc)  # (a script's traceback: the caller's line, then the task's frames)
                raise
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The run's error once it ended (None when it succeeded); raises
        ``CancelledError`` after ``cancel()`` and ``TimeoutError`` past ``timeout``,
        as ``concurrent.futures.Future.exception``."""
        __tracebackhide__ = True
        if not self._wait_here(timeout, "exception()"):
            raise one_line(_timeout(f"run {self.id} ({self.what}) did not end within {timeout:g} s; it goes on"))
        if self._cancelled:
            raise self._cancelled_error()
        return self._error

    def _wait_here(self, timeout: float | None, what: str) -> bool:
        """Wait for the end; an interrupt stops the waiting, not the run, and says so.
        ``timeout`` as ``concurrent.futures`` takes it (``checks.wait_timeout``: ``'1'``
        is one usage line, not a TypeError from ``threading``; ``inf`` waits with no limit)."""
        __tracebackhide__ = True
        seconds = wait_timeout(timeout)
        restore_interrupts()  # this wait's interrupt is its own, not a repeat of an earlier one's
        try:
            return wait_in_slices(self._done.wait, seconds)
        except KeyboardInterrupt:
            raise self._interrupted(what) from None

    def _interrupted(self, what: str) -> KeyboardInterrupt:
        """The one line of an interrupted wait on this run: it goes on, and how to stop it."""
        if self._done.is_set():
            return interrupted(f"{what} interrupted; run {self.id} ({self.what}) had ended ({self.state})")
        return interrupted(f"{what} interrupted: run {self.id} ({self.what}) goes on in the background; "
                           f"cancel() on its handle (or %pool cancel {self.id}) stops it")

    def _cancelled_error(self) -> CancelledError:
        """What ``result()`` and ``exception()`` raise once the run was cancelled: one line,
        going on with how far a map read its iterator input past what finished."""
        past = self._read_past(failed=False)
        return one_line(CancelledError(f"run {self.id} ({self.what}) was cancelled{f'; {past}' if past else ''}"))

    def _read_past(self, failed: bool, *, failed_at: int | None = None, got: int | None = None,
                   so_far: bool = False) -> str:
        """For a map over an iterator (a generator: ``iter(x) is x``) that ``failed`` or
        was cancelled: how far the run read it past what finished ("to map it again, make
        its input again (an iterator: this one was read 40 items in, past the 4 that
        finished, and goes on from there)"), one wording with a blocking run's
        (``MapJob.read_past_line``); "" for a list, a range, an array, read anew by each
        run as by serial ``map``, for a cell, and for a checkpoint's run, whose job reads
        the checkpoint's own iterator of missing items (its error says its own:
        ``MapCheckpoint.failed``). Serially, ``map`` stopped at item k has read items
        0..k; the same iterator given again goes on from where the run read it, and the
        items read and never returned would be silently missing from the next result.
        An ``imap`` stream's: ``failed_at`` (its loop got that item's error), ``got``
        (its loop got that many results), ``so_far`` (the run still reads on)."""
        if self._job.kind != "map" or self._resume is not None:
            return ""
        return cast(str, self._job.read_past_line(interrupted=not failed, failed_at=failed_at, got=got,
                                                  so_far=so_far))

    def _raise_error(self) -> NoReturn:
        """Raise the run's error here, with the traceback it had when the pump caught it."""
        __tracebackhide__ = True
        assert self._error is not None
        raise self._error.with_traceback(self._error_tb)

    def report(self) -> Report | None:
        """The timing report (as a blocking run prints), once the run ended; None before."""
        return self._report

    def cancel(self) -> bool:
        """Stop the run: queued work is dropped, workers busy with it replaced. True if it
        stopped it, or it was cancelled already; False once it ended otherwise (done or
        failed), as ``concurrent.futures.Future.cancel`` (``if not fut.cancel(): fut.result()``).

        Returns at once, the run cancelled (``cancelled()`` True): an ``on_chunk``
        call in progress finishes in the run's own thread, and no other is made.
        (With ``--checkpoint``, once that call returned: the chunks that arrived
        are stored first, at most 10 s.)
        """
        __tracebackhide__ = True
        return self._cancel(wait=True)

    def _cancel(self, wait: bool) -> bool:
        """``cancel``. ``wait=False`` (a dropped stream's finalizer, which the cyclic gc
        runs in whatever thread allocates, holding whatever it holds): the backend is
        only asked, taking no lock (``engine.Run.cancel``), and the end is waited for
        at most ``_wait_cancelled``'s 10 s. Neither waits where the backend's run may
        not (``may_wait``: the pool's manager thread, or under the pool's lock)."""
        __tracebackhide__ = True
        with self._arrived:  # (as _end: a cancel that loses the race with the end finds the run done)
            if self._done.is_set():
                return self._cancelled  # (a cancelled run stays cancelled: True again, as a Future's)
            self._cancelled = True  # (the user's on_chunk is not called for chunks still queued: Forward)
        try:
            if self._resume is not None:
                self._resume.stop()
            run = self._engine_run
            if run is None:
                return True
            if not run.cancel(wait=wait):
                _stop_driven(self._job)  # a run driven by its waiting thread (Dask): the pump's loop ends
            # The backend stopped it; the pump settles the handle in a moment (a
            # driven Dask loop notices within its 0.2 s poll).
            if run.may_wait() and threading.current_thread().name != f"mpmagic-bg-{self.id}":
                self._wait_cancelled(run)
        except KeyboardInterrupt:  # (the run stops all the same: it was told to)
            raise interrupted(f"cancel() interrupted: run {self.id} ({self.what}) stops in the background all the "
                              f"same; %pool runs shows when it has") from None
        return True

    def _wait_cancelled(self, run: Any) -> None:
        """Wait (at most 10 s) for the pump to settle the cancelled handle.

        The pump may be in the user's code for long: in the run's ``on_chunk``
        (a call in progress finishes; it held ``cancel()`` for as long as it
        took, 10 s at most, then returned with the run still "running"), or in
        the input generator, blocked in ``next()`` (a queue nobody fills). Then
        the handle is settled here, once the backend has stopped the run (a
        driven Dask run stops once that call returns), and the pump finds it
        done when it comes back. (The input case stayed "running" and cancel()
        waited 10 s; an imap loop left early waited 20 s.) Not for a checkpointed
        run's ``on_chunk``: the chunks that arrived behind that call are stored
        by the pump once it returns, and a run shown cancelled has stored them
        (a re-run right after ``cancel()`` finds them)."""
        deadline = time.monotonic() + 10.0
        while not self._done.wait(0.05):
            now = time.monotonic()
            if (run.calling_back and self._resume is None) or (run.done() and run.reading_input):
                self._elapsed = now - self._t0
                self._end(forget=run.done())
                return
            if now >= deadline:
                return

    def add_done_callback(self, fn: Callable[[Run], Any]) -> None:
        """Call ``fn(run)`` once the run ended (from the pump thread; at once if it
        has). As ``concurrent.futures.Future``'s: an exception ``fn`` raises is
        logged, never raised to the caller."""
        with self._arrived:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        self._call_back(fn)

    def _call_back(self, fn: Callable[[Run], Any]) -> None:
        try:
            fn(self)
        except Exception:
            log.warning("mpmagic: a done callback of run %s failed", self.id, exc_info=True)

    # -- display ---------------------------------------------------------------
    def status_line(self) -> str:
        """The run's one line, as ``%pool runs`` and its repr show it: ``run 1:
        pmap simulate, 12/40 items, 2 failed, 310.2 ms, running`` (a call: ``run 2: call f, 1.2 s, failed``)."""
        from .status import run_line  # (one wording for the repr, %pool runs and runs())

        return run_line(self.info())

    def info(self) -> dict[str, Any]:
        """One row of ``%pool`` / ``runs()``: ``resumed`` counts the items (ranks) of
        ``done`` taken from the checkpoint store (``items_resumed``)."""
        return {"id": self.id, "what": self.what, "done": self.items_done, "total": self.items_total,
                "failed": self.items_failed, "elapsed": self.elapsed, "state": self.state,
                "unit": self._unit, "resumed": self.items_resumed}

    def __repr__(self) -> str:
        return f"<mpmagic.Run {self.status_line()}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    # -- the pump (its own thread) ---------------------------------------------
    def _start(self, backend: Any, workers: int | None) -> None:
        restore_interrupts()  # (as a blocking run's start: an interrupt of this run or its stream is its own)
        # The exit waits for this run from its submit on (the pool may be starting for it):
        # its pump, made here, is started once the run is the backend's (_waited_at_exit).
        pump = self._pump_thread = threading.Thread(target=self._pump, args=(backend,), daemon=True,
                                                    name=f"mpmagic-bg-{self.id}")
        with _lock:
            _pumping.add(self)
        try:
            self._engine_run = backend.submit(self._job, workers=workers, background=True)
            self._engine_run.label = f"run {self.id} ({self.what})"
        except BaseException as exc:  # e.g. more ranks than the machine can run: raised here, now
            begun = backend.run_of(self._job)  # (a Ctrl-C as submit handed the run over: it began)
            if begun is not None:
                begun.cancel_interrupted()
            with _lock:
                _pumping.discard(self)
            self._error, self._error_tb = exc, exc.__traceback__
            self._end()
            raise
        with _lock:
            _registry[self.id] = self
            _forget_old()
        try:
            pump.start()
        except RuntimeError as exc:
            if not exiting.no_thread_at_exit(exc):
                raise
            # CPython 3.12.0-3.12.2 start no thread once the interpreter exits (gh-113964):
            # a done-callback's run during the exit wait is pumped in this thread instead
            # (the call returns once it ended). Left unstarted, the exit waited for it for ever.
            self._pump_thread = threading.current_thread()
            self._pump(backend)

    def _pump(self, backend: Any) -> None:
        """Wait on the backend's run here, settle the handle, then call its done-callbacks."""
        try:
            self._pump_run()
        finally:
            with _lock:
                _pumping.discard(self)

    def _pump_run(self) -> None:
        """Wait on the backend's run, then settle the handle (results, error, report)."""
        run = self._engine_run
        resume = self._resume
        try:
            # A Dask run is driven inside its first wait (engine.DrivenRun), which
            # then returns only at its end; the Dask backend serializes such runs.
            while not run.wait(REDRAW_EVERY):
                sink = self._sink
                if sink.dirty or (sink.handle is not None and time.monotonic() - sink.drawn >= 1.0):
                    sink.draw()  # output or progress not drawn yet; else the elapsed time, once a second
            wall = time.monotonic() - self._t0
            self._settle()
            if self._cancelled:
                # No result, no error of its own: result() raises CancelledError. The job
                # holds only what came before the cancel (a checkpoint's ``value`` would
                # look for every missing item in it); what came is stored (settled above).
                return
            try:
                if run.error is not None:
                    raise run.error
                value = self._finish_result(wall)
                self._value = value if resume is None else resume.value(value)
            finally:
                self._report = self._call_report(wall, run.error)
            if resume is not None:
                self._report = resume.amend(self._report, wall)
        except BaseException as exc:  # kept for result(), shown in the live area at once
            if not self._cancelled and (past := self._read_past(failed=True)):  # (an iterator read ahead)
                add_note(exc, f"mpmagic: {past}")  # (as a blocking run's: api.pmap)
            if resume is not None:
                resume.failed(exc, self._report)
            # The frames above the user's (this loop, the finish callbacks) are
            # ours and mean nothing to the user; an error of our own keeps them.
            drop_our_frames(exc)
            self._error, self._error_tb = exc, exc.__traceback__
            if exiting.began() and exiting.no_thread_at_exit(exc):
                # (Dask's client on CPython 3.12.0-3.12.2: the exit's wait ended with the run
                # lost, rc 0, and nothing said so)
                exiting.say_not_finished(f"run {self.id} ({self.what})")
            if self._report is not None and self._report.kind == "pmap":
                # Failed however it failed (the pool stopped under it, not a task):
                # the line says "pmap failed after N of M items", never a plain timing.
                self._report.extra["error"] = True
        finally:
            self._settle()  # (if waiting itself raised)
            if not self._done.is_set():  # (else cancel() settled it while this thread was in the user's code)
                self._elapsed = time.monotonic() - self._t0
            self._end()

    def _call_report(self, wall: float, stopped: BaseException | None = None) -> Report:
        """The call's report, with the items that failed under ``errors="collect"`` (or in an ``imap`` loop).

        A map's report leaves that count to its caller (the blocking ``pmap``
        counts the Failed among its results); a background run has the job's
        count, kept as chunks arrived (a streaming ``imap`` keeps no results).
        Under ``errors="raise"`` the report says where the run failed instead,
        as the blocking one does. ``stopped``: the run's own error (the pool was
        stopped under it); a cell's report then says so and counts the ranks that
        finished, as the blocking ``parallel``'s (a map's: ``_pump`` marks it failed).
        """
        if stopped is not None and (self._job.kind == "cell" or isinstance(stopped, exiting.PoolStopped)):
            return self._call.report(wall, stopped_by=exiting.stop_cause(stopped))
        report = self._call.report(wall)
        # (an imap stream's too: its failed items, raised in its loop, did not stop it)
        if (getattr(self._call, "collect", False) or self._streamed) and not report.failed:
            report.failed = self._job.items_failed
        return report

    def _settle(self) -> None:
        """--checkpoint: every accepted chunk stored before the run shows as done (cancelled too)."""
        if self._resume is None:
            return
        try:
            self._resume.settle(self._warn)
        except Exception:  # a cache must never break the run
            log.warning("mpmagic: storing run %s's checkpoint failed", self.id, exc_info=True)

    def _warn(self, message: str) -> None:
        """A one-line warning of this run: into its live area (never the cell running now), and the log.

        Logged as a warning only where nothing shows it (a terminal: no live area,
        no stream's loop printing the run's output): an unconfigured logger prints
        warnings to stderr, and an ``imap`` loop's warning came out twice.
        """
        sink = self._sink
        log.log(logging.INFO if sink.relay is not None or sink.handle is not None else logging.WARNING, message)
        sink.out("stderr", message + "\n")

    def _end(self, forget: bool = True) -> None:
        """The run ended: settle the handle, its history row, its live area, then the callbacks.
        ``forget``: a cancelled run's job drops its work (not while a driven run's loop still uses it)."""
        with self._arrived:  # (cancel() sets _cancelled under it: one answer, read once here)
            if self._done.is_set():
                return  # (settled by cancel(): the pump was in the user's code, see _wait_cancelled)
            if self._cancelled:
                self._report = None  # a blocking run that is stopped makes no report either
            if self._cancelled and forget:
                self._job.forget_work()  # kept in the history: without what it held (a stream's buffer)
            self._done.set()
            self._arrived.notify_all()
            callbacks, self._callbacks = self._callbacks, []
        # The exit waits for a run the callbacks start (the Future's own, those given
        # here): this run counts as in flight until they were called (exiting.calling_back).
        with exiting.calling_back():
            self._settle_future()
            with _lock:  # the history keeps its row; the handle (and results) only while the user holds it
                if self.id in _registry:
                    _registry[self.id] = Finished(self)
                    _forget_old()
            if self._since is not None and (self.state == "failed" or self.items_failed):
                # (what %pdebug and --rerun-failed say of it, after a failed imap loop dropped its stream too)
                debugging.ended_in_background(self._since, Finished(self))
            self._sink.draw(final=True)
            for fn in callbacks:
                self._call_back(fn)

    def set_result(self, result: Any) -> None:
        """Not for user code: a run settles itself when it ends (a value set from
        outside was seen by ``cf.wait`` and ``asyncio.wrap_future`` while ``result()``
        later gave the run's own, and the run's end printed InvalidStateError)."""
        raise RuntimeError(f"run {self.id} is settled by its own run, not by set_result(): cancel() stops it")

    def set_exception(self, exception: BaseException | None) -> None:
        """Not for user code, as :meth:`set_result`."""
        raise RuntimeError(f"run {self.id} is settled by its own run, not by set_exception(): cancel() stops it")

    def _settle_future(self) -> None:
        """The end, told to the Future this handle is, through its public methods:
        they wake ``concurrent.futures.wait`` / ``as_completed`` waiting on it."""
        if self._cancelled:
            Future.cancel(self)
            Future.set_running_or_notify_cancel(self)
        elif self._error is not None:
            Future.set_exception(self, self._error)
        else:
            Future.set_result(self, self._value)

    def _on_chunk(self, start: int, results: list) -> None:
        """A chunk's results were accepted (manager thread): keep them for ``as_completed``."""
        if self._chunks is None:
            return
        with self._arrived:
            self._chunks.append((start, results))
            self._arrived.notify_all()


def _stop_driven(job: Any) -> None:
    """End a driven (Dask) map run from another thread: its loop stops once the job is finished."""
    if job.kind == "map" and job.failure is None:
        job.failure = CancelledError("cancelled")


class Finished:
    """What the history (``%pool runs``, ``runs()``) keeps of a finished run.

    Its row (id, what, counts, elapsed, state), taken when the run ended, and
    a weak reference to its handle: while the user holds the handle,
    ``runs()`` gives the handle itself; once the user dropped it, its results
    (shared-memory arrays among them) are freed and only this record is left.
    A history that kept the handles held the last ``KEEP_FINISHED`` runs'
    results: twenty 50 MB results pinned 1 GB of /dev/shm with no handle left.
    """

    def __init__(self, run: Run) -> None:
        self.id = run.id
        self.what = run.what
        self._info = run.info()
        self._line = run.status_line()
        self._ref = weakref.ref(run)

    def handle(self) -> Run | None:
        """The run's handle while someone holds it, else None."""
        return self._ref()

    @property
    def state(self) -> str:
        return str(self._info["state"])

    @property
    def items_done(self) -> int:
        return int(self._info["done"])

    @property
    def items_failed(self) -> int:
        return int(self._info["failed"])

    @property
    def items_total(self) -> int | None:
        return self._info["total"]

    @property
    def items_resumed(self) -> int:
        """Of ``items_done``, those taken from the checkpoint store (as :attr:`Run.items_resumed`)."""
        return int(self._info["resumed"])

    @property
    def elapsed(self) -> float:
        return float(self._info["elapsed"])

    def done(self) -> bool:
        """Always True: only ended runs are kept this way (as :meth:`Run.done`)."""
        return True

    def running(self) -> bool:
        """Always False: the run has ended (as :meth:`Run.running`)."""
        return False

    def cancelled(self) -> bool:
        """True if the run was cancelled (as :meth:`Run.cancelled`)."""
        return self.state == "cancelled"

    def wait(self, timeout: float | None = None) -> bool:
        """True at once: the run has ended (as :meth:`Run.wait`)."""
        return True

    def cancel(self) -> bool:
        """True if the run was cancelled, else False: it ended (as :meth:`Run.cancel` after the end)."""
        return self.cancelled()

    def result(self, timeout: float | None = None) -> NoReturn:
        """Raises UsageError: the results were freed with the dropped handle."""
        raise UsageError(f"run {self.id} ({self.what}) ended ({self.state}) and its handle was dropped: "
                         "its results were freed (keep the handle to read them later)")

    def info(self) -> dict[str, Any]:
        """The run's row, as :meth:`Run.info` gave it when the run ended."""
        return dict(self._info)

    def status_line(self) -> str:
        """The run's one line, as :meth:`Run.status_line` gave it when the run ended."""
        return self._line

    def __repr__(self) -> str:
        return f"<mpmagic.Run {self._line} (handle dropped, results freed)>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def _shown(entry: Run | Finished) -> Run | Finished:
    """A history entry as ``runs()`` gives it: the handle while it lives, else the finished record."""
    if isinstance(entry, Finished):
        return entry.handle() or entry
    return entry


def _forget_old() -> None:
    finished = [k for k, r in _registry.items() if r.done()]
    for k in finished[: max(0, len(finished) - KEEP_FINISHED)]:
        del _registry[k]


def _waited_at_exit() -> list[tuple[Run, None]]:
    """The background runs a script's exit waits for (``exiting``): those whose pump still
    runs (until their done-callbacks were called) or is about to (the run is being
    submitted), but an ``imap`` stream's, whose loop is gone (its run would wait for it
    for ever). A pump that is not alive (this process was forked from the one that ran
    it) is nobody's to wait for."""
    with _lock:
        pumping = list(_pumping)
    return [(run, None) for run in pumping if not run._streamed and run._pump_thread is not None
            and (run._pump_thread.ident is None or run._pump_thread.is_alive())]  # (None: being submitted)


exiting.count_runs(_waited_at_exit)


def runs() -> RunList:
    """Background and streamed runs in flight and recently finished, oldest first: their
    handles, or for a finished run whose handle was dropped, its record (no results)."""
    with _lock:
        return RunList(_shown(r) for r in _registry.values())


def get_run(run_id: int) -> Run | Finished:
    """The background run with this id (``%pool cancel ID``), or a UsageError naming the known ones."""
    with _lock:
        entry = _registry.get(run_id)
        known = ", ".join(map(str, _registry)) or "none"
    if entry is None:
        raise UsageError(f"no run with id {run_id} (runs known: {known}); see %pool runs")
    return _shown(entry)


def handle_of(engine_run: Any) -> Run | None:
    """The background handle whose backend run is ``engine_run``; None for a run
    nobody holds a handle of (a blocking call, in this or another thread)."""
    with _lock:
        for entry in _registry.values():
            run = _shown(entry)
            if isinstance(run, Run) and run._engine_run is engine_run:
                return run
    return None


class RunList(list):
    """``runs()``: a list of :class:`Run` (or :class:`Finished` records) shown as a table (``%pool runs``)."""

    def rows(self) -> list[dict[str, Any]]:
        return [r.info() for r in self]

    def __repr__(self) -> str:
        from .status import runs_lines

        return "\n".join(runs_lines(self.rows()))

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        from .status import runs_html

        return runs_html(self.rows())


# -- starting one ------------------------------------------------------------------
class Forward:
    """The job's output, progress and chunks, forwarded to its handle.

    The job is made before the handle (the handle needs it) and sends
    nothing before it is submitted, which is after ``run`` is set.
    ``then``: the caller's own ``on_chunk`` (the job's ``on_chunk``: it runs
    in the handle's own thread, which waits on the run); ``accepted`` keeps
    each chunk for ``as_completed`` as soon as it is accepted.
    """

    def __init__(self, then: Callable[[int, list], None] | None = None, after_then: bool = False) -> None:
        self._run: Callable[[], Run | None] = lambda: None  # (set by ``start``, before anything is sent)
        # ``after_then`` (a checkpointed run): as_completed gets each chunk only
        # after ``then`` (which snapshots it for the store) ran. Given at once,
        # a loop that changed its results in place changed what was stored.
        # (Its ``then`` stores every chunk, and calls the user's on_chunk only
        # until the run is cancelled: ``Resume.stop``.)
        self._then, self._after_then = then, after_then
        self.then = self._then_and_keep if after_then else None if then is None else self._unless_cancelled

    @property
    def run(self) -> Run | None:
        """The handle, while anything holds it (its pump does while the run goes on).

        Held weakly: the handle holds the job, whose output goes to these
        methods, and that cycle kept every finished run (its job, results and
        pickled function payload) alive until a full collection."""
        return self._run()

    @run.setter
    def run(self, run: Run) -> None:
        self._run = weakref.ref(run)

    def out(self, stream: str, text: str) -> None:
        run = self._run()
        if run is not None:
            run._sink.out(stream, text)

    def progress(self, n: int) -> None:
        run = self._run()
        if run is not None:
            run._sink.progress(n)

    def accepted(self, start: int, results: list) -> None:
        run = self._run()
        if not self._after_then and run is not None:
            run._on_chunk(start, results)

    def _unless_cancelled(self, start: int, results: list) -> None:
        """The user's on_chunk, for chunks that arrived before the run was cancelled:
        those still queued then are dropped (a slow on_chunk made ``cancel()`` wait
        until it had run for each: 5 s for 16 chunks)."""
        run = self._run()
        if self._then is not None and run is not None and not run._cancelled:
            self._then(start, results)

    def _then_and_keep(self, start: int, results: list) -> None:
        if self._then is not None:
            self._then(start, results)
        run = self._run()
        if run is not None:
            run._on_chunk(start, results)


def start(what: str, make_call: Callable[[Forward], Any], finish: Callable[[Any, Forward], Any],
          workers: int | None, *, live: bool | str | None = None, keep_chunks: bool = True,
          on_chunk: Callable[[int, list], None] | None = None, resume: Resume | None = None,
          errors: str | None = None, show_report: bool = True, one_call: bool = False,
          streamed: bool = False) -> Run:
    """Submit a job in the background and return its handle at once.

    ``make_call(forward)`` makes the call (``api.MapCall`` / ``api.CellCall``)
    whose job sends its output, progress and chunks to ``forward``;
    ``finish(call, forward)`` is the value ``result()`` returns once the run
    ended (or raises its error). ``api.pmap`` / ``api.parallel`` (``block=False``)
    and ``streaming.imap`` call this: this module never imports ``api``.
    ``resume``: a checkpointed run's store side (the job computes only what
    the store lacks; see :class:`Resume`). ``errors``: a map's errors option
    (where ``%pdebug`` and ``--rerun-failed`` say its failures are; None for a cell). ``show_report``:
    the live area shows the timing report once the run ended (``run.report()`` has it either way).
    ``one_call``: the run is ``mpmagic.call``'s one call (its lines count no items).
    ``streamed``: an ``imap`` stream's run, which the exit stops rather than waits for.
    """
    forward = Forward(on_chunk, after_then=resume is not None)
    call = make_call(forward)
    run = forward.run = Run(what, call, lambda wall: finish(call, forward), live=live, keep_chunks=keep_chunks,
                            resume=resume, show_report=show_report, one_call=one_call, streamed=streamed)
    # Its failures stay on its handle: the last blocking run's record (last_failures,
    # %pdebug, --rerun-failed, as last_report) stays as it was; only what those say
    # of a background run that failed since needs to know of it.
    run._since = debugging.started_in_background(run, errors)
    if resume is not None and keep_chunks:  # as_completed yields the stored results too (first: they are done)
        # (Their starts are input positions, the job's count among the computed
        # items only: as_completed, the one reader of _chunks, ignores starts.)
        resume.stored_segments(run._on_chunk)
    run._start(call.backend, workers)
    return run


class _NothingRan:
    """The job of a run whose items (ranks) all came from the checkpoint: nothing to compute."""

    items_done = items_failed = items_total = 0
    failure = None

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def forget_work(self) -> None:
        """Nothing ran, nothing to drop."""

    def input_changed(self) -> str | None:
        """Nothing read its input while it ran (``jobs.MapJob.input_changed``)."""
        return None


class _NoCall:
    def __init__(self, kind: str) -> None:
        self.job = _NothingRan(kind)


def finished(what: str, kind: str, value: Any, report: Report, resume: Resume, *,
             live: bool | str | None = None, keep_chunks: bool = True, show_report: bool = True) -> Run:
    """The handle of a background run that had nothing to compute (``--bg --checkpoint``
    with every item stored): done at once, with its value and report."""
    run: Run[Any] = Run(what, _NoCall(kind), lambda wall: value, live=live, keep_chunks=keep_chunks, resume=resume,
                        show_report=show_report)
    if keep_chunks:
        resume.stored_segments(run._on_chunk)
    run._value, run._report = value, report
    run._elapsed = time.monotonic() - run._t0
    with _lock:
        _registry[run.id] = run
        _forget_old()
    run._end()
    return run


@overload
def as_completed(run: Run[list[_T]], timeout: float | None = None) -> Iterator[_T]: ...


@overload
def as_completed(run: Iterable[Run[Any]], timeout: float | None = None) -> Iterator[Run[Any]]: ...


def as_completed(run: Run[list[_T]] | Iterable[Run[Any]], timeout: float | None = None) -> Iterator[Any]:
    """The results of a background map as their chunks arrive (completion order).

    Raises the run's error (or CancelledError) after the results that came
    before it; a map with ``errors="raise"`` stopped there, as a blocking
    ``pmap`` does, so the next ``next()`` raises ``MPMagicError`` saying so
    (not a StopIteration a loop that logs errors and goes on would take for the
    end), and after a cancel ``CancelledError`` again, saying how many results
    came; the ``next()`` after that ends the loop. ``timeout``: seconds to wait
    for the next chunk (TimeoutError, also a ``multiprocessing.TimeoutError``; a
    later ``next()`` waits again, as after an interrupt).
    Given several handles (any iterable of runs, an empty one included, as
    ``concurrent.futures.as_completed`` takes futures), yields the handles as
    their runs end, as that function does (``timeout``: for all of them): a
    port's ``for run in as_completed(runs): run.result()`` means what it meant.
    """
    __tracebackhide__ = True
    timeout = wait_timeout(timeout)  # (checked at the call: '1' failed inside threading at the first wait)
    if isinstance(run, Run):
        if run._chunks is None:  # (a %%parallel --bg handle: its ranks send no chunks)
            raise UsageError(f"{_AS_COMPLETED_TAKES}, not the handle of a parallel cell")
        return _completed(run, run._chunks, timeout)  # (a generator of its own: a wrong argument is refused at the call)
    if isinstance(run, ResultStream) or not isinstance(run, Iterable):  # (an imap stream yields results: never consumed here)
        raise UsageError(f"{_AS_COMPLETED_TAKES}, not {type(run).__name__}")
    handles = list(run)  # (a generator of handles too: concurrent.futures takes it whole as well)
    for i, handle in enumerate(handles):
        if not isinstance(handle, Run):
            raise UsageError(f"{_AS_COMPLETED_TAKES}; item {i} of the {type(run).__name__} is "
                             f"{type(handle).__name__}, not a run handle")
    return _runs_as_completed(handles, timeout)


def _runs_as_completed(handles: list[Run[Any]], timeout: float | None) -> Iterator[Run[Any]]:
    """``concurrent.futures.as_completed`` over run handles, but for its time-out:
    ours, in one line, caught by ``except TimeoutError`` on Python 3.10 too (the
    stdlib's was its own class there, with its frame and "1 (of 1) futures unfinished")."""
    __tracebackhide__ = True
    ended = futures_as_completed(handles, timeout)
    while True:
        try:
            handle = next(ended)
        except StopIteration:
            return
        except (TimeoutError, concurrent.futures.TimeoutError):
            going = [f"run {h.id}" for h in handles if not h.done()]
            raise one_line(_timeout(f"{', '.join(going)} did not end within {timeout:g} s; "
                                    f"{'they go' if len(going) > 1 else 'it goes'} on")) from None
        yield cast(Run[Any], handle)  # (one of ``handles``)


_AS_COMPLETED_TAKES = ("as_completed takes the handle of a background map (pmap(..., block=False) or %pmap --bg), "
                       "or an iterable of run handles")


class ResultStream:
    """Base of ``imap``'s stream (an iterator of results, not of handles): ``as_completed``
    refuses one rather than consume it looking for handles."""

    __slots__ = ()


class _Arrivals:
    """Where an :func:`as_completed` loop over a run's arrived chunks stands, across its parts."""

    __slots__ = ("run", "chunks", "timeout", "seen", "given", "over", "stopped")

    def __init__(self, run: Run[Any], chunks: list[tuple[int, list[Any]]], timeout: float | None) -> None:
        self.run, self.chunks, self.timeout = run, chunks, timeout
        self.seen = 0  # chunks yielded
        self.given = 0  # results yielded
        self.over = False  # nothing more comes: the loop ends at the next next()
        self.stopped = False  # the run's error was raised: the next next() says the run stopped there


def _completed(run: Run[list[_T]], chunks: list[tuple[int, list[Any]]], timeout: float | None) -> Iterator[_T]:
    """:func:`as_completed`'s loop over ``run``'s arrived ``chunks`` (its ``_chunks``).

    A chain of parts (``itertools.chain``: no Python call per result), each a
    generator that ends where it raises: a time-out, an interrupt or the run's
    error ends the part, not the loop, so a loop that catches it and calls
    ``next()`` again goes on (waits again; after the run's error, hears why
    nothing more comes) instead of ending as if every result had come."""
    return itertools.chain.from_iterable(_completed_parts(_Arrivals(run, chunks, timeout)))


def _completed_parts(state: _Arrivals) -> Iterator[Iterator[Any]]:
    while not state.over:
        if state.stopped:
            state.over = True
            yield _stopped_note(state)
            return
        yield _completed_part(state)


def _completed_part(state: _Arrivals) -> Iterator[Any]:
    __tracebackhide__ = True
    run, chunks, timeout = state.run, state.chunks, state.timeout
    while True:
        with run._arrived:
            while state.seen == len(chunks) and not run.done():
                try:
                    arrived = wait_in_slices(run._arrived.wait, timeout)
                except KeyboardInterrupt:  # the loop stops here, the run goes on (say so)
                    raise run._interrupted("as_completed") from None
                if not arrived:
                    raise one_line(_timeout(f"no result of run {run.id} within {timeout:g} s"))
            fresh = chunks[state.seen:]
            ended = run.done()
        state.seen += len(fresh)
        for _, results in fresh:
            state.given += len(results)
            yield from results
        if ended and state.seen == len(chunks):
            break
    state.over = True
    if run._cancelled:  # (the next next() says nothing more comes, as after an error)
        state.over, state.stopped = False, True
        past = run._read_past(failed=False, got=state.given)  # (an iterator read past the loop's results)
        raise one_line(CancelledError(  # (imap's words: "its one item will not come", never "0 of 1 results")
            f"run {run.id} ({run.what}) was cancelled: {cancelled_words(state.given, run.items_total, False)}"
            f"{f'; {past}' if past else ''}"))
    if run._error is not None:
        state.over, state.stopped = False, True
        run._raise_error()


def _stopped_note(state: _Arrivals) -> Iterator[Any]:
    """The one ``next()`` after the run's error or its cancel: the run stopped there, so the
    items that gave nothing will not come (an error, not a StopIteration a loop that logs
    errors and goes on would take for every result having come). After a cancel, a
    ``CancelledError`` again, as a cancelled future's ``result()`` raises it each time."""
    __tracebackhide__ = True
    run = state.run
    got = stopped_words(state.given, run.items_total)  # (imap's words, right for none, one and many items)
    if run._cancelled:
        raise one_line(CancelledError(f"run {run.id} ({run.what}) was cancelled (the CancelledError raised before): {got}"))
    error = run._error
    raise one_line(MPMagicError(
        f"run {run.id} ({run.what}) stopped at the {type(error).__name__} raised before (a map with errors='raise' "
        f"stops at its first error, as a blocking pmap does): {got}; with errors='collect' a run goes on, each "
        "failed item an mpmagic.Failed in its place"))
    yield  # (a generator: the chain iterates it)


__all__ = ["Finished", "Forward", "ResultStream", "Resume", "Run", "RunList", "as_completed", "check_options", "finished",
           "get_run", "interrupted", "runs", "start"]
