"""Issue 14.4: a shared Dask cluster is not ours to restart.

On the session's cluster (``dask_cluster``: scheduler and workers started
outside mpmagic, which only connects to them) a timeout, an interrupt or
``%pool restart`` restarts no worker, and a task's output capture leaves the
worker's ``sys.stdout``/``sys.stderr`` as they were. On the LocalCluster
mpmagic starts itself, a timed-out task's worker is restarted.
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest
from conftest import ensure_pool, run

import mpmagic
from mpmagic import pool as pool_module

# The Dask workers cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def dask_pool(dask_cluster, request):
    return ensure_pool("dask", request)


def _pids(backend) -> dict:
    return backend.client.run(os.getpid)


def _streams() -> tuple[str, str]:
    return type(sys.stdout).__name__, type(sys.stderr).__name__


def test_timeout_on_a_connected_cluster_restarts_no_worker(ip, dask_pool):
    before = _pids(dask_pool)
    run(ip, "import time\ndef hang_at_2(x):\n    if x == 2:\n        time.sleep(3)\n    return x\n")
    with pytest.raises(mpmagic.TaskTimeoutError) as info:
        run(ip, "%pmap -q --timeout 1 hang_at_2, range(4)")
    msg = str(info.value)
    assert "item 2 (2) ran past the timeout of 1 s" in msg
    assert "not mpmagic's to restart" in msg and "busy until it returns" in msg
    # The message docs/troubleshooting.md shows (addresses vary) is this one.
    from test_docs import DOCS, shown_lines_missing, standalone_error_blocks

    [shown] = [t for _, t in standalone_error_blocks(DOCS / "troubleshooting.md", shown_elsewhere=True) if "Dask" in t]
    assert not shown_lines_missing(shown, msg, example=False), (shown, msg)
    assert _pids(dask_pool) == before  # the same worker processes
    assert run(ip, "%pmap -q abs, [-1, -2]") == [1, 2]


def test_pool_restart_on_a_connected_cluster_restarts_nothing_and_says_so(ip, dask_pool, capsys):
    before = _pids(dask_pool)
    capsys.readouterr()
    run(ip, "%pool restart")
    err = capsys.readouterr().err
    assert "did not restart the workers of tcp://" in err and "not mpmagic's" in err
    assert _pids(dask_pool) == before
    assert run(ip, "%pmap -q abs, [-3]") == [3]


def _streams_once_idle(client, timeout: float = 15.0) -> dict:
    """The workers' streams once no mpmagic task runs there: the capture is
    removed when a worker's last mpmagic task ends, and an earlier test may
    have left one running (a timed-out task on a cluster we do not own)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        streams = client.run(_streams)
        if not any("Router" in name for names in streams.values() for name in names):
            return streams
        assert time.monotonic() < deadline, f"mpmagic's capture still installed: {streams}"
        time.sleep(0.2)


def test_output_capture_leaves_the_workers_streams_as_they_were(ip, dask_pool):
    before = _streams_once_idle(dask_pool.client)
    run(ip, "def loud(x):\n    print('item', x)\n    return x\n")
    assert run(ip, "%pmap -q loud, range(8)") == list(range(8))
    assert _streams_once_idle(dask_pool.client) == before


def test_timeout_on_mpmagics_own_local_cluster_restarts_that_worker(ip, request):
    pytest.importorskip("distributed")
    pool_module.shutdown()
    mpmagic.use_dask(workers=1)
    try:
        backend = pool_module.get_pool()
        assert backend.owns_cluster
        before = set(_pids(backend).values())
        run(ip, "import time\ndef hang(x):\n    time.sleep(30)\n    return x\n")
        with pytest.raises(mpmagic.TaskTimeoutError, match="its worker was stopped and replaced"):
            run(ip, "%pmap -q --timeout 1 hang, [0]")
        backend.client.wait_for_workers(1, timeout=60)
        assert not before & set(_pids(backend).values())
    finally:
        pool_module.shutdown()


def test_pool_restart_cuts_a_background_run_off_as_on_the_local_pool(ip):
    """``%pool restart`` on the cluster mpmagic started, with a background map in
    flight: the run says the pool was stopped, as the local pool's does (it
    blamed a chunk: "had its task cancelled ...; the pool replaced it")."""
    pool_module.shutdown()
    mpmagic.use_dask(workers=2)
    try:
        run(ip, "import time\ndef slow_item(x):\n    time.sleep(0.2)\n    return x\n")
        handle = mpmagic.submit(ip.user_ns["slow_item"], range(30), workers=2)
        time.sleep(0.7)
        run(ip, "%pool restart")
        with pytest.raises(mpmagic.MPMagicError) as info:
            handle.result(timeout=30)
        assert not isinstance(info.value, mpmagic.WorkerLostError)
        assert str(info.value) == "the pool was stopped while this run was in flight"
        assert run(ip, "%pmap -q abs, [-1, -2]") == [1, 2]
    finally:
        pool_module.shutdown()
