"""Background and streamed runs (issue 16): handles, imap, as_completed, apmap,
%pmap --bg, %%parallel --bg, %pool runs / cancel. Serial Python is the oracle."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError, Future

import psutil
import pytest
from conftest import ctrl_c_during_the_exit_wait, interrupted_cell, run, trickle_results
from IPython.core.error import UsageError as IPythonUsageError
from IPython.utils.capture import capture_output

import mpmagic
from mpmagic import background
from mpmagic.errors import UsageError


@pytest.fixture(scope="module")
def method() -> str:
    """The start method of every ``local_pool`` here: forkserver only.

    A background run's handle, stream, cancel and report are the manager's code,
    the same whichever start method made the workers (spawn cost the suite ~7 s
    more here). Spawn workers are covered where the method matters: test_fidelity_*,
    test_shared, test_worker_setup, test_parallel, test_reliability's deaths.
    """
    return "forkserver"

DEFS = """
import threading
import time
def square(x):
    return x * x
def slow(x):
    time.sleep(0.05)
    return x * x
def napper(x):
    time.sleep(0.5)
    return x
def loud(x):
    print('task says', x)
    return -x
def chatty(x):
    print('chatty', x)
    time.sleep(0.1)
    return x * x
def picky(x):
    if x == 13:
        raise KeyError(f'no {x}')
    return x
"""


@pytest.fixture
def ns(ip, local_pool):
    run(ip, DEFS)
    yield ip.user_ns
    for r in mpmagic.runs():
        r.cancel()


def _no_busy_worker(within: float = 1.0) -> bool:
    deadline = time.monotonic() + within
    while True:
        status = mpmagic.get_pool().status()
        if status["runs_in_flight"] == 0 and not any(p["busy"] for p in status["processes"]):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_submit_returns_a_handle_whose_result_equals_serial_map(ns):
    handle = mpmagic.submit(ns["slow"], range(40))
    assert isinstance(handle, mpmagic.Run)
    fg = mpmagic.pmap(ns["square"], range(2))  # a foreground run shares the workers meanwhile
    assert fg == [0, 1]
    serial = list(map(ns["slow"], range(40)))  # (the oracle, computed once, while the run goes on)
    assert handle.result(60) == serial
    assert handle.done() and handle.state == "done"
    assert handle.items_done == 40 and handle.items_total == 40
    report = handle.report()
    assert report is not None and report.items == 40 and "speedup" in report.line()
    assert "40/40 items" in repr(handle)
    # Settled by its run only (a set_result() from user code was seen by cf.wait and
    # asyncio, while result() gave the run's own, and the run's end printed a traceback).
    with pytest.raises(RuntimeError, match=r"is settled by its own run, not by set_result\(\)"):
        handle.set_result("bogus")
    with pytest.raises(RuntimeError, match=r"not by set_exception\(\)"):
        handle.set_exception(ValueError())
    assert handle.result() == serial


def test_a_background_error_waits_for_result_and_is_the_blocking_runs_error(ns):
    handle = mpmagic.pmap(ns["picky"], range(30), block=False)
    assert handle.wait(60)
    assert handle.state == "failed"
    with pytest.raises(KeyError) as bg:
        handle.result()
    with pytest.raises(KeyError) as fg:
        mpmagic.pmap(ns["picky"], range(30))
    with pytest.raises(KeyError) as serial:
        list(map(ns["picky"], range(30)))
    assert str(bg.value) == str(fg.value) == str(serial.value)
    # The 13 items before the failing one ran, in the failing item's own chunk
    # (it said "failed at item 13 after 0 of 30 items").
    one_chunk = mpmagic.pmap(ns["picky"], range(30), chunksize=30, block=False)
    assert one_chunk.wait(60) and one_chunk.items_done == 13 and one_chunk.items_failed == 1, repr(one_chunk)
    assert "after 13 of 30 items" in one_chunk.report().line()


def test_a_background_collect_run_reports_its_failures_as_the_blocking_run_does(ns):
    blocking = mpmagic.pmap(ns["picky"], range(20), errors="collect")
    blocking_report = mpmagic.last_report()
    handle = mpmagic.submit(ns["picky"], range(20), errors="collect")
    assert [type(r) for r in handle.result(60)] == [type(r) for r in blocking]
    report = handle.report()
    assert report is not None and report.failed == blocking_report.failed == handle.items_failed == 1
    assert "(1 failed)" in report.line()


def test_insights_of_a_run_of_no_items_say_so_in_one_line_blocking_or_background(ns):
    # (Here rather than in test_experience.py's insights tests: a background run is one of the two.)
    assert mpmagic.pmap(ns["square"], [], insights=True) == []
    handle = mpmagic.submit(ns["square"], [], insights=True)
    assert handle.result(60) == []
    for report in (mpmagic.last_report(), handle.report()):
        assert report is not None and report.insights is not None
        assert str(report.insights) == "insights: no items ran, nothing to time"
        assert "<table" not in report.insights._repr_html_()  # no table header over no rows


def test_result_of_a_cancelled_run_raises_cancelled_error_and_frees_the_workers(ip, ns):
    handle = mpmagic.submit(ns["napper"], range(40))
    assert handle.cancel() is True
    with pytest.raises(CancelledError):
        handle.result(10)
    # Cancelled stays cancelled: True again, as concurrent.futures.Future.cancel (code written
    # for futures, `if not fut.cancel(): fut.result()`, got CancelledError from that result).
    oracle = Future()
    assert oracle.cancel() is True and oracle.cancel() is True
    assert handle.state == "cancelled" and handle.cancel() is True and handle.cancelled()
    assert background.Finished(handle).cancel() is True  # (its record, once the handle is dropped)
    assert str(run(ip, f"%pool cancel {handle.id}")) == f"run {handle.id} had already ended (cancelled); nothing to cancel"
    done = mpmagic.submit(abs, [-1])
    assert done.result(60) == [1]
    finished = Future()
    finished.set_result([1])
    assert finished.cancel() is False and done.cancel() is False and background.Finished(done).cancel() is False
    assert _no_busy_worker()


def test_the_tasks_output_is_kept_on_the_handle(ns):
    handle = mpmagic.submit(ns["loud"], range(3))
    assert handle.result(60) == [0, -1, -2]
    assert sorted(handle.output.splitlines()) == [f"task says {i}" for i in range(3)]


@pytest.mark.parametrize("ordered", [True, False])
def test_imap_gives_the_same_results_as_map(ns, ordered):
    got = list(mpmagic.imap(ns["square"], range(500), ordered=ordered, chunksize=7))
    want = list(map(ns["square"], range(500)))
    if ordered:
        assert got == want
    else:
        assert Counter(got) == Counter(want)


def test_imap_refuses_compare_and_progress_in_one_line_and_its_report_says_imap(ns):
    """As submit and apmap refuse what they cannot do: a UsageError naming what to use instead."""
    for option, fix in (("compare", "mpmagic.pmap(..., compare=True) runs both"), ("progress", "tqdm")):
        with pytest.raises(mpmagic.UsageError, match=rf"^imap\(\) takes no {option}=: .*{re.escape(fix)}"):
            mpmagic.imap(ns["square"], range(3), **{option: True})
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        mpmagic.imap(ns["square"], range(3), nonsense=1)
    stream = mpmagic.imap(ns["square"], range(3))
    assert list(stream) == [0, 1, 4]
    assert stream.run.report().line().startswith("imap: 3 items on ")


def test_imap_reads_an_endless_input_lazily_and_breaking_out_cancels_the_rest(ns):
    read = []

    def endless():
        for i in itertools.count():
            read.append(i)
            yield i

    got = []
    for value in mpmagic.imap(ns["square"], endless(), chunksize=10, buffer=2):
        got.append(value)
        if len(got) == 1:
            time.sleep(0.5)  # a slow consumer: the workers must not run far ahead
        if len(got) == 25:
            break
    assert got == [x * x for x in range(25)]
    # Bounded: 2 chunks held + at most 2 in flight per worker (+ one being read), whatever the time.
    assert len(read) <= 10 * (2 + 2 * 2 + 2 + 1)
    assert _no_busy_worker()
    assert [r.state for r in mpmagic.runs()][-1] == "cancelled"


def test_a_dropped_imap_cancels_its_run(ns):
    stream = mpmagic.imap(ns["napper"], range(40), chunksize=1)
    handle = mpmagic.runs()[-1]
    assert handle.what == "imap napper"
    del stream
    with pytest.raises(CancelledError):
        handle.result(10)
    assert _no_busy_worker()


def test_closing_an_imap_before_its_first_result_cancels_its_run(ns):
    """A generator not yet started ignores close(): the run went on to its end
    (and on Dask the next run waited behind it). close() cancels it, and
    next() after it ends the stream, as a closed generator does."""
    stream = mpmagic.imap(ns["napper"], range(40), chunksize=1)
    handle = stream.run
    assert handle.what == "imap napper"
    stream.close()
    with pytest.raises(CancelledError):
        handle.result(10)
    assert _no_busy_worker()
    with pytest.raises(StopIteration):
        next(stream)
    # Started, then closed: the same; and a for loop still runs on the generator itself.
    stream = mpmagic.imap(abs, range(-3, 3))
    assert [next(stream), next(stream)] == [3, 2]
    stream.close()
    assert list(mpmagic.imap(abs, range(-3, 3))) == list(map(abs, range(-3, 3)))


def test_imap_raises_the_serial_error_after_the_results_before_it(ns):
    got = []
    with pytest.raises(KeyError) as err:
        for value in mpmagic.imap(ns["picky"], range(40), chunksize=1):
            got.append(value)
    assert got == list(range(13)) and "no 13" in str(err.value)


def test_as_completed_yields_every_result_once(ns):
    handle = mpmagic.submit(ns["slow"], range(30), chunksize=3)
    oracle: list[Counter] = []  # serial map's, computed in a thread while the results come
    serial = threading.Thread(target=lambda: oracle.append(Counter(map(ns["slow"], range(30)))))
    serial.start()
    got = Counter(mpmagic.as_completed(handle))
    serial.join(60)
    assert got == oracle[0]


def test_apmap_is_awaited_without_blocking_the_event_loop(ns):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(ticker())
        result = await mpmagic.apmap(ns["slow"], range(20))
        task.cancel()
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result == list(map(ns["slow"], range(20)))
    assert ticks > 3  # the loop ran while the map did


def test_a_cancelled_apmap_stops_its_run_at_once_and_shows_one_line(ns):
    """An interrupt of an async cell cancels its task; the run went on until every
    item was computed, and the CancelledError showed mpmagic's frame."""
    async def main():
        task = asyncio.ensure_future(mpmagic.apmap(ns["napper"], range(40), chunksize=1))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError as exc:
            return exc, time.monotonic() - t0
        raise AssertionError("not cancelled")

    exc, took = asyncio.run(main())
    assert took < 2.0  # (the whole run: 40 items of napper; a cancel stops it within a chunk)
    if sys.version_info < (3, 11):  # asyncio 3.10 raises a new, empty one: ours is its context (troubleshooting.md)
        assert type(exc) is asyncio.CancelledError and not exc.args
        exc = exc.__context__
    [line] = exc._render_traceback_()
    assert line.startswith("CancelledError: mpmagic.apmap was cancelled: run ") and "of 40 items" in line
    assert line == f"CancelledError: {exc}"  # (a kernel's error reply: its evalue is str(exc), was '')
    assert mpmagic.runs()[-1].state == "cancelled"


def test_apmap_refuses_what_is_not_iterable_as_pmap_does_and_an_async_one_says_so(ns):
    """``await apmap(f, 5)`` said "submit maps func over its iterables ... use
    mpmagic.call(func, x)": a function the user never called, advice that cannot
    help with an async generator. It says what pmap (and map()) says; an async
    iterable is refused saying to collect its items first."""
    def words(call) -> str:
        with pytest.raises(TypeError) as got:
            call()
        return str(got.value)

    with pytest.raises(TypeError) as serial:
        map(ns["square"], 5)  # (map's own: 'int' object is not iterable)
    assert "not iterable" in str(serial.value)
    said = words(lambda: asyncio.run(mpmagic.apmap(ns["square"], 5)))
    assert said == words(lambda: mpmagic.pmap(ns["square"], 5)) == "argument 2 of map must be iterable, not int 5"
    assert words(lambda: asyncio.run(mpmagic.apmap(ns["square"], [1], 3))) == (
        "argument 3 of map must be iterable, not int 3")

    async def agen():
        yield 1

    async def main():
        it = agen()
        with pytest.raises(TypeError) as got:
            await mpmagic.apmap(ns["square"], it)
        assert await mpmagic.apmap(ns["square"], [x async for x in it]) == [1]  # what it says to do
        return str(got.value)

    said = asyncio.run(main())
    assert said.startswith("argument 2 of map must be iterable, not async_generator <async_generator object")
    assert said.endswith("mpmagic maps a plain iterable, not an async one; collect its items first, in a "
                         "coroutine: items = [x async for x in it]")
    assert "submit" not in said and "call" not in said


def test_apmap_prints_what_the_tasks_print_as_pmap_does(ip, ns, capsys):
    """Awaited, the run's output went only to the Run handle apmap never returns."""
    assert asyncio.run(mpmagic.apmap(ns["loud"], range(3))) == [0, -1, -2]
    assert sorted(capsys.readouterr().out.splitlines()) == ["task says 0", "task says 1", "task says 2"]
    with capture_output() as cap:  # a top-level await in an IPython cell
        assert run(ip, "import mpmagic\nawait mpmagic.apmap(loud, [5])") == [-5]
    assert cap.stdout.startswith("task says 5\n")  # (then the cell's Out[...])


@pytest.mark.parametrize("call", [mpmagic.submit, mpmagic.apmap])
def test_submit_and_apmap_refuse_block_in_one_line(call):
    with pytest.raises(UsageError, match=r"\(\) takes no block=: it always runs the map in the background"):
        result = call(abs, [1], block=True)
        if asyncio.iscoroutine(result):
            asyncio.run(result)


def test_apmap_refuses_compare_in_its_own_words():
    """Its typed signature listed compare=, which always failed with words about submit()."""
    with pytest.raises(UsageError, match=r"^apmap\(\) takes no compare=: its serial run would block the event loop"):
        asyncio.run(mpmagic.apmap(abs, [1], compare=True))


def test_pmap_bg_binds_the_handle_and_pool_lists_and_cancels_it(ip, ns):
    run(ip, "h = %pmap --bg napper, range(40)")
    handle = ip.user_ns["h"]
    assert isinstance(handle, mpmagic.Run)
    listing = run(ip, "%pool runs")
    assert f"run {handle.id}: pmap napper" in repr(listing) and "running" in repr(listing)
    assert f"run {handle.id}" in str(run(ip, "%pool"))
    run(ip, f"%pool cancel {handle.id}")
    assert handle.state == "cancelled"
    assert handle in mpmagic.runs()
    with pytest.raises(IPythonUsageError, match="no run with id 99999"):
        ip.run_line_magic("pool", "cancel 99999")


@pytest.mark.parametrize("line", ["--bg --compare square, range(4)", "--bg --scaling square, range(4)"])
def test_bg_with_compare_or_scaling_is_a_one_line_usage_error(ip, ns, line):
    with pytest.raises(IPythonUsageError, match=r"(compare=True \(--compare\)|--scaling) runs serially in this "
                                                r"thread, so it needs a blocking run: not submit\(\) or block=False \(--bg\)"):
        ip.run_line_magic("pmap", line)


def test_parallel_bg_returns_a_handle_of_the_ranks_values(ip, ns):
    handle = run(ip, "%%parallel --bg -n 2 -o cellrun\nrank * 10")
    assert ip.user_ns["cellrun"] is handle
    assert list(handle.result(60)) == [0, 10]
    failing = mpmagic.parallel("1 / rank", workers=2, block=False)
    with pytest.raises(mpmagic.ParallelError):
        failing.result(60)
    assert "ZeroDivisionError" in failing.output


def test_parallel_bg_gathers_into_the_handles_result(ip, ns):
    """``%%parallel --bg --gather`` was refused, and the refusal pointed to
    ``h.result().gathered``, which is {} without --gather: the names come back in
    the handle's result, as ``parallel(code, gather=..., block=False)`` brings them."""
    code = "part = [rank] * 2\nlo, hi = rank * 10, rank * 10 + 9\nrank * 100"
    serial = [{"rank": r, "size": 3} for r in range(3)]
    for names in serial:
        exec(code, names)
    for name in ("part", "hi", "h"):
        ip.user_ns.pop(name, None)
    handle = run(ip, f"%%parallel --bg -n 3 -q --gather 'part, hi' -o h\n{code}")
    assert ip.user_ns["h"] is handle  # -o stores the handle; the gathered lists stay in its result
    values = handle.result(60)
    assert list(values) == [names["rank"] * 100 for names in serial]
    assert values.gathered == {"part": [names["part"] for names in serial], "hi": [names["hi"] for names in serial]}
    assert "part" not in ip.user_ns and "hi" not in ip.user_ns  # (a run ending later would change names under a cell)
    assert mpmagic.parallel(code, workers=3, gather="part, hi", block=False).result(60).gathered == values.gathered
    # -o names the handle here, so -o part --gather part is no clash
    again = run(ip, f"%%parallel --bg -n 3 -q --gather part -o part\n{code}")
    assert ip.user_ns.pop("part") is again and again.result(60).gathered == {"part": values.gathered["part"]}
    ip.user_ns.pop("h")
    # --reduce stays refused with --bg (reduce= needs block=True), and so is an empty --gather
    for line, message in (
            ("--bg -n 2 --reduce sum", "%%parallel: --bg cannot be combined with --reduce: reduce the handle's "
             "result() (the list of the ranks' values) once it is done, e.g. sum(h.result())"),
            ("--bg -n 2 --gather ''", "%%parallel: --gather takes variable names separated by commas or spaces, "
             "and '' has an empty one")):
        error = ip.run_cell(f"%%parallel {line}\nrank", store_history=False).error_in_exec
        assert isinstance(error, IPythonUsageError) and str(error).splitlines()[0] == message, error


def test_dask_background_and_foreground_runs_take_turns_and_stream(ip, request):
    from conftest import ensure_pool

    ensure_pool("dask", request)
    run(ip, DEFS)
    ns = ip.user_ns
    handle = mpmagic.submit(ns["chatty"], range(16), chunksize=1)
    assert mpmagic.pmap(ns["loud"], range(5)) == [0, -1, -2, -3, -4]  # waits its turn: no mixed events
    assert handle.result(60) == [x * x for x in range(16)]
    assert sorted(handle.output.splitlines()) == sorted(f"chatty {x}" for x in range(16))  # none lost
    assert Counter(mpmagic.imap(ns["square"], range(50), ordered=False)) == Counter(map(ns["square"], range(50)))
    cancelled = mpmagic.submit(ns["napper"], range(40), chunksize=1)
    assert cancelled.cancel()
    with pytest.raises(CancelledError):
        cancelled.result(30)
    assert mpmagic.pmap(ns["square"], range(3)) == [0, 1, 4]


def test_a_background_map_returns_at_once_however_slow_its_input(ns):
    """The handle comes back before the input's first item is read: a background
    run's input is read by its own thread, from the first chunk on (read in
    the calling thread, a slow generator held the cell that started the run)."""
    release = threading.Event()
    readers: list[threading.Thread] = []

    def items():
        readers.append(threading.current_thread())
        release.wait(60)
        yield from range(5)

    handle = mpmagic.pmap(ns["square"], items(), block=False)
    assert not handle.done()
    release.set()
    assert handle.result(60) == [x * x for x in range(5)]
    assert readers and readers[0] is not threading.current_thread()


# -- what a failed or interrupted background run shows -----------------------------------


def _shown(ip, code: str) -> tuple[str, BaseException | None]:
    """Run ``code`` as a numbered cell: the text IPython displayed, and its error."""
    with capture_output() as cap:
        result = ip.run_cell(code, store_history=True)
    return cap.stdout + cap.stderr, result.error_in_exec


@pytest.mark.parametrize("call", ["r.result()", "list(mpmagic.as_completed(r))", "list(mpmagic.imap(bad, range(6)))"])
def test_a_failed_background_run_shows_what_a_blocking_run_shows_however_often_raised(ip, ns, call):
    """The cell's line, then the user's frame: none of the pump thread's frames
    (Run._pump, the finish lambdas of background.py, api.py, streaming.py),
    and raising the same error again does not grow its traceback."""
    with capture_output():
        defined = ip.run_cell("import mpmagic\ndef bad(x):\n    if x == 3:\n        raise ValueError(f'boom {x}')\n"
                              "    return x\n", store_history=True)
    n = defined.execution_count
    run(ip, "r = mpmagic.submit(bad, range(6))\nr.wait(60)")
    blocking, _ = _shown(ip, "%pmap -q bad, range(6)")
    for _ in range(2):
        text, err = _shown(ip, call)
        assert isinstance(err, ValueError), text
        assert "mpmagic/" not in text and "_pump" not in text and "<lambda>" not in text, text
        assert text.count(call) == 1, text  # the cell's line once, however often raised
        # As the blocking %pmap shows it: from the user's frame on, the same text.
        tail = text[text.index(f"Cell In[{n}], line 4"):]
        assert tail == blocking[blocking.index(f"Cell In[{n}], line 4"):], (text, blocking)
        assert "mpmagic: raised by item 3 of the input: bad(3)" in tail


@pytest.mark.parametrize("wait", ["r.result()", "for v in mpmagic.as_completed(r):\n    pass"])
def test_an_interrupted_wait_on_a_background_run_says_in_one_line_that_the_run_goes_on(ip, ns, wait):
    run(ip, "import mpmagic\nr = mpmagic.submit(napper, range(4), chunksize=1)")  # ~1 s on 2 workers
    text, err = interrupted_cell(ip, wait, after=0.4)  # (mid-run, 0.6 s before its end at the earliest)
    handle = ip.user_ns["r"]
    assert type(err) is KeyboardInterrupt
    what = "result()" if "result" in wait else "as_completed"
    assert text.strip() == (f"KeyboardInterrupt: {what} interrupted: run {handle.id} (pmap napper) goes on in the "
                            f"background; cancel() on its handle (or %pool cancel {handle.id}) stops it"), text
    assert handle.result(60) == list(range(4))  # it did go on, to the end


def test_an_interrupted_imap_says_in_one_line_that_its_run_was_cancelled(ip, ns):
    text, err = interrupted_cell(ip, "import mpmagic\nfor v in mpmagic.imap(napper, range(8), chunksize=1):\n    pass")
    handle = mpmagic.runs()[-1]
    assert type(err) is KeyboardInterrupt and handle.what == "imap napper"
    assert text.strip() == (f"KeyboardInterrupt: imap interrupted: its run {handle.id} (imap napper) was cancelled, "
                            "the work still running was stopped and its workers replaced; the pool is ready "
                            "for the next run"), text
    assert handle.state == "cancelled" and _no_busy_worker()


@pytest.mark.parametrize("given, named", [([1, 2], "; item 0 of the list is int, not a run handle"), (5, ", not int")])
def test_as_completed_of_something_else_says_what_it_takes(given, named):
    """An imap generator or a list raised AttributeError: '... has no attribute _chunks'."""
    with pytest.raises(mpmagic.UsageError, match=f"takes the handle of a background map.*{re.escape(named)}$"):
        mpmagic.as_completed(given)  # at the call, not at the first next() (a cell's handle was refused late)


@pytest.mark.parametrize("ordered", [True, False])
def test_a_ctrl_c_as_imap_takes_a_chunk_loses_none_of_its_results(ns, monkeypatch, ordered):
    """The run had ended (every chunk waits in the feed), and the Ctrl-C lands as the
    loop takes the first chunk, while the tasks' output is printed: the interrupt's line
    says the run had ended, and the loop, run again, gives every result, as a loop over
    a list goes on where it was interrupted. That chunk was lost (ordered, every later
    one with it: the stream ended with no result)."""
    stream = mpmagic.imap(ns["square"], range(8), chunksize=2, ordered=ordered)
    assert stream.run.wait(60)
    sink = stream.run._sink
    relay, pressed = sink.relay_here, []

    def relay_interrupted() -> None:  # (its first call comes right after the first chunk was taken)
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt
        relay()

    monkeypatch.setattr(sink, "relay_here", relay_interrupted)
    with pytest.raises(KeyboardInterrupt, match=f"its run {stream.run.id} .* had ended"):
        next(stream)
    assert sorted(stream) == [x * x for x in range(8)] and pressed


def test_a_ctrl_c_as_imap_takes_its_end_does_not_leave_the_loop_waiting_for_ever(ns):
    """The Ctrl-C lands right after the reader took the run's end off the feed: the
    loop, run again, ends. It waited for ever for the end it had taken."""
    stream = mpmagic.imap(ns["slow"], range(4), chunksize=1)
    main = threading.main_thread().ident
    stream.run.add_done_callback(lambda r: signal.pthread_kill(main, signal.SIGINT))  # (after the end is queued)
    got: list = []
    with pytest.raises(KeyboardInterrupt, match="had ended"):
        for value in stream:  # (waits for the end on the feed when it is queued)
            got.append(value)
    rest: list = []
    loop = threading.Thread(target=lambda: rest.extend(stream), daemon=True)
    loop.start()
    loop.join(10)
    assert not loop.is_alive() and got + rest == list(map(ns["slow"], range(4)))


def test_as_completed_refuses_an_imap_stream_without_consuming_it(ns):
    stream = mpmagic.imap(_scaled_sum, range(3), range(3))
    with pytest.raises(UsageError, match="or an iterable of run handles, not Stream$"):
        mpmagic.as_completed(stream)  # type: ignore[call-overload]
    assert list(stream) == [0, 2, 4]


def test_pool_runs_counts_a_cells_ranks_as_ranks(ip, local_pool):
    """``%pool runs`` said "2/2 items" for a %%parallel --bg run its handle calls "2/2 ranks"."""
    handle = run(ip, "%%parallel -n 2 -q --bg\nrank")
    handle.result(60)
    line = next(line for line in repr(run(ip, "%pool runs")).splitlines() if f"run {handle.id}:" in line)
    assert "2/2 ranks" in line and "items" not in line, line


def test_imap_gives_results_for_an_input_that_trickles_in_as_its_items_come(ns):
    """A whole chunk was read before any item went out: an input fed by
    another thread (a queue, a socket) gave its first result only once the
    chunk filled (10 s for 40 items every 0.25 s), and never if it stopped
    short. The first result now comes while the producer is still putting."""
    list(mpmagic.imap(ns["square"], range(20_000)))  # (tiny tasks measured: large chunks from now on)
    got, put_at_first = trickle_results(lambda items: mpmagic.imap(ns["square"], items))
    assert got == [i * i for i in range(8)]
    assert put_at_first is not None and put_at_first < 8, put_at_first


def test_an_ordered_imap_yields_every_result_before_the_failing_item(ns):
    """Serial map yields 0..49 and then raises item 50's error; imap dropped the
    results of the failing item's chunk before it (23-30 results)."""
    run(ns["get_ipython"](), "def boom(x):\n    if x == 50:\n        raise KeyError(x)\n    return x")
    got = []
    with pytest.raises(KeyError):
        for value in mpmagic.imap(ns["boom"], range(100), chunksize=30):
            got.append(value)
    assert got == list(range(50))


def test_an_imap_closed_from_another_thread_ends_its_loop_with_cancelled_error_not_quietly(ns):
    """close() from a watchdog's thread while the loop's body ran closed the loop's suspended
    segment too: the loop ended as if every result had come (StopIteration), its run cancelled.
    The loop gets CancelledError where its results stop, saying how many it got; those are
    serial map's first results; the next next() says it again, then the stream ends."""
    square = ns["slow"]
    stream = mpmagic.imap(square, range(200), chunksize=1)
    got: list = []
    with pytest.raises(CancelledError) as raised:
        for value in stream:
            got.append(value)
            if len(got) == 3:  # the loop's body: its segment is suspended while the watchdog closes
                watchdog = threading.Thread(target=stream.close)
                watchdog.start()
                watchdog.join()
    n = len(got)
    assert 3 <= n < 200 and got == [square(x) for x in range(n)]
    assert str(raised.value) == (f"run {stream.run.id} (imap slow) was cancelled: the loop got the results of its "
                                 f"first {n} of 200 items; item {n} and the items after it will not come")
    assert stream.run.state == "cancelled"
    with pytest.raises(CancelledError, match="nothing more comes"):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)
    assert _no_busy_worker()


@pytest.mark.parametrize("items", [1, 10])
def test_an_imap_closed_before_its_loop_began_says_none_of_its_items_will_come(ns, items):
    """close() from another thread before the loop's first next(): "the loop got no result;
    none of its 10 items' will come" (a stray apostrophe; "its 1 items" for one item).
    Its items wait on an Event nobody sets, so none can finish before the close."""
    run(ns["get_ipython"](), "import mpmagic\ngate = mpmagic.Event()\ndef gated(x):\n    gate.wait()\n    return x")
    stream = mpmagic.imap(ns["gated"], range(items), chunksize=1)
    watchdog = threading.Thread(target=stream.close)
    watchdog.start()
    watchdog.join()
    with pytest.raises(CancelledError) as raised:
        for _ in stream:
            pass
    none = "its one item will not come" if items == 1 else "none of its 10 items will come"
    assert str(raised.value) == f"run {stream.run.id} (imap gated) was cancelled: the loop got no result; {none}"
    with pytest.raises(CancelledError) as again:
        next(stream)
    assert str(again.value) == (f"run {stream.run.id} (imap gated) was cancelled (the CancelledError raised before): "
                                "the loop got no result, and nothing more comes")
    with pytest.raises(StopIteration):
        next(stream)
    assert _no_busy_worker(10.0)


def test_cancel_settles_a_run_whose_input_generator_is_blocked(ns):
    """The thread that reads a lazy input was blocked in the user's ``next()``
    (a queue nobody fills): cancel() waited 10 s, the run stayed "running" and
    result() timed out; leaving an imap loop early waited 20 s."""
    import queue as queue_module

    q: queue_module.Queue = queue_module.Queue()
    q.put(1)
    handle = mpmagic.submit(ns["square"], iter(q.get, None), chunksize=1)
    for _ in range(100):  # (its first result: the reading thread is now blocked in q.get)
        if handle.items_done:
            break
        time.sleep(0.05)
    assert handle.cancel()
    assert handle.state == "cancelled"
    with pytest.raises(CancelledError):
        handle.result(timeout=5)
    q2: queue_module.Queue = queue_module.Queue()
    q2.put(2)
    stream = mpmagic.imap(ns["square"], iter(q2.get, None), chunksize=1)
    assert next(stream) == 4
    stream.close()  # (leaving the loop: the run is cancelled)
    assert mpmagic.runs()[-1].state == "cancelled"
    q.put(None)
    q2.put(None)


def test_a_stream_left_early_keeps_nothing_of_its_work_in_the_history(ns):
    """``%pool runs`` keeps the last finished runs: a stream left at its first
    result kept its buffered chunks and unsent units there (25 such loops over
    a million items held 381 MB). Its counts stay."""
    for _value in mpmagic.imap(ns["square"], range(200_000)):
        break
    kept = mpmagic.runs()[-1]
    assert kept.state == "cancelled" and kept.items_done > 0
    if isinstance(kept, mpmagic.Run):  # (else its handle was collected: the history keeps only its row)
        job = kept._job
        assert job.feed.chunks.qsize() <= 1  # (at most the reader's end marker)
        assert job.outstanding == {} and not job._requeued and job._seq is None


def test_a_finished_run_whose_handle_was_dropped_keeps_its_row_not_its_results(ip, ns):
    """The history of ``%pool runs`` held the last 20 finished runs with their
    results: twenty 50 MB results pinned 1 GB of /dev/shm after the user had
    dropped every handle (and after stop_pool). Now it keeps their rows only;
    a handle the user holds keeps its results."""
    import gc
    import weakref

    run(ip, "import numpy as np\ndef block(x):\n    return np.full(250_000, x, dtype=np.float64)")
    dropped = mpmagic.submit(ns["block"], [7])
    arrays = dropped.result(30)
    assert arrays[0][0] == 7 and arrays[0].nbytes == 2_000_000
    gone_run, gone_array = weakref.ref(dropped), weakref.ref(arrays[0])
    held = mpmagic.submit(ns["block"], [8])
    assert held.wait(30)
    dropped_id = dropped.id
    del dropped, arrays
    gc.collect()
    assert gone_run() is None and gone_array() is None  # the results were freed
    listing = repr(run(ip, "%pool runs"))
    assert f"run {dropped_id}: pmap block, 1/1 items" in listing and "done" in listing
    assert f"run {held.id}: pmap block" in listing
    row = next(r for r in mpmagic.runs() if r.id == dropped_id)
    assert row.state == "done" and row.items_done == 1 and not isinstance(row, mpmagic.Run)
    assert str(run(ip, f"%pool cancel {dropped_id}")) == f"run {dropped_id} had already ended (done); nothing to cancel"
    assert held in mpmagic.runs() and held.result()[0][0] == 8  # a held handle keeps its results


def test_what_an_imap_task_prints_shows_while_the_loop_waits(ns, tmp_path, monkeypatch):
    """An imap loop showed a task's printed lines only with its chunk's
    results: a task that printed and then worked for a minute showed nothing
    for a minute (a blocking %pmap shows the line at once). Here the task
    goes on only once its line was shown (or gives up after 10 s)."""
    import io
    import sys

    marker = tmp_path / "seen"
    run(ns["get_ipython"](), f"import os, time\nMARKER = {str(marker)!r}\n"
        "def announce(x):\n    print('started', x, flush=True)\n"
        "    for _ in range(200):\n        if os.path.exists(MARKER):\n            return 'seen'\n"
        "        time.sleep(0.05)\n    return 'not seen'\n")

    class Watch(io.StringIO):
        def write(self, text: str) -> int:
            if "started 1" in text:
                marker.touch()
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Watch())
    assert list(mpmagic.imap(ns["announce"], [1])) == ["seen"]


def test_an_imap_tasks_non_ascii_output_on_an_ascii_stdout_is_escaped(ns, monkeypatch):
    """``LC_ALL=C PYTHONIOENCODING=ascii``: a task printing "café" made the imap
    loop raise UnicodeEncodeError from the relay, naming no item (a blocking
    pmap writes it with backslash escapes: display_relay.print_output)."""
    import io
    import sys

    run(ns["get_ipython"](), "def cafe(x):\n    print('caf\\xe9', x)\n    return x\n")
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    assert list(mpmagic.imap(ns["cafe"], [1])) == [1]
    out.flush()
    assert out.buffer.getvalue() == b"caf\\xe9 1\n"


def test_a_run_the_pool_stopped_under_says_it_failed_in_its_report(ns):
    """Its live area ended with a success-style timing line ("pmap: 68 items on
    2 workers ... speedup ~1.9x") under the error."""
    handle = mpmagic.submit(ns["slow"], range(300), chunksize=1)
    for _ in range(100):
        if handle.items_done:
            break
        time.sleep(0.05)
    mpmagic.stop_pool()
    try:
        with pytest.raises(mpmagic.MPMagicError,
                           match=r"^the pool was stopped by stop_pool\(\) while this run was in flight: run it again$"):
            handle.result(30)
        # (it said "pmap failed after 1 of 300 items": what stopped it is named now)
        line = handle.report().line()
        assert re.fullmatch(r"pmap stopped by stop_pool\(\) after \d+ of 300 items finished, \S+ m?s", line), line
    finally:
        mpmagic.restart_pool()


def test_imap_gives_the_items_read_before_the_input_blocks(ns):
    """The reading thread blocked in the input's next() held the items it had
    read: five items in a queue, and no sixth, gave 2-3 results and then
    waited for ever (serial map gives all five). The manager now takes what a
    slow read has read so far. Here the input blocks until the loop has all
    five (or gives up after 10 s)."""
    go_on = threading.Event()
    gave_up: list[bool] = []

    def items():
        yield from range(5)
        gave_up.append(not go_on.wait(10))

    got = []
    for value in mpmagic.imap(ns["square"], items()):
        got.append(value)
        if len(got) == 5:
            assert gave_up == []  # the input is still blocked: the five came without it
            go_on.set()
    assert got == [0, 1, 4, 9, 16] and gave_up == [False]


@pytest.mark.parametrize("checkpoint", [False, True])
def test_cancel_drops_the_on_chunk_calls_still_queued_instead_of_running_them(ns, tmp_path, checkpoint):
    """cancel() waited until the user's on_chunk had run for every chunk that had
    arrived: with a callback of 0.3 s and 16 chunks queued, 5 s. Chunks whose
    on_chunk had not run are dropped; with a checkpoint they are still stored."""
    seen: list[int] = []
    started = threading.Event()

    def slow_callback(start, results):
        seen.append(start)
        started.set()
        time.sleep(0.3)

    handle = mpmagic.submit(ns["square"], range(400), on_chunk=slow_callback, chunksize=10,
                            checkpoint=tmp_path if checkpoint else False)
    assert started.wait(60)
    before = len(seen)
    assert handle.cancel()
    assert len(seen) <= before + 1  # (one may have begun as cancel() was called), not the dozen queued
    with pytest.raises(CancelledError):  # (as concurrent.futures.Future.exception)
        handle.exception(timeout=60)
    assert len(seen) <= before + 1
    if checkpoint:  # what arrived is stored all the same: a re-run computes nothing of it
        assert mpmagic.pmap(ns["square"], range(400), checkpoint=tmp_path) == [x * x for x in range(400)]
        resumed = re.search(r"resumed: ([\d,]+) of", mpmagic.last_report().line())
        assert resumed and int(resumed.group(1).replace(",", "")) >= 10 * before


def test_cancelled_and_timed_out_waits_show_one_line_and_keep_their_types(ip, ns):
    """result() after cancel(), result/exception(timeout=) and as_completed showed
    the frame of background.py that raised (IPython never hides the last frame)."""
    from concurrent.futures import TimeoutError as FuturesTimeout

    run(ip, "bg_slow = %pmap --bg -q napper, range(40)")
    cells = {
        "bg_slow.result(timeout=0.01)": ("TimeoutError", FuturesTimeout, "did not end within 0.01 s"),
        "bg_slow.exception(timeout=0.01)": ("TimeoutError", FuturesTimeout, "did not end within 0.01 s"),
        "next(mpmagic.as_completed(bg_slow, timeout=0.01))": ("TimeoutError", FuturesTimeout, "no result of run"),
        "bg_slow.cancel()\nbg_slow.result()": ("CancelledError", CancelledError, "was cancelled"),
        "bg_slow.exception()": ("CancelledError", CancelledError, "was cancelled"),
        "list(mpmagic.as_completed(bg_slow))": ("CancelledError", CancelledError, "was cancelled"),
    }
    for code, (name, kind, words) in cells.items():
        with capture_output() as cap:
            result = ip.run_cell(code, store_history=False)
        assert isinstance(result.error_in_exec, kind), code
        shown = (cap.stdout + cap.stderr).strip()
        assert shown.startswith(f"{name}: ") and words in shown and len(shown.splitlines()) == 1, (code, shown)
        assert "background.py" not in shown
    ip.user_ns.pop("bg_slow", None)


def test_a_waits_timeout_is_caught_by_the_except_multiprocessing_code_had(ip, ns):
    """AsyncResult.get(timeout) and imap's next(timeout) raise multiprocessing.TimeoutError,
    which is not the builtin: a port that kept `except multiprocessing.TimeoutError` around
    run.result(timeout=) / as_completed(timeout=) missed mpmagic's time-out (the builtin).
    It is each of the three classes now, shown as before, and it pickles (a logging queue)."""
    import concurrent.futures as cf
    import multiprocessing
    import pickle

    run(ip, "import mpmagic\nbg_slow = %pmap --bg -q napper, range(40)")
    try:
        for code in ("bg_slow.result(timeout=0.01)", "bg_slow.exception(timeout=0.01)",
                     "next(mpmagic.as_completed(bg_slow, timeout=0.01))",
                     "next(mpmagic.as_completed([bg_slow], timeout=0.01))"):
            with capture_output() as cap:
                result = ip.run_cell(code, store_history=False)
            error = result.error_in_exec
            assert isinstance(error, multiprocessing.TimeoutError), (code, error)
            assert isinstance(error, TimeoutError) and isinstance(error, cf.TimeoutError), (code, error)
            shown = (cap.stdout + cap.stderr).strip()
            assert shown.startswith("TimeoutError: ") and len(shown.splitlines()) == 1, (code, shown)
            again = pickle.loads(pickle.dumps(error))
            assert type(again) is type(error) and again.args == error.args
    finally:
        ip.run_cell("bg_slow.cancel()", store_history=False)
        ip.user_ns.pop("bg_slow", None)


def test_a_waits_timeout_is_caught_as_both_timeout_errors_as_on_python_3_10(ip, ns, monkeypatch):
    """Before 3.11 concurrent.futures.TimeoutError is not the builtin: run.result(timeout=)
    raised the builtin, which `except concurrent.futures.TimeoutError` missed, and
    as_completed([runs], timeout=) the stdlib's own, which `except TimeoutError` missed.
    Its class here (3.10's, stood in from 3.11 on; 3.10's own there) must catch it, and
    `except TimeoutError` still (and `except multiprocessing.TimeoutError`, as on 3.11).
    (The stand-in on 3.10 hid the class the stdlib's as_completed raises there.)"""
    import concurrent.futures as cf
    import multiprocessing

    if cf.TimeoutError is TimeoutError:
        class StandIn(Exception):  # (3.10's concurrent.futures.TimeoutError: not an OSError)
            pass

        monkeypatch.setattr(cf, "TimeoutError", StandIn)
    FuturesTimeout = cf.TimeoutError
    run(ip, "import mpmagic\nbg_slow = %pmap --bg -q napper, range(40)")
    try:
        for code in ("bg_slow.result(timeout=0.01)", "bg_slow.exception(timeout=0.01)",
                     "next(mpmagic.as_completed(bg_slow, timeout=0.01))",
                     "next(mpmagic.as_completed([bg_slow], timeout=0.01))"):  # (the stdlib's, with its frame)
            with capture_output() as cap:
                result = ip.run_cell(code, store_history=False)
            error = result.error_in_exec
            assert isinstance(error, FuturesTimeout) and isinstance(error, TimeoutError), (code, error)
            assert isinstance(error, multiprocessing.TimeoutError), (code, error)
            shown = (cap.stdout + cap.stderr).strip()
            assert shown.startswith("TimeoutError: ") and len(shown.splitlines()) == 1, (code, shown)
    finally:
        ip.run_cell("bg_slow.cancel()", store_history=False)
        ip.user_ns.pop("bg_slow", None)


def test_a_run_is_a_concurrent_futures_future_and_behaves_as_one(ns, caplog):
    """concurrent.futures.wait / as_completed crashed on a Run (AttributeError
    '_condition'); exception() after cancel() returned CancelledError instead of
    raising it; a raising callback added to a finished run reached the caller;
    there was no running(). The stdlib Future is the oracle."""
    import concurrent.futures as cf

    runs = [mpmagic.submit(ns["square"], range(i, i + 3)) for i in (0, 3)]
    assert all(isinstance(r, cf.Future) and r.running() for r in runs if not r.done())
    finished, pending = cf.wait(runs, timeout=60)
    assert finished == set(runs) and not pending and not any(r.running() for r in runs)
    assert sorted(x for r in cf.as_completed(runs, timeout=60) for x in r.result()) == [x * x for x in range(6)]
    failing = mpmagic.submit(ns["picky"], [13])
    assert cf.wait([failing], 60, return_when=cf.FIRST_EXCEPTION).done == {failing}
    assert isinstance(failing.exception(), KeyError)

    oracle: cf.Future = cf.Future()
    slow = mpmagic.submit(ns["napper"], range(8))
    assert oracle.cancel() and slow.cancel()
    for future in (oracle, slow):
        with pytest.raises(CancelledError):
            future.exception(1)
        assert future.cancelled() and future.done() and not future.running()
    assert cf.wait([slow], 0).done == {slow}

    def boom(f):
        seen.append(f)
        raise RuntimeError("callback boom")

    seen: list = []
    oracle = cf.Future()
    oracle.set_result(1)
    for future in (oracle, runs[0]):  # already done: called at once; its error logged, not raised
        future.add_done_callback(boom)
        assert seen[-1] is future
    assert [str(r.exc_info[1]) for r in caplog.records if r.exc_info] == ["callback boom"] * 2


def test_a_run_being_cancelled_is_never_cancelled_and_running_at_once(ns):
    """cancel() set the flag cancelled() returned before the run had ended: a
    watcher saw cancelled() True with done() False (a Future's cancelled() implies done())."""
    slow = mpmagic.submit(ns["napper"], range(8))
    seen: list = []
    watching = threading.Event()

    def watch() -> None:
        watching.set()
        while not slow.done():
            seen.append((slow.cancelled(), slow.done()))
    watcher = threading.Thread(target=watch)
    watcher.start()
    watching.wait(5)
    assert slow.cancel()
    watcher.join(10)
    assert seen and not [s for s in seen if s[0] and not s[1]]
    assert slow.cancelled() and slow.done() and not slow.running()


def test_api_errors_name_the_api_option_beside_the_magics(ns):
    """A script's submit(compare=True) was told "--bg cannot be combined with
    --compare", gather= errors spoke of --gather only: the API's words come first."""
    with pytest.raises(UsageError, match=r"^compare=True \(--compare\) runs serially in this thread, so it needs a "
                                         r"blocking run: not submit\(\) or block=False \(--bg\)"):
        mpmagic.submit(ns["square"], range(3), compare=True)
    with pytest.raises(UsageError, match=r"^gather= \(--gather\) takes variable names, and '1x' is not one"):
        mpmagic.parallel("a = 1", gather=["1x"], workers=1)
    with pytest.raises(mpmagic.ParallelError, match=r"NameError: gather= \(--gather\): name\(s\) 'b' not defined"):
        mpmagic.parallel("a = 1", gather=["b"], workers=1)


def test_reprs_are_short_lines_and_runs_says_failures_as_a_runs_repr_does(ns):
    """repr(Report) was a ~900-character dataclass dump, a pool <LocalBackend object
    at 0x..>, and runs() wrote "3/5 (1 failed) items" where the run wrote "3/5 items, 1 failed"."""
    mpmagic.pmap(ns["square"], range(3))
    report = mpmagic.last_report()
    assert repr(report) == f"<mpmagic.Report {report.line()}>"
    pool = mpmagic.get_pool()
    assert repr(pool) == f"<mpmagic local pool: {pool.workers} workers, {pool.start_method}, running>"
    handle = mpmagic.submit(ns["picky"], [1, 13, 2], errors="collect", chunksize=1)
    handle.result(60)
    line = repr(handle).removeprefix("<mpmagic.Run ").removesuffix(">")
    assert ", 3/3 items, 1 failed, " in line and f"  {line}" in repr(mpmagic.runs()).splitlines()


def test_the_reference_shows_no_internal_constructor_of_run():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "reference.md").read_text()
    assert "class: `Run`\n" in text and "Run(what" not in text


def test_a_background_run_owns_its_input_as_of_the_call(ns, monkeypatch, tmp_path):
    """A background run read its list (numpy array, deque) as it went, in its own
    thread: a batch cleared and refilled after submit() gave one run the next
    batch's items and another 8 of its 100 results, "done". The oracle is serial
    map over the input as it was at the call (concurrent.futures' submit)."""
    from collections import deque

    np = pytest.importorskip("numpy")
    batch, buf, table, queued = list(range(6)), np.arange(6.0), dict.fromkeys(range(6)), deque(range(6))
    expected = [[x * x for x in range(6)]] * 4
    runs = [mpmagic.submit(ns["slow"], given, chunksize=1) for given in (batch, buf, table, queued)]
    batch.clear()
    batch.extend([100, 101])
    buf[:] = -1.0
    table.clear()
    queued.clear()
    assert [list(r.result(60)) for r in runs] == expected
    assert all(r._job.inputs is None for r in runs)  # (the copies go with the run's end, not with the handle)

    # A read-only file-backed memmap cannot change through the notebook: not copied
    # (a copy would load the whole file into memory for the run).
    path = tmp_path / "m.bin"
    np.arange(6.0).tofile(path)
    mapped = np.memmap(path, dtype="f8", mode="r")
    assert mpmagic.api.owned((mapped,), (mapped,))[0] is mapped
    assert mpmagic.submit(ns["slow"], mapped, chunksize=1).result(60) == expected[0]

    def copied(*args):
        raise AssertionError("a blocking run copied its input")
    monkeypatch.setattr("mpmagic.api.owned", copied)  # a blocking run's input cannot change under it: no copy
    assert mpmagic.pmap(ns["square"], batch) == [100 * 100, 101 * 101]


def test_imap_over_a_list_its_loop_appends_to_says_the_new_items_were_not_mapped(ns, capsys):
    """A worklist loop (append follow-up items to the list imap reads) silently lost
    them, or mapped one of them, by timing; serial map maps them all."""
    todo = [1, 2, 3]
    got = []
    for v in mpmagic.imap(ns["square"], todo):
        got.append(v)
        todo.append(v + 1)
    assert got == [1, 4, 9]  # the items it had at the start, whatever the timing
    err = capsys.readouterr().err
    assert "the input list grew by 3 items while imap read it: they were not mapped" in err, err
    assert "queue.Queue" in err and len(err.strip().splitlines()) == 1
    assert list(mpmagic.imap(ns["square"], [1, 2])) == [1, 4] and not capsys.readouterr().err


def test_cancel_returns_at_once_while_an_on_chunk_call_is_in_progress(ns, monkeypatch):
    """cancel() waited for the run's on_chunk call in progress (up to 10 s, then
    returned True with the run still "running"); a Ctrl-C in that wait was a bare
    KeyboardInterrupt through threading.py."""
    from mpmagic import background

    called = threading.Event()

    def slow_callback(start, results):
        called.set()
        time.sleep(2.5)

    handle = mpmagic.submit(ns["slow"], range(40), chunksize=1, on_chunk=slow_callback)
    assert called.wait(60)
    t0 = time.monotonic()
    assert handle.cancel()
    assert time.monotonic() - t0 < 1.0
    assert handle.cancelled() and handle.state == "cancelled" and not handle.running()

    def pressed(self, run):
        raise KeyboardInterrupt
    monkeypatch.setattr(background.Run, "_wait_cancelled", pressed)
    other = mpmagic.submit(ns["napper"], range(4), chunksize=1)
    with pytest.raises(KeyboardInterrupt) as info:
        other.cancel()
    [line] = info.value._render_traceback_()
    assert line == (f"KeyboardInterrupt: cancel() interrupted: run {other.id} (pmap napper) stops in the "
                    "background all the same; %pool runs shows when it has")
    with pytest.raises(CancelledError):
        other.result(60)


def test_closing_a_stream_from_another_thread_cancels_its_run(ns):
    """close() from a timer's thread raised 'ValueError: generator already executing'
    there, and the loop ran to its end."""
    stream = mpmagic.imap(ns["slow"], range(60), chunksize=1)
    errors: list[BaseException] = []

    def close() -> None:
        try:
            stream.close()
        except BaseException as exc:
            errors.append(exc)
    got = []
    timer = threading.Timer(0.3, close)
    timer.start()
    with pytest.raises(CancelledError, match="was cancelled"):
        for v in stream:
            got.append(v)
    timer.join(10)
    assert not errors and len(got) < 60 and stream.run.state == "cancelled"


def test_an_interrupted_pmap_that_never_got_a_worker_says_nothing_was_stopped(ip, ns):
    """A foreground %pmap waiting behind a --bg run holding both workers was told, when
    interrupted, that 'the work still running was stopped and its workers replaced'."""
    run(ip, "import mpmagic, time\ndef hog(x):\n    time.sleep(3)\n    return x\n"
            "hogs = mpmagic.submit(hog, range(2), chunksize=1)\ntime.sleep(0.3)")
    replaced = mpmagic.get_pool().status()["workers_replaced"]
    text, err = interrupted_cell(ip, "%pmap --no-progress square, range(4)", after=0.4)
    assert type(err) is KeyboardInterrupt
    assert text.strip().endswith("KeyboardInterrupt: %pmap interrupted: none of its work had started (other runs "
                                 "held every worker), so nothing was stopped and no worker replaced; the pool is "
                                 "ready for the next run"), text
    assert mpmagic.get_pool().status()["workers_replaced"] == replaced
    ip.user_ns["hogs"].cancel()


def test_a_quiet_background_run_shows_no_report_in_its_live_area(ip, ns):
    """%pmap --bg -q (and submit's default show_report=False) showed the timing
    report in the run's live area all the same."""
    run(ip, "quiet = %pmap --bg -q square, range(4)\nloud = %pmap --bg square, range(4)")
    runs = [ip.user_ns["quiet"], ip.user_ns["loud"], mpmagic.submit(ns["square"], range(4)),
            mpmagic.submit(ns["square"], range(4), show_report=True)]
    for handle, shown in zip(runs, (False, True, False, True), strict=True):
        handle.result(60)
        bundle = handle._sink.bundle()
        report = handle.report().line()
        assert (report in bundle["text/plain"]) is shown, bundle
        assert ("speedup" in bundle["text/html"]) is shown


def test_a_kernels_shutdown_does_not_wait_for_a_busy_background_run(ip):
    """A shutdown request with a long ``--bg`` run in flight: the stop waited 2 s
    for its busy workers, and Jupyter SIGTERMed the kernel before it exited."""
    mpmagic.use_local(2)
    mpmagic.pmap(abs, [1, 2])
    handle = mpmagic.pmap(time.sleep, [30, 30], block=False)
    time.sleep(0.3)  # both workers busy
    start = time.monotonic()
    ip.exit_now = True  # (what a kernel's shutdown request does: pool.at_shell_exit)
    ip.exit_now = False
    assert time.monotonic() - start < 1.0
    # (and no "run it again": the shell is exiting)
    with pytest.raises(mpmagic.MPMagicError,
                       match="^the pool was stopped by the shell's exit while this run was in flight$"):
        handle.result(timeout=5)


# -- a script that ends with runs in flight ------------------------------------------
#: A script whose runs are in flight when it ends. ``work`` writes a file, as the tester's
#: repro did; each handle's done-callback writes its state; a daemon thread maps too (the
#: script waits to see that run submitted), and maps again once the exit began.
EXIT_SCRIPT = """
import os, sys, threading, time
import mpmagic
from mpmagic import background

method, out, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])

def work(x):
    time.sleep(seconds)
    with open(os.path.join(out, f"item_{x}"), "w") as f:
        f.write(str(x * x))
    return x * x

def note(run):
    with open(os.path.join(out, f"callback_{run.id}"), "w") as f:
        f.write(run.state)

def daemon():
    mpmagic.pmap(work, [10, 11])  # in flight when the script ends: the exit waits for it
    threading.main_thread().join()  # (returns once the exit began: Python's exit hooks before the joins ran)
    mpmagic.pmap(work, [20, 21])  # started once the exit began: the thread ends, as serial code's does

if __name__ == "__main__":
    mpmagic.start_pool(workers=2, start_method=method)
    pool = mpmagic.get_pool()
    mpmagic.pmap(abs, [-1, -2])  # (the workers are up)
    print(*(s.pid for s in pool.slots), flush=True)
    runs = [mpmagic.call(work, i) for i in range(4)] + [mpmagic.submit(work, [4, 5])]
    for r in runs:
        r.add_done_callback(note)
    thread = threading.Thread(target=daemon, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(r.thread == thread.name for r in list(pool._runs)) and time.monotonic() < deadline:
        time.sleep(0.005)
    print("ending", flush=True)
"""


def _start_script(tmp_path, method: str, seconds: float, code: str = EXIT_SCRIPT,
                  own_group: bool = False) -> subprocess.Popen:
    """Start ``code`` as a script (``own_group``: in a process group of its own, which
    the test kills whole if the script hangs: its forkserver and workers with it)."""
    script = tmp_path / "ends.py"
    script.write_text(code)
    out = tmp_path / "out"
    out.mkdir()
    return subprocess.Popen([sys.executable, str(script), method, str(out), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=own_group)


def _gone(pids: list[int]) -> bool:
    """Are the script's workers gone (or zombies left to init), within 10 s?"""
    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not [p for p in pids if running(p)]:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("start", ["forkserver", "fork"])
def test_a_script_ends_once_the_runs_it_left_in_flight_are_done(tmp_path, start):
    """Tester report (async), finding 1: a script whose ``call``/``submit`` runs were in
    flight when it ended exited at once, its tasks' files never written, every
    done-callback told "failed", nothing said; ``ProcessPoolExecutor`` runs that work
    first (its exit hook waits for it), and serial code ran it. A daemon thread's
    ``pmap`` printed a traceback of mpmagic's internals ("the pool was stopped while
    this run was in flight"). Now the exit waits for the runs in flight, and a daemon
    thread's run started after that ends the thread silently, as serial code's does."""
    proc = _start_script(tmp_path, start, 0.3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.splitlines()[1:] == ["ending"], out
    files = {f.name: f.read_text() for f in (tmp_path / "out").iterdir()}
    items = {name: text for name, text in files.items() if name.startswith("item_")}
    assert items == {f"item_{x}": str(x * x) for x in [0, 1, 2, 3, 4, 5, 10, 11]}  # not the daemon's 2nd map
    assert sorted(text for name, text in files.items() if name.startswith("callback_")) == ["done"] * 5
    # At most the line saying what the exit waits for (past 1 s of it: 8 items of 0.3 s on 2 workers).
    waiting = r"mpmagic: waiting for [1-6] runs? in flight to finish before exit; Ctrl-C stops them"
    assert all(re.fullmatch(waiting, line) for line in err.splitlines()) and len(err.splitlines()) <= 1, err
    assert _gone([int(p) for p in out.split()[:2]])


def test_the_exit_says_what_it_waits_for_and_ctrl_c_stops_the_runs_at_once(tmp_path):
    """Past a second of waiting one line says what the exit waits for and how to stop
    it; Ctrl-C then stops the runs (workers too) at once, the daemon thread whose map
    it stopped ends silently, and the script exits with no traceback."""
    proc = _start_script(tmp_path, "forkserver", 300)
    out, err = ctrl_c_during_the_exit_wait(proc, 6)
    assert proc.returncode == 0, err
    assert err == "mpmagic: Ctrl-C: stopping the 6 runs in flight\n"
    assert out.splitlines()[1:] == ["ending"]
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.startswith("item_")]
    assert _gone([int(p) for p in out.split()[:2]])


#: A done-callback chains a run on each run's end, as serial code's callback would call ``work`` again.
CHAIN_SCRIPT = """
import os, sys, time
import mpmagic
from mpmagic import background

method, out, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])

def work(x):
    time.sleep(seconds)
    with open(os.path.join(out, f"item_{x}"), "w") as f:
        f.write(str(x))
    return x

def chain(run):
    n = run.result()
    if n < 3:
        mpmagic.call(work, n + 1).add_done_callback(chain)
    open(os.path.join(out, f"chained_{n}"), "w").close()

if __name__ == "__main__":
    mpmagic.start_pool(workers=2, start_method=method)
    mpmagic.call(work, 0).add_done_callback(chain)
    print("ending", flush=True)
"""


def test_a_run_a_done_callback_starts_during_the_exit_wait_is_waited_for_too(tmp_path):
    """Tester report (today), finding 3: a run started by the done-callback of a run the
    exit waited for was dropped without a word (the callback's thread ended silently:
    its ``call`` never returned). That run is part of the work the exit waits for: it
    runs, its own callback too, as serially (the chain of 4 calls)."""
    proc = _start_script(tmp_path, "forkserver", 0.1, CHAIN_SCRIPT, own_group=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:  # (a hung script and its forkserver outlived the test for 10+ minutes)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == "ending\n"
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(
        [f"item_{n}" for n in range(4)] + [f"chained_{n}" for n in range(4)])
    waiting = r"mpmagic: waiting for 1 run in flight to finish before exit; Ctrl-C stops them"
    assert all(re.fullmatch(waiting, line) for line in err.splitlines()) and len(err.splitlines()) <= 1, err


def _no_pump_thread_at_exit(monkeypatch) -> None:
    """As CPython 3.12.0-3.12.2 during the exit (gh-113964): a background run's pump
    thread is refused with their RuntimeError (every other thread starts)."""
    start = threading.Thread.start

    def refusing(thread):
        if thread.name.startswith("mpmagic-bg-"):
            raise RuntimeError("can't create new thread at interpreter shutdown")
        return start(thread)

    monkeypatch.setattr(threading.Thread, "start", refusing)


def test_a_run_whose_pump_thread_python_refuses_at_exit_runs_in_the_callers_thread(ns, monkeypatch):
    """Tester (Python versions), finding 1: on 3.12.0-3.12.2 a done-callback's run during
    the exit wait failed at ``pump.start()`` with mpmagic's traceback, stayed counted as
    in flight, and the exit waited for it for ever. It is pumped in the calling thread
    instead: its result is serial Python's, and nothing is left in flight."""
    _no_pump_thread_at_exit(monkeypatch)
    handle = mpmagic.call(ns["square"], 7)
    assert handle.done() and handle.result() == ns["square"](7)
    assert background._waited_at_exit() == []


def test_a_run_lost_to_a_thread_refused_at_exit_says_so_in_one_line(ip, ns, monkeypatch, capsys):
    """Tester (Python versions), finding 2: on 3.12.0-3.12.2, Dask's client could start no
    thread during the exit wait; the runs failed, the script ended rc 0 and nothing said
    so. A run that fails that way at exit says in one line that it could not finish and why."""
    from mpmagic import exiting

    run(ip, "def refused(x):\n    raise RuntimeError(\"can't create new thread at interpreter shutdown\")")
    monkeypatch.setattr(exiting, "_began", True)
    handle = mpmagic.call(ip.user_ns["refused"], 1)
    with pytest.raises(RuntimeError):
        handle.result(60)
    lines = capsys.readouterr().err.splitlines()
    version = ".".join(map(str, sys.version_info[:3]))
    assert lines == [f"mpmagic: run {handle.id} (call refused) could not finish: Python {version} refused to "
                     f"start a thread while exiting (CPython 3.12.0-3.12.2 do; 3.12.3+ does not); upgrade "
                     f"Python, or wait for the run (run.result()) before the script ends"]


#: A non-daemon thread's ``pmap`` and a background ``call`` in flight when the script ends.
JOINED_SCRIPT = """
import os, sys, threading, time
import mpmagic
from mpmagic import background

method, out, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])

if __name__ == "__main__":
    mpmagic.start_pool(workers=2, start_method=method)
    pool = mpmagic.get_pool()
    threading.Thread(target=mpmagic.pmap, args=(time.sleep, [seconds])).start()
    mpmagic.call(time.sleep, seconds)
    while len(pool._runs) < 2:
        time.sleep(0.005)
    print("ending", flush=True)
"""


def test_the_exit_lines_count_the_same_runs(tmp_path):
    """Tester report (today), minor: "waiting for 1 run in flight" (a non-daemon
    thread's run left out) then "Ctrl-C: stopping the 2 runs in flight". Both lines
    count every run in flight, the joined thread's too (the exit waits for it as well)."""
    proc = _start_script(tmp_path, "forkserver", 300, JOINED_SCRIPT)
    out, err = ctrl_c_during_the_exit_wait(proc, 2)
    assert proc.returncode == 0, err
    assert err == "mpmagic: Ctrl-C: stopping the 2 runs in flight\n"


def test_a_script_ended_by_ctrl_c_does_not_wait_for_its_runs(tmp_path):
    """The user asked the script to stop: its runs in flight are stopped as before
    (no wait, no line), as a kernel's shutdown stops them (test_kernel)."""
    code = EXIT_SCRIPT.replace('print("ending", flush=True)', 'print("ending", flush=True)\n    time.sleep(300)')
    proc = _start_script(tmp_path, "forkserver", 300, code)
    try:
        while proc.stdout.readline() not in ("ending\n", ""):
            pass
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGINT, err
    assert err.rstrip().endswith("KeyboardInterrupt") and "mpmagic" not in err, err


def _upper(s: str) -> str:
    return s.upper()


def _scaled_sum(a: int, b: int, scale: int = 1) -> int:
    return (a + b) * scale


def _inverse(x: int) -> float:
    return 1 / x


def test_call_is_one_call_as_executor_submit_and_submit_says_it_maps(ns):
    """mpmagic.call(f, *args, **kwargs) is Executor.submit / apply_async: result() is
    f's value, as serial f gives it; submit(f, 5), read as Executor.submit, says it
    maps and how to run one call (report migrate14 finding 5)."""
    assert mpmagic.call(_upper, "abc").result(30) == _upper("abc") == "ABC"
    assert mpmagic.submit(_upper, "abc").result(30) == list(map(_upper, "abc"))  # (a map: the porter's surprise)
    assert mpmagic.call(_scaled_sum, 1, 2, scale=10).result(30) == _scaled_sum(1, 2, scale=10)
    handle = mpmagic.call(_inverse, 0)
    with pytest.raises(ZeroDivisionError) as got:
        handle.result(30)
    with pytest.raises(ZeroDivisionError) as serial:
        _inverse(0)
    assert got.value.args == serial.value.args
    with pytest.raises(UsageError, match=r"^submit maps func over its iterables like map\(\), so argument 2 must be "
                                         r"iterable, not int 5; for one call func\(x\) use mpmagic\.call\(func, x\)"):
        mpmagic.submit(_inverse, 5)
    with pytest.raises(UsageError, match="must be a function to call, not int 5"):
        mpmagic.call(5)  # type: ignore[call-overload]


def _inverts(x: int, scale: int = 1) -> float:
    return scale / x


def test_a_failed_call_says_the_call_failed_not_item_0(ns):
    """mpmagic.call runs one function call, not a map: its error, its report's line, its
    %pool row name the call, never "item 0" or "0/1 items" (its log records: test_worker_logging)."""
    handle = mpmagic.call(_inverts, 0, scale=2)
    with pytest.raises(ZeroDivisionError) as got:
        handle.result(30)
    assert got.value.__notes__ == ["mpmagic: raised in the call _inverts(0, scale=2)"]
    assert re.fullmatch(r"run \d+: call _inverts, \S+ m?s, failed", handle.status_line())
    assert re.fullmatch(r"call failed, \S+ m?s", handle.report().line())
    (row,) = [r for r in mpmagic.runs().rows() if r["id"] == handle.id]
    assert repr(mpmagic.runs()).splitlines()[-1].strip() == handle.status_line()
    from mpmagic.status import runs_html

    assert "0/1" not in runs_html([row]) and "call _inverts" in runs_html([row])
    # a worker dying in the call: "the worker running the call f(x)", as its error says
    lost = mpmagic.call(os._exit, 3)
    with pytest.raises(mpmagic.WorkerLostError, match=r"^the worker running the call _exit\(3\) exited"):
        lost.result(30)


def test_as_completed_takes_a_list_of_runs_as_concurrent_futures_does(ns):
    handles = [mpmagic.call(_scaled_sum, i, 1) for i in range(4)]
    ended = list(mpmagic.as_completed(handles, timeout=30))
    assert sorted(ended, key=id) == sorted(handles, key=id)  # the handles themselves, each once
    assert sorted(h.result() for h in ended) == [1, 2, 3, 4]
    with pytest.raises(UsageError, match="or an iterable of run handles; item 1 of the list is int, not a run handle"):
        mpmagic.as_completed([handles[0], 2])  # type: ignore[list-item]


def test_as_completed_takes_any_iterable_of_runs_even_an_empty_one_as_concurrent_futures_does(ns):
    """An empty list and a generator of handles were refused ("..., or a list of run handles, not list")."""
    import concurrent.futures as cf

    assert list(mpmagic.as_completed([])) == list(cf.as_completed([])) == []
    assert list(mpmagic.as_completed(x for x in ())) == []
    ended = mpmagic.as_completed((mpmagic.call(_scaled_sum, i, 1) for i in range(2)), timeout=30)
    assert sorted(h.result() for h in ended) == [1, 2]


def test_the_live_areas_html_shows_the_tasks_ansi_colours_as_colours_not_codes(ip, ns):
    """The live area's HTML (what Jupyter shows of it) had a failed rank's coloured
    traceback as literal ``[31m-----[39m``: the output was HTML-escaped only. Its
    text/plain form keeps the codes, as a cell's stream does."""
    run(ip, "def colourful(x):\n"
            "    print(f'\\x1b[31mred {x}\\x1b[0m plain \\x1b[1;38;5;28mbold\\x1b[22;39m <&>')\n"
            "    return x\n")
    handle = mpmagic.submit(ns["colourful"], [1])
    assert handle.result(60) == [1]
    bundle = handle._sink.bundle()
    assert "\x1b[31mred 1\x1b[0m" in bundle["text/plain"]
    page = bundle["text/html"]
    assert "\x1b" not in page and "[31m" not in page and "[0m" not in page, page
    assert ("<span style='color:#E75C58'>red 1</span> plain "
            "<span style='color:#008700;font-weight:bold'>bold</span> &lt;&amp;&gt;") in page, page


def test_ansi_to_html_keeps_the_text_and_drops_every_escape():
    """IPython's coloured traceback (its own codes), other escapes (erase line, a title,
    a sequence cut short): the HTML's text is the text without them."""
    from html.parser import HTMLParser

    from mpmagic.ansi import to_html

    text = ("[rank 1] \x1b[31m---------\x1b[39m\n[rank 1] \x1b[31mValueError\x1b[39m    Traceback\n"
            "[rank 1] \x1b[36mCell\x1b[39m\x1b[36m \x1b[39m\x1b[32mIn[2]\x1b[39m\x1b[32m, line 3\x1b[39m\n"
            "[rank 1] \x1b[32m----> \x1b[39m\x1b[32m3\x1b[39m     \x1b[38;5;28;01mraise\x1b[39;00m ValueError('<boom>')\n"
            "\x1b[2K\x1b]0;a title\x07\x1b[48;2;1;2;3mrgb\x1b[49m \x1b[97;100mbright\x1b[0m cut \x1b")

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.parts: list[str] = []

        def handle_data(self, data: str) -> None:
            self.parts.append(data)

    page = to_html(text)
    parser = Text()
    parser.feed(page)
    expected = re.sub(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07)?", "", text)
    assert "".join(parser.parts) == expected
    assert "\x1b" not in page and page.count("<span") == page.count("</span>")
    assert "<span style='background-color:#010203'>rgb</span>" in page
    assert "<span style='color:#A1A6B2;background-color:#282C36'>bright</span>" in page
    assert to_html("no colour <here>") == "no colour &lt;here&gt;"


def test_a_cells_run_label_quotes_its_start_and_marks_what_was_cut(ip, ns, monkeypatch):
    """The label cut the cell's first line at 30 characters with no mark:
    ``parallel -n 2: print('<b>not bold</b> & co', , 2/2 ranks`` (a dangling ``, ,``)."""
    from mpmagic.fmt import code_snippet, ellipsis

    dots = ellipsis()
    handle = run(ip, "%%parallel -n 2 -q --bg\nif rank == 1:\n    pass\nrank")
    handle.result(60)
    assert handle.what == f"parallel -n 2 `if rank == 1: {dots}`"
    assert f"parallel -n 2 `if rank == 1: {dots}`, 2/2 ranks, " in repr(handle)
    assert run(ip, "%%parallel -n 1 -q --bg\n\nrank\n\n").what == "parallel -n 1 `rank`"  # (one line: no mark)
    long = "print('<b>not bold</b> & co', rank, 'and then much more text')"
    assert code_snippet(long) == f"print('<b>not bold</b> & co', rank {dots}"  # (at a space, no dangling comma)
    assert code_snippet("x" * 60 + "\n") == "x" * 40 + f" {dots}"
    assert code_snippet("\n \n") == ""
    import io

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    assert code_snippet("a\nb") == "a ..."  # (an ASCII terminal: as fmt.micro's "us")


@pytest.mark.parametrize("started", ["before", "after"])
@pytest.mark.parametrize("how", ["result", "imap"])
def test_the_first_ctrl_c_in_a_new_wait_acts_even_just_after_an_interrupted_run(ns, how, started):
    """Half a second after an interrupted run, presses are taken as repeats of it
    (interrupts.py). A background run started then (or before), and waited for, took
    the user's first Ctrl-C for such a repeat and dropped it: the wait went on to the
    run's end."""
    from mpmagic import interrupts

    def start():
        return mpmagic.submit(ns["napper"], [1, 2, 3, 4], chunksize=1) if how == "result" else \
            mpmagic.imap(ns["napper"], [1, 2, 3, 4], chunksize=1)

    handle = start() if started == "before" else None
    interrupts.absorb_late_interrupts(30)  # (as an interrupted run leaves it, for long)
    try:
        handle = handle or start()
        main = threading.main_thread().ident
        threading.Timer(0.1, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt, match="interrupted"):
            handle.result() if how == "result" else list(handle)
        assert time.monotonic() - t0 < 0.9
    finally:
        interrupts.restore()


# A map reads an iterator input (a generator: ``iter(x) is x``) in chunks, ahead of the
# calls. Serially, map stopped at item k has read items 0..k, and the same iterator goes
# on right after; a run that stops early has read it further, and the items it read and
# never returned would be silently missing from the next run given that iterator. A
# blocking run says so (test_inputs); a background run's error and its cancel say it too.
READ_PAST = "to map it again, make its input again (an iterator: this one was read {read} items in, {past}, and goes " \
            "on from there)"


def _read_of(gen, total: int) -> int:
    """How far ``gen`` (of ``range(total)``) was read: where the same iterator goes on."""
    return total - sum(1 for _ in gen)


def test_a_failed_background_run_over_an_iterator_says_how_far_it_read_it(ns):
    picky = ns["picky"]
    serial_gen = iter(range(10**6))
    with pytest.raises(KeyError):
        list(map(picky, serial_gen))
    assert next(serial_gen) == 14  # serially: read up to the item that failed
    gen = iter(range(10**6))
    handle = mpmagic.submit(picky, gen)
    with pytest.raises(KeyError) as e:
        handle.result(60)
    read = _read_of(gen, 10**6)
    assert read > 14  # (read ahead, in chunks: for speed)
    notes = [n for n in e.value.__notes__ if "an iterator" in n]
    assert notes == ["mpmagic: " + READ_PAST.format(read=read, past="past item 13, which failed")], e.value.__notes__
    with pytest.raises(KeyError) as again:  # (one note however often result() raises it)
        handle.result()
    assert again.value.__notes__.count(notes[0]) == 1
    # A list (a range, an array) is read anew by each run, as serially: nothing to say.
    listed = mpmagic.submit(picky, list(range(1000)))
    with pytest.raises(KeyError) as e:
        listed.result(60)
    assert not any("an iterator" in n for n in getattr(e.value, "__notes__", []))


def _cancelled_once_one_finished(func, items) -> mpmagic.Run:
    handle = mpmagic.submit(func, items, chunksize=1)
    deadline = time.monotonic() + 30
    while handle.items_done < 1 and time.monotonic() < deadline:  # (some finished, others running)
        time.sleep(0.02)
    assert handle.cancel() is True
    return handle


def test_a_cancelled_background_run_over_an_iterator_says_how_far_it_read_it(ns):
    gen = iter(range(1000))
    handle = _cancelled_once_one_finished(ns["napper"], gen)
    with pytest.raises(CancelledError) as e:
        handle.result(10)
    read, done = _read_of(gen, 1000), handle.items_done
    assert read > done >= 1  # (the items running, and those read ahead of them)
    past = f"past the {done} that finished"
    assert str(e.value) == f"run {handle.id} (pmap napper) was cancelled; " + READ_PAST.format(read=read, past=past)
    with pytest.raises(CancelledError) as again:  # (exception() says it as result() does)
        handle.exception()
    assert str(again.value) == str(e.value)
    listed = _cancelled_once_one_finished(ns["napper"], list(range(1000)))
    with pytest.raises(CancelledError) as e:
        listed.result(10)
    assert str(e.value) == f"run {listed.id} (pmap napper) was cancelled"


def test_an_interrupted_imap_over_an_iterator_says_how_far_it_read_it(ip, ns):
    run(ip, "import mpmagic\ngen = iter(range(1000))\ngot = []")
    text, err = interrupted_cell(ip, "for v in mpmagic.imap(napper, gen, chunksize=1):\n    got.append(v)")
    handle = mpmagic.runs()[-1]
    assert type(err) is KeyboardInterrupt and handle.what == "imap napper"
    read, n = run(ip, "1000 - sum(1 for _ in gen)"), len(ip.user_ns["got"])
    assert read > n  # serially, a loop that got n results has read n items
    results = "result" if n == 1 else "results"
    assert text.strip() == (f"KeyboardInterrupt: imap interrupted: its run {handle.id} (imap napper) was cancelled, "
                            "the work still running was stopped and its workers replaced; the pool is ready "
                            "for the next run; " + READ_PAST.format(read=read, past=f"past the {n} {results} the "
                                                                                   "loop got")), text
