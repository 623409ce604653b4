"""Content keys for checkpointed runs, equal across kernels.

A checkpointed ``pmap`` finds an item's stored result by two keys: the *run
key* (the function's code, everything it captures, ``star``, the Python
version and the checkpoint format) and the *item key* (the item's pickle).

Why not the payload key the pool already uses (``payload_cache``)? It hashes
the cloudpickle bytes that workers load, and those hold things that change
with every kernel though the function did not:

* each code object's ``co_filename``: a notebook cell's "file" is
  ``/tmp/ipykernel_<pid>/<hash>.py``, with the kernel's pid in it; and its
  line numbers, which move when a cell above gains a line;
* the tracker id cloudpickle gives a class defined in the notebook: a random
  ``uuid4`` per class per process; and, from Python 3.13, the class's
  ``__firstlineno__``, the line it starts on;
* frozensets among a code object's constants (``x in {"a", "b"}`` compiles to
  one): their order follows string hashes, randomised per process.

So keys come from a second pickler whose output is hashed, never loaded: code
objects reduce to what they *do* (bytecode, constants, names, recursively),
classes lose their tracker id, constant frozensets are sorted. The rest
(captured globals, closure cells, defaults, notebook functions and classes it
calls) is cloudpickle's usual by-value walk, so a change in any of them gives
a new run key.

Large buffers (numpy arrays) are hashed in place through pickle protocol 5's
``buffer_callback``, never copied into the pickle.

What stays unstable, and is detected where cheap (:func:`unstable_reason`):
sets (and frozensets) of strings or bytes, captured or inside items, pickle
in hash order, which differs between kernels unless ``PYTHONHASHSEED`` is
fixed. A key that differs only means the item is computed again: a key can
miss, never match the wrong result.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import marshal
import os
import pickle
import pickletools
import sys
import types
import weakref
from collections import ChainMap
from collections.abc import Iterable
from typing import Any

import cloudpickle

from . import loadstamps
from .usermodules import imported_names, local_module_file, module_file, source_imports

# Bump when what a key covers, or how results are stored, changes: old
# entries then simply stop matching.
FORMAT = 1

_PROTOCOL = 5
_TRACKER = getattr(cloudpickle.cloudpickle, "_get_or_create_tracker_id", None)
_PLAIN = (int, float, str, bytes, bool, type(None), complex)


def _code_stub(*parts: Any) -> None:
    """Stands for a code object in a key pickle (never called: keys are not loaded)."""


def _sorted_frozenset(*elements: Any) -> None:
    """Stands for a frozenset constant, elements sorted (never called)."""


def _stable_const(c: Any) -> Any:
    if type(c) is frozenset:
        return (_sorted_frozenset, tuple(sorted(c, key=repr)))
    return c


def _code_key_reduce(code: types.CodeType) -> tuple:
    # What the code does, without where it came from: no co_filename, no line
    # numbers or line table. Nested code objects among the constants come
    # back here through the pickler, so functions inside functions count.
    parts = (
        code.co_name,
        getattr(code, "co_qualname", code.co_name),
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
        code.co_code,
        tuple(_stable_const(c) for c in code.co_consts),
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
    )
    return _code_stub, parts


def _wrapped_stub(*parts: Any) -> None:
    """Stands for a ``functools.lru_cache`` wrapper in a key pickle (never called)."""


def _shared_stub(*parts: Any) -> None:
    """Stands for an ``mpmagic.Value``, ``Lock``, ``Queue``... in a key pickle (never called)."""


_LRU_WRAPPER = type(functools.lru_cache(maxsize=1)(lambda: None))
_NOT_LOOKED = object()
_helper_keys: weakref.WeakKeyDictionary[type, Any] = weakref.WeakKeyDictionary()  # type -> its _mpmagic_key or None
_file_digests: dict[tuple[str, int, int], bytes] = {}  # (path, mtime_ns, size) -> digest of its bytes


def _file_digest(path: str) -> bytes:
    """A digest of the file's bytes (recomputed when its mtime or size changes); b"" if unreadable."""
    try:
        st = os.stat(path)
        stamp = (path, st.st_mtime_ns, st.st_size)
        digest = _file_digests.get(stamp)
        if digest is None:
            with open(path, "rb") as f:
                digest = _file_digests[stamp] = hashlib.blake2b(f.read(), digest_size=16).digest()
        return digest
    except OSError:
        return b""


_module_files: dict[str, tuple[Any, str | None]] = {}  # module name -> (that module, local_module_file then)


def _module_file(name: str) -> str | None:
    """``local_module_file(name)``, remembered for the module loaded as ``name`` (a
    realpath per module: ~10 us, for each module a scanned module imports, every run)."""
    module = sys.modules.get(name)
    known = _module_files.get(name)
    if known is not None and known[0] is module:
        return known[1]
    path = local_module_file(name)
    _module_files[name] = (module, path)
    return path


def _local_imports(name: str) -> list[tuple[str, str, list[types.FunctionType]]]:
    """The user's own modules that the loaded module ``name``'s globals come from
    (``import m2``, ``from m2 import k``, ``from m2 import Shape``), as ``(module, file,
    functions taken from it)``: those functions are keyed by their code too, since
    after ``importlib.reload(m2)`` alone ``m1`` (in the notebook and in the workers)
    still runs the ``k`` it took before. A module imported inside a function's body is
    not among them (nothing at module level names it), nor one it took only values from
    (``from cfg import THRESHOLD``): :func:`_source_modules` reads those from its source.
    A scan of the module's globals,
    ``local_module_file`` once per other module they come from."""
    module = sys.modules.get(name)
    values = list(getattr(module, "__dict__", {}).values())
    found: dict[str, list[types.FunctionType]] = {}
    other: Any
    for value in values:
        if type(value) is types.ModuleType:
            other = value.__name__
        elif isinstance(value, (type, types.FunctionType)):
            other = getattr(value, "__module__", None)
        else:
            continue
        if isinstance(other, str) and other != name:
            taken = found.setdefault(other, [])
            if type(value) is types.FunctionType:
                taken.append(value)
    out = []
    for other, taken in found.items():
        path = _module_file(other)
        if path is not None:
            out.append((other, path, taken))
    return out


def _package(name: str, path: str) -> str | None:
    """The package relative imports in the module ``name`` (file ``path``) start from."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__package__", None)
    return name if os.path.basename(path) == "__init__.py" else name.rpartition(".")[0]


def _source_modules(name: str, path: str) -> list[tuple[str, str]]:
    """The user's own modules the source of module ``name`` (file ``path``) imports anywhere,
    function bodies too, as ``(module, file)``: what the globals scan (:func:`_local_imports`)
    cannot see, ``from cfg import THRESHOLD`` (an int, which names no module) and
    ``import cfg`` inside a function. A worker that imports ``name`` afresh runs them as
    their files are, so the key covers those files."""
    found = source_imports(path, _package(name, path))
    if found is None:
        return []
    out = []
    for other in found.modules:
        if other == name:
            continue
        if other in sys.modules:
            other_path = _module_file(other)
        else:
            parent = sys.modules.get(other.rpartition(".")[0])
            if parent is not None and not hasattr(parent, "__path__"):
                continue  # `from cfg import THRESHOLD`: a name, not a submodule
            other_path = _unloaded_file(other)
        if other_path is not None:
            out.append((other, other_path))
    return out


_unloaded_files: dict[tuple[str, tuple[str, ...]], str | None] = {}  # (module, sys.path) -> module_file then


def _unloaded_file(name: str) -> str | None:
    """``module_file(name)`` of a module the notebook has not loaded (imported in a function's
    body), remembered for this ``sys.path``: a search of ``sys.path`` costs ~0.1 ms, each run."""
    key = (name, tuple(sys.path))
    if key not in _unloaded_files:
        if len(_unloaded_files) > 4096:
            _unloaded_files.clear()
        _unloaded_files[key] = module_file(name)
    return _unloaded_files[key]


_MISSING = object()
_SAME_BY_PICKLE = (int, float, complex, str, bytes, bool, type(None))


def _same_value(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are one object, or plain values (numbers, strings, tuples of them)
    with the same pickle (so 0.0 and -0.0 differ): what a module took from one version
    of another and what that module's new version holds gives the same results."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if type(a) is tuple:
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return type(a) in _SAME_BY_PICKLE and pickle.dumps(a, _PROTOCOL) == pickle.dumps(b, _PROTOCOL)


def _held_same(held: Any, now: Any) -> bool:
    """What a module holds under a name it took with ``from m import name`` gives what
    ``m``'s ``name`` gives now: the same object or plain value, or a function of ``m`` (the
    key has its code: :func:`_local_imports`) with the same globals, defaults and no closure."""
    if type(held) is types.FunctionType and type(now) is types.FunctionType:
        return held is now or (held.__closure__ is None and now.__closure__ is None
                               and held.__globals__ is now.__globals__
                               and _same_value(held.__defaults__, now.__defaults__)
                               and _same_value(held.__kwdefaults__, now.__kwdefaults__))
    return _same_value(held, now)


def _reloaded_after(other: str, since: int, name: str) -> bool:
    """The user's module ``other`` was reloaded in the notebook after load number ``since``
    (that of the module ``name``, which imports it)."""
    number = loadstamps.reload_number(other)
    return number is not None and number > since and other != name and _module_file(other) is not None


def held_from_reloaded(names: Iterable[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """Of these loaded user modules (those a key covers), those that hold what they took,
    when they were loaded, from a user module the notebook reloaded after them: as
    ``(module, the reloaded module, names taken)``, no names when the module used the
    reloaded one at its top in a way that cannot be checked (``T = cfg.THRESHOLD``,
    ``CFG = cfg.Cfg()``, a decorator, a default).

    Why: ``m5`` does ``from cfg import THRESHOLD, C``; after cfg.py is edited and only
    ``cfg`` is reloaded, ``m5`` (in the notebook, and in the workers that imported it)
    keeps the old names, while a worker that imports ``m5`` now takes the new ones, and
    the key (m5.py's and cfg.py's contents) is that of a new kernel, where ``m5`` takes
    the new ones too: a checkpointed run stored the old names' results under the new
    kernel's key (tester-regress21). A value cannot be keyed by what it holds (unpicklable,
    huge); what it is can be compared with what the reloaded module has under its name.
    A name the module took and then changed itself counts only after such a reload. A
    function taken so differs by its code, which the key has (:func:`_local_imports`).
    A ``del sys.modules[...]`` and import again is no reload here (not seen).
    Cost: a dict look-up per covered module, unless a module it imports was reloaded."""
    out = []
    for name in names:
        module = sys.modules.get(name)
        path = _module_file(name) if module is not None else None
        if path is None or module is None:
            continue
        found = source_imports(path, getattr(module, "__package__", None))
        if found is None:
            continue
        at_load = loadstamps.loaded(name, module)
        since = at_load[1] if at_load is not None else 0  # (no record: imported before mpmagic, before any)

        glob = vars(module)
        held: dict[str, list[str]] = {}
        for bound, source, attr, reached in found.bindings:
            value = glob.get(bound, _MISSING) if attr != "*" else _MISSING
            if attr is not None and isinstance(value, types.ModuleType):  # `from pkg import sub`: a module
                source, attr, reached = value.__name__, None, (value.__name__,)
            if attr is None:  # a module: reloaded in place, except what the top made with it then
                if bound in found.used:
                    for other in reached:
                        if _reloaded_after(other, since, name):
                            held.setdefault(other, [])
                continue
            if not _reloaded_after(source, since, name):
                continue
            now = sys.modules[source]
            if attr == "*":
                public = getattr(now, "__all__", None) or [k for k in vars(now) if not k.startswith("_")]
                taken = [(k, k) for k in public if k in glob]
            else:
                taken = [(bound, attr)] if value is not _MISSING else []
            for mine, theirs in taken:
                if not _held_same(glob[mine], getattr(now, theirs, _MISSING)):
                    held.setdefault(source, []).append(mine)
        out += [(name, other, tuple(dict.fromkeys(took))) for other, took in held.items()]
    return out


class _KeyPickler(cloudpickle.Pickler):
    """cloudpickle with the per-process parts taken out (see the module docstring).

    Code it pickles by reference counts too: a notebook function wrapped by
    ``functools.cache``/``lru_cache`` is keyed by the function it wraps (by
    value); a function, class or module of the user's own modules (a ``.py``
    file beside the notebook) by a digest of that module's file, and of the
    user's modules it imports in turn (``modules``, added to the key by
    :func:`run_key`; ``names``: those modules, for the caller's check that
    their files are the ones the notebook loaded).

    mpmagic's shared helpers (``Value``, ``Array``, ``Lock``, ``RLock``,
    ``Event``, ``Queue``, and a helper's ``get_lock()``) pickle by the name of
    their shared memory, new for every object made: a function capturing a
    counter had a new key each time the cell making the counter ran (a new
    kernel too), and never resumed. What a run captures (``captures``: the
    function, a cell's names, the setup) keys them by what they are, their
    ``_mpmagic_key()`` (kind, typecode, length, maxsize...), never by their
    current value, which is state the run itself changes (docs/checkpoint.md).
    An item keeps its helper's name: two queues given as two items are two
    items, whose results must not be taken for each other.
    """

    dispatch_table = ChainMap({types.CodeType: _code_key_reduce}, cloudpickle.Pickler.dispatch_table)

    def __init__(self, *args: Any, captures: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.modules: dict[str, bytes] = {}  # file of a user's module the pickle refers to -> its digest
        self.names: dict[str, str] = {}  # those modules by name -> their file (for checkpoint._check_edited)
        self.captures = captures

    def _add_code(self, path: str, func: types.FunctionType) -> None:
        """Key ``func`` of the user's module at ``path`` also by the code it has now (which a
        module edited and not reloaded, or a name taken from a module reloaded since, keeps)."""
        digest = hashlib.blake2b(marshal.dumps(func.__code__), digest_size=16).digest()
        # (the digest in the name too: m1's stale `k` and m2's new one are two entries)
        self.modules[f"{path}:{func.__qualname__}:{digest.hex()}"] = digest

    def _add_module(self, name: str, path: str) -> None:
        """Key the user's module ``name`` (file ``path``) by its file, and so the user's
        modules it imports, in turn (:func:`_local_imports`, :func:`_source_modules`): ``f``
        calls ``m1.g``, which calls ``m2.k``; edited and reloaded, ``m2`` kept its stored
        results when only the modules the function names counted."""
        todo = [(name, path)]
        while todo:
            name, path = todo.pop()
            if path in self.modules:
                continue
            self.modules[path] = _file_digest(path)
            self.names[name] = path
            for other, other_path, taken in _local_imports(name):
                for func in taken:  # `from m2 import k` in m1: m1 runs the k it took (see _local_imports)
                    self._add_code(other_path, func)
                if other_path not in self.modules:
                    todo.append((other, other_path))
            todo += [(other, other_path) for other, other_path in _source_modules(name, path)
                     if other_path not in self.modules]

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if self.captures:
            what = _helper_keys.get(t, _NOT_LOOKED)
            if what is _NOT_LOOKED:  # (a lookup per object: getattr per object made keys ~25% slower)
                what = _helper_keys[t] = getattr(t, "_mpmagic_key", None)
            if what is not None:  # an mpmagic.Value, Lock, Queue...: by what it is, not its name
                return _shared_stub, what(obj)
        if t is _LRU_WRAPPER and callable(getattr(obj, "__wrapped__", None)):
            params = obj.cache_parameters()
            return _wrapped_stub, (obj.__wrapped__, params["maxsize"], params["typed"])
        if t is types.ModuleType or isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            name = obj.__name__ if t is types.ModuleType else getattr(obj, "__module__", None)
            path = local_module_file(name)
            if path is not None and path not in self.modules and isinstance(name, str):
                self._add_module(name, path)
            if path is not None and t is types.FunctionType:  # the code that runs (a module edited, not reloaded)
                self._add_code(path, obj)
        rv = super().reducer_override(obj)
        if isinstance(obj, type) and isinstance(rv, tuple) and len(rv) > 2:
            if _TRACKER is not None:
                tracker = _TRACKER(obj)
                rv = (rv[0], tuple(None if a == tracker else a for a in rv[1]), *rv[2:])
            state = rv[2]  # (class dict, slot state): Python 3.13 adds the line the class starts on
            if isinstance(state, tuple) and state and isinstance(state[0], dict) and "__firstlineno__" in state[0]:
                clsdict = {k: v for k, v in state[0].items() if k != "__firstlineno__"}
                rv = (rv[0], rv[1], (clsdict, *state[1:]), *rv[3:])
        return rv


class _BufferHasher:
    """``buffer_callback`` that feeds contiguous large buffers to the hash instead of the pickle.

    ``keep``: a list that gets a copy of each buffer (the copy is what is
    hashed), to load the pickle back from (:func:`keyed_copy`).
    """

    def __init__(self, h: Any, keep: list | None = None) -> None:
        self.h = h
        self.keep = keep

    def __call__(self, buf: pickle.PickleBuffer) -> bool:
        try:
            raw: Any = buf.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if self.keep is not None:
            raw = bytearray(raw)  # (writable, as the array it came from)
            self.keep.append(raw)
        self.h.update(len(raw).to_bytes(8, "little"))
        self.h.update(raw)
        return False


def _key_pickle(obj: Any, h: Any, captures: bool = False, used: dict[str, str] | None = None) -> bytes:
    """The key pickle of ``obj``; the digests of the user's modules it refers to go into ``h``
    (by file contents, not path: a new checkout in another folder finds its results).
    ``captures``: ``obj`` is what a run captures, not an item (see :class:`_KeyPickler`).
    ``used``: gets those modules, name -> file."""
    with io.BytesIO() as f:
        pickler = _KeyPickler(f, protocol=_PROTOCOL, buffer_callback=_BufferHasher(h), captures=captures)
        pickler.dump(obj)
        for digest in sorted(pickler.modules.values()):
            h.update(b"module " + digest)
        if used is not None:
            used.update(pickler.names)
        return f.getvalue()


def _setup_digest() -> bytes:
    """A digest of the current ``%%pool setup`` cell and ``on_worker_start`` functions
    (names they define are the workers' builtins, which the function may read), and of
    the user's own modules they import; b"" when none."""
    from . import worker_setup

    with worker_setup._lock:  # (read only)
        entries = list(worker_setup._entries)
    if not entries:
        return b""
    h = hashlib.blake2b(digest_size=16, person=b"mpmagic-setup")
    # The user's own modules it imports, by their file's contents (as a module the
    # function refers to): imported by the setup alone, an edited module kept its
    # old results. (Whether the workers run that file: see worker_setup.files_changed.)
    for digest in sorted(_file_digest(path) for path in worker_setup.module_files()):
        h.update(b"module " + digest)
    for entry in entries:
        h.update(f"{entry.kind}|{entry.name}|".encode())
        if entry.kind == "code":
            h.update(str(entry.data).encode())
            continue
        try:  # a function: by what it does, as the mapped function is
            h.update(_key_pickle(pickle.loads(entry.data), h, captures=True))
        except Exception:
            h.update(entry.data)
    return h.digest()


def _digest(h: Any, data: bytes) -> bytes:
    h.update(data)
    return h.digest()


def run_key(func: Any, star: bool, used: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """``(key, key pickle)`` of a map of ``func``: equal across kernels for equal code and captures.

    The pickle is returned so callers can look for sets in it
    (:func:`unstable_reason`). Raises what pickling raises when ``func``
    cannot be pickled (the run would fail the same way). ``used`` gets the
    user's modules the key covers by their file, name -> file (the caller
    checks that the file is still the one the notebook loaded:
    ``checkpoint._check_edited``).
    """
    h = hashlib.blake2b(digest_size=16, person=b"mpmagic-run")
    h.update(f"{FORMAT}|{sys.version_info[0]}.{sys.version_info[1]}|{int(star)}|".encode())
    if setup := _setup_digest():  # (only then: keys without a setup stay as they were)
        h.update(b"setup " + setup)
    data = _key_pickle(func, h, captures=True, used=used)
    return _digest(h, data), data


def cell_key(source: str, names: dict, modules: dict, gather: tuple, size: int,
             seed: int | None = None, used: dict[str, str] | None = None,
             last_assign: bool = False) -> tuple[bytes, bytes]:
    """The run key of a ``%%parallel`` cell: its text, the names it reads, its size,
    its ``seed`` (another seed gives other values: a --seed 4 run returned the
    values stored by a --seed 3 one) and the worker setup (a cell reads its names
    as a map's function does: a new setup returned the old one's stored values).
    ``used``: as :func:`run_key`'s. ``last_assign``: a final ``x = ...`` is the value
    (``CellSpec.last_assign``), not None: other values than the same cell's without it."""
    h = hashlib.blake2b(digest_size=16, person=b"mpmagic-cell")
    h.update(f"{FORMAT}|{sys.version_info[0]}.{sys.version_info[1]}|{size}|{gather}|".encode())
    if seed is not None:  # (only then: the keys of cells without a seed stay as they were)
        h.update(f"seed {seed}|".encode())
    if last_assign:  # (only then: the keys of other cells stay as they were)
        h.update(b"last assign|")
    if setup := _setup_digest():  # (only then, as in run_key)
        h.update(b"setup " + setup)
    h.update(source.encode())
    # The modules the cell imports travel by name: those of the user's own count by their
    # file, as a module a function names (an edited and reloaded one kept its stored values).
    # So do those its code imports itself (`import mymod` in the cell): edited and reloaded,
    # the cell's old values were resumed. (Only then in the pickle, or the hash: the keys of
    # cells without such modules stay as they were.)
    own = _cell_imports(source)
    loaded = set(modules.values()) | {m for m in own if m in sys.modules}
    local = [sys.modules[m] for m in sorted(loaded) if local_module_file(m) is not None]
    for name, path in sorted(own.items()):
        if name not in sys.modules:  # not imported here: by its file, as a rank imports it
            h.update(b"module " + _file_digest(path))
            if used is not None:
                used[name] = path
    what = (sorted(names.items()), sorted(modules.items()), *([local] if local else []))
    data = _key_pickle(what, h, captures=True, used=used)
    return _digest(h, data), data


def _cell_imports(source: str) -> dict[str, str]:
    """The user's own modules a cell's code imports itself, name -> file (``usermodules.module_file``:
    found as import finds them, without importing them here); none when it does not compile."""
    try:
        code = compile(source, "<cell>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return {}
    out = {}
    for name in imported_names(code):
        path = module_file(name)
        if path is not None:
            out[name] = path
    return out


_local_names: dict[str, bytes | None] = {}  # module name -> how a pickle names it, if it is the user's own
_local_patterns: tuple[bytes, ...] = ()
_modules_seen = 0


def _local_module_patterns() -> tuple[bytes, ...]:
    """How a pickle names each loaded module of the user's own (a .py beside the
    notebook: :func:`usermodules.local_module_file`), as protocol 4+ writes a module name
    (SHORT_BINUNICODE: ``\\x8c``, its length, the name); looked at again only
    when modules were imported since."""
    global _local_patterns, _modules_seen
    if len(sys.modules) != _modules_seen:
        for name in list(sys.modules):
            if name not in _local_names:
                local = local_module_file(name) is not None
                raw = name.encode()
                _local_names[name] = (b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else raw) if local else None
        _local_patterns = tuple(p for p in _local_names.values() if p is not None)
        _modules_seen = len(sys.modules)
    return _local_patterns


def _names_code(data: bytes) -> bool:
    """Does the plain pickle ``data`` name code whose digest the key must cover: the
    notebook's, or a module of the user's own (a class of ``shapes.py`` beside the
    notebook, whose method the function calls: edited and reloaded, its items'
    stored results were returned stale)?"""
    return b"__main__" in data or b"__mp_main__" in data or any(p in data for p in _local_module_patterns())


def item_key(item: Any, used: dict[str, str] | None = None) -> tuple[bytes, bytes | None]:
    """``(key, pickle)`` of one item; the pickle is None for plain values (nothing to check).

    Plain pickle when it names no notebook code (fast: ~1 us for a number);
    the key pickler when it does, so a notebook class's code counts too.
    ``used``: as :func:`run_key`'s.
    """
    if type(item) in _PLAIN:
        return hashlib.blake2b(pickle.dumps(item, _PROTOCOL), digest_size=16).digest(), None
    h = hashlib.blake2b(digest_size=16)
    try:
        data = pickle.dumps(item, _PROTOCOL, buffer_callback=_BufferHasher(h))
        if _names_code(data):
            raise pickle.PicklingError("by reference to notebook code")
    except Exception:
        h = hashlib.blake2b(digest_size=16)
        data = _key_pickle(item, h, used=used)
    return _digest(h, data), data


def keyed_copy(item: Any, used: dict[str, str] | None = None) -> tuple[bytes, bytes | None, Any]:
    """``(key, pickle, copy)``: :func:`item_key` of a private copy of ``item``, and that copy.

    A background run (or a stream, or a lazy input) keys its items before they
    are sent: an item the notebook (or the generator) changes in place in
    between must not be computed in its new state and stored under the old
    state's key. The copy is what is sent: it is in exactly the keyed state,
    and nobody else holds it. Numbers and strings cannot change: they are
    their own copy. Others are loaded back from the very pickle that is hashed
    (numpy buffers copied once); one that names notebook code or a module of
    the user's is copied by a pickle round trip first, then keyed. ``used``: as
    :func:`run_key`'s.
    """
    if type(item) in _PLAIN:
        return hashlib.blake2b(pickle.dumps(item, _PROTOCOL), digest_size=16).digest(), None, item
    h = hashlib.blake2b(digest_size=16)
    kept: list = []
    try:
        data = pickle.dumps(item, _PROTOCOL, buffer_callback=_BufferHasher(h, kept))
        plain = not _names_code(data)
    except Exception:
        plain = False
    if plain:
        return _digest(h, data), data, pickle.loads(data, buffers=kept)
    try:  # (a class of the notebook resolves by name in this process)
        copy = pickle.loads(pickle.dumps(item, _PROTOCOL))
    except Exception:  # (a lambda inside, a class defined in a function: by value)
        copy = cloudpickle.loads(cloudpickle.dumps(item, _PROTOCOL))
    h = hashlib.blake2b(digest_size=16)
    data = _key_pickle(copy, h, used=used)
    return _digest(h, data), data, copy


def keyed_copies(items: list, used: dict[str, str] | None = None) -> list[tuple[bytes, bytes | None, Any]]:
    """:func:`keyed_copy` of each item; a batch of plain values (numbers, strings) in one tight loop.
    ``used`` gets the user's modules any of them names (see :func:`run_key`)."""
    if all(type(x) in _PLAIN for x in items):
        dumps, b2 = pickle.dumps, hashlib.blake2b
        return [(b2(dumps(x, _PROTOCOL), digest_size=16).digest(), None, x) for x in items]
    return [keyed_copy(x, used) for x in items]


def item_keys(items: list, used: dict[str, str] | None = None) -> list[tuple[bytes, bytes | None]]:
    """:func:`item_key` of each item; a batch of plain values (numbers, strings) in one tight loop.
    ``used`` gets the user's modules any of them names (see :func:`run_key`)."""
    if all(type(x) in _PLAIN for x in items):
        dumps, b2 = pickle.dumps, hashlib.blake2b
        return [(b2(dumps(x, _PROTOCOL), digest_size=16).digest(), None) for x in items]
    return [item_key(x, used) for x in items]


# Opcodes that build sets, and those that hold a string or bytes.
_SET_BYTES = (b"\x8f", b"\x91")  # EMPTY_SET, FROZENSET
_TEXT_OPS = {
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
    "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "SHORT_BINSTRING", "BINSTRING",
}


def unstable_reason(data: bytes | None) -> str | None:
    """Why the pickle ``data`` may differ in another kernel, or None.

    Detects what is cheap to detect: a set or frozenset in a pickle that also
    holds strings or bytes, with string hashing randomised (the default).
    A byte scan first, so the common item (no set) costs a few hundred ns.
    """
    if data is None or not sys.flags.hash_randomization:
        return None
    if not any(b in data for b in _SET_BYTES):
        return None
    try:
        ops = [op for op, _arg, _pos in pickletools.genops(data)]
    except Exception:  # out-of-band buffers and the like: not worth the risk of a crash
        return None
    for i, op in enumerate(ops):
        # A set's elements are pickled in MARK ... ADDITEMS batches after its
        # EMPTY_SET (none for an empty set: the next op is then not a MARK), a
        # frozenset's between a MARK and FROZENSET: strings there mean hash order.
        if op.name == "EMPTY_SET":
            inside = _set_items(ops, i + 1)
        elif op.name == "FROZENSET":
            inside = list(itertools.takewhile(lambda o: o.name != "MARK", reversed(ops[:i])))
        else:
            continue
        if any(o.name in _TEXT_OPS for o in inside):
            return "holds a set of strings, whose pickle follows string hashes and changes between kernels"
    return None


_MEMO_OPS = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}


def _set_items(ops: list, i: int) -> list:
    """The ops of the first batch of a set's elements, the set's EMPTY_SET being just before ``ops[i]``."""
    while i < len(ops) and ops[i].name in _MEMO_OPS:
        i += 1
    if i >= len(ops) or ops[i].name != "MARK":  # an empty set: no elements, no ADDITEMS
        return []
    depth, j = 0, i
    while j < len(ops):  # to the ADDITEMS that takes this MARK (elements may hold marks of their own)
        if ops[j].name == "MARK":
            depth += 1
        elif pickletools.markobject in ops[j].stack_before:
            depth -= 1
            if depth == 0:
                break
        j += 1
    return ops[i + 1 : j]
