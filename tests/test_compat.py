"""mpmagic.compat: each private API works here, and its absence is handled.

The absence is simulated the way a Python or cloudpickle version that lacks
the API would look: the module missing from ``sys.modules`` (an entry of None
makes ``import`` raise ImportError), or the attribute deleted.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import subprocess
import sys
import types
from typing import Any

import pytest

from mpmagic import compat, posixshm
from mpmagic.errors import MPMagicError


@pytest.fixture
def no_module(monkeypatch):
    """Make ``import NAME`` fail, as on a Python built without it."""

    def hide(name: str) -> None:
        monkeypatch.setitem(sys.modules, name, None)

    return hide


@pytest.fixture
def shm_name():
    name = "/mpmtest_" + secrets.token_hex(4)
    yield name
    try:
        os.unlink("/dev/shm" + name)
    except FileNotFoundError:
        pass


def test_every_private_api_is_present_on_this_interpreter() -> None:
    assert all(compat.report().values()), compat.report()


def test_a_python_without_semlock_gets_one_line_that_names_the_missing_api(no_module) -> None:
    assert compat.semlock_class() is sys.modules["_multiprocessing"].SemLock
    no_module("_multiprocessing")
    with pytest.raises(compat.MissingFeatureError) as info:
        compat.semlock_class()
    message = str(info.value)
    assert "_multiprocessing.SemLock" in message and "\n" not in message
    assert "%pool dask" in message  # says what to do instead
    with pytest.raises(compat.MissingFeatureError, match="sem_unlink"):
        compat.sem_unlink("/whatever")
    assert compat.report()["_multiprocessing.SemLock"] is False
    # One of our errors (shown as one line in IPython), and a NotImplementedError to code.
    assert isinstance(info.value, MPMagicError) and isinstance(info.value, NotImplementedError)


def test_semlock_without_rebuild_counts_as_missing(monkeypatch) -> None:
    fake = types.SimpleNamespace(SemLock=type("SemLock", (), {}), sem_unlink=lambda name: None)
    monkeypatch.setitem(sys.modules, "_multiprocessing", fake)
    with pytest.raises(compat.MissingFeatureError, match="SemLock"):
        compat.semlock_class()


def _round_trip(name: str) -> bytes:
    fd = compat.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR)
    try:
        os.ftruncate(fd, 8)
        os.pwrite(fd, b"mpmagic!", 0)
    finally:
        os.close(fd)
    fd = compat.shm_open(name, os.O_RDWR)
    try:
        return os.pread(fd, 8, 0)
    finally:
        os.close(fd)
        compat.shm_unlink(name)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="Linux's /dev/shm")
def test_shared_memory_falls_back_to_dev_shm_without_posixshmem(no_module, shm_name) -> None:
    assert _round_trip(shm_name) == b"mpmagic!"  # the real _posixshmem
    no_module("_posixshmem")
    assert posixshm.shm_available()
    assert _round_trip(shm_name) == b"mpmagic!"  # the fallback: the same names, the same memory
    assert not os.path.exists("/dev/shm" + shm_name)
    with pytest.raises(FileNotFoundError):
        compat.shm_unlink(shm_name)


def test_without_posixshmem_or_dev_shm_shared_memory_says_what_happens(no_module, monkeypatch, shm_name) -> None:
    no_module("_posixshmem")
    monkeypatch.setattr(compat, "_DEV_SHM", "/nonexistent-dev-shm")
    assert not posixshm.shm_available()
    with pytest.raises(compat.MissingFeatureError, match=r"_posixshmem.*pickled instead"):
        compat.shm_open(shm_name, os.O_RDWR)


def test_the_resource_tracker_missing_is_not_an_error(monkeypatch, caplog) -> None:
    import multiprocessing.resource_tracker as tracker

    calls = []
    monkeypatch.setattr(tracker, "register", lambda name, rtype: calls.append(("reg", name, rtype)))
    monkeypatch.setattr(tracker, "unregister", lambda name, rtype: calls.append(("unreg", name, rtype)))
    compat.tracker_register("/x", "shared_memory")
    compat.tracker_unregister("/x", "shared_memory")
    assert calls == [("reg", "/x", "shared_memory"), ("unreg", "/x", "shared_memory")]

    monkeypatch.delattr(tracker, "register")
    monkeypatch.delattr(tracker, "unregister")
    monkeypatch.setattr(compat, "_warned", set())
    with caplog.at_level("INFO", logger="mpmagic"):
        compat.tracker_register("/x", "shared_memory")  # no exception: only the safety net is gone
        compat.tracker_unregister("/x", "shared_memory")
    assert "resource_tracker.register is missing" in caplog.text


def test_without_ensure_running_or_spawns_os_global_workers_start_as_multiprocessing_starts_them(
        monkeypatch, caplog, tmp_path) -> None:
    import multiprocessing.resource_tracker as tracker
    import multiprocessing.spawn as spawn

    monkeypatch.delattr(tracker, "ensure_running")
    monkeypatch.setattr(compat, "_warned", set())
    with caplog.at_level("INFO", logger="mpmagic"):
        compat.start_resource_tracker()  # nothing to start first: no error
    assert "resource_tracker.ensure_running is missing" in caplog.text and "SIGINT" in caplog.text

    with compat.children_start_in(str(tmp_path)):  # the global is swapped while in it
        assert spawn.os.getcwd() == str(tmp_path) and spawn.os.path is os.path
    assert spawn.os is os
    monkeypatch.setattr(spawn, "os", types.ModuleType("os"))  # another multiprocessing: left alone, said once
    with caplog.at_level("INFO", logger="mpmagic"):
        for _ in range(2):
            with compat.children_start_in(str(tmp_path)):
                pass
    assert caplog.text.count("multiprocessing.spawn has no os global") == 1


def test_stopping_the_helper_processes_stops_each_and_skips_a_missing_one(monkeypatch, caplog) -> None:
    import multiprocessing.forkserver as forkserver
    import multiprocessing.resource_tracker as tracker

    stopped = []
    monkeypatch.setattr(forkserver._forkserver, "_stop", lambda: stopped.append("forkserver"))
    monkeypatch.setattr(tracker._resource_tracker, "_stop", lambda: stopped.append("tracker"))
    compat.stop_helper_processes()
    assert stopped == ["forkserver", "tracker"]

    stopped.clear()
    monkeypatch.setattr(forkserver, "_forkserver", object())  # a Python whose ForkServer has no _stop
    with caplog.at_level("INFO", logger="mpmagic"):
        compat.stop_helper_processes()
    assert stopped == ["tracker"]
    assert "multiprocessing.forkserver._forkserver cannot be stopped" in caplog.text


def test_telling_the_tracker_what_was_swept_writes_its_lines_and_starts_no_tracker(monkeypatch) -> None:
    import multiprocessing.resource_tracker as tracker

    r, w = os.pipe()
    monkeypatch.setattr(tracker._resource_tracker, "_fd", w)
    compat.tracker_forget([("/mpsh1_a", "shared_memory"), ("/mpsh1_a.c", "semaphore")])
    os.close(w)
    assert os.read(r, 4096) == b"UNREGISTER:/mpsh1_a:shared_memory\nUNREGISTER:/mpsh1_a.c:semaphore\n"
    os.close(r)
    r, w = os.pipe()
    os.close(r)
    monkeypatch.setattr(tracker._resource_tracker, "_fd", w)
    compat.tracker_forget([("/mpsh1_a", "shared_memory")])  # its pipe broken (the tracker is gone): nothing
    os.close(w)
    monkeypatch.setattr(tracker._resource_tracker, "_fd", None)  # none running: none is started
    monkeypatch.setattr(tracker._resource_tracker, "ensure_running", lambda: pytest.fail("a tracker was started"))
    compat.tracker_forget([("/mpsh1_a", "shared_memory")])
    monkeypatch.setattr(tracker, "_resource_tracker", object())  # a Python without it: nothing
    compat.tracker_forget([("/mpsh1_a", "shared_memory")])


def test_forgetting_inherited_processes_takes_only_those_out_and_survives_a_python_without_the_set(
    monkeypatch, caplog
) -> None:
    import multiprocessing.process as process

    ours, theirs = object(), object()
    monkeypatch.setattr(process, "_children", {ours, theirs})
    compat.forget_inherited_processes([ours])
    assert process._children == {theirs}

    monkeypatch.delattr(process, "_children")
    with caplog.at_level("INFO", logger="mpmagic"):
        compat.forget_inherited_processes([ours])  # no exception: the workers may die, the pool replaces them
    assert "multiprocessing.process._children is missing" in caplog.text
    assert compat.report()["multiprocessing.process._children"] is False


def test_the_hook_before_threads_join_is_registered_and_survives_a_python_without_it(monkeypatch, caplog) -> None:
    """A script's exit waits for its runs in flight there (mpmagic.exiting); a Python
    without ``threading._register_atexit`` registers nothing and says so once, in the log."""
    import threading

    hooks: list = []
    monkeypatch.setattr(threading, "_register_atexit", hooks.append)

    def hook() -> None:
        pass

    assert compat.register_before_threads_join(hook) is True and hooks == [hook]

    def shutting_down(func) -> None:
        raise RuntimeError("can't register atexit after shutdown")

    monkeypatch.setattr(threading, "_register_atexit", shutting_down)
    assert compat.register_before_threads_join(hook) is False
    monkeypatch.delattr(threading, "_register_atexit")
    with caplog.at_level("INFO", logger="mpmagic"):
        assert compat.register_before_threads_join(hook) is False
    assert "threading._register_atexit is missing" in caplog.text
    assert compat.report()["threading._register_atexit"] is False


def test_without_a_usable_dev_shm_the_shared_ctypes_heap_moves_and_survives_a_python_without_it(
    monkeypatch, caplog
) -> None:
    """A missing or read-only /dev/shm failed every worker start in multiprocessing's
    heap (a worker's RawValue); a Python without the attribute changes nothing."""
    import multiprocessing.heap as heap

    monkeypatch.setattr(heap.Arena, "_dir_candidates", ["/dev/shm"])
    compat.heap_off_dev_shm()
    assert heap.Arena._dir_candidates == ["/dev/shm"]  # (a usable one: kept)
    monkeypatch.setattr(posixshm, "dev_shm_usable", lambda: False)
    assert posixshm.shm_available() is False
    for candidates in (["/nonexistent-dev-shm"], ["/proc/self"]):  # (missing; not writable)
        monkeypatch.setattr(heap.Arena, "_dir_candidates", candidates)
        compat.heap_off_dev_shm()
        assert heap.Arena._dir_candidates == []
    monkeypatch.delattr(heap.Arena, "_dir_candidates")
    monkeypatch.setattr(compat, "_heap_said", [])
    with caplog.at_level("INFO", logger="mpmagic"):
        compat.heap_off_dev_shm()
    assert "multiprocessing.heap.Arena._dir_candidates is missing" in caplog.text
    assert compat.report()["multiprocessing.heap.Arena._dir_candidates"] is False


@pytest.mark.parametrize(
    ("accessor", "internal"),
    [
        (compat.cloudpickle_code_reduce, "_code_reduce"),
        (compat.cloudpickle_extract_code_globals, "_extract_code_globals"),
        (compat.cloudpickle_by_reference, "_should_pickle_by_reference"),
    ],
)
def test_a_cloudpickle_without_an_internal_gives_none_for_the_fallback(monkeypatch, accessor, internal) -> None:
    import cloudpickle

    assert accessor() is getattr(cloudpickle.cloudpickle, internal)
    monkeypatch.delattr(cloudpickle.cloudpickle, internal)
    assert accessor() is None



def test_a_python_without_semlock_still_maps_and_each_helper_says_what_is_missing() -> None:
    """Only the helpers need named semaphores: importing mpmagic, pmap and stop_pool work without them."""
    script = (
        "import _multiprocessing\n"
        "del _multiprocessing.SemLock\n"
        "import mpmagic\n"
        "print(mpmagic.pmap(abs, [-1, -2], workers=1))\n"
        "try:\n"
        "    mpmagic.Lock()\n"
        "except NotImplementedError as e:\n"
        "    print(type(e).__name__, e)\n"
        "mpmagic.stop_pool()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    mapped, missing = done.stdout.splitlines()
    assert mapped == "[1, 2]"
    assert missing.startswith("MissingFeatureError mpmagic.Lock: ") and "%pool dask" in missing


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.parametrize("libc", [True, False])
def test_map_fd_keeps_no_descriptor_and_without_ctypes_still_maps(tmp_path, monkeypatch, no_module, libc) -> None:
    """``mmap.mmap`` keeps a dup of the descriptor it maps: one per kept result
    and helper. ``map_fd`` keeps none; without ctypes it is the plain mmap."""
    if not libc:
        monkeypatch.setattr(compat, "_TRACKFD", False)
        monkeypatch.setattr(compat, "_libc", [])
        no_module("ctypes")
    path = tmp_path / "segment"
    path.write_bytes(b"\0" * 2 * 4096 + b"m" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        before = len(os.listdir("/proc/self/fd"))
        shared, private = compat.map_fd(fd, 3 * 4096), compat.map_fd(fd, 3 * 4096, private=True)
        assert len(os.listdir("/proc/self/fd")) - before == (0 if libc else 2)
        with pytest.raises(ValueError, match="greater than file size"):
            compat.map_fd(fd, 4 * 4096)
    finally:
        os.close(fd)
    shared[4096:4099] = b"abc"
    private[:3] = b"xyz"  # copy-on-write: never reaches the file
    assert path.read_bytes()[4096:4099] == b"abc" and path.read_bytes()[:3] == b"\0\0\0"
    assert private[2 * 4096] == shared[2 * 4096] == ord("m") and len(shared) == len(private) == 3 * 4096
    shared.close()
    private.close()
    assert compat.report()["libc mmap (MAP_FIXED)"] is libc


def test_a_worker_started_while_a_run_script_became_main_is_not_told_to_run_it(monkeypatch, tmp_path) -> None:
    """The pool's background start saw the notebook's harmless __main__ and swapped nothing;
    a `%run script.py` then made the script __main__ before the child's preparation data was
    read: the child (and the fork server) ran the whole script again, whose pmap failed with
    multiprocessing's bootstrapping traceback."""
    import multiprocessing.spawn
    import threading

    from mpmagic.backends import local

    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "script.py")
    notebook = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", notebook)
    with local._no_main_module():  # (the start checks __main__: a notebook's, nothing swapped)
        sys.modules["__main__"] = script  # %run, in the main thread, meanwhile
        data = multiprocessing.spawn.get_preparation_data("mpmagic-worker-0")
        forkserver = multiprocessing.spawn.get_preparation_data("ignore")
    assert "init_main_from_path" not in data and "init_main_from_path" not in forkserver
    seen = []  # another thread's start (the user's own Process) is told, as multiprocessing tells it
    with compat.children_ignore_main():
        thread = threading.Thread(target=lambda: seen.append(multiprocessing.spawn.get_preparation_data("x")))
        thread.start()
        thread.join()
    assert seen[0]["init_main_from_path"] == script.__file__


def test_children_of_a_registered_name_ignore_main_whichever_thread_starts_them(monkeypatch, tmp_path) -> None:
    """A Dask nanny starts its worker again from a thread of its own, later: a script's
    __main__ must be dropped for every child of that name, from any thread, until the
    last holder lets go; children of other names are told as multiprocessing tells them."""
    import multiprocessing.spawn
    import threading

    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "script.py")
    monkeypatch.setitem(sys.modules, "__main__", script)

    def told(name: str) -> bool:
        seen: list[dict] = []
        thread = threading.Thread(target=lambda: seen.append(multiprocessing.spawn.get_preparation_data(name)))
        thread.start()
        thread.join()
        return seen[0].get("init_main_from_path") == script.__file__

    release = compat.children_named_ignore_main("nanny child")
    again = compat.children_named_ignore_main("nanny child")
    assert release is not None and again is not None
    try:
        assert not told("nanny child") and told("another child")
        release()
        release()  # (twice: counted once)
        assert not told("nanny child")
    finally:
        again()
    assert told("nanny child")


def _committed_kb() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Committed_AS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or sys.version_info >= (3, 13), reason="Linux, the MAP_FIXED path")
def test_map_fd_reservation_is_not_charged_to_committed_memory(tmp_path, monkeypatch) -> None:
    """The address reservation was a private writable mapping: +4 GiB of Committed_AS for a
    4 GiB segment (the plain mapping of a tmpfs file: nothing), so a segment larger than
    RAM+swap, or any under vm.overcommit_memory=2, failed with a bare ENOMEM."""
    real = compat._libc_mmap()
    seen: list[int] = []

    def watching(*args: Any) -> Any:  # (called while the reservation is in place)
        seen.append(_committed_kb())
        return real(*args)

    monkeypatch.setattr(compat, "_libc", [watching])
    size = 4 << 30
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_RDWR)
    try:
        before = _committed_kb()
        mapping = compat.map_fd(fd, size)
        assert seen[0] - before < (size >> 10) // 4  # (measured: +0 kB with MAP_NORESERVE, +4194304 kB without)
        mapping.close()
        # Strict overcommit ignores MAP_NORESERVE: a refused reservation maps the plain way.
        monkeypatch.setattr(compat, "_MAP_NORESERVE", 0)
        monkeypatch.setattr(compat.mmap, "mmap", _refusing_anonymous(mmap.mmap))
        mapping = compat.map_fd(fd, 3 * 4096)
        assert len(mapping) == 3 * 4096
        mapping.close()
        with pytest.raises(ValueError, match="empty file"):
            compat.map_fd(fd, 0)
    finally:
        os.close(fd)


def _refusing_anonymous(real: Any) -> Any:
    def mmap_(fd: int, *args: Any, **kwargs: Any) -> Any:
        if fd == -1:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(fd, *args, **kwargs)
    return mmap_


@pytest.mark.skipif(not sys.platform.startswith("linux") or sys.version_info >= (3, 13), reason="Linux, the MAP_FIXED path")
@pytest.mark.parametrize("covered", [True, False])
def test_a_failed_fixed_mapping_never_unmaps_a_range_it_may_not_own(tmp_path, monkeypatch, covered) -> None:
    """A failed MAP_FIXED may already have unmapped the range, and another thread may map
    there before close()'s munmap: the range is covered again first, or never unmapped."""
    real = compat._libc_mmap()
    calls: list[tuple] = []

    def failing(address: int, size: int, prot: int, flags: int, fd: int, offset: int) -> Any:
        calls.append((prot, flags, fd))
        if fd != -1 or not covered:
            ctypes.set_errno(errno.ENOMEM)
            return None
        return real(address, size, prot, flags, fd, offset)

    import ctypes

    monkeypatch.setattr(compat, "_libc", [failing])
    monkeypatch.setattr(compat, "_orphans", [])
    path = tmp_path / "segment"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError, match=r"mapping a shared-memory segment .*vm.max_map_count") as info:
            compat.map_fd(fd, 4096)
    finally:
        os.close(fd)
    assert info.value.errno == errno.ENOMEM
    assert [fd_ for _, _, fd_ in calls] == [fd, -1] and calls[1][0] == 0  # (PROT_NONE, anonymous)
    assert len(compat._orphans) == (0 if covered else 1)


def test_without_warnings_filters_mutated_a_worker_swaps_filters_the_public_way(monkeypatch) -> None:
    """warnings._filters_mutated is private (3.14 renames it): without it, a unit's filters
    go in and come out through resetwarnings and simplefilter, and still work."""
    import warnings

    from mpmagic import worker_logging

    assert compat.warnings_filters_mutated() is warnings._filters_mutated  # type: ignore[attr-defined]
    with monkeypatch.context() as m:  # (a warnings module without it: the real one's is needed by catch_warnings)
        m.setitem(sys.modules, "warnings", types.SimpleNamespace(filters=[]))
        assert compat.warnings_filters_mutated() is None and compat.report()["warnings._filters_mutated"] is False
    monkeypatch.setattr(worker_logging, "_filters_mutated", compat.warnings_filters_mutated())
    monkeypatch.setattr(worker_logging, "_unit_cache", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        saved = list(warnings.filters)
        worker_logging._set_unit_filters(saved)
        assert warnings.filters != saved
        warnings.filters[:] = saved


def test_a_pandas_without_its_option_store_carries_no_options(monkeypatch, caplog) -> None:
    """The notebook's pandas options travel through pandas' private option store;
    a pandas without it carries none (one INFO line), and a call still works."""
    import logging

    pd = pytest.importorskip("pandas")
    assert compat.pandas_option_store(pd) is not None
    from mpmagic import context

    fake = types.ModuleType("pandas")  # (a pandas that keeps its options elsewhere)
    monkeypatch.setattr(compat, "_pandas_store_missing", [])
    with caplog.at_level(logging.INFO, logger="mpmagic"):
        assert compat.pandas_option_store(fake) is None
        assert context._pandas_options(fake) == ()
    assert [r.getMessage() for r in caplog.records].count(
        "mpmagic: this pandas keeps its options elsewhere; the notebook's pandas options (pd.set_option) "
        "are not carried to the workers") == 1


def test_a_magic_cells_source_parses_past_its_magic_line_and_survives_an_executing_without_its_cache(
        monkeypatch) -> None:
    """IPython's tracebacks read a frame's variables from executing's and stack_data's
    parse of its file: a %%parallel cell's ``%%`` line failed it. The cell's Source gets
    the tree of its lines with that line a comment; its lines stay as they are, also
    when IPython has not imported executing yet (it does at its first traceback, which
    may be the rank's). An executing without that cache: nothing parsed, no error."""
    import linecache

    import executing
    import stack_data

    name = "<mpmagic-test-magic-cell>"
    lines = ["%%parallel -n 2\n", "x = rank * 2\n", "y = 1 / (x - 2)\n"]
    monkeypatch.setitem(linecache.cache, name, (sum(map(len, lines)), None, lines, name))
    with monkeypatch.context() as unloaded:
        for module in ("executing", "stack_data"):  # (imported again: their classes, and caches, are the same)
            unloaded.delitem(sys.modules, module)
        assert compat.parse_magic_cell(name) is True
    for cls in (executing.Source, stack_data.Source):
        source = cls.for_filename(name)
        assert source.tree is not None and [type(s).__name__ for s in source.tree.body] == ["Assign", "Assign"]
        assert source.lines[0] == "%%parallel -n 2" and source.text.startswith("%%parallel")
    other = "<mpmagic-test-magic-cell-2>"
    monkeypatch.setitem(linecache.cache, other, (sum(map(len, lines)), None, lines, other))
    monkeypatch.delattr(executing.Source, "_for_filename_and_lines")
    assert compat.parse_magic_cell(other) is False
    assert compat.report()["executing.Source._for_filename_and_lines"] is False
