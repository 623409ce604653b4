"""A trailing ``# comment`` on a magic line is a comment, as on any Python line.

The docs (and people) write ``%pool dask   # a local cluster`` and
``%pmap f, xs  # why``; the comment must not become an argument.
"""

from __future__ import annotations

import pytest
from conftest import run


def test_pmap_line_may_end_with_a_comment(ip, backend) -> None:
    assert run(ip, "%pmap -q abs, [-1, -2]  # absolute values, (unbalanced") == [1, 2]


def test_an_option_word_stops_at_a_comment_as_python_reads_it(ip, backend) -> None:
    """``%pmap --timeout 5# why`` said "'5#' is not a number of seconds": the line after the
    options is Python, and a ``#`` starts its comment, as %%parallel's and %pool's lines read it."""
    for line in ("%pmap -q --timeout 5# c abs, [-1]", "%pmap -q# c abs, [-1]", "%pmap -q -n 2#two abs, [-1]",
                 "%pmap -q --errors collect# c abs, [-1]"):  # (all after the # is the comment, as with a space)
        with pytest.raises(Exception, match="missing FUNC and ITERABLE"):
            run(ip, line)
    assert run(ip, "%pmap -q --timeout '5' len, ['#a']") == [2]  # (a # in the arguments' string is no comment)


def test_parallel_line_may_end_with_a_comment(ip, backend) -> None:
    assert run(ip, "%%parallel -n 2 -q   # two ranks\nrank + 1") == [1, 2]


def test_pool_line_may_end_with_a_comment(ip, backend) -> None:
    status = run(ip, "%pool   # what is running")
    assert "pool:" in str(status)


def test_a_final_semicolon_shows_nothing_as_on_any_python_line(ip, backend) -> None:
    """``%pmap f, xs;`` runs and shows nothing, as ``list(map(f, xs));`` (it
    was refused as not an argument list); ``res = %pmap f, xs;`` still assigns;
    a ``;`` inside the arguments or a comment is not one. A ``%%parallel``
    cell ending in ``rank * 10;`` shows nothing either, and ``-o`` keeps the values."""
    assert ip.run_cell("%pmap -q abs, [-1];").result is None
    assert ip.run_cell("%pmap -q abs, [-1] ;  # quiet").result is None
    assert run(ip, "res = %pmap -q abs, [-1, -2];\nres") == [1, 2]
    # where the statement cannot be read (%time's own exec, an exec string): the results are kept
    assert run(ip, "%time res2 = %pmap -q abs, [-3];\nres2") == [3]
    assert run(ip, "exec(\"res3 = get_ipython().run_line_magic('pmap', '-q abs, [-4];')\")\nres3") == [4]
    assert run(ip, "%pmap -q len, [';;']  # ;") == [2]
    assert ip.run_cell("%%parallel -n 2 -q -o vals\nrank * 10;").result is None
    assert run(ip, "vals") == [0, 10]
    assert ip.run_cell("%%parallel -n 2 -q --reduce sum\nrank * 10;").result is None
    assert run(ip, "%%parallel -n 2 -q --reduce sum\nrank * 10") == 10


def test_pmap_in_a_function_body_sees_its_locals(ip, backend) -> None:
    """Inside a ``def``, the arguments are the function's names first, as
    ``map(abs, data)`` there: a notebook ``data`` was used silently instead."""
    run(ip, "data = [1, 2, 3]\ndef process(data):\n    res = %pmap -q abs, data\n    return res")
    assert run(ip, "process([-7, -8])") == [7, 8]
    run(ip, "def scaled(values, k):\n    res = %pmap -q lambda v: v * k, values\n    return res")
    assert run(ip, "scaled([1, 2], 10)") == [10, 20]


def test_pmap_in_a_class_body_sees_class_names_as_map_does_there(ip, backend) -> None:
    """In a class body the argument list sees the class's names, but a lambda
    or comprehension in it does not (Python's class scope): both saw the
    class attribute, silently giving another result than ``map`` there."""
    run(ip, "base = 100\nclass C:\n    base = 5\n    xs = [1, 2]\n"
            "    serial = list(map(lambda x: x + base, xs)), list(map(abs, [base for _ in range(2)]))\n"
            "    par = %pmap -q lambda x: x + base, xs\n"
            "    par2 = %pmap -q abs, [base for _ in range(2)]")
    assert run(ip, "C.serial") == ([101, 102], [100, 100])
    assert run(ip, "C.par, C.par2") == ([101, 102], [100, 100])
    ip.user_ns.pop("C"), ip.user_ns.pop("base")


def test_pmap_in_a_class_body_evaluates_its_arguments_as_that_class_body_does(ip, pool2) -> None:
    """From Python 3.12 (PEP 709) a comprehension inlined into eval's top-level code read the
    class namespace passed as eval's locals (3.11's class scope), so ``{base ...}`` saw the
    class's ``base``; a ``__name`` was not mangled as in the class (a NameError on every
    Python). Run as a statement of the class body: as ``map(...)`` there, a walrus still binds
    a class attribute, the class's own ``__qualname__`` stays, an error shows the line."""
    from IPython.utils.capture import capture_output

    run(ip, "base = 100\nclass D:\n    base = 5\n    __k = -3\n"
            "    serial = [list(map(abs, {base for _ in range(1)})), list(map(abs, {base: 1 for _ in range(1)})),\n"
            "              list(map(abs, [__k]))]\n"
            "    par_set = %pmap -q abs, {base for _ in range(1)}\n"
            "    par_dict = %pmap -q abs, {base: 1 for _ in range(1)}\n"
            "    par_mangled = %pmap -q abs, [__k]\n"
            "    par_walrus = %pmap -q abs, (ys := [base, -2])")
    D = ip.user_ns.pop("D")
    assert D.serial == [[100], [100], [3]]
    assert [D.par_set, D.par_dict, D.par_mangled] == D.serial
    assert (D.par_walrus, D.ys, D.__qualname__, D.__module__) == ([5, 2], [5, -2], "D", "__main__")
    assert getattr(D, "__firstlineno__", 2) == 2  # (3.13's: the class's line, not the %pmap line's)
    with capture_output() as cap:
        result = ip.run_cell("class E:\n    res = %pmap -q abs, [base / 0]")
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    assert "[base / 0]" in cap.stdout + cap.stderr, cap.stdout + cap.stderr
    ip.user_ns.pop("base")


def test_what_only_compiling_finds_is_a_usage_error_before_any_rank_runs(ip) -> None:
    """A top-level ``return``, or ``await`` (IPython runs it; a rank has no
    autoawait), failed in every rank with a traceback through mpmagic; an
    ``await`` or ``yield`` in %pmap's arguments was a bare traceback."""
    from IPython.core.error import UsageError

    for body, says in (("return 1", "'return' outside function"),
                       ("import asyncio\nawait asyncio.sleep(0)", "put the awaits in an async def")):
        with pytest.raises(UsageError, match=says):
            ip.run_cell(f"%%parallel -n 2 -q\n{body}").raise_error()
    run(ip, "async def load():\n    return [1]")
    with pytest.raises(UsageError, match="await it in a line before"):
        ip.run_cell("xs = %pmap -q abs, await load()").raise_error()
    with pytest.raises(UsageError, match="'yield' outside function"):
        ip.run_cell("%pmap -q abs, (yield)").raise_error()


def test_parallel_line_is_taken_as_written_so_reduce_means_its_python(ip, pool2) -> None:
    """``--reduce 'lambda v: {n}'`` became ``lambda v: 2``: IPython expanded the line's
    ``{n}`` (a set display in the reducer's Python), as %pmap's line is not."""
    ip.user_ns["n"] = 2
    assert run(ip, "%%parallel -n 2 -q --reduce 'lambda v: {n}'\nrank") == {2}
    assert run(ip, "%%parallel -n 2 -q --reduce 'lambda v: sorted(v) + [len({n})]'\nrank") == [0, 1, 1]
