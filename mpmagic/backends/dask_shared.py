"""``mpmagic.Queue``, ``Lock`` and ``Event`` on a Dask cluster.

On the local backend the helpers live in this machine's shared memory. Dask
workers may run on other machines, so here each helper is a thin wrapper over
Dask's own coordination primitives (``distributed.Queue``, ``Lock``,
``Event``), which live in the scheduler and work from the notebook and from
any task. The wrappers keep the standard-library method names (``put``,
``get``, ``qsize``, ``empty``; ``acquire``, ``release``, ``with``; ``set``,
``wait``), pickle our payloads to bytes (``payload.dumps_data``, so
notebook-defined classes travel too) and travel into tasks by name.

Every operation is a round trip to the scheduler: about a millisecond on one
machine, more across a network, against microseconds for the local helpers
(docs/dask.md has the measured figures). A task's time in the calls that
wait (``get``, ``put``, ``acquire``, ``wait``: round trips included, no work is
done meanwhile) counts as its wait in the helper (:mod:`mpmagic.waits`; not a
call that ends by its own timeout, which serial code waits as long),
which the report leaves out of its estimate, as for the local helpers; a
``get()`` or ``wait()`` with no timeout that has waited
:data:`mpmagic.waits.NOTE_AFTER` seconds says so, once per task. ``Value`` and ``Array`` need memory
shared with the notebook, which a cluster does not have: they raise a
:class:`~mpmagic.errors.UsageError` that says what to use instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue as std_queue
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from .. import payload, waits
from ..checks import queue_maxsize, queue_size, wait_timeout
from ..errors import MPMagicError, UsageError, interrupted_at_callers_line
from ..interrupts import restore as restore_interrupts
from ..shared import IterUntilClosed, QueueClosed
from ..shared.base import current_backend

# What ``distributed`` raises for a primitive whose client was closed or that was
# unpickled with none ("IOLoop is closed", "... object not properly initialized ...
# outside of the context of a Client or Worker", "No clients found", and an
# Event's "'NoneType' object has no attribute 'event_set'").
_GONE_SIGNS = ("not properly initialized", "No clients found", "IOLoop is closed", "'NoneType' object has no attribute")


class _Call:
    """One timed helper call; ``ran_out`` once it ended by its own timeout (see :func:`_timed`)."""

    ran_out = False


@contextlib.contextmanager
def _timed(kind: str) -> Iterator[_Call]:
    """The call's time counts as this thread's wait in a helper of ``kind`` (mpmagic.waits):
    on Dask each of these calls waits for the scheduler, at least one round trip. Unless
    the call ended by its own timeout (``queue.Empty``, ``queue.Full``, False: the caller
    sets ``ran_out``): serial code waits as long, so that time is the task's work.
    A Ctrl-C in such a call is the user's, never a repeat of an earlier run's
    (``interrupts.restore``)."""
    restore_interrupts()
    t0 = time.monotonic()
    call = _Call()
    try:
        yield call
    finally:
        if not call.ran_out:
            waits.add(kind, time.monotonic() - t0)


@functools.cache
def _waited_in() -> tuple[str, ...]:
    """Where a helper's call waits for the scheduler: ``distributed``'s client (its
    ``sync``) and the ``threading.Event`` that waits on. A Ctrl-C lands there, and
    their frames (seven of a ``lock.acquire()``) go with ours: the user sees their
    line, as the local helpers show it (``errors.interrupted_at_callers_line``)."""
    import distributed

    return (os.path.dirname(os.path.abspath(distributed.__file__)) + os.sep, threading.__file__)


def _interrupted(exc: BaseException) -> None:
    """A Ctrl-C in a helper's wait leaves with the caller's line alone (see :func:`_waited_in`)."""
    interrupted_at_callers_line(exc, _waited_in())


def _on_the_clients_loop(loop: Any, func: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
    """``func(**kwargs)`` run on a Dask client's ``loop`` (its IOLoop), as Dask's ``sync`` runs
    it, and its result; the notebook's main thread waits in slices (``engine.wait_in_slices``).

    Dask's ``sync`` waits in ``threading.Event.wait(10)``. The kernel's interrupt is sent to the
    process, and Linux may hand it to another thread (Dask's client runs several): Python's
    handler ran there, and the notebook's ``lock.acquire()`` or ``ev.wait()`` raised its
    KeyboardInterrupt only when that slice ended, up to 10 s late. An interrupt cancels the
    call on the loop, as Dask's ``sync`` does."""
    from ..engine import wait_in_slices  # (here: a task that unpickles a helper needs no engine)

    if loop.asyncio_loop.is_closed():
        raise RuntimeError("IOLoop is closed")  # (Dask's words for it: _pool_gone says it in ours)

    async def call() -> Any:
        return await func(**kwargs)

    future = asyncio.run_coroutine_threadsafe(call(), loop.asyncio_loop)
    ended = threading.Event()
    future.add_done_callback(lambda _: ended.set())
    try:
        wait_in_slices(ended.wait)
    except KeyboardInterrupt:
        future.cancel()  # (on the loop: the scheduler's call is dropped, as Dask's sync drops it)
        raise
    return future.result()


#: What closed each client a Dask pool closed, in the user's words (``%pool local``,
#: ``stop_pool()``; see :func:`closed_by`), for the helpers made on it.
_closed_by: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def closed_by(client: Any, by: str) -> None:
    """``client`` was closed by ``by`` (a Dask pool's stop): a helper made on it says so.
    It listed every way a pool stops ("use_local(), stop_pool(); %pool local, %pool
    stop") and left the user to guess which of their lines it was."""
    try:
        _closed_by[client] = by
    except TypeError:  # (a client that takes no weak reference: the line lists the ways)
        pass


#: The clients that lost their scheduler (its address), for the helpers made on them.
_lost: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def connection_lost(client: Any, where: str) -> None:
    """``client`` lost its scheduler at ``where`` (the pool closes it to connect again):
    a helper made on it says so, not that a pool was stopped (the user stopped none)."""
    try:
        _lost[client] = where
    except TypeError:  # (a client that takes no weak reference: the line lists the ways)
        pass


#: The client of the running Dask pool and its scheduler's address (see :func:`serving`).
_serving: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def serving(client: Any, where: str | None) -> None:
    """``client`` is the Dask pool's, connected to the scheduler ``where`` (None: the pool
    stopped it): a helper whose call fails as the client lost that scheduler says where."""
    try:
        if where is None:
            _serving.pop(client, None)
        else:
            _serving[client] = where
    except TypeError:  # (a client that takes no weak reference: "its address")
        pass


def _gone_error(helper: Any) -> UsageError:
    kind = type(helper).__name__.removeprefix("Dask")
    client = helper._client
    by = _closed_by.get(client) if client is not None else None
    if by is None and client is not None:
        # Closed by nobody's stop: Dask's client closes itself when it cannot reconnect
        # to its scheduler (it is still the pool's), or the pool closed it to connect again.
        where = _scheduler_of(client)
        if where is not None:
            return _lost_error(helper, where)
    how = f"by {by}" if by else "(use_local(), stop_pool(); %pool local, %pool stop)"
    return UsageError(f"{helper!r} belonged to a Dask pool that was stopped {how}: make a "
                      f"new one with mpmagic.{kind}() on the current pool")


def _lost_error(helper: Any, where: str) -> UsageError:
    """The one line for a helper whose client lost the scheduler it lives in."""
    kind = type(helper).__name__.removeprefix("Dask")
    return UsageError(f"{helper!r} was lost with the connection to the Dask scheduler at {where} (the scheduler "
                      f"stopped or restarted, or the network dropped): make a new one with mpmagic.{kind}() once "
                      "the scheduler is back (the next run reconnects)")


def _scheduler_of(client: Any) -> str | None:
    """The scheduler ``client`` lost (its address): the one it was connected to when the pool
    closed it to connect again, or the pool's while it is still the pool's client; None for
    a client a pool's stop closed."""
    if client in _lost:
        return _lost[client]
    return _serving.get(client)


@contextlib.contextmanager
def _pool_gone(helper: Any) -> Iterator[None]:
    """Every method of a helper runs in this: a helper whose Dask pool was stopped
    (``%pool local``, ``%pool stop``, a reconnect: its client is closed), or one
    unpickled where there is no Dask at all (a local pool's task), raises one
    line in our words, never ``distributed``'s own errors with their tracebacks
    (``RuntimeError: IOLoop is closed``, ``AttributeError: 'NoneType' ...``)."""
    client = helper._client
    if helper._orphan or (client is not None and client.status not in ("running", "connecting", "newly-created")):
        raise _gone_error(helper)
    try:
        yield
    except (RuntimeError, ValueError, AttributeError) as exc:
        if not any(sign in str(exc) for sign in _GONE_SIGNS):
            raise
        raise _gone_error(helper) from None
    except (OSError, TimeoutError, asyncio.TimeoutError) as exc:  # (two classes before 3.11)
        # The notebook's client lost its scheduler (it was reconnecting, and gave up:
        # Dask's CommClosedError, "ConnectionPool closing", after its 10 s).
        if client is None or client.status == "running":
            raise
        logging.getLogger("mpmagic").debug("mpmagic: a Dask helper's call failed as its client lost the scheduler",
                                           exc_info=exc)
        raise _lost_error(helper, _scheduler_of(client) or "its address") from None


def _given_up() -> bool:
    """Did the notebook give up the Dask task this thread runs (an interrupt, a cancel, a
    ``--timeout``)? Dask cannot stop a running task: its worker only marks it cancelled
    (``distributed.worker.thread_state.key`` names the task of an executor thread). A task
    waiting in a helper for what will never come (a ``q.get()`` on a queue nobody fills
    any more, an ``ev.wait()``) held its worker for good on a cluster mpmagic connected to,
    and the next run waited for it for ever. Not in a task (the notebook): False."""
    key = _task_key()
    if key is None:
        return False
    try:
        from distributed.worker import get_worker

        task = get_worker().state.tasks.get(key)
    except Exception:  # (not in a Dask worker)
        return False
    return task is not None and task.state == "cancelled"


def _task_key() -> Any:
    """The key of the Dask task this thread runs (a worker's executor thread), else None."""
    try:
        from distributed.worker import thread_state
    except ImportError:
        return None
    return getattr(thread_state, "key", None)


def _stop_if_given_up(call: str) -> None:
    """A helper's wait in a task the notebook gave up ends here (see :func:`_given_up`)."""
    if _given_up():
        raise MPMagicError(f"mpmagic: {call} stopped waiting: the notebook gave up this Dask task (an interrupt, a "
                           "cancel or its --timeout), and Dask cannot stop a running task: this frees its worker")


class _OnDask:
    """What the three helpers share: the client they were made with (None in a
    Dask worker, where Dask finds the worker's own), and whether they were
    unpickled where no Dask is (``_orphan``: every method says the pool is gone)."""

    _client: Any = None
    _orphan = False


def _client_here() -> tuple[Any, bool]:
    """The Dask client to use where a helper is unpickled, and whether there is none.

    In a Dask worker, Dask's primitives find the worker's client themselves
    (None); in the notebook, the current Dask pool's client; elsewhere (a
    local pool's worker, the notebook after ``%pool local``): none, orphaned.
    """
    try:
        from distributed import get_worker

        get_worker()
        return None, False
    except ValueError:
        pass
    backend = current_backend()
    if backend is not None and backend.name == "dask" and backend.running:
        return backend.client, False
    return None, True


class DaskQueue(_OnDask, IterUntilClosed):
    """A FIFO queue shared by the notebook and every task of the Dask cluster.

    ``put(obj)`` / ``get()`` as ``queue.Queue`` and ``multiprocessing.Queue``:
    ``get(timeout=...)`` raises ``queue.Empty``, ``put`` on a full bounded
    queue raises ``queue.Full``. As with the local ``mpmagic.Queue``,
    ``close()`` ends the stream (after ``producers`` calls): then ``get`` on
    the drained queue raises :class:`~mpmagic.shared.QueueClosed` and
    ``for item in q:`` stops. Items go through the scheduler: keep them small
    (for big data, put a file path instead).
    """

    _SLICE = 0.25  # seconds between checks for close() while waiting
    _POLL = 0.05  # the longest pause between two looks at an empty queue

    def __init__(
        self,
        maxsize: int = 0,
        *,
        producers: int = 1,
        capacity: int | None = None,
        name: str | None = None,
        client: Any = None,
    ) -> None:
        maxsize, producers = queue_maxsize(maxsize), queue_size("producers", producers, 1)
        self._setup(name or f"mpmagic-queue-{uuid.uuid4().hex}", maxsize, producers, client)

    def _setup(self, name: str, maxsize: int, producers: int, client: Any, orphan: bool = False) -> None:
        from distributed import Queue

        self.name, self.maxsize, self.producers = name, maxsize, producers
        self._client, self._orphan = client, orphan
        self._taker: Any = None  # the lock consumers take items under (made on the first get)
        self._giver: Any = None  # the lock producers put items under, in a bounded queue (the first put)
        if orphan:  # (no Dask here: every method says so)
            return
        self._q = Queue(name=name, client=client, maxsize=maxsize)
        self._closes = Queue(name=name + "-closes", client=client)

    def __reduce__(self) -> tuple:
        payload.keep_alive(self)  # (a run records the helpers its payload names: serial_copy.py)
        return _rebuild_queue, (self.name, self.maxsize, self.producers)

    def _mpmagic_key(self) -> tuple:
        """What it is, for a checkpoint key (not its name, new for every queue made)."""
        return ("Queue on Dask", self.maxsize, self.producers)

    def __repr__(self) -> str:
        return f"<mpmagic.Queue on Dask {self.name!r}>"

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Add ``obj`` at the end; with a bound, wait for room (or raise queue.Full).

        A bounded queue waits for room by looking at the queue's size, as ``get``
        does: a ``distributed.Queue.put`` that timed out on a full queue made the
        scheduler log an error with its traceback (~20 lines in the cell) before
        each ``queue.Full``; and one with no time limit waited inside Dask, where a
        task the notebook gave up never saw it (``_stop_if_given_up``) and kept its
        worker for good.
        """
        data = payload.dumps_queue_item(obj, "mpmagic.Queue on Dask")
        limit = _wait_for(block, timeout)
        try:
            self._put(data, limit)
        except KeyboardInterrupt as exc:  # (the user's line, as the local queue's)
            _interrupted(exc)
            raise

    def _put(self, data: bytes, limit: float | None) -> None:
        with _pool_gone(self), _timed("Queue") as call:
            self._refuse_if_closed()
            if not self.maxsize:  # no bound: nothing to wait for
                self._q.put(data)
                return
            deadline = None if limit is None else time.monotonic() + limit
            pause = 0.001
            next_check = time.monotonic() + self._SLICE
            while True:
                lock_wait = self._SLICE if deadline is None else max(0.01, deadline - time.monotonic())
                if self._q.qsize() < self.maxsize and self._give(data, lock_wait):
                    return
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + self._SLICE
                    _stop_if_given_up("mpmagic.Queue.put()")
                left = self._POLL if deadline is None else deadline - now
                if left <= 0:
                    call.ran_out = True
                    raise std_queue.Full
                time.sleep(min(pause, left))
                pause = min(pause * 2, self._POLL)

    def _give(self, data: bytes, lock_wait: float) -> bool:
        """Put ``data`` if there is room; never waits for room (for the producers' lock,
        up to ``lock_wait`` seconds). As :meth:`_take`: under a lock all producers share,
        so the room seen is still there for the ``put``, which finds it at once. Without
        it, producers racing for the one free place each waited in Dask's ``put`` until
        its timeout, which the scheduler logs with its traceback (24 tracebacks for 3
        producers of 4 items on a ``maxsize=1`` queue)."""
        if self._giver is None:
            self._giver = _dask_lock(self.name + "-give", self._client)
        try:
            got = self._giver.acquire(timeout=lock_wait)
        except BaseException:  # (as _take: a lease taken as the interrupt came is given back)
            _give_back_interrupted(self._giver)
            raise
        self._giver.pending = None  # (its result reached us: nothing to withdraw)
        if not got:
            return False
        try:
            if self._q.qsize() >= self.maxsize:
                return False  # (another producer filled it while this one waited for the lock)
            try:
                self._q.put(data, timeout=self._SLICE)
            except (TimeoutError, asyncio.TimeoutError):  # (Dask's; a class of its own before 3.11)
                return False
        finally:
            self._giver.release()
        return True

    def _refuse_if_closed(self) -> None:
        """UsageError (a ValueError), as the local Queue: an item put after the end of the
        stream would wait in a queue nobody reads any more (its consumers' ``for item in q``
        has ended), lost without a word. One more round trip per put."""
        if self.closed:
            raise UsageError(
                f"{self!r} is closed: nothing more can be put in it. A close() ends the "
                "stream for every process: with several producers, make it with "
                "mpmagic.Queue(producers=N), one close() each, or end with a sentinel and no close()")

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the first item; wait for one (or raise queue.Empty,
        or :class:`~mpmagic.shared.QueueClosed` once closed and drained).

        It waits by looking at the queue's size, not in ``distributed.Queue.get``
        with a timeout: the scheduler logs every such timeout as an error with
        its traceback (in the notebook, for the cluster mpmagic starts; in the
        scheduler's log, for a cluster it connected to), one per wait. An item
        is taken only once one is there, under a lock all consumers share, so
        another consumer cannot take it in between and leave this one waiting.
        """
        try:
            with _pool_gone(self), _timed("Queue") as call:
                try:
                    return self._get(block, timeout)
                except QueueClosed:  # (ended by close(): a wait for the producers)
                    raise
                except std_queue.Empty:
                    call.ran_out = True
                    raise
        except KeyboardInterrupt as exc:  # (the user's line, as the local queue's)
            _interrupted(exc)
            raise

    def _get(self, block: bool, timeout: float | None) -> Any:
        limit = _wait_for(block, timeout)
        since = time.monotonic()  # (a task's wait with no timeout says so after a while: _say_waiting)
        deadline = None if limit is None else since + limit
        pause = 0.001  # short at first (an item is often just being put), longer while idle
        next_close_check = time.monotonic() + self._SLICE
        first = True
        while True:
            # (never past the caller's deadline: get(timeout=0.1) waited up to 0.5 s for the lock)
            lock_wait = 1.0 if deadline is None else max(0.01, deadline - time.monotonic())
            found, item = self._take(lock_wait, look_first=not first)
            first = False
            if found:
                return item
            now = time.monotonic()
            if (deadline is not None and now >= deadline) or now >= next_close_check:
                next_close_check = now + self._SLICE
                _stop_if_given_up("mpmagic.Queue.get()")
                if self.closed and self.qsize() == 0:
                    raise QueueClosed(f"{self!r} is closed and every item has been taken")
                if deadline is not None and time.monotonic() >= deadline:
                    raise std_queue.Empty
                if deadline is None and waits.due(since) and not self.closed and self.qsize() == 0:
                    waits.note_long_wait(
                        "mpmagic.Queue.get()",
                        "the queue is empty and not closed, and nothing was put meanwhile; if no producer will "
                        "put more, it waits for ever: interrupt to stop it, or have the producer close() the "
                        "queue when it is done (a get() then raises QueueClosed, and `for item in q` ends)",
                        since,
                    )
            left = self._POLL if deadline is None else max(0.0, deadline - time.monotonic())
            time.sleep(min(pause, left))
            pause = min(pause * 2, self._POLL)

    def _take(self, lock_wait: float, look_first: bool) -> tuple[bool, Any]:
        """``(True, item)`` if there was one, else ``(False, None)``; never waits
        for one (for the consumers' lock, up to ``lock_wait`` seconds).

        Under the consumers' lock, ``qsize`` (it logs nothing) and, if an item
        is there, ``get``, which finds it at once: only the lock's holder takes
        items. ``look_first``: a ``qsize`` before taking the lock, one round
        trip instead of three while the queue stays empty (not on a get's first
        try: an item is usually there then). The ``get`` still has a timeout,
        should the lock ever be held twice (Dask hands a lock on when its
        holder's lease times out): a lost race then costs one logged timeout,
        never a hang.
        """
        if look_first and self._q.qsize() == 0:
            return False, None
        if self._taker is None:
            self._taker = _dask_lock(self.name + "-take", self._client)
        # Each holder keeps it for two round trips; much longer means its
        # holder died, and Dask frees the lock when its lease times out.
        try:
            got = self._taker.acquire(timeout=lock_wait)
        except BaseException:
            # Ctrl-C while the acquire was in flight: it may still have completed on
            # the client's loop, or complete on the scheduler later, and a lease nobody
            # releases (or refreshes) stopped every consumer's get (for ~40 s).
            _give_back_interrupted(self._taker)
            raise
        self._taker.pending = None  # (its result reached us: nothing to withdraw)
        if not got:
            return False, None
        try:
            if self._q.qsize() == 0:
                return False, None  # another consumer took it
            try:
                data = self._q.get(timeout=self._SLICE)
            except (TimeoutError, asyncio.TimeoutError):  # (Dask's; a class of its own before 3.11)
                return False, None
        finally:
            self._taker.release()
        return True, payload.loads(data)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``, as ``multiprocessing.Queue.put_nowait`` and
        the local ``mpmagic.Queue``: ``queue.Full`` at once if a bounded queue is full."""
        self.put(obj, block=False)

    def get_nowait(self) -> Any:
        """``get(block=False)``, as ``multiprocessing.Queue.get_nowait`` and the
        local ``mpmagic.Queue``: ``queue.Empty`` at once if no item is there."""
        return self.get(block=False)

    def qsize(self) -> int:
        """Items waiting now (exact: the scheduler holds them)."""
        with _pool_gone(self):
            return int(self._q.qsize())

    def empty(self) -> bool:
        """``qsize() == 0``, as ``multiprocessing.Queue.empty`` (exact at that moment)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """A bounded queue holds ``maxsize`` items (never for an unbounded one),
        as ``multiprocessing.Queue.full``."""
        return bool(self.maxsize) and self.qsize() >= self.maxsize

    def close(self) -> None:
        """End of stream from this producer, after the items it has put."""
        with _pool_gone(self):
            self._closes.put(1)

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (by every producer, if several)."""
        with _pool_gone(self):
            return int(self._closes.qsize()) >= self.producers

    def join_thread(self) -> None:
        """Nothing to join: ``put`` returns once the item is in the scheduler, so no
        item waits in this process (kept for ``multiprocessing.Queue`` code; None, as
        multiprocessing returns)."""

    def cancel_join_thread(self) -> None:
        """``multiprocessing.Queue``'s way to keep a process's exit from waiting on
        its unsent items: accepted and does nothing, as the local ``mpmagic.Queue``,
        since nothing waits here to be sent (see :meth:`join_thread`), so classic
        code that calls it runs unchanged on Dask."""


def _rebuild_queue(name: str, maxsize: int, producers: int = 1) -> DaskQueue:
    q = DaskQueue.__new__(DaskQueue)
    q._setup(name, maxsize, producers, *_client_here())
    return q


def _wait_for(block: bool, timeout: float | None) -> float | None:
    """How long a Queue's ``get``/``put`` may wait: 0 when not blocking, None for no
    limit (also a timeout too large to wait on, ``10**400``: ``checks.wait_timeout``),
    else the seconds. A negative timeout is 0, as in ``multiprocessing.Queue`` and the
    local ``mpmagic.Queue`` (``queue.Empty`` / ``queue.Full`` at once), not the
    ValueError of ``queue.Queue``: the same code behaves the same on both backends."""
    if not block:
        return 0
    limit = wait_timeout(timeout)
    return None if limit is None else max(0.0, limit)


class DaskLock(_OnDask):
    """A lock held by one task (or the notebook) at a time, across the cluster.

    ``acquire(block=True, timeout=None)``, ``release()``, ``locked()`` and
    ``with lock:`` as ``multiprocessing.Lock``: any handle may release it (the
    notebook a lock a task took, a task one the notebook took, a pickled
    copy), a negative timeout is 0, and releasing a lock nobody holds raises
    ValueError. Built on ``distributed.Lock``, whose lease the holder's process
    refreshes on its event loop (a dead holder's lease times out and the lock is
    free again; so does a holder's blocked longer than Dask's lease-timeout, and
    its release then says so); see :func:`_released_by_name` for how a handle
    that did not take it releases it.
    """

    def __init__(self, *, name: str | None = None, client: Any = None) -> None:
        self.name = name or f"mpmagic-lock-{uuid.uuid4().hex}"
        self._client = client
        self._lock = _released_by_name()(self.name, client)
        self._lock.sync(self._lock.start)  # (the holder's record exists before any handle reads it)

    def __reduce__(self) -> tuple:
        payload.keep_alive(self)  # (a run records the helpers its payload names: serial_copy.py)
        return _rebuild_lock, (self.name,)

    def _mpmagic_key(self) -> tuple:
        """What it is, for a checkpoint key (not its name, new for every lock made)."""
        return ("Lock on Dask",)

    def __repr__(self) -> str:
        return f"<mpmagic.Lock on Dask {self.name!r}>"

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; True if taken (False after ``timeout`` or when not blocking).

        As ``multiprocessing.Lock.acquire``: ``block=False`` tries once (the
        timeout is not used), a timeout of 0 or less tries once too (it was "no
        timeout" here, so ``acquire(timeout=-1)`` on a held lock waited for ever
        where multiprocessing and the local lock return False), None waits with
        no limit. A timeout too large to wait on (``10**400``) is no limit
        (``checks.wait_timeout``)."""
        timeout = wait_timeout(timeout)
        limit = 0.0 if not block else None if timeout is None else max(0.0, timeout)
        try:
            with _pool_gone(self), _timed("Lock") as call:
                got = self._acquire(limit)
                self._lock.pending = None  # (its result reached us: nothing to withdraw)
                call.ran_out = not got
                return got
        except KeyboardInterrupt as exc:  # (the user's line, as the local lock's)
            if self._lock.pending is not None:  # (nothing taken stays taken: _withdrawable)
                _give_back_interrupted(self._lock)
            _interrupted(exc)
            raise

    _SLICE = 1.0  # seconds a task's acquire waits in one go, between looks at its task

    def _acquire(self, limit: float | None) -> bool:
        """Dask's acquire; in a task, in slices that end when the task is given up
        (:func:`_given_up`: else it held its worker for as long as the lock stayed taken,
        for good if its holder was the interrupted notebook). Dask's lock keeps no queue
        of waiters (they retry), so a slice loses no place in line."""
        if _task_key() is None:  # (the notebook: one wait, a Ctrl-C acted on at once)
            return bool(_on_the_clients_loop(self._lock.loop, self._lock._acquire, timeout=limit))
        if limit is not None and limit <= self._SLICE:
            return bool(self._lock.acquire(timeout=limit))
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._lock.acquire(timeout=self._SLICE if left is None else min(left, self._SLICE)):
                return True
            if left is not None and left <= self._SLICE:
                return False
            _stop_if_given_up("mpmagic.Lock.acquire()")

    def release(self, *_exc: Any) -> None:
        """Give the lock back, whoever took it and through whichever handle, as
        ``multiprocessing.Lock`` and the local ``mpmagic.Lock``; ValueError if
        nobody holds it, as they do (Dask raises RuntimeError, and only for the
        object that took it), so ``except ValueError`` code works on both.
        Also its ``__exit__``, so that error shows no frame of ours either."""
        with _pool_gone(self):
            released, lapsed = self._lock.sync(self._lock.release_held)
        if lapsed is not None:
            try:
                raise ValueError(
                    f"{self!r}: this holder's lease expired after {lapsed:.1f} s without a refresh "
                    f"(its worker was blocked: a task holding the GIL, a busy event loop), so another "
                    f"task may have held the lock meanwhile; raise Dask's "
                    f"distributed.scheduler.locks.lease-timeout (now {self._lock.lease_timeout:g} s) "
                    f"above the longest a holder can be blocked")
            except ValueError as exc:
                exc.__traceback__ = None
                raise
        if not released:
            try:
                raise ValueError("semaphore or lock released too many times")
            except ValueError as exc:
                # At the caller's line only, as multiprocessing's (see the local lock's release)
                exc.__traceback__ = None
                raise

    def locked(self) -> bool:
        """Is it held (by any task or the notebook) right now? As the local ``mpmagic.Lock``."""
        with _pool_gone(self):
            return bool(self._lock.locked())

    # ``with lock as got:`` gives True, as ``multiprocessing.Lock`` and the local lock. No
    # frame of its own: a Ctrl-C in its wait shows the user's ``with`` line alone (acquire's).
    __enter__ = acquire
    __exit__ = release


def _release_quietly(lock: Any) -> None:
    """Give back a queue's consumers' or producers' ``lock`` after an interrupt of its acquire."""
    try:
        lock.release()  # (a RuntimeError when this thread holds no lease: nothing to give back)
    except Exception:
        logging.getLogger("mpmagic").debug("mpmagic: no queue lock to release after an interrupt", exc_info=True)


def _give_back_interrupted(lock: Any) -> None:
    """After an interrupt of ``lock``'s acquire: give back what it took or will take (see
    :func:`_withdrawable`); a lock that does not track its acquire is released if it holds."""
    pending, lock.pending = getattr(lock, "pending", None), None
    if pending is None:
        _release_quietly(lock)
    else:
        lock.loop.add_callback(lock.withdraw, *pending)


def _dask_lock(name: str, client: Any) -> Any:
    """A queue's consumers' or producers' lock (:func:`_withdrawable`)."""
    lock = _withdrawable()
    if client is None:
        return lock(name)
    return lock(name, scheduler_rpc=client.scheduler, loop=client.loop)


@functools.cache
def _withdrawable() -> type:
    """A ``distributed.Lock`` whose interrupted acquire takes nothing, as an interrupted
    ``multiprocessing.Lock.acquire``. Dask's scheduler goes on waiting to grant the lease
    a cancelled acquire asked for, and grants it once the lock is free: nobody refreshes
    that lease, so the lock stayed taken for its lease timeout (~40 s: every consumer's
    ``get`` of a queue waited that long after a Ctrl-C in the notebook's). Each acquire
    keeps its lease id (``pending``) until its caller clears it on the result; after an
    interrupt ``withdraw`` asks for that same lease until the acquire's deadline (Dask's
    acquire is idempotent: it returns when the scheduler grants the lease to either) and
    gives it back. Made on first use, so that importing this module does not import ``distributed``."""
    from distributed import Lock
    from distributed.utils_comm import retry_operation

    class Withdrawable(Lock):
        # The last acquire whose result has not reached its caller: its lease id and
        # deadline (time.monotonic, None: no limit).
        pending: tuple[str, float | None] | None = None

        async def _acquire(self, timeout: float | None = None) -> bool:
            # (Dask's Semaphore._acquire, with the lease id kept while it is in flight)
            await self
            lease = uuid.uuid4().hex
            self.pending = (lease, None if timeout is None else time.monotonic() + timeout)
            got = await retry_operation(self.scheduler.semaphore_acquire, name=self.name, timeout=timeout,
                                        lease_id=lease, operation=f"mpmagic lock acquire: name={self.name}")
            if got:
                self._leases.append(lease)
                await self._taken(lease)
            return bool(got)  # (``pending`` stays: the caller clears it once the result reached it)

        async def _taken(self, lease: str) -> None:
            """What a subclass does once ``lease`` is taken (before the acquire returns)."""

        async def withdraw(self, lease: str, deadline: float | None) -> None:
            """Give back what the interrupted acquire of ``lease`` took or will take."""
            if lease in self._leases:  # (taken: the interrupt came as it returned)
                self._leases.remove(lease)
                await self._untaken(lease)
            else:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                got = await retry_operation(self.scheduler.semaphore_acquire, name=self.name, timeout=left,
                                            lease_id=lease, operation=f"mpmagic lock withdraw: name={self.name}")
                if not got:
                    return
            await retry_operation(self.scheduler.semaphore_release, name=self.name, lease_id=lease,
                                  operation=f"mpmagic lock withdraw release: name={self.name}")

        async def _untaken(self, lease: str) -> None:
            """What a subclass undoes of :meth:`_taken` for ``lease`` before it is given back."""

    return Withdrawable


@functools.cache
def _released_by_name() -> type:
    """The ``distributed.Lock`` that :class:`DaskLock` wraps: one any handle releases.

    Dask's lock is a semaphore of one lease in the scheduler; the object that
    acquires it picks the lease's id, keeps it, refreshes it every
    ``lease-timeout / 5`` and alone can release it (any other object raised
    "Released too often", and the lock stayed held for good). Here each
    acquire also writes its lease id to a ``distributed.Variable`` of the lock
    (``<name>-holder``), and ``release_held`` releases the lease found there,
    from any object in any process, after writing "" (held by nobody) there.

    The holder's refresh must not bring back a lease another process released
    (Dask's refresh adds an unknown lease back): it refreshes only a lease the
    record still names, by acquiring it again with a timeout of 0 (which
    refreshes a lease still held, and never waits), then reads the record once
    more; if another process released the lease meanwhile, the record no longer
    names it and the refresh gives back what it may have taken. A lease that is
    no longer this object's is dropped from its list.

    A lease the holder's process did not refresh for ``lease-timeout`` seconds
    (a task holding the GIL or blocking the worker's event loop that long) may
    have been dropped by the scheduler, and another task let in: unlike
    ``multiprocessing.Lock``, mutual exclusion was lost. The object notes when
    it last took or refreshed each of its leases (``seen``); a release finding
    its lease lapsed that long, and the lock no longer its own (free, or
    another's), gives the lapse back instead of releasing anything (not the
    other holder's lease), so the release says so in one line.

    An interrupted acquire takes nothing (:func:`_withdrawable`, which this lock builds on).

    Made on first use, so that importing this module does not import ``distributed``.
    """
    from distributed.utils_comm import retry_operation

    class ReleasedByName(_withdrawable()):  # type: ignore[misc]
        def __init__(self, name: str, client: Any) -> None:
            if client is None:
                super().__init__(name)
            else:
                super().__init__(name, scheduler_rpc=client.scheduler, loop=client.loop)
            self.holder = name + "-holder"
            self.turns: asyncio.Lock | None = None  # this object's refresh and release, one at a time
            self.seen: dict[str, float] = {}  # its leases: when last taken or refreshed (time.monotonic)
            self.lapsed: float | None = None  # the longest a lease it held went unrefreshed past the timeout
            self.lease_timeout = _lease_timeout()

        def _turns(self) -> asyncio.Lock:
            if self.turns is None:  # (made on the loop it serves)
                self.turns = asyncio.Lock()
            return self.turns

        async def start(self) -> None:
            """Register the lock and record that nobody holds it yet."""
            await self
            await self._record("")

        async def _record(self, lease: str) -> None:
            await retry_operation(self.scheduler.variable_set, name=self.holder, data=lease,
                                  operation=f"mpmagic lock record: name={self.name}")

        async def _recorded(self) -> str:
            got = await retry_operation(self.scheduler.variable_get, name=self.holder, timeout=5,
                                        operation=f"mpmagic lock holder: name={self.name}")
            return str(got.get("value") or "")

        async def _taken(self, lease: str) -> None:
            self.seen[lease] = time.monotonic()
            self.lapsed = None
            await self._record(lease)

        async def _untaken(self, lease: str) -> None:
            self.seen.pop(lease, None)
            if await self._recorded() == lease:
                await self._record("")

        def _lapse(self, lease: str) -> float | None:
            """How long ``lease`` of this object went unrefreshed, if past the timeout."""
            since = self.seen.get(lease)
            if since is None or self.lease_timeout is None:
                return None
            gap = time.monotonic() - since
            return gap if gap > self.lease_timeout else None

        def _note_lapse(self, lease: str) -> None:
            gap = self._lapse(lease)
            if gap is not None:
                self.lapsed = max(gap, self.lapsed or 0.0)

        async def release_held(self) -> tuple[bool, float | None]:
            """Release the lock whoever holds it: (False if nobody does, and how
            long this object's own lease went unrefreshed past the timeout if it
            did and the lock is no longer that lease's: then nothing is released)."""
            await self
            async with self._turns():
                held, lease = await asyncio.gather(
                    self.scheduler.semaphore_value(name=self.name), self._recorded())
                for own in list(self.seen):
                    self._note_lapse(own)
                lapsed, self.lapsed = self.lapsed, None
                if lapsed is not None and not (held and lease in self.seen):
                    self.seen.clear()  # (its hold is over: lost, and told once)
                    self._leases.clear()
                    return False, lapsed
                self.seen.pop(lease, None)
                if not held or not lease:
                    return False, None
                if lease in self._leases:  # (ours: no other refresh keeps it, both at once)
                    self._leases.remove(lease)
                    await asyncio.gather(self._record(""), self._give_back(lease))
                else:  # (another object's: the record first, so its refresh sees it, then the lease)
                    await self._record("")
                    await self._give_back(lease)
                return True, None

        async def _give_back(self, lease: str) -> None:
            await retry_operation(self.scheduler.semaphore_release, name=self.name, lease_id=lease,
                                  operation=f"mpmagic lock release: name={self.name}")

        async def _refresh_leases(self) -> None:
            if not (self.refresh_leases and self._leases):
                return
            async with self._turns():
                for lease in list(self._leases):
                    self._note_lapse(lease)  # (before the refresh: it may have expired meanwhile)
                    if await self._recorded() == lease:
                        kept = await retry_operation(
                            self.scheduler.semaphore_acquire, name=self.name, timeout=0, lease_id=lease,
                            operation=f"mpmagic lock refresh: name={self.name}")
                        if kept and await self._recorded() == lease:
                            self.seen[lease] = time.monotonic()
                            continue
                        if kept:  # (released meanwhile: this refresh took it again)
                            await self._give_back(lease)
                    self._leases.remove(lease)
                    self.seen.pop(lease, None)

    return ReleasedByName


def _lease_timeout() -> float | None:
    """Dask's ``distributed.scheduler.locks.lease-timeout`` here, in seconds (None: "inf")."""
    import dask
    from dask.utils import parse_timedelta

    value = dask.config.get("distributed.scheduler.locks.lease-timeout")
    return None if value == "inf" else parse_timedelta(value, default="s")


def _rebuild_lock(name: str) -> DaskLock:
    lock = DaskLock.__new__(DaskLock)
    lock.name = name
    lock._client, lock._orphan = _client_here()
    if not lock._orphan:  # (no Dask here: every method says so)
        lock._lock = _released_by_name()(name, lock._client)
    return lock


class DaskEvent(_OnDask):
    """A flag tasks can wait on: ``set``, ``clear``, ``is_set``, ``wait(timeout)``."""

    _SLICE = 1.0  # seconds a wait takes in one go (one round trip each), between looks at its task

    def __init__(self, *, name: str | None = None, client: Any = None) -> None:
        from distributed import Event

        self.name = name or f"mpmagic-event-{uuid.uuid4().hex}"
        self._client = client
        self._event = Event(self.name, client=client)

    def __reduce__(self) -> tuple:
        payload.keep_alive(self)  # (a run records the helpers its payload names: serial_copy.py)
        return _rebuild_event, (self.name,)

    def _mpmagic_key(self) -> tuple:
        """What it is, for a checkpoint key (not its name, new for every event made)."""
        return ("Event on Dask",)

    def __repr__(self) -> str:
        return f"<mpmagic.Event on Dask {self.name!r}>"

    def set(self) -> None:
        """Set the flag and wake every task waiting in :meth:`wait`, as
        ``multiprocessing.Event.set`` and the local ``mpmagic.Event``."""
        with _pool_gone(self):
            self._event.set()

    def clear(self) -> None:
        """Unset the flag: later :meth:`wait` calls block again until the next
        :meth:`set`, as ``multiprocessing.Event.clear``."""
        with _pool_gone(self):
            self._event.clear()

    def is_set(self) -> bool:
        """Is the flag set now? As ``multiprocessing.Event.is_set``."""
        with _pool_gone(self):
            return bool(self._event.is_set())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set; False if ``timeout`` passed first. A task's wait with no
        timeout says so once it has lasted :data:`mpmagic.waits.NOTE_AFTER` seconds.
        A timeout too large to wait on (``10**400``) is no limit (``checks.wait_timeout``)."""
        timeout = wait_timeout(timeout)
        try:
            return self._wait(timeout)
        except KeyboardInterrupt as exc:  # (the user's line, as the local event's)
            _interrupted(exc)
            raise

    def _wait(self, timeout: float | None) -> bool:
        with _pool_gone(self), _timed("Event") as call:
            if _task_key() is None:  # (the notebook: no task to give up, one wait, a Ctrl-C acted on at once)
                client = self._event.client
                is_set = bool(_on_the_clients_loop(client.loop, client.scheduler.event_wait, name=self.name,
                                                   timeout=timeout))
                call.ran_out = not is_set
                return is_set
            since = time.monotonic()
            deadline = None if timeout is None else since + timeout
            noted = timeout is not None or not waits.watching()
            # A task's: in slices, so that the wait ends when its task is given up
            # (_given_up); with no timeout it says so once it has lasted NOTE_AFTER.
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if bool(self._event.wait(self._SLICE if left is None else min(left, self._SLICE))):
                    return True
                if left is not None and left <= self._SLICE:
                    call.ran_out = True
                    return False
                _stop_if_given_up("mpmagic.Event.wait()")
                if not noted and time.monotonic() - since >= waits.NOTE_AFTER:
                    noted = True
                    waits.note_long_wait(
                        "mpmagic.Event.wait()",
                        "the event is not set; if no process will set() it, it waits for ever: interrupt to stop it, "
                        "or give wait() a timeout",
                        since,
                    )


def _rebuild_event(name: str) -> DaskEvent:
    from distributed import Event

    ev = DaskEvent.__new__(DaskEvent)
    ev.name = name
    ev._client, ev._orphan = _client_here()
    if not ev._orphan:  # (no Dask here: every method says so)
        ev._event = Event(name, client=ev._client)
    return ev


_NO_SHARED_MEMORY = (
    "mpmagic.{kind} needs memory shared with the notebook, which Dask workers (possibly on other "
    "machines) do not have. On Dask, return values from the tasks and combine them in the notebook "
    "(total = sum(%pmap f, items)), or send updates through an mpmagic.Queue and add them up, or "
    "guard a distributed.Variable(name, client=mpmagic.get_pool().client) with an mpmagic.Lock (made in "
    "the notebook, a Variable needs mpmagic's client: it is not Dask's default one); `%pool local` brings "
    "{kind} back."
)


def make_shared(client: Any, kind: str, *args: Any, **kwargs: Any) -> Any:
    """Make the helper ``kind`` (``"Queue"``, ``"Lock"``, ``"Event"``) on this cluster."""
    name = kind.capitalize() if kind.islower() else kind
    if name == "Queue":
        return DaskQueue(*args, client=client, **kwargs)
    if name == "Lock":
        return DaskLock(client=client, **kwargs)
    if name == "Rlock" or kind == "RLock":
        raise UsageError("mpmagic.RLock is not available on Dask (Dask's lock is not re-entrant): use mpmagic.Lock")
    if name == "Event":
        return DaskEvent(client=client, **kwargs)
    if name in ("Value", "Array", "RawValue", "RawArray"):
        raise UsageError(_NO_SHARED_MEMORY.format(kind=name))
    raise UsageError(f"mpmagic.{kind} is not available on the Dask backend (it offers Queue, Lock and Event)")
