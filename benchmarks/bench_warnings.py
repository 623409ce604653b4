"""A task that warns on every item: mpmagic against serial, joblib and Pool(fork).

    .venv/bin/python benchmarks/bench_warnings.py            # 200,000 items, 5 rounds
    .venv/bin/python benchmarks/bench_warnings.py --quick    # 50,000 items, 3 rounds

Library upgrades make hot code warn (pandas 3 deprecated ``Timestamp.dayofweek``):
each item raises the same ``DeprecationWarning``. Serially Python's warning
registry drops the repeats in C; mpmagic must do as well in its workers, while
it sends each distinct warning home to be shown by the notebook's filters. The
notebook has numpy imported, whose "always" filter for its ``RankWarning``
once made workers send every repeat of every warning (4x slower than
serial). ``Pool(fork)`` and joblib do not bring task warnings home at all
(they print in the workers); the figures are medians, ratios against serial.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
import numpy  # noqa: E402,F401  (its "always" filter for RankWarning, as in a notebook that imports it)
from bench_core import fmt_t, race  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

import mpmagic  # noqa: E402

WORKERS = 2
CELL = """
import warnings

def old_api(x):
    warnings.warn("old_api is deprecated", DeprecationWarning, stacklevel=1)
    return x * 2

def quiet(x):
    return x * 2
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items and rounds")
    args = parser.parse_args()
    n, rounds = (50_000, 3) if args.quick else (200_000, 5)
    shell = InteractiveShell.instance()
    shell.run_cell(CELL, store_history=False)
    old_api, quiet = shell.user_ns["old_api"], shell.user_ns["quiet"]
    warnings.simplefilter("default", DeprecationWarning)  # as IPython shows a cell's own deprecations
    items = list(range(n))
    from joblib import Parallel, delayed

    # The workers' own warning lines (joblib's and Pool's print there, once per
    # worker or batch) go to /dev/null: every process started below inherits it.
    saved_fd = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            joblib = Parallel(n_jobs=WORKERS, backend="loky", batch_size="auto")
            mpmagic.start_pool(WORKERS, wait=True)
            rows = []
            with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
                for label, func in (("a DeprecationWarning from each item", old_api), ("the same function without it", quiet)):
                    got = race({
                        "serial": lambda f=func: list(map(f, items)),
                        "mpmagic": lambda f=func: mpmagic.pmap(f, items),
                        "joblib": lambda f=func: joblib(delayed(f)(x) for x in items),
                        "pool": lambda f=func: pool.map(f, items),
                    }, rounds, warmup=1)
                    rows.append((label, got))
            mpmagic.stop_pool()
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
    print(f"| {n:,} tiny items, {WORKERS} workers | serial | mpmagic | joblib (loky) | Pool(fork) |")
    print("|---|---|---|---|---|")
    for label, got in rows:
        cells = [fmt_t(got["serial"])] + [f"{fmt_t(got[k])} ({got['serial'] / got[k]:.2f}x)" for k in ("mpmagic", "joblib", "pool")]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
