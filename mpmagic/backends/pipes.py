"""Sending to a worker's pipe without ever blocking the manager.

The manager thread (``local.py``) is the only code that writes to worker
pipes, and it must never wait on one worker: it also reads every other
worker's results. ``Connection.send_bytes`` blocks once the socket buffer is
full, which happens when a worker is busy and not reading (a big chunk sent
ahead of its next unit, a worker setup, a function payload). Worse, a
worker blocked sending a big result to the manager while the manager is
blocked sending to it would never end.

Round 1 avoided that with a reader thread in each worker that moved every
message into a local queue at once. That thread cost every unit a
thread hand-off in the worker (~40 us of a warm 2-item map's ~300 us,
measured with timestamps in both processes), so the worker's main thread
now reads its pipe itself, and the sending side never blocks instead:
:class:`Sender` frames each message as ``multiprocessing.connection`` does
(a 4-byte big-endian length, or -1 and an 8-byte length past 2 GiB) and
writes with ``MSG_DONTWAIT`` on a duplicate of the pipe's socket; whatever
the socket does not take waits here, in order, and goes out when the
manager's selector says the pipe is writable (``flush``).
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from typing import Any

# Past this, a length needs the long header (as in multiprocessing.connection).
_LONG = 0x7FFFFFFF
# At most this many buffers per sendmsg call (the kernel's IOV_MAX is 1024).
_MAX_BUFFERS = 64


def frame(data: bytes) -> list[memoryview]:
    """``data`` framed for ``Connection.recv_bytes`` on the other end."""
    n = len(data)
    header = struct.pack("!i", n) if n <= _LONG else struct.pack("!iQ", -1, n)
    return [memoryview(header), memoryview(data)] if n else [memoryview(header)]


class Sender:
    """Framed, never-blocking sends to one worker's end of a duplex pipe."""

    def __init__(self, conn: Any) -> None:
        # A duplicate of the pipe's socket: MSG_DONTWAIT makes each send
        # non-blocking without making the pipe non-blocking for the reads
        # that ``Connection.recv_bytes`` does on the same socket.
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        self._pending: deque[memoryview] = deque()

    @property
    def pending(self) -> bool:
        """True while part of a message waits for room in the pipe."""
        return bool(self._pending)

    def send(self, data: bytes) -> bool:
        """Queue ``data`` as one message and send what the pipe takes now.

        True when everything queued went out. Raises ``OSError``
        (``BrokenPipeError``...) when the worker is gone.
        """
        self._pending.extend(frame(data))
        return self.flush()

    def flush(self) -> bool:
        """Send what waits, as far as the pipe takes it now; True when nothing is left."""
        pending = self._pending
        while pending:
            buffers = list(pending) if len(pending) <= _MAX_BUFFERS else [pending[i] for i in range(_MAX_BUFFERS)]
            try:
                sent = self._sock.sendmsg(buffers, [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            while pending and sent >= len(pending[0]):  # (an empty buffer goes too)
                sent -= len(pending.popleft())
            if sent:
                pending[0] = pending[0][sent:]
        return True

    def close(self) -> None:
        """Close the duplicate socket (the pipe itself is closed by its Connection)."""
        self._pending.clear()
        self._sock.close()
