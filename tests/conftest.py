"""Shared fixtures: a notebook-like IPython shell, pools per start method, and
a check at the end of the session that no worker process was left behind."""

from __future__ import annotations

import gc
import os
import re
import signal
import sys
import time
import warnings
from typing import Any

import psutil
import pytest
from IPython.core.interactiveshell import InteractiveShell

# The suite starts hundreds of Python processes (spawn workers, kernels, scripts), and
# under PYTHONDONTWRITEBYTECODE each compiled mpmagic's sources again (a spawn worker
# 0.18 s instead of 0.10, a kernel's imports 0.30 s instead of 0.15), and pytest rewrote
# every test file's asserts anew each run: test_shared + test_reliability took 13%
# longer. Their .pyc files go to __pycache__ (ignored by git), as without the variable.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
    sys.dont_write_bytecode = False

# The interrupt tests send this process SIGINT, as a kernel's interrupt does, and
# expect KeyboardInterrupt. A shell starts a background job (``cmd &`` without job
# control, as a CI script may) with SIGINT ignored, and Python then keeps it ignored:
# every such test hung until its timeout. Python's own handler, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import mpmagic  # noqa: E402
from mpmagic import pool as pool_module  # noqa: E402

START_METHODS = ["forkserver", "spawn", "fork"]

# Warm workers (mpmagic/warmup.py) would make every pool the tests start import
# what earlier tests imported in the shared shell (numpy, pandas, dask...), in
# the background of the next test's timings. tests/test_warm.py turns it on in
# the fresh notebook processes it starts.
os.environ.setdefault("MPMAGIC_WARM", "0")


@pytest.fixture(scope="session")
def ip():
    """One InteractiveShell for the session, with mpmagic loaded.

    Functions defined through ``ip.run_cell`` live in a ``__main__`` that has
    no file, exactly as in a notebook.
    """
    shell = InteractiveShell.instance(colors="nocolor")
    shell.run_cell("%load_ext mpmagic", store_history=False)
    _notebook_names.note_baseline(shell.user_ns)
    yield shell
    mpmagic.stop_pool()


def synthetic_report(**fields):
    """A pmap Report of 8 items on 2 local workers with the given fields changed:
    deterministic input for the report's text and advice."""
    from mpmagic.report import Report

    base = dict(kind="pmap", items=8, workers=2, backend="local", start_method="forkserver",
                wall=1.0, task_seconds=1.9, chunks=8, chunksize="auto (1)", cores=2)
    return Report(**{**base, **fields})


def chunk_row(report, n_items: int) -> tuple[int, int, int | None, int]:
    """The report's "chunk size" row read back as (smallest, largest, size asked, chunks),
    checked against the ``n_items`` the run sent: chunks of the sizes it states
    (a fixed size's last chunk may hold the rest) add up to them."""
    import re

    text = dict(report.rows())["chunk size"]
    m = re.fullmatch(r"(?:auto: )?(\d+)(?:-(\d+))? items? per chunk(?: \(cut from the (\d+) asked\))?, (\d+) chunks?",
                     text)
    assert m, text
    lo, hi = int(m[1]), int(m[2] or m[1])
    asked, chunks = (int(m[3]) if m[3] else None), int(m[4])
    assert (chunks - 1) * lo < n_items <= chunks * hi, text
    return lo, hi, asked, chunks


def interrupted_cell(ip, code: str, after: float = 0.6, started: Any = None) -> tuple[str, BaseException | None]:
    """Run ``code`` as a cell and interrupt it ``after`` seconds in (SIGINT to the
    main thread, as the kernel's interrupt): (what it showed, its error). With
    ``started`` (a path a task creates as it begins), ``after`` seconds after that file
    exists: a test of what an interrupt of running work says must not depend on the
    run's start taking less than ``after`` (on a loaded machine it took more)."""
    import signal
    import threading

    from IPython.utils.capture import capture_output

    cancelled = threading.Event()

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while started is not None and not os.path.exists(started) and time.monotonic() < deadline:
            if cancelled.wait(0.01):
                return
        if not cancelled.wait(after):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    timer = threading.Thread(target=interrupt, daemon=True)
    timer.start()
    try:
        with capture_output() as cap:
            result = ip.run_cell(code, store_history=False)
    finally:
        cancelled.set()
        timer.join()
    return cap.stdout + cap.stderr, result.error_in_exec


def first_press_interrupts(blocked: Any, after: float, within: float) -> None:
    """In the window an interrupted run leaves (``interrupts.absorb_late_interrupts``:
    presses then are taken as repeats of it), call ``blocked()`` (a helper's wait) and press
    Ctrl-C once, ``after`` seconds in (SIGINT to the main thread): it must raise
    KeyboardInterrupt within ``within`` seconds, as serial code's wait does at once."""
    import signal
    import threading

    from mpmagic import interrupts

    interrupts.absorb_late_interrupts(30)  # (as an interrupted run leaves it, for long)
    timer = threading.Timer(after, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    try:
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            blocked()
        assert time.monotonic() - t0 < within  # (before: it waited on, to its timeout)
    finally:
        timer.join()
        interrupts.restore()


def collect_cycles_holding(lock) -> bool:
    """Run the cyclic gc in a thread that holds ``lock`` (a collection starts at any
    allocation, in whatever thread, holding whatever it holds): True if that thread
    was done within 5 s, False if a finalizer waited on the lock its thread holds."""
    import gc
    import threading

    def collect() -> None:
        with lock:
            gc.collect()

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    collector.join(5)
    return not collector.is_alive()


def check_lazy_inputs_equal_serial(func, n_rows: int, n_nested: int) -> None:
    """The lazy inputs that must be read in the calling thread, as serial map reads
    them, each checked against serial map (the local pool's tests and Dask's run
    the same cases): a generator over a thread-bound sqlite3 cursor, and one that
    starts runs itself."""
    import sqlite3

    db = sqlite3.connect(":memory:")
    try:
        db.execute("create table t(x)")
        db.executemany("insert into t values (?)", [(i,) for i in range(n_rows)])

        def rows():
            for (x,) in db.execute("select x from t order by x"):
                yield x

        assert mpmagic.pmap(func, rows()) == list(map(func, rows()))
    finally:
        db.close()

    def sums(inner):
        for i in range(n_nested):
            yield sum(inner(func, [i, i + 1]))

    assert mpmagic.pmap(func, sums(mpmagic.pmap), chunksize=2) == list(map(func, sums(map)))


@pytest.fixture
def notebook_warnings(monkeypatch):
    """Warnings shown as in a notebook, not recorded by pytest: pytest runs
    each test inside ``catch_warnings(record=True)``, and mpmagic hands a
    task's warning to such a hook (as serial code's warning goes to it)
    instead of printing its labelled line."""
    import warnings

    from mpmagic import worker_logging

    monkeypatch.setattr(warnings, "showwarning", worker_logging._SHOW_DEFAULT)
    monkeypatch.setattr(warnings, "_showwarnmsg_impl", worker_logging._SHOW_IMPL_DEFAULT)


def trickle_results(stream_of) -> tuple[list, int | None]:
    """Feed 8 items into a queue from another thread, one every 0.15 s, and
    iterate ``stream_of(iter(q.get, None))``: its results, and how many items
    had been put when the first result came (fewer than 8: results come as
    the items do, not once the input ended)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue()
    put: list[int] = []

    def produce() -> None:
        for i in range(8):
            q.put(i)
            put.append(i)
            time.sleep(0.15)
        q.put(None)

    threading.Thread(target=produce, daemon=True).start()
    got, put_at_first = [], None
    for value in stream_of(iter(q.get, None)):
        if put_at_first is None:
            put_at_first = len(put)
        got.append(value)
    return got, put_at_first


def kill_in_its_second_item(folder, pid: int) -> None:
    """In a thread: SIGKILL worker ``pid`` ~0.15 s into its second item, told by the files
    its items write in ``folder`` (``{pid}-{item}``): its first item's start is surely
    heard of by then (a Dask worker killed while it runs an item Dask then runs again)."""
    import threading

    def kill() -> None:
        deadline = time.monotonic() + 30
        while len(list(folder.glob(f"{pid}-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.15)
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()


def low_recursion_limit(headroom: int = 100) -> int:
    """A recursion limit ``headroom`` frames above the caller's depth: a RecursionError
    test's tracebacks stay short (about ``headroom`` frames here, a few more in a worker,
    whose stack starts shallower). IPython shows a traceback at a cost of frames x
    loaded modules (ultratb's ``inspect.getmodule`` scans ``sys.modules`` for each
    frame of a cell): a fixed limit of 400-600 cost these tests 4-12 s each once the
    suite had loaded pandas, Dask and Jupyter, and under a second in a fresh process."""
    depth, frame = 0, sys._getframe(1)
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth + headroom


def run(ip, code: str):
    """Run a cell; fail the test with the cell's error if it raised."""
    result = ip.run_cell(code, store_history=False)
    if result.error_before_exec is not None:
        raise result.error_before_exec
    if result.error_in_exec is not None:
        raise result.error_in_exec
    return result.result


@pytest.fixture(scope="session", params=["forkserver", "spawn"])
def method(request):
    """A start method (session-scoped, so pytest groups tests by it)."""
    return request.param


@pytest.fixture(scope="session", params=START_METHODS)
def any_method(request):
    """Like ``method`` with fork too; use ``ensure_pool(any_method)`` in the test."""
    return request.param


# Pools the core %pmap / %%parallel tests run against (parametrized, not
# copied): the local backend per start method, and "dask": a real scheduler
# and DASK_WORKERS workers started by ``dask_cluster`` below. Session-scoped
# parameters let pytest group the tests by pool, so each starts once.
BACKENDS = ["forkserver", "spawn", "dask"]
DASK_WORKERS = 4


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """``dask scheduler`` + two ``dask worker --nworkers 2 --nthreads 1`` on 127.0.0.1.

    That is DASK_WORKERS single-threaded worker processes, enough for the core
    ``%%parallel -n 4`` tests (Dask runs each rank on its own worker process).
    Started once per session, each command in its own session (a notebook
    interrupt does not reach them), and always stopped: their process groups
    are killed at teardown. ``allowed-failures=1``: a task whose worker dies is
    retried once elsewhere, then reported (keeps the worker-death tests short).
    """
    from dask_cluster import DaskProcesses

    cluster = DaskProcesses(
        tmp_path_factory.mktemp("dask"),
        n_commands=2,
        per_command=DASK_WORKERS // 2,
        env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"},
    )
    cluster.start()
    yield cluster
    if getattr(pool_module.current_pool(), "name", None) == "dask":
        pool_module.shutdown()
    killed = cluster.stop()  # (what is left after it: the session's end says, pytest_sessionfinish)
    if killed:  # (slow, not wrong: killed, and none is left; the warnings summary names them)
        warnings.warn(f"Dask processes that did not end within 10 s of their SIGTERM, killed: {killed}", stacklevel=1)


@pytest.fixture(scope="session", params=BACKENDS)
def backend_kind(request):
    return request.param


def ensure_pool(kind: str, request=None):
    """Make the current pool the one named ``kind`` (re-using it if it is)."""
    current = pool_module.current_pool()
    if kind in START_METHODS:
        if (
            getattr(current, "name", None) != "local"
            or current.start_method != kind
            or current.workers != 2
            or current.max_tasks_per_child
        ):
            # use_local keeps settings it is not given (max_tasks_per_child):
            # start from a clean pool instead.
            pool_module.shutdown()
            mpmagic.use_local(2, kind)
        return pool_module.get_pool()
    if kind == "dask":
        cluster = request.getfixturevalue("dask_cluster")
        if getattr(current, "name", None) != "dask" or current.address != cluster.address:
            mpmagic.use_dask(cluster.address)
        backend = pool_module.get_pool()
        backend.start()
        backend.client.wait_for_workers(DASK_WORKERS, timeout=60)  # a test may have killed one
        return backend
    raise ValueError(f"unknown pool kind {kind!r}")


@pytest.fixture
def backend(backend_kind, request):
    """The pool of this test's parameter: local forkserver, local spawn (, dask)."""
    return ensure_pool(backend_kind, request)


@pytest.fixture
def pool2(ip):
    """The session's warm 2-worker forkserver pool (a module may add its own definitions)."""
    backend = ensure_pool("forkserver")
    backend.wait_ready()
    return backend


@pytest.fixture
def local_pool(method):
    """A 2-worker local pool with the test's start method."""
    return ensure_pool(method)


#: IPython's own names, kept whoever made them: ``_``, ``__``, ``___``, ``_i``, ``_ii``,
#: ``_iii``, ``_iN`` and ``_N`` (a cell's input and output history), ``_ih``, ``_oh``, ``_dh``.
_IPYTHON_NAME = re.compile(r"_+|_i{1,3}|_i?\d+|_[iod]h")


class _NotebookNamesPerModule:
    """Each test module sees in the session's shell only the notebook names it made.

    One ``ip`` shell serves every test file a test process runs, and which files share
    a process, in which order, changes as tests are added (``--dist loadfile``). A
    name one file left in ``ip.user_ns`` (``CFG = {'a': 1}``) was a notebook global for
    a later file's test, and mpmagic, as serial Python, sends a function's notebook
    globals with it: a ``%%pool setup`` defining the same name saw the notebook's value
    and failed, in one file order only. So every name made since the shell was (not in
    :meth:`note_baseline`'s set, not IPython's own) is owned by the module whose test (or
    module-scoped fixture) made or rebound it; before a test, the names of other modules
    are set aside and that module's own put back. Tests of one module still build on
    each other's names, even when pytest interleaves modules' tests (it groups tests by
    session-scoped parameters, ``method[forkserver]`` before ``method[spawn]``, across
    modules): a module-scoped cleanup would not do. Set aside, not deleted: a module's
    objects live on as they did (their ends, the session's leak checks, unchanged).

    Cost: one pass over ``user_ns`` before and after each test (a few hundred names,
    tens of microseconds), and only once the shell exists; it never creates it.
    """

    def __init__(self) -> None:
        self.baseline: frozenset[str] | None = None
        self.owner: dict[str, str] = {}  # name in user_ns -> its module
        self.aside: dict[str, dict[str, Any]] = {}  # module -> its names set aside
        self.seen: set[tuple[str, int]] = set()  # (name, id(value)) at the last look

    def note_baseline(self, ns: dict[str, Any]) -> None:
        """The names the shell has once made (mpmagic loaded): never set aside."""
        if self.baseline is None:
            self.baseline = frozenset(ns)
            self.seen = self._look(ns)

    @staticmethod
    def _look(ns: dict[str, Any]) -> set[tuple[str, int]]:
        return {(name, id(value)) for name, value in ns.items()}

    def _own_what_changed(self, ns: dict[str, Any], module: str) -> None:
        """Names bound or rebound since the last look are ``module``'s."""
        look = self._look(ns)
        assert self.baseline is not None
        for name, _ in look - self.seen:
            if name not in self.baseline and not _IPYTHON_NAME.fullmatch(name):
                self.owner[name] = module
        self.seen = look

    def before(self, ns: dict[str, Any], module: str) -> None:
        """Before a test of ``module``: only its own names, and the baseline's."""
        if self.baseline is None:  # (a shell made without the ``ip`` fixture)
            self.note_baseline(ns)
        self._own_what_changed(ns, module)  # (its module-scoped fixtures made them)
        others = [name for name, owner in self.owner.items() if owner != module]
        for name in others:
            aside = self.aside.setdefault(self.owner.pop(name), {})
            if name in ns:  # (gone if a test deleted it, or a ``%reset``)
                aside[name] = ns.pop(name)
        for name, value in self.aside.pop(module, {}).items():
            if name not in ns:  # (else its module-scoped fixture made it anew)
                ns[name] = value
                self.owner[name] = module
        self.seen = self._look(ns)

    def after(self, ns: dict[str, Any], module: str) -> None:
        """After a test of ``module``: what it bound is its module's."""
        if self.baseline is not None:
            self._own_what_changed(ns, module)


_notebook_names = _NotebookNamesPerModule()


@pytest.fixture(autouse=True)
def _notebook_names_of_this_module_only(request):
    """See :class:`_NotebookNamesPerModule`; only once the session's shell exists."""
    module = str(request.node.path)
    if InteractiveShell.initialized():
        _notebook_names.before(InteractiveShell.instance().user_ns, module)
    yield
    if InteractiveShell.initialized():  # (made during the test, its names are its module's too)
        _notebook_names.after(InteractiveShell.instance().user_ns, module)


@pytest.fixture(autouse=True)
def _settings_back_to_defaults():
    """``%config MPMagic...`` set by one test (or docs page) must not leak
    into the next: a leftover chunksize changes how work is split."""
    yield
    from mpmagic import config

    config.current().reset()
    # Kept ranks (%%parallel --keep) of one test are not the next test's.
    ranks = sys.modules.get("mpmagic.ranks")
    if ranks is not None:
        ranks.reset()
    # Background runs one test finished are not listed under the next test's %pool.
    background = sys.modules.get("mpmagic.background")
    if background is not None:
        with background._lock:
            for key in [k for k, r in background._registry.items() if r.done()]:
                del background._registry[key]


@pytest.fixture(autouse=True)
def _local_pool_unless_dask_asked(request):
    """A test that asks for no pool gets the default local one, even right
    after the Dask-parametrized tests left a Dask pool current."""
    names = request.fixturenames
    if "backend" in names or any(n.startswith("dask") for n in names):
        return
    if getattr(pool_module.current_pool(), "name", None) == "dask":
        pool_module.shutdown()


def leftover_processes() -> list[psutil.Process]:
    """Descendants of this process other than multiprocessing's own helpers.

    The forkserver and the resource tracker are direct children that
    multiprocessing keeps until the interpreter exits; everything else (our
    workers, kernels and Dask servers started by tests) must be gone.
    """
    me = psutil.Process(os.getpid())
    helpers = set()
    for p in me.children():
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "forkserver" in cmd or "resource_tracker" in cmd:
            helpers.add(p.pid)
    left = []
    for p in me.children(recursive=True):
        try:
            if p.pid not in helpers and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.Error:
            pass
    return left


@pytest.fixture(scope="module", autouse=True)
def _earlier_modules_objects_set_aside():
    """Each module's ``gc.collect()`` calls walk only what the module made.

    Many tests drop what they made and collect (a helper's names, a run's
    memory, a leak count). A full collection walks every object of the
    process: after the first modules (IPython, Dask, pandas, MkDocs in this
    process) that is 0.1-0.3 s a pass, ~30 s of a whole run. Here, at each
    module's start, once nothing of the earlier modules is garbage
    (``gc.collect()``), what exists is set aside (``gc.freeze()``): it stays
    alive as it would anyway, and a later collection skips it. Garbage made
    from then on is collected as before; cycles among set-aside objects that
    become garbage later wait for the session's end (``pytest_sessionfinish``
    collects them before its leak check).
    """
    gc.collect()
    gc.freeze()
    yield


def collect_everything() -> None:
    """``gc.collect()`` over every object, those set aside at the module's start too
    (``_earlier_modules_objects_set_aside``): for a check of the whole process (every
    result segment still mapped), not only of what the module made. One full pass."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


#: tests/test_chaos.py, once its soak was started beside the session's first tests.
_soak_module: Any = None


def pytest_collection_finish(session):
    """Start the chaos soak (tests/test_chaos.py) as the tests begin, if it is among them.

    The soak runs in its own interpreter for ~10 s, nearly all of it waiting (its
    items sleep, its faults wait on timers: ~1 s of CPU). Started here it runs beside
    the tests before it, and its test only reads its outcome: ~10 s less of the
    session's wall time, every check the same."""
    global _soak_module
    if session.config.option.collectonly:
        return
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and item.name == getattr(module, "SOAK_TEST", None):
            _soak_module = module
            module.start_soak()
            return


def wait_for_work_beside() -> None:
    """Until the work started beside the tests (``pytest_collection_finish``) has ended."""
    if _soak_module is not None:
        _soak_module.wait_soak()


@pytest.fixture
def no_work_beside():
    """For a test that counts this process's children or threads: the chaos soak,
    started beside the first tests, has ended (in the usual order it ended long
    before; a session listing such a test first waits here)."""
    wait_for_work_beside()


#: This process only reports the tests pytest-xdist's test processes run (set at the
#: session's start): it starts nothing, and checks nothing of its own.
_reporting_only = False


def pytest_sessionstart(session):
    global _reporting_only
    _reporting_only = session.config.pluginmanager.has_plugin("dsession")


#: Test files that share what a session made once (``--dist loadfile`` keeps each file in
#: one process; these go to one process together): the example notebooks, executed once
#: (tests/executed_notebooks.py), whose outputs both check.
_FILES_TOGETHER = {"tests/test_docs_site.py": "tests/test_notebooks.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """(pytest-xdist) ``--dist loadfile``, with the files of :data:`_FILES_TOGETHER` as one."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class _FilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return _FILES_TOGETHER.get(scope, scope)

    return _FilesTogether(config, log)


#: What the processes of a pytest-xdist run (``dev.py test`` runs two) found left at
#: their session's end, as the one that reports heard it (``pytest_testnodedown``).
_left_in_xdist_workers: list[str] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """(pytest-xdist, in the process that reports) A test process ended: keep what its
    session's end found left. Its exit status alone would not fail the run."""
    output = getattr(node, "workeroutput", None) or {}
    _left_in_xdist_workers.extend(f"[{node.gateway.id}] {line}" for line in output.get("mpmagic_left", ()))


def pytest_sessionfinish(session, exitstatus):
    """No worker may outlive the test run: stop everything, then check.

    Under pytest-xdist each test process checks what it started (its own descendants,
    segments and semaphores) and sends what it found to the process that reports,
    which starts nothing itself and fails the run on what they sent."""
    if _reporting_only:
        for line in _left_in_xdist_workers:
            print(f"\n{line}")
        if _left_in_xdist_workers:
            session.exitstatus = 1
        return
    found = _left_at_the_end()
    for line in found:
        print(f"\n{line}")
    if found:
        session.exitstatus = 1
        output = getattr(session.config, "workeroutput", None)
        if output is not None:  # (an xdist test process: the reporting one says it)
            output["mpmagic_left"] = found


def _left_at_the_end() -> list[str]:
    """Stop every pool, then what is left of this process's run: one line each kind."""
    found = []
    if _soak_module is not None:  # (a session stopped before its test: its soak ends here)
        _soak_module.stop_soak()
    collect_everything()  # (garbage among what the modules set aside too, as without the freeze)
    pool_module.shutdown()
    # (10 s for the run's processes to end; tests/test_session_checks.py's runs, less)
    deadline = time.monotonic() + float(os.environ.get("MPMAGIC_TESTS_LEFT_WAIT", "10"))
    left = leftover_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = leftover_processes()
    if left:
        desc = [(p.pid, " ".join(p.cmdline())[:80]) for p in left if p.is_running()]
        found.append(f"LEAKED PROCESSES after the test session: {desc}")
    segments = leftover_segments()
    if segments:
        found.append(f"LEAKED SHARED MEMORY after the test session: {segments}")
    helpers = sys.modules.get("mpmagic.shared.base")
    if helpers is not None:  # (what this process's exit does: its own helpers' names go)
        helpers.release_all()
    semaphores = leftover_semaphores()
    if semaphores:
        found.append(f"LEAKED SEMAPHORES after the test session (seen open in a process of the run): {semaphores}")
    return found


#: Named semaphores (``/dev/shm/sem.*``) that a process this run started had open at
#: some test's end, by (device, inode): Dask nannies' queues, helpers made in workers,
#: multiprocessing locks. (By inode: the process that made one maps it under the
#: temporary name glibc creates it as, "sem.XXXXXX (deleted)", before linking it.)
_semaphores_seen: set[tuple[str, int]] = set()


def _semaphores_open_in(pid: int) -> set[tuple[str, int]]:
    try:
        with open(f"/proc/{pid}/maps") as maps:
            fields = [line.split() for line in maps if "/dev/shm/sem." in line]
    except OSError:  # (gone, or no /proc: macOS)
        return set()
    return {(f[3], int(f[4])) for f in fields if len(f) > 5}


#: What the last look at the run's processes saw: their pids and /dev/shm's semaphores.
_last_look: tuple[frozenset[int], frozenset[tuple[str, int]]] | None = None


def pytest_runtest_logfinish(nodeid, location):
    """Note the semaphores the run's other processes hold (see leftover_semaphores).

    Reading every process's memory map costs ~5-10 ms a test (~15-25 s of the
    suite), so it is read again only when a process of the run started or ended,
    or a semaphore was made or unlinked since the last look (a listing, ~0.1 ms)."""
    global _last_look
    if _reporting_only:  # (the test processes look at theirs)
        return
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    look = (frozenset(c.pid for c in children), frozenset(_semaphore_files()))
    if look == _last_look:
        return
    _last_look = look
    for child in children:
        _semaphores_seen.update(_semaphores_open_in(child.pid))


def _semaphore_files() -> dict[tuple[str, int], str]:
    found = {}
    try:
        with os.scandir("/dev/shm") as entries:
            for entry in entries:
                if entry.name.startswith("sem."):
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    found[(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", st.st_ino)] = entry.name
    except OSError:
        pass
    return found


def leftover_semaphores() -> list[str]:
    """Semaphores a process of the run had open that are still in /dev/shm once every
    process of the run is gone, but for this process's own (its exit removes those).

    A process that ends normally unlinks what it made; one killed leaves them to its
    resource tracker, which unlinks them once its last process has gone: a leak is a
    tracker killed first (a SIGKILL to a whole process group), or a name no process
    registered. Polled for a few seconds: the trackers may still be at it."""
    deadline = time.monotonic() + 5
    while True:
        mine = _semaphores_open_in(os.getpid())
        left = sorted(name for key, name in _semaphore_files().items() if key in _semaphores_seen - mine)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def leftover_segments() -> list[str]:
    """/dev/shm entries named after this process (``mpm_<pid>_...``) once every
    pool is stopped: the transport's segments must all be unlinked by then."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:  # no /dev/shm (macOS, Windows): nothing to list
        return []
    return sorted(n for n in names if n.startswith(f"mpm_{os.getpid()}_"))


@pytest.fixture(scope="module")
def kernel():
    """A real Jupyter kernel for the module (tests/test_kernel.py's ``Kernel``),
    with mpmagic loaded and a 2-worker pool; shut down after the module."""
    pytest.importorskip("jupyter_client")
    from test_kernel import Kernel

    k = Kernel()
    try:
        k.ok("%load_ext mpmagic\n%pool start -n 2")
        yield k
    finally:
        k.close()


def ctrl_c_during_the_exit_wait(proc: Any, runs: int) -> tuple[str, str]:
    """A script ending with ``runs`` runs in flight (``proc``: its Popen, text pipes):
    wait for the exit's line saying what it waits for, press Ctrl-C, and return the
    script's (stdout, stderr after that line); the process is always ended."""
    try:
        first = proc.stderr.readline()
        assert first == f"mpmagic: waiting for {runs} runs in flight to finish before exit; Ctrl-C stops them\n"
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
