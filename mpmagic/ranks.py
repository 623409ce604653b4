"""Persistent ranks: ``%%parallel --keep`` cells share each rank's namespace.

Like ipyparallel's engines: load a shard once in one ``--keep`` cell, compute
on it in the next ones. Each rank is pinned to the worker that first ran it
(the worker keeps the rank's namespace in its memory), so the notebook
remembers rank -> worker and :class:`KeptCellJob` hands rank ``r`` only to
that worker. A kept rank whose worker died (or was recycled) has lost its
state: the next ``--keep`` cell says so instead of silently starting empty.
``--keep --reset`` drops the kept ranks and starts afresh.

Local pool only for now: a Dask task has no worker of its own to keep state
in. The worker side (``cell.kept_namespace``) is in cell.py: this module
imports the jobs, which workers must not.
"""

from __future__ import annotations

from typing import Any

from .errors import MPMagicError, UsageError
from .fmt import fmt_bytes
from .jobs import CellJob

# -- notebook side ------------------------------------------------------------

_kept: dict[int, tuple[Any, int, int | None]] = {}  # rank -> (pool key, worker id, pid)
_size: int | None = None


def kept() -> dict[int, tuple[Any, int, int | None]]:
    return dict(_kept)


def reset() -> None:
    """Forget the kept ranks (their workers drop them at the next ``--keep --reset`` cell)."""
    global _size
    _kept.clear()
    _size = None


def check(backend: Any, size: int, reset_first: bool) -> dict[int, int]:
    """The pins (rank -> worker id) of a ``--keep`` cell of ``size`` ranks; raise if a kept rank is gone."""
    if backend.name != "local":
        raise UsageError("--keep needs the local pool (%pool local): a Dask task has no worker of its own to keep state in")
    if reset_first:
        reset()
    if backend.max_tasks_per_child:
        raise UsageError("--keep needs workers that stay: this pool recycles them (--max-tasks-per-child); "
                         "%pool start --max-tasks-per-child is not for kept ranks")
    if size > backend.workers:
        raise UsageError(
            f"--keep with {size} ranks needs {size} workers and the pool has {backend.workers}: "
            f"%pool resize {size} first (kept ranks live in the pool's own workers)"
        )
    if not _kept:
        return {}
    if _size is not None and size != _size:
        raise UsageError(
            f"the kept ranks are {_size} (-n {_size}); run this cell with -n {_size}, "
            "or add --reset to start new ranks"
        )
    key = backend.pool_key
    live = {(key, s.wid): s for s in backend.slots if s.proc.is_alive()}
    for rank, (pool_key, wid, pid) in sorted(_kept.items()):
        if (pool_key, wid) not in live:
            worker = f"worker {wid}" if pid is None else f"worker {wid} (pid {pid})"
            raise MPMagicError(
                f"rank {rank}'s kept state is gone: its {worker} died, was replaced or "
                "the pool restarted since the last --keep cell; run the cell with --keep --reset to start "
                "the ranks afresh (and load their data again)"
            )
    return {rank: wid for rank, (_, wid, _) in _kept.items()}


def record(backend: Any, size: int, placed: dict[int, int]) -> None:
    """After a ``--keep`` cell: which worker holds each rank."""
    global _size
    key = backend.pool_key
    pids = {s.wid: s.pid for s in backend.slots}
    for rank, wid in placed.items():
        pid = pids.get(wid)
        before = _kept.get(rank)
        if pid is None and before is not None and before[:2] == (key, wid):
            # Its worker was replaced during the cell (--timeout, a crash): the
            # pid it had still names it in the next cell's error.
            pid = before[2]
        _kept[rank] = (key, wid, pid)
    _size = size


def status_line(processes: list[dict], pool_key: Any) -> str | None:
    """``%pool``'s line about kept ranks, with their workers' memory (``processes``: its rows,
    of the pool ``pool_key``).

    Ranks whose worker is gone (the pool was stopped or restarted, the worker died or
    was replaced, or they were kept in another pool) are said once, with what to do,
    not one "(gone)" per rank: their state went with those workers, and the next
    ``--keep`` cell raises until ``--reset`` (:func:`check`).
    """
    if not _kept:
        return None
    live = {p["id"]: p.get("rss") for p in processes if p.get("alive")}
    parts, gone = [], []
    for rank, (key, wid, _) in sorted(_kept.items()):
        if key != pool_key or wid not in live:
            gone.append(rank)
            continue
        mb = live[wid]
        parts.append(f"rank {rank} on worker {wid}" + (f" ({fmt_bytes(mb)} own memory)" if mb else ""))
    clauses = [", ".join(parts)] if parts else []
    if gone:
        one = len(gone) == 1
        clauses.append(f"rank{'' if one else 's'} {_spans(gone)} went with the worker{'' if one else 's'} "
                       f"that held {'it' if one else 'them'} (stopped, restarted or died): "
                       "the next --keep cell needs --reset")
    return "kept ranks (%%parallel --keep): " + "; ".join(clauses)


def _spans(numbers: list[int]) -> str:
    """Sorted ``numbers`` as runs: ``0-3, 5`` (a pool of 32 ranks gone is one short clause)."""
    out: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


class KeptCellJob(CellJob):
    """A ``--keep`` cell: rank ``r`` runs only on the worker pinned to it."""

    pinned = True  # (backends.base.Job: the local pool hands its ranks out with next_unit_for)

    def __init__(self, *args: Any, pins: dict[int, int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pins = dict(pins or {})
        self._kept_before = dict(self.pins)  # ranks whose state lives in a worker already
        self.placed: dict[int, int] = {}  # rank -> the worker it was (last) sent to

    def next_unit_for(self, wid: int) -> Any:
        """The pending rank pinned to worker ``wid`` (or any unpinned one if ``wid`` holds none)."""
        holds = [r for r, w in self.pins.items() if w == wid]
        for unit in self._pending:
            if (holds and unit.id in holds) or (not holds and unit.id not in self.pins):
                self._pending.remove(unit)
                self.outstanding[unit.id] = unit
                self.placed[unit.id] = wid  # a failing rank keeps its namespace there too
                self.pins[unit.id] = wid
                return unit
        return None

    def drop_orphans(self, live: set[int]) -> None:
        """Pending ranks pinned to a worker that is gone (replaced since the check): their error, not a wait."""
        for unit in [u for u in self._pending if self.pins.get(u.id) is not None and self.pins[u.id] not in live]:
            self._pending.remove(unit)
            self.outstanding[unit.id] = unit
            self.requeue(unit)

    def requeue(self, unit: Any) -> None:
        """A rank that could not be sent: a new rank may go elsewhere; a kept one cannot.
        (Given back by an abort, see ``CellJob.abort``: it is stopped, its state lost.)"""
        if self.aborting:
            super().requeue(unit)
            return
        if unit.id in self._kept_before:
            from .errors import WorkerLostError

            self.outstanding.pop(unit.id, None)
            self.failures[unit.id] = WorkerLostError(
                f"rank {unit.id}'s kept state is gone: its worker died; run the cell with --keep --reset"
            )
            self._rank_finished()
            return
        self.pins.pop(unit.id, None)
        self.placed.pop(unit.id, None)
        super().requeue(unit)


__all__ = ["KeptCellJob", "check", "record", "reset", "status_line"]
