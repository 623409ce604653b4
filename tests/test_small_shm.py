"""A small /dev/shm (Docker's default 64 MB, or less) never kills the notebook.

Each test runs a script in a private mount namespace with a fresh tmpfs of
64 MB or 16 MB on /dev/shm (``unshare -m``, then ``mount -t tmpfs``), so the
machine's /dev/shm is not touched and the script's notebook, forkserver and
workers all see the small one. Before segments were reserved with
``posix_fallocate``, these scripts ended with SIGBUS (exit -7). The oracle is
plain serial Python in the same script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _namespace_prefix() -> list[str] | None:
    """How to get a private mount namespace here: as root, or in a user namespace."""
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        probe = subprocess.run(
            [*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True, timeout=30
        )
        if probe.returncode == 0:
            return prefix
    return None


PREFIX = _namespace_prefix()
pytestmark = pytest.mark.skipif(
    PREFIX is None, reason="needs a private mount namespace (root, or user namespaces) to mount a small /dev/shm"
)

HEADER = """
import os, sys
import numpy as np
import mpmagic
import mpmagic.pool
from mpmagic import shm

def ours():
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(("mpm_", "mpsh", "sem.mpsh")))
"""

FOOTER = """
mpmagic.pool.stop_pool()
import gc; gc.collect()
print("LEFT", ours())
"""


def assert_troubleshooting_shows(err: str) -> None:
    """The advice line docs/troubleshooting.md shows is the one printed (sizes vary)."""
    from test_docs import DOCS, PLACEHOLDER, shown_lines_missing, standalone_error_blocks

    page = DOCS / "troubleshooting.md"
    blocks = [text for _, text in standalone_error_blocks(page, shown_elsewhere=True) if "/dev/shm" in text]
    assert blocks, "troubleshooting.md shows no small-/dev/shm block"
    for text in blocks:
        assert not shown_lines_missing(PLACEHOLDER.sub("...", text), err, example=False), (text, err)


def run_small(size: str, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` as a script with a ``size`` tmpfs on /dev/shm; return the finished process."""
    script = HEADER + textwrap.dedent(body) + FOOTER
    env = {**os.environ, "PYTHONPATH": ROOT, "MPMAGIC_PRESTART": "0"}
    cmd = f"mount -t tmpfs -o size={size} tmpfs /dev/shm && exec {sys.executable} -c \"$0\""
    return subprocess.run([*PREFIX, "sh", "-c", cmd, script], capture_output=True, text=True, env=env, timeout=180)


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode} (-7 is SIGBUS)\n{proc.stdout}\n{proc.stderr}"
    assert "LEFT []" in proc.stdout, proc.stdout
    return proc.stderr


@pytest.mark.parametrize("size", ["64m", "16m"])
def test_big_items_go_through_the_pipe_with_one_line_of_advice(size):
    """The issue's example: four 48 MB arrays, two workers, two calls."""
    err = check(run_small(size, """
        def total(a):
            return float(a.sum())

        arrays = [np.ones(6_000_000) * i for i in range(4)]
        for _ in range(2):
            got = mpmagic.pmap(total, arrays, workers=2)
            assert got == list(map(total, arrays)), got
        print("OK")
    """))
    assert err.count("/dev/shm is too small or full") == 1, err  # once per session, not per chunk
    assert "docker run --shm-size=1g" in err and "MPMagic.shm_threshold" in err
    assert_troubleshooting_shows(err)


def test_big_results_come_back_through_the_pipe_writable():
    """A worker with no room for its results sends them in the pipe; they are writable here."""
    err = check(run_small("16m", """
        def grow(n):
            return np.full(n, 2.0)   # 24 MB: more than /dev/shm holds

        got = mpmagic.pmap(grow, [3_000_000, 3_000_000, 10], workers=2)
        want = list(map(grow, [3_000_000, 3_000_000, 10]))
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
        assert all(g.flags.writeable for g in got)
        got[0][0] = 5.0
        print("OK")
    """))
    assert err.count("/dev/shm is too small or full") == 1, err


def test_share_and_helpers_on_a_full_dev_shm():
    """share() falls back to an ordinary array; a helper that cannot fit is a clear error."""
    err = check(run_small("16m", """
        big = mpmagic.share(np.arange(3_000_000, dtype=float))   # 24 MB
        assert not any(n.startswith("mpm_") for n in ours())
        assert mpmagic.pmap(lambda i: float(big[i]), [0, 2_999_999], workers=2) == [0.0, 2_999_999.0]
        for make in (lambda: mpmagic.Queue(capacity=32 << 20), lambda: mpmagic.Array("d", 4_000_000)):
            try:
                make()
            except mpmagic.shared.NoSharedMemory as exc:
                assert "docker run --shm-size=1g" in str(exc), exc
                print("ERR", exc)
            else:
                raise AssertionError("no error")
        small = mpmagic.Array("d", 10)                  # what fits still works
        small[3] = 1.5
        assert mpmagic.pmap(lambda i: small[i], [3], workers=2) == [1.5]
        del small
        print("OK")
    """))
    assert "share()" in err


def test_the_segments_a_map_kept_make_room_for_helpers_and_share():
    """A map of large items left most of a 64 MB /dev/shm in free segments kept
    for the next map (and mapped by the idle workers): the Queue and share()
    made next failed for lack of room that mpmagic itself held."""
    err = check(run_small("64m", """
        import gc
        arrays = [np.full(3_700_000, float(i)) for i in range(4)]   # 4 x 29.6 MB, one chunk each
        assert mpmagic.pmap(lambda a: float(a[0]), arrays, chunksize=1, workers=2) == [0.0, 1.0, 2.0, 3.0]
        del arrays; gc.collect()
        assert shm.pool().free   # (the check below means something: segments are kept for later)
        q = mpmagic.Queue(capacity=8 << 20)
        shared = mpmagic.share(np.ones(2_000_000))                  # 16 MB
        assert any(n.startswith("mpm_") for n in ours())            # in shared memory, not a plain copy
        assert mpmagic.pmap(lambda i: float(shared[i]), [0, 1_999_999], workers=2) == [1.0, 1.0]
        del q, shared
        print("OK")
    """))
    assert "/dev/shm is too small or full" not in err, err


def test_queue_producers_on_a_nearly_full_dev_shm():
    """The docs' pattern (tasks put, the notebook closes and iterates), backlogs beyond the ring."""
    check(run_small("16m", """
        q = mpmagic.Queue(capacity=1 << 20)
        filler = mpmagic.share(np.zeros(1_750_000))            # 14 MB: little room left for spills

        def produce(i):
            for j in range(10):
                q.put((i, j, b"x" * 100_000))
            return i

        mpmagic.pmap(produce, range(4), workers=2)
        q.close()
        got = sorted((i, j) for i, j, _ in q)
        assert got == [(i, j) for i in range(4) for j in range(10)], len(got)
        del filler, q
        print("OK")
    """))


def test_a_read_only_dev_shm_runs_maps_through_the_pipe_and_helpers_say_why():
    """No usable /dev/shm (read-only here; missing on AWS Lambda): every worker start
    failed with "could not start a worker process (OSError ... '/dev/shm/pym-...');
    --start-method fork may help", on fork too, and Lock() raised a bare OSError
    naming an internal semaphore."""
    proc = run_small("8m,ro", """
    for method in ("fork", "forkserver"):
        mpmagic.use_local(2, method)
        arrays = mpmagic.pmap(lambda x: np.ones(300_000) * x, range(2))
        print(method, mpmagic.pmap(abs, [-1, -2]), [float(a.sum()) for a in arrays])
    try:
        mpmagic.Lock()
    except mpmagic.shared.NoSharedMemory as exc:
        print("LOCK", exc)
    """)
    check(proc)
    out = proc.stdout
    assert "fork [1, 2] [0.0, 300000.0]" in out and "forkserver [1, 2] [0.0, 300000.0]" in out, out
    assert ("LOCK mpmagic.Lock needs a writable /dev/shm (POSIX shared memory), and this system's is read-only: "
            "mount one") in out, out
