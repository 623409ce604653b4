"""How many CPUs this process may really use.

``os.cpu_count()`` counts the machine's CPUs, not the ones a container or a
``taskset`` lets this process run on. The pool's default size is the smaller
of the CPU affinity mask and the cgroup CPU quota, so that it never starts
more busy processes than there are cores to run them; or, on Python 3.13+,
the count the user told Python (``-X cpu_count=N``, ``PYTHON_CPU_COUNT=N``),
which ``multiprocessing.Pool()`` takes as its size there.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cfs_quota``) limit."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def _told_cpu_count() -> int | None:
    """The CPUs Python 3.13+ was told this process has (``-X cpu_count=N``, else
    ``PYTHON_CPU_COUNT=N``; ``default`` is no count), as ``os.process_cpu_count()``
    and ``multiprocessing.Pool()`` take them; None when it was told none, or is older.
    For containers whose limits neither the affinity mask nor a quota shows."""
    process_cpu_count = getattr(os, "process_cpu_count", None)
    if process_cpu_count is None:
        return None
    told = sys._xoptions.get("cpu_count")  # (-X wins over the environment, as in Python)
    if told is None and not sys.flags.ignore_environment:
        told = os.environ.get("PYTHON_CPU_COUNT")
    if told is None or told == "default":
        return None
    count = process_cpu_count()
    return count if isinstance(count, int) and count >= 1 else None


def available_cpus() -> int:
    """CPUs this process may use: affinity mask and cgroup quota, at least 1; the
    count Python was told instead, when it was told one (Python 3.13+)."""
    told = _told_cpu_count()
    if told is not None:
        return told
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


_seen: tuple[float, int] | None = None  # (when, available_cpus()) of the last read


def recent_cpus() -> int:
    """``available_cpus()``, re-read at most every 5 seconds.

    Every run asks (its report's core count and BLAS thread cap), and the
    cgroup files are slow to read: three opens of sysfs files took a quarter
    of the calling thread's time in a warm 2-item map (py-spy).
    """
    global _seen
    now = time.monotonic()
    if _seen is None or now - _seen[0] > 5.0:
        _seen = (now, available_cpus())
    return _seen[1]


# This thread's scheduler statistics (Linux): "<ns on a CPU> <ns waiting on a run queue> <timeslices>".
_SCHEDSTAT = "/proc/thread-self/schedstat"
_schedstat_ok = True


class _OpenFile:
    """One thread's schedstat file, kept open: a ``pread`` of it takes ~4 us where
    opening it each time took 20-35 us (/proc/thread-self names the thread that
    opens it, so each thread opens its own; a forked child opens its own again).
    Held in a ``threading.local``: when the thread ends, its object goes, and
    with it the file."""

    __slots__ = ("fd", "forks")

    def __init__(self) -> None:
        self.fd: int | None = os.open(_SCHEDSTAT, os.O_RDONLY)
        self.forks = _forks  # (opened in this process: see _forked)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()


_schedstat = threading.local()
# Forks this process descends through (a fork hook counts them in the child): a
# thread's file opened at another count is its parent's. Compared per read where a
# ``getpid`` system call per read was: two per chunk, ~0.5 us each.
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def run_queue_seconds() -> float | None:
    """Seconds this thread has spent waiting on a run queue for a CPU, ready to
    run while other threads had the cores (Linux's schedstat, its second field);
    None where the kernel does not say.

    A worker reads it before and after each task: a task's wall time less that
    wait is what it would take on a free core, whether it was slowed by more
    workers than cores or by other processes (a busy JupyterHub node), and
    unlike CPU time it does not count a task's sleeping or I/O as waiting.
    One ``pread`` of a small /proc file (~4 us): once per chunk or rank, not per item.
    """
    global _schedstat_ok
    if not _schedstat_ok:
        return None
    try:
        mine: _OpenFile | None = getattr(_schedstat, "file", None)
        if mine is None or mine.fd is None or mine.forks != _forks:
            if mine is not None:  # (a forked child's copy of its parent's thread's file)
                mine.close()
            mine = _schedstat.file = _OpenFile()
        assert mine.fd is not None
        return int(os.pread(mine.fd, 128, 0).split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        _schedstat_ok = False  # (not Linux, or no schedstat: never tried again)
        return None
