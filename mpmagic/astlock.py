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

import ast
import threading
from typing import Any, Literal, overload

_LOCK = threading.RLock()


@overload
def parse(source: str, filename: str = ..., mode: Literal["exec"] = ...) -> ast.Module: ...
@overload
def parse(source: str, filename: str, mode: str) -> ast.AST: ...


def parse(source: str, filename: str = "<unknown>", mode: str = "exec") -> ast.AST:
    """``ast.parse``, one thread at a time (a Module in "exec" mode, as ``ast.parse``)."""
    with _LOCK:
        return ast.parse(source, filename, mode)


def compile_tree(tree: Any, filename: str, mode: str, flags: int = 0) -> Any:
    """``compile`` of an AST object, one thread at a time (``flags``: ``compile``'s, e.g. ``__future__`` features)."""
    with _LOCK:
        return compile(tree, filename, mode, flags)
