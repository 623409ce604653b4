"""Queue, Value, Array, Lock, RLock and Event that work inside running tasks.

The stdlib objects cannot reach a pool that is already running under spawn or
forkserver ("... should only be shared between processes through
inheritance"), and Manager proxies cost a round trip to a server process per
operation. These helpers live in POSIX shared memory and named semaphores
instead, so they travel inside any pickle (cloudpickle payloads, ``%pmap``
items, ``%%parallel`` names) *by name*: the receiving process reopens the
names, and never needs an inherited file descriptor. That works on spawn,
forkserver and fork, into workers started before the helper existed.

The API is the stdlib's (``put/get/qsize/empty``, ``value``, ``get_lock()``,
indexing, ``with lock:``), so the classic examples run unchanged apart from the
constructor. On top of it:

* ``q.close()`` ends the stream: ``for item in q:`` in every consumer stops
  once the queue is closed *and* drained (see :class:`SharedQueue`).
* ``arr.as_numpy()`` / ``numpy.asarray(arr)`` is a zero-copy view.
* A lock whose holder died (a worker killed on timeout or interrupt) is taken
  over by the next process that waits for it, with a ``RuntimeWarning``.

Lifetime: the process that makes a helper owns its names. They are unlinked
when that process drops the object (``weakref.finalize``) or exits, and are
registered with multiprocessing's resource tracker, which unlinks them if the
owner is killed (SIGKILL) before it can. Processes that attach only map the
names; using a helper whose owner released it raises :class:`SharedObjectGone`.

Other backends: each constructor first asks the current backend
(``mpmagic.pool.current_pool()``) for ``make_shared(kind, *args, **kwargs)``,
where ``kind`` is ``"Queue"``, ``"Value"``, ``"Array"``, ``"Lock"``,
``"RLock"`` or ``"Event"`` and the arguments are the constructor's. Whatever
it returns is the helper (it should offer the same API); returning
``NotImplemented`` falls back to the local shared-memory helper, and raising
(say a :class:`~mpmagic.errors.UsageError`) tells the user it is unsupported.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import pickle
import queue
import secrets
import struct
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterator
from multiprocessing import resource_tracker
from typing import Any

from . import payload
from .errors import MPMagicError, UsageError

try:
    import _multiprocessing
    import _posixshmem

    _SemLock = _multiprocessing.SemLock
except ImportError:  # Windows: no POSIX names
    _SemLock = None

__all__ = [
    "Queue",
    "Value",
    "Array",
    "Lock",
    "RLock",
    "Event",
    "SharedQueue",
    "SharedValue",
    "SharedArray",
    "SharedLock",
    "SharedRLock",
    "SharedEvent",
    "SharedObjectGone",
    "QueueClosed",
]


class SharedObjectGone(MPMagicError):
    """A shared helper's names were released: its owner dropped it or exited."""


class QueueClosed(MPMagicError, queue.Empty):
    """``get`` on a queue that is closed and drained: nothing more will come.

    A subclass of :class:`queue.Empty`, so loops that stop on ``Empty`` stop here too.
    """


# --------------------------------------------------------------------------
# Processes, names and segments

_PID = os.getpid()
#: Every name a helper creates starts with this (/dev/shm/mpsh..., /dev/shm/sem.mpsh...).
PREFIX = "mpsh"
_SLICE = 0.25  # seconds a blocked call waits before checking on a lock's holder
_SEMAPHORE = 1  # _multiprocessing.SemLock kind: a plain counting semaphore
_SEM_MAX = getattr(_SemLock, "SEM_VALUE_MAX", 32767) if _SemLock else 0
_MAGIC = 0x6D706D6167696301  # "mpmagic" + layout version
_HEADER = 128  # bytes of header (16 words) in front of every helper's data

_registry: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def _alive(pid: int) -> bool:
    """Is process ``pid`` running (a zombie, killed but not yet reaped, is not)?"""
    if pid == _PID:
        return True
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
    return state not in (b"Z", b"X")


def _new_stem() -> str:
    # Short (macOS allows 31 characters); "mpsh", apart from shm.py's "mpm_".
    return "/" + PREFIX + secrets.token_hex(5)


class _Segment:
    """A POSIX shared-memory segment mapped into this process."""

    def __init__(self, name: str, size: int | None = None) -> None:
        create = size is not None
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = _posixshmem.shm_open(name, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self.mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.name = name
        self.size = size
        self.words = memoryview(self.mmap)[:_HEADER].cast("Q")  # the header's u64 words

    def guard(self):
        """An flock on the segment: held only for microseconds, and released by
        the kernel if its holder dies. Decides who takes over a dead holder's lock."""
        return _Flock(self.name)


class _Flock:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> _Flock:
        self.fd = _posixshmem.shm_open(self.name, os.O_RDWR, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)  # releases the flock


def _unlink(name: str, rtype: str) -> None:
    try:
        if rtype == "semaphore":
            _multiprocessing.sem_unlink(name)
        else:
            _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        pass
    try:
        resource_tracker.unregister(name, rtype)
    except Exception:
        pass


def _release_names(names: list[tuple[str, str]], owner_pid: int, on_release: Any = None) -> None:
    """Finalizer of an owned helper: unlink its names (only in the owner process)."""
    if on_release is not None:
        on_release()
    if os.getpid() != owner_pid:
        return  # a forked copy of the owner's object: the names are not ours
    for name, rtype in names:
        _unlink(name, rtype)


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


def _wait(sem: Any, seconds: float) -> bool:
    """Take a token from ``sem`` within ``seconds`` (interruptible by Ctrl-C)."""
    return sem.acquire(True, max(0.0, seconds))


# --------------------------------------------------------------------------
# Locks that know their holder


class _HolderLock:
    """A lock on a named semaphore that records its holder's pid in shared memory.

    If a process dies holding it (a worker killed on timeout or interrupt), the
    next process that waits for it notices within ``_SLICE`` seconds and takes
    it over; the segment's flock makes sure only one waiter does. A holder
    killed in the instant between taking the semaphore and writing its pid is
    not seen: this is best effort, not a robust mutex.
    """

    def __init__(self, sem: Any, seg: _Segment, slot: int, recursive: bool, what: str | None) -> None:
        self.sem = sem
        self.seg = seg
        self.words = seg.words
        self.slot = slot
        self.recursive = recursive
        self.what = what  # shown in the takeover warning; None for internal locks
        self.owner: int | None = None  # thread ident (recursive locks)
        self.depth = 0
        self.helper: tuple | None = None  # how to find it again elsewhere (see __reduce__)

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        if self.recursive:
            me = threading.get_ident()
            if self.owner == me:
                self.depth += 1
                return True
        if not self.sem.acquire(False):
            if not block or not self._wait(timeout):
                return False
        self.words[self.slot] = _PID
        if self.recursive:
            self.owner, self.depth = me, 1
        return True

    def _wait(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            if step > 0 and self.sem.acquire(True, step):
                return True
            if self._take_over():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _take_over(self) -> bool:
        """Become the holder if the recorded one is dead (the semaphore stays taken)."""
        holder = self.words[self.slot]
        if not holder or _alive(holder):
            return False
        try:
            with self.seg.guard():
                if self.words[self.slot] != holder:
                    return False  # another waiter took it over first
                self.words[self.slot] = _PID
        except FileNotFoundError:
            return False
        if self.what:
            warnings.warn(
                f"{self.what}: process {holder} died while holding the lock (a worker killed on "
                "timeout or interrupt?); this process took it over, and the data it guarded may be "
                "half-updated",
                RuntimeWarning,
                stacklevel=4,
            )
        return True

    def release(self) -> None:
        if self.recursive:
            if self.owner != threading.get_ident():
                raise RuntimeError("cannot release an RLock this thread does not hold")
            self.depth -= 1
            if self.depth:
                return
            self.owner = None
        self.words[self.slot] = 0
        self.sem.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

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
        return (_lock_of, self.helper)

    def __repr__(self) -> str:
        holder = self.words[self.slot]
        kind = "RLock" if self.recursive else "Lock"
        return f"<mpmagic {kind} of {self.what} {'held by pid ' + str(holder) if holder else 'free'}>"


# --------------------------------------------------------------------------
# The base of every helper: names, ownership, pickling by name


class _Helper:
    """What every helper shares: its names, its owner, pickling by name."""

    _kind = "helper"
    _letters = ""  # its semaphores (see _sem_letters)

    _stem: str
    _owner_pid: int
    _spec: tuple
    _seg: _Segment
    _sems: dict[str, Any]

    @classmethod
    def _create(cls, spec: tuple, size: int) -> Any:
        self = cls.__new__(cls)
        self._spec, self._owner_pid = spec, _PID
        names: list[tuple[str, str]] = []
        for _ in range(8):
            self._stem = _new_stem()
            try:
                self._seg = _Segment(self._stem, size)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 8 collisions of 40 random bits
            raise MPMagicError("could not find a free shared-memory name")
        names.append((self._stem, "shared_memory"))
        resource_tracker.register(self._stem, "shared_memory")
        self._sems = {}
        try:
            for letter in self._sem_letters():
                name = f"{self._stem}.{letter}"
                value, maxvalue = self._sem_init(letter)
                self._sems[letter] = _SemLock(_SEMAPHORE, value, maxvalue, name, False)
                names.append((name, "semaphore"))
                resource_tracker.register(name, "semaphore")
            self._seg.words[0] = _MAGIC
            self._init_memory()
            self._setup()
        except BaseException:
            _release_names(names, _PID)
            raise
        weakref.finalize(self, _release_names, names, _PID, self._on_release())
        with _registry_lock:
            _registry[self._stem] = self
        return self

    @classmethod
    def _attach(cls, stem: str, spec: tuple, owner_pid: int) -> Any:
        with _registry_lock:
            found = _registry.get(stem)
            if found is not None:
                return found
            self = cls.__new__(cls)
            self._stem, self._spec, self._owner_pid = stem, spec, owner_pid
            try:
                self._seg = _Segment(stem)
                self._sems = {
                    letter: _SemLock._rebuild(0, _SEMAPHORE, self._sem_init(letter)[1], f"{stem}.{letter}")
                    for letter in self._sem_letters()
                }
            except FileNotFoundError:
                raise self._gone() from None
            if self._seg.words[0] != _MAGIC:
                raise SharedObjectGone(f"{self._describe()}: its shared memory does not hold an mpmagic helper")
            self._setup()
            _registry[stem] = self
            return self

    def _own_lock(self, recursive: bool) -> _HolderLock:
        """The helper's lock: semaphore "l", holder pid in header word 1. Pickled on
        its own (``lock = v.get_lock()``), it travels as "the lock of this helper"."""
        lock = _HolderLock(self._sems["l"], self._seg, 1, recursive, self._describe())
        lock.helper = self.__reduce__()[1]
        return lock

    def _gone(self) -> SharedObjectGone:
        if _alive(self._owner_pid):
            why = "released it (the object was dropped there, e.g. deleted or replaced)"
        else:
            why = "has exited (kernel restarted or shut down?)"
        return SharedObjectGone(
            f"{self._describe()} is gone: the process that made it (pid {self._owner_pid}) {why}. "
            f"Make a new mpmagic.{self._kind}(...) in the notebook and pass that one."
        )

    def _describe(self) -> str:
        return f"mpmagic.{self._kind} {self._stem.lstrip('/')}"

    def __reduce__(self) -> tuple:
        return (_attach, (type(self), self._stem, self._spec, self._owner_pid))

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


def _attach(cls: type, stem: str, spec: tuple, owner_pid: int) -> Any:
    """Unpickle a helper: the same object if this process has it, else attach by name."""
    return cls._attach(stem, spec, owner_pid)


def _lock_of(cls: type, stem: str, spec: tuple, owner_pid: int) -> _HolderLock:
    """Unpickle a helper's lock (what ``get_lock()`` returned).

    The lock keeps its helper alive here, so a later unpickled ``v`` finds the
    same helper, and the same lock object: two lock objects over one semaphore
    would deadlock ``with lock: v.value += 1`` (the inner acquire would wait for
    the outer). The owner's own helper needs no such reference.
    """
    helper = cls._attach(stem, spec, owner_pid)
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


def _backend_helper(kind: str, args: tuple, kwargs: dict) -> Any:
    """What the current backend makes for this helper, or NotImplemented.

    ``kwargs`` holds only the keyword arguments the user gave (defaults are
    left out), so a backend need accept only the options it supports.
    """
    from .pool import current_pool

    make = getattr(current_pool(), "make_shared", None)
    if make is None:
        return NotImplemented
    return make(kind, *args, **kwargs)


def _given(**options: tuple[Any, Any]) -> dict[str, Any]:
    """The options (``name=(value, default)``) whose value is not the default."""
    return {k: v for k, (v, default) in options.items() if v is not default and v != default}


def _check_platform(kind: str) -> None:
    if _SemLock is None:
        raise UsageError(f"mpmagic.{kind} needs POSIX shared memory and named semaphores (Linux or macOS)")


# --------------------------------------------------------------------------
# Lock, RLock, Event


class SharedLock(_Helper):
    """A lock any process can take, like ``multiprocessing.Lock``.

    ``acquire(block=True, timeout=None)``, ``release()``, ``with lock:``. If a
    process dies holding it, the next waiter takes it over (with a warning).
    """

    _kind = "Lock"
    _letters = "l"
    _recursive = False

    def _setup(self) -> None:
        self._lock = self._own_lock(self._recursive)
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def _after_fork(self) -> None:
        self._lock.after_fork()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def locked(self) -> bool:
        """Is it held (by any process) right now?"""
        return self._lock.locked()

    def __repr__(self) -> str:
        holder = self._seg.words[1]
        return f"<mpmagic.{self._kind} {'held by pid ' + str(holder) if holder else 'free'}>"


class SharedRLock(SharedLock):
    """A recursive lock: the holding thread may take it again, and must release it as often."""

    _kind = "RLock"
    _recursive = True


class SharedEvent(_Helper):
    """A flag processes can wait for, like ``multiprocessing.Event``."""

    _kind = "Event"
    _letters = "e"

    def _sem_init(self, letter: str) -> tuple[int, int]:
        return 0, _SEM_MAX

    def _setup(self) -> None:
        self._sem = self._sems["e"]

    def is_set(self) -> bool:
        return bool(self._seg.words[1])

    def set(self) -> None:
        self._seg.words[1] = 1
        _notify(self._sem)

    def clear(self) -> None:
        self._seg.words[1] = 0
        while self._sem.acquire(False):  # drop stale wake-ups
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is set (True) or ``timeout`` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._seg.words[1]:
            step = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            if step <= 0:
                return False
            if _wait(self._sem, step):
                _notify(self._sem)  # pass the wake-up on to the next waiter
        return True

    def __repr__(self) -> str:
        return f"<mpmagic.Event {'set' if self.is_set() else 'unset'}>"


# --------------------------------------------------------------------------
# Value and Array

_TYPES: dict[str, Any] = {
    "c": ctypes.c_char, "u": ctypes.c_wchar, "?": ctypes.c_bool,
    "b": ctypes.c_byte, "B": ctypes.c_ubyte, "h": ctypes.c_short, "H": ctypes.c_ushort,
    "i": ctypes.c_int, "I": ctypes.c_uint, "l": ctypes.c_long, "L": ctypes.c_ulong,
    "q": ctypes.c_longlong, "Q": ctypes.c_ulonglong,
    "f": ctypes.c_float, "d": ctypes.c_double, "g": ctypes.c_longdouble,
}  # fmt: skip
_CODE_OF = {}
for _code, _t in _TYPES.items():
    _CODE_OF.setdefault(_t, _code)


def _typecode(typecode: Any, kind: str) -> str:
    """The one-letter code of ``typecode`` (a code or a ctypes type), or a clear error."""
    if isinstance(typecode, str) and typecode in _TYPES:
        return typecode
    if isinstance(typecode, type) and typecode in _CODE_OF:
        return _CODE_OF[typecode]
    raise UsageError(
        f"mpmagic.{kind}: unknown typecode {typecode!r}. Use one of "
        f"{', '.join(repr(c) for c in _TYPES)} (as in the array module: 'i' int, 'd' float, "
        "'b' byte, 'c' char...) or a ctypes type such as ctypes.c_double"
    )


def _lock_arg(lock: Any, kind: str) -> tuple[str, Any]:
    """``lock=True`` (own RLock), False (none) or an mpmagic Lock/RLock to share."""
    if lock is True:
        return "own", None
    if lock is False or lock is None:
        return "none", None
    if isinstance(lock, SharedLock):
        return "given", lock
    raise UsageError(
        f"mpmagic.{kind}: lock must be True, False or an mpmagic.Lock()/RLock(), not {type(lock).__name__} "
        "(a multiprocessing lock cannot reach running workers)"
    )


class _Synchronized(_Helper):
    """Shared ctypes data behind an optional lock (the stdlib's Synchronized)."""

    _letters = "l"
    _spec: tuple  # (typecode, length or None, lock mode, given lock)

    def _setup(self) -> None:
        code, length, mode, given = self._spec
        ctype = _TYPES[code] if length is None else _TYPES[code] * length
        self._obj = ctype.from_buffer(self._seg.mmap, _HEADER)
        if mode == "own":
            self._lock: Any = self._own_lock(recursive=True)
        elif mode == "given":
            self._lock = given._lock
        else:
            self._lock = None

    @classmethod
    def _make(cls, typecode: Any, length: int | None, lock: Any) -> Any:
        _check_platform(cls._kind)
        code = _typecode(typecode, cls._kind)
        mode, given = _lock_arg(lock, cls._kind)
        size = ctypes.sizeof(_TYPES[code]) * (1 if length is None else length)
        return cls._create((code, length, mode, given), _HEADER + max(size, 1))

    def _sem_letters(self) -> str:
        return "l" if self._spec[2] == "own" else ""

    def _after_fork(self) -> None:
        if self._lock is not None:
            self._lock.after_fork()

    def get_lock(self) -> Any:
        """The lock that guards the data (an RLock unless one was given)."""
        if self._lock is None:
            raise UsageError(f"{self._describe()} was made with lock=False: it has no lock")
        return self._lock

    def get_obj(self) -> Any:
        """The raw ctypes object in shared memory (no locking)."""
        return self._obj

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        return self.get_lock().acquire(block, timeout)

    def release(self) -> None:
        self.get_lock().release()

    def __enter__(self) -> bool:
        return self.get_lock().acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


class SharedValue(_Synchronized):
    """One number in shared memory, like ``multiprocessing.Value``.

    ``v.value`` reads or writes it (under the lock, if it has one). Read-modify-
    write such as ``v.value += 1`` is *not* atomic: do it inside
    ``with v.get_lock():``.
    """

    _kind = "Value"

    @property
    def value(self) -> Any:
        lock = self._lock
        if lock is None:
            return self._obj.value
        lock.acquire()
        try:
            return self._obj.value
        finally:
            lock.release()

    @value.setter
    def value(self, new: Any) -> None:
        lock = self._lock
        if lock is None:
            self._obj.value = new
            return
        lock.acquire()
        try:
            self._obj.value = new
        finally:
            lock.release()

    def __repr__(self) -> str:
        return f"<mpmagic.Value {self._spec[0]!r} {self._obj.value!r}>"


class SharedArray(_Synchronized):
    """A fixed-size array in shared memory, like ``multiprocessing.Array``.

    Indexing and slicing go through the lock (if it has one). ``as_numpy()``
    (or ``numpy.asarray(arr)``) is a zero-copy view that takes no lock.
    """

    _kind = "Array"

    def __len__(self) -> int:
        return self._spec[1]

    def __getitem__(self, index: Any) -> Any:
        lock = self._lock
        if lock is None:
            return self._obj[index]
        with lock:
            return self._obj[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        lock = self._lock
        if lock is None:
            self._obj[index] = value
            return
        with lock:
            self._obj[index] = value

    @property
    def value(self) -> Any:
        """For typecode 'c': the bytes up to the first NUL (like the stdlib)."""
        return self._char_obj().value

    @value.setter
    def value(self, new: Any) -> None:
        obj = self._char_obj()
        with self._lock or contextlib.nullcontext():
            obj.value = new

    @property
    def raw(self) -> bytes:
        return self._char_obj().raw

    def _char_obj(self) -> Any:
        if self._spec[0] != "c":
            raise AttributeError(f"{self._describe()} has typecode {self._spec[0]!r}: .value and .raw are for 'c'")
        return self._obj

    def as_numpy(self) -> Any:
        """A numpy array over the shared memory (no copy, no lock)."""
        import numpy

        if self._spec[0] == "u":
            return numpy.frombuffer(self._seg.mmap, dtype=f"<U{1}", count=len(self), offset=_HEADER)
        return numpy.ctypeslib.as_array(self._obj)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        view = self.as_numpy()
        if dtype is not None:
            view = view.astype(dtype, copy=bool(copy))
        elif copy:
            view = view.copy()
        return view

    def __repr__(self) -> str:
        head = self._obj[:8]
        more = ", ..." if len(self) > 8 else ""
        return f"<mpmagic.Array {self._spec[0]!r} len={len(self)} [{str(list(head))[1:-1]}{more}]>"


# --------------------------------------------------------------------------
# Queue
#
# One segment: a header of u64 words, then a ring of ``capacity`` bytes that
# carries records: a 16-byte head (payload length u32, flags u32, writer pid
# u64) and the pickled payload, padded to 16 bytes; a payload may wrap around
# the ring's end. A message too big for the ring travels as fragments
# (FIRST ... LAST) while one writer holds the write lock and one reader the
# read lock. Semaphores: "m" guards the header (held for a copy at most), "w"
# (writers that stream or wait for room) and "r" (readers that wait or
# stream), "d" wakes the waiting reader, "s" wakes producers waiting for room.
#
# put() never blocks on bytes: when the ring is full, the item waits in this
# process's backlog and a feeder thread writes it as room appears (the stdlib
# Queue does the same with its pipe). ``qsize`` counts items accepted by put
# and not yet taken, wherever they are.

_W_MAGIC, _W_CAP, _W_MAXSIZE, _W_PRODUCERS = 0, 1, 2, 3
_W_HEAD, _W_TAIL, _W_ACCEPTED, _W_TAKEN, _W_CLOSES = 4, 5, 6, 7, 8
_W_STREAMER, _W_MUTEX, _W_WLOCK, _W_RLOCK = 9, 10, 11, 12
_REC = struct.Struct("<IIQ")
_FIRST, _LAST = 1, 2
_WHOLE = _FIRST | _LAST
_CLOSE = object()  # a close() waiting in the backlog behind this process's items


def _padded(n: int) -> int:
    return (n + 15) & ~15


class _Ring:
    """The shared part of a queue in one process: header, ring, semaphores.

    The feeder thread holds this, not the :class:`SharedQueue`, so the owner
    dropping the queue still releases it while a backlog waits for room.
    """

    def __init__(self, seg: _Segment, sems: dict[str, Any], capacity: int) -> None:
        self.seg, self.cap = seg, capacity
        self.w = seg.words
        self.ring = memoryview(seg.mmap)[_HEADER : _HEADER + capacity]
        self.mutex = _HolderLock(sems["m"], seg, _W_MUTEX, False, None)
        self.wlock = _HolderLock(sems["w"], seg, _W_WLOCK, False, None)
        self.rlock = _HolderLock(sems["r"], seg, _W_RLOCK, False, None)
        self.data, self.space = sems["d"], sems["s"]

    # The caller holds the mutex for these four.
    def write_record(self, data: memoryview | bytes, flags: int) -> None:
        w, cap, ring = self.w, self.cap, self.ring
        tail = w[_W_TAIL]
        pos = tail % cap
        _REC.pack_into(ring, pos, len(data), flags, _PID)
        start = (pos + 16) % cap
        first = min(len(data), cap - start)
        ring[start : start + first] = data[:first]
        if first < len(data):
            ring[: len(data) - first] = data[first:]
        w[_W_TAIL] = tail + 16 + _padded(len(data))

    def read_record(self) -> tuple[int, int, bytes]:
        w, cap, ring = self.w, self.cap, self.ring
        head = w[_W_HEAD]
        pos = head % cap
        length, flags, pid = _REC.unpack_from(ring, pos)
        start = (pos + 16) % cap
        first = min(length, cap - start)
        data = ring[start : start + first].tobytes()
        if first < length:
            data += ring[: length - first].tobytes()
        w[_W_HEAD] = head + 16 + _padded(length)
        return flags, pid, data

    def free(self) -> int:
        return self.cap - (self.w[_W_TAIL] - self.w[_W_HEAD])

    def closed(self) -> bool:
        return self.w[_W_CLOSES] >= self.w[_W_PRODUCERS]

    def count_close(self) -> None:
        with self.mutex:
            self.w[_W_CLOSES] += 1
        _notify(self.data)

    def write_waiting(self, data: bytes, local: _Local) -> bool:
        """Write one message, waiting for room (in fragments if it is bigger than
        the ring). False if the queue was released meanwhile."""
        if not self.wlock.acquire(True, None):
            return False
        w = self.w
        try:
            with self.mutex:
                w[_W_STREAMER] = 0  # non-zero only if a writer died streaming: its message is void
            view = memoryview(data)
            sent, whole = 0, 16 + _padded(len(view)) <= self.cap
            if not whole:
                with self.mutex:
                    w[_W_STREAMER] = _PID
            while sent < len(view):
                left = len(view) - sent
                with self.mutex:
                    if whole:
                        chunk = left if 16 + _padded(left) <= self.free() else 0
                    else:  # fragments of at least a quarter of the ring, or the rest
                        chunk = min(left, (self.free() - 16) & ~15)
                        chunk = chunk if chunk >= min(left, self.cap // 4) else 0
                    if chunk > 0:
                        flags = (_FIRST if sent == 0 else 0) | (_LAST if chunk == left else 0)
                        self.write_record(view[sent : sent + chunk], flags)
                        sent += chunk
                if chunk > 0:
                    _notify(self.data)
                elif local.stopped:
                    return False
                else:
                    _wait(self.space, _SLICE)
            return True
        finally:
            if not whole:
                with self.mutex:
                    w[_W_STREAMER] = 0
            self.wlock.release()


class _Local:
    """This process's side of a queue: the backlog of items not yet in the ring."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.backlog: deque = deque()
        self.feeder: threading.Thread | None = None
        self.stopped = False

    def push(self, ring: _Ring, item: Any) -> None:
        """Queue ``item`` behind the backlog (the caller holds ``lock``); start the feeder."""
        self.backlog.append(item)
        if self.feeder is None:
            self.feeder = threading.Thread(target=_feed, args=(ring, self), daemon=True, name="mpmagic-queue-feeder")
            self.feeder.start()

    def wait_empty(self, timeout: float | None) -> bool:
        with self.lock:
            return self.cond.wait_for(lambda: not self.backlog or self.stopped, timeout)

    def stop(self) -> None:
        """The owner released the queue: the backlog has nowhere to go."""
        with self.lock:
            self.stopped = True
            self.cond.notify_all()


def _feed(ring: _Ring, local: _Local) -> None:
    """The feeder thread: write the backlog in order, waiting for room."""
    while True:
        with local.lock:
            if not local.backlog or local.stopped:
                local.feeder = None
                local.cond.notify_all()
                return
            item = local.backlog[0]
        if item is _CLOSE:
            ring.count_close()
        elif not ring.write_waiting(item, local):
            continue  # stopped: the loop ends above
        with local.lock:
            local.backlog.popleft()
            local.cond.notify_all()


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


class SharedQueue(IterUntilClosed, _Helper):
    """A FIFO queue between any processes, like ``multiprocessing.Queue``.

    ``put(obj, block=True, timeout=None)``, ``get(block=True, timeout=None)``,
    ``put_nowait``, ``get_nowait``, ``qsize()``, ``empty()``, ``full()``.

    End of stream: producers call ``q.close()`` when done; consumers write
    ``for item in q:``, which ends when the queue is closed and every item has
    been taken (a blocking ``get`` then raises :class:`QueueClosed`). With
    several consumers, each one stops. With several producers, make the queue
    with ``Queue(producers=N)``: the stream ends after N calls to ``close()``
    (one per producer), or let the notebook call ``close()`` once after all
    producers have returned.
    """

    _kind = "Queue"
    _letters = "mwrds"
    _spec: tuple  # (maxsize, capacity, producers)

    def _sem_init(self, letter: str) -> tuple[int, int]:
        return (1, 1) if letter in "mwr" else (0, _SEM_MAX)

    def _init_memory(self) -> None:
        maxsize, capacity, producers = self._spec
        w = self._seg.words
        w[_W_CAP], w[_W_MAXSIZE], w[_W_PRODUCERS] = capacity, maxsize, producers

    def _setup(self) -> None:
        self._maxsize = self._spec[0]
        self._r = _Ring(self._seg, self._sems, self._spec[1])
        self._local = _Local()

    def _on_release(self) -> Any:
        return self._local.stop

    def _after_fork(self) -> None:
        self._local = _Local()  # the parent's backlog and feeder are the parent's

    # -- put ----------------------------------------------------------------
    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` in the queue. Only a bounded queue (``maxsize > 0``) that is
        full makes it wait: ``queue.Full`` after ``timeout`` seconds, or at once
        with ``block=False``. Raises ValueError once the queue is closed."""
        data = payload.dumps_data(obj)
        need = 16 + _padded(len(data))
        r, w, maxsize = self._r, self._seg.words, self._maxsize
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            local = self._local
            with local.lock:
                accepted = written = room = False
                with r.mutex:
                    if r.closed():
                        raise ValueError(f"{self._describe()} is closed: nothing more can be put in it")
                    if not maxsize or w[_W_ACCEPTED] - w[_W_TAKEN] < maxsize:
                        w[_W_ACCEPTED] += 1
                        accepted = True
                        if not local.backlog and not w[_W_STREAMER] and need <= r.free():
                            r.write_record(data, _WHOLE)
                            written = True
                        room = bool(maxsize) and w[_W_ACCEPTED] - w[_W_TAKEN] < maxsize
                if accepted:
                    if written:
                        _notify(r.data)
                    else:
                        local.push(r, data)
                    if room:
                        _notify(r.space)  # another blocked producer may go on too
                    return
            if not block:
                raise queue.Full
            left = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            if left <= 0:
                raise queue.Full
            _wait(r.space, left)

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def close(self) -> None:
        """End of stream from this producer, after the items it has put."""
        local = self._local
        with local.lock:
            if local.backlog:
                local.push(self._r, _CLOSE)
                return
        self._r.count_close()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until this process's backlog (items put while the ring was full)
        is in the shared ring; True if it is, False after ``timeout`` seconds."""
        return self._local.wait_empty(timeout)

    join_thread = flush  # the stdlib's name for the same wait

    # -- get ----------------------------------------------------------------
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the next item. Waits (up to ``timeout`` seconds) while
        the queue is empty, then raises ``queue.Empty``; raises :class:`QueueClosed`
        once the queue is closed and drained."""
        return pickle.loads(self._take(block, timeout))

    def get_nowait(self) -> Any:
        return self.get(False)

    def _take(self, block: bool, timeout: float | None) -> bytes:
        r, w = self._r, self._seg.words
        # Fast path: a whole record at the head, taken under the mutex alone.
        with r.mutex:
            if w[_W_TAIL] != w[_W_HEAD]:
                if _REC.unpack_from(r.ring, w[_W_HEAD] % r.cap)[1] == _WHOLE:
                    data = r.read_record()[2]
                    w[_W_TAKEN] += 1
                    _notify(r.space)
                    return data
            elif not block:
                raise QueueClosed(self._closed_message()) if r.closed() else queue.Empty
        deadline = None if timeout is None else time.monotonic() + timeout
        if not r.rlock.acquire(block, timeout):
            raise queue.Empty
        try:
            return self._take_waiting(block, deadline)
        finally:
            r.rlock.release()

    def _take_waiting(self, block: bool, deadline: float | None) -> bytes:
        """Holding the read lock: the next message, waiting and joining fragments."""
        r, w = self._r, self._seg.words
        parts: list[bytes] = []
        writer = 0
        while True:
            got = done = None
            with r.mutex:
                if w[_W_TAIL] != w[_W_HEAD]:
                    flags, pid, got = r.read_record()
                    counted = 0  # messages this record finishes (read, or lost for good)
                    if flags & _FIRST:
                        counted += bool(parts)  # a partial one whose writer died
                        parts, writer = [got], pid
                    elif parts:
                        parts.append(got)
                    elif flags & _LAST:
                        counted += 1  # the rest of a message whose reader died
                    if parts and flags & _LAST:
                        counted += 1
                        done, parts = parts, []
                    w[_W_TAKEN] += counted
                closed = r.closed()
            if got is not None:
                _notify(r.space)
                if done is not None:
                    return done[0] if len(done) == 1 else b"".join(done)
                continue
            if parts:  # mid-message: wait for the rest while its writer lives
                if not _alive(writer):
                    with r.mutex:
                        w[_W_TAKEN] += 1
                    parts = []
                else:
                    _wait(r.data, _SLICE)
                continue
            if closed:
                raise QueueClosed(self._closed_message())
            left = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            if not block or left <= 0:
                raise queue.Empty
            _wait(r.data, left)

    def _closed_message(self) -> str:
        return f"{self._describe()} is closed and every item has been taken"

    # -- state ----------------------------------------------------------------
    def qsize(self) -> int:
        """Items put and not yet taken (approximate while others put and get)."""
        w = self._seg.words
        return max(0, w[_W_ACCEPTED] - w[_W_TAKEN])

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return bool(self._maxsize) and self.qsize() >= self._maxsize

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (by every producer, if several)."""
        return self._r.closed()

    def __repr__(self) -> str:
        state = "closed" if self._r.closed() else "open"
        bound = f" maxsize={self._maxsize}" if self._maxsize else ""
        return f"<mpmagic.Queue {state}{bound} qsize={self.qsize()}>"


# --------------------------------------------------------------------------
# The constructors


def Queue(maxsize: int = 0, *, producers: int = 1, capacity: int = 1 << 20) -> SharedQueue:
    """A queue any process can use, like ``multiprocessing.Queue(maxsize)``.

    ``maxsize`` > 0 bounds the items in it (``put`` then waits, or raises
    ``queue.Full``). ``producers``: how many ``close()`` calls end the stream.
    ``capacity``: bytes of the shared ring; bigger messages still pass, in
    fragments, and when the ring is full ``put`` keeps items in a backlog of
    the putting process instead of blocking.
    """
    got = _backend_helper("Queue", (maxsize,), _given(producers=(producers, 1), capacity=(capacity, 1 << 20)))
    if got is not NotImplemented:
        return got
    _check_platform("Queue")
    for name, value, low in (("maxsize", maxsize, 0), ("producers", producers, 1), ("capacity", capacity, 4096)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"mpmagic.Queue: {name} must be a whole number of at least {low}, not {value!r}")
    capacity = _padded(capacity)
    return SharedQueue._create((maxsize, capacity, producers), _HEADER + capacity)


def Value(typecode: Any, value: Any = 0, lock: Any = True) -> SharedValue:
    """One shared number, like ``multiprocessing.Value(typecode, value)``.

    ``typecode`` as in the array module ('i', 'd', 'b', 'c'...) or a ctypes
    type. ``lock=True`` gives it its own RLock (``get_lock()``), ``False`` none,
    or pass an ``mpmagic.Lock()``/``RLock()`` to share one.
    """
    got = _backend_helper("Value", (typecode, value), _given(lock=(lock, True)))
    if got is not NotImplemented:
        return got
    v = SharedValue._make(typecode, None, lock)
    if not (v._spec[0] in "cu" and value == 0):  # Value('c') starts at b"\0", as in the stdlib
        v._obj.value = value
    return v


def Array(typecode: Any, size_or_initializer: Any, lock: Any = True) -> SharedArray:
    """A shared fixed-size array, like ``multiprocessing.Array(typecode, size_or_initializer)``.

    A whole number makes that many zeros; a sequence (list, bytes, numpy
    array) gives the length and the contents.
    """
    got = _backend_helper("Array", (typecode, size_or_initializer), _given(lock=(lock, True)))
    if got is not NotImplemented:
        return got
    init = size_or_initializer
    if isinstance(init, int) and not isinstance(init, bool):
        if init < 0:
            raise UsageError(f"mpmagic.Array: size must be at least 0, not {init}")
        return SharedArray._make(typecode, init, lock)
    try:
        length = len(init)
    except TypeError:
        raise UsageError(
            f"mpmagic.Array: size_or_initializer must be a whole number or a sequence, not {type(init).__name__}"
        ) from None
    arr = SharedArray._make(typecode, length, lock)
    if type(init).__module__ == "numpy" and arr._spec[0] not in "cu":
        arr.as_numpy()[:] = init
    else:
        arr._obj[:] = init if isinstance(init, (bytes, str, list)) else list(init)
    return arr


def Lock() -> SharedLock:
    """A lock any process can take, like ``multiprocessing.Lock()``."""
    got = _backend_helper("Lock", (), {})
    if got is not NotImplemented:
        return got
    _check_platform("Lock")
    return SharedLock._create((), _HEADER)


def RLock() -> SharedRLock:
    """A recursive lock any process can take, like ``multiprocessing.RLock()``."""
    got = _backend_helper("RLock", (), {})
    if got is not NotImplemented:
        return got
    _check_platform("RLock")
    return SharedRLock._create((), _HEADER)


def Event() -> SharedEvent:
    """A flag processes can set, clear and wait for, like ``multiprocessing.Event()``."""
    got = _backend_helper("Event", (), {})
    if got is not NotImplemented:
        return got
    _check_platform("Event")
    return SharedEvent._create((), _HEADER)
