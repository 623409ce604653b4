"""The first call after ``import numpy``: warm workers against cold ones.

    .venv/bin/python benchmarks/bench_warm.py            # a few minutes
    .venv/bin/python benchmarks/bench_warm.py --quick    # smoke run (1 repeat)
    .venv/bin/python benchmarks/bench_warm.py --only pandas --repeat 9

Each run is a fresh process with an InteractiveShell (a notebook whose
imports we control), as a user meets it: ``%load_ext mpmagic`` (the pool
starts in the background), ``import numpy`` (and pandas), define the
function, wait one second, then the FIRST ``%pmap --compare`` and a second
one. Three kinds of workers: warm (the default), warm with only the modules
the notebook named (no submodules it loaded: warm-up before the submodule
mirror), and cold (``MPMAGIC_WARM=0``: the workers import numpy when the
function reaches them, inside the first call).

1. Monte Carlo (examples/data_work.ipynb's ``count_inside``) over 8 seeds.
2. A pandas groupby: a bootstrap mean per store over 8 store groups.
3. The same, each task also rendering its row as a styled HTML table:
   pandas loads its Styler (and jinja2) on first use, ~30 ms, which the
   user's one try of the function in the notebook loaded there.
4. Memory: each worker's RSS before and after it preloaded numpy, then
   pandas (psutil, from the notebook; median over the workers), and what
   the workers measured for each preloaded module (``%pool``'s list).

Figures are medians over the repeats; printed as markdown for
docs/performance.md, with the load average before and after (the machine
may be shared: the speedups then measure the other processes too). The
target: first-call speedup >= 1.6x on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

NUMPY_SETUP = """
import numpy as np

def count_inside(seed, n=3_000_000):
    rng = np.random.default_rng(seed)
    x, y = rng.random(n), rng.random(n)
    return int(np.count_nonzero(x * x + y * y <= 1.0))
"""
NUMPY_CALL = "%pmap --compare count_inside, range(8)"

PANDAS_SETUP = """
import numpy as np
import pandas as pd

rng = np.random.default_rng(1)
sales = pd.DataFrame({"store": rng.integers(0, 8, 200_000), "amount": rng.gamma(2.0, 20.0, 200_000).round(2)})

def bootstrap_mean(group, resamples=300):
    values = group["amount"].to_numpy()
    rng = np.random.default_rng(int(group["store"].iat[0]))
    means = [rng.choice(values, values.size).mean() for _ in range(resamples)]
    low, high = np.percentile(means, [2.5, 97.5])
    return {"store": int(group["store"].iat[0]), "mean": values.mean(), "low": low, "high": high}

groups = [group for _, group in sales.groupby("store")]
"""
PANDAS_CALL = "%pmap --compare bootstrap_mean, groups"

STYLED_SETUP = PANDAS_SETUP + """
def store_report(group, resamples=300):
    values = group["amount"].to_numpy()
    rng = np.random.default_rng(int(group["store"].iat[0]))
    means = [rng.choice(values, values.size).mean() for _ in range(resamples)]
    row = pd.DataFrame({"mean": [values.mean()], "low": [np.percentile(means, 2.5)],
                        "high": [np.percentile(means, 97.5)]})
    return row.style.set_uuid("store").format("{:.2f}").to_html()  # (a fixed id: equal results)

_ = store_report(groups[0])  # the user tries it once here (this loads pandas' Styler)
"""
STYLED_CALL = "%pmap --compare store_report, groups"

SCENARIOS = {"numpy Monte Carlo, 8 seeds": (NUMPY_SETUP, NUMPY_CALL),
             "pandas groupby bootstrap, 8 groups": (PANDAS_SETUP, PANDAS_CALL),
             "pandas bootstrap + styled table, 8 groups": (STYLED_SETUP, STYLED_CALL)}
# kind of workers -> (MPMAGIC_WARM, submodules mirrored)
KINDS = {"warm": ("1", True), "warm, named modules only": ("1", False), "cold (MPMAGIC_WARM=0)": ("0", False)}


def _shell():
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance(colors="nocolor")

    def run(code: str):
        r = ip.run_cell(code, store_history=False)  # not silent: that skips the post_run_cell hook
        if r.error_before_exec is not None:
            raise r.error_before_exec
        if r.error_in_exec is not None:
            raise r.error_in_exec
        return r.result

    return run


def one_run(scenario: str) -> dict:
    """In a fresh process: the user's sequence, then the first and second call."""
    import mpmagic
    from mpmagic import warmup

    if os.environ.get("BENCH_NO_SUBMODULES") == "1":
        warmup.MIRROR_LIMIT = 0  # warm-up as it was: only the modules the notebook named
    setup, call = SCENARIOS[scenario]
    run = _shell()
    run("%load_ext mpmagic")
    run(setup)
    time.sleep(1.0)  # as a user does between cells
    out = {}
    for label in ("first", "second"):
        run(call)
        r = mpmagic.last_report()
        out[label] = {"speedup": r.speedup, "wall": r.wall, "serial": r.serial,
                      "line": r.line(), "advice": r.advice, "one_time": (r.one_time or {}).get("total", 0.0)}
    mpmagic.stop_pool()
    return out


def memory_run() -> dict:
    """Worker RSS (MB): idle, after the notebook imported numpy, then pandas."""
    import psutil

    import mpmagic

    run = _shell()
    run("%load_ext mpmagic")
    backend = mpmagic.get_pool()
    backend.wait_ready()

    def rss() -> float:
        time.sleep(0.2)
        # Wait until the workers are idle again (their preload done): a has() task returns.
        run("def _has(name):\n    import sys\n    return name in sys.modules\n")
        run("_ = %pmap -q _has, ['x'] * 2")
        return statistics.median(psutil.Process(s.pid).memory_info().rss / 2**20 for s in backend.slots)

    out = {"idle": rss()}
    run("import numpy as np")
    out["numpy"] = rss()
    run("import pandas as pd")
    out["pandas"] = rss()
    run(STYLED_SETUP)  # pandas used, and its Styler loaded: the workers mirror that
    out["used"] = rss()
    out["preloaded"] = backend.warmth.describe()  # each module's own figure, measured in the workers
    mpmagic.stop_pool()
    return out


def _child(args: list[str], warm: str, submodules: bool = True) -> dict:
    env = dict(os.environ, MPMAGIC_WARM=warm, BENCH_NO_SUBMODULES="0" if submodules else "1")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child {args} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=5, help="fresh processes per row (default 5)")
    ap.add_argument("--only", default="", help="run only the workloads whose name contains this")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = memory_run() if args.child == "memory" else one_run(args.child)
        print("RESULT " + json.dumps(result))
        return
    repeat = 1 if args.quick else args.repeat
    print(f"# warm workers: the first call after import ({sys.platform}, {os.cpu_count()} CPUs, "
          f"2 workers, forkserver, median of {repeat}; load average at start {_load()})\n")
    print("| workload | workers | first call speedup | (parallel / serial, ms) | second call "
          "| one first call's report (the middle run) |")
    print("|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        if args.only not in scenario:
            continue
        # The kinds take turns, repeat by repeat, so a change in the machine's
        # load falls on all of them alike, in a shuffled order (seeded): with
        # a fixed order, each kind always ran after the same other kind.
        by_kind: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for i in range(repeat):
            order = list(KINDS)
            random.Random(i).shuffle(order)
            for kind in order:
                warm, submodules = KINDS[kind]
                by_kind[kind].append(_child(["--child", scenario], warm, submodules))
        for kind, runs in by_kind.items():
            first = statistics.median(r["first"]["speedup"] for r in runs)
            second = statistics.median(r["second"]["speedup"] for r in runs)
            wall = statistics.median(r["first"]["wall"] for r in runs) * 1e3
            serial = statistics.median(r["first"]["serial"] for r in runs) * 1e3
            middle = sorted(runs, key=lambda r: r["first"]["speedup"])[len(runs) // 2]
            line = middle["first"]["line"].split(" | ", 1)[-1]
            print(f"| {scenario} | {kind} | {first:.2f}x | {wall:.0f} / {serial:.0f} | {second:.2f}x | {line} |")
    print(f"\nload average at the end: {_load()}")
    if args.only and args.only not in "memory":
        return
    mem = [_child(["--child", "memory"], "1") for _ in range(max(1, repeat // 2))]
    idle, numpy_mb, pandas_mb, used_mb = (statistics.median(m[k] for m in mem) for k in ("idle", "numpy", "pandas", "used"))
    print("\n| worker RSS (median worker) | MB | added by the preload |")
    print("|---|---|---|")
    print(f"| idle, the notebook imported nothing heavy | {idle:.0f} | - |")
    print(f"| after `import numpy` in the notebook | {numpy_mb:.0f} | +{numpy_mb - idle:.0f} MB (numpy) |")
    print(f"| after `import pandas` too | {pandas_mb:.0f} | +{pandas_mb - numpy_mb:.0f} MB (pandas) |")
    print(f"| after the notebook used pandas' Styler | {used_mb:.0f} | +{used_mb - pandas_mb:.0f} MB (submodules) |")
    print(f"\nwhat the workers measured per module (%pool, one run): {', '.join(mem[0]['preloaded'])}")


if __name__ == "__main__":
    main()
