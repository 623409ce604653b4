"""mpmagic on a local Dask cluster against plain ``client.map`` and mpmagic's
local backend, in one run. Every figure is a median over several repeats.

    .venv/bin/python benchmarks/bench_dask.py            # full (a few minutes)
    .venv/bin/python benchmarks/bench_dask.py --quick    # smoke run

The Dask cluster is the one ``%pool dask -n 2`` starts: a ``LocalCluster`` of
2 worker processes with 1 thread each; the local backend has 2 workers too.
Functions are defined as in a notebook (``run_cell`` in an InteractiveShell).

Sections (the printed markdown goes into docs/performance.md as is):

1. 100,000 tiny items (``x * x``): mpmagic chunks them; plain ``client.map``
   makes one task per item.
2. CPU-bound speedup on 2 workers: 8 items of ``work(3_000_000)``.
3. Warm latency of a 2-item map.
4. The helpers: a put+get round trip on ``mpmagic.Queue`` and an
   acquire+release on ``mpmagic.Lock``, on Dask (scheduler round trips)
   against the local shared-memory helpers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench_core import fmt_t as fmt  # this folder is on sys.path when a benchmark runs
from IPython.core.interactiveshell import InteractiveShell

import mpmagic
from mpmagic import pool as pool_module
from mpmagic.backends.local import LocalBackend

CELL = """
def sq(x):
    return x * x

def work(n):
    s = 0
    for i in range(n):
        s += i * i
    return s
"""


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_op(fn: Callable[[], Any], n: int) -> float:
    """Median over 5 batches of the seconds one call of ``fn`` takes."""
    def batch() -> None:
        for _ in range(n):
            fn()
    return median_time(batch, 5) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller plain client.map")
    args = ap.parse_args()
    reps = 3 if args.quick else 5
    n_tiny = 100_000
    n_plain = 2_000 if args.quick else 10_000  # plain client.map: one task per item
    cpu_items = [3_000_000] * 8

    shell = InteractiveShell.instance()
    shell.run_cell(CELL, store_history=False)
    sq, work = shell.user_ns["sq"], shell.user_ns["work"]

    # Both pools stay up and every repeat runs each contender once, in turn, so
    # that load from other processes on the machine hits all of them alike.
    t0 = time.perf_counter()
    dask_backend = mpmagic.use_dask(workers=2)
    dask_start = time.perf_counter() - t0
    client = dask_backend.client
    local_backend = LocalBackend(2)
    local_backend.wait_ready()

    def on(backend: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            pool_module._backend = backend  # the benchmark switches without stopping either
            return fn()
        return run

    def plain_map(items: Any, f: Callable = sq) -> list:
        return client.gather(client.map(f, items, pure=False))

    tiny = range(n_tiny)
    contenders = {
        "serial": {"tiny": lambda: list(map(sq, tiny)), "cpu": lambda: list(map(work, cpu_items)), "latency": None},
        "dask": {
            "tiny": on(dask_backend, lambda: mpmagic.pmap(sq, tiny)),
            "cpu": on(dask_backend, lambda: mpmagic.pmap(work, cpu_items)),
            "latency": on(dask_backend, lambda: mpmagic.pmap(sq, [1, 2])),
        },
        "plain": {"tiny": None, "cpu": lambda: plain_map(cpu_items, work), "latency": lambda: plain_map([1, 2])},
        "local": {
            "tiny": on(local_backend, lambda: mpmagic.pmap(sq, tiny)),
            "cpu": on(local_backend, lambda: mpmagic.pmap(work, cpu_items)),
            "latency": on(local_backend, lambda: mpmagic.pmap(sq, [1, 2])),
        },
    }
    samples: dict[str, dict[str, list[float]]] = {c: {"tiny": [], "cpu": [], "latency": []} for c in contenders}
    for what, rounds, inner in (("latency", 20, 1), ("tiny", reps, 1), ("cpu", reps, 1)):
        for fns in contenders.values():  # warm-up
            if fns[what] is not None:
                fns[what]()
        for _ in range(rounds):
            for name, fns in contenders.items():
                if fns[what] is not None:
                    samples[name][what].append(median_time(fns[what], inner, warmup=0))
    res = {c: {w: statistics.median(v) for w, v in ws.items() if v} for c, ws in samples.items()}
    pool_module._backend = dask_backend
    mpmagic.pmap(sq, tiny)
    res["dask"]["tiny_chunks"] = mpmagic.last_report().chunks
    plain_small = median_time(lambda: plain_map(range(n_plain)), 1 if args.quick else 3)
    res["plain"]["tiny_measured"] = plain_small
    res["plain"]["tiny"] = plain_small * n_tiny / n_plain  # one task per item: linear
    serial_tiny, serial_cpu = res["serial"]["tiny"], res["serial"]["cpu"]

    dq, dl = mpmagic.Queue(), mpmagic.Lock()

    def dq_roundtrip() -> None:
        dq.put(1)
        dq.get()

    def lock_roundtrip(lock: Any) -> Callable[[], None]:
        def f() -> None:
            lock.acquire()
            lock.release()
        return f

    helpers = {"dask_queue": per_op(dq_roundtrip, 50), "dask_lock": per_op(lock_roundtrip(dl), 50)}
    pool_module._backend = local_backend
    lq, ll = mpmagic.Queue(), mpmagic.Lock()

    def lq_roundtrip() -> None:
        lq.put(1)
        lq.get()

    helpers["local_queue"] = per_op(lq_roundtrip, 2000)
    helpers["local_lock"] = per_op(lock_roundtrip(ll), 2000)
    local_backend.stop()
    dask_backend.stop()
    pool_module._backend = None

    # -- report ---------------------------------------------------------------
    cpus = os.cpu_count()
    print(f"Machine: {platform.processor() or platform.machine()}, {cpus} CPUs, Python {sys.version.split()[0]}, "
          f"dask {__import__('dask').__version__}, load average {os.getloadavg()[0]:.1f} at the end. "
          f"Local Dask cluster started in {dask_start:.1f} s.\n")
    print("| workload | serial | mpmagic on Dask | plain `client.map` | mpmagic local |")
    print("|---|---|---|---|---|")
    print(f"| 100,000 tiny items (`x * x`) | {fmt(serial_tiny)} | {fmt(res['dask']['tiny'])} "
          f"({res['dask']['tiny_chunks']} chunks) | ~{fmt(res['plain']['tiny'])} "
          f"(extrapolated from {n_plain:,} items: {fmt(res['plain']['tiny_measured'])}) | {fmt(res['local']['tiny'])} |")
    print(f"| CPU-bound, 8 x `work(3_000_000)` | {fmt(serial_cpu)} | {fmt(res['dask']['cpu'])} "
          f"(speedup {serial_cpu / res['dask']['cpu']:.2f}x) | {fmt(res['plain']['cpu'])} "
          f"(speedup {serial_cpu / res['plain']['cpu']:.2f}x) | {fmt(res['local']['cpu'])} "
          f"(speedup {serial_cpu / res['local']['cpu']:.2f}x) |")
    print(f"| warm latency, 2-item map | - | {fmt(res['dask']['latency'])} | {fmt(res['plain']['latency'])} "
          f"| {fmt(res['local']['latency'])} |")
    print()
    print("| helper operation (from the notebook process) | on Dask | local (shared memory) | ratio |")
    print("|---|---|---|---|")
    print(f"| `Queue` put + get | {fmt(helpers['dask_queue'])} | {fmt(helpers['local_queue'])} "
          f"| {helpers['dask_queue'] / helpers['local_queue']:.0f}x |")
    print(f"| `Lock` acquire + release | {fmt(helpers['dask_lock'])} | {fmt(helpers['local_lock'])} "
          f"| {helpers['dask_lock'] / helpers['local_lock']:.0f}x |")


if __name__ == "__main__":
    main()
