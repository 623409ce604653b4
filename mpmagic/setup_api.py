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
    errors = apply_now("on_worker_start")
    if errors:
        more = f" (and on {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise MPMagicError(errors[0] + more)
    return func


def apply_now(what: str | None = None) -> list[str]:
    """Send the current setup to the running workers of the current pool, if it runs.

    Returns the one-line errors of workers whose setup failed. A pool that is
    not running yet gets the setup when its workers start. ``what``: the
    caller, as an interrupt names it (see :func:`run_everywhere`).
    """
    __tracebackhide__ = True
    backend = pool.current_pool()
    if backend is None or not backend.running:
        return []
    return run_everywhere(what)


def run_everywhere(what: str | None = None) -> list[str]:
    """Run the current setup in every worker of the current pool now (starting it).

    What the setup printed is shown here, labelled ``[worker N]``; returns the
    one-line errors of the workers where it failed (the caller raises them).
    An interrupt stops only the waiting: the workers go on with the setup,
    and the one-line KeyboardInterrupt says so and what to do. ``what`` names
    the caller in it (by default ``%%pool setup``, or ``%pool setup clear``
    once there is no setup).
    """
    __tracebackhide__ = True
    hook = getattr(pool.get_pool(), "apply_setup", None)
    if hook is None:
        return []
    printed: list[str] = []
    try:
        with worker_setup.explicit() as printed:
            errors = hook(wait=True) or []
    except KeyboardInterrupt:
        raise _interrupted(what) from None
    finally:
        shown = "".join(printed)  # (what came before an interrupt too)
        if shown:
            sys.stdout.write(shown)
    return errors


def _interrupted(what: str | None) -> KeyboardInterrupt:
    """The one line of a setup wait that was interrupted: the setup's state, and what to do."""
    from .background import interrupted

    if worker_setup.has_setup():
        return interrupted(
            f"{what or '%%pool setup'} interrupted: the worker setup stays installed (%pool setup shows it) and "
            "the workers go on running it (a run waits for it); %pool setup clear removes it, "
            "then %pool restart stops workers still in it"
        )
    return interrupted(
        f"{what or '%pool setup clear'} interrupted: the worker setup is removed; workers still running it "
        "drop its names when it ends (%pool restart stops them now)"
    )


__all__ = ["on_worker_start", "apply_now", "run_everywhere"]
