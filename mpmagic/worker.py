"""The loop that runs in a worker process. It imports no IPython.

A worker talks to the notebook over one duplex pipe (a socketpair made by
``multiprocessing``; nothing listens on a network port). A reader thread moves
incoming messages into a local queue at once, so the notebook never blocks on
a busy worker, and it notices when the notebook process goes away. The main
thread runs tasks one after another:

* ``("func", key, payload)``: cache a cloudpickled function under its key.
* ``("map", call, chunk, key, star, collect, items[, timing[, block]])``: run
  the function over a chunk of items (``block``: see :func:`run_items`),
  reply ``("done", call, chunk, results, seconds, meta)`` or ``("error", ...)``.
  ``meta`` says which worker ran the chunk and when (``worker``, ``start``,
  ``end``, epoch seconds) and its CPU seconds (``cpu``); with ``timing`` it
  also holds the chunk's slowest items (index, seconds) and the (un)pickling
  time.
* ``("cell", call, rank, size, payload)``: run a ``%%parallel`` cell body.
* ``("import", [names])``: import modules the notebook uses, between tasks
  (warm workers, see ``warmup.py``); imports done during a run go home in
  the next reply's ``meta["once"]``.
* ``("stop",)``: exit.

What a task prints is captured and sent home as ``("out", call, tag, stream,
text)`` in whole lines, so it shows in the cell that ran it. Workers ignore
SIGINT: the notebook decides what an interrupt cancels.
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from heapq import nlargest
from itertools import starmap
from operator import itemgetter
from typing import Any

from . import payload, shm
from .errors import SerializationError, extract_frames
from .warmup import ImportLog  # warm: imports the notebook asks for, imports a task caused

_CACHE_SIZE = 16  # function payloads kept per worker
_TOP_ITEMS = 5  # --insights: per chunk, the slowest items whose times are sent home
_FLUSH_INTERVAL = 0.05  # seconds between streamed output messages


class ErrorInfo:
    """A task's exception in a form that always survives the trip home."""

    __slots__ = ("exc_bytes", "type_name", "message", "exc_text", "frames")

    def __init__(self, exc: BaseException) -> None:
        self.type_name = type(exc).__qualname__
        self.message = str(exc)
        self.exc_text = "".join(traceback.format_exception_only(type(exc), exc))
        self.frames = extract_frames(exc.__traceback__)
        try:
            self.exc_bytes: bytes | None = payload.dumps_data(exc)
            pickle.loads(self.exc_bytes)  # must load again, or send the text only
        except Exception:
            self.exc_bytes = None

    def __getstate__(self):
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state):
        for s, v in zip(self.__slots__, state, strict=True):
            setattr(self, s, v)


class _Channel:
    """The worker's end of the pipe: thread-safe sends of pickled tuples."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        data = pickle.dumps(msg, payload.PROTOCOL)
        with self.lock:
            self.conn.send_bytes(data)


class _StreamToParent(io.TextIOBase):
    """A ``sys.stdout``/``sys.stderr`` stand-in that sends whole lines home."""

    def __init__(self, channel: _Channel, stream: str) -> None:
        self.channel = channel
        self.stream = stream
        self.call: Any = None
        self.tag: Any = None
        self.buf: list[str] = []
        self.last = 0.0
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        with self.lock:
            self.buf.append(s)
            if "\n" in s and time.monotonic() - self.last > _FLUSH_INTERVAL:
                self._send_lines()
        return len(s)

    def _send_lines(self) -> None:
        text = "".join(self.buf)
        cut = text.rfind("\n") + 1
        self.buf = [text[cut:]] if cut < len(text) else []
        if cut:
            self.channel.send(("out", self.call, self.tag, self.stream, text[:cut]))
        self.last = time.monotonic()

    def flush(self) -> None:
        with self.lock:
            self._send_lines()

    def flush_stale(self) -> None:
        """Send complete lines that have waited longer than the flush interval.

        Without this, a line printed just before a long computation would
        stay here until the task ends (or be lost if it is interrupted).
        """
        with self.lock:
            if self.buf and time.monotonic() - self.last > _FLUSH_INTERVAL:
                self._send_lines()

    def finish(self) -> None:
        """Send everything, a final partial line included."""
        with self.lock:
            text = "".join(self.buf)
            self.buf = []
            if text:
                self.channel.send(("out", self.call, self.tag, self.stream, text))


def run_items(func, items: list, star: bool, collect: bool, position: Any = None, block: int = 1):
    """Run ``func`` over a chunk of items.

    Returns ``(results, seconds, error)``: ``error`` is ``(index, ErrorInfo)``
    for the first failing item (its results so far are kept), or None. With
    ``collect`` a failing item's place holds its ErrorInfo and the chunk goes on.
    ``position`` (shared memory the notebook reads if this process dies) is
    set to the index of the running item, so a crash blames that item; with
    ``block`` > 1 (the notebook asks for it when items take under a few
    microseconds) it is set once per ``block`` items, to the first of them,
    and the notebook re-runs that block one item at a time to find the culprit.
    """
    results: list = []
    extend, append = results.extend, results.append
    n = len(items)
    mapper = starmap if star else map
    # The index of the running item, written straight into the shared word
    # (a memoryview store costs less than the ctypes attribute).
    pos = memoryview(position).cast("B").cast("q") if position is not None else None
    t0 = time.perf_counter()
    while len(results) < n:
        # The calls run in C (list.extend over map), not in a bytecode loop:
        # that loop and its per-item store were most of the cost of tiny items.
        # When a call raises, extend keeps the results so far, so the failing
        # item is the number of results.
        try:
            start = len(results)
            if pos is None:
                extend(mapper(func, items[start:] if start else items))
            elif block > 1:
                for s in range(start, n, block):
                    pos[0] = s
                    extend(mapper(func, items[s : s + block]))
            elif star:
                for i in range(start, n):
                    pos[0] = i
                    append(func(*items[i]))
            else:
                for i in range(start, n):
                    pos[0] = i
                    append(func(items[i]))
        except Exception as exc:
            i = len(results)
            info = ErrorInfo(exc)
            if not collect:
                return results, time.perf_counter() - t0, (i, info)
            append(info)
    return results, time.perf_counter() - t0, None


def run_items_timed(func, items: list, star: bool, collect: bool, position: Any = None):
    """:func:`run_items` that also returns each item's seconds (for ``--insights``).

    A separate function so that the ordinary path pays nothing for it.
    """
    results: list = []
    times: list[float] = []
    clock = time.perf_counter
    t0 = clock()
    for i, item in enumerate(items):
        if position is not None:
            position.value = i
        t = clock()
        try:
            results.append(func(*item) if star else func(item))
        except Exception as exc:
            times.append(clock() - t)
            info = ErrorInfo(exc)
            if not collect:
                return results, clock() - t0, (i, info), times
            results.append(info)
            continue
        times.append(clock() - t)
    return results, clock() - t0, None, times


def _watch_parent(parent_pid: int) -> None:
    """Exit when the notebook process is gone, even in the middle of a task."""
    first_ppid = os.getppid()
    while True:
        time.sleep(0.25)
        gone = os.getppid() != first_ppid
        if not gone:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                gone = True
            except PermissionError:
                pass
        if gone:
            _exit_notebook_gone(parent_pid, 3)


def _exit_notebook_gone(parent_pid: int, code: int) -> None:
    """Leave at once; if the notebook died, remove its shared memory first.

    A notebook unlinks its ``mpm_<pid>_*`` segments at pool stop and exit, but
    a kernel killed with SIGKILL cannot: its workers outlive it briefly and
    sweep them, so nothing stays in /dev/shm.
    """
    # The pipe closes while a killed process is still being torn down: give
    # it a moment to become a zombie (or vanish) before deciding.
    deadline = time.monotonic() + 1.0
    alive = shm.pid_alive(parent_pid)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = shm.pid_alive(parent_pid)
    if not alive:
        try:
            names = os.listdir("/dev/shm")
        except OSError:
            names = []
        for name in names:
            if name.startswith(f"mpm_{parent_pid}_"):
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except OSError:
                    pass
    os._exit(code)


def _flush_stale_output(streams: tuple[_StreamToParent, ...]) -> None:
    """Stream a task's printed lines home while it runs, not only when it ends."""
    while True:
        time.sleep(_FLUSH_INTERVAL * 2)
        try:
            for s in streams:
                s.flush_stale()
        except (OSError, ValueError):
            return  # the pipe is gone; the reader thread ends the process


def _reader(conn, inbox: queue.SimpleQueue, parent_pid: int) -> None:
    try:
        while True:
            inbox.put(conn.recv_bytes())
    except (EOFError, OSError):
        # The notebook closed the pipe or died: nothing more will come.
        _exit_notebook_gone(parent_pid, 0)


class _Worker:
    def __init__(self, conn, parent_pid: int, worker_id: int, position: Any = None) -> None:
        self.channel = _Channel(conn)
        self.worker_id = worker_id
        self._cpu_mark = time.process_time()  # see _cpu_since_last_reply
        self.position = position  # see run_items
        self.funcs: OrderedDict[bytes, Any] = OrderedDict()
        self.imports = ImportLog()  # warm: see warmup.py
        self.func_segments: dict[bytes, set[str]] = {}  # key -> shared segments it maps
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.out = _StreamToParent(self.channel, "stdout")
        self.err = _StreamToParent(self.channel, "stderr")
        threading.Thread(target=_reader, args=(conn, self.inbox, parent_pid), daemon=True).start()
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
        threading.Thread(target=_flush_stale_output, args=((self.out, self.err),), daemon=True).start()

    def _capture(self, call, tag) -> None:
        for s in (self.out, self.err):
            # last = 0: a task's first line goes home at once (then at most every
            # _FLUSH_INTERVAL), so it is seen even if the task is killed soon after.
            s.call, s.tag, s.last = call, tag, 0.0
        sys.stdout, sys.stderr = self.out, self.err

    def _release(self) -> None:
        self.out.finish()
        self.err.finish()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__

    def _cpu_since_last_reply(self) -> float:
        """CPU seconds this process used since the previous call: the task's, plus
        its (un)pickling. One clock read per chunk (a system call) keeps the fast
        path cheap."""
        now = time.process_time()
        used, self._cpu_mark = now - self._cpu_mark, now
        return used

    def serve(self) -> None:
        self.channel.send(("ready", os.getpid(), self.worker_id))
        while True:
            msg = pickle.loads(self.inbox.get())
            kind = msg[0]
            if kind == "stop":
                return
            if kind == "func":
                self.load_function(msg[1], msg[2])
            elif kind == "map":
                self.run_map(*msg[1:])
            elif kind == "cell":
                self.run_cell(*msg[1:])
            elif kind == "unmap":
                self.unmap(msg[1])
            elif kind == "import":  # warm: modules the notebook imported
                self.imports.preload(msg[1])

    def load_function(self, key: bytes, data: bytes) -> None:
        shm.opened()
        mark, start, t0 = self.imports.mark(), time.time(), time.perf_counter()  # warm
        try:
            self.funcs[key] = payload.loads(data)
        except BaseException as exc:  # reported when the function is used
            self.funcs[key] = ErrorInfo(exc)
        spent = time.perf_counter() - t0  # warm: the first sending's cost here, imports included
        self.imports.load += spent
        self.imports.since(mark, "function", spent, start)
        segments = shm.opened()  # captured arrays mapped from shared memory
        if segments:
            self.func_segments[key] = segments
        while len(self.funcs) > _CACHE_SIZE:
            old, _ = self.funcs.popitem(last=False)
            self.func_segments.pop(old, None)

    def unmap(self, names: list) -> None:
        """The notebook destroyed these segments: drop them and the functions using them."""
        gone = set(names)
        for key, segs in list(self.func_segments.items()):
            if segs & gone:
                self.funcs.pop(key, None)
                del self.func_segments[key]
        shm.forget(names)

    def run_map(self, call, chunk, key, star, collect, items_bytes, timing=False, block=1) -> None:
        func = self.funcs.get(key)
        if func is None:
            self.channel.send(("missing", call, chunk, key))
            return
        self.funcs.move_to_end(key)
        if isinstance(func, ErrorInfo):
            self.channel.send(("error", call, chunk, -1, func, b"", 0.0))
            return
        t_load = time.perf_counter()
        if self.position is not None:
            self.position.value = -1  # a crash while loading blames no single item
        mark = self.imports.mark()  # warm: imports the items or the task cause
        try:
            items = payload.loads(items_bytes)
        except BaseException as exc:
            self.channel.send(("error", call, chunk, -1, ErrorInfo(exc), b"", 0.0))
            return
        start = time.time()
        if len(sys.modules) > mark:  # warm: unpickling the items imported modules (pandas...)
            self.imports.since(mark, "items", time.perf_counter() - t_load, start)
            mark = self.imports.mark()
        t_run = time.perf_counter()
        self._capture(call, chunk)
        try:
            if timing:
                results, seconds, error, item_seconds = run_items_timed(func, items, star, collect, self.position)
            else:
                results, seconds, error = run_items(func, items, star, collect, self.position, block)
        finally:
            self._release()
        end = start + (time.perf_counter() - t_run)
        cpu = self._cpu_since_last_reply()
        self.imports.since(mark, "task", None, start)  # warm: imports inside the function (time unknown)
        try:
            data = shm.dumps_result(results, payload.dumps_data)
        except Exception as exc:
            bad = _first_unpicklable(results)
            info = _unsendable_info(results[bad] if bad is not None else results, "result", exc)
            if not collect or bad is None:
                self.channel.send(("unpicklable", call, chunk, bad, info))
                return
            # --errors collect: only the results that cannot travel become failures.
            results = [_sendable_or_error(r) for r in results]
            data = payload.dumps_data(results)
        # cpu: this process's CPU seconds for the chunk (tells CPU-bound from waiting).
        meta: dict[str, Any] = {"worker": self.worker_id, "start": start, "end": end, "cpu": cpu}
        once = self.imports.take()  # warm: one-time costs since the last reply
        if once is not None:
            meta["once"] = once
        if timing:
            # Only the chunk's slowest items can matter to the notebook: (index, seconds) pairs.
            meta["item_top"] = nlargest(_TOP_ITEMS, enumerate(item_seconds), key=itemgetter(1))
            meta["items_timed"] = len(item_seconds)
            meta["transfer"] = (t_run - t_load) + (time.perf_counter() - t_run - (end - start))
        if error is None:
            self.channel.send(("done", call, chunk, data, seconds, meta))
        else:
            self.channel.send(("error", call, chunk, error[0], error[1], data, seconds))

    def run_cell(self, call, rank, size, data) -> None:
        from .cell import run_cell_code

        self._capture(call, rank)
        start = time.time()
        t0 = time.perf_counter()
        mark = self.imports.mark()  # warm: modules the cell's names need (imported by name)
        try:
            spec = payload.loads(data)
            self.imports.since(mark, "function", time.perf_counter() - t0, start)  # warm
            mark = self.imports.mark()
            value, gathered = run_cell_code(spec, rank, size)
            self.imports.since(mark, "task", None, start)  # warm: the cell's modules, imported by name
            seconds = time.perf_counter() - t0
            cpu = self._cpu_since_last_reply()
        except BaseException as exc:
            self._release()
            self.channel.send(("error", call, rank, -1, ErrorInfo(exc), b"", 0.0))
            return
        self._release()
        try:
            out = payload.dumps_data((value, gathered))
        except Exception as exc:
            culprit, root = value, "the cell's last value"
            for name, v in ([] if _first_unpicklable([value]) is not None else gathered.items()):
                if _first_unpicklable([v]) is not None:
                    culprit, root = v, f"--gather {name}"
                    break
            self.channel.send(("unpicklable", call, rank, None, _unsendable_info(culprit, root, exc)))
            return
        meta = {"worker": self.worker_id, "start": start, "end": start + seconds, "cpu": cpu}
        once = self.imports.take()  # warm: one-time costs since the last reply
        if once is not None:
            meta["once"] = once
        self.channel.send(("done", call, rank, out, seconds, meta))


def _unsendable_info(obj: Any, root: str, exc: BaseException) -> ErrorInfo:
    """An ErrorInfo whose text names the part of ``obj`` that cannot be pickled."""
    info = ErrorInfo(exc)
    info.exc_text = payload.describe_unpicklable(obj, root, exc)[0]
    return info


def _sendable_or_error(result: Any) -> Any:
    """The result itself if it can be sent home, else an ErrorInfo saying why not."""
    try:
        payload.dumps_data(result)
        return result
    except Exception as exc:
        text = payload.describe_unpicklable(result, "result", exc)[0]
        return ErrorInfo(SerializationError(
            f"the result cannot be sent back from the worker: {text}. Return plain data "
            "(numbers, strings, lists, dicts, numpy arrays) instead."
        ))


def _first_unpicklable(results: list) -> int | None:
    for i, r in enumerate(results):
        try:
            payload.dumps_data(r)
        except Exception:
            return i
    return None


def main(conn, parent_pid: int, worker_id: int, position: Any = None) -> None:
    """Entry point of a worker process (the target of ``Process``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # started with SIGINT blocked (see local.py)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    shm.NOTEBOOK_PID = parent_pid  # segments this worker makes carry the notebook's pid
    _Worker(conn, parent_pid, worker_id, position).serve()
