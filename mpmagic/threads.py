"""Thread caps for BLAS/OpenMP (and polars, numba) in workers: no oversubscription by default.

numpy's BLAS (OpenBLAS, MKL) and OpenMP code start one thread per CPU in
*every* process. Two workers on two CPUs each running a 4-thread matrix
product keep 8 threads fighting over 2 cores. So each worker limits these
pools to ``available CPUs // workers`` threads (at least 1), as loky does for
joblib: the usual environment variables are set as the worker starts, before
it imports numpy (the libraries read them when they load), and
``threadpoolctl`` (and for numba, ``_cap_numba``) caps libraries already loaded (a fork worker inherits the
notebook's numpy). ``%config MPMagic.worker_threads = N`` sets the cap
(0: no cap at all). A variable the user set (``OMP_NUM_THREADS=4`` in the
notebook's environment when the worker starts) wins over the default cap, as
in loky, for the variable and for threadpoolctl; a user's ``OMP_NUM_THREADS``
also for the BLAS libraries that fall back to it (their own variables are
left unset unless the user set them, as in the notebook); the notebook sends its values
with each worker's start (``cap_for``), since a forkserver worker inherits the
fork server's environment, not the notebook's.

This module imports no IPython (workers import it).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from .cpus import recent_cpus

log = logging.getLogger("mpmagic")

# The variables the common threaded libraries read at load time (loky's list, polars':
# its thread pool starts one thread per CPU in each worker otherwise, and numba's, which
# ignores OMP_NUM_THREADS for its parallel=True pool).
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "POLARS_MAX_THREADS",
    "NUMBA_NUM_THREADS",
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


def cap_for(workers: int, setting: int | None = None) -> tuple[int | None, dict[str, str]]:
    """(threads per worker, the notebook's variables that win over it) for a pool of ``workers``.

    Called in the notebook as each worker starts (worker_setup.start_info).
    The default is ``recent_cpus() // workers``, at least 1; ``setting``
    (worker_threads) > 0 forces that number, 0 means no cap (None).

    The second element is what the notebook's environment says now for the
    THREAD_VARS it sets (empty when ``setting`` forces the cap): the worker
    takes these values instead of the cap. They travel with the start, not
    with the notebook's context (context.py): a forkserver worker's
    environment is the fork server's, as it was when the server started, and
    the libraries read these variables as they load, before the first
    context arrives.
    """
    notebook = {var: os.environ[var] for var in THREAD_VARS if var in os.environ}
    if setting is None:
        return max(1, recent_cpus() // max(1, workers)), notebook
    if setting <= 0:
        return None, notebook
    return setting, {}


# The variables whose library falls back to OMP_NUM_THREADS when they are unset.
_OMP_FALLBACK = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS")

# The variable each threadpoolctl library reads first (its internal_api ->
# variable); the others read OMP_NUM_THREADS.
_LIB_VARS = {"openblas": "OPENBLAS_NUM_THREADS", "mkl": "MKL_NUM_THREADS", "blis": "BLIS_NUM_THREADS"}


def limit_in_worker(n: int | None, notebook: dict[str, str]) -> list[str]:
    """In a starting worker: cap BLAS/OpenMP threads at ``n`` (None: no cap).

    ``notebook`` (from ``cap_for``): the notebook's values of THREAD_VARS,
    which win over the cap; the other variables get ``n``. Libraries already
    loaded (a fork worker inherits the notebook's numpy) are set through
    threadpoolctl to what the variables now say, the user's values included.

    Returns the variables it set: the worker's own from then on
    (``context.own_env``), also those whose value was there already. A
    forkserver worker starts with the fork server's environment: a server
    started while the notebook had ``OMP_NUM_THREADS=1`` gave it that value,
    which the cap of 1 did not change, so it was not counted as the worker's,
    and the notebook's environment, from which the user had removed it since,
    then removed it from the worker: no cap at all.
    """
    own = []
    for var in THREAD_VARS:
        if var in notebook:
            os.environ[var] = notebook[var]
            own.append(var)
        elif var in _OMP_FALLBACK and "OMP_NUM_THREADS" in notebook:
            # The user's OMP_NUM_THREADS governs these libraries when their own
            # variable is unset, as in the notebook: a cap set here was read
            # first (OpenBLAS at 1 thread in the workers, 2 in the notebook).
            os.environ.pop(var, None)
        elif n:
            os.environ[var] = str(n)
            own.append(var)
        else:
            # No cap and not set in the notebook: a value the fork server started
            # with is stale (the notebook's context removes it, but only after
            # the worker may have loaded a library that read it).
            os.environ.pop(var, None)
    if "numba" in sys.modules:  # (fork: the notebook's numba read NUMBA_NUM_THREADS already)
        _cap_numba()
    if any(m in sys.modules for m in _CAPPED_LIBS):  # already loaded (fork): env vars came too late
        try:
            from threadpoolctl import ThreadpoolController

            for lib in ThreadpoolController().lib_controllers:
                want = _threads_wanted(lib.internal_api)
                if want is not None and lib.num_threads != want:
                    lib.set_num_threads(want)
        except Exception:
            log.warning("mpmagic: could not cap the worker's BLAS/OpenMP threads at %s", n, exc_info=True)
    return own


def _cap_numba() -> None:
    """In a fork worker that inherited numba: its pool size as NUMBA_NUM_THREADS now says.

    numba read the variable at its import in the notebook. Before it launched
    its threads (no parallel=True function ran there), the size it will launch
    (its config and ``parallel.NUM_THREADS``, both read at import) is lowered
    to the cap; once launched (copied by the fork), only the threads a
    parallel region uses can be lowered (``numba.set_num_threads``).
    """
    try:
        want = int(os.environ.get("NUMBA_NUM_THREADS", ""))
    except ValueError:
        return
    try:
        numba: Any = sys.modules["numba"]
        parallel = numba.np.ufunc.parallel
        if not parallel._is_initialized:
            if want < parallel.NUM_THREADS:
                numba.config.NUMBA_NUM_THREADS = parallel.NUM_THREADS = want
        elif numba.get_num_threads() > want:
            numba.set_num_threads(min(want, numba.config.NUMBA_NUM_THREADS))
    except Exception:
        log.debug("mpmagic: numba's threads not capped at %s", want, exc_info=True)


def _threads_wanted(internal_api: str) -> int | None:
    """The thread count this worker's environment (set just before) asks of a
    loaded library, None to leave it (no value, or not a number)."""
    value = os.environ.get(_LIB_VARS.get(internal_api, "OMP_NUM_THREADS")) or os.environ.get("OMP_NUM_THREADS", "")
    try:
        n = int(value.split(",")[0])  # OMP_NUM_THREADS may list nested levels: "4,2"
    except ValueError:
        return None
    return n if n > 0 else None


def threads_per_worker(cpu_seconds: float | None, task_seconds: float) -> float | None:
    """Average busy threads per worker during a run: its CPU time over its task time.

    Above 1, the tasks ran several threads each (BLAS, OpenMP).
    """
    if not cpu_seconds or task_seconds <= 0.05:
        return None
    return cpu_seconds / task_seconds


# Libraries whose own thread pools are known to hang a forked child that uses them (their
# locks are copied held, their threads are not): polars, PyTorch, TensorFlow, JAX, gRPC.
FORK_UNSAFE = ("polars", "torch", "tensorflow", "jax", "grpc")


def os_threads() -> int | None:
    """This process's threads as the OS counts them (native pools included); None if unknown."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().num_threads())
    except Exception:
        return None


def numba_omp_used() -> bool:
    """Has numba's OpenMP threading layer run here (a ``parallel=True`` function)?

    Then a forked child that runs such a function terminates itself: numba
    prints "Terminating: fork() called from a process already using GNU
    OpenMP, this is unsafe." and raises SIGTERM in it. Never imports numba.
    """
    numba = sys.modules.get("numba")
    if numba is None:
        return False
    try:
        return bool(numba.threading_layer() == "omp")
    except Exception:  # (ValueError: no parallel function has run yet)
        return False


NUMBA_OMP_FORK = ("numba's OpenMP threading layer, used in the notebook by a parallel=True function, ends a forked "
                  "worker that runs one")


def fork_hazard() -> str | None:
    """One line to say before forking a worker from this process, or None.

    ``fork`` copies the notebook's memory, locks held by its other threads
    included, but none of those threads: a library whose native thread pool
    is running (polars once used, PyTorch...) then waits forever in the child
    for a lock nobody will release. Said when the process runs more threads
    than Python's ``threading`` knows of (native pools) and one of
    :data:`FORK_UNSAFE` is imported; BLAS pools alone (numpy's OpenBLAS
    reinitialises itself after a fork) are not enough. numba's OpenMP layer
    (:func:`numba_omp_used`) does not hang the child: it ends it.
    """
    fix = "start the pool with the default start method (forkserver) or spawn"
    if numba_omp_used():
        return f"mpmagic: {NUMBA_OMP_FORK} (the worker terminates itself with SIGTERM); {fix}"
    loaded = [name for name in FORK_UNSAFE if name in sys.modules]
    if not loaded:
        return None
    total = os_threads()
    if total is not None and total <= threading.active_count():
        return None  # (no native thread running: nothing to find held in the child)
    return (f"mpmagic: the notebook runs native thread pools and has imported {', '.join(loaded)}: fork copies their "
            f"locks but not their threads, so tasks that use them can hang in the workers; {fix}")


__all__ = [
    "FORK_UNSAFE", "THREAD_VARS", "cap_for", "fork_hazard", "limit_in_worker", "numba_omp_used", "os_threads",
    "threads_per_worker",
]
