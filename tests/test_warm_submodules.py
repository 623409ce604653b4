"""Warm workers import what the notebook loaded, not only what it named
(issue 22 item 1): the submodules a package loads on first use, the classes
of the items of a global list, and what each preload costs a worker.

The end-to-end case runs a notebook in a fresh process (this file run as a
script): the pytest process has numpy
and more loaded, which would leak into the notebook under test. Its packages
are small fakes in a directory named ``site-packages`` (warm-up preloads only
installed packages), on the PYTHONPATH of notebook and workers alike.
"""

from __future__ import annotations

import importlib.machinery
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mpmagic import warmup
from mpmagic.fmt import fmt_bytes

HERE = Path(__file__).parent

# The fake packages: name -> source.
PACKAGES = {
    # lazypkg.sub is loaded on first use by the package's own code: no scan of
    # the notebook's names or functions can see it, only sys.modules.
    "lazypkg/__init__.py": "def use():\n    from . import sub\n    return sub.VALUE\n",
    "lazypkg/sub.py": "VALUE = 7\n",
    # A submodule that pulls the notebook's machinery: never into a worker.
    "lazypkg/gui.py": "import IPython\n",
    # Reached only through the items of a global list.
    "otherpkg/__init__.py": "class Row:\n    def __init__(self, v):\n        self.v = v\n",
    # An import that burns 0.3 s of CPU (a heavy package's import, in short).
    "burnpkg/__init__.py": "import time\n_t = time.process_time()\nwhile time.process_time() - _t < 0.3:\n    pass\n",
}
PROBE = ["numpy", "numpy.fft", "lazypkg", "lazypkg.sub", "lazypkg.gui", "IPython", "otherpkg", "burnpkg"]


# -- the notebook under test (this file run as a script) --------------------
def _session() -> None:
    from IPython.core.interactiveshell import InteractiveShell

    import mpmagic
    from mpmagic.api import last_report

    ip = InteractiveShell.instance(colors="nocolor")

    def run(code: str):
        r = ip.run_cell(code, store_history=False)  # not silent: that skips the after-cell hook
        r.raise_error()
        return r.result

    def third_party(mods: list[str]) -> list[str]:
        return sorted({m.partition(".")[0] for m in mods if m.startswith(("numpy", "lazypkg", "otherpkg", "burnpkg"))})

    out: dict = {"notebook_had_numpy": "numpy" in sys.modules}
    run("%load_ext mpmagic")
    run("%pool start -n 2 --start-method forkserver")
    backend = mpmagic.get_pool()
    backend.wait_ready()
    # Tasks that only look at sys.modules: they import nothing themselves.
    run("def has(names):\n    import sys\n    return [n in sys.modules for n in names]\n")
    run("def loaded(_):\n    import sys\n    return len(sys.modules), sorted(sys.modules)\n")
    bare = run("%pmap loaded, [0, 1]")
    # A notebook that imported nothing heavy: the stdlib only.
    run("import json, fractions, decimal\nthird = fractions.Fraction(1, 3)\nprice = decimal.Decimal('1.5')")
    light = run("%pmap loaded, [0, 1]")
    out["bare_count"] = [n for n, _ in bare]
    out["light_count"] = [n for n, _ in light]
    out["light_third_party"] = [third_party(mods) for _, mods in light]
    out["light_mirrored"] = backend.warmth.mirrored

    # numpy.fft used at cell level (numpy 2 loads it on first use), lazypkg.sub
    # loaded by the package's own code, lazypkg.gui imported (it pulls IPython),
    # otherpkg reached only through a global list's items.
    run("import numpy as np\nspectrum = np.fft.rfft(np.ones(8))")
    run("import lazypkg\nanswer = lazypkg.use()\nimport lazypkg.gui")
    run("import otherpkg as _o\nrows = [_o.Row(1), _o.Row(2)]\ndel _o")
    run("import burnpkg")
    out["seen"] = run(f"%pmap has, [{PROBE!r}] * 2")
    rep = last_report()
    out["cpu"], out["task"], out["advice"] = rep.cpu_seconds, rep.task_seconds, rep.advice
    out["status"] = str(mpmagic.pool_status())
    out["mirrored"] = backend.warmth.mirrored
    mpmagic.stop_pool()
    print("RESULT " + json.dumps(out, default=str))


# -- the tests -------------------------------------------------------------
@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    site = tmp_path_factory.mktemp("warm") / "site-packages"
    for rel, src in PACKAGES.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(src)
    env = dict(os.environ, MPMAGIC_WARM="1",  # conftest turns it off for the shared shell
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(site), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                          timeout=180, env=env, cwd=str(HERE))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"session failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    out = json.loads(lines[-1].removeprefix("RESULT "))
    out["seen"] = [dict(zip(PROBE, flags, strict=True)) for flags in out["seen"]]
    return out


def test_a_notebook_that_imported_only_the_stdlib_leaves_the_workers_as_they_started(seen):
    assert seen["notebook_had_numpy"] is False
    assert seen["light_third_party"] == [[], []]
    assert seen["light_mirrored"] == []
    # json, fractions, decimal are not preloaded either: the same modules as bare workers.
    assert seen["light_count"] == seen["bare_count"]


def test_a_submodule_a_package_loaded_on_first_use_in_the_notebook_is_in_the_workers_before_the_items_run(seen):
    for worker in seen["seen"]:
        assert worker["numpy.fft"] is True  # numpy 2 loads it lazily; the cell used np.fft
        assert worker["lazypkg.sub"] is True  # loaded by lazypkg.use(), invisible to any name scan
    assert "numpy.fft" in seen["mirrored"] and "lazypkg.sub" in seen["mirrored"]


def test_a_submodule_that_pulls_the_notebooks_machinery_stays_out_of_the_workers(seen):
    for worker in seen["seen"]:
        assert worker["lazypkg.gui"] is False
        assert worker["IPython"] is False


def test_the_classes_of_a_global_lists_items_are_imported_in_the_workers(seen):
    # rows = [otherpkg.Row(...)]: no name of the notebook is otherpkg itself.
    assert [w["otherpkg"] for w in seen["seen"]] == [True, True]


def test_pool_status_says_what_each_preload_costs_a_worker(seen):
    line = next(ln for ln in seen["status"].splitlines() if "preloaded" in ln)
    assert "numpy (+" in line and "MB per worker)" in line
    assert "submodules the notebook loaded (+" in line or "submodule the notebook loaded (+" in line


def test_a_preloads_cpu_is_not_counted_as_the_tasks(seen):
    # burnpkg's import burned 0.3 s of CPU in each worker just before the
    # items: the call's CPU time must not include it (it made the advice say
    # "each worker ran ~3 threads ... cap them" on every warm first call).
    assert all(w["burnpkg"] for w in seen["seen"])
    assert seen["cpu"] is not None and seen["cpu"] < 0.25
    assert not seen["advice"] or "threads" not in seen["advice"]


# -- the parts, in this process ---------------------------------------------
def _fake_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


def test_loaded_submodules_scans_on_from_where_it_stopped(monkeypatch):
    import numpy  # noqa: F401 - an installed package with submodules loaded

    subs, end = warmup.loaded_submodules({"numpy"})
    assert subs and all(s.startswith("numpy.") for s in subs)
    assert warmup.loaded_submodules({"numpy"}, end)[0] == []  # nothing loaded since
    assert len(warmup.loaded_submodules({"numpy"}, limit=3)[0]) == 3
    monkeypatch.setitem(sys.modules, "numpy._mpm_test_new", _fake_module("numpy._mpm_test_new"))
    assert warmup.loaded_submodules({"numpy"}, end)[0] == ["numpy._mpm_test_new"]
    assert warmup.loaded_submodules({"json"})[0] == []  # the stdlib: never


def test_a_submodule_holding_the_notebooks_machinery_or_an_alias_is_not_mirrored(monkeypatch):
    import IPython
    import numpy  # noqa: F401

    _, end = warmup.loaded_submodules({"numpy"})
    monkeypatch.setitem(sys.modules, "numpy._mpm_test_gui", _fake_module("numpy._mpm_test_gui", IPython=IPython))
    monkeypatch.setitem(sys.modules, "numpy._mpm_test_alias", _fake_module("numpy.other_name"))
    monkeypatch.setitem(sys.modules, "numpy._mpm_test_ok", _fake_module("numpy._mpm_test_ok", x=1))
    assert warmup.loaded_submodules({"numpy"}, end)[0] == ["numpy._mpm_test_ok"]


def test_the_warmth_mirrors_between_cells_but_not_ahead_of_a_submitted_function(monkeypatch):
    import numpy as np

    monkeypatch.setenv("MPMAGIC_WARM", "1")
    ns = {"np": np}
    exec("def f(x):\n    return np.zeros(x)\n", ns)
    w = warmup.Warmth()
    assert w.want_for(ns["f"], b"key") is True
    assert w.wanted == ["numpy"] and w.mirrored == []  # its first unit waits for no speculation
    assert w.want([]) is True  # the next cell: numpy's loaded submodules join
    assert w.mirrored and all(m.startswith("numpy.") for m in w.mirrored)
    assert w.wanted == ["numpy"]  # %pool lists what the notebook named
    assert w.want([]) is False  # nothing loaded since


def test_a_notebook_global_lists_items_name_their_classes_modules():
    import numpy as np

    assert warmup.notebook_modules({"rows": [np.float32(1), np.float32(2)]}) == ["numpy"]
    assert warmup.notebook_modules({"by_key": {"a": [np.zeros(1)]}}) == ["numpy"]
    assert warmup.notebook_modules({"empty": [], "ints": [1, 2], "nested": [[[np.zeros(1)]]]}) == []


def test_a_preload_records_the_memory_it_added_and_a_failed_submodule_is_no_warning(caplog, tmp_path, monkeypatch):
    # A fresh anonymous mapping, every page touched: resident whatever the
    # (big, long-lived) test process's heap already holds.
    (tmp_path / "warm_mem_probe.py").write_text(
        "import mmap\nBLOCK = mmap.mmap(-1, 8 << 20)\nfor i in range(0, 8 << 20, 4096):\n    BLOCK[i] = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    log = warmup.ImportLog()
    try:
        with caplog.at_level(logging.DEBUG, logger="mpmagic"):
            log.preload(["warm_mem_probe", "warm_mem_probe.missing", "warm_missing_top"])
    finally:
        sys.modules.pop("warm_mem_probe", None)
    why, names, seconds, _, _, added = log.take()["imports"][0]
    assert (why, names) == ("preload", ["warm_mem_probe"]) and seconds > 0
    assert added >= 8 << 20
    levels = {r.getMessage().rsplit(" ", 1)[-1]: r.levelno for r in caplog.records}
    assert levels == {"warm_mem_probe.missing": logging.DEBUG, "warm_missing_top": logging.WARNING}
    warmup._note_memory(["warm_mem_probe"], 0, added)
    assert warmup.describe_preloads(["warm_mem_probe"], []) == [
        f"warm_mem_probe (+{fmt_bytes(added)} per worker)"]


if __name__ == "__main__":
    _session()


def test_the_scan_of_a_submodule_touches_no_deprecated_alias(monkeypatch):
    """`import torch` in a cell printed two FutureWarnings from warmup.py: the
    scan's isinstance() asked torch.distributed.reduce_op (a deprecated alias
    that warns on any attribute) for its __class__."""
    import warnings

    class _Deprecated:
        def __getattribute__(self, name):
            warnings.warn("reduce_op is deprecated", FutureWarning, stacklevel=2)
            return object.__getattribute__(self, name)

    import numpy  # noqa: F401

    _, end = warmup.loaded_submodules({"numpy"})
    monkeypatch.setitem(sys.modules, "numpy._mpm_test_dep", _fake_module("numpy._mpm_test_dep", reduce_op=_Deprecated()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warmup.loaded_submodules({"numpy"}, end)[0] == ["numpy._mpm_test_dep"]
    assert [str(w.message) for w in caught] == []
