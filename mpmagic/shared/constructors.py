"""The constructors users call: ``mpmagic.Queue(...)``, ``Value``, ``Array``, ``Lock``, ``RLock``, ``Event``.

Each asks the current backend for its own version first (see
:func:`~mpmagic.shared.base._backend_helper`), then makes the local
shared-memory helper.
"""

from __future__ import annotations

from typing import Any

from ..checks import queue_maxsize, queue_size
from ..errors import ArgumentTypeError, UsageError
from .base import _HEADER, _backend_helper, _check_platform, _given
from .locks import SharedEvent, SharedLock, SharedRLock
from .queues import TABLE_BYTES, SharedQueue, _padded
from .values import SharedArray, SharedValue

# --------------------------------------------------------------------------
# The constructors


def Queue(maxsize: int = 0, *, producers: int = 1, capacity: int = 1 << 20) -> SharedQueue:
    """A queue any process can use, like ``multiprocessing.Queue(maxsize)``.

    ``maxsize`` > 0 bounds the items in it (``put`` then waits, or raises
    ``queue.Full``); 0 or less is no bound, as in the standard library. ``producers``: how many ``close()`` calls end the stream.
    ``capacity``: bytes of the shared ring; bigger messages still pass, in
    fragments, and when the ring is full ``put`` keeps items in a backlog of
    the putting process instead of blocking.
    """
    got = _backend_helper("Queue", (maxsize,), _given(producers=(producers, 1), capacity=(capacity, 1 << 20)))
    if got is not NotImplemented:
        return got
    _check_platform("Queue")
    maxsize, producers = queue_maxsize(maxsize), queue_size("producers", producers, 1)
    # (a capacity past 2**60 bytes, an exabyte, no /dev/shm holds: sys.maxsize overflowed the segment's size)
    capacity = queue_size("capacity", capacity, 4096, 1 << 60, "2**60 (bytes)")
    capacity = _padded(capacity)
    return SharedQueue._create((maxsize, capacity, producers), _HEADER + capacity + TABLE_BYTES)


def Value(typecode: Any, value: Any = 0, lock: Any = True) -> SharedValue:
    """One shared number, like ``multiprocessing.Value(typecode, value)``.

    ``typecode`` as in the array module ('i', 'd', 'b', 'c'...) or a ctypes
    type. ``lock=True`` gives it its own RLock (``get_lock()``), ``False`` none,
    or pass an ``mpmagic.Lock()``/``RLock()`` (or another Value's or Array's
    ``get_lock()``, as ``multiprocessing`` takes) to share one.
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
    if isinstance(init, int):  # (True too: one item, as in the stdlib)
        if init < 0:
            raise UsageError(f"mpmagic.Array: size must be at least 0, not {init}")
        return SharedArray._make(typecode, int(init), lock)
    # The wrong kind of initializer is a TypeError, as the stdlib's (a float, an
    # iterator, a numpy scalar; a 2-D or text numpy array): it was a ValueError.
    try:
        length = len(init)
    except TypeError:
        raise ArgumentTypeError(
            f"mpmagic.Array: size_or_initializer must be a whole number or a sequence, not {type(init).__name__}"
        ) from None
    numpy_init = type(init).__module__ == "numpy"
    if numpy_init and init.ndim != 1:
        raise ArgumentTypeError(
            f"mpmagic.Array: a numpy initializer must be one-dimensional, not of shape {init.shape} "
            "(pass arr.ravel(), and reshape the view: np.asarray(shared).reshape(shape))"
        )
    arr = SharedArray._make(typecode, length, lock)
    if numpy_init and arr._spec[0] not in "cu":
        view = arr.as_numpy()
        if init.dtype.kind in "fcb" and view.dtype.kind in "iu":
            # floats, complex or bools into an integer array: TypeError, as the
            # stdlib's (1.7 became 1 and True became 1 without a word)
            raise TypeError(f"mpmagic.Array: cannot store {init.dtype} values in an integer array {arr._spec[0]!r}")
        if init.dtype.kind in "USV":
            raise TypeError(f"mpmagic.Array: cannot store {init.dtype} values in a number array {arr._spec[0]!r}")
        view[:] = init
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
