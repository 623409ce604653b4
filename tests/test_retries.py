"""``%pmap --retries N``: items whose worker died are sent again, up to N times.

Until now only the option's usage error was tested. These tests kill a
worker for real (SIGKILL, what the out-of-memory killer sends) from inside
an item, and count the attempts in files the items write, so what is
checked is what the workers did, not what the job believes it did. Mostly
chunks of one item (``--chunksize 1``); in larger chunks the item that was
running is the one charged a retry (finding it is tests/test_reliability.py's).
"""

from __future__ import annotations

import pytest
from conftest import run
from IPython.utils.capture import capture_output

import mpmagic

KILLERS = """
import os, signal, time

def dies_first_time(x):
    # Item 3 kills its worker on its first attempt only (like an OOM kill).
    if x == 3:
        with open(TRIES, "a") as f:
            f.write("x")
        if os.path.getsize(TRIES) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return x * x

def each_dies_once(x):
    # Items 2 and 6 each kill their worker on their own first attempt. (Not a
    # tiny item: a death among those first re-runs its block one at a time.)
    time.sleep(0.001)
    if x in (2, 6):
        with open(f"{TRIES}{x}", "a") as f:
            f.write("x")
        if os.path.getsize(f"{TRIES}{x}") == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return x * x

def dies_first_time_then_fails(x):
    # As dies_first_time, and item 7 raises (after item 3's worker died).
    if x == 7:
        time.sleep(0.3)
        raise ValueError("item 7")
    return dies_first_time(x)

def always_dies(x):
    # Item 2 kills every worker it runs on.
    if x == 2:
        with open(TRIES, "a") as f:
            f.write("x")
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x
"""


@pytest.fixture
def killers(ip, tmp_path):
    """The functions above, counting item attempts in a fresh file; a ready pool."""
    backend = mpmagic.get_pool()
    backend.wait_ready()
    tries = tmp_path / "tries"
    ip.user_ns["TRIES"] = str(tries)
    run(ip, KILLERS)
    return backend, tries


def attempts(path) -> int:
    return path.stat().st_size if path.exists() else 0


def test_retries_resend_the_item_whose_worker_died(ip, killers):
    backend, tries = killers
    replaced = backend.workers_replaced
    with capture_output():
        results = run(ip, "%pmap -q --chunksize 1 --retries 1 dies_first_time, range(8)")
    assert results == [x * x for x in range(8)]  # as serial Python gives them
    assert attempts(tries) == 2  # died once, then ran again and returned
    assert backend.workers_replaced > replaced  # a worker really died
    report = mpmagic.last_report()  # the lost attempt is in the wall time: the report says why
    assert report.retried == 1 and "8 items (1 retried after its worker died)" in report.line()


def test_a_failed_run_says_the_items_retried_before_it_failed(ip, killers):
    """Item 3 ran twice (its side effects too) before item 7 failed the run: the
    report said "1 retried after its worker died" of a run that succeeded, and
    nothing of one that failed (``mpmagic.last_report()``: "pmap failed at item 7 after
    7 of 8 items")."""
    _, tries = killers
    with capture_output():
        result = ip.run_cell("%pmap -q --chunksize 1 --retries 1 dies_first_time_then_fails, range(8)",
                             store_history=False)
    assert isinstance(result.error_in_exec, ValueError), result.error_in_exec
    assert attempts(tries) == 2
    report = mpmagic.last_report()
    assert report.retried == 1 and "1 retried after its worker died" in report.line(), report.line()


def test_without_retries_the_same_death_is_an_error(ip, killers):
    _, tries = killers
    with capture_output():
        result = ip.run_cell("%pmap -q --chunksize 1 dies_first_time, range(8)", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, mpmagic.WorkerLostError), err
    assert "item 3 (3)" in str(err) and "killed by SIGKILL" in str(err)
    assert attempts(tries) == 1  # not sent again


def test_retries_stop_after_n_and_name_the_item(ip, killers):
    _, tries = killers
    with capture_output():
        result = ip.run_cell("%pmap -q --chunksize 1 --retries 2 always_dies, range(5)", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, mpmagic.WorkerLostError), err
    assert "item 2 (2)" in str(err)
    assert str(err).endswith("; sent 3 times (--retries 2), its worker died each time"), err  # (said nothing of it)
    assert attempts(tries) == 3  # the first run and two retries, no more
    # With --errors collect the others' results are all there, in order.
    tries.unlink()
    with capture_output():
        results = run(ip, "%pmap -q --chunksize 1 --retries 1 --errors collect always_dies, range(5)")
    assert [r for i, r in enumerate(results) if i != 2] == [0, 1, 9, 16]
    assert isinstance(results[2], mpmagic.Failed) and isinstance(results[2].error, mpmagic.WorkerLostError)
    assert attempts(tries) == 2


def test_an_item_that_keeps_killing_its_worker_is_said_once_as_retries_go_on(ip, killers):
    """``--retries 1000000`` on such an item ran for hours without a word: it looked like a hang."""
    from mpmagic.jobs import SAY_RETRIES_AT

    n = SAY_RETRIES_AT + 1
    with capture_output() as cap:
        err = ip.run_cell(f"%pmap -q --chunksize 1 --retries {n} always_dies, range(3)", store_history=False).error_in_exec
    said = [line for line in cap.stderr.splitlines() if "more time" in line]
    assert said == [f"mpmagic: the worker running item 2 (2) died {SAY_RETRIES_AT} times; --retries {n} sends it "
                    "again up to 1 more time (interrupt to stop)"], cap.stderr
    assert isinstance(err, mpmagic.WorkerLostError) and f"sent {n + 1} times (--retries {n})" in str(err)


@pytest.mark.parametrize("chunking", ["--chunksize 8", "--chunksize 3", ""])
def test_retries_count_per_item_not_per_chunk(ip, killers, chunking):
    """Two items of one chunk each kill their worker once: with --retries 1 each
    has its retry (the chunk's one retry went to the first death, and the
    second failed the run). The chunk's other items are not charged."""
    _, tries = killers
    tries2, tries6 = (tries.with_name(tries.name + str(x)) for x in (2, 6))
    for flags in ("", "--errors collect"):
        tries2.unlink(missing_ok=True)
        tries6.unlink(missing_ok=True)
        with capture_output():
            results = run(ip, f"%pmap -q {chunking} --retries 1 {flags} each_dies_once, range(8)")
        assert results == [x * x for x in range(8)]
        assert (attempts(tries2), attempts(tries6)) == (2, 2)
        assert mpmagic.last_report().retried == 2  # the two items that died, not their chunk


def test_retries_per_item_still_stop_after_n_in_a_chunk(ip, killers):
    _, tries = killers
    with capture_output():
        result = ip.run_cell("%pmap -q --chunksize 5 --retries 1 always_dies, range(5)", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, mpmagic.WorkerLostError), err
    assert "item 2 (2)" in str(err)
    assert attempts(tries) == 2  # the first run and one retry, as with chunks of one item


def test_retries_through_the_api(ip, killers):
    _, tries = killers
    func = ip.user_ns["dies_first_time"]  # defined in the notebook-like shell
    assert mpmagic.pmap(func, range(8), chunksize=1, retries=1) == [x * x for x in range(8)]
    assert attempts(tries) == 2


def test_a_timeout_is_not_retried_and_says_so(local_pool):
    """An item past --timeout would run past it again: it is not retried. With
    --retries given, the error says why it was not (it read as a bug)."""
    import time

    with pytest.raises(mpmagic.TaskTimeoutError, match="not items past the timeout"):
        mpmagic.pmap(time.sleep, [5], timeout=0.3, retries=2)
    with pytest.raises(mpmagic.TaskTimeoutError) as plain:
        mpmagic.pmap(time.sleep, [5], timeout=0.3)
    assert "--retries" not in str(plain.value)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", None, True])
@pytest.mark.parametrize("entry", ["pmap", "submit", "imap"])
def test_api_retries_are_checked_before_anything_runs(entry, bad):
    """As ``%pmap --retries -1`` is: unchecked, a bad value reached the pool's
    manager only when a worker died, and its TypeError replaced the results."""
    with pytest.raises(mpmagic.UsageError, match=r"retries must be a whole number of 0 or more, not "):
        getattr(mpmagic, entry)(abs, [-1], retries=bad)


def test_a_death_mid_chunk_keeps_the_known_errors_and_says_what_ran_again(tmp_path, monkeypatch):
    """With no retries, a worker dying at item 2 of a 4-item chunk sent items 0-1 out
    again silently: item 1's RuntimeError (its only run) came back as a success. The
    oracle is serial ``map``: items 1 and 2 fail (item 2 by ending its process), each
    item runs once; the chunk's item 0, whose result died with the worker, runs
    again and the report says so."""
    import os

    log = tmp_path / "calls"

    def f(x, kill=os._exit):
        with open(log, "a") as fh:
            fh.write(f"{x}\n")
        mark = tmp_path / f"m{x}"
        if x in (1, 2) and not mark.exists():
            mark.touch()
            if x == 2:
                kill(1)
            raise RuntimeError(f"item {x} failed")
        return x * 10

    def serial_kill(code):
        raise SystemExit(code)

    oracle = []
    for i in range(4):
        try:
            f(i, serial_kill)
        except BaseException:
            oracle.append(i)
    for p in [log, *tmp_path.glob("m*")]:
        p.unlink()
    from mpmagic import chunking

    timed: list[float] = []  # what the chunk planner learned: only runs that were timed
    learn = chunking.ChunkPlanner.record
    monkeypatch.setattr(chunking.ChunkPlanner, "record",
                        lambda self, n, seconds: (timed.append(seconds), learn(self, n, seconds))[1])
    results = mpmagic.pmap(f, range(4), chunksize=4, workers=2, errors="collect")
    assert timed and 0.0 not in timed  # (an error known without a timed run taught it "items cost nothing")
    failed = [r for r in results if isinstance(r, mpmagic.Failed)]
    assert [r.index for r in failed] == oracle == [1, 2]
    assert isinstance(failed[0].error, RuntimeError) and isinstance(failed[1].error, mpmagic.WorkerLostError)
    assert [results[0], results[3]] == [0, 30]
    calls = [int(x) for x in log.read_text().split()]
    assert sorted(calls) == [0, 0, 1, 2, 3]  # (item 0 twice: its result died with the worker)
    report = mpmagic.last_report()
    assert report.ran_again == (0,)
    assert report.line().endswith("| item 0 ran again: its worker died before sending its results"), report.line()


def test_items_run_again_after_a_timeout_stop_say_the_worker_was_stopped_not_that_it_died():
    """The report line said "its worker died" for items whose worker --timeout stopped."""
    import time

    def f(x):
        if x == 1:
            time.sleep(10)
        return x

    results = mpmagic.pmap(f, range(3), chunksize=3, workers=2, errors="collect", timeout=0.3)
    assert [results[0], results[2]] == [0, 2] and isinstance(results[1].error, mpmagic.TaskTimeoutError)
    line = mpmagic.last_report().line()
    assert line.endswith("| item 0 ran again: its worker was stopped at --timeout before sending its results"), line
