"""Exceptions mpmagic raises, and how a worker's traceback is carried home.

A task's exception is re-raised in the notebook as the *same* exception type,
with its args, attributes, notes, cause and context (``exc_record.capture``
in the worker, ``exc_record.rebuild`` here), its ``__traceback__`` made of the worker's
frames (:func:`fake_traceback`), and one note that says which item or rank
raised it. IPython then shows it as it shows a local error.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import dis
import errno
import functools
import heapq
import inspect
import io
import keyword
import linecache
import logging
import os
import re
import signal
import sys
import threading
import traceback
import types
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from .astlock import compile_tree, parse
from .callsite import MARK
from .fmt import code_snippet
from .proclimits import rlimit

logger = logging.getLogger("mpmagic")
_E = TypeVar("_E", bound=BaseException)


def group_class() -> Any:
    """``BaseExceptionGroup`` (from Python 3.11), else the ``exceptiongroup``
    backport's if it was imported (IPython 8, pytest, anyio and trio use it on
    3.10), else ``()``: nothing is a group. Looked up at each use: the backport
    may be imported after mpmagic, and mpmagic does not depend on it."""
    group = getattr(builtins, "BaseExceptionGroup", None)
    if group is None:
        group = getattr(sys.modules.get("exceptiongroup"), "BaseExceptionGroup", ())
    return group


class MPMagicError(Exception):
    """Base class of the errors mpmagic raises itself.

    In IPython they show as one clear message, without our internal frames.
    Every one survives pickle with its message and attributes (``failures``,
    ``values``, ``type_name``...), whatever its ``__init__`` takes: it travels
    from a ``ProcessPoolExecutor`` job, a logging queue or a Dask task.
    """

    def __reduce__(self) -> tuple:
        # BaseException pickles as cls(*args), and args holds only the message:
        # an __init__ with more required arguments (ParallelError's failures)
        # failed to load, and broke a ProcessPoolExecutor (BrokenProcessPool).
        return _rebuild_error, (type(self), self.args, dict(self.__dict__))

    def _render_traceback_(self) -> list[str]:
        lines = [f"{type(self).__name__}: {self}"]
        lines += list(getattr(self, "__notes__", ()))
        return lines


def _rebuild_error(cls: type[MPMagicError], args: tuple, state: dict) -> MPMagicError:
    """An unpickled :class:`MPMagicError`: its args and attributes, without calling ``__init__``."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class UsageError(MPMagicError, ValueError):
    """Bad arguments to an API function or a magic (one line, says the fix)."""


class ArgumentTypeError(UsageError, TypeError):
    """A function or iterable of the wrong type, where ``map()`` raises ``TypeError``
    (so ``except TypeError`` catches it, as around serial code); also a ``UsageError``."""


class WorkerLostError(MPMagicError):
    """A worker process died (crash, kill, out of memory) while running work."""


class RankStoppedError(MPMagicError):
    """A ``parallel`` rank still running after another rank failed was stopped, as an MPI job aborts."""

    # Set by the job that stopped it: the rank whose failure stopped it, the seconds of
    # grace the others had, and whether its kept state (--keep) went with its worker.
    cause_rank: int | None = None
    grace: float = 0.0
    kept_lost: bool = False


class TaskTimeoutError(MPMagicError, TimeoutError):
    """A task (``pmap`` item or ``parallel`` rank) ran past its ``timeout``."""


def unsafe_here(error: BaseException) -> bool:
    """Would calling the failed task again in the notebook risk the notebook itself?

    True for a task whose worker died under it (``WorkerLostError``: it may call
    ``os._exit`` or crash the interpreter), that ran past its timeout
    (``TaskTimeoutError``: it may never return), or a rank stopped because
    another failed (``RankStoppedError``: it raised nothing, and was still
    running, maybe waiting for the failed rank for ever). The one rule for what the
    notebook does not run again: ``%pdebug`` does not replay such an item or rank, and
    ``--compare``'s serial run leaves it out."""
    return isinstance(error, (WorkerLostError, TaskTimeoutError, RankStoppedError))


class SerializationError(MPMagicError):
    """Something could not be pickled to go to a worker, or to come back."""


def getattr_recursion(type_name: str, function: str | None) -> str | None:
    """Why loading a pickle failed, when it was a RecursionError in a ``__getattr__``
    (``function``: the innermost frame's function, qualified where known): a delegating
    wrapper (``return getattr(self.target, name)``) runs serially, but pickle asks the
    object it rebuilds for ``__setstate__`` before setting its attributes, and reading
    ``self.target`` there calls ``__getattr__`` again, for ever. None for any other failure."""
    if type_name != "RecursionError" or not function or function.rpartition(".")[2] != "__getattr__":
        return None
    owner = function.rpartition(".")[0].rpartition(".")[2]  # ("make.<locals>.Proxy.__getattr__": Proxy)
    rebuilt = f"a {owner}" if owner and not owner.startswith("<") else "its object"
    return (f"{function} recursed while pickle rebuilt {rebuilt} (serial code never copies it): pickle asks the "
            "new object for __setstate__ before its attributes are set, and an attribute __getattr__ reads "
            "(say self.target) is not there yet, so __getattr__ calls itself; in __getattr__, raise AttributeError "
            "for names that start with '__' (or read the attribute as self.__dict__['target'])")


def getattr_recursion_in(exc: BaseException) -> str | None:
    """:func:`getattr_recursion` for an exception at hand (its traceback's innermost
    function, qualified: "Proxy.__getattr__"): why loading a pickle raised ``exc``."""
    return getattr_recursion(type(exc).__name__, _innermost_function(exc.__traceback__))


def _innermost_function(tb: types.TracebackType | None) -> str | None:
    """The qualified name (3.11+; else the name) of the function a traceback ends in."""
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return None
    code = tb.tb_frame.f_code
    return str(getattr(code, "co_qualname", code.co_name))


def unloadable_results(what: str, exc: BaseException) -> SerializationError:
    """The error for results that came back but cannot be loaded in the notebook.

    When the loading failed with one of our own errors (a shared helper made in
    the task, released by its worker: ``SharedObjectGone``), that error's advice
    is the one to follow, not advice about importable types; so is the reason a
    class's ``__getattr__`` recursed (:func:`getattr_recursion`)."""
    if isinstance(exc, MPMagicError):
        return SerializationError(f"{what} came back from the worker but cannot be loaded in the notebook: {exc}")
    if (recursed := getattr_recursion_in(exc)) is not None:
        return SerializationError(f"{what} came back from the worker but cannot be loaded in the notebook: {recursed}.")
    if out_of_files(exc):  # (mapping its shared memory needs a descriptor for a moment: not the type's fault)
        return SerializationError(f"{what} came back from the worker but cannot be loaded in the notebook: "
                                  f"{too_many_open_files()}")
    return SerializationError(
        f"{what} came back from the worker but cannot be loaded in the notebook "
        f"({type(exc).__name__}: {exc}). Return types the notebook can import (plain data, "
        "classes defined in the notebook or in modules installed here), not ones only the workers have."
    )


def out_of_files(exc: BaseException) -> bool:
    """Did ``exc`` come from the process's (``EMFILE``) or the system's (``ENFILE``) limit on open files?"""
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


def file_limit() -> int | str:
    """The soft limit on open files (``ulimit -n``), or "?" where it cannot be read."""
    limit = rlimit("RLIMIT_NOFILE")
    return "?" if limit is None else limit


def too_many_open_files() -> str:
    """The end of a one-line message for an ``EMFILE`` in the notebook (a result to
    map, a helper to make): it names the limit and how to raise it, since the
    thing that failed is rarely the one that holds the files."""
    return (
        f"too many open files (this process may open {file_limit()} and has them all open). Close files "
        "it no longer needs, or raise the limit: `ulimit -n` before starting Jupyter, or "
        "resource.setrlimit(resource.RLIMIT_NOFILE, ...) in the notebook"
    )


def looked_up_name(exc: BaseException, key_errors: bool = True) -> str | None:
    """The variable a task's exception says it could not find: a NameError's
    name, or (``key_errors``) a KeyError's one ``str`` key (``globals()['K']``).

    Read from what the exception carries (its ``name``, its ``args``), with the
    message as a fallback for a NameError raised without a ``name``."""
    if isinstance(exc, NameError):
        name = exc.name if isinstance(getattr(exc, "name", None), str) else None
        if name is None:
            found = re.match(r"name '(\w+)' is not defined", str(exc))
            name = found.group(1) if found else None
        return name
    if key_errors and type(exc) is KeyError and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0] if exc.args[0].isidentifier() else None
    return None


#: The builtins through which code reads its globals by a name built at run time
#: (``globals()['K']``): a KeyError of other code is a dict's own, as serially.
_GLOBALS_BY_NAME = frozenset({"globals", "vars"})


def note_unsent_name(exc: BaseException, namespace: Any, sent: Any, note: Any, key_errors: bool = True) -> None:
    """Say why a task could not find a notebook variable, and how to send it.

    A task gets the notebook variables its code names (a cell's, a mapped
    function's): one read only by a name built at run time (``eval(name)``,
    ``globals()[name]``) is not sent. When the exception's missing name
    (:func:`looked_up_name`) is in the notebook's ``namespace`` and not among
    the ``sent`` names, ``note(name)`` (one line) is added to it, once. A
    KeyError only when the code reads ``globals()`` or ``vars()``: any other is a
    dict's own (``row['price']`` while the notebook has a ``price``), raised
    serially the same. Only the notebook side calls this: ``namespace`` is the notebook's.
    """
    name = looked_up_name(exc, key_errors)
    if name is None or name not in namespace or name in sent:
        return
    if type(exc) is KeyError and not _GLOBALS_BY_NAME & set(sent):
        return  # (``row['price']`` with a notebook ``price``: serially the same KeyError, nothing unsent)
    text = note(name)
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, (list, tuple)) or text not in notes:
        add_note(exc, text)


class RemoteError(MPMagicError):
    """A task raised an exception whose type cannot be loaded in the notebook.

    Only when the type itself, or one of the exception's args, cannot be
    loaded here (it comes from a module installed only on the workers), or
    the class's own ``__new__`` refuses the args; every other exception
    comes back as its own type (its ``__init__`` is not called here, so one
    that works only in the worker is no cause). Shown like any traceback
    (the worker's frames), not as one of our one-line messages.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    @property
    def _render_traceback_(self):
        # Unlike our own errors, this one shows its (worker-side) frames:
        # hasattr() is False, so IPython renders the traceback as usual
        # (unless it has no frames: see show_without_frames).
        render = self.__dict__.get("_render_without_frames")
        if render is None:
            raise AttributeError("_render_traceback_")
        return render


class ParallelError(MPMagicError):
    """One or more ranks of a ``parallel`` cell failed.

    ``failures`` maps each failed rank to its exception; ``values`` maps each
    rank that finished to its last value, so nothing computed is lost, in rank
    order (as a serial run per rank gives them; they come in as ranks finish).
    ``gathered`` maps each ``gather=`` (``--gather``) name to those ranks' values
    of it, by rank: a finished rank's variables are computed too.
    """

    def __init__(
        self,
        message: str,
        failures: dict[int, BaseException],
        values: dict[int, object] | None = None,
        gathered: dict[str, dict[int, object]] | None = None,
    ) -> None:
        super().__init__(message)
        self.failures = failures
        self.values = dict(sorted((values or {}).items(), key=lambda item: item[0]))
        self.gathered = {name: dict(sorted(by_rank.items(), key=lambda item: item[0]))
                         for name, by_rank in (gathered or {}).items()}


class ReduceError(MPMagicError):
    """``%%parallel --reduce FUNC`` raised on the ranks' values.

    The cell ran; only combining its values failed. ``values`` holds them (the
    list ``-o NAME`` stores), so nothing computed is lost; the reducer's own
    exception is the cause.
    """

    def __init__(self, message: str, values: list | None = None) -> None:
        super().__init__(message)
        self.values = values


class OneLine:
    """A ``_render_traceback_`` that shows one line (a class, not a lambda, so the
    exception still pickles): IPython shows it instead of a traceback through our code."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __call__(self) -> list[str]:
        return [self.text]


def one_line_interrupt(message: str) -> KeyboardInterrupt:
    """A KeyboardInterrupt that IPython shows as its one line (``message``), not
    as a traceback through our waiting code; its type stays KeyboardInterrupt,
    so ``except KeyboardInterrupt`` and the kernel's ``ename`` are unchanged."""
    exc = KeyboardInterrupt(message)
    exc._render_traceback_ = OneLine(f"KeyboardInterrupt: {message}")  # type: ignore[attr-defined]
    return exc


def one_line(exc: _E) -> _E:
    """``exc``, shown by IPython as its one line (``CancelledError: run 1 ...``),
    not with the frame of ours that raised it (IPython never hides the last
    frame, even with ``__tracebackhide__``). Its type stays what it is, so
    ``except CancelledError`` / ``except TimeoutError`` still catch it: for the
    everyday outcomes of our API (a cancelled run, a timeout), not for errors
    of the user's code."""
    exc._render_traceback_ = OneLine(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
    return exc


def set_interrupt_outcome(exc: BaseException, outcome: str | None) -> None:
    """Note on an interrupt what became of the run's work (``outcome``, a clause:
    "its 3 queued Dask tasks were cancelled; ..."), for the one line the magic
    shows (:func:`interrupt_outcome`). A backend whose running work cannot be
    stopped and replaced (Dask) says what it did instead."""
    if outcome:
        exc.mpmagic_outcome = outcome  # type: ignore[attr-defined]


def interrupt_outcome(exc: BaseException) -> str | None:
    """What :func:`set_interrupt_outcome` noted on ``exc``, if anything."""
    return getattr(exc, "mpmagic_outcome", None)


#: What the local pool did with an interrupted run's work (Dask says what it
#: did instead, noted on the interrupt: :func:`interrupt_outcome`).
STOPPED_OUTCOME = "the work still running was stopped and its workers replaced; the pool is ready for the next run"
#: ... when none of its work had gone to a worker yet (other runs held them all: a --bg run).
NOT_STARTED_OUTCOME = ("none of its work had started (other runs held every worker), so nothing was stopped and no "
                       "worker replaced; the pool is ready for the next run")
#: ... when work of it had run, but none was running at that moment.
IDLE_OUTCOME = ("none of its work was running at that moment, so no worker was stopped or replaced; the pool is "
                "ready for the next run")


#: How the words for an iterator a run read ahead of what finished begin (``jobs.read_past``).
MAKE_INPUT_AGAIN = "to map it again, make its input again"


def drop_read_past_note(exc: BaseException) -> None:
    """Take off ``exc`` (an item's error) the note a plain run added for its iterator
    input read ahead (``MAKE_INPUT_AGAIN``): a checkpoint's inner run reads the
    checkpoint's iterator of missing items, not the user's input, and counts in it."""
    notes = getattr(exc, "__notes__", None)
    lead = f"mpmagic: {MAKE_INPUT_AGAIN} ("
    if isinstance(notes, list):
        notes[:] = [n for n in notes if not (isinstance(n, str) and n.startswith(lead))]


def interrupt_read_past(exc: BaseException) -> str:
    """The clause :func:`run_interrupted` was given for an iterator the run read
    ahead of what finished ("; to map it again, make its input again (...)"), or ""."""
    return getattr(exc, "mpmagic_read_past", "")


def run_interrupted(what: str, exc: BaseException, read_past: str = "") -> KeyboardInterrupt:
    """The one-line KeyboardInterrupt (``"{what} interrupted: {outcome}{read_past}"``) of
    a blocking run the user interrupted while the call waited on it.

    ``what`` names the call (``mpmagic.pmap``); ``exc`` is the interrupt that
    landed in the wait, whose noted outcome (Dask's) is kept on the new one,
    so the magics over the call still say what the backend did. Without it,
    IPython showed a traceback through our waiting code (``Run.wait``) with
    an empty message, where the magic shows one line. ``read_past``: the clause
    for an iterator input read ahead of what finished (``MapJob.read_past_line``),
    kept apart from the outcome (:func:`interrupt_read_past`): a checkpoint's run
    over it says its own (its inner run's input is the checkpoint's, not the user's).
    """
    outcome = interrupt_outcome(exc)
    new = one_line_interrupt(f"{what} interrupted: {outcome or STOPPED_OUTCOME}{read_past}")
    set_interrupt_outcome(new, outcome)
    if read_past:
        new.mpmagic_read_past = read_past  # type: ignore[attr-defined]
    return new


class RemoteTraceback(Exception):
    """The text of a worker-side traceback (kept for code that reads ``.text``).

    Rebuilt exceptions no longer carry it as their cause (the cause slot keeps
    the task's own ``raise ... from``): their ``__traceback__`` holds the
    worker's frames instead, see :func:`fake_traceback`.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


# --------------------------------------------------------------------------
# Frames: what a worker's traceback is made of, and how it is shown here
#
# A worker cannot send its traceback objects (frames hold the whole stack).
# It sends (file, line, function) triples; the notebook turns them back into
# real traceback objects (the idea of tblib: run a one-line ``raise`` compiled
# with the frame's file, line and name). The rebuilt exception then carries
# the worker's frames as its own ``__traceback__``, and whoever shows it
# (IPython's VerboseTB, Python's traceback module, a debugger) renders the
# task's frames exactly as it would a local error: notebook cells as
# "Cell In[2], line 3" with their lines, repeated recursion frames collapsed,
# causes and contexts chained as Python chains them.

# Frames from these files are our machinery, not the user's code.
_INTERNAL_MARKERS = (
    "/mpmagic/worker.py",
    "/mpmagic/payload.py",
    "/mpmagic/classhome.py",
    "/mpmagic/cell.py",
    "/mpmagic/backends/dask_tasks.py",
    "/cloudpickle/",
)
# Frames kept per exception: a RecursionError has ~1000; more than this is
# never read, and each costs a compile here.
_MAX_FRAMES = 1200
#: Frames of an exception whose arguments the worker sends (``%xmode Verbose``
#: shows them in each frame's header, ``in f(x=1, y=2)``): the innermost
#: ARGUMENT_FRAMES_INNER and the outermost ARGUMENT_FRAMES_OUTER (a RecursionError's
#: thousand frames send 30: IPython shows of a recursion its outer frames, the first
#: two repeats and the last one). The others show ``<not sent>``.
ARGUMENT_FRAMES_INNER = 20
ARGUMENT_FRAMES_OUTER = 10
#: Elements of a frame's ``*args`` and items of its ``**kwargs`` sent: IPython writes
#: a value with pydoc's TextRepr, which shows 20 of a tuple's elements and 10 of a
#: dict's items (its smallest keys), then "...": one more of each tells it there are more.
STAR_ITEMS = 21
STARSTAR_ITEMS = 11
#: A frame's ``*args`` or ``**kwargs`` whose elements' reprs take up to this many
#: characters is sent whole, in its order (IPython's list of the variables of a
#: frame's line shows ``rest = (5, 6)``, ``len(rest) = 2``, a dict in its order);
#: a longer one only in part (the items above, those its header shows).
STAR_CHARS = 200


@dataclass
class FrameValues:
    """The worker's reprs of one frame's arguments, as they were when the task's
    exception was caught (what IPython reads of a local error's frames then).

    ``named``: a positional or keyword-only parameter's name to its repr (a name
    missing was not sent, or was deleted: ``<not sent>``). ``star``: the reprs of
    the elements of ``*args``, or of its first :data:`STAR_ITEMS` at least when
    they are many (see :data:`STAR_CHARS`; None: not sent, or not a tuple any
    more), ``star_len`` their number; ``starstar``: (key, repr) of the items of
    ``**kwargs``, or of its :data:`STARSTAR_ITEMS` smallest keys when they are
    many (None: not sent). Each repr is bounded (``debugging.FailureReprs``).
    """

    named: dict[str, str]
    star: list[str] | None = None
    star_len: int = 0
    starstar: list[tuple[str, str]] | None = None


def frame_values(frame: types.FrameType, take: Callable[[Any], str | None],
                 known: dict[str, str] | None = None) -> FrameValues:
    """The :class:`FrameValues` of ``frame`` (runs in the worker).

    ``take(value)`` gives a bounded repr, or None once the failure's budget for
    them is spent (the values from there on are not sent); ``known``: reprs
    already taken of the frame's locals, used as they are.
    """
    code = frame.f_code
    values = frame.f_locals
    n = code.co_argcount + code.co_kwonlyargcount
    out = FrameValues({})
    for name in code.co_varnames[:n]:
        if known and name in known:
            out.named[name] = known[name]
        elif name in values:
            text = take(values[name])
            if text is None:
                return out
            out.named[name] = text
    if code.co_flags & inspect.CO_VARARGS:
        star = values.get(code.co_varnames[n])
        n += 1
        if isinstance(star, tuple):
            out.star, out.star_len = [], len(star)
            room = STAR_CHARS
            for element in star:
                if len(out.star) >= STAR_ITEMS and room < 0:
                    break
                text = take(element)
                if text is None:
                    return out
                out.star.append(text)
                room -= len(text) + 2
    if code.co_flags & inspect.CO_VARKEYWORDS:
        starstar = values.get(code.co_varnames[n])
        if isinstance(starstar, dict) and all(type(k) is str for k in starstar):
            taken: dict[str, str | None] = {}
            room = STAR_CHARS
            for key in starstar:  # (all of it, in its order, when it is short)
                if room < 0:
                    break
                text = take(starstar[key])
                if text is None:
                    break
                taken[key] = text
                room -= len(key) + len(text) + 6
            if len(taken) < len(starstar):  # (else the smallest keys, those IPython's header shows)
                smallest = heapq.nsmallest(STARSTAR_ITEMS, starstar)
                taken = {key: taken[key] if key in taken else take(starstar[key]) for key in smallest}
            # (a key of 100 characters at most: IPython shows no more, pydoc's TextRepr.maxstring)
            out.starstar = [(key[:100], text) for key, text in taken.items() if text is not None]
    return out


@dataclass
class FrameInfo:
    """A picklable traceback frame: enough to render it where the source is."""

    filename: str
    lineno: int
    name: str
    line: str | None
    # The first line of the frame's function (its ``def``): IPython in a
    # kernel lists a frame's source from there (inspect.getsourcelines).
    first: int = 0
    # Where on its line(s) the failing expression is (Python 3.11+: the
    # ``~~^~~`` under ``1 / x``); None where Python did not record it.
    end_lineno: int | None = None
    colno: int | None = None
    end_colno: int | None = None
    # The function's parameters, as its code lists them (co_varnames order:
    # positional, keyword-only, then the names of *args and **kwargs), with
    # the counts that say which is which: IPython names the frame by them
    # ("in f(x, y)"), read from the rebuilt frame (inspect.getargvalues).
    params: tuple[str, ...] = ()
    argcount: int = 0
    kwonlycount: int = 0
    varargs: bool = False
    varkw: bool = False
    # Their values, as the worker's reprs (see ARGUMENT_FRAMES_INNER); None: not sent.
    values: FrameValues | None = None
    # Which code object ran the frame, numbered in its traceback (the first
    # one met is 0): two functions of one name, file and first line (lambdas
    # on one line) are still two, as IPython tells them apart.
    code: int = 0
    # The operation the frame failed at (see :func:`failing_op`): ``()`` a call,
    # ``[]`` a subscript, ``.name`` an attribute, ``/``, ``<``, ``in``, ``for``...;
    # None: another (a ``raise``).
    op: str | None = None
    # The code's qualified name (``Model.predict``, ``outer.<locals>.inner``; 3.11+):
    # IPython names a frame by it, from the code object where it finds no source
    # scope for the frame (a Jupyter kernel's cells); None: ``name``.
    qualname: str | None = None


#: Binary and comparison operators a rebuilt frame can fail at (see :func:`_stub`).
_BINARY_OPS = frozenset({"+", "-", "*", "@", "/", "//", "%", "**", "<<", ">>", "&", "^", "|"})
_COMPARE_OPS = frozenset({"<", "<=", "==", "!=", ">", ">="})
_CALL_OPS = frozenset({"CALL", "PRECALL", "CALL_KW", "CALL_FUNCTION_EX"})
_OTHER_OPS = {"STORE_SUBSCR": "[]=", "DELETE_SUBSCR": "del []", "GET_ITER": "for", "FOR_ITER": "for",
              "UNARY_NEGATIVE": "-", "UNARY_INVERT": "~"}


#: failing_op's answers, by code and offset (a unit's failures are often at one place;
#: reading a code's instructions takes ~50 us). Equal codes are the same bytecode.
_failing_ops: dict[tuple[types.CodeType, int], str | None] = {}


def failing_op(code: types.CodeType, lasti: int) -> str | None:
    """The kind of operation ``code`` was at (instruction offset ``lasti``) when
    its frame failed, as :attr:`FrameInfo.op` (runs in the worker; Python 3.11+).

    Why: IPython's Verbose display finds a frame's failing expression with
    ``executing``, which matches the instruction there to an expression of the
    line *of the same kind* (a ``/`` to ``x / y``, a call to ``f(x)``), and
    takes that expression's statement as the frame's: its function is the
    scope whose lines and variables are shown. A rebuilt frame that failed at a
    ``raise`` matches nothing, and on a line of two statements (``def a(x):
    return 1 / x``) stack_data then took either one's scope: the cell's lines
    around it and no variables. So the rebuilt frame fails at the same kind of
    operation (:func:`_stub`).
    """
    if sys.version_info < (3, 11):
        return None  # (no columns: executing compares the whole bytecode there, which a stub never matches)
    key = (code, lasti)
    if key not in _failing_ops:
        if len(_failing_ops) > 1000:
            _failing_ops.clear()
        _failing_ops[key] = _op_at(code, lasti)
    return _failing_ops[key]


def _op_at(code: types.CodeType, lasti: int) -> str | None:
    """:func:`failing_op`, not cached."""
    instruction = None
    for candidate in dis.get_instructions(code):  # (caches left out: a call's lasti may be one, CPython #96970)
        if candidate.offset > lasti:
            break
        instruction = candidate
    if instruction is None:
        return None
    name, arg = instruction.opname, instruction.argrepr
    if name in _CALL_OPS:
        return "()"
    if name == "BINARY_SUBSCR" or (name == "BINARY_OP" and arg == "[]"):
        return "[]"
    if name in _OTHER_OPS:
        return _OTHER_OPS[name]
    if name == "BINARY_OP" and arg.rstrip("=") in _BINARY_OPS:
        return arg.rstrip("=")  # (an augmented ``x /= y``: executing matches its ``/`` alike)
    if name == "COMPARE_OP":
        op = re.sub(r"^bool\((.*)\)$", r"\1", arg)  # (3.13: ``bool(<)`` where the result is tested)
        return op if op in _COMPARE_OPS else None
    if name == "CONTAINS_OP":
        return "in"
    if name in ("LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR") and isinstance(instruction.argval, str):
        return "." + instruction.argval + ("=" if name == "STORE_ATTR" else "")
    return None


def _params(code: types.CodeType) -> dict[str, Any]:
    """The parameter fields of :class:`FrameInfo` for the frame running ``code``."""
    varargs = bool(code.co_flags & inspect.CO_VARARGS)
    varkw = bool(code.co_flags & inspect.CO_VARKEYWORDS)
    n = code.co_argcount + code.co_kwonlyargcount + varargs + varkw
    return {"params": tuple(code.co_varnames[:n]), "argcount": code.co_argcount,
            "kwonlycount": code.co_kwonlyargcount, "varargs": varargs, "varkw": varkw}


def extract_frames(tb: types.TracebackType | None,
                   arguments: Callable[[types.FrameType], FrameValues | None] | None = None) -> list[FrameInfo]:
    """Frames of a worker-side traceback, our own machinery left out.

    ``arguments`` (the worker's, for a task's failure) gives a frame's
    :class:`FrameValues`: asked for the innermost :data:`ARGUMENT_FRAMES_INNER`
    frames first, then the outermost :data:`ARGUMENT_FRAMES_OUTER`.
    """
    kept = []
    lastis = []
    t = tb
    while t is not None:
        lastis.append(t.tb_lasti)
        t = t.tb_next
    for (frame, _), fs, lasti in zip(traceback.walk_tb(tb), traceback.extract_tb(tb), lastis, strict=False):
        if any(m in fs.filename.replace("\\", "/") for m in _INTERNAL_MARKERS):
            continue
        if MARK in frame.f_code.co_varnames:
            continue  # (the worker's item loop, copied to the map's call site: ours still, see callsite.py)
        if "__tracebackhide__" in frame.f_code.co_varnames and fs.filename.startswith(_PACKAGE_DIR):
            continue  # (ours, as IPython hides it: a pmap run serially inside a task)
        kept.append((frame, fs, lasti))
    if len(kept) > _MAX_FRAMES:  # keep the start and the end, as Python's display does
        kept = kept[: _MAX_FRAMES // 2] + kept[-_MAX_FRAMES // 2 :]
    codes: dict[int, int] = {}
    frames = [FrameInfo(fs.filename, fs.lineno or 0, fs.name, fs.line or None, frame.f_code.co_firstlineno,
                        getattr(fs, "end_lineno", None), getattr(fs, "colno", None),
                        getattr(fs, "end_colno", None),  # (3.11+ only)
                        **_params(frame.f_code), code=codes.setdefault(id(frame.f_code), len(codes)),
                        op=failing_op(frame.f_code, lasti), qualname=getattr(frame.f_code, "co_qualname", None))
              for frame, fs, lasti in kept]
    if arguments is not None:
        n = len(frames)
        inner = max(n - ARGUMENT_FRAMES_INNER, 0)
        for i in [*range(n - 1, inner - 1, -1), *range(min(ARGUMENT_FRAMES_OUTER, inner))]:
            if frames[i].params:
                frames[i].values = arguments(kept[i][0])
    return frames


def render_traceback(frames: list[FrameInfo], exc_text: str) -> str:
    """Render frames as Python's plain traceback does (notebook lines filled in here)."""
    out = ["Traceback (most recent call last):"]
    summary = traceback.StackSummary.from_list([_summary(f) for f in frames])
    out += [line.rstrip("\n") for line in summary.format()]
    out.append(exc_text.rstrip("\n"))
    return "\n".join(out)


def _summary(f: FrameInfo) -> traceback.FrameSummary | tuple:
    line = f.line or linecache.getline(f.filename, f.lineno).strip()
    if sys.version_info < (3, 11):
        return (f.filename, f.lineno, f.name, line)
    return traceback.FrameSummary(f.filename, f.lineno, f.name, line=line, end_lineno=f.end_lineno,
                                  colno=f.colno, end_colno=f.end_colno)


# Where on its line(s) a frame failed, and at what: end_lineno, colno, end_colno, FrameInfo.op
Spot = tuple[int | None, int | None, int | None, str | None]


def _failing_statements(op: str | None) -> list[str]:
    """The stub's statements (lines) that fail as the task's frame did: at an
    operation of the same kind (``op``, see :func:`failing_op`) done on the
    runner's ``__mpmagic_op__``, every operation of which raises the marker;
    else (or should it not raise) at a ``raise``. (No statement binds a name:
    a local more would leave the stub's parameters unnamed, see :func:`_stub`.)"""
    target = "__mpmagic_op__"
    fixed = {"()": f"{target}()", "[]": f"{target}[0]", "[]=": f"{target}[0] = 0", "del []": f"del {target}[0]",
             "in": f"0 in {target}", "for": f"for {target}[0] in {target}: pass", "-": f"-{target}", "~": f"~{target}"}
    name = op[1:].rstrip("=") if op and op[0] == "." else ""
    if op in fixed:
        statement = fixed[op]
    elif op in _BINARY_OPS or op in _COMPARE_OPS:
        statement = f"{target} {op} 0"
    elif op and name.isidentifier() and not keyword.iskeyword(name):
        statement = f"{target}.{name} = 0" if op.endswith("=") else f"{target}.{name}"
    else:
        return ["raise __mpmagic_exc__"]
    return [statement, "raise __mpmagic_exc__"]


def _stub(fr: FrameInfo, lineno: int, first: int, spots: list[Spot]) -> types.CodeType:
    """A function that does ``raise __mpmagic_exc__``, placed where the task's
    failing expression was, with the parameters of the task's function.

    The raise sits ``lineno - first`` lines below the code's first line, as the
    real statement sat below its ``def``, and spans the columns of the
    expression that failed: Python's traceback reads the real line from the
    file and marks those columns (``~~^~~`` under ``1 / x``), as it would for
    the task run here. Columns not known (Python 3.10, or not recorded) are
    left unknown, so no marks rather than marks in the wrong place. The
    parameters (compiled under stand-in names, then given the real ones, which
    need not be identifiers: a generator expression's ``.0``) let IPython name
    the frame as it names a local one: ``in f(x, y)``, not ``in f()``, and
    hold the worker's values under ``%xmode Verbose`` (:func:`_arguments`).

    One raise per spot of ``spots`` (the places on that line where frames of
    the traceback failed: ``f(n - 1) if n % 2 else (f(n - 1))`` has two), the
    one that runs chosen by the global ``__mpmagic_at__``, so that every
    frame of one line is one code, as serially (see :func:`fake_traceback`).
    Each fails at an operation of the kind the task's frame failed at
    (:func:`_failing_statements`), so IPython finds the same expression there.
    """
    # (positional-only: a name of theirs may be a key of **kwargs, as for f(a, /, **kw) called f(1, a=2))
    pos = [f"p{i}" for i in range(fr.argcount)] + (["/"] if fr.argcount else [])
    star = ["*v"] if fr.varargs else (["*"] if fr.kwonlycount else [])
    kwonly = [f"k{i}" for i in range(fr.kwonlycount)]
    starstar = ["**w"] if fr.varkw else []
    known = [colno is not None and end_colno is not None for _, colno, end_colno, _ in spots]
    fail = [_failing_statements(op if ok else None) for (*_, op), ok in zip(spots, known, strict=True)]
    body = ([f" {line}" for line in fail[0]] if len(spots) == 1
            else [f" if __mpmagic_at__ == {i}:\n" + "\n".join(f"  {line}" for line in lines)
                  for i, lines in enumerate(fail)])
    tree = parse(f"def f({', '.join(pos + star + kwonly + starstar)}):\n" + "\n".join(body), "<mpmagic>", "exec")
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef)
    start = lineno - first + 1
    func.end_lineno = 1
    groups = [func.body] if len(spots) == 1 else [[statement] for statement in func.body]
    for statements, (end_lineno, colno, end_colno, _) in zip(groups, spots, strict=True):
        end = start + max(0, (end_lineno or lineno) - lineno)
        col, end_col = (colno, end_colno) if colno is not None and end_colno is not None else (-1, -1)
        func.end_lineno = max(func.end_lineno, end)
        for node in (node for statement in statements for node in ast.walk(statement)):
            if isinstance(node, (ast.stmt, ast.expr)):  # (an ``if``'s test too: no instruction of the stub on another line)
                node.lineno, node.end_lineno = start, end
                node.col_offset, node.end_col_offset = col, end_col
    module = compile_tree(tree, "<mpmagic>", "exec")
    code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    return code.replace(co_varnames=fr.params) if len(fr.params) == len(code.co_varnames) else code


_stub_codes: dict[tuple, types.CodeType] = {}


def fake_traceback(frames: list[FrameInfo], last_names: dict[str, Any] | None = None,
                   last_variables: dict[str, Any] | None = None) -> types.TracebackType | None:
    """A real traceback object whose frames are ``frames`` (file, line, name).

    ``last_names``: names the last frame has, with their values (as globals of its
    stub), which Python's printer may suggest for a NameError (:func:`suggested_name`,
    :func:`suggestion_names`); ``last_variables``: names its ``f_locals`` has besides its
    parameters (Python 3.12's ``traceback`` module reads them, its excepthook does not).

    Repeats are told as serially: IPython collapses a recursion ("[... skipping
    similar frames: f at line 3 (147 times)]", stack_data's ``RepeatedFrames``)
    by each frame's code object and line, counted over the whole traceback;
    Python (``traceback.StackSummary.format``, and CPython 3.11's C printer
    behind a script's ``sys.excepthook``, which compares the code's file and
    name strings by identity) by consecutive frames of one file, line and
    name. So the frames of one function (``FrameInfo.code``) and line share one
    code object, whatever columns each failed at (a code object was made per
    distinct columns too: ``f(n - 1) if n % 2 else (f(n - 1))`` then counted as
    two groups of 72 frames where serial Python said 147, and showed an extra
    frame), with one raise per spot in it (:func:`_stub`); and file and name are
    interned strings. The stubs run in this thread's :func:`_stub_runner`, so
    that the frames hold nothing of the code that rebuilt the exception (see there).
    The last frame's globals are its own (:class:`_FrameGlobals`): the raising
    frame's other variables go there (:func:`show_captured_values`).
    """
    spots: dict[tuple, dict[Spot, int]] = {}
    placed = []
    for fr in frames:
        lineno = max(fr.lineno, 1)
        first = fr.first if 0 < fr.first <= lineno else lineno
        key = (fr.filename, lineno, fr.name, fr.qualname, first, fr.code, fr.params, fr.argcount, fr.kwonlycount,
               fr.varargs, fr.varkw)
        places = spots.setdefault(key, {})
        spot = (fr.end_lineno, fr.colno, fr.end_colno, fr.op)
        placed.append((fr, lineno, first, key, places.setdefault(spot, len(places))))
    codes: dict[tuple, types.CodeType] = {}
    head: types.TracebackType | None = None
    tail: types.TracebackType | None = None
    for k, (fr, lineno, first, key, at) in enumerate(placed):
        code = codes.get(key)
        if code is None:
            full = (*key, *spots[key])
            code = _stub_codes.get(full)
            if code is None:
                if len(_stub_codes) > 10_000:
                    _stub_codes.clear()
                name = sys.intern(fr.name)
                names: dict[str, Any] = {"co_name": name}
                if sys.version_info >= (3, 11):  # IPython names the frame by its qualified name
                    names["co_qualname"] = sys.intern(fr.qualname or name)
                stub = _stub(fr, lineno, first, list(spots[key]))
                # (An unused constant, the frame's code number: code objects compare by value, and
                # stack_data counts repeated frames in a Counter, so two functions' stubs that came
                # out alike, as on 3.10, which records no columns, were one group. Serially
                # `f = lambda n: g(n); g = lambda n: f(n - 1)` are two.)
                code = _stub_codes[full] = stub.replace(co_filename=sys.intern(fr.filename), co_firstlineno=first,
                                                         co_consts=(*stub.co_consts, ("mpmagic code", fr.code)),
                                                         **names)
            codes[key] = code
        arguments = _arguments(fr, code)
        globals_names: dict[str, Any] | None = None
        if k == len(placed) - 1:  # (globals of its own: show_captured_values adds the frame's other variables)
            globals_names = {}
            if last_names:
                arguments, globals_names = _with_self_attribute(fr, arguments, last_names)
        tb = _run_stub(code, arguments, at, globals_names)
        if tb is None:
            continue
        if k == len(placed) - 1 and last_variables:
            tb.tb_frame.f_locals.update(last_variables)  # (3.12: kept, its own variables refreshed around them)
        tb.tb_next = None
        if tail is None:
            head = tb
        else:
            tail.tb_next = tb
        tail = tb
    return head


# A frame that outlives its call keeps a strong reference to its caller's
# frame (``f_back``), and that one to its caller, with all their local
# variables: a stub run from here would keep the whole stack that rebuilt
# the exception alive as long as the exception lives (found with
# gc.get_referrers after the chaos soak: a kept task exception held the
# manager thread's reply message with its results, the worker's slot with
# its pipes, and the job with every input and result of the run). A
# suspended generator's frame has no caller, so the stubs run inside one,
# kept per thread and never finished: their ``f_back`` is that frame, which
# holds only the last stub's traceback.
_runners = threading.local()


class _WorkerValue:
    """What a rebuilt frame's parameter holds: its ``repr`` is the worker's repr
    of the value (``%xmode Verbose`` shows ``f(x=1)``), or ``<not sent>`` for a
    value the worker did not send (see :data:`ARGUMENT_FRAMES_INNER`). (Its one
    attribute has a name no task's ``self`` has: Python 3.12 suggests
    "self.text" for a NameError of ``text`` in a frame whose ``self`` has one.)"""

    __slots__ = ("_mpmagic_text",)

    def __init__(self, text: str | None = None) -> None:
        self._mpmagic_text = "<not sent>" if text is None else text

    def __repr__(self) -> str:
        return self._mpmagic_text


class _WorkerSelf(_WorkerValue):
    """The ``self`` of a rebuilt frame whose task's ``self`` had the attribute a
    NameError named (``attribute``), which this one has too (valued None), so that
    Python 3.12's printer suggests "Did you mean: 'self.total'?" there, as serially."""

    __slots__ = ("_mpmagic_attribute",)

    def __init__(self, text: str, attribute: str) -> None:
        super().__init__(text)
        self._mpmagic_attribute = attribute

    def __getattr__(self, name: str) -> Any:
        if name == self._mpmagic_attribute:
            return None
        raise AttributeError(name)


def _arguments(fr: FrameInfo, code: types.CodeType) -> tuple[list, dict, list, dict]:
    """What the stub of ``fr`` (its ``code``) is called with: positional
    arguments, keyword-only ones, then the elements of ``*args`` and the items
    of ``**kwargs``, each a :class:`_WorkerValue` holding the worker's repr."""
    values = fr.values if fr.values is not None else FrameValues({})
    named = [_WorkerValue(values.named.get(name)) for name in fr.params[:fr.argcount + fr.kwonlycount]]
    kwonly = dict(zip(code.co_varnames[fr.argcount:fr.argcount + fr.kwonlycount], named[fr.argcount:], strict=True))
    star: list = []
    if fr.varargs and values.star is not None:  # (the elements not sent, when the budget ran out: <not sent>)
        star = [_WorkerValue(values.star[i] if i < len(values.star) else None)
                for i in range(max(len(values.star), min(values.star_len, STAR_ITEMS)))]
    starstar = {key: _WorkerValue(text) for key, text in values.starstar or ()} if fr.varkw else {}
    return named[:fr.argcount], kwonly, star, starstar


def _with_self_attribute(fr: FrameInfo, arguments: tuple[list, dict, list, dict],
                         names: dict[str, Any]) -> tuple[tuple[list, dict, list, dict], dict[str, Any]]:
    """``arguments`` and ``names`` of the last frame's stub (see :func:`fake_traceback`),
    where a name ``self.total`` (what serial Python 3.12 suggests there) becomes a
    ``self`` parameter that has the attribute ``total`` (:class:`_WorkerSelf`)."""
    attributes = [name.removeprefix("self.") for name in names if name.startswith("self.")]
    if not attributes:
        return arguments, names
    positional, kwonly, star, starstar = arguments
    named = fr.params[:fr.argcount + fr.kwonlycount]
    if "self" in named:
        at = named.index("self")
        value = positional[at] if at < fr.argcount else kwonly.get("self")
        self_value = _WorkerSelf(repr(value), attributes[0])
        if at < fr.argcount:
            positional = [*positional[:at], self_value, *positional[at + 1:]]
        else:
            kwonly = {**kwonly, "self": self_value}
    return (positional, kwonly, star, starstar), {name: v for name, v in names.items() if not name.startswith("self.")}


def show_captured_values(exc: BaseException, context: dict[str, Any] | None) -> None:
    """Give the parameters of ``exc``'s innermost rebuilt frame that still show
    ``<not sent>`` the reprs the worker took of that frame's locals
    (``debugging.failure_context``), so ``%xmode Verbose`` shows ``f(x=0, y=2)``
    as for a local error (the frames' own :class:`FrameValues` have them
    already, unless the exception came as words only: a RemoteError); and so
    the frame's own variable a NameError suggests, one of its globals there
    (:func:`suggestion_names`). Its other variables become its globals
    (:func:`_show_other_variables`): Verbose lists them under the failing line.

    The frame is the worker's one whose locals were taken (``context["where"]``),
    a ``%%parallel`` body's named as its notebook cell (:func:`cell_file`)."""
    tb = exc.__traceback__
    where = (context or {}).get("where")
    captured = (context or {}).get("locals") or {}
    if tb is None or not where or not captured:
        return
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    filename, lineno, function = where
    if (tb.tb_lineno, code.co_name) != (lineno, function) or code.co_filename not in (filename, cell_file(filename)):
        return  # (not the frame whose locals were taken)
    own_builtins = tb.tb_frame.f_builtins if tb.tb_frame.f_builtins is not vars(builtins) else {}  # (see _apart_suggestions)
    try:
        for name, value in [*tb.tb_frame.f_locals.items(), *tb.tb_frame.f_globals.items(), *own_builtins.items()]:
            if (isinstance(value, _WorkerValue) and value._mpmagic_text == "<not sent>"
                    and isinstance(captured.get(name), str)):
                value._mpmagic_text = captured[name]
        _show_other_variables(exc, tb.tb_frame, captured)
    except Exception:  # (cosmetic: never an error of ours in place of the task's)
        logger.debug("mpmagic: the raising frame's values not shown", exc_info=True)


class _FrameGlobals(dict):
    """The globals of the copy of a traceback's last frame: its own (the other
    frames' copies share their runner's), so the raising frame's variables can be
    added to it (:func:`_show_other_variables`)."""


def _show_other_variables(exc: BaseException, frame: types.FrameType, captured: dict[str, Any]) -> None:
    """The worker's reprs (``captured``) of the raising frame's variables that its
    copy (``frame``) has not among its parameters or globals, added to its globals as
    :class:`_WorkerValue`: ``%xmode Verbose`` lists the variables of the failing line
    (``x = 2`` under ``return 1 / (x - 2)``), read from the frame's locals and globals,
    and the copy's locals are only the function's parameters (a ``%%parallel`` cell's
    frame, a module's, has none). A NameError keeps them only if Python's "Did you
    mean" there stays what it was (:func:`suggestion_names` chose the names it reads)."""
    shown = frame.f_globals
    if type(shown) is not _FrameGlobals:
        return  # (a frame whose globals its runner's other copies share)
    added = {name: _WorkerValue(text) for name, text in captured.items()
             if isinstance(text, str) and name not in frame.f_locals and name not in shown}
    if not added:
        return
    said = _suggested_by_both(exc) if isinstance(exc, NameError) else None
    shown.update(added)
    if isinstance(exc, NameError) and _suggested_by_both(exc) != said:
        for name in added:
            del shown[name]


def _stub_runner() -> Generator[types.TracebackType | None,
                                 tuple[types.CodeType, tuple[list, dict, list, dict], int, dict[str, Any] | None],
                                 None]:
    marker = _FrameMarker()
    tb: types.TracebackType | None = None
    namespace: dict[str, Any] = {"__mpmagic_exc__": marker, "__mpmagic_op__": _Raiser(marker), "__name__": "__main__"}
    while True:
        code, (positional, kwonly, star, starstar), namespace["__mpmagic_at__"], names = yield tb
        tb = None
        func = types.FunctionType(code, namespace if names is None else _FrameGlobals({**names, **namespace}))
        func.__defaults__ = tuple(positional)
        func.__kwdefaults__ = kwonly
        try:
            try:
                func(*positional, *star, **starstar)
            except TypeError:  # (arguments its parameters cannot take: it runs with the named ones only)
                func()
        except _FrameMarker as m:
            tb = m.__traceback__.tb_next if m.__traceback__ else None  # the stub's own frame (the first is this one)
            # The marker lives on in this generator: nothing it met may live with it
            # (raised while the caller handles an exception, it gets that as context).
            m.__traceback__ = m.__context__ = None


def _run_stub(code: types.CodeType, arguments: tuple[list, dict, list, dict], at: int = 0,
              names: dict[str, Any] | None = None) -> types.TracebackType | None:
    """The traceback of one stub (a function's code) called with ``arguments`` (see
    :func:`_arguments`) in this thread's runner, raising at its spot ``at`` (see :func:`_stub`),
    with globals of its own holding ``names`` (see :func:`fake_traceback`); None: the runner's."""
    runner = getattr(_runners, "runner", None)
    if runner is None:
        runner = _stub_runner()
        next(runner)
        _runners.runner = runner
    try:
        return runner.send((code, arguments, at, names))
    except BaseException:  # (a KeyboardInterrupt inside it ends the generator): a new one next time
        _runners.runner = None
        raise


class _FrameMarker(Exception):
    """Raised by the one-line stubs of :func:`fake_traceback`."""


class _Raiser:
    """The stubs' ``__mpmagic_op__``: calling it, indexing it, an operator or
    comparison on it, a test of ``in``, a loop over it and an attribute it has not
    (any but ``_mpmagic_marker``) raise its marker, so a stub fails at the operation
    the task's frame failed at (see :func:`_failing_statements`)."""

    __slots__ = ("_mpmagic_marker",)
    _mpmagic_marker: _FrameMarker

    def __init__(self, marker: _FrameMarker) -> None:
        object.__setattr__(self, "_mpmagic_marker", marker)

    def _fail(self, *_: Any) -> Any:
        raise self._mpmagic_marker

    def __iter__(self) -> _Raiser:
        return self  # (the loop fails at its step, FOR_ITER, which executing matches as GET_ITER)

    __call__ = __getitem__ = __setitem__ = __delitem__ = __contains__ = __getattr__ = __setattr__ = __next__ = _fail
    __neg__ = __invert__ = _fail
    __lt__ = __le__ = __eq__ = __ne__ = __gt__ = __ge__ = _fail
    __add__ = __sub__ = __mul__ = __matmul__ = __truediv__ = __floordiv__ = __mod__ = __pow__ = _fail
    __lshift__ = __rshift__ = __and__ = __xor__ = __or__ = _fail
    __hash__ = object.__hash__


# --------------------------------------------------------------------------
# Exceptions: captured in the worker, rebuilt as the same type here
#
# Pickling an exception calls ``type(exc)(*exc.args)`` on load: that fails for
# an ``__init__`` with other parameters (``HTTPError(status, *, url)``), and a
# single unpicklable attribute loses the whole exception. Pickling also drops
# ``__cause__``, ``__context__`` and the traceback. So the worker sends the
# parts (type, args, each picklable attribute, notes, chain, frames) and the
# notebook rebuilds the exception without calling ``__init__``, as pickle
# itself does for ordinary objects (so ``__init__`` runs once, at the raise;
# see ``exc_record``). Only a type or an argument that cannot be loaded here
# (or a class whose ``__new__`` refuses its args) gives a RemoteError.

class _ExceptionOnly:
    """``_render_traceback_`` of a task exception none of whose frames is the
    user's (a function that failed to load in the worker): without it IPython
    would show the one frame it never hides, ours that re-raised it."""

    def __init__(self, exc: BaseException) -> None:
        self.lines = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n").split("\n")
        notes = getattr(exc, "__notes__", None)
        if sys.version_info < (3, 11) and notes:
            self.lines += [str(n) for n in notes]

    def __call__(self) -> list[str]:
        return list(self.lines)


def add_note(exc: BaseException, note: str) -> None:
    """Add ``note`` to the notes of ``exc`` (a task's exception), never raising.

    A note of ours must not replace the user's exception with an error of ours.
    ``BaseException.add_note`` raises when ``__notes__`` is not a list (libraries
    assign a tuple or a str directly) or when the class's ``__setattr__`` refuses
    writes (a frozen dataclass). A tuple is extended as a tuple (tracebacks show
    it line by line, as a list); a str or anything else stays as it was, without
    our note; a refused write goes through ``BaseException.__setattr__``, as
    Python's own ``raise`` sets ``__traceback__`` past the class's ``__setattr__``.
    Before Python 3.11 (no ``add_note``) ``__notes__`` is set all the same: IPython 8
    and the ``exceptiongroup`` backport show it, and :func:`came_from_worker` reads it.
    """
    try:
        notes = getattr(exc, "__notes__", None)
    except Exception:  # (a class's __getattr__ that raises something else)
        notes = None
    new: Any
    if isinstance(notes, list):
        notes.append(note)
        return
    if notes is None:
        new = [note]
    elif isinstance(notes, tuple):
        new = (*notes, note)
    else:
        logger.debug("note %r not added: __notes__ of %s is a %s", note, type(exc).__name__, type(notes).__name__)
        return
    try:
        exc.__notes__ = new  # type: ignore[attr-defined]
    except Exception:
        try:
            BaseException.__setattr__(exc, "__notes__", new)
        except Exception as why:
            logger.debug("note %r not added to %s: %s", note, type(exc).__name__, why)
    if sys.version_info < (3, 11):
        _show_notes_at_top_level()


def _show_notes_at_top_level() -> None:
    """Python 3.10 prints no ``__notes__``: in a plain script, our "raised by item 3 of
    the input" line was lost. Python's own hook gives way to :func:`print_with_notes`,
    unless something else replaced it (IPython, the ``exceptiongroup`` backport: both
    show notes)."""
    if sys.excepthook is sys.__excepthook__ and "exceptiongroup" not in sys.modules:
        sys.excepthook = print_with_notes


def _notes_or_our_frames(exc: BaseException, tb: types.TracebackType | None) -> bool:
    """Has ``exc`` (raised with ``tb``), or an exception it was raised from or while
    handling, notes or a frame in mpmagic: what :func:`print_with_notes` prints its own way?"""
    todo: list[tuple[BaseException | None, types.TracebackType | None]] = [(exc, tb)]
    seen: set[int] = set()
    while todo:
        one, at = todo.pop()
        if one is None or id(one) in seen:
            continue
        seen.add(id(one))
        if getattr(one, "__notes__", None):
            return True
        while at is not None:
            if os.path.abspath(at.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
                return True
            at = at.tb_next
        todo += [(linked, linked.__traceback__) for linked in (one.__cause__, one.__context__) if linked is not None]
    return False


def print_with_notes(exc_type: type[BaseException], exc: BaseException, tb: types.TracebackType | None) -> None:
    """``sys.excepthook`` as Python 3.11 prints: each exception of the chain with its
    notes, and without mpmagic's own frames (a ``raise`` in mpmagic adds its frame on
    3.10, which the traceback cannot drop; here the print drops it).

    The notes are added only where the formatting does not print them itself: the
    ``exceptiongroup`` backport, once imported (pytest, IPython 8 and anyio import it on
    3.10), patches ``TracebackException`` to keep and print each exception's
    ``__notes__``, and adding them too printed every note twice.

    An error with neither (a script's own, after a map's failure installed the hook)
    goes to Python's printer: only it adds 3.10's "Did you mean: 'append'?" to a
    NameError or AttributeError (the ``traceback`` module does from 3.12 on); one raised
    while handling a map's error (printed here, for that error's note) gets it from
    there too (:func:`_suggestion`)."""
    if not _notes_or_our_frames(exc, tb):
        sys.__excepthook__(exc_type, exc, tb)
        return
    shown = traceback.TracebackException(exc_type, exc, tb, compact=True)
    seen: set[int] = set()
    todo = [(shown, exc)]
    while todo:
        one, value = todo.pop()
        if id(one) in seen:
            continue
        seen.add(id(one))
        one.stack = traceback.StackSummary.from_list(
            [f for f in one.stack if not os.path.abspath(f.filename).startswith(_PACKAGE_DIR + os.sep)])
        if isinstance(value, (NameError, AttributeError)) and sys.version_info < (3, 12):
            said, text = _suggestion(value), getattr(one, "_str", None) or ""
            if not text.endswith(said):  # (newer exceptiongroup backports add it themselves on 3.10)
                one._str = text + said  # type: ignore[attr-defined]
        notes = getattr(value, "__notes__", None)
        if (sys.version_info < (3, 11) and isinstance(notes, (list, tuple)) and notes
                and "__notes__" not in vars(one)):  # (as 3.11: after the message; the backport's prints its own)
            one._str = "\n".join([one._str or "", *(str(n) for n in notes)])  # type: ignore[attr-defined]
        for link, linked in ((one.__cause__, value.__cause__), (one.__context__, value.__context__)):
            if link is not None and linked is not None:
                todo.append((link, linked))
    sys.stderr.write("".join(shown.format()))


# Python offers no "Did you mean" from a list of this many names or more (3.11's C printer
# checks each of the frame's lists, locals, globals and builtins, on its own and skips one of
# 750 or more; 3.13's, and ``traceback`` from 3.12, join the three and give none past 750):
# a longer list is sent cut to this length, which is "too many" under every rule.
_MAX_SCOPE_NAMES = 751


@dataclass(frozen=True)
class NameScope:
    """What the frame that raised a NameError had, for the notebook to find the name
    Python's printer suggests there (:func:`suggested_name`, :func:`home_suggestion`).

    ``varnames``: its code's local variable names (``co_varnames``, which 3.11's printer
    checks, bound or not); ``bound``: the names of its ``f_locals`` (the bound ones, with
    its cell and free variables: 3.12's ``traceback`` and 3.13's printer check these),
    or for a module's frame (``module``: a ``%%parallel`` cell, whose locals are its
    globals) the names of its namespace; each cut to :data:`_MAX_SCOPE_NAMES`.
    ``self_has``: (3.12 on) it has a ``self`` with an attribute of the wrong name, which
    Python then suggests ("Did you mean: 'self.total'?") before any other name.
    ``listed``: what the worker's ``traceback`` module suggested (:func:`_suggested_by_both`),
    for a frame not ``main``: on Python 3.12 not always the excepthook's ``suggested``."""

    suggested: str | None = None  # what the worker's printer suggested
    main: bool = False  # a __main__ frame (the notebook's function, or cell): the notebook's globals are its globals
    module: bool = False
    varnames: tuple[str, ...] = ()
    bound: tuple[str, ...] = ()
    self_has: bool = False
    listed: str | None = None


def suggested_name(exc: BaseException) -> NameScope | None:
    """For ``exc``, a NameError, in the process that raised it (a worker:
    ``exc_record.capture``): the name Python's printer suggests there, and the names
    the frame that raised it had (:class:`NameScope`); None for another exception.

    Python makes "Did you mean: 'totals'?" from the names of the frame that raised
    the NameError (its variables, globals and builtins). The notebook's copy of a
    task's frames has none of them, and a worker has only the globals a notebook
    function uses: for a ``__main__`` frame the notebook asks its printer again with
    this frame's names and its own globals (:func:`home_suggestion`), and the copy of
    the last frame has the answer among its globals (:func:`fake_traceback`), so the
    notebook's printer suggests it. A frame of another module has its own globals
    in the worker: what the worker's printer said stands."""
    if not isinstance(exc, NameError) or exc.__traceback__ is None:
        return None
    last = exc.__traceback__
    while last.tb_next is not None:
        last = last.tb_next
    frame = last.tb_frame
    main = frame.f_globals.get("__name__") == "__main__"
    if not main:
        suggested, listed = _suggested_by_both(exc)
        return NameScope(suggested, listed=listed)
    suggested = _suggested(exc)
    try:
        names = frame.f_locals  # (a module's frame: its globals; 3.13: a proxy of the function's variables)
        module = names is frame.f_globals
        bound = tuple(name for name, _ in zip(names, range(_MAX_SCOPE_NAMES), strict=False))
        wrong, self_value = getattr(exc, "name", None), names.get("self", _ABSENT)
    except Exception:  # (no suggestion rather than no traceback)
        return NameScope(suggested, main)
    self_has = False
    if sys.version_info >= (3, 12) and self_value is not _ABSENT and isinstance(wrong, str):
        try:  # (as Python's printer does: its own hasattr, which may run the class's __getattr__)
            self_has = hasattr(self_value, wrong)
        except Exception:
            pass
    return NameScope(suggested, main, module, () if module else frame.f_code.co_varnames[:_MAX_SCOPE_NAMES], bound,
                     self_has)


_ABSENT = object()

# The names the copy of a NameError's last frame has where serial Python suggests none
# (see exc_record): more than any printer checks, so that its few own names and the
# builtins (which 3.13 checks joined with the globals) give none either.
NO_SUGGESTION = tuple(f"__mpmagic_{i}__" for i in range(_MAX_SCOPE_NAMES))


def home_suggestion(wrong: str | None, scope: NameScope | None) -> str | None:
    """The name serial Python's printer (``sys.excepthook``'s) would suggest for ``wrong``
    (or ``self.wrong``), raised in the frame ``scope`` describes: see :func:`home_suggestions`."""
    return home_suggestions(wrong, scope)[0]


def home_suggestions(wrong: str | None, scope: NameScope | None) -> tuple[str | None, str | None]:
    """The names serial Python would suggest for ``wrong`` (or ``self.wrong``), raised in
    the frame ``scope`` describes (see :func:`suggested_name`): by ``sys.excepthook``'s
    printer and by the ``traceback`` module (:func:`_suggested_by_both`).

    For a ``__main__`` frame, Python's own printer (:func:`_suggested`) is asked in a
    throwaway frame with that frame's names and, as globals, the notebook's (valued
    None): a function's frame is a function with its local variables (the bound ones
    valued None, the others declared only) and its cell and free ones (free ones
    here), so the printer's rules of this Python (which lists, joined or not, and how
    many names are too many) apply as they would serially; a ``%%parallel`` cell's is
    a module's, whose globals are the notebook's and the names the cell had bound."""
    if scope is None or not scope.main or not wrong or not wrong.isidentifier() or keyword.iskeyword(wrong):
        if scope is None:
            return None, None
        return scope.suggested, scope.suggested if scope.main else scope.listed  # (a main frame's: the notebook's to find)
    module = sys.modules.get("__main__")
    names: dict[str, Any] = dict.fromkeys(vars(module) if module is not None else ())
    try:
        if scope.module:
            names.update(dict.fromkeys(name for name in scope.bound if name not in names))
            names.pop(wrong, None)
            names.pop("__builtins__", None)  # (exec puts the real ones in)
            if scope.self_has:
                names["self"] = types.SimpleNamespace(**{wrong: None})
            exec(compile(wrong, "<mpmagic>", "eval"), names)  # (a bare name, looked up in ``names``)
        else:
            names.pop(wrong, None)
            names.pop("__builtins__", None)
            probe, arguments = _probe(wrong, scope, names)
            probe(*arguments)
    except NameError as exc:
        return _suggested_by_both(exc)
    except Exception:  # (a name list Python would not compile: what the worker said)
        logger.debug("no suggestion found for %r", wrong, exc_info=True)
    return scope.suggested, scope.suggested


def suggestion_names(wrong: str, scope: NameScope | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The globals, and the variables, the copy of the last frame of a NameError for
    ``wrong``, raised in the frame ``scope`` describes, has (see :func:`fake_traceback`).

    The globals: the name serial Python suggests there (:func:`home_suggestion`), with
    what serial ``%xmode Verbose`` shows for it when the failing line uses it too
    (``return totals + totls``, :func:`_suggested_value`); a builtin name none (the
    printer finds it among the builtins); or, where serial Python suggests none,
    enough names that the copy's own few and the builtins give none either
    (:data:`NO_SUGGESTION`). The variables: none, but on Python 3.12, whose two
    printers differ (:func:`_suggested_by_both`), where the ``traceback`` module
    (``traceback.print_exc``, ``logging.exception``) serially suggests a name
    ``sys.excepthook``'s does not, or none where it does: then
    :func:`_apart_suggestions` puts each printer's answer where only that printer looks."""
    suggested, listed = home_suggestions(wrong, scope)
    if suggested != listed and not (suggested or "").startswith("self.") and not (listed or "").startswith("self."):
        apart = _apart_suggestions(suggested, listed, scope)
        if apart is not None:
            return apart
    if not suggested:
        return dict.fromkeys(NO_SUGGESTION), {}
    if suggested.startswith("self."):  # (see _with_self_attribute)
        return {suggested: None}, {}
    value = _suggested_value(suggested, scope)
    return ({} if value is _BUILTIN else {suggested: value}), {}


_BUILTIN = object()


def _suggested_value(suggested: str, scope: NameScope | None) -> Any:
    """What serial ``%xmode Verbose`` shows for ``suggested`` (a name Python suggests)
    when the failing line uses it too: the frame's own variable (a ``%%parallel`` cell's:
    a name of its namespace), or a name of another module's frame, as the worker's repr
    (a :class:`_WorkerValue` that :func:`show_captured_values` fills, else ``<not sent>``);
    else the notebook's value; a builtin's none (``_BUILTIN``: the printer finds it among
    the builtins)."""
    if scope is None or suggested in scope.bound:
        return _WorkerValue()
    module = sys.modules.get("__main__")
    notebook = vars(module) if module is not None and scope.main else {}
    if suggested in notebook:
        return notebook[suggested]
    if suggested not in scope.varnames and hasattr(builtins, suggested):
        return _BUILTIN
    return _WorkerValue()  # (a variable not bound yet; a global of another module's frame)


def _apart_suggestions(suggested: str | None, listed: str | None,
                       scope: NameScope | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(globals, variables) of the copy of a NameError's last frame where Python 3.12's
    printers suggest apart (``suggested``: ``sys.excepthook``'s, ``listed``: the
    ``traceback`` module's), so that each says there what it says serially: the excepthook's
    printer checks the code's variable names, the globals and the builtins each on its own
    (a list of 750 or more skipped), ``traceback`` the frame's bound variables (``f_locals``),
    globals and builtins joined (none past 750 in all).

    * Only the excepthook's (a variable not bound yet; past 750 names joined): 751 filler
      globals (``traceback``'s joined list is then too long, the excepthook's skips them)
      and builtins (``__builtins__``) holding that name alone.
    * Only ``traceback``'s (a closure's variable): a variable of the frame's ``f_locals``,
      which the excepthook's printer does not read (it reads the code's variable names).
    * Both, apart: None (the excepthook's answer for both, as before)."""
    if suggested and not listed:
        value = _suggested_value(suggested, scope)
        value = getattr(builtins, suggested) if value is _BUILTIN else value
        return {**dict.fromkeys(NO_SUGGESTION), "__builtins__": {suggested: value}}, {}
    if listed and not suggested:
        value = _suggested_value(listed, scope)
        return {}, {listed: getattr(builtins, listed) if value is _BUILTIN else value}
    return None


def _probe(wrong: str, scope: NameScope, names: dict[str, Any]) -> tuple[types.FunctionType, list[Any]]:
    """A function whose frame has the variables of ``scope``'s and ``names`` as its
    globals, which raises NameError for ``wrong``; and the arguments to call it with.

    Its parameters are the frame's local variable names (``co_varnames``, in their
    order: Python suggests the first of equally near names), and those not bound
    there are deleted before the raise; its frame's other bound names (cell and
    free variables) are free variables here. ``self``, when the frame's had the
    attribute ``wrong`` (``scope.self_has``), is an object that has it too.
    (A name that is not an identifier, as a comprehension's ``.0``, is left out.)"""
    def writable(name: str) -> bool:
        return name != wrong and name.isidentifier() and not keyword.iskeyword(name)

    usable = [n for n in dict.fromkeys(scope.varnames) if writable(n)]
    free = [n for n in scope.bound if n not in scope.varnames and writable(n)]
    unbound = [n for n in usable if n not in set(scope.bound)]
    body = [f"  del {', '.join(unbound)}"] if unbound else []
    body += [f"  ({', '.join(free)},)"] if free else []  # (read: free variables of the function)
    # (names no task's wrong name is: ``return probe`` would read the enclosing function's)
    source = (f"def __mpmagic_outer__():\n {' = '.join([*free, 'None'])}\n def __mpmagic_probe__({', '.join(usable)}):\n"
              + "".join(line + "\n" for line in body) + f"  return {wrong}\n return __mpmagic_probe__\n")
    outer = next(c for c in compile(source, "<mpmagic>", "exec").co_consts if isinstance(c, types.CodeType))
    code = next(c for c in outer.co_consts if isinstance(c, types.CodeType))
    closure = tuple(types.CellType(None) for _ in code.co_freevars)
    arguments: list[Any] = [None] * len(usable)
    if scope.self_has and "self" in usable:
        arguments[usable.index("self")] = types.SimpleNamespace(**{wrong: None})
    return types.FunctionType(code, names, code.co_name, None, closure), arguments


def _suggested_by_both(exc: NameError) -> tuple[str | None, str | None]:
    """The name of "Did you mean" for ``exc`` as ``sys.excepthook``'s printer says it
    (:func:`_suggested`), and as the ``traceback`` module does (``traceback.print_exc``,
    ``logging.exception``). Only Python 3.12 has both and apart: its excepthook's is C
    code with rules of its own; 3.13's excepthook prints with ``traceback``, and before
    3.12 ``traceback`` suggests nothing (the copy's frame then gives it nothing either)."""
    suggested = _suggested(exc)
    if sys.version_info[:2] != (3, 12):
        return suggested, suggested
    try:
        text = "".join(traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
                       .format_exception_only())
    except Exception:  # (no suggestion rather than no traceback)
        return suggested, suggested
    found = re.search(re.escape(str(exc)) + r"\. Did you mean: '(.+)'\?$", text, flags=re.M)
    return suggested, found.group(1) if found else None


def _suggested(exc: NameError) -> str | None:
    """The name of Python's "Did you mean" for ``exc`` (:func:`_suggestion`), or None;
    ``self.total`` for an attribute of the frame's ``self`` (Python 3.12 on)."""
    found = re.fullmatch(r"\. Did you mean: '(.+)'\?", _suggestion(exc))
    name = found.group(1).removeprefix("self.") if found else ""
    return found.group(1) if found and name.isidentifier() else None


def _suggestion(exc: NameError | AttributeError) -> str:
    """``. Did you mean: 'values'?``, as Python's own printer adds it after the message
    of ``exc``, or "". Before 3.12 only that printer computes it (in C, from the
    frame the error was raised in): it prints ``exc`` alone (no chain) into a
    buffer, and the suggestion is read off the end of its message line."""
    printed = io.StringIO()
    chain = exc.__cause__, exc.__context__, exc.__suppress_context__
    exc.__cause__ = exc.__context__ = None
    try:
        with contextlib.redirect_stderr(printed):
            sys.__excepthook__(type(exc), exc, exc.__traceback__)
    except Exception:  # (no suggestion rather than no traceback)
        return ""
    finally:
        exc.__cause__, exc.__context__, exc.__suppress_context__ = chain
    found = re.search(re.escape(str(exc)) + r"(\. Did you mean: .*\?)$", printed.getvalue(), flags=re.M)
    return found.group(1) if found else ""


def show_without_frames(exc: BaseException) -> None:
    """Make IPython show ``exc`` as its type, message and notes only."""
    render = _ExceptionOnly(exc)
    try:
        if isinstance(exc, RemoteError):
            exc.__dict__["_render_without_frames"] = render
        else:
            exc._render_traceback_ = render  # type: ignore[attr-defined]
    except Exception:  # __slots__, or a __setattr__ that refuses: IPython shows our frame
        logger.debug("cannot set the display of %r", exc)


# --------------------------------------------------------------------------
# Notebook cells: name and number them as IPython does
#
# A %%parallel body is compiled in the worker as ``<parallel-cell-HASH>``,
# below as many blank lines as the notebook cell has above it (the
# ``%%parallel`` line): its line numbers are the cell's, as IPython numbers a
# cell ("Cell In[5], line 3" counts the magic line). The notebook learns, when
# it makes the cell's spec, which cell holds the body: the worker's frames are
# then moved onto the cell's own file name, whose lines in ``linecache`` are
# the raw cell (magic line and body), so IPython shows them as the cell's,
# and %pdebug, warnings and syntax errors say the same name and line.


@dataclass
class CellOrigin:
    """The notebook cell a ``%%parallel`` body came from."""

    name: str  # the cell's own file name (``<ipython-input-5-…>``, a kernel's ``/tmp/ipykernel_…/….py``)
    lines: list[str]  # the raw cell: the ``%%parallel`` line and the body
    offset: int  # the lines above the body (the magic line, and blank lines before it)


#: How many ``%%parallel`` bodies' cells :func:`cell_file` and :func:`map_cell_frames` know: the
#: most recently run ones (each run moves its body to the end). Every distinct body run in a
#: session was kept, for good: a long session's mapping grew by one entry per cell. What
#: still needs a body's cell is a run of it (its ranks' errors and warnings, while it runs)
#: and its failures (``%pdebug``, ``last_failures``): recent runs, far fewer than this.
CELL_ORIGINS_KEPT = 256

# A body's file name -> its cell's file name, in the order they last ran (oldest first).
_cell_origins: dict[str, str] = {}
_cell_origins_lock = threading.Lock()  # (parallel() may be called from any thread)


def cell_origin(source: str) -> CellOrigin | None:
    """The running notebook cell, if it is ``%%<magic>`` + ``source`` (None
    outside IPython, or for ``mpmagic.parallel(code)`` called from a cell)."""
    shell = _ipython()
    if shell is None:
        return None
    try:
        raw_cells = shell.history_manager.input_hist_raw
        filename_map = shell.compile._filename_map
    except AttributeError:
        return None
    # The running cell was compiled (and numbered) before it ran: the highest
    # number is its In[N] (``execution_count`` is already the next one in IPython 9).
    count = max(filename_map.values(), default=None)
    if count is None:
        return None
    # Its transformed code is ``get_ipython().run_cell_magic(name, line, body)``.
    # (Unnumbered cells all share one number: take the one whose code holds the body.)
    names = [n for n, c in filename_map.items() if c == count]
    name, lines = next(((n, found) for n in reversed(names) if (found := _magic_cell_lines(n, source))), ("", []))
    if not name:
        return None
    raw = (raw_cells[-1] if raw_cells else "").splitlines(keepends=True)
    above = _lines_above_body(raw, source)
    if above is not None:
        return CellOrigin(name, raw, above)  # as typed (in the history), blank lines above it included
    return CellOrigin(name, lines, _lines_above_body(lines, source) or 1)


def _lines_above_body(lines: list[str], source: str) -> int | None:
    """How many of a cell's ``lines`` stand above the body ``source``: blank lines, then
    its ``%%`` lines (``%%time`` above ``%%parallel`` stacks two); None if ``source``
    is not what follows them."""
    i = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    while i < len(lines) and lines[i].lstrip().startswith("%%"):
        i += 1
        if "".join(lines[i:]).rstrip() == source.rstrip():
            return i
    return None


def remember_cell_origin(filename: str, origin: CellOrigin | None) -> None:
    """Name ``filename`` (a ``%%parallel`` body, numbered as its cell) as the
    notebook cell holding it, or as itself when ``origin`` is None.

    IPython caches a cell-magic cell as its one-line transformed call: the
    raw cell is put in ``linecache`` under the cell's name, so that its lines
    show around a rank's frame (and in %pdebug).

    Only the last :data:`CELL_ORIGINS_KEPT` bodies run are kept (the oldest
    is forgotten first): a body forgotten shows under its own name,
    ``<parallel-cell-…>``, its lines still there (``cell.register_source``).
    """
    with _cell_origins_lock:
        # The name is the body's (cell.register_source): forget what an earlier
        # run of the same body in another cell (or through the API) said of it
        # (and, run again, it is the most recent: it goes to the end).
        _cell_origins.pop(filename, None)
        if origin is None:
            return
        lines = newline_ended(origin.lines)
        linecache.cache[origin.name] = (sum(map(len, lines)), None, lines, origin.name)
        _cell_origins[filename] = origin.name
        while len(_cell_origins) > CELL_ORIGINS_KEPT:
            del _cell_origins[next(iter(_cell_origins))]


def newline_ended(lines: list[str]) -> list[str]:
    """``lines`` for ``linecache``, the last one ending in a newline as a file's (and
    IPython's own entry for a cell) does: pdb prints a listing's last line, and
    ``where`` each frame's, as it is, so a cell whose last line raised ran into
    the next prompt (``val = [0][rank]ipdb>``) or the next frame."""
    if lines and not lines[-1].endswith("\n"):
        return [*lines[:-1], lines[-1] + "\n"]
    return list(lines)


def _magic_cell_lines(cell_name: str, source: str) -> list[str]:
    """The raw lines (``%%name line`` + body) of a cell-magic cell, from its
    transformed code, if ``source`` is its body; else []."""
    import ast

    from . import astlock

    cached = linecache.getlines(cell_name)
    try:
        tree = astlock.parse("".join(cached))
    except (SyntaxError, ValueError):
        return _raw_cell_lines(cached, source)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or getattr(node.func, "attr", None) != "run_cell_magic":
            continue
        texts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if len(node.args) == 3 and len(texts) == 3:
            name, line, body = texts
            lines = [f"%%{name} {line}".rstrip() + "\n", *body.splitlines(keepends=True)]
            if _lines_above_body(lines, source) is not None:  # (also below another %% line: %%time)
                return lines
    return []


def _raw_cell_lines(cached: list[str], source: str) -> list[str]:
    """The raw lines (``%%name line`` + body) that :func:`remember_cell_origin`
    already put in ``linecache`` for this cell, if ``source`` is its body; else [].

    A cell's spec may be built twice in one run (``--checkpoint`` builds it to
    key the run, then the run builds it again): the second build must find
    the same origin, not lose it because the first replaced IPython's entry.
    """
    top = next((i for i, line in enumerate(cached) if line.strip()), None)
    if top is None or _lines_above_body(cached, source) is None:
        return []
    return cached[top:]


def cell_file(filename: str) -> str:
    """The file name to show for ``filename``: its notebook cell's, for a
    ``%%parallel`` body (:func:`remember_cell_origin`); else itself. The
    line numbers are the same (the body is compiled as numbered in its cell)."""
    return _cell_origins.get(filename, filename)


def map_cell_frames(frames: list[FrameInfo]) -> list[FrameInfo]:
    """Frames of a ``%%parallel`` body moved onto the notebook cell holding it."""
    if not _cell_origins:
        return frames
    out = []
    for fr in frames:
        name = _cell_origins.get(fr.filename)
        if name is not None:
            fr = replace(fr, filename=name)
        out.append(fr)
    return out


def _ipython() -> Any:
    """The running IPython shell, or None (never imports IPython: workers import us)."""
    mod = sys.modules.get("IPython")
    get = getattr(mod, "get_ipython", None)
    return get() if get is not None else None


def format_exception(exc: BaseException) -> str:
    """``exc`` with its (worker-side) frames as the notebook shows a traceback.

    In IPython: its own rendering ("Cell In[2], line 3", the cell's lines);
    elsewhere Python's. Used for each failing ``%%parallel`` rank. An exception
    with its own display (``_render_traceback_``: our errors, one line and their
    notes) shows that, as IPython shows it for ``%pmap`` and in the notebook:
    calling the traceback formatter directly skipped it, and a rank's closed
    queue showed three frames of mpmagic/shared/queues.py (tutorial22 #1).
    """
    try:
        render = getattr(exc, "_render_traceback_", None)
        lines = render() if callable(render) else None
    except Exception as why:  # (a display that fails: the traceback then)
        logger.debug("the display of %r failed: %s", exc, why)
        lines = None
    if isinstance(lines, list) and all(isinstance(line, str) for line in lines):
        return "\n".join(lines)
    shell = _ipython()
    if shell is not None and not isinstance(exc, group_class()) and not isinstance(exc, SyntaxError):
        try:
            # tb_offset=0: the rebuilt traceback has no IPython frame for IPython 8
            # to skip (its default offset of 1 cut off the rank's only frame).
            stb = shell.InteractiveTB.structured_traceback(type(exc), exc, exc.__traceback__, tb_offset=0)
            return shell.InteractiveTB.stb2text(stb)
        except Exception as why:
            logger.debug("IPython could not render %r: %s", exc, why)
    return cell_names("".join(traceback.format_exception(exc)))


_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def cell_label(filename: str) -> str | None:
    """``In[4]``: the cell of the file name IPython gave its code, as its tracebacks
    name it; None outside IPython or for any other file."""
    fmt = getattr(getattr(_ipython(), "compile", None), "format_code_name", None)
    if fmt is None:
        return None
    try:
        named = fmt(filename)
    except Exception:  # (an IPython whose compiler names files otherwise)
        return None
    return named[1] if named and isinstance(named[1], str) else None


def cell_names(text: str) -> str:
    """Python's ``File "<ipython-input-2-…>", line 3`` as IPython's ``Cell In[2], line 3``."""
    shell = _ipython()
    fmt = getattr(getattr(shell, "compile", None), "format_code_name", None)
    if fmt is None:
        return text

    def sub(m: re.Match) -> str:
        named = fmt(m.group(1))
        return f"{named[0]} {named[1]}, line {m.group(2)}" if named else m.group(0)

    return _FILE_LINE.sub(sub, text)


# --------------------------------------------------------------------------
# Display in IPython: the two paths that bypass ``_render_traceback_``
#
# IPython shows a SyntaxError (any subclass) with ``showsyntaxerror``, which
# lists every frame, and an exception with an ExceptionGroup in its context
# with ``traceback.print_exc``, which also lists every frame (ours: magics.py,
# api.py, jobs.py). For an exception that came from a worker, the shell's
# ``showtraceback`` is wrapped to drop the frames that carry
# ``__tracebackhide__`` (ours) before showing it, by either path: the display
# is then the cell's line and the task's frames, as with serial ``map``
# (without even IPython's "[... skipping hidden 3 frame]").

_NOTE_PREFIX = "mpmagic: "


def came_from_worker(exc: BaseException) -> bool:
    """Was ``exc`` rebuilt from a task (it carries our one-line note)?"""
    notes = getattr(exc, "__notes__", None) or ()
    return any(isinstance(n, str) and n.startswith(_NOTE_PREFIX) for n in notes)


def _without_hidden_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without the frames IPython would hide (ours) and IPython's own."""
    return _relink(
        t for t in _entries(tb)
        if not t.tb_frame.f_locals.get("__tracebackhide__")
        and "/IPython/core/" not in t.tb_frame.f_code.co_filename.replace("\\", "/")
    )


def hide_our_frames(exc: BaseException) -> None:
    """A task's error leaving the API (``pmap``, ``Run.result``, an ``imap`` loop):
    drop our frames (``__tracebackhide__``) from its traceback, as IPython hides
    them in a notebook, so a plain script's traceback (or ``traceback.format_exc()``
    in its ``except``) shows the caller's line and the task's frames, as serial
    ``map`` would. Called in an ``except`` of the API's outermost frame before a
    bare ``raise``: that one adds no entry for the frame again. Errors not from a
    task (our refusals, our bugs) keep every frame.

    Before Python 3.11 a bare ``raise`` re-raises the traceback its ``except``
    caught, not ``__traceback__``: that one's first entry (the API's frame) cannot
    go, but the entries after it are replaced in place, so only that frame of
    ours is shown there."""
    if came_from_worker(exc):
        _replace_traceback(exc, _without_hidden_frames(exc.__traceback__))


def interrupted_at_callers_line(exc: BaseException, waited_in: tuple[str, ...] = ()) -> None:
    """A Ctrl-C that landed in a shared helper's wait (``q.get()``, ``q.put()`` on a
    full queue, ``lock.acquire()``, ``ev.wait()``) leaves with the caller's line and
    no frame of ours (code of the user's it ran, an item's ``__setstate__``, stays):
    the user interrupted their own line, and our frames (four for a ``q.get()``) say
    nothing to them, in a notebook or a script. ``waited_in``: the files (or folders,
    ending in a separator) of the library the helper waits in, whose frames go too
    (a Dask helper: ``distributed``'s client and ``threading``, seven frames of a
    ``lock.acquire()``). Called in the ``except`` of the helper's public method,
    before a bare ``raise`` (see :func:`hide_our_frames`)."""
    _replace_traceback(exc, without_our_frames(exc.__traceback__, waited_in))


def _replace_traceback(exc: BaseException, kept: types.TracebackType | None) -> None:
    """``exc``'s traceback becomes ``kept``, for a bare ``raise`` in the ``except`` that
    caught it too: before Python 3.11 that re-raises the traceback it caught, whose first
    entry (the frame of that ``except``) stays and is linked to ``kept``."""
    caught = exc.__traceback__
    # (past the class's own __setattr__, as raise sets it: a frozen dataclass's refuses)
    BaseException.__setattr__(exc, "__traceback__", kept)
    if sys.version_info < (3, 11) and caught is not None and (kept is None or kept.tb_frame is not caught.tb_frame):
        caught.tb_next = kept


def _user_code_under_us(tb: types.TracebackType | None) -> bool:
    """Did user code called by mpmagic raise? (The last frame is not ours, an earlier one is.)"""
    entries = _entries(tb)
    ours = [t.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR) for t in entries]
    return bool(entries) and not ours[-1] and any(ours)


def _entries(tb: types.TracebackType | None) -> list[types.TracebackType]:
    out = []
    while tb is not None:
        out.append(tb)
        tb = tb.tb_next
    return out


def _relink(entries: Any) -> types.TracebackType | None:
    head = None
    for t in reversed(list(entries)):
        head = types.TracebackType(head, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return head


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def without_our_frames(tb: types.TracebackType | None, also: tuple[str, ...] = ()) -> types.TracebackType | None:
    """``tb`` without mpmagic's own frames (None if it had no others): what a
    user's code did, without the machinery that called it. ``also``: the files
    (or folders) of other machinery whose frames go too."""
    drop = (_PACKAGE_DIR, *also)
    return _relink(t for t in _entries(tb) if not t.tb_frame.f_code.co_filename.startswith(drop))


def raised_by_our_call(exc: BaseException) -> bool:
    """Is the last frame of ``exc``'s traceback mpmagic's (it came from our code, or
    from C code ours called: no frame of the user's ran below ours)?"""
    entries = _entries(exc.__traceback__)
    return bool(entries) and entries[-1].tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)


def drop_our_frames(exc: BaseException) -> None:
    """User code that raised while our machinery called it (a generator input
    consumed chunk by chunk): leave only the user's frames in its traceback.

    An error whose last frame is ours is our bug: it keeps every frame.
    """
    if raised_by_our_call(exc) or exc.__traceback__ is None:
        return
    entries = _entries(exc.__traceback__)
    _replace_traceback(exc, _relink(t for t in entries if not t.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)))


#: The latest %%parallel cells (``parallel()``), newest last: (the cell's code, the names it
#: binds at its top level, read only when the notebook's NameError asks: parsing a cell costs
#: ~0.2 ms, a run's overhead ~1 ms; the names its ``--gather`` asked for).
_rank_cells: list[tuple[str, Callable[[], set[str]], frozenset[str]]] = []
_RANK_CELLS_KEPT = 32


def remember_rank_cell(code: str, names_bound: Callable[[], set[str]], gathered: Iterable[str] = ()) -> None:
    """A %%parallel cell (``parallel()``) binds names in its ranks' processes, where the
    cell run once per rank by hand would have bound them in the notebook: the notebook's
    later ``NameError`` for one of them says so (:func:`note_rank_name`). ``names_bound``:
    what the cell binds, asked then; ``gathered``: its ``--gather`` names (one of them
    missing in the notebook is a gather that failed, not one to advise)."""
    _rank_cells.append((code, functools.lru_cache(maxsize=1)(names_bound), frozenset(gathered)))
    del _rank_cells[:-_RANK_CELLS_KEPT]


def note_rank_name(exc: BaseException, namespace: Any) -> None:
    """The notebook's own ``NameError`` for a name only a %%parallel cell's ranks bound:
    one note naming that cell and ``--gather``. Not a task's error (the note is the
    notebook's), nor a name the notebook has (a ``NameError`` of some other scope)."""
    name = getattr(exc, "name", None) if type(exc) is NameError else None
    if not isinstance(name, str) or came_from_worker(exc) or name in namespace:
        return
    found = next(((code, gathered) for code, bound, gathered in reversed(_rank_cells) if name in bound()), None)
    if found is None:
        return
    code, gathered = found
    cure = (f"that cell's --gather {name} did not bring it back (the run failed, or a rank did not set it: its error "
            "said which)" if name in gathered else f"--gather {name} brings it back (a list, one value per rank)")
    note = (f"{_NOTE_PREFIX}`{name}` was assigned by a %%parallel cell (`{code_snippet(code)}`) in its ranks' processes, not in "
            f"the notebook: {cure}")
    if note not in (getattr(exc, "__notes__", None) or ()):
        add_note(exc, note)


def install_display(shell: Any) -> None:
    """Wrap ``shell.showtraceback`` for task SyntaxErrors and ExceptionGroups."""
    original = shell.showtraceback
    if getattr(original, "_mpmagic", False):
        return

    def showtraceback(exc_tuple=None, filename=None, tb_offset=None, exception_only=False, running_compiled_code=False):
        __tracebackhide__ = True
        try:
            etype, value, tb = shell._get_exc_info(exc_tuple)
        except ValueError:
            etype = value = tb = None
        if value is not None and not exception_only and came_from_worker(value):
            # The cell's line, then the task's frames: as the same cell with map() shows.
            tb = _without_hidden_frames(tb)
            BaseException.__setattr__(value, "__traceback__", tb)  # (as raise sets it: see drop_our_frames)
            if isinstance(value, SyntaxError) or isinstance(value, group_class()):
                text = cell_names("".join(traceback.format_exception(value)))
                shell._showtraceback(etype, value, text.rstrip("\n").split("\n"))
                return None
            exc_tuple = (etype, value, tb)
            # IPython's own frames are gone: IPython 8 would skip one more (the cell's line).
            tb_offset = 0 if tb_offset is None else tb_offset
        elif value is not None and not exception_only and _user_code_under_us(tb):
            # The user's code called by ours (a generator input, an on_chunk callback)
            # raised: the cell's line, then the user's frames, as with map(); not
            # "[... skipping hidden N frame]" for ours.
            tb = _without_hidden_frames(_relink(
                t for t in _entries(tb) if not t.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)))
            BaseException.__setattr__(value, "__traceback__", tb)
            exc_tuple = (etype, value, tb)
            tb_offset = 0 if tb_offset is None else tb_offset  # (as above)
        if isinstance(value, NameError) and _rank_cells:  # (a name only a %%parallel cell's ranks bound)
            note_rank_name(value, shell.user_ns)
        return original(exc_tuple, filename, tb_offset, exception_only, running_compiled_code)

    showtraceback._mpmagic = True  # type: ignore[attr-defined]
    shell.showtraceback = showtraceback


def uninstall_display(shell: Any) -> None:
    """Undo :func:`install_display`."""
    if getattr(shell.__dict__.get("showtraceback"), "_mpmagic", False):
        del shell.__dict__["showtraceback"]


def describe_exitcode(exitcode: int | None) -> str:
    """Say in words how a worker process ended ("killed by SIGKILL ...")."""
    if exitcode is None:
        return "is unresponsive"
    if exitcode < 0:
        signum = -exitcode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hint = {
            "SIGKILL": " (possibly out of memory: the kernel's OOM killer sends SIGKILL)",
            "SIGSEGV": " (a segmentation fault, usually in C code or ctypes)",
            "SIGBUS": " (a bus error, e.g. a truncated memory-mapped file)",
            "SIGABRT": " (an abort, usually a failed assertion in C code)",
            "SIGTERM": " (sent by another process, or by a library in the worker itself)",
        }.get(name, "")
        return f"was killed by {name}{hint}"
    return f"exited unexpectedly with exit code {exitcode}"


# "item N of the input", "item N (<its repr>)", and the path to what cannot be pickled in it,
# "`item N`" / "`item N -> k -> 'a'`" (``payload.explain_unpicklable``): a re-run renumbered
# the first and left the path at its own place, "cannot send item 2 (...): `item 0` is a lock".
_ITEM_REF = re.compile(r"\bitem (\d+)(?= of the input| \(|`| ->)")


def renumber_items(exc: BaseException, positions: list[int]) -> None:
    """Make "item N" in an error's notes and message count in the user's whole input.

    A run over part of the user's input (``checkpoint.py`` runs the items its
    store lacks, ``postmortem.rerun_failed`` the items that failed) numbers
    its items among those it ran, so its "raised by item 3 of the input"
    means the 4th item it ran; the user's input position is ``positions[3]``.
    """

    def fix(text: str) -> str:
        return _ITEM_REF.sub(lambda m: f"item {positions[int(m.group(1))]}" if int(m.group(1)) < len(positions)
                             else m.group(0), text)

    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, (list, tuple)) and notes:  # (a library may have set a str or a tuple: kept as it is)
        fixed = [fix(n) if isinstance(n, str) else n for n in notes]
        BaseException.__setattr__(exc, "__notes__", fixed if isinstance(notes, list) else tuple(fixed))
    render = getattr(exc, "_render_traceback_", None)
    if render is not None and isinstance(getattr(render, "note", None), str):
        render.note = fix(render.note)
    if type(exc).__module__.startswith("mpmagic") and exc.args and isinstance(exc.args[0], str):
        exc.args = (fix(exc.args[0]), *exc.args[1:])
