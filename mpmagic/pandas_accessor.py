"""``df.mp.apply``, ``series.mp.map``, ``df.groupby(key).mp.apply``: pandas on the pool.

pandas users think in ``apply`` and ``map``, not in ``map(func, items)``. The
accessor cuts the frame into pieces, runs pandas' *own* call on each piece in
the workers (through :func:`mpmagic.pmap`, so payloads, errors, output and the
timing report are the usual ones), and puts the pieces back together so that
the result is what pandas' call on the whole frame returns: same index, same
column order, same dtypes.

* ``df.mp.apply(func, axis=...)`` / ``series.mp.map(func)`` /
  ``series.mp.apply(func)``: contiguous row (or column) chunks, a few per
  worker. Each worker runs pandas' own call on its chunk, so ``func`` sees the
  very rows, columns or values pandas would hand it, and sends back what
  ``func`` returned, call by call. At home pandas assembles the result from the
  whole list at once, as its call on the whole frame does: gluing chunk results
  together (``pd.concat``) is not the same, as rows returning Series with other
  keys, or chunks of ints next to chunks with a None, would come out in another
  column order or dtype.
* ``df.groupby(key).mp.apply(func)``: whole groups are sent in batches; each
  worker groups its batch again with the same keys and options and records
  ``func(group)`` per group name. At home, pandas' own ``apply`` assembles the
  result from those values (a lookup per group), so every subtlety of groupby's
  result shape (group keys in the index, Series results unstacked, categorical
  keys) is pandas' own.
* The timing report is that of the whole call, from entering ``.mp.map`` to
  having pandas' result: splitting the input and pandas' assembly of the
  result here are in its wall time, as they are in a stopwatch around the
  call, and the line says how much they took. The serial estimate is the task
  times (pandas' own call on each piece: what the call on the whole frame does
  but for building the result); ``compare=True`` runs pandas' own call here
  too and measures it.
* Empty inputs, categorical and sparse Series (pandas maps their few
  categories, or their fill value once, not each value), and a function given
  as a string, a NumPy ufunc or a list or dict of functions (pandas runs those
  as vectorized calls on the whole column, not once per value; a GroupBy's
  ``apply("sum")`` is its ``sum()``) run pandas' call here: nothing to gain from workers. No run, so no report
  (``last_report()`` is None, not an earlier run's); ``compare=True`` says so
  in one line.
* ``raw=True`` over columns: pandas hands ``func`` the columns of ``df.values``
  (the whole frame's common dtype), so the pieces are cut from that array, not
  from the frame (whose pieces have their own dtypes). numpy shapes pandas'
  raw result after the first value: a piece's pandas call is only the way its
  values reach ``func`` (``_raw_calls``), the whole's assembles them.
* ``result_type="broadcast"`` over repeated row (or column) labels runs here:
  pandas hands ``func`` every row of such a label at once, which no piece holds.

Registered only when pandas is imported (``mpmagic`` never imports pandas
itself): at ``import mpmagic`` or ``%load_ext mpmagic`` if pandas is already
imported, else as soon as a cell or a script imports it (``pandas_hook``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
import sys
import time
import types
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pandas.core.groupby import DataFrameGroupBy, SeriesGroupBy

from . import worker_logging
from .checks import check_whole
from .errors import UsageError, add_note
from .fmt import noun

log = logging.getLogger("mpmagic")

ACCESSOR = "mp"
#: Row chunks per worker: enough for an uneven tail, few enough that each is worth a message.
CHUNKS_PER_WORKER = 4


#: The warnings pandas charges to this module's lines: its remarks about a call (pandas 2's
#: "DataFrameGroupBy.apply operated on the grouping columns"), charged to the first frame
#: outside pandas, which serially is the user's line and here is ours.
_OURS = re.escape(__name__) + r"\Z"


class _ChargedToCaller:
    """``with _ChargedToCaller():`` the block's warnings that pandas charges to this
    module's lines are charged to the line that called the accessor (the first frame
    outside this module), as serially; the others show as they came. The filters are
    applied once, to where each is charged. A class, not a generator: an error raised in
    the block gets no frame of ours."""

    __slots__ = ("_recording", "_caught")

    def __enter__(self) -> None:
        self._recording = warnings.catch_warnings(record=True)
        caught = self._recording.__enter__()  # (the list it records into: empty yet)
        self._caught = caught if caught is not None else []
        warnings.simplefilter("always")

    def __exit__(self, *exc_info: Any) -> None:
        self._recording.__exit__(*exc_info)  # (shown also when the block raised, as serially before the error)
        caller: types.FrameType | None = sys._getframe(1)
        while caller is not None and caller.f_code.co_filename == __file__:
            caller = caller.f_back
        for w in self._caught:
            if w.filename == __file__ and caller is not None:
                names = caller.f_globals
                warnings.warn_explicit(w.message, w.category, caller.f_code.co_filename, caller.f_lineno,
                                       module=names.get("__name__"),
                                       registry=names.setdefault("__warningregistry__", {}), module_globals=names)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


# --------------------------------------------------------------------------
# What runs in the workers (module functions: pickled by name, never by value)


def _record(piece: pd.DataFrame | pd.Series, method: str, options: dict, func: Callable,
            repeated: bool = False) -> Any:
    """What ``func`` returns for each call pandas' own ``piece.<method>(func, **options)`` makes, in order.

    pandas hands ``func`` the rows, columns or values (boxed as Timestamps,
    skipping NaN under ``na_action='ignore'``...) as it would for the whole
    frame; only the assembly of the results waits for home, where it sees them all.
    ``repeated``: the whole's labels repeat, so the note naming the row ``func``
    raised on also gives its position (in the piece: home makes it the whole's, :func:`_placed`).
    """
    __tracebackhide__ = True  # (ours: a task's traceback starts at pandas' call, as serially)
    values: list = []
    stand_in = _broadcast_stand_in(piece, options)
    raw = _raw_calls(piece, options)

    def recorder(x: Any) -> Any:
        __tracebackhide__ = True
        try:
            value = func(x)
        except BaseException as exc:
            _note(exc, _which(piece, options, x, len(values), repeated))
            raise
        if isinstance(value, pd.Series):
            value = value.copy(deep=False)  # as pandas does: the row it passes may be reused for the next one
        values.append(value)
        if raw is not None:  # (numpy stores each value in an array shaped after the piece's first)
            return values[0]
        return value if stand_in is None else stand_in

    with worker_logging.naming_items(lambda: _nth(piece, options, len(values))):  # ([row 'r57'], not [item 4])
        try:
            getattr(piece, method)(recorder, **options)
        except Exception as exc:
            if raw is None or len(values) != raw or _row_note(exc) is not None:
                raise
            # (pandas could not make a frame of the piece's values, a 2-D one: the whole's decides, at home)
    return _pack(values)


def _raw_calls(piece: pd.DataFrame | pd.Series, options: dict) -> int | None:
    """How many rows or columns pandas' ``raw=True`` apply on ``piece`` hands ``func``; None: not such a call.

    pandas runs ``np.apply_along_axis``, which stores every value in one array
    shaped and typed after the first: the whole frame's first, which a piece's
    first is not. A value of another shape than the piece's first (a
    ``c[:1]`` that the whole's broadcasts into its first's) failed in the
    worker where pandas' call on the whole succeeds; so the worker's call is
    given the piece's first value again for each (:func:`_record`), and once
    ``func`` has had every row or column, the piece's own assembly is thrown
    away, failing or not: home assembles the whole from the values recorded,
    as pandas does, and raises pandas' own error, with the whole's shapes.
    """
    if not isinstance(piece, pd.DataFrame) or not options.get("raw") or options.get("result_type") == "broadcast":
        return None
    return piece.shape[1] if options.get("axis", 0) in (0, "index") else piece.shape[0]


def _broadcast_stand_in(piece: pd.DataFrame | pd.Series, options: dict) -> Any:
    """What the worker's ``apply(result_type="broadcast")`` over columns is given in place of ``func``'s value.

    pandas writes each column's value into one array of the frame's common
    dtype (``np.empty_like(df.values)``). The whole frame's is wider than a
    piece's: a str next to an int column is object there, int64 in the piece
    holding only the int column, where ``"col x"`` raised "invalid literal for
    int()" although pandas' call on the whole succeeds. The piece's array is
    thrown away (home assembles the whole from the recorded values, as pandas
    does, and raises pandas' own error where it raises), so it is given a
    zero of its own dtype, which fits. None: the value itself (rows, other result types).
    """
    if not isinstance(piece, pd.DataFrame) or options.get("result_type") != "broadcast":
        return None
    if options.get("axis", 0) not in (0, "index"):  # (a row piece holds every column: the whole's dtype)
        return None
    return np.zeros((), dtype=piece.values.dtype)


class _Packed:
    """A list of NumPy (or Python) scalars of one type as one array: 1M ``np.float64`` pickle 30x faster."""

    def __init__(self, kind: type, array: np.ndarray) -> None:
        self.kind, self.array = kind, array

    def unpack(self) -> list:
        # tolist() gives Python scalars, list() the array's own NumPy scalars: the types func returned
        return self.array.tolist() if self.kind in (float, bool) else list(self.array)


_PACKABLE = (float, bool, np.float64, np.float32, np.int64, np.int32, np.bool_)


def _pack(values: list) -> list | _Packed:
    kinds = {type(v) for v in values}
    if len(kinds) == 1 and (kind := kinds.pop()) in _PACKABLE:
        return _Packed(kind, np.array(values, dtype=kind))
    return values


def _unpack(parts: list) -> list:
    """The workers' recorded values, in order, as one list."""
    out: list = []
    for part in parts:
        out.extend(part.unpack() if isinstance(part, _Packed) else part)
    return out


def _apply_groups(batch: pd.DataFrame | pd.Series, names: list, spec: dict, selection: Any,
                  func: Callable, args: tuple, kwargs: dict, options: dict) -> list:
    """``func(group)`` for each group of ``batch`` named in ``names``, in that order.

    ``options``: pandas' own keywords for its apply (``include_groups``), so each
    group is what pandas' call on the whole would hand ``func``.
    """
    __tracebackhide__ = True
    wanted = {_group_key(name) for name in names}
    found: dict = {}
    grouped = batch.groupby(**spec)
    if selection is not None:
        grouped = grouped[selection]

    running: list = []  # the name of the group func is running on (for a record's label)

    def record(group: Any) -> None:
        __tracebackhide__ = True
        key = _group_key(group.name)
        if key in wanted:  # observed=False may also show empty groups of absent categories
            running.append(group.name)
            try:
                found[key] = func(group, *args, **kwargs)
            except BaseException as exc:
                _note(exc, f"group {_label(group.name)}")
                raise
            finally:
                running.clear()

    with warnings.catch_warnings(), worker_logging.naming_items(
            lambda: f"group {_label(running[0])}" if running else ""):
        # (pandas' remarks about the call: the notebook's own apply, which assembles the
        # result, makes them too and charges them to the user's line, see _ChargedToCaller)
        warnings.filterwarnings("ignore", module=_OURS)
        grouped.apply(record, **options)
    return [found[_group_key(name)] for name in names]


#: The note on an exception ``func`` raised in a worker: which row, column or group it was given.
#: It replaces the pool's "raised by item N of the input", whose N counts the accessor's pieces.
_RAISED_BY = "mpmagic: raised by "
_ITEM_NOTE = "mpmagic: raised by item "


def _row_note(exc: BaseException | None) -> str | None:
    """The note on ``exc`` naming the row, column or group ``func`` raised on (``_note``), if any."""
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, (list, tuple)):
        return None
    return next((n for n in notes if isinstance(n, str) and n.startswith(_RAISED_BY)
                 and not n.startswith(_ITEM_NOTE)), None)


def _note(exc: BaseException, what: str) -> None:
    """Name the row, column or group ``func`` failed on, as a note (once: the first, innermost, wins)."""
    if _row_note(exc) is None:
        add_note(exc, f"{_RAISED_BY}{what}")  # (never raising: func's own error stays)


def _which(piece: pd.DataFrame | pd.Series, options: dict, x: Any, k: int, repeated: bool = False) -> str:
    """The row, column or value ``x``, the ``k``-th that pandas' call on ``piece`` handed ``func``, by its label
    (and, where labels repeat, its position in ``piece``: "row 1 (position 3)", which home makes the whole's)."""
    what = _nth(piece, options, k, x)
    if not what:
        return f"the value {_label(x)}"
    if repeated:
        if isinstance(piece, pd.Series) and options.get("na_action") == "ignore":  # (k counts the values given)
            k = int(np.flatnonzero(piece.notna().to_numpy())[k])
        what += f" (position {k})"
    return what


#: How a note names the position of a row whose label repeats (:func:`_which`, :func:`_placed`).
_POSITION = re.compile(r" \(position (\d+)\)\Z")
_ITEM = re.compile(r"mpmagic: raised by item (\d+) of the input")


def _placed(exc: BaseException, spans: list[tuple[int, int]]) -> None:
    """The position in the note on ``exc`` (or its cause) made the whole's: the worker counted from its piece's start.

    A frame whose labels repeat (two rows labelled 1) had its failing row named
    by its label alone, "raised by row 1": which of them the user could not tell.
    The pool's note names the piece ("raised by item N"), whose start is ``spans[N][0]``.
    """
    notes = getattr(exc, "__notes__", None)
    item = next((m for n in notes or () if isinstance(n, str) and (m := _ITEM.match(n))), None)
    if item is None or int(item[1]) >= len(spans):
        return
    start = spans[int(item[1])][0]
    for holder in (exc, exc.__cause__):
        note = _row_note(holder)
        if note is None or (found := _POSITION.search(note)) is None:
            continue
        whole = note[:found.start()] + f" (position {start + int(found[1])})"
        notes = holder.__notes__  # type: ignore[union-attr]
        fixed = [whole if n == note else n for n in notes]
        BaseException.__setattr__(holder, "__notes__", fixed if isinstance(notes, list) else tuple(fixed))
        attributes = getattr(holder, "__dict__", {})
        for render in (attributes.get("_render_traceback_"), attributes.get("_render_without_frames")):
            if isinstance(getattr(render, "lines", None), list):  # (Python < 3.11 shows notes through it)
                render.lines = [whole if line == note else line for line in render.lines]  # type: ignore[union-attr]
        return


def _nth(piece: pd.DataFrame | pd.Series, options: dict, k: int, x: Any = None) -> str:
    """The ``k``-th row or column pandas' call on ``piece`` hands ``func`` (``x``, if given), by its label:
    "row 'r57'", "column 'b'"; "" where there is none (``k`` past the last: pandas' own call, after them)."""
    try:
        if isinstance(piece, pd.DataFrame):
            rows = options.get("axis", 0) in (1, "columns")
            labels = piece.index if rows else piece.columns
            label = x.name if isinstance(x, pd.Series) else labels[k]  # (raw=True: an array, no name)
            return f"{'row' if rows else 'column'} {_label(label)}"
        index = piece.index
        if options.get("na_action") == "ignore":  # pandas skips the missing values
            index = index[piece.notna().to_numpy()]
        return f"row {_label(index[k])}"
    except Exception:  # (never hide func's own error behind ours)
        return ""


def _label(label: Any, limit: int = 80) -> str:
    """A row or group label as the user wrote it: ``17``, ``'a'``, ``(1, 'x')`` (not ``np.int64(17)``)."""
    if isinstance(label, tuple):
        text = "(" + ", ".join(_label(part) for part in label) + ("," if len(label) == 1 else "") + ")"
    else:
        try:
            text = repr(label.item() if isinstance(label, np.generic) else label)
        except Exception:
            text = f"<{type(label).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _own_notes(exc: BaseException) -> None:
    """Drop the pool's "raised by item N of the input" note, whose N counts the accessor's pieces.

    The worker named the row or group instead (``_note``), on the exception or on
    its cause (``func``'s KeyboardInterrupt, which the pool makes a RuntimeError);
    if it did not, pandas' own call raised, not ``func``. A note starting with "mpmagic: "
    stays, as it tells the display the exception came from a worker.
    """
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, (list, tuple)) or not any(isinstance(n, str) and n.startswith(_ITEM_NOTE) for n in notes):
        return
    # (a KeyboardInterrupt func raised comes as the pool's RuntimeError: the row is named on its cause)
    fix = ("" if _row_note(exc) is not None
           else _row_note(exc.__cause__) or "mpmagic: raised in a worker by pandas' own call, not by the function")

    def keep(lines: list) -> list:
        out = []
        for line in lines:
            if isinstance(line, str) and line.startswith(_ITEM_NOTE):
                if fix:
                    out.append(fix)
            else:
                out.append(line)
        return out

    kept = keep(list(notes))
    BaseException.__setattr__(exc, "__notes__", kept if isinstance(notes, list) else tuple(kept))
    attributes = getattr(exc, "__dict__", {})
    for render in (attributes.get("_render_traceback_"), attributes.get("_render_without_frames")):
        if isinstance(getattr(render, "lines", None), list):  # (Python < 3.11 shows notes through it)
            render.lines = keep(render.lines)  # type: ignore[union-attr]


class _NA:
    """The one key for a missing group value (``dropna=False``)."""


def _group_key(name: Any) -> Any:
    """A group name that equals itself wherever it comes from.

    With ``dropna=False`` a key may be NaN (or None, NaT): NaN never equals
    itself, and a group's name is a new NaN object after pickling or each
    time pandas makes one, so neither a dict nor ``in`` finds it. pandas puts
    every missing value in one group: so does this key.
    """
    if isinstance(name, tuple):
        return tuple(_group_key(part) for part in name)
    if pd.api.types.is_scalar(name) and pd.isna(name):
        return _NA
    return name


# --------------------------------------------------------------------------
# At home


def _workers(workers: int | None) -> int:
    if workers is not None:
        return workers
    from .pool import get_pool

    return max(1, get_pool().workers)


def _bounds(n: int, pieces: int) -> list[tuple[int, int]]:
    """``pieces`` contiguous, nearly equal [start, stop) ranges covering range(n)."""
    pieces = max(1, min(n, pieces))
    step = n / pieces
    cuts = [round(i * step) for i in range(pieces + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _run(call: str, func: Callable, items: list, spans: list[tuple[int, int]], workers: int | None, what: str,
         chunks: int | None) -> tuple[list, Any]:
    """``mpmagic.pmap(func, items)``, one item per message: (its results, its report of ``call``, counting ``what``).

    ``spans``: the [start, stop) positions of the rows, columns or groups (``what``)
    each item holds; ``chunks``: the number of pieces the user chose (``chunks=``),
    None when it was automatic. The report is named after the accessor's call and
    counts its rows, columns or groups, not the pieces they travelled in, so that
    its line and advice speak of what the user wrote (``df.mp.apply: 30 rows``,
    ``chunks=``), not of a pmap (``pmap: 8 items``, ``--chunksize``).
    The report is shown by :func:`_report`, once the result is assembled.
    """
    __tracebackhide__ = True  # (ours, as pmap's: a task's error shows the cell's line, then the task's frames)
    from . import api, draws

    try:
        results = api.pmap(func, items, workers=workers, chunksize=1)
    except BaseException as exc:
        _placed(exc, spans)
        stop = _functions_stop(exc)
        if stop is not None:
            raise stop from None
        _own_notes(exc)
        raise
    report = api.last_report()
    draws.say_random_draws(func, workers, advised=False, accessor=True)  # (rng.random() of the notebook's rng...)
    api.say_copied_state(_users_function(func))  # (results.append(x) of a notebook list, next(ids) of its count())
    if report is not None:
        count = spans[-1][1] if spans else 0
        report.items = count
        report.caller = call
        report.extra["accessor"] = {"unit": what, "chunks": chunks, "per_worker": CHUNKS_PER_WORKER}
        size = math.ceil(count / max(1, len(items)))
        per_piece = f"~{size} {noun(what, size)}"
        report.chunksize = per_piece if chunks is not None else f"auto ({per_piece})"
        report.slowest_where = _piece_text(report.slowest_where, spans, what)
    return results, report


def _functions_stop(exc: BaseException) -> StopIteration | None:
    """The ``StopIteration`` ``func`` raised, when the pool made it its item's ``RuntimeError``.

    The pool does so because a task's StopIteration would end a serial ``map()``
    early; pandas' own call lets it through instead (``s.map(f)`` raises it), so
    the accessor raises it as pandas would, with its note naming the row (the
    RuntimeError said "raised in a worker by pandas' own call", which it was not).
    None for any other exception, and for a StopIteration pandas' call raised itself.
    """
    cause = exc.__cause__
    if type(exc) is not RuntimeError or not isinstance(cause, StopIteration):
        return None
    return cause if _row_note(cause) is not None else None


def _piece_text(where: str | None, spans: list[tuple[int, int]], what: str) -> str | None:
    """The report's slowest unit, "item 3" (the fourth piece), as the rows, columns or groups it held:
    "the chunk of rows 30-39" (by position), or "row 30" for a piece of one."""
    match = re.fullmatch(r"item (\d+)", where or "")
    if match is None or int(match[1]) >= len(spans):
        return where
    a, b = spans[int(match[1])]
    return f"{what[:-1]} {a}" if b - a == 1 else f"the chunk of {what} {a}-{b - 1}"


def _report(report: Any, started: float, result: Any, quiet: bool, serial: Callable[[], Any] | None) -> None:
    """Make ``report`` the whole call's (``started``: when the accessor was entered), then show it.

    Its wall time becomes the call's, splitting and assembling included (a
    stopwatch around ``s.mp.map(f)`` and the line agree); ``home_seconds`` is
    how much of it was spent here outside the run. ``serial``: with
    ``compare=True``, pandas' own call, timed here as the measured serial time
    (its result compared with ``result``).
    """
    if report is None:
        return
    wall = time.perf_counter() - started
    report.home_seconds = max(0.0, wall - report.wall)
    report.wall = wall
    if serial is not None and "shared_state" in report.extra:  # (a Queue, a Value...: see serial_copy.py)
        from .api import _no_serial_copy

        _no_serial_copy(report, "the function")
    elif serial is not None:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():  # (pandas' remarks about the call: the run's own said them)
                warnings.filterwarnings("ignore", module=_OURS)
                expected = serial()
        except Exception as exc:
            report.serial_error = f"{type(exc).__name__}: {exc}"
        else:
            report.serial = time.perf_counter() - t0
            report.equal = _same(result, expected)
    if not quiet:
        _show(report)


def _same(result: Any, expected: Any) -> bool:
    """pandas' own equality (same values, NaN equal to NaN, same dtypes and labels), for compare=True."""
    if isinstance(result, (pd.Series, pd.DataFrame)):
        return type(result) is type(expected) and bool(result.equals(expected))
    try:
        return bool(result == expected)
    except Exception:
        return False


def _show(report: Any) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython is a dependency
        print(report.text())
        return
    if get_ipython() is not None:
        display(report)  # the HTML table in Jupyter, the line in a terminal: as %pmap shows it
    else:
        print(report.text())


def _replay(obj: pd.DataFrame | pd.Series, method: str, options: dict, values: list, func: Callable) -> Any:
    """pandas' own ``obj.<method>(func, **options)``, with the values ``func`` returned in the workers.

    Every pandas call the accessor parallelizes calls ``func`` once per row,
    column or value, in order, in a chunk as in the whole (sparse and
    categorical Series, which do not, never get here); should a pandas version
    differ, the count differs and the call runs here, with a warning, rather
    than give another result.
    """
    remaining = iter(values)

    def replay(*_: Any, **__: Any) -> Any:
        return next(remaining)  # a closure over an iterator: ~50 ns a value, as cheap as it gets

    try:
        result = getattr(obj, method)(replay, **options)
        if next(remaining, _END) is _END:
            return result
    except StopIteration:
        pass
    log.warning("mpmagic: pandas' %s.%s called the function %s times for the chunks but not for the whole; "
                "running it here", type(obj).__name__, method, len(values))
    return getattr(obj, method)(func, **options)


_END = object()


def _assemble_frame(df: pd.DataFrame, values: list, options: dict, func: Callable) -> Any:
    """``df.apply(func, ...)`` from the values ``func`` returned for each row (or column), in order.

    pandas builds the result from all of them at once (``wrap_results``: a
    Series of scalars, or a frame whose columns are the union of the keys the
    rows returned, dtypes inferred over all rows). Its own apply object does
    that here without walking the rows again; where it is not there (another
    pandas version), pandas' apply replays the values, which costs one pass over
    the rows at home. ``options``: pandas' keywords (``axis``, ``raw``,
    ``result_type``, and any other, which only the replay passes on).
    """
    axis, raw, result_type = options["axis"], options["raw"], options["result_type"]
    plain = set(options) == {"axis", "raw", "result_type"}
    wrap = None if raw or result_type == "broadcast" or not plain else _pandas_wrap(df, func, axis, result_type)
    if wrap is not None and len(values) == df.shape[0 if axis in (1, "columns") else 1]:
        # (one value per row, or column: anything else would put values beside the
        # wrong rows, so pandas' replay, which checks the count, decides then)
        return _finalized(wrap(dict(enumerate(values))), df)
    return _replay(df, "apply", options, values, func)


def _finalized(result: Any, df: pd.DataFrame) -> Any:
    """``result`` with the metadata (``attrs``, flags) that ``DataFrame.apply`` copies from ``df`` onto its own.

    pandas' ``wrap_results`` builds the bare result; ``df.apply`` then calls
    ``__finalize__(df, method="apply")``, so a frame's ``attrs`` reach the result.
    """
    return result.__finalize__(df, method="apply") if isinstance(result, (pd.DataFrame, pd.Series)) else result


def _pandas_wrap(df: pd.DataFrame, func: Callable, axis: Any, result_type: Any) -> Callable | None:
    """pandas' own assembly of ``df.apply``'s per-row results (private: None if this pandas lacks it)."""
    try:
        from pandas.core.apply import frame_apply

        op = frame_apply(df, func=func, axis=axis, raw=False, result_type=result_type, args=(), kwargs={})
        return functools.partial(op.wrap_results, res_index=op.result_index)
    except (ImportError, AttributeError, TypeError):
        return None


def _raw_columns(df: pd.DataFrame, spans: list[tuple[int, int]]) -> list[pd.DataFrame]:
    """Column pieces of ``df`` whose ``.values`` are those of ``df.values``, split by columns.

    ``df.apply(func, raw=True)`` hands ``func`` the columns of ``df.values``,
    one array of the whole frame's common dtype: float64 for int and float
    columns, object for int and str (or bool and int, tz-aware dates and
    ints, two nullable Int64 columns). A piece's own ``.values`` has the
    piece's dtype (int64 for the int column alone), so ``func`` saw other
    values, and pandas, building the result from the first value's dtype,
    truncated the float column's 1.25 to 1. Each piece is that array's columns,
    with their labels, as one block of its dtype (given, so that pandas infers
    no datetimes from an object array).
    """
    values = df.values
    return [pd.DataFrame(values[:, a:b], index=df.index, columns=df.columns[a:b], dtype=values.dtype, copy=False)
            for a, b in spans]


def _users_function(task: Callable) -> Callable:
    """The user's function a task of ours wraps (``partial(_record, func=partial(_call_with, func=f))``: f)."""
    while isinstance(task, functools.partial) and "func" in task.keywords:
        task = task.keywords["func"]
    return task


def _bind(func: Callable, args: tuple, kwargs: dict) -> Callable:
    return functools.partial(_call_with, func=func, args=args, kwargs=kwargs) if args or kwargs else func


def _call_with(x: Any, func: Callable, args: tuple, kwargs: dict) -> Any:
    __tracebackhide__ = True
    return func(x, *args, **kwargs)


def _vectorized(func: Any) -> bool:
    """A function pandas does not call once per row or value: a method name, a ufunc, a list or dict of them."""
    return isinstance(func, (str, np.ufunc, list, tuple, dict)) or not callable(func)


def _at_home(call: str, why: str, compare: bool, quiet: bool, pandas_call: Callable[[], Any]) -> Any:
    """``pandas_call()``: pandas' own call on the whole object, run here (``why``: nothing for the workers).

    ``pandas_call`` is a ``functools.partial``, which adds no frame of ours to
    the traceback of an exception pandas' call raises.

    No run, so no report: ``last_report()`` is None, not the run before, which
    read as this call's (an earlier call's 50 items and RESULTS DIFFER).
    ``compare=True`` has nothing to compare this call with: one line says so
    (unless ``quiet``), where it was silently ignored.
    """
    __tracebackhide__ = True
    from . import api

    api._set_report(None)
    with _ChargedToCaller():
        result = pandas_call()
    if compare and not quiet:
        print(f"{call}: pandas' own call ran here, serially ({why}): nothing to compare")
    return result


def _vectorized_why(func: Any) -> str:
    """Why pandas' call with this ``func`` runs here, in the words of :func:`_at_home`'s line."""
    if isinstance(func, str):
        return f"a function given by name, {func!r}: one vectorized call"
    if isinstance(func, np.ufunc):
        return f"a NumPy ufunc, np.{func.__name__}: one vectorized call"
    if isinstance(func, (list, tuple, dict)):
        return f"a {'dict' if isinstance(func, dict) else 'list'} of functions: vectorized calls"
    return f"a {type(func).__name__}, which is no function pandas calls per row"


def _broadcast_why(df: pd.DataFrame, by_rows: bool, result_type: Any) -> str | None:
    """Why ``df.apply(func, result_type="broadcast")`` runs here: labels along its axis that repeat. None: it need not.

    pandas' broadcast hands ``func`` ``target[label]``, for each position:
    for a label that two rows (or columns) share, both at once, as a frame.
    A piece holding one of them would hand it alone, so ``func`` saw other
    values, and the result differed silently.
    """
    labels = df.index if by_rows else df.columns
    if result_type != "broadcast" or labels.is_unique:
        return None
    what = "row" if by_rows else "column"
    return (f"result_type='broadcast' over duplicate {what} labels: pandas hands func every {what} "
            "of a label at once")


def _distinct_why(s: pd.Series) -> str:
    kind = "categorical" if isinstance(s.dtype, pd.CategoricalDtype) else "sparse"
    what = "each category once" if kind == "categorical" else "its fill value once, then the stored values"
    return f"a {kind} Series: pandas maps {what}"


def _options_why(options: dict, per_piece: Sequence[str] = ()) -> str:
    """The pandas options that keep the call at home (see :func:`_split_options`), as written."""
    named = ", ".join(f"{name}={value!r}" for name, value in options.items() if name not in per_piece)
    return f"{named}: pandas' own option, which does not mean the same on pieces"


def _maps_distinct_values(s: pd.Series) -> bool:
    """Does pandas map this Series' distinct values rather than each value?

    A categorical maps its categories, a sparse Series its fill value once and
    then the stored values: the calls differ between chunks and the whole, and
    there are few of them. pandas' own call runs here.
    """
    return isinstance(s.dtype, (pd.CategoricalDtype, pd.SparseDtype))


def _split_options(method: Callable, kwargs: dict, handled: Sequence[str] = (),
                   per_piece: Sequence[str] = ()) -> tuple[dict, dict, bool]:
    """``kwargs`` split as pandas' own ``method`` splits them: (pandas' options, func's keywords, at home).

    ``per_piece``: the options that mean the same on a piece as on the whole
    (``include_groups``): they are passed to pandas' call on each piece. Any
    other option set away from its default (``Series.apply(by_row=False)``: one
    call on the whole Series; ``engine=``: another executor) cannot be cut in
    pieces: pandas' own call runs here.

    Which keywords are pandas' own depends on the pandas version (``include_groups``
    came in 2.2, ``by_row`` in 2.1, ``engine`` for ``Series.map`` in 3.0): read
    from the installed pandas' signature, so a keyword pandas itself would hand
    to ``func`` still goes to ``func``. An option left at its default is
    dropped; ``at home`` is True when one that cannot mean the same on pieces
    is set, and pandas' call must then run here on the whole object.
    """
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):  # pragma: no cover - pandas' methods have signatures
        return {}, kwargs, False
    own = {name: p.default for name, p in params.items()
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in ("self", "func", *handled)}
    options: dict = {}
    rest: dict = {}
    home = False
    for name, value in kwargs.items():
        if name not in own:
            rest[name] = value
        elif name in per_piece:
            options[name] = value
        elif not _is_default(value, own[name]):
            options[name] = value
            home = True
    return options, rest, home


def _is_default(value: Any, default: Any) -> bool:
    """Is ``value`` pandas' default for its option (None, ``'compat'``...)?"""
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # an array, say: not a default
        return False


def _own_options(method: str, func: Any, workers: Any, chunks: Any, quiet: Any, compare: Any) -> int | None:
    """Refuse what would silently change the user's call: pandas passes unknown
    keywords on to ``func``, so a function whose own parameter is named like
    one of the accessor's options (``compare``, ``workers``, ``chunks``,
    ``quiet``) would lose that argument to us (``s.map(f, compare="left")``
    gave ``f`` its ``compare``; ``s.mp.map`` took it). And ``compare`` is a switch.
    Returns ``chunks`` as a plain int (None: automatic)."""
    given = {"workers": workers is not None, "chunks": chunks is not None, "quiet": quiet is not False,
             "compare": compare is not False}
    try:
        params = inspect.signature(func).parameters if callable(func) else {}
    except (TypeError, ValueError):
        params = {}
    for name in (n for n, on in given.items() if on and n in params
                 and params[n].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)):
        raise UsageError(f"{method}: `{name}` is this accessor's option and also a parameter of "
                         f"{getattr(func, '__name__', 'the function')}: pass the function's own with "
                         f"functools.partial(f, {name}=...) (or args=)")
    if chunks is not None:  # (a plain int: a numpy one, df[c].nunique(), is taken as the int it is)
        # (0 was taken as automatic, -1 ran, 2.5 and 'x' failed in raw TypeErrors: checked as workers= is)
        chunks = check_whole("chunks", chunks, 1, "a whole number of at least 1 (the pieces the rows, columns or "
                             f"groups are split into), or None ({CHUNKS_PER_WORKER} per worker)")
    if not isinstance(compare, bool):
        raise UsageError(f"{method}: compare= is True or False (run pandas' own call too and compare), not "
                         f"{compare!r}; a `compare` argument for the function goes with functools.partial")
    return chunks


class FrameAccessor:
    """``df.mp``: ``apply`` on the pool."""

    def __init__(self, obj: pd.DataFrame) -> None:
        self._obj = obj

    def apply(self, func: Callable, axis: Any = 0, raw: bool = False, result_type: Any = None,
              args: tuple = (), *, workers: int | None = None, chunks: int | None = None,
              quiet: bool = False, compare: bool = False, **kwargs: Any) -> Any:
        """``df.apply(func, axis=...)`` on the pool; returns exactly what pandas returns.

        ``axis=1`` (rows) sends contiguous row chunks, ``axis=0`` (columns) groups
        of columns. ``workers`` limits the processes, ``chunks`` sets the number of
        pieces (a whole number of at least 1; None, the default: 4 per worker),
        ``quiet`` hides the timing report (whose wall time is the whole call's),
        ``compare`` also runs pandas' own call here and reports its measured time
        and whether the results are equal. A
        function named by a string (``"sum"``), a NumPy ufunc or a list or dict
        of functions is pandas' vectorized call: it runs here. pandas' own options
        (``by_row``, ``engine``...) are pandas', never ``func``'s; an ``engine``
        runs pandas' call here.
        """
        __tracebackhide__ = True
        started = time.perf_counter()
        chunks = _own_options("df.mp.apply", func, workers, chunks, quiet, compare)
        df = self._obj
        axis = df._get_axis_number(axis)  # pandas' own error for a bad axis ("No axis named 2 ...")
        by_rows = axis == 1
        n = df.shape[0] if by_rows else df.shape[1]
        extra, kwargs, home = _split_options(pd.DataFrame.apply, kwargs, ("axis", "raw", "result_type", "args"),
                                             per_piece=("by_row",))
        why = ("an empty frame" if n == 0 or df.size == 0 else _vectorized_why(func) if _vectorized(func)
               else _options_why(extra, ("by_row",)) if home else _broadcast_why(df, by_rows, result_type))
        if why is not None:
            return _at_home("df.mp.apply", why, compare, quiet, functools.partial(
                df.apply, func, axis=axis, raw=raw, result_type=result_type, args=args, **extra, **kwargs))
        pieces = chunks or _workers(workers) * CHUNKS_PER_WORKER
        spans = _bounds(n, pieces)
        if by_rows:
            items = [df.iloc[a:b] for a, b in spans]
        elif raw and result_type != "broadcast":  # (broadcast hands func the columns, raw or not)
            items = _raw_columns(df, spans)
        else:
            items = [df.iloc[:, a:b] for a, b in spans]
        bound = _bind(func, args, kwargs)
        options = {"axis": axis, "raw": raw, "result_type": result_type, **extra}
        repeated = not (df.index if by_rows else df.columns).is_unique
        task = functools.partial(_record, method="apply", options=options, func=bound, repeated=repeated)
        parts, report = _run("df.mp.apply", task, items, spans, workers, "rows" if by_rows else "columns", chunks)
        result = _assemble_frame(df, _unpack(parts), options, bound)
        serial = functools.partial(df.apply, func, axis=axis, raw=raw, result_type=result_type, args=args,
                                   **extra, **kwargs)
        _report(report, started, result, quiet, serial if compare else None)
        return result


class SeriesAccessor:
    """``series.mp``: ``map`` and ``apply`` on the pool."""

    def __init__(self, obj: pd.Series) -> None:
        self._obj = obj

    def map(self, func: Callable, na_action: str | None = None, *, workers: int | None = None,
            chunks: int | None = None, quiet: bool = False, compare: bool = False, **kwargs: Any) -> pd.Series:
        """``series.map(func)`` on the pool; returns exactly what pandas returns.

        ``workers``, ``chunks``, ``quiet``, ``compare``: as for ``df.mp.apply``.

        A mapping (dict, Series) is not worth sending: pandas' own map runs here,
        as it does with an ``engine`` (pandas' option, never ``func``'s).
        """
        __tracebackhide__ = True
        started = time.perf_counter()
        chunks = _own_options("series.mp.map", func, workers, chunks, quiet, compare)
        s = self._obj
        extra, kwargs, home = _split_options(pd.Series.map, kwargs, ("na_action",))
        why = ("a mapping: pandas looks each value up" if not callable(func) else "an empty Series" if len(s) == 0
               else _distinct_why(s) if _maps_distinct_values(s) else _options_why(extra) if home else None)
        if why is not None:
            return _at_home("series.mp.map", why, compare, quiet,
                            functools.partial(s.map, func, na_action=na_action, **extra, **kwargs))
        serial = (lambda: s.map(func, na_action=na_action, **extra, **kwargs)) if compare else None
        return self._per_value("map", {"na_action": na_action, **extra}, _bind(func, (), kwargs), workers, chunks,
                               quiet, started, serial)

    def apply(self, func: Callable, args: tuple = (), *, workers: int | None = None,
              chunks: int | None = None, quiet: bool = False, compare: bool = False, **kwargs: Any) -> Any:
        """``series.apply(func)`` on the pool; returns exactly what pandas returns.

        A DataFrame when ``func`` returns a Series, as in pandas. A function named
        by a string (``"sum"``), a NumPy ufunc or a list or dict of functions is
        pandas' vectorized call on the whole Series: it runs here, as does
        ``by_row=False`` (pandas calls ``func`` once, on the whole Series).
        """
        __tracebackhide__ = True
        started = time.perf_counter()
        chunks = _own_options("series.mp.apply", func, workers, chunks, quiet, compare)
        s = self._obj
        extra, kwargs, home = _split_options(pd.Series.apply, kwargs, ("args",), per_piece=("convert_dtype",))
        why = (_vectorized_why(func) if _vectorized(func) else "an empty Series" if len(s) == 0
               else _distinct_why(s) if _maps_distinct_values(s)
               else _options_why(extra, ("convert_dtype",)) if home else None)
        if why is not None:
            return _at_home("series.mp.apply", why, compare, quiet,
                            functools.partial(s.apply, func, args, **extra, **kwargs))
        serial = (lambda: s.apply(func, args, **extra, **kwargs)) if compare else None
        return self._per_value("apply", extra, _bind(func, args, kwargs), workers, chunks, quiet, started, serial)

    def _per_value(self, method: str, options: dict, func: Callable, workers: int | None, chunks: int | None,
                   quiet: bool, started: float, serial: Callable[[], Any] | None) -> Any:
        """``series.<method>(func, **options)``: recorded in the workers by chunk, assembled here by pandas."""
        __tracebackhide__ = True
        s = self._obj
        pieces = chunks or _workers(workers) * CHUNKS_PER_WORKER
        spans = _bounds(len(s), pieces)
        items = [s.iloc[a:b] for a, b in spans]
        task = functools.partial(_record, method=method, options=options, func=func, repeated=not s.index.is_unique)
        parts, report = _run(f"series.mp.{method}", task, items, spans, workers, "rows", chunks)
        result = _replay(s, method, options, _unpack(parts), func)
        _report(report, started, result, quiet, serial)
        return result


class GroupByAccessor:
    """``df.groupby(key).mp``: ``apply`` on the pool, groups sent whole."""

    def __init__(self, obj: DataFrameGroupBy | SeriesGroupBy) -> None:
        self._gb = obj

    def _spec(self) -> dict:
        """The keywords that group a batch of rows again in a worker as ``self._gb`` groups the whole.

        Refused, in one line saying which: a key that is not in the batch (values
        of another object, a selected column's frame left behind) and a
        ``pd.Grouper`` with ``freq=`` (bins cut from the whole frame's dates).
        """
        gb = self._gb
        keys, level = _fresh_groupers(gb.keys), gb.level
        binned = _binned(keys)
        if binned is not None:
            raise UsageError(_binned_refusal(binned))
        if keys is not None and isinstance(gb.obj, pd.Series) and not _are_labels(keys, gb.obj):
            if getattr(gb, "_selection", None) is not None:  # df.groupby(key)[column]: the key is the frame's
                raise UsageError(
                    "groupby(...)[column].mp.apply is not supported yet (the workers need the key "
                    "column): use df.groupby(key).mp.apply(f) and take the column inside f"
                )
            name = gb.obj.name if isinstance(gb.obj.name, str) and gb.obj.name != "key" else "value"
            raise UsageError(
                "series.groupby(...).mp.apply groups a Series by its index levels (level= or their names) only; "
                f"got a key of type {type(keys).__name__}, values the workers' batches of rows do not hold: put "
                f"both in one frame and group it by the key's column, pd.DataFrame({{{name!r}: series, 'key': key}})"
                f".groupby('key').mp.apply(lambda g: f(g[{name!r}]))"
            )
        if keys is not None and not _are_labels(keys, gb.obj):
            raise UsageError(
                "groupby(...).mp.apply groups by column names or index level names; "
                f"got a key of type {type(keys).__name__}: add it as a column and group by its name"
            )
        return {"by": keys, "level": level, "sort": gb.sort, "dropna": gb.dropna,
                "observed": gb.observed, "group_keys": gb.group_keys}

    def apply(self, func: Callable, *args: Any, workers: int | None = None, chunks: int | None = None,
              quiet: bool = False, compare: bool = False, **kwargs: Any) -> Any:
        """``groupby(...).apply(func)`` on the pool; returns exactly what pandas returns.

        ``workers``, ``chunks``, ``quiet``, ``compare``: as for ``df.mp.apply``.

        pandas' own options (``include_groups``) are passed to pandas' apply, in
        the workers and here, never to ``func``. A function given by name
        (``"sum"``) is the GroupBy's own method, which pandas' call runs here.
        """
        __tracebackhide__ = True
        started = time.perf_counter()
        chunks = _own_options("groupby(...).mp.apply", func, workers, chunks, quiet, compare)
        gb = self._gb
        if isinstance(func, str) or not callable(func):  # (a name: pandas calls gb.sum(), one vectorized
            # call; anything else not callable: pandas' own error, not one a worker's call of it raises per group)
            why = (_vectorized_why(func) if isinstance(func, str)
                   else f"a {type(func).__name__}, which is no function pandas calls per group")
            return _at_home("groupby(...).mp.apply", why, compare, quiet,
                            functools.partial(gb.apply, func, *args, **kwargs))
        spec = self._spec()
        extra, kwargs, home = _split_options(type(gb).apply, kwargs, per_piece=("include_groups",))
        indices = gb.indices  # group name -> positions in gb.obj
        if not indices or home:
            why = "no groups" if not indices else _options_why(extra, ("include_groups",))
            return _at_home("groupby(...).mp.apply", why, compare, quiet,
                            functools.partial(gb.apply, func, *args, **extra, **kwargs))
        names = list(indices)
        spans = _bounds(len(names), chunks or _workers(workers) * CHUNKS_PER_WORKER)
        task_items = []
        for a, b in spans:
            batch = names[a:b]
            # rows in their original order, as pandas' own groups keep them
            task_items.append((gb.obj.take(np.sort(np.concatenate([indices[name] for name in batch]))), batch))
        # (a SeriesGroupBy's rows are its column already: nothing to select in the batch)
        selection = None if isinstance(gb.obj, pd.Series) else gb._selection
        task = functools.partial(_apply_batch, spec=spec, selection=selection, func=func,
                                 args=args, kwargs=kwargs, options=extra)
        parts, report = _run("groupby(...).mp.apply", task, task_items, spans, workers, "groups", chunks)
        values = {_group_key(name): value for (_, batch), part in zip(task_items, parts, strict=True)
                  for name, value in zip(batch, part, strict=True)}
        # pandas itself assembles the result from the values computed in the workers.
        with _ChargedToCaller():
            result = gb.apply(_lookup, values, func, args, kwargs, **extra)
        _report(report, started, result, quiet, (lambda: gb.apply(func, *args, **extra, **kwargs)) if compare else None)
        return result


def _apply_batch(item: tuple, spec: dict, selection: Any, func: Callable, args: tuple, kwargs: dict,
                 options: dict | None = None) -> list:
    __tracebackhide__ = True
    batch, names = item
    return _apply_groups(batch, names, spec, selection, func, args, kwargs, options or {})


def _lookup(group: Any, values: dict, func: Callable, args: tuple, kwargs: dict) -> Any:
    """The worker's value for this group; a group no worker saw is computed here.

    Those are the empty groups pandas makes for unobserved categories
    (``observed=False`` with several keys): nothing to compute in parallel.
    """
    __tracebackhide__ = True
    try:
        return values[_group_key(group.name)]
    except KeyError:
        return func(group, *args, **kwargs)


def _are_labels(keys: Any, obj: Any) -> bool:
    """Is the groupby key a column label or index level name (or a list of them) of ``obj``?

    Those travel with each batch of rows, so a worker can group its batch
    again; so does a ``pd.Grouper`` of one of them (no ``freq``).
    """
    labels: Sequence = keys if isinstance(keys, list) else [keys]
    columns = obj.columns if isinstance(obj, pd.DataFrame) else ()
    levels = [name for name in obj.index.names if name is not None]
    try:
        return all(_is_label(k, columns, levels) for k in labels)
    except TypeError:
        return False


def _is_label(key: Any, columns: Any, levels: list) -> bool:
    if type(key) is pd.Grouper:  # (a freq= Grouper is a subclass: bins need the whole frame)
        if key.key is not None:
            return _is_label(key.key, columns, levels)
        return key.level is not None and (isinstance(key.level, int) or _is_label(key.level, (), levels))
    return isinstance(key, Hashable) and (key in columns or key in levels)


def _binned(keys: Any) -> Any:
    """The first ``pd.Grouper`` with ``freq=`` among ``keys`` (pandas makes those a ``TimeGrouper``), or None."""
    for key in keys if isinstance(keys, list) else [keys]:
        if isinstance(key, pd.Grouper) and getattr(key, "freq", None) is not None:
            return key
    return None


def _binned_refusal(grouper: Any) -> str:
    """Why a ``pd.Grouper(freq=...)`` is refused, and the column that does the same binning.

    A worker regroups its batch of whole groups; time bins would be cut from
    the batch's own first date (``origin='start_day'``), not the whole frame's,
    so the bins, and the groups, could differ. The column is already there:
    ``freq=`` is what is refused.
    """
    freq = getattr(grouper.freq, "freqstr", grouper.freq)
    if grouper.key is not None:
        where, dates = f"key={grouper.key!r}", f"df[{grouper.key!r}].dt"
    else:
        level = grouper.level if grouper.level is not None else 0
        where, dates = f"level={level!r}", f"df.index.get_level_values({level!r})"
    # (a period of '3D' starts at each date: several days' bins are the dates floored to them)
    several = isinstance(grouper.freq, pd.tseries.offsets.Tick) and grouper.freq.n != 1
    bins = f"{dates}.floor({freq!r})" if several else f"{dates}.to_period({freq!r})"
    return (f"groupby(...).mp.apply does not take a pd.Grouper with freq= ({where}, freq={freq!r}): its time bins "
            "are cut from the whole frame's dates, which a worker's batch of groups does not have; put the bin in "
            f"a column and group by it, df.assign(bin={bins}).groupby('bin').mp.apply(f)"
            f"{'' if several else ' (its labels are periods)'}, or call pandas' own groupby(...).apply(f)")


def _fresh_groupers(keys: Any) -> Any:
    """``keys`` with each ``pd.Grouper`` made anew: pandas caches the frame it grouped in one."""
    def fresh(key: Any) -> Any:
        if type(key) is not pd.Grouper:
            return key
        return pd.Grouper(key=key.key, level=key.level, sort=key.sort, dropna=key.dropna)

    return [fresh(k) for k in keys] if isinstance(keys, list) else fresh(keys)


# --------------------------------------------------------------------------
# Registration


class _Accessor:
    """A class attribute that builds the accessor for the instance it is read from.

    pandas' ``register_*_accessor`` covers DataFrame, Series and Index, not
    GroupBy objects: this one descriptor serves all four, the pandas way
    (no attribute is set on the instance).
    """

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __get__(self, obj: Any, owner: type) -> Any:
        if obj is None:
            return self.cls
        return self.cls(obj)


_TARGETS = ((pd.DataFrame, FrameAccessor), (pd.Series, SeriesAccessor),
            (DataFrameGroupBy, GroupByAccessor), (SeriesGroupBy, GroupByAccessor))


def register() -> None:
    """Add ``.mp`` to DataFrame, Series and their GroupBy objects (once; idempotent)."""
    for target, accessor in _TARGETS:
        current = target.__dict__.get(ACCESSOR)
        if isinstance(current, _Accessor):
            continue
        if current is not None:
            log.warning("%s.%s is already taken by another library: mpmagic's pandas accessor is not added",
                        target.__name__, ACCESSOR)
            continue
        setattr(target, ACCESSOR, _Accessor(accessor))


def unregister() -> None:
    """Remove ``.mp`` again (``%unload_ext mpmagic``)."""
    for target, _ in _TARGETS:
        if isinstance(target.__dict__.get(ACCESSOR), _Accessor):
            delattr(target, ACCESSOR)


# pandas' import at this module's top ran ``import mpmagic``'s wait for pandas
# (pandas_hook) while this module was half made: the wait asked for the accessor here.
if globals().pop("register_when_made", False):
    register()
