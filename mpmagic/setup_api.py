"""Applying the worker setup to the current pool, from the notebook.

``worker_setup.py`` keeps the setup and runs it in workers; it sits below the
pool (every worker imports it), so the functions that reach the current pool
(``%%pool setup``, ``%pool setup clear``, :func:`on_worker_start`) live here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from . import pool, worker_setup
from .errors import MPMagicError, UsageError


def on_worker_start(func: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``func()`` in every worker, now and in every worker started later.

    Usable as a decorator. If ``func`` returns a dict, its items become names
    every mapped function and ``%%parallel`` cell of that worker can read (as
    a ``%%pool setup`` cell's names do). Running workers run it at once; a
    failure is one line naming the worker (and ``%pool`` shows it).
    """
    if not callable(func):
        raise UsageError(f"on_worker_start takes a function, not {type(func).__name__}")
    worker_setup.add_function(func)
    errors = apply_now()
    if errors:
        more = f" (and on {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise MPMagicError(errors[0] + more)
    return func


def apply_now() -> list[str]:
    """Send the current setup to the running workers of the current pool, if it runs.

    Returns the one-line errors of workers whose setup failed. A pool that is
    not running yet gets the setup when its workers start.
    """
    backend = pool.current_pool()
    if backend is None or not backend.running:
        return []
    return run_everywhere()


def run_everywhere() -> list[str]:
    """Run the current setup in every worker of the current pool now (starting it).

    What the setup printed is shown here, labelled ``[worker N]``; returns the
    one-line errors of the workers where it failed (the caller raises them).
    """
    hook = getattr(pool.get_pool(), "apply_setup", None)
    if hook is None:
        return []
    with worker_setup.explicit() as printed:
        errors = hook(wait=True) or []
        shown = "".join(printed)
    if shown:
        sys.stdout.write(shown)
    return errors


__all__ = ["on_worker_start", "apply_now", "run_everywhere"]
