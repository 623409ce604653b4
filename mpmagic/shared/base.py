"""The base of every helper: names in /dev/shm, locks that know their holder, pickling by name.

A helper is one shared-memory segment (a 128-byte header of u64 words, then
its data) and a few named semaphores, all named after one random stem
``/mpshXXXXXXXXXX``. It travels in any pickle as ``(class, stem, spec, owner
pid)``: the receiving process reopens the names (:meth:`_Helper._attach`), so
it never needs an inherited file descriptor, and a worker started long before
the helper existed can use it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import queue
import secrets
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .. import compat, debugging, payload, posixshm, shm, waits
from ..checks import wait_timeout
from ..errors import (
    MPMagicError,
    cell_label,
    interrupted_at_callers_line,
    out_of_files,
    too_many_open_files,
)
from ..fmt import fmt_bytes
from ..interrupts import restore as restore_interrupts

try:
    _SemLock = compat.semlock_class()
except compat.MissingFeatureError:  # Windows, or a CPython built without sem_open
    _SemLock = None  # the helpers say so when made (_check_platform); pmap itself needs none

log = logging.getLogger("mpmagic")

class SharedObjectGone(MPMagicError):
    """A shared helper's names were released: its owner dropped it or exited."""


class NoSharedMemory(MPMagicError, MemoryError):
    """``/dev/shm`` cannot hold a new helper: it is full or too small (a container's 64 MB)."""


class RLockNotHeldError(AssertionError, RuntimeError):
    """``release()`` of an RLock by a thread that does not hold it.

    ``multiprocessing.RLock`` raises AssertionError there, ``threading.RLock``
    RuntimeError: code ported from either keeps its ``except`` clause. Not an
    :class:`MPMagicError`: IPython shows the caller's line, as for theirs."""


class QueueClosed(MPMagicError, queue.Empty):
    """``get`` on a queue that is closed and drained: nothing more will come.

    A subclass of :class:`queue.Empty`, so loops that stop on ``Empty`` stop here too.
    """


# --------------------------------------------------------------------------
# Processes, names and segments

_PID = os.getpid()
#: Every name a helper creates starts with this (/dev/shm/mpsh..., /dev/shm/sem.mpsh...).
PREFIX = posixshm.HELPER_PREFIX
_SLICE = 0.25  # seconds a blocked call waits before checking on a lock's holder
_SEMAPHORE = 1  # _multiprocessing.SemLock kind: a plain counting semaphore
_SEM_MAX = getattr(_SemLock, "SEM_VALUE_MAX", 32767) if _SemLock else 0
_MAGIC = 0x6D706D6167696301  # "mpmagic" + layout version
_HEADER = 128  # bytes of header (16 words) in front of every helper's data

#: The origin of a helper a worker made outside any task (``%%pool setup``, a module's import):
#: it lives as long as the worker, so a task may return it (``_Helper.__reduce__``).
_OUTSIDE_TASKS = "a worker"

_registry: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def _alive(pid: int) -> bool:
    """Is process ``pid`` running (a zombie, killed but not yet reaped, is not)?"""
    return pid == _PID or posixshm.pid_alive(pid)


def _new_stem() -> str:
    """``/mpsh<pid>_<random>``: the creator's pid, so that what a notebook killed
    with its whole process group left (Jupyter's "shut down now") is found and
    removed by its workers, or at the next pool start (``shm.sweep_stale``).
    Short: macOS allows 31 characters, and a spill adds ``.x<pid>`` (or ``.y<pid>``). On Linux
    the PID namespace's tag follows the pid (``posixshm.owned_by``): a sweep
    judges only its own namespace's pids."""
    return f"/{PREFIX}{posixshm.owned_by(os.getpid())}{secrets.token_hex(4)}"


class _Segment:
    """A POSIX shared-memory segment mapped into this process.

    A new one has every page reserved (:func:`mpmagic.posixshm.create`): with
    ``/dev/shm`` full, making the helper raises :class:`NoSharedMemory`
    instead of a later write ending the process with SIGBUS.
    """

    def __init__(self, name: str, size: int | None = None, kind: str = "helper") -> None:
        if size is None:
            self.mmap = posixshm.attach(name)
        elif not posixshm.dev_shm_usable():  # (shm_open failed with a bare OSError naming the segment)
            raise NoSharedMemory(
                f"mpmagic.{kind} needs a writable /dev/shm (POSIX shared memory), and this system's is "
                f"{'read-only' if os.path.isdir('/dev/shm') else 'missing'}: mount one (a tmpfs on /dev/shm), "
                "or pass data between tasks through their arguments and results"
            )
        else:
            try:
                self.mmap = posixshm.create(name, size)
            except posixshm.NoRoom as exc:
                if exc.file_limit is not None:
                    raise NoSharedMemory(
                        f"mpmagic.{kind}: {exc.why()}: raise `ulimit -f` (it limits /dev/shm segments too)"
                    ) from exc
                # (Lock, Value... have no capacity to make smaller: only a Queue's or an Array's size)
                smaller = ", or use a smaller capacity" if kind == "Queue" else (
                    ", or make it smaller" if kind == "Array" else "")
                raise NoSharedMemory(
                    f"mpmagic.{kind}: /dev/shm has no room for its {fmt_bytes(size)} "
                    f"({posixshm.describe_room()}). Free some (drop helpers and share() arrays you no "
                    f"longer use) or make it bigger (docker run --shm-size=1g){smaller}"
                ) from exc
        self.name = name
        self.size = len(self.mmap)
        self.words = memoryview(self.mmap)[:_HEADER].cast("Q")  # the header's u64 words

    def guard(self):
        """An flock on the segment: held only for microseconds, and released by
        the kernel if its holder dies. Decides who takes over a dead holder's lock.
        It never waits: entering it raises BlockingIOError while another process
        holds it (that one is taking the lock over), so a waiter's timeout holds."""
        return _Flock(self.name)


class _Flock:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> _Flock:
        self.fd = posixshm.open_fd(self.name)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)  # releases the flock


def _tracked_here() -> bool:
    """Are the names this process makes registered with multiprocessing's resource tracker?

    In the notebook, yes: the tracker unlinks them if it is killed outright. In
    a pool's worker, no: the tracker it talks to is the notebook's, which acts
    only when the *notebook* exits, so a worker's names it held outlived the
    worker until then, and its exit printed "leaked semaphore objects" (and
    "No such file" for the names already removed). A worker's names are
    mpmagic's to remove: the worker releases them when it stops
    (:func:`release_all`, an exit hook), and the notebook sweeps a killed
    one's once it is gone (``shm.sweep_worker``, by the pid in their names).
    """
    return shm.NOTEBOOK_PID is None


def _unlink(name: str, rtype: str, tracked: bool = True) -> None:
    """Remove one name of a helper, and tell the resource tracker it needs no
    cleanup (``tracked``: only if it was registered there, or the tracker
    prints a KeyError traceback)."""
    if rtype == "semaphore":
        posixshm.unlink_semaphore(name)
    else:
        posixshm.unlink(name)
    if not tracked:
        return
    try:
        compat.tracker_unregister(name, rtype)
    except Exception:  # the tracker is gone (interpreter exit): nothing to tell it
        log.debug("resource tracker unregister of %s failed", name, exc_info=True)


#: This process's live helpers' finalizers, by stem (see :func:`release_all`).
_owned: dict[str, Any] = {}


def release_all() -> None:
    """Release every helper this process made, now: what its exit would do.

    For a kernel asked to shut down, whose exit hooks may never run (see
    ``exiting.watch_shell``), and a worker that stops (an exit hook: it ends
    with ``os._exit``, and a kept rank's helpers were never dropped); a helper
    used after this says it is gone.
    """
    for finalizer in list(_owned.values()):
        finalizer()


posixshm.on_exit(release_all)


def _release_names(names: list[tuple[str, str]], owner_pid: int, on_release: Any = None,
                   tracked: bool = True) -> None:
    """Finalizer of an owned helper: unlink its names (only in the owner process)."""
    if names:
        _owned.pop(names[0][0], None)
    if on_release is not None:
        on_release()
    if os.getpid() != owner_pid:
        return  # a forked copy of the owner's object: the names are not ours
    for name, rtype in names:
        _unlink(name, rtype, tracked)


def _notify(sem: Any) -> None:
    """Wake one waiter on a notification semaphore, keeping at most one token."""
    try:
        if sem._get_value() != 0:
            return
    except NotImplementedError:  # macOS has no sem_getvalue
        pass
    try:
        sem.release()
    except (ValueError, OverflowError):
        pass


def _wait(sem: Any, seconds: float, kind: str) -> bool:
    """Take a token from ``sem`` within ``seconds`` (interruptible by Ctrl-C).

    The time it blocked counts as this thread's wait in a helper of ``kind``
    (:mod:`mpmagic.waits`: the report leaves it out of the work). A Ctrl-C here is
    the user's, never a repeat of an earlier run's (``interrupts.restore``)."""
    restore_interrupts()
    t0 = time.monotonic()
    try:
        return sem.acquire(True, max(0.0, seconds))
    finally:
        waits.add(kind, time.monotonic() - t0)


# --------------------------------------------------------------------------
# Locks that know their holder


class _HolderLock:
    """A lock on a named semaphore that records its holder's pid in shared memory.

    If a process dies holding it (a worker killed on timeout or interrupt), the
    next process that waits for it notices within ``_SLICE`` seconds and takes
    it over; the segment's flock makes sure only one waiter does. A holder
    killed in the instant between taking the semaphore and writing its pid is
    not seen: this is best effort, not a robust mutex.

    Why not a robust pthread mutex in the segment (PTHREAD_MUTEX_ROBUST, which
    the kernel hands to the next waiter with EOWNERDEAD)? Python cannot place
    one in shared memory without a C extension, and the named semaphore is what
    ``multiprocessing`` already gives us: portable, interruptible by Ctrl-C
    (``sem.acquire`` with a timeout), and openable by name in any process.

    Why the take-over goes through an ``flock`` and not the semaphore: the
    semaphore stays taken (its dead holder will never release it), so the
    waiters must agree among themselves who inherits it. ``flock`` on the
    segment's descriptor is exclusive, and the kernel drops it if its holder
    dies, so the agreement itself cannot be wedged by a second death. Inside it
    the waiter re-reads the holder word: if another waiter already wrote its own
    pid there, that one won, and this one goes back to waiting.

    Why ``_SLICE`` (0.25 s): a waiter checks the holder only after waiting that
    long, so the uncontended path costs one ``sem_trywait`` and one store (the
    locked ``Value`` increment of bench_shared.py: ~600,000/s over 2 ranks), and
    a dead holder costs the others a quarter of a second, once. Only the
    waiting path is timed (:meth:`_wait`, for :mod:`mpmagic.waits`): the
    uncontended path pays nothing for it.
    """

    def __init__(self, sem: Any, seg: _Segment, slot: int, recursive: bool, what: str | None,
                 kind: str) -> None:
        self.sem = sem
        self.seg = seg
        self.words = seg.words
        self.slot = slot
        self.recursive = recursive
        self.what = what  # shown in the takeover warning; None for internal locks
        self.kind = kind  # whose wait the time blocked here is (mpmagic.waits): "Lock", "Value", "Queue"...
        self.owner: int | None = None  # the thread that holds it (any thread may release a plain lock)
        self.depth = 0
        self.took_over = 0  # the thread that took the lock over, until its acquire returns (_drop_if_taken)
        self.helper: tuple | None = None  # how to find it again elsewhere (see __reduce__)

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        """Take the lock (``multiprocessing.Lock.acquire``'s arguments). Also the
        lock's ``__enter__``, itself: see :meth:`_drop_if_taken` for why."""
        if timeout is not None:  # (10**400: no limit, as threading.TIMEOUT_MAX is, not OverflowError in _wait)
            timeout = wait_timeout(timeout)
        me = _get_ident()
        if self.recursive and self.owner == me:
            self.depth += 1
            return True
        sem = self.sem
        before = sem._count()
        try:
            if not sem.acquire(False):
                if not block or not self._wait(timeout):
                    return False
            self.words[self.slot] = _PID
            self.owner, self.depth = me, 1  # (a plain lock's too: held_here)
            self.took_over = 0
            return True
        except BaseException as exc:
            self._drop_if_taken(before, me)
            if isinstance(exc, KeyboardInterrupt):  # (the user's ``lock.acquire()`` / ``with lock:``)
                interrupted_at_callers_line(exc)
            raise

    # ``with lock:`` calls acquire itself: a frame of ours between it and the ``with``
    # would be a moment where an interrupt leaves the lock held (_drop_if_taken).
    __enter__ = acquire

    def take(self, kind: str) -> None:
        """``acquire()`` for the helper's own access (``v.value``, ``a[i]``), its wait counted
        as ``kind`` ("Value access"), apart from a lock the user took (``with v.get_lock():``,
        counted as the helper's kind): a task that wrote no lock did not read that it
        "waited on mpmagic.Value's lock", as if it had taken one (tutorial22 #4)."""
        me = _get_ident()
        if self.recursive and self.owner == me:
            self.depth += 1
            return
        sem = self.sem
        before = sem._count()
        try:
            if not sem.acquire(False):
                self._wait(None, kind)
            self.words[self.slot] = _PID
            self.owner, self.depth = me, 1  # (a plain lock's too: held_here)
            self.took_over = 0
        except BaseException:
            self._drop_if_taken(before, me)
            raise

    def _drop_if_taken(self, before: int, me: int) -> None:
        """An exception (Ctrl-C's KeyboardInterrupt) cut :meth:`acquire` short: if it
        came after the semaphore was taken, give it back, so the lock is free rather
        than held by nobody for good (the ``with`` that would release it never began).

        Python runs a signal handler between bytecodes, e.g. right after the call
        ``sem.acquire`` returned True, whose result is then lost: what tells is the
        semaphore's own count of this process's takes, and which thread took last
        (``_is_mine``; another thread may have taken it meanwhile), or the take-over
        this thread recorded. ``multiprocessing.Lock`` has the same gap, narrower
        (CPython's ``with`` statement; bpo-29988)."""
        sem = self.sem
        if self.took_over == me or (sem._count() > before and sem._is_mine()):
            self.took_over = 0
            self.words[self.slot] = 0
            self.owner, self.depth = None, 0
            sem.release()

    def _wait(self, timeout: float | None, kind: str | None = None) -> bool:
        """The lock was taken: wait for it (the only path that is timed, see mpmagic.waits,
        as ``kind``, else the lock's own; a wait that ends by its timeout is not: serial
        code waits as long). A Ctrl-C here is the user's (``interrupts.restore``)."""
        restore_interrupts()
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        ran_out = False
        took_over = None  # (the start of the slice after which the lock was taken over)
        began = t0
        try:
            while True:
                step = _SLICE if deadline is None else min(_SLICE, deadline - began)
                if step > 0 and self.sem.acquire(True, step):
                    return True
                if self._take_over():
                    took_over = began
                    return True
                began = time.monotonic()
                if deadline is not None and began >= deadline:
                    ran_out = True
                    return False
        finally:
            if not ran_out:
                end = time.monotonic()
                if took_over is None:
                    waits.add(kind or self.kind, end - t0)
                else:
                    # Its holder died during the last slice (each slice checks): that slice was the
                    # wait to recover the lock, not one for a producer or another task's use of it.
                    if took_over > t0:
                        waits.add(kind or self.kind, took_over - t0)
                    waits.add(waits.TAKEOVER, end - took_over)

    def _take_over(self) -> bool:
        """Become the holder if the recorded one is dead (the semaphore stays taken)."""
        holder = self.words[self.slot]
        if not holder or _alive(holder):
            return False
        me = threading.get_ident()
        try:
            with self.seg.guard():
                if self.words[self.slot] != holder:
                    return False  # another waiter took it over first
                self.words[self.slot] = _PID
                self.took_over = me  # (no call between: an interrupt finds it, _drop_if_taken)
        except (FileNotFoundError, BlockingIOError):
            return False  # the helper is gone, or another waiter is taking it over now
        if self.what:
            warnings.warn(
                f"{self.what}: process {holder} died while holding the lock (it was killed, or its code exited "
                "without releasing it); this process took it over, and the data it guarded may be half-updated",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
        return True

    def release(self, *_exc: Any) -> None:
        """Give the lock back; also its ``__exit__`` itself: a method of ours calling
        release would be one more frame where an interrupt could land before the
        semaphore is given back."""
        if self.recursive:
            if self.owner != threading.get_ident():
                try:
                    raise RLockNotHeldError("cannot release an RLock this thread does not hold")
                except RLockNotHeldError as exc:
                    exc.__traceback__ = None  # (the caller's line only, as the ValueError below)
                    raise
            self.depth -= 1
            if self.depth:
                return
        self.owner, self.depth = None, 0
        self.words[self.slot] = 0
        try:
            self.sem.release()
        except ValueError as exc:
            # Not held: multiprocessing's error, at the caller's line as its own is (a bare
            # raise adds no entry for this frame from 3.11, and IPython shows a last frame
            # even with __tracebackhide__).
            exc.__traceback__ = None
            raise

    __exit__ = release

    def held_here(self, me: int) -> int:
        """How many times thread ``me`` holds the lock now (0, or an RLock's depth).

        For code that takes the lock and then runs a ``try`` that releases it:
        Ctrl-C can land right after the take returned, before the ``try``. Taking
        inside the ``try`` and releasing if ``held_here`` rose covers that moment
        (a Value's ``v.value``, a Queue's read lock)."""
        return self.depth if self.owner == me else 0

    def after_fork(self) -> None:
        self.owner, self.depth = None, 0

    def locked(self) -> bool:
        """Is it held (by any process) right now?"""
        return bool(self.sem._is_zero())

    def __reduce__(self) -> tuple:
        # ``lock = v.get_lock()`` may be passed to workers on its own: it travels
        # as "the lock of helper STEM", which attaches to the helper by name.
        if self.helper is None:
            raise TypeError("an mpmagic queue's internal lock cannot be pickled")
        helper = _registry.get(self.helper[1])
        if helper is not None:  # a run's payload keeps the helper alive (see _Helper.__reduce__)
            payload.keep_alive(helper)
        return (_lock_of, self.helper)

    def _mpmagic_key(self) -> tuple:
        """What this lock is, for a checkpoint key: the lock of a helper of that kind and
        spec (``_Helper._mpmagic_key``), not of that name."""
        if self.helper is None:
            raise TypeError("an mpmagic queue's internal lock cannot be pickled")
        return ("the lock of", self.helper[0]._kind, self.helper[2])

    def __repr__(self) -> str:
        holder = self.words[self.slot]
        kind = "RLock" if self.recursive else "Lock"
        return f"<mpmagic {kind} of {self.what} {'held by pid ' + str(holder) if holder else 'free'}>"


_get_ident = threading.get_ident  # (a global: acquire is hot)


class _LockSide:
    """``__enter__`` / ``__exit__`` of a helper with a lock (Lock, RLock, Value, Array):
    the inner :class:`_HolderLock`'s own ``acquire`` / ``__exit__``, handed over when the
    ``with`` begins (before the lock is taken). A method of ours calling them was a
    frame where Ctrl-C, right after the take returned, left the lock held by nobody
    (:meth:`_HolderLock._drop_if_taken`). A descriptor, not a property: read on the
    class (``contextlib.ExitStack`` does ``type(cm).__enter__(cm)``) it is still callable."""

    __slots__ = ("exit",)

    def __init__(self, exit: bool) -> None:
        self.exit = exit

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        if obj is None:
            return self._by_class
        lock = obj._lock
        if lock is None:  # a Value made with lock=False: its NoLockError
            raise obj._no_lock("__exit__" if self.exit else "__enter__")
        return lock.__exit__ if self.exit else lock.acquire

    def _by_class(self, obj: Any, *exc: Any) -> Any:
        return self.__get__(obj)(*exc)

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning its caller gives, pointing at the first frame
    outside mpmagic: the user's ``with lock:`` line, however many of our frames
    (``__enter__``, ``acquire``, a Value's ``get_lock``) lie between."""
    frame, level = sys._getframe(1), 1  # (level 1: the frame that calls warnings.warn)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


# --------------------------------------------------------------------------
# The base of every helper: names, ownership, pickling by name


class _Helper:
    """What every helper shares: its names, its owner, pickling by name."""

    _kind = "helper"
    _letters = ""  # its semaphores (see _sem_letters)

    _stem: str
    _owner_pid: int
    _origin: str  # where in its owner it was made: "rank 1", "a task"; "" in the notebook
    _made: str = ""  # where the notebook's code made it: "on line 2 of cell In[4]"; "" not known
    _spec: tuple
    _seg: _Segment
    _sems: dict[str, Any]

    @classmethod
    def _create(cls, spec: tuple, size: int) -> Any:
        try:
            return cls._create_names(spec, size)
        except OSError as exc:
            if not out_of_files(exc):
                raise
            raise MPMagicError(f"mpmagic.{cls._kind}: cannot be made: {too_many_open_files()}") from None

    @classmethod
    def _create_names(cls, spec: tuple, size: int) -> Any:
        self = cls.__new__(cls)
        self._spec, self._owner_pid = spec, _PID
        names: list[tuple[str, str]] = []
        tracked = _tracked_here()
        self._origin = "" if tracked else debugging.TASK or _OUTSIDE_TASKS
        self._made = _made_where() if tracked else ""
        for _ in range(8):
            self._stem = _new_stem()
            try:
                self._seg = _Segment(self._stem, size, self._kind)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 8 collisions of 40 random bits
            raise MPMagicError("could not find a free shared-memory name")
        names.append((self._stem, "shared_memory"))
        if tracked:
            compat.tracker_register(self._stem, "shared_memory")
        self._sems = {}
        try:
            for letter in self._sem_letters():
                name = f"{self._stem}.{letter}"
                value, maxvalue = self._sem_init(letter)
                try:
                    self._sems[letter] = _SemLock(_SEMAPHORE, value, maxvalue, name, False)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    raise NoSharedMemory(
                        f"mpmagic.{self._kind}: /dev/shm is full ({posixshm.describe_room()}): no room "
                        "for its semaphores. Free some or make it bigger (docker run --shm-size=1g)"
                    ) from exc
                names.append((name, "semaphore"))
                if tracked:
                    compat.tracker_register(name, "semaphore")
            self._seg.words[0] = _MAGIC
            self._init_memory()
            self._setup()
        except BaseException:
            _release_names(names, _PID, tracked=tracked)
            raise
        _owned[self._stem] = weakref.finalize(self, _release_names, names, _PID, self._on_release(), tracked)
        with _registry_lock:
            _registry[self._stem] = self
        return self

    @classmethod
    def _attach(cls, stem: str, spec: tuple, owner_pid: int, origin: str = "", made: str = "") -> Any:
        with _registry_lock:
            found = _registry.get(stem)
            if found is not None:
                return found
            self = cls.__new__(cls)
            self._stem, self._spec, self._owner_pid, self._origin = stem, spec, owner_pid, origin
            self._made = made
            try:
                self._seg = _Segment(stem)
                self._sems = {
                    letter: _SemLock._rebuild(0, _SEMAPHORE, self._sem_init(letter)[1], f"{stem}.{letter}")
                    for letter in self._sem_letters()
                }
            except FileNotFoundError:
                raise self._gone() from None
            except OSError as exc:
                if not out_of_files(exc):
                    raise
                raise MPMagicError(f"{self._describe()} cannot be opened here: {too_many_open_files()}") from None
            if self._seg.words[0] != _MAGIC:
                raise SharedObjectGone(f"{self._describe()}: its shared memory does not hold an mpmagic helper")
            self._setup()
            _registry[stem] = self
            return self

    def _own_lock(self, recursive: bool) -> _HolderLock:
        """The helper's lock: semaphore "l", holder pid in header word 1. Pickled on
        its own (``lock = v.get_lock()``), it travels as "the lock of this helper"."""
        lock = _HolderLock(self._sems["l"], self._seg, 1, recursive, self._describe(), self._kind)
        lock.helper = self._by_name()
        return lock

    def _gone(self) -> SharedObjectGone:
        if self._origin:
            return self._gone_with_its_task()
        dask_worker = debugging._dask_worker()
        if dask_worker is not None and not _alive(self._owner_pid):
            return self._not_on_this_machine(dask_worker)
        if _alive(self._owner_pid):
            why = "released it (the object was dropped there, e.g. deleted or replaced)"
        else:
            why = "has exited (kernel restarted or shut down?)"
        return SharedObjectGone(
            f"{self._describe()} is gone: the process that made it (pid {self._owner_pid}) {why}. "
            f"Make a new mpmagic.{self._kind}(...) in the notebook and pass that one."
        )

    def _not_on_this_machine(self, dask_worker: str) -> SharedObjectGone:
        """Made in the notebook while the local pool was current, opened in a Dask task
        whose worker finds neither its memory nor its maker: that worker runs on
        another machine (or container), not the notebook's (which sent this task, so
        it runs). A new helper of this kind made in the notebook is what works there:
        a Queue, Lock or Event made with the Dask pool current is Dask's own; a Value
        or Array has no Dask form (``mpmagic.Value`` on Dask says what to do)."""
        if self._kind in ("Value", "Array"):
            instead = (
                f"Dask has no mpmagic.{self._kind}: return values from the tasks and combine them "
                "in the notebook, or send updates through an mpmagic.Queue made with the Dask pool current"
            )
        elif self._kind == "RLock":
            instead = "Make a new mpmagic.Lock() in the notebook now that the Dask pool is current (RLock has no Dask form) and pass that one"
        else:
            instead = (
                f"Make a new mpmagic.{self._kind}() in the notebook now that the Dask pool is current "
                "(it lives in the scheduler, for every worker) and pass that one"
            )
        return SharedObjectGone(
            f"{self._describe()} cannot be opened on Dask worker {dask_worker}: it is in the shared "
            f"memory of the machine of the process that made it (pid {self._owner_pid}, with the local "
            "pool current), and this worker runs on another machine (or container) that does not "
            f"share it. {instead}."
        )

    def _gone_with_its_task(self) -> SharedObjectGone:
        """Made inside a task (a rank), which owned it: the helper lived as long as
        that task's objects, and was released when it ended (for a ``--keep``
        rank: at ``--reset``, or when its worker stopped). Another rank that
        opened it in time could use it, one that came later could not: the
        message says so, since whether it worked depended on timing."""
        return SharedObjectGone(
            f"{self._describe()} is gone: it was made inside {self._origin} (worker pid {self._owner_pid}), "
            "and a helper made in a task is released when the task ends (a --keep rank's: at --reset or "
            "when its worker stops), here before this process opened it. "
            f"Make a new mpmagic.{self._kind}(...) in the notebook and pass it in "
            "(a list of them, one per rank, for per-rank inboxes)."
        )

    def _describe(self) -> str:
        """How a message names this helper: its kind, how and where it was made
        (``mpmagic.Queue(maxsize=5) made on line 2 of cell In[4]``, ``mpmagic.Value('i')
        made in rank 1``), the same in every process (what it needs travels with it: _by_name).
        Never the name of its shared memory, which tells a user nothing; a task's error
        names it after the notebook's variable once home (``serial_copy.name_helpers``)."""
        where = f" made in {self._origin}" if self._origin else (f" made {self._made}" if self._made else "")
        return f"mpmagic.{self._kind}{self._made_with()}{where}"

    def _made_with(self) -> str:
        """The constructor's arguments that tell this helper from others of its kind: ``(maxsize=5)``."""
        return ""

    def __reduce__(self) -> tuple:
        # Pickled into a run's payload (its function, items or cell): the run
        # keeps this object, and so its names, alive until it ends, even if the
        # notebook drops or rebinds it meanwhile (payload.keeping).
        if self._origin not in ("", _OUTSIDE_TASKS) and self._owner_pid == _PID and payload.sending_map_results_now():
            raise self._returned_from_its_task()
        payload.keep_alive(self)
        return (_attach, self._by_name())

    def _returned_from_its_task(self) -> SharedObjectGone:
        """A map task's result holds a helper that task made (in this worker): it is
        released as the task ends, before the notebook could open it (it arrived gone,
        and the whole chunk failed to load). Refused as the result is packed: that
        item's result alone cannot be sent (``payload.sending_map_results``)."""
        return SharedObjectGone(
            f"{self._describe()} cannot go back to the notebook: a helper made in a task is released when "
            f"the task ends, before the notebook can open it. Make a new mpmagic.{self._kind}(...) in the "
            "notebook and pass it in (an item, or a name the function reads)"
        )

    def _mpmagic_key(self) -> tuple:
        """What this helper is, for a checkpoint key (``checkpoint_keys``): its kind and
        how it was made (typecode, length, lock; maxsize...), not the name of its shared
        memory (new for every helper made: a new kernel never resumed) nor its value
        (state the run changes: docs/checkpoint.md)."""
        return (self._kind, self._spec)

    def _by_name(self) -> tuple:
        """What finds this helper in another process: (class, stem, spec, owner pid, origin, made)."""
        return (type(self), self._stem, self._spec, self._owner_pid, self._origin, self._made)

    # What subclasses fill in
    def _sem_letters(self) -> str:
        """One named semaphore per letter, named STEM.LETTER."""
        return self._letters

    def _sem_init(self, letter: str) -> tuple[int, int]:
        """(initial value, max value) of the semaphore named by ``letter``."""
        return 1, 1

    def _init_memory(self) -> None:
        """Owner only: write the initial contents of the segment."""

    def _setup(self) -> None:
        """Every process: make the local views and locks."""

    def _on_release(self) -> Any:
        """A callable the finalizer runs first (e.g. to stop a feeder thread)."""
        return None

    def _after_fork(self) -> None:
        """In a forked child: forget this process's threads and lock owners."""


def _attach(cls: Any, stem: str, spec: tuple, owner_pid: int, origin: str = "", made: str = "") -> Any:
    """Unpickle a helper: the same object if this process has it, else attach by name."""
    return _noted(cls._attach(stem, spec, owner_pid, origin, made))


def _made_where() -> str:
    """Where the user's code that makes a helper is: ``on line 2 of cell In[4]`` (an IPython
    cell), ``on line 12 of run.py`` (a file), or "" (``<string>``, ``<stdin>``): the first
    frame out of mpmagic. The line tells apart two helpers made in one cell."""
    frame: Any = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return ""
    filename = frame.f_code.co_filename
    label = cell_label(filename)
    if label is not None:
        return f"on line {frame.f_lineno} of cell {label}"
    return "" if filename.startswith("<") else f"on line {frame.f_lineno} of {os.path.basename(filename)}"


# Which helpers a pickle holds, as it is loaded (collect_attached): %pdebug asks,
# before it replays a failure here, whether the payload reads a queue or waits
# on an event (which would take the user's items, or wait for ever).
_collecting = threading.local()


@contextlib.contextmanager
def collect_attached() -> Iterator[list[tuple[str, Any]]]:
    """The helpers unpickled in this thread inside the block, as (kind, helper)
    pairs: kind is ``"Queue"``, ``"Value"``, ``"Event"``... (the constructor's name)."""
    found: list[tuple[str, Any]] = []
    outer = getattr(_collecting, "found", None)
    _collecting.found = found
    try:
        yield found
    finally:
        _collecting.found = outer


def _noted(helper: Any) -> Any:
    found = getattr(_collecting, "found", None)
    if found is not None and all(h is not helper for _, h in found):
        found.append((helper._kind, helper))
    return helper


def _lock_of(cls: Any, stem: str, spec: tuple, owner_pid: int, origin: str = "", made: str = "") -> _HolderLock:
    """Unpickle a helper's lock (what ``get_lock()`` returned).

    The lock keeps its helper alive here, so a later unpickled ``v`` finds the
    same helper, and the same lock object: two lock objects over one semaphore
    would deadlock ``with lock: v.value += 1`` (the inner acquire would wait for
    the outer). The owner's own helper needs no such reference.
    """
    helper = _noted(cls._attach(stem, spec, owner_pid, origin, made))
    if helper._owner_pid != _PID:
        helper._lock.keep = helper
    return helper._lock


def _after_fork_in_child() -> None:
    global _PID
    _PID = os.getpid()
    for helper in list(_registry.values()):
        helper._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# The notebook's current backend, as ``mpmagic.pool`` knows it: pool registers
# its lookup here when it is imported. ``shared`` must not import ``pool``
# (pool -> backends.dask -> dask_shared -> shared would close an import
# cycle); no lookup yet means no pool was made, and helpers are local.
_backend_lookup: Callable[[], Any] | None = None


def set_backend_lookup(lookup: Callable[[], Any]) -> None:
    """Called by ``mpmagic.pool`` once: how to find the current backend."""
    global _backend_lookup
    _backend_lookup = lookup


def current_backend() -> Any:
    """The notebook's current backend (None before any pool, or in a worker)."""
    return _backend_lookup() if _backend_lookup is not None else None


def _backend_helper(kind: str, args: tuple, kwargs: dict) -> Any:
    """What the current backend makes for this helper, or NotImplemented.

    ``kwargs`` holds only the keyword arguments the user gave (defaults are
    left out), so a backend need accept only the options it supports.
    """
    backend = current_backend()
    make = backend.make_shared if backend is not None else None
    if make is None:
        if backend is None and shm.NOTEBOOK_PID is None:  # (a worker's helpers are not its shell's)
            _watch_shell()
        return NotImplemented
    return make(kind, *args, **kwargs)


def _watch_shell() -> None:
    """A helper made without a pool (``mpmagic.Queue()`` as a kernel's first mpmagic
    call): an IPython shell's exit frees it and stops the resource tracker it
    started (``exiting.watch_shell``), as a pool's does. Without it Jupyter
    SIGTERMed the kernel ~2.6 s into its shutdown, the tracker saying its
    segments "leaked". (Imported here: a worker never needs ``exiting``.)"""
    from .. import exiting

    exiting.watch_shell(release_all)


def _given(**options: tuple[Any, Any]) -> dict[str, Any]:
    """The options (``name=(value, default)``) whose value is not the default."""
    return {k: v for k, (v, default) in options.items() if v is not default and v != default}


def _check_platform(kind: str) -> None:
    """Raise compat's one line (what is missing, what to use instead) where helpers cannot work."""
    if _SemLock is None:
        try:
            compat.semlock_class()
        except compat.MissingFeatureError as missing:
            raise compat.MissingFeatureError(f"mpmagic.{kind}: {missing}") from None



class IterUntilClosed:
    """``for item in q:`` takes items until the queue is closed and drained.

    Safe with several consumers: each one stops. Shared by every queue that has
    ``get()`` raising :class:`QueueClosed` (the local one, the Dask one).
    """

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield self.get()  # type: ignore[attr-defined]
            except QueueClosed:
                return

