"""The run engine (issue 15): thread handoff cost, many runs at once, fairness.

    .venv/bin/python benchmarks/bench_engine.py           # full (about a minute)
    .venv/bin/python benchmarks/bench_engine.py --quick   # smoke run

Rows: a warm 2-item pmap and 100,000 tiny items against multiprocessing.Pool(fork)
(no regression from the manager thread's handoff); (a) 8 threads each mapping
1,000 tiny items at once against one call over 8,000, with what starting the
threads alone costs, the runs timed from the threads' release, the same calls
one after another, and Pool(fork) doing the same against its own one call;
(b) fairness: while a
background thread's run keeps both workers busy with 0.1 s items, the time a
2-item pmap from the main thread takes (median of 20), and the same beside a
run whose on_chunk callback takes 0.1 s per chunk, and beside one whose input
generator takes 0.05 s per item; (c) the notebook
process's CPU time per tiny item (the ceiling with many workers). Functions
are defined in an IPython shell as in a notebook. Figures are medians; print
is markdown for docs/performance.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from bench_core import fmt_t, race  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

import mpmagic  # noqa: E402

WORKERS = 2
CELL = "def sq(x):\n    return x * x\n\ndef tenth(x):\n    import time\n    time.sleep(0.1)\n    return x\n"


def in_threads(target: Callable[..., Any], args: tuple, n: int = 8) -> None:
    """Call ``target(*args)`` from ``n`` new threads at once; return when all are done."""
    threads = [threading.Thread(target=target, args=args) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter fairness run")
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    shell = InteractiveShell.instance()
    shell.run_cell(CELL, store_history=False)
    sq, tenth = shell.user_ns["sq"], shell.user_ns["tenth"]
    mpmagic.start_pool(WORKERS, wait=True)
    rows = []
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        pool.map(sq, range(10))
        # A 2-item map takes well under a millisecond: 9 samples of it are noise
        # on a shared machine, so it gets many more (each after a gc.collect).
        # (100,000 items: ~12 ms a call, so 3x the repeats steady its median for little)
        for label, n, rounds in (("warm 2-item map", 2, 25 * repeats), ("100,000 tiny items", 100_000, 3 * repeats)):
            items = list(range(n))
            got = race({"ours": lambda items=items: mpmagic.pmap(sq, items),
                        "pool": lambda items=items: pool.map(sq, items)}, rounds, warmup=20 if n == 2 else 2)
            ours, theirs = got["ours"], got["pool"]
            rows.append((label, ours, theirs, f"{ours / theirs:.2f}x of Pool(fork)"))
            if n == 2:
                # Back to back, no collection between calls: blocks of 25 calls,
                # the median block's time per call (every cache warm).
                def block(f: Callable[[], Any]) -> Callable[[], None]:
                    return lambda: [f() for _ in range(25)] and None

                got = race({"ours": block(lambda: mpmagic.pmap(sq, [1, 2])),
                            "pool": block(lambda: pool.map(sq, [1, 2]))}, 4 * repeats, warmup=2)
                ours, theirs = got["ours"] / 25, got["pool"] / 25
                rows.append((" the same, back to back", ours, theirs, f"{ours / theirs:.2f}x of Pool(fork)"))
                n_calls = 1000
                cpu = {}
                for name, f in (("ours", lambda: mpmagic.pmap(sq, [1, 2])), ("pool", lambda: pool.map(sq, [1, 2]))):
                    c0 = time.process_time()
                    for _ in range(n_calls):
                        f()
                    cpu[name] = (time.process_time() - c0) / n_calls
                rows.append((" the same: notebook CPU per call", cpu["ours"], cpu["pool"],
                             "all its threads, back to back"))

    # (a) 8 threads x 1,000 items at once vs one call over 8,000
    def eight_threads() -> None:
        in_threads(mpmagic.pmap, (sq, range(1000)))

    # The same 8 calls from threads started beforehand and released together,
    # timed from the release: what the runs cost at once, without starting
    # and joining threads (the next row: about half of one call over 8,000 here).
    def eight_released() -> float:
        gate = threading.Barrier(9)
        ended: list[float] = []

        def call() -> None:
            gate.wait()
            mpmagic.pmap(sq, range(1000))
            ended.append(time.perf_counter())

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        gate.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        return max(ended) - t0

    def eight_idle_threads() -> None:
        in_threads(len, ((),))

    def eight_in_turn() -> None:
        for _ in range(8):
            mpmagic.pmap(sq, range(1000))

    released: list[float] = []
    got = race({"many": eight_threads, "released": lambda: released.append(eight_released()),
                "idle": eight_idle_threads, "in turn": eight_in_turn,
                "one": lambda: mpmagic.pmap(sq, range(8000))}, repeats, warmup=1)
    many, one = got["many"], got["one"]
    rows.append(("(a) 8 threads x 1,000 items", many, one, f"{many / one:.2f}x of one call over 8,000 (target <= 1.5x)"))
    rel = statistics.median(released[-repeats:])
    rows.append(("(a) of which the runs: threads started before, timed from their release", rel, one, f"{rel / one:.2f}x"))
    rows.append(("(a) of which 8 threads that do nothing (start, join)", got["idle"], one, f"{got['idle'] / one:.2f}x"))
    rows.append(("(a) the same 8 calls one after another, one thread", got["in turn"], one, f"{got['in turn'] / one:.2f}x"))

    # (a) for the reference: Pool(fork).map from 8 threads at once, against its own one call
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        pool.map(sq, range(10))

        def pool_eight() -> None:
            in_threads(pool.map, (sq, range(1000)))

        ref = race({"many": pool_eight, "one": lambda: pool.map(sq, range(8000))}, repeats, warmup=1)
    rows.append(("(a) Pool(fork): 8 threads x 1,000 items", ref["many"], ref["one"],
                 f"{ref['many'] / ref['one']:.2f}x of its own one call over 8,000"))

    # (b) fairness: a 2-item map while a background run keeps both workers busy
    seconds = 4.0 if args.quick else 10.0
    background = threading.Thread(
        target=mpmagic.pmap, args=(tenth, range(int(seconds / 0.1) * WORKERS)), kwargs={"chunksize": 1}
    )
    background.start()
    time.sleep(0.5)
    waits = []
    for _ in range(20 if not args.quick else 8):
        t0 = time.perf_counter()
        mpmagic.pmap(sq, [1, 2])
        waits.append(time.perf_counter() - t0)
        time.sleep(0.05)
    background.join()
    fair = statistics.median(waits)
    rows.append(("(b) 2-item map beside a busy run", fair, None, f"median of {len(waits)} (target <= 0.25 s), max {fmt_t(max(waits))}"))

    # (b) beside slow user code of another thread's run, its on_chunk or its input
    # generator (both run in that thread: they must not hold the pool's manager)
    def two_item_waits_beside(items: Any, **kwargs: Any) -> list[float]:
        slow = threading.Thread(target=mpmagic.pmap, args=(sq, items), kwargs=kwargs)
        slow.start()
        time.sleep(0.2)
        waits = []
        for _ in range(10):
            t0 = time.perf_counter()
            mpmagic.pmap(sq, [1, 2])
            waits.append(time.perf_counter() - t0)
            time.sleep(0.05)
        slow.join()
        return waits

    def slow_items():
        for i in range(30):
            time.sleep(0.05)
            yield i

    for label, waits in (
        ("on_chunk takes 0.1 s", two_item_waits_beside(range(30), chunksize=1, on_chunk=lambda s, r: time.sleep(0.1))),
        ("generator takes 0.05 s per item", two_item_waits_beside(slow_items(), chunksize=2)),
    ):
        rows.append((f"(b) 2-item map beside a run whose {label}", statistics.median(waits), None,
                     f"median of {len(waits)}, max {fmt_t(max(waits))}"))

    # (c) the notebook process's CPU per tiny item
    n = 200_000
    mpmagic.pmap(sq, range(n))
    c0 = time.process_time()
    mpmagic.pmap(sq, range(n))
    cpu = (time.process_time() - c0) / n
    rows.append(("(c) notebook CPU per tiny item", cpu, None, "process_time of the notebook (all its threads) / items"))
    mpmagic.stop_pool()

    print(f"| workload ({WORKERS} workers) | mpmagic | reference | note |")
    print("|---|---|---|---|")
    for label, ours, theirs, note in rows:
        print(f"| {label} | {fmt_t(ours)} | {fmt_t(theirs) if theirs is not None else '-'} | {note} |")


if __name__ == "__main__":
    main()
