"""backends/pipes.py: the manager's sends never block, and arrive whole and in order."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
import time

import mpmagic
from mpmagic.backends.pipes import Sender, frame


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
