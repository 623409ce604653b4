"""%pmap and mpmagic.pmap: every kind of notebook callable, input and error.

Functions are defined with ``ip.run_cell`` so they live in a ``__main__``
without a file, as in a notebook; every test runs on each pool in
``conftest.BACKENDS`` (local forkserver, local spawn, and Dask).
"""

from __future__ import annotations

import functools
import sys
import traceback

import psutil
import pytest
from conftest import chunk_row, run
from IPython.core.error import UsageError as IPythonUsageError

import mpmagic
from mpmagic import payload
from mpmagic import pool as pool_module


def test_cell_function(ip, backend):
    run(ip, "def work(n):\n    s = 0\n    for i in range(n):\n        s += i * i\n    return s\n")
    assert run(ip, "%pmap -q work, [10, 20, 30, 40]") == [sum(i * i for i in range(n)) for n in (10, 20, 30, 40)]


def test_lambda_without_parentheses(ip, backend):
    assert run(ip, "squares = %pmap -q lambda x: x * x, range(10)\nsquares") == [x * x for x in range(10)]


def test_several_iterables_like_map(ip, backend):
    assert run(ip, "%pmap -q pow, range(10), [2] * 10") == [x**2 for x in range(10)]
    # map() stops at the shortest iterable
    assert run(ip, "%pmap -q lambda a, b: a + b, [1, 2, 3], [10, 20]") == [11, 22]


def test_closure_and_cell_globals(ip, backend):
    run(
        ip,
        "OFFSET = 100\n"
        "def helper(x):\n    return x + OFFSET\n"
        "def make_adder(k):\n    def add(x):\n        return helper(x) + k\n    return add\n",
    )
    assert run(ip, "%pmap -q make_adder(5), range(4)") == [105, 106, 107, 108]


def test_partial_and_bound_method(ip, backend):
    run(
        ip,
        "import functools\n"
        "class Scaler:\n    def __init__(self, k):\n        self.k = k\n"
        "    def scale(self, x):\n        return self.k * x\n"
        "s = Scaler(3)\n"
        "def mul(a, b):\n    return a * b\n",
    )
    assert run(ip, "%pmap -q s.scale, range(5)") == [0, 3, 6, 9, 12]
    assert run(ip, "%pmap -q functools.partial(mul, 7), range(3)") == [0, 7, 14]


def test_cell_class_instances_as_items_and_results(ip, backend):
    run(
        ip,
        "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
        "def double(p):\n    return Point(p.x * 2, p.y * 2)\n"
        "pts = [Point(i, -i) for i in range(6)]\n"
        "out = %pmap -q double, pts\n",
    )
    assert run(ip, "all(isinstance(p, Point) for p in out)") is True
    assert run(ip, "[(p.x, p.y) for p in out]") == [(2 * i, -2 * i) for i in range(6)]

def test_notebook_subclasses_of_builtins_keep_their_value(ip, backend):
    """A notebook class with ``__slots__`` over a builtin (float, dict, tuple: a
    namedtuple) as item, result and captured global: the same as serial map
    (they came back 0.0, {} or failed to load)."""
    run(
        ip,
        "from collections import namedtuple\n"
        "Point = namedtuple('Point', 'x y')\n"
        "class Meters(float):\n    __slots__ = ()\n"
        "class Row(dict):\n    __slots__ = ()\n"
        "class Vec(list):\n    __slots__ = ()\n"
        "OFFSET = Meters(2.5)\n"
        "def shift(v):\n    return Meters(v + OFFSET)\n",
    )
    for args in ("Meters, [1.5, 2.0]", "lambda r: r['a'], [Row(a=1)]", "shift, [1.0]", "Point, [1], [2]",
                 "lambda p: Vec([p.x, p.y]), [Point(3, 4)]", "lambda r: Row(r, b=2), [Row(a=1)]"):
        serial = run(ip, f"list(map({args}))")
        got = run(ip, f"%pmap -q {args}")
        assert got == serial, args
        assert [type(v).__name__ for v in got] == [type(v).__name__ for v in serial], args



def test_generator_range_and_numpy_input(ip, backend):
    assert run(ip, "%pmap -q lambda x: x + 1, (i for i in range(7))") == list(range(1, 8))
    assert run(ip, "%pmap -q abs, range(-3, 3)") == [3, 2, 1, 0, 1, 2]
    res = run(ip, "import numpy as np\n%pmap -q lambda v: float(v.sum()), np.arange(12.0).reshape(4, 3)")
    assert res == [3.0, 12.0, 21.0, 30.0]


def test_empty_input(ip, backend):
    assert run(ip, "%pmap -q lambda x: x, []") == []


def test_a_function_that_is_not_callable_over_an_empty_input_says_why_serial_map_gives_nothing(ip, capsys):
    """``list(map(1, []))`` is ``[]`` (map never calls 1), while ``pmap(1, [])`` and
    ``%pmap 1, []`` were refused as for any input: a user checking against serial
    code saw no reason for the difference. The refusal stands (a mistake in the line
    must not wait for a non-empty input) and says why serial map() gave nothing."""
    assert list(map(1, [])) == []  # type: ignore[call-overload]  # (the oracle)
    said = ("the first argument must be a function to map, not int 1 (serial map() gives [] here only because "
            "the input is empty and it never calls it; pmap checks the function first)")
    with pytest.raises(mpmagic.ArgumentTypeError) as info:
        mpmagic.pmap(1, [])
    assert isinstance(info.value, TypeError) and str(info.value) == said
    result = ip.run_cell("%pmap 1, []", store_history=False)
    assert isinstance(result.error_in_exec, IPythonUsageError)
    assert str(result.error_in_exec).splitlines()[0] == f"%pmap: {said}"
    with pytest.raises(mpmagic.ArgumentTypeError) as info:  # (an input not known empty: no note)
        mpmagic.pmap(1, iter([]))
    assert str(info.value) == "the first argument must be a function to map, not int 1"
    assert "Traceback" not in capsys.readouterr().err


def test_star_and_the_classic_sum_of_squares(ip, backend):
    run(
        ip,
        "def compute_range(lo, hi):\n    return sum(i * i for i in range(lo, hi))\n"
        "ranges = [(1, 250001), (250001, 500001), (500001, 750001), (750001, 1000001)]\n",
    )
    parts = run(ip, "%pmap -q --star compute_range, ranges")
    # Each part in its place, as serial starmap gives it (the sum alone would
    # accept the parts in any order).
    assert parts == [ip.user_ns["compute_range"](*r) for r in ip.user_ns["ranges"]]
    assert sum(parts) == 333333833333500000


def test_exception_in_one_item_keeps_type_and_names_the_item(ip, backend, capsys):
    run(ip, "def inv(x):\n    return 1 / x\n")
    with pytest.raises(ZeroDivisionError) as info:
        run(ip, "%pmap -q inv, [1, 2, 0, 4]")
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "item 2" in notes and "inv(0)" in notes
    # The worker-side frames are the exception's own traceback (cause stays the task's).
    assert "return 1 / x" in "".join(traceback.format_tb(info.value.__traceback__))
    assert info.value.__cause__ is None


def test_errors_collect_keeps_other_results(ip, backend):
    res = run(ip, "%pmap -q --errors collect lambda x: 10 // x, [5, 0, 2]")
    assert res[0] == 2 and res[2] == 5
    assert isinstance(res[1], mpmagic.Failed) and res[1].index == 1
    assert isinstance(res[1].error, ZeroDivisionError)


def test_task_output_shows_in_the_cell(ip, backend, capsys):
    run(ip, "def chatty(x):\n    print(f'item {x} done')\n    return x\n")
    capsys.readouterr()
    run(ip, "%pmap -q chatty, range(5)")
    out = capsys.readouterr().out
    for x in range(5):
        assert f"item {x} done" in out


def test_timing_report_estimated_and_measured(ip, backend, capsys):
    run(ip, "def slowish(n):\n    return sum(range(n))\n")
    capsys.readouterr()
    run(ip, "%pmap slowish, [20000] * 8")
    line = capsys.readouterr().out
    assert "pmap: 8 items on" in line and "estimated from task times" in line
    assert "speedup ~" in line or "speedup <0.1x" in line  # (under 0.1x there is no digit to estimate)
    run(ip, "%pmap --compare slowish, [20000] * 8")
    line = capsys.readouterr().out
    assert "measured, results equal" in line
    rep = mpmagic.last_report()
    assert rep.serial_measured and rep.items == 8 and rep.equal is True
    assert "<table" in rep._repr_html_()


def test_quiet_prints_no_report(ip, backend, capsys):
    capsys.readouterr()
    run(ip, "%pmap -q abs, [1, -2]")
    assert "pmap:" not in capsys.readouterr().out


def test_function_serialized_once_per_call(ip, backend):
    run(
        ip,
        "pickled = [0]\n"
        "class Counted:\n"
        "    def __reduce__(self):\n"
        "        pickled[0] += 1\n"
        "        return (Counted, ())\n"
        "token = Counted()\n"
        "def uses_token(x):\n    return (x, type(token).__name__)\n",
    )
    res = run(ip, "%pmap -q --chunksize 1 uses_token, range(20)")
    assert res == [(x, "Counted") for x in range(20)]
    assert run(ip, "pickled[0]") == 1


def test_changed_global_is_seen_by_the_next_call(ip, backend):
    run(ip, "FACTOR = 2\ndef times(x):\n    return x * FACTOR\n")
    assert run(ip, "%pmap -q times, [1, 2]") == [2, 4]
    run(ip, "FACTOR = 3")
    assert run(ip, "%pmap -q times, [1, 2]") == [3, 6]


def test_api_from_plain_python(backend):
    assert mpmagic.pmap(divmod, [7, 9], [2, 4], workers=2) == [(3, 1), (2, 1)]
    assert mpmagic.last_report().kind == "pmap"


@pytest.mark.parametrize(
    "line, words",
    [
        ("%pmap --nope abs, [1]", "unknown option --nope"),
        ("%pmap", "missing FUNC"),
        ("%pmap abs", "missing ITERABLE"),
        ("%pmap -n 0 abs, [1]", "at least 1"),
        ("%pmap abs, [1], key=2", "keyword"),
        ("%pmap abs, [1", "not an argument list"),
        ("%pmap 3, [1]", "must be a function"),
        ("%pmap abs, 5", "must be iterable"),
        # map() would give coroutines that never run: said before any worker makes them
        ("async def fetch(x):\n    return x\n%pmap fetch, [1]", "fetch is an async function (async def)"),
        # The fix calls FUNC as written: a partial's arguments kept, a bound method through its object
        # (it called get(x), m(x) and Caller(x): a TypeError, a NameError, an instance made of x).
        ("import functools\nasync def get(x, y):\n    return x\n%pmap functools.partial(get, y=1), [1]",
         "lambda x: asyncio.run(functools.partial(get, y=1)(x))"),
        ("async def gen(x):\n    yield x\n%pmap gen, [1]", "gen is an async generator function"),
        ("class Caller:\n    async def __call__(self, x):\n        return x\n%pmap Caller(), [1]",
         "the __call__ of Caller is an async function (async def): map() would give coroutines that never run, "
         "and cannot come back from a worker; map a plain function that runs it, e.g. "
         "lambda x: asyncio.run(Caller()(x))"),
        ("class K:\n    async def m(self, x):\n        return x\nk = K()\n%pmap k.m, [1]",
         "lambda x: asyncio.run(k.m(x))"),
        ("async def add(x, y):\n    return x + y\n%pmap add if True else abs, [1], [2]",
         "lambda *args: asyncio.run((add if True else abs)(*args))"),
        # A generator function ran every item, then failed on sending generators back.
        ("def count(n):\n    yield from range(n)\n%pmap count, [2, 3]",
         "count is a generator function (def with yield): map() would give generator objects (as serial map() "
         "does), which cannot come back from a worker; map a plain function that collects it, e.g. "
         "lambda x: list(count(x))"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(ip, line, words, capsys):
    result = ip.run_cell(line, store_history=False)
    assert isinstance(result.error_in_exec, IPythonUsageError), result.error_in_exec
    assert words in str(result.error_in_exec)
    err = capsys.readouterr()
    assert "Traceback" not in err.out + err.err


def test_the_fix_for_an_async_or_generator_func_given_to_the_api_calls_it_right():
    """pmap() has no FUNC text: a plain function is called by its name, anything else
    as ``f``, said to be what was passed (its own name called it wrongly)."""
    class K:
        async def m(self, x):
            return x

        def g(self, x):
            yield x

    async def co(a, x):
        return a + x

    for func, fix in ((co, "lambda x: asyncio.run(co(x))"),
                      (K().m, "lambda x: asyncio.run(f(x)) (f: the bound method K.m you passed)"),
                      (functools.partial(co, 10), "asyncio.run(f(x)) (f: the functools.partial of "),
                      (K().g, "lambda x: list(f(x)) (f: the bound method K.g you passed)")):
        with pytest.raises(mpmagic.UsageError) as info:
            mpmagic.pmap(func, [1])
        assert fix in str(info.value), str(info.value)


@pytest.mark.parametrize("line", ["%pmap -qn 2 abs, [-1, -2]", "%pmap -qn2 abs, [-1, -2]", "%pmap -q\tabs, [-1, -2]",
                                  "%pmap -n 2\t-q abs, [-1, -2]", "%pmap -q --chunksize\t1 abs, [-1, -2]"])
def test_options_split_as_argparse_reads_them(ip, line, capsys):
    """Combined short flags and tabs: ``-qn 2`` said "expected one argument"."""
    assert run(ip, line) == [1, 2]
    assert "pmap:" not in capsys.readouterr().out  # -q held


def test_help_text_has_examples_and_every_option(ip):
    doc = ip.find_line_magic("pmap").__doc__
    for word in ("%pmap [options] FUNC, ITERABLE", "lambda x", "--star", "--compare", "--chunksize", "-q", "--workers"):
        assert word in doc
    assert "%%parallel" in ip.find_cell_magic("parallel").__doc__


def test_unload_stops_pool_and_removes_magics(ip):
    mpmagic.use_local(2)
    mpmagic.pmap(abs, [1, -1])
    pids = [s.pid for s in mpmagic.get_pool().slots]
    assert pids
    run(ip, "%unload_ext mpmagic")
    try:
        assert ip.find_line_magic("pmap") is None
        for pid in pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        run(ip, "%load_ext mpmagic")
    assert run(ip, "%pmap -q abs, [-3]") == [3]


def test_the_shells_exit_still_stops_the_helper_processes_after_an_unload(ip):
    """After ``%unload_ext`` a kernel's shutdown left the fork server and the
    tracker running: Jupyter SIGTERMed it ~2.6 s later, before its exit hooks."""
    mpmagic.use_local(1, "forkserver")
    mpmagic.pmap(abs, [1])
    run(ip, "%unload_ext mpmagic")
    try:
        ip.exit_now = True  # (what a kernel's shutdown request does)
        ip.exit_now = False
        helpers = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")
        left = [p for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE
                and any(h in " ".join(p.cmdline()) for h in helpers)]
        assert not left
    finally:
        run(ip, "%load_ext mpmagic")


def test_workers_start_after_reset_f(ip):
    """``%reset -f`` deletes ``__main__.__spec__``, which multiprocessing reads
    at every forkserver/spawn start: replacing a worker that died failed the
    manager (its traceback, the item blamed with an AttributeError, every later
    call failing too)."""
    mpmagic.use_local(2, "forkserver")
    run(ip, "%pmap -q abs, [-1, -2]")
    run(ip, "%reset -f")
    run(ip, "import os\ndef die(x):\n    if x == 1:\n        os._exit(3)\n    return x\n")
    with pytest.raises(mpmagic.WorkerLostError, match="exit code 3"):
        run(ip, "%pmap -q die, range(4)")
    assert run(ip, "%pmap -q abs, [-1, -2, -3]") == [1, 2, 3]


def test_a_worker_that_cannot_start_is_one_line_not_the_manager_failing(ip, monkeypatch, caplog):
    backend = mpmagic.use_local(2)
    mpmagic.pmap(abs, [-1, -2])

    def fails(*args):
        raise RuntimeError("no luck")

    monkeypatch.setattr(backend, "_start_worker", fails)
    run(ip, "import os\ndef die(x):\n    if x == 1:\n        os._exit(3)\n    return x\n")
    with pytest.raises(mpmagic.WorkerLostError, match="exit code 3"):  # the death is blamed, not the start
        run(ip, "%pmap -q die, range(4)")
    with pytest.raises(mpmagic.MPMagicError) as got:  # the next start says why, in one line
        run(ip, "%pmap -q abs, [-1, -2, -3]")
    assert str(got.value).startswith("could not start a worker process (RuntimeError: no luck)")
    assert "manager failed" not in caplog.text
    monkeypatch.undo()
    assert run(ip, "%pmap -q abs, [-1, -2, -3]") == [1, 2, 3]


def test_spawn_workers_that_cannot_import_mpmagic_say_so_not_blame_an_item(tmp_path, monkeypatch):
    """New spawn workers died importing mpmagic (the venv's install rewritten meanwhile) with the
    items queued for them: the map failed as "the worker running items 0-1 exited unexpectedly",
    where troubleshooting.md promises the start-up line. They never started those items."""
    (tmp_path / "mpmagic").mkdir()
    (tmp_path / "mpmagic" / "__init__.py").write_text("raise ImportError('simulated: cannot import mpmagic')\n")
    pool_module.shutdown()
    try:
        mpmagic.use_local(1, "spawn")
        assert mpmagic.pmap(abs, [-1]) == [1]
        monkeypatch.syspath_prepend(str(tmp_path))  # (a spawn child takes the notebook's sys.path)
        mpmagic.restart_pool()
        with pytest.raises(mpmagic.MPMagicError) as got:
            mpmagic.pmap(abs, [-1, -2])
        assert not isinstance(got.value, mpmagic.WorkerLostError)
        assert str(got.value).startswith("worker processes die while starting"), got.value
        assert "python -c 'import mpmagic'" in str(got.value)
        monkeypatch.undo()
        assert mpmagic.pmap(abs, [-1, -2]) == [1, 2]
    finally:
        monkeypatch.undo()
        pool_module.shutdown()


def test_star_item_that_cannot_be_unpacked_fails_as_starmap_does(ip, backend):
    """starmap's own message (the worker called func(*item): "argument after *
    must be an iterable"), and a note that reads as the call."""
    run(ip, "import itertools\ndef tup(*a):\n    return a\ndef div(a, b=0):\n    return a / b\n")
    with pytest.raises(TypeError) as serial:
        run(ip, "list(itertools.starmap(tup, [(1, 2), 3]))")
    for line in ("%pmap -q --star tup, [(1, 2), 3]", "%pmap -q --star --insights tup, [(1, 2), 3]"):
        with pytest.raises(TypeError) as got:  # (--insights: the loop that times each item)
            run(ip, line)
        assert str(got.value) == str(serial.value) == "'int' object is not iterable", line
        assert "item 1 of the input: tup(*3)" in "\n".join(getattr(got.value, "__notes__", [])), line
    with pytest.raises(ZeroDivisionError) as got:
        run(ip, "%pmap -q --star div, [(1,)]")
    assert "item 0 of the input: div(1)" in "\n".join(getattr(got.value, "__notes__", []))


def test_compare_calls_equal_results_equal_even_with_nan_or_no_eq(ip, backend):
    """NaN is never == itself and an instance without __eq__ compares by
    identity: the same results are still the same (it said "RESULTS DIFFER")."""
    run(ip, "class Box:\n    def __init__(self, v):\n        self.v = v\nimport numpy as np\nimport pandas as pd\n")
    for args in ("lambda x: float('nan'), [1, 2]", "lambda x: Box(x), [1, 2]", "lambda x: [x, {'a': float('nan')}], [1]",
                 "lambda x: np.float64('nan'), [1]", "lambda x: np.float32('nan'), [1]",
                 "lambda x: np.array([np.nan, x]), [1, 2]", "lambda x: pd.DataFrame({'a': [x, None]}), [1]",
                 "lambda x: np.array(['a', str(x)]), [1]", "lambda x: (np.array([0.5, x]), 1.0), [1, 2]",
                 "lambda x: (np.array([np.nan, x]), 2.0), [1]", "lambda x: {float('nan')}, [1]"):
        run(ip, f"_ = %pmap -q --compare {args}")
        assert mpmagic.last_report().equal is True, args
    for args in ("lambda x: Box(random.random()), [1, 2]", "lambda x: np.array([np.nan, random.random()]), [1]"):
        run(ip, f"import random\n_ = %pmap -q --compare {args}")
        assert mpmagic.last_report().equal is False, args  # (different results still differ)


def test_compare_takes_a_complex_or_decimal_nan_as_the_same_result():
    """``complex(nan, 1)`` and ``Decimal('NaN')`` are never == themselves, as a float NaN:
    the same results from the workers said RESULTS DIFFER. A complex NaN is the same where
    each part is (a numpy one's "both NaN" took nan+1j and nan+2j for the same)."""
    import decimal

    import numpy as np

    from mpmagic.api import _equal

    nan = float("nan")
    assert _equal(complex(nan, 1), complex(nan, 1)) and _equal([complex(1, nan)], [complex(1, nan)])
    assert not _equal(complex(nan, 1), complex(nan, 2)) and not _equal(complex(nan, 1), complex(1, nan))
    assert _equal(np.complex128(complex(nan, 1)), np.complex128(complex(nan, 1)))
    assert not _equal(np.complex128(complex(nan, 1)), np.complex128(complex(nan, 2)))
    assert _equal(decimal.Decimal("NaN"), decimal.Decimal("NaN")) and _equal({"d": decimal.Decimal("NaN")},
                                                                             {"d": decimal.Decimal("NaN")})
    assert not _equal(decimal.Decimal("NaN"), decimal.Decimal("1")) and _equal(np.float64(nan), np.float64(nan))
    assert not _equal(decimal.Decimal("NaN"), decimal.Decimal("sNaN"))


def test_compare_within_float_rounding_says_how_far_apart_and_never_plain_results_equal(ip, local_pool):
    """pandas22 #3: the rounding tolerance (1.5e-8 relative for float64) is wider than
    ``time.time()``'s or a tiny random jitter's change from call to call, which it called
    "results equal". Equal to rounding is still equal (a worker sums in another order),
    but the line says how far apart and where, so a value that varies shows; exactly
    equal results keep their line."""
    import os

    run(ip, f"import os, time\nNOTEBOOK = {os.getpid()}\n"
            "def drift(x):\n    return 1.0 + (1e-12 * x if os.getpid() == NOTEBOOK else 0.0)\n")
    assert run(ip, "%pmap -q --compare drift, range(5)") == [1.0] * 5  # (the workers' values)
    report = mpmagic.last_report()
    serial = [1.0 + 1e-12 * x for x in range(5)]
    assert report.equal is True and serial != [1.0] * 5
    assert "results equal within float rounding: largest relative difference 4.0e-12 at item 4)" in report.line()
    run(ip, "_ = %pmap -q --compare lambda x: time.time(), range(4)")
    assert "results equal within float rounding: largest relative difference " in mpmagic.last_report().line()
    run(ip, "_ = %pmap -q --compare lambda x: x / 3, range(4)")
    assert "(measured, results equal)" in mpmagic.last_report().line()


def test_a_walrus_in_the_arguments_binds_in_the_notebook(ip, backend):
    """``map(f, (xs := ...))`` binds ``xs``; the magic's line did not (its own locals)."""
    ip.user_ns.pop("zs", None)
    assert run(ip, "%pmap -q lambda v: v * 2, (zs := [1, 2])") == [2, 4]
    assert run(ip, "zs") == [1, 2]
    assert not [k for k in ip.user_ns if k.startswith("__mpmagic_args")]


def test_compare_with_collect_collects_serially_too(ip, backend, capsys):
    """--compare's serial map raised the item's error, and the parallel results
    (collected) were lost with it."""
    run(ip, "def bad(x):\n    if x == 2:\n        raise ValueError('two')\n    return x\n")
    got = run(ip, "%pmap -q --compare --errors collect bad, range(4)")
    assert got[:2] + got[3:] == [0, 1, 3] and isinstance(got[2], mpmagic.Failed)
    report = mpmagic.last_report()
    assert report.serial is not None and report.equal is True and report.serial_error is None


def test_compare_whose_serial_run_raises_keeps_the_parallel_results(ip, backend, capsys):
    """A function that can run in a worker and not here (it reads what only the
    worker has): the parallel results come back, and one line says why nothing
    was measured; the report says estimated, not measured."""
    run(ip, "import os\ndef only_in_workers(x):\n"
            "    if os.getpid() == NOTEBOOK_PID:\n        raise RuntimeError('not here')\n    return x * 2\n"
            "NOTEBOOK_PID = os.getpid()\n")
    capsys.readouterr()
    assert run(ip, "%pmap -q --compare only_in_workers, range(3)") == [0, 2, 4]
    assert "the serial run here raised RuntimeError: not here; the parallel results are kept" in capsys.readouterr().err
    report = mpmagic.last_report()
    assert report.serial is None and report.serial_error == "RuntimeError: not here"
    assert "estimated: the --compare run here raised RuntimeError" in report.line()


def test_compare_with_collect_names_the_items_that_failed_only_in_the_serial_run(ip, local_pool):
    """errors="collect": items that raised only in the serial run here (the function reads
    what only the workers have) made RESULTS DIFFER with the advice on random draws,
    hash() and set order, none of which was the cause. The advice names those items and
    the serial run's error, as the line does when errors="raise" stops the serial run."""
    run(ip, "import os\nNOTEBOOK_PID = os.getpid()\ndef not_here_at_odd(x):\n"
            "    if x % 2 and os.getpid() == NOTEBOOK_PID:\n        raise RuntimeError(f'not here {x}')\n"
            "    return x * 2\n")
    assert run(ip, "%pmap -q --compare --errors collect not_here_at_odd, range(4)") == [0, 2, 4, 6]
    report = mpmagic.last_report()
    assert report.equal is False and report.serial is not None
    assert report.advice is not None and "random draws" not in report.advice, report.advice
    assert report.advice.startswith("the results differ from the serial run's: items 1 and 3 raised only in the "
                                    "serial run here (RuntimeError: not here 1)"), report.advice


def test_compare_with_collect_names_the_items_that_failed_only_in_the_workers(ip, local_pool):
    """errors="collect": items that raised only in the workers (the function reads what
    only the notebook has) made RESULTS DIFFER with no advice at all, advice being skipped
    for a run with failed items. The advice names those items and the first worker error,
    as it does for items that failed only in the serial run."""
    run(ip, "import os\nNOTEBOOK_PID = os.getpid()\ndef only_here_at_odd(x):\n"
            "    if x % 2 and os.getpid() != NOTEBOOK_PID:\n        raise RuntimeError(f'not there {x}')\n"
            "    return x * 2\n")
    results = run(ip, "%pmap -q --compare --errors collect only_here_at_odd, range(4)")
    assert [r for i, r in enumerate(results) if i % 2 == 0] == [0, 4]
    assert all(isinstance(results[i], mpmagic.Failed) for i in (1, 3))
    report = mpmagic.last_report()
    assert report.equal is False and report.failed == 2
    assert report.advice is not None, report.line()
    assert report.advice.startswith("the results differ from the serial run's: items 1 and 3 raised only in the "
                                    "workers (RuntimeError: not there 1)"), report.advice


def test_double_dash_ends_the_options(ip, backend):
    """``--`` ends the options as on a command line ("unknown option --" before)."""
    assert run(ip, "%pmap -q -- abs, [-1, 2]") == [1, 2]
    assert run(ip, "%pmap -q --star -- pow, [(2, 3)]") == [8]


def test_compare_with_collect_collects_a_sys_exit_serially_too(ip, local_pool):
    """sys.exit() in an item is that item's error in the workers; the serial
    run let it escape (except Exception) and the parallel results were lost."""
    run(ip, "import sys\ndef exits_at_1(x):\n    if x == 1:\n        sys.exit(3)\n    return x\n")
    got = run(ip, "%pmap -q --compare --errors collect exits_at_1, range(3)")
    assert got[0] == 0 and got[2] == 2 and isinstance(got[1], mpmagic.Failed)
    assert mpmagic.last_report().serial is not None and mpmagic.last_report().equal is True


def test_a_script_whose_top_level_calls_pmap_runs_once(ip, tmp_path, monkeypatch, capsys):
    """`%run -n job.py` (IPython puts `job` in sys.modules while it runs) and `import pipe_mod`
    whose top level calls pmap: `f` went by reference, so each worker imported the file again and
    ran all of it: 3 log lines where serial writes 1, and "pmap called inside a worker" notes.
    Results of the module's own class (`return P(...)`) imported it in each worker too (the
    worker's plain pickle of P found it by name): they are the notebook's own P, as serially."""
    log = tmp_path / "ran.log"
    body = (f"import mpmagic\nwith open({str(log)!r}, 'a') as fh:\n    fh.write('ran\\n')\n"
            "class P:\n    def __init__(self, x):\n        self.x = x\n"
            "def f(p):\n    return p.x * 3\n"
            "def g(x):\n    return P(x * 2)\n"
            "RESULT = mpmagic.pmap(f, [P(i) for i in range(4)], workers=2)\n"
            "PS = mpmagic.pmap(g, range(4), workers=2)\n"
            "OWN = [type(p) is P for p in PS]\n")
    (tmp_path / "job_rn.py").write_text(body)
    (tmp_path / "pipe_mod_rn.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(payload, "_by_value_names", frozenset())  # (later tests' payloads name no module of this one)
    monkeypatch.setattr(payload, "_by_value_modules", ())
    monkeypatch.setattr(payload, "_by_value_marks", ())
    try:
        run(ip, f"%run -n {tmp_path / 'job_rn.py'}")
        assert ip.user_ns["RESULT"] == [0, 3, 6, 9] and log.read_text() == "ran\n"
        assert [p.x for p in ip.user_ns["PS"]] == [0, 2, 4, 6] and ip.user_ns["OWN"] == [True] * 4
        run(ip, "import pipe_mod_rn")
        module = ip.user_ns["pipe_mod_rn"]
        assert module.RESULT == [0, 3, 6, 9] and log.read_text() == "ran\nran\n"
        assert [type(p) is module.P for p in module.PS] == [True] * 4
        assert "inside a worker" not in capsys.readouterr().err
    finally:
        sys.modules.pop("pipe_mod_rn", None)
        for name in ("P", "f", "g", "RESULT", "PS", "OWN", "fh", "pipe_mod_rn"):  # (what %run -n put in the shell's names)
            ip.user_ns.pop(name, None)


def _hundred_kb(i: int) -> bytes:
    return bytes(100_000)


@pytest.mark.parametrize("method", ["forkserver"], scope="session")  # (the start method changes nothing here: one suffices)
def test_automatic_chunks_keep_their_results_under_the_byte_cap(local_pool, monkeypatch):
    """Chunks are sized by task time and capped by packed bytes: the results' bytes
    count too, so fast tasks with big results do not come back (or wait in an
    imap's buffer) by the hundred (report migrate14 finding 6: 117 results of 10 MB
    waited unread). Here the cap is 1 MB, so 100 KB results make chunks of at most
    10 items once measured (the first chunks, sized before any measurement: 16)."""
    import functools

    from mpmagic import chunking, jobs

    monkeypatch.setattr(jobs, "ChunkPlanner", functools.partial(chunking.ChunkPlanner, max_bytes=1 << 20))
    assert mpmagic.pmap(_hundred_kb, range(400), workers=2) == [bytes(100_000)] * 400
    sizes = mpmagic.last_report().chunksize  # "auto (lo-hi)"
    largest = int(sizes.rstrip(")").split("-")[-1].split("(")[-1])
    assert largest <= 16, sizes


@pytest.mark.parametrize("method", ["forkserver"], scope="session")  # (the start method changes nothing here: one suffices)
def test_a_notebook_class_whose_instances_come_back_keeps_its_own_methods(ip, local_pool):
    """cloudpickle found the notebook's class by its tracker id, then set the worker's copies of its
    methods on it: their globals were only the names sent with them, so a function a later cell
    defines raised NameError in a method, and a global rebound later was not seen."""
    run(ip, "import mpmagic\nSCALE_KM = 3\nclass KeptM:\n    def show(self): return helper_km(SCALE_KM)\ndef make_km(x): return KeptM()")
    got = run(ip, "mpmagic.pmap(make_km, range(2), workers=2)")
    assert all(type(k) is ip.user_ns["KeptM"] for k in got)
    run(ip, "def helper_km(s): return s * 10\nSCALE_KM = 5")
    assert run(ip, "KeptM().show()") == 50


@pytest.mark.parametrize("method", ["forkserver"], scope="session")  # (the start method changes nothing here: one suffices)
def test_the_report_states_the_chunks_sent_not_the_sizes_planned(ip, local_pool):
    """After a call that measured tiny items, a 3-item iterator was reported as "auto:
    100000 items per chunk, 1 chunk": the size planned for it, not the chunk that went.
    With max_tasks_per_child 5, chunksize=40 on 100 items read "40 items per chunk, 20
    chunks" (800 items), though no chunk held more than 5."""
    run(ip, "def sq_cs(x):\n    return x * x\n")
    sq = ip.user_ns["sq_cs"]
    assert mpmagic.pmap(sq, range(20_000)) == list(map(sq, range(20_000)))
    assert mpmagic.pmap(sq, iter([1, 2, 3])) == list(map(sq, [1, 2, 3]))
    lo, hi, asked, chunks = chunk_row(mpmagic.last_report(), 3)
    assert hi <= 3 and asked is None, mpmagic.last_report().rows()
    assert mpmagic.pmap(sq, range(100), chunksize=40) == list(map(sq, range(100)))
    assert chunk_row(mpmagic.last_report(), 100) == (40, 40, None, 3)  # (the last chunk holds the other 20)
    mpmagic.start_pool(workers=2, max_tasks_per_child=5, wait=True)
    try:
        assert mpmagic.pmap(sq, range(100), chunksize=40) == list(map(sq, range(100)))
        lo, hi, asked, chunks = chunk_row(mpmagic.last_report(), 100)
        assert hi <= 5 and asked == 40, mpmagic.last_report().rows()
        assert mpmagic.pmap(sq, range(100)) == list(map(sq, range(100)))
        lo, hi, asked, chunks = chunk_row(mpmagic.last_report(), 100)
        assert hi <= 5 and asked is None, mpmagic.last_report().rows()
    finally:
        pool_module.shutdown()  # (use_local keeps a limit it is not given: the next test's pool would have it)


def test_results_that_are_one_object_serially_share_it_only_within_a_chunk(ip, backend):
    """What docs/troubleshooting.md says: results are copies, and results of one chunk
    may share an object (pickle keeps shared references within one pickle), results
    of different chunks never do; none is the notebook's object."""
    run(ip, "SHARED = []\ndef same(x):\n    return SHARED\n")
    serial = run(ip, "list(map(same, range(4)))")
    assert all(r is ip.user_ns["SHARED"] for r in serial)
    apart = run(ip, "%pmap -q --chunksize 1 same, range(4)")
    assert [r is apart[0] for r in apart] == [True, False, False, False] and apart[0] is not ip.user_ns["SHARED"]
    together = run(ip, "%pmap -q --chunksize 4 same, range(4)")
    assert all(r is together[0] for r in together) and together[0] is not ip.user_ns["SHARED"]
