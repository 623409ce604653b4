"""After an item's error, an ``imap`` loop goes on, as serial ``map`` does.

Serial ``map`` raises a failing item's error from ``next()`` and gives the
next item's result at the next ``next()``: a loop that logs the error and
keeps going gets every other result. ``mpmagic.imap`` ended there (the next
``next()`` raised StopIteration), so such a loop silently lost the later
results. The oracle is serial ``map`` drained by the same loop, on each pool
of ``conftest.BACKENDS`` (local forkserver, local spawn, Dask). What cannot
go on (the run itself ended: an item that cannot be sent, ``as_completed``
over a run that stopped at its first error) says so in one more error, never
with a silent StopIteration.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import run

import mpmagic

DEFS = """
import threading
def f(x):
    if x in (1, 5):
        raise ValueError(f'bad item {x}')
    return x * 10
def until_3():
    yield from range(3)
    raise RuntimeError('the input broke at 3')
UNSENDABLE_AT_2 = [0, 1, threading.Lock(), 3, 4]
def g(x):
    return x if not isinstance(x, int) else x * 10
def lock_at_2(x):
    return threading.Lock() if x == 2 else x
def nap(x):
    import time
    time.sleep(0.2)
    return -x
"""


def drain(it: Iterator[Any]) -> list[Any]:
    """A loop that logs each error and keeps going: results, and ``(type, message)`` for each error."""
    out: list[Any] = []
    for _ in range(1000):  # (bounded: a stream that raised for ever fails the test instead of hanging)
        try:
            out.append(next(it))
        except StopIteration:
            return out
        except Exception as exc:
            out.append((type(exc).__name__, str(exc)))
    raise AssertionError(f"no end after 1000 next() calls: {out[:20]}")


@pytest.fixture
def ns(ip, backend):
    run(ip, DEFS)
    yield ip.user_ns
    for r in mpmagic.runs():
        r.cancel()


# Serial map() of a DEFS function over an input, the oracle: computed once per (name, input)
# in this module (the same DEFS on every backend), as nap sleeps 0.2 s an item (1.6 s a test).
_serial: dict[tuple[str, tuple], list] = {}


def serial_map(ns: dict, name: str, items: range) -> list:
    key = (name, tuple(items))
    if key not in _serial:
        _serial[key] = list(map(ns[name], items))
    return list(_serial[key])


@pytest.mark.parametrize("chunksize", [1, 4])
@pytest.mark.parametrize("ordered", [True, False])
def test_an_imap_loop_that_catches_an_items_error_gets_the_later_results_as_serial_map(ns, ordered, chunksize):
    f = ns["f"]
    serial = drain(map(f, range(12)))
    assert serial == [0, ("ValueError", "bad item 1"), 20, 30, 40, ("ValueError", "bad item 5"),
                      *(x * 10 for x in range(6, 12))]
    stream = mpmagic.imap(f, range(12), ordered=ordered, chunksize=chunksize)
    got = drain(iter(stream))
    if ordered:
        assert got == serial
    else:
        assert Counter(got) == Counter(serial)
    # The run went on to its end: done (not failed), its two failed items counted.
    handle = stream.run
    assert handle is not None and handle.wait(30)
    assert (handle.state, handle.items_done, handle.items_failed) == ("done", 12, 2), repr(handle)
    assert "(2 failed)" in handle.report().line()


def test_a_for_loop_left_at_an_items_error_goes_on_where_it_stopped(ns):
    """``for`` over the iterator again after its error: the later results, as over ``map``'s."""
    f = ns["f"]

    def two_loops(it: Iterator[Any]) -> tuple[list, list]:
        first: list = []
        with pytest.raises(ValueError, match="bad item 1"):
            for value in it:
                first.append(value)
        return first, [next(it) for _ in range(3)]

    assert two_loops(iter(mpmagic.imap(f, range(12), chunksize=3))) == two_loops(map(f, range(12)))


def test_an_input_that_raises_ends_the_loop_as_it_ends_serial_map(ns):
    """A generator that raised is finished: serial map raises its error, then ends."""
    f, until_3 = ns["f"], ns["until_3"]
    serial = drain(map(f, until_3()))
    assert serial == [0, ("ValueError", "bad item 1"), 20, ("RuntimeError", "the input broke at 3")]
    assert drain(iter(mpmagic.imap(f, until_3(), chunksize=1))) == serial


@pytest.mark.parametrize("exc", [SystemExit(3), GeneratorExit(), KeyboardInterrupt("from the input")],
                         ids=["SystemExit", "GeneratorExit", "KeyboardInterrupt"])
def test_an_input_raising_a_base_exception_gives_the_items_before_it_as_serial_map(ns, exc):
    """An input is read in the run's own thread (imap, submit), where no Ctrl-C lands: a
    SystemExit, GeneratorExit or KeyboardInterrupt there is the input's own error, raised
    after the results of the items it gave, as serial map raises it. It escaped the reading
    and ended the run at once: the loop lost the results before it (2 of 5 here)."""
    def until_5():
        yield from range(5)
        raise exc

    def drain_all(it: Iterator[Any]) -> list[Any]:
        out: list[Any] = []
        try:
            out.extend(it)
        except BaseException as e:  # (SystemExit and the others are no Exception)
            out.append(type(e).__name__)
        return out

    serial = drain_all(map(ns["g"], until_5()))
    assert serial == [0, 10, 20, 30, 40, type(exc).__name__]
    assert drain_all(iter(mpmagic.imap(ns["g"], until_5(), chunksize=1))) == serial
    handle = mpmagic.submit(ns["g"], until_5(), chunksize=1)
    got = drain_all(mpmagic.as_completed(handle))  # (as they finished)
    assert (sorted(got[:-1]), got[-1:]) == (serial[:-1], serial[-1:])
    assert type(handle.exception(timeout=30)) is type(exc)


def test_an_item_that_cannot_be_sent_ends_the_stream_saying_so_not_silently(ns):
    """Serial map would go on past an item mpmagic cannot send; the stream cannot:
    after that item's error, the next next() says the run ended there, then the stream ends."""
    got = drain(iter(mpmagic.imap(ns["g"], ns["UNSENDABLE_AT_2"], chunksize=1)))
    assert got[:2] == [0, 10]
    assert got[2][0] == "SerializationError" and "item 2" in got[2][1]
    assert got[3][0] == "MPMagicError" and "ended with the SerializationError raised before" in got[3][1], got
    assert len(got) == 4


def test_a_result_that_cannot_come_back_fails_its_item_and_the_loop_goes_on(ns):
    """The one failure serial map does not have: a result that cannot be pickled home. It is
    that item's error, raised in its place, as an item's own is; the later items come after it."""
    got = drain(iter(mpmagic.imap(ns["lock_at_2"], range(6), chunksize=3)))
    assert got[:2] == [0, 1] and got[3:] == [3, 4, 5], got
    assert got[2][0] == "SerializationError" and "cannot be sent back" in got[2][1], got


def test_as_completed_after_a_runs_first_error_says_the_rest_did_not_run(ns):
    """A background map with errors='raise' stops at its first error, as a blocking pmap:
    as_completed raises it after the results that came, then says so instead of ending silently.
    With errors='collect' every item is there, each failure a Failed in its place."""
    f = ns["f"]
    handle = mpmagic.submit(f, range(12), chunksize=1)
    assert handle.wait(60)
    got = drain(mpmagic.as_completed(handle))
    errors = [g for g in got if isinstance(g, tuple)]
    assert errors[0] == ("ValueError", "bad item 1")
    assert errors[1][0] == "MPMagicError" and "stopped at the ValueError raised before" in errors[1][1], got
    assert len(errors) == 2 and got[-1] == errors[1]
    collected = mpmagic.submit(f, range(12), chunksize=3, errors="collect")
    results = list(mpmagic.as_completed(collected))
    assert sorted(r for r in results if not isinstance(r, mpmagic.Failed)) == [x * 10 for x in range(12)
                                                                              if x not in (1, 5)]
    assert sorted(r.index for r in results if isinstance(r, mpmagic.Failed)) == [1, 5]


def test_as_completed_after_a_cancel_says_nothing_more_comes_not_a_silent_end(ns):
    """A run cancelled in the middle of an as_completed loop: the loop got CancelledError, and
    the next next() ended it (StopIteration), so a loop that logs errors and goes on took the
    end for every result having come. As after a run's error, the next next() says so (a
    CancelledError again, as a cancelled future's result() raises it each time), then it ends."""
    handle = mpmagic.submit(ns["nap"], range(8), chunksize=1)
    it = mpmagic.as_completed(handle)
    first = next(it)
    assert handle.cancel()
    got = [first, *drain(it)]
    errors = [g for g in got if isinstance(g, tuple)]
    results = [g for g in got if not isinstance(g, tuple)]
    assert set(results) <= set(serial_map(ns, "nap", range(8))) and len(results) < 8, got
    assert [name for name, _ in errors] == ["CancelledError", "CancelledError"], got
    assert "was cancelled" in errors[0][1] and got[-1] == errors[1], got
    assert f"the loop got {len(results)} of 8 results, the other item" in errors[1][1], got
    assert "nothing more comes" in errors[1][1], got


def test_as_completeds_cancel_and_stop_messages_read_right_for_one_item(ns):
    """as_completed over a cancelled run of one item said "0 of 1 results came, the other
    items gave none" (and "1 of 1 results came" had the result come first): its
    words are imap's now (``streaming.cancelled_words``, ``stopped_words``), the first
    CancelledError saying what the loop got too. After a run's first error likewise:
    "0 of 1 results came" read as one item that was there."""
    handle = mpmagic.submit(ns["nap"], [5], chunksize=1)
    assert handle.cancel()
    got = drain(mpmagic.as_completed(handle))
    results = [g for g in got if not isinstance(g, tuple)]
    errors = [g for g in got if isinstance(g, tuple)]
    assert results == [] and [name for name, _ in errors] == ["CancelledError", "CancelledError"], got
    name = f"run {handle.id} (pmap nap) was cancelled"
    assert errors[0][1] == f"{name}: the loop got no result; its one item will not come", errors
    assert errors[1][1] == (f"{name} (the CancelledError raised before): the loop got no result, "
                            "and nothing more comes"), errors
    failing = mpmagic.submit(ns["f"], [1], chunksize=1)
    assert failing.wait(60)
    got = drain(mpmagic.as_completed(failing))
    assert got[0] == ("ValueError", "bad item 1") and got[1][0] == "MPMagicError", got
    assert ": the loop got no result, and nothing more comes; with errors='collect'" in got[1][1], got
    assert "0 of 1" not in got[1][1] and "the other items" not in got[1][1], got
    several = mpmagic.submit(ns["f"], range(4), chunksize=1)
    assert several.wait(60)
    got = drain(mpmagic.as_completed(several))
    n = len([g for g in got if not isinstance(g, tuple)])
    others = "the other item gave none" if n == 3 else "the other items gave none"
    words = "the loop got no result" if n == 0 else f"the loop got {n} of 4 results, {others}"
    assert f": {words}, and nothing more comes;" in got[-1][1], got


@pytest.mark.parametrize("ordered", [True, False])
def test_an_imap_loop_after_a_cancel_says_nothing_more_comes_not_a_silent_end(ns, ordered):
    """A stream whose run was cancelled (run.cancel(), %pool cancel) mid-loop: a loop that logs
    errors and goes on got one bare CancelledError, then StopIteration, as if every result had
    come, where as_completed says so once more. It raises CancelledError where the results stop,
    saying how many the loop got (ordered: the first item that will not come), CancelledError
    again at the next next(), then ends. The results before it are serial map's first ones."""
    nap = ns["nap"]
    serial = serial_map(ns, "nap", range(8))
    stream = mpmagic.imap(nap, range(8), chunksize=1, ordered=ordered)
    it = iter(stream)
    first = next(it)
    assert stream.run.cancel()
    got = [first, *drain(it)]
    errors = [g for g in got if isinstance(g, tuple)]
    results = [g for g in got if not isinstance(g, tuple)]
    n = len(results)
    assert 1 <= n < 8, got
    if ordered:
        assert results == serial[:n], got
    else:
        assert set(results) <= set(serial) and len(set(results)) == n, got
    assert [name for name, _ in errors] == ["CancelledError", "CancelledError"], got
    assert got[-2:] == errors, got  # (after every result the loop got, then the end)
    run_name = f"run {stream.run.id} (imap nap) was cancelled"
    if ordered:
        got = "the result of its first item (of 8)" if n == 1 else f"the results of its first {n} of 8 items"
        rest = "item 7, its last, will not come" if n == 7 else f"item {n} and the items after it will not come"
        assert errors[0][1] == f"{run_name}: the loop got {got}; {rest}", errors
    else:
        rest = "the other item will not come" if n == 7 else "the other items will not come"
        assert errors[0][1] == f"{run_name}: the loop got {n} of 8 results (as they finished); {rest}", errors
    others = "the other item gave none" if n == 7 else "the other items gave none"
    assert errors[1][1] == (f"{run_name} (the CancelledError raised before): the loop got {n} of 8 results, "
                            f"{others}, and nothing more comes"), errors
    assert stream.run.state == "cancelled"


def test_a_cancelled_imaps_message_reads_right_for_none_one_and_many_items():
    """"none of its 10 items' will come": a stray apostrophe, and "none of its 1 items",
    "its first 1 of 8 items", "item 7 and the items after it" for the last item. Each
    count now has its own words, ordered or not, and after it the next next()'s."""
    from mpmagic.streaming import cancelled_words, stopped_words

    assert cancelled_words(0, 10, True) == "the loop got no result; none of its 10 items will come"
    assert cancelled_words(0, None, False) == "the loop got no result; none of its items will come"
    assert cancelled_words(0, 1, True) == "the loop got no result; its one item will not come"
    assert cancelled_words(1, 8, True) == ("the loop got the result of its first item (of 8); item 1 and the items "
                                           "after it will not come")
    assert cancelled_words(3, 8, True) == ("the loop got the results of its first 3 of 8 items; item 3 and the items "
                                           "after it will not come")
    assert cancelled_words(7, 8, True) == "the loop got the results of its first 7 of 8 items; item 7, its last, will not come"
    assert cancelled_words(1, None, True) == "the loop got the result of its first item; item 1 and the items after it will not come"
    assert cancelled_words(1, 8, False) == "the loop got 1 of 8 results (as they finished); the other items will not come"
    assert cancelled_words(7, 8, False) == "the loop got 7 of 8 results (as they finished); the other item will not come"
    assert cancelled_words(1, None, False) == "the loop got 1 result (as they finished); the other items will not come"
    assert cancelled_words(1, 1, True) == "the loop had got its one result"
    assert cancelled_words(8, 8, False) == "the loop had got all 8 results"
    assert cancelled_words(0, 0, True) == "the loop had no item to get a result for"
    assert stopped_words(0, 10) == "the loop got no result, and nothing more comes"
    assert stopped_words(1, 8) == "the loop got 1 of 8 results, the other items gave none, and nothing more comes"
    assert stopped_words(7, 8) == "the loop got 7 of 8 results, the other item gave none, and nothing more comes"
    assert stopped_words(1, None) == "the loop got 1 result, the other items gave none, and nothing more comes"
    assert stopped_words(1, 1) == "the loop had got its one result, and nothing more comes"
    assert stopped_words(8, 8) == "the loop had got all 8 results, and nothing more comes"


def test_as_completed_goes_on_after_a_time_out_it_raised(ns):
    """``timeout=`` bounds the wait for the next chunk; the run goes on, and so can the loop:
    it ended at the first TimeoutError (the next next() raised StopIteration)."""
    handle = mpmagic.submit(ns["nap"], range(4), chunksize=1)
    it = mpmagic.as_completed(handle, timeout=0.01)
    got, timeouts = [], 0
    for _ in range(10_000):
        try:
            got.append(next(it))
        except TimeoutError:
            timeouts += 1
        except StopIteration:
            break
    assert timeouts >= 1 and sorted(got) == sorted(serial_map(ns, "nap", range(4)))


# An iterator input (a generator: ``iter(x) is x``) is read ahead of the loop, in chunks.
# Serially, a loop over map that an item's error ended (or that got n results) has read
# the items up to that one (n items), and the same iterator goes on right after; the
# items the stream read and never returned would be silently missing from a next run
# given that iterator. Where the loop's error surfaces, it says how far the input was read.
def _read_of(gen: Iterator[int], total: int) -> int:
    """How far ``gen`` (of ``range(total)``) was read: where the same iterator goes on."""
    return total - sum(1 for _ in gen)


def test_an_imap_loop_an_items_error_ended_says_how_far_it_read_the_iterator(ns):
    f = ns["f"]
    serial_gen = iter(range(10**6))
    with pytest.raises(ValueError, match="bad item 1"):
        for _ in map(f, serial_gen):
            pass
    assert next(serial_gen) == 2  # serially: read up to the item that failed
    gen = iter(range(10**6))
    stream = mpmagic.imap(f, gen)
    with pytest.raises(ValueError, match="bad item 1") as e:
        for _ in stream:
            pass
    notes = [n for n in e.value.__notes__ if "an iterator" in n]
    assert len(notes) == 1, e.value.__notes__
    read_then = int(notes[0].split(" was read ")[1].split(" ")[0])
    assert notes[0] == (f"mpmagic: to map it again, make its input again (an iterator: this one was read {read_then} "
                        "items in so far, past item 1, which failed, and goes on from there)"), notes
    stream.close()
    assert stream.run is not None and stream.run.wait(30)
    assert 2 < read_then <= _read_of(gen, 10**6)  # ("so far": the open stream read on until it was closed)
    # Over a list, as serially: read anew by the next run, nothing to say.
    with pytest.raises(ValueError, match="bad item 1") as e:
        for _ in mpmagic.imap(f, list(range(1000))):
            pass
    assert not any("an iterator" in n for n in getattr(e.value, "__notes__", []))


def test_an_imap_loop_after_a_cancel_says_how_far_it_read_the_iterator(ns):
    gen = iter(range(1000))
    stream = mpmagic.imap(ns["nap"], gen, chunksize=1)
    it = iter(stream)
    first = next(it)
    assert stream.run is not None and stream.run.cancel()
    got = [first, *drain(it)]
    n = len([g for g in got if not isinstance(g, tuple)])
    read = _read_of(gen, 1000)
    assert read > n  # serially, a loop that got n results has read n items
    results = "result" if n == 1 else "results"
    cancelled = got[n]
    assert cancelled[0] == "CancelledError", got
    assert cancelled[1].endswith(f"; to map it again, make its input again (an iterator: this one was read {read} "
                                 f"items in, past the {n} {results} the loop got, and goes on from there)"), cancelled


def test_as_completed_after_a_cancel_says_how_far_the_run_read_the_iterator(ns):
    gen = iter(range(1000))
    handle = mpmagic.submit(ns["nap"], gen, chunksize=1)
    it = mpmagic.as_completed(handle)
    first = next(it)
    assert handle.cancel()
    got = [first, *drain(it)]
    n = len([g for g in got if not isinstance(g, tuple)])
    read = _read_of(gen, 1000)
    assert read > n  # serially, a loop that got n results has read n items
    results = "result" if n == 1 else "results"
    assert got[n][0] == "CancelledError", got
    assert got[n][1].endswith(f"; to map it again, make its input again (an iterator: this one was read {read} "
                              f"items in, past the {n} {results} the loop got, and goes on from there)"), got
