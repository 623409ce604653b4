"""A notebook cycling through more functions than the Dask backend kept payloads for.

    .venv/bin/python benchmarks/bench_dask_payloads.py           # 12 functions, 6 rounds each way
    .venv/bin/python benchmarks/bench_dask_payloads.py 20 3      # 20 functions, 3 rounds

Each call maps one of N tiny functions (defined as in a notebook) over 4 items on
the ``LocalCluster`` that ``%pool dask -n 4`` starts, the functions in turn. The
Dask backend keeps each function's payload on the cluster between calls (a hold
task every chunk depends on: ``DaskBackend._payload_future``); a payload it let go
is sent again, as a new hold task, replicated to every worker. Two rules, in
alternating rounds of one process (load from other processes hits both alike):

* ``8 kept``: the 8 most recent whatever their size (before 2026-12-03), set
  here by a byte budget of 0 (``payload_cache.KEEP_BYTES``), which leaves the
  8 always kept;
* ``now``: the 8 most recent, and up to 64 within 32 MB (``payload_cache.excess``).

Printed: median and mean time per call, the CPU time per call of the notebook and
the cluster's processes, and how many hold tasks the timed calls sent.
"""

from __future__ import annotations

import statistics
import sys
import time

import psutil

import mpmagic
from mpmagic import payload_cache


def _cpu_seconds() -> float:
    """CPU time of this process and its children (the LocalCluster's scheduler runs here)."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    backend = mpmagic.use_dask(workers=4)
    funcs = []
    for i in range(n):
        ns: dict = {"__name__": "__main__"}
        exec(f"def f{i}(x):\n    return x + {i}\n", ns)
        funcs.append(ns[f"f{i}"])
    sent = [0]
    submit = backend.client.submit

    def counting(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(kwargs.get("key", "")).startswith("mpmagic-payload-"):
            sent[0] += 1
        return submit(fn, *args, **kwargs)

    backend.client.submit = counting
    budget = payload_cache.KEEP_BYTES
    times: dict[str, list[float]] = {"8 kept": [], "now": []}
    cpu = dict.fromkeys(times, 0.0)
    holds = dict.fromkeys(times, 0)
    try:
        for r in range(2 * rounds):
            rule = "8 kept" if r % 2 == 0 else "now"
            payload_cache.KEEP_BYTES = 0 if rule == "8 kept" else budget
            while rule == "8 kept" and len(backend._payloads) > 8:
                backend._payloads.popitem(last=False)
            for f in funcs:  # one cycle to settle the rule
                mpmagic.pmap(f, range(4))
            cpu0, sent0 = _cpu_seconds(), sent[0]
            for _ in range(3):
                for f in funcs:
                    t0 = time.perf_counter()
                    mpmagic.pmap(f, range(4))
                    times[rule].append(time.perf_counter() - t0)
            cpu[rule] += _cpu_seconds() - cpu0
            holds[rule] += sent[0] - sent0
    finally:
        payload_cache.KEEP_BYTES = budget
        mpmagic.stop_pool()
    print(f"{n} functions in turn, 4 items a call, {len(times['now'])} calls per rule")
    print("| rule | median per call | mean | CPU per call | hold tasks sent |")
    print("|---|---|---|---|---|")
    for rule, ts in times.items():
        print(f"| {rule} | {statistics.median(ts) * 1e3:.1f} ms | {statistics.mean(ts) * 1e3:.1f} ms | "
              f"{cpu[rule] / len(ts) * 1e3:.1f} ms | {holds[rule]} |")


if __name__ == "__main__":
    main()
