"""The plain Python API: ``pmap`` and ``parallel``. The magics call these.

Both build a job (``jobs.py``), hand it to the current backend (``pool.py``),
and make a :class:`~mpmagic.report.Report` of how long it took against
serial: measured when ``compare=True`` ran the work serially here too,
estimated from the workers' own task times otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import keyword
import logging
import math
import multiprocessing
import os
import re
import sys
import threading
import time
import types
import unicodedata
import warnings
import weakref
from collections.abc import (
    Callable,
    Container,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    MutableSequence,
    MutableSet,
    Sequence,
    Set,
    Sized,
)
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar, overload

from . import (
    astlock,
    debugging,
    draws,
    exiting,
    payload,
    payload_cache,
    serial_copy,
    shm,
    task_shell,
)
from .backends.base import Backend, Job
from .cell import (
    leave_out_unpicklable,
    make_cell_spec,
    names_assigned,
    run_cell_code,
    shows_last_assignment,
    split_last_expression,
)
from .checks import (
    check_delay,
    check_flags,
    check_whole,
    keyword_names,
    run_timeout,
    unexpected_keyword,
    whole,
)
from .cpus import recent_cpus
from .engine import Run as EngineRun
from .errors import (
    IDLE_OUTCOME,
    NOT_STARTED_OUTCOME,
    STOPPED_OUTCOME,
    ArgumentTypeError,
    ParallelError,
    SerializationError,
    TaskTimeoutError,
    UsageError,
    add_note,
    drop_our_frames,
    format_exception,
    hide_our_frames,
    interrupt_outcome,
    note_unsent_name,
    one_line,
    remember_rank_cell,
    render_traceback,
    run_interrupted,
    set_interrupt_outcome,
    unsafe_here,
)
from .fmt import code_snippet, func_name, noun
from .insights import Recorder
from .interrupts import absorb_late_interrupts
from .interrupts import restore as restore_interrupts
from .jobs import (
    CellJob,
    Failed,
    MapJob,
    first_failed_rank,
    helpers_used,
    item_note,
    live_iterator,
    parallel_error_line,
)
from .pool import check_run_ranks, check_run_workers, forked_from_pool, get_pool
from .progress import Progress
from .report import RankValues, Report
from .threads import cap_for, configured
from .warmup import _function_modules_cached, function_modules

if TYPE_CHECKING:
    from .background import Run

_T = TypeVar("_T")


class _ThreadReports(threading.local):
    """Each thread's most recent report: a thread's run (a widget callback, a
    ``threading.Thread``) does not replace the report a cell prints or reads."""

    report: Report | None = None


_reports = _ThreadReports()


def last_report() -> Report | None:
    """The report of this thread's most recent ``pmap`` or ``parallel`` run.

    Runs in other threads have their own (a cell reads its own run's report,
    whatever a ``threading.Thread`` or a widget callback ran meanwhile; a
    background run's report is on its handle).

    After an interrupted run, that run's report, marked interrupted (its
    ``line()`` says ``pmap interrupted after 3 of 10 items finished, 250.0 ms``,
    ``report.interrupted`` is True; a cell's counts the ranks that finished and,
    apart, those that had failed: ``parallel interrupted after 0 of 2 ranks
    finished, 1 failed (rank 1)``), not the report of
    the run before it. None after a pandas accessor call (``df.mp.apply``...) that ran
    pandas' own call here, with no run (``s.mp.map(a_dict)``, an empty frame).
    """
    return _reports.report


def _interrupted(call: Any, t0: float) -> None:
    """The report of a run stopped by an interrupt (None if it cannot be made)."""
    try:
        report = call.report(time.perf_counter() - t0, interrupted=True)
    except Exception:  # (never in the way of the interrupt itself)
        report = None
    _reports.report = report


def _stopped(call: Any, t0: float, exc: BaseException) -> None:
    """The report of a run stopped by an error of its own (not an item's or a rank's:
    its ``on_chunk`` raised, the pool was stopped under it), so that ``last_report()``
    is not the run before it."""
    try:
        report = call.report(time.perf_counter() - t0, stopped_by=exiting.stop_cause(exc))
    except Exception:  # (never in the way of the error itself)
        report = None
    _reports.report = report


def _imported_since(mark: int) -> tuple[str, ...]:
    """Modules imported since ``len(sys.modules)`` was ``mark``: the first of each package (``numpy.random``)."""
    new = list(sys.modules)[mark:]
    names = set(new)
    return tuple(n for n in new if n.rpartition(".")[0] not in names and not any(p.startswith("_") for p in n.split("."))
                 and n.partition(".")[0] not in sys.stdlib_module_names | {"mpmagic"}  # (pandas pulls in contextvars...)
                 and getattr(sys.modules.get(n), "__file__", None))  # (not cython_runtime and the like)


def _set_report(report: Report | None) -> None:
    """Make ``report`` this thread's last one; None: the latest call made no run (a pandas
    accessor call that ran pandas' own call here), so no earlier run's report stands for it."""
    _reports.report = report


def _check_workers(workers: Any) -> int | None:
    """``workers`` as a run takes it: None (or -1, joblib's ``n_jobs=-1``) for the
    whole pool, which has one worker per usable CPU unless sized otherwise; else a
    plain int of at least 1 (a numpy integer is the int it is: ``checks.whole``)."""
    if workers is None or whole(workers) == ALL_WORKERS:
        return None
    return check_whole("workers", workers, 1, "a whole number of at least 1, or -1 / None (the whole pool)")


#: ``workers=-1``: the whole pool, as leaving ``workers`` out (joblib's ``n_jobs=-1``).
ALL_WORKERS = -1


def _check_retries(retries: Any) -> int:
    """``retries`` as ``%pmap --retries`` takes it: a whole number of 0 or more (a plain int).

    None is refused like -1 or "2" (the default is 0, not None): unchecked, a
    bad value reached the manager thread only when a worker died, and its
    TypeError replaced the run's results, ``errors="collect"`` too.
    """
    return check_whole("retries", retries, 0)


def _check_progress_delay(progress_delay: Any) -> float:
    """``progress_delay`` as ``%config MPMagic.progress_delay`` takes it: seconds, 0 or
    more (a plain float). ``'x'`` failed inside the progress bar with a TypeError,
    and only where a bar was made (``submit`` kept it without a word)."""
    return check_delay("progress_delay", progress_delay)


def _check_on_chunk(on_chunk: Any) -> None:
    """``on_chunk`` is None or a function: ``on_chunk=5`` was found out only when the
    first chunk came back, with the run under way (``'int' object is not callable``)."""
    if on_chunk is not None and not callable(on_chunk):
        raise UsageError(f"on_chunk must be a function called as on_chunk(start, results) as each chunk arrives "
                         f"(or None), not {payload_repr(on_chunk)}")


def _check_checkpoint(checkpoint: Any) -> None:
    """``checkpoint`` as the runs take it: True/False (None: off) or a folder (a str or
    path). ``checkpoint=5`` failed inside pathlib with a TypeError that never named it."""
    if checkpoint is not None and not isinstance(checkpoint, (bool, str, os.PathLike)):
        raise UsageError(f"checkpoint must be True/False or a folder (a str or path), not {payload_repr(checkpoint)}")


def _equal(a: Any, b: Any) -> bool:
    """``--compare``'s verdict: are the serial and the parallel result the same?

    Warnings the comparison itself raises are dropped (scipy.sparse's
    "Comparing two sparse matrices using == is inefficient" pointed into this
    file): they are about our check, not the user's code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _same(a, b)


def _same(a: Any, b: Any) -> bool:
    """Equality that copes with numpy arrays and odd ``__eq__``s, and that, as
    pandas' ``equals`` does, tells results of another dtype or schema apart
    (polars' ``equals`` ignores dtypes, numpy's ``array_equal`` too)."""
    if not _same_kind(a, b):
        return False
    try:
        result = a == b
        if isinstance(result, bool):
            return result or _equal_anyway(a, b)
        if getattr(result, "shape", None) == ():  # a numpy scalar's comparison (np.bool_)
            return bool(result) or _equal_anyway(a, b)
    except Exception:
        pass
    if type(a) is type(b) and callable(getattr(a, "equals", None)):  # pandas: NaN in the same places is equal
        try:
            return bool(a.equals(b))
        except Exception:
            pass
    try:
        import numpy as np

        if type(a) is type(b) and isinstance(a, (list, tuple, dict, set, frozenset)):
            return _equal_anyway(a, b)  # item by item: a tuple or dict holding an array (== raised on it)
        try:
            return bool(np.array_equal(a, b, equal_nan=True))  # (NaN where serial had NaN)
        except TypeError:  # (equal_nan on a dtype without NaN: strings, objects)
            return bool(np.array_equal(a, b))
    except Exception:
        try:
            return payload.dumps_data(a) == payload.dumps_data(b)
        except Exception:
            return False


# The attributes that name a library object's element type or columns: numpy / pandas / polars /
# torch ``dtype``, polars DataFrame and pyarrow Table ``schema``, and pyarrow Array / ChunkedArray ``type``
# (``type`` only there: on other objects it names anything).
_KIND_ATTRS = ("dtype", "schema")


def _same_kind(a: Any, b: Any) -> bool:
    """False when two objects of one library type hold another dtype or schema
    (an Int32 and an Int64 polars frame, a float32 and a float64 array); True
    otherwise, also when there is nothing to compare. Reads attributes only of
    objects from a library (never of plain Python values)."""
    kind = type(a)
    if kind is not type(b) or kind.__module__ == "builtins":
        return True
    attrs = _KIND_ATTRS + (("type",) if kind.__module__.startswith("pyarrow") else ())
    for attr in attrs:
        try:
            x, y = getattr(a, attr), getattr(b, attr)
        except Exception:
            continue
        if callable(x):  # (a method of that name: two bound methods are never ==)
            continue
        try:
            if not (x == y):
                return False
        except Exception:  # (== gave no truth value: nothing to tell)
            continue
    return True


def _equal_anyway(a: Any, b: Any) -> bool:
    """Values ``==`` calls different that are still the same result: NaN (never
    equal to itself), instances without ``__eq__`` (compared by identity, and
    the parallel ones are copies), and lists, tuples and dicts holding them.
    Without this, ``--compare`` said "RESULTS DIFFER" for the same results."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Failed):  # (errors="collect": the same item failing the same way)
        return a.index == b.index and type(a.error) is type(b.error) and str(a.error) == str(b.error)
    if isinstance(a, complex) or (getattr(a, "shape", None) == () and getattr(getattr(a, "dtype", None), "kind", "")
                                  == "c"):  # (a NaN part: the same where each part is the same, or both NaN)
        return _same_part(float(a.real), float(b.real)) and _same_part(float(a.imag), float(b.imag))
    if isinstance(a, float) or getattr(a, "shape", None) == ():  # (a numpy scalar too: np.float32)
        return bool(a != a and b != b)  # (both NaN)
    if type(a).__name__ == "Decimal" and type(a).__module__ in ("decimal", "_decimal", "_pydecimal"):
        return bool(a.is_qnan() and b.is_qnan()) or bool(a.is_snan() and b.is_snan())  # (NaN: never == itself)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        # ({nan: 1}: each copy's NaN key is another object, never == itself: the keys == does
        # not match are paired as a set's elements are, with their values)
        rest = [k for k in b if k not in a]
        for k in a:
            if k in b:
                if not _same(a[k], b[k]):
                    return False
                continue
            match = next((i for i, y in enumerate(rest) if _same(k, y) and _same(a[k], b[y])), None)
            if match is None:
                return False
            rest.pop(match)
        return True
    if isinstance(a, (set, frozenset)):  # {nan}: each copy's NaN is another object, never == itself
        if len(a) != len(b):
            return False
        rest = [y for y in b if y not in a]
        for x in (x for x in a if x not in b):
            match = next((i for i, y in enumerate(rest) if _same(x, y)), None)
            if match is None:
                return False
            rest.pop(match)
        return not rest
    if type(a).__module__.startswith("pyarrow") and callable(getattr(a, "to_pylist", None)):
        # A Table, Array or ChunkedArray: pyarrow's equals counts NaN unequal to itself; the values
        # as Python objects compare NaN as the rest of --compare does (the schema was compared already).
        try:
            return _same(a.to_pylist(), b.to_pylist())
        except Exception:
            return False
    if type(a).__eq__ is object.__eq__:  # type: ignore[comparison-overlap]  # (typeshed types the two differently)
        try:
            return payload.dumps_data(a) == payload.dumps_data(b)
        except Exception:
            return False
    return False


def _same_part(x: float, y: float) -> bool:
    """One part of two complex results: equal, or both NaN."""
    return x == y or (x != x and y != y)


class MapArgs(NamedTuple):
    """What :func:`check_map_args` made of a map's arguments, to use from then on:
    the iterables as ``map`` takes them, and the options as plain values."""

    iterables: tuple
    workers: int | None
    chunksize: int | None
    timeout: float | None
    retries: int


def _never_called(iterables: tuple) -> str:
    """What ``check_map_args`` adds to its refusal of a FUNC that is not callable when an
    input is known to be empty (a sized iterable of length 0): serial ``map(1, [])`` gives
    ``[]`` without a word, as it never calls FUNC, so the refusal says why pmap differs
    (it checks FUNC first: a mistake in the line must not wait for a non-empty input)."""
    try:
        empty = any(isinstance(it, Sized) and len(it) == 0 for it in iterables)
    except Exception:  # (a __len__ of the user's that fails: no note, the refusal stands)
        empty = False
    return (" (serial map() gives [] here only because the input is empty and it never calls it; "
            "pmap checks the function first)") if empty else ""


def check_map_args(func: Any, iterables: tuple, workers: Any, chunksize: Any, timeout: Any, errors: Any,
                   star: bool, retries: Any = 0, checkpoint: Any = False) -> MapArgs:
    """UsageError for arguments ``pmap`` (and ``imap``) cannot take, in the user's words;
    else the iterables as ``map`` takes them (see :func:`_take`) and the options as plain
    ints and floats (``workers=-1`` is None; a numpy number the number it is; a timeout
    too large to wait on ``inf``: see ``checks.run_timeout``), to use from then on."""
    __tracebackhide__ = True
    if not callable(func):
        raise ArgumentTypeError(f"the first argument must be a function to map, not {type(func).__name__} "
                                f"{payload_repr(func)}{_never_called(iterables)}")
    if not iterables:
        raise ArgumentTypeError("give at least one iterable to map over, as with map(func, iterable)")
    check_flags(star=star)
    check_not_async(func, several=star or len(iterables) > 1)
    taken = tuple(_take(it, i) for i, it in enumerate(iterables, 2))
    checked = MapArgs(taken, _check_workers(workers), None if chunksize is None else check_whole("chunksize", chunksize),
                      run_timeout(timeout), _check_retries(retries))
    _check_checkpoint(checkpoint)
    if errors not in ("raise", "collect"):
        raise UsageError(f"errors must be 'raise' or 'collect', not {errors!r}")
    if star and len(iterables) > 1:
        raise UsageError("star=True takes one iterable of argument tuples, not several iterables")
    if checkpoint and checked.workers is not None and not _in_worker_process():
        # A checkpointed run whose items are all stored runs nothing: the pool's check of
        # workers (more than the machine runs) is asked now, so that the call is a usage
        # error or not whatever the store holds (`-n 100000` returned the stored results).
        check_run_workers(checked.workers)
    return checked


#: Types whose ``__iter__`` gives the same items each time and changes nothing:
#: used as they are (a list or tuple is sliced into chunks, not iterated).
_REITERABLE = frozenset({list, tuple, range, str, bytes, bytearray, memoryview, dict, set, frozenset,
                         type({}.keys()), type({}.values()), type({}.items())})


def _take(it: Any, position: int) -> Any:
    """What ``map`` takes of argument ``position``: ``iter()`` is called once on it.

    A list, tuple, range... (and numpy's and pandas' objects) stay as they
    are; an iterator is its own iterator. Any other iterable is replaced by
    the one iterator its ``__iter__`` gave (:class:`_Taken`): one whose
    ``__iter__`` hands its data out once (a queue drain, a stream) gave an
    empty result before, as it was asked twice (four times with ``compare``).
    """
    __tracebackhide__ = True
    kind = type(it)
    if kind in _REITERABLE:
        return it
    n = _length((it,))  # (before iter: what the object says of itself, as len() would)
    try:
        taken = iter(it)
    except TypeError as exc:
        if getattr(kind, "__iter__", None) is None and not hasattr(kind, "__getitem__"):
            if hasattr(kind, "__aiter__"):  # an async generator: its items come from an event loop
                raise ArgumentTypeError(
                    f"argument {position} of map must be iterable, not {kind.__name__} {payload_repr(it)}: "
                    "mpmagic maps a plain iterable, not an async one; collect its items first, in a coroutine: "
                    "items = [x async for x in it]") from None
            if _map_caller.get() == "submit":  # read as Executor.submit(f, x): say it maps, and the one call
                raise ArgumentTypeError(f"submit maps func over its iterables like map(), so argument {position} must be "
                                 f"iterable, not {kind.__name__} {payload_repr(it)}; for one call func(x) use "
                                 "mpmagic.call(func, x) (or submit(func, [x]).result()[0])") from None
            raise ArgumentTypeError(f"argument {position} of map must be iterable, not {kind.__name__} "
                             f"{payload_repr(it)}") from None
        if _raised_here(exc):  # a C __iter__ refused (a 0-d numpy array): no frame of the user's to show
            raise ArgumentTypeError(f"argument {position} of map cannot be iterated: {exc}") from None
        raise  # its own __iter__ raised: the user's error, as serial map shows it
    if taken is it or kind.__module__.partition(".")[0] in ("numpy", "pandas"):
        return it  # an iterator; an array, Series or frame (iterating them changes nothing)
    return _Taken(taken, n)


#: Containers that cannot change: a background run reads them later as they are now
#: (their items can still change: a tuple of dicts; see :func:`owned`).
_FROZEN = frozenset({tuple, range, str, bytes, frozenset})


def owned(given: tuple, taken: tuple) -> tuple:
    """A background run's input, its own as of the call (``submit``, ``%pmap --bg``,
    ``pmap(block=False)``), as ``concurrent.futures``' ``submit`` takes its arguments.

    ``given``: the iterables as the caller passed them; ``taken``: what
    :func:`check_map_args` made of them. The run reads its input in its own
    thread over seconds or hours, so a list the notebook cleared, refilled or
    sorted next changed the run's results (one run gave 8 of 100 results and
    said "done"). A list, dict, set, other mutable container or dict view is
    copied shallowly (pointers: ~10 ms per million items here); a numpy array
    or a pandas object is copied (its memory once more, until the run ends:
    ~50 ms per 100 MB here, ~0.3 s when that memory is touched for the first time). Immutable containers are kept (a tuple, range, str), and so
    are iterators: a generator is read as the run goes (docs/guide.md). The
    items themselves are not copied: a mutable item changed before its chunk
    was sent is sent changed (a snapshot of them would pickle the whole input
    here). A blocking run never comes here: its input cannot change under it.
    """
    return tuple(_owned(g, t) for g, t in zip(given, taken, strict=True))


def _owned(given: Any, it: Any) -> Any:
    kind = type(it)
    if kind is list:
        return it.copy()
    if kind in _FROZEN:
        return it
    if kind is _Taken:  # the one iterator of an iterable that is not a plain container
        # (a deque, a list subclass, UserList, array.array: read out now; anything else,
        # a lazy source of the user's, is read as the run goes, like a generator)
        return list(it) if isinstance(given, _MUTABLE) else it
    if kind in _REITERABLE:  # a dict, set, bytearray, memoryview or dict view: its items as map reads them
        return list(it)
    module = kind.__module__.partition(".")[0]
    if module == "numpy":
        np = sys.modules.get("numpy")
        if np is not None and isinstance(it, np.memmap) and it.mode == "r":
            return it  # (a read-only file mapping: nothing here can change it, and a copy would load the file)
        if np is not None and isinstance(it, np.ndarray):
            return it.copy()
    elif module == "pandas":
        pd = sys.modules.get("pandas")
        if pd is not None and isinstance(it, (pd.Series, pd.DataFrame, pd.Index)):
            return it.copy()
    return it  # an iterator (a generator): read in the run's own thread


def _results_then_drop_input(job: MapJob) -> list:
    """A background map's results; its input (copied at the call, see :func:`owned`)
    is dropped then, not kept as long as the user keeps the run's handle."""
    __tracebackhide__ = True
    try:
        return job.results()
    finally:
        job.forget_input()


def _first_result(job: MapJob) -> Any:
    """The value of :func:`call`'s run: its one item's result."""
    return _results_then_drop_input(job)[0]


def _raised_here(exc: BaseException) -> bool:
    """Did ``exc`` come from C code called by this module's frame (no Python frame below it)?"""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename == __file__


#: Containers whose contents the notebook can change after a background run started.
_MUTABLE = (MutableSequence, MutableSet, MutableMapping)


class _Taken:
    """An iterable's one iterator, and the length the iterable said (``len()``
    works when it did). ``iter()`` of it gives that same iterator: one-shot,
    as ``map`` reads its input once (:func:`_one_shot`)."""

    __slots__ = ("_iterator", "_n")

    def __init__(self, iterator: Iterator, n: int | None) -> None:
        self._iterator, self._n = iterator, n

    def __iter__(self) -> Iterator:
        return self._iterator

    def __len__(self) -> int:
        if self._n is None:
            raise TypeError("the input has no length")
        return self._n


def _one_shot(it: Any) -> bool:
    """Can ``it`` be read only once (an iterator, or what :func:`_take` took of one)?"""
    return type(it) is _Taken or iter(it) is it


#: Code flags of what map() cannot run in a worker: generator and async functions.
_REFUSED_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def check_not_async(func: Any, func_text: Callable[[], str | None] | None = None, several: bool = False) -> None:
    """UsageError for an ``async def`` function (a partial of one, a bound method, an
    object whose ``__call__`` is one), an async generator function or a generator
    function: map() would give coroutines, async generators or generators, which
    cannot come back from a worker (a generator function ran every item first and
    then failed on sending the results). Refused before anything runs, with a
    plain function that does the work as the fix.

    ``func_text()``: FUNC as the user wrote it (the magic's line), asked only for
    a refusal: the fix calls that (``lambda x: asyncio.run(k.m(x))``), where the
    function's own name would be wrong for a bound method, a partial or a callable
    object. ``several``: FUNC takes several arguments (``star``, or several iterables)."""
    if type(func) is types.FunctionType and not func.__code__.co_flags & _REFUSED_FLAGS:
        return  # the common case, a plain def or lambda: two attribute reads
    target = func.func if isinstance(func, functools.partial) else func
    call = inspect.getattr_static(type(target), "__call__", None)  # (an instance whose __call__ is async def)
    refused = (inspect.isasyncgenfunction, inspect.iscoroutinefunction, inspect.isgeneratorfunction)
    if not any(test(target) for test in refused) and any(test(call) for test in refused):
        name = f"the __call__ of {type(target).__qualname__}"  # (a callable object)
    else:
        name = getattr(target, "__name__", None) or type(target).__name__
    if inspect.isasyncgenfunction(target) or inspect.isasyncgenfunction(call):
        kind = "async generator function (async def with yield)"
        gives = "async generators that never run, and cannot come back from a worker"
    elif inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call):
        kind, gives = "async function (async def)", "coroutines that never run, and cannot come back from a worker"
    elif inspect.isgeneratorfunction(target) or inspect.isgeneratorfunction(call):
        kind = "generator function (def with yield)"
        gives = "generator objects (as serial map() does), which cannot come back from a worker"
    else:
        return
    text = func_text() if func_text is not None else None
    expr, whose = _callable_text(func, text)
    params, args = ("*args", "*args") if several else ("x", "x")
    if kind.startswith("async generator"):
        fix = (f"def run({params}): return asyncio.run(collect({expr}({args}))) with "
               "async def collect(agen): return [v async for v in agen]")
    elif kind.startswith("async"):
        fix = f"lambda {params}: asyncio.run({expr}({args}))"
    else:
        fix = f"lambda {params}: list({expr}({args}))"
    does = "collects it" if "generator" in kind else "runs it"
    raise UsageError(f"{name} is {'an' if kind[0] == 'a' else 'a'} {kind}: map() would give {gives}; map a plain "
                     f"function that {does}, e.g. {fix}{whose}")


def _callable_text(func: Any, text: str | None) -> tuple[str, str]:
    """How :func:`check_not_async`'s fix calls ``func``: ``(expression, what it stands
    for)``. FUNC as written when known (in parentheses unless it is a name, an
    attribute, a call or a subscript); else the function's name for a plain
    function, and ``f`` with what it stands for for anything else."""
    import ast

    if text:
        try:
            node = ast.parse(text.strip(), mode="eval").body
        except SyntaxError:
            node = None
        if node is not None:
            plain = isinstance(node, (ast.Name, ast.Attribute, ast.Call, ast.Subscript))
            return (text.strip() if plain else f"({text.strip()})"), ""
    if isinstance(func, types.FunctionType):
        return func.__name__, ""
    if isinstance(func, types.MethodType):
        owner = func.__self__ if isinstance(func.__self__, type) else type(func.__self__)
        what = f"the bound method {owner.__name__}.{func.__func__.__name__}"
    elif isinstance(func, functools.partial):
        what = f"the functools.partial of {getattr(func.func, '__name__', type(func.func).__name__)}"
    else:
        what = f"the {type(func).__name__} object"
    return "f", f" (f: {what} you passed)"


@overload
def pmap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    compare: bool = False,
    errors: Literal["raise"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    block: Literal[True] = True,
    seed: int | None = None,
) -> list[_T]: ...


@overload
def pmap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    compare: bool = False,
    errors: Literal["collect"],
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    block: Literal[True] = True,
    seed: int | None = None,
) -> list[_T | Failed]: ...


@overload
def pmap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    compare: bool = False,
    errors: Literal["raise"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    block: Literal[False],
    seed: int | None = None,
) -> Run[list[_T]]: ...


@overload
def pmap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    compare: bool = False,
    errors: Literal["collect"],
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    block: Literal[False],
    seed: int | None = None,
) -> Run[list[_T | Failed]]: ...


@overload
def pmap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    compare: bool = False,
    errors: Literal["raise", "collect"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    block: bool = True,
    seed: int | None = None,
) -> list[_T] | list[_T | Failed] | Run[list[_T]] | Run[list[_T | Failed]]: ...


def pmap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    compare: bool = False,
    errors: Literal["raise", "collect"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    block: bool = True,
    seed: int | None = None,
    **refused: Any,
) -> list[_T] | list[_T | Failed] | Run[list[_T]] | Run[list[_T | Failed]]:
    """Parallel ``map(func, *iterables)`` on the managed pool; results in input order.

    ``func`` may be anything defined in a notebook (def, lambda, closure,
    ``functools.partial``, bound method): it travels by value with cloudpickle,
    once per call. ``star=True`` calls ``func(*item)`` (like ``starmap``);
    several iterables are zipped as ``map`` does. ``workers`` limits (or grows)
    the processes used (None or -1, joblib's ``n_jobs=-1``: the whole pool); ``chunksize`` fixes the items per message (automatic by
    default, from measured task times). ``compare=True`` also runs the map
    serially here and reports the measured speedup (not a function using an
    mpmagic ``Queue``, ``Value``, ``Array`` or ``Event``: a serial copy would take
    from the queue or add to the counter again; one line says so, and the
    serial time stays estimated). ``errors="collect"`` puts a
    :class:`~mpmagic.jobs.Failed` in the place of each failing item instead of
    raising. ``timeout`` (seconds) stops an item that runs longer (each item is
    timed, also in a chunk of several) and replaces its worker (one too large to
    wait on, ``10**400`` as ``inf``, is no limit). ``retries`` re-sends an item whose worker died, up to that many
    times (no maximum: one line says so once its worker died 10 times).
    ``progress=True`` shows a bar counting items once the run has lasted
    ``progress_delay`` seconds. ``insights=True`` times every item in the
    workers and attaches per-worker busy / idle / transfer times and the
    slowest items to the report (``last_report().insights``).
    ``checkpoint=True`` (or a folder) stores each finished item's result and
    takes stored ones instead of computing them again (docs/checkpoint.md).
    ``on_chunk(start, results)`` is called as each chunk's results arrive, in
    the calling thread (with ``block=False``, in the run's own thread): a slow
    one delays only this run; if it raises, the run stops with its error.
    Cancelling a background run drops the calls still due for chunks that
    had arrived (``cancel()`` returns at once; a call in progress finishes in
    the run's thread; with ``checkpoint``, ``cancel()`` waits for it).
    ``block=False`` returns a :class:`~mpmagic.background.Run` handle at once
    and runs the map in the background (see ``mpmagic.submit``).
    ``seed=S`` runs item ``i`` with its own random stream from S and ``i``
    (``random``, ``numpy.random``, torch's generator and ``mpmagic.rng()``): the same results
    with any number of workers or chunk size (docs/guide.md, "Setting up workers").
    """
    __tracebackhide__ = True
    if refused:  # (a keyword of another library's or a magic's, ``n=4``: Python's error, with what was meant)
        raise one_line(unexpected_keyword("pmap", refused, keyword_names(pmap)))
    given = iterables
    iterables, workers, chunksize, timeout, retries = check_map_args(func, iterables, workers, chunksize, timeout,
                                                                     errors, star, retries, checkpoint)
    check_flags(compare=compare, show_report=show_report, progress=progress, insights=insights, block=block)
    block = True if block is None else block  # (None: the default, as for the options off by default)
    progress_delay = _check_progress_delay(progress_delay)
    _check_on_chunk(on_chunk)
    if not block:  # the run reads its input later, in its own thread: it takes it as it is now
        iterables = owned(given, iterables)
    given_func = func  # (the user's, for the advice on differing results: seeded() wraps it)
    if seed is not None:
        func, iterables, star = seeded(func, iterables, star, seed)
    if not block:
        from . import background

        if seed is None and not _in_worker_process():  # (as a blocking run's: said as the run starts)
            draws.say_random_draws(given_func, workers, advised=False)
        if _in_worker_process():
            raise UsageError(
                f"a background run (block=False, submit) cannot start {_where_no_pool()}: this process cannot start "
                "workers of its own, and nothing here would wait on the run; call pmap (it runs serially here) "
                "or start the run from the notebook"
            )
        background.check_options(compare=compare)
        say_copied_state(given_func, started=True, positional=None if star else len(iterables))  # (a blocking run's: once it ended)
        one = _map_caller.get() == "call"  # mpmagic.call: result() is the one call's value
        what = f"call {func_name(_called(given_func))}" if one else f"pmap {func_name(func)}"
        finish = _first_result if one else _results_then_drop_input

        def start(func: Callable, iterables: tuple, star: bool, on_chunk: Any = None, resume: Any = None) -> Any:
            def make_call(forward: background.Forward) -> MapCall:
                return map_call(func, iterables, star, workers, chunksize=chunksize, errors=errors, timeout=timeout,
                                retries=retries, insights=insights, out=forward.out, progress=forward.progress,
                                accepted=forward.accepted, on_chunk=forward.then, one_call=one)

            return background.start(what, make_call, lambda call, forward: finish(call.job), workers,
                                    on_chunk=on_chunk, resume=resume, errors=errors, show_report=show_report,
                                    one_call=one)

        if checkpoint:  # only the items the store lacks run (checkpoint.py)
            from .checkpoint import checkpointed_submit

            return checkpointed_submit(start, func, iterables, star=star, errors=errors, location=checkpoint,
                                       what=what, on_chunk=on_chunk, show_report=show_report)
        return start(func, iterables, star, on_chunk)
    if checkpoint:
        from .checkpoint import checkpointed_pmap

        kw = dict(workers=workers, chunksize=chunksize, compare=compare, timeout=timeout, retries=retries,
                  progress=progress, progress_delay=progress_delay, insights=insights)
        return checkpointed_pmap(pmap, func, iterables, star=star, errors=errors, location=checkpoint,
                                 show_report=show_report, set_report=_set_report, get_report=last_report, kwargs=kw,
                                 on_chunk=on_chunk)

    if _in_worker_process():  # a nested call: a worker cannot start workers of its own
        ignored = _ignored_serially(timeout=timeout, compare=compare, workers=workers, chunksize=chunksize,
                                    retries=retries, insights=insights, progress=progress, show_report=show_report)
        results = _serial_in_worker(func, iterables, star, errors == "collect", ignored)
        if on_chunk is not None:
            on_chunk(0, results)  # (one chunk: all of them)
        return results
    # The wall time counts from here: finding the pool (waiting for a start under
    # way, as the first call after %load_ext does) and packing the function are the
    # parallel run's costs too (a first call's line said 40 ms of a 0.4 s call).
    t0 = time.perf_counter()
    if compare:  # both runs need the input: copy one-shot iterators, only as far as map would read
        iterables, star = _reusable(iterables, star)
    n_items = _length(iterables)
    bar = Progress(n_items, "pmap", "item", progress_delay, enabled=progress)
    call = map_call(func, iterables, star, workers, chunksize=chunksize, errors=errors, timeout=timeout,
                    retries=retries, insights=insights, progress=bar.update if progress else None, on_chunk=on_chunk)
    job, star_mode = call.job, call.star
    job.one_time.run_start -= time.perf_counter() - t0  # (workers still starting then count as starting)
    debugging.forget()  # (an interrupted run leaves no stale failure for %pdebug)
    try:
        _run_with_progress(call.backend, job, bar, workers)
    except KeyboardInterrupt as exc:
        _interrupted(call, t0)
        past = job.read_past_line(interrupted=True)  # (an iterator read ahead: the same one goes on from there)
        raise run_interrupted("mpmagic.pmap", exc, f"; {past}" if past else "") from None  # one line, as %pmap's
    except BaseException as exc:  # what stopped the run itself (its on_chunk raised): the report is this run's
        _stopped(call, t0, exc)
        raise
    wall = time.perf_counter() - t0
    options = {"workers": workers, "chunksize": chunksize, "timeout": timeout, "retries": retries}
    try:
        results = job.results()
    except BaseException as exc:
        _name_helpers(exc, job, given_func)
        if past := job.read_past_line(interrupted=False):  # (an iterator read ahead: the same one goes on from there)
            add_note(exc, f"mpmagic: {past}")  # (a checkpoint's run puts its own: drop_read_past_note)
        # (for %pdebug, --rerun-failed: several lists are zipped, read lazily, yet can be listed again)
        debugging.record_map(job, func, None, [], options,
                             items=_listed_again(iterables, given if seed is None else None))
        hide_our_frames(exc)  # (a script's traceback: the caller's line, then the task's frames)
        raise
    finally:
        _reports.report = report = call.report(wall)
    failed = call.failed_items(results)
    for each in failed:
        _name_helpers(each.error, job, given_func)
    report.failed = len(failed)
    debugging.record_map(job, func, results, failed, options)  # for %pdebug, --rerun-failed
    left_out = _left_out_of_compare(results, job.died_under) if compare else {}
    if left_out:
        report.extra["compare_left_out"] = len(left_out)
        _say_left_out(left_out, len(results))
    # A function using shared state (a Queue, a Value...): its serial copy is not the same computation.
    if compare and _no_serial_copy(report, "the function"):
        compare = False
    # With every item left out, nothing is compared: equal stays None, the serial time an estimate.
    if compare and (not left_out or len(left_out) < len(results)):
        mark = len(sys.modules)
        t1 = time.perf_counter()
        try:
            with _random_state_kept(seed is not None):  # seed=: the notebook's own random state stays
                serial = _serial_map(func, iterables, star_mode, errors == "collect", skip=left_out)
        except (Exception, SystemExit) as exc:  # (sys.exit() in a task is its item's error in the workers too)
            _serial_failed(report, exc, "results")
        else:
            report.serial = time.perf_counter() - t1
            report.serial_imports = _imported_since(mark)  # (timed here; the workers had them warm)
            apart = _failed_only_here(serial, results, left_out)
            apart_there = _failed_only_there(serial, results, left_out)
            if left_out:  # the verdict covers the items compared
                serial, results_compared = ([r for i, r in enumerate(lst) if i not in left_out] for lst in (serial, results))
                positions = [i for i in range(len(results)) if i not in left_out]
                report.equal = compare_verdict(report, serial, results_compared, positions=positions)
            else:
                report.equal = compare_verdict(report, serial, results)
            report.extra["seeded"] = seed is not None  # (the advice on differing results: advice.py)
            if report.equal is False:
                if apart:  # (errors="collect": the cause, not random draws or hash())
                    report.extra["failed_only_here"] = apart
                if apart_there:  # (the other way round: the advice speaks despite the failed items)
                    report.extra["failed_only_there"] = apart_there
                report.extra["state"] = payload_cache.state_words(given_func) or payload_cache.changes_words(
                    payload_cache.state_kept_apart(given_func, None if star_mode else len(iterables))) or None
                changes = payload_cache.container_changes(given_func)
                if changes:  # (results.append(x): the advice says what happened, not random draws or hash())
                    report.extra["changes"] = payload_cache.changes_words(changes)
    # (the function's notes in the payload cache: what these looks found at the runs before)
    notes = job.payload_notes if job.func is given_func else None
    if "changes" not in report.extra and not report.extra.get("state"):  # (else the advice says it)
        _say_state_changes(given_func, report.serial is not None, positional=None if star_mode else len(iterables),
                           notes=notes)
    # (not when the payload was reused by its fast check: all it captures is immutable, no iterator)
    if report.equal is not False and job.payload_served[0] != "fast":  # (else the advice names it: state_words)
        _say_iterator_copies(given_func)
    if seed is None:  # (seed=: every item draws from its own stream, the same as serially)
        draws.say_random_draws(given_func, report.workers, advised=show_report and report.equal is False, notes=notes)
    if show_report:
        print(report.line())
    return results


def _failed_only_here(serial: list, results: list, left_out: Container[int]) -> str | None:
    """``compare`` with ``errors="collect"``: the items that raised in the serial run here
    and not in the workers, in words for the advice ("items 1 and 3 raised only in the
    serial run here (RuntimeError: not here 1)"), or None. Such items are why the results
    differ (the function reads what only the workers have: a file, a variable, the process),
    where the advice named random draws and hash()."""
    return _failed_on_one_side(serial, results, left_out, "the serial run here")


def _failed_only_there(serial: list, results: list, left_out: Container[int]) -> str | None:
    """``compare`` with ``errors="collect"``: the items that raised in the workers and not
    in the serial run here, in words for the advice ("items 1 and 3 raised only in the
    workers (ValueError: there 1)"), or None. The function reads what only the notebook
    has; the advice, silent for a run with failed items, names them (advice.advise)."""
    return _failed_on_one_side(results, serial, left_out, "the workers")


def _failed_on_one_side(failing: list, other: list, left_out: Container[int], where: str) -> str | None:
    """The items (first 8) that are ``Failed`` in ``failing`` and not in ``other``, and the
    first one's error, as "items 1 and 3 raised only in WHERE (Error: text)"; None if none."""
    apart = [i for i, (f, o) in enumerate(zip(failing, other, strict=False))
             if i not in left_out and isinstance(f, Failed) and not isinstance(o, Failed)]
    if not apart:
        return None
    shown = [str(i) for i in apart[:8]] + (["..."] if len(apart) > 8 else [])
    which = (f"item {shown[0]}" if len(apart) == 1 else
             f"items {', '.join(shown[:-1])} and {shown[-1]}" if len(apart) <= 8 else f"items {', '.join(shown)}")
    return f"{which} raised only in {where} ({debugging.exception_line(failing[apart[0]].error)})"


def _name_helpers(exc: BaseException, job: MapJob, func: Callable) -> None:
    """An item's error of ours naming one of the run's helpers as its worker described it
    (``mpmagic.Queue made on line 2 of cell In[4] is closed``) names it after the notebook's
    variable the function reads (``mpmagic.Queue 'q'``): serial_copy.name_helpers."""
    helpers = helpers_used(job)
    if helpers and type(exc).__module__.startswith("mpmagic"):
        serial_copy.name_helpers(exc, helpers, *serial_copy.names_read_by(func))


#: The functions (their code) whose changes to a notebook list were said (once each).
_said_changes: weakref.WeakSet[types.CodeType] = weakref.WeakSet()
_UNSAID: Any = object()  # (no look kept in a function's notes: see _say_state_changes)
#: The notebook lists whose bound method mapped was said, with the method ((id, name): a list takes no weak reference).
_said_methods: set[tuple[int, str]] = set()
#: The methods of a list that change it in place (``map(results.append, items)``).
_LIST_CHANGERS = frozenset({"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
                            "__setitem__", "__delitem__", "__iadd__", "__imul__"})


def say_copied_state(func: Callable, started: bool = False, positional: int | None = None) -> None:
    """The notes for notebook state a run's tasks change or advance in the workers'
    copies only (a list it appends to, an iterator it reads), said as a run starts
    (a background run, a stream, the pandas accessor); a blocking pmap says them
    once it ended, with what its report knows. ``positional``: how many arguments each task
    is given (the map's iterables; None: not known, ``star``)."""
    _say_state_changes(func, False, started=started, positional=positional)
    _say_iterator_copies(func)


def _say_state_changes(func: Callable, compared: bool, started: bool = False, positional: int | None = None,
                       notes: dict | None = None) -> None:
    """One line, once per function: a task changed the notebook's list it captures
    (``results.append(x)``), or state it accumulates (``global TOTAL; TOTAL += x``, a
    ``nonlocal`` counter, ``self.n += x`` on the notebook object whose method is mapped, a
    ``seen=[]`` default it fills: payload_cache.state_kept_apart), which changes each
    worker's copy and never the notebook's: the list stays empty, the counter at 0, and each
    task sees only its own worker's earlier changes, silently, as with ``multiprocessing``
    (tutorial22 #2). Lists and numpy arrays only among captured containers: a dict or set a
    task fills is often a worker's own cache on purpose (memoizing), while a list appended to,
    or an array filled by item (``out[i] = x``), is the results the notebook expected. ``compared``: --compare's serial run here did change it, which hides the
    mistake. ``started``: said as the run starts (imap, submit, the pandas accessor), not once it
    ended. The function may also be a bound method of a notebook list itself
    (``pmap(results.append, items)``), which has no code to read. ``positional``: how many
    arguments each task is given (a default they replace is no state; None: not known).
    ``notes``: the function's notes in the payload cache (``payload_cache.last_notes``: the
    function and all it captures are the objects of the runs before); once a look found
    nothing to say for these arguments, it is not made again."""
    if notes is not None and notes.get("state", _UNSAID) == positional:
        return  # (nothing changed, found by a look at these very objects)
    inner = func.func if isinstance(func, functools.partial) else func
    if isinstance(inner, (types.BuiltinMethodType, types.MethodWrapperType)):
        _say_list_method(inner, compared, started)
        return
    function = payload_cache.function_of(inner)[0]  # (a bound method's, a callable instance's __call__)
    if function is None:
        return
    code = function.__code__
    captured, accumulates = payload_cache.changes_captured(code), payload_cache.accumulates(code)
    if not (captured or accumulates) or code in _said_changes:
        if notes is not None and not (captured or accumulates):
            notes["state"] = positional
        return  # (each call: look-ups in the caches of what each code object changes)
    changes = payload_cache.container_changes(func, payload_cache.filled_kinds(), deep=False) if captured else []
    if accumulates:
        changes += [c for c in payload_cache.state_kept_apart(func, positional) if c not in changes]
    if not changes:
        if notes is not None:
            notes["state"] = positional
        return
    _said_changes.add(code)
    filled = (" (only --compare's serial run here changed it)" if compared
              else ": it stays as it was before the run" if started else ": it is as it was before the run")
    sys.stderr.write(f"mpmagic: {payload_cache.changes_words(changes)} in the workers' copies, not in the "
                     f"notebook{filled}; return the values (the map's results) and combine them here, or put "
                     "them in an mpmagic.Queue\n")


#: The functions (their code) whose captured iterators were said (once each).
_said_iterators: weakref.WeakSet[types.CodeType] = weakref.WeakSet()


def _say_iterator_copies(func: Callable) -> None:
    """One line, once per function: it reads an iterator the notebook holds (``ids =
    itertools.count()``, ``next(ids)`` for unique ids): each worker advances its own copy,
    from the iterator's state at the call, so items can get the same values where serially
    one iterator goes on, silently (and the notebook's never moves)."""
    inner = func.func if isinstance(func, functools.partial) else func
    code = getattr(getattr(inner, "__func__", inner), "__code__", None)
    if type(code) is not types.CodeType or code in _said_iterators:
        return
    uses = payload_cache.iterators_advanced(func)
    if not uses:
        return
    _said_iterators.add(code)
    sys.stderr.write(f"mpmagic: {uses[0].words()} in each worker's copy, from where it was at the call, so items "
                     f"can get the same values (serially one iterator goes on); take its values here and pass them "
                     f"with the items (zip({uses[0].name}, items), with star=True / --star)\n")


def _say_list_method(method: Any, compared: bool, started: bool) -> None:
    """``pmap(results.append, items)``: the bound method of a list the notebook holds
    (a global of ``__main__``) changes each worker's copy of the list, never the
    notebook's: one line, once per list and method. A list no notebook name holds
    (``[].append``) is seen by nobody, serially either: nothing is said."""
    target = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "")
    if not isinstance(target, list) or name not in _LIST_CHANGERS or (id(target), name) in _said_methods:
        return
    main = getattr(sys.modules.get("__main__"), "__dict__", {})
    held = next((k for k, v in list(main.items()) if v is target and not k.startswith("_")), None)
    if held is None:
        return
    if len(_said_methods) > 1024:  # (ids of lists long gone: bounded)
        _said_methods.clear()
    _said_methods.add((id(target), name))
    filled = (" (only --compare's serial run here changed it)" if compared
              else ": it stays as it was before the run" if started else ": it is as it was before the run")
    sys.stderr.write(f"mpmagic: {held}.{name} changes the notebook's list `{held}` in the workers' copies, not in "
                     f"the notebook{filled}; call it here (for x in items: {held}.{name}(x)): a list's method is no "
                     "work to spread over workers\n")


def seeded(func: Callable[..., Any], iterables: tuple, star: bool, seed: int) -> tuple[Callable[..., Any], tuple, bool]:
    """``seed=S`` (``pmap``, ``imap``): per-item random streams (seeding.py). The items
    are numbered and the function wrapped; returns the new (func, iterables, star)."""
    from . import seeding

    seed = seeding._check_seed(seed)
    src = iterables[0] if len(iterables) == 1 else zip(*iterables, strict=False)
    star = star or len(iterables) > 1
    pairs = enumerate(src) if _one_shot(src) else _Enumerated(src)  # one-shot stays one-shot
    return seeding.Seeded(func, seed, star), (pairs,), False


def _serial_map(
    func: Callable, iterables: tuple, star: bool, collect: bool, note_items: bool = False, skip: Container[int] = ()
) -> list:
    """``map`` (``starmap``) here, in the notebook or a worker; with ``collect`` a
    failing item's place holds its :class:`~mpmagic.jobs.Failed`, as in parallel
    results (``compare``'s serial run raised there, and the results were lost).
    ``note_items``: a failing item's error gets the note the pool gives it
    ("raised by item 3 of the input: f(3)"), and our frames are left out of its
    traceback (a map run serially inside a task). ``skip``: positions not called
    (their places hold None): ``compare`` leaves out what killed a worker or timed out."""
    __tracebackhide__ = True
    items = iterables[0] if len(iterables) == 1 else zip(*iterables, strict=False)
    star = star or len(iterables) > 1
    if not collect and not note_items and not skip:
        return list(itertools.starmap(func, items)) if star else list(map(func, items))
    results: list = []
    for i, item in enumerate(items):
        if i in skip:
            results.append(None)
            continue
        try:
            results.append(func(*item) if star else func(item))
        except (Exception, SystemExit) as exc:  # (as the workers collect it)
            if not collect:
                add_note(exc, item_note(func, star, i, item))
                drop_our_frames(exc)
                raise
            results.append(Failed(i, item, exc))
    return results


def _left_out_of_compare(results: list, died_under: set[int]) -> dict[int, str]:
    """The items ``compare``'s serial run must not call here, by position, with why
    ("timeout" or "died"): those the notebook does not run again
    (``errors.unsafe_here``, %pdebug's rule: their worker died under them, or they
    ran past the timeout), and those whose worker died under them before a retry
    succeeded. Called here, they could exit or hang the notebook, and lose the
    parallel results with it."""
    out = {i: "died" for i in died_under if i < len(results)}
    for r in results:
        if isinstance(r, Failed) and unsafe_here(r.error):
            out[r.index] = "timeout" if isinstance(r.error, TaskTimeoutError) else "died"
    return out


def _no_serial_copy(report: Report, where: str) -> bool:
    """``compare``: does the run's use of shared state (``report.extra["shared_state"]``,
    :mod:`mpmagic.serial_copy`) forbid the serial copy? If so, one line says why and the
    report keeps the estimated serial time, saying why on its line."""
    no = report.extra.get("shared_state")
    if no is None:
        return False
    report.extra["compare_skipped"] = f"{where} uses {no.what}"
    serial_copy.say(no, where, sys.stderr.write)
    return True


def _say_left_out(left_out: dict[int, str], total: int) -> None:
    """One line: which items ``compare``'s serial run leaves out, and why."""
    parts = []
    for why in ("died", "timeout"):
        idx = sorted(i for i, w in left_out.items() if w == why)
        if not idx:
            continue
        items = f"item{'s' if len(idx) > 1 else ''} " + ", ".join(map(str, idx[:8])) + (", ..." if len(idx) > 8 else "")
        if why == "died":
            parts.append(f"the worker{'s' if len(idx) > 1 else ''} running {items} died")
        else:
            parts.append(f"{items} ran past the timeout")
    n, rest = len(left_out), total - len(left_out)
    # Every item left out: no verdict over 0 items, and the report's serial time stays an estimate.
    covered = (f"the verdict and the serial time cover the other {rest} item{'s' if rest != 1 else ''}" if rest > 0
               else "that leaves no item to run here, so nothing was compared and the serial time is estimated")
    sys.stderr.write(f"mpmagic: compare=True (--compare): {' and '.join(parts)} in the parallel run, so "
                     f"{'they are' if n > 1 else 'it is'} not run here, where {'they' if n > 1 else 'it'} could do the "
                     f"same to the notebook; {covered}\n")


def _serial_failed(report: Report, exc: BaseException, what: str) -> None:
    """``compare``'s serial run raised where the parallel run did not: the parallel
    ``what`` are kept and returned, and one line says why nothing was measured."""
    report.serial_error = f"{type(exc).__name__}: {exc}"
    sys.stderr.write(f"mpmagic: compare=True (--compare): the serial run here raised {report.serial_error}; the parallel "
                     f"{what} are kept, and the serial time is not measured\n")


class MapCall:
    """One map's job and what its report needs, made the same way for every caller
    (a blocking ``pmap``, a background run, a stream)."""

    def __init__(self, func: Callable, iterables: tuple, star: bool, workers: int | None, *,
                 job_class: type = MapJob, insights: bool = False, errors: str = "raise", one_call: bool = False,
                 **kwargs: Any) -> None:
        self.n_items = _length(iterables)
        if len(iterables) == 1:
            items, self.star = iterables[0], star  # MapJob slices a list or tuple, iterates the rest
        else:
            items, self.star = zip(*iterables, strict=False), True
        self.backend = get_pool()
        self.backend.check_workers(workers)  # before the run is made: a mistake in the call shows no report
        self.workers = workers or self.backend.workers
        self.cold = self.backend.cold
        self.collect = errors == "collect"
        # (a timeout with no chunk size sends one item per chunk: the advice names --timeout, not --chunksize)
        self.chunks_of_timeout = bool(kwargs.get("timeout")) and not kwargs.get("chunksize")
        # (a stream's sets "imap": its report's lines say so; mpmagic.call's is "call")
        self.caller = "call" if one_call else ""
        if one_call:  # (its messages name the call, not "item 0")
            kwargs["one_call"] = True
        self.recorder = Recorder("pmap", getattr(func, "__name__", "func"), self.star) if insights else None
        self.job = job_class(func, items, self.n_items, self.star, self.workers, collect=self.collect,
                             insights=self.recorder, shared_memory=self.backend.shares_memory,
                             iterables=iterables, **kwargs)

    def report(self, wall: float, *, interrupted: bool = False, stopped_by: str | None = None) -> Report:
        """The timing report of the finished job (``wall`` seconds from submit to end);
        ``interrupted``: of a run stopped by an interrupt (items: those that finished);
        ``stopped_by``: the name of the error of its own that stopped it (its line says so)."""
        job, backend = self.job, self.backend
        fields = _payload_costs(job, wall, _measured(job, backend, self.cold, self.recorder, job.ran_on or self.workers,
                                                     _func_libs(job.func)))
        fields["kind"] = "pmap"
        fields["caller"] = self.caller
        fields["interrupted"] = interrupted
        fields["items"] = job.items_done
        # What ran: on Dask, -n capped by the cluster's free worker threads (backends/base.py).
        fields["workers"] = job.ran_on or self.workers
        fields["worker_noun"] = "worker" if job.ran_on is None else "worker thread"
        fields["backend"] = backend.name
        fields["start_method"] = backend.start_method
        fields["wall"] = wall
        fields["task_seconds"] = job.task_seconds
        fields["chunks"] = job.n_chunks
        fields["chunksize"] = job.planner.describe()
        fields["chunksize_asked"] = job.planner.cut_from
        fields["failed_at"] = job.failure_index
        fields["total"] = self.n_items
        report = Report.of(fields)
        if self.chunks_of_timeout:
            report.extra["timeout_chunks"] = True
        if job.timeout:
            report.extra["timed"] = True  # (advice: a chunk size kept, not dropped, under --timeout)
        helpers = helpers_used(job)
        if helpers:  # (a Queue, a Value...: compare=True runs no serial copy, see serial_copy.py)
            names, globals_ = serial_copy.names_read_by(job.func)
            no = serial_copy.judge(helpers, names, globals_)
            if no is not None:
                report.extra["shared_state"] = no
        if stopped_by is not None:
            report.extra.update(error=True, stopped_by=stopped_by)
        return report

    def failed_items(self, results: list) -> list:
        """The Failed items among ``results`` (only ``errors="collect"`` puts them there)."""
        if not self.collect:  # saves a pass over 10^7 results
            return []
        return [r for r in results if isinstance(r, Failed)]


#: Preparing the function took this share of the call (and 5 ms or more): name what it captures.
_PAYLOAD_SHARE = 0.2


def _payload_costs(job: MapJob, wall: float, fields: dict[str, Any]) -> dict[str, Any]:
    """The report's fields for preparing the function's payload here (see Report.payload_seconds),
    added to ``fields`` (returned).

    The captured globals are looked up by name only when the preparation took
    a good part of the call (the advice may then name them): the lookup reads
    sizes, it pickles nothing."""
    served, nbytes = job.payload_served
    seconds = job.payload_seconds
    freed = job.payload_freed_seconds
    captures: tuple = ()
    own = seconds - freed  # (freeing arrays the notebook dropped is no cost of this function)
    if own >= 0.005 and own >= _PAYLOAD_SHARE * wall and served in ("same", "built"):
        func: Any = job.func
        if getattr(func, "mpmagic_item", None) is not None:  # seed= (seeding.Seeded): the user's function
            func = func.func
        captures = tuple(payload_cache.large_captures(func))
    fields["payload_seconds"] = seconds
    fields["payload_freed_seconds"] = freed
    fields["payload_served"] = "" if served == "given" else served
    fields["payload_bytes"] = nbytes
    fields["payload_captures"] = captures
    return fields


def map_call(func: Callable, iterables: tuple, star: bool, workers: int | None, **kwargs: Any) -> MapCall:
    """A :class:`MapCall` (the job of a map and its report's inputs)."""
    return MapCall(func, iterables, star, workers, **kwargs)


@overload
def submit(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    compare: bool = False,
    errors: Literal["raise"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    seed: int | None = None,
) -> Run[list[_T]]: ...


@overload
def submit(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    compare: bool = False,
    errors: Literal["collect"],
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    seed: int | None = None,
) -> Run[list[_T | Failed]]: ...


@overload
def submit(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    compare: bool = False,
    errors: Literal["raise", "collect"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    seed: int | None = None,
) -> Run[list[_T]] | Run[list[_T | Failed]]: ...


def submit(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    compare: bool = False,
    errors: Literal["raise", "collect"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    seed: int | None = None,
    **refused: Any,
) -> Run[list[_T]] | Run[list[_T | Failed]]:
    """``pmap(func, *iterables, block=False, ...)``: a :class:`~mpmagic.background.Run`
    handle at once, the map in the background (``result()``, ``cancel()``, ``report()``).
    A map, not ``Executor.submit``: ``submit(f, "abc")`` calls ``f`` on each of
    ``"a"``, ``"b"``, ``"c"`` and ``result()`` is the list; for one call ``f(x)``
    use :func:`call` (``call(f, x).result()`` is ``f(x)``).
    The options are ``pmap``'s (all but ``block``); ``show_report=True`` shows the
    timing report in the run's live area once it ended. The run takes its input as
    it is now, as ``Executor.submit`` takes its arguments: a list, dict, set or other
    mutable container is copied shallowly, a numpy array (pandas object) copied
    (its memory once more until the run ends); the items themselves are not
    copied, and a generator is read as the run goes."""
    __tracebackhide__ = True
    _no_block("submit", refused)
    caller = _map_caller.set("submit")
    try:
        return pmap(func, *iterables, workers=workers, chunksize=chunksize, star=star, compare=compare, errors=errors,
                    timeout=timeout, retries=retries, show_report=show_report, progress=progress,
                    progress_delay=progress_delay, insights=insights, checkpoint=checkpoint, on_chunk=on_chunk,
                    block=False, seed=seed)
    finally:
        _map_caller.reset(caller)


#: Which public call a map is made for ("pmap", "submit", "call", "apmap"): submit's
#: refusal of a non-iterable names call(); call's run gives one value.
_map_caller: contextvars.ContextVar[str] = contextvars.ContextVar("mpmagic_map_caller", default="pmap")


def call(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Run[_T]:
    """``func(*args, **kwargs)`` once, in a worker, in the background: a
    :class:`~mpmagic.background.Run` handle at once, whose ``result()`` is
    ``func``'s return value (or raises its error, as ``pmap`` does). The
    equivalent of ``Executor.submit(fn, *args, **kwargs)`` and
    ``Pool.apply_async(fn, args, kwds)``: one call, one result; ``submit``
    is a map. It is ``submit(func, [args], star=True)`` with ``kwargs``
    bound, on the same pool and engine (``cancel()``, ``add_done_callback``,
    ``concurrent.futures.wait`` / ``as_completed`` over several handles),
    and it takes its arguments as they are now. Every keyword goes to
    ``func``: for run options (``timeout``, ``retries``...) use ``submit``.
    Being one call, not a map, its error's note, its report's line, its row in
    ``%pool runs`` and its log records name the call, never "item 0".
    """
    __tracebackhide__ = True
    if not callable(func):
        raise UsageError(f"the first argument must be a function to call, not {type(func).__name__} "
                         f"{payload_repr(func)}")
    task: Callable[..., _T] = functools.partial(func, **kwargs) if kwargs else func
    caller = _map_caller.set("call")
    try:
        run = pmap(task, [args], star=True, block=False)
    finally:
        _map_caller.reset(caller)
    # (its finish gives the one result, not the list: _first_result)
    return run  # type: ignore[return-value]


def _called(func: Callable) -> Callable:
    """The function ``call`` calls: ``call(f, x, k=1)`` runs ``partial(f, k=1)``, named ``f``."""
    while isinstance(func, functools.partial):
        func = func.func
    return func


def _no_block(caller: str, refused: dict[str, Any]) -> None:
    """``submit``/``apmap`` take every ``pmap`` option by name but ``block``; their
    ``**refused`` catches it for a one-line error (type checkers see no such parameter)."""
    if "block" in refused:
        raise UsageError(f"{caller}() takes no block=: it always runs the map in the background "
                         "(mpmagic.pmap(...) waits for the results)")
    if caller == "apmap" and "compare" in refused:
        raise UsageError("apmap() takes no compare=: its serial run would block the event loop; "
                         "mpmagic.pmap(..., compare=True) runs both (from a coroutine: in asyncio.to_thread)")
    if refused:
        # (Python's own TypeError and words, shown as its one line: not with this frame of ours)
        raise one_line(unexpected_keyword(caller, refused, keyword_names(submit if caller == "submit" else apmap)))


#: Seconds between wake-ups of the event loop while ``apmap`` waits: ipykernel
#: acts on "interrupt kernel" in an async cell only when its loop wakes up.
_APMAP_WAKE = 0.1


@overload
async def apmap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    errors: Literal["raise"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    seed: int | None = None,
) -> list[_T]: ...


@overload
async def apmap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    errors: Literal["collect"],
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    seed: int | None = None,
) -> list[_T | Failed]: ...


@overload
async def apmap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    errors: Literal["raise", "collect"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    seed: int | None = None,
) -> list[_T] | list[_T | Failed]: ...


async def apmap(
    func: Callable[..., _T],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | None = None,
    star: bool = False,
    errors: Literal["raise", "collect"] = "raise",
    timeout: float | None = None,
    retries: int = 0,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    on_chunk: Callable[[int, list[Any]], None] | None = None,
    seed: int | None = None,
    **refused: Any,
) -> list[_T] | list[_T | Failed]:
    """``await apmap(func, xs)``: ``pmap`` awaited from asyncio code, without blocking the loop.

    The run completes an asyncio future through ``loop.call_soon_threadsafe``;
    cancelling the awaiting task (or interrupting the kernel) cancels the run,
    and the ``CancelledError`` shows as one line. What the tasks print is
    printed here while the coroutine waits, as ``pmap`` prints it (in the cell
    that awaits it; in a terminal or script, on stdout/stderr): nobody holds
    the background run's handle, whose ``output`` was the only place it went.
    Its iterables are plain ones, as ``pmap``'s: an async generator is refused
    in one line (collect its items first: ``[x async for x in agen]``).
    """
    __tracebackhide__ = True  # (a cancelled await shows the user's line, not this one)
    import asyncio

    from . import background
    from .errors import OneLine

    _no_block("apmap", refused)
    if _in_worker_process():  # as pmap there: serially, with the same note (no pool to wait on)
        caller = _serial_caller.set("apmap")
        try:
            return pmap(func, *iterables, workers=workers, chunksize=chunksize, star=star, errors=errors,
                        timeout=timeout, retries=retries, show_report=show_report, progress=progress,
                        progress_delay=progress_delay, insights=insights, checkpoint=checkpoint, on_chunk=on_chunk,
                        seed=seed)
        finally:
            _serial_caller.reset(caller)
    relay = background.relay_output.set(True)
    caller = _map_caller.set("apmap")  # (its refusals name apmap's arguments as pmap's, never submit's)
    try:
        run = pmap(func, *iterables, workers=workers, chunksize=chunksize, star=star, errors=errors,
                   timeout=timeout, retries=retries, show_report=show_report, progress=progress,
                   progress_delay=progress_delay, insights=insights, checkpoint=checkpoint, on_chunk=on_chunk,
                   block=False, seed=seed)
    finally:
        _map_caller.reset(caller)
        background.relay_output.reset(relay)
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle() -> None:
        if not future.done():
            future.set_result(None)

    def settle_soon(_run: Any) -> None:
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop was closed meanwhile (asyncio.run ended): nobody awaits it
            pass

    run.add_done_callback(settle_soon)
    try:
        while not future.done():  # (woken now and then: a bare await let an interrupt wait for the whole run)
            await asyncio.wait({future}, timeout=_APMAP_WAKE)
            run._sink.relay_here()
    except asyncio.CancelledError as exc:
        await loop.run_in_executor(None, run.cancel)
        run._sink.relay_here()
        message = (f"mpmagic.apmap was cancelled: run {run.id} ({run.what}) stopped after {run.items_done} of "
                   f"{run.items_total if run.items_total is not None else '?'} {noun('items', run.items_total)}")
        # str(exc) too, not only the rendered line: a kernel's error reply carries str(exc) as
        # its evalue, which nbclient, papermill and logs show ("CancelledError: " alone before).
        exc.args = (message,)
        exc._render_traceback_ = OneLine(f"CancelledError: {message}")  # type: ignore[attr-defined]
        raise
    return run.result(0)


class _random_state_kept:  # noqa: N801 (used as a function: `with _random_state_kept(keep):`)
    """Restore ``random``'s, numpy's and torch's global state after a seeded serial run here.

    A class, not ``contextlib.contextmanager``: that one sets ``__traceback__``
    on an exception passing through, via the class's own ``__setattr__``
    (a frozen dataclass exception became a FrozenInstanceError).
    """

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.saved: tuple[Any, Any, Any] | None = None

    def __enter__(self) -> None:
        if self.keep:
            import random

            np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
            self.saved = (random.getstate(), (np.random.get_state() if np is not None else None),
                          (torch.get_rng_state() if torch is not None else None))

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.saved is not None:
            import random

            from . import seeding

            seeding.forget()  # (what its first item kept: restored here, never by a later call)

            random.setstate(self.saved[0])
            np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
            if np is not None and self.saved[1] is not None:
                np.random.set_state(self.saved[1])
            if torch is not None and self.saved[2] is not None:
                torch.set_rng_state(self.saved[2])


class _Enumerated:
    """``enumerate(items)`` that can be iterated again and keeps ``len`` (for ``seed=``)."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Any:
        return enumerate(self.items)


def _run_with_progress(backend: Backend, job: Job, bar: Progress, workers: int | None) -> None:
    """Submit the job and wait for it here, printing its output and moving its bar.

    Ctrl-C (or the kernel's interrupt) lands in this wait: it cancels this run
    only (other threads' runs go on), shows what its workers printed, and
    re-raises. The bar is made once the run has lasted its delay (this wait wakes
    then; not if the run is over by then), and closed however the run ends (done,
    error, interrupt).
    """
    __tracebackhide__ = True
    restore_interrupts()  # this run's interrupt is its own, not a repeat of the last one's
    try:
        handed: EngineRun | None = None
        try:
            handed = run = backend.submit(job, workers=workers)
            due = bar.due_in()
            if due is not None and (due == 0 or not run.wait(due)):
                bar.show(ended=run.done())
            run.wait()
        except KeyboardInterrupt as exc:
            # (no handle: the Ctrl-C came as submit handed the run over; None: before it began)
            hit = handed or backend.run_of(job)
            if hit is None:
                raise
            run = hit
            stopped = run.cancel_interrupted()
            if not run.workers_stopped and interrupt_outcome(exc) is None:
                # (no worker was busy with it, or it had just ended as the interrupt came: the
                # one line must not say its workers were replaced)
                set_interrupt_outcome(exc, NOT_STARTED_OUTCOME if stopped and not run.units_sent else IDLE_OUTCOME)
            raise
        if run.error is not None:
            raise exiting.raised(run.error)  # (a daemon thread's run the exit stopped: the thread ends silently)
    except KeyboardInterrupt:
        absorb_late_interrupts()  # more presses of interrupt are repeats of this one
        bar.close("interrupted")
        raise
    except BaseException as exc:
        bar.close("error")
        drop_our_frames(exc)  # e.g. a generator input that raised: the user sees its frame, not ours
        raise
    finally:
        bar.close("error" if job.failed else "done")


def _measured(job: Any, backend: Backend, cold: bool, recorder: Recorder | None, workers: int,
              libs: Callable[[], Iterable[str]] = tuple) -> dict[str, Any]:
    """What the report's advice reasons from, and the insights, as Report fields.

    ``libs()``: the modules the tasks use (what a thread cap applies to).
    """
    cores = recent_cpus() if backend.name == "local" else None
    one_time = job.one_time.summary(cold)  # imports, loading, start: not the work (warmup.py)
    if one_time["temporary"] is not None:  # (a cell's temporary workers: the advice names the pool's size)
        one_time["temporary"]["pool"] = backend.workers
    # (one dict, filled in place: the report takes it as keywords, with the payload's costs)
    fields: dict[str, Any] = {
        "task_imports": one_time["task_imports"],
        "task_import_workers": one_time["task_import_workers"],
        "retried": job.retried,
        "ran_again": tuple(job.ran_again),
        "ran_again_cause": job.ran_again_cause,
        "timed_out": job.timed_out,
        "shared_workers": job.shared_workers,
        "waited_for_workers": job.waited_for_workers,
        # (a worker's setup still running when the run's units came: no item's time)
        "waited_for_setup": max(job.setup_waits.values()) if job.setup_waits else 0.0,
        "setup_wait_seconds": sum(job.setup_waits.values()),
    }
    if cores:
        if workers > cores or backend.workers > cores:  # (never more busy at once than workers)
            fields["peak_busy"], fields["over_cores_seconds"] = _busy_at_once(job.spans, cores)
        # The libraries first: a function that uses none of them (looked up in a
        # cache) skips the cap's reads of the notebook's environment.
        modules = libs()
        used = tuple(sorted({m.partition(".")[0] for m in modules} & _THREADED_LIBS)) if modules else ()
        capped = _threads_capped(backend.workers, cores) if used else None
        if capped is not None:
            fields["capped_threads"], fields["capped_libs"] = capped, used
    fields["cold_start"] = cold
    fields["cores"] = cores
    fields["bytes_sent"] = job.bytes_sent
    fields["bytes_back"] = job.bytes_back
    fields["bytes_shared"] = job.bytes_shared
    fields["cpu_seconds"] = job.cpu_seconds
    fields["runq_seconds"] = job.runq_seconds
    helpers = job.helper_wait  # (seconds blocked in mpmagic's helpers, by kind: MapJob, CellJob)
    fields["helper_wait_seconds"] = sum(helpers.values())
    fields["helper_wait_kinds"] = tuple(sorted(helpers, key=lambda kind: -helpers[kind])) if helpers else ()
    fields["slowest_task"] = job.slowest_task or None
    fields["slowest_where"] = job.slowest_where
    fields["insights"] = recorder.finish(workers) if recorder is not None else None
    fields["one_time"] = one_time
    fields["extra"] = {"error": True} if job.kind == "map" and job.failed else {}
    return fields


#: Libraries whose thread pools the workers' thread cap (worker_threads) limits.
_THREADED_LIBS = frozenset({"numpy", "scipy", "torch", "sklearn", "numexpr"})


def _threads_capped(pool_workers: int, cores: int) -> int | None:
    """The BLAS/OpenMP threads each worker may run, when the cap (worker_threads)
    is below the cores a serial run here uses; None when not capped so."""
    cap, notebook = cap_for(max(1, pool_workers), configured())
    if cap is None or notebook or cap >= cores:  # (the notebook's own OMP_NUM_THREADS... win in the workers)
        return None
    return cap


def _busy_at_once(spans: list[tuple[float, float]], cores: int) -> tuple[int, float]:
    """(most chunks running at the same moment, seconds during which more than ``cores`` ran)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    busy = peak = 0
    over, last = 0.0, 0.0
    for t, step in events:  # (at equal times an end, -1, comes before a start)
        if busy > cores:
            over += t - last
        busy += step
        last = t
        peak = max(peak, busy)
    return peak, over


def _func_libs(func: Any) -> Callable[[], list[str]]:
    """The modules ``func`` uses (warmup.function_modules), when asked."""
    def libs() -> list[str]:
        f = getattr(func, "func", func)  # (a Seeded or partial: the user's function)
        try:
            return _function_modules_cached(f) if type(f) is types.FunctionType else function_modules(f)
        except Exception:
            return []

    return libs


def payload_repr(obj: Any) -> str:
    from .jobs import short_repr

    return short_repr(obj, 40)


def _listed_again(iterables: tuple, given: tuple | None = None) -> list | None:
    """The input of a run that raised, as a list of its own, for ``--rerun-failed``
    (the items that never ran are sent from it): several lists (tuples, ranges)
    zipped, as ``map`` pairs them; one list copied (its pointers: ~10 ms per million
    items), as a set, dict, dict view, str or bytes is listed, in ``map``'s order.
    The user's own list was kept: reversed or cleared before the re-run, its new
    items were sent, mixed silently with the first run's results (or an IndexError),
    and a set or dict was refused as "an iterator that is used up". None for a tuple
    or range (the job keeps those: they cannot change), and for an input read once
    or not copied here (an iterator; a numpy array or pandas object: its memory).

    ``given``: the iterables as the caller passed them (None when the run maps others:
    ``seed``'s; ``compare`` may have zipped them into one list). A sequence, set or mapping the run read through its one iterator
    (:class:`_Taken`: a deque, an ``array.array``, a ``UserList``, an ``OrderedDict``)
    is read again from the caller's object: it gives the same items each time, as
    the builtin containers do. It was refused as "read as it went and not kept (an
    iterator...)". Another iterable's ``__iter__`` is not called again: it may hand
    its data out once (a queue drain), and the re-run would send other items."""
    if given is None or len(given) != len(iterables):  # (compare zipped one-shot inputs into one list)
        given = iterables
    again = [_read_again(it, g) for it, g in zip(iterables, given, strict=True)]
    if any(it is None for it in again):
        return None
    if len(again) > 1:
        return list(zip(*again, strict=False))
    if type(again[0]) in (tuple, range):
        return None
    return list(again[0])


#: Kinds of iterable whose ``__iter__`` gives the same items each time, by their contract.
_CONTAINERS = (Sequence, Set, Mapping)


def _read_again(taken: Any, given: Any) -> Any:
    """What gives ``map``'s items of one input again (``taken``, or the caller's
    ``given`` container when the run read the one iterator it gave), or None."""
    if type(taken) in _REITERABLE:
        return taken
    if type(taken) is _Taken and isinstance(given, _CONTAINERS):
        return given
    return None


def _length(iterables: tuple) -> int | None:
    """How many items ``map`` will produce, when every iterable says its length; else None.

    ``len()`` raises OverflowError past ``sys.maxsize`` (``range(10**20)``):
    such an iterable is never the shortest one of a finite map, so it is left
    out of the minimum (alone, the length is unknown and the input is read lazily).
    """
    lengths = []
    for it in iterables:
        try:
            lengths.append(len(it))
        except OverflowError:
            continue
        except Exception:  # no length (an iterator; or its __len__ raised, which map never calls)
            return None
    if len(lengths) == 1:  # (one iterable, the usual: its length, with no call of min)
        return lengths[0]
    return min(lengths) if lengths else None


def _reusable(iterables: tuple, star: bool) -> tuple[tuple, bool]:
    """The input of a ``compare`` run (read twice), without reading more than ``map`` does.

    One-shot iterators are copied into lists. With several iterables they are
    zipped first, as ``map`` does, so an endless one (``itertools.repeat(2)``)
    is read only as far as the shortest: the result is one list of argument
    tuples, run with ``star`` (the second value returned). Lists, tuples,
    ranges and other re-iterable inputs are used as they are.
    """
    if not any(_one_shot(it) for it in iterables):
        return iterables, star
    if len(iterables) == 1:
        return (_copied(iterables[0]),), star
    return (_copied(zip(*iterables, strict=False)),), True


class _Replay:
    """What a one-shot input gave before it raised: each iteration yields those
    items, then raises the same error (both runs of ``compare`` meet it where
    serial map met it, after the items before it, one of which may fail first)."""

    def __init__(self, items: list, error: Exception) -> None:
        self.items, self.error, self.tb = items, error, error.__traceback__

    def __iter__(self) -> Iterator:
        yield from self.items
        raise self.error.with_traceback(self.tb)  # (from its own traceback each time: it would grow)


def _copied(source: Iterable) -> list | _Replay:
    """A one-shot input read out for ``compare``'s two runs; an iterator among its items
    (a groupby's group, emptied by this reading) is the error at its place, as a lazy
    input's is (``jobs.live_iterator``): both runs stop there, after the items before it."""
    items: list = []
    try:
        items.extend(source)  # (extend keeps what was read before a raise)
    except Exception as exc:
        return _Replay(items, exc)
    if (refused := live_iterator(0, items, ends_only=False)) is not None:
        keep, error = refused
        return _Replay(items[:keep], error)
    return items


_nested_noted: set[tuple[str, tuple[str, ...]]] = set()


def _in_worker_process() -> bool:
    """True where no pool can start: in a daemonic process (our workers, Dask's),
    which multiprocessing forbids to have children, or in a process forked from
    the notebook after its pool was made (``pool.forked_from_pool``: that pool
    is the parent's)."""
    return bool(multiprocessing.current_process().daemon) or forked_from_pool()


def _where_no_pool() -> str:
    """Where this process is, for a message (``_in_worker_process`` is True)."""
    return "in a process forked from the notebook" if forked_from_pool() else "inside a worker"


#: Which call a map run serially here came from, for its note (``apmap`` runs ``pmap``).
_serial_caller: contextvars.ContextVar[str] = contextvars.ContextVar("mpmagic_serial_caller", default="pmap")


def _serial_in_worker(func: Callable, iterables: tuple, star: bool, collect: bool, ignored: Iterable[str] = (),
                      caller: str | None = None) -> list:
    """``pmap`` called inside a worker: run it serially there, with a note the first time.

    A worker process is daemonic, and a daemonic process may not start
    processes ("daemonic processes are not allowed to have children"). The
    outer map already uses every worker, so a serial inner map loses nothing.
    A process forked from the notebook after its pool started cannot use
    that pool (its manager thread is gone, its workers are the parent's),
    and runs the map serially too. ``ignored``: the options given that have
    no meaning in a serial map (``timeout=``: no worker to stop); the note
    names them, once per set of them.
    """
    __tracebackhide__ = True
    ignored = tuple(ignored)
    caller = caller or _serial_caller.get()
    if (caller, ignored) not in _nested_noted:
        _nested_noted.add((caller, ignored))
        if forked_from_pool():
            why = (f"mpmagic: {caller} called in a process forked from the notebook runs serially there "
                   "(the notebook's pool belongs to the notebook process)")
        else:
            why = (f"mpmagic: {caller} called inside a worker runs serially in that worker "
                   "(a worker process cannot start workers of its own)")
        if ignored:
            # (a %pmap line in a task, task_shell: its options as the line wrote them)
            names = [task_shell.MAGIC_OPTION_NAMES.get(o, o) if caller.startswith("%") else o + "=" for o in ignored]
            why += f"; {', '.join(names)} {'is' if len(ignored) == 1 else 'are'} not applied there"
        sys.stderr.write(why + "\n")
    return _serial_map(func, iterables, star, collect, note_items=True)


def _ignored_serially(**given: Any) -> list[str]:
    """The options of a map run serially in a worker that it cannot apply (given
    a value other than their default, None/False/0)."""
    return [name for name, value in given.items() if value]


def is_variable_name(text: str) -> bool:
    """Can a cell read a variable of this name (``-o``, ``--gather``)? Not ``1abc``, not ``class``."""
    return text.isidentifier() and not keyword.iskeyword(text)


def variable_names(given: object, option: str) -> tuple[str, ...]:
    """The names ``gather=`` / ``--gather`` (``option``, as the error names it) brings back.

    One reading for the API and the magic: a str is one name or several separated
    by commas or spaces (``'x'``, ``'x,y'``, ``'lo, hi'``), as ``--gather`` is
    written; a list or other iterable holds one name per item. An empty name
    (``''``, ``'x,,y'``) is refused rather than dropped, and so is anything else
    (``None``, ``5``, ``[1]``, a dict): ``tuple('total')`` took a str as its
    letters, and None or 1 failed inside mpmagic. Names are NFKC-normalized, as
    Python reads them (the cell binds ``ℌ`` as ``H``), and plain ``str``: a name
    from ``np.array(['x', 'y'])`` is an ``np.str_``, which became a key of
    ``.gathered`` as it was (``np.str_('x')``), not the variable's name.
    """
    if isinstance(given, str):
        pieces: list = re.split(r"\s*,\s*|\s+", given.strip())
        if not all(pieces):
            raise UsageError(f"{option} takes variable names separated by commas or spaces, and {given!r} "
                             "has an empty one")
        how = " separated by commas or spaces"
    elif isinstance(given, Iterable) and not isinstance(given, (bytes, bytearray, Mapping)):
        pieces, how = list(given), ""
    else:
        raise UsageError(f"{option} takes variable names: a str such as 'x' or 'x, y', or a list of them, "
                         f"not {payload_repr(given)}")
    names = []
    for piece in pieces:
        name = unicodedata.normalize("NFKC", str.__str__(piece)) if isinstance(piece, str) else piece
        if not (isinstance(name, str) and is_variable_name(name)):
            raise UsageError(f"{option} takes variable names{how}, and {payload_repr(piece)} is not one")
        names.append(name)
    return tuple(names)


@overload
def parallel(
    code: str,
    workers: int | None = None,
    namespace: dict[str, Any] | None = None,
    compare: bool = False,
    timeout: float | None = None,
    gather: Iterable[str] = (),
    label_output: bool = True,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    block: Literal[True] = True,
    seed: int | None = None,
    keep: bool = False,
    reset: bool = False,
    *,
    reduce: None = None,
) -> RankValues: ...


@overload
def parallel(
    code: str,
    workers: int | None = None,
    namespace: dict[str, Any] | None = None,
    compare: bool = False,
    timeout: float | None = None,
    gather: Iterable[str] = (),
    label_output: bool = True,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    block: Literal[True] = True,
    seed: int | None = None,
    keep: bool = False,
    reset: bool = False,
    *,
    reduce: Callable[[RankValues], _T],
) -> _T: ...


@overload
def parallel(
    code: str,
    workers: int | None = None,
    namespace: dict[str, Any] | None = None,
    compare: bool = False,
    timeout: float | None = None,
    gather: Iterable[str] = (),
    label_output: bool = True,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    *, block: Literal[False],
    seed: int | None = None,
    keep: bool = False,
    reset: bool = False,
    reduce: None = None,
) -> Run[RankValues]: ...


@overload
def parallel(
    code: str,
    workers: int | None = None,
    namespace: dict[str, Any] | None = None,
    compare: bool = False,
    timeout: float | None = None,
    gather: Iterable[str] = (),
    label_output: bool = True,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    block: bool = True,
    seed: int | None = None,
    keep: bool = False,
    reset: bool = False,
    *,
    reduce: Callable[[RankValues], _T] | None = None,
) -> RankValues | Run[RankValues] | _T: ...


def parallel(
    code: str,
    workers: int | None = None,
    namespace: dict[str, Any] | None = None,
    compare: bool = False,
    timeout: float | None = None,
    gather: Iterable[str] = (),
    label_output: bool = True,
    show_report: bool = False,
    progress: bool = False,
    progress_delay: float = 1.0,
    insights: bool = False,
    checkpoint: bool | str | os.PathLike[str] = False,
    block: bool = True,
    seed: int | None = None,
    keep: bool = False,
    reset: bool = False,
    *,
    reduce: Callable[[RankValues], _T] | None = None,
    **refused: Any,
) -> RankValues | Run[RankValues] | _T:
    """Run ``code`` in ``workers`` processes at once (SPMD), like MPI.

    Each copy sees ``rank`` (0..size-1), ``size`` and the names of
    ``namespace`` that the code reads (modules are imported again in the
    workers, everything else is cloudpickled). Returns each rank's last
    expression value in rank order (None where the code ends in a statement; in an
    IPython that shows a cell's final assignment, ``ast_node_interactivity =
    'last_expr_or_assign'``, a final ``x = ...`` gives x, as the cell would show);
    ``gather`` names variables to bring back from every rank: ``'x'``, ``'x, y'``
    (separated by commas or spaces, as ``--gather`` takes them) or a list of
    names. What ranks print is shown labelled ``[rank N]``. If ranks fail, each
    failing rank's traceback is printed and
    :class:`~mpmagic.errors.ParallelError` is raised; the ranks
    still running 3 s (``mpmagic.jobs.RANK_FAILURE_GRACE``) after a rank failed
    are stopped then (:class:`~mpmagic.errors.RankStoppedError`), as an MPI job
    aborts: a rank waiting on the failed one would wait for ever.
    ``progress`` shows a bar counting finished ranks after ``progress_delay``
    seconds; ``insights`` records each rank's worker and span (see ``pmap``).
    ``checkpoint`` keeps the ranks' values: see ``pmap`` and docs/checkpoint.md.
    ``block=False`` returns a :class:`~mpmagic.background.Run` handle at once
    (its ``result()`` is the values, their ``.gathered`` the ``gather`` lists).
    ``seed=S`` gives each rank its own random stream from S and its rank.
    ``compare=True`` also runs the cell here as rank 0 of 1 and times it, on a
    copy of its names as a rank gets them (the notebook's objects stay as they
    are), its output labelled ``[serial]`` (not a cell using an mpmagic
    ``Queue``, ``Value``, ``Array`` or ``Event``: rank 0 alone would wait for
    what the other ranks put; one line says so).
    ``keep=True`` runs on persistent ranks: each rank keeps its namespace in
    its worker for the next ``keep=True`` call (``reset=True`` starts them afresh).
    ``reduce=FUNC`` returns ``FUNC(values)`` instead of the values (``%%parallel
    --reduce``); if it raises, :class:`~mpmagic.errors.ReduceError` keeps the
    values in its ``.values``.
    """
    __tracebackhide__ = True
    if not isinstance(code, str):
        # (a function, as joblib or ipyparallel's apply take, failed deep in cell.py with a TypeError)
        kind = "a function" if callable(code) else repr(code)[:40]
        raise UsageError(
            f"parallel() takes the cell's code as a string (mpmagic.parallel('print(rank)', workers=2)), not {kind}: "
            "to run a function in parallel use mpmagic.pmap(func, items), e.g. mpmagic.pmap(func, range(n)) for n calls"
        )
    if refused:  # (``n=4``, a magic's option: Python's error, with what was meant)
        raise one_line(unexpected_keyword("parallel", refused, keyword_names(parallel)))
    workers = _check_workers(workers)
    if workers is not None:  # (before anything is built per rank: -n 10**30 ran out of memory first)
        check_run_ranks(workers)
    timeout = run_timeout(timeout)
    progress_delay = _check_progress_delay(progress_delay)
    check_flags(compare=compare, label_output=label_output, show_report=show_report, progress=progress,
                insights=insights, block=block, keep=keep, reset=reset)
    block = True if block is None else block  # (None: each option's default, on or off)
    label_output = True if label_output is None else label_output
    if seed is not None:  # (a plain int from here on: the checkpoint's key and the ranks' streams)
        from .seeding import _check_seed

        seed = _check_seed(seed)
    _check_checkpoint(checkpoint)
    if namespace is not None and not isinstance(namespace, Mapping):
        raise UsageError(f"namespace must be a dict of the names the code reads (None: the caller's globals()), "
                         f"not {payload_repr(namespace)}")
    if _in_worker_process():
        raise UsageError(
            f"parallel() cannot run {_where_no_pool()}: this process cannot start workers of its own "
            "(ranks run at the same time, so they cannot be run one after another either); call it from the notebook"
        )
    gather = variable_names(gather, "gather= (--gather)")
    if namespace is None:
        namespace = sys._getframe(1).f_globals
    if reduce is not None:
        if not callable(reduce):
            raise UsageError(f"reduce= takes a function such as sum, not {payload_repr(reduce)}")
        if not block:
            raise UsageError("reduce= needs block=True: a background run's result() gives the ranks' values, "
                             "to reduce once it is done")
        values = parallel(code, workers, namespace, compare, timeout, gather, label_output, False, progress,
                          progress_delay, insights, checkpoint, True, seed, keep, reset)
        try:
            return reduce_values(reduce, values, code, f"reduce={func_name(reduce)}", "in this error's .values")
        finally:
            if show_report and values.report is not None:  # (after the reduce: compare=True's verdict is in it)
                print(values.report.line())
    if compare and (keep or reset):
        raise UsageError("compare=True (--compare) runs the cell once more here, as rank 0 of 1, and a kept "
                         "rank's state (keep=True, --keep) is in its worker, not here: compare without --keep")
    if checkpoint and (keep or reset):
        raise UsageError("keep=True (--keep) and checkpoint (--checkpoint) do not go together: a kept rank's "
                         "state changes with each run, and a checkpoint skips the runs it has stored")
    if seed is None:  # (after reduce='s own call: said once; seed=: each rank its own stream, as said)
        draws.say_cell_draws(code, namespace)
    # (the names it binds, read only at the notebook's NameError of one of them: errors.note_rank_name)
    remember_rank_cell(code, functools.partial(_names_bound, code), gather)
    if not block:
        from . import background

        background.check_options(compare=compare)

        def make_cell(forward: background.Forward) -> CellCall:
            return CellCall(code, namespace, gather, workers, timeout=timeout, label=label_output,
                            insights=insights, out=forward.out, progress=forward.progress, seed=seed, keep=keep,
                            reset=reset)

        def rank_values(call: CellCall, forward: background.Forward) -> RankValues:
            call.record_kept()  # (keep=True: which worker keeps which rank, as a blocking run records)
            # A failing rank's traceback goes to the live area, as a blocking run prints it.
            return call.values(lambda text: forward.out("stderr", text))

        size = workers or get_pool().workers
        # The cell's start, quoted: "run 1: parallel -n 2 `if rank == 1: …`, 2/2 ranks, ..."
        snippet = code_snippet(code)
        what = f"parallel -n {size} `{snippet}`" if snippet else f"parallel -n {size}"

        def start(resume: Any = None) -> Any:
            return background.start(what, make_cell, rank_values, size, keep_chunks=False, resume=resume,
                                    show_report=show_report)

        if checkpoint:  # the ranks' values from the store when all are there (checkpoint.py)
            from .checkpoint import checkpointed_parallel_submit

            return checkpointed_parallel_submit(start, code, size=size, namespace=namespace, gather=gather,
                                                location=checkpoint, what=what, seed=seed, show_report=show_report)
        return start()
    if checkpoint:
        from .checkpoint import checkpointed_parallel

        kw = dict(compare=compare, timeout=timeout, label_output=label_output, progress=progress,
                  progress_delay=progress_delay, insights=insights, seed=seed)
        return checkpointed_parallel(parallel, code, workers=workers, namespace=namespace, gather=gather,
                                     location=checkpoint, show_report=show_report, set_report=_set_report,
                                     get_report=last_report, kwargs=kw)
    t0 = time.perf_counter()  # (as pmap's: finding the pool and packing the cell count)
    bar = Progress(workers or get_pool().workers, "parallel", "rank", progress_delay, enabled=progress)
    call = CellCall(code, namespace, gather, workers, timeout=timeout, label=label_output, insights=insights,
                    progress=bar.update, seed=seed, keep=keep, reset=reset)
    job, size = call.job, call.size
    job.one_time.run_start -= time.perf_counter() - t0  # (as pmap's)
    debugging.forget()
    try:
        _run_with_progress(call.backend, job, bar, size)
    except KeyboardInterrupt as exc:
        # Ranks that failed before the interrupt (often why the others waited): the
        # line names them, the interrupt keeps them (.failures, and the finished
        # ranks' .values), and %pdebug and last_failures() still have them.
        debugging.record_cell(job, call.spec_bytes if job.failures else b"", size)
        _interrupted(call, t0)
        if job.failures:
            set_interrupt_outcome(exc, f"{failed_before(job.failures)}; {interrupt_outcome(exc) or STOPPED_OUTCOME}")
        new = run_interrupted("mpmagic.parallel", exc)  # one line in IPython, as %%parallel's
        new.failures, new.values = dict(job.failures), dict(sorted(job.values.items()))  # type: ignore[attr-defined]
        new.gathered = call.gathered_so_far()  # type: ignore[attr-defined]
        raise new from None
    except BaseException as exc:  # what stopped the cell itself (the pool stopped under it): the report is this run's
        _stopped(call, t0, exc)
        raise
    finally:
        call.record_kept()
    report = _reports.report = call.report(time.perf_counter() - t0)
    debugging.record_cell(job, call.spec_bytes if job.failures else b"", size)  # for %pdebug (failed ranks)
    values = call.values(sys.stderr.write)
    if compare and not _no_serial_copy(report, "the cell"):
        try:
            serial_spec = call.serial_copy()  # (a copy of its names, as a rank gets: not timed, as a rank's load is not)
            mark = len(sys.modules)
            t1 = time.perf_counter()
            serial_value = run_cell_serially(serial_spec, seed is not None, label_output)
        except (Exception, SystemExit) as exc:  # (1 / (size - 1): the cell as one rank cannot run; sys.exit() is
            drop_our_frames(exc)                 # a rank's error in the workers too, and escaped here with the values)
            _serial_failed(report, exc, "ranks' values")
        else:
            report.serial = time.perf_counter() - t1
            report.serial_imports = _imported_since(mark)
            report.extra["serial_value"] = serial_value
    values.report = report
    if show_report:
        print(report.line())
    return values


#: What ``--compare``'s serial run of a cell prints is shown after this label, as a rank's after ``[rank N] ``.
SERIAL_LABEL = "[serial] "
_REDRAWN = re.compile(r"\r(?=[^\r\n])")  # a carriage return that text overwrites the line after


def _names_bound(code: str) -> set[str]:
    """The names the cell binds at its top level (none when it does not parse)."""
    try:
        return names_assigned(astlock.parse(code))
    except Exception:  # (advice only: the run said what is wrong with the cell)
        return set()


#: The cells (hash of their text) whose notebook iterators were said (once each).
_said_cell_iterators: set[int] = set()


def _say_cell_iterators(spec: Any) -> None:
    """The notebook iterators a cell reads (``next(ids)`` of ``ids = itertools.count()``, among
    the names sent with it): each rank advances its own copy, from where it was at the run,
    so ranks get the same values where the cell run once per rank here takes successive
    ones. One line, once per cell text. Advice only: never raises."""
    key = hash(spec.source)
    if key in _said_cell_iterators:
        return
    for name, value in spec.names.items():
        kind = payload_cache.iterator_kind(value)
        if kind is None:
            continue
        if len(_said_cell_iterators) > 1024:
            _said_cell_iterators.clear()
        _said_cell_iterators.add(key)
        use = payload_cache.IteratorUse("the cell", name, kind)
        sys.stderr.write(f"mpmagic: {use.words()} in each rank's copy, from where it was at the run, so ranks can "
                         "get the same values (the cell run once per rank here: one iterator goes on); take its "
                         f"values here and pass them by rank (vals = [next({name}) for _ in range(n)], then "
                         "vals[rank] in the cell)\n")
        return


def serial_cell_copy(spec: Any, backend: Backend) -> Any:
    """A cell's spec for a serial run here (``--compare``'s, ``--scaling``'s): its notebook
    names pickled and loaded again, as each rank of a run on ``backend`` gets them, so
    that the run changes none of the notebook's own objects (a cell's ``lst.append(rank)``
    made the notebook's list longer, only when --compare or --scaling was given). Large
    arrays come as the ranks get them: read-only where the ranks map them read-only
    (views of the notebook's memory, no copy), a writable copy where the ranks' are
    writable; a :func:`shm.share` array is that very memory."""
    lent = backend.shares_memory and shm.ENABLED  # (as CellCall lends them to the ranks)
    try:
        return shm.as_lent(spec, lambda spec, collector: payload.dumps_function(spec, "the cell's names", collector),
                           writable=shm.WRITABLE if lent else True, share_read_only=True)
    except Exception:
        # A name the cell assigns whose notebook value cannot be pickled is left out, as for the
        # ranks (_pack_spec); one it only reads is refused naming it, as for them.
        if leave_out_unpicklable(spec):
            return serial_cell_copy(spec, backend)
        raise


def serial_map_copy(obj: Any, backend: Backend, what: str = "the function") -> Any:
    """A map's function, or its items, for ``--scaling``'s serial runs here: pickled and
    loaded again, as a worker of a run on ``backend`` gets them (what the function
    captures too: a notebook list it appends to, a dict it fills), so that the serial runs
    change none of the notebook's objects, as the parallel runs change none. They called
    the function on the notebook's own, two or more times (before the points and after
    them): a list appended to held twice the items, and the points after the first serial
    run shipped the longer list. Large arrays come as the workers get them
    (:func:`serial_cell_copy`). (``--compare``'s serial run of a map calls the function
    as it is, once: serial ``map`` in the notebook.)"""
    lent = backend.shares_memory and shm.ENABLED
    try:
        return shm.as_lent(obj, lambda each, collector: payload.dumps_function(each, what, collector),
                           writable=shm.WRITABLE if lent else True, share_read_only=True)
    except SerializationError:
        if what == "the items":  # (one that cannot be sent is named as a run names it: "item 1 (<lock>)")
            from .jobs import short_repr

            for lst in obj:
                for i, item in enumerate(lst):
                    try:
                        payload.dumps_data(item)
                    except Exception as exc:
                        raise SerializationError(
                            f"cannot send item {i} ({short_repr(item)}) to the workers: "
                            + payload.explain_unpicklable(item, f"item {i}", exc, item=True).split(": ", 1)[1]
                        ) from None
        raise


def run_cell_serially(spec: Any, seeded: bool, label: bool) -> Any:
    """A cell's serial run here (``--compare``'s, ``--scaling``'s), on ``spec`` (a copy:
    :func:`serial_cell_copy`): rank 0 of 1, as ``__main__``; its value. ``seeded``: the
    notebook's own random state is put back after it (``seed=``: rank 0's stream).
    ``label``: what it prints, its threads included, comes after ``[serial] ``."""
    __tracebackhide__ = True
    with _random_state_kept(seeded), _labelled_here(SERIAL_LABEL if label else None):
        value, _ = run_cell_code(spec, 0, 1, as_main=False)
    return value


# The threads of each labelled serial run in progress (its own, and those started from
# them while it runs): a rank's threads print into its output, labelled as the rank, so a
# serial run's threads' lines are labelled [serial] too. threading.Thread.start is wrapped
# while any run is in progress (one at a time per thread that starts one; several at once).
_run_threads: list[weakref.WeakSet[threading.Thread]] = []
_run_threads_lock = threading.Lock()
_thread_start: Callable[..., Any] | None = None  # the Thread.start the wrapper calls (while installed)


def _start_in_run(self: threading.Thread, *args: Any, **kwargs: Any) -> Any:
    """``threading.Thread.start`` while a labelled serial run runs: a thread started by one
    of the run's threads is the run's too (marked before it starts: its first line counts)."""
    starter = threading.current_thread()
    for threads in list(_run_threads):
        if starter in threads:
            threads.add(self)
    start = _thread_start if _thread_start is not None else _THREAD_START
    return start(self, *args, **kwargs)


_THREAD_START = threading.Thread.start


@contextlib.contextmanager
def _threads_of_this_run() -> Iterator[weakref.WeakSet[threading.Thread]]:
    """The set of this serial run's threads (this one, and those it starts while it runs)."""
    global _thread_start
    threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet([threading.current_thread()])
    with _run_threads_lock:
        if not _run_threads and threading.Thread.start is not _start_in_run:
            _thread_start = threading.Thread.start
            threading.Thread.start = _start_in_run  # type: ignore[method-assign]
        _run_threads.append(threads)
    try:
        yield threads
    finally:
        with _run_threads_lock:
            _run_threads.remove(threads)
            if not _run_threads and threading.Thread.start is _start_in_run:
                threading.Thread.start = _thread_start or _THREAD_START  # type: ignore[method-assign]


class _LabelledStream:
    """``sys.stdout`` or ``sys.stderr`` while ``--compare``'s serial run of a cell runs
    here: what that run's threads write (its own, and those the cell starts, as a rank's
    threads write into the rank's output) comes with ``label`` at the start of each line
    (after a ``\r`` that redraws one too), as the ranks' lines come with ``[rank N] ``;
    it showed unlabelled, as if the cell itself printed it a third time. Other
    threads' writes (a background run's output) pass as they are, and so does
    everything once the run ended (:meth:`end`): a handler the run made keeps the stream."""

    def __init__(self, target: Any, label: str, threads: weakref.WeakSet[threading.Thread]) -> None:
        self.target = target
        self.label = label
        self.threads = threads
        self.line_open = False  # (the run's last text did not end its line: the next continues it)

    def write(self, text: str) -> int:
        if not text or threading.current_thread() not in self.threads:
            return self.target.write(text)
        lines = text.split("\n")
        last = len(lines) - 1
        self.target.write("".join(
            ("" if i == 0 and self.line_open else self.label)
            + (_REDRAWN.sub(lambda _: "\r" + self.label, line) if "\r" in line else line)
            + ("" if i == last else "\n")
            for i, line in enumerate(lines) if i < last or line
        ))
        self.line_open = not text.endswith("\n")
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def end(self) -> None:
        """The run ended: from now on every write passes as it is. What the run kept of
        ``sys.stdout`` / ``sys.stderr`` (``logging.basicConfig()``'s handler, a ``file=``
        default) still writes here: it labelled every later line of the notebook's main
        thread (``[serial] WARNING:root:...``) for good, where serially it writes plain."""
        self.threads = weakref.WeakSet()

    def __getattr__(self, name: str) -> Any:  # flush, encoding, isatty, fileno...: the stream's own
        return getattr(self.target, name)


@contextlib.contextmanager
def _labelled_here(label: str | None) -> Iterator[None]:
    """While it runs, this thread's writes to ``sys.stdout`` and ``sys.stderr`` (and
    those of the threads it starts, and theirs) come with ``label`` before each line
    (no label: as they are); other threads' pass as they are. A line the run left open
    is ended, so that the report's line is not joined to it. The streams the run
    found are put back, whatever it set them to (in a rank that stays in the worker)."""
    if label is None:
        yield
        return
    with _threads_of_this_run() as threads:
        out, err = sys.stdout, sys.stderr
        streams = sys.stdout, sys.stderr = _LabelledStream(out, label, threads), _LabelledStream(err, label, threads)
        handlers = _handlers_labelled(streams)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
            for handler, labelled, found in handlers:
                if handler.stream is labelled:  # (one the run set to another stream is its own)
                    with contextlib.suppress(Exception):
                        handler.setStream(found)
            for stream in streams:
                stream.end()
                if stream.line_open:
                    stream.target.write("\n")


def _handlers_labelled(streams: tuple[_LabelledStream, ...]) -> list[tuple[logging.StreamHandler, Any, Any]]:
    """The notebook's logging handlers on the streams the serial run found
    (``logging.basicConfig()`` of an earlier cell holds the notebook's stderr as it
    was then) write to the labelling ones while it runs, so its records show as
    ``[serial] INFO:calc:...``, as the ranks' show as ``[rank 1] INFO:calc:...``: they
    showed unlabelled, as if the cell logged a third time. Other threads' records
    still pass as they are (:class:`_LabelledStream`). Each as (handler, the labelling
    stream, the stream it had), for putting back."""
    by_target = {id(stream.target): stream for stream in streams}
    swapped: list[tuple[logging.StreamHandler, Any, Any]] = []
    try:
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        found: dict[int, logging.StreamHandler] = {}
        for logger in loggers:
            for handler in getattr(logger, "handlers", ()):  # (a PlaceHolder has none)
                if isinstance(handler, logging.StreamHandler) and id(getattr(handler, "stream", None)) in by_target:
                    found[id(handler)] = handler
        for handler in found.values():
            labelled = by_target[id(handler.stream)]
            before = handler.setStream(labelled)
            if before is not None:
                swapped.append((handler, labelled, before))
    except Exception:  # (labels only: a handler of odd make stays as it is, and the run goes on)
        pass
    return swapped


def reduce_values(reducer: Callable[[RankValues], _T], values: RankValues, code: str, label: str, kept: str) -> _T:
    """``reducer(values)`` (``parallel(reduce=)``, ``%%parallel --reduce``); if it raises,
    a :class:`~mpmagic.errors.ReduceError` that says why and where the values are kept
    (they are computed and must not be lost with the reducer's error).
    ``label`` names the reducer as the caller gave it; ``kept`` says where the values are."""
    __tracebackhide__ = True
    from .errors import ReduceError

    try:
        reduced = reducer(values)
    except Exception as exc:
        if not cell_has_value(code):
            why = "every rank's value is None: the cell ends in a statement; end it with the expression to combine"
        elif all(v is None for v in values):
            why = "every rank's value is None: the value of the cell's last line"
        else:
            why = f"the values are of type {' and '.join(sorted({type(v).__name__ for v in values}))}"
        raise ReduceError(f"{label} failed on the ranks' values: {type(exc).__name__}: {exc} "
                          f"({why}); the values are kept {kept}", values) from exc
    report = values.report
    if report is not None and "serial_value" in report.extra:  # compare=True: the cell run here as rank 0 of 1
        report.equal = compare_verdict(report, report.extra["serial_value"], reduced, parts=values, items=False)
    return reduced


# Rounding is no difference (docs/troubleshooting.md, RESULTS DIFFER). Two floats of a
# precision whose machine epsilon is eps (numpy.finfo of the dtype; a Python float is a
# float64) are the same value when they differ by at most
#   sqrt(eps) * max(|a|, |b|)                   relative: half the significant bits agree
#   min(_ABS_ULPS * eps, sqrt(eps)) * scale     near zero: a sum that cancels (see _close)
#   finfo.tiny                                  the smallest normal number: a zero's rounding
# float64: 1.5e-8 relative, 2.3e-13 of the scale; float32: 3.5e-4 and 1.2e-4; float16: 3.1e-2.
_ABS_ULPS = 1024


def compare_verdict(report: Report, serial: Any, value: Any, *, parts: Sequence[Any] | None = None,
                    items: bool = True, positions: Sequence[int] | None = None) -> bool:
    """``--compare``'s verdict: is ``value`` the serial ``serial``, exactly or but for
    float rounding (``_equal_to_rounding``; ``parts``: the ranks' values a reduced value
    came from)? When only to rounding, ``report.extra["rounding"]`` says how far apart
    and where ("largest relative difference 2.3e-10 at item 4": ``items``, the value is
    a map's results, item by item; ``positions``, their places in the whole input), so
    the line never calls values that differ plain "results equal": a value that changes
    on every call (``time.time()``) is within the tolerance too (pandas22 #3)."""
    report.extra.pop("rounding", None)
    if _equal(serial, value):
        return True
    gap = RoundingGap()
    if not _equal_to_rounding(serial, value, parts, gap):
        return False
    if positions is not None:
        gap.relative_at, gap.near_zero_at = (
            (positions[at[0]], *at[1:]) if at and isinstance(at[0], int) and at[0] < len(positions) else at
            for at in (gap.relative_at, gap.near_zero_at))
    described = gap.describe(items)
    if described:  # (none: no element differs, the values are equal item by item)
        report.extra["rounding"] = described
    return True


def _equal_reduced(serial: Any, reduced: Any, parts: Sequence[Any] | None = None) -> bool:
    """compare=True with reduce=: is the reduced value the serial one (the cell as
    rank 0 of 1 does the whole work)? The ranks' parts add up in another order than
    the serial loop, which changes the last bits of a float sum and nothing else:
    floats (and the floats in numpy arrays, pandas Series and DataFrames, and in
    lists, tuples and dicts of them) are compared to within their dtype's rounding
    (``_close``), a value near zero against ``parts``, the ranks' values (a sum
    that cancels to ~0 is as exact as the sum of its terms' magnitudes allows, not
    as its own size). Ints, strings, shapes, indexes and dtypes add up exactly, so
    they are compared exactly."""
    return _equal(serial, reduced) or _equal_to_rounding(serial, reduced, parts)


def _equal_to_rounding(serial: Any, value: Any, parts: Sequence[Any] | None = None,
                       gap: RoundingGap | None = None) -> bool:
    """``serial`` and ``value`` the same but for float rounding (``_close``): the
    ``--compare`` verdict once the exact one (``_equal``) said no. Also for ``%pmap``'s
    results: a worker's BLAS on one thread, or an item's array pickled contiguous, sums
    in another order than the notebook (the last bits of a float32 matrix product).
    ``gap`` (when given) learns the largest difference taken as rounding, and where,
    for the report's line: a value that differs on every call (``time.time()``, a tiny
    random jitter) is within the tolerance too, and must show (pandas22 #3)."""
    with warnings.catch_warnings():  # (warnings of our check, not of the user's code)
        warnings.simplefilter("ignore")
        try:
            return _close(serial, value, parts, gap)
        except Exception:  # (an odd object: no tolerance, the exact verdict stands)
            return False


class RoundingGap:
    """The largest difference ``--compare`` took as float rounding, and where it was.

    ``relative``: the largest ``|a - b| / max(|a|, |b|)`` of the values taken as
    equal by the relative rule, at ``relative_at``; ``near_zero``: the largest
    ``|a - b|`` of values taken as equal only as rounding near zero, at
    ``near_zero_at``. A place is a tuple of keys from the compared value down: a
    list's or an array's positions, a dict's keys, a pandas column's and row's labels.
    """

    def __init__(self) -> None:
        self.relative = 0.0
        self.relative_at: tuple = ()
        self.near_zero = 0.0
        self.near_zero_at: tuple = ()

    def note(self, d: float, big: float, rel: float, at: tuple) -> None:
        """Values as large as ``big`` ``d`` apart (taken as rounding: ``rel`` is the
        relative tolerance) at ``at``."""
        if not d > 0:
            return
        if big > 0 and d <= rel * big:
            if d / big > self.relative:
                self.relative, self.relative_at = d / big, at
        elif d > self.near_zero:
            self.near_zero, self.near_zero_at = d, at

    def describe(self, first_is_item: bool) -> str:
        """``largest relative difference 2.3e-10 at item 4`` (and the largest difference near
        zero, when there was one): ``first_is_item``, the first key is the item's position
        (``%pmap``'s results), else the place is a subscript of the value (a reduced one)."""
        parts = []
        if self.relative > 0:
            parts.append(f"largest relative difference {self.relative:.1e}{self._place(self.relative_at, first_is_item)}")
        if self.near_zero > 0:
            parts.append(f"largest difference near zero {self.near_zero:.1e}"
                         f"{self._place(self.near_zero_at, first_is_item)}")
        return "; ".join(parts)

    @staticmethod
    def _place(at: tuple, first_is_item: bool) -> str:
        """`` at item 4[2]``, `` at [1][2]``, or "" (the value itself)."""
        keys = [k.item() if type(k).__module__ == "numpy" and hasattr(k, "item") else k for k in at]
        if first_is_item and keys:
            return f" at item {keys[0]}" + "".join(f"[{k!r}]" for k in keys[1:])
        return f" at {''.join(f'[{k!r}]' for k in keys)}" if keys else ""


def _close(a: Any, b: Any, parts: Sequence[Any] | None = None, gap: RoundingGap | None = None,
           at: tuple = ()) -> bool:
    """``a`` and ``b`` the same but for float rounding, as the rule above ``_ABS_ULPS``
    has it. ``parts``: the values ``b`` was reduced from (the ranks' values), or None;
    the sum of their magnitudes is the scale of a value near zero (also of an array's
    element; an array's own largest magnitude is one too). numpy and pandas are used
    only when a value is theirs (so already imported: never for this). ``gap``: told
    each difference taken as rounding, at its place (``at``, the keys down to it)."""
    np = sys.modules.get("numpy")
    if _is_number(np, a) and _is_number(np, b):
        return _close_numbers(np, a, b, parts, gap, at)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(
            _same(x, y) or _close(x, y, _parts_at(parts, a, i), gap, (*at, i))
            for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(
            _same(a[k], b[k]) or _close(a[k], b[k], _parts_at(parts, a, k), gap, (*at, k)) for k in a)
    if np is not None and isinstance(a, np.ndarray):
        return _close_arrays(np, a, b, _array_scale(np, parts, a.shape), gap, at)
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(a, pd.Series):
        return bool(a.index.equals(b.index)) and _close_series(np, a, b, parts, gap, at)
    if pd is not None and isinstance(a, pd.DataFrame):
        if not (bool(a.columns.equals(b.columns)) and bool(a.index.equals(b.index))):
            return False
        frames = [p for p in parts or () if isinstance(p, pd.DataFrame)
                  and p.columns.equals(a.columns) and p.index.equals(a.index)]
        whole = parts is not None and len(frames) == len(parts)  # (the ranks' frames, of these columns and index)
        return all(_close_series(np, a.iloc[:, i], b.iloc[:, i], [p.iloc[:, i] for p in frames] if whole else None,
                                 gap, (*at, a.columns[i]))
                   for i in range(a.shape[1]))
    return False


def _is_number(np: Any, x: Any) -> bool:
    """A Python or numpy int, float or complex (not a bool)."""
    kinds: tuple[type, ...] = (int, float, complex, np.number) if np is not None else (int, float, complex)
    return isinstance(x, kinds) and not isinstance(x, bool)


def _precision(np: Any, *values: Any) -> tuple[float, float] | None:
    """(eps, tiny) of the coarsest float among ``values``: a Python float or complex is
    a float64, a numpy scalar or array has its dtype's; None when none is a float."""
    found: list[tuple[float, float]] = []
    for x in values:
        if isinstance(x, (float, complex)):
            found.append((sys.float_info.epsilon, sys.float_info.min))
        elif np is not None and getattr(getattr(x, "dtype", None), "kind", None) in ("f", "c"):
            info = np.finfo(x.dtype)
            found.append((float(info.eps), float(info.tiny)))
    return max(found) if found else None


def _close_numbers(np: Any, a: Any, b: Any, parts: Sequence[Any] | None, gap: RoundingGap | None = None,
                   at: tuple = ()) -> bool:
    """Two numbers (``_close``): two ints exactly (they add up exactly in any order),
    else within the rounding of the coarser float of the two (told to ``gap``)."""
    precision = _precision(np, a, b)
    if precision is None:
        return False
    eps, tiny = precision
    d, big = float(abs(a - b)), float(max(abs(a), abs(b)))
    scale = 0.0
    if parts is not None and all(_is_number(np, p) for p in parts):
        scale = math.fsum(float(abs(p)) for p in parts)
    near = _near(d, big, scale if math.isfinite(scale) else 0.0, eps, tiny)
    if near and gap is not None:
        gap.note(d, big, math.sqrt(eps), at)
    return near


def _near(d: float, big: float, scale: float, eps: float, tiny: float) -> bool:
    """A difference ``d`` of values as large as ``big`` is rounding (the rule above ``_ABS_ULPS``)."""
    rel = math.sqrt(eps)
    return math.isfinite(d) and (d <= rel * big or d <= min(_ABS_ULPS * eps, rel) * scale or d <= tiny)


def _parts_at(parts: Sequence[Any] | None, container: Any, key: Any) -> list[Any] | None:
    """The ranks' values at ``key`` of a list, tuple or dict ``container`` (of their
    type and length, or holding the key), or None when they are not all such."""
    if parts is None:
        return None
    if isinstance(container, dict):
        if all(isinstance(p, dict) and key in p for p in parts):
            return [p[key] for p in parts]
    elif all(type(p) is type(container) and len(p) == len(container) for p in parts):
        return [p[key] for p in parts]
    return None


def _array_scale(np: Any, parts: Sequence[Any] | None, shape: tuple[int, ...]) -> Any:
    """The sum of the magnitudes of ``parts`` (numbers or numpy arrays of ``shape``),
    element by element (non-finite sums count 0), or 0.0 when they are not all such."""
    if not parts:
        return 0.0
    try:
        arrays = [np.asarray(p) for p in parts]
        if any(x.shape != shape or x.dtype.kind not in "iufc" for x in arrays):
            return 0.0
        with np.errstate(all="ignore"):
            total = sum(np.abs(x) for x in arrays)
            return np.where(np.isfinite(total), total, 0.0)
    except Exception:  # (an odd part: no scale, the value's own sizes still count)
        return 0.0


def _close_arrays(np: Any, a: Any, b: Any, scale: Any = 0.0, gap: RoundingGap | None = None, at: tuple = (),
                  labels: Callable[[tuple], tuple] | None = None) -> bool:
    """Two numpy arrays of one float or complex dtype and shape, element by element
    within that dtype's rounding (the rule above ``_ABS_ULPS``; the scale of an element
    near zero is the larger of the arrays' largest finite magnitude and ``scale``, the
    ranks' magnitudes), NaN where the other has NaN, inf where the other has it. ``gap``:
    told the largest differences taken as rounding, at ``at`` and the element's position
    (``labels`` turns a position into the keys to show: a pandas column's row label)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.dtype.kind not in "fc":
        return False
    a, b = np.asarray(a), np.asarray(b)  # (np.matrix: elementwise as an array)
    info = np.finfo(a.dtype)
    eps, tiny = float(info.eps), float(info.tiny)
    rel = math.sqrt(eps)
    with np.errstate(all="ignore"):
        d = np.abs(a - b)
        big = np.maximum(np.abs(a), np.abs(b))
        finite = big[np.isfinite(big)]
        scale = np.maximum(float(finite.max()) if finite.size else 0.0, scale)
        near = np.isfinite(d) & ((d <= rel * big) | (d <= min(_ABS_ULPS * eps, rel) * scale) | (d <= tiny))
        same = (a == b) | (np.isnan(a) & np.isnan(b))
    close = bool(np.all(near | same))
    if close and gap is not None and a.size:
        _note_array_gap(np, gap, np.where(same, 0.0, d), big, rel, at, labels)
    return close


def _note_array_gap(np: Any, gap: RoundingGap, d: Any, big: Any, rel: float, at: tuple,
                    labels: Callable[[tuple], tuple] | None) -> None:
    """Tell ``gap`` an array's largest differences taken as rounding (``d``, 0 where equal):
    the largest relative one, and the largest of those taken only near zero."""
    place = labels or (lambda index: index)
    with np.errstate(all="ignore"):
        by_rel = (d > 0) & (d <= rel * big)
        if by_rel.any():
            ratio = np.where(by_rel, d / np.where(by_rel, big, 1.0), 0.0)
            i = np.unravel_index(int(np.argmax(ratio)), d.shape)
            gap.note(float(d[i]), float(big[i]), rel, (*at, *place(tuple(int(k) for k in i))))
        by_zero = (d > 0) & ~by_rel
        if by_zero.any():
            i = np.unravel_index(int(np.argmax(np.where(by_zero, d, 0.0))), d.shape)
            gap.note(float(d[i]), float(big[i]), rel, (*at, *place(tuple(int(k) for k in i))))


def _close_series(np: Any, a: Any, b: Any, parts: Sequence[Any] | None = None, gap: RoundingGap | None = None,
                  at: tuple = ()) -> bool:
    """Two pandas columns of one dtype (the index compared already): a float column
    (numpy's or pandas' Float32/Float64, NA where the other has NA) within its dtype's
    rounding (``_close_arrays``; ``parts``: the ranks' columns), any other exactly."""
    if a.dtype != b.dtype:
        return False
    if a.equals(b):
        return True
    kind = getattr(a.dtype, "kind", None)
    if np is None or kind not in ("f", "c"):
        return False
    missing = a.isna().to_numpy()
    if not np.array_equal(missing, b.isna().to_numpy()):
        return False
    dtype = np.dtype(getattr(a.dtype, "numpy_dtype", a.dtype))  # (pandas' Float32: float32)
    kept = ~missing
    scale: Any = 0.0
    pd = sys.modules.get("pandas")
    if parts and pd is not None and all(isinstance(p, pd.Series) and p.index.equals(a.index) for p in parts):
        try:
            scale = _array_scale(np, [p.to_numpy(dtype=dtype, na_value=np.nan)[kept] for p in parts], (int(kept.sum()),))
        except Exception:  # (a column that is no number: no scale)
            scale = 0.0
    rows = np.flatnonzero(kept)
    return _close_arrays(np, a.to_numpy(dtype=dtype, na_value=np.nan)[kept],
                         b.to_numpy(dtype=dtype, na_value=np.nan)[kept], scale, gap, at,
                         lambda index: (a.index[rows[index[0]]],))  # (a row's label, as .loc takes it)


class CellCall:
    """One cell's job and what its report and values need (a blocking or a background run)."""

    def __init__(self, code: str, namespace: dict[str, Any], gather: tuple, workers: int | None, *,
                 insights: bool = False, seed: int | None = None, keep: bool = False, reset: bool = False,
                 **kwargs: Any) -> None:
        try:
            self.spec = make_cell_spec(code, namespace, gather)
        except SyntaxError as exc:
            hint = ("; a rank runs the cell as plain Python, without IPython's top-level await: put the awaits in "
                    "an async def and run it with asyncio.run(main())") if "'await' outside" in exc.msg else ""
            raise UsageError(f"the cell has a syntax error on line {exc.lineno}: {exc.msg}{hint}") from None
        if not (keep or reset):  # (a kept rank's name is its own after its first run)
            _say_cell_iterators(self.spec)
        if seed is not None:  # per-rank random streams (seeding.py), set by run_cell_code
            from .seeding import _check_seed, uses_numpy, uses_torch

            self.spec.seed = _check_seed(seed)
            self.spec.seed_numpy = uses_numpy(code)
            self.spec.seed_torch = uses_torch(code)
        self.gather = gather
        self.namespace = namespace
        self.backend = get_pool()
        self.size = workers or self.backend.workers
        self.backend.check_ranks(self.size)  # (the pool the run goes to: one unit per rank is made below)
        self.pins = None
        if keep or reset:  # persistent ranks (ranks.py): each rank pinned to the worker keeping its namespace
            from . import ranks

            if not keep:
                raise UsageError("reset=True (--reset) starts kept ranks afresh: use it with keep=True (--keep)")
            self.pins = ranks.check(self.backend, self.size, reset)
            self.spec.keep, self.spec.reset = True, reset
        kept: dict[int, Any] = {}  # the helpers among its names: the job keeps them alive until it ends
        # Large arrays among the cell's names go through pooled shared memory, as a map's items do
        # (workers on this machine; not for kept ranks, whose names outlive the run and its segments).
        lease = shm.Lease() if self.backend.shares_memory and self.pins is None and shm.ENABLED else None
        with payload.keeping(kept):
            spec_bytes = _pack_spec(self.spec, lease, local=self.backend.shares_memory)
        self._plain = None if lease is not None and lease.segments else spec_bytes
        self.cold = self.backend.cold
        self.recorder = Recorder("parallel") if insights else None
        if self.pins is None:
            self.job = CellJob(spec_bytes, self.size, insights=self.recorder, kept=kept,
                               lease=lease if lease is not None and lease.segments else None,
                               repack=self._repack, **kwargs)
        else:
            from . import ranks

            self.job = ranks.KeptCellJob(spec_bytes, self.size, insights=self.recorder, pins=self.pins, kept=kept,
                                         **kwargs)

    def serial_copy(self) -> Any:
        """The cell's spec for ``compare``'s serial run here: a copy of its notebook names,
        as each rank gets them (:func:`serial_cell_copy`)."""
        return serial_cell_copy(self.spec, self.backend)

    def _repack(self) -> tuple[bytes, shm.Lease | None]:
        """The cell's payload packed again into a new lease (a pool stop from another
        thread unlinked the first one's segments before the run was handed over:
        ``CellJob.prepare_payload_again``)."""
        lease = shm.Lease()
        with payload.keeping(self.job.kept):
            spec_bytes = _pack_spec(self.spec, lease)
        return spec_bytes, lease if lease.segments else None

    @property
    def spec_bytes(self) -> bytes:
        """The cell's payload as plain bytes, for ``%pdebug``'s replay of a rank. The
        bytes sent name pooled segments that the run gives back when it ends, so a
        payload that went through shared memory is pickled again here (only when asked)."""
        if self._plain is None:
            self._plain = _pack_spec(self.spec)
        return self._plain

    def record_kept(self) -> None:
        """After a ``keep=True`` run (however it ended): which worker keeps which rank."""
        if self.pins is not None:
            from . import ranks

            assert isinstance(self.job, ranks.KeptCellJob)  # (pins: made in __init__ with the pins)
            ranks.record(self.backend, self.size, self.job.placed)

    def report(self, wall: float, *, interrupted: bool = False, stopped_by: str | None = None) -> Report:
        """The cell's timing report (``wall`` seconds from submit to end). Of a run
        stopped by an interrupt (``interrupted``): ``items`` counts the ranks that
        finished (with a value), ``failed`` those that had failed, and ``total`` is the
        ranks of the run, so its line says ``parallel interrupted after 0 of 2 ranks
        finished, 1 failed (rank 1)``. Likewise of a run stopped by an error not of its
        ranks (``stopped_by``, its name: the pool was stopped under it): ``parallel
        stopped by MPMagicError after 1 of 2 ranks finished`` (it was read as a cell that
        ended: a timing line, and advice on its figures)."""
        job, size = self.job, self.size
        early = interrupted or stopped_by is not None  # (failed ranks are counted as failed)
        report = Report(
            kind="parallel",
            items=len(job.values) if early else size,
            total=size if early else None,
            interrupted=interrupted,
            workers=size,
            backend=self.backend.name,
            start_method=self.backend.start_method,
            wall=wall,
            task_seconds=job.task_seconds,
            failed=len(job.failures),
            failed_ranks=tuple(sorted(job.failures)),
            **_measured(job, self.backend, self.cold, self.recorder, size, lambda: self.spec.modules.values()),
        )
        if stopped_by is not None:
            report.extra.update(error=True, stopped_by=stopped_by)
        helpers = helpers_used(job)
        if helpers:  # (a Queue, a Value...: compare=True runs no serial copy, see serial_copy.py)
            no = serial_copy.judge(helpers, self.spec.names, self.namespace)
            if no is not None:
                report.extra["shared_state"] = no
        return report

    def gathered_so_far(self) -> dict[str, dict[int, Any]]:
        """Each ``gather`` name's values of the ranks that finished, by rank: what a failed
        or interrupted run keeps (``.gathered``) beside their last values, as nothing computed
        is lost. A rank that failed, or was stopped, has none."""
        return {g: {r: names[g] for r, names in sorted(self.job.gathered.items()) if g in names}
                for g in self.gather}

    def values(self, write: Callable[[str], Any]) -> RankValues:
        """The ranks' values, or ParallelError after writing each failing rank's traceback with ``write``."""
        __tracebackhide__ = True
        job, size = self.job, self.size
        if job.failures:
            job.flush_output()
            for rank in sorted(job.failures):
                exc = job.failures[rank]
                _note_unsent_name(exc, self.namespace, self.spec)
                serial_copy.name_helpers(exc, helpers_used(job), self.spec.names, self.namespace)  # (not the worker's words)
                # A task's exception shows its own frames as IPython would; ours are one line.
                text = format_exception(exc) if exc.__traceback__ is not None else f"{type(exc).__name__}: {exc}"
                write("".join(f"[rank {rank}] {line}\n" for line in text.splitlines()))
            # The line names the rank that failed first in time: the cause (the ranks
            # stopped after it, or timed out waiting on it, follow from it).
            cause = first_failed_rank(job.failures)
            error = ParallelError(parallel_error_line(job.failures, size, job.retried_ranks), dict(job.failures),
                                  dict(job.values), self.gathered_so_far())
            # Its traceback goes on into that rank's frames, as a map's task error does:
            # %debug stops at the rank's line, not at this raise (IPython shows the error as one line).
            ordered = [job.failures[cause], *(e for _, e in sorted(job.failures.items()))]
            frames = next((e.__traceback__ for e in ordered if e.__traceback__), None)
            raise error.with_traceback(frames) from None
        values = RankValues(job.results())
        values.gathered = {g: [job.gathered[r][g] for r in range(size)] for g in self.gather}
        values.ranks_without_setup = tuple(sorted(job.ranks_without_setup))
        values.ranks_other_code = dict(job.ranks_other_code)
        return values


def failed_before(failures: dict[int, BaseException]) -> str:
    """What an interrupted cell's line says of the ranks that had failed before it
    (why the others waited, often): ``rank 1 had failed (ValueError: bad input)``."""
    cause = first_failed_rank(failures)
    exc = failures[cause]
    first = str(exc).split("\n", 1)[0]
    text = f"rank {cause} had failed ({type(exc).__name__}{': ' + first if first else ''}"
    others = sorted(r for r in failures if r != cause)
    if others:
        text += f"; rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} too"
    return text + "; kept in this interrupt's .failures)"


def _note_unsent_name(exc: BaseException, namespace: dict[str, Any], spec: Any) -> None:
    """A rank's NameError for a notebook variable the cell's code never names
    (read only by a string built at run time and given to ``exec``/``eval``):
    say why the rank has no copy, and how to send it (``errors.note_unsent_name``,
    which a map's failing task goes through too: ``jobs.MapJob``). Or one the cell
    assigns, left out as it cannot be pickled (``spec.unsent``), read before the
    cell assigned it: say why it was not sent and what to do."""
    unsent = getattr(spec, "unsent", {})
    if unsent:  # a notebook variable the cell assigns, not sent as it cannot be pickled (_pack_spec)
        note_unsent_name(
            exc, {k: v for k, v in namespace.items() if k in unsent}, (),
            lambda name: (f"mpmagic: the notebook's {name!r} was not sent to the ranks: {unsent[name].rstrip('.')}. "
                          f"The cell assigns {name!r}, so it ran without it, but this rank read it first: assign "
                          f"{name!r} in the cell before reading it, or give the notebook's {name!r} a value that "
                          "can be sent"),
            key_errors=False,
        )
    note_unsent_name(
        exc, namespace, spec.names.keys() | spec.modules.keys() | unsent.keys(),
        lambda name: (f"mpmagic: the notebook has {name!r}, but the cell's code does not name it (a string given "
                      f"to exec or eval?), so the ranks got no copy: name it in the cell, e.g. a line `{name}`, "
                      "to send it"),
        key_errors=False,
    )


def _pack_spec(spec: Any, lease: shm.Lease | None = None, local: bool = False) -> bytes:
    """The cell's payload: its code and the notebook names it reads (less those it
    assigns whose values cannot be pickled: :func:`cell.leave_out_unpicklable`).

    With a ``lease`` (workers on this machine), numpy buffers of 1 MB or more
    among the names go into the lease's pooled shared-memory segments, as a
    map's items do (workers map them read-only, unless
    ``shm.configure(writable=True)``), instead of one copy per rank through the
    pipe, and a file-backed ``np.memmap`` goes as its file's name, opened again
    by each rank (``payload.memmaps_by_reference``). ``local`` (workers on this machine,
    with or without a lease: kept ranks get none) sends those, and a view of an
    ``mpmagic.Array``'s data, by reference too: a kept rank's ``view[rank] = x`` wrote
    into its copy, lost.
    """
    collector = shm.Collector() if lease is not None else None
    try:
        with payload.memmaps_by_reference() if lease is not None or local else contextlib.nullcontext():
            data = payload.dumps_function(spec, "the cell's names", collector)
        if collector is not None and collector.buffers:
            return shm.wrap(data, collector.buffers, "lend", lease)[0]
        return data
    except Exception:
        if leave_out_unpicklable(spec):  # (raises for a name the cell only reads)
            return _pack_spec(spec, lease, local)
        raise


def cell_has_value(code: str) -> bool:
    """Does the cell end in an expression (so it has a value to show)? Or in an
    assignment to one name, where IPython shows those (``cell.shows_last_assignment``)."""
    try:
        return split_last_expression(astlock.parse(code), shows_last_assignment())[1] is not None
    except SyntaxError:
        return False


__all__ = ["pmap", "parallel", "last_report", "RankValues", "render_traceback"]
