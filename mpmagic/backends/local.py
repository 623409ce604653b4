"""Worker processes on this machine, and the loop that drives them.

Why not ``multiprocessing.Pool``: with spawn or forkserver it cannot run a
notebook function, it hangs when a worker dies mid-task, it cannot bound a
task's time, and it cannot run N cell copies at once on distinct workers. So
each worker gets one duplex pipe, and one loop in the calling thread waits on
every pipe *and* every worker's process sentinel together
(``multiprocessing.connection.wait``): a result, a line of output, or a
worker's death wakes it, so a dead worker is an error with its exit status,
never a hang. Because the loop runs in the notebook's main thread, Ctrl-C
(or "interrupt kernel") lands in it directly; workers ignore SIGINT and the
loop stops the ones busy with the interrupted run and starts replacements.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import threading
import time
import types
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from .. import payload, payload_cache, shm, warmup, worker
from ..cpus import available_cpus
from ..errors import MPMagicError, UsageError, describe_exitcode

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
            except OSError:
                pass


def _check_size(n: object, what: str = "workers") -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"{what} must be a whole number of at least 1, not {n!r}")
    if n > max_workers():
        raise UsageError(
            f"{what} = {n} is more processes than this machine can run at once "
            f"(at most {max_workers()} with {available_cpus()} CPUs)"
        )


@dataclass(eq=False)
class _Slot:
    """One worker process and what the loop knows about it."""

    wid: int
    proc: Any
    conn: Any
    started: float
    known: set = field(default_factory=set)  # payload keys it has cached
    inflight: deque = field(default_factory=deque)  # (call_id, unit) in send order
    deadline: float | None = None
    tasks: int = 0  # items/ranks finished since it started
    pid: int | None = None
    ready: bool = False
    temporary: bool = False
    # Shared with the worker: the position in its chunk of the item it is
    # running, so a crash blames that one item rather than the whole chunk.
    position: Any = None

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
    """
    real = sys.modules.get("__main__")
    if _main_is_harmless(real):  # a notebook's __main__: nothing to hide, nothing swapped
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


def can_start_in_background() -> bool:
    """May the pool start in a background thread (at ``%load_ext``)?"""
    return _main_is_harmless(sys.modules.get("__main__"))


@contextmanager
def _sigint_blocked_while_starting():
    """Start workers that cannot be killed by SIGINT before they ignore it.

    "Interrupt kernel" signals the kernel's whole process group. A worker sets
    SIGINT to ignored as soon as it runs, but a second interrupt during the
    restart that follows a first one could reach a replacement before that.
    From the main thread, SIGINT is ignored during ``start()``: a process
    forked or exec'ed meanwhile (spawn workers, the forkserver itself)
    inherits the ignoring and Python keeps it. Other threads (the pool's
    background pre-start) cannot change handlers: they block SIGINT, which a
    forked child inherits. Forkserver children are covered by
    ``mpmagic.forkserver_preload`` whatever thread started the forkserver.
    """
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)
    elif hasattr(signal, "pthread_sigmask"):
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    else:
        yield


@contextmanager
def _sigint_deferred():
    """Cleanup that a second Ctrl-C must not cut short: defer SIGINT meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda s, f: hits.append(s))
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if hits and callable(old):
            old(signal.SIGINT, None)


_live_backends: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for backend in list(_live_backends):
        backend.stop(timeout=0.5)


class LocalBackend:
    """A managed pool of worker processes on this machine."""

    name = "local"
    shares_memory = True  # large arrays may travel through shared memory (shm.py)

    def __init__(
        self,
        workers: int | None = None,
        start_method: str | None = None,
        max_tasks_per_child: int | None = None,
    ) -> None:
        method = start_method or default_start_method()
        if method not in multiprocessing.get_all_start_methods():
            raise UsageError(
                f"unknown start method {method!r}: choose one of "
                f"{', '.join(m for m in START_METHODS if m in multiprocessing.get_all_start_methods())}"
            )
        n = available_cpus() if workers is None else workers
        _check_size(n)
        self.workers = n
        self.start_method = method
        self.max_tasks_per_child = max_tasks_per_child
        self.ctx = multiprocessing.get_context(method)
        self.slots: list[_Slot] = []
        self._next_wid = 0
        self.tasks_run = 0
        self.calls_run = 0
        self.workers_replaced = 0
        self.created = time.time()
        self._lock = threading.RLock()
        self._limit: int | None = None
        self.warmth = warmup.Warmth()  # warm: modules the workers should import (warmup.py)
        _live_backends.add(self)

    # -- lifecycle ---------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self.slots)

    def start(self) -> None:
        """Start the workers (returns at once; they get ready in the background)."""
        with self._lock:
            if not self.slots:
                shm.sweep_stale()  # segments of notebooks that died without cleaning up
            if self.start_method == "forkserver" and not self.slots:
                try:
                    self.ctx.set_forkserver_preload(
                        ["mpmagic.forkserver_preload", "mpmagic.worker", "mpmagic.cell"]
                        + warmup.forkserver_modules()  # warm: replacements are born with them
                    )
                except Exception:
                    pass
            if warmup.enabled():  # warm: the notebook's modules, imported in the background
                self.warmth.want(warmup.notebook_modules())
            while len([s for s in self.slots if not s.temporary]) < self.workers:
                self.slots.append(self._spawn())
            for slot in self.slots:  # warm: modules the notebook imported meanwhile
                self._send_warm(slot)

    def _spawn(self, temporary: bool = False) -> _Slot:
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        _widen(parent_conn)
        _widen(child_conn)
        position = self.ctx.RawValue("q", -1)
        wid = self._next_wid
        self._next_wid += 1
        proc = self.ctx.Process(
            target=worker.main,
            args=(child_conn, os.getpid(), wid, position),
            name=f"mpmagic-worker-{wid}",
            daemon=True,
        )
        with _no_main_module(), _sigint_blocked_while_starting():
            proc.start()
        child_conn.close()
        slot = _Slot(
            wid, proc, parent_conn, time.monotonic(), pid=proc.pid, temporary=temporary, position=position
        )
        self._send_warm(slot)  # warm
        return slot

    # -- warm workers (warmup.py) ------------------------------------------
    def preload(self, names: list[str]) -> None:
        """Have every worker import these modules in the background (new ones start with them).

        Never waits: while the pool is starting in another thread (the
        background start at ``%load_ext``), the names are only recorded, and
        that start sends them when its workers exist (or the next run does).
        """
        if not self.warmth.want(names) or not self._lock.acquire(blocking=False):
            return
        try:
            for slot in self.slots:
                self._send_warm(slot)
        finally:
            self._lock.release()

    def _send_warm(self, slot: _Slot) -> None:
        msg = self.warmth.message(slot.wid)
        if msg is None:
            return
        try:
            slot.conn.send_bytes(pickle.dumps(msg, payload.PROTOCOL))
        except OSError:
            self.warmth.forget(slot.wid)  # a dead worker: the sentinel reports it

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every worker has said it is ready (used by ``%pool start``)."""
        self.start()
        deadline = time.monotonic() + timeout
        while not all(s.ready for s in self.slots):
            left = deadline - time.monotonic()
            if left <= 0:
                raise MPMagicError(f"workers not ready after {timeout:g} s")
            self._pump(None, min(left, 0.2))

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every worker: ask politely, then terminate, then kill."""
        with self._lock:
            slots, self.slots = self.slots, []
        for s in slots:
            try:
                s.conn.send_bytes(pickle.dumps(("stop",)))
            except Exception:
                pass
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
            s.conn.close()
            try:
                s.proc.close()
            except Exception:
                pass
        # No worker maps our segments any more: unlink them all.
        for s in slots:
            shm.sweep_worker(s.pid)
        shm.cleanup()
        payload_cache.clear()
        shm.take_unmapped()

    def resize(self, workers: int) -> None:
        """Grow or shrink the pool to ``workers`` processes (idle ones stop)."""
        _check_size(workers)
        with self._lock:
            self.workers = workers
            if self.slots:
                extra = [s for s in self.slots if not s.temporary][workers:]
                for s in extra:
                    self._retire(s)
                self.start()

    def _retire(self, slot: _Slot) -> None:
        """Stop one idle worker and forget it."""
        if slot in self.slots:
            self.slots.remove(slot)
        try:
            slot.conn.send_bytes(pickle.dumps(("stop",)))
        except Exception:
            pass
        slot.conn.close()
        _reap_later(slot.proc)

    def _kill(self, slot: _Slot) -> None:
        """Kill a worker at once (timeout, interrupt, abandoned work)."""
        if slot in self.slots:
            self.slots.remove(slot)
        try:
            slot.proc.kill()
        except Exception:
            pass
        slot.conn.close()
        _reap_later(slot.proc)
        self.workers_replaced += 1

    def _replace(self, slot: _Slot) -> None:
        self._kill(slot)
        if not slot.temporary:
            self.slots.append(self._spawn())

    # -- status ------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A snapshot for ``%pool``: backend, method, workers with pids and memory."""
        import psutil

        workers = []
        for s in self.slots:
            try:
                rss = psutil.Process(s.pid).memory_info().rss if s.pid else None
            except Exception:
                rss = None
            workers.append(
                {
                    "id": s.wid,
                    "pid": s.pid,
                    "alive": s.proc.is_alive(),
                    "ready": s.ready,
                    "busy": s.busy,
                    "tasks": s.tasks,
                    "rss": rss,
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
            "workers_replaced": self.workers_replaced,
            "max_tasks_per_child": self.max_tasks_per_child,
            "preloaded": list(self.warmth.wanted),  # warm: modules the workers import (warmup.py)
        }

    # -- running a job -----------------------------------------------------
    def run(self, job, workers: int | None = None) -> None:
        """Drive ``job`` to completion on the workers; raise what interrupts it.

        ``workers`` limits a map to that many workers, or grows the pool to it.
        """
        __tracebackhide__ = True
        self.start()
        self.calls_run += 1
        if job.kind == "cell":
            self._ensure_distinct(job.size)
            self._limit = None
        else:
            if workers and workers > self.workers:
                self.resize(workers)
            self._limit = workers
        self._send_unmaps()
        if job.func_key is not None:  # warm: modules the function needs, ahead of it
            self.warmth.want_for(job.func, job.func_key)
        for slot in self.slots:  # warm: and any the notebook imported since they were sent
            self._send_warm(slot)
        try:
            self._loop(job)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                self._interrupted_at = time.monotonic()
            with _sigint_deferred():
                self._abandon(job)
            raise
        finally:
            if hasattr(job, "release_shared"):  # no worker reads its chunks any more
                job.release_shared()
            self._send_unmaps()
            if job.kind == "cell":
                for s in [s for s in self.slots if s.temporary and not s.busy]:
                    self._retire(s)

    def _ensure_distinct(self, n: int) -> None:
        """A cell needs ``n`` workers at once: add temporary ones if the pool is smaller."""
        have = len(self.slots)
        if n > have:
            limit = max(64, 8 * available_cpus())
            if n > limit:
                raise UsageError(f"-n {n} is more ranks than this machine can run at once (at most {limit})")
            for _ in range(n - have):
                self.slots.append(self._spawn(temporary=True))

    def _depth(self, job) -> int:
        """Units in flight per worker: 2 hides latency for short chunks."""
        if job.kind == "cell" or job.timeout:
            return 1
        per_item = job.planner.per_item
        if per_item is None:
            return 1
        if (job.planner.bytes_per_item or 0) * max(job.planner.sizes_used or {1}) > 8 << 20:
            return 1  # big chunks: a second one in flight would only hold more memory
        return 2 if per_item * max(job.planner.sizes_used or {1}) < 0.02 else 1

    def _assign(self, job) -> None:
        depth = self._depth(job)
        # Fill idle workers first, then deepen pipelines.
        slots = self.slots[: self._limit] if self._limit else self.slots
        for level in range(depth):
            if level and level >= self._depth(job):
                break  # what was just packed showed big chunks: one in flight is enough
            for slot in sorted(slots, key=lambda s: len(s.inflight)):
                if len(slot.inflight) > level:
                    continue
                if job.kind == "cell" and slot.inflight:
                    continue
                if self._saturated(slot):
                    continue  # recycled by _check_restarts once its work is back
                if not job.has_work:
                    return
                unit = job.next_unit()
                if unit is None:
                    return
                self._send_unit(slot, job, unit)

    def _send_unit(self, slot: _Slot, job, unit) -> None:
        try:
            if job.func_key is not None and job.func_key not in slot.known:
                slot.conn.send_bytes(pickle.dumps(("func", job.func_key, job.func_payload), payload.PROTOCOL))
                slot.known.add(job.func_key)
            slot.conn.send_bytes(pickle.dumps(job.message(unit), payload.PROTOCOL))
        except (BrokenPipeError, ConnectionResetError, OSError):
            job.requeue(unit)
            slot.known.discard(job.func_key)
            return  # the sentinel reports the dead worker
        slot.inflight.append((job.call_id, unit))
        if job.timeout and len(slot.inflight) == 1:
            slot.deadline = time.monotonic() + job.timeout

    def _saturated(self, slot: _Slot) -> bool:
        """Has this worker been given its ``max_tasks_per_child`` items already?"""
        if not self.max_tasks_per_child:
            return False
        queued = sum(unit.count for _, unit in slot.inflight)
        return slot.tasks + queued >= self.max_tasks_per_child

    def _loop(self, job) -> None:
        while not job.finished:
            self._check_restarts()
            self._assign(job)
            if job.finished:
                break
            timeout = 0.5
            now = time.monotonic()
            deadlines = [s.deadline for s in self.slots if s.deadline is not None]
            if deadlines:
                timeout = max(0.0, min(timeout, min(deadlines) - now))
            self._pump(job, timeout)
            self._check_deadlines(job)
            self._check_restarts()
        if getattr(job, "failure", None) is not None:
            self._abandon(job, grace=0.5)

    def _pump(self, job, timeout: float) -> None:
        """Wait for and handle whatever the workers say, or their deaths."""
        conns = {s.conn: s for s in self.slots}
        sentinels = {s.proc.sentinel: s for s in self.slots}
        ready = wait(list(conns) + list(sentinels), timeout)
        dead = []
        for r in ready:
            if r in conns:
                slot = conns[r]
                if not self._drain(slot, job):
                    dead.append(slot)
            else:
                dead.append(sentinels[r])
        for slot in dict.fromkeys(dead):
            if slot in self.slots:
                self._drain(slot, job)
                self._lost(slot, job)

    def _drain(self, slot: _Slot, job, seconds: float | None = None) -> bool:
        """Handle every message waiting on this worker's pipe. False on EOF.

        ``seconds`` bounds the time spent, for a worker that keeps talking.
        """
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            while slot.conn.poll():
                self._handle(slot, pickle.loads(slot.conn.recv_bytes()), job)
                if deadline is not None and time.monotonic() > deadline:
                    break
        except (EOFError, OSError):
            return False
        return True

    def _handle(self, slot: _Slot, msg: tuple, job) -> None:
        kind = msg[0]
        if kind == "ready":
            slot.ready = True
            self._startup_failures = 0
            slot.pid = msg[1]
            return
        call, tag = msg[1], msg[2]
        current = job is not None and call == job.call_id
        if kind == "out":
            if current:
                job.output(tag, msg[3], msg[4])
            return
        # A reply: it answers the oldest unit in flight on this worker.
        if not slot.inflight or slot.inflight[0][1].id != tag or slot.inflight[0][0] != call:
            return _discard(msg)  # a reply for a unit we already gave up on
        _, unit = slot.inflight.popleft()
        slot.deadline = time.monotonic() + job.timeout if (current and job.timeout and slot.inflight) else None
        if not current:
            return _discard(msg)
        if kind == "done":
            slot.tasks += unit.count
            self.tasks_run += unit.count
            meta = msg[5] if len(msg) > 5 else None  # who ran it and when (newer workers)
            job.done(unit, msg[3], msg[4], meta)
        elif kind == "error":
            slot.tasks += unit.count
            self.tasks_run += unit.count
            job.error(unit, msg[3], msg[4], msg[5], msg[6])
        elif kind == "unpicklable":
            job.unpicklable(unit, msg[3], msg[4])
        elif kind == "missing":
            slot.known.discard(msg[3])
            job.requeue(unit)

    def _send_unmaps(self) -> None:
        """Tell every worker which shared-memory segments the notebook destroyed."""
        names = shm.take_unmapped()
        if not names:
            return
        msg = pickle.dumps(("unmap", names), payload.PROTOCOL)
        for slot in self.slots:
            try:
                slot.conn.send_bytes(msg)
            except OSError:
                pass  # a dead worker: its mappings went with it

    def _lost(self, slot: _Slot, job) -> None:
        """A worker died: blame its running unit, send the queued ones again."""
        slot.proc.join(0.1)
        shm.sweep_worker(slot.pid)  # results it made but never handed over
        code = slot.proc.exitcode
        reason = describe_exitcode(code)
        inflight = list(slot.inflight)
        slot.inflight.clear()
        # A start-up death right after an interrupt is that interrupt, not a broken setup.
        interrupted = time.monotonic() - getattr(self, "_interrupted_at", float("-inf")) < 5
        if not slot.ready and time.monotonic() - slot.started < 30 and not inflight and not interrupted:
            self._startup_failures = getattr(self, "_startup_failures", 0) + 1
            if self._startup_failures >= 3:
                self._kill(slot)
                raise MPMagicError(
                    f"worker processes die while starting (the last {reason}); "
                    f"check that `python -c 'import mpmagic'` works, or try another start method"
                )
        else:
            self._startup_failures = 0
        self._replace(slot)
        if job is None:
            return
        for i, (call, unit) in enumerate(inflight):
            if call != job.call_id:
                continue
            if i == 0:
                job.lost(unit, reason, index=_position(slot))
            else:
                job.requeue(unit)

    def _check_deadlines(self, job) -> None:
        now = time.monotonic()
        for slot in list(self.slots):
            if slot.deadline is not None and now >= slot.deadline and slot.inflight:
                call, unit = slot.inflight[0]
                rest = list(slot.inflight)[1:]
                slot.inflight.clear()
                self._replace(slot)
                if call == job.call_id:
                    job.lost(unit, "ran past its timeout", timed_out=True, index=_position(slot))
                for c, u in rest:
                    if c == job.call_id:
                        job.requeue(u)

    def _check_restarts(self) -> None:
        """Recycle workers that reached ``max_tasks_per_child`` once they are idle."""
        if not self.max_tasks_per_child:
            return
        for slot in list(self.slots):
            if not slot.busy and slot.tasks >= self.max_tasks_per_child:
                self._retire(slot)
                if not slot.temporary:
                    self.slots.append(self._spawn())

    def _abandon(self, job, grace: float = 0.0) -> None:
        """Stop work of ``job`` still running: wait up to ``grace``, then kill."""
        deadline = time.monotonic() + grace
        while grace and any(c == job.call_id for s in self.slots for c, _ in s.inflight):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self._pump(None, min(left, 0.1))
            except MPMagicError:
                break
        for slot in list(self.slots):
            if any(c == job.call_id for c, _ in slot.inflight):
                self._drain(slot, job, seconds=0.2)  # show what it printed before we stop it
                self._replace(slot)


def _position(slot: _Slot) -> int | None:
    """Which item of its chunk a (now stopped) worker was running, if known."""
    value = slot.position.value if slot.position is not None else -1
    return value if value >= 0 else None


def _discard(msg: tuple) -> None:
    """Drop a stale reply; results it left in shared memory are unlinked."""
    if msg[0] == "done" and len(msg) > 3 and isinstance(msg[3], bytes):
        try:
            payload.loads(msg[3])
        except Exception:
            pass


def _reap_later(proc) -> None:
    """Collect a stopped process's exit status without blocking the notebook."""

    def reap() -> None:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        shm.sweep_worker(proc.pid)  # results it made but never handed over

    threading.Thread(target=reap, daemon=True, name="mpmagic-reaper").start()
