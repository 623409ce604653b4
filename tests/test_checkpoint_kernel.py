"""Durable runs across a killed kernel (issue 17), in real kernels via jupyter_client.

A 200-item checkpointed %pmap records each call in a file; the kernel is
SIGKILLed about half way; a new kernel runs the same cells and must call only
the items that were not stored, return what serial Python returns, and say
how many it resumed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

pytest.importorskip("jupyter_client")
from test_kernel import Kernel  # noqa: E402

N = 200


def _setup(k: Kernel, folder: Path, record: Path) -> None:
    k.ok("%load_ext mpmagic\n"
         f"%config MPMagic.checkpoint_dir = {str(folder)!r}\n"
         "%pool start -n 2")
    k.ok(f"import time\nRECORD = {str(record)!r}\nOFFSET = 0\n"
         "def work(x):\n"
         "    time.sleep(0.02)\n"
         "    with open(RECORD, 'a') as f:\n"
         "        f.write(f'{x}\\n')\n"
         "    return x * x + OFFSET\n")


def _calls(record: Path) -> list[int]:
    return [int(x) for x in record.read_text().split()] if record.exists() else []


def _kill(k: Kernel) -> None:
    procs = [psutil.Process(k.pid), *k.descendants()]
    os.kill(k.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:  # workers notice their parent died; this only bounds the wait
        p.kill()
    try:
        k.kc.stop_channels()
    finally:
        k.km.shutdown_kernel(now=True)


def _kill_half_way(k: Kernel, record: Path, n: int) -> list[int]:
    """SIGKILL the kernel once about half of its ``n`` items were called; the calls made."""
    try:
        deadline = time.monotonic() + 120
        while len(_calls(record)) < n // 2:
            assert time.monotonic() < deadline, "the first run did not get half way"
            time.sleep(0.02)
    finally:
        _kill(k)
    first = _calls(record)
    assert n // 2 <= len(first) < n, len(first)
    return first


def _killed_half_way(folder: Path, record: Path, n: int, start: Callable[[Kernel], None]) -> list[int]:
    """A kernel set up with ``work`` runs ``start(kernel)`` and is SIGKILLed once about
    half of its ``n`` items were called; the calls it made (the record is emptied
    for the next kernel)."""
    k = Kernel()
    try:
        _setup(k, folder, record)
        start(k)
    except BaseException:
        _kill(k)
        raise
    first = _kill_half_way(k, record, n)
    record.unlink()
    return first


def test_a_killed_kernels_run_resumes_in_a_new_kernel(tmp_path):
    folder, record = tmp_path / "ckpt", tmp_path / "calls.txt"
    cell = f"r = %pmap --checkpoint --chunksize 5 work, range({N})\nr == [x * x for x in range({N})]"
    keys = []

    def start(k: Kernel) -> None:
        keys.append(k.value("from mpmagic.checkpoint_keys import run_key\nrun_key(work, False)[0].hex()"))
        k.kc.execute(cell)

    first = _killed_half_way(folder, record, N, start)
    key1 = keys[0]

    k2 = Kernel()
    try:
        _setup(k2, folder, record)
        assert k2.value("from mpmagic.checkpoint_keys import run_key\nrun_key(work, False)[0].hex()") == key1
        reply = k2.ok(cell, timeout=120)
        assert reply.result() == "True"  # every result equals serial
        second = _calls(record)
        assert len(second) == len(set(second))  # nothing computed twice
        assert set(first) | set(second) == set(range(N))
        # Only the items in flight at the kill (called, not yet stored: up to two
        # chunks of 5 per worker, and chunks waiting for their commit) run again.
        assert len(set(first) & set(second)) <= 30, sorted(set(first) & set(second))
        line = k2.value("__import__('mpmagic').api.last_report().line()")
        resumed = N - len(second)
        assert resumed >= N // 2 - 30
        assert f"resumed: {resumed} of {N} items from the checkpoint, {len(second)} computed" in line
        record.unlink()

        k2.ok(cell)  # changing nothing recomputes nothing
        assert _calls(record) == []
        k2.ok("OFFSET = 1")  # a changed captured global recomputes everything
        assert k2.ok(f"r = %pmap -q --checkpoint work, range({N})\nr == [x * x + 1 for x in range({N})]",
                     timeout=120).result() == "True"
        assert sorted(_calls(record)) == list(range(N))
    finally:
        k2.close()
