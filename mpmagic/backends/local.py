"""Worker processes on this machine, and the manager thread that drives them.

Why not ``multiprocessing.Pool``: with spawn or forkserver it cannot run a
notebook function, it hangs when a worker dies mid-task, it cannot bound a
task's time, and it cannot run N cell copies at once on distinct workers. So
each worker gets one duplex pipe, and one manager thread per pool waits on
every pipe, every worker's process sentinel and a wakeup pipe together (an
epoll selector, as ``concurrent.futures.process`` and loky's executor
manager wait on theirs): a result, a line of output, a worker's death, a new
run or a cancel wakes it, so a dead worker is an error with its exit status,
never a hang. Pipes are touched only under the pool's lock (by the manager,
or by ``submit`` handing out a new run's first units itself, which saves a
thread wake-up per call), and reads and sends never block (``pipes.py``), so
any number of runs, from any threads, share the workers (a free worker goes
to the run holding the fewest).
``submit`` returns a run (``engine.Run``); the thread that waits on it
prints its output. Ctrl-C lands in that wait (the notebook's main thread),
which cancels that run only: the manager stops the workers busy with it and
starts replacements; workers ignore SIGINT.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401  (before our exit hook: see _at_exit)
import os
import selectors
import signal
import socket
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from .. import (
    compat,
    context,
    exiting,
    payload,
    payload_cache,
    posixshm,
    shm,
    threads,
    warmup,
    worker,
    worker_setup,
)
from ..checks import check_whole, size_refused, whole
from ..cpus import available_cpus
from ..engine import Run, sigint_deferred
from ..errors import MPMagicError, UsageError, describe_exitcode, file_limit, out_of_files
from ..fmt import fmt_bytes
from ..proclimits import NoRoomForTasks, no_thread, out_of_tasks, room_for_tasks, task_limit_named
from ..protocol import (
    Collected,
    Done,
    Error,
    Forget,
    Func,
    Missing,
    NoFiles,
    Out,
    Outs,
    ProtocolError,
    Ready,
    SetupDone,
    Stop,
    Unmap,
    Unpicklable,
    pack,
    pack_parts,
    unpack,
)
from .base import Job
from .held_lines import HeldLines
from .pipes import Receiver, Sender

log = logging.getLogger("mpmagic")

START_METHODS = ("forkserver", "spawn", "fork")


def default_start_method() -> str:
    """forkserver on Linux (spawn-safe and fast to start), spawn elsewhere."""
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


def max_workers() -> int:
    """The most processes one pool may start: 8 per usable CPU, at least 64.

    A typo such as ``-n 100000`` must be a clear error, not a machine that
    grinds to a halt starting processes.
    """
    return max(64, 8 * available_cpus())


# Socket buffer for each direction of a worker's pipe. With the default
# (~200 kB) a chunk of 25,000 small items already fills it, so the notebook
# blocks in send() until the worker is scheduled to read, instead of packing
# the next chunk; likewise a worker blocks on its results. Capped by the
# kernel (net.core.wmem_max / rmem_max); failures leave the default.
_SOCKET_BUFFER = 1 << 20


def _widen(conn: Any) -> None:
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except OSError:
        return
    with sock:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
            except OSError:  # capped by the kernel: the default buffer still works, a bit slower
                log.debug("mpmagic: could not widen a worker socket buffer", exc_info=True)


#: A pool size of -1: one worker per usable CPU, as joblib's ``n_jobs=-1`` (and ``%config MPMagic.workers = -1``).
PER_CPU = -1


def pool_size(n: object) -> int:
    """``n`` as a pool's size, a plain int: -1 (``PER_CPU``) is one worker per usable CPU
    now; any other is checked as it is (a whole number from 1 to the machine's limit;
    a numpy integer is the int it is)."""
    return _check_size(available_cpus() if whole(n) == PER_CPU else n)


def _check_size(n: object, what: str = "workers") -> int:
    """``n`` as a plain int if it is a number of processes this machine can run, else a UsageError."""
    hint = " or -1 (one per usable CPU)" if what == "workers" else ""
    size = check_whole(what, n, 1, f"a whole number of at least 1{hint}")
    if size > max_workers():
        raise size_refused("{} is more processes than this machine can run at once "
                           f"(at most {max_workers()} with {available_cpus()} CPUs)", size, keyword=what)
    return size


def check_rank_count(size: int) -> None:
    """A UsageError for a cell of ``size`` ranks (a whole number of at least 1) more than
    this machine runs at once: one worker process per rank, ``max_workers()`` at most.

    Asked before the run builds anything per rank (``pool.check_run_ranks``): the
    check came only at submit, after ``CellJob`` had made one unit per rank, so
    ``parallel(code, workers=10**8)`` failed after 16 s with a SystemError from
    ``deque`` and ``-n 99999999999999999999999999999`` grew to 23 GB.
    """
    cap = max_workers()
    if size > cap:
        raise size_refused("{} is more ranks than this machine can run at once "
                           f"(at most {cap} with {available_cpus()} CPUs)", size)


def start_method_refused(method: object) -> str | None:
    """Why ``method`` is not a start method this platform has, or None when it is one.

    One check and one wording for ``start_pool(start_method=)``, ``%pool
    --start-method`` and ``%config MPMagic.start_method``: the setting took
    ``'FORK'`` (its enum ignored case) where the other two refused it.
    """
    have = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
    if isinstance(method, str) and method in have:
        return None
    return f"unknown start method {method!r}: choose one of {', '.join(have)}"


def check_start_method(method: object) -> str:
    """``method``, or the platform's default for None; a ``UsageError`` for a method
    this platform has not (checked before a pool is stopped or made)."""
    method = method or default_start_method()
    why = start_method_refused(method)
    if why is not None:
        raise UsageError(why)
    return method  # type: ignore[return-value]  # (checked: one of the start methods)


#: What ``max_tasks_per_child`` takes, as every refusal says it.
TASKS_PER_CHILD_TAKES = "a whole number of at least 1 (the items a worker runs before it is replaced), or 0 for no limit"


def tasks_per_child_refused(value: object) -> str | None:
    """Why ``value`` is no ``max_tasks_per_child`` (``must be ..., not -1``), or None when it is one.

    The one check of ``start_pool``, ``restart_with``, ``use_local`` and ``%pool
    start/restart/local --max-tasks-per-child``. Unchecked, -1 had workers replaced
    in a loop (390 in 3 s, no item run: the next ``pmap`` never returned), ``"3"``
    failed the run with a TypeError from the manager, ``2.5`` and ``True`` were kept.
    """
    number = whole(value)
    if value is None or (number is not None and number >= 0):
        return None
    return f"must be {TASKS_PER_CHILD_TAKES}, not {value!r}"


def check_tasks_per_child(value: object) -> int | None:
    """``value`` as a ``max_tasks_per_child`` (None: not given), or a ``UsageError``
    in the API's words (see ``tasks_per_child_refused``). A numpy integer is taken
    as the int it is."""
    why = tasks_per_child_refused(value)
    if why is not None:
        raise UsageError(f"max_tasks_per_child {why}")
    return None if value is None else whole(value)


@dataclass(eq=False)
class _Slot:
    """One worker process and what the loop knows about it."""

    wid: int
    proc: Any
    conn: Any
    started: float
    known: set = field(default_factory=set)  # payload keys it has cached
    inflight: deque = field(default_factory=deque)  # (run, unit) in send order
    deadline: float | None = None
    tasks: int = 0  # items/ranks finished since it started
    pid: int | None = None
    ready: bool = False
    temporary: bool = False  # added for a cell's ranks; stops once idle
    retiring: bool = False  # beyond the pool's size after a resize; stops once idle
    # Shared with the worker: the position in its chunk of the item it is
    # running, so a crash blames that one item rather than the whole chunk.
    position: Any = None
    # Shared with the worker too: when (time.monotonic) the item it is running
    # started, written only in chunks of several items under a --timeout
    # (worker.item_clock), so that each item gets the timeout (_check_deadlines).
    stamp: Any = None
    # Shared with the worker too: the output it holds and has not sent (worker._Tail),
    # shown if it dies or is stopped before sending it (LocalBackend._show_tail).
    tail: Any = None
    rss: int | None = None  # its own (private) bytes after its last task, as it reported (rss.private_bytes)
    over_memory: bool = False  # above the pool's max_memory: replaced once idle
    setup_sent: int = 0  # the worker setup version sent to it (worker_setup.py; 0: none)
    # For each setup sent and not answered yet (SetupDone), in send order: how
    # many of its units in flight run before it. A unit with a setup ahead of it
    # starts its --timeout clock when that setup is done, not while it runs.
    setups_ahead: deque = field(default_factory=deque)
    # Of those, in the same order: whether it is a setup to run (False: the empty "setup
    # removed" message a clear sends, which a setup change need not replace the worker for).
    setups_real: deque = field(default_factory=deque)
    # While its first unit (with a --timeout) waits for such a setup: when the
    # wait ends, the setup counting as stuck (_SETUP_WAIT_MIN; _check_deadlines).
    setup_deadline: float | None = None
    # Since when (time.monotonic) it runs the first setup of ``setups_ahead`` (from its Ready, or
    # the send to a ready worker): a run whose items wait behind it is told so (_say_setup_waits).
    setup_since: float | None = None
    # A send to it failed (it died and its sentinel is not handled yet), or it
    # was closed (``close``): no more units, or ``_assign`` would retry it
    # without end (or give a unit to a pipe nobody reads).
    broken: bool = False
    # Killed (``_kill``): a worker replaced while the manager still read its messages
    # (it had no file descriptor left: ``_no_files``) is neither replaced nor lost again.
    killed: bool = False
    # Sends that never block the manager (pipes.py): what the pipe does not
    # take at once goes out when the selector says it is writable.
    sender: Any = None
    writing: bool = False  # the selector watches its pipe for room too
    # Reads that never block either: every whole message the pipe holds, in
    # one recv per wake-up (pipes.py).
    receiver: Any = None
    # When (time.monotonic) the manager looks whether the worker is stopped (SIGSTOP, a
    # debugger) if it still holds units: _STOPPED_NOTE_AFTER after its first unit in flight
    # became first, then again every _STOPPED_NOTE_AFTER while they stay (_check_stopped).
    stall_at: float | None = None
    stopped_said: bool = False  # its runs were told it is stopped (said again once it has run again)
    # The user's modules it (re)loaded, each with its file's (mtime_ns, size) then, as its replies
    # told (worker: loadstamps.report_loads): one saved since the notebook loaded it runs new code.
    loads: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.conn is not None:
            self.sender = Sender(self.conn)
            self.receiver = Receiver(self.sender.sock)

    def send(self, data: bytes | tuple[bytes, ...]) -> None:
        """Send one message (or its parts: ``pipes.frame``; never blocks; ``OSError`` when the worker is gone)."""
        self.sender.send(data)

    def close(self) -> None:
        """Close its pipe (a worker that has not exited yet reads the end and exits).

        The slot is broken from now on: a hand-out that listed it before it was
        replaced (another run's input raised meanwhile) must not give it a unit.
        """
        self.broken = True
        if self.sender is not None:
            self.sender.close()
        self.conn.close()

    @property
    def busy(self) -> bool:
        return bool(self.inflight)



@contextmanager
def _no_main_module():
    """Hide ``__main__`` while a worker starts.

    multiprocessing makes spawn and forkserver children import the parent's
    ``__main__`` (the kernel launcher, pytest, a script). Our workers never
    need it, since notebook code travels by value, and importing it costs time
    and can run unguarded code. An empty stand-in avoids that.

    A notebook's ``__main__`` is not swapped, but ``%reset -f`` deletes its
    ``__spec__``, which ``spawn.get_preparation_data`` reads at every spawn or
    forkserver start: it is put back as ``None``, the value an interactive
    ``__main__`` has (every start failed with a bare AttributeError after it).

    A start from a background thread (the pool's prestart) does not swap it,
    and the user's ``%run script.py`` may make the script ``__main__`` during
    the start: ``compat.children_ignore_main`` drops it from what the child is
    told, whatever ``__main__`` is then.
    """
    with compat.children_ignore_main():  # (also when a %run puts a script there meanwhile: see there)
        real = sys.modules.get("__main__")
        if _main_is_harmless(real):  # a notebook's __main__: nothing to hide, nothing swapped
            if real is not None and not hasattr(real, "__spec__"):
                try:
                    real.__spec__ = None
                except Exception:  # (a __main__ that refuses it: the start says why in one line)
                    log.debug("mpmagic: could not restore __main__.__spec__", exc_info=True)
            yield
            return
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if real is not None:
                sys.modules["__main__"] = real


def _main_is_harmless(main: Any) -> bool:
    """Would a child ignore this ``__main__``? True for a notebook's (no file, no spec).

    Then workers can start from a background thread: no swap of
    ``sys.modules['__main__']`` that the user's code could see meanwhile.
    """
    return getattr(main, "__spec__", None) is None and getattr(main, "__file__", None) is None


def _start_failed(exc: Exception) -> MPMagicError:
    """A worker that could not be started, in one line (``_spawn``)."""
    return MPMagicError(f"could not start a worker process ({type(exc).__name__}: {exc}); "
                        "`%pool restart --start-method fork` may help")


def can_start_in_background() -> bool:
    """May the pool start in a background thread (at ``%load_ext``)?"""
    return _main_is_harmless(sys.modules.get("__main__"))


@contextmanager
def _sigint_blocked_while_starting(tracker: bool = False) -> Iterator[None]:
    """Start workers that cannot be killed by SIGINT before they ignore it,
    without losing an interrupt meant for the notebook.

    "Interrupt kernel" signals the kernel's whole process group. A worker sets
    SIGINT to ignored as soon as it runs, but a second interrupt during the
    restart that follows a first one could reach a replacement before that.
    So this thread blocks SIGINT during ``start()``: a process forked or
    exec'ed meanwhile (spawn workers, the forkserver itself) inherits the
    blocked mask, where a SIGINT waits until the worker ignores it and
    unblocks it (``worker.main``; forkserver children: ``forkserver_preload``).

    From the main thread the notebook's handler is also swapped for one that
    only notes the signal (``engine.sigint_deferred``; another thread takes it while this one blocks it,
    and Python runs handlers in the main thread: a KeyboardInterrupt there
    would cut ``Process.start`` in half). Once the workers are started the
    handler is back and a noted SIGINT is handed to it: the interrupt stops
    the cell as usual. (SIGINT used to be ignored here instead, which threw
    such an interrupt away: the cell went on.)

    ``tracker`` (spawn, forkserver): start multiprocessing's resource tracker
    first and block SIGINT again after it: its start unblocks SIGINT in this
    thread (``compat.start_resource_tracker``), and the worker or fork server
    started next could be killed by an interrupt while it imported ``site``.
    """
    blocking = hasattr(signal, "pthread_sigmask")
    with sigint_deferred():  # (the main thread's handler notes a SIGINT meanwhile; nothing elsewhere)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocking else None
        try:
            if tracker:
                compat.start_resource_tracker()
                if blocking:
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            yield
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # (a pending SIGINT is noted now)


_live_backends: weakref.WeakSet = weakref.WeakSet()

#: How long a full /dev/shm waits for idle workers to unmap the segments given back.
_UNMAP_WAIT = 1.0


def _give_back_shared_memory(size: int) -> None:
    """/dev/shm has no room for ``size`` bytes: free the segments the notebook
    keeps for the next map's chunks (``shm.give_back_kept``). A tmpfs page is
    freed only once no process maps it, so the workers are told at once (by
    the manager, or here when this is the manager's own thread) and this waits
    up to :data:`_UNMAP_WAIT` for the room. Registered with
    ``posixshm.on_no_room``; the caller then tries once more."""
    if not shm.give_back_kept():
        return
    for backend in list(_live_backends):
        if threading.current_thread() is backend._manager:
            backend._send_unmaps(shm.take_unmapped())
        else:
            backend._wake()
    deadline = time.monotonic() + _UNMAP_WAIT
    while posixshm.room()[0] < size and time.monotonic() < deadline:
        time.sleep(0.005)


posixshm.on_no_room(_give_back_shared_memory)
_setup_keys = itertools.count()


def stop_all(wait_busy: bool = True) -> None:
    """Stop every pool now (exit, a kernel's shutdown: ``pool.release_everything``;
    ``wait_busy``: as :meth:`LocalBackend.stop`)."""
    for backend in list(_live_backends):
        try:
            backend.stop(timeout=0.5, wait_busy=wait_busy)
        except Exception:  # one backend's cleanup must not stop the others'
            log.warning("mpmagic: stopping a pool at exit failed", exc_info=True)


@atexit.register
def _at_exit() -> None:
    """The exit hook: wait for the runs in flight (``exiting.wait_for_runs``: not in a
    kernel's shutdown; Ctrl-C stops them at once), then stop every pool, before
    multiprocessing's own exit hook.

    Exit hooks run last registered, first run. multiprocessing's (which
    terminates daemonic children, our workers among them) registers when
    ``multiprocessing.util`` is first imported, so this module imports it
    first. Run after it, this found the workers dead, and the manager started
    replacements, which failed on forkserver with a traceback.
    """
    global _exit_joins
    stop_now = exiting.wait_for_runs()
    with exiting.sigint_dropped():
        stop_all(wait_busy=not stop_now)
    with _closing:
        _exit_joins = True  # (from here on a reaper thread leaves its process to multiprocessing's hook: _reaped)


def _foreground_runs() -> list[tuple[Any, threading.Thread]]:
    """What the exit waits for of the local pools (``exiting``): the runs other threads
    wait on (a daemon thread's ``pmap``), submitted or being submitted (the pool may
    be starting for it), each with its thread. A background run is its handle's
    (``background`` counts it), and a pool whose manager is gone ends no run (its
    stop ends them)."""
    waited: list[tuple[Any, threading.Thread]] = []
    for backend in list(_live_backends):
        waited.extend((t, t) for t in list(backend._submitting) if t.is_alive())
        if backend._manager_alive():
            waited.extend((run, run.starter) for run in list(backend._runs) if not run.background)
    return waited


exiting.count_runs(_foreground_runs)
exiting.on_stop(lambda: stop_all(wait_busy=False))


#: Every worker ``Process`` this process started and has not forgotten (slots and
#: those being reaped): a forked child takes them out of multiprocessing's children.
_worker_processes: weakref.WeakSet = weakref.WeakSet()
#: Worker processes reaped by a reaper thread (:func:`_reaped`): none writes its output tail.
_reaped_processes: weakref.WeakSet = weakref.WeakSet()


#: The longest a fork waits for another thread's import to end (_wait_for_imports_elsewhere).
_IMPORT_WAIT = 30.0


def _wait_for_imports_elsewhere() -> None:
    """Before forking a worker: wait until no other thread is importing a module.

    A fork copies a module half imported, with its import lock held by a thread
    the child does not have: the child's first use of it waits for that lock for
    ever. A notebook's first cell ``%load_ext mpmagic`` then ``import numpy``
    forked the workers in the background while numpy was half imported, and the
    first item using numpy hung. Not for a thread whose import is waiting in
    mpmagic (a module that calls pmap as it is imported: its run needs this
    worker, and its functions are sent by value), nor longer than ``_IMPORT_WAIT``.
    """
    deadline = time.monotonic() + _IMPORT_WAIT
    while _importing_elsewhere() and time.monotonic() < deadline:
        time.sleep(0.005)


_IMPORTLIB = frozenset({"_frozen_importlib", "_frozen_importlib_external", "importlib._bootstrap",
                        "importlib._bootstrap_external"})


def _importing_elsewhere() -> bool:
    """Is another thread running a module's import now, not waiting in mpmagic
    inside it (its innermost frames, before the import's own, are mpmagic's)?"""
    frames = sys._current_frames()
    for _, owner in compat.imports_elsewhere():
        frame = frames.get(owner)
        while frame is not None:
            name = frame.f_globals.get("__name__") or ""
            if name == "mpmagic" or name.startswith("mpmagic."):
                break  # (waiting in mpmagic, called from the module's top level)
            if name in _IMPORTLIB:
                return True  # (the import itself runs: it ends without this pool)
            frame = frame.f_back
    return False


def forget_after_fork() -> None:
    """In a forked child: the pools are the parent's, not this process's to stop at exit
    (``pool._after_fork_in_child``), and neither are their workers: multiprocessing's
    own exit hook would terminate them (``compat.forget_inherited_processes``)."""
    _live_backends.clear()
    compat.forget_inherited_processes(list(_worker_processes))
    _worker_processes.clear()


#: Longest single wait of the manager (see _next_timeout).
_MAX_WAIT = 3600.0
#: Seconds a failed map's later chunks may take to come back before their workers are replaced.
_FAIL_GRACE = 0.5
#: Seconds spent showing what a cancelled run's busy workers printed before they are stopped.
_DRAIN_ON_CANCEL = 0.2
#: Seconds between a cancel's looks at whether the manager it waits on is still alive.
_CANCEL_CHECK = 0.5
#: A unit with a --timeout waiting behind a worker's %%pool setup starts its clock only
#: when the setup is done (a slow setup is no item's time), but waits for it at most
#: max(_SETUP_WAIT_MIN, _SETUP_WAIT_TIMES x its timeout): a setup that never ends
#: (a stalled download, a lock) must not make a timed run wait for ever (see _start_clock).
_SETUP_WAIT_MIN = 30.0
_SETUP_WAIT_TIMES = 10.0
#: Seconds a run's items wait behind a worker's %%pool setup before the run says so in one line
#: (a hung setup left an untimed run at 0% for ever, with nothing saying why: _say_setup_waits).
_SETUP_NOTE_AFTER = 5.0
#: Seconds a unit waits on its worker before the manager looks whether that worker is stopped
#: (SIGSTOP, kill -STOP, a debugger): a run then said nothing and waited for ever, even for an
#: item a stopped idle worker had been given (_check_stopped). Only then: no cost per unit.
_STOPPED_NOTE_AFTER = 5.0


#: How many times ``submit`` builds a run's payload again when pool stops from other
#: threads keep unlinking its segments first; then the run fails as stopped in flight.
_PAYLOAD_TRIES = 4


class _LocalRun(Run):
    """One job in flight on the local pool. Its state belongs to the manager thread."""

    def __init__(self, backend: LocalBackend, job: Any, limit: int | None) -> None:
        super().__init__(job)
        self.backend = backend
        self.limit = limit  # a map uses at most this many workers (``workers=``)
        self.cancel_requested = False
        self.grace_deadline: float | None = None  # failed: its later chunks may come back until then
        # Submitted while other runs' units held every worker: since when (until its first unit goes out).
        self.waiting_since: float | None = None
        # An error of this run's own found while the manager read a worker (its timeout could not
        # start a clock: _start_clock_of): the manager's next _check_runs ends it with it, alone.
        self.failed_with: BaseException | None = None
        self.setup_wait_said = False  # told that its items wait for a worker's setup (_say_setup_waits)
        # A worker's setup failed during it: its line was shown (once a run), and the workers whose
        # setup failed after that, said in one line at its end (_setup_done, _end).
        self.setup_failure_shown = False
        self.setup_failed_more: list[Any] = []
        # The user's modules it may use, with their files' stamps at its start (warmup.Reloads.versions),
        # and those a worker was found to run another version of (_say_other_versions: said once).
        self.file_versions: dict[str, tuple[int, int]] = {}
        self.versions_said: set[str] = set()

    def cancel(self, interrupted: bool = False, wait: bool = True) -> bool:
        """Stop the run; its busy workers are stopped and replaced (what they printed first is shown).

        Returns once the run ended; the output it made is shown by the next ``wait``.
        The manager ends it; when no manager is alive to do so (the pool stopped,
        or its manager failed), the run is ended here, so that neither this wait
        nor the Ctrl-C that asked for it can hang.

        ``wait=False``, or a cancel in the manager thread or under the pool's
        lock (``may_wait``): it only marks the run and wakes the manager, taking
        no lock, and returns; the manager ends the run on its next turn. A
        dropped ``imap`` stream freed by the cyclic gc in the manager thread
        waited here for the manager, that is for itself: the pool hung for good.
        """
        if not (wait and self.may_wait()):
            stopped = not self._ended.is_set()
            self.interrupted = self.interrupted or interrupted
            self.cancel_requested = True  # (read by the manager's next _check_runs)
            self.backend._wake()
            return stopped
        with self.backend._lock:
            if self._ended.is_set():
                return False
            self.cancel_requested = True
            self.interrupted = self.interrupted or interrupted
        self.backend._wake()
        while not self._ended.wait(_CANCEL_CHECK if self.backend._manager_alive() else 0):
            self.backend._end_orphan(self)
        return True

    def may_wait(self) -> bool:
        """Not in the manager thread (it ends the run), nor under the pool's lock (it needs it)."""
        return threading.current_thread() is not self.backend._manager and not self.backend._lock_is_mine()

    def nudge(self) -> None:
        self.backend._wake()


class LocalBackend:
    """A managed pool of worker processes on this machine, run by one manager thread."""

    name = "local"
    shares_memory = True  # large arrays may travel through shared memory (shm.py)
    owns_workers = True  # its processes are mpmagic's own: %pool restart starts new ones
    make_shared = None  # ``shared`` makes its helpers in POSIX shared memory itself

    def __init__(
        self,
        workers: int | None = None,
        start_method: str | None = None,
        max_tasks_per_child: int | None = None,
        max_memory: int | None = None,
    ) -> None:
        method = check_start_method(start_method)
        self.workers = pool_size(available_cpus() if workers is None else workers)
        self.start_method = method
        self.max_tasks_per_child = check_tasks_per_child(max_tasks_per_child) or None  # (0: no limit)
        # Bytes of resident memory a worker may keep after a task; above it the
        # worker is replaced before its next task (like Dask's nanny).
        self.max_memory = max_memory
        # (Any: typeshed's BaseContext has no Process; every concrete context does)
        self.ctx: Any = multiprocessing.get_context(method)
        self.slots: list[_Slot] = []
        self._next_wid = 0
        self.tasks_run = 0
        self.calls_run = 0
        self.workers_replaced = 0
        self.created = time.time()
        # Guards every field below and the slots. The manager holds it except
        # while it waits; callers take it briefly (submit, cancel, start, status).
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # notified when a worker says it is ready
        self._runs: list[_LocalRun] = []  # in flight, in submission order
        self._submitting: set[threading.Thread] = set()  # threads in a foreground submit now (_foreground_runs)
        self._calls: dict[int, _LocalRun] = {}  # call id -> run, for replies
        self._setup_failure_logged = 0  # the setup version a failure line was shown for (_setup_done)
        self._turn = 0  # round-robin position among runs (fair sharing of workers)
        # The manager thread now. A manager runs while it is this one: a stop
        # (None) or a later start (a new thread) makes it end at its next turn,
        # having touched nothing more (see _manage).
        self._manager: threading.Thread | None = None
        self._stopping: threading.Thread | None = None  # the thread stopping the pool (see stop); start waits
        self._stops = 0  # pool stops so far (see stop)
        self.stopped_by: str | None = None  # what made the last stop, in the user's words (see stop)
        self._retired = False  # replaced by another pool (see retire): never started again
        # The current manager's wakeup pipe: each manager opens its own and closes it as it ends.
        self._wake_r, self._wake_w = -1, -1
        self._selector: selectors.BaseSelector | None = None  # the manager's (see _selector_for_slots)
        self._selector_slots: tuple | None = None
        self._held: list[_Slot] | None = None  # workers with units queued while _assign runs
        # The workers this step sent their setup and warm imports (before its hand-out):
        # a unit for one of them needs no second look (_send_unit). Empty outside the
        # hand-out: a retired worker's slot must not be kept (its Process holds its pipe's fds).
        self._readied: tuple = ()
        # The number of the last payload the notebook's cache dropped that the workers
        # were told of (payload_cache.last_retired; see _send_forgets).
        self._retired_seen = payload_cache.last_retired()
        self._startup_failures = 0
        # The call id of the run told that workers hit ulimit -u (_tasks_short): not
        # the run, which would keep its results alive after it ended.
        self._tasks_said: int | None = None
        self._grown_from: int | None = None  # the size before a call's -n grew the pool (submit)
        # While ``resize`` starts the workers it added: the workers the pool had (a start that
        # runs out of files or processes leaves it at that size: _files_ran_out, _tasks_ran_out).
        self._resizing_from: int | None = None
        self._send_failures = 0  # writes to live workers that failed since a unit last went out (_replace_broken)
        self._interrupted_at = float("-inf")
        self.warmth = warmup.Warmth()  # modules the workers import because the notebook did (warmup.py)
        self._fork_said: set[str] = set()  # fork hazards said already (see _say_fork_hazard)
        # Lines the manager had for the notebook while no run was in flight (a replacement
        # worker's setup failure or fork hazard): said in the next run's cell, first (see
        # _say_or_hold, submit).
        self._said_later = HeldLines()
        # The output tails (worker._Tail) of stopped workers, with their processes (held
        # weakly: a stopped worker's Process and pipes go as before): one goes to a new
        # worker once nothing writes it (see _tail_for_new_worker).
        self._spare_tails: list[tuple[weakref.ref, Any, bool]] = []
        # Tells this pool's worker 0 from another pool's (worker setup, kept ranks).
        self.pool_key = next(_setup_keys)
        _live_backends.add(self)

    # -- lifecycle ---------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self.slots)

    @property
    def cold(self) -> bool:
        """True when the workers are not all up yet (the next run pays for their start)."""
        slots = list(self.slots)
        return not slots or not all(s.ready for s in slots)

    def start(self, wake: bool = True) -> None:
        """Start the workers and the manager (returns at once; workers get ready in the background).

        ``wake=False``: wake the manager only if something started (``submit``
        wakes it anyway; a needless wake-up cost a warm 2-item map ~30 us of
        the caller waiting for the GIL while the manager looked for work).
        """
        with self._lock:
            while self._stopping not in (None, threading.current_thread()):
                self._cond.wait()  # a stop in progress (another thread) ends first: then this starts afresh
            if self._retired:
                raise MPMagicError("this pool was replaced by another one (a new start method or recycling "
                                   "limit, Dask, or the extension's unload) and stays stopped: "
                                   "mpmagic.get_pool() is the pool now")
            before = len(self.slots), self._manager
            if not self.slots:
                shm.sweep_stale()  # segments of notebooks that died without cleaning up
                compat.heap_off_dev_shm()  # no usable /dev/shm: a worker's RawValue in the temp dir
            if self.start_method == "forkserver" and not self.slots:
                try:
                    self.ctx.set_forkserver_preload(
                        ["mpmagic.forkserver_preload", "mpmagic.worker", "mpmagic.cell"]
                        + warmup.forkserver_modules()  # warm: replacements are born with them
                    )
                except Exception:
                    log.warning("mpmagic: could not set the forkserver preload", exc_info=True)
            if not self.slots and warmup.enabled():  # warm: what the notebook imported so far
                self.warmth.want(warmup.notebook_modules())
            if len([s for s in self.slots if not s.temporary]) < self.workers:
                # A Ctrl-C noted while a worker started (_sigint_blocked_while_starting)
                # is raised once every worker is in ``slots``: none is started unrecorded.
                with sigint_deferred():
                    started: list[_Slot] = []
                    out_of: str | None = None
                    try:
                        while len([s for s in self.slots if not s.temporary]) < self.workers:
                            started.append(self._spawn())
                            self.slots.append(started[-1])
                    except OSError as exc:
                        if not out_of_files(exc):
                            raise
                        out_of = "files"
                    except NoRoomForTasks:
                        out_of = "tasks"
                    if out_of == "files":  # (raised here: the failed start's frames, and the pipes they hold, go now)
                        raise self._files_ran_out(started)
                    if out_of == "tasks":
                        raise self._tasks_ran_out(started)
            if self._manager is None or not self._manager.is_alive():
                # A new manager with a wakeup pipe and a selector of its own; one
                # that is still ending closes its own (it never touches these).
                wake_r, wake_w = os.pipe()
                os.set_blocking(wake_r, False)
                os.set_blocking(wake_w, False)
                self._wake_r, self._wake_w = wake_r, wake_w
                self._selector = self._selector_slots = None
                self._manager = threading.Thread(
                    target=self._manage, args=(wake_r, wake_w), name="mpmagic-manager", daemon=True
                )
                try:
                    self._manager.start()
                except RuntimeError as exc:
                    # Its pipe is closed here: only the manager that never ran would have.
                    # The workers are kept: they started, the next call starts a manager.
                    self._manager = None
                    os.close(wake_r)
                    os.close(wake_w)
                    self._wake_r, self._wake_w = -1, -1
                    if not no_thread(exc):  # (at interpreter shutdown, say: not ulimit -u)
                        raise
                    raise MPMagicError(
                        f"mpmagic's manager thread could not start: the process/thread limit ({task_limit_named()}) "
                        "was reached; raise `ulimit -u` (or end processes of yours), or run it serially"
                    ) from None
            changed = (len(self.slots), self._manager) != before
        if wake or changed:
            self._wake()

    def _stop_started(self, started: list[_Slot]) -> None:
        """Stop the workers a start began before it ran out of files or processes
        (their pipes and processes are what ran out), and forget them."""
        for slot in started:
            if slot in self.slots:
                self.slots.remove(slot)
            _kill_group(slot.proc.pid)
            slot.proc.kill()
            slot.close()
            # Reaped here, not by a reaper thread (a SIGKILLed worker that was
            # starting exits at once): one closing the process while the
            # interpreter's exit joined it printed a ValueError traceback.
            slot.proc.join(1.0)
            if slot.proc.exitcode is None:
                _reap_later(slot.proc)
            else:
                slot.proc.close()

    def _files_ran_out(self, started: list[_Slot], shrink: bool = True, asked: int | None = None) -> MPMagicError:
        """The process may open no more files (``ulimit -n``) while workers start:
        stop ``started`` (those this start began: their pipes are what ran out),
        shrink the pool to one fewer than it could start (``shrink``; else to
        what it has), and say so in one line. A failed start kept its workers
        and their files: every later call failed too, and IPython could no
        longer open a file to show the error. ``asked``: the processes wanted
        (a cell's extra workers for its ranks), if not the pool's size.
        (``_tasks_ran_out`` is the same for ``ulimit -u``.)"""
        pool = len([s for s in self.slots if not s.temporary])  # (the started ones included)
        could, wanted = (len(self.slots), asked) if asked is not None else (pool, self.workers)
        self._stop_started(started)
        if asked is None and self._resizing_from is not None and self._grown_from is None:
            # A failed resize (%pool resize, start_pool(workers=); a call's -n: below) leaves
            # the pool as it was, its workers ran before it. It kept one fewer than it could
            # start, and %pool said "10 workers" beside the 2 it had until the next run
            # started the rest; with no file left, a grow from 2 to 3 left 1.
            self.workers = self._resizing_from
            fits = could - 1  # (one fewer, as below)
            instead = (f"raise `ulimit -n`, or resize to at most {fits}" if fits > self.workers
                       else "raise `ulimit -n` (or close files the notebook holds)")
            return MPMagicError(
                f"too many open files: the pool could start only {could} of {wanted} workers "
                f"(the process may open {file_limit()} files): {instead} "
                f"(the pool keeps its {self.workers} worker{'s' if self.workers != 1 else ''})"
            )
        if asked is None:
            # One fewer when starting: a run opens files of its own. Grown for
            # this call (-n 8): no bigger than before.
            fits = pool - 1 if shrink else pool
            self.workers = max(1, min(self.workers, fits, self._grown_from or self.workers))
        if could <= 1 and asked is None:  # (the one left is the one that ran out: fewer workers do not help)
            return MPMagicError(
                f"too many open files: not even one worker of the pool has room to run (the process may open {file_limit()} "
                "files, and has them open): raise `ulimit -n` (or close files the notebook holds), or run it "
                "serially"
            )
        return MPMagicError(
            f"too many open files: the pool could start only {could} of {wanted} workers "
            f"(the process may open {file_limit()} files): raise `ulimit -n` or use fewer workers "
            f"(the pool now has {self.workers})"
        )

    def _tasks_ran_out(self, started: list[_Slot], asked: int | None = None) -> MPMagicError:
        """``_files_ran_out`` for the user's limit on processes and threads (``ulimit -u``,
        ``proclimits.room_for_tasks``): the workers this start began stop, the pool
        keeps its size from before the call grew it (or what it could start), and
        one line names the limit. A start that went on spent that budget on
        workers that died starting, and left the pool unable to start even the
        workers that had worked before."""
        pool = len([s for s in self.slots if not s.temporary])
        could, wanted = (len(self.slots), asked) if asked is not None else (pool, self.workers)
        kept = len([s for s in self.slots if not s.temporary and s not in started])
        self._stop_started(started)
        if asked is None and self._resizing_from is not None and self._grown_from is None:  # (a failed resize: as it was)
            self.workers = self._resizing_from
            return MPMagicError(_tasks_line(could, wanted, self.workers, kept=True))
        if asked is None:
            fits = max(kept, could - 1)  # (one fewer: a run starts threads of its own)
            self.workers = max(1, min(self.workers, fits, self._grown_from or self.workers))
        return MPMagicError(_tasks_line(could, wanted, self.workers if asked is None else None))

    def _spawn(self, temporary: bool = False) -> _Slot:
        """Start one worker. A start that fails for another reason than the
        process's open-file limit (the callers' ``_files_ran_out``) raises
        ``_start_failed``'s one line, never multiprocessing's frames."""
        _room_for_files(_FILES_PER_START)  # out of files halfway, the fork server's child printed an EOFError
        # Out of processes halfway, workers died with tracebacks. (Workers not
        # ready yet have their two threads still to start.)
        room_for_tasks(_TASKS_PER_START + 2 * len([s for s in self.slots if not s.ready]))
        if self.start_method == "fork":
            self._say_fork_hazard()
            _wait_for_imports_elsewhere()
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        try:
            return self._start_worker(parent_conn, child_conn, temporary)
        except BaseException as exc:
            parent_conn.close()  # (a start that failed keeps no file open)
            child_conn.close()
            if not isinstance(exc, Exception) or isinstance(exc, MPMagicError):
                raise
            if isinstance(exc, OSError) and out_of_files(exc):
                raise
            if out_of_tasks(exc, _TASKS_PER_START):
                raise NoRoomForTasks() from None
            raise _start_failed(exc) from None

    def _say_fork_hazard(self) -> None:
        """Before forking a worker: one line when the notebook's native thread pools
        can hang it (``threads.fork_hazard``: polars used, torch...), once per pool
        and set of such libraries (a replacement forked after a new import says it too)."""
        try:
            line = threads.fork_hazard()
        except Exception:  # (a check that failed never stops a start)
            log.debug("mpmagic: could not check the notebook's threads before a fork", exc_info=True)
            return
        if line is not None and line not in self._fork_said:
            self._fork_said.add(line)
            self._say_or_hold(line + "\n")

    def _start_worker(self, parent_conn: Any, child_conn: Any, temporary: bool) -> _Slot:
        _widen(parent_conn)
        _widen(child_conn)
        position = self.ctx.RawValue("q", worker.POSITION_IDLE)
        stamp = self.ctx.RawValue("d", 0.0)
        tail = self._tail_for_new_worker()
        wid = self._next_wid
        self._next_wid += 1
        # worker setup (worker_setup.py): thread caps and GPU, applied before it imports anything
        init = worker_setup.start_info(
            (self.pool_key, wid), max(self.workers, len(self.slots) + 1), [(self.pool_key, s.wid) for s in self.slots]
        )
        proc = self.ctx.Process(
            target=worker.main,
            args=(child_conn, os.getpid(), wid, position, init, stamp, tail),
            name=f"mpmagic-worker-{wid}",
            daemon=True,
        )
        # From a directory that exists: a child chdirs to the notebook's, which
        # failed when it was deleted or may not be entered (context.workers_dir).
        where, problem = context.workers_dir()
        starting_in = compat.children_start_in(where) if problem else nullcontext()
        with _no_main_module(), _sigint_blocked_while_starting(tracker=self.start_method != "fork"), starting_in:
            proc.start()
        _worker_processes.add(proc)
        child_conn.close()
        return _Slot(
            wid, proc, parent_conn, time.monotonic(), pid=proc.pid, temporary=temporary, position=position,
            stamp=stamp, tail=tail,
        )

    def _tail_for_new_worker(self) -> Any:
        """The shared memory of a new worker's output tail: a stopped worker's once
        nothing writes it any more (SIGKILLed: no instruction of it runs after the signal,
        sent before this worker starts; stopped: once reaped), else a new one.

        Each is 64 KB of multiprocessing's shared heap, whose arenas under 4 MB are
        never given back: a new tail for each replacement (a session killing and
        replacing workers, ``--timeout``, interrupts) left the notebook a new arena
        file open now and then, for good."""
        spare = self._spare_tails
        for k, (ref, tail, killed) in enumerate(spare):
            proc = ref()
            if killed or proc is None or proc in _reaped_processes:
                del spare[k]
                worker.clear_tail(tail)
                return tail
        return worker.tail_memory(self.ctx)

    def _spare_tail(self, slot: _Slot, killed: bool = False) -> None:
        """A stopped worker's output tail, for a later worker (``killed``: by SIGKILL)."""
        if slot.tail is not None:
            self._spare_tails.append((weakref.ref(slot.proc), slot.tail, killed))
            slot.tail = None

    def preload(self, names: list[str]) -> None:
        """Have every worker import these modules in the background (warm workers:
        the notebook imported them; see warmup.py). Records them and wakes the
        manager, which sends them: to idle workers now, to new ones as they start,
        to a busy one ahead of its next unit. Never waits (any thread)."""
        if self.warmth.want(names):
            self._wake()

    def _send_imports(self, slot: _Slot) -> None:
        """Send ``slot`` the modules it was not sent yet (manager thread; see preload)."""
        msg = self.warmth.message(slot.wid)
        if msg is not None:
            try:
                self._put(slot, pack(msg))
            except OSError:
                self.warmth.forget(slot.wid)  # a dead worker: its sentinel reports it
        reload = self.warmth.reloads.message(slot.wid)  # modules the notebook reloaded: before the next unit
        if reload is not None:
            try:
                self._put(slot, pack(reload))
                slot.known.clear()  # it forgets its functions (and context): sent again with the next unit
            except OSError:
                self.warmth.forget(slot.wid)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every worker has said it is ready (used by ``%pool start``)."""
        self.start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(s.ready for s in self.slots):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MPMagicError(f"workers not ready after {timeout:g} s")
                self._cond.wait(min(left, 0.5))

    def _manager_alive(self) -> bool:
        """A manager thread runs and is not being stopped: a run handed to it will be ended.
        (Read under ``_lock`` for an answer that holds until it is released.)"""
        manager = self._manager
        return manager is not None and manager.is_alive()

    def _lock_is_mine(self) -> bool:
        """Does this thread hold the pool's lock? (``notify(0)`` wakes nobody, and raises
        RuntimeError in a thread that does not hold the lock: the public way to ask.)"""
        try:
            self._cond.notify(0)
        except RuntimeError:
            return False
        return True

    def _end_orphan(self, run: _LocalRun) -> None:
        """End ``run`` if no manager is alive to end it (its cancel waits on it otherwise)."""
        with self._lock:
            if self._manager_alive() or run._ended.is_set():
                return
            if run in self._runs:
                self._runs.remove(run)
            self._calls.pop(run.job.call_id, None)
        run._finish()

    def stop(self, timeout: float = 2.0, wait_busy: bool = True, *, by: str | None = None) -> None:
        """Stop every worker: ask politely, then terminate, then kill.

        ``by``: what asked for the stop, in the user's words (``%pool stop``,
        ``stop_pool()``), kept as ``stopped_by``: the runs it fails say it ("the
        pool was stopped by %pool stop while this run was in flight"), not only
        that something did.

        ``wait_busy=False`` (a kernel's shutdown, ``pool.at_shell_exit``):
        workers busy with a unit are terminated at once instead of being given
        ``timeout`` to finish it (its run ends here anyway): a busy ``--bg`` run
        made the stop take 2 s, and Jupyter SIGTERMed the kernel before it
        exited by itself.

        The manager, the runs in flight (they end with "the pool was stopped")
        and the workers are taken in one hold of the lock, and a ``start`` (a
        ``submit`` from another thread) waits until the stop is over, then
        starts afresh: a run can never be handed to a manager that is being
        stopped, nor to one left with no workers. ``_stops`` counts the stops: a
        ``submit`` that a stop overtook (it read a lazy input's first chunk
        meanwhile) fails its run rather than hand it to no manager.
        """
        me = threading.current_thread()
        with self._lock:
            while self._stopping not in (None, me):
                self._cond.wait()  # another thread's stop: over first (it took what there was)
            self._stopping = me
            manager, self._manager = self._manager, None  # it ends at its next turn, touching nothing
            self.stopped_by = by  # (before the count: a submit that sees the count reads this)
            self._stops += 1
            runs = list(self._runs)
            self._runs.clear()
            self._calls.clear()
            slots, self.slots = self.slots, []
            self._wake()  # (under the lock: the manager closes its pipe only under it)
        try:
            self._stop_workers(manager, runs, slots, timeout, wait_busy, by)
        finally:
            with self._lock:
                self._stopping = None
                self._cond.notify_all()

    def retire(self, timeout: float = 2.0, wait_busy: bool = True, *, by: str | None = None) -> None:
        """Stop this pool for good: another pool replaced it (a new start method or
        recycling limit, ``use_dask``, the extension's unload).

        A run that chose this pool just before it was replaced (another thread's
        ``pmap`` between ``get_pool()`` and ``submit``) then fails with "the pool was
        stopped by BY while this run was in flight: run it again", as one a stop overtook while it
        started; nothing starts this pool again. Its ``submit`` restarted it: its
        workers ran on, out of ``%pool``'s sight and out of ``stop_pool()``'s reach,
        until the interpreter exited. ``by``: what replaced it, as ``stop``'s.
        """
        with self._lock:
            self._retired = True
        self.stop(timeout, wait_busy, by=by)

    def _stop_workers(self, manager: threading.Thread | None, runs: list[_LocalRun], slots: list[_Slot],
                      timeout: float, wait_busy: bool = True, by: str | None = None) -> None:
        """``stop``'s work once it took the manager, the runs and the workers (no lock held)."""
        if manager is not None and manager is not threading.current_thread():
            manager.join(5.0)  # (it ends at once: woken, it finds it is no longer the manager)
        for run in runs:  # whoever waits on them must not hang
            run._finish(exiting.stopped_error(by))
        for s in slots:
            try:
                s.send(_STOP)
            except Exception:
                log.debug("mpmagic: worker %s gone before stop", s.wid)
            if s.sender.pending or (s.busy and not wait_busy):  # busy: it would not read the stop in time
                s.proc.terminate()
        deadline = time.monotonic() + timeout
        for s in slots:
            s.proc.join(max(0.0, deadline - time.monotonic()))
        for s in slots:
            if s.proc.is_alive():
                s.proc.terminate()
        for s in slots:
            s.proc.join(0.5)
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join(1.0)
            _kill_group(s.proc.pid)  # what its tasks started and left running
            s.close()
            try:
                s.proc.close()
            except Exception:
                log.debug("mpmagic: could not close worker %s", s.wid, exc_info=True)
        # No worker maps our segments any more: unlink them all.
        for s in slots:
            shm.sweep_worker(s.pid)
        shm.cleanup()
        payload_cache.clear()
        self._retired_seen = payload_cache.last_retired()  # (the next workers never held those)
        shm.take_unmapped()

    def restart(self, wait: bool = True, *, by: str | None = None) -> None:
        """Stop and start again with the same settings (clears the workers' state).

        ``wait``: return once every worker is ready; otherwise at once, while they
        start in the background (the next run waits for them). ``by``: as ``stop``'s.
        """
        self.stop(by=by)
        self.start()
        if wait:
            self.wait_ready()

    def check_workers(self, workers: int | None) -> None:
        """A usage error for a map's ``workers`` the pool could not grow to (more than the
        machine runs): asked before the run is made, so that a mistake in the call
        leaves no report of a run that never started (submit would refuse it later)."""
        if workers and workers > self.workers:
            _check_size(workers)

    def check_ranks(self, size: int) -> None:
        """A usage error for a cell of ``size`` ranks more than the machine runs at once
        (``check_rank_count``), before the run builds one unit per rank."""
        check_rank_count(size)

    def resize(self, workers: int) -> None:
        """Grow or shrink the pool to ``workers`` processes (idle ones stop; busy ones once idle);
        -1: one per usable CPU."""
        workers = pool_size(workers)
        with self._lock:
            self.workers = workers
            if self.slots:
                members = [s for s in self.slots if not s.temporary]
                for s in members[:workers]:
                    # Marked by a shrink before and still busy: a member again. (``start``
                    # counts it, so it started none in its place, and it stopped once
                    # idle: a shrink then grow left the run, and the pool, one worker.)
                    s.retiring = False
                extra = members[workers:]
                for s in extra:
                    if s.busy:
                        s.retiring = True
                    else:
                        self._retire(s)
                self._resizing_from = len(members)  # (a grow that fails leaves the pool at this size)
                try:
                    self.start()
                finally:
                    self._resizing_from = None

    def _retire(self, slot: _Slot) -> None:
        """Stop one idle worker and forget it."""
        if slot in self.slots:
            self.slots.remove(slot)
        try:
            slot.send(_STOP)
        except Exception:
            log.debug("mpmagic: worker %s gone before stop", slot.wid)
        slot.close()
        self._spare_tail(slot)
        _reap_later(slot.proc)

    def _kill(self, slot: _Slot) -> None:
        """Kill a worker at once (timeout, interrupt, abandoned work)."""
        if slot in self.slots:
            self.slots.remove(slot)
        slot.killed = True
        _kill_group(slot.proc.pid)  # the worker and what its task started (a subprocess, a fork)
        try:
            slot.proc.kill()
        except Exception:
            log.debug("mpmagic: could not kill worker %s", slot.wid, exc_info=True)
        slot.close()
        self._spare_tail(slot, killed=True)
        _reap_later(slot.proc)
        self.workers_replaced += 1

    def _replace(self, slot: _Slot) -> None:
        """Kill a worker; units of other runs queued on it go back to their runs."""
        if slot.killed:  # (replaced already, while its messages were read: see _no_files)
            return
        rest = list(slot.inflight)
        slot.inflight.clear()
        for run, unit in rest:
            run.job.requeue(unit)
        self._kill(slot)
        if not slot.temporary and not slot.retiring:
            self._respawn()

    def _respawn(self) -> None:
        """A worker in place of one that stopped (manager); out of files, the pool shrinks
        and the runs in flight end with the one line of ``_files_ran_out``. Out of
        processes or threads (``ulimit -u``), the pool shrinks to the workers it has
        and the runs go on with them, told once (``_tasks_short``); with none left
        they end with its one line.

        A replacement that cannot start for another reason leaves the pool one
        worker short: the runs go on with the others (the dead worker's item is
        still blamed on its death), and end with the start's one line only when
        no worker is left. The next run's start tries again and says why in
        its cell. (It failed the manager: its traceback, every run ended with a
        bare error, and every later call too.)
        """
        try:
            self.slots.append(self._spawn())
        except MPMagicError as failed:
            log.debug("mpmagic: a replacement worker could not start: %s", failed)
            if not [s for s in self.slots if not s.temporary]:
                for run in list(self._runs):
                    self._end(run, failed)
        except OSError as exc:
            if not out_of_files(exc):
                raise
            error = self._files_ran_out([], shrink=False)
            for run in list(self._runs):
                self._end(run, error)
        except NoRoomForTasks:
            self._tasks_short()

    def _tasks_short(self) -> None:
        """A worker could not be (re)started, or died starting, for the process/thread
        limit (``ulimit -u``): the pool shrinks to the workers it has, the runs go on
        with them and say so once; with none left they end with the one line.
        (The manager replaced such workers in a loop: dozens of tracebacks, and
        the pool could no longer start even the workers that had worked before.)"""
        have = len([s for s in self.slots if not s.temporary])
        wanted = self.workers
        self.workers = max(1, have)
        line = _tasks_line(have, wanted, self.workers)
        if not have:
            for run in list(self._runs):
                self._end(run, MPMagicError(line))
        elif self._runs and self._runs[0].job.call_id != self._tasks_said:  # (once per run)
            self._tasks_said = self._runs[0].job.call_id
            self._runs[0].note("stderr", f"mpmagic: workers could not start: the process/thread limit "
                                         f"({task_limit_named()}) was reached; the pool goes on with {have} "
                                         "(use fewer workers or raise `ulimit -u`)\n")

    # -- worker setup (worker_setup.py) ------------------------------------
    def setup_workers(self) -> list[Any]:
        """The ids ``worker_setup`` knows this pool's live workers by (temporary ones too)."""
        return [(self.pool_key, s.wid) for s in list(self.slots)]

    def apply_setup(self, wait: bool = True, timeout: float = 600.0) -> list[str]:
        """Run the current setup in every worker (starting the pool); wait for their answers.

        The manager sends it (``_send_setup``: it owns the pipes); this only
        wakes it and waits. Returns the one-line errors of workers whose setup
        failed. Ctrl-C stops the wait (the workers go on with the setup).
        """
        self.start()
        if not wait:
            return []
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                keys = self.setup_workers()  # a worker that died was replaced
                left = deadline - time.monotonic()
                if worker_setup.done_on(keys) or left <= 0 or not self.slots:
                    return worker_setup.failures(keys)
                self._cond.wait(min(left, 0.5))

    def _send_setup(self, slot: _Slot) -> None:
        """Under the lock (manager or submit): send the current setup to a worker that has not had it (once per version)."""
        if slot.setup_sent == worker_setup.version():
            return
        msg = worker_setup.message()
        if msg is None:
            return
        slot.setup_sent = msg.version
        killed = worker_setup.killed_workers()
        if killed is not None:  # this setup killed a worker: not run again in a loop of replacements
            worker_setup.mark_failed((self.pool_key, slot.wid), killed)
            self._cond.notify_all()
            return
        # The notebook's cwd, environment, sys.path first (context.py): a setup
        # may import from a directory the notebook added after the pool started.
        # Built before anything is written: only a write's error is the worker's.
        ctx = context.current(*((self._runs[0].job.call_id, self._runs[0].job.libs) if self._runs else ()))
        messages = [] if context.key(ctx) in slot.known else [pack(ctx)]
        messages.append(pack(msg))
        try:
            for data in messages:
                self._put(slot, data)
        except OSError:
            self._send_failed(slot)
            return
        slot.known.add(context.key(ctx))
        if not slot.setups_ahead and slot.ready:
            slot.setup_since = time.monotonic()
        slot.setups_ahead.append(len(slot.inflight))
        slot.setups_real.append(msg.payload is not None)

    def replace_setting_up(self) -> list[Any]:
        """Replace the workers still running (or yet to run) a setup sent to them;
        the ids of those replaced.

        For a setup change (``setup_api._change``, under ``runs_held``: no run
        is in flight): that setup is being replaced or removed, and such a worker
        would run it to its end before the new one. After an interrupted
        ``%%pool setup`` that hung (a stalled download), ``%pool setup clear``
        waited for it without a word, for ever. Their replacements start with
        the setup as changed. Not a worker that has only the "setup removed"
        message of a ``%pool setup clear`` to answer (a worker recycled or
        started after it): there is no earlier setup to wait for, and it was
        stopped and started again for nothing.
        """
        with self._lock:
            stuck = [s for s in self.slots if any(s.setups_real)]
            for slot in stuck:
                self._replace(slot)
        if stuck:
            self._wake()
        return [s.wid for s in stuck]

    def _without_setup(self, slot: _Slot) -> str | None:
        """The line saying that this worker runs tasks without the current setup (it
        failed there, or it was not run there because it killed a worker), or None."""
        key = (self.pool_key, slot.wid)
        if worker_setup.worker_state(key) != "setup failed":
            return None
        skipped = worker_setup.failures([key]) == [worker_setup.killed_workers()]
        why = "it was not run there: it killed a worker" if skipped else "it failed there"
        return f"mpmagic: worker {slot.wid} runs without the %%pool setup ({why}; see %pool)"

    def _setup_done(self, slot: _Slot, msg: SetupDone) -> None:
        """Manager only: a worker's setup reply; a failure is shown in the run in flight.

        One failure line a run: with ``--max-tasks-per-child``, a setup failing in
        later workers (its message naming the worker, so no two lines alike)
        printed one line per recycled worker, four to a run. The workers failing
        after the run's first line are counted, and said in one line at its end
        (:meth:`_end`). Outside a run, a line only while none was shown for this
        setup (%pool shows the rest).
        """
        line = worker_setup.record((self.pool_key, slot.wid), msg)
        printed = worker_setup.take_output(msg)  # (None while an explicit %%pool setup collects it)
        if printed:
            self._say_setup_output(slot, printed)
        failed = msg.error is not None and msg.version == worker_setup.version() and not worker_setup.is_quiet()
        if failed and self._runs:
            run = self._runs[0]
            if run.setup_failure_shown:
                run.setup_failed_more.append(slot.wid)
                line = line.split("\n", 1)[1] if line and line.startswith(f"mpmagic: {msg.error}\n") else line
            elif line:
                run.setup_failure_shown = True
                self._setup_failure_logged = msg.version
        elif failed and line:
            if self._setup_failure_logged == msg.version:
                log.debug("%s", line.strip())
                line = None
            self._setup_failure_logged = msg.version
        if line:
            self._say_or_hold(line)
        self._cond.notify_all()

    def _say_setup_output(self, slot: _Slot, text: str) -> None:
        """What a worker's setup printed (``text``, labelled ``[worker N]``), from a
        worker started after ``%%pool setup`` showed the first ones' (a replacement, a resize, a
        cell's temporary worker): shown once, on stdout as ``%%pool setup`` shows it, in the cell
        of the run whose unit waits for that worker, else of the first run in flight, else held
        for the next run's cell (``HeldLines``). It was dropped, unlike the first workers'."""
        self._say_to_waiting(list(slot.inflight), text, "stdout")

    def _say_to_waiting(self, inflight: list[tuple[_LocalRun, Any]], text: str, stream: str = "stderr") -> None:
        """Show ``text`` on ``stream`` in the first run of ``inflight`` (a worker's units) still
        going, else in the first run in flight, else (as :meth:`_say_or_hold`) here in a caller's
        thread, or held for the next run from the manager's."""
        for run, _ in inflight:
            if run in self._runs and not run.job.finished:
                run.note(stream, text)
                return
        if self._runs:
            self._runs[0].note(stream, text)
        elif threading.current_thread() is not self._manager:
            (sys.stdout if stream == "stdout" else sys.stderr).write(text)
        else:
            self._said_later.hold(text, stream)

    def _say_or_hold(self, line: str) -> None:
        """The pool's own ``line`` (ending in a newline) for the notebook: written here
        in a caller's thread (the notebook's: its cell); from the manager, in the first
        run in flight's cell, or, with none, held for the next run (``held_lines``: the
        next run says it first, from ``submit``). The manager never prints: its thread's
        output landed in whichever cell ran then, in Jupyter maybe one that has nothing
        to do with the pool."""
        if threading.current_thread() is not self._manager:
            sys.stderr.write(line)
        elif self._runs:
            self._runs[0].note("stderr", line)
        else:
            self._said_later.hold(line)

    # -- status ------------------------------------------------------------
    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<mpmagic local pool: {self.workers} workers, {self.start_method}, {state}>"

    def status(self) -> dict[str, Any]:
        """A snapshot for ``%pool``: backend, method, workers with pids and memory."""
        import psutil

        workers = []
        with self._lock:
            slots = list(self.slots)
            runs = len(self._runs)
        for s in slots:
            try:
                rss = _own_memory(psutil.Process(s.pid)) if s.pid else None
            except Exception:
                rss = None
            workers.append(
                {
                    "id": s.wid,
                    "pid": s.pid,
                    "alive": s.proc.is_alive(),
                    "ready": s.ready,
                    "busy": s.busy,
                    "stopped": s.pid is not None and is_stopped(s.pid),  # (SIGSTOP, a debugger: see _check_stopped)
                    "tasks": s.tasks,
                    # Listed beyond the pool's size until idle: a shrink's busy worker, a cell's extra one.
                    "leaving": "resize" if s.retiring else ("ranks" if s.temporary else None),
                    "rss": rss,
                    "setup": worker_setup.worker_state((self.pool_key, s.wid)),  # worker setup
                    "gpu": worker_setup.gpu_of((self.pool_key, s.wid)),
                }
            )
        return {
            "backend": "local",
            "start_method": self.start_method,
            "workers": self.workers,
            "running": self.running,
            "processes": workers,
            "tasks_run": self.tasks_run,
            "calls_run": self.calls_run,
            "runs_in_flight": runs,
            "workers_replaced": self.workers_replaced,
            "max_tasks_per_child": self.max_tasks_per_child,
            "max_memory": self.max_memory,
            "preloaded": self.warmth.describe(),  # warm: modules the workers import, their memory (warmup.py)
            "kept": _kept_line(workers, self.pool_key),  # %%parallel --keep (ranks.py)
            "shm": _shm_held(),
        }

    def runs_in_flight(self) -> int:
        """How many runs are submitted and not yet over (foreground and background)."""
        with self._lock:
            return len(self._runs)

    @contextmanager
    def runs_held(self) -> Iterator[list[Run]]:
        """Yield the runs in flight now (foreground, any thread, and background); no run
        starts or ends until the body is over.

        For a change every run depends on, the worker setup (``setup_api``): the
        caller makes it only when nothing is in flight. ``submit`` adds a run
        under the same lock, and the manager sends a new setup to each worker
        before its next unit, so a run's units all run under one setup: a run
        submitted before the change is refused the change, one after it gets
        the new setup on every worker.
        """
        with self._lock:
            yield list(self._runs)

    # -- submitting (any thread) ----------------------------------------------
    def submit(self, job: Job, workers: int | None = None, background: bool = False) -> _LocalRun:
        """Hand ``job`` to the manager; returns its run at once.

        ``workers`` limits a map to that many workers, or grows the pool to it.
        A cell's ranks each get a worker of their own at once (temporary extra
        workers when the pool has too few idle ones). ``background``: nobody
        waits on it in the foreground (see ``engine.Run.background``): its
        units go after foreground runs' from its first step, and its lazy
        input is read by the thread that waits on it, from the first chunk on
        (the handle comes back at once, however slow the input).

        Once the exit hook began, a daemon thread's new run ends that thread
        (``exiting.refuse_late_run``); the exit waits for a foreground run whose
        submit began before, while it starts the pool, too (``_submitting``).
        """
        exiting.refuse_late_run()
        if background:  # (the exit counts it as its handle's: background._waited_at_exit)
            return self._submit(job, workers, background)
        me = threading.current_thread()
        self._submitting.add(me)
        try:
            return self._submit(job, workers, background)
        finally:
            self._submitting.discard(me)

    def _submit(self, job: Job, workers: int | None, background: bool) -> _LocalRun:
        """``submit``'s work."""
        if threading.current_thread() is self._manager:
            raise UsageError(
                "a parallel run cannot start in the pool's manager thread (from a hook the pool calls "
                "there), which the new run would wait on: start it from another thread"
            )
        limit = None
        if job.kind == "cell":
            check_rank_count(job.size)  # (asked before the job was made too: pool.check_run_ranks)
        elif workers and workers > self.workers and not self._retired:
            # The pool grows for good (starting workers for one call and stopping
            # them after would cost every such call their start): say so once,
            # after the resize took it (more than the machine runs is refused).
            before = self.workers
            self._grown_from = before  # (too many open files: back to at most this size, _files_ran_out)
            try:
                self.resize(workers)
                with self._lock:
                    self.start(wake=False)
            finally:
                self._grown_from = None
            sys.stderr.write(f"mpmagic: the pool grew from {before} to {workers} workers for workers={workers} "
                             f"(-n {workers}) and stays that size: start_pool(workers={before}) "
                             f"(%pool resize {before}) shrinks it\n")
        else:
            limit = workers
        if job.func is not None:  # warm: modules a map's function needs, sent ahead of it
            self.warmth.want_for(job.func, job.func_key)
        self.warmth.reloads.check(job.func, job.func_key)  # the user's modules the notebook reloaded since
        versions = self.warmth.reloads.versions(job.func, job.func_key)  # (what a worker importing one must find)
        # A stop from another thread (%pool restart, stop_pool) may have landed since the job
        # built its payload, or be unlinking segments still: ``start`` waits until it is over,
        # and a payload naming a segment it unlinked is built again for the pool as it is now
        # (nothing ran yet: as if the stop had come before the call). A stop from here on
        # fails the run (the check below), as it fails the runs in flight; so does a pool
        # replaced since the caller chose it (``retired``: it never starts again).
        tries = 0
        while True:
            with self._lock:
                retired = self._retired
                if not retired:
                    self.start(wake=False)  # (woken below, once)
                stops = self._stops
            lost = not retired and job.payload_lost()
            if not lost or tries == _PAYLOAD_TRIES:
                break
            job.prepare_payload_again()
            tries += 1
        if not background:
            job.prefill()  # a lazy input's first chunk, read here before the lock (nothing for a cell)
        run = _LocalRun(self, job, limit)
        run.background = background
        run.file_versions = versions
        interrupt: KeyboardInterrupt | None = None
        with self._lock:
            # The pool stopped (%pool stop / restart, from another thread) while this
            # read its input: handed to the manager now, nobody would ever end the run.
            stopped = retired or self._stops != stops or not self._manager_alive() or lost
            self._said_later.say()  # (what the pool had to say while no run was in flight: in this run's cell, first)
            if not stopped:
                self.calls_run += 1
                self._runs.append(run)
                self._calls[job.call_id] = run
                if len(self._runs) > 1:
                    self._note_sharing(run)
                try:
                    wake = self._step_here(job)
                except KeyboardInterrupt as exc:  # (raised once the step was over)
                    wake, interrupt = True, exc
        if stopped:  # it fails at once, as the runs in flight at the stop did
            job.release_shared()
            run._finish(exiting.stopped_error(self.stopped_by))
            return run
        if wake:
            self._wake()
        if interrupt is not None:
            # Ctrl-C while the step ran: this run is the one it hit, but the
            # caller never got its handle. Cancel it (outside the lock: the
            # manager ends it) as the caller's wait would have.
            run.cancel_interrupted()
            raise interrupt
        return run

    def run_of(self, job: Job) -> _LocalRun | None:
        """The run of ``job`` in flight, if any (see ``Backend.run_of``)."""
        with self._lock:
            return self._calls.get(job.call_id)

    def _step_here(self, job: Job) -> bool:
        """The manager's next step, taken by ``submit`` (under the lock): the new
        run's first units go out now, not after a thread wake-up (~40-60 us of a
        warm 2-item map). True when the manager must still be woken.

        Not while the manager's selector is out of date (workers just started:
        it must rebuild it anyway). No step either when every worker is busy
        and the job is a map: its units wait for the next reply, which wakes
        the manager anyway (8 threads submitting at once paid for 8 steps that
        found nothing to do). SIGINT waits until the step is over: a
        KeyboardInterrupt between a send and its bookkeeping would lose the
        unit; it is raised after.
        """
        slots = tuple(self.slots)
        if self._selector is None or self._selector_slots != slots:
            return True
        if job.kind == "map":
            for s in slots:
                if not (s.inflight or s.broken):
                    break
            else:
                return False
        with sigint_deferred():
            self._step()
        if self._selector_slots != tuple(self.slots):
            return True  # new or gone workers: its selector must change
        for s in self.slots:
            if s.sender.pending or s.deadline is not None or s.setup_deadline is not None or s.setup_since is not None:
                return True  # a send waits for room, or a timeout (or a wait for a setup: _say_setup_waits) to watch
        if job.input_wait() is not None:
            return True  # a lazy input's read asked: the manager looks at it while it goes on (_take_reading)
        for r in self._runs:
            if r.grace_deadline is not None or r.job.abort_at is not None:
                return True
        return False

    def run(self, job: Job, workers: int | None = None) -> None:
        """Submit ``job`` and wait for it here (Ctrl-C cancels it); raise what stopped it."""
        __tracebackhide__ = True
        handed: _LocalRun | None = None
        try:
            handed = self.submit(job, workers)
            handed.wait()
        except KeyboardInterrupt:
            hit = handed or self.run_of(job)  # (None: it hit before the run began, or after it ended)
            if hit is not None:
                hit.cancel_interrupted()
            raise
        run = handed
        if run.error is not None:
            raise exiting.raised(run.error)

    def _wake(self) -> None:
        """Wake the manager from its wait (new run, cancel, new workers, stop)."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # full (it will wake anyway) or closed (it has stopped)

    # -- the manager thread ----------------------------------------------------
    def _manage(self, wake_r: int, wake_w: int) -> None:
        """The loop that reads worker pipes and sends them work (``submit`` may
        take one step of it itself, under the same lock).

        It waits on every worker's pipe, every worker's process sentinel and
        the wakeup pipe at once (one epoll selector, see ``_selector_for_slots``):
        a result, a line of output, a death, a new run or a cancel wakes it, and
        it sleeps without a timeout when no deadline is pending. It never
        prints: output goes to each run's event queue.

        It runs while it is the pool's manager (``_manager``): once a stop (or a
        later start) made it stale, it ends at its next turn without touching
        the workers or the runs, and closes what it alone owns, its wakeup pipe
        (``wake_r``, ``wake_w``) and its selector. (A stop that cleared a flag a
        start could set again let the old manager run on beside the new one:
        the stop waited 5 s, and closed the new manager's pipe under it.)

        Should the loop itself fail, the runs it had end with that error (their
        callers would wait for ever otherwise), and the next ``start`` (any
        run's submit) starts a new manager.
        """
        me = threading.current_thread()
        mine: list[selectors.BaseSelector] = []  # the selector it made last (_manage_loop)
        try:
            self._manage_loop(me, mine)
        except BaseException as exc:
            log.error("mpmagic: the pool's manager failed", exc_info=True)
            runs: list[_LocalRun] = []
            with self._lock:
                if self._manager is me:  # no run is handed to it any more (a stale one's runs are not its own)
                    self._manager = None
                    runs = list(self._runs)
                    self._runs.clear()
                    self._calls.clear()
            error = MPMagicError(f"the pool's manager thread failed ({type(exc).__name__}: {exc}); "
                                 "the next run starts a new one")
            for run in runs:
                run._finish(error)
        finally:
            with self._lock:  # (under the lock: a stop writes to its pipe under it)
                for fd in (wake_r, wake_w):
                    os.close(fd)
                if self._wake_r == wake_r:  # (no newer manager opened its own)
                    self._wake_r = self._wake_w = -1
                for selector in mine:
                    if self._selector is selector:
                        self._selector = self._selector_slots = None
                    selector.close()

    def _manage_loop(self, me: threading.Thread, mine: list[selectors.BaseSelector]) -> None:
        """``_manage``'s loop, while ``me`` is the manager; ``mine`` holds the selector it uses."""
        while True:
            with self._lock:
                if self._manager is not me:
                    return
                self._step()
                selector = self._selector_for_slots()
                mine[:] = [selector]
                timeout = self._next_timeout()
            try:
                ready = [(key.data, events) for key, events in selector.select(timeout)]
            except (OSError, ValueError):  # a pipe closed meanwhile by a caller (resize): look again
                with self._lock:
                    if self._selector is selector:
                        self._selector_slots = None
                continue
            with self._lock:
                if self._manager is not me:
                    return
                try:
                    self._pump(ready)
                    # Replies that came while it handled these (the other worker's
                    # chunk of a 2-item map, typically): handled now, before the
                    # step, not after a step and a select of their own.
                    for _ in range(_MORE_READY):
                        if self._selector_slots != tuple(self.slots):
                            break  # a worker replaced: the selector is rebuilt first
                        try:
                            ready = [(key.data, events) for key, events in selector.select(0)]
                        except (OSError, ValueError):  # a pipe closed meanwhile: the next turn rebuilds it
                            self._selector_slots = None
                            break
                        if not ready:
                            break
                        self._pump(ready)
                except Exception as exc:  # never a dead manager and callers waiting forever
                    log.error("mpmagic: the pool's manager failed", exc_info=True)
                    for run in list(self._runs):
                        self._end(run, exc)
            # Not kept while it sleeps in the next select (with no timeout when
            # idle): the list holds the slots that last spoke or died, and a
            # retired or replaced worker's slot kept its Process, and so its two
            # pipe fds, open until the next wakeup (the chaos soak's +1 fd).
            ready = []

    def _step(self) -> None:
        try:
            self._check_restarts()
            self._check_runs()
            if payload_cache.news(self._retired_seen):
                self._send_forgets()  # (first: a worker lets the old copy go before it loads the new one)
            version = worker_setup.version()
            readied = self._readied = tuple(self.slots)
            try:
                for slot in readied:  # worker setup (new workers, or a new %%pool setup), then warm imports
                    if slot.setup_sent != version:
                        self._send_setup(slot)
                    self._send_imports(slot)
                self._assign()
            finally:
                self._readied = ()  # (not kept past the hand-out: a slot replaced later keeps its pipes open)
            self._replace_broken()  # never a run waiting for a worker that cannot be sent to
            self._check_runs()
            shm_names = shm.take_unmapped()
            if shm_names:
                self._send_unmaps(shm_names)
        except Exception as exc:
            log.error("mpmagic: the pool's manager failed", exc_info=True)
            for run in list(self._runs):
                self._end(run, exc)

    def _next_timeout(self) -> float | None:
        # (One pass and no lists: it runs after every step, the usual answer None.)
        first: float | None = None
        idle = False
        for s in self.slots:
            for t in (s.deadline, s.setup_deadline, s.stall_at):
                if t is not None and (first is None or t < first):
                    first = t
            if not s.inflight:
                idle = True
            elif s.setup_since is not None and _waits_for_setup(s) and not all(r.setup_wait_said for r, _ in s.inflight):
                t = s.setup_since + _SETUP_NOTE_AFTER
                if first is None or t < first:
                    first = t
        now = None
        for r in self._runs:
            job = r.job
            for t in (r.grace_deadline, job.abort_at):
                if t is not None and (first is None or t < first):
                    first = t
            if idle:  # an idle worker: items of a slow input's read may go to it
                w = job.input_wait()
                if w is not None:
                    if now is None:
                        now = time.monotonic()
                    if first is None or now + w < first:
                        first = now + w
        if first is None:
            return None
        # At most an hour: the loop looks again then. ``select`` refuses a wait
        # of more than ~24.8 days (a --timeout of inf or 1e7), and the manager
        # died of it (OverflowError) with the run waiting for ever.
        return min(_MAX_WAIT, max(0.0, first - time.monotonic()))

    def _selector_for_slots(self) -> selectors.BaseSelector:
        """An epoll selector on the wakeup pipe and every worker's pipe and sentinel,
        rebuilt only when the workers change (``multiprocessing.connection.wait``,
        which this replaced, builds one per call (~20 us here, three calls per warm 2-item map))."""
        slots = tuple(self.slots)
        if self._selector is None or self._selector_slots != slots:
            if self._selector is not None:
                self._selector.close()
            sel = selectors.DefaultSelector()
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            for slot in slots:
                sel.register(slot.conn.fileno(), selectors.EVENT_READ, (slot, True))
                sel.register(slot.proc.sentinel, selectors.EVENT_READ, (slot, False))
            self._selector, self._selector_slots = sel, slots
            for slot in slots:
                slot.writing = False
        for slot in slots:  # room in a pipe matters only while a send waits for it
            if slot.writing != slot.sender.pending:
                slot.writing = slot.sender.pending
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if slot.writing else 0)
                self._selector.modify(slot.conn.fileno(), events, (slot, True))
        return self._selector

    def _pump(self, ready: list) -> None:
        """Handle whatever the workers said (``(slot, True)``), and their deaths (``(slot, False)``)."""
        for what, _ in ready:
            if what is None:
                try:
                    os.read(self._wake_r, 4096)  # the wakeup pipe: emptied (the step looks at everything)
                except (BlockingIOError, OSError):
                    pass  # drained already
                break
        dead = []
        for what, events in ready:
            if what is None or what[0] not in self.slots:
                continue  # the wakeup pipe, or a worker replaced meanwhile
            slot, talked = what
            if talked:
                if events & selectors.EVENT_WRITE:
                    try:
                        slot.sender.flush()  # room again: what waited goes on
                    except OSError:
                        dead.append(slot)
                        continue
                if events & selectors.EVENT_READ and not self._drain(slot):
                    dead.append(slot)
            else:
                dead.append(slot)
        for slot in dict.fromkeys(dead):
            if slot in self.slots:
                self._drain(slot)
                self._lost(slot)
        self._check_deadlines()

    def _holding(self, run: _LocalRun) -> list[_Slot]:
        return [s for s in self.slots if s.inflight and any(r is run for r, _ in s.inflight)]

    def _check_runs(self) -> None:
        """End runs that finished, failed (after a grace for their later chunks) or were cancelled."""
        if not self._runs:
            return
        now = time.monotonic()
        for run in list(self._runs):
            if run.failed_with is not None:
                self._end(run, run.failed_with)
            elif run.cancel_requested:
                if run.interrupted:
                    self._interrupted_at = now
                self._abandon(run)
                self._end(run)
            elif run.job.finished:
                busy = self._holding(run)
                if not busy:
                    self._end(run)
                elif run.grace_deadline is None:
                    run.grace_deadline = now + _FAIL_GRACE
                elif now >= run.grace_deadline:
                    self._abandon(run)
                    self._end(run)
            elif run.job.abort_at is not None and now >= run.job.abort_at:
                # A rank failed and others still run (maybe waiting on it for ever): they are
                # stopped, as an MPI job aborts (jobs.CellJob.abort); what they printed is shown first.
                run.job.abort()
                self._abandon(run)
                self._end(run)

    def _abandon(self, run: _LocalRun) -> None:
        """Stop the workers busy with ``run``, showing what they printed first."""
        for slot in self._holding(run):
            self._drain(slot, seconds=_DRAIN_ON_CANCEL)
            if not slot.killed:  # (_no_files replaced it meanwhile)
                self._show_tail(slot)
                self._replace(slot)
                run.workers_stopped += 1

    def _end(self, run: _LocalRun, error: BaseException | None = None) -> None:
        """The run is over: nobody reads its chunks any more. Give back its segments."""
        if run not in self._runs:
            return
        self._abandon(run)
        self._runs.remove(run)
        self._calls.pop(run.job.call_id, None)
        try:
            run.job.release_shared()
        finally:
            if run.job.kind == "cell":
                for s in [s for s in self.slots if s.temporary and not s.busy]:
                    self._retire(s)
            if run.setup_failed_more:  # (before its end: the line is the run's last)
                run.note("stderr", _more_setup_failures(run.setup_failed_more))
            run._finish(error)

    def _depth(self, job: Job) -> int:
        """Units in flight per worker: 2 hides latency for short chunks.

        With a memory limit, 1: a worker's size is checked after each unit
        (``_note_memory``), and a unit already sent behind it would run on a
        worker found over the limit ("replaced before its next task").
        """
        planner = job.planner  # (None for a cell)
        if planner is None or job.timeout or self.max_memory:
            return 1
        per_item = planner.per_item
        if per_item is None:
            return 1
        if (planner.bytes_per_item or 0) * max(planner.sizes_used or {1}) > 8 << 20:
            return 1  # big chunks: a second one in flight would only hold more memory
        return 2 if per_item * max(planner.sizes_used or {1}) < 0.02 else 1

    def _assign(self) -> None:
        """Hand out units: cells' ranks first (each on an idle worker of its own),
        then maps' chunks to idle workers, fewest-held run first (fair sharing),
        then a second chunk behind a running one of the same run (pipelining).

        The units are queued per worker and sent together at the end: the
        first send wakes a worker, which on a busy 2-core machine often takes
        this CPU before the next unit is even packed (timestamps in both
        processes: the second unit of a warm 2-item map went out ~60 us after
        the first, ~10 us now).
        """
        self._held = []
        try:
            self._assign_units()
        finally:
            held, self._held = self._held, None
            for slot in held:
                try:
                    slot.sender.flush()
                except OSError:  # it died: its sentinel reports it, and _lost sends its units again
                    self._send_failed(slot)

    def _send_failed(self, slot: _Slot) -> None:
        """A write to ``slot``'s pipe failed: no more units for it (``_assign`` would
        retry it without end). Its worker died, and its sentinel reports it, or
        it lives with a pipe we cannot write to: ``_replace_broken`` replaces it
        at the next step either way, so that no run waits for a death that never comes."""
        slot.broken = True
        slot.known.clear()  # what was queued with the failed write may not have arrived

    def _replace_broken(self) -> None:
        """Every slot marked broken leaves the pool now: a dead worker as any
        death (``_lost`` blames its unit), a live one replaced and its units
        sent again. Three in a row with no unit sent in between end the runs
        with one line rather than replace workers in a loop."""
        for slot in [s for s in self.slots if s.broken]:
            if slot not in self.slots:
                continue
            slot.proc.join(0.1)  # a write failed: a dying worker has closed its end already
            if slot.proc.exitcode is not None:
                self._drain(slot)
                self._lost(slot)
                continue
            self._send_failures += 1
            self._replace(slot)
            if self._send_failures >= 3:
                self._send_failures = 0
                error = MPMagicError(
                    "mpmagic could not send work to live workers 3 times in a row; run `%pool restart`"
                )
                for run in list(self._runs):
                    self._end(run, error)

    def _put(self, slot: _Slot, data: bytes | tuple[bytes, ...]) -> None:
        """Send ``data`` (a message, or its parts: ``pipes.frame``) to ``slot`` now,
        or at the end of ``_assign`` when in it."""
        if self._held is None:
            slot.send(data)
            return
        if slot.sender.queue(data) > _HOLD_MAX:
            slot.sender.flush()  # a big chunk goes now: packing the next one takes longer than a wake-up
        elif slot not in self._held:
            self._held.append(slot)

    def _assign_units(self) -> None:
        # (Every step runs this, and a warm 2-item map's submit takes one: plain
        # loops, not a list per kind and a sort per level.)
        maps: list[_LocalRun] = []
        cells: list[_LocalRun] = []
        for r in self._runs:
            if not r.cancel_requested and r.job.has_work:
                if r.job.kind == "map":
                    maps.append(r)
                elif r.job.kind == "cell":
                    cells.append(r)
        for run in cells:
            self._assign_ranks(run)
        if not maps:
            return
        pool = [s for s in self.slots if not s.temporary and not s.retiring]
        saturable = bool(self.max_tasks_per_child)  # (else only over_memory saturates a worker: _saturated)
        # A worker still starting takes units only while no worker is ready (a pool
        # starting cold). Beside a ready one it waits for its own Ready: a worker
        # replaced after an interrupt or a crash (spawn: ~1 s to start) was given its
        # share of the next map at once, and the run waited for it while the ready
        # worker sat idle (4 chunks of 40 ms took 1.1 s, the report blaming transfer).
        some_ready = any(s.ready and not s.broken and not s.over_memory and not (saturable and self._saturated(s))
                         for s in pool)
        paired: list[_Slot] = []  # given two chunks as one at level 0: what level 1 would have queued there
        for level in range(2):
            if level:
                for r in maps:
                    if r.job.has_work:
                        break
                else:
                    return  # (what level 0 left: nothing to pipeline)
            # The least loaded first: only workers with ``level`` units take one,
            # each one at most, so going through them in pool order is that order.
            for slot in pool:
                if len(slot.inflight) != level or slot.broken or slot.over_memory or (saturable and self._saturated(slot)):
                    continue
                if (some_ready and not slot.ready) or (level and paired and slot in paired):
                    continue
                # A run may find its input just ran out (an iterator of exactly
                # N chunks): then the next run in turn gets this worker.
                while len(slot.inflight) == level and not slot.broken:
                    chosen = self._next_run(maps, slot, level)
                    if chosen is None:
                        break
                    # (a run alone in flight never pairs: each of its short chunks has a worker of its own)
                    pair = not level and len(self._runs) > 1 and self._pairs(chosen, slot, pool, some_ready, saturable)
                    if pair:
                        paired.append(slot)
                    self._give(chosen, slot, pair)

    def _next_run(self, maps: list[_LocalRun], slot: _Slot, level: int) -> _LocalRun | None:
        """The next map run that may put a unit on ``slot`` at this depth.

        Foreground runs before background ones (see engine.Run.background);
        among them the run holding the fewest workers now, in turn between
        equals. Fewest-held first, not strict turns: beside a busy run, a small
        run gets every worker that frees until it holds its share. In strict
        turns its second item waited for a second worker to free (the busy run
        took back the first one): a 2-item map beside a run of 0.1 s items took
        ~150 ms, ~50 ms now (issue 15's fairness row).
        """
        n = len(maps)
        if n == 1 and not level and not maps[0].limit:
            # One map run in flight with no worker limit (a warm call's usual case), at
            # the first depth: what the loop below finds (that run or none; the turn 0).
            run = maps[0]
            if not run.job.has_work or run.cancel_requested or run not in self._runs:
                return None
            self._turn = 0
            return run
        best: tuple[bool, int, int] | None = None  # (background, workers held, k)
        for k in range(n):
            run = maps[(self._turn + k) % n]
            job = run.job
            if not job.has_work or run.cancel_requested or run not in self._runs:
                continue
            if level:
                if slot.inflight[0][0] is not run or self._depth(job) <= level:
                    continue  # pipelining stays within one run
                held = 0
            else:
                held = len(self._holding(run)) if n > 1 or run.limit else 0
                if run.limit and slot not in self.slots[: run.limit] and held >= run.limit:
                    continue
            key = (run.background, held, k)
            if best is None or key < best:
                best = key
                if not run.background and held == 0:
                    break
        if best is None:
            return None
        k = best[2]
        self._turn = (self._turn + k + 1) % n
        return maps[(self._turn - 1) % n]

    def _pairs(self, run: _LocalRun, slot: _Slot, pool: list[_Slot], some_ready: bool, saturable: bool) -> bool:
        """Would this hand-out queue ``run``'s next two chunks both on ``slot``, the
        second behind the first (its pipelining, level 1)? Then they go as one chunk
        (``next_unit``'s ``pair``): one message, one reply and one wake-up of the
        worker and of this thread fewer, the same items on the same worker in the
        same order. Runs from several threads at once queued each run's two short
        chunks on one worker so, while the other worker served other runs.

        Only for chunks this short (together under the planner's floor, the work
        too small to cut finer): a longer first chunk runs while the second is
        packed (the 100,000-item row). And only when no other idle worker would
        take the second chunk in this pass: none is idle, or each idle one goes
        to a run that holds no worker yet (fewest-held first: ``_next_run``).
        """
        job = run.job
        if job.kind != "map" or self._depth(job) < 2:
            return False
        planner = job.planner
        per_item = planner.per_item
        if planner.fixed or planner.ramp or per_item is None:
            return False
        size = 2 * planner.size_hint()
        if per_item * size >= planner.min_seconds or (planner.bytes_per_item or 0) * size > 8 << 20:  # (as _depth)
            return False
        idle = 0
        for s in pool:
            if s is slot or s.inflight or s.broken or s.over_memory or (saturable and self._saturated(s)):
                continue
            if some_ready and not s.ready:
                continue
            idle += 1
        if not idle:
            return True
        rivals = 0  # runs each idle worker takes before this one: holding none, not behind it (background)
        for r in self._runs:
            if (r is not run and r.job.kind == "map" and not r.cancel_requested and (run.background or not r.background)
                    and r.job.has_work and not self._holding(r)):
                rivals += 1
        return rivals >= idle

    def _give(self, run: _LocalRun, slot: _Slot, pair: bool = False) -> None:
        try:
            unit = run.job.next_unit(self._allowance(slot), pair=True) if pair else run.job.next_unit(self._allowance(slot))
        except Exception as exc:  # an item that cannot be sent: the run's error
            self._end(run, exc)
            return
        if unit is not None:
            self._send_unit(slot, run, unit)

    def _assign_ranks(self, run: _LocalRun) -> None:
        idle = [s for s in self.slots if not s.inflight and not s.retiring and not s.broken and not self._saturated(s)]
        job = run.job
        if job.pinned:  # %%parallel --keep (ranks.KeptCellJob): rank r only on its worker
            self._assign_kept_ranks(run, [s for s in idle if not s.temporary])
            return
        missing = job.ranks_pending - len(idle)
        for k in range(max(0, missing)):  # every rank runs at once: more workers for now
            try:
                slot = self._spawn(temporary=True)
            except MPMagicError as error:  # (_start_failed's line: this run's error, not the manager's)
                self._end(run, error)
                return
            except OSError as exc:
                if not out_of_files(exc):
                    raise
                asked = len(self.slots) + missing - k
                self._end(run, self._files_ran_out([s for s in idle if s.temporary], shrink=False, asked=asked))
                return
            except NoRoomForTasks:  # (it escaped the manager: the cell failed with a bare NoRoomForTasks)
                asked = len(self.slots) + missing - k
                self._end(run, self._tasks_ran_out([s for s in idle if s.temporary], asked=asked))
                return
            self.slots.append(slot)
            idle.append(slot)
        for slot in idle:
            if not job.has_work:
                return
            self._give(run, slot)

    def _assign_kept_ranks(self, run: _LocalRun, idle: list[_Slot]) -> None:
        """Kept ranks wait for the pool worker that holds them (never a temporary one)."""
        job = run.job
        job.drop_orphans({s.wid for s in self.slots})  # pinned to a worker that is gone: its error
        for slot in idle:
            if not job.has_work:
                return
            unit = job.next_unit_for(slot.wid)
            if unit is not None:
                self._send_unit(slot, run, unit)

    def _send_unit(self, slot: _Slot, run: _LocalRun, unit: Any) -> None:
        job = run.job
        if slot.broken:  # (replaced during this hand-out: see _Slot.close)
            job.requeue(unit)
            return
        if slot not in self._readied:  # (the step's own look covered the others, just before)
            self._send_setup(slot)  # worker setup first (a worker started since the last _step)
            self._send_imports(slot)  # warm: a worker spawned just now gets the modules before the unit
        if len(slot.known) > _KNOWN_MAX:  # bounded: forgetting only costs sending one again
            slot.known.clear()
        # Built first, written after: an error building them (the notebook's,
        # not the worker's) is the run's; only a write's error means the worker
        # is gone. A deleted notebook directory (os.getcwd raising) was taken
        # for a dead worker: live workers marked broken, the run waiting for ever.
        try:
            # The notebook's cwd, environment, sys.path...: sent only when this
            # worker does not have the current version (see context.py).
            ctx = context.current(job.call_id, job.libs)
            messages: list[bytes | tuple[bytes, ...]] = []
            keys = []
            known = slot.known
            ctx_key = context.key(ctx)
            if ctx_key not in known:
                messages.append(pack(ctx))
                keys.append(ctx_key)
            func_key = job.func_key
            if func_key is not None and func_key not in known:
                messages.append(pack(Func(func_key, job.func_payload)))
                keys.append(func_key)
            messages.append(pack_parts(job.message(unit)))  # (a chunk's large items: uncopied)
        except Exception as exc:
            job.requeue(unit)
            self._end(run, exc)
            return
        note = context.take_note()  # the notebook's directory cannot be used: said once
        if note:
            run.note("stderr", note)
        try:
            for data in messages:
                self._put(slot, data)
        except OSError:
            job.requeue(unit)
            self._send_failed(slot)
            return
        if keys:
            slot.known.update(keys)
        self._send_failures = 0
        slot.inflight.append((run, unit))
        unit.sent_to, unit.sent_at = slot.wid, time.time()  # (--insights: a unit lost with its worker)
        if len(slot.inflight) == 1:  # (its wait starts now: see _check_stopped)
            slot.stall_at = time.monotonic() + _STOPPED_NOTE_AFTER
        run.units_sent = True
        if run.waiting_since is not None:  # its first unit: how long it waited for the other runs' workers
            job.waited_for_workers += time.monotonic() - run.waiting_since
            run.waiting_since = None
        if len(self._runs) > 1:
            self._note_sharing()
        if job.timeout and len(slot.inflight) == 1:  # (its clock starts once the worker is ready and set up)
            self._start_clock_of(slot)

    def _note_sharing(self, new: _LocalRun | None = None) -> None:
        """Mark the runs that hold workers at the same moment as sharing them
        (``job.shared_workers``): each one's wall time then counts waiting for
        the others, which its report's advice must not call a transfer cost
        (a quick %pmap behind a --bg run was told its chunks cost ~0.4 s to
        send). ``new``: a run just submitted (under the lock); when every
        worker is busy with other runs, its wait for one starts now.

        Called only while several runs are in flight (one run pays nothing).
        """
        holders = {id(r): r for s in self.slots for r, _ in s.inflight}
        if new is not None and holders and id(new) not in holders:
            if all(s.inflight or s.broken or s.retiring for s in self.slots):
                new.waiting_since = time.monotonic()
            holders[id(new)] = new
        if len(holders) > 1:
            for r in holders.values():
                r.job.shared_workers = True

    def _saturated(self, slot: _Slot) -> bool:
        """Has this worker been given its ``max_tasks_per_child`` items already?"""
        if slot.over_memory:
            return True
        left = self._allowance(slot)
        return left is not None and left <= 0

    def _allowance(self, slot: _Slot) -> int | None:
        """How many more items this worker may be given under ``max_tasks_per_child``
        (None: no limit). Chunks are cut to it: an automatic chunk of 6 items went to
        a worker limited to 3, which then ran 6 (migrate14)."""
        if not self.max_tasks_per_child:
            return None
        queued = sum(unit.count for _, unit in slot.inflight)
        return self.max_tasks_per_child - slot.tasks - queued

    def _drain(self, slot: _Slot, seconds: float | None = None) -> bool:
        """Handle every message waiting on this worker's pipe. False on EOF.

        ``seconds`` bounds the time spent, for a worker that keeps talking.
        """
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            try:
                messages, closed = slot.receiver.read()
            except OSError:
                return False
            for data in messages:
                self._handle(slot, unpack(data))
            if closed:
                return False
            if slot.receiver.empty or (deadline is not None and time.monotonic() > deadline):
                return True

    def _handle(self, slot: _Slot, msg: Any) -> None:
        kind = type(msg)
        if kind is Ready:
            slot.ready = True
            self._startup_failures = 0
            slot.pid = msg.pid
            if slot.setups_ahead:  # (its setup starts now: sent while it started)
                slot.setup_since = time.monotonic()
            self._start_clock_of(slot)  # its first unit's time starts now (not while it started)
            self._cond.notify_all()
            return
        if kind is SetupDone:  # worker setup (worker_setup.py): how it went on this worker
            if _waits_for_setup(slot):  # (its units in flight came after this setup: they waited for it)
                _note_setup_wait(slot)
            if slot.setups_ahead:
                slot.setups_ahead.popleft()
                slot.setups_real.popleft()
            slot.setup_deadline = None
            slot.setup_since = time.monotonic() if slot.setups_ahead else None  # (the next one's start)
            # The unit that waited for this setup starts its time now (a slow setup
            # after a restart or a recycling is no task's timeout).
            if slot.deadline is None:
                self._start_clock_of(slot)
            self._setup_done(slot, msg)
            return
        if kind not in _WORKER_SAYS:
            raise ProtocolError(f"worker {slot.wid} sent a {kind.__name__} message, which workers never send")
        run = self._calls.get(msg.call)
        if kind is Out:
            if run is not None:
                run.job.output(msg.tag, msg.stream, msg.text)
            return
        if kind is Outs:
            if run is not None:
                for stream, text in msg.pieces:
                    run.job.output(msg.tag, stream, text)
            return
        if kind is Collected:  # (not a reply: the unit it names is still running)
            if run is not None and slot.inflight and slot.inflight[0][0] is run and slot.inflight[0][1].id == msg.tag:
                run.job.collected(slot.inflight[0][1], msg.index, msg.info)
            return
        # A reply: it answers the oldest unit in flight on this worker.
        if not slot.inflight or slot.inflight[0][1].id != msg.tag or slot.inflight[0][0].job.call_id != msg.call:
            return _discard(msg)  # a reply for a unit we already gave up on
        owner, unit = slot.inflight.popleft()
        slot.deadline = None
        if kind is Done and msg.meta is not None and "loads" in msg.meta:  # (a run cut off's reply too)
            slot.loads.update(msg.meta["loads"])
        slot.stopped_said = False  # (it answers: it runs)
        slot.stall_at = time.monotonic() + _STOPPED_NOTE_AFTER if slot.inflight else None
        if kind is NoFiles:  # the worker is unfit, whichever run the unit is of
            return self._no_files(slot, owner, unit, msg)
        if slot.setups_ahead:  # one unit fewer before each setup still running
            slot.setups_ahead = deque(max(0, n - 1) for n in slot.setups_ahead)
        if slot.inflight and slot.inflight[0][0].job.timeout:  # (_start_clock's own first look)
            self._start_clock_of(slot)
        if kind is Done or kind is Error:
            slot.tasks += unit.count
            self.tasks_run += unit.count
        if run is None or run is not owner or owner.job.finished or owner.cancel_requested:
            if kind is Done and run is not None and run is owner and not run.cancel_requested:
                return run.job.came_back_late(unit, msg.data)  # a later chunk of a run that failed
            return _discard(msg)  # a reply for a run cut off
        job = owner.job
        try:
            if kind is Done or kind is Error:
                note = self._without_setup(slot)
                if note is not None:
                    job.ran_without_setup(unit, note)
            if kind is Done:
                if slot.loads and owner.file_versions:
                    self._say_other_versions(slot, owner)
                self._note_memory(slot, owner, msg.meta)
                if slot.temporary and msg.meta is not None:
                    # Its imports are not one-time: the next cell starts new temporary workers (warmup.OneTimeCosts).
                    msg.meta["temporary"] = True
                job.done(unit, msg.data, msg.seconds, msg.meta)
            elif kind is Error:
                job.error(unit, msg.index, msg.info, msg.partial, msg.seconds)
            elif kind is Unpicklable:
                job.unpicklable(unit, msg.index, msg.info)
            else:  # Missing
                slot.known.discard(msg.key)
                job.requeue(unit)
        except Exception as exc:  # e.g. a result that cannot be loaded here: that run's error
            self._end(owner, exc)

    def _no_files(self, slot: _Slot, run: _LocalRun, unit: Any, msg: NoFiles) -> None:
        """The worker had no file descriptor left to load ``unit`` (mapping the shared
        memory of the function's captured arrays or of the items needs one for a
        moment; ``worker._Worker._unfit``): tasks it ran left files open and used
        up its limit. It cannot serve any unit that sends arrays, and a fresh worker
        can, as serial Python can (the notebook has its descriptors): it is replaced
        as a dead worker is, ``unit`` goes out again, and the run's cell gets one
        line saying which worker, why, and what to do. (Before, every later call
        that sent arrays failed with a traceback through mpmagic's shared-memory
        code, ``--errors collect`` raised it too, until ``%pool restart``.)

        A worker that had run no task yet is not fixed by another like it: the
        unit fails as not run (a ``Failed`` with ``--errors collect``), saying so
        in one line, and no traceback. A task's own ``EMFILE`` (its ``open()``) is
        its error, as serially: the worker says ``NoFiles`` only for mpmagic's load.
        """
        opened = _open_files(slot.pid)  # (read before the kill: /proc/<pid>/fd)
        limit = msg.limit if msg.limit is not None else _file_limit_of(slot.pid)
        fresh = slot.tasks == 0
        self._replace(slot)
        if run not in self._runs or run.job.finished or run.cancel_requested:
            return
        what = run.job.describe_unit(unit)
        count = f"{opened} open" if opened is not None else "all open"
        held = count if limit is None else f"{count}, its limit is {limit}"
        worker_named = f"worker {slot.wid} (pid {slot.pid})"
        if msg.errno == errno.ENFILE:
            why = (f"the system had no file descriptors left for {worker_named} to load {what} "
                   f"(ENFILE: its open-file table is full; the worker held {count})")
        else:
            why = f"{worker_named} had no file descriptors left to load {what} ({held}"
            why += ")" if fresh else ": its tasks left files open)"
        if fresh and msg.errno == errno.ENFILE:  # (a new worker would fail the same)
            run.job.not_run(unit, f"{why}: it was replaced; close files on this machine, or raise its "
                                  "limit (fs.file-max)")
        elif fresh:
            run.job.not_run(unit, f"{why} before it ran any task (its start or its %%pool setup used them): it "
                                  "was replaced; raise the limit (`ulimit -n` before starting Jupyter), or keep "
                                  "fewer files open in a %%pool setup")
        elif run.job.pinned:  # (a --keep rank's state lives on that worker: it cannot go elsewhere)
            run.job.not_run(unit, f"{why}; the worker was replaced, and a --keep rank cannot move to another; "
                                  "close files in the task (`with open(...) as f:`)")
        else:
            run.note("stderr", f"mpmagic: {why}: it was replaced, and {what} went to a new worker; "
                               "close files in the task (`with open(...) as f:`)\n")
            run.job.requeue(unit)

    @staticmethod
    def _say_other_versions(slot: _Slot, run: _LocalRun) -> None:
        """Say once per run and module when the worker that answered ``run`` runs a newer
        version of a user module the run may use than the notebook's at the run's start.

        The file was saved while the run went on (not reloaded here), and this worker
        imported it since (recycled by ``max_tasks_per_child``, added by ``%pool resize``,
        replacing a dead one): its items ran the new code, where serial Python, and the
        workers that imported it before, run the version the notebook loaded. Nothing
        said it: the run's start had found the file as loaded. Only a worker's version
        saved later than the one at the start counts (one that failed to follow a reload
        here runs an older one: not this). A ``--checkpoint`` run stores none of what came
        after the save (``checkpoint._KeyedFiles``). Per reply: a dict lookup per module."""
        for name, at_start in run.file_versions.items():
            here = slot.loads.get(name)
            if here is None or here == at_start or here[0] <= at_start[0] or name in run.versions_said:
                continue
            run.versions_said.add(name)
            shown = os.path.basename(getattr(sys.modules.get(name), "__file__", None) or name)
            run.note("stderr", (
                f"mpmagic: {shown} changed on disk while this run went on: worker {slot.wid} imported it since, so "
                f"the items it runs use the file's new code, where serial Python (and the workers that imported it "
                f"before) runs the version the notebook loaded; importlib.reload({name}) (or put the old file "
                f"back) and run again to get one version\n"))

    def _note_memory(self, slot: _Slot, run: _LocalRun, meta: dict | None) -> None:
        """Keep the worker's reported size (its private memory: shared-memory pages
        it only maps are not counted); above ``max_memory`` it gets no more work."""
        rss = meta.get("rss") if meta else None
        if rss is None:
            return
        slot.rss = rss
        if self.max_memory and rss > self.max_memory and not slot.over_memory:
            slot.over_memory = True
            run.note(
                "stderr",
                f"mpmagic: worker {slot.wid} holds {fmt_bytes(rss)} of its own memory after its task, over the pool's "
                f"max_memory of {fmt_bytes(self.max_memory)}: it is replaced before its next task\n",
            )

    def _send_forgets(self) -> None:
        """Tell every worker which payloads the notebook's cache dropped since it last
        looked (``payload_cache.retired_since``): the function was defined again, a
        global it captures was rebound, or it was collected. Each worker kept its
        own loaded copy of each (within ``payload_cache.excess``), with all the function
        captured by value: re-running the cell that defines ``f`` over a 100 MB
        table added 100 MB to every worker, each time."""
        keys, self._retired_seen = payload_cache.retired_since(self._retired_seen)
        if not keys:
            return
        msg = pack(Forget(keys))
        for slot in self.slots:
            slot.known.difference_update(keys)  # (a run still using one sends it again)
            if slot.broken:
                continue
            try:
                self._put(slot, msg)
            except OSError:
                log.debug("mpmagic: worker %s gone: its functions went with it", slot.wid)

    def _send_unmaps(self, names: list[str]) -> None:
        """Tell every worker which shared-memory segments the notebook destroyed."""
        msg = pack(Unmap(names))
        for slot in self.slots:
            try:
                slot.send(msg)
            except OSError:
                log.debug("mpmagic: worker %s gone: its mappings went with it", slot.wid)

    def _show_tail(self, slot: _Slot) -> None:
        """What the worker held of its task's output and never sent (it died, or is stopped
        now), shown in the run of its running unit (``worker._Tail``): a task's last lines
        before a segfault were lost, though they say where it was."""
        if slot.tail is None or not slot.inflight:
            return
        run, unit = slot.inflight[0]
        if run not in self._runs or run.job.finished:
            return
        try:
            for stream, text in worker.read_tail(slot.tail):
                run.job.output(unit.id, stream, text)
        except Exception:  # (never a reason to fail the manager)
            log.debug("mpmagic: could not show what worker %s held of its output", slot.wid, exc_info=True)

    def _show_setup_tail(self, slot: _Slot) -> None:
        """What the setup a worker died in had printed (its tail: the worker copies the
        setup's writes there, ``worker_setup.run_setup``), labelled ``[worker N]`` as the
        setup's output is, where that would have been shown (``_say_setup_output``; an
        explicit ``%%pool setup`` collects it). It went with the worker, though it says
        how far the setup got ("loading weights..." before a crash or a kill)."""
        if slot.tail is None:
            return
        try:
            text = "".join(t for _, t in worker.read_tail(slot.tail))
        except Exception:  # (never a reason to fail the manager)
            log.debug("mpmagic: could not read what worker %s's setup printed", slot.wid, exc_info=True)
            return
        printed = worker_setup.take_printed(slot.wid, text)
        if printed:
            self._say_setup_output(slot, printed)

    def _lost(self, slot: _Slot) -> None:
        """A worker died: blame its running unit, send the queued ones again."""
        if slot.killed:  # (replaced already, while its messages were read: see _no_files)
            return
        slot.proc.join(0.1)
        shm.sweep_worker(slot.pid)  # results it made but never handed over
        # Its units waited behind the setup it was running (a setup ahead of them all): their
        # error says so, not as if the item had been running; what it printed is the setup's.
        in_setup = bool(slot.setups_ahead and slot.setups_ahead[0] == 0 and slot.setups_real and slot.setups_real[0])
        if in_setup:
            self._show_setup_tail(slot)
        else:
            self._show_tail(slot)  # what its task printed last, before the line that blames it
        code = slot.proc.exitcode
        # It could not start its threads (ulimit -u): not replaced. Only a worker
        # that never said it was ready: its threads start before that, and a task
        # that exits with 75 (EX_TEMPFAIL, used by real tools) is an ordinary death.
        if code == worker.EXIT_NO_THREADS and not slot.ready:
            for run, unit in slot.inflight:
                run.job.requeue(unit)
            slot.inflight.clear()
            self._kill(slot)
            self.workers_replaced -= 1  # (nothing replaced it)
            self._tasks_short()
            return
        reason = describe_exitcode(code)
        if code == -signal.SIGTERM and self.start_method == "fork" and threads.numba_omp_used():
            reason = (f"terminated itself with SIGTERM ({threads.NUMBA_OMP_FORK}; start the pool with the default "
                      "start method, forkserver, or spawn)")
        elif code == -signal.SIGKILL and _near_memory_limit(slot, self.max_memory):
            reason = f"ran out of memory (killed by SIGKILL; {fmt_bytes(slot.rss or 0)} of its own at its last report)"
        inflight = list(slot.inflight)
        slot.inflight.clear()
        # A start-up death right after an interrupt is that interrupt, not a broken setup.
        interrupted = time.monotonic() - self._interrupted_at < 5
        if slot.setup_sent and slot.setup_sent == worker_setup.version() and not interrupted:
            # Its setup killed it (or a kill from outside did: the setup stays, worker_setup.died).
            line = worker_setup.died((self.pool_key, slot.wid), slot.wid, reason, code)
            if line:  # (in the run its units were of; with no run in flight: held for the next run, it was dropped)
                self._say_to_waiting(inflight, line if line.endswith("\n") else line + "\n")
            self._cond.notify_all()
        # It never said it was ready and exited with an error: Python failed to start it (spawn could not
        # import mpmagic, say; after an interrupt too), before it read any unit queued for it, so those go
        # back to their runs (they blamed rank 0 or item 0). Counted, so three in a row end the runs.
        never_ready = not slot.ready and time.monotonic() - slot.started < 30
        failed_start = never_ready and (
            (code is not None and code > 0) or (not inflight and not interrupted))
        if failed_start:
            self._startup_failures += 1
            if self._startup_failures >= 3:
                self._kill(slot)
                error = MPMagicError(
                    f"worker processes die while starting (the last {reason}); "
                    f"check that `python -c 'import mpmagic'` works, or try another start method"
                )
                for run in list(self._runs):
                    self._end(run, error)
                return
        else:
            self._startup_failures = 0
        self._replace(slot)
        # Killed between units (found by the chaos soak: a kill that landed
        # as one call ended failed the next call's first item, which had been
        # sent to the dead worker but never started): nothing is blamed.
        idle = slot.position is not None and slot.position.value == worker.POSITION_IDLE
        for i, (run, unit) in enumerate(inflight):
            if run not in self._runs or run.job.finished:
                continue
            # A kept rank (--keep) is not sent again: its state died with the worker.
            again = not run.job.pinned
            if failed_start and again:
                run.job.requeue(unit)  # (never started: three such deaths in a row end the runs, above)
            elif i == 0 and idle and again and not unit.resent_after_idle_death:
                # Once: a worker that dies again before starting it (loading
                # the function kills it) is this unit's fault after all.
                unit.resent_after_idle_death = True
                run.job.requeue(unit)
            elif i == 0:
                each = "rank" if run.job.kind == "cell" else "item"
                why = f"{reason} while it ran the worker setup, which this {each} waited for" if in_setup else reason
                run.job.lost(unit, why, index=_position(slot))
            else:
                run.job.requeue(unit)

    def _check_deadlines(self) -> None:
        """Stop the workers whose running item went past its --timeout (and fail
        that item), and those whose %%pool setup went past its bound.

        A unit's deadline is set when it starts (``_start_clock``): its timeout,
        counted from then, is its first item's. In a chunk of several items each
        later item's clock starts with that item (the worker stamps its start:
        ``worker.item_clock``), so when the deadline passes while the worker is
        on a later item, the deadline moves to that item's start plus the
        timeout; only an item running longer than the timeout is stopped.
        """
        now = time.monotonic()
        for slot in list(self.slots):
            if slot.deadline is not None and now >= slot.deadline and slot.inflight:
                index = _position(slot)  # (read before the stamp, which the worker writes first)
                if index and slot.stamp is not None:  # a later item of the chunk: timed from its own start
                    deadline = slot.stamp.value + (slot.inflight[0][0].job.timeout or 0.0)
                    if deadline > now:
                        slot.deadline = deadline
                        continue
                self._show_tail(slot)  # (what it printed last, before the line that blames it)
                run, unit = slot.inflight.popleft()
                self._replace(slot)
                if run in self._runs and not run.job.finished:
                    # (the item read above: one that overran and just ended must not pass the blame on)
                    run.job.lost(unit, "ran past its timeout", timed_out=True, index=index)
            elif slot.setup_deadline is not None and now >= slot.setup_deadline and slot in self.slots:
                self._setup_stuck(slot)
            if (slot.setup_since is not None and now >= slot.setup_since + _SETUP_NOTE_AFTER and slot.inflight
                    and slot in self.slots and _waits_for_setup(slot)):
                self._say_setup_waits(slot, now)
            if slot.stall_at is not None and now >= slot.stall_at:
                self._check_stopped(slot, now)

    def _check_stopped(self, slot: _Slot, now: float) -> None:
        """Its first unit in flight has waited ``_STOPPED_NOTE_AFTER``: if the worker is
        stopped (SIGSTOP, ``kill -STOP``, a debugger), tell each run with units on it,
        once, which of its items wait and the ways out.

        A stopped worker never answers, so its run waited for ever with no word,
        and ``%pool`` showed it busy. It is neither killed nor resumed here: the
        user (or the debugger) stopped it. Ctrl-C and ``--timeout`` end the wait
        as for any worker. Looked at again every ``_STOPPED_NOTE_AFTER`` while the
        unit stays (one read of ``/proc/PID/stat``), so a worker stopped during a
        long item is told too.
        """
        if not slot.inflight or slot not in self.slots:
            slot.stall_at = None
            return
        slot.stall_at = now + _STOPPED_NOTE_AFTER
        if slot.pid is None or not is_stopped(slot.pid):
            slot.stopped_said = False
            return
        if slot.stopped_said:
            return
        slot.stopped_said = True
        waiting: dict[int, tuple[_LocalRun, list[str]]] = {}
        for run, unit in slot.inflight:
            if run in self._runs and not run.job.finished:
                waiting.setdefault(id(run), (run, []))[1].append(run.job.describe_unit(unit))
        for run, units in waiting.values():
            run.note("stderr", f"mpmagic: worker {slot.wid} (pid {slot.pid}) is stopped (SIGSTOP, or a debugger "
                               f"holds it), and this run waits on it for {', '.join(units)}; kill -CONT "
                               f"{slot.pid} resumes it, Ctrl-C stops the run (and replaces the worker), "
                               "%pool restart replaces the workers\n")

    def _say_setup_waits(self, slot: _Slot, now: float) -> None:
        """Tell each run whose items wait behind this worker's setup, once a run, that they
        do and how to get out: an untimed run after an interrupted setup that hung sat at 0%
        for ever, with nothing saying why."""
        for run, _ in slot.inflight:
            if run.setup_wait_said or run not in self._runs:
                continue
            run.setup_wait_said = True
            since = f"{now - (slot.setup_since or now):.0f} s"
            run.note("stderr", f"mpmagic: worker {slot.wid} is still running the worker setup (%pool setup shows it; "
                               f"for {since} now), and this run's items sent to it wait for it to end; "
                               "Ctrl-C stops the wait, then %pool setup clear removes the setup and replaces the "
                               "workers still running it\n")

    def _setup_stuck(self, slot: _Slot) -> None:
        """A worker's %%pool setup still runs past its bound (``_SETUP_WAIT_MIN``) while
        units with a --timeout wait behind it: they did not start, and fail as not run
        with one line naming the setup (not their own timeout); the others go back to
        their runs. The worker is replaced (its replacement runs the setup again)."""
        timeout = slot.inflight[0][0].job.timeout
        waited = _setup_wait(timeout)
        behind = [(r, u) for r, u in slot.inflight if r.job.timeout]
        slot.inflight = deque((r, u) for r, u in slot.inflight if not r.job.timeout)
        self._replace(slot)
        for run, unit in behind:
            if run in self._runs and not run.job.finished:
                each = "rank" if run.job.kind == "cell" else "item"
                run.job.not_run(unit, f"worker {slot.wid}'s %%pool setup still ran after {waited:g} s "
                                      f"(--timeout {timeout:g} s per {each}), so it did not start; "
                                      "the worker was replaced")

    def _start_clock_of(self, slot: _Slot) -> None:
        """``_start_clock(slot)``, where an error is the run's own, never the manager's.

        A run's timeout is checked before it is made (``checks.run_timeout``), but the
        manager serves every run in flight: should a value of one run still fail here,
        as ``10**400`` did (OverflowError), that run ends alone with its error, at the
        manager's next turn (``_check_runs``: not while it reads this worker), and its
        worker is replaced; the other runs and the manager go on. Before, the error
        went up to the step's handler, which ended every run in flight with it.
        """
        try:
            _start_clock(slot)
        except Exception as exc:
            run = slot.inflight[0][0]
            log.debug("mpmagic: run %s's timeout failed its clock", run.job.call_id, exc_info=True)
            slot.deadline = slot.setup_deadline = None
            if run.failed_with is None:
                run.failed_with = exc

    def _check_restarts(self) -> None:
        """Recycle workers that reached ``max_tasks_per_child`` or ``max_memory`` once
        they are idle; stop those a shrinking resize left over once idle."""
        for slot in [s for s in self.slots if s.retiring and not s.busy]:
            self._retire(slot)
        if not self.max_tasks_per_child and not self.max_memory:
            return
        for slot in list(self.slots):
            worn = self.max_tasks_per_child is not None and slot.tasks >= self.max_tasks_per_child
            if not slot.busy and (worn or slot.over_memory):
                self.workers_replaced += slot.over_memory  # (as a crash or a timeout: %pool counts it)
                self._retire(slot)
                if not slot.temporary:
                    self._respawn()


def _waits_for_setup(slot: _Slot) -> bool:
    """Does the worker's first unit in flight wait for a setup it runs (or is yet to run)?"""
    return bool(slot.ready and slot.inflight and slot.setups_ahead and slot.setups_ahead[0] == 0)


def _more_setup_failures(workers: list[Any]) -> str:
    """The line at a run's end: the setup also failed on these workers, after the line it showed."""
    n = len(workers)
    ids = [str(w) for w in sorted(workers)]
    them = ids[0] if n == 1 else f"{', '.join(ids[:-1])} and {ids[-1]}"
    return (f"mpmagic: the %%pool setup also failed on {n} more worker{'s' if n != 1 else ''} during this run "
            f"({'worker' if n == 1 else 'workers'} {them}; %pool shows which workers are set up)\n")


def _note_setup_wait(slot: _Slot) -> None:
    """The setup the worker's units in flight waited for ended: add each run's wait there
    (its first unit's, from when it was sent or the setup began, whichever is later) to
    the run's ``job.setup_waits``, which the report says and the advice leaves out of
    the costs of sending (a slow setup is no item's time)."""
    now = time.time()
    ran = time.monotonic() - slot.setup_since if slot.setup_since is not None else None
    seen: set[int] = set()
    for run, unit in slot.inflight:
        if id(run) in seen or unit.sent_at is None:
            continue
        seen.add(id(run))
        waited = now - unit.sent_at if ran is None else min(now - unit.sent_at, ran)
        if waited > 0:
            waits = run.job.setup_waits
            waits[slot.wid] = waits.get(slot.wid, 0.0) + waited


def _clock_runs(slot: _Slot) -> bool:
    """May the ``--timeout`` clock of the worker's first unit in flight start now?

    Not while the worker starts (until ``Ready``), nor while a setup sent
    before that unit still runs (until its ``SetupDone``): a slow ``%%pool
    setup`` in a restarted, recycled or replacing worker is no item's time.
    """
    return slot.ready and not (slot.setups_ahead and slot.setups_ahead[0] == 0)


def _start_clock(slot: _Slot) -> None:
    """Start the ``--timeout`` clock of the worker's first unit in flight if it has
    a timeout and may start now (``_clock_runs``). While it waits for a setup
    (in a ready worker), that setup's own bound runs instead (``_setup_wait``)."""
    timeout = slot.inflight[0][0].job.timeout if slot.inflight else None
    if not timeout or not slot.ready:
        return
    if _clock_runs(slot):
        slot.setup_deadline = None
        slot.deadline = time.monotonic() + timeout
    elif slot.setup_deadline is None:
        slot.setup_deadline = time.monotonic() + _setup_wait(timeout)


def _setup_wait(timeout: float) -> float:
    """How long a unit with this --timeout waits for a worker's setup before it fails as not run."""
    return max(_SETUP_WAIT_MIN, _SETUP_WAIT_TIMES * timeout)


def _own_memory(proc: Any) -> int:
    """A worker's private memory for ``%pool`` (a ``psutil.Process``): as it
    reports with each reply (``rss.private_bytes``), resident minus shared on
    Linux; elsewhere the resident size."""
    info = proc.memory_info()
    shared = getattr(info, "shared", None)
    return int(info.rss - shared) if shared is not None else int(info.rss)


def _near_memory_limit(slot: _Slot, limit: int | None) -> bool:
    """Was a SIGKILLed worker likely killed for its memory (the OOM killer, a cgroup limit)?

    Near the pool's limit (80 %) at its last report, or, without a limit, the
    machine short of memory now (under 5 % available).
    """
    if slot.rss is None:
        return False
    if limit:
        return slot.rss >= 0.8 * limit
    try:
        import psutil

        vm = psutil.virtual_memory()
        return vm.available < 0.05 * vm.total
    except Exception:
        return False


def _shm_held() -> dict[str, int]:
    """The notebook's shared memory by kind (``shm.held``), copies of arrays it dropped freed first."""
    payload_cache.release_dead()
    return shm.held()


def _kept_line(workers: list[dict], pool_key: int) -> str | None:
    """``%pool``'s line about the kept ranks of ``%%parallel --keep`` (ranks.py)."""
    from ..ranks import status_line

    return status_line(workers, pool_key)


def is_stopped(pid: int) -> bool:
    """Is process ``pid`` stopped (SIGSTOP, SIGTSTP, or held by a debugger)?

    On Linux one read of ``/proc/PID/stat`` (state ``T``, or ``t`` for a
    tracer's stop); elsewhere psutil's status. False when it cannot be told
    (the process is gone).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] in (b"T", b"t")  # (the name, in parentheses, may hold spaces)
    except (OSError, ValueError):
        pass
    if sys.platform.startswith("linux"):
        return False  # (gone)
    try:
        import psutil

        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, getattr(psutil, "STATUS_TRACING_STOP", ""))
    except Exception:
        return False


def _position(slot: _Slot) -> int | None:
    """Which item of its chunk a (now stopped) worker was running, if known."""
    value = slot.position.value if slot.position is not None else -1
    return value if value >= 0 else None


_STOP = pack(Stop())
# Payload and context keys remembered per worker: a worker keeps only its most
# recent functions (at most payload_cache.KEEP_FUNCTIONS) and answers "missing" for
# one it dropped, so the notebook's record of them need not grow for the worker's
# life. Room for all it keeps and the contexts beside: cleared at 64, a notebook
# cycling through 64 functions sent every payload again once the contexts filled it.
_KNOWN_MAX = 2 * payload_cache.KEEP_FUNCTIONS
# Extra looks (select with no wait) for replies that came while the manager
# handled the last ones, before it takes its next step.
_MORE_READY = 4
# A unit bigger than this is sent at once, not at the end of the step: a step
# that packs four chunks of 25,000 items (~1 ms each) kept the workers idle
# until the last one was packed (100,000 tiny items: +10 %).
_HOLD_MAX = 16 << 10
_WORKER_SAYS = frozenset((Out, Outs, Done, Error, Unpicklable, Missing, Collected, NoFiles))  # besides Ready


def _open_files(pid: int | None) -> int | None:
    """How many files the process ``pid`` holds open (``/proc/<pid>/fd``), or None where
    that cannot be read (no ``/proc``; the notebook itself with no descriptor left)."""
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _file_limit_of(pid: int | None) -> int | None:
    """The soft limit on open files of the process ``pid`` (``/proc/<pid>/limits``), or None
    where that cannot be read: a worker out of files may not import ``resource`` to say it."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return int(soft) if soft.isdigit() else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def _discard(msg: tuple) -> None:
    """Drop a stale reply; results it left in shared memory are unlinked."""
    data = msg.data if type(msg) is Done else msg.partial if type(msg) is Error else None
    if isinstance(data, bytes) and data:
        try:
            payload.loads(data)
        except Exception:
            log.debug("mpmagic: could not load a stale reply to free its segments", exc_info=True)


# The most files a worker's start opens at once (its pipe, the fork server's
# connection, the pipes multiprocessing makes to start it, and the fork
# server's own start the first time; at 6 the fork server's child still
# printed an EOFError under `ulimit -n 18`).
_FILES_PER_START = 10


def _room_for_files(n: int) -> None:
    """Raise ``OSError(EMFILE)`` unless ``n`` more files can be opened now (~10 us)."""
    fds: list[int] = []
    try:
        while len(fds) < n:
            fds.extend(os.pipe())
    finally:
        for fd in fds:
            os.close(fd)


# The most processes and threads a worker's start adds for this user (the
# worker, its two threads, the fork server's child, a reaper thread).
_TASKS_PER_START = 4


def _tasks_line(could: int, wanted: int, now: int | None, kept: bool = False) -> str:
    """The one line for a pool that reached the process/thread limit (``kept``: a failed
    resize left the pool at its ``now`` workers)."""
    named = task_limit_named()
    if could <= 0:
        return (f"the process/thread limit ({named}) is reached: not even one worker can start; "
                "raise `ulimit -u` (or end processes of yours), or run it serially")
    rest = "" if now is None else f" (the pool keeps its {now})" if kept else f" (the pool now has {now})"
    return (f"the pool could start only {could} of {wanted} workers: the process/thread limit "
            f"({named}) was reached; use fewer workers or raise `ulimit -u`{rest}")


def _kill_group(pid: int | None) -> None:
    """SIGKILL a worker's process group: the worker (if still there) and every
    process its tasks started that did not leave the group (``subprocess.run``,
    ``os.fork``, a ``Popen`` left running). A worker leads a group of its own
    (``worker.main``). Without this they outlived the worker (a ``sleep 300``
    after a ``--timeout``, a helper after an interrupt or the pool's stop)."""
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group, or it is not ours (never made: see worker.main)


#: For the pool's SIGTERM handler (``pool.kill_workers_now``).
kill_group = _kill_group


# Stopped processes an inline reap left running (no thread to spare, see
# _reap_later): the next reap collects them.
_unreaped: list = []
_unreaped_lock = threading.Lock()
# Set by the exit hook (_at_exit), which runs before multiprocessing's: that one then
# joins every child it knows, a retired worker's too, and a reaper thread closing such a
# process meanwhile made its join raise ("Exception ignored in atexit callback ...
# ValueError: process object is closed": a script whose %%parallel -n 4 ran on 2
# workers, on a busy machine). ``_closing`` makes the check and the close one step.
_exit_joins = False
_closing = threading.Lock()


def _reap_later(proc) -> None:
    """Collect a stopped process's exit status without blocking the notebook."""

    def reap() -> None:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        _reaped(proc)

    _reap_left()
    try:
        threading.Thread(target=reap, daemon=True, name="mpmagic-reaper").start()
    except RuntimeError:
        # No thread to spare (ulimit -u, or the interpreter's exit): here, where the
        # pool's lock is often held, so not reap()'s 10 s of waiting that stalled
        # every run: killed at once, and one still running after 0.5 s is left to
        # the next reap.
        proc.kill()
        proc.join(0.5)
        if proc.exitcode is None:
            with _unreaped_lock:
                _unreaped.append(proc)
        else:
            _reaped(proc)


def _reap_left() -> None:
    """Collect the processes an inline reap left running, those that have ended (no wait)."""
    if not _unreaped:
        return
    with _unreaped_lock:
        ended = [p for p in _unreaped if p.exitcode is not None]  # (exitcode polls: no wait)
        _unreaped[:] = [p for p in _unreaped if p not in ended]
    for proc in ended:
        _reaped(proc)


def _reaped(proc) -> None:
    """After a worker's exit: what its tasks started and left running, the results
    it made but never handed over, and its pipes now (not whenever the last
    reference to its Process goes)."""
    _kill_group(proc.pid)
    shm.sweep_worker(proc.pid)
    with _closing:
        if _exit_joins:
            return  # (multiprocessing's exit hook joins it, and the process's exit frees its pipes)
        try:
            proc.close()
        except ValueError:  # still running after SIGKILL and 10 s: left to the OS
            log.debug("mpmagic: worker pid %s did not stop; its pipes stay open", proc.pid)
            return
    _reaped_processes.add(proc)  # (its output tail may go to a new worker)
