"""The notebook's CPU per warm 2-item ``pmap``, by thread (the calling thread and the pool's manager).

    .venv/bin/python benchmarks/warm_call_cpu.py                 # 5 rounds of 2,000 calls
    .venv/bin/python benchmarks/warm_call_cpu.py --calls 1000 --rounds 3
    .venv/bin/python benchmarks/warm_call_cpu.py --run 1000      # only the calls (for valgrind)

bench_engine's "notebook CPU per warm call" row, with the calling thread's
share apart (``time.thread_time``) and the manager thread's (its CPU clock),
back to back after 200 warm calls; medians of the rounds. On a shared
machine CPU times move with the load: alternate trees, or count
instructions instead, which do not (``--run N`` makes only the calls, so
that a run with ``--run 0`` can be subtracted):

    valgrind --tool=callgrind --separate-threads=yes \\
        .venv/bin/python benchmarks/warm_call_cpu.py --run 1000

The function is defined in an IPython shell, as in a notebook.
"""

from __future__ import annotations

import argparse
import statistics
import time

from IPython.core.interactiveshell import InteractiveShell

import mpmagic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the median printed (default 5)")
    parser.add_argument("--run", type=int, default=None, metavar="N",
                        help="only make N warm calls, measuring nothing (for an instruction count)")
    args = parser.parse_args()
    shell = InteractiveShell.instance()
    shell.run_cell("def sq(x):\n    return x * x\n", store_history=False)
    sq = shell.user_ns["sq"]
    mpmagic.start_pool(2, wait=True)
    try:
        for _ in range(50 if args.run is not None else 200):
            mpmagic.pmap(sq, [1, 2])
        if args.run is not None:
            for _ in range(args.run):
                mpmagic.pmap(sq, [1, 2])
            return
        manager = mpmagic.get_pool()._manager
        clock = time.pthread_getcpuclockid(manager.ident)
        rows: list[tuple[float, float, float]] = []
        for _ in range(args.rounds):
            p0, c0, m0 = time.process_time(), time.thread_time(), time.clock_gettime(clock)
            for _ in range(args.calls):
                mpmagic.pmap(sq, [1, 2])
            p1, c1, m1 = time.process_time(), time.thread_time(), time.clock_gettime(clock)
            rows.append(((p1 - p0) / args.calls, (c1 - c0) / args.calls, (m1 - m0) / args.calls))
        process, caller, managing = (statistics.median(r[i] for r in rows) * 1e6 for i in range(3))
        print("| per warm 2-item pmap (median of rounds) | notebook CPU |")
        print("|---|---|")
        print(f"| whole process | {process:.0f} us |")
        print(f"| the calling thread | {caller:.0f} us |")
        print(f"| the pool's manager thread | {managing:.0f} us |")
        print(f"| each round, whole process | {', '.join(f'{r[0] * 1e6:.0f}' for r in rows)} us |")
    finally:
        mpmagic.stop_pool()


if __name__ == "__main__":
    main()
