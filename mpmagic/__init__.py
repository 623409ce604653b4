"""mpmagic: parallel map and SPMD cells for Jupyter, one magic away.

``%load_ext mpmagic`` adds ``%pmap``, ``%%parallel`` and ``%pool``. Every magic
is a thin skin over the plain API re-exported here, usable from scripts too::

    import mpmagic
    mpmagic.pmap(work, range(8))              # parallel map, results in order
    mpmagic.parallel("rank * 10", workers=4)  # run code on 4 ranks at once
    mpmagic.last_report()                     # timing against serial
"""

from __future__ import annotations

from typing import Any

from .api import RankValues, last_report, parallel, pmap
from .errors import (
    MPMagicError,
    ParallelError,
    RemoteError,
    SerializationError,
    TaskTimeoutError,
    UsageError,
    WorkerLostError,
)
from .jobs import Failed
from .pool import get_pool, pool_status, restart_pool, start_pool, stop_pool, use_dask, use_local
from .report import Report

__version__ = "0.1.0"

__all__ = [
    "pmap",
    "parallel",
    "last_report",
    "RankValues",
    "Failed",
    "Report",
    "get_pool",
    "start_pool",
    "stop_pool",
    "restart_pool",
    "use_local",
    "use_dask",
    "pool_status",
    "MPMagicError",
    "ParallelError",
    "RemoteError",
    "SerializationError",
    "TaskTimeoutError",
    "UsageError",
    "WorkerLostError",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext mpmagic``: register the magics (the pool starts on first use)."""
    from . import config
    from .magics import MPMagics

    config.register(ipython)  # %config MPMagic.<setting>, ipython_config.py defaults
    ipython.register_magics(MPMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext mpmagic``: remove the magics and stop the pool."""
    from . import config, pool

    pool.shutdown()
    config.unregister(ipython)
    magics = ipython.magics_manager.magics
    for kind, name in (("line", "pmap"), ("line", "pool"), ("cell", "parallel")):
        magics[kind].pop(name, None)
    ipython.magics_manager.registry.pop("MPMagics", None)
