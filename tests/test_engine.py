"""The run engine (issue 15): runs as objects on one manager thread, many at once
from any threads, with written contracts; and the job semantics that go with it
(the first failing item in input order, issue 13) and no shared-memory segment
left by a failing run (issue 14). Plain serial Python is the oracle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from conftest import check_lazy_inputs_equal_serial, run

import mpmagic
from mpmagic import cpus, payload, shm
from mpmagic.backends.base import Backend, Job
from mpmagic.backends.local import LocalBackend
from mpmagic.chunking import ChunkPlanner
from mpmagic.errors import WorkerLostError
from mpmagic.jobs import CellJob, MapJob, unit_text
from mpmagic.ranks import KeptCellJob


@pytest.fixture(scope="module")
def method() -> str:
    """The start method of every ``local_pool`` here: forkserver only.

    The manager's handling of runs (their handles, cancels, errors' order, soaks,
    memory limits, segments) is the same code whichever start method made the
    workers; spawn cost the suite ~10 s more here, and the suite has to stay under
    10 minutes. A test where the method matters names its methods (the SIGINT
    tests); spawn workers are also covered by test_fidelity_*, test_shared,
    test_worker_setup, test_parallel and the worker deaths of test_reliability.
    """
    return "forkserver"

HANG = 60  # seconds: only catches a hang


def _serial_error(func, items):
    try:
        list(map(func, items))
    except Exception as exc:
        return exc
    raise AssertionError("serial map did not fail")


def _manager_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mpmagic-manager"]


def test_backends_and_jobs_keep_the_written_contracts():
    backend = LocalBackend(2)
    try:
        assert isinstance(backend, Backend)
    finally:
        backend.stop()
    job = MapJob(abs, [1, 2], 2, False, 2)
    assert isinstance(job, Job)
    assert isinstance(CellJob(b"", 2), Job)
    assert isinstance(KeptCellJob(b"", 2, pins={0: 7}), Job)
    # The members of the other kind are neutral: a backend branches on kind/pinned, not on a class.
    assert (job.size, job.ranks_pending, job.pinned, job.input_wait()) == (0, 0, False, None)
    cell = KeptCellJob(b"", 2, pins={0: 7})
    assert (cell.func, cell.planner, cell.pinned, cell.ranks_pending, cell.input_wait()) == (None, None, True, 2, None)
    assert cell.next_unit_for(7).id == 0 and cell.ranks_pending == 1


def test_a_unit_never_exceeds_the_items_its_worker_may_still_run():
    """``max_tasks_per_child``'s allowance (``next_unit(limit)``): a new chunk is cut to it, and
    a unit sent again (its worker lost) is split, its first part going now, the rest next."""
    job = MapJob(abs, list(range(10)), 10, False, 2, chunksize=4)
    first = job.next_unit(2)
    assert (first.start, first.count, list(first.items)) == (0, 2, [0, 1])
    second = job.next_unit()
    assert (second.start, second.count) == (2, 4)
    job.requeue(second)
    again = job.next_unit(1)
    assert (again.start, again.count, list(again.items)) == (2, 1, [2])
    rest = job.next_unit(5)
    assert (rest.start, rest.count, list(rest.items)) == (3, 3, [3, 4, 5])


def test_the_planner_describes_the_chunks_sent_not_the_sizes_it_planned():
    """``describe()`` listed each ``next_size()``, made before the chunk was cut to a
    worker's allowance or to what a lazy input gave (and even when no chunk went)."""
    job = MapJob(abs, list(range(10)), 10, False, 2, chunksize=4)
    units = [job.next_unit(2), job.next_unit(2), job.next_unit(2), job.next_unit(), job.next_unit()]
    assert [u.count for u in units[:4]] + [units[4]] == [2, 2, 2, 4, None]
    assert (job.planner.describe(), job.planner.cut_from, job.n_chunks) == ("2-4", 4, 4)
    # A fixed size: its chunks but the input's rest are that size; one chunk, the input's size.
    for sizes, fixed, said, cut in [((40, 40, 20), 40, "40", None), ((20,), 40, "20", None),
                                    ((5,) * 20, 40, "5", 40), ((30, 30, 30, 10), 40, "30", 40),
                                    ((5, 5, 3), 40, "5", 40), ((), 40, "40", None)]:
        planner = ChunkPlanner(sum(sizes), 2, fixed)
        for n in sizes:
            planner.next_size()
            planner.note_sent(n)
        assert (planner.describe(), planner.cut_from) == (said, cut), sizes
    planner = ChunkPlanner(None, 2)  # automatic: every size that went, none planned and not sent
    for n in (1, 3):
        planner.next_size()
        planner.note_sent(n)
    planner.next_size()
    assert (planner.describe(), planner.cut_from) == ("auto (1-3)", None)


def test_backends_and_the_engine_use_a_job_only_through_the_job_protocol():
    """Every member a backend or ``engine.Run`` names on a job (``job.x``,
    ``run.job.x``, ``self.job.x``) is one the ``Job`` protocol lists, so mypy
    checks each job class for it (backends/base.py) and none is private."""
    import ast
    from pathlib import Path

    root = Path(mpmagic.__file__).parent
    protocol = next(n for n in ast.parse((root / "backends" / "base.py").read_text()).body
                    if isinstance(n, ast.ClassDef) and n.name == "Job")
    members = {n.name for n in protocol.body if isinstance(n, ast.FunctionDef)}
    members |= {n.target.id for n in protocol.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert {"prefill", "read_input", "ranks_pending", "planner", "split"} <= members
    unlisted = []
    for path in [*sorted((root / "backends").glob("*.py")), root / "engine.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr not in members:
                owner = node.value
                if (isinstance(owner, ast.Name) and owner.id == "job") or (
                        isinstance(owner, ast.Attribute) and owner.attr == "job"):
                    unlisted.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert unlisted == []


def test_no_code_probes_a_backend_or_a_job_for_a_member():
    """The Backend and Job protocols say what every backend and job has: no
    ``hasattr(backend, ...)`` / ``getattr(job, ..., default)`` in the code
    that uses them (``job`` and ``backend`` named as such, or ``self.backend``)."""
    import ast
    from pathlib import Path

    root = Path(mpmagic.__file__).parent
    probes = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
                target = ast.unparse(node.args[0]) if node.args else ""
                if target.split(".")[-1] in ("backend", "job", "_backend", "_job"):
                    probes.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    assert probes == []


def test_submit_returns_a_handle_at_once_and_its_result_is_serials(ip, local_pool):
    run(ip, "def slow_square(x):\n    import time; time.sleep(0.05)\n    return x * x\n")
    func = ip.user_ns["slow_square"]
    job = MapJob(func, list(range(20)), 20, False, 2)
    handle = local_pool.submit(job)
    assert handle.items_total == 20 and handle.job is job
    assert handle.result(HANG) == [x * x for x in range(20)]
    assert handle.done() and handle.items_done == 20 and handle.items_failed == 0


def test_cancel_a_run_leaves_the_pool_usable(ip, local_pool):
    run(ip, "def nap(x):\n    import time; time.sleep(5)\n    return x\n")
    handle = local_pool.submit(MapJob(ip.user_ns["nap"], list(range(8)), 8, False, 2))
    time.sleep(0.3)
    t0 = time.monotonic()
    assert handle.cancel() is True
    assert time.monotonic() - t0 < HANG and handle.done()
    assert mpmagic.pmap(abs, [-1, -2, -3]) == [1, 2, 3]


def test_many_threads_with_lazy_inputs_failures_and_background_runs_all_equal_serial(ip, local_pool):
    """8 threads x 8 calls each, with generator inputs (some raising midway), an
    on_chunk, background runs and generators that start runs themselves, at
    once on one pool: every result or error is serial map's, nothing hangs."""
    run(ip, "def sq(x):\n    return x * x\n\ndef nap(x):\n    import time; time.sleep(0.001)\n    return x + 1\n")
    sq, nap = ip.user_ns["sq"], ip.user_ns["nap"]
    problems: list[str] = []

    def items(n: int, broken_at: int | None = None):
        for i in range(n):
            if i == broken_at:
                raise KeyError(f"input broke at {i}")
            yield i

    def serial(func, make):
        try:
            return list(map(func, make()))
        except KeyError as exc:
            return ("KeyError", str(exc))

    def parallel(func, make, **kwargs):
        try:
            return mpmagic.pmap(func, make(), **kwargs)
        except KeyError as exc:
            return ("KeyError", str(exc))

    def one_call(n: int, func, kind: int) -> str | None:
        """One call of the given kind; what went wrong, or None."""
        if kind == 0:
            got, want = parallel(func, lambda: items(n)), serial(func, lambda: items(n))
        elif kind == 1:
            got = parallel(func, lambda: items(n, n // 2 if n else None))
            want = serial(func, lambda: items(n, n // 2 if n else None))
        elif kind == 2:
            seen: dict[int, list] = {}
            got = mpmagic.pmap(func, items(n), on_chunk=lambda s, r: seen.__setitem__(s, list(r)))
            want = serial(func, lambda: items(n))
            if [x for s in sorted(seen) for x in seen[s]] != want:
                return "on_chunk did not see every result once"
        elif kind == 3:
            got, want = mpmagic.pmap(func, items(n), block=False).result(HANG), serial(func, lambda: items(n))
        else:
            def sums(inner):
                for j in range(min(n, 5)):
                    yield sum(inner(sq, [j, j + 1]))

            got, want = mpmagic.pmap(func, sums(mpmagic.pmap)), list(map(func, sums(map)))
        return None if got == want else f"{str(got)[:60]} != {str(want)[:60]}"

    def client(k: int) -> None:
        for i in range(8):
            n = (0, 1, 2, 7, 60, 400, 1500)[(k * 3 + i) % 7]
            kind = (k + i) % 5
            try:
                problem = one_call(n, (sq, nap)[(k + i) % 2], kind)
            except BaseException as exc:  # noqa: BLE001 - reported below
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                problems.append(f"thread {k} call {i} (kind {kind}, {n} items): {problem}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG * 2)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not problems, problems
    assert local_pool.status()["runs_in_flight"] == 0


def test_many_threads_with_mixed_calls_all_equal_serial(ip, local_pool):
    """8 threads x 6 calls each: maps, cells and failing maps at once, on one pool."""
    run(
        ip,
        "def tri(x):\n    return x * (x + 1) // 2\n"
        "def picky(x):\n    if x % 7 == 3:\n        raise ValueError(f'no {x}')\n    return x\n",
    )
    tri, picky = ip.user_ns["tri"], ip.user_ns["picky"]
    problems: list[str] = []

    def client(k: int) -> None:
        try:
            for i in range(6):
                n = 50 + 37 * k + i
                kind = (k + i) % 3
                if kind == 0:
                    got = mpmagic.pmap(tri, range(n))
                    if got != [tri(x) for x in range(n)]:
                        problems.append(f"thread {k} call {i}: wrong map results")
                elif kind == 1:
                    got = mpmagic.parallel(f"rank * {k}", workers=2, namespace={})
                    if list(got) != [0, k]:
                        problems.append(f"thread {k} call {i}: wrong ranks {got}")
                else:
                    expected = _serial_error(picky, range(n))
                    try:
                        mpmagic.pmap(picky, range(n))
                        problems.append(f"thread {k} call {i}: no error")
                    except ValueError as exc:
                        if str(exc) != str(expected):
                            problems.append(f"thread {k} call {i}: {exc} instead of {expected}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            problems.append(f"thread {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not problems, problems
    assert local_pool.status()["runs_in_flight"] == 0
    assert len([s for s in local_pool.slots if not s.temporary]) == 2
    deadline = time.monotonic() + 10  # temporary workers of the cells stop once idle
    while any(s.temporary for s in local_pool.slots) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(s.temporary for s in local_pool.slots)
    assert len(_manager_threads()) == 1


def test_the_error_raised_is_the_first_failing_item_in_input_order(ip, local_pool):
    """Item 2 fails late (it sleeps), item 9 fails at once: serial raises item 2's."""
    run(
        ip,
        "def late_or_early(x):\n    import time\n"
        "    if x == 2:\n        time.sleep(0.5)\n        raise KeyError(f'late {x}')\n"
        "    if x >= 9:\n        raise KeyError(f'early {x}')\n    return x\n",
    )
    func = ip.user_ns["late_or_early"]
    expected = _serial_error(func, range(20))
    with pytest.raises(KeyError) as info:
        mpmagic.pmap(func, range(20), chunksize=1)
    assert str(info.value) == str(expected) == "'late 2'"
    assert "item 2 of the input" in "".join(getattr(info.value, "__notes__", []))
    assert mpmagic.pmap(abs, [-4]) == [4]


def test_a_worker_killed_while_two_runs_share_it_fails_one_and_hangs_neither(ip, local_pool):
    run(ip, "def pid_after(x):\n    import os, time; time.sleep(0.2)\n    return os.getpid()\n")
    func = ip.user_ns["pid_after"]
    outcomes: dict[int, object] = {}

    def client(k: int) -> None:
        try:
            outcomes[k] = mpmagic.pmap(func, range(10), chunksize=1)
        except WorkerLostError as exc:
            outcomes[k] = exc

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    victim = local_pool.slots[0].pid
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(HANG)
    assert not any(t.is_alive() for t in threads), "a run hung after its worker was killed"
    assert set(outcomes) == {0, 1}
    lost = [o for o in outcomes.values() if isinstance(o, WorkerLostError)]
    assert len(lost) == 1, outcomes  # the run whose item was on the victim; the other completes
    assert "SIGKILL" in str(lost[0]) or "killed" in str(lost[0])
    for o in outcomes.values():
        if not isinstance(o, BaseException):
            assert len(o) == 10
    assert mpmagic.pmap(abs, [-1, 2]) == [1, 2]


# -- issue 14 item 2: no segment outlives the run that leased it ------------------


def _segments() -> list[str]:
    prefix = f"mpm_{os.getpid()}_"
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


@pytest.fixture
def no_segment_kept():
    """Released segments are unlinked at once (no reuse pool), so a count shows leaks."""
    np = pytest.importorskip("numpy")
    old = shm.KEEP_BYTES
    shm.configure(keep_bytes=0)
    yield np
    shm.configure(keep_bytes=old)


FAILURES = {
    # a chunk that raised (its items were lent through shared memory)
    "raised": "def victim(a):\n    raise ValueError('no')\n",
    # partial results in shared memory packed before a later item raised
    "partial": "def victim(a):\n    if a[0] == 4:\n        raise ValueError('four')\n    return a * 2\n",
    # a worker death: the chunk is isolated, its items re-sent
    "death": "def victim(a):\n    import os\n    if a[0] == 2:\n        os._exit(3)\n    return a.sum()\n",
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_no_segment_is_left_after_a_failed_run(ip, local_pool, no_segment_kept, kind):
    np = no_segment_kept
    run(ip, FAILURES[kind])
    items = [np.full(200_000, float(i)) for i in range(6)]  # 1.6 MB each: lent through shared memory
    mpmagic.pmap(np.sum, items, chunksize=3)  # warm: its segments are given back at once
    assert _segments() == []
    with pytest.raises(Exception):  # noqa: B017 - each kind has its own error; serial is not the point here
        mpmagic.pmap(ip.user_ns["victim"], items, chunksize=3)
    time.sleep(0.3)  # a killed worker's leftovers are swept by its reaper
    assert _segments() == [], kind


def test_no_segment_is_left_after_a_cancelled_run(ip, local_pool, no_segment_kept):
    np = no_segment_kept
    run(ip, "def dawdle(a):\n    import time; time.sleep(10)\n    return a\n")
    items = [np.full(200_000, float(i)) for i in range(6)]
    handle = local_pool.submit(MapJob(ip.user_ns["dawdle"], items, 6, False, 2, chunksize=1, shared_memory=True))
    time.sleep(0.5)
    assert _segments()  # lent to the running chunks
    handle.cancel()
    assert _segments() == []


def test_runs_whose_iterators_run_out_together_all_end(ip, local_pool):
    """An input that is iterated (an iterator) ends only when a read comes up short; with
    many runs at once, a worker whose run's input just ran out goes to the next run."""
    run(ip, "def inc(x):\n    return x + 1\n")
    inc = ip.user_ns["inc"]
    results: dict[tuple[int, int], bool] = {}

    def client(k: int) -> None:
        for i in range(4):
            results[k, i] = mpmagic.pmap(inc, iter(range(1000))) == list(range(1, 1001))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
    assert not any(t.is_alive() for t in threads), "a run hung"
    assert len(results) == 32 and all(results.values())


# -- issue 14 item 6: memory limits ---------------------------------------------


def _one_worker(method: str, limit: str):
    """One worker with a memory limit, for the test; the pool and the limit gone after it."""
    from mpmagic import pool as pool_module

    pool_module.shutdown()
    yield mpmagic.start_pool(1, method, wait=True, max_memory=limit)
    pool_module.set_max_memory(None)
    pool_module.shutdown()


@pytest.fixture
def one_worker_with_limit(method):
    yield from _one_worker(method, "300MB")


HOG = (
    "import builtins\n"
    "def hog(mb):\n    builtins._mpm_hog = b'x' * (mb << 20)  # kept: the worker stays big\n"
    "    import os\n    return os.getpid()\n"
    "def pid_after(x):\n    import os, time\n    time.sleep(x)\n    return os.getpid()\n"
)


def test_a_worker_over_max_memory_is_replaced_before_its_next_task(ip, one_worker_with_limit, capfd):
    run(ip, HOG)
    first = mpmagic.pmap(ip.user_ns["hog"], [400])[0]  # 400 MB kept, over the 300 MB limit
    second = mpmagic.pmap(ip.user_ns["pid_after"], [0])[0]
    assert second != first
    assert "over the pool's max_memory of 300 MB" in capfd.readouterr().err
    assert mpmagic.pool_status().info["workers_replaced"] == 1  # (%pool said 0)


@pytest.fixture
def one_worker_with_small_limit(method):
    yield from _one_worker(method, "40MB")


def test_shared_memory_a_task_only_reads_is_not_the_workers_own(ip, one_worker_with_small_limit, capfd):
    """A 64 MB ``share()`` array read by every task is mapped, not owned: the
    40 MB limit counts the worker's private memory, so the worker is kept (it
    was replaced after every task: its resident size counted the array)."""
    import numpy as np

    ip.user_ns["big"] = mpmagic.share(np.ones(8_000_000))  # 64 MB
    run(ip, "def read_all(i):\n    import os\n    return float(big.sum()), os.getpid()\n")
    try:
        out = mpmagic.pmap(ip.user_ns["read_all"], range(4), chunksize=1)
    finally:
        run(ip, "del big, read_all\nimport gc\ngc.collect()")
    assert [s for s, _ in out] == [8_000_000.0] * 4
    assert len({pid for _, pid in out}) == 1
    assert "over the pool's max_memory" not in capfd.readouterr().err
    assert mpmagic.pool_status().info["workers_replaced"] == 0


def test_a_worker_over_max_memory_runs_no_unit_sent_ahead(ip, one_worker_with_small_limit, capfd):
    """Short items are pipelined (two in flight per worker) without a limit;
    with one, the item after the one that left the worker big runs on its
    replacement, not on the big worker (the unit sent ahead ran there)."""
    run(ip, HOG)
    run(ip, "def hog_at(x):\n    import os\n    return hog(64) if x == 6 else os.getpid()\n")
    pids = mpmagic.pmap(ip.user_ns["hog_at"], range(12), chunksize=1)
    assert pids[7] != pids[6] and set(pids[7:]).isdisjoint(pids[:7]), pids
    assert "over the pool's max_memory of 40 MB" in capfd.readouterr().err


def test_a_worker_killed_near_the_limit_ran_out_of_memory_naming_the_item(ip, one_worker_with_limit):
    run(ip, HOG)
    pid = mpmagic.pmap(ip.user_ns["hog"], [260])[0]  # near (over 80 % of) the limit, not over it
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    with pytest.raises(WorkerLostError) as info:
        mpmagic.pmap(ip.user_ns["pid_after"], [30])
    assert "item 0 (30) ran out of memory" in str(info.value)
    assert "MB of its own at its last report" in str(info.value)


def test_ctrl_c_while_submit_hands_out_units_itself_loses_nothing(ip, local_pool, monkeypatch):
    """``submit`` takes the manager's first step in the calling thread. A
    Ctrl-C in the middle of it (between sending a unit and noting it in
    flight) must wait until the step is over; then ``submit`` cancels the run
    it hit as an interrupted wait would (the caller never got its handle), and
    the pool serves the next call."""
    run(ip, "def nap_sq(x):\n    import time; time.sleep(0.2)\n    return x * x\n")
    func = ip.user_ns["nap_sq"]
    assert mpmagic.pmap(func, [1, 2]) == [1, 4]  # the manager's selector is up to date: submit steps itself
    real_send_unit = LocalBackend._send_unit
    stepped = []

    def send_unit_then_ctrl_c(self, slot, run_, unit):
        real_send_unit(self, slot, run_, unit)
        stepped.append(threading.current_thread())
        os.kill(os.getpid(), signal.SIGINT)  # lands between this send and the rest of the step
        time.sleep(0.01)

    monkeypatch.setattr(LocalBackend, "_send_unit", send_unit_then_ctrl_c)
    job = MapJob(func, [3, 4], 2, False, 2)
    abandoned = []
    real_abandon = LocalBackend._abandon

    def abandon(self, run_):
        if run_.job is job:
            abandoned.append((run_.cancel_requested, run_.interrupted, len(self._holding(run_))))
        real_abandon(self, run_)

    monkeypatch.setattr(LocalBackend, "_abandon", abandon)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        local_pool.submit(job)
    monkeypatch.setattr(LocalBackend, "_send_unit", real_send_unit)
    assert stepped and stepped[0] is threading.main_thread()  # it was submit's own step
    assert len(stepped) == 2  # both units went out: the interrupt did not cut the step short
    # The run it hit was cancelled as an interrupted wait would, with both
    # units noted in flight until then (nothing sent unaccounted for), and
    # without waiting for the 0.2 s items.
    assert abandoned[0] == (True, True, 2)
    assert time.monotonic() - t0 < HANG
    assert not any(r.job is job for r in local_pool._runs)
    assert mpmagic.pmap(func, [5, 6]) == [25, 36]


# -- a lazy input is read by the thread that waits on the run, as serial map reads it --


def test_thread_bound_and_run_starting_generators_give_serials_results(ip, local_pool):
    """A sqlite3 connection may only be used in the thread that made it, and a
    generator may call pmap itself: both work in serial map, so they must here
    (read in the pool's manager thread, the first raised ProgrammingError; read
    under the pool's lock or in its manager, the second waited for ever)."""
    run(ip, "def sq(x):\n    return x * x\n")
    check_lazy_inputs_equal_serial(ip.user_ns["sq"], n_rows=3000, n_nested=12)


def test_a_generator_sees_the_calling_threads_context_and_locals(ip, local_pool):
    """A generator that reads a ContextVar or a threading.local sees the values
    of the thread that called pmap, as in serial map (from any thread)."""
    import contextvars

    run(ip, "def sq(x):\n    return x * x\n")
    sq = ip.user_ns["sq"]
    var: contextvars.ContextVar[int] = contextvars.ContextVar("offset", default=0)
    local = threading.local()

    def items():
        for i in range(20):
            yield i + var.get() + getattr(local, "offset", 0)

    def call(offset: int, out: list) -> None:
        var.set(offset)
        local.offset = offset
        out.append((mpmagic.pmap(sq, items(), chunksize=3), list(map(sq, items()))))

    results: list = []
    threads = [threading.Thread(target=call, args=(k * 100, results)) for k in range(1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
    assert len(results) == 3 and all(got == want for got, want in results)
    assert len({tuple(want) for _, want in results}) == 3  # each thread its own values


def _waiting_user_code_holds_back_only_its_own_run(sq, first_run) -> list:
    """``first_run(hold)`` runs a pmap whose user code calls ``hold()``, which
    waits until another thread's pmap has completed. Returns the first run's
    results once both ended. In the pool's manager thread, that user code held
    the manager serving both: the other run could not end and ``hold`` waited in vain."""
    entered, other_done = threading.Event(), threading.Event()
    waited: list[bool] = []
    got: list = []

    def hold() -> None:
        if not waited:  # (once)
            entered.set()
            waited.append(other_done.wait(HANG))

    t = threading.Thread(target=lambda: got.append(first_run(hold)))
    t.start()
    assert entered.wait(HANG)
    assert mpmagic.pmap(sq, [1, 2, 3]) == [1, 4, 9]  # while the first run's user code waits
    other_done.set()
    t.join(HANG)
    assert waited == [True] and len(got) == 1
    return got[0]


def test_a_slow_input_holds_back_only_its_own_run(ip, local_pool):
    """While one thread's generator waits, another thread's run still completes."""
    run(ip, "def sq(x):\n    return x * x\n")
    sq = ip.user_ns["sq"]

    def items(hold):
        yield from range(3)
        hold()
        yield from range(3, 10)

    first = _waiting_user_code_holds_back_only_its_own_run(sq, lambda hold: mpmagic.pmap(sq, items(hold), chunksize=1))
    assert first == list(map(sq, range(10)))


def test_ctrl_c_while_the_input_is_read_cancels_the_run(ip, local_pool):
    """The input is read in the waiting (here: the main) thread, so Ctrl-C
    lands in its code, as in serial map; the run is cancelled, the pool serves
    the next call."""
    run(ip, "def sq(x):\n    return x * x\n")
    sq = ip.user_ns["sq"]
    reading = threading.Event()

    def items():
        yield from range(4)
        reading.set()
        time.sleep(HANG)
        yield 4

    def interrupt():
        # A moment after the read began, as a person presses Ctrl-C: sent at once,
        # it could land while the main thread waited for the GIL just before its
        # sleep, and CPython then runs the handler only once the sleep is over.
        if reading.wait(HANG):
            time.sleep(0.3)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        mpmagic.pmap(sq, items(), chunksize=1)
    assert time.monotonic() - t0 < HANG
    assert mpmagic.pmap(sq, range(4)) == [0, 1, 4, 9]


def test_on_chunk_runs_in_the_calling_thread_and_a_run_may_start_from_it(ip, local_pool):
    """on_chunk runs in the thread that waits on the run, not in the pool's
    manager: a pmap started from it works (as on Dask), and every chunk is
    given once, in input positions, with serial map's values."""
    run(ip, "def sq(x):\n    return x * x\n")
    sq = ip.user_ns["sq"]
    seen: dict[int, list] = {}
    threads = set()

    def nested(start, results):
        threads.add(threading.current_thread())
        seen[start] = list(results)
        assert mpmagic.pmap(sq, [start, start + 1]) == [start * start, (start + 1) ** 2]

    assert mpmagic.pmap(sq, range(8), chunksize=2, on_chunk=nested) == list(map(sq, range(8)))
    assert threads == {threading.current_thread()}
    assert sorted(seen) == [0, 2, 4, 6]
    assert [r for k in sorted(seen) for r in seen[k]] == list(map(sq, range(8)))


def test_a_slow_on_chunk_holds_back_only_its_own_run(ip, local_pool):
    """While one thread's on_chunk waits, another thread's run still completes:
    the callback does not hold the manager that serves both."""
    run(ip, "def sq(x):\n    return x * x\n")
    sq = ip.user_ns["sq"]
    first = _waiting_user_code_holds_back_only_its_own_run(
        sq, lambda hold: mpmagic.pmap(sq, range(4), chunksize=1, on_chunk=lambda start, results: hold())
    )
    assert first == [0, 1, 4, 9]


def test_an_on_chunk_that_raises_stops_its_run_with_that_error_only(ip, local_pool):
    """As a loop calling it would: the run stops, pmap raises the callback's
    error, the callback is not called again, and another thread's run and
    the pool go on."""
    run(ip, "def sq(x):\n    return x * x\n\ndef nap(x):\n    import time; time.sleep(0.02)\n    return x\n")
    sq, nap = ip.user_ns["sq"], ip.user_ns["nap"]
    calls = []

    def bad(start, results):
        calls.append(start)
        raise ValueError(f"bad chunk at {start}")

    got: dict[str, list] = {}
    other = threading.Thread(target=lambda: got.setdefault("r", mpmagic.pmap(nap, range(20), chunksize=1)))
    other.start()
    with pytest.raises(ValueError, match=r"bad chunk at \d+"):
        mpmagic.pmap(sq, range(40), chunksize=1, on_chunk=bad)
    other.join(HANG)
    assert len(calls) == 1
    assert got["r"] == list(range(20))
    assert mpmagic.pmap(sq, range(4)) == [0, 1, 4, 9]


def test_a_run_stopped_by_its_on_chunk_leaves_its_own_report(ip, local_pool):
    """last_report() was the run before it (or None): the report of the run the
    callback stopped, saying what stopped it, as an interrupted run's does."""
    assert mpmagic.pmap(abs, [-1, 2, -3]) == [1, 2, 3]

    def bad(start, results):
        raise ValueError(f"bad chunk at {start}")

    with pytest.raises(ValueError, match=r"bad chunk at \d+"):
        mpmagic.pmap(abs, range(40), chunksize=5, on_chunk=bad)
    report = mpmagic.last_report()
    assert report.total == 40 and report.failed_run
    assert report.line().startswith("pmap stopped by ValueError after "), report.line()
    assert " of 40 items finished, " in report.line(), report.line()


def test_a_run_submitted_from_the_manager_thread_is_an_error_not_a_hang(ip, local_pool):
    """Only our own quick hooks (a job's ``accepted``) run in the manager thread; a
    run submitted from there would wait on that very thread: a UsageError."""
    errors: list[BaseException] = []

    def accepted(start, results):
        try:
            local_pool.submit(MapJob(abs, [1], 1, False, 1))
        except BaseException as exc:
            errors.append(exc)

    job = MapJob(abs, [-1, -2], 2, False, 2, accepted=accepted)
    assert local_pool.submit(job).result(HANG) == [1, 2]
    assert errors and all(isinstance(e, mpmagic.UsageError) for e in errors)
    assert "manager thread" in str(errors[0])


def test_a_run_that_fails_while_units_are_handed_out_loses_no_other_runs_unit(ip, local_pool):
    """When a run's input raises while the manager hands out units, the run
    ends and the worker busy with its unit is replaced. The rest of that same
    hand-out must not give another run's unit to the replaced worker (it went
    to a dead pipe, and that run waited for ever: found by a soak of 8 threads
    mixing generator inputs, failures and background runs)."""
    run(ip, "def nap(x):\n    import time; time.sleep(0.05)\n    return x\n\n"
            "def nap3(x):\n    import time; time.sleep(0.3)\n    return x\n")
    nap, nap3 = ip.user_ns["nap"], ip.user_ns["nap3"]

    def breaks_after_one():
        yield 0
        raise KeyError("the input broke after item 0")

    for _ in range(3):
        background = mpmagic.pmap(nap, range(40), chunksize=1, block=False)
        time.sleep(0.1)  # both workers busy with it
        with pytest.raises(KeyError, match="broke after item 0"):
            mpmagic.pmap(nap3, breaks_after_one(), chunksize=1)
        assert background.result(HANG) == list(range(40))


def test_a_rank_that_fails_while_others_run_is_said_at_once_and_kept_on_interrupt(ip, local_pool, capfd,
                                                                                   monkeypatch):
    """Rank 0 fails before it fills the queue rank 1 waits on. The cell said
    nothing until it ended, and once interrupted the error was lost for good.
    Now a line says so at once, and %pdebug / last_failures() keep it; the
    interrupt's line names it (and keeps it), and the report counts it as failed."""
    from mpmagic import display_relay, jobs

    monkeypatch.setattr(jobs, "RANK_FAILURE_GRACE", 30.0)  # (the user interrupts before the abort)
    run(ip, "import mpmagic\nq = mpmagic.Queue()")
    said = threading.Event()
    show = display_relay.print_output

    def show_then_mark(stream: str, text: str) -> None:  # (the line printed in the cell)
        show(stream, text)
        if "while other ranks still run" in text:
            said.set()

    monkeypatch.setattr(display_relay, "print_output", show_then_mark)
    capfd.readouterr()
    over = threading.Event()

    def interrupt_once_said() -> None:  # (the user reads the line, then interrupts: not a fixed 1.5 s)
        if said.wait(30) and not over.is_set():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    user = threading.Thread(target=interrupt_once_said, daemon=True)
    user.start()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            run(ip, "%%parallel -n 2 -q\n"
                    "if rank == 0:\n    raise ValueError('no input file')\n"
                    "else:\n    q.get()\n")
    finally:
        over.set()
        said.set()
        user.join()
    err = capfd.readouterr().err
    assert "rank 0 failed (ValueError: no input file) while other ranks still run" in err
    assert [(f.rank, type(f.error).__name__) for f in mpmagic.last_failures()] == [(0, "ValueError")]
    assert str(info.value).startswith("%%parallel interrupted: rank 0 had failed (ValueError: no input file; kept in "
                                      "this interrupt's .failures); the work still running was stopped")
    assert isinstance(info.value.failures[0], ValueError) and info.value.values == {} and info.value.gathered == {}
    assert mpmagic.last_report().line().startswith("parallel interrupted after 0 of 2 ranks finished, 1 failed "
                                                   "(rank 0), ")
    # The last rank to fail: its error is the cell's, with no line before it.
    with pytest.raises(mpmagic.ParallelError, match="no input file"):
        run(ip, "%%parallel -n 2 -q\nimport time\ntime.sleep(0.3 * rank)\n"
                "if rank == 1:\n    raise ValueError('no input file')\n")
    assert "failed (ValueError" not in capfd.readouterr().err


def test_the_one_line_names_the_rank_that_failed_first_not_the_lowest(pool2, monkeypatch):
    """Rank 1 raises at once; rank 0 waits on it and its --timeout stops it. The
    line named rank 0's TaskTimeoutError (the lowest rank): the cause is rank 1."""
    from mpmagic import jobs

    monkeypatch.setattr(jobs, "RANK_FAILURE_GRACE", 30.0)  # (the timeout comes first)
    code = "import time\nif rank == 1:\n    raise ValueError('bad input')\ntime.sleep(30)\n"
    with pytest.raises(mpmagic.ParallelError) as info:
        mpmagic.parallel(code, workers=2, timeout=0.5, namespace={})
    assert str(info.value).startswith("2 of 2 ranks failed (ranks 0, 1); rank 1: ValueError: bad input")
    assert isinstance(info.value.failures[0], mpmagic.TaskTimeoutError)


def test_a_rank_whose_worker_dies_stops_the_others_in_a_background_run_too(pool2, monkeypatch):
    """--bg / block=False: the handle showed "1 failed, running" for ever; now the
    run ends with the dead rank's error and the stopped rank's."""
    from mpmagic import jobs

    monkeypatch.setattr(jobs, "RANK_FAILURE_GRACE", 0.2)
    code = "import os, time\nif rank == 1:\n    os._exit(3)\ntime.sleep(30)\n"
    handle = mpmagic.parallel(code, workers=2, block=False, namespace={})
    with pytest.raises(mpmagic.ParallelError) as info:
        handle.result(HANG)
    assert str(info.value).startswith("2 of 2 ranks failed (ranks 0, 1); rank 1: WorkerLostError: ")
    assert "rank 0 still ran 0.2 s after rank 1 failed (WorkerLostError): stopped" in str(info.value)
    assert mpmagic.parallel("rank", workers=2, namespace={}) == [0, 1]


@pytest.mark.parametrize("timeout", [float("inf"), 1e7])
def test_a_huge_timeout_is_no_timeout_not_a_dead_manager(local_pool, timeout):
    """``select`` refuses waits past ~24.8 days: the manager died of an
    OverflowError and the run waited for ever. NaN is refused."""
    assert mpmagic.pmap(abs, [-1, -2, -3], timeout=timeout) == [1, 2, 3]
    assert mpmagic.parallel("rank", workers=2, timeout=timeout) == [0, 1]
    with pytest.raises(mpmagic.UsageError, match="greater than 0"):
        mpmagic.pmap(abs, [1], timeout=float("nan"))


def test_ranks_that_all_fail_at_once_get_the_cells_error_alone(ip, local_pool, capfd):
    """A name missing on every rank: each fails at once, and the cell's error
    says it; no "rank 0 failed while other ranks still run" line before it."""
    capfd.readouterr()
    with pytest.raises(mpmagic.ParallelError):
        run(ip, "%%parallel -n 2 -q\nno_such_name_anywhere\n")
    time.sleep(0.8)  # (past the moment the line would be said)
    assert "still run" not in capfd.readouterr().err


def test_a_warm_map_opens_no_file_in_the_notebook(ip, local_pool, monkeypatch):
    """A warm call's fixed cost is the engine's, not the file system's: every run
    used to read three cgroup files for its report's BLAS-cap label, a third of
    the calling thread's time in a warm 2-item map. Counted, not timed."""
    import builtins
    import io

    def sq(x):
        return x * x

    def numpy_sq(x):  # a function whose report looks at the BLAS cap
        import numpy as np

        return int(np.int64(x) * x)

    # The CPU count is read afresh every 5 s (cpus.recent_cpus): read it now, so that the
    # counted calls below (well under 5 s) fall in one window; a read left from up to 5 s
    # before made the count see the cgroup files in a fresh clone's run.
    monkeypatch.setattr(cpus, "_seen", None)
    for func in (sq, numpy_sq):
        assert mpmagic.pmap(func, [1, 2]) == [1, 4]  # warm: workers, imports, the function's pickle
    opened: list[str] = []

    me = threading.current_thread()

    def counting(real):
        # Only this thread's and mpmagic's own (the manager): other threads of the
        # test process (an earlier test's Dask scheduler samples /proc) are not the call's.
        def open_(file, *args, **kwargs):
            t = threading.current_thread()
            if t is me or t.name.startswith("mpmagic"):
                opened.append(str(file))
            return real(file, *args, **kwargs)

        return open_

    monkeypatch.setattr(builtins, "open", counting(builtins.open))
    monkeypatch.setattr(io, "open", counting(io.open))
    monkeypatch.setattr(os, "open", counting(os.open))
    for func in (sq, numpy_sq):
        for _ in range(5):
            assert mpmagic.pmap(func, [1, 2]) == list(map(func, [1, 2]))
            assert mpmagic.pmap(func, range(300)) == list(map(func, range(300)))
    assert opened == []


# -- a pool stopped under a run: the run ends, nobody waits on a manager that is gone --


@pytest.mark.parametrize("then_start", [False, True], ids=["stop", "restart"])
def test_a_stop_while_another_thread_submits_fails_that_run_at_once(then_start):
    """``submit`` reads a lazy input's first chunk before it takes the pool's lock.
    A stop (``%pool stop``, or ``restart``: a stop then a start) from another
    thread meanwhile left the run with no manager: its caller waited for ever,
    and Ctrl-C could not free it. It fails at once, as the runs in flight at
    the stop do; the pool serves the next run."""
    backend = LocalBackend(1, "forkserver")
    reading, stopped = threading.Event(), threading.Event()

    def slow_input():
        reading.set()
        stopped.wait(HANG)  # (the stop lands while submit reads this)
        yield from range(3)

    runs = []
    submitter = threading.Thread(target=lambda: runs.append(backend.submit(MapJob(abs, slow_input(), None, False, 1))))
    try:
        backend.start()
        submitter.start()
        assert reading.wait(HANG)
        backend.stop(by="%pool stop")
        if then_start:
            backend.start()
        stopped.set()
        submitter.join(HANG)
        with pytest.raises(mpmagic.MPMagicError) as info:
            runs[0].result(timeout=5)
        assert str(info.value) == "the pool was stopped by %pool stop while this run was in flight: run it again"
        assert backend._runs == []
        assert backend.submit(MapJob(abs, [-1, -2], 2, False, 1)).result(HANG) == [1, 2]
    finally:
        stopped.set()
        backend.stop()


@pytest.mark.parametrize("when", ["while its manager ends", "once it ended"])
def test_a_run_submitted_during_a_stop_runs_on_a_fresh_start(when, caplog):
    """A stop from one thread while another submits (``%pool stop`` beside a running
    loop of ``pmap``). The submit came while the stop waited for the manager: it
    started a second manager and a wakeup pipe over the first's, unclosed (2 fds
    leaked), the old manager ran on and the stop waited 5 s for it, then closed the
    new one's pipe under it ("the pool's manager thread failed"). Or it came once
    the manager had ended and before the stop took the workers: handed to a new
    manager whose workers the stop then took, the run waited for ever. Now a start
    waits until a stop is over, and starts afresh."""
    backend = LocalBackend(1, "forkserver")
    runs: list = []
    submitter = threading.Thread(target=lambda: runs.append(backend.submit(MapJob(abs, [-1, -2], 2, False, 1))))
    try:
        backend.wait_ready()
        fds = len(os.listdir("/proc/self/fd"))
        managers = len(_manager_threads())
        manager = backend._manager
        join = manager.join

        def join_with_a_submit_on_the_way(timeout=None):
            if when == "once it ended":
                join(timeout)
            submitter.start()
            time.sleep(0.2)  # (it takes the pool's lock meanwhile)
            join(timeout)

        manager.join = join_with_a_submit_on_the_way
        began = time.monotonic()
        backend.stop()
        assert time.monotonic() - began < 3  # not the 5 s of an old manager that ran on
        submitter.join(HANG)
        assert runs[0].result(10) == [1, 2]
        assert len(os.listdir("/proc/self/fd")) == fds  # one worker, one manager's pipe: nothing leaked
        # One manager: the old one ended, the new one runs (a count of all threads
        # also counted other tests' reaper threads, which end when they are done).
        assert not manager.is_alive() and backend._manager is not None and backend._manager.is_alive()
        assert len(_manager_threads()) == managers
        assert "manager failed" not in caplog.text
    finally:
        backend.stop()


def test_a_shrink_then_a_grow_under_a_run_keeps_the_busy_workers(local_pool):
    """``resize(1)`` marks the busy surplus workers retiring; ``resize(3)`` right after
    counted them as members, so it started none and kept them retiring: the run went
    on with one worker, and the pool had one process where it said 3."""
    handle = local_pool.submit(MapJob(time.sleep, [0.2] * 8, 1, False, 1))
    try:
        deadline = time.monotonic() + HANG
        while not all(s.busy for s in local_pool.slots) and time.monotonic() < deadline:
            time.sleep(0.01)
        local_pool.resize(1)
        local_pool.resize(3)
        with local_pool._lock:
            assert len(local_pool.slots) == 3 and not any(s.retiring for s in local_pool.slots)
        assert handle.result(HANG) == [None] * 8
    finally:
        local_pool.resize(2)


def test_a_stream_freed_by_the_gc_in_the_manager_thread_is_cancelled_not_a_hang(local_pool):
    """An ``imap`` stream caught in a reference cycle is freed by the cyclic gc in
    whatever thread allocates: often the manager, under the pool's lock. Its
    finalizer's cancel waited there for the manager to end its run, that is for
    itself: every run and ``stop_pool()`` hung for good. Now it only asks."""
    import gc
    from concurrent.futures import CancelledError

    stream = mpmagic.imap(time.sleep, [0.05] * 1000, chunksize=1)
    assert next(stream) is None
    handle = stream.run
    cycle: list = [stream]
    cycle.append(cycle)
    del stream, cycle

    def collect(start, results):  # (a job's hook: in the manager thread, under the pool's lock)
        gc.collect()

    assert local_pool.submit(MapJob(abs, [-1, -2], 1, False, 2, accepted=collect)).result(10) == [1, 2]
    with pytest.raises(CancelledError):
        handle.result(10)


def test_a_cancel_of_a_run_whose_manager_is_gone_ends_it_itself():
    """``cancel`` waited, with no timeout, for the manager to end the run; a run
    no manager holds any more (the pool stopped under it) hung its Ctrl-C."""
    from mpmagic.backends.local import _LocalRun

    backend = LocalBackend(1, "forkserver")  # never started: no manager
    orphan = _LocalRun(backend, MapJob(abs, [1, 2], 2, False, 1), None)
    backend._runs.append(orphan)
    canceller = threading.Thread(target=orphan.cancel, daemon=True)
    canceller.start()
    canceller.join(5)
    assert not canceller.is_alive() and orphan.done()
    assert backend._runs == []


def test_a_manager_that_fails_ends_its_runs_and_the_next_run_gets_a_new_one(monkeypatch):
    """Its loop failing outside the guarded step left its runs' callers waiting for ever."""
    backend = LocalBackend(1, "forkserver")
    try:
        backend.start()
        backend.wait_ready()
        broken = backend._manager
        fds = len(os.listdir("/proc/self/fd"))
        boom = threading.Event()

        def fails() -> float | None:
            if boom.is_set():
                raise RuntimeError("boom")
            return None

        monkeypatch.setattr(backend, "_next_timeout", fails)
        handle = backend.submit(MapJob(time.sleep, [0.3], 1, False, 1))
        boom.set()
        backend._wake()  # its next turn fails, the item still running
        with pytest.raises(mpmagic.MPMagicError, match=r"manager thread failed \(RuntimeError: boom\)"):
            handle.result(timeout=5)
        monkeypatch.undo()
        broken.join(HANG)
        assert backend.submit(MapJob(abs, [-1, -2], 2, False, 1)).result(HANG) == [1, 2]
        assert len(os.listdir("/proc/self/fd")) == fds  # the failed manager's wake-up pipe is closed
    finally:
        backend.stop()


def test_a_manager_thread_that_cannot_start_keeps_the_workers_and_no_fd(monkeypatch):
    """The manager's thread refused (``ulimit -u``): its wake-up pipe leaked 2 fds per
    try, every worker was killed (healthy ones too) with "could start only 2 of 2
    workers", and a thread refused at interpreter shutdown was called ulimit -u."""
    backend = LocalBackend(2, "forkserver")
    real_start = threading.Thread.start
    refusal = ["can't start new thread"]

    def refused(thread: threading.Thread) -> None:
        if thread.name == "mpmagic-manager":
            raise RuntimeError(refusal[0])
        real_start(thread)

    try:
        monkeypatch.setattr(threading.Thread, "start", refused)
        with pytest.raises(mpmagic.MPMagicError, match=r"^mpmagic's manager thread could not start: the process/thread "
                                                        r"limit \(ulimit -u.*\) was reached") as failed:
            backend.start()
        assert "could start only" not in str(failed.value)
        procs = [s.proc for s in backend.slots]
        assert len(procs) == 2 and all(p.is_alive() for p in procs)  # (kept: they started)
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(mpmagic.MPMagicError, match="manager thread could not start"):
            backend.start()
        assert len(os.listdir("/proc/self/fd")) == fds and backend._wake_w == -1
        refusal[0] = "can't create new thread at interpreter shutdown"
        with pytest.raises(RuntimeError, match="interpreter shutdown"):  # (not ulimit -u's line)
            backend.start()
        assert [s.proc for s in backend.slots] == procs
        monkeypatch.undo()
        assert backend.submit(MapJob(abs, [-1, -2], 2, False, 1)).result(HANG) == [1, 2]
    finally:
        monkeypatch.undo()
        backend.stop()


def test_a_run_told_of_ulimit_u_is_told_once_and_not_kept_alive(capsys):
    """``_tasks_short`` held the run it told (once per run): its job and results
    stayed referenced by the pool after it ended, so ``del`` freed nothing."""
    import gc
    import weakref

    backend = LocalBackend(1, "forkserver")
    try:
        backend.start()
        backend.wait_ready()
        run = backend.submit(MapJob(time.sleep, [0.3], 1, False, 1))
        with backend._lock:
            backend._tasks_short()
            backend._tasks_short()  # (the same run: not said again)
        assert run.result(HANG) == [None]
        assert capsys.readouterr().err.count("workers could not start: the process/thread limit") == 1
        gone = weakref.ref(run)
        del run
        gc.collect()
        assert gone() is None
    finally:
        backend.stop()


_MASK_AT_EXEC = """
import signal, sys, multiprocessing.util as util
from mpmagic.backends.local import LocalBackend
spawnv = util.spawnv_passfds
def spawnv_recorded(path, args, fds):
    print(args[-1][:40], signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set()), flush=True)
    return spawnv(path, args, fds)
util.spawnv_passfds = spawnv_recorded
backend = LocalBackend(1, sys.argv[1])
backend.start()
backend.stop()
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"], scope="session")
def test_the_first_worker_and_the_fork_server_are_started_with_sigint_blocked(method):
    """The first worker's start starts multiprocessing's resource tracker, and that
    unblocked SIGINT in the starting thread: the spawn worker or the fork server
    exec'ed next had it unblocked, and an interrupt of the kernel's process group
    while it imported ``site`` killed it ("Fatal Python error ... KeyboardInterrupt"
    on the kernel's terminal). A fresh interpreter, so that no tracker runs yet."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _MASK_AT_EXEC, method], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and "resource_tracker" in lines[0], lines  # the tracker, then the worker or server
    assert all(line.endswith(" True") for line in lines), lines


@pytest.mark.parametrize("method", ["spawn", "fork"], scope="session")
def test_a_ctrl_c_while_workers_start_stops_the_call_after_they_are_recorded(method, monkeypatch):
    """SIGINT was ignored while a worker process started (so the child is born
    immune to the kernel's process-group interrupt): a Ctrl-C in that window
    was thrown away and the cell went on. It is raised once the workers are
    in the pool's list (none started unrecorded), and the worker it started
    meanwhile was born immune all the same."""
    backend = LocalBackend(2, method)
    real_start = type(backend.ctx.Process(target=abs)).start
    sent = []

    def start_then_interrupt(proc) -> None:
        real_start(proc)
        if not sent:  # the user's Ctrl-C, while the first worker starts
            sent.append(os.kill(os.getpid(), signal.SIGINT))
            time.sleep(0.05)  # (a signal ignored meanwhile was lost for good)

    monkeypatch.setattr(type(backend.ctx.Process(target=abs)), "start", start_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            backend.start()
            time.sleep(0.5)  # (the interrupt, lost, never came)
        assert len(backend.slots) == 2 and all(s.proc.is_alive() for s in backend.slots)
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert not signal.pthread_sigmask(signal.SIG_BLOCK, set())  # nothing left blocked
        backend.wait_ready()
        for slot in backend.slots:  # the workers ignore SIGINT: an interrupt of the group spares them
            os.kill(slot.pid, signal.SIGINT)
        time.sleep(0.2)
        assert backend.submit(MapJob(abs, [-1, -2], 1, False, 1)).result(HANG) == [1, 2]
    finally:
        backend.stop()


def test_output_queued_at_an_interrupt_does_not_hold_the_interrupt_up():
    """Tasks printing faster than the notebook shows (stdout and stderr in turn) had
    queued a backlog: the interrupt waited 20-70 s for it all to be shown. Once the
    run is interrupted, only the last KEPT_AT_INTERRUPT output events show, after
    one line saying how many lines were left out."""
    from mpmagic import engine

    shown = []

    class _Job:
        items_total = 1

        def redirect(self, out, progress, chunk, ask_input):
            return (lambda stream, text: shown.append((stream, text)), None, None, None)

    run = engine.Run(_Job())
    for i in range(engine.KEPT_AT_INTERRUPT + 1000):
        run._emit_out("stdout", f"line {i}\n")
    run.interrupted = True
    run._finish()
    t0 = time.perf_counter()
    run.wait()
    assert time.perf_counter() - t0 < 0.5
    note = [text for stream, text in shown if stream == "stderr"]
    assert len(note) == 1 and note[0].startswith("mpmagic: 1000 lines the tasks printed before the interrupt")
    assert shown[-1] == ("stdout", f"line {engine.KEPT_AT_INTERRUPT + 999}\n")
    assert len(shown) <= engine.KEPT_AT_INTERRUPT + 2


def test_task_output_is_not_flushed_line_by_line(monkeypatch):
    """Each flush of ipykernel's stream is an iopub message and a wait for its IO
    thread: a flush after every piece of task output made 20,000 messages where
    serial prints make 26. Output is flushed at most every FLUSH_EVERY, and when
    the waiting thread has nothing more to print."""
    import io

    from mpmagic import jobs

    class _Counting(io.StringIO):
        flushes = 0

        def flush(self):
            type(self).flushes += 1

    monkeypatch.setattr(sys, "stdout", _Counting())
    monkeypatch.setattr(sys, "stderr", _Counting())
    for i in range(2000):
        jobs._print_stream("stdout" if i % 2 else "stderr", f"line {i}\n")
    assert _Counting.flushes <= 2 * 2
    assert sys.stdout.getvalue().count("\n") == 1000


def test_a_runs_end_flag_is_a_latch_waited_on_across_threads():
    """A run's end flag (made at every submit, set by the manager) is an ``engine.Latch``:
    an Event that is never cleared, at a fraction of an Event's cost. It works as an Event
    across threads: a wait times out while it is not set, wakes when another thread sets
    it, and every later wait (several waiters too) returns at once; set twice, nothing more."""
    from mpmagic import engine

    ended = engine.Latch()
    assert not ended.is_set()
    assert ended.wait(0) is False and ended.wait(0.01) is False
    woke: list[bool] = []
    waiters = [threading.Thread(target=lambda: woke.append(ended.wait(5.0))) for _ in range(3)]
    for t in waiters:
        t.start()
    setter = threading.Timer(0.05, ended.set)
    setter.start()
    assert ended.wait(5.0) is True and ended.is_set()
    setter.join()
    for t in waiters:
        t.join(5.0)
    assert woke == [True, True, True]
    ended.set()  # (twice: nothing more)
    assert ended.wait() is True and ended.wait(0) is True
    run = engine.Run(MapJob(abs, [1], 1, False, 1, func_payload=b"x"))
    assert type(run._ended) is engine.Latch and not run.done()
    run._finish()
    assert run.done() and run._ended.wait(0)


# -- a map unit's name: one formatter (jobs.unit_text) behind every message -----------------

def _unit_words_job(one_call: bool = False, out: Any = None) -> tuple[MapJob, Any]:
    """A collecting map of 8 items in chunks of 4 (or ``mpmagic.call``'s one call), and its first unit."""
    n = 1 if one_call else 8
    job = MapJob(abs, list(range(n)), n, False, 2, chunksize=4, collect=True, one_call=one_call, out=out)
    return job, job.next_unit()


@pytest.mark.parametrize(("one_call", "count", "name"), [(False, 1, "item 0"), (False, 4, "items 0-3"),
                                                          (True, 1, "the call")])
def test_describe_unit_names_an_item_a_chunk_or_the_call(one_call, count, name):
    job, unit = _unit_words_job(one_call)
    unit = unit if count == unit.count else job._part(unit, 0, count)
    assert job.describe_unit(unit) == unit_text(unit.start, unit.count, one_call) == name


@pytest.mark.parametrize(("one_call", "what"), [(False, "the results of items 0-3"), (True, "the result of the call")])
def test_results_that_cannot_be_loaded_name_the_unit_as_describe_unit_does(one_call, what):
    job, unit = _unit_words_job(one_call)
    job.done(unit, b"not a pickle", 0.01)
    error = job.results()[0].error
    assert str(error).startswith(f"{what} came back from the worker but cannot be loaded"), error


@pytest.mark.parametrize(("one_call", "where"), [(False, "the chunk of items 0-3"), (True, "the call")])
def test_the_slowest_unit_is_named_as_describe_unit_does(one_call, where):
    job, unit = _unit_words_job(one_call)
    job.done(unit, payload.dumps_data(list(range(unit.count))), 0.5)
    assert job.slowest_where == where
    job2, unit2 = _unit_words_job()
    job2.done(job2._part(unit2, 1, 2), payload.dumps_data([1]), 0.5)
    assert job2.slowest_where == "item 1"


def test_a_unit_that_did_not_run_is_named_as_describe_unit_does():
    job, unit = _unit_words_job()
    job.not_run(unit, "no worker")
    assert str(job.results()[0].error) == "items 0-3 (chunk starting at 0) did not run: no worker"
    call, unit = _unit_words_job(one_call=True)
    call.not_run(unit, "no worker")
    assert str(call.results()[0].error) == "the call abs(0) did not run: no worker"


def test_a_rechecked_block_is_named_as_describe_unit_does():
    said: list[str] = []
    job, unit = _unit_words_job(out=lambda stream, text: said.append(text))
    unit.recheck = "died"
    job.done(unit, payload.dumps_data(list(range(4))), 0.01)
    assert said == ["mpmagic: a worker died while running one of items 0-3; "
                    "re-run one at a time they all succeeded, so no result is missing, but those of them that had "
                    "run before it ended ran twice (which ones is not known)\n"]


class _EndTakenThenInterrupted:
    """A run's event queue whose ``get`` raises KeyboardInterrupt right after it took the
    end event off the queue: where a Ctrl-C lands when it comes as the run ends (the
    pending signal runs its handler at the next bytecode after the ``get``)."""

    def __init__(self, events):
        self.events, self.interrupts = events, 0

    def __getattr__(self, name):
        return getattr(self.events, name)

    def get(self, *args, **kwargs):
        from mpmagic import engine

        ev = self.events.get(*args, **kwargs)
        if ev is engine._END and not self.interrupts:
            self.interrupts += 1
            raise KeyboardInterrupt
        return ev


def test_a_wait_after_an_interrupt_that_took_the_end_event_returns_at_once():
    """Waiting on a run is idempotent: a run that ended stays ended for every later wait.

    ``pmap`` cancels an interrupted run and waits on it again; when the interrupt had
    come right after the first wait took the end event, the second wait blocked for ever
    on a queue nobody fills again, under ``sigint_deferred`` (more presses did nothing):
    the kernel hung. (Before the fix this second wait timed out: it returned False.)"""
    from mpmagic import engine

    shown, back = [], []

    class _Job:
        items_total = 1

        def redirect(self, out, progress, chunk, ask_input):
            back.append(out)  # (the run hands the job its own callbacks back at its end)
            return (lambda stream, text: shown.append(text), None, None, None)

    run = engine.Run(_Job())
    run._events = _EndTakenThenInterrupted(run._events)
    run._emit_out("stdout", "printed before the end\n")
    run._finish()
    with pytest.raises(KeyboardInterrupt):
        run.wait()
    assert run._events.interrupts == 1 and run.done()
    assert run.wait(HANG) is True  # at once (the bound only turns the old hang into a failure)
    assert run.wait(0) is True and run.wait() is True
    assert shown == ["printed before the end\n"] and len(back) == 2  # the job got its callbacks back


def test_a_driven_run_interrupted_between_its_drive_and_its_end_is_never_driven_again(monkeypatch):
    """A Dask run is driven by its first wait (engine.DrivenRun). A Ctrl-C after the drive
    returned but before the run was marked ended made the caller's second wait drive the
    whole job again; now every later wait returns at once, the run ended."""
    from mpmagic import engine

    class _Job:
        items_total = 1

        def redirect(self, out, progress, chunk, ask_input):
            return (None, None, None, None)

    drives = []
    run = engine.DrivenRun(_Job(), lambda: drives.append(1))
    finish = engine.DrivenRun._finish

    def interrupted_finish(self, error=None):
        if not drives or len(drives) > 1 or getattr(self, "_hit", False):
            return finish(self, error)
        self._hit = True
        raise KeyboardInterrupt  # lands just before the end is recorded

    monkeypatch.setattr(engine.DrivenRun, "_finish", interrupted_finish)
    with pytest.raises(KeyboardInterrupt):
        run.wait()
    assert run.wait() is True and run.done() and drives == [1]
    assert run.wait(0) is True and drives == [1]


def test_pmap_interrupted_right_after_its_run_ended_raises_the_interrupt_not_a_hang(ip, local_pool, monkeypatch):
    """The tester's hang, deterministically: the Ctrl-C lands in ``pmap``'s wait just after
    the end event was taken. ``pmap`` then raises KeyboardInterrupt (serial map would raise
    it too), its one line says no worker was stopped, and the pool serves the next call.

    Before the fix the interrupt's cleanup waited for ever; a watchdog here puts a second
    end event after HANG seconds so the hang fails the test instead of blocking the suite."""
    from mpmagic import engine

    run(ip, "def sq(x):\n    return x * x\n")
    sq = ip.user_ns["sq"]
    runs = []
    init = engine.Run.__init__

    def init_interrupted(self, job):
        init(self, job)
        self._events = _EndTakenThenInterrupted(self._events)
        runs.append(self)

    monkeypatch.setattr(engine.Run, "__init__", init_interrupted)
    over = threading.Event()
    rescued = []

    def watchdog():
        if not over.wait(HANG):
            for r in runs:
                rescued.append(r)
                r._events.put(engine._END)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            mpmagic.pmap(sq, range(20))
    finally:
        over.set()
    assert rescued == [] and len(runs) == 1 and runs[0]._events.interrupts == 1
    assert "no worker was stopped or replaced" in str(caught.value)  # it had ended: nothing was stopped
    monkeypatch.undo()
    assert mpmagic.pmap(sq, range(20)) == list(map(sq, range(20)))


@pytest.mark.parametrize("marker", ["while other ranks still run", "printed by rank 1"])
def test_output_queued_just_before_an_interrupt_is_shown(ip, local_pool, capfd, monkeypatch, marker):
    """The interrupt comes right after a line was queued for the cell (rank 0's
    failure line, or what a rank printed), before the waiting thread printed it:
    serial code would have shown it, so the interrupted cell shows it too, before
    the interrupt's own line. The interrupt could land right after the wait took the
    line off the queue, before it was printed: the line was lost."""
    from mpmagic import engine, jobs

    monkeypatch.setattr(jobs, "RANK_FAILURE_GRACE", 30.0)  # (the user interrupts before the abort)
    run(ip, "import mpmagic\nq = mpmagic.Queue()")
    emit = engine.Run._emit_out
    sent = threading.Event()

    def emit_then_interrupt(self, stream: str, text: str) -> None:  # (the interrupt as the line is queued)
        emit(self, stream, text)
        if marker in text and not sent.is_set():
            sent.set()
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    monkeypatch.setattr(engine.Run, "_emit_out", emit_then_interrupt)
    capfd.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run(ip, "%%parallel -n 2 -q\n"
                "if rank == 0:\n    raise ValueError('no input file')\n"
                "else:\n    print('printed by rank 1', flush=True)\n    q.get()\n")
    assert sent.is_set()
    out, err = capfd.readouterr()
    assert marker in out + err


@pytest.mark.parametrize("call", ["%pmap -q held, range(2)", "mpmagic.submit(held, range(2))"])
@pytest.mark.parametrize("where", ["_submit", "submit"])
def test_a_ctrl_c_as_submit_hands_the_run_over_cancels_that_run(ip, local_pool, monkeypatch, where, call):
    """Found by the suite under load: the interrupt test's Ctrl-C (a timer, 0.5 s in) landed
    after ``submit`` had put the run in flight and sent its units, but before its caller held
    the handle (here: as ``_submit`` returns into ``submit``'s ``finally``, and as ``submit``
    returns into its caller). The KeyboardInterrupt went up without cancelling anything: the
    run's items kept both workers busy (for ever, for a loop), and the next call waited behind
    them. Now the caller finds the run the interrupt hit by its job (``Backend.run_of``) and
    cancels it, as an interrupt of its wait does; a background run's too (its handle never
    came back, and nothing would have ended it)."""
    from mpmagic.backends import local

    run(ip, "import time, mpmagic\ndef held(x):\n    time.sleep(30)\n    return x\n")
    backend = mpmagic.get_pool()
    hits = []
    handing = getattr(local.LocalBackend, where)

    def interrupted(self, *args, **kwargs):
        handed = handing(self, *args, **kwargs)
        if not hits:
            hits.append(1)
            raise KeyboardInterrupt  # (a SIGINT handled at the return)
        return handed

    monkeypatch.setattr(local.LocalBackend, where, interrupted)
    with pytest.raises(KeyboardInterrupt):  # (for submit, a background run: nothing is left running either)
        run(ip, call)
    assert hits == [1]
    assert not backend._runs, backend._runs  # (the interrupted run is not in flight: cancelled)
    assert run(ip, "%pmap -q abs, [-1, -2, 3]") == [1, 2, 3]


def _sigint_in_this_thread() -> None:
    """A SIGINT handled in the calling thread (a timer's), not the main one, as Linux may
    hand a process's interrupt to any thread."""
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)


def test_a_sigint_another_thread_took_still_interrupts_the_main_threads_wait(ip, local_pool):
    """Found by the suite under load (the docs test's interrupt of a map of an endless loop
    never came): the kernel's interrupt is sent to the process, and Linux may hand it to
    another thread (when the main thread has a signal pending, a stopped worker's SIGCHLD).
    Python's handler ran there, and the main thread, blocked in its wait for the run's next
    event, was never woken to raise the KeyboardInterrupt: for a loop, never. The wait now
    looks at the signals every ``engine.SIGNAL_POLL`` seconds."""
    run(ip, "import time\ndef held(x):\n    t = time.monotonic()\n    while time.monotonic() - t < 30:\n        pass\n    return x\n")
    backend = mpmagic.get_pool()

    # (1.6 s in: past the wait for the progress bar's delay, which wakes the main thread at 1 s)
    timer = threading.Timer(1.6, _sigint_in_this_thread)
    t0 = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        run(ip, "%pmap -q held, range(2)")
    assert time.monotonic() - t0 < 10  # (before: when the items ended, 30 s in; for a loop, never)
    assert not backend._runs, backend._runs  # (cancelled, as an interrupt of the wait does)
    assert run(ip, "%pmap -q abs, [-1, 2]") == [1, 2]


def test_a_sigint_another_thread_took_still_interrupts_a_wait_on_a_background_run(ip, local_pool):
    """The same for ``handle.result()`` (an Event's wait, with no limit): the interrupt stops
    the waiting, as a SIGINT the main thread took does, and the run goes on."""
    run(ip, "import time, mpmagic\ndef held(x):\n    t = time.monotonic()\n    while time.monotonic() - t < 30:\n"
            "        pass\n    return x\n")
    handle = run(ip, "mpmagic.submit(held, range(2))")

    timer = threading.Timer(0.5, _sigint_in_this_thread)
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt, match="interrupted"):
            handle.result()
        assert time.monotonic() - t0 < 10  # (before: when the run ended, 30 s in)
        assert not handle.done()  # (the waiting stopped, not the run)
    finally:
        handle.cancel()
    assert run(ip, "%pmap -q abs, [-1, 2]") == [1, 2]
