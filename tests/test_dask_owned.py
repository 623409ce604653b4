"""Issue 14.4: a shared Dask cluster is not ours to restart.

On the session's cluster (``dask_cluster``: scheduler and workers started
outside mpmagic, which only connects to them) a timeout, an interrupt or
``%pool restart`` restarts no worker, and a task's output capture leaves the
worker's ``sys.stdout``/``sys.stderr`` as they were. On the LocalCluster
mpmagic starts itself, a timed-out task's worker is restarted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback

import cloudpickle
import pytest
from conftest import (
    DASK_WORKERS,
    ctrl_c_during_the_exit_wait,
    ensure_pool,
    kill_in_its_second_item,
    run,
)

import mpmagic
from mpmagic import pool as pool_module

# The Dask workers cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def dask_pool(dask_cluster, request):
    return ensure_pool("dask", request)


def _pids(backend) -> dict:
    return backend.client.run(os.getpid)


def _wait_for_new_workers(backend, old_pids: set, timeout: float = 60.0) -> None:
    """Until the cluster's worker processes are new ones (a killed worker stays
    registered for a moment, and asking it for its pid then fails)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pids = set(_pids(backend).values())
        except OSError:
            pids = set()
        if pids and not pids & old_pids:
            return
        assert time.monotonic() < deadline, f"the workers {old_pids} were not replaced: {pids}"
        time.sleep(0.2)


def _streams() -> tuple[str, str]:
    return type(sys.stdout).__name__, type(sys.stderr).__name__


def test_timeout_on_a_connected_cluster_restarts_no_worker(ip, dask_pool, tmp_path):
    before = _pids(dask_pool)
    # Item 2 hangs until the test releases it (at most 3 s): its worker is left busy with it,
    # and later tests would wait for that worker.
    release = tmp_path / "release"
    run(ip, f"import os, time\ndef hang_at_2(x):\n    t = time.monotonic()\n    while x == 2 and not "
            f"os.path.exists({str(release)!r}) and time.monotonic() - t < 3:\n        time.sleep(0.02)\n    return x\n")
    try:
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
    finally:
        release.touch()


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


def test_timeout_on_mpmagics_own_local_cluster_restarts_that_worker(ip, request, capsys, monkeypatch):
    pytest.importorskip("distributed")
    pool_module.shutdown()
    mpmagic.use_dask(workers=1)
    try:
        backend = pool_module.get_pool()
        assert backend.owns_cluster
        before = set(_pids(backend).values())
        addresses = set(backend.client.nthreads())
        run(ip, "import time\ndef hang(x):\n    time.sleep(30)\n    return x\n")
        t0 = time.monotonic()
        with pytest.raises(mpmagic.TaskTimeoutError, match="its worker was stopped and replaced"):
            run(ip, "%pmap -q --timeout 1 hang, [0]")
        # The scheduler is told at once: until it noticed, a live worker could spend Dask's 30 s
        # connect limit fetching the function's payload from the dead one.
        assert not set(backend.client.nthreads()) & addresses
        # Back at the timeout, not after Dask's restart of the worker (T + 4.5 s,
        # and now and then its 30 s limit): the worker is killed, not asked to close.
        assert time.monotonic() - t0 < 4.5
        _wait_for_new_workers(backend, before)
        # Stopped while the nanny starts a new worker (`%pool local` right after a
        # timeout): the close timed out with a traceback, and that new worker process
        # stayed alive in the kernel. Now it says nothing and leaves no process.
        with pytest.raises(mpmagic.TaskTimeoutError):
            run(ip, "%pmap -q --timeout 0.5 hang, [1]")
        [nanny] = backend.cluster.workers.values()
        deadline = time.monotonic() + 5.0
        while nanny.process.status.name != "starting" and time.monotonic() < deadline:
            time.sleep(0.02)  # (until the nanny starts the new worker process)
        capsys.readouterr()
        # (The race made certain: the close cannot end before the new worker is up.)
        monkeypatch.setattr(sys.modules[type(backend).__module__], "_CLOSE_GRACE", 0.1)
        backend.stop(timeout=0.1)
        assert capsys.readouterr().err == ""
        deadline = time.monotonic() + 2.0
        while _dask_worker_children() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _dask_worker_children() == []
    finally:
        pool_module.shutdown()


def _dask_worker_children() -> list:
    """This process's live children that are Dask worker processes (a LocalCluster's are spawned)."""
    import psutil

    kids = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                kids.append(child.pid)
        except psutil.Error:
            pass
    return kids


def test_pool_restart_cuts_a_background_run_off_as_on_the_local_pool(ip):
    """``%pool restart`` on the cluster mpmagic started, with a background map in
    flight: the run says the pool was stopped, as the local pool's does (it
    blamed a chunk: "had its task cancelled ...; the pool replaced it")."""
    pool_module.shutdown()
    mpmagic.use_dask(workers=2)
    try:
        run(ip, "import time\ndef slow_item(x):\n    time.sleep(0.2)\n    return x\n")
        handle = mpmagic.submit(ip.user_ns["slow_item"], range(30), workers=2)
        deadline = time.monotonic() + 30
        while not handle.items_done:  # (in flight: its first items came back, most are to come)
            assert time.monotonic() < deadline and not handle.done(), repr(handle)
            time.sleep(0.02)
        run(ip, "%pool restart")
        with pytest.raises(mpmagic.MPMagicError) as info:
            handle.result(timeout=30)
        assert not isinstance(info.value, mpmagic.WorkerLostError)
        assert str(info.value) == "the pool was stopped by %pool restart while this run was in flight: run it again"
        assert run(ip, "%pmap -q abs, [-1, -2]") == [1, 2]
    finally:
        pool_module.shutdown()


def test_a_run_that_chose_a_dask_pool_replaced_by_use_local_fails_and_starts_no_cluster(ip):
    """A run that chose the Dask pool just before another thread's ``use_local()``
    replaced it (it waited for its turn: runs on Dask take turns) started a new
    LocalCluster when its turn came: its worker process was out of ``%pool``'s and
    ``stop_pool()``'s reach, one more per switch, until the interpreter exited. The
    replaced pool now stays stopped, as a replaced local pool does: the run fails
    as one the switch overtook, and nothing starts the old pool again."""
    pool_module.shutdown()
    old = mpmagic.use_dask(workers=1)
    real_take_turn = old._take_turn

    def switch_then_take_turn(run):  # (the other thread's switch, while this run waits for its turn)
        del old._take_turn
        mpmagic.use_local(workers=1)
        return real_take_turn(run)

    old._take_turn = switch_then_take_turn
    try:
        with pytest.raises(mpmagic.MPMagicError) as info:
            mpmagic.pmap(abs, [-1, -2])
        assert str(info.value) == "the pool was stopped by use_local() while this run was in flight: run it again"
        assert not old.running and old.client is None and old.cluster is None  # not started again
        with pytest.raises(mpmagic.MPMagicError, match="replaced by another one .* mpmagic.get_pool"):
            old.start()  # nothing starts it again
        new = pool_module.current_pool()
        assert new is not old and new.name == "local"
        assert mpmagic.pmap(abs, [-1, -2]) == [1, 2] and mpmagic.get_pool() is new
        mpmagic.stop_pool()
        deadline = time.monotonic() + 10.0
        while _dask_worker_children() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _dask_worker_children() == []
    finally:
        old.__dict__.pop("_take_turn", None)
        pool_module.shutdown()


def test_a_result_dask_cannot_fetch_as_the_pool_stops_blames_the_stop(dask_pool, monkeypatch):
    """A run in flight when ``use_local()`` stopped the Dask pool fetched a finished
    task's result from the closing client, and failed with "Dask could not run items
    0-2: RuntimeError: ConnectionPool is closed" (1 run in ~4,000, a tester): it
    blamed the items for the stop. The stop is the cause: the run says so, as the
    others in flight did."""
    from distributed import Future

    real_result = Future.result
    stopped = []

    def result_as_the_pool_stops(self, timeout=None):
        if not stopped and sys._getframe(1).f_code.co_name == "_finish":  # (the run's fetch of a result)
            stopped.append(True)
            stop = threading.Thread(target=dask_pool.stop, kwargs={"by": "use_local()"})  # (as use_local() in another thread)
            stop.start()
            stop.join()
            raise RuntimeError("ConnectionPool is closed")  # what Dask's closed client said
        return real_result(self, timeout)

    monkeypatch.setattr(Future, "result", result_as_the_pool_stops)
    with pytest.raises(mpmagic.MPMagicError) as info:
        mpmagic.pmap(abs, range(-3, 0))
    monkeypatch.undo()
    assert stopped
    assert str(info.value) == "the pool was stopped by use_local() while this run was in flight: run it again"
    assert mpmagic.pmap(abs, [-1, -2]) == [1, 2]  # (the next run connects again)


# -- abandoned tasks, -n, control flow, the notebook's world -----------------


def test_after_a_timeout_the_next_run_leaves_the_still_busy_worker_out(ip, dask_pool, tmp_path, capsys):
    """Dask cannot stop a timed-out task on a cluster mpmagic only connected to:
    its worker thread stays busy. The next run must not queue chunks behind it
    (it waited 19 s for a 20 s task): it runs on the other workers and says so."""
    hung, release = tmp_path / "hung_pid", tmp_path / "release"
    run(ip, "import os, time\n"
            "def hang_once(x):\n"
            f"    if x == 1:\n        open({str(hung)!r}, 'w').write(str(os.getpid()))\n"
            f"        while not os.path.exists({str(release)!r}) and time.sleep(0.05) is None:\n            pass\n"
            "    return x\n"
            "def where(x):\n    time.sleep(0.05)\n    return os.getpid()\n")
    try:
        with pytest.raises(mpmagic.TaskTimeoutError):
            run(ip, "%pmap -q --timeout 0.5 hang_once, range(4)")
        capsys.readouterr()
        pids = run(ip, "%pmap -q --chunksize 1 where, range(12)")
        assert int(hung.read_text()) not in pids  # not one chunk waited behind the stuck task
        err = capsys.readouterr().err
        assert "still busy with a task an earlier timeout or interrupt gave up on" in err
        assert "this run uses the other 3 worker threads" in err
        assert "pmap: 12 items on 3 worker threads (dask)" in mpmagic.last_report().line()  # as the notice says
        # %pool: the stuck worker runs a task (the scheduler forgot it when it was cancelled), the others none.
        address = next(a for a, pid in dask_pool.client.run(os.getpid).items() if pid == int(hung.read_text()))
        lines = [line for line in str(run(ip, "%pool")).splitlines() if "  worker tcp://" in line]
        assert [line for line in lines if "running" in line] == [next(x for x in lines if address + ":" in x)]
    finally:
        release.write_text("")  # the stuck task returns: later tests have every worker


def test_a_task_given_up_on_whose_end_event_is_lost_holds_its_worker_only_while_it_runs(
    ip, dask_pool, tmp_path, capsys, monkeypatch
):
    """A worker was marked busy with a timed-out task until that task's end event
    came. The event never comes once the client's topic subscription is gone (a
    reconnect to the scheduler drops it) or the event is lost: the worker stayed
    "busy" for the rest of the session, and every later run, ``--scaling`` too,
    left it out. Here the subscription is dropped while the task runs."""
    from mpmagic.backends import dask as dask_backend

    monkeypatch.setattr(dask_backend, "_ABANDONED_ASKED", 0.0, raising=False)  # (ask the workers on every run)
    hung, release, done = tmp_path / "hung_pid", tmp_path / "release", tmp_path / "done"
    run(ip, "import os, time\n"
            "def hang_once(x):\n"
            f"    if x == 1:\n        open({str(hung)!r}, 'w').write(str(os.getpid()))\n"
            f"        while not os.path.exists({str(release)!r}) and time.sleep(0.05) is None:\n            pass\n"
            f"        open({str(done)!r}, 'w').write('')\n"
            "    return x\n"
            "def where(x):\n    time.sleep(0.05)\n    return os.getpid()\n")
    client, topic = dask_pool.client, None
    try:
        with pytest.raises(mpmagic.TaskTimeoutError):
            run(ip, "%pmap -q --timeout 0.5 hang_once, range(4)")
        topic = dask_pool._topic
        client.unsubscribe_topic(topic)  # the stuck task's end event now reaches no one
        capsys.readouterr()
        # Still running: its worker is still left out (the workers are asked).
        pids = run(ip, "%pmap -q --chunksize 1 where, range(12)")
        assert int(hung.read_text()) not in pids
        assert "still busy with a task an earlier timeout or interrupt gave up on" in capsys.readouterr().err
        release.write_text("")
        deadline = time.monotonic() + 60
        while not done.exists() or any(dask_pool.client.run(dask_backend.dask_tasks.running_tags).values()):
            assert time.monotonic() < deadline, "the released task did not return within 60 s"
            time.sleep(0.05)
        # Returned, its end event lost: every worker thread is the run's again.
        run(ip, "%pmap -q --chunksize 1 where, range(12)")
        assert "still busy" not in capsys.readouterr().err
        assert f"pmap: 12 items on {DASK_WORKERS} worker threads (dask)" in mpmagic.last_report().line()
        assert dask_pool._abandoned == {}
    finally:
        release.write_text("")
        if topic is not None:
            client.subscribe_topic(topic, dask_pool._on_event)


def test_a_marked_worker_that_does_not_answer_never_holds_a_run(ip, dask_pool, monkeypatch):
    """The question which tasks given up on still run (``Client.run`` to the marked
    workers, no timeout of its own) went out from the run itself: a marked worker that
    does not answer (its event loop stalled by a task holding the GIL, or dying) kept
    the run waiting for good. It goes on in its own thread; the run waits 2 s at most,
    leaves the marked worker out, and its results are map()'s."""
    from mpmagic.backends import dask as dask_backend

    monkeypatch.setattr(dask_backend, "_ABANDONED_ASKED", 0.0, raising=False)
    answer = threading.Event()
    client = dask_pool.client

    def no_answer(*args, **kwargs):
        answer.wait(60)
        return {}

    address = sorted(client.scheduler_info()["workers"])[0]
    got: list = []
    caller = threading.Thread(target=lambda: got.append(mpmagic.pmap(abs, range(-6, 6), show_report=False)),
                              daemon=True)
    try:
        monkeypatch.setattr(client, "run", no_answer)
        with dask_pool._lock:
            dask_pool._abandoned["mpmagic-test-never-answered"] = address
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "the run waited on a worker that does not answer"
        assert got == [list(map(abs, range(-6, 6)))]
    finally:
        answer.set()
        caller.join(30)
        with dask_pool._lock:
            dask_pool._abandoned.pop("mpmagic-test-never-answered", None)


def _payload_lost(payload_key: str, flag: str | None):
    """A stand-in for ``dask_tasks.run_message`` that fails as Dask does when it runs a
    task on a worker that lost the function's payload (``KeyError: 'mpmagic-payload-...'``,
    raised before the task's function runs): once (the first task to take ``flag``),
    or every time (``flag`` None)."""

    def run_message(data, func_payload, *rest):
        from mpmagic.backends import dask_tasks

        if flag is None:
            raise KeyError(payload_key)
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return dask_tasks.run_message(data, func_payload, *rest)
        raise KeyError(payload_key)

    return run_message


def test_a_task_whose_worker_lost_the_functions_payload_is_sent_again(ip, dask_pool, tmp_path, monkeypatch):
    """A map on a cluster where a worker died failed with "Dask could not run item 7:
    KeyError: 'mpmagic-payload-...'": Dask ran the task on a worker that no longer held
    the payload it thought was there. None of the task's code ran: it goes out again
    (with a new payload), and the map's results are the serial ones. If it keeps
    happening, one line says what was lost, not a bare KeyError."""
    from mpmagic.backends import dask as dask_backend

    run(ip, "def triple(x):\n    return 3 * x\n")
    assert run(ip, "%pmap -q --chunksize 1 triple, range(8)") == [3 * x for x in range(8)]
    payload_key = next(reversed(dask_pool._payloads.values())).future.key
    monkeypatch.setattr(dask_backend.dask_tasks, "run_message", _payload_lost(payload_key, str(tmp_path / "once")))
    assert run(ip, "%pmap -q --chunksize 1 triple, range(8)") == [3 * x for x in range(8)]
    assert (tmp_path / "once").exists()  # (one task did fail so)
    assert payload_key not in {held.future.key for held in dask_pool._payloads.values()}  # (the lost key is not used again)

    monkeypatch.setattr(dask_backend.dask_tasks, "run_message", _payload_lost(payload_key, None))
    with pytest.raises(mpmagic.MPMagicError) as info:
        run(ip, "%pmap -q --chunksize 1 triple, range(8)")
    msg = str(info.value)
    assert "\n" not in msg and "the worker it went to no longer held the function's payload" in msg, msg
    assert "4 times in a row" in msg and "run the call again" in msg, msg
    monkeypatch.undo()
    assert run(ip, "%pmap -q --chunksize 1 triple, range(8)") == [3 * x for x in range(8)]


def test_workers_n_runs_at_most_n_tasks_at_once(ip, dask_pool):
    """``-n 1`` ran on every Dask worker while its report said "on 1 worker"."""
    run(ip, "import os, time\ndef pid_of(x):\n    time.sleep(0.05)\n    return os.getpid()\n")
    assert len(set(run(ip, "%pmap -q -n 1 --chunksize 1 pid_of, range(8)"))) == 1
    assert "on 1 worker thread (dask)" in mpmagic.last_report().line()
    # -n above the cluster's threads: the line counts the threads that ran ("on 6 workers" on 4).
    run(ip, "%pmap -q -n 6 --chunksize 1 pid_of, range(8)")
    assert f"pmap: 8 items on {DASK_WORKERS} worker threads (dask)" in mpmagic.last_report().line()
    # %pool right after: no worker runs anything (Dask's heartbeat figures said "1 running").
    assert " running" not in str(run(ip, "%pool")).split("calls run", 1)[1]
    assert len(set(mpmagic.pmap(ip.user_ns["pid_of"], range(8), workers=2, chunksize=1, progress=False))) <= 2


def test_the_line_counts_the_worker_threads_a_map_was_given_as_the_local_pool_counts_its_workers(ip, dask_pool):
    """Tester report dask22, finding 4: dask.md said the line counts the threads the map
    "ran on", but a map of one item (or of one chunk) says it ran on every free thread. It
    counts the threads the map was given, as the local pool's line counts its workers
    ("1 item on 2 workers"): one item ran on one of them."""
    run(ip, "import os\ndef pid_of_one(x):\n    return os.getpid()\n")
    assert len(run(ip, "%pmap -q pid_of_one, [0]")) == 1
    assert f"pmap: 1 item on {DASK_WORKERS} worker threads (dask)" in mpmagic.last_report().line()
    assert len(set(run(ip, "%pmap -q --chunksize 10 pid_of_one, range(10)"))) == 1  # (one chunk: one worker)
    assert f"pmap: 10 items on {DASK_WORKERS} worker threads (dask)" in mpmagic.last_report().line()


def test_stop_iteration_in_a_task_comes_back_as_on_the_local_pool(ip, dask_pool):
    """Value, cause and the task's frame, as the local pool gives them (Dask gave none)."""
    run(ip, "def stopit(x):\n    raise StopIteration(x)\n")
    for items in ("[1]", "[1] * 200"):
        with pytest.raises(RuntimeError, match=r"the task raised StopIteration \(1\)") as info:
            run(ip, f"%pmap -q stopit, {items}")
        assert repr(info.value.__cause__) == "StopIteration(1)"
        assert "stopit" in [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]


def test_the_notebooks_world_reaches_the_tasks_of_mpmagics_own_cluster(ip, tmp_path):
    """The LocalCluster mpmagic starts runs on this machine: its tasks see the
    notebook's directory, variables, sys.path and recursion limit, as serial
    code and the local pool do (they saw the worker's own, silently).

    And the notebook's environment stays its own: Dask's nanny, which runs in the
    notebook's process, sets its ``pre-spawn-environ`` (OMP_NUM_THREADS=1...) and
    PYTHONHASHSEED there to start each worker, and left them: a later local pool's
    workers took OMP_NUM_THREADS=1 as the user's, over their cap. The workers keep
    Dask's thread caps, as before."""
    import dask.config
    import distributed  # noqa: F401 - (its configuration)

    dasks = {**dask.config.get("distributed.nanny.pre-spawn-environ"), "PYTHONHASHSEED": "6640"}
    notebook = {name: os.environ.get(name) for name in dasks}
    (tmp_path / "mod_of_the_notebook.py").write_text("V = 42\n")
    pool_module.shutdown()
    mpmagic.use_dask(workers=1)
    here = os.getcwd()
    try:
        assert {name: os.environ.get(name) for name in dasks} == notebook
        run(ip, "import os\ndef _omp(_):\n    return os.environ.get('OMP_NUM_THREADS')")
        assert run(ip, "%pmap -q _omp, [0]") == [os.environ.get("OMP_NUM_THREADS", str(dasks["OMP_NUM_THREADS"]))]
        run(ip, "import os, sys\n"
                f"os.chdir({str(tmp_path)!r}); os.environ['MPM_WORLD'] = 'hello'\n"
                f"sys.path.insert(0, {str(tmp_path)!r}); __limit = sys.getrecursionlimit(); sys.setrecursionlimit(4321)\n"
                "def world(_):\n"
                "    import mod_of_the_notebook\n"
                "    return (os.getcwd(), os.environ.get('MPM_WORLD'), mod_of_the_notebook.V,\n"
                "            sys.getrecursionlimit(), open('mod_of_the_notebook.py').read())\n")
        expected = run(ip, "world(0)")
        assert run(ip, "%pmap -q world, [0, 1]") == [expected, expected]
        assert {name: os.environ.get(name) for name in dasks} == notebook
    finally:
        run(ip, "sys.setrecursionlimit(__limit); sys.path.remove(sys.path[0]); os.environ.pop('MPM_WORLD')")
        os.chdir(here)
        pool_module.shutdown()


def test_interrupt_on_mpmagics_own_cluster_kills_the_busy_workers_and_says_so(ip, capsys, tmp_path):
    """Dask cannot stop a running task: on the cluster mpmagic started, an
    interrupt kills the workers running them (new ones start), and the message
    says that, not that they were "stopped and replaced" as on the local pool.
    The next run does not wait for the abandoned 30 s tasks (it waited 13 s)."""
    pool_module.shutdown()
    mpmagic.use_dask(workers=1)
    try:
        backend = pool_module.get_pool()
        before = set(_pids(backend).values())
        began = tmp_path / "began"
        run(ip, f"import time\ndef sleeps(x):\n    open({str(began)!r}, 'w').close()\n    time.sleep(30)\n    return x\n")

        def interrupt_once_a_task_runs() -> None:  # (not on a fixed 1.5 s timer)
            deadline = time.monotonic() + 30
            while not began.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGINT)

        timer = threading.Thread(target=interrupt_once_a_task_runs, daemon=True)
        timer.start()
        with pytest.raises(KeyboardInterrupt) as info:
            run(ip, "%pmap -q sleeps, range(3)")
        timer.join()
        msg = str(info.value)
        assert re.match(r"%pmap interrupted: its \d queued Dask tasks? w\w+ cancelled, and the worker running the 1 "
                        r"task already started \(Dask cannot stop a running task\) was killed; new ones are starting "
                        r"for the next run \(item \d; on tcp://127\.0\.0\.1:\d+\)$", msg)
        assert "its workers replaced" not in msg
        # The killed worker is gone, not "still busy with a task ... Dask cannot stop" (the
        # next run said so, and that it waited for it, while the scheduler still listed it).
        assert backend._abandoned == {}
        capsys.readouterr()
        t0 = time.monotonic()
        assert run(ip, "%pmap -q abs, [-1, -2]") == [1, 2]
        assert time.monotonic() - t0 < 20  # (a hang bound: the abandoned tasks sleep 30 s)
        assert "still busy" not in capsys.readouterr().err
        _wait_for_new_workers(backend, before)
    finally:
        pool_module.shutdown()


def _say_started_then_sleep(started: str, seconds: float) -> None:
    open(started, "w").close()
    time.sleep(seconds)


def test_a_cancel_before_the_start_event_came_still_frees_the_worker(ip, monkeypatch, tmp_path):
    """A task's start event can trail its start (a loaded machine): cancelled then,
    it was neither known to run nor stopped, and the next call waited 30 s behind it."""
    pool_module.shutdown()
    mpmagic.use_dask(workers=1)
    try:
        backend = pool_module.get_pool()
        run_class = sys.modules[type(backend).__module__]._DaskRun
        real_event = run_class._event
        monkeypatch.setattr(run_class, "_event", lambda self, ev: None if ev.get("start") else real_event(self, ev))
        started = tmp_path / "started"
        call = mpmagic.call(_say_started_then_sleep, str(started), 30)
        deadline = time.monotonic() + 30
        while not started.exists():  # (the task runs; its start event was dropped above)
            assert time.monotonic() < deadline, "the task did not start"
            time.sleep(0.02)
        call.cancel()
        assert mpmagic.call(abs, -1).result(timeout=25) == 1
    finally:
        pool_module.shutdown()


def test_a_script_on_mpmagics_own_cluster_ends_once_its_runs_in_flight_are_done(tmp_path):
    """As on the local pool (test_background): a script's exit waits for its runs in
    flight, then closes the cluster. On Dask the wait must come before Python's exit
    stops its thread pools: waited for in ``atexit``, the runs queued for their turn
    failed ("Dask could not run item 0: RuntimeError: cannot schedule new futures
    after shutdown": the scheduler runs in the script's process), and a daemon
    thread's ``pmap`` printed that traceback."""
    import subprocess

    script = tmp_path / "ends.py"
    script.write_text(
        "import os, sys, threading, time\n"
        "import mpmagic\n"
        "def work(x):\n"
        "    time.sleep(0.3)\n"
        "    with open(os.path.join(sys.argv[1], f'item_{x}'), 'w') as f:\n"
        "        f.write(str(x * x))\n"
        "    return x\n"
        "def note(run):\n"
        "    with open(os.path.join(sys.argv[1], f'callback_{run.id}'), 'w') as f:\n"
        "        f.write(run.state)\n"
        "if __name__ == '__main__':\n"
        "    mpmagic.use_dask(workers=2)\n"
        "    for run in [mpmagic.call(work, i) for i in range(3)]:\n"
        "        run.add_done_callback(note)\n"
        "    threading.Thread(target=mpmagic.pmap, args=(work, [10, 11]), daemon=True).start()\n"
        "    pool, deadline = mpmagic.get_pool(), time.monotonic() + 60\n"
        "    while not getattr(pool, '_foreground', True) and time.monotonic() < deadline:\n"
        "        time.sleep(0.005)  # (until the daemon thread's run is submitted: it waits for its turn)\n"
        "    print('ending', flush=True)\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout == "ending\n", done.stderr
    files = {f.name: f.read_text() for f in out.iterdir()}
    assert {n: t for n, t in files.items() if n.startswith("item_")} == {
        f"item_{x}": str(x * x) for x in (0, 1, 2, 10, 11)}
    assert sorted(t for n, t in files.items() if n.startswith("callback_")) == ["done"] * 3
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr


def test_a_worker_its_nanny_starts_again_never_runs_an_unguarded_script(tmp_path):
    """Tester report dask22, finding 2: a script needs no ``__main__`` guard (guide.md), but
    when an item killed its worker on ``use_dask(workers=2)``'s cluster, the nanny spawned the
    new worker process from its own thread, later, and multiprocessing told it to run the
    script's ``__main__``: the whole script ran again there, its ``use_dask`` started a cluster
    of its own ("Nanny failed to start"), again and again. The script's top level must run
    once, in the script's process, and the cluster must come back whole."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import os, sys, time\n"
        "import mpmagic\n"
        "open(os.path.join(sys.argv[1], f'top_{os.getpid()}'), 'w').close()\n"
        "def dies_at_3(x):\n"
        "    if x == 3:\n"
        "        os._exit(1)\n"
        "    return x\n"
        "mpmagic.use_dask(workers=2)\n"
        "client = mpmagic.get_pool().client\n"
        "before = set(client.run(os.getpid).values())\n"
        "results = mpmagic.pmap(dies_at_3, range(6), errors='collect', progress=False)\n"
        "print([type(r.error).__name__ if isinstance(r, mpmagic.Failed) else r for r in results], flush=True)\n"
        "deadline = time.monotonic() + 90\n"
        "while True:  # until the nanny started the dead worker again (a new process)\n"
        "    try:\n"
        "        now = set(client.run(os.getpid).values())\n"
        "    except OSError:\n"
        "        now = set()\n"
        "    if len(now) == 2 and now != before or time.monotonic() > deadline:\n"
        "        break\n"
        "    time.sleep(0.2)\n"
        "print(len(now), now != before, flush=True)\n"
        "print(mpmagic.pmap(abs, [-1, 2, -3], progress=False), flush=True)\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=240)
    tops = sorted(f.name for f in out.iterdir())
    assert len(tops) == 1, f"the script's top level ran in {len(tops)} processes: {done.stderr}"
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[0, 1, 2, 'WorkerLostError', 4, 5]\n2 True\n[1, 2, 3]\n", done.stderr
    assert "Nanny failed" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_ctrl_c_during_the_exit_wait_on_mpmagics_own_cluster_stops_quietly(tmp_path):
    """Tester report (today), finding 4: Ctrl-C during the exit's wait printed
    distributed's "cannot schedule new futures after shutdown" traceback (through
    tornado's log) and took ~8 s: the run waiting for its turn started a new cluster
    once the first was stopped, and both closes waited out their grace. Now the two
    lines of the local pool, nothing else (as quickly: see the commit)."""
    import subprocess

    script = tmp_path / "ends.py"
    script.write_text(
        "import time\n"
        "import mpmagic\n"
        "if __name__ == '__main__':\n"
        "    mpmagic.use_dask(workers=2)\n"
        "    runs = [mpmagic.call(time.sleep, 300) for i in range(2)]\n"
        "    print('ending', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if (3, 12, 0) <= sys.version_info[:3] < (3, 12, 3):
        try:
            _ctrl_c_or_lost_on_early_312(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        return
    out, err = ctrl_c_during_the_exit_wait(proc, 2)
    assert proc.returncode == 0 and out == "ending\n", err
    assert err == "mpmagic: Ctrl-C: stopping the 2 runs in flight\n"


def _ctrl_c_or_lost_on_early_312(proc: subprocess.Popen) -> None:
    """The Ctrl-C test's script (two runs in flight) on CPython 3.12.0-3.12.2: they start
    no thread at exit (gh-113964), and distributed's client starts one as a run's state
    changes, so the runs may fail before the wait's line. Then each says so in one line
    (they were dropped silently, rc 0); else Ctrl-C stops them as on other versions."""
    err = proc.stderr.readline()
    if not err.startswith("mpmagic: waiting for"):
        lines = (err + proc.communicate(timeout=60)[1]).splitlines()
        lost = [line for line in lines if re.fullmatch(
            r"mpmagic: run \d \(call sleep\) could not finish: Python 3\.12\.\d refused to start a thread "
            r"while exiting .*; upgrade Python, or wait for the run \(run\.result\(\)\) before the script ends",
            line)]
        waiting = r"mpmagic: waiting for 1 run in flight to finish before exit; Ctrl-C stops them"
        assert len(lost) == 2 and all(re.fullmatch(waiting, line) for line in lines if line not in lost), lines
        return
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == "ending\n", err
    assert re.fullmatch(r"mpmagic: Ctrl-C: stopping the 2 runs in flight\n(mpmagic: stopping a Dask pool at exit "
                        r"failed: Python 3\.12\.\d refused to start a thread while exiting .*\n)?", err), err


def test_pool_status_and_worker_wait_read_right():
    """``%pool`` said "connected to a running scheduler, not connected", and a
    cluster without workers "fewer than the 1 asked for" with no -n given."""
    from mpmagic.status import dask_lines

    info = {"backend": "dask", "cluster": "a running scheduler's cluster", "owned": False, "scheduler": "tcp://h:1"}
    assert dask_lines({**info, "running": False})[0] == (
        "pool: dask, a running scheduler's cluster, not connected (connects on first use)")
    assert dask_lines({**info, "running": True})[0] == "pool: dask, a running scheduler's cluster, connected"
    own = {**info, "cluster": "local cluster started by mpmagic", "owned": True}
    assert dask_lines({**own, "running": True})[0] == "pool: dask, local cluster started by mpmagic, running"
    assert dask_lines({**own, "running": False})[0].endswith("stopped (starts on first use)")


def test_a_cluster_without_workers_says_none_joined(tmp_path):
    from dask_cluster import DaskProcesses

    cluster = DaskProcesses(tmp_path, n_commands=0).start()
    try:
        mpmagic.use_dask(cluster.address, timeout=1)
        with pytest.raises(mpmagic.MPMagicError, match=r"has 0 workers, and none joined within 1 s: start workers"):
            mpmagic.pmap(abs, [-1], progress=False)
    finally:
        pool_module.shutdown()
        cluster.stop()


def _exits_at_1(x):
    if x == 1:
        os._exit(3)
    return x


def _noted_slowly(x, folder):
    """Item ``x`` leaves a file named after its worker's pid and itself, then takes 0.3 s."""
    open(os.path.join(folder, f"{os.getpid()}-{x}"), "w").close()
    time.sleep(0.3)
    return x


def _shape(results: list) -> list:
    """Results with each Failed as (index, input, error type): the local pool's and Dask's messages differ."""
    return [(r.index, r.item, type(r.error)) if isinstance(r, mpmagic.Failed) else r for r in results]


def _wait_for_nannies(backend, n: int, timeout: float = 30.0) -> None:
    """Until mpmagic's own cluster has ``n`` nannies and ``n`` workers registered."""
    deadline = time.monotonic() + timeout
    while len(backend.cluster.workers) != n or len(backend.client.nthreads()) != n:
        assert time.monotonic() < deadline, f"{len(backend.cluster.workers)} nannies, not {n}"
        time.sleep(0.1)


def test_a_task_that_kills_its_worker_leaves_mpmagics_own_cluster_whole(pool2, capfd, tmp_path):
    """A task that calls os._exit: every collect run returns what the local pool
    does, and the workers come back. Dask's LocalCluster closed a nanny for good
    when its worker was not back ``lost-worker-timeout`` after it left (15 s; 0.1
    s here makes that race certain): the cluster was left with no worker, and the
    next collect run raised and returned none of the good items."""
    import dask.config

    oracle = _shape(mpmagic.pmap(_exits_at_1, range(3), errors="collect", progress=False))
    assert oracle == [0, (1, 1, mpmagic.WorkerLostError), 2]
    pool_module.shutdown()
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0.1s"}):
        mpmagic.use_dask(workers=2)
        try:
            backend = pool_module.get_pool()
            # One death is a KilledWorker (Dask's default, the 4th, took 8 worker restarts, 38 s).
            assert backend.cluster.scheduler.allowed_failures == 0
            capfd.readouterr()
            for _ in range(2):
                assert _shape(mpmagic.pmap(_exits_at_1, range(3), errors="collect", progress=False)) == oracle
            # mpmagic's one line, not Dask's ERROR lines and tracebacks ("Couldn't gather keys", ...).
            assert "distributed." not in capfd.readouterr().err
            _wait_for_nannies(backend, 2)
            # A nanny Dask closed all the same (as the timeout did): the next run starts it again.
            name, nanny = next(iter(backend.cluster.workers.items()))
            del backend.cluster.workers[name]
            backend.cluster.sync(nanny.close)
            assert mpmagic.pmap(abs, [-1, -2], progress=False) == [1, 2]
            _wait_for_nannies(backend, 2)
            # A worker killed from outside in its second item: mpmagic runs that item again, alone; it
            # ran twice, and the report says so as the local pool's --retries (it said nothing).
            folder = tmp_path / "ran"
            folder.mkdir()
            victim = sorted(_pids(backend).values())[0]

            kill_in_its_second_item(folder, victim)
            assert mpmagic.pmap(_noted_slowly, range(8), [str(folder)] * 8, chunksize=1, progress=False) == list(range(8))
            ran = [p.name.split("-")[1] for p in folder.iterdir()]
            assert len(ran) == 9 and len(set(ran)) == 8, sorted(ran)
            assert mpmagic.last_report().retried == 1
        finally:
            pool_module.shutdown()


def test_numpys_error_state_reaches_every_task_on_mpmagics_own_cluster(ip):
    """Dask runs each task in a copy of its loop's ``contextvars`` context: numpy's
    error state (a context variable) set as the world was adopted never reached the
    tasks: ``np.seterr(divide="raise")`` gave inf where serial raises."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("distributed")
    pool_module.shutdown()
    mpmagic.use_dask(workers=1)
    before = np.geterr()
    try:
        run(ip, "import numpy as np\ndef inv(x):\n    return 1 / np.float64(x)\n")
        np.seterr(divide="raise")
        for _ in range(2):  # (the second: the same world, adopted already; a new task)
            with pytest.raises(FloatingPointError, match="divide by zero"):
                run(ip, "%pmap -q --chunksize 1 inv, [2, 0]")
        np.seterr(**before)
        assert run(ip, "%pmap -q inv, [2, 0]") == [0.5, np.inf]
    finally:
        np.seterr(**before)
        pool_module.shutdown()


def test_a_parallel_cell_on_mpmagics_own_cluster_checkpoints_and_says_nothing_of_dasks_own_modules(
        ip, tmp_path, capfd):
    """Tester report dask22, findings 1 and 2: importing ``distributed`` puts zipp's overlay
    (``zipp.compat.overlay.zipfile``, a namespace whose file is the standard library's
    zipfile.py) in ``sys.modules``, and a cell, which may import any module, took it for a
    module of the user's: every worker printed "could not reload" with a traceback of
    mpmagic's internals, the cell said the workers' zipfile.py "differs" from the
    notebook's, and --checkpoint stored nothing, run after run. As on the local pool: the
    first run stores, the second resumes, and nothing else is said."""
    pytest.importorskip("zipp.compat.overlay")
    assert not isinstance(sys.modules.get("zipp.compat.overlay.zipfile", sys), type(sys))  # (the trap is set)
    pool_module.shutdown()
    mpmagic.use_dask(workers=2)
    run(ip, f"%config MPMagic.checkpoint_dir = {str(tmp_path / 'ckpt')!r}")
    try:
        capfd.readouterr()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (the checkpoint's "none of the cell's values were stored")
            assert run(ip, "%%parallel -n 2 --checkpoint\nrank * 10") == [0, 10]
            assert "resumed: 0 of 2 ranks" in mpmagic.last_report().line()
            assert run(ip, "%%parallel -n 2 --checkpoint\nrank * 10") == [0, 10]
            assert "resumed: 2 of 2 ranks" in mpmagic.last_report().line()
        out, err = capfd.readouterr()
        for said in ("Traceback", "reload", "differs", "zipfile"):
            assert said not in out + err, out + err
    finally:
        run(ip, "%config MPMagic.checkpoint_dir = None")
        pool_module.shutdown()


def test_pool_dask_again_keeps_mpmagics_own_cluster_and_a_new_n_scales_it(monkeypatch):
    """``%pool dask -n 2`` run a second time (a cell run again) closed the cluster
    mpmagic had started and started another of the same shape: ~7 s, the runs in
    flight and the helpers made on it lost, and no word of it. It is kept (started
    again if it was stopped), a new ``-n`` scales it, and one line says which. (The
    decision on a pool never started here: its start is a stand-in; the real thing
    is the notebook check in the report of this fix.)"""
    from types import SimpleNamespace

    from mpmagic.backends.dask import DaskBackend
    from mpmagic.magics import _kept_dask

    started: list[str] = []
    monkeypatch.setattr(DaskBackend, "start", lambda self: started.append("start"))
    own = DaskBackend(workers=2)
    started.clear()
    assert own.kept_for(None, workers=2) and own.requested_workers == 2 and started == ["start"]
    assert own.kept_for(None) and own.requested_workers == 2  # (no -n: as it is)
    assert own.kept_for(None, workers=3, timeout=5) and own.requested_workers == 3 and own.timeout == 5
    assert not own.kept_for("tcp://127.0.0.1:8786", workers=3)  # a scheduler elsewhere: a new pool
    assert not own.kept_for(None, scheduler_file="sched.json")
    own._retired = True
    assert not own.kept_for(None, workers=3)  # replaced since: never started again

    def kept(workers: int) -> SimpleNamespace:
        return SimpleNamespace(owns_cluster=True, scheduler_address="tcp://127.0.0.1:40000", workers=workers)

    head = "%pool dask: already on the local Dask cluster mpmagic started (tcp://127.0.0.1:40000); "
    assert _kept_dask(kept(2), 2) == head + "kept it with its 2 workers (nothing was restarted)"
    assert _kept_dask(kept(1), 2) == head + "resized from 2 to 1 worker (stopped 1)"
    assert _kept_dask(kept(4), 2) == head + "resized from 2 to 4 workers (started 2)"
    assert _kept_dask(kept(2), None) == ("%pool dask: started mpmagic's local Dask cluster again "
                                         "(tcp://127.0.0.1:40000) with 2 workers")
    connected = SimpleNamespace(owns_cluster=False, address="tcp://10.0.0.5:8786", where="tcp://10.0.0.5:8786")
    assert _kept_dask(connected, 3) == ("%pool dask: already connected to the Dask scheduler at tcp://10.0.0.5:8786; "
                                        "kept the connection (nothing was stopped)")
    by_file = SimpleNamespace(owns_cluster=False, address=None, where="the scheduler in sched.json")
    assert _kept_dask(by_file, 3) == ("%pool dask: already connected to the scheduler in sched.json; "
                                      "kept the connection (nothing was stopped)")
