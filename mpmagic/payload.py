"""Turning notebook objects into bytes for workers, and back.

* Functions (with the globals and closures they use) go by value with
  cloudpickle, so cell-defined code works under spawn and forkserver. They are
  serialized once per call and keyed by a content hash, so a worker that has
  seen the same payload before gets only the key.
* Data (items, results) go with plain pickle when the bytes would load in any
  process, and with cloudpickle when they would not (lambdas, instances of
  cell-defined classes). Both produce standard pickles, read by ``loads``.
* When something cannot be pickled, :func:`explain_unpicklable` finds *which*
  variable it is (``query -> conn``) and says what to do instead.

This module imports no IPython: workers import it.
"""

from __future__ import annotations

import bisect
import copyreg
import ctypes
import dis
import enum
import functools
import hashlib
import io
import keyword
import multiprocessing.connection as _mp_connection
import os
import pickle
import sys
import threading
import types
import typing
import weakref
from collections import ChainMap
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

from . import classhome, compat, shm, task_shell
from .errors import SerializationError

PROTOCOL = 5

# A plain pickle that names ``__main__`` or ``__mp_main__`` refers to a notebook
# (or spawn-main) definition by reference: another process cannot import it.
# Both contain this, so one scan finds either (a scan runs at ~3 GB/s here:
# ~200 us per 600 kB chunk, a second scan as much again). Data that merely
# contains these bytes goes by cloudpickle: correct, only slower. A list of
# large plain values (below) is not scanned at all.
_MAIN_MARKER = b"_main__"
# A plain pickle of a ``multiprocessing.Pipe()`` end names its module (pickle's default
# reduction of a ``Connection``: its fd number, which means another file, or none,
# in a worker). Such data goes to cloudpickle, whose table refuses it
# (:func:`_refuse_pipe`). A long needle scans ~4x faster than ``_MAIN_MARKER``.
_PIPE_MARKER = b"multiprocessing.connection"
# A list or tuple of only these (exact types: a subclass may be a notebook
# class) pickles with no global reference at all, so it needs no scan. Checked
# only when its pickle averages at least _ATOMS_MIN_BYTES per element: there
# the type test (~30 ns an element) is cheaper than scanning the element's
# bytes (~0.45 ns a byte), which cost as much again as pickling them: 2,000
# ``bytes`` items of 100 kB spent ~80 ms scanning per map (userperf13, F1).
_ATOMS = frozenset({bytes, str, int, float, bool, type(None), bytearray})
_ATOMS_MIN_BYTES = 256


def _keeping_filename(code_reduce: Callable[[Any], tuple]) -> Callable[[types.CodeType], tuple]:
    """cloudpickle's reducer of code objects, with the code's real file name kept."""

    def reduce_code(code: types.CodeType) -> tuple:
        # cloudpickle >= 3.1 renames every code object's file to "<dynamic-code>";
        # keep the real one, so a worker's traceback can point at the notebook cell.
        ctor, args = code_reduce(code)
        return ctor, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)

    return reduce_code


_cloudpickle_code_reduce = compat.cloudpickle_code_reduce()


# --------------------------------------------------------------------------
# Reducers for what cloudpickle cannot send
#
# cloudpickle sends notebook functions and classes by value, but two kinds of
# notebook objects still go by reference (by their name in ``__main__``),
# which another process cannot resolve:
#
# * ``functools.lru_cache`` / ``functools.cache`` wrappers (a C type whose
#   ``__reduce__`` returns its qualified name: cloudpickle#178). We send the
#   wrapped function by value and the cache's parameters, and wrap it again
#   there (with an empty cache: a cache is a per-process speed-up). A
#   recursive cached function finds itself in its globals: pickle's memo makes
#   that the same wrapper.
# * Instances of notebook classes with ``__slots__`` (``@dataclass(slots=True)``
#   included). cloudpickle rebuilds the class in the worker without real slots,
#   so the instance keeps its values in a ``__dict__``, and its default pickle
#   state is that dict: loading it onto the notebook's real slotted class then
#   fails ("'S' object has no attribute '__dict__'"). We send the instance as
#   its class and a {name: value} of slots and ``__dict__`` together, and set
#   them with ``object.__setattr__``, which works on either kind of class (and
#   on frozen dataclasses, as their own ``__init__`` does).
#
# Notebook-built modules (``types.ModuleType``) already go by value with
# cloudpickle; what made them stale was the payload cache (payload_cache._ok).

_LRU_WRAPPER = type(functools.lru_cache(maxsize=1)(lambda: None))
_TYPE_ALIAS: Any = getattr(typing, "TypeAliasType", None)  # (Python 3.12+)
_NEW_TYPE: Any = typing.NewType
_OBJECT_REDUCE = (object.__reduce_ex__, object.__reduce__, getattr(object, "__getstate__", None))
_by_reference = compat.cloudpickle_by_reference()


def _sent_by_value(obj: Any) -> bool:
    """Would cloudpickle send this function or class by value (a notebook one)?"""
    if _by_reference is None:
        return False
    try:
        return not _by_reference(obj)
    except Exception:
        return False


def _rebuild_lru_cache(func: Any, maxsize: int | None, typed: bool) -> Any:
    """The receiving side of an ``lru_cache`` wrapper: wrap ``func`` again."""
    return functools.lru_cache(maxsize=maxsize, typed=typed)(func)


def _rebuild_cached_property(func: Any, attrname: str | None, doc: str | None) -> functools.cached_property:
    """The receiving side of a ``functools.cached_property`` of a class sent by value: the
    property of the same function again. Python 3.11's holds a thread lock, which no
    pickler can send; the worker's own property makes its own (3.12's has none)."""
    prop = functools.cached_property(func)
    prop.attrname = attrname
    prop.__doc__ = doc
    return prop


def _singledispatch_parts(func: Any) -> tuple[Any, list[tuple[Any, Any]]] | None:
    """A notebook ``functools.singledispatch`` function's default implementation and its
    other (class, implementation) pairs, or None for any other object."""
    if type(func) is not types.FunctionType or not _library_function(func):
        return None
    registry = vars(func).get("registry")
    if registry is None or "dispatch" not in vars(func) or object not in registry:
        return None
    return registry[object], [(cls, impl) for cls, impl in registry.items() if cls is not object]


def _rebuild_singledispatch(default: Any, impls: list[tuple[Any, Any]], attrs: dict[str, Any]) -> Any:
    """The receiving side of a notebook ``functools.singledispatch`` function: the same
    implementations registered again (its dispatch cache, a WeakKeyDictionary, cannot be
    pickled: the worker's fills as it dispatches), with the attributes the user set on it."""
    func = functools.singledispatch(default)
    for cls, impl in impls:
        func.register(cls, impl)
    vars(func).update(attrs)
    return func


def _rebuild_singledispatchmethod(dispatcher: Any, func: Any, attrs: dict[str, Any]) -> Any:
    """The receiving side of a ``functools.singledispatchmethod`` (a notebook class's
    method): the worker's own, with the dispatcher sent (every implementation registered).
    Python 3.13.0's keeps the bound methods it made in a WeakKeyDictionary (gh-85160,
    dropped again by gh-127750), which no pickler can send: the worker's fills its own."""
    method = functools.singledispatchmethod(func)
    method.dispatcher = dispatcher
    vars(method).update(attrs)
    return method


def _singledispatchmethod_binding(func: Any) -> tuple[Any, Any, Any] | None:
    """For the function a ``functools.singledispatchmethod`` gave for ``obj.method``
    or ``cls.method``: that singledispatchmethod (its ``register`` is the method's),
    the instance and the class it was bound to; None for any other function."""
    if not _library_function(func):
        return None
    method = getattr(vars(func).get("register"), "__self__", None)
    if type(method) is not functools.singledispatchmethod:
        return None
    cells = dict(zip(func.__code__.co_freevars, func.__closure__ or (), strict=True))
    if "obj" not in cells or "cls" not in cells:
        return None
    return method, cells["obj"].cell_contents, cells["cls"].cell_contents


def _rebind_singledispatchmethod(method: Any, obj: Any, cls: Any, attrs: dict[str, Any]) -> Any:
    """The receiving side of a method a ``functools.singledispatchmethod`` gave: the
    worker's own binding of it. Python 3.13.0's captures the dispatcher's ``dispatch``
    itself, whose cache (a WeakKeyDictionary) cannot be pickled; the others capture the
    singledispatchmethod, sent as the same again."""
    bound = method.__get__(obj, cls)
    vars(bound).update(attrs)
    return bound


# (a singledispatchmethod's attributes _rebuild_singledispatchmethod makes or passes itself;
# _all_weakrefable_instances: the cache's companion in 3.13's pre-releases)
_SINGLEDISPATCHMETHOD_OWN = frozenset({"dispatcher", "func", "_method_cache", "_all_weakrefable_instances"})


# (what functools.singledispatch sets on its wrapper, made again by _rebuild_singledispatch)
_SINGLEDISPATCH_OWN = frozenset({"register", "dispatch", "registry", "_clear_cache", "__wrapped__", "__module__",
                                 "__name__", "__qualname__", "__doc__", "__dict__", "__annotations__"})


def slot_names(cls: type) -> list[str]:
    """Names of the ``__slots__`` of ``cls`` and its bases (not ``__dict__``/``__weakref__``)."""
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and name not in names:
                names.append(name)
    return names


def _slotted_by_value(cls: type) -> bool:
    """A notebook class with ``__slots__`` and the default pickling of instances."""
    if "__slots__" not in cls.__dict__ and not any("__slots__" in k.__dict__ for k in cls.__mro__[1:-1]):
        return False
    if (cls.__reduce_ex__, cls.__reduce__, getattr(cls, "__getstate__", None)) != _OBJECT_REDUCE:  # type: ignore[comparison-overlap]
        return False  # the class says how to pickle itself: let it
    if any(not k.__flags__ & _HEAPTYPE for k in cls.__mro__[1:-1]):
        # A subclass of a builtin (float, dict, tuple: a namedtuple): its value
        # lives in the builtin's part, which ``cls.__new__(cls)`` and the slots
        # would lose (a Meters(float) came back 0.0); pickle's own reduce keeps it.
        return False
    return _sent_by_value(cls)


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement, not a builtin type
_PLAIN_CONTAINERS = frozenset({tuple, list, dict, set, frozenset, bytearray})
_slotted_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _slotted_by_value_cached(cls: type) -> bool:
    """:func:`_slotted_by_value`, decided once per class (thousands of
    instances of one class are common in results)."""
    try:
        return _slotted_seen[cls]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable
        return _slotted_by_value(cls)
    decided = _slotted_seen[cls] = _slotted_by_value(cls)
    return decided


def _slotted_state(obj: Any) -> dict[str, Any]:
    state = {}
    for name in slot_names(type(obj)):
        try:
            state[name] = object.__getattribute__(obj, name)
        except AttributeError:  # an unset slot stays unset
            pass
    state.update(getattr(obj, "__dict__", {}))
    return state


def _rebuild_slotted(cls: type, state: dict[str, Any]) -> Any:
    """The receiving side of a slotted instance: no ``__init__``, as pickle does."""
    obj = cls.__new__(cls)  # type: ignore[call-overload]
    for name, value in state.items():
        object.__setattr__(obj, name, value)
    return obj


# What an Enum member holds of its own (the rest is what its ``__init__``/``__new__``
# or later code set on it): rebuilt by the class itself.
_ENUM_OWN = frozenset({"_value_", "_name_", "__objclass__", "_sort_order_"})
_cloudpickle_class_setstate = compat.cloudpickle_class_setstate()


def _keeping_qualname(cls: type, reduced: Any) -> Any:
    """cloudpickle's reduction of the by-value class ``cls``, with its ``__qualname__``.

    cloudpickle makes the class again from its ``__name__`` alone: a nested notebook
    class was ``Inner`` in a task (a dataclass's repr ``Inner(x=1)``, serially
    ``Outer.Inner(x=1)``), and a class a task made in a function came back as ``Point``
    where serial code has ``make.<locals>.Point``. The qualified name goes in the class's
    state, which cloudpickle's ``_class_setstate`` sets on the class. A class whose two
    names are one is pickled as cloudpickle does (the same bytes)."""
    qualname = cls.__qualname__
    if (qualname == cls.__name__ or not (isinstance(reduced, tuple) and len(reduced) == 6)
            or reduced[5] is not _cloudpickle_class_setstate):
        return reduced  # (or another cloudpickle's shape: as it is)
    make, args, (attrs, slots), listitems, dictitems, setstate = reduced
    return make, args, ({**attrs, "__qualname__": qualname}, slots), listitems, dictitems, setstate


def enum_reduce(cls: type, reduced: Any) -> Any:
    """cloudpickle's reduction of the notebook Enum ``cls``, with its members' attributes.

    cloudpickle rebuilds a by-value Enum from ``{name: value}`` only (its members
    made before the class has its methods): an attribute its ``__init__`` or
    ``__new__`` set (the Python docs' ``Planet.mass``, the ``.label`` idiom) or set
    on a member later (``E.A.extra = 1``) was missing in the worker, an
    AttributeError serial code never raises. Each member's own attributes travel
    with the class's state and are set on the rebuilt members
    (``classhome.enum_setstate``); the members stay the class's, looked up by
    value as before (``x is Planet.EARTH`` holds). An Enum without such
    attributes is pickled as cloudpickle does (the same bytes)."""
    if not (isinstance(reduced, tuple) and len(reduced) == 6 and reduced[5] is _cloudpickle_class_setstate):
        return reduced  # (another cloudpickle's shape: as it is)
    members: dict[str, dict[str, Any]] = {}
    for name, member in getattr(cls, "_member_map_", {}).items():
        attrs = getattr(member, "__dict__", None)
        if attrs is None or getattr(member, "_name_", None) != name:  # (an alias: its member's name has it)
            continue
        own = {k: v for k, v in attrs.items() if k not in _ENUM_OWN}
        if own:
            members[name] = own
    if not members:
        return reduced
    make, args, state, _, _, _ = reduced
    return make, args, (state, members), None, None, classhome.enum_setstate


def _enum_members_kept(reduced: Any) -> Any:
    """cloudpickle's Enum reduction with each member that ``enum`` would not take as a
    member by itself (a function: ``@enum.member def double(x)``) wrapped in
    ``enum.member``.

    cloudpickle rebuilds the class from ``{name: value}``: a function value became
    a plain method there (``Op.double.name``: AttributeError in a worker, the member
    missing from ``list(Op)``). Any other reduction is returned as it is."""
    member = getattr(enum, "member", None)  # (Python 3.11+: before, a function is never a member)
    if member is None or not (isinstance(reduced, tuple) and len(reduced) >= 2):
        return reduced
    args = reduced[1]
    if not (isinstance(args, tuple) and len(args) > 3 and isinstance(args[3], dict)):
        return reduced
    members = args[3]
    if not any(_enum_would_skip(value) for value in members.values()):
        return reduced  # (the common case: the same bytes as cloudpickle's)
    kept = {name: member(value) if _enum_would_skip(value) else value for name, value in members.items()}
    return (reduced[0], (*args[:3], kept, *args[4:]), *reduced[2:])


def _enum_would_skip(value: Any) -> bool:
    """Would an Enum class body take ``value`` as a method, not a member (a descriptor)?"""
    return any(hasattr(type(value), name) for name in ("__get__", "__set__", "__delete__"))


# --------------------------------------------------------------------------
# Notebook type aliases (``type Vec = list[float]``) and ``typing.NewType``
#
# Both pickle by reference (module + name): one made in the notebook is
# ``__main__.Vec``, which a worker cannot import ("could not be loaded in a
# worker"), and before Python 3.14 a function's annotations are evaluated when
# its ``def`` runs, so merely annotating a mapped function with one was enough.
# cloudpickle sends a TypeVar by value but neither of these; mpmagic sends one
# by value when it cannot be found by name in a module the workers import.

_type_alias_values: dict[int, dict[str, Any]] = {}  # an alias being loaded -> the namespace its value is read from


def _alias_by_value(obj: Any) -> bool:
    """Is this NewType or type alias one a worker cannot find by its module and name?"""
    module_name = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(module_name, str) or not isinstance(name, str) or module_name in ("__main__", "__mp_main__"):
        return True
    module = sys.modules.get(module_name)
    if module is None or module_name in _by_value_names or module_name in cloudpickle.list_registry_pickle_by_value():
        return True
    found: Any = module
    for part in name.split("."):
        found = getattr(found, part, None)
    return found is not obj


def _reduce_new_type(obj: Any) -> Any:
    return _rebuild_new_type, (obj.__name__, obj.__supertype__, obj.__module__)


def _rebuild_new_type(name: str, supertype: Any, module: str) -> Any:
    """The receiving side of a notebook ``typing.NewType``: made again, in its module."""
    new_type = typing.NewType(name, supertype)  # type: ignore[misc]
    new_type.__module__ = module
    return new_type


def _reduce_type_alias(obj: Any) -> Any:
    """A notebook ``type`` alias by value.

    One without type parameters is made again by a ``type`` statement whose value
    is read when asked (as the notebook's is): its value travels as the alias's
    state, after the alias itself, so a recursive alias (``type Tree = int |
    list[Tree]``) refers to itself. A value that cannot be evaluated (a name not
    yet defined: serial code never asks for it unless it reads ``__value__``)
    raises the same NameError in the worker, when read. A generic alias is made
    again by ``TypeAliasType(name, value, type_params=...)``, its parameters the
    ones its value uses."""
    params = getattr(obj, "__type_params__", ())
    value: Any = None
    error: str | None = None
    try:
        value = obj.__value__
    except NameError as e:
        error = str(e)
    if error is None and (params or not _spellable(obj.__name__)):
        return _rebuild_generic_type_alias, (obj.__name__, value, params, obj.__module__)
    if not _spellable(obj.__name__):
        return NotImplemented  # (a name no ``type`` statement can have, and no value: by reference, as before)
    return (_make_type_alias, (obj.__name__, obj.__module__, _param_spelling(params)),
            (value, error), None, None, _set_type_alias_value)


def _spellable(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def _param_spelling(params: tuple[Any, ...]) -> str:
    """How a ``type`` statement names these type parameters (``T, *Ts, **P``)."""
    spelled = []
    for p in params:
        kind = type(p).__name__
        spelled.append(("*" if kind == "TypeVarTuple" else "**" if kind == "ParamSpec" else "") + p.__name__)
    return ", ".join(spelled)


def _make_type_alias(name: str, module: str, params: str) -> Any:
    """A ``type`` alias named ``name`` in ``module`` whose value is read, when asked,
    from a namespace :func:`_set_type_alias_value` fills."""
    namespace: dict[str, Any] = {"__name__": module}
    spelled = f"[{params}]" if params else ""
    exec(f"type {name}{spelled} = _mpmagic_type_alias_value()", namespace)  # noqa: S102 (a name and parameters, no user code)
    alias = namespace[name]
    _type_alias_values[id(alias)] = namespace
    return alias


def _set_type_alias_value(alias: Any, state: tuple[Any, str | None]) -> Any:
    value, error = state
    namespace = _type_alias_values.pop(id(alias), None)
    if namespace is not None:
        if error is None:
            namespace["_mpmagic_type_alias_value"] = lambda: value
        else:
            def _undefined() -> Any:
                raise NameError(error)

            namespace["_mpmagic_type_alias_value"] = _undefined
    return alias


def _rebuild_generic_type_alias(name: str, value: Any, params: tuple[Any, ...], module: str) -> Any:
    """The receiving side of a generic notebook ``type`` alias (or one whose name no
    ``type`` statement can spell), in its module."""
    namespace: dict[str, Any] = {"__name__": module, "_args": (name, value, params)}
    exec("import typing\n_alias = typing.TypeAliasType(_args[0], _args[1], type_params=_args[2])", namespace)  # noqa: S102
    return namespace["_alias"]


def _is_shells_get_ipython(method: types.MethodType) -> bool:
    """Is this the IPython shell's ``get_ipython`` (looked up, never imported here)?"""
    shell_module = sys.modules.get("IPython.core.interactiveshell")
    shell_class = getattr(shell_module, "InteractiveShell", None)
    return shell_class is not None and method.__func__ is getattr(shell_class, "get_ipython", None)


def _worker_builtin(name: str) -> Any:
    """What a task's ``get_ipython`` or ``display`` is in a worker (see task_builtins)."""
    from . import task_builtins

    return getattr(task_builtins, name)


# --------------------------------------------------------------------------
# Keeping alive what a run's payload names
#
# A shared helper (``mpmagic.Value``, ``Queue``...) travels by name, and its
# names live only as long as the notebook's object: a background run whose
# function read ``counter`` failed with SharedObjectGone once the notebook
# rebound ``counter`` (a fresh one for the next run). So a helper being
# pickled calls :func:`keep_alive`, and whoever builds a run's payload collects
# those objects (:class:`keeping`) and holds them until the run ends. With no
# helper pickled this costs a thread-local store and restore per payload.

class _Keeping(threading.local):
    into: dict[int, Any] | None = None


_keeping = _Keeping()


def keep_alive(obj: Any) -> None:
    """Called by an object that travels by name while it is pickled: the run
    whose payload is being built (if any) keeps ``obj`` alive until it ends."""
    into = _keeping.into
    if into is not None:
        into[id(obj)] = obj


def helper_kind(obj: Any) -> str:
    """What kind of shared helper ``obj`` is, as its constructor is named ("Queue",
    "Value", "Lock"...): a local helper's ``_kind``, a Dask one's class name."""
    kind = getattr(obj, "_kind", None)
    return kind if isinstance(kind, str) else type(obj).__name__.removeprefix("Dask")


def keep_all(objs: Any) -> None:
    """:func:`keep_alive` for each of ``objs`` (what an earlier pickling collected)."""
    into = _keeping.into
    if into is not None:
        for obj in objs:
            into[id(obj)] = obj


class _MapResults(threading.local):
    on = False


_map_results = _MapResults()


class sending_map_results:
    """``with sending_map_results():`` (a worker packing a map chunk's results) a helper
    that this process made inside the task refuses to be pickled (``_Helper.__reduce__``):
    its task ended and released it, so the notebook could not open it, and loading the
    chunk failed on it, every item of the chunk with it (with ``errors="collect"`` too).
    Refused here, it is that one result that cannot be sent, named as any other is.
    (Not a ``%%parallel`` rank's value: a ``--keep`` rank's helpers outlive its cell.)"""

    __slots__ = ("was",)

    def __enter__(self) -> None:
        self.was = _map_results.on
        _map_results.on = True

    def __exit__(self, *exc: object) -> None:
        _map_results.on = self.was


def sending_map_results_now() -> bool:
    """Is this thread packing a map chunk's results (:class:`sending_map_results`)?"""
    return _map_results.on


class keeping:
    """``with keeping(kept):`` objects pickled in this thread meanwhile that call
    :func:`keep_alive` go into the dict ``kept`` (by id). Nests: the outer
    collection is restored after (and gets nothing of the inner one)."""

    __slots__ = ("into", "outer")

    def __init__(self, into: dict[int, Any]) -> None:
        self.into = into

    def __enter__(self) -> dict[int, Any]:
        self.outer = _keeping.into
        _keeping.into = self.into
        return self.into

    def __exit__(self, *exc: Any) -> None:
        _keeping.into = self.outer


def _reduce_open_file(f: io.TextIOWrapper) -> tuple:
    """An open text file: refused, never sent as a copy.

    cloudpickle sends a file open for reading as an ``io.StringIO`` of its
    contents, so a task's ``write()`` went into that copy and the file stayed
    unchanged: lost data, without a word. Binary files are refused by pickle
    itself; text files now are too, and the error names the variable and says
    to pass the path (:func:`advice_for`). The process's own ``sys.stdout`` and
    ``sys.stderr`` (and ``sys.__stdout__``, ``sys.__stderr__``) go by name: a
    :class:`TaskStream`, the task's own stream.
    """
    for name in ("stdout", "stderr"):
        if f is getattr(sys, name, None) or f is getattr(sys, f"__{name}__", None):
            return TaskStream, (name,)
    raise TypeError(f"cannot pickle '{type(f).__module__}.{type(f).__qualname__}' object: an open file "
                    f"({getattr(f, 'name', '?')!r}) works only in the process that opened it")


class TaskStream:
    """The notebook's ``sys.stdout`` / ``sys.stderr`` in a task: whatever the
    task's own stream is when it is used (a function's default argument, a
    ``functools.partial(print, file=sys.stderr)``), so it prints in the task as
    serial code prints in the notebook. The function is loaded before its task
    captures the streams: the stream itself, looked up then, was the worker's
    terminal."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr == "_name":  # (not set yet: copy and unpickling look before __init__)
            raise AttributeError(attr)
        return getattr(getattr(sys, self._name), attr)

    def __reduce__(self) -> tuple:
        return TaskStream, (self._name,)

    def __repr__(self) -> str:
        return f"<the task's sys.{self._name}>"


def _reduce_notebook_stream(stream: Any) -> tuple:
    """ipykernel's ``OutStream`` (a notebook's ``sys.stdout`` / ``sys.stderr``): the
    task's own stream, not a copy of the kernel's session (an HMAC key: refused)."""
    name = "stderr" if stream is sys.stderr or getattr(stream, "name", None) == "stderr" else "stdout"
    return TaskStream, (name,)


def _reduce_memoryview(view: memoryview) -> tuple:
    """A memoryview, sent with its format and shape.

    cloudpickle sends one as plain ``bytes``: ``view[1]`` of a view of
    ``numpy.arange(4)`` read byte 1 (0) instead of element 1 (1), silently.
    It travels as its bytes (C order) and is cast back, writable if it was.
    A format ``memoryview.cast`` cannot make (non-native byte order, float16,
    structured) is refused in words rather than sent as something else.
    """
    fmt = view.format
    if len(fmt.lstrip("@")) != 1 or fmt.lstrip("@") not in _CASTABLE:
        raise TypeError(f"cannot pickle a memoryview of format {fmt!r} with its format (only native "
                        "single-character formats can be rebuilt)")
    shape = view.shape or ()
    if 0 in shape and view.ndim > 1:
        raise TypeError(f"cannot pickle an empty {view.ndim}-dimensional memoryview (shape {view.shape}) with its "
                        "shape")
    return _rebuild_memoryview, (view.tobytes(), fmt, view.shape, view.readonly)


_CASTABLE = frozenset("bBhHiIlLqQnNfd?cP")  # the formats memoryview.cast accepts


def _rebuild_memoryview(data: bytes, fmt: str, shape: tuple, readonly: bool) -> memoryview:
    """The memoryview :func:`_reduce_memoryview` sent: same format, shape, elements."""
    view = memoryview(data if readonly else bytearray(data)).cast("B")
    cast: Any = view.cast  # (typeshed lists each format literal; ours is one of them at run time)
    return cast(fmt) if len(shape) == 1 else cast(fmt, list(shape))  # (cast takes no 0 in a shape)


def _is_ipython_exit(obj: Any) -> bool:
    """IPython's ``exit``/``quit`` (an ``ExitAutocall``; ipykernel's subclass too),
    looked up, never imported here."""
    autocall = sys.modules.get("IPython.core.autocall")
    cls = getattr(autocall, "ExitAutocall", None)
    return cls is not None and isinstance(obj, cls)


def _exit_name(obj: Any) -> str:
    """"quit" when ``obj`` is the notebook's ``quit``, else "exit"."""
    try:
        return "quit" if obj._ip.user_ns.get("quit") is obj else "exit"
    except Exception:
        return "exit"


def _worker_exit(name: str) -> Any:
    """A task's ``exit``/``quit``: the worker's builtin (site's, or a setup's ``exit = ...``), or ``sys.exit``."""
    import builtins

    found = getattr(builtins, name, None)
    return found if found is not None else sys.exit


class WorkerExit:
    """Stands for the notebook's ``exit`` or ``quit`` (IPython's, one object for both) sent
    under that ``name``: the worker's own of that name (:func:`_worker_exit`). Pickled as
    the object alone it was always ``quit``, also for a task's ``exit`` (so a setup's
    ``exit = False`` was not what the task read, as serially)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _worker_exit, (self.name,)


def worker_exit_for(name: str, value: Any) -> Any:
    """``value`` sent as the global ``name``: a :class:`WorkerExit` for IPython's ``exit``/``quit``."""
    if name in ("exit", "quit") and _is_ipython_exit(value):
        return WorkerExit(name)
    return value


_PIPE_REFUSAL = "a Pipe end is a file descriptor of this process"


def _refuse_pipe(conn: Any) -> tuple:
    """A ``multiprocessing.Pipe()`` end: refused. Pickled by default it is its fd
    number, which in a worker is another of the worker's files (spawn,
    forkserver: the sends went into it, or it was closed under the worker) or
    the pipe only where the worker was forked after it was made."""
    raise TypeError(_PIPE_REFUSAL)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, with code objects keeping their filenames and the reducers above."""

    dispatch_table = ChainMap(
        {io.TextIOWrapper: _reduce_open_file, memoryview: _reduce_memoryview,
         _mp_connection.Connection: _refuse_pipe}
        | ({types.CodeType: _keeping_filename(_cloudpickle_code_reduce)} if _cloudpickle_code_reduce is not None else {}),
        cloudpickle.Pickler.dispatch_table,
    )

    def reducer_override(self, obj: Any) -> Any:
        # Called for every container pickled: the common ones leave at once
        # (and skip cloudpickle's own override, which has nothing for them).
        # Measured: a list of 100k (int, [int]) pairs pickles in 18 ms with
        # cloudpickle alone, 37 ms through this method without the early exit.
        t = type(obj)
        if t in _PLAIN_CONTAINERS:
            return NotImplemented
        if t is _LRU_WRAPPER:
            wrapped = getattr(obj, "__wrapped__", None)
            if wrapped is not None and _sent_by_value(wrapped):
                params = obj.cache_parameters()
                return _rebuild_lru_cache, (wrapped, params["maxsize"], params["typed"])
        elif t is types.FunctionType and "registry" in vars(obj) and _sent_by_value(obj):
            parts = _singledispatch_parts(obj)
            if parts is not None:  # (functools.singledispatch: its WeakKeyDictionary cache cannot go)
                attrs = {k: v for k, v in vars(obj).items() if k not in _SINGLEDISPATCH_OWN}
                return _rebuild_singledispatch, (*parts, attrs)
        elif t is types.FunctionType and "register" in vars(obj) and (
                binding := _singledispatchmethod_binding(obj)) is not None:
            # (``obj.method`` of a notebook class: Python 3.13.0's captures a WeakKeyDictionary)
            return _rebind_singledispatchmethod, (*binding, {k: v for k, v in vars(obj).items() if k != "register"})
        elif t is functools.cached_property and _sent_by_value(obj.func):
            # (a notebook class's: Python 3.11's holds an RLock, "cannot pickle '_thread.RLock' object")
            return _rebuild_cached_property, (obj.func, obj.attrname, obj.__doc__)
        elif t is functools.singledispatchmethod:
            # (a notebook class's method: Python 3.13.0's holds a WeakKeyDictionary of bound methods)
            attrs = {k: v for k, v in vars(obj).items() if k not in _SINGLEDISPATCHMETHOD_OWN}
            return _rebuild_singledispatchmethod, (obj.dispatcher, obj.func, attrs)
        elif hasattr(t, "__slots__") and not isinstance(obj, type) and _slotted_by_value_cached(t):
            return _rebuild_slotted, (t, _slotted_state(obj))
        elif t is types.MethodType and _is_shells_get_ipython(obj):
            # A notebook function's ``get_ipython`` global: the shell cannot travel,
            # and a worker has none (task_builtins.get_ipython returns None).
            return _worker_builtin, ("get_ipython",)
        elif t is types.FunctionType and obj is getattr(sys.modules.get("IPython.core.display_functions"), "display", 0):
            # IPython's display, imported in the notebook: a worker's prints the text
            # form and says where the rich one shows (task_builtins.display).
            return _worker_builtin, ("display",)
        elif "Exit" in t.__name__ and _is_ipython_exit(obj):
            # The notebook's ``exit``/``quit`` (IPython's, holding the shell): a
            # worker has its own builtins of those names.
            return _worker_exit, (_exit_name(obj),)
        elif t.__name__ == "memmap" and _memmaps.on:
            reference = memmap_reference(obj)
            if reference is not None:
                return reference
        elif isinstance(obj, type) and _sent_by_value(obj):
            classhome.sent(obj)  # (its instances coming back leave it as it is: classhome.loads)
            reduced = _keeping_qualname(obj, super().reducer_override(obj))
            if isinstance(obj, enum.EnumMeta):
                return enum_reduce(obj, _enum_members_kept(reduced))
            return reduced
        elif t is _TYPE_ALIAS and _alias_by_value(obj):
            reduced = _reduce_type_alias(obj)
            if reduced is not NotImplemented:
                return reduced
        elif t is _NEW_TYPE and _alias_by_value(obj):
            return _reduce_new_type(obj)
        return super().reducer_override(obj)

    def _dynamic_function_reduce(self, func: types.FunctionType) -> Any:
        # cloudpickle sends the globals the function's bytecode names; a magic line
        # names its globals in a string (``r = %pmap f, [x]``): those go too, so the
        # line finds them in a task (task_shell runs it there).
        reduced = super()._dynamic_function_reduce(func)
        _with_magic_line_globals(func, reduced)
        _exit_by_name(reduced)
        return reduced


def _exit_by_name(reduced: Any) -> None:
    """In cloudpickle's reduction of a function: its globals ``exit`` and ``quit`` that are
    IPython's go as the worker's own of that name (:class:`WorkerExit`)."""
    try:
        sent = reduced[2][1]["__globals__"]
    except (IndexError, KeyError, TypeError):  # (another cloudpickle's layout: the reducer's "quit" then)
        return
    for name in ("exit", "quit"):
        if name in sent:
            sent[name] = worker_exit_for(name, sent[name])


def _with_magic_line_globals(func: types.FunctionType, reduced: Any) -> None:
    """Add to cloudpickle's reduction of ``func`` the globals its ``%pmap`` lines read
    (:func:`task_shell.magic_line_names`), and the loaded submodules of those that are
    modules which the lines use as attributes (``np.linalg.norm``), as cloudpickle
    adds those of the names its code reads."""
    names, attributes = task_shell.magic_line_names(func.__code__)
    if not names:
        return
    try:
        slotstate = reduced[2][1]
        sent = slotstate["__globals__"]
    except (IndexError, KeyError, TypeError):  # (another cloudpickle's layout: those names are not sent)
        return
    namespace = func.__globals__
    for name in names:
        if name in namespace and name not in sent:
            sent[name] = namespace[name]
            value = namespace[name]
            if isinstance(value, types.ModuleType) and isinstance(slotstate.get("_cloudpickle_submodules"), list):
                prefix = value.__name__ + "."
                slotstate["_cloudpickle_submodules"] += [
                    module for module_name, module in list(sys.modules.items())
                    if module_name.startswith(prefix) and set(module_name[len(prefix):].split(".")) <= attributes]


def code_globals(code: types.CodeType) -> list[str]:
    """The globals a function of this code sends (cloudpickle's, and those its
    ``%pmap`` lines read), for the payload cache's checks; ``[]`` when cloudpickle
    does not say."""
    if _extract_code_globals is None:
        return []
    names = list(_extract_code_globals(code))
    extra, _ = task_shell.magic_line_names(code)
    return names + sorted(extra.difference(names)) if extra else names


_extract_code_globals = compat.cloudpickle_extract_code_globals()


def cloudpickle_dumps(obj: Any, buffer_callback: Any = None) -> bytes:
    """cloudpickle ``obj`` by value (functions and classes of ``__main__`` included).

    ``buffer_callback`` (pickle protocol 5) may take large buffers out of band
    (``shm.Collector`` does, for shared memory); it is reset before pickling.
    """
    if buffer_callback is not None and hasattr(buffer_callback, "reset"):
        buffer_callback.reset()
    if _by_value_names:  # (the loading process learns which modules went by value: _arrived_by_value)
        obj = _NamingByValue(tuple(_by_value_names), obj)
    with io.BytesIO() as f:
        _with_table(_Pickler, buffer_callback)(f, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
        return f.getvalue()


_table_picklers: dict[tuple, type] = {}
_TABLE_PICKLERS_KEPT = 64  # pickler classes kept: the tables in use are a handful; more were helpers' types


def _with_table(base: type, buffer_callback: Any) -> type:
    """``base``, or a subclass with reducers of its own for: ipykernel's ``OutStream``
    (the notebook's ``sys.stdout``: the task's own, :class:`TaskStream`), a strided view of a
    ``share()`` array (when ``buffer_callback`` is a lending ``shm.Collector`` and
    such arrays exist: it travels by reference, ``shm._reduce_array``), and a
    file-backed ``np.memmap`` inside ``memmaps_by_reference()`` (as its file's name,
    :func:`memmap_reference`; plain pickle has no ``reducer_override``), and there too a
    numpy view or ``get_obj()`` of a Value's or Array's data (as the helper and the
    view's place in it, :func:`helper_reference`)."""
    lent = buffer_callback.dispatch_table() if isinstance(buffer_callback, shm.Collector) else None
    # (plain pickle refuses the notebook's stream: cloudpickle's turn)
    out_stream = (getattr(sys.modules.get("ipykernel.iostream"), "OutStream", None)
                  if base is not pickle.Pickler else None)
    np = sys.modules.get("numpy") if _memmaps.on else None
    helpers = _memmaps.on and bool(_helper_memory)
    if not lent and out_stream is None and np is None and not helpers:  # (no table to build: each result a worker sends)
        return base
    table = dict(lent or {})
    if out_stream is not None:
        table[out_stream] = _reduce_notebook_stream
    if np is not None:
        table[np.memmap] = _reduce_memmap
    if helpers:  # (views of a Value's or Array's data, and get_obj(): by reference, helper_reference)
        if np is not None:
            table[np.ndarray] = _reduce_by_reference_lent if np.ndarray in table else _reduce_by_reference
        for ctype in _helper_index().ctypes_types:
            table[ctype] = _reduce_by_reference
    key = (base, *table.items())
    cls = _table_picklers.get(key)
    if cls is None:
        if len(_table_picklers) >= _TABLE_PICKLERS_KEPT:  # (each new set of helpers' ctypes types makes a key)
            _table_picklers.clear()
        own = getattr(base, "dispatch_table", copyreg.dispatch_table)  # (a C Pickler has none: copyreg's)
        cls = _table_picklers[key] = type(base.__name__, (base,), {"dispatch_table": ChainMap(table, own)})
    return cls


def dumps_data(obj: Any, buffer_callback: Any = None) -> bytes:
    """Pickle data for another process: plain pickle if portable, else cloudpickle.

    ``buffer_callback`` as in :func:`cloudpickle_dumps`.
    """
    if _by_value_marks and any(compat.module_initializing(m) for m in _by_value_modules):
        # A plain pickle of a class of a module still importing imports it: that
        # waits for the import (the notebook's thread waiting on this run) forever.
        return cloudpickle_dumps(obj, buffer_callback)
    if _arrived and any(name not in sys.modules for name in _arrived):
        # (a worker) A plain pickle of a class of a module that came by value imports
        # that module here, running its top level again: cloudpickle sends it by value.
        return cloudpickle_dumps(obj, buffer_callback)
    try:
        pickler = _with_table(pickle.Pickler, buffer_callback)
        if pickler is pickle.Pickler:
            data = pickle.dumps(obj, PROTOCOL, buffer_callback=buffer_callback)
        else:
            with io.BytesIO() as f:
                pickler(f, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
                data = f.getvalue()
    except Exception:
        return cloudpickle_dumps(obj, buffer_callback)
    if _only_atoms(obj, len(data)):
        return data
    if _MAIN_MARKER in data or _PIPE_MARKER in data or (_by_value_marks and _names_running_module(data)):
        # By-reference to notebook code (or a module sent by value): send the definitions by value.
        # (A Pipe end: cloudpickle refuses it.)
        return cloudpickle_dumps(obj, buffer_callback)
    return data


class _NotPlain(Exception):
    """Raised by :class:`_PlainPickler` at the first object that is not a plain value."""


class _PlainPickler(pickle.Pickler):
    """A plain pickler that gives up at the first object outside pickle's own
    fast path: the C pickler writes ``None``, ``bool``, ``int``, ``float``,
    ``bytes``, ``str``, ``bytearray`` and the exact builtin ``list``, ``tuple``,
    ``dict``, ``set`` and ``frozenset`` itself and asks ``reducer_override``
    about everything else (a subclass, a class, a function, any other object).

    So a finished dump is the proof that the data is plain values in builtin
    containers, made by the pickling itself: a check of each element's type
    before pickling (``all_atoms``) cost ~30 ns an element, three times the
    pickling of a small int (a 100,000-tiny-item map spent ~2.5 ms of the
    notebook's time and as much in the workers on it)."""

    def reducer_override(self, obj: Any) -> Any:
        raise _NotPlain


def dumps_plain(obj: Any) -> bytes | None:
    """:func:`dumps_data` of ``obj`` if it is plain values in builtin containers
    (:class:`_PlainPickler`), else None (the caller's general path).

    Such values lend no buffer, keep no helper alive and name no code (no
    global at all: a str that merely contains ``__main__`` is data, which is
    why no ``_MAIN_MARKER`` scan is needed), so they need nothing around them:
    no dispatch table, no cloudpickle fallback, no ``keeping``, no memmap sent by
    reference, no buffer lent (``shm.dumps_lent``). (~0.75 us for a 1-item list,
    0.57 us more than ``pickle.dumps``; ~8 ns an int item, as ``pickle.dumps``.)
    """
    f = io.BytesIO()
    try:
        _PlainPickler(f, PROTOCOL).dump(obj)
    except _NotPlain:
        return None
    except Exception:  # (too deeply nested: RecursionError...) the general path says what
        return None
    return f.getvalue()


def dumps_atoms(items: Any) -> bytes | None:
    """:func:`dumps_plain` of a chunk of items, a ``range`` included (a map's
    usual chunk): None for anything else.

    A short list or tuple of :data:`_ATOMS` (a warm small map's chunk) goes by
    ``pickle.dumps``: the same bytes (the C pickler writes atoms in builtin
    containers itself, asking no ``reducer_override``), without making a
    :class:`_PlainPickler` and its stream (~1 us a chunk). Longer chunks are
    not checked first (see :class:`_PlainPickler`: the check costs more than
    the pickling per element)."""
    kind = type(items)
    if kind is range:
        return pickle.dumps(items, PROTOCOL)  # (a global: builtins.range)
    if (kind is list or kind is tuple) and len(items) <= _FEW_ATOMS and all_atoms(items):
        return pickle.dumps(items, PROTOCOL)
    return dumps_plain(items)


# A chunk of at most this many items is checked for atoms before it is pickled (dumps_atoms).
_FEW_ATOMS = 16


def _only_atoms(obj: Any, nbytes: int) -> bool:
    """True when ``obj`` is a list or tuple of :data:`_ATOMS` whose pickle of
    ``nbytes`` is large per element: it names no ``__main__`` code, so
    :func:`dumps_data` skips its scan. False (scan) when unsure or not worth it."""
    t = type(obj)
    if (t is not list and t is not tuple) or nbytes < _ATOMS_MIN_BYTES * max(1, len(obj)):
        return False
    return all_atoms(obj)


def all_atoms(items: Iterable[Any]) -> bool:
    """Is every element of ``items`` a plain value (:data:`_ATOMS`: ``int``,
    ``float``, ``str``, ``bytes``, ``bytearray``, ``bool``, ``None``)? Such
    values lend no buffer, keep no helper alive and name no code (a str only
    *equal* to ``"__main__"`` aside): a plain pickle is all they need. The one
    check the fast paths share (a C loop: no Python-level step per element)."""
    return all(map(_ATOMS.__contains__, map(type, items)))


# --------------------------------------------------------------------------
# File-backed numpy memmaps: sent as a reference the worker opens again


class _MemmapsByReference(threading.local):
    on = False


_memmaps = _MemmapsByReference()


class memmaps_by_reference:
    """``with memmaps_by_reference():`` a file-backed ``np.memmap`` (or a view of
    one) pickled in this thread meanwhile travels as its file's name and place
    (:func:`memmap_reference`), not its bytes: whoever loads it maps the same
    file again; a numpy view or ``get_obj()`` of an ``mpmagic.Value``'s or ``Array``'s
    data travels as the helper and its place (:func:`helper_reference`). Only for
    workers on this machine (the local pool's payloads and items); a Dask worker may
    be elsewhere, and gets the bytes as before."""

    def __enter__(self) -> None:
        self._was = _memmaps.on
        _memmaps.on = True

    def __exit__(self, *exc: object) -> None:
        _memmaps.on = self._was


_MEMMAP_MODES = {"r": "r", "c": "c", "r+": "r+", "w+": "r+"}  # (w+ again would empty the file)


def memmap_reference(obj: Any) -> tuple | None:
    """``(reopen, args)`` for a file-backed memmap or view of one; None for any other.

    A 400 MB memmap captured or sent as items was pickled whole to every worker
    (two private copies each; a memmap bigger than RAM would not fit). Its
    reference is the file, where the view's bytes lie in it, its dtype, shape
    and strides and the mode: read-only (``r``) and copy-on-write (``c``) stay
    so; ``r+``/``w+`` are opened ``r+``, so a task's writes go to the file as
    they do serially. A memmap whose file is gone (or not a file) is pickled as
    before; the file must stay the same file until the workers have opened it.
    """
    import mmap

    np = sys.modules.get("numpy")
    raw, filename, mode = getattr(obj, "_mmap", None), getattr(obj, "filename", None), getattr(obj, "mode", None)
    if np is None or raw is None or not isinstance(filename, str) or mode not in _MEMMAP_MODES:
        return None
    try:
        if obj.dtype.hasobject or obj.nbytes == 0 or not os.path.isfile(filename):
            return None
        base = np.frombuffer(raw, np.uint8)
        low, high = _byte_bounds(np, obj)
        start = int(base.ctypes.data)
        if low < start or high > start + base.nbytes:
            return None
        at = (obj.offset or 0) - (obj.offset or 0) % mmap.ALLOCATIONGRANULARITY  # where numpy's mapping starts
        where = at + (low - start)
        first = int(obj.__array_interface__["data"][0]) - low  # the view's first element within [low, high)
        st = os.stat(filename)
    except Exception:  # a closed mapping, an odd subclass: its bytes travel as before
        return None
    # (the file's identity and time: a file replaced or written since makes another
    # payload, so a cached function payload is not reused with workers' old mappings)
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return _reopen_memmap, (filename, obj.dtype, obj.shape, obj.strides, where, high - low, first,
                            _MEMMAP_MODES[mode], obj.flags.writeable, stamp)


def _byte_bounds(np: Any, a: Any) -> tuple[int, int]:
    bounds = getattr(getattr(np, "lib", None), "array_utils", None)
    byte_bounds = getattr(bounds, "byte_bounds", None) or np.byte_bounds  # (numpy 2, numpy 1)
    low, high = byte_bounds(a)
    return int(low), int(high)


def _reopen_memmap(filename: str, dtype: Any, shape: tuple, strides: tuple, where: int, nbytes: int, first: int,
                   mode: Any, writeable: bool = True, stamp: tuple = ()) -> Any:
    """The memmap :func:`memmap_reference` describes, mapped again from its file (in the worker).
    (``stamp`` only tells payloads apart: see :func:`memmap_reference`.)"""
    import numpy as np

    raw: Any = np.memmap(filename, dtype=np.uint8, mode=mode, offset=where, shape=(nbytes,))
    out: Any = np.ndarray(shape, dtype, buffer=raw, offset=first, strides=strides).view(np.memmap)
    # (a view of raw's buffer, not of raw: numpy's own attributes, as memmap.__array_finalize__ sets them)
    out._mmap, out.filename, out.offset, out.mode = raw._mmap, raw.filename, where, mode
    if not writeable:
        out.flags.writeable = False
    return out


def _reduce_memmap(m: Any) -> Any:
    """A dispatch-table reducer of ``np.memmap`` (see :func:`_with_table`)."""
    return memmap_reference(m) or m.__reduce_ex__(PROTOCOL)


# --------------------------------------------------------------------------
# Views of a shared Value's or Array's memory: sent as a reference to the helper
#
# ``view = np.asarray(grid)`` (an ``mpmagic.Array``) is the shared memory itself, and
# so is ``grid.get_obj()``. Pickled by value, a task that wrote ``view[i] = x`` wrote
# into its worker's copy: the notebook's array stayed as it was (a ``%%parallel`` rank
# said nothing), and ``get_obj()``'s ctypes array type failed to load in the worker.
# Serially, and with ``multiprocessing``'s Array under fork, the writes land in the
# shared array. Inside :class:`memmaps_by_reference` (a run's payload, for workers on
# this machine) such a view travels as the helper (by name, kept alive by the run as
# any helper it names) and where in its data the view lies; the worker makes the same
# view over the helper's memory. Elsewhere (a queue's item, a result, Dask) the bytes
# travel, as ``multiprocessing`` copies an array put in its queue.

#: The data of this process's live Values and Arrays (``shared.values`` registers each
#: as it is made or opened): (first address, bytes) -> the helper, weakly.
_helper_memory: weakref.WeakValueDictionary[tuple[int, int], Any] = weakref.WeakValueDictionary()
_helper_added = 0  # registrations so far: the sorted index below is made again after one


class _HelperIndex(typing.NamedTuple):
    """The registered ranges sorted by address, and the ctypes types of the helpers'
    ``get_obj()``, as of ``added`` registrations: a look-up is a bisection, not a scan
    of every helper for each numpy array a chunk holds. A helper dropped since is found
    gone in ``_helper_memory`` (its weak entry left), so only new ones need a rebuild.
    One tuple, replaced whole: a thread never sees one part new and another old."""

    added: int
    starts: list[int]
    keys: list[tuple[int, int]]
    ctypes_types: tuple[type, ...]


_index = _HelperIndex(-1, [], [], ())


def register_helper_memory(helper: Any, address: int, nbytes: int) -> None:
    """``helper`` (a Value or Array) holds ``nbytes`` of data at ``address`` in this
    process; ``helper._view_at(dtype, shape, strides, offset, writeable)`` and
    ``helper.get_obj()`` make them again in another (see :func:`helper_reference`)."""
    global _helper_added
    if nbytes:
        _helper_memory[(address, nbytes)] = helper
        _helper_added += 1


def _helper_index() -> _HelperIndex:
    """The index of the live helpers' ranges, made again if one was registered since."""
    global _index
    index = _index
    if index.added != _helper_added:
        added = _helper_added
        live = sorted(_helper_memory.items(), key=lambda kv: kv[0][0])
        keys = [key for key, _ in live]
        types = {type(helper.get_obj()) for _, helper in live}  # (in a fixed order: the pickler cache's key)
        index = _index = _HelperIndex(added, [start for start, _ in keys], keys,
                                      tuple(sorted(types, key=lambda t: (t.__qualname__, id(t)))))
    return index


def _helper_holding(low: int, high: int) -> tuple[Any, int] | None:
    """(the live helper whose data holds the bytes [low, high), where ``low`` lies in its
    data), or None. (The live helpers' data never overlap: each is a mapping of its own.)"""
    index = _helper_index()
    i = bisect.bisect_right(index.starts, low) - 1
    if i < 0:
        return None
    start, nbytes = key = index.keys[i]
    helper = _helper_memory.get(key)
    if helper is None or not start <= low or high > start + nbytes:
        return None
    return helper, start


def in_helper_memory(address: int, nbytes: int = 1) -> bool:
    """Do the ``nbytes`` at ``address`` lie in a live Value's or Array's shared data?"""
    return bool(_helper_memory) and _helper_holding(address, address + max(1, nbytes)) is not None


def helper_reference(obj: Any) -> tuple | None:
    """``(rebuild, args)`` for a numpy array (a view) or ctypes object whose memory lies
    in a live Value's or Array's data; None for any other (pickled by value)."""
    if not _helper_memory:
        return None
    if isinstance(obj, (ctypes.Array, ctypes._SimpleCData)):
        address = ctypes.addressof(obj)
        found = _helper_holding(address, address + ctypes.sizeof(obj))
        if found is None or found[1] != address or type(found[0].get_obj()) is not type(obj):
            return None  # (a part of one, or another type over it: its bytes, as before)
        return _helper_obj, (found[0],)
    np = sys.modules.get("numpy")
    if np is None or type(obj) is not np.ndarray or not obj.size or obj.dtype.hasobject:
        return None
    try:
        first = int(obj.__array_interface__["data"][0])
    except Exception:
        return None
    low, high = shm.array_span(obj, first)
    found = _helper_holding(low, high)
    if found is None:
        return None
    helper, start = found
    return _helper_view, (helper, obj.dtype, obj.shape, obj.strides, first - start, bool(obj.flags.writeable))


def _helper_obj(helper: Any) -> Any:
    """The ctypes object :func:`helper_reference` sent: the helper's own (``get_obj()``)."""
    return helper.get_obj()


def _helper_view(helper: Any, dtype: Any, shape: tuple, strides: tuple, offset: int, writeable: bool) -> Any:
    """The numpy view :func:`helper_reference` sent, over the helper's shared data."""
    return helper._view_at(dtype, shape, strides, offset, writeable)


def _reduce_by_reference(obj: Any) -> Any:
    """A dispatch-table reducer of numpy arrays and the helpers' ctypes types (see
    :func:`_with_table`): a view of a helper's data by reference, else as before."""
    return helper_reference(obj) or obj.__reduce_ex__(PROTOCOL)


def _reduce_by_reference_lent(obj: Any) -> Any:
    """:func:`_reduce_by_reference` where the lending collector reduces numpy arrays
    (``shm._reduce_array``: a strided view of a ``share()`` array by its place)."""
    return helper_reference(obj) or shm._reduce_array(obj)


def loads(data: bytes) -> Any:
    """Load what :func:`dumps_data` or :func:`dumps_function` produced (this
    process's own classes left as they are: :mod:`mpmagic.classhome`)."""
    return classhome.loads(data)


def payload_key(data: bytes) -> bytes:
    """Content hash of a payload: equal code and captures give equal keys."""
    return hashlib.blake2b(data, digest_size=16).digest()


# --------------------------------------------------------------------------
# Modules whose top level is running: sent by value
#
# A function (or class) of an importable module goes by reference: the worker
# imports the module. While that module's top level is still running in the
# notebook (``%run -n script.py``, which puts ``script`` in ``sys.modules``;
# ``import pipeline`` whose top level calls pmap), the worker's import ran the
# whole file again: its file writes once per worker, and its own pmap
# (serially, with a note that "pmap [was] called inside a worker"). Such a
# module is registered with cloudpickle to go by value (for good: its code is
# then always the notebook's, which is also right once it finished), and a
# data pickle naming it is made again with cloudpickle (made with cloudpickle at
# once while it is still importing: a plain pickle of its class would import it,
# waiting on the import lock the notebook's thread holds, which waits on the run).

# Written in a caller's thread (send_running_modules_by_value), read by the manager
# thread packing another run (dumps_data): so copy-on-write, under a lock, rebound as
# new tuples that a reader iterates as they were (a dict iterated while another
# thread inserted raised "dictionary changed size during iteration": an unrelated
# run ended).
_by_value_lock = threading.Lock()
_by_value_names: frozenset[str] = frozenset()  # the modules registered here, by name
_by_value_modules: tuple[types.ModuleType, ...] = ()  # ... and themselves
_by_value_marks: tuple[bytes, ...] = ()  # how a pickle names each: SHORT_BINUNICODE of the name, then MEMOIZE


def send_running_modules_by_value() -> None:
    """Before a run is built (its caller's thread): have the modules whose top level
    is on this thread's stack (a ``<module>`` frame, not ``__main__``'s) pickled by
    value, not imported again by the workers. A walk up the stack (~1 us per 10 frames)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            g = frame.f_globals
            name = g.get("__name__")
            if isinstance(name, str) and name not in ("__main__", "__mp_main__") and name not in _by_value_names:
                module = sys.modules.get(name)
                if module is not None and getattr(module, "__dict__", None) is g:
                    _send_by_value(name, module)
        frame = frame.f_back  # type: ignore[assignment]


def _send_by_value(name: str, module: types.ModuleType) -> None:
    """Register ``module`` (named ``name``) to be pickled by value (see above)."""
    global _by_value_names, _by_value_modules, _by_value_marks
    with _by_value_lock:
        if name in _by_value_names:
            return
        if name not in cloudpickle.list_registry_pickle_by_value():
            cloudpickle.register_pickle_by_value(module)
        raw = name.encode()
        mark = b"\x8c" + bytes([len(raw)]) + raw + b"\x94" if len(raw) < 256 else raw
        _by_value_modules = (*_by_value_modules, module)
        _by_value_marks = (*_by_value_marks, mark)
        _by_value_names = _by_value_names | {name}


# The receiving side (a worker). The module is not imported there, so its
# classes and functions arrive by value, named after it; a plain pickle of a
# result that is an instance of one (``return Res(x)``) imported the module by
# that name to find the class, and ran its whole top level again in every
# worker. Every cloudpickle the notebook makes while such modules exist says
# their names (:class:`_NamingByValue`), and this worker's data pickles then go by
# cloudpickle, which finds no such module here and sends the class by value,
# with the id cloudpickle gave it in the notebook: loaded there, it is the
# notebook's own class again, as serial gives (``isinstance(r, module.Res)``).

_arrived: set[str] = set()  # names of modules whose code came by value (a worker's)


class _NamingByValue:
    """A pickle's top object while modules go by value: loads as ``obj``, and tells
    the loading process the names of those modules (:func:`_arrived_by_value`)."""

    __slots__ = ("names", "obj")

    def __init__(self, names: tuple[str, ...], obj: Any) -> None:
        self.names, self.obj = names, obj

    def __reduce__(self) -> tuple:
        return _arrived_by_value, (self.names, self.obj)


def _arrived_by_value(names: tuple[str, ...], obj: Any) -> Any:
    """Loading a :class:`_NamingByValue`: note the names not sent by value from here (a worker's), return ``obj``."""
    for name in names:
        if name not in _by_value_names:
            _arrived.add(name)
    return obj


def _names_running_module(data: bytes) -> bool:
    """Does a plain pickle (maybe) name a module sent by value (its classes by reference)?
    (A str item equal to its name counts too: sent with cloudpickle, only slower.)"""
    return any(mark in data for mark in _by_value_marks)


def dumps_function(func: Any, what: str = "the function", buffer_callback: Any = None) -> bytes:
    """cloudpickle a callable with everything it captures, or explain why not."""
    try:
        return cloudpickle_dumps(func, buffer_callback)
    except Exception as exc:
        raise SerializationError(explain_unpicklable(func, what, exc)) from None


def dumps_checked(obj: Any, what: str) -> bytes:
    """Like :func:`dumps_data`, with a clear error naming ``what`` on failure."""
    try:
        return dumps_data(obj)
    except Exception as exc:
        raise SerializationError(explain_unpicklable(obj, what, exc)) from None


# --------------------------------------------------------------------------
# Explaining what cannot be pickled


def dumps_queue_item(obj: Any, queue: str) -> bytes:
    """:func:`dumps_data` for an item ``put`` in a shared queue (``queue``: how messages
    name it), or one :class:`SerializationError` line naming the part of the item that
    cannot be pickled, its type and what to do, as a map's items and results say it.

    Pickle's own error (``TypeError: cannot pickle '_thread.lock' object``) named no
    part of a nested item and came from a frame of the queue's; ``multiprocessing.Queue``
    pickles in its feeder thread and drops such an item, printing a traceback there."""
    try:
        return dumps_data(obj)
    except Exception as exc:
        detail = explain_unpicklable(obj, "item", exc, item=True).split(": ", 1)[1]
        raise SerializationError(f"cannot put an item in {queue}: {detail}") from None


def _picklable(obj: Any) -> bool:
    try:
        _Pickler(io.BytesIO(), protocol=PROTOCOL).dump(obj)
        return True
    except Exception:
        return False


_GLOBAL_OPS = {"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME"}


def _code_names(code: types.CodeType) -> set[str]:
    """Global names the code (and code nested in it) reads.

    From the bytecode, not ``co_names``: that also lists attribute names, and
    ``h.conn`` must not be reported as the global ``conn``.
    """
    names = {i.argval for i in dis.get_instructions(code) if i.opname in _GLOBAL_OPS}
    names |= task_shell.magic_line_names(code)[0]  # (a %pmap line's, sent too: _with_magic_line_globals)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def sent_globals(func: Any) -> tuple[dict[str, Any] | None, set[str]]:
    """(the globals of the notebook function behind ``func``, the names of them
    sending it sends): those its code reads, and those of the notebook functions
    among them, and so on, as cloudpickle sends them. ``(None, set())`` when
    ``func`` is no function of the notebook's ``__main__`` (a module's function
    finds its globals in the module the worker imports).

    For an error that names a notebook variable the task could not find: one it
    read by a name built at run time (``eval``, ``globals()[name]``) was not sent.
    """
    while isinstance(func, (functools.partial, types.MethodType)):
        func = func.func if isinstance(func, functools.partial) else func.__func__
    if not isinstance(func, types.FunctionType) or func.__globals__.get("__name__") not in ("__main__", "__mp_main__"):
        return None, set()
    namespace = func.__globals__
    sent: set[str] = set()
    todo = [func]
    seen: set[int] = set()
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        for name in _code_names(f.__code__):
            sent.add(name)
            value = namespace.get(name)
            if isinstance(value, types.FunctionType) and value.__globals__ is namespace:
                todo.append(value)
        for cell in f.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if isinstance(value, types.FunctionType) and value.__globals__ is namespace:
                todo.append(value)
    return namespace, sent


def _children(obj: Any) -> list[tuple[str, Any]]:
    """Named parts of ``obj`` that pickling it would also pickle."""
    out: list[tuple[str, Any]] = []
    if hasattr(type(obj), "_by_name"):  # an mpmagic helper pickles by name, none of its parts (its mmap...)
        return out
    if isinstance(obj, functools.partial):
        out.append(("func", obj.func))
        out += [(f"args[{i}]", a) for i, a in enumerate(obj.args)]
        out += [(k, v) for k, v in obj.keywords.items()]
    elif isinstance(obj, types.MethodType):
        out.append(("self", obj.__self__))
        out.append((obj.__func__.__name__, obj.__func__))
    elif isinstance(obj, types.FunctionType):
        code = obj.__code__
        if obj.__closure__:
            for name, cell in zip(code.co_freevars, obj.__closure__, strict=False):
                try:
                    out.append((name, cell.cell_contents))
                except ValueError:
                    pass
        g = obj.__globals__
        for name in sorted(_code_names(code)):
            if name in g and not isinstance(g[name], types.ModuleType):
                out.append((name, g[name]))
        for i, d in enumerate(obj.__defaults__ or ()):
            out.append((f"default[{i}]", d))
        for k, d in (obj.__kwdefaults__ or {}).items():
            out.append((k, d))
    elif isinstance(obj, dict):
        out += [(repr(k), v) for k, v in list(obj.items())[:1000]]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        out += [(f"[{i}]", v) for i, v in enumerate(list(obj)[:1000])]
    elif isinstance(obj, type):
        if _sent_by_value(obj):  # (a class the workers import sends nothing of its own)
            out += [(k, v) for k, v in _class_attributes(obj)]
    elif hasattr(obj, "__dict__"):
        out += [(k, v) for k, v in vars(obj).items()]
        if _sent_by_value(type(obj)):  # a notebook class goes with its instance: `s.run -> self -> __class__ -> _lock`
            out.append(("__class__", type(obj)))
    return out


#: What a class's ``__dict__`` holds that cloudpickle does not send as it is (the
#: class makes them again, or cloudpickle sends them its own way).
_CLASS_MADE = frozenset({"__dict__", "__weakref__", "_abc_impl", "_abc_registry", "_abc_cache", "_abc_negative_cache",
                         "_abc_negative_cache_version"})


def _class_attributes(cls: type) -> list[tuple[str, Any]]:
    """``(name, value)`` of the attributes a notebook class sends with itself
    (``_lock`` of ``class Svc: _lock = threading.Lock()``), for the path to what
    cannot be pickled: without them the path ended at the class, and the
    advice for a type ("create it inside the function") did not fit. Its data
    first, its methods after: a method that names the class fails through the
    class's data too, and the path should end at the data."""
    attributes = [(k, v) for k, v in vars(cls).items()
                  if k not in _CLASS_MADE and not isinstance(v, (types.MemberDescriptorType, types.GetSetDescriptorType))]
    return sorted(attributes, key=lambda kv: isinstance(kv[1], _CODE_ATTRIBUTES))


_CODE_ATTRIBUTES = (types.FunctionType, classmethod, staticmethod, property)


def find_unpicklable(obj: Any, root: str, max_depth: int = 6, chain: list | None = None) -> tuple[str, Any] | None:
    """Depth-first search for the innermost part that cannot be pickled.

    Returns ``("query -> conn", <the object>)`` or None when every part on its
    own pickles (the failure then comes from ``obj`` itself). ``chain``, if
    given, receives the objects along that path, outermost first.
    """
    seen: set[int] = set()

    def walk(o: Any, path: str, depth: int) -> tuple[str, Any] | None:
        if id(o) in seen or depth > max_depth:
            return None
        seen.add(id(o))
        for name, child in _children(o):
            if _picklable(child):
                continue
            deeper = walk(child, f"{path} -> {name}", depth + 1)
            if chain is not None:
                chain.insert(0, child)
            return deeper or (f"{path} -> {name}", child)
        return None

    return walk(obj, root, 0)


def _root_name(obj: Any, what: str) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if isinstance(obj, functools.partial):
        name = f"partial({getattr(obj.func, '__name__', 'func')})"
    return name or what


def _type_name(obj: Any) -> str:
    """``module.QualName`` of the object's type. A C extension's type may carry its
    module in its qualname already (torch's ScriptFunction: ``torch.jit`` and
    ``torch.jit.ScriptFunction``): not named twice."""
    module, qualname = str(type(obj).__module__), str(type(obj).__qualname__)
    if qualname.startswith(module + "."):
        return qualname
    return f"{module}.{qualname}".removeprefix("builtins.")


def _too_deep(exc: BaseException | None) -> bool:
    """Whether pickling failed on nesting deeper than the recursion limit."""
    return isinstance(exc, RecursionError) or "deep recursion" in str(exc)


def _too_deep_advice(verb: str = "send") -> str:
    """What to do with a structure nested too deeply to pickle: pickle takes one
    level of the recursion limit per level of nesting, on top of the calls
    already running (so ~600 levels fail under the default 1,000), and the
    workers run with the notebook's limit (``context``), so raising it there
    is a way out as well as a flatter structure."""
    return (f"It is nested too deeply for pickle, which takes one level of Python's recursion limit "
            f"(now {sys.getrecursionlimit()}) per level of nesting: {verb} it flatter, e.g. as a list of "
            "its parts, or raise the limit in the notebook (sys.setrecursionlimit(10_000): the workers "
            "take the notebook's).")


_MEMORYVIEW = "Send the array it views (it keeps its dtype and shape), or bytes(view)."
ITERATOR_ADVICE = ("A generator or iterator is consumed where it is made: turn it into a list first "
                   "(`data = list(gen)`), or pass it to %pmap as the iterable to map over.")


def advice_for(bad: Any, exc: BaseException | None = None, item: bool = False) -> str:
    """What to do instead of sending ``bad``, by the kind of object it is.

    ``exc``: the pickling error (a structure nested too deeply gets its own
    advice); ``item``: ``bad`` is (in) an item of the input, not something a
    function captured from the notebook.
    """
    if _too_deep(exc):
        return _too_deep_advice()
    if isinstance(bad, memoryview):
        return _MEMORYVIEW
    tname = _type_name(bad).lower()
    if isinstance(bad, io.IOBase):
        return (
            "An open file belongs to this process: pass the file's path instead and open "
            "it inside the function (`with open(path) as f: ...`)."
        )
    if isinstance(bad, types.CoroutineType):
        return (
            "A coroutine is what an async function returns, and it runs only when awaited: have the "
            "task run it, e.g. return asyncio.run(fetch(x)) instead of return fetch(x)."
        )
    if isinstance(bad, (types.GeneratorType, types.AsyncGeneratorType)) or (
        hasattr(bad, "__next__") and not hasattr(bad, "__len__")
    ):
        return ITERATOR_ADVICE
    if "lock" in tname or "semaphore" in tname or "condition" in tname or "event" in tname:
        return (
            "A thread lock works only inside one process: create it inside the function, "
            "or use a lock made for processes: mpmagic.Lock()."
        )
    if any(k in tname for k in ("socket", "connection", "cursor", "session", "client", "engine")):
        return (
            "A connection is tied to this process: open it inside the function, or once "
            "per worker by caching it in a module-level global on first use."
        )
    if item:
        return ("Map over what it is made from (its data, a path, a key) and build it inside the function.")
    return (
        "Create it inside the function (or once per worker, e.g. a module-level cache "
        "filled on first use) instead of capturing it from the notebook."
    )


def mapped_input_advice(exc: SerializationError, func: Any, iterables: tuple | None) -> None:
    """The function cannot be sent because it captures a generator (an iterator) that
    is also the map's input (``pmap(k, gen)`` with ``next(gen)`` in ``k``): the advice to
    "pass it to %pmap as the iterable" is what was done. Said instead: serially each
    call takes the item the map would have read next, which workers cannot share."""
    if not iterables or not exc.args or ITERATOR_ADVICE not in str(exc.args[0]):
        return
    try:
        found = find_unpicklable(func, getattr(func, "__name__", "func"))
    except Exception:  # (advice only)
        return
    if found is None or not any(found[1] is it for it in iterables):
        return
    name = found[0].rpartition(" -> ")[2]
    exc.args = (str(exc.args[0]).replace(ITERATOR_ADVICE, (
        f"`{name}` is also the input this map reads: serially each call's next() takes the item the map would "
        "have read next, and the workers cannot share the notebook's generator. Give each call what it reads "
        f"as its item instead (pairs: zip({name}, {name}) with --star, star=True)."
    )), *exc.args[1:])


def result_advice(text: str) -> str:
    """What to return instead, for a result whose pickling failed with ``text``."""
    if "an open file" in text:
        return ("An open file stays in the worker that opened it: close it there and return its path "
                "(or what the task read from it) instead.")
    if "deep recursion" in text or "RecursionError" in text:
        return _too_deep_advice("return")
    if "a memoryview" in text:
        return "Return the array it views (it keeps its dtype and shape), or bytes(view)."
    if "is a coroutine," in text:
        return ("A coroutine is what an async function returns, and it runs only when awaited: have the task run "
                "it, e.g. return asyncio.run(fetch(x)) instead of return fetch(x).")
    if "is a generator," in text:
        return "A generator is consumed where it is made: return list(gen) instead of gen."
    if "a helper made in a task is released" in text:  # (its own advice is in the text: shared.base)
        return "Return what the task read from it (v.value, list(q)...) instead."
    return "Return plain data (numbers, strings, lists, dicts, numpy arrays) instead."


def describe_unpicklable(obj: Any, root: str, exc: BaseException, chain: list | None = None) -> tuple[str, Any]:
    """``("`query -> conn` is a sqlite3.Connection, which cannot be pickled (...)", part)``."""
    found = find_unpicklable(obj, root, chain=chain)
    path, bad = found if found is not None else (root, obj)
    return (
        f"`{path}` is a {_type_name(bad)}, which cannot be pickled "
        f"({type(exc).__name__}: {exc})",
        bad,
    )


_MP_SHARED = "should only be shared between processes through inheritance"  # multiprocessing's own refusal


#: multiprocessing objects mpmagic has no helper of its own for (the advice names one
#: that can be sent instead).
_NO_HELPER = {"Semaphore", "BoundedSemaphore", "Condition", "Barrier", "JoinableQueue"}


#: multiprocessing objects mpmagic has a helper for: (the name users know, the helper).
_HELPER_FOR = {
    "Queue": ("Queue", "mpmagic.Queue()"),
    "SimpleQueue": ("SimpleQueue", "mpmagic.Queue()"),
    "Event": ("Event", "mpmagic.Event()"),
    "Lock": ("Lock", "mpmagic.Lock()"),
    "RLock": ("RLock", "mpmagic.RLock()"),
    "Synchronized": ("Value", "mpmagic.Value(typecode, value)"),
    "SynchronizedArray": ("Array", "mpmagic.Array(typecode, values)"),
    "SynchronizedString": ("Array", "mpmagic.Array('c', data)"),
}


def _advice_for_mp_shared(parts: list) -> str:
    """A multiprocessing Queue, Value, Lock...: it reaches only the processes started
    with it, and the pool's workers were not. mpmagic's helpers are made for this;
    for what it has none of, a Manager's proxies can be sent. ``parts``: the
    objects on the path to what failed, outermost first (a Barrier fails on the
    lock of its Condition: the Barrier decides)."""
    kind = next((type(o).__name__ for o in parts if type(o).__module__.startswith("multiprocessing.")), "")
    if kind in _NO_HELPER:
        return (f"A multiprocessing {kind} reaches only the processes started with it, and mpmagic has no {kind} of "
                f"its own: a multiprocessing.Manager()'s can be sent to running workers (m = multiprocessing.Manager(), "
                f"then m.{kind}(...); each use is a round trip to the manager's process). mpmagic.Queue, Value, Array, "
                "Lock, RLock and Event are made for tasks (docs/shared.md).")
    if kind in _HELPER_FOR:
        name, helper = _HELPER_FOR[kind]
        return (f"A multiprocessing {name} reaches only the processes started with it: use {helper}, made for "
                "tasks, with the same methods (docs/shared.md).")
    return ("A multiprocessing Queue, Value, Array or Lock reaches only the processes started with it: use "
            "mpmagic's, made for tasks: mpmagic.Queue(), mpmagic.Value('i', 0), mpmagic.Array('d', n), "
            "mpmagic.Lock(), RLock(), Event() (docs/shared.md).")


def _mp_raw_advice(parts: list) -> str | None:
    """A ``multiprocessing.RawValue``/``RawArray`` or ``Value``/``Array(..., lock=False)``:
    a plain ctypes object over multiprocessing's heap (it fails on that heap's mmap,
    with no word of multiprocessing's own). The generic advice, "create it inside the
    function", would give each task a value of its own, silently: this names the
    mpmagic helper with ``lock=False`` (the typecode, and the value or length, its
    own). None for anything else. ``parts``: the objects on the path, outermost first."""
    for raw, inner in zip(parts, parts[1:], strict=False):
        if not (type(inner).__module__ == "multiprocessing.heap" and type(inner).__name__ == "BufferWrapper"):
            continue
        if isinstance(raw, ctypes.Array):
            code = getattr(raw._type_, "_type_", None)
            helper = f"mpmagic.Array({code!r}, {len(raw)}, lock=False)"
            kind, same = "RawArray (or Array(..., lock=False))", "indexing"
        else:
            code = getattr(type(raw), "_type_", None)
            helper = f"mpmagic.Value({code!r}, {getattr(raw, 'value', 0)!r}, lock=False)"
            kind, same = "RawValue (or Value(..., lock=False))", ".value"
        if not isinstance(code, str) or code not in _MPMAGIC_TYPECODES:  # (a Structure, a c_char_p...)
            return ("A multiprocessing shared ctypes object reaches only the processes started with it, and mpmagic "
                    f"shares only numbers and chars ({', '.join(_MPMAGIC_TYPECODES)}): use an mpmagic.Value or Array "
                    "per field, made in the notebook (docs/shared.md); made inside the function, each task would "
                    "have its own.")
        return (f"A multiprocessing {kind} reaches only the processes started with it: use {helper}, made for "
                f"tasks, with the same {same} (docs/shared.md). Made inside the function it would not be "
                "shared: each task would have its own.")
    return None


#: The typecodes mpmagic.Value and Array take (mpmagic.shared.values, which payload does not import).
_MPMAGIC_TYPECODES = "cu?bBhHiIlLqQfdg"


def _is_mp_manager(obj: Any) -> bool:
    """A multiprocessing.Manager() (SyncManager, or a BaseManager subclass)."""
    return any(c.__module__ == "multiprocessing.managers" and c.__name__ == "BaseManager" for c in type(obj).__mro__)


_MANAGER_ADVICE = (
    "A multiprocessing.Manager() stays in this process (its authkey is never sent): make what the tasks "
    "share with it here (q = manager.Queue(), d = manager.dict()) and use those in the function: its "
    "proxies can be sent. Or use mpmagic.Queue(), Value, Array, Lock or Event, made for tasks (docs/shared.md).")


_PIPE_ADVICE = (
    "A multiprocessing.Pipe() end works only in processes forked after it was made (no spawn or forkserver "
    "worker, nor a fork worker started before it): use mpmagic.Queue(), which reaches every worker "
    "(q.put(x) in the function, q.get() here; docs/shared.md).")


_STDLIB = os.path.dirname(functools.__file__)


def _library_function(obj: Any) -> bool:
    """A function whose code is the standard library's (functools' ``singledispatch``
    wrapper and its ``dispatch``): its closure is the library's, not the user's."""
    return isinstance(obj, types.FunctionType) and os.path.dirname(obj.__code__.co_filename) == _STDLIB


def _through_library(obj: Any, root: str, chain: list, text: str, exc: BaseException) -> str | None:
    """When the path to what cannot be pickled goes into a standard-library
    function's internals (``describe -> dispatch -> dispatch_cache -> data``,
    a dict the user never wrote), a message naming the callable the user made
    with it (``describe``, a singledispatch function) instead, with advice that
    applies; None otherwise."""
    objects = [obj, *chain]
    path = text.split("`")[1] if text.count("`") >= 2 else ""
    parts = path.split(" -> ")
    if len(parts) != len(objects) or parts[0] != root:
        return None
    k = next((i for i, o in enumerate(objects[:-1]) if _library_function(o)), None)
    if k is None:
        return None
    name, inner = " -> ".join(parts[: k + 1]), " -> ".join(parts[k + 1 :])
    func = objects[k]
    why = f"({_type_name(objects[-1])} `{inner}` cannot be pickled: {type(exc).__name__}: {exc})"
    if "registry" in vars(func) and "dispatch" in vars(func):  # functools.singledispatch
        return (f"`{name}` is a functools.singledispatch function defined in the notebook, which cannot be sent: "
                f"its dispatch cache is a WeakKeyDictionary ({type(exc).__name__}: {exc}). Define it in a module the workers can import, "
                "or map a plain function defined in the notebook that does the dispatch (if isinstance(x, int): ...)")
    if k and isinstance(objects[k - 1], _WEAK_CONTAINERS):  # (its _remove callback, a closure on a weak reference)
        return _weak_container(objects[k - 2] if k > 1 else None, " -> ".join(parts[:k]), parts[k - 1],
                               objects[k - 1], exc)
    module = func.__code__.co_filename.rsplit(os.sep, 1)[-1].removesuffix(".py")
    return (f"`{name}` is made by the standard library's {module} (its {func.__name__}), whose internals cannot be "
            f"sent {why}. Define it in a module the workers can import, or map a plain function defined in the "
            "notebook that does the same")


_WEAK_CONTAINERS = (weakref.WeakValueDictionary, weakref.WeakKeyDictionary, weakref.WeakSet)


def _weak_container(holder: Any, name: str, attr: str, container: Any, exc: BaseException) -> str:
    """The message for a weakref container on the path (``holder``'s ``attr``), which
    cannot be pickled: its ``_remove`` callback holds a weak reference. It said that
    `... -> instances -> _remove` "is made by the standard library's weakref (its
    remove)", and to define "it" in a module: neither the class nor the attribute named."""
    kind = f"weakref.{type(container).__name__}"
    why = f"which cannot be pickled: its entries are weak references ({type(exc).__name__}: {exc})"
    if isinstance(holder, type):
        cls = holder.__qualname__
        return (f"`{name}`: the class attribute {cls}.{attr} is a {kind}, {why}. {cls} is defined in the "
                f"notebook, so it is sent with its class attributes: define {cls} in a module the workers can "
                f"import (a .py file next to the notebook; a module's class is sent by name, and each worker has "
                f"its own {cls}.{attr}, as each process has), or keep the {kind} out of the class (a global of "
                "such a module)")
    if isinstance(holder, types.FunctionType) or holder is None:  # (a global or a capture of the function)
        return (f"`{name}` is a {kind}, {why}. Make it in a module the workers can import (each worker has its "
                "own, as each process has), or inside the function, rather than send the notebook's")
    owner = type(holder).__qualname__
    return (f"`{name}`: the attribute {attr} of a {owner} is a {kind}, {why}. Leave it out of what the {owner} "
            f"pickles (a __getstate__ without it, and a __setstate__ that makes a new one), or define {owner} "
            "in a module the workers can import and make the object in the function")


def explain_unpicklable(obj: Any, what: str, exc: BaseException, item: bool = False) -> str:
    """A message that names the variable, its type, its path, and the fix
    (``item``: ``obj`` is an item of the input, see :func:`advice_for`)."""
    chain: list = []
    root = _root_name(obj, what)
    text, bad = describe_unpicklable(obj, root, exc, chain)
    if any(_is_mp_manager(o) for o in chain):
        advice = _MANAGER_ADVICE
    elif _MP_SHARED in text:
        advice = _advice_for_mp_shared([obj, *chain])
    elif (raw := _mp_raw_advice([obj, *chain])) is not None:
        advice = raw
    elif isinstance(bad, _mp_connection.Connection):
        advice = _PIPE_ADVICE
    elif (inside := _through_library(obj, root, chain, text, exc)) is not None:
        return f"cannot send {what} to the workers: {inside}."
    elif bad is obj and what == "the function" and not _too_deep(exc):
        advice = _MAPPED_ITSELF_ADVICE
    else:
        advice = advice_for(bad, exc, item)
    return f"cannot send {what} to the workers: {text}. {advice}"


#: A map's callable that cannot be pickled itself (``np.frompyfunc(f, 1, 1)``, a C callable
#: made in the notebook): nothing captures it, so advice_for's "create it inside the function
#: instead of capturing it" did not apply.
_MAPPED_ITSELF_ADVICE = (
    "It is the function mapped itself: map a plain function defined in the notebook that does the same, "
    "or one that makes this callable inside the task (each call, or once per worker in a module-level "
    "cache filled on first use)."
)

