"""Warm workers that mirror the notebook, and reports that tell one-time costs
from the work (issue 22 items 1 and 2).

The end-to-end cases run a notebook in a fresh process (tests/warm_session.py),
so that what the notebook imported is under the test's control: the pytest
process itself has numpy loaded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import pytest
from conftest import synthetic_report

from mpmagic import warmup
from mpmagic.fmt import fmt_seconds
from mpmagic.protocol import Import
from mpmagic.report import Report

HERE = Path(__file__).parent


def session(method: str, mode: str = "main", warm: bool = True) -> dict:
    """Run warm_session.py in a fresh interpreter; what it saw, as a dict."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               MPMAGIC_WARM="1" if warm else "0")  # conftest turns it off for the shared shell
    proc = subprocess.run(
        [sys.executable, str(HERE / "warm_session.py"), method, mode],
        capture_output=True, text=True, timeout=180, env=env, cwd=str(HERE),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"session failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def seen(method):
    return session(method)


def test_a_notebook_that_imported_nothing_heavy_keeps_workers_without_numpy(seen):
    assert seen["notebook_had_numpy"] is False
    assert seen["idle_numpy"] == [False] * 4


def test_the_report_of_a_first_call_names_the_import_and_its_time(seen):
    assert seen["first"] == [0, 0, 1, 3]
    once = seen["first_one_time"]
    assert once["imports"].get("numpy") and once["imports"]["numpy"] > 0
    assert "one-time: imported numpy (" in seen["first_line"]
    assert seen["first_advice"].startswith("the workers imported numpy (")
    assert "the next call will not pay it" in seen["first_advice"]


def test_the_next_call_pays_no_import(seen):
    assert seen["second_one_time"]["imports"] == {}
    assert "one-time" not in seen["second_line"]


def test_a_module_imported_in_a_cell_reaches_the_workers_before_the_next_items(seen):
    # The task only looks at sys.modules: the workers imported tqdm because
    # the notebook did, before the items ran.
    assert seen["tqdm_after_cell"] == [True] * 4
    assert seen["tqdm_after_restart"] == [True] * 4


def test_pool_status_names_the_preloaded_modules(seen):
    line = next(ln for ln in seen["status"].splitlines() if "preloaded" in ln)
    assert "numpy" in line and "tqdm" in line


def test_workers_of_a_pool_started_after_import_numpy_have_it_before_any_task(method):
    seen = session(method, "preimported")
    assert seen["notebook_had_numpy"] is False  # the session imported it itself
    assert seen["numpy"] == [True] * 4
    if method == "forkserver":
        assert seen["forkserver_has_numpy"] is True  # replacements are born with it


def test_without_warm_up_the_report_still_names_the_import_the_first_call_paid():
    # MPMAGIC_WARM=0: nothing is preloaded, and the first call's numpy import
    # (here while the worker unpickles the notebook's context: numpy's warnings
    # filters name its classes) is still told apart from the work.
    seen = session("forkserver", warm=False)
    assert seen["first"] == [0, 0, 1, 3]
    assert seen["first_one_time"]["imports"].get("numpy", 0) > 0
    assert "one-time: imported numpy (" in seen["first_line"]
    assert seen["second_one_time"]["imports"] == {}
    assert seen["tqdm_after_cell"] == [False] * 4  # not sent: only imported when a task needs it
    assert "preloaded" not in seen["status"]


# -- which modules: the notebook-side scan ---------------------------------
def test_the_scan_keeps_installed_third_party_modules_only():
    import json as stdlib_module

    import IPython
    import numpy as np

    local = types.ModuleType("mylib")
    local.__file__ = str(HERE / "mylib.py")
    sys.modules["mylib"] = local
    try:
        ns = {
            "np": np,
            "arr": np.zeros(2),
            "json": stdlib_module,
            "IPython": IPython,
            "mylib": local,
            "_private": np,
            "x": 3,
        }
        assert warmup.notebook_modules(ns) == ["numpy"]
        assert warmup.notebook_modules({"x": 1, "json": stdlib_module}) == []
    finally:
        del sys.modules["mylib"]


def test_the_after_cell_scan_runs_after_imports_and_never_costs_much_of_the_session(monkeypatch):
    """In a long session the after-cell scan of every notebook name cost each
    cell 5-65 ms. It runs when sys.modules grew, else at most once per 100x
    its own cost; a function's entry in its cache lives as long as the function."""
    import gc

    calls = []

    def slow_scan() -> list[str]:
        calls.append(1)
        time.sleep(0.02)  # a 20 ms scan: next one not before ~2 s unless something is imported
        return ["numpy"]

    monkeypatch.setattr(warmup, "notebook_modules", slow_scan)
    monkeypatch.setattr(warmup._AfterCell, "loaded", -1)
    assert warmup.notebook_modules_after_cell() == ["numpy"]
    assert warmup.notebook_modules_after_cell() is None and len(calls) == 1
    monkeypatch.setitem(sys.modules, "_mpmagic_test_new_module", types.ModuleType("_mpmagic_test_new_module"))
    assert warmup.notebook_modules_after_cell() == ["numpy"] and len(calls) == 2  # an import: scanned at once
    monkeypatch.setattr(warmup._AfterCell, "next_at", 0.0)
    assert warmup.notebook_modules_after_cell() == ["numpy"] and len(calls) == 3  # its time came

    namespace: dict = {"__name__": "__main__"}
    exec("def f(x):\n    return x", namespace)
    warmup._function_modules_cached(namespace["f"])
    assert namespace["f"] in warmup._scanned
    gone = id(namespace["f"])
    del namespace["f"]
    gc.collect()
    assert gone not in {id(f) for f in warmup._scanned.keys()}  # (a %pmap lambda, one per call, was kept until 10,000)


def test_a_function_scan_finds_modules_and_lazy_submodules_it_uses():
    import numpy as np

    ns = {"np": np}
    exec("def f(seed):\n    return np.random.default_rng(seed).random()\n", ns)
    names = warmup.function_modules(ns["f"])
    assert names[0] == "numpy"
    assert "numpy.random" in names  # numpy 2 loads it lazily: the worker would pay in the task
    exec("def g(x):\n    return x + 1\n", ns)
    assert warmup.function_modules(ns["g"]) == []
    exec("def h(x):\n    import numpy\n    return numpy.zeros(x)\n", ns)  # imported in the body
    assert warmup.function_modules(ns["h"]) == ["numpy"]


def test_the_warmth_sends_each_worker_each_module_once():
    # (mirror=False: numpy's loaded submodules are tests/test_warm_submodules.py's)
    w = warmup.Warmth()
    assert w.message(0) is None
    assert w.want(["numpy"], mirror=False) is True
    assert w.want(["numpy"], mirror=False) is False
    assert w.message(0) == Import(["numpy"])
    assert w.message(0) is None
    w.want(["pandas", "numpy", "pandas"], mirror=False)
    assert w.message(0) == Import(["pandas"])
    assert w.message(1) == Import(["numpy", "pandas"])
    w.forget(0)  # a worker replaced: a new one (or the same id again) gets them all
    assert w.message(0) == Import(["numpy", "pandas"])
    assert w.wanted == ["numpy", "pandas"]


# -- one-time costs: what the workers measured -----------------------------
def test_a_preload_finished_before_the_run_costs_it_nothing():
    costs = warmup.OneTimeCosts()
    t = costs.run_start
    costs.note({"worker": 0, "start": t + 0.01, "once": {
        "imports": [("preload", ["numpy"], 0.3, t - 1.0, t - 0.7)], "load": 0.0}})
    assert costs.summary(cold=False)["total"] == 0.0 and not costs.summary(cold=False)["preloading"]
    costs.note({"worker": 1, "start": t + 0.01, "once": {
        "imports": [("preload", ["pandas"], 0.5, t - 0.2, t + 0.3)], "load": 0.0}})
    s = costs.summary(cold=False)
    assert s["imports"] == {"pandas": pytest.approx(0.3)}  # the part the run waited for
    assert s["total"] == pytest.approx(0.3)
    assert s["preloading"]  # (the advice then does not tell to import it in an earlier cell: it was)


def test_a_functions_imports_are_not_counted_twice_and_workers_overlap():
    costs = warmup.OneTimeCosts()
    t = costs.run_start
    for w in (0, 1):
        costs.note({"worker": w, "start": t, "once": {
            "imports": [("function", ["numpy"], 0.29, t, t + 0.29)], "load": 0.30}})
    s = costs.summary(cold=False)
    assert s["import_seconds"] == pytest.approx(0.29)
    assert s["load"] == pytest.approx(0.01)
    assert s["total"] == pytest.approx(0.30)  # two workers in parallel: not 0.6


def test_each_module_is_named_once_in_the_one_time_imports():
    """One worker's function load imported numpy; the other's task imported
    pandas, which brought dateutil and numpy: "numpy (67 ms), dateutil, pandas",
    not "numpy (67 ms), dateutil, pandas, numpy"."""
    costs = warmup.OneTimeCosts()
    t = costs.run_start
    costs.note({"worker": 0, "start": t, "once": {
        "imports": [("function", ["numpy"], 0.067, t, t + 0.067)], "load": 0.07}})
    costs.note({"worker": 1, "start": t, "once": {
        "imports": [("task", ["dateutil", "pandas", "numpy"], None, t, t)], "load": 0.0}})
    costs.note({"worker": 1, "start": t, "once": {  # numpy again, alone: the same entry, the larger time
        "imports": [("function", ["numpy"], 0.08, t, t + 0.08)], "load": 0.08}})
    s = costs.summary(cold=False)
    assert s["imports"] == {"numpy": pytest.approx(0.08), "dateutil, pandas": None}
    assert s["task_imports"] == ("dateutil", "pandas", "numpy")  # (still each worker's task-time imports)


def test_a_run_that_paid_nothing_once_sums_up_without_walking_its_records(monkeypatch):
    """Every warm run's report asks for this summary: with nothing noted it is the
    zeros (and the cold start) at once, not a walk of empty records (three max()es)."""
    costs = warmup.OneTimeCosts()
    costs.note({"worker": 0, "start": costs.run_start + 0.25})  # (a chunk's reply without "once")
    monkeypatch.setattr(warmup, "max", lambda *a, **k: pytest.fail("walked"), raising=False)
    assert costs.summary(cold=False) == {"imports": {}, "import_seconds": 0.0, "load": 0.0, "start": 0.0,
                                         "total": 0.0, "preloading": False, "task_imports": (),
                                         "task_import_workers": 0, "temporary": None}
    cold = costs.summary(cold=True)
    assert cold["start"] == cold["total"] == pytest.approx(0.25)
    monkeypatch.undo()
    costs.note({"worker": 1, "start": costs.run_start + 0.3, "once": {"imports": [], "load": 0.05}})
    assert costs.summary(cold=True)["total"] == pytest.approx(0.25)  # (0.05 loading, 0.2 starting)

def test_a_cells_temporary_workers_imports_are_counted_apart_from_the_pools():
    """A %%parallel -n 4 on 2 warm workers: the 2 temporary workers (new each call)
    imported numpy. It is not a one-time cost of the pool: the next call pays it again."""
    costs = warmup.OneTimeCosts()
    t = costs.run_start
    for w in (0, 1):  # the pool's warm workers: nothing to pay
        costs.note({"worker": w, "start": t + 0.01})
    for w in (2, 3):
        costs.note({"worker": w, "start": t + 0.08, "temporary": True, "once": {
            "imports": [("preload", ["numpy"], 0.07, t, t + 0.07 + 0.001 * w)], "load": 0.0}})
    s = costs.summary(cold=False)
    assert (s["imports"], s["import_seconds"], s["total"]) == ({}, 0.0, 0.0)
    # (their first ranks began 80 ms into the run, 73 ms of it importing: 7 ms starting)
    assert s["temporary"] == {"workers": 2, "imports": {"numpy": pytest.approx(0.073)},
                              "import_seconds": pytest.approx(0.073), "load": 0.0, "start": pytest.approx(0.008, abs=1e-6),
                              "total": pytest.approx(0.081, abs=1e-6)}
    # A first call: the pool's workers paid it once, the temporary ones as every call's will.
    costs.note({"worker": 0, "start": t, "once": {"imports": [("function", ["numpy"], 0.29, t, t + 0.29)],
                                                  "load": 0.3}})
    s = costs.summary(cold=False)
    assert s["imports"] == {"numpy": pytest.approx(0.29)} and s["total"] == pytest.approx(0.3)
    assert s["temporary"]["imports"] == {"numpy": pytest.approx(0.073)}


def test_the_line_and_advice_say_a_cells_temporary_workers_pay_their_imports_on_every_call():
    """The tester's %%parallel -n 4 on 2 workers was told on every call: "one-time: imported
    numpy (73.8 ms)" and "the next call will not pay it (... idle workers were still importing
    them ...)". Every call starts new temporary workers, which import it again."""
    temp = {"workers": 2, "imports": {"numpy": 0.0738}, "import_seconds": 0.0738, "load": 0.0, "total": 0.0738,
            "pool": 2}
    once = {"imports": {}, "import_seconds": 0.0, "load": 0.0, "start": 0.0, "total": 0.0, "preloading": True,
            "temporary": temp}
    r = _report(kind="parallel", items=4, workers=4, wall=0.135, task_seconds=0.16, chunks=0, cores=None,
                one_time=once)
    assert r.line() == ("parallel: 4 ranks on 4 workers (forkserver) in 135.0 ms | serial ~160.0 ms (estimated: the "
                        "sum of the ranks' times) | speedup ~1.2x | every call: 2 temporary workers imported numpy "
                        "(73.8 ms)")
    assert ("every call", "2 temporary workers imported numpy (73.8 ms)") in r.rows()
    assert r.advice == ("the 2 temporary workers started for the ranks beyond the pool's 2 imported numpy (73.8 ms) "
                        "during this call, and every call starts new ones, which import it again: %pool resize 4 "
                        "keeps 4 workers that have it (or -n 2 runs the ranks on the pool's workers)")
    # Imported by the ranks' own code (untimed, inside their times): the same, said so.
    untimed = {**once, "temporary": {**temp, "imports": {"numpy": None, "scipy": None}, "import_seconds": 0.0,
                                     "total": 0.0}}
    r = _report(kind="parallel", items=4, workers=4, wall=0.135, task_seconds=0.16, chunks=0, cores=None,
                one_time=untimed, task_imports=("numpy", "scipy"), task_import_workers=2)
    assert "every call" not in r.line()  # (their time is in the ranks' times: nothing to set apart)
    assert r.advice == ("the 2 temporary workers started for the ranks beyond the pool's 2 imported numpy, scipy "
                        "during this call (inside the ranks' times), and every call starts new ones, which import "
                        "them again: %pool resize 4 keeps 4 workers that have them (or -n 2 runs the ranks on the "
                        "pool's workers)")


def test_every_cell_call_on_temporary_workers_is_told_it_pays_their_imports_again(pool2, tmp_path):
    """End to end: the ranks say whether their worker had the module before they imported it.
    After the first call the pool's 2 workers have it and the 2 temporary ones never do, so
    each later call paid it again; the report must say that, not "the next call will not pay it"."""
    import mpmagic
    from mpmagic.advice import _every_call as every_call

    name = f"mpm_probe_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    code = (f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nhad = {name!r} in sys.modules\n"
            f"import {name}\nhad")
    for call in range(3):
        had = mpmagic.parallel(code, workers=4, namespace={})
        report = mpmagic.last_report()
        assert had.count(False) == (4 if call == 0 else 2)  # (serial truth: who imported it in this call)
        temp = report.one_time["temporary"]
        assert temp["workers"] == 2 and temp["pool"] == 2 and name in temp["imports"], report.one_time
        if call:
            assert name not in report.one_time["imports"]  # (the pool's workers had it: nothing one-time)
        advice = every_call(report, lost=report.wall)
        # (and how long they took to start, when that mattered too)
        assert advice is not None and re.match(f"the 2 temporary workers started for the ranks beyond the pool's 2 "
                                               rf"(took [\d.]+ m?s to start and )?imported {name} during this call",
                                               advice), advice
        assert "next call will not pay" not in (report.advice or "")


def test_every_cell_call_on_temporary_workers_is_told_their_start_as_for_their_imports(pool2):
    """A %%parallel -n 4 on 2 workers starts 2 temporary workers on every call (a spawn
    worker: ~0.5 s); the line said nothing of it and the advice said "give the workers
    more work per call". Their start is an every-call cost, named with its cure."""
    import mpmagic
    from mpmagic.advice import _every_call as every_call

    for _ in range(2):
        assert mpmagic.parallel("rank", workers=4, namespace={}) == [0, 1, 2, 3]
        report = mpmagic.last_report()
        temp = report.one_time["temporary"]
        assert temp["workers"] == 2 and temp["start"] > 0.0 and temp["total"] >= temp["start"], report.one_time
        assert report.every_call_text().startswith("2 temporary workers started ("), report.every_call_text()
        advice = every_call(report, lost=report.wall)
        assert advice == (f"the 2 temporary workers started for the ranks beyond the pool's 2 took "
                          f"{fmt_seconds(temp['start'])} to start during this call, and every call starts new ones: "
                          "%pool resize 4 keeps 4 workers (or -n 2 runs the ranks on the pool's workers)"), advice


def test_temporary_workers_that_started_slowly_and_imported_are_told_both():
    temp = {"workers": 2, "imports": {"numpy": 0.3}, "import_seconds": 0.3, "load": 0.0, "start": 0.5,
            "total": 0.8, "pool": 2}
    once = {"imports": {}, "import_seconds": 0.0, "load": 0.0, "start": 0.0, "total": 0.0, "preloading": False,
            "temporary": temp}
    r = _report(kind="parallel", items=4, workers=4, wall=0.9, task_seconds=0.16, chunks=0, cores=None,
                one_time=once)
    assert r.line().endswith("| every call: 2 temporary workers started (500.0 ms) and imported numpy (300.0 ms)")
    assert r.advice == ("the 2 temporary workers started for the ranks beyond the pool's 2 took 500.0 ms to start "
                        "and imported numpy (300.0 ms) during this call, and every call starts new ones, which import "
                        "it again: %pool resize 4 keeps 4 workers that have it (or -n 2 runs the ranks on the "
                        "pool's workers)")


def test_the_import_log_notices_new_modules_only():
    log = warmup.ImportLog()
    mark = log.mark()
    log.since(mark, "task", None, time.time())
    assert log.take() is None
    sys.modules["fake_pkg_for_warm_test"] = types.ModuleType("fake_pkg_for_warm_test")
    sys.modules["fake_pkg_for_warm_test"].__file__ = "/x/fake_pkg_for_warm_test/__init__.py"
    try:
        log.since(mark, "task", None, time.time())
    finally:
        del sys.modules["fake_pkg_for_warm_test"]
    once = log.take()
    assert once["imports"][0][:3] == ("task", ["fake_pkg_for_warm_test"], None)
    assert log.take() is None


def test_a_dask_task_reports_its_functions_loading_and_the_imports_it_caused(ip, tmp_path, monkeypatch):
    # The Dask task runs units through the same execute_map as a local worker:
    # called here in-process (no cluster), as tests/test_unit_runner.py does.
    # (``ip``: with no shell yet, this process looked like a bare Dask worker and
    # the task made IPython's display functions its own for the rest of the
    # session: test_experience's reports, displayed later, were printed instead.)
    from mpmagic import payload
    from mpmagic.backends import dask_tasks
    from mpmagic.protocol import Done, Map, pack, unpack

    (tmp_path / "warm_probe_mod.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def add(x):
        import warm_probe_mod

        return x + warm_probe_mod.VALUE

    key, func = uuid.uuid4().bytes, payload.dumps_function(add)
    msg = pack(Map(1, 0, key, False, False, payload.dumps_data([1, 2]), False, 1))
    try:
        done = unpack(dask_tasks.run_message(msg, func, None, "tag")[1][-1])
        assert type(done) is Done and payload.loads(done.data) == [8, 9]
        once = done.meta["once"]
        assert once["load"] > 0  # the function's first loading in this process
        assert ("task", ["warm_probe_mod"], None) in [tuple(r[:3]) for r in once["imports"]]
        again = unpack(dask_tasks.run_message(msg, func, None, "tag")[1][-1])
        assert payload.loads(again.data) == [8, 9] and "once" not in again.meta  # paid once
    finally:
        sys.modules.pop("warm_probe_mod", None)


# -- the report and its advice ---------------------------------------------
def _report(**kw) -> Report:
    return synthetic_report(**{"task_seconds": 0.8, **kw})


def test_advice_names_the_import_the_workers_paid():
    once = {"imports": {"numpy": 0.29}, "import_seconds": 0.29, "load": 0.001, "start": 0.0, "total": 0.291}
    r = _report(wall=0.9, task_seconds=0.8, serial=0.8, one_time=once)
    assert r.advice.startswith("the workers imported numpy (290.0 ms) during this call; the next call will not pay it")
    assert "one-time: imported numpy (290.0 ms), loaded the function 1.0 ms" in r.line()
    assert ("one-time", "imported numpy (290.0 ms), loaded the function 1.0 ms") in r.rows()
    assert r.advice.endswith("import them in an earlier cell)")
    # The notebook had imported it and the workers were still preloading it: "import it earlier" was untrue
    r = _report(wall=0.9, task_seconds=0.8, serial=0.8, one_time=dict(once, preloading=True))
    assert r.advice.endswith("(the notebook had imported them: idle workers were still importing them in the "
                             "background when this call began)"), r.advice


def test_advice_tells_the_notebooks_imports_from_the_ones_the_tasks_made_themselves():
    """joblib imported dask, yaml... inside the tasks: the advice said the notebook had imported
    them, and listed 29 modules."""
    once = {"imports": {"sklearn, scipy, joblib, pandas, pyarrow": 1.5, "yaml, dask, toolz, distributed": None},
            "import_seconds": 1.5, "load": 0.001, "start": 0.0, "total": 1.501, "preloading": True}
    r = _report(wall=2.0, task_seconds=0.8, serial=0.8, one_time=once, task_imports=("yaml", "dask", "toolz", "distributed"))
    assert r.advice == (
        "the workers imported sklearn, scipy, joblib and 2 more (1.50 s) during this call, as the notebook had (idle "
        "workers were still importing them in the background when this call began), and the tasks imported yaml, "
        "dask, toolz and 1 more themselves; the next call will not pay it"), r.advice


def test_a_cells_first_run_importing_in_its_ranks_is_not_told_the_ranks_repeat_the_work():
    """The ranks' times held sklearn's import (the same line listed it as one-time):
    a cell that split its work by rank was told to split it."""
    timed = {"imports": {"sklearn, scipy": 1.5}, "import_seconds": 1.5, "load": 0.0, "start": 0.0, "total": 1.5,
             "preloading": True}
    cell = dict(kind="parallel", items=2, workers=2, wall=1.7, task_seconds=3.1, cpu_seconds=3.1, chunks=0,
                serial=0.12)
    r = _report(**cell, one_time=timed)
    assert "repeat the work" not in r.advice and r.advice.startswith("the workers imported sklearn, scipy"), r.advice
    untimed = {"imports": {"sklearn, scipy": None}, "import_seconds": 0.0, "load": 0.0, "start": 0.0, "total": 0.0}
    r = _report(**cell, one_time=untimed, task_imports=("sklearn", "scipy"))
    assert "repeat the work" not in r.advice and "the tasks imported sklearn, scipy" in r.advice, r.advice
    # A warm run that does repeat it is still told (each rank about the serial time: 1.5 s, 12x it, is
    # something else than repeating the cell, which advice.REPEAT_AT_MOST leaves to the other causes).
    warm = {**cell, "wall": 0.13, "task_seconds": 0.25, "cpu_seconds": 0.25}
    r = _report(**warm, one_time={**timed, "imports": {"sklearn": 0.01}, "import_seconds": 0.01, "total": 0.01})
    assert "the ranks repeat the work" in r.advice


def test_advice_names_tasks_slower_in_the_workers_when_compare_measured_it():
    r = _report(wall=0.95, task_seconds=1.84, serial=0.8,
                one_time={"imports": {}, "import_seconds": 0.0, "load": 0.0, "start": 0.0, "total": 0.0})
    assert r.advice.startswith("tasks ran 2.3x slower in the workers than here")
    assert "give the workers more work" not in r.advice
    assert "one-time" not in r.line()  # shown only when it mattered


def test_a_cold_flag_without_a_measured_start_is_not_blamed():
    # The pool started in the background a moment ago: flagged cold, but the
    # first chunk began at once; the advice must not say "still starting".
    zero = {"imports": {}, "import_seconds": 0.0, "load": 0.0, "start": 0.0, "total": 0.0}
    r = _report(wall=0.9, task_seconds=0.8, cold_start=True, one_time=zero)
    assert r.advice is None or "still starting" not in r.advice
    started = dict(zero, start=0.4, total=0.4)
    r = _report(wall=0.9, task_seconds=0.8, cold_start=True, one_time=started)
    assert r.advice.startswith("the workers were starting during this call (400.0 ms)")


def test_advice_names_modules_the_tasks_imported_themselves():
    once = {"imports": {"scipy": None}, "import_seconds": 0.0, "load": 0.0, "start": 0.0, "total": 0.0}
    r = _report(wall=0.9, task_seconds=1.6, serial=0.8, one_time=once)
    assert r.advice.startswith("the tasks imported scipy in the workers during this call")


def test_numpy_loaded_by_a_library_in_the_notebook_is_not_imported_by_the_workers():
    """numpy adds an "always" warnings filter for its RankWarning, and the workers
    get the notebook's filters: loading that one imported numpy in every worker,
    though the notebook's code never used it (matplotlib for an --insights chart,
    pandas...). A filter waits until a task imports its package."""
    script = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "ip.run_cell('%load_ext mpmagic')\n"
        "__import__('numpy')  # (loaded, as a library would: no name of the notebook's is numpy's)\n"
        "import mpmagic, warnings\n"
        "assert any(f[2].__module__.startswith('numpy') for f in warnings.filters)\n"
        "mpmagic.start_pool(2, 'spawn', wait=True)\n"
        "ip.run_cell('import sys\\ndef has_numpy(x):\\n    return \"numpy\" in sys.modules')\n"
        "print('WORKERS', mpmagic.pmap(ip.user_ns['has_numpy'], [1, 2], chunksize=1))\n"
        "ip.run_cell('def uses_numpy(x):\\n    import numpy, warnings\\n    return any(f[2].__module__.startswith(\"numpy\") for f in warnings.filters)')\n"
        "mpmagic.pmap(ip.user_ns['uses_numpy'], [1, 2], chunksize=1)\n"
        "print('FILTER', mpmagic.pmap(ip.user_ns['uses_numpy'], [1, 2], chunksize=1))\n"
        "mpmagic.stop_pool()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), MPMAGIC_PRESTART="0")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WORKERS [False, False]" in proc.stdout, proc.stdout
    assert "FILTER [True, True]" in proc.stdout, proc.stdout  # once a task imported numpy, its filter applies


def test_a_dask_worker_shared_by_two_notebooks_reloads_each_ones_reload_once(monkeypatch):
    """A worker process serving two notebooks took any other notebook's load number as
    new: with their tasks in turn, the module was reloaded (and the functions dropped)
    on every task. Each notebook's reloads are followed once, by its own numbers."""
    import types

    from mpmagic.backends import dask_tasks

    monkeypatch.setattr(dask_tasks, "_followed", {})
    monkeypatch.setitem(sys.modules, "shared_reload_mod", types.ModuleType("shared_reload_mod"))
    reloaded: list[list[str]] = []
    imports = types.SimpleNamespace(reload=reloaded.append)
    a, b = [("shared_reload_mod", ("nb-a", 3), None)], [("shared_reload_mod", ("nb-b", 1), None)]
    for _ in range(3):
        dask_tasks.follow_reloads(a, imports)  # type: ignore[arg-type]
        dask_tasks.follow_reloads(b, imports)  # type: ignore[arg-type]
    assert reloaded == [["shared_reload_mod"], ["shared_reload_mod"]]  # (each notebook's first: once)
    dask_tasks.follow_reloads([("shared_reload_mod", ("nb-a", 4), None)], imports)  # type: ignore[arg-type]
    dask_tasks.follow_reloads(b, imports)  # type: ignore[arg-type]
    assert len(reloaded) == 3  # (a's new reload; b's unchanged)


def test_the_users_modules_are_those_usermodules_calls_the_users_code_and_importable_again(monkeypatch, tmp_path):
    """Tester report dask22, finding 1: importing ``distributed`` puts zipp's overlay
    ``zipp.compat.overlay.zipfile`` in ``sys.modules``: a namespace, not a module, whose file
    is the standard library's zipfile.py. ``warmup`` took it for a module of the user's (it
    left out site-packages only) while ``usermodules`` (the checkpoint keys) did not: every
    Dask cell sent it for the workers to reload, which failed with a traceback, and its
    values were never checkpointed. One test decides what is the user's code; warmup keeps
    those it can reload (modules)."""
    import zipfile

    from mpmagic import usermodules

    mine = tmp_path / "mine_dask22.py"
    mine.write_text("X = 1\n")
    module = types.ModuleType("mine_dask22")
    module.__file__ = str(mine)
    monkeypatch.setitem(sys.modules, "mine_dask22", module)
    monkeypatch.setitem(sys.modules, "overlay_dask22.zipfile", types.SimpleNamespace(__file__=zipfile.__file__))
    stdlib_file = types.ModuleType("copied_dask22")
    stdlib_file.__file__ = zipfile.__file__  # (a module object, but the standard library's file)
    monkeypatch.setitem(sys.modules, "copied_dask22", stdlib_file)
    mine_too = types.SimpleNamespace(__file__=str(mine))  # (the user's file, but nothing reload takes)
    monkeypatch.setitem(sys.modules, "not_a_module_dask22", mine_too)

    assert warmup._user_module("mine_dask22") and usermodules.local_module_file("mine_dask22") == str(mine)
    for name in ("overlay_dask22.zipfile", "copied_dask22", "not_a_module_dask22"):
        assert not warmup._user_module(name), name
    assert usermodules.local_module_file("overlay_dask22.zipfile") is None
    for name in list(sys.modules):  # (zipp's own overlay among them, with distributed imported)
        if warmup._user_module(name):
            assert usermodules.local_module_file(name) is not None, name
    assert not warmup._user_module("zipp.compat.overlay.zipfile")


def test_a_dask_worker_that_cannot_reload_a_module_says_so_in_one_line(monkeypatch, tmp_path, caplog):
    """Tester report dask22, finding 2: a module a worker could not reload printed
    mpmagic's own traceback (``warmup.py ... importlib.reload``) in the cell, unlabelled,
    once per task; and an entry of ``sys.modules`` that is no module (zipp's overlay) was
    "reloaded" at all. One line naming the module and the error; a non-module is left alone
    (neither reloaded nor said to differ)."""
    import logging

    from mpmagic import loadstamps
    from mpmagic.backends import dask_tasks

    monkeypatch.setattr(dask_tasks, "_checked", {})
    path = tmp_path / "broken_reload_dask22.py"
    path.write_text("X = 1\n")
    module = types.ModuleType("broken_reload_dask22")
    module.__file__ = str(path)  # (no spec: importlib.reload raises)
    monkeypatch.setitem(sys.modules, "broken_reload_dask22", module)
    overlay = types.SimpleNamespace(__file__=str(path))
    monkeypatch.setitem(sys.modules, "overlay_dask22.zipfile", overlay)
    digest = loadstamps.digest(str(path))
    log = warmup.ImportLog()
    with caplog.at_level(logging.DEBUG, logger="mpmagic"):
        reloaded, differs = dask_tasks.follow_versions(
            (("broken_reload_dask22", digest), ("overlay_dask22.zipfile", digest)), log)
    # (it still runs the version it had: the reload's error, not "its file differs")
    assert reloaded == [] and differs == [
        ("broken_reload_dask22", "ModuleNotFoundError: spec not found for the module 'broken_reload_dask22'")]
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].exc_info is None, said
    line = said[0].getMessage()
    assert "\n" not in line and "broken_reload_dask22" in line and "ModuleNotFoundError" in line, line
    assert "overlay_dask22" not in caplog.text
