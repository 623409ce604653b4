"""The user's own modules: which files are the user's code, and which of them some code imports.

A checkpoint key covers the user's own modules (a ``.py`` beside the
notebook) by their file's contents, never installed code (the standard
library, ``site-packages``) nor mpmagic's: those change only with an install.
``checkpoint_keys`` asks this of the modules a function refers to;
``worker_setup`` asks it of the modules a ``%%pool setup`` cell (or an
``on_worker_start`` function) imports. Those are imported in the workers
only, often never in the notebook (that is what a setup is for: a model's
module loaded once per worker), so their files are found here as ``import``
would find them, without importing them in the notebook: importing runs the
module (a model loaded in the notebook too), and a package's submodule is
looked for under its package's folder without running the package.

This module imports no IPython (``worker_setup`` uses it) and nothing of mpmagic.
"""

from __future__ import annotations

import ast
import dis
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import types
from typing import Any, NamedTuple

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _installed_dirs() -> tuple[str, ...]:
    """Folders whose modules are installed code (the standard library, site-packages, the
    user's site-packages): left out of the key, as they change only with an install."""
    import site

    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs |= {p for p in sys.path if "site-packages" in p or "dist-packages" in p}
    try:
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except AttributeError:  # (a virtualenv's old site.py)
        pass
    return tuple(sorted({os.path.realpath(d).rstrip(os.sep) + os.sep for d in dirs if d}))


INSTALLED = _installed_dirs()
_INSTALLED_PARTS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")


def _installed_real(real: str) -> bool:
    return real.startswith(INSTALLED) or any(part in real for part in _INSTALLED_PARTS)


def installed(path: str) -> bool:
    """Is the file ``path`` installed code: under the standard library or a site-packages
    folder (any one, also one not on ``sys.path``)? Symlinks resolved."""
    return _installed_real(os.path.realpath(path))


def local_path(path: str) -> str | None:
    """``path`` made absolute (symlinks resolved) if it is a file of the user's own code,
    None if it is installed code (standard library, site-packages) or mpmagic's."""
    path = os.path.realpath(path)
    if _installed_real(path) or path.startswith(_PACKAGE_DIR):
        return None
    return path


def local_module_file(module_name: Any) -> str | None:
    """The source file of the loaded module ``module_name`` when it is the user's own code
    (a .py beside the notebook, say), not installed (standard library, site-packages) nor ours.

    The one test of "the user's own module": the checkpoint keys take its file, and
    ``warmup`` (which of them the workers reload and check, for a cell every one loaded
    here) keeps those of them it can reload. An entry of ``sys.modules`` named after a
    package but holding a standard library file (zipp's ``zipp.compat.overlay.zipfile``,
    which every notebook that imports ``distributed`` has) is not the user's."""
    module = sys.modules.get(module_name) if isinstance(module_name, str) else None
    path = getattr(module, "__file__", None)
    if not path or not isinstance(path, str) or module_name in ("__main__", "__mp_main__"):
        return None
    return local_path(path)


def module_file(name: str) -> str | None:
    """The file ``import name`` would load here, when it is the user's own; None otherwise
    (not found, installed, the standard library, a namespace package).

    A module loaded here is taken as loaded. Else it is looked for along
    ``sys.path`` (``PathFinder``, as the import system does), a submodule under
    its package's folder, without running anything; an installed package's
    submodules are never looked for (they are installed too).
    """
    top = name.partition(".")[0]
    if not top or top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return None
    if name in sys.modules:
        return local_module_file(name)
    parts = name.split(".")
    search: list[str] | None = None  # None: sys.path (a top-level module)
    origin: str | None = None
    for i in range(1, len(parts) + 1):
        full = ".".join(parts[:i])
        module = sys.modules.get(full)
        if module is not None:
            origin, locations = getattr(module, "__file__", None), getattr(module, "__path__", None)
        else:
            try:
                spec = importlib.machinery.PathFinder.find_spec(full, search)
            except Exception:  # (a broken sys.path entry, a bad name): nothing known of it
                return None
            if spec is None:
                return None
            origin = spec.origin if spec.has_location else None
            locations = spec.submodule_search_locations
        if origin and local_path(origin) is None:  # installed (or ours): so is everything below it
            return None
        if i < len(parts):
            if not locations:
                return None
            search = list(locations)
    return local_path(origin) if origin else None


_LOADS = ("LOAD_CONST", "LOAD_SMALL_INT")
_IMPORTERS = ("import_module", "__import__")


def imported_names(code: types.CodeType) -> list[str]:
    """The absolute module names ``code`` (and the functions and classes defined in it)
    imports, in order: ``import a.b`` gives ``a`` and ``a.b``; ``from a import b``
    gives ``a`` and ``a.b`` (``b`` may be a submodule); ``importlib.import_module("m")``
    and ``__import__("m")`` with a literal name give ``m``. Relative imports are left
    out (the setup cell is no package). Read from the bytecode, so the source is not
    needed (an ``on_worker_start`` function)."""
    names: list[str] = []
    stack, seen = [code], set()
    while stack:
        co = stack.pop()
        if id(co) in seen:
            continue
        seen.add(id(co))
        stack.extend(c for c in co.co_consts if isinstance(c, types.CodeType))
        before: list[Any] = [None, None]  # the two instructions before this one
        current = ""  # the module of the last IMPORT_NAME (IMPORT_FROM names are in it)
        for ins in dis.get_instructions(co):
            if ins.opname == "IMPORT_NAME":
                level = before[0].argval if before[0] is not None and before[0].opname in _LOADS else 0
                current = ins.argval if level == 0 or not isinstance(level, int) else ""
                if current:
                    dotted = current.split(".")
                    names += [".".join(dotted[:i]) for i in range(1, len(dotted) + 1)]
            elif ins.opname == "IMPORT_FROM" and current:
                names.append(f"{current}.{ins.argval}")
            elif (ins.opname in _LOADS and isinstance(ins.argval, str) and before[1] is not None
                  and before[1].argval in _IMPORTERS):
                names.append(ins.argval)
            before = [before[1], ins]
    return list(dict.fromkeys(names))


def imported_files(code: types.CodeType) -> list[str]:
    """The files of the user's own modules ``code`` imports (:func:`imported_names`,
    :func:`module_file`), in order, each once."""
    files = (module_file(name) for name in imported_names(code))
    return list(dict.fromkeys(f for f in files if f is not None))


class SourceImports(NamedTuple):
    """What a module's source imports (:func:`source_imports`)."""

    # (name bound, module, attribute or None, modules the name reaches) for each import its top
    # runs (at import: not in a function's body): `import a.b` -> ("a", "a", None, ("a", "a.b")),
    # `import a.b as x` -> ("x", "a.b", None, ("a.b",)), `from m import k as j` -> ("j", "m", "k", ()),
    # `from m import *` -> ("*", "m", "*", ())
    bindings: tuple[tuple[str, str, str | None, tuple[str, ...]], ...]
    used: frozenset[str]  # the names its top reads when it runs (decorators and defaults too)
    modules: tuple[str, ...]  # every module it imports anywhere, function bodies too (absolute)


_sources: dict[tuple[str, str], tuple[tuple[int, int] | None, SourceImports | None]] = {}


def source_imports(path: str, package: str | None) -> SourceImports | None:
    """The imports in the source file ``path`` of a module of ``package`` (for relative
    imports), read from its text (None if it cannot be read or parsed); remembered until
    the file's mtime or size changes.

    Why the text, not the loaded module's globals: ``from cfg import THRESHOLD`` leaves
    nothing in the module that says it came from ``cfg`` (an int), nor does ``CFG =
    cfg.Cfg()`` say what the module did with ``cfg`` when it ran. A checkpoint key covers
    such a module's own imports by their file (``checkpoint_keys``), and a run sees whether
    the module still holds what importing it now would give (see ``SourceImports``)."""
    try:
        st = os.stat(path)
        stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
    except (OSError, ValueError):
        stamp = None
    known = _sources.get((path, package or ""))
    if known is not None and known[0] == stamp and stamp is not None:
        return known[1]
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
        found: SourceImports | None = _Imports(package).read(tree)
    except (OSError, SyntaxError, ValueError):
        found = None
    _sources[(path, package or "")] = (stamp, found)
    return found


class _Imports(ast.NodeVisitor):
    """Walks a module's syntax tree for :func:`source_imports`: the imports and names its top
    runs (a function's body runs later: only its decorators and defaults run at import)."""

    def __init__(self, package: str | None) -> None:
        self.package = package
        self.depth = 0  # > 0: inside a function's body
        self.bindings: list[tuple[str, str, str | None, tuple[str, ...]]] = []
        self.used: set[str] = set()
        self.modules: list[str] = []

    def read(self, tree: ast.AST) -> SourceImports:
        """What :func:`source_imports` returns, for the module ``tree``."""
        self.visit(tree)
        return SourceImports(tuple(self.bindings), frozenset(self.used), tuple(dict.fromkeys(self.modules)))

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802 (ast's visitor names)
        for alias in node.names:
            parts = alias.name.split(".")
            reached = tuple(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            self.modules += reached
            if self.depth == 0:
                if alias.asname:
                    self.bindings.append((alias.asname, alias.name, None, (alias.name,)))
                else:
                    self.bindings.append((parts[0], parts[0], None, reached))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        try:
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), self.package) \
                if node.level else (node.module or "")
        except (ImportError, ValueError):  # (a relative import outside a package)
            return
        if not base:
            return
        self.modules.append(base)
        for alias in node.names:
            if alias.name != "*":
                self.modules.append(f"{base}.{alias.name}")  # (a submodule, maybe)
            if self.depth == 0:
                self.bindings.append((alias.asname or alias.name, base, alias.name, ()))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for deco in getattr(node, "decorator_list", ()):
            self.visit(deco)
        for default in (*node.args.defaults, *node.args.kw_defaults):
            if default is not None:
                self.visit(default)
        self.depth += 1
        body = node.body
        for part in body if isinstance(body, list) else [body]:
            self.visit(part)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function  # noqa: N815

    def visit_Name(self, node: ast.Name) -> None:  # noqa: N802
        if self.depth == 0 and isinstance(node.ctx, ast.Load):
            self.used.add(node.id)
