"""``%%parallel`` on the fork start method.

The core cell tests (tests/test_parallel.py) run on forkserver, spawn and
Dask; fork had only a %pmap smoke test. Fork has its own trap: a forked
worker inherits the notebook's memory as it was when the pool started, so a
cell that read its names from that copy would see stale values, and names
defined later would be missing. Each check below uses names defined or
changed after the pool's workers were forked; plain serial Python (the same
code run with each rank by hand) is the oracle.
"""

from __future__ import annotations

import os

import pytest
from conftest import ensure_pool, run
from IPython.utils.capture import capture_output

import mpmagic


@pytest.fixture
def fork_pool(ip):
    """A 2-worker fork pool whose workers are already running (forked now)."""
    ip.user_ns["scale"] = 1  # in the workers' inherited copy of the notebook
    backend = ensure_pool("fork")
    backend.wait_ready()
    assert backend.start_method == "fork"
    return backend


def serial(code: str, size: int, **names) -> list:
    """The cell's last value for each rank, run here one rank after another."""
    body, last = code.rsplit("\n", 1)
    out = []
    for rank in range(size):
        ns = {**names, "rank": rank, "size": size}
        exec(body, ns)
        out.append(eval(last, ns))
    return out


def test_cell_sees_names_made_and_changed_after_the_fork(ip, fork_pool):
    pids_before = {s.pid for s in fork_pool.slots}
    run(ip, "scale = 7\ndef weight(r):\n    return (r + 1) * scale\nclass Box:\n    def __init__(self, v):\n        self.v = v\n")
    code = "b = Box(weight(rank))\nb.v + size"
    values = run(ip, f"%%parallel -n 2 -q\n{code}")
    assert values == serial(code, 2, weight=ip.user_ns["weight"], Box=ip.user_ns["Box"]) == [9, 16]
    assert {s.pid for s in fork_pool.slots} == pids_before  # the same forked workers ran it
    # Changed again: the next cell sees the new value, not the one sent before.
    run(ip, "scale = 100")
    assert run(ip, "%%parallel -n 2 -q\nweight(rank)") == [100, 200]


def test_output_labelled_values_in_rank_order_and_more_ranks_than_workers(ip, fork_pool):
    with capture_output() as cap:
        values = run(ip, "%%parallel -n 3 -q\nprint('hello from', rank)\nrank * rank")
    assert values == [0, 1, 4]
    for rank in range(3):
        assert f"[rank {rank}] hello from {rank}\n" in cap.stdout
    assert mpmagic.last_report().items == 3


def test_error_in_one_rank_names_it_and_keeps_the_others(ip, fork_pool):
    with capture_output():
        result = ip.run_cell("%%parallel -n 2 -q\n10 // (rank - 1)", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, mpmagic.ParallelError), err
    assert set(err.failures) == {1} and isinstance(err.failures[1], ZeroDivisionError)
    assert err.values == {0: -10}  # 10 // -1, as serial Python gives it
    assert run(ip, "%%parallel -n 2 -q\nrank") == [0, 1]  # the pool still works


def test_shared_value_made_after_the_fork(ip, fork_pool):
    run(ip, "import mpmagic\ncounter = mpmagic.Value('i', 0)\nguard = mpmagic.Lock()")
    run(
        ip,
        "%%parallel -n 2 -q\n"
        "for _ in range(500):\n"
        "    with guard:\n"
        "        counter.value += 1\n",
    )
    assert ip.user_ns["counter"].value == 1000


def _sigterm_handler(_: object) -> str:
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    return getattr(handler, "name", None) or getattr(handler, "__qualname__", repr(handler))


def test_fork_workers_do_not_carry_the_notebooks_sigterm_handler(ip):
    """``%load_ext`` installs a SIGTERM handler in the notebook (exiting.kill_on_sigterm:
    kill the workers, then die). A fork worker inherited it: a Python handler, which
    cannot run while a task holds the GIL, where the default action ends the process at
    once, so stopping a pool whose fork worker was busy in C code took ~1 s longer (its
    terminate() waited for the task). A fork worker puts back the handler that was
    there before mpmagic's (the default here), as a spawn worker has it."""
    import signal

    from mpmagic import exiting

    saved = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        exiting.kill_on_sigterm(lambda: None)
        assert getattr(signal.getsignal(signal.SIGTERM), "mpmagic_kills", False)
        pool_module = mpmagic.pool
        pool_module.shutdown()
        mpmagic.use_local(2, "fork")
        assert mpmagic.pmap(_sigterm_handler, range(2)) == ["SIG_DFL", "SIG_DFL"]
    finally:
        mpmagic.pool.shutdown()
        signal.signal(signal.SIGTERM, saved)


def test_workers_forked_while_the_notebook_imports_a_module_get_the_module_whole(ip, tmp_path, monkeypatch):
    """A notebook's first cell ``%load_ext mpmagic`` then ``import numpy`` (the
    data_work example on fork): the pool forked its workers in the background
    while numpy was half imported, and a fork copies the module's import lock,
    held by a thread the child does not have. The first item that used numpy
    waited for that lock for ever. Now a fork waits until other threads' imports
    are done: here a module that takes a second to import, forked meanwhile."""
    import sys
    import threading

    name = f"slow_import_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("import time\ntime.sleep(1.0)\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importer = threading.Thread(target=__import__, args=(name,))
    mpmagic.pool.shutdown()
    try:
        importer.start()
        while name not in sys.modules:  # (the import is under way: its lock is held)
            pass
        mpmagic.use_local(2, "fork")
        mpmagic.get_pool().start()  # the workers fork now
        run(ip, "def value_of(name):\n    import importlib\n    return importlib.import_module(name).VALUE\n")
        done = mpmagic.submit(ip.user_ns["value_of"], [name] * 2)
        assert done.result(timeout=30) == [42, 42]
    finally:
        importer.join()
        mpmagic.pool.shutdown()
        sys.modules.pop(name, None)


def test_a_module_that_maps_as_it_is_imported_is_not_waited_for_by_the_forks_its_run_needs(tmp_path, monkeypatch):
    """The other side of waiting for imports before a fork: a module whose top level
    calls pmap (``import pipeline``) holds its import lock for the whole run, and a
    worker the run needs forked then (here: recycled after each item) must not wait
    for that import, which waits for the run."""
    import sys
    import threading

    from mpmagic.backends import local

    monkeypatch.setattr(local, "_IMPORT_WAIT", 90.0)  # (a wait would show as a hang, not as seconds)
    name = f"maps_on_import_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("import mpmagic\nRESULT = mpmagic.pmap(abs, range(-4, 0), chunksize=1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mpmagic.pool.shutdown()
    mpmagic.start_pool(workers=2, start_method="fork", max_tasks_per_child=1)
    importer = threading.Thread(target=__import__, args=(name,), daemon=True)
    try:
        importer.start()
        importer.join(60)
        assert not importer.is_alive(), "the import's run waited on its own forks"
        assert sys.modules[name].RESULT == [4, 3, 2, 1]
    finally:
        mpmagic.pool.shutdown()
        sys.modules.pop(name, None)
