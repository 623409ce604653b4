"""Logging records and warnings from tasks show in the cell, labelled, as Python would show them."""

from __future__ import annotations

import gc
import logging
import os
import sys
import warnings

import pytest
from conftest import run

import mpmagic

# The warnings these tests read are the lines a notebook shows (see conftest.notebook_warnings).
pytestmark = pytest.mark.usefixtures("notebook_warnings")


@pytest.fixture
def root_level():
    """Set up the notebook's logging for one test as ``logging.basicConfig(level=...)``
    does: the root logger's level and a handler printing to stderr (serially,
    records below WARNING print only through such a handler)."""
    root = logging.getLogger()
    saved = root.level
    console: list[logging.Handler] = []

    def set_level(level: int) -> None:
        root.setLevel(level)
        if not console:  # (made in the test: on the stderr that capsys reads)
            console.append(logging.StreamHandler())
            root.addHandler(console[0])

    yield set_level
    root.setLevel(saved)
    for handler in console:
        root.removeHandler(handler)


TASK = """
import logging
import sys
import sys
def chatty(x):
    logging.getLogger("calc").info("working on %s", x)
    return x + 1
"""


def test_info_records_below_the_notebooks_level_are_not_shown(ip, local_pool, root_level, capsys):
    root_level(logging.WARNING)
    run(ip, TASK)
    assert run(ip, "%pmap -q chatty, range(4)") == [1, 2, 3, 4]
    assert "working on" not in capsys.readouterr().err


def test_info_records_at_the_notebooks_level_show_once_labelled_by_item(ip, local_pool, root_level, capsys):
    root_level(logging.INFO)
    run(ip, TASK)
    assert run(ip, "%pmap -q --chunksize 2 chatty, range(4)") == [1, 2, 3, 4]
    err = capsys.readouterr().err
    for x in range(4):
        assert err.count(f"[item {x}] INFO:calc:working on {x}\n") == 1, err


def test_the_records_of_one_call_are_not_labelled_as_a_maps_item(ip, local_pool, root_level):
    """mpmagic.call runs one call, not a map of one item: its records say no "[item 0]"."""
    root_level(logging.INFO)
    run(ip, TASK)
    handle = mpmagic.call(ip.user_ns["chatty"], 7)
    assert handle.result(30) == 8
    assert handle.output == "INFO:calc:working on 7\n"


def test_a_named_loggers_own_level_is_followed(ip, local_pool, root_level, capsys):
    root_level(logging.WARNING)
    logging.getLogger("calc").setLevel(logging.INFO)
    try:
        run(ip, TASK)
        run(ip, "%pmap -q chatty, [7]")
    finally:
        logging.getLogger("calc").setLevel(logging.NOTSET)
    assert "[item 0] INFO:calc:working on 7\n" in capsys.readouterr().err


class _Kept(logging.Handler):
    """A handler that keeps what it gets (as a FileHandler writes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.parametrize("propagate", [False, True])
def test_a_named_loggers_own_handlers_get_the_tasks_records_and_propagate_false_keeps_them_out_of_the_cell(
        ip, local_pool, root_level, capsys, propagate):
    """As serially: a FileHandler on logger "calc" got none of the tasks' records
    (they showed in the cell, propagate=False or not)."""
    root_level(logging.WARNING)
    calc, kept = logging.getLogger("calc"), _Kept()
    calc.setLevel(logging.INFO)
    calc.propagate = propagate
    calc.addHandler(kept)
    try:
        run(ip, TASK)
        assert run(ip, "%pmap -q chatty, [7, 8]") == [8, 9]
    finally:
        calc.removeHandler(kept)
        calc.setLevel(logging.NOTSET)
        calc.propagate = True
    assert sorted(kept.lines) == ["INFO calc working on 7", "INFO calc working on 8"]
    err = capsys.readouterr().err
    assert ("[item 0] INFO:calc:working on 7\n" in err) is propagate, err  # up to the root: in the cell as before


LOGS = """
import logging
import sys
def logs(x):
    for name in ("calc", "dbg"):
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
            logging.getLogger(name).log(level, "%s %s %d", name, logging.getLevelName(level), x)
    return x
"""
MESSAGES = [f"{name} {level} 0" for name in ("calc", "dbg") for level in ("DEBUG", "INFO", "WARNING", "ERROR")]


@pytest.mark.parametrize(("setup", "printed"), [
    ("logging.basicConfig(level=logging.INFO)\nlogging.disable(logging.CRITICAL)", []),
    ("logging.basicConfig(level=logging.DEBUG)\nlogging.getLogger().handlers[0].setLevel(logging.ERROR)",
     ["calc ERROR 0", "dbg ERROR 0"]),
    ("logging.getLogger('dbg').setLevel(logging.DEBUG)",  # no handler anywhere: logging.lastResort, at WARNING
     ["calc WARNING 0", "calc ERROR 0", "dbg WARNING 0", "dbg ERROR 0"]),
], ids=["disabled", "console-at-ERROR", "lastResort"])
def test_a_tasks_records_show_exactly_when_serial_logging_prints_them(ip, local_pool, capsys, setup, printed):
    """Serial logging is the oracle: the same calls made here print these
    messages; the task's records show those and no others (logging.disable(),
    a console handler's own level and lastResort's were ignored: all shown)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers.clear()  # (pytest's own handlers: a notebook's root has none)
    try:
        run(ip, LOGS + setup)
        capsys.readouterr()
        run(ip, "logs(0)")
        printed_serially = capsys.readouterr().err
        serial = [m for m in MESSAGES if m in printed_serially]
        assert serial == printed, printed_serially  # (the oracle tells the cases apart)
        assert run(ip, "%pmap -q logs, [0]") == [0]
        err = capsys.readouterr().err
        assert [m for m in MESSAGES if f"[item 0] {m.split()[1]}:{m.split()[0]}:{m}\n" in err] == serial, err
        assert err.count("[item 0]") == len(serial), err
    finally:
        logging.disable(logging.NOTSET)
        logging.getLogger("dbg").setLevel(logging.NOTSET)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_records_of_a_parallel_rank_are_labelled_by_rank_in_order(ip, local_pool, root_level, capsys):
    root_level(logging.INFO)
    ip.run_cell(
        "%%parallel -n 2 -q\nimport logging\nprint('before')\nlogging.info('rank %d here', rank)\nprint('after')\n",
        store_history=False,
    )
    captured = capsys.readouterr()
    for r in range(2):
        assert f"[rank {r}] INFO:root:rank {r} here\n" in captured.err


def test_records_from_a_thread_the_task_started_are_shown(ip, local_pool, root_level, capsys):
    root_level(logging.WARNING)
    run(ip, "import logging, threading\ndef threaded(x):\n    t = threading.Thread(target=logging.warning, args=('from a thread %s', x))\n    t.start(); t.join()\n    return x\n")
    assert run(ip, "%pmap -q threaded, [4]") == [4]
    assert "WARNING:root:from a thread 4\n" in capsys.readouterr().err


THREADED = """
import logging, sys, threading, warnings
def threaded(x):
    def inner():
        logging.getLogger("calc").warning("thread %s", x)
        warnings.warn(f"thread warn {x}")
    t = threading.Thread(target=inner)
    t.start(); t.join()
    try:
        raise ValueError(x)
    except ValueError:
        logging.getLogger("calc").exception("boom %s", x)
    return x
"""


def test_a_tasks_threads_are_labelled_and_sources_shown_as_serially(ip, local_pool, root_level, capsys):
    # Serial Python is the oracle: the same lines, each behind the item's label,
    # with the source lines of the warning and of the traceback's cell frame.
    root_level(logging.WARNING)
    run(ip, THREADED)
    run(ip, "warnings.resetwarnings(); warnings.simplefilter('default')")
    try:
        run(ip, "_h = logging.StreamHandler(sys.stderr); _h.setFormatter(logging.Formatter(logging.BASIC_FORMAT))\n"
                "logging.getLogger('calc').addHandler(_h); logging.getLogger('calc').propagate = False\n"
                "try:\n    with warnings.catch_warnings():  # (shown as Python shows them: pytest's hook records them)\n"
                "        warnings.showwarning = lambda m, c, f, n, *_: sys.stderr.write(warnings.formatwarning(m, c, f, n))\n"
                "        threaded(3)\nfinally:\n"
                "    logging.getLogger('calc').removeHandler(_h); logging.getLogger('calc').propagate = True")
        serial = capsys.readouterr().err.splitlines()
        assert len(serial) == 8 and "    raise ValueError(x)" in serial, serial
        assert run(ip, "%pmap -q threaded, [3]") == [3]
    finally:
        run(ip, "warnings.resetwarnings(); warnings.simplefilter('default')")
    assert capsys.readouterr().err.splitlines() == [f"[item 0] {line}" for line in serial]


POOLED = """
import concurrent.futures as cf, warnings
def _warn(x):
    warnings.warn("same text")
    warnings.warn("ignored here", RuntimeWarning)
    return x
def pooled(x):
    with cf.ThreadPoolExecutor(1) as ex:
        return list(ex.map(_warn, [x]))
"""


def test_warnings_from_a_tasks_threads_follow_the_notebooks_filters(ip, local_pool, capsys):
    run(ip, POOLED)
    run(ip, "warnings.resetwarnings(); warnings.simplefilter('default')\n"
            "warnings.filterwarnings('ignore', category=RuntimeWarning)")
    try:
        serial = run(ip, "with warnings.catch_warnings(record=True) as seen:\n"
                         "    _ = list(map(pooled, range(6)))\n[str(w.message) for w in seen]")
        run(ip, "%pmap -q pooled, range(6)")
    finally:
        run(ip, "warnings.resetwarnings(); warnings.simplefilter('default')")
    shown = [line.split("Warning: ")[1] for line in capsys.readouterr().err.splitlines() if "Warning: " in line]
    assert shown == serial == ["same text"]  # once per location; the ignored one not at all


WARNS = """
import warnings
def noisy(x):
    warnings.warn("careful")
    if x % 100 == 0:
        warnings.warn(f"hundred {x}", RuntimeWarning)
    return x
"""


def test_warnings_from_1000_items_show_once_per_location(ip, local_pool, capsys):
    run(ip, WARNS)
    assert run(ip, "%pmap -q noisy, range(1000)") == list(range(1000))
    err = capsys.readouterr().err
    assert err.count("UserWarning: careful") == 1, err
    # different texts from one line are different warnings, as in Python
    assert sorted(line.split("RuntimeWarning: ")[1] for line in err.splitlines() if ": RuntimeWarning: " in line) == sorted(
        f"hundred {x}" for x in range(0, 1000, 100)
    )
    # The oracle: the same map serially here, under the default filters.
    serial = run(ip, "with warnings.catch_warnings(record=True) as seen:\n"
                     "    warnings.simplefilter('default')\n    _ = list(map(noisy, range(1000)))\nlen(seen)")
    assert sum("Warning: " in line for line in err.splitlines()) == serial == 11
    line = next(line for line in err.splitlines() if "careful" in line)
    assert line.startswith("[item ") and ": UserWarning: careful" in line


def test_warnings_follow_the_notebooks_filters(ip, local_pool, capsys):
    run(ip, WARNS)
    run(ip, "import warnings; warnings.filterwarnings('ignore', 'careful')")
    try:
        run(ip, "%pmap -q noisy, range(3)")
    finally:
        run(ip, "warnings.resetwarnings(); warnings.simplefilter('default')")
    err = capsys.readouterr().err
    assert "careful" not in err and "hundred 0" in err


def test_a_record_made_before_the_worker_dies_is_shown(ip, local_pool, root_level, capsys):
    root_level(logging.INFO)
    run(ip, "import logging, os\ndef doomed(x):\n    logging.warning('last words %s', x)\n    os._exit(9)\n")
    result = ip.run_cell("%pmap -q doomed, [5]", store_history=False)
    assert result.error_in_exec is not None
    assert "[item 0] WARNING:root:last words 5" in capsys.readouterr().err


def test_records_and_warnings_from_dask_tasks_show_labelled(ip, root_level, capsys, dask_cluster, request):
    from conftest import ensure_pool

    ensure_pool("dask", request)
    root_level(logging.INFO)
    run(ip, TASK)
    run(ip, WARNS)
    assert run(ip, "%pmap -q --chunksize 2 chatty, range(4)") == [1, 2, 3, 4]
    assert run(ip, "%pmap -q noisy, range(50)") == list(range(50))
    err = capsys.readouterr().err
    for x in range(4):
        assert err.count(f"[item {x}] INFO:calc:working on {x}\n") == 1, err
    assert err.count("UserWarning: careful") == 1, err
    # And a %pdebug-able failure carries the Dask worker's locals.
    run(ip, "def bad(x):\n    half = x / 2\n    raise ValueError(x)\n")
    ip.run_cell("%pmap -q bad, [8]", store_history=False)
    [info] = __import__("mpmagic").last_failures()
    assert info.locals == {"x": "8", "half": "4.0"} and info.pid is not None
    assert str(info.worker).startswith("tcp://127.0.0.1")


def test_a_warning_keeps_its_place_among_the_lines_the_task_wrote(ip, local_pool, capsys):
    # (a task's first line goes home at once, the next ones together: one message)
    run(ip, "import sys, warnings\ndef between(x):\n    sys.stderr.write('first\\n')\n    sys.stderr.write('before\\n')\n"
            "    warnings.warn('in the middle')\n    sys.stderr.write('after\\n')\n    return x\n")
    assert run(ip, "%pmap -q between, [1]") == [1]
    lines = capsys.readouterr().err.splitlines()
    where = [i for i, line in enumerate(lines) if "UserWarning: in the middle" in line]
    assert len(where) == 1 and lines.index("before") < where[0] < lines.index("after"), lines


def test_an_error_filter_of_the_notebook_makes_the_warning_the_items_error(ip, local_pool, capsys):
    """As serial Python: the notebook's filters reach local workers (context.py),
    and capturing the unit's warnings must not turn "error" into a shown line."""
    run(ip, WARNS)
    run(ip, "warnings.filterwarnings('error', 'careful')")
    try:
        result = ip.run_cell("%pmap -q noisy, range(3)", store_history=False)
    finally:
        run(ip, "warnings.resetwarnings(); warnings.simplefilter('default')")
    err = result.error_in_exec
    assert type(err) is UserWarning and str(err) == "careful"
    assert "careful" not in capsys.readouterr().err


def test_a_filter_with_a_plain_string_module_is_matched_as_python_does(ip, local_pool, capsys):
    """Libraries insert filters by hand with a plain string for the module
    (CPython then compares it exactly); a task's warning must still show (and
    the run end) as the same warning raised here would."""
    import warnings

    run(ip, "import warnings\ndef warns(x):\n    warnings.warn('careful', UserWarning)\n    return x\n")
    saved = warnings.filters[:]
    warnings.filters.insert(0, ("ignore", None, Warning, "some.module", 0))  # every category: the module is compared
    try:
        capsys.readouterr()
        assert run(ip, "%pmap -q warns, range(4)") == [0, 1, 2, 3]
    finally:
        warnings.filters[:] = saved
    err = capsys.readouterr().err
    assert err.count("UserWarning: careful") == 1, err


def test_module_filters_match_the_warning_modules_name_as_python_does(ip, backend, capsys):
    """A filter's module is matched against the module's ``__name__``
    (``numpy._core.fromnumeric``, ``__main__``), not its file's name: the
    notebook's ``ignore`` for numpy did not silence numpy's warnings from
    tasks, and IPython's ``default::DeprecationWarning:__main__`` did not show
    a notebook function's DeprecationWarning (it was dropped)."""
    import warnings

    run(ip, "import warnings, numpy as np\n"
            "def empty_mean(x):\n    return float(np.mean(np.array([])))\n"
            "def old(x):\n    warnings.warn(f'old api {x}', DeprecationWarning)\n    return x\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")  # (IPython's)
        warnings.filterwarnings("ignore", module="numpy")
        capsys.readouterr()
        assert len(run(ip, "%pmap -q empty_mean, [1, 2]")) == 2
        assert run(ip, "%pmap -q old, [3]") == [3]
    err = capsys.readouterr().err
    assert "Mean of empty slice" not in err, err
    assert "DeprecationWarning: old api 3" in err, err


def test_a_recording_catch_warnings_gets_the_tasks_warnings(ip, backend):
    """``catch_warnings(record=True)`` (and ``pytest.warns``) record a task's
    warning as they record serial code's; it was printed instead."""
    import warnings

    run(ip, "import warnings\ndef check(x):\n    if x < 0:\n        warnings.warn(f'negative input {x}')\n"
            "    return abs(x)\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(ip, "%pmap -q check, [1, -2]") == [1, 2]
    assert [(w.category, str(w.message)) for w in caught] == [(UserWarning, "negative input -2")]
    with pytest.warns(UserWarning, match="negative input -5"):
        run(ip, "%pmap -q check, [-5]")


def test_an_always_filter_gets_every_repeat_of_a_tasks_warning(ip, backend):
    """A warning repeated at one place went home once per unit: under an
    "always" filter (and a recording catch_warnings) 20 items warning alike
    were recorded 4-6 times and shown twice, where serial code gives 20."""
    import warnings

    run(ip, "import warnings\ndef same(x):\n    warnings.warn('the same warning')\n    return x\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(ip, "%pmap -q --chunksize 5 same, range(20)") == list(range(20))
    assert len(caught) == 20


@pytest.mark.parametrize("worker_has_the_notebooks_filters", [True, False], ids=["local", "other-cluster"])
def test_an_always_filter_for_one_category_sends_no_repeat_of_another(worker_has_the_notebooks_filters, capsys,
                                                                       monkeypatch):
    """numpy puts an "always" filter for its RankWarning in every notebook that
    imports it; workers then sent home every repeat of every warning (a pandas
    deprecation warning raised by each of 300,000 items made ``.mp.map`` 4x
    slower than serial). Only the category the "always" filter names repeats,
    whether the worker has the notebook's filters (local) or not (a Dask
    cluster mpmagic did not start)."""
    import warnings

    from mpmagic import worker_logging

    class Noted(UserWarning):
        pass

    monkeypatch.setattr(worker_logging, "_installed", False)  # (the hook goes in below, in catch_warnings)

    def emit() -> None:
        for _ in range(1000):
            warnings.warn("again", UserWarning, stacklevel=1)
        for _ in range(3):
            warnings.warn("each time", Noted, stacklevel=1)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.simplefilter("always", Noted)
        context = worker_logging.notebook_context()
        if not worker_has_the_notebooks_filters:
            warnings.resetwarnings()
            warnings.simplefilter("ignore", DeprecationWarning)
        worker_logging.begin((0, context))
        try:
            emit()
        finally:
            worker_logging.end()
        # (split at newlines: splitlines() also splits at the marker's own \x1e)
        sent = [line for line in capsys.readouterr().err.split("\n") if line.startswith(worker_logging.MARK)]
    assert sum('"again"' in line for line in sent) == 1, sent
    assert sum('"each time"' in line for line in sent) == 3, sent


def test_a_units_filters_are_worked_out_again_only_when_the_filters_change(capsys, monkeypatch):
    """A unit's warning filters are worked out once and reused while this process's
    filters, the notebook's and the setup's stay the same (it cost each unit 4 us),
    and again when they change. A reused set still starts each unit's "already
    warned" registry afresh: a warning repeated at one place is sent once per unit."""
    import warnings

    from mpmagic import worker_logging

    worked = []
    real = worker_logging._unit_filters
    monkeypatch.setattr(worker_logging, "_unit_filters", lambda f, a: worked.append(1) or real(f, a))
    monkeypatch.setattr(worker_logging, "_unit_cache", None)
    monkeypatch.setattr(worker_logging, "_installed", False)  # (the hook goes in below, in catch_warnings)

    def unit() -> list:
        worker_logging.begin((0, context))
        try:
            for _ in range(3):
                warnings.warn("again", UserWarning, stacklevel=1)
            return list(warnings.filters)
        finally:
            worker_logging.end()

    with warnings.catch_warnings():
        warnings.resetwarnings()  # (pytest's own filters say "always": such a set is never reused)
        warnings.simplefilter("ignore", DeprecationWarning)
        context = worker_logging.notebook_context()
        first = [unit() for _ in range(3)]
        assert len(worked) == 1 and first[0] == first[1] == first[2]
        warnings.simplefilter("error", RuntimeWarning)  # the worker's own filters change
        second = unit()
        assert len(worked) == 2 and second[0][:3] == ("error", None, RuntimeWarning)
        sent = [line for line in capsys.readouterr().err.split("\n") if line.startswith(worker_logging.MARK)]
    assert sum('"again"' in line for line in sent) == 4, sent


@pytest.mark.parametrize("method", ["forkserver"], scope="session")  # (the start method changes nothing here: one suffices)
def test_a_tasks_record_goes_to_its_handlers_own_stream(ip, local_pool, capsys):
    """A handler on stdout printed the task's record to stderr; one made before a
    capture_output() had its task records captured (serially they are not)."""
    out = logging.getLogger("toout")
    out.setLevel(logging.INFO)
    out.propagate = False
    out.addHandler(logging.StreamHandler(sys.stdout))
    try:
        run(ip, "import logging\ndef b(x):\n    logging.getLogger('toout').info('record %s', x)\n    return x")
        capsys.readouterr()
        assert run(ip, "%pmap -q b, [1]") == [1]
        captured = capsys.readouterr()
        assert "[item 0] INFO:toout:record 1\n" in captured.out and "record 1" not in captured.err
        run(ip, "from IPython.utils.capture import capture_output\n"
                "with capture_output() as cap:\n    r = %pmap -q b, [2]")
        assert "record 2\n" in capsys.readouterr().out  # (through the handler itself: not a console stream now)
        assert "record 2" not in ip.user_ns["cap"].stderr + ip.user_ns["cap"].stdout
    finally:
        out.handlers.clear()
        out.setLevel(logging.NOTSET)
        out.propagate = True


LOWERING = """
import logging
def lower(x):
    logging.getLogger("calc").info("before %s", x)
    logging.getLogger("calc").setLevel(logging.DEBUG)
    logging.getLogger("calc").info("after %s", x)
    return x
def calc_level(x):
    return logging.getLogger("calc").level
"""


def test_a_tasks_setlevel_acts_for_its_unit_and_the_next_call_has_the_notebooks_levels_again(
        ip, local_pool, root_level, capsys):
    """A task's setLevel(DEBUG) on a logger the notebook set stayed in its worker:
    later calls showed INFO records serial code never makes (the levels were put
    back only when the notebook's changed). For the rest of its unit the task's
    records follow its own level, as serially they follow the level it set."""
    root_level(logging.WARNING)
    calc = logging.getLogger("calc")
    calc.setLevel(logging.WARNING)
    try:
        run(ip, LOWERING)
        assert run(ip, "%pmap -q --chunksize 2 lower, range(2)") == [0, 1]
        err = capsys.readouterr().err
        assert "[item 0] INFO:calc:after 0\n" in err and "[item 1] INFO:calc:before 1\n" in err, err
        assert "before 0" not in err
        run(ip, "%pmap -q --chunksize 1 lower, range(8)")  # (both workers)
        capsys.readouterr()
        assert run(ip, "%pmap -q --chunksize 1 calc_level, range(8)") == [logging.WARNING] * 8
    finally:
        calc.setLevel(logging.NOTSET)


def test_a_record_below_the_notebooks_level_is_dropped_at_home_unless_the_task_lowered_it(root_level, capsys):
    """deliver() handed any record that came home to the notebook's handlers,
    whatever the notebook logger's level (the worker's decided alone)."""
    from mpmagic.worker_logging import deliver

    root_level(logging.WARNING)
    kept = _Kept()
    logging.getLogger().addHandler(kept)
    try:
        record = logging.makeLogRecord({"name": "calc", "levelno": logging.INFO, "levelname": "INFO", "msg": "m"})
        assert deliver(record) is False and kept.lines == []
        assert deliver(record, lowered=True) is True and kept.lines == ["INFO calc m"]
    finally:
        logging.getLogger().removeHandler(kept)


def test_a_forked_workers_copy_of_a_notebook_file_handler_writes_nothing(ip, tmp_path):
    """With fork, the worker's inherited copy of the notebook's FileHandler wrote
    each task record, and then the notebook's own handler wrote it again."""
    from conftest import ensure_pool

    from mpmagic import pool as pool_module

    path = tmp_path / "nb.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(name)s:%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        pool_module.shutdown()  # (workers forked now copy the handler)
        ensure_pool("fork")
        run(ip, "import logging\ndef warns(x):\n    logging.getLogger('calc').warning('w%s', x)\n    return x")
        assert run(ip, "%pmap -q --chunksize 1 warns, range(4)") == [0, 1, 2, 3]
    finally:
        root.removeHandler(handler)
        handler.close()
        pool_module.shutdown()
    assert sorted(path.read_text().split()) == ["calc:w0", "calc:w1", "calc:w2", "calc:w3"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_workers_dropped_copies_of_the_notebooks_handlers_are_not_finalized_there(tmp_path):
    """A fork worker takes its copies of the notebook's handlers off its loggers as
    it starts (``drop_inherited_handlers``). Left to the garbage collector, their
    streams were finalized in the worker: with warnings shown (``-X dev``,
    ``warnings.simplefilter("default")``) each fork worker printed ``.../mpmagic/
    worker_logging.py:548: ResourceWarning: unclosed file <_io.TextIOWrapper name=45
    ...>`` in the notebook (Python 3.13's Jupyter kernel: ipykernel's own handler),
    and text the notebook had not flushed yet was written to the file a second
    time (the worker flushed its copy as it closed it)."""
    from mpmagic.worker_logging import drop_inherited_handlers

    path = tmp_path / "nb.log"
    logger = logging.getLogger("mpmagic-test-inherited")
    handler = logging.StreamHandler(open(path, "w"))  # (the handler holds the only reference)
    logger.addHandler(handler)
    handler.stream.write("header\n")  # (not flushed yet)
    read, write = os.pipe()
    try:
        with warnings.catch_warnings():  # (pytest's threads: Python 3.12+ warns about any fork)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the worker: what it saw goes home through the pipe
            try:
                del handler
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    drop_inherited_handlers()
                    gc.collect()
                said = [f"{w.category.__name__}: {w.message}" for w in seen]
                said += [f"handlers left: {logger.handlers}"] if logger.handlers else []
                os.write(write, "\n".join(said).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            said = pipe.read().decode()
        os.waitpid(pid, 0)
    finally:
        logger.removeHandler(handler)
        handler.close()
        handler.stream.close()  # (a StreamHandler leaves its stream open: the notebook closes it)
    assert (said, path.read_text()) == ("", "header\n")


MUTING = """
import logging, os, time
def mute(x):
    log = logging.getLogger("mutable")
    log.setLevel(logging.ERROR)
    logging.getLogger("mutable.child").disabled = True
    logging.getLogger("quiet").addHandler(logging.NullHandler())
    logging.getLogger("quiet").propagate = False
    logging.disable(logging.CRITICAL)
    time.sleep(0.05)
    return os.getpid()
def loud(x):
    logging.getLogger("mutable").warning("mutable %s", x)
    logging.getLogger("mutable.child").warning("child %s", x)
    logging.getLogger("quiet").warning("quiet %s", x)
    return x
"""


@pytest.mark.parametrize("method", ["forkserver"], scope="session")
def test_what_a_task_changes_of_logging_lasts_for_its_unit_even_on_loggers_the_notebook_left_notset(
        ip, local_pool, root_level, capsys):
    """A task's setLevel on a logger the notebook left at NOTSET (the usual
    basicConfig setup), a disabled logger, a NullHandler with propagate=False
    and logging.disable() stayed in its worker: a later call showed 0 of 4
    warnings, or some, by which worker ran each item."""
    root_level(logging.WARNING)
    run(ip, MUTING)
    assert len(set(run(ip, "%pmap -q --chunksize 1 mute, range(6)"))) == 2  # (both workers muted)
    capsys.readouterr()
    assert run(ip, "%pmap -q --chunksize 1 loud, range(4)") == [0, 1, 2, 3]
    err = capsys.readouterr().err
    for x in range(4):
        for name in ("mutable", "child", "quiet"):
            assert f"{name} {x}\n" in err, err


def _hooks_state() -> tuple:
    """What our hooks change in a worker: Logger's and Manager's attributes, the root's handlers, showwarning."""
    import warnings

    return (dict(logging.Logger.__dict__), logging.Manager.__dict__["disable"], list(logging.getLogger().handlers),
            warnings.showwarning)


def test_on_dask_our_logging_hooks_are_in_only_while_units_run(monkeypatch):
    """A Dask worker may be the user's own process, serving others after mpmagic's
    calls (a cluster mpmagic connected to): the patched Logger methods, the
    Manager.disable property, our root handler and warnings hook stayed there for
    good (a later logging.basicConfig() there did nothing). As dask_tasks sets it up:
    in while a unit runs, what its task changed still undone, out when it ends;
    someone else's patch made meanwhile stays theirs."""
    from mpmagic import worker_logging as wl

    was_in = wl._hooks_in
    with wl._lock:
        wl._hook_out()  # (an earlier test's local-worker hooks, in for good)
    before = _hooks_state()
    monkeypatch.setattr(wl, "HOOKS_PER_UNIT", True)
    monkeypatch.setattr(wl, "_installed", False)
    theirs = logging.Logger.removeHandler
    try:
        wl.begin((0, wl.notebook_context()))
        try:
            assert logging.Logger.__setattr__ is wl._watched_setattr
            assert wl._handler in logging.getLogger().handlers
            logging.getLogger("hooks.per.unit").setLevel(logging.ERROR)  # the task's change
            logging.Logger.removeHandler = lambda self, h: theirs(self, h)  # someone else's patch
        finally:
            wl.end()
        assert logging.getLogger("hooks.per.unit").level == logging.NOTSET
        mine = logging.Logger.__dict__["removeHandler"]
        assert mine is not theirs
        logging.Logger.removeHandler = theirs
        assert _hooks_state() == before
    finally:
        logging.Logger.removeHandler = theirs
        if was_in:
            with wl._lock:
                wl._hook_in()


def test_a_record_made_outside_a_unit_is_not_printed_twice_when_the_root_has_a_handler(monkeypatch, capsys):
    """Our handler stays on a local worker's root logger: outside a unit it handed
    every WARNING to logging.lastResort, which Python calls only when no handler
    sees a record, so a root handler of the worker's own printed it a second time."""
    from mpmagic import worker_logging as wl

    monkeypatch.setattr(wl, "_installed", False)
    wl.begin((0, wl.notebook_context()))
    wl.end()
    ours = [h for h in logging.getLogger().handlers if isinstance(h, wl._TaskHandler)][:1]
    monkeypatch.setattr(logging.getLogger(), "handlers", ours)  # (pytest's capture handler off)
    got: list[str] = []
    own = logging.Handler()
    own.emit = lambda record: got.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("outside.unit")
    logger.warning("no handler but ours")  # (lastResort prints it, as without ours)
    logging.getLogger().addHandler(own)
    try:
        logger.warning("the root's own handler")
    finally:
        logging.getLogger().removeHandler(own)
    err = capsys.readouterr().err
    assert "no handler but ours" in err and "the root's own handler" not in err, err
    assert got == ["the root's own handler"]


# A library that gets its logger ready at import, as transformers and datasets do.
CHATTY_LIBRARY = """
import logging
_logger = logging.getLogger(__name__)
_h = logging.StreamHandler()
_h.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
_logger.addHandler(_h)
_logger.setLevel(logging.INFO)
_logger.propagate = False
def work(x):
    _logger.info("loading shard %s", x)
    return x * 2
"""


@pytest.mark.parametrize("method", ["fork", "spawn"], scope="session")
def test_a_library_imported_in_a_task_keeps_the_logging_its_import_set_up(ip, local_pool, tmp_path, capsys):
    """The end of a chunk undid the handler, level and propagate=False that the
    library's import gave its logger, as if they were the task's own changes;
    the module stayed imported and never set them again: two calls of one item a
    chunk showed 1 of their 8 INFO lines. Serial map (the oracle) shows them all."""
    import uuid

    name = f"mpm_chatty_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(CHATTY_LIBRARY)
    sys.path.insert(0, str(tmp_path))
    try:
        run(ip, f"def lazy(x):\n    import {name}\n    return {name}.work(x)")
        capsys.readouterr()
        for _ in range(2):
            assert run(ip, "%pmap -q --chunksize 1 lazy, range(4)") == [0, 2, 4, 6]
        parallel = capsys.readouterr().err.splitlines()
        assert run(ip, "list(map(lazy, range(4)))") == [0, 2, 4, 6]  # (after: the notebook imports it only now)
        serial = capsys.readouterr().err.splitlines()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
        logging.getLogger(name).handlers.clear()
    assert serial == [f"{name} INFO: loading shard {x}" for x in range(4)]
    assert sorted(parallel) == sorted(serial * 2)


def test_a_tasks_own_change_is_still_undone_when_an_import_changes_the_same_logger(monkeypatch):
    """What an import sets stays; what the task set before it on the same logger does not."""
    import types

    from mpmagic import worker_logging as wl

    monkeypatch.setattr(wl, "_installed", False)
    lib = logging.getLogger("mpm.imported.lib")
    module = types.ModuleType("mpm_imports_a_handler")
    handler = logging.NullHandler()
    wl.begin((0, wl.notebook_context()))
    try:
        lib.disabled = True  # the task's own change
        sys.modules.pop(module.__name__, None)
        code = "import logging\nlogging.getLogger('mpm.imported.lib').addHandler(H)\n" \
               "logging.getLogger('mpm.imported.lib').setLevel(logging.INFO)\n"
        loader = _SourceLoader(code, {"H": handler})
        spec = __import__("importlib.util").util.spec_from_loader(module.__name__, loader)
        sys.meta_path.insert(0, _Finder(spec))
        try:
            __import__(module.__name__)
        finally:
            sys.meta_path.pop(0)
            sys.modules.pop(module.__name__, None)
    finally:
        wl.end()
    try:
        assert (lib.disabled, lib.level, lib.handlers) == (False, logging.INFO, [handler])
    finally:
        lib.handlers.clear()
        lib.setLevel(logging.NOTSET)


class _SourceLoader:
    """Runs ``code`` as a module's body, with ``names`` in its namespace."""

    def __init__(self, code: str, names: dict) -> None:
        self.code, self.names = code, names

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__dict__.update(self.names)
        exec(self.code, module.__dict__)


class _Finder:
    def __init__(self, spec) -> None:
        self.spec = spec

    def find_spec(self, name, path=None, target=None):
        return self.spec if name == self.spec.name else None


@pytest.mark.parametrize("method", ["forkserver"], scope="session")
def test_a_tasks_logging_exception_reaches_a_notebook_file_handler_with_its_source_lines(ip, local_pool, tmp_path):
    """The notebook's FileHandler got the task's traceback without the cell
    frame's source line (``    1/0`` and its ``~^~``), which serial logging writes."""
    path = tmp_path / "exc.log"
    handler = logging.FileHandler(path)
    logging.getLogger("mpm.exc").addHandler(handler)
    try:
        run(ip, "import logging\ndef failing(x):\n    try:\n        1/0\n    except ZeroDivisionError:\n"
                "        logging.getLogger('mpm.exc').exception('boom %s', x)\n    return x")
        run(ip, "list(map(failing, ['x']))")
        handler.flush()
        serial = path.read_text()
        path.write_text("")
        assert run(ip, "%pmap -q failing, ['x']") == ["x"]
        handler.flush()
        parallel = path.read_text()
    finally:
        logging.getLogger("mpm.exc").removeHandler(handler)
        handler.close()
    assert "    1/0\n" in serial
    assert parallel == serial
