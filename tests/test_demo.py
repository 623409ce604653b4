"""The README's demo command runs the demo script: it must work and show the
classic lessons' right answers with their timing lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_the_classic_lessons_with_timing():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "Out[3]: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in out
    # starmap and SPMD versions, each the whole number (not a longer one that starts the same)
    assert len(re.findall(r"(?<!\d)333333833333500000(?!\d)", out)) == 2
    assert "Out[8]: 40000" in out  # the shared counter under its lock
    # Every item the producer put was taken by one consumer rank (an advice
    # line may also say a task "took" so long: only the ranks' lines count).
    taken = [int(n) for n in re.findall(r"^\[rank \d+\] took (\d+) items$", out, re.M)]
    assert "[0, " in out and len(taken) == 3 and sum(taken) == 200
    assert "measured, results equal" in out and "speedup" in out
    assert "<Failed item 3" in out
    assert re.search(r"pool: local, \d+ workers", out)
