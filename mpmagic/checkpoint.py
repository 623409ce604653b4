"""Durable runs: ``pmap(..., checkpoint=True)`` and ``%%parallel --checkpoint``.

A checkpointed map stores every finished item's result as its chunk arrives
in the notebook, and a later run of the same call (same function code and
captures, same items: ``checkpoint_keys.py``) takes those from the store
(``checkpoint_store.py``) and computes only the rest::

    keys of every item ──► store.load ──► found: results in place
                                   └────► missing: the core pmap, on those only
                                            └─ each accepted chunk ─► store.put
                                               (MapJob's on_chunk hook, one
                                                transaction per chunk)
    merge in input order; the report says "resumed: X of N items ..."

Failures (``errors="collect"``) are never stored, so a re-run retries them.
The store is a cache: when it cannot be opened or written, the run goes on
without it after a one-line warning.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import debugging
from .checkpoint_keys import cell_key, item_key, item_keys, run_key, unstable_reason
from .checkpoint_store import CheckpointError, RunInfo, Store
from .fmt import fmt_bytes

log = logging.getLogger("mpmagic")

DEFAULT_DIR = ".mpmagic"
DEFAULT_MAX_BYTES = 10 * 1024**3
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
    return Path(_setting("checkpoint_dir", "") or Path.cwd() / DEFAULT_DIR).expanduser()


def max_bytes() -> int | None:
    """The store's size cap (``%config MPMagic.checkpoint_max_bytes``)."""
    return _setting("checkpoint_max_bytes", DEFAULT_MAX_BYTES)


def open_store(location: Any = True) -> Store | None:
    """The store at ``location`` (kept open for this process), or None with a warning."""
    path = directory(location).resolve()
    store = _stores.get(path)
    if store is not None:
        if store.path.exists():
            return store
        store.close()  # the folder was deleted under us: start again
    try:
        store = Store(path)
    except (OSError, CheckpointError, Exception) as exc:  # a cache must never fail the run
        _warn(f"mpmagic: cannot open the checkpoint store in {path} ({type(exc).__name__}: {exc}); "
              "running without a checkpoint")
        return None
    _stores[path] = store
    return store


def close_stores() -> None:
    """Close every open store (tests, and before deleting a checkpoint folder)."""
    for store in _stores.values():
        store.close()
    _stores.clear()


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    log.warning(message)


class _Writer:
    """Stores accepted chunks from a thread of its own; after a failure, stops storing.

    ``put`` only queues: the backend's loop that calls ``on_chunk`` must go
    back to feeding workers at once. Measured with 400 items of 1 ms on 2
    workers: committing in that loop made the run 40% slower (a commit is
    0.5-2 ms on a busy disk, and the workers waited for their next chunk);
    from this thread, a few percent. Chunks that queue up while a commit runs
    go in the next transaction together, each as its own row (whole or absent).
    """

    def __init__(self, store: Store | None, run: bytes, name: str) -> None:
        self.store, self.run, self.name = store, run, name
        self.bytes = 0
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, pairs: list[tuple[bytes, Any]]) -> None:
        if self.store is None or not pairs:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="mpmagic-checkpoint")
            self._thread.start()
        self._queue.put(pairs)

    def _run(self) -> None:
        done = False
        while not done:
            chunks = [self._queue.get()]
            while True:  # whatever else is waiting goes in the same transaction
                try:
                    chunks.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if chunks[-1] is None:
                done = True
                chunks.pop()
            if self.error is not None or not chunks or self.store is None:
                continue
            try:
                self.bytes += self.store.put_chunks(self.run, self.name, chunks)
            except Exception as exc:
                self.error = exc  # reported by finish(), in the notebook's thread

    def finish(self) -> None:
        """Wait until every queued chunk is stored; warn if storing failed; apply the size cap."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self.store is None:
            return
        if self.error is not None:
            _warn(f"mpmagic: could not write to the checkpoint store {self.store.path} "
                  f"({type(self.error).__name__}: {self.error}); the rest of this run is not checkpointed")
            return
        try:
            gone = self.store.evict(max_bytes(), keep=self.run)
        except Exception as exc:
            log.warning("mpmagic: checkpoint eviction failed: %s", exc)
            return
        if gone:
            log.info("mpmagic: checkpoint store over its cap: evicted %s", ", ".join(gone))


def _load(store: Store | None, run: bytes, keys: list[bytes]) -> dict[bytes, Any]:
    if store is None or not keys:
        return {}
    try:
        return store.load(run, keys)
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

    def add(self, items: list, store: Store | None, run: bytes) -> list:
        """Key a batch of items, take what is stored, return the items to compute."""
        base = len(self.keys)
        try:
            pairs = item_keys(items)
        except Exception:  # one item does not pickle: key them one by one to find it
            pairs = []
            for i, item in enumerate(items):
                try:
                    pairs.append(item_key(item))
                except Exception as exc:  # unpicklable: the run itself will say so
                    log.debug("item %d has no key: %s", base + i, exc)
                    pairs.append((b"", None))
        keys = [k for k, _ in pairs]
        if self.unstable is None:
            for i, (_, data) in enumerate(pairs):
                if data is not None and (why := unstable_reason(data)):
                    self.unstable = f"item {base + i} {why}"
                    break
        found = _load(store, run, [k for k in keys if k])
        self.keys += keys
        todo = []
        for i, (item, key) in enumerate(zip(items, keys, strict=True)):
            if key and key in found:
                self.results.append(found[key])
            else:
                self.results.append(None)
                self.missing.append(base + i)
                todo.append(item)
        return todo


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
) -> list:
    """``core(func, items, ...)`` on the items the store does not have; the rest from the store.

    ``core`` is the plain ``api.pmap`` (called without ``checkpoint``);
    ``set_report``/``get_report`` reach its last report, which this amends
    (items, wall, how many were resumed).
    """
    __tracebackhide__ = True
    from .jobs import Failed

    t0 = time.perf_counter()
    if len(iterables) == 1:
        items, star_mode = iterables[0], star
    else:
        items, star_mode = zip(*iterables, strict=False), True
    name = getattr(func, "__name__", None) or type(func).__name__
    try:
        run, run_pickle = run_key(func, star_mode)
    except Exception as exc:  # cannot be pickled: let the core run raise its clear error
        log.debug("no run key for %s: %s", name, exc)
        return core(func, *iterables, star=star, errors=errors, show_report=show_report, **kwargs)
    store = open_store(location)
    if (why := unstable_reason(run_pickle)) is not None:
        _warn(f"mpmagic: --checkpoint: what `{name}` captures {why}; a new kernel will compute its items "
              "again. Capture a sorted tuple instead, or fix PYTHONHASHSEED")
    writer = _Writer(store, run, name)
    plan = _Plan()

    def on_chunk(start: int, results: list) -> None:
        keys = [plan.keys[i] for i in plan.missing[start : start + len(results)]]
        if errors == "collect":  # only then can a result be a Failed: never stored
            writer.put([(k, r) for k, r in zip(keys, results, strict=True) if k and not isinstance(r, Failed)])
        else:
            writer.put([(k, r) for k, r in zip(keys, results, strict=True) if k])

    if type(items) in (list, tuple, range):
        todo: Iterable = plan.add(list(items), store, run)
        pending = bool(todo)
    else:
        todo, pending = _lazy(iter(items), plan, store, run)
    computed: list = []
    if pending:
        try:
            computed = core(func, todo, star=star_mode, errors=errors, on_chunk=on_chunk, **kwargs)
        except Exception as exc:
            _renumber(exc, plan.missing)
            raise
        finally:
            writer.finish()
            debugging.renumber_last(plan.missing)  # %pdebug N and last_failures() count in the whole input
    if plan.unstable:
        _warn(f"mpmagic: --checkpoint: {plan.unstable}; a new kernel will compute such items again. "
              "Use sorted tuples instead of sets in items, or fix PYTHONHASHSEED")
    results = plan.results
    for j, idx in enumerate(plan.missing):
        r = computed[j]
        if isinstance(r, Failed):
            r.index = idx
            _renumber(r.error, plan.missing)
        results[idx] = r
    _amend_report(get_report() if pending else None, set_report, "pmap", len(results),
                  len(results) - len(plan.missing), time.perf_counter() - t0)
    if show_report:
        print(get_report().line())
    return results


_ITEM_REF = re.compile(r"\bitem (\d+)(?= of the input| \()")


def _renumber(exc: BaseException, missing: list[int]) -> None:
    """Make "item N" in an error's notes and message count in the whole input.

    The core run saw only the missing items, so its "raised by item 3 of the
    input" means the 4th *missing* item; the user's input position is
    ``missing[3]``.
    """

    def fix(text: str) -> str:
        return _ITEM_REF.sub(lambda m: f"item {missing[int(m.group(1))]}" if int(m.group(1)) < len(missing)
                             else m.group(0), text)

    notes = getattr(exc, "__notes__", None)
    if notes:
        exc.__notes__ = [fix(n) for n in notes]  # type: ignore[attr-defined]
    render = getattr(exc, "_render_traceback_", None)
    if render is not None and isinstance(getattr(render, "note", None), str):
        render.note = fix(render.note)
    if type(exc).__module__.startswith("mpmagic") and exc.args and isinstance(exc.args[0], str):
        exc.args = (fix(exc.args[0]), *exc.args[1:])


def _lazy(it: Any, plan: _Plan, store: Store | None, run: bytes) -> tuple[Iterable, bool]:
    """The missing items of a lazy input, keyed and looked up batch by batch as the core pmap pulls them.

    The input is read up to its first missing item before the run starts, so
    a fully stored input never starts the pool.
    """
    first: list = []
    while not first:
        batch = list(itertools.islice(it, _LAZY_BATCH))
        if not batch:
            return iter(()), False
        first = plan.add(batch, store, run)

    def rest() -> Iterable:
        while batch := list(itertools.islice(it, _LAZY_BATCH)):
            yield from plan.add(batch, store, run)

    return itertools.chain(first, rest()), True


def _amend_report(
    report: Any, set_report: Callable[[Any], None], kind: str, total: int, resumed: int, wall: float
) -> None:
    """The run's report, covering the whole input and saying how much came from the store."""
    from .report import Report

    if report is None:  # nothing was computed: no core run, no pool
        report = Report(kind=kind, items=total, workers=0, backend="checkpoint", start_method=None,
                        wall=wall, task_seconds=0.0, advice_enabled=False)
        set_report(report)
    report.items = total
    report.wall = wall
    report.extra["checkpoint"] = {"resumed": resumed, "total": total, "computed": total - resumed}


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
    """A ``%%parallel`` cell whose ranks' values (and gathered names) are kept in the store.

    The ranks of a cell may talk to each other (queues, locks), so one rank
    cannot run alone: the cell is taken from the store when every rank's
    value is there, and run whole otherwise (each rank stored as it succeeds).
    """
    __tracebackhide__ = True
    from .cell import make_cell_spec
    from .pool import get_pool
    from .report import RankValues

    t0 = time.perf_counter()
    size = workers or get_pool().workers
    try:
        spec = make_cell_spec(code, namespace, tuple(gather))
        # --gather names are the cell's outputs: their last values (put in the
        # notebook by the previous run) are not inputs of this one.
        names = {k: v for k, v in spec.names.items() if k not in gather}
        run, run_pickle = cell_key(code, names, spec.modules, tuple(gather), size)
    except Exception as exc:  # a syntax error or an unpicklable name: the core run says which
        log.debug("no key for the cell: %s", exc)
        return core(code, workers=workers, namespace=namespace, gather=gather, show_report=show_report, **kwargs)
    store = open_store(location)
    if (why := unstable_reason(run_pickle)) is not None:
        _warn(f"mpmagic: --checkpoint: what the cell reads {why}; a new kernel will run it again")
    rank_keys = [item_key(f"rank {r}")[0] for r in range(size)]
    found = _load(store, run, rank_keys)
    name = "%%parallel: " + (code.strip().splitlines() or [""])[0][:40]
    if len(found) == size:
        values = RankValues(v for v, _ in (found[k] for k in rank_keys))
        values.gathered = {g: [found[k][1].get(g) for k in rank_keys] for g in gather}
        _amend_report(None, set_report, "parallel", size, size, time.perf_counter() - t0)
        values.report = get_report()
        if show_report:
            print(values.report.line())
        return values
    values = core(code, workers=size, namespace=namespace, gather=gather, show_report=False, **kwargs)
    writer = _Writer(store, run, name)
    writer.put([(rank_keys[r], (v, {g: values.gathered[g][r] for g in gather})) for r, v in enumerate(values)])
    writer.finish()
    _amend_report(get_report(), set_report, "parallel", size, 0, time.perf_counter() - t0)
    if show_report:
        print(get_report().line())
    return values


# --------------------------------------------------------------------------
# %pool checkpoints


def list_runs(location: Any = True) -> list[RunInfo]:
    """The runs stored in the checkpoint folder, most recently used first."""
    store = open_store(location)
    return store.runs() if store is not None else []


def clear(name: str | None = None, location: Any = True) -> int:
    """Delete the stored runs of function ``name`` (every run if None); returns how many."""
    store = open_store(location)
    return store.clear(name) if store is not None else 0


class Checkpoints(list):
    """What ``%pool checkpoints`` shows: one row per stored run."""

    folder: str = ""

    def __repr__(self) -> str:
        if not self:
            return f"no checkpoints in {self.folder}"
        head = f"checkpoints in {self.folder}:"
        rows = [("function", "items", "size", "last used")]
        for r in self:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.used))
            rows.append((r.name, f"{r.items:,}", fmt_bytes(r.size), used))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        return "\n".join([head, *("  " + line for line in lines)])

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def manage(action: str | None, name: str | None = None) -> Any:
    """``%pool checkpoints [clear [NAME]]``: list the stored runs, or delete them."""
    from .errors import UsageError

    folder = directory()
    if action in (None, "list"):
        out = Checkpoints(list_runs())
        out.folder = os.fspath(folder)
        return out
    if action == "clear":
        n = clear(name)
        what = f"named {name!r} " if name else ""
        print(f"deleted {n} checkpointed run{'s' if n != 1 else ''} {what}from {folder}")
        return None
    raise UsageError(f"checkpoints takes 'clear [NAME]' or nothing, not {action!r}")
