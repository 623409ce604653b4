"""Every message between the notebook and a worker, named in one place.

The notebook and its workers always run the same mpmagic (a local worker is
started from the notebook's own files; a Dask worker that cannot import the
same version fails on the first task), so there is one format and no
compatibility sniffing. Each message is a small named tuple; on the wire it
is a plain tuple ``(code, field, ...)`` pickled by :func:`pack` and read back
by :func:`unpack`, the only two functions that know the layout (CPython's
``multiprocessing.pool`` keeps one place per tuple shape the same way).

Notebook to worker (requests)::

    Func(key, payload)                 cache a cloudpickled function under its key
    Map(call, tag, key, star, collect, items, timing, block, log_context, item_clock, site)
                                       run the function over a chunk of items
    Cell(call, tag, size, payload, log_context, label)
                                       run a %%parallel cell body as rank ``tag``
    Context(version, state)            the notebook's world (see context.py)
    Unmap(names)                       these shared-memory segments are gone
    Forget(keys)                       drop these cached functions: the notebook
                                       replaced or dropped their payloads
    Import(names)                      import these modules between tasks (warm
                                       workers: the notebook imported them)
    Reload(names)                      reload these modules (the user's own: the
                                       notebook reloaded them since the workers
                                       imported them; see warmup.Warmth.reloads)
    Setup(version, payload)            run the worker setup (worker_setup.py);
                                       payload None: drop an earlier setup's names
    Stop()                             exit

Worker to notebook (replies; a Dask task returns the same ones)::

    Ready(pid, worker)                 the worker is up
    Out(call, tag, stream, text)       text a task printed (whole lines, or a
                                       partial one it flushed or left at its end)
    Outs(call, tag, pieces)            the same for both streams at once:
                                       ((stream, text), ...) in the order written
    Done(call, tag, data, seconds, meta)
    Error(call, tag, index, info, partial, seconds)
    Unpicklable(call, tag, index, info)
    Missing(call, tag, key)            the function ``key`` is not cached here
    NoFiles(call, tag, limit, errno)   the worker had no file descriptor left to load
                                       the unit's function or items (mpmagic's own
                                       loading, not the task: ``EMFILE``/``ENFILE``);
                                       it runs nothing more and waits to be replaced
    Collected(call, tag, index, info)  with --errors collect, item ``index`` of the
                                       running chunk raised (before the chunk's reply:
                                       a worker that dies later in the chunk does not
                                       take that error with it; a local worker's, at
                                       most NOTED_PER_UNIT per chunk)
    SetupDone(version, worker, error, names, output, random_state)
                                       how the setup went (error: one line or None)

``call`` is the run's id, ``tag`` the unit's (a chunk id or a rank).
``log_context`` is ``(first item index or None, notebook logger levels)``:
what a worker needs to send the unit's logging records and warnings home,
labelled (``worker_logging.py``); None (the default) captures neither.

Why plain tuples on the wire: a warm 2-item ``%pmap`` exchanges four messages.
Measured (timeit, 2026-11-30): pack + unpack of a ``Map`` ~0.8 us and of a
``Done`` ~1.4 us, against ~0.5 us for the old string-tagged tuple and ~2.4 us
for pickling a named tuple itself (it pickles its class by reference; a
dataclass costs more still). The named tuple classes exist for the readers:
fields by name, one list of kinds.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, NamedTuple

from .errors import MPMagicError

PROTOCOL = pickle.HIGHEST_PROTOCOL


class ProtocolError(MPMagicError):
    """A message that is not one of this module's kinds (a bug, or a foreign peer)."""


# -- requests ---------------------------------------------------------------


class Func(NamedTuple):
    key: bytes
    payload: bytes


class Map(NamedTuple):
    call: int
    tag: int
    key: bytes | None
    star: bool
    collect: bool  # a failing item's ErrorInfo stands in its place, the chunk goes on (--errors collect, imap)
    items: bytes  # (unpacked from pack_parts' wire form: a memoryview of the message, uncopied)
    timing: bool  # --insights: time each item
    block: int  # items between crash-position marks (see worker.run_items)
    # (chunk's first index, pickled logger levels): see worker_logging. The
    # levels are pickled once per run, so each chunk adds a ~300-byte copy.
    log_context: tuple | None = None
    # A --timeout over a chunk of several items: the worker tells the notebook
    # when each item starts (``started`` of worker.run_items), so that each item,
    # not the chunk, gets the timeout (see backends/local.py ``_check_deadlines``).
    item_clock: bool = False
    # Where the map was called, then the frames that called it: each (module name, file,
    # line, function name), innermost first (callsite.caller_site). The worker calls the
    # function from frames that look like those lines', so a warning the function charges
    # to its caller (``stacklevel=2``) or further up names them, as serially.
    site: tuple | None = None


class Cell(NamedTuple):
    call: int
    tag: int  # the rank
    size: int
    payload: bytes
    log_context: tuple | None = None  # (None, logger levels): see Map
    label: bool = True  # its lines are labelled [rank N] (not with --no-label): its threads' after it too


class Context(NamedTuple):
    version: int
    state: bytes  # context.dumps(...): cwd, environment, sys.path, ...


class Unmap(NamedTuple):
    names: list


class Forget(NamedTuple):
    """Payload keys the notebook's cache dropped (``payload_cache.retired_since``: the
    function was defined again, a global it captures rebound, or it was collected).
    A worker drops its loaded copies: each holds what its function captured (a
    100 MB table per version of ``f``), and no later call names them. A run that
    still does gets ``Missing`` and sends the payload again."""

    keys: list


class Stop(NamedTuple):
    pass


class Import(NamedTuple):
    """Modules the notebook imported that a payload may need (see warmup.py):
    the worker imports them in order, between tasks, and reports the time in
    the next ``Done``'s ``meta["once"]``."""

    names: list


class Reload(NamedTuple):
    """The user's own modules the notebook reloaded (``importlib.reload``) since the
    workers imported them, in the order the notebook reloaded them: a worker that has
    one reloads it and forgets its cached functions (one pickled by reference is
    loaded again, from the new module)."""

    names: list


class Setup(NamedTuple):
    version: int  # worker_setup's version: a worker runs each version once
    payload: bytes | None  # the pickled setup entries; None: remove the names of an earlier one


# -- replies ----------------------------------------------------------------


class Ready(NamedTuple):
    pid: int
    worker: int


class Out(NamedTuple):
    call: int
    tag: Any
    stream: str
    text: str


class Outs(NamedTuple):
    call: int
    tag: Any
    pieces: tuple  # ((stream, text), ...): a task alternating stdout and stderr, one message a batch


class Done(NamedTuple):
    call: int
    tag: Any
    data: bytes
    seconds: float
    # worker, start, end, cpu, rss; "runq" (Linux: seconds the task waited for a core,
    # cpus.run_queue_seconds); "helper_wait" ({kind: seconds} the task was blocked in
    # mpmagic's Lock / Value's lock / Queue / Event, only when it was: mpmagic.waits);
    # with timing item_top/items_timed/transfer; "once":
    # {"imports": [(why, [names], seconds|None, start_epoch, end_epoch)], "load": seconds}
    # when the worker paid one-time costs since its last reply (see warmup.ImportLog); "notes":
    # its lines for the notebook since its last reply (a pandas option it could not set:
    # context.take_notes, shown once per run by jobs.say_notes);
    # "failed": with Map.collect, how many of the chunk's results are an ErrorInfo (0: the
    # notebook need not look for them); "temporary": True, added here by the local pool's
    # loop for a cell's temporary worker
    meta: dict


class Error(NamedTuple):
    call: int
    tag: Any
    # (shadows tuple.index) in the chunk (a cell: 0, its rank's code; 1, mpmagic's check that the
    # --gather variables were set, after the code ran); -1: the unit as a whole could not run (it did not load)
    index: int  # type: ignore[assignment]
    info: Any  # worker.ErrorInfo
    partial: bytes  # results of the items before it
    seconds: float


class Unpicklable(NamedTuple):
    call: int
    tag: Any
    index: int | None  # type: ignore[assignment]  # (shadows tuple.index) the first result that cannot travel, if known
    info: Any  # worker.ErrorInfo


class Missing(NamedTuple):
    call: int
    tag: Any
    key: bytes


class NoFiles(NamedTuple):
    call: int
    tag: Any
    limit: int | None  # the worker's soft RLIMIT_NOFILE (a task may have lowered it); None: unknown
    errno: int  # EMFILE (the worker's own limit) or ENFILE (the system's table is full)


class Collected(NamedTuple):
    call: int
    tag: Any
    index: int  # type: ignore[assignment]  # (shadows tuple.index) in the chunk
    info: Any  # worker.ErrorInfo


class SetupDone(NamedTuple):
    version: int
    worker: Any  # the worker's id (a Dask worker's name)
    error: str | None  # one line naming the worker and the setup line that raised
    names: list  # the names the setup defined (builtins of the worker)
    output: str  # what the setup printed (shown by %%pool setup, labelled by worker)
    # Fingerprints of the random generators' states the setup changed ("random",
    # "numpy.random"; None: none): two workers with the same draw the same numbers.
    random_state: dict | None = None


# The wire codes. Never reuse a code for another shape.
KINDS: tuple[Any, ...] = (
    Func, Map, Cell, Context, Unmap, Stop, Ready, Out, Done, Error, Unpicklable, Missing, Import, Setup,
    SetupDone, Reload, Outs, Collected, Forget, NoFiles,
)
_CODE: dict[type, int] = {cls: i for i, cls in enumerate(KINDS)}
_WIDTH: tuple[int, ...] = tuple(len(cls._fields) for cls in KINDS)
REPLIES: tuple[type, ...] = (Done, Error, Unpicklable, Missing, NoFiles)  # answers to a unit


def pack(msg: tuple) -> bytes:
    """``msg`` (one of :data:`KINDS`) as bytes for the pipe or a Dask result."""
    try:
        code = _CODE[type(msg)]
    except KeyError:
        raise ProtocolError(f"cannot send {type(msg).__name__}: not an mpmagic message kind") from None
    return pickle.dumps((code, *msg), PROTOCOL)


# A Map whose items are at least this big travels in parts (pack_parts).
_PARTS_MIN = 64 << 10
# A message in parts starts with this byte, then the length of the pickle of
# its fields (8 bytes), that pickle, and the items. A pickle starts with PROTO
# (0x80), so ``unpack`` tells the two forms apart by their first byte.
_PARTS = b"\x00"
_PARTS_HEAD = struct.Struct("!cQ")
_MAP_ITEMS = Map._fields.index("items")


def pack_parts(msg: tuple) -> tuple[bytes, ...]:
    """:func:`pack`, as parts whose concatenation is one message for :func:`unpack`.

    A :class:`Map` with large items (``_PARTS_MIN``) goes as the pickle of its
    other fields followed by the items as they are, out of band: packing
    copied them into the message and unpacking copied them out again, each
    copy as long as pickling the items had taken (2,000 ``bytes`` items of
    100 kB: two 200 MB copies per map, one in the notebook, one in the
    workers). The sender writes the parts one after another (``sendmsg``).
    """
    if type(msg) is not Map or type(msg.items) is not bytes or len(msg.items) < _PARTS_MIN:
        return (pack(msg),)
    i = _MAP_ITEMS
    fields = (_CODE[Map], *msg[:i], pickle.PickleBuffer(msg.items), *msg[i + 1 :])
    head = pickle.dumps(fields, PROTOCOL, buffer_callback=_out_of_band)
    return _PARTS_HEAD.pack(_PARTS, len(head)), head, msg.items


def _out_of_band(buffer: pickle.PickleBuffer) -> bool:
    return False


def unpack(data: bytes | bytearray) -> Any:
    """The message :func:`pack` (or :func:`pack_parts`) made; :class:`ProtocolError` for anything else."""
    if data[:1] == _PARTS:
        view = memoryview(data)
        try:
            _, n = _PARTS_HEAD.unpack_from(view)
        except struct.error:
            raise ProtocolError(f"not an mpmagic message: {_short(bytes(view[:40]))}") from None
        start = _PARTS_HEAD.size
        msg = pickle.loads(view[start : start + n], buffers=(view[start + n :],))
    else:
        msg = pickle.loads(data)
    try:
        code = msg[0]
        cls = KINDS[code]
        if len(msg) - 1 != _WIDTH[code] or code < 0:
            raise ValueError
    except (TypeError, IndexError, KeyError, ValueError):
        raise ProtocolError(f"not an mpmagic message: {_short(msg)}") from None
    return tuple.__new__(cls, msg[1:])


def _short(obj: Any) -> str:
    try:
        r = repr(obj)
    except Exception:
        r = f"<{type(obj).__name__}>"
    return r if len(r) <= 80 else r[:77] + "..."


__all__ = [
    "KINDS", "REPLIES", "Cell", "Collected", "Context", "Done", "Error", "Forget", "Func", "Import", "Map", "Missing",
    "NoFiles", "Out", "Outs",
    "ProtocolError", "Ready", "Reload", "Setup", "SetupDone", "Stop", "Unmap", "Unpicklable", "pack", "pack_parts",
    "unpack",
]
