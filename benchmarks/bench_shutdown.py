"""How long a Jupyter kernel takes to shut down, with and without mpmagic.

    .venv/bin/python benchmarks/bench_shutdown.py           # 3 kernels per row
    .venv/bin/python benchmarks/bench_shutdown.py --quick   # 1 kernel per row

Each row starts a real ipykernel through jupyter_client, runs one cell, then
asks the kernel to shut down as Jupyter's "Shut down kernel" does
(``shutdown_kernel(now=False)``) and times it until the process is gone,
with its exit status: 0 when it exited by itself, -15 or -9 when
jupyter_client had to kill it. ipykernel waits for its child processes
before it exits, so any helper process that outlives the cell (multiprocessing's
resource tracker, a fork server) is what this measures. Figures are medians;
the output is markdown for docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

from jupyter_client import KernelManager

ROWS = {
    "a kernel that ran `1`": "1",
    "`multiprocessing.Pool(2)` (fork) used and closed": (
        "import multiprocessing as mp\nwith mp.get_context('fork').Pool(2) as p:\n    p.map(abs, [1, 2])"),
    "`multiprocessing` forkserver `Pool(2)` used and closed": (
        "import multiprocessing as mp\nwith mp.get_context('forkserver').Pool(2) as p:\n    p.map(abs, [1, 2])"),
    "`%load_ext mpmagic` and a `%pmap`": "%load_ext mpmagic\n_ = %pmap -q abs, [1, 2]",
    "`import mpmagic; mpmagic.pmap(...)` (no `%load_ext`)": "import mpmagic\n_ = mpmagic.pmap(abs, [1, 2])",
}


def shutdown_time(code: str) -> tuple[float, int | None]:
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
    process = km.provisioner.process
    t0 = time.perf_counter()
    km.shutdown_kernel(now=False)
    return time.perf_counter() - t0, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one kernel per row")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    print("| a kernel that ran | shutdown (median) | exit status |")
    print("|---|---|---|")
    for label, code in ROWS.items():
        runs = [shutdown_time(code) for _ in range(repeats)]
        seconds = statistics.median(t for t, _ in runs)
        statuses = sorted({str(rc) for _, rc in runs})
        print(f"| {label} | {seconds:.2f} s | {', '.join(statuses)} |", flush=True)


if __name__ == "__main__":
    main()
