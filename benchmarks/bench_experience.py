"""What the notebook experience costs: progress bar, insights, and the reply's meta.

    .venv/bin/python benchmarks/bench_experience.py            # about a minute
    .venv/bin/python benchmarks/bench_experience.py --quick    # smoke run

Every figure is a median over several repeats on a warm 2-worker forkserver
pool, with the function defined as in a notebook (``run_cell``). Printed as
markdown for docs/experience.md.

1. A map of many tiny items (the case where per-item overhead shows most):
   plain, with a progress bar shown from the start, and with ``--insights``
   (which times every item in the workers).
2. The same with ``--chunksize 1`` (one message per item: the per-message
   cost of the ``meta`` dict every reply now carries, and of insights).
3. The meta dict's own cost per reply, pickled alone (micro-benchmark).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
import timeit

from IPython.core.interactiveshell import InteractiveShell

import mpmagic
from mpmagic import progress as progress_module
from mpmagic.api import pmap


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    repeat = 3 if args.quick else 7
    n_tiny = 50_000 if args.quick else 300_000
    n_fine = 1_000 if args.quick else 3_000

    shell = InteractiveShell.instance(colors="nocolor")
    shell.run_cell("%load_ext mpmagic", store_history=False)
    shell.run_cell("def sq(x):\n    return x * x\n", store_history=False)
    sq = shell.user_ns["sq"]
    backend = mpmagic.use_local(2, "forkserver")
    backend.wait_ready()
    # The bars write to a sink, not the terminal: the cost measured is tqdm's own.
    sink = open(os.devnull, "w")  # noqa: SIM115 - closed at the end
    from tqdm.std import tqdm as std_tqdm

    progress_module._tqdm_class = lambda: (lambda **kw: std_tqdm(file=sink, **kw))

    print(f"# mpmagic experience overhead ({sys.platform}, {os.cpu_count()} CPUs, median of {repeat})\n")
    print("| workload | plain | progress bar | insights | progress / plain | insights / plain |")
    print("|---|---|---|---|---|---|")
    for label, n, chunk in ((f"{n_tiny:,} tiny items, automatic chunks", n_tiny, None),
                            (f"{n_fine:,} tiny items, --chunksize 1", n_fine, 1)):
        data = list(range(n))
        pmap(sq, data, chunksize=chunk)  # warm the function cache
        plain = median_time(lambda d=data, c=chunk: pmap(sq, d, chunksize=c), repeat)
        bar = median_time(lambda d=data, c=chunk: pmap(sq, d, chunksize=c, progress=True, progress_delay=0), repeat)
        ins = median_time(lambda d=data, c=chunk: pmap(sq, d, chunksize=c, insights=True), repeat)
        print(f"| {label} | {plain * 1e3:.1f} ms | {bar * 1e3:.1f} ms | {ins * 1e3:.1f} ms "
              f"| {bar / plain:.2f} | {ins / plain:.2f} |")

    meta = {"worker": 1, "start": time.time(), "end": time.time()}
    reply = ("done", 1, 2, b"x" * 100, 0.001)
    n = 200_000
    without = min(timeit.repeat(lambda: pickle.dumps(reply, 5), number=n, repeat=5)) / n
    with_meta = min(timeit.repeat(lambda: pickle.dumps(reply + (meta,), 5), number=n, repeat=5)) / n
    print(f"\nPickling one reply: {without * 1e6:.2f} us without meta, {with_meta * 1e6:.2f} us with "
          f"(+{(with_meta - without) * 1e6:.2f} us per chunk; the reply is "
          f"{len(pickle.dumps(reply + (meta,), 5)) - len(pickle.dumps(reply, 5))} bytes longer).")
    mpmagic.stop_pool()
    sink.close()


if __name__ == "__main__":
    main()
