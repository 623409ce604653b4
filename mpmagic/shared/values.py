"""Value and Array: ctypes data in a shared segment, behind an optional lock (the stdlib's Synchronized)."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator
from threading import get_ident as _get_ident
from typing import Any

from .. import payload
from ..errors import UsageError
from .base import _HEADER, _check_platform, _Helper, _HolderLock, _LockSide, _registry
from .locks import SharedLock

# --------------------------------------------------------------------------
# Value and Array

_TYPES: dict[str, Any] = {
    "c": ctypes.c_char, "u": ctypes.c_wchar, "?": ctypes.c_bool,
    "b": ctypes.c_byte, "B": ctypes.c_ubyte, "h": ctypes.c_short, "H": ctypes.c_ushort,
    "i": ctypes.c_int, "I": ctypes.c_uint, "l": ctypes.c_long, "L": ctypes.c_ulong,
    "q": ctypes.c_longlong, "Q": ctypes.c_ulonglong,
    "f": ctypes.c_float, "d": ctypes.c_double, "g": ctypes.c_longdouble,
}  # fmt: skip
_CODE_OF: dict[Any, str] = {}
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
    """``lock=True`` or None (own RLock), False (none) or an mpmagic Lock/RLock to share: one
    made with ``mpmagic.Lock()``/``RLock()``, or another Value's or Array's own
    (``lock=counter.get_lock()``, as ``multiprocessing`` takes a Value's lock)."""
    if lock is True or lock is None:  # (None: its own lock, as multiprocessing's lock=None makes one)
        return "own", None
    if lock is False:
        return "none", None
    if isinstance(lock, SharedLock) or (isinstance(lock, _HolderLock) and lock.helper is not None):
        return "given", lock
    raise UsageError(
        f"mpmagic.{kind}: lock must be True, False or an mpmagic.Lock()/RLock(), not {type(lock).__name__} "
        "(a multiprocessing lock cannot reach running workers)"
    )


class NoLockError(AttributeError, TypeError):
    """A lock method (``get_lock()``, ``acquire()``, ``with v:``) of a Value or Array made
    with ``lock=False``. multiprocessing's ``lock=False`` gives a raw ctypes object, on
    which ``get_lock`` is an AttributeError and ``with v:`` a TypeError (Python 3.11+; an
    AttributeError before): this is both, so code catching either behaves the same."""


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
        elif mode == "given" and isinstance(given, SharedLock):
            self._lock = given._lock
        elif mode == "given":  # another helper's own lock: that helper lives as long as this one
            self._lock = given
            self._lock_helper = _registry.get(given.helper[1])
        else:
            self._lock = None
        # (a numpy view or get_obj() of the data a run sends goes by reference: payload.helper_reference)
        payload.register_helper_memory(self, ctypes.addressof(self._obj), ctypes.sizeof(self._obj))

    def _view_at(self, dtype: Any, shape: tuple, strides: tuple, offset: int, writeable: bool) -> Any:
        """A numpy array over this helper's data, ``offset`` bytes in (no copy, no lock):
        the view of it a run sent from the notebook (``payload.helper_reference``)."""
        import numpy

        data = memoryview(self._seg.mmap)[_HEADER : _HEADER + ctypes.sizeof(self._obj)]
        view = numpy.ndarray(shape, dtype, buffer=data, offset=offset, strides=strides)
        if not writeable:
            view.flags.writeable = False
        return view

    @classmethod
    def _make(cls, typecode: Any, length: int | None, lock: Any) -> Any:
        _check_platform(cls._kind)
        code = _typecode(typecode, cls._kind)
        mode, given = _lock_arg(lock, cls._kind)
        size = ctypes.sizeof(_TYPES[code]) * (1 if length is None else length)
        if size > sys.maxsize - _HEADER:  # (ftruncate's "Python int too large to convert to C long" named no size)
            raise OverflowError(
                f"mpmagic.{cls._kind}: {length:,} items of {code!r} ({ctypes.sizeof(_TYPES[code])} bytes each) make "
                f"{size:,} bytes, more than a process can address (sys.maxsize, {sys.maxsize:,})"
            )
        return cls._create((code, length, mode, given), _HEADER + max(size, 1))

    def _sem_letters(self) -> str:
        return "l" if self._spec[2] == "own" else ""

    def _made_with(self) -> str:
        code, length, mode, _given = self._spec
        args = [repr(code)] + ([str(length)] if length is not None else []) + (["lock=False"] if mode == "none" else [])
        return f"({', '.join(args)})"

    def _after_fork(self) -> None:
        if self._lock is not None:
            self._lock.after_fork()

    def _no_lock(self, name: str) -> NoLockError:
        """The error of the lock method ``name`` when there is no lock."""
        what = "no `with` on it" if name == "__enter__" else f"no {name}()"
        return NoLockError(
            f"{self._describe()} was made with lock=False: it has no lock, so {what}, as multiprocessing's "
            "lock=False value has none; make it with lock=True, or give it one: lock=mpmagic.RLock()",
            name=name,
            obj=self,
        )

    def get_lock(self) -> Any:
        """The lock that guards the data (an RLock unless one was given).

        With ``lock=False`` there is none: :class:`NoLockError`, an AttributeError
        (a TypeError too), as on multiprocessing's raw ctypes object."""
        if self._lock is None:
            raise self._no_lock("get_lock")
        if self._spec[2] == "given":
            return self._spec[3]  # the lock it was given, itself (as the stdlib's get_lock() is)
        return self._lock

    def get_obj(self) -> Any:
        """The raw ctypes object in shared memory (no locking)."""
        return self._obj

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        if self._lock is None:
            raise self._no_lock("acquire")
        return self.get_lock().acquire(block, timeout)

    def release(self) -> None:
        if self._lock is None:
            raise self._no_lock("release")
        self.get_lock().release()

    # ``with v:`` calls the lock's own methods (see _LockSide).
    __enter__ = _LockSide(exit=False)
    __exit__ = _LockSide(exit=True)


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
        me = _get_ident()
        held = lock.depth if lock.owner == me else 0  # (lock.held_here, inlined: v.value is hot)
        try:  # (the take inside: Ctrl-C right after it still releases, see _HolderLock.held_here)
            lock.take("Value access")  # (its wait is not one on a lock the user took: waits.NAMES)
            return self._obj.value
        finally:
            if lock.owner == me and lock.depth > held:
                lock.release()

    @value.setter
    def value(self, new: Any) -> None:
        lock = self._lock
        if lock is None:
            self._obj.value = new
            return
        me = _get_ident()
        held = lock.depth if lock.owner == me else 0
        try:
            lock.take("Value access")
            self._obj.value = new
        finally:
            if lock.owner == me and lock.depth > held:
                lock.release()

    def __repr__(self) -> str:
        return f"<mpmagic.Value {self._spec[0]!r} {self._obj.value!r}>"


#: Typecodes whose numpy view is made from the bytes with this dtype: ctypes
#: describes c_wchar and c_longdouble in buffer formats numpy refuses ('<g').
_NO_BUFFER_FORMAT: dict[str, Any] = {"u": lambda np: np.dtype("<U1"), "g": lambda np: np.dtype(np.longdouble)}


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
        lock.take("Array access")  # (its wait is not one on a lock the user took: waits.NAMES)
        try:
            return self._obj[index]
        finally:
            lock.release()

    def __setitem__(self, index: Any, value: Any) -> None:
        lock = self._lock
        if lock is None:
            self._obj[index] = value
            return
        lock.take("Array access")
        try:
            self._obj[index] = value
        finally:
            lock.release()

    @property
    def value(self) -> Any:
        """For typecode 'c': the bytes up to the first NUL (like the stdlib).

        Assigning writes bytes and a NUL after them if they are shorter than the
        array (``ValueError: byte string too long`` if longer), under the lock."""
        obj = self._char_obj()
        with self._accessing():
            return obj.value

    @value.setter
    def value(self, new: Any) -> None:
        obj = self._char_obj()
        with self._accessing():
            obj.value = new

    @property
    def raw(self) -> bytes:
        """For typecode 'c': all its bytes, NULs included (like the stdlib).

        Assigning writes any bytes-like object over the start, the rest kept
        (``ValueError: byte string too long`` if longer), under the lock."""
        obj = self._char_obj()
        with self._accessing():
            return obj.raw

    @raw.setter
    def raw(self, new: Any) -> None:
        obj = self._char_obj()
        with self._accessing():
            obj.raw = new

    @contextlib.contextmanager
    def _accessing(self) -> Iterator[None]:
        """The lock (if any) held around one read or write of the data, its wait counted
        as "Array access", as indexing's is (not as a lock the user took)."""
        lock = self._lock
        if lock is None:
            yield
            return
        lock.take("Array access")
        try:
            yield
        finally:
            lock.release()

    def _char_obj(self) -> Any:
        if self._spec[0] != "c":
            raise AttributeError(f"{self._describe()} has typecode {self._spec[0]!r}: .value and .raw are for 'c'")
        return self._obj

    def as_numpy(self) -> Any:
        """A numpy array over the shared memory (no copy, no lock)."""
        import numpy

        if self._spec[0] in _NO_BUFFER_FORMAT:  # (ctypes' buffer format for these is one numpy cannot read)
            dtype = _NO_BUFFER_FORMAT[self._spec[0]](numpy)
            return numpy.frombuffer(self._seg.mmap, dtype=dtype, count=len(self), offset=_HEADER)
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


