"""Background and streamed runs (issue 16): start latency, fairness, imap's cost.

    .venv/bin/python benchmarks/bench_bg.py           # full (about half a minute)
    .venv/bin/python benchmarks/bench_bg.py --quick   # smoke run

Rows: (a) the time ``mpmagic.submit`` takes to return a handle (median), next
to the time to pickle the function (target: under 1 ms plus that); (b) while
a background run keeps every worker busy with 0.1 s items, the time a
foreground 2-item ``pmap`` takes (target: within one item's time + 5 ms);
(c) ``imap`` over 100,000 tiny items against ``pmap`` on the same items
(target <= 1.3x), and imap's time to its first result. Functions are defined
in an IPython shell as in a notebook. Figures are medians; the output is
markdown for docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import cloudpickle  # noqa: E402
from bench_core import fmt_t, race  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

import mpmagic  # noqa: E402

WORKERS = 2
ITEM = 0.1
CELL = f"def sq(x):\n    return x * x\n\ndef tenth(x):\n    import time\n    time.sleep({ITEM})\n    return x\n"


def first_result(func, items) -> float:
    """Seconds to imap's first result (the rest is then read, so no worker is stopped)."""
    t0 = time.perf_counter()
    stream = mpmagic.imap(func, items)
    next(stream)
    first = time.perf_counter() - t0
    for _ in stream:
        pass
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter fairness run")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    shell = InteractiveShell.instance()
    shell.run_cell(CELL, store_history=False)
    sq, tenth = shell.user_ns["sq"], shell.user_ns["tenth"]
    mpmagic.start_pool(WORKERS, wait=True)
    mpmagic.pmap(sq, range(10))
    rows = []

    # (a) start latency: submit returns a handle; the run itself is waited outside the timing
    starts, pickles = [], []
    for _ in range(repeats * 2):
        t0 = time.perf_counter()
        cloudpickle.dumps(sq)
        pickles.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        handle = mpmagic.submit(sq, range(1000))
        starts.append(time.perf_counter() - t0)
        handle.result(60)
    start, pickle = statistics.median(starts), statistics.median(pickles)
    rows.append(("(a) submit() returns", start, pickle, f"reference: pickling the function; target < 1 ms + that, max {fmt_t(max(starts))}"))

    # (b) a foreground 2-item map while a background run keeps every worker busy
    seconds = 3.0 if args.quick else 8.0
    busy = mpmagic.submit(tenth, range(int(seconds / ITEM) * WORKERS), chunksize=1)
    time.sleep(0.3)
    waits = []
    while not busy.done() and len(waits) < (8 if args.quick else 20):
        t0 = time.perf_counter()
        mpmagic.pmap(sq, [1, 2])
        waits.append(time.perf_counter() - t0)
        time.sleep(0.05)
    busy.result(120)
    fair = statistics.median(waits)
    rows.append(("(b) 2-item pmap beside a busy background run", fair, ITEM,
                 f"reference: one item's time; target <= {fmt_t(ITEM + 0.005)}, max {fmt_t(max(waits))}"))

    # (c) imap vs pmap over 100,000 tiny items, and time to first result
    items = list(range(100_000))
    got = race({"imap": lambda: sum(1 for _ in mpmagic.imap(sq, items)),
                "imap unordered": lambda: sum(1 for _ in mpmagic.imap(sq, items, ordered=False)),
                "pmap": lambda: len(mpmagic.pmap(sq, items))}, max(3, repeats // 3), warmup=1)
    rows.append(("(c) imap, 100,000 tiny items", got["imap"], got["pmap"], f"{got['imap'] / got['pmap']:.2f}x of pmap (target <= 1.3x)"))
    rows.append(("(c) imap unordered, same", got["imap unordered"], got["pmap"],
                 f"{got['imap unordered'] / got['pmap']:.2f}x of pmap"))
    firsts = [first_result(sq, items) for _ in range(repeats)]
    rows.append(("(c) imap: time to first result", statistics.median(firsts), got["pmap"],
                 "reference: the whole pmap"))
    mpmagic.stop_pool()

    print(f"| workload ({WORKERS} workers) | mpmagic | reference | note |")
    print("|---|---|---|---|")
    for label, ours, theirs, note in rows:
        print(f"| {label} | {fmt_t(ours)} | {fmt_t(theirs) if theirs is not None else '-'} | {note} |")


if __name__ == "__main__":
    main()
