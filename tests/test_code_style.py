"""The code style the project keeps, checked over the source (no pool, no kernel).

Public functions carry type hints; the methods users call on a background
run's handle and on the shared helpers say what they do, as ``help()`` shows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mpmagic
from mpmagic import background
from mpmagic.backends import dask_shared
from mpmagic.shared import locks, queues

ROOT = Path(mpmagic.__file__).parent


def _public_functions() -> list[tuple[str, ast.FunctionDef]]:
    """Module-level public functions and public methods of public classes (not properties)."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        where = path.relative_to(ROOT)
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                found.append((f"{where}:{node.lineno} {node.name}", node))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for m in node.body:
                    if (isinstance(m, ast.FunctionDef) and not m.name.startswith("_")
                            and not any(isinstance(d, ast.Name) and d.id == "property" for d in m.decorator_list)):
                        found.append((f"{where}:{m.lineno} {node.name}.{m.name}", m))
    return found


def test_public_functions_have_type_hints():
    """Every argument (but self/cls) and the return of a public function is annotated."""
    missing = []
    for name, fn in _public_functions():
        a = fn.args
        args = [x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
        args += [x for x in (a.vararg, a.kwarg) if x is not None]
        unhinted = [x.arg for x in args if x.annotation is None] + (["return"] if fn.returns is None else [])
        if unhinted:
            missing.append(f"{name}: {', '.join(unhinted)}")
    assert missing == []


def test_user_facing_methods_of_runs_and_shared_helpers_have_docstrings():
    """``help(run.done)``, ``help(q.put_nowait)``, ``help(ev.set)`` say something
    (each method's own docstring: nothing is inherited here)."""
    methods = {
        background.Run: ["done", "cancelled", "wait", "cancel", "result", "info", "status_line"],
        background.Finished: ["done", "cancelled", "wait", "cancel", "result", "info", "status_line"],
        queues.SharedQueue: ["put", "put_nowait", "get", "get_nowait", "qsize", "empty", "full", "close"],
        locks.SharedEvent: ["set", "clear", "is_set", "wait"],
        dask_shared.DaskQueue: ["put", "put_nowait", "get", "get_nowait", "qsize", "empty", "full", "close",
                                "join_thread", "cancel_join_thread"],
        dask_shared.DaskLock: ["acquire", "release", "locked"],
        dask_shared.DaskEvent: ["set", "clear", "is_set", "wait"],
    }
    bare = [f"{cls.__name__}.{m}" for cls, names in methods.items() for m in names
            if not (vars(cls)[m].__doc__ or "").strip()]
    assert bare == []
