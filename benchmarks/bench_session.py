"""A long notebook session: what every cell pays once mpmagic is loaded.

    .venv/bin/python benchmarks/bench_session.py           # about a minute
    .venv/bin/python benchmarks/bench_session.py --quick   # smoke run

After each cell mpmagic's ``post_run_cell`` hook looks for modules the
notebook imported, to warm the workers (``warmup.py``). The rows time an
empty cell (``pass``) and a small ``%pmap`` as the notebook grows to N
functions (a long session also gathers IPython's ``_iN`` names, one per
cell), in an IPython shell with mpmagic loaded and, as the baseline, in a
shell without it (a child process each, so neither sees the other's state).
Figures are the median of the repeats, in milliseconds; print is markdown for
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SIZES = (0, 1_000, 10_000, 20_000)


def child(with_mpmagic: bool, repeats: int, sizes: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Run in a fresh process: the per-cell times at each notebook size."""
    import contextlib
    import io

    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    quiet = contextlib.redirect_stdout(io.StringIO())
    if with_mpmagic:
        with quiet:
            shell.run_cell("%load_ext mpmagic\nimport mpmagic\nmpmagic.start_pool(2, wait=True)")

    def per_cell(text: str) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                shell.run_cell(text, store_history=False)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    rows: dict[int, dict[str, float]] = {}
    defined = 0
    for size in sizes:
        shell.run_cell(f"for _k in range({defined}, {size}):\n"
                       "    exec(f'def g_{_k}(x):\\n    return x + {_k}', globals())", store_history=False)
        defined = size
        rows[size] = {"empty": per_cell("pass")}
        if with_mpmagic:
            rows[size]["pmap"] = per_cell("r = %pmap -q abs, range(10)")
    if with_mpmagic:
        shell.run_cell("mpmagic.stop_pool()")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    parser.add_argument("--child", choices=["with", "without"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats, sizes = (5, SIZES[:2]) if args.quick else (30, SIZES)
    if args.child:
        print(json.dumps(child(args.child == "with", repeats, sizes)))
        return
    got = {}
    for kind in ("without", "with"):
        argv = [sys.executable, __file__, "--child", kind] + (["--quick"] if args.quick else [])
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        got[kind] = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    print("| notebook functions | empty cell, no mpmagic | empty cell, mpmagic loaded | `%pmap -q abs, range(10)` |")
    print("|---|---|---|---|")
    for size in sizes:
        print(f"| {size:,} | {got['without'][size]['empty']:.2f} ms | {got['with'][size]['empty']:.2f} ms "
              f"| {got['with'][size]['pmap']:.2f} ms |")


if __name__ == "__main__":
    main()
