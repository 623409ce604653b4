"""Background runs with checkpoints (issue 17's last gap): ``%pmap --bg --checkpoint``,
``submit(..., checkpoint=True)``, ``imap(..., checkpoint=True)``, ``%%parallel --bg --checkpoint``.

Functions are defined with ``ip.run_cell`` (no file, as in a notebook) and
append every item they compute to a file, so a test knows which items really
ran; serial ``map`` is the oracle for the values. Every store lives in a tmp
dir (``%config MPMagic.checkpoint_dir``).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
from conftest import ensure_pool, run, trickle_results
from test_checkpoint import EDIT_DEFS, module_to_edit

import mpmagic
from mpmagic import api, checkpoint
from mpmagic.checkpoint_keys import item_key, run_key
from mpmagic.checkpoint_store import Store

DEFS = """
import time
OFFSET = 0
def work(x):
    with open(RECORD, 'a') as f:
        f.write(f'{x}\\n')
    return x * x + OFFSET
def slow(x):
    with open(RECORD, 'a') as f:
        f.write(f'{x}\\n')
    time.sleep(0.03)
    return -x
FAIL_NOW = (3, 5)
def flaky(x):
    with open(RECORD, 'a') as f:
        f.write(f'{x}\\n')
    if x in FAIL_NOW:
        raise ValueError(f'bad {x}')
    return -x
"""


@pytest.fixture
def ns(ip, tmp_path):
    """A fresh checkpoint folder, the recording functions, a forkserver pool of 2."""
    ensure_pool("forkserver")
    folder = tmp_path / "ckpt"
    run(ip, f"%config MPMagic.checkpoint_dir = {str(folder)!r}")
    run(ip, f"RECORD = {str(tmp_path / 'calls.txt')!r}\n" + DEFS)
    ip.user_ns["FOLDER"] = folder
    yield ip.user_ns
    for r in mpmagic.runs():
        r.cancel()
    checkpoint.close_stores()


def calls(ns) -> list[int]:
    """The items computed since the last call (sorted), and forget them."""
    path = Path(ns["RECORD"])
    if not path.exists():
        return []
    out = sorted(int(line) for line in path.read_text().split())
    path.unlink()
    return out


def stored(ns, func_name: str, items) -> set:
    """Which of ``items`` the store holds for ``func_name`` as it is defined now."""
    store = Store(ns["FOLDER"])
    try:
        run_id = run_key(ns[func_name], False)[0]
        keys = {item_key(x)[0]: x for x in items}
        return {keys[k] for k in store.load(run_id, list(keys))}
    finally:
        store.close()


# --------------------------------------------------------------------------
# %pmap --bg --checkpoint


def test_a_background_run_stores_and_a_foreground_rerun_computes_nothing(ip, ns):
    handle = run(ip, "%pmap --bg --checkpoint work, range(30)")
    assert isinstance(handle, mpmagic.Run)
    assert handle.result(60) == [x * x for x in range(30)]
    assert calls(ns) == list(range(30))
    assert "resumed: 0 of 30 items from the checkpoint, 30 computed" in handle.report().line()
    assert run(ip, "%pmap -q --checkpoint work, range(30)") == [x * x for x in range(30)]
    assert calls(ns) == []  # every result was stored by the time result() returned
    assert "resumed: 30 of 30 items from the checkpoint, 0 computed" in api.last_report().line()


def test_a_foreground_partial_run_is_resumed_in_the_background(ip, ns):
    run(ip, "%pmap -q --checkpoint work, range(20)")
    calls(ns)
    handle = run(ip, "%pmap --bg --checkpoint work, range(30)")
    assert handle.result(60) == list(map(lambda x: x * x, range(30)))
    assert calls(ns) == list(range(20, 30))
    assert handle.items_done == handle.items_total == 30 and handle.items_resumed == 20
    assert "30/30 items (20 from the checkpoint)" in handle.status_line()
    # %pool runs and runs() say it too (they left it out: "run 1: pmap work, 30/30 items, ...")
    listing = run(ip, "%pool runs")
    assert f"  {handle.status_line()}" in repr(listing).splitlines()
    assert "<td style='" in listing._repr_html_() and ">30/30 (20 from the checkpoint)</td>" in listing._repr_html_()
    assert repr(mpmagic.runs()).splitlines()[-1] == f"  {handle.status_line()}"
    assert mpmagic.runs().rows()[-1]["resumed"] == 20
    line = handle.report().line()
    assert "resumed: 20 of 30 items from the checkpoint, 10 computed" in line and "30 items" in line
    # The live area (text and HTML) says it too, once the run ended.
    bundle = handle._sink.bundle()
    assert "resumed: 20 of 30 items from the checkpoint" in bundle["text/plain"]
    assert "20 of 30 items from the checkpoint, 10 computed" in bundle["text/html"]


def test_a_background_run_whose_items_are_all_stored_is_done_at_once(ip, ns):
    mpmagic.pmap(ns["work"], range(12), checkpoint=True)
    calls(ns)
    run(ip, "%config MPMagic.checkpoint = True")  # the default, with --bg
    mpmagic.stop_pool()
    handle = run(ip, "%pmap --bg work, range(12)")
    assert handle.done() and handle.state == "done"  # no waiting: nothing ran
    assert not mpmagic.get_pool().running  # not even the pool was started
    assert handle.result(0) == [x * x for x in range(12)]
    assert list(mpmagic.as_completed(handle)) == [x * x for x in range(12)]
    assert "resumed: 12 of 12 items from the checkpoint, 0 computed" in handle.report().line()
    assert handle in mpmagic.runs() and "12/12 items (12 from the checkpoint)" in repr(handle)
    assert calls(ns) == []


def test_cancelling_keeps_what_finished_and_a_rerun_computes_only_the_rest(ns):
    accepted: list[int] = []  # input positions whose results the notebook accepted (so stored)
    handle = mpmagic.submit(ns["slow"], range(60), chunksize=1, checkpoint=True,
                            on_chunk=lambda start, results: accepted.extend(range(start, start + len(results))))
    deadline = time.monotonic() + 60
    # (accepted, not just done: a cancel drops the on_chunk calls still queued, so an item
    # done but not yet accepted is not stored; waiting on items_done failed 1 run in ~10)
    while len(accepted) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.cancel()
    with pytest.raises(CancelledError):
        handle.result(10)
    kept = set(accepted)
    assert 6 <= len(kept) < 60
    assert stored(ns, "slow", range(60)) == kept  # stored by the time the handle says cancelled
    calls(ns)
    again = mpmagic.submit(ns["slow"], range(60), checkpoint=True)
    assert again.result(60) == [-x for x in range(60)]
    assert calls(ns) == sorted(set(range(60)) - kept)
    assert again.items_resumed == len(kept)


def test_a_cancelled_checkpointed_run_settles_as_cancelled_not_as_an_internal_error(ns):
    """Its thread put the partial results together as if the run had finished:
    IndexError inside the checkpoint, and the live area said "IndexError: list
    index out of range (run.result() raises it)" while result() raised CancelledError."""
    handle = mpmagic.submit(ns["slow"], range(60), chunksize=1, checkpoint=True)
    deadline = time.monotonic() + 30
    while handle.items_done < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.cancel()
    with pytest.raises(CancelledError):  # (as concurrent.futures.Future.exception)
        handle.exception(10)
    assert handle._error is None
    assert handle.state == "cancelled" and handle.report() is None
    assert "Error" not in handle._sink.bundle()["text/plain"]
    assert len(stored(ns, "slow", range(60))) >= 4  # what finished is kept


def test_collected_failures_are_not_stored_and_a_background_rerun_retries_them(ip, ns):
    res = run(ip, "%pmap --bg --checkpoint --errors collect flaky, range(8)").result(60)
    assert [i for i, r in enumerate(res) if isinstance(r, mpmagic.Failed)] == [3, 5]
    assert calls(ns) == list(range(8))
    res = run(ip, "%pmap --bg --checkpoint --errors collect flaky, range(8)").result(60)
    assert calls(ns) == [3, 5]  # only the failures ran again
    assert res[3].index == 3 and res[5].index == 5  # places in the whole input, not in the re-run
    assert "item 5 of the input" in " ".join(res[5].error.__notes__)
    assert [r for i, r in enumerate(res) if i not in (3, 5)] == [0, -1, -2, -4, -6, -7]
    run(ip, "FAIL_NOW = ()")  # fixed: a new key, so everything computes once more
    assert run(ip, "%pmap --bg --checkpoint flaky, range(8)").result(60) == [-x for x in range(8)]


def test_an_error_of_a_resumed_background_run_names_its_place_in_the_whole_input(ns):
    mpmagic.pmap(ns["flaky"], [0, 1, 2], checkpoint=True)
    handle = mpmagic.submit(ns["flaky"], range(8), checkpoint=True)  # computes 3..7: 5 is its 3rd
    with pytest.raises(ValueError, match="bad 3") as info:
        handle.result(60)
    assert "item 3 of the input" in " ".join(info.value.__notes__)
    with pytest.raises(ValueError) as serial:
        list(map(ns["flaky"], range(8)))
    assert str(serial.value) == str(info.value)


def test_a_failing_background_run_keeps_what_finished_and_the_fixed_rerun_computes_the_rest(ip, ns, tmp_path):
    switch = tmp_path / "broken"
    switch.touch()
    run(ip, f"import os\nBROKEN = {str(switch)!r}\n"
            "def boom(x):\n"
            "    with open(RECORD, 'a') as f:\n"
            "        f.write(f'{x}\\n')\n"
            "    if x == 19 and os.path.exists(BROKEN):\n"
            "        raise KeyError(x)\n"
            "    return x\n")
    with pytest.raises(KeyError):
        run(ip, "%pmap --bg --checkpoint --chunksize 5 -n 1 boom, range(20)").result(60)
    assert calls(ns) == list(range(20))
    switch.unlink()  # fixed, and the key is the same (the function and what it captures did not change)
    assert run(ip, "%pmap --bg --checkpoint boom, range(20)").result(60) == list(range(20))
    assert calls(ns) == [19]  # chunks 0-14 were stored before the failure, and 15-18, which ran before 19 failed


def test_bg_checkpoint_with_a_seed_resumes_the_seeded_results(ip, ns):
    run(ip, "import random\ndef draw(x):\n"
            "    with open(RECORD, 'a') as f:\n"
            "        f.write(f'{x}\\n')\n"
            "    return x + random.random()\n")
    want = run(ip, "%pmap -q --seed 7 draw, range(10)")  # no checkpoint: the oracle for seeded values
    calls(ns)
    assert run(ip, "%pmap --bg --checkpoint --seed 7 draw, range(6)").result(60) == want[:6]
    assert calls(ns) == list(range(6))
    assert run(ip, "%pmap --bg --checkpoint --seed 7 draw, range(10)").result(60) == want
    assert calls(ns) == [6, 7, 8, 9]


def test_a_changed_captured_global_recomputes_in_the_background(ip, ns):
    run(ip, "%pmap --bg --checkpoint work, range(10)").result(60)
    calls(ns)
    run(ip, "OFFSET = 7")
    assert run(ip, "%pmap --bg --checkpoint work, range(10)").result(60) == [x * x + 7 for x in range(10)]
    assert calls(ns) == list(range(10))
    run(ip, "OFFSET = 0")  # back: the first run's results are found again
    handle = run(ip, "%pmap --bg --checkpoint work, range(10)")
    assert handle.done() and handle.result() == [x * x for x in range(10)] and calls(ns) == []


def test_lazy_input_in_the_background_and_on_chunk_sees_every_position_once(ns):
    mpmagic.pmap(ns["work"], range(0, 1500, 2), checkpoint=True)  # the even items stored
    calls(ns)
    seen: list[tuple[int, list]] = []
    handle = mpmagic.submit(ns["work"], (x for x in range(1500)), checkpoint=True,
                            on_chunk=lambda start, results: seen.append((start, list(results))))
    assert handle.result(60) == [x * x for x in range(1500)]
    assert calls(ns) == list(range(1, 1500, 2))
    assert handle.items_resumed == 750 and handle.items_done == 1500
    positions = [start + i for start, results in seen for i in range(len(results))]
    assert sorted(positions) == list(range(1500))  # each once
    assert all(r == (start + i) ** 2 for start, results in seen for i, r in enumerate(results))


# --------------------------------------------------------------------------
# streaming: as_completed and imap yield the stored items too


def test_as_completed_yields_stored_and_computed_results_once(ns):
    mpmagic.pmap(ns["work"], range(0, 40, 3), checkpoint=True)
    calls(ns)
    handle = mpmagic.submit(ns["work"], range(40), chunksize=3, checkpoint=True)
    got = list(mpmagic.as_completed(handle))
    assert Counter(got) == Counter(x * x for x in range(40))
    assert got[:14] == [x * x for x in range(0, 40, 3)]  # stored ones first: they are done
    assert calls(ns) == [x for x in range(40) if x % 3]


@pytest.mark.parametrize("ordered", [True, False])
def test_imap_yields_stored_items_in_its_order_and_computes_only_the_rest(ns, ordered):
    mpmagic.pmap(ns["work"], [0, 1, 5, 6, 7, 20, 38, 39], checkpoint=True)
    calls(ns)
    got = list(mpmagic.imap(ns["work"], range(40), ordered=ordered, chunksize=3, checkpoint=True))
    want = [x * x for x in range(40)]
    if ordered:
        assert got == want
    else:
        assert Counter(got) == Counter(want)
        assert sorted(got[:8]) == sorted(x * x for x in [0, 1, 5, 6, 7, 20, 38, 39])  # first: done already
    assert calls(ns) == [x for x in range(40) if x not in (0, 1, 5, 6, 7, 20, 38, 39)]
    assert list(mpmagic.imap(ns["work"], range(40), ordered=ordered, checkpoint=True)) in (want, got)
    assert calls(ns) == []  # all stored now: nothing ran
    assert mpmagic.runs()[-1].items_resumed == 40


def test_an_ordered_imap_failure_yields_stored_items_only_up_to_the_failing_one(ns):
    mpmagic.pmap(ns["flaky"], [0, 1, 2, 6, 7], checkpoint=True)
    got = []
    with pytest.raises(ValueError, match="bad 3"):
        for value in mpmagic.imap(ns["flaky"], range(8), chunksize=1, checkpoint=True):
            got.append(value)
    assert got == [0, -1, -2]  # as serial map: nothing after item 3, not even stored 6 and 7


@pytest.mark.parametrize("ordered", [True, False])
def test_a_checkpointed_imap_loop_goes_on_past_an_items_error_and_stores_every_other_result(ns, ordered):
    """As without a checkpoint, the loop that catches an item's error gets the later
    results (stored ones among them); the failed items are not stored, so the same
    call again computes only them."""
    mpmagic.pmap(ns["flaky"], [0, 1, 2, 6, 7], checkpoint=True)
    calls(ns)

    def drain(it) -> list:
        out: list = []
        while True:
            try:
                out.append(next(it))
            except StopIteration:
                return out
            except ValueError as exc:
                out.append(str(exc))

    serial = drain(map(ns["flaky"], range(10)))
    calls(ns)
    got = drain(iter(mpmagic.imap(ns["flaky"], range(10), ordered=ordered, chunksize=2, checkpoint=True)))
    assert got == serial if ordered else Counter(got) == Counter(serial)
    assert calls(ns) == [3, 4, 5, 8, 9]
    assert stored(ns, "flaky", range(10)) == set(range(10)) - {3, 5}
    again = drain(iter(mpmagic.imap(ns["flaky"], range(10), ordered=ordered, checkpoint=True)))
    assert again == serial if ordered else Counter(again) == Counter(serial)
    assert calls(ns) == [3, 5]


def test_breaking_out_of_a_checkpointed_imap_keeps_what_it_got(ns):
    for i, _value in enumerate(mpmagic.imap(ns["slow"], range(40), chunksize=1, checkpoint=True)):
        if i == 4:
            break
    handle = mpmagic.runs()[-1]
    assert handle.wait(10) and handle.state == "cancelled"
    assert set(range(5)) <= stored(ns, "slow", range(40))


# --------------------------------------------------------------------------
# %%parallel --bg --checkpoint


def test_parallel_bg_checkpoint_keeps_the_ranks_values(ip, ns):
    cell = "with open(RECORD, 'a') as f:\n    f.write(f'{rank}\\n')\nrank * 10 + OFFSET\n"
    handle = ip.run_cell_magic("parallel", "--bg --checkpoint -n 2", cell)
    assert list(handle.result(60)) == [0, 10]
    assert calls(ns) == [0, 1]
    again = ip.run_cell_magic("parallel", "--bg --checkpoint -n 2", cell)
    assert again.done() and list(again.result()) == [0, 10] and calls(ns) == []
    assert "resumed: 2 of 2 ranks from the checkpoint" in again.report().line()
    assert list(ip.run_cell_magic("parallel", "-q --checkpoint -n 2", cell)) == [0, 10]  # foreground too
    assert calls(ns) == []
    run(ip, "OFFSET = 1")
    assert list(ip.run_cell_magic("parallel", "--bg --checkpoint -n 2", cell).result(60)) == [1, 11]
    assert calls(ns) == [0, 1]
    failing = mpmagic.parallel("1 / rank", workers=2, block=False, checkpoint=True)
    with pytest.raises(mpmagic.ParallelError):
        failing.result(60)
    with pytest.raises(mpmagic.ParallelError):  # a failed cell stored nothing: it runs again
        mpmagic.parallel("1 / rank", workers=2, block=False, checkpoint=True).result(60)


# --------------------------------------------------------------------------
# threads and processes writing one store


def test_the_size_cap_never_evicts_a_background_run_still_being_written(ip, ns):
    handle = mpmagic.submit(ns["slow"], range(30), chunksize=1, workers=1, checkpoint=True)
    deadline = time.monotonic() + 60
    while handle.items_done < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # (the writer thread commits those chunks)
    run(ip, "%config MPMagic.checkpoint_max_bytes = 100")
    mpmagic.pmap(ns["work"], range(5), checkpoint=True)  # over the cap: evicts, but not `slow`
    assert handle.result(60) == [-x for x in range(30)]
    calls(ns)
    assert mpmagic.submit(ns["slow"], range(30), checkpoint=True).result(60) == [-x for x in range(30)]
    assert calls(ns) == []


def _write_rows(folder: str, n: int, ready) -> None:
    store = Store(folder)
    ready.set()
    for start in range(0, n, 10):  # one transaction per 10 rows, as a kernel's writer does per chunk
        store.put(b"o" * 16, "other", [(i.to_bytes(16, "big"), i) for i in range(start, start + 10)])
    store.close()


def test_another_process_writing_the_store_while_a_background_run_does_loses_nothing(ns):
    # Two kernels on one store: this one's writer thread and another process commit at once.
    folder = ns["FOLDER"]
    Store(folder).close()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    other = ctx.Process(target=_write_rows, args=(str(folder), 3000, ready))
    other.start()
    assert ready.wait(60)
    handle = mpmagic.submit(ns["work"], range(300), chunksize=1, checkpoint=True)  # 300 transactions
    assert handle.result(60) == [x * x for x in range(300)]
    other.join(60)
    assert other.exitcode == 0
    assert len(stored(ns, "work", range(300))) == 300
    store = Store(folder)
    assert len(store.load(b"o" * 16, [i.to_bytes(16, "big") for i in range(3000)])) == 3000
    store.close()


def test_a_background_runs_wait_for_the_store_is_said_in_its_live_area_not_the_cell_running_then(
        ns, monkeypatch, capfd):
    """The line saying a run waits for another process holding the store came from the
    writer thread's ``sys.stderr``: for a ``--bg`` run, in whichever cell ran then
    (a later ``print``'s, in a real kernel), and not in the run's live area nor its
    ``output``. It goes where the run's other lines go."""
    import sqlite3

    from mpmagic import checkpoint_store
    from mpmagic.checkpoint_store import DB_NAME

    monkeypatch.setattr(checkpoint_store, "_SAY_WAITING", 0.1)
    folder = ns["FOLDER"]
    mpmagic.pmap(abs, [1], checkpoint=True)  # (the store is open)
    line = f"mpmagic: waiting for the checkpoint store {folder}, in use by another process…"
    other = sqlite3.connect(folder / DB_NAME, isolation_level=None)  # (another kernel's long write)
    other.execute("BEGIN EXCLUSIVE")
    err = ""
    try:
        handle = mpmagic.submit(ns["work"], range(2), checkpoint=True)
        deadline = time.monotonic() + 30
        while line not in handle.output + err and time.monotonic() < deadline:  # (the write waits: said)
            time.sleep(0.02)
            err += capfd.readouterr().err
    finally:
        other.execute("COMMIT")
        other.close()
    assert handle.result(30) == [0, 1]
    assert line not in err + capfd.readouterr().err
    assert handle.output.count(line) == 1


def test_an_unpicklable_function_with_bg_checkpoint_fails_as_without_checkpoint(ip, ns):
    run(ip, "import threading\nLOCK = threading.Lock()\ndef locked(x):\n    with LOCK:\n        return x\n")
    errors = []
    for flag in (True, False):
        try:
            mpmagic.submit(ns["locked"], range(3), checkpoint=flag).result(60)
        except Exception as exc:
            errors.append((type(exc), str(exc)))
    assert len(errors) == 2 and errors[0] == errors[1]


def test_on_dask_a_background_run_stores_on_the_notebook_side_and_a_rerun_is_done_at_once(
        ip, ns, dask_cluster, request):
    ensure_pool("dask", request)
    try:
        handle = mpmagic.submit(ns["work"], range(12), checkpoint=True, chunksize=2)
        assert handle.result(60) == [x * x for x in range(12)]
        assert calls(ns) == list(range(12))  # the record file is shared: same machine
        again = mpmagic.submit(ns["work"], range(16), checkpoint=True)
        assert again.result(60) == [x * x for x in range(16)]
        assert calls(ns) == [12, 13, 14, 15] and again.items_resumed == 12
        assert mpmagic.submit(ns["work"], range(16), checkpoint=True).done()
    finally:
        from mpmagic import pool as pool_module

        pool_module.shutdown()


def test_a_killed_kernels_background_run_resumes_in_a_new_kernel(tmp_path):
    # The kernel is idle (the --bg cell returned at once) while the run goes on; SIGKILL it
    # half way: a new kernel's --bg run computes only what was not stored.
    pytest.importorskip("jupyter_client")
    from test_checkpoint_kernel import _calls, _killed_half_way, _setup
    from test_kernel import Kernel

    n = 120
    folder, record = tmp_path / "ckpt", tmp_path / "calls.txt"
    cell = f"h = %pmap --bg --checkpoint --chunksize 5 work, range({n})"
    first = _killed_half_way(folder, record, n, lambda k: k.ok(cell))
    k2 = Kernel()
    try:
        _setup(k2, folder, record)
        k2.ok(cell)
        assert k2.value(f"h.result(120) == [x * x for x in range({n})]") is True
        second = _calls(record)
        assert set(first) | set(second) == set(range(n)) and len(second) == len(set(second))
        assert len(set(first) & set(second)) <= 30  # only what was in flight at the kill runs again
        resumed = n - len(second)
        line = k2.value("h.report().line()")
        assert f"resumed: {resumed} of {n} items from the checkpoint, {len(second)} computed" in line
    finally:
        k2.close()


# --------------------------------------------------------------------------
# what a stream's consumer does with its results (tester's findings)


def test_results_changed_in_an_imap_loop_are_stored_as_the_worker_returned_them(ip, ns):
    run(ip, "def box(x):\n    return [x]\n")
    for value in mpmagic.imap(ns["box"], range(40), chunksize=2, checkpoint=True):
        value.append("seen")  # the consumer's own object: normal code
    assert mpmagic.pmap(ns["box"], range(40), checkpoint=True) == [[x] for x in range(40)]
    assert "resumed: 40 of 40" in api.last_report().line()


def test_results_changed_in_an_as_completed_loop_are_stored_as_the_worker_returned_them(ip, ns):
    """as_completed got each chunk before the checkpoint's snapshot of it: a loop
    changing its results in place changed what was stored (159 of 300)."""
    run(ip, "def box2(x):\n    return [x]\n")
    handle = mpmagic.submit(ns["box2"], range(40), chunksize=2, checkpoint=True)
    for value in mpmagic.as_completed(handle):
        value.append("seen")
    assert mpmagic.pmap(ns["box2"], range(40), checkpoint=True) == [[x] for x in range(40)]
    assert "resumed: 40 of 40" in api.last_report().line()


@pytest.mark.parametrize("ordered", [True, False])
def test_a_checkpointed_imaps_failures_name_their_place_in_the_whole_input(ns, ordered):
    mpmagic.pmap(ns["flaky"], [0, 1, 2, 4], checkpoint=True)
    got = list(mpmagic.imap(ns["flaky"], range(8), ordered=ordered, errors="collect", checkpoint=True))
    failed = sorted((r.index, r.item) for r in got if isinstance(r, mpmagic.Failed))
    assert failed == [(3, 3), (5, 5)]  # as without a checkpoint, not 0 and 2 (among the computed items)


def test_a_checkpointed_imap_over_an_input_that_trickles_in_gives_results_as_it_comes(ns, tmp_path):
    """With a checkpoint a lazy input was read 512 items at a time, before
    anything ran, to look the items up: 40 items every 0.1 s gave their first
    result after 4 s (0.11 s without a checkpoint)."""
    got, put_at_first = trickle_results(lambda items: mpmagic.imap(ns["work"], items, checkpoint=tmp_path))
    assert got == [i * i for i in range(8)]
    assert put_at_first is not None and put_at_first < 8, put_at_first


@pytest.mark.parametrize("how", ["submit", "imap"])
def test_items_changed_in_place_after_the_start_are_computed_and_stored_as_they_were_keyed(ip, ns, how):
    """A background run keyed its items when it started and pickled them when
    each was sent: a dict the notebook changed in between was computed in its
    new state and stored under the key of the old one, for good (a re-run over
    the original items got 9990 where map gives 390)."""
    import numpy as np

    run(ip, "def tens(d):\n    time.sleep(0.01)\n    v = d['v']\n    return int(v if isinstance(v, int) else v[0]) * 10\n")
    items = [{"v": i} for i in range(30)] + [{"v": np.full(3, i)} for i in range(30, 40)]
    oracle = list(map(ns["tens"], [{"v": i} for i in range(40)]))
    if how == "submit":
        handle = mpmagic.submit(ns["tens"], items, chunksize=1, checkpoint=True)
    else:
        stream = mpmagic.imap(ns["tens"], items, chunksize=1, checkpoint=True)
        first = next(stream)
    for d in items[5:30]:
        d["v"] = 999  # the notebook goes on with its data
    for d in items[30:]:
        d["v"][:] = 999  # an array, in place
    got = handle.result() if how == "submit" else [first, *stream]
    assert got == oracle  # the items as they were at the start (keyed then)
    fresh = [{"v": i} for i in range(40)]
    assert mpmagic.pmap(ns["tens"], fresh, checkpoint=True) == list(map(ns["tens"], fresh))


def _raises_at(n: int):
    """0, 1, ... then the input's own error at item ``n``."""
    yield from range(n)
    raise KeyError(f"input broke at {n}")


@pytest.mark.parametrize("how", ["pmap", "submit", "imap", "imap unordered", "as_completed"])
def test_a_checkpointed_input_that_raises_gives_every_item_before_its_error(ns, how):
    """The batch of 512 items being read when the input raised was dropped: read
    from the generator, never computed, yielded or stored (2560 of 3000)."""
    work, got = ns["work"], []
    with pytest.raises(KeyError, match="input broke at 1000"):
        if how == "pmap":
            mpmagic.pmap(work, _raises_at(1000), checkpoint=True)
        elif how == "submit":
            mpmagic.submit(work, _raises_at(1000), checkpoint=True).result()
        elif how == "as_completed":
            for value in mpmagic.as_completed(mpmagic.submit(work, _raises_at(1000), checkpoint=True)):
                got.append(value)
        else:
            for value in mpmagic.imap(work, _raises_at(1000), ordered=how == "imap", checkpoint=True):
                got.append(value)
    oracle = list(map(work, range(1000)))
    if how not in ("pmap", "submit"):
        assert sorted(got) == sorted(oracle)  # as serial map gives them, then its error
    calls(ns)
    assert mpmagic.pmap(work, range(1000), checkpoint=True) == oracle
    assert calls(ns) == []  # every one was stored


@pytest.mark.parametrize("how", ["imap", "as_completed"])
def test_a_checkpointed_input_raising_systemexit_gives_and_stores_every_item_before_it(ns, how):
    """A SystemExit from the input, read in the run's own thread, is its own error as a
    KeyError is: it escaped the checkpoint's reading and ended the run at once, so the
    loop got none of the items before it (nor were they stored)."""
    def until_20():
        yield from range(20)
        raise SystemExit(4)

    work, got = ns["work"], []
    with pytest.raises(SystemExit):
        if how == "imap":
            for value in mpmagic.imap(work, until_20(), checkpoint=True):
                got.append(value)
        else:
            for value in mpmagic.as_completed(mpmagic.submit(work, until_20(), checkpoint=True)):
                got.append(value)
    oracle = list(map(work, range(20)))
    assert sorted(got) == sorted(oracle)  # as serial map gives them, then its SystemExit
    calls(ns)
    assert mpmagic.pmap(work, range(20), checkpoint=True) == oracle
    assert calls(ns) == []  # every one was stored


def _gated(prefix: range, tail: range, gate):
    """``prefix``, then ``tail`` once ``gate`` is set (an input the notebook feeds later)."""
    yield from prefix
    gate.wait()
    yield from tail


@pytest.mark.parametrize("how", ["submit", "imap"])
@pytest.mark.parametrize("stored", [0, 600])
def test_a_checkpointed_background_run_or_stream_comes_back_at_once_whatever_its_input_waits_for(
        ns, how, stored):
    """The input was read up to its first item not yet stored before the call
    returned: a slow first item held the notebook, and one the notebook itself
    would feed after the start was a deadlock (also after 600 stored items)."""
    import threading

    work = ns["work"]
    if stored:
        mpmagic.pmap(work, range(stored), checkpoint=True)
    gate, rescued = threading.Event(), threading.Event()

    def rescue() -> None:  # (only so that a failing test ends)
        rescued.set()
        gate.set()

    timer = threading.Timer(60, rescue)
    timer.start()
    try:
        items = _gated(range(stored), range(stored, stored + 20), gate)
        handle = mpmagic.submit(work, items, checkpoint=True) if how == "submit" else mpmagic.imap(
            work, items, checkpoint=True)
        came_back_first = not rescued.is_set()
        gate.set()  # the notebook feeds it now
        got = handle.result(timeout=60) if how == "submit" else list(handle)
    finally:
        timer.cancel()
    assert came_back_first
    assert got == list(map(work, range(stored + 20)))


def test_equal_items_and_two_copies_of_one_call_running_at_once_store_each_result_once(ns):
    """Each computed copy was stored: [7] * 20 showed 20 items in %pool checkpoints,
    two copies of a 50-item call running at once 100 (size and eviction inflated)."""
    assert mpmagic.pmap(ns["work"], [7] * 20, checkpoint=True) == [49] * 20
    assert [(r.name, r.items) for r in checkpoint.list_runs()] == [("work", 1)]
    first = mpmagic.submit(ns["slow"], range(50), checkpoint=True)
    second = mpmagic.submit(ns["slow"], range(50), checkpoint=True)
    assert first.result() == second.result() == [-x for x in range(50)]
    assert sorted((r.name, r.items) for r in checkpoint.list_runs()) == [("slow", 50), ("work", 1)]


def test_two_copies_of_one_call_running_at_once_into_two_folders_each_store_every_result(ns, tmp_path):
    """The items one copy had stored were left out of the other's store: the second
    folder kept none of them, and a re-run there computed them all again."""
    other = tmp_path / "other"
    first = mpmagic.submit(ns["slow"], range(50), checkpoint=True)
    second = mpmagic.submit(ns["slow"], range(50), checkpoint=other)
    assert first.result() == second.result() == [-x for x in range(50)]
    calls(ns)
    assert mpmagic.pmap(ns["slow"], range(50), checkpoint=other) == [-x for x in range(50)]
    assert mpmagic.pmap(ns["slow"], range(50), checkpoint=True) == [-x for x in range(50)]
    assert calls(ns) == []


def test_a_cancelled_runs_straggling_chunk_leaves_its_items_to_a_copy_of_the_call_in_flight(ns):
    """A chunk that reaches a run already settled (a cancelled run's straggler) is not
    stored, but it counted as stored all the same: a copy of the call in flight then,
    which computed those items too, stored none of them, and the next run computed
    them a third time."""
    def start() -> checkpoint.MapCheckpoint:
        ck = checkpoint.MapCheckpoint(ns["work"], (range(6),), star=False, errors="raise", location=True,
                                      background=True)
        ck.todo()
        return ck

    cancelled, again = start(), start()  # the user runs it again while the cancelled run's workers finish
    cancelled.stop()
    cancelled.settle()
    cancelled.on_chunk(0, [0, 1, 4])  # its straggler
    again.on_chunk(0, [0, 1, 4])
    again.on_chunk(3, [9, 16, 25])
    again.settle()
    assert stored(ns, "work", range(6)) == set(range(6))


@pytest.mark.parametrize("how", ["api", "magic"])
def test_a_clear_while_a_run_is_in_flight_lets_a_copy_of_the_call_store_the_cleared_items(ns, how):
    """The items a run in flight had stored still counted as stored after a clear: a copy
    of the call started then computed them and stored none of them."""
    def start() -> checkpoint.MapCheckpoint:
        ck = checkpoint.MapCheckpoint(ns["work"], (range(6),), star=False, errors="raise", location=True,
                                      background=True)
        ck.todo()
        return ck

    running = start()
    running.on_chunk(0, [0, 1, 4])
    deadline = time.monotonic() + 30
    while stored(ns, "work", range(6)) != {0, 1, 2} and time.monotonic() < deadline:  # (its writer's commit)
        time.sleep(0.01)
    if how == "api":
        assert checkpoint.clear("work") == 1
    else:
        checkpoint.manage("clear", "work")
    assert stored(ns, "work", range(6)) == set()
    again = start()
    again.on_chunk(0, [0, 1, 4])
    again.on_chunk(3, [9, 16, 25])
    again.settle()
    running.settle()
    assert stored(ns, "work", range(6)) == set(range(6))


def test_a_store_that_cannot_be_written_is_said_once_by_a_checkpointed_imap(ns, monkeypatch, capsys, caplog):
    """The loop printed the run's warning, and the logger printed it again."""
    import logging

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Store, "put_packed", no_space)
    with caplog.at_level(logging.INFO, logger="mpmagic"):
        assert list(mpmagic.imap(ns["work"], range(6), checkpoint=True)) == [x * x for x in range(6)]
    printed = capsys.readouterr().err.count("could not write to the checkpoint store")
    logged = sum("could not write" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert printed + logged == 1, (printed, logged)


# --------------------------------------------------------------------------
# a module of the user's saved while the run goes on



@pytest.mark.parametrize("start", ["forkserver", "spawn"])
def test_a_module_saved_while_a_background_run_goes_on_stores_none_of_its_new_codes_results(
        ip, tmp_path, monkeypatch, start):
    """tester-bg22: mymod.py saved with new code (not reloaded) while a `--bg --checkpoint` run was in
    flight. Workers that imported it after the save (recycled by max_tasks_per_child, added by a
    resize, replacing a crashed one) ran the new file: the run's results mixed both versions (serial
    map gives the old code's, which the notebook has loaded), nothing said so, and the mix was stored
    under the old file's key for good: the old file back (or a new kernel) "resumed" the new code's
    results. Now no result is stored once the file changed, and two lines say what happened."""
    mod = f"bgedit_{start}"
    source, mark = module_to_edit(tmp_path, monkeypatch, mod)
    run(ip, f"%config MPMagic.checkpoint_dir = {str(tmp_path / 'ckpt')!r}")
    try:
        run(ip, EDIT_DEFS.format(mod=mod, mark=str(mark)))
        mpmagic.start_pool(workers=2, start_method=start, max_tasks_per_child=1, wait=True)
        handle = run(ip, "%pmap --bg --checkpoint --chunksize 1 f_edit, range(8)")
        mixed = handle.result(120)
        # (documented: a worker that imports the module now runs the file's code)
        assert mixed[0] == ("old", 0) and mixed[2:] == [("NEW", x) for x in range(2, 8)], mixed
        out = handle.output
        assert out.count(f"mpmagic: {mod}.py changed on disk while this run went on") == 1, out
        assert f"importlib.reload({mod})" in out
        said = [line for line in out.splitlines() if line.startswith("mpmagic: --checkpoint:")]
        assert len(said) == 1 and f"{mod}.py changed on disk while this run of `f_edit` went on" in said[0], out
        assert f"importlib.reload({mod})" in said[0] and "not stored" in said[0]
        # The old file back, reloaded: the run's own key again, which must hold no new code's result.
        source.write_text("def g(x):\n    return ('old', x)\n")
        os.utime(source, ns=(time.time_ns(), time.time_ns() + 20_000_000_000))
        mark.unlink()
        run(ip, f"importlib.reload({mod})")
        oracle = run(ip, "list(map(f_edit, range(8)))")
        assert oracle == [("old", x) for x in range(8)]
        again = run(ip, "%pmap --bg --checkpoint -q f_edit, range(8)")
        assert again.result(120) == oracle
        assert "resumed: 0 of 8 items from the checkpoint, 8 computed" in again.report().line()
    finally:
        sys.modules.pop(mod, None)
        from mpmagic import pool as pool_module

        pool_module.shutdown()  # (this test's pool, its start method and recycling, is not the next test's)
        checkpoint.close_stores()
