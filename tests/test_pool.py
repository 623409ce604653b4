"""%pool and the managed pool's lifecycle: start, status, stop, restart, resize."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading

import psutil
import pytest
from conftest import ensure_pool, run

import mpmagic
from mpmagic import cpus
from mpmagic import pool as pool_module

# Tests here count this process's children (and threads): the work started beside
# the first tests (conftest.py: the chaos soak) has ended.
pytestmark = pytest.mark.usefixtures("no_work_beside")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_start_status_stop_restart(ip):
    status = run(ip, "%pool start -n 3 --start-method spawn")
    text = str(status)
    assert "pool: local, 3 workers, start method spawn, running" in text
    pids = [p["pid"] for p in status.info["processes"]]
    assert len(pids) == 3 and all(_alive(pid) for pid in pids)
    assert all(p["ready"] for p in status.info["processes"])

    run(ip, "%pmap -q abs, range(-5, 5)")
    status = run(ip, "%pool")
    assert status.info["tasks_run"] >= 10 and status.info["calls_run"] >= 1
    # (worker numbers go on across replacements: a pool left by an earlier test may not have a worker 0)
    assert re.search(r"worker \d+: pid \d+, idle, \d+ tasks?, \d+ MB", str(status))
    assert "<table" in status._repr_html_()

    run(ip, "%pool restart")
    new = [p["pid"] for p in run(ip, "%pool").info["processes"]]
    assert set(new).isdisjoint(pids)
    assert not any(_alive(pid) for pid in pids)

    run(ip, "%pool stop")
    status = run(ip, "%pool")
    assert "stopped" in str(status) and status.info["processes"] == []
    assert not any(_alive(pid) for pid in new)
    # the next call starts it again
    assert run(ip, "%pmap -q abs, [-1]") == [1]


def test_restart_pool_returns_at_once_with_wait_false(pool2):
    """``restart_pool(wait=False)`` waited for the workers all the same (``wait`` was ignored)."""
    old = [s.pid for s in pool2.slots]
    backend = mpmagic.restart_pool(wait=False)
    assert backend.cold  # its new workers are still starting
    assert {s.pid for s in backend.slots}.isdisjoint(old)
    assert mpmagic.pmap(abs, [-1, -2]) == [1, 2]  # the next run waits for them
    assert not mpmagic.restart_pool().cold  # (the default waits)


def test_resize_and_per_call_workers(ip):
    mpmagic.use_local(2, "forkserver")
    run(ip, "%pool resize 3")
    assert len(mpmagic.get_pool().slots) == 3
    # -n larger than the pool grows it; -n smaller uses only that many
    run(ip, "import os\n%pmap -q -n 4 lambda x: os.getpid(), range(40)")
    assert mpmagic.get_pool().workers == 4
    pids = run(ip, "%pmap -q -n 1 --chunksize 1 lambda x: os.getpid(), range(12)")
    assert len(set(pids)) == 1
    mpmagic.use_local(2, "forkserver")


def test_bad_pool_commands(ip):
    from IPython.core.error import UsageError

    for line in ("%pool start --start-method nope", "%pool frobnicate", "%pool resize", "%pool start -n 0"):
        result = ip.run_cell(line, store_history=False)
        assert isinstance(result.error_in_exec, UsageError), line


def test_default_size_follows_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: None)
    assert cpus.available_cpus() == 6
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 2.5)
    assert cpus.available_cpus() == 3
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 0.2)
    assert cpus.available_cpus() == 1


def test_default_size_is_the_cpu_count_python_was_told(monkeypatch):
    """Python 3.13's ``-X cpu_count=N`` / ``PYTHON_CPU_COUNT=N`` make
    ``os.process_cpu_count()``, and so ``multiprocessing.Pool()``'s size, N; the pool
    counted the affinity mask and the quota only (2 workers with PYTHON_CPU_COUNT=1).
    Below 3.13 the test gives ``os`` the function, as 3.13 has it."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 1, raising=False)
    monkeypatch.delitem(sys._xoptions, "cpu_count", raising=False)
    monkeypatch.setenv("PYTHON_CPU_COUNT", "1")
    assert cpus.available_cpus() == 1
    monkeypatch.setitem(sys._xoptions, "cpu_count", "default")  # (-X wins over the environment)
    assert cpus.available_cpus() == 4
    monkeypatch.delitem(sys._xoptions, "cpu_count")
    monkeypatch.delenv("PYTHON_CPU_COUNT")
    assert cpus.available_cpus() == 4  # (told nothing: the affinity mask, whatever process_cpu_count says)


def test_default_start_method_is_forkserver_on_linux_and_spawn_elsewhere():
    """The documented default: forkserver on Linux (spawn-safe, fast to start), spawn elsewhere."""
    from mpmagic.backends.local import default_start_method

    assert default_start_method() == ("forkserver" if sys.platform.startswith("linux") else "spawn")


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"], scope="session")
def test_every_start_method_runs_notebook_code(ip, method):
    mpmagic.use_local(2, method)
    run(ip, "def cube(x):\n    return x ** 3\n")
    assert run(ip, "%pmap -q cube, range(6)") == [x**3 for x in range(6)]
    assert mpmagic.get_pool().start_method == method


def test_restart_applies_its_options_and_keeps_the_others(ip):
    mpmagic.use_local(2, "forkserver")
    old = [p["pid"] for p in run(ip, "%pool").info["processes"]]
    status = run(ip, "%pool restart -n 3 --start-method spawn --max-tasks-per-child 5")
    backend = mpmagic.get_pool()
    assert (backend.workers, backend.start_method, backend.max_tasks_per_child) == (3, "spawn", 5)
    assert len(status.info["processes"]) == 3 and not any(_alive(pid) for pid in old)
    run(ip, "%pool restart -n 2")  # the start method and the limit stay
    backend = mpmagic.get_pool()
    assert (backend.workers, backend.start_method, backend.max_tasks_per_child) == (2, "spawn", 5)
    assert len(run(ip, "%pool").info["processes"]) == 2
    mpmagic.use_local(2, "forkserver", 0)


def test_start_with_one_new_setting_keeps_the_others(ip):
    """``%pool start --max-tasks-per-child 5`` on a spawn pool went back to the
    default start method (a new pool from the given settings only)."""
    run(ip, "%pool start -n 3 --start-method spawn")
    run(ip, "%pool start --max-tasks-per-child 5")
    backend = mpmagic.get_pool()
    assert (backend.workers, backend.start_method, backend.max_tasks_per_child) == (3, "spawn", 5)
    run(ip, "%pool start --start-method forkserver")
    backend = mpmagic.get_pool()
    assert (backend.workers, backend.start_method, backend.max_tasks_per_child) == (3, "forkserver", 5)
    mpmagic.use_local(2, "forkserver", 0)


def test_limits_are_removed_with_0(ip):
    """``--max-tasks-per-child 0`` and ``--max-memory 0`` remove a limit set
    before (0 was refused for the first, and the second said "more than 0
    bytes"; only a new kernel removed them)."""
    run(ip, "%pool restart -n 2 --start-method forkserver --max-tasks-per-child 5 --max-memory 2GB")
    backend = mpmagic.get_pool()
    assert (backend.max_tasks_per_child, backend.max_memory) == (5, 2 * 10**9)
    run(ip, "%pool restart --max-tasks-per-child 0 --max-memory 0")
    backend = mpmagic.get_pool()
    assert (backend.workers, backend.start_method, backend.max_tasks_per_child, backend.max_memory) == (
        2, "forkserver", None, None)
    run(ip, "%pool start --max-tasks-per-child 4")
    assert mpmagic.get_pool().max_tasks_per_child == 4
    run(ip, "%pool start --max-tasks-per-child 0")
    backend = mpmagic.get_pool()
    assert (backend.workers, backend.start_method, backend.max_tasks_per_child) == (2, "forkserver", None)
    run(ip, "def cube(x):\n    return x ** 3\n")
    assert run(ip, "%pmap -q cube, range(6)") == [x**3 for x in range(6)]
    err = ip.run_cell("%pool restart --max-tasks-per-child -1", store_history=False).error_in_exec
    assert "argument --max-tasks-per-child: must be a whole number of at least 1 (the items a worker runs " \
        "before it is replaced), or 0 for no limit, not -1" in str(err), repr(err)


_TAKES = ("must be a whole number of at least 1 (the items a worker runs before it is replaced), "
          "or 0 for no limit, not ")


@pytest.mark.parametrize("value", [-1, "3", 2.5, True, -0.0])
@pytest.mark.parametrize("call", [
    lambda v: mpmagic.start_pool(workers=2, max_tasks_per_child=v),
    lambda v: pool_module.restart_with(max_tasks_per_child=v),
    lambda v: mpmagic.use_local(2, max_tasks_per_child=v),
], ids=["start_pool", "restart_with", "use_local"])
def test_the_api_checks_max_tasks_per_child_as_the_magic_does_before_touching_the_pool(value, call):
    """``start_pool(max_tasks_per_child=-1)`` was taken (``%pool start`` refused -1), and
    the next ``pmap`` never returned: workers were replaced in a loop, ~390 in 3 s, no
    item ran. ``"3"`` failed the run with a TypeError from the manager; ``2.5`` and
    ``True`` were kept as they were. Now one line in the API's words, and the running
    pool (its workers, its settings) is left as it was: the next run matches serial."""
    from mpmagic.errors import UsageError

    backend = mpmagic.use_local(2, "forkserver")
    backend.wait_ready()
    pids = {p["pid"] for p in backend.status()["processes"]}
    with pytest.raises(UsageError) as err:
        call(value)
    assert str(err.value) == f"max_tasks_per_child {_TAKES}{value!r}"
    assert mpmagic.get_pool() is backend and backend.running and backend.max_tasks_per_child is None
    assert {p["pid"] for p in backend.status()["processes"]} == pids
    assert mpmagic.pmap(abs, range(-5, 5), workers=2) == list(map(abs, range(-5, 5)))


def test_a_numpy_integer_is_a_max_tasks_per_child():
    """``np.int64(3)`` (a count computed with numpy) was refused as "must be a whole
    number ..., not np.int64(3)": it is taken as the int it is, as pmap's options take it."""
    import numpy as np

    backend = mpmagic.start_pool(workers=2, max_tasks_per_child=np.int64(3))
    try:
        assert backend.max_tasks_per_child == 3 and type(backend.max_tasks_per_child) is int
        assert mpmagic.pmap(abs, range(-5, 5)) == list(map(abs, range(-5, 5)))
    finally:
        mpmagic.use_local(2, "forkserver", max_tasks_per_child=0)


def test_a_refused_pool_option_changes_nothing_before_it_is_refused():
    """Every option is checked before any is applied: ``max_memory`` was set on the
    running pool before a size of 0 (or an unknown start method) was refused."""
    from mpmagic.errors import UsageError

    backend = mpmagic.use_local(2, "forkserver")
    for kwargs, words in [
        (dict(workers=0, max_memory="1GB"), "workers must be a whole number of at least 1"),
        (dict(start_method="nope", max_memory="1GB"), "unknown start method 'nope'"),
        (dict(max_tasks_per_child=-3, max_memory="1GB"), "max_tasks_per_child must be"),
    ]:
        for call in (mpmagic.start_pool, mpmagic.use_local, pool_module.restart_with):
            with pytest.raises(UsageError, match=words):
                call(**kwargs)
            assert mpmagic.get_pool() is backend and backend.max_memory is None and pool_module._max_memory is None
    assert backend.running and (backend.workers, backend.start_method) == (2, "forkserver")


@pytest.mark.parametrize("line, first", [
    ("%pool resize 2 --start-method fork", "%pool: --start-method goes with start, restart and local, not resize"),
    ("%pool stop --max-tasks-per-child 3", "%pool: --max-tasks-per-child goes with start, restart and local, not stop"),
    ("%pool --timeout 5", "%pool: --timeout goes with dask, not status"),
    ("%pool stop extra", "%pool: unexpected argument 'extra': %pool stop takes none"),
    ("%pool resize 3 4", "%pool: unexpected argument '4': %pool resize takes N"),
    ("%pool cancel", "%pool: cancel needs a run's ID: for example %pool cancel 3 (%pool runs lists them)"),
    ("%pool cancel -1", "%pool: cancel needs a run's ID (a whole number from 1), not '-1': for example "
                        "%pool cancel 3 (%pool runs lists them)"),
    # (0 was looked up: "no run with id 0", while -1 and x were told IDs count from 1)
    ("%pool cancel 0", "%pool: cancel needs a run's ID (a whole number from 1), not '0': for example "
                       "%pool cancel 3 (%pool runs lists them)"),
])
def test_what_a_subcommand_does_not_take_is_a_usage_error_not_ignored(ip, line, first):
    from IPython.core.error import UsageError

    backend = mpmagic.use_local(2, "forkserver")
    err = ip.run_cell(line, store_history=False).error_in_exec
    assert isinstance(err, UsageError) and str(err).splitlines()[0] == first, repr(err)
    assert mpmagic.get_pool() is backend and backend.running and backend.workers == 2


def test_status_counts_read_as_english(local_pool):
    """"1 workers" and "1 tasks" read wrong."""
    from mpmagic.status import _local_lines

    info = dict(local_pool.status(), workers=1)
    info["processes"] = [dict(p, tasks=1) for p in info["processes"][:1]]
    text = "\n".join(_local_lines(info))
    assert "pool: local, 1 worker, start method" in text and ", 1 task, " in text, text
    info = dict(info, workers=2)
    info["processes"] = [dict(info["processes"][0], tasks=0)]
    text = "\n".join(_local_lines(info))
    assert "pool: local, 2 workers," in text and ", 0 tasks, " in text, text


def test_workers_more_than_the_pool_grows_it_for_good_and_says_so(capfd):
    """``-n 3`` on a 2-worker pool: the guide said "for this call"; the pool
    grows and stays that size, and one line now says so, with how to shrink it."""
    from mpmagic import pool as pool_module

    pool_module.shutdown()
    mpmagic.use_local(2, "forkserver").wait_ready()
    try:
        capfd.readouterr()
        assert mpmagic.pmap(abs, [-1, -2, -3], workers=3) == [1, 2, 3]
        assert ("the pool grew from 2 to 3 workers for workers=3 (-n 3) and stays that size: start_pool(workers=2) "
                "(%pool resize 2) shrinks it") in capfd.readouterr().err
        assert mpmagic.get_pool().workers == 3
        mpmagic.pmap(abs, [-1], workers=3)
        assert "grew" not in capfd.readouterr().err  # (once: it has 3 now)
        # More than the machine runs is refused, and nothing says it grew (it said so, then refused).
        with pytest.raises(mpmagic.UsageError, match="more processes than this machine can run"):
            mpmagic.pmap(abs, [-1], workers=100_000)
        assert "grew" not in capfd.readouterr().err
        assert mpmagic.get_pool().workers == 3
    finally:
        mpmagic.stop_pool()


def test_an_interrupted_pool_restart_is_one_line_saying_what_goes_on(ip, monkeypatch):
    """A Ctrl-C during %pool restart's wait for the workers was a bare
    KeyboardInterrupt with a traceback through threading."""
    from mpmagic import pool as pool_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pool_module, "restart_with", interrupted)
    result = ip.run_cell("%pool restart", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, KeyboardInterrupt)
    assert err._render_traceback_() == [
        "KeyboardInterrupt: %pool restart interrupted while it waited for the workers; they go on starting, "
        "and %pool shows their state"]


def test_a_ctrl_c_between_a_restarts_stop_and_start_is_held_until_the_new_pool_starts(ip, monkeypatch):
    """Ctrl-C while %pool restart --start-method spawn stopped the old pool: the
    line said the workers "go on starting", but the new pool was never made and
    the next run started the old one again (forkserver). The interrupt now waits
    until the new workers are started, which makes that line true."""
    from mpmagic.backends.local import LocalBackend

    mpmagic.use_local(2, "forkserver")
    mpmagic.get_pool().start()
    real_stop = LocalBackend.stop

    def stop_then_interrupt(self, timeout: float = 2.0, wait_busy: bool = True, *, by: str | None = None) -> None:
        real_stop(self, timeout, wait_busy, by=by)
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, once the old workers are gone

    monkeypatch.setattr(LocalBackend, "stop", stop_then_interrupt)
    try:
        err = ip.run_cell("%pool restart --start-method spawn", store_history=False).error_in_exec
        monkeypatch.undo()
        assert isinstance(err, KeyboardInterrupt)
        assert err._render_traceback_() == [  # (the restart finished first: the line says so)
            "KeyboardInterrupt: %pool restart interrupted: its change was finished first, and the pool "
            "(2 workers, start method spawn) goes on starting; %pool shows its state"]
        pool = mpmagic.get_pool()
        assert pool.start_method == "spawn" and len(pool.slots) == 2  # made and started
        assert mpmagic.pmap(abs, [-1, -2]) == [1, 2] and mpmagic.get_pool() is pool
    finally:
        mpmagic.stop_pool()


@pytest.mark.parametrize("given, said", [
    ("1e400", "max_memory must be a size such as '2GB' or '512MiB', not '1e400'"),
    ("1e300TB", "max_memory must be a size such as '2GB' or '512MiB', not '1e300TB'"),
    ("inf", "max_memory must be a size such as '2GB' or '512MiB', not 'inf'"),
    ("0.5", "max_memory must be at least one byte: '0.5' is less than one byte"),
    ("-5", "max_memory must be more than 0 bytes (or 0: no limit), not '-5'"),
])
def test_a_max_memory_that_is_no_size_is_refused_in_one_line_by_the_magic_and_the_api(ip, given, said):
    """``1e400`` ended in a bare OverflowError through pool.py; ``0.5`` was called not more than 0 bytes."""
    from IPython.core.error import UsageError

    before = pool_module._max_memory
    err = ip.run_cell(f"%pool start --max-memory {given}", store_history=False).error_in_exec
    assert isinstance(err, UsageError) and str(err).splitlines()[0] == f"%pool: {said}", repr(err)
    with pytest.raises(mpmagic.UsageError, match=f"^{re.escape(said)}$"):
        mpmagic.start_pool(max_memory=given)
    with pytest.raises(mpmagic.UsageError, match="^max_memory must be a size"):
        mpmagic.start_pool(max_memory=float("inf"))  # type: ignore[arg-type]
    assert pool_module._max_memory == before  # (nothing half-applied)


@pytest.mark.parametrize("zero", [0, "0", "-0", "0GB", 0.0])
def test_a_max_memory_of_zero_in_any_spelling_is_no_limit(zero):
    assert pool_module.parse_memory(zero) is None


def test_use_local_takes_max_memory_as_the_magic_does(ip):
    """``use_local(max_memory=)`` (it had none; ``%pool local --max-memory`` has it)."""
    run(ip, "%pool local -n 2 --max-memory 2GB")
    assert mpmagic.get_pool().max_memory == 2 * 10**9
    assert mpmagic.use_local(2, max_memory="1GB").max_memory == 10**9
    mpmagic.use_local(2, max_memory=0)
    assert mpmagic.get_pool().max_memory is None


def test_a_process_forked_from_the_notebook_maps_serially_and_leaves_the_pool_alone(local_pool, ip, capfd):
    """A fork-started ``multiprocessing.Process`` (Python 3.11's default on Linux)
    whose target called pmap after the pool had started blocked for good: its
    copy of the pool had no manager thread, and its workers were the parent's.
    It now maps serially there, and its exit (exit hooks run: a bare os.fork)
    neither stops the parent's workers nor unlinks the parent's shared memory."""
    run(ip, "import mpmagic, multiprocessing, os, sys, atexit, numpy as np\ndef sq(x):\n    return x * x\n"
            "def child(q):\n    q.put(mpmagic.pmap(sq, range(5)))\n"
            "kept = mpmagic.share(np.arange(10))\n")
    assert run(ip, "mpmagic.pmap(sq, range(4))") == [0, 1, 4, 9]  # the pool is up
    pids = [s.pid for s in local_pool.slots]
    run(ip, "ctx = multiprocessing.get_context('fork')\nq = ctx.Queue()\n"
            "p = ctx.Process(target=child, args=(q,))\np.start()\n")
    try:
        assert run(ip, "q.get(timeout=5)") == [0, 1, 4, 9, 16]
        run(ip, "p.join(5)")
        assert run(ip, "p.exitcode") == 0
    finally:
        run(ip, "p.kill() if p.is_alive() else None")
    # A bare fork whose exit runs every exit hook: ours (stop_all, shm.release_all) and
    # multiprocessing's, which terminated the daemonic children it thought it had (the
    # notebook's workers) and failed to join them: "can only join a child process".
    # (An exit hook's error goes to sys.unraisablehook, which pytest replaces: the child
    # writes it to fd 2. IPython's own exit hook empties the namespace: hence the defaults.)
    capfd.readouterr()
    pid = run(ip, "pid = os.fork()\nif pid == 0:\n    try:\n"
                  "        sys.unraisablehook = lambda u, write=os.write: write(2, repr(u.exc_value).encode())\n"
                  "        atexit._run_exitfuncs()\n    finally:\n        import os\n        os._exit(0)\npid")
    os.waitpid(pid, 0)
    assert capfd.readouterr().err == ""
    assert [s.pid for s in local_pool.slots] == pids and all(_alive(p) for p in pids)
    assert run(ip, "mpmagic.pmap(sq, range(6), workers=2)") == [0, 1, 4, 9, 16, 25]
    assert run(ip, "int(mpmagic.pmap(np.sum, [kept])[0])") == 45  # its segment is still there
    run(ip, "del kept")


def test_pool_local_with_n_on_the_running_local_pool_says_it_resized(ip):
    """``%pool local -n 2`` on 3 workers stopped one and said "nothing was stopped"."""
    from conftest import ensure_pool

    try:
        run(ip, "%pool local -n 3")
        status = run(ip, "%pool local -n 2")
        assert status.notice == ("%pool local: already on local worker processes; resized from 3 to 2 workers "
                                 "(stopped 1)")
        assert run(ip, "%pool local -n 2").notice.endswith("; nothing was stopped")
    finally:
        ensure_pool("forkserver")


def test_pool_help_names_its_positionals_as_the_reference_does():
    """``%pool?`` listed ``target`` and ``name`` beside ``ACTION``; the reference says TARGET and NAME."""
    from mpmagic.magics import _pool_parser

    text = _pool_parser().format_help()
    assert all(f"\n  {word} " in text for word in ("ACTION", "TARGET", "NAME")), text
    assert "\n  target " not in text and "\n  name " not in text, text


def test_a_run_the_pool_was_stopped_under_names_what_stopped_it(ip, pool2):
    """A background run in flight when ``%pool stop``, ``%pool restart`` or a new
    start method (``%pool start --start-method fork``: a new pool) stopped its pool
    failed with "the pool was stopped while this run was in flight": it did not say
    what stopped it, so the user could not tell their own line from a crash. It
    names the line the user typed, and what to do; so does the run's report."""
    import time

    try:
        for line, by in (("%pool stop", "%pool stop"), ("%pool restart", "%pool restart"),
                         ("%pool start --start-method fork", "%pool start")):
            handle = mpmagic.pmap(time.sleep, [0.1] * 40, chunksize=1, block=False)
            deadline = time.monotonic() + 30
            while not handle.items_done:  # (in flight: a unit came back, most are to come)
                assert time.monotonic() < deadline and not handle.done(), repr(handle)
                time.sleep(0.01)
            run(ip, line)
            with pytest.raises(mpmagic.MPMagicError) as info:
                handle.result(timeout=30)
            assert str(info.value) == f"the pool was stopped by {by} while this run was in flight: run it again"
            # Its report's line too (it said "pmap failed after 2 of 40 items", as if an item had).
            line = rf"pmap stopped by {re.escape(by)} after \d+ of 40 items finished, \S+ m?s"
            assert re.fullmatch(line, handle.report().text()), handle.report().text()
    finally:
        ensure_pool("forkserver")


def test_a_run_that_picked_a_pool_just_replaced_fails_cleanly_and_never_starts_it_again(pool2):
    """A run that chose the pool (``get_pool()``) just before another thread's
    ``start_pool(start_method=...)`` replaced it reached the old pool's
    ``submit``, whose start brought the replaced pool back to life: the run
    went through on workers ``%pool`` did not list and ``stop_pool()`` never
    stopped (they lived until the interpreter exited). The replaced pool now
    stays stopped; the run fails as one the replacement overtook ("the pool
    was stopped while this run was in flight", as the docs say), and the next
    run uses the new pool."""
    old = pool2
    helpers = {p.pid for p in psutil.Process().children(recursive=True)} - {s.pid for s in old.slots}
    switched = []
    real_want_for = old.warmth.want_for

    def switch_then_go_on(*args, **kwargs):  # (called in submit, between choosing the pool and starting it)
        old.warmth.want_for = real_want_for
        switched.append(mpmagic.start_pool(start_method="fork"))
        return real_want_for(*args, **kwargs)

    old.warmth.want_for = switch_then_go_on
    try:
        with pytest.raises(mpmagic.MPMagicError, match=r"^the pool was stopped by start_pool\(\) while this run was in flight: run it again$"):
            mpmagic.pmap(abs, [-1, -2])
        new = switched[0]
        assert new is not old and pool_module.current_pool() is new and new.start_method == "fork"
        assert old.slots == [] and not old.running  # not started again
        with pytest.raises(mpmagic.MPMagicError, match="replaced by another one .* mpmagic.get_pool"):
            old.start()  # nothing starts it again
        assert mpmagic.pmap(abs, [-1, -2]) == [1, 2] and mpmagic.get_pool() is new
        mpmagic.stop_pool()
        left = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in helpers and _alive(p.pid)]
        assert left == []  # (the resource tracker and the fork server were there before)
    finally:
        old.warmth.want_for = real_want_for
        mpmagic.stop_pool()


def _ctrl_c_in(monkeypatch, name: str) -> None:
    """Make ``LocalBackend.<name>`` send this process a SIGINT (the user's Ctrl-C) as it starts."""
    from mpmagic.backends.local import LocalBackend

    real = getattr(LocalBackend, name)

    def interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LocalBackend, name, interrupted)


def test_a_ctrl_c_during_stop_pool_lets_the_stop_finish_and_says_so_in_one_line(pool2, monkeypatch):
    """Ctrl-C while stop_pool() waited for busy workers cut the stop short: a bare
    KeyboardInterrupt through multiprocessing's join, the workers left computing
    out of the pool (no later stop reached them), its segments left in /dev/shm.
    The stop now finishes, then the interrupt is one line saying so."""
    pids = [s.pid for s in pool2.slots]
    _ctrl_c_in(monkeypatch, "_stop_workers")  # (as the stop waits for the workers)
    with pytest.raises(KeyboardInterrupt) as info:
        mpmagic.stop_pool()
    monkeypatch.undo()
    assert info.value._render_traceback_() == [
        "KeyboardInterrupt: stop_pool() interrupted: the stop was finished first, and none of the pool's "
        "workers is left running"]
    assert pool2.slots == [] and not any(_alive(pid) for pid in pids)
    assert mpmagic.pmap(abs, [-1, -2]) == [1, 2]  # and the next run starts it again


def test_a_ctrl_c_during_pool_restarts_stop_says_the_restart_was_finished_first(ip, pool2, monkeypatch):
    """A Ctrl-C during ``%pool restart``'s stop of busy workers is held until the
    restart is done (the state afterwards was right), but it was reported as
    "%pool restart interrupted while it waited for the workers": it came during the
    stop, not the wait, and the line did not say the restart finished first, as
    ``%pool stop`` and ``%pool start`` say."""
    pids = [s.pid for s in pool2.slots]
    _ctrl_c_in(monkeypatch, "stop")  # (as the old workers stop)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            ip.run_line_magic("pool", "restart")
        monkeypatch.undo()
        assert info.value._render_traceback_() == [
            "KeyboardInterrupt: %pool restart interrupted: its change was finished first, and the pool "
            "(2 workers, start method forkserver) goes on starting; %pool shows its state"]
        assert mpmagic.get_pool() is pool2 and not any(_alive(pid) for pid in pids)  # restarted: new workers
        with pytest.raises(KeyboardInterrupt) as info:
            _ctrl_c_in(monkeypatch, "stop")
            mpmagic.restart_pool()
        monkeypatch.undo()
        assert info.value._render_traceback_()[0].startswith(
            "KeyboardInterrupt: restart_pool() interrupted: its change was finished first")
        assert mpmagic.pmap(abs, [-1, -2]) == [1, 2]
    finally:
        monkeypatch.undo()


def test_a_ctrl_c_during_pool_local_names_pool_local(ip, pool2, monkeypatch):
    """``%pool local --start-method fork``'s held Ctrl-C was reported as
    "use_local() interrupted", the function the magic calls, not what was typed."""
    _ctrl_c_in(monkeypatch, "stop")  # (as the old pool stops for the new start method)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            ip.run_line_magic("pool", "local --start-method fork")
        monkeypatch.undo()
        assert info.value._render_traceback_() == [
            "KeyboardInterrupt: %pool local interrupted: its change was finished first, and the pool "
            "(2 workers, start method fork) goes on starting; %pool shows its state"]
        assert mpmagic.get_pool().start_method == "fork" and mpmagic.pmap(abs, [-1, -2]) == [1, 2]
    finally:
        monkeypatch.undo()
        mpmagic.stop_pool()


def test_a_ctrl_c_during_a_start_method_switch_lets_it_finish_and_says_so_in_one_line(pool2, monkeypatch):
    """Ctrl-C while start_pool(start_method=...) stopped the old pool left the switch
    half done: the old pool stopped, the new start method silently dropped (the
    next run started the old pool again). As restart_with, the switch now finishes
    first, then the interrupt is one line saying so."""
    old = pool2
    _ctrl_c_in(monkeypatch, "stop")  # (as the old pool stops)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            mpmagic.start_pool(start_method="fork")
        monkeypatch.undo()
        assert info.value._render_traceback_() == [
            "KeyboardInterrupt: start_pool() interrupted: its change was finished first, and the pool "
            "(2 workers, start method fork) goes on starting; %pool shows its state"]
        new = mpmagic.get_pool()
        assert new is not old and new.start_method == "fork" and len(new.slots) == 2 and old.slots == []
        assert mpmagic.pmap(abs, [-1, -2]) == [1, 2] and mpmagic.get_pool() is new
    finally:
        mpmagic.stop_pool()


def test_a_stopped_worker_is_shown_stopped_and_a_run_waiting_on_it_says_so(ip, pool2, monkeypatch, capsys):
    """A worker stopped (SIGSTOP, a debugger) while idle: a run gave it an item and
    waited for ever with no word while the other worker sat idle, and %pool showed it
    idle or busy. Now %pool shows it stopped, and the run says once which item waits
    on it and the ways out; mpmagic neither kills nor resumes it (this test does)."""
    import threading
    import time

    from mpmagic.backends import local

    monkeypatch.setattr(local, "_STOPPED_NOTE_AFTER", 0.2, raising=False)
    run(ip, "%pmap -q abs, range(4)")
    victim = pool2.slots[0].pid
    check = getattr(local.LocalBackend, "_check_stopped", None)

    def checked(self, slot, now):  # (the line is out: resume the worker, as the user would)
        check(self, slot, now)
        if slot.stopped_said:
            os.kill(slot.pid, signal.SIGCONT)

    if check is not None:
        monkeypatch.setattr(local.LocalBackend, "_check_stopped", checked)
    safety = threading.Timer(30, os.kill, (victim, signal.SIGCONT))  # (never a hung test)
    os.kill(victim, signal.SIGSTOP)
    try:
        while psutil.Process(victim).status() != psutil.STATUS_STOPPED:  # (the signal lands a moment later)
            time.sleep(0.01)
        shown = {p["pid"]: p for p in mpmagic.pool_status().info["processes"]}
        assert shown[victim].get("stopped") is True and not any(p.get("stopped") for p in shown.values()
                                                                if p["pid"] != victim)
        assert f"pid {victim}, stopped (kill -CONT resumes it)" in str(mpmagic.pool_status())
        capsys.readouterr()
        safety.start()
        run(ip, "import time\ndef slow_sq(x):\n    time.sleep(0.02)\n    return x * x\n")
        assert run(ip, "%pmap -q --chunksize 1 slow_sq, range(6)") == [x * x for x in range(6)]
    finally:
        safety.cancel()
        os.kill(victim, signal.SIGCONT)
    err = capsys.readouterr().err
    assert err.count("is stopped") == 1, err
    said = re.search(rf"mpmagic: worker (\d+) \(pid {victim}\) is stopped .* for (item \d); kill -CONT {victim} ", err)
    assert said, err
    # The line docs/troubleshooting.md shows (worker, pid and item vary) is this one.
    from test_docs import DOCS, shown_lines_missing, standalone_error_blocks

    [shown] = [t for _, t in standalone_error_blocks(DOCS / "troubleshooting.md", shown_elsewhere=True)
               if "is stopped" in t]
    shown = shown.replace("worker 0", f"worker {said[1]}").replace("4242", str(victim)).replace("item 4", said[2])
    assert not shown_lines_missing(shown, err, example=False), (shown, err)
    assert victim in [p["pid"] for p in mpmagic.pool_status().info["processes"]]  # (not killed)
    assert not any(p.get("stopped") for p in mpmagic.pool_status().info["processes"])


def test_a_map_after_a_worker_was_replaced_runs_on_the_ready_worker_not_behind_the_starting_one():
    """After an interrupt or a crash replaced a worker, the next map gave the
    replacement (spawn: ~1 s to start) its share of the items at once, and the run
    waited for it while the ready worker sat idle: the sum of squares in 4 chunks
    took 1.1 s for 0.2 s of work, and its report blamed "sending and collecting".
    Now a starting worker gets items only when no worker is ready: here the
    replacement is stopped before it can start, and the map still ends, on the
    other worker, with serial map's results."""
    import threading
    import time

    backend = ensure_pool("spawn")
    backend.wait_ready()
    assert mpmagic.pmap(abs, range(-4, 0), chunksize=1) == [4, 3, 2, 1]
    before = {s.pid for s in backend.slots}
    survivor = backend.slots[0].pid
    os.kill(backend.slots[1].pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    new = None
    while new is None and time.monotonic() < deadline:
        new = next((s for s in list(backend.slots) if s.proc.pid not in before and s.proc.pid), None)
        time.sleep(0.001)
    assert new is not None, "the killed worker was not replaced"
    starting = new.proc.pid
    os.kill(starting, signal.SIGSTOP)
    safety = threading.Timer(60, os.kill, (starting, signal.SIGCONT))  # (never a hung test)
    safety.start()
    try:
        assert not new.ready  # (spawn takes far longer to start than this test takes to stop it)
        done = mpmagic.submit(os.getpid, [()] * 4, star=True, chunksize=1)  # (os.getpid() takes no argument)
        pids = done.result(timeout=30)
    finally:
        safety.cancel()
        os.kill(starting, signal.SIGCONT)
    assert pids == [survivor] * 4
    backend.wait_ready()


def test_status_marks_the_listed_workers_that_stop_once_idle(pool2):
    """%pool resize 1 while both workers were busy said "pool: local, 1 worker" and listed two
    busy workers, nothing telling which one stops once idle (nor a cell's extra workers for its
    ranks, %%parallel -n 4 on 2 workers): each such row now says so."""
    from mpmagic.status import _local_lines

    with pool2._lock:  # (the manager stops an idle worker so marked: not before the flags are back)
        retiring, extra = pool2.slots
        retiring.retiring, extra.temporary = True, True
        try:
            info = pool2.status()
        finally:
            retiring.retiring, extra.temporary = False, False
    rows = {line.split(":")[0].strip(): line for line in _local_lines(dict(info, workers=1))}
    assert ", stops once idle (beyond the pool's size: %pool resize), " in rows[f"worker {retiring.wid}"]
    assert ", stops once idle (an extra worker for a cell's ranks), " in rows[f"worker {extra.wid}"]
    assert "stops once idle" not in "\n".join(_local_lines(pool2.status()))


def test_the_managers_lines_with_no_run_in_flight_go_to_the_next_runs_cell(pool2, monkeypatch, capsys):
    """small27: a line of the manager thread's with no run in flight (the fork-hazard line of a
    replacement worker it forks, a replacement's setup failure) was written (or logged) from
    that thread, landing in whichever Jupyter cell ran then: it is held and said first in the
    next run's cell."""
    from mpmagic import threads

    line = "mpmagic: (a fork hazard the notebook's threads make)"
    monkeypatch.setattr(threads, "fork_hazard", lambda: line)
    with pool2._lock:  # (as the manager forks a replacement: in its thread, under the lock, no run in flight)
        manager, pool2._manager = pool2._manager, threading.current_thread()
        try:
            pool2._say_fork_hazard()
        finally:
            pool2._manager = manager
    assert line not in capsys.readouterr().err
    assert mpmagic.pmap(abs, [-1]) == [1]
    assert line + "\n" in capsys.readouterr().err
