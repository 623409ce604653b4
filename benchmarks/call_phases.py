"""Where a warm 2-item ``pmap`` spends its time after a ``gc.collect()``, phase by phase.

    .venv/bin/python benchmarks/call_phases.py              # 300 calls
    .venv/bin/python benchmarks/call_phases.py --calls 100 --chunksize 2

bench_engine's warm row times the whole call; this stamps its phases
(``time.perf_counter_ns`` in the notebook process, wrapped around the
engine's own methods for the measurement only) and prints the median time
from the call's start to each phase's first entry, then what follows the
last unit's write: the first and last worker reply read by the manager, the
run's end, the return. ``--chunksize 2`` sends both items to one worker as
one chunk (what the call costs without a second worker). Markdown out.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from IPython.core.interactiveshell import InteractiveShell

import mpmagic
from mpmagic import api, engine, jobs
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls")
    parser.add_argument("--chunksize", type=int, default=None, help="pmap's chunksize (2: one chunk)")
    args = parser.parse_args()
    shell = InteractiveShell.instance()
    shell.run_cell("def sq(x):\n    return x * x\n", store_history=False)
    sq = shell.user_ns["sq"]
    mpmagic.start_pool(2, wait=True)
    for label, owner, name in PHASES:
        first_entry(owner, name, label)
    every_return(pipes.Sender, "flush", "sent")
    every_return(pipes.Receiver, "read", "read")
    for _ in range(50):
        mpmagic.pmap(sq, [1, 2], chunksize=args.chunksize)
    rows: dict[str, list[float]] = {}
    for _ in range(args.calls):
        gc.collect()
        stamps.clear()
        t0 = time.perf_counter_ns()
        mpmagic.pmap(sq, [1, 2], chunksize=args.chunksize)
        t1 = time.perf_counter_ns()
        sent, read = stamps["sent"], stamps.get("read") or [t1]
        at = {label: stamps[label] for label, _, _ in PHASES}
        at["last unit written"] = sent[-1]
        at["first reply read"], at["last reply read"] = read[0], read[-1]
        at["call returned"] = t1
        for label, when in sorted(at.items(), key=lambda kv: kv[1]):
            rows.setdefault(label, []).append((when - t0) / 1000)
    mpmagic.stop_pool()
    print(f"| phase (first entry) | us from the call's start, median of {args.calls} |\n|---|---|")
    for label, values in sorted(rows.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"| {label} | {statistics.median(values):.0f} |")


if __name__ == "__main__":
    main()
