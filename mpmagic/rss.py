"""This process's memory, cheap enough to read after every chunk.

A worker reports its private memory with each reply (:func:`private_bytes`:
the pool's ``max_memory`` limit, the "ran out of memory" diagnosis) and the
resident memory each preloaded module added (:func:`resident_bytes`,
``warmup.py``). A leaf module: both import it, neither imports the other.
"""

from __future__ import annotations

import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_statm: int | None = None  # fd of this process's /proc/<pid>/statm, once opened


def _forget_statm() -> None:
    """In a forked child (a task may fork): the inherited file describes the parent."""
    global _statm
    _statm = None  # (the parent's fd is left to the child's exit: closing it could race its other threads)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_statm)


def _statm_fields() -> list[bytes] | None:
    """The fields of ``/proc/self/statm`` (in pages), or None where ``/proc`` cannot say."""
    global _statm
    try:
        if _statm is None:
            _statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(_statm, 128, 0).split()
    except OSError:
        return None


def private_bytes() -> int | None:
    """This process's own memory in bytes: resident pages that are not shared.

    statm's resident minus its shared field (file-backed and shared-memory
    pages), i.e. the anonymous memory (``RssAnon``): pages of an
    ``mpmagic.share()`` array or a big item a task only reads are mapped by
    many processes and are not this worker's, so a memory limit must not count
    them (a worker reading a 300 MB shared array holds ~10 MB of its own).
    The same one ``pread`` of statm as :func:`resident_bytes` (3.4 us against
    3.3 us on a 2-core test machine; ``RssAnon`` from ``/proc/self/status``
    took 24 us: the kernel formats ~55 lines). Without a shared field, the
    resident size; None where ``/proc`` cannot say (as ``resident_bytes``).
    """
    fields = _statm_fields()
    if fields is None:
        return None
    try:
        resident = int(fields[1])
    except (ValueError, IndexError):
        return None
    try:
        return (resident - int(fields[2])) * _PAGE
    except (ValueError, IndexError):
        return resident * _PAGE


def resident_bytes() -> int | None:
    """This process's resident size in bytes, or None where ``/proc`` cannot say.

    ``/proc/self/statm`` stays open and is re-read with ``pread`` (~1 us): an
    open-read-close per chunk was ~10 us, a third of a tiny chunk's cost in a
    worker. A forked child opens its own (a fork hook forgets the parent's,
    which spares a ``getpid`` system call per chunk).
    """
    fields = _statm_fields()
    try:
        return int(fields[1]) * _PAGE if fields is not None else None
    except (ValueError, IndexError):
        return None
