"""Where a warm 2-item ``pmap`` spends its time after a ``gc.collect()``, phase by phase.

    .venv/bin/python benchmarks/call_phases.py              # 300 calls
    .venv/bin/python benchmarks/call_phases.py --calls 100 --chunksize 2
    .venv/bin/python benchmarks/call_phases.py --worker-stamps  # the workers' side too (a fork pool)

bench_engine's warm row times the whole call; this stamps its phases
(``time.perf_counter_ns`` in the notebook process, wrapped around the
engine's own methods for the measurement only) and prints the median time
from the call's start to each phase's first entry, then what follows the
last unit's write: the first and last worker reply read by the manager, the
run's end, the return. ``--chunksize 2`` sends both items to one worker as
one chunk (what the call costs without a second worker). ``--worker-stamps``
starts the pool with fork, the workers' reads and replies wrapped before the
fork, and adds when each worker had its unit read and sent its reply (the
same clock in every process: ``CLOCK_MONOTONIC``), with the return of each
of the caller's writes: on a loaded machine a write can return after its
worker has already replied, the caller having waited for a CPU. Markdown out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from IPython.core.interactiveshell import InteractiveShell

import mpmagic
from mpmagic import api, engine, jobs, worker
from mpmagic.backends import local, pipes

stamps: dict[str, Any] = {}


def first_entry(owner: Any, name: str, label: str) -> None:
    """Stamp the first entry of ``owner.name`` in each call as ``label``."""
    original: Callable[..., Any] = getattr(owner, name)

    def stamped(*args: Any, **kwargs: Any) -> Any:
        stamps.setdefault(label, time.perf_counter_ns())
        return original(*args, **kwargs)

    setattr(owner, name, stamped)


def every_return(owner: Any, name: str, label: str) -> None:
    """Stamp each return of ``owner.name`` into the list ``label``."""
    original: Callable[..., Any] = getattr(owner, name)

    def stamped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        stamps.setdefault(label, []).append(time.perf_counter_ns())
        return result

    setattr(owner, name, stamped)


PHASES = [  # (label, owner, method): in the order a warm 2-item map reaches them
    ("`MapCall` made", api.MapCall, "__init__"),
    ("`MapJob` made", jobs.MapJob, "__init__"),
    ("`submit`", local.LocalBackend, "submit"),
    ("its step (`_step_here`)", local.LocalBackend, "_step_here"),
    ("first unit cut (`_give`)", local.LocalBackend, "_give"),
    ("first unit packed (`_send_unit`)", local.LocalBackend, "_send_unit"),
    ("caller waits (`Run.wait`)", engine.Run, "wait"),
    ("run ended (`Run._finish`)", engine.Run, "_finish"),
]


def stamp_workers(folder: str, calls: int) -> None:
    """Wrap the worker's message reads and ``Done`` replies (before the fork pool starts:
    its workers inherit them): each worker writes its stamps to ``folder`` at its
    ``calls``-th reply."""
    read, send = worker.MessageReader.read, worker._Channel.send
    stamps: list[tuple[str, int]] = []

    def stamped_read(self: Any) -> Any:
        data = read(self)
        stamps.append(("worker read its unit", time.perf_counter_ns()))
        return data

    def stamped_send(self: Any, msg: tuple) -> None:
        if type(msg).__name__ == "Done":
            stamps.append(("worker replied", time.perf_counter_ns()))
            if sum(label == "worker replied" for label, _ in stamps) == calls:
                with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
                    json.dump(stamps, f)
        send(self, msg)

    worker.MessageReader.read = stamped_read  # type: ignore[method-assign]
    worker._Channel.send = stamped_send  # type: ignore[method-assign]


def worker_rows(folder: str, windows: list[tuple[int, int]]) -> dict[str, list[float]]:
    """The workers' stamps within each call's window, as us from its start: the first and
    second unit read, the first and second reply (calls with fewer are left out)."""
    events: list[tuple[int, str]] = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            events.extend((t, label) for label, t in json.load(f))
    events.sort()
    rows: dict[str, list[float]] = {}
    for t0, t1 in windows:
        inside = [(t, label) for t, label in events if t0 <= t <= t1]
        for label in ("worker read its unit", "worker replied"):
            times = [t for t, lab in inside if lab == label]
            if len(times) >= 2:
                for nth, t in zip(("first", "second"), times[:2], strict=True):
                    rows.setdefault(f"{label} ({nth})", []).append((t - t0) / 1000)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls")
    parser.add_argument("--chunksize", type=int, default=None, help="pmap's chunksize (2: one chunk)")
    parser.add_argument("--worker-stamps", action="store_true",
                        help="a fork pool, with the workers' reads and replies stamped too")
    parser.add_argument("--idle", type=float, default=0.0, metavar="S",
                        help="sleep S seconds before each call too (idle workers and CPUs, as between cells)")
    args = parser.parse_args()
    shell = InteractiveShell.instance()
    shell.run_cell("def sq(x):\n    return x * x\n", store_history=False)
    sq = shell.user_ns["sq"]
    folder = tempfile.mkdtemp(prefix="call_phases.") if args.worker_stamps else ""
    if args.worker_stamps:
        stamp_workers(folder, 50 + args.calls)
        mpmagic.start_pool(2, start_method="fork", wait=True)
    else:
        mpmagic.start_pool(2, wait=True)
    for label, owner, name in PHASES:
        first_entry(owner, name, label)
    every_return(pipes.Sender, "flush", "sent")
    every_return(pipes.Receiver, "read", "read")
    for _ in range(50):
        mpmagic.pmap(sq, [1, 2], chunksize=args.chunksize)
    rows: dict[str, list[float]] = {}
    windows: list[tuple[int, int]] = []
    for _ in range(args.calls):
        gc.collect()
        if args.idle:
            time.sleep(args.idle)
        stamps.clear()
        t0 = time.perf_counter_ns()
        mpmagic.pmap(sq, [1, 2], chunksize=args.chunksize)
        t1 = time.perf_counter_ns()
        sent, read = stamps["sent"], stamps.get("read") or [t1]
        at = {label: stamps[label] for label, _, _ in PHASES}
        at["last unit written"] = sent[-1]
        at["first reply read"], at["last reply read"] = read[0], read[-1]
        at["call returned"] = t1
        at["first unit written (its write returned)"] = sent[0]
        windows.append((t0, t1))
        for label, when in sorted(at.items(), key=lambda kv: kv[1]):
            rows.setdefault(label, []).append((when - t0) / 1000)
    mpmagic.stop_pool()
    if args.worker_stamps:
        time.sleep(0.5)  # (the workers wrote their stamps at their last reply)
        rows.update(worker_rows(folder, windows))
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    print(f"| phase (first entry) | us from the call's start, median of {args.calls} |\n|---|---|")
    for label, values in sorted(rows.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"| {label} | {statistics.median(values):.0f} |")


if __name__ == "__main__":
    main()
