"""A warm 2-item map after an idle gap, against multiprocessing.Pool(fork).

    .venv/bin/python benchmarks/bench_idle.py            # 200 calls per gap (about 30 s)
    .venv/bin/python benchmarks/bench_idle.py --calls 50

bench_engine's warm row calls ``gc.collect()`` before each call; this asks
whether the gap before a call, not the collection, is what costs: for each
kind of gap (none, ``gc.collect()``, sleeps of 1, 5 and 20 ms, 5 ms of busy
work) it times ``mpmagic.pmap(sq, [1, 2])`` and ``Pool(fork).map(sq, [1, 2])``
right after the gap, the two alternated call by call. Medians; markdown out.

A third column, ``pmap(sq, [1, 2], chunksize=2)``, sends both items to one
worker as one chunk: what mpmagic's call costs without waking a second
worker (the planner gives every worker a share on purpose: see
docs/performance.md, "Round 2, nineteenth session").
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import statistics
import time
from collections.abc import Callable

from IPython.core.interactiveshell import InteractiveShell

import mpmagic


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


GAPS: dict[str, Callable[[], object]] = {
    "none": lambda: None,
    "`gc.collect()`": gc.collect,
    "`time.sleep(0.001)`": lambda: time.sleep(0.001),
    "`time.sleep(0.005)`": lambda: time.sleep(0.005),
    "`time.sleep(0.02)`": lambda: time.sleep(0.02),
    "5 ms of busy work": lambda: busy(0.005),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per pool and gap")
    args = parser.parse_args()
    shell = InteractiveShell.instance()
    shell.run_cell("def sq(x):\n    return x * x\n", store_history=False)
    sq = shell.user_ns["sq"]
    mpmagic.start_pool(2, wait=True)
    print("| gap before each call | mpmagic | `Pool(fork)` | ratio | mpmagic, one chunk | its ratio |\n|---|---|---|---|---|---|")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        calls = {"ours": lambda: mpmagic.pmap(sq, [1, 2]), "pool": lambda: pool.map(sq, [1, 2]),
                 "one": lambda: mpmagic.pmap(sq, [1, 2], chunksize=2)}
        for label, gap in GAPS.items():
            times: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(20):  # warm-up
                for f in calls.values():
                    f()
            order = list(calls)
            for _ in range(args.calls):
                order = order[1:] + order[:1]  # each pool after each of the others, in turn
                for k in order:
                    gap()
                    t0 = time.perf_counter()
                    calls[k]()
                    times[k].append(time.perf_counter() - t0)
            ours, theirs, one = (statistics.median(times[k]) for k in ("ours", "pool", "one"))
            print(f"| {label} | {ours * 1e6:.0f} us | {theirs * 1e6:.0f} us | {ours / theirs:.2f}x "
                  f"| {one * 1e6:.0f} us | {one / theirs:.2f}x |")
    mpmagic.stop_pool()


if __name__ == "__main__":
    main()
