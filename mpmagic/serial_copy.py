"""Whether ``--compare`` may run its serial copy: not when the run used shared state.

``--compare`` (``compare=True``) runs the work a second time here, serially,
after the parallel run. For most functions and cells that is the same
computation. Not for one that uses mpmagic's shared helpers:

* a function taking items from an ``mpmagic.Queue`` finds it emptied by the
  parallel run, and its serial copy waits in ``get()`` for ever, silently;
* a cell run here as rank 0 of 1 has no other rank to put what rank 0 takes
  (or to ``set()`` the ``Event`` it waits on): the same wait for ever;
* a function adding to an ``mpmagic.Value`` (or writing an ``Array``) does it
  a second time: a counter ends at twice its count.

So the serial copy is not run when the run's payload (its function, what
that captures, its items; a cell's names) named such a helper: the pickling
finds them (a helper being pickled calls :func:`mpmagic.payload.keep_alive`,
the job collects them, :func:`mpmagic.jobs.helpers_used`), here they are
judged and named after the notebook's variables, and the caller says so in one
line and keeps the estimated serial time. ``mpmagic.Lock`` and ``RLock`` are
the exception: taking and giving back a lock changes nothing another task
reads, so their serial copy is the same computation (and ``--compare`` is how
a run serialised by a lock gets its serial time measured).

A helper a task makes for itself is no shared state (nothing pickled names
it); one reached only through a name the function reads at run time is
pickled with the function (cloudpickle captures the globals it names), so the
pickling finds it.

Imports nothing of mpmagic: the notebook side (``api``, the pandas accessor)
calls it with what the job recorded.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

#: Helper kinds whose serial copy is the same computation: a lock only orders the tasks.
SAME_SERIALLY = frozenset({"Lock", "RLock"})

#: Values of a container looked into for a helper's name (``inboxes = [Queue(), ...]``).
_LOOK_INTO = 64


class NoSerialCopy(NamedTuple):
    """Why the serial copy is not run: the helper's ``kind`` ("Queue"...), and
    ``what`` names it as the line says it ("mpmagic.Queue 'jobs'")."""

    kind: str
    what: str


def stateful(helpers: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The ``(kind, ref)`` pairs (:func:`mpmagic.jobs.helpers_used`) whose serial copy
    would not be the same computation: every kind but a lock."""
    return [(kind, ref) for kind, ref in helpers if kind not in SAME_SERIALLY]


def judge(helpers: Iterable[tuple[str, Any]], names: Mapping[str, Any],
          fallback: Mapping[str, Any] | None = None) -> NoSerialCopy | None:
    """``None`` if the serial copy may run; else which helper forbids it, named by
    the first of ``names`` (the names the function or cell reads) bound to it, or
    else of ``fallback`` (the function's globals: a helper it reaches through
    another notebook function), or inside a list, tuple or dict bound to one
    (``in 'inboxes'``); no name when none is found (a helper among the items)."""
    found = stateful(helpers)
    if not found:
        return None
    kind, name = found[0][0], None
    for each, ref in found:  # (the first one the notebook names; job.kept holds each helper once)
        name = _name_of(ref() if ref is not None else None, names, fallback)
        if name is not None:
            kind = each
            break
    what = f"mpmagic.{kind}" + (f" {name}" if name else "")
    others = len(found) - 1
    if others > 0:
        what += f" (and {others} more helper{'s' if others > 1 else ''})"
    return NoSerialCopy(kind, what)


def name_helpers(exc: BaseException, helpers: Iterable[tuple[str, Any]], names: Mapping[str, Any],
                 fallback: Mapping[str, Any] | None = None) -> None:
    """A task's error of ours that names one of the run's helpers as the worker
    described it (``mpmagic.Queue made on line 2 of cell In[4] is closed ...``: the worker knows
    no variable) names it after the notebook's variable instead (``mpmagic.Queue 'q'
    is closed ...``), as :func:`judge` names one (``names``, ``fallback``: the same).
    ``helpers``: the run's ``(kind, ref)`` pairs (:func:`mpmagic.jobs.helpers_used`).
    Left as it is when no variable names it, or two described alike (made on one line)
    have two names: the description still says which kind, how and where."""
    if not type(exc).__module__.startswith("mpmagic") or not exc.args or not isinstance(exc.args[0], str):
        return
    text = exc.args[0]
    alike: dict[str, list[tuple[str, Any]]] = {}
    for kind, ref in helpers:
        obj = ref() if ref is not None else None
        describe = getattr(obj, "_describe", None)
        if describe is None:  # (a Dask helper: its repr names it already)
            continue
        try:
            said = describe()
        except Exception:  # (a helper half gone: left as it is)
            continue
        if said in text and all(o is not obj for _, o in alike.get(said, [])):
            alike.setdefault(said, []).append((kind, obj))
    named = text
    for said, found in sorted(alike.items(), key=lambda pair: -len(pair[0])):  # (the longest first: no part of one)
        called = {_name_of(obj, names, fallback) for _, obj in found}
        if len(called) == 1 and None not in called:  # (alike ones all in one list: "in 'inboxes'" says it still)
            named = named.replace(said, f"mpmagic.{found[0][0]} {called.pop()}")
    if named != text:
        exc.args = (named, *exc.args[1:])


def _name_of(obj: Any, names: Mapping[str, Any], fallback: Mapping[str, Any] | None) -> str | None:
    """``'jobs'``, ``in 'inboxes'``, or None: how the notebook names ``obj``: by a name the
    code reads (``names``), bound to it or to a list, tuple or dict holding it, before any
    other of the notebook's (``fallback``; ``for each in qs: each.close()`` leaves ``each``
    bound to the last, where the cell reads ``qs[rank]``)."""
    if obj is None:  # (dropped since the run: nothing names it any more)
        return None
    spaces = (names.items(), () if fallback is None else
              [(k, v) for k, v in fallback.items() if not k.startswith("_") and k not in ("In", "Out")])  # (IPython's)
    for space in spaces:
        for name, value in space:
            if value is obj:
                return repr(name)
        for name, value in space:
            if _holds(value, obj):
                return f"in {name!r}"
    return None


def _holds(value: Any, obj: Any) -> bool:
    """Is ``obj`` one of the first values of the list, tuple or dict ``value``?"""
    if isinstance(value, dict):
        values: Iterable[Any] = list(value.values())[:_LOOK_INTO]
    elif isinstance(value, (list, tuple)):
        values = value[:_LOOK_INTO]
    else:
        return False
    return any(v is obj for v in values)


def names_read_by(func: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The names ``func`` reads with their values (its closure's, then the globals
    its code names, nested functions' and comprehensions' included), and its
    globals (for :func:`judge`'s fallback). Unwraps ``functools.partial``, bound
    methods and wrappers keeping the function as ``.func`` (``seed=``'s, the
    pandas accessor's); a partial's arguments are looked into too."""
    names: dict[str, Any] = {}
    globals_: dict[str, Any] | None = None
    for _ in range(8):
        if isinstance(func, functools.partial):
            for value in (*func.args, *func.keywords.values()):
                if callable(value) and not isinstance(value, type):  # (the pandas accessor's func=)
                    inner, inner_globals = names_read_by(value)
                    names.update({k: v for k, v in inner.items() if k not in names})
                    globals_ = globals_ or inner_globals
            func = func.func
        elif isinstance(func, types.MethodType):
            func = func.__func__
        elif isinstance(func, types.FunctionType):
            if func.__closure__:
                for name, cell in zip(func.__code__.co_freevars, func.__closure__, strict=False):
                    try:
                        names.setdefault(name, cell.cell_contents)
                    except ValueError:  # (an empty cell)
                        pass
            for name in _code_names(func.__code__):
                if name in func.__globals__:
                    names.setdefault(name, func.__globals__[name])
            globals_ = globals_ or func.__globals__
            break
        elif callable(getattr(func, "__dict__", {}).get("func")):
            func = func.__dict__["func"]
        elif isinstance(inspect.getattr_static(type(func), "__call__", None), types.FunctionType):
            names.update({k: v for k, v in vars(func).items() if k not in names} if hasattr(func, "__dict__") else {})
            func = inspect.getattr_static(type(func), "__call__")
        else:
            break
    return names, globals_


def _code_names(code: types.CodeType) -> list[str]:
    """The global names a code object and the code objects nested in it read."""
    out = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out.extend(_code_names(const))
    return out


def say(no: NoSerialCopy, where: str, write: Callable[[str], Any]) -> None:
    """One line: the serial copy was not run, which helper is why, and what it would
    have done. ``where``: "the function" (a map) or "the cell"."""
    cell = where == "the cell"
    if no.kind == "Queue":
        would = "put into it or take from it again (and wait for ever for " + (
            "what other ranks put)" if cell else "items the parallel run took)")
    elif no.kind in ("Value", "Array"):
        would = "change it a second time (a counter would end at twice its count)"
    elif no.kind == "Event":
        would = ("wait for ever for a set() only other ranks do (or set it again)" if cell
                 else "set or clear it again (or wait for a set() only other items do)")
    else:
        would = "use it a second time"
    write(f"mpmagic: compare=True (--compare): no serial run here: {where} uses {no.what}, and a serial copy "
          f"would {would}; the serial time is estimated\n")
