"""The pandas accessor against pandas itself and pandarallel's ``parallel_apply``.

    .venv/bin/python benchmarks/bench_pandas.py            # 1,000,000 rows, 10,000 groups
    .venv/bin/python benchmarks/bench_pandas.py --quick    # 100,000 rows, 2,000 groups (smoke run)

Workloads (the issue's): ``df.apply(f, axis=1)`` on a frame of 1,000,000 rows
with a per-row function that computes for ~5 us (a busy loop, as a small
formula on a few fields would), and ``df.groupby(key).apply(g)`` with 10,000
groups. Functions are defined in an IPython ``InteractiveShell`` cell, as in a
notebook. Each library uses 2 workers; pandarallel is measured only if
installed and importable (pandarallel 1.6.5 fails to import with pandas >= 3;
it is not in the ``bench`` extra for that reason). Figures are medians of
``--repeats`` runs (after one warm-up) in rows (groups) per second, and the
ratio against serial pandas. Results are checked equal to pandas' own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from IPython.core.interactiveshell import InteractiveShell

CELL = """
import time

def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass

def per_row(row):
    spin(5e-6)
    return row["a"] * 2 + row["b"]

def per_group(g):
    return g["b"].mean() - g["a"].min()
"""


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    result = fn()  # warm-up: workers started, payloads cached, modules imported
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a.equals(b)


def row(label: str, n: int, t: float | None, serial: float, what: str) -> str:
    if t is None:
        return f"| {label} | - | - | - |"
    return f"| {label} | {t:.2f} s | {n / t:,.0f} {what}/s | {serial / t:.2f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 2,000 groups")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    opts = parser.parse_args()
    rows, groups = (100_000, 2_000) if opts.quick else (1_000_000, 10_000)
    os.environ.setdefault("MPMAGIC_PRESTART", "0")

    ip = InteractiveShell.instance(colors="nocolor")
    ip.run_cell("%load_ext mpmagic")
    ip.run_cell(CELL)
    import mpmagic

    mpmagic.start_pool(opts.workers, wait=True)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.integers(0, 100, rows), "b": rng.random(rows), "key": rng.integers(0, groups, rows)})
    per_row, per_group = ip.user_ns["per_row"], ip.user_ns["per_group"]

    why_not = ""
    try:  # pandarallel 1.6.5 (latest, 2023) does not import with pandas >= 3 (ExpandingGroupby moved)
        from pandarallel import pandarallel

        pandarallel.initialize(nb_workers=opts.workers, progress_bar=False, verbose=0)
    except ImportError as exc:
        pandarallel, why_not = None, f"pandarallel not measured: {exc}"

    print(f"pandas {pd.__version__}, {rows:,} rows, {groups:,} groups, {opts.workers} workers, "
          f"median of {opts.repeats} (preliminary: a shared, busy machine)\n")
    print("| run | time | throughput | vs serial pandas |\n|---|---|---|---|")

    serial, expected = median_time(lambda: df.apply(per_row, axis=1), opts.repeats)
    print(row("df.apply(per_row, axis=1) (pandas, serial)", rows, serial, serial, "rows"), flush=True)
    t, got = median_time(lambda: df.mp.apply(per_row, axis=1, quiet=True), opts.repeats)
    assert same(got, expected)
    print(row("df.mp.apply(per_row, axis=1) (mpmagic)", rows, t, serial, "rows"), flush=True)
    t = None
    if pandarallel is not None:
        t, got = median_time(lambda: df.parallel_apply(per_row, axis=1), opts.repeats)
        assert same(got, expected)
    print(row("df.parallel_apply(per_row, axis=1) (pandarallel)", rows, t, serial, "rows"), flush=True)

    gb = df.groupby("key")
    serial, expected = median_time(lambda: gb.apply(per_group), opts.repeats)
    print(row("groupby.apply(per_group) (pandas, serial)", groups, serial, serial, "groups"), flush=True)
    t, got = median_time(lambda: gb.mp.apply(per_group, quiet=True), opts.repeats)
    assert same(got, expected)
    print(row("groupby.mp.apply(per_group) (mpmagic)", groups, t, serial, "groups"), flush=True)
    t = None
    if pandarallel is not None:
        t, got = median_time(lambda: gb.parallel_apply(per_group), opts.repeats)
        assert same(got, expected)
    print(row("groupby.parallel_apply(per_group) (pandarallel)", groups, t, serial, "groups"), flush=True)
    if why_not:
        print(f"\n{why_not}")
    mpmagic.stop_pool()


if __name__ == "__main__":
    main()
