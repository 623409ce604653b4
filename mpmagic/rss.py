"""This process's resident memory, cheap enough to read after every chunk.

A worker reports its size with each reply (the pool's ``max_memory`` limit,
``%pool``'s listing) and the memory each preloaded module added
(``warmup.py``). A leaf module: both import it, neither imports the other.
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


def resident_bytes() -> int | None:
    """This process's resident size in bytes, or None where ``/proc`` cannot say.

    ``/proc/self/statm`` stays open and is re-read with ``pread`` (~1 us): an
    open-read-close per chunk was ~10 us, a third of a tiny chunk's cost in a
    worker. A forked child opens its own (a fork hook forgets the parent's,
    which spares a ``getpid`` system call per chunk).
    """
    global _statm
    try:
        if _statm is None:
            _statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        return int(os.pread(_statm, 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
