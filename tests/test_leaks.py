"""Issue 14 item 7: what the chaos soak found growing in the notebook, each
checked by counting objects, never by RSS (docs/reliability.md, section 11).

* A task's exception rebuilt in the notebook kept, through its traceback's
  frames (``f_back``), the whole stack that rebuilt it: the job with every
  input and result, the manager's reply message, the worker's slot.
* The manager thread slept holding the slots that spoke last: a retired
  worker's ``Process`` (and its two pipe fds) stayed until the next wakeup.
* ``%%parallel`` bodies and ``%pmap`` arguments got a new file name per call,
  each kept for good by ``linecache`` and by IPython's traceback caches.
* The soak's shell kept past results (``Out``, ``_<n>``, the display hook's
  ``_``): the harness now drops them after each call (``chaos.forget_outputs``).
"""

from __future__ import annotations

import gc
import linecache
import os
import sys
import time
import weakref
from pathlib import Path

import pytest
from conftest import collect_everything, ensure_pool, run
from IPython.utils.capture import capture_output

import mpmagic
from mpmagic import debugging, errors, jobs
from mpmagic.backends import local

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import chaos  # noqa: E402  (benchmarks/ is not a package)

BOUND = 30.0  # seconds: only catches a hang

TASKS = """
import os, signal, time

def leak_task(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return [x] * 1000

def leak_sleeps(x):
    if x == 3:
        time.sleep(60)
    return x

def leak_dies(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x
"""


def _alive(cls: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, cls))


def _settle(check, bound: float = BOUND) -> bool:
    """Poll ``check()`` (after a collection) until it holds or the bound passes."""
    deadline = time.monotonic() + bound
    while True:
        gc.collect()
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _forget_errors() -> None:
    """What keeps the last failure on purpose: the %pdebug record, the interpreter's last exception."""
    debugging.forget()
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)


def test_kept_task_exceptions_do_not_keep_their_run_alive(ip):
    """``errors="collect"``: the user keeps the results, so the rebuilt
    exceptions live on; the job (every input and result), the manager's reply
    message and the worker's slot must not live on with them."""
    backend = ensure_pool("forkserver")
    run(ip, TASKS)
    _forget_errors()
    base_jobs = _alive(jobs.MapJob)
    out = mpmagic.pmap(ip.user_ns["leak_task"], range(8), chunksize=1, errors="collect")
    kept = [r for r in out if isinstance(r, mpmagic.Failed)]
    assert [f.index for f in kept] == [3] and isinstance(kept[0].error, ValueError)
    del out
    _forget_errors()
    assert _settle(lambda: _alive(jobs.MapJob) <= base_jobs), [
        type(r).__name__ for o in gc.get_objects() if isinstance(o, jobs.MapJob) for r in gc.get_referrers(o)]
    assert _settle(lambda: _alive(local._Slot) <= len(backend.slots))
    assert kept[0].error.__traceback__ is not None  # still shown with the worker's frames


@pytest.mark.parametrize("kind", ["raise", "timeout", "worker killed"])
def test_a_failed_run_leaves_nothing_behind_once_its_error_is_dropped(ip, kind):
    """Each failure path ends its run: the pool's run registries are empty and
    no job outlives the error (the last failure is kept for %pdebug on
    purpose, and forgotten here)."""
    backend = ensure_pool("forkserver")
    run(ip, TASKS)
    _forget_errors()
    base_jobs = _alive(jobs.MapJob)
    func = ip.user_ns[{"timeout": "leak_sleeps", "worker killed": "leak_dies"}.get(kind, "leak_task")]
    expected = {"raise": ValueError, "timeout": mpmagic.TaskTimeoutError, "worker killed": mpmagic.WorkerLostError}
    with pytest.raises(expected[kind]):
        mpmagic.pmap(func, range(8), chunksize=1, timeout=1.0 if kind == "timeout" else None)
    _forget_errors()
    assert _settle(lambda: _alive(jobs.MapJob) <= base_jobs)
    assert not backend._runs and not backend._calls


@pytest.mark.parametrize("again", ["%pmap -q --chunksize 1 leak_dies, range(8)", "%pmap -q --rerun-failed"])
def test_a_failed_pmap_line_keeps_no_earlier_failed_run_alive(ip, again):
    """A time-out's or a lost worker's error is made here and raised through the
    ``%pmap`` magic's frame (and ``rerun_failed``'s), which its traceback keeps (in
    ``sys.last_value`` and in the run's record, for %pdebug). That frame held the
    record of the run before it, whose error's frame held the one before that...:
    each such failure of a long session kept every earlier one alive, with its
    inputs and report."""
    ensure_pool("forkserver")
    run(ip, TASKS)
    _forget_errors()
    with capture_output():
        ip.run_cell("%pmap -q --chunksize 1 leak_dies, range(8)", store_history=False)
    records = []
    for _ in range(2):
        with capture_output():
            result = ip.run_cell(again, store_history=False)
        assert isinstance(result.error_in_exec, mpmagic.WorkerLostError), result
        records.append(weakref.ref(debugging.last_run()))
        del result
    assert records[1]() is not None  # (the last failure stays, for %pdebug)
    assert _settle(lambda: records[0]() is None, bound=5.0), [
        type(r).__name__ for r in gc.get_referrers(records[0]())]
    _forget_errors()


def test_kept_rank_exceptions_do_not_keep_their_cell_run_alive(ip):
    """The ranks' own exceptions (``ParallelError.failures``), kept after the
    ParallelError itself (raised through the API's frames) is dropped."""
    ensure_pool("forkserver")
    _forget_errors()
    base = _alive(jobs.CellJob)
    with pytest.raises(mpmagic.ParallelError) as info:
        mpmagic.parallel("raise ValueError(f'rank {rank}')", workers=2)
    kept = dict(info.value.failures)
    del info
    _forget_errors()
    assert _settle(lambda: _alive(jobs.CellJob) <= base)
    assert sorted(kept) == [0, 1] and str(kept[1]) == "rank 1"


def test_a_retired_worker_leaves_no_process_behind(ip):
    """A temporary worker of a 3-rank cell on 2 workers is the last to answer,
    then retires: nothing may keep its Process (and the process's pipes)."""
    backend = ensure_pool("forkserver")
    backend.wait_ready()
    ip.user_ns["LEAK_POOL_PIDS"] = {s.pid for s in backend.slots}
    spawned: list[weakref.ref] = []
    real_spawn = backend._spawn

    def spawn(temporary: bool = False):
        slot = real_spawn(temporary)
        spawned.append(weakref.ref(slot.proc))
        return slot

    backend._spawn = spawn
    try:
        values = run(ip, "%%parallel -n 3 -q\nimport os, time\n"
                         "time.sleep(0 if os.getpid() in LEAK_POOL_PIDS else 0.5)\nrank\n")
    finally:
        del backend._spawn
    assert list(values) == [0, 1, 2]
    assert len(spawned) == 1  # the temporary worker
    assert _settle(lambda: spawned[0]() is None), [type(r).__name__ for r in gc.get_referrers(spawned[0]())]


def _names(prefix: str) -> set[str]:
    return {n for n in linecache.cache if isinstance(n, str) and n.startswith(prefix)}


def test_the_same_parallel_body_keeps_one_file_name(ip):
    ensure_pool("forkserver")
    before = _names("<parallel-cell-")
    origins = len(errors._cell_origins)
    for _ in range(4):
        with capture_output() as cap:  # the traceback is shown, as in a notebook
            result = ip.run_cell("%%parallel -n 2 -q\nraise ValueError(f'rank {rank} failed')\n",
                                 store_history=False)
        assert isinstance(result.error_in_exec, mpmagic.ParallelError)
        assert "rank 1 failed" in cap.stdout + cap.stderr
    assert len(_names("<parallel-cell-") - before) <= 1
    assert len(errors._cell_origins) <= origins + 1
    _forget_errors()


def test_a_long_session_keeps_a_bounded_number_of_cell_origins_and_recent_cells_show_their_lines(ip):
    """``errors._cell_origins`` (a %%parallel body's file name -> its notebook cell's) kept
    every distinct body run, for good: one entry per cell of a long session. Only the last
    ``CELL_ORIGINS_KEPT`` bodies run are kept; a failing cell run after many others still
    shows its rank's frame as the cell's, with the cell's lines, and a body run again is the
    most recent (kept) however old its first run."""
    ensure_pool("forkserver")
    kept = errors.CELL_ORIGINS_KEPT
    again = "%%parallel -n 2 -q\nx = 'run again'\nrank\n"
    for i in range(kept + 100):
        cell = again if i % 50 == 0 else f"%%parallel -n 2 -q\nx = {i}\nrank\n"
        result = ip.run_cell(cell, store_history=True)  # (numbered In[N], as in a notebook)
        assert result.error_in_exec is None and result.result == [0, 1], result
        assert len(errors._cell_origins) <= kept
    assert len(errors._cell_origins) == kept
    again_body = next(f for f, c in errors._cell_origins.items() if "run again" in "".join(linecache.getlines(c)))
    assert errors.cell_file(again_body) != again_body  # (run every 50 cells: never the oldest)
    with capture_output() as cap:
        result = ip.run_cell("%%parallel -n 2 -q\nx = rank\nif x >= 0:\n    raise ValueError(f'rank {x} failed')\n",
                             store_history=True)
    text = cap.stdout + cap.stderr
    n = result.execution_count
    assert isinstance(result.error_in_exec, mpmagic.ParallelError)
    for rank in (0, 1):
        assert f"[rank {rank}] Cell In[{n}], line 4" in text, text
        assert f"[rank {rank}] ValueError: rank {rank} failed" in text, text
    assert "raise ValueError(f'rank {x} failed')" in text and "<parallel-cell-" not in text, text
    assert len(errors._cell_origins) == kept
    _forget_errors()


def test_the_same_pmap_arguments_keep_one_file_name(ip):
    ensure_pool("forkserver")
    before = _names("<pmap-args-")
    for _ in range(4):
        assert run(ip, "%pmap -q lambda x: x + 1, range(3)") == [1, 2, 3]
    assert len(_names("<pmap-args-") - before) == 1


def test_the_soak_forgets_what_the_shell_keeps_of_results(ip):
    """The harness's part: IPython's output cache (``Out``, ``_<n>``, the display
    hook's ``_``) holds the last results; a result array from shared memory
    keeps its segment mapped. chaos.forget_outputs drops them all."""
    pytest.importorskip("numpy")
    ensure_pool("forkserver")
    run(ip, "import numpy as np")
    with capture_output():
        result = ip.run_cell("%pmap -q lambda a: a + 1, [np.zeros(200_000)] * 2", store_history=False)  # displayed
    assert result.error_in_exec is None and result.error_before_exec is None, result
    refs = [weakref.ref(a) for a in result.result]
    del result
    assert ip.displayhook._[0] is refs[0]()  # the display hook keeps it (and Out, and maybe `_`)
    chaos.forget_outputs(ip)
    collect_everything()  # (the check below is of every result the process maps, earlier modules' too)
    assert [r() is None for r in refs] == [True, True]
    # (read from the mappings themselves: a result's mapping holds no fd, compat.map_fd)
    mapped = chaos._mapped_results() if os.path.exists("/proc/self/maps") else []
    assert mapped == []


def test_rebuilding_while_handling_an_exception_keeps_neither_alive():
    """The stubs' marker lives on in the thread's runner; raised while the
    caller handles an exception it takes that one as context: it must not keep
    it (nor its frames), and the rebuilt traceback must not keep its caller."""

    class Handled(Exception):
        pass

    class Big:
        pass

    def rebuild():
        big = Big()
        try:
            raise Handled("being handled")
        except Handled as handled:
            kept = ValueError("from a worker")
            kept.__traceback__ = errors.fake_traceback([errors.FrameInfo("<cell>", 3, "f", None, 1)])
            return kept, weakref.ref(handled), weakref.ref(big)

    kept, handled, big = rebuild()
    gc.collect()
    assert handled() is None and big() is None
    assert kept.__traceback__.tb_frame.f_code.co_name == "f"


def test_what_the_notebook_remembers_of_a_worker_stays_bounded(ip):
    """Each worker's record of the payloads it holds (sent once, then reused)
    stops growing: the worker keeps only its most recent functions anyway."""
    ensure_pool("forkserver")
    ip.run_cell("fs = [(lambda x, k=k: x + k) for k in range(150)]")
    for k, f in enumerate(ip.user_ns["fs"]):
        assert mpmagic.pmap(f, [1, 2]) == [1 + k, 2 + k]
    slots = mpmagic.get_pool().slots
    assert slots and all(len(s.known) <= local._KNOWN_MAX + 2 for s in slots), [len(s.known) for s in slots]
    # and a function sent long ago still runs right (sent again when needed)
    assert mpmagic.pmap(ip.user_ns["fs"][0], [5]) == [5]


@pytest.mark.parametrize("method", ["forkserver", "spawn"], scope="session")
def test_a_notebook_that_ends_with_its_pool_running_exits_quietly(method, tmp_path):
    """A kernel that exits with the pool running (no ``%pool stop``): our exit
    hook stops the pool before multiprocessing's terminates its daemonic
    children. In the other order the manager saw its workers die and started
    replacements, which failed on forkserver with "the pool's manager failed"
    and a traceback at every exit."""
    import subprocess

    script = tmp_path / "ends.py"
    script.write_text(
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_cell('%load_ext mpmagic')\n"
        f"shell.run_cell('%pool start -n 2 --start-method {method}')\n"
        "assert shell.run_cell('%%parallel -n 2 -q\\nrank').success\n"
        "print('ended', flush=True)\n"
    )
    for _ in range(2):  # (the race lost every time on forkserver: twice to be sure)
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "ended" in done.stdout
        assert "Traceback" not in done.stderr and "manager failed" not in done.stderr, done.stderr


def test_a_shell_told_to_exit_with_a_live_multiprocessing_lock_prints_nothing(tmp_path):
    """Our exit hook stops multiprocessing's resource tracker at ``exit_now`` (a kernel's
    shutdown): it ran before multiprocessing's own finalizers, so the tracker unlinked the
    notebook's live Lock as "leaked" and the Lock's finalizer printed a sem_unlink
    FileNotFoundError traceback at exit (three of them ended every test run)."""
    import subprocess

    script = tmp_path / "lock_at_exit.py"
    script.write_text(
        "import multiprocessing as mp\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_cell('%load_ext mpmagic')\n"
        "lock = mp.get_context('spawn').Lock()\n"
        "shell.exit_now = True\n"
        "print('ended', flush=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ended" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr and "leaked" not in done.stderr, done.stderr


#: A shell without ``%load_ext`` whose first mpmagic call makes a pool some way other than
#: ``get_pool()``, then is told to exit (what a kernel's shutdown request does).
FIRST_CALL_AT_EXIT = """
import sys, psutil
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
import mpmagic
{first}
assert mpmagic.pmap(abs, [-1, -2]) == [1, 2]
shell.exit_now = True
left = [p.cmdline() for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
print("left", left, flush=True)
"""


@pytest.mark.parametrize("first", ["mpmagic.use_local(1, 'forkserver')", "mpmagic.use_dask(workers=1)"])
def test_a_pool_made_by_any_first_call_is_freed_when_the_shell_exits(tmp_path, first):
    """Only ``get_pool()`` had the shell's exit watched: ``use_local``, ``use_dask`` (and
    ``start_pool``, test_kernel) as a kernel's first mpmagic call left the workers, the
    fork server and the resource tracker running at ``exit_now``, so Jupyter SIGTERMed
    the kernel ~2.6 s into its shutdown. Every pool is watched where it is made."""
    import subprocess

    if "dask" in first:
        pytest.importorskip("distributed")
    script = tmp_path / "first_call.py"
    script.write_text(FIRST_CALL_AT_EXIT.format(first=first))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "left []" in done.stdout, done.stdout
