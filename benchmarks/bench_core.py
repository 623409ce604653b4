"""mpmagic against serial, multiprocessing.Pool(fork), joblib (loky) and mpire.

One command, one run, every figure a median over several repeats:

    .venv/bin/python benchmarks/bench_core.py            # full (about 4-6 minutes)
    .venv/bin/python benchmarks/bench_core.py --quick    # smoke run (about 1 minute)

Functions are defined as in a notebook: by ``run_cell`` in an IPython
``InteractiveShell``, so ``__main__`` has no file and a spawn/forkserver
child cannot import them (mpmagic ships them by value; ``Pool(fork)`` and
mpire inherit them by fork; joblib's loky ships them with cloudpickle).
mpmagic runs on its default start method (forkserver on Linux) with 2
workers; so do the others. mpire is measured only if installed
(``pip install mpire``); it is not a dependency of mpmagic.

Sections: the table of the issue's workloads (times and ratios), cold start,
``%%parallel``, a large captured global used by two calls, a 10-million-item
generator, memory (idle worker, peak of the big-array case over all
processes), and scaling (cost per item from 10 to 10**7 items, and per byte
from 100 B to 100 MB items). The printed markdown goes into
docs/performance.md as is.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
from IPython.core.interactiveshell import InteractiveShell

import mpmagic
from mpmagic import payload_cache, shm

WORKERS = 2

CELL = """
import numpy as np

def work(n):
    s = 0
    for i in range(n):
        s += i * i
    return s

def sq(x):
    return x * x

def low_bits(x):
    return x & 7

def nbytes(a):
    return a.nbytes

def same(a):
    return a

def pick(i):
    return float(big[i])

def rev_len(b):
    return len(b[::-1])
"""


# --------------------------------------------------------------------------
# helpers


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def race(fns: dict[str, Callable[[], Any] | None], repeats: int, warmup: int = 1) -> dict[str, float | None]:
    """Median wall time of each function, run round-robin so that load from
    other processes on the machine falls on all of them alike; each round
    starts with the next one, so none always runs first (or right after the
    same neighbour)."""
    live = {k: f for k, f in fns.items() if f is not None}
    for _ in range(warmup):
        for f in live.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in live}
    order = list(live.items())
    for r in range(repeats):
        for k, f in order[r % len(order) :] + order[: r % len(order)]:
            gc.collect()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(times[k]) if k in times else None) for k in fns}


def fmt_t(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-6:
        return f"{t * 1e9:.0f} ns"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def fmt_mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB"


def _pss(p: psutil.Process) -> int:
    """PSS of one process in bytes: /proc/PID/smaps_rollup is fast enough to sample often."""
    try:
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return p.memory_full_info().pss
    except psutil.Error:
        return 0


class PeakMemory:
    """Samples the PSS (proportional set size) of this process and its children.

    PSS splits shared pages between the processes that map them, so the sum
    over processes counts a shared-memory segment once.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def total() -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            total += _pss(p)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak = self.total()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total())


def calibrate_work(ns: dict, seconds: float) -> int:
    n = 200_000
    while True:
        t = median_time(lambda n=n: ns["work"](n), 3, 0)
        if t > 0.02:
            return int(n * seconds / t)
        n *= 4


# --------------------------------------------------------------------------
# the peers


_open_peers: list = []


class Peers:
    """Warm pools of the other libraries, 2 workers each."""

    def __init__(self) -> None:
        from joblib import Parallel

        _open_peers.append(self)

        self.fork_pool = multiprocessing.get_context("fork").Pool(WORKERS)
        self.joblib = Parallel(n_jobs=WORKERS, backend="loky")
        try:
            from mpire import WorkerPool

            self.mpire = WorkerPool(n_jobs=WORKERS, start_method="fork", keep_alive=True)
        except ImportError:
            self.mpire = None

    def pool_map(self, f, xs):
        return self.fork_pool.map(f, xs)

    def joblib_map(self, f, xs):
        from joblib import delayed

        return self.joblib(delayed(f)(x) for x in xs)

    def mpire_map(self, f, xs):
        return self.mpire.map(f, [(x,) for x in xs]) if self.mpire else None

    def close(self) -> None:
        """Stop the peers' worker processes (safe to call twice)."""
        if self not in _open_peers:
            return
        _open_peers.remove(self)
        self.fork_pool.terminate()
        self.fork_pool.join()
        if self.mpire is not None:
            self.mpire.terminate()
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)


# --------------------------------------------------------------------------
# measurements


def table_row(name: str, serial: float | None, times: dict[str, float | None], speedup: bool) -> str:
    cells = [name, fmt_t(serial)]
    for key in ("mpmagic", "pool", "joblib", "mpire"):
        t = times.get(key)
        if t is None:
            cells.append("-")
        elif speedup and serial:
            cells.append(f"{fmt_t(t)} ({serial / t:.2f}x)")
        else:
            cells.append(fmt_t(t))
    return "| " + " | ".join(cells) + " |"


SECTIONS = ("table", "cold", "parallel", "global", "lazy", "scaling")


def run(quick: bool, only: set[str] | None = None) -> None:
    reps = 3 if quick else 7

    def want(section: str) -> bool:
        return only is None or section in only
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    say("## Machine")
    say()
    say(f"- {os.cpu_count()} CPUs (`nproc`: {len(os.sched_getaffinity(0))}), "
        f"{fmt_mb(psutil.virtual_memory().total)} RAM, {platform.platform()}")
    say(f"- Python {platform.python_version()}, numpy {np.__version__}, mpmagic {mpmagic.__version__}, "
        f"start method {multiprocessing.get_start_method(allow_none=True) or 'default'} -> mpmagic uses "
        f"{mpmagic.get_pool().start_method}")
    say(f"- command: `.venv/bin/python benchmarks/bench_core.py{' --quick' if quick else ''}`, "
        f"medians of {reps} repeats ({reps * 3} for the 100,000 tiny items), {WORKERS} workers everywhere")
    say(f"- load average when the run started (other jobs on the machine): "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    say()

    ip = InteractiveShell.instance(colors="nocolor")
    ip.run_cell("%load_ext mpmagic", store_history=False)
    ip.run_cell(CELL, store_history=False)
    ns = ip.user_ns
    mpmagic.use_local(WORKERS)
    mpmagic.get_pool().wait_ready()
    pmap = mpmagic.pmap
    peers = Peers() if want("table") else None
    has_mpire = peers is not None and peers.mpire is not None
    try:
        import joblib

        jver = joblib.__version__
    except Exception:  # pragma: no cover
        jver = "?"
    mver = ""
    if has_mpire:
        from importlib.metadata import version

        mver = version("mpire")

    work, sq = ns["work"], ns["sq"]
    two = [1, 2]
    np_sum = np.sum

    if want("table"):
        # ---- the main table ----------------------------------------------------
        n_work = calibrate_work(ns, 0.2)
        cpu_items = [n_work] * 8
        rows = []

        def contest(label: str, f: Callable, xs: list, repeats: int, speedup: bool = False, warmup: int = 1):
            """Race serial map(f, xs) and every library's map on it; add the table row."""
            times = race(
                {
                    "serial": lambda: list(map(f, xs)),
                    "mpmagic": lambda: pmap(f, xs),
                    "pool": lambda: peers.pool_map(f, xs),
                    "joblib": lambda: peers.joblib_map(f, xs),
                    "mpire": (lambda: peers.mpire_map(f, xs)) if has_mpire else None,
                },
                repeats,
                warmup,
            )
            serial = times.pop("serial")
            rows.append(table_row(label, serial, times, speedup))
            return serial, times

        cpu = contest("8 CPU-bound tasks of ~0.2 s (speedup)", work, cpu_items, reps, speedup=True)
        # ~10 ms each: more repeats cost little and steady the medians
        tiny_t = contest("100,000 tiny items (x*x)", sq, list(range(100_000)), reps * 3)
        warm = contest("warm 2-item map", sq, [1, 2], 50 if quick else 200, warmup=5)[1]
        # Medium plain items (userperf13 F1): the bytes travel the pipe as they do for Pool.
        rev_len = ns["rev_len"]
        medium_b = contest("2,000 `bytes` items of 100 kB (`len(b[::-1])`)", rev_len,
                           [bytes(100_000) for _ in range(2000)], reps)
        medium_s = contest("100,000 `str` items of ~1 kB (same)", rev_len,
                           ["x" * 1000 + str(i) for i in range(100_000)], reps)
        big = np.random.default_rng(0).random((256 << 20) // 8)
        parts = np.array_split(big, 8)
        arr = contest("sum of a 256 MB array in 8 chunks", np_sum, parts, reps)
        shared = mpmagic.share(big)  # the same data, living in shared memory from the start
        sparts = np.array_split(shared, 8)
        s_times = race({"serial": lambda: [np_sum(p) for p in sparts], "mpmagic": lambda: pmap(np_sum, sparts)}, reps)
        s_serial = s_times.pop("serial")
        rows.append(table_row("same, array made by `mpmagic.share` (others: as above)", s_serial, s_times, False))
        arr_shared = (s_serial, s_times)

        say("## Workloads (median wall time; CPU-bound: speedup over serial)")
        say()
        say(f"| workload | serial | mpmagic (forkserver) | mp.Pool(fork) | joblib {jver} (loky) | "
            f"{'mpire ' + mver + ' (fork)' if has_mpire else 'mpire (not installed)'} |")
        say("|---|---|---|---|---|---|")
        for r in rows:
            say(r)
        say()
        say("Ratios (higher is better for mpmagic):")
        say()
        s, t = cpu
        say(f"- CPU-bound: mpmagic speedup {s / t['mpmagic']:.2f}x (target >= 1.9x; issue 2: >= 1.8x); "
            f"joblib {s / t['joblib']:.2f}x, mp.Pool(fork) {s / t['pool']:.2f}x")
        s, t = tiny_t
        say(f"- 100,000 tiny items: mp.Pool(fork) / mpmagic = {t['pool'] / t['mpmagic']:.2f} (target >= 1), "
            f"joblib / mpmagic = {t['joblib'] / t['mpmagic']:.1f} (target >= 20; issue 2: >= 1), "
            f"mpmagic / serial = {t['mpmagic'] / s:.1f}")
        for what, (_, t) in (("2,000 bytes items of 100 kB", medium_b), ("100,000 str items of ~1 kB", medium_s)):
            say(f"- {what}: mpmagic / mp.Pool(fork) = {t['mpmagic'] / t['pool']:.2f}, "
                f"mpmagic / joblib = {t['mpmagic'] / t['joblib']:.2f} (target <= 1.2 for both)")
        say(f"- warm 2-item map: mp.Pool(fork) / mpmagic = {warm['pool'] / warm['mpmagic']:.2f} (target >= 1; "
            f"issue 2: < 2 ms, got {fmt_t(warm['mpmagic'])}), joblib / mpmagic = {warm['joblib'] / warm['mpmagic']:.0f}")
        s, t = arr
        say(f"- 256 MB sum, plain numpy array (copied once per call into pooled shared memory): "
            f"mpmagic / serial = {t['mpmagic'] / s:.1f} (target <= 2), "
            f"joblib / mpmagic = {t['joblib'] / t['mpmagic']:.1f} (target >= 4), "
            f"mp.Pool(fork) / mpmagic = {t['pool'] / t['mpmagic']:.1f}")
        s2, t2 = arr_shared
        say(f"- 256 MB sum, array made by `mpmagic.share` (no copy at all): mpmagic / serial = "
            f"{t2['mpmagic'] / s2:.1f} (target <= 2), joblib / mpmagic = {t['joblib'] / t2['mpmagic']:.1f} "
            f"(target >= 4)")
        say()

        # ---- memory of the big-array case ----------------------------------------
        say("## Memory")
        say()
        peers.close()
        def settle() -> None:
            """Free what is no longer used, as a fresh session would have it."""
            shm.pool().trim(0)  # no pooled segments kept from earlier calls
            gc.collect()
            pmap(abs, [1, 2])  # workers drop their mappings of what was freed

        # Every process's memory before the array exists: the interpreters.
        big = parts = shared = sparts = None
        settle()
        interpreters = PeakMemory.total()
        big = np.random.default_rng(0).random((256 << 20) // 8)
        parts = np.array_split(big, 8)
        nbytes = big.nbytes

        def peak_of(label: str, chunks: list, note: str) -> None:
            settle()
            idle = PeakMemory.total()
            with PeakMemory() as pm:
                pmap(np_sum, chunks)
            added = max(0, pm.peak - idle)
            case = max(0, pm.peak - interpreters)
            say(f"- 256 MB sum, {label}: the case's memory at its peak, over the notebook and all "
                f"its child processes (peak PSS less the interpreters' before the array existed) "
                f"{fmt_mb(case)} = {case / nbytes:.2f}x the array (target < 1.5x): "
                f"{fmt_mb(max(0, idle - interpreters))} before the call (the array's data, {fmt_mb(nbytes)}, "
                f"as it is resident then) and {fmt_mb(added)} the call added ({note}). The interpreters themselves (IPython, "
                f"numpy, joblib and mpire imported here, 2 workers, the forkserver) took "
                f"{fmt_mb(interpreters)} whatever the array's size: {fmt_mb(pm.peak)} in all")

        peak_of("plain numpy array", parts, "the chunks in flight, copied into shared memory")
        shared = mpmagic.share(big)  # the user keeps only the shared array
        big = parts = None
        gc.collect()
        peak_of("`mpmagic.share` array (the plain one deleted)", np.array_split(shared, 8), "nothing is copied")
        shared = None
        rss = []
        for slot in mpmagic.get_pool().slots:
            mi = psutil.Process(slot.pid).memory_full_info()
            rss.append((mi.rss, mi.pss, mi.uss))
        big = parts = None
        gc.collect()
        mpmagic.restart_pool()
        fresh = []
        for slot in mpmagic.get_pool().slots:
            mi = psutil.Process(slot.pid).memory_full_info()
            fresh.append((mi.rss, mi.pss, mi.uss))
        say("- idle worker (fresh): " + ", ".join(f"RSS {fmt_mb(r)} (PSS {fmt_mb(p)}, USS {fmt_mb(u)})" for r, p, u in fresh)
            + " (target < 40 MB)")
        say("- idle worker after the numpy runs: " + ", ".join(f"RSS {fmt_mb(r)} (USS {fmt_mb(u)})" for r, _, u in rss))
        say()

    if want("cold"):
        # ---- cold start -------------------------------------------------------------
        say("## Cold start")
        say()
        cold = []
        for _ in range(reps):
            mpmagic.stop_pool()
            t0 = time.perf_counter()
            pmap(sq, two)
            cold.append(time.perf_counter() - t0)
        t_pool = []
        for _ in range(reps):
            t0 = time.perf_counter()
            with multiprocessing.get_context("fork").Pool(WORKERS) as p:
                p.map(sq, two)
            t_pool.append(time.perf_counter() - t0)
        from joblib import Parallel, delayed
        from joblib.externals.loky import get_reusable_executor

        t_job = []
        for _ in range(reps):
            get_reusable_executor().shutdown(wait=True)
            t0 = time.perf_counter()
            Parallel(n_jobs=WORKERS)(delayed(sq)(x) for x in two)
            t_job.append(time.perf_counter() - t0)
        get_reusable_executor().shutdown(wait=True)
        say(f"- start pool + first map: mpmagic {fmt_t(statistics.median(cold))} (forkserver), "
            f"mp.Pool(fork) {fmt_t(statistics.median(t_pool))}, joblib {fmt_t(statistics.median(t_job))}")
        for pause in (0.0, 1.0):
            loads, firsts = [], []
            for _ in range(reps):
                r = subprocess.run(
                    [sys.executable, __file__, "--cold-child", str(pause)], capture_output=True, text=True, timeout=120
                )
                try:
                    load, first = map(float, r.stdout.split())
                except ValueError:
                    print(r.stdout, r.stderr)
                    raise
                loads.append(load)
                firsts.append(first)
            when = "right after it" if not pause else f"{pause:g} s later (as when the next cell is typed)"
            say(f"- fresh interpreter: `%load_ext mpmagic` takes {fmt_t(statistics.median(loads))}; the first "
                f"`%pmap sq, [1, 2]` {when}: {fmt_t(statistics.median(firsts))} (target: within 0.3 s)")
        say()

    if want("parallel"):
        # ---- %%parallel ---------------------------------------------------------------
        say("## %%parallel")
        say()
        empty = median_time(lambda: ip.run_cell("%%parallel -n 2 -q\npass", store_history=False), reps * 3)
        n = 3_000_000 if quick else 10_000_000
        ns["N"] = n
        split = "s = 0\nfor i in range(rank, N, size):\n    s += i * i\ns"
        # silent: the cells' values are not echoed as Out[...] lines
        t_par = median_time(
            lambda: ip.run_cell("%%parallel -n 2 -q --reduce sum\n" + split, store_history=False, silent=True), reps
        )
        t_ser = median_time(
            lambda: ip.run_cell("rank, size = 0, 1\n" + split, store_history=False, silent=True), max(2, reps // 2)
        )
        say(f"- `%%parallel -n 2` on an empty cell: {fmt_t(empty)} (overhead of a run)")
        say(f"- split sum of squares of {n:,} numbers over 2 ranks: {fmt_t(t_par)} against {fmt_t(t_ser)} serial: "
            f"speedup {t_ser / t_par:.2f}x")
        say()

    if want("global"):
        # ---- large captured global --------------------------------------------------
        say("## A large captured global used by two consecutive calls")
        say()
        ns["big"] = np.random.default_rng(1).random((200 << 20) // 8)
        pick = ns["pick"]
        before = dict(payload_cache.stats)
        t0 = time.perf_counter()
        pmap(pick, range(64))
        t1 = time.perf_counter()
        pmap(pick, range(64))
        t2 = time.perf_counter()
        after = {k: payload_cache.stats[k] - before[k] for k in before}
        say(f"- 200 MB numpy array read by the mapped function: first call {fmt_t(t1 - t0)} (copies it once into "
            f"shared memory), second call {fmt_t(t2 - t1)} (compares it with the shared copy: unchanged, nothing "
            f"sent); payloads built {after['built']}, reused {after['same'] + after['fast']}")
        ns["big"][0] += 1.0  # a change in place must be seen
        t0 = time.perf_counter()
        r = pmap(pick, [0])
        say(f"- after `big[0] += 1` the next call sees the change ({r[0] == ns['big'][0]}) in {fmt_t(time.perf_counter() - t0)}")
        ns["big"] = None
        d = {i: str(i) for i in range(2_000_000 if quick else 4_000_000)}
        ns["table"] = d
        ip.run_cell("def look(i):\n    return table[i]", store_history=False)
        t0 = time.perf_counter()
        pmap(ns["look"], range(64))
        t1 = time.perf_counter()
        pmap(ns["look"], range(64))
        t2 = time.perf_counter()
        size = len(payload_cache._entries[(id(ns["look"]), True)].data)
        say(f"- a dict of {len(d):,} entries ({fmt_mb(size)} pickled): first call {fmt_t(t1 - t0)}, second "
            f"{fmt_t(t2 - t1)} (pickled again to check, not sent again)")
        ns["table"] = None
        say()

    if want("lazy"):
        # ---- lazy input -----------------------------------------------------------
        say("## Lazy input")
        say()
        n = 1_000_000 if quick else 10_000_000
        low = ns["low_bits"]
        gc.collect()
        rss0 = psutil.Process().memory_info().rss
        peak = [rss0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], psutil.Process().memory_info().rss)
                time.sleep(0.01)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        t0 = time.perf_counter()
        res = pmap(low, (i for i in range(n)))
        t_gen = time.perf_counter() - t0
        stop.set()
        th.join()
        result_bytes = sys.getsizeof(res)
        t_ser = median_time(lambda: list(map(low, range(n))), 1, 0)
        say(f"- `pmap(low_bits, (i for i in range({n:,})))`: {fmt_t(t_gen)} (serial {fmt_t(t_ser)}); notebook RSS grew "
            f"by {fmt_mb(peak[0] - rss0)} at peak, of which the result list is {fmt_mb(result_bytes)} "
            f"(the input as a list would be {fmt_mb(sys.getsizeof(list(range(n))) + 28 * n)})")
        del res
        say()

    if want("scaling"):
        # ---- scaling ------------------------------------------------------------------
        say("## Scaling")
        say()
        say("Cost per item as the number of items grows (x*x):")
        say()
        say("| items | serial | mpmagic | per item (mpmagic) |")
        say("|---|---|---|---|")
        sizes = [10, 100, 1000, 10_000, 100_000, 1_000_000] + ([] if quick else [10_000_000])
        for k in sizes:
            xs = range(k)
            r = max(1, min(reps, int(3e6 // k)))
            ts = median_time(lambda xs=xs: list(map(sq, xs)), r)
            tm = median_time(lambda xs=xs: pmap(sq, xs), r)
            say(f"| {k:,} | {fmt_t(ts)} | {fmt_t(tm)} | {fmt_t(tm / k)} |")
        say()
        say("Cost per item as item size grows (4 numpy uint8 items; `nbytes` sends items only, "
            "`same` sends them back too):")
        say()
        say("| item size | nbytes: mpmagic | nbytes: mp.Pool(fork) | same: mpmagic | same: mp.Pool(fork) | "
            "through shared memory |")
        say("|---|---|---|---|---|---|")
        fork_pool = multiprocessing.get_context("fork").Pool(WORKERS)
        nb, sm = ns["nbytes"], ns["same"]
        try:
            item_sizes = [100, 10_000, 1 << 20, 10 << 20, 100 << 20]
            if quick:
                item_sizes = item_sizes[:4]
            for size in item_sizes:
                items = [np.full(size, i, np.uint8) for i in range(4)]
                r = 3 if size >= 10 << 20 else reps
                a = median_time(lambda items=items: pmap(nb, items), r)
                b = median_time(lambda items=items: fork_pool.map(nb, items), r)
                c = median_time(lambda items=items: pmap(sm, items), r)
                d2 = median_time(lambda items=items: fork_pool.map(sm, items), r)
                via = "yes" if size >= shm.THRESHOLD else "no (pipe)"
                say(f"| {size:,} B | {fmt_t(a)} | {fmt_t(b)} | {fmt_t(c)} | {fmt_t(d2)} | {via} |")
                del items
        finally:
            fork_pool.terminate()
            fork_pool.join()
        say()
    mpmagic.stop_pool()
    left = [f for f in os.listdir("/dev/shm") if f.startswith(f"mpm_{os.getpid()}_")] if os.path.isdir("/dev/shm") else []
    say(f"Shared-memory segments left in /dev/shm after `stop_pool()`: {len(left)}")
    say()
    say(f"Load average at the end of the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


def cold_child(pause: float) -> None:
    """In a fresh interpreter: time ``%load_ext`` and the first ``%pmap``."""
    ip = InteractiveShell.instance(colors="nocolor")
    ip.run_cell("def sq(x):\n    return x * x", store_history=False)
    t0 = time.perf_counter()
    ip.run_cell("%load_ext mpmagic", store_history=False)
    t1 = time.perf_counter()
    if pause:  # as when the next cell is typed
        time.sleep(pause)
    t2 = time.perf_counter()
    ip.run_cell("r = %pmap -q sq, [1, 2]", store_history=False)
    t3 = time.perf_counter()
    assert ip.user_ns["r"] == [1, 4], ip.user_ns.get("r")
    print(t1 - t0, t3 - t2)
    mpmagic.stop_pool()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (a smoke run)")
    parser.add_argument(
        "--only", metavar="SECTIONS", help=f"comma-separated sections to run (of {', '.join(SECTIONS)}); default all"
    )
    parser.add_argument("--cold-child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_child is not None:
        cold_child(args.cold_child)
        return
    try:
        only = set(args.only.split(",")) if args.only else None
        if only and not only <= set(SECTIONS):
            parser.error(f"unknown section(s): {', '.join(sorted(only - set(SECTIONS)))}")
        run(args.quick, only)
    finally:
        for peers in list(_open_peers):  # never leave their workers behind
            peers.close()
        mpmagic.stop_pool()


if __name__ == "__main__":
    main()
