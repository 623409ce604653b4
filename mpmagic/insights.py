"""``--insights``: where the time of one run went, per worker and per item.

While the run goes, a :class:`Recorder` collects what each reply's ``meta``
says (which worker ran the chunk or rank, when it started and ended, and,
because insights ask the worker to time each item, every item's seconds and
the (un)pickling time). At the end it becomes an :class:`Insights`:

* per worker: tasks run, busy time (running tasks), transfer time (unpickling
  arguments and pickling results), idle time (the rest of the run's wall time);
* the slowest items, each with a short repr of its arguments;
* a per-worker timeline of tasks (a Gantt-like chart with matplotlib, or a
  line of characters per worker without it).

Without insights none of this is measured per item, so ordinary runs pay nothing.
"""

from __future__ import annotations

import base64
import heapq
import html
import io
import time
from dataclasses import dataclass, field
from typing import Any

from .fmt import fmt_seconds
from .jobs import short_repr

TOP = 5  # slowest items kept


@dataclass
class Task:
    """One chunk (or rank) on the timeline: who ran it and when (epoch seconds)."""

    worker: Any
    start: float
    end: float
    first: int  # index of its first item (or the rank)
    count: int
    fate: str = ""  # "timed out" or "worker died": stopped before it finished (its worker lost)
    last: int = -1  # index of its last item (first + count - 1, unless renumbered: see Insights.renumber)

    def __post_init__(self) -> None:
        if self.last < 0:
            self.last = self.first + self.count - 1


@dataclass
class WorkerTime:
    """Where one worker's time went during the run."""

    worker: Any
    tasks: int = 0  # items (or ranks) it ran
    busy: float = 0.0
    transfer: float = 0.0
    idle: float = 0.0


@dataclass
class SlowItem:
    """One of the slowest items: its index, its seconds, and its arguments in short."""

    index: int
    seconds: float
    args: str
    worker: Any = None
    fate: str = ""  # "timed out", "worker died": its time is until it was stopped


class Recorder:
    """Collects per-chunk and per-item timings from the job's ``done`` replies."""

    def __init__(self, kind: str, func_name: str = "func", star: bool = False, top: int = TOP) -> None:
        self.kind = kind  # "pmap" or "parallel"
        self.func_name = func_name
        self.star = star
        self.top = top
        self.begin = time.time()
        self.tasks: list[Task] = []
        self.transfer: dict[Any, float] = {}
        self._heap: list[tuple[float, int, int, str, Any, str]] = []  # min-heap of the slowest
        self._seq = 0  # tie-breaker, so entries never compare their workers
        self.replaced = 0  # workers stopped (timeout) or dead under a task, and replaced

    def _args(self, item: Any) -> str:
        if self.star and isinstance(item, (tuple, list)):
            return f"{self.func_name}({', '.join(short_repr(a, 30) for a in item)})"
        return f"{self.func_name}({short_repr(item, 50)})"

    def _offer(self, seconds: float, index: int, item: Any, worker: Any, is_rank: bool = False, fate: str = "") -> None:
        if len(self._heap) >= self.top and seconds <= self._heap[0][0]:
            return
        text = f"rank {index}" if is_rank else self._args(item)
        self._seq += 1
        entry = (seconds, index, self._seq, text, worker, fate)
        if len(self._heap) < self.top:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def chunk(self, unit: Any, seconds: float, meta: dict | None) -> None:
        """A chunk or rank finished: note its worker, span and items (before the job drops them)."""
        meta = meta or {}
        worker = meta.get("worker", "?")
        end = meta.get("end", time.time())
        start = meta.get("start", end - seconds)
        self.tasks.append(Task(worker, start, end, unit.start, unit.count))
        # The worker's own unpickling of arguments and pickling of results. (The
        # reply's wait in the pipe is not counted: the worker is already on its next chunk.)
        self.transfer[worker] = self.transfer.get(worker, 0.0) + meta.get("transfer", 0.0)
        if self.kind == "parallel":
            self._offer(seconds, unit.id, None, worker, is_rank=True)
            return
        top = meta.get("item_top")  # the worker's (index, seconds) of its slowest items
        times = meta.get("item_seconds")  # or every item's seconds (another backend)
        if top is not None and meta.get("items_timed", 0) <= len(unit.items):
            for i, t in top:
                self._offer(t, unit.start + i, unit.items[i], worker)
        elif times and len(times) <= len(unit.items):
            # Only this chunk's top few can enter the top list: pick them in C, not item by item.
            picks = heapq.nlargest(self.top, range(len(times)), key=times.__getitem__)
            for i in picks:
                self._offer(times[i], unit.start + i, unit.items[i], worker)
        elif unit.items:  # no per-item times (an older worker or another backend): the chunk
            self._offer(seconds, unit.start, unit.items[0] if unit.count == 1 else unit.items, worker)

    def lost(self, unit: Any, timed_out: bool, timeout: float | None, index: int | None = None,
             replaced: bool = True) -> None:
        """A unit stopped at its timeout, or whose worker died under it: on the timeline
        from when it was sent (or its worker's previous task ended) until now, marked
        as such; a timed-out item among the slowest, with the time it ran until stopped.
        ``index``: the position in the chunk of the item that was running, when known."""
        end = time.time()
        fate = "timed out" if timed_out else "worker died"
        worker = unit.sent_to
        if replaced:
            self.replaced += 1
        start = unit.sent_at if unit.sent_at is not None else self.begin
        if worker is not None:  # (after the worker's previous task: it waited behind it)
            start = max([start] + [t.end for t in self.tasks if t.worker == worker and t.end <= end])
        item_start = start  # (the item stopped: the whole unit's time unless its clock says less)
        if timed_out and timeout:  # (its clock started when it did: not before end - timeout)
            item_start = max(start, end - timeout) if worker is not None else end - timeout
            if unit.count == 1 or self.kind == "parallel":
                start = item_start
            # (a chunk of several items: each item's clock starts with it, so the
            # chunk ran from when it was sent, its items before the stopped one too)
        if worker is not None:
            self.tasks.append(Task(worker, start, end, unit.start, unit.count, fate))
        at = index if index is not None and 0 <= index < unit.count else 0
        if self.kind == "parallel":
            self._offer(end - item_start, unit.id, None, worker if worker is not None else "?", is_rank=True,
                        fate=fate)
        elif timed_out or unit.count == 1 or index is not None:  # (the item known to be the one stopped)
            item = unit.items[at] if unit.items else None
            self._offer(end - item_start, unit.start + at, item, worker if worker is not None else "?", fate=fate)

    def finish(self, workers: int) -> Insights:
        """The insights of the finished run, with ``workers`` the number it could use."""
        end = time.time()
        span = max(1e-9, end - self.begin)
        per: dict[Any, WorkerTime] = {}
        for t in self.tasks:
            w = per.setdefault(t.worker, WorkerTime(t.worker))
            w.tasks += t.count
            w.busy += t.end - t.start
        for w in per.values():
            w.transfer = self.transfer.get(w.worker, 0.0)
            w.idle = max(0.0, span - w.busy - w.transfer)
        slow = [SlowItem(i, s, a, w, f) for s, i, _, a, w, f in sorted(self._heap, reverse=True)]
        def order(w: WorkerTime) -> tuple:  # local ids in number order, addresses as text
            return (0, w.worker, "") if isinstance(w.worker, int) else (1, 0, str(w.worker))

        return Insights(self.kind, workers, self.begin, end, sorted(per.values(), key=order), slow, self.tasks,
                        self.replaced)


# What the timeline's marks mean (the figure's legend says the same with colours).
TEXT_LEGEND = "'#' a task running, '.' idle"
LOST_LEGEND = "'!' a task stopped (timed out, or its worker died)"
LOST_COLOUR = "#9d9d9d"
#: Under the text timeline in Jupyter without matplotlib (the chart it stands for).
CHART_NEEDS = '(the chart of the timeline needs matplotlib: pip install "mpmagic[plot]")'


def _legend(fig: Any, ax: Any, palette: tuple[str, str], kind: str, lost: bool = False) -> None:
    """A legend for the timeline's colours, under the axes: what a bar is, and the red one."""
    from matplotlib.patches import Patch

    what = "rank" if kind == "parallel" else "chunk of items"
    handles = [
        Patch(facecolor=palette[0], label=f"a {what}"),
        Patch(facecolor=palette[1], label=f"the next {what.split()[0]} on that worker"),
        Patch(facecolor="#e45756", label="the slowest rank" if kind == "parallel" else "holds the slowest item"),
    ]
    if lost:
        handles.append(Patch(facecolor=LOST_COLOUR, hatch="//", label="stopped (timed out, worker died)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="small", frameon=False)


@dataclass
class Insights:
    """Per-worker busy / idle / transfer time, the slowest items, and a task timeline."""

    kind: str
    workers: int
    begin: float
    end: float
    per_worker: list[WorkerTime]
    slowest: list[SlowItem]
    tasks: list[Task] = field(repr=False, default_factory=list)
    replaced: int = 0  # workers replaced during the run (a timeout, a death): their replacements have rows too

    @property
    def wall(self) -> float:
        return self.end - self.begin

    def renumber(self, positions: list[int]) -> None:
        """The run computed part of the user's input (``--checkpoint`` runs the items its
        store lacks): its item ``i`` is item ``positions[i]`` of the input."""
        def at(i: int) -> int:
            return positions[i] if 0 <= i < len(positions) else i

        for s in self.slowest:
            s.index = at(s.index)
        for t in self.tasks:
            t.first, t.last = at(t.first), at(t.last)

    def _header(self) -> str:
        """``2 of 2 workers (1 replaced) ran tasks``: worker slots, not processes (a
        replacement worker has a row of its own, but takes its predecessor's place)."""
        ran = min(len(self.per_worker), self.workers) if self.replaced else len(self.per_worker)
        again = f" ({self.replaced} replaced)" if self.replaced else ""
        return f"{ran} of {self.workers} workers{again} ran tasks over {fmt_seconds(self.wall)}"

    @staticmethod
    def _fate(s: SlowItem) -> str:
        return f", {s.fate}" if s.fate else ""

    def _nothing_ran(self) -> str | None:
        """The one line that stands for the table when no task ran (``%pmap --insights f, []``):
        a header over no rows would read as if the timings were lost."""
        if self.tasks or self.per_worker:
            return None
        what = "ranks" if self.kind == "parallel" else "items"
        return f"insights: no {what} ran, nothing to time"

    def table(self) -> str:
        """A short text table: one row per worker, then the slowest items."""
        empty = self._nothing_ran()
        if empty is not None:
            return empty
        what = "ranks" if self.kind == "parallel" else "items"
        out = [f"insights: {self._header()}"]
        out.append(f"  {'worker':>6}  {what:>6}  {'busy':>9}  {'transfer':>9}  {'idle':>9}")
        for w in self.per_worker:
            out.append(
                f"  {w.worker!s:>6}  {w.tasks:>6}  {fmt_seconds(w.busy):>9}  "
                f"{fmt_seconds(w.transfer):>9}  {fmt_seconds(w.idle):>9}"
            )
        if self.slowest:
            label = "slowest ranks" if self.kind == "parallel" else "slowest items"
            out.append(f"  {label}:")
            for s in self.slowest[:3]:
                where = "" if self.kind == "parallel" else f"item {s.index}: "
                out.append(f"    {fmt_seconds(s.seconds):>9}  {where}{s.args}  (worker {s.worker}{self._fate(s)})")
        return "\n".join(out)

    def timeline_text(self, width: int = 50) -> str:
        """Each worker's tasks as a row of characters: '#' busy, '.' idle."""
        if not self.tasks:
            return ""
        scale = width / max(1e-9, self.wall)
        rows = []
        for w in self.per_worker:
            cells = ["."] * width
            for t in self.tasks:
                if t.worker != w.worker:
                    continue
                a = int(max(0.0, t.start - self.begin) * scale)
                b = max(a + 1, int(max(0.0, t.end - self.begin) * scale))
                for i in range(a, min(b, width)):
                    cells[i] = "!" if t.fate else "#"
            rows.append(f"  worker {w.worker!s:>3} |{''.join(cells)}|")
        rows.append(f"  {'':>10} 0{fmt_seconds(self.wall):>{width}}")
        lost = any(t.fate for t in self.tasks)
        rows.append(f"  {'':>10} {TEXT_LEGEND}" + (f", {LOST_LEGEND}" if lost else ""))
        return "\n".join(rows)

    def figure(self) -> Any:
        """A matplotlib Figure of the per-worker timeline, or None without matplotlib."""
        try:
            import matplotlib  # noqa: F401
            from matplotlib.figure import Figure
        except ImportError:
            return None
        workers = [w.worker for w in self.per_worker]
        fig = Figure(figsize=(7, 0.85 + 0.45 * max(1, len(workers))), layout="constrained")
        ax = fig.add_subplot()
        slow = {s.index for s in self.slowest[:1]}
        palette = ("#4c78a8", "#72b7b2")
        for row, wid in enumerate(workers):
            spans = [t for t in self.tasks if t.worker == wid]
            for k, t in enumerate(spans):
                hot = any(t.first <= i <= t.last for i in slow)
                colour = LOST_COLOUR if t.fate else "#e45756" if hot else palette[k % 2]
                ax.broken_barh([(t.start - self.begin, max(t.end - t.start, 1e-6))], (row - 0.4, 0.8),
                               facecolors=colour, edgecolors="white", linewidth=0.5, hatch="//" if t.fate else None)
        ax.set_yticks(range(len(workers)), [f"worker {w}" for w in workers])
        ax.set_xlim(0, self.wall)
        ax.set_xlabel("seconds since the run started")
        ax.set_title("tasks per worker", fontsize="medium")
        ax.invert_yaxis()
        _legend(fig, ax, palette, self.kind, lost=any(t.fate for t in self.tasks))
        return fig

    def _png(self) -> bytes | None:
        fig = self.figure()
        if fig is None:
            return None
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        return buf.getvalue()

    def __str__(self) -> str:
        timeline = self.timeline_text()
        return self.table() + ("\n" + timeline if timeline else "")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        empty = self._nothing_ran()
        if empty is not None:
            return f"<div class='mpmagic-insights'>{html.escape(empty)}</div>"
        th = "padding:2px 10px;text-align:right;font-weight:600"
        td = "padding:2px 10px;text-align:right"
        what = "ranks" if self.kind == "parallel" else "items"
        head = "".join(f"<th style='{th}'>{h}</th>" for h in ("worker", what, "busy", "transfer", "idle"))
        rows = "".join(
            "<tr>" + "".join(f"<td style='{td}'>{html.escape(str(v))}</td>" for v in (
                w.worker, w.tasks, fmt_seconds(w.busy), fmt_seconds(w.transfer), fmt_seconds(w.idle))) + "</tr>"
            for w in self.per_worker
        )
        label = "slowest ranks" if self.kind == "parallel" else "slowest items"
        slow = "".join(
            f"<li>{html.escape(fmt_seconds(s.seconds))}: "
            + ("" if self.kind == "parallel" else f"item {s.index}, ")
            + f"<code>{html.escape(s.args)}</code> (worker {html.escape(str(s.worker) + self._fate(s))})</li>"
            for s in self.slowest[:3]
        )
        png = self._png()
        if png is not None:
            chart = f"<img alt='timeline of tasks per worker' src='data:image/png;base64,{base64.b64encode(png).decode()}'/>"
        else:  # (the text timeline, saying why it is not the chart)
            chart = f"<pre>{html.escape(self.timeline_text())}</pre><div>{html.escape(CHART_NEEDS)}</div>"
        return (
            "<div class='mpmagic-insights'>"
            f"<table><caption style='text-align:left'><b>insights</b>: {html.escape(self._header())}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            f"<div>{label}:<ul>{slow}</ul></div>{chart}</div>"
        )
