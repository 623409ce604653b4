"""mpmagic: parallel map and SPMD cells for Jupyter, one magic away.

``%load_ext mpmagic`` adds ``%pmap``, ``%%parallel`` and ``%pool``. Every magic
is a thin skin over the plain API re-exported here, usable from scripts too::

    import mpmagic
    mpmagic.pmap(work, range(8))              # parallel map, results in order
    mpmagic.parallel("rank * 10", workers=4)  # run code on 4 ranks at once
    mpmagic.last_report()                     # timing against serial
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import (
    ArgumentTypeError,
    MPMagicError,
    ParallelError,
    RankStoppedError,
    ReduceError,
    RemoteError,
    SerializationError,
    TaskTimeoutError,
    UsageError,
    WorkerLostError,
)
from .loadstamps import install as _note_loads

# Note the file of each module the notebook (re)loads from now on, so a run can
# tell when a worker would load another version of it (loadstamps.py; a local
# pool's worker reports its own loads of the user's files: worker.main).
_note_loads()

# The rest of the API is imported on first use (PEP 562). Why: every worker
# process and the forkserver import this package (``mpmagic.worker``), and
# the notebook-side modules (api, pool, jobs, reports, progress bars...) took
# ~100 ms of that and ~10 MB per worker, on the path of the first %pmap.
_LAZY = {
    "pmap": "api",
    "parallel": "api",
    "last_report": "api",
    "RankValues": "api",
    "Run": "background",
    "submit": "api",
    "call": "api",
    "runs": "background",
    "as_completed": "background",
    "apmap": "api",
    "imap": "streaming",
    "Failed": "jobs",
    "last_failures": "debugging",
    "rerun_failed": "postmortem",
    "get_pool": "pool",
    "pool_status": "pool",
    "restart_pool": "pool",
    "start_pool": "pool",
    "stop_pool": "pool",
    "use_dask": "pool",
    "use_local": "pool",
    "Report": "report",
    "Array": "shared",
    "Event": "shared",
    "Lock": "shared",
    "Queue": "shared",
    "QueueClosed": "shared",
    "RLock": "shared",
    "SharedObjectGone": "shared",
    "Value": "shared",
    "share": "shm",
    "on_worker_start": "setup_api",
    "worker_id": "worker_setup",
    "rng": "seeding",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported eagerly
    from .api import RankValues, apmap, call, last_report, parallel, pmap, submit
    from .background import Run, as_completed, runs
    from .debugging import last_failures
    from .jobs import Failed
    from .pool import (
        get_pool,
        pool_status,
        restart_pool,
        start_pool,
        stop_pool,
        use_dask,
        use_local,
    )
    from .postmortem import rerun_failed
    from .report import Report
    from .seeding import rng
    from .setup_api import on_worker_start
    from .shared import Array, Event, Lock, Queue, QueueClosed, RLock, SharedObjectGone, Value
    from .shm import share
    from .streaming import imap
    from .worker_setup import worker_id

if TYPE_CHECKING:  # annotations only, not part of the API
    from .backends.base import Backend as _Backend


@contextlib.contextmanager
def _room_to_import() -> Iterator[None]:
    """mpmagic's own modules load with a recursion limit of at least 1000, the
    notebook's put back after. ``sys.setrecursionlimit(100)``, which the user's
    code was fine with serially, made the first ``pmap`` raise RecursionError
    inside these imports (importlib, tempfile, re's parser). The limit sent to
    the workers is read later, in the call: the notebook's own."""
    limit = sys.getrecursionlimit()
    if limit >= _IMPORT_DEPTH:
        yield
        return
    sys.setrecursionlimit(_IMPORT_DEPTH)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


_IMPORT_DEPTH = 1000


if not TYPE_CHECKING:  # hidden from type checkers: they see the imports above, and a
    # misspelled name (mpmagic.pmapp, from mpmagic import submitt) is an error, not Any

    def __getattr__(name: str) -> Any:
        """Import a public name (or a submodule, ``mpmagic.pool``...) on first use."""
        module = _LAZY.get(name)
        with _room_to_import():
            if module is not None:
                value = getattr(importlib.import_module(f".{module}", __name__), name)
            else:
                try:
                    value = importlib.import_module(f".{name}", __name__)
                except ModuleNotFoundError:
                    raise AttributeError(f"module 'mpmagic' has no attribute {name!r}") from None
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__version__ = "0.1.0"

__all__ = [
    "pmap",
    "parallel",
    "last_report",
    "RankValues",
    "Run",
    "submit",
    "call",
    "imap",
    "as_completed",
    "apmap",
    "runs",
    "Failed",
    "last_failures",
    "rerun_failed",
    "Report",
    "get_pool",
    "start_pool",
    "stop_pool",
    "restart_pool",
    "use_local",
    "use_dask",
    "pool_status",
    "share",
    "on_worker_start",
    "worker_id",
    "rng",
    "Queue",
    "Value",
    "Array",
    "Lock",
    "RLock",
    "Event",
    "QueueClosed",
    "SharedObjectGone",
    "ArgumentTypeError",
    "MPMagicError",
    "ParallelError",
    "RankStoppedError",
    "ReduceError",
    "RemoteError",
    "SerializationError",
    "TaskTimeoutError",
    "UsageError",
    "WorkerLostError",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext mpmagic``: register the magics and start the pool in the background."""
    from . import config
    from .errors import install_display
    from .magics import MPMagics

    install_display(ipython)  # a task's error shows the cell line and its own frames, none of ours
    config.register(ipython)  # %config MPMagic.<setting>, ipython_config.py defaults
    ipython.register_magics(MPMagics)
    from .debug_magics import DebugMagics

    ipython.register_magics(DebugMagics)  # %pdebug
    from . import pandas_hook

    pandas_hook.install()  # df.mp now if pandas is imported, else as soon as it is
    if _after_cell not in ipython.events.callbacks["post_run_cell"]:  # warm: idle workers import
        ipython.events.register("post_run_cell", _after_cell)  # what each cell imported
    from . import exiting, pool

    exiting.watch_shell(pool.at_shell_exit, ipython)  # (also for the user's own multiprocessing helpers)
    exiting.kill_on_sigterm(pool.kill_workers_now)  # a SIGTERMed kernel's workers go with it (reliability.md §4)
    from . import warmup

    warmup.follow_autoreload()  # IPython's in-place %autoreload counts as a reload (workers follow it)
    _prestart_pool()


def _after_cell(*_args: Any) -> None:
    """IPython ``post_run_cell`` hook: the local pool's workers import, in the
    background, the modules the notebook has imported so far (``warmup.py``).

    Runs after every cell, so it is cheap (a scan of the user's names, ~0.1 ms
    per thousand, skipped while it would cost over ~1% of the session: see
    ``warmup.notebook_modules_after_cell``), never waits (the pool's manager sends the imports) and never raises.

    Not even KeyboardInterrupt: one that lands here is dropped. The cell it was
    meant for has already ended (and succeeded, or IPython would say so), while
    IPython would print "Error in callback ..." with our frames and mark that
    finished cell as failed. Deferring it has no good target: re-raised after
    the hook it lands in IPython's or ipykernel's reply code (a lost reply,
    see interrupts.py), and kept for later it would stop the next cell, which
    the user has not asked to stop. Dropped, it is what the same press a
    moment later, once the kernel had replied, would have been: nothing. The
    warming itself runs with SIGINT deferred, so a press cannot cut it half
    done (modules recorded as wanted but never sent); the deferred press is
    then dropped with the rest.
    """
    try:
        from . import pool, warmup
        from .backends.local import LocalBackend
        from .engine import sigint_deferred

        with sigint_deferred():
            warmup.follow_autoreload()  # (a %load_ext autoreload in this cell: its next reload is followed)
            backend = pool.current_pool()
            if not isinstance(backend, LocalBackend) or not warmup.enabled():
                return  # no local pool yet: its start scans the notebook itself
            try:
                names = warmup.notebook_modules_after_cell()  # (None: skipped, see there)
                if names is not None:
                    backend.preload(names)
            except Exception:
                logging.getLogger("mpmagic").debug("mpmagic: warming the workers after a cell failed", exc_info=True)
    except KeyboardInterrupt:
        logging.getLogger("mpmagic").debug("mpmagic: an interrupt after the cell had ended was dropped")


def _prestart_pool() -> None:
    """Start the local pool in a background thread, so the first ``%pmap`` finds it warm.

    The load returns at once. Skipped when ``MPMAGIC_PRESTART=0``, or when
    ``__main__`` is a script's (starting a child would then have to hide it,
    which is not safe while the user's code runs).

    The pool is made with the settings ``ipython_config.py`` gave (``workers``,
    ``start_method``; ``config.register`` read them before this): made with the
    defaults, the first run replaced it, and paid the cold start it is there to hide.
    """
    import os
    import threading

    from . import config, pool
    from .backends.local import LocalBackend, can_start_in_background
    from .errors import UsageError

    if os.environ.get("MPMAGIC_PRESTART", "1") == "0" or not can_start_in_background():
        return
    if pool.current_pool() is None:
        settings = config.current()
        try:
            pool.get_pool(*settings.pending_pool_settings())
        except UsageError:  # (a start method this platform lacks: the first run says so)
            return
        settings.take_pool_settings()  # applied: the first run keeps this pool
    backend = pool.get_pool()
    if isinstance(backend, LocalBackend) and not backend.running:
        threading.Thread(target=_start_if_current, args=(backend,), daemon=True, name="mpmagic-prestart").start()


def _start_if_current(backend: _Backend) -> None:
    from . import pool

    try:
        with pool._lock:  # not if it was stopped or replaced meanwhile
            if pool.current_pool() is backend and not backend.running:
                backend.start()
    except Exception:  # the first call starts it again and reports what is wrong
        logging.getLogger("mpmagic").info("mpmagic: starting the pool in the background failed", exc_info=True)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext mpmagic``: remove the magics and stop the pool.

    The shell's exit hook (``exiting.watch_shell``) stays: multiprocessing's
    fork server and resource tracker outlive the pool (helpers still
    referenced need the tracker, the user's own processes the fork server),
    and a kernel's shutdown must still stop them and free what is left.
    Without it, Jupyter SIGTERMed the kernel ~2.6 s into its shutdown, before
    the exit hooks that unlink a ``share()`` array's segment ran.
    """
    from . import config, pool
    from .errors import uninstall_display

    pool.shutdown()
    uninstall_display(ipython)
    if _after_cell in ipython.events.callbacks["post_run_cell"]:
        ipython.events.unregister("post_run_cell", _after_cell)
    config.unregister(ipython)
    if "mpmagic.pandas_hook" in sys.modules:
        sys.modules["mpmagic.pandas_hook"].uninstall()
    if "mpmagic.pandas_accessor" in sys.modules:
        sys.modules["mpmagic.pandas_accessor"].unregister()
    magics = ipython.magics_manager.magics
    for kind, name in (("line", "pmap"), ("line", "pool"), ("cell", "pool"), ("cell", "parallel"), ("line", "pdebug")):
        magics[kind].pop(name, None)
    ipython.magics_manager.registry.pop("MPMagics", None)
    ipython.magics_manager.registry.pop("DebugMagics", None)


# A script's df.mp: now if pandas is imported (`import pandas; import mpmagic`), else as soon
# as it is: isort and ruff sort `import mpmagic` before `import pandas`, and DataFrames had no
# `.mp` there (only %load_ext waited for pandas). A finder, no import of pandas (pandas_hook.py).
from . import pandas_hook as _pandas_hook  # noqa: E402

_pandas_hook.install()
