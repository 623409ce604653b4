"""Durable runs: ``pmap(..., checkpoint=True)`` and ``%%parallel --checkpoint``.

A checkpointed map stores every finished item's result as its chunk arrives
in the notebook, and a later run of the same call (same function code and
captures, same items: ``checkpoint_keys.py``) takes those from the store
(``checkpoint_store.py``) and computes only the rest::

    keys of every item ──► store.load ──► found: results in place
                                   └────► missing: the core pmap, on those only
                                            └─ each accepted chunk ─► store.put
                                               (MapJob's on_chunk, one
                                                transaction per chunk)
    merge in input order; the report says "resumed: X of N items ..."

Failures (``errors="collect"``) are never stored, so a re-run retries them.
The store is a cache: when it cannot be opened or written, the run goes on
without it after a one-line warning (a ``RuntimeWarning`` at the user's
line, :func:`_warn`); a run whose store could not be opened is a plain run,
and its report claims no checkpoint.

One map's bookkeeping is one :class:`MapCheckpoint`, whoever runs it: the
blocking ``pmap`` (``checkpointed_pmap``), a background run
(``checkpointed_submit``: it is the run's ``background.Resume``, settled by
the run's pump thread before the handle says done, so a re-run right after
``result()`` or ``cancel()`` finds every accepted chunk), an ``imap``
stream (:class:`StreamCheckpoint`, which also puts stored items in the
stream's order). A ``%%parallel`` cell's is :class:`CellCheckpoint`.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import os
import re
import sqlite3
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from . import debugging, loadstamps, worker_setup
from .checkpoint_keys import (
    cell_key,
    held_from_reloaded,
    item_key,
    item_keys,
    keyed_copies,
    keyed_copy,
    run_key,
    unstable_reason,
)
from .checkpoint_store import CheckpointError, KeyIndex, Packed, RunInfo, Store, pack
from .checkpoint_store import warn as _warn
from .errors import (
    MAKE_INPUT_AGAIN,
    STOPPED_OUTCOME,
    add_note,
    drop_read_past_note,
    interrupt_outcome,
    run_interrupted,
    set_interrupt_outcome,
)
from .errors import renumber_items as _renumber
from .fmt import fmt_bytes, func_name
from .jobs import (
    Failed,
    OtherCode,
    WithoutSetup,
    advanced_elsewhere,
    input_raised_it,
    read_ahead_refusal,
    read_into,
    read_past,
    shared_generator_error,
)

log = logging.getLogger("mpmagic")

DEFAULT_DIR = ".mpmagic"
DEFAULT_MAX_BYTES = 10 * 1024**3
# The writer's bounds (see _Writer): bytes of chunks per transaction, and
# queued before put waits. A kill loses at most the chunks in flight, those
# queued and one transaction.
_BATCH_BYTES = 16 << 20
_QUEUE_BYTES = 64 << 20
# Items keyed and looked up per batch when the input is lazy (a generator):
# large enough that a query costs little per item, small enough that the
# first chunk goes out at once.
_LAZY_BATCH = 512

_stores: dict[Path, Store] = {}


def _setting(name: str, default: Any) -> Any:
    """A ``%config MPMagic`` setting, or ``default`` outside IPython."""
    try:
        from .config import current

        value = getattr(current(), name)
    except Exception:
        return default
    return default if value is None else value


def directory(location: Any = True) -> Path:
    """The checkpoint folder: ``location`` if it is a path, else the configured one."""
    if location is not True and location:
        return Path(location).expanduser()
    configured = _setting("checkpoint_dir", "")
    if configured:
        return Path(configured).expanduser()
    try:
        return Path.cwd() / DEFAULT_DIR
    except FileNotFoundError:  # (the default folder is beside the notebook, which has none now)
        from .errors import UsageError

        raise UsageError("the notebook's working directory no longer exists, so the checkpoint store has no "
                         f"default folder ({DEFAULT_DIR}/ beside the notebook): os.chdir to the notebook's folder, "
                         "or %config MPMagic.checkpoint_dir = '/some/folder'") from None


def max_bytes() -> int | None:
    """The store's size cap (``%config MPMagic.checkpoint_max_bytes``)."""
    return _setting("checkpoint_max_bytes", DEFAULT_MAX_BYTES)


def open_store(location: Any = True) -> Store | None:
    """The store at ``location`` (kept open for this process), or None with a warning."""
    from .errors import UsageError

    try:
        path = directory(location).resolve()
    except UsageError as exc:  # no default folder (the notebook's directory was deleted)
        _warn(f"mpmagic: {exc}; running without a checkpoint")
        return None
    try:
        return _open(path)
    except Exception as exc:  # a cache must never fail the run
        _warn(f"mpmagic: cannot open the checkpoint store in {path} ({_why(path, exc)}); "
              "running without a checkpoint")
        return None


def _open(path: Path) -> Store:
    """The store in folder ``path`` (kept open for this process); raises what opening it raised."""
    store = _stores.get(path)
    if store is not None:
        if store.path.exists():
            return store
        store.close()  # the folder was deleted under us: start again
    store = Store(path)
    _stores[path] = store
    return store


def _readonly_note(store: Store) -> None:
    """Say once per run that a store this user may only read is used but not added to."""
    if store.readonly:
        _warn(f"mpmagic: the checkpoint store in {store.dir} is read-only for this user: stored results "
              "are used, but what this run computes is not stored")


def stored_name(func: Callable) -> str:
    """The name a map's stored run goes by (``%pool checkpoints`` lists it, ``clear NAME``
    takes it, the run's lines say it): a function's qualified name (``Model.fit``), a
    bound method's by the class of its object (``Left.step`` for a ``step`` that ``Left``
    inherits). By ``__name__`` alone, two classes' ``run`` methods were two rows ``run``,
    one of them unclearable without the other."""
    if isinstance(func, types.MethodType):
        owner = func.__self__
        return f"{(owner if isinstance(owner, type) else type(owner)).__qualname__}.{func.__name__}"
    if isinstance(func, (types.FunctionType, types.BuiltinFunctionType)):
        return func.__qualname__
    return func_name(func)


def _why(path: Path, exc: BaseException) -> str:
    """Why the store in ``path`` cannot be opened, in the user's words."""
    try:
        if path.exists() and not path.is_dir():  # FileExistsError says only "File exists"
            return f"{path.name} is a file, not a folder"
    except OSError:  # a folder on the way that may not be entered (Python 3.11's exists() raises EACCES)
        pass
    return f"{type(exc).__name__}: {exc}"


def close_stores() -> None:
    """Close every open store (tests, and before deleting a checkpoint folder)."""
    for store in _stores.values():
        store.close()
    _stores.clear()


def _to_stderr(line: str) -> None:
    """``line`` on the notebook's ``sys.stderr`` (a blocking run's: its cell's)."""
    sys.stderr.write(line + "\n")


class _Writer:
    """Stores accepted chunks from a thread of its own; after a failure, stops storing.

    ``put`` takes a snapshot of the chunk's results (one pickle: ``Store.pack``)
    and queues it: the caller hands the result objects on (to ``imap``'s loop,
    ``as_completed``, the user's ``on_chunk``), and whatever it does to them
    then must not change what is stored. The rest (SQLite, files) is this
    thread's: the thread that calls ``on_chunk`` must go back to its run at once. Measured with 400 items of 1 ms on 2 workers: committing
    in the local pool's manager loop (where ``on_chunk`` ran then) made the run
    40% slower (a commit is 0.5-2 ms on a busy disk, and the workers waited
    for their next chunk); from this thread, a few percent. Chunks that queue up while a commit runs
    go in the next transaction together, each as its own row (whole or absent),
    up to ``_BATCH_BYTES`` per transaction.

    What a ``kill -9`` loses is what is queued and the transaction being
    written, so both are bounded: a transaction holds at most ``_BATCH_BYTES``
    (or one chunk), and ``put`` waits while more than ``_QUEUE_BYTES`` are
    queued (large results that arrive faster than the disk takes them: 8 MB
    arrays at 40 MB/s had 56 items in the notebook and 12 in the store when
    the batch was unbounded; the queue held a copy of each, too).
    """

    def __init__(self, store: Store | None, run: bytes, name: str, say: Callable[[str], None] | None = None,
                 first_only: bool = False) -> None:
        self.store, self.run, self.name = store, run, name
        # A map's writer: queue only the items no run of this key in flight here queued already
        # (``_first_puts``; the runs are counted by ``_in_flight``). A cell's stores its ranks once.
        self.first_only = first_only
        # Where the line this thread says goes (see _waiting): the notebook's stderr, in the cell
        # of a blocking run; a background run's live area (``say_to``), never the cell running then.
        self.say: Callable[[str], None] = say or _to_stderr
        self.bytes = 0
        self.items = 0  # results queued to be stored (all stored once finish() returns without an error)
        self.error: BaseException | None = None
        self._queue: collections.deque = collections.deque()
        self._queued = 0  # bytes in _queue
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False  # finish() ran: a later put would start a thread nobody joins
        self._state = threading.Lock()  # put (the thread accepting chunks) against finish (the pump)
        self.waited = False  # another process's lock on the store held a write back (see _waiting)

    def _waiting(self) -> None:
        """A write waited ~1 s for another process's lock on the store: say so, once a run."""
        if not self.waited and self.store is not None:
            self.waited = True
            self.say(f"mpmagic: waiting for the checkpoint store {self.store.dir}, in use by another process…")

    def put(self, pairs: list[tuple[bytes, Any]]) -> None:
        """Queue ``(item key, result)`` pairs to be stored as one chunk, as they are now
        (waiting first while the queue holds more than ``_QUEUE_BYTES``); with
        ``first_only``, less the items a run of this key in flight here queued already.

        All under ``_state``, against ``finish``: a chunk is queued before finish's end
        mark, or dropped (a cancelled run's straggler, accepted after its run was
        settled) without counting as queued. Counted as queued, those items were left
        out by a copy of the call in flight then, and stored by neither."""
        if self.store is None or self.store.readonly or not pairs or self.error is not None:
            return
        with self._state:
            if self._closed:  # a chunk accepted after the run was settled (a cancelled run's straggler)
                log.debug("mpmagic: checkpoint: %d results came after the run ended; not stored", len(pairs))
                return
            if self.first_only:
                pairs = _first_puts(self.store.dir, self.run, pairs)
                if not pairs:
                    return
            packed = pack(pairs)  # before the caller gets the objects back
            size = _packed_bytes(packed)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="mpmagic-checkpoint")
                self._thread.start()
            with self._cond:
                while self._queued > _QUEUE_BYTES and self._queue and self.error is None:
                    self._cond.wait(1.0)
                self._queue.append((packed, size))
                self._queued += size
                self.items += len(pairs)
                self._cond.notify_all()

    def _take(self) -> tuple[list[Packed], bool]:
        """The next transaction's chunks (at least one, at most ``_BATCH_BYTES`` unless one
        chunk is more), and whether finish() asked to stop after them."""
        with self._cond:
            while not self._queue:
                self._cond.wait()
            chunks: list[Packed] = []
            batch = 0
            while self._queue and (not chunks or batch + self._queue[0][1] <= _BATCH_BYTES):
                packed, size = self._queue.popleft()
                self._queued -= size
                if packed is None:
                    self._cond.notify_all()
                    return chunks, True
                chunks.append(packed)
                batch += size
            self._cond.notify_all()
            return chunks, False

    def _run(self) -> None:
        done = False
        while not done:
            chunks, done = self._take()
            if self.error is not None or not chunks or self.store is None:
                continue
            try:
                self.bytes += self.store.put_packed(self.run, self.name, chunks, self._waiting)
            except Exception as exc:
                self.error = exc  # reported by finish(), in the notebook's thread
                with self._cond:
                    self._cond.notify_all()  # a put waiting for room: nothing more is stored

    def finish(self, warn: Callable[[str], None] = _warn) -> None:
        """Wait until every queued chunk is stored; warn if storing failed; apply the size cap.

        ``warn``: where the one-line warning goes (a background run's live area).
        """
        with self._state:
            self._closed = True
            thread, self._thread = self._thread, None
            if thread is not None:
                with self._cond:  # after every chunk put before it
                    self._queue.append((None, 0))
                    self._cond.notify_all()
        if thread is not None:
            try:
                thread.join()
            except KeyboardInterrupt as exc:  # nothing runs any more: only the store's writes were waited for
                where = self.store.dir if self.store is not None else "?"
                set_interrupt_outcome(exc, (
                    f"its work had finished and it was waiting for the checkpoint store {where}"
                    + (", in use by another process" if self.waited else "")
                    + "; its results not stored yet are stored when the store is free (nothing was stopped)"))
                raise
        if self.store is None or self.store.readonly:
            return
        if self.error is not None:
            warn(f"mpmagic: could not write to the checkpoint store {self.store.path} "
                 f"({type(self.error).__name__}: {self.error}); the rest of this run is not checkpointed")
            return
        try:
            gone = self.store.evict(max_bytes(), keep={self.run, *_writing()})
        except Exception as exc:
            log.warning("mpmagic: checkpoint eviction failed: %s", exc)
            return
        if gone:
            log.info("mpmagic: checkpoint store over its cap: evicted %s", ", ".join(gone))


def _packed_bytes(packed: Packed) -> int:
    """The bytes a queued chunk holds (its pickle, or its results' pickles and buffers)."""
    if packed.data is not None:
        return len(packed.data)
    return sum(len(inband) + sum(len(r) for r in raws) for _, inband, raws in packed.items)


def _load(store: Store | None, run: bytes, keys: list[bytes], index: KeyIndex | None = None) -> dict[bytes, Any]:
    if store is None or not keys:
        return {}
    try:
        return store.load(run, keys, index)
    except Exception as exc:
        _warn(f"mpmagic: could not read the checkpoint store {store.path} ({type(exc).__name__}: {exc}); "
              "computing every item")
        return {}


class _Plan:
    """Which items of the input are stored and which are computed, by original index."""

    def __init__(self) -> None:
        self.results: list = []  # by input index; a placeholder where computed
        self.keys: list[bytes] = []  # item key by input index
        self.missing: list[int] = []  # input indices sent to the core pmap, in order
        self.unstable: str | None = None  # first reason an item's key may not repeat
        self.edited: list[tuple[str, str]] = []  # the user's modules items named, edited since loaded (_check_edited)
        self.held: list[tuple[str, str, tuple[str, ...]]] = []  # ... holding names of a module reloaded since
        self.files = _KeyedFiles()  # the user's modules the items' keys cover (the run's: MapCheckpoint)
        # Who hears of stored items (a background run's as_completed, a stream,
        # the user's on_chunk): a lazy input's batches are planned in the thread
        # that reads the input while a listener may be joining from another.
        self._listeners: list[Callable[[int, list], None]] = []
        self._lock = threading.Lock()

    def add(self, items: list, store: Store | None, run: bytes, copy: bool = False,
            index: KeyIndex | None = None) -> list:
        """Key a batch of items, take what is stored, return the items to compute.

        ``index``: where the store has the run's keys, as the previous batch of a lazy
        input left it (``Store.load``): each batch reads only the chunks stored since.

        ``copy``: the items are sent later than now (a background run, a stream,
        a lazy input): return private copies in the keyed state
        (``checkpoint_keys.keyed_copy``), so that an item changed in place
        meanwhile is computed as it was keyed, never stored under a key of
        another state. An item without a key goes as it is, and is not stored.

        A batch whose items name a module of the user's (a class of ``shapes.py``)
        that changed on disk since the notebook loaded it has no keys: their key
        would follow the file, the code that computes them is the one loaded (as for
        the function: :func:`_check_edited`; ``settle`` says so once). So has a batch whose
        items name a module holding what it took from a module reloaded after it.
        """
        base = len(self.keys)
        key_all: Callable[[list, dict], list] = keyed_copies if copy else item_keys
        key_one: Callable[[Any, dict], tuple] = keyed_copy if copy else item_key
        used: dict[str, str] = {}
        try:
            triples = key_all(items, used)
        except Exception:  # one item does not pickle: key them one by one to find it
            triples = []
            for i, item in enumerate(items):
                try:
                    triples.append(key_one(item, used))
                except Exception as exc:  # unpicklable: the run itself will say so
                    log.debug("item %d has no key: %s", base + i, exc)
                    triples.append((b"", None, item))
        keys = [t[0] for t in triples]
        if used and (edited := _edited_modules(used)):
            keys = [b""] * len(keys)
            self.edited = self.edited or edited
        elif used and (held := held_from_reloaded(sorted(used))):
            keys = [b""] * len(keys)
            self.held = self.held or held
        elif used:  # stored only while their files stay as keyed
            self.files.add(used)
        if copy:
            items = [t[2] for t in triples]
        if self.unstable is None:
            for i, (_, data, *_rest) in enumerate(triples):
                if data is not None and (why := unstable_reason(data)):
                    self.unstable = f"item {base + i} {why}"
                    break
        found = _load(store, run, [k for k in keys if k], index)
        todo = []
        with self._lock:
            self.keys += keys
            for i, (item, key) in enumerate(zip(items, keys, strict=True)):
                if key and key in found:
                    self.results.append(found[key])
                else:
                    self.results.append(None)
                    self.missing.append(base + i)
                    todo.append(item)
            for listener in self._listeners:
                self._tell(listener, base, len(self.results))
        return todo

    def listen(self, listener: Callable[[int, list], None]) -> None:
        """Call ``listener(start, results)`` for each stretch of stored items, those
        found so far at once, those of later batches as they are planned."""
        with self._lock:
            self._listeners.append(listener)
            self._tell(listener, 0, len(self.results))

    def _tell(self, listener: Callable[[int, list], None], lo: int, hi: int) -> None:
        """The stored stretches among input positions [lo, hi) (the missing ones split them)."""
        k = bisect.bisect_left(self.missing, lo)
        pos = lo
        while pos < hi:
            gap = self.missing[k] if k < len(self.missing) and self.missing[k] < hi else hi
            if gap > pos:
                listener(pos, self.results[pos:gap])
            pos, k = gap + 1, k + 1


def _without_setup_line(run: str, what: str) -> str:
    """The warning of a checkpointed run that ran partly on workers without the setup (it failed there)."""
    return (f"mpmagic: --checkpoint: {what} of {run} came from workers that run without the %%pool setup "
            "(it failed there: see %pool), so they were not stored; a run once the setup works computes them")


def _other_code_line(run: str, what: str, modules: Iterable[str]) -> str:
    """The warning of a checkpointed run that ran partly on Dask workers whose copy of a user
    module is not the file the notebook loaded (another machine's), or that could not reload
    it (they run the version they had; the run's line before says which): not stored under its key."""
    names = sorted(set(modules))
    return (f"mpmagic: --checkpoint: {what} of {run} came from Dask workers whose {', '.join(names)} is not "
            f"the file the notebook loaded (their own copy, or an older version they could not reload: see the "
            f"line above), so they were not stored; copy the notebook's file{'s' * (len(names) != 1)} to those "
            f"workers' machines, or fix what the reload raised")


def _ranks_without_setup_line(ranks: tuple[int, ...]) -> str:
    """The warning of a checkpointed cell some of whose ranks ran on workers without the setup:
    those ranks by number (the others ran set up), and none of the cell's values stored (all or none)."""
    names = ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
    who = f"ranks {names} ran on workers" if len(ranks) > 1 else f"rank {names} ran on a worker"
    return (f"mpmagic: --checkpoint: {who} without the %%pool setup (it failed there: see %pool), so this "
            "cell's values were not stored; a run once the setup works computes them")


def _check_setup_files(run: str) -> None:
    """Raise ``ValueError`` (the run then goes without a checkpoint), after one warning,
    when a module of the user's that the worker setup imports changed on disk since a
    worker of the pool ran the setup.

    The key covers such a module by its file as it is now (``checkpoint_keys``), but
    a worker imported it when it ran the setup and runs that version until the pool
    restarts: its results would be stored under the new file's key, and found again
    after ``%pool restart`` (the old code's results where the new code's were due).
    So too after ``importlib.reload`` in the notebook, which the workers follow:
    the setup is not run again, so what it made from the module (``BASE =
    mymod.BASE``) stays the old file's, each run until the pool restarts.
    Read or stored, the run would mix versions: it runs as a plain one (as a run
    without ``--checkpoint`` would: the workers' version). The backend tells
    which records stand for its workers (``setup_workers``: the local pool's
    workers as each reported it ran the setup, a Dask cluster's one stamp
    taken as the notebook sent it the setup); where none tells (None), such
    a setup's run goes without the checkpoint too: a stale result stored
    silently is worse than one computed again.
    """
    if not worker_setup.has_setup():
        return
    from .pool import current_pool

    backend = current_pool()
    if backend is None or not backend.running:
        return  # (the run starts it: its new workers run the setup with the files as they are)
    workers = backend.setup_workers()
    connected = not backend.owns_workers  # a Dask cluster mpmagic only connected to
    advice = ("its workers keep that version until they restart where the cluster runs, which mpmagic cannot "
              "tell, so runs under this setup go without the checkpoint for the rest of the session "
              "(mpmagic's own cluster, %pool dask -n N, restarts with %pool restart)" if connected else
              "%pool restart runs the setup, and the file as it is now, in new workers")
    if workers is None:
        files = worker_setup.module_files()
        if not files:
            return
        names = ", ".join(os.path.basename(p) for p in files)
        _warn(f"mpmagic: --checkpoint: mpmagic has no record of the version of {names} the workers imported when "
              f"they ran the %%pool setup that imports {'it' if len(files) == 1 else 'them'}, so {run} runs "
              f"without the checkpoint (nothing read from it or stored); {advice}")
        raise ValueError("no record of the setup's modules the workers imported")
    changed = worker_setup.files_changed(workers)
    if not changed:
        return
    names = ", ".join(os.path.basename(p) for p in changed)
    _warn(f"mpmagic: --checkpoint: {names} changed on disk since the workers ran the %%pool setup that imports "
          f"{'it' if len(changed) == 1 else 'them'}, and they keep what the setup made of the version then "
          f"(a reload does not run the setup again), so {run} "
          f"runs without the checkpoint (nothing read from it or stored); {advice}")
    raise ValueError("the setup's modules changed since the workers ran it")


def _check_edited(run: str, used: dict[str, str]) -> None:
    """Raise ``ValueError`` (the run then goes without a checkpoint), after one warning,
    when a module of the user's that the key covers by its file (``used``: name -> file)
    changed on disk since the notebook loaded it, without a reload.

    The key follows the file, but the notebook runs the code it loaded, as do the
    workers that imported it then; a worker that imports it now runs the file's.
    Stored, the run's results (the old code's, as the serial map's) went under the
    edited file's key, and the reload the warning asks for (or a new kernel) then
    resumed them: the old code's results where the new code's were due. Read, a
    result stored under that key would be the new code's where the notebook runs
    the old. So nothing is read or stored, as for a module the ``%%pool setup``
    imports (:func:`_check_setup_files`); after the reload the key's results are
    the new code's (the workers reload it before their next task).

    The same when such a module holds what it took, when it was loaded, from a module of the
    user's reloaded after it (``from cfg import THRESHOLD``, then cfg.py edited and only
    ``cfg`` reloaded: ``checkpoint_keys.held_from_reloaded``): the notebook and the workers
    that imported it run the old names, a new kernel the new ones, under one key.
    """
    edited = _edited_modules(used) if used else []
    if edited:
        _warn(_edited_line(edited, "", f"{run} runs without the checkpoint (nothing read from it or stored)"))
        raise ValueError("the user's modules changed on disk since the notebook loaded them")
    held = held_from_reloaded(sorted(used)) if used else []
    if held:
        _warn(_held_line(held, "", f"{run} runs without the checkpoint (nothing read from it or stored)"))
        raise ValueError("the user's modules hold names of modules reloaded after them")


def _edited_modules(used: dict[str, str]) -> list[tuple[str, str]]:
    """Of the user's modules a key covers by their file (name -> file), those edited since
    the notebook loaded them, as ``(module, file name)`` (``warmup.edited_for_checkpoint``)."""
    from . import warmup

    return warmup.edited_for_checkpoint(sorted(used))


def _edited_line(edited: list[tuple[str, str]], who: str, what: str) -> str:
    """The warning of a checkpointed run (``who``: what names the modules, if not the run)
    some of whose user's modules (``edited``) changed on disk since the notebook loaded them."""
    files = ", ".join(f for _, f in edited)
    reload = " and ".join(f"importlib.reload({name})" for name, _ in edited)
    it = "it" if len(edited) == 1 else "them"
    changed = f"changed on disk since the notebook loaded {it}"
    return (f"mpmagic: --checkpoint: {f'{who} {files}, {changed}' if who else f'{files} {changed}'}, so {what}: "
            f"the notebook, and the workers that imported {it}, run the version loaded then, "
            f"a worker that loads {it} now runs the file's, and the key would be the file's; {reload} to run "
            "one version, which the checkpoint keeps")


def _held_line(held: list[tuple[str, str, tuple[str, ...]]], who: str, what: str) -> str:
    """The warning of a checkpointed run (``who``: what names the modules, if not the run) some
    of whose user's modules hold what they took from a module reloaded after them (``held``:
    ``(module, reloaded module, names)``, ``checkpoint_keys.held_from_reloaded``)."""
    def file(name: str) -> str:
        return os.path.basename(getattr(sys.modules.get(name), "__file__", None) or name)

    mods = list(dict.fromkeys(name for name, _, _ in held))
    parts = []
    for name, other, took in held:
        how = f"took {', '.join(took)} from" if took else "used"
        parts.append(f"{file(name)} {how} {file(other)} when it was loaded, before {other} was reloaded")
    it = "it" if len(mods) == 1 else "them"
    reload = " and ".join(f"importlib.reload({name})" for name in mods)
    named = f"{who} {', '.join(file(m) for m in mods)}; " if who else ""
    return (f"mpmagic: --checkpoint: {named}{', and '.join(parts)}, so {what}: the notebook, and the workers "
            f"that imported {it}, hold what {it} took then, a worker that loads {it} now takes what the files "
            f"give, and the key would be the files'; {reload} to run one version, which the checkpoint keeps")


_CHANGED = (-1, -1, -1)  # a file's signature that no file has: it changed before it was noted


class _KeyedFiles:
    """The files of the user's modules a checkpointed run's keys cover, as they were when keyed,
    and whether one changed since (:meth:`unchanged`, asked before each chunk is stored).

    Why: a key covers such a file by its contents at the run's start, when it was still the
    version the notebook loaded (:func:`_check_edited`). A worker that imports it later
    (recycled by ``max_tasks_per_child``, added by ``%pool resize``, replacing a dead one)
    runs the file as it is then: saved meanwhile with new code, that worker's results are
    the new code's, where the notebook and serial Python run the old. Stored under the old
    file's key, they came back for good: the old file back, or a new kernel, "resumed" them.
    A worker imports a file before its results come home, so a file still as keyed when a
    chunk arrives was as keyed when each of its items ran. Once one changed, nothing more
    of the run is stored, the chunks of workers that still run the old code too: which
    worker ran which version is only known in the local pool, and a reload or a new kernel
    gives a new key anyway (only the old file back, unchanged, would find them again).

    The signature is the file's ``(mtime_ns, size, inode)`` (``loadstamps.signature``):
    an ``os.stat`` per file per chunk, ~1 us each (and nothing for a run that uses none).
    Items are keyed in batches (a lazy input's during the run): their modules join as keyed.
    """

    def __init__(self) -> None:
        # file -> (module, its signature when keyed); replaced whole when one joins: read meanwhile
        # by the thread that stores chunks (a background run's, a stream's: the pool's manager)
        self._files: dict[str, tuple[str, tuple[int, int, int] | None]] = {}
        self.changed: tuple[str, str] | None = None  # the first found changed: (module, file's base name)
        self.held_back = 0  # results not stored since

    def add(self, used: dict[str, str]) -> None:
        """Note the files of ``used`` (module -> file, as a key covers them) not noted yet, as
        they are now; one that is no longer the version the notebook loaded counts as changed
        (it changed since ``_check_edited`` looked, or the item batch's check, ``_Plan.add``)."""
        new: dict[str, tuple[str, tuple[int, int, int] | None]] = {}
        for name, path in used.items():
            if path in self._files or path in new:
                continue
            sig = loadstamps.signature(path)
            at_load = loadstamps.loaded(name, sys.modules.get(name))
            new[path] = (name, _CHANGED if sig is not None and at_load is not None and sig[:2] != at_load[0]
                         else sig)
        if new:
            self._files = {**self._files, **new}

    def unchanged(self) -> bool:
        """Is every noted file still as it was noted? False for good once one is not."""
        if self.changed is not None:
            return False
        for path, (name, sig) in self._files.items():
            if loadstamps.signature(path) != sig:
                self.changed = (name, os.path.basename(path))
                return False
        return True


def _changed_line(run: str, changed: tuple[str, str], what: str) -> str:
    """The warning of a checkpointed run (``run``: "this run of `f`", "this cell") during which
    a user's module file its key covers (``changed``: module, file name) changed on disk."""
    name, file = changed
    return (f"mpmagic: --checkpoint: {file} changed on disk while {run} went on, so {what}: a worker that "
            f"imported it since runs the file's new code, the notebook the version it loaded, and the key is "
            f"the old file's; importlib.reload({name}) (or restart the kernel) and run it again to compute and "
            "store them with one version")


def _setup_changed_line(run: str, what: str) -> str:
    """The warning of a checkpointed run whose worker setup changed between its keying and its start."""
    return (f"mpmagic: --checkpoint: the worker setup changed while {run} started, so it ran under the new "
            f"setup and {what} were not stored; run it again to store them")


def _say_other_runs(store: Store, name: str, run: bytes) -> None:
    """Warn, once for the run (in its keying: the user's line), when its key has nothing
    stored while runs of a function of its name are: it resumes nothing. The function's
    code, what it captures or the worker setup changed since (its key covers them all),
    so the stored results are not what this code computes, as serially they would not
    be; without this line nothing said why a re-run computed everything (under -q, no
    report). The key is one hash: which of them changed cannot be told from the store.
    A warning as the checkpoint's others (-q hides only the report)."""
    others = store.other_runs(name, run)
    if others:
        _warn(f"mpmagic: --checkpoint: this run of `{name}` resumes nothing: the store in {store.dir} holds "
              f"{others} run{'s' * (others != 1)} of a function named `{name}` under other code, captured values "
              f"or worker setup, whose results are not this code's; %pool checkpoints lists them, "
              f"%pool checkpoints clear {name} deletes them")


class MapCheckpoint:
    """One checkpointed map, whoever runs it: a blocking ``pmap``, a background
    run (``background.start``, as its ``resume``) or a stream (``imap``).

    It keys the run and the items, takes what the store has (``todo`` gives
    the items to compute), stores each accepted chunk of the computed ones
    (``on_chunk``, from the thread that waits on the run; a stream's from
    the local pool's manager; a ``_Writer`` thread commits), and puts the
    whole result back together in input order (``value``).

    Raises ``ValueError`` when the function has no key (it does not pickle):
    the caller then runs the map without a checkpoint, whose own error says why;
    and when the store cannot be opened (after the warning that says so).
    """

    def __init__(self, func: Callable, iterables: tuple, *, star: bool, errors: str, location: Any,
                 on_chunk: Callable[[int, list], None] | None = None, background: bool = False) -> None:
        if len(iterables) == 1:
            self.items, self.star = iterables[0], star
        else:
            self.items, self.star = zip(*iterables, strict=False), True
        self.iterables = iterables  # (to name one that another thread is running: see _lazy)
        self.name = stored_name(func)
        # The worker setup the key covers (read before it): results are stored only
        # while it is still the setup (``_same_setup``).
        self.setup_version = worker_setup.version()
        self._setup_changed = False
        self._without_setup = 0  # results computed on workers whose setup failed: not stored
        self._other_code = 0  # results computed from a Dask worker's other copy of a user module: not stored
        self._other_modules: set[str] = set()  # those modules
        _check_setup_files(f"this run of `{self.name}`")
        used: dict[str, str] = {}
        try:
            self.run, run_pickle = run_key(func, self.star, used)
        except Exception as exc:  # cannot be pickled: the plain run raises its clear error
            log.debug("no run key for %s: %s", self.name, exc)
            raise ValueError(f"no checkpoint key for {self.name}") from exc
        _check_edited(f"this run of `{self.name}`", used)
        store = open_store(location)
        if store is None:  # (it warned) a plain run then: its report claims no checkpoint
            raise ValueError(f"no checkpoint store for {self.name}")
        self.store: Store = store
        _readonly_note(self.store)
        if (why := unstable_reason(run_pickle)) is not None:
            _warn(f"mpmagic: --checkpoint: what `{self.name}` captures {why}; a new kernel will compute its items "
                  "again. Capture a sorted tuple instead, or fix PYTHONHASHSEED")
        _say_other_runs(self.store, self.name, self.run)
        self.collect = errors == "collect"
        self.user_on_chunk = on_chunk
        # Items are sent while the notebook goes on (it may change them in place):
        # the plan keeps copies of them as keyed (``_Plan.add``).
        self.background = background
        self.writer = _Writer(self.store, self.run, self.name, first_only=True)
        self.plan = _Plan()
        self.plan.files.add(used)  # results are stored only while these files stay as keyed
        _in_flight(self.run, +1)  # the size cap never evicts a run still being written
        self._settled = False
        self._stopped = False  # cancelled: the user's on_chunk is not called any more (stop)
        self._placed: set[int] = set()  # ids of the Failed results already renumbered (kept alive by the run)
        # Item keys of the results handed to the writer (stored by it, or by a run of this key in
        # flight that queued them first): what ``kept`` counts, by the input places they answer
        # (a blocking run's interrupt line: a background run or a stream needs none of them)
        self._offered: set[bytes] = set()
        self.lead = 0.0  # seconds spent keying and looking up before a background run started

    # -- before the run ----------------------------------------------------------
    def todo(self) -> tuple[Iterable, bool]:
        """The items to compute (lazily for a lazy input), and whether there is any."""
        if type(self.items) in (list, tuple, range):
            todo = self.plan.add(list(self.items), self.store, self.run, copy=self.background)
            return todo, bool(todo)
        return _lazy(iter(self.items), self.plan, self.store, self.run, read_first=not self.background,
                     iterables=self.iterables)

    @property
    def resumed(self) -> int:
        """Items taken from the store so far (all of them once the input is read)."""
        return len(self.plan.results) - len(self.plan.missing)

    @property
    def total(self) -> int:
        return len(self.plan.results)

    def stored_segments(self, emit: Callable[[int, list], None]) -> None:
        """Call ``emit(start, results)`` (start: input position) for every stretch of stored
        items found so far, and from now on for those a lazy input's later batches find."""
        self.plan.listen(emit)

    # -- while it runs (the thread accepting chunks) -----------------------------
    def on_chunk(self, start: int, results: list) -> None:
        """A chunk of computed results (``start`` counts in the computed items): store it."""
        plan = self.plan
        positions = plan.missing[start : start + len(results)]
        keys = [plan.keys[i] for i in positions]
        if not self._same_setup():
            keys = [b""] * len(keys)  # (an item without a key is not stored)
        elif not plan.files.unchanged():  # a user's module saved since: a worker may run its new code
            plan.files.held_back += sum(1 for r in results if not isinstance(r, Failed))
            keys = [b""] * len(keys)
        elif isinstance(results, WithoutSetup):  # not what the setup in the key gives: not stored
            self._without_setup += len(results)
            keys = [b""] * len(keys)
        elif isinstance(results, OtherCode):  # not what the notebook's files in the key give: not stored
            self._other_code += len(results)
            self._other_modules.update(results.modules)
            keys = [b""] * len(keys)
        if self.collect:  # only then can a result be a Failed: never stored
            pairs = [(k, r) for k, r in zip(keys, results, strict=True) if k and not isinstance(r, Failed)]
            for idx, r in zip(positions, results, strict=True):  # a stream hands these on as they are
                if isinstance(r, Failed):
                    self._place(r, idx)
        else:
            pairs = [(k, r) for k, r in zip(keys, results, strict=True) if k]
        self.writer.put(pairs)
        if not self.background:
            self._offered.update(k for k, _ in pairs)
        if self.user_on_chunk is not None and not self._stopped:  # in input positions, each consecutive stretch
            for first, part in _stretches(positions, results):
                self.user_on_chunk(first, part)

    def _same_setup(self) -> bool:
        """Is the worker setup still the one the run's key covers?

        A setup is never changed while a run is in flight (``setup_api``), but
        it may change between keying and the run's start (another thread):
        the run then computes everything under the new setup, and its results
        must not go under the old setup's key. They are not stored (settle says so).
        """
        if worker_setup.version() == self.setup_version:
            return True
        self._setup_changed = True
        return False

    def say_to(self, warn: Callable[[str], None]) -> None:
        """A background run's lines said while it runs (the store held by another process)
        go to ``warn`` (its live area): the writer's thread wrote them on ``sys.stderr``, in
        whichever cell ran then."""
        self.writer.say = warn

    # -- after it --------------------------------------------------------------------
    def settle(self, warn: Callable[[str], None] | None = None) -> None:
        """The run ended (however): wait until every accepted chunk is stored; warn once if
        storing failed or an item's key may not repeat. Safe to call twice."""
        if self._settled:
            return
        self._settled = True
        try:
            self.writer.finish(warn or _warn)
        finally:
            _in_flight(self.run, -1)
        files = self.plan.files
        if files.changed is not None and files.held_back:
            n = files.held_back
            (warn or _warn)(_changed_line(f"this run of `{self.name}`", files.changed,
                                          f"{'its result' if n == 1 else f'its {n} results'} that came after "
                                          f"{'was' if n == 1 else 'were'} not stored"))
        if self._setup_changed:
            (warn or _warn)(_setup_changed_line(f"this run of `{self.name}`", "its results"))
        elif self._without_setup:
            n = self._without_setup
            (warn or _warn)(_without_setup_line(f"this run of `{self.name}`", f"{n} result{'s' * (n != 1)}"))
        if self._other_code:
            n = self._other_code
            (warn or _warn)(_other_code_line(f"this run of `{self.name}`", f"{n} result{'s' * (n != 1)}",
                                             self._other_modules))
        if self.plan.unstable:
            (warn or _warn)(f"mpmagic: --checkpoint: {self.plan.unstable}; a new kernel will compute such items "
                            "again. Use sorted tuples instead of sets in items, or fix PYTHONHASHSEED")
        if self.plan.edited:
            (warn or _warn)(_edited_line(self.plan.edited, f"items of this run of `{self.name}` name",
                                         "they were computed without the checkpoint (not read from it nor stored)"))
        elif self.plan.held:
            (warn or _warn)(_held_line(self.plan.held, f"items of this run of `{self.name}` name",
                                       "they were computed without the checkpoint (not read from it nor stored)"))

    def value(self, computed: list) -> list:
        """The whole input's results in input order: stored ones and ``computed`` (the missing ones')."""
        results = self.plan.results
        missing = self.plan.missing
        for j, idx in enumerate(missing):
            r = computed[j]
            if isinstance(r, Failed):
                self._place(r, idx)
            results[idx] = r
        return results

    def _place(self, failed: Failed, idx: int) -> None:
        """Make ``failed`` (of the computed items) name input position ``idx``, once
        (``on_chunk`` and ``value`` both see it)."""
        if id(failed) in self._placed:
            return
        self._placed.add(id(failed))
        failed.index = idx
        if failed.info is not None:  # (last_failures() and %pdebug read it: debugging.renumber_last leaves it)
            failed.info.index = idx
        _renumber(failed.error, self.plan.missing)

    def failed(self, exc: BaseException, report: Any = None) -> None:
        """The run raised ``exc``: make "item N" in it, and in the run's ``report`` (None:
        the run made none), count in the whole input, the stored items among those done."""
        _renumber(exc, self.plan.missing)
        drop_read_past_note(exc)  # (the inner run's counts in this checkpoint's iterator of missing items)
        if report is not None:
            missing = self.plan.missing
            if report.failed_at is not None and 0 <= report.failed_at < len(missing):
                report.failed_at = missing[report.failed_at]
            report.items += self.resumed
            if report.total is not None:
                report.total = self.total
            _in_input(report, missing)
            report.extra["checkpoint"] = {"resumed": self.resumed, "total": self.total,
                                          "computed": self.total - self.resumed}
            read, at = len(self.plan.keys), report.failed_at
            if at is not None and read > at + 1 and (words := read_past(self.iterables, read,
                                                                        f", past item {at}, which failed")):
                add_note(exc, f"mpmagic: {MAKE_INPUT_AGAIN} ({words})")  # (as a plain run's: MapJob.read_past_line)

    def kept(self) -> str:
        """After ``settle``: what the store keeps of this run, as the clause an
        interrupt's line ends with ("" when nothing could be stored: the store is
        read-only or a write failed, as settle warned)."""
        writer = self.writer
        if writer.store is None or writer.store.readonly or writer.error is not None:
            return ""
        # By the input's places, not the results stored: a result answers each place of its
        # item, stored or computed, and a copy of the call in flight may have stored it.
        # (By the results, range(8) + [0, 1, 2, 3] interrupted after 0-3 said "keeps 4 of 12
        # items: the same call again computes only the other 8", and it computed 4.)
        plan = self.plan
        missing = set(plan.missing)
        stored = self._offered.union(k for i, k in enumerate(plan.keys) if i not in missing)  # (+ the resumed)
        kept = sum(1 for k in plan.keys if k and k in stored)
        if type(self.items) not in (list, tuple, range):  # (a lazy input: its length is unknown)
            return (f"; its checkpoint keeps the results of {kept} item{'s' * (kept != 1)}: the same call again "
                    f"computes only the others{self._read_past()}") if kept else \
                "; no item of it had finished, so its checkpoint keeps none"
        total = self.total
        if not kept:
            return "; no item of it had finished, so its checkpoint keeps none"
        if kept >= total:
            if total == 1:
                return "; its checkpoint keeps the result of its one item: the same call again computes none"
            return f"; its checkpoint keeps the results of all its {total} items: the same call again computes none"
        return (f"; its checkpoint keeps the results of {kept} of its {total} items: the same call again computes "
                f"only the other {total - kept}")

    def _read_past(self) -> str:
        """The end of an interrupted run's line when its input is an iterator (a generator):
        the run read it in batches, ahead of what finished, and the same iterator given
        again goes on from where it was read, not from what finished: the items read and
        not computed were silently missing from the next result. A list, a range or an
        array is read anew by each run, as by serial ``map`` (the words: ``jobs.read_past``)."""
        words = read_past(self.iterables, len(self.plan.keys))
        return f", over its input made again ({words})" if words else ""

    def stop(self) -> None:
        """The run is being cancelled: chunks still arriving are stored, and the user's
        ``on_chunk`` is not called for them (``cancel()`` returns at once)."""
        self._stopped = True

    def amend(self, report: Any, wall: float, set_report: Callable[[Any], None] | None = None) -> Any:
        """The run's report (None if nothing ran: one is made) covering the whole input;
        ``wall`` counts from the start of the backend's run, ``lead`` is added."""
        if report is not None:
            _in_input(report, self.plan.missing)
        return _amend_report(report, set_report or (lambda r: None), "pmap", self.total, self.resumed,
                             wall + self.lead)


class StreamCheckpoint(MapCheckpoint):
    """A checkpointed ``imap``: the stream yields stored items too, in its order.

    Ordered, the stream's reader puts each stretch of computed results (in
    the computed items' numbering) in input order with the stored items
    before it (``in_input_order``), and the stored items after the last
    computed one at the end (``stored_until``). Unordered, stored items come
    first, as they are found (``stored_segments``). The job itself keeps no
    results, so ``value`` has nothing to merge.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, background=True, **kwargs)
        self._cursor = 0  # the next input position the ordered stream yields
        # A stream's failed items stand in its chunks whatever its errors option (those of
        # errors="raise" are raised at their place: streaming.StreamJob): never stored, and
        # each names its place in the whole input.
        self.collect = True

    def value(self, computed: list) -> list:
        return computed

    def in_input_order(self, first: int, computed: list) -> list:
        """``computed`` (the results of computed items ``first``, ``first + 1``...) with the
        stored items before each, in input order. Called by one consumer, in order."""
        if not computed:
            return computed
        missing, pos = self.plan.missing, self._cursor
        last = first + len(computed) - 1
        if missing[first] == pos and missing[last] == pos + len(computed) - 1:  # nothing stored in between
            self._cursor = pos + len(computed)
            return computed
        results = self.plan.results
        out: list = []
        for j, r in enumerate(computed, first):
            idx = missing[j]
            if idx > pos:
                out.extend(results[pos:idx])
            out.append(r)
            pos = idx + 1
        self._cursor = pos
        return out

    def stored_until(self, next_computed: int) -> list:
        """The stored items from the stream's position up to computed item ``next_computed``
        (the first the stream has not yielded): all the rest once every computed item
        was yielded (the job read the whole input by then); after a failure, those
        before the first item that did not come."""
        missing = self.plan.missing
        hi = missing[next_computed] if next_computed < len(missing) else len(self.plan.results)
        if hi <= self._cursor:
            return []
        out = self.plan.results[self._cursor : hi]
        self._cursor = hi
        return out


def _stretches(positions: list[int], results: list) -> Iterable[tuple[int, list]]:
    """``(first position, results)`` for each run of consecutive positions."""
    i = 0
    while i < len(positions):
        j = i + 1
        while j < len(positions) and positions[j] == positions[j - 1] + 1:
            j += 1
        yield positions[i], results[i:j]
        i = j


_active: dict[bytes, int] = {}  # run key -> checkpointed runs writing it now (in this process)
_active_lock = threading.Lock()
# (Store folder, run key) -> item keys put there by the runs of that key in flight (in
# this process): kept while one is, so that equal items of one input, and two copies of
# one call running at once, store each result once (they stored it as often as it was
# computed: [7] * 20 stored 20 rows-worth, two copies of a 50-item call 100 items). By
# folder too: two copies of one call into two folders each store every result (by run
# key alone, the second folder kept none of the items the first had stored).
_put: dict[tuple[Path, bytes], set[bytes]] = {}


def _in_flight(run: bytes, delta: int) -> None:
    with _active_lock:
        n = _active.get(run, 0) + delta
        if n > 0:
            _active[run] = n
        else:
            _active.pop(run, None)
            for where in [where for where in _put if where[1] == run]:
                del _put[where]


def _first_puts(folder: Path, run: bytes, pairs: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any]]:
    """``pairs`` less the item keys a run of key ``run`` in flight here has put in ``folder`` already."""
    out = []
    with _active_lock:
        seen = _put.setdefault((folder, run), set())
        for pair in pairs:
            if pair[0] not in seen:
                seen.add(pair[0])
                out.append(pair)
    return out


def _forget_puts(folder: Path) -> None:
    """A clear in ``folder`` deleted what the runs in flight here had put there: their item
    keys no longer count as stored, so a copy of the call started since (or the run itself)
    stores them again. Kept, that copy computed the cleared items and stored none of them."""
    with _active_lock:
        for where in [where for where in _put if where[0] == folder]:
            del _put[where]


def _writing() -> set[bytes]:
    with _active_lock:
        return set(_active)


def checkpointed_pmap(
    core: Callable[..., list],
    func: Callable,
    iterables: tuple,
    *,
    star: bool,
    errors: str,
    location: Any,
    show_report: bool,
    set_report: Callable[[Any], None],
    get_report: Callable[[], Any],
    kwargs: dict[str, Any],
    on_chunk: Callable[[int, list], None] | None = None,
) -> list:
    """``core(func, items, ...)`` on the items the store does not have; the rest from the store.

    ``core`` is the plain ``api.pmap`` (called without ``checkpoint``);
    ``set_report``/``get_report`` reach its last report, which this amends
    (items, wall, how many were resumed). ``on_chunk(start, results)`` gets
    every item once, in input positions: stored stretches before the run,
    computed chunks as they are accepted.
    """
    __tracebackhide__ = True
    t0 = time.perf_counter()
    try:
        ck = MapCheckpoint(func, iterables, star=star, errors=errors, location=location, on_chunk=on_chunk)
    except ValueError:
        return core(func, *iterables, star=star, errors=errors, show_report=show_report, on_chunk=on_chunk, **kwargs)
    computed: list = []
    try:
        todo, pending = ck.todo()
        if on_chunk is not None:
            ck.stored_segments(on_chunk)
        if not pending:
            _nothing_ran("item", kwargs)
        if pending:
            before = get_report()
            try:
                computed = core(func, todo, star=ck.star, errors=errors, on_chunk=ck.on_chunk, **kwargs)
            except KeyboardInterrupt as exc:
                # The chunks that came are stored first (a second interrupt there says so itself);
                # then the line says what the checkpoint keeps, which the plain run's cannot know.
                ck.settle()
                set_interrupt_outcome(exc, (interrupt_outcome(exc) or STOPPED_OUTCOME) + ck.kept())
                raise run_interrupted("mpmagic.pmap", exc) from None
            except Exception as exc:
                ran = get_report()  # (the core run's, unless it raised before it made one)
                ck.failed(exc, ran if ran is not before else None)
                raise
            finally:
                debugging.renumber_last(ck.plan.missing)  # %pdebug N and last_failures() count in the whole input
    finally:
        ck.settle()
    results = ck.value(computed)
    ck.amend(get_report() if pending else None, time.perf_counter() - t0, set_report)
    if show_report:
        print(get_report().line())
    return results


def checkpointed_submit(
    start: Callable[..., Any],
    func: Callable,
    iterables: tuple,
    *,
    star: bool,
    errors: str,
    location: Any,
    what: str,
    on_chunk: Callable[[int, list], None] | None = None,
    show_report: bool = True,
) -> Any:
    """A background checkpointed map: the handle (``background.Run``) at once.

    ``start(func, iterables, star, on_chunk=..., resume=...)`` is the plain
    background start of ``api.pmap``; the run computes only the items the
    store lacks, each accepted chunk is stored as in a blocking run, and its
    ``result()`` is the whole input's. A run over a list (tuple, range) whose
    items are all stored computes nothing: its handle is done at once. A lazy
    input is keyed by the run's own thread as it reads it (``_lazy``): the
    handle comes back at once however slow the input.
    """
    __tracebackhide__ = True
    from . import background

    t0 = time.perf_counter()
    try:
        ck = MapCheckpoint(func, iterables, star=star, errors=errors, location=location, on_chunk=on_chunk,
                           background=True)
    except ValueError:
        return start(func, iterables, star, on_chunk=on_chunk)
    try:
        todo, pending = ck.todo()
    except BaseException:
        ck.settle()
        raise
    if on_chunk is not None:  # the user's on_chunk hears of every item once, stored ones first
        ck.stored_segments(on_chunk)
    if not pending:
        ck.settle()
        report = ck.amend(None, time.perf_counter() - t0)
        return background.finished(what, "map", ck.value([]), report, resume=ck, show_report=show_report)
    ck.lead = time.perf_counter() - t0  # the handle's clock starts now: the report's wall includes this
    try:
        return start(func, (todo,), ck.star, on_chunk=ck.on_chunk, resume=ck)
    except BaseException:
        ck.settle()
        raise


def _lazy(it: Any, plan: _Plan, store: Store | None, run: bytes, read_first: bool = True,
          iterables: tuple = ()) -> tuple[Iterable, bool]:
    """The missing items of a lazy input, keyed and looked up batch by batch as the core pmap pulls them.

    ``read_first`` (a blocking run): the input is read up to its first missing
    item here, before the run starts, so a fully stored input never starts the
    pool. A background run or a stream reads nothing here: its input is read by
    the thread that waits on the run, however slow or blocking it is (a queue
    the notebook fills after the start), and the handle comes back at once.

    When the input raises, the items read before the error are computed (and
    stored) first, then the error is raised, as serial map does.
    """

    def batches() -> Iterator[list]:
        done, n_read = False, 0
        last: list = []
        index = KeyIndex()  # (each stored chunk's keys read once, not once per batch; freed with the input)
        while not done:
            batch: list = []
            error: BaseException | None = None
            try:
                done = read_into(batch, it, _LAZY_BATCH)  # (stops after 20 ms with what it has: a slow input)
            except BaseException as exc:  # the input's own error: after the items it gave
                if not input_raised_it(exc):  # (Ctrl-C, in the main thread)
                    raise
                error, done = exc, True
                if advanced_elsewhere(exc):  # (another run, the loop or a thread is inside the generator)
                    error = shared_generator_error(iterables or (it,))
            if (reused := read_ahead_refusal(it, n_read, last, batch)) is not None:  # a reused buffer, an iterator: loud
                keep, error = reused
                batch, done = batch[:keep], True
            n_read, last = n_read + len(batch), batch[-2:]
            if batch:
                yield plan.add(batch, store, run, copy=True, index=index)
            if error is not None:
                raise error

    missing = batches()
    if not read_first:
        return itertools.chain.from_iterable(missing), True
    for first in missing:
        if first:
            return itertools.chain(first, itertools.chain.from_iterable(missing)), True
    return iter(()), False


def _in_input(report: Any, missing: list[int]) -> None:
    """Make the items a run over the ``missing`` items names in its ``report`` (those that
    ran again, the slowest chunk, the insights' slowest items and chunks) count in the whole input."""
    report.ran_again = tuple(missing[i] for i in report.ran_again if 0 <= i < len(missing))
    if report.slowest_where:  # "item 3", "the chunk of items 3-5"
        report.slowest_where = re.sub(r"\d+", lambda m: str(missing[int(m.group())]) if int(m.group()) < len(missing)
                                      else m.group(), report.slowest_where)
    if report.insights is not None:
        report.insights.renumber(missing)


def _nothing_ran(what: str, kwargs: dict[str, Any]) -> None:
    """Every item (rank) came from the store: one line naming the options given that
    act on a run (``compare``, ``insights``), since none ran, so that they are not
    silently ignored. (A partial resume compares and times the items computed.)"""
    given = [f"{name}=True (--{name})" for name in ("compare", "insights") if kwargs.get(name)]
    if given:
        sys.stderr.write(f"mpmagic: every {what} came from the checkpoint, so nothing ran here or in the workers: "
                         f"{' and '.join(given)} had nothing to act on; "
                         "run without the checkpoint (checkpoint=False, --no-checkpoint) to compute them again\n")


def _amend_report(
    report: Any, set_report: Callable[[Any], None], kind: str, total: int, resumed: int, wall: float
) -> Any:
    """The run's report, covering the whole input and saying how much came from the store
    (made if nothing ran, and then handed to ``set_report``)."""
    from .report import Report

    if report is None:  # nothing was computed: no core run, no pool
        report = Report(kind=kind, items=total, workers=0, backend="checkpoint", start_method=None,
                        wall=wall, task_seconds=0.0, advice_enabled=False)
        set_report(report)
    report.items = total
    report.wall = wall
    report.extra["checkpoint"] = {"resumed": resumed, "total": total, "computed": total - resumed}
    return report


class CellCheckpoint:
    """One checkpointed ``%%parallel`` cell (blocking or ``--bg``): its key, the ranks' stored values.

    The ranks of a cell may talk to each other (queues, locks), so one rank
    cannot run alone: the cell is taken from the store when every rank's
    value is there (``complete``), and run whole otherwise, its ranks' values
    stored once it succeeded. Raises ``ValueError`` when the cell has no key
    (a syntax error, an unpicklable name): the plain run then says which; and
    when the store cannot be opened (after the warning that says so).
    """

    def __init__(self, code: str, *, size: int, namespace: dict[str, Any], gather: tuple, location: Any,
                 seed: int | None = None) -> None:
        from .cell import leave_out_unpicklable, make_cell_spec

        self.size, self.gather = size, tuple(gather)
        self.setup_version = worker_setup.version()  # (as MapCheckpoint's: the setup the key covers)
        _check_setup_files("this cell")
        used: dict[str, str] = {}
        try:
            spec = make_cell_spec(code, namespace, self.gather)
            # --gather names are the cell's outputs: their last values (put in the
            # notebook by the previous run) are not inputs of this one.
            names = {k: v for k, v in spec.names.items() if k not in gather}
            try:
                self.run, run_pickle = cell_key(code, names, spec.modules, self.gather, size, seed, used, spec.last_assign)
            except Exception:
                # Values the cell assigns that cannot be pickled: the ranks start without
                # them (cell.leave_out_unpicklable), so the key does not cover them either.
                if not leave_out_unpicklable(spec):
                    raise
                names = {k: v for k, v in spec.names.items() if k not in gather}
                used.clear()
                self.run, run_pickle = cell_key(code, names, spec.modules, self.gather, size, seed, used, spec.last_assign)
        except Exception as exc:
            log.debug("no key for the cell: %s", exc)
            raise ValueError("no checkpoint key for the cell") from exc
        _check_edited("this cell", used)
        self.files = _KeyedFiles()  # the ranks' values are stored only while these stay as keyed
        self.files.add(used)
        self.store = open_store(location)
        if self.store is None:  # (it warned) the cell runs as a plain one
            raise ValueError("no checkpoint store for the cell")
        _readonly_note(self.store)
        if (why := unstable_reason(run_pickle)) is not None:
            _warn(f"mpmagic: --checkpoint: what the cell reads {why}; a new kernel will run it again")
        self.rank_keys = [item_key(f"rank {r}")[0] for r in range(size)]
        self.found = _load(self.store, self.run, self.rank_keys)
        self.name = "%%parallel: " + (code.strip().splitlines() or [""])[0][:40]
        self._warn: Callable[[str], None] = _warn
        self._say: Callable[[str], None] | None = None  # a background run's live area (say_to)

    @property
    def complete(self) -> bool:
        """Is every rank's value stored (so the cell need not run)?"""
        return len(self.found) == self.size

    @property
    def resumed(self) -> int:
        return self.size if self.complete else 0

    def stored_values(self) -> Any:
        """The ranks' values (and gathered names) from the store; only when ``complete``."""
        from .report import RankValues

        values = RankValues(v for v, _ in (self.found[k] for k in self.rank_keys))
        values.gathered = {g: [self.found[k][1].get(g) for k in self.rank_keys] for g in self.gather}
        return values

    def stored_segments(self, emit: Callable[[int, list], None]) -> None:
        """(A cell's handle has no ``as_completed``: nothing to tell.)"""

    def say_to(self, warn: Callable[[str], None]) -> None:
        """A background cell's lines said while its values are stored go to ``warn`` (as MapCheckpoint's)."""
        self._say = warn

    def settle(self, warn: Callable[[str], None] | None = None) -> None:
        self._warn = warn or _warn  # stored in value(), once the ranks' values are known

    def value(self, values: Any) -> Any:
        """The cell succeeded: store every rank's value (one transaction), return them.

        Not when the worker setup changed since the key was made (between keying
        and the start: see ``MapCheckpoint._same_setup``): the ranks ran under another.
        """
        if worker_setup.version() != self.setup_version:
            self._warn(_setup_changed_line("this cell", "its ranks' values"))
            return values
        if not self.files.unchanged() and (changed := self.files.changed) is not None:
            # a user's module saved meanwhile: a rank that imported it since ran its new code
            self._warn(_changed_line("this cell", changed, "its ranks' values were not stored"))
            return values
        if getattr(values, "ranks_without_setup", ()):  # (not what the setup in the key gives)
            self._warn(_ranks_without_setup_line(values.ranks_without_setup))
            return values
        other = getattr(values, "ranks_other_code", {})
        if other:  # (not what the notebook's files in the key give)
            ranks = sorted(other)
            self._warn(_other_code_line("this cell", f"the values of rank{'s' * (len(ranks) != 1)} "
                                        f"{', '.join(map(str, ranks))}", itertools.chain(*other.values()))
                       .replace("so they were not stored", "so none of the cell's values were stored"))
            return values
        writer = _Writer(self.store, self.run, self.name, self._say)
        gathered = getattr(values, "gathered", {})
        writer.put([(self.rank_keys[r], (v, {g: gathered[g][r] for g in self.gather})) for r, v in enumerate(values)])
        writer.finish(self._warn)
        return values

    def failed(self, exc: BaseException, report: Any = None) -> None:
        """(A failing cell stores nothing; its error already names the rank.)"""

    def stop(self) -> None:
        """(A cell has no on_chunk.)"""

    def amend(self, report: Any, wall: float, set_report: Callable[[Any], None] | None = None) -> Any:
        return _amend_report(report, set_report or (lambda r: None), "parallel", self.size, self.resumed, wall)


def checkpointed_parallel(
    core: Callable[..., Any],
    code: str,
    *,
    workers: int | None,
    namespace: dict[str, Any],
    gather: tuple,
    location: Any,
    show_report: bool,
    set_report: Callable[[Any], None],
    get_report: Callable[[], Any],
    kwargs: dict[str, Any],
) -> Any:
    """A ``%%parallel`` cell whose ranks' values (and gathered names) are kept in the store
    (see :class:`CellCheckpoint`)."""
    __tracebackhide__ = True
    from .pool import get_pool

    t0 = time.perf_counter()
    size = workers or get_pool().workers
    try:
        ck = CellCheckpoint(code, size=size, namespace=namespace, gather=tuple(gather), location=location,
                            seed=kwargs.get("seed"))
    except ValueError:
        return core(code, workers=workers, namespace=namespace, gather=gather, show_report=show_report, **kwargs)
    if ck.complete:
        _nothing_ran("rank's value", kwargs)
        values = ck.stored_values()
        values.report = ck.amend(None, time.perf_counter() - t0, set_report)
        if show_report:
            print(values.report.line())
        return values
    values = ck.value(core(code, workers=size, namespace=namespace, gather=gather, show_report=False, **kwargs))
    ck.amend(get_report(), time.perf_counter() - t0, set_report)
    if show_report:
        print(get_report().line())
    return values


def checkpointed_parallel_submit(
    start: Callable[..., Any],
    code: str,
    *,
    size: int,
    namespace: dict[str, Any],
    gather: tuple,
    location: Any,
    what: str,
    seed: int | None = None,
    show_report: bool = True,
) -> Any:
    """``%%parallel --bg --checkpoint``: the handle at once; done at once when every
    rank's value is stored, else the cell runs in the background and its ranks'
    values are stored when it succeeds. ``start(resume=...)`` is ``api.parallel``'s
    plain background start."""
    __tracebackhide__ = True
    from . import background

    t0 = time.perf_counter()
    try:
        ck = CellCheckpoint(code, size=size, namespace=namespace, gather=tuple(gather), location=location, seed=seed)
    except ValueError:
        return start()
    if ck.complete:
        report = ck.amend(None, time.perf_counter() - t0)
        values = ck.stored_values()
        values.report = report
        return background.finished(what, "cell", values, report, resume=ck, keep_chunks=False,
                                   show_report=show_report)
    return start(resume=ck)


# --------------------------------------------------------------------------
# %pool checkpoints


def list_runs(location: Any = True) -> list[RunInfo]:
    """The runs stored in the checkpoint folder, most recently used first."""
    store = open_store(location)
    return store.runs() if store is not None else []


def clear(name: str | None = None, location: Any = True) -> int:
    """Delete the stored runs of function ``name`` (every run if None); returns how many."""
    store = open_store(location)
    if store is None:
        return 0
    try:
        return store.clear(name)
    finally:
        _forget_puts(store.dir)


class Checkpoints(list):
    """What ``%pool checkpoints`` shows: one row per stored run."""

    folder: str = ""
    readonly: bool = False

    def __repr__(self) -> str:
        note = " (read-only for this user: used by runs, nothing new is stored)" if self.readonly else ""
        if not self:
            return f"no checkpoints in {self.folder}{note}"
        head = f"checkpoints in {self.folder}{note}:"
        # "key": the run key's start, telling apart runs of one name (other code, captures or defaults)
        rows = [("function", "key", "items", "size", "last used")]
        for r in self:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.used))
            rows.append((r.name, r.key.hex()[:8], f"{r.items:,}", fmt_bytes(r.size), used))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        return "\n".join([head, *("  " + line for line in lines)])

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def manage(action: str | None, name: str | None = None) -> Any:
    """``%pool checkpoints [clear [NAME]]``: list the stored runs, or delete them.

    A folder that cannot be opened is this command's error (one line: there is
    no run here to go on without the store, and nothing was listed or deleted).
    """
    from .errors import MPMagicError, UsageError

    if action not in (None, "list", "clear"):
        raise UsageError(f"checkpoints takes 'clear [NAME]' or nothing, not {action!r}")
    folder = directory()
    try:
        store = _open(folder.resolve())
    except Exception as exc:
        done = "nothing to list" if action != "clear" else "nothing was deleted"
        raise MPMagicError(f"%pool checkpoints: cannot open the checkpoint store in {folder} "
                           f"({_why(folder.resolve(), exc)}): {done}; set %config MPMagic.checkpoint_dir "
                           "to a folder") from None
    if action in (None, "list"):
        out = Checkpoints(store.runs())
        out.folder = os.fspath(folder)
        out.readonly = store.readonly
        return out
    if store.readonly:
        raise MPMagicError(f"%pool checkpoints clear: the checkpoint store in {folder} is read-only for this "
                           "user: nothing was deleted")
    if name is not None:  # (a name no run has, a typo: say which there are, and touch nothing)
        names = sorted({r.name for r in store.runs()})
        if name not in names:
            print(f"no checkpointed run named {name!r} in {folder}: nothing was deleted "
                  f"(stored: {', '.join(names) or 'none'}; %pool checkpoints lists them)")
            return None
    try:
        n = store.clear(name)
    except (CheckpointError, sqlite3.Error, OSError) as exc:
        raise MPMagicError(f"%pool checkpoints clear: {exc}") from None
    finally:
        _forget_puts(store.dir)
    what = f"named {name!r} " if name else ""
    # What it deleted: the runs' sizes, as the listing shows them (Store.clear); a disk
    # the store filled and the clear left full says so (still_full), never only "deleted".
    freed = f" ({fmt_bytes(n.freed)} freed)" if n.freed else ""
    print(f"deleted {n} checkpointed run{'s' if n != 1 else ''} {what}from {folder}{freed}"
          + (f"; {n.still_full}" if n.still_full else ""))
    return None
