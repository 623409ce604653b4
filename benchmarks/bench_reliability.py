"""How fast mpmagic notices failures, and what a long session costs.

    .venv/bin/python benchmarks/bench_reliability.py      # about 30 s
    .venv/bin/python benchmarks/bench_reliability.py --chaos [--calls N] [--seed S] [--timeout T] [--every K]

``--chaos`` runs the chaos soak of benchmarks/chaos.py instead (1,000 calls
with random kills, timeouts, exceptions, interrupts, large arrays, Queue
traffic and calls from a second thread; see its docstring) and prints its
table, with the notebook's memory every ``--every`` calls (RSS, heap, shared
memory, fds, result segments mapped, Python objects) and its growth per 100
calls; it exits with status 1 if any call ended wrongly or hung, or anything
leaked.

Measured, never asserted (tests/test_reliability.py and tests/test_kernel.py
assert only bounds that catch a hang, since a loaded 2-core machine can
stretch any one run): the time from a worker's death to the
``WorkerLostError`` in the cell (``%pmap``) and to the ``ParallelError``
(``%%parallel``), how far past ``--timeout`` the ``TaskTimeoutError`` comes,
the time from "interrupt kernel" to an idle kernel in a real Jupyter kernel
and from there until no process of the kernel is running, and the open
files, threads, processes and memory before and after 2,000 ``%pmap`` calls
and 200 ``%%parallel`` cells. Every figure is a median (and the max) over
repeats. Prints markdown for docs/reliability.md.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import psutil
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import mpmagic

SETUP = """
import os, signal, time
def killed(x):
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x
def stuck(x):
    if x == 1:
        time.sleep(60)
    return x
def tiny(x):
    return x + 1
some = list(range(20))
def exits(x):
    os._exit(7)
"""


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def in_process(ip: InteractiveShell, backend) -> list[str]:
    rows = []
    death = []
    for _ in range(15):
        backend.wait_ready()
        t = time.perf_counter()
        with capture_output():
            r = ip.run_cell("%pmap -q --chunksize 4 killed, range(8)")
        death.append(time.perf_counter() - t)
        assert isinstance(r.error_in_exec, mpmagic.WorkerLostError)
    rows.append(f"| worker SIGKILLed -> `WorkerLostError` in the cell (n=15) | "
                f"{ms(statistics.median(death))} | {ms(max(death))} |")
    rank = []
    for _ in range(15):
        backend.wait_ready()
        t = time.perf_counter()
        with capture_output():
            r = ip.run_cell("%%parallel -n 2 -q\nif rank == 1:\n    exits(5)\nrank\n")
        rank.append(time.perf_counter() - t)
        assert isinstance(r.error_in_exec, mpmagic.ParallelError)
    rows.append(f"| rank's worker exits -> `ParallelError` in the cell (n=15) | "
                f"{ms(statistics.median(rank))} | {ms(max(rank))} |")
    over = []
    for _ in range(5):
        backend.wait_ready()
        t = time.perf_counter()
        with capture_output():
            ip.run_cell("%pmap -q --timeout 0.5 stuck, range(2)")
        over.append(time.perf_counter() - t - 0.5)
    rows.append(f"| `--timeout 0.5`: error later than the timeout by (n=5) | "
                f"{ms(statistics.median(over))} | {ms(max(over))} |")
    return rows


def long_session(ip: InteractiveShell, backend) -> list[str]:
    for _ in range(30):
        ip.run_cell("%pmap -q tiny, some", silent=True)
        ip.run_cell("%%parallel -n 2 -q\nrank", silent=True)
    gc.collect()
    me = psutil.Process()

    def snap() -> dict[str, float]:
        workers = [psutil.Process(s.pid) for s in backend.slots]
        return {
            "open fds (notebook)": me.num_fds(),
            "threads (notebook)": me.num_threads(),
            "child processes": len(me.children(recursive=True)),
            "RSS notebook (MB)": me.memory_info().rss / 2**20,
            "RSS largest worker (MB)": max(w.memory_info().rss for w in workers) / 2**20,
        }

    before = snap()
    t = time.perf_counter()
    for _ in range(2000):
        ip.run_cell("%pmap -q tiny, some", silent=True)
    t_pmap = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(200):
        ip.run_cell("%%parallel -n 2 -q\nrank", silent=True)
    t_cells = time.perf_counter() - t
    gc.collect()
    after = snap()
    rows = [
        f"2,000 `%pmap` calls took {t_pmap:.1f} s ({ms(t_pmap / 2000)} each), "
        f"200 `%%parallel` cells {t_cells:.1f} s ({ms(t_cells / 200)} each).",
        "",
        "| | before | after |",
        "|---|---|---|",
    ]
    rows += [f"| {k} | {before[k]:.1f} | {after[k]:.1f} |" for k in before]
    return rows


def until_quiet(k, limit: float = 10.0) -> float:
    """Seconds until no process of the kernel (itself included) is running or
    runnable: the interrupted work really stopped, not just the cell."""
    t = time.perf_counter()
    while time.perf_counter() - t < limit:
        procs = [psutil.Process(k.pid), *k.descendants()]
        running = []
        for p in procs:
            try:
                if p.status() == psutil.STATUS_RUNNING:
                    running.append(p.pid)
            except psutil.Error:
                pass
        if not running:
            break
        time.sleep(0.005)
    return time.perf_counter() - t


def interrupts() -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_kernel import Kernel

    k = Kernel()
    try:
        k.ok("%load_ext mpmagic\n%pool start -n 2")
        k.ok("def spin(x):\n    print('spinning', x, flush=True)\n    while True:\n        pass\n")
        pm, par, quiet = [], [], []
        for _ in range(7):
            reply = k.execute("%pmap -q spin, range(8)", interrupt_when="spinning")
            quiet.append(reply.after_interrupt + until_quiet(k))
            pm.append(reply.after_interrupt)
            par.append(k.execute("%%parallel -n 2 -q\nprint('go', flush=True)\nwhile True:\n    pass\n",
                                 interrupt_when="go").after_interrupt)
    finally:
        k.close()
    return [
        f"| interrupt kernel during `%pmap` -> kernel idle (n=7) | {ms(statistics.median(pm))} | {ms(max(pm))} |",
        f"| interrupt kernel during `%%parallel` -> kernel idle (n=7) | {ms(statistics.median(par))} | {ms(max(par))} |",
        f"| interrupt kernel during `%pmap` -> every process of the kernel asleep, replacements started (n=7) | "
        f"{ms(statistics.median(quiet))} | {ms(max(quiet))} |",
    ]


def chaos_main(argv: list[str]) -> int:
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from chaos import soak

    parser = argparse.ArgumentParser(prog="bench_reliability.py --chaos")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1.0, help="--timeout of the calls given one (s)")
    parser.add_argument("--bound", type=float, default=60.0, help="a call longer than this is a hang (s)")
    parser.add_argument("--big", type=int, default=400_000, help="float64 elements of each numpy item")
    parser.add_argument("--every", type=int, default=100, help="record the notebook's memory every K calls")
    args = parser.parse_args(argv)
    summary = soak(args.calls, args.seed, args.timeout, args.bound, args.big, every=args.every)
    print(f"2 workers, forkserver, {psutil.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print(summary.table())
    if summary.leaks.get("_new_threads"):
        print("\nthreads alive at the end that were not at the baseline:", summary.leaks["_new_threads"])
    if summary.leaks.get("_new_fds"):
        print("\nfds open at the end that were not at the baseline:", summary.leaks["_new_fds"])
    return 1 if summary.problems or summary.leaks["_leaked"] else 0


def main() -> None:
    if "--chaos" in sys.argv[1:]:
        sys.exit(chaos_main([a for a in sys.argv[1:] if a != "--chaos"]))
    ip = InteractiveShell.instance(colors="nocolor")
    ip.run_cell("%load_ext mpmagic")
    backend = mpmagic.use_local(2, "forkserver")
    backend.wait_ready()
    ip.run_cell(SETUP)
    try:
        rows = in_process(ip, backend)
        session = long_session(ip, backend)
    finally:
        mpmagic.stop_pool()
    rows += interrupts()
    print(f"2 workers, forkserver, {psutil.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("| | median | max |\n|---|---|---|")
    print("\n".join(rows))
    print()
    print("\n".join(session))


if __name__ == "__main__":
    main()
