"""Large buffers travel through POSIX shared memory instead of the pipe.

Why: through a pipe a 256 MB numpy array is copied four times (pickle,
kernel write, kernel read, unpickle) and every copy lands in freshly faulted
memory. Pickle protocol 5 lets an object hand its raw buffers to a
``buffer_callback`` instead of copying them into the pickle (numpy arrays,
pandas' numpy blocks, Arrow buffers do this). Buffers of at least
:data:`THRESHOLD` bytes are written once into a shared-memory segment, the
pickle keeps only a small envelope naming the segment, and the receiving
process maps the segment and unpickles the object *on* that memory, without
a copy.

The envelope is an ordinary picklable object whose ``__reduce__`` opens the
segment on load, so whoever calls plain ``pickle.loads`` gets the arrays
back: the worker loop and the job code need no special case.

Who owns a segment, and so who unlinks it:

* **lent** (notebook to workers): the notebook owns it. Map items use pooled
  segments (:class:`SegmentPool`), reused chunk after chunk and call after
  call, because allocating shared pages is by far the dominant cost (about
  2 ms per MB on a small VM, against 0.08 ms per MB to copy into pages that
  are already there). Captured globals get a segment that lives as long as
  the cached function payload, and no longer than the captured array
  (``payload_cache._watch_arrays``), except that a run whose payload names
  it holds it until the run ends (:meth:`SegmentPool.hold`). Workers map lent segments **read-only**
  (unless ``writable``: then a captured array's copy is mapped
  copy-on-write, so a worker's writes stay its own) and keep the mapping
  until the notebook says ``unmap`` (:func:`take_unmapped`), so a reused
  segment costs no page faults on either side.
* **given** (a worker's result to the notebook): the worker creates it, the
  notebook maps it and unlinks the name at once. Nothing is left in
  ``/dev/shm``; the memory lives exactly as long as the arrays that use it.

Every segment this package creates is named ``mpm_<notebook pid>_...``; the
notebook unlinks its own at pool stop and at exit (:func:`cleanup`), and
after a worker dies it removes whatever that worker created but never
handed over (:func:`sweep_worker`).

When ``/dev/shm`` is too small or full (Docker's default is 64 MB), a new
segment cannot be reserved (:func:`mpmagic.posixshm.create` raises
:class:`~mpmagic.posixshm.NoRoom` instead of leaving a page that would
SIGBUS on first write): the buffers then travel inside the pickle, through
the pipe, slower but whole, and the notebook prints one line of advice
(:func:`advise`) once per session. A process with no file descriptor left
(``EMFILE``, ``ulimit -n``) cannot open a new segment either: its buffers
take the same path, with a note of their own (:func:`advise_files`); a
mapping itself holds no descriptor (``compat.map_fd``). Small read-only buffers in a worker's
results travel the same way, as writable copies, so results are always
writable in the notebook.

This module imports no IPython (workers import it) and no numpy.
"""

from __future__ import annotations

import atexit
import functools
import io
import itertools
import logging
import mmap
import os
import pickle
import secrets
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy.typing

import cloudpickle

from . import classhome, compat, posixshm
from .errors import MPMagicError, out_of_files, too_many_open_files
from .fmt import fmt_bytes
from .posixshm import NoRoom

log = logging.getLogger("mpmagic")

#: Buffers at least this large (bytes) go through shared memory.
THRESHOLD = 1 << 20
#: Free pooled segments kept for reuse between calls (bytes, all segments).
KEEP_BYTES = 512 << 20
#: Workers get writable views of lent buffers (default: read-only).
WRITABLE = False

ENABLED = posixshm.ENABLED

_ALIGN = 64
_GRAIN = 1 << 20  # pooled segment sizes are rounded up to this
_PROTOCOL = 5
_counter = itertools.count()
# Reentrant: a shared array's finalizer (``_unshare``) takes it, and the cyclic gc
# may run that finalizer in a thread that holds it already (any allocation in a
# ``with _lock`` block may start a collection): a plain lock deadlocked there.
_lock = threading.RLock()


def configure(
    threshold: int | None = None, keep_bytes: int | None = None, writable: bool | None = None
) -> None:
    """Change the shared-memory settings of this notebook.

    ``threshold``: smallest buffer (bytes) sent through shared memory
    (default 1 MiB; a huge value turns the fast path off). ``keep_bytes``:
    how much free pooled memory to keep for the next call (default 512 MiB).
    ``writable``: give workers writable arrays instead of read-only ones.
    Writes stay in the worker and never reach the notebook's array: a task
    writes into its own chunk's copy of an item, and into its worker's own
    (copy-on-write) copy of a captured array, which later tasks on that
    worker see, as with a small captured array. A :func:`share` array is the
    exception: it is one memory, and writes into it reach the notebook and
    every worker.
    """
    global THRESHOLD, KEEP_BYTES, WRITABLE
    if threshold is not None:
        if int(threshold) < 1:
            raise ValueError(f"shm threshold must be at least 1 byte, not {threshold!r}")
        THRESHOLD = int(threshold)
    if keep_bytes is not None:
        if int(keep_bytes) < 0:
            raise ValueError(f"shm keep_bytes must be at least 0, not {keep_bytes!r}")
        KEEP_BYTES = int(keep_bytes)
        pool().trim()
    if writable is not None:
        WRITABLE = bool(writable)


# --------------------------------------------------------------------------
# Segments


#: Set in a worker to the notebook's pid, so every segment carries the notebook's pid.
NOTEBOOK_PID: int | None = None


#: How many names :meth:`Segment.create` tries before it gives up.
NAME_TRIES = 8


class SegmentNamesTaken(MPMagicError, FileExistsError):
    """Every name :meth:`Segment.create` tried was taken in ``/dev/shm``."""


def _owner_pid() -> int:
    """The notebook's pid: workers name their segments after it too."""
    return NOTEBOOK_PID or os.getpid()


class Segment:
    """One named shared-memory mapping (``size`` bytes, writable here)."""

    __slots__ = ("name", "size", "map", "view")

    def __init__(self, name: str, size: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.size = size
        self.map = mapping
        self.view = memoryview(mapping)

    @classmethod
    def create(cls, size: int, tag: str = "n") -> Segment:
        """A new segment of ``size`` bytes (at least 1), every page reserved.

        Its name is ``mpm_<notebook pid>_ns<namespace>_<kind><pid>_<counter>``; when
        that name is taken (a dead notebook's leftover whose pid this kernel
        reuses, which no sweep removes since "its" notebook runs; or another
        user squatting on the predictable names) it tries the next counter
        with a random suffix, :data:`NAME_TRIES` times in all. The part the
        sweeps read (the owner's pid and namespace, the creator's tag and pid)
        stays the same.

        Raises :class:`NoRoom` when ``/dev/shm`` cannot hold it,
        :class:`SegmentNamesTaken` when every name tried was taken.
        """
        size = max(1, size)
        stem = f"mpm_{posixshm.owned_by(_owner_pid())}{tag}{os.getpid()}_"
        name = ""
        for attempt in range(NAME_TRIES):
            name = f"{stem}{next(_counter)}" + (f"r{secrets.token_hex(4)}" if attempt else "")
            try:
                return cls(name, size, posixshm.create(name, size))
            except FileExistsError:
                continue
        raise SegmentNamesTaken(
            f"mpmagic could not name a shared-memory segment: {NAME_TRIES} names in a row were taken "
            f"(the last: /dev/shm/{name}); another process makes names like this notebook's: remove them"
        )

    @classmethod
    def attach(cls, name: str, size: int, private: bool = False) -> Segment:
        """Map an existing segment made by another process (``private``: copy-on-write)."""
        return cls(name, size, posixshm.attach(name, size, private))

    def unlink(self) -> None:
        """Remove the name; the memory stays while any process maps it."""
        _unlink(self.name)

    def release(self) -> None:
        """Drop this process's mapping (now, or when the last array using it dies)."""
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass  # arrays still use it: the mapping goes with the last of them


def _unlink(name: str) -> None:
    posixshm.unlink(name)


# --------------------------------------------------------------------------
# The notebook side: pooled segments for items, a list of names to unmap


class SegmentPool:
    """Segments the notebook lends to workers, reused instead of re-allocated."""

    def __init__(self) -> None:
        self.free: list[Segment] = []
        self.live: dict[str, Segment] = {}  # every segment this pool created
        self.unmapped: list[str] = []  # destroyed since workers were last told
        # References on a segment shared by several owners (a cached function payload's
        # copy of its captured arrays: the cache, and each run whose payload names it),
        # by name: the last :meth:`let_go` destroys it (:meth:`hold`).
        self.holds: dict[str, int] = {}

    def acquire(self, nbytes: int) -> Segment:
        """A segment of at least ``nbytes``: a free one of about that size, or a new one."""
        with _lock:
            fits = [s for s in self.free if nbytes <= s.size <= nbytes + nbytes // 4 + _GRAIN]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self.free.remove(seg)
                return seg
        size = -(-max(nbytes, 1) // _GRAIN) * _GRAIN
        seg = Segment.create(size, "p")  # (a full /dev/shm first costs us our free segments: give_back_kept)
        with _lock:
            self.live[seg.name] = seg
        return seg

    def release(self, seg: Segment) -> None:
        """Give a segment back for reuse (keeps at most :data:`KEEP_BYTES` free)."""
        with _lock:
            if seg.name in self.live and seg not in self.free:
                self.free.append(seg)
        self.trim()

    def trim(self, keep: int | None = None) -> None:
        """Destroy the oldest free segments beyond ``keep`` bytes."""
        keep = KEEP_BYTES if keep is None else keep
        with _lock:
            doomed = []
            while self.free and sum(s.size for s in self.free) > keep:
                doomed.append(self.free.pop(0))
        for seg in doomed:
            self.destroy(seg)

    def hold(self, name: str) -> bool:
        """Take a reference on live segment ``name``; False (nothing taken) if it is gone.

        A captured array's copy is named by every payload built from the cached
        entry that owns it, and a run's workers attach to it by name as they
        start on it: replacing the entry (another thread's first call of the same
        function, a changed array) must not unlink it under a run still in flight.
        So the cache and each such run hold it, and :meth:`let_go` unlinks it
        when the last of them lets go. A pool stop (:meth:`clear`) unlinks it
        whatever the holds (its runs fail, or build their payload again)."""
        with _lock:
            if name not in self.live:
                return False
            self.holds[name] = self.holds.get(name, 0) + 1
            return True

    def let_go(self, name: str) -> None:
        """Give back a reference :meth:`hold` took; the last one destroys the segment
        (nothing if it is gone already: a pool stop unlinked it)."""
        with _lock:
            n = self.holds.pop(name, 0) - 1
            if n > 0:
                self.holds[name] = n
                return
            seg = self.live.get(name) if n == 0 else None
            if seg is not None:
                self.destroy(seg)  # (under the lock: nobody can hold it in between)

    def destroy(self, seg: Segment) -> None:
        """Unlink a segment now; workers drop their mappings when told."""
        with _lock:
            self.live.pop(seg.name, None)
            self.holds.pop(seg.name, None)
            if seg in self.free:
                self.free.remove(seg)
            self.unmapped.append(seg.name)
        seg.unlink()
        seg.release()

    def track(self, seg: Segment) -> None:
        """Count a segment made outside the pool (a captured global) as ours to clean up."""
        with _lock:
            self.live[seg.name] = seg

    def clear(self) -> None:
        """Unlink every segment this notebook lent (pool stop, exit)."""
        with _lock:
            segs = list(self.live.values())
            self.holds.clear()
        for seg in segs:
            self.destroy(seg)


_pool: SegmentPool | None = None


def pool() -> SegmentPool:
    """The notebook's segment pool (made on first use)."""
    global _pool
    if _pool is None:
        _pool = SegmentPool()
    return _pool


def lent(name: str) -> bool:
    """Is ``name`` a segment the notebook still lends (not unlinked since: a pool
    stop unlinks them all, :func:`cleanup`)?"""
    return _pool is not None and name in _pool.live


def let_go(name: str) -> None:
    """Give back a reference on segment ``name`` (:meth:`SegmentPool.hold`)."""
    if _pool is not None:
        _pool.let_go(name)


def give_back_kept() -> bool:
    """/dev/shm is full: destroy the free segments the pool keeps for later
    (``share()``, the helpers and the next map's chunks need the room more).
    True if there were any: their room comes back once the workers unmap them."""
    if _pool is None or not _pool.free:
        return False
    _pool.trim(0)
    return True


def held() -> dict[str, int]:
    """Bytes of shared memory the notebook holds now, for ``%pool``: ``captured``
    (copies of captured arrays, kept with their cached function), ``pooled``
    (segments for map items, free or lent) and ``shared`` (:func:`share` arrays)."""
    out = {"captured": 0, "pooled": 0, "shared": sum(size for _, size in list(_shared.values()))}
    if _pool is not None:
        with _lock:
            live = list(_pool.live.values())
        for seg in live:  # (named mpm_<notebook pid>_[ns<tag>_]<kind><pid>_<n>: "l" a captured array's copy)
            out["captured" if seg.name.split("_")[-2][:1] == "l" else "pooled"] += seg.size
    return out


def take_unmapped() -> list[str]:
    """Names of segments destroyed since the last call: tell the workers to unmap them."""
    if _pool is None or not _pool.unmapped:
        return []
    with _lock:
        names, _pool.unmapped = _pool.unmapped, []
    return names


def cleanup() -> None:
    """Unlink every segment the notebook lent to workers (pool stop, exit).

    Arrays made by :func:`share` stay: they belong to the notebook's
    variables, not to a pool (see :func:`release_all`).
    """
    if _pool is not None:
        _pool.clear()


@atexit.register
def release_all() -> None:
    """Unlink every segment this process made (the pool's, and ``share()`` arrays):
    what its exit does, and what a kernel asked to shut down does first."""
    # Each step on its own: one failing must not leave the others' segments.
    try:
        cleanup()
    except Exception:
        log.warning("mpmagic: removing pooled shared memory at exit failed", exc_info=True)
    for name in [n for n in _shared if n not in _inherited]:
        try:
            _unlink(name)
        except Exception:
            log.warning("mpmagic: removing shared segment %s at exit failed", name, exc_info=True)


def forget_after_fork() -> None:
    """In a forked child: the segments lent to workers and the ``share()`` arrays
    are the parent's; this process's exit must not unlink them (``pool._after_fork_in_child``)."""
    global _pool, _lock
    _lock = threading.RLock()  # (another thread may have held it at the fork)
    _pool = None
    _inherited.update(_shared)  # (still known here: a view of one is still sent by name)


def sweep_stale() -> int:
    """Unlink segments (the pool's, and shared helpers' with their semaphores) left by
    notebooks that died without cleaning up. Returns how many."""
    helpers = posixshm.HELPER_PREFIX
    return sum(posixshm.sweep(prefix, dead_owner=True) for prefix in ("mpm_", helpers, "sem." + helpers))


def sweep_worker(pid: int | None) -> int:
    """Unlink what a worker that is gone left: segments it created but never
    handed over, and the shared helpers it made (a ``--keep`` rank's inbox
    queue; a worker killed on timeout or interrupt could not release them,
    and no resource tracker holds a worker's helpers: see
    ``shared.base._tracked_here``). Returns how many.

    Nothing of a worker that still runs is touched (its helpers are in use).
    """
    if not pid:
        return 0
    n = posixshm.sweep(f"mpm_{posixshm.owned_by(_owner_pid())}g{pid}_")
    if not posixshm.pid_alive(pid):
        n += sweep_helpers(pid)
    return n


def sweep_helpers(pid: int) -> int:
    """Unlink the shared helpers' names (segments, semaphores, spills) process ``pid`` made."""
    helpers = f"{posixshm.HELPER_PREFIX}{posixshm.owned_by(pid)}"
    return posixshm.sweep(helpers) + posixshm.sweep("sem." + helpers)


def sweep_notebook(pid: int) -> int:
    """Unlink every segment of notebook ``pid``, and the shared helpers it made (a
    worker whose notebook was killed: with its process group, its resource tracker too).

    The helpers' names are registered with the notebook's resource tracker,
    which outlives a notebook killed alone (or a script's ``os._exit``) until
    its workers exit, and then unlinked them again: one "No such file"
    warning per name. The names this worker removed are taken off the
    tracker's list (``compat.tracker_forget``; only those: two workers
    sweeping at once never both tell it, which would print a KeyError).
    """
    helpers = f"{posixshm.HELPER_PREFIX}{posixshm.owned_by(pid)}"
    gone: list[str] = []
    n = posixshm.sweep(f"mpm_{posixshm.owned_by(pid)}")
    n += posixshm.sweep(helpers, unlinked=gone) + posixshm.sweep("sem." + helpers, unlinked=gone)
    compat.tracker_forget(_tracker_names(gone))
    return n


def _tracker_names(unlinked: list[str]) -> list[tuple[str, str]]:
    """``/dev/shm`` entries of helpers as the resource tracker knows them: a
    semaphore's file ``sem.NAME`` is ``(/NAME, "semaphore")``; a segment (a
    helper's, a queue's spill) ``(/NAME, "shared_memory")``."""
    return [("/" + name[4:], "semaphore") if name.startswith("sem.") else ("/" + name, "shared_memory")
            for name in unlinked]


#: A worker calls this when it stops on the notebook's word (see posixshm.run_exit_hooks):
#: shared queues hand over what they still hold here, and the helpers it made are released.
before_exit = posixshm.run_exit_hooks


# --------------------------------------------------------------------------
# When /dev/shm has no room: say so once

_advised = False


def advise(nbytes: int, where: str, exc: NoRoom | None = None, at_least: bool = False) -> None:
    # ``where`` finishes the sentence: "among the items went through the pipe".
    """One line, once per session: shared memory was too small, the pipe carried the data.
    ``exc``: what stopped it, when it was the file-size limit (``ulimit -f``) and not /dev/shm.
    ``at_least``: ``nbytes`` is one chunk's (the first that fell back), said as "at least":
    the line goes out before the run's later chunks, which may fall back too (it said
    2.8 MB where 11.2 MB went through the pipe)."""
    global _advised
    if _advised:
        return
    _advised = True
    size = f"at least {fmt_bytes(nbytes)}" if at_least else fmt_bytes(nbytes)
    limit = exc.file_limit if exc is not None else posixshm.file_size_limit()
    if limit is not None and (exc is not None or posixshm.room()[0] > limit):
        # (a result's fallback, said in the notebook, carries no cause: the workers have the
        # notebook's file-size limit, and /dev/shm with more room than it was not the cause)
        line = (f"mpmagic: the file-size limit (ulimit -f, {fmt_bytes(limit)}) keeps /dev/shm segments "
                f"small: {size} of array data {where} instead (slower, still correct). "
                "Raise `ulimit -f` (it limits /dev/shm segments too) to skip this note.")
        log.info(line)
        print(line, file=sys.stderr)
        return
    free, total = posixshm.room()
    room = f"{fmt_bytes(total)}, {fmt_bytes(free)} free" if total else "size unknown"
    line = (
        f"mpmagic: /dev/shm is too small or full ({room}): {size} of array data "
        f"{where} instead (slower, still correct). Give it room "
        "(docker run --shm-size=1g), or send big arrays through the pipe on purpose with "
        "%config MPMagic.shm_threshold = 10**12 (mpmagic.shm.configure(threshold=...)) to skip this note."
    )
    log.info(line)
    print(line, file=sys.stderr)


_advised_files = False


def advise_files(nbytes: int, where: str, at_least: bool = False) -> None:
    """One line, once per session: the process had no file descriptor left to make
    a segment (``ulimit -n``), the pipe carried the data (``where``, ``at_least`` as in :func:`advise`)."""
    global _advised_files
    if _advised_files:
        return
    _advised_files = True
    size = f"at least {fmt_bytes(nbytes)}" if at_least else fmt_bytes(nbytes)
    line = f"mpmagic: {size} of array data {where} instead (slower, still correct): {too_many_open_files()}."
    log.info(line)
    print(line, file=sys.stderr)


# --------------------------------------------------------------------------
# Packing: pickle with large buffers out of band, into one segment per message


class Lease:
    """The pooled segments one map chunk uses; released when the chunk is done."""

    __slots__ = ("segments", "copied")

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.copied = 0  # bytes of buffers copied into them (for the report's advice)

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.segments)

    def release(self) -> None:
        p = pool()
        for seg in self.segments:
            p.release(seg)
        self.segments = []


class Collector:
    """A ``buffer_callback`` that takes large contiguous buffers out of band.

    It also notes whether any buffer was read-only (``readonly``): pickle
    marks those, and they load read-only, whichever way they travel.
    """

    def __init__(self, threshold: int | None = None, lend: bool = False) -> None:
        self.threshold = THRESHOLD if threshold is None else threshold
        self.buffers: list[memoryview] = []
        self.readonly = False
        self.lend = lend  # the notebook lending to workers: views of share() arrays go by reference

    def dispatch_table(self) -> dict | None:
        """Reducers the pickler should use besides its own, or None (see :func:`_reduce_array`).

        Only when lending and :func:`share` arrays exist: a strided view of
        one then travels as its place in the segment instead of a copy.
        """
        if not (self.lend and _shared):
            return None
        np = sys.modules.get("numpy")
        return {np.ndarray: _reduce_array} if np is not None else None

    def reset(self) -> None:
        self.buffers = []
        self.readonly = False

    def __call__(self, pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: it stays in the pickle
            return True
        self.readonly = self.readonly or raw.readonly
        if raw.nbytes < self.threshold:
            return True
        self.buffers.append(raw)
        return False  # out of band


def _spans(buffers: Iterable[memoryview]) -> tuple[list[tuple[int, int]], int]:
    spans, offset = [], 0
    for b in buffers:
        spans.append((offset, b.nbytes))
        offset += -(-b.nbytes // _ALIGN) * _ALIGN
    return spans, offset


def _address(buf: memoryview) -> int | None:
    np = sys.modules.get("numpy")  # buffers that matter here come from numpy
    if np is None:
        return None
    try:
        return int(np.frombuffer(buf, np.uint8).ctypes.data)
    except Exception:
        return None


def _in_shared(buf: memoryview) -> tuple[str, int, int] | None:
    """``(segment, its size, offset)`` when ``buf`` lies inside a :func:`share` array."""
    if not _shared:
        return None
    addr = _address(buf)
    return None if addr is None else shared_place(addr, buf.nbytes)


def shared_place(addr: int, nbytes: int = 1) -> tuple[str, int, int] | None:
    """``(segment, its size, offset)`` when the ``nbytes`` at address ``addr`` lie inside
    a :func:`share` array (in this process), else None."""
    for name, (start, size) in list(_shared.items()):
        if start <= addr and addr + nbytes <= start + size:
            return name, size, addr - start
    return None


# A buffer's place: (segment name, segment size, offset, length).
Ref = tuple[str, int, int, int]


def wrap(
    data: bytes,
    buffers: list[memoryview],
    mode: str,
    lease: Lease | None = None,
    inline: Iterable[int] = (),
) -> tuple[bytes, Segment | None, list[Ref]]:
    """Place ``buffers`` in shared memory; return (envelope bytes, new segment, refs).

    Buffers inside a :func:`share` array are referred to where they are (no
    copy). The others are copied into one segment: ``mode`` ``"lend"`` (the
    notebook keeps it: from the pool when ``lease`` is given, else a
    dedicated one) or ``"give"`` (a worker's result: the receiver unlinks it).
    Buffers listed in ``inline``, and every buffer when ``/dev/shm`` has no
    room for the segment, travel inside the envelope itself (then ``refs``
    is empty: nothing in shared memory to compare with later).
    """
    inline = set(inline)
    private = None
    refs: list[Any] = [None] * len(buffers)
    to_copy = []
    for i, b in enumerate(buffers):
        found = _in_shared(b) if mode == "lend" and i not in inline else None
        if found is not None:
            refs[i] = (found[0], found[1], found[2], b.nbytes)
        elif i not in inline:
            to_copy.append(i)
    seg = None
    fallback = 0
    if to_copy:
        spans, total = _spans(buffers[i] for i in to_copy)
        try:
            if lease is not None:
                seg = pool().acquire(total)
                lease.segments.append(seg)
            else:
                seg = Segment.create(total, "g" if mode == "give" else "l")
                if mode == "lend":
                    pool().track(seg)
                    # A captured array's copy, one for every worker and call: a
                    # worker allowed to write maps it copy-on-write, so its writes
                    # stay its own (as a small captured array's would).
                    private = seg.name
        except OSError as exc:  # NoRoom; or no descriptor left to open one (EMFILE: ulimit -n)
            if not isinstance(exc, NoRoom) and not out_of_files(exc):
                raise
            inline.update(to_copy)  # through the pipe, inside the envelope
            fallback = sum(buffers[i].nbytes for i in to_copy)
            if mode == "lend":
                # (a map's chunk, one of many: "at least"; a captured global's payload is all there is)
                if isinstance(exc, NoRoom):
                    advise(fallback, "among the items went through the pipe", exc, at_least=lease is not None)
                else:
                    advise_files(fallback, "among the items went through the pipe", at_least=lease is not None)
            elif not isinstance(exc, NoRoom):
                fallback = 0  # (the notebook's note would blame /dev/shm: a worker's files are its own)
        else:
            for (offset, n), i in zip(spans, to_copy, strict=True):
                seg.view[offset : offset + n] = buffers[i]
                refs[i] = (seg.name, seg.size, offset, n)
            if lease is not None:
                lease.copied += sum(n for _, n in spans)
    for i in inline:
        b = buffers[i]
        # A writable buffer pickles (in band) as a bytearray, loaded writable; a
        # read-only one would load as bytes, so it is copied into a bytearray.
        refs[i] = pickle.PickleBuffer(b) if not b.readonly else bytearray(b)
    given = seg.name if (seg is not None and mode == "give") else None
    env = _Shared(data, refs, given, mode == "give" or WRITABLE, fallback if mode == "give" else 0, private)
    out = pickle.dumps(env, _PROTOCOL)
    if inline:  # refs to compare with later: none, the bytes are in the envelope
        return out, seg, []
    return out, seg, refs


def same_buffers(seg: Segment | None, refs: list[Ref], buffers: list[memoryview]) -> bool:
    """Do ``buffers`` sit where ``refs`` say (shared arrays) or equal the copy in ``seg``?"""
    if len(refs) != len(buffers):
        return False
    for (name, _size, offset, n), b in zip(refs, buffers, strict=True):
        if b.nbytes != n:
            return False
        if seg is not None and name == seg.name:
            if not _equal_bytes(b, seg.view[offset : offset + n]):
                return False
        else:
            found = _in_shared(b)
            if found is None or (found[0], found[2]) != (name, offset):
                return False
    return True


def _equal_bytes(a: memoryview, b: memoryview) -> bool:
    """Are the bytes of ``a`` and ``b`` (equal lengths) the same?

    Every warm call of a function that captures a large array compares it
    with the copy in shared memory (payload_cache.py), so this is on the
    call's path: libc's ``memcmp`` on the two buffers in place (no copy, the
    GIL released) reads 500 MB in ~0.2 s where numpy's ``array_equal`` on
    byte views took 0.5-0.8 s (it makes a bool array per step and reduces it).
    Bytes, not values: a NaN equals itself, -0.0 differs from 0.0.
    """
    step = 64 << 20  # (a Ctrl-C waits for one step at most)
    memcmp = _memcmp()
    pa = _address(a) if memcmp is not None else None
    pb = _address(b) if pa is not None else None
    if memcmp is not None and pa is not None and pb is not None:
        n = a.nbytes
        return all(memcmp(pa + i, pb + i, min(step, n - i)) == 0 for i in range(0, n, step))
    np = sys.modules.get("numpy")
    for i in range(0, a.nbytes, step):
        x, y = a[i : i + step], b[i : i + step]
        if np is not None:
            if not np.array_equal(np.frombuffer(x, np.uint8), np.frombuffer(y, np.uint8)):
                return False
        elif x.tobytes() != y.tobytes():
            return False
    return True


@functools.cache
def _memcmp() -> Any:
    """libc's ``memcmp(void *, void *, size_t)`` through ctypes, or None where it cannot be found."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(None) if os.name == "posix" else ctypes.CDLL(ctypes.util.find_library("c"))
        memcmp = libc.memcmp
        memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        memcmp.restype = ctypes.c_int
        return memcmp
    except Exception:  # (no libc to load: numpy's comparison does it, slower)
        return None


# --------------------------------------------------------------------------
# Arrays that live in shared memory from the start: zero copies


# share() segments alive in this notebook: name -> (address, size)
_shared: dict[str, tuple[int, int]] = {}
# ...and their mappings, weakly (a strided view's span is cut from it: _reduce_array)
_maps: dict[str, weakref.ref] = {}
#: Names in ``_shared`` that a forked child inherited: the parent's to unlink, not this process's.
_inherited: set[str] = set()


def share(array: numpy.typing.ArrayLike) -> numpy.typing.NDArray[Any]:
    """A copy of a numpy ``array`` that lives in shared memory.

    Pass it (or slices and other views of it: column blocks ``a[:, i:j]``,
    ``a[::-1]``) to ``%pmap`` as items, or use it as a captured global:
    workers then map the very same memory, with no copy per call, per chunk
    or per worker, and a view keeps its strides. Workers see it read-only
    (unless ``shm.configure(writable=True)``: then their writes reach it) and
    see changes the notebook makes to it. The memory is freed when the array
    and every view of it are gone.
    """
    import numpy as np

    a = np.asarray(array)
    if a.dtype.hasobject:
        raise TypeError("share() takes numeric numpy arrays; an object array holds references, not data")
    if not ENABLED:
        return a.copy()
    try:
        seg = Segment.create(max(1, a.nbytes), "s")
    except OSError as exc:  # NoRoom, or no descriptor left (EMFILE): the same fallback, its own note
        if not isinstance(exc, NoRoom) and not out_of_files(exc):
            raise
        where = "given to mpmagic.share() stays an ordinary array, copied to workers through the pipe"
        if isinstance(exc, NoRoom):
            advise(a.nbytes, where, exc)
        else:
            advise_files(a.nbytes, where)
        return a.copy()
    mapping = seg.map
    seg.view.release()  # from here on only the array's views use the mapping
    out = np.frombuffer(mapping, dtype=a.dtype, count=a.size).reshape(a.shape)
    np.copyto(out, a)
    _shared[seg.name] = (int(out.ctypes.data), seg.size)
    _maps[seg.name] = weakref.ref(mapping)
    # The mapping lives as long as the array or any view of it.
    weakref.finalize(mapping, _unshare, seg.name)
    return out


def _unshare(name: str) -> None:
    """The last view of a shared array is gone: unlink it; workers unmap it
    (in a forked child that inherited it: the parent's array, left alone)."""
    _shared.pop(name, None)
    _maps.pop(name, None)
    if name in _inherited:
        return
    _unlink(name)
    with _lock:
        pool().unmapped.append(name)


def array_span(a: Any, first: int) -> tuple[int, int]:
    """``(low, high)`` of numpy array ``a`` whose first element is at address ``first``:
    the bytes ``[low, high)`` its elements lie in, whatever its strides (negative ones
    reach below ``first``)."""
    low = high = first
    for n, step in zip(a.shape, a.strides, strict=True):
        if step < 0:
            low += (n - 1) * step
        else:
            high += (n - 1) * step
    return low, high + a.itemsize


def _reduce_array(a: Any) -> Any:
    """How a lending pickler reduces a numpy array (:meth:`Collector.dispatch_table`).

    numpy pickles a view that is neither C- nor F-contiguous (a column block
    ``X[:, a:b]``, ``X[::-1]``) as a contiguous copy. When the view lies in a
    :func:`share` array, it travels instead as the span of the segment it
    covers (out of band: :func:`wrap` finds it in the segment, no copy) with
    its dtype, shape, strides and offset, so the worker sees the very same
    memory with the same layout (and numpy's reductions add in the same order
    as in the notebook). Any other array: numpy's own reduction.
    """
    if a.size and not (a.flags.c_contiguous or a.flags.f_contiguous) and not a.dtype.hasobject:
        first = int(a.ctypes.data)
        lo, hi = array_span(a, first)
        for name, (start, size) in list(_shared.items()):
            if start <= lo and hi <= start + size:
                ref = _maps.get(name)
                mapping = ref() if ref is not None else None
                if mapping is None:
                    break
                np = sys.modules["numpy"]
                span = np.frombuffer(mapping, np.uint8, count=hi - lo, offset=lo - start)
                return _rebuild_view, (pickle.PickleBuffer(span), a.dtype, a.shape, a.strides, first - lo)
    return a.__reduce_ex__(_PROTOCOL)


def _rebuild_view(buf: Any, dtype: Any, shape: tuple, strides: tuple, offset: int) -> Any:
    """The view :func:`_reduce_array` sent, on the span ``buf`` (read-only when ``buf`` is)."""
    import numpy as np

    return np.ndarray(shape, dtype, buffer=buf, offset=offset, strides=strides)


# --------------------------------------------------------------------------
# Unpacking: the envelope


class _Shared:
    """A pickle whose large buffers live in shared-memory segments (``refs``).

    A ref that is not a segment's place is the buffer itself (a bytearray or
    a PickleBuffer pickled in band): see :func:`wrap`. ``fallback``: bytes a
    worker could not put in shared memory (the notebook says so, once).
    ``private``: the segment (a captured array's copy) that a ``writable``
    receiver maps copy-on-write, afresh each time it loads the envelope.
    """

    __slots__ = ("data", "refs", "given", "writable", "fallback", "private")

    def __init__(
        self, data: bytes, refs: list, given: str | None, writable: bool, fallback: int = 0, private: str | None = None
    ) -> None:
        self.data, self.refs, self.given, self.writable = data, refs, given, writable
        self.fallback, self.private = fallback, private

    def __reduce__(self):
        return (_open, (self.data, self.refs, self.given, self.writable, self.fallback, self.private))


# Lent segments mapped in this process (a worker), by name.
_mapped: dict[str, Segment] = {}
# Names of the lent segments opened since :func:`opened` last reset it.
_opened: set[str] = set()


def _open(data: bytes, refs: list, given: str | None, writable: bool, fallback: int = 0, private: str | None = None) -> Any:
    if fallback:
        advise(fallback, "in the results came back through the pipe", at_least=True)  # (one chunk's)
    segs: dict[str, Segment] = {}
    views = []
    for ref in refs:
        if not isinstance(ref, tuple):  # the buffer itself, carried in the envelope
            view = memoryview(ref)
            if writable and view.readonly:
                view = memoryview(bytearray(view))
            views.append(view if writable else view.toreadonly())
            continue
        name, size, offset, n = ref
        seg = segs.get(name)
        if seg is None:
            if name == given:
                seg = Segment.attach(name, size)
                _unlink(name)  # ours now: nothing left in /dev/shm
            elif writable and name == private:
                # Copy-on-write, not kept in _mapped: this load's writes are its own,
                # and the mapping lives as long as the arrays loaded on it.
                seg = Segment.attach(name, size, private=True)
                _opened.add(name)
            else:
                seg = _mapped.get(name)
                if seg is None:
                    seg = _mapped[name] = Segment.attach(name, size)
                _opened.add(name)
            segs[name] = seg
        view = seg.view[offset : offset + n]
        views.append(view if writable else view.toreadonly())
    return classhome.loads(data, buffers=views)  # (this process's own classes left as they are)


def opened() -> set[str]:
    """Lent segments opened since the last call (and reset the record)."""
    global _opened
    names, _opened = _opened, set()
    return names


def forget(names: Iterable[str]) -> None:
    """Drop this process's mappings of segments the notebook destroyed."""
    for name in names:
        seg = _mapped.pop(name, None)
        if seg is not None:
            seg.release()


def dumps_lent(obj: Any, lease: Lease, dumps: Callable[[Any, Collector], bytes]) -> bytes:
    """Pickle map items with ``dumps(obj, collector)``; big buffers go into pooled segments."""
    collector = Collector(lend=True)
    data = dumps(obj, collector)
    if not collector.buffers:
        return data
    return wrap(data, collector.buffers, "lend", lease)[0]


def as_lent(obj: Any, dumps: Callable[[Any, Collector], bytes], threshold: int | None = None,
            writable: bool | None = None, share_read_only: bool = False) -> Any:
    """``obj`` loaded again as a worker on this machine loads it from :func:`dumps_lent`:
    a copy, never ``obj`` itself (``%pdebug`` replays a failed item on it).

    Buffers of at least ``threshold`` bytes (the workers' :data:`THRESHOLD` at the
    run) come as read-only copies, as a worker maps its lent segment, unless
    ``writable`` (:data:`WRITABLE` at the run). A buffer inside a :func:`share`
    array is that very memory, as it is in the workers. The smaller ones are
    in the pickle, as there. No segment is made: the copies are this process's.
    ``share_read_only``: a read-only buffer is a read-only view of ``obj``'s own
    memory, not a copy (``--compare``'s serial run of a cell: no second copy of a
    big array, which it can read and not change, as a rank).
    """
    collector = Collector(threshold, lend=True)
    data = dumps(obj, collector)
    writable = WRITABLE if writable is None else writable
    views = []
    for b in collector.buffers:
        own = _in_shared(b) is not None or (share_read_only and not writable)
        view = memoryview(b) if own else memoryview(bytearray(b))
        views.append(view if writable else view.toreadonly())
    return classhome.loads(data, buffers=views)


class _WritablePickler(cloudpickle.Pickler):
    """cloudpickle, with every read-only numpy array pickled as a writable copy."""

    def reducer_override(self, obj: Any) -> Any:
        np = sys.modules.get("numpy")
        if np is not None and type(obj) is np.ndarray and not obj.flags.writeable:
            return obj.copy(order="K").__reduce_ex__(_PROTOCOL)  # (K: a Fortran-ordered array stays one)
        return super().reducer_override(obj)


def _dumps_writable(obj: Any, collector: Collector) -> bytes:
    """Pickle ``obj`` so that no numpy array in it loads read-only."""
    collector.reset()
    with io.BytesIO() as f:
        _WritablePickler(f, protocol=_PROTOCOL, buffer_callback=collector).dump(obj)
        return f.getvalue()


def dumps_result(obj: Any, dumps: Callable[[Any, Collector], bytes]) -> bytes:
    """Pickle a worker's result with ``dumps(obj, collector)``; big buffers are given.

    ``dumps`` is the data pickler (``payload.dumps_data``) taking a buffer callback.
    """
    collector = Collector(None if ENABLED else 1 << 62)
    data = dumps(obj, collector)
    if collector.readonly:
        # A read-only array (a task returning its shared, read-only input, or a
        # view of it) would load read-only in the notebook: results are
        # writable there, as map() would give them, so copy those first.
        data = _dumps_writable(obj, collector)
    if not collector.buffers:
        return data
    env, seg, _ = wrap(data, collector.buffers, "give")
    if seg is not None:
        seg.release()
    return env
