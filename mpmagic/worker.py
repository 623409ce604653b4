"""The loop that runs in a worker process. It imports no IPython.

A worker talks to the notebook over one duplex pipe (a socketpair made by
``multiprocessing``; nothing listens on a network port). The main thread reads
it and handles the messages one after another (the notebook's sends never
block on a busy worker: ``backends/pipes.py``); the pipe's end, or a watchdog
thread seeing the notebook process gone, ends the worker. Every message kind
and its fields are in ``mpmagic/protocol.py``:

* ``Func``: cache a cloudpickled function under its content key (see
  :class:`Loaded`: a function a task can change is loaded again for each call).
* ``Map``: run the function over a chunk of items; reply ``Done`` (results,
  seconds, meta: which worker ran it, when, its CPU seconds and with
  ``timing`` its slowest items), ``Error``, ``Unpicklable`` or ``Missing``;
  or ``NoFiles`` when the worker had no file descriptor left to load the
  function or the items (its shared memory: tasks that left files open
  used them up). That is no item's error: the notebook replaces the worker
  and sends the unit again; the worker runs nothing more (:meth:`_Worker._unfit`).
* ``Cell``: run a ``%%parallel`` cell body as one rank.
  While a chunk's items or a rank's cell run, the task's ``logging`` records
  (at the notebook's levels) and warnings go home with its printed output,
  labelled by item (``mpmagic/worker_logging.py``, from the message's
  ``log_context``).
* ``Context``: the notebook's current directory, environment, ``sys.path``,
  recursion limit, int digits limit and warnings filters (``mpmagic/context.py``), sent only
  when they changed.
* ``Unmap``: forget shared-memory segments the notebook destroyed.
* ``Import``: import modules the notebook imported, between tasks (warm
  workers, see ``warmup.py``); imports done while a unit ran, and the time
  spent loading functions, go home in the next ``Done``'s ``meta["once"]``.
* ``Reload``: reload the user's modules the notebook reloaded since this
  worker imported them, and forget the cached functions (``warmup.py``).
* ``Setup``: run the worker setup (``mpmagic/worker_setup.py``); reply
  ``SetupDone`` (the error line or None, the names it defined, what it printed,
  the random generators it changed).
* ``Stop``: exit.

How a unit runs (:func:`execute_map`, :func:`execute_cell`) is shared with
the Dask task (``backends/dask_tasks.py``); only the channel differs. What a
task prints is captured and sent home as ``Out`` messages in whole lines, so
it shows in the cell that ran it. Workers ignore SIGINT: the notebook decides
what an interrupt cancels.
"""

from __future__ import annotations

import functools
import io
import os
import signal
import struct
import sys
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable
from heapq import nlargest
from itertools import starmap
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NoReturn

from . import (
    callsite,
    compat,
    context,
    debugging,
    exiting,
    loadstamps,
    payload,
    payload_cache,
    posixshm,
    seeding,
    shm,
    task_builtins,
    waits,
    worker_logging,
    worker_setup,
)
from .callsite import Site, at_site
from .cpus import run_queue_seconds
from .errors import SerializationError, out_of_files
from .exc_record import capture
from .proclimits import rlimit
from .protocol import (
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
    Stop,
    Unmap,
    Unpicklable,
    pack,
    unpack,
)
from .rss import private_bytes
from .warmup import ImportLog

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

_TOP_ITEMS = 5  # --insights: per chunk, the slowest items whose times are sent home
_FLUSH_INTERVAL = 0.05  # seconds between streamed output messages
#: A batch of output (at most _FLUSH_INTERVAL of a unit's text) that switches between
#: stdout and stderr more often goes home as one text per stream: a notebook shows no
#: finer order (ipykernel sends each stream's text every 0.2 s, serial prints too),
#: and a task printing to both in turn made the notebook handle one piece per line.
_MAX_SWITCHES = 32


class ErrorInfo:
    """A task's exception in a form that always survives the trip home.

    ``record`` holds its parts (type, args, attributes, notes, chain, frames:
    see :func:`mpmagic.exc_record.capture`), from which the notebook rebuilds the
    same exception; ``type_name``, ``message`` and ``exc_text`` say it in
    words when even that is not possible. ``context`` is what the worker saw
    at the raising line (its locals as bounded reprs, worker id, pid: see
    :func:`mpmagic.debugging.failure_context`), for ``%pdebug`` and ``Failed``;
    the frames also carry their arguments' reprs, for ``%xmode Verbose``
    (``errors.FrameValues``, within the same budget: ``debugging.FailureReprs``).
    """

    __slots__ = ("record", "type_name", "message", "exc_text", "frames", "context")

    def __init__(self, exc: BaseException) -> None:
        with debugging.FailureReprs() as reprs:  # (the locals' reprs, then the frames' arguments: one budget)
            self.context = reprs.context(exc)
            self.record = capture(exc, arguments=reprs.arguments)
        self.type_name = self.record.type_name
        self.message = self.record.message
        self.exc_text = self.record.text
        self.frames = self.record.frames

    def __getstate__(self):
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state):
        for s, v in zip(self.__slots__, state, strict=True):
            setattr(self, s, v)


class Loaded:
    """A function a worker keeps by its content key, and what it needs to reuse it.

    Within one call, a task's changes to the function's state (a global it
    assigns, a mutable default, the object of a bound method) stay in this
    worker's copy, as documented. A later call must start from the notebook's
    state, which the same bytes describe: :meth:`for_call` loads the function
    again from ``data`` at the first unit of a new call, unless it provably
    holds no state a task can change (:func:`mpmagic.payload_cache.stateless`,
    decided once at load; then ``data`` is not kept).

    A name the worker setup's functions assigned with ``global`` (the
    ``Pool(initializer=)`` idiom) has the setup's value in the function's
    globals, over the notebook's value sent with it
    (:func:`mpmagic.worker_setup.use_set_globals`): applied again after each
    load and whenever the setup changed since.

    ``no_files``: the last load failed for want of a file descriptor (its errno,
    ``EMFILE`` or ``ENFILE``; else 0; mapping
    a captured array's shared memory needs one for a moment): the worker's
    state, not the function's, so the local worker asks to be replaced
    (:meth:`_Worker._unfit`) rather than report it as the call's error.

    ``size``: its payload's length, what the worker's cache counts against its
    byte budget (``payload_cache.excess``).
    """

    __slots__ = ("func", "data", "call", "setup", "displaced", "no_files", "size")

    def __init__(self, func: Any, data: bytes | None, size: int = 0) -> None:
        self.func = func  # the loaded function, or the ErrorInfo of its failed load
        self.data = data  # the payload, kept only to load a stateful function again
        self.size = size  # bytes of payload it came from (see the class's docstring)
        self.call: Any = None  # the call that used ``func`` last (None: not used yet)
        self.setup = -1  # the worker_setup.set_globals_version() its globals have (-1: none applied yet)
        self.displaced: dict[str, Any] | None = None  # the sent values the setup's globals replaced
        self.no_files = 0  # see the class's docstring

    @classmethod
    def load(cls, data: bytes) -> Loaded:
        """Load ``data``; keep the bytes if a task could change the function's state."""
        try:
            func = payload.loads(data)
        except BaseException as exc:  # reported when the function is used
            failed = cls(ErrorInfo(exc), None, len(data))
            failed.no_files = _no_files_errno(exc)
            return failed
        return cls(func, None if payload_cache.stateless(func) else data, len(data))

    def nbytes(self) -> int:
        """:attr:`size` (the cache's measure of this entry: ``payload_cache.excess``)."""
        return self.size

    def stale(self, call: Any) -> bool:
        """Would a unit of ``call`` need the function loaded again (a stateful
        one that an earlier call ran)?"""
        return self.data is not None and self.call is not None and self.call != call

    def for_call(self, call: Any, imports: ImportLog) -> Any:
        """The function for a unit of ``call``: loaded again from its bytes if
        :meth:`stale` (the time it takes noted in ``imports``, as the first load's)."""
        if self.stale(call):
            assert self.data is not None
            with imports.watching("function"):
                self.no_files = 0
                try:
                    self.func = payload.loads(self.data)
                except BaseException as exc:  # (it loaded before: a changed world, reported as then)
                    self.func = ErrorInfo(exc)
                    self.no_files = _no_files_errno(exc)
            self.setup, self.displaced = -1, None
        self.call = call
        return self.ready()

    def ready(self) -> Any:
        """``func``, with the worker setup's ``global`` values applied if the setup changed since."""
        version = worker_setup.set_globals_version()
        if self.setup != version and not isinstance(self.func, ErrorInfo):
            self.displaced = worker_setup.use_set_globals(self.func, self.displaced)
            self.setup = version
        return self.func


_HEAD = struct.Struct("!i")  # a message's length (multiprocessing.connection's framing)
_LONG = struct.Struct("!Q")  # after a head of -1: the length past 2 GiB
# A message body at least this big is read straight into a buffer of its size.
_READ_INTO = 1 << 20


# A read of the pipe takes what has arrived, up to this much: a message's head and
# body (and the messages after it) in one system call.
_READ_AHEAD = 1 << 16


class MessageReader:
    """Reads the messages on the pipe ``fd`` one by one, as ``Connection.recv_bytes``
    reads them (framed by ``backends/pipes.frame``); ``EOFError`` at its end.

    A read takes whatever has arrived, up to ``_READ_AHEAD``, and keeps what
    follows the message for the next: a small message is one system call, not
    one for its head and another for its body (~0.7 us of a unit's ~40), and
    messages sent together (a context, a function, a chunk) are one read.
    A big one is read into one buffer of its size: ``recv_bytes`` allocated a
    new bytes object per read of the socket, copied each into a BytesIO and
    then copied that out, so receiving a 10 MB chunk of 100 kB ``bytes`` items
    cost the worker more than running its items (userperf13, F1). Only one
    thread may read through a reader.
    """

    __slots__ = ("fd", "held", "at")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.held = b""  # what was read past the last message taken
        self.at = 0  # where in ``held`` the next one starts

    def _take(self, n: int) -> bytes:
        """The next ``n`` bytes: what is held, then what the pipe has (the rest kept)."""
        held, at = self.held, self.at
        if len(held) - at >= n:
            self.at = at + n
            return held[at : at + n]
        data = held[at:]
        self.held, self.at = b"", 0
        while len(data) < n:
            more = os.read(self.fd, max(n - len(data), _READ_AHEAD))
            if not more:
                raise EOFError
            data += more
        if len(data) > n:
            self.held, self.at = data, n
            return data[:n]
        return data

    def read(self) -> bytes | bytearray:
        """The next message. A small one wholly read already (a unit's, as a rule)
        is cut from what is held here, without the two :meth:`_take` calls."""
        held, at = self.held, self.at
        if len(held) == at:  # (nothing held: read what has arrived)
            held, at = os.read(self.fd, _READ_AHEAD), 0
            if not held:
                raise EOFError
            self.held, self.at = held, 0
        if len(held) - at >= _HEAD.size:
            (n,) = _HEAD.unpack_from(held, at)
            start = at + _HEAD.size
            if 0 <= n < _READ_INTO and start + n <= len(held):
                self.at = start + n
                return held[start : start + n]
        (n,) = _HEAD.unpack(self._take(_HEAD.size))
        if n == -1:
            (n,) = _LONG.unpack(self._take(_LONG.size))
        if n < _READ_INTO:
            return self._take(n) if n else b""
        buf = bytearray(n)
        view = memoryview(buf)
        held, at = self.held, self.at
        got = len(held) - at  # (less than _READ_AHEAD: under n)
        view[:got] = held[at:]
        self.held, self.at = b"", 0
        while got < n:
            k = os.readv(self.fd, [view[got:]])
            if not k:
                raise EOFError
            got += k
        return buf


# A reply up to this size goes behind its head in one write; a bigger one is
# written after it, uncopied (multiprocessing.connection's own cut).
_SMALL_REPLY = 16384


def _write_all(fd: int, data: bytes) -> None:
    n = os.write(fd, data)
    if n < len(data):  # (a full pipe: the rest from a view, uncopied)
        view = memoryview(data)
        while n < len(view):
            n += os.write(fd, view[n:])


class _Channel:
    """The worker's end of the pipe: thread-safe sends of pickled tuples.

    A message goes framed as ``Connection.send_bytes`` frames it (the
    notebook reads it with ``recv_bytes`` or ``backends/pipes``), written
    here: ``send_bytes``' checks and copies in Python were ~1 us of each reply.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.lock = threading.Lock()
        self.sending = False  # a send is under way (see _StreamToParent.write)

    def send(self, msg: tuple) -> None:
        data = pack(msg)
        n = len(data)
        head = _HEAD.pack(n) if n <= 0x7FFFFFFF else _HEAD.pack(-1) + _LONG.pack(n)
        with self.lock:
            self.sending = True
            try:
                if n <= _SMALL_REPLY:
                    _write_all(self.fd, head + data)
                else:
                    _write_all(self.fd, head)
                    _write_all(self.fd, data)
            finally:
                self.sending = False


#: Bytes of the shared memory in which a local worker keeps a copy of the output it
#: holds (:class:`_Tail`): far more than the ~50 ms of a task's text it holds at most
#: (a flood beyond it is sent at once, with its next write).
TAIL_BYTES = 1 << 16
_TAIL_HEAD = 8  # the used length, written after the text it covers
# Where the text switches streams: 0xFF, a byte UTF-8 never has, then the stream's.
_TO_STREAM = {"stdout": b"\xffo", "stderr": b"\xffe"}
_FROM_STREAM = {ord("o"): "stdout", ord("e"): "stderr"}


class _Tail:
    """A copy of the text a worker's streams hold and have not sent, in memory shared
    with the notebook (``backends.local``'s ``_Slot.tail``, made by ``tail_memory``).

    A worker that dies (a segfault, SIGKILL, ``os._exit``) sends nothing more: what its
    task printed in its last ~50 ms, held for the next batch (:class:`_StreamToParent`),
    was lost, though these are the lines that say where it was, and a terminal shows
    them serially. The notebook reads them here (:func:`read_tail`) and shows them before
    the death's line. The text is UTF-8, a stream's switch marked by ``_TO_STREAM``; the
    used length, in the first 8 bytes, is written after the text, so a reader never sees
    a write half copied. One slice store a write (~0.4 us; a print makes two writes or more).
    """

    __slots__ = ("text", "used_at", "used", "stream")

    def __init__(self, shared: Any) -> None:
        view = memoryview(shared).cast("B")
        self.used_at = view[:_TAIL_HEAD].cast("q")
        self.text = view[_TAIL_HEAD:]
        self.used = 0
        self.stream = ""

    def add(self, stream: str, s: str) -> bool:
        """Copy one write; False when there is no room (the caller sends what it holds)."""
        data = s.encode("utf-8", "surrogatepass")
        if stream != self.stream:
            data = _TO_STREAM[stream] + data
        at = self.used
        end = at + len(data)
        if end > len(self.text):
            return False
        self.text[at:end] = data
        self.used = self.used_at[0] = end
        self.stream = stream
        return True

    def reset(self, pieces: list[list]) -> None:
        """What is still held after a batch went home (a partial line kept back, or nothing)."""
        self.used = self.used_at[0] = 0
        self.stream = ""
        for stream, texts in pieces:
            self.add(stream, "".join(texts))


def tail_memory(ctx: Any) -> Any:
    """The shared memory of a local worker's :class:`_Tail` (the notebook makes it)."""
    return ctx.RawArray("B", TAIL_BYTES)


def clear_tail(shared: Any) -> None:
    """Empty a stopped worker's tail for a new worker (``LocalBackend`` reuses them)."""
    memoryview(shared).cast("B")[:_TAIL_HEAD].cast("q")[0] = 0


def read_tail(shared: Any) -> list[tuple[str, str]]:
    """What a dead worker's streams held and never sent, as ``(stream, text)`` in the order written."""
    view = memoryview(shared).cast("B")
    used = view[:_TAIL_HEAD].cast("q")[0]
    data = bytes(view[_TAIL_HEAD : _TAIL_HEAD + max(0, min(used, len(view) - _TAIL_HEAD))])
    out: list[tuple[str, str]] = []
    for part in data.split(b"\xff")[1:]:  # (every copy starts with its stream's marker)
        stream = _FROM_STREAM.get(part[0]) if part else None
        text = part[1:].decode("utf-8", "replace")
        if stream is not None and text:
            out.append((stream, text))
    return out


class _Held:
    """What a worker's two streams hold, in the order written: ``pieces`` is a list
    of ``[stream, [texts]]`` (consecutive writes to one stream share a piece), and
    a copy the notebook reads if the worker dies (``tail``: a local worker's)."""

    __slots__ = ("pieces", "last", "flush_due", "tail")

    def __init__(self, tail: _Tail | None = None) -> None:
        self.pieces: list[list] = []
        self.last = 0.0  # when the last batch went home
        self.flush_due = False  # a flush() asked for partial lines too (sent by the next batch)
        self.tail = tail
        if tail is not None:  # a process a task forks writes its own text: never into this worker's copy
            os.register_at_fork(after_in_child=self._drop_tail)

    def _drop_tail(self) -> None:
        self.tail = None

    def add(self, stream: str, s: str) -> bool:
        """Hold ``s``; False when its copy found no room in ``tail`` (send what is held)."""
        pieces = self.pieces
        if pieces and pieces[-1][0] == stream:
            pieces[-1][1].append(s)
        else:
            pieces.append([stream, [s]])
        return self.tail is None or self.tail.add(stream, s)

    def take(self, whole: bool) -> list[tuple[str, str]]:
        """The held text as ``(stream, text)`` pieces in the order written, each
        stream's run of writes in one piece; without ``whole`` a stream's last
        partial line stays held (and moves after what the other stream wrote
        meanwhile: its line is not over)."""
        out: list[tuple[str, str]] = []
        carry: dict[str, str] = {}
        for stream, parts in self.pieces:
            text = carry.pop(stream, "") + "".join(parts)
            if not whole:
                cut = text.rfind("\n") + 1
                if cut < len(text):
                    carry[stream], text = text[cut:], text[:cut]
            if not text:
                continue
            if out and out[-1][0] == stream:
                out[-1] = (stream, out[-1][1] + text)
            else:
                out.append((stream, text))
        self.pieces = [[stream, [text]] for stream, text in carry.items()]
        if self.tail is not None:
            self.tail.reset(self.pieces)
        if whole:
            self.flush_due = False
        if len(out) > _MAX_SWITCHES:  # one text per stream, in the order they began (see _MAX_SWITCHES)
            merged: dict[str, list[str]] = {}
            for stream, text in out:
                merged.setdefault(stream, []).append(text)
            out = [(stream, "".join(texts)) for stream, texts in merged.items()]
        return out


class _StreamToParent(io.TextIOBase):
    """A ``sys.stdout``/``sys.stderr`` stand-in that sends the task's text home.

    Both streams of a worker (``sibling``: stderr's is stdout) share one buffer
    (:class:`_Held`) and one lock: what they are written is kept in the order
    written and goes home in batches, at most every ``_FLUSH_INTERVAL`` (the
    first line of a unit at once), as one message whatever the streams: a task
    alternating ``print`` and ``sys.stderr.write`` made one message per line,
    and its interrupt waited for them all. Whole lines go; a partial line waits
    for its end, for the unit's end, or for an explicit ``flush()`` (a tqdm bar,
    ``print(..., end="", flush=True)``), which sends it too, within the flush
    interval, so it is seen while the task runs and kept if it is interrupted.

    A write made while this thread is already in one, or in a send (a signal
    handler that prints, run between two bytecodes of ours), only joins the
    buffer: sending from there would wait on a lock its own thread holds, or
    put a message in the middle of another on the pipe. The lock is
    re-entrant for that reason.
    """

    def __init__(self, channel: _Channel, stream: str, sibling: _StreamToParent | None = None,
                 tail: _Tail | None = None) -> None:
        self.channel = channel
        self.stream = stream
        self.call: Any = None
        self.tag: Any = None
        self.sibling = sibling
        self._closed = False  # a task's sys.stdout.close() (see close)
        # Between units: the worker's stream then (its _AfterUnits), which takes what is
        # written here (see write); None while a unit runs.
        self.after: Any = None
        self.held: _Held = _Held(tail) if sibling is None else sibling.held
        self.lock: threading.RLock = threading.RLock() if sibling is None else sibling.lock
        self._in_write: list[int] = [0] if sibling is None else sibling._in_write  # (shared: one per worker)
        if sibling is not None:
            sibling.sibling = self

    # What code that works serially in the notebook reads (ipykernel's stream
    # says UTF-8 and has a fileno; click, rich, tqdm read .encoding, faulthandler
    # and subprocess(stdout=sys.stdout) use fileno()).
    @property
    def encoding(self) -> str:  # type: ignore[override]
        """``utf-8``: what is written travels home as ``str``, any character."""
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "strict"

    @property
    def name(self) -> str:
        """``<stdout>`` / ``<stderr>``, as ``sys.__stdout__``'s."""
        return f"<{self.stream}>"

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        """The worker's own fd 1 (stdout) or 2 (stderr), for code that writes
        bytes there itself (``faulthandler``, a subprocess given ``sys.stdout``).

        Those bytes bypass this stream: they get no ``[rank N]`` label and are not
        ordered with printed lines. The worker inherited the notebook process's
        fds, so they go where the kernel's own fd 1/2 go: in Jupyter, ipykernel
        captures them and shows them in the cell running when they arrive (and on
        the kernel's terminal); in a terminal IPython, the terminal.
        """
        return 1 if self.stream == "stdout" else 2

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """``sys.stdout.close()`` in a task: what was written goes home, and
        later writes (and flushes) in the same unit raise ``ValueError: I/O
        operation on closed file.``, as serially (the item that printed after
        closing returned its value). The next unit has an open stream again:
        the worker's stream is not one task's to end."""
        if not self._closed:
            self.finish()
            self._closed = True

    def write(self, s: str) -> int:
        if self._closed:
            raise ValueError("I/O operation on closed file.")
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        after = self.after
        if after is not None:
            # The unit ended: this stream was kept (``out = sys.stdout`` in a thread the
            # task started) and is written after. Sent home, it went with the unit's
            # call, which takes no output any more: dropped without a word. It goes
            # where ``print`` goes between units, labelled as a rank's (_AfterUnits).
            return after.write(s)
        with self.lock:
            held = self.held
            copied = held.add(self.stream, s)
            if self._in_write[0] or self.channel.sending:  # re-entered (see the class): keep it for later
                return len(s)
            if not copied or "\n" in s and time.monotonic() - held.last > _FLUSH_INTERVAL:
                self._in_write[0] += 1
                try:
                    self._send(held.flush_due or not copied)  # (no room for its copy: all of it goes)
                finally:
                    self._in_write[0] -= 1
        return len(s)

    def _send(self, whole: bool) -> None:
        """Send what is held (``whole``: partial lines too) as one message."""
        held = self.held
        pieces = held.take(whole)
        if pieces:  # (a partial line kept back is no batch: a flush() right after still goes at once)
            held.last = time.monotonic()
        if len(pieces) == 1:
            self.channel.send(Out(self.call, self.tag, *pieces[0]))
        elif pieces:
            self.channel.send(Outs(self.call, self.tag, tuple(pieces)))

    def flush(self) -> None:
        """Send what is held, partial lines too: at once, or, within the flush
        interval of the last batch, with the next one (a loop that flushes
        after every line still sends a message per interval, not per line)."""
        if self._closed:
            raise ValueError("I/O operation on closed file.")
        after = self.after
        if after is not None:  # (between units: see write)
            after.flush()
            return
        with self.lock:
            if self._in_write[0] or self.channel.sending:  # (re-entered: see the class)
                self.held.flush_due = True
                return
            if time.monotonic() - self.held.last > _FLUSH_INTERVAL:
                self._send(True)
            else:
                self.held.flush_due = True

    def flush_stale(self) -> None:
        """Send what waited longer than the flush interval: complete lines, and
        partial ones a ``flush()`` asked for.

        Without this, a line printed just before a long computation would
        stay here until the task ends (or be lost if it is interrupted).
        """
        with self.lock:
            held = self.held
            if held.pieces and time.monotonic() - held.last > _FLUSH_INTERVAL and not self._in_write[0]:
                self._send(held.flush_due)

    def finish(self) -> None:
        """Send everything, a final partial line included."""
        with self.lock:
            if self.held.pieces:
                self._send(True)


def _as_item_error(exc: BaseException) -> BaseException:
    """What a task's exception becomes as the error of its item.

    Control flow that would otherwise escape the unit or the worker is made an
    ordinary error of that item (the rest of the unit is unaffected):

    * ``StopIteration`` would end ``map()`` early (serial Python returns a
      shorter list there, silently): as PEP 479 does for generators, it becomes
      a ``RuntimeError`` naming it, with the original as its cause.
    * ``KeyboardInterrupt`` raised by the task's own code (workers ignore
      SIGINT, so it cannot be the user's Ctrl-C): a ``RuntimeError`` naming it,
      since in the notebook a ``KeyboardInterrupt`` means "the run was interrupted".
    * ``SystemExit`` (``sys.exit()``, argparse's exit) comes back as itself,
      as serial Python raises it, instead of ending the worker.
    """
    if isinstance(exc, StopIteration):
        new: BaseException = RuntimeError(
            "the task raised StopIteration"
            + (f" ({exc})" if str(exc) else "")
            + ": it would end a serial map() early; mpmagic makes it this item's error, as PEP 479 does in generators"
        )
    elif isinstance(exc, KeyboardInterrupt):
        new = RuntimeError(
            "the task raised KeyboardInterrupt"
            + (f" ({exc})" if str(exc) else "")
            + " in its own code (not an interrupt of the notebook)"
        )
    else:
        return exc
    new.__cause__ = exc
    return new.with_traceback(exc.__traceback__)


_FAST_PATH_STOP = (
    "the task raised StopIteration: it would end a serial map() early; mpmagic makes it this "
    "item's error, as PEP 479 does in generators (the fast path for tiny items keeps no "
    "traceback for it: call the function on this item in the notebook to see where)"
)


def run_items(
    func: Callable[..., Any], items: list, star: bool, collect: bool, position: Any = None, block: int = 1,
    noted: Callable[[int, ErrorInfo], None] | None = None, started: Callable[[int], None] | None = None,
    site: Site | None = None,
) -> tuple[list, float, tuple[int, ErrorInfo] | None]:
    """Run ``func`` over a chunk of items.

    Returns ``(results, seconds, error)``: ``error`` is ``(index, ErrorInfo)``
    for the first failing item (its results so far are kept), or None.
    ``seconds`` is the items' time without our capture of their failures (an
    ErrorInfo: the traceback and its frames' locals, ~0.2 ms each, ~1 ms for a
    deep stack), which a serial loop does not pay: the report's estimate of serial
    time is the sum of these (2000 items, half failing: "serial ~189 ms (estimated)",
    a 1.4x speedup claimed for a run a hundred times slower than serial's 1.1 ms). With
    ``collect`` a failing item's place holds its ErrorInfo and the chunk goes on.
    Any exception of an item is its error, ``SystemExit`` and ``KeyboardInterrupt``
    included (see :func:`_as_item_error`).
    ``position`` (shared memory the notebook reads if this process dies) is
    set to the index of the running item, so a crash blames that item; with
    ``block`` > 1 (the notebook asks for it when items take under a few
    microseconds) it is set once per ``block`` items, to the first of them,
    and the notebook re-runs that block one item at a time to find the culprit.
    ``noted(index, info)``, with ``collect``, hears of each failing item at once
    (only failures pay for it): the notebook keeps that error if this process dies
    later in the chunk, before the chunk's results went home.
    ``started(index)``, given only for a chunk run under a ``--timeout``
    (``Map.item_clock``), is called as each item starts, before its position is
    set: the notebook then times each item, not the chunk (a local worker's
    :func:`item_clock`; a Dask task's tells it with an event). Runs without
    a timeout never call it, so they pay nothing for it.
    ``site`` (``Map.site``): where the map was called from, and its callers; the
    calls are made from a frame that looks like that line's, called from frames
    that look like its callers' (:func:`mpmagic.callsite.at_site`), so a warning
    charged to the function's caller (or further up) names it, as serially.
    """
    results: list = []
    n = len(items)
    mapper = starmap if star else map
    # The index of the running item, written straight into the shared word
    # (a memoryview store costs less than the ctypes attribute).
    if position is None:
        pos = None
    elif position is _position_view[0]:
        pos = _position_view[1]
    else:
        pos = _view_of(position)
    calls = at_site(_call_items, site)
    captures = 0.0  # (seconds spent capturing failures: not the task's time, see below)
    t0 = time.perf_counter()
    while len(results) < n:
        # When a call raises, the results so far are kept, so the failing item is
        # the number of results. A StopIteration raised by a call is the one
        # exception extend does not pass on: map() just ends, so a short result
        # means the next item raised it (see _call_items).
        try:
            calls(func, items, results, mapper, star, pos, block, started)
            if len(results) == n:
                break
            exc: BaseException = RuntimeError(_FAST_PATH_STOP)
        except BaseException as raised:
            exc = _as_item_error(raised)
        i = len(results)
        t1 = time.perf_counter()
        worker_setup.note_notebook_value(exc, func)
        info = ErrorInfo(exc)
        if not collect:
            return results, t1 - t0 - captures, (i, info)
        results.append(info)
        if noted is not None:
            noted(i, info)
        captures += time.perf_counter() - t1
    return results, time.perf_counter() - t0 - captures, None


def _call_items(
    func: Callable[..., Any], items: list, results: list, mapper: Any, star: bool, pos: Any, block: int,
    started: Callable[[int], None] | None,
) -> None:
    """Call ``func`` on ``items`` from the first one ``results`` lacks, appending each
    result, until one raises or a StopIteration ends a ``map`` early (for
    :func:`run_items`, whose loop around this handles both).

    This frame calls the task's function: a unit runs a copy of it made for the
    map's call site (:func:`mpmagic.callsite.at_site`), which reads no globals but
    builtins. Its source has no line at the left margin (see ``callsite._source``).
    """
    __mpmagic_call_site__ = True  # noqa: F841 (callsite.MARK: left out of a task's traceback)
    extend, append = results.extend, results.append
    n = len(items)
    start = len(results)
    # The calls run in C (list.extend over map), not in a bytecode loop:
    # that loop and its per-item store were most of the cost of tiny items.
    # Checking the length after extend costs nothing per item; wrapping each
    # call (a generator expression, which turns a StopIteration into
    # RuntimeError) cost ~6 ns per item.
    if pos is None:
        extend(mapper(func, items[start:] if start else items))
    elif started is not None:  # (a --timeout: block is 1, see jobs.MapJob._block)
        for i in range(start, n):
            started(i)
            pos[0] = i
            if star:  # (as below: starmap's own message for an item it cannot unpack)
                extend(mapper(func, items[i : i + 1]))
                if len(results) <= i:
                    return
            else:
                append(func(items[i]))
    elif block > 1:
        for s in range(start, n, block):
            pos[0] = s
            extend(mapper(func, items[s : s + block]))
            if len(results) < s + block and len(results) < n:
                return  # a StopIteration ended this block early
    elif star:
        # starmap, one item at a time: an item it cannot unpack fails with
        # starmap's own message, as serially ("'int' object is not iterable").
        for i in range(start, n):
            pos[0] = i
            extend(mapper(func, items[i : i + 1]))
            if len(results) <= i:
                return  # a StopIteration raised by the call ended it
    else:
        for i in range(start, n):
            pos[0] = i
            append(func(items[i]))


# A worker's position word and its view as one int64 (run_items): made once, not per
# unit (the ctypes buffer export and two casts were ~1 us of a unit's ~40).
_position_view: tuple[Any, Any] = (None, None)


def _view_of(position: Any) -> memoryview:
    global _position_view
    view = memoryview(position).cast("B").cast("q")
    _position_view = (position, view)
    return view


def item_clock(stamp: Any) -> Callable[[int], None]:
    """A local worker's ``started`` for :func:`run_items`: it writes the moment
    each item starts (``time.monotonic``, CLOCK_MONOTONIC: the same clock in
    every process of the machine) into ``stamp``, a float the notebook shares
    with this worker. When a chunk's --timeout deadline passes, the notebook
    reads it with the position: a later item of the chunk than the first gets
    its own timeout from its start (backends/local.py ``_check_deadlines``).
    Written before the position, so a stamp read after a position is that
    item's or a later one's, never an earlier item's."""
    view = memoryview(stamp).cast("B").cast("d")
    now = time.monotonic

    def started(index: int) -> None:
        view[0] = now()

    return started


#: Collected failures of one chunk told to the notebook at once (``Collected``):
#: a chunk where every item fails sends one message per failure up to this many.
NOTED_PER_UNIT = 50

#: The position a worker shares while it runs no map unit (before its first,
#: and from the end of each): a death then blames no item.
POSITION_IDLE = -2


def run_items_timed(
    func: Callable[..., Any], items: list, star: bool, collect: bool, position: Any = None,
    noted: Callable[[int, ErrorInfo], None] | None = None, started: Callable[[int], None] | None = None,
    site: Site | None = None,
) -> tuple[list, float, tuple[int, ErrorInfo] | None, list[float]]:
    """:func:`run_items` that also returns each item's seconds (for ``--insights``).

    A separate function so that the ordinary path pays nothing for it.
    """
    results: list = []
    times: list[float] = []
    error: list[tuple[int, ErrorInfo]] = []
    captures = [0.0]  # (seconds spent capturing failures: not the items' time, as in run_items)
    clock = time.perf_counter

    def failed(i: int, exc: BaseException) -> bool:
        """Item ``i`` raised ``exc``: is the chunk over?"""
        t1 = clock()
        exc = _as_item_error(exc)
        worker_setup.note_notebook_value(exc, func)
        info = ErrorInfo(exc)
        if not collect:
            error.append((i, info))
        else:
            results.append(info)
            if noted is not None:
                noted(i, info)
        captures[0] += clock() - t1
        return not collect

    t0 = clock()
    at_site(_call_items_timed, site)(func, items, results, times, star, starmap, clock, position, started, failed)
    return results, clock() - t0 - captures[0], error[0] if error else None, times


def _call_items_timed(
    func: Callable[..., Any], items: list, results: list, times: list, star: bool, starmap: Any,
    clock: Callable[[], float], position: Any, started: Callable[[int], None] | None,
    failed: Callable[[int, BaseException], bool],
) -> None:
    """:func:`run_items_timed`'s calls, as :func:`_call_items` is :func:`run_items`'."""
    __mpmagic_call_site__ = True  # noqa: F841 (callsite.MARK: left out of a task's traceback)
    for i, item in enumerate(items):
        if started is not None:
            started(i)
        if position is not None:
            position.value = i
        t = clock()
        try:
            # (starmap's call, not func(*item): an item it cannot unpack fails with
            # serial starmap's "'int' object is not iterable", not "func() argument
            # after * must be an iterable")
            results.append(next(starmap(func, (item,))) if star else func(item))
        except BaseException as exc:
            times.append(clock() - t)
            if failed(i, exc):
                return
            continue
        times.append(clock() - t)


# worker_logging labels a record with its item by finding these loops on the stack.
worker_logging.ITEM_LOOPS.update((run_items.__code__, run_items_timed.__code__))


# --------------------------------------------------------------------------
# One way to run a unit: the local worker and the Dask task both call these.
# They take the request message and return the reply message; only where the
# message comes from, where output goes and how results are packed differ.


def execute_map(
    msg: Map,
    func: Any,
    where: Any,
    cpu: Callable[[], float],
    dumps_results: Callable[[list], bytes] = payload.dumps_data,
    position: Any = None,
    imports: ImportLog | None = None,
    noted: Callable[[int, ErrorInfo], None] | None = None,
    started: Callable[[int], None] | None = None,
    unfit_without_files: bool = False,
) -> Done | Error | Unpicklable | NoFiles:
    """Run a map chunk: load its items, run them, pack the results.

    ``func`` is the loaded function (or the ErrorInfo of its failed load);
    ``where`` names the worker in the reply's meta; ``cpu()`` returns the CPU
    seconds the chunk used; ``dumps_results`` packs the results (the local
    worker puts big arrays in shared memory); ``position``: see :func:`run_items`;
    ``imports``: the process's import log (one-time costs since the last
    reply go home in ``meta["once"]``; a new log when not given); ``noted``,
    ``started``: see :func:`run_items` (``started`` is used only when ``msg.item_clock``);
    ``unfit_without_files``: a load of the items that fails for want of a file
    descriptor returns :class:`NoFiles` (the local worker, which the pool
    replaces: :meth:`_Worker._unfit`) rather than the chunk's ``Error``.
    """
    call, tag = msg.call, msg.tag
    if isinstance(func, ErrorInfo):
        return Error(call, tag, -1, func, b"", 0.0)
    log = imports if imports is not None else ImportLog()
    t_load = time.perf_counter()
    if position is not None:
        position.value = -1  # a crash while loading blames no single item
    mark = log.mark()  # imports the items or the task cause: len(sys.modules), O(1)
    try:
        items = payload.loads(msg.items)
    except BaseException as exc:
        if unfit_without_files and out_of_files(exc):
            return no_files_reply(call, tag, exc)
        return Error(call, tag, -1, ErrorInfo(exc), b"", 0.0)
    start = time.time()
    if log.mark() > mark:  # unpickling the items imported modules (a DataFrame: pandas)
        log.since(mark, "items", time.perf_counter() - t_load, start)
        mark = log.mark()
    t_run = time.perf_counter()
    debugging.new_unit("a task")  # this unit's first failures carry their locals
    worker_logging.begin(msg.log_context)  # the items' logging and warnings go home too
    figures = task_builtins.open_figures()
    runq = runq_end = run_queue_seconds()  # (around the timed items only: see _waited)
    waits.begin()  # (the items' time blocked in mpmagic's helpers: see _waited)
    if not msg.item_clock:
        started = None
    failed = [0]  # --errors collect (and an imap's chunks): the items that failed, told in meta["failed"]
    if msg.collect:
        noted = _counting(noted, failed)
    try:
        if msg.timing:
            results, seconds, error, item_seconds = run_items_timed(
                func, items, msg.star, msg.collect, position, noted, started, msg.site)
        else:
            results, seconds, error = run_items(
                func, items, msg.star, msg.collect, position, msg.block, noted, started, msg.site)
        runq_end = run_queue_seconds() if runq is not None else None
    finally:
        task_builtins.end_task(figures)  # the figures its items left open: shown, closed (before results are pickled)
        worker_logging.end()
        debugging.end_unit()
    end = start + (time.perf_counter() - t_run)
    log.since(mark, "task", None, start)  # imports inside the function (their time is in the task's)
    # cpu: CPU seconds for the chunk (tells CPU-bound from waiting).
    meta: dict[str, Any] = {"worker": where, "start": start, "end": end, "cpu": cpu(), "rss": private_bytes()}
    _waited(meta, runq, runq_end, seconds)
    with payload.sending_map_results():  # (a helper the task made cannot go home: that result fails)
        try:
            data = dumps_results(results)
        except Exception as exc:
            _close_coroutines(results)
            bad = _first_unpicklable(results)
            info = _unsendable_info(results[bad] if bad is not None else results, "result", exc)
            if not msg.collect or bad is None:
                return Unpicklable(call, tag, bad, info)
            # --errors collect: only the results that cannot travel become failures.
            results = [_sendable_or_error(r) for r in results]
            failed[0] = sum(type(r) is ErrorInfo for r in results)
            data = payload.dumps_data(results)
    if msg.collect:
        # (0 too: the notebook looks for ErrorInfo among the results only when this says
        # some are there, or when it is missing: an older worker's reply)
        meta["failed"] = failed[0]
    if msg.timing:
        # Only the chunk's slowest items can matter to the notebook: (index, seconds) pairs.
        meta["item_top"] = nlargest(_TOP_ITEMS, enumerate(item_seconds), key=itemgetter(1))
        meta["items_timed"] = len(item_seconds)
        meta["transfer"] = (t_run - t_load) + (time.perf_counter() - t_run - (end - start))
    if error is None:
        once = log.take()  # one-time costs since the last Done (an Error reply has no meta: they wait)
        if once is not None:
            meta["once"] = once
        loads = loadstamps.take_loads()  # the user's modules loaded since (local workers: see report_loads)
        if loads is not None:
            meta["loads"] = loads
        _take_notes(meta)
        return Done(call, tag, data, seconds, meta)
    return Error(call, tag, error[0], error[1], data, seconds)


def _counting(noted: Callable[[int, ErrorInfo], None] | None,
              failed: list[int]) -> Callable[[int, ErrorInfo], None]:
    """``noted`` (or nothing) that also counts the chunk's failed items in ``failed[0]``."""

    def counted(index: int, info: ErrorInfo) -> None:
        failed[0] += 1
        if noted is not None:
            noted(index, info)

    return counted


def _waited(meta: dict[str, Any], before: float | None, after: float | None, seconds: float) -> None:
    """``meta["runq"]``: seconds the unit's thread waited on a run queue for a core
    between the two reads of cpus.run_queue_seconds (at most the unit's ``seconds``),
    where the kernel says. The task times less it are what the tasks take on a free
    core: the report's serial estimate with more workers than cores (Report.runq_seconds).

    ``meta["helper_wait"]``: ``{kind: seconds}`` the unit's thread was blocked in
    mpmagic's own helpers since ``waits.begin()`` (a Lock, a Value's lock,
    ``Queue.get()``, ``Event.wait()``: :mod:`mpmagic.waits`), only when it was:
    no work was done meanwhile, and the report's estimate leaves it out
    (Report.helper_wait_seconds)."""
    if before is not None and after is not None:
        meta["runq"] = min(max(0.0, after - before), seconds)
    helpers = waits.take()
    if helpers:
        meta["helper_wait"] = helpers


def execute_cell(
    msg: Cell, where: Any, cpu: Callable[[], float], imports: ImportLog | None = None,
    unfit_without_files: bool = False,
) -> Done | Error | Unpicklable | NoFiles:
    """Run a ``%%parallel`` rank: the cell body with ``rank``/``size`` set.

    ``imports``: as for :func:`execute_map`; the modules the cell's payload
    and names import are one-time costs too. ``unfit_without_files``: as
    for :func:`execute_map`, for the load of the cell's payload.
    """
    from .cell import gather_check_failed, run_cell_code

    log = imports if imports is not None else ImportLog()
    call, rank = msg.call, msg.tag
    start = time.time()
    runq = run_queue_seconds()
    t0 = time.perf_counter()
    debugging.new_unit(f"rank {rank}")
    waits.begin()  # (the rank's time blocked in mpmagic's helpers: see _waited)
    worker_logging.begin(msg.log_context)
    figures = task_builtins.open_figures()
    mark = log.mark()
    try:
        spec = payload.loads(msg.payload)
    except BaseException as exc:  # (index -1: the rank's code never ran)
        worker_logging.end()
        debugging.end_unit()
        if unfit_without_files and out_of_files(exc):
            return no_files_reply(call, rank, exc)
        return Error(call, rank, -1, ErrorInfo(exc), b"", 0.0)
    try:
        log.since(mark, "function", time.perf_counter() - t0, start)
        mark = log.mark()
        value, gathered = run_cell_code(spec, rank, msg.size)
        log.since(mark, "task", None, start)  # the cell's modules, imported by name
        seconds = time.perf_counter() - t0
        runq_end = run_queue_seconds() if runq is not None else None
        used = cpu()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):  # the cell's own code raised it (see _as_item_error)
            exc = _as_item_error(exc)
        info = ErrorInfo(exc)
        if not gather_check_failed(exc):
            return Error(call, rank, 0, info, b"", 0.0)
        # (index 1: the rank's code ran to its end, mpmagic's check of its --gather names failed;
        # the raising frame is mpmagic's own, whose locals would only show its internals)
        info.context = {**info.context, "locals": {}, "where": None}
        return Error(call, rank, 1, info, b"", 0.0)
    finally:
        task_builtins.end_task(figures)  # the figures the rank left open: shown, closed (before its value is pickled)
        worker_logging.end()
        debugging.end_unit()
    try:
        out = payload.dumps_data((value, gathered))
    except Exception as exc:
        culprit, root = value, "the cell's last value"
        for name, v in ([] if _first_unpicklable([value]) is not None else gathered.items()):
            if _first_unpicklable([v]) is not None:
                culprit, root = v, f"--gather {name}"
                break
        return Unpicklable(call, rank, None, _unsendable_info(culprit, root, exc))
    meta: dict[str, Any] = {"worker": where, "start": start, "end": start + seconds, "cpu": used, "rss": private_bytes()}
    _waited(meta, runq, runq_end, seconds)
    once = log.take()
    if once is not None:
        meta["once"] = once
    loads = loadstamps.take_loads()  # (as execute_map's)
    if loads is not None:
        meta["loads"] = loads
    _take_notes(meta)
    return Done(call, rank, out, seconds, meta)


def _take_notes(meta: dict[str, Any]) -> None:
    """``meta["notes"]``: this worker's lines for the notebook since its last reply (a
    pandas option it could not set: ``context.take_notes``), shown once per run at home
    however many workers send the same line. An Error reply has no meta: they wait."""
    notes = context.take_notes()
    if notes:
        meta["notes"] = notes


def _no_files_errno(exc: BaseException) -> int:
    """``exc``'s errno if it is the want of a file descriptor (``EMFILE``, ``ENFILE``), else 0."""
    return exc.errno if isinstance(exc, OSError) and out_of_files(exc) and exc.errno else 0


def no_files_reply(call: int, tag: Any, exc: BaseException) -> NoFiles:
    """The reply of a worker that could not load a unit for want of a file
    descriptor (``exc``: ``EMFILE`` or ``ENFILE``), with its open-file limit now
    (a task may have lowered it) for the notebook's line."""
    return NoFiles(call, tag, rlimit("RLIMIT_NOFILE"), getattr(exc, "errno", None) or 0)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the notebook process is gone, even in the middle of a task.

    A killed notebook its own parent has not reaped yet is a zombie: gone
    (:func:`mpmagic.posixshm.pid_alive`, where ``kill(pid, 0)`` would still
    say it runs).
    """
    first_ppid = os.getppid()
    while True:
        time.sleep(0.25)
        if os.getppid() != first_ppid or not posixshm.pid_alive(parent_pid):
            _exit_notebook_gone(parent_pid, 3)


_PR_SET_PDEATHSIG = 1


def _die_with_the_forkserver(parent_pid: int) -> None:
    """Linux, a forkserver's worker: be SIGKILLed by the kernel when the forkserver exits.

    :func:`_watch_parent` is a thread: it cannot run while a task holds the
    GIL inside C code, and such a worker of a killed notebook ran on for the
    rest of its task (or for ever). The forkserver exits when the notebook
    is gone, after giving its workers a moment to clean up themselves
    (``forkserver_preload._after_the_notebook``). ``PR_SET_PDEATHSIG`` fires
    when the *thread* that forked this process ends: the forkserver is
    single-threaded, so that is its exit. The forkserver exits when every
    copy of the notebook's end of its "alive" pipe is closed, and each
    worker was given one: closed here first
    (``compat.forkserver_release_alive_fd``). A fork or spawn worker's parent
    thread is whichever notebook thread started it (perhaps a short-lived
    one): those keep the watch thread alone. If the forkserver died before
    the call (the parent changed, or the notebook is gone), leave now.
    """
    before = os.getppid()
    if not sys.platform.startswith("linux") or before == parent_pid:  # (fork/spawn: the notebook is the parent)
        return
    if not compat.forkserver_release_alive_fd():  # (else the forkserver lives as long as we do)
        return
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != before or not posixshm.pid_alive(parent_pid):
        _exit_notebook_gone(parent_pid, 3)


def _exit_notebook_gone(parent_pid: int, code: int) -> NoReturn:
    """Leave at once; if the notebook died, remove its shared memory first.

    A notebook unlinks its ``mpm_<pid>_*`` segments at pool stop and exit, but
    a kernel killed with SIGKILL cannot: its workers outlive it briefly and
    sweep them, so nothing stays in /dev/shm.
    """
    # The pipe closes while a killed process is still being torn down: give
    # it a moment to become a zombie (or vanish) before deciding.
    deadline = time.monotonic() + 1.0
    alive = posixshm.pid_alive(parent_pid)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = posixshm.pid_alive(parent_pid)
    if alive:
        shm.before_exit()  # a normal stop: hand over what shared queues still hold here, release our helpers
    else:
        shm.sweep_notebook(parent_pid)
        shm.sweep_helpers(os.getpid())  # ours too: no resource tracker holds a worker's (see shm.sweep_worker)
        # The notebook is gone: so is what this worker's tasks started (this
        # process leads their group, see main). Nobody else would stop them.
        if os.getpgrp() == os.getpid():
            try:
                os.killpg(0, signal.SIGKILL)
            except OSError:
                pass
    os._exit(code)


class _AfterUnits:
    """``sys.stdout`` / ``sys.stderr`` of a worker between units: the worker's own fd,
    as ``sys.__stdout__`` / ``sys.__stderr__``, but each line a thread started by a
    ``%%parallel`` rank writes is labelled ``[rank N] ``, as that rank's own lines are.

    What a rank's thread printed after the rank ended went to the fd unlabelled (in
    Jupyter: shown in the cell running then, as a serial thread's print is), so a
    user could not tell which rank said it; and as ``print`` writes its pieces one by
    one, two ranks' lines came mixed (``late from rank late from rank 1``). ``ranks``
    maps a thread to the rank that started it (:meth:`_Worker._release`); each thread's
    text goes out a whole line at a time (a partial one at its ``flush()``, or as the
    next unit starts), other threads' unlabelled.
    """

    def __init__(self, fd_stream: Any, ranks: dict[int, int]) -> None:
        self.fd_stream = fd_stream
        self.ranks = ranks
        self.partial: dict[int, str] = {}  # thread -> its line not ended yet
        self.open: set[int] = set()  # threads whose partial line went out (its rest is not labelled again)
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # (encoding, fileno, isatty, buffer...: the fd stream's)
        return getattr(self.fd_stream, name)

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        ident = threading.get_ident()
        with self.lock:
            text = self.partial.pop(ident, "") + s
            cut = text.rfind("\n") + 1
            if cut < len(text):
                self.partial[ident] = text[cut:]
            if cut:
                self._out(ident, text[:cut])
        return len(s)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self.lock:
            ident = threading.get_ident()
            text = self.partial.pop(ident, "")
            if text:
                self._out(ident, text)
                self.open.add(ident)
        self.fd_stream.flush()

    def flush_all(self) -> None:
        """Every thread's partial line goes out (a unit starts: its text goes home instead)."""
        with self.lock:
            for ident, text in list(self.partial.items()):
                self._out(ident, text)
                self.open.add(ident)
            self.partial.clear()

    def _out(self, ident: int, text: str) -> None:
        rank = self.ranks.get(ident)
        if rank is not None:
            first = ident not in self.open
            text = "".join((f"[rank {rank}] " if i or first else "") + line
                           for i, line in enumerate(text.splitlines(keepends=True)))
        self.open.discard(ident)
        try:
            self.fd_stream.write(text)
            self.fd_stream.flush()
        except (OSError, ValueError):  # (the fd is gone: nowhere to show it, as before)
            pass


def _flush_stale_output(streams: tuple[_StreamToParent, ...]) -> None:
    """Stream a task's printed lines home while it runs, not only when it ends."""
    while True:
        time.sleep(_FLUSH_INTERVAL * 2)
        try:
            for s in streams:
                s.flush_stale()
        except (OSError, ValueError):
            return  # the pipe is gone; the main thread's next read ends the process


# A worker's exit code when it could not start its threads (``ulimit -u``):
# the pool shrinks rather than replace it in a loop (backends.local._lost).
# It means that only before the worker's Ready message (a task may exit with 75 too).
EXIT_NO_THREADS = 75


class _Worker:
    def __init__(
        self, conn: Connection, parent_pid: int, worker_id: int, position: Any = None, stamp: Any = None,
        tail: Any = None,
    ) -> None:
        self.channel = _Channel(conn)
        self.reader = MessageReader(self.channel.fd)
        self.worker_id = worker_id
        self.pid = os.getpid()  # (a task that forks: see _leave_if_forked)
        self._call: Any = None  # the call of the last unit (see _new_call)
        self._cpu_mark = time.process_time()  # see _unit_starts
        self.position = position  # see run_items
        self.started = item_clock(stamp) if stamp is not None else None  # see item_clock
        self.funcs: OrderedDict[bytes, Loaded] = OrderedDict()
        self.imports = ImportLog()  # preloads, and one-time costs since the last reply (warmup.py)
        self.func_segments: dict[bytes, set[str]] = {}  # key -> shared segments it maps
        self.parent_pid = parent_pid
        self.out = _StreamToParent(self.channel, "stdout", tail=_Tail(tail) if tail is not None else None)
        self.err = _StreamToParent(self.channel, "stderr", sibling=self.out)
        self._threads_before = self._threads_after = 0  # threading.active_count() as a unit starts, ends
        self.thread_ranks: dict[int, int] = {}  # a thread a %%parallel rank started -> that rank
        self.threads_seen: set[int | None] = set()  # the threads alive as a unit started (new ones: its own)
        # sys.stdout / sys.stderr between units (None where the process has none: print() then prints nothing)
        self.after_out = _AfterUnits(sys.__stdout__, self.thread_ranks) if sys.__stdout__ is not None else None
        self.after_err = _AfterUnits(sys.__stderr__, self.thread_ranks) if sys.__stderr__ is not None else None
        try:
            threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
            threading.Thread(target=_flush_stale_output, args=((self.out, self.err),), daemon=True).start()
        except RuntimeError:  # "can't start new thread": the user's process/thread limit (ulimit -u)
            os._exit(EXIT_NO_THREADS)  # the pool says so in one line (backends.local._lost), no traceback

    def _capture(self, call, tag) -> None:
        running = threading.active_count()
        if running != self._threads_after:  # (threads started or ended between units: none is this unit's)
            self.threads_seen = {t.ident for t in threading.enumerate()}
            for ended in [i for i in self.thread_ranks if i not in self.threads_seen]:  # (its ident may come again)
                del self.thread_ranks[ended]
        self._threads_before = running
        after_out, after_err = self.after_out, self.after_err
        if after_out is not None and after_out.partial:
            after_out.flush_all()
        if after_err is not None and after_err.partial:
            after_err.flush_all()
        out, err = self.out, self.err
        out.call, out.tag, out._closed, out.after = call, tag, False, None
        err.call, err.tag, err._closed, err.after = call, tag, False, None
        # last = 0: a task's first line goes home at once (then at most every
        # _FLUSH_INTERVAL), so it is seen even if the task is killed soon after.
        out.held.last = 0.0
        sys.stdout, sys.stderr = out, err

    def _leave_if_forked(self) -> None:
        """A task that called ``os.fork()`` and returned in the child: the child
        ends here. It came back into this loop, answered in the worker's place
        (its results went home as the item's) and served the pool from then on."""
        if os.getpid() != self.pid:
            os._exit(0)

    def _release(self, rank: int | None = None) -> None:
        """The unit ended: its text goes home; ``rank``: it was that %%parallel rank,
        whose threads still running are labelled as its own when they print (_AfterUnits)."""
        self.out.finish()  # (both streams' text: they share one buffer)
        running = threading.active_count()  # (a lock and two lengths in Python: read once, as a rule)
        if running > self._threads_before:  # (a unit that started no thread pays nothing)
            self._note_threads(rank)
            running = threading.active_count()
        self._threads_after = running
        # (a stream of the unit's kept by its task writes where print writes now; a line
        # written between the finish above and this goes home with the next unit's)
        self.out.after, self.err.after = self.after_out, self.after_err
        sys.stdout, sys.stderr = self.after_out, self.after_err

    def _note_threads(self, rank: int | None) -> None:
        """The threads the unit started (alive now, not as it started) are ``rank``'s."""
        alive = {t.ident for t in threading.enumerate()}
        for ident in [i for i in self.thread_ranks if i not in alive]:  # (ended: its ident may come again)
            del self.thread_ranks[ident]
        self.threads_seen &= alive
        started = []
        for new in alive - self.threads_seen:
            self.threads_seen.add(new)
            if new is not None:
                started.append(new)
                if rank is not None:
                    self.thread_ranks[new] = rank
        worker_logging.adopt_threads(started, alive)  # (their later records: as the unit's looked)

    def _unit_starts(self) -> None:
        """Mark the CPU clock where a unit (a chunk, a rank) starts: see :meth:`_cpu_of_unit`."""
        self._cpu_mark = time.process_time()

    def _cpu_of_unit(self) -> float:
        """CPU seconds this process used since its unit started: the tasks' (all their
        threads'), plus unpickling the items. Counted from the previous reply, it also
        held what the worker did between units: pickling the previous unit's results
        and freeing them (a tiny call right after one returning 2x150 MB read 1.6-2.5
        CPU seconds per task second, and the advice said the tasks ran threads of their
        own), loading a function's captured globals, dropping unmapped segments. Two
        clock reads per unit (~0.2 us each)."""
        return time.process_time() - self._cpu_mark

    def serve(self) -> None:
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError):
            # A reply the notebook will never read (it closed the pipe: the pool
            # stopped or shrank while this worker answered): leave as on the
            # pipe's end, not with a traceback on the kernel's terminal.
            _exit_notebook_gone(self.parent_pid, 0)

    def _serve(self) -> None:
        self.channel.send(Ready(os.getpid(), self.worker_id))
        # (while the notebook has no unit for it yet, as a rule: its first unit would wait for it)
        callsite.prepare(_call_items)
        while True:
            msg = unpack(self._receive())
            kind = type(msg)
            if kind is Map:
                self.run_map(msg)
            elif kind is Func:
                self.load_function(msg.key, msg.payload)
            elif kind is Cell:
                self.run_cell(msg)
            elif kind is Context:
                with self.imports.watching("context"):  # (its warnings filters may import numpy)
                    context.apply(msg)
            elif kind is Unmap:
                self.unmap(msg.names)
            elif kind is Forget:
                self.forget(msg.keys)
            elif kind is Import:
                self.imports.preload(msg.names)  # (its CPU is no unit's: they count from their start)
            elif kind is Reload:  # the notebook reloaded these modules: run the code it runs
                self.imports.reload(msg.names)
                self.funcs.clear()  # a function pickled by reference is the old module's: load it again
                self.func_segments.clear()
            elif kind is Setup:  # worker setup (worker_setup.py): run it, say how it went
                from .worker_setup import run_setup

                seeding.restore()  # (a --seed call's streams end here: the setup seeds what the worker had)

                # (what it prints is copied into the tail too: the notebook shows it if the setup kills us)
                tail = self.out.held.tail
                try:
                    reply = context.keep_setup_changes(functools.partial(
                        run_setup, msg.version, msg.payload, self.worker_id, tail.add if tail is not None else None))
                finally:
                    if tail is not None:
                        tail.reset(self.out.held.pieces)  # (its copies out: only what the streams still hold)
                self.channel.send(reply)
            elif kind is Stop:
                return
            else:
                raise ProtocolError(f"a worker cannot handle a {kind.__name__} message")

    def _receive(self) -> bytes | bytearray:
        """The next message, read here in the main thread (no reader thread:
        the notebook never blocks on a busy worker's full pipe, see
        ``backends/pipes.py``). The pipe's end means the notebook stopped
        this worker or died: leave."""
        try:
            return self.reader.read()  # (only this thread reads; sends take the channel's lock)
        except (EOFError, OSError):
            _exit_notebook_gone(self.parent_pid, 0)

    def load_function(self, key: bytes, data: bytes) -> None:
        shm.opened()
        with self.imports.watching("function"):  # the first sending's cost here, imports included
            self.funcs[key] = Loaded.load(data)
        segments = shm.opened()  # captured arrays mapped from shared memory
        if segments:
            self.func_segments[key] = segments
        for old in payload_cache.excess(self.funcs, Loaded.nbytes):  # (the least recently used first)
            del self.funcs[old]
            self.func_segments.pop(old, None)

    def forget(self, keys: list) -> None:
        """The notebook dropped these payloads (a function defined again, a global it
        captures rebound): drop our copies, each holding all its function captured."""
        for key in keys:
            self.funcs.pop(key, None)
            self.func_segments.pop(key, None)

    def unmap(self, names: list) -> None:
        """The notebook destroyed these segments: drop them and the functions using them."""
        gone = set(names)
        for key, segs in list(self.func_segments.items()):
            if segs & gone:
                self.funcs.pop(key, None)
                del self.func_segments[key]
        shm.forget(names)

    def _new_call(self, call: Any) -> None:
        """The first unit of a call on this worker: the notebook's world again
        (a task of an earlier call may have changed its directory, environment...),
        and the worker's random states from before a seeded call (seeding.restore)."""
        if call != self._call:
            self._call = call
            seeding.restore()  # the worker's own random states again, after a --seed call's streams
            context.reassert()

    def run_map(self, msg: Map) -> None:
        self._unit_starts()
        self._new_call(msg.call)
        key = msg.key or b""  # (a map always names its function)
        loaded = self.funcs.get(key)
        if loaded is None:
            self.channel.send(Missing(msg.call, msg.tag, key))
            return
        self.funcs.move_to_end(key)
        func = loaded.for_call(msg.call, self.imports)  # (a stateful one: fresh for a new call)
        if loaded.no_files:  # its captured arrays could not be mapped: no descriptor left
            self._unfit(NoFiles(msg.call, msg.tag, rlimit("RLIMIT_NOFILE"), loaded.no_files))
        self._capture(msg.call, msg.tag)
        try:
            reply = execute_map(
                msg, func, self.worker_id, self._cpu_of_unit, _dumps_result, self.position, self.imports,
                self._noter(msg) if msg.collect else None, self.started, unfit_without_files=True,
            )
        finally:
            self._leave_if_forked()
            self._release()
        if type(reply) is NoFiles:
            self._unfit(reply)
        if self.position is not None:
            # Between units: a death from now on (an outside SIGKILL, the OOM
            # killer) is not the fault of the unit sent next, which never
            # started: the notebook sends it again (see LocalBackend._lost).
            # Set before the reply: a death after it re-runs this unit whole.
            self.position.value = POSITION_IDLE
        self.channel.send(reply)

    def _unfit(self, reply: NoFiles) -> NoReturn:
        """This worker had no file descriptor left to load a unit (the shared memory
        of its function's captured arrays or of its items needs one for a moment):
        earlier tasks left files open and used up its limit. That is no item's
        error, and every later unit would fail the same way: say so (``reply``),
        and the notebook replaces this worker and sends the unit again
        (``backends.local.LocalBackend._no_files``). Nothing more runs here
        meanwhile (a unit queued behind goes to another worker: run here too,
        its side effects would happen twice); the pipe's end, or the kill, ends it."""
        if self.position is not None:
            self.position.value = POSITION_IDLE  # (the unit never started)
        self.channel.send(reply)
        while True:
            self._receive()  # (its end exits)

    def _noter(self, msg: Map) -> Callable[[int, ErrorInfo], None]:
        """What tells the notebook at once of a collected failure in the chunk ``msg``
        (``Collected``; at most NOTED_PER_UNIT of them): a death later in the chunk
        loses the chunk's results, and the notebook then keeps these errors instead
        of running their items again (jobs.MapJob.lost)."""
        left = [NOTED_PER_UNIT]

        def noted(index: int, info: ErrorInfo) -> None:
            if left[0] > 0:
                left[0] -= 1
                self.channel.send(Collected(msg.call, msg.tag, index, info))

        return noted

    def run_cell(self, msg: Cell) -> None:
        self._unit_starts()
        self._new_call(msg.call)
        if self.position is not None:
            self.position.value = -1  # running a rank: a death now is the rank's (no item to name)
        self._capture(msg.call, msg.tag)
        try:
            reply = execute_cell(msg, self.worker_id, self._cpu_of_unit, self.imports, unfit_without_files=True)
        finally:
            self._leave_if_forked()
            self._release(msg.tag if msg.label else None)  # (--no-label: its threads' lines unlabelled too)
        if type(reply) is NoFiles:
            self._unfit(reply)
        if self.position is not None:
            self.position.value = POSITION_IDLE  # (as after a map unit: see run_map)
        self.channel.send(reply)


def _dumps_result(results: list) -> bytes:
    """A local worker's results: big arrays go through shared memory.

    Results that are plain values (``int``, ``float``, ``str``, ``bytes``,
    ``None``... in builtin containers: ``payload.dumps_plain``) are pickled as
    they are: no buffer of theirs goes out of band and they name no notebook
    code, so the shared-memory collector and the ``__main__`` scan would find
    nothing (~3 us per chunk, a tenth of a warm 1-item chunk's time in the worker).
    """
    data = payload.dumps_plain(results)
    if data is not None:
        return data
    return shm.dumps_result(results, payload.dumps_data)


def _unsendable_info(obj: Any, root: str, exc: BaseException) -> ErrorInfo:
    """An ErrorInfo whose text names the part of ``obj`` that cannot be pickled."""
    info = ErrorInfo(exc)
    info.exc_text = payload.describe_unpicklable(obj, root, exc)[0]
    return info


def _sendable_or_error(result: Any) -> Any:
    """The result itself if it can be sent home, else an ErrorInfo saying why not."""
    try:
        payload.dumps_data(result)
        return result
    except Exception as exc:
        text = payload.describe_unpicklable(result, "result", exc)[0]
        return ErrorInfo(SerializationError(
            f"the result cannot be sent back from the worker: {text}. {payload.result_advice(text)}"
        ))


def _close_coroutines(results: list) -> None:
    """Close the coroutines among ``results`` (a task returned ``co(x)`` for an async
    ``co``): the error says what to do, and Python's "coroutine 'co' was never
    awaited" warning, once they were collected, pointed at this module's line."""
    for r in results:
        if type(r) is types.CoroutineType:
            r.close()


def _first_unpicklable(results: list) -> int | None:
    for i, r in enumerate(results):
        try:
            payload.dumps_data(r)
        except Exception:
            return i
    return None


def _not_the_users() -> tuple[str, ...]:
    """The folders of installed code (this Python's prefixes) and of mpmagic itself: the
    modules a worker loads from them are not reported home (``loadstamps.report_loads``).
    Not ``usermodules.INSTALLED``: its ``sysconfig`` and ``realpath`` calls would cost every
    worker's start, and a module left in only goes home (the notebook looks up its own)."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(__file__)}
    return tuple(sorted(d for d in (os.path.join(p, "") for p in dirs if p) if len(d) > 1))


def main(
    conn: Connection, parent_pid: int, worker_id: int, position: Any = None, init: dict | None = None,
    stamp: Any = None, tail: Any = None,
) -> None:
    """Entry point of a worker process (the target of ``Process``).

    ``init`` (``worker_setup.start_info``): ``threads``/``thread_vars`` (the
    BLAS/OpenMP cap, and the notebook's own thread variables, which win over it) and ``gpu`` (``CUDA_VISIBLE_DEVICES``), applied first.
    ``position`` and ``stamp``: the running item's position and start, shared
    with the notebook (:func:`run_items`, :func:`item_clock`); ``tail``: the
    output it holds, copied where the notebook reads it if it dies (:class:`_Tail`).
    """
    from .worker_setup import start_worker

    try:
        # A session (so a process group) of its own: what its tasks start is
        # stopped with it (backends.local._kill_group), a terminal's Ctrl-C,
        # sent to the notebook's group, does not reach it, and with no
        # controlling terminal a task that opens /dev/tty fails at once where
        # a background group's read stopped it (and the run) for ever.
        os.setsid()
    except OSError:
        pass
    _die_with_the_forkserver(parent_pid)  # a task holding the GIL does not outlive a killed notebook
    loadstamps.report_loads(_not_the_users())  # the user's modules it loads: their files' stamps go home
    worker_logging.drop_inherited_handlers()  # a task's records reach the notebook's handlers from home, once
    task_builtins.use_task_backend()  # (before anything imports matplotlib)
    start_worker(init, worker_id)  # before anything imports numpy (the variables are read at load)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exiting.forget_sigterm_handler()  # (a fork of a notebook that ran %load_ext: its handler is the notebook's)
    if hasattr(signal, "pthread_sigmask"):  # started with SIGINT blocked (see local.py)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    task_builtins.install(force=True)  # display() and get_ipython(): ours, also over a fork's copies of IPython's
    task_builtins.no_console(force=True)  # input() in a task: an EOFError saying why, never a wait; breakpoint() skipped
    shm.NOTEBOOK_PID = parent_pid  # segments this worker makes carry the notebook's pid
    posixshm.mark_serving(parent_pid)  # another notebook's sweep leaves ours to us if ours dies
    debugging.WORKER_ID = worker_id  # named in a failure's details
    _Worker(conn, parent_pid, worker_id, position, stamp, tail).serve()
    # A "stop": the process ends with os._exit (forkserver) or without dropping
    # a kept rank's namespace, so the helpers its tasks made (a --keep rank's
    # inbox) are released here, not left in /dev/shm.
    shm.before_exit()
