"""The Dask backend against a real ``dask scheduler`` and ``dask worker``
processes on 127.0.0.1 (the ``dask_cluster`` fixture in conftest.py).

The core ``%pmap`` / ``%%parallel`` tests run on Dask too (``BACKENDS``);
here is what only Dask has: chunked non-pure tasks, workers that die, TLS,
a wrong address, interrupts, restarts, the helpers and ``%pool dask``.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import warnings

import psutil
import pytest
from conftest import (
    DASK_WORKERS,
    check_lazy_inputs_equal_serial,
    ensure_pool,
    first_press_interrupts,
    kill_in_its_second_item,
    run,
)
from IPython.core.error import UsageError as IPythonUsageError
from IPython.utils.capture import capture_output

import mpmagic
from mpmagic import pool as pool_module


@pytest.fixture
def dask_pool(dask_cluster, request):
    """The session's Dask cluster as the current pool, all workers up."""
    return ensure_pool("dask", request)


def worker_pids(backend) -> dict[str, int]:
    return backend.client.run(os.getpid)


def test_many_tiny_items_go_in_chunks_with_non_pure_keys(ip, dask_pool, tmp_path):
    res = mpmagic.pmap(lambda x: x + 1, range(100_000))
    assert res == list(range(1, 100_001))
    assert mpmagic.last_report().chunks < 500  # chunks, not one task per item
    # Side effects are not deduplicated: the same call twice runs twice.
    log = tmp_path / "log"
    run(ip, f"def touch(x):\n    with open({str(log)!r}, 'a') as f:\n        f.write('x')\n    return x\n")
    run(ip, "%pmap -q touch, [1, 2, 3]")
    run(ip, "%pmap -q touch, [1, 2, 3]")
    assert log.read_text() == "x" * 6


def test_function_payload_loaded_once_per_worker(ip, dask_pool, tmp_path):
    loads = tmp_path / "loads"
    run(
        ip,
        "def _record_load(path):\n"
        "    with open(path, 'a') as f:\n"
        "        f.write('L')\n"
        "    return _LoadCounter(path)\n"
        "class _LoadCounter:\n"
        "    def __init__(self, path):\n        self.path = path\n"
        "    def __reduce__(self):\n        return (_record_load, (self.path,))\n"
        f"counter = _LoadCounter({str(loads)!r})\n"
        "def uses_counter(x):\n    return (x, type(counter).__name__)\n",
    )
    loads.write_text("")
    res = run(ip, "%pmap -q --chunksize 1 uses_counter, range(40)")
    assert res == [(x, "_LoadCounter") for x in range(40)]
    # 40 tasks, but each worker process loaded the function once at most.
    assert 1 <= len(loads.read_text()) <= DASK_WORKERS


def test_a_maps_chunks_are_spread_over_the_workers(dask_pool):
    """Left to Dask, the chunks went where the function's payload was computed: 4 items
    of 0.5 s on 2 workers ran all on one in 5 of 14 runs. Each chunk now goes to the
    worker holding the fewest of the run's chunks (a new function each time: a new payload)."""
    for i in range(2):
        ns: dict = {}
        exec(f"import os, time\ndef nap{i}(x):\n    time.sleep(x)\n    return os.getpid()", ns)
        pids = mpmagic.pmap(ns[f"nap{i}"], [0.3] * DASK_WORKERS, chunksize=1)
        assert len(set(pids)) == DASK_WORKERS, pids


def test_worker_killed_during_a_map_dask_retries_it(ip, dask_pool, tmp_path):
    """Dask runs the item its dying worker was running again, elsewhere: it ran twice (its
    side effects too), and the report says so as the local pool's --retries does (it said
    nothing)."""
    pids = worker_pids(dask_pool)
    run(ip, f"import os, time\ndef slow_square(x):\n    open(os.path.join({str(tmp_path)!r}, f'{{os.getpid()}}-{{x}}'), "
            "'w').close()\n    time.sleep(0.3)\n    return x * x\n")
    victim = sorted(pids.values())[0]

    kill_in_its_second_item(tmp_path, victim)
    res = run(ip, "%pmap -q --chunksize 1 slow_square, range(16)")
    assert res == [x * x for x in range(16)]
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    twice = {int(p.name.split("-")[1]) for p in tmp_path.iterdir()
             if sum(1 for q in tmp_path.iterdir() if q.name.split("-")[1] == p.name.split("-")[1]) > 1}
    assert len(twice) == 1, sorted(p.name for p in tmp_path.iterdir())
    report = mpmagic.last_report()
    assert report.retried == 1 and "(1 retried after its worker died)" in str(report)


def test_items_that_kill_every_worker_are_named_after_dasks_retries(ip, dask_pool):
    run(
        ip,
        "import os, signal, time\n"
        "def deadly(x):\n"
        "    if x == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    time.sleep(0.05)\n"
        "    return x\n",
    )
    t0 = time.monotonic()
    with pytest.raises(mpmagic.WorkerLostError) as info:
        run(ip, "%pmap -q --chunksize 1 deadly, range(8)")
    msg = str(info.value)
    assert "item 5 (5)" in msg and "KilledWorker" in msg
    assert time.monotonic() - t0 < 60
    # errors="collect" keeps every other result and puts a Failed in item 5's place.
    dask_pool.client.wait_for_workers(DASK_WORKERS, timeout=60)
    res = run(ip, "%pmap -q --chunksize 1 --errors collect deadly, range(8)")
    assert [r for i, r in enumerate(res) if i != 5] == [0, 1, 2, 3, 4, 6, 7]
    assert isinstance(res[5], mpmagic.Failed) and isinstance(res[5].error, mpmagic.WorkerLostError)


def test_dasks_client_log_of_mpmagics_own_tasks_stays_out_of_the_cell(dask_pool, caplog):
    """Tester report dask22, finding 3: after an item killed its worker on a connected
    cluster, the next cell showed Dask's raw ``distributed.client - WARNING - Couldn't gather
    1 keys, rescheduling ('mpmagic-suicide-map1-66-...',)``, where mpmagic explains worker
    deaths in its own words (and Dask reschedules that task: nothing was lost). Records of
    the client about mpmagic's own tasks go to mpmagic's debug log; any other is Dask's
    to show, as before."""
    client_log = logging.getLogger("distributed.client")
    shown: list[str] = []

    class Shown(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            shown.append(record.getMessage())

    handler = Shown()
    client_log.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="mpmagic"):
            client_log.warning("Couldn't gather %s keys, rescheduling %s", 1,
                               ("mpmagic-suicide-map1-66-0-0123456789ab",))
            client_log.warning("Couldn't gather %s keys, rescheduling %s", 1, ("inc-0123",))
    finally:
        client_log.removeHandler(handler)
    assert shown == ["Couldn't gather 1 keys, rescheduling ('inc-0123',)"]
    assert "Couldn't gather 1 keys, rescheduling ('mpmagic-suicide-map1-66" in caplog.text


def test_an_item_that_kills_its_worker_loses_no_other_item_of_its_chunk(ip, dask_pool):
    """Dask cannot say which item of a chunk killed its worker: a chunk that
    kills it again alone is run one item at a time, so, as on the local pool,
    only that item fails (its chunk's other items were all Failed) and
    --errors raise names it."""
    run(ip, "import os, signal\ndef kills_at_4(x):\n    if x == 4:\n        os.kill(os.getpid(), signal.SIGKILL)\n    return x\n")
    res = run(ip, "%pmap -q --chunksize 3 --errors collect kills_at_4, range(6)")
    assert [r for i, r in enumerate(res) if i != 4] == [0, 1, 2, 3, 5]
    assert isinstance(res[4], mpmagic.Failed) and isinstance(res[4].error, mpmagic.WorkerLostError)
    dask_pool.client.wait_for_workers(DASK_WORKERS, timeout=60)
    with pytest.raises(mpmagic.WorkerLostError, match=r"the worker running item 4 \(4\) died"):
        run(ip, "%pmap -q --chunksize 3 kills_at_4, range(6)")
    dask_pool.client.wait_for_workers(DASK_WORKERS, timeout=60)


def test_ranks_run_on_distinct_worker_processes(ip, dask_pool):
    pids = run(ip, f"%%parallel -q -n {DASK_WORKERS}\nimport os\nos.getpid()")
    assert len(set(pids)) == DASK_WORKERS
    assert set(pids) == set(worker_pids(dask_pool).values())


def test_a_rank_dask_runs_again_after_its_worker_died_is_said_as_a_retry(ip, dask_pool, monkeypatch):
    """A worker that dies mid-rank and comes back at its address (a cluster started with
    ``--worker-port``; the 0.5 s look at the workers missed its absence): Dask runs the rank
    there again, its side effects twice, and the report said nothing of it where a map's
    rerun is said as a retry. Dask's second start of rank 1 is played here (the session's
    workers come back at new ports, where a pinned rank never runs again)."""
    from mpmagic.backends import dask as dask_backend

    event = dask_backend._DaskRun._event

    def started_twice(run, ev):
        task = run.tasks.get(ev.get("tag", ""))
        if ev.get("start") and task is not None and task.unit.id == 1 and task.started is None:
            event(run, ev)  # (the first start; the one below is Dask's rerun's)
        event(run, ev)

    monkeypatch.setattr(dask_backend._DaskRun, "_event", started_twice)
    assert run(ip, "%%parallel -q -n 2\nrank * 10") == [0, 10]
    report = mpmagic.last_report()
    assert report.retried == 1 and "2 ranks (1 retried after its worker died) on" in str(report), str(report)


def test_a_rank_dask_runs_again_is_said_when_another_rank_fails(ip, dask_pool, monkeypatch, capsys):
    """As above, but rank 0 fails: the cell's error and its report said nothing of
    rank 1's second run (its side effects twice). They say it as a map's failure
    says an item retried after its worker died (``Report.failed_line``)."""
    from mpmagic.backends import dask as dask_backend

    event = dask_backend._DaskRun._event

    def started_twice(run, ev):
        task = run.tasks.get(ev.get("tag", ""))
        if ev.get("start") and task is not None and task.unit.id == 1 and task.started is None:
            event(run, ev)
        event(run, ev)

    monkeypatch.setattr(dask_backend._DaskRun, "_event", started_twice)
    with pytest.raises(mpmagic.ParallelError) as info:
        run(ip, "%%parallel -q -n 2\nif rank == 0:\n    1 / 0\nrank * 10")
    report = mpmagic.last_report()
    assert report.retried == 1, str(report)
    said = "1 retried after its worker died"
    assert said in report.failed_line(), report.failed_line()
    assert str(info.value).endswith(f"; {said} (rank 1)"), str(info.value)


def test_the_backends_line_from_its_own_thread_between_runs_waits_for_the_next_runs_cell(ip, dask_pool,
                                                                                           monkeypatch, capsys):
    """A worker mpmagic gave up on and could not kill is restarted by Dask in a thread of
    its own (``_restart_quietly``, up to Dask's 30 s): its failure line was written from
    that thread, into whichever cell ran then (in Jupyter maybe one that has nothing to do
    with the pool), or none. It is held, and said first in the next run's cell, as the
    local pool holds its manager's lines (``base.HeldLines``)."""
    def refused(*args, **kwargs):
        raise OSError("no nanny there")

    monkeypatch.setattr(dask_pool.client, "restart_workers", refused)
    before = set(threading.enumerate())
    assert dask_pool._kill_workers({"tcp://127.0.0.1:9"}) == []
    for thread in set(threading.enumerate()) - before:
        thread.join(10)
    assert "could not restart" not in capsys.readouterr().err  # (said in no cell yet)
    with capture_output() as cell:
        assert run(ip, "%%parallel -q -n 1\nprint('mine')\nrank") == [0]
    said = cell.stderr.splitlines()
    assert said[0].startswith("mpmagic: could not restart Dask worker tcp://127.0.0.1:9 to stop a task mpmagic gave up "
                              "on (no nanny there)"), cell.stderr
    assert "mine" in cell.stdout
    with capture_output() as cell:
        run(ip, "%%parallel -q -n 1\nrank")
    assert "could not restart" not in cell.stderr  # (said once)


def test_more_ranks_than_dask_workers_is_a_clear_error(ip, dask_pool):
    n = DASK_WORKERS + 1
    with pytest.raises(IPythonUsageError) as info:
        run(ip, f"%%parallel -q -n {n}\nrank")
    msg = str(info.value)
    assert f"-n {n} needs {n} Dask worker processes" in msg and f"has {DASK_WORKERS}: use -n {DASK_WORKERS} or fewer" in msg


def test_rank_output_is_streamed_while_the_rank_runs(dask_pool, monkeypatch):
    seen: list[tuple[float, str]] = []

    class Recorder:
        def write(self, text):
            seen.append((time.monotonic(), text))
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    mpmagic.parallel("import time\nprint('early', rank)\ntime.sleep(2.5)\nrank", workers=2, namespace={})
    done = time.monotonic()
    early = [t for t, text in seen if "early" in text]
    assert len(early) == 2
    assert all(t < done - 1.0 for t in early)  # shown while the ranks slept, not at the end


def test_interrupt_cancels_and_reports_running_tasks_then_restart(ip, dask_pool, capsys, tmp_path):
    before = set(worker_pids(dask_pool).values())
    # The tasks run until the test releases them (at most 30 s): a cluster mpmagic only
    # connected to keeps running them after the interrupt, and the last map waits for them.
    release = tmp_path / "release"
    run(ip, f"import os, time\ndef sleepy(x):\n    open(os.path.join({str(tmp_path)!r}, f'began{{x}}'), 'w').close()\n"
            f"    t = time.monotonic()\n    while not os.path.exists({str(release)!r})"
            " and time.monotonic() - t < 30:\n        time.sleep(0.02)\n    return x\n")

    def interrupt_once_both_workers_run_a_task() -> None:  # (not on a fixed 1.5 s timer)
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("began*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Thread(target=interrupt_once_both_workers_run_a_task, daemon=True)
    timer.start()
    capsys.readouterr()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            mpmagic.pmap(ip.user_ns["sleepy"], range(20), chunksize=1)
        returned = time.monotonic() - t0
        # The interrupt came once two tasks ran: back long before the 30 s tasks end (a bound
        # that catches a hang, not slowness on a loaded machine).
        assert returned < 20
        # One line, the interrupt's, as on the local pool: it names the running tasks and their workers.
        msg = str(info.value)
        assert msg.startswith("mpmagic.pmap interrupted: its ") and "queued Dask task" in msg and " cancelled" in msg
        assert "already running (item " in msg and "; on tcp://127.0.0.1:" in msg and "not mpmagic's" in msg
        assert "\n" not in msg
        assert "interrupted" not in capsys.readouterr().err  # no second note of it on stderr
        # %pool restart on a cluster mpmagic connected to restarts nothing, and says so (issue 14.4),
        # with the interrupted map's tasks still running there.
        run(ip, "%pool restart")
        assert "did not restart the workers" in capsys.readouterr().err
        assert set(worker_pids(dask_pool).values()) == before
    finally:
        release.touch()
    assert run(ip, "%pmap -q abs, [-1, -2]") == [1, 2]


def test_an_interrupt_names_running_tasks_whose_start_event_has_not_come(ip, dask_pool, monkeypatch, tmp_path):
    """A task's start event trails its start on a loaded machine: an interrupt then counted
    the running tasks as queued ("its 8 queued Dask tasks were cancelled; the pool is
    ready for the next run") while they ran on, and the next run was sent to their busy
    workers. The workers the scheduler has the unseen tasks on are asked which they run."""
    from mpmagic.backends import dask as dask_backend

    event = dask_backend._DaskRun._event
    monkeypatch.setattr(dask_backend._DaskRun, "_event", lambda run, ev: None if ev.get("start") else event(run, ev))
    release = tmp_path / "release"
    run(ip, f"import os, time\ndef held(x):\n    open(os.path.join({str(tmp_path)!r}, f'began{{x}}'), 'w').close()\n"
            f"    t = time.monotonic()\n    while not os.path.exists({str(release)!r})"
            " and time.monotonic() - t < 10:\n        time.sleep(0.02)\n    return x\n")

    def interrupt_once_every_worker_runs_one() -> None:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("began*"))) < DASK_WORKERS and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_every_worker_runs_one, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            mpmagic.pmap(ip.user_ns["held"], range(8), chunksize=1)
        msg = str(info.value)
        assert f"; the {DASK_WORKERS} already running (item " in msg and "; on tcp://127.0.0.1:" in msg, msg
        assert "the pool is ready" not in msg and "the next run waits until they return" in msg
        assert sum(dask_pool._busy(dask_pool._nthreads(fresh=True)).values()) == DASK_WORKERS  # later runs wait
    finally:
        release.touch()


@pytest.mark.parametrize("waits_in", ["Queue.get", "Queue.put", "Event.wait", "Lock.acquire"])
def test_a_task_given_up_while_it_waits_in_a_helper_frees_its_worker(ip, dask_pool, tmp_path, waits_in):
    """An interrupted run on a cluster mpmagic connected to: Dask cannot stop a running task,
    and one waiting in q.get() for an item nobody will put (ev.wait() for a set() that never
    comes, lk.acquire() of a lock the notebook holds, full.put() on a full bounded queue nobody
    reads) held its worker for good: the next run waited for it for ever. The helper's wait
    is mpmagic's own loop: it sees that its task was given up (its worker marks it cancelled)
    and stops, so the worker is free again."""
    from mpmagic.backends import dask_tasks

    q, ev, lk, full = mpmagic.Queue(), mpmagic.Event(), mpmagic.Lock(), mpmagic.Queue(maxsize=1)
    lk.acquire()
    full.put(0)
    began = tmp_path / "began"
    call = {"Queue.get": "q.get()", "Queue.put": "full.put(1)", "Event.wait": "ev.wait()",
            "Lock.acquire": "lk.acquire()"}[waits_in]

    def waiter(x):
        began.touch()
        return eval(call, {"q": q, "ev": ev, "lk": lk, "full": full})

    def interrupt_once_it_waits() -> None:
        deadline = time.monotonic() + 30
        while not began.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_it_waits, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        mpmagic.pmap(waiter, [0])
    deadline = time.monotonic() + 5
    while any(dask_pool.client.run(dask_tasks.running_tags).values()):
        assert time.monotonic() < deadline, (waits_in, dask_pool.client.run(dask_tasks.running_tags))
        time.sleep(0.05)
    lk.release()


def test_timeout_names_the_item_and_ends_the_run(ip, dask_pool, tmp_path):
    """On a cluster mpmagic only connected to: the stuck item is named and the
    run ends. Whether that cluster's worker is restarted is not asserted here
    (mpmagic is to leave the workers of a cluster it does not own alone); the
    restart is checked on a cluster of its own, in the next test."""
    # It hangs until released (at most 4 s): a worker of a cluster mpmagic does not own is
    # left to finish the task (test_dask_owned.py checks that), and later tests would wait for it.
    release = tmp_path / "release"
    run(ip, f"import os, time\ndef maybe_hang(x):\n    t = time.monotonic()\n    while x == 2 and not "
            f"os.path.exists({str(release)!r}) and time.monotonic() - t < 4:\n        time.sleep(0.02)\n    return x\n")
    t0 = time.monotonic()
    try:
        with pytest.raises(mpmagic.TaskTimeoutError) as info:
            run(ip, "%pmap -q --timeout 1 maybe_hang, range(4)")
    finally:
        release.touch()
    assert "item 2 (2)" in str(info.value) and "timeout of 1 s" in str(info.value)
    assert time.monotonic() - t0 < 15  # ended, before the sleep would have


def test_timeout_is_each_items_in_a_chunk(ip, dask_pool, tmp_path):
    """--timeout is each item's, also in a chunk of several (each item's start
    comes as an event): items of 0.3 s in chunks of 4 (1.2 s) under a timeout
    of 1 s all finish, and in a chunk where items 4-5 took 0.6 s, item 6, stuck,
    is the one named, its chunk's other items kept (before, "items 4-7")."""
    release = tmp_path / "release"
    run(ip, f"import os, time\ndef nap_or_hang(x):\n    t = time.monotonic()\n    while x == 6 and not "
            f"os.path.exists({str(release)!r}) and time.monotonic() - t < 4:\n        time.sleep(0.02)\n"
            "    time.sleep(0.3)\n    return x\n")
    release.touch()
    assert run(ip, "%pmap -q --timeout 1 --chunksize 4 nap_or_hang, range(8)") == list(range(8))
    release.unlink()
    try:
        results = run(ip, "%pmap -q --timeout 1 --chunksize 4 --errors collect nap_or_hang, range(8)")
    finally:
        release.touch()
    assert [r for i, r in enumerate(results) if i != 6] == [0, 1, 2, 3, 4, 5, 7], results
    assert isinstance(results[6], mpmagic.Failed) and "item 6 (6) ran past the timeout of 1 s" in str(results[6].error)


def test_timeout_restarts_the_worker_of_its_own_local_cluster(ip, tmp_path):
    """`%pool dask` without an address starts a LocalCluster that mpmagic owns:
    a timed-out task's worker process is restarted (a new pid in its place)."""
    run(ip, "%pool dask -n 2")
    backend = pool_module.get_pool()
    try:
        pids_file = tmp_path / "hung_pid"
        run(
            ip,
            "import os, time\n"
            "def hang_on_2(x):\n"
            "    if x == 2:\n"
            f"        open({str(pids_file)!r}, 'w').write(str(os.getpid()))\n"
            "        time.sleep(60)\n"
            "    return x\n",
        )
        with pytest.raises(mpmagic.TaskTimeoutError) as info:
            run(ip, "%pmap -q --timeout 1 hang_on_2, range(4)")
        assert "item 2 (2)" in str(info.value)
        hung = int(pids_file.read_text())
        # The nanny replaces the process: the hung pid leaves the cluster and a
        # new worker process joins, so two are up again (well before the stuck
        # task's 60 s sleep could end on its own).
        deadline = time.monotonic() + 30
        while True:
            try:  # (a killed worker stays registered for a moment: asking it fails)
                pids = set(worker_pids(backend).values()) if len(backend.client.scheduler_info()["workers"]) == 2 else set()
            except OSError:
                pids = set()
            if len(pids) == 2 and hung not in pids:
                break
            assert time.monotonic() < deadline, f"the worker {hung} that ran the stuck item was not restarted: {pids}"
            time.sleep(0.2)
        assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
        assert run(ip, "%pmap -q abs, [-1, -2]") == [1, 2]
    finally:
        run(ip, "%pool local -n 2")


def test_pool_status_and_scheduler_file(ip, dask_cluster, dask_pool):
    status = run(ip, "%pool")
    text = str(status)
    assert text.startswith("pool: dask")
    assert dask_cluster.address in text and f"workers: {DASK_WORKERS}, threads: {DASK_WORKERS}" in text
    assert text.count("  worker tcp://127.0.0.1:") == DASK_WORKERS
    assert "<table" in status._repr_html_()
    # The test scheduler runs with --no-dashboard: its HTTP server is still listed
    # as "dashboard", and the link to it answered 404 where %pool showed it.
    assert "  dashboard: none (the scheduler runs without one: started with --no-dashboard?)" in text
    assert "http://" not in text and "href" not in status._repr_html_()
    run(ip, f"%pool dask --scheduler-file {dask_cluster.scheduler_file}")
    backend = pool_module.get_pool()
    assert backend.name == "dask" and backend.client.scheduler.address == dask_cluster.address
    assert run(ip, "%pmap -q abs, [-3]") == [3]
    with pytest.raises(IPythonUsageError, match="managed where the cluster runs"):
        run(ip, "%pool resize 8")
    # stop disconnects; start connects again and stays on Dask.
    assert "not connected" in str(run(ip, "%pool stop"))
    assert str(run(ip, "%pool start")).startswith("pool: dask") and pool_module.get_pool() is backend
    assert run(ip, "%pmap -q abs, [-7]") == [7]


@pytest.mark.parametrize("line", ["%pool start --max-tasks-per-child 1", "%pool start --start-method spawn",
                                  "%pool start --max-memory 1GB", "%pool restart --max-tasks-per-child 1"])
def test_local_only_options_on_dask_are_refused_and_the_cluster_stays(ip, dask_pool, line):
    # (%pool start with them shut the cluster down and started local workers, without a word.)
    flag, memory = line.split()[2], pool_module._max_memory
    with pytest.raises(IPythonUsageError, match=f"\\({flag}\\) is for local workers, and the pool is on dask: "
                       f".*%pool local {flag}"):
        run(ip, line)
    with pytest.raises(mpmagic.UsageError, match="is for local workers"):
        mpmagic.start_pool(max_tasks_per_child=1)
    assert pool_module.get_pool() is dask_pool and dask_pool.running
    assert pool_module._max_memory == memory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrong_address_is_a_clear_error_within_the_timeout(dask_pool):
    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(mpmagic.MPMagicError) as info:
        mpmagic.use_dask(address, timeout=0.5)  # (nothing listens there: the whole timeout runs out)
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert address in msg and "within the timeout of 0.5 s" in msg and "--timeout" in msg
    assert pool_module.get_pool() is dask_pool  # the working pool is kept


@pytest.mark.parametrize("address, says", [
    ("localhost", "'localhost' is not a Dask scheduler address (missing port"),
    ("tcp://127.0.0.1:abc", "'tcp://127.0.0.1:abc' is not a Dask scheduler address"),
    ("foo://127.0.0.1:8786", "unknown address scheme 'foo'"),
    ("http://127.0.0.1:8787/status", "is the Dask dashboard's address, not the scheduler's"),
])
def test_a_malformed_address_is_one_line_before_any_connection(ip, address, says):
    """No cluster needed: the address is checked before Dask is asked (its own error
    for these came with a traceback of 10-13 frames)."""
    before = pool_module.current_pool()
    result = ip.run_cell(f"%pool dask {address} --timeout 1", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, IPythonUsageError) and says in str(err) and "tcp://HOST:8786" in str(err)
    assert pool_module.current_pool() is before  # the working pool is kept


def _slow_item_cell(ip) -> None:
    run(ip, "import time\ndef slow_item(x):\n    time.sleep(0.3)\n    return x\n")


@pytest.mark.parametrize("errors", ["raise", "collect"])
def test_a_map_fails_in_time_once_every_worker_is_gone(ip, tmp_path, errors):
    """Every worker leaves mid-map, the scheduler stays: once the cluster has
    had none for the backend's timeout, the run fails saying where, how far it
    got and what to do (it waited for ever). With --errors collect it returns
    the items that finished, and a Failed saying so for each that did not run
    (the whole run raised, and its good items were lost)."""
    from dask_cluster import DaskProcesses

    cluster = DaskProcesses(tmp_path, n_commands=1, per_command=2).start()
    try:
        mpmagic.use_dask(cluster.address, timeout=1)
        mark = tmp_path / "item3"
        run(ip, f"import time, pathlib\ndef slow_item(x):\n    time.sleep(0.3)\n    if x == 3:\n"
                f"        pathlib.Path({str(mark)!r}).touch()\n    return x\n")
        workers = cluster.procs[1]  # the `dask worker` command: its nanny and both workers

        def kill_once_items_finished() -> None:  # (a fixed time: on a loaded machine none had finished)
            deadline = time.monotonic() + 30
            while not mark.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            os.killpg(workers.pid, signal.SIGTERM)

        threading.Thread(target=kill_once_items_finished, daemon=True).start()
        t0 = time.monotonic()
        if errors == "collect":
            res = run(ip, "%pmap -q --chunksize 1 --errors collect slow_item, range(40)")
            assert time.monotonic() - t0 < 15
            failed = [r for r in res if isinstance(r, mpmagic.Failed)]
            assert len(res) == 40 and 0 < len(failed) < 40
            assert [r for r in res if r not in failed] == [x for x in range(40) if x not in {f.index for f in failed}]
            for f in failed:
                assert isinstance(f.error, mpmagic.WorkerLostError) and str(f.error).startswith(
                    f"item {f.index} ({f.index}) did not run: every worker of the Dask cluster at {cluster.address} "
                    "left during this run, and none joined within 1 s")
                assert "rerun_failed()" in str(f.error) and "`%pool local`" in str(f.error)
            return
        with pytest.raises(mpmagic.MPMagicError) as info:
            run(ip, "%pmap -q --chunksize 1 slow_item, range(40)")
        assert time.monotonic() - t0 < 15
        msg = str(info.value)
        assert f"every worker of the Dask cluster at {cluster.address} left during this run" in msg
        assert "of 40 items finished" in msg and "none joined within the timeout of 1 s" in msg
        assert f"`dask worker {cluster.address}`" in msg and "`%pool local`" in msg
    finally:
        pool_module.shutdown()
        cluster.stop()


def test_the_scheduler_dying_fails_the_run_and_blames_no_item(ip, tmp_path, capfd):
    """The scheduler dies mid-map: the connection is lost, not a worker, and no
    item is to blame (an item was blamed, and "the pool replaced it"); the
    `%pool local` after it shows no Dask traceback."""
    from dask_cluster import DaskProcesses

    cluster = DaskProcesses(tmp_path, n_commands=1, per_command=2).start()
    try:
        mpmagic.use_dask(cluster.address)
        _slow_item_cell(ip)
        threading.Timer(1.0, os.killpg, (cluster.procs[0].pid, signal.SIGKILL)).start()
        with pytest.raises(mpmagic.MPMagicError) as info:
            run(ip, "%pmap -q --chunksize 1 slow_item, range(40)")
        assert not isinstance(info.value, mpmagic.WorkerLostError)
        msg = str(info.value)
        assert f"lost the connection to the Dask scheduler at {cluster.address} during this run" in msg
        assert "of 40 items finished; no item is to blame" in msg and "`%pool local`" in msg
        capfd.readouterr()
        notice = str(run(ip, "%pool local -n 2"))
        assert f"disconnected from the Dask scheduler at {cluster.address}" in notice
        err = capfd.readouterr().err
        assert "Traceback" not in err and "ERROR" not in err, err
    finally:
        pool_module.shutdown()
        cluster.stop()


def test_tls_needs_all_certificate_options(tmp_path):
    with pytest.raises(mpmagic.UsageError, match="--tls-cert FILE --tls-key FILE"):
        mpmagic.use_dask("tls://127.0.0.1:8786", tls_ca_file=str(tmp_path / "ca.pem"))


def test_tls_connection_with_generated_certificates(ip, tmp_path):
    """A TLS cluster: a run on it; certificates of another CA refused in time; and its stop
    (tests/dask_cluster.py) ends every process on its SIGTERM, leaving none."""
    from dask_cluster import DaskProcesses, _members, make_certificates

    certs = make_certificates(tmp_path)
    cluster = DaskProcesses(tmp_path, n_commands=1, per_command=1, protocol="tls", tls=certs).start()
    try:
        assert cluster.address.startswith("tls://")
        run(
            ip,
            f"%pool dask {cluster.address} --tls-ca-file {certs['ca']} "
            f"--tls-cert {certs['cert']} --tls-key {certs['key']} --timeout 20",
        )
        assert run(ip, "%pmap -q lambda x: x * 2, range(5)") == [0, 2, 4, 6, 8]
        assert cluster.address in str(run(ip, "%pool"))
        # Certificates from another CA: the scheduler refuses them; a clear error in time.
        other = tmp_path / "other"
        other.mkdir()
        wrong = make_certificates(other)
        t0 = time.monotonic()
        with pytest.raises(mpmagic.MPMagicError, match="certificates match"):
            mpmagic.use_dask(cluster.address, tls_ca_file=wrong["ca"], tls_cert=wrong["cert"],
                             tls_key=wrong["key"], timeout=2)
        assert time.monotonic() - t0 < 10
    finally:
        pool_module.shutdown()
        groups = [p.pid for p in cluster.procs]
        killed = cluster.stop()
    # None is left; one that did not end within 10 s of its SIGTERM was killed (slow, not
    # wrong: a loaded machine; the warnings summary names it).
    if killed:
        warnings.warn(f"Dask processes that did not end within 10 s of their SIGTERM, killed: {killed}", stacklevel=1)
    assert not _members(groups)


def test_local_cluster_from_the_magic_and_back_to_local(ip):
    status = str(run(ip, "%pool dask -n 2"))
    backend = pool_module.get_pool()
    address = backend.client.scheduler.address
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        assert "local cluster started by mpmagic" in status and "workers: 2, threads: 2" in status
        assert run(ip, "%pmap -q lambda x: -x, range(3)") == [0, -1, -2]
        pids = set(worker_pids(backend).values())
        assert pids <= children  # worker processes of this notebook, not of another cluster
        # They share the kernel's process group: "interrupt kernel" must not kill them.
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert run(ip, "%pmap -q abs, [-4, 5]") == [4, 5]
        assert set(worker_pids(backend).values()) == pids
        assert "workers: 1, threads: 1" in str(run(ip, "%pool resize 1"))
    finally:
        notice = str(run(ip, "%pool local -n 2"))
    assert pool_module.get_pool().name == "local"
    # Its scheduler's address, though none was given (was "(?)").
    assert f"%pool local: stopped the local Dask cluster mpmagic had started ({address});" in notice
    gone_by = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < gone_by, "the local Dask cluster's workers outlived %pool local"
        time.sleep(0.1)


def test_without_dask_installed_says_how_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "mpmagic.backends.dask", raising=False)
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(mpmagic.UsageError, match=r'pip install "mpmagic\[dask\]"'):
        mpmagic.use_dask()


# --------------------------------------------------------------------------
# The helpers on Dask


def test_queue_between_ranks_and_the_notebook(ip, dask_pool):
    run(ip, "import mpmagic\nq = mpmagic.Queue()")
    values = run(
        ip,
        "%%parallel -q -n 3\n"
        "if rank == 0:\n"
        "    for i in range(10):\n"
        "        q.put({'i': i})\n"
        "    q.close()\n"
        "    got = []\n"
        "else:\n"
        "    got = [item['i'] for item in q]\n"
        "got",
    )
    assert sorted(values[1] + values[2]) == list(range(10))
    q = ip.user_ns["q"]
    assert q.empty() and q.closed
    q2 = mpmagic.Queue()
    q2.put([1, "two"])
    assert q2.qsize() == 1 and q2.get(timeout=5) == [1, "two"]
    with pytest.raises(__import__("queue").Empty):
        q2.get(timeout=0.2)


def test_compare_runs_no_serial_copy_of_a_map_taking_from_a_queue(ip, dask_pool, capsys):
    """As on the local pool (tests/test_compare_shared.py): the parallel run empties the
    queue, so a serial copy would wait in get() for ever; it is not run, and one line
    says why. (A watchdog feeds a blocked copy after 30 s: the test fails, not hangs.)"""
    from test_compare_shared import unblocked

    run(ip, "import mpmagic\ntodo = mpmagic.Queue()\nfor i in range(3):\n    todo.put(i)\n"
            "def take(_):\n    return todo.get() * 10\n")
    capsys.readouterr()
    with unblocked(ip.user_ns["todo"], 3) as fired:
        results = run(ip, "%pmap -q --compare take, range(3)")
    assert not fired, "the serial copy waited in todo.get() for the items the parallel run took"
    assert sorted(results) == [0, 10, 20]
    report = mpmagic.last_report()
    assert report.serial is None and "the function uses mpmagic.Queue 'todo'" in report.line()
    assert "no serial run here: the function uses mpmagic.Queue 'todo'" in capsys.readouterr().err


def test_a_helper_call_that_ends_by_its_timeout_is_not_counted_as_waiting(dask_pool):
    """As the local helpers (tests/test_helper_waits.py): serial code waits as long, so
    the estimate keeps that time; a get that finds its item still counts as waiting."""
    from mpmagic import waits

    q, bounded, lock, ev = mpmagic.Queue(), mpmagic.Queue(maxsize=1), mpmagic.Lock(), mpmagic.Event()
    bounded.put(0)
    assert lock.acquire()  # (before the tally: on Dask even a lock taken at once is a round trip, counted)
    waits.begin()
    try:
        with pytest.raises(__import__("queue").Empty):
            q.get(timeout=0.2)
        with pytest.raises(__import__("queue").Full):
            bounded.put(1, timeout=0.2)
        assert lock.acquire(timeout=0.2) is False
        assert ev.wait(0.2) is False
        assert waits.take() is None
        lock.release()
        q.put(1)
        assert q.get(timeout=10) == 1
        got = waits.take()
        assert got is not None and "Queue" in got
    finally:
        waits.begin()


def test_waiting_on_a_queue_logs_no_error_and_consumers_share_its_items(ip, dask_cluster, dask_pool):
    """A get that waits logged a traceback in the scheduler per 0.25 s (Dask
    logs each timed-out ``distributed.Queue.get``); items still go FIFO, each
    to exactly one of several racing consumers, and each consumer stops."""
    log = dask_cluster.workdir / "scheduler.log"
    logged = log.stat().st_size
    q = mpmagic.Queue()
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=1)
    assert 1 <= time.monotonic() - t0 < 3
    with pytest.raises(queue.Empty):
        q.get_nowait()
    for i in range(5):
        q.put(i)
    assert [q.get(timeout=5) for _ in range(5)] == list(range(5))
    run(ip, "import mpmagic\nshared_q = mpmagic.Queue()")
    shared_q = ip.user_ns["shared_q"]
    for i in range(30):
        shared_q.put(i)
    shared_q.close()
    values = run(ip, "%%parallel -q -n 3\ngot = []\nfor item in shared_q:\n    got.append(item)\ngot")
    assert sorted(sum(values, [])) == list(range(30))
    assert all(v == sorted(v) for v in values)  # each consumer sees them in order
    time.sleep(0.3)  # (the scheduler writes its log as it goes)
    new = log.read_bytes()[logged:].decode(errors="replace")
    assert "queue_get" not in new and "Error" not in new, new[-3000:]


def test_lock_serializes_read_modify_write_across_workers(ip, dask_pool, tmp_path):
    """16 bumps under the lock count 16. The lock's lease outlasts a loaded
    machine's stalls (30 s by default: a holder's worker starved that long lost
    the lease, another task entered, and the count came out short)."""
    import dask

    counter = tmp_path / "counter"
    counter.write_text("0")
    with dask.config.set({"distributed.scheduler.locks.lease-timeout": "600s"}):
        run(ip, "import mpmagic\nlock = mpmagic.Lock()\n")  # (its lease timeout: fixed as it is made)
    run(
        ip,
        "import time\n"
        f"def bump(x, path={str(counter)!r}):\n"
        "    with lock:\n"
        "        n = int(open(path).read())\n"
        "        time.sleep(0.01)\n"
        "        open(path, 'w').write(str(n + 1))\n"
        "    return x\n",
    )
    run(ip, "%pmap -q --chunksize 1 bump, range(16)")
    assert counter.read_text() == "16"
    lock = ip.user_ns["lock"]
    assert lock.acquire(timeout=5) and lock.locked()
    lock.release()


def test_a_holders_lapsed_lease_says_so_at_release_and_frees_no_other_holder(dask_pool):
    """A holder blocked past Dask's lease-timeout (a task holding the GIL) lost its
    lease: the scheduler dropped it and let another in. Its release said "released
    too many times", or released the other holder's lock; it says what happened."""
    lock, other = mpmagic.Lock(), None
    inner = lock._lock
    assert lock.acquire(timeout=5)
    lease = inner._leases[-1]
    inner.seen[lease] -= inner.lease_timeout + 5  # (its refreshes stopped that long ago ...)
    inner.refresh_leases = False
    dask_pool.client.sync(dask_pool.client.scheduler.semaphore_release, name=lock.name, lease_id=lease)
    other = pickle.loads(pickle.dumps(lock))  # (... the scheduler dropped it; another handle takes the lock)
    assert other.acquire(timeout=5)
    with pytest.raises(ValueError, match=r"lease expired after \d+\.\d s without a refresh.*lease-timeout"):
        lock.release()
    assert lock.locked()  # (the other holder's lease is still its own)
    other.release()
    assert not lock.locked()
    with pytest.raises(ValueError, match="released too many times"):
        lock.release()


def test_event_and_unsupported_helpers(dask_pool):
    ev = mpmagic.shared.Event()
    assert not ev.is_set()
    res = mpmagic.parallel("ev.set()\nrank", workers=1, namespace={"ev": ev})
    assert list(res) == [0] and ev.wait(5)
    with pytest.raises(mpmagic.UsageError, match="Queue"):
        mpmagic.Value("i", 0)
    with pytest.raises(mpmagic.UsageError, match="memory shared"):
        mpmagic.Array("d", 4)


def test_the_value_refusals_variable_advice_works_as_written(dask_pool):
    """mpmagic.Value on Dask said "guard a distributed.Variable with an mpmagic.Lock":
    a ``Variable('n')`` made in the notebook then failed at its first use with Dask's
    RuntimeError ("object not properly initialized"), since mpmagic's client is not
    Dask's default one. The refusal now gives the call, and that call works: many
    tasks add to one counter under the lock, as to a Value under get_lock()."""
    with pytest.raises(mpmagic.UsageError) as refused:
        mpmagic.Value("i", 0)
    assert "distributed.Variable(name, client=mpmagic.get_pool().client)" in str(refused.value)
    from distributed import Variable

    counter = Variable("mpmagic-test-counter", client=mpmagic.get_pool().client)
    counter.set(0)
    lock = mpmagic.Lock()

    def add_one(x):
        with lock:
            counter.set(counter.get() + 1)
        return x

    assert mpmagic.pmap(add_one, range(12)) == list(range(12))
    assert counter.get() == 12
    counter.delete()

def test_a_local_helper_a_dask_worker_of_another_machine_cannot_open_says_so(dask_pool):
    """A Value (or Queue) made while the local pool was current lives in this machine's
    shared memory: a cluster of this machine opens it, a worker on another machine
    (or container, with its own /dev/shm and pids) cannot. There it said "the process
    that made it has exited (kernel restarted or shut down?). Make a new mpmagic.Value
    in the notebook": the kernel runs, and on Dask a new Value is refused. Such a
    helper is simulated by one whose memory and maker this worker cannot find."""
    from mpmagic.shared.base import _attach
    from mpmagic.shared.values import SharedValue

    maker = psutil.Popen([sys.executable, "-c", "pass"])
    maker.wait()
    v = SharedValue._make("i", None, True)  # (the local kind, with Dask current)
    kind, stem, spec, _pid, origin, made = v._by_name()
    elsewhere = (kind, stem + "x", spec, maker.pid, origin, made)  # its memory, its maker: not here
    with pytest.raises(Exception) as got:
        dask_pool.client.submit(_attach, *elsewhere, pure=False).result(timeout=60)
    message = str(got.value)
    assert "has exited" not in message and "another machine" in message, message
    assert "Dask worker tcp://" in message and "Make a new mpmagic.Value(...) in the notebook" not in message
    assert "return values from the tasks" in message, message
def test_on_chunk_on_dask_as_on_the_local_pool(ip, dask_pool):
    """On Dask, as on the local pool (test_engine), on_chunk runs in the
    calling thread: a run started from it gives serial map's results; one
    that raises stops its run with that error and is not called again."""
    run(ip, "def sq(x):\n    return x * x\n")
    sq = ip.user_ns["sq"]
    inner = []
    outer = mpmagic.pmap(sq, range(4), on_chunk=lambda start, results: inner.append(mpmagic.pmap(sq, [1, 2])))
    assert outer == list(map(sq, range(4)))
    assert inner and all(r == list(map(sq, [1, 2])) for r in inner)
    calls = []

    def bad(start, results):
        calls.append(start)
        raise ValueError(f"bad chunk at {start}")

    with pytest.raises(ValueError, match=r"bad chunk at \d+"):
        mpmagic.pmap(sq, range(12), chunksize=1, on_chunk=bad)
    assert len(calls) == 1
    assert mpmagic.pmap(sq, range(3)) == [0, 1, 4]


def test_what_a_task_changes_of_logging_is_undone_when_its_unit_ends_on_dask(ip, dask_pool):
    """As on the local pool (test_worker_logging): a task's setLevel on a logger
    the notebook never set, a disabled logger, a NullHandler with propagate=False
    and logging.disable() stayed in the Dask worker that ran it, muting later calls.
    Nor do mpmagic's own hooks outlive its units in this cluster's workers (it
    connected to them: they may go on serving others): Logger's patched methods,
    the Manager.disable property, the handler on the root logger, showwarning."""
    run(ip, "import logging\n"
            "def mute(x):\n"
            "    logging.getLogger('mutable').setLevel(logging.ERROR)\n"
            "    logging.getLogger('mutable').disabled = True\n"
            "    logging.getLogger('quiet').addHandler(logging.NullHandler())\n"
            "    logging.getLogger('quiet').propagate = False\n"
            "    logging.disable(logging.CRITICAL)\n"
            "    return x\n")
    assert run(ip, "%pmap -q --chunksize 1 mute, range(8)") == list(range(8))

    def state():
        import logging
        import warnings

        from mpmagic import worker_logging

        mutable, quiet = logging.getLogger("mutable"), logging.getLogger("quiet")
        wl, classes = worker_logging, (logging.Logger.__dict__, logging.Manager.__dict__)
        hooks = ("__setattr__" in classes[0], classes[0]["addHandler"] is wl._watched_add_handler,
                 classes[1]["disable"] is wl._watched_property, wl._handler in logging.root.handlers,
                 warnings.showwarning is wl._show_warning)
        return mutable.level, mutable.disabled, quiet.propagate, len(quiet.handlers), logging.root.manager.disable, hooks

    assert set(dask_pool.client.run(state).values()) == {(logging.NOTSET, False, True, 0, 0,
                                                          (False, False, False, False, False))}


def test_lazy_inputs_on_dask_as_on_the_local_pool(ip, dask_pool):
    """As on the local pool (test_engine): a generator over a thread-bound sqlite
    cursor, and one that starts runs itself, give serial map's results."""
    run(ip, "def sq(x):\n    return x * x\n")
    check_lazy_inputs_equal_serial(ip.user_ns["sq"], n_rows=500, n_nested=6)


def test_an_interrupt_during_the_consumer_locks_acquire_gives_the_lease_back():
    """Ctrl-C while the acquire is in flight: it may still complete on the
    client's loop, and a lease nobody releases stopped every consumer's get for
    good. No cluster needed: the lock is a stand-in that is acquired, then interrupted."""
    from mpmagic.backends.dask_shared import DaskQueue

    class Taker:
        leases = 0

        def acquire(self, timeout=None):
            self.leases += 1  # (completed on the loop...)
            raise KeyboardInterrupt  # (...while the notebook's thread was interrupted)

        def release(self):
            if not self.leases:
                raise RuntimeError("Released too often")
            self.leases -= 1

    q = object.__new__(DaskQueue)
    q._taker = Taker()
    with pytest.raises(KeyboardInterrupt):
        q._take(1.0, look_first=False)
    assert q._taker.leases == 0


class _AsyncioTimeout(Exception):
    """asyncio.TimeoutError as on Python 3.10: a class of its own, not the builtin TimeoutError."""


def test_dasks_asyncio_timeouts_are_timeouts_as_on_python_3_10(monkeypatch):
    """Dask raises asyncio's TimeoutError, which is not the builtin before 3.11:
    a result slow to fetch failed its item there ("Dask could not run item 0:
    TimeoutError") instead of going back to wait twice as long, and a Queue's
    lost race gave the user a raw timeout. No cluster needed: stand-ins raise it."""
    import asyncio

    from mpmagic.backends.dask import _DaskRun, _Task
    from mpmagic.backends.dask_shared import DaskQueue

    monkeypatch.setattr(asyncio, "TimeoutError", _AsyncioTimeout)

    class SlowFuture:
        status = "finished"
        callbacks = 0

        def result(self, timeout=None):
            raise _AsyncioTimeout(f"timed out after {timeout} s.")

        def add_done_callback(self, fn):
            self.callbacks += 1

    class Backend:
        timeout = 0.4

    future = SlowFuture()
    run_ = object.__new__(_DaskRun)
    run_.backend, run_.job, run_.tasks = Backend(), None, {}
    task = _Task("k", unit=None, future=future)
    run_.tasks["k"] = task
    run_._failed = lambda task, exc: pytest.fail(f"the item failed: {exc!r}")
    run_._finish("k")
    assert run_.tasks == {"k": task} and future.callbacks == 1 and task.gather_wait == 0.4
    run_._finish("k")  # back again, waiting twice as long
    assert run_.tasks == {"k": task} and future.callbacks == 2 and task.gather_wait == 0.8

    class Lock:
        def acquire(self, timeout=None):
            return True

        def release(self):
            pass

    class LateQueue:
        def qsize(self):
            return 1

        def get(self, timeout=None):
            raise _AsyncioTimeout("timed out")

    q = object.__new__(DaskQueue)
    q._taker, q._q = Lock(), LateQueue()
    assert q._take(1.0, look_first=False) == (False, None)


def test_queue_put_after_close_raises_as_the_local_one(dask_pool):
    """A put after the end of the stream would be lost (its consumers have
    stopped): ValueError with the local Queue's advice, and get says closed."""
    q = mpmagic.Queue()
    q.put(1)
    q.close()
    with pytest.raises(ValueError, match=r"is closed: nothing more can be put in it.*Queue\(producers=N\)"):
        q.put(2)
    assert q.get(timeout=5) == 1
    with pytest.raises(mpmagic.QueueClosed):
        q.get(timeout=5)


def test_ctrl_c_in_a_queue_get_shows_the_users_line_and_no_frame_of_ours(ip, dask_pool):
    """As the local queue's: the interrupt showed DaskQueue.get and _get under the user's line."""
    from conftest import interrupted_cell

    run(ip, "import mpmagic\nwaiting = mpmagic.Queue()")
    shown, error = interrupted_cell(ip, "waiting.get()", after=0.2)
    assert isinstance(error, KeyboardInterrupt) and "----> 1 waiting.get()" in shown, shown
    assert not any("mpmagic" in f.f_code.co_filename for f, _ in traceback.walk_tb(error.__traceback__)), shown
    ip.user_ns.pop("waiting")


def test_ctrl_c_in_a_lock_event_or_full_queue_wait_shows_the_users_line_alone(ip, dask_pool):
    """As the local helpers' (test_shared): a Ctrl-C in ``lock.acquire()`` or ``ev.wait()``
    showed seven frames of distributed's client and threading's under the user's line, and
    in a full queue's ``put()`` ours too (Queue.get's were gone already)."""
    from conftest import interrupted_cell

    run(ip, "import mpmagic\nheld = mpmagic.Lock()\nheld.acquire()\nunset = mpmagic.Event()\n"
            "full = mpmagic.Queue(maxsize=1)\nfull.put(0)")
    for line in ("held.acquire()", "with held:\n    pass", "unset.wait()", "full.put(1)"):
        shown, error = interrupted_cell(ip, line, after=0.2)
        assert isinstance(error, KeyboardInterrupt) and "----> 1 " + line.splitlines()[0] in shown, shown
        files = [f.f_code.co_filename for f, _ in traceback.walk_tb(error.__traceback__)]
        assert not any(("mpmagic" in f or "distributed" in f or "threading" in f) for f in files), (line, files)
        assert "distributed" not in shown and "threading" not in shown, shown
    assert run(ip, "held.locked(), full.qsize(), unset.is_set()") == (True, 1, False)  # (nothing half-done)
    run(ip, "held.release()")
    for name in ("held", "unset", "full"):
        ip.user_ns.pop(name)


def test_an_interrupted_lock_acquire_takes_nothing_once_the_holder_releases(ip, dask_pool):
    """As an interrupted ``multiprocessing.Lock.acquire``: Dask's scheduler went on waiting to
    grant the interrupted acquire's lease, and granted it when the holder released the lock; no
    process refreshed it, so the lock stayed taken until Dask's lease timeout (the next
    ``acquire()`` anywhere waited ~40 s)."""
    from conftest import interrupted_cell

    run(ip, "import mpmagic, pickle\nwanted = mpmagic.Lock()\nholder = pickle.loads(pickle.dumps(wanted))\n"
            "holder.acquire()")
    shown, error = interrupted_cell(ip, "wanted.acquire()", after=0.2)
    assert isinstance(error, KeyboardInterrupt), shown
    run(ip, "holder.release()")
    assert run(ip, "wanted.acquire(timeout=3)") is True  # (False: the lease nobody refreshed held it)
    run(ip, "wanted.release()")
    for name in ("wanted", "holder"):
        ip.user_ns.pop(name)


def test_a_sigint_another_thread_took_interrupts_the_notebooks_lock_and_event_waits_at_once(dask_pool):
    """As the local pool's waits (test_engine): the kernel's interrupt is sent to the process,
    and Linux may hand it to another thread (Dask's client has several). Python's handler ran
    there, and the notebook's ``lock.acquire()`` or ``ev.wait()``, blocked in Dask's ``sync``
    (a ``threading.Event.wait(10)``), raised its KeyboardInterrupt up to 10 s late. Nothing
    is taken meanwhile: the lock is free again once its holder releases it."""
    import pickle

    from test_engine import _sigint_in_this_thread

    wanted, unset = mpmagic.Lock(), mpmagic.Event()
    holder = pickle.loads(pickle.dumps(wanted))
    holder.acquire()
    for wait in (wanted.acquire, unset.wait):
        timer = threading.Timer(0.3, _sigint_in_this_thread)
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            wait()
        timer.join()
        assert time.monotonic() - t0 < 2.5, wait  # (before: 10 s, Dask's slice)
    holder.release()
    assert wanted.acquire(timeout=3) is True  # (the interrupted acquire left no lease behind)
    wanted.release()


@pytest.mark.parametrize("wait", ["Lock.acquire", "Event.wait", "Queue.get"])
def test_the_first_ctrl_c_on_a_dask_helpers_wait_acts_even_just_after_an_interrupted_run(dask_pool, wait):
    """As the local helpers' (test_shared): in the half second after an interrupted run,
    whose presses are taken as repeats of it (interrupts.py), the notebook's first Ctrl-C
    on ``lock.acquire()`` was dropped and the wait went on (the suite's ``-k interrupt``
    run hung so, in the interrupted acquire of a held lock)."""
    wanted, unset, empty = mpmagic.Lock(), mpmagic.Event(), mpmagic.Queue()
    holder = pickle.loads(pickle.dumps(wanted))
    holder.acquire()
    blocked = {"Lock.acquire": lambda: wanted.acquire(timeout=5), "Event.wait": lambda: unset.wait(5),
               "Queue.get": lambda: empty.get(timeout=5)}[wait]
    try:
        first_press_interrupts(blocked, after=0.2, within=2.5)
    finally:
        holder.release()
    assert wanted.acquire(timeout=3) is True  # (the interrupted acquire left no lease behind)
    wanted.release()


class _TurnHeld:
    """A background run holding the Dask backend's turn until :meth:`open` (or ``seconds``
    later: what a run waiting behind it waited for before)."""

    def __init__(self, ip, backend, seconds: float) -> None:
        run(ip, "import mpmagic\nturn_gate = mpmagic.Event()\ndef gated(x):\n    turn_gate.wait(30)\n    return x\n")
        self.ip, self.gate = ip, ip.user_ns["turn_gate"]
        self.handle = run(ip, "mpmagic.submit(gated, range(1))")
        self.opener = threading.Timer(seconds, self.gate.set)
        deadline = time.monotonic() + 30
        while backend._driving is None and time.monotonic() < deadline:  # (it holds the turn)
            time.sleep(0.02)
        self.opener.start()

    def open(self) -> None:
        self.gate.set()
        self.opener.cancel()
        assert self.handle.result(timeout=30) == [0]
        for name in ("turn_gate", "gated"):
            self.ip.user_ns.pop(name)


def test_a_sigint_another_thread_took_interrupts_a_runs_wait_for_its_turn(ip, dask_pool):
    """The same for a foreground run waiting behind a background one (on Dask runs take
    turns): past its first second (the line that names the run it waits for) it waited on
    the turn's lock with no limit, and a Ctrl-C another thread took was acted on only once
    the background run ended (an hour's run: an hour)."""
    from test_engine import _sigint_in_this_thread

    held = _TurnHeld(ip, dask_pool, seconds=8)
    try:
        timer = threading.Timer(1.3, _sigint_in_this_thread)  # (past the 1 s wait before the line)
        t0 = time.monotonic()
        timer.start()
        with capture_output(), pytest.raises(KeyboardInterrupt):
            mpmagic.pmap(abs, [-1, 2])
        timer.join()
        assert time.monotonic() - t0 < 3, time.monotonic() - t0  # (before: 8 s, as the background run ended)
    finally:
        held.open()
    assert mpmagic.pmap(abs, [-1, 2]) == [1, 2]


def test_a_run_cancelled_while_it_waits_for_its_turn_is_cancelled_at_once(ip, dask_pool):
    """As on the local pool: ``cancel()`` of a background run waiting behind another one
    returns at once, the run cancelled. Its thread waited on the turn's lock with no limit
    and saw the cancel only once it had the turn: ``cancel()`` waited its 10 s and returned
    with the run still "running" (an imap's Ctrl-C waited as long), and the run ended when
    the one before it did (an hour's run: an hour)."""
    held = _TurnHeld(ip, dask_pool, seconds=15)
    try:
        behind = mpmagic.submit(abs, [-1, 2])
        time.sleep(0.3)  # (its thread waits for the turn)
        t0 = time.monotonic()
        assert behind.cancel() is True
        assert time.monotonic() - t0 < 2, time.monotonic() - t0  # (before: 10 s)
        assert behind.wait(2) and behind.cancelled(), behind.state  # (before: "running" until the other ended)
        with pytest.raises(concurrent.futures.CancelledError):
            behind.result()
    finally:
        held.open()
    assert mpmagic.pmap(abs, [-1, 2]) == [1, 2]


def test_a_background_cell_is_cancelled_at_once_running_or_waiting_for_its_turn(ip, dask_pool):
    """As a map (docs/dask.md: a cancel is back within 2 s): ``cancel()`` of a background
    ``%%parallel`` on Dask did not stop it. Only a map's job took the cancel (its failure
    set); the cell's loop went on until its ranks returned, so ``cancel()`` waited for them
    (at most its 10 s, then returned with the run still "running"), and a cell waiting for
    its turn ran once it had it."""
    run(ip, "import mpmagic\ncell_gate = mpmagic.Event()")
    cell = run(ip, "%%parallel --bg -n 2 -q\ncell_gate.wait(30)\nrank")
    try:
        deadline = time.monotonic() + 30
        while dask_pool._driving is None and time.monotonic() < deadline:  # (it runs)
            time.sleep(0.02)
        time.sleep(0.5)  # (its ranks run: they wait on the gate)
        t0 = time.monotonic()
        assert cell.cancel() is True
        assert time.monotonic() - t0 < 3, time.monotonic() - t0  # (before: 10 s, the run "running")
        assert cell.cancelled(), cell.state
    finally:
        ip.user_ns["cell_gate"].set()  # (the given-up ranks' waits end by themselves within a second)
    held = _TurnHeld(ip, dask_pool, seconds=15)
    try:
        waiting = run(ip, "%%parallel --bg -n 2 -q\nrank")
        time.sleep(0.3)  # (its thread waits for the turn)
        t0 = time.monotonic()
        assert waiting.cancel() is True
        assert time.monotonic() - t0 < 2, time.monotonic() - t0  # (before: 10 s)
        assert waiting.cancelled(), waiting.state
    finally:
        held.open()
    assert run(ip, "%%parallel -n 2 -q\nrank") == [0, 1]
    ip.user_ns.pop("cell_gate")


def test_an_imap_interrupted_before_its_turn_says_none_of_its_work_started(ip, dask_pool):
    """As on the local pool: an imap behind a background run (runs take turns on Dask)
    interrupted before its turn sent nothing, and its line said "its Dask tasks were
    cancelled; the workers running tasks already started are replaced ...", of tasks it
    never had."""
    held = _TurnHeld(ip, dask_pool, seconds=15)
    try:
        timer = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt) as info:
            list(mpmagic.imap(abs, [-1, 2]))
        timer.join()
    finally:
        held.open()
    assert "none of its work had started" in str(info.value), info.value
    assert "Dask tasks were cancelled" not in str(info.value), info.value


def test_an_interrupted_queue_get_leaves_the_consumers_lock_free(dask_pool):
    """The same for a queue's consumers' lock: a Ctrl-C in the notebook's ``q.get()`` while
    another consumer held it (two round trips of each take) left a lease nobody refreshed,
    and every consumer's ``get`` waited ~40 s for Dask's lease timeout."""
    import signal

    from mpmagic.backends.dask_shared import _dask_lock

    q = mpmagic.Queue()
    consumer = _dask_lock(q.name + "-take", dask_pool.client)  # (another consumer, mid-take)
    consumer.acquire()
    timer = threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        q.get()
    consumer.release()
    q.put(1)
    assert q.get(timeout=3) == 1  # (queue.Empty: the lease nobody refreshed held the lock)


def test_lock_release_unheld_raises_valueerror_as_locally(dask_pool):
    lock = mpmagic.Lock()
    with pytest.raises(ValueError, match="^semaphore or lock released too many times$") as info:
        lock.release()
    # (no frame of ours under the caller's line, as multiprocessing's; IPython shows the last frame even when hidden)
    assert [f.f_code.co_filename for f, _ in traceback.walk_tb(info.value.__traceback__)] == [__file__]
    assert lock.acquire(timeout=5)
    lock.release()
    with pytest.raises(ValueError, match="released too many times") as info:
        with lock:
            lock.release()
    assert [f.f_code.co_filename for f, _ in traceback.walk_tb(info.value.__traceback__)] == [__file__]


# multiprocessing is the oracle for the Dask helpers' standard-library methods: the same
# steps on multiprocessing's Lock and Queue and on mpmagic's Dask ones give the same outcomes.

def _outcome(call, *args, **kwargs):
    """What a call gave: its result, or the name of what it raised."""
    try:
        return call(*args, **kwargs)
    except Exception as exc:
        return type(exc).__name__


def _in_a_thread(call, *args, **kwargs):
    """``_outcome``, or "still waiting" after 30 s (a call that hangs fails the test, not the run)."""
    got = []
    t = threading.Thread(target=lambda: got.append(_outcome(call, *args, **kwargs)), daemon=True)
    t.start()
    t.join(30)
    return got[0] if got else "still waiting"


# Run in another process with the lock as `lk`: a task (Dask) or a forked process (multiprocessing).
_TAKE = "got = lk.acquire(timeout=5)\n"
_GIVE_BACK = "try:\n    lk.release()\n    got = 'released'\nexcept ValueError:\n    got = 'ValueError'\n"


def _forked(lock, code):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = ctx.SimpleQueue()
    proc = ctx.Process(target=_run_code, args=(code, lock, out))
    proc.start()
    proc.join(30)
    return out.get() if not out.empty() else "no answer"


def _run_code(code, lock, out):
    ns = {"lk": lock}
    exec(code, ns)
    out.put(ns["got"])


def _any_handle_releases(lock, other, elsewhere):
    """Take through one handle, release through another, here and in another process."""
    steps = [lock.acquire(timeout=5), _outcome(other.release), other.acquire(timeout=5), _outcome(lock.release),
             _outcome(lock.release), _outcome(other.release)]  # (the last two: nobody holds it)
    steps += [elsewhere(lock, _TAKE), lock.locked() if hasattr(lock, "locked") else "held",
              _outcome(lock.release), lock.acquire(timeout=5)]  # (another process took it; released here)
    steps += [elsewhere(lock, _GIVE_BACK), lock.acquire(False), _outcome(lock.release)]  # (and the other way)
    steps += [_in_a_thread(_with, lock), lock.acquire(False), _outcome(lock.release)]
    return steps


def _with(lock):
    with lock as got:
        return got


@pytest.mark.timeout(120)
def test_a_dask_lock_is_released_through_any_handle_as_a_multiprocessing_lock(dask_pool):
    """Only the object that took a Dask lock could release it: the notebook after a task
    took it, a task after the notebook took it, a pickled copy got "released too many
    times" and the lock stayed held for good. multiprocessing lets any process release
    a held lock (and raises ValueError for one nobody holds), as the local lock does."""
    import multiprocessing as mp
    import pickle

    mp_lock = mp.Lock()
    expected = _any_handle_releases(mp_lock, mp_lock, _forked)
    assert expected == [True, None, True, None, "ValueError", "ValueError", True, "held", None, True,
                        "released", True, None, True, True, None]  # (mp.Lock has no locked(): "held")
    lock = mpmagic.Lock()

    def in_a_task(lock, code):
        return mpmagic.parallel(code + "got", workers=1, namespace={"lk": lock})[0]

    got = _any_handle_releases(lock, pickle.loads(pickle.dumps(lock)), in_a_task)
    assert got == [True, None, True, None, "ValueError", "ValueError", True, True, None, True,
                   "released", True, None, True, True, None]
    assert not lock.locked()


# acquire(block, timeout) on a free and on a held lock (not block=True with no timeout on a held one: that waits)
_ACQUIRES = [{}, {"block": False}, {"block": False, "timeout": 5}, {"block": False, "timeout": -1},
             {"timeout": 0}, {"timeout": -1}, {"timeout": -0.5}, {"block": True, "timeout": 0.2}, {"timeout": None}]


def _acquires(lock, holder):
    free = []
    for kwargs in _ACQUIRES:
        free.append(_in_a_thread(lock.acquire, **kwargs))
        lock.release()
    assert holder.acquire(timeout=5)
    held = [_in_a_thread(lock.acquire, **kwargs) for kwargs in _ACQUIRES
            if not kwargs.get("block", True) or kwargs.get("timeout") is not None]
    holder.release()
    return free, held


@pytest.mark.timeout(180)
def test_a_dask_locks_acquire_takes_block_and_timeout_as_a_multiprocessing_lock(dask_pool):
    """A negative timeout is 0 in multiprocessing (False at once on a held lock); on
    Dask it was "no timeout", so acquire(timeout=-1) on a held lock waited for ever."""
    import multiprocessing as mp
    import pickle

    mp_lock = mp.Lock()
    expected = _acquires(mp_lock, mp_lock)
    assert expected == ([True] * len(_ACQUIRES), [False] * (len(_ACQUIRES) - 2))
    lock = mpmagic.Lock()
    assert _acquires(lock, pickle.loads(pickle.dumps(lock))) == expected
    assert not lock.locked()


def _queue_steps(make):
    """get/put with a negative timeout, and the stdlib's end-of-life methods."""
    empty, full = make(), make(1)
    full.put("x")
    steps = [_in_a_thread(empty.get, timeout=-1), _in_a_thread(empty.get, True, -5),
             _in_a_thread(full.put, "y", timeout=-1), _in_a_thread(full.put, "y", True, -0.5),
             _in_a_thread(empty.put, "z", timeout=-1), _in_a_thread(empty.get, timeout=10)]
    for q in (empty, full):
        steps += [_outcome(q.cancel_join_thread), _outcome(q.close), _outcome(q.join_thread)]
    return steps


@pytest.mark.timeout(120)
def test_a_dask_queue_takes_a_negative_timeout_and_the_stdlib_methods_as_a_multiprocessing_queue(dask_pool):
    """A negative timeout raised ValueError (queue.Queue's rule) where multiprocessing
    and the local queue raise queue.Empty / queue.Full at once (it counts as 0), and
    cancel_join_thread(), which docs/shared.md says is accepted, was an AttributeError."""
    import multiprocessing as mp

    expected = _queue_steps(mp.Queue)
    assert expected == ["Empty", "Empty", "Full", "Full", None, "z"] + [None] * 6
    assert _queue_steps(mpmagic.Queue) == expected


def test_helpers_of_a_stopped_dask_pool_say_so_in_one_line_everywhere(ip, dask_cluster, dask_pool):
    """Every method of Queue, Lock and Event made on Dask, after `%pool local` and
    after reconnecting, and a Lock inside a local task: the one-line UsageError
    (only Queue.get said it; the rest raised "IOLoop is closed", "'NoneType'
    object has no attribute 'event_set'", "... not properly initialized")."""
    q, lock, ev = mpmagic.Queue(), mpmagic.Lock(), mpmagic.Event()
    ip.user_ns["dl"] = lock
    calls = [q.qsize, lambda: q.put(1), q.close, lambda: q.closed, lambda: lock.acquire(timeout=1), lock.release,
             lock.locked, ev.set, ev.clear, ev.is_set, lambda: ev.wait(0.1)]
    run(ip, "%pool local -n 2")
    # (named: what stopped it, not the list of every way a pool stops)
    said = (r"^<mpmagic\.(Queue|Lock|Event) on Dask '[^']+'> belonged to a Dask pool that was stopped by "
            r"%pool local: make a new one with mpmagic\.\1\(\) on the current pool$")
    for call in calls:
        with pytest.raises(mpmagic.UsageError, match=said):
            call()
    with pytest.raises(mpmagic.UsageError, match=r"mpmagic.Lock on Dask .* belonged to a Dask pool that was"):
        run(ip, "def usel(x):\n    with dl:\n        return x\n%pmap -q usel, range(2)")
    run(ip, f"%pool dask {dask_cluster.address}")
    with pytest.raises(mpmagic.UsageError, match=r"make a new one with mpmagic.Event\(\)"):
        ev.is_set()
    with pytest.raises(mpmagic.UsageError, match="belonged to a Dask pool that was stopped"):
        q.qsize()


def test_helpers_whose_scheduler_connection_was_lost_say_so_not_that_the_pool_was_stopped(
        ip, dask_cluster, dask_pool, monkeypatch):
    """The scheduler died (or restarted) under a connected notebook: a Queue's call while
    Dask's client was reconnecting ended, 10 s later, in Dask's CommClosedError with forty
    lines of its internals; once the client had closed itself, the helpers said they
    "belonged to a Dask pool that was stopped (use_local(), stop_pool(); %pool local,
    %pool stop)", none of which the user had done."""
    from distributed.comm.core import CommClosedError

    q, lock = mpmagic.Queue(), mpmagic.Lock()
    lost = (rf"^<mpmagic\.(Queue|Lock) on Dask '[^']+'> was lost with the connection to the Dask scheduler at "
            rf"{dask_cluster.address} \(the scheduler stopped or restarted, or the network dropped\): make a new "
            r"one with mpmagic\.\1\(\) once the scheduler is back \(the next run reconnects\)$")

    def refused() -> int:
        raise CommClosedError("ConnectionPool closing.")

    with monkeypatch.context() as m:  # (the client reconnecting, the scheduler not answering)
        m.setattr(dask_pool.client, "status", "connecting")
        m.setattr(q._q, "qsize", refused)
        with pytest.raises(mpmagic.UsageError, match=lost):
            q.qsize()
    dask_pool.client.close()  # (as Dask's client closes itself when it cannot reconnect)
    for call in (q.qsize, lambda: lock.acquire(timeout=1)):
        with pytest.raises(mpmagic.UsageError, match=lost):
            call()
    assert mpmagic.pmap(abs, [-1]) == [1]  # the next run reconnects
    with pytest.raises(mpmagic.UsageError, match=lost):
        q.qsize()


def test_pool_dask_again_with_the_same_address_keeps_the_connection(ip, dask_cluster, dask_pool):
    """Running the cell that connects again (``%pool dask ADDRESS``, the same scheduler)
    closed the connection and made a new one: a background run in flight failed with
    "the pool was stopped while this run was in flight", and a Queue made on it said it
    "belonged to a Dask pool that was stopped" (though its scheduler still held it).
    As ``%pool local`` keeps a running local pool, it now keeps the connection."""
    run(ip, "import time\ndef nap_sq(x):\n    time.sleep(0.2)\n    return x * x\n")
    q = mpmagic.Queue()
    q.put("made before")
    handle = mpmagic.pmap(ip.user_ns["nap_sq"], range(8), chunksize=1, block=False)
    run(ip, f"%pool dask {dask_cluster.address}")
    assert pool_module.current_pool() is dask_pool
    assert handle.result(timeout=60) == [x * x for x in range(8)]
    assert q.get(timeout=10) == "made before"
    # More workers than the cluster has, in time: an error, and the pool stays as it was.
    timeout = dask_pool.timeout
    with pytest.raises(mpmagic.MPMagicError, match=f"fewer than the {DASK_WORKERS + 1} asked for"):
        mpmagic.use_dask(dask_cluster.address, workers=DASK_WORKERS + 1, timeout=0.5)
    assert pool_module.current_pool() is dask_pool and dask_pool.timeout == timeout
    assert dask_pool.requested_workers is None
    assert mpmagic.pmap(ip.user_ns["nap_sq"], [3]) == [9]

def test_a_rank_waiting_for_a_worker_busy_with_another_clients_task_is_named(ip, dask_cluster, dask_pool,
                                                                               monkeypatch, capsys):
    """A shared cluster: another client's task holds a worker, and `%%parallel -n 4`
    must pin a rank there. Dask queues that rank silently (ranks meeting it waited
    with no word, for ever if the task never ends): one line names it and its
    worker, and the advice does not blame the rank that waited for it."""
    from distributed import Client

    from mpmagic.backends import dask as dask_backend

    monkeypatch.setattr(dask_backend, "RANK_START_NOTICE", 0.5)
    with Client(dask_cluster.address, set_as_default=False) as other:
        target = sorted(other.nthreads())[0]
        hold = other.submit(time.sleep, 2.5, workers=[target], pure=False)
        deadline = time.monotonic() + 10
        while not other.processing(workers=[target]).get(target):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status = [line for line in str(run(ip, "%pool")).splitlines() if "worker tcp" in line and "running" in line]
        assert len(status) == 1 and target + ":" in status[0]  # the scheduler's figure, now
        capsys.readouterr()
        values = run(ip, f"%%parallel -n {DASK_WORKERS}\nrank")
        hold.result()
    assert list(values) == list(range(DASK_WORKERS))
    err = capsys.readouterr().err
    last = DASK_WORKERS - 1  # (the busy worker is chosen last)
    assert f"mpmagic: rank {last} has not started after " in err and f"Dask worker {target} is busy" in err
    assert err.count("has not started") == 1
    advice = mpmagic.last_report().advice or ""
    assert "slow rank" not in advice and "waited" in advice


def test_a_foreground_run_waiting_behind_a_background_run_says_which(ip, dask_pool, monkeypatch, capsys):
    """Runs on one Dask backend take turns: a quick %pmap behind a --bg run sat there
    in silence for the whole background run. One line names the run it waits for."""
    from mpmagic.backends import dask as dask_backend

    monkeypatch.setattr(dask_backend, "TURN_NOTICE", 0.2)
    ip.user_ns["nap"] = time.sleep
    bg = run(ip, "%pmap --bg -q nap, [1.0]")
    capsys.readouterr()
    assert run(ip, "%pmap -q abs, [-1]") == [1]
    err = capsys.readouterr().err
    bg.result()
    assert err.count(f"mpmagic: this run waits for background run {bg.id} (pmap sleep) to end: on Dask the runs "
                     "of one notebook take turns") == 1
    assert mpmagic.last_report().waited_for_workers > 0.2


def test_a_module_the_connected_clusters_workers_cannot_import_gets_advice_for_that_cluster(
        ip, dask_pool, tmp_path, monkeypatch):
    """A module on the notebook's sys.path only: the note advised %pool restart, which
    restarts nothing on a cluster mpmagic connected to (and sends it no sys.path)."""
    import traceback

    (tmp_path / "dkmod_nowhere.py").write_text("def f(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import dkmod_nowhere

    try:
        with pytest.raises(ModuleNotFoundError) as info:
            mpmagic.pmap(dkmod_nowhere.f, [1])
    finally:
        del sys.modules["dkmod_nowhere"]
    text = "".join(traceback.format_exception_only(info.value))
    assert "Install it (or put its file) where the Dask workers run" in text and "%pool restart)" not in text
    assert f"(Dask worker {mpmagic.last_failures()[0].worker})" in text  # which one lacks it


def test_an_item_importing_a_module_a_connected_worker_lacks_names_the_module_and_worker(
        ip, dask_pool, tmp_path, monkeypatch):
    """The notebook imports the module, the worker cannot (another environment): serial code
    would not raise, so the error says which worker lacks it and what to do (it said only
    "No module named ...", as if the notebook lacked it too), collected or raised, map or rank."""
    import traceback

    (tmp_path / "dkmod_item.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("dkmod_item")  # (the notebook can)

    def f(x):
        import dkmod_item

        return dkmod_item.X + x

    workers = set(dask_pool.client.nthreads())
    try:
        with pytest.raises(ModuleNotFoundError) as info:
            mpmagic.pmap(f, [1])
        failed = mpmagic.pmap(f, [1, 2], errors="collect")
        with pytest.raises(mpmagic.ParallelError) as ranks:
            mpmagic.parallel("import dkmod_item", workers=1)
    finally:
        del sys.modules["dkmod_item"]
    errors = [info.value, failed[0].error, ranks.value.failures[0]]
    for exc in errors:
        text = "".join(traceback.format_exception_only(exc))
        named = [w for w in workers if f"mpmagic: the notebook imports dkmod_item, but Dask worker {w} " in text]
        assert len(named) == 1, text
        assert "Install it (or put its file) where the Dask workers run" in text
    # A module the notebook cannot import either fails as serial code fails: no note.
    with pytest.raises(ModuleNotFoundError) as info:
        mpmagic.pmap(lambda x: __import__("dkmod_not_anywhere"), [1])
    assert "Dask worker" not in "".join(traceback.format_exception_only(info.value))


def _save_module(path, text: str, n: list[int] = [0]) -> None:  # noqa: B006 (a counter)
    """Write a module file with an mtime seconds after the last one (a .pyc goes by seconds and size)."""
    n[0] += 5
    path.write_text(text)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + n[0] * 1_000_000_000))


@pytest.fixture
def module_dirs(ip, dask_pool, tmp_path, monkeypatch):
    """(the notebook's folder of modules, the workers' own): the workers import from theirs, then
    the notebook's (a cluster we connect to is sent no sys.path): a file in theirs is another
    machine's copy."""
    here, there = str(tmp_path / "here"), str(tmp_path / "there")
    os.mkdir(here)
    os.mkdir(there)
    monkeypatch.syspath_prepend(here)

    def on_path(add: bool) -> None:
        sys.path[:] = ([there, here] if add else []) + [p for p in sys.path if p not in (here, there)]

    dask_pool.client.run(on_path, True)
    before = set(sys.modules)
    yield tmp_path / "here", tmp_path / "there"
    dask_pool.client.run(on_path, False)
    for name in set(sys.modules) - before:
        if name.startswith("dkmod_"):
            del sys.modules[name]


def test_a_module_reloaded_in_the_notebook_is_reloaded_by_the_workers(ip, dask_pool, module_dirs, tmp_path, capsys):
    """Dask workers kept the module they imported first: after importlib.reload %pmap gave v1 where
    map gave v2, and --checkpoint stored those v1 results under v2's key. m1 does `from m2 import g`
    and the notebook reloaded m1 before m2 (m1.g stays v1 there): the workers follow that order."""
    here = module_dirs[0]
    _save_module(here / "dkmod_r1.py", "from dkmod_r2 import g\ndef f(x):\n    return g(x)\n")
    _save_module(here / "dkmod_r2.py", "def g(x):\n    return ('v1', x)\n")
    run(ip, f"%config MPMagic.checkpoint_dir = {str(tmp_path / 'ckpt')!r}")
    try:
        run(ip, "import importlib, dkmod_r1, dkmod_r2")
        v1, v2 = [("v1", i) for i in range(8)], [("v2", i) for i in range(8)]
        assert run(ip, "%pmap -q --checkpoint dkmod_r2.g, range(8)") == v1
        dask_pool.client.run(lambda: __import__("dkmod_r1") and None)  # (every worker has v1: none imports v2 afresh)
        _save_module(here / "dkmod_r2.py", "def g(x):\n    return ('v2', x)\n")
        run(ip, "importlib.reload(dkmod_r1); importlib.reload(dkmod_r2)")
        assert run(ip, "list(map(dkmod_r2.g, range(8)))") == v2
        capsys.readouterr()
        assert run(ip, "%pmap -q --checkpoint dkmod_r2.g, range(8)") == v2  # computed again, by v2
        assert "resumed: 0 of 8" in mpmagic.last_report().line()
        err = capsys.readouterr().err
        assert "workers reload dkmod_r1, dkmod_r2" in err and "differs" not in err
        assert run(ip, "%pmap -q --chunksize 1 dkmod_r1.f, range(8)") == v1  # the notebook's order: m1.g is v1
        assert run(ip, "%pmap -q --chunksize 1 lambda x: dkmod_r2.g(x), range(8)") == v2
    finally:
        run(ip, "%config MPMagic.checkpoint_dir = None")


def test_a_worker_whose_copy_of_a_reloaded_module_differs_says_so_once(ip, dask_pool, module_dirs, capsys):
    """A worker on another machine reloads its own copy of the file: one line says so, naming a worker."""
    here, there = module_dirs
    (there / "dkmod_d.py").write_text("def f(x):\n    return ('theirs', x)\n")
    _save_module(here / "dkmod_d.py", "def f(x):\n    return ('v1', x)\n")
    run(ip, "import importlib, dkmod_d")
    assert run(ip, "%pmap -q --chunksize 1 dkmod_d.f, range(8)") == [("theirs", i) for i in range(8)]
    _save_module(here / "dkmod_d.py", "def f(x):\n    return ('v2', x)\n")
    run(ip, "importlib.reload(dkmod_d)")
    capsys.readouterr()
    assert run(ip, "%pmap -q --chunksize 1 dkmod_d.f, range(8)") == [("theirs", i) for i in range(8)]
    err = capsys.readouterr().err
    assert err.count("differs from the file the notebook loaded") == 1
    assert "mpmagic: dkmod_d.py on Dask worker tcp://127.0.0.1:" in err


def test_a_worker_that_cannot_reload_an_unchanged_file_says_why_not_that_it_differs(
        ip, dask_pool, module_dirs, capsys):
    """The workers' file is the notebook's, but their reload of it fails (here: v2 raises
    off the main thread, where a Dask task runs): the line said the file "differs from
    the file the notebook loaded", a false cause. It says the worker could not reload
    it, with the error, and that its tasks ran the version it had."""
    here = module_dirs[0]
    _save_module(here / "dkmod_f.py", "def f(x):\n    return ('v1', x)\n")
    run(ip, "import importlib, dkmod_f")
    dask_pool.client.run(lambda: __import__("dkmod_f") and None)  # (every worker has v1)
    _save_module(here / "dkmod_f.py", "import threading\n"
                 "if threading.current_thread() is not threading.main_thread():\n"
                 "    raise ImportError('dkmod_f needs the main thread')\n"
                 "def f(x):\n    return ('v2', x)\n")
    run(ip, "importlib.reload(dkmod_f)")
    capsys.readouterr()
    assert run(ip, "%pmap -q --chunksize 1 dkmod_f.f, range(8)") == [("v1", i) for i in range(8)]
    err = capsys.readouterr().err
    assert "differs" not in err, err
    lines = [line for line in err.splitlines() if "dkmod_f" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("mpmagic: Dask worker tcp://127.0.0.1:"), lines
    assert lines[0].endswith(" could not reload dkmod_f (ImportError: dkmod_f needs the main thread): its tasks "
                             "run the version of dkmod_f it had imported, not the notebook's"), lines


def test_a_failed_call_on_dask_names_the_call_as_on_the_local_pool(ip, dask_pool):
    """mpmagic.call on Dask: the same job, so the same words ("raised in the call f(0)",
    "call failed"), never "item 0"."""
    run(ip, "import mpmagic\ndef inverse_dc(x):\n    return 1 / x")
    handle = mpmagic.call(ip.user_ns["inverse_dc"], 0)
    with pytest.raises(ZeroDivisionError) as got:
        handle.result(60)
    assert got.value.__notes__ == ["mpmagic: raised in the call inverse_dc(0)"]
    assert handle.report().line().startswith("call failed, ")
    assert handle.status_line().startswith(f"run {handle.id}: call inverse_dc, ")


def test_a_run_waiting_for_its_turn_ends_with_a_stop_as_on_the_local_pool(ip, dask_pool, tmp_path):
    """Runs take turns on Dask: the one being driven failed at ``%pool stop``, but the
    one queued behind it then connected again (mpmagic's own cluster: started a new
    one) and ran after the stop. Both end, as both do on the local pool."""
    log = tmp_path / "ran"
    run(ip, f"import time\ndef nap_logged(x):\n    with open({str(log)!r}, 'a') as f:\n"
            "        f.write(f'{x} ')\n    time.sleep(0.5)\n    return x\n")
    first = mpmagic.submit(ip.user_ns["nap_logged"], range(4), chunksize=1)
    second = mpmagic.submit(ip.user_ns["nap_logged"], range(10, 12), chunksize=1)
    deadline = time.monotonic() + 30
    while not log.exists() and time.monotonic() < deadline:  # (the first is being driven)
        time.sleep(0.05)
    run(ip, "%pool stop")
    for handle in (first, second):
        with pytest.raises(mpmagic.MPMagicError, match="^the pool was stopped by %pool stop while this run was in flight: run it again$"):
            handle.result(60)
    assert "10" not in log.read_text().split()
    assert not pool_module.current_pool().running


def _new_kernel(backend, monkeypatch, module: str) -> None:
    """What a new kernel on the same long-lived cluster has: a connection that told the workers
    nothing yet (the backend's notebook-side record of modules afresh), its own load numbers,
    and ``module`` not imported yet."""
    from mpmagic import loadstamps, warmup

    monkeypatch.setattr(loadstamps, "NOTEBOOK", f"kernel-{time.monotonic_ns()}")
    monkeypatch.setattr(backend, "_reloads", warmup.Reloads())
    monkeypatch.setattr(backend, "_said_differs", set())
    del sys.modules[module]


def test_a_new_kernel_runs_the_module_it_loaded_not_the_one_a_long_lived_worker_kept(
        ip, dask_pool, module_dirs, tmp_path, capsys, monkeypatch):
    """A cluster we connect to outlives the kernel: a new kernel (after an edit of the user's
    module) got the old version's results from workers that imported it for the kernel before,
    with no line, and --checkpoint stored them under the new file's key, so every later kernel
    resumed them. The reload before the first run did not help (nothing was "reloaded since")."""
    here = module_dirs[0]
    _save_module(here / "dkmod_s.py", "def g(x):\n    return ('v1', x)\n")
    run(ip, f"%config MPMagic.checkpoint_dir = {str(tmp_path / 'ckpt')!r}")
    try:
        run(ip, "import dkmod_s\ndef uses_s(x):\n    return dkmod_s.g(x)\n")
        assert run(ip, "%pmap -q --checkpoint --chunksize 1 uses_s, range(8)") == [("v1", i) for i in range(8)]
        dask_pool.client.run(lambda: __import__("dkmod_s") and None)  # (every worker has v1)
        _save_module(here / "dkmod_s.py", "def g(x):\n    return ('v2', x)\n")
        _new_kernel(dask_pool, monkeypatch, "dkmod_s")
        run(ip, "import importlib, dkmod_s; importlib.reload(dkmod_s)\ndef uses_s(x):\n    return dkmod_s.g(x)\n")
        serial = run(ip, "list(map(uses_s, range(8)))")
        assert serial == [("v2", i) for i in range(8)]
        capsys.readouterr()
        assert run(ip, "%pmap -q --checkpoint --chunksize 1 uses_s, range(8)") == serial
        assert "resumed: 0 of 8" in mpmagic.last_report().line()
        err = capsys.readouterr().err
        assert err.count("mpmagic: Dask workers reload dkmod_s") == 1 and "differs" not in err, err
        assert run(ip, "%pmap -q --checkpoint --chunksize 1 uses_s, range(8)") == serial  # what was stored: v2's
        assert "resumed: 8 of 8" in mpmagic.last_report().line()
        assert "reload" not in capsys.readouterr().err  # (once: the workers now have v2)
    finally:
        run(ip, "%config MPMagic.checkpoint_dir = None")


def test_results_of_a_worker_whose_copy_of_a_module_differs_are_not_checkpointed(
        ip, dask_pool, module_dirs, tmp_path, capsys):
    """A worker on another machine runs its own copy of the user's module: one line says so, and
    --checkpoint does not store its results under the key of the notebook's file."""
    here, there = module_dirs
    (there / "dkmod_c.py").write_text("def f(x):\n    return ('theirs', x)\n")
    _save_module(here / "dkmod_c.py", "def f(x):\n    return ('ours', x)\n")
    run(ip, f"%config MPMagic.checkpoint_dir = {str(tmp_path / 'ckpt')!r}")
    try:
        run(ip, "import dkmod_c")
        capsys.readouterr()
        theirs = [("theirs", i) for i in range(8)]
        with pytest.warns(RuntimeWarning, match="8 results of this run of `f` came from Dask workers whose dkmod_c "
                                                "is not the file the notebook loaded"):
            assert run(ip, "%pmap -q --checkpoint --chunksize 1 dkmod_c.f, range(8)") == theirs
        err = capsys.readouterr().err
        assert err.count("mpmagic: dkmod_c.py on Dask worker tcp://127.0.0.1:") == 1, err
        with pytest.warns(RuntimeWarning, match="were not stored"):  # (nothing was: all computed again)
            assert run(ip, "%pmap -q --checkpoint --chunksize 1 dkmod_c.f, range(8)") == theirs
        assert "resumed: 0 of 8" in mpmagic.last_report().line()
    finally:
        run(ip, "%config MPMagic.checkpoint_dir = None")


def test_scaling_past_the_clusters_threads_stops_with_a_line(ip, dask_pool, capsys):
    """``--scaling -n N`` on a cluster of fewer worker threads plotted an "N workers" point
    that ran on fewer threads, against an ideal of Nx, with no line saying so."""
    # Tasks earlier tests gave up on may still run on the session's cluster (Dask
    # cannot stop them): wait until they have returned, so every thread is there.
    deadline = time.monotonic() + 60
    while dask_pool._busy(dask_pool._nthreads(fresh=True)):
        assert time.monotonic() < deadline, f"tasks earlier tests gave up on still run: {dask_pool._abandoned}"
        time.sleep(0.2)
    n = DASK_WORKERS + 1
    result = run(ip, f"%pmap --scaling -n {n} lambda x: x, range(8)")
    assert [p.workers for p in result.points] == list(range(1, DASK_WORKERS + 1))
    err = capsys.readouterr().err
    assert (f"mpmagic: --scaling: stopped at {DASK_WORKERS} worker threads: the run on {n} ran on "
            f"{DASK_WORKERS} worker threads (all the pool had), so it is not shown") in err, err


def test_a_scheduler_port_that_takes_one_connection_more_as_it_dies_is_not_reachable(monkeypatch):
    """The scheduler killed mid-map: the run's result fetch failed (CommClosedError),
    and the check that tells a lost scheduler from an item's failure connected to its
    port once more, on a loaded machine, before its listening socket closed: the run
    blamed an item ("Dask could not run item 1: CommClosedError: ... Stream is
    closed"). The port is asked again before anything is blamed on an item."""
    from types import SimpleNamespace

    from mpmagic.backends import dask as dask_backend

    tries: list[tuple] = []

    def once_then_refused(address, timeout=None):
        tries.append(address)
        if len(tries) > 1:
            raise ConnectionRefusedError(111, "Connection refused")
        return SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(dask_backend.socket, "create_connection", once_then_refused)
    monkeypatch.setattr(dask_backend, "_REACH_PAUSE", 0.0, raising=False)  # (no wait between the tries)
    run_ = SimpleNamespace(client=SimpleNamespace(scheduler=SimpleNamespace(address="tcp://127.0.0.1:8786")))
    assert dask_backend._DaskRun._scheduler_reachable(run_) is False
    assert tries == [("127.0.0.1", 8786)] * 2
    tries.clear()
    monkeypatch.setattr(dask_backend.socket, "create_connection", lambda address, timeout=None: SimpleNamespace(close=lambda: None))
    assert dask_backend._DaskRun._scheduler_reachable(run_) is True  # (alive: every try connects)


def test_the_advice_on_an_item_dask_ran_again_speaks_of_dasks_retry_not_of_retries():
    """An item Dask ran again after its worker died or left (no --retries asked): the advice
    said "(--retries) ... starting a new worker", the local pool's words."""
    from conftest import synthetic_report

    from mpmagic.advice import advise

    said = advise(synthetic_report(backend="dask", retried=1, wall=2.0, task_seconds=1.0))
    assert said is not None and said.startswith(
        "1 item ran again after its worker died or left the cluster (Dask ran it again on another worker)")
    assert "--retries" not in said and "starting a new worker" not in said
    local = advise(synthetic_report(retried=1, wall=2.0, task_seconds=1.0))
    assert local is not None and local.startswith("1 item ran again after its worker died (--retries)")
