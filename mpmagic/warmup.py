"""Warm workers that mirror the notebook, and the one-time costs of a run.

Why: a worker is a fresh interpreter. The first time a function that uses
numpy reaches it, unpickling the function imports numpy there (~0.3 s on
this machine), inside the first call's wall time: the first ``%pmap`` of a
numpy function ran at 0.58x on 2 cores where the next ones ran at 1.7-1.9x,
and the report blamed "starting, sending and collecting".

So the pool imports, in the background, the third-party modules the notebook
imported (and only those: a notebook that imported nothing heavy keeps small
workers):

* at pool start, from a cheap scan of the notebook's ``__main__`` globals
  (modules, and the modules that defined its functions, classes and values,
  also those inside a list, tuple, set or dict);
* after every cell (an IPython ``post_run_cell`` hook: the user's
  ``import numpy as np`` reaches idle workers while they wait for work);
* when a call's function refers to a module not yet sent (a closure, a
  default, a helper's globals): the import goes out before the function;
* with each package the workers import, the submodules of it the notebook
  has loaded (``numpy.fft``, pandas' Styler: parts a package loads on first
  use, often from library code no scan of names can see), between cells,
  bounded, never one that brings the notebook's machinery;
* under forkserver, the modules known when the fork server starts are in its
  preload list, so replacement workers are born with them.

The local pool's manager thread sends ``protocol.Import(names)`` (the only
code that writes to a worker's pipe, see ``backends/local.py``); a worker
imports them in order between tasks, so an ``Import`` queued ahead of a
unit is done before its items run. Both sides are here: the notebook's scan
and bookkeeping (:class:`Warmth`), the worker's import log
(:class:`ImportLog`, used by ``worker.execute_map``/``execute_cell`` and the
Dask task too), and the notebook's tally of one run's one-time costs
(:class:`OneTimeCosts`) for the report. The after-cell hook itself is in
``mpmagic/__init__.py`` (it needs the pool, which this module, imported by
workers, must not). Importing this module costs nothing in a worker: the
notebook-only parts import what they need inside functions.
"""

from __future__ import annotations

import errno
import importlib
import itertools
import logging
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import compat, loadstamps, usermodules
from .protocol import Import, Reload
from .rss import resident_bytes

log = logging.getLogger("mpmagic")

# Top-level packages never preloaded: the notebook's own machinery (a worker
# that imports IPython or a GUI toolkit gains nothing and pays tens of MB),
# and our own package.
_NOT_PRELOADED = frozenset(
    {
        "IPython", "ipykernel", "ipywidgets", "ipython_genutils", "jupyter_client", "jupyter_core",
        "traitlets", "zmq", "tornado", "comm", "debugpy", "prompt_toolkit", "pygments",
        "nbformat", "nbclient", "matplotlib_inline", "pytest", "_pytest", "pluggy", "mpmagic",
        "psutil", "jedi", "parso", "stack_data", "executing", "asttokens", "pexpect", "wcwidth",
    }
)
# Exact modules never preloaded: pyplot picks a display backend on import
# (the notebook's inline one would pull IPython into every worker).
_NOT_PRELOADED_EXACT = frozenset({"matplotlib.pyplot", "pylab"})


def enabled() -> bool:
    """Warm-up is on unless ``MPMAGIC_WARM=0``."""
    return os.environ.get("MPMAGIC_WARM", "1") != "0"


# -- the notebook side: which modules ---------------------------------------
def _installed(module: Any) -> bool:
    """Does this module come from installed code (site-packages, the standard library)?
    ``usermodules.installed``: the same test that tells the user's own modules apart.

    Modules next to the notebook (``import mylib``) are left out: they are
    cheap, often edited and reloaded, and may run code on import.
    """
    path = getattr(module, "__file__", None)
    return isinstance(path, str) and bool(path) and usermodules.installed(path)


def _wanted(name: Any) -> bool:
    """A module name worth importing in the workers: loaded here, third-party, installed."""
    if not isinstance(name, str) or not name or name in _NOT_PRELOADED_EXACT:
        return False
    top = name.partition(".")[0]
    if top in _NOT_PRELOADED or top in sys.stdlib_module_names or top.startswith("_") or top == "builtins":
        return False
    # Loaded here, or a lazy submodule of a loaded package (see _lazy_submodules).
    module = sys.modules.get(top)
    return module is not None and _installed(module)


_CONTAINERS = (list, tuple, set, frozenset, dict)


def _names_of(value: Any, depth: int = 2) -> list[str]:
    """The modules a value needs in another process: its own, or its definer's.

    A list, tuple, set or dict is looked into (its first and last elements,
    two levels deep): the data a map is called on is usually a notebook
    global such as ``groups = [g for _, g in df.groupby(...)]``, whose own
    type (``list``) says nothing of the pandas classes its items unpickle to.
    """
    if isinstance(value, types.ModuleType):
        return [value.__name__]
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        name = getattr(value, "__module__", None)  # well-behaved on these types
        return [name] if isinstance(name, str) else []
    # Any other value (a DataFrame, a ufunc, a partial): its type's module.
    # type(v) is never a lazy proxy, so this triggers no user code.
    name = type(value).__module__
    names = [name] if isinstance(name, str) else []
    if depth and type(value) in _CONTAINERS and value:
        for element in _ends(value):
            names.extend(_names_of(element, depth - 1))
    return names


def _ends(container: Any) -> list[Any]:
    """A container's first and last elements (a dict's values): O(1), no user code
    (exact built-in types only, so no overridden ``__iter__`` or ``__getitem__``)."""
    if isinstance(container, dict):
        container = container.values()
    if isinstance(container, (list, tuple)):
        return [container[0], container[-1]] if len(container) > 1 else [container[0]]
    return [next(iter(container))]


def _keep(names: Any) -> list[str]:
    out: dict[str, None] = {}
    for name in names:
        if name not in out and _wanted(name):
            out[name] = None
    return list(out)


def notebook_modules(namespace: dict | None = None) -> list[str]:
    """Third-party modules the notebook's globals use, in the order first seen.

    A scan of ``__main__``'s names (IPython makes the user namespace
    ``__main__``): ~0.1 ms for a thousand names. Modules IPython itself
    loaded but the user never named are not included.
    """
    if namespace is None:
        main = sys.modules.get("__main__")
        namespace = getattr(main, "__dict__", {})
    names: list[str] = []
    for key, value in list(namespace.items()):
        if isinstance(key, str) and key.startswith("_"):
            continue  # IPython's _i1, _oh, ... and private names
        names.extend(_names_of(value))
        if isinstance(value, types.FunctionType) and value.__module__ == "__main__":
            names.extend(_function_modules_cached(value))
    return _keep(names)


#: The after-cell scan waits this many times its own last cost before it runs again
#: (unless something was imported): at most ~1 % of a session goes to it.
_SCAN_SPACING = 100


class _AfterCell:
    """When the after-cell scan last ran, what it cost, and ``sys.modules``' size then."""

    loaded = -1
    next_at = 0.0


def notebook_modules_after_cell() -> list[str] | None:
    """:func:`notebook_modules` for the after-cell hook, or None when it is skipped.

    The scan visits every notebook name, IPython's ``_iN`` of each cell
    included: in a long session (8,000 cells, thousands of functions) it cost
    every cell 5-65 ms, cells that never use mpmagic too. It runs when the
    notebook imported something since the last scan (``sys.modules`` grew:
    what warming is for), else at most once per 100 times its own last cost
    (a 0.1 ms scan, the usual, after every cell; a 5 ms one at most every
    0.5 s): never more than ~1% of the session. A module the notebook names
    without importing anything new (``import numpy as np`` after pandas
    loaded numpy) is found by the next scan.
    """
    now = time.monotonic()
    loaded = len(sys.modules)
    if loaded == _AfterCell.loaded and now < _AfterCell.next_at:
        return None
    start = time.perf_counter()
    names = notebook_modules()
    _AfterCell.loaded, _AfterCell.next_at = loaded, now + _SCAN_SPACING * (time.perf_counter() - start)
    return names


# function -> (its code, its modules), for as long as the function lives: a
# ``%pmap`` lambda is a new function (and code) at every call, and an entry
# per call was kept until a clear of the whole table at 10,000, after which
# every notebook function was scanned again at the next cell.
_scanned: weakref.WeakKeyDictionary[types.FunctionType, tuple[Any, list[str]]] = weakref.WeakKeyDictionary()


def _function_modules_cached(func: types.FunctionType) -> list[str]:
    """:func:`function_modules` of a notebook function, once per function and
    code (the scan after each cell then costs a lookup per function)."""
    code = func.__code__
    hit = _scanned.get(func)
    if hit is None or hit[0] is not code:
        hit = _scanned[func] = (code, function_modules(func))
    return hit[1]


def function_modules(func: Any) -> list[str]:
    """Third-party modules a function refers to: the globals its code names
    (nested code and helper functions of the notebook too), closure cells and
    defaults. Mirrors what cloudpickle will make the worker import."""
    return _keep(_function_module_names(func))


def _function_module_names(func: Any) -> list[str]:
    """Every module name :func:`function_modules` looks at, before its filter."""
    names: list[str] = []
    seen: set[int] = set()
    todo = [func]
    while todo and len(seen) < 200:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        f = getattr(f, "func", f)  # functools.partial
        f = getattr(f, "__func__", f)  # bound method
        code = getattr(f, "__code__", None)
        if code is None:
            names.extend(_names_of(f))
            continue
        glob = getattr(f, "__globals__", {})
        used = _code_names(code)
        # ``import pandas`` inside the function: the name is in co_names, not in globals.
        names.extend(n for n in used if n not in glob and n in sys.modules)
        values = [glob[n] for n in used if n in glob]
        values += [c.cell_contents for c in (getattr(f, "__closure__", None) or ()) if _filled(c)]
        values += list(getattr(f, "__defaults__", None) or ())
        for v in values:
            if isinstance(v, types.FunctionType) and getattr(v, "__module__", None) == "__main__":
                todo.append(v)  # a notebook helper: its globals travel too
            else:
                names.extend(_names_of(v))
                if isinstance(v, types.ModuleType):
                    names.extend(_lazy_submodules(v, used))
    return names


def _lazy_submodules(module: types.ModuleType, used: set[str]) -> list[str]:
    """Submodules a package loads on first attribute access that the code names
    (``np.random``: numpy 2 imports it lazily, ~45 ms, in the first task otherwise)."""
    if not hasattr(module, "__path__"):
        return []
    import importlib.util

    out = []
    for attr in used:
        name = f"{module.__name__}.{attr}"
        if name in sys.modules:
            out.append(name)
            continue
        if attr.startswith("_") or (attr in module.__dict__ and not isinstance(module.__dict__[attr], types.ModuleType)):
            continue  # an attribute that is there already is no lazy submodule
        try:
            if importlib.util.find_spec(name) is not None:
                out.append(name)
        except (ImportError, ValueError, AttributeError):
            continue
    return out


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - raises ValueError when empty
        return True
    except ValueError:
        return False


# -- the notebook side: submodules the notebook loaded ------------------------
# Why: a package's top-level import does not load all of it. numpy 2 loads
# numpy.fft and numpy.polynomial on first attribute access (8-12 ms each
# here), pandas its Styler (and jinja2, ~50 ms) on first use, scipy and
# scikit-learn nearly every subpackage. Importing ``numpy`` in the workers
# leaves those to the first task that touches them, inside the first call's
# wall time, and the code that touches them is often library code, out of
# reach of a scan of the notebook's functions. The notebook's ``sys.modules``
# is the record of what the user's code needed so far (they usually try a
# function here before mapping it), so the workers import the submodules the
# notebook loaded of the packages they already import: never a package the
# notebook did not use, so an idle worker stays small when it used nothing heavy.

# At most this many mirrored submodules per pool (pandas 3 with numpy: ~600
# loaded modules, nearly all loaded by ``import pandas`` itself, which the
# worker skips with one dict lookup each).
MIRROR_LIMIT = 2000
_mirror_ok: dict[str, bool] = {}  # module name -> may a worker import it (decided once)


def _mirrorable(name: str) -> bool:
    """May the workers import this loaded submodule? Once per name (cached).

    Not when it is an alias (``six.moves``-style entries whose name differs),
    has no import spec, is excluded (pyplot), or its namespace holds modules,
    classes or functions of the notebook's machinery (``tqdm.notebook`` imports
    IPython and ipywidgets: tens of MB in every worker for nothing).
    """
    ok = _mirror_ok.get(name)
    if ok is None:
        module = sys.modules.get(name)
        ok = (
            isinstance(module, types.ModuleType)
            and getattr(module, "__name__", None) == name
            and getattr(module, "__spec__", None) is not None
            and _wanted(name)
            and not _pulls_excluded(module)
        )
        if len(_mirror_ok) > 50_000:
            _mirror_ok.clear()
        _mirror_ok[name] = ok
    return ok


def _pulls_excluded(module: types.ModuleType) -> bool:
    """Does the module's namespace hold something of a package never preloaded?

    Each value's kind is read with ``type()``, never ``isinstance``: that one
    asks an object for its ``__class__``, and a library's deprecated alias
    (``torch.distributed.reduce_op``) answers with a FutureWarning, printed
    after the user's ``import torch`` and attributed to this file.
    """
    for value in list(vars(module).values()):
        name: Any
        kind = type(value)
        if issubclass(kind, types.ModuleType):
            name = value.__name__
        elif issubclass(kind, (type, types.FunctionType)):
            name = getattr(value, "__module__", None)
        else:
            continue
        if isinstance(name, str) and (name.partition(".")[0] in _NOT_PRELOADED or name in _NOT_PRELOADED_EXACT):
            return True
    return False


def loaded_submodules(tops: set[str], start: int = 0, limit: int = MIRROR_LIMIT) -> tuple[list[str], int]:
    """Submodules of the packages ``tops`` the notebook has loaded, in load order.

    Scans ``sys.modules`` from position ``start`` (it keeps insertion order:
    modules loaded since the last scan are its last entries); returns the
    names and where the scan ended, for the next one. The first look at a
    module checks its namespace (~15 ms for pandas' ~400 loaded modules, then
    cached); the scan after a cell that imported nothing costs ~35 us.
    """
    names = list(sys.modules)
    out: list[str] = []
    for name in itertools.islice(names, start, None):
        top, dot, _ = name.partition(".")
        if dot and top in tops and _mirrorable(name):
            out.append(name)
            if len(out) >= limit:
                break
    return out, len(names)


# -- the notebook side: the user's own modules, reloaded or edited ------------
# Why: ``importlib.reload(mymod)`` re-runs the module in place in the notebook,
# but a worker that imported it before keeps the old code: ``%pmap mymod.f``
# returned v1 results while the serial map gave v2, and ``--checkpoint`` stored
# them under the key of the new file. A reload gives the module a new
# ``__spec__`` object (importlib makes one each time), so comparing it with the
# one seen when the workers were last told of the module finds a reload at the
# cost of an identity test per module the function uses. IPython 9's
# ``%autoreload`` updates the module in place instead (same spec): it is
# followed through loadstamps.reexecuted (see follow_autoreload).


def follow_autoreload() -> None:
    """Have IPython's in-place ``%autoreload`` count as a reload of the module it
    updates (loadstamps.reexecuted). Called at the extension's load, after each
    cell and before each run: autoreload may be loaded at any time, and is only
    wrapped once it is imported (a dict lookup until then)."""
    compat.follow_inplace_reloads(loadstamps.reexecuted)


def _user_module(name: str) -> bool:
    """Is ``name`` a module of the user's own (a ``.py`` beside the notebook) that the
    workers can reload: loaded, a module (``importlib.reload`` takes nothing else), and
    the user's code by ``usermodules.local_module_file`` (from a file, not the standard
    library, not installed, not ours, not ``__main__``), the test the checkpoint keys use.

    Why one test: this one left out site-packages only, so zipp's overlay
    (``zipp.compat.overlay.zipfile``, a namespace holding the standard library's
    zipfile.py, in every notebook that imports ``distributed``) was the user's here and
    not for the keys: every Dask cell sent it, each worker failed to reload it with a
    traceback, said its zipfile.py differed, and --checkpoint stored none of the cell's
    values."""
    top = name.partition(".")[0]
    if top in sys.stdlib_module_names or top in _NOT_PRELOADED:
        return False
    return isinstance(sys.modules.get(name), types.ModuleType) and usermodules.local_module_file(name) is not None


def user_modules(func: Any) -> list[str]:
    """The user's own modules ``func`` reaches (its own module when it is pickled by
    reference, the modules of the globals, closures and defaults it names)."""
    names = _names_of(func) + _function_module_names(func)
    return [n for n in dict.fromkeys(names) if isinstance(n, str) and _user_module(n)]


# module name -> (its __spec__ when first looked at, its file's (mtime_ns, size) then): for
# a module imported before mpmagic, which loadstamps has no record of
_stamps: dict[str, tuple[Any, tuple[int, int] | None]] = {}
_said: set[Any] = set()  # the one-line notices already shown (what, [pool,] module...)


def _file_stamp(module: Any) -> tuple[int, int] | None:
    return loadstamps.stamp(getattr(module, "__file__", None))


def edited_modules(names: list[str]) -> list[str]:
    """Of these user modules, those whose file changed on disk since the notebook
    (re)loaded them, without a reload here: the notebook runs their old code,
    a worker (re)loading them now would run the file's.

    The baseline is the file's stat when the notebook loaded the module
    (loadstamps.py); for a module imported before mpmagic, its stat at the
    module's first parallel run. An os.stat per module.
    """
    out = []
    for name in names:
        module = sys.modules.get(name)
        if module is None:
            continue
        at_load = loadstamps.loaded(name, module)
        if at_load is not None:
            if _file_stamp(module) != at_load[0]:
                out.append(name)
            continue
        spec = getattr(module, "__spec__", None)
        seen = _stamps.get(name)
        if seen is None or seen[0] is not spec:
            _stamps[name] = (spec, _file_stamp(module))
            continue
        if seen[1] is not None and _file_stamp(module) != seen[1]:
            out.append(name)
    return out


def edited_for_checkpoint(names: list[str]) -> list[tuple[str, str]]:
    """Of these user modules (those a checkpoint key covers by their file), those whose file
    changed on disk since the notebook loaded them (:func:`edited_modules`), as
    ``(module, file's base name)``.
    The checkpointed run that asks goes without the checkpoint and says why in its own
    line, which says what ``Reloads._say_edited`` would: that line is taken as said."""
    edited = edited_modules(names)
    for name in edited:
        _said.add(("edited", name, _file_stamp(sys.modules[name])))
    return [(name, os.path.basename(getattr(sys.modules[name], "__file__", None) or name)) for name in edited]


def _say_once(key: Any, line: str) -> None:
    if key not in _said:
        _said.add(key)
        sys.stderr.write(line + "\n")


def forkserver_modules() -> list[str]:
    """What the fork server should import when it starts (if warm-up is on)."""
    return notebook_modules() if enabled() else []


class Warmth:
    """A pool's record of the modules its workers should have, and how far each worker got.

    One per local pool. The notebook's threads add names (:meth:`want`: the
    after-cell hook, the pool's start, a submitted function); only the pool's
    manager thread asks for :meth:`message` and writes it to a worker's pipe.
    The list of wanted modules only grows, so what a worker was sent is a
    count: the manager's check per worker and per unit is a dict lookup and a
    length, no lock, when nothing is new.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # callers' threads add while the manager reads
        self._scan_lock = threading.Lock()  # one look at sys.modules at a time (see want)
        self._wanted: list[str] = []  # in the order the notebook imported them
        self._known: set[str] = set()
        self._mirrored: set[str] = set()  # of _wanted: submodules the notebook loaded (see loaded_submodules)
        self._tops: set[str] = set()  # the packages whose submodules were looked for
        self._scanned = 0  # how far sys.modules was scanned for them
        self._sent: dict[int, int] = {}  # worker id -> how many of _wanted it was sent
        self._keys: set[Any] = set()  # function payload keys already scanned
        self.reloads = Reloads()  # the user's modules the notebook reloaded (importlib.reload, %autoreload)

    @property
    def wanted(self) -> list[str]:
        """The modules every worker imports because the notebook named them (for ``%pool``)."""
        return [n for n in self._wanted if n not in self._mirrored]

    @property
    def mirrored(self) -> list[str]:
        """The submodules of those packages the workers import because the notebook loaded them."""
        return [n for n in self._wanted if n in self._mirrored]

    def want(self, names: list[str], mirror: bool = True) -> bool:
        """Add modules; True if any is new.

        ``mirror``: also the submodules the notebook loaded of every package
        wanted so far (the after-cell hook and the pool's start: the workers
        are idle then). A submitted function's modules come without (False):
        they go out ahead of its first unit, which must not wait for more.
        """
        with self._lock:
            new = [n for n in dict.fromkeys(names) if n not in self._known]
            self._known.update(new)
            self._wanted.extend(new)
        if mirror and self._wanted:
            # The scan runs outside the lock the manager takes to send (the
            # first look at a package checks each of its modules: ~15 ms for pandas).
            with self._scan_lock:
                found = self._loaded_submodules()
                with self._lock:
                    subs = [n for n in found if n not in self._known]
                    self._known.update(subs)
                    self._mirrored.update(subs)
                    self._wanted.extend(subs)
            new += subs
        return bool(new)

    def _loaded_submodules(self) -> list[str]:
        """The notebook's submodules of the wanted packages loaded since the last look
        (all of them when a package is new). Under the scan lock."""
        tops = {n.partition(".")[0] for n in list(self._wanted)}
        start = 0 if tops - self._tops else self._scanned
        self._tops = tops
        room = MIRROR_LIMIT - len(self._mirrored)
        if room <= 0:
            return []
        subs, self._scanned = loaded_submodules(tops, start, room)
        return subs

    def describe(self) -> list[str]:
        """What ``%pool`` lists: the preloaded modules, with what each costs a worker."""
        return describe_preloads(self.wanted, self.mirrored)

    def want_for(self, func: Any, key: Any) -> bool:
        """Add the modules ``func`` refers to, once per payload key."""
        with self._lock:
            if key in self._keys or not enabled():
                return False
            self._keys.add(key)
        try:
            names = function_modules(func)
        except Exception:  # an odd callable: the worker imports what it needs when it loads it
            log.debug("mpmagic: could not scan a function for the modules it uses", exc_info=True)
            return False
        return self.want(names, mirror=False)

    def message(self, wid: int) -> Import | None:
        """``Import(names)`` for worker ``wid`` (what it was not sent yet), or None."""
        n = self._sent.get(wid, 0)
        if n >= len(self._wanted):  # the common case, every unit: nothing new
            return None
        with self._lock:
            todo = self._wanted[n:]
            self._sent[wid] = n + len(todo)
        return Import(todo)

    def forget(self, wid: int) -> None:
        """That worker is gone (its replacement has another id)."""
        with self._lock:
            self._sent.pop(wid, None)
        self.reloads.forget(wid)


class Reloads:
    """A pool's record of the user's modules the notebook reloaded (``importlib.reload``, ``%autoreload``)
    since its workers imported them, and how far each worker got with reloading them.

    The local pool's :class:`Warmth` has one (its manager sends ``Reload`` with the
    imports); the Dask backend has its own, whose tasks carry :meth:`for_tasks`
    (a Dask worker cannot be sent a message between tasks: each task says which
    reloads its worker process must have followed, ``dask_tasks.follow_reloads``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # callers' threads add while the manager reads
        self._user: dict[Any, list[str]] = {}  # function payload key -> the user's modules it uses
        self._specs: dict[str, tuple[Any, int]] = {}  # user module -> its loadstamps.version when the workers were last told of it
        self._told: set[tuple[str, ...]] = set()  # the reloads this pool's workers were said to do
        self._reloads: list[str] = []  # user modules to reload, in the order the notebook's reloads were found
        self._rsent: dict[int, int] = {}  # worker id -> how many of _reloads it was sent
        # user module -> ((notebook, load number) of its latest reload, its file's digest then or None)
        self._versions: dict[str, tuple[tuple[str, int], str | None]] = {}
        self._for_tasks: tuple[int, tuple] = (0, ())  # (len(_reloads), for_tasks()) at the last ask
        self._user_mods: list[str] = []  # the user's modules loaded in the notebook (see _scan_user_modules)
        self._digests: dict[str, tuple[Any, tuple[int, int] | None, str | None]] = {}  # module -> (file, stat, digest)
        self._user_scanned = 0  # len(sys.modules) at that scan
        self._user_last: str | None = None  # and its last module then
        # function payload key -> the user's modules it reaches and those they import (see versions);
        # dropped at a reload found (what a reloaded module imports may have changed)
        self._run_modules: dict[Any, list[str]] = {}

    def check(self, func: Any, key: Any) -> bool:
        """Before a run (of ``func``; None: a cell): queue a reload in every worker of
        the user's modules (any loaded here, not only the function's: its items'
        classes, a helper module, a cell's imports) that the notebook reloaded since
        the pool first saw them, and say so once per pool; True if any. Also says once when a
        module ``func`` uses, or one to reload, changed on disk since the notebook
        loaded it (a worker that (re)loads it runs the file, not the notebook's code).
        The reloads go out in the order the notebook made them (``m1`` does ``from m2
        import g``: reloading ``m1`` before ``m2`` keeps the old ``g`` in ``m1``).

        Per call: an identity test per user module loaded here (a new scan of
        ``sys.modules`` only past the modules loaded since the last one), and an
        ``os.stat`` per user module ``func`` uses.
        """
        follow_autoreload()
        self._scan_user_modules()
        reloaded = []
        for name in self._user_mods:  # every user module loaded here: items' classes, helpers, a cell's imports
            spec, inplace = version = loadstamps.version(name, sys.modules.get(name))
            old = self._specs.get(name)
            if spec is not None and (old is None or old[0] is not spec or old[1] != inplace):
                self._specs[name] = version
                if old is not None:
                    reloaded.append(name)
        if reloaded:
            self._run_modules.clear()
            reloaded.sort(key=lambda n: (loadstamps.loaded(n, sys.modules.get(n)) or ((0, 0), 0))[1])
            shown = ", ".join(reloaded)
            for name in reloaded:
                self._versions[name] = _reload_version(name)
            # (A module the %%pool setup imports too stays "changed since the workers ran the setup"
            # for --checkpoint, worker_setup.files_changed: the reload does not run the setup again,
            # and what it made from the module, `BASE = mymod.BASE`, is of the old file.)
            with self._lock:
                self._reloads.extend(reloaded)
            # (Where they imported it: a worker that never did, say it failed to, imports it afresh.)
            line = (f"mpmagic: workers reload {shown} where they imported {'it' if len(reloaded) == 1 else 'them'} "
                    "(reloaded in the notebook)")
            if tuple(reloaded) not in self._told:  # (once per pool: a per-pool set, not a key by id())
                self._told.add(tuple(reloaded))
                sys.stderr.write(line + "\n")
        if func is None:
            self._say_edited(reloaded)
            return bool(reloaded)
        names = self._user.get(key)
        if names is None:
            try:
                names = user_modules(func)
            except Exception:  # an odd callable: nothing known to reload
                names = []
            if len(self._user) > 10_000:
                self._user.clear()
            self._user[key] = names
        self._say_edited(names + [n for n in reloaded if n not in names])
        return bool(reloaded)

    def versions(self, func: Any, key: Any) -> dict[str, tuple[int, int]]:
        """The user's modules a run of ``func`` may use (those it reaches and those they import;
        a cell, ``func`` None: every one loaded here), each with its file's ``(mtime_ns, size)``
        now, where that is the version the notebook loaded: what a worker that imports one
        during the run is to find (``LocalBackend._say_other_versions``). A module whose file
        changed before the run is left out: the run's start says so (:meth:`_say_edited`).
        After :meth:`check`, which found ``func``'s modules. Per run: two ``os.stat`` per
        module (the list is kept per function), nothing for a function that uses none."""
        if func is None:
            names = self._user_mods
        else:
            found = self._run_modules.get(key)
            if found is None:
                direct = self._user.get(key) or []
                found = _with_imports(direct) if direct else []
                if len(self._run_modules) > 10_000:
                    self._run_modules.clear()
                self._run_modules[key] = found
            names = found
        if not names:
            return {}
        edited = set(edited_modules(names))
        out = {}
        for name in names:
            stamp = _file_stamp(sys.modules.get(name)) if name not in edited else None
            if stamp is not None:
                out[name] = stamp
        return out

    @staticmethod
    def _say_edited(names: list[str]) -> None:
        """Say once per module and file version when a module's file changed since the notebook loaded it."""
        for name in edited_modules(names):
            module = sys.modules[name]
            _say_once(("edited", name, _file_stamp(module)), (
                f"mpmagic: {os.path.basename(module.__file__ or name)} changed on disk since the notebook loaded "
                f"it: workers that (re)load it run the file's version, not the notebook's; "
                f"importlib.reload({name}) (or restore the file) to run one version"))

    def _scan_user_modules(self) -> None:
        """Bring the list of the user's modules loaded here up to date: only the
        modules loaded since the last look (``sys.modules`` keeps insertion order),
        unless one was taken out of ``sys.modules`` meanwhile (``del sys.modules[m]``:
        the last module seen is no longer where it was), then all of them."""
        n = len(sys.modules)
        last = next(reversed(sys.modules), None)
        if n == self._user_scanned and last == self._user_last:
            return
        names = list(sys.modules)
        start = self._user_scanned
        if not 0 < start < n or names[start - 1] != self._user_last:
            start = 0
            self._user_mods = []
        self._user_mods += [name for name in itertools.islice(names, start, None) if _user_module(name)]
        self._user_scanned, self._user_last = len(names), names[-1] if names else None

    def message(self, wid: int) -> Reload | None:
        """``Reload(names)`` for worker ``wid`` (the reloads it was not sent yet), or None."""
        n = self._rsent.get(wid, 0)
        if n >= len(self._reloads):  # the common case, every unit
            return None
        with self._lock:
            todo = self._reloads[n:]
            self._rsent[wid] = n + len(todo)
        # Each module once, at its last place: its last reload comes after those it imports from.
        return Reload(list(dict.fromkeys(reversed(todo)))[::-1])

    def for_tasks(self) -> tuple[tuple[str, tuple[str, int], str | None], ...]:
        """What a Dask task carries: ``(module, (notebook, load number), digest)`` for each
        module the notebook reloaded, once, at the place of its last reload (the order its
        worker process reloads them in); ``digest`` is the content hash of the file the
        notebook loaded (None when it changed since). The same tuple until a reload is found."""
        n = len(self._reloads)
        if self._for_tasks[0] != n:
            with self._lock:
                order = list(dict.fromkeys(reversed(self._reloads)))[::-1]
            self._for_tasks = (n, tuple((name, *self._versions[name]) for name in order))
        return self._for_tasks[1]

    def loaded_for_tasks(self, key: Any) -> tuple[tuple[str, str], ...]:
        """What a Dask task carries besides :meth:`for_tasks`: ``(module, digest)`` for each
        user module the run's function reaches (``key``: its payload key, as given to
        :meth:`check`, which runs first; None: a cell, which may import any, so every user
        module loaded here) and each user module those import (their source's imports,
        transitively), dependencies first; ``digest`` is the content hash of the file the
        notebook loaded. The worker compares it with what it loaded itself
        (``dask_tasks.follow_versions``): a worker process of a cluster that outlives the
        kernel keeps the version an earlier kernel (or this one, before an edit) had it
        import, and no reload here ever told it otherwise. A module whose file changed
        since the notebook loaded it is left out (no file holds the notebook's version;
        :meth:`check` said so). Per run: an ``os.stat`` per module, a hash per new version.
        """
        names = self._user_mods if key is None else self._user.get(key, [])
        if not names:
            return ()
        order = _with_imports(names)
        edited = set(edited_modules(order))
        out = []
        for name in order:
            module = sys.modules.get(name)
            path = getattr(module, "__file__", None)
            if name in edited or not path:
                continue
            at = _file_stamp(module)
            known = self._digests.get(name)
            if known is None or known[0] != path or known[1] != at:
                known = self._digests[name] = (path, at, loadstamps.digest(path))
            if known[2] is not None:
                out.append((name, known[2]))
        return tuple(out)

    def forget(self, wid: int) -> None:
        """That worker is gone (its replacement has another id)."""
        with self._lock:
            self._rsent.pop(wid, None)


def _with_imports(names: list[str]) -> list[str]:
    """These user modules and the user modules loaded here that they import (read from their
    source, transitively: ``m1`` does ``from m2 import g``), each once, a module after those
    it imports: the order a worker reloads them in, so ``m1`` takes the new ``g``."""
    order: list[str] = []
    seen: set[str] = set()
    todo: list[tuple[str, bool]] = [(name, False) for name in reversed(names)]
    while todo and len(seen) < 1000:
        name, done = todo.pop()
        if done:
            order.append(name)
            continue
        if name in seen or not _user_module(name):
            continue
        seen.add(name)
        module = sys.modules[name]
        path = getattr(module, "__file__", None)
        found = usermodules.source_imports(path, getattr(module, "__package__", None) or None) if path else None
        todo.append((name, True))
        todo.extend((dep, False) for dep in reversed(found.modules if found is not None else ()) if dep not in seen)
    return order


def _reload_version(name: str) -> tuple[tuple[str, int], str | None]:
    """A reload of ``name`` found in the notebook: ``((notebook, load number), digest)``.
    The load number is loadstamps' (its order among the notebook's loads), a new one
    for a module loaded out of its sight; the digest is the file's as the notebook
    loaded it, None when it changed on disk since (that is said apart: _say_edited)."""
    module = sys.modules.get(name)
    at_load = loadstamps.loaded(name, module)
    number = at_load[1] if at_load is not None else loadstamps.next_number()
    path = getattr(module, "__file__", None)
    same = at_load is not None and _file_stamp(module) == at_load[0]
    return (loadstamps.NOTEBOOK, number), loadstamps.digest(path) if same else None


# -- the worker side: importing, and noticing imports ----------------------
def _tops(names: Any) -> list[str]:
    """Top-level packages of module names, in order, without private, stdlib or
    file-less ones (``cython_runtime`` and the like)."""
    out: dict[str, None] = {}
    for name in names:
        top = name.partition(".")[0]
        if top in out or not top or top.startswith("_") or top in sys.stdlib_module_names or top in _NOT_PRELOADED:
            continue
        if getattr(sys.modules.get(top), "__file__", None):
            out[top] = None
    return list(out)


class ImportLog:
    """What a worker imported, and when: preloads, and imports a task caused.

    Records go home in the ``meta`` of the next ``done`` reply (``meta["once"]``)
    and are then cleared, so the notebook can tell a run's one-time costs from
    its work. ``mark()`` is ``len(sys.modules)``: O(1) per chunk; new modules
    are the dict's last entries (it keeps insertion order).
    """

    def __init__(self) -> None:
        self.records: list[tuple] = []  # (why, [top-level names], seconds or None, start, end)
        self.load = 0.0  # seconds spent unpickling functions (their imports included)
        self.errors: dict[str, str] = {}  # module -> why reload() could not reload it, on one line

    @staticmethod
    def mark() -> int:
        """Where ``sys.modules`` ends now (see :meth:`since`)."""
        return len(sys.modules)

    @contextmanager
    def watching(self, why: str) -> Iterator[None]:
        """Note the modules imported inside the block, with the block's time.

        ``why="function"``: unpickling a function (the first sending's cost in
        this worker, its imports included), also added to :attr:`load`.
        ``why="context"``: the notebook's context (context.py): its warnings
        filters name the classes of the modules that added them, so unpickling
        them imports numpy, say, in a worker that had not imported it yet.
        """
        mark, start, t0 = self.mark(), time.time(), time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            if why == "function":
                self.load += spent
            self.since(mark, why, spent, start)

    def since(self, mark: int, why: str, seconds: float | None, start: float) -> None:
        """Note the modules imported since ``mark`` (if any) and the time it took."""
        if len(sys.modules) <= mark:
            return
        names = _tops(list(sys.modules)[mark:])
        if names:
            self.records.append((why, names, seconds, start, time.time()))

    def preload(self, names: list[str]) -> None:
        """Import modules the notebook uses, in order; a failure is logged, not raised.

        Each import that loaded anything is a record with the resident memory
        it added to this worker (what ``%pool`` shows per preloaded module).
        A submodule (``pandas.io.formats.style``) is mostly one the notebook
        loaded (see :func:`loaded_submodules`): a failure there is only logged
        at debug level, as the workers need it only if a task does.
        """
        for name in names:
            if name in sys.modules:
                continue
            mark, start, t0, rss = self.mark(), time.time(), time.perf_counter(), resident_bytes()
            try:
                importlib.import_module(name)
            except Exception as exc:  # the task that needs it will raise the real error
                # A worker with no file descriptor left (its tasks left files open): not the
                # module's fault, and its next unit's load fails too, and the pool replaces
                # it then, with one line (backends.local.LocalBackend._no_files): no traceback here.
                quiet = "." in name or (isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE))
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "mpmagic: a worker could not import %s", name, exc_info=True)
                continue
            seconds = time.perf_counter() - t0
            if len(sys.modules) > mark:
                after = resident_bytes()
                added = after - rss if after is not None and rss is not None else None
                self.records.append(("preload", [name], seconds, start, time.time(), added))

    def reload(self, names: list[str]) -> list[str]:
        """Reload those of these modules this worker imported (the notebook reloaded
        them); return those it could not reload, each with its error on one line in
        :attr:`errors`. A failure is one line of the log, not raised: the task that
        uses the module shows its own error.

        The line names the module and the error, never mpmagic's traceback (it went to
        the cell, unlabelled, once per task: its frames are ours, the module's error is
        its last line); the traceback is at debug level. An entry of ``sys.modules``
        that is no module (zipp's overlay: a namespace) is not reloaded (nothing
        imported it from a file: there is nothing to reload) and counts as not
        reloaded, in silence."""
        failed: list[str] = []
        for name in names:
            module = sys.modules.get(name)
            if module is None:
                continue  # never imported here: the first use imports the file as it is
            if not isinstance(module, types.ModuleType):
                failed.append(name)
                continue
            try:
                importlib.reload(module)
            except Exception as exc:
                failed.append(name)
                self.errors[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
                log.warning("mpmagic: a worker could not reload %s (%s): its tasks run the version it had "
                            "imported", name, self.errors[name])
                log.debug("mpmagic: the failed reload of %s", name, exc_info=True)
        return failed

    def take(self) -> dict[str, Any] | None:
        """The records since the last reply (for ``meta["once"]``), or None."""
        if not self.records and not self.load:
            return None
        once = {"imports": self.records, "load": self.load}
        self.records, self.load = [], 0.0
        return once


# -- the notebook side: what each preloaded module costs a worker ------------
# module name -> {worker: resident bytes its preload added}; from the import
# records the workers send home (OneTimeCosts.note), shown by %pool.
_memory: dict[str, dict[Any, int]] = {}


def _note_memory(names: list[str], worker: Any, added: int) -> None:
    for name in names:
        per = _memory.setdefault(name, {})
        per[worker] = max(0, added)
        if len(per) > 256:  # workers come and go: keep the latest
            del per[next(iter(per))]


def module_memory(name: str) -> int | None:
    """The resident bytes preloading ``name`` added to a worker (median over the
    workers that reported it), or None before any reported it."""
    per = _memory.get(name)
    if not per:
        return None
    values = sorted(per.values())
    return values[len(values) // 2]


def describe_preloads(wanted: list[str], mirrored: list[str]) -> list[str]:
    """``%pool``'s list: each preloaded module with its memory per worker once
    measured, then the notebook's submodules that cost the workers an import."""
    from .fmt import fmt_bytes

    out = []
    for name in wanted:
        added = module_memory(name)
        out.append(f"{name} (+{fmt_bytes(added)} per worker)" if added is not None else name)
    costly = [m for m in (module_memory(n) for n in mirrored) if m is not None]
    if costly:
        out.append(f"{len(costly)} submodule{'s' if len(costly) != 1 else ''} the notebook loaded "
                   f"(+{fmt_bytes(sum(costly))} per worker)")
    return out


# -- the notebook side: one run's one-time costs ----------------------------
class OneTimeCosts:
    """One run's costs that the next run will not pay, from the workers' replies.

    Per worker: seconds spent importing modules during the run (preloads
    still running when the run began count from its start), and unpickling
    the function. Workers do these in parallel, so the run paid about the
    largest per-worker total, not the sum.

    A cell's temporary workers (``meta["temporary"]``: started for ranks beyond the
    idle pool workers, stopped after the cell) are counted apart: every such cell
    starts new ones, which pay the same again, so their costs are not one-time
    (``summary()["temporary"]``). A ``%%parallel -n 4`` on 2 workers was told on
    every call that "the next call will not pay" the numpy import its 2 new
    workers paid.
    """

    def __init__(self) -> None:
        self.run_start = time.time()  # made with the job, just before it runs
        self.first_start: float | None = None  # epoch seconds the first chunk began
        self.imports: dict[Any, float] = {}  # worker -> seconds importing during this run
        self.loads: dict[Any, float] = {}  # worker -> seconds unpickling functions (imports excluded)
        self.modules: dict[str, float | None] = {}  # modules imported together -> seconds (largest), None if unknown
        self._entry_of: dict[str, str] = {}  # module -> the ``modules`` entry that names it (each named once)
        self.task_imports: dict[str, set] = {}  # modules the tasks imported (inside their times) -> workers
        self.preloading = False  # the run waited for a background preload (the notebook had imported it)
        self.temporary: set = set()  # a cell's temporary workers that ran ranks (their costs recur)
        self.temporary_first: dict[Any, float] = {}  # temporary worker -> epoch seconds its first rank began
        self.temporary_modules: dict[str, float | None] = {}  # as ``modules``, of the temporary workers

    def note(self, meta: dict) -> None:
        """Take a ``done`` reply's meta (only chunks with ``meta["once"]`` cost anything)."""
        start = meta.get("start")
        if start is not None and (self.first_start is None or start < self.first_start):
            self.first_start = start
        worker = meta.get("worker")
        if meta.get("temporary"):
            self.temporary.add(worker)
            if start is not None and start < self.temporary_first.get(worker, start + 1.0):
                self.temporary_first[worker] = start
        once = meta.get("once")
        if not once:
            return
        modules = self.temporary_modules if worker in self.temporary else self.modules
        spent = in_load = 0.0
        for record in once.get("imports", ()):
            why, names, seconds, began, ended = record[:5]
            if why == "preload" and len(record) > 5 and record[5] is not None:
                _note_memory(names, worker, record[5])
            if seconds is not None and why == "preload":
                seconds = max(0.0, ended - max(began, self.run_start))  # only what the run waited for
                if seconds <= 0:
                    continue
                self.preloading = True
            # One record's modules came in one go (pandas brings dateutil...): one
            # entry, naming only modules no earlier entry named (another worker, or
            # the function's load, imported numpy; this task brought pandas with it).
            fresh = [n for n in names if n not in self._entry_of]
            key = ", ".join(fresh) if fresh else self._entry_of[names[0]] if names else ""
            for name in fresh:
                self._entry_of[name] = key
            old = modules.get(key)
            modules[key] = seconds if old is None else max(old, seconds or 0.0)
            spent += seconds or 0.0
            if why == "task":  # each worker that imported it has it in its task times
                for name in names:
                    self.task_imports.setdefault(name, set()).add(worker)
            if why == "function":  # inside the function's load time: not counted twice
                in_load += seconds or 0.0
        self.imports[worker] = self.imports.get(worker, 0.0) + spent
        self.loads[worker] = self.loads.get(worker, 0.0) + max(0.0, once.get("load", 0.0) - in_load)

    def summary(self, cold: bool) -> dict[str, Any]:
        """For the report: ``imports`` {"module[, module...]": seconds or None}, ``import_seconds``,
        ``load``, ``start`` (workers starting, when the pool was cold), ``total``
        (the most any worker paid); zeros when nothing was paid. These are the pool's
        workers'; ``temporary`` is what a cell's temporary workers paid, which every
        such call pays again (:meth:`_temporary`; None when they paid nothing)."""
        started = 0.0
        if not self.imports and not self.loads:  # (a warm run: no chunk paid any, so nothing was noted)
            if cold and self.first_start is not None:
                waited = self.first_start - self.run_start
                started = waited if waited > 0.0 else 0.0
            return {"imports": {}, "import_seconds": 0.0, "load": 0.0, "start": started, "total": started,
                    "preloading": self.preloading, "task_imports": (), "task_import_workers": 0,
                    "temporary": self._temporary()}
        workers = (set(self.imports) | set(self.loads)) - self.temporary
        total = max((self.imports.get(w, 0.0) + self.loads.get(w, 0.0) for w in workers), default=0.0)
        if cold and self.first_start is not None:
            # The first chunk began this long after the run did: the workers were starting.
            started = max(0.0, self.first_start - self.run_start - total)
        return {
            "imports": dict(self.modules),
            "import_seconds": max((self.imports.get(w, 0.0) for w in workers), default=0.0),
            "load": max((self.loads.get(w, 0.0) for w in workers), default=0.0),
            "start": started,
            "total": total + started,
            "preloading": self.preloading,
            "task_imports": tuple(self.task_imports),
            "task_import_workers": len(set().union(*self.task_imports.values())) if self.task_imports else 0,
            "temporary": self._temporary(),
        }

    def _temporary(self) -> dict[str, Any] | None:
        """What the cell's temporary workers paid: ``workers`` (how many ran ranks),
        ``imports`` (as the summary's, a None time for one the rank's code made inside
        its time), ``import_seconds``, ``load``, ``start`` (the longest any took to
        start: its first rank began that long after the run did, less its imports and
        loading) and ``total`` (the most one of them paid, starting included); None
        when they imported nothing, loaded nothing and started at once. A spawn
        worker takes ~0.5 s to start, and every such cell starts new ones: a
        ``%%parallel -n 4`` on 2 workers was told to give its workers more work."""
        if not self.temporary:
            return None  # (every warm run's summary asks: at once, see summary)
        paid = [w for w in self.temporary if w in self.imports or w in self.loads]
        costs = bool(paid) and bool(self.temporary_modules or any(self.loads.get(w, 0.0) for w in paid))
        started = max((first - self.run_start - self.imports.get(w, 0.0) - self.loads.get(w, 0.0)
                       for w, first in self.temporary_first.items()), default=0.0)
        started = max(0.0, started)
        if not costs and started <= 0.0:
            return None
        return {
            "workers": len(self.temporary),
            "imports": dict(self.temporary_modules),
            "import_seconds": max((self.imports.get(w, 0.0) for w in paid), default=0.0),
            "load": max((self.loads.get(w, 0.0) for w in paid), default=0.0),
            "start": started,
            "total": max((self.imports.get(w, 0.0) + self.loads.get(w, 0.0) for w in paid), default=0.0) + started,
        }
