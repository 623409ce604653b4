"""Thread caps (issue 18): workers x BLAS/OpenMP threads within the usable CPUs,
%config MPMagic.worker_threads overrides, and the advice says when a run was
oversubscribed."""

from __future__ import annotations

import os
import sys
import threading

import pytest
from conftest import ensure_pool, run

import mpmagic
from mpmagic import advice, pool, threads
from mpmagic.cpus import available_cpus
from mpmagic.report import Report


def no_thread_variables(monkeypatch) -> None:
    """None of threads.THREAD_VARS in the notebook's environment for this test, and after
    it what there was before, whatever the test (``limit_in_worker`` run here) set.

    Each is set first, then deleted: ``monkeypatch.delenv`` of an absent variable
    records nothing to undo, so OMP_NUM_THREADS=2 and MKL_NUM_THREADS=3, which
    ``limit_in_worker`` wrote here, stayed for the rest of the session, and
    test_threads.py run a second time in one process found its workers taking
    them as the notebook's (OpenBLAS at 2 threads where the cap is 1).
    """
    for var in threads.THREAD_VARS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def worker_expects(cap: int) -> tuple[str, int]:
    """(a worker's OMP_NUM_THREADS, the most threads a library of it may run) in a pool
    whose default cap is ``cap``: a variable of the notebook's environment wins over the
    cap (threads.py, as loky), and the shell that runs the tests may export one
    (``OMP_NUM_THREADS=4``: these tests failed, expecting the cap the code rightly left)."""
    mine = [int(os.environ[var]) for var in threads.THREAD_VARS if os.environ.get(var, "").isdigit()]
    return os.environ.get("OMP_NUM_THREADS") or str(cap), max([cap, *mine])


INFO = (
    "import os\n"
    "def _threads(x):\n"
    "    import numpy, threadpoolctl\n"
    "    return (os.environ.get('OMP_NUM_THREADS'),\n"
    "            sorted({i['num_threads'] for i in threadpoolctl.threadpool_info()}))\n"
)


def test_default_cap_reported_by_threadpoolctl(ip, local_pool):
    run(ip, INFO)
    omp, most = worker_expects(max(1, available_cpus() // local_pool.workers))
    for env, nums in run(ip, "%pmap -q _threads, range(2)"):
        assert env == omp and nums and max(nums) <= most


def test_polars_pool_capped_too(ip, local_pool):
    """polars sizes its thread pool from POLARS_MAX_THREADS as it loads (one thread per CPU without it)."""
    run(ip, "import os\ndef _polars_cap(x):\n    return os.environ.get('POLARS_MAX_THREADS')")
    cap = os.environ.get("POLARS_MAX_THREADS") or str(max(1, available_cpus() // local_pool.workers))
    assert run(ip, "%pmap -q _polars_cap, range(2)") == [cap] * 2


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
        most = worker_expects(max(1, available_cpus() // 2))[1]
        for _, nums in run(ip, "%pmap -q _threads, range(2)"):
            assert max(nums) <= most
    finally:
        pool.shutdown()


BLAS = (
    "import os\n"
    "def _blas(x):\n"
    "    import numpy, threadpoolctl\n"
    "    return (os.environ.get('OPENBLAS_NUM_THREADS'), os.environ.get('OMP_NUM_THREADS'),\n"
    "            {i['num_threads'] for i in threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas'})\n"
)


@pytest.mark.parametrize("start_method", ["forkserver", "fork"])
def test_notebook_variable_set_after_start_wins(ip, start_method, monkeypatch):
    """A variable set in the notebook after the pool ran once wins at the next
    restart: a forkserver worker inherits the fork server's older environment,
    a fork worker numpy already loaded (threadpoolctl must not cap it over)."""
    import numpy  # noqa: F401 - loaded in the notebook: what a fork worker inherits

    cap = max(1, available_cpus() // 2)
    mine = "1" if cap > 1 else "2"  # not the cap, and no more than OpenBLAS's CPUs
    ensure_pool(start_method)
    run(ip, BLAS)
    run(ip, "%pmap -q _blas, range(2)")  # the fork server (or the pool) starts without it
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", mine)  # (the shell's own value, if any, comes back after)
    try:
        run(ip, "%pool restart")
        for blas_var, omp_var, blas in run(ip, "%pmap -q _blas, range(2)"):
            assert blas_var == mine and omp_var == worker_expects(cap)[0]  # the others keep the cap (or the user's)
            assert blas in ({int(mine)}, set())  # set(): a numpy without OpenBLAS
    finally:
        pool.shutdown()


def test_cap_for_sends_the_notebooks_variables(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    n, notebook = threads.cap_for(2)
    assert n == max(1, available_cpus() // 2) and notebook.get("OMP_NUM_THREADS") == "4"
    assert "MKL_NUM_THREADS" not in notebook
    assert threads.cap_for(2, 3) == (3, {})  # worker_threads = 3 forces the cap over them
    assert threads.cap_for(2, 0)[0] is None


def test_a_users_omp_num_threads_also_wins_for_the_blas_libraries_that_fall_back_to_it(monkeypatch):
    """OMP_NUM_THREADS=2 in the notebook (the HPC habit): the worker set
    OPENBLAS_NUM_THREADS=1, which OpenBLAS reads first, so the workers' BLAS ran
    1 thread while the notebook's ran 2 and the guide said the user's variable wins."""
    no_thread_variables(monkeypatch)  # (what limit_in_worker sets here is taken back after)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # (a forkserver's stale value)
    threads.limit_in_worker(1, {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "3"})
    assert os.environ["OMP_NUM_THREADS"] == "2" and "OPENBLAS_NUM_THREADS" not in os.environ
    assert os.environ["MKL_NUM_THREADS"] == "3"  # (the user's own wins)
    assert os.environ["POLARS_MAX_THREADS"] == "1"  # (polars does not read OMP_NUM_THREADS: capped)
    assert threads._threads_wanted("openblas") == 2 and threads._threads_wanted("mkl") == 3


def test_a_cap_a_forkserver_worker_found_set_already_is_its_own(monkeypatch):
    """A forkserver worker starts with the fork server's environment, as it was when the
    server started: one started while the notebook had OMP_NUM_THREADS=1 (Dask's nanny
    sets it there) gave its workers that value. The cap of 1 did not change it, so the
    worker did not count it as its own, and the notebook's environment, without it
    since, removed it at the first call: the workers ran with no cap at all
    (OMP_NUM_THREADS None where the cap is 1). Every variable the cap sets is the
    worker's, whether or not its value was there before."""
    from mpmagic import context, worker_setup

    no_thread_variables(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # (the fork server's, equal to the cap)
    monkeypatch.setattr(context, "own_env", set())
    monkeypatch.setattr(worker_setup, "WORKER_ID", None)
    monkeypatch.setattr(worker_setup, "reseed_fresh", lambda: None)  # (the notebook's random state stays)
    monkeypatch.setattr(threads, "_CAPPED_LIBS", ())  # (the notebook's loaded BLAS keeps its threads)
    worker_setup.start_worker({"threads": 1, "thread_vars": {"MKL_NUM_THREADS": "3"}}, 7)
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "3"
    assert set(threads.THREAD_VARS) <= context.own_env, context.own_env


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


_BURNER = """
import os, threading, time

def _spin(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass

HOME = os.getpid()

class Burner:
    \"\"\"A result whose freeing in the worker that made it costs 0.25 s of CPU (made here
    or unpickled as a copy: nothing).\"\"\"
    def __init__(self, i):
        self.i, self.burn = i, os.getpid() != HOME
    def __setstate__(self, state):
        self.__dict__.update(state, burn=False)
    def __del__(self):
        if self.burn:
            _spin(0.25)

def napping_burner(i):
    time.sleep(0.06)
    return Burner(i)

def two_threads(i):
    spinner = threading.Thread(target=_spin, args=(0.1,))
    spinner.start()
    _spin(0.1)
    spinner.join()
    return i
"""


def test_a_units_cpu_time_leaves_out_what_the_worker_did_between_units(ip, pool2):
    """A worker's CPU time per unit (the report's cpu_seconds, read as threads per worker)
    counted from its previous reply, so it held the freeing of the previous unit's
    results: a tiny call right after one that returned hundreds of MB said "each worker
    ran ~1.6 threads ... pass n_jobs=1" for tasks that start none. Here each result
    costs 0.25 s of CPU to free in its worker, and the tasks sleep: the units' CPU time
    is measured from where each unit starts, so it holds none of that. Threads a task
    does start are still counted (two threads spinning 0.1 s each)."""
    run(ip, _BURNER)
    made = run(ip, "%pmap -q --chunksize 1 napping_burner, range(3)")
    assert [b.i for b in made] == [b.i for b in map(ip.user_ns["napping_burner"], range(3))]
    del made
    report = mpmagic.last_report()
    # 3 units on 2 workers: one unit at least ran after another on its worker, which freed
    # the earlier unit's result (0.25 s of CPU) first; the units slept, using next to no CPU.
    assert report.cpu_seconds is not None and report.cpu_seconds < 0.15, report.cpu_seconds
    ranks = run(ip, "%%parallel -n 2 -q\nnapping_burner(rank)")  # (each rank's value: freed after the rank)
    assert [b.i for b in ranks] == [0, 1]
    del ranks
    run(ip, "%%parallel -n 2 -q\nimport time\ntime.sleep(0.06)\nrank")
    report = mpmagic.last_report()
    assert report.cpu_seconds is not None and report.cpu_seconds < 0.15, report.cpu_seconds
    assert run(ip, "%pmap -q two_threads, [0]") == [0]
    report = mpmagic.last_report()
    assert report.cpu_seconds is not None and report.cpu_seconds >= 0.2, report.cpu_seconds


def test_thread_advice_does_not_ask_for_the_cap_already_in_force(monkeypatch):
    """RandomForest(n_jobs=-1) in tasks was told to set worker_threads to what it
    already was: with the cap in force, the threads are the tasks' own."""
    for var in threads.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    r = Report(kind="pmap", items=16, workers=2, backend="local", start_method="forkserver",
               wall=4.0, task_seconds=8.0, chunks=16, chunksize="auto", cores=2, cpu_seconds=24.0)
    for setting in (None, 1):
        monkeypatch.setattr(threads, "_setting", setting)
        text = advice.advise(r) or ""
        assert "capped already" in text and "pass n_jobs=1 inside the tasks" in text, text
        assert "worker_threads =" not in text, text
    for setting, now in ((0, "now 0: no cap"), (3, "now 3")):
        monkeypatch.setattr(threads, "_setting", setting)
        assert f"%config MPMagic.worker_threads = 1 ({now}) and %pool restart" in (advice.advise(r) or "")
    monkeypatch.setattr(threads, "_setting", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert "the notebook's OMP_NUM_THREADS=4 wins over the workers' default cap" in (advice.advise(r) or "")


def test_a_fork_pool_says_once_when_the_notebook_runs_native_pools_of_a_library_that_hangs_forked_children(
        ip, monkeypatch, capsys):
    """polars used in the notebook, then %pool start --start-method fork: every polars
    task hung in the workers, and nothing said why."""
    import types

    monkeypatch.setattr(threads, "os_threads", lambda: threading.active_count())
    monkeypatch.setitem(sys.modules, "polars", types.ModuleType("polars"))
    assert threads.fork_hazard() is None  # no native thread running: nothing held to copy
    monkeypatch.setattr(threads, "os_threads", lambda: threading.active_count() + 4)
    line = threads.fork_hazard()
    assert line is not None and "imported polars" in line and "forkserver" in line
    pool.shutdown()
    mpmagic.use_local(1, "fork")
    try:
        run(ip, "def _one(x):\n    return x")
        assert run(ip, "%pmap -q _one, [1]") == [1]
        pool.restart_pool()  # (a worker forked again: the same line is not said again)
        assert run(ip, "%pmap -q _one, [2]") == [2]
    finally:
        pool.shutdown()
    assert capsys.readouterr().err.count(line) == 1


def test_numbas_openmp_layer_is_a_fork_hazard_and_its_self_termination_is_named(ip, monkeypatch, capsys):
    """numba parallel=True run in the notebook (OpenMP layer), then a fork pool:
    every task's worker raised SIGTERM on itself, said to be "terminated by
    another process", and the pool's start said nothing."""
    import types

    numba = types.ModuleType("numba")  # a stand-in: CI has no numba
    numba.threading_layer = lambda: (_ for _ in ()).throw(ValueError("Threading layer is not initialized."))
    monkeypatch.setitem(sys.modules, "numba", numba)
    assert not threads.numba_omp_used()  # (imported, no parallel function run yet)
    numba.threading_layer = lambda: "omp"
    line = threads.fork_hazard()
    assert line is not None and "numba's OpenMP threading layer" in line and "forkserver" in line
    pool.shutdown()
    mpmagic.use_local(1, "fork")
    try:
        run(ip, "import os, signal\ndef _omp(x):\n    os.kill(os.getpid(), signal.SIGTERM)  # (as numba's check does)")
        with pytest.raises(mpmagic.WorkerLostError) as err:
            run(ip, "%pmap -q _omp, [1]")
    finally:
        pool.shutdown()
    assert "terminated itself with SIGTERM (numba's OpenMP" in str(err.value)
    assert "another process" not in str(err.value)
    assert capsys.readouterr().err.count(line) == 1


def test_numbas_pool_capped_too_also_when_a_fork_worker_inherits_numba(ip, monkeypatch):
    """numba ignores OMP_NUM_THREADS and read NUMBA_NUM_THREADS at its import: 2
    workers x 2 numba threads on 2 CPUs, with every start method. A fork worker
    inherits numba already imported: the size it will launch is lowered there."""
    import types

    parallel = types.SimpleNamespace(_is_initialized=False, NUM_THREADS=64)
    numba = types.ModuleType("numba")  # a stand-in: CI has no numba
    numba.np = types.SimpleNamespace(ufunc=types.SimpleNamespace(parallel=parallel))
    numba.config = types.SimpleNamespace(NUMBA_NUM_THREADS=64)
    monkeypatch.setitem(sys.modules, "numba", numba)
    pool.shutdown()
    backend = mpmagic.use_local(2, "fork")
    try:
        run(ip, "import os, sys\ndef _numba_cap(x):\n    n = sys.modules['numba']\n"
                "    return os.environ.get('NUMBA_NUM_THREADS'), n.config.NUMBA_NUM_THREADS, n.np.ufunc.parallel.NUM_THREADS")
        cap = max(1, available_cpus() // backend.workers)
        assert run(ip, "%pmap -q _numba_cap, range(2)") == [(str(cap), cap, cap)] * 2
    finally:
        pool.shutdown()
