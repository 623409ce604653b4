"""What runs inside a Dask worker for mpmagic. It imports no IPython.

Dask pickles a task's function by reference, so the function every mpmagic
task runs must live in a module the workers can import: this one. It takes
the same message a local worker gets (``job.message(unit)``, see
``mpmagic/worker.py``) and answers with the same reply tuples, so
``jobs.py`` cannot tell the backends apart:

* the notebook function travels once per worker (its payload bytes are the
  result of a :func:`hold` task every chunk depends on); the loaded function
  is cached here by its content key, so later chunks only name it;
* map chunks run through :func:`mpmagic.worker.run_items`, cells through
  :func:`mpmagic.cell.run_cell_code`, errors become
  :class:`mpmagic.worker.ErrorInfo` exactly as in a local worker;
* what a task prints is captured per thread (a Dask worker may run several
  tasks at once) and streamed home in whole lines as Dask events
  (``log_event``); the rest comes back with the result, with the count of
  lines already streamed so the notebook can wait for stragglers.
"""

from __future__ import annotations

import io
import signal
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

from .. import payload, worker_logging
from ..worker import ErrorInfo, _first_unpicklable, run_items

_CACHE_SIZE = 16  # loaded functions kept per worker process
_FLUSH_INTERVAL = 0.1  # seconds between streamed output events of one task
_funcs: OrderedDict[bytes, Any] = OrderedDict()
_funcs_lock = threading.Lock()


# --------------------------------------------------------------------------
# Output: per-thread capture of sys.stdout / sys.stderr


class _TaskOutput:
    """The captured output of one running task, streamed as Dask events."""

    def __init__(self, topic: str | None, tag: Any) -> None:
        self.topic = topic
        self.tag = tag
        self.worker = _current_worker()  # the flusher thread has no worker context
        self.buf: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.last = time.monotonic()
        self.streamed = 0
        self.lock = threading.Lock()

    def write(self, stream: str, text: str) -> None:
        with self.lock:
            self.buf[stream].append(text)
            if "\n" in text and self.topic and time.monotonic() - self.last > _FLUSH_INTERVAL:
                self._stream_lines()

    def _stream_lines(self) -> None:
        for stream, parts in self.buf.items():
            text = "".join(parts)
            cut = text.rfind("\n") + 1
            if not cut:
                continue
            self.buf[stream] = [text[cut:]] if cut < len(text) else []
            if _log_event(self.topic, {"tag": self.tag, "stream": stream, "text": text[:cut]}, self.worker):
                self.streamed += 1
            else:  # not in a Dask worker: keep it for the reply
                self.buf[stream].insert(0, text[:cut])
        self.last = time.monotonic()

    def flush_due(self) -> None:
        """Stream complete lines that waited out the rate limit (flusher thread)."""
        with self.lock:
            if self.topic and time.monotonic() - self.last > _FLUSH_INTERVAL:
                if any("\n" in part for parts in self.buf.values() for part in parts):
                    self._stream_lines()

    def rest(self) -> list[tuple[str, str]]:
        """What was not streamed yet, to travel home with the result."""
        with self.lock:
            out = [(s, "".join(p)) for s, p in self.buf.items() if p]
            self.buf = {"stdout": [], "stderr": []}
            return [(s, t) for s, t in out if t]


class _ThreadRouter(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` stand-in: a task thread's writes go to its
    :class:`_TaskOutput`, every other thread's to the real stream."""

    def __init__(self, stream: str, real: Any) -> None:
        self.stream = stream
        self.real = real
        self.captures: dict[int, _TaskOutput] = {}

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        cap = self.captures.get(threading.get_ident())
        if cap is None:
            return self.real.write(s)
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        cap.write(self.stream, s)
        return len(s)

    def flush(self) -> None:
        if threading.get_ident() not in self.captures:
            try:
                self.real.flush()
            except Exception:
                pass

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")


_install_lock = threading.Lock()


_flusher: threading.Thread | None = None


def _flush_loop() -> None:
    """Stream lines a task printed and then went quiet after (a long computation)."""
    while True:
        time.sleep(_FLUSH_INTERVAL)
        router = sys.stdout
        if isinstance(router, _ThreadRouter):
            for output in list(router.captures.values()):
                try:
                    output.flush_due()
                except Exception:
                    pass


def _routers() -> tuple[_ThreadRouter, _ThreadRouter]:
    """Install the routers once per process (again if someone replaced them)."""
    global _flusher
    with _install_lock:
        if _flusher is None:
            _flusher = threading.Thread(target=_flush_loop, name="mpmagic-output", daemon=True)
            _flusher.start()
        if not isinstance(sys.stdout, _ThreadRouter):
            sys.stdout = _ThreadRouter("stdout", sys.stdout)
        if not isinstance(sys.stderr, _ThreadRouter):
            sys.stderr = _ThreadRouter("stderr", sys.stderr)
        return sys.stdout, sys.stderr  # type: ignore[return-value]


class _capture:
    """Route this thread's prints into a :class:`_TaskOutput` while a task runs."""

    def __init__(self, topic: str | None, tag: Any) -> None:
        self.output = _TaskOutput(topic, tag)

    def __enter__(self) -> _TaskOutput:
        self.routers = _routers()
        ident = threading.get_ident()
        for r in self.routers:
            r.captures[ident] = self.output
        return self.output

    def __exit__(self, *exc: Any) -> None:
        ident = threading.get_ident()
        for r in self.routers:
            r.captures.pop(ident, None)


def _current_worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except Exception:
        return None


def _log_event(topic: str | None, msg: dict, worker: Any = None) -> bool:
    worker = worker or _current_worker()
    if not topic or worker is None:
        return False
    try:
        worker.log_event(topic, msg)
        return True
    except Exception:
        return False


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:
        return None


# --------------------------------------------------------------------------
# The task


def hold(data: bytes) -> bytes:
    """The function payload as a task result: every chunk depends on it, so each
    worker fetches it once, and Dask recomputes it if its holders die."""
    return data


def _function(key: bytes, data: bytes) -> Any:
    """The notebook function for ``key``, loaded from ``data`` on first use."""
    with _funcs_lock:
        func = _funcs.get(key)
        if func is not None:
            _funcs.move_to_end(key)
            return func
    try:
        func = payload.loads(data)
    except BaseException as exc:  # reported by every chunk that needs it
        func = ErrorInfo(exc)
    with _funcs_lock:
        _funcs[key] = func
        while len(_funcs) > _CACHE_SIZE:
            _funcs.popitem(last=False)
    return func


def run_message(msg: tuple, func_payload: bytes | None, topic: str | None, tag: Any) -> tuple:
    """Run one unit of a job in this Dask worker; return a worker-style reply.

    ``msg`` is ``job.message(unit)``; ``func_payload`` the function's bytes
    (a future of the :func:`hold` task on the notebook side, its bytes here); ``topic`` the
    Dask event topic that streams output and the start signal; ``tag`` the
    unit's id. The reply is ``(kind, fields..., output_rest, n_streamed)``
    with ``kind`` one of ``done``, ``error``, ``unpicklable``.
    """
    _log_event(topic, {"tag": tag, "start": True})
    with _capture(topic, tag) as out:
        ctx = msg[8] if msg[0] == "map" and len(msg) > 8 else msg[5] if msg[0] == "cell" and len(msg) > 5 else None
        levels, first = worker_logging.unpack(ctx)
        worker_logging.begin(levels, first)  # the task's logging and warnings go home too
        try:
            reply = _run_map(msg, func_payload) if msg[0] == "map" else _run_cell(msg)
        finally:
            worker_logging.end()
    return reply + (out.rest(), out.streamed)


def _run_map(msg: tuple, func_payload: bytes | None) -> tuple:
    _, _call, _chunk, key, star, collect, items_bytes = msg[:7]
    timing = len(msg) > 7 and bool(msg[7])
    func = _function(key, func_payload or b"")
    if isinstance(func, ErrorInfo):
        return ("error", -1, func, b"", 0.0)
    try:
        items = payload.loads(items_bytes)
    except BaseException as exc:
        return ("error", -1, ErrorInfo(exc), b"", 0.0)
    start = time.time()
    t0 = time.perf_counter()
    timed = None
    if timing:
        from .. import worker

        timed = getattr(worker, "run_items_timed", None)
    if timed is not None:
        results, seconds, error, item_seconds = timed(func, items, star, collect)
    else:
        results, seconds, error = run_items(func, items, star, collect)
        item_seconds = None
    meta: dict[str, Any] = {"worker": _worker_address(), "start": start, "end": start + (time.perf_counter() - t0)}
    if item_seconds is not None:
        meta["item_seconds"] = item_seconds
    try:
        data = payload.dumps_data(results)
    except Exception as exc:
        return ("unpicklable", _first_unpicklable(results), ErrorInfo(exc))
    if error is None:
        return ("done", data, seconds, meta)
    return ("error", error[0], error[1], data, seconds)


def _run_cell(msg: tuple) -> tuple:
    from ..cell import run_cell_code

    _, _call, rank, size, data = msg[:5]
    start = time.time()
    t0 = time.perf_counter()
    try:
        spec = payload.loads(data)
        value, gathered = run_cell_code(spec, rank, size)
        seconds = time.perf_counter() - t0
    except BaseException as exc:
        return ("error", -1, ErrorInfo(exc), b"", 0.0)
    try:
        out = payload.dumps_data((value, gathered))
    except Exception as exc:
        return ("unpicklable", None, ErrorInfo(exc))
    return ("done", out, seconds, {"worker": _worker_address(), "start": start, "end": start + seconds})


# --------------------------------------------------------------------------
# Worker set-up for clusters mpmagic starts itself


def ignore_sigint() -> None:
    """Make this worker process ignore SIGINT.

    The worker processes of a ``LocalCluster`` share the kernel's process
    group, and Jupyter's "interrupt kernel" signals the whole group: without
    this, an interrupt would kill them instead of cancelling the futures.
    Runs on the worker's event loop, which is its main thread.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


try:
    from distributed.diagnostics.plugin import WorkerPlugin

    class IgnoreSigint(WorkerPlugin):
        """Applies :func:`ignore_sigint` to every worker, restarted ones included."""

        name = "mpmagic-ignore-sigint"

        def setup(self, worker: Any) -> None:
            ignore_sigint()

except ImportError:  # pragma: no cover - only imported where distributed is
    IgnoreSigint = None  # type: ignore[assignment,misc]
