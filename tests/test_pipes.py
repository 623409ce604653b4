"""backends/pipes.py: the manager's sends never block, and arrive whole and in order."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import socket
import struct
import threading
import time

import pytest

import mpmagic
from mpmagic.backends.pipes import Receiver, Sender, frame


def _pair():
    a, b = multiprocessing.Pipe(duplex=True)
    return a, b


def test_a_full_pipe_keeps_the_rest_and_never_blocks():
    ours, theirs = _pair()
    sender = Sender(ours)
    try:
        big = os.urandom(3 << 20)  # more than any socket buffer here
        messages = [b"", b"x", big, b"after the big one", big[:100_000]]
        t0 = time.monotonic()
        done = [sender.send(m) for m in messages]
        assert time.monotonic() - t0 < 1.0  # nobody reads yet: it must not have waited
        assert sender.pending and not all(done)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.extend(theirs.recv_bytes() for _ in messages))
        reader.start()
        deadline = time.monotonic() + 30
        while sender.pending and time.monotonic() < deadline:
            sender.flush()  # what the manager does when its selector says "writable"
            time.sleep(0.001)
        reader.join(30)
        assert not sender.pending
        assert got == messages
    finally:
        sender.close()
        ours.close()
        theirs.close()


def test_a_message_in_parts_arrives_as_one():
    """A message given in parts (protocol.pack_parts) is framed as one:
    Connection.recv_bytes reads their concatenation, the big part uncopied."""
    ours, theirs = _pair()
    sender = Sender(ours)
    try:
        big = os.urandom(200_000)
        parts = (b"head", b"", big)
        views = frame(parts)
        assert views[-1].obj is big and struct.unpack("!i", views[0])[0] == len(big) + 4
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.extend(theirs.recv_bytes() for _ in range(2)))
        reader.start()
        sender.send(parts)
        sender.send(b"after")
        deadline = time.monotonic() + 30
        while sender.pending and time.monotonic() < deadline:
            sender.flush()
            time.sleep(0.001)
        reader.join(30)
        assert got == [b"head" + big, b"after"]
    finally:
        sender.close()
        ours.close()
        theirs.close()


def _writing_slowly(sock: socket.socket, wire: bytes, step: int, pause: float) -> threading.Thread:
    """A started thread writing ``wire`` into ``sock`` ``step`` bytes at a time, ``pause``
    seconds apart, then closing it (a reader sees the pipe's end)."""

    def write() -> None:
        with sock:
            for i in range(0, len(wire), step):
                sock.sendall(wire[i : i + step])
                time.sleep(pause)

    writer = threading.Thread(target=write)
    writer.start()
    return writer


def test_the_worker_reads_what_was_framed_whole_however_it_arrives():
    """worker.MessageReader reads each framed message back, small ones as bytes
    and big ones (read into one buffer of their size) however the pipe splits
    them, and says EOFError at the pipe's end."""
    from mpmagic.worker import MessageReader

    a, b = socket.socketpair()
    big = os.urandom(3 << 20)
    messages = [b"", b"small", big, b"after", b"x" * 70_000, b"tail"]
    wire = b"".join(bytes(v) for m in messages for v in frame(m))

    writer = _writing_slowly(a, wire, 700_001, 0.002)  # (pieces that cut the headers and the big body)
    try:
        reader = MessageReader(b.fileno())
        got = [reader.read() for _ in messages]
        assert got == messages and type(got[2]) is bytearray
        with pytest.raises(EOFError):
            reader.read()
    finally:
        writer.join(30)
        b.close()


def test_the_worker_reads_small_messages_that_arrive_a_few_bytes_at_a_time():
    """A small message cut from what is held (MessageReader.read's quick path) and one
    whose head or body is still on its way (read on from the pipe) read back the same."""
    from mpmagic.worker import MessageReader

    a, b = socket.socketpair()
    messages = [b"ab", b"", b"context" * 3, b"x", b"chunk" * 7]
    wire = b"".join(bytes(v) for m in messages for v in frame(m))

    writer = _writing_slowly(a, wire, 3, 0.001)  # (pieces that cut heads and bodies, some holding two messages' parts)
    try:
        reader = MessageReader(b.fileno())
        assert [reader.read() for _ in messages] == messages
        with pytest.raises(EOFError):
            reader.read()
    finally:
        writer.join(30)
        b.close()


def test_the_worker_reads_small_messages_sent_together_in_one_read(monkeypatch):
    """A small message is one read of the pipe, not one for its head and one for
    its body, and messages that arrived together (a context, a function, a chunk)
    are one read for all: a read is a system call per unit of a warm map."""
    from mpmagic import worker

    a, b = socket.socketpair()
    messages = [b"context" * 20, b"function" * 30, b"chunk" * 10]
    with a:
        a.sendall(b"".join(bytes(v) for m in messages for v in frame(m)))
    reads = []
    real_read = os.read

    def read(fd, n):
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(worker.os, "read", read)
    try:
        reader = worker.MessageReader(b.fileno())
        assert [reader.read() for _ in messages] == messages
        assert len(reads) == 1
        with pytest.raises(EOFError):
            reader.read()
    finally:
        b.close()


def test_a_workers_replies_are_framed_as_connection_send_bytes_frames_them():
    """A worker writes its replies itself (not through ``send_bytes``): what the
    notebook's ``recv_bytes`` reads back is the packed message, small, just past
    the cut where the head is written apart, and big (written in pieces)."""
    import multiprocessing

    from mpmagic.protocol import Out, pack, unpack
    from mpmagic.worker import _Channel

    ours, theirs = multiprocessing.Pipe(duplex=True)
    channel = _Channel(theirs)
    texts = ["a line\n", "x" * 16_300, "y" * 16_500, "z" * (3 << 20)]
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(ours.recv_bytes() for _ in texts))
    reader.start()
    try:
        for text in texts:
            channel.send(Out(1, 2, "stdout", text))
        reader.join(30)
        assert [unpack(data) for data in got] == [Out(1, 2, "stdout", t) for t in texts]
        assert got == [pack(Out(1, 2, "stdout", t)) for t in texts]
    finally:
        ours.close()
        theirs.close()


def test_frames_match_multiprocessing_connection():
    """What Connection.recv_bytes reads back is what was framed, short and long alike."""
    for n in (0, 1, 16384, 16385, 1 << 20):
        data = bytes(range(256)) * (n // 256) + b"z" * (n % 256)
        a, b = socket.socketpair()
        reader = multiprocessing.connection.Connection(b.detach())
        got: list[bytes] = []
        t = threading.Thread(target=lambda got=got, reader=reader: got.append(reader.recv_bytes()))
        t.start()
        with a:
            a.sendall(b"".join(bytes(f) for f in frame(data)))
        t.join(10)
        reader.close()
        assert got == [data]


def test_a_gone_worker_is_an_oserror_not_a_hang():
    ours, theirs = _pair()
    sender = Sender(ours)
    theirs.close()
    try:
        raised = None
        try:
            for _ in range(100):
                sender.send(b"y" * 100_000)
        except OSError as exc:
            raised = exc
        assert isinstance(raised, (BrokenPipeError, ConnectionResetError))
    finally:
        sender.close()
        ours.close()


def test_a_worker_whose_pipe_closes_exits():
    """No reader thread any more: the main thread reading the pipe's end stops the worker.

    (forkserver: a fork-started sibling would inherit the notebook's end of the
    pipe, so closing it here would not end it there; the pool sends "stop"
    before it closes a pipe, and a worker's watchdog sees a dead notebook.)"""
    backend = mpmagic.start_pool(2, start_method="forkserver", wait=True)
    slot = backend.slots[0]
    with backend._lock:
        backend.slots.remove(slot)  # the manager forgets it, as _retire does
        slot.close()
    slot.proc.join(10)
    assert slot.proc.exitcode == 0


def _socketpair_receiver():
    a, b = socket.socketpair()
    return a, b, Receiver(b)


def _framed(*messages: bytes) -> bytes:
    return b"".join(bytes(part) for m in messages for part in frame(m))


def test_the_receiver_cuts_one_read_into_every_whole_message():
    a, b, rx = _socketpair_receiver()
    with a, b:
        a.sendall(_framed(b"one", b"", b"three" * 100))
        got, closed = rx.read()
        assert got == [b"one", b"", b"three" * 100] and not closed
        assert rx.read() == ([], False) and rx.empty  # nothing more, and it says so without blocking


def test_the_receiver_gives_a_message_read_alone_as_it_gives_one_cut_from_several():
    """One whole message in a read (a worker's reply, as a rule) is taken straight from
    the read, the same bytes and type as a message cut from a read holding several."""
    a, b, rx = _socketpair_receiver()
    with a, b:
        alone = []
        for message in (b"reply", b"", b"r" * 5000):
            a.sendall(_framed(message))
            got, closed = rx.read()
            alone += got
        a.sendall(_framed(b"reply", b"", b"r" * 5000))
        together, _ = rx.read()
        assert alone == together == [b"reply", b"", b"r" * 5000]
        assert [type(m) for m in alone] == [type(m) for m in together] == [bytearray] * 3


def test_the_receiver_keeps_a_partial_message_until_the_rest_comes():
    """A message cut anywhere, even inside its 4-byte header, comes out whole once."""
    data = _framed(b"first", b"x" * 70_000, b"last")
    for cut in (1, 3, 4, 7, 9, 12, 20_000, len(data) - 1):
        a, b, rx = _socketpair_receiver()
        with a, b:
            a.sendall(data[:cut])
            first, _ = rx.read()
            a.sendall(data[cut:])
            rest: list = []
            for _ in range(100):  # the big body may take several reads
                got, closed = rx.read()
                rest += got
                if len(first) + len(rest) == 3:
                    break
            assert [bytes(m) for m in first + rest] == [b"first", b"x" * 70_000, b"last"], cut


def test_a_big_message_is_read_in_place_and_a_long_header_understood():
    """Past the read size the body goes straight into its own buffer; past 2 GiB
    multiprocessing uses a 12-byte header (-1, then the 8-byte length): the same
    header with a small length must parse too."""
    big = os.urandom(5 << 20)
    a, b, rx = _socketpair_receiver()
    got: list = []
    writer = threading.Thread(target=a.sendall, args=(_framed(big, b"after"),))
    writer.start()
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        got += rx.read()[0]
    writer.join(10)
    assert [bytes(m) for m in got] == [big, b"after"]
    a.sendall(struct.pack("!iQ", -1, 3) + b"abc")
    assert rx.read()[0] == [b"abc"]
    a.close()
    b.close()


def test_the_receiver_says_when_the_worker_end_closed():
    a, b, rx = _socketpair_receiver()
    a.sendall(_framed(b"last words"))
    a.close()
    got, closed = rx.read()
    if not closed:  # (the end may come on the next read, after the data)
        more, closed = rx.read()
        got += more
    assert got == [b"last words"] and closed
    b.close()


def test_a_worker_answering_into_a_closed_pipe_leaves_quietly():
    """The notebook closed the pipe (the pool stopped or shrank) while the worker
    was busy: its answer cannot go anywhere, and it leaves as it does on the
    pipe's end (exit status 0), not with a BrokenPipeError traceback (status 1)."""
    from mpmagic import payload
    from mpmagic.protocol import Setup, pack
    from mpmagic.worker_setup import _Entry

    backend = mpmagic.start_pool(2, start_method="forkserver", wait=True)
    slot = backend.slots[0]
    busy = payload.dumps_data([_Entry("code", "%%pool setup", "import time\ntime.sleep(0.5)\n")])
    with backend._lock:
        backend.slots.remove(slot)  # the manager forgets it, as _retire does
        slot.send(pack(Setup(10**6, busy)))  # it answers SetupDone in 0.5 s
    time.sleep(0.2)
    slot.close()
    slot.proc.join(10)
    assert slot.proc.exitcode == 0


def test_a_step_sends_small_units_together_and_a_big_one_at_once():
    """Units of one step wait in their worker's queue until the step ends (a
    first send woke a worker that took the CPU before the second unit was
    packed); a big unit goes at once, with what waited before it (packing the
    next big chunk takes longer than a wake-up)."""
    from mpmagic.backends import local

    backend = local.LocalBackend(2)
    ours, theirs = socket.socketpair()
    slot = local._Slot(0, proc=None, conn=multiprocessing.connection.Connection(ours.detach()), started=0.0)
    reader = multiprocessing.connection.Connection(theirs.detach())
    try:
        backend._held = []
        backend._put(slot, b"small")
        assert slot.sender.pending and not reader.poll(0)  # held for the end of the step
        big = b"b" * (local._HOLD_MAX + 1)
        backend._put(slot, big)
        assert not slot.sender.pending
        assert [reader.recv_bytes(), reader.recv_bytes()] == [b"small", big]  # in order
        backend._held = None
        backend._put(slot, b"outside a step")  # sent at once
        assert reader.recv_bytes() == b"outside a step"
    finally:
        slot.close()
        reader.close()
        backend.stop()


def test_small_messages_go_joined_and_a_cut_one_goes_on_where_it_stopped():
    """A small message is queued as one bytes object, its header joined to it (one
    ``send`` per step, no buffer list); ``queue`` says each message's length. A full
    pipe cuts such messages anywhere: what is left goes on, whole and in order,
    between bigger ones sent in parts."""
    ours, theirs = _pair()
    sender = Sender(ours)
    try:
        small = [os.urandom(n) for n in (0, 1, 100, 4096)] * 600  # ~2.5 MB: more than the socket takes
        parts = (b"head", os.urandom(70_000))
        assert [sender.queue(m) for m in small[:4]] == [0, 1, 100, 4096]
        assert sender.queue(parts) == 70_004 and sender.pending
        for m in small[4:]:
            sender.send(m)
        assert sender.pending  # nobody reads yet
        got: list[bytes] = []
        count = len(small) + 1
        reader = threading.Thread(target=lambda: got.extend(theirs.recv_bytes() for _ in range(count)))
        reader.start()
        deadline = time.monotonic() + 30
        while sender.pending and time.monotonic() < deadline:
            sender.flush()
            time.sleep(0.001)
        reader.join(30)
        assert got == [*small[:4], b"".join(parts), *small[4:]]
    finally:
        sender.close()
        ours.close()
        theirs.close()
