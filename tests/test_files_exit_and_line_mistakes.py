"""What a new user meets first: open files, an unbalanced %pmap line, parallel()'s argument, exit/quit.

* An open file sent to a task (captured, or as an item) or returned from one
  is refused with a SerializationError naming it: cloudpickle sent a text file
  as an ``io.StringIO`` copy, so a task's writes were silently lost.
* ``%pmap`` refuses a line whose stray ``)`` closes the argument list early,
  before anything of it runs (``f, xs)[1].append(3`` changed ``xs``).
* ``mpmagic.parallel()`` given a function (or anything but a string) says so.
* A cell or function naming IPython's ``exit``/``quit`` can be sent: a worker
  has its own builtins of those names.
"""

from __future__ import annotations

import pickle

import pytest
from conftest import run
from IPython.core.error import UsageError as IPythonUsageError

import mpmagic
from mpmagic import payload
from mpmagic.errors import SerializationError, UsageError

# -- section 1: open files -------------------------------------------------------


@pytest.mark.parametrize("mode", ["r+", "r", "a", "rb", "r+b"])
def test_an_open_file_is_refused_not_sent_as_a_copy(tmp_path, mode):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with open(path, mode) as fh:
        for send in (lambda: payload.dumps_data([fh]), lambda: payload.dumps_checked(fh, "item 0")):
            with pytest.raises((TypeError, pickle.PicklingError, SerializationError)):
                send()
        with pytest.raises(SerializationError) as info:
            payload.dumps_function(lambda x: fh.write(x), "the function")
    text = str(info.value)
    assert "<lambda> -> fh" in text and "pass the file's path instead" in text and "\n" not in text


def test_stdout_and_stderr_still_go_by_name(monkeypatch):
    import io
    import sys

    # (a process's own streams are TextIOWrappers; pytest's capture replaced them)
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO()))
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BytesIO()))
    out, err = payload.loads(payload.dumps_data([sys.stdout, sys.stderr]))
    # Each is the stream of wherever it is used (a task's own, once it captures them): here, ours.
    out.write("to out")
    err.write("to err")
    for stream, text in ((sys.stdout, "to out"), (sys.stderr, "to err")):
        stream.flush()
        assert stream.buffer.getvalue().decode() == text


def test_a_task_given_or_returning_an_open_file_fails_with_the_fix(ip, pool2, tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    ip.user_ns["path"] = str(path)
    run(ip, "fhs = [open(path, 'r+')]\nfh = fhs[0]")
    try:
        for line in ("%pmap -q lambda f: f.write('P'), fhs", "%pmap -q lambda x: fh.write('P'), [1]"):
            error = ip.run_cell(f"_ = {line}", store_history=False).error_in_exec
            assert isinstance(error, SerializationError), error
            assert "open it inside the function" in str(error)
        with pytest.raises(SerializationError) as info:
            mpmagic.pmap(open, [str(path)])
        assert "the result of item 0 of the input (" in str(info.value) and "return its path" in str(info.value)
    finally:
        run(ip, "fh.close()")
    assert path.read_text() == "hello\n"


# -- section 2: %pmap with a stray ')' ---------------------------------------------


@pytest.mark.parametrize("args", ["f_fh, xs_fh)[1].append(3", "f_fh, xs_fh)[0](5", "f_fh, xs_fh) + (1,",
                                  "f_fh, xs_fh)[0]", "f_fh, xs_fh)", "f_fh, xs_fh) + [1]", "f_fh, xs_fh]",
                                  "f_fh, xs_fh)(f_fh, xs_fh"])
def test_pmap_refuses_an_unbalanced_argument_list_before_running_it(ip, args):
    run(ip, "calls_fh = []\ndef f_fh(x):\n    calls_fh.append(x)\n    return x\nxs_fh = [1, 2]")
    error = ip.run_cell(f"_ = %pmap -q {args}", store_history=False).error_in_exec
    assert isinstance(error, IPythonUsageError), error
    assert "not balanced" in str(error) and repr(args) in str(error)
    assert f"(a '{']' if args.endswith('xs_fh]') else ')'}' ends it" in str(error)
    assert ip.user_ns["xs_fh"] == [1, 2] and ip.user_ns["calls_fh"] == []


# -- section 6: parallel() given no code -------------------------------------------


@pytest.mark.parametrize("code", [len, 5, None])
def test_parallel_given_no_string_says_what_it_takes(code):
    with pytest.raises(UsageError) as info:
        mpmagic.parallel(code, workers=2)
    assert "takes the cell's code as a string" in str(info.value) and "mpmagic.pmap(" in str(info.value)


# -- section 7: IPython's exit/quit named in a task -------------------------------


def test_a_cell_or_function_naming_exit_or_quit_can_be_sent(ip, pool2):
    assert type(ip.user_ns["exit"]).__name__.endswith("ExitAutocall")
    assert run(ip, "%%parallel -n 2 -q\nif rank == 5:\n    exit()\nrank") == [0, 1]
    assert run(ip, "%pmap -q lambda x: x if x < 9 else quit(), [1, 2]") == [1, 2]
    assert run(ip, "%pmap -q lambda x: type(quit).__module__, [1]") != ["IPython.core.autocall"]
