"""A warning a mapped function charges to its caller (``stacklevel=2``) names the
map's line and module, as serial ``map`` does (mpmagic/callsite.py).

Serial ``list(map(f, xs))`` calls ``f`` from C, so the frame above ``f`` is the
notebook cell's: Python's ``default::DeprecationWarning:__main__`` shows a
library's deprecation there, and ``filterwarnings("error", module="__main__")``
makes it an error. Workers called ``f`` from ``worker.py``: the deprecation was
hidden (module ``mpmagic.worker``), another warning showed ``worker.py`` and
``append(func(items[i]))``, and the "error" filter no longer matched.
"""

from __future__ import annotations

import linecache
import re
import sys
import warnings

import pytest
from conftest import ensure_pool, run

import mpmagic
from mpmagic import worker

LIB = '''
import warnings

import mpmagic


def old_square(x):
    warnings.warn("old_square is deprecated; use new_square", DeprecationWarning, stacklevel=2)
    return x * x


def blames_caller(x):
    warnings.warn("blame my caller", UserWarning, stacklevel=2)
    return x


def squares_in_parallel(xs):
    return mpmagic.pmap(old_square, xs)


def squares(xs):
    return list(map(old_square, xs))


def blames_callers_caller(x):
    warnings.warn("blame my caller's caller", UserWarning, stacklevel=3)
    return x


def driver(mapper, xs):
    return list(mapper(blames_callers_caller, xs))


def calls_driver(mapper):
    return driver(mapper, [1, 2])
'''


def _python_default_filters() -> None:
    """The filters of a notebook (Python's defaults: deprecations shown only for
    ``__main__``), not pytest's, which show every deprecation."""
    warnings.resetwarnings()
    for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")


@pytest.fixture
def lib(ip, tmp_path, monkeypatch):
    """A library module ``mpm_blame_lib`` (a file on sys.path, imported by the notebook)."""
    (tmp_path / "mpm_blame_lib.py").write_text(LIB)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mpm_blame_lib", raising=False)
    run(ip, "import mpmagic, mpm_blame_lib")
    yield
    sys.modules.pop("mpm_blame_lib", None)


def _warned(ip, code: str, *filters: tuple) -> list[tuple[str, int, str, str]]:
    """The warnings the cell ``code`` shows under a notebook's filters (and ``filters``),
    as (file, line, category, text): recorded, as ``catch_warnings(record=True)``
    records serial code's warnings and a task's (the oracle and mpmagic alike)."""
    with warnings.catch_warnings(record=True) as caught:
        _python_default_filters()
        for f in filters:
            warnings.filterwarnings(*f)
        run(ip, code)
    return [(w.filename, w.lineno, w.category.__name__, str(w.message)) for w in caught]


def _raised(ip, code: str, *filters: tuple) -> BaseException | None:
    with warnings.catch_warnings():
        _python_default_filters()
        for f in filters:
            warnings.filterwarnings(*f)
        return ip.run_cell(code, store_history=False).error_in_exec


def _line(warned: tuple) -> str:
    """The source line a warning names (a cell's, from IPython's cache)."""
    return linecache.getline(warned[0], warned[1]).strip()


DEPRECATED = ("DeprecationWarning", "old_square is deprecated; use new_square")


def test_a_warning_charged_to_the_caller_names_the_maps_line_as_serially(ip, any_method, lib):
    ensure_pool(any_method)
    # The oracle: serial map, in a cell: the deprecation is shown (the cell is
    # __main__), once for 10 items (once per location), naming the cell's line.
    [serial] = _warned(ip, "r = list(map(mpm_blame_lib.old_square, range(10)))")
    assert serial[2:] == DEPRECATED and _line(serial) == "r = list(map(mpm_blame_lib.old_square, range(10)))"
    for code in ("r = mpmagic.pmap(mpm_blame_lib.old_square, range(10), chunksize=2)",  # (5 chunks, 2 workers)
                 "r = mpmagic.pmap(mpm_blame_lib.old_square, range(10), chunksize=2, insights=True)",
                 "r = mpmagic.pmap(mpm_blame_lib.old_square, [(x,) for x in range(10)], chunksize=3, star=True)",
                 "r = mpmagic.pmap(mpm_blame_lib.old_square, range(10), timeout=60, chunksize=5)"):
        [parallel] = _warned(ip, code)
        assert parallel[2:] == serial[2:] and parallel[0].startswith("<ipython-input-"), parallel
        assert _line(parallel) == code
    # %pmap: the cell's line too, past IPython's magic machinery.
    [magic] = _warned(ip, "%pmap -q mpm_blame_lib.old_square, range(10)")
    assert magic[2:] == serial[2:] and magic[0].startswith("<ipython-input-") and "pmap" in _line(magic)
    assert _warned(ip, "r = mpmagic.pmap(mpm_blame_lib.blames_caller, [1, 2])")[0][2:] == ("UserWarning", "blame my caller")


def test_the_warnings_shown_line_names_the_cell_not_the_worker(ip, local_pool, lib, capsys, notebook_warnings):
    with warnings.catch_warnings():
        _python_default_filters()
        capsys.readouterr()
        run(ip, "r = mpmagic.pmap(mpm_blame_lib.blames_caller, [1, 2])")
    lines = capsys.readouterr().err.splitlines()
    shown = [line for line in lines if "UserWarning: blame my caller" in line]
    assert len(shown) == 1 and "worker.py" not in "\n".join(lines), lines
    assert re.fullmatch(r"\[item \d\] <ipython-input-[^:]+>:1: UserWarning: blame my caller", shown[0]), shown
    assert lines[lines.index(shown[0]) + 1].endswith("]   r = mpmagic.pmap(mpm_blame_lib.blames_caller, [1, 2])"), lines


def test_an_error_filter_for_the_callers_module_matches_as_serially(ip, any_method, lib):
    ensure_pool(any_method)
    error = ("error", "", Warning, "__main__")
    serial = _raised(ip, "list(map(mpm_blame_lib.blames_caller, [1]))", error)
    assert type(serial) is UserWarning and str(serial) == "blame my caller"
    for code in ("mpmagic.pmap(mpm_blame_lib.blames_caller, [1])", "%pmap -q mpm_blame_lib.blames_caller, [1]"):
        parallel = _raised(ip, code, error)
        assert type(parallel) is UserWarning and str(parallel) == str(serial), parallel
        # The worker's frames: the task's only, not the item loop standing in for the cell's line.
        [info] = mpmagic.last_failures()
        assert [f.name for f in info.frames] == ["blames_caller"] and info.locals == {"x": "1"}


def test_a_map_called_from_a_module_charges_that_module_as_serially(ip, any_method, lib):
    """Serial ``list(map(f, xs))`` inside a library blames the library: its
    deprecation is hidden by the default filters, a filter for it matches."""
    import mpm_blame_lib

    ensure_pool(any_method)
    assert _warned(ip, "r = mpm_blame_lib.squares(range(4))") == []
    assert _warned(ip, "r = mpm_blame_lib.squares_in_parallel(range(4))") == []
    error = ("error", "", Warning, "mpm_blame_lib")
    serial = _raised(ip, "mpm_blame_lib.squares([3])", error)
    parallel = _raised(ip, "mpm_blame_lib.squares_in_parallel([3])", error)
    assert type(serial) is type(parallel) is DeprecationWarning and str(parallel) == str(serial)
    [shown] = _warned(ip, "r = mpm_blame_lib.squares_in_parallel([4])", ("always", "", Warning, "mpm_blame_lib"))
    assert shown[0] == mpm_blame_lib.__file__ and _line(shown) == "return mpmagic.pmap(old_square, xs)"


def test_on_dask_a_warning_charged_to_the_caller_names_the_maps_line(ip, dask_cluster, request):
    ensure_pool("dask", request)
    run(ip, "import warnings, mpmagic\n"
            "def blames_caller(x):\n    warnings.warn('blame my caller', UserWarning, stacklevel=2)\n    return x\n")
    code = "r = mpmagic.pmap(blames_caller, range(10), chunksize=2)"
    [shown] = _warned(ip, code)
    assert shown[2:] == ("UserWarning", "blame my caller") and _line(shown) == code


# -- stacklevel=3 and more: the frames above the map's caller --------------------------

DRIVER = ("import warnings, mpmagic\n"
          "def deprecated_thing(x):\n"
          "    warnings.warn('deprecated thing', DeprecationWarning, stacklevel=3)\n"
          "    return x\n"
          "def driver(mapper):\n"
          "    return list(mapper(deprecated_thing, range(4)))\n")


def test_stacklevel_3_through_a_driver_in_a_cell_names_the_cell_as_serially(ip, any_method):
    """The mapped function blames its caller's caller: serially the cell line calling
    ``driver`` (module ``__main__``: the deprecation is shown, an error filter for
    ``__main__`` matches). Workers charged it to their own frames (``mpmagic.worker``)."""
    ensure_pool(any_method)
    run(ip, DRIVER)
    [serial] = _warned(ip, "r = driver(map)")
    assert serial[2:] == ("DeprecationWarning", "deprecated thing") and _line(serial) == "r = driver(map)"
    run(ip, "from functools import partial")
    for code in ("r = driver(mpmagic.pmap)", "r = driver(partial(mpmagic.pmap, chunksize=1))",
                 "r = driver(partial(mpmagic.pmap, insights=True))"):
        [parallel] = _warned(ip, code)
        assert parallel[2:] == serial[2:] and parallel[0].startswith("<ipython-input-"), parallel
        assert _line(parallel) == code
    error = ("error", "", Warning, "__main__")
    assert type(_raised(ip, "driver(map)", error)) is DeprecationWarning
    assert type(_raised(ip, "driver(mpmagic.pmap)", error)) is DeprecationWarning


def test_stacklevel_3_through_a_module_names_that_modules_line_as_serially(ip, any_method, lib):
    import mpm_blame_lib

    ensure_pool(any_method)
    [serial] = _warned(ip, "r = mpm_blame_lib.calls_driver(map)")
    [parallel] = _warned(ip, "r = mpm_blame_lib.calls_driver(mpmagic.pmap)")
    assert parallel == serial and serial[0] == mpm_blame_lib.__file__
    assert _line(serial) == "return driver(mapper, [1, 2])"
    error = ("error", "", Warning, "mpm_blame_lib")
    assert type(_raised(ip, "mpm_blame_lib.calls_driver(mpmagic.pmap)", error)) is UserWarning
    # Called from a cell: the frame above the module's is the cell's (stacklevel 3 from driver).
    [serial] = _warned(ip, "r = mpm_blame_lib.driver(map, [1])")
    [parallel] = _warned(ip, "r = mpm_blame_lib.driver(mpmagic.pmap, [1])")
    assert serial[2:] == parallel[2:] and _line(serial) == "r = mpm_blame_lib.driver(map, [1])"
    assert _line(parallel) == "r = mpm_blame_lib.driver(mpmagic.pmap, [1])"


def test_a_stacklevel_past_the_callers_names_sys_not_a_worker_file(ip, local_pool):
    """Past the cell, serial Python blames IPython's ``run_code``; a worker blames
    ``sys:1``, as Python does where a stack runs out, not a file of mpmagic's, for
    ``callsite.PAST`` levels (further it would: each stand-in frame costs the
    task's recursion a frame)."""
    from mpmagic import callsite

    run(ip, "import warnings, mpmagic\n"
            "def far(x, level):\n    warnings.warn('far', UserWarning, stacklevel=level)\n    return x\n")
    for level in range(3, 3 + callsite.PAST):
        [shown] = _warned(ip, f"r = mpmagic.pmap(far, [(1, {level})], star=True)")
        assert shown[:2] == ("sys", 1), shown


def test_on_dask_stacklevel_3_through_a_driver_names_the_cell(ip, dask_cluster, request):
    ensure_pool("dask", request)
    run(ip, DRIVER)
    [serial] = _warned(ip, "r = driver(map)")
    [parallel] = _warned(ip, "r = driver(mpmagic.pmap)")
    assert parallel[2:] == serial[2:] and _line(parallel) == "r = driver(mpmagic.pmap)"


# -- the worker's item loops, without a pool -----------------------------------------

SITE = (("__main__", "/notebook/cell.py", 7, "<module>"),)


def blames_caller(x, y=0):
    warnings.warn("blame my caller", UserWarning, stacklevel=2)
    return x + y


def _blamed(run_loop) -> tuple[list, set]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_loop()
    return results, {(w.filename, w.lineno, w.category) for w in caught}


@pytest.mark.parametrize("star", [False, True])
@pytest.mark.parametrize("way", ["whole", "block", "per item", "timeout", "insights"])
def test_every_item_loop_calls_the_function_from_the_call_site(way, star):
    from multiprocessing.sharedctypes import RawValue

    items = [(x, 1) for x in range(6)] if star else list(range(6))
    expected = [x + 1 for x in range(6)] if star else list(range(6))
    position = None if way == "whole" else RawValue("q", -1)
    block = 3 if way == "block" else 1
    started = (lambda i: None) if way == "timeout" else None

    def loop() -> list:
        if way == "insights":
            return worker.run_items_timed(blames_caller, items, star, False, position, None, started, SITE)[0]
        return worker.run_items(blames_caller, items, star, False, position, block, None, started, SITE)[0]

    results, blamed = _blamed(loop)
    assert results == expected
    assert blamed == {("/notebook/cell.py", 7, UserWarning)}


def test_the_copy_is_charged_to_the_callers_module_and_left_out_of_tracebacks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", module="^mylib$")
        results, _, error = worker.run_items(blames_caller, [1, 2], False, False, None, 1, None, None,
                                             (("mylib", "/lib/mylib.py", 3, "run"),))
        assert results == [] and error is not None
        assert error[1].type_name == "UserWarning"
        # The task's frame only: not the loop, whose copy names /lib/mylib.py.
        assert [f.name for f in error[1].frames] == ["blames_caller"]
        assert worker.run_items(blames_caller, [1], False, False)[0] == [1]  # (no site: charged to mpmagic.worker)


def test_a_call_that_fails_in_the_loop_itself_shows_no_frame_or_locals_of_the_loop():
    """A wrong number of arguments fails in the calling frame, ours: serially that is
    the cell's line, which the notebook shows itself."""
    from mpmagic import debugging

    debugging.new_unit("a task")  # (a unit's first failures carry their raising frame's locals)
    try:
        _, _, error = worker.run_items(lambda x, y: x, [1], False, False, None, 1, None, None, SITE)
        _, _, other = worker.run_items(lambda x: 1 / x, [0], False, False, None, 1, None, None, SITE)
    finally:
        debugging.end_unit()
    assert error is not None and error[1].type_name == "TypeError"
    assert error[1].frames == [] and error[1].context["locals"] == {} and error[1].context["where"] is None
    # (the task's own frame, as ever)
    assert other is not None and other[1].context["locals"] == {"x": "0"} and other[1].context["where"][2] == "<lambda>"


def test_a_copy_is_made_once_per_site_with_every_instruction_on_its_line():
    from mpmagic import callsite

    entry = callsite.at_site(worker._call_items, SITE)
    assert entry is not worker._call_items and callsite.at_site(worker._call_items, SITE) is entry
    assert callsite.at_site(worker._call_items, None) is worker._call_items
    # (called through a frame for each of the site's callers, here none, then PAST "sys:1" frames)
    chain = [entry]
    while chain[-1].__kwdefaults__:
        chain.append(chain[-1].__kwdefaults__["onward"])
    *hops, copy = chain
    assert len(chain) == 1 + callsite.PAST and all(callsite.MARK in hop.__code__.co_varnames for hop in hops)
    assert {(hop.__code__.co_filename, hop.__globals__["__name__"]) for hop in hops} == {("sys", "sys")}
    assert {line for hop in hops for *_, line in hop.__code__.co_lines() if line is not None} == {1}
    assert copy.__code__.co_filename == "/notebook/cell.py" and copy.__code__.co_name == "<module>"
    assert copy.__globals__["__name__"] == "__main__"
    assert {line for *_, line in copy.__code__.co_lines() if line is not None} == {7}
    from mpmagic import debugging

    assert callsite.MARK in worker._call_items.__code__.co_varnames and debugging._CALL_SITE == callsite.MARK


@pytest.mark.parametrize("way", ["whole", "insights"])
def test_each_frame_of_the_site_stands_in_for_its_callers_frame(way):
    """``stacklevel`` 2, 3, 4 land on the site's frames in turn, each charged to its own
    module; past them, ``sys:1``, as where a serial stack runs out, for ``callsite.PAST``
    levels (each stand-in frame costs the task a frame of its recursion limit)."""
    site = (("__main__", "/notebook/cell.py", 7, "driver"), ("__main__", "/notebook/cell.py", 9, "<module>"),
            ("mylib", "/lib/mylib.py", 3, "run"))

    def far(x, level):
        warnings.warn("far", UserWarning, stacklevel=level)
        return x

    def blamed(level: int) -> tuple:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if way == "insights":
                worker.run_items_timed(far, [(1, level)], True, False, None, None, None, site)
            else:
                worker.run_items(far, [(1, level)], True, False, None, 1, None, None, site)
        return tuple((w.filename, w.lineno) for w in caught)

    assert blamed(2) == (("/notebook/cell.py", 7),) and blamed(3) == (("/notebook/cell.py", 9),)
    assert blamed(4) == (("/lib/mylib.py", 3),)
    from mpmagic import callsite

    for level in range(5, 5 + callsite.PAST):
        assert blamed(level) == (("sys", 1),), level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", module="^mylib$")
        _, _, error = worker.run_items(far, [(1, 4)], True, False, None, 1, None, None, site)
    assert error is not None and error[1].type_name == "UserWarning"
    assert [f.name for f in error[1].frames] == ["far"]  # (the stand-in frames are left out)


def test_caller_site_keeps_the_callers_above_the_map_up_to_mpmagics_or_ipythons():
    from mpmagic import callsite

    def inner():
        return callsite.caller_site()

    def outer():
        return inner()

    site = outer()
    assert site is not None and [f[3] for f in site[:3]] == ["inner", "outer", sys._getframe().f_code.co_name]
    assert all(f[0] == __name__ and f[1] == __file__ for f in site[:3]) and len(site) == 1 + callsite.ANCESTORS
    # (past pytest's frames, a pmap run serially from mpmagic's own code: the callers stop there)
    assert callsite._machinery(callsite.__file__) and not callsite._machinery(__file__)


def test_the_sites_line_is_each_calls_own_from_two_lines_and_from_a_function_defined_again():
    """A site's lines are kept by code object and instruction (``callsite._line``: reading
    ``f_lineno`` walks the code's line table at each call). Each call still names the
    line serial Python's frame names: two calls of one function, each twice (the second
    from what was kept), and functions defined again and again with the call one line
    lower each time (a new code object, which may take a freed one's address)."""
    from mpmagic import callsite

    def two_places():
        first = (callsite.caller_site(), sys._getframe().f_lineno)
        second = (callsite.caller_site(), sys._getframe().f_lineno)
        return first, second

    for _ in range(2):
        for site, line in two_places():
            assert site is not None and site[0][2] == line and site[0][3] == "two_places"
    for blank in range(6):
        namespace = {"callsite": callsite, "sys": sys}
        source = "\n" * blank + "def f():\n    return callsite.caller_site(), sys._getframe().f_lineno\n"
        exec(compile(source, "<cell>", "exec"), namespace)
        for _ in range(2):
            site, line = namespace["f"]()
            assert site is not None and site[0][1:] == ("<cell>", blank + 2, "f") and line == blank + 2
        del namespace
