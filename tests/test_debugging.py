"""%pdebug, the details a failure carries, last_failures() and --rerun-failed."""

from __future__ import annotations

import io
import os
import re
import sys
import traceback
import warnings

import pytest
from conftest import ensure_pool, run

import mpmagic


def _debug(ip, line: str, commands: str, capsys) -> str:
    """Run ``line`` (a %pdebug) with pdb reading ``commands``; return what it printed."""
    saved = sys.stdin
    sys.stdin = io.StringIO(commands)
    try:
        run(ip, line)
    finally:
        sys.stdin = saved
    return capsys.readouterr().out


def test_pdebug_stops_at_the_raising_line_with_the_items_locals(ip, local_pool, capsys):
    run(ip, "def halve(x):\n    y = x * 10\n    assert x != 3, 'three'\n    return x / 2\n")
    ip.run_cell("%pmap -q halve, range(6)", store_history=False)
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "p x\np y\nq\n", capsys)
    assert "assert x != 3, 'three'" in out  # pdb shows the line that raised
    assert "ipdb> 3\nipdb> 30\n" in out  # x, and y computed before the raise


@pytest.fixture
def fs_pool():
    """The local forkserver pool: these tests are about the replay, not the start method."""
    return ensure_pool("forkserver")


def _serial_debug(ip, commands: str, capsys) -> str:
    """``%debug`` of the last error, with pdb reading ``commands`` (the oracle of a replay)."""
    ip.InteractiveTB.pdb = None  # (IPython keeps its debugger, and with it an earlier test's closed stdout)
    return _debug(ip, "%debug", commands, capsys)


def _pdebug_error(ip, line: str, capsys) -> tuple[str, str]:
    """Run ``line`` (a %pdebug that must refuse): (its one-line error, what it printed)."""
    saved = sys.stdin
    sys.stdin = io.StringIO("q\n")  # (a debugger opened by mistake ends at once)
    try:
        result = ip.run_cell(line, store_history=False)
    finally:
        sys.stdin = saved
    out = capsys.readouterr().out
    assert result.error_in_exec is not None, out
    return str(result.error_in_exec), out


def test_pdebug_does_not_replay_a_failure_no_item_raised(ip, fs_pool, capsys):
    """A generator input that raised, a captured global or an item that could not
    be loaded in the worker: %pdebug replayed func(None) (or said the item "did not
    fail here") and debugged an error that never happened."""
    run(ip, "import os\nNB = os.getpid()\n"
            "def gen(n):\n    for i in range(n):\n        if i == 3:\n            raise ValueError(f'bad input {i}')\n"
            "        yield i\n"
            "def sq(x):\n    return x * x\n"
            "def rebuild(v):\n    if os.getpid() != NB:\n        raise OSError(f'cannot rebuild {v} here')\n"
            "    return Thing(v)\n"
            "class Thing:\n    def __init__(self, v):\n        self.v = v\n"
            "    def __reduce__(self):\n        return (rebuild, (self.v,))\n"
            "T = Thing(3)\ndef uses(x):\n    return x + T.v\n")
    cases = [("%pmap -q sq, gen(6)", ValueError, "ValueError: bad input 3; the input raised it while it was read, in the notebook",
              "raise ValueError(f'bad input {i}')"),
             ("%pmap -q uses, [1, 2]", OSError, "OSError: cannot rebuild 3 here; the function (or its items) could "
              "not be loaded in a worker", "raise OSError(f'cannot rebuild {v} here')"),
             ("%pmap -q lambda v: v, [1, Thing(9), 3]", OSError, "OSError: cannot rebuild 9 here; the function (or its "
              "items) could not be loaded in a worker", "v = 9")]
    for cell, error, why, shown in cases:
        with pytest.raises(error):
            run(ip, cell)
        [info] = mpmagic.last_failures()
        assert info.index is None and info.outside, info
        capsys.readouterr()
        message, out = _pdebug_error(ip, "%pdebug", capsys)
        assert message == (f"%pdebug: the failure was not raised by one item ({why}): there is nothing to replay; "
                           "its traceback is above"), cell
        assert shown in out and "ipdb>" not in out, out  # the traceback, and no debugger
    with pytest.raises(mpmagic.ParallelError):
        run(ip, "%%parallel -n 2 -q\nT.v + rank\n")
    message, out = _pdebug_error(ip, "%pdebug", capsys)
    assert message.startswith("%pdebug: the failure was not raised by the rank's code (OSError: cannot rebuild 3 here; "
                              "the cell's names could not be loaded in the worker)"), message
    assert "ipdb>" not in out


def test_pdebug_of_a_gathered_variable_never_set_has_nothing_to_replay(ip, fs_pool, capsys):
    """``--gather zz`` of a cell that never sets zz: mpmagic's check after the cell
    raised the NameError, and %pdebug "replayed" it, blaming it on CellSpec (an
    mpmagic class) "which is not Python code"; a NameError of the cell's own code
    is still replayed."""
    with pytest.raises(mpmagic.ParallelError):
        run(ip, "%%parallel -n 2 -q --gather zz\nx = rank")
    info = mpmagic.last_failures()[0]
    assert info.rank == 0 and info.outside.startswith("the rank's code ran to its end without setting that variable")
    capsys.readouterr()
    message, out = _pdebug_error(ip, "%pdebug", capsys)
    assert message == ("%pdebug: the failure was not raised by the rank's code (NameError: gather= (--gather): "
                       "name(s) 'zz' not defined in the cell; the rank's code ran to its end without setting that "
                       "variable, and mpmagic's check of the gather= (--gather) names raised it): there is nothing to "
                       "replay; its traceback is above"), message
    assert "NameError: gather= (--gather): name(s) 'zz' not defined in the cell" in out
    assert "CellSpec" not in message + out and "ipdb>" not in out
    with pytest.raises(mpmagic.ParallelError):  # the cell's own NameError: replayed at its line
        run(ip, "%%parallel -n 2 -q --gather zz\nzz = rank + not_defined_anywhere")
    assert mpmagic.last_failures()[0].outside == ""
    out = _debug(ip, "%pdebug", "q\n", capsys)
    assert "zz = rank + not_defined_anywhere" in out and "ipdb>" in out, out


def test_pdebug_of_a_kept_rank_says_the_replay_raised_another_error(ip, fs_pool, capsys):
    """A kept rank's failure replayed here without its kept variables stopped on a
    NameError at another line, debugged as if it were the rank's RuntimeError."""
    run(ip, "%%parallel --keep --reset -q -n 2\nshard = [rank] * 3\n")
    try:
        with pytest.raises(mpmagic.ParallelError):
            run(ip, "%%parallel --keep -q -n 2\ntotal = sum(shard)\nif rank == 1:\n"
                    "    raise RuntimeError(f'total {total}')\ntotal\n")
        capsys.readouterr()
        out = _debug(ip, "%pdebug 1", "p total\nq\n", capsys)
    finally:
        run(ip, "%%parallel --keep --reset -q -n 2\nNone\n")
    first, rest = out.split("\n", 1)
    assert first.startswith("mpmagic: rank 1 raised RuntimeError in its worker, but replayed here it raised "
                            "NameError: name 'shard' is not defined, so the failure depended on the worker"), first
    assert "--keep" in first and "ipdb>" not in out
    assert "RuntimeError: total 3" in rest and "shard = [1, 1, 1]" in rest  # the worker's traceback and locals


def test_pdebug_of_a_function_that_uses_a_setup_name_says_the_notebook_lacks_it(ip, fs_pool, capsys):
    """A function reading a %%pool setup name can never be replayed here (the
    notebook lacks the name): the line said only that the failure "depended on
    the worker: state that lived there ..."; it names the setup's name now."""
    from mpmagic import setup_api, worker_setup

    run(ip, "def uses_base(x):\n    y = BASE + x\n    if x == 1:\n        raise ValueError(f'bad {y}')\n    return y\n"
            "def uses_token(x):\n    raise KeyError(TOKEN + str(x))\n"
            "def _start():\n    return {'TOKEN': 'abc'}\n")
    lines = []
    try:
        run(ip, "%%pool setup\nBASE = 100\n")
        out = run(ip, "%pmap -q --errors collect uses_base, range(3)")
        assert [r.index if isinstance(r, mpmagic.Failed) else r for r in out] == [100, 1, 102]  # BASE + x, serially
        capsys.readouterr()
        lines.append(_debug(ip, "%pdebug 1", "q\n", capsys))
        run(ip, "%pool setup clear\nimport mpmagic\nmpmagic.on_worker_start(_start)")
        run(ip, "%pmap -q --errors collect uses_token, [7]")
        capsys.readouterr()
        lines.append(_debug(ip, "%pdebug", "q\n", capsys))
    finally:
        worker_setup.clear()
        setup_api.apply_now()
    (first, rest), (second, _) = (text.split("\n", 1) for text in lines)
    assert first == ("mpmagic: item 1 raised ValueError in its worker, but replayed here it raised NameError: name "
                     "'BASE' is not defined: `BASE` is a name of the worker setup (%%pool setup), which the workers "
                     "have and the notebook does not, so it cannot be replayed here; that other error is not "
                     "debugged. The worker's traceback and locals:")
    assert "ValueError: bad 101" in rest and "y = 101" in rest and "ipdb>" not in lines[0]
    assert second == ("mpmagic: item 0 raised KeyError in its worker, but replayed here it raised NameError: name "
                      "'TOKEN' is not defined: `TOKEN` is a name of the worker setup (on_worker_start(_start)), which "
                      "the workers have and the notebook does not, so it cannot be replayed here; that other error is "
                      "not debugged. The worker's traceback and locals:")


def test_pdebug_debugs_a_tasks_systemexit_and_keyboardinterrupt(ip, fs_pool, capsys):
    """They escaped from %pdebug (a KeyboardInterrupt traceback on the %pdebug line)
    where %debug opens the debugger at the raise."""
    run(ip, "def quits(x):\n    y = x * 2\n    raise SystemExit(y)\n"
            "def stops(x):\n    y = x * 3\n    raise KeyboardInterrupt('from task')\n")
    for func, value in (("quits", 2), ("stops", 3)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (IPython's "To exit: use 'exit'" for a SystemExit)
            ip.run_cell(f"%pmap -q {func}, [1]", store_history=False)
        capsys.readouterr()
        saved = sys.stdin
        sys.stdin = io.StringIO("p y\nq\n")
        try:
            result = ip.run_cell("%pdebug", store_history=False)
        finally:
            sys.stdin = saved
        out = capsys.readouterr().out
        assert result.error_in_exec is None, result.error_in_exec
        assert f"ipdb> {value}\n" in out, out


def test_pdebug_shows_only_the_users_frames(ip, fs_pool, capsys):
    """`where` listed mpmagic's postmortem.py (and cell.py for a rank); a builtin
    stopped the debugger inside mpmagic."""
    run(ip, "def work(x):\n    return 10 / (x - 2)\n")
    ip.run_cell("%pmap -q work, range(4)", store_history=False)
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "where\nup\nq\n", capsys)
    assert "return 10 / (x - 2)" in out
    assert "postmortem.py" not in out and "mpmagic" not in out, out
    assert "Oldest frame" in out  # the item's call is the first frame
    ip.run_cell("%%parallel -n 2 -q\ndef f(r):\n    return 1 / r\nf(rank)\n", store_history=False)
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "where\nq\n", capsys)
    assert "return 1 / r" in out and "mpmagic" not in out, out
    run(ip, "res = %pmap -q --errors collect pow, [2, 0], [2, -1]")
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "q\n", capsys)
    assert out == ("mpmagic: replayed here, item 1 raised ZeroDivisionError: 0.0 cannot be raised to a negative power "
                   "inside pow, which is not Python code: there is no Python frame of yours for the debugger to stop "
                   "in\n"), out


def test_pdebug_numbers_a_ranks_lines_as_its_cell_and_its_traceback(ip, fs_pool, capsys):
    """A rank's traceback said "Cell In[N], line 6" and %pdebug
    "<parallel-cell-…>(5)": it numbered from the body, under a made-up name;
    the worker traceback it printed said line 6 under that name, and a syntax
    error said line 2 of a statement the traceback calls line 3."""
    run(ip, "import os\nNB = os.getpid()\n")
    cell = ("%%parallel -n 2 -q\na = 1\nb = 2\nif rank == 1{here}:\n    c = a + b\n"
            "    raise ValueError(f'bad rank {{rank}}')\na + b\n")
    for here, stop in (("", True), (" and os.getpid() != NB", False)):
        result = ip.run_cell(cell.format(here=here), store_history=True)  # (a numbered cell, as in a notebook)
        assert isinstance(result.error_in_exec, mpmagic.ParallelError)
        n = result.execution_count
        shown = capsys.readouterr()
        assert f"[rank 1] Cell In[{n}], line 6" in shown.out + shown.err
        out = _debug(ip, "%pdebug", "where\nq\n", capsys)
        if stop:  # the debugger, at the cell's line 6, under the cell's own name
            assert re.search(rf"> <ipython-input-{n}-\w+>\(6\)<module>\(\)\n", out), out
            assert "----> 6     raise ValueError(f'bad rank {rank}')" in out, out
        else:  # the worker's traceback, named and numbered as the rank's
            assert f"  Cell In[{n}], line 6, in <module>\n    raise ValueError(f'bad rank {{rank}}')" in out, out
        assert "parallel-cell" not in out
    result = ip.run_cell("%%parallel -n 2 -q\nx = 1\nif x:\nx\n", store_history=False)
    assert str(result.error_in_exec).splitlines()[0] == (
        "%%parallel: the cell has a syntax error on line 4: expected an indented block after 'if' statement on line 3")


def test_pdebug_debugs_an_exception_class_defined_in_the_function(ip, fs_pool, capsys):
    # (it came back named Local, not f.<locals>.Local, and %pdebug said the failure "depended on the worker")
    run(ip, "def with_local(x):\n    class Local(Exception):\n        pass\n    if x == 1:\n        raise Local(x)\n    return x\n")
    with pytest.raises(Exception) as serial:
        run(ip, "with_local(1)")
    with pytest.raises(Exception) as raised:
        run(ip, "%pmap -q with_local, range(3)")
    assert type(raised.value).__qualname__ == type(serial.value).__qualname__ == "with_local.<locals>.Local"
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "p x\nq\n", capsys)
    assert "depended on the worker" not in out
    assert "raise Local(x)" in out and "ipdb> 1\n" in out


def test_debug_after_a_failed_parallel_cell_stops_at_the_ranks_line(ip, fs_pool, capsys):
    # (%debug stopped in mpmagic/api.py at the raise of ParallelError; after %pmap it stops at the task's line)
    ip.run_cell("%%parallel -n 2 -q\nx = rank + 5\nif rank == 1:\n    1 / 0\n", store_history=False)
    assert type(sys.last_value).__name__ == "ParallelError"
    ours = os.path.dirname(mpmagic.__file__)
    frames = [(f.f_code.co_filename, line) for f, line in traceback.walk_tb(sys.last_traceback)]
    assert frames[-1][1] == 4 and not [f for f in frames if f[0].startswith(ours)], frames
    capsys.readouterr()
    out = _serial_debug(ip, "where\nq\n", capsys)
    assert "----> 4     1 / 0" in out and ours not in out, out


def test_a_failure_carries_locals_worker_and_input(ip, local_pool):
    run(ip, "def f(x):\n    big = 'z' * 1000\n    secret = x + 1\n    return 1 // (x - 4)\n")
    results = run(ip, "%pmap -q --errors collect f, range(6)")
    failed = results[4]
    assert isinstance(failed, mpmagic.Failed)
    assert failed.locals["secret"] == "5" and failed.locals["x"] == "4"
    assert len(failed.locals["big"]) <= 200
    assert failed.pid is not None and failed.pid != __import__("os").getpid()
    assert failed.worker is not None
    (info,) = mpmagic.last_failures()
    assert (info.index, info.item, info.pid) == (4, 4, failed.pid)
    assert isinstance(info.error, ZeroDivisionError)
    assert "secret = 5" in info.describe()


def test_a_failed_whose_exception_str_raises_still_shows(ip, fs_pool):
    """Displaying a --errors collect result raised RuntimeError when the
    exception's __str__ raises; a serial list holding it displays."""
    run(ip, "class BrokenStr(Exception):\n    def __str__(self):\n        raise RuntimeError('broken str')\n"
            "def fails(x):\n    raise BrokenStr(x)\n")
    out = run(ip, "%pmap -q --errors collect fails, [1]")
    assert repr(out) == "[<Failed item 0: input=1, BrokenStr: <exception str() failed>>]"
    assert "BrokenStr: <exception str() failed>" in repr(mpmagic.last_failures())


def test_the_exception_keeps_only_its_own_attributes(ip, fs_pool):
    """vars(e) of a task's exception held mpmagic's failure_info, where serial
    Python's has the exception's own attributes only (and mpmagic's one note, by design)."""

    def own(exc):
        return {k: v for k, v in vars(exc).items() if k != "__notes__"}

    run(ip, "class Coded(Exception):\n    def __init__(self, code):\n        super().__init__(code)\n"
            "        self.code = code\n"
            "def coded(x):\n    if x:\n        raise Coded(x)\n    return x\n")
    with pytest.raises(Exception) as raised:
        run(ip, "%pmap -q coded, [0, 7]")
    assert own(raised.value) == {"code": 7}
    [info] = mpmagic.last_failures()  # what the worker saw is still there for %pdebug
    assert (info.index, info.item, info.locals["x"]) == (1, 7, "7")
    [failed] = [r for r in run(ip, "%pmap -q --errors collect coded, [0, 7]") if isinstance(r, mpmagic.Failed)]
    assert own(failed.error) == {"code": 7} and failed.locals["x"] == "7" and failed.pid
    with pytest.raises(mpmagic.ParallelError) as raised:
        run(ip, "%%parallel -n 2 -q\nif rank:\n    raise Coded(rank)\n")
    assert own(raised.value.failures[1]) == {"code": 1}
    assert mpmagic.last_failures()[0].locals["rank"] == "1"


def test_only_a_units_first_failures_carry_locals(ip, local_pool):
    from mpmagic.debugging import LOCALS_PER_UNIT

    run(ip, "def always(x):\n    raise ValueError(x)\n")
    results = run(ip, f"%pmap -q --errors collect --chunksize {LOCALS_PER_UNIT + 5} always, range({LOCALS_PER_UNIT + 5})")
    assert [bool(r.locals) for r in results] == [True] * LOCALS_PER_UNIT + [False] * 5
    assert all(r.pid for r in results)


def test_pdebug_n_replays_that_item_of_a_collect_run(ip, local_pool, capsys):
    run(ip, "def g(x):\n    if x % 2:\n        raise ValueError(f'odd {x}')\n    return x\n")
    run(ip, "%pmap -q --errors collect g, range(8)")
    assert [f.index for f in mpmagic.last_failures()] == [1, 3, 5, 7]
    capsys.readouterr()
    out = _debug(ip, "%pdebug 5", "p x\nq\n", capsys)
    assert "raise ValueError(f'odd {x}')" in out
    assert "ipdb> 5\n" in out


def test_pdebug_on_a_parallel_rank_replays_with_its_rank_and_size(ip, local_pool, capsys):
    ip.run_cell("%%parallel -n 2 -q\nv = rank * 7\nassert rank == 0, f'rank {rank} of {size}'\n", store_history=False)
    capsys.readouterr()
    [info] = mpmagic.last_failures()
    assert info.rank == 1 and info.locals["v"] == "7"
    out = _debug(ip, "%pdebug", "p (rank, size, v)\nq\n", capsys)
    assert "(1, 2, 7)" in out


@pytest.mark.parametrize("errors", ["raise", "collect"])
def test_pdebug_replays_the_item_as_its_worker_got_it_though_the_notebook_changed_it_since(
        ip, fs_pool, capsys, errors):
    """The replay pickled the notebook's own object when %pdebug ran: a row the notebook
    changed in place after the failure (``rows[3]['v'] = 100``) replayed in its new state,
    did not fail, and %pdebug blamed the worker ("the failure depended on the worker")."""
    run(ip, "def value(row):\n    if row['v'] == 3:\n        raise ValueError(row)\n    return row['v']\n"
            "rows = [{'v': i} for i in range(6)]")
    ip.run_cell(f"%pmap -q --errors {errors} value, rows", store_history=False)
    run(ip, "rows[3]['v'] = 100")  # the notebook goes on with its data
    capsys.readouterr()
    out = _debug(ip, "%pdebug 3" if errors == "collect" else "%pdebug", "p row\nq\n", capsys)
    assert "did not fail when replayed here" not in out
    assert "raise ValueError(row)" in out and "ipdb> {'v': 3}\n" in out


def test_a_failure_that_does_not_repeat_here_says_so_in_one_line(ip, local_pool, capsys):
    run(ip, "import os\ndef where(x):\n    here = os.getpid()\n    if here != NOTEBOOK:\n        raise RuntimeError('only in a worker')\n    return x\n")
    run(ip, "NOTEBOOK = os.getpid()")
    ip.run_cell("%pmap -q where, [1]", store_history=False)
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "q\n", capsys)
    first = out.splitlines()[0]
    assert first.startswith("mpmagic: item 0 did not fail when replayed here")
    assert "RuntimeError: only in a worker" in out
    assert "here = " in out  # the worker's locals instead


def test_rerun_failed_uses_the_new_definition_and_fills_the_gaps(ip, local_pool):
    run(ip, "def inv(x):\n    return 10 / (x % 3)\n")
    first = run(ip, "%pmap -q --errors collect inv, range(9)")
    assert sum(isinstance(r, mpmagic.Failed) for r in first) == 3
    run(ip, "def inv(x):\n    return 10 / (x % 3) if x % 3 else 0.0\n")
    again = run(ip, "%pmap --rerun-failed")
    assert again == run(ip, "list(map(inv, range(9)))")
    assert mpmagic.last_failures() == []


def test_a_collecting_runs_failures_keep_only_their_own_items_alive(ip, local_pool):
    """After a failed ``--errors collect`` map, ``del`` of the input freed nothing
    (the last run kept the whole input for ``--rerun-failed``, which needs only
    the failing items, kept on their ``Failed``): 200 MB held for four 50 MB
    inputs. Serially only the failing item outlives the call."""
    import gc
    import weakref

    run(ip, "class Box:\n    def __init__(self, v):\n        self.v = v\n"
            "def check(b):\n    if b.v == 2:\n        raise ValueError(b.v)\n    return b.v\n"
            "boxes = [Box(v) for v in range(4)]")
    refs = [weakref.ref(b) for b in ip.user_ns["boxes"]]
    got = run(ip, "%pmap -q --errors collect check, boxes")
    assert [r for r in got if not isinstance(r, mpmagic.Failed)] == [0, 1, 3]
    run(ip, "del boxes")
    got = None
    gc.collect()
    assert [r() is not None for r in refs] == [False, False, True, False]  # the failing item only
    run(ip, "def check(b):\n    return b.v\n")
    assert run(ip, "%pmap -q --rerun-failed") == [0, 1, 2, 3]


def test_rerun_failed_takes_a_fixed_function_and_refuses_what_it_would_ignore(ip, local_pool):
    """``%pmap --rerun-failed inv_fixed, range(4)`` re-ran the old ``inv``, and
    --bg, --errors, --star... were dropped without a word."""
    run(ip, "def inv(x):\n    return 10 / (x % 3)\n")
    run(ip, "%pmap -q --errors collect inv, range(6)")
    for line, words in (("%pmap --rerun-failed inv, range(4)", "takes FUNC alone"),
                        ("%pmap --rerun-failed --bg", "does not take --bg"),
                        ("%pmap --errors raise --rerun-failed", "does not take --errors"),
                        # (named as written: --progress was said as --no-progress, which shares its dest)
                        ("%pmap --rerun-failed --progress", "does not take --progress ("),
                        ("%pmap --rerun-failed --checkpoint", "does not take --checkpoint (")):
        result = ip.run_cell(line, store_history=False)
        assert words in str(result.error_in_exec), line
    assert len(mpmagic.last_failures()) == 2  # nothing ran
    run(ip, "def inv_fixed(x):\n    return 10 / (x % 3) if x % 3 else 0.0\n")
    assert run(ip, "%pmap --rerun-failed -qn 2 inv_fixed") == run(ip, "list(map(inv_fixed, range(6)))")
    assert mpmagic.last_failures() == []


def test_rerun_failed_after_a_raising_run_runs_what_never_ran(ip, local_pool):
    run(ip, "def sq(x):\n    if x == 5:\n        raise KeyError(x)\n    return x * x\n")
    ip.run_cell("%pmap -q --chunksize 2 sq, list(range(12))", store_history=False)
    assert [f.index for f in mpmagic.last_failures()] == [5]
    run(ip, "def sq(x):\n    return x * x\n")
    assert run(ip, "%pmap --rerun-failed") == [x * x for x in range(12)]


def test_rerun_failed_does_not_run_again_what_the_failed_run_ran(ip, local_pool):
    """Items before the failing one in its chunk, and chunks that came back after
    the failure, had run (their side effects done) but their results were
    dropped, so --rerun-failed ran them a second time."""
    run(ip, "import mpmagic\nran = mpmagic.Array('i', 40)\n"
            "def once(x):\n    with ran.get_lock():\n        ran[x] += 1\n    if x == 9:\n        raise ValueError(x)\n"
            "    return x\n")
    assert isinstance(ip.run_cell("%pmap -q --chunksize 10 once, list(range(40))").error_in_exec, ValueError)
    run(ip, "def once(x):\n    with ran.get_lock():\n        ran[x] += 1\n    return x\n")
    assert run(ip, "%pmap -q --rerun-failed") == list(range(40))
    assert list(ip.user_ns["ran"][:]) == [1] * 9 + [2] + [1] * 30  # only the failed item ran twice


def test_rerun_failed_after_a_raising_run_over_several_lists(ip, fs_pool):
    """It said the input 'was an iterator that is used up': several lists are
    zipped into one lazy input, which the record did not list again."""
    run(ip, "def ratio(a, b):\n    return a / b\n")
    with pytest.raises(ZeroDivisionError):
        run(ip, "%pmap -q --chunksize 1 ratio, [1, 2, 3, 4], (1, 0, 1, 0)")
    [info] = mpmagic.last_failures()
    assert (info.index, info.item) == (1, (2, 0))
    run(ip, "def ratio(a, b):\n    return a / b if b else -1\n")
    assert run(ip, "%pmap -q --rerun-failed") == run(ip, "list(map(ratio, [1, 2, 3, 4], (1, 0, 1, 0)))")
    # a deque and an array.array, which map reads through their own iterators (and --compare, which lists them)
    for options in ("", "--compare"):
        run(ip, "import array, collections\ndef ratio(a, b):\n    return a / b\n")
        with pytest.raises(ZeroDivisionError):
            run(ip, f"%pmap -q {options} --chunksize 1 ratio, collections.deque([1, 2, 3, 4]), array.array('i', (1, 0, 1, 0))")
        run(ip, "def ratio(a, b):\n    return a / b if b else -1\n")
        assert run(ip, "%pmap -q --rerun-failed") == [1.0, -1, 3.0, -1]


@pytest.mark.parametrize(("data", "change"), [
    ("list(range(40))", "data.reverse()"),
    ("list(range(40))", "data.clear()"),
    ("set(range(40))", "data.clear()"),
    ("{i: -i for i in range(40)}", "data.clear()"),
    ("'abcdefghij' * 4", "data = None"),
    # containers map() takes through their own iterator: "read as it went and not kept (an iterator, ...)"
    ("collections.deque(range(40))", "data.clear()"),
    ("array.array('i', range(40))", "data.reverse()"),
    ("collections.UserList(range(40))", "data.clear()"),
    ("collections.OrderedDict.fromkeys(range(40))", "data.clear()"),
])
def test_rerun_failed_after_a_raise_runs_the_input_the_run_had_whatever_the_notebook_did_to_it(
        ip, fs_pool, data, change):
    """The record kept the user's list itself: reversed before --rerun-failed, the items
    never run were read from the reversed list, mixed silently with the first run's
    results (item 3's place got f(36)); cleared, an IndexError of ours. A set, dict or
    str was said to be "an iterator that is used up", which it is not (a deque, array or
    UserList, "read as it went and not kept (an iterator...)"). Serial map's
    oracle: f over the input as the failed call had it."""
    run(ip, "import array, collections\ndef code(x):\n    if x in (3, 'd'):\n        raise ValueError(x)\n    return str(x) * 2\n"
            f"data = {data}\nbefore = list(data)")
    with pytest.raises(ValueError):
        run(ip, "%pmap -q --chunksize 2 code, data")
    run(ip, f"{change}\ndef code(x):\n    return str(x) * 2\n")
    assert run(ip, "%pmap -q --rerun-failed") == run(ip, "list(map(code, before))")


def test_a_re_runs_unsendable_item_is_named_by_its_place_in_the_input_throughout_its_error(ip, fs_pool):
    """The re-run renumbered "cannot send item 2 (...)" but not the explanation's own
    name for it: "... to the workers: `item 0` is a _thread.lock", two places for one item."""
    run(ip, "import threading\ndef kind(x):\n    return type(x).__name__\nmixed = [1, 2, threading.Lock(), 4]")
    first = ip.run_cell("%pmap -q kind, mixed", store_history=False).error_in_exec
    again = ip.run_cell("%pmap -q --rerun-failed", store_history=False).error_in_exec
    assert isinstance(again, mpmagic.SerializationError) and "`item 2` is a _thread.lock" in str(first)
    assert "cannot send item 2 " in str(again) and "`item 2` is a _thread.lock" in str(again), str(again)


def test_pdebug_does_not_replay_an_item_whose_worker_died(ip, local_pool):
    run(ip, "import os\ndef crash(x):\n    os._exit(3)\n")
    # last_failures() names its input, as a collect run's Failed does (errors='raise' recorded item None)
    ip.run_cell("%pmap -q crash, ['b']", store_history=False)
    [info] = mpmagic.last_failures()
    assert isinstance(info.error, mpmagic.WorkerLostError) and (info.index, info.item) == (0, "b")
    results = run(ip, "%pmap -q --errors collect crash, [1]")
    assert isinstance(results[0], mpmagic.Failed)
    result = ip.run_cell("%pdebug 0", store_history=False)
    assert "replaying it here could do the same to the notebook" in str(result.error_in_exec)


def test_pdebug_question_mark_shows_its_help_as_every_magic_does(ip):
    from mpmagic.debug_magics import PDEBUG_HELP

    text = ip.object_inspect_text("%pdebug")
    assert "<no docstring>" not in text and "usage: %pdebug [N]" in text
    assert PDEBUG_HELP.strip() in text
    assert PDEBUG_HELP.splitlines()[0].startswith("Replay a failure of the last %pmap or %%parallel run")


def test_pdebug_before_any_run_says_there_was_none(ip, capsys):
    from mpmagic import debugging

    saved = debugging.last_run()
    debugging.forget()  # as in a fresh kernel (or after an interrupted run)
    try:
        result = ip.run_cell("%pdebug", store_history=False)
    finally:
        debugging.set_last_run(saved)
    assert str(result.error_in_exec) == (
        "%pdebug: no run to debug yet: run a %pmap or %%parallel cell first (an interrupted run, a --bg run or an "
        "imap stream leaves nothing to replay)")
    assert "did not fail" not in capsys.readouterr().err


def test_after_a_failing_stream_and_bg_run_the_last_blocking_failure_is_debugged_saying_so(ip, fs_pool, capsys):
    """After a failing foreground %pmap, a failing imap loop or --bg run left
    %pdebug with "no run to debug yet: run a %pmap or %%parallel cell first"
    (before that, it replayed the older failure with nothing saying so).
    The last run is the last blocking one, for last_failures() and last_report()
    too; the line before the replay names the background run that failed since."""
    run(ip, "def first(a):\n    assert a != 3, 'old failure'\n    return a\n"
            "def second(a):\n    if a == 7:\n        raise ValueError('new failure')\n    return a\n")
    with pytest.raises(AssertionError):
        run(ip, "%pmap -q first, range(5)")
    report = mpmagic.last_report()
    with pytest.raises(ValueError):
        for _value in mpmagic.imap(ip.user_ns["second"], range(20)):
            pass
    handle = run(ip, "%pmap --bg -q second, range(9)")
    with pytest.raises(ValueError):
        handle.result()
    assert [(f.index, f.item) for f in mpmagic.last_failures()] == [(3, 3)]
    assert mpmagic.last_report() is report
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "p a\nq\n", capsys)
    assert out.startswith(
        f"mpmagic: replaying item 3 of the last blocking run; run {handle.id} (pmap second), started in the "
        "background since, failed too, and is not replayed: its error is run.exception() on its handle (run its "
        "call without --bg to replay a failure with %pdebug)\n"), out
    assert "assert a != 3, 'old failure'" in out and "ipdb> 3\n" in out
    run(ip, "%pmap -q first, range(3)")  # a blocking run that succeeds: nothing older is replayed
    message, _ = _pdebug_error(ip, "%pdebug", capsys)
    assert message == "%pdebug: no failure to debug: the last %pmap or %%parallel run did not fail"


def test_a_refused_replay_does_not_first_say_it_is_replaying(ip, fs_pool, capsys):
    """A failure with nothing to replay (a --gather variable the cell never set),
    then a failing --bg run: %pdebug said "mpmagic: replaying rank 0 of the last
    blocking run; ..." and then "there is nothing to replay". The refusal is said
    alone, as it is without the background failure."""
    with pytest.raises(mpmagic.ParallelError):
        run(ip, "%%parallel -q -n 2 --gather never_set\ny = rank\n")
    handle = run(ip, "%pmap --bg -q abs, ['a']")
    with pytest.raises(TypeError):
        handle.result()
    capsys.readouterr()
    message, out = _pdebug_error(ip, "%pdebug", capsys)
    assert "there is nothing to replay" in message and "never_set" in message, message
    assert "replaying" not in out, out


def test_a_background_run_or_stream_that_succeeds_leaves_the_failed_run_to_rerun(ip, fs_pool, capsys):
    """After a failed %pmap, a --bg run or an imap loop that succeeded made
    --rerun-failed refuse, saying that run "stopped at its first failure" (or
    "Its failed items are in its results"), while %pdebug replayed the failed
    run saying the background run's "result() raises its error", last_report()
    showed the failed run and last_failures() was []. All four are the last
    blocking run's now, and nothing is said of runs that did not fail."""
    run(ip, "def inv(x):\n    scaled = x * 2\n    return 10 / (x % 3)\n")
    run(ip, "%pmap -q --errors collect inv, range(6)")
    report = mpmagic.last_report()
    run(ip, "bg = %pmap --bg -q abs, [-1, -2]\nbg.result()")
    run(ip, "bg = %pmap --bg -q --errors collect abs, [-1, -2]\nbg.result()")
    run(ip, "for v in mpmagic.imap(abs, [-1, -2]):\n    pass")
    assert [(f.index, f.item) for f in mpmagic.last_failures()] == [(0, 0), (3, 3)]
    assert mpmagic.last_report() is report and "6 items (2 failed)" in report.line()
    capsys.readouterr()
    out = _debug(ip, "%pdebug 3", "p x, scaled\nq\n", capsys)
    assert "ipdb> (3, 6)\n" in out and "mpmagic:" not in out, out
    run(ip, "def inv(x):\n    return 10 / (x % 3) if x % 3 else 0.0\n")
    run(ip, "fixed = %pmap -q --rerun-failed")
    assert ip.user_ns.pop("fixed") == list(map(ip.user_ns["inv"], range(6)))
    assert capsys.readouterr().out == "" and mpmagic.last_failures() == []
    ip.user_ns.pop("bg")


def test_pdebug_without_a_failure_is_a_one_line_usage_error(ip, local_pool, capsys):
    run(ip, "%pmap -q abs, [1, -2]")
    result = ip.run_cell("%pdebug", store_history=False)
    assert "no failure to debug" in str(result.error_in_exec)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.rstrip().splitlines()[-1].startswith("UsageError: %pdebug: no failure")
    with pytest.raises(mpmagic.UsageError, match="no failed pmap run"):
        mpmagic.rerun_failed()


# --------------------------------------------------------------------------
# A real kernel: the debugger's prompts go to the front end as input requests


# (the module-scoped ``kernel`` fixture is conftest's)


def _execute_with_input(k, code: str, answers: list[str], timeout: float = 60) -> tuple[str, list[str]]:
    """Run ``code`` answering each input request with the next of ``answers``;
    return this cell's stdout and the prompts it asked."""
    import queue
    import time

    msg_id = k.kc.execute(code, allow_stdin=True)
    out, prompts, t0 = [], [], time.monotonic()
    while True:
        assert time.monotonic() - t0 < timeout, (code, "".join(out), prompts)
        try:
            req = k.kc.get_stdin_msg(timeout=0.05)
            prompts.append(req["content"]["prompt"])
            k.kc.input(answers.pop(0) if answers else "q")
        except queue.Empty:
            pass
        try:
            msg = k.kc.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return re.sub(r"\x1b\[[0-9;]*m", "", "".join(out)), prompts  # without colours


def test_pdebug_in_a_real_kernel_is_driven_through_input_requests(kernel):
    kernel.ok("def halve(x):\n    y = x * 10\n    assert x != 3, 'three'\n    return x / 2\n")
    kernel.execute("%pmap -q halve, range(6)")
    out, prompts = _execute_with_input(kernel, "%pdebug", ["p (x, y)", "q"])
    assert prompts and all("ipdb>" in p for p in prompts)
    assert "assert x != 3, 'three'" in out and "(3, 30)" in out


def test_task_logging_lands_in_the_cell_that_ran_it_in_a_real_kernel(kernel):
    kernel.ok("import logging\nlogging.basicConfig(level=logging.INFO)\n"
              "def chatty(x):\n    logging.getLogger('calc').info('item says %s', x)\n    return x\n")
    reply = kernel.ok("%pmap -q chatty, range(3)")
    err = reply.stream("stderr")
    assert all(err.count(f"[item {x}] INFO:calc:item says {x}\n") == 1 for x in range(3)), err
    assert not any("item says" in str(c) for _, c in reply.others)


def test_after_a_checkpointed_run_failures_count_in_the_whole_input(ip, local_pool, tmp_path):
    """--checkpoint runs only the items its store lacks: %pdebug N and
    last_failures() still count in the user's input, and --rerun-failed
    points to running the call again (which is the checkpoint's re-run)."""
    run(ip, "import mpmagic\ndef ck(x):\n    if x == 5:\n        raise ValueError(x)\n    return x\n")
    ip.user_ns["ckdir"] = str(tmp_path)
    run(ip, "mpmagic.pmap(ck, range(4), checkpoint=ckdir)")  # items 0-3 stored
    results = run(ip, "mpmagic.pmap(ck, range(8), errors='collect', checkpoint=ckdir)")
    assert [r.index for r in results if isinstance(r, mpmagic.Failed)] == [5]
    [info] = mpmagic.last_failures()
    assert (info.index, info.item) == (5, 5)
    with pytest.raises(mpmagic.UsageError, match=r"used checkpoint= \(--checkpoint\).*a fixed function is a new key"):
        mpmagic.rerun_failed()


def test_rerun_failed_after_a_failed_parallel_cell_says_what_it_re_runs(ip, local_pool):
    """It said "(the last run had no failures)" after a %%parallel cell that failed."""
    with pytest.raises(mpmagic.ParallelError):
        run(ip, "%%parallel -n 2 -q\nraise ValueError(rank)\n")
    result = ip.run_cell("%pmap --rerun-failed", store_history=False)
    message = str(result.error_in_exec)
    assert "last run was a parallel cell that failed: run the cell again" in message, message
    assert "no failures" not in message


def test_rerun_failed_after_a_background_run_says_where_its_failures_are(ip, fs_pool):
    """It said "no run has ended yet" after a --bg run whose items failed."""
    run(ip, "def half(x):\n    if x == 5:\n        raise ValueError(x)\n    return x // 2\n")
    run(ip, "%pmap -q half, range(3)")  # the last blocking run: no failures
    run(ip, "bg = %pmap --bg -q --errors collect half, range(10)")
    bg = ip.user_ns.pop("bg")
    assert [r.index for r in bg.result(60) if isinstance(r, mpmagic.Failed)] == [5]
    result = ip.run_cell("%pmap --rerun-failed", store_history=False)
    assert str(result.error_in_exec).splitlines()[0] == (
        f"%pmap: no failed pmap run to re-run: the last run had no failures; run {bg.id} (pmap half), started in the "
        "background since, had 1 failed item, and a background run or an imap stream keeps nothing to re-run: its "
        "failed items are in its results: [r.item for r in run.result() if isinstance(r, mpmagic.Failed)]")


def test_rerun_failed_after_a_raising_background_run_points_to_its_exception(ip, fs_pool):
    """After a --bg run with errors="raise" it suggested the Failed of run.result(),
    which raises for such a run (and holds no Failed)."""
    run(ip, "def half(x):\n    if x == 5:\n        raise ValueError(x)\n    return x // 2\n")
    run(ip, "%pmap -q half, range(3)")  # the last blocking run: no failures
    run(ip, "bg = %pmap --bg -q half, range(10)")
    bg = ip.user_ns.pop("bg")
    bg.wait()
    result = ip.run_cell("%pmap --rerun-failed", store_history=False)
    assert str(result.error_in_exec).splitlines()[0] == (
        f"%pmap: no failed pmap run to re-run: the last run had no failures; run {bg.id} (pmap half), started in the "
        "background since, failed, and a background run or an imap stream keeps nothing to re-run: its error is "
        "run.exception() on its handle; it stopped at its first failure: run it again with --errors collect "
        "(errors='collect') to get every failed item as an mpmagic.Failed in its results")
    assert isinstance(bg.exception(), ValueError)  # (what the line says holds)


def test_rerun_failed_after_an_imap_loop_that_went_on_past_its_errors_says_where_they_were(ip, fs_pool):
    """An imap loop goes on past an item's error (the stream's run is not failed): the
    line pointed to the Failed of run.result(), which a stream never has."""
    run(ip, "def half(x):\n    if x == 5:\n        raise ValueError(x)\n    return x // 2\n")
    run(ip, "%pmap -q half, range(3)")  # the last blocking run: no failures
    run(ip, "import mpmagic\nstream = mpmagic.imap(half, range(10))\ngot = []\nfor _ in range(10):\n    try:\n"
            "        got.append(next(stream))\n    except ValueError:\n        got.append(None)\n")
    handle = ip.user_ns["stream"].run
    assert ip.user_ns["got"] == [0, 0, 1, 1, 2, None, 3, 3, 4, 4]
    assert handle.wait(60) and (handle.state, handle.items_failed) == ("done", 1)
    result = ip.run_cell("%pmap --rerun-failed", store_history=False)
    assert str(result.error_in_exec).splitlines()[0] == (
        f"%pmap: no failed pmap run to re-run: the last run had no failures; run {handle.id} (imap half), started in "
        "the background since, had 1 failed item, and a background run or an imap stream keeps nothing to re-run: "
        "its loop raised each failed item's error in its place")
    ip.user_ns.pop("stream")


def test_in_a_thread_with_only_a_background_run_nothing_is_replayed_or_re_run(fs_pool):
    """A thread whose one run was a failed --bg run: %pdebug and rerun_failed()
    refuse, naming that run and where its failures are."""
    from concurrent.futures import ThreadPoolExecutor

    from mpmagic import postmortem

    def job():
        handle = mpmagic.submit(lambda x: 1 // (x - 2), range(4), errors="collect")
        handle.result(60)
        messages = []
        for call in (postmortem.replay, mpmagic.rerun_failed):
            with pytest.raises(mpmagic.UsageError) as info:
                call()
            messages.append(str(info.value))
        return handle.id, messages

    with ThreadPoolExecutor(1) as pool:
        run_id, (replay, rerun) = pool.submit(job).result(60)
    where = ("run {id} (pmap <lambda>), started in the background since, had 1 failed item, and a background run or "
             "an imap stream keeps nothing to {action}: its failed items are in its results: "
             "[r.item for r in run.result() if isinstance(r, mpmagic.Failed)]").replace("{id}", str(run_id))
    assert replay == ("no run to debug yet: run a %pmap or %%parallel cell first (an interrupted run, a --bg run or an "
                      "imap stream leaves nothing to replay); " + where.replace("{action}", "replay")
                      + " (run its call without --bg to replay a failure with %pdebug)")
    assert rerun == "no failed pmap run to re-run: no blocking run of this thread has ended yet; " + where.replace(
        "{action}", "re-run")


def test_pdebug_usage_error_ends_with_the_pointer_to_its_help(ip):
    result = ip.run_cell("%pdebug x", store_history=False)
    assert str(result.error_in_exec).endswith("usage: %pdebug [N]   (see %pdebug?)")


def test_pdebug_takes_only_a_whole_number(ip):
    """'--1' and '²' passed the isdigit() check, and int() then raised a raw ValueError."""
    for arg in ("--1", "²", "1.5", "- 1"):
        result = ip.run_cell(f"%pdebug {arg}", store_history=False)
        assert str(result.error_in_exec).startswith(f"%pdebug: N must be an item index or rank, not {arg!r}"), arg


def test_runs_from_other_threads_do_not_become_the_notebooks_last_run(ip, fs_pool, capsys):
    """A pmap a thread ran (a library's, a threading.Thread in the notebook)
    became "the last run": --rerun-failed re-ran the thread's function and input
    into the cell's variable, %pdebug opened it, and a thread's run that
    succeeded erased the notebook's failure. Only the notebook's thread counts."""
    import threading

    run(ip, "import mpmagic\ndef halve(x):\n    if x == 3:\n        raise ValueError('three')\n    return x * 10\n"
            "def other(x):\n    if x == 1:\n        raise KeyError('other')\n    return x + 1000\n"
            "out = %pmap -q --errors collect halve, range(6)")
    errors = []

    def in_a_thread():
        try:
            mpmagic.pmap(ip.user_ns["other"], range(5), errors="collect")  # fails on item 1
            mpmagic.pmap(abs, range(3))  # succeeds
            mpmagic.submit(abs, range(3)).result(30)  # a background run started here
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(30)
    assert not errors and not thread.is_alive()
    assert [(f.index, str(f.error)) for f in mpmagic.last_failures()] == [(3, "three")]
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "p x\nq\n", capsys)
    assert "raise ValueError('three')" in out and "ipdb> 3\n" in out, out
    run(ip, "def halve(x):\n    return x * 10\n")
    assert run(ip, "fixed = %pmap --rerun-failed -q\nfixed") == [x * 10 for x in range(6)]


def test_pdebug_does_not_replay_a_rank_that_reads_a_live_queue(ip, fs_pool, capsys):
    """%pdebug replayed the rank against the user's queue: it took the items left
    for others (then said the failure "depended on the worker"), or blocked for ever."""
    run(ip, "import mpmagic\ndq = mpmagic.Queue()\nfor v in [4, 0, 5, None]:\n    dq.put(v)")
    ip.run_cell("%%parallel -n 1 -q\ntotal = 0\nwhile (x := dq.get()) is not None:\n    total += 10 // x",
                store_history=False)
    assert run(ip, "dq.qsize()") == 2
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "q\n", capsys)
    assert out.startswith("mpmagic: rank 0 uses mpmagic.Queue `dq`: replaying it here would take items meant for "
                          "other tasks"), out
    assert "not replayed" in out and "depended on the worker" not in out and "ipdb>" not in out
    assert "ZeroDivisionError" in out and "total = 2" in out  # the worker's traceback and locals
    assert run(ip, "[dq.get(), dq.get()]") == [5, None]  # nothing taken
    ip.user_ns.pop("dq", None)


def test_pdebug_does_not_replay_an_item_that_waits_on_a_live_event(ip, fs_pool, capsys):
    run(ip, "import mpmagic\ndev = mpmagic.Event()\ndef gated(x):\n    dev.wait(0.01)\n    return 1 / x\n")
    ip.run_cell("%pmap -q gated, [0]", store_history=False)
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "q\n", capsys)
    assert out.startswith("mpmagic: item 0 uses mpmagic.Event `dev`: replaying it here could wait for ever"), out
    assert "ipdb>" not in out and "ZeroDivisionError" in out
    ip.user_ns.pop("dev", None)


def test_pdebug_says_a_replay_writes_a_live_value_again(ip, fs_pool, capsys):
    run(ip, "import mpmagic\ndcount = mpmagic.Value('i', 0)\n"
            "def bump(x):\n    with dcount.get_lock():\n        dcount.value += 1\n    return 1 / x\n")
    ip.run_cell("%pmap -q bump, [0]", store_history=False)
    capsys.readouterr()
    out = _debug(ip, "%pdebug", "q\n", capsys)
    assert out.startswith("mpmagic: the replay uses the live mpmagic.Value `dcount`: what it writes there is "
                          "written again\n"), out
    assert "ipdb>" in out and run(ip, "dcount.value") == 2  # replayed (and debugged), as documented
    ip.user_ns.pop("dcount", None)


def test_an_interrupted_replay_is_one_line(ip, fs_pool, capsys):
    """Ctrl-C during a replay showed a traceback through debug_magics.py, postmortem.py..."""
    from conftest import interrupted_cell

    run(ip, "import os, time\nHOME_PID = os.getpid()\n"
            "def stuck(x):\n    if os.getpid() == HOME_PID:\n        time.sleep(30)\n    raise ValueError(x)\n")
    ip.run_cell("%pmap -q stuck, [1]", store_history=False)
    capsys.readouterr()
    shown, error = interrupted_cell(ip, "%pdebug", after=0.3)
    assert isinstance(error, KeyboardInterrupt)
    assert shown.strip() == ("KeyboardInterrupt: %pdebug interrupted: the replay of item 0 was stopped; "
                             "mpmagic.last_failures() has the worker's traceback and locals"), shown


def test_a_threads_own_failed_run_is_its_last_failures_and_rerun_failed(fs_pool):
    """In a worker thread, last_report() showed the thread's failed run but
    last_failures() was [] and rerun_failed() said "no run has ended yet": they
    are per thread now, as last_report, and the main thread's stay its own."""
    from concurrent.futures import ThreadPoolExecutor

    mpmagic.pmap(abs, range(3))  # the main thread's last run: no failures

    def job():
        mpmagic.pmap(lambda x: 1 // (x - 2), range(4), errors="collect")
        seen = [(f.index, type(f.error).__name__) for f in mpmagic.last_failures()]
        return mpmagic.last_report().failed, seen, mpmagic.rerun_failed(lambda x: -x)

    with ThreadPoolExecutor(1) as pool:
        failed, seen, again = pool.submit(job).result(60)
    assert (failed, seen) == (1, [(2, "ZeroDivisionError")])
    assert again == [-1, -1, -2, 1]
    assert mpmagic.last_failures() == []


def test_rerun_failed_again_after_a_raising_rerun_runs_each_item_once_and_names_it(ip, local_pool):
    """Each ``--rerun-failed`` of a run where item 3 still raises dropped the items that
    finished during it (item 5 ran three times: the docs promise it runs no more), said
    "raised by item 0 of the input" (its place in the re-run), and showed a frame of
    mpmagic/postmortem.py. The oracle: serial ``map`` raises at item 3, each item once."""
    from IPython.utils.capture import capture_output

    run(ip, "import mpmagic\nran = mpmagic.Array('i', 8)\n"
            "def once(x):\n    with ran.get_lock():\n        ran[x] += 1\n    if x == 3:\n        raise ValueError(x)\n"
            "    return x\n")
    ip.run_cell("%pmap -q -n 2 --chunksize 1 once, range(8)", store_history=False)
    for _ in range(2):
        with capture_output() as cap:
            error = ip.run_cell("%pmap -q --rerun-failed", store_history=False).error_in_exec
        assert isinstance(error, ValueError) and error.__notes__[-1].startswith("mpmagic: raised by item 3 of the input")
        assert "mpmagic/" not in cap.stdout + cap.stderr, cap.stdout
        assert [(f.index, f.item) for f in mpmagic.last_failures()] == [(3, 3)]
        assert mpmagic.api.last_report().line().startswith("pmap failed at item 3 after ")
    counts = list(ip.user_ns["ran"][:])
    assert counts[3] == 3 and all(n <= 1 for i, n in enumerate(counts) if i != 3), counts
    run(ip, "def once(x):\n    with ran.get_lock():\n        ran[x] += 1\n    return x\n")
    assert run(ip, "%pmap -q --rerun-failed") == list(range(8))
    assert list(ip.user_ns["ran"][:]) == [1, 1, 1, 4, 1, 1, 1, 1]


def test_pdebug_replays_on_a_copy_of_the_item_as_its_worker_got_one(ip, backend, capsys):
    """The replay ran on the notebook's own item: a row normalised in place was all
    zeros after %pdebug (the run had left it alone), and a dict the function updates
    made the second %pdebug say the failure "depended on the worker" and a later
    --rerun-failed succeed only because the debugger had changed the data."""
    run(ip, "import copy, numpy as np\n"
            "def center(a):\n    a -= a.mean()\n    if not a.any():\n        raise ValueError('constant row')\n"
            "    return a.std()\n"
            "def once(d):\n    d['calls'] = d.get('calls', 0) + 1\n    if d['calls'] == 1:\n"
            "        raise RuntimeError('first call')\n    return 'ok'\n"
            "rows = [np.arange(5.0), np.ones(5)]\nitems = [{'name': 'a'}]\n")
    out = run(ip, "%pmap -q --errors collect center, rows")
    assert isinstance(out[1], mpmagic.Failed) and run(ip, "rows[1].tolist()") == [1.0] * 5
    capsys.readouterr()
    shown = _debug(ip, "%pdebug 1", "p a.tolist()\nq\n", capsys)
    assert "raise ValueError('constant row')" in shown and "ipdb> [0.0, 0.0, 0.0, 0.0, 0.0]\n" in shown, shown
    assert run(ip, "rows[1].tolist()") == [1.0] * 5  # (it was all zeros: the replay's writes went to the notebook's row)
    with pytest.raises(RuntimeError):
        run(ip, "%pmap -q once, items")
    for _ in range(2):  # each replay is the worker's: the same failure, again
        shown = _debug(ip, "%pdebug", "p d\nq\n", capsys)
        assert "raise RuntimeError('first call')" in shown and "ipdb> {'name': 'a', 'calls': 1}\n" in shown, shown
    assert run(ip, "items") == [{"name": "a"}]
    with pytest.raises(RuntimeError) as serial:  # the oracle: serial map on what the workers got, a copy
        run(ip, "list(map(once, copy.deepcopy(items)))")
    with pytest.raises(RuntimeError) as again:  # (it "succeeded": the debugger had set 'calls' in the notebook)
        run(ip, "%pmap -q --rerun-failed")
    assert str(again.value) == str(serial.value) == "first call"


def test_pdebug_replays_a_shared_array_read_only_as_its_worker_had_it(ip, local_pool, capsys):
    """An array of 1 MB or more reaches the workers read-only (shared memory), so the
    item failed there with "output array is read-only"; the replay ran on the
    notebook's writable array: no failure, "the failure depended on the worker", and
    the user's array silently rewritten."""
    run(ip, "import numpy as np\ndef center(a):\n    a -= a.mean()\n    return a.sum()\n"
            "big = [np.arange(300_000.0)]\n")
    with pytest.raises(ValueError, match="output array is read-only"):
        run(ip, "%pmap -q center, big")
    capsys.readouterr()
    shown = _debug(ip, "%pdebug", "p a.flags.writeable\nq\n", capsys)
    # The oracle: serial %debug of the same call on a read-only copy, as the worker had it.
    with pytest.raises(ValueError, match="output array is read-only"):
        run(ip, "ro = big[0].copy()\nro.flags.writeable = False\ncenter(ro)")
    serial = _serial_debug(ip, "p a.flags.writeable\nq\n", capsys)
    line = "----> 3     a -= a.mean()\n"
    assert line in shown and line in serial and "ipdb> False\n" in shown and "ipdb> False\n" in serial, shown
    assert "depended on the worker" not in shown
    assert run(ip, "big[0][:3].tolist()") == [0.0, 1.0, 2.0]


def test_plain_pdebug_replays_the_rank_that_raised_not_one_stopped_because_of_it(ip, backend, capsys,
                                                                                  monkeypatch):
    """The guide's own scenario: rank 1 raises, rank 0 waits for it and is stopped.
    Plain %pdebug took the lowest rank, the stopped one, and ran its waiting loop in
    the notebook (until Ctrl-C; a loop that ended made it say the failure "depended
    on the worker"); %pdebug 0 did the same."""
    from mpmagic import jobs

    monkeypatch.setattr(jobs, "RANK_FAILURE_GRACE", 0.3)
    cell = ("%%parallel -n 2 -q\nimport time\nstarted = time.time()\nif rank == 1:\n"
            "    raise ValueError('bad input on rank 1')\n"
            "while time.time() - started < 5:  # rank 0 waits for rank 1\n    time.sleep(0.05)\n")
    with pytest.raises(mpmagic.ParallelError) as raised:
        run(ip, cell)
    assert isinstance(raised.value.failures[0], mpmagic.RankStoppedError)
    assert [f.rank for f in mpmagic.last_failures()] == [0, 1]
    capsys.readouterr()
    shown = _debug(ip, "%pdebug", "p rank\nq\n", capsys)
    assert "----> 5     raise ValueError('bad input on rank 1')" in shown and "ipdb> 1\n" in shown, shown
    assert "mpmagic:" not in shown  # (its ParallelError already says rank 0 was stopped because of it)
    message, out = _pdebug_error(ip, "%pdebug 0", capsys)
    assert message.startswith("%pdebug: rank 0 did not raise: mpmagic stopped it (rank 0 still ran 0.3 s after rank "
                              "1 failed (ValueError): stopped, as an MPI job aborts"), message
    assert message.endswith("replaying it here could wait for ever in the notebook, so it is not replayed; "
                            "%pdebug 1 replays rank 1, whose failure stopped it"), message
    assert "ipdb>" not in out


def test_plain_pdebug_passes_over_an_item_that_ran_past_its_timeout(ip, fs_pool, capsys):
    """The first failure of a collecting run timed out, a later one raised: plain %pdebug
    refused the first ("could do the same to the notebook") though one could be replayed."""
    run(ip, "import time\ndef slow_or_bad(x):\n    if x == 0:\n        time.sleep(30)\n"
            "    if x == 2:\n        raise KeyError(x)\n    return x\n")
    out = run(ip, "%pmap -q --errors collect --timeout 0.5 -n 2 --chunksize 1 slow_or_bad, range(3)")
    assert [type(r.error).__name__ for r in out if isinstance(r, mpmagic.Failed)] == ["TaskTimeoutError", "KeyError"]
    capsys.readouterr()
    shown = _debug(ip, "%pdebug", "p x\nq\n", capsys)
    assert shown.startswith("mpmagic: replaying item 2, the first failure its code raised (item 0 ran past its "
                            "timeout: not replayed here)\n"), shown
    assert "raise KeyError(x)" in shown and "ipdb> 2\n" in shown, shown


def test_pdebug_after_a_module_reload_says_the_code_changed_not_the_worker(ip, fs_pool, tmp_path, monkeypatch,
                                                                           capsys):
    """A function of a module goes by name: after importlib.reload of its edited file
    the replay ran the new code, did not fail, and %pdebug blamed "the worker (its
    state, environment or resources)" though mpmagic itself had said of the reload."""
    (tmp_path / "pdebug_reload_mod.py").write_text("def f(x):\n    if x == 2:\n        raise ValueError('old code')\n"
                                                   "    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run(ip, "import importlib, pdebug_reload_mod")
        with pytest.raises(ValueError, match="old code"):
            run(ip, "%pmap -q pdebug_reload_mod.f, range(4)")
        capsys.readouterr()
        shown = _debug(ip, "%pdebug", "q\n", capsys)  # (not reloaded: the very failure)
        assert "raise ValueError('old code')" in shown and "mpmagic:" not in shown, shown
        (tmp_path / "pdebug_reload_mod.py").write_text("def f(x):\n    return x  # fixed\n")
        run(ip, "importlib.reload(pdebug_reload_mod)")
        assert run(ip, "list(map(pdebug_reload_mod.f, range(4)))") == [0, 1, 2, 3]  # serially, the new code
        capsys.readouterr()
        shown = _debug(ip, "%pdebug", "q\n", capsys)
        assert shown.splitlines()[0] == (
            "mpmagic: item 2 did not fail when replayed here, but the code changed since the run: pdebug_reload_mod "
            "was reloaded since, so the replay ran its new code where the workers ran the old; the worker's "
            "traceback and locals:"), shown
        assert "ValueError: old code" in shown and "depended on the worker" not in shown
    finally:
        sys.modules.pop("pdebug_reload_mod", None)


def test_a_parallel_cells_last_line_ends_its_line_in_the_debugger(ip, fs_pool, capsys):
    """The cached lines of a %%parallel cell had no newline at the end: when its last
    line raised, pdb's listing ran into the prompt (``val = [0][rank]ipdb>``) and
    ``where`` printed two frames on one line. Serial %debug of a cell is the oracle."""
    with pytest.raises(IndexError):
        ip.run_cell("rank = 1\nval = 1\nval = [0][rank]", store_history=True).raise_error()
    serial = _serial_debug(ip, "q\n", capsys)
    assert "----> 3 val = [0][rank]\n\nipdb> " in serial, serial  # IPython's own cell: a blank line, then the prompt
    ip.run_cell("%%parallel -n 2 -q\nval = 1\nval = [0][rank]", store_history=True)
    capsys.readouterr()
    for line in ("%pdebug", "%debug"):
        shown = _debug(ip, line, "where\nq\n", capsys) if line == "%pdebug" else _serial_debug(ip, "where\nq\n", capsys)
        assert "----> 3 val = [0][rank]\n\nipdb> " in shown, shown
        assert not re.search(r"\S> <ipython-input", shown), shown  # each frame on its own line
