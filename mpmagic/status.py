"""What ``%pool`` shows: the status of the current backend, as text or an HTML table.

A backend's ``status()`` returns a plain dict (backend name, workers, per
process rows); :class:`PoolStatus` only formats it. It lives apart from
``pool.py`` (the pool's lifecycle) so that formatting needs no backend
import: ``pool.py`` imports the backends, and the backends never need this.

Memory is shown through :func:`mpmagic.fmt.fmt_bytes` everywhere, in the
decimal units ``max_memory="2GB"`` is parsed in, so a worker's use and its
limit read in the same units as the limit the user typed.
"""

from __future__ import annotations

import html
from typing import Any

from .fmt import fmt_bytes, fmt_seconds

_TH = "padding:2px 10px;text-align:left;font-weight:600"
_TD = "padding:2px 10px;text-align:left"


def _no_dashboard(info: dict[str, Any]) -> str:
    """What ``%pool`` says in place of a Dask dashboard link."""
    if info.get("dashboard_off"):
        return "none (the scheduler runs without one: started with --no-dashboard?)"
    return "not available (pip install bokeh)"


def dask_lines(info: dict[str, Any]) -> list[str]:
    """``%pool`` text lines for a Dask backend's status dict."""
    if info.get("owned"):  # the LocalCluster mpmagic started
        state = "running" if info.get("running") else "stopped (starts on first use)"
    else:
        state = "connected" if info.get("running") else "not connected (connects on first use)"
    out = [f"pool: dask, {info.get('cluster')}, {state}"]
    out.append(f"  scheduler: {info.get('scheduler') or '-'}")
    if info.get("running"):
        mem = info.get("memory_limit") or 0
        out.append(
            f"  workers: {info.get('workers')}, threads: {info.get('threads')}"
            + (f", memory limit: {fmt_bytes(mem)}" if mem else "")
        )
        out.append(f"  dashboard: {info.get('dashboard') or _no_dashboard(info)}")
    if info.get("error"):
        out.append(f"  {info['error']}")
    out.append(f"  calls run: {info.get('calls_run', 0)}, tasks run: {info.get('tasks_run', 0)}")
    for p in info.get("processes", []):
        limit = f" of {fmt_bytes(p['memory_limit'])}" if p.get("memory_limit") else ""
        busy = f", {p['executing']} running" if p.get("executing") else ""
        threads = p.get("threads", 0)
        out.append(f"  worker {p['address']}: {threads} thread{'s' if threads != 1 else ''}, {fmt_bytes(p.get('memory'))}{limit}{busy}"
                   + _extras(p))
    return out


def _local_lines(i: dict[str, Any]) -> list[str]:
    state = "running" if i["running"] else "stopped (starts on first use)"
    out = [
        f"pool: local, {_count(i['workers'], 'worker')}, start method {i['start_method']}, {state}",
        f"  calls run: {i['calls_run']}, tasks run: {i['tasks_run']}, workers replaced: {i['workers_replaced']}"
        + (f", max tasks per child: {i['max_tasks_per_child']}" if i.get("max_tasks_per_child") else "")
        + (f", max memory per worker: {fmt_bytes(i['max_memory'])} of its own" if i.get("max_memory") else ""),
    ]
    if i.get("preloaded"):  # warm workers (warmup.py): what they import because the notebook did
        out.append(f"  preloaded (the notebook's imports): {', '.join(i['preloaded'])}")
    for p in i["processes"]:
        out.append(f"  worker {p['id']}: pid {p['pid']}, {_state(p)}, {_count(p['tasks'], 'task')}, {fmt_bytes(p['rss'])} own memory"
                   + _extras(p))
    if i.get("kept"):
        out.append(f"  {i['kept']}")
    held = i.get("shm") or {}
    if any(held.values()):
        parts = [f"{fmt_bytes(held[k])} {label}" for k, label in _SHM_PARTS if held.get(k)]
        out.append(f"  shared memory (/dev/shm, RAM): {', '.join(parts)}")
    return out


# What a local backend's "shm" bytes are (shm.held), as %pool names them.
_SHM_PARTS = (
    ("captured", "copies of captured arrays (freed with the array or the function)"),
    ("pooled", "pooled for items"),
    ("shared", "share() arrays"),
)


def _extras(p: dict[str, Any]) -> str:
    """Worker setup state and GPU of a local worker (worker_setup.py), when there are any."""
    return "".join(f", {v}" for v in (p.get("setup"), p.get("gpu") and f"GPU {p['gpu']}") if v)


# A local worker listed beyond the pool's size (``leaving``), so that the heading's
# "1 worker" and two busy rows under it (a resize while both were busy) read as one story.
_LEAVING = {
    "resize": ", stops once idle (beyond the pool's size: %pool resize)",
    "ranks": ", stops once idle (an extra worker for a cell's ranks)",
}


def _state(p: dict[str, Any]) -> str:
    if not p["alive"]:
        return "dead"
    leaving = _LEAVING.get(p.get("leaving") or "", "")
    if p.get("stopped"):  # (SIGSTOP, a debugger: it runs nothing until resumed, kill -CONT PID)
        return "stopped (kill -CONT resumes it)" + (", holds work" if p["busy"] else "") + leaving
    return ("busy" if p["busy"] else ("idle" if p["ready"] else "starting")) + leaving


def _run_cells(r: dict[str, Any]) -> list[str]:
    """One background run's row: id, what, items done/total (with those from the
    checkpoint), elapsed, state (a call: no count)."""
    count = f"{r['done']}/{r['total']}" if r.get("total") is not None else str(r["done"])
    if r.get("unit") == "call":  # (mpmagic.call: one call, its state says it all)
        count = ""
    elif r.get("resumed"):
        count += f" ({r['resumed']} from the checkpoint)"
    if r.get("failed"):
        count += f" ({r['failed']} failed)"
    return [str(r["id"]), str(r["what"]), count, fmt_seconds(r["elapsed"]), str(r["state"])]


_RUN_COLUMNS = ["run", "what", "done/total", "elapsed", "state"]


def runs_lines(rows: list[dict[str, Any]]) -> list[str]:
    """``%pool runs`` as text: background and streamed runs, in flight and recently finished."""
    if not rows:
        return ["runs: none in the background (start one with %pmap --bg or mpmagic.submit)"]
    return ["runs:"] + [f"  {run_line(r)}" for r in rows]


def run_line(r: dict[str, Any]) -> str:
    """A run's row (``Run.info``) as one line, the one its handle's repr, ``%pool runs``
    and ``runs()`` show: ``run 1: pmap f, 30/60 items (20 from the checkpoint), 1 failed,
    310.2 ms, running`` (a call: ``run 2: call f, 1.2 s, failed``)."""
    if r.get("unit") == "call":
        return f"run {r['id']}: {r['what']}, {fmt_seconds(r['elapsed'])}, {r['state']}"
    count = f"{r['done']}/{r['total']}" if r.get("total") is not None else str(r["done"])
    resumed = f" ({r['resumed']} from the checkpoint)" if r.get("resumed") else ""
    failed = f", {r['failed']} failed" if r.get("failed") else ""
    return (f"run {r['id']}: {r['what']}, {count} {r.get('unit', 'items')}{resumed}{failed}, "
            f"{fmt_seconds(r['elapsed'])}, {r['state']}")


def runs_html(rows: list[dict[str, Any]]) -> str:
    """``%pool runs`` as an HTML table."""
    if not rows:
        return f"<div>{html.escape(runs_lines(rows)[0])}</div>"
    head = "".join(f"<th style='{_TH}'>{c}</th>" for c in _RUN_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td style='{_TD}'>{html.escape(v)}</td>" for v in _run_cells(r)) + "</tr>" for r in rows
    )
    return f"<table class='mpmagic-runs'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# The Dask status rows' keys as column headings (in this order), with units.
_DASK_COLUMNS = (
    ("address", "worker"),
    ("name", "name"),
    ("threads", "threads"),
    ("memory", "memory used"),
    ("memory_limit", "memory limit"),
    ("executing", "tasks running"),
    ("setup", "setup"),
)


class PoolStatus:
    """What ``%pool`` shows: a text block in a terminal, a table in Jupyter.

    ``notice`` is one line about what the command just did (``%pool local``
    says which backend it stopped), shown above the status.
    """

    def __init__(self, info: dict[str, Any], notice: str | None = None, runs: list[dict[str, Any]] | None = None) -> None:
        self.info = info
        self.notice = notice
        self.runs = runs or []  # background runs (``background.runs()`` rows), shown under the workers

    def lines(self) -> list[str]:
        """The status as text lines (without the notice): a heading, then details."""
        i = self.info
        if i.get("backend") == "dask":
            return dask_lines(i)
        if i.get("backend") == "local":
            return _local_lines(i)
        head = [f"pool: {i.get('backend')} backend"]
        head += [f"  {k}: {v}" for k, v in i.items() if k not in ("backend", "processes")]
        for p in i.get("processes", []):
            head.append("  " + ", ".join(f"{k}={v}" for k, v in p.items()))
        return head

    def __str__(self) -> str:
        runs = runs_lines(self.runs) if self.runs else []
        return "\n".join(([self.notice] if self.notice else []) + self.lines() + runs)

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        """In Jupyter: the heading on its own line (a caption would be squeezed to
        the table's width), one table row per worker process, the notes under them."""
        i = self.info
        lines = self.lines()
        if i.get("backend") == "dask":
            cols, rows, notes = self._dask_table()
        elif i.get("backend") == "local":
            cols = ["worker", "pid", "state", "tasks", "own memory"]
            rows = [[str(p["id"]), str(p["pid"]), _state(p), str(p["tasks"]), fmt_bytes(p["rss"])]
                    for p in i["processes"]]
            # Every line under the heading but the workers' own (they are the rows).
            notes = [html.escape(x.strip()) for x in lines[1:] if not x.startswith("  worker ")]
            for key in ("setup", "gpu"):  # worker setup (worker_setup.py): only when used
                if any(p.get(key) for p in i["processes"]):
                    cols.append(key)
                    for row, p in zip(rows, i["processes"], strict=True):
                        row.append(str(p.get(key) or "-"))
        else:
            procs = i.get("processes") or []
            cols = list(dict.fromkeys(k for p in procs for k in p))
            rows = [["-" if p.get(k) is None else str(p.get(k)) for k in cols] for p in procs]
            notes = [html.escape(x.strip()) for x in lines[1:len(lines) - len(procs)]]
        head = "".join(f"<th style='{_TH}'>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td style='{_TD}'>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows)
        foot = "".join(f"<tr><td colspan='{max(1, len(cols))}' style='{_TD}'>{n}</td></tr>" for n in notes)
        notice = f"<div>{html.escape(self.notice)}</div>" if self.notice else ""
        return (
            f"<div class='mpmagic-pool-status'>{notice}<div style='font-weight:600;white-space:nowrap'>"
            f"{html.escape(lines[0])}</div><table class='mpmagic-pool'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody><tfoot>{foot}</tfoot></table>{runs_html(self.runs) if self.runs else ''}</div>"
        )

    def _dask_table(self) -> tuple[list[str], list[list[str]], list[str]]:
        """Columns, rows and notes (HTML, the dashboard a link) of a Dask status."""
        i = self.info
        procs = i.get("processes") or []
        keys = [(k, label) for k, label in _DASK_COLUMNS if any(p.get(k) is not None for p in procs)]
        rows = []
        for p in procs:
            row = []
            for k, _ in keys:
                v = p.get(k)
                row.append(fmt_bytes(v) if k.startswith("memory") else ("-" if v is None else str(v)))
            rows.append(row)
        notes = [f"scheduler: {html.escape(str(i.get('scheduler') or '-'))}"]
        if i.get("running"):
            mem = i.get("memory_limit") or 0
            notes.append(
                f"workers: {i.get('workers')}, threads: {i.get('threads')}"
                + (f", memory limit: {fmt_bytes(mem)}" if mem else "")
            )
            link = i.get("dashboard")
            if link:
                url = html.escape(str(link), quote=True)
                notes.append(f"dashboard: <a href='{url}' target='_blank'>{html.escape(str(link))}</a>")
            else:
                notes.append(f"dashboard: {html.escape(_no_dashboard(i))}")
        if i.get("error"):
            notes.append(html.escape(str(i["error"])))
        notes.append(f"calls run: {i.get('calls_run', 0)}, tasks run: {i.get('tasks_run', 0)}")
        return [label for _, label in keys], rows, notes


__all__ = ["PoolStatus", "dask_lines", "runs_html", "runs_lines"]


def _count(n: int, noun: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
