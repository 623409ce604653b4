"""When each chunk of one ``pmap`` call was packed, sent, run and received.

The profile behind the tiny-items work of docs/performance.md: cProfile
shows where the notebook process spends its time, but not what the workers
were doing meanwhile, nor the gaps where nobody computed. This prints, for a
few calls of ``pmap(sq, range(N))`` (or of 8 slices of a large array), a line
per event, in milliseconds from the call's start:

    pack  <chunk> <items>  when the notebook made the chunk (pickled its items)
    send  <chunk> <items>  when it wrote it to a worker's pipe
    recv  <chunk> <items>  when the results were handled, and when the worker
                           ran the chunk (its own clock, same epoch)

Run:  .venv/bin/python benchmarks/timeline.py [--items 100000] [--array-mb 0]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from IPython.core.interactiveshell import InteractiveShell

import mpmagic
from mpmagic import jobs
from mpmagic.backends import local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000, help="number of tiny items (x*x)")
    parser.add_argument("--array-mb", type=int, default=0, help="instead, sum 8 slices of an array of this many MB")
    parser.add_argument("--calls", type=int, default=3, help="timed calls (the last one is printed)")
    args = parser.parse_args()

    ip = InteractiveShell.instance(colors="nocolor")
    ip.run_cell("def sq(x):\n    return x * x", store_history=False)  # defined as in a notebook
    if args.array_mb:
        import numpy as np

        func: Any = np.sum
        items: list = np.array_split(np.random.default_rng(0).random((args.array_mb << 20) // 8), 8)
    else:
        func, items = ip.user_ns["sq"], list(range(args.items))
    mpmagic.use_local(2)
    mpmagic.get_pool().wait_ready()
    for _ in range(5):  # warm: workers up, function cached, time per item remembered
        mpmagic.pmap(func, items)

    events: list[tuple] = []
    t0 = [0.0]
    next_unit, done, send_unit = jobs.MapJob.next_unit, jobs.MapJob.done, local.LocalBackend._send_unit

    def traced_next_unit(self, limit=None):
        start = time.time()
        unit = next_unit(self, limit)
        if unit is not None:
            events.append((start - t0[0], time.time() - t0[0], "pack", unit.id, unit.count, ""))
        return unit

    def traced_send_unit(self, slot, run, unit):
        start = time.time()
        send_unit(self, slot, run, unit)
        events.append((start - t0[0], time.time() - t0[0], "send", unit.id, unit.count, f"to worker {slot.wid}"))

    def traced_done(self, unit, data, seconds, meta=None):
        start = time.time()
        done(self, unit, data, seconds, meta)
        ran = ""
        if meta:
            ran = f"ran on worker {meta['worker']} {(meta['start'] - t0[0]) * 1e3:.2f}-{(meta['end'] - t0[0]) * 1e3:.2f}"
        events.append((start - t0[0], time.time() - t0[0], "recv", unit.id, unit.count, ran))

    jobs.MapJob.next_unit = traced_next_unit
    jobs.MapJob.done = traced_done
    local.LocalBackend._send_unit = traced_send_unit
    try:
        for _ in range(args.calls):
            events.clear()
            t0[0] = time.time()
            mpmagic.pmap(func, items)
            total = time.time() - t0[0]
            print(f"call: {total * 1e3:.2f} ms")
    finally:
        jobs.MapJob.next_unit, jobs.MapJob.done, local.LocalBackend._send_unit = next_unit, done, send_unit
    print("\n   from     to  event chunk  items")
    for start, end, what, chunk, count, note in events:
        print(f"{start * 1e3:7.2f} {end * 1e3:6.2f}  {what}  {chunk:5d} {count:6d}  {note}")
    mpmagic.stop_pool()


if __name__ == "__main__":
    main()
