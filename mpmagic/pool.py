"""The one managed pool of a notebook: which backend, its lifecycle, its status.

There is one current backend per process. It is created on first use (or by
``start_pool``), reused by every call while it is warm, switched between the
local processes and a Dask cluster with ``use_local`` / ``use_dask``, and
stopped at unload and interpreter exit.
"""

from __future__ import annotations

import html
import threading
from typing import Any

from .backends.base import Backend
from .backends.local import LocalBackend
from .errors import UsageError
from .report import fmt_seconds

_lock = threading.RLock()
_backend: Backend | None = None


def get_pool() -> Backend:
    """The current backend, created (not yet started) on first use."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = LocalBackend(max_memory=_max_memory)
        return _backend


def current_pool() -> Any | None:
    """The current backend, or None when none was made yet."""
    return _backend


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

#: The local pool's per-worker memory limit in bytes (``max_memory``), kept for pools made later.
_max_memory: int | None = None


def parse_memory(value: int | str | None) -> int | None:
    """Bytes from ``2GB``, ``512 MiB``, ``1.5g`` or a whole number of bytes; None for no limit."""
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, bool):
        raise UsageError(f"max_memory must be a size such as '2GB', not {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):]
        try:
            n = int(float(digits) * _UNITS[unit])
        except (ValueError, KeyError):
            raise UsageError(f"max_memory must be a size such as '2GB' or '512MiB', not {value!r}") from None
    if n <= 0:
        raise UsageError(f"max_memory must be more than 0 bytes, not {value!r}")
    return n


def set_max_memory(value: int | str | None) -> None:
    """A worker holding more than ``value`` after a task is replaced before its next one."""
    global _max_memory
    with _lock:
        _max_memory = parse_memory(value)
        if isinstance(_backend, LocalBackend):
            _backend.max_memory = _max_memory


def start_pool(
    workers: int | None = None,
    start_method: str | None = None,
    max_tasks_per_child: int | None = None,
    wait: bool = False,
    max_memory: int | str | None = None,
) -> Any:
    """Start (or re-create, if its settings change) the local pool.

    ``max_memory`` (bytes, or a size such as ``"2GB"``): a worker holding more
    after a task is replaced before its next task.
    """
    global _backend
    if max_memory is not None:
        set_max_memory(max_memory)
    with _lock:
        old = _backend
        if isinstance(old, LocalBackend):
            same_method = start_method in (None, old.start_method)
            if same_method and max_tasks_per_child in (None, old.max_tasks_per_child):
                if workers is not None and workers != old.workers:
                    old.resize(workers)
                old.start()
                if wait:
                    old.wait_ready()
                return old
        elif old is not None and start_method is None and max_tasks_per_child is None:
            # Another backend (Dask): start it again rather than switch away from it.
            if workers is not None and workers != old.workers:
                old.resize(workers)
            old.start()
            return old
        new = LocalBackend(workers, start_method, max_tasks_per_child, max_memory=_max_memory)
        if old is not None:
            old.stop()
        _backend = new
        new.start()
        if wait:
            new.wait_ready()
        return new


def stop_pool() -> None:
    """Stop the workers; the next call starts them again."""
    with _lock:
        if _backend is not None:
            _backend.stop()


def restart_pool(wait: bool = True) -> Any:
    """Stop and start again with the same settings (clears workers' state)."""
    with _lock:
        backend = get_pool()
        backend.restart()
        return backend


def use_local(
    workers: int | None = None, start_method: str | None = None, max_tasks_per_child: int | None = None
) -> Any:
    """Switch back to processes on this machine (stops a Dask backend)."""
    global _backend
    with _lock:
        if _backend is not None and not isinstance(_backend, LocalBackend):
            _backend.stop()
            _backend = None
        return start_pool(workers, start_method, max_tasks_per_child)


def use_dask(address: str | None = None, **options: Any) -> Any:
    """Run on Dask: a new local cluster, or the scheduler at ``address``.

    ``address`` is ``tcp://host:8786`` or ``tls://...``; without it (and
    without ``scheduler_file``) a local cluster of worker processes starts.
    Options: ``workers`` (size of the local cluster; with an address, wait
    until that many workers joined), ``scheduler_file`` (connect to the
    scheduler it describes), ``tls_ca_file``/``tls_cert``/``tls_key`` (for
    ``tls://``), ``timeout`` (seconds to wait for the scheduler, default 10).
    A scheduler that cannot be reached in time is an error and the current
    pool stays. See docs/dask.md.
    """
    global _backend
    try:
        from .backends.dask import DaskBackend
    except ImportError as exc:
        raise UsageError(
            f"the Dask backend needs dask.distributed ({exc}); install it with: pip install \"mpmagic[dask]\""
        ) from None
    with _lock:
        new = DaskBackend(address, **options)
        if _backend is not None:
            _backend.stop()
        _backend = new
        return new


def shutdown() -> None:
    """Stop and forget the current backend (extension unload)."""
    global _backend
    with _lock:
        if _backend is not None:
            _backend.stop()
        _backend = None


class PoolStatus:
    """What ``%pool`` shows: a text block in a terminal, a table in Jupyter."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def lines(self) -> list[str]:
        i = self.info
        if i.get("backend") == "dask":
            from .backends.dask import describe_status

            return describe_status(i)
        if i.get("backend") != "local":
            head = [f"pool: {i.get('backend')} backend"]
            head += [f"  {k}: {v}" for k, v in i.items() if k not in ("backend", "processes")]
            for p in i.get("processes", []):
                head.append("  " + ", ".join(f"{k}={v}" for k, v in p.items()))
            return head
        state = "running" if i["running"] else "stopped (starts on first use)"
        out = [
            f"pool: local, {i['workers']} workers, start method {i['start_method']}, {state}",
            f"  calls run: {i['calls_run']}, tasks run: {i['tasks_run']}, workers replaced: {i['workers_replaced']}"
            + (f", max tasks per child: {i['max_tasks_per_child']}" if i.get("max_tasks_per_child") else ""),
        ]
        for p in i["processes"]:
            mem = "-" if p["rss"] is None else f"{p['rss'] / 2**20:.0f} MB"
            flags = "busy" if p["busy"] else ("idle" if p["ready"] else "starting")
            if not p["alive"]:
                flags = "dead"
            out.append(f"  worker {p['id']}: pid {p['pid']}, {flags}, {p['tasks']} tasks, {mem}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        """In Jupyter: the summary as a caption, one table row per worker process."""
        i = self.info
        lines = self.lines()
        procs = i.get("processes") or []
        th = "padding:2px 10px;text-align:left;font-weight:600"
        td = "padding:2px 10px;text-align:left"
        if i.get("backend") != "local":
            cols = list(dict.fromkeys(k for p in procs for k in p))
            rows = [[_cell(k, p.get(k)) for k in cols] for p in procs]
            notes = [x.strip() for x in lines[1:len(lines) - len(procs)]]  # process lines come last
        else:
            cols = ["worker", "pid", "state", "tasks", "memory"]
            rows = []
            for p in procs:
                state = "dead" if not p["alive"] else ("busy" if p["busy"] else ("idle" if p["ready"] else "starting"))
                mem = "-" if p["rss"] is None else f"{p['rss'] / 2**20:.0f} MB"
                rows.append([str(p["id"]), str(p["pid"]), state, str(p["tasks"]), mem])
            notes = [lines[1].strip()] if len(lines) > 1 else []
        head = "".join(f"<th style='{th}'>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td style='{td}'>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows)
        foot = "".join(f"<tr><td colspan='{max(1, len(cols))}' style='{td}'>{html.escape(n)}</td></tr>" for n in notes)
        return (
            f"<table class='mpmagic-pool'><caption style='text-align:left'><b>{html.escape(lines[0])}</b></caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody><tfoot>{foot}</tfoot></table>"
        )


def _cell(key: str, value: Any) -> str:
    """A status value for the HTML table: memory in MB, nothing for None."""
    if value is None:
        return "-"
    if "memory" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value / 2**20:.0f} MB"
    return str(value)


def pool_status() -> PoolStatus:
    """Status of the current backend (does not start it)."""
    return PoolStatus(get_pool().status())


__all__ = [
    "get_pool",
    "start_pool",
    "stop_pool",
    "restart_pool",
    "use_local",
    "use_dask",
    "pool_status",
    "PoolStatus",
    "fmt_seconds",
]
