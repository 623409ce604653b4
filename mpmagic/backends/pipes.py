"""Sending to and reading from a worker's pipe without ever blocking the manager.

Only the manager thread (``local.py``), or ``submit`` under the same lock,
writes to worker pipes, and it must never wait on one worker: it also reads
every other worker's results. ``Connection.send_bytes`` blocks once the socket buffer is
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

Reading is the mirror image: :class:`Receiver` takes whatever the pipe holds
with one non-blocking ``recv`` per wake-up and cuts it into messages, where
``Connection.poll`` + ``recv_bytes`` cost four syscalls per message (a poll,
the header, the body, and a poll to find the pipe empty). A message that is
not whole yet stays here until the rest comes: the selector is level
triggered, so it wakes the manager again while bytes wait.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from typing import Any

# Past this, a length needs the long header (as in multiprocessing.connection):
# -1, then the length in 8 bytes; else the length in 4 bytes.
_LONG = 0x7FFFFFFF
_HEAD = struct.Struct("!i")
_LONG_HEAD = struct.Struct("!iQ")
# At most this many buffers per sendmsg call (the kernel's IOV_MAX is 1024).
_MAX_BUFFERS = 64
# A message up to this long is queued as one bytes object, its header joined to
# it (a copy of a few kB at most): a step's one message per worker then goes
# out with one ``send``, the cheapest call, and no buffer list is built.
_JOIN_MAX = 4 << 10


def size(data: bytes | tuple[bytes, ...]) -> int:
    """Length of the message ``data``: bytes, or parts sent as one (``protocol.pack_parts``)."""
    return sum(map(len, data)) if type(data) is tuple else len(data)


def frame(data: bytes | tuple[bytes, ...]) -> list[memoryview]:
    """``data`` framed for ``Connection.recv_bytes`` on the other end: one
    message, also when given in parts (written one after another, uncopied)."""
    n = size(data)
    header = _HEAD.pack(n) if n <= _LONG else _LONG_HEAD.pack(-1, n)
    parts: tuple[bytes, ...] = data if isinstance(data, tuple) else (data,)
    return [memoryview(header), *(memoryview(p) for p in parts if len(p))]


class Sender:
    """Framed, never-blocking sends to one worker's end of a duplex pipe."""

    def __init__(self, conn: Any) -> None:
        # A duplicate of the pipe's socket: MSG_DONTWAIT makes each call
        # non-blocking without making the pipe itself non-blocking (the
        # Connection still closes it). :class:`Receiver` reads through it too.
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        self._pending: deque[memoryview | bytes] = deque()
        # True while part of a message waits for room in the pipe (an attribute, not
        # a property over ``_pending``: the manager reads it for each worker every step).
        self.pending = False

    def send(self, data: bytes | tuple[bytes, ...]) -> bool:
        """Queue ``data`` (see :func:`frame`) as one message and send what the pipe takes now.

        True when everything queued went out. Raises ``OSError``
        (``BrokenPipeError``...) when the worker is gone.
        """
        self.queue(data)
        return self.flush()

    def queue(self, data: bytes | tuple[bytes, ...]) -> int:
        """Queue ``data`` as one message, sent by the next ``send`` or ``flush``; its length."""
        if type(data) is tuple and len(data) == 1:
            data = data[0]
        if type(data) is bytes:
            n = len(data)
            if n <= _JOIN_MAX:  # (the same bytes on the wire as frame's)
                self._pending.append(_HEAD.pack(n) + data)
                self.pending = True
                return n
        else:
            n = size(data)
        self._pending.extend(frame(data))
        self.pending = True
        return n

    def flush(self) -> bool:
        """Send what waits, as far as the pipe takes it now; True when nothing is left."""
        pending = self._pending
        sock = self.sock
        while pending:
            try:
                if len(pending) == 1:  # (the usual: one message, or what is left of one)
                    sent = sock.send(pending[0], socket.MSG_DONTWAIT)
                else:
                    buffers = list(pending) if len(pending) <= _MAX_BUFFERS else [pending[i] for i in range(_MAX_BUFFERS)]
                    sent = sock.sendmsg(buffers, [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            while pending and sent >= len(pending[0]):  # (an empty buffer goes too)
                sent -= len(pending.popleft())
            if sent:
                pending[0] = memoryview(pending[0])[sent:]  # (a joined message is bytes: not copied again)
        self.pending = False
        return True

    def close(self) -> None:
        """Close the duplicate socket (the pipe itself is closed by its Connection)."""
        self._pending.clear()
        self.pending = False
        self.sock.close()


# Bytes asked of the pipe per recv: a reply of a few kB (every small chunk's)
# comes in one call; bigger messages are read straight into their own buffer.
_READ = 1 << 16
# At most this many reads per call of ``read``: a worker that keeps talking
# cannot hold the manager (the selector brings it back while bytes wait).
_MAX_READS = 256


class Receiver:
    """Whole messages from one worker's pipe, read without ever blocking.

    ``read()`` returns the messages that arrived complete, in order, and
    whether the worker's end is closed. It shares :class:`Sender`'s socket
    (``MSG_DONTWAIT`` on each call; the pipe itself stays blocking).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._scratch = memoryview(bytearray(_READ))  # what one recv of small messages lands in
        self._buf = bytearray()  # bytes of the next message(s), header included
        self._body: bytearray | None = None  # a big message being read in place
        self._filled = 0
        self.empty = True  # the last read found the pipe empty (else: call again)

    def read(self) -> tuple[list, bool]:
        """``(messages now complete, closed)``; ``OSError`` on a broken pipe."""
        messages: list = []
        closed = False
        self.empty = False
        for _ in range(_MAX_READS):
            body = self._body  # a big message goes straight into its own buffer, no copies
            view = self._scratch if body is None else memoryview(body)[self._filled :]
            try:
                n = self._sock.recv_into(view, len(view), socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.empty = True
                break
            except InterruptedError:
                continue
            if not n:
                closed = True
                break
            if body is not None:
                self._filled += n
                if self._filled == len(body):
                    messages.append(body)
                    self._body = None
                continue
            if not self._buf and n >= _HEAD.size and _HEAD.unpack_from(view)[0] == n - _HEAD.size:
                messages.append(bytearray(view[_HEAD.size : n]))  # (one whole message, as a reply is as a rule)
            else:
                self._buf += view[:n]
                self._cut(messages)
            if n < _READ and self._body is None:
                self.empty = True  # (bytes that came since wake the selector again)
                break
        return messages, closed

    def _cut(self, messages: list) -> None:
        """Move every whole message out of the buffer; start reading a big one in place."""
        buf = self._buf
        pos = 0
        while len(buf) - pos >= _HEAD.size:
            (n,) = _HEAD.unpack_from(buf, pos)
            head = _HEAD.size
            if n == -1:
                if len(buf) - pos < _LONG_HEAD.size:
                    break
                n = _LONG_HEAD.unpack_from(buf, pos)[1]
                head = _LONG_HEAD.size
            start = pos + head
            if len(buf) - start >= n:
                messages.append(buf[start : start + n])  # (a bytearray: pickle reads it as is)
                pos = start + n
                continue
            if n > _READ:  # a big body: its own buffer, filled by recv_into
                body = bytearray(n)
                have = len(buf) - start
                body[:have] = buf[start:]
                self._body, self._filled = body, have
                pos = len(buf)
            break
        del buf[:pos]
