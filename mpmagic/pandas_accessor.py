"""``df.mp.apply``, ``series.mp.map``, ``df.groupby(key).mp.apply``: pandas on the pool.

pandas users think in ``apply`` and ``map``, not in ``map(func, items)``. The
accessor cuts the frame into pieces, runs pandas' *own* call on each piece in
the workers (through :func:`mpmagic.pmap`, so payloads, errors, output and the
timing report are the usual ones), and puts the pieces back together so that
the result is what pandas' call on the whole frame returns: same index, same
column order, same dtypes.

* ``df.mp.apply(func, axis=1)`` / ``series.mp.map(func)``: contiguous row
  chunks (a few per worker), ``chunk.apply(func, axis=1)`` / ``chunk.map(func)``
  in the workers, ``pd.concat`` at home. Pieces whose dtypes differ (one chunk
  all ints, another with a None) are re-inferred as pandas would infer the whole.
* ``df.groupby(key).mp.apply(func)``: whole groups are sent in batches; each
  worker groups its batch again with the same keys and options and records
  ``func(group)`` per group name. At home, pandas' own ``apply`` assembles the
  result from those values (a lookup per group), so every subtlety of groupby's
  result shape (group keys in the index, Series results unstacked, categorical
  keys) is pandas' own.
* Empty inputs and categorical Series (pandas maps their few categories, not
  their values) run pandas' call here: nothing to gain from workers.

Registered only when pandas is imported (``mpmagic`` never imports pandas
itself): at ``import mpmagic`` or ``%load_ext mpmagic`` if pandas is already
imported, else after the first notebook cell that imports it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pandas.core.groupby import DataFrameGroupBy, SeriesGroupBy

from .errors import UsageError

log = logging.getLogger("mpmagic")

ACCESSOR = "mp"
#: Row chunks per worker: enough for an uneven tail, few enough that each is worth a message.
CHUNKS_PER_WORKER = 4


# --------------------------------------------------------------------------
# What runs in the workers (module functions: pickled by name, never by value)


def _apply_rows(chunk: pd.DataFrame, func: Callable, axis: Any, raw: bool, result_type: Any,
                args: tuple, kwargs: dict) -> Any:
    return chunk.apply(func, axis=axis, raw=raw, result_type=result_type, args=args, **kwargs)


def _map_values(chunk: pd.Series, func: Callable, na_action: str | None, kwargs: dict) -> pd.Series:
    return chunk.map(func, na_action=na_action, **kwargs)


def _apply_groups(batch: pd.DataFrame | pd.Series, names: list, spec: dict, selection: Any,
                  func: Callable, args: tuple, kwargs: dict) -> list:
    """``func(group)`` for each group of ``batch`` named in ``names``, in that order."""
    wanted = set(names)
    found: dict = {}
    grouped = batch.groupby(**spec)
    if selection is not None:
        grouped = grouped[selection]

    def record(group: Any) -> None:
        if group.name in wanted:  # observed=False may also show empty groups of absent categories
            found[group.name] = func(group, *args, **kwargs)

    grouped.apply(record)
    return [found[name] for name in names]


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


def _run(func: Callable, items: list, workers: int | None, what: str, count: int, quiet: bool,
         fixed: bool = False) -> list:
    """``mpmagic.pmap(func, items)``, one item per message; show its report counting ``what``.

    ``fixed``: the user chose the number of pieces (``chunks=``), else it was automatic.
    """
    from . import api

    results = api.pmap(func, items, workers=workers, chunksize=1)
    report = api.last_report()
    if report is not None:
        report.items = count  # rows or groups, not the pieces they travelled in
        per_piece = f"~{math.ceil(count / max(1, len(items)))} {what}"
        report.chunksize = per_piece if fixed else f"auto: {per_piece}"
        if not quiet:
            _show(report)
    return results


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


def _concat(parts: list, like: pd.DataFrame | pd.Series) -> Any:
    """The pieces' results as one, with dtypes as pandas infers them for the whole."""
    if all(isinstance(p, pd.Series) for p in parts):
        out = pd.concat(parts)
        if len({p.dtype for p in parts}) > 1 and out.dtype == object:
            out = out.infer_objects()
        return out
    if all(isinstance(p, pd.DataFrame) for p in parts):
        out = pd.concat(parts)
        if len({tuple(p.dtypes) for p in parts}) > 1:
            out = out.infer_objects()
        return out
    raise UsageError(  # pragma: no cover - pandas returns a Series or a DataFrame per piece
        f"pieces of {type(like).__name__}.mp came back as {sorted({type(p).__name__ for p in parts})}"
    )


class FrameAccessor:
    """``df.mp``: ``apply`` on the pool."""

    def __init__(self, obj: pd.DataFrame) -> None:
        self._obj = obj

    def apply(self, func: Callable, axis: Any = 0, raw: bool = False, result_type: Any = None,
              args: tuple = (), *, workers: int | None = None, chunks: int | None = None,
              quiet: bool = False, **kwargs: Any) -> Any:
        """``df.apply(func, axis=...)`` on the pool; returns exactly what pandas returns.

        ``axis=1`` (rows) sends contiguous row chunks, ``axis=0`` (columns) groups
        of columns. ``workers`` limits the processes, ``chunks`` sets the number of
        pieces (default: 4 per worker), ``quiet`` hides the timing report.
        """
        df = self._obj
        by_rows = axis in (1, "columns")
        if axis not in (0, 1, "index", "columns"):
            raise UsageError(f"df.mp.apply: axis must be 0, 1, 'index' or 'columns', not {axis!r}")
        n = df.shape[0] if by_rows else df.shape[1]
        if n == 0 or df.size == 0:
            return df.apply(func, axis=axis, raw=raw, result_type=result_type, args=args, **kwargs)
        pieces = chunks or _workers(workers) * CHUNKS_PER_WORKER
        if by_rows:
            items = [df.iloc[a:b] for a, b in _bounds(n, pieces)]
        else:
            items = [df.iloc[:, a:b] for a, b in _bounds(n, pieces)]
        task = functools.partial(_apply_rows, func=func, axis=axis, raw=raw, result_type=result_type,
                                 args=args, kwargs=kwargs)
        parts = _run(task, items, workers, "rows" if by_rows else "columns", n, quiet, chunks is not None)
        if by_rows or all(isinstance(p, pd.Series) for p in parts):
            return _concat(parts, df)
        return pd.concat(parts, axis=1)  # axis=0 with a DataFrame per column group: side by side


class SeriesAccessor:
    """``series.mp``: ``map`` and ``apply`` on the pool."""

    def __init__(self, obj: pd.Series) -> None:
        self._obj = obj

    def map(self, func: Callable, na_action: str | None = None, *, workers: int | None = None,
            chunks: int | None = None, quiet: bool = False, **kwargs: Any) -> pd.Series:
        """``series.map(func)`` on the pool; returns exactly what pandas returns.

        A mapping (dict, Series) is not worth sending: pandas' own map runs here.
        """
        s = self._obj
        if not callable(func) or len(s) == 0 or isinstance(s.dtype, pd.CategoricalDtype):
            return s.map(func, na_action=na_action, **kwargs)
        pieces = chunks or _workers(workers) * CHUNKS_PER_WORKER
        items = [s.iloc[a:b] for a, b in _bounds(len(s), pieces)]
        task = functools.partial(_map_values, func=func, na_action=na_action, kwargs=kwargs)
        return _concat(_run(task, items, workers, "rows", len(s), quiet, chunks is not None), s)

    def apply(self, func: Callable, args: tuple = (), *, workers: int | None = None,
              chunks: int | None = None, quiet: bool = False, **kwargs: Any) -> pd.Series:
        """``series.apply(func)`` for an element-wise function: ``map`` with its arguments."""
        if args or kwargs:
            func = functools.partial(_call_with, func=func, args=args, kwargs=kwargs)
        return self.map(func, workers=workers, chunks=chunks, quiet=quiet)


def _call_with(x: Any, func: Callable, args: tuple, kwargs: dict) -> Any:
    return func(x, *args, **kwargs)


class GroupByAccessor:
    """``df.groupby(key).mp``: ``apply`` on the pool, groups sent whole."""

    def __init__(self, obj: DataFrameGroupBy | SeriesGroupBy) -> None:
        self._gb = obj

    def _spec(self) -> dict:
        gb = self._gb
        keys, level = gb.keys, gb.level
        if keys is not None and isinstance(gb.obj, pd.Series):
            raise UsageError(
                "groupby(...)[column].mp.apply is not supported yet (the workers need the key "
                "column): use df.groupby(key).mp.apply(f) and take the column inside f"
            )
        if keys is not None and not _are_labels(keys, gb.obj):
            raise UsageError(
                "groupby(...).mp.apply groups by column names or index levels; "
                f"got a key of type {type(keys).__name__}: add it as a column and group by its name"
            )
        return {"by": keys, "level": level, "sort": gb.sort, "dropna": gb.dropna,
                "observed": gb.observed, "group_keys": gb.group_keys}

    def apply(self, func: Callable, *args: Any, workers: int | None = None, chunks: int | None = None,
              quiet: bool = False, **kwargs: Any) -> Any:
        """``groupby(...).apply(func)`` on the pool; returns exactly what pandas returns."""
        gb = self._gb
        spec = self._spec()
        indices = gb.indices  # group name -> positions in gb.obj
        if not indices:
            return gb.apply(func, *args, **kwargs)
        names = list(indices)
        pieces = chunks or _workers(workers) * CHUNKS_PER_WORKER
        items = []
        for a, b in _bounds(len(names), pieces):
            batch = names[a:b]
            # rows in their original order, as pandas' own groups keep them
            items.append(gb.obj.take(np.sort(np.concatenate([indices[name] for name in batch]))))
        task_items = [(item, names[a:b]) for item, (a, b) in zip(items, _bounds(len(names), pieces), strict=True)]
        task = functools.partial(_apply_batch, spec=spec, selection=gb._selection, func=func,
                                 args=args, kwargs=kwargs)
        parts = _run(task, task_items, workers, "groups", len(names), quiet, chunks is not None)
        values = {name: value for (_, batch), part in zip(task_items, parts, strict=True)
                  for name, value in zip(batch, part, strict=True)}
        # pandas itself assembles the result from the values computed in the workers.
        return gb.apply(_lookup, values, func, args, kwargs)


def _apply_batch(item: tuple, spec: dict, selection: Any, func: Callable, args: tuple, kwargs: dict) -> list:
    batch, names = item
    return _apply_groups(batch, names, spec, selection, func, args, kwargs)


def _lookup(group: Any, values: dict, func: Callable, args: tuple, kwargs: dict) -> Any:
    """The worker's value for this group; a group no worker saw is computed here.

    Those are the empty groups pandas makes for unobserved categories
    (``observed=False`` with several keys): nothing to compute in parallel.
    """
    try:
        return values[group.name]
    except KeyError:
        return func(group, *args, **kwargs)


def _are_labels(keys: Any, obj: Any) -> bool:
    """Is the groupby key a column label (or a list of them) of ``obj``?"""
    if isinstance(obj, pd.Series):
        return False
    labels: Sequence = keys if isinstance(keys, list) else [keys]
    try:
        return all(isinstance(k, Hashable) and k in obj.columns for k in labels)
    except TypeError:
        return False


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

