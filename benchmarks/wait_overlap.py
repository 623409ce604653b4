"""Would the caller's work cost a warm 2-item ``pmap`` less while its workers compute than after the run?

    .venv/bin/python benchmarks/wait_overlap.py                  # 600 rounds, ~50 us of work
    .venv/bin/python benchmarks/wait_overlap.py --rounds 1000 --loops 300

The question behind moving work out of the call's path (the report's
preparation, the notes said at the end): the calling thread is idle from its
last write to the run's end, so work done then might overlap the workers'.
This times, after a ``gc.collect()`` each, the same Python busy work (a dict
loop, ``--loops`` turns) done right after ``submit`` returns (the units are
written, the workers compute), the same work done once the run ended (where
the report is made), and none; the three interleaved round by round in one
process, so that the machine's load falls on all of them alike. On 2 cores
the two workers, the pool's manager and the caller share two CPUs and one
GIL: work in the wait competes with the workers and the manager for them.
The wrappers are for the measurement only. Markdown out.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

from IPython.core.interactiveshell import InteractiveShell

import mpmagic
from mpmagic import api
from mpmagic.backends import local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=600, help="rounds of the three calls (default 600)")
    parser.add_argument("--loops", type=int, default=700, help="turns of the busy work's loop (default 700)")
    args = parser.parse_args()

    def busy() -> None:
        d: dict[int, int] = {}
        for i in range(args.loops):
            d[i & 15] = d.get(i & 7, 0) + i

    t0 = time.perf_counter()
    for _ in range(1000):
        busy()
    work = (time.perf_counter() - t0) / 1000
    shell = InteractiveShell.instance()
    shell.run_cell("def sq(x):\n    return x * x\n", store_history=False)
    sq = shell.user_ns["sq"]
    mpmagic.start_pool(2, wait=True)
    mode = ["none"]
    submit, run_with_progress = local.LocalBackend.submit, api._run_with_progress

    def submit_then_work(self: Any, *a: Any, **k: Any) -> Any:
        run = submit(self, *a, **k)
        if mode[0] == "during the wait":
            busy()
        return run

    def run_then_work(*a: Any, **k: Any) -> Any:
        result = run_with_progress(*a, **k)
        if mode[0] == "after the run":
            busy()
        return result

    local.LocalBackend.submit = submit_then_work  # type: ignore[method-assign]
    api._run_with_progress = run_then_work
    times: dict[str, list[float]] = {"none": [], "during the wait": [], "after the run": []}
    try:
        for m in times:
            mode[0] = m
            for _ in range(20):
                mpmagic.pmap(sq, [1, 2])
        order = list(times)
        for r in range(args.rounds):
            for m in order[r % 3:] + order[: r % 3]:
                mode[0] = m
                gc.collect()
                t1 = time.perf_counter()
                mpmagic.pmap(sq, [1, 2])
                times[m].append(time.perf_counter() - t1)
    finally:
        local.LocalBackend.submit = submit  # type: ignore[method-assign]
        api._run_with_progress = run_with_progress
        mpmagic.stop_pool()
    during, after = times["during the wait"], times["after the run"]
    wins = sum(d < a for d, a in zip(during, after, strict=True))
    print(f"| busy work ({args.loops} turns, {work * 1e6:.0f} us warm) | warm 2-item map after gc.collect(), "
          f"median of {args.rounds} |\n|---|---|")
    for m, values in times.items():
        print(f"| {m} | {statistics.median(values) * 1e6:.0f} us |")
    print(f"| during the wait faster than after the run | {wins} of {args.rounds} rounds |")


if __name__ == "__main__":
    main()
