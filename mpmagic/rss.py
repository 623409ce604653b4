"""This process's resident memory, cheap enough to read after every chunk.

A worker reports its size with each reply (the pool's ``max_memory`` limit,
``%pool``'s listing) and the memory each preloaded module added
(``warmup.py``). A leaf module: both import it, neither imports the other.
"""

from __future__ import annotations

import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_statm: tuple[int, int] | None = None  # (pid, fd of that process's /proc/<pid>/statm)


def resident_bytes() -> int | None:
    """This process's resident size in bytes, or None where ``/proc`` cannot say.

    ``/proc/self/statm`` stays open and is re-read with ``pread`` (~1 us): an
    open-read-close per chunk was ~10 us, a third of a tiny chunk's cost in a
    worker. A forked child (a task may fork) opens its own: the inherited file
    describes the parent.
    """
    global _statm
    try:
        pid = os.getpid()
        if _statm is None or _statm[0] != pid:
            _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
