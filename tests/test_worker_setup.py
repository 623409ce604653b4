"""Worker setup that heals (issue 18): %%pool setup / on_worker_start run in every
worker, also in every worker started later, and its names reach mapped functions
(def, lambda, a helper they call) and %%parallel cells."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from typing import Any

import pytest
from conftest import ensure_pool, run
from IPython.core.error import UsageError as IPythonUsageError

import mpmagic
from mpmagic import pool as pool_module
from mpmagic import setup_api, worker_setup
from mpmagic.errors import UsageError

SETUP = "import math\nMODEL = {'w': 3}\ndef predict(x):\n    return MODEL['w'] * x\n"


@pytest.fixture(autouse=True)
def _no_setup_left(ip):
    run(ip, "import mpmagic")
    yield
    worker_setup.clear()
    worker_setup.set_gpus(None)
    try:
        setup_api.apply_now()
    except Exception:  # a pool a test broke on purpose: the next test starts a new one
        pool_module.shutdown()


def _check_all(ip, n_items=12):
    """A map whose every item needs the setup's names; returns the worker ids that ran it."""
    run(ip, "def _uses_setup(x):\n    import time, mpmagic\n    time.sleep(0.02)\n"
            "    return predict(x) + MODEL['w'] - 3, mpmagic.worker_id()")
    out = run(ip, f"%pmap -q --chunksize 1 _uses_setup, range({n_items})")
    assert [v for v, _ in out] == [3 * x for x in range(n_items)]
    return {w for _, w in out}


def test_names_reach_def_lambda_helper_and_cell(ip, local_pool):
    run(ip, "%%pool setup\n" + SETUP)
    run(ip, "def _helper(x):\n    return predict(x)\ndef _f(x):\n    return _helper(x) + len(MODEL)")
    assert run(ip, "%pmap -q _f, range(4)") == [3 * x + 1 for x in range(4)]
    assert run(ip, "%pmap -q lambda x: math.floor(predict(x) / 2), range(4)") == [0, 1, 3, 4]
    values = run(ip, "%%parallel -n 3 -q\npredict(rank)")  # 3 ranks on 2 workers: one temporary
    assert list(values) == [0, 3, 6]
    ids = set(run(ip, "%pmap -q --chunksize 1 lambda x: mpmagic.worker_id(), range(6)"))
    assert ids <= {s.wid for s in local_pool.slots} and mpmagic.worker_id() is None


def test_a_setups_environment_and_directory_are_the_tasks(ip, local_pool, tmp_path):
    """Each call starts in the notebook's world, and that undid a setup's
    os.environ["HF_HOME"] = ... and os.chdir(...) at the first call: what a
    setup changes wins over the notebook's from then on."""
    os.environ["MPM_SETUP_GONE"] = "notebook's"
    try:
        run(ip, f"%%pool setup\nimport os\nos.environ['MPM_SETUP_HOME'] = 'models'\nos.chdir({str(tmp_path)!r})\n"
                "del os.environ['MPM_SETUP_GONE']")
        run(ip, "import os\ndef where(x):\n"
                "    return os.environ.get('MPM_SETUP_HOME'), os.environ.get('MPM_SETUP_GONE'), os.getcwd()\n"
                "def meddle(x):\n    os.environ['MPM_SETUP_HOME'] = 'task'\n")
        assert run(ip, "%pmap -q --chunksize 1 where, range(4)") == [("models", None, str(tmp_path))] * 4
        run(ip, "%pmap -q --chunksize 1 meddle, range(4)")  # a task's change of the setup's variable: undone
        assert run(ip, "%pmap -q --chunksize 1 where, range(4)") == [("models", None, str(tmp_path))] * 4
        run(ip, "%pool setup clear")  # the notebook's world again, on every worker
        assert run(ip, "%pmap -q --chunksize 1 where, range(4)") == [(None, "notebook's", os.getcwd())] * 4
    finally:
        del os.environ["MPM_SETUP_GONE"]


@pytest.mark.parametrize("method", ["forkserver"], scope="session")  # (a replacement gets the setup the same way whatever starts it)
def test_setup_survives_sigkill_timeout_and_resize(ip, local_pool):
    run(ip, "%%pool setup\n" + SETUP)
    old = {s.wid for s in local_pool.slots}
    os.kill(local_pool.slots[0].pid, signal.SIGKILL)
    run(ip, "import time\nres = %pmap -q --errors collect --retries 1 lambda x: time.sleep(x), [0.01] * 4")
    ids = _check_all(ip)
    run(ip, "res = %pmap -q --errors collect --timeout 0.5 lambda x: time.sleep(x), [5]")
    ids |= _check_all(ip)
    assert ids - old, "replacement workers ran items"
    run(ip, "%pool resize 3")
    assert len(_check_all(ip, 18)) >= 1
    run(ip, "%pool restart")
    assert not (_check_all(ip) & old)


@pytest.mark.parametrize("method", ["forkserver"], scope="session")  # (a replacement gets the setup the same way whatever starts it)
def test_setup_in_recycled_workers(ip, method):
    pool_module.shutdown()
    mpmagic.start_pool(2, method, max_tasks_per_child=1, wait=True)
    try:
        run(ip, "%%pool setup\n" + SETUP)
        assert len(_check_all(ip, 6)) == 6  # a fresh worker per item, each set up
    finally:
        pool_module.shutdown()
    ensure_pool(method)


@pytest.mark.parametrize("body", ["# load the model here later\n", "   \n\n", "# a\n\n    # b"])
def test_a_setup_cell_without_code_is_refused_not_installed(ip, body):
    """A comment-only cell was installed silently as the setup (replacing the one before)."""
    error = ip.run_cell("%%pool setup\n" + body, store_history=False).error_in_exec
    assert isinstance(error, IPythonUsageError) and "%%pool setup needs code in the cell" in str(error), error
    assert worker_setup.describe().startswith("no worker setup")


def test_failing_setup_one_line_and_pool_usable(ip, local_pool):
    result = ip.run_cell("%%pool setup\nA = 1\nB = 1 / 0\n", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, mpmagic.MPMagicError)
    text = str(err)
    # (line 3: counted from the %%pool setup line, as a syntax error's line and %%parallel's are)
    assert "\n" not in text and text.startswith("setup failed on worker ")
    assert ", %%pool setup, line 3 (`B = 1 / 0`): ZeroDivisionError: division by zero (the worker still runs" in text
    status = str(mpmagic.pool_status())
    assert status.count("setup failed") == len(local_pool.slots)
    assert run(ip, "%pmap -q lambda x: A + x, range(3)") == [1, 2, 3]  # names before the failing line stay
    with pytest.raises(NameError) as info:  # a name after it: the error says why it is missing
        run(ip, "%pmap -q lambda x: B, range(2)")
    assert any("runs without the %%pool setup (it failed there; see %pool)" in n for n in info.value.__notes__)
    with pytest.raises(ZeroDivisionError) as info:  # (a task's other errors: no such line)
        run(ip, "%pmap -q lambda x: 1 / 0, range(2)")
    assert not any("%%pool setup" in n for n in getattr(info.value, "__notes__", []))


def test_show_clear_and_on_worker_start(ip, local_pool, capsys):
    run(ip, "%%pool setup\n" + SETUP + "print('model loaded')\n")
    shown = capsys.readouterr().out
    assert all(f"[worker {s.wid}] model loaded" in shown for s in local_pool.slots)
    run(ip, "%pool setup")
    assert "MODEL = {'w': 3}" in capsys.readouterr().out
    assert "set up" in str(mpmagic.pool_status())
    run(ip, "%pool setup clear")
    with pytest.raises(NameError):
        run(ip, "%pmap -q lambda x: MODEL, range(2)")
    run(ip, "def _start():\n    return {'TOKEN': 'abc'}\nmpmagic.on_worker_start(_start)")
    assert run(ip, "%pmap -q lambda x: TOKEN, range(2)") == ["abc", "abc"]
    run(ip, "def _bad():\n    raise OSError('no such model')")
    with pytest.raises(mpmagic.MPMagicError, match="_bad.*OSError: no such model"):
        run(ip, "mpmagic.on_worker_start(_bad)")


def test_gpus_round_robin(ip, local_pool):
    run(ip, "%pool start --gpus 0,1")
    run(ip, "%pool resize 3")
    run(ip, "import os, time")
    got = run(ip, "%pmap -q --chunksize 1 lambda x: (time.sleep(0.05), mpmagic.worker_id(), "
                  "os.environ.get('CUDA_VISIBLE_DEVICES'))[1:], range(12)")
    by_worker = dict(got)
    assert sorted(by_worker.values()) in (["0", "0", "1"], ["0", "1"], ["0", "1", "1"])
    assert "GPU 0" in str(mpmagic.pool_status())
    with pytest.raises(Exception, match="--gpus goes with start"):
        run(ip, "%pool restart --gpus 1")
    worker_setup.set_gpus(None)
    run(ip, "%pool restart")
    run(ip, "%pool resize 2")


def test_dask_setup_plugin(ip, dask_cluster):
    from distributed import Client

    worker_setup.set_code(SETUP)
    mpmagic.use_dask(dask_cluster.address)
    try:
        backend = pool_module.get_pool()
        backend.client.wait_for_workers(4, timeout=60)
        assert len(_check_all(ip, 16)) >= 1
        run(ip, "%%pool setup\nMODEL = {'w': 3}\nEXTRA = 7\ndef predict(x):\n    return 3 * x\n")
        assert run(ip, "%pmap -q lambda x: EXTRA, range(4)") == [7] * 4
        assert str(mpmagic.pool_status()).count(", set up") == 4
        # A change while a run is in flight is refused, as on the local pool: the
        # plugin would reach every worker at once, tasks running or not.
        run(ip, "import time\ndef slow_extra(x):\n    time.sleep(0.05)\n    return EXTRA")
        handle = run(ip, "%pmap --bg -q --chunksize 1 slow_extra, range(24)")
        _wait_items(handle, 1)
        assert not handle.done()
        refused = ip.run_cell("%%pool setup\nEXTRA = 8", store_history=False).error_in_exec
        assert isinstance(refused, IPythonUsageError)
        assert str(refused).startswith(f"%%pool setup refused: 1 run is in flight (run {handle.id} (pmap slow_extra))")
        assert handle.result(60) == [7] * 24
        run(ip, "%pool restart")  # new worker processes: the plugin sets each of them up
        backend.client.wait_for_workers(4, timeout=60)
        assert run(ip, "%pmap -q --chunksize 1 lambda x: EXTRA, range(8)") == [7] * 8
        # A new backend on the same cluster: the old one's stop (which removes
        # its plugin and names) must not take the new one's setup away. (Through
        # its scheduler file: the same address again keeps the connection.)
        mpmagic.use_dask(scheduler_file=dask_cluster.scheduler_file)
        assert pool_module.get_pool() is not backend
        pool_module.get_pool().client.wait_for_workers(4, timeout=60)
        assert run(ip, "%pmap -q --chunksize 1 lambda x: EXTRA, range(8)") == [7] * 8
    finally:
        pool_module.shutdown()  # switching away removes the plugin and its names
    with Client(dask_cluster.address, set_as_default=False) as c:
        import builtins

        left = c.run(lambda: hasattr(builtins, "EXTRA"))
        assert not any(left.values())


def test_setup_runs_once_per_worker_on_a_stopped_pool(ip, method, tmp_path):
    pool_module.shutdown()
    try:
        run(ip, "%%pool setup\nimport os\nopen(os.path.join(" + repr(str(tmp_path)) + ", str(os.getpid())), 'a').write('x')\n"
                "RAN = True")
        backend = pool_module.get_pool()
        assert backend.running
        assert run(ip, "%pmap -q lambda x: RAN, range(4)") == [True] * 4
        marks = sorted(p.read_text() for p in tmp_path.iterdir())
        assert marks == ["x"] * len(backend.slots)  # each worker ran it once, not once per send
    finally:
        pool_module.shutdown()
        ensure_pool(method)


def test_setup_in_a_real_kernel():
    from test_kernel import Kernel

    k = Kernel()
    try:
        k.ok("%load_ext mpmagic")
        out = k.ok("%%pool setup\nMODEL = 5\nprint('loaded')").stream()
        assert "[worker 0] loaded" in out
        assert k.value("%pmap -q lambda x: MODEL + x, range(3)") == [5, 6, 7]
        bad = k.execute("%%pool setup\nMODEL = 5\nraise OSError('no model file')")
        assert bad.status == "error" and bad.ename == "MPMagicError"
        shown = [c for t, c in bad.outputs if t == "error"][0]["traceback"]
        assert len(shown) == 1 and ", %%pool setup, line 3 (`raise OSError('no model file')`): OSError: no model file (" \
            in shown[0], shown
        assert "setup failed" in k.ok("%pool").result()
    finally:
        k.close()


@pytest.mark.parametrize("method", ["forkserver"], scope="session")  # (a replacement gets the setup the same way whatever starts it)
def test_replacement_failing_setup_printed_once(ip, method, capfd):
    pool_module.shutdown()
    mpmagic.start_pool(2, method, max_tasks_per_child=1, wait=True)
    try:
        with pytest.raises(mpmagic.MPMagicError):
            run(ip, "%%pool setup\nimport mpmagic\nif mpmagic.worker_id() >= 0:\n    raise OSError('disk gone')")
        capfd.readouterr()
        assert run(ip, "%pmap -q --chunksize 1 abs, range(-3, 3)") == [3, 2, 1, 0, 1, 2]  # usable
        err = capfd.readouterr().err
        assert err.count("OSError: disk gone") == 1  # six new workers, one line
        assert ", %%pool setup, line 4 (`raise OSError('disk gone')`): OSError: disk gone" in err, err
    finally:
        pool_module.shutdown()
        ensure_pool(method)


def test_dask_setup_on_a_stopped_backend_runs_once(ip, dask_cluster, tmp_path):
    mpmagic.use_dask(dask_cluster.address)
    try:
        backend = pool_module.get_pool()
        backend.client.wait_for_workers(4, timeout=60)
        mpmagic.stop_pool()  # disconnected; %%pool setup connects again
        run(ip, "%%pool setup\nimport os\nopen(os.path.join(" + repr(str(tmp_path)) + ", str(os.getpid())), 'a').write('x')\n"
                "RAN = True")
        assert run(ip, "%pmap -q --chunksize 1 lambda x: RAN, range(8)") == [True] * 8
        assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["x"] * 4
    finally:
        pool_module.shutdown()


def test_setup_sees_the_notebooks_sys_path_and_cwd(ip, local_pool, tmp_path):
    """The setup runs with the notebook's world of now (context.py), as a task does."""
    (tmp_path / "setup_helper_mod.py").write_text("VALUE = 41\n")
    run(ip, f"import sys, os\nsys.path.append({str(tmp_path)!r})\n_old_cwd = os.getcwd()\nos.chdir({str(tmp_path)!r})")
    try:
        run(ip, "%%pool setup\nimport os\nfrom setup_helper_mod import VALUE\nWHERE = os.getcwd()\n")
        assert run(ip, "%pmap -q lambda x: (VALUE + x, WHERE), [1, 1]") == [(42, str(tmp_path))] * 2
    finally:
        run(ip, f"os.chdir(_old_cwd)\nsys.path.remove({str(tmp_path)!r})")


# --------------------------------------------------------------------------
# A setup change while runs are in flight: refused, so no run mixes two setups
# and no checkpoint stores a result under another setup's key.


def _wait_items(handle, n: int) -> None:
    deadline = time.monotonic() + 30
    while handle.items_done < n and not handle.done() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_setup_change_while_a_checkpointed_run_is_in_flight_is_refused(ip, tmp_path):
    """The tester's repro: a %%pool setup cell while a --bg --checkpoint run went on
    made the workers switch setups mid-run, and the items computed under the new
    setup were stored under the old one's key (a later run "resumed" them)."""
    ensure_pool("forkserver")
    run(ip, f"%config MPMagic.checkpoint_dir = {str(tmp_path)!r}")
    run(ip, "%%pool setup\nA = 10")
    run(ip, "import time\ndef usesA(x):\n    time.sleep(0.05)\n    return (x, A)")
    handle = run(ip, "%pmap --bg -q --checkpoint --chunksize 1 usesA, range(16)")
    _wait_items(handle, 2)
    assert not handle.done()
    refused = ip.run_cell("%%pool setup\nA = 99", store_history=False).error_in_exec
    assert isinstance(refused, IPythonUsageError) and "\n" not in str(refused)  # one line, no usage under it
    assert str(refused).startswith(f"%%pool setup refused: 1 run is in flight (run {handle.id} (pmap usesA))")
    assert f"%pool cancel {handle.id}" in str(refused) and "run.result()" in str(refused)
    clear = ip.run_cell("%pool setup clear", store_history=False).error_in_exec
    assert isinstance(clear, IPythonUsageError) and str(clear).startswith("%pool setup clear refused")
    with pytest.raises(UsageError, match=r"^on_worker_start\(dict\) refused"):
        mpmagic.on_worker_start(dict)
    assert worker_setup.describe() == "%%pool setup\nA = 10"  # nothing changed
    assert handle.result(30) == [(x, 10) for x in range(16)]  # one setup from first item to last
    run(ip, "%%pool setup\nA = 99")  # accepted once the run ended
    assert run(ip, "%pmap -q --checkpoint usesA, range(16)") == [(x, 99) for x in range(16)]
    run(ip, "%%pool setup\nA = 10")
    assert run(ip, "%pmap -q --checkpoint usesA, range(16)") == [(x, 10) for x in range(16)]
    assert "resumed: 16 of 16 items" in mpmagic.last_report().line()


def test_a_foreground_run_of_another_thread_counts_as_in_flight(ip):
    ensure_pool("forkserver")
    run(ip, "%%pool setup\nB = 1")
    run(ip, "import time\ndef usesB(x):\n    time.sleep(0.05)\n    return B")
    out: list = []
    t = threading.Thread(target=lambda: out.append(mpmagic.pmap(ip.user_ns["usesB"], range(12), chunksize=1)),
                         name="loader")
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not pool_module.get_pool().runs_in_flight() and time.monotonic() < deadline:
            time.sleep(0.005)
        refused = ip.run_cell("%pool setup clear", store_history=False).error_in_exec
    finally:
        t.join(30)
    assert isinstance(refused, IPythonUsageError)
    assert str(refused).startswith("%pool setup clear refused: 1 run is in flight (a pmap of usesB in thread "
                                   "'loader')") and "wait for it to end" in str(refused)
    assert out == [[1] * 12]  # every item with the setup it started with


def test_a_setup_changed_between_keying_and_the_start_stores_nothing(ip, tmp_path, monkeypatch):
    """Another thread changed the setup after the run was keyed and before it
    started: the run computes under the new setup, so nothing goes under the key."""
    from mpmagic import checkpoint

    ensure_pool("forkserver")
    run(ip, "%%pool setup\nC = 1")
    real = checkpoint.run_key

    def key_then_change(*args):
        out = real(*args)
        worker_setup.set_code("C = 2")  # (as another thread's %%pool setup would, with nothing in flight)
        return out

    monkeypatch.setattr(checkpoint, "run_key", key_then_change)
    run(ip, "def usesC(x):\n    return C")
    with pytest.warns(RuntimeWarning, match="the worker setup changed while this run of `usesC` started"):
        assert mpmagic.pmap(ip.user_ns["usesC"], range(6), checkpoint=tmp_path) == [2] * 6
    monkeypatch.setattr(checkpoint, "run_key", real)
    worker_setup.set_code("C = 1")
    assert mpmagic.pmap(ip.user_ns["usesC"], range(6), checkpoint=tmp_path) == [1] * 6
    checkpoint.close_stores()


def test_a_checkpointed_cell_is_keyed_by_the_setup(ip, tmp_path):
    """A %%parallel --checkpoint cell reads the setup's names as a map does; its key
    left the setup out, so a new setup got the old one's stored values."""
    ensure_pool("forkserver")
    run(ip, f"%config MPMagic.checkpoint_dir = {str(tmp_path)!r}")
    run(ip, "%%pool setup\nD = 1")
    assert list(run(ip, "%%parallel -q --checkpoint\nD + rank")) == [1, 2]
    run(ip, "%%pool setup\nD = 5")
    assert list(run(ip, "%%parallel -q --checkpoint\nD + rank")) == [5, 6]
    run(ip, "%%pool setup\nD = 1")
    assert list(run(ip, "%%parallel -q --checkpoint\nD + rank")) == [1, 2]
    assert "resumed: 2 of 2" in mpmagic.last_report().line()


def test_setup_names_of_builtins_are_refused_before_anything_is_sent(ip, local_pool):
    """`type = 'resnet50'` in a setup became the worker's builtin `type`: mpmagic's
    own worker code broke, the workers crash-looped and the cell hung."""
    before = worker_setup.version()
    with pytest.raises(IPythonUsageError) as info:
        run(ip, "%%pool setup\nimport os\ntype = 'resnet50'\nfor len in range(2):\n    pass\nMODEL = 1\n")
    text = str(info.value)
    assert "\n" not in text and "`len`, `type`" in text and "nothing was sent" in text
    assert "every library" in text and "another name" in text and "import numpy as np" in text
    assert worker_setup.version() == before  # nothing changed, nothing sent
    assert run(ip, "%pmap -q lambda x: type(x).__name__, [1, 'a']") == ["int", "str"]  # serially the same


def test_setup_names():
    names = setup_api.setup_names(
        "import os.path, numpy as np\nfrom math import floor as fl\nx, (y, z) = 1, (2, 3)\nw: int = 1\n"
        "def f(a=(q := 1)):\n    inner = 1\nclass C:\n    attr = 1\nif True:\n    with open('f') as h:\n        pass\n"
        "[c for c in range(3)]\nd = 1\ndel d\nfrom math import *\n")
    assert {"os", "np", "fl", "x", "y", "z", "w", "f", "q", "C", "h", "floor", "pi"} <= names
    assert not names & {"inner", "attr", "c", "d", "a"}


def test_builtin_names_made_at_run_time_are_a_setup_failure_in_the_worker():
    """Names the notebook cannot see in the text (exec, a star import, an
    on_worker_start dict): the worker refuses them before installing anything."""
    import builtins

    from mpmagic import payload

    real_sum, real_list = builtins.sum, builtins.list
    cases = [[worker_setup._Entry("code", "%%pool setup", "OK = 1\nexec('sum = 0')\n")],
             [worker_setup._Entry("code", "%%pool setup", "from mpmagic.fmt import *\nsum = max = 2\n")],
             [worker_setup._Entry("func", "_start", payload.dumps_function(lambda: {"list": [1], "OK": 1}, "_start"))]]
    try:
        for entries in cases:
            reply = worker_setup.run_setup(1, payload.dumps_data(entries), 7)
            assert reply.error is not None and reply.error.startswith("setup refused on worker 7: it defines `")
            assert "\n" not in reply.error and "import numpy as np" in reply.error
            assert reply.names == [] and not hasattr(builtins, "OK")
            assert builtins.sum is real_sum and builtins.list is real_list
    finally:
        worker_setup.run_setup(0, None, None)


def test_a_setup_error_without_a_message_or_without_a_str_is_one_line_as_python_shows_it():
    """An exception whose ``__str__`` raised killed the worker in its failure line (mpmagic's own
    traceback on stderr, then "the worker died while running it (exited ... with exit code 1)": the
    setup's error lost); one without a message read ``KeyboardInterrupt: ``. As Python's traceback
    shows them: ``E: <exception str() failed>``, ``KeyboardInterrupt``."""
    import builtins

    from mpmagic import payload

    cases = [("class E(Exception):\n    def __str__(self):\n        raise RuntimeError('no str')\nraise E()\n",
              ", %%pool setup, line 5 (`raise E()`): E: <exception str() failed> (the worker still runs"),
             ("raise KeyboardInterrupt\n", ", %%pool setup, line 2 (`raise KeyboardInterrupt`): KeyboardInterrupt (the "
                                           "worker still runs")]
    try:
        for source, said in cases:
            entries = [worker_setup._Entry("code", "%%pool setup", source, line_offset=1)]
            reply = worker_setup.run_setup(1, payload.dumps_data(entries), 7)
            assert reply.error is not None and reply.error.startswith("setup failed on worker 7" + said), reply.error
    finally:
        worker_setup.run_setup(0, None, None)
    assert not hasattr(builtins, "E")


def test_on_worker_start_refuses_a_function_whose_call_runs_nothing(ip):
    """An ``async def`` (or a generator function) given to on_worker_start: each worker's call only
    made a coroutine, never run ("RuntimeWarning: coroutine 'init' was never awaited", charged to
    mpmagic's context.py), the setup was reported done, and the tasks' names were missing."""
    run(ip, "import functools\nasync def init_async(path):\n    return {'MODEL': path}\n"
            "def init_gen():\n    yield {'MODEL': 1}\n")
    for call, name, kind in (("functools.partial(init_async, 'm.bin')", "init_async", "an async function"),
                             ("init_gen", "init_gen", "a generator function")):
        before = worker_setup.version()
        with pytest.raises(UsageError) as info:
            run(ip, f"mpmagic.on_worker_start({call})")
        text = str(info.value)
        assert text.startswith(f"on_worker_start: {name} is {kind}: "), text
        assert "runs nothing" in text and "\n" not in text, text
        assert worker_setup.version() == before and not worker_setup.has_setup()  # (nothing sent or set)


def test_on_worker_start_dict_with_a_builtin_name_fails_in_one_line(ip, local_pool):
    run(ip, "def _start():\n    return {'list': ['cat', 'dog'], 'TOKEN': 1}")
    with pytest.raises(mpmagic.MPMagicError, match=r"^setup refused on worker \d+: it defines `list`") as info:
        run(ip, "mpmagic.on_worker_start(_start)")
    assert "\n" not in str(info.value)
    assert run(ip, "%pmap -q lambda x: list(range(x)), [1, 2]") == [[0], [0, 1]]  # the pool works, builtins intact


def test_a_setup_that_kills_its_worker_fails_in_one_line(ip, local_pool):
    """It hung the cell: each replacement worker ran the setup and died, and the
    wait had no worker-death check."""
    start = time.monotonic()
    with pytest.raises(mpmagic.MPMagicError) as info:
        run(ip, "%%pool setup\nimport os\nos._exit(7)\n")
    text = str(info.value)
    assert time.monotonic() - start < 20
    assert "\n" not in text and "setup failed on worker" in text and "died while running it" in text
    assert "exit code 7" in text
    assert run(ip, "%pmap -q lambda x: x + 1, range(4)") == [1, 2, 3, 4]  # the new workers run without it
    assert str(mpmagic.pool_status()).count("setup failed") == len(local_pool.slots)
    with pytest.raises(NameError) as info:  # a bare NameError said nothing of the setup
        run(ip, "%pmap -q lambda x: KILLED_MODEL, range(2)")
    assert any("runs without the %%pool setup (it was not run there: it killed a worker; see %pool)" in n
               for n in info.value.__notes__)


def test_a_magic_line_in_the_setup_is_named_as_parallel_names_it(ip):
    body = "import math\n%matplotlib inline\nW = 1\n"
    errors = []
    for magic in ("%%pool setup", "%%parallel -n 2"):
        with pytest.raises(IPythonUsageError) as info:
            run(ip, f"{magic}\n{body}")
        errors.append(str(info.value))
    for text in errors:
        assert "line 3 of the cell ('%matplotlib inline') is IPython syntax (a magic)" in text, text
    assert "the setup runs plain Python in every worker: call the function instead" in errors[0]
    with pytest.raises(IPythonUsageError, match="the setup cell has a syntax error on line 3: "):
        run(ip, "%%pool setup\nA = 1\nB = 1 +\n")


def test_a_builtin_name_bound_to_the_builtin_itself_is_not_refused():
    import builtins

    from mpmagic import payload

    entries = [worker_setup._Entry("code", "%%pool setup", "from builtins import len\nOK_NAME = len('ab')\n")]
    try:
        reply = worker_setup.run_setup(1, payload.dumps_data(entries), 7)
        assert reply.error is None and vars(builtins)["OK_NAME"] == 2
    finally:
        worker_setup.run_setup(0, None, None)
    assert not hasattr(builtins, "OK_NAME")


def test_dask_setup_that_kills_its_worker_is_unregistered_in_one_line():
    """On Dask the registration raised a CommClosedError traceback and left the
    plugin registered: the nanny restarted the worker into the setup, in a loop."""

    class Client:
        removed = False

        def register_plugin(self, plugin, name):
            raise OSError("Stream is closed")  # (distributed's CommClosedError is an OSError)

        def unregister_worker_plugin(self, name):
            Client.removed = name == worker_setup.PLUGIN_NAME

        def run(self, func, on_error="raise"):  # (asked again after the death: its replacement died too)
            return {"tcp://127.0.0.1:1": OSError("Stream is closed")} if on_error == "return" else {}

    worker_setup.set_code("X = 1\n")
    errors = worker_setup.dask_apply(Client())
    assert Client.removed and len(errors) == 1 and "\n" not in errors[0]
    assert "a worker died while running it" in errors[0] and "unregistered" in errors[0]


def test_start_pool_takes_gpus_as_the_magic_does(local_pool):
    """``start_pool(gpus=)`` (the API had none): each worker gets its device, as
    ``%pool start --gpus 0,1`` gives it (test_gpus_round_robin), and a change restarts them."""
    mpmagic.start_pool(workers=2, gpus=[0, 1], wait=True)
    by_worker = dict(mpmagic.pmap(_device, range(8), chunksize=1))
    assert set(by_worker.values()) <= {"0", "1"} and len(set(by_worker.values())) == len(by_worker)
    assert "GPU 0" in str(mpmagic.pool_status())
    mpmagic.start_pool(gpus="1", wait=True)
    assert {gpu for _, gpu in mpmagic.pmap(_device, range(4), chunksize=1)} == {"1"}


def _device(_: int) -> tuple:
    import os
    import time

    time.sleep(0.02)
    return mpmagic.worker_id(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_a_slow_setup_in_new_workers_is_no_items_timeout(ip, pool2):
    """A restarted (recycled, replacing) worker's setup ran before its first item,
    and that item's --timeout clock started with it: quick items "ran past the
    timeout", their workers were replaced and set up again, in a loop."""
    run(ip, "%%pool setup\nimport time\ntime.sleep(0.6)\nSLOW = 1\n")
    run(ip, "%pool restart")  # returns while the new workers are still setting up
    replaced = pool2.workers_replaced
    assert run(ip, "%pmap -q --timeout 0.2 lambda x: x + SLOW, range(6)") == [x + 1 for x in range(6)]
    assert pool2.workers_replaced == replaced
    with pytest.raises(mpmagic.TaskTimeoutError):  # the clock still runs once the setup is done
        run(ip, "%pmap -q --timeout 0.2 lambda x: time.sleep(x), [0, 5]")


def test_a_setup_that_never_ends_fails_the_timed_items_behind_it(ip, pool2, tmp_path, monkeypatch):
    """A setup stuck in new workers (a stalled download): the items queued behind
    it, whose --timeout clocks start only once it is done, waited for ever."""
    from mpmagic.backends import local
    monkeypatch.setattr(local, "_SETUP_WAIT_MIN", 0.5)  # (30 s; here max(0.5, 1 x 0.2 s))
    monkeypatch.setattr(local, "_SETUP_WAIT_TIMES", 1.0)
    stall = tmp_path / "STALL"
    run(ip, f"%%pool setup\nimport os, time\nwhile os.path.exists({str(stall)!r}):\n    time.sleep(0.02)\nSTALLED = 0\n")
    stall.touch()
    run(ip, "%pool restart")  # the new workers' setups wait for the file to go
    out = run(ip, "%pmap -q --errors collect --timeout 0.2 --chunksize 1 lambda x: x + STALLED, range(2)")
    assert [type(r.error) for r in out] == [mpmagic.WorkerLostError] * 2
    assert "'s %%pool setup still ran after 0.5 s (--timeout 0.2 s per item), so it did not start; " \
           "the worker was replaced" in str(out[0].error)
    stall.unlink()  # the replacements' setups end: the pool is usable
    assert run(ip, "%pmap -q --timeout 0.2 lambda x: x + STALLED, range(4)") == [0, 1, 2, 3]


def test_checkpoint_stores_no_results_of_a_worker_whose_setup_failed(ip, local_pool, tmp_path):
    """A setup that failed on one worker (a busy file) gave mixed results, stored
    under the key of that setup's text: once it worked, the same run returned them."""
    busy = tmp_path / "BUSY"
    busy.touch()
    wid = local_pool.slots[1].wid
    setup = (f"%%pool setup\nimport os, mpmagic\nSETUP_SCALE = 1\nif mpmagic.worker_id() == {wid} and "
             f"os.path.exists({str(busy)!r}):\n    raise OSError('busy')\nSETUP_SCALE = 3\n")
    assert ip.run_cell(setup, store_history=False).error_in_exec is not None  # failed on one worker
    run(ip, f"%config MPMagic.checkpoint_dir = {str(tmp_path / 'ck')!r}")
    run(ip, "import time\ndef scaled(x):\n    time.sleep(0.02)\n    return SETUP_SCALE * x")
    with pytest.warns(RuntimeWarning, match=r"came from workers that run without the %%pool setup .* not stored"):
        mixed = run(ip, "%pmap -q --checkpoint --chunksize 1 scaled, range(8)")
    assert mixed != [3 * x for x in range(8)]  # (both workers ran items)
    # A cell: only the rank on that worker is named (it said "the ranks' values ... came from workers that run without")
    with pytest.warns(RuntimeWarning) as caught:
        ids = run(ip, "%%parallel -q --checkpoint -n 2\nmpmagic.worker_id()")
    rank = list(ids).index(wid)
    assert [str(w.message) for w in caught] == [
        f"mpmagic: --checkpoint: rank {rank} ran on a worker without the %%pool setup (it failed there: see %pool), "
        "so this cell's values were not stored; a run once the setup works computes them"]
    busy.unlink()
    run(ip, setup)  # the same text, now set up everywhere
    plain = run(ip, "%pmap -q --chunksize 1 scaled, range(8)")
    assert plain == [3 * x for x in range(8)]
    assert run(ip, "%pmap -q --checkpoint --chunksize 1 scaled, range(8)") == plain
    assert run(ip, "%pmap -q --checkpoint --chunksize 1 scaled, range(8)") == plain  # (now stored)
    assert "resumed: 8 of 8 items" in mpmagic.last_report().line()


SETUP_QUIET = ("import warnings, sys\nwarnings.filterwarnings('ignore', message='mpm-noisy')\n"
               "sys.setrecursionlimit(4321)\n")
PROBE = ("def _probe(x):\n    import warnings, sys\n    with warnings.catch_warnings(record=True) as w:\n"
         "        warnings.warn('mpm-noisy library', UserWarning)\n    return len(w), sys.getrecursionlimit()\n")


def test_a_setups_warnings_filters_and_recursion_limit_win(ip, capfd):
    """The notebook's filters and limit were put back at every call, undoing a
    setup's filterwarnings("ignore") and setrecursionlimit: now the oracle
    (the setup's code, then map) holds, also after the same setup runs again."""
    import sys
    import warnings

    ensure_pool("forkserver")
    ns: dict = {}
    limit = sys.getrecursionlimit()
    with warnings.catch_warnings():
        try:
            exec(SETUP_QUIET + PROBE, ns)
            serial = list(map(ns["_probe"], range(4)))
        finally:
            sys.setrecursionlimit(limit)
    assert serial == [(0, 4321)] * 4
    run(ip, PROBE)
    for _ in range(2):  # (running the same cell again kept nothing of it: its changes were the "before")
        run(ip, "%%pool setup\n" + SETUP_QUIET)
        assert run(ip, "%pmap -q --chunksize 1 _probe, range(4)") == serial
    run(ip, "import warnings\n%pmap -q lambda x: warnings.warn('mpm-noisy unrecorded'), range(2)")
    assert "mpm-noisy" not in "".join(capfd.readouterr())
    run(ip, "%pool setup clear")
    assert run(ip, "%pmap -q --chunksize 1 _probe, range(4)") == [(1, limit)] * 4


def test_replacing_a_setup_says_what_running_workers_keep(ip, capsys):
    """A new setup or clear drops the old one's names, not its imports and
    patches: one line says so when running workers had run it (not for the
    same setup again)."""
    ensure_pool("forkserver")
    run(ip, "%%pool setup\nimport json\njson.MPM_PATCHED = 1\n")
    run(ip, "%%pool setup\nimport json\njson.MPM_PATCHED = 1\n")
    assert "keep what earlier setups did" not in capsys.readouterr().out
    run(ip, "%%pool setup\nOTHER = 2\n")
    assert capsys.readouterr().out.count("keep what earlier setups did to modules and sys.path") == 1
    run(ip, "%pool setup clear")
    out = capsys.readouterr().out
    assert out.startswith("worker setup removed") and "%pool restart for a clean start" in out


def test_a_setup_is_the_workers_main_module_while_it_runs(ip):
    """@dataclass failed in a setup (its namespace was no module in sys.modules)
    and `if __name__ == "__main__":` was skipped: as in the notebook, both work,
    and instances of its classes come back to the notebook."""
    ensure_pool("forkserver")
    for name in ("CFG", "MODEL", "Config"):  # (an earlier file's notebook names would win: test_fidelity_worker's CFG)
        ip.user_ns.pop(name, None)
    run(ip, "%%pool setup\nfrom dataclasses import dataclass\n@dataclass\nclass Config:\n    scale: int = 3\n"
            "CFG = Config()\nif __name__ == '__main__':\n    MODEL = 'loaded'\n")
    assert run(ip, "%pmap -q lambda x: (CFG.scale * x, MODEL), range(3)") == [(0, "loaded"), (3, "loaded"), (6, "loaded")]
    back = run(ip, "%pmap -q lambda x: Config(x), range(2)")
    assert [c.scale for c in back] == [0, 1] and type(back[0]).__name__ == "Config"
    run(ip, "def _main_has_it(x):\n    import sys\n    return 'CFG' in vars(sys.modules['__main__'])")
    assert run(ip, "%pmap -q _main_has_it, range(2)") == [False, False]  # (the worker's own __main__ is back)


def test_a_setup_that_seeds_alike_says_so_once(ip, capsys):
    """Seeding in a setup gave every worker the same stream, against the guide's
    word: mpmagic does not reseed over it, one line says so and points to --seed.
    (spawn: workers that share no hash salt, nor None's address before 3.12.)"""
    ensure_pool("spawn")
    run(ip, "%%pool setup\nimport random\nrandom.seed(0)\n")
    out = capsys.readouterr().out
    assert out.count("the same state of random") == 1 and "--seed" in out
    a, b = run(ip, "%%parallel -n 2 -q\nrandom.random()")  # (what the line warns of: one rank per worker)
    assert a == b
    run(ip, "%%pool setup\nimport random, mpmagic\nrandom.seed(mpmagic.worker_id())\nX = random.random()\n")
    assert "the same state of" not in capsys.readouterr().out


def test_on_worker_start_globals_are_what_tasks_read(ip, any_method):
    """The port of ``Pool(initializer=init, initargs=(3,))``: what ``init`` assigns with
    ``global`` is what tasks read, as with Pool (fork and spawn), also over the notebook's
    own ``model`` the task's function carries (migrate14: it gave [0, 1, 2], silently)."""
    ensure_pool(any_method)
    run(ip, "import functools\nmodel = {'w': 1}\n"
            "def _init(w):\n    global model, _only_there\n    model = {'w': w}\n    _only_there = 10 * w\n"
            "def _predict(x):\n    return model['w'] * x, _only_there\n"
            "def _w(x):\n    return model['w']\n"
            "calls = 0\ndef _counting(x):\n    global calls\n    calls += 1\n    return model['w'] * x\n")
    assert run(ip, "%pmap -q _w, range(2)") == [1, 1]  # (loaded and kept before the setup)
    run(ip, "mpmagic.on_worker_start(functools.partial(_init, 3))")
    assert run(ip, "%pmap -q _predict, range(3)") == [(0, 30), (3, 30), (6, 30)]
    assert run(ip, "%pmap -q _w, range(2)") == [3, 3]
    for _ in range(2):  # a function assigning a global is loaded again per call: the setup's value again
        assert run(ip, "%pmap -q _counting, range(3)") == [0, 3, 6]
    assert list(run(ip, "%%parallel -n 2 -q\nmodel['w']")) == [3, 3]
    run(ip, "%pool setup clear")  # the notebook's value again
    assert run(ip, "%pmap -q _w, range(2)") == [1, 1]


SETUP_LOGGING = """
import logging
logging.getLogger().setLevel(logging.INFO)
_h = logging.StreamHandler()
_h.setFormatter(logging.Formatter("setup %(levelname)s:%(name)s:%(message)s"))
logging.getLogger("mpm.setuplog").addHandler(_h)
logging.getLogger("mpm.setuplog").propagate = False
"""
LOGS = ("import logging\ndef _logs(x):\n    logging.getLogger('mpm.setuplog').warning('item %s', x)\n"
        "    return logging.getLogger('mpm.setuplog').getEffectiveLevel()")


@pytest.mark.parametrize("method", ["fork", "forkserver"], scope="session")
def test_a_handler_and_root_level_the_setup_made_act_in_tasks(ip, local_pool, capsys):
    """A StreamHandler made while the setup ran kept the setup's temporary output
    buffer as its stream: its records never showed, and piled up in the worker
    for good. And the setup's root level was replaced by the notebook's at each
    call. The oracle: the setup's code, then map, serially."""
    import logging

    run(ip, LOGS)
    run(ip, "%%pool setup\n" + SETUP_LOGGING)
    capsys.readouterr()
    levels = run(ip, "%pmap -q --chunksize 1 _logs, range(4)")
    parallel = capsys.readouterr().err.splitlines()
    root, logger = logging.getLogger(), logging.getLogger("mpm.setuplog")
    level = root.level
    try:
        run(ip, SETUP_LOGGING)
        assert run(ip, "list(map(_logs, range(4)))") == [logging.INFO] * 4
        serial = capsys.readouterr().err.splitlines()
    finally:
        root.setLevel(level)
        logger.handlers.clear()
        logger.propagate = True
    assert serial == [f"setup WARNING:mpm.setuplog:item {x}" for x in range(4)]
    assert sorted(parallel) == serial
    assert levels == [logging.INFO] * 4
    run(ip, "%pool setup clear")  # the notebook's root level again
    assert run(ip, "%pmap -q --chunksize 1 _logs, range(4)") == [logging.WARNING] * 4


SETUP_BASIC = "import logging\nlogging.basicConfig(level=logging.INFO, format='setup %(levelname)s:%(name)s:%(message)s')\n"
INFO_LOGS = "import logging\ndef _info(x):\n    logging.getLogger('mpm.twice').info('item %s', x)\n    return x\n"


@pytest.mark.parametrize("method", ["forkserver"], scope="session")
def test_a_record_the_setups_console_handler_prints_shows_once(ip, local_pool, capsys, tmp_path):
    """``logging.basicConfig`` in ``%%pool setup`` beside a console handler of the
    notebook's own printed each task record twice: the setup's handler wrote it to
    the task's output and mpmagic's line for the notebook's handler showed it again.
    Serially the setup's ``basicConfig`` finds the root's handler and does nothing:
    one line a record. Here it is the setup's handler's line (in the setup's format:
    the worker cannot know whether the notebook has a console handler); the
    notebook's other handlers (a file) still get each record."""
    import logging

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("notebook %(levelname)s:%(name)s:%(message)s"))
    to_file = logging.FileHandler(tmp_path / "nb.log")
    level = root.level
    root.addHandler(console)
    root.addHandler(to_file)
    root.setLevel(logging.INFO)
    try:
        run(ip, INFO_LOGS)
        run(ip, "%%pool setup\n" + SETUP_BASIC)
        capsys.readouterr()
        assert run(ip, "%pmap -q --chunksize 1 _info, range(3)") == [0, 1, 2]
        parallel = [line for line in capsys.readouterr().err.splitlines() if "mpm.twice" in line]
        run(ip, SETUP_BASIC)  # serially: a root with handlers already, so nothing
        assert run(ip, "list(map(_info, range(3)))") == [0, 1, 2]
        serial = [line for line in capsys.readouterr().err.splitlines() if "mpm.twice" in line]
    finally:
        root.removeHandler(console)
        root.removeHandler(to_file)
        to_file.close()
        root.setLevel(level)
        run(ip, "%pool setup clear")
        run(ip, "%pool restart")  # (running workers keep the setup's handler: the next tests get new ones)
    assert serial == [f"notebook INFO:mpm.twice:item {x}" for x in range(3)]
    # One line a record, not two: the setup's handler's (its format: mpmagic does
    # not write the record's line for the notebook's console handler again).
    assert sorted(parallel) == [f"setup INFO:mpm.twice:item {x}" for x in range(3)]
    logged = (tmp_path / "nb.log").read_text().splitlines()
    assert sorted(logged) == sorted([f"item {x}" for x in range(3)] * 2), logged  # (the parallel run's and the serial)


def test_a_setup_runs_where_its_cell_ran_in_every_later_worker(ip, local_pool, tmp_path, monkeypatch):
    """A setup ran again in each new worker (a restart, a replacement) in the
    notebook's directory and environment of *that* moment: after a ``%cd
    ../expB`` one run mixed the setup of expA/cfg.txt with that of expB/cfg.txt,
    and a relative ``os.chdir("data")`` failed on every new worker. Serially the
    setup cell ran once, where it was run; tasks follow the notebook's later %cd."""
    for name in ("expA", "expB"):
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "cfg.txt").write_text(name[-1])
    ip.user_ns.pop("CFG", None)  # (an earlier file's notebook CFG would win, as serially: test_fidelity_worker's)
    monkeypatch.setenv("MPM_SETUP_CFG", "A")
    monkeypatch.chdir(tmp_path / "expA")
    setup = ("%%pool setup\nimport os\nCFG = open('cfg.txt').read() + os.environ['MPM_SETUP_CFG']\n"
             "os.environ['MPM_SETUP_SET'] = 'setup'\n")
    run(ip, setup)
    serial_cfg = open("cfg.txt").read() + os.environ["MPM_SETUP_CFG"]  # (what the cell read, run here)
    run(ip, "%cd -q ../expB")
    monkeypatch.setenv("MPM_SETUP_CFG", "B")
    run(ip, "import os\ndef seen(x):\n    return CFG, open('cfg.txt').read(), os.environ['MPM_SETUP_CFG'], "
            "os.environ['MPM_SETUP_SET']\n")
    serial = [(serial_cfg, "B", "B", "setup")] * 4
    assert run(ip, "%pmap -q --chunksize 1 seen, range(4)") == serial  # the workers that ran it
    run(ip, "%pool restart")  # new workers: the setup runs again, where its cell ran
    assert run(ip, "%pmap -q --chunksize 1 seen, range(4)") == serial
    # A relative os.chdir in the setup: from the cell's directory, in every later worker too
    run(ip, "%cd -q ../expA")
    run(ip, "%%pool setup\nimport os\nos.chdir('data')\n")
    run(ip, "%cd -q ../expB")
    run(ip, "%pool restart")
    assert run(ip, "%pmap -q --chunksize 1 lambda x: os.getcwd(), range(2)") == [str(tmp_path / "expA" / "data")] * 2


def test_a_setup_functions_line_is_its_own_in_its_cells_world(ip, local_pool, tmp_path, monkeypatch):
    """An on_worker_start function runs in the world of its call too, and its
    failure still names its own line (not mpmagic's frames that run it there)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "path.txt").write_text("x")
    run(ip, "def _init_reads():\n    import os\n    assert os.path.exists('path.txt')\n    raise OSError('no')\n")
    with pytest.raises(mpmagic.MPMagicError, match=r"_init_reads, line 4: OSError: no"):
        run(ip, "mpmagic.on_worker_start(_init_reads)")


def test_clearing_a_setup_that_never_ends_replaces_its_workers(ip, local_pool, tmp_path, capsys):
    """After an interrupted ``%%pool setup`` that hung (a stalled download), its
    documented way out, ``%pool setup clear``, waited for it without a word, for
    ever: now it replaces the workers still running it, and says so."""
    stall = tmp_path / "STALL"
    # (the setup gives up after 60 s, so that a clear that waits fails here, not hangs)
    run(ip, f"%%pool setup\nimport os, time\nt = time.time() + 60\nwhile os.path.exists({str(stall)!r}) "
            "and time.time() < t:\n    time.sleep(0.02)\nSTALLED = 0\n")
    stall.touch()
    run(ip, "%pool restart")  # the new workers' setups wait for the file to go
    old = {s.wid for s in local_pool.slots}
    capsys.readouterr()
    run(ip, "%pool setup clear")
    out = capsys.readouterr().out
    assert f"mpmagic: stopped workers {' and '.join(str(w) for w in sorted(old))}, which were still running the " \
           "earlier setup (it would have run to its end first), and started new ones in their place" in out
    assert "running workers keep" not in out  # (none of them ran it)
    assert not old & {s.wid for s in local_pool.slots}
    assert run(ip, "%pmap -q lambda x: x + 1, range(4)") == [1, 2, 3, 4]


def _workers_in_a_stalled_setup(ip, tmp_path, monkeypatch):
    """Restart the pool into a setup that waits while the file ``STALL`` exists (a line about
    the wait comes after 0.1 s): (mpmagic.backends.local, that file, the backend's own
    ``_say_setup_waits``, for a test to wrap)."""
    from mpmagic.backends import local

    monkeypatch.setattr(local, "_SETUP_NOTE_AFTER", 0.1)
    stall = tmp_path / "STALL"
    run(ip, f"%%pool setup\nimport os, time\nt = time.time() + 60\nwhile os.path.exists({str(stall)!r}) "
            "and time.time() < t:\n    time.sleep(0.02)\nSTALLED = 0\n")
    stall.touch()
    run(ip, "%pool restart")
    return local, stall, local.LocalBackend._say_setup_waits


def test_a_run_waiting_for_a_setup_says_so(ip, local_pool, tmp_path, monkeypatch, capsys):
    """An untimed run behind a setup that hung sat at 0% for ever with no word:
    one line says the workers still run the setup, and how to get out."""
    local, stall, say = _workers_in_a_stalled_setup(ip, tmp_path, monkeypatch)

    def said(self, slot, now):  # (the line is out: the setup may end now)
        say(self, slot, now)
        stall.unlink(missing_ok=True)

    monkeypatch.setattr(local.LocalBackend, "_say_setup_waits", said)
    capsys.readouterr()
    assert run(ip, "%pmap -q lambda x: x + STALLED, range(4)") == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert err.count("is still running the worker setup") == 1, err
    assert ("and this run's items sent to it wait for it to end; Ctrl-C stops the wait, then %pool setup clear "
            "removes the setup and replaces the workers still running it") in err


def test_a_setups_name_error_for_a_notebook_variable_says_why(ip, local_pool):
    run(ip, "MPM_MODEL_PATH = 'model.bin'")
    with pytest.raises(mpmagic.MPMagicError) as failed:
        run(ip, "%%pool setup\nMODEL = MPM_MODEL_PATH\n")
    assert str(failed.value).endswith(
        "\nmpmagic: MPM_MODEL_PATH is a notebook variable: a %%pool setup cell runs in the workers without the "
        "notebook's names (it runs again, on its own, in every worker started later); define it in the setup "
        "cell, or pass its value to a setup function: mpmagic.on_worker_start(functools.partial(init, MPM_MODEL_PATH))")
    with pytest.raises(mpmagic.MPMagicError) as failed:  # (a name the notebook lacks: no such line)
        run(ip, "%%pool setup\nMODEL = MPM_NO_SUCH_NAME\n")
    assert "\n" not in str(failed.value)


def test_a_setups_annotations_are_objects_as_serially(ip, local_pool):
    """Code of ``%%pool setup`` is compiled as a cell is, without mpmagic's own
    ``from __future__ import annotations``: a function it defines has its
    annotations as objects in the tasks (they were strings: tester-parallel22)."""
    run(ip, "%%pool setup\ndef typed(a: int) -> float:\n    return a\n")
    assert run(ip, "%pmap -q lambda x: typed.__annotations__, range(2)") == [{"a": int, "return": float}] * 2
LAZY_SETUP = """
MODEL = None
def get_model():
    global MODEL
    if MODEL is None:
        MODEL = {"w": 3}          # stands for an expensive load
    return MODEL
N = 0
def bump():
    global N, LATER
    N += 1
    LATER = N
    return N
def read_n():
    return N
"""


def test_a_setup_functions_global_rebinding_is_what_tasks_read(ip, any_method):
    """The lazy-load idiom: a setup function rebinds a setup global, and the task reads
    the global. The setup's names were copied into builtins once, when it ended, so the
    task read ``MODEL`` as None (TypeError on every item) where serial code (the setup
    run once, then ``map``) reads the loaded model; also in %%parallel, on every start method."""
    ensure_pool(any_method)
    for name in ("MODEL", "N", "LATER", "get_model", "bump", "read_n"):
        ip.user_ns.pop(name, None)
    serial: dict = {}
    exec(LAZY_SETUP, serial)
    exec("def task(x):\n    get_model()\n    return MODEL['w'] * x\n"
         "def counts(x):\n    b = bump()\n    return b == N == read_n() == LATER", serial)
    run(ip, "%%pool setup\n" + LAZY_SETUP)
    run(ip, "def _lazy_task(x):\n    get_model()\n    return MODEL['w'] * x\n"
            "def _counts(x):\n    b = bump()\n    return b == N == read_n() == LATER")
    assert run(ip, "%pmap -q _lazy_task, range(4)") == list(map(serial["task"], range(4))) == [0, 3, 6, 9]
    assert run(ip, "%pmap -q --chunksize 2 _counts, range(6)") == list(map(serial["counts"], range(6)))
    assert list(run(ip, "%%parallel -n 2 -q\nget_model()\nMODEL['w'] + rank")) == [3, 4]
    run(ip, "%pool setup clear")  # a name a setup function made later (LATER) goes with the setup
    run(ip, "def _has_later(x):\n    import builtins\n    return hasattr(builtins, 'LATER'), hasattr(builtins, 'MODEL')")
    assert run(ip, "%pmap -q _has_later, range(2)") == [(False, False), (False, False)]


def test_a_setup_functions_global_rebinding_is_what_tasks_read_on_dask(ip, dask_cluster):
    """The same on Dask, whose plugin runs the setup in each worker process."""
    for name in ("MODEL", "N", "LATER", "get_model", "bump", "read_n"):
        ip.user_ns.pop(name, None)
    mpmagic.use_dask(dask_cluster.address)
    try:
        pool_module.get_pool().client.wait_for_workers(4, timeout=60)
        run(ip, "%%pool setup\n" + LAZY_SETUP)
        run(ip, "def _lazy_task(x):\n    get_model()\n    return MODEL['w'] * x")
        assert run(ip, "%pmap -q _lazy_task, range(4)") == [0, 3, 6, 9]
    finally:
        pool_module.shutdown()


def test_a_notebook_name_still_wins_over_a_rebound_setup_global(ip, local_pool):
    """The guide's rule stays: a name the notebook defines is the notebook's in its
    function (cloudpickle sends it along), also after a setup function rebinds its own."""
    run(ip, "%%pool setup\n" + LAZY_SETUP)
    run(ip, "MODEL = {'w': 100}\ndef _nb_wins(x):\n    get_model()\n    return MODEL['w'] * x, get_model()['w']")
    try:
        assert run(ip, "%pmap -q _nb_wins, range(3)") == [(0, 3), (100, 3), (200, 3)]
    finally:
        ip.user_ns.pop("MODEL", None)


def test_a_failing_task_reading_a_notebook_name_the_setup_also_defines_says_whose_it_was(ip, local_pool):
    """The notebook's ``MODEL = None`` (bound after the setup too) is sent with the function
    and wins over the setup's, as serially: a task failing on it said only ``TypeError:
    'NoneType' object is not subscriptable``. Its error names whose ``MODEL`` it read; a
    failure of a function reading no such name gets no note."""
    run(ip, "%%pool setup\nMODEL = {'a': 1}\nOTHER = 2\n")
    run(ip, "MODEL = None\nOTHER = 0")
    try:
        with pytest.raises(TypeError) as info:
            run(ip, "%pmap -q lambda x: MODEL[x], ['a']")
        assert [n for n in info.value.__notes__ if "setup's" in n] == [
            "mpmagic: MODEL here is the notebook's (None), sent with the function, not the %%pool setup's: "
            "del MODEL in the notebook to use the setup's"]
        run(ip, "def _over(x):\n    return x / OTHER\ndef _f(x):\n    return _over(x) if MODEL is None else 0")
        with pytest.raises(ZeroDivisionError) as info:
            run(ip, "%pmap -q _f, [1]")
        assert [n for n in info.value.__notes__ if "setup's" in n] == [
            "mpmagic: OTHER here is the notebook's (0), sent with the function, not the %%pool setup's: "
            "del OTHER in the notebook to use the setup's"]  # (the raising function's names: not _f's MODEL)
        with pytest.raises(ZeroDivisionError) as info:
            run(ip, "%pmap -q lambda x: x / 0, [1]")
        assert not any("setup's" in n for n in getattr(info.value, "__notes__", ()))
        run(ip, "del MODEL")
        assert run(ip, "%pmap -q lambda x: MODEL[x], ['a']") == [1]
    finally:
        ip.user_ns.pop("MODEL", None)
        ip.user_ns.pop("OTHER", None)


def test_a_setup_function_declaring_a_builtin_global_is_refused_before_sending(ip, local_pool):
    """Its ``global sum; sum = 0`` would rebind the worker's builtin ``sum`` when a task calls it."""
    before = worker_setup.version()
    with pytest.raises(IPythonUsageError) as info:
        run(ip, "%%pool setup\ndef reset():\n    global sum\n    sum = 0\n")
    assert "`sum`" in str(info.value) and "nothing was sent" in str(info.value)
    assert worker_setup.version() == before
    assert "CACHE" in setup_api.setup_names("def f():\n    global CACHE\n    CACHE = {}\n")


def test_a_setup_runs_in_the_builtins_and_leaves_them_as_they_were_but_its_names():
    """The setup's globals are the worker's builtins (its functions rebind what tasks
    read): running it there leaves no trace but its names; a patch of the builtins
    module (``builtins.print = f``) is no name of it and is not refused."""
    import builtins

    from mpmagic import payload

    space, main = dict(vars(builtins)), sys.modules["__main__"]
    source = ('"""The setup."""\nfrom __future__ import annotations\nimport builtins\n_real_abs = builtins.abs\n'
              "builtins.abs = lambda x: _real_abs(x) + 1\nW: int = 2\nNAME = __name__\n"
              "def set_w(v):\n    global W, EXTRA\n    W = EXTRA = v\n")
    try:
        reply = worker_setup.run_setup(1, payload.dumps_data([worker_setup._Entry("code", "%%pool setup", source)]), 7)
        assert reply.error is None and reply.names == ["NAME", "W", "_real_abs", "annotations", "builtins", "set_w"]
        assert builtins.abs(-1) == 2 and vars(builtins)["NAME"] == "__main__"
        vars(builtins)["set_w"](5)
        assert vars(builtins)["W"] == vars(builtins)["EXTRA"] == 5
        assert builtins.__name__ == "builtins" and builtins.__doc__ == space["__doc__"]
        assert sys.modules["__main__"] is main and type(builtins) is type(sys)
        assert "__builtins__" not in vars(builtins) and "__annotations__" not in vars(builtins)
    finally:
        worker_setup.run_setup(0, None, None)
        builtins.abs = space["abs"]
    assert vars(builtins) == space  # its names (EXTRA, bound later, too) gone with it


def test_a_run_that_waited_for_a_slow_setup_says_so_not_a_transfer_cost(ip, local_pool, tmp_path, monkeypatch):
    """The docs say a slow setup is no item's time: its wait was read as the cost of
    sending a chunk ("sending and collecting a chunk cost ~2.50 s", speedup <0.1x)."""
    local, stall, say = _workers_in_a_stalled_setup(ip, tmp_path, monkeypatch)

    def said(self, slot, now):  # the run's items are in flight behind the setup: they wait 0.3 s more at least
        say(self, slot, now)
        time.sleep(0.3)
        stall.unlink(missing_ok=True)

    monkeypatch.setattr(local.LocalBackend, "_say_setup_waits", said)
    assert run(ip, "%pmap -q lambda x: x + STALLED, range(4)") == [0, 1, 2, 3]
    report = mpmagic.last_report()
    assert report.waited_for_setup >= 0.3 and report.setup_wait_seconds >= report.waited_for_setup
    assert "for the %%pool setup" in report.line()
    assert "transfer cost" not in (report.advice or "") and "sending" not in (report.advice or "")


def test_a_new_setup_after_a_clear_replaces_no_worker_for_the_removal_it_was_sent(ip, local_pool, capsys):
    """After ``%pool setup clear``, a worker still to answer the empty "setup removed"
    message was counted as running the earlier setup: a new ``%%pool setup`` killed
    workers that were only starting ("stopped workers 2 and 3, which were still
    running the earlier setup") though no setup was installed."""
    run(ip, "%%pool setup\nA_SETUP = 1\n")
    run(ip, "%pool setup clear")
    with local_pool._lock:  # (the manager reads no answer meanwhile: the removal stays pending)
        worker_setup.clear()  # (a new version of "no setup": sent to every worker again)
        for slot in local_pool.slots:
            local_pool._send_setup(slot)
        assert all(slot.setups_ahead for slot in local_pool.slots)
        assert local_pool.replace_setting_up() == []
    capsys.readouterr()
    run(ip, "%%pool setup\nB_SETUP = 2\n")
    assert "which were still running the earlier setup" not in capsys.readouterr().out
    assert run(ip, "%pmap -q lambda x: x + B_SETUP, range(2)") == [2, 3]


def test_a_failing_partial_setup_is_named_by_its_function(ip, local_pool):
    """``on_worker_start(functools.partial(init, path))``, the port of ``Pool(initializer=,
    initargs=)`` the docs recommend, was named by its repr with an address
    (``functools.partial(<function init at 0x7f...>, '/nonexistent/file')``) where the
    docs promise ``init, line N``; ``%pool setup`` showed the same repr."""
    run(ip, "import functools\ndef _init_opens(path):\n    global HANDLE\n    HANDLE = open(path)\n")
    with pytest.raises(mpmagic.MPMagicError) as info:
        run(ip, "mpmagic.on_worker_start(functools.partial(_init_opens, '/nonexistent/file'))")
    text = str(info.value)
    assert re.match(r"setup failed on worker \d+, _init_opens, line 4( \(`HANDLE = open\(path\)`\))?: "
                    r"FileNotFoundError", text), text
    assert "functools.partial" not in text and "0x" not in text
    assert worker_setup.describe() == "on_worker_start: _init_opens('/nonexistent/file')"
    with pytest.raises(mpmagic.MPMagicError):  # the same function again: it replaces the first, as a function does
        run(ip, "mpmagic.on_worker_start(functools.partial(_init_opens, '/nonexistent/other'))")
    assert worker_setup.describe() == "on_worker_start: _init_opens('/nonexistent/other')"


@pytest.mark.parametrize("method", ["forkserver"], scope="session")
def test_a_setup_failing_in_recycled_workers_is_one_line_a_run_with_a_count(ip, method, capfd):
    """A setup failing only in later workers, whose line names the worker (its own
    message does), printed one line per recycled worker: four to a run, five to the
    next. One line per run now, and one more at its end with how many more failed."""
    pool_module.shutdown()
    mpmagic.start_pool(2, method, max_tasks_per_child=1, wait=True)
    try:
        run(ip, "%%pool setup\nimport mpmagic\nif mpmagic.worker_id() >= 2:\n"
                "    raise RuntimeError('late worker fails ' + str(mpmagic.worker_id()))\n")
        for _ in range(2):
            capfd.readouterr()
            assert run(ip, "%pmap -q --chunksize 1 abs, range(-3, 3)") == [3, 2, 1, 0, 1, 2]
            err = capfd.readouterr().err
            assert err.count("setup failed on worker") == 1, err
            more = re.findall(r"mpmagic: the %%pool setup also failed on (\d+) more workers during this run "
                              r"\(workers [\d, and]+; %pool shows which workers are set up\)\n", err)
            assert len(more) == 1 and int(more[0]) >= 2, err  # (items 2-5 ran on workers whose setup failed)
    finally:
        pool_module.shutdown()
        ensure_pool(method)


def test_a_notebooks_future_annotations_reach_its_setup_as_serially(ip, local_pool):
    """A ``%%pool setup`` is compiled under the notebook's ``from __future__`` features,
    as IPython compiles the cell serially: a class annotating a field with its own name
    is set up (it failed on every worker: tester-regress22, item 1)."""
    import __future__

    run(ip, "from __future__ import annotations")
    try:
        run(ip, "%%pool setup\nclass Tree:\n    kids: list[Tree]\n")
        assert run(ip, "%pmap -q lambda x: Tree.__annotations__, range(2)") == [{"kids": "list[Tree]"}] * 2
    finally:
        ip.compile.flags &= ~__future__.annotations.compiler_flag


PATCH_SETUP = """import builtins, json, sys
_orig = builtins.print
_dumps = json.dumps
sys._mpm_unpatched = (_orig, _dumps)
def myprint(*a, **k):
    _orig('P:', *a, **k)
def sorted_dumps(o, **k):
    return _dumps(o, sort_keys=True, **k)
builtins.print = myprint
json.dumps = sorted_dumps
"""


@pytest.mark.parametrize("removal", ["%pool setup clear", "%%pool setup\nOTHER = 1\n"])
def test_a_setups_patch_keeps_working_after_the_setup_is_removed(ip, local_pool, removal):
    """A setup patches ``builtins.print`` and ``json.dumps`` with wrappers that read its own
    names (``_orig``, ``_dumps``). Running workers keep the patches after a clear or a
    replacing setup (as the docs say), and the wrappers still find those names, as
    serially (the notebook keeps them): they raised NameError on every print and dumps,
    the setup's names having been popped from the builtins the wrappers' globals are.
    Tasks themselves no longer see the names."""
    for name in ("_orig", "_dumps", "myprint", "sorted_dumps", "OTHER"):
        ip.user_ns.pop(name, None)
    run(ip, "def _patched(x):\n    import io, json\n    buf = io.StringIO()\n    print(x, file=buf)\n"
            "    return buf.getvalue(), json.dumps({'b': 1, 'a': x})")
    expected = [(f"P: {x}\n", f'{{"a": {x}, "b": 1}}') for x in range(4)]
    try:
        run(ip, "%%pool setup\n" + PATCH_SETUP)
        assert run(ip, "%pmap -q --chunksize 1 _patched, range(4)") == expected
        run(ip, removal)
        assert run(ip, "%pmap -q --chunksize 1 _patched, range(4)") == expected
        assert run(ip, "%%parallel -n 2 -q\nimport io\nbuf = io.StringIO()\nprint(rank, file=buf)\nbuf.getvalue()") \
            == ["P: 0\n", "P: 1\n"]
        with pytest.raises(NameError):  # the names went with the setup: a task reading one fails as before
            run(ip, "%pmap -q lambda x: _dumps, range(2)")
    finally:  # (the patches stay in running workers: undo them for the tests after this one)
        run(ip, "%%pool setup\nimport builtins, json, sys\nbuiltins.print, json.dumps = sys._mpm_unpatched\n")
        run(ip, "%pool setup clear")


def test_a_removed_setups_functions_still_read_its_names_tasks_do_not():
    """In the worker process itself: after the setup is removed, its patch of ``abs``
    (and a function one of its functions makes later) still reads ``_real_abs`` and the
    last value a ``global`` rebinding gave ``W``; the builtins are as before the setup."""
    import builtins

    from mpmagic import payload

    space = dict(vars(builtins))
    source = ("import builtins\n_real_abs = builtins.abs\nW = 1\n"
              "def patched(x):\n    return _real_abs(x) + W\nbuiltins.abs = patched\n"
              "def set_w(v):\n    global W\n    W = v\n"
              "def maker():\n    return lambda: _real_abs(-W)\n")
    try:
        reply = worker_setup.run_setup(1, payload.dumps_data([worker_setup._Entry("code", "%%pool setup", source)]), 7)
        assert reply.error is None and builtins.abs(-1) == 2
        vars(builtins)["set_w"](5)
        made = vars(builtins)["maker"]
        worker_setup.run_setup(0, None, None)
        assert builtins.abs(-1) == 6 and made()() == 5
        assert not hasattr(builtins, "_real_abs") and not hasattr(builtins, "W")
    finally:
        worker_setup.run_setup(0, None, None)
        builtins.abs = space["abs"]
    assert vars(builtins) == space


def test_a_setup_may_bind_exit_and_the_other_site_helpers_as_serially(ip, local_pool):
    """``exit = False`` passed the notebook's check (IPython hides ``exit`` while a cell
    runs) and was refused by every worker (site's ``exit`` is a builtin there), a line
    per worker. Serially the setup binds it: ``site``'s interactive helpers are no
    builtins a library uses (``python -S`` has none), so both sides accept them."""
    assert worker_setup.shadowing(["exit", "quit", "help", "copyright", "credits", "license", "type"]) == ["type"]
    serial: dict = {}
    exec("exit = False\nhelp = 'no help'\nMODEL = 1\n", serial)
    exec("def task(x):\n    return exit, help, MODEL + x", serial)
    run(ip, "%%pool setup\nexit = False\nhelp = 'no help'\nMODEL = 1\n")
    run(ip, "def _site_task(x):\n    return exit, help, MODEL + x")
    assert run(ip, "%pmap -q --chunksize 1 _site_task, range(4)") == list(map(serial["task"], range(4)))
    # (IPython's exit and quit are one object: it went as `quit` for both names)
    assert run(ip, "%pmap -q lambda x: (exit, type(quit).__name__), range(2)") == [(False, "Quitter")] * 2
    assert list(run(ip, "%%parallel -n 2 -q\nexit")) == [False, False]
    run(ip, "%pool setup clear")  # the workers' own helpers are back
    run(ip, "def _helpers_back(x):\n    import builtins\n    return callable(builtins.exit), callable(builtins.help)")
    assert run(ip, "%pmap -q --chunksize 1 _helpers_back, range(4)") == [(True, True)] * 4
    run(ip, "%%pool setup\ndel exit\n")  # (deleted, as serially: put back with the setup)
    run(ip, "%pool setup clear")
    assert run(ip, "%pmap -q --chunksize 1 _helpers_back, range(4)") == [(True, True)] * 4


LATE_NAMES_SETUP = """
def load():
    globals()['LAZY_A'] = 1
    exec('LAZY_B = 2', globals())
    return LAZY_A + LAZY_B
"""


@pytest.mark.parametrize("removal", ["%pool setup clear", "%%pool setup\nOTHER = 1\n"])
def test_names_a_setup_function_writes_into_its_globals_go_with_the_setup(ip, local_pool, removal):
    """A setup function a task calls writes ``globals()['LAZY_A']`` (or execs into its
    globals): those names stayed after a clear or a replacing setup, where names
    bound with ``global`` went; tasks still saw them."""
    ip.user_ns.pop("OTHER", None)
    run(ip, "%%pool setup\n" + LATE_NAMES_SETUP)
    assert run(ip, "%pmap -q --chunksize 1 lambda x: load(), range(4)") == [3] * 4
    assert run(ip, "%pmap -q --chunksize 1 lambda x: (LAZY_A, LAZY_B), range(4)") == [(1, 2)] * 4
    run(ip, removal)
    run(ip, "def _late_left(x):\n    import builtins\n"
            "    return [n for n in ('LAZY_A', 'LAZY_B', '__builtins__', 'display') if n in vars(builtins)]")
    assert run(ip, "%pmap -q --chunksize 1 _late_left, range(4)") == [["display"]] * 4


def test_a_setups_dunder_name_is_what_tasks_read(ip, local_pool):
    """``__version__ = "1.2"`` in a setup was dropped silently (NameError in the tasks);
    a dunder of the builtins module itself (``__name__``) is refused up front."""
    run(ip, '%%pool setup\n__version__ = "1.2"\nfrom math import pi as __pi__\n')
    assert run(ip, "%pmap -q lambda x: (__version__, round(__pi__, 2)), range(2)") == [("1.2", 3.14)] * 2
    run(ip, "%pool setup clear")
    with pytest.raises(NameError):
        run(ip, "%pmap -q lambda x: __version__, range(2)")
    before = worker_setup.version()
    with pytest.raises(IPythonUsageError) as info:
        run(ip, "%%pool setup\n__name__ = 'mine'\n")
    assert "`__name__`" in str(info.value) and "nothing was sent" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(IPythonUsageError, match="`__getattr__`"):  # (PEP 562: every builtin lookup would find one)
        run(ip, "%%pool setup\ndef __getattr__(name):\n    return 1\n")
    assert worker_setup.version() == before


def test_instances_of_a_setup_class_from_two_workers_are_of_one_class(ip, local_pool):
    """cloudpickle rebuilt the setup's class by value once per worker it came from, so
    results of two workers were of two classes (``type(a) is type(b)`` False) where
    serially they are one; a changed class in a new setup is a new class."""
    run(ip, "%%pool setup\nclass SetupPoint:\n    def __init__(self, x):\n        self.x = x\n")
    run(ip, "def _make_point(x):\n    import time, mpmagic\n    time.sleep(0.3)\n"
            "    return SetupPoint(x), mpmagic.worker_id()")
    out = run(ip, "%pmap -q --chunksize 1 _make_point, range(6)")
    assert len({w for _, w in out}) == 2, out  # (both workers made some)
    assert len({type(p) for p, _ in out}) == 1 and [p.x for p, _ in out] == list(range(6))
    first = type(out[0][0])
    run(ip, "%%pool setup\nclass SetupPoint:\n    def __init__(self, x):\n        self.x = -x\n")
    out = run(ip, "%pmap -q --chunksize 1 _make_point, range(6)")
    assert len({type(p) for p, _ in out}) == 1 and type(out[0][0]) is not first
    assert [p.x for p, _ in out] == [-x for x in range(6)]


def test_a_setup_class_sent_back_to_the_workers_keeps_its_own_methods(ip, any_method):
    """An instance of a setup's class that came home and goes back to a task (an item)
    replaced the worker's class's methods with copies whose globals were a snapshot
    of the names they read: the setup's ``SCALE`` rebound later was not seen, also by
    new instances (``SP(1).scaled()`` 1 where serially 10)."""
    ensure_pool(any_method)
    setup = ("SCALE = 1\nclass ScaledPoint:\n    def __init__(self, x):\n        self.x = x\n"
             "    def scaled(self):\n        return self.x * SCALE\n"
             "def set_scale(v):\n    global SCALE\n    SCALE = v\n    return v\n")
    serial: dict = {}
    exec(setup, serial)
    exec("def back(p):\n    return isinstance(p, ScaledPoint), set_scale(10), p.scaled(), ScaledPoint(1).scaled()", serial)
    expected = [serial["back"](serial["ScaledPoint"](x)) for x in range(4)]
    run(ip, "%%pool setup\n" + setup)
    ip.user_ns["_points"] = run(ip, "%pmap -q --chunksize 1 lambda x: ScaledPoint(x), range(4)")
    run(ip, "def _back(p):\n    return isinstance(p, ScaledPoint), set_scale(10), p.scaled(), ScaledPoint(1).scaled()")
    assert run(ip, "%pmap -q --chunksize 1 _back, _points") == expected == [(True, 10, 10 * x, 10) for x in range(4)]


def test_exit_dunders_late_names_and_classes_of_a_setup_on_dask(ip, dask_cluster):
    """The same on Dask, whose plugin runs the setup in each worker process: ``exit``
    bindable, ``__version__`` carried, a ``globals()`` write taken away by a clear, and a
    setup class's instances from several workers one class that keeps its methods."""
    for name in ("late", "LATE_D", "SCALE", "DaskPoint", "set_scale"):  # (an earlier test's notebook name
        ip.user_ns.pop(name, None)  # would be sent with the function, hiding the setup's, as serially)
    mpmagic.use_dask(dask_cluster.address)
    try:
        pool_module.get_pool().client.wait_for_workers(4, timeout=60)
        run(ip, "%%pool setup\nexit = False\n__version__ = '1.2'\nSCALE = 1\nclass DaskPoint:\n"
                "    def __init__(self, x):\n        self.x = x\n    def scaled(self):\n        return self.x * SCALE\n"
                "def late():\n    globals()['LATE_D'] = 1\n    return LATE_D\n"
                "def set_scale(v):\n    global SCALE\n    SCALE = v\n    return v\n")
        run(ip, "def _dask_make(x):\n    import time, mpmagic\n    time.sleep(0.2)\n"
                "    return exit, __version__, late(), DaskPoint(x), mpmagic.worker_id()")
        out = run(ip, "%pmap -q --chunksize 1 _dask_make, range(8)")
        assert [t[:3] for t in out] == [(False, "1.2", 1)] * 8
        assert len({t[4] for t in out}) >= 2 and len({type(t[3]) for t in out}) == 1, out
        ip.user_ns["_dask_points"] = [t[3] for t in out]
        assert run(ip, "%pmap -q --chunksize 1 lambda p: (set_scale(10), p.scaled(), DaskPoint(1).scaled()), "
                       "_dask_points") == [(10, 10 * x, 10) for x in range(8)]
        run(ip, "%pool setup clear")
        run(ip, "def _dask_left(x):\n    import builtins, time\n    time.sleep(0.1)\n"
                "    return [n for n in ('LATE_D', '__version__', 'DaskPoint') if n in vars(builtins)], callable(exit)")
        assert run(ip, "%pmap -q --chunksize 1 _dask_left, range(8)") == [([], True)] * 8
    finally:
        pool_module.shutdown()


def test_a_setups_top_level_await_says_why_and_what_to_do(ip, local_pool):
    """IPython runs a cell's top-level ``await``; a setup said only "syntax error: 'await'
    outside function", of code that runs in the notebook (as %%parallel now says why)."""
    with pytest.raises(IPythonUsageError) as info:
        run(ip, "%%pool setup\nimport asyncio\nawait asyncio.sleep(0)\n")
    text = str(info.value)
    assert "syntax error on line 3: 'await' outside function; " in text and "\n" not in text.split("\nusage")[0]
    assert "without IPython's top-level await" in text and "asyncio.run(main())" in text


def test_a_notebook_class_an_on_worker_start_dict_names_comes_home_as_the_notebooks(ip, local_pool):
    """Only the classes a setup cell defines get a setup tracker id: a notebook class the
    dict of an ``on_worker_start`` function gives under its own name keeps the notebook's
    id, so its instances are of the notebook's class (``isinstance`` holds)."""
    run(ip, "%%pool setup\nX = 1\n")
    run(ip, "class _NbKind:\n    pass\ndef _gives_class():\n    return {'_NbKind2': _NbKind, '_NbKind': _NbKind}\n"
            "mpmagic.on_worker_start(_gives_class)")
    out = run(ip, "%pmap -q --chunksize 1 lambda x: _NbKind2(), range(4)")
    assert [isinstance(a, ip.user_ns["_NbKind"]) for a in out] == [True] * 4


def test_setup_clear_with_no_setup_says_nothing_changed(ip, pool2):
    """%pool setup clear with no setup said "worker setup removed: ... running ones dropped
    its names", of a setup there was not; now it says there was none, and changes nothing."""
    from IPython.utils.capture import capture_output

    worker_setup.clear()
    setup_api.apply_now()
    pids = [s.pid for s in pool2.slots]
    with capture_output() as cap:
        run(ip, "%pool setup clear")
    assert cap.stdout == "no worker setup to remove (%pool setup shows none): nothing changed\n"
    assert [s.pid for s in pool2.slots] == pids and not worker_setup.has_setup()
    run(ip, "%%pool setup\nA_SETUP = 1")
    with capture_output() as cap:
        run(ip, "%pool setup clear")
    assert cap.stdout.startswith(setup_api.CLEARED) and not worker_setup.has_setup()


SETUP_PRINTS = ("import logging, sys, mpmagic\nprint('loaded on', mpmagic.worker_id())\n"
                "print('to stderr', file=sys.stderr)\nlogging.getLogger('mpm.later').warning('warned')\nMODEL = 1\n")


def _setup_lines(out: str, wid: Any) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"[worker {wid}] ")]


def test_what_a_later_workers_setup_prints_is_shown_once_labelled_in_its_run(ip, local_pool, capsys):
    """What the setup printed (stdout, stderr, a log record) in the first workers is
    shown by ``%%pool setup``, labelled by worker; in a worker started later (a
    replacement, a resize, a cell's temporary workers) it was dropped. It is shown
    the same way, once, in the cell of the run that started or next uses it."""
    run(ip, "%%pool setup\n" + SETUP_PRINTS)
    first = capsys.readouterr().out
    for s in local_pool.slots:
        assert _setup_lines(first, s.wid) == [f"[worker {s.wid}] loaded on {s.wid}", f"[worker {s.wid}] to stderr",
                                              f"[worker {s.wid}] warned"], first
    seen = {s.wid for s in local_pool.slots}
    os.kill(local_pool.slots[0].pid, signal.SIGKILL)  # a replacement
    shown = []
    try:
        assert list(run(ip, "%%parallel -n 2 -q\nMODEL + rank")) == [1, 2]
        shown.append(capsys.readouterr())
        run(ip, "%pool resize 3")  # one more
        assert list(run(ip, "%%parallel -n 3 -q\nMODEL + rank")) == [1, 2, 3]
        shown.append(capsys.readouterr())
        assert list(run(ip, "%%parallel -n 5 -q\nMODEL + rank")) == [1, 2, 3, 4, 5]  # two temporary workers
        shown.append(capsys.readouterr())
    finally:
        run(ip, "%pool resize 2")
    text = "".join(c.out for c in shown)
    later = sorted({int(m) for m in re.findall(r"^\[worker (\d+)\] loaded on", text, re.M)})
    assert len(later) == 4 and not set(later) & seen, text  # replacement, resized, two temporary
    for wid in later:
        assert _setup_lines(text, wid) == [f"[worker {wid}] loaded on {wid}", f"[worker {wid}] to stderr",
                                           f"[worker {wid}] warned"], text


def _blocking_setup(tmp_path: Any) -> str:
    """A setup that, while ``tmp_path/block`` exists, writes its pid to ``tmp_path/pid<worker>``
    and waits for the file to go: a worker to kill while it runs the setup."""
    return (f"import os, time, pathlib, mpmagic\n_dir = pathlib.Path({str(tmp_path)!r})\n"
            "if (_dir / 'block').exists():\n"  # (written whole, then renamed: never read half written)
            "    (_dir / f'.pid{mpmagic.worker_id()}').write_text(str(os.getpid()))\n"
            "    os.replace(_dir / f'.pid{mpmagic.worker_id()}', _dir / f'pid{mpmagic.worker_id()}')\n"
            "    while (_dir / 'block').exists():\n        time.sleep(0.01)\nMODEL = 1\n")


def _kill_in_its_setup(tmp_path: Any) -> int:
    """SIGKILL the first worker found running :func:`_blocking_setup` (its pid file), then let
    the setup go on in later workers; the killed worker's id."""
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("pid*")):
            assert time.monotonic() < deadline, "no worker ran the setup"
            time.sleep(0.01)
        found = next(iter(tmp_path.glob("pid*")))
        os.kill(int(found.read_text()), signal.SIGKILL)
        return int(found.name[3:])
    finally:
        (tmp_path / "block").unlink(missing_ok=True)  # (the setup goes on in later workers, also on a failure)


def test_a_worker_killed_from_outside_while_it_runs_the_setup_leaves_the_setup_on(ip, local_pool, tmp_path, capsys):
    """A SIGKILL from outside (a user's kill, not the setup's own doing) while a worker
    ran the setup switched the setup off: every later worker started without it, and
    tasks failed with NameError. The setup stays; one line says the worker was killed."""
    run(ip, "%%pool setup\n" + _blocking_setup(tmp_path))
    (tmp_path / "block").touch()
    os.kill(local_pool.slots[0].pid, signal.SIGKILL)  # its replacement runs the setup, and is killed there
    killed = _kill_in_its_setup(tmp_path)
    capsys.readouterr()
    assert list(run(ip, "%%parallel -n 2 -q\nMODEL + rank")) == [1, 2]  # both workers have the setup
    err = capsys.readouterr().err
    assert err.count(f"mpmagic: worker {killed} was killed by SIGKILL while running the worker setup") == 1, err
    assert "the setup stays in force: its replacement runs it" in err
    assert local_pool.apply_setup() == [] and worker_setup.killed_workers() is None  # (waits for every worker's)
    assert str(mpmagic.pool_status()).count(", set up") == len(local_pool.slots) == 2
    assert list(run(ip, "%%parallel -n 2 -q\nMODEL + rank")) == [1, 2]


def test_a_setup_that_sigkills_every_worker_is_switched_off_after_three(ip, local_pool):
    """A setup killed by SIGKILL in every worker (its own kill, or an out-of-memory one) is
    not run again and again in a loop of replacements: after three such deaths in a row it
    is switched off, in one line, as a setup that exits is after one."""
    with pytest.raises(mpmagic.MPMagicError) as info:
        run(ip, "%%pool setup\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    text = str(info.value)
    assert "\n" not in text and "died while running it" in text and "killed by SIGKILL" in text, text
    assert "3 workers in a row" in text, text
    assert run(ip, "%pmap -q lambda x: x + 1, range(4)") == [1, 2, 3, 4]  # the new workers run without it


def test_a_failing_rank_reading_a_notebook_name_the_setup_also_defines_says_whose_it_was(ip, local_pool):
    """A map task got ``worker_setup.note_notebook_value``'s line, a ``%%parallel`` rank
    did not: the notebook's ``MODEL = None`` sent with the cell failed with a bare TypeError."""
    run(ip, "%%pool setup\nMODEL = {'a': 1}\n")
    run(ip, "MODEL = None")
    try:
        with pytest.raises(mpmagic.ParallelError) as info:
            run(ip, "%%parallel -n 2 -q\nMODEL['a']")
        for exc in info.value.failures.values():
            assert isinstance(exc, TypeError)
            assert [n for n in exc.__notes__ if "setup's" in n] == [
                "mpmagic: MODEL here is the notebook's (None), sent with the cell, not the %%pool setup's: "
                "del MODEL in the notebook to use the setup's"]
        for cell in ("rank / 0", "MODEL = 0\nMODEL['a']"):  # (no such name read; the cell's own MODEL: no note)
            with pytest.raises(mpmagic.ParallelError) as info:
                run(ip, "%%parallel -n 2 -q\n" + cell)
            assert not any("setup's" in n for exc in info.value.failures.values()
                           for n in getattr(exc, "__notes__", ()))
        run(ip, "del MODEL")
        assert list(run(ip, "%%parallel -n 2 -q\nMODEL['a']")) == [1, 1]
    finally:
        ip.user_ns.pop("MODEL", None)


def test_a_worker_killed_while_an_explicit_setup_waits_is_replaced_and_the_wait_goes_on(ip, local_pool, tmp_path,
                                                                                         capsys):
    """``%%pool setup`` failed ("the worker died while running it") when a worker was killed
    from outside during it, and switched the setup off. It waits for the replacement's
    answer instead, and shows the kill's line with what the setup printed."""
    (tmp_path / "block").touch()
    killer = threading.Thread(target=_kill_in_its_setup, args=(tmp_path,))
    killer.start()
    try:
        run(ip, "%%pool setup\nprint('loaded')\n" + _blocking_setup(tmp_path))
    finally:
        killer.join(60)
        (tmp_path / "block").unlink(missing_ok=True)
    out = capsys.readouterr().out
    assert out.count("was killed by SIGKILL while running the worker setup") == 1, out
    assert all(f"[worker {s.wid}] loaded" in out for s in local_pool.slots), out
    assert str(mpmagic.pool_status()).count(", set up") == len(local_pool.slots) == 2
    assert list(run(ip, "%%parallel -n 2 -q\nMODEL + rank")) == [1, 2]


def test_a_run_whose_items_wait_for_a_setup_killed_from_outside_gets_them_all(ip, local_pool, tmp_path, capsys):
    """A run's items queued behind the setup of a worker killed in it go to the workers
    that have the setup (they never started): every result, and one line in the run."""
    run(ip, "%%pool setup\n" + _blocking_setup(tmp_path))
    (tmp_path / "block").touch()
    os.kill(local_pool.slots[0].pid, signal.SIGKILL)  # its replacement blocks in the setup
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("pid*")):
        assert time.monotonic() < deadline, "no worker ran the setup"
        time.sleep(0.01)

    def kill_once_items_wait() -> None:
        blocked = next(s for s in local_pool.slots if s.setups_ahead)
        while not blocked.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        _kill_in_its_setup(tmp_path)

    killer = threading.Thread(target=kill_once_items_wait)
    killer.start()
    try:
        out = run(ip, "import time\n%pmap -q --chunksize 1 lambda x: (time.sleep(0.05), MODEL + x)[1], range(8)")
    finally:
        killer.join(60)
        (tmp_path / "block").unlink(missing_ok=True)
    assert out == [1 + x for x in range(8)]
    err = capsys.readouterr().err
    assert err.count("was killed by SIGKILL while running the worker setup") == 1, err


def test_what_a_setup_printed_before_its_worker_died_is_shown(ip, local_pool, tmp_path, capsys):
    """A worker that died while running the setup took what the setup had printed with it
    (held for its SetupDone): the lines that say how far it got ("loading weights...").
    They are shown labelled by worker, before the line of its death: a setup that exits,
    as it would print serially before the exit; and one killed from outside."""
    with pytest.raises(mpmagic.MPMagicError, match="died while running it"):
        run(ip, "%%pool setup\nimport os, sys\nprint('loading weights')\nprint('half', file=sys.stderr)\n"
                "sys.stdout.flush()\nos._exit(7)\n")
    out = capsys.readouterr().out
    said = re.findall(r"^\[worker (\d+)\] (.*)$", out, re.M)
    assert said and all(text in ("loading weights", "half") for _, text in said), out
    assert [text for _, text in said][:2] == ["loading weights", "half"], out
    run(ip, "%pool setup clear")
    run(ip, "%%pool setup\nprint('loading')\n" + _blocking_setup(tmp_path))
    (tmp_path / "block").touch()
    os.kill(local_pool.slots[0].pid, signal.SIGKILL)
    killed = _kill_in_its_setup(tmp_path)
    capsys.readouterr()
    assert list(run(ip, "%%parallel -n 2 -q\nMODEL + rank")) == [1, 2]
    shown = capsys.readouterr()
    assert _setup_lines(shown.out, killed) == [f"[worker {killed}] loading"], shown
    assert shown.err.count(f"worker {killed} was killed by SIGKILL while running the worker setup") == 1, shown


def test_a_helper_the_setup_made_comes_back_from_a_task(ip, local_pool):
    """A worker's own helper (made by ``%%pool setup``, alive as long as the worker) may be a
    map's result: only one a task made is refused (released as its task ends)."""
    run(ip, "%%pool setup\nimport mpmagic\nINBOX = mpmagic.Queue()\n")
    got = run(ip, "%pmap -q --chunksize 1 lambda x: INBOX, range(2)")
    assert all(isinstance(q, mpmagic.shared.SharedQueue) for q in got), got
    got[0].put("hi")
    assert got[0].get(timeout=5) == "hi"
    run(ip, "del _")


def _dask_pids(client, n: int, old: set[int] | None = None) -> dict[str, int]:
    """Worker address -> pid once ``n`` workers answer (and, with ``old``, one pid is new):
    a nanny's restart of a killed worker is in the cluster. Bounded: 60 s."""
    deadline = time.monotonic() + 60
    while True:
        try:
            pids = client.run(os.getpid, on_error="return")
        except OSError:
            pids = {}
        pids = {a: p for a, p in pids.items() if isinstance(p, int)}
        if len(pids) == n and (old is None or set(pids.values()) - old):
            return pids
        assert time.monotonic() < deadline, f"the Dask workers did not come back: {pids}"
        time.sleep(0.1)


def test_dask_setup_output_of_a_restarted_worker_is_shown_once_in_the_next_run(ip, dask_cluster, capfd):
    """What the setup printed in a worker its nanny started again after a death was
    dropped on Dask (only the registration's own workers' output was shown): it is
    shown once, labelled, in the next run's cell, as a local replacement's is."""
    mpmagic.use_dask(dask_cluster.address)
    try:
        client = pool_module.get_pool().client
        old = set(_dask_pids(client, 4).values())
        capfd.readouterr()
        run(ip, "%%pool setup\nimport os, mpmagic\nprint('loaded in', os.getpid())\nLOADED = os.getpid()\n"
                "WID = mpmagic.worker_id()")
        first = capfd.readouterr().out
        # (mpmagic.worker_id() in the setup, as locally: the worker's name, not None)
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
        assert client.run(lambda: __import__("builtins").WID) == names
        assert sorted(int(x) for x in re.findall(r"^\[worker [^\]]+\] loaded in (\d+)$", first, re.M)) == sorted(old)
        os.kill(sorted(old)[0], signal.SIGKILL)
        new = set(_dask_pids(client, 4, old).values()) - old
        assert len(new) == 1
        (pid,) = new
        assert client.run(lambda: __import__("builtins").LOADED)  # (every worker, the new one too, ran it)
        shown = ""
        deadline = time.monotonic() + 30
        while f"loaded in {pid}" not in shown and time.monotonic() < deadline:  # (an event on its way)
            assert run(ip, "%pmap -q --chunksize 1 lambda x: x, range(4)") == [0, 1, 2, 3]
            shown += capfd.readouterr().out
        assert re.findall(r"^\[worker [^\]]+\] loaded in (\d+)$", shown, re.M) == [str(pid)], shown
        assert run(ip, "%pmap -q --chunksize 1 lambda x: x, range(4)") == [0, 1, 2, 3]
        assert "loaded in" not in capfd.readouterr().out  # once
    finally:
        pool_module.shutdown()


def test_dask_worker_killed_from_outside_in_its_setup_keeps_the_setup(ip, dask_cluster, tmp_path, capfd):
    """A Dask worker killed (SIGKILL) while it ran the setup of a %%pool setup closed the
    registration's connection, and the setup was unregistered from the cluster: a
    kill from outside switched it off for every worker. Its replacement runs it: the
    setup stays, in one line, and the cell waits for the replacement."""
    mpmagic.use_dask(dask_cluster.address)
    try:
        client = pool_module.get_pool().client
        old = _dask_pids(client, 4)

        def kill_the_first() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                started = sorted(tmp_path.iterdir(), key=lambda p: p.stat().st_mtime_ns)
                if started:
                    os.kill(int(started[0].name), signal.SIGKILL)
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_the_first)
        killer.start()
        capfd.readouterr()
        try:
            run(ip, "%%pool setup\nimport os, time\nopen(os.path.join(" + repr(str(tmp_path)) + ", str(os.getpid())), "
                    "'w').close()\ntime.sleep(1.5)\nKEPT = 5")
        finally:
            killer.join()
        err = capfd.readouterr().err
        assert "was killed while running the worker setup" in err and "the setup stays in force" in err, err
        pids = _dask_pids(client, 4, set(old.values()))
        assert client.run(lambda: __import__("builtins").KEPT) == dict.fromkeys(pids, 5)
        assert run(ip, "%pmap -q --chunksize 1 lambda x: KEPT + x, range(8)") == [5 + x for x in range(8)]
    finally:
        pool_module.shutdown()
