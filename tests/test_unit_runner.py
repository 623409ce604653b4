"""One way to run a unit (issue 15.4): the same Map/Cell messages through a
local worker process, the Dask task function called in this process, and the
Dask task on a real cluster give the same replies."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import uuid

import cloudpickle
import pytest

from mpmagic import payload, worker
from mpmagic.backends import dask_tasks
from mpmagic.cell import make_cell_spec
from mpmagic.cpus import run_queue_seconds
from mpmagic.protocol import (
    Cell,
    Collected,
    Done,
    Error,
    Func,
    Map,
    Out,
    Ready,
    Stop,
    Unpicklable,
    pack,
    unpack,
)

# The Dask workers cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def double(x):
    return x * 2


def picky(x):
    if x == 3:
        raise ValueError(f"no {x}")
    return x


def stops(x):
    if x == 2:
        raise StopIteration("exhausted")
    return x


def exits(x):
    if x == 1:
        sys.exit(4)
    return x


def interrupts(x):
    if x == 1:
        raise KeyboardInterrupt
    return x


def lock_at_two(x):
    return threading.Lock() if x == 2 else x


# name -> (function, items, star, collect, timing, block)
MAPS = {
    "plain": (double, [1, 2, 3], False, False, False, 1),
    "star": (pow, [(2, 3), (3, 2)], True, False, False, 1),
    "blocks": (double, list(range(10)), False, False, False, 4),
    "blocks_stop": (stops, list(range(10)), False, False, False, 4),
    "error": (picky, [1, 2, 3, 4], False, False, False, 1),
    "error_collect": (picky, [1, 2, 3, 4], False, True, False, 1),
    "stop_iteration": (stops, [0, 1, 2, 3], False, False, False, 1),
    "stop_iteration_collect": (stops, [0, 1, 2, 3], False, True, False, 1),
    "system_exit": (exits, [0, 1, 2], False, False, False, 1),
    "keyboard_interrupt_collect": (interrupts, [0, 1, 2], False, True, False, 1),
    "unpicklable": (lock_at_two, [1, 2, 3], False, False, False, 1),
    "unpicklable_collect": (lock_at_two, [1, 2, 3], False, True, False, 1),
    "timed": (picky, [1, 2, 3, 4], False, True, True, 1),
    "load_failure": (None, [1], False, False, False, 1),
}

CELLS = {
    "cell": "x = rank * 10\nx + size",
    "cell_error": "1 / (rank - rank)",
    "cell_unpicklable": "import threading\nthreading.Lock()",
    "cell_exit": "import sys\nsys.exit(rank)",
}


def _message(case: str, key: bytes) -> tuple[tuple, bytes | None]:
    if case in CELLS:
        spec = make_cell_spec(CELLS[case], {})
        return Cell(1, 1, 2, payload.cloudpickle_dumps(spec)), None
    func, items, star, collect, timing, block = MAPS[case]
    data = b"this is not a pickle" if func is None else payload.dumps_function(func)
    return Map(1, 0, key, star, collect, payload.dumps_data(items), timing, block), data


def _summary(reply: tuple) -> tuple:
    """What must agree between channels (not times, not worker names)."""
    def message(info):
        # Where a worker marks positions (local), the StopIteration's own text is
        # kept; on the fast path (Dask has no crash position) only its kind.
        return _STOP if info.message.startswith(_STOP) else info.message

    def result(r):
        return ("failed", r.type_name, message(r)) if isinstance(r, worker.ErrorInfo) else r

    kind = type(reply).__name__
    if type(reply) is Done:
        loaded = payload.loads(reply.data)
        values = [result(r) for r in loaded] if isinstance(loaded, list) else loaded
        # "once" (one-time costs: the function's first loading, imports; see
        # warmup.py) comes with a unit that paid them: tests/test_warm.py checks it.
        return kind, values, sorted(k for k in reply.meta if k != "once")
    if type(reply) is Error:
        partial = payload.loads(reply.partial) if reply.partial else None
        return kind, reply.index, reply.info.type_name, message(reply.info), partial
    assert type(reply) is Unpicklable
    return kind, reply.index, reply.info.type_name


# -- channels ---------------------------------------------------------------


@pytest.fixture(scope="module")
def local_worker():
    """A local worker process on a bare pipe; ``run(msg, func_bytes)`` returns its reply."""
    ctx = multiprocessing.get_context("forkserver")
    here, there = ctx.Pipe()
    position = ctx.RawValue("q", -1)
    proc = ctx.Process(target=worker.main, args=(there, os.getpid(), 0, position), daemon=True)
    proc.start()
    there.close()
    assert here.poll(60) and type(unpack(here.recv_bytes())) is Ready

    def run(msg, func_bytes):
        if func_bytes is not None:
            here.send_bytes(pack(Func(msg.key, func_bytes)))
        here.send_bytes(pack(msg))
        while True:
            assert here.poll(30), "the worker did not reply"
            reply = unpack(here.recv_bytes())
            if type(reply) not in (Out, Collected):  # (Collected: a collected failure told early, not a reply)
                return reply

    yield run
    here.send_bytes(pack(Stop()))
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    here.close()


def dask_in_process(msg, func_bytes):
    """The Dask task function called here, without a cluster."""
    streamed, packed, differs, reloaded = dask_tasks.run_message(pack(msg), func_bytes, None, "tag")
    assert differs == [] and reloaded == []  # (no module of the user's here: none differs, none reloaded)
    assert streamed == 0  # no Dask worker: output comes back with the reply
    *outs, reply = [unpack(p) for p in packed]
    assert all(type(o) is Out for o in outs)
    return reply


@pytest.fixture(scope="module")
def dask_client(dask_cluster):
    from distributed import Client

    client = Client(dask_cluster.address, set_as_default=False, timeout=30)
    yield client
    client.close()


ALL = list(MAPS) + list(CELLS)


@pytest.mark.parametrize("case", ALL)
def test_local_worker_and_dask_task_reply_the_same(case, local_worker):
    key = uuid.uuid4().bytes
    msg, func_bytes = _message(case, key)
    local = local_worker(msg, func_bytes)
    before = sys.stdout, sys.stderr
    in_process = dask_in_process(msg, func_bytes)
    assert (sys.stdout, sys.stderr) == before  # the capture is removed after the task
    assert _summary(local) == _summary(in_process)
    EXPECTED[case](_summary(local))


@pytest.mark.parametrize("case", ["plain", "error_collect", "stop_iteration", "system_exit", "unpicklable", "cell_error"])
def test_dask_task_on_a_real_cluster_replies_the_same(case, dask_client):
    key = uuid.uuid4().bytes
    msg, func_bytes = _message(case, key)
    streamed, packed, _, _ = dask_client.submit(
        dask_tasks.run_message, pack(msg), func_bytes, None, "tag", pure=False
    ).result(timeout=60)
    reply = unpack(packed[-1])
    assert _summary(reply) == _summary(dask_in_process(msg, func_bytes))


# -- what each case must give (the serial oracle, in reply form) --------------

# rss: the pool's memory limit reads it; runq (where the kernel says): the task's wait for a core
_META = sorted(["cpu", "end", "rss", "start", "worker"] + (["runq"] if run_queue_seconds() is not None else []))
_TIMED_META = sorted(_META + ["item_top", "items_timed", "transfer"])
_STOP = "the task raised StopIteration"


def _stopped(summary, index):
    kind, idx, type_name, message, partial = summary
    assert (kind, idx, type_name) == ("Error", index, "RuntimeError") and message.startswith(_STOP)
    assert partial == list(range(index))


EXPECTED = {
    "plain": lambda s: s == ("Done", [2, 4, 6], _META) or pytest.fail(str(s)),
    "star": lambda s: s == ("Done", [8, 9], _META) or pytest.fail(str(s)),
    "blocks": lambda s: s == ("Done", [2 * i for i in range(10)], _META) or pytest.fail(str(s)),
    "blocks_stop": lambda s: _stopped(s, 2),
    "error": lambda s: s == ("Error", 2, "ValueError", "no 3", [1, 2]) or pytest.fail(str(s)),
    # (a collecting chunk says how many of its items failed: meta["failed"])
    "error_collect": lambda s: s == ("Done", [1, 2, ("failed", "ValueError", "no 3"), 4], sorted(_META + ["failed"]))
    or pytest.fail(str(s)),
    "stop_iteration": lambda s: _stopped(s, 2),
    "stop_iteration_collect": lambda s: (
        s[0] == "Done" and s[1][:2] == [0, 1] and s[1][3] == 3 and s[1][2][1] == "RuntimeError"
    ) or pytest.fail(str(s)),
    "system_exit": lambda s: s == ("Error", 1, "SystemExit", "4", [0]) or pytest.fail(str(s)),
    "keyboard_interrupt_collect": lambda s: (
        s[0] == "Done" and s[1][0] == 0 and s[1][2] == 2 and s[1][1][1] == "RuntimeError" and "KeyboardInterrupt" in s[1][1][2]
    ) or pytest.fail(str(s)),
    "unpicklable": lambda s: s == ("Unpicklable", 1, "TypeError") or pytest.fail(str(s)),
    "unpicklable_collect": lambda s: (
        s[0] == "Done" and s[1][0] == 1 and s[1][2] == 3 and s[1][1][1] == "SerializationError"
    ) or pytest.fail(str(s)),
    "timed": lambda s: s == ("Done", [1, 2, ("failed", "ValueError", "no 3"), 4], sorted(_TIMED_META + ["failed"]))
    or pytest.fail(str(s)),
    "load_failure": lambda s: (s[0], s[1], s[2]) == ("Error", -1, "UnpicklingError") or pytest.fail(str(s)),
    "cell": lambda s: s == ("Done", (12, {}), _META) or pytest.fail(str(s)),
    "cell_error": lambda s: s[:3] == ("Error", 0, "ZeroDivisionError") or pytest.fail(str(s)),
    "cell_unpicklable": lambda s: s == ("Unpicklable", None, "TypeError") or pytest.fail(str(s)),
    "cell_exit": lambda s: s[:4] == ("Error", 0, "SystemExit", "1") or pytest.fail(str(s)),
}


def test_every_case_has_an_expectation():
    assert set(EXPECTED) == set(ALL)


def test_between_units_a_ranks_threads_lines_go_out_whole_and_labelled_others_as_they_are():
    """``worker._AfterUnits``, a worker's sys.stdout between units: a line a thread of
    rank 0 prints is labelled with that rank and goes out whole, though another thread
    prints its pieces in between (``print`` writes them one by one: two ranks' lines
    came mixed); the other thread, no rank's, unlabelled."""
    import io

    fd_stream = io.StringIO()
    ranks: dict[int, int] = {}
    after = worker._AfterUnits(fd_stream, ranks)
    turns = threading.Barrier(2)

    def say(rank: int | None) -> None:
        if rank is not None:
            ranks[threading.get_ident()] = rank
        for piece in ("late", " from ", str(rank), "\n"):
            turns.wait()  # (the two threads write their pieces in turn)
            after.write(piece)

    threads = [threading.Thread(target=say, args=(rank,)) for rank in (0, None)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(fd_stream.getvalue().splitlines(keepends=True)) == ["[rank 0] late from 0\n", "late from None\n"]
