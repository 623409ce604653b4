"""The notebook's world, carried to local workers at call time.

A worker process is started once and then serves many calls, so without
help it keeps the world of the moment it started: a ``%cd`` or
``os.environ["X"] = ...`` or ``sys.path.append(...)`` in the notebook after
that would not reach it, and ``%pmap f, xs`` would behave differently from
``map(f, xs)``. Before a unit goes to a worker, the local backend sends it
the notebook's current

* working directory (``%cd``, ``os.chdir``),
* environment variables (set, changed and removed ones), and the local
  time zone the notebook has in effect (:func:`tz_in_effect`: the ``TZ`` of
  its last ``time.tzset()``; a ``TZ`` set without one is in os.environ but
  not in ``localtime()``, there as in the tasks),
* ``sys.path`` (the notebook's entries first, in its order; import caches
  are invalidated so that new directories are seen),
* recursion limit, and the limit on converting big ints to strings
  (``sys.set_int_max_str_digits``: a fork inherited it, forkserver and spawn
  workers raised ``ValueError`` where serial ``str(10**5000)`` worked),
* warnings filters (``warnings.filterwarnings``, ``simplefilter``),
* ``sys.argv`` (``sys.argv = ["train.py", "--lr", "0.1"]`` to drive an
  ``argparse`` main from the notebook: tasks kept the argv of the pool's start),
* the settings of numeric libraries that change what a task computes, for
  those the notebook has imported: torch's grad mode (``torch.no_grad()``
  around a call: read in the calling thread, where it lives) and default
  dtype (``torch.set_default_dtype``), jax's ``jax_enable_x64``, and numpy's
  error state (``np.seterr``, ``with np.errstate(...)`` around a call) and
  numpy 2's print options (``np.set_printoptions``, ``np.printoptions``), the
  socket default timeout (``socket.setdefaulttimeout``), and
  the calling thread's ``decimal`` context (precision, rounding, traps; see
  :func:`libraries`; only what differs from the library's default is sent,
  and a worker imports the library to apply it), and pandas' options changed
  from their defaults (display options wait for a task to import pandas),
  and ``tempfile.tempdir`` (``tempfile.tempdir = "/scratch"``: where a task's
  ``NamedTemporaryFile()`` and ``mkdtemp()`` go),

as one :class:`~mpmagic.protocol.Context` message, and only when it changed
since that worker last got it: each distinct state gets a version number,
and the backend remembers which version each worker has. The worker adopts
it again at the start of each call (:func:`reassert`), where a task of an
earlier call changed it. Checking costs the
notebook ~2.6 us per call (comparing against the last state; measured with 40
environment variables; ~1 us more with pandas imported, ~1 us more with decimal imported); building and sending a new message happens only
after a change.

A notebook directory the workers cannot use (deleted under the notebook,
or one they may not enter: ``chmod 000``) is not sent: they work in the
notebook user's home directory instead (``/`` if it has none), the pool
starts its workers from there (multiprocessing makes a child ``chdir`` to
its parent's directory, which failed), and the run shows one line saying so,
once (:func:`take_note`). Serial ``map`` does not care where it runs; a
task that reads a relative path failed there in the notebook too.

Deliberately not carried (see docs/troubleshooting.md): numpy 1's print
options, the locale,
the random generators' state, signal handlers and thread-local state
(torch's grad mode excepted, see above). They
are per-thread or per-library state that the task can set itself in one
line, copying them would cost every call, and some would surprise (two
workers seeded alike draw the same "random" numbers).

The workers of the Dask ``LocalCluster`` mpmagic started (this machine) get
it with each task (``backends/dask_tasks.py``); those of a Dask cluster
mpmagic connected to receive none of it: such a cluster is shared and may be
on other machines, where the notebook's directory and paths mean nothing.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from . import compat, payload, task_builtins
from .protocol import Context

log = logging.getLogger("mpmagic")

_lock = threading.Lock()
_version = 0
_last_state: tuple | None = None  # what the last message carried, to compare against
_last_msg: Context | None = None
_last_call: Any = object()
_last_enterable: bool | None = None  # could workers enter the notebook's directory at the last read
# In a worker: variables it set for itself at start (worker_setup.start_worker:
# CUDA_VISIBLE_DEVICES of --gpus, the BLAS/OpenMP thread caps). The notebook's
# environment never overrides or removes them.
own_env: set[str] = set()


# The line about a notebook directory the workers cannot use, until a run shows it (take_note).
_note: str | None = None
_noted: tuple | None = None  # the problem last noted: (directory or None, reason); None while usable


def _getcwd() -> str | None:
    """The notebook's directory, or None when it was deleted (``os.getcwd`` raises)."""
    try:
        return os.getcwd()
    except OSError:
        return None


def fallback_dir() -> str:
    """Where workers work when the notebook's directory cannot be used: the home directory, else ``/``."""
    home = os.path.expanduser("~")
    if os.path.isabs(home) and os.path.isdir(home) and os.access(home, os.X_OK):
        return home
    return "/"


def workers_dir(cwd: str | None = None, *, read: bool = True) -> tuple[str, str | None]:
    """The directory workers work in: ``(cwd, None)`` when they can enter the
    notebook's, else ``(fallback, reason)`` with the reason in words
    ("no longer exists", "cannot be entered by the workers (permission denied)").

    ``read``: read the notebook's directory now (``cwd`` is then ignored).
    Costs a ``getcwd`` and an ``access`` (~2 us): called when a worker starts and
    when the context message is built again, not per call.
    """
    if read:
        cwd = _getcwd()
    if cwd is None:
        return fallback_dir(), "no longer exists"
    if not os.access(cwd, os.X_OK):
        return fallback_dir(), "cannot be entered by the workers (permission denied)"
    return cwd, None


def _note_problem(cwd: str | None, where: str, reason: str | None) -> None:
    """Remember the one line to show about an unusable directory, once per problem."""
    global _note, _noted
    problem = None if reason is None else (cwd, reason)
    if problem is not None and problem != _noted:
        name = "" if cwd is None else f" {cwd}"
        _note = f"mpmagic: the notebook's working directory{name} {reason}, so tasks run in {where}\n"
    _noted = problem


def take_note() -> str | None:
    """The one line about the notebook's directory a run should show now (once), or None."""
    global _note
    if _note is None:  # (every unit sent asks: no lock while there is nothing)
        return None
    with _lock:
        note, _note = _note, None
        return note


# os.environ._data is the bytes-keyed dict behind os.environ (CPython): comparing it
# costs ~0.3 us, building a str dict of it ~5 us (the fallback, where it is missing).
_environ: Callable[[], dict] = (
    (lambda: os.environ._data) if isinstance(getattr(os.environ, "_data", None), dict)  # type: ignore[attr-defined]
    else (lambda: dict(os.environ))
)


# time.tzset (Unix): applies a changed TZ to the C library's local time (see _adopt).
_tzset: Callable[[], None] | None = getattr(time, "tzset", None)

# sys.get_int_max_str_digits (Python 3.11, and 3.10.7 on): None where it is missing.
_get_digits: Callable[[], int] | None = getattr(sys, "get_int_max_str_digits", None)
_set_digits: Callable[[int], None] | None = getattr(sys, "set_int_max_str_digits", None)


def _state(libs: tuple | None = None) -> tuple:
    return (
        _getcwd(),
        _environ(),
        sys.path,
        sys.getrecursionlimit(),
        _get_digits() if _get_digits is not None else None,
        warnings.filters,
        libraries() if libs is None else libs,
        sys.argv,
        tz_in_effect(),
    )


# The notebook's local time zone is the one its C library last read TZ for (``time.tzset()``,
# or glibc's ``mktime``), not os.environ's TZ: ``os.environ["TZ"] = "Asia/Tokyo"`` without a
# tzset leaves ``localtime()`` in the old zone. Tasks must compute in the zone in effect.
# Timestamps whose local time tells zones apart: January and July of 1970, 2000, 2010, 2024.
_PROBES = (0, 15638400, 946684800, 962409600, 1262304000, 1277942400, 1704067200, 1719792000)
_UNREAD: Any = object()
_TZ_KEY: Any = b"TZ" if isinstance(getattr(os.environ, "_data", None), dict) else "TZ"  # (its key in _environ())
_tz_eff: str | None = None  # the TZ the C library's local time was last set from (None: unset, the system's)
_tz_raw: Any = _UNREAD  # _environ()'s TZ at the last look
_tz_names: Any = None  # time.tzname at the last look (each time.tzset() replaces the tuple)
_tz_pending = False  # os.environ's TZ is not the one in effect (changed without a tzset)
_tz_now: tuple = (None, ())  # what tz_in_effect returns: (_tz_eff, the fingerprint of the zone in effect)


def _fingerprint() -> tuple:
    """The local time zone in effect, as the UTC offset and name of each of :data:`_PROBES` (~8 us)."""
    out = []
    for t in _PROBES:
        lt = time.localtime(t)
        out.append((lt.tm_gmtoff, lt.tm_zone))
    return tuple(out)


def _recent() -> tuple:
    """The last two :data:`_PROBES` of :func:`_fingerprint` (~2 us): has the zone in effect changed?"""
    a, b = time.localtime(_PROBES[-2]), time.localtime(_PROBES[-1])
    return ((a.tm_gmtoff, a.tm_zone), (b.tm_gmtoff, b.tm_zone))


def tz_in_effect() -> tuple:
    """``(TZ, fingerprint)``: the ``TZ`` value (None: unset) the process's local time
    was last set from, and :func:`_fingerprint` of that zone.

    Costs a dict lookup and three comparisons (~0.2 us) while os.environ's TZ is the
    one in effect. After ``time.tzset()`` (a new ``time.tzname``) or a change of TZ,
    os.environ's TZ is in effect if the zone changed (a fingerprint, ~8 us, once).
    While the notebook's TZ waits for a tzset, two probes per read (~2 us) see
    glibc's ``mktime`` apply it (it reads TZ again, and leaves ``time.tzname``).
    (A TZ set, applied and changed again between two runs is not seen: the workers
    then say their zone differs, see :func:`_apply_tz`.)"""
    global _tz_eff, _tz_raw, _tz_names, _tz_now, _tz_pending
    raw = _environ().get(_TZ_KEY)
    names = time.tzname
    if names is _tz_names and raw == _tz_raw and (not _tz_pending or _recent() == _tz_now[1][-2:]):
        return _tz_now
    env = os.environ.get("TZ")
    fp = _fingerprint()
    if _tz_raw is _UNREAD or names is not _tz_names or fp != _tz_now[1]:
        _tz_eff = env
    _tz_raw, _tz_names, _tz_pending = raw, names, env != _tz_eff
    if _tz_now != (_tz_eff, fp):
        _tz_now = (_tz_eff, fp)
    return _tz_now


#: The name of pandas' options among the library settings: one value, the options
#: that differ from their defaults, as sorted ``(key, value)`` pairs.
PANDAS_OPTIONS = "pandas options"

# (the pandas module and its option store last read, a copy of the store, what was read: see _pandas_options)
_pandas_read: tuple[Any, dict, dict, tuple] | None = None


def _nested_copy(values: dict) -> dict:
    """A copy of pandas' nested option dicts (the values themselves are not copied)."""
    return {k: _nested_copy(v) if type(v) is dict else v for k, v in values.items()}


def _travels(value: Any) -> bool:
    """Can an option's value go to the workers (a ``display.float_format`` lambda of the notebook cannot)?"""
    if value is None or type(value) in (bool, int, float, str):
        return True
    try:
        payload.dumps_data(value)
    except Exception:
        log.debug("mpmagic: the pandas option value %r is not sent to workers", value, exc_info=True)
        return False
    return True


def _pandas_options(pd: Any) -> tuple:
    """The pandas options that differ from their defaults (``pd.set_option``, ``pd.options.x = ...``,
    ``pd.option_context(...)`` around a call), as sorted ``(key, value)`` pairs.

    A comparison of pandas' option store with the copy of the last read (~1 us),
    and a walk of its ~75 options only after a change. Options are process-wide
    (not per thread). One whose value cannot be pickled is left out (debug log)."""
    global _pandas_read
    last = _pandas_read
    if last is not None and last[0] is pd and last[1] == last[2]:
        return last[3]
    store = compat.pandas_option_store(pd)
    if store is None:
        return ()
    values, registered = store
    changed = []
    for key, option in list(registered.items()):
        node: Any = values
        try:
            for part in key.split("."):
                node = node[part]
            if node is option.defval or node == option.defval:
                continue
        except Exception:  # (an option missing from the store; a value whose == raises)
            continue
        if _travels(node):
            changed.append((key, node))
    result = tuple(sorted(changed, key=lambda kv: kv[0]))
    _pandas_read = (pd, values, _nested_copy(values), result)
    return result


#: Options that matter only to code using pandas: a worker that has not imported pandas
#: applies them once a task has (:func:`reassert`), rather than import it for them.
_PANDAS_LAZY = ("display.", "styler.", "plotting.")

# In a worker: pandas options wait for a task to import pandas (see _PANDAS_LAZY).
_pandas_waiting = False


class _Refused(Exception):
    """The settings a worker's library refused: ``(what, value, reason)`` each, ``value``
    :data:`_DEFAULT` where it was to be put back to the library's default."""

    def __init__(self, refused: list[tuple[str, Any, str]]) -> None:
        super().__init__(", ".join(what for what, _, _ in refused))
        self.refused = refused


def _reason(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none): pandas'
    reason for refusing an option, shown in the line for the notebook."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _set_pandas_options(pd: Any, want: tuple) -> None:
    """In a worker: pandas' options as ``want`` says (the notebook's changed ones), every
    other one at its default. Deprecated ones are set quietly (the notebook showed
    pandas' warning). Raises :class:`_Refused` after trying them all, with each option
    pandas refused and pandas' reason (a plotting backend only the notebook can import:
    the others are still set)."""
    store = compat.pandas_option_store(pd)
    if store is None:
        raise RuntimeError("this pandas keeps its options elsewhere")
    registered = store[1]
    current, wanted = dict(_pandas_options(pd)), dict(want)
    refused: list[tuple[str, Any, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in [k for k in current if k not in wanted and k in registered]:
            if (key, _DEFAULT) in _pandas_refused:
                continue
            try:
                pd.set_option(key, registered[key].defval)
            except Exception as exc:
                refused.append((key, _DEFAULT, _reason(exc)))
        for key, value in wanted.items():
            if _failure_key(key, value) in _pandas_refused:
                continue
            try:
                if key not in current or current[key] != value:
                    pd.set_option(key, value)
            except Exception as exc:
                refused.append((key, value, _reason(exc)))
    if refused:
        _pandas_refused.update(_failure_key(key, value) for key, value, _ in refused)
        raise _Refused(refused)


# In a worker: the pandas options its pandas refused, as ``(option, value)`` (``_DEFAULT``:
# put back to its default; see :func:`_failure_key`). Not tried again at each call, nor in
# each Dask task: a plotting backend the worker cannot import cost ~3.5 ms per try, at every
# call, for the worker's whole life. A new context from the notebook (it changed something:
# a sys.path entry may bring the backend) or a new %%pool setup (which may import it) clears
# it: tried once more then.
_pandas_refused: set[Any] = set()


def _pandas_wanted(value: tuple) -> tuple:
    """The notebook's pandas options ``value`` but those this worker's pandas refused
    (:data:`_pandas_refused`): what the worker compares its own with, so that an option it
    cannot take does not make every call set them all again."""
    return tuple(kv for kv in value if _failure_key(*kv) not in _pandas_refused)


# The library settings carried (libraries()): name -> (module, its default, read it, set it).
def _torch_dtype(torch: Any) -> str:
    dtype = torch.get_default_dtype()
    return "float32" if dtype is torch.float32 else str(dtype).rpartition(".")[2]  # (str() costs ~1.3 us)


# decimal's signals, by name, in the order a context's traps are read and written.
_DECIMAL_SIGNALS = ("Clamped", "DivisionByZero", "FloatOperation", "Inexact", "InvalidOperation", "Overflow",
                    "Rounded", "Subnormal", "Underflow")


_decimal_signals: tuple[Any, tuple] = (None, ())  # (the decimal module, its (name, signal) pairs)


def _decimal_context(decimal: Any) -> tuple:
    """The calling thread's decimal context as ``(prec, rounding, Emin, Emax, capitals,
    clamp, the names of the signals it traps)`` (its flags are state, not settings).
    A context's attributes and nine trap lookups (~1 us), per call once decimal is imported."""
    global _decimal_signals
    if _decimal_signals[0] is not decimal:
        _decimal_signals = (decimal, tuple((name, getattr(decimal, name)) for name in _DECIMAL_SIGNALS))
    c = decimal.getcontext()
    traps = c.traps
    return (c.prec, c.rounding, c.Emin, c.Emax, c.capitals, c.clamp,
            tuple([name for name, signal in _decimal_signals[1] if traps[signal]]))


def _set_decimal_context(decimal: Any, value: tuple) -> None:
    """This thread's decimal context as :func:`_decimal_context` read it (its flags cleared)."""
    prec, rounding, emin, emax, capitals, clamp, traps = value
    decimal.setcontext(decimal.Context(prec=prec, rounding=rounding, Emin=emin, Emax=emax, capitals=capitals,
                                       clamp=clamp, traps=[getattr(decimal, name) for name in traps]))


_np_print: tuple[Any, tuple] = (None, ())  # (numpy's print options dict last read, what it gave)


def _numpy_print_options(np: Any) -> tuple:
    """numpy's print options in the calling thread's context that differ from numpy's defaults
    (``np.set_printoptions(precision=2)``, ``with np.printoptions(...)`` around a call), as
    sorted ``(name, value)`` pairs; one whose value cannot be pickled (a ``formatter`` of
    lambdas) is left out. numpy 2 keeps them in a ContextVar that each change replaces:
    a lookup and an identity check per call (~0.1 us). numpy 1's (a dict changed in place)
    are not read: () there."""
    global _np_print
    module = sys.modules.get("numpy._core.printoptions")
    var = getattr(module, "format_options", None)
    if var is None:
        return ()
    options = var.get()
    if options is _np_print[0]:
        return _np_print[1]
    default = getattr(module, "default_format_options_dict", {})
    changed = tuple(sorted((k, v) for k, v in options.items() if (k not in default or default[k] != v) and _travels(v)))
    _np_print = (options, changed)
    return changed


def _set_numpy_print_options(np: Any, value: tuple) -> None:
    """This thread's context's numpy print options: numpy's defaults with ``value``'s."""
    module = sys.modules.get("numpy._core.printoptions")
    if module is None:
        raise RuntimeError("this numpy keeps its print options elsewhere (numpy 1)")
    module.format_options.set({**module.default_format_options_dict, **dict(value)})


_LIBRARY_SETTINGS: dict[str, tuple[str, Any, Callable[[Any], Any], Callable[[Any, Any], Any]]] = {
    "torch grad mode": ("torch", True, lambda t: bool(t.is_grad_enabled()), lambda t, v: t.set_grad_enabled(v)),
    "torch default dtype": ("torch", "float32", _torch_dtype, lambda t, v: t.set_default_dtype(getattr(t, v))),
    "jax_enable_x64": ("jax", False, lambda j: bool(j.config.jax_enable_x64),
                       lambda j, v: j.config.update("jax_enable_x64", v)),
    # np.seterr(divide="raise") in the notebook: serial 1 / np.float64(0) raises FloatingPointError
    "numpy error state": ("numpy", (("divide", "warn"), ("invalid", "warn"), ("over", "warn"), ("under", "ignore")),
                          lambda n: tuple(sorted(n.geterr().items())), lambda n, v: n.seterr(**dict(v))),
    # np.set_printoptions(precision=2) in the notebook: serial str(np.array([1/3])) is '[0.33]'
    "numpy print options": ("numpy", (), _numpy_print_options, _set_numpy_print_options),
    # socket.setdefaulttimeout(3) in the notebook: a serial urlopen() without a timeout gives up after 3 s
    "socket default timeout": ("socket", None, lambda s: s.getdefaulttimeout(), lambda s, v: s.setdefaulttimeout(v)),
    # decimal.getcontext().prec = 5 in the notebook: serial Decimal(1) / Decimal(3) is 0.33333, not 28 digits
    "decimal context": ("decimal", (28, "ROUND_HALF_EVEN", -999999, 999999, 1, 0,
                                    ("DivisionByZero", "InvalidOperation", "Overflow")),
                        _decimal_context, _set_decimal_context),
    # pd.set_option("future.infer_string", False) in the notebook: serial pd.Series(["a"]).dtype is object
    PANDAS_OPTIONS: ("pandas", (), _pandas_options, _set_pandas_options),
    # tempfile.tempdir = "/scratch" in the notebook: serial NamedTemporaryFile() makes its file there (random23).
    # Its value as the notebook has it, cached "/tmp" included: a worker's cached one never overrides it, and
    # None (put back) makes the worker read TMPDIR again at its next use, as the notebook does.
    "tempfile.tempdir": ("tempfile", None, lambda t: t.tempdir, lambda t, v: setattr(t, "tempdir", v)),
}


# The modules of the settings, and (the ones of them imported at the last read of
# libraries(), the settings of those: (name, module, default, read) in order).
_LIBRARY_MODULES = frozenset(module for module, _, _, _ in _LIBRARY_SETTINGS.values())
_readable: tuple[Any, tuple] = (None, ())


def libraries() -> tuple:
    """The settings of imported numeric libraries that differ from their
    defaults, as ``(name, value)`` pairs: what tasks must compute with.

    Read where a run is made (the job, in the calling thread: torch's grad
    mode is per thread, and ``with torch.no_grad(): %pmap ...`` sets the
    notebook's); in a worker at each call's start (:func:`reassert`). Which
    of the libraries are imported is one set intersection in C, and only
    their settings are walked: looking each of the nine up in turn was ~200
    Python bytecodes per read with two of them imported (socket, tempfile),
    a tenth of a worker's warm unit. torch and jax imported, 1-3 us in all.
    A setting that cannot be read (a library half imported) is left out.
    """
    global _readable
    imported = sys.modules.keys() & _LIBRARY_MODULES  # (iterates the nine, looked up in sys.modules)
    if imported != _readable[0]:
        _readable = (imported, tuple((name, module, default, read)
                                     for name, (module, default, read, _) in _LIBRARY_SETTINGS.items()
                                     if module in imported))
    out = []
    for name, module, default, read in _readable[1]:
        lib = sys.modules.get(module)
        if lib is None:  # (a None entry in sys.modules: the module is blocked)
            continue
        try:
            value = read(lib)
        except Exception:
            continue
        if value != default:
            out.append((name, value))
    return tuple(out)


def _apply_libraries(libs: tuple) -> bool:
    """In a worker: the library settings ``libs`` (the notebook's, then the
    setup's), every other one at its default. A library the worker has not
    imported is imported only to apply a setting that differs from its
    default (the notebook imported it; its tasks will). True if all applied."""
    global _pandas_waiting
    want = dict(libs)
    want.update((name, value) for name, value in setup_libs.items() if name != PANDAS_OPTIONS)
    if PANDAS_OPTIONS in setup_libs:  # (per option: the notebook's, with those the setup changed)
        merged = {**dict(want.get(PANDAS_OPTIONS, ())), **setup_libs[PANDAS_OPTIONS]}
        want[PANDAS_OPTIONS] = tuple(sorted(((k, v) for k, v in merged.items() if v is not _DEFAULT),
                                            key=lambda kv: kv[0]))
    _pandas_waiting = False
    applied = True
    for name, (module, default, read, write) in _LIBRARY_SETTINGS.items():
        value = want.get(name, default)
        if name == PANDAS_OPTIONS:
            _forget_said_options(value)
        lib = sys.modules.get(module)
        try:
            if lib is None:
                if value == default:
                    continue
                if name == PANDAS_OPTIONS and all(key.startswith(_PANDAS_LAZY) for key, _ in value):
                    _pandas_waiting = True  # (applied once a task imports pandas: reassert)
                    continue
                lib = importlib.import_module(module)
            if name == PANDAS_OPTIONS and _pandas_refused:
                value = _pandas_wanted(value)  # (those refused are not tried again: _pandas_refused)
            if read(lib) != value:
                write(lib, value)
        except Exception as exc:
            applied = False
            if name == PANDAS_OPTIONS and isinstance(exc, _Refused):  # (said once per option and value)
                exc.refused = [each for each in exc.refused if (name, *_failure_key(*each[:2])) not in _libs_failed]
                _libs_failed.update((name, *_failure_key(*each[:2])) for each in exc.refused)
                if exc.refused:
                    _tell_notebook(_refusal_lines(name, value, exc))
                continue
            failed = _failure_key(name, value)
            if failed not in _libs_failed:  # (once: the next calls try again, quietly)
                _libs_failed.add(failed)
                log.debug("mpmagic worker: could not set %s to the notebook's %r", name, value, exc_info=True)
                _tell_notebook(_refusal_lines(name, value, exc))
    return applied


_libs_failed: set[Any] = set()  # in a worker: the settings it could not apply (said once; a pandas option each)


def _forget_said_options(wanted: tuple) -> None:
    """In a worker: the pandas options said refused (:data:`_libs_failed`) that the notebook
    no longer wants (it reset them) are forgotten, so that setting one again is a change,
    said again. One ``set`` walk of a few entries, only while some were said."""
    said = [each for each in _libs_failed if len(each) == 3 and each[0] == PANDAS_OPTIONS and each[2] is not _DEFAULT]
    if said:
        now = {_failure_key(key, value) for key, value in wanted}
        _libs_failed.difference_update(each for each in said if each[1:] not in now)


def _failure_key(name: str, value: Any) -> Any:
    """What :data:`_libs_failed` remembers of a setting: ``(name, value)``, or its repr
    where the value cannot be hashed (a pandas option holding a dict or a list)."""
    try:
        hash(value)
    except TypeError:
        return (name, repr(value))
    return (name, value)


def _refusal_lines(name: str, value: Any, exc: BaseException) -> list[str]:
    """The lines for the notebook about a library setting this worker could not apply:
    one per pandas option pandas refused, with pandas' reason and what to do; one for
    any other setting. Never mpmagic's traceback (it was printed by every worker, even
    for tasks that never used the library, and hid pandas' reason)."""
    if name != PANDAS_OPTIONS or not isinstance(exc, _Refused):
        return [f"mpmagic: the workers could not set {name} to the notebook's {value!r} ({type(exc).__name__}: "
                f"{_reason(exc)}), so their tasks run without it"]
    lines = []
    for key, wanted, reason in exc.refused:
        if wanted is _DEFAULT:
            lines.append(f"mpmagic: the workers' pandas refused to put option {key} back to its default "
                         f"({reason}), so their tasks keep the value it had there: %pool restart starts workers "
                         "at pandas' defaults")
        else:
            lines.append(f"mpmagic: the workers' pandas refused the notebook's option {key} = {wanted!r} "
                         f"({reason}), so their tasks run without it: set it in a %%pool setup, or reset it "
                         f"in the notebook (pd.reset_option({key!r}))")
    return lines


# In a worker: the lines about settings it could not apply, until its next reply takes
# them home (take_notes); a Dask worker's tasks adopt the context in threads of their own.
_notes: list[str] = []
_notes_lock = threading.Lock()


def _tell_notebook(lines: list[str]) -> None:
    with _notes_lock:
        _notes.extend(lines)


def take_notes() -> list[str]:
    """In a worker: the lines for the notebook since the last call (a library setting it
    could not apply), cleared. They go home in a unit's reply (``meta["notes"]``), and
    the run shows each line once, whichever of its workers sent it (``jobs``)."""
    if not _notes:  # (every unit's reply asks: no lock while there is nothing)
        return []
    with _notes_lock:
        notes = _notes[:]
        _notes.clear()
    return notes

# A pandas option a %%pool setup put back to its default (in setup_libs[PANDAS_OPTIONS]).
_DEFAULT: Any = object()


def current(call: Any = None, libs: tuple | None = None) -> Context:
    """The :class:`Context` message for the notebook's world now.

    ``call`` (a run's id): the world is read once per run, so every unit of a
    run sees the same one, and later units of that run cost a dict lookup.
    ``libs``: the run's :func:`libraries`, read in the thread that made it
    (None: read now, in this thread).
    """
    global _version, _last_state, _last_msg, _last_call, _last_enterable
    with _lock:
        if call is not None and call == _last_call and _last_msg is not None:
            return _last_msg
        state = _state(libs)
        # Whether workers may enter it is part of the world too: a directory made
        # unenterable (chmod 000) after the pool started has the same getcwd(),
        # and the old context kept the old workers in it while new ones, unable
        # to enter it, worked in HOME (one run saw two directories; ~1 us).
        enterable = state[0] is not None and os.access(state[0], os.X_OK)
        if _last_msg is None or state != _last_state or enterable != _last_enterable:
            _last_enterable = enterable
            cwd, env, path, limit, digits, filters, libs, argv, tz = state
            # Copies: the live objects keep changing under the comparison.
            _last_state = (cwd, dict(env), list(path), limit, digits, list(filters), libs, list(argv), tz)
            _version += 1
            where, reason = workers_dir(cwd, read=False)
            _note_problem(cwd, where, reason)
            body = (where, dict(os.environ), list(path), limit, digits, _pack_filters(filters), libs, list(argv),
                    tz)
            _last_msg = Context(_version, payload.dumps_data(body))
        _last_call = call
        return _last_msg


# Filters for the notebook's own machinery (IPython adds one for its completer):
# a task never raises those warnings, and loading their classes would import
# IPython in the worker.
_NOTEBOOK_MODULES = ("IPython", "ipykernel", "ipywidgets", "jupyter", "traitlets", "tornado", "zmq")


def travels(f: tuple) -> bool:
    """Is this warnings filter sent to workers? Not one for a category of the
    notebook's own machinery (``worker_logging`` compares what it sent)."""
    return getattr(f[2], "__module__", "").split(".")[0] not in _NOTEBOOK_MODULES


def _pack_filters(filters: list) -> list[tuple[str, bytes]]:
    """Each warnings filter pickled on its own, so that one whose category a
    worker cannot load costs only that filter, with the top package of its
    category's module (see :func:`_loadable_now`)."""
    out = []
    for f in filters:
        if not travels(f):
            continue
        try:
            out.append((getattr(f[2], "__module__", "builtins").split(".")[0], payload.dumps_data(f)))
        except Exception:
            log.debug("mpmagic: warnings filter %r not sent to workers", f, exc_info=True)
    return out


def _loadable_now(package: str) -> bool:
    """May a worker load a filter whose category comes from ``package`` now?

    Only if the worker has imported that package already: loading the filter
    would import it. numpy's and matplotlib's filters (matplotlib, loaded by
    an ``--insights`` chart in the notebook, imports numpy) made every worker
    import numpy at its next call, a package the notebook's code never used.
    A filter waits until a task imports its package (no warning of that
    category can be raised before), and applies from the next call on.
    """
    return package in sys.modules


def key(msg: Context) -> tuple:
    """What a backend records per worker to know it has this version."""
    return ("mpmagic-context", msg.version)


# In a worker: the notebook's world it last adopted (loaded), to adopt again at
# each new call (see reassert).
_adopted: tuple | None = None


def apply(msg: Context) -> None:
    """In a worker: adopt the notebook's world carried by ``msg``.

    Never raises: a part that cannot be applied is logged and the rest applied.
    """
    global _adopted
    try:
        cwd, env, path, limit, digits, packed, libs, argv, tz = payload.loads(msg.state)
    except Exception:
        log.warning("mpmagic worker: could not load the notebook's context", exc_info=True)
        return
    global _pending
    _pending = list(packed)
    _pandas_refused.clear()  # (the notebook changed something: a refused option is tried once more)
    _adopted = (cwd, env, path, limit, digits, _load_filters(), libs, argv, tz)
    _adopt(*_adopted)


# In a worker: the notebook's filters as sent, (package, pickled filter) in
# order; those of packages not imported here yet wait (see _loadable_now).
_pending: list[tuple[str, Any]] = []
# The packages of the filters in _pending still waiting (set by _load_filters):
# reassert checks these alone, not every filter, at each call.
_waiting: tuple[str, ...] = ()


def _load_filters() -> list:
    """The notebook's filters this worker can load now, in their order; loaded ones stay loaded."""
    global _waiting
    filters = []
    waiting = []
    for i, (package, data) in enumerate(_pending):
        if isinstance(data, bytes):
            if not _loadable_now(package):
                waiting.append(package)
                continue
            try:
                data = payload.loads(data)
            except Exception:
                log.warning("mpmagic worker: a warnings filter of the notebook cannot be loaded here", exc_info=True)
                data = None
            _pending[i] = (package, data)
        if data is not None:
            filters.append(data)
    _waiting = tuple(waiting)
    return filters


def reassert() -> None:
    """In a worker, as a new call starts: the notebook's world again, where a
    task of an earlier call changed it (``os.chdir``, ``os.environ``,
    ``sys.path``, the recursion limit, the int digits limit, warnings filters, ``sys.argv``). Each call starts in
    the notebook's world, as the docs say: a task's ``os.chdir("/")`` made
    every later call on that worker read files from ``/``.

    When the world is still as the last adoption left it (``_as_adopted``),
    nothing is done: a ``getcwd`` and a few comparisons made in C (~2 us).
    Adopting again walked every environment variable in Python (30-60 us with
    35 of them), once per worker in every call: a tenth of a warm 2-item map."""
    global _adopted, _as_adopted
    if _adopted is not None:
        if _waiting and any(map(_loadable_now, _waiting)):
            _adopted = (*_adopted[:5], _load_filters(), *_adopted[6:])  # (a task imported a waiting filter's package)
            _as_adopted = None
        if _as_adopted is None or _state() != _as_adopted:
            _adopt(*_adopted)
        elif _pandas_waiting and "pandas" in sys.modules:  # (a task imported pandas: its display options now)
            _apply_libraries(_adopted[6])
            _as_adopted = None  # (taken again by the next adoption, with pandas' options in it)


def reassert_libraries() -> None:
    """In a Dask worker, as each task starts: the notebook's library settings that
    live per thread or per context (torch's grad mode, numpy's error state) in the
    task's own, where the adoption ran in another (Dask runs each task in a copy of
    its loop's ``contextvars`` context: numpy's error state set by an earlier task
    is gone by the next). A read and a comparison per setting (~1-3 us)."""
    if _adopted is not None:
        _apply_libraries(_adopted[6])


# In a worker: what its %%pool setup changed of the world, which wins over the
# notebook's (see keep_setup_changes): variables it set (name -> value), ones
# it removed, the directory it chose (None: the notebook's), the recursion
# limit it set (None: the notebook's), the int digits limit it set (None: the
# notebook's), the warnings filters it added
# (those it put before the ones it found, and those it appended after them),
# and the library settings it changed (torch's default dtype...: name -> value).
setup_env: dict[str, str] = {}
setup_removed: set[str] = set()
own_cwd: str | None = None
setup_limit: int | None = None
setup_digits: int | None = None
setup_filters: tuple[list, list] = ([], [])
setup_libs: dict[str, Any] = {}


def keep_setup_changes(run: Any) -> Any:
    """Run ``run()`` (a worker setup, or its clearing) and keep what it changed
    of the world: the environment variables it set, changed or removed, its
    working directory, its recursion limit, its int digits limit and the warnings filters it added
    win over the notebook's from then on, and are put back at each call if a
    task changed them. Each call starts in the notebook's world
    (:func:`reassert`), and a setup's ``os.environ["HF_HOME"] = ...``,
    ``os.chdir(...)``, ``warnings.filterwarnings("ignore", ...)`` or
    ``sys.setrecursionlimit(...)`` was undone at the first call. A new setup
    (or ``%pool setup clear``) replaces the last one's changes: after a
    clear, the notebook's world again. (Filters a setup removes, e.g. by
    ``warnings.resetwarnings()``, are not kept removed: the notebook's come back.)
    A :func:`libraries` setting the setup changed (``torch.set_default_dtype``) wins too.

    Each piece of the setup runs in the notebook's world of the moment it was
    given (:func:`in_setup_world`), and the worker is back in the notebook's
    world of now (with the setup's changes winning) when it ends: tasks see
    the notebook's later ``%cd`` as serial code does."""
    global own_cwd, setup_limit, setup_digits, setup_filters, _as_adopted, _mark
    setup_env.clear()
    setup_removed.clear()
    setup_libs.clear()
    _pandas_refused.clear()  # (a setup may make a refused option possible: tried once more)
    own_cwd, setup_limit, setup_digits, setup_filters = None, None, None, ([], [])
    if _adopted is not None:  # the notebook's world, without the last setup's changes
        _adopt(*_adopted)
    _mark = _snapshot()
    try:
        return run()
    finally:
        _count_changes(_mark)
        _mark = None
        if _adopted is not None:  # (a piece run in the world of its cell's moment: the notebook's of now again)
            _adopt(*_adopted)
        _as_adopted = None  # what wins changed: the next call adopts again


# In a worker, while keep_setup_changes runs a setup: the world its changes are counted from
# (_snapshot); in_setup_world counts them and marks again before it switches worlds.
_mark: tuple | None = None


def _snapshot() -> tuple:
    """What :func:`_count_changes` compares with: environment, directory, limits, filters, library settings."""
    return (dict(os.environ), _getcwd(), sys.getrecursionlimit(), _get_digits() if _get_digits is not None else None,
            list(warnings.filters), dict(libraries()))


def _count_changes(before: tuple) -> None:
    """Add what changed of the world since ``before`` (a :func:`_snapshot`) to the setup's changes."""
    global own_cwd, setup_limit, setup_digits, setup_filters
    env_before, cwd_before, limit_before, digits_before, filters_before, libs_before = before
    for name, value in os.environ.items():
        if env_before.get(name) != value:
            setup_env[name] = value
            setup_removed.discard(name)
    for name in env_before:
        if name not in os.environ:
            setup_removed.add(name)
            setup_env.pop(name, None)
    cwd = _getcwd()
    if cwd is not None and cwd != cwd_before:
        own_cwd = cwd
    if sys.getrecursionlimit() != limit_before:
        setup_limit = sys.getrecursionlimit()
    if _get_digits is not None and _get_digits() != digits_before:
        setup_digits = _get_digits()
    front, back = _added_filters(filters_before, list(warnings.filters))
    setup_filters = (front + [f for f in setup_filters[0] if f not in front], setup_filters[1] + back)
    libs_after = dict(libraries())
    for name, (_, default, _, _) in _LIBRARY_SETTINGS.items():
        if name == PANDAS_OPTIONS:  # (per option: those the notebook changes later still reach the tasks)
            was, now = dict(libs_before.get(name, ())), dict(libs_after.get(name, ()))
            changes = {k: now.get(k, _DEFAULT) for k in was.keys() | now.keys()
                       if was.get(k, _DEFAULT) != now.get(k, _DEFAULT)}
            if changes:
                setup_libs[name] = {**setup_libs.get(name, {}), **changes}
        elif libs_before.get(name, default) != libs_after.get(name, default):
            setup_libs[name] = libs_after.get(name, default)


def world() -> bytes:
    """In the notebook: its world now, for a piece of worker setup to run in
    (:func:`in_setup_world`): what a ``Context`` message carries."""
    return current().state


def in_setup_world(state: bytes | None, run: Callable[[], Any]) -> Any:
    """In a worker: ``run()`` (one piece of its setup) in the notebook's world
    ``state`` of the moment that piece was given (:func:`world`), with what
    earlier pieces changed winning; inside :func:`keep_setup_changes` only
    (a Dask worker's plugin runs it where it is).

    Why: a setup runs again in every later worker (a replacement, a resize,
    ``%pool restart``). Run in the notebook's world of that moment, a
    ``%cd ../expB`` made after the setup cell made the replacement read
    ``expB/cfg.txt`` where the others had read ``expA/cfg.txt`` (one run with
    two setups), and a relative ``os.chdir("data")`` failed on every new
    worker. A setup runs once in the notebook's sense, in one world."""
    global _mark
    if _mark is None or state is None:
        return run()
    try:
        cwd, env, path, limit, digits, packed, libs, argv, tz = payload.loads(state)
    except Exception:
        log.warning("mpmagic worker: could not load the world of the setup's cell", exc_info=True)
        return run()
    _count_changes(_mark)  # (what ran since the last mark: nothing, as a rule)
    filters = []
    for package, data in packed:
        if _loadable_now(package):
            try:
                filters.append(payload.loads(data))
            except Exception:
                log.debug("mpmagic worker: a warnings filter of the setup's cell not loaded", exc_info=True)
    _adopt(cwd, env, path, limit, digits, filters, libs, argv, tz)
    _mark = _snapshot()
    return run()


def _added_filters(before: list, after: list) -> tuple[list, list]:
    """The filters in ``after`` that ``before`` lacks: (those before the first
    old one, as ``filterwarnings`` puts them; those after it, as ``append=True`` does)."""
    front: list = []
    back: list = []
    seen_old = False
    for f in after:
        if f in before:
            seen_old = True
        else:
            (back if seen_old else front).append(f)
    return front, back


_cwd_failed: str | None = None  # in a worker: the directory it last failed to enter (warned once)

# In a worker: the notebook's (TZ, fingerprint) _apply_tz last applied ((TZ, None): a setup's TZ; _UNREAD:
# not yet), and time.tzname right after (a task's own time.tzset() replaces it).
_tz_applied: Any = _UNREAD
_tz_applied_names: Any = None
_tz_told: set[tuple] = set()  # in a worker: the zones it could not match to the notebook's (said once)


def _set_tz(tz: str | None) -> None:
    """os.environ's TZ set to ``tz`` (None: removed)."""
    if tz is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = tz


def _apply_tz(before: str | None, tz: tuple | None) -> None:
    """In a worker, once the environment was adopted: its local time zone the notebook's
    in effect (``tz``, :func:`tz_in_effect` there), with os.environ's TZ the notebook's.

    The C library reads TZ only at ``tzset`` (glibc's ``mktime`` too): the notebook's
    ``os.environ["TZ"] = ...; time.tzset()`` reached os.environ here, yet ``localtime()``
    kept the old zone (00:00 UTC where serial gave 09:00 JST); and the notebook's
    ``os.environ["TZ"] = ...`` without a tzset, applied here, gave the tasks a zone the
    notebook's ``localtime()`` does not have. So ``tzset`` runs with the TZ in effect
    there, then os.environ's TZ is put back to the notebook's. A ``%%pool setup``'s TZ wins
    (applied as it stands). Done again when a task changed TZ or called ``tzset``.

    The zone is then compared with the notebook's (the fingerprint): where it differs (the
    notebook set TZ, applied it and changed it again between two runs; or changed it
    without tzset before mpmagic first looked), the system's zone is tried, and if that
    differs too, the notebook is told in one line (once) what the tasks' zone is."""
    global _tz_applied, _tz_applied_names, _tz_eff, _tz_raw, _tz_names, _tz_now, _tz_pending
    if _tzset is None:
        return
    env = os.environ.get("TZ")
    if tz is None or "TZ" in setup_env or "TZ" in setup_removed:
        want, fp = env, None
    else:
        want, fp = tz
    asked = (want, fp)
    if asked == _tz_applied and env == before and time.tzname is _tz_applied_names:
        return
    mine = None
    for candidate in (want, None) if fp is not None and want is not None else (want,):
        if candidate != env:
            _set_tz(candidate)
        _tzset()
        if candidate != env:
            _set_tz(env)
        mine = _fingerprint()
        if fp is None or mine == fp:
            want = candidate
            break
    else:
        _set_tz(want)
        _tzset()
        _set_tz(env)
        mine = _fingerprint()
        if (want, fp) not in _tz_told:
            _tz_told.add((want, fp))
            zone = f"TZ={want!r}" if want is not None else "the system's zone (TZ unset)"
            _tell_notebook([f"mpmagic: the workers' local time zone differs from the notebook's (its TZ was changed "
                            f"and applied with time.tzset() or time.mktime(), then changed again, or changed without "
                            f"time.tzset() before mpmagic ran), so their tasks use {zone}: call time.tzset() "
                            f"in the notebook after setting os.environ['TZ']"])
    _tz_applied, _tz_applied_names = asked, time.tzname
    # (this worker's own tz_in_effect, which _state() reads: the zone just applied)
    _tz_eff, _tz_raw, _tz_names, _tz_now = want, _environ().get(_TZ_KEY), time.tzname, (want, mine)
    _tz_pending = env != want

# In a worker: the world as the last ``_adopt`` left it, every part of it
# applied (the ``_state()`` tuple, copied), or None. ``reassert`` adopts again
# only when the world differs from it (a task changed something) or it is None
# (after a new context or setup, or an adoption with a part that failed,
# which is then tried again at each call as before).
_as_adopted: tuple | None = None


def _adopt(cwd: str, env: dict, path: list, limit: int, digits: int | None, filters: list, libs: tuple = (),
           argv: list[str] | None = None, tz: tuple | None = None) -> None:
    if own_cwd is not None:
        cwd = own_cwd
    global _cwd_failed, _as_adopted
    _as_adopted = None
    applied = True  # (every part: only then is the world as adopted remembered)
    try:
        if _getcwd() != cwd:
            os.chdir(cwd)
    except OSError as exc:
        applied = False
        if cwd != _cwd_failed:  # once, not at every call
            _cwd_failed = cwd
            log.warning("mpmagic worker: cannot change to the notebook's directory %s: %s", cwd, exc)
    tz_before = os.environ.get("TZ")
    try:
        mine = own_env | setup_env.keys()
        for name in [n for n in os.environ if (n not in env and n not in mine) or n in setup_removed]:
            del os.environ[name]
        for name, value in env.items():
            if name == "MPLBACKEND":  # the inline backend needs a kernel: tasks get theirs (task_matplotlib)
                value = task_builtins.matplotlib_backend(value)
            if os.environ.get(name) != value and name not in mine and name not in setup_removed:
                os.environ[name] = value
        for name, value in setup_env.items():  # (a task may have changed what the setup set)
            if os.environ.get(name) != value:
                os.environ[name] = value
    except Exception:
        applied = False
        log.warning("mpmagic worker: could not apply the notebook's environment", exc_info=True)
    _apply_tz(tz_before, tz)
    if sys.path[: len(path)] != path:  # (the worker's own entries may follow the notebook's)
        ours = set(path)
        sys.path[:] = list(path) + [p for p in sys.path if p not in ours]
        importlib.invalidate_caches()
    if setup_limit is not None:
        limit = setup_limit
    if setup_digits is not None:
        digits = setup_digits
    if setup_filters[0] or setup_filters[1]:  # the setup's first (a filterwarnings moves an equal one up)
        front, back = setup_filters
        filters = front + [f for f in filters if f not in front and f not in back] + back
    if limit != sys.getrecursionlimit():
        try:
            sys.setrecursionlimit(limit)
        except (ValueError, RecursionError) as exc:
            applied = False
            log.warning("mpmagic worker: cannot set the recursion limit to %s: %s", limit, exc)
    if digits is not None and _get_digits is not None and _set_digits is not None and digits != _get_digits():
        try:
            _set_digits(digits)
        except ValueError as exc:
            applied = False
            log.warning("mpmagic worker: cannot set the int digits limit to %s: %s", digits, exc)
    if filters != warnings.filters:
        warnings.filters[:] = filters  # type: ignore[index]  # (typeshed types it as a Sequence)
        mutated = getattr(warnings, "_filters_mutated", None)  # private; renamed in 3.14
        if mutated is not None:
            mutated()  # drop the per-module "already warned" caches
    if argv is not None and sys.argv != argv:
        sys.argv = list(argv)  # (rebound, as the notebook's `sys.argv = [...]` does)
    applied = _apply_libraries(libs) and applied
    if applied:
        cwd_now, env_now, path_now, limit_now, digits_now, filters_now, libs_now, argv_now, tz_now = _state()
        _as_adopted = (cwd_now, dict(env_now), list(path_now), limit_now, digits_now, list(filters_now), libs_now,
                       list(argv_now), tz_now)


__all__ = ["apply", "current", "fallback_dir", "key", "libraries", "reassert", "take_note", "take_notes",
           "workers_dir"]
