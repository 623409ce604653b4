"""shm.py: the settings (``shm.configure``), the sweep of a dead notebook's
segments (``shm.sweep_stale``), and results that are writable in the notebook."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import psutil
import pytest
from conftest import collect_cycles_holding, ensure_pool, run

import mpmagic
from mpmagic import posixshm, shm

pytestmark = pytest.mark.skipif(not shm.ENABLED, reason="POSIX shared memory only")


def mine() -> set[str]:
    """This notebook's segments in /dev/shm."""
    return set(posixshm.names(f"mpm_{os.getpid()}_"))


@pytest.fixture(scope="module", autouse=True)
def _no_pooled_segment_left_for_the_next_module():
    """Free pooled segments kept for the next call are the product's ordinary state,
    but the next test file's ``%pool`` would list them as a "shared memory" row:
    give them back when this file is done (the DataFrame test below left 2 MB)."""
    yield
    shm.pool().trim(0)


@pytest.fixture
def settings_back():
    yield
    shm.configure(threshold=1 << 20, keep_bytes=512 << 20)


# --------------------------------------------------------------------------
# shm.sweep_stale


def test_sweep_stale_leaves_a_dead_notebook_s_names_to_its_running_workers():
    """A script's os._exit left its helpers to its workers, which sweep them and
    take them off its resource tracker's list; another notebook's pool start
    unlinked them first, and that tracker printed "leaked" and "No such file"."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    name = f"mpsh{posixshm.owned_by(dead_pid)}t1"
    posixshm.create(name, 4096).close()
    try:
        posixshm.mark_serving(dead_pid)  # as its worker would
        shm.sweep_stale()
        assert name in posixshm.names("mpsh")
        os.close(posixshm._serving.pop())  # the worker is gone
        shm.sweep_stale()
        assert name not in posixshm.names("mpsh")
    finally:
        posixshm.unlink(name)


def test_a_worker_s_serving_mark_says_no_resource_warning_at_its_exit():
    """A spawn worker exits through Python's own shutdown, which collected its
    "serving" socket unclosed: under a notebook showing ResourceWarnings
    (``-X dev``, ``warnings.simplefilter("default")``, whose filters its workers
    take), every worker printed "unclosed <socket.socket ... mpmagic-serves-...>"
    as the pool stopped, about a socket of ours that was meant to live that long."""
    code = "import os; from mpmagic import posixshm; posixshm.mark_serving(os.getpid()); print('marked')"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "marked\n"
    assert "ResourceWarning" not in out.stderr, out.stderr


def test_sweep_stale_removes_only_segments_of_notebooks_that_no_longer_run(monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited and reaped: no such process now
    assert not posixshm.pid_alive(dead_pid)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # Dead to this process only (a live process): another pytest session's pool start
    # sweeps the real dead pid's name too, maybe first, and this sweep then counted 0.
    dead_here = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    real_alive = posixshm.pid_alive
    monkeypatch.setattr(posixshm, "pid_alive", lambda pid: pid != dead_here.pid and real_alive(pid))
    made = {
        "dead": f"mpm_{posixshm.owned_by(dead_pid)}p1_0",
        "dead_here": f"mpm_{posixshm.owned_by(dead_here.pid)}p1_0",
        "alive": f"mpm_{posixshm.owned_by(alive.pid)}p1_0",
        "ours": f"mpm_{posixshm.owned_by(os.getpid())}test_0",
        "odd": "mpm_notapid_0",
    }
    try:
        for name in made.values():
            posixshm.create(name, 4096).close()
        swept = shm.sweep_stale()
        left = set(posixshm.names("mpm_"))
        assert made["dead"] not in left and made["dead_here"] not in left
        assert {made["alive"], made["ours"], made["odd"]} <= left
        assert swept >= 1  # (dead_here's, which no other sweep takes)
        assert shm.sweep_stale() == 0 or made["dead"] not in set(posixshm.names("mpm_"))
    finally:
        for proc in (alive, dead_here):
            proc.kill()
            proc.wait()
        for name in made.values():
            posixshm.unlink(name)


_LEFT_UNREAPED: list = []


def test_the_workers_watchdog_treats_a_zombie_notebook_as_gone(monkeypatch):
    """A kernel killed but not reaped yet is a zombie: ``kill(pid, 0)`` still
    succeeds on it, so the watchdog's own check kept such a worker running;
    it now asks ``posixshm.pid_alive`` as the rest of the worker does."""
    from mpmagic import worker

    class Gone(Exception):
        pass

    def gone(pid: int, code: int) -> None:
        raise Gone(pid, code)

    monkeypatch.setattr(worker, "_exit_notebook_gone", gone)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while posixshm.pid_alive(child.pid):  # exited, not reaped: a zombie
        os.sched_yield()
    seen = []

    def watch() -> None:
        try:
            worker._watch_parent(child.pid)
        except Gone as exc:
            seen.append(exc.args)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    watcher.join(2.0)
    if watcher.is_alive():  # never reaped (nor collected) while a watcher loops on it: it would end pytest
        _LEFT_UNREAPED.append(child)
    else:
        child.wait()
    assert seen == [(child.pid, 3)]


def test_sweep_stale_judges_only_names_of_its_own_pid_namespace(monkeypatch):
    """Containers sharing /dev/shm but not their pids: a pid dead here may be a
    live notebook there, whose segments a pool start here deleted."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    monkeypatch.setattr(posixshm, "NAMESPACE_TAG", "ns5")
    assert posixshm.is_stale(f"mpm_{dead_pid}_ns5_p1_0", "mpm_")
    assert posixshm.is_stale(f"mpsh{dead_pid}_ns5_0a1b2c3d", "mpsh")
    others = [("mpm_", f"mpm_{dead_pid}_ns6_p1_0"), ("mpm_", f"mpm_{dead_pid}_p1_0"),  # another's, an untagged
              ("sem.mpsh", f"sem.mpsh{dead_pid}_ns55_0a1b2c3d.w")]
    for prefix, other in others:
        assert not posixshm.is_stale(other, prefix), other
    assert not posixshm.is_stale(f"mpm_{os.getpid()}_ns5_p1_0", "mpm_")  # alive
    monkeypatch.setattr(posixshm, "NAMESPACE_TAG", "")  # no namespaces (macOS): every pid is ours
    assert posixshm.is_stale(f"mpm_{dead_pid}_p1_0", "mpm_")
    assert posixshm.owned_by(7) == "7_"


def test_sweep_stale_treats_a_zombie_as_dead():
    """A notebook killed but not yet reaped by its parent is a zombie: its segments go."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while posixshm.pid_alive(child.pid):  # exited, not reaped: a zombie
        os.sched_yield()
    name = f"mpm_{posixshm.owned_by(child.pid)}p1_0"
    try:
        posixshm.create(name, 4096).close()
        shm.sweep_stale()
        assert name not in posixshm.names("mpm_")
    finally:
        child.wait()
        posixshm.unlink(name)


def test_a_pool_starts_past_another_users_leftovers_it_may_not_remove(monkeypatch):
    """A shared node's /dev/shm is one sticky directory: another user's dead
    notebook left names this sweep judged stale, and the unlink's EPERM
    escaped through every pool start (``%pmap`` failed for this user for good).
    Another user's names are skipped; a name that still refuses is left."""
    from mpmagic import compat
    from mpmagic import pool as pool_module

    # The leftovers' owner is dead to this process only: a live process whose pid
    # this process's sweeps judge gone. Another pytest session's pool start on the
    # machine sweeps every dead pid's names: it took ``refused`` (its unlink is not
    # the one patched here) or ``theirs`` before the chown, and the checks failed.
    owner = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead_pid = owner.pid
    real_alive = posixshm.pid_alive
    monkeypatch.setattr(posixshm, "pid_alive", lambda pid: pid != dead_pid and real_alive(pid))
    theirs, refused = (f"mpm_{posixshm.owned_by(dead_pid)}p{dead_pid}_{i}" for i in (0, 1))
    real_unlink = compat.shm_unlink

    def unlink(path: str) -> None:
        if path == "/" + refused:
            raise PermissionError(13, "Permission denied", path)
        real_unlink(path)

    monkeypatch.setattr(compat, "shm_unlink", unlink)
    try:
        for name in (theirs, refused):
            posixshm.create(name, 4096).close()
        if os.geteuid() == 0:  # root may remove anything: the uid check must skip it anyway
            os.chown(os.path.join(posixshm.SHM_DIR, theirs), 65534, 65534)
        pool_module.shutdown()
        big = np.arange(300_000, dtype=np.float64)  # 2.4 MB: through shared memory
        assert mpmagic.pmap(np.sum, [big, big], workers=2) == [big.sum()] * 2  # a pool start sweeps
        left = set(posixshm.names("mpm_"))
        assert refused in left
        assert theirs in left or os.geteuid() != 0
    finally:
        monkeypatch.undo()
        for name in (theirs, refused):
            posixshm.unlink(name)
        owner.kill()
        owner.wait()


def test_a_taken_segment_name_is_skipped_for_another(monkeypatch):
    """Segment names are the notebook's pid and a counter: a dead notebook's
    leftover with the reused pid (or another user's squatting) gave a bare
    FileExistsError at the first big-array map, and the next, and so on."""
    import itertools

    monkeypatch.setattr(shm, "_counter", itertools.count(10**6))
    taken = [f"mpm_{posixshm.owned_by(os.getpid())}{kind}{os.getpid()}_{10**6 + i}" for kind in "pl" for i in (0, 1)]
    try:
        for name in taken:
            posixshm.create(name, 4096).close()
        shm.pool().clear()
        big = np.arange(300_000, dtype=np.float64)
        assert mpmagic.pmap(np.sum, [big, big], workers=2) == [big.sum()] * 2
        made = {seg.name for seg in shm.pool().free} - set(taken)
        assert made and all(name.startswith(f"mpm_{posixshm.owned_by(os.getpid())}p{os.getpid()}_") for name in made)
        assert all(name.split("_")[-2] == f"p{os.getpid()}" for name in made)  # (how shm.held reads the kind)
        monkeypatch.setattr(posixshm, "create", lambda name, size: (_ for _ in ()).throw(FileExistsError(17, name)))
        with pytest.raises(shm.SegmentNamesTaken, match=r"8 names in a row were taken \(the last: /dev/shm/mpm_"):
            shm.Segment.create(10)
    finally:
        shm.pool().clear()
        for name in taken:
            posixshm.unlink(name)


# --------------------------------------------------------------------------
# shm.configure(threshold=..., keep_bytes=...)


def _mapped_segments(arrays: list) -> set[str]:
    """Run a map over ``arrays``; return the pooled segments it left for reuse."""
    shm.pool().clear()
    got = mpmagic.pmap(np.sum, arrays, workers=2)
    assert got == [a.sum() for a in arrays]
    return {seg.name for seg in shm.pool().free}


def test_threshold_decides_which_arrays_go_through_shared_memory(settings_back):
    ensure_pool("forkserver")
    small = [np.ones(4096) for _ in range(2)]  # 32 kB each: under the default 1 MiB
    assert _mapped_segments(small) == set()
    shm.configure(threshold=16 << 10)
    assert _mapped_segments(small) != set()
    shm.configure(threshold=1 << 40)  # a huge value turns it off
    assert _mapped_segments([np.ones(300_000)]) == set()  # 2.4 MB through the pipe
    with pytest.raises(ValueError, match="threshold"):
        shm.configure(threshold=0)


def test_config_shm_threshold_reaches_shm(ip, settings_back):
    run(ip, "%config MPMagic.shm_threshold = 12345")
    assert shm.THRESHOLD == 12345


def test_keep_bytes_bounds_the_free_segments_kept_between_calls(settings_back):
    ensure_pool("forkserver")
    kept = _mapped_segments([np.ones(300_000)])  # one 3 MB pooled segment, kept
    assert kept and kept <= mine()
    shm.configure(keep_bytes=0)  # trims at once
    assert shm.pool().free == []
    assert not (kept & mine())  # unlinked, not only forgotten
    assert _mapped_segments([np.ones(300_000)]) == set()  # and nothing kept after a call
    shm.configure(keep_bytes=64 << 20)
    assert _mapped_segments([np.ones(300_000)]) != set()
    with pytest.raises(ValueError, match="keep_bytes"):
        shm.configure(keep_bytes=-1)


# --------------------------------------------------------------------------
# Results are writable in the notebook (issue 13, class 5)


@pytest.mark.parametrize("n", [10, 200_000])
def test_a_task_returning_its_read_only_input_gives_a_writable_result(ip, n):
    """Inputs reach workers read-only (shared, not copied); what comes back is the
    notebook's own writable array, equal to what map() returns."""
    ensure_pool("forkserver")
    run(ip, f"import numpy as np\nxs = [np.arange({n}.0), np.arange({n}.0) * 2]")
    run(ip, "def same(a):\n    return a\n\ndef head(a):\n    return a[:5]\n\ndef pair(a):\n    return {'a': a, 'v': a[1:]}\n")
    for func in ("same", "head", "pair"):
        got = run(ip, f"%pmap -q {func}, xs")
        want = run(ip, f"list(map({func}, xs))")
        for g, w in zip(got, want, strict=True):
            for ga, wa in ((g["a"], w["a"]), (g["v"], w["v"])) if func == "pair" else ((g, w),):
                assert np.array_equal(ga, wa)
                assert ga.flags.writeable, func
                ga[0] = -1.0  # and writing works
    shared = ip.user_ns["shared_x"] = mpmagic.share(np.arange(float(n)))
    got = run(ip, "%pmap -q same, [shared_x]")
    assert got[0].flags.writeable and np.array_equal(got[0], shared)
    for name in ("xs", "same", "head", "pair", "shared_x"):
        ip.user_ns.pop(name, None)


def test_a_fortran_ordered_result_keeps_its_order(ip):
    """A task returning ``big.T`` (Fortran-ordered) of its read-only shared input:
    the writable copy made for the notebook kept C order (plain pickle keeps F)."""
    ensure_pool("forkserver")
    run(ip, "import numpy as np\nbig = np.arange(400_000.0).reshape(400, 1000)\n"
            "def turned(i):\n    return big.T if i else np.asfortranarray(big)\n")
    got, want = run(ip, "%pmap -q turned, [0, 1]"), run(ip, "list(map(turned, [0, 1]))")
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w) and g.strides == w.strides and g.flags.writeable
    for name in ("big", "turned"):
        ip.user_ns.pop(name, None)


def test_big_results_come_back_through_the_pipe_when_no_segment_can_be_made(tmp_path):
    """A worker that cannot make a result's segment (a file-size limit here,
    ``ulimit -f``; ftruncate says EFBIG) sends the result through its pipe.
    Before, the run failed with "`result` is a list, which cannot be pickled
    ... Return plain data", about a numpy array that pickles fine."""
    script = tmp_path / "fsize.py"
    script.write_text(
        "import resource, numpy as np, mpmagic\n"
        "def big(x):\n"
        "    return np.full(200_000, x)\n"  # 1.6 MB: through shared memory when it can
        "if __name__ == '__main__':\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "    got = mpmagic.pmap(big, range(4))\n"
        "    want = list(map(big, range(4)))\n"
        "    print(all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)) and len(got) == 4)\n"
        "    mpmagic.stop_pool()\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stdout + out.stderr


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _full(k):
    return np.full(150_000, k, dtype=float)  # 1.2 MB: through shared memory


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_kept_results_and_mappings_hold_no_file_descriptor():
    """Each kept numpy result held a descriptor of its segment (CPython's mmap
    keeps a ``dup``): under ``ulimit -n 256``, 300 results of 1.2 MB failed the
    map, where serially they cost no descriptor at all."""
    before = open_fds()
    made = posixshm.create(f"mpm_{posixshm.owned_by(os.getpid())}fdtest_0", 3 * 4096 + 5)
    try:
        made[:5] = b"hello"
        shared, private = (posixshm.attach(made_name := f"mpm_{posixshm.owned_by(os.getpid())}fdtest_0"),
                           posixshm.attach(made_name, private=True))
        private[:5] = b"XXXXX"  # copy-on-write: its own pages
        assert open_fds() == before
        assert bytes(shared[:5]) == b"hello" == bytes(made[:5]) and bytes(private[:5]) == b"XXXXX"
        assert len(shared) == len(private) == 3 * 4096 + 5
        view = memoryview(made)
        with pytest.raises(BufferError):  # (mmap's own guard still holds)
            made.close()
        view.release()
    finally:
        posixshm.unlink(made_name)
    for m in (made, shared, private):
        m.close()

    ensure_pool("forkserver")
    assert mpmagic.pmap(_full, range(2))[1][0] == 1.0  # (the pool's own files are open now)
    before = open_fds()
    got = mpmagic.pmap(_full, range(24), chunksize=1)
    assert [a[0] for a in got] == list(range(24))
    assert open_fds() - before < 4, open_fds() - before


def test_a_result_that_cannot_be_mapped_for_lack_of_files_names_the_limit():
    """It blamed the result's type ("Return types the notebook can import")."""
    import errno

    from mpmagic.errors import unloadable_results

    message = str(unloadable_results("the result of item 235", OSError(errno.EMFILE, "Too many open files")))
    assert message.startswith("the result of item 235 came back from the worker but cannot be loaded")
    assert "too many open files" in message and "`ulimit -n`" in message and "RLIMIT_NOFILE" in message
    assert "Return types" not in message and "\n" not in message


def test_items_go_through_the_pipe_when_the_notebook_has_no_file_left(monkeypatch, capfd):
    """Lending a big item with no descriptor left to open its segment raised a bare
    ``OSError: [Errno 24] ... '/mpm_<pid>_..._p<pid>_0'``: the pipe needs none."""
    import errno

    ensure_pool("forkserver")

    def no_files(self, nbytes):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(shm.SegmentPool, "acquire", no_files)
    monkeypatch.setattr(shm, "_advised_files", False)
    assert mpmagic.pmap(np.sum, [np.ones(300_000), np.ones(200_000)]) == [300_000.0, 200_000.0]
    err = capfd.readouterr().err
    assert "went through the pipe instead (slower, still correct): too many open files" in err, err
    assert "`ulimit -n`" in err and "/dev/shm is too small" not in err
    # Said with the first chunk that took the pipe, before the others: "at least" its bytes
    # (it said 2.8 MB where 11.2 MB went through the pipe)
    assert "mpmagic: at least " in err and "MB of array data among the items" in err, err


def test_a_shared_array_freed_by_the_gc_in_a_thread_holding_the_segment_lock_is_no_deadlock():
    """A ``share()`` array's finalizer takes the segment lock, and the cyclic gc may run it
    in a thread that holds that lock already (a collection starts at any allocation
    in a ``with _lock`` block): with a plain lock that thread waited on itself for ever."""

    before = set(shm._shared)
    shared = mpmagic.share(np.arange(10))
    (name,) = set(shm._shared) - before
    cycle: list = [shared]
    cycle.append(cycle)  # only the cyclic gc frees it
    del shared, cycle

    assert collect_cycles_holding(shm._lock)
    assert name not in shm._shared  # unshared: its segment is gone


# --------------------------------------------------------------------------
# %%parallel: the cell's large arrays go through shared memory, as %pmap's do


def test_a_parallel_cells_large_arrays_go_through_shared_memory(ip):
    """A cell reading a big notebook array got it pickled through the pipe, one
    private writable copy per rank (4 s and 660 MB a rank for 320 MB), where a
    %pmap function capturing it maps it from shared memory, read-only."""
    ensure_pool("forkserver")
    run(ip, "import numpy as np\ncell_big = np.arange(400_000, dtype=np.float64)")  # 3.2 MB
    got = run(ip, "%%parallel -n 2 -q\n(float(cell_big[rank::2].sum()), cell_big.flags.writeable)")
    big = ip.user_ns["cell_big"]
    assert list(got) == [(float(big[r::2].sum()), False) for r in range(2)]
    report = mpmagic.last_report()
    assert report.bytes_shared >= big.nbytes and report.bytes_sent < 2 * big.nbytes // 10
    assert shm.pool().free  # its pooled segment came back for the next run once the cell ended
    with pytest.raises(mpmagic.ParallelError) as err:  # read-only, with the note a map's error has
        run(ip, "%%parallel -n 2 -q\ncell_big[0] = 1.0")
    assert "read-only" in str(err.value.failures[0]) and "writable=True" in "".join(err.value.failures[0].__notes__)
    assert big[0] == 0.0


# --------------------------------------------------------------------------
# A file-backed np.memmap travels as its file's name, not its bytes


def test_a_memmap_pickles_as_a_reference_to_its_file_with_its_layout_and_mode(tmp_path):
    """A 400 MB memmap was pickled whole to every worker (two private copies each).
    For workers on this machine it now names its file and place; views keep their strides."""
    from mpmagic import payload

    path = str(tmp_path / "m.bin")
    w = np.memmap(path, dtype="f8", mode="w+", shape=(6000, 7))
    w[:] = np.arange(w.size).reshape(w.shape)
    w.flush()
    for mode in ("r", "c", "r+"):
        m = np.memmap(path, dtype="f8", mode=mode, shape=(1000, 7), offset=8 * 5003)  # (past a page)
        for view in (m, m[100:300:3, 1:6], m[::-1], m.T):
            with payload.memmaps_by_reference():
                data = payload.dumps_data(view)
                assert np.array_equal(payload.loads(payload.cloudpickle_dumps([view]))[0], view)
            got = payload.loads(data)
            assert len(data) < 400 and type(got) is np.memmap and got.filename == m.filename
            assert np.array_equal(got, view) and got.strides == view.strides
            assert got.flags.writeable == (mode != "r")
    assert len(payload.dumps_data(m[:100])) > 5000  # (outside: the bytes, as before, e.g. for Dask)


def test_memmap_items_and_globals_reach_local_workers_by_file_name(ip, tmp_path):
    ensure_pool("forkserver")
    path = str(tmp_path / "g.bin")
    w = np.memmap(path, dtype="f8", mode="w+", shape=(400_000,))  # 3.2 MB
    w[:] = np.arange(w.size)
    w.flush()
    ip.user_ns["mm_big"] = np.memmap(path, dtype="f8", mode="r", shape=(400_000,))
    run(ip, "def mm_part(b):\n    part = mm_big[b[0]:b[1]]\n"
            "    return float(part.sum()), type(mm_big).__name__, mm_big.filename, mm_big.flags.writeable\n"
            "def mm_item(a):\n    return float(a.sum()), a.filename")
    bounds = [(0, 100_000), (100_000, 400_000)]
    got = run(ip, "%pmap -q --chunksize 1 mm_part, " + repr(bounds))
    big = ip.user_ns["mm_big"]
    assert got == [(float(big[a:b].sum()), "memmap", big.filename, False) for a, b in bounds]
    items = run(ip, "%pmap -q --chunksize 1 mm_item, [mm_big[:200_000], mm_big[200_000:]]")
    assert items == [(float(big[:200_000].sum()), big.filename), (float(big[200_000:].sum()), big.filename)]
    report = mpmagic.last_report()
    assert report.bytes_sent < 10_000 and report.bytes_shared == 0  # (not 3.2 MB through the pipe or shm)


def test_a_file_size_limit_is_named_not_a_full_dev_shm(monkeypatch, capsys):
    """``ulimit -f 512`` (HPC batch limits): segments fail with EFBIG, and the notes
    said "/dev/shm is too small or full (25 GB, 25 GB free) ... docker run --shm-size"."""
    import resource

    from mpmagic.shared import NoSharedMemory

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, hard))
    try:
        with pytest.raises(NoSharedMemory, match=r"mpmagic.Queue: the file-size limit \(ulimit -f, 524 kB\) "
                                                 r"is below the .* a /dev/shm segment needs: raise `ulimit -f`"):
            mpmagic.Queue()
        monkeypatch.setattr(shm, "_advised", False)
        shm.advise(2_000_000, "in the results came back through the pipe")  # (a result's: no cause carried)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert "the file-size limit (ulimit -f, 524 kB) keeps /dev/shm segments small: 2.0 MB" in err, err
    assert "docker run" not in err


def test_no_room_for_a_lock_or_value_does_not_suggest_a_smaller_capacity(monkeypatch):
    """A Lock or a Value has no capacity to make smaller; a Queue has."""
    from mpmagic.shared import NoSharedMemory

    def full(name, size):
        raise posixshm.NoRoom(size)

    monkeypatch.setattr(posixshm, "create", full)
    for make in (mpmagic.Lock, lambda: mpmagic.Value("i", 0)):
        with pytest.raises(NoSharedMemory) as caught:
            make()
        assert "/dev/shm has no room" in str(caught.value) and "capacity" not in str(caught.value)
    with pytest.raises(NoSharedMemory, match="or use a smaller capacity"):
        mpmagic.Queue()


def _edit_in_place(df):  # Pool.map(process, df_chunks) as ported: Pool gave a private copy
    df.loc[df.index[0], "y"] = -1.0
    return df


def test_a_dataframe_edited_in_place_is_refused_with_a_note_naming_dataframes():
    """A DataFrame item of 1 MB or more is read-only in the worker, like an array:
    the note says so for DataFrames too, and how to copy (report migrate14 finding 8)."""
    pd = pytest.importorskip("pandas")
    ensure_pool("forkserver")
    frame = pd.DataFrame({"x": np.arange(100_000.0), "y": np.ones(100_000)})  # 1.6 MB
    with pytest.raises(ValueError, match="read-only") as got:
        mpmagic.pmap(_edit_in_place, [frame], workers=1)
    note = next(n for n in got.value.__notes__ if "read-only" in n)
    assert "pandas DataFrames" in note and "df = df.copy()" in note, note


# --------------------------------------------------------------------------
# A stop from another thread between a map's payload and its submit


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _restart_from_another_thread() -> None:
    other = threading.Thread(target=mpmagic.restart_pool)
    other.start()
    other.join(60)


@pytest.mark.parametrize("window", ["restart before submit", "stop still unlinking"])
def test_a_stop_between_a_maps_payload_and_its_submit_leaves_the_run_whole(ip, any_method, window, monkeypatch):
    """A function capturing a large array has its payload name the array's copy
    in /dev/shm. A stop from another thread (``%pool restart``, ``stop_pool``
    beside a background run) landing after ``pmap`` built that payload and before
    the run reached the pool unlinked the copy, and the run went to the fresh pool
    anyway: FileNotFoundError from our shm code in the worker, "the function could
    not be loaded". Nothing had run yet: the run prepares its payload again for the
    new pool and returns what serial ``map`` does. After ``stop_pool`` nothing is
    left: no segment, no worker.

    ``restart before submit``: the restart lands right after the payload was built.
    ``stop still unlinking``: a stop began before the payload was built (served from
    the cache, its copy still there) and unlinked the copy after (its slow phase)."""
    backend = ensure_pool(any_method)
    before = mine()
    run(ip, "import numpy as np\nrace_cap = np.arange(300_000, dtype=np.float64)\n"
            "def use_race_cap(i):\n    return float(race_cap[i])")
    use_cap = ip.user_ns["use_race_cap"]
    expected = list(map(use_cap, range(5)))
    assert mpmagic.pmap(use_cap, range(5)) == expected  # its payload is cached, its copy in /dev/shm
    pids = {s.pid for s in backend.slots}
    want_for = backend.warmth.want_for  # called in submit once the payload is built, before the pool takes the run
    built = threading.Event()

    def hooked(*args):
        monkeypatch.setattr(backend.warmth, "want_for", want_for)  # (once)
        if window == "restart before submit":
            _restart_from_another_thread()
            pids.update(s.pid for s in backend.slots)
        built.set()
        return want_for(*args)

    monkeypatch.setattr(backend.warmth, "want_for", hooked)
    stopper = None
    if window == "stop still unlinking":
        unlinking, cleanup = threading.Event(), shm.cleanup

        def held_cleanup():  # the stop's slow phase: its workers are gone, its segments not yet
            unlinking.set()
            built.wait(60)
            cleanup()

        monkeypatch.setattr(shm, "cleanup", held_cleanup)
        stopper = threading.Thread(target=backend.stop)  # (stop_pool's work, without the pool lock it holds)
        stopper.start()
        assert unlinking.wait(60)
    try:
        assert mpmagic.pmap(use_cap, range(5)) == expected
    finally:
        built.set()
        if stopper is not None:
            stopper.join(60)
    pids.update(s.pid for s in backend.slots)
    assert mpmagic.pmap(use_cap, range(5)) == expected  # and the next call too

    mpmagic.stop_pool()
    assert mine() - before == set()
    assert [pid for pid in pids if not _gone(pid)] == []


def test_a_restart_between_a_cells_packing_and_its_submit_leaves_the_run_whole(ip, local_pool, monkeypatch):
    """The same for a %%parallel cell reading a large notebook array: its pooled
    segment, packed before the submit, was unlinked by the restart. The cell is
    packed again for the new pool and every rank gets the array."""
    local_pool.wait_ready()
    before = mine()
    run(ip, "import numpy as np\ncell_race = np.arange(400_000, dtype=np.float64)")
    big = ip.user_ns["cell_race"]
    check = local_pool.warmth.reloads.check  # called in submit, after the cell was packed

    def hooked(*args):
        monkeypatch.setattr(local_pool.warmth.reloads, "check", check)  # (once)
        _restart_from_another_thread()
        return check(*args)

    monkeypatch.setattr(local_pool.warmth.reloads, "check", hooked)
    got = run(ip, "%%parallel -n 2 -q\nfloat(cell_race[rank::2].sum())")
    assert list(got) == [float(big[r::2].sum()) for r in range(2)]
    mpmagic.stop_pool()
    assert mine() - before == set()


# --------------------------------------------------------------------------
# Two threads' first calls of one function: two copies of its captured array


def test_two_threads_first_calls_of_one_function_keep_each_payloads_copy(ip, method, monkeypatch):
    """Two threads call ``pmap`` at once on a function just defined that captures
    a large array: both miss the payload cache, and each copies the array into a
    segment of its own. The second to store its entry replaced the first's, and
    unlinked the first's copy after that thread's run had checked it
    (``payload_lost``) and before its workers attached to it: FileNotFoundError
    from our shm code, "the function could not be loaded" (a tester: 28 of 200
    calls with 2 threads). A run now holds its payload's segment until it ends.

    The interleaving is forced: both threads copy the array (``shm.wrap``) before
    either stores its entry; the second stores its entry only once the first's run
    passed its check (``MapJob.prefill``, right after it), and the first's run goes
    on once the second's entry is stored. Both get serial ``map()``'s result; the
    replaced copy is unlinked when its run ends; after ``stop_pool`` nothing is left."""
    from mpmagic import jobs

    ensure_pool(method).wait_ready()
    before = mine()
    run(ip, "import numpy as np\ntwin_cap = np.arange(300_000, dtype=np.float64)\n"
            "def use_twin_cap(i):\n    return float(twin_cap[i]) * 2")
    use_cap = ip.user_ns["use_twin_cap"]
    expected = list(map(use_cap, range(6)))
    both_copying = threading.Barrier(2, timeout=60)
    first_checked, second_stored = threading.Event(), threading.Event()
    role: dict[int, int] = {}  # thread -> 0 (first to store its entry) or 1
    wrap, prefill = shm.wrap, jobs.MapJob.prefill

    def hooked_wrap(data, buffers, mode, lease=None, inline=()):
        if mode != "lend" or lease is not None or threading.get_ident() not in role:
            return wrap(data, buffers, mode, lease, inline)  # (not a payload of the two calls)
        out = wrap(data, buffers, mode, lease, inline)
        if both_copying.wait() == 1:  # (both missed the cache: each has its own copy)
            role[threading.get_ident()] = 1
            assert first_checked.wait(60)  # its entry replaces the first's after the first's run checked it
        return out

    def hooked_prefill(job):
        who = role.get(threading.get_ident())
        if who == 0:
            first_checked.set()
            assert second_stored.wait(60)
        elif who == 1:
            second_stored.set()
        return prefill(job)

    monkeypatch.setattr(shm, "wrap", hooked_wrap)
    monkeypatch.setattr(jobs.MapJob, "prefill", hooked_prefill)
    got: dict[int, object] = {}

    def call(n: int) -> None:
        role[threading.get_ident()] = 0
        try:
            got[n] = mpmagic.pmap(use_cap, range(6))
        except BaseException as exc:  # (asserted below, in the test's thread)
            got[n] = exc
            first_checked.set()
            second_stored.set()

    threads = [threading.Thread(target=call, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert got == {0: expected, 1: expected}
    assert sorted(role.values()) == [0, 1]  # (the interleaving was the one forced)
    monkeypatch.undo()
    copies = [name for name in mine() - before if name.split("_")[-2].startswith("l")]
    assert len(copies) == 1, copies  # the cached entry's; the replaced one went with its run
    assert mpmagic.pmap(use_cap, range(6)) == expected  # the next call is served from the cache
    mpmagic.stop_pool()
    assert mine() - before == set()
