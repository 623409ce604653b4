"""%%parallel and mpmagic.parallel: SPMD cells with rank/size, gathered values,
labelled output, errors and timing, on each pool in ``conftest.BACKENDS``."""

from __future__ import annotations

import os
import sys
import time

import pytest
from conftest import ensure_pool, run
from IPython.core.error import UsageError as IPythonUsageError
from IPython.utils.capture import capture_output

import mpmagic
from mpmagic.errors import ReduceError


def cell(ip, line: str, body: str):
    return run(ip, f"%%parallel {line}\n{body}")


def test_rank_and_size(ip, backend):
    assert cell(ip, "-n 2 -q", "(rank, size)") == [(0, 2), (1, 2)]


def test_more_ranks_than_workers_all_run_at_once(ip, backend):
    # Four ranks meet at a barrier: only possible if all four run concurrently.
    run(ip, "import tempfile, os\nbarrier_dir = tempfile.mkdtemp()\n")
    body = (
        "import os, time\n"
        "open(os.path.join(barrier_dir, str(rank)), 'w').close()\n"
        "deadline = time.time() + 20\n"
        "while len(os.listdir(barrier_dir)) < size and time.time() < deadline:\n"
        "    time.sleep(0.01)\n"
        "len(os.listdir(barrier_dir))\n"
    )
    assert cell(ip, "-n 4 -q", body) == [4, 4, 4, 4]


def test_notebook_names_function_class_global_module(ip, backend):
    run(
        ip,
        "import numpy as np\n"
        "SCALE = 10\n"
        "def f(x):\n    return x * SCALE\n"
        "class Box:\n    def __init__(self, v):\n        self.v = v\n",
    )
    res = cell(ip, "-n 2 -q", "b = Box(f(rank))\nfloat(np.float64(b.v))")
    assert res == [0.0, 10.0]


def test_imports_and_definitions_inside_the_cell(ip, backend):
    body = "import math\ndef g(r):\n    return math.factorial(r + 2)\ng(rank)"
    assert cell(ip, "-n 3 -q", body) == [2, 6, 24]


def test_output_name_reduce_and_gather(ip, backend):
    cell(ip, "-n 2 -q -o vals", "y = rank * 3\nrank + 1")
    assert run(ip, "vals") == [1, 2]
    assert cell(ip, "-n 4 -q --reduce sum", "rank") == 6
    cell(ip, "-n 2 -q --gather y,z", "y = rank * 3\nz = 'r%d' % rank")
    assert run(ip, "(y, z)") == ([0, 3], ["r0", "r1"])


def test_cell_without_final_expression(ip, backend):
    assert cell(ip, "-n 2 -q -o nothing", "x = rank") is None
    assert run(ip, "nothing") == [None, None]


def test_a_final_assignment_is_the_value_when_ipython_shows_assignments(ip, pool_fs):
    # %config InteractiveShell.ast_node_interactivity = 'last_expr_or_assign': serially a cell
    # ending in `x = ...` shows x; each rank's value was None and the cell showed nothing.
    run(ip, "%config InteractiveShell.ast_node_interactivity = 'last_expr_or_assign'")
    try:
        assert cell(ip, "-n 2 -q -o vals", "x = rank * 10") == [0, 10]
        assert run(ip, "vals") == [0, 10]
        assert cell(ip, "-n 2 -q", "t = rank\nt += 5") == [5, 6]
        assert cell(ip, "-n 2 -q", "a: int = rank + 1") == [1, 2]
        assert cell(ip, "-n 2 -q -o vals", "x = rank * 10;") is None  # (a final ; shows nothing, as serially)
        assert run(ip, "vals") == [0, 10]
        assert cell(ip, "-n 2 -q", "a, b = rank, 1") is None  # (not one name: IPython shows nothing either)
        assert mpmagic.parallel("y = rank", workers=2, namespace={}) == [0, 1]  # (in this notebook too)
    finally:
        run(ip, "%config InteractiveShell.ast_node_interactivity = 'last_expr'")
    assert cell(ip, "-n 2 -q -o vals", "x = rank * 10") is None
    assert run(ip, "vals") == [None, None]


def test_a_parallel_errors_values_are_in_rank_order_as_serially():
    # The ranks that finished, keyed by rank in the order a serial run per rank gives them:
    # they came in the order they finished ({1: 1, 0: 0} after a timeout of rank 2).
    error = mpmagic.ParallelError("m", {2: ValueError("late")}, {1: 1, 0: 0})
    assert list(error.values.items()) == [(0, 0), (1, 1)]


def test_labelled_output_nothing_lost(ip, backend, capsys):
    capsys.readouterr()
    cell(ip, "-n 4 -q", "for i in range(1000):\n    print(f'line {i} of rank {rank}')")
    out = capsys.readouterr().out.splitlines()
    for r in range(4):
        mine = [line for line in out if line.startswith(f"[rank {r}] ")]
        assert mine == [f"[rank {r}] line {i} of rank {r}" for i in range(1000)]


def test_a_redrawn_line_keeps_its_rank_label(ip, local_pool, capsys):
    """A progress line redrawn with \\r (tqdm's) showed without its label: the
    notebook keeps only what follows the last \\r, and the label was before the first."""
    capsys.readouterr()
    cell(ip, "-n 2 -q", "import sys\nfor i in range(3):\n    sys.stdout.write(f'\\rstep {i}')\nprint()")
    out = capsys.readouterr().out.split("\n")  # (not splitlines: it splits at \r too)
    for r in range(2):
        line = next(line for line in out if line.startswith(f"[rank {r}] "))
        assert line.rsplit("\r", 1)[1] == f"[rank {r}] step 2", repr(line)


# What a rank's (and a map task's) stdout/stderr say of themselves: serially
# (ipykernel's stream, a terminal's) code may encode with .encoding and hand
# fileno() to faulthandler or a subprocess; in a rank .encoding was None and
# fileno() raised UnsupportedOperation.
_STREAM_CODE = (
    "import sys, faulthandler\n"
    "faulthandler.enable(); faulthandler.disable()\n"
    "('é'.encode(sys.stdout.encoding, sys.stdout.errors), sys.stdout.fileno() >= 0, sys.stderr.fileno() >= 0,\n"
    " sys.stdout.isatty(), sys.stdout.name, sys.stderr.name)\n"
)
_STREAM_WANT = ("é".encode(), True, True, False, "<stdout>", "<stderr>")


def test_a_ranks_stdout_has_an_encoding_and_a_fileno_as_serially(ip, backend):
    assert cell(ip, "-n 2 -q", _STREAM_CODE) == [_STREAM_WANT] * 2


def test_a_map_tasks_stdout_has_an_encoding_and_a_fileno_as_serially(ip, backend):
    run(ip, "def _streams(x):\n" + "".join(f"    {line}\n" for line in _STREAM_CODE.splitlines()[:-2])
        + "    return " + "\n".join(_STREAM_CODE.splitlines()[-2:]) + "\n")
    assert run(ip, "%pmap -q _streams, range(2)") == [_STREAM_WANT] * 2


def test_a_task_that_closes_its_stdout_fails_on_its_next_print_as_serially(ip, local_pool, capsys):
    """Serially ``sys.stdout.close()`` then ``print`` raises ValueError; the
    task's stream took the line anyway. The next unit prints again."""
    run(ip, "import sys\ndef closes(x):\n    print('before', x)\n    if x == 1:\n        sys.stdout.close()\n"
            "        print('after', x)\n    return x")
    capsys.readouterr()
    got = run(ip, "%pmap -q --errors collect --chunksize 1 -n 1 closes, [0, 1, 2]")
    assert got[0] == 0 and got[2] == 2 and isinstance(got[1], mpmagic.Failed), got
    assert str(got[1].error) == "I/O operation on closed file." and type(got[1].error) is ValueError
    out = capsys.readouterr().out
    assert "before 1" in out and "before 2" in out and "after" not in out, out


def test_error_in_one_rank_of_four(ip, backend, capsys):
    capsys.readouterr()
    with pytest.raises(mpmagic.ParallelError) as info:
        cell(ip, "-n 4 -q", "print('before', rank)\nif rank == 2:\n    raise ValueError('bad rank')\nrank")
    assert "1 of 4 ranks failed" in str(info.value)
    assert isinstance(info.value.failures[2], ValueError)
    captured = capsys.readouterr()
    for r in range(4):
        assert f"[rank {r}] before {r}" in captured.out
    # The failing rank's traceback shows the cell's own line and number.
    assert "[rank 2]" in captured.err and "raise ValueError('bad rank')" in captured.err
    assert "line 4" in captured.err  # body line 3 is line 4 of the cell, under %%parallel


def test_a_failing_rank_keeps_the_gathered_variables_of_the_ranks_that_finished(ip, backend):
    # Serially rank 0's y was computed before rank 1 raised; the error kept rank 0's last
    # value (.values) and dropped its --gather y. Nothing computed is lost: .gathered has it.
    with pytest.raises(mpmagic.ParallelError) as info:
        cell(ip, "-n 3 -q --gather y,z", "y = rank * 3\nz = -rank\nif rank == 1:\n    raise ValueError('no')\nrank")
    assert info.value.values == {0: 0, 2: 2}
    assert info.value.gathered == {"y": {0: 0, 2: 6}, "z": {0: 0, 2: -2}}
    with pytest.raises(mpmagic.ParallelError) as info:  # (a rank that never set y: none of its names)
        mpmagic.parallel("if rank:\n    y = rank\nz = rank", workers=2, namespace={}, gather="y z")
    assert info.value.gathered == {"y": {1: 1}, "z": {1: 1}}


@pytest.mark.parametrize("backend_kind", ["forkserver", "dask"])  # (stopping ranks is the manager's code on both start methods)
def test_a_failing_rank_stops_the_ranks_still_running_as_an_mpi_job_aborts(ip, backend, monkeypatch, tmp_path):
    """Rank 1 raises; rank 0 waits on it (a q.get() that would wait for ever; here a sleep)
    and rank 2 ends at once. The run waited for ever; now the ranks still running
    RANK_FAILURE_GRACE s after the failure are stopped and their workers replaced, and the
    one line names the cause and the stopped rank. -n 3 on 2 local workers: a temporary one.
    Rank 1 fails only once rank 2 has ended (a file says so): on a loaded machine the
    temporary worker may start late, and rank 2 must not be the one stopped."""
    from mpmagic import jobs

    monkeypatch.setattr(jobs, "RANK_FAILURE_GRACE", 0.3)
    run(ip, f"DONE, FREED = {str(tmp_path / 'rank2-done')!r}, {str(tmp_path / 'freed')!r}")
    try:
        with pytest.raises(mpmagic.ParallelError) as info:
            cell(ip, "-n 3 -q", "import os, time\n"
                                "if rank == 2:\n    open(DONE, 'w').close()\n"
                                "if rank == 1:\n"
                                "    while not os.path.exists(DONE):\n        time.sleep(0.01)\n"
                                "    time.sleep(0.2)\n"  # (rank 2's value on its way home)
                                "    raise ValueError('bad input')\n"
                                "if rank == 0:\n"
                                "    while not os.path.exists(DONE):\n        time.sleep(0.01)\n"
                                "    t = time.time()\n"  # (8 s at most: on a Dask cluster not mpmagic's it runs on)
                                "    while not os.path.exists(FREED) and time.time() - t < 8:\n        time.sleep(0.01)\n"
                                "rank")
        assert time.time() - os.path.getmtime(tmp_path / "rank2-done") < 6  # rank 0 stopped, not waited for
        assert str(info.value) == ("2 of 3 ranks failed (ranks 0, 1); rank 1: ValueError: bad input; rank 0 still "
                                   "ran 0.3 s after rank 1 failed (ValueError): stopped, as an MPI job aborts: a rank "
                                   "waiting for a failed one would wait for ever")
        assert isinstance(info.value.failures[0], mpmagic.RankStoppedError) and info.value.values == {2: 2}
        assert cell(ip, "-n 3 -q", "rank") == [0, 1, 2]  # the pool is usable
    finally:
        # A Dask worker runs a stopped rank on: let it end now, not 8 s later in the
        # next tests (whose new backend does not know that worker is busy, and waited).
        (tmp_path / "freed").touch()


def test_classic_split_sum(ip, backend, capsys):
    run(ip, "N = 1_000_001")
    body = "lo, hi = max(1, rank * N // size), (rank + 1) * N // size\nsum(x * x for x in range(lo, hi))"
    assert cell(ip, "-n 4 -q --reduce sum", body) == 333333833333500000
    capsys.readouterr()
    cell(ip, "-n 2 --compare", body)
    out = capsys.readouterr().out
    assert "parallel: 2 ranks" in out and "(measured" in out


@pytest.mark.parametrize("backend_kind", ["forkserver", "dask"])  # (stopping ranks is the manager's code on both start methods)
def test_timeout_stops_a_rank_and_pool_stays_usable(ip, backend, tmp_path):
    # (8 s at most, well past the 1 s timeout: on a Dask cluster mpmagic does not own
    # the rank runs on to its end, until the test lets it end: the next tests' new
    # backend would not know its worker is busy, and wait for it)
    run(ip, f"FREED = {str(tmp_path / 'freed')!r}")
    try:
        with pytest.raises(mpmagic.ParallelError) as info:
            cell(ip, "-n 2 -q --timeout 1", "import os, time\nt = time.time()\nif rank == 1:\n"
                                            "    while not os.path.exists(FREED) and time.time() - t < 8:\n"
                                            "        time.sleep(0.01)\nrank")
        assert isinstance(info.value.failures[1], mpmagic.TaskTimeoutError)
        assert cell(ip, "-n 2 -q", "rank * 2") == [0, 2]
    finally:
        (tmp_path / "freed").touch()


def test_api(backend):
    values = mpmagic.parallel("rank ** 2", workers=3, namespace={})
    assert list(values) == [0, 1, 4]
    assert values.report.items == 3


# -- the %%parallel line and what the cell may hold ------------------------------------


@pytest.fixture
def pool_fs():
    """The local forkserver pool: these tests are about the line and the cell, not the pool."""
    return ensure_pool("forkserver")


def usage_error(ip, code: str) -> str:
    """The first line of the usage error ``code`` raises (the test fails if it raises none)."""
    err = ip.run_cell(code, store_history=False).error_in_exec
    assert isinstance(err, IPythonUsageError), repr(err)
    return str(err).splitlines()[0]


def test_option_values_may_be_quoted_as_on_a_pool_line(ip, pool_fs):
    assert cell(ip, "-n 2 -q --reduce 'lambda v: sorted(v, reverse=True)'", "rank") == [1, 0]
    assert cell(ip, "-n 2 -q --reduce \"lambda v: '#'.join(map(str, v))\"  # joined", "rank") == "0#1"
    cell(ip, "-n 2 -q --gather 'lo, hi'", "lo, hi = rank, rank + 10")
    assert run(ip, "(lo, hi)") == ([0, 1], [10, 11])
    # The line is taken as written, as %pmap's (IPython's $name expansion turned --reduce's
    # {n} into other Python): $name is refused with the hint; the number itself works.
    run(ip, "ranks_wanted = 3")
    assert "%%parallel's line is not expanded by IPython" in usage_error(ip, "%%parallel -n $ranks_wanted -q\nrank")
    assert cell(ip, "-n 3 -q -o got", "rank") == [0, 1, 2]
    assert run(ip, "got") == [0, 1, 2]
    assert "quote a value with spaces: --reduce 'lambda v: ...'" in usage_error(
        ip, "%%parallel -n 2 -q --reduce lambda v: max(v)\nrank")
    assert usage_error(ip, "%%parallel -n 2 --reduce 'sum\nrank") == "%%parallel: No closing quotation"


def test_output_and_gather_names_are_names_a_cell_can_read(ip, pool_fs):
    ip.user_ns.pop("class", None)
    assert usage_error(ip, "%%parallel -n 2 -q -o class\nrank") == "%%parallel: -o needs a variable name, not 'class'"
    assert "class" not in ip.user_ns
    assert usage_error(ip, "%%parallel -n 2 -q -o 1abc\nrank") == "%%parallel: -o needs a variable name, not '1abc'"
    assert usage_error(ip, "%%parallel -n 2 -q --gather x,for\nx = for_ = 1") == (
        "%%parallel: --gather takes variable names separated by commas or spaces, and 'for' is not one")
    for given in ("'x,,y'", "x,", "''", "' '"):  # (an empty name was dropped without a word)
        assert usage_error(ip, f"%%parallel -n 2 -q --gather {given}\nx = y = 1") == (
            "%%parallel: --gather takes variable names separated by commas or spaces, and "
            f"{given[1:-1] if given[0] == chr(39) else given!r} has an empty one")
    # -o '' and --reduce '' were taken as not given: nothing stored, the list unreduced, without a word
    assert usage_error(ip, "%%parallel -n 2 -q -o ''\nrank") == "%%parallel: -o needs a variable name, not ''"
    for given in ("''", "' '"):
        assert usage_error(ip, f"%%parallel -n 2 -q --reduce {given}\nrank") == (
            f"%%parallel: --reduce needs a function such as sum, not {given[1:-1]!r}")
        assert usage_error(ip, f"%%parallel -n 2 -q --bg --reduce {given}\nrank") == (
            "%%parallel: --bg cannot be combined with --reduce: reduce the handle's result() (the list of the "
            "ranks' values) once it is done, e.g. sum(h.result())")
    # Python reads ``ℌ`` as ``H`` (NFKC): --gather and -o take the name as the code does
    ip.run_cell("%%parallel -n 2 -q --gather ℌ -o ℬ\nℌ = rank * 3", store_history=False).raise_error()
    assert ip.run_cell("H, B", store_history=False).result == ([0, 3], [None, None])
    ip.user_ns.pop("H"), ip.user_ns.pop("B")


def test_output_and_gather_naming_one_variable_is_refused_before_the_cell_runs(ip, pool_fs, tmp_path):
    """``--gather x -o x``: -o's list of values overwrote the gathered lists without
    a word. Refused in one line, before the cell runs (it would have left a file)."""
    run(ip, f"x = 'before'\nran_dir = {str(tmp_path)!r}")
    body = "import os\nopen(os.path.join(ran_dir, str(rank)), 'w').close()\nx = y = rank * 10\nrank"
    for line, gathered in (("--gather x -o x", "x"), ("--gather 'y, x' -o x", "y, x"), ("-o ℌ --gather H", "H")):
        stored = "H" if "H" in line else "x"
        assert usage_error(ip, f"%%parallel -n 2 -q {line}\n{body}") == (
            f"%%parallel: -o {stored} and --gather {gathered} would both store {stored}: give -o another name")
    assert run(ip, "x") == "before" and "H" not in ip.user_ns and not list(tmp_path.iterdir())
    # Two names: each holds what it says, as the cell gives it serially, rank by rank.
    serial = [{"rank": r, "size": 2, "ran_dir": str(tmp_path)} for r in range(2)]
    for ns in serial:
        exec(body.rsplit("\n", 1)[0], ns)
    assert cell(ip, "-n 2 -q --gather x -o values", body) == [0, 1]
    assert run(ip, "x, values") == ([ns["x"] for ns in serial], [ns["rank"] for ns in serial])
    ip.user_ns.pop("values"), ip.user_ns.pop("x")


def test_a_reduce_that_fails_says_why_and_keeps_the_values(ip, pool_fs):
    with capture_output() as cap:
        result = ip.run_cell("%%parallel -n 2 -q --reduce sum\npartial = rank * 10\n", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, ReduceError) and isinstance(err.__cause__, TypeError)
    assert err.values == [None, None]
    # One line, no frame of ours: what failed, why, and where the values are.
    assert cap.stdout.strip() == (
        "ReduceError: --reduce sum failed on the ranks' values: TypeError: unsupported operand type(s) for +: "
        "'int' and 'NoneType' (every rank's value is None: the cell ends in a statement; end it with the "
        "expression to combine); the values are kept in this error's .values (sys.last_value.values in the "
        "next cell; -o NAME keeps them in NAME)"), cap.stdout
    with pytest.raises(ReduceError, match=r"\(the values are of type list\); the values are kept in parts \(-o\)"):
        cell(ip, "-n 2 -q --reduce sum -o parts", "[rank]")
    assert run(ip, "parts") == [[0], [1]]


def test_ipython_syntax_in_the_cell_is_named_with_what_to_use_instead(ip, pool_fs):
    text = usage_error(ip, "%%parallel -n 2 -q\nchunk = [rank]\nres = %pmap -q abs, chunk\nres")
    # (lines counted as IPython counts the cell, and the ranks' tracebacks: the %%parallel line is line 1)
    assert text.startswith("%%parallel: line 3 of the cell ('res = %pmap -q abs, chunk') is IPython syntax "
                           "(a magic); a rank runs plain Python"), text
    assert "mpmagic.pmap(f, xs) works there" in text
    text = usage_error(ip, "%%parallel -n 2 -q\n!hostname\nrank")
    assert text.startswith("%%parallel: line 2 of the cell ('!hostname') is IPython syntax (a shell command)"), text
    assert "subprocess.run" in text
    # What the message offers works: pmap in a rank runs serially there.
    assert cell(ip, "-n 2 -q", "import mpmagic\nmpmagic.pmap(abs, [-rank])") == [[0], [1]]
    # A plain syntax error is still reported as one.
    assert usage_error(ip, "%%parallel -n 2 -q\nx = 1 +\n") == "%%parallel: the cell has a syntax error on line 2: invalid syntax"


def test_notebook_names_read_through_main_are_sent(ip, pool_fs):
    # Serially a cell's __main__ is the notebook: `import __main__; __main__.w` and
    # `from __main__ import w` read the notebook's w. A rank's __main__ had only the names
    # the cell reads by name: AttributeError / ImportError in every rank.
    run(ip, "w_main, v_main, u_main = [1, 2], 'v', 3")
    assert cell(ip, "-n 2 -q", "import __main__\n__main__.w_main + [rank]") == [[1, 2, 0], [1, 2, 1]]
    assert cell(ip, "-n 2 -q", "import __main__ as m\nfrom __main__ import v_main\n(m.u_main, v_main)") == [
        (3, "v"), (3, "v")]
    assert cell(ip, "-n 2 -q", "import sys\nsys.modules['__main__'].u_main + rank") == [3, 4]
    assert cell(ip, "-n 1 -q", "import __main__\nhasattr(__main__, 'not_a_notebook_name')") == [False]
    assert cell(ip, "-n 2 -q", "(globals()['u_main'] + rank, globals().get('v_main'))") == [(3, "v"), (4, "v")]
    assert cell(ip, "-n 1 -q", "import __main__\n__main__.__dict__['w_main']") == [[1, 2]]
    assert cell(ip, "-n 2 -q", "import __main__\n__main__.u_main += rank\ndel __main__.v_main\n"
                               "(u_main, 'v_main' in globals())") == [(3, False), (4, False)]
    assert run(ip, "(u_main, v_main)") == (3, "v")  # (the ranks' own copies changed)


def test_a_functions_own_names_are_not_taken_from_the_notebook(ip, backend):
    """``def g(r)`` in the cell, and an unpicklable ``r`` in the notebook: serial
    Python never reads the notebook's ``r`` there, so it is not sent (the cell
    failed with "cannot send r"). Names a nested scope reads from the notebook
    still go."""
    run(ip, "import threading\nr = threading.RLock()\nz = threading.Lock()\nK = 10\nW = [1, 2]")
    body = ("def g(r):\n    return r + K\n"
            "class C:\n    def m(self, z):\n        return z * 2\n"
            "[g(y) for y in W] + [C().m(rank)] + [(lambda z: z)(size)]")
    assert cell(ip, "-n 2 -q", body) == [[11, 12, 0, 2], [11, 12, 2, 2]]
    with pytest.raises(mpmagic.SerializationError, match="cannot send z"):
        cell(ip, "-n 2 -q", "z")  # (read at the top level: it must go, and cannot)
    # Bound at the top level before anything reads it: the cell's own, never the notebook's.
    assert cell(ip, "-n 2 -q", "z = rank * 10\ndef f():\n    return z + 1\nimport os as r\nf(), r.sep") \
        == [(1, "/"), (11, "/")]
    run(ip, "K_EXPR = 'K + 1'")  # (read by eval, which no scan sees: K still goes)
    assert cell(ip, "-n 2 -q", "v = eval(K_EXPR)\nK = rank\nv, K") == [(11, 0), (11, 1)]
    # Bound only on some paths: rank 0 reads the notebook's z, which cannot be sent. The cell runs
    # without it (it assigns z), and that rank's NameError says why (test_unpicklable_names_the_cell_assigns_...).
    with pytest.raises(mpmagic.ParallelError) as info:
        cell(ip, "-n 2 -q", "if rank:\n    z = 1\nz")
    assert info.value.values == {1: 1} and "the notebook's 'z' was not sent" in info.value.failures[0].__notes__[-1]


_BUSY = "busy_lock_t1"  # (a name no other test's notebook variable has)


def _serially(ip, body: str, rank: int, size: int):
    """The cell run serially in the shell as ``rank`` of ``size``: the oracle. The
    notebook's unpicklable ``busy_lock_t1`` is put back after (the cell may assign it)."""
    lock = ip.user_ns[_BUSY]
    try:
        return run(ip, f"rank, size = {rank}, {size}\n{body}")
    finally:
        ip.user_ns[_BUSY] = lock
        for name in ("rank", "size"):
            ip.user_ns.pop(name, None)


def test_unpicklable_names_the_cell_assigns_are_left_out_not_refused(ip, pool_fs, tmp_path):
    """An unpicklable notebook variable (a thread lock left by earlier work) of a
    name the cell assigns before reading it (in an ``if``, a ``for``, a ``with``,
    ...) refused the cell up front with "cannot send ... to the ranks", though
    serial Python never reads it there. It is now left out: each rank's value is
    the cell's value run serially here as that rank. A rank that does read it
    before assigning it raises NameError, with one line saying why it was not sent
    and what to do; a name the cell only reads is still refused before the run."""
    b = _BUSY
    run(ip, f"import threading\n{b} = threading.RLock()")
    (tmp_path / "t.txt").write_text("text")
    bodies = [
        f"if rank == 1:\n    {b} = None\nelse:\n    {b} = [1, 2]\n{b}",
        f"for {b} in range(3):\n    pass\n{b} + rank",
        f"with open({str(tmp_path / 't.txt')!r}) as {b}:\n    text = {b}.read()\n{b}.closed, text * (rank + 1)",
        f"try:\n    1 / rank\nexcept ZeroDivisionError as {b}:\n    got = str({b})\nelse:\n    got = 'ok'\ngot",
        f"[({b} := x) for x in range(rank + 2)]\n{b}",
        f"match rank:\n    case 0 as {b}:\n        pass\n    case _:\n        {b} = -1\n{b}",
        f"if rank:\n    import os as {b}\nelse:\n    from os import sep as {b}\n{b} if rank == 0 else {b}.sep",
        f"{b} = rank * 3\nprint({b})\neval('{b} + 1')",  # (eval: no scan proves it bound first)
        f"if rank:\n    def {b}():\n        return 'f'\nelse:\n    class {b}:\n        pass\n{b}.__name__",
    ]
    for body in bodies:
        serial = [_serially(ip, body, k, 2) for k in range(2)]
        assert cell(ip, "-n 2 -q", body) == serial, body
        assert mpmagic.parallel(body, workers=2, namespace=ip.user_ns, show_report=False) == serial, body
    # Read before the cell assigns it (serially: the notebook's lock): the rank says why it has none.
    with pytest.raises(mpmagic.ParallelError) as info:
        cell(ip, "-n 2 -q", f"if rank == 1:\n    {b} = None\n{b}")
    assert info.value.values == {1: None}
    exc = info.value.failures[0]
    assert isinstance(exc, NameError) and exc.name == b
    assert exc.__notes__[-1] == (
        f"mpmagic: the notebook's '{b}' was not sent to the ranks: `{b}` is a _thread.RLock, which cannot be pickled "
        "(TypeError: cannot pickle '_thread.RLock' object). A thread lock works only inside one process: create it "
        "inside the function, or use a lock made for processes: mpmagic.Lock(). "
        f"The cell assigns '{b}', so it ran without it, but this rank read it first: assign '{b}' in the cell "
        f"before reading it, or give the notebook's '{b}' a value that can be sent")
    # Only read, or assigned only in a nested function's own scope: refused before the run, as before.
    for body in (f"{b}", f"def f():\n    {b} = 1\n    return {b}\nf(), {b}", f"[{b} for {b} in range(2)], {b}"):
        with pytest.raises(mpmagic.SerializationError, match=f"^cannot send {b} to the ranks: `{b}` is a _thread.RLock"):
            cell(ip, "-n 2 -q", body)
    ip.user_ns.pop(b)


def test_compare_whose_serial_run_raises_keeps_the_ranks_values(ip, backend, capsys):
    """The cell as one rank (size 1) cannot run: 1 / (size - 1). The ranks'
    values are kept (-o too), with one line saying why nothing was measured.
    --compare with --keep is refused: the kept state is not here."""
    capsys.readouterr()
    assert cell(ip, "-n 2 -q --compare -o vals", "1 / (size - 1)") == [1.0, 1.0]
    assert run(ip, "vals") == [1.0, 1.0]
    assert "the serial run here raised ZeroDivisionError" in capsys.readouterr().err
    assert mpmagic.last_report().serial_error == "ZeroDivisionError: division by zero"
    with pytest.raises(IPythonUsageError, match="compare without --keep"):
        cell(ip, "-n 2 -q --compare --keep", "rank")


def test_compare_whose_serial_run_exits_keeps_the_ranks_values(ip, local_pool, capsys):
    """``sys.exit()`` in the serial run (the cell as one rank exits where ranks of 2 do
    not) escaped --compare, IPython's "To exit: use 'exit'" instead of the ranks' values,
    and -o stored nothing; a rank's sys.exit() is its error, and so is the serial run's
    here, as a map's serial run takes an item's sys.exit()."""
    capsys.readouterr()
    assert cell(ip, "-n 2 -q --compare -o vals", "import sys\nif size == 1:\n    sys.exit(3)\nrank") == [0, 1]
    assert run(ip, "vals") == [0, 1]
    assert "the serial run here raised SystemExit: 3" in capsys.readouterr().err
    assert mpmagic.last_report().serial_error == "SystemExit: 3"


def test_compare_serial_run_works_on_a_copy_and_labels_its_output(ip, local_pool, capsys):
    """Each rank runs the cell on a copy of the notebook's names; so does --compare's
    serial run here now (it changed the notebook's own list: ``lst`` became [1, 0]
    only when --compare was given), and what it prints is labelled ``[serial]`` (it
    showed a third time unlabelled, as if the cell printed it); ``--no-label`` as
    for the ranks. Big arrays come as the ranks get them: read-only views, no copy."""
    run(ip, "lst = [1]\nimport numpy as np\nbig = np.arange(300_000.0)")
    body = ("lst.append(rank)\nprint('printed', rank, size)\nimport sys\nprint('warned', rank, file=sys.stderr)\n"
            "(len(lst), big.flags.writeable, float(big[7]))")
    capsys.readouterr()
    assert cell(ip, "-n 2 --compare", body) == [(2, False, 7.0), (2, False, 7.0)]
    out, err = capsys.readouterr()
    assert run(ip, "lst") == [1]
    assert mpmagic.last_report().extra["serial_value"] == (2, False, 7.0)
    assert {"[rank 0] printed 0 2", "[rank 1] printed 1 2", "[serial] printed 0 1"} <= set(out.splitlines())
    assert "[serial] warned 0" in err.splitlines()
    assert not any(line.startswith(("printed", "warned")) for line in (out + err).splitlines())
    capsys.readouterr()
    cell(ip, "-n 2 -q --compare --no-label", "print('plain', rank, size)")
    assert sorted(capsys.readouterr().out.splitlines()) == ["plain 0 1", "plain 0 2", "plain 1 2"]


def test_compare_labels_what_threads_the_cell_starts_print_in_its_serial_run(ip, local_pool, capsys):
    """A rank's output is all the rank's, its threads' too (the worker's stdout is the
    rank's). --compare's serial run here labelled only its own thread's lines: a
    ``threading.Thread(target=...)`` the cell starts (and one that thread starts, a
    ThreadPoolExecutor's) printed unlabelled, as if the cell itself printed it a third time."""
    body = ("import threading, sys\nfrom concurrent.futures import ThreadPoolExecutor\n"
            "def say(what):\n    print('thread', what, rank, size)\n    print('err', what, rank, file=sys.stderr)\n"
            "def nested():\n    t = threading.Thread(target=say, args=('inner',))\n    t.start()\n    t.join()\n"
            "t = threading.Thread(target=say, args=('outer',))\nt.start()\nt.join()\n"
            "t = threading.Thread(target=nested)\nt.start()\nt.join()\n"
            "with ThreadPoolExecutor(2) as ex:\n    list(ex.map(say, ['pooled']))\nrank")
    capsys.readouterr()
    assert cell(ip, "-n 2 -q --compare", body) == [0, 1]
    out, err = capsys.readouterr()
    for what in ("outer", "inner", "pooled"):
        assert f"[serial] thread {what} 0 1" in out.splitlines(), out
        assert f"[serial] err {what} 0" in err.splitlines(), err
        assert f"[rank 1] thread {what} 1 2" in out.splitlines(), out
    assert not any(line.startswith(("thread", "err")) for line in (out + err).splitlines()), out + err


def test_compare_labels_the_log_records_of_its_serial_run_as_the_ranks_are(ip, local_pool, capsys):
    """A notebook's ``logging.basicConfig()`` of an earlier cell (a handler holding the
    notebook's stderr as it was then): the ranks' records show as ``[rank 1]
    INFO:calc:...``, the serial run's showed unlabelled, as if the cell logged a third
    time. Its records are labelled ``[serial]`` while it runs; the handler is the
    notebook's again after it (a later record is plain)."""
    import logging

    handler = logging.StreamHandler(sys.stderr)  # (as basicConfig() in an earlier cell: the stream it found)
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    logger = logging.getLogger("mpm_serial_calc")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    run(ip, "import logging\ncalc = logging.getLogger('mpm_serial_calc')")
    try:
        capsys.readouterr()
        assert cell(ip, "-n 2 -q --compare", "calc.info('rank %s', rank)\nrank") == [0, 1]
        err = capsys.readouterr().err.splitlines()
        assert {"[rank 0] INFO:mpm_serial_calc:rank 0", "[rank 1] INFO:mpm_serial_calc:rank 1",
                "[serial] INFO:mpm_serial_calc:rank 0"} <= set(err), err
        assert not any(line.startswith("INFO") for line in err), err
        logger.info("later")
        assert capsys.readouterr().err.splitlines() == ["INFO:mpm_serial_calc:later"]
        assert handler.stream is sys.stderr
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_the_serial_runs_label_is_only_for_the_runs_own_threads():
    """Threads that the serial run did not start (a background run's, another cell's
    timer) write as they are while it runs; those it starts, and theirs, are labelled."""
    import io
    import threading

    from mpmagic.api import _labelled_here

    buffer = io.StringIO()
    go, done = threading.Event(), threading.Event()

    def outsider() -> None:
        go.wait(30)
        print("outsider")
        done.set()

    before = threading.Thread(target=outsider)
    before.start()
    real_out = sys.stdout
    sys.stdout = buffer
    try:
        with _labelled_here("[serial] "):
            print("own")
            go.set()
            assert done.wait(30)
            inner = threading.Thread(target=lambda: print("started"))
            inner.start()
            inner.join()
    finally:
        sys.stdout = real_out
        before.join(30)
    assert sorted(buffer.getvalue().splitlines()) == ["[serial] own", "[serial] started", "outsider"]
    assert threading.Thread.start is threading.Thread.__dict__["start"]  # (put back as it was)


def test_a_stream_the_serial_run_kept_is_unlabelled_once_the_run_ended():
    """The serial run's ``logging.basicConfig()`` (any ``StreamHandler()``, a ``print``
    default ``file=sys.stdout``) kept the labelling stream it found as ``sys.stderr``:
    every later log line of the notebook showed ``[serial] WARNING:root:later``,
    for good. Serially the handler writes to the cell's stderr as it is; once the run
    ended, what is written to that stream passes unlabelled."""
    import io

    from mpmagic.api import _labelled_here

    buffer = io.StringIO()
    real_out = sys.stdout
    sys.stdout = buffer
    try:
        with _labelled_here("[serial] "):
            kept = sys.stdout
            print("during", file=kept)
        print("later", file=kept)
    finally:
        sys.stdout = real_out
    assert buffer.getvalue().splitlines() == ["[serial] during", "later"]


def test_compare_runs_the_cell_here_as_main_as_a_rank_does(ip, local_pool, capsys):
    """A rank's namespace is ``__main__`` while it runs, as serial code's is: a cell
    pickling a class it defines works there. ``--compare``'s serial run here was not
    ``__main__`` and said "the serial run here raised PicklingError" (the serial time
    only estimated). The notebook's ``__main__`` is back after it."""
    notebook_main = sys.modules["__main__"]
    body = ("import pickle\nimport __main__\nclass P:\n    pass\n"
            "(type(pickle.loads(pickle.dumps(P()))) is P, __main__.P is P)")
    capsys.readouterr()
    assert cell(ip, "-n 2 -q --compare", body) == [(True, True), (True, True)]
    report = mpmagic.last_report()
    assert report.serial_error is None and "(measured" in report.line()
    assert "serial run here raised" not in capsys.readouterr().err
    assert report.extra["serial_value"] == (True, True)
    assert sys.modules["__main__"] is notebook_main and "P" not in ip.user_ns


def test_names_a_class_body_augmented_assignment_or_del_reads_are_sent(ip, backend):
    """A class body reads a name it also binds (``x = x + 1``) from the
    notebook first; ``total += [rank]`` and ``del scratch`` read theirs too:
    each was missing in the ranks (NameError) where serial Python has it."""
    run(ip, "x = 41\nhelper = lambda: 'h'\ntotal = [0]\nscratch = 1")
    body = ("class A:\n    x = x + 1\n    y = helper()\n    helper = 2\n"
            "total += [rank]\ndel scratch\n(A.x, A.y, total)")
    assert cell(ip, "-n 2 -q", body) == [(42, "h", [0, 0]), (42, "h", [0, 1])]


def test_names_read_by_a_literal_exec_or_eval_string_are_sent(ip, backend):
    """``exec("t = base * 2")`` and ``eval("base + 1")`` read ``base`` from the
    notebook serially: the ranks had a NameError."""
    run(ip, "base = 20")
    assert cell(ip, "-n 2 -q", 'exec("t = base * 2")\neval("base + rank") + t') == [60, 61]
    # A string built at run time: its names cannot be known, and the error says so.
    run(ip, "which = 'base'")
    with pytest.raises(mpmagic.ParallelError) as info:
        cell(ip, "-n 2 -q", "eval(which)")
    assert "the notebook has 'base', but the cell's code does not name it" in info.value.failures[0].__notes__[-1]
    assert cell(ip, "-n 2 -q", "base\neval(which)") == [20, 20]


def test_parallel_takes_reduce_as_the_magic_does(ip, local_pool):
    """``parallel(reduce=)`` (the API had none, so ReduceError came only from the magic):
    the magic's value, and the same ReduceError keeping the values."""
    assert mpmagic.parallel("rank * 10", workers=3, reduce=sum) == cell(ip, "-n 3 -q --reduce sum", "rank * 10") == 30
    with pytest.raises(mpmagic.ReduceError, match=r"^reduce=sum failed on the ranks' values: TypeError: .*"
                       r"the cell ends in a statement.*kept in this error's .values") as info:
        mpmagic.parallel("x = rank", workers=2, reduce=sum)
    assert list(info.value.values) == [None, None]
    with pytest.raises(mpmagic.UsageError, match="reduce= needs block=True"):
        mpmagic.parallel("rank", workers=2, reduce=sum, block=False)


def test_parallel_reads_gather_as_the_magic_does(ip, pool_fs):
    """``gather='total'`` was split into letters (every rank failed: "name(s) 't', 'o',
    't', 'a', 'l' not defined", after running the whole cell), ``gather='x,y'`` failed
    on ',', and None or [1] failed inside mpmagic: a str is the names as ``--gather``
    reads them (commas or spaces), a list holds names, anything else is one line."""
    code = "total = rank * 10\nx, y = rank, -rank\nlabel = 'r%d' % rank"
    serial = [{"rank": r, "size": 2} for r in range(2)]
    for ns in serial:
        exec(code, ns)

    def expected(*names: str) -> dict:
        return {n: [ns[n] for ns in serial] for n in names}

    for given, names in (("total", ("total",)), ("x,y", ("x", "y")), ("x, y", ("x", "y")), (" x  y ", ("x", "y")),
                         (["total", "label"], ("total", "label")), (("x",), ("x",)), ((), ())):
        assert mpmagic.parallel(code, workers=2, gather=given).gathered == expected(*names), given
    # The magic reads the same str the same way.
    cell(ip, "-n 2 -q --gather 'x y'", code)
    assert run(ip, "x, y") == (expected("x")["x"], expected("y")["y"])
    ip.user_ns.pop("x"), ip.user_ns.pop("y")
    refused = {
        "": "gather= (--gather) takes variable names separated by commas or spaces, and '' has an empty one",
        "x,,y": "gather= (--gather) takes variable names separated by commas or spaces, and 'x,,y' has an empty one",
        "x-y": "gather= (--gather) takes variable names separated by commas or spaces, and 'x-y' is not one",
        None: "gather= (--gather) takes variable names: a str such as 'x' or 'x, y', or a list of them, not None",
        5: "gather= (--gather) takes variable names: a str such as 'x' or 'x, y', or a list of them, not 5",
        b"x": "gather= (--gather) takes variable names: a str such as 'x' or 'x, y', or a list of them, not b'x'",
        (1,): "gather= (--gather) takes variable names, and 1 is not one",
        ("x", "class"): "gather= (--gather) takes variable names, and 'class' is not one",
        ("x,y",): "gather= (--gather) takes variable names, and 'x,y' is not one",
    }
    before = mpmagic.last_report()
    for given, message in refused.items():
        with pytest.raises(mpmagic.UsageError) as info:
            mpmagic.parallel(code, workers=2, gather=given)
        assert str(info.value) == message, given
    assert mpmagic.last_report() is before  # (refused before anything ran)
    with pytest.raises(mpmagic.UsageError, match=r"^reduce= takes a function such as sum, not ''$"):
        mpmagic.parallel(code, workers=2, reduce="")  # type: ignore[call-overload]


def test_compare_with_reduce_says_whether_the_reduced_value_is_the_serial_one(ip, local_pool, capsys):
    """The cell as rank 0 of 1 is the serial answer; the ranks' shares, reduced,
    must equal it (the classic sum of squares split by rank and size)."""
    split = "sum(i * i for i in range(rank + 1, 1_001, size))"
    assert mpmagic.parallel(split, workers=2, reduce=sum, compare=True) == sum(i * i for i in range(1, 1_001))
    assert mpmagic.last_report().equal is True
    # Float shares add up in another order: still the serial value (to rounding).
    assert mpmagic.parallel("sum(0.1 * i for i in range(rank, 1_000, size))", workers=2, reduce=sum,
                            compare=True, show_report=True) == pytest.approx(sum(0.1 * i for i in range(1_000)))
    out = capsys.readouterr().out  # (the line is printed after the reduce)
    assert "results equal" in out
    if mpmagic.last_report().extra.get("rounding"):  # (shares added in another order: how far apart, and never plain)
        assert "results equal within float rounding: largest relative difference " in out, out
    # Each rank doing all of it: the reduced value is twice the serial one.
    assert cell(ip, "-n 2 -q --compare --reduce sum", "sum(range(10))") == 90
    report = mpmagic.last_report()
    assert "RESULTS DIFFER" in report.line() and "by rank and size" in report.advice, report.line()
    # Without --reduce there is nothing to compare the ranks' list with: no verdict.
    mpmagic.parallel("rank", workers=2, compare=True)
    assert mpmagic.last_report().equal is None


def test_compare_with_reduce_takes_float_arrays_and_frames_within_rounding_as_it_takes_floats(ip, local_pool):
    """--reduce sum of per-rank numpy arrays, Series or DataFrames (the column sums of a
    split) adds the shares in another order than the cell as rank 0 of 1: the last bits
    differ, as for a float, and that is the serial value. Before, only Python floats and
    numpy scalars had the 1e-9 tolerance: an array said RESULTS DIFFER and the advice
    asked whether the rank/size split was right."""
    import numpy as np

    # The serial oracle: the shares 0.1 and 0.2 summed are not 0.3 to the bit.
    shares = [np.array([0.1, 2.0]), np.array([0.2, 3.0])]
    assert not np.array_equal(sum(shares), np.array([0.3, 5.0]))
    assert np.allclose(sum(shares), np.array([0.3, 5.0]), rtol=1e-9, atol=0)
    run(ip, "import numpy as np, pandas as pd\ndef add_pairs(vs):\n    return tuple(map(sum, zip(*vs)))")
    for whole, share, reducer in (
            ("np.array([0.3, 5.0])", "np.array([[0.1, 0.2][rank], [2.0, 3.0][rank]])", "sum"),
            ("pd.Series([0.3, 5.0])", "pd.Series([[0.1, 0.2][rank], [2.0, 3.0][rank]])", "sum"),
            ("pd.DataFrame({'x': [0.3], 'n': [5]}, index=['r'])",
             "pd.DataFrame({'x': [[0.1, 0.2][rank]], 'n': [[2, 3][rank]]}, index=['r'])", "sum"),
            ("(np.array([0.3]), 5)", "(np.array([[0.1, 0.2][rank]]), [2, 3][rank])", "add_pairs")):
        value = cell(ip, f"-n 2 -q --compare --reduce {reducer}", f"{whole} if size == 1 else {share}")
        report = mpmagic.last_report()
        assert report.equal is True and "by rank and size" not in (report.advice or ""), (whole, report.line())
        serial = run(ip, whole)
        assert type(value) is type(serial), whole
    # A real difference is still one: the whole counted twice, an int off by one, a float off by 1e-6.
    for whole, share in (("np.array([0.3])", "np.array([0.3])"),
                         ("np.array([10**12])", "np.array([10**12 + 1]) if rank == 0 else np.array([0])"),
                         ("pd.Series([0.3])", "pd.Series([[0.1, 0.2 + 1e-6][rank]])")):
        cell(ip, "-n 2 -q --compare --reduce sum", f"{whole} if size == 1 else {share}")
        report = mpmagic.last_report()
        assert report.equal is False and "by rank and size" in report.advice, (whole, report.line())


def test_compare_takes_float32_rounding_and_sums_near_zero_as_equal_and_still_finds_real_differences(ip, local_pool):
    """--compare's tolerance follows the dtype's precision and, near zero, the size of
    what was added. Before, floats were equal only within 1e-9 of the larger, whatever
    the dtype: the float32 column sums of a 2-rank split (3e-6 apart, float32 rounding)
    and the column sums of centered float64 data (~1e-12, cancelling: 50% apart but 1e-17
    of the ranks' sums) said RESULTS DIFFER, and the advice blamed the rank/size split;
    %pmap said it for a float32 sum of a column block (the worker sums a contiguous copy)."""
    import numpy as np

    setup = ("import os, numpy as np\nrng = np.random.default_rng(0)\n"
             "XC = rng.normal(size=(20001, 3)); XC -= XC.mean(axis=0)\n"
             "X32 = rng.normal(size=(20001, 3)).astype(np.float32)\n"
             "def total(block):\n    return block.sum()\n"
             "PID = os.getpid()\n"
             "def off_in_workers(block):\n    return block.sum() * np.float32(1.01 if os.getpid() != PID else 1)")
    run(ip, setup)
    rounding = ("np.array_split(X32, size)[rank].sum(axis=0)",
                "np.array_split(XC, size)[rank].sum(axis=0)",
                "float(np.array_split(XC[:, 2], size)[rank].sum())")  # (column 2: its halves' sum differs
    # from the whole's in the last bits with numpy 2.2, the newest on Python 3.10, as with 2.4+;
    # column 1's did not with 2.2, so the serial check below failed there)
    for share in rounding:
        serial = run(ip, share.replace("size", "1").replace("rank", "0"))
        split = [run(ip, share.replace("size", "2").replace("rank", str(r))) for r in (0, 1)]
        assert not np.array_equal(serial, sum(split)), share  # (the serial oracle: the last bits differ)
        value = cell(ip, "-n 2 -q --compare --reduce sum", share)
        assert np.array_equal(value, sum(split)), share
        report = mpmagic.last_report()
        assert report.equal is True and "by rank and size" not in (report.advice or ""), (share, report.line())
    differ = ("X32.sum(axis=0)",  # each rank does all of it
              "np.array_split(XC, size)[rank].sum(axis=0) + (XC[5] if rank == 0 and size > 1 else 0)",  # a row twice
              "np.array_split(X32, size)[rank].sum(axis=0) * np.float32(1.01 if size > 1 else 1)",  # 1e-2 in float32
              "np.array_split(XC + 10, size)[rank].sum(axis=0) * (1.001 if size > 1 else 1)",  # 1e-3 in float64
              "[1e8 + 1, -1e8][rank] if size > 1 else 0.0")  # off by one in a sum that cancels
    for share in differ:
        cell(ip, "-n 2 -q --compare --reduce sum", share)
        report = mpmagic.last_report()
        assert report.equal is False and "by rank and size" in report.advice, (share, report.line())
    # The column blocks 0:2 and 1:3, transposed: numpy 2.2 (the newest on Python 3.10) sums
    # X32[:, 0:2] as its copy, bit for bit (so the check below failed there); these differ
    # from their copies' sums with 2.2 and 2.4+ alike.
    blocks = "[X32.T[0:2], X32.T[1:3]]"
    serial = run(ip, f"[total(b) for b in {blocks}]")
    assert serial != run(ip, f"[total(b.copy()) for b in {blocks}]")  # (a worker's copy sums in another order)
    run(ip, f"%pmap -q --compare total, {blocks}")
    assert mpmagic.last_report().equal is True, mpmagic.last_report().line()
    run(ip, f"%pmap -q --compare off_in_workers, {blocks}")
    assert mpmagic.last_report().equal is False, mpmagic.last_report().line()


def test_rounding_tolerance_value_by_value_follows_the_dtype_and_the_ranks_magnitudes():
    """The rule (docs/troubleshooting.md, RESULTS DIFFER): sqrt(eps) of the larger
    value, or near zero min(1024 eps, sqrt(eps)) of the scale (the sum of the ranks'
    magnitudes; for an array also its largest magnitude), or the smallest normal
    number, with eps the dtype's (a Python float's: float64's)."""
    import numpy as np
    import pandas as pd

    from mpmagic.api import _equal_reduced, _equal_to_rounding

    f32 = np.float32
    assert _equal_reduced(f32(1.0), f32(1.0) + f32(2e-5))  # (float32: 3.5e-4 relative)
    assert not _equal_reduced(f32(1.0), f32(1.01)) and not _equal_reduced(f32(1.0), f32(1.001))
    assert _equal_reduced(np.array([1.0, 2.0], f32), np.array([1.00002, 2.0], f32))
    assert _equal_reduced(np.array([1 + 1j], np.complex64), np.array([1.00002 + 1j], np.complex64))
    assert _equal_reduced(np.float16(1.0), np.float16(1.0) + np.float16(0.002))
    assert _equal_reduced(np.longdouble(1) / 3, np.longdouble(1) / 3 * (1 + np.longdouble(1e-12)))
    assert _equal_reduced(1.0, 1.0 + 1e-9) and not _equal_reduced(1.0, 1.0 + 1e-6)  # (float64: 1.5e-8)
    assert not _equal_reduced(1.0, 1.001) and not _equal_reduced(np.array([1.0]), np.array([1.001]))
    # Near zero: within 1024 eps of what the ranks added (float64), not of the sum itself.
    assert _equal_reduced(1e-12, 1.2e-12, [300.0, -300.0]) and not _equal_reduced(1e-12, 1.2e-12)
    assert not _equal_reduced(1e-12, 1.0, [300.0, -300.0])  # (an item of 1 counted twice)
    assert not _equal_reduced(0.0, 1.0, [1e8 + 1, -1e8])  # (off by one: 2e8 * 2.3e-13 = 4.6e-5)
    assert _equal_reduced(np.array([1e-12, 0.0]), np.array([1.2e-12, 0.0]),
                          [np.array([300.0, 0.0]), np.array([-300.0, 0.0])])
    assert not _equal_reduced(np.array([1e-12]), np.array([1.2e-12]))
    assert _equal_reduced(np.array([1e6, 1e-12]), np.array([1e6, 1.2e-12]))  # (the array's largest magnitude)
    assert not _equal_reduced(np.array([1e6, 1e-3]), np.array([1e6, 2e-3]))
    assert _equal_reduced(pd.Series([1e-12], dtype="Float32"), pd.Series([1.2e-12], dtype="Float32"),
                          [pd.Series([3.0], dtype="Float32"), pd.Series([-3.0], dtype="Float32")])
    frame = pd.DataFrame({"x": [1e-12], "n": [1]})
    assert _equal_reduced(frame, frame.assign(x=[1.2e-12]), [frame.assign(x=[300.0]), frame.assign(x=[-300.0])])
    assert _equal_reduced([{"k": (1e-12, 1)}], [{"k": (1.2e-12, 1)}], [[{"k": (300.0, 0)}], [{"k": (-300.0, 1)}]])
    assert _equal_reduced(0.0, 1e-310)  # (below the smallest normal number)
    # An inf does not make every other element's difference rounding.
    assert not _equal_reduced(np.array([np.inf, 1.0]), np.array([np.inf, 5.0]))
    assert not _equal_reduced(np.array([np.inf]), np.array([1.0])) and not _equal_reduced(np.inf, 1.0)
    assert not _equal_reduced(10**12, 10**12 + 1, [10**12, 1]) and not _equal_reduced(np.int64(1), np.int64(2))
    # %pmap's results, item by item (no ranks' values): the same rule.
    assert _equal_to_rounding([f32(1.0), "a"], [f32(1.0) + f32(2e-5), "a"])
    assert not _equal_to_rounding([f32(1.0), "a"], [f32(1.0), "b"]) and not _equal_to_rounding([1], [2])


def test_a_verdict_within_rounding_says_how_far_apart_and_where():
    """pandas22 #3: the tolerance lets through a value that differs on every call
    (``time.time()``: 1.5e-8 of 1.8e9 is 27 s), so a verdict taken only to rounding says
    the largest difference and its place; an exact one says nothing more."""
    import numpy as np
    import pandas as pd

    from mpmagic.api import compare_verdict
    from mpmagic.report import Report

    def verdict(serial, value, **kw):
        report = Report(kind="pmap", items=1, workers=1, backend="local", start_method="fork", wall=1.0, task_seconds=1.0)
        return compare_verdict(report, serial, value, **kw), report.extra.get("rounding")

    assert verdict([1.0, 2.0], [1.0, 2.0]) == (True, None)
    assert verdict([1.0, 2.0, 3.0], [1.0, 2.0 * (1 + 1e-12), 3.0 * (1 + 4e-12)]) == (
        True, "largest relative difference 4.0e-12 at item 2")
    assert verdict([1.0, 2.0], [1.0, 2.0 * (1 + 1e-12)], positions=[0, 5]) == (
        True, "largest relative difference 1.0e-12 at item 5")  # (the items left out are not counted)
    assert verdict([1.0, 1.0], [1.0, 1.1]) == (False, None)
    assert verdict([{"k": (0.5, np.array([1.0, 2.0]))}], [{"k": (0.5, np.array([1.0, 2.0 + 1e-12]))}]) == (
        True, "largest relative difference 5.0e-13 at item 0['k'][1][1]")
    series = pd.Series([3.0, 4.0], index=["a", "b"])
    assert verdict(series, series * (1 + 1e-12), items=False) == (True, "largest relative difference 1.0e-12 at ['a']")
    frame = pd.DataFrame({"x": [1.0, 2.0]}, index=[10, 20])
    assert verdict(frame, frame.assign(x=[1.0, 2.0 + 2e-12]), items=False) == (
        True, "largest relative difference 1.0e-12 at ['x'][20]")
    # Near zero (a sum that cancels): the difference itself, the relative one is no measure there.
    assert verdict(1e-12, 1.2e-12, parts=[300.0, -300.0], items=False) == (
        True, "largest difference near zero 2.0e-13")


def test_reduced_value_compared_within_rounding_only_for_floats_and_without_importing_numpy():
    """The tolerance, value by value: float arrays, Series and DataFrames, and lists,
    tuples and dicts of them, to within their rounding (NaN where serial had NaN); ints,
    int arrays, strings, indexes and dtypes exactly. A notebook without numpy or pandas
    imported does not import them for the comparison."""
    import subprocess
    import sys

    import numpy as np
    import pandas as pd

    from mpmagic.api import _equal_reduced

    close = 0.1 + 0.2  # (0.30000000000000004: the serial loop's 0.3 in another order)
    assert _equal_reduced(0.3, close) and _equal_reduced(np.float64(0.3), np.float64(close))
    assert _equal_reduced(np.array([0.3, np.nan, np.inf]), np.array([close, np.nan, np.inf]))
    assert _equal_reduced(np.array([[0.3j]]), np.array([[close * 1j]]))
    assert _equal_reduced(np.array([0.3], dtype=np.float32), np.array([0.3], dtype=np.float32))
    assert _equal_reduced(pd.Series([0.3, None], dtype="Float64"), pd.Series([close, None], dtype="Float64"))
    frame = pd.DataFrame({"x": [0.3], "n": [5], "s": ["a"]}, index=["r"])
    assert _equal_reduced(frame, frame.assign(x=[close]))
    assert _equal_reduced([np.array([0.3]), {"k": pd.Series([0.3])}], [np.array([close]), {"k": pd.Series([close])}])
    assert _equal_reduced((0.3, 2), (close, 2))
    differ = [
        (10**12, 10**12 + 1),  # (ints add up exactly in any order)
        (np.array([10**12]), np.array([10**12 + 1])),
        (np.array([0.3]), np.array([0.3 + 1e-6])),
        (np.array([0.3]), np.array([0.3, 0.3])),
        (np.array([0.3]), np.array([close], dtype=np.float32)),
        (np.array([np.nan]), np.array([0.3])),
        (pd.Series([0.3]), pd.Series([close], index=[1])),
        (frame, frame.assign(n=[6])),
        (frame, frame.assign(s=["b"])),
        (frame, frame.rename(columns={"x": "y"})),
        (frame, frame.assign(x=[close]).astype({"n": float})),
        ([np.array([0.3])], [np.array([0.3]), np.array([0.3])]),
        ({"a": 0.3}, {"b": close}),
        (pd.Series([0.3]), np.array([close])),
    ]
    for serial, reduced in differ:
        assert not _equal_reduced(serial, reduced), (serial, reduced)
    code = ("import sys\nfrom mpmagic.api import _equal_reduced\n"
            "assert _equal_reduced([0.3], [0.1 + 0.2]) and not _equal_reduced([1], [2])\n"
            "print(sorted({'numpy', 'pandas'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_partial_lines_of_ranks_show_at_once_each_line_from_one_rank():
    """A flushed partial line (a tqdm bar) of a rank shows at once, labelled once: its
    continuation needs no new label; another rank's partial text waits while the first
    one's line is open, and its whole lines end that line first. Before, a partial
    line showed only when its line ended, and nothing when the rank was interrupted."""
    from mpmagic.jobs import OpenLines

    shown = []
    running = {0, 1}
    lines = OpenLines(lambda stream, text: shown.append((stream, text)), running.__contains__, label=True)
    lines.feed(0, "stderr", "\r 10%")
    lines.feed(1, "stderr", "\r 50%")  # waits: rank 0's bar has the line
    lines.feed(0, "stderr", "\r 20%")
    lines.feed(1, "stdout", "hello\n")  # another stream: its own line
    assert shown == [("stderr", "[rank 0] \r[rank 0]  10%"), ("stderr", "\r[rank 0]  20%"),
                     ("stdout", "[rank 1] hello\n")]
    lines.feed(1, "stderr", "done\n")  # a whole line: rank 0's line ends first
    assert shown[-2:] == [("stderr", "\n"), ("stderr", "[rank 1] \r[rank 1]  50%done\n")]
    lines.feed(0, "stderr", "more")
    lines.end()  # (an interrupt: the open line ends, so what it showed stays)
    assert shown[-2:] == [("stderr", "[rank 0] more"), ("stderr", "\n")]
    # A map's items: no labels; an item that ended leaves its line to the next one.
    shown.clear()
    lines = OpenLines(lambda stream, text: shown.append(text), running.__contains__)
    lines.feed(0, "stdout", "partial 0")
    lines.feed(1, "stdout", "partial 1")  # waits
    lines.end()
    assert "".join(shown) == "partial 0\npartial 1"
    shown.clear()
    running.discard(0)
    lines.feed(0, "stdout", "end of 0 ")
    lines.feed(1, "stdout", "line 1\n")  # item 0 ended: joined as serial output would be
    assert "".join(shown) == "end of 0 line 1\n"


def test_a_maps_partial_lines_join_as_serially_once_the_item_holding_the_line_ended():
    """print(f"<{x}", end="", flush=True) ... print(">", end="") in each item: serial
    output is one line, <0><1>...<7>. Item 1's text waited while item 0 had the line,
    then item 2 took the line when item 0 ended, and item 1's text went out only at
    the run's end, after a newline no item printed: <0><2><3>...<7>\n<1>."""
    from mpmagic.jobs import OpenLines

    shown: list[str] = []
    running = {0, 1}
    lines = OpenLines(lambda stream, text: shown.append(text), running.__contains__)
    lines.feed(0, "stdout", "<0")
    lines.feed(1, "stdout", "<1")  # waits: item 0 has the line
    lines.feed(0, "stdout", ">")
    running.discard(0)
    lines.settle()  # item 0 ended: the text that waited for its line goes, joined
    assert "".join(shown) == "<0><1"
    running.add(2)
    lines.feed(2, "stdout", "<2")  # waits: item 1 has the line now
    lines.feed(1, "stdout", ">")
    running.discard(1)
    lines.feed(3, "stdout", "<3")  # (item 1 ended with no settle: the waiting text still goes first)
    lines.feed(2, "stdout", ">")  # (a unit's text comes before its end)
    running.discard(2)
    lines.end()
    assert "".join(shown) == "<0><1><2><3"


def test_a_ranks_displayed_object_says_which_rank_sent_it(ip, local_pool):
    """A rank's printed lines say ``[rank N]``; its DataFrames and figures did not, so
    with -n 2 two tables showed and nobody could tell whose was whose. A line of
    its own names the rank before each displayed object (not before an update)."""
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        cell(ip, "-n 1 -q", "h = display('table', display_id=True)\nh.update('done')\nrank;")
    assert cap.stdout.startswith("[rank 0] \n") and cap.stdout.count("[rank 0]") == 1
    assert [o.data["text/plain"] for o in cap.outputs] == ["'table'", "'done'"]


def test_more_ranks_than_the_machine_runs_is_one_line_at_once(ip, pool_fs, monkeypatch):
    """``%%parallel -n 99999999999999999999999999999`` grew to 23 GB before the size was
    checked (one unit per rank was made first); ``-n 1000`` was refused at once."""
    from mpmagic import api
    from mpmagic.backends.local import max_workers
    from mpmagic.cpus import available_cpus

    def no_job(*args, **kwargs):
        raise AssertionError("a CellJob was built before the size was checked")

    monkeypatch.setattr(api, "CellJob", no_job)
    cap = f"(at most {max_workers()} with {available_cpus()} CPUs)"
    for n, shown in (("99999999999999999999999999999", "999999... (29 digits)"), ("1" + "0" * 400, "10**400")):
        for extra in ("", " --bg", " --scaling"):
            assert usage_error(ip, f"%%parallel -q -n {n}{extra}\nrank") == (
                f"%%parallel: -n {shown} is more ranks than this machine can run at once {cap}"), extra


_ANNOTATED = ("import typing\n"
              "class Local:\n    pass\n"
              "def f(a: int, b: Local) -> float:\n    return a\n"
              "class Holder:\n    x: Local\n"
              "z: float = 1.0\n"
              "(f.__annotations__, typing.get_type_hints(Holder), __annotations__)")


def test_a_cells_annotations_are_objects_as_serially(ip, backend):
    """A cell's annotations are the objects they name, as serially: the cell was
    compiled under the ``from __future__ import annotations`` of mpmagic's own
    module (``astlock``), so ``f.__annotations__`` held strings, an annotation
    naming nothing raised nowhere, and ``get_type_hints`` of a class naming a
    class the cell defined failed in every rank (tester-parallel22, item 1)."""
    serial = run(ip, _ANNOTATED)
    assert serial[0] == {"a": int, "b": serial[0]["b"], "return": float} and serial[2] == {"z": float}
    ranks = cell(ip, "-n 2 -q", _ANNOTATED)
    for hints, held, module_level in ranks:
        assert hints["a"] is int and hints["return"] is float and isinstance(hints["b"], type)
        assert hints["b"].__name__ == "Local" and isinstance(held["x"], type)
        assert module_level == {"z": float}
    import builtins

    assert "__annotations__" not in vars(builtins)  # (a cell reading `__annotations__` gave the builtins one)
    with pytest.raises(NameError):  # (an annotation naming nothing fails where it is evaluated, as serially)
        run(ip, "def g(a: NoSuchName):\n    pass")
    with pytest.raises(Exception, match="NoSuchName"):
        cell(ip, "-n 2 -q", "def g(a: NoSuchName):\n    pass")


_FUTURE_CELL = ("class Node:\n    nxt: Node | None = None\n"
                "def link(a: Node) -> Node:\n    return a\n"
                "(Node.__annotations__, link.__annotations__)")


def test_a_notebooks_future_annotations_reach_its_cells_as_serially(ip, backend):
    """IPython keeps a cell's ``from __future__ import annotations`` for every later
    cell, so serially a class annotating a field with its own name (``Node | None``)
    runs, its annotations strings. Compiled without it, every rank raised NameError
    (tester-regress22, item 1); without it in the notebook, annotations are objects."""
    import __future__

    flag = __future__.annotations.compiler_flag
    run(ip, "from __future__ import annotations")
    try:
        serial = run(ip, _FUTURE_CELL)
        assert serial == ({"nxt": "Node | None"}, {"a": "Node", "return": "Node"})
        assert list(cell(ip, "-n 2 -q", _FUTURE_CELL)) == [serial, serial]
    finally:
        ip.compile.flags &= ~flag
    assert cell(ip, "-n 1 -q", "def g(a: int):\n    pass\ng.__annotations__")[0] == {"a": int}


def test_a_name_only_the_ranks_assigned_says_so_at_the_notebooks_name_error(ip, pool2):
    """fidelity24: the cell run once per rank by hand leaves its names in the notebook;
    a %%parallel cell binds them in its ranks' workers only, and the next cell's
    ``NameError`` said nothing of why. Its traceback now ends with one line naming the
    cell and --gather; a name no parallel cell assigned gets Python's error alone."""
    run(ip, "%%parallel -n 2 -q --gather _par_kept\n_par_only = rank * 2\n_par_kept = rank\n"
            "def _par_fn():\n    return 1\n")
    assert run(ip, "_par_kept") == [0, 1]  # (--gather: in the notebook)
    for code, name in (("_par_only + 1", "_par_only"), ("_par_fn()", "_par_fn")):
        with capture_output() as cap:
            result = ip.run_cell(code, store_history=False)
        assert type(result.error_in_exec) is NameError, result.error_in_exec
        assert (f"mpmagic: `{name}` was assigned by a %%parallel cell (`_par_only = rank * 2 …`) in its ranks' "
                f"processes, not in the notebook: --gather {name} brings it back (a list, one value per rank)"
                ) in cap.stdout, cap.stdout
    with capture_output() as cap:
        result = ip.run_cell("_par_never_assigned", store_history=False)
    assert type(result.error_in_exec) is NameError and "mpmagic:" not in cap.stdout, cap.stdout


def test_a_name_a_failed_gather_did_not_bring_back_is_not_told_to_gather_it(ip, pool2):
    """The name's note said "--gather x brings it back" when the cell had --gather x
    already and the gather failed (a rank never set it): it says that run's --gather did
    not bring it back, and that its error said why."""
    from mpmagic.errors import ParallelError

    with pytest.raises(ParallelError):
        run(ip, "%%parallel -n 2 -q --gather _par_unset\nif rank == 0:\n    _par_unset = 1\n")
    with capture_output() as cap:
        result = ip.run_cell("_par_unset", store_history=False)
    assert type(result.error_in_exec) is NameError, result.error_in_exec
    assert "--gather _par_unset brings it back" not in cap.stdout, cap.stdout
    assert ("mpmagic: `_par_unset` was assigned by a %%parallel cell (`if rank == 0: …`) in its ranks' processes, "
            "not in the notebook: that cell's --gather _par_unset did not bring it back (the run failed, or a rank "
            "did not set it: its error said which)") in cap.stdout, cap.stdout


def test_a_cell_that_reads_a_notebook_iterator_says_each_rank_advances_its_own_copy(ip, pool2, capsys):
    """fidelity24: ``next(ids)`` of the notebook's ``ids = itertools.count()`` in a cell: run
    once per rank by hand, ranks get 0 and 1; each rank advanced its own copy and got 0,
    silently. One line says so, once per cell text."""
    run(ip, "import itertools\n_par_ids = itertools.count()\n")
    capsys.readouterr()
    assert list(run(ip, "%%parallel -n 2 -q\nnext(_par_ids)")) == [0, 0]
    err = capsys.readouterr().err
    assert ("mpmagic: the cell advances the notebook's iterator `_par_ids` (an itertools.count) in each rank's copy, "
            "from where it was at the run, so ranks can get the same values") in err, err
    run(ip, "%%parallel -n 2 -q\nnext(_par_ids)")
    assert "mpmagic:" not in capsys.readouterr().err  # (once per cell text)
