"""--rerun-failed finds the function as the failed call named it; a failure's locals
cost no more than what is shown of them; a failed imap loop is named by %pdebug
and --rerun-failed when they act on an older run.

Serial Python is the oracle: a re-run's results are what calling the function the
re-run uses on each failed item gives here, and a local's shown repr is ``repr()``
of it, cut to 200 characters."""

from __future__ import annotations

import collections
import gc
import io
import re
import sys

import pytest
from conftest import run

import mpmagic
from mpmagic.debugging import MAX_REPR, _bounded_repr, _ReprClock


def _outcomes(results: list) -> list:
    """A result list with each ``Failed`` as its exception's type (comparable to :func:`_serial`)."""
    return [type(r.error) if isinstance(r, mpmagic.Failed) else r for r in results]


def _serial(func, items) -> list:
    """``func`` on each item here: its value, or the type of what it raised."""
    out = []
    for item in items:
        try:
            out.append(func(item))
        except Exception as exc:
            out.append(type(exc))
    return out


def _rerun(ip, capsys, line: str = "%pmap -q --rerun-failed") -> tuple[list, str]:
    """Run ``line``; (its results, what it printed besides them)."""
    capsys.readouterr()
    run(ip, f"rerun_results = {line}")
    return ip.user_ns.pop("rerun_results"), capsys.readouterr().out


def test_rerun_failed_looks_func_up_as_the_line_wrote_it_never_by_its_bare_name(ip, local_pool, capsys):
    """It looked up ``func.__name__`` in the notebook: ``m.transform`` re-ran as an
    unrelated global ``transform`` ([1.0, 'global transform of 0', 0.5]) and
    ``math.sqrt`` as a notebook ``def sqrt`` ([2.0, 'my sqrt']), where serially
    both still raise."""
    run(ip, "import math\n"
            "def transform(x):\n    return f'global transform of {x}'\n"
            "class Model:\n    def transform(self, x):\n        return 1 / x\n"
            "m = Model()\n"
            "def sqrt(v):\n    return 'my sqrt'\n")
    run(ip, "%pmap -q --errors collect m.transform, [1, 0, 2]")
    again, out = _rerun(ip, capsys)
    assert _outcomes(again) == _serial(ip.user_ns["m"].transform, [1, 0, 2]) == [1.0, ZeroDivisionError, 0.5]
    assert out == ""  # (the line's m.transform is the same method: nothing to say)
    # The class fixed and the object made again: the line's m.transform is the fixed one.
    run(ip, "class Model:\n    def transform(self, x):\n        return 1 / x if x else 0.0\nm = Model()\n")
    again, out = _rerun(ip, capsys)
    assert again == _serial(ip.user_ns["m"].transform, [1, 0, 2]) == [1.0, 0.0, 0.5] and out == ""

    run(ip, "%pmap -q --errors collect math.sqrt, [4, -1]")
    again, out = _rerun(ip, capsys)
    assert _outcomes(again) == _serial(ip.user_ns["math"].sqrt, [4, -1]) == [2.0, ValueError] and out == ""
    # A function given to pmap() from Python: what rerun_failed() has is the object.
    import math

    mpmagic.pmap(math.sqrt, [4, -1], errors="collect")
    assert _outcomes(mpmagic.rerun_failed(namespace={"sqrt": lambda v: "my sqrt"})) == [2.0, ValueError]


def test_rerun_failed_says_which_code_it_re_runs_when_it_cannot_be_the_fixed_one(ip, local_pool, capsys):
    """An object made before its class was fixed, a closure made by the earlier
    outer function, a name deleted since, a lambda: the old code re-ran with no
    line saying so. It still runs (as the notebook's names give it, serially), and
    one line says which code it is and how to run the fixed one."""
    run(ip, "class Model:\n    def transform(self, x):\n        return 1 / x\nm = Model()\n"
            "def make(k):\n    def inner(x):\n        return k / x\n    return inner\nfn = make(5)\n"
            "def h(x):\n    return 2 / x\n")
    run(ip, "%pmap -q --errors collect m.transform, [1, 0]")
    run(ip, "class Model:\n    def transform(self, x):\n        return 1 / x if x else 0.0\n")  # m not made again
    again, out = _rerun(ip, capsys)
    assert _outcomes(again) == _serial(ip.user_ns["m"].transform, [1, 0]) == [1.0, ZeroDivisionError]
    assert out.startswith("mpmagic: `m.transform` is a method of an object made before Model.transform was "
                          "defined again, and re-runs the code it had then: make the object again, or to run a fixed "
                          "one, pass it: %pmap --rerun-failed FUNC"), out

    run(ip, "%pmap -q --errors collect fn, [1, 0]")
    run(ip, "def make(k):\n    def inner(x):\n        return k / x if x else 0.0\n    return inner\n")
    again, out = _rerun(ip, capsys)
    assert _outcomes(again) == _serial(ip.user_ns["fn"], [1, 0]) == [5.0, ZeroDivisionError]
    assert out.startswith("mpmagic: `fn` was made by an earlier definition of make() and re-runs the code it had "
                          "then: make it again with the current make()"), out
    run(ip, "fn = make(5)")
    again, out = _rerun(ip, capsys)
    assert again == _serial(ip.user_ns["fn"], [1, 0]) == [5.0, 0.0] and out == ""

    run(ip, "%pmap -q --errors collect h, [1, 0]")
    old_h = ip.user_ns["h"]
    run(ip, "del h")
    again, out = _rerun(ip, capsys)
    assert _outcomes(again) == _serial(old_h, [1, 0])
    assert out.startswith("mpmagic: the re-run uses the last run's function h as it was then: `h` is no longer "
                          "defined in the notebook; to run a fixed one, pass it: %pmap --rerun-failed FUNC"), out

    run(ip, "%pmap -q --errors collect lambda x: 3 / x, [1, 0]")
    again, out = _rerun(ip, capsys)
    assert _outcomes(again) == [3.0, ZeroDivisionError]
    assert out.startswith("mpmagic: the re-run uses the last run's function <lambda> as it was then: FUNC was the "
                          "expression `lambda x: 3 / x`, which is not evaluated again"), out
    assert _outcomes(run(ip, "%pmap -q --rerun-failed lambda x: 3 / x if x else 0.0")) == [3.0, 0.0]


def test_rerun_failed_of_a_function_given_to_pmap_follows_its_qualified_name(ip, local_pool, capsys):
    """From Python, rerun_failed() has the function object: a def of the notebook is
    found again by its qualified name (a global of the same __name__ is not it); a
    bound method runs on its object as it was, saying so."""
    run(ip, "def transform(x):\n    return f'global transform of {x}'\n"
            "class Model:\n    def transform(self, x):\n        return 1 / x\n"
            "def inv(x):\n    return 1 / x\n")
    m = ip.user_ns["Model"]()
    mpmagic.pmap(m.transform, [1, 0, 2], errors="collect")
    capsys.readouterr()
    assert _outcomes(mpmagic.rerun_failed()) == _serial(m.transform, [1, 0, 2]) == [1.0, ZeroDivisionError, 0.5]
    assert capsys.readouterr().out.startswith(
        "mpmagic: the re-run uses the last run's function transform as it was then: a method bound to an object "
        "(Model.transform) runs on that object with the code its class had")
    mpmagic.pmap(ip.user_ns["Model"].transform, [(m, 1), (m, 0)], star=True, errors="collect")
    run(ip, "class Model:\n    def transform(self, x):\n        return 1 / x if x else -1.0\n")
    assert mpmagic.rerun_failed() == [1.0, -1.0]  # Model.transform, as the notebook defines it now
    mpmagic.pmap(ip.user_ns["inv"], [1, 0], errors="collect")
    run(ip, "def inv(x):\n    return 1 / x if x else 0.0\n")
    capsys.readouterr()
    assert mpmagic.rerun_failed() == _serial(ip.user_ns["inv"], [1, 0]) and capsys.readouterr().out == ""


# --------------------------------------------------------------------------
# A failure's locals


class _Plain:
    pass


def test_bounded_repr_is_reprs_start_for_ordinary_values():
    """What Failed.locals shows of an ordinary value is repr(value), cut as before."""
    loop: list = []
    loop.append(loop)
    mine: dict = {}
    mine["me"] = mine
    point = collections.namedtuple("point", "x y")
    values = ["x" * 1000, "it's", 'say "hi"', "é\n\x00", b"\xff'", b"y" * 500, bytearray(10), bytearray(1000), 7,
              -10 ** 300, 3.5, None, True, [1, 2, [3, "a'b"]], (1,), (), set(), frozenset(), {1, 2}, frozenset({3}),
              {"a": [1, 2], 3: "x" * 300}, collections.deque([1, 2], maxlen=5), collections.deque(range(3)),
              list(range(1000)), collections.OrderedDict(a=1), collections.defaultdict(list, a=[1]),
              collections.Counter("abca"), point(1, "z" * 500), {1: 2}.items(), [[[[[[[[1]]]]]]]], range(10), loop,
              mine, _Plain(), type("Sub", (list,), {})([1, 2])]
    for value in values:
        full = repr(value)
        with _ReprClock() as clock:
            assert _bounded_repr(value, clock=clock) == (full if len(full) <= MAX_REPR else full[:MAX_REPR - 3] + "...")


def test_a_failures_large_or_slow_locals_cost_no_more_than_what_is_shown(ip, local_pool):
    """Each local's full repr was made, then cut to 200 characters: a 100 MB bytearray
    local took ~2 s and a 400 MB string in the worker, and a __repr__ that sleeps
    delayed the failure by as long. Large builtin values are written only as far
    as shown; a slow __repr__ is stopped after a second, saying so."""
    run(ip, "import time, signal\n"
            "class SlowRepr:\n    def __repr__(self):\n        time.sleep(20)\n        return 'slow'\n"
            "def heavy(x):\n    big = bytearray(50_000_000)\n    text = 'ab' * 10_000_000\n"
            "    nested = [b'z' * 10_000_000, {'k': 'v' * 10_000_000}]\n    many = list(range(5_000_000))\n"
            "    slow = SlowRepr()\n    after = x + 1\n    raise ValueError(x)\n")
    [failed] = run(ip, "%pmap -q --errors collect heavy, [1]")

    def shown(value) -> str:  # (serially: repr, cut)
        return repr(value)[:MAX_REPR - 3] + "..."

    assert failed.locals["big"] == shown(bytearray(MAX_REPR))
    assert failed.locals["text"] == shown("ab" * MAX_REPR)
    assert failed.locals["nested"] == shown([b"z" * MAX_REPR])
    assert failed.locals["many"] == shown(list(range(MAX_REPR)))
    assert failed.locals["slow"] == "<SlowRepr object: its repr took over 1 s and was stopped>"
    assert failed.locals["after"] == "2" and isinstance(failed.error, ValueError)
    # The workers' SIGALRM is as the task left it: no handler, no timer.
    assert run(ip, "%pmap -q lambda _: (signal.getsignal(signal.SIGALRM) == signal.SIG_DFL, "
                   "signal.getitimer(signal.ITIMER_REAL)), range(4)") == [(True, (0.0, 0.0))] * 4


# --------------------------------------------------------------------------
# A failed imap loop, then %pdebug / --rerun-failed


def test_a_failed_imap_loop_is_named_when_pdebug_and_rerun_act_on_an_older_run(ip, local_pool, capsys):
    """The guide's ``for v in mpmagic.imap(...)`` loop failed, and %pdebug and
    --rerun-failed then acted on the older blocking run with no line saying so:
    the line came only while something still held the stream. The run's record
    (not the stream, nor its results) is kept for that line."""
    run(ip, "import mpmagic, time\n"
            "def a(x):\n    return 1 / (x - 1)\n"
            "def b(x):\n    return [][x]\n"
            "def stuck(x):\n    time.sleep(30)\n")
    with pytest.raises(ZeroDivisionError):
        run(ip, "%pmap -q a, range(3)")
    # (run_cell's error, not pytest.raises: its traceback would hold the stream's frame)
    assert isinstance(ip.run_cell("for v in mpmagic.imap(b, range(3)):\n    pass").error_in_exec, IndexError)
    gc.collect()
    [record] = [r for r in mpmagic.runs() if r.what == "imap b"]
    assert isinstance(record, mpmagic.background.Finished) and record.handle() is None  # the stream was dropped
    # (the loop left at the first error: the stream was cancelled with the items failed by then)
    since = (rf"run {record.id} \(imap b\), started in the background since, had [123] failed items? too, and is "
             r"not {}: its loop raised each failed item's error in its place")
    saved = sys.stdin
    sys.stdin = io.StringIO("q\n")
    try:
        capsys.readouterr()
        run(ip, "%pdebug")
    finally:
        sys.stdin = saved
    out = capsys.readouterr().out
    assert re.match(r"mpmagic: replaying item 1 of the last blocking run; " + since.format("replayed")
                    + re.escape(" (run the same map as a blocking %pmap or pmap() to replay a failure with %pdebug)\n"),
                    out), out
    with pytest.raises(ZeroDivisionError):
        run(ip, "%pmap --rerun-failed")
    assert re.match(r"mpmagic: re-running the failed items of the last blocking pmap \(a\); "
                    + since.format("re-run"), capsys.readouterr().out)

    # A refused replay (an item past its timeout) names it too.
    with pytest.raises(TimeoutError):
        run(ip, "%pmap -q --timeout 0.5 stuck, [1]")
    assert isinstance(ip.run_cell("for v in mpmagic.imap(b, range(3)):\n    pass").error_in_exec, IndexError)
    result = ip.run_cell("%pdebug", store_history=False)
    assert re.search(r"started in the background since, had [123] failed items?, and a background run or an imap "
                     r"stream keeps nothing to replay: its loop raised each failed item's error in its place",
                     str(result.error_in_exec)), result.error_in_exec


def test_a_collecting_rerun_names_each_failed_item_by_its_place_in_the_input(ip, local_pool, capsys):
    """A re-run's own failures (a lost worker's, a time-out's: their message names
    the item) said "item 0" of the re-run for item 2 of the input, beside
    ``Failed.index`` 2, as a raising re-run's error already did not."""
    run(ip, "import os\ndef rerun_lost(x):\n    if x == 2:\n        os._exit(3)\n    return x\n")
    first = run(ip, "%pmap -q --errors collect --chunksize 1 rerun_lost, [0, 1, 2]")
    assert isinstance(first[2], mpmagic.Failed) and "item 2" in str(first[2].error), first
    again, _ = _rerun(ip, capsys, "%pmap -q --rerun-failed --chunksize 1")
    assert again[:2] == [0, 1] and isinstance(again[2], mpmagic.Failed), again
    assert again[2].index == 2 and isinstance(again[2].error, mpmagic.WorkerLostError)
    assert "item 2" in str(again[2].error) and "item 0" not in str(again[2].error), str(again[2].error)
