"""Thread caps for BLAS/OpenMP in workers: no oversubscription by default.

numpy's BLAS (OpenBLAS, MKL) and OpenMP code start one thread per CPU in
*every* process. Two workers on two CPUs each running a 4-thread matrix
product keep 8 threads fighting over 2 cores. So each worker limits these
pools to ``available CPUs // workers`` threads (at least 1), as loky does for
joblib: the usual environment variables are set as the worker starts, before
it imports numpy (the libraries read them when they load), and
``threadpoolctl`` caps libraries already loaded (a fork worker inherits the
notebook's numpy). ``%config MPMagic.worker_threads = N`` sets the cap
(0: no cap at all). A variable the user already set (``OMP_NUM_THREADS=4``
in the notebook's environment) wins over the default cap, as in loky.

This module imports no IPython (workers import it).
"""

from __future__ import annotations

import logging
import os
import sys

from .cpus import available_cpus

log = logging.getLogger("mpmagic")

# The variables the common threaded libraries read at load time (loky's list).
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
)

_CAPPED_LIBS = ("numpy", "scipy", "torch", "sklearn")  # modules that load a thread pool


_setting: int | None = None  # %config MPMagic.worker_threads, pushed here by config.py


def configure(setting: int | None) -> None:
    """Set ``%config MPMagic.worker_threads`` (config.py calls this when it changes)."""
    global _setting
    _setting = setting


def configured() -> int | None:
    """``%config MPMagic.worker_threads`` (None: the default cap)."""
    return _setting


def cap_for(workers: int, setting: int | None = None) -> tuple[int | None, bool]:
    """(threads per worker, forced) for a pool of ``workers``.

    The default is ``available_cpus() // workers``, at least 1; ``setting``
    (worker_threads) > 0 forces that number, 0 means no cap (None).
    """
    if setting is None:
        return max(1, available_cpus() // max(1, workers)), False
    if setting <= 0:
        return None, True
    return setting, True


def limit_in_worker(n: int | None, forced: bool = False) -> None:
    """In a starting worker: cap BLAS/OpenMP threads at ``n`` (None: leave them)."""
    if not n:
        return
    for var in THREAD_VARS:
        if forced or var not in os.environ:
            os.environ[var] = str(n)
    if any(m in sys.modules for m in _CAPPED_LIBS):  # already loaded (fork): env vars came too late
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=n)
        except Exception:
            log.warning("mpmagic: could not cap the worker's BLAS/OpenMP threads at %s", n, exc_info=True)


def threads_per_worker(cpu_seconds: float | None, task_seconds: float) -> float | None:
    """Average busy threads per worker during a run: its CPU time over its task time.

    Above 1, the tasks ran several threads each (BLAS, OpenMP).
    """
    if not cpu_seconds or task_seconds <= 0.05:
        return None
    return cpu_seconds / task_seconds


__all__ = ["THREAD_VARS", "cap_for", "limit_in_worker", "threads_per_worker"]
