"""Thread caps (issue 18): workers x BLAS/OpenMP threads within the usable CPUs,
%config MPMagic.worker_threads overrides, and the advice says when a run was
oversubscribed."""

from __future__ import annotations

from conftest import run

import mpmagic
from mpmagic import advice, pool
from mpmagic.cpus import available_cpus
from mpmagic.report import Report

INFO = (
    "import os\n"
    "def _threads(x):\n"
    "    import numpy, threadpoolctl\n"
    "    return (os.environ.get('OMP_NUM_THREADS'),\n"
    "            sorted({i['num_threads'] for i in threadpoolctl.threadpool_info()}))\n"
)


def test_default_cap_reported_by_threadpoolctl(ip, local_pool):
    run(ip, INFO)
    cap = max(1, available_cpus() // local_pool.workers)
    for env, nums in run(ip, "%pmap -q _threads, range(2)"):
        assert env == str(cap) and nums and max(nums) <= cap


def test_config_override(ip, local_pool):
    run(ip, INFO)
    run(ip, "%config MPMagic.worker_threads = 3")
    run(ip, "%pool restart")
    try:
        for env, nums in run(ip, "%pmap -q _threads, range(2)"):
            assert env == "3" and max(nums) <= 3
    finally:
        run(ip, "%config MPMagic.worker_threads = None")
        run(ip, "%pool restart")


def test_fork_worker_capped_through_threadpoolctl(ip):
    import numpy  # noqa: F401 - loaded in the notebook: a fork worker inherits it, env vars come too late

    pool.shutdown()
    mpmagic.use_local(2, "fork")
    try:
        run(ip, INFO)
        cap = max(1, available_cpus() // 2)
        for _, nums in run(ip, "%pmap -q _threads, range(2)"):
            assert max(nums) <= cap
    finally:
        pool.shutdown()


def test_advice_names_thread_oversubscription():
    r = Report(kind="pmap", items=16, workers=2, backend="local", start_method="forkserver",
               wall=4.0, task_seconds=8.0, chunks=16, chunksize="auto", cores=2, cpu_seconds=24.0)
    text = advice.advise(r)
    assert text and "~3.0 threads" in text and "worker_threads" in text
    r.cpu_seconds = 8.0  # one thread per worker: nothing to say about threads
    assert "threads" not in (advice.advise(r) or "")
    # Tiny chunks: CPU time includes their (un)pickling, not a sign of threads.
    r.cpu_seconds, r.chunks, r.items, r.task_seconds, r.wall = 0.3, 100, 10**6, 0.1, 0.1
    assert "threads" not in (advice.advise(r) or "")
