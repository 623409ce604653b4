"""mpmagic's shared helpers against ``multiprocessing.Manager`` proxies.

One command, one run, every figure a median over several repeats:

    .venv/bin/python benchmarks/bench_shared.py            # about 1 minute
    .venv/bin/python benchmarks/bench_shared.py --quick    # smoke run

Both sides run in the same warm mpmagic pool (2 workers, the default start
method) through ``mpmagic.parallel``, so the only difference is the helper:

* **Value**: each of 2 ranks does ``with v.get_lock(): v.value += 1`` in a
  loop (Manager: a ``Value`` proxy guarded by a ``Lock`` proxy, the usual
  way, since a Manager Value has no ``get_lock``).
* **Queue**: rank 0 puts small ints, rank 1 takes them (mpmagic: ``close()``
  and ``for item in q``; Manager: a ``None`` sentinel).
* **New segment**: the cost of reserving a segment's pages with
  ``posix_fallocate`` (what keeps a full ``/dev/shm`` from ending the
  notebook with SIGBUS) against the old ``ftruncate`` alone, each followed by
  writing the whole segment, as a map's items or results are.

Ranks time themselves with ``time.monotonic()`` (one clock for every process
on the machine); a rate is the operations of all ranks over the span from
the first rank's start to the last rank's end. The printed markdown goes into
docs/performance.md under "Shared helpers".
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time

import mpmagic

VALUE_CODE = """
import time
t0 = time.monotonic()
for _ in range(n):
    with lock:
        v.value += 1
t0, time.monotonic()
"""

def queue_code(ours: bool, item: str = "i", setup: str = "") -> str:
    """Rank 0 puts ``n`` items (``item``: the expression put), rank 1 takes them:
    mpmagic's ends with ``close()`` and ``for item in q``, the Manager's with a
    ``None`` sentinel. Each returns its (start, end) times."""
    end = "q.close()" if ours else "q.put(None)"
    take = "for item in q:\n        pass" if ours else "while q.get() is not None:\n        pass"
    return (f"import time\n{setup}t0 = time.monotonic()\nif rank == 0:\n    for i in range(n):\n"
            f"        q.put({item})\n    {end}\nelse:\n    {take}\nt0, time.monotonic()\n")


QUEUE_CODE_MPMAGIC, QUEUE_CODE_MANAGER = queue_code(True), queue_code(False)
BIG = "blob = b'x' * nbytes\n"  # (not ``size``: a rank's own name, the number of ranks)
BIG_CODE_MPMAGIC, BIG_CODE_MANAGER = queue_code(True, "blob", BIG), queue_code(False, "blob", BIG)


def rate(spans: list, ops: int) -> float:
    """Operations per second over the span of all ranks."""
    return ops / (max(end for _, end in spans) - min(start for start, _ in spans))


def measure(code: str, names: dict, ops: int, repeats: int) -> float:
    """Median rate of ``repeats`` runs (after one warm-up run)."""
    rates = []
    for i in range(repeats + 1):
        names = {**names, **names.get("_fresh", lambda: {})()}
        spans = mpmagic.parallel(code, workers=2, namespace=names, label_output=False)
        if i:  # the first run warms up imports and payload caches
            rates.append(rate(spans, ops))
    return statistics.median(rates)


def segment_cost(size: int, reserve: bool, repeats: int) -> float:
    """Median seconds to create a ``size``-byte segment, write all of it and unlink it."""
    import _posixshmem
    import mmap

    from mpmagic import posixshm

    payload = b"\x01" * size
    times = []
    for i in range(repeats + 1):
        name = f"mpm_{os.getpid()}_bench_{i}"
        t0 = time.perf_counter()
        if reserve:
            m = posixshm.create(name, size)
        else:  # what shm.py did before: size the file, let the first write fault the pages in
            fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size)
            os.close(fd)
        m[:] = payload
        m.close()
        posixshm.unlink(name)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations and repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    scale = 0.1 if args.quick else 1.0
    n_value, n_value_mgr = int(200_000 * scale), int(3_000 * scale)
    n_queue, n_queue_mgr = int(300_000 * scale), int(6_000 * scale)

    backend = mpmagic.start_pool(2, wait=True)
    method = backend.start_method
    manager = multiprocessing.get_context(method).Manager()
    try:
        # Value under its lock, 2 ranks incrementing.
        v = mpmagic.Value("i", 0)
        ours_value = measure(VALUE_CODE, {"v": v, "lock": v.get_lock(), "n": n_value}, 2 * n_value, repeats)
        mv, ml = manager.Value("i", 0), manager.Lock()
        mgr_value = measure(VALUE_CODE, {"v": mv, "lock": ml, "n": n_value_mgr}, 2 * n_value_mgr, repeats)
        assert v.value == 2 * n_value * (repeats + 1), v.value
        assert mv.value == 2 * n_value_mgr * (repeats + 1), mv.value

        # Queue, producer rank 0 to consumer rank 1 (a fresh queue per run: close() ends one).
        ours_queue = measure(
            QUEUE_CODE_MPMAGIC, {"n": n_queue, "_fresh": lambda: {"q": mpmagic.Queue()}}, n_queue, repeats
        )
        mgr_queue = measure(
            QUEUE_CODE_MANAGER, {"n": n_queue_mgr, "_fresh": lambda: {"q": manager.Queue()}}, n_queue_mgr, repeats
        )

        # A bounded queue (maxsize=2) of 4 MB items: bigger than the free ring, so
        # each item waits in the producer's backlog and streams in fragments.
        n_big, big = int(40 * scale) or 4, 4 << 20
        ours_big = measure(BIG_CODE_MPMAGIC, {"n": n_big, "nbytes": big,
                                              "_fresh": lambda: {"q": mpmagic.Queue(maxsize=2)}}, n_big, repeats)
        mgr_big = measure(BIG_CODE_MANAGER, {"n": n_big, "nbytes": big,
                                             "_fresh": lambda: {"q": manager.Queue(maxsize=2)}}, n_big, repeats)
    finally:
        manager.shutdown()
        mpmagic.stop_pool()

    sizes = [1 << 20, 16 << 20, 64 << 20]
    cost = {(size, r): segment_cost(size, r, repeats) for size in sizes for r in (False, True)}

    cpus = os.cpu_count()
    print(f"## Shared helpers ({'quick' if args.quick else 'full'} run)\n")
    print(
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, {cpus} CPUs, "
        f"mpmagic pool of 2 workers ({method}), median of {repeats} runs after a warm-up.\n"
    )
    print("| operation, 2 worker processes | mpmagic | multiprocessing.Manager | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| Value: `with lock: v.value += 1`, 2 ranks | {ours_value:,.0f} /s | {mgr_value:,.0f} /s "
        f"| {ours_value / mgr_value:.0f}x |"
    )
    print(
        f"| Queue: items from a producer rank to a consumer rank | {ours_queue:,.0f} /s | {mgr_queue:,.0f} /s "
        f"| {ours_queue / mgr_queue:.0f}x |"
    )
    print(
        f"| Queue, bounded (maxsize=2): 4 MB items from a producer rank to a consumer rank | {ours_big:,.1f} /s "
        f"| {mgr_big:,.1f} /s | {ours_big / mgr_big:.1f}x |"
    )
    print("\n| new segment, written once | ftruncate only (before) | posix_fallocate (now) | ratio |")
    print("|---|---:|---:|---:|")
    for size in sizes:
        old, new = cost[size, False], cost[size, True]
        print(f"| {size >> 20} MiB | {old * 1e3:.2f} ms | {new * 1e3:.2f} ms | {new / old:.2f}x |")
    print(f"\nTargets: Value at least 20x the Manager, Queue at least 5x. Command: `{' '.join(['python'] + sys.argv)}`")


if __name__ == "__main__":
    main()
