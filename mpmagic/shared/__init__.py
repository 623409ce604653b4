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
* The time a task spends blocked in them is measured (the blocking part
  only; not a call that ends by its own timeout, which serial code waits as
  long) and left out of the timing report's estimate; a task's ``get()`` or
  ``wait()`` that may never end says so after a while (:mod:`mpmagic.waits`).

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

The package follows the parts of a helper: :mod:`.base` (names, ownership,
pickling by name, the lock that knows its holder), :mod:`.locks` (Lock,
RLock, Event), :mod:`.values` (Value, Array), :mod:`.queues` (the Queue's
ring and backlog) and :mod:`.constructors` (what users call). The POSIX
names themselves are made and removed by :mod:`mpmagic.posixshm`, the layer
shared with :mod:`mpmagic.shm`.
"""

from __future__ import annotations

from .base import PREFIX, IterUntilClosed, NoSharedMemory, QueueClosed, SharedObjectGone
from .constructors import Array, Event, Lock, Queue, RLock, Value
from .locks import SharedEvent, SharedLock, SharedRLock
from .queues import QueueItemsLost, SharedQueue
from .values import SharedArray, SharedValue

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
    "QueueItemsLost",
    "NoSharedMemory",
    "IterUntilClosed",
    "PREFIX",
]

# The public names say they come from ``mpmagic.shared``, as they did when it was
# one module: reprs, the API reference and pickles by reference stay the same.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith(__name__ + "."):
        _obj.__module__ = __name__
del _name, _obj
