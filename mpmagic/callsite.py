"""Where a map was called from, and a worker frame that stands in for it.

Serial ``list(map(f, xs))`` calls ``f`` from C: the Python frame above ``f``
is the caller's own, the notebook cell (or the script, or the module) with
the ``map`` line. A library that warns its caller does it with
``warnings.warn(..., stacklevel=2)`` (pandas walks up to the first frame
outside pandas), so the warning is charged to that frame: its globals'
``__name__`` is the module that filters match (Python's
``default::DeprecationWarning:__main__`` shows a deprecation in a notebook,
``filterwarnings("error", module="__main__")`` makes it an error), and its
file and line are what the warning shows. In a worker the frame above ``f``
was mpmagic's item loop (``worker.run_items``): the deprecation was hidden
(module ``mpmagic.worker``), another warning showed ``worker.py:632`` and
``append(func(items[i]))``, and a filter for ``__main__`` no longer matched.

So the notebook notes the call site when a map's job is made
(:func:`caller_site`: the first frame outside mpmagic and IPython's magic
machinery, its module name, file, line and function name, as serial Python
would charge the warning, then the same of up to :data:`ANCESTORS` frames
that called it), the site travels with each ``Map`` message, and the
worker calls the function from a copy of its item loop made for that site
(:func:`at_site`): the same bytecode, every instruction on the site's line
and file, named as the caller's frame, with globals whose ``__name__`` is the
caller's module (its own dict: builtins only, and the ``__warningregistry__``
``warnings`` keeps there, as it keeps one per module serially).

``stacklevel=3`` and more (a mapped function blaming its caller's caller:
``def driver(mapper): return list(mapper(f, xs))``, serially the line calling
``driver``) walk further up: the copy is called through a chain of one-line
trampolines ("hops"), one per caller the site kept, each made in the same way
for that caller's module, file, line and name. The callers stop before the
first frame of mpmagic's or IPython's (a cell's caller is IPython's
``run_code``, a script's ``<module>`` has none); :data:`PAST` hops standing
for ``sys:1`` follow: where a stack runs out ``warnings`` charges ``sys:1``
(module ``sys``), and a worker's own frames are above the chain (a frame's
caller is its thread's: ``exec`` or any call from C starts no new stack), so
a ``stacklevel`` up to ``PAST`` past the site's frames never names a file of
mpmagic's (past the cell, serial Python names IPython's ``run_code``; a worker
names ``sys:1`` there); one further names the worker's. Not more of them:
each frame of the chain is one less for the task's own recursion under the
notebook's recursion limit (``setrecursionlimit(60)`` in a script, then a
task 40 calls deep: serially fine, and eight hops made it a RecursionError).

A copy is made once per site and process, from the loop's source (compiled
with every line at 1, then moved to the site's line: ``code.replace``), and
its hops from one-line sources likewise; it costs nothing per item, and per
unit a comparison with the last unit's site (a dictionary look-up when it
differs) and a call of each hop (~0.1-0.3 us all told). Where the source
cannot be read or no longer matches the loaded code (an edited install),
the loop runs as it is, charged to ``mpmagic.worker`` as before.

The copy's frame and its hops' have the local :data:`MARK`: ``errors.extract_frames``
leaves them out of a task's traceback (the notebook shows the caller's line itself),
as it leaves out the rest of ``worker.py``. Imports nothing of mpmagic's but
``astlock``: workers import it, and it imports no IPython.
"""

from __future__ import annotations

import ast
import builtins
import linecache
import os
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from .astlock import FUTURE_FLAGS as _FUTURE_FLAGS
from .astlock import compile_tree, parse

#: A local variable of every item loop a copy is made of: its frames are mpmagic's
#: (left out of tracebacks), whatever file and line the copy names.
MARK = "__mpmagic_call_site__"

# One frame of a call site as it travels: (module name, file name, line, function name).
Frame = tuple[str, str, int, str]
# A call site as it travels: the frame that called the map, then the frames that
# called it, innermost first (at most 1 + ANCESTORS).
Site = tuple[Frame, ...]

#: Frames above the map's caller a site keeps (a warning's ``stacklevel`` of 3 or more).
ANCESTORS = 6
#: "sys" frames (:data:`STACK_END`) a worker's chain has past the site's: a
#: ``stacklevel`` up to this many past the site's frames names ``sys:1``, never a
#: worker frame (and costs the task's recursion this many frames: see the docstring).
PAST = 2
#: Where ``warnings`` charges a warning whose ``stacklevel`` goes past the stack
#: (``sys:1``, module ``sys``): where one past the site's frames is charged.
STACK_END: Frame = ("sys", "sys", 1, "<module>")

_F = TypeVar("_F", bound=Callable[..., Any])

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Frames between the user's code and ours that are not the caller serial code would
# blame: IPython's magic machinery (``run_line_magic``, the ``<decorator-gen-N>``
# wrappers of magics) between a cell's ``%pmap`` and our magic.
_IPYTHON = os.sep + "IPython" + os.sep
_MAGIC_WRAPPER = "<decorator-gen-"


def caller_site() -> Site | None:
    """The frame serial ``map`` would have called the function from: the innermost
    of this thread's stack that is neither mpmagic's nor IPython's magic machinery
    (``%pmap``'s cell line, a script's ``pmap`` line, a module's), then up to
    :data:`ANCESTORS` of its callers, each as ``(module name, file name, line,
    function name)``; None if there is none.

    The callers stop before the first frame that is mpmagic's or IPython's (a
    cell's caller is IPython's ``run_code``: a worker never names those files;
    past the site it names ``sys``, as a stack that runs out does). The module
    name is its globals' ``__name__`` (``__main__`` for a notebook cell or a
    script; ``__main__`` too where it is not a string)."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and _machinery(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return None
    # Each frame's line read once: ``f_lineno`` walks the code's line table
    # (read twice, in the test and in the tuple, it was half of this call).
    traced = sys.gettrace() is not None
    line = frame.f_lineno if traced else _line(frame)
    if not line:  # (3.11+: None where a frame has no line)
        return None
    site = [_frame(frame, line)]
    frame = frame.f_back
    while frame is not None and len(site) <= ANCESTORS and not _machinery(frame.f_code.co_filename):
        line = frame.f_lineno if traced else _line(frame)
        if not line:
            break
        site.append(_frame(frame, line))
        frame = frame.f_back
    return tuple(site)


# (id of a code object, instruction offset) -> (a weak reference to that code, its line): what
# ``f_lineno`` says of a frame there. It walks the code's line table from its start at each
# read: a map called from a long function or script (a benchmark's loop) paid ~10 us a call
# for its line, the same at each call from that place.
_lines: dict[tuple[int, int], tuple[Any, int | None]] = {}
_MAX_LINES = 1024


def _line(frame: types.FrameType) -> int | None:
    """``frame.f_lineno``, looked up by the frame's code and instruction when read there before.

    Not for a frame of a thread that runs a trace function (the caller checks
    ``sys.gettrace()``): tracing may set a frame's line itself (a debugger's jump)."""
    code = frame.f_code
    key = (id(code), frame.f_lasti)
    known = _lines.get(key)
    if known is not None and known[0]() is code:
        return known[1]
    line = frame.f_lineno
    try:
        ref = weakref.ref(code)
    except TypeError:  # (a code object that cannot be weakly referenced: read each time)
        return line
    if len(_lines) >= _MAX_LINES:
        _lines.clear()
    _lines[key] = (ref, line)
    return line


def caller_names() -> dict[str, str]:
    """The names the frame serial ``map`` would have called the function from can
    see (its globals and locals; the frame :func:`caller_site` finds), each with whose
    it is in words: "the notebook" (a global), "the calling function" (a local of the
    function that called ``map``, which wins over a global of its name, as ``eval``
    reads it). What a builtin ``eval`` or ``exec`` mapped over strings reads serially,
    and a worker has none of (``map(eval, ["AAA * 2"])`` in a notebook reads its ``AAA``)."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and _machinery(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return {}
    names = dict.fromkeys(frame.f_globals, "the notebook")
    local = frame.f_locals
    if local is not frame.f_globals:  # (a cell's top level: its locals are the notebook's globals)
        names.update(dict.fromkeys(local, "the calling function"))
    return names


def _machinery(filename: str) -> bool:
    """Is this a frame of mpmagic's or of IPython's (its magic machinery, ``run_cell``'s)?"""
    return filename.startswith(_PACKAGE_DIR) or _IPYTHON in filename or filename.startswith(_MAGIC_WRAPPER)


def _frame(frame: types.FrameType, line: int) -> Frame:
    """``frame`` as a site's frame; ``line``: its ``f_lineno``, read by the caller."""
    name = frame.f_globals.get("__name__")
    code = frame.f_code
    return (name if isinstance(name, str) else "__main__", code.co_filename, line, code.co_name)


# --------------------------------------------------------------------------
# Worker side

# By item loop: its code compiled with every instruction on line 1 (None: its source
# could not be had, or does not compile to the loaded code).
_one_line: dict[Callable[..., Any], types.CodeType | None] = {}
# By (item loop, site): the loop's copy for that site.
_copies: dict[tuple[Callable[..., Any], Site], Callable[..., Any]] = {}
# By module name: the globals of the copies charged to it.
_globals: dict[str, dict[str, Any]] = {}
# The last copy asked for, (loop, site, copy): a unit's site is a new tuple from its
# message, equal to the last unit's as a rule, and comparing it costs less than hashing it.
_last: tuple = (None, None, None)
_lock = threading.Lock()  # (Dask runs units in threads)
_MAX_COPIES = 256  # sites kept per process (a notebook has few; a loop calling pmap from many lines, more)


def at_site(loop: _F, site: Site | None) -> _F:
    """``loop`` (an item loop of ``worker.py``, whose frame calls the task's function)
    as a copy whose frame looks like ``site``'s innermost frame to ``warnings`` and to
    anything reading the stack (file, line, function name, module ``__name__``),
    called through a frame standing in for each of the site's callers, then
    :data:`PAST` "sys" frames (see the module's docstring). ``loop`` itself when
    ``site`` is None or no copy can be made."""
    global _last
    if site is None:
        return loop
    last = _last
    if last[0] is loop and last[1] == site:  # (the site of the unit before, as a rule: no hashing)
        return last[2]
    copy = _copies.get((loop, site))
    if copy is None:
        copy = _make(loop, site)
    _last = (loop, site, copy)
    return copy  # type: ignore[return-value]


def prepare(loop: Callable[..., Any]) -> None:
    """Compile what copies of ``loop`` are made from now (~1.5 ms, once per process):
    a local worker does it once it is ready, so that its first unit seldom waits for it."""
    with _lock:
        if loop not in _one_line:
            _one_line[loop] = _compiled_on_one_line(loop)
        if not _hops:
            _hops.extend(_function_code(compile(source, "<mpmagic hop>", "exec"), name)  # type: ignore[misc]
                         for name, source in _HOP_SOURCES)


# The frames standing in for the site's callers, each of one line (see _placed): the
# outermost takes the loop's arguments, the others pass them on as a tuple, the
# innermost calls the loop's copy with them. Each has the local MARK.
_HOP_SOURCES = (
    ("outermost", f"def outermost(*args, onward=None): {MARK} = True; return onward(args)\n"),
    ("between", f"def between(args, *, onward=None): {MARK} = True; return onward(args)\n"),
    ("innermost", f"def innermost(args, *, onward=None): {MARK} = True; return onward(*args)\n"),
)
_hops: list[types.CodeType] = []  # their code, in that order (prepare)


def _make(loop: Callable[..., Any], site: Site) -> Callable[..., Any]:
    prepare(loop)
    with _lock:
        code = _one_line[loop]
        if code is None:
            return loop
        # (a site from elsewhere than caller_site, as the tests make: its frames' fields as they come)
        frames = [(str(m), str(f), int(n), str(c)) for m, f, n, c in site[:1 + ANCESTORS]]
        frames += [STACK_END] * PAST  # (at least 2 hops: the innermost and the outermost differ)
        depth = len(frames)
        module, filename, lineno, name = frames[0]
        copy: Callable[..., Any] = types.FunctionType(_placed(code, filename, lineno, name), _module_globals(module),
                                                      name, loop.__defaults__)
        outermost, between, innermost = _hops
        for i, (module, filename, lineno, name) in enumerate(frames[1:], 2):
            hop_code = outermost if i == depth else innermost if i == 2 else between
            hop = types.FunctionType(_placed(hop_code, filename, lineno, name), _module_globals(module), name)
            hop.__kwdefaults__ = {"onward": copy}
            copy = hop
        if len(_copies) >= _MAX_COPIES:
            _copies.clear()
        _copies[(loop, site)] = copy
        return copy


def _placed(code: types.CodeType, filename: str, lineno: int, name: str) -> types.CodeType:
    """``code``, every instruction of which is on line 1, moved to ``filename``'s ``lineno``
    and named ``name``."""
    names: dict[str, Any] = {"co_name": name}
    if sys.version_info >= (3, 11):
        names["co_qualname"] = name
    return code.replace(co_filename=filename, co_firstlineno=max(lineno, 1), **names)


def _module_globals(module: str) -> dict[str, Any]:
    """The globals of the frames charged to ``module``: its name and builtins only,
    and the ``__warningregistry__`` ``warnings`` keeps there, as it keeps one per module."""
    g = _globals.get(module)
    if g is None:
        g = _globals[module] = {"__name__": module, "__builtins__": builtins}
    return g


def _compiled_on_one_line(loop: Callable[..., Any]) -> types.CodeType | None:
    """``loop``'s code compiled again from its source with every node on line 1,
    or None when its source cannot be read or is not the loaded function's (its
    file changed since: compiled as it is, it gives other bytecode), or has no
    :data:`MARK`. Then no copy is made: the loop runs as it is.

    (The one-line code itself may differ from the loaded one: a ``NOP`` that only
    keeps a line's own event, before a ``try:``, is dropped on one line.)"""
    original = loop.__code__
    try:
        source = _source(loop)
        if source is None:
            return None
        tree = parse(source, original.co_filename, "exec")
        futures = original.co_flags & _FUTURE_FLAGS  # (its module's `from __future__` imports, as it was compiled)
        if not _same_code(_function_code(compile_tree(tree, original.co_filename, "exec", futures), original.co_name),
                          original):
            return None
        col = -1 if sys.version_info >= (3, 11) else 0  # (3.11+: no column; 3.10 wants one)
        for node in ast.walk(tree):
            if "lineno" in node._attributes:
                node.lineno = node.end_lineno = 1  # type: ignore[attr-defined]
                node.col_offset = node.end_col_offset = col  # type: ignore[attr-defined]
        code = _function_code(compile_tree(tree, original.co_filename, "exec", futures), original.co_name)
    except (SyntaxError, ValueError, TypeError, OSError):
        return None
    return code if code is not None and MARK in code.co_varnames else None


def _function_code(module: types.CodeType, name: str) -> types.CodeType | None:
    """The code of the function ``name`` among ``module``'s constants."""
    for const in module.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == name:
            return const
    return None


def _same_code(code: types.CodeType | None, original: types.CodeType) -> bool:
    """Does ``code`` do what ``original`` does (the same bytecode, constants, names)?"""
    return code is not None and all(
        getattr(code, attr) == getattr(original, attr)
        for attr in ("co_code", "co_consts", "co_names", "co_varnames", "co_argcount", "co_kwonlyargcount",
                     "co_freevars", "co_cellvars", "co_flags"))


def _source(loop: Callable[..., Any]) -> str | None:
    """The source of the top-level function ``loop``: from its ``def`` to the line
    before the next one that starts at the left margin (the loops are written with
    no line of theirs there), as ``linecache`` has its module (its loader's too:
    a zip import)."""
    code = loop.__code__
    lines = linecache.getlines(code.co_filename, loop.__globals__)
    first = code.co_firstlineno - 1
    if not lines or first >= len(lines) or not lines[first].startswith("def "):
        return None
    end = first + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#)"):
        end += 1
    return "".join(lines[first:end])
