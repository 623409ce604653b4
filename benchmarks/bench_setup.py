"""Worker setup and thread caps (issue 18): what they save.

One command, every figure a median over the repeats:

    .venv/bin/python benchmarks/bench_setup.py            # about a minute
    .venv/bin/python benchmarks/bench_setup.py --quick    # smoke run

* **model load**: a setup that takes 2 s (``time.sleep(2)`` standing for
  loading a model) and a map of 1,000 items of 1 ms that use the model, on 2
  workers. First time: a fresh pool, ``%%pool setup`` (run in both workers at
  once) then the map; target under 2.5 s. Second time: the map alone (the
  setup is not repeated); target under 0.6 s. Against joblib (loky, 2 jobs)
  with the usual workaround, one batch per worker that loads the model before
  its items: every call pays the load again.
* **matrix products**: ``pmap`` of 16 products of 1,000 x 1,000 float64
  matrices on 2 workers, with the default thread caps (CPUs // workers BLAS
  threads per worker) and without caps (``MPMagic.worker_threads = 0``: every
  worker's BLAS starts one thread per CPU). The run's measured threads per
  worker (CPU time / task time) are printed too: above 1 is oversubscription.

The printed markdown goes into docs/performance.md under "Worker setup".
"""

from __future__ import annotations

import argparse
import statistics
import time

import mpmagic
from mpmagic import config, pool, setup_api, worker_setup

SETUP = "import time\ntime.sleep(2.0)  # loading a model\nMODEL = {'w': 2}\n"


def predict(x):
    t = time.perf_counter() + 0.001
    while time.perf_counter() < t:
        pass
    return MODEL["w"] * x  # noqa: F821 - defined by the worker setup


def joblib_batch(xs):
    time.sleep(2.0)  # every call loads the model again
    model = {"w": 2}
    out = []
    for x in xs:
        t = time.perf_counter() + 0.001
        while time.perf_counter() < t:
            pass
        out.append(model["w"] * x)
    return out


def matmul(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.random((1000, 1000))
    return float((a @ a).sum())


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_load(repeats: int) -> dict[str, float]:
    first, second, jl = [], [], []
    items = list(range(1000))
    for _ in range(repeats):
        pool.shutdown()
        worker_setup.clear()
        mpmagic.start_pool(2, wait=True)

        def cold():
            worker_setup.set_code(SETUP)
            assert not setup_api.run_everywhere()
            assert mpmagic.pmap(predict, items) == [2 * x for x in items]

        first.append(_timed(cold))
        for _ in range(3):  # later calls: no setup, a warm pool
            second.append(_timed(lambda: mpmagic.pmap(predict, items)))
    worker_setup.clear()
    pool.shutdown()
    try:
        from joblib import Parallel, delayed

        with Parallel(n_jobs=2) as par:
            par(delayed(abs)(i) for i in range(2))  # workers warm, as our pool is
            for _ in range(repeats):
                jl.append(_timed(lambda: par(delayed(joblib_batch)(items[i::2]) for i in range(2))))
    except ImportError:
        pass
    out = {"first": statistics.median(first), "second": statistics.median(second)}
    if jl:
        out["joblib"] = statistics.median(jl)
    return out


def products(repeats: int, n: int) -> dict[str, tuple[float, float | None]]:
    out = {}
    for label, setting in (("default caps", None), ("no caps", 0)):
        config.current().worker_threads = setting
        pool.shutdown()
        mpmagic.start_pool(2, wait=True)
        mpmagic.pmap(matmul, range(2))  # numpy imported in the workers
        times, per = [], []
        for _ in range(repeats):
            times.append(_timed(lambda: mpmagic.pmap(matmul, range(n))))
            r = mpmagic.last_report()
            if r.cpu_seconds and r.task_seconds:
                per.append(r.cpu_seconds / r.task_seconds)
        out[label] = (statistics.median(times), statistics.median(per) if per else None)
    config.current().worker_threads = None
    pool.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, fewer products (smoke run)")
    args = ap.parse_args()
    repeats = 1 if args.quick else 3
    m = model_load(repeats)
    print("| model load (2 s setup) + 1,000 items of 1 ms, 2 workers | seconds |")
    print("|---|---|")
    print(f"| mpmagic, first time (setup + map) | {m['first']:.2f} |")
    print(f"| mpmagic, second time (map only) | {m['second']:.2f} |")
    if "joblib" in m:
        print(f"| joblib, each call (loads the model again) | {m['joblib']:.2f} |")
    p = products(repeats, 4 if args.quick else 16)
    print()
    print(f"| {4 if args.quick else 16} matrix products 1,000 x 1,000, 2 workers | seconds | threads per worker (measured) |")
    print("|---|---|---|")
    for label, (t, per) in p.items():
        print(f"| {label} | {t:.2f} | {'-' if per is None else f'{per:.1f}'} |")


if __name__ == "__main__":
    main()
