"""Parsing and compiling Python ASTs from several threads at once, safely.

CPython 3.11 (and early 3.12) counts the nesting depth of its AST conversion
in per-interpreter state, not per thread, so two threads converting ASTs at
the same time can fail with ``SystemError: AST constructor recursion depth
mismatch`` (python/cpython#106905). mpmagic parses cells in whatever thread
calls ``parallel`` (several at once since runs may come from any thread), so
every parse, and every compile of an AST object, takes this lock. It is held
for microseconds per cell and never while code runs. Imports nothing of
mpmagic: workers import it too.
"""

from __future__ import annotations
import __future__

import ast
import sys
import threading
from typing import Any, Literal, overload

_LOCK = threading.RLock()

#: Every ``from __future__`` feature's compiler flag (``co_flags`` and ``compile``'s ``flags``).
FUTURE_FLAGS = 0
for _name in __future__.all_feature_names:
    FUTURE_FLAGS |= getattr(__future__, _name).compiler_flag


def notebook_future_flags() -> int:
    """The ``from __future__`` features the notebook compiles its cells under: IPython
    keeps a cell's ``from __future__ import annotations`` for every later cell, so a
    ``%%parallel`` cell or a ``%%pool setup`` is compiled under them too, as it would
    be serially. 0 outside IPython (read from ``sys.modules``: nothing is imported)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    flags = getattr(getattr(shell, "compile", None), "flags", 0)
    return flags & FUTURE_FLAGS if isinstance(flags, int) else 0


@overload
def parse(source: str, filename: str = ..., mode: Literal["exec"] = ...) -> ast.Module: ...
@overload
def parse(source: str, filename: str, mode: str) -> ast.AST: ...


def parse(source: str, filename: str = "<unknown>", mode: str = "exec") -> ast.AST:
    """``ast.parse``, one thread at a time (a Module in "exec" mode, as ``ast.parse``)."""
    with _LOCK:
        return ast.parse(source, filename, mode)


def compile_tree(tree: Any, filename: str, mode: str, flags: int = 0) -> Any:
    """``compile`` of an AST object, one thread at a time.

    With no ``flags`` the code is compiled as a notebook cell is: under no
    ``from __future__`` import (not this module's own ``annotations``, which
    ``compile`` would inherit: a cell's annotations would be strings). Code
    compiled again from a module's source passes that module's future flags."""
    with _LOCK:
        return compile(tree, filename, mode, flags=flags, dont_inherit=True)
