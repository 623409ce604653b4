"""The checkpoint store: finished results on disk, by run key and item key.

One SQLite database (``checkpoints.sqlite``, standard library ``sqlite3``) in
the checkpoint folder (``.mpmagic/`` in the kernel's working directory unless
``%config MPMagic.checkpoint_dir`` says otherwise), and large results as files
in ``blobs/`` beside it.

Why it survives a ``kill -9`` at any moment:

* One row per chunk of results (its items' keys, one pickle of their
  results), written in one transaction, WAL journal: SQLite commits a chunk
  whole or not at all, so a killed kernel loses only the chunks in flight.
  ``synchronous=NORMAL`` is durable against a killed *process* (the WAL is in
  the OS's hands once written); only a power cut can lose the last commits.
* A large result is written to a temporary file, fsynced, renamed into place,
  and only then named by a row. A crash leaves at worst an unreferenced file
  (removed by ``clear``, or when the store is next opened: ``_clean_orphans``),
  never a row whose file is missing or half written.
* A folder this user may only read is opened read-only (``readonly``): its
  results are read, nothing is written.
* Every chunk and file carries an 8-byte BLAKE2 digest, checked when it is
  read: a damaged value is computed again, never returned.

Why a row per chunk and not per item: a row per item means a random insert
into a B-tree keyed by a hash, measured at 15-25 us per item here (2.4 s for
100,000 tiny items, against a target of 0.3 s); a chunk row costs one insert
for thousands of items, and a resumed run reads the keys of every chunk in
one scan and unpickles each needed chunk in one ``pickle.loads``.

Two kernels may write the same store at once: SQLite's file locks serialise
the transactions (``busy_timeout`` waits for the other writer), and rows are
``INSERT OR REPLACE``: equal keys hold equal results.

A file that is not a store (not SQLite, another program's tables, another
format version) is moved aside with a one-line warning and a fresh store is
made: a checkpoint is a cache, never a reason to fail a run.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import pickle
import sqlite3
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import cloudpickle

from . import payload
from .checkpoint_keys import FORMAT
from .fmt import fmt_bytes

log = logging.getLogger("mpmagic")

DB_NAME = "checkpoints.sqlite"
BLOBS = "blobs"
_FORMAT_TAG = f"mpmagic-checkpoint-{FORMAT}"
# Results whose out-of-band buffers (numpy arrays) total more than this go to
# a file of their own: a 100 MB row would be copied twice through SQLite's
# page cache, a file is one writev of the array's memory. So do results whose
# own pickle is larger (bytes, strings, lists: pickled in-band).
LARGE = 1 << 20
# A chunk's row holds at most about this much; results past it go to files.
# SQLite refuses a value over its length limit (SQLITE_MAX_LENGTH, 1 GB by
# default): a chunk of big plain results (four 300 MB byte strings) was one
# row over it ("string or blob too big"), and the run stored nothing more.
_ROW_BYTES = 64 << 20
# Keys per "IN (...)" query: under SQLite's oldest variable limit (999).
_BATCH = 900
_BLOB_MAGIC = b"MPMCKPT1"
_SHRINK = 8 << 20  # free pages past this are given back to the disk after a delete
_TMP = ".tmp-"  # a file being written (renamed into place when whole)
_BUSY_WAIT = 60  # seconds a connection waits for another kernel's write to the store
_SAY_WAITING = 1.0  # seconds of that wait after which a run says what it waits for
# Files no row names (a kernel killed between a file's rename and its row's
# commit, or during its write) older than this are deleted when a store is
# opened; younger ones may be another kernel's, whose row is on its way.
_ORPHAN_AGE = 600.0

# chunks: ``keys`` is the items' 16-byte keys end to end (before ``data`` so a
# scan of the keys never reads the results' pages); ``data`` pickles the list
# of their results, a large one replaced by a ``_File`` naming its file.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs(run BLOB PRIMARY KEY, name TEXT, created REAL, used REAL);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY, run BLOB, n INTEGER, keys BLOB, size INTEGER, digest BLOB, data BLOB);
CREATE INDEX IF NOT EXISTS chunks_run ON chunks(run);
"""
_TABLES = {"meta", "runs", "chunks"}
_KEY = 16  # bytes per item key


class CheckpointError(Exception):
    """The store could not be read or written (the run goes on without it)."""


class Cleared(int):
    """What ``Store.clear`` did: the number of runs deleted (it is that int), and

    ``freed``: the bytes of the runs deleted, their sizes as ``%pool checkpoints``
    lists them (with files no row named, when every run went), or, for a store
    started afresh on a full disk, what its deleted files held; ``still_full``:
    empty, or one sentence saying that the disk is still full and why (the
    store's log could not be given back), so ``%pool checkpoints clear`` never
    says "deleted" of a disk it left full.
    """

    freed: int
    still_full: str

    def __new__(cls, runs: int, freed: int = 0, still_full: str = "") -> Cleared:
        made = super().__new__(cls, runs)
        made.freed, made.still_full = freed, still_full
        return made


def _size_of(path: Path) -> int:
    """A file's size in bytes, 0 if it is gone."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _InUse(CheckpointError):
    """The store's files cannot be deleted: another connection has it open."""


# The stores open in this process: a store's files are deleted (``_start_afresh``)
# only when no other connection to them is open, here or in another process.
_live: weakref.WeakSet[Store] = weakref.WeakSet()

# The byte ranges SQLite's unix VFS holds a read lock on while a connection uses
# a store in WAL mode: the database's SHARED range (from PENDING_BYTE + 2, 510
# bytes) and the -shm file's "DMS" byte (128). A write lock on them is granted
# only if no other process has the store open.
_IN_USE_LOCKS = (("", 0x40000002, 510), ("-shm", 128, 1))


class KeyIndex:
    """Where a run's item keys are stored, ``key -> (chunk id, position)``, as read from
    its chunks up to chunk ``last``: kept by one run's lookups (a lazy input's batches,
    ``checkpoint._Plan``), so each lookup reads only the keys of the chunks stored since.

    Why: each lookup read the keys of every chunk of the run, so a generator's
    resume, looked up batch by batch, was quadratic: 100,000 stored items took
    6.5 s from a generator against 0.27 s from a list (one lookup).
    An entry may go stale (its chunk deleted by a clear or the size cap, its
    id reused by another chunk, SQLite's ids being max + 1): ``Store._locate``
    checks each key at its place in the row it reads, and a stale index is
    read again whole, so it never gives another item's result.
    """

    __slots__ = ("where", "last")

    def __init__(self) -> None:
        self.where: dict[bytes, tuple[int, int]] = {}
        self.last = 0  # the highest chunk id read


@dataclass
class RunInfo:
    """One stored run, as ``%pool checkpoints`` lists it."""

    name: str
    items: int
    size: int
    used: float
    key: bytes


@dataclass(frozen=True)
class _File:
    """Stands in a chunk's results for one stored in ``blobs/`` (its name and digest)."""

    name: str
    digest: bytes


@dataclass(frozen=True)
class _Pickled:
    """Stands in a chunk's results for one pickled on its own when its chunk was accepted."""

    data: bytes


@dataclass(frozen=True)
class Packed:
    """A chunk's results as bytes, taken when the chunk is accepted (:func:`pack`).

    What is stored is what the worker returned, even if the notebook changes
    the result objects afterwards (``for a in imap(...): a -= mean``): the
    writer thread works from these bytes only, never from the objects.
    Either ``data`` (the pickle of the results, the row itself: no large
    result among them) or ``items``: ``(key, pickle, copies of its large
    buffers)`` per result, those with buffers going to a file of their own.
    """

    keys: bytes
    data: bytes | None
    items: tuple[tuple[bytes, bytes, tuple[bytes, ...]], ...] = ()


# Buffers (numpy arrays) under this size are pickled in-band; larger ones are
# copied out of band, so a result whose buffers total over LARGE can be
# written to a file without a second pickle.
_OUT_OF_BAND = 64 * 1024


class _Buffers:
    """``buffer_callback`` that copies large contiguous buffers (a snapshot: the result
    may change after ``pack`` returns) and leaves the others in the pickle."""

    def __init__(self) -> None:
        self.copies: list[bytes] = []

    def reset(self) -> None:  # (payload.cloudpickle_dumps: a plain pickle's attempt is dropped)
        self.copies = []

    def __call__(self, buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: pickle copies it in-band
            return True
        if raw.nbytes < _OUT_OF_BAND:
            return True
        self.copies.append(bytes(raw))
        return False


def pack(results: list[tuple[bytes, Any]]) -> Packed:
    """``(item key, result)`` pairs as a :class:`Packed` snapshot; never raises.

    One pickle of the chunk in the common case (it is the row stored, so the
    writer does not pickle again). With large buffers among them, or a pickle
    over ``_ROW_BYTES``, one pickle per result (the writer puts the large ones
    in files: ``Store._files``). A result that cannot be pickled is left out
    (a re-run computes it).
    """
    buffers = _Buffers()
    try:
        data = payload.dumps_data([r for _, r in results], buffers)
        if not buffers.copies and len(data) <= _ROW_BYTES:
            return Packed(b"".join(k for k, _ in results), data)
    except Exception:
        log.debug("a chunk's results do not pickle together; storing them one by one")
    items = []
    for key, result in results:
        buffers = _Buffers()
        try:
            inband = payload.dumps_data(result, buffers)
            if buffers.copies and sum(len(c) for c in buffers.copies) <= LARGE:  # not worth a file
                inband, buffers.copies = payload.dumps_data(result), []
        except Exception as exc:
            log.debug("result for item %s not stored: %s", key.hex(), exc)
            continue
        items.append((key, inband, tuple(buffers.copies)))
    return Packed(b"".join(k for k, _, _ in items), None, tuple(items))


class _Unpickler(pickle.Unpickler):
    """Loads stored results with the notebook's own classes.

    A result that is an instance of a notebook class was pickled with the
    class by value (cloudpickle). Loaded as it is in a new kernel, it would be
    an instance of a copy of the class, unequal to the notebook's (a
    dataclass's ``==`` checks the class). Live results from workers come back
    as the notebook's class because cloudpickle's tracker id is known in the
    process that sent the class; the store's ids are an old kernel's. So a
    class the notebook defines under the same name is used, as it is, its
    definition untouched. (Its code is the stored one's: the run key covers
    the function's code and the notebook classes it uses.)
    """

    def __init__(self, data: bytes | memoryview, buffers: Iterable[Any] = ()) -> None:
        super().__init__(io.BytesIO(data), buffers=buffers)
        self._mine: set[int] = set()  # ids of the notebook's classes this load uses

    def find_class(self, module: str, name: str) -> Any:
        if module == "cloudpickle.cloudpickle":
            if name == "_make_skeleton_class":
                return self._class
            if name == "_class_setstate":
                return self._class_setstate
        return super().find_class(module, name)

    def _class(self, metaclass: type, name: str, bases: tuple, type_kwargs: dict, tracker: Any,
               extra: Any) -> type:
        mine = _notebook_class(name, type_kwargs.get("__module__"), metaclass)
        if mine is not None:
            self._mine.add(id(mine))
            return mine
        return cloudpickle.cloudpickle._make_skeleton_class(metaclass, name, bases, type_kwargs, tracker, extra)

    def _class_setstate(self, cls: type, state: Any) -> type:
        if id(cls) in self._mine:
            return cls  # the notebook's class: its own methods stay (their globals are the notebook's)
        return cloudpickle.cloudpickle._class_setstate(cls, state)


def _notebook_class(name: str, module: Any, metaclass: type) -> type | None:
    """The class the notebook (``__main__``) defines as ``name`` now, or None."""
    if module not in ("__main__", "__mp_main__"):
        return None
    spaces = [vars(sys.modules["__main__"])] if "__main__" in sys.modules else []
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    if shell is not None:
        spaces.insert(0, shell.user_ns)
    for space in spaces:
        cls = space.get(name)
        if isinstance(cls, type) and type(cls) is metaclass and cls.__module__ == "__main__" \
                and cls.__qualname__ == name:
            return cls
    return None


def _loads(data: bytes | memoryview, buffers: Iterable[Any] = ()) -> Any:
    """Load a stored pickle (see :class:`_Unpickler`)."""
    return _Unpickler(data, buffers).load()


def _digest(*parts: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p)
    return h.digest()


def warn(message: str) -> None:
    """One warning, at the user's line (the cell or script line that started the run).

    A ``RuntimeWarning`` (so ``warnings`` filters and ``pytest.warns`` see it)
    whose file and line are the first caller outside mpmagic and IPython's
    magic machinery: with a fixed ``stacklevel`` it pointed at a line of ours
    whenever the call came by another path. Shown each time (a fresh
    registry): the default filter would show it once per line of the
    notebook's shared ``__main__``, so a second run of the same call would
    say nothing. Outside any user's frame (a thread of ours) it is logged.
    """
    frame = _user_frame()
    if frame is None:
        log.warning(message)
        return
    g = frame.f_globals
    warnings.warn_explicit(message, RuntimeWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=g.get("__name__", "__main__"), **_module_globals(g))


def _module_globals(g: dict[str, Any]) -> dict[str, Any]:
    """``module_globals=g`` for ``warn_explicit`` when its loader can show the
    source line, else nothing: from Python 3.12 ``warn_explicit`` *raises*
    ``ValueError('Module globals is missing a __spec__.loader')`` for globals
    whose ``__loader__`` and ``__spec__`` are None, as IPython's and a Jupyter
    kernel's ``__main__`` are, so each warning failed the cell and lost the
    run's results. Without it the line still shows: IPython puts each cell's
    source in ``linecache``, and a script's line is read from its file."""
    spec_loader = getattr(g.get("__spec__"), "loader", None)
    if spec_loader is not None and g.get("__loader__") in (None, spec_loader):
        return {"module_globals": g}
    return {}


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Callers that are not the user's: IPython's magic machinery (``run_line_magic``,
# the ``<decorator-gen-N>`` wrappers of magics) between the cell and our magic.
_NOT_THE_USERS = (os.sep + "IPython" + os.sep, "<decorator-gen-")


def _user_frame() -> FrameType | None:
    """The innermost frame of this thread's stack that is neither ours nor IPython's, or None."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_PACKAGE_DIR + os.sep) and not any(part in name for part in _NOT_THE_USERS):
            return frame
        frame = frame.f_back
    return None


# SQLite's result codes for a file that is not (or no longer) a database:
# SQLITE_CORRUPT ("database disk image is malformed") and SQLITE_NOTADB ("file
# is not a database"). Only these move a store aside.
_DAMAGE_CODES = {11, 26}


# SQLITE_READONLY ("attempt to write a readonly database") and SQLITE_CANTOPEN
# (the -wal or -shm file cannot be made in a folder this user may only read).
_READONLY_CODES = {8, 14}


# SQLite's own text for the result codes above, and SQLITE_FULL (13): before
# Python 3.11 an error has no ``sqlite_errorcode``, only this message.
_CODE_MESSAGES = {
    "attempt to write a readonly database": 8,
    "database disk image is malformed": 11,
    "database or disk is full": 13,
    "unable to open database file": 14,
    "file is not a database": 26,
}


def _primary_code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of ``exc``, or None when it cannot be told.

    ``sqlite_errorcode`` exists from Python 3.11; before, the message is read
    (SQLite's fixed text for the code), else a read-only store was recomputed
    in full and a full disk's ``clear`` failed on 3.10.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF
    return _CODE_MESSAGES.get(str(exc).strip().lower())


def _is_readonly(exc: sqlite3.DatabaseError) -> bool:
    """Is ``exc`` SQLite saying this user may not write the store (or its folder)?"""
    return _primary_code(exc) in _READONLY_CODES


def _is_full(exc: sqlite3.Error) -> bool:
    """Is ``exc`` SQLite saying the disk is full (SQLITE_FULL)?"""
    return _primary_code(exc) == 13


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """Is ``exc`` damage of the file itself (and not a full disk, an I/O error,
    a read-only file or a lock, which say nothing about the store)?"""
    code = _primary_code(exc)
    if code is not None:
        return code in _DAMAGE_CODES
    return not isinstance(exc, sqlite3.OperationalError)


class Store:
    """The store in ``directory`` (created if missing). Thread-safe: one connection under a lock."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        self.blobs = self.dir / BLOBS
        self._lock = threading.RLock()
        self._closed = False
        # Opened read-only (a folder or file this user may only read): stored
        # results are used, nothing is written (``MapCheckpoint`` says so once).
        self.readonly = False
        self.conn = self._open()
        _live.add(self)
        if not self.readonly:
            self._clean_orphans()

    # -- opening -------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=_BUSY_WAIT, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_WAIT * 1000}")
        # Before the first table, or it has no effect: deleted rows' pages can then
        # be given back to the disk (``_shrink``) without rewriting the whole file.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _connect_readonly(self) -> sqlite3.Connection:
        """The store opened for reading only (``mode=ro``; ``immutable=1`` when the WAL's
        shared-memory file cannot be made in a folder this user may only read)."""
        uri = self.path.resolve().as_uri()
        error: sqlite3.Error | None = None
        for query in ("mode=ro", "mode=ro&immutable=1"):
            conn = sqlite3.connect(f"{uri}?{query}", uri=True, timeout=_BUSY_WAIT, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.Error as exc:
                conn.close()
                error = error or exc
        assert error is not None
        raise error

    def _open(self) -> sqlite3.Connection:
        conn = None
        try:
            conn = self._connect()
            problem = self._check(conn)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if _is_readonly(exc) and self.path.is_file():  # another user's store: read what it has
                conn = self._connect_readonly()
                self.readonly = True
                problem = self._check(conn)
                if problem is not None:
                    conn.close()
                    raise CheckpointError(f"{self.path} is not a usable checkpoint store ({problem}) "
                                          "and this user may not write to it") from None
                return conn
            if not _is_damage(exc):  # disk full, I/O error, read-only, locked: the store is not to blame
                raise
            conn, problem = None, f"it cannot be read ({exc})"
        if problem is None and conn is not None:
            return conn
        if conn is not None:
            conn.close()
        aside = self._move_aside()
        warn(
            f"mpmagic: {self.path} is not a usable checkpoint store: {problem}; "
            f"{'moved it to ' + aside.name if aside else 'removed it'} and started a fresh one"
        )
        conn = self._connect()
        problem = self._check(conn)
        if problem is not None:
            raise CheckpointError(f"cannot make a checkpoint store in {self.dir}: {problem}")
        return conn

    def _check(self, conn: sqlite3.Connection) -> str | None:
        """None if ``conn`` is (or has just become) our store; else what is wrong."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables and self.readonly:
            return "it is empty"
        if not tables:  # new: make it ours (IF NOT EXISTS: another kernel may be doing the same)
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} INSERT OR IGNORE INTO meta VALUES ('format', '{_FORMAT_TAG}'); COMMIT;"
                )
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not _TABLES <= tables:
            return "it holds other tables than mpmagic's"
        row = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        if row is None or row[0] != _FORMAT_TAG:
            return f"its format is {row[0] if row else 'unknown'!r}, not {_FORMAT_TAG!r}"
        conn.execute("SELECT count(*) FROM runs").fetchone()  # reads a page: a damaged file says so here
        return None

    def _move_aside(self) -> Path | None:
        aside = self.path.with_name(f"{DB_NAME}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        moved = None
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            try:
                os.replace(src, Path(str(aside) + suffix))
                if not suffix:
                    moved = aside
            except FileNotFoundError:  # another kernel moved it first, or there was none
                continue
        return moved

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.conn.close()

    def _clean_orphans(self) -> None:
        """Delete files in ``blobs/`` no row names (older than ``_ORPHAN_AGE``): what a
        killed kernel left between writing a result's file and committing its row."""
        try:
            names = os.listdir(self.blobs)
        except OSError:
            return
        old = time.time() - _ORPHAN_AGE
        by_run: dict[str, list[str]] = {}
        try:
            for name in names:
                path = self.blobs / name
                if os.stat(path).st_mtime > old:
                    continue
                if name.startswith(_TMP):
                    path.unlink(missing_ok=True)
                elif name.endswith(".bin") and "-" in name:
                    by_run.setdefault(name.split("-", 1)[0], []).append(name)
            for run_hex, files in by_run.items():
                with self._lock:
                    blobs = self.conn.execute("SELECT keys FROM chunks WHERE run=?", (bytes.fromhex(run_hex),))
                    held = {b[i : i + _KEY].hex() for (b,) in blobs for i in range(0, len(b), _KEY)}
                for name in files:
                    if name[len(run_hex) + 1 : -4] not in held:
                        (self.blobs / name).unlink(missing_ok=True)
        except (OSError, ValueError, sqlite3.Error) as exc:  # a cache's housekeeping: never a reason to fail
            log.debug("checkpoint: could not clean %s: %s", self.blobs, exc)

    # -- reading -------------------------------------------------------------
    def load(self, run: bytes, keys: Iterable[bytes], index: KeyIndex | None = None) -> dict[bytes, Any]:
        """The stored results among ``keys`` of ``run``: ``{item key: result}``.

        A chunk or file that fails its digest or does not load is left out
        (its items are computed again), with one warning. ``index``: where the
        run's keys are, as an earlier lookup of this run left it (:class:`KeyIndex`);
        only the chunks stored since are read, and it is brought up to date.
        """
        wanted = set(keys)
        index = index if index is not None else KeyIndex()
        with self._lock:
            need, rows, stale = self._locate(run, wanted, index)
            if stale:  # chunks deleted since the index read them (a clear, the size cap): read them all again
                index.where.clear()
                index.last = 0
                need, rows, _ = self._locate(run, wanted, index)
            if rows:
                try:  # (for the size cap's "least recently used"): a store we may only read is still read
                    with self.conn:
                        self.conn.execute("UPDATE runs SET used=? WHERE run=?", (time.time(), run))
                except sqlite3.Error as exc:
                    log.debug("checkpoint: could not mark run %s as used: %s", run.hex(), exc)
        found: dict[bytes, Any] = {}
        bad = 0
        for cid, digest, data in rows:
            here = need[cid]
            try:
                if _digest(data) != digest:
                    raise CheckpointError("digest mismatch")
                values = _loads(data)
            except Exception as exc:
                bad += len(here)
                log.debug("checkpoint chunk %d unreadable: %s", cid, exc)
                continue
            for k, pos in here:
                v = values[pos]
                try:
                    if type(v) is _File:
                        v = self._read_file(v)
                    elif type(v) is _Pickled:
                        v = _loads(v.data)
                except Exception as exc:
                    bad += 1
                    log.debug("checkpoint result %s unreadable: %s", k.hex(), exc)
                    continue
                found[k] = v
        if bad:
            warn(f"mpmagic: {bad} stored result{'s' if bad > 1 else ''} in {self.path} failed their check "
                  "(damaged file?); computing them again")
        return found

    def _locate(self, run: bytes, wanted: set[bytes], index: KeyIndex
                ) -> tuple[dict[int, list[tuple[bytes, int]]], list[tuple[int, bytes, bytes]], bool]:
        """Under the lock: the chunks holding ``wanted`` keys of ``run``, as ``{chunk id: [(key,
        position)]}``, their rows ``(id, digest, data)``, and whether the index was stale
        (a chunk it names is gone, or holds other keys: deleted, and its id reused)."""
        where = index.where  # item key -> (chunk id, position); later chunks win
        for cid, blob in self.conn.execute("SELECT id, keys FROM chunks WHERE run=? AND id>? ORDER BY id",
                                           (run, index.last)):
            n = len(blob) // _KEY
            keys_here = [blob[i : i + _KEY] for i in range(0, n * _KEY, _KEY)]
            where.update(zip(keys_here, zip(itertools.repeat(cid, n), range(n), strict=True), strict=True))
            index.last = cid
        need: dict[int, list[tuple[bytes, int]]] = {}
        for k in wanted:
            hit = where.get(k)
            if hit is not None:
                need.setdefault(hit[0], []).append((k, hit[1]))
        rows = []
        stale = False
        ids = list(need)
        for i in range(0, len(ids), _BATCH):
            part = ids[i : i + _BATCH]
            for cid, blob, digest, data in self.conn.execute(
                f"SELECT id, keys, digest, data FROM chunks WHERE run=? AND id IN ({','.join('?' * len(part))})",
                (run, *part),
            ):
                if any(blob[pos * _KEY : (pos + 1) * _KEY] != k for k, pos in need[cid]):
                    stale = True
                    continue
                rows.append((cid, digest, data))
        return need, rows, stale or len(rows) < len(need)

    def _read_file(self, ref: _File) -> Any:
        data = bytearray((self.blobs / ref.name).read_bytes())  # writable: arrays come back writable
        if data[:8] != _BLOB_MAGIC or _digest(memoryview(data)[8:]) != ref.digest:
            raise CheckpointError("digest mismatch")
        view = memoryview(data)
        n_inband, n_buf = int.from_bytes(view[8:16], "little"), int.from_bytes(view[16:24], "little")
        pos = 24 + 8 * n_buf
        sizes = [int.from_bytes(view[24 + 8 * i : 32 + 8 * i], "little") for i in range(n_buf)]
        inband = view[pos : pos + n_inband]
        pos += n_inband
        buffers = []
        for size in sizes:
            buffers.append(view[pos : pos + size])
            pos += size
        return _loads(inband, buffers)

    # -- writing -------------------------------------------------------------
    def put(self, run: bytes, name: str, results: list[tuple[bytes, Any]]) -> int:
        """Store ``(item key, result)`` pairs of ``run`` as one chunk, in one transaction.

        Returns the bytes stored. Results that cannot be pickled are left out
        (a re-run computes them).
        """
        return self.put_chunks(run, name, [results])

    def put_chunks(self, run: bytes, name: str, chunks: list[list[tuple[bytes, Any]]]) -> int:
        """Store several chunks (one row each) in one transaction: each is whole or absent."""
        return self.put_packed(run, name, [pack(results) for results in chunks])

    def put_packed(self, run: bytes, name: str, chunks: list[Packed],
                   waiting: Callable[[], None] | None = None) -> int:
        """Store chunks :func:`pack` made (one row each) in one transaction; returns the bytes stored.

        A large result whose file cannot be written (a full disk) is left out
        of its row, the rest is stored, and then the file's error is raised:
        the caller says so, as for a row that cannot be written. ``waiting``:
        called once when the write waited :data:`_SAY_WAITING` s for another
        process's lock on the store (it then waits on, up to ``_BUSY_WAIT``).

        The large results' files and the rows naming them are written under the
        store's lock, as one step for the process's other threads: a clear (which
        holds the lock) in between deleted a file whose row came after it (the next
        lookup said "damaged file?"), and a clear of every run the file being
        written, whose rename then stopped the run's storing. (A lookup waits for
        such a write meanwhile; another kernel's clear is not held back.)
        """
        rows = []
        total = 0
        failure: BaseException | None = None
        with self._lock:
            for chunk in chunks:
                if chunk.data is not None:
                    keys, data, size = chunk.keys, chunk.data, 0
                else:
                    keys, data, size, error = self._files(run, chunk)
                    failure = failure or error
                if keys:
                    size += len(data) + len(keys)
                    rows.append((run, len(keys) // _KEY, keys, size, _digest(data), data))
                    total += size
            if rows:
                self._insert(run, name, rows, waiting)
        if failure is not None:
            raise failure
        return total

    def _begin_write(self, conn: sqlite3.Connection, waiting: Callable[[], None] | None) -> None:
        """``BEGIN IMMEDIATE``, telling ``waiting`` once it waited :data:`_SAY_WAITING` s for the lock.

        Another kernel writing the same store (a ``%pool checkpoints clear`` of
        a large one) held a run back for up to a minute in silence, and its
        report then blamed the time on sending chunks."""
        if waiting is None:
            conn.execute("BEGIN IMMEDIATE")
            return
        conn.execute(f"PRAGMA busy_timeout = {int(_SAY_WAITING * 1000)}")
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        finally:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_WAIT * 1000}")
        waiting()
        conn.execute("BEGIN IMMEDIATE")

    def _insert(self, run: bytes, name: str, rows: list[tuple], waiting: Callable[[], None] | None = None) -> None:
        now = time.time()
        with self._lock:
            conn = self.conn
            self._begin_write(conn, waiting)
            try:
                conn.execute(
                    "INSERT INTO runs VALUES (?, ?, ?, ?) ON CONFLICT(run) DO UPDATE SET used=excluded.used",
                    (run, name, now, now),
                )
                conn.executemany("INSERT INTO chunks(run, n, keys, size, digest, data) VALUES (?, ?, ?, ?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _files(self, run: bytes, chunk: Packed) -> tuple[bytes, bytes, int, BaseException | None]:
        """A chunk with large results: those written to files (a ``_File`` in the row), the
        others as their own pickles. ``(keys, row pickle, bytes in files, first error)``.

        A file holds each result with large buffers, each whose own pickle is over
        ``LARGE``, and each that would take the row past ``_ROW_BYTES``: so no row
        nears SQLite's length limit, however big the chunk's results."""
        keys: list[bytes] = []
        values: list[_File | _Pickled] = []
        in_files = 0
        in_row = 0
        error: BaseException | None = None
        for key, inband, raws in chunk.items:
            if raws or len(inband) > LARGE or in_row + len(inband) > _ROW_BYTES:
                try:
                    file_name, digest = self._write_file(run, key, inband, [memoryview(r) for r in raws])
                except Exception as exc:  # (a full disk): the others are stored; the caller warns
                    log.debug("result for item %s not stored: %s", key.hex(), exc)
                    error = error or exc
                    continue
                values.append(_File(file_name, digest))
                in_files += len(inband) + sum(len(r) for r in raws)
            else:
                values.append(_Pickled(inband))
                in_row += len(inband)
            keys.append(key)
        return b"".join(keys), payload.dumps_data(values), in_files, error

    def _write_file(self, run: bytes, key: bytes, inband: bytes, raws: list[memoryview]) -> tuple[str, bytes]:
        """Write a large result to ``blobs/`` atomically: temp file, one writev, fsync, rename."""
        self.blobs.mkdir(exist_ok=True)
        head = len(inband).to_bytes(8, "little") + len(raws).to_bytes(8, "little")
        head += b"".join(r.nbytes.to_bytes(8, "little") for r in raws)
        parts: list = [head, inband, *raws]
        digest = _digest(*parts)
        name = f"{run.hex()}-{key.hex()}.bin"
        tmp = self.blobs / f"{_TMP}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            parts = [_BLOB_MAGIC, *parts]
            while parts:  # writev may write less than asked (over 2 GB): go on from there
                n = os.writev(fd, parts)
                while parts and n >= len(parts[0]):
                    n -= len(parts[0])
                    parts.pop(0)
                if parts and n:
                    parts[0] = memoryview(parts[0])[n:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.blobs / name)
        return name, digest

    # -- managing --------------------------------------------------------------
    def runs(self) -> list[RunInfo]:
        """Stored runs, most recently used first; ``items`` counts distinct items (two
        kernels running the same call at once may both store an item)."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT r.name, coalesce(sum(c.size), 0), r.used, r.run "
                "FROM runs r LEFT JOIN chunks c ON c.run = r.run GROUP BY r.run ORDER BY r.used DESC"
            ).fetchall()
            items: dict[bytes, set[bytes]] = {}
            for run, blob in self.conn.execute("SELECT run, keys FROM chunks"):
                items.setdefault(run, set()).update(blob[i : i + _KEY] for i in range(0, len(blob), _KEY))
        return [RunInfo(name, len(items.get(run, ())), size, used, run) for name, size, used, run in rows]

    def other_runs(self, name: str, run: bytes) -> int:
        """How many stored runs (with results) of functions named ``name`` have another
        key than ``run``: 0 when ``run`` itself has results stored (the run may resume
        some), so a run that can resume nothing and whose name has runs under other
        code or captures says so (``checkpoint._say_other_runs``). Two small indexed
        queries; 0 when the store cannot be read (the run's own look-ups say why)."""
        try:
            with self._lock:
                conn = self.conn
                if conn.execute("SELECT 1 FROM chunks WHERE run=? LIMIT 1", (run,)).fetchone() is not None:
                    return 0
                return conn.execute(
                    "SELECT count(*) FROM runs r WHERE r.name=? AND r.run<>? "
                    "AND EXISTS (SELECT 1 FROM chunks c WHERE c.run = r.run)", (name, run)
                ).fetchone()[0]
        except sqlite3.Error:
            return 0

    def total_bytes(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT coalesce(sum(size), 0) FROM chunks").fetchone()[0]

    def delete(self, runs: Iterable[bytes], shrink: bool = True) -> int:
        """Delete these runs and their files; returns how many runs were deleted.

        Then gives the freed space back to the disk when it is much (``_shrink``).
        On a full disk (deleting rows writes to the WAL first) the runs' files
        are deleted first, to make room, and the rows after them; if that is
        still not enough, raises :class:`CheckpointError` saying what to do.
        """
        runs = list(runs)
        n = 0
        for run in runs:
            try:
                n += self._delete_rows(run)
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                self._delete_files(run)  # (rows without files: a load counts them unreadable, never wrong)
                try:
                    n += self._delete_rows(run)
                except sqlite3.OperationalError:
                    raise CheckpointError(f"the disk holding {self.path} is full, so its rows cannot be deleted; "
                                          f"free some space, or delete the folder {self.dir}") from None
            # After the commit: a crash in between leaves files, never rows without them.
            self._delete_files(run)
        if runs and shrink:
            self._shrink()
        return n

    def _delete_rows(self, run: bytes) -> int:
        with self._lock:
            with self.conn:
                self.conn.execute("DELETE FROM chunks WHERE run=?", (run,))
                return self.conn.execute("DELETE FROM runs WHERE run=?", (run,)).rowcount

    def _delete_files(self, run: bytes) -> None:
        if self.blobs.is_dir():
            for f in self.blobs.glob(f"{run.hex()}-*.bin"):
                f.unlink(missing_ok=True)

    def _shrink(self) -> sqlite3.Error | None:
        """Give free pages back to the disk when they are over ``_SHRINK`` bytes (or a
        quarter of the file, and over 1 MB).

        Deleted rows leave free pages in the file, reused by later rows but
        never returned: a store that held 300 MB kept that size after
        ``clear`` or eviction. New stores have ``auto_vacuum = INCREMENTAL``, so
        this moves only the pages at the end; an older store is rewritten once
        by ``VACUUM`` (which makes it incremental too). Then the WAL is
        truncated (also when few pages are free: small results live in the
        WAL until a checkpoint, and a full disk stayed full after ``clear``). Never raises: another kernel reading the store only delays it.
        Returns the SQLite error that stopped it, if any (a full disk: ``clear`` then starts afresh).
        """
        with self._lock:
            conn = self.conn
            try:
                free = conn.execute("PRAGMA freelist_count").fetchone()[0]
                page = conn.execute("PRAGMA page_size").fetchone()[0]
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                conn.execute("PRAGMA busy_timeout = 2000")  # a busy store: next time
                if free * page < 1 << 20 or (free * page < _SHRINK and free * 4 < pages):
                    # Few free pages, but the WAL may hold a full disk's worth (small
                    # results live in it until a checkpoint): give that back.
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                    return None
                # (executescript: it steps each statement to its end; execute frees one page)
                if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
                    conn.executescript("PRAGMA incremental_vacuum;")
                else:
                    conn.executescript("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                return None
            except sqlite3.Error as exc:
                log.debug("checkpoint: could not shrink %s: %s", self.path, exc)
                return exc
            finally:
                try:
                    conn.execute(f"PRAGMA busy_timeout = {_BUSY_WAIT * 1000}")
                except sqlite3.Error:
                    pass

    def clear(self, name: str | None = None) -> Cleared:
        """Delete the runs named ``name`` (every run if None); returns how many, and their bytes (``Cleared``).

        On a disk the store itself filled, SQLite can neither delete rows nor write
        its log back into the database (both need room first), so the log kept
        the disk full after a clear that said "deleted", or the clear was refused,
        depending on how much room the failed write had left. A clear of every
        run (``name`` None, or the name of every run stored) then deletes the
        store's files and starts an empty store (``_start_afresh``): all of it
        was to be deleted anyway. A clear of some runs deletes what it can and
        says (``Cleared.log_left``) what stays: only a clear of every run can
        free that disk.
        """
        with self._lock:
            before = self._footprint()
            listed = self.runs()
            runs = [r.key for r in listed if name is None or r.name == name]
            every = len(runs) == len(listed)
            # What this clear deletes: the runs' sizes as ``%pool checkpoints`` lists them
            # (their rows and files), not the store's files before and after (a clear of a
            # 170 B run said "50 kB freed": the other runs' log written back, counted too).
            deleted = sum(r.size for r in listed if name is None or r.name == name)
            try:
                n, full = self.delete(runs, shrink=False), False
            except CheckpointError:  # (the disk is full: the rows stay)
                if not every:
                    raise CheckpointError(f"the disk holding {self.path} is full, so these runs' rows cannot be "
                                          "deleted; clear every run (which deletes the store's files), or free "
                                          "some space") from None
                n, full = len(runs), True
            if every and self.blobs.is_dir():  # and files no row names (left by a crash)
                for f in self.blobs.iterdir():
                    deleted += _size_of(f)
                    f.unlink(missing_ok=True)
            afresh = False
            stopped = None if full else self._shrink()
            still_full = ""
            if full or (stopped is not None and _is_full(stopped)):
                log_size = fmt_bytes(self._log_bytes())
                if not every:
                    still_full = (f"the disk is still full: the store's log ({log_size}) cannot be written back "
                                  "without room; clear every run (which deletes the store's files), or free some space")
                else:
                    try:
                        self._start_afresh()
                        afresh = True
                    except _InUse as exc:
                        if full:
                            raise CheckpointError(f"the disk holding {self.path} is full, so its rows cannot be "
                                                  f"deleted, nor its files while {exc}") from None
                        still_full = (f"the disk is still full: the store's log ({log_size}) cannot be written "
                                      f"back without room, nor deleted while {exc}")
            # A store started afresh: its files were deleted, all of them (measured on them).
            return Cleared(n, max(0, before - self._footprint()) if afresh else deleted, still_full)

    def _footprint(self) -> int:
        """Bytes the store's files hold now: the database, its log and index, and ``blobs/``."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        try:
            with os.scandir(self.blobs) as entries:
                for entry in entries:
                    try:
                        total += entry.stat().st_size
                    except OSError:
                        pass
        except OSError:
            pass
        return total

    def _log_bytes(self) -> int:
        """The size of the store's write-ahead log (``-wal``), 0 if there is none."""
        try:
            return os.stat(f"{self.path}-wal").st_size
        except OSError:
            return 0

    def _start_afresh(self) -> None:
        """Delete the store's files and open a new, empty store in their place.

        For ``clear`` of every run on a disk the store filled: deleting the log
        alone would bring back the rows it had deleted, so the database goes
        too. Only when no other connection has the store open, in this process
        (another ``Store`` of this folder) or in another one (a second kernel:
        SQLite's own file locks say so, and are held while the files are
        deleted); else raises ``_InUse`` saying what to do, and the store stays
        as it was.
        """
        in_use = _InUse(f"another kernel has the checkpoint store in {self.dir} open; clear again once none "
                        "does, or free some space")
        if any(s is not self and s.path == self.path and not s._closed for s in list(_live)):
            raise in_use
        try:
            import fcntl
        except ImportError:  # (no POSIX locks: whether another process uses it cannot be told)
            raise in_use from None
        self._closed = True
        self.conn.close()
        fds: list[int] = []
        free = True
        try:
            for suffix, start, length in _IN_USE_LOCKS:
                try:
                    fd = os.open(f"{self.path}{suffix}", os.O_RDWR)
                except FileNotFoundError:
                    continue
                fds.append(fd)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
                except OSError:
                    free = False
                    break
            if free:  # (no one else has it open, and no one can start to while the locks are held)
                # The log first: a database left without its log is the store as of its
                # last checkpoint; a log left without its database could be replayed into a new one.
                for suffix in ("-wal", "-shm", ""):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        finally:
            for fd in fds:
                os.close(fd)  # (drops this process's locks on the file: its only connection is closed)
        try:
            self.readonly = False
            self.conn = self._open()
            self._closed = False
        except (sqlite3.Error, OSError) as exc:  # the disk is full of other files: the next open_store starts one
            raise CheckpointError(f"deleted the checkpoint store's files in {self.dir}, but the disk is still "
                                  f"full, so a new store cannot be started ({exc}); free some space") from None
        if not free:
            raise in_use

    def evict(self, max_bytes: int | None, keep: bytes | Collection[bytes] | None = None) -> list[str]:
        """Delete least recently used runs until the store holds at most ``max_bytes``.

        ``keep`` (the run just made, and runs still being written: a background
        run of another function) stays, even alone over the cap: deleting it
        would throw away the run the user is resuming. Returns the names deleted.
        """
        kept = {keep} if isinstance(keep, bytes) else set(keep or ())
        if max_bytes is None:
            return []
        total = self.total_bytes()
        if total <= max_bytes:
            return []
        gone = []
        for r in sorted(self.runs(), key=lambda r: r.used):
            if total <= max_bytes:
                break
            if r.key in kept:
                continue
            self.delete([r.key], shrink=False)
            total -= r.size
            gone.append(r.name)
        if gone:
            self._shrink()
        return gone
