"""The notebook<->worker protocol alone (mpmagic/protocol.py): every message
kind packed and unpacked in isolation, anything else is a ProtocolError, and a
real worker process spoken to over a bare pipe, without a pool or a job."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import threading

import pytest

from mpmagic import payload, protocol, worker, worker_logging
from mpmagic.protocol import (
    Cell,
    Collected,
    Context,
    Done,
    Error,
    Forget,
    Func,
    Import,
    Map,
    Missing,
    NoFiles,
    Out,
    Outs,
    ProtocolError,
    Ready,
    Reload,
    Setup,
    SetupDone,
    Stop,
    Unmap,
    Unpicklable,
    pack,
    pack_parts,
    unpack,
)

EXAMPLES = [
    Func(b"k" * 16, b"payload"),
    Map(1, 2, b"k" * 16, False, True, b"items", False, 32, (64, b"levels")),
    Cell(1, 3, 4, b"spec", (None, b"levels")),
    Context(7, b"state"),
    Unmap(["mpm_1_a", "mpm_1_b"]),
    Forget([b"k" * 16, b"j" * 16]),
    Stop(),
    Ready(1234, 0),
    Out(1, 2, "stdout", "hello\n"),
    Outs(1, 2, (("stdout", "a\n"), ("stderr", "b\n"))),
    Done(1, 2, b"results", 0.25, {"worker": 0, "start": 1.0, "end": 1.25, "cpu": 0.2}),
    Error(1, 2, 3, worker.ErrorInfo(ValueError("bad")), b"partial", 0.5),
    Unpicklable(1, 2, None, worker.ErrorInfo(TypeError("cannot pickle"))),
    Missing(1, 2, b"k" * 16),
    NoFiles(1, 2, 1024, 24),
    Collected(1, 2, 3, worker.ErrorInfo(ValueError("bad"))),
    Import(["numpy", "pandas"]),
    Reload(["mymod"]),
    Setup(3, b"entries"),
    SetupDone(3, 5, "setup failed on worker 5, %%pool setup, line 1 (`1 / 0`): ZeroDivisionError", ["A"], "hi\n"),
]


def test_every_kind_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(protocol.KINDS)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_each_kind_packs_and_unpacks_to_itself(msg):
    back = unpack(pack(msg))
    assert type(back) is type(msg)
    assert back._fields == msg._fields
    for name in msg._fields:
        a, b = getattr(msg, name), getattr(back, name)
        if isinstance(a, worker.ErrorInfo):
            assert (a.type_name, a.message, a.exc_text) == (b.type_name, b.message, b.exc_text)
        else:
            assert a == b, name


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_on_the_wire_a_message_is_a_plain_tuple(msg):
    """No class travels: a peer needs only pickle to read the layout."""
    raw = pickle.loads(pack(msg))
    assert type(raw) is tuple and isinstance(raw[0], int) and len(raw) == len(msg) + 1
    assert [type(v) for v in raw[1:]] == [type(v) for v in msg]


@pytest.mark.parametrize(
    "raw",
    [
        ("map", 1, 2),  # the string kinds of the old format
        (99, "x"),  # an unknown code
        (protocol.KINDS.index(Stop), "extra"),  # a known code with the wrong fields
        (protocol.KINDS.index(Map), 1, 2),
        (),
        "not a tuple",
        None,
        (-1,),
    ],
    ids=repr,
)
def test_anything_else_is_a_protocol_error(raw):
    with pytest.raises(ProtocolError, match="not an mpmagic message"):
        unpack(pickle.dumps(raw))


def test_sending_something_that_is_not_a_message_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="not an mpmagic message kind"):
        pack(("map", 1, 2))


def test_the_local_backend_rejects_a_request_coming_from_a_worker():
    from mpmagic.backends.local import LocalBackend, _Slot

    backend = LocalBackend.__new__(LocalBackend)
    slot = _Slot(0, None, None, 0.0)
    with pytest.raises(ProtocolError, match="sent a Map message"):
        backend._handle(slot, EXAMPLES[1])


# -- a worker process over a bare pipe -----------------------------------------


@pytest.fixture
def bare_worker():
    """A worker process (mpmagic.worker.main) and the notebook's end of its pipe."""
    ctx = multiprocessing.get_context("forkserver")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=worker.main, args=(there, os.getpid(), 5), daemon=True)
    proc.start()
    there.close()
    yield here, proc
    if proc.is_alive():
        here.send_bytes(pack(Stop()))
        proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    here.close()


def _replies(conn, until=(Done, Error, Unpicklable, Missing)) -> list:
    got = []
    while True:
        assert conn.poll(30), f"no reply; got {got}"
        msg = unpack(conn.recv_bytes())
        got.append(msg)
        if type(msg) in until:
            return got


def test_a_worker_speaks_every_kind(bare_worker, tmp_path):
    conn, proc = bare_worker
    ready = _replies(conn, until=(Ready,))
    assert ready == [Ready(proc.pid, 5)]

    def shout(x):
        print("item", x)
        return x * 2

    key, data = b"f" * 16, payload.dumps_function(shout)
    items = payload.dumps_data([1, 2, 3])
    # Not cached yet: Missing names the key.
    conn.send_bytes(pack(Map(1, 0, key, False, False, items, False, 1)))
    assert _replies(conn) == [Missing(1, 0, key)]
    conn.send_bytes(pack(Func(key, data)))
    conn.send_bytes(pack(Map(1, 1, key, False, False, items, False, 1)))
    got = _replies(conn)
    outs, done = got[:-1], got[-1]
    assert type(done) is Done and (done.call, done.tag) == (1, 1)
    assert payload.loads(done.data) == [2, 4, 6] and done.meta["worker"] == 5
    assert "".join(o.text for o in outs) == "item 1\nitem 2\nitem 3\n"
    assert all(type(o) is Out and o.stream == "stdout" and o.tag == 1 for o in outs)
    # An item that fails: Error with its index and the results before it.
    conn.send_bytes(pack(Map(1, 2, key, False, False, payload.dumps_data([1, None]), False, 1)))
    err = _replies(conn)[-1]
    assert type(err) is Error and err.index == 1 and err.info.type_name == "TypeError"
    assert payload.loads(err.partial) == [2]
    # A result that cannot travel.
    conn.send_bytes(pack(Func(b"g" * 16, payload.dumps_function(lambda x: threading.Lock()))))
    conn.send_bytes(pack(Map(1, 3, b"g" * 16, False, False, items, False, 1)))
    bad = _replies(conn)[-1]
    assert type(bad) is Unpicklable and bad.index == 0
    # Context: the worker adopts the directory it names.
    from mpmagic import context

    os.chdir(tmp_path)
    try:
        conn.send_bytes(pack(context.current()))
    finally:
        os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    conn.send_bytes(pack(Func(b"h" * 16, payload.dumps_function(lambda x: os.getcwd()))))
    conn.send_bytes(pack(Map(1, 4, b"h" * 16, False, False, payload.dumps_data([0]), False, 1)))
    assert payload.loads(_replies(conn)[-1].data) == [str(tmp_path)]
    # A cell rank.
    from mpmagic.cell import make_cell_spec

    spec = make_cell_spec("x = rank * 10\nx + size", {})
    conn.send_bytes(pack(Cell(1, 2, 4, payload.cloudpickle_dumps(spec))))
    done = _replies(conn)[-1]
    assert type(done) is Done and done.tag == 2 and payload.loads(done.data) == (24, {})
    conn.send_bytes(pack(Unmap(["mpm_0_none"])))  # no reply; the worker keeps serving
    # Import: the worker imports the modules before the next unit (a missing one
    # is logged, not raised), and the next reply's meta says what it imported.
    conn.send_bytes(pack(Import(["colorsys", "no_such_module_for_mpmagic"])))
    conn.send_bytes(pack(Func(b"i" * 16, payload.dumps_function(lambda x: x in sys.modules))))
    conn.send_bytes(pack(Map(1, 5, b"i" * 16, False, False, payload.dumps_data(["colorsys"]), False, 1)))
    done = _replies(conn)[-1]
    assert type(done) is Done and payload.loads(done.data) == [True]
    assert ("preload", ["colorsys"]) in [tuple(r[:2]) for r in done.meta["once"]["imports"]]
    # Forget: the worker drops that function (no reply); a map naming it gets Missing.
    conn.send_bytes(pack(Forget([b"i" * 16, b"never sent" * 2])))
    conn.send_bytes(pack(Map(1, 6, b"i" * 16, False, False, payload.dumps_data(["colorsys"]), False, 1)))
    assert _replies(conn)[-1] == Missing(1, 6, b"i" * 16)
    # The worker setup: SetupDone with the names it defined and what it printed; then they are globals.
    from mpmagic import worker_setup

    entries = payload.dumps_data([worker_setup._Entry("code", "%%pool setup", "SETUP_A = 7\nprint('up')\n")])
    conn.send_bytes(pack(Setup(1, entries)))
    assert _replies(conn, until=(SetupDone,)) == [SetupDone(1, 5, None, ["SETUP_A"], "up\n")]
    conn.send_bytes(pack(Func(b"s" * 16, payload.dumps_function(lambda x: SETUP_A + x))))  # noqa: F821
    conn.send_bytes(pack(Map(1, 5, b"s" * 16, False, False, payload.dumps_data([1]), False, 1)))
    assert payload.loads(_replies(conn)[-1].data) == [8]
    conn.send_bytes(pack(Setup(2, None)))  # a cleared setup: its names are gone
    assert _replies(conn, until=(SetupDone,)) == [SetupDone(2, 5, None, [], "")]
    conn.send_bytes(pack(Stop()))
    proc.join(10)
    assert proc.exitcode == 0


def test_a_worker_given_an_unknown_message_stops_with_a_protocol_error(bare_worker):
    conn, proc = bare_worker
    _replies(conn, until=(Ready,))
    conn.send_bytes(pickle.dumps(("map", 1, 2)))
    proc.join(30)
    assert proc.exitcode not in (0, None)


def test_a_unit_without_a_log_context_captures_nothing():
    """The field's default (hand-made messages, older tests): no logging capture."""
    assert Map(1, 0, b"k", False, False, b"", False, 1).log_context is None
    assert Cell(1, 0, 2, b"").log_context is None
    assert unpack(pack(Map(1, 0, b"k", False, False, b"", False, 1))).log_context is None


def test_a_worker_labels_records_by_the_chunks_first_index_and_a_failure_carries_its_locals(bare_worker):
    """What Map.log_context carries reaches the worker: the notebook's levels decide
    which records come home, the start index labels them; ErrorInfo.context holds
    the raising frame's locals, the worker id and its pid."""
    import logging

    conn, proc = bare_worker
    _replies(conn, until=(Ready,))

    def note(x):
        logging.getLogger("calc").info("item says %s", x)
        scaled = x * 100  # noqa: F841 (a local the failure must carry home)
        return 1 // (x - 12)

    key = b"n" * 16
    conn.send_bytes(pack(Func(key, payload.dumps_function(note))))
    items = payload.dumps_data([10, 11, 12])
    info_levels = pickle.dumps(({"": logging.INFO}, ()))  # (levels, "always" filters: worker_logging.notebook_context)
    conn.send_bytes(pack(Map(1, 0, key, False, False, items, False, 1, (10, info_levels))))
    got = _replies(conn)
    err = got[-1]
    text = "".join(o.text for o in got[:-1] if type(o) is Out)
    console = logging.StreamHandler()  # (the notebook's logging.basicConfig(): INFO prints serially only through one)
    root = logging.getLogger()
    level = root.level
    root.addHandler(console)
    root.setLevel(logging.INFO)  # (the levels sent above: at home, a record below the root's is dropped)
    try:
        text = worker_logging.WarningRelay()(text)  # (each record comes as a marked line, shown at home as its lines)
    finally:
        root.removeHandler(console)
        root.setLevel(level)
    assert text == "[item 10] INFO:calc:item says 10\n[item 11] INFO:calc:item says 11\n[item 12] INFO:calc:item says 12\n"
    assert type(err) is Error and err.index == 2
    ctx = err.info.context
    assert ctx["locals"] == {"x": "12", "scaled": "1200"}
    assert (ctx["worker"], ctx["pid"]) == (5, proc.pid)
    # Without a log context nothing comes home (the levels are still INFO);
    # with the notebook at WARNING neither.
    warn_levels = pickle.dumps(({"": logging.WARNING}, False))
    for log_context in (None, (0, warn_levels)):
        conn.send_bytes(pack(Map(1, 1, key, False, True, items, False, 1, log_context)))
        got = _replies(conn)
        assert type(got[-1]) is Done and not [o for o in got if type(o) is Out], got


def test_a_map_with_large_items_goes_in_parts_without_copying_them():
    """pack_parts: the items follow the pickle of the other fields as they are
    (never copied into the message), and unpack reads them back as a view of
    the message (never copied out); a small Map, or any other kind, is pack's."""
    items = payload.dumps_data([bytes(range(256)) * 400 for _ in range(2)])
    msg = Map(1, 2, b"k" * 16, False, True, items, False, 32, (64, b"levels"))
    parts = pack_parts(msg)
    assert len(parts) == 3 and parts[-1] is items
    wire = b"".join(parts)
    back = unpack(wire)
    assert type(back) is Map and back._replace(items=b"") == msg._replace(items=b"")
    assert isinstance(back.items, memoryview) and back.items.obj is wire and back.items == items
    assert payload.loads(back.items) == payload.loads(items)
    small = Map(1, 2, b"k" * 16, False, True, b"items", False, 32)
    assert pack_parts(small) == (pack(small),) and pack_parts(Context(7, items)) == (pack(Context(7, items)),)
    with pytest.raises(ProtocolError, match="not an mpmagic message"):
        unpack(b"\x00\x01")
