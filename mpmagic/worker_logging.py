"""Logging records and warnings from tasks, shown in the cell that ran them.

Both halves live here: what the notebook sends with a call (its logger levels),
what a worker does with a task's records and warnings, and what the notebook
does with them when they come home. It imports no IPython.

Why through the printed-output channel: a worker already streams what a task
writes to ``sys.stderr`` home in whole lines, as they come, in the order they
were written (``worker._StreamToParent``; on Dask ``dask_tasks._TaskOutput``).
A record written there is ordered with the task's prints, labelled like them,
and survives an interrupt or a worker's death up to the last line sent.

* **Logging.** The notebook's effective levels (the root's, and every logger
  whose level it set) go with each call as a few bytes pickled once per call
  (:func:`notebook_context`). The worker sets the same levels on its own
  loggers at each unit where they differ, so a record below the notebook's
  level is never even made there (what a task changes of logging, a level,
  ``disabled``, ``propagate``, handlers, ``logging.disable``, lasts for its
  unit, except what a module's import sets: see "what a task changes of
  logging" below),
  and a handler on its root logger writes each record as one marked line:
  the record's fields and its lines for the cell, ``[item 3] WARNING:root:text``
  (``logging.BASIC_FORMAT`` behind the item label, or the row or group a
  pandas accessor's task names, :func:`naming_items`; a ``%%parallel`` rank's
  lines get ``[rank N]`` from the cell's own output labelling). At home the
  record goes to the notebook's logger of its name (:func:`deliver`: its file
  and other handlers, ``propagate``), and its lines show exactly when serial
  code would have printed it to the cell (``logging.disable()``, handler
  levels, ``logging.lastResort``). A traceback's frame in a notebook cell (``logging.exception``)
  has no source line in the worker: a marked line asks the notebook for it
  (and its ``~~^~~``), in the cell's lines and in the record's ``exc_text``,
  which the notebook's other handlers (a ``FileHandler``) write.
* **Warnings.** Whether a warning shows is the notebook's filters' decision,
  "once per location" by default across every worker and item of a call:
  a worker could only deduplicate its own share. So the worker sends each
  distinct warning (per unit) as one marked line, and the notebook's
  :class:`WarningRelay` matches it against ``warnings.filters``, keeps a
  registry per call, and puts the ones Python would print in the line's
  place, formatted by ``warnings.formatwarning`` (with the source line from
  the notebook's cells). An "error" filter is the exception: it raises in
  the worker, as serial Python would (local workers have the notebook's
  filters, see ``context.py``).
* **Threads a task starts** (a ``ThreadPoolExecutor``, joblib's threads) make
  records and warnings outside the unit's own thread. In a local worker,
  which runs one unit at a time and whose stderr is one stream, they are the
  running unit's: labelled with the item that unit is running when they are
  made (read from its thread's stack), and a warning is sent home like the
  unit's own. Where no unit or several run (a Dask worker, whose output is
  captured per thread) they go where they went before (unlabelled records,
  the worker's own ``showwarning``). A record such a thread makes after its unit
  ended, while no unit runs, is written on the worker's stream between units as the
  unit's records looked (:func:`adopt_threads`, ``_TaskHandler._as_its_unit``).

What a unit carries: the ``log_context`` field of its ``Map`` or ``Cell``
message (``protocol.py``), ``(first item index or None, levels bytes)``;
``worker.execute_map``/``execute_cell`` (local workers and Dask tasks alike)
wrap the running of the items or the cell in :func:`begin`/:func:`end`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import io
import itertools
import json
import linecache
import logging
import os
import pickle
import re
import sys
import threading
import traceback
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from typing import Any

from . import compat, context
from .errors import cell_file

_log = logging.getLogger("mpmagic")

# A warning travels as one line starting with this marker (ASCII "record
# separator": never in ordinary printed text) followed by JSON.
MARK = "\x1empmagic-warning "


# --------------------------------------------------------------------------
# Notebook side: what goes with a call


def notebook_levels() -> dict[str, int]:
    """The notebook's logger levels: the root's effective level, and every
    logger whose own level was set (the rest inherit, as in the notebook)."""
    levels = {"": logging.getLogger().getEffectiveLevel()}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def notebook_context() -> bytes:
    """The bytes a job sends with each unit: the notebook's logger levels, and
    the notebook's warning filters when one of them says "always".

    Pickled only when they changed (the same bytes otherwise) and compared by
    value in the worker, which re-applies them when they change (or a task changed one). A
    worker sends a warning repeated at one place once per unit, unless the
    notebook shows every repeat of *that* warning (its first matching filter
    says "always": ``simplefilter("always")``, ``catch_warnings(record=True)``
    after it): then each, as serial code raises each (20 items warning alike
    showed 2 and recorded 4-6 of the 20). Per warning, not per notebook:
    numpy's own ``always`` filter for ``RankWarning`` sent every repeat of
    every other warning too (a pandas deprecation warning raised by each of
    300,000 items made ``.mp.map`` 4x slower than serial). The filters are
    those ``context.py`` sends the workers, so that a worker can tell its
    filters are the notebook's (see :func:`_unit_filters`).
    """
    global _last_context
    levels, filters = notebook_levels(), tuple(warnings.filters)
    last_levels, last_filters, data = _last_context
    if levels == last_levels and filters == last_filters:  # (the same filter tuples: compared by identity)
        return data
    data = pickle.dumps((levels, _always_specs([f for f in filters if context.travels(f)])), pickle.HIGHEST_PROTOCOL)
    _last_context = (levels, filters, data)
    return data


_last_context: tuple = (None, None, b"")  # (levels, filters, their bytes): notebook_context's last answer


def _always_specs(filters: Any) -> tuple:
    """``filters`` up to the last "always" one (later ones cannot make a warning
    repeat), each as ``(is always, message, category module, category name,
    module, lineno)``: categories by name, as a cell's own Warning subclass
    cannot be pickled. Empty when no filter says "always"."""
    if "always" not in map(itemgetter(0), filters):  # (in C: no frame per filter)
        return ()
    last = max(i for i, f in enumerate(filters) if f[0] == "always")
    return tuple((action == "always", msg, cat.__module__, cat.__qualname__, mod, ln)
                 for action, msg, cat, mod, ln in filters[: last + 1])


def _loaded_here(specs: tuple) -> tuple:
    """``specs`` without the filters for categories of packages this process has
    not imported (up to the last "always" one left): no warning here can be of
    such a category, and a worker loads those filters only once a task imports
    the package (``context._loadable_now``), so they are not a difference."""
    if not specs:  # (none: no "always" filter)
        return ()
    kept = [s for s in specs if s[2].split(".")[0] in sys.modules]
    while kept and not kept[-1][0]:
        kept.pop()
    return tuple(kept)


# --------------------------------------------------------------------------
# Worker side: capture while a unit runs


class _Unit(threading.local):
    """What the running unit's records are labelled with (per thread: a Dask
    worker runs several tasks at once)."""

    active = False
    start: int | None = None  # a map chunk's first item index; None for a cell rank
    seen: dict | None = None  # warnings already sent for this unit: are their repeats sent too?
    frame: types.FrameType | None = None  # the frame that began the unit (see _importing)


_unit = _Unit()
# Units running in this process now (several threads on Dask). While there is
# one, records from threads a task started itself (which _unit cannot see)
# still go home (labelled by _owner where it can tell the unit); and the
# warning filters are ours (see begin).
_running = 0
# The units running now, by the thread running each: (first item index or None,
# its ``seen``). Guarded by _lock; read by the threads a task started (_owner).
_units: dict[int, tuple[int | None, dict]] = {}
# Does what a task's own threads write to sys.stderr reach the task's cell? In a
# local worker, yes (one stream); a Dask worker captures per thread, and
# dask_tasks sets this False.
THREADS_HOME = True
_saved_filters: list | None = None  # the worker's own filters, put back by the last end()
_applied: bytes | None = None  # the levels last applied in this process
# Those levels: by logger name ("" the root), and as (logger, level) pairs to
# check at each unit whether a task changed one (see _levels_intact).
_levels: dict[str, int] = {}
_level_pairs: tuple[tuple[logging.Logger, int], ...] = ()
_set_here: set[str] = set()  # loggers whose level this process set
_installed = False
_lock = threading.Lock()
# On a Dask worker these loggers are the worker's own business.
_OWN_LOGGERS = ("distributed", "dask", "tornado", "asyncio", "bokeh")
# The code of the functions that run a chunk's items (worker.run_items and
# run_items_timed register theirs: this module must not import worker.py).
ITEM_LOOPS: set[types.CodeType] = set()


def _running_item(frame: types.FrameType | None) -> int | None:
    """The index in its chunk of the item running now, from the stack of the
    unit's thread that ``frame`` is the top of.

    Read from the stack only when a record is made, so running items pays
    nothing: the chunk loops (``worker.run_items``) keep a ``results`` list
    whose length is the index of the running item.
    """
    while frame is not None:
        if frame.f_code in ITEM_LOOPS:
            results = frame.f_locals.get("results")
            return len(results) if results is not None else None
        frame = frame.f_back
    return None


# What a task names the thing it is working on now, by the thread running its unit:
# the pandas accessor's items are pieces of a frame the user never numbered, so its
# records say ``[row 'r57']`` or ``[group 5]``, not ``[item 4]`` (see :func:`naming_items`).
_namers: dict[int, Callable[[], str]] = {}


@contextlib.contextmanager
def naming_items(namer: Callable[[], str]) -> Iterator[None]:
    """While the block runs, this thread's records and warnings (and those of the
    threads its task starts) are labelled ``[namer()]`` instead of ``[item N]``.

    ``namer`` is called only when a record or warning is made (nothing per row);
    it returns "" when it names nothing (pandas' own call warned between rows):
    the line is then unlabelled. A cell rank's lines stay unlabelled here (the
    cell's output labelling names the rank).
    """
    ident = threading.get_ident()
    outer = _namers.get(ident)
    _namers[ident] = namer
    try:
        yield
    finally:
        if outer is None:
            _namers.pop(ident, None)
        else:
            _namers[ident] = outer


def _named(namer: Callable[[], str]) -> str:
    try:
        name = namer()
    except Exception:  # (a label only: never a task's error)
        return ""
    return f"[{name}] " if name else ""


def label() -> str:
    """``[item N] `` for a map item, empty for a cell rank (labelled at home)."""
    if _unit.start is None:
        return ""
    namer = _namers.get(threading.get_ident())
    if namer is not None:
        return _named(namer)
    i = _running_item(sys._getframe(1))
    return f"[item {_unit.start + i}] " if i is not None else ""


def _owner() -> tuple[str, dict] | None:
    """For a thread that runs no unit itself (one a task started): the label of
    the item the process's one running unit is running now, and that unit's
    ``seen``; None where no unit or several run, or their threads' output
    does not go home (Dask)."""
    if not THREADS_HOME or len(_units) != 1:
        return None
    try:
        ((ident, (start, seen)),) = list(_units.items())  # (one C call: no other thread runs meanwhile)
    except ValueError:  # (it ended, or another began, meanwhile)
        return None
    if start is None:
        return "", seen
    namer = _namers.get(ident)
    if namer is not None:
        return _named(namer), seen
    i = _running_item(sys._current_frames().get(ident))
    return (f"[item {start + i}] " if i is not None else ""), seen


# A traceback's frame line, as ``traceback`` formats it.
_FRAME_LINE = re.compile(r'  File "(.+)", line (\d+), in ')


def _lines(text: str, prefix: str, traceback: bool, positions: dict | None = None) -> str:
    """A record's formatted text as labelled lines. After a traceback's frame
    whose source this worker lacks (a notebook cell's), a marked line asks
    the notebook for the source line serial Python prints there (and, with its
    position in ``positions``, see :func:`_positions`, the ``^`` line under it)."""
    out = []
    for line in text.splitlines():
        out.append(f"{prefix}{line}\n")
        if traceback and (m := _FRAME_LINE.match(line)) and not linecache.getline(m[1], int(m[2])):
            fields: list = [prefix, m[1], int(m[2])]
            where = (positions or {}).get((m[1], int(m[2])))
            if where is not None:
                fields.append(where)
            out.append(MARK + json.dumps(fields) + "\n")
    return "".join(out)


def _positions(exc: BaseException | None) -> dict[tuple[str, int], list]:
    """Where in its line each frame of ``exc``'s traceback stopped (its causes',
    contexts' and an exception group's members' too), by (file, line): [end line,
    start column, end column], from which ``traceback`` draws the ``~~^~~`` under
    a frame's source line (Python 3.11 and later; empty before). The notebook,
    which has a cell's source, draws it (see ``WarningRelay._one``)."""
    out: dict[tuple[str, int], list] = {}
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo and len(seen) < 64:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if hasattr(code, "co_positions") and tb.tb_lasti >= 0:
                where = next(itertools.islice(code.co_positions(), tb.tb_lasti // 2, None), None)
                if where is not None and None not in where:
                    out.setdefault((code.co_filename, tb.tb_lineno), list(where[1:]))
            tb = tb.tb_next
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return out


class SetupStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` while a setup runs: what the setup prints is
    kept for its ``SetupDone`` (shown by ``%%pool setup``, labelled by worker);
    once it has run (:meth:`release`), each write goes to this process's
    ``sys.stdout``/``sys.stderr`` of the moment: a task's, sent home with its
    output, while a unit runs.

    Why: a ``logging.StreamHandler()`` made by the setup (``logging.basicConfig``,
    a library it imports that sets up its own logger) keeps the stream it was
    given. Given a plain buffer, its records were never shown (serially they
    are) and piled up there for the worker's life (20,000 records of 1 KB:
    20 MB more). Now it writes where a handler made in a task would. A
    record such a handler prints is not written again for the notebook's
    console handlers (see :func:`_printed_by_setup`).
    """

    def __init__(self, name: str, held: list[str], copy: Callable[[str, str], bool] | None = None) -> None:
        self._name = name  # "stdout" or "stderr"
        self._held: list[str] | None = held  # shared by both streams (kept in the order written)
        # A copy of each write the notebook reads if the worker dies before its SetupDone (a local
        # worker's tail, ``worker._Tail.add``: False once it is full): what the setup printed before an
        # exit or a kill went with the worker. Only this process's writes (not a child it forks).
        self._copy = copy
        self._pid = os.getpid()

    def release(self) -> None:
        """The setup has run: later writes go to the process's stream."""
        self._held = None
        self._copy = None

    def _target(self) -> Any:
        target = getattr(sys, self._name)
        return target if target is not self else getattr(sys, f"__{self._name}__")

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        """The worker's own fd 1 or 2, as the task's stream says (``worker._StreamToParent``)."""
        return 1 if self._name == "stdout" else 2

    def write(self, s: str) -> int:
        held = self._held
        if held is not None:
            held.append(s)
            copy = self._copy
            if copy is not None and (os.getpid() != self._pid or not copy(self._name, s)):
                self._copy = None  # (full, or a forked child's write: no more copies)
            return len(s)
        return self._target().write(s)

    def flush(self) -> None:
        if self._held is None:
            self._target().flush()



def _printed_by_setup(record: logging.LogRecord) -> bool:
    """Does a console handler that ``%%pool setup`` made (one writing to a
    :class:`SetupStream`) print ``record`` in this worker, as ``Logger.callHandlers``
    would go? Then the task's output shows it, and the notebook does not write
    its line again for its own console handlers: ``logging.basicConfig`` in a
    setup beside the notebook's printed each record twice (serially the setup's
    ``basicConfig`` finds the root's handler and does nothing)."""
    logger: Any = logging.Logger.manager.loggerDict.get(record.name)
    if not isinstance(logger, logging.Logger):  # ("root", or a record made by hand)
        logger = logging.getLogger()
    while logger is not None:
        for handler in logger.handlers:
            if (isinstance(handler, logging.StreamHandler) and isinstance(handler.stream, SetupStream)
                    and record.levelno >= handler.level and handler.filter(record)):
                return True
        logger = logger.parent if logger.propagate else None
    return False


class _TaskHandler(logging.Handler):
    """Writes a task's records to its captured stderr, one labelled line each."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(logging.BASIC_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if not (_unit.active or _running):
            left = _late_threads.get(record.thread) if record.thread is not None else None
            if left is not None:  # a thread an ended unit started: as that unit's records looked
                self._as_its_unit(record, left)
                return
            # Not during a task (the worker's own threads): as without this handler.
            last = logging.lastResort
            if last is not None and record.levelno >= last.level and not _handled_elsewhere(record.name):
                last.handle(record)
            return
        try:
            text = self.format(record)
            if _unit.active:
                prefix = label()
            else:  # a thread the task started: labelled as the item running now
                owner = _owner()
                prefix = owner[0] if owner is not None else ""
            positions = _positions(record.exc_info[1]) if record.exc_info and record.exc_text else None
            shown = _lines(text, prefix, bool(record.exc_text or record.stack_info), positions)
            # One marked line: the record itself, for the notebook's handlers of its logger,
            # and its labelled lines, for the cell (see WarningRelay._record). Its
            # traceback and stack ask for their cell frames' source lines as the cell's
            # lines do: a notebook FileHandler wrote them without (serially, with).
            sent = _record_fields(record)
            for attr in ("exc_text", "stack_info"):
                if sent[attr]:
                    sent[attr] = _lines(sent[attr], "", True, positions).rstrip("\n")
            fields: dict[str, Any] = {"record": sent, "shown": shown}
            if record.levelno < sent_level(record.name):
                fields["lowered"] = True  # made only because the task lowered a level (see deliver)
            if _printed_by_setup(record):
                fields["printed"] = True  # the setup's console handler showed it (see WarningRelay._record)
            sys.stderr.write(MARK + json.dumps(fields) + "\n")
        except Exception:
            self.handleError(record)


    def _as_its_unit(self, record: logging.LogRecord, left: list[logging.Handler]) -> None:
        """A record a unit's thread made after the unit ended (no unit runs): no run takes
        it home any more, so it is written here, on the worker's stream between units
        (which labels a rank's thread's lines ``[rank N]``: ``worker._AfterUnits``), in the
        format the unit's own records had: through the console handlers the unit left on
        the root logger (``left``: its ``logging.basicConfig(format=..., force=True)``,
        undone for later units by :func:`_restore`), else ours (``logging.BASIC_FORMAT``,
        as the notebook showed them). It went to ``logging.lastResort`` instead, the
        message alone: ``late`` for ``WARNING:calc:late``."""
        try:
            if left:
                for handler in left:
                    if record.levelno >= handler.level:
                        handler.handle(record)
                return
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


# The threads that units started and that outlived them (``worker._Worker`` says which,
# :func:`adopt_threads`) -> the root logger's handlers the unit left, other than ours
# (``[]``: none of its own). Their records made while no unit runs look like the unit's.
_late_threads: dict[int, list[logging.Handler]] = {}
# The root's handlers the last unit to end left, taken by end() before _restore: None when
# no unit changed the root's handlers.
_left_handlers: list[logging.Handler] | None = None


def adopt_threads(idents: Iterable[int], alive: set[int | None]) -> None:
    """Threads the unit that just ended started (``idents``) are its: their later records
    look like its own (see ``_TaskHandler._as_its_unit``). Threads no longer ``alive`` are
    forgotten (an ident may come again)."""
    for ident in [i for i in _late_threads if i not in alive]:
        del _late_threads[ident]
    for ident in idents:
        _late_threads[ident] = list(_left_handlers or ())


def _handled_elsewhere(name: str) -> bool:
    """Does a handler other than ours see a record of the logger ``name``? Then
    ``Logger.callHandlers`` leaves it to that handler, and ``logging.lastResort``
    stays silent: our handler, which stays on a local worker's root logger between
    units, printed such a record a second time where the root had a handler of
    the worker's own (``logging.basicConfig`` in ``%%pool setup``): a record made
    outside a unit (by a thread the setup started, say). Rare: a few reads."""
    logger: Any = logging.Logger.manager.loggerDict.get(name)
    if not isinstance(logger, logging.Logger):  # ("root", or a record made by hand)
        logger = logging.getLogger()
    while logger is not None:
        if any(not isinstance(h, _TaskHandler) for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


# The LogRecord attributes a record takes home (its message already formatted: its args may not travel).
_RECORD_ATTRS = ("name", "levelno", "levelname", "pathname", "filename", "module", "lineno", "funcName",
                 "created", "msecs", "relativeCreated", "thread", "threadName", "processName", "process",
                 "exc_text", "stack_info", "taskName")


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What the notebook rebuilds ``record`` from (``logging.makeLogRecord``): plain values only."""
    fields = {attr: getattr(record, attr, None) for attr in _RECORD_ATTRS}
    fields["msg"], fields["args"] = record.getMessage(), None
    return fields


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` in a worker: send each distinct warning home once
    per unit, and every repeat of one the notebook shows each time ("always").
    A warning from a thread the task started counts as the running unit's."""
    if _unit.active:
        where, seen = label(), (_unit.seen if _unit.seen is not None else {})
    elif (owner := _owner()) is not None:
        where, seen = owner
    else:
        return _original_showwarning(message, category, filename, lineno, file, line)
    text = str(message)
    key = (text, category, filename, lineno)
    if seen.get(key, True) is False:
        return None  # sent already, and its repeats are not shown
    module = _module_of(filename, lineno)
    if key not in seen:
        seen[key] = _repeats(text, category, module, lineno)
    fields = [where, text, getattr(category, "__module__", "builtins"), category.__qualname__, filename, lineno, module]
    sys.stderr.write(MARK + json.dumps(fields) + "\n")
    return None


def _repeats(text: str, category: type, module: str, lineno: int) -> bool:
    """Does the notebook show every repeat of this warning: is the first of its
    filters that matches (as ``warn_explicit`` matches) an "always" one?"""
    if not _always:
        return False
    names = {(getattr(c, "__module__", ""), c.__qualname__) for c in category.__mro__}
    for always, msg, cat_module, cat_name, mod, ln in _always:
        if ((cat_module, cat_name) in names and _matches(msg, text) and _matches(mod, module)
                and (ln == 0 or lineno == ln)):
            return always
    return False


def _module_of(filename: str, lineno: int) -> str:
    """The module name a ``module`` filter is matched against, as ``warnings.warn``
    takes it: the ``__name__`` of the frame the warning is charged to
    (``numpy._core.fromnumeric``; ``__main__`` for a notebook function), found on
    the stack, which is still the warning's. A warning made otherwise
    (``warn_explicit``) gets what ``warn_explicit`` derives from the file name."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_lineno == lineno and frame.f_code.co_filename == filename:
            name = frame.f_globals.get("__name__")
            if isinstance(name, str):
                return name
            break
        frame = frame.f_back
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return name[:-3] if name.endswith(".py") else name or "<unknown>"


_original_showwarning = warnings.showwarning

# The handlers drop_inherited_handlers took off, held for the worker's life: see there.
_dropped: list[logging.Handler] = []


def drop_inherited_handlers() -> None:
    """In a local worker as it starts: take off every logger the handlers it
    found there (a forked worker's copies of the notebook's, a ``FileHandler``,
    ``basicConfig``'s console handler), without closing them (the notebook's
    file stays the notebook's). The notebook hands each task record to its own
    handlers (:func:`deliver`): a copy here wrote every record a second time.
    ``NullHandler`` s stay (they write nothing, and tell ``logging.lastResort``
    a library has its logging in hand). Handlers ``%%pool setup`` or a task
    adds later are kept. The ones taken off are held in :data:`_dropped`: let
    go, a stream only its handler referred to was finalized here, which wrote
    what the notebook had not flushed yet to its file a second time and, with
    warnings shown (``-X dev``), printed
    ``ResourceWarning: unclosed file`` from this module for each fork worker
    (Python 3.13's Jupyter kernel: ipykernel's own handler)."""
    global _installed, _hooks_in
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        if isinstance(logger, logging.Logger) and logger.handlers:
            _dropped.extend(h for h in logger.handlers if not isinstance(h, logging.NullHandler))
            logger.handlers = [h for h in logger.handlers if isinstance(h, logging.NullHandler)]
    _installed = _hooks_in = False  # (our own handler too, if the parent had one: the first unit installs it)


# Are our hooks (_hook_in) in place only while units run? In a local worker, no:
# the process is mpmagic's and ends with the pool, so they go in once (putting them
# in and out made a unit's begin+end ~4 us dearer, 1.6 -> 5.5 us, of a unit's ~40:
# setting and deleting Logger.__setattr__ updates a slot and drops type caches). A Dask worker
# may be the user's own long-lived process, serving others after mpmagic's calls
# (a cluster mpmagic connected to): dask_tasks sets this, the first unit to start
# puts them in and the last to end takes them out, so no patched class, handler
# or warnings hook of ours outlives mpmagic's units there (~4 us, of a task's >= 1 ms;
# kept on the root logger, our handler made a later ``logging.basicConfig()`` there do nothing).
HOOKS_PER_UNIT = False
_hooks_in = False  # are they in now?
_handler: logging.Handler | None = None  # ours on the root logger, made once


def _install() -> None:
    """Ready to capture: in a local worker, our hooks go in for good here; on Dask,
    each time units start running (:func:`begin`)."""
    global _installed
    with _lock:
        if _installed:
            return
        if not HOOKS_PER_UNIT:
            _hook_in()
        _installed = True


def _hook_in() -> None:
    """Our handler on the root logger, our ``warnings.showwarning``, the watch on
    logging's classes (:func:`_watch_loggers`). Under ``_lock``; each step is
    idempotent (``_installed`` set False again puts back what is missing)."""
    global _handler, _original_showwarning, _hooks_in
    if _handler is None:
        _handler = _TaskHandler()
    _syncing.active = True  # (a unit may run already: our handler is not a task's change)
    try:
        logging.getLogger().addHandler(_handler)
    finally:
        _syncing.active = False
    if warnings.showwarning is not _show_warning:
        _original_showwarning = warnings.showwarning  # (where a warning outside a unit goes)
        warnings.showwarning = _show_warning
    _watch_loggers()
    _hooks_in = True


def _hook_out() -> None:
    """The last unit on a Dask worker ended: its logging and warnings as they were
    before :func:`_hook_in`. Under ``_lock``."""
    global _hooks_in
    if not _hooks_in:
        return
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
    if warnings.showwarning is _show_warning:
        warnings.showwarning = _original_showwarning
    _unwatch_loggers()
    _hooks_in = False


# --------------------------------------------------------------------------
# Worker side: what a task changes of logging lasts for its unit
#
# Serially a task's ``logging.getLogger("x").setLevel(ERROR)``, ``.disabled =
# True``, ``addHandler(NullHandler()); propagate = False`` or ``logging.disable(...)``
# would change the notebook's logging; kept in the worker, it would change every
# later call's records there only, so they would show or not by which worker
# ran the item. Each unit starts from the notebook's logging instead: a
# logger's state is saved the first time it changes while a unit runs (copy on
# write, so a unit that changes nothing pays nothing), and the last unit to end
# puts back every saved logger and ``logging.disable``'s level. What the worker
# itself sets outside a unit (``%%pool setup``, a module the warm-up imports)
# stays, as the worker's own; so does what a module sets while it is imported,
# wherever the import runs (a task's ``import transformers`` gives its logger a
# handler, a level and ``propagate = False``): the module stays imported and
# never sets them again, so undoing them lost its records in that worker for
# good (7 of 8 INFO lines of two calls, one item a chunk), where serially they
# stay. The notebook's ``disabled`` flags, ``propagate``,
# handlers and ``logging.disable`` are applied at home to each record
# (:func:`deliver`); its levels here too (:func:`_apply_levels`), so a record
# below them is never made.

# A logger's attributes whose change a unit undoes (``addHandler``/``removeHandler``
# change ``handlers`` in place: they are watched too).
_WATCHED = frozenset(("level", "disabled", "propagate", "handlers"))
# Each logger a task changed while units ran: its (level, disabled, propagate,
# handlers) before the first change. Put back, and emptied, by the last end().
_changed: dict[logging.Logger, tuple[int, bool, bool, list]] = {}
# logging.disable's level before a unit first changed it; None: no unit did.
_disable_before: int | None = None
_watching = False


class _Syncing(threading.local):
    """Set while this module itself sets loggers (the notebook's levels, a
    restore): those changes are not a task's."""

    active = False


_syncing = _Syncing()


def _state(logger: logging.Logger) -> tuple[int, bool, bool, list]:
    """What :func:`_restore` puts back; read from ``__dict__``: a logger being
    made (``Logger.__init__``, in a unit) has none of it yet, and is then the
    new logger's defaults."""
    attrs = logger.__dict__
    return (attrs.get("level", logging.NOTSET), attrs.get("disabled", False),
            attrs.get("propagate", True), list(attrs.get("handlers", ())))


def _note(logger: logging.Logger) -> bool:
    """``logger`` changes now: keep its state first, if a unit runs and it is
    its first change since the units began. True when the change is a module's
    import's (see :func:`_importing`): the caller then passes it on to the state
    kept (:func:`_keep_imported`), so the units' end does not undo it."""
    if not _running or _syncing.active:
        return False
    if _importing():
        return logger in _changed
    if logger not in _changed:
        _changed.setdefault(logger, _state(logger))
    return False


def _keep_imported(logger: logging.Logger, before: tuple[int, bool, bool, list]) -> None:
    """A module's import (in a unit) changed ``logger`` from the state ``before``,
    and a task of the running units had changed it earlier: what the import set
    is what the units' end puts back (the rest of the task's change is undone).
    ``handlers`` compared by identity."""
    saved = _changed.get(logger)
    if saved is None:
        return
    level, disabled, propagate, handlers = _state(logger)
    old_level, old_disabled, old_propagate, old_handlers = before
    kept = list(saved[3])
    for h in old_handlers:  # (removed by the import)
        if not any(h is x for x in handlers):
            kept = [x for x in kept if x is not h]
    for h in handlers:  # (added by the import)
        if not any(h is x for x in old_handlers) and not any(h is x for x in kept):
            kept.append(h)
    _changed[logger] = (level if level != old_level else saved[0],
                        disabled if disabled != old_disabled else saved[1],
                        propagate if propagate != old_propagate else saved[2], kept)


# Code run by an import (``importlib._bootstrap``'s file: ``import x``,
# ``importlib.import_module``, ``importlib.reload``), found by a public class of it.
_IMPORT_FILE = importlib.machinery.ModuleSpec.__init__.__code__.co_filename


def _importing() -> bool:
    """Is a module being imported in this thread, under the running unit? The
    frames from here up to the unit's own (the worker's, which starts the unit:
    a fork worker's stack may hold its notebook's import that started the pool)
    are looked at: a change made under the import machinery's frames is the
    module's. A few microseconds, paid only when a logger changes in a unit."""
    stop = _unit.frame
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None and frame is not stop:
        if frame.f_code.co_filename == _IMPORT_FILE:
            return True
        frame = frame.f_back
    return False


# What the watch wraps, read as it goes in (someone else's patch meanwhile is wrapped, not lost):
_own_setattr: Any = None  # Logger's own __setattr__ (None: it inherits object's), put back as it was
_setattr = logging.Logger.__setattr__  # (object's)
_add_handler = logging.Logger.addHandler
_remove_handler = logging.Logger.removeHandler
_disable_property = logging.Manager.__dict__.get("disable")  # (a property since Python 3.7: logging.disable sets it)
_watched_property: Any = None  # our Manager.disable, made once per property it wraps


def _watched(change: Any, logger: logging.Logger, *args: Any) -> None:
    """Make ``change`` to ``logger`` while a unit runs: noted first, or, if a
    module's import makes it, kept (see :func:`_note`)."""
    if not _note(logger):
        change(logger, *args)
        return
    before = _state(logger)
    try:
        change(logger, *args)
    finally:
        _keep_imported(logger, before)


def _watched_setattr(self: logging.Logger, name: str, value: Any) -> None:
    if _running and name in _WATCHED:  # (a Logger's construction: ~1 us more, once per logger)
        _watched(_setattr, self, name, value)
    else:
        _setattr(self, name, value)


def _watched_add_handler(self: logging.Logger, hdlr: logging.Handler) -> None:
    if _running:
        _watched(_add_handler, self, hdlr)
    else:
        _add_handler(self, hdlr)


def _watched_remove_handler(self: logging.Logger, hdlr: logging.Handler) -> None:
    if _running:
        _watched(_remove_handler, self, hdlr)
    else:
        _remove_handler(self, hdlr)


def _watched_disable(self: logging.Manager, level: int) -> None:
    global _disable_before
    if _running and not _syncing.active:
        if _importing():  # (a module's import: its level stays, see _note)
            if _disable_before is not None:
                _disable_before = level
        elif _disable_before is None:
            _disable_before = self.disable
    _disable_property.fset(self, level)  # type: ignore[union-attr]  # (a property: see _watch_loggers)


functools.update_wrapper(_watched_add_handler, _add_handler)
functools.update_wrapper(_watched_remove_handler, _remove_handler)


def _watch_loggers() -> None:
    """See a logger's change as it is made: in a local worker for good, on Dask while
    units run (see ``HOOKS_PER_UNIT``). Setting an attribute and adding a handler
    are rare (a log call sets none), so this costs nothing on logging's hot path,
    and a unit need not compare every logger (~0.15 us each, hundreds on a Dask
    worker) to find what a task changed. ``logger.handlers.append(...)`` in place
    is not seen (``addHandler`` is)."""
    global _watching, _own_setattr, _setattr, _add_handler, _remove_handler, _disable_property, _watched_property
    if _watching:
        return
    logger_attrs, manager_attrs = logging.Logger.__dict__, logging.Manager.__dict__
    if logger_attrs.get("__setattr__") is _watched_setattr:  # (in already: never wrap our own wrapper)
        _watching = True
        return
    _own_setattr = logger_attrs.get("__setattr__")
    _setattr = logging.Logger.__setattr__
    _add_handler, _remove_handler = logger_attrs["addHandler"], logger_attrs["removeHandler"]
    logging.Logger.__setattr__ = _watched_setattr  # type: ignore[method-assign,assignment]
    logging.Logger.addHandler = _watched_add_handler  # type: ignore[method-assign]
    logging.Logger.removeHandler = _watched_remove_handler  # type: ignore[method-assign]
    disable = manager_attrs.get("disable")
    if isinstance(disable, property) and disable.fset is not None:
        if disable is not _disable_property or _watched_property is None:
            _disable_property, _watched_property = disable, property(disable.fget, _watched_disable)
        logging.Manager.disable = _watched_property
    _watching = True


def _unwatch_loggers() -> None:
    """The last unit on a Dask worker ended: ``Logger`` and ``Manager`` as they were
    before :func:`_watch_loggers`. What someone replaced ours with meanwhile stays
    theirs (it calls ours, which passes a change through while no unit runs)."""
    global _watching
    if not _watching:
        return
    logger_attrs = logging.Logger.__dict__
    if logger_attrs.get("__setattr__") is _watched_setattr:
        if _own_setattr is None:
            del logging.Logger.__setattr__
        else:
            logging.Logger.__setattr__ = _own_setattr  # type: ignore[method-assign]
    if logger_attrs.get("addHandler") is _watched_add_handler:
        logging.Logger.addHandler = _add_handler  # type: ignore[method-assign]
    if logger_attrs.get("removeHandler") is _watched_remove_handler:
        logging.Logger.removeHandler = _remove_handler  # type: ignore[method-assign]
    if _watched_property is not None and logging.Manager.__dict__.get("disable") is _watched_property:
        logging.Manager.disable = _disable_property  # type: ignore[assignment]
    _watching = False


def _restore() -> None:
    """The last unit ended: put back each logger a task changed, and
    ``logging.disable``'s level (Dask's own loggers are the worker's)."""
    global _disable_before
    _syncing.active = True
    try:
        for logger, (level, disabled, propagate, handlers) in list(_changed.items()):
            if logger.name.startswith(_OWN_LOGGERS):
                continue
            if logger.level != level:
                logger.setLevel(level)  # (clears the loggers' caches)
            logger.disabled, logger.propagate = disabled, propagate
            if logger.handlers != handlers:
                logger.handlers = handlers
        _changed.clear()
        if _disable_before is not None:
            logging.disable(_disable_before)
            _disable_before = None
    finally:
        _syncing.active = False


# The notebook's filters up to its last "always" one, categories by name (see
# notebook_context): a warning they say "always" for is sent at each repeat.
_always: tuple = ()


# The levels the worker's setup (``%%pool setup``, ``on_worker_start``) set, by
# logger name ("" the root): (the level before it, the setup's). They win over the
# notebook's in tasks, as the setup's environment and directory do
# (``context.keep_setup_changes``): a setup's ``logging.basicConfig(level=INFO)``
# was undone at its first unit by the notebook's root level (its INFO records were
# never made), while a level it set on a logger the notebook left alone stayed.
setup_levels: dict[str, tuple[int, int]] = {}


def _own_levels() -> dict[str, int]:
    """Each logger's own level in this process, by name ("" the root)."""
    levels = {"": logging.getLogger().level}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            levels[name] = logger.level
    return levels


def keep_setup_levels(run: Any) -> Any:
    """Run ``run()`` (a worker setup, or its clearing) and keep the logger levels
    it set as the worker's (:data:`setup_levels`); the last setup's levels are put
    back first, so that a new setup (or a clear) replaces them, and the next
    unit applies the notebook's levels again around the new ones."""
    global _applied
    with _lock:
        _syncing.active = True
        try:
            for name, (was, _) in setup_levels.items():
                logging.getLogger(name or None).setLevel(was)
        finally:
            _syncing.active = False
        setup_levels.clear()
        _applied = None
    before = _own_levels()
    root = logging.getLogger()
    ours = _handler if _handler is not None and _handler in root.handlers else None
    # Our handler off the root while the setup runs: a ``logging.basicConfig()`` in it
    # then acts alike in a new worker and in one that ran units already (with ours
    # on the root, it did nothing there: no handler, no level).
    _set_root_handler(ours, False)
    try:
        return run()
    finally:
        _set_root_handler(ours, True)
        setup_levels.update((name, (before.get(name, logging.NOTSET), level))
                            for name, level in _own_levels().items()
                            if level != before.get(name, logging.NOTSET))


def _set_root_handler(handler: logging.Handler | None, on: bool) -> None:
    """Put ``handler`` (ours, or None: nothing) on the root logger or take it off,
    as mpmagic's own change, not a task's."""
    if handler is None:
        return
    with _lock:
        _syncing.active = True
        try:
            (logging.getLogger().addHandler if on else logging.getLogger().removeHandler)(handler)
        finally:
            _syncing.active = False


def _apply_levels(ctx: bytes) -> None:
    """Give this process's loggers the notebook's levels: when they changed, or a
    task of an earlier unit changed one of them (see :func:`begin`). A level the
    worker's setup set wins (:data:`setup_levels`)."""
    global _applied, _always, _levels, _level_pairs
    if ctx != _applied:
        _levels, _always = pickle.loads(ctx)
    with _lock:
        _syncing.active = True
        try:
            for name in _set_here - set(_levels) - set(setup_levels):
                _set_level(logging.getLogger(name), logging.NOTSET)
            pairs = []
            for name, level in _levels.items():
                if name.startswith(_OWN_LOGGERS):
                    continue
                if name in setup_levels:
                    level = setup_levels[name][1]
                logger = logging.getLogger(name or None)
                if logger.level != level:  # (setLevel clears every logger's cache)
                    _set_level(logger, level)
                pairs.append((logger, level))
        finally:
            _syncing.active = False
        _set_here.clear()
        _set_here.update(n for n in _levels if n)
        _level_pairs = tuple(pairs)
        _applied = ctx


def _set_level(logger: logging.Logger, level: int) -> None:
    """The notebook's ``level`` on ``logger``; what the units' end puts back,
    if a unit running meanwhile (on Dask) changed it, is that level too."""
    logger.setLevel(level)
    saved = _changed.get(logger)
    if saved is not None:
        _changed[logger] = (level, *saved[1:])


def _levels_intact() -> bool:
    """Do the loggers the notebook set still have its levels here? A task's
    ``logging.getLogger("calc").setLevel(DEBUG)`` changes them for the rest of
    its unit (as serially, for its later records), and must not outlive it:
    each unit starts from the notebook's levels. A few attribute reads."""
    for logger, level in _level_pairs:
        if logger.level != level:
            return False
    return True


def sent_level(name: str) -> int:
    """The effective level the notebook's levels (as last applied here) give
    the logger ``name``: its own or its nearest ancestor's, else the root's."""
    levels = _levels
    if name == "root":  # (the root logger's records)
        name = ""
    while name:
        level = levels.get(name)
        if level is not None:
            return level
        name = name.rpartition(".")[0]
    return levels.get("", logging.WARNING)


def _unit_filters(filters: list, notebook_always: tuple) -> tuple[list, str]:
    """The warning filters while a unit runs: each warning's first occurrence in
    the unit reaches :func:`_show_warning` (the notebook decides what shows),
    except that an "error" filter still raises, as it would in serial Python
    (local workers have the notebook's filters: ``context.py``). Also the
    action for a warning no filter matches.

    Where this process's filters are the notebook's as far as its "always"
    ones go (local workers, mpmagic's own Dask cluster), the rest become
    "default": Python's own registry drops a repeat in C (a warning raised by
    each of 300,000 items cost 5 us more per item through our hook), while an
    "always" warning still comes every time. Elsewhere (a Dask cluster
    mpmagic did not start) every filter becomes "always", and
    :func:`_show_warning` decides from the notebook's filters, in Python.
    A filter the worker's ``%%pool setup`` added keeps its action (an
    "ignore" drops the warning here, as it would after the setup in serial
    Python): the notebook never had it, so it cannot decide for it.
    """
    front, back = context.setup_filters
    kept = front + back if front or back else ()
    mine = [f for f in filters if f not in kept] if kept else filters
    rest = "default" if _loaded_here(_always_specs(mine)) == _loaded_here(notebook_always) else "always"
    return [f if f[0] in ("error", "always") or (kept and f in kept) else (rest, *f[1:]) for f in filters], rest


# The last unit filters worked out (see _set_unit_filters): (the worker's filters,
# the notebook's "always" specs, %%pool setup's filters (front, back), the unit's
# filters); None until one could be kept.
_unit_cache: tuple | None = None


# warnings' own "the filters changed" call (drops the "already warned" registries);
# private (compat): where it is missing, begin makes the public call instead.
_filters_mutated: Any = compat.warnings_filters_mutated()


def _set_unit_filters(saved: list) -> None:
    """Put the unit's filters in place of ``saved`` (this process's own): those of
    :func:`_unit_filters`, then ``simplefilter(rest, append=True)`` for a warning no
    filter matches (a public call, which also drops the "already warned" registries).

    The result is worked out again only when ``saved``, the notebook's ``_always``
    or the setup's filters changed: the same filter tuples (compared in C, by
    identity first) give the same unit filters. It is kept only when no filter
    here or in the notebook says "always": only then is it independent of which
    packages this process imported (see :func:`_loaded_here`). Working it out
    walked and rebuilt every filter in Python at each unit (a warm 2-item map runs
    one unit per worker and call): 4 us of a unit's ~40.
    """
    global _unit_cache
    front, back = context.setup_filters
    cached = _unit_cache
    if (cached is not None and _filters_mutated is not None and cached[1] is _always
            and cached[2] == front and cached[3] == back and cached[0] == saved):
        warnings.filters[:] = cached[4]  # type: ignore[index]  # (typeshed: a Sequence)
        _filters_mutated()  # (what simplefilter ends with)
        return
    filters, rest = _unit_filters(saved, _always)
    warnings.filters[:] = filters  # type: ignore[index]  # (typeshed: a Sequence)
    warnings.simplefilter(rest, append=True)  # type: ignore[arg-type]  # (one of the two actions)
    if not _always and "always" not in map(itemgetter(0), saved):
        # (what simplefilter made of it, final filter included: a copy, as the task may change them)
        _unit_cache = (saved, _always, list(front), list(back), list(warnings.filters))
    else:
        _unit_cache = None


def begin(log_context: tuple | None) -> None:
    """A unit starts in this thread: capture its records and warnings.

    ``log_context`` is a message's ``(first item index or None, levels bytes)``
    (:func:`notebook_context`); None captures nothing. Costs a few
    microseconds per unit (a bytes comparison for the levels, a look at the
    levels of the loggers the notebook set, a filter swap).
    """
    global _running, _saved_filters
    if not log_context or not log_context[1]:
        return
    start, levels = log_context
    if not _installed or levels != _applied or not _levels_intact():  # (the usual unit: all done already)
        try:
            _install()
            _apply_levels(levels)
        except Exception:
            _log.warning("mpmagic: could not capture logging in this worker", exc_info=True)
            return
    unit = _unit
    seen: dict = {}
    unit.active, unit.start, unit.seen, unit.frame = True, start, seen, sys._getframe(1)
    with _lock:
        _running += 1
        _units[threading.get_ident()] = (start, seen)
        if _running == 1:
            if HOOKS_PER_UNIT:
                try:
                    _hook_in()
                except Exception:  # (as _install's: the task runs, its records are not captured)
                    _log.warning("mpmagic: could not capture logging in this worker", exc_info=True)
            _saved_filters = list(warnings.filters)
            _set_unit_filters(_saved_filters)


def end() -> None:
    """The unit is over: stop labelling; the last unit puts the worker's filters back."""
    global _running, _saved_filters
    if not _unit.active:
        return
    _unit.active, _unit.seen, _unit.frame = False, None, None
    with _lock:
        _running -= 1
        _units.pop(threading.get_ident(), None)
        _keep_left_handlers()
        if _running == 0 and (_changed or _disable_before is not None):
            _restore()  # (what the units changed of logging)
        if _running == 0 and HOOKS_PER_UNIT:
            _hook_out()
        if _running == 0 and _saved_filters is not None:
            if _filters_mutated is not None:  # (resetwarnings and an extend, in one step)
                warnings.filters[:] = _saved_filters  # type: ignore[index]  # (typeshed: a Sequence)
                _filters_mutated()  # (bumps the filters' version: registries start afresh)
            else:
                warnings.resetwarnings()
                warnings.filters.extend(_saved_filters)  # type: ignore[attr-defined]  # (a list, see above)
            _saved_filters = None


def _keep_left_handlers() -> None:
    """Before the units' end undoes it (:func:`_restore`): the root logger's handlers a
    unit left there, if it changed them (``logging.basicConfig(force=True)``), for its
    threads' later records (:func:`adopt_threads`). Under ``_lock``."""
    global _left_handlers
    root = logging.getLogger()
    if root not in _changed:
        _left_handlers = None
        return
    _left_handlers = [h for h in root.handlers if not isinstance(h, _TaskHandler) and _to_console(h)]


# --------------------------------------------------------------------------
# Notebook side: what comes home


def _resolve_category(module: str, qualname: str) -> type[Warning]:
    """The warning class by name here; a look-alike subclass of Warning if it
    cannot be imported (e.g. defined in a module the notebook lacks)."""
    try:
        obj: Any = sys.modules.get(module) or importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, type) and issubclass(obj, Warning):
            return obj
    except Exception:
        _log.debug("mpmagic: warning category %s.%s not found here", module, qualname)
    return type(qualname.rsplit(".", 1)[-1], (Warning,), {"__module__": module})


def _matches(pattern: Any, text: str) -> bool:
    """A filter's message or module pattern against ``text``, as CPython's
    ``warn_explicit`` checks it: None matches anything, a plain string (some
    libraries insert filters by hand, e.g. pandas' and IPython's) must be equal,
    a compiled pattern must match at the start."""
    if pattern is None:
        return True
    if isinstance(pattern, str):
        return pattern == text
    return pattern.match(text) is not None


def _action(text: str, category: type[Warning], module: str, lineno: int) -> str:
    """The action the notebook's ``warnings.filters`` choose (as ``warn_explicit`` does)."""
    for action, msg, cat, mod, ln in warnings.filters:
        if _matches(msg, text) and issubclass(category, cat) and _matches(mod, module) and (ln == 0 or lineno == ln):
            return action
    return getattr(warnings, "defaultaction", "default")  # (not in typeshed)


# What the notebook's ``warnings`` show a warning with when nobody hooked it:
# ``catch_warnings(record=True)`` (and pytest's ``recwarn``/``pytest.warns``)
# replace the second, a user's hook the first.
_SHOW_DEFAULT = warnings.showwarning
_SHOW_IMPL_DEFAULT = getattr(warnings, "_showwarnmsg_impl", None)


def _hooked() -> bool:
    """Does someone here record or handle warnings themselves?"""
    return (warnings.showwarning is not _SHOW_DEFAULT
            or getattr(warnings, "_showwarnmsg_impl", None) is not _SHOW_IMPL_DEFAULT)


class WarningRelay:
    """Turns a call's marked warning lines into what Python would print here.

    One per call: its registry makes "default" mean once per location across
    every worker and item of the call, "module" once per module, "once" once.
    An "error" filter of the notebook raises in a local worker (the filters
    travel with ``context.py``, also to the Dask cluster mpmagic started); on a
    Dask cluster mpmagic connected to, where they do not, such a warning is
    shown instead.
    """

    def __init__(self) -> None:
        self.shown: set[tuple] = set()
        self.lock = threading.Lock()

    def __call__(self, text: str) -> str:
        """``text`` (a task's output) with each marked line replaced by the
        warning as Python shows it, or removed if the notebook's filters hide
        it (or by a traceback's source line from the notebook's cells); the
        other lines unchanged and in their order."""
        if MARK not in text:
            return text
        out = []
        # (not splitlines(): it also splits at the marker's own \x1e)
        for line in text.split("\n"):
            before, mark, body = line.partition(MARK)
            if not mark:
                out.append(line)
                continue
            if before:  # a partial line printed just before the warning
                out.append(before)
            try:
                shown = self._one(body)
            except Exception:  # a warning we cannot judge is shown, never a broken run
                _log.warning("mpmagic: could not apply the notebook's filters to a task's warning", exc_info=True)
                shown = body
            if shown:
                out.append(shown)
        return "\n".join(out)

    def _one(self, body: str) -> str:
        try:
            fields = json.loads(body)
            if isinstance(fields, dict):  # a logging record
                return self._record(fields)
            if len(fields) in (3, 4):  # a traceback's source line, from this notebook's cells
                return _source_lines(*fields)
            label, text, module, qualname, filename, lineno, modname = fields
        except ValueError:
            _log.warning("mpmagic: a malformed warning line from a worker: %r", body[:200])
            return ""
        category = _resolve_category(module, qualname)
        action = _action(text, category, modname, lineno)
        if action == "ignore":
            return ""
        key = {
            "once": (text, category),
            "module": (text, category, modname),
            "default": (text, category, filename, lineno),
        }.get(action)
        if key is not None:
            with self.lock:
                if key in self.shown:
                    return ""
                self.shown.add(key)
        # A %%parallel body is numbered as its notebook cell: named as that cell, as a
        # warning raised there serially is (its lines in linecache are the cell's).
        filename = cell_file(filename)
        if _hooked():
            # Recorded (catch_warnings(record=True), pytest.warns) or handled by the
            # user's showwarning, as serially: their hook gets the warning itself.
            try:
                message = category(text)
            except Exception:  # a look-alike category that wants other arguments
                message = Warning(text)
            warnings.showwarning(message, category, filename, lineno)
            return ""
        shown = warnings.formatwarning(text, category, filename, lineno)
        return "\n".join(f"{label}{line}" for line in shown.splitlines())

    def _record(self, fields: dict) -> str:
        """A task's logging record, as serially: handed to the notebook's handlers
        of its logger (a FileHandler gets it), its levels, filters and
        ``propagate`` applied; the text for the cell: its labelled lines
        (``logging.BASIC_FORMAT``, see :func:`deliver`), or nothing."""
        sent = fields["record"]
        for attr in ("exc_text", "stack_info"):  # (their cell frames' source lines, marked)
            if isinstance(sent.get(attr), str) and MARK in sent[attr]:
                sent[attr] = self(sent[attr])
        record = logging.makeLogRecord(sent)
        shown: str = fields["shown"]
        streams: list[Any] = []
        if not deliver(record, streams, lowered=bool(fields.get("lowered"))) or fields.get("printed"):
            return ""  # (printed: a console handler of the setup's wrote it in the task's output)
        text = self(shown.rstrip("\n"))  # (its traceback's source lines are marked too)
        # Where serial code's handler would have written it: a handler on stdout, or one
        # made before a capture_output() / %%capture, writes to its own stream, not the
        # cell's stderr this text goes to (there it went to stderr, or was captured).
        here = sys.stderr
        if all(stream is here for stream in streams):
            return text
        for stream in dict.fromkeys(s for s in streams if s is not here):
            try:
                stream.write(text + "\n")
                stream.flush()
            except Exception:  # a closed stream: shown in the cell instead
                return text
        return text if any(stream is here for stream in streams) else ""


def _source_lines(label: str, filename: str, lineno: int, where: list | None = None) -> str:
    """The source line of a traceback's frame in a notebook cell, as ``traceback``
    prints it under the frame's ``File`` line (with its ``~~^~~`` line where
    ``where``, the frame's [end line, start column, end column], makes one), each
    line behind ``label``; empty if the notebook has no such line."""
    filename = cell_file(filename)
    source = linecache.getline(filename, lineno).strip()
    if not source:
        return ""
    if where is not None and sys.version_info >= (3, 11):
        try:
            end_lineno, colno, end_colno = where
            frame = traceback.FrameSummary(filename, lineno, "", end_lineno=end_lineno,  # type: ignore[call-arg]
                                           colno=colno, end_colno=end_colno)
            lines = traceback.StackSummary.from_list([frame]).format()[0].splitlines()[1:]
            if lines:
                return "\n".join(f"{label}{line}" for line in lines)
        except Exception:  # (positions a later Python reads otherwise: the source line alone)
            _log.debug("mpmagic: a traceback's position not drawn", exc_info=True)
    return f"{label}    {source}"


def _to_console(handler: logging.Handler) -> bool:
    """Does ``handler`` write to the notebook's output (a StreamHandler on
    stdout or stderr, as ``logging.basicConfig()`` makes, or on one of
    ipykernel's output streams)? The cell's labelled line stands in for it."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = handler.stream
    if any(stream is s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)):
        return True
    kind = type(stream)
    return kind.__name__ == "OutStream" and kind.__module__.startswith("ipykernel")  # (a kernel's stdout/stderr)


def deliver(record: logging.LogRecord, streams: list | None = None, *, lowered: bool = False) -> bool:
    """Hand a task's ``record`` to the notebook's handlers for its logger, as
    ``Logger.handle`` and ``Logger.callHandlers`` would serially; True when
    serial code would have printed it to the cell.

    Serial logging's rules, in its order: nothing when ``logging.disable()``
    covers the record's level, or its logger is ``disabled`` or its filters
    drop it; then each handler of the logger and of its ancestors (while
    ``propagate`` lets it go up) whose level and filters take the record.
    Handlers that write to the notebook's output are not called: the cell
    shows the record's labelled line instead (``[item 3] INFO:calc:text``,
    as docs/guide.md promises) when one of them takes it. Other handlers (a
    file, a queue) get the record itself. When no logger on the way has a
    handler at all (not even a ``NullHandler``), ``logging.lastResort``
    prints it to stderr serially, at its level (WARNING): then the cell
    shows it at that level too. ``streams`` gets the stream of each console
    handler that took it (the cell's line is written there).

    A record below the notebook's effective level for its logger is dropped, as
    serial code would not have made it, unless it is ``lowered``: the task
    itself lowered that level earlier in its unit (``setLevel(DEBUG)``), which
    serially would have lowered the notebook's, so its later records count. The
    worker undoes such a change when the unit ends: serially it would stay in
    the notebook and reach every later item and call; here it reaches the rest
    of that unit (the task's chunk) only, as a task's warning filters do.
    """
    logger = logging.getLogger(record.name) if record.name != "root" else logging.getLogger()
    if (logger.manager.disable >= record.levelno or logger.disabled
            or (not lowered and record.levelno < logger.getEffectiveLevel()) or not logger.filter(record)):
        return False
    show, found = False, False
    current: logging.Logger | None = logger
    while current is not None:
        for handler in list(current.handlers):
            found = True
            if record.levelno < handler.level:
                continue
            if _to_console(handler):
                if handler.filter(record):
                    show = True
                    if streams is not None:
                        streams.append(handler.stream)  # type: ignore[attr-defined]
            else:
                try:
                    handler.handle(record)
                except Exception:  # (a handler's own errors go through its handleError; this is a safety net)
                    _log.warning("mpmagic: a logging handler failed on a task's record", exc_info=True)
        current = current.parent if current.propagate else None
    if not found:
        last = logging.lastResort
        if last is None or record.levelno < last.level or not last.filter(record):
            return False
        if streams is not None:
            streams.append(sys.stderr)  # (lastResort writes to the current sys.stderr)
        return True
    return show
