"""The Queue: a ring of bytes in one shared segment, with a backlog per process.

See the long comment under the imports for the layout, and
:class:`SharedQueue` for the API and the end-of-stream rules.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing.util
import os
import queue
import struct
import threading
import time
import weakref
from collections import deque
from typing import Any

from .. import classhome, compat, payload, posixshm, waits
from ..checks import wait_timeout
from ..errors import UsageError, interrupted_at_callers_line
from . import base
from .base import (
    _HEADER,
    _SEM_MAX,
    _SLICE,
    IterUntilClosed,
    QueueClosed,
    SharedObjectGone,
    _alive,
    _Helper,
    _HolderLock,
    _notify,
    _Segment,
    _unlink,
    _wait,
)

log = logging.getLogger("mpmagic")

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
# stream), "d" wakes the waiting reader, "s" wakes the writer waiting for
# bytes of room in the ring, "c" wakes producers that a full bounded queue
# (maxsize) holds back. Two, not one: a take posts one token, and when both
# kinds waited on one semaphore a blocked put() could eat the token meant
# for the writer, which then slept a whole slice per fragment (a bounded
# queue of 4 MB items ran 30x slower than an unbounded one).
#
# put() never blocks on bytes: when the ring is full, the item waits in this
# process's backlog and a feeder thread writes it as room appears (the stdlib
# Queue does the same with its pipe). ``qsize`` counts items accepted by put
# and not yet taken, wherever they are.
#
# Why a table of backlogs after the ring: an item in a backlog lives in one
# process's memory, where no consumer can see it. Counting alone (accepted vs
# taken) tells a consumer that items are missing, not whether they are still
# coming or died with their producer; without more, "closed and the ring is
# empty" ended the stream while items still waited in a worker (issue 14:
# 23 of 60 items), and a producer killed with a backlog would make consumers
# wait for ever. So every process with a backlog holds a slot: (pid, items
# waiting, close() calls waiting, spill size, spill read offset), updated
# under the mutex in the same step that moves an item into the ring. A
# consumer that finds the ring empty but items missing checks the slots'
# pids: a dead one's items are *lost* (counted, and reported at the end of
# the stream by :class:`QueueItemsLost`), its waiting close() calls count.
#
# Why spills: a worker that stops normally (a temporary %%parallel worker, a
# --max-tasks-per-child recycle, a resize) cannot wait for consumers that may
# only start after the run: the pool kills a stopping worker after a few
# seconds. So at exit, a backlog that does not drain at once is written into
# a segment of its own, STEM.x<pid> (.y<pid> if not registered with the
# resource tracker: compat.tracker_connected), and the slot says so; consumers read it
# when the ring is empty (after every item this producer put in the ring, so
# its order holds) and the last one unlinks it.
#
# Why a message bigger than the ring can be voided: its writer streams it
# fragment by fragment while a reader takes them, so with no reader the
# writer waits, its first fragment filling the ring. Waiting at exit for a
# reader that comes only after the stop (a %pool restart before the notebook
# takes the item) lost the message when the pool killed the stopping worker.
# So a stopping writer whose message no reader has begun to read (the head is
# still at or before its first fragment) marks its fragments VOID under the
# mutex, counts the message as its backlog's again and spills it whole;
# readers skip VOID records. Once a reader has begun, the writer finishes
# (that reader is taking the fragments). A message lost because its writer
# died half-way is counted apart (the word after the backlog table), so
# QueueItemsLost names the cause.

_W_MAGIC, _W_CAP, _W_MAXSIZE, _W_PRODUCERS = 0, 1, 2, 3
_W_HEAD, _W_TAIL, _W_ACCEPTED, _W_TAKEN, _W_CLOSES = 4, 5, 6, 7, 8
_W_STREAMER, _W_MUTEX, _W_WLOCK, _W_RLOCK, _W_LOST = 9, 10, 11, 12, 13
_W_SLOTS_USED, _W_SPILLS = 14, 15  # slots in use, spills waiting (so the usual case scans nothing)
_REC = struct.Struct("<IIQ")
_FIRST, _LAST = 1, 2
_WHOLE = _FIRST | _LAST
_VOID = 4  # a fragment of a message its stopping writer spilled whole instead: skipped
_CLOSE = object()  # a close() waiting in the backlog behind this process's items

# The backlog table: _SLOTS slots of _SLOT words each (see above).
_SLOTS = 128  # processes with a backlog at the same time; more wait for room instead
_SLOT = 5
_S_PID, _S_ITEMS, _S_CLOSES, _S_SPILL, _S_READ = range(_SLOT)
_SPILLED = 1 << 63  # set in a spill's pid word: the process's own later puts get a new slot
_UNTRACKED = 1 << 62  # also set: the spill is not registered with the resource tracker (named .y<pid>)
_GEN_SHIFT, _GEN_MASK = 32, 0xFFFF  # also: a spill name's generation (-<n>), when .x<pid> was taken
_PID_MASK = (1 << _GEN_SHIFT) - 1
_T_TORN = _SLOTS * _SLOT  # the word after the table: of the lost items, those whose writer died mid-message
TABLE_BYTES = (_SLOTS * _SLOT + 1) * 8
_SPILL_REC = struct.Struct("<Q")  # a spilled message: its length, then the bytes (padded)
_EXIT_WAIT = 0.1  # seconds a stopping process lets its feeder drain before it spills
_EXIT_TIMEOUT = 30.0  # longest a stopping process waits for a stream or a spill-less drain


def _padded(n: int) -> int:
    return (n + 15) & ~15


class _Ring:
    """The shared part of a queue in one process: header, ring, backlog table, semaphores.

    The feeder thread holds this, not the :class:`SharedQueue`, so the owner
    dropping the queue still releases it while a backlog waits for room.
    """

    def __init__(self, seg: _Segment, sems: dict[str, Any], capacity: int) -> None:
        self.seg, self.cap = seg, capacity
        self.w = seg.words
        self.ring = memoryview(seg.mmap)[_HEADER : _HEADER + capacity]
        self.t = memoryview(seg.mmap)[_HEADER + capacity : _HEADER + capacity + TABLE_BYTES].cast("Q")
        self.mutex = _HolderLock(sems["m"], seg, _W_MUTEX, False, None, "Queue")
        self.wlock = _HolderLock(sems["w"], seg, _W_WLOCK, False, None, "Queue")
        self.rlock = _HolderLock(sems["r"], seg, _W_RLOCK, False, None, "Queue")
        self.data, self.space, self.count_room = sems["d"], sems["s"], sems["c"]
        self.spills: dict[str, Any] = {}  # spill segments mapped here, by name

    # The caller holds the mutex for these.
    def write_record(self, data: memoryview | bytes, flags: int) -> None:
        w, cap, ring = self.w, self.cap, self.ring
        tail = w[_W_TAIL]
        pos = tail % cap
        _REC.pack_into(ring, pos, len(data), flags, base._PID)
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
        w[_W_HEAD] = head + 16 + _padded(length)
        if flags & _VOID:
            return flags, pid, b""
        start = (pos + 16) % cap
        first = min(length, cap - start)
        data = ring[start : start + first].tobytes()
        if first < length:
            data += ring[: length - first].tobytes()
        return flags, pid, data

    def void_records(self, start: int) -> None:
        """Mark every record from ``start`` (a tail position) to the tail VOID."""
        w, cap, ring = self.w, self.cap, self.ring
        while start < w[_W_TAIL]:
            length, _flags, pid = _REC.unpack_from(ring, start % cap)
            _REC.pack_into(ring, start % cap, length, _VOID, pid)
            start += 16 + _padded(length)

    def free(self) -> int:
        return self.cap - (self.w[_W_TAIL] - self.w[_W_HEAD])

    def outstanding(self) -> int:
        """Items accepted and neither taken nor lost (in the ring, a backlog or a spill)."""
        w = self.w
        return w[_W_ACCEPTED] - w[_W_TAKEN] - w[_W_LOST]

    def closed(self) -> bool:
        return self.w[_W_CLOSES] >= self.w[_W_PRODUCERS]

    def closed_here(self, local: _Local) -> bool:
        """:meth:`closed`, counting this process's ``close()`` calls still waiting in its
        backlog (the caller holds the mutex): a ``close()`` made while the ring was full
        ends the stream for this process's later puts at once, as it does with room
        (before, a ``put()`` after it was taken, and read before the end of the stream).
        The feeder counts a close and clears it from the slot in one step, so the sum holds."""
        if not local.backlog:
            return self.closed()
        i = self.slot(local, False)
        return self.w[_W_CLOSES] + (self.t[i + _S_CLOSES] if i >= 0 else 0) >= self.w[_W_PRODUCERS]

    def slot(self, local: _Local, create: bool) -> int:
        """The word index of this process's slot in the table (-1: none, or no room)."""
        t, pid = self.t, base._PID
        i = local.slot
        if i >= 0 and t[i + _S_PID] == pid:
            return i
        free = -1
        for i in range(0, _SLOTS * _SLOT, _SLOT):
            if t[i + _S_PID] == pid:
                local.slot = i
                return i
            if free < 0 and not t[i + _S_PID]:
                free = i
        if create and free >= 0:
            t[free : free + _SLOT] = memoryview(bytes(_SLOT * 8)).cast("Q")
            t[free + _S_PID] = pid
            self.w[_W_SLOTS_USED] += 1
            local.slot = free
        return free if create else -1

    def backlog_moved(self, local: _Local, items: int = 0, closes: int = 0) -> None:
        """``items`` / ``closes`` left this process's backlog (into the ring, or counted)."""
        i = self.slot(local, False)
        if i < 0:
            return
        t = self.t
        t[i + _S_ITEMS] -= items
        t[i + _S_CLOSES] -= closes
        if not t[i + _S_ITEMS] and not t[i + _S_CLOSES] and not t[i + _S_SPILL]:
            t[i + _S_PID] = 0
            self.w[_W_SLOTS_USED] -= 1

    def count_close(self, local: _Local | None = None) -> None:
        with self.mutex:
            self.w[_W_CLOSES] += 1
            if local is not None:
                self.backlog_moved(local, closes=1)
        _notify(self.data)

    # -- what consumers do when the ring is empty -----------------------------
    def reap_dead(self) -> bool:
        """Count the backlogs of producers that died as lost (their close() calls count).

        The pids are read under the mutex and checked outside it (a /proc read
        each), then a slot is cleared only if it still names the same pid.
        """
        t = self.t
        if not self.w[_W_SLOTS_USED]:
            return False
        with self.mutex:
            held = [(i, t[i + _S_PID]) for i in range(0, _SLOTS * _SLOT, _SLOT) if t[i + _S_PID] and not t[i + _S_SPILL]]
        dead = [(i, pid) for i, pid in held if not _alive(pid)]
        changed = False
        with self.mutex:
            for i, pid in dead:
                if t[i + _S_PID] != pid or t[i + _S_SPILL]:
                    continue  # reused, or its backlog waits in a spill: not lost
                self.w[_W_LOST] += t[i + _S_ITEMS]
                self.w[_W_CLOSES] += t[i + _S_CLOSES]
                t[i + _S_PID] = t[i + _S_ITEMS] = t[i + _S_CLOSES] = 0
                self.w[_W_SLOTS_USED] -= 1
                changed = True
        if changed:
            _notify(self.data)
            _notify(self.count_room)  # lost items no longer count against maxsize
        return changed

    def take_spilled(self) -> bytes | None:
        """The next message of a spill (a stopped producer's backlog), or None."""
        t, w = self.t, self.w
        if not w[_W_SPILLS]:
            return None
        with self.mutex:
            for i in range(0, _SLOTS * _SLOT, _SLOT):
                if t[i + _S_PID] and t[i + _S_SPILL]:
                    break
            else:
                return None
            pid, size, offset = t[i + _S_PID], t[i + _S_SPILL], t[i + _S_READ]
            name = _spill_name(self.seg.name, pid)
            mapping = self.spills.get(name)
            if mapping is None:
                mapping = self.spills[name] = posixshm.attach(name, size)
            length = _SPILL_REC.unpack_from(mapping, offset)[0] if offset + 8 <= size else size
            data: bytes | None = None
            if offset + 8 + length <= size:
                data = mapping[offset + 8 : offset + 8 + length]
                t[i + _S_READ] = offset + 8 + _padded(length)
                t[i + _S_ITEMS] -= 1
                w[_W_TAKEN] += 1
            else:  # the slot counts more items than its spill holds (a bug): count them lost, never wait for them
                w[_W_LOST] += t[i + _S_ITEMS]
                t[i + _S_ITEMS] = 0
            last = not t[i + _S_ITEMS]
            if last:  # every spilled item is taken: the spill goes
                t[i + _S_PID] = t[i + _S_SPILL] = t[i + _S_READ] = t[i + _S_CLOSES] = 0
                w[_W_SLOTS_USED] -= 1
                w[_W_SPILLS] -= 1
                _unlink(name, "shared_memory", tracked=not pid & _UNTRACKED)
        _notify(self.count_room)
        if last:
            self.spills.pop(name).close()
        return data

    # -- writing a backlog -----------------------------------------------------
    def write_waiting(self, data: bytes, local: _Local) -> bool:
        """Write one message, waiting for room (in fragments if it is bigger than
        the ring). False if the queue was released or the process is stopping
        before any of it was written."""
        if not self.wlock.acquire(True, None):
            return False
        w = self.w
        try:
            with self.mutex:
                w[_W_STREAMER] = 0  # non-zero only if a writer died streaming: its message is void
            view = memoryview(data)
            sent, whole, start = 0, 16 + _padded(len(view)) <= self.cap, 0
            if not whole:
                with self.mutex:
                    w[_W_STREAMER] = base._PID
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
                        if sent == 0:  # from here on the message is the ring's (or lost with us)
                            start = w[_W_TAIL]
                            self.backlog_moved(local, items=1)
                        self.write_record(view[sent : sent + chunk], flags)
                        sent += chunk
                    elif local.stopped and sent and not local.released and w[_W_HEAD] <= start:
                        # Stopping, and no reader has begun this message: void what is in the
                        # ring and give the message back to the backlog, to be spilled whole.
                        i = self.slot(local, True)
                        if i >= 0:
                            self.void_records(start)
                            self.t[i + _S_ITEMS] += 1
                            return False
                if chunk > 0:
                    _notify(self.data)
                elif local.stopped and (sent == 0 or local.released):
                    return False  # a message a reader has begun is finished, unless the queue is gone
                else:
                    _wait(self.space, _SLICE, "Queue")
            return True
        finally:
            if not whole:
                with self.mutex:
                    w[_W_STREAMER] = 0
            self.wlock.release()


def _spill_name(stem: str, pid: int) -> str:
    """A spill's segment: ``.x<pid>`` if registered with the resource tracker, ``.y<pid>`` if not
    (so whoever unlinks it knows whether to tell the tracker: an unknown name makes it print a KeyError);
    ``-<n>`` after it if an earlier process with the same pid left a spill not yet read."""
    gen = (pid >> _GEN_SHIFT) & _GEN_MASK
    return f"{stem}.{'y' if pid & _UNTRACKED else 'x'}{pid & _PID_MASK}{f'-{gen}' if gen else ''}"


class _Local:
    """This process's side of a queue: the backlog of items not yet in the ring."""

    def __init__(self, ring: _Ring | None = None, owner_pid: int = 0) -> None:
        # Reentrant: the queue's finalizer stops the feeder under it (``_release_queue``),
        # and the cyclic gc may run it in the feeder thread while that holds it.
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.backlog: deque = deque()
        self.feeder: threading.Thread | None = None
        self.stopped = False  # the feeder must stop: the queue was released, or we spill
        self.released = False  # the owner released the queue: the backlog has nowhere to go
        self.slot = -1  # word index of this process's slot in the table (a hint)
        self.ring = ring
        self.owner_pid = owner_pid
        self.pid = base._PID  # the process whose backlog this is (a fork child makes its own)

    def push(self, ring: _Ring, item: Any) -> None:
        """Queue ``item`` behind the backlog (the caller holds ``lock``); start the feeder."""
        self.backlog.append(item)
        if self.feeder is None:
            self.stopped = False
            self.feeder = threading.Thread(target=_feed, args=(ring, self), daemon=True, name="mpmagic-queue-feeder")
            _feeding.add(self)
            self.feeder.start()

    def wait_empty(self, timeout: float | None) -> bool:
        with self.lock:
            return self.cond.wait_for(lambda: not self.backlog or self.released, timeout)

    def stop(self) -> None:
        """The owner released the queue: the backlog has nowhere to go."""
        with self.lock:
            self.stopped = self.released = True
            self.cond.notify_all()


# This process's backlog of each queue, by stem. One per process, not one per
# SharedQueue object: a worker drops the queue it got with a task, and the next
# task attaches it anew while the first backlog may still wait for room. Two
# backlogs of one process shared its slot in the table, so at exit the first
# spill counted the second's items (struct.error in the reader) and the second
# spill's name was taken (FileExistsError, its items lost).
_locals: weakref.WeakValueDictionary[str, _Local] = weakref.WeakValueDictionary()


def _feed(ring: _Ring, local: _Local) -> None:
    """The feeder thread: write the backlog in order, waiting for room."""
    while True:
        with local.lock:
            if not local.backlog or local.stopped:
                local.feeder = None
                _feeding.discard(local)
                local.cond.notify_all()
                return
            item = local.backlog[0]
        if item is _CLOSE:
            ring.count_close(local)
        elif not ring.write_waiting(item, local):
            continue  # stopped: the loop ends above
        with local.lock:
            local.backlog.popleft()
            local.cond.notify_all()


class QueueItemsLost(SharedObjectGone):
    """The end of a queue's stream, with items missing: a producer died holding them.

    Raised by ``get()`` (and so by ``for item in q:``) in every consumer once
    the queue is closed and everything that could arrive has arrived, instead
    of :class:`QueueClosed`, so a short stream is never silent.
    """


def _release_queue(local: _Local, stem: str, owner_pid: int) -> None:
    """Finalizer part of a queue: stop this process's feeder; the owner removes spills."""
    local.stop()
    if os.getpid() == owner_pid:
        for letter in "xy":
            for name in posixshm.names(stem.lstrip("/") + "." + letter):
                _unlink(name, "shared_memory", tracked=letter == "x")


# --------------------------------------------------------------------------
# A process that stops with a backlog: drain it, or spill it

_feeding: set[_Local] = set()  # backlogs whose feeder runs in this process
_exit_lock = threading.Lock()


def flush_at_exit() -> None:
    """Before this process exits normally: no backlog item may be lost.

    Runs at a worker's normal exit (a "stop" message, the notebook closing the
    pipe: :func:`mpmagic.posixshm.run_exit_hooks`) and at any multiprocessing
    process's exit (``multiprocessing.util.Finalize``). The queue's owner is
    skipped: at its exit the queue itself goes. Each backlog gets
    ``_EXIT_WAIT`` seconds to drain into the ring; what is left is spilled
    (see the comment at the top), or, if ``/dev/shm`` has no room for that,
    drained for up to ``_EXIT_TIMEOUT`` seconds.
    """
    # Two threads may get here at once (the worker's main thread returning from a
    # "stop" or reading the pipe's end, its watchdog thread seeing the notebook
    # gone): the second waits for the first, or it could os._exit the process
    # in the middle of the first's spill.
    with _exit_lock:
        for local in list(_feeding):
            _hand_over(local)


def _hand_over(local: _Local) -> None:
    """Drain one backlog into the ring, or spill what does not drain at once."""
    if local.owner_pid == base._PID or local.ring is None or not _alive(local.owner_pid):
        return
    if not posixshm.exists(local.ring.seg.name):
        return  # the notebook dropped the queue: nobody could read a spill, nor would remove it
    try:
        if not local.wait_empty(_EXIT_WAIT):
            _spill(local.ring, local)
    except Exception:
        log.warning("mpmagic.Queue: could not hand over this process's backlog at exit", exc_info=True)


def _spill(ring: _Ring, local: _Local) -> None:
    """Stop the feeder and write what is left of the backlog into a spill segment."""
    with local.lock:
        local.stopped = True
        local.cond.notify_all()
        feeder = local.feeder
    _notify(ring.space)  # a feeder waiting for room with a message nobody reads yet: void it now
    if feeder is not None:
        feeder.join(_EXIT_TIMEOUT)  # within _SLICE unless it is mid-stream
        if feeder.is_alive():  # still writing: spilling now could deliver an item twice
            log.warning("mpmagic.Queue: the feeder is still writing at exit; its backlog stays here")
            return
    with local.lock:
        items = [x for x in local.backlog if x is not _CLOSE]
        closes = len(local.backlog) - len(items)
        if not local.backlog:
            return
    size = sum(8 + _padded(len(x)) for x in items) or 8
    # Registered only with a tracker the notebook shares (see compat.tracker_connected).
    mark = _SPILLED | (0 if compat.tracker_connected() else _UNTRACKED)
    try:
        mark, name, mapping = _create_spill(ring.seg.name, mark, size)
    except posixshm.NoRoom:
        log.warning("mpmagic.Queue: no room in /dev/shm to hand over %d items at exit; waiting for consumers", len(items))
        with local.lock:
            local.stopped = False
            local.feeder = threading.Thread(target=_feed, args=(ring, local), daemon=True, name="mpmagic-queue-feeder")
            local.feeder.start()
        local.wait_empty(_EXIT_TIMEOUT)
        return
    offset = 0
    for x in items:
        _SPILL_REC.pack_into(mapping, offset, len(x))
        mapping[offset + 8 : offset + 8 + len(x)] = x
        offset += 8 + _padded(len(x))
    mapping.close()
    if not mark & _UNTRACKED:
        compat.tracker_register(name, "shared_memory")  # unlinked if the notebook is killed first
    with ring.mutex:
        i = ring.slot(local, True)
        t = ring.t
        ring.w[_W_CLOSES] += closes  # the stream may end once the spilled items are taken
        t[i + _S_CLOSES] = 0
        if items:
            t[i + _S_SPILL], t[i + _S_READ] = size, 0
            t[i + _S_PID] = base._PID | mark  # the spill's slot now, no longer this process's
            ring.w[_W_SPILLS] += 1
        else:
            t[i + _S_PID] = t[i + _S_ITEMS] = 0
            ring.w[_W_SLOTS_USED] -= 1
    if not items or not posixshm.exists(ring.seg.name):  # (dropped meanwhile: the owner's cleanup missed it)
        _unlink(name, "shared_memory", tracked=not mark & _UNTRACKED)
    with local.lock:
        local.backlog.clear()
        local.cond.notify_all()
    _notify(ring.data)


def _create_spill(stem: str, mark: int, size: int) -> tuple[int, str, Any]:
    """A new spill segment: (the slot's pid word bits, its name, its mapping).

    ``.x<pid>`` may still exist: a process that had this pid spilled and its
    items are not all taken yet (pids are reused). Then the next generation.
    """
    for gen in range(_GEN_MASK + 1):
        word = mark | gen << _GEN_SHIFT
        name = _spill_name(stem, base._PID | word)
        try:
            return word, name, posixshm.create(name, size)
        except FileExistsError:
            continue
    raise FileExistsError(f"every spill name of {stem} for pid {base._PID} is taken")


def _register_at_exit(_obj: object = None) -> None:
    # multiprocessing runs these finalizers when a child's target returns; a
    # forked child starts with the registry cleared, hence the after-fork hook.
    multiprocessing.util.Finalize(None, flush_at_exit, exitpriority=20)


posixshm.on_exit(flush_at_exit)
_register_at_exit()
multiprocessing.util.register_after_fork(flush_at_exit, _register_at_exit)



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
    _letters = "mwrdsc"
    _spec: tuple  # (maxsize, capacity, producers)

    def _sem_init(self, letter: str) -> tuple[int, int]:
        return (1, 1) if letter in "mwr" else (0, _SEM_MAX)

    def _made_with(self) -> str:
        maxsize, _capacity, producers = self._spec
        given = [f"maxsize={maxsize}"] * bool(maxsize) + [f"producers={producers}"] * (producers > 1)
        return f"({', '.join(given)})" if given else ""

    def _init_memory(self) -> None:
        maxsize, capacity, producers = self._spec
        w = self._seg.words
        w[_W_CAP], w[_W_MAXSIZE], w[_W_PRODUCERS] = capacity, maxsize, producers

    def _setup(self) -> None:
        self._maxsize = self._spec[0]
        local = _locals.get(self._stem)
        if local is not None and local.pid == base._PID and local.ring is not None and not local.released:
            self._r, self._local = local.ring, local  # attached again while an earlier backlog waits
            return
        self._r = _Ring(self._seg, self._sems, self._spec[1])
        self._local = _locals[self._stem] = _Local(self._r, self._owner_pid)

    def _on_release(self) -> Any:
        return functools.partial(_release_queue, self._local, self._stem, self._owner_pid)

    def _after_fork(self) -> None:
        # The parent's backlog and feeder are the parent's.
        self._local = _locals[self._stem] = _Local(self._r, self._owner_pid)

    # -- put ----------------------------------------------------------------
    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` in the queue. Only a bounded queue (``maxsize > 0``) that is
        full makes it wait: ``queue.Full`` after ``timeout`` seconds, or at once
        with ``block=False``. Raises UsageError (a ValueError) once the queue is closed,
        and SerializationError naming the part of ``obj`` that cannot be pickled."""
        data = payload.dumps_queue_item(obj, self._describe())
        need = 16 + _padded(len(data))
        r, w, maxsize = self._r, self._seg.words, self._maxsize
        timeout = wait_timeout(timeout)  # (10**400: no limit, not OverflowError below)
        deadline = None if timeout is None else time.monotonic() + timeout
        before = waits.mark() if deadline is not None else None
        while True:
            local = self._local
            with local.lock:
                accepted = written = room = False
                with r.mutex:
                    if r.closed_here(local):
                        raise UsageError(  # (a ValueError, as multiprocessing's; shown as one line, as get's QueueClosed)
                            f"{self._describe()} is closed: nothing more can be put in it. A close() ends the "
                            "stream for every process: with several producers, make it with "
                            "mpmagic.Queue(producers=N), one close() each, or end with a sentinel and no close()")
                    if not maxsize or r.outstanding() < maxsize:
                        if not local.backlog and not w[_W_STREAMER] and need <= r.free():
                            r.write_record(data, _WHOLE)
                            accepted = written = True
                        else:
                            # Into the backlog: this process's slot counts it until it is written.
                            i = r.slot(local, True)
                            if i >= 0:
                                r.t[i + _S_ITEMS] += 1
                                accepted = True
                        if accepted:
                            w[_W_ACCEPTED] += 1
                        room = bool(maxsize) and r.outstanding() < maxsize
                if accepted:
                    if written:
                        _notify(r.data)
                    else:
                        local.push(r, data)
                    if room:
                        _notify(r.count_room)  # another blocked producer may go on too
                    return
            if not block:
                raise queue.Full
            left = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            if left <= 0:
                waits.timed_out(before)  # (serial code waits as long: work, see mpmagic.waits)
                raise queue.Full
            try:
                _wait(r.count_room, left, "Queue")
            except KeyboardInterrupt as exc:
                interrupted_at_callers_line(exc)
                raise

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``, as ``multiprocessing.Queue.put_nowait``:
        ``queue.Full`` at once if a bounded queue is full."""
        self.put(obj, False)

    def close(self) -> None:
        """End of stream from this producer, after the items it has put."""
        local, r = self._local, self._r
        with local.lock:
            if local.backlog:
                with r.mutex:
                    r.t[r.slot(local, True) + _S_CLOSES] += 1  # a backlog always has a slot
                local.push(r, _CLOSE)
                return
        r.count_close()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until this process's backlog (items put while the ring was full)
        is in the shared ring; True if it is, False after ``timeout`` seconds."""
        return self._local.wait_empty(wait_timeout(timeout))

    def join_thread(self) -> None:
        """Wait until this process's backlog is in the shared ring (:meth:`flush` with
        no limit), as ``multiprocessing.Queue.join_thread`` waits for its feeder
        thread; returns None, as that one (and the Dask queue's) does."""
        self.flush()

    def cancel_join_thread(self) -> None:
        """``multiprocessing.Queue``'s way to keep a process's exit from waiting on
        its unsent items. Nothing to cancel here: a process that ends with items
        still in its backlog never waits for consumers, it leaves them in a
        segment of their own that consumers read (see the module's comment), so
        classic code that calls this runs unchanged and loses nothing."""

    # -- get ----------------------------------------------------------------
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the next item. Waits (up to ``timeout`` seconds) while
        the queue is empty, then raises ``queue.Empty``; raises :class:`QueueClosed`
        once the queue is closed and drained. An instance of a notebook class a task
        put keeps the notebook's class as it is (``classhome.loads_item``), as a map's results do."""
        try:
            if timeout is None or not block:
                return classhome.loads_item(self._take(block, timeout))
            before = waits.mark()
            try:
                data = self._take(block, timeout)
            except QueueClosed:  # (ended by close(): a wait for the producers, not by the timeout)
                raise
            except queue.Empty:
                waits.timed_out(before)  # (serial code waits as long: work, see mpmagic.waits)
                raise
            return classhome.loads_item(data)
        except KeyboardInterrupt as exc:
            interrupted_at_callers_line(exc)
            raise

    def get_nowait(self) -> Any:
        """``get(block=False)``, as ``multiprocessing.Queue.get_nowait``:
        ``queue.Empty`` at once if no item is there."""
        return self.get(False)

    def _take(self, block: bool, timeout: float | None) -> bytes:
        timeout = wait_timeout(timeout)  # (10**400: no limit, as 1e400 is, not OverflowError at the deadline)
        r, w = self._r, self._seg.words
        # Fast path: a whole record at the head, taken under the mutex alone.
        with r.mutex:
            if w[_W_TAIL] != w[_W_HEAD]:
                if _REC.unpack_from(r.ring, w[_W_HEAD] % r.cap)[1] == _WHOLE:
                    data = r.read_record()[2]
                    w[_W_TAKEN] += 1
                    _notify(r.space)
                    _notify(r.count_room)
                    return data
            elif not block and not r.closed() and not w[_W_SLOTS_USED]:
                raise queue.Empty  # nothing in the ring, no backlog anywhere: nothing to wait for
        since = time.monotonic()  # (the wait began: see _say_waiting)
        deadline = None if timeout is None else since + timeout
        me = threading.get_ident()
        try:  # (the take inside: Ctrl-C right after it still releases, see _HolderLock.held_here)
            if not self._read_lock(block, timeout, since):
                raise queue.Empty
            return self._take_waiting(block, deadline, since)
        finally:
            if r.rlock.held_here(me):
                r.rlock.release()

    def _read_lock(self, block: bool, timeout: float | None, since: float) -> bool:
        """Take the read lock, which another consumer holds while it waits for the
        next item: a wait with no timeout says so after a while (:meth:`_say_waiting`)."""
        rlock = self._r.rlock
        if block and timeout is None:
            while waits.watching():
                if rlock.acquire(True, max(_SLICE, waits.NOTE_AFTER - (time.monotonic() - since))):
                    return True
                self._say_waiting(since)
        return rlock.acquire(block, timeout)

    def _say_waiting(self, since: float) -> None:
        """A task's ``get()`` with no timeout has waited :data:`mpmagic.waits.NOTE_AFTER`
        seconds on a queue that stayed empty and open: say so, once per unit (a
        queue read more times than it was written waits for ever, and the cell
        showed nothing but its progress bar). Not while items are on their way
        (in a producer's backlog), nor in the notebook."""
        r = self._r
        if not waits.due(since) or r.closed() or r.outstanding() > 0:
            return
        waits.note_long_wait(
            "mpmagic.Queue.get()",
            "the queue is empty and not closed, and nothing was put meanwhile; if no producer will put more, "
            "it waits for ever: interrupt to stop it, or have the producer close() the queue when it is done "
            "(a get() then raises QueueClosed, and `for item in q` ends)",
            since,
        )

    def _take_waiting(self, block: bool, deadline: float | None, since: float) -> bytes:
        """Holding the read lock: the next message, waiting and joining fragments.
        ``since``: when the wait began (or the last fragment came), for :meth:`_say_waiting`."""
        r, w = self._r, self._seg.words
        parts: list[bytes] = []
        writer = 0
        while True:
            got = done = None
            with r.mutex:
                if w[_W_TAIL] != w[_W_HEAD]:
                    flags, pid, got = r.read_record()
                    counted = lost = 0  # messages this record finishes (read), or voids
                    if flags & _VOID:
                        pass  # its stopping writer spilled the message whole
                    elif flags & _FIRST:
                        lost += bool(parts)  # a partial one whose writer died
                        parts, writer = [got], pid
                    elif parts:
                        parts.append(got)
                    elif flags & _LAST:
                        counted += 1  # the rest of a message whose reader died
                    if parts and flags & _LAST:
                        counted += 1
                        done, parts = parts, []
                    w[_W_TAKEN] += counted
                    w[_W_LOST] += lost
                    r.t[_T_TORN] += lost
                closed = r.closed()
            if got is not None:
                since = time.monotonic()
                _notify(r.space)
                if counted or lost:
                    _notify(r.count_room)
                if done is not None:
                    return done[0] if len(done) == 1 else b"".join(done)
                continue
            if parts:  # mid-message: wait for the rest while its writer lives
                if not _alive(writer):
                    with r.mutex:
                        w[_W_LOST] += 1  # its writer died half-way: the message is lost
                        r.t[_T_TORN] += 1
                    parts = []
                    _notify(r.count_room)
                else:
                    _wait(r.data, _SLICE, "Queue")
                continue
            spilled = r.take_spilled()
            if spilled is not None:
                return spilled
            if closed and r.outstanding() <= 0:
                raise self._end()
            # Items may still wait in a producer's backlog: unless it died (then
            # they are lost, and counted so), they are coming.
            if r.reap_dead():
                continue
            left = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            if not block or left <= 0:
                raise queue.Empty
            if deadline is None:
                self._say_waiting(since)
            _wait(r.data, left, "Queue")

    def _end(self) -> QueueClosed | QueueItemsLost:
        """The end of the stream: QueueClosed, or QueueItemsLost if producers died with items."""
        lost, torn = self._seg.words[_W_LOST], self._r.t[_T_TORN]
        if not lost:
            return QueueClosed(self._closed_message())
        waited = lost - torn
        torn_why = (f"while writing {'it' if torn == 1 else 'them'} into the queue (an item bigger than the ring "
                    "passes in parts, and only some arrived)")
        waited_why = f"while {'it' if waited == 1 else 'they'} still waited in its backlog, before reaching the queue"
        if torn and waited:
            why = f": {torn} {torn_why}, {waited} {waited_why}"
        else:
            why = " " + (torn_why if torn else waited_why)
        return QueueItemsLost(
            f"{self._describe()}: {lost} item{'s' if lost != 1 else ''} never arrived: a process that put "
            f"{'it' if lost == 1 else 'them'} died (crashed, killed, or timed out){why}. "
            "Every other item was delivered."
        )

    def _closed_message(self) -> str:
        return f"{self._describe()} is closed and every item has been taken"

    # -- state ----------------------------------------------------------------
    def qsize(self) -> int:
        """Items put and not yet taken (approximate while others put and get)."""
        return max(0, self._r.outstanding())

    def empty(self) -> bool:
        """``qsize() == 0``: approximate while others put and get, as
        ``multiprocessing.Queue.empty``."""
        return self.qsize() == 0

    def full(self) -> bool:
        """A bounded queue holds ``maxsize`` items (never for an unbounded one);
        approximate, as ``multiprocessing.Queue.full``."""
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


