"""A task's exception in parts that always travel, and the same exception again.

:func:`capture` runs in the worker: it records the exception's type, args,
attributes (each one that pickles), notes, cause and context chain and frames
in an :class:`ExcRecord`. :func:`rebuild` runs in the notebook: it makes the
same type again without calling ``__init__`` (as pickle makes objects), so
``except HTTPError`` catches it whatever its ``__init__`` takes, and gives it
the worker's frames as its ``__traceback__`` (see ``errors.fake_traceback``).

An exception's ``__init__`` therefore runs once, at the raise, as serially:
neither side calls it again (a logging ``__init__`` logged three times, and
one that needs what only the task set up came home as a RemoteError, when a
pickle round trip checked it in the worker and ``pickle.loads`` rebuilt it in
the notebook). Only an exception that says how it pickles (a ``__reduce__``
or ``__setstate__`` of its own class, or a C constructor outside the
builtins) is also pickled whole and loaded as it says, as any pickle would:
its parts are still sent, for when that load fails or loses something.

It sits above ``payload`` (it pickles the parts) and ``errors`` (the frames,
``RemoteError``): neither of those imports it. This module imports no IPython.
"""

from __future__ import annotations

import copyreg
import logging
import pickle
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import compat, payload
from .errors import (
    FrameInfo,
    NameScope,
    RemoteError,
    extract_frames,
    fake_traceback,
    group_class,
    map_cell_frames,
    suggested_name,
    suggestion_names,
)

logger = logging.getLogger("mpmagic")


_MAX_CHAIN = 16  # causes/contexts followed per exception


@dataclass
class ExcRecord:
    """One exception, and its chain, in parts that always travel."""

    type_name: str
    message: str
    text: str  # "HTTPError: 404", as Python prints its last line
    frames: list[FrameInfo]
    whole: bytes | None = None  # the exception pickled whole, when it says how it pickles (see _pickled_whole)
    names: list[str] | None = None  # (with whole) its attributes' names, to tell a load that lost some
    type_bytes: bytes | None = None
    args_bytes: bytes | None = None
    state: dict[str, bytes] | None = None  # attributes that pickle, one by one
    notes: list[str] | None = None
    cause: ExcRecord | None = None
    context: ExcRecord | None = None
    suppress_context: bool = False
    children: list[ExcRecord] | None = None  # an ExceptionGroup's exceptions
    fields: dict[str, bytes] | None = None  # the C-level fields of a builtin base (errno, lineno, name...): see _c_fields
    name_scope: NameScope | None = None  # a NameError's "Did you mean" and the names of where it was raised: see errors.suggested_name


class UnsentArgument:
    """Stands in for an exception argument that could not be pickled in the
    worker (a lock, a connection): the exception's other arguments come home
    as they were, and ``repr``/``str`` of this one are the original's, so
    ``str(exc)`` reads as it did serially. ``type_name`` says what it was."""

    __slots__ = ("type_name", "text", "string")

    def __init__(self, value: Any) -> None:
        self.type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        self.text = _safe(repr, value)
        self.string = _safe(str, value)

    def __repr__(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.string


def _safe(show: Any, value: Any) -> str:
    try:
        return show(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _sendable(args: tuple) -> bytes:
    """``args`` pickled, each one that cannot be pickled replaced by an
    :class:`UnsentArgument` (one bad argument turned every argument into its
    repr string: ``e.args[1] == 7`` became ``'7'``)."""
    try:
        return payload.dumps_data(args)
    except Exception:
        pass
    kept = []
    for arg in args:
        try:
            payload.dumps_data(arg)
            kept.append(arg)
        except Exception:
            kept.append(UnsentArgument(arg))
    return payload.dumps_data(tuple(kept))


def _safe_str(exc: BaseException) -> str:
    return _safe(str, exc)


def capture(exc: BaseException, _depth: int = 0, _seen: dict | None = None, *,
            arguments: Callable[[types.FrameType], Any] | None = None) -> ExcRecord:
    """The parts of ``exc`` (and its chain) to send home (runs in the worker).

    An exception met twice (``raise A from B`` makes B both the cause and the
    context) gets one record, so it is one exception again in the notebook.
    ``arguments``: gives a frame's ``errors.FrameValues`` (see
    ``errors.extract_frames``), for the frames of ``exc`` and of its chain.
    """
    seen: dict[int, ExcRecord] = {} if _seen is None else _seen
    try:
        text = "".join(traceback.format_exception_only(type(exc), exc))
    except Exception:
        text = f"{type(exc).__qualname__}: {_safe_str(exc)}\n"
    rec = ExcRecord(type(exc).__qualname__, _safe_str(exc), text, extract_frames(exc.__traceback__, arguments))
    seen[id(exc)] = rec
    rec.fields = _c_fields(exc)
    rec.name_scope = suggested_name(exc)
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        rec.notes = [str(n) for n in notes]
    is_group = isinstance(exc, group_class())
    if not is_group and _pickled_whole(type(exc)):
        try:  # (not loaded back here: that would run its reconstruction, often __init__, once more)
            rec.whole = payload.dumps_data(exc)
            rec.names = sorted(_attribute_names(exc, payload))
        except Exception as why:
            logger.debug("%s not pickled whole: %s", rec.type_name, why)
            rec.whole = rec.names = None
    try:
        rec.type_bytes = payload.dumps_data(type(exc))
    except Exception as why:
        logger.debug("exception type %s cannot be sent: %s", rec.type_name, why)
    args = (exc.message,) if is_group else exc.args  # type: ignore[attr-defined]
    rec.args_bytes = _sendable(tuple(args))
    rec.state = {}
    attrs = {k: getattr(exc, k) for k in payload.slot_names(type(exc)) if hasattr(exc, k)}
    attrs.update(getattr(exc, "__dict__", {}))
    for k, v in attrs.items():
        if k == "__notes__" and rec.notes is not None:  # (a tuple or str a library set travels as it is)
            continue
        try:
            rec.state[k] = payload.dumps_data(v)
        except Exception as why:  # that attribute stays behind, the exception comes home
            logger.debug("attribute %s of %s not sent: %s", k, rec.type_name, why)
    if is_group:
        rec.children = [capture(e, _depth + 1, seen, arguments=arguments) for e in exc.exceptions]  # type: ignore[attr-defined]
    if _depth < _MAX_CHAIN:
        for link in ("__cause__", "__context__"):
            other = getattr(exc, link)
            if other is not None:
                other_rec = seen.get(id(other)) or capture(other, _depth + 1, seen, arguments=arguments)
                setattr(rec, link.strip("_"), other_rec)
    rec.suppress_context = bool(exc.__suppress_context__)
    return rec


# Fields of builtin exception types kept in C (no __dict__, no __slots__) that neither pickle's
# route (args, __dict__) nor _new_exception (no __init__) carries: OSError's errno, strerror and
# filename, SyntaxError's msg, lineno and text, ImportError's name and path, AttributeError's name
# and obj, NameError's name, UnicodeError's positions, StopIteration's value, SystemExit's code.
_SKIP_FIELDS = frozenset({"__suppress_context__", "__dict__", "args", "__traceback__", "__context__", "__cause__",
                          "message", "exceptions"})  # (BaseException's own, and a group's: rebuilt apart)
_FIELDS_OF: dict[type, tuple[str, ...]] = {}
# AttributeError.obj is the object the name was looked up on, which may be a big DataFrame: it
# comes home only if it pickles to at most this many bytes (None otherwise, as when it cannot pickle).
MAX_OBJ_BYTES = 1 << 20


def _fields_of(cls: type) -> tuple[str, ...]:
    """The C-level fields of the builtin exception classes in ``cls``'s MRO."""
    names = _FIELDS_OF.get(cls)
    if names is None:
        found: dict[str, None] = {}
        for base in cls.__mro__:
            if base.__module__ == "builtins" and issubclass(base, BaseException):
                for k, v in vars(base).items():
                    if k not in _SKIP_FIELDS and isinstance(v, (types.MemberDescriptorType,
                                                                 types.GetSetDescriptorType)):
                        found[k] = None
        names = _FIELDS_OF[cls] = tuple(found)
    return names


def _c_fields(exc: BaseException) -> dict[str, bytes] | None:
    """The C-level fields of ``exc`` that are set, pickled one by one (one that does not pickle stays behind).

    An ``OSError`` subclass whose ``__init__`` calls ``super().__init__(2, "gone")``
    and sets ``self.filename`` came home with ``errno``, ``strerror`` and
    ``filename`` None and ``str(e)`` ``"(2, 'gone')"``, and built-in
    ``AttributeError.name`` was lost to pickle (migrate14): these are put back
    in :func:`rebuild` whatever route the exception took.
    """
    out: dict[str, bytes] = {}
    for k in _fields_of(type(exc)):
        try:
            value = getattr(exc, k)
        except Exception:  # (BlockingIOError.characters_written when never set)
            continue
        if value is None:
            continue
        if k == "obj" and isinstance(exc, AttributeError) and not _small(value):
            continue  # (only up to MAX_OBJ_BYTES of it pickled, to tell)
        try:
            data = payload.dumps_data(value)
        except Exception as why:
            logger.debug("field %s of %s not sent: %s", k, type(exc).__qualname__, why)
            continue
        if k == "obj" and len(data) > MAX_OBJ_BYTES:
            continue
        out[k] = data
    return out or None


def _small(value: Any) -> bool:
    """Does ``value`` pickle to at most MAX_OBJ_BYTES? Judged first by an array's or
    frame's size, then by a plain pickle into a writer that stops it past the bound:
    a list or dict of big arrays passed the size checks (its own size is small) and
    was pickled in full on every failure, then dropped. A value plain pickle refuses
    is left to ``dumps_data`` (cloudpickle), whose size is checked after."""
    try:
        if int(getattr(value, "nbytes", 0) or 0) > MAX_OBJ_BYTES or sys.getsizeof(value) > MAX_OBJ_BYTES:
            return False
    except Exception:
        return False
    capped = _Capped()
    try:
        pickle.Pickler(capped, protocol=payload.PROTOCOL).dump(value)  # (written frame by frame: stops early)
    except _TooBig:
        return False
    except Exception:
        pass
    return True


class _TooBig(Exception):
    pass


class _Capped:
    """A pickle's file that counts what is written and stops it past MAX_OBJ_BYTES."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: Any) -> int:
        self.n += len(memoryview(data).cast("B"))
        if self.n > MAX_OBJ_BYTES:
            raise _TooBig
        return len(data)


_PICKLE_HOOKS = ("__reduce_ex__", "__reduce__", "__setstate__")
_CONSTRUCTORS = ("__new__", "__init__")


def _pickled_whole(cls: type) -> bool:
    """Does an exception of ``cls`` go home pickled whole, besides its parts?

    Only when its parts might miss something its own pickling keeps:

    * a class of its MRO other than a builtin says how it pickles
      (``__reduce__``, ``__reduce_ex__``, ``__setstate__``), or a ``copyreg``
      reducer other than tblib's (which distributed installs for every
      exception, and which rebuilds from the same parts) is registered for it;
    * its constructor is C code outside the builtins (an extension's
      exception), which may keep state that neither its args, its
      ``__dict__`` nor the builtins' C fields (``_c_fields``) hold.

    Every other exception pickles as BaseException does, ``cls(*args)`` then
    its ``__dict__``: its parts rebuild it as that would, without running its
    ``__init__`` a second time (see the module's docstring).
    """
    for name in _PICKLE_HOOKS:
        owner = next((k for k in cls.__mro__ if name in vars(k)), object)
        if owner.__module__ != "builtins":
            return True
    reducer = copyreg.dispatch_table.get(cls)
    if reducer is not None and getattr(reducer, "__module__", None) != "tblib.pickling_support":
        return True
    for k in cls.__mro__:
        if k.__module__ != "builtins":
            for name in _CONSTRUCTORS:
                method = vars(k).get(name)
                if isinstance(method, staticmethod):
                    method = method.__func__
                if method is not None and not isinstance(method, types.FunctionType):
                    return True  # (a slot wrapper or builtin: an extension type's own)
    return False


def _load_whole(rec: ExcRecord, cls: Any, args: Any) -> BaseException | None:
    """``rec``'s whole pickle loaded, if it loads here as the worker's exception:
    same type (``cls``, from the parts), args and attribute names; else None
    (the parts rebuild it). A reducer that drops attributes or changes the
    args (tblib's drops slots) is caught here."""
    try:
        back = payload.loads(rec.whole)  # type: ignore[arg-type]
        same = (
            type(back) is cls
            and bool(back.args == args)
            and sorted(_attribute_names(back, payload)) == rec.names
        )
    except Exception as why:  # (its load failed here; args holding numpy arrays cannot even be compared)
        logger.debug("could not load %s whole: %s", rec.type_name, why)
        return None
    if not same:
        logger.debug("%s pickled whole did not load back the same: rebuilt from its parts", rec.type_name)
    return back if same else None


def _attribute_names(exc: BaseException, payload: Any) -> set[str]:
    names = {k for k in payload.slot_names(type(exc)) if hasattr(exc, k)}
    return names | set(getattr(exc, "__dict__", {}))


def rebuild(rec: ExcRecord, _memo: dict | None = None) -> BaseException:
    """The exception of ``rec`` here, as its own type, with its chain and frames."""
    memo: dict[int, BaseException] = {} if _memo is None else _memo
    if id(rec) in memo:
        return memo[id(rec)]

    exc: BaseException | None = None
    cls: Any = None
    if rec.type_bytes is not None:
        try:
            cls = payload.loads(rec.type_bytes)
        except Exception as why:
            logger.debug("could not load the type %s: %s", rec.type_name, why)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        args = _load_args(rec)
        if rec.whole is not None and args is not None:
            exc = _load_whole(rec, cls, args)
        if exc is None and args is not None:
            exc = _new_exception(cls, args, rec, payload, memo)
    if not isinstance(exc, BaseException):
        exc = RemoteError(rec.type_name, rec.message)
    else:
        _keep_qualname(type(exc), rec.type_name)
        for k, v in (rec.fields or {}).items():
            try:
                _restore(exc, k, payload.loads(v), rec)
            except Exception as why:  # (a field's value that does not load here)
                logger.debug("field %s of %s not restored: %s", k, rec.type_name, why)
    memo[id(rec)] = exc
    if rec.notes is not None:
        _restore(exc, "__notes__", list(rec.notes), rec)
    frames = map_cell_frames(rec.frames)
    for cell in {mapped.filename for mapped, sent in zip(frames, rec.frames, strict=True) if mapped is not sent}:
        compat.parse_magic_cell(cell)  # (a rank's frame: IPython reads its failing expression and variables there)
    _restore(exc, "__traceback__", fake_traceback(frames, *_last_names(exc, rec)), rec)
    if rec.cause is not None:
        _restore(exc, "__cause__", rebuild(rec.cause, memo), rec)
    if rec.context is not None:
        _restore(exc, "__context__", rebuild(rec.context, memo), rec)
    _restore(exc, "__suppress_context__", rec.suppress_context, rec)
    return exc


def _last_names(exc: BaseException, rec: ExcRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    """The globals and variables, with their values, the copy of the last frame of
    ``exc``, a NameError, has (see ``errors.fake_traceback``): the one serial Python
    suggests there, or enough names that Python suggests none, as serially (the copy's
    own few names and the builtins may hold a near one): ``errors.suggestion_names``."""
    wrong = getattr(exc, "name", None)
    if not isinstance(exc, NameError) or not isinstance(wrong, str):
        return {}, {}
    return suggestion_names(wrong, rec.name_scope)


def _keep_qualname(cls: type, qualname: str) -> None:
    """Give ``cls`` the qualified name it had in the worker (``rec.type_name``).

    A class the worker made (one defined inside the task's function) travels
    by value, and cloudpickle rebuilds it with its ``__name__`` as its
    ``__qualname__``: ``Local``, where serially it is ``f.<locals>.Local``.
    ``%pdebug`` tells the worker's failure from another by the qualified
    name, and tracebacks show it: the worker's is put back. A class that
    kept its own (imported, or the notebook's, which comes back as itself)
    is left as it is.
    """
    if cls.__qualname__ == qualname or "." not in qualname or qualname.rsplit(".", 1)[1] != cls.__name__:
        return
    try:
        cls.__qualname__ = qualname
    except (TypeError, AttributeError) as why:  # (a builtin or extension type: never rebuilt by value)
        logger.debug("qualname of %s not restored: %s", qualname, why)


def _restore(exc: BaseException, name: str, value: Any, rec: ExcRecord) -> None:
    """Set ``exc.name`` past the class's own ``__setattr__``, as ``raise`` sets
    ``__traceback__`` and ``__cause__``: a frozen dataclass exception, or one
    whose ``__setattr__`` always raises, comes home as itself (the class's
    refusal escaped from mpmagic and replaced the task's exception)."""
    try:
        BaseException.__setattr__(exc, name, value)
    except Exception as why:  # (the exception comes home without it)
        logger.debug("%s of %s not restored: %s", name, rec.type_name, why)


def _load_args(rec: ExcRecord) -> tuple | None:
    """The args of ``rec``'s exception, or None if they do not load here."""
    try:
        args = payload.loads(rec.args_bytes) if rec.args_bytes else ()
    except Exception as why:
        logger.debug("could not load the args of %s: %s", rec.type_name, why)
        return None
    return args if isinstance(args, tuple) else None


def _new_exception(cls: Any, args: tuple, rec: ExcRecord, payload: Any, memo: dict) -> BaseException | None:
    """``cls`` made without calling ``__init__`` (as pickle makes objects), then
    given the args and attributes the worker's exception had."""
    try:
        if rec.children is not None:
            exc = cls.__new__(cls, args[0], [rebuild(c, memo) for c in rec.children])
        else:
            exc = cls.__new__(cls, *args)
            BaseException.__setattr__(exc, "args", args)  # (a frozen dataclass's own __setattr__ refuses)
    except Exception as why:
        logger.debug("could not rebuild %s: %s", rec.type_name, why)
        return None
    slots = set(payload.slot_names(cls))
    for k, v in (rec.state or {}).items():
        try:
            value = payload.loads(v)
            if k in slots or not hasattr(exc, "__dict__"):
                object.__setattr__(exc, k, value)  # (not the class's own __setattr__)
            else:
                exc.__dict__[k] = value
        except Exception as why:
            logger.debug("attribute %s of %s not restored: %s", k, rec.type_name, why)
    return exc
