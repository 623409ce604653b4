"""After a failed run: replay an item under the debugger, re-run what failed.

The last run's record is kept by :mod:`mpmagic.debugging` (``api.py`` records
every ``pmap`` and ``parallel``, with the very payload bytes its workers
loaded). From it:

* :func:`replay` (``%pdebug``) runs the failing item (or rank) here, from
  those bytes, under IPython's debugger, stopped at the line that raised;
  where the replay does not fail, it shows the worker's traceback and locals;
* :func:`rerun_failed` (``%pmap --rerun-failed``) runs only the items that
  failed (or never ran) again, with the function's new definition, and
  returns the full result list.

This module sits above ``api.py`` (it calls ``api.pmap``); the debugger is
imported only when a replay needs it.
"""

from __future__ import annotations

import ast
import builtins
import functools
import sys
import types
from typing import Any

from . import api, payload, shm
from .background import Finished
from .cell import CellSpec, run_cell_code
from .debugging import (
    MISSING,
    FailureInfo,
    LastRun,
    background_since,
    exception_line,
    last_run,
    set_last_run,
)
from .errors import (
    RankStoppedError,
    RemoteError,
    TaskTimeoutError,
    UsageError,
    cell_file,
    one_line,
    one_line_interrupt,
    renumber_items,
    unsafe_here,
    without_our_frames,
)
from .fmt import func_name
from .jobs import Failed
from .shared.base import collect_attached

# --------------------------------------------------------------------------
# Re-running what failed


def rerun_failed(func: Any = None, namespace: dict | None = None, **options: Any) -> list:
    """Run the failed items of the last ``pmap`` again; return the full results.

    The function is ``func`` if given, else the last run's function found
    again the way its call named it, in ``namespace`` (the notebook's, by
    default), so a function fixed and redefined since is the one used: FUNC of
    a ``%pmap`` line that is a name or a dotted name (``inv``, ``m.transform``)
    is looked up again; a function given to ``pmap()`` (what this has is the
    function object) is looked up by its qualified name if a ``def`` of the
    notebook made it (``inv``, ``Model.transform``), and a module's function is
    used as it is (the workers run its module's code as it is now). Anything
    else (a lambda, a closure, a bound method, a partial, FUNC written as another
    expression, a name no longer defined) re-runs the last run's own function,
    and a line says so; never another object that shares its ``__name__``.
    Items that
    succeeded keep their results; with ``errors="raise"``, items the failed
    run never reached run too. ``options`` override the last run's
    (``workers``, ``chunksize``, ``timeout``, ``retries``...: ``pmap``'s, but
    ``star``, ``errors`` and ``block``, which a re-run keeps). The last run is
    the last blocking one of this thread: a background run or an ``imap``
    stream started since keeps its own failures on its handle and leaves
    that run to re-run (a line says so when such a run failed).
    """
    __tracebackhide__ = True  # (IPython's traceback shows the user's frames, not this one)
    _check_rerun_options(options)
    last = last_run()
    if last is not None and last.kind == "cell" and last.failures:
        raise UsageError("rerun_failed() (--rerun-failed) re-runs the failed items of a pmap, and the last run "
                         "was a parallel cell that failed: run the cell again")
    if last is None:
        raise UsageError("no failed pmap run to re-run: no blocking run of this thread has ended yet"
                         f"{since_hint('re-run')}")
    if last.kind != "map" or not last.failures:
        raise UsageError(f"no failed pmap run to re-run: the last run had no failures{since_hint('re-run')}")
    if getattr(last.func, "mpmagic_item", None) is not None:  # seed= (seeding.Seeded)
        raise UsageError(
            "the last run used seed= (--seed): run the same call again instead (an item's random stream comes "
            "from its index in the whole input, so re-running some items on their own would draw other numbers)"
        )
    if last.checkpointed:
        from . import config

        by_default = " (%config MPMagic.checkpoint is on; --no-checkpoint runs a call without it)" if (
            config.current().checkpoint) else ""
        raise UsageError(
            f"the last run used checkpoint= (--checkpoint){by_default}: run the same call again instead, which takes the stored "
            "results and runs only the items that failed or never ran while the function's code is unchanged "
            "(a fixed function is a new key: every item runs again)"
        )
    if last.results is None:
        raise UsageError(
            "the last run's input was read as it went and not kept (an iterator, an iterable that is not a "
            "sequence, set or mapping, or a numpy array or pandas object, which is not copied), so its missing items cannot be sent again: run it with "
            "errors='collect' (or over a list) to be able to re-run what failed"
        )
    func_text = None  # (a function given here is named by no line: see _rerun_function)
    which = None
    if func is None:
        func, which = _rerun_function(last, namespace)
        func_text = last.func_text
    note = _failed_since_note(f"re-running the failed items of the last blocking pmap ({func_name(last.func)})")
    for line in (note, which):
        if line:
            print(line)
    full = list(last.results)
    todo = [i for i, r in enumerate(full) if r is MISSING or isinstance(r, Failed)]
    items = [full[i].item if isinstance(full[i], Failed) else last.inputs[i] for i in todo]
    kwargs = {**last.options, **options, "errors": "collect" if last.collect else "raise"}
    try:
        again = api.pmap(func, items, star=last.star, **kwargs)
    except KeyboardInterrupt:
        set_last_run(last)  # nothing changed: the same failures can be re-run again
        raise
    except BaseException as exc:
        renumber_items(exc, todo)  # ("raised by item 3 of the input": the user's input, not the re-run's)
        ran = last_run()  # (the re-run's record, when it ran: api.pmap records a run that raised)
        if ran is None or ran is last:
            _remember_rerun(last, func, full, [], func_text)
        else:
            info = ran.failures[0] if ran.failures else None
            if info is not None and info.index is not None:
                info.index, info.item = todo[info.index], items[info.index]
            # Items that finished before the failure keep their results: a re-run runs them no more.
            for i, r in zip(todo, ran.results or (), strict=False):
                if r is not MISSING:
                    full[i] = r
            _renumber_report(api.last_report(), todo, full)
            _remember_rerun(last, func, full, [info] if info is not None else [], func_text)
        # The error's traceback keeps this frame (a time-out's, a lost worker's: made here): not
        # the record it replaced too, whose error's frame held the one before, and so on for
        # every failed re-run of the session.
        del last, ran
        raise
    failures = []
    for i, r in zip(todo, again, strict=True):
        if isinstance(r, Failed):
            renumber_items(r.error, todo)  # (a lost worker's, a time-out's line names the item: the input's)
            info = r.info if r.info is not None else FailureInfo(r.error)
            r = Failed(i, r.item, r.error, info)
            info.index, info.item = i, r.item
            failures.append(info)
        full[i] = r
    _remember_rerun(last, func, full, failures, func_text)
    return full


#: The ``pmap`` options a re-run keeps from the last run (its input's shape, how errors end it)
#: or fixes itself (it waits for the results it merges).
_RERUN_KEEPS = ("star", "errors", "block")


def _check_rerun_options(options: dict[str, Any]) -> None:
    """``rerun_failed``'s ``**options``: ``pmap``'s, but those a re-run keeps, checked
    before anything runs. ``bogus=1`` was Python's TypeError naming ``pmap()``, a
    function the user did not call; ``star=`` one about "multiple values"."""
    __tracebackhide__ = True
    for name in options:
        if name in _RERUN_KEEPS:
            raise UsageError(f"rerun_failed() takes no {name}=: a re-run keeps the last run's input, star and errors, "
                             "and returns the full results; run the whole pmap again to change it")
        if name not in _rerun_takes():
            raise one_line(TypeError(f"rerun_failed() got an unexpected keyword argument {name!r}; besides func and "
                                     f"namespace it takes pmap's options {', '.join(_rerun_takes())}"))


def _rerun_takes() -> list[str]:
    """The keyword options of ``pmap`` that ``rerun_failed`` passes on (all but ``_RERUN_KEEPS``)."""
    import inspect

    return [name for name, p in inspect.signature(api.pmap).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _RERUN_KEEPS]


def _renumber_report(report: Any, todo: list[int], full: list) -> None:
    """A raising re-run's report, in the user's input: the item it failed at, and the
    items that have a result (kept or re-run) of the whole input."""
    if report is None or report.kind != "pmap":
        return
    if report.failed_at is not None and 0 <= report.failed_at < len(todo):
        report.failed_at = todo[report.failed_at]
    report.items = sum(1 for r in full if r is not MISSING and not isinstance(r, Failed))
    report.total = len(full)


# What %pdebug and --rerun-failed say of the background runs and imap streams
# started since the last blocking run: they act on that blocking run (whose
# failures a later --bg run, failed or not, must not take away), and a
# background run keeps its own failures on its handle.


def _failed_since() -> tuple[Any, str | None] | None:
    """(handle, errors option) of the newest background run or stream started since
    the last blocking run that has failed (or has failed items); in place of a handle
    dropped since (a failed imap loop's stream), the record of its end."""
    failed = [(run, errors) for run, errors in background_since() if run.state == "failed" or run.items_failed]
    return failed[-1] if failed else None


def _where_failures_are(run: Any, errors: str | None, action: str) -> str:
    """Where a background run's (or stream's) failures are, by how it ended; and how
    to get what ``action`` ("replay", "re-run") would need of them. ``run`` is its
    handle, or once that was dropped (a failed imap loop's stream), the record of its end."""
    held = not isinstance(run, Finished)
    stream = run.what.startswith("imap ")
    if stream and run.state == "failed":  # (an error no item raised itself ended it: the input's, ...)
        where = "its loop raised its error" + (" (the stream's .run.exception() has it)" if held else "")
    elif stream:  # an item's failure did not end it: its loop got each one in its place
        where = ("its loop got each failed item as an mpmagic.Failed in its place" if errors == "collect"
                 else "its loop raised each failed item's error in its place")
    elif run.state != "failed":  # errors="collect": it ended, its failed items in place
        where = ("its failed items are in its results: [r.item for r in run.result() if isinstance(r, mpmagic.Failed)]"
                 if held else "its failed items were in its results, which went with its handle (dropped since)")
    else:
        where = "its error is run.exception() on its handle" if held else "its handle was dropped, and its error with it"
    if action == "replay":
        return where + (" (run the same map as a blocking %pmap or pmap() to replay a failure with %pdebug)" if stream
                        else " (run its call without --bg to replay a failure with %pdebug)")
    if run.state == "failed" and errors == "raise" and not stream:
        where += ("; it stopped at its first failure: run it again with --errors collect (errors='collect') to get "
                  "every failed item as an mpmagic.Failed in its results")
    return where


def since_hint(action: str) -> str:
    """The end of a refusal of %pdebug or --rerun-failed (``action``: "replay",
    "re-run"): where a background run's failures are, if one started since."""
    failed = _failed_since()
    if failed is not None:
        run, errors = failed
        return (f"; run {run.id} ({run.what}), started in the background since, {_how_it_failed(run)}, and a "
                f"background run or an imap stream keeps nothing to {action}: {_where_failures_are(run, errors, action)}")
    if background_since():
        return (f" (a background run or an imap stream started since keeps nothing to {action}: a failed one "
                "keeps its failures on its handle)")
    return ""


def _failed_since_note(doing: str) -> str | None:
    """The line %pdebug and --rerun-failed print before they act on the last blocking
    run when a background run or stream started since has failed: which run they
    act on, and where that other run's failures are."""
    failed = _failed_since()
    if failed is None:
        return None
    run, errors = failed
    action = "replay" if doing.startswith("replaying") else "re-run"
    return (f"mpmagic: {doing}; run {run.id} ({run.what}), started in the background since, "
            f"{_how_it_failed(run)} too, and is not {'replayed' if action == 'replay' else 're-run'}: "
            f"{_where_failures_are(run, errors, action)}")


def _how_it_failed(run: Any) -> str:
    """``failed`` (it raised), or ``had 2 failed items`` (errors="collect": it ended with them in place)."""
    if run.state == "failed":
        return "failed"
    n = run.items_failed
    return f"had {n} failed {'item' if n == 1 else 'items'}"


def _remember_rerun(last: LastRun, func: Any, full: list, failures: list[FailureInfo],
                    func_text: str | None = None) -> None:
    """After a re-run, the merged run is the last run (for last_failures, %pdebug).
    ``func_text``: how the call named ``func`` (``LastRun.func_text``), if it did by a name."""
    ran = last_run()  # the re-run itself: its payload is the new function's (and how its items travelled)
    now = ran if ran is not None and ran is not last else last
    set_last_run(LastRun(
        "map", now.payload, failures, func=func, star=last.star,
        collect=last.collect, options=last.options, results=full if failures else None, inputs=last.inputs,
        lent=now.lent, loads_mark=now.loads_mark,
        func_text=func_text,
    ))


#: How a line about the re-run's function ends: how to run another one.
_PASS_IT = "to run a fixed one, pass it: %pmap --rerun-failed FUNC (rerun_failed(func))"


def _rerun_function(last: LastRun, namespace: dict | None) -> tuple[Any, str | None]:
    """The function a re-run uses when none is given, and the line to print first (or None).

    It is found again the way the failed run's call named it, so a definition
    fixed since is the one used, and never another object that merely shares
    the function's ``__name__`` (a global ``transform`` for ``m.transform``, a
    notebook ``sqrt`` for ``math.sqrt``):

    * FUNC of the ``%pmap`` line (``LastRun.func_text``) that is a name or a
      dotted name (``inv``, ``m.transform``, ``math.sqrt``) is looked up again
      in ``namespace`` (the notebook's by default);
    * otherwise (``pmap(func)``, what ``rerun_failed()`` has is the function
      object) a function defined by ``def`` in the notebook (a class's method
      too) is looked up by its qualified name there (``inv``, ``Model.transform``),
      and a module's function is used as it is: it goes to the workers by
      reference, so they run the module's code as it is now.

    Anything else re-runs the failed run's own function object, with a line
    saying so and why: FUNC written as another expression (a lambda,
    ``partial(f, 2)``: not evaluated again), a name no longer defined
    (``%reset``), a lambda, a closure, a method bound to an object, a
    ``functools.partial`` given to ``pmap()``. A name found again whose code is
    still an earlier definition (an object made before its class was fixed, a
    closure made by the earlier outer function) runs, with a line saying so.
    """
    if namespace is None:
        namespace = _notebook_namespace()
    func, text = last.func, last.func_text
    if text is not None:
        path = _dotted_name(text)
        if path is None:
            return func, _as_it_was(func, f"FUNC was the expression `{text}`, which is not evaluated again (a name, "
                                          "or a dotted name such as m.transform, is looked up again)")
        try:
            found = _lookup(path, namespace)
        except NameError:
            return func, _as_it_was(func, f"`{path}` is no longer defined in the notebook")
        except Exception as exc:
            return func, _as_it_was(func, f"`{path}` cannot be looked up now ({exception_line(exc)})")
        if not callable(found):
            return func, _as_it_was(func, f"`{path}` now names a {type(found).__name__}, not a function")
        return found, _earlier_code(found, path, namespace)
    path = _notebook_def(func, namespace)
    if path is not None:
        try:
            found = _lookup(path, namespace)
        except Exception:
            return func, _as_it_was(func, f"`{path}` is no longer defined in the notebook")
        if not callable(found):
            return func, _as_it_was(func, f"`{path}` now names a {type(found).__name__}, not a function")
        return found, None
    if _by_reference(func):
        return func, None
    return func, _as_it_was(func, _no_name(func))


def _as_it_was(func: Any, why: str) -> str:
    """The line said when a re-run uses the failed run's own function: which code runs, and why."""
    return f"mpmagic: the re-run uses the last run's function {func_name(func)} as it was then: {why}; {_PASS_IT}"


def _dotted_name(text: str) -> str | None:
    """``text`` (FUNC as the line wrote it) as a dotted name (``m.transform``), or None
    if it is another expression (a lambda, a call, a subscript)."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _lookup(path: str, namespace: dict) -> Any:
    """The object ``path`` (``m.transform``) names in ``namespace``, builtins after it
    (NameError for a first name that neither has, as Python's)."""
    first, *rest = path.split(".")
    if first in namespace:
        obj = namespace[first]
    elif first in vars(builtins):  # (as Python looks a builtin up; not hasattr: see cell.make_cell_spec)
        obj = vars(builtins)[first]
    else:
        raise NameError(f"name {first!r} is not defined", name=first)
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _notebook_def(func: Any, namespace: dict) -> str | None:
    """The qualified name of ``func`` if a ``def`` of the notebook (of ``namespace``)
    made it, at its top level or in a class there: how it is looked up again."""
    if not isinstance(func, types.FunctionType) or func.__name__ == "<lambda>" or "<locals>" in func.__qualname__:
        return None
    ours = func.__globals__ is namespace or func.__module__ in ("__main__", namespace.get("__name__"))
    return func.__qualname__ if ours else None


def _by_reference(func: Any) -> bool:
    """Is ``func`` a module's function (or builtin), sent to the workers by its module
    and name, so that they run its module's code as it is now?"""
    if isinstance(func, (functools.partial, types.MethodType)) or getattr(func, "__name__", "<lambda>") == "<lambda>":
        return False
    module = getattr(func, "__module__", None)
    qualname = str(getattr(func, "__qualname__", None) or getattr(func, "__name__", "<"))
    return isinstance(module, str) and module not in ("__main__", "__mp_main__") and "<" not in qualname


def _no_name(func: Any) -> str:
    """Why ``func`` (given to ``pmap()``) cannot be looked up again in the notebook."""
    if isinstance(func, functools.partial):
        return "a functools.partial keeps the function it was made with"
    if isinstance(func, types.MethodType):
        return (f"a method bound to an object ({getattr(func, '__qualname__', func_name(func))}) runs on that object "
                "with the code its class had")
    qualname = getattr(func, "__qualname__", "")
    if getattr(func, "__name__", None) == "<lambda>":
        return "a lambda has no name to look it up by again"
    if "<locals>" in qualname:
        return (f"it was made inside {qualname.split('.<locals>', 1)[0]}() (a closure), so it has no name in the "
                "notebook to look it up by again")
    return f"a {type(func).__name__} object has no name in the notebook to look it up by again"


def _earlier_code(found: Any, path: str, namespace: dict) -> str | None:
    """The line to say when ``found`` (what ``path`` names now) still runs an earlier
    definition of a notebook function: an object made before its class was defined
    again, an alias of a function defined again since, a closure made by an
    earlier definition of the function that makes it. None otherwise."""
    fn = getattr(found, "__func__", found)
    if not isinstance(fn, types.FunctionType) or fn.__module__ != "__main__" or fn.__name__ == "<lambda>":
        return None
    qualname = fn.__qualname__
    if "<locals>" in qualname:
        outer_name = qualname.split(".<locals>", 1)[0]
        try:
            outer = _lookup(outer_name, namespace)
        except Exception:
            return None
        outer = getattr(outer, "__func__", outer)
        if isinstance(outer, types.FunctionType) and not _holds_code(outer.__code__, fn.__code__):
            return (f"mpmagic: `{path}` was made by an earlier definition of {outer_name}() and re-runs the code it "
                    f"had then: make it again with the current {outer_name}(), or {_PASS_IT}")
        return None
    try:
        current = _lookup(qualname, namespace)
    except Exception:
        return None
    current = getattr(current, "__func__", current)
    if current is fn or not isinstance(current, types.FunctionType):
        return None
    if found is not fn:  # a method bound to an object
        return (f"mpmagic: `{path}` is a method of an object made before {qualname} was defined again, and re-runs "
                f"the code it had then: make the object again, or {_PASS_IT}")
    return (f"mpmagic: `{path}` is an earlier definition of {qualname}, which the notebook has defined again since, "
            f"and re-runs the code it had then; {_PASS_IT}")


def _holds_code(outer: types.CodeType, inner: types.CodeType) -> bool:
    """Is ``inner`` among the code objects ``outer`` makes functions of (at any depth)?"""
    return any(c is inner or (isinstance(c, types.CodeType) and _holds_code(c, inner)) for c in outer.co_consts)


def _notebook_namespace() -> dict:
    """The notebook's variables (IPython's user namespace, else ``__main__``'s)."""
    namespace = getattr(sys.modules.get("__main__"), "__dict__", {})
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)  # (loaded only if in use)
    shell = get_ipython() if get_ipython is not None else None
    return shell.user_ns if shell is not None else namespace


# --------------------------------------------------------------------------
# Replay under the debugger


#: What %pdebug (replay) says when this thread has no blocking run on record.
NO_RUN = ("no run to debug yet: run a %pmap or %%parallel cell first (an interrupted run, a --bg run or an imap "
          "stream leaves nothing to replay)")


def _pick(which: int | None) -> tuple[LastRun, FailureInfo, str | None]:
    """The last run, the failure ``%pdebug [which]`` replays, and the line that says
    which failures plain ``%pdebug`` passed over, if any (see :func:`_first_raised`)."""
    last = last_run()
    if last is None:
        raise UsageError(f"{NO_RUN}{since_hint('replay')}")
    if not last.failures:
        raise UsageError(f"no failure to debug: the last %pmap or %%parallel run did not fail{since_hint('replay')}")
    if which is None:
        return (last, *_first_raised(last))
    found = [f for f in last.failures if (f.rank if last.kind == "cell" else f.index) == which]
    if not found:
        kind = "rank" if last.kind == "cell" else "item"
        known = ", ".join(f.label for f in last.failures[:10])
        raise UsageError(f"{kind} {which} did not fail in the last run; the failures are: {known}")
    return last, found[0], None


def _first_raised(last: LastRun) -> tuple[FailureInfo, str | None]:
    """The failure plain ``%pdebug`` replays: the first one (a map's in input order; a
    cell's in the order its ranks failed, the cause first, as its ``ParallelError``
    names it) that its code raised. A rank mpmagic stopped because another failed,
    an item or rank that ran past its timeout or whose worker died, is passed over
    (``unsafe_here``: it is not replayed), and the second value is the line that says
    so (printed only when the replay starts); when every failure is such, the first,
    whose refusal says why."""
    failures = last.failures
    if last.kind == "cell" and last.in_time:
        by_rank = {f.rank: f for f in failures}
        failures = [by_rank[r] for r in last.in_time if r in by_rank] + [f for f in failures if f.rank not in last.in_time]
    picked = next((f for f in failures if not unsafe_here(f.error)), failures[0])
    passed = failures[:failures.index(picked)]
    stopped = [f for f in passed if isinstance(f.error, RankStoppedError)]
    others = [f for f in passed if f not in stopped]
    if not others:  # (ranks stopped because the picked one failed go without saying: its ParallelError says so)
        return picked, None
    said = "; ".join(f"{f.label} {_why_not_replayed(f.error)}" for f in others[:3])
    return picked, f"mpmagic: replaying {picked.label}, the first failure its code raised ({said}: not replayed here)"


def _why_not_replayed(error: BaseException) -> str:
    """Why a failure is not replayed here (``unsafe_here``), in a few words."""
    if isinstance(error, RankStoppedError):
        return "was stopped because another rank failed"
    if isinstance(error, TaskTimeoutError):
        return "ran past its timeout"
    return "lost its worker"


def _run_again(last: LastRun, obj: Any, failure: FailureInfo, item: Any) -> None:
    """Run the failed item or rank here with ``obj``, the function (or cell) loaded
    from the payload bytes the workers loaded, and ``item``, the item as its worker
    got it (:func:`_item_as_sent`)."""
    if last.kind == "cell":
        assert failure.rank is not None and failure.size is not None  # (record_cell sets both)
        # (as its notebook cell: the same name and line numbers as the rank's traceback)
        name = cell_file(obj.filename)
        run_cell_code(obj, failure.rank, failure.size, as_main=False, filename=name if name != obj.filename else None)
    elif getattr(obj, "mpmagic_item", None) is not None:  # seed=: with the item's own random stream again
        obj((failure.index, item))
    elif last.star:
        obj(*item)
    else:
        obj(item)


def _item_as_sent(last: LastRun, failure: FailureInfo) -> Any:
    """A copy of the failed item made as its worker's was: pickled and loaded again
    (``payload.dumps_data``, the chunks' pickler), its large numpy buffers read-only
    copies when the run lent them through shared memory (``shm.as_lent``, as the
    workers map them), a file-backed memmap opened again from its file. Never the
    notebook's own object: the worker's changes to its copy stayed there, and so
    do the replay's (an item normalised in place, a dict the function updates).
    A small item is loaded from its pickle made as the run ended (``failure.sent``),
    so a change the notebook made to its object since is not replayed either.
    A cell has no item (its names are in its payload, loaded apart): None."""
    if last.kind == "cell":
        return None
    item = failure.item
    try:
        if failure.sent is not None:  # (pickled as the run ended: the notebook may have changed its object since)
            return payload.loads(failure.sent)
        if last.lent is None:  # (Dask, or no shared memory here: every buffer inside the pickle)
            return payload.loads(payload.dumps_data(item))
        with payload.memmaps_by_reference():
            return shm.as_lent(item, payload.dumps_data, *last.lent)
    except Exception as exc:
        raise UsageError(
            f"{failure.label} cannot be copied here as its worker got it ({exception_line(exc)}), and the replay "
            "runs on such a copy, never on your own object: mpmagic.last_failures() has the worker's traceback "
            "and locals") from None


def replay(which: int | None = None, debugger: Any = None) -> bool:
    """Replay a failure of the last (blocking) run here, under the debugger.

    ``which`` is the item index (or rank) to replay; by default the first
    failure the code raised (a cell's in the order its ranks failed: a rank
    stopped because another failed, or one that timed out or lost its worker,
    is passed over, see :func:`_first_raised`). The item is a copy made as its
    worker's was (:func:`_item_as_sent`), never the notebook's object. Stops
    at the line that raised, as ``%debug`` does (a ``SystemExit`` or
    ``KeyboardInterrupt`` the task raised too). Returns True if the replay
    raised what the worker raised (and was debugged). Otherwise it says in
    one line why there is nothing to debug here (the replay succeeded, or
    raised another exception: the failure depended on the worker, or on code
    reloaded since the run; or the function is a builtin, with no Python
    frame) and
    prints the worker's traceback with its local variables.
    A failure no call of the function raised (the function could not be
    loaded in the worker, the input raised) is not replayed: UsageError.
    Nor is one whose code uses an ``mpmagic.Queue`` or ``Event`` (the replay
    would take the user's items or wait for ever): it says so in one line
    and prints the worker's traceback (False). A Ctrl-C during the replay
    is a one-line KeyboardInterrupt.
    """
    last, failure, passed_over = _pick(which)
    if isinstance(failure.error, RankStoppedError):  # still running, maybe waiting for the failed rank for ever
        cause = failure.error.cause_rank
        raise UsageError(
            f"{failure.label} did not raise: mpmagic stopped it ({failure.error}); replaying it here could wait "
            "for ever in the notebook, so it is not replayed"
            + (f"; %pdebug {cause} replays rank {cause}, whose failure stopped it" if cause is not None else "")
        )
    if unsafe_here(failure.error):  # running it here could crash or hang the notebook itself
        raise UsageError(
            f"{failure.label} did not raise, its worker died or ran past the timeout "
            f"({type(failure.error).__name__}): replaying it here could do the same to the notebook, "
            f"so it is not replayed; call the function on that input yourself if you mean it{since_hint('replay')}"
        )
    if failure.outside or (last.kind == "map" and failure.index is None):
        print(failure.describe())
        what = "the rank's code" if last.kind == "cell" else "one item"
        why = f"; {failure.outside}" if failure.outside else ""
        raise UsageError(f"the failure was not raised by {what} ({exception_line(failure.error)}{why}): "
                         "there is nothing to replay; its traceback is above")
    try:
        with collect_attached() as helpers:
            obj = payload.loads(last.payload)
            item = _item_as_sent(last, failure)
    except UsageError:
        raise
    except Exception as exc:
        what = "cell's names" if last.kind == "cell" else "function"
        raise UsageError(f"the {what} cannot be loaded here to replay {failure.label} "
                         f"({exception_line(exc)}); mpmagic.last_failures() has the worker's traceback") from None
    if _refused_for_helpers(obj, failure, helpers):
        return False
    # (Said only now, when it does replay: before a refusal above it said "replaying"
    # and then that there was nothing to replay.)
    for note in (passed_over, _failed_since_note(f"replaying {failure.label} of the last blocking run")):
        if note:
            print(note)
    expected = _worker_type(failure.error)
    reloaded = _reloaded_since_run(last, obj, failure)
    try:
        _run_again(last, obj, failure, item)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) and expected != "KeyboardInterrupt":
            # The user's Ctrl-C during the replay: one line, not our frames (nor the helpers' waits).
            raise one_line_interrupt(
                f"%pdebug interrupted: the replay of {failure.label} was stopped; "
                "mpmagic.last_failures() has the worker's traceback and locals") from None
        if type(exc).__qualname__ != expected:
            setup = _setup_name(exc)
            why = (f": `{setup[0]}` is a name of the worker setup ({setup[1]}), which the workers have and the "
                   "notebook does not, so it cannot be replayed here" if setup is not None else
                   f", and {_code_changed(reloaded)}" if reloaded else
                   f", so the failure depended on the worker: state that lived there{_kept_state(obj)}, its "
                   "environment or resources")
            print(f"mpmagic: {failure.label} raised {expected} in its worker, but replayed here it raised "
                  f"{exception_line(exc)}{why}; that other error is not debugged. The worker's traceback and locals:")
            print(failure.describe())
            return False
        tb = without_our_frames(exc.__traceback__)
        if tb is None:  # a builtin (pow) raised, called by us: none of the frames is the user's
            name = getattr(obj, "__name__", None) or type(obj).__name__
            print(f"mpmagic: replayed here, {failure.label} raised {exception_line(exc)} inside {name}, which is "
                  "not Python code: there is no Python frame of yours for the debugger to stop in")
            return True
        if reloaded:
            print(f"mpmagic: {_code_changed(reloaded, ran=False)}")
        _post_mortem(tb, debugger)
        return True
    why = (f"but {_code_changed(reloaded)}" if reloaded else
           "so the failure depended on the worker (its state, environment or resources)")
    print(f"mpmagic: {failure.label} did not fail when replayed here, {why}; the worker's traceback and locals:")
    print(failure.describe())
    return False


def _reloaded_since_run(last: LastRun, obj: Any, failure: FailureInfo) -> list[str]:
    """The user's modules the replay's code reaches (the function's own, those it
    names, its item's classes'; a cell's imports and names) that the notebook
    reloaded since the run (``importlib.reload``, ``%autoreload``): a function of
    such a module travels by name, so the replay runs its new code where the
    workers ran the old. Empty when nothing was reloaded (the usual case, one dict
    look-up)."""
    from . import loadstamps

    reloaded = loadstamps.reloaded_since(last.loads_mark)
    if not reloaded:
        return []
    from .usermodules import imported_names
    from .warmup import user_modules

    reached: set[str] = set()
    try:
        if isinstance(obj, CellSpec):
            reached.update(obj.modules.values())
            reached.update(imported_names(compile(obj.numbered_source, obj.filename, "exec", dont_inherit=True)))
            for value in obj.names.values():
                reached.update(user_modules(value))
        else:
            reached.update(user_modules(obj))
            reached.update(user_modules(failure.item))
    except Exception:  # (an odd object: say nothing rather than fail the replay)
        return []
    return [name for name in reloaded if name in reached]


def _code_changed(modules: list[str], ran: bool = True) -> str:
    """What a replay after ``importlib.reload`` of ``modules`` says: the code changed since
    the run (``ran``: the replay is over; else it is about to start)."""
    names = ", ".join(modules)
    return (f"the code changed since the run: {names} {'was' if len(modules) == 1 else 'were'} reloaded since, "
            f"so the replay {'ran' if ran else 'runs'} its new code where the workers ran the old")


#: Helpers whose use in a replay would take what other tasks (or the next cell)
#: should get, or wait for ever for a task that is not running: not replayed.
_NOT_REPLAYED = {
    "Queue": "replaying it here would take items meant for other tasks (or wait for ever for items no task sends)",
    "Event": "replaying it here could wait for ever for a set() no running task will make",
}


def _refused_for_helpers(obj: Any, failure: FailureInfo, helpers: list[tuple[str, Any]]) -> bool:
    """If the replay would use a live Queue or Event (``helpers``: those its payload
    holds, and its item), say so and show the worker's traceback instead (True).
    A live Value, Array or lock is used: what the replay changes there, it changes again."""
    helpers = helpers + [(kind, h) for kind, h in _item_helpers(failure.item) if all(h is not x for _, x in helpers)]
    for kind, helper in helpers:
        if kind in _NOT_REPLAYED:
            print(f"mpmagic: {failure.label} uses mpmagic.{kind} {_helper_name(obj, helper)}: {_NOT_REPLAYED[kind]}, "
                  "so it is not replayed; this is the worker's traceback and locals:")
            print(failure.describe())
            return True
    changed = [f"mpmagic.{kind} {_helper_name(obj, helper)}" for kind, helper in helpers if kind in ("Value", "Array")]
    if changed:
        print(f"mpmagic: the replay uses the live {', '.join(changed)}: what it writes there is written again")
    return False


def _item_helpers(item: Any) -> list[tuple[str, Any]]:
    """The helpers a failed item is, or holds at its top level (a tuple of star args)."""
    from .shared.base import _Helper

    parts = item if isinstance(item, (tuple, list)) else (item,)
    return [(type(p)._kind, p) for p in parts if isinstance(p, _Helper)]


def _helper_name(obj: Any, helper: Any) -> str:
    """```name``` of ``helper`` in the cell's names, the function's globals or
    closure, or the notebook; else how the helper calls itself."""
    spaces: list[dict] = []
    if isinstance(obj, CellSpec):
        spaces.append(obj.names)
    elif isinstance(obj, types.FunctionType):
        spaces.append(obj.__globals__)
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            try:
                spaces.append({name: cell.cell_contents})
            except ValueError:  # (an empty cell)
                continue
    spaces.append(_notebook_namespace())
    for space in spaces:
        for name, value in list(space.items()):
            if value is helper and not name.startswith("_"):
                return f"`{name}`"
    return helper._describe().split(" ", 1)[-1]


def _worker_type(error: BaseException) -> str:
    """The qualified name of the type the worker's code raised (a task's own
    KeyboardInterrupt or StopIteration comes home as a RuntimeError naming it)."""
    if isinstance(error, RemoteError):  # (a type that cannot be loaded here)
        return error.type_name
    cause = error.__cause__
    if (type(error) is RuntimeError and isinstance(cause, (KeyboardInterrupt, StopIteration))
            and str(error).startswith(f"the task raised {type(cause).__name__}")):
        return type(cause).__qualname__
    return type(error).__qualname__


def _setup_name(exc: BaseException) -> tuple[str, str] | None:
    """(name, what defines it) when the replay's ``NameError`` is for a name of the
    worker setup (``%%pool setup``, ``on_worker_start``): the workers have it as a
    builtin, the notebook, where the replay runs, does not."""
    name = getattr(exc, "name", None) if isinstance(exc, NameError) else None
    if not isinstance(name, str):
        return None
    from .setup_api import defining

    what = defining(name)
    return (name, what) if what is not None else None


def _kept_state(obj: Any) -> str:
    """What state a replayed cell lacked, when it is known."""
    return " (the rank's kept variables, --keep, are in its worker, not here)" if getattr(obj, "keep", False) else ""


def _post_mortem(tb: types.TracebackType, debugger: Any = None) -> None:
    """IPython's debugger on ``tb``, at its last frame (the raising line)."""
    if debugger is None:
        from IPython.core.debugger import Pdb

        debugger = Pdb
    p = debugger()
    p.reset()
    p.interaction(None, tb)


__all__ = ["replay", "rerun_failed"]
