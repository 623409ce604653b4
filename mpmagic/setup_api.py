"""Applying the worker setup to the current pool, from the notebook.

``worker_setup.py`` keeps the setup and runs it in workers; it sits below the
pool (every worker imports it), so the functions that reach the current pool
(``%%pool setup``, ``%pool setup clear``, :func:`on_worker_start`) live here.

A setup is never changed while a run is in flight (:func:`_change`): its
workers would compute the rest of its items under the new setup, so one run
would mix results of two setups, and a ``--checkpoint`` run would store them
under the key of the setup it started with. The change is refused in one
line that names the runs and how to end them.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

from . import context, pool, worker_setup
from .errors import MPMagicError, UsageError
from .fmt import func_name
from .jobs import MapJob


class RunsInFlight(UsageError):
    """A setup change refused because runs are in flight: one line naming them and
    how to end them (the magics show it as it is, without their usage line)."""


class SetupRefused(UsageError):
    """A ``%%pool setup`` refused before anything is sent: it defines the name of a
    Python builtin (one line saying why and what to do, without a usage line)."""


def on_worker_start(func: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``func()`` in every worker, now and in every worker started later.

    Usable as a decorator. If ``func`` returns a dict, its items become names
    every mapped function and ``%%parallel`` cell of that worker can read (as
    a ``%%pool setup`` cell's names do). The port of
    ``Pool(initializer=init, initargs=args)`` is
    ``on_worker_start(functools.partial(init, *args))``: what ``init`` assigns
    with ``global`` is what tasks read, as with Pool, even where the
    notebook has its own value of that name (which a returned dict's or a
    setup cell's name would leave to the notebook). Running workers run it at
    once; a failure is one line naming the worker (and ``%pool`` shows it).
    """
    if not callable(func):
        raise UsageError(f"on_worker_start takes a function, not {type(func).__name__}")
    idle = _runs_nothing(func)
    if idle is not None:
        raise UsageError(f"on_worker_start: {worker_setup.function_name(func)[0]} is {idle}")
    world = context.world()  # (it runs in the notebook's directory, environment... of now, in every worker)
    errors = _change(lambda: worker_setup.add_function(func, world), f"on_worker_start({func_name(func)})", start=False,
                     interrupt_as="on_worker_start")
    if errors:
        more = f" (and on {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise MPMagicError(errors[0] + more)
    return func


def _runs_nothing(func: Callable[..., Any]) -> str | None:
    """Why calling ``func`` would run none of its body, or None: an ``async def`` or a generator
    function (also through ``functools.partial``). Each worker's call only made a coroutine or a
    generator, which nobody runs: the setup was reported done, its names missing, and the
    "coroutine ... was never awaited" warning charged to mpmagic's own line."""
    if inspect.iscoroutinefunction(func):
        return ("an async function: calling it only makes a coroutine, which runs nothing; give a plain "
                f"function that runs it, lambda: asyncio.run({worker_setup.function_name(func)[0]}(...))")
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        return ("a generator function: calling it only makes a generator, which runs nothing; "
                "give a plain function (return a dict of the names instead of yielding)")
    return None


def set_code(source: str, line_offset: int = 0) -> list[str]:
    """``%%pool setup``: make ``source`` the setup cell and run it in every worker now (starting the pool).

    Returns the one-line errors of workers whose setup failed. A syntax error
    raises ``SyntaxError`` and changes nothing; so does a setup defining the
    name of a Python builtin (``SetupRefused``: it would replace that builtin
    for all the code in the worker); runs in flight refuse the change (a
    ``UsageError``, see :func:`_change`). ``line_offset``: the cell's lines above
    ``source`` (the ``%%pool setup`` line), for the line a failure names.
    """
    __tracebackhide__ = True
    compile(source, worker_setup.SETUP_FILENAME, "exec", dont_inherit=True)  # (before asking about runs: the cell's own error first)
    names = setup_names(source)
    bad = worker_setup.dunder_shadowing(names) + worker_setup.shadowing(n for n in names if not n.startswith("_"))
    if bad:  # (each worker checks again what the setup really defines: names made by exec, a star import...)
        raise SetupRefused(f"%%pool setup refused, nothing was sent to the workers: {worker_setup.shadow_message(bad)}")
    world = context.world()  # (it runs in the notebook's directory, environment... of now, in every worker)
    return _change(lambda: worker_setup.set_code(source, line_offset, world), "%%pool setup", start=True)


def setup_names(source: str) -> set[str]:
    """The names a setup's code defines at its top level, as far as its text says.

    Assignments (also in ``for``, ``with``, ``if``, ``try``...), ``def``,
    ``class``, imports, the names of a ``from M import *`` when ``M`` is
    already imported here, and the names its functions declare ``global``
    (bound when a task calls them); not the locals of its functions, classes or
    comprehensions. Names only running it shows (``exec``, ``globals()[...]``,
    a star import of a module the notebook has not imported) are checked by
    each worker before it installs them (``worker_setup.shadowing``).
    """
    import ast

    from . import astlock

    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            for sub in [*node.decorator_list, *getattr(node, "bases", []), *getattr(node, "keywords", [])]:
                visit(sub)
            if not isinstance(node, ast.ClassDef):
                for default in [*node.args.defaults, *node.args.kw_defaults]:
                    if default is not None:
                        visit(default)
            return
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module != "builtins":  # (the builtins themselves: harmless)
            for a in node.names:
                if a.name != "*":
                    names.add(a.asname or a.name)
                elif not node.level and node.module in sys.modules:
                    mod = sys.modules[node.module]
                    public = getattr(mod, "__all__", None)
                    names.update(n for n in (public if public is not None else dir(mod))
                                 if isinstance(n, str) and (public is not None or not n.startswith("_")))
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names.discard(target.id)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    tree = astlock.parse(source)
    visit(tree)
    return names | worker_setup.declared_globals(tree)


def defining(name: str) -> str | None:
    """What of the current worker setup defines ``name``, as a message names it
    (``"%%pool setup"``, ``"on_worker_start(init)"``, ``"the worker setup"``), or None.

    ``%pdebug`` replays in the notebook, which lacks the setup's names: a replay
    that fails on one of them failed for that reason, and says so. The setup
    cell's text tells its names (:func:`setup_names`); the workers' replies tell
    the rest (a function's returned dict, ``global``, ``exec``).
    """
    entries = worker_setup.entries()
    codes = [e for e in entries if e.kind == "code"]
    funcs = [e.name for e in entries if e.kind == "func"]
    if any(name in setup_names(e.data) for e in codes):
        return "%%pool setup"
    if name not in worker_setup.reported_names():
        return None
    if not funcs:
        return "%%pool setup"
    return f"on_worker_start({funcs[0]})" if len(funcs) == 1 and not codes else "the worker setup"


def clear() -> list[str]:
    """``%pool setup clear``: remove the setup; running workers drop its names now.

    Refused while runs are in flight, as any setup change (:func:`_change`). With no
    setup there is nothing to remove: one line says so, and nothing is changed (it
    said "worker setup removed ... running ones dropped its names" of a setup there
    was not).
    """
    __tracebackhide__ = True
    if not worker_setup.has_setup():
        sys.stdout.write(NONE_TO_CLEAR)
        return []
    return _change(worker_setup.clear, "%pool setup clear", start=False, done=CLEARED)


CLEARED = "worker setup removed: workers started from now on run none, running ones dropped its names\n"
NONE_TO_CLEAR = "no worker setup to remove (%pool setup shows none): nothing changed\n"


def _change(change: Callable[[], None], what: str, *, start: bool, interrupt_as: str | None = None,
            done: str = "") -> list[str]:
    """Make a setup ``change`` and run the new setup in the workers; the one-line errors of those where it failed.

    Refused with a ``UsageError`` naming them while runs are in flight
    (foreground runs of any thread, background runs, streams): the backend
    holds off new runs from the check to the end of the setup's application
    (``runs_held``), so a run has one setup from its first item to its last.
    ``start``: start the pool to run it (``%%pool setup``); else only a
    running pool's workers get it now, later ones as they start.
    ``interrupt_as``: the caller, as an interrupt of the wait names it.
    ``done``: the line saying the change was made (printed first). Workers
    still running an earlier setup (a hung one, whose wait was interrupted)
    are replaced first, and one line says so (:func:`_replaced_line`): the
    change waited for that setup to end, for ever if it never did. When
    running workers had run a setup the change replaces or removes, one line
    (:data:`KEPT_NOTE`) says they keep what it did to modules and
    ``sys.path``: only its names are dropped.
    """
    __tracebackhide__ = True
    backend = pool.current_pool()
    if backend is None:  # no pool yet: nothing can be in flight
        change()
        errors = run_everywhere(interrupt_as) if start else apply_now(interrupt_as)
        sys.stdout.write(done)
        return errors
    with backend.runs_held() as busy:
        if busy:
            raise RunsInFlight(_refusal(what, busy))
        old, running = worker_setup.entries(), backend.running
        before = (backend.setup_workers() or []) if running else []
        replaced = backend.replace_setting_up() if running else []
        kept = not replaced or len(before) > len(replaced)  # (workers that ran the earlier setup stay)
        change()
        errors = run_everywhere(interrupt_as, backend) if start or backend.running else []
    sys.stdout.write(done)
    if replaced:
        sys.stdout.write(_replaced_line(replaced))
    if running and kept and any(e not in worker_setup.entries() for e in old):
        sys.stdout.write(KEPT_NOTE)
    return errors


# Shown when a setup that running workers ran is replaced or removed: its names
# go, but not what it did to modules (imports, patches) and sys.path, which new
# workers will lack; undoing that would take a restart of every worker.
KEPT_NOTE = ("mpmagic: running workers keep what earlier setups did to modules and sys.path (imports, patches, "
             "added paths), workers started from now on lack it; %pool restart for a clean start\n")


def _replaced_line(workers: list[Any]) -> str:
    """The line saying that a setup change replaced these workers, which were still running an earlier setup."""
    if len(workers) == 1:
        them = f"worker {workers[0]}, which was"
    else:
        them = f"workers {', '.join(str(w) for w in workers[:-1])} and {workers[-1]}, which were"
    return (f"mpmagic: stopped {them} still running the earlier setup (it would have run to its end first), "
            "and started new ones in their place\n")


def _refusal(what: str, runs: list[Any]) -> str:
    """The one line of a setup change refused because ``runs`` are in flight."""
    from .background import handle_of

    names, ids = [], []
    for run in runs:
        handle = handle_of(run) if run is not None else None
        if handle is not None:
            names.append(f"run {handle.id} ({handle.what})")
            ids.append(str(handle.id))
            continue
        job = run.job
        kind = {"map": "a pmap", "cell": "a %%parallel cell"}.get(job.kind, "a run")
        func = job.func if isinstance(job, MapJob) else None
        of = f" of {func_name(func)}" if func is not None else ""
        thread = run.thread
        names.append(kind + of + (f" in thread {thread!r}" if thread else ""))
    them = "it" if len(runs) == 1 else "them"
    how = f"wait for {them} to end (run.result())"
    if ids:
        how += f" or cancel {them} (cancel() on the handle; {'; '.join(f'%pool cancel {i}' for i in ids)})"
    return (f"{what} refused: {len(runs)} run{'s are' if len(runs) > 1 else ' is'} in flight ({', '.join(names)}), "
            f"whose workers would switch setups mid-run; {how}, then run {what} again")


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


def run_everywhere(what: str | None = None, backend: Any = None) -> list[str]:
    """Run the current setup in every worker of the current pool now (starting it).

    What the setup printed is shown here, labelled ``[worker N]``; returns the
    one-line errors of the workers where it failed (the caller raises them).
    An interrupt stops only the waiting: the workers go on with the setup,
    and the one-line KeyboardInterrupt says so and what to do. ``what`` names
    the caller in it (by default ``%%pool setup``, or ``%pool setup clear``
    once there is no setup). ``backend``: the pool to run it on (the current one by default).
    """
    __tracebackhide__ = True
    hook = getattr(backend if backend is not None else pool.get_pool(), "apply_setup", None)
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
            "the workers go on running it (a run waits for it); %pool setup clear removes it "
            "and replaces the workers still running it (so does a new %%pool setup)"
        )
    return interrupted(
        f"{what or '%pool setup clear'} interrupted: the worker setup is removed; workers still running it "
        "drop its names when it ends (%pool restart stops them now)"
    )


__all__ = ["RunsInFlight", "SetupRefused", "on_worker_start", "set_code", "clear", "apply_now", "run_everywhere"]
