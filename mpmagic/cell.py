"""The code of a ``%%parallel`` cell: which notebook names it uses, and how a
worker runs it and returns its last expression's value.

The notebook side (:func:`make_cell_spec`) sends only the names the cell reads:
modules travel as their import name and are imported again in the worker;
everything else is cloudpickled. The worker side (:func:`run_cell_code`)
imports no IPython.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import linecache
import logging
import symtable
import sys
import types
from dataclasses import dataclass, field
from typing import Any

from . import astlock
from .errors import cell_origin, newline_ended, remember_cell_origin
from .worker_setup import note_notebook_value_in_cell, use_set_globals_in

log = logging.getLogger("mpmagic")


def source_digest(text: str) -> str:
    """A short hash of ``text``: the stable part of the file names we give code."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()


@dataclass
class CellSpec:
    """What a worker needs to run a cell: code, names, modules to import."""

    source: str
    filename: str
    names: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    gather: tuple[str, ...] = ()
    seed: int | None = None  # --seed: each rank's random stream (seeding.py)
    seed_numpy: bool = True  # --seed: numpy's global state too (seeding.uses_numpy, decided in the notebook)
    seed_torch: bool = False  # --seed: torch's default generator too (seeding.uses_torch)
    keep: bool = False  # --keep: run in the rank's kept namespace (ranks.py)
    reset: bool = False  # --keep --reset: drop the kept namespaces first
    # The lines above the body in its notebook cell (the %%parallel line): the body
    # is compiled below as many blank lines, so its line numbers are the cell's.
    line_offset: int = 0
    # Notebook names the cell assigns whose values could not be pickled: not sent
    # (name -> why, said if a rank reads one before assigning it: api._pack_spec).
    unsent: dict[str, str] = field(default_factory=dict)
    # The notebook's ``from __future__`` features (astlock.notebook_future_flags): the
    # cell is compiled under them in every rank, as IPython compiles it serially.
    future_flags: int = 0
    # The notebook's IPython shows a final assignment's value (``ast_node_interactivity =
    # 'last_expr_or_assign'``): a cell ending in ``x = ...`` has x as its value, as serially.
    last_assign: bool = False

    @property
    def numbered_source(self) -> str:
        """The body as compiled: below ``line_offset`` blank lines."""
        return "\n" * self.line_offset + self.source


def register_source(source: str, prefix: str = "parallel-cell") -> str:
    """Give cell source a filename that tracebacks can show lines from.

    The name comes from the source's content, not from a counter: every
    name stays in ``linecache`` (ours, and each worker's) for good, and
    IPython's traceback display keeps a parsed copy of every file it showed
    (``stack_data``/``executing`` caches, never emptied). A new name per call
    grew the notebook by one entry per ``%%parallel`` run and one parsed
    file per failure shown, without bound (found by the chaos soak: +380
    objects per 100 calls, docs/reliability.md section 11); the same body
    now reuses one name.
    """
    filename = f"<{prefix}-{source_digest(source)}>"
    lines = newline_ended(source.splitlines(keepends=True))
    linecache.cache[filename] = (len(source), None, lines, filename)
    return filename


def names_used(source: str, filename: str = "<cell>", tree: ast.AST | None = None) -> set[str]:
    """The global names the code reads: at its top level, and in nested scopes
    (functions, classes, comprehensions) the names that are not their own.

    A function's parameter or local is not the notebook's variable of that
    name: ``def g(r): ...`` with an unpicklable ``r`` in the notebook failed
    the cell with "cannot send r", though serial Python never reads it.
    """
    # Read by an augmented assignment or ``del`` (``total += x``, ``del scratch``):
    # symtable counts those as bindings only, yet they need the value.
    if tree is None:
        tree = astlock.parse(source)
    updated = {t.id for node in ast.walk(tree) for t in _updated_targets(node)}
    own = _bound_before_read(tree) if isinstance(tree, ast.Module) and not _reads_by_name(tree) else set()
    names: set[str] = set()
    scopes = [symtable.symtable(source, filename, "exec")]
    while scopes:
        scope = scopes.pop()
        kind = scope.get_type()
        for sym in scope.get_symbols():
            name = sym.get_name()
            read = sym.is_referenced() or name in updated
            if kind == "module":
                wanted = read and name not in own
            elif kind == "class":
                # A class body looks a name up in itself, then in the globals: one it
                # both reads and binds (x = x + 1) still reads the notebook's first.
                wanted = read and not sym.is_free() and name not in own
            else:
                wanted = read and sym.is_global() and name not in own
            if wanted:
                names.add(name)
        scopes.extend(scope.get_children())
    return names | _names_in_code_strings(tree) | _names_read_through_main(tree)


def _names_read_through_main(tree: ast.AST) -> set[str]:
    """The names the code reads off the notebook's namespace by a literal name: as
    attributes of ``__main__`` (``import __main__`` or ``as m`` then ``__main__.w``,
    ``from __main__ import w``, ``sys.modules["__main__"].w``) or as keys of its
    ``globals()`` (``globals()["w"]``, ``globals().get("w")``).

    Serially a cell's ``__main__`` and ``globals()`` are the notebook's, so these are
    the notebook's variables; a rank's hold the names sent, and those reads raised
    AttributeError (ImportError, KeyError) in every rank. A name built at run time
    (``getattr(__main__, name)``) stays unknown, as in ``exec``.
    """
    aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names if a.name == "__main__"}

    def is_main(node: ast.expr) -> bool:  # (__main__, or sys.modules["__main__"])
        return (isinstance(node, ast.Name) and node.id in aliases) or (
            isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
            and node.slice.value == "__main__" and isinstance(node.value, ast.Attribute)
            and node.value.attr == "modules")

    def is_globals(node: ast.expr) -> bool:  # (globals(), or __main__.__dict__)
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "globals"
                and not node.args and not node.keywords) or (
            isinstance(node, ast.Attribute) and node.attr == "__dict__" and is_main(node.value))

    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "__main__" and not node.level:
            names |= {a.name for a in node.names if a.name != "*"}
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Load, ast.Del)) and is_main(node.value):
            names.add(node.attr)  # (a del needs it there, as serially)
        elif (isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Attribute)
              and is_main(node.target.value)):  # (__main__.n += 1 reads it first)
            names.add(node.target.attr)
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and is_globals(node.value)
              and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            names.add(node.slice.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and is_globals(node.func.value) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}  # (a module's own: __name__, __dict__)


def names_assigned(tree: ast.AST) -> set[str]:
    """The names the code binds in its own (top-level) scope, anywhere in it: an
    assignment's or ``del``'s target, a ``for``/``with``/``except``/``match``
    target, an import, a ``def``/``class``, a walrus (one in a comprehension
    too). Not the names nested functions and classes bind: those are theirs.

    A notebook value of such a name that cannot be pickled is not sent: the
    cell may never read it (``for r in ...``, ``r = None`` in an ``if``), and
    a rank that does read it first says why it is missing (api._pack_spec).
    """
    bound: set[str] = set()
    todo: list[tuple[ast.AST, bool]] = [(tree, False)]  # (node, inside a comprehension)
    while todo:
        node, in_comp = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)  # its body is its own scope; what is evaluated here is not
            outer: list[ast.AST] = [*node.decorator_list]
            if isinstance(node, ast.ClassDef):
                outer += [*node.bases, *node.keywords]
            else:
                outer += [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
            todo.extend((n, in_comp) for n in outer)
            continue
        if isinstance(node, ast.Lambda):
            todo.extend((n, in_comp) for n in [*node.args.defaults, *(d for d in node.args.kw_defaults if d)])
            continue
        if isinstance(node, ast.NamedExpr) and isinstance(node.target, ast.Name):
            bound.add(node.target.id)  # (in a comprehension too: it binds in the enclosing scope)
        elif not in_comp:
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                bound.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound |= {a.asname or a.name.partition(".")[0] for a in node.names if a.name != "*"}
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.add(node.name)
            elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
                bound.add(node.name)
            elif isinstance(node, ast.MatchMapping) and node.rest:
                bound.add(node.rest)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            # Its targets are its own; the first iterable is evaluated here.
            first, *rest = node.generators
            todo.append((first.iter, in_comp))
            inner: list[ast.AST] = [first.target, *first.ifs, *rest]
            inner += [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            todo.extend((n, True) for n in inner)
            continue
        todo.extend((child, in_comp) for child in ast.iter_child_nodes(node))
    return bound


def leave_out_unpicklable(spec: CellSpec) -> bool:
    """Take out of ``spec.names`` the notebook values that cannot be pickled, of names
    the cell assigns (:func:`names_assigned`), noting why in ``spec.unsent``; True if
    any was. Called when pickling the names failed: the ranks start without them.

    Serial Python runs ``for r in range(3)`` or ``r = None`` in an ``if`` without
    ever reading the notebook's ``r``: an unpicklable one (a thread lock left by
    earlier work) refused the whole cell. A rank that does read it before assigning
    it raises NameError, and the notebook adds why (``api._note_unsent_name``).
    A name the cell only reads cannot be done without: its SerializationError
    (saying "the ranks") is raised.
    """
    from . import payload

    assigned: set[str] | None = None
    for name, value in list(spec.names.items()):
        try:
            payload.dumps_function(value, name)
        except Exception as exc:
            if assigned is None:
                assigned = names_assigned(astlock.parse(spec.source))
            if name not in assigned:
                raise type(exc)(str(exc).replace("the workers", "the ranks")) from None
            del spec.names[name]
            spec.unsent[name] = str(exc).split(": ", 1)[-1]  # (what follows "cannot send r to the workers")
    return assigned is not None


def _reads_by_name(tree: ast.AST) -> bool:
    """Does the code read names in a way no scan sees (``eval(expr)``, ``globals()``)?
    Then every name it reads is sent, even one it binds before any visible read."""
    return any(isinstance(node, ast.Name) and node.id in ("eval", "exec", "globals", "vars", "locals")
               for node in ast.walk(tree))


def _bound_before_read(tree: ast.Module) -> set[str]:
    """Names the cell's top level binds for sure before anything in it reads them.

    ``q = rank * 10`` then ``q``: serial code never reads the notebook's ``q``,
    so it is not sent (an unpicklable one failed the cell). Statements are
    taken in order; a read anywhere in one (its nested functions included, a
    ``del``, an augmented assignment) counts before what it binds, and only
    an assignment, an import or a ``def``/``class`` at the top level binds
    for sure (not one inside an ``if``, a loop or a ``try``).
    """
    bound: set[str] = set()
    read_first: set[str] = set()
    for statement in tree.body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store) and node.id not in bound:
                read_first.add(node.id)
            for target in _updated_targets(node):
                if target.id not in bound:
                    read_first.add(target.id)
        bound |= _binds(statement)
    return bound - read_first


def _binds(statement: ast.stmt) -> set[str]:
    """The names a top-level statement binds whenever it completes."""
    if isinstance(statement, ast.Assign):
        return {n.id for t in statement.targets for n in _plain_names(t)}
    if isinstance(statement, ast.AnnAssign) and statement.value is not None:
        return {n.id for n in _plain_names(statement.target)}
    if isinstance(statement, ast.Import):
        return {a.asname or a.name.partition(".")[0] for a in statement.names}
    if isinstance(statement, ast.ImportFrom):
        return {a.asname or a.name for a in statement.names if a.name != "*"}
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    return set()


def _plain_names(target: ast.expr) -> list[ast.Name]:
    """The names an assignment target binds (``a``, ``a, *b``; not ``x.a`` or ``x[0]``)."""
    if isinstance(target, ast.Name):
        return [target]
    if isinstance(target, ast.Starred):
        return _plain_names(target.value)
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for t in target.elts for n in _plain_names(t)]
    return []


def _names_in_code_strings(tree: ast.AST) -> set[str]:
    """The names read by code given as a literal string to ``exec``/``eval``
    (``exec("total = base * 2")``): serial code finds ``base`` in the
    notebook, so the worker must have it. A string built at run time stays
    unknown (docs/troubleshooting.md)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval")
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            code = node.args[0].value
            try:
                names |= names_used(code, "<string>", ast.parse(code, mode="exec"))
            except (SyntaxError, ValueError):
                pass  # serial code raises it where it runs; the rank does the same
    return names


def _updated_targets(node: ast.AST) -> list[ast.Name]:
    """The plain names ``node`` updates in place or deletes (both read them first)."""
    if isinstance(node, ast.AugAssign):
        return [node.target] if isinstance(node.target, ast.Name) else []
    if isinstance(node, ast.Delete):
        return [t for t in node.targets if isinstance(t, ast.Name)]
    return []


def _module_name(mod: types.ModuleType) -> str | None:
    name = getattr(mod, "__name__", None)
    if name in (None, "__main__", "__mp_main__"):
        return None
    return name


def make_cell_spec(
    source: str, user_ns: dict[str, Any], gather: tuple[str, ...] = ()
) -> CellSpec:
    """Parse the cell (SyntaxError propagates) and pick the names it needs.

    When ``source`` is the body of the running ``%%parallel`` cell, it is
    numbered as that cell (the magic line is line 1), in syntax errors, in
    the ranks' tracebacks and in ``%pdebug``, and shown under the cell's name.
    """
    origin = cell_origin(source)
    offset = origin.offset if origin is not None else 0
    numbered = "\n" * offset + source
    tree = astlock.parse(numbered)  # (a SyntaxError is raised here, as the docstring says)
    filename = register_source(numbered)
    remember_cell_origin(filename, origin)  # its frames show as the notebook cell's
    # What only compiling finds ('return' or 'await' outside a function) is found
    # here too, once, not in every rank with a traceback through the worker.
    flags = astlock.notebook_future_flags()
    compile(numbered, filename, "exec", flags=flags, dont_inherit=True)
    spec = CellSpec(source=source, filename=filename, gather=tuple(gather), line_offset=offset, future_flags=flags,
                    last_assign=shows_last_assignment())
    from . import payload

    for name in sorted(names_used(source, filename, tree)):
        if name in ("rank", "size") or name not in user_ns:
            continue
        value = user_ns[name]
        if isinstance(value, types.ModuleType) and (modname := _module_name(value)):
            spec.modules[name] = modname
        elif name in vars(builtins) and _same(vars(builtins)[name], value):  # (as Python looks a builtin up:
            # not hasattr, whose module __annotations__ getter gives builtins an empty one for good)
            continue  # (display, get_ipython: the worker has its own, see task_builtins)
        else:
            spec.names[name] = payload.worker_exit_for(name, value)  # (IPython's exit: the worker's, by its name)
    return spec


def _same(a: Any, b: Any) -> bool:
    """The same object, or the same method of the same object (``shell.get_ipython``
    is a new bound method at each access)."""
    return a is b or (isinstance(a, types.MethodType) and isinstance(b, types.MethodType)
                      and a.__func__ is b.__func__ and a.__self__ is b.__self__)


def shows_last_assignment() -> bool:
    """Does the notebook's IPython show the value of a cell's final assignment
    (``%config InteractiveShell.ast_node_interactivity = 'last_expr_or_assign'``)?

    Read where a cell is sent (the notebook), so its ranks' values are what the cell
    run serially would show; False outside IPython (a script, a worker). IPython is
    not imported here: only a shell already running is asked.
    """
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return getattr(shell, "ast_node_interactivity", "last_expr") == "last_expr_or_assign"


def split_last_expression(tree: ast.Module, last_assign: bool = False) -> tuple[ast.Module, ast.Expression | None]:
    """Split off a trailing expression statement, as IPython does for Out[].

    ``last_assign`` (:func:`shows_last_assignment`): a trailing assignment to one plain
    name (``x = ...``, ``x += ...``, ``x: T = ...``) stays in the body and the name is
    the value, as IPython's ``last_expr_or_assign`` appends it (``InteractiveShell.run_ast_nodes``).
    """
    if last_assign and tree.body and isinstance(tree.body[-1], (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        final = tree.body[-1]
        if isinstance(final, ast.Assign):
            target: ast.expr | None = final.targets[0] if len(final.targets) == 1 else None
        else:
            target = final.target
        if isinstance(target, ast.Name):
            return tree, ast.Expression(ast.copy_location(ast.Name(target.id, ast.Load()), target))
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body[-1].value)
        body = ast.Module(tree.body[:-1], type_ignores=[])
        return body, last
    return tree, None


def run_cell_code(
    spec: CellSpec, rank: int, size: int, as_main: bool = True, filename: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Run the cell with ``rank`` and ``size`` set; return (last value, gathered).

    The cell's namespace is ``sys.modules["__main__"]`` while it runs, as serial
    code's is: a class the cell defines can be pickled (``pickle.dumps(P())``), and
    ``import __main__`` finds the cell's names. In a worker (``as_main``) it is a
    plain module; in the notebook (the serial run of ``--compare`` and ``--scaling``,
    ``%pdebug``'s replay of a rank) a :class:`_NotebookMain`, through which another
    thread's lookup of a notebook name in ``__main__`` (a background run loading a
    notebook class) still finds the notebook's.
    ``filename``: compile under this name, whose lines ``linecache`` already
    has (``%pdebug`` replays a rank as its notebook cell); the spec's own by default.
    """
    source = spec.numbered_source
    if filename is None:
        filename = spec.filename
        linecache.cache[filename] = (len(source), None, newline_ended(source.splitlines(keepends=True)), filename)
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    for alias, modname in spec.modules.items():
        ns[alias] = importlib.import_module(modname)
    ns.update(use_set_globals_in(spec.names))  # (a worker setup's `global` values win, as for a mapped function)
    ns["rank"], ns["size"] = rank, size
    if spec.seed is not None:  # --seed (seeding.py)
        from .seeding import seed_rank

        seed_rank(spec.seed, rank, getattr(spec, "seed_numpy", True), getattr(spec, "seed_torch", False))
    # Code in the cell may import from __main__ or pickle its own classes.
    kept = spec.keep and as_main
    if kept:  # %%parallel --keep (ranks.py): the rank's kept namespace; its own names win
        main = kept_namespace(rank, spec.reset)
        from_notebook = _from_notebook.setdefault(rank, {})
        _take_notebook_names(main.__dict__, ns, {*spec.modules, *spec.names}, from_notebook)
        bindings = _Bindings()
    else:
        main = types.ModuleType("__main__") if as_main else _NotebookMain(sys.modules.get("__main__"))
        main.__dict__.update(ns)
    ns = main.__dict__
    saved_main = sys.modules.get("__main__")
    sys.modules["__main__"] = main
    body: ast.Module | None = None
    stopped_at: int | None = None  # (the line of the top-level statement that raised)
    try:
        last_assign = spec.last_assign
        body, last = split_last_expression(astlock.parse(source, filename), last_assign)
        if kept and from_notebook:  # (what the rank binds of the notebook's names, as it runs: _mark_bindings)
            body, last, marks = _marked(body, last, set(from_notebook), source, filename, last_assign)
            if marks:  # (only then: a cell's globals() shows this name while it runs)
                ns[_BOUND] = bindings
        code = astlock.compile_tree(body, filename, "exec", spec.future_flags)
        try:
            exec(code, ns)
        except BaseException as exc:
            stopped_at = _line_raised_at(exc, code)
            # A notebook name sent with the cell hid the worker setup's: say so (as a map task's error does).
            note_notebook_value_in_cell(exc, ns, spec.names)
            raise
        try:
            value = eval(astlock.compile_tree(last, filename, "eval", spec.future_flags), ns) if last is not None else None
        except BaseException as exc:
            note_notebook_value_in_cell(exc, ns, spec.names)
            raise
    finally:
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        else:
            sys.modules.pop("__main__", None)
        if kept:  # the notebook names the rank bound are its own now (and no reference is kept to them)
            if ns.get(_BOUND) is bindings:
                del ns[_BOUND]
            bound = _surely_bound(body, stopped_at) if body is not None else set()
            _forget_rebound(ns, from_notebook, bound | bindings.names)
    missing = [g for g in spec.gather if g not in ns]
    if missing:
        raise NameError(f"gather= (--gather): name(s) {', '.join(map(repr, missing))} not defined in the cell")
    return value, {g: ns[g] for g in spec.gather}


def gather_check_failed(exc: BaseException) -> bool:
    """True when ``exc`` is :func:`run_cell_code`'s own ``NameError`` for a gathered
    variable (``gather=``, ``--gather``) the rank never set: the cell's code ran to
    its end and raised nothing; mpmagic's check after it did. (An error of the
    cell's code has the cell's frames below run_cell_code's.)"""
    if not isinstance(exc, NameError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is run_cell_code.__code__


class _NotebookMain(types.ModuleType):
    """The serial run's ``__main__`` in the notebook: the cell's namespace, whose
    attributes a rank's ``__main__`` has (so pickle finds a class the cell defines),
    with the notebook's own ``__main__`` behind it for other names. The serial run
    is in the notebook's process while other threads may run (a background run's
    results, loaded there, name the notebook's classes as ``__main__.Box``)."""

    __slots__ = ("notebook",)  # (not in the module's __dict__: that is the cell's namespace)

    def __init__(self, notebook: types.ModuleType | None) -> None:
        super().__init__("__main__")
        self.notebook = notebook

    def __getattr__(self, name: str) -> Any:
        if self.notebook is None or name.startswith("__"):  # (a rank's __main__ has no __file__, no __spec__)
            raise AttributeError(f"module '__main__' has no attribute {name!r}")
        return getattr(self.notebook, name)


_kept: dict[int, types.ModuleType] = {}  # %%parallel --keep: rank -> its kept ``__main__`` in this worker
# The notebook's values in a kept namespace, by rank and name: the objects the notebook
# sent that the rank has not bound (nor deleted) since. Such a name is not the rank's:
# the next --keep cell that reads it gets the notebook's value of then.
_from_notebook: dict[int, dict[str, Any]] = {}


def _take_notebook_names(kept: dict[str, Any], ns: dict[str, Any], sent: set[str],
                         from_notebook: dict[str, Any]) -> None:
    """Put this run's ``ns`` (the notebook's names ``sent``, ``rank``, ``size``, the
    module's own) into the rank's ``kept`` namespace: a name the rank bound itself
    stays as the rank left it; a notebook name the rank has not bound since it came
    (still the very object sent, in ``from_notebook``) takes the notebook's value
    sent now, as serially the notebook's current value is read.

    Identity tells them apart (and :func:`_surely_bound`): a rank's ``x = x * 2`` (or
    ``del x``, or a function's ``global x``) leaves another object, or none, under ``x``. A rank changing the
    notebook's object in place (``lst.append(rank)``) binds nothing: the notebook's
    value comes again (a copy made its own, ``mine = list(lst)``, stays).
    """
    for name, value in ns.items():
        if name in sent:
            if name not in kept or (name in from_notebook and kept[name] is from_notebook[name]):
                kept[name] = from_notebook[name] = value
        elif name in ("rank", "size") or name not in kept:
            kept[name] = value


def _forget_rebound(kept: dict[str, Any], from_notebook: dict[str, Any], bound: set[str]) -> None:
    """After a kept rank's run: the notebook names it rebound, deleted, or ``bound`` for
    sure (:func:`_surely_bound`: ``n = n + rank`` in rank 0 leaves the very same small int
    under ``n``) are its own now."""
    for name in [n for n, v in from_notebook.items() if n in bound or n not in kept or kept[n] is not v]:
        del from_notebook[name]


def _surely_bound(body: ast.Module, stopped_at: int | None) -> set[str]:
    """The names the cell's top-level statements bound for sure: those of an assignment
    (augmented too), an import, a ``def`` or ``class`` at the top level that completed
    (every one, or those ending above ``stopped_at``, the line of the one that raised).
    A binding in a branch or a function may not have run: identity tells there."""
    names: set[str] = set()
    for statement in body.body:
        if stopped_at is not None and (statement.end_lineno or statement.lineno) >= stopped_at:
            break
        names |= _binds(statement)
        if isinstance(statement, ast.AugAssign) and isinstance(statement.target, ast.Name):
            names.add(statement.target.id)
    return names


# The name under which a kept rank's cell finds :class:`_Bindings` while it runs (then removed).
_BOUND = "__mpmagic_bound__"


class _Bindings:
    """What a kept rank's cell bound as it ran, among the notebook's names it was given:
    called (``__mpmagic_bound__(value, "x")``) by the code :func:`_mark_bindings` adds
    after each binding of one of them inside a branch, loop, ``with`` or ``try``, or
    around a walrus. Returns ``value`` (the walrus's: an expression stays one). In the
    cell's namespace only while a cell with such a binding runs (its ``globals()`` show
    it then: there is no other place its code can find it)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __call__(self, value: Any, *names: str) -> Any:
        self.names.update(names)
        return value


def _marker(names: list[str], at: ast.AST) -> ast.stmt:
    """The statement ``__mpmagic_bound__(None, *names)``, at ``at``'s place (its lines)."""
    call = ast.Call(ast.Name(_BOUND, ast.Load()), [ast.Constant(None), *(ast.Constant(n) for n in names)], [])
    return ast.copy_location(ast.Expr(call), at)


class _MarkWalrus(ast.NodeTransformer):
    """``(x := v)`` of a watched name as ``__mpmagic_bound__((x := v), "x")``; not inside a
    ``lambda`` (its walrus binds the lambda's own name), nor a nested ``def`` or class."""

    def __init__(self, watched: set[str]) -> None:
        self.watched = watched

    def visit_NamedExpr(self, node: ast.NamedExpr) -> ast.expr:
        self.generic_visit(node)
        if node.target.id not in self.watched:
            return node
        call = ast.Call(ast.Name(_BOUND, ast.Load()), [node, ast.Constant(node.target.id)], [])
        return ast.copy_location(call, node)

    def visit_Lambda(self, node: ast.Lambda) -> ast.Lambda:
        return node


def _mark_bindings(body: list[ast.stmt], watched: set[str], nested: bool = False) -> list[ast.stmt]:
    """``body`` (a kept rank's cell) with a call of :class:`_Bindings` where a name of
    ``watched`` (the notebook's, not the rank's yet) is bound inside a compound statement
    (after an assignment, import, ``def`` or ``class``; first in the body of a ``for``
    binding its target or a ``with`` binding its ``as``), around each walrus, and in the
    guard of a ``match`` case whose pattern captures one (:func:`_mark_captures`). Why:
    a top-level binding is known for sure (:func:`_surely_bound`), and identity tells
    other cases apart, but ``if rank == 0: k = k + 0`` leaves the very same object under
    ``k``: serially the assignment happened, and ``k`` is the rank's. Only what ran is
    recorded (a branch not taken binds nothing). A nested ``def``'s code is left alone
    (its names are its own; a ``global`` there rebinding the same object is not seen)."""
    walrus = _MarkWalrus(watched)
    out: list[ast.stmt] = []
    for statement in body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field in ("decorator_list", "bases", "keywords"):
                if hasattr(statement, field):
                    setattr(statement, field, [walrus.visit(e) for e in getattr(statement, field)])
        else:
            for field, value in ast.iter_fields(statement):
                if isinstance(value, ast.expr):
                    setattr(statement, field, walrus.visit(value))
                elif isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                    setattr(statement, field, _mark_bindings(value, watched, nested=True))
                elif isinstance(value, list):
                    new = []
                    for item in value:
                        if isinstance(item, ast.expr):
                            item = walrus.visit(item)
                        elif isinstance(item, ast.match_case):
                            item.body = _mark_bindings(item.body, watched, nested=True)
                            _mark_captures(item, watched)
                        elif isinstance(item, ast.ExceptHandler):
                            item.body = _mark_bindings(item.body, watched, nested=True)
                        elif isinstance(item, ast.withitem):
                            item.context_expr = walrus.visit(item.context_expr)
                        elif isinstance(item, ast.keyword):
                            item.value = walrus.visit(item.value)
                        new.append(item)
                    setattr(statement, field, new)
        out.append(statement)
        if isinstance(statement, (ast.For, ast.AsyncFor)):
            names = sorted({n.id for n in _plain_names(statement.target)} & watched)
            if names:
                statement.body.insert(0, _marker(names, statement.body[0]))
        elif isinstance(statement, (ast.With, ast.AsyncWith)):
            names = sorted({n.id for item in statement.items if item.optional_vars is not None
                            for n in _plain_names(item.optional_vars)} & watched)
            if names:
                statement.body.insert(0, _marker(names, statement.body[0]))
        elif nested:
            names = sorted((_binds(statement) | ({statement.target.id} if isinstance(statement, ast.AugAssign)
                                                 and isinstance(statement.target, ast.Name) else set()))
                           & watched)
            if names:
                out.append(_marker(names, statement))
    return out


def _mark_captures(case: ast.match_case, watched: set[str]) -> None:
    """``case``'s guard records the watched names its pattern captures (``case k:``,
    ``case [m, *n]:``, ``{**p}``): a guard runs exactly when the pattern matched, and the
    names are bound then, whether the guard holds or not (as CPython binds them)."""
    names = sorted({n for node in ast.walk(case.pattern)
                    for n in ((node.name,) if isinstance(node, (ast.MatchAs, ast.MatchStar)) else
                              (node.rest,) if isinstance(node, ast.MatchMapping) else ())
                    if n is not None} & watched)
    if not names:
        return
    call = ast.Call(ast.Name(_BOUND, ast.Load()), [ast.Constant(True), *(ast.Constant(n) for n in names)], [])
    ast.copy_location(call, case.pattern)
    guard = _MarkWalrus(watched).visit(case.guard) if case.guard is not None else None
    case.guard = call if guard is None else ast.copy_location(ast.BoolOp(ast.And(), [call, guard]), guard)


def _marked(body: ast.Module, last: ast.Expression | None, watched: set[str], source: str,
            filename: str, last_assign: bool = False) -> tuple[ast.Module, ast.Expression | None, bool]:
    """The cell's ``body`` and ``last`` expression with :func:`_mark_bindings`' calls, and
    whether it has any; the cell as parsed again, unmarked, should that fail (a syntax
    node it does not know: identity then tells the rank's names, as before)."""
    try:
        marked = ast.Module(_mark_bindings(body.body, watched), body.type_ignores)
        if last is not None:
            last = ast.Expression(_MarkWalrus(watched).visit(last.body))
        marks = any(isinstance(node, ast.Name) and node.id == _BOUND
                    for tree in (marked, last) if tree is not None for node in ast.walk(tree))
        ast.fix_missing_locations(marked)
        if last is not None:
            ast.fix_missing_locations(last)
        return marked, last, marks
    except Exception:
        log.debug("mpmagic: could not mark the bindings of a kept rank's cell", exc_info=True)
        return (*split_last_expression(astlock.parse(source, filename), last_assign), False)


def _line_raised_at(exc: BaseException, code: types.CodeType) -> int | None:
    """The line of the cell's top level (``code``) that was running when ``exc`` was raised."""
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code is code:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def kept_namespace(rank: int, reset_first: bool) -> types.ModuleType:
    """The kept module of ``rank`` in this worker (a new one the first time; ``reset_first``
    drops every kept rank first). The notebook pins the rank to this worker (ranks.py)."""
    if reset_first:
        _kept.clear()
        _from_notebook.clear()
    mod = _kept.get(rank)
    if mod is None:
        mod = _kept[rank] = types.ModuleType("__main__")
        _from_notebook.pop(rank, None)
    return mod
