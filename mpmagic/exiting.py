"""What happens to the runs in flight when the interpreter exits.

A script that ends with runs still going (``call``/``submit`` handles,
``pmap(block=False)``, a daemon thread's ``pmap``) gets them finished before
it exits, as ``concurrent.futures.ProcessPoolExecutor`` does (its exit hook,
``_python_exit``, joins the executor's manager thread, which runs every
pending work item first). ``call`` stands in for ``Executor.submit``
(docs/migrating.md): the exit hook stopped the pool at once and the
submitted work was lost, the tasks' files never written, the done-callbacks
told the runs had failed, and nothing said so.

The exit waits until no run is in flight, and past :data:`NOTICE_AFTER`
one stderr line says what it waits for; Ctrl-C ends the wait and the runs
are stopped at once. It waits twice, where Python gives a hook:

1. Before the non-daemon threads are joined (``threading._register_atexit``,
   where ``concurrent.futures`` waits; ``compat.register_before_threads_join``): for the runs nobody waits on (the
   background handles) and daemon threads' runs. The threads Python joins
   next wait on their own runs. This wait must come first for Dask: Python's
   exit then stops every ``ThreadPoolExecutor``, Dask's scheduler's among
   them, and a ``LocalCluster`` in this process takes no task after that.
   ``backends.dask`` registers it again after ``distributed`` registered its
   executors' hook, so that it runs before that one.
2. In the backends' exit hooks (``atexit``: ``backends.local._at_exit``,
   ``backends.dask._at_exit``), :func:`wait_for_runs`: for what the joined
   threads left in flight; then the pools are stopped.

Neither waits (the pools are stopped as before) when the user asked the
process to go: a Jupyter/IPython kernel's shutdown or restart, an IPython
shell's ``exit`` (``exit_now``, :func:`watch_shell`), or a script ended
by Ctrl-C.

A kernel's shutdown may run no exit hook at all: :func:`watch_shell` frees
what mpmagic made as soon as the shell is told to exit. Whatever makes
something that must be freed then (every pool, ``pool._made``; a helper made
without a pool, ``shared``; ``%load_ext``) calls it: one watcher per shell.

Both lines count the same thing: every mpmagic run in flight, in any thread
(those a thread Python joins next waits on too: the exit waits for them as
well, through that thread).

A run started by a done-callback of a run the exit waits for (the callbacks
run in that run's daemon thread, and the run counts as in flight until they
were called) is waited for too (:func:`calling_back`): it is part of that work,
as serial code's callback would have run it, and the wait never lapses in
between. ``concurrent.futures`` refuses it ("cannot schedule new futures after
shutdown", logged with a traceback), but its callbacks can only refuse: its
executor shuts down before the wait; here the wait is still going on. After a
Ctrl-C stopped the runs, such a run is refused with one line.

Otherwise, once the exit began, a daemon thread's new run is refused, and such a
thread's mpmagic call ends it silently (a bare ``SystemExit``, which
``threading`` prints nothing for), as serial code's daemon thread just ends
when the program does: a run it starts then (:func:`refuse_late_run`; the
exit waits for the runs in flight when it began, not for a daemon thread's
endless loop, and ``concurrent.futures`` refuses such work too), and a wait
of its that the exit's stop ended (:func:`raised`). It printed a traceback
of mpmagic's internals about a stop the user never made.

This module imports no IPython (it looks at ``sys.modules``) and nothing of
the backends: they hand it what is in flight (:func:`count_runs`).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from . import compat
from .errors import MPMagicError

#: Seconds the exit waits for runs in flight before one line says what it waits for.
NOTICE_AFTER = 1.0
#: Seconds between the exit's looks at what is still in flight.
_POLL = 0.02

#: What is in flight, from each backend: pairs of a run (or a thread submitting one) and
#: the thread waiting on it (None: nobody does, a background handle's pump aside).
_sources: list[Callable[[], Iterable[tuple[Any, threading.Thread | None]]]] = []
#: Each backend's stop of all its pools, for a Ctrl-C during the first wait (see on_stop).
_stoppers: list[Callable[[], None]] = []
#: What frees each kind of thing mpmagic made (the pools, the helpers) when a shell is told to exit.
_releasers: list[Callable[[], None]] = []
_began = False  # the exit began (a daemon thread's new run is refused)
_joined_wait_done = False  # the second wait (atexit) happened: wait_for_runs answers at once
_stop_now = False  # a Ctrl-C (during a wait, or the one that ended the script): stop the runs at once
_shell_exiting = False  # an IPython shell was told to exit (exit_now): a kernel's shutdown, ``exit``
_said = False  # the line saying what the exit waits for was printed
_waits_over = False  # the second wait ended: the pools are being stopped
_calling_back = threading.local()  # .depth: this thread is calling a run's done-callbacks


class PoolStopped(MPMagicError):
    """A run the pool was stopped under; ``by``: what stopped it, in the user's words
    (``%pool stop``, ``stop_pool()``; None: nothing said), for its report's line.
    To the user it is the MPMagicError the docs name: the class only carries ``by``."""

    by: str | None = None

    def _render_traceback_(self) -> list[str]:
        return [f"MPMagicError: {self}"] + list(getattr(self, "__notes__", ()))


class StoppedAtExit(PoolStopped):
    """A run the exit's stop ended (the pool was stopped at exit while it was in flight)."""

    by = "the exit"


def _thread_ends() -> SystemExit:
    """What ends a thread other than the main one whose mpmagic call the exit cut short,
    silently: ``threading.excepthook`` prints nothing for a ``SystemExit`` (its own
    class only, not a subclass), as serial code's daemon thread just ends when the
    program does."""
    return SystemExit()


def count_runs(source: Callable[[], Iterable[tuple[Any, threading.Thread | None]]]) -> None:
    """Have the exit wait for what ``source()`` gives: ``(run, waiter)`` for the runs of one
    kind now in flight, ``waiter`` the thread that waits on it (None for a background run:
    each source gives distinct runs, a background run being its handle's, not the pool's)."""
    _sources.append(source)


def on_stop(stop: Callable[[], None]) -> None:
    """``stop()`` stops every pool of one backend at once: what a Ctrl-C during the
    first wait does (the threads Python joins next would wait on their runs, so the
    pools stop then, not in the exit hooks after them: ``raised`` ends those threads)."""
    _stoppers.append(stop)


def ipython_shell() -> Any | None:
    """The running IPython shell, if any (without importing IPython)."""
    ipython = sys.modules.get("IPython")
    return None if ipython is None else ipython.get_ipython()


def kill_on_sigterm(kill: Callable[[], None]) -> None:
    """On SIGTERM, call ``kill()`` (SIGKILL the pool's workers), then end as the
    handler that was there would have (the default: die of the SIGTERM).

    Jupyter SIGTERMs a kernel that did not answer its shutdown request in time,
    and Python's default action ends it at once, no exit hook run. A fork or
    spawn worker notices its notebook's death from a thread, which cannot run
    while its task holds the GIL in C code: such workers ran on for the rest of
    the task (for ever, reparented to init). ``kill`` must only send signals:
    it runs in the middle of whatever the main thread was doing. A handler the
    notebook installed before is called instead, and ``kill()`` only if it raises
    SystemExit: a handler that lets the process go on (a graceful stop's flag)
    keeps its workers, as it keeps everything else. Installed from
    the main thread only (``%load_ext``), once, and not over a handler that was
    not installed from Python (it could not be put back) or one that ignores it.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        return
    if previous is None or previous == signal.SIG_IGN or getattr(previous, "mpmagic_kills", False):
        return

    def killed() -> None:
        try:
            kill()
        except Exception:  # never in the way of the process's end
            logging.getLogger("mpmagic").debug("killing the workers on SIGTERM failed", exc_info=True)

    def on_sigterm(signum: int, frame: Any) -> None:
        if callable(previous):  # the notebook's own handler decides: a graceful stop's flag goes on running
            try:
                previous(signum, frame)
            except SystemExit:  # (it ends the process: its workers with it)
                killed()
                raise
            return  # (the process goes on, and so do its workers; this handler stays for the next SIGTERM)
        killed()
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signum)  # SIG_DFL: die of it, as without us

    on_sigterm.mpmagic_kills = True  # type: ignore[attr-defined]
    on_sigterm.mpmagic_previous = previous  # type: ignore[attr-defined]  # (a fork worker's: forget_sigterm_handler)
    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:
        pass


def forget_sigterm_handler() -> None:
    """In a worker forked from a notebook that installed :func:`kill_on_sigterm`'s
    handler: put back the one that was there before it (the default, mostly). The
    notebook's handler has nothing to kill here, and a Python handler cannot run while
    a task holds the GIL, where the default action ends the process at once: the pool's
    terminate() of a busy fork worker waited for its task (a stop ~1 s longer)."""
    handler = signal.getsignal(signal.SIGTERM)
    if getattr(handler, "mpmagic_kills", False):
        try:
            signal.signal(signal.SIGTERM, handler.mpmagic_previous)  # type: ignore[union-attr]
        except (ValueError, TypeError, AttributeError):  # (not the main thread; an odd handler)
            pass


def watch_shell(release: Callable[[], None], shell: Any | None = None) -> None:
    """When ``shell`` (None: the running IPython shell, if any) is told to exit,
    call ``release()`` to free what it stands for, then stop multiprocessing's
    helper processes (:func:`_at_shell_exit`). Each ``release`` is called once,
    however often it is given (the last given first); the shell is watched once.

    Called by whatever makes something a kernel's shutdown must free: every
    pool (``pool._made``, whichever call made it), a helper made without a pool
    (``shared.base``), ``%load_ext``. ``mpmagic.start_pool(2)``, ``use_local``,
    ``use_dask`` or ``mpmagic.Queue()`` as a kernel's first mpmagic call, without
    ``%load_ext``, made theirs unwatched: Jupyter then SIGTERMed the kernel
    ~2.6 s into its shutdown, before any exit hook ran.
    """
    if release not in _releasers:
        _releasers.append(release)
    if shell is None:
        shell = ipython_shell()
    if shell is not None:
        shell.observe(_at_shell_exit, names="exit_now")  # (traitlets keeps one registration per handler)


def _at_shell_exit(change: Any) -> None:
    """The shell is about to exit (``exit_now``: a kernel's shutdown request, ``exit``):
    free what mpmagic made now (the ``release`` functions :func:`watch_shell` was
    given: the pools, their shared memory, the helpers).

    ipykernel then stops its child processes and waits for them to exit.
    multiprocessing's resource tracker ignores SIGTERM, and its fork server,
    ended by SIGTERM, stays a zombie: both are stopped here too
    (``compat.stop_helper_processes``). Otherwise Jupyter killed the kernel
    ~2.5 s later, and no exit hook ran (the pool's segments stayed in /dev/shm
    until another notebook's pool swept them). While ``exit_now`` is true the
    user asked the process to go: its exit then waits for no run in flight,
    where a script's exit waits for them.
    """
    global _shell_exiting
    _shell_exiting = bool(change["new"])
    if not _shell_exiting:
        return
    # Last given, first called, as atexit does (a pool made after a pool-less helper stops
    # before that helper is freed); each one whatever another did; the helper processes last.
    for release in [*reversed(_releasers), compat.stop_helper_processes]:
        try:
            release()
        except Exception:  # never in the way of the shutdown
            logging.getLogger("mpmagic").warning("mpmagic: cleaning up at shutdown failed", exc_info=True)


def began() -> bool:
    """Has the exit begun (a daemon thread's new run is refused)?"""
    return _began


def in_flight(joined_too: bool = True) -> list[Any]:
    """The runs the exit would wait for now. ``joined_too=False``: not those a live
    non-daemon thread waits on (Python joins it next; its own wait ends them)."""
    runs: list[Any] = []
    for source in list(_sources):
        try:
            pairs = list(source())
        except Exception:  # (a source must never hang the exit: what it holds is stopped anyway)
            continue
        runs.extend(run for run, waiter in pairs
                    if joined_too or waiter is None or waiter.daemon or not waiter.is_alive())
    return runs


def _runs(n: int) -> str:
    return f"{n} run{'s' if n != 1 else ''}"


def asked_to_go() -> str | None:
    """Why the exit must not wait (the user asked the process to go), or None: a
    Jupyter/IPython kernel (its shutdown or restart: Jupyter kills a kernel that
    takes long), an IPython shell told to exit, or a script ended by Ctrl-C."""
    if _shell_exiting:
        return "the shell was told to exit"
    app = sys.modules.get("ipykernel.kernelapp")
    if app is not None and getattr(app, "IPKernelApp", None) is not None and app.IPKernelApp.initialized():
        return "a kernel exits"
    shell = ipython_shell()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        return "a kernel exits"
    # The main module's uncaught error, as Python printed it (3.12: also sys.last_exc).
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if isinstance(last, KeyboardInterrupt):
        return "Ctrl-C ended the script"
    return None


def _wait(joined_too: bool) -> None:
    """Wait until nothing is in flight (``in_flight``), unless the user asked the
    process to go; a Ctrl-C ends the wait and sets ``_stop_now``."""
    global _stop_now, _said
    if _stop_now:
        return
    why = asked_to_go()
    if why is not None:
        _stop_now = why.startswith("Ctrl-C")  # (its busy workers get no time to finish)
        return
    t0 = time.monotonic()
    try:
        while runs := in_flight(joined_too):
            if not _said and time.monotonic() - t0 >= NOTICE_AFTER:
                _said = True
                # (every run in flight, as the Ctrl-C line counts: not only ``runs``, which leaves out
                # those a thread Python joins next waits on; the exit waits for them too)
                waited = len(in_flight()) or len(runs)
                _say(f"mpmagic: waiting for {_runs(waited)} in flight to finish before exit; Ctrl-C stops them")
            time.sleep(_POLL)
    except KeyboardInterrupt:
        _stop_now = True
        _say(f"mpmagic: Ctrl-C: stopping the {_runs(len(in_flight()))} in flight")


def _wait_before_threads_join() -> None:
    """The first wait (``threading._register_atexit``): for the background runs and
    daemon threads' runs, while Python's thread pools (Dask's scheduler's) still run.
    Once only; never raises (an error here would skip the other hooks of that phase)."""
    global _began
    if _began:
        return
    _began = True
    try:
        stopped = _stop_now
        _wait(joined_too=False)
        if _stop_now and not stopped and asked_to_go() is None:  # a Ctrl-C during the wait: stop them now
            with sigint_dropped():
                for stop in list(_stoppers):
                    stop()
    except BaseException:  # (nothing of ours may stop the exit)
        pass


def wait_before_threads_join() -> None:
    """Have the first wait run before the hooks of this phase registered so far
    (``compat.register_before_threads_join``: last registered, first run): ``backends.dask``
    calls this once ``distributed`` registered its thread pools' hook. (Without it, the
    second wait, at ``atexit``, is all.)"""
    compat.register_before_threads_join(_wait_before_threads_join)


def wait_for_runs() -> bool:
    """The second wait, in the backends' exit hooks (``atexit``): once the non-daemon
    threads were joined, for whatever they and the daemon threads left in flight, unless
    the user asked the process to go (:func:`asked_to_go`).

    Returns True when the runs in flight are to be stopped at once (a Ctrl-C during
    a wait, or a script ended by Ctrl-C: busy workers get no time to finish). Waits
    once: the exit hooks after the first get its answer. Runs that never end (an
    endless input) keep the exit waiting, as ``concurrent.futures`` does; the line
    printed past :data:`NOTICE_AFTER` says Ctrl-C stops them.
    """
    global _began, _joined_wait_done, _waits_over
    if not _joined_wait_done:
        _began = _joined_wait_done = True
        _wait(joined_too=True)
        _waits_over = True
    return _stop_now


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except Exception:  # (no stderr left: nothing to tell)
        pass


@contextmanager
def calling_back() -> Iterator[None]:
    """This thread calls the done-callbacks of a run that ended (``background.Run._end``):
    a run they start while the exit still waits is waited for too (:func:`refuse_late_run`)."""
    _calling_back.depth = getattr(_calling_back, "depth", 0) + 1
    try:
        yield
    finally:
        _calling_back.depth -= 1


def refuse_late_run() -> None:
    """A run a daemon thread starts once the exit began: the thread ends silently, as it
    would with serial code. The exit waits for the runs in flight when it began, not
    for a daemon thread's loop (``concurrent.futures`` refuses such work too); a run
    started after the exit's stop would start the workers again. (A non-daemon thread
    runs on: Python waits for it, and so for its runs.)

    But a run a done-callback starts (:func:`calling_back`) while the exit still
    waits goes ahead: the run whose callback it is counts as in flight until its
    callbacks were called, and the new one from its submit on, so the wait goes on
    for it. Once the runs were stopped (Ctrl-C) or the waits are over, it is refused
    with one line, never silently."""
    if not _began or not threading.current_thread().daemon:
        return
    if getattr(_calling_back, "depth", 0):
        if not _stop_now and not _waits_over:
            return
        _say("mpmagic: a run started by a done-callback was not run: "
             + ("Ctrl-C stopped the runs at exit" if _stop_now else "the pools were stopping at exit"))
    raise _thread_ends()


#: What CPython says when a thread is started while the interpreter exits (3.12.0-3.12.2
#: refuse every new thread then, gh-113964; 3.12.3 relaxed it).
_NO_THREAD = "can't create new thread at interpreter shutdown"


def no_thread_at_exit(error: BaseException | None) -> bool:
    """Did ``error`` (or one it was raised from) come from a thread Python refused to
    start because the interpreter was exiting (CPython 3.12.0-3.12.2, gh-113964)?"""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _NO_THREAD in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def say_not_finished(what: str) -> None:
    """One line for a run the exit meant to wait for but that failed because Python
    refused to start a thread while exiting (Dask's client starts them as results
    come): otherwise the script ended with rc 0 and nothing said the work was lost."""
    version = ".".join(map(str, sys.version_info[:3]))
    _say(f"mpmagic: {what} could not finish: Python {version} refused to start a thread while "
         f"exiting (CPython 3.12.0-3.12.2 do; 3.12.3+ does not); upgrade Python, or wait for the "
         f"run (run.result()) before the script ends")


#: What stops the pools when an IPython shell is told to exit (``pool.at_shell_exit``), as
#: a run's error names it.
SHELL_EXIT = "the shell's exit"


def stopped_error(by: str | None = None) -> MPMagicError:
    """What a run gets when the pool stops under it: at exit, a :class:`StoppedAtExit`.

    ``by``: what stopped it, in the user's words (``%pool dask``, ``stop_pool()``: the
    backend's ``stopped_by``). Without it the line left the user guessing whether the
    run, a worker or something they did ended it. No "run it again" when the shell's
    exit stopped it (:data:`SHELL_EXIT`): there is no "again" in a shell that is ending."""
    if _began:
        return StoppedAtExit("the pool was stopped at exit while this run was in flight")
    if by is None:
        return PoolStopped("the pool was stopped while this run was in flight: run it again")
    again = "" if by == SHELL_EXIT else ": run it again"
    error = PoolStopped(f"the pool was stopped by {by} while this run was in flight{again}")
    error.by = by
    return error


def stop_cause(error: BaseException) -> str:
    """What stopped a run, for its report's line ("pmap stopped by %pool stop after 4 of 20
    items finished"): the pool's stop as the user made it, or the error's class name (the
    run's own ``on_chunk`` raised). The line said "stopped by MPMagicError" for a pool stop,
    right above the error that named ``%pool stop``."""
    if isinstance(error, PoolStopped):
        return error.by or "the pool's stop"
    return type(error).__name__


def raised(error: BaseException) -> BaseException:
    """What a wait on a run raises for its ``error``: in a thread other than the main one,
    a run the exit's stop ended ends the thread silently (a bare ``SystemExit``)."""
    if isinstance(error, StoppedAtExit) and threading.current_thread() is not threading.main_thread():
        return _thread_ends()
    return error


@contextmanager
def sigint_dropped() -> Iterator[None]:
    """The exit's stop is bounded (seconds at most): a second Ctrl-C during it is
    dropped, not raised in the middle of it (a traceback "Exception ignored in
    atexit callback", the rest of the stop undone). A no-op outside the main thread."""
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: None)
    except (ValueError, TypeError):  # not the main thread (or no handler to swap)
        yield
        return
    try:
        yield
    finally:
        try:
            signal.signal(signal.SIGINT, old)
        except (ValueError, TypeError):
            pass


wait_before_threads_join()
