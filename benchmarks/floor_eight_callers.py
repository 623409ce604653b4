"""Row (a)'s floor: the least a pool driven from Python can cost for 8 callers at once.

    .venv/bin/python benchmarks/floor_eight_callers.py            # 30 rounds, medians
    .venv/bin/python benchmarks/floor_eight_callers.py --rounds 60

Issue 15's row (a) asks that 8 threads, each mapping a tiny function over
1,000 items at once, take at most 1.5x of one call over 8,000. This script
measures the same row for the leanest pool one can write (``_Floor``: two
forked workers, one pipe each, the caller writes each worker its half and
reads the replies itself; no manager thread, no chunk planner, no report, no
checks: ~20 lines), beside ``multiprocessing.Pool(fork)`` and 8 threads that
do nothing but start and join. What it shows is a property of the machine and
of CPython, not of mpmagic: if the floor itself is over 1.5x, no pool whose
callers run Python can meet the row here. Medians of the rounds, the three
pools taken in turn in each round.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def sq(x: int) -> int:
    return x * x


def _serve(conn: Connection) -> None:
    """A floor worker: map ``sq`` over each list it reads, write the results back."""
    while True:
        items = conn.recv()
        if items is None:
            return
        conn.send([sq(x) for x in items])


class _Floor:
    """Two forked workers, a pipe and a lock each; a call sends each worker half
    its items and reads both replies in the calling thread (locks taken in one
    order, so callers in many threads share the workers without a manager)."""

    def __init__(self, n: int = 2) -> None:
        ctx = mp.get_context("fork")
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(n):
            here, there = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(there,), daemon=True)
            p.start()
            self.conns.append(here)
            self.procs.append(p)
        self.locks = [threading.Lock() for _ in range(n)]

    def map(self, items: range) -> list[int]:
        n = len(self.conns)
        step = -(-len(items) // n)
        for lock in self.locks:
            lock.acquire()
        try:
            for i, conn in enumerate(self.conns):
                conn.send(list(items[i * step:(i + 1) * step]))
            out: list[int] = []
            for conn in self.conns:
                out.extend(conn.recv())
            return out
        finally:
            for lock in self.locks:
                lock.release()

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for p in self.procs:
            p.join()


def _in_threads(target: Callable[..., Any], args: tuple, n: int = 8) -> None:
    threads = [threading.Thread(target=target, args=args) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _timed(f: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds, medians printed (default 30)")
    args = parser.parse_args()
    floor = _Floor()
    pool = mp.get_context("fork").Pool(2)
    try:
        assert floor.map(range(8000)) == [x * x for x in range(8000)]
        assert pool.map(sq, range(8000)) == [x * x for x in range(8000)]
        times: dict[str, list[float]] = {k: [] for k in
                                         ("floor one", "floor eight", "pool one", "pool eight", "idle")}
        for _ in range(5):  # warm both
            floor.map(range(1000))
            pool.map(sq, range(1000))
        for _ in range(args.rounds):
            times["floor one"].append(_timed(lambda: floor.map(range(8000))))
            times["floor eight"].append(_timed(lambda: _in_threads(floor.map, (range(1000),))))
            times["pool one"].append(_timed(lambda: pool.map(sq, range(8000))))
            times["pool eight"].append(_timed(lambda: _in_threads(pool.map, (sq, range(1000)))))
            times["idle"].append(_timed(lambda: _in_threads(len, ((),))))
        med = {k: statistics.median(v) for k, v in times.items()}
        print("| 2 workers, medians of", args.rounds, "rounds | one call over 8,000 | 8 threads x 1,000 at once | ratio |")
        print("|---|---|---|---|")
        print(f"| floor (20-line pool, caller reads its replies) | {med['floor one'] * 1e3:.2f} ms "
              f"| {med['floor eight'] * 1e3:.2f} ms | {med['floor eight'] / med['floor one']:.2f}x |")
        print(f"| `Pool(fork)` | {med['pool one'] * 1e3:.2f} ms | {med['pool eight'] * 1e3:.2f} ms "
              f"| {med['pool eight'] / med['pool one']:.2f}x |")
        print(f"| 8 threads that do nothing (start, join) | | {med['idle'] * 1e3:.2f} ms "
              f"| {med['idle'] / med['floor one']:.2f}x of the floor's one call |")
    finally:
        floor.close()
        pool.terminate()
        pool.join()


if __name__ == "__main__":
    main()
