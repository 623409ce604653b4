"""A notebook function whose body holds a magic line (``r = %pmap f, [x]``, ``!cmd``),
run in a task: ``%pmap h, xs`` and ``%%parallel`` calling ``h``.

IPython writes such a line as ``get_ipython().run_line_magic('pmap', 'f, [x]')``.
It ran serially in the notebook, but in a task failed with ``'NoneType' object
has no attribute 'run_line_magic'`` (a worker's ``get_ipython()`` is None), and
the line's ``f`` (named only in a string) was not even sent. Now the ``%pmap``
line runs serially in the task, as ``mpmagic.pmap`` does there, with the same
results as the serial notebook code (the oracle: ``list(map(h, xs))`` in the same
shell); the other magics and ``!cmd`` say in one line what to write instead.
"""

from __future__ import annotations

import pytest
from conftest import START_METHODS, ensure_pool, run

import mpmagic

DEFS = """
import random
def tenfold(x):
    return x * 10
def inv(x):
    return 1 / x
def nested(x):
    k = x + 1
    near = %pmap -q lambda v: v * k, [x, k]
    pairs = %pmap -q --star divmod, [(x + 7, 3)]
    seeded = %pmap -q --seed 5 lambda _: random.random(), range(2)
    collected = %pmap -q --errors collect inv, [x, 1]
    tens = %pmap -q tenfold, range(x);  # (a final ;, a comment)
    return near, pairs, seeded, [type(v).__name__ for v in collected], tens
def outer(x):
    def inner(y):
        r = %pmap -q lambda v: tenfold(v) + x, [y]
        return r, x  # (inner uses x itself: its line sees it, as %time's would)
    return inner(x + 1)
"""


@pytest.fixture(params=[*START_METHODS, "dask"])
def pool_kind(request, ip):
    """Every start method and Dask: the function is sent, and its magic line run, on each."""
    ensure_pool(request.param, request)
    return request.param


def test_a_pmap_line_in_a_function_runs_serially_in_a_task(ip, pool_kind):
    run(ip, DEFS)
    serial = run(ip, "list(map(nested, [0, 2]))")
    assert serial[0][3] == ["Failed", "float"]  # (the oracle ran: inv(0) failed, in its place)
    assert run(ip, "%pmap -q nested, [0, 2]") == serial
    assert run(ip, "%pmap -q outer, [1, 3]") == run(ip, "list(map(outer, [1, 3]))")
    ranks = run(ip, "%%parallel -n 2 -q\nnested(rank)")
    assert list(ranks) == run(ip, "[nested(0), nested(1)]")


def test_the_globals_a_magic_line_reads_are_sent_and_watched(ip, pool2):
    """``tenfold`` is named only in the line's string: it is sent with the function,
    and a new ``tenfold`` is seen by the next run (the payload cache watches it)."""
    run(ip, "def tenfold(x):\n    return x * 10\ndef h(x):\n    r = %pmap -q tenfold, [x]\n    return r[0] + 1")
    assert run(ip, "%pmap -q h, [1, 2]") == run(ip, "list(map(h, [1, 2]))") == [11, 21]
    run(ip, "def tenfold(x):\n    return x * 100")
    assert run(ip, "%pmap -q h, [1, 2]") == run(ip, "list(map(h, [1, 2]))") == [101, 201]


def test_an_inner_items_error_is_raised_as_serially(ip, pool2):
    run(ip, "def inv(x):\n    return 1 / x\ndef h(x):\n    r = %pmap -q inv, [x]\n    return r")
    with pytest.raises(ZeroDivisionError):
        run(ip, "list(map(h, [1, 0]))")
    with pytest.raises(ZeroDivisionError) as info:
        run(ip, "%pmap -q h, [1, 0]")
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "inv(0)" in notes and "h(0)" in notes  # (the inner item, then the outer one)


def test_options_a_serial_map_cannot_take_are_refused_or_named(ip, pool2, capfd):
    run(ip, "def tenfold(x):\n    return x * 10\n"
            "def bg(x):\n    r = %pmap --bg tenfold, [x]\n    return r\n"
            "def timed(x):\n    r = %pmap -q -n 2 --timeout 5 tenfold, [x]\n    return r\n"
            "def unknown(x):\n    r = %pmap --worker 2 tenfold, [x]\n    return r")
    with pytest.raises(mpmagic.UsageError, match=r"^%pmap inside a task runs serially in the worker, and cannot "
                                                 r"take --bg: .*\n?"):
        run(ip, "%pmap -q bg, [1]")
    capfd.readouterr()
    assert run(ip, "%pmap -q timed, [1]") == [[10]]
    assert "%pmap called inside a worker runs serially in that worker (a worker process cannot start workers of " \
           "its own); --timeout, -n are not applied there" in capfd.readouterr().err
    with pytest.raises(mpmagic.UsageError, match=r"^%pmap inside a task: unknown option --worker; did you mean "
                                                 r"-n/--workers\?"):
        run(ip, "%pmap -q unknown, [1]")


@pytest.mark.parametrize(("options", "says"), [
    ("-n abc", "argument -n/--workers: 'abc' is not a whole number"),
    ("--timeout x", "argument --timeout: 'x' is not a number of seconds"),
    ("--seed 1.5", "argument --seed: '1.5' is not a whole number"),
    ("--tiemout 3", "unknown option --tiemout; did you mean --timeout?"),
    ("-N 2", "unknown option -N; did you mean -n/--workers?"),
    # (an option given twice: the task's line took the last, -n 3, where the notebook's refuses it)
    ("-n 2 -n 3", "-n/--workers given twice (2, then 3): give it once"),
    ("--errors collect --errors=raise", "--errors given twice (collect, then raise): give it once"),
])
def test_a_mistake_in_a_tasks_pmap_line_is_said_in_the_magics_words(ip, pool2, options, says):
    """argparse's own words reached the user from a task: ``invalid int value: 'abc'``,
    ``unrecognized arguments: --tiemout``; the notebook's ``%pmap`` names the value and
    the option meant, and so does the task's line now."""
    from IPython.utils.capture import capture_output

    run(ip, f"def tenfold(x):\n    return x * 10\ndef h(x):\n    r = %pmap -q {options} tenfold, [x]\n    return r")
    with capture_output():
        notebook = ip.run_cell(f"%pmap -q {options} tenfold, [1]", store_history=False).error_in_exec
    assert str(notebook).startswith(f"%pmap: {says}"), notebook  # (the notebook's line says it so)
    with pytest.raises(mpmagic.UsageError) as task:
        run(ip, "%pmap -q h, [1]")
    assert str(task.value).splitlines()[0] == f"%pmap inside a task: {says}"


@pytest.mark.parametrize(("body", "says"), [
    ("!echo hi", r"!echo hi cannot run inside a task: .*call subprocess.run\(\[\.\.\.\], check=True\)"),
    ("out = !echo hi", r"x = !echo hi cannot run inside a task: .*capture_output=True, text=True\).stdout"),
    ("%time tenfold(x)", r"%time tenfold\(x\) cannot run inside a task: .*time.perf_counter\(\)"),
    ("get_ipython().user_ns", r"get_ipython\(\).user_ns is not available inside a task"),
    ("get_ipython().run_cell_magic('parallel', '-n 2', 'rank')",
     r"%%parallel -n 2 cannot run inside a task: .*mpmagic.parallel cannot run there either"),
])
def test_other_magics_and_shell_commands_say_what_to_write_instead(ip, pool2, body, says):
    """One line each, an AttributeError as ``None.system`` was (code that catches
    that to tell IPython from a script still does)."""
    run(ip, f"def tenfold(x):\n    return x * 10\ndef h(x):\n    {body}\n    return x")
    with pytest.raises(AttributeError, match=says) as info:
        run(ip, "%pmap -q h, [1]")
    assert "NoneType" not in str(info.value)


def test_get_ipython_is_still_none_for_a_scripts_guard(ip, pool2):
    run(ip, "def guarded(x):\n    shell = get_ipython()\n    return get_ipython() is None, shell is None, "
            "bool(get_ipython())")
    assert run(ip, "%pmap -q guarded, [1]") == [(True, True, False)]


def test_the_stand_in_reads_the_options_the_magic_has():
    """The task's reading of a %pmap line knows every option of the magic's, with or without a value."""
    from mpmagic import magics, task_shell

    actions = magics._pmap_parser()._option_string_actions
    assert {o: a.nargs != 0 for o, a in actions.items()} == task_shell.PMAP_OPTIONS
    assert {o: a.nargs != 0 for o, a in task_shell._pmap_parser()._option_string_actions.items()} == \
        task_shell.PMAP_OPTIONS


def test_get_ipython_gives_the_stand_in_only_where_an_attribute_of_it_is_read():
    """In a worker: ``get_ipython().x`` (IPython's form of a magic line) gets the
    stand-in; ``get_ipython()`` kept or compared is None, as outside IPython."""
    from mpmagic import task_builtins, task_shell

    namespace = {"get_ipython": task_builtins.get_ipython}
    exec("def attribute():\n    return get_ipython().__class__\n"
         "def kept():\n    ip = get_ipython()\n    return ip\n"
         "def compared():\n    return get_ipython() is not None\n", namespace)
    assert namespace["attribute"]() is task_shell.TaskShell
    assert namespace["kept"]() is None and namespace["compared"]() is False
    assert task_builtins.get_ipython() is None
