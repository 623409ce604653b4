"""``--scaling``: run the same work serially and on 1, 2, ... N workers, and plot it.

The result is a :class:`Scaling`: a small table of wall time, speedup and
efficiency per number of workers, and (with matplotlib, the ``plot`` extra) a
figure of measured speedup against the ideal line. It shows as a picture in
Jupyter and as the table in a terminal; ``.figure`` is the matplotlib Figure
to save or paste into a report. The serial time is always *measured* here,
so every speedup on the plot is a measured one.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .checks import check_whole
from .errors import add_note, drop_our_frames, one_line
from .fmt import fmt_efficiency, fmt_seconds, fmt_speedup

#: Said, in a terminal and in Jupyter, where the plot would be without matplotlib.
PLOT_NEEDS = '(the plot needs matplotlib: pip install "mpmagic[plot]")'


@dataclass
class ScalingPoint:
    """One run of the scaling series."""

    workers: int
    wall: float
    speedup: float
    efficiency: float


@dataclass
class Scaling:
    """Measured speedup against serial for 1..N workers; a table and a figure."""

    kind: str  # "pmap" or "parallel"
    serial: float
    points: list[ScalingPoint]
    title: str = ""
    _figure: Any = field(default=None, repr=False)

    def table(self) -> str:
        """The series as aligned text (what shows without matplotlib)."""
        out = [f"scaling of {self.title or self.kind}: serial {fmt_seconds(self.serial)} (measured)"]
        out.append(f"  {'workers':>7}  {'wall':>9}  {'speedup':>7}  {'ideal':>5}  {'efficiency':>10}")
        for p in self.points:
            out.append(
                f"  {p.workers:>7}  {fmt_seconds(p.wall):>9}  {fmt_speedup(p.speedup):>7}  {p.workers:>4}x  "
                f"{fmt_efficiency(p.efficiency):>10}"
            )
        return "\n".join(out)

    @property
    def figure(self) -> Any:
        """A matplotlib Figure of measured vs ideal speedup, or None without matplotlib."""
        if self._figure is None:
            self._figure = _plot(self)
        return self._figure

    def savefig(self, path: str, **kwargs: Any) -> None:
        """Save the figure (PNG, SVG, PDF... by the file's extension)."""
        fig = self.figure
        if fig is None:
            # (one line, as every missing extra is said: not a traceback through this method)
            raise one_line(ImportError('saving the scaling plot needs matplotlib: pip install "mpmagic[plot]"'))
        fig.savefig(path, **kwargs)

    def __str__(self) -> str:
        return self.table()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.table())
        if importlib.util.find_spec("matplotlib") is None:
            p.text("\n" + PLOT_NEEDS)

    def _repr_html_(self) -> str:
        """In Jupyter: the plot (when matplotlib is there), then the measured points as a small table."""
        png = self._repr_png_()
        if png is not None:
            img = (f"<img alt='measured speedup against workers' "
                   f"src='data:image/png;base64,{base64.b64encode(png).decode()}'/>")
        else:  # (the table alone said nothing of the plot a notebook user came for)
            img = f"<div>{html.escape(PLOT_NEEDS)}</div>"
        th = "padding:2px 10px;text-align:right;font-weight:600"
        td = "padding:2px 10px;text-align:right"
        head = "".join(f"<th style='{th}'>{h}</th>" for h in ("workers", "wall", "speedup", "ideal", "efficiency"))
        body = "".join(
            "<tr>" + "".join(f"<td style='{td}'>{v}</td>" for v in (
                p.workers, html.escape(fmt_seconds(p.wall)), html.escape(fmt_speedup(p.speedup)), f"{p.workers}x",
                html.escape(fmt_efficiency(p.efficiency))))
            + "</tr>"
            for p in self.points
        )
        caption = html.escape(f"{self.title or self.kind}: serial {fmt_seconds(self.serial)} (measured)")
        return (
            f"<div class='mpmagic-scaling'>{img}<div style='white-space:nowrap'>{caption}</div>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )

    def _repr_png_(self) -> bytes | None:
        fig = self.figure
        if fig is None:
            return None  # the front end falls back to the text table
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        return buf.getvalue()


def _plot(result: Scaling) -> Any:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ws = [p.workers for p in result.points]
    fig = Figure(figsize=(5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    top = max(ws) if ws else 1
    ax.plot([0, top], [0, top], "--", color="grey", label="ideal (speedup = workers)")
    ax.axhline(1.0, color="#bbbbbb", linewidth=0.8)
    ax.plot(ws, [p.speedup for p in result.points], "o-", color="#4c78a8", label="measured")
    for p in result.points:
        ax.annotate(fmt_speedup(p.speedup), (p.workers, p.speedup), textcoords="offset points",
                    xytext=(4, -12), fontsize="small")
    ax.set_xlim(0, top + 0.5)
    ax.set_ylim(0, max([top] + [p.speedup for p in result.points]) * 1.15)
    ax.set_xticks(ws)
    ax.set_xlabel("workers")
    ax.set_ylabel("speedup over serial")
    ax.set_title(f"{result.title or result.kind}: serial {fmt_seconds(result.serial)}", fontsize="medium")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def _counts(max_workers: int | None) -> range:
    from .pool import get_pool

    n = max_workers or get_pool().workers
    return range(1, max(1, n) + 1)


def _warm_up() -> None:
    """Start the pool before timing, so the first point does not pay for it."""
    from .pool import get_pool

    get_pool().wait_ready()


def _point(workers: int, wall: float, serial: float) -> ScalingPoint:
    speedup = serial / wall if wall > 0 else 0.0
    return ScalingPoint(workers, wall, speedup, speedup / workers)


def pmap_scaling(
    func: Callable,
    *iterables: Iterable,
    max_workers: int | None = None,
    star: bool = False,
    chunksize: int | None = None,
    repeat: int = 1,
    errors: Literal["raise", "collect"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    seed: int | None = None,
) -> Scaling:
    """Time ``map(func, *iterables)`` serially and with ``pmap`` on 1..``max_workers`` workers.

    ``max_workers`` defaults to the pool's size. Each point is the best of
    ``repeat`` runs. The arguments are checked first, as ``pmap`` checks them
    (the same one-line errors: a FUNC that is not callable, an ITERABLE that
    is not iterable, ``star`` with several iterables), and only then is the
    input read into lists once (it is used N+1 times), cut to the shortest
    iterable as ``map`` cuts it: ``itertools.count()`` next to a list of two
    is read three times, not for ever. A failing item stops the serial run
    with its error and the note a parallel run gives it ("raised by item 3
    of the input: f(3)").
    ``errors``, ``timeout``, ``retries`` and ``seed`` are ``pmap``'s, given to
    every parallel run; the serial runs here take ``errors`` (``"collect"``
    keeps a failing item's place) and ``seed`` (the same per-item streams),
    but nothing here can stop an item: ``timeout`` and ``retries`` bound the
    parallel runs only. The serial runs call a copy of the function (one for
    them all, as a worker keeps its own) on a copy of the items, made as a
    worker's are: the notebook's objects stay as they were (a function
    appending to a notebook list leaves it as the parallel runs do).
    """
    __tracebackhide__ = True
    from . import api
    from .pool import check_run_workers, get_pool

    # pmap's own checks, before anything is read (a bare TypeError came from the reading
    # below, and a FUNC that is not callable from the first serial call)
    taken = api.check_map_args(func, iterables, None, chunksize, timeout, errors, star, retries).iterables
    if max_workers is not None:  # (refused before the serial runs, not at the first point past the machine)
        check_run_workers(check_whole("max_workers", max_workers))
    if seed is not None:  # (a bad seed is refused before the input is read, too)
        from .seeding import _check_seed

        seed = _check_seed(seed)
    data = _read_input(taken)
    backend = get_pool()
    # The serial runs call a copy of the function made as a worker's is (api.serial_map_copy),
    # one for them all, as a worker keeps its copy from call to call (a cache it fills, a
    # first call's set-up: the second serial timing is warm, as the points are), on a copy
    # of the items made for each run, as each run sends its own (not timed, as a worker's
    # load is not). The notebook's objects stay as the parallel points leave them.
    copied_func = api.serial_map_copy(func, backend)

    def serial_run() -> float:
        __tracebackhide__ = True
        serial_func, serial_data = copied_func, api.serial_map_copy(data, backend, "the items")
        serial_star = star
        if seed is not None:  # the same per-item streams as the parallel runs (api.seeded)
            serial_func, serial_data, serial_star = api.seeded(serial_func, serial_data, star, seed)
        t0 = time.perf_counter()
        with api._random_state_kept(seed is not None):  # (the notebook's own random state stays)
            # note_items: a failing item's error names it, as a parallel run's does
            api._serial_map(serial_func, serial_data, serial_star, errors == "collect", note_items=True)
        return time.perf_counter() - t0

    first = _best_of(serial_run, repeat)
    points = _sweep(lambda k: api.pmap(func, *data, workers=k, star=star, chunksize=chunksize, errors=errors,
                                       timeout=timeout, retries=retries, seed=seed), 0.0, max_workers, repeat)
    serial = _serial_after(serial_run, first, points)
    return Scaling("pmap", serial, points, title=f"pmap {getattr(func, '__name__', 'func')}")


def _read_input(iterables: tuple) -> tuple[list, ...]:
    """The input as lists, one per iterable, read as ``map`` reads it: several are
    cut to the shortest (an endless one next to a short one is read that far)."""
    if len(iterables) == 1:
        return (list(iterables[0]),)
    rows = list(zip(*iterables, strict=False))
    return tuple(map(list, zip(*rows, strict=True))) if rows else tuple([] for _ in iterables)


def parallel_scaling(
    code: str,
    namespace: dict[str, Any],
    max_workers: int | None = None,
    repeat: int = 1,
    timeout: float | None = None,
    seed: int | None = None,
    label_output: bool = True,
) -> Scaling:
    """Time a ``%%parallel`` cell run here with rank 0 of size 1, then on 1..N ranks.

    The cell should split its work by ``rank`` and ``size`` (as SPMD code
    does), so N ranks each do 1/N of it. ``timeout``, ``seed`` and
    ``label_output`` are ``parallel``'s, given to every parallel run; the
    serial run here takes ``seed`` (rank 0's stream) but cannot be stopped,
    so ``timeout`` bounds the parallel runs only. The serial run is
    ``compare=True``'s: on a copy of the cell's names as a rank gets them (the
    notebook's objects stay as they are), as ``__main__``, its output labelled
    ``[serial]`` (``label_output``).
    """
    __tracebackhide__ = True
    from . import api
    from .cell import make_cell_spec
    from .pool import check_run_ranks, get_pool

    if max_workers is not None:  # (refused before the serial run, not after 1..N as a list of N counts)
        check_run_ranks(check_whole("max_workers", max_workers))
    spec = make_cell_spec(code, namespace)
    if seed is not None:  # rank 0's stream, as the parallel runs' rank 0 (api's cell call does the same)
        from .seeding import _check_seed, uses_numpy, uses_torch

        spec.seed = _check_seed(seed)
        spec.seed_numpy = uses_numpy(code)
        spec.seed_torch = uses_torch(code)

    backend = get_pool()

    def serial_run() -> float:
        # --compare's serial run (api.run_cell_serially): on a copy of the cell's names made
        # as a rank's is (not timed, as a rank's load is not), as __main__, its output
        # labelled [serial] as the ranks' are [rank N]. It ran on the notebook's own objects:
        # a cell's lst.append(rank) grew the notebook's list at each serial run, and the
        # ranks of the points after it got the longer list.
        __tracebackhide__ = True
        copy = api.serial_cell_copy(spec, backend)
        t0 = time.perf_counter()
        try:
            api.run_cell_serially(copy, seed is not None, label_output)
        except BaseException as exc:  # (1 / (size - 1): which run raised, as a map's item is named)
            if not isinstance(exc, KeyboardInterrupt):
                add_note(exc, "mpmagic: raised by --scaling's serial run here (the cell as rank 0 of size 1)")
                drop_our_frames(exc)  # (the cell's frames only, as --compare's serial run's error)
            raise
        return time.perf_counter() - t0

    first = _best_of(serial_run, repeat)
    points = _sweep(lambda k: api.parallel(code, workers=k, namespace=namespace, timeout=timeout, seed=seed,
                                           label_output=label_output), 0.0, max_workers, repeat)
    serial = _serial_after(serial_run, first, points)
    return Scaling("parallel", serial, points, title="%%parallel cell")


def _best_of(run: Callable[[], float], repeat: int) -> float:
    """The best of ``repeat`` runs' timings (``run()`` returns the seconds it took: what it
    prepares first, a cell's copy of its names, is not timed), as each point is the best of its runs."""
    __tracebackhide__ = True
    best = float("inf")
    for _ in range(max(1, repeat)):
        best = min(best, run())
    return best


def _serial_after(run: Callable[[], float], first: float, points: list) -> float:
    """The serial time: the best of the timings before the points and one after them.

    A single serial timing taken first ran cold (first call, caches, clocks
    ramping up) and came out 5-10 % slow, so 1 worker showed over 100 %
    efficiency; the points themselves run after it, warm. The speedups are
    then made against this serial time.
    """
    serial = min(first, _best_of(run, 1))
    for i, p in enumerate(points):
        points[i] = _point(p.workers, p.wall, serial)
    return serial


def _sweep(run_on: Callable[[int], Any], serial: float, max_workers: int | None, repeat: int) -> list:
    """Run ``run_on(k)`` for each worker count k, best wall time of ``repeat`` runs each."""
    from . import api

    _warm_up()
    points: list[ScalingPoint] = []
    for k in _counts(max_workers):
        best = float("inf")
        for _ in range(max(1, repeat)):
            run_on(k)
            report = api.last_report()
            # run_on is a blocking api.pmap / api.parallel: the report is set before it returns
            assert report is not None
            best = min(best, report.wall)
            ran = getattr(report, "workers", k)
            if points and isinstance(ran, int) and ran < k:
                # A Dask cluster runs -n N on at most its worker threads: a "3 workers" point that
                # ran on 2 was plotted against an ideal of 3x. The sweep ends at what it has.
                noun = getattr(report, "worker_noun", "worker")
                sys.stderr.write(f"mpmagic: --scaling: stopped at {k - 1} {noun}s: the run on {k} ran on {ran} "
                                 f"{noun}{'s' * (ran != 1)} (all the pool had), so it is not shown\n")
                return points
        points.append(_point(k, best, serial))
    return points
