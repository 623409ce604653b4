"""Worker setup that heals: code run once in every worker, now and in every later one.

``%%pool setup`` (or :func:`on_worker_start`) declares code that loads a
model, opens a file or imports a module once per worker. The notebook keeps
it here (one versioned list of entries), and the backends send it to each
worker as it starts, so a worker that replaces a crashed one, one recycled by
``--max-tasks-per-child``, a resized or restarted pool and a temporary
``%%parallel`` worker all have it too. Dask workers get it as a
``WorkerPlugin`` (see :class:`SetupPlugin`).

In the worker, the names the setup defines become *builtins* of that process.
Why builtins and not the function's globals: cloudpickle rebuilds each
notebook function with a fresh globals dict holding only the names it uses,
and a helper called by the mapped function gets a dict of its own; every
function (def, lambda, helper) and every ``%%parallel`` cell falls back to
builtins for a name its globals lack, so one place covers them all. A name
the notebook itself defines still wins: cloudpickle sends the notebook's
value with the function. Except a name an ``on_worker_start`` function
assigns with ``global`` (``Pool(initializer=)``'s idiom): that value is put
into each task's function's globals over the notebook's, as with Pool
(:func:`use_set_globals`).

A ``%%pool setup`` cell runs with the builtins' namespace as its globals
(:func:`_run_setup`), so the globals of the functions it defines are the
builtins too: ``global MODEL; MODEL = load()`` in a setup function a task
calls rebinds the builtin every task reads, as in serial code, where the
setup and the tasks share the notebook's globals. (Run in a namespace of
its own and copied into the builtins at its end, a task read the value of
that moment: ``None`` for a lazily loaded model.)

Messages (``protocol.py``): a local worker gets ``Setup(version, payload)``
(``payload`` None: remove the names of an earlier setup) and answers
``SetupDone(version, worker, error, names, output, random_state)``: ``error``
is None or one line naming the setup line that raised, ``output`` what the
setup printed (shown by ``%%pool setup``, labelled by worker; a later worker's
in the cell of the run that waits for it, :func:`take_output`),
``random_state`` fingerprints of the random generators the setup changed
(two workers alike draw the same numbers: one line says so). The pool's manager thread
sends and records them; applying a setup to the current pool from the
notebook (``%%pool setup``, :func:`mpmagic.on_worker_start`) is in
``setup_api.py``, since this module sits below the pool (workers import it).

Each entry keeps the notebook's world of the moment it was given (its
directory, environment, ``sys.path``, ``sys.argv``...: ``context.world``),
and a local worker runs it there (``context.in_setup_world``), later workers
too: a replacement started after a ``%cd ../expB`` read ``expB/cfg.txt``
where the first workers had read ``expA/cfg.txt``, one run with two setups.

The user's own modules a setup imports (``import mymodel``: often imported
by the setup alone, never by the notebook) are found when it is set
(:func:`module_files`, through ``usermodules.py``): a checkpoint key covers
their files' contents. Each worker imports them once, when it first runs a
setup that imports them, so their files are stamped as each worker says it
ran it (:func:`record`), or, on Dask, as the notebook sends the setup to the
cluster (:func:`sent`); :func:`files_changed` tells a checkpointed run that
a live worker runs an older version than the file's (a reload of the module
in the workers leaves the setup's own names as they were: still older).

This module imports no IPython.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import linecache
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import astlock, debugging, worker_logging
from .protocol import Setup, SetupDone

log = logging.getLogger("mpmagic")

SETUP_FILENAME = "<pool-setup>"  # the setup cell's name in tracebacks


@dataclass(frozen=True)
class _Entry:
    """One piece of setup: the ``%%pool setup`` cell's source, or a function."""

    kind: str  # "code" or "func"
    name: str  # "%%pool setup" or the function's name
    data: Any  # the source text, or the cloudpickled function
    # The cell's lines above the code (the ``%%pool setup`` line): a failure names its line as
    # IPython numbers the cell, the magic's line being line 1, as %%parallel's messages do.
    line_offset: int = 0
    # The notebook's world (directory, environment, sys.path, argv...: context.world) when it was
    # given: every worker runs it there, also one started after a %cd (context.in_setup_world).
    # Not compared: the same cell run again after a %cd is the same setup.
    world: bytes | None = field(default=None, compare=False)
    # How ``%pool setup`` shows a function: ``init('/data/model.bin')`` for a partial (``name``
    # is the function's: ``init``); empty: ``name()``.
    shown: str = field(default="", compare=False)
    # The notebook's ``from __future__`` features when the cell was given
    # (astlock.notebook_future_flags): the setup is compiled under them, as serially.
    future_flags: int = 0


# -- notebook side --------------------------------------------------------

_lock = threading.RLock()
_entries: list[_Entry] = []
_version = 0
_payload_cache: tuple[int, bytes | None] | None = None
# worker id -> (setup version it ran, error line or None); filled by the backends.
_status: dict[Any, tuple[int, str | None]] = {}
_reported: set[tuple[int, str]] = set()  # failures (and the random state line) already printed, once each
# (kind, name) of an entry -> the files of the user's own modules it imports (usermodules.py),
# found when it is set: the checkpoint key covers them (checkpoint_keys._setup_digest).
_files: dict[tuple[str, str], tuple[str, ...]] = {}
# worker id -> {file: its (mtime_ns, size) when the worker first ran a setup importing it}: what
# tells that a file changed since (files_changed). The first: a later setup's `import` of a
# module the worker has is a no-op, it keeps the version it imported.
_loaded: dict[Any, dict[str, tuple[int, int] | None]] = {}


def _changed() -> None:
    global _version
    _version += 1
    _reported.clear()
    _killed_in_a_row.clear()
    _random_states.clear()
    _names.clear()


# The names the workers reported the current setup defined (SetupDone.names): also
# those only running it shows (an on_worker_start function's dict, exec, a star import).
_names: set[str] = set()


# The current setup's random states: (generator, fingerprint) -> the first worker
# that reported it (SetupDone.random_state); the line about two alike is shown once.
_random_states: dict[tuple[str, int], Any] = {}


def set_code(source: str, line_offset: int = 0, world: bytes | None = None) -> None:
    """Make ``source`` the ``%%pool setup`` cell (replacing an earlier one).

    ``line_offset``: the lines of the notebook cell above ``source`` (1: the
    ``%%pool setup`` line), so that a failure's line is the cell's line.
    ``world``: the notebook's world as the cell runs (``context.world``), which
    every worker runs it in.
    """
    flags = astlock.notebook_future_flags()
    code = compile(source, SETUP_FILENAME, "exec", flags=flags, dont_inherit=True)  # a SyntaxError now, not in every worker
    files = _imported_files(code)
    cache_source(source, line_offset)  # (a task's frame in a setup function shows its line here too)
    with _lock:
        _entries[:] = [e for e in _entries if e.kind != "code"]
        _entries.insert(0, _Entry("code", "%%pool setup", source, line_offset, world, future_flags=flags))
        _files[("code", "%%pool setup")] = files
        _changed()


def cache_source(source: str, line_offset: int = 0) -> str:
    """Put the setup cell's lines in ``linecache`` as ``<pool-setup>``, numbered as the
    notebook cell (``line_offset`` lines above it); returns that numbered text.

    The worker runs the setup under that name, and does this to name a failing
    line; the notebook does it too: a task's frame in a function the setup
    defined is shown here (IPython's traceback, ``traceback.format_exception``
    of a ``Failed.error``), and without the lines it read "Could not get source"."""
    text = "\n" * line_offset + source
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # (as a file's last line: pdb and tracebacks print it as it is)
        lines[-1] += "\n"
    linecache.cache[SETUP_FILENAME] = (len(text), None, lines, SETUP_FILENAME)
    return text


def add_function(func: Callable[[], Any], world: bytes | None = None) -> None:
    """Add ``func`` (same name replaces) to what every worker runs at start
    (in the notebook's ``world`` of now, as :func:`set_code`)."""
    from . import payload

    name, shown = function_name(func)
    data = payload.dumps_function(func, name)
    inner = func
    while isinstance(inner, functools.partial):  # on_worker_start(partial(init, v))
        inner = inner.func
    code = getattr(inner, "__code__", None)
    files = _imported_files(code) if isinstance(code, types.CodeType) else ()
    with _lock:
        _entries[:] = [e for e in _entries if not (e.kind == "func" and e.name == name)]
        _entries.append(_Entry("func", name, data, world=world, shown=shown))
        _files[("func", name)] = files
        _changed()


def function_name(func: Callable[[], Any]) -> tuple[str, str]:
    """(the name of an ``on_worker_start`` function, how ``%pool setup`` shows it).

    A ``functools.partial`` (the port of ``Pool(initializer=init, initargs=(path,))``)
    is named by its function, ``init``, as a failure's line names it, and shown with
    its arguments, ``init('/data/model.bin')``; its repr, with the function's address,
    named it before. The same function again replaces it, as a plain function does."""
    inner: Any = func
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    while isinstance(inner, functools.partial):
        args[:0] = inner.args
        kwargs = {**inner.keywords, **kwargs}
        inner = inner.func
    name = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None) or repr(inner)
    if inner is func:
        return name, ""
    import reprlib

    short = reprlib.Repr()
    short.maxstring, short.maxother = 40, 40
    shown = ", ".join([*map(short.repr, args), *(f"{k}={short.repr(v)}" for k, v in kwargs.items())])
    return name, f"{name}({shown})"


def clear() -> None:
    """Remove every setup: new workers start bare, running ones drop the setup's names."""
    with _lock:
        _entries.clear()
        _files.clear()
        _changed()


def _imported_files(code: types.CodeType) -> tuple[str, ...]:
    """The files of the user's own modules ``code`` imports (never raises: a setup
    whose imports cannot be looked at here is still a setup)."""
    from . import usermodules

    try:
        return tuple(usermodules.imported_files(code))
    except Exception:  # pragma: no cover - an odd code object or finder
        log.debug("mpmagic: could not look at the setup's imports", exc_info=True)
        return ()


def module_files() -> list[str]:
    """The files of the user's own modules the current setup imports (each once): a
    ``%%pool setup`` cell's ``import mymodel``, an ``on_worker_start`` function's
    ``import mymodel`` in its body. Not modules those modules import in turn."""
    with _lock:
        found = [f for e in _entries for f in _files.get((e.kind, e.name), ())]
    return list(dict.fromkeys(found))


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def files_changed(workers: list) -> list[str]:
    """Of the user's modules the setup imports, the files changed on disk since one
    of these workers ran the setup (it imported the file as it was then, and runs
    that version until it restarts): a checkpoint keyed by the file as it is now
    would store that worker's results under the new file's key.

    Also after the notebook reloaded the module and the workers did too
    (``warmup.Reloads``): a reload runs the module, not the setup, so what the
    setup made from it (``BASE = mymod.BASE``, a model built by its code) is
    still the old file's. Only a worker that runs the setup afresh, a new one
    (``%pool restart``), has it from the file as it is now."""
    files = module_files()
    if not files:
        return []
    with _lock:
        records = [dict(_loaded[w]) for w in workers if w in _loaded]
    changed: list[str] = []
    for path in files:
        now = _stamp(path)
        if any(path in stamps and stamps[path] != now for stamps in records):
            changed.append(path)
    return changed


def sent(key: Any) -> None:
    """The notebook is about to send the current setup to workers it knows together
    as ``key`` (a Dask cluster: its workers are not told apart here, see
    ``DaskBackend.setup_workers``): stamp the setup's module files not stamped for
    ``key`` yet, as they are now, before the workers import them.

    Before, not after: a file edited while the workers import it is then taken
    for changed (the run goes without the checkpoint), never the other way round.
    A file already stamped keeps its stamp, as :func:`record` does: workers
    that imported it once keep that version when a later setup imports it again.
    A new group of workers (a restarted cluster) gets a new ``key``."""
    with _lock:
        stamps = _loaded.pop(key, {})
        _loaded[key] = stamps  # (the newest: kept when the oldest records are dropped)
        for path in module_files():
            if path not in stamps:
                stamps[path] = _stamp(path)
        if len(_loaded) > _STATUS_KEPT:
            del _loaded[next(iter(_loaded))]


def recorded(key: Any) -> bool:
    """Whether ``key`` has a stamp of every module file the current setup imports
    (stamped by :func:`sent`); False: what those workers imported is not known."""
    with _lock:
        stamps = _loaded.get(key)
        return stamps is not None and all(path in stamps for path in module_files())


def forget_stamps(key: Any) -> None:
    """Drop the stamps of ``key``'s workers (they are gone: a stopped or restarted cluster)."""
    with _lock:
        _loaded.pop(key, None)


def has_setup() -> bool:
    return bool(_entries)


def entries() -> list[_Entry]:
    """A copy of the current setup's entries (to tell what a change removed)."""
    with _lock:
        return list(_entries)


def reported_names() -> set[str]:
    """The names the workers reported the current setup defined (a copy)."""
    with _lock:
        return set(_names)


_STATUS_KEPT = 4096  # workers remembered (a run with --max-tasks-per-child 1 starts one per item)


def version() -> int:
    """The current setup's version (0: no setup was ever made); a worker runs each once."""
    return _version


def message() -> Setup | None:
    """The ``Setup`` message for a worker; None with no setup ever made."""
    global _payload_cache
    with _lock:
        if _version == 0:
            return None
        if _payload_cache is None or _payload_cache[0] != _version:
            from . import payload

            data = payload.dumps_data(list(_entries)) if _entries else None
            _payload_cache = (_version, data)
        return Setup(_version, _payload_cache[1])


def describe() -> str:
    """What ``%pool setup`` shows: the setup code and functions, or that there is none."""
    with _lock:
        if not _entries:
            return "no worker setup (define one with %%pool setup, or mpmagic.on_worker_start(func))"
        parts = []
        for e in _entries:
            if e.kind == "code":
                parts.append("%%pool setup\n" + e.data.rstrip())
            else:
                parts.append(f"on_worker_start: {e.shown or e.name + '()'}")
        return "\n\n".join(parts)


_quiet = False  # an explicit %%pool setup waits: it reports failures and output itself
_outputs: list[str] = []  # what the setup printed meanwhile, labelled [worker N]


def is_quiet() -> bool:
    """True while an explicit ``%%pool setup`` waits (it reports the failures itself)."""
    return _quiet


@contextlib.contextmanager
def explicit() -> Iterator[list[str]]:
    """While a ``%%pool setup`` waits for the workers: failures are its own error, not
    printed lines; what the setup printed is collected (the list yielded) for the
    notebook's thread to show (the pool's manager thread records the replies)."""
    global _quiet
    with _lock:
        _quiet = True
        _outputs.clear()
    try:
        yield _outputs
    finally:
        with _lock:
            _quiet = False


def labelled(wid: Any, output: str) -> str:
    """What a worker's setup printed, each line labelled ``[worker N]``, as ``%%pool setup`` shows it."""
    return "".join(f"[worker {wid}] {line}\n" for line in output.splitlines())


def take_output(reply: SetupDone) -> str | None:
    """What the setup printed in this worker (``reply.output``), labelled by worker:
    collected for an explicit ``%%pool setup`` waiting now (it shows it, :func:`explicit`),
    else returned for the caller to show in the cell of the run that started or uses
    that worker (a replacement, a resize, a cell's temporary worker: their setup's
    output was dropped before). None: nothing printed, or collected here."""
    return take_printed(reply.worker, reply.output)


def take_printed(wid: Any, output: str) -> str | None:
    """:func:`take_output` of what worker ``wid``'s setup printed (``output``; also what a
    worker that died in its setup had printed, read from its tail)."""
    if not output:
        return None
    text = labelled(wid, output)
    with _lock:
        if _quiet:
            _outputs.append(text)
            return None
    return text


def record(worker: Any, reply: SetupDone) -> str | None:
    """A worker's answer to a ``Setup`` message.

    Returns the line to show for a failure, once per failure and setup version
    (six replacement workers failing alike are one line), and None otherwise:
    the caller shows it in the run in flight (the manager thread never prints).
    """
    with _lock:
        _status[worker] = (reply.version, reply.error)
        if len(_status) > _STATUS_KEPT:
            del _status[next(iter(_status))]
        if reply.version == _version and not reply.error:  # the files it imported are as they are now
            _killed_in_a_row.pop(_version, None)  # (a worker finished it: the kills before were no loop)
            stamps = _loaded.setdefault(worker, {})
            for path in module_files():
                if path not in stamps:
                    stamps[path] = _stamp(path)
            if len(_loaded) > _STATUS_KEPT:
                del _loaded[next(iter(_loaded))]
        if reply.error:
            log.debug("worker %s: %s", worker, reply.error)
        if reply.version != _version:
            return None
        _names.update(reply.names)
        note = _same_random_state(reply)
        if note and _quiet:
            _outputs.append(note)
            note = None
        if not reply.error or _quiet:
            return note
        same = reply.error.replace(f"worker {reply.worker},", "worker ?,", 1)  # one line per failure
        if (reply.version, same) in _reported:
            return None
        _reported.add((reply.version, same))
        return f"mpmagic: {reply.error}\n" + (note or "")


def _same_random_state(reply: SetupDone) -> str | None:
    """Under the lock: the one line (once per setup) when this worker's setup
    left a random generator in the state another worker's setup left it in:
    both draw the same "random" numbers. mpmagic reseeds each worker as it
    starts, before its setup, and never over the setup's own seed (it is the
    user's choice)."""
    if not reply.random_state or (_version, "same random state") in _reported:
        return None
    same, others = [], []
    for name, fp in sorted(reply.random_state.items()):
        other = _random_states.setdefault((name, fp), reply.worker)
        if other != reply.worker:
            same.append(name)
            others.append(other)
    if not same:
        return None
    _reported.add((_version, "same random state"))
    first, second = sorted((others[0], reply.worker), key=str)
    return (f"mpmagic: the setup left workers {first} and {second} with the same state of {' and '.join(same)} "
            "(it seeds alike in every worker), so they draw the same numbers; for draws that differ per item "
            "and repeat on any number of workers use --seed S (seed=S), or seed with mpmagic.worker_id() "
            "in the setup\n")


_killed_by: dict[int, str] = {}  # setup version -> the line of the first worker it killed

# Signals that end a process from outside it: a user's ``kill``, the kernel's OOM killer, a stop.
# A worker ending so while it runs the setup is no failure of the setup (see :func:`died`).
OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGHUP})
# Workers killed so while running the current setup, in a row (none finishing it between), that
# switch it off after all: each replacement killed in it again (out of memory while loading a
# model too big, a setup that SIGKILLs itself) is its doing, and would loop for ever.
KILLED_IN_A_ROW = 3
_killed_in_a_row: dict[int, int] = {}  # setup version -> such deaths since a worker last finished it


def died(worker: Any, wid: Any, reason: str, exitcode: int | None = None) -> str | None:
    """A worker died after it was sent the current setup and before it answered.

    The setup killed it (``os._exit``, a crash in a library it loads): from
    now on that setup is not sent to new workers (each would die the same way,
    in a loop), they are marked as failed with this line, and a ``%%pool
    setup`` waiting for the answers ends with it. Returns the line to show
    (once), as :func:`record`.

    Not when a signal from outside ended it (``exitcode`` -SIGKILL, -SIGTERM,
    -SIGHUP: :data:`OUTSIDE_SIGNALS`): a ``kill`` of a worker that happened to
    be setting up switched the setup off for every later worker, which ran
    without it (NameError in their tasks). The setup stays in force and its
    replacement runs it; the line returned says so (collected instead while an
    explicit ``%%pool setup`` waits, which then waits for the replacement).
    Only :data:`KILLED_IN_A_ROW` such deaths in a row, no worker finishing the
    setup between, count as the setup's own, as one exit does.
    """
    with _lock:
        if _version == 0 or not _entries or _status.get(worker, (None,))[0] == _version:
            return None  # no setup, or it had answered: a death of its own (a task's), not the setup's
        row = ""
        if exitcode is not None and exitcode < 0 and -exitcode in OUTSIDE_SIGNALS:
            n = _killed_in_a_row[_version] = _killed_in_a_row.get(_version, 0) + 1
            name = signal.Signals(-exitcode).name
            if n < KILLED_IN_A_ROW and _version not in _killed_by:
                _status.pop(worker, None)
                line = (f"mpmagic: worker {wid} was killed by {name} while running the worker setup (from outside, "
                        "or out of memory); the setup stays in force: its replacement runs it "
                        f"({KILLED_IN_A_ROW} workers in a row killed in it switch it off)\n")
                if _quiet:  # (an explicit %%pool setup shows it with the setup's output, and waits on)
                    _outputs.append(line)
                    return None
                return line
            row = f"; {n} workers in a row were killed by {name} while running it"
        line = _killed_by.setdefault(_version, (
            f"setup failed on worker {wid}: the worker died while running it ({reason}{row}); "
            "workers started from now on run without this setup (fix it and run %%pool setup again, "
            "or %pool setup clear)"))
    return record(worker, SetupDone(_version, wid, line, [], ""))


def killed_workers() -> str | None:
    """The line of the worker the current setup killed, or None (see :func:`died`)."""
    return _killed_by.get(_version)


def mark_failed(worker: Any, line: str) -> None:
    """Record the current setup as failed on ``worker`` without running it there."""
    with _lock:
        _status[worker] = (_version, line)


def forget(worker: Any) -> None:
    _status.pop(worker, None)


def worker_state(worker: Any) -> str | None:
    """``set up``, ``setup failed``, ``setting up`` or None (no setup) for ``%pool``."""
    if not _entries:
        return None
    ver, error = _status.get(worker, (None, None))
    if ver != _version:
        return "setting up"
    return "setup failed" if error else "set up"


def failures(workers: list) -> list[str]:
    """The error lines of the current setup on these workers."""
    out = []
    for w in workers:
        ver, error = _status.get(w, (None, None))
        if ver == _version and error:
            out.append(error)
    return out


def done_on(workers: list) -> bool:
    return all(_status.get(w, (None,))[0] == _version for w in workers)


_gpus: list[str] = []
_gpu_of: dict[Any, str] = {}  # worker id -> the GPU it was given


def set_gpus(gpus: list[str] | None) -> bool:
    """Devices for ``CUDA_VISIBLE_DEVICES`` of workers started from now on (round-robin).

    Returns True if that changed the assignment (running workers must restart).
    """
    new = [str(g).strip() for g in (gpus or []) if str(g).strip()]
    changed = new != _gpus
    _gpus[:] = new
    _gpu_of.clear()
    return changed


def start_info(wid: Any, workers: int, live: list) -> dict[str, Any]:
    """What a new worker needs before it imports anything: thread cap and GPU.

    The GPU is the one fewest live workers have (lowest first), so a worker
    that replaces a dead one takes over its device.
    """
    from . import threads

    n, thread_vars = threads.cap_for(workers, threads.configured())
    info: dict[str, Any] = {"threads": n, "thread_vars": thread_vars}
    if _gpus:
        used = [_gpu_of.get(w) for w in live]
        gpu = min(_gpus, key=lambda g: (used.count(g), _gpus.index(g)))
        _gpu_of[wid] = gpu
        info["gpu"] = gpu
    return info


def gpu_of(wid: Any) -> str | None:
    return _gpu_of.get(wid)


# -- worker side ------------------------------------------------------------

WORKER_ID: Any = None  # this worker's id (None in the notebook)
_installed: dict[str, Any] = {}  # the setup's names -> the builtins value each shadowed (or _MISSING)
# Names the setup's functions declare `global` that it did not define when it ran: bound when a task
# calls the function, taken away with the setup as its names are (name -> the value it shadowed).
_later: dict[str, Any] = {}
_MISSING = object()
# Names the setup's functions assigned with `global` (``Pool(initializer=)``'s idiom) and their values: a
# task's function gets these over the notebook's values cloudpickle sent with it (:func:`use_set_globals`).
_SET_GLOBALS: dict[str, Any] = {}
_set_globals_version = 0
# The current ``%%pool setup`` cell's own builtins (its functions' ``__builtins__``, see :func:`_own_builtins`):
# where its names go when the setup is removed, so that its functions still patched in somewhere find them.
_shadow: dict[str, Any] | None = None
# What the worker's setup is called in a task's note (:func:`note_notebook_value`): "%%pool setup" when
# it is only that cell, else "worker setup" (an ``on_worker_start`` function's names among its own).
_setup_called = "%%pool setup"


def worker_id() -> int | str | None:
    """The id of the worker running this task: a number for local workers, the
    worker's name for Dask; None in the notebook."""
    if WORKER_ID is not None:
        return WORKER_ID
    in_setup = getattr(_dask_setting_up, "wid", None)
    if in_setup is not None:  # (the Dask plugin's setup: no task, so get_worker() has none, and it was None)
        return in_setup
    if "distributed" in sys.modules:
        try:
            from distributed import get_worker

            return get_worker().name
        except (ValueError, ImportError):
            return None
    return None


def start_worker(info: dict[str, Any] | None, wid: Any) -> None:
    """First thing in a new worker: who it is, its GPU, thread caps, a fresh random state.

    Runs before the worker imports numpy or anything of the user's, so the
    environment variables (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS...) are read
    by the libraries when they load.
    """
    global WORKER_ID
    WORKER_ID = wid
    info = info or {}
    from . import context, threads

    before = dict(os.environ)
    if info.get("gpu") is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(info["gpu"])
    capped = threads.limit_in_worker(info.get("threads"), info.get("thread_vars", {}))
    # What it set is its own: the notebook's environment (context.py) must not undo it. What it set
    # is counted also when the value was there already (a fork server's, from an older notebook
    # environment): the notebook's, without it since, removed it (no thread cap at all).
    context.own_env.update(k for k, v in os.environ.items() if before.get(k) != v)
    context.own_env.update(capped)
    if info.get("gpu") is not None:
        context.own_env.add("CUDA_VISIBLE_DEVICES")
    reseed_fresh()


def reseed_fresh() -> None:
    """Give this process a random state of its own (from os.urandom).

    A forked worker starts with a copy of its parent's state: without this,
    every fork worker would draw the same "random" numbers (numpy#9650).
    numpy and torch (whose default generator a fork copies the same way) are
    reseeded only if already imported (a later import seeds itself from the OS).
    What the parent's seeded run kept to restore (seeding._saved) is the parent's:
    dropped, or the worker's first call would put the parent's state back.
    """
    from . import seeding

    seeding.forget()
    random.seed(os.urandom(32))
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            np.random.seed(int.from_bytes(os.urandom(4), "little"))
        except Exception:  # a numpy stand-in without random
            log.debug("numpy.random not reseeded", exc_info=True)
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch.manual_seed(int.from_bytes(os.urandom(8), "little"))
        except Exception:  # a stand-in without manual_seed, or one half imported
            log.debug("torch not reseeded", exc_info=True)


def run_setup(ver: int, data: bytes | None, wid: Any, copy: Callable[[str, str], bool] | None = None) -> SetupDone:
    """Run a setup payload in this worker; the ``SetupDone`` reply (error line, names, output).

    ``copy``: also given each write of the setup's output (a local worker's tail in shared
    memory, ``worker._Tail.add``), for the notebook to show if the worker dies before it
    replies (``LocalBackend._show_setup_tail``)."""
    held: list[str] = []
    out = worker_logging.SetupStream("stdout", held, copy)
    err = worker_logging.SetupStream("stderr", held, copy)
    before = random_fingerprints()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            error, names = worker_logging.keep_setup_levels(functools.partial(_run_setup, ver, data, wid))
    finally:
        out.release()
        err.release()
    changed = {name: fp for name, fp in random_fingerprints().items() if before.get(name) != fp}
    return SetupDone(ver, wid, error, names, "".join(held), changed or None)


def random_fingerprints() -> dict[str, int]:
    """A hash of ``random``'s state and, if imported, of ``numpy.random``'s global state, by name.

    Compared before and after a setup (a few microseconds): a setup that
    seeds one (``random.seed(0)``, ``np.random.seed(0)``, a library's
    ``set_seed``) leaves every worker with the same state of it, and the
    notebook says so once (:func:`record`).
    """
    import hashlib
    import pickle

    def digest(data: bytes) -> int:  # (not hash(): salted per process, and hash(None) too before 3.12)
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    out = {"random": digest(pickle.dumps(random.getstate(), 4))}
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            _, keys, pos, *_ = np.random.get_state()
            out["numpy.random"] = digest(keys.tobytes() + int(pos).to_bytes(8, "little"))
        except Exception:  # a numpy stand-in without random
            log.debug("numpy.random state not read", exc_info=True)
    return out


def _run_setup(ver: int, data: bytes | None, wid: Any) -> tuple[str | None, list[str]]:
    """(the error line or None, the names now installed).

    A ``%%pool setup`` cell runs with the worker's builtins namespace as its
    globals (see the module's docstring): its names are builtins as they are
    bound, and its functions' ``global`` statements rebind those builtins. One
    top-level statement at a time, as IPython runs a cell: after each, a
    builtin it replaced (a star import, ``exec``) refuses the setup and puts
    back every builtin as it was, before the next statement runs with it.
    """
    _uninstall()
    if data is None:
        return None, []
    set_globals: dict[str, Any] = {}  # what its functions assigned with `global` (see _SET_GLOBALS)
    from . import payload

    try:
        entries = payload.loads(data)
    except BaseException as exc:
        return f"setup could not be loaded on worker {wid}: {debugging.exception_line(exc)}", []
    from . import context

    global _setup_called
    _setup_called = "%%pool setup" if all(e.kind == "code" for e in entries) else "worker setup"
    space = vars(builtins)
    before = dict(space)  # the builtins a setup may not replace, and what a refusal puts back
    patches: set[str] = set()  # names set as attributes of the module (`builtins.print = f`): patches, not names
    dunders: set[str] = set()  # the setup's own ``__dunder__`` names (``__version__ = "1.2"``): carried as the others
    classes: set[str] = set()  # the names of the classes the setup cell defines (``class Point:``)

    def replaced(names: dict[str, Any]) -> list[str]:
        return sorted(n for n, v in names.items() if not n.startswith("__") and n in before and before[n] is not v
                      and n not in SITE_HELPERS)

    def install(names: dict[str, Any]) -> None:  # an on_worker_start function's globals or dict
        bad = replaced(names)
        if bad:
            raise _Refused(bad)
        mine = {n: v for n, v in names.items() if not n.startswith("__") or _carried_dunder(n, before)}
        dunders.update(n for n in mine if n.startswith("__"))
        space.update(mine)

    def run(entry: _Entry) -> None:
        with _in_builtins(patches):
            if entry.kind == "code":
                # (numbered as the notebook cell: its failure line and its functions' frames)
                text = cache_source(entry.data, entry.line_offset)
                tree = astlock.parse(text, SETUP_FILENAME)
                declared = declared_globals(tree)
                bad = sorted(n for n in declared if not n.startswith("__") and n in before and n not in SITE_HELPERS)
                if bad:  # (a task calling the function would rebind that builtin for the whole worker)
                    raise _Refused(bad)
                for name in declared:
                    _later.setdefault(name, before.get(name, _MISSING))
                dunders.update(n for n in bound_dunders(tree) | declared if _carried_dunder(n, before))
                classes.update(defined_classes(tree))
                own = _own_builtins(before)
                for code in _statements(tree, entry.future_flags):
                    space["__builtins__"] = own  # (taken out again by _settle or _put_back)
                    exec(code, space)
                    bad = _replaced_builtins(before, patches)
                    if bad:
                        raise _Refused(bad)
            else:
                func = payload.loads(entry.data)
                g = _by_value_globals(func)
                seen = dict(g) if g is not None else {}
                try:
                    out = func()
                finally:  # (what it assigned before it raised stays, as a setup cell's earlier lines)
                    if g is not None:
                        assigned = {k: v for k, v in g.items() if not k.startswith("__")
                                    and (k not in seen or seen[k] is not v)}
                        install(assigned)
                        set_globals.update(assigned)
                if isinstance(out, dict):
                    install(out)

    for entry in entries:
        try:
            # (in the notebook's directory, environment... of the moment it was given)
            context.in_setup_world(getattr(entry, "world", None), functools.partial(run, entry))
        except _Refused as refused:  # refused before anything stays installed: a normal setup failure
            _put_back(before, patches)
            return _shadow_line(refused.names, wid), []
        except BaseException as exc:
            bad = _replaced_builtins(before, patches)
            if bad:  # (what ran before the failing line replaced builtins: nothing installed)
                _put_back(before, patches)
                return _shadow_line(bad, wid), []
            _settle(before, patches, set_globals, dunders)  # what ran before the failing line stays usable
            _watch()
            _track_classes(entries, classes)
            return _failure_line(exc, entry, wid), sorted(_installed)
    _settle(before, patches, set_globals, dunders)
    _watch()
    _track_classes(entries, classes)
    return None, sorted(_installed)


def _track_classes(entries: list[_Entry], classes: set[str]) -> None:
    """Give each class the setup cell defines at its top level the same cloudpickle tracker
    id in every worker: one made from the cell's text and the class's name.

    A setup's class is of ``__main__`` in the worker (see :func:`_in_builtins`), so
    cloudpickle sends its instances' class by value, with a tracker id by which the
    notebook rebuilds it once; each worker made a random one, so results of two
    workers came home as instances of two classes (``type(a) is type(b)`` False,
    ``isinstance`` against the class of another worker's result False), where
    serially there is one. A changed cell is another text: its class, another id.
    Only the ``classes`` the cell's own ``class`` statements made: a notebook class
    (an ``on_worker_start`` dict's) keeps the notebook's id, which finds it there.
    Each is also the worker's own class for ``classhome``: an instance the notebook
    sends back (with its copy of the class) left the class with the copy's methods,
    whose globals were a snapshot (a setup global rebound later was not seen)."""
    import hashlib

    from . import classhome, compat

    codes = [e for e in entries if e.kind == "code"]
    if not codes:
        return
    digest = hashlib.blake2b("\0".join(e.data for e in codes).encode(), digest_size=12).hexdigest()
    for name in sorted(classes & _installed.keys()):
        value = vars(builtins).get(name)
        if isinstance(value, type) and value.__module__ == "__main__" and value.__qualname__ == name:
            compat.cloudpickle_track_class(value, f"mpmagic-setup-{digest}-{name}")
            classhome.own(value)  # (an instance sent back by the notebook leaves its methods as they are)


def _watch() -> None:
    """The setup settled: note the names the builtins have now (:data:`_baseline`)."""
    global _baseline
    _baseline = frozenset(vars(builtins))


def _own_builtins(before: dict[str, Any]) -> dict[str, Any]:
    """The builtins of the setup cell's code and functions: a copy of the worker's
    (``before``), into which :func:`_uninstall` moves the setup's names when it
    is removed.

    The setup's globals are the builtins' namespace, so a name it reads is looked
    up there first; its own builtins are only read for a name missing there, that
    is once the setup is gone: a function of it still in use (a patch,
    ``json.dumps = sorted_dumps`` reading ``_dumps``; a thread, an ``atexit``
    handler) then finds the names of its setup there, as before (a NameError on
    every call). Python fixes a function's builtins when the function is made
    (``__builtins__``: the globals' ``__builtins__``, or the builtins of the code
    making it), so the setup's functions and those they make keep these."""
    global _shadow
    _shadow = dict(before)
    return _shadow


class _Refused(Exception):
    """A setup replaced (or would replace) these builtins: refused, nothing installed."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names


# Dunders Python itself writes in a module's namespace as its code runs (exec's ``__builtins__``,
# annotations), and a module's own hooks (PEP 562: a ``__getattr__`` in the builtins' namespace would
# answer every missing attribute of the module, so ``hasattr(builtins, x)`` is always True): never a
# setup's own name, refused where its code binds them.
_PYTHONS_DUNDERS = frozenset({"__builtins__", "__annotations__", "__annotate__", "__conditional_annotations__",
                              "__getattr__", "__dir__"})


def _carried_dunder(name: str, before: dict[str, Any]) -> bool:
    """Whether the ``__dunder__`` ``name`` a setup binds is carried to the tasks as its other
    names: yes unless the builtins module has it (``__name__``, ``__doc__``: the notebook
    refuses those, :func:`dunder_shadowing`) or Python writes it itself."""
    return name.startswith("__") and name not in before and name not in _PYTHONS_DUNDERS


def bound_dunders(tree: ast.AST) -> set[str]:
    """The ``__dunder__`` names a setup's code binds at its top level (``__version__ = "1.2"``,
    ``import x as __x__``, a ``def __f__``), not in its functions, classes or comprehensions."""
    found: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        name = None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            name = node.id
        elif isinstance(node, ast.alias):
            name = node.asname or node.name.split(".")[0]
        if name is not None and name.startswith("__") and name.endswith("__"):
            found.add(name)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp,
                             ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def dunder_shadowing(names: Any) -> list[str]:
    """The ``__dunder__`` names among ``names`` a setup may not bind: those of the builtins
    module itself (``__name__``, ``__doc__``, ``__import__``...), which a setup's names would
    replace in the worker; its own (``__version__``) are carried as its other names."""
    return sorted(n for n in names if isinstance(n, str) and n.startswith("__") and n.endswith("__")
                  and (hasattr(builtins, n) or n in _PYTHONS_DUNDERS))


def defined_classes(tree: ast.AST) -> set[str]:
    """The names of the classes a setup's code defines at its top level (also in an
    ``if``, ``try``, ``with``...), not in its functions or classes."""
    found: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.ClassDef):
            found.add(node.name)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))
    return found


def declared_globals(tree: ast.AST) -> set[str]:
    """The names the functions (and classes) of a setup's code declare ``global``:
    names of the setup too, bound when a task calls the function."""
    return {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}


def _statements(tree: ast.Module, flags: int = 0) -> Iterator[types.CodeType]:
    """The setup's top-level statements, compiled one by one as it runs (as IPython
    runs a cell), each with the notebook's ``from __future__`` features (``flags``)
    and those of the statements before it."""
    import __future__

    for node in tree.body:
        yield astlock.compile_tree(ast.Module([node], type_ignores=[]), SETUP_FILENAME, "exec", flags)
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            for alias in node.names:
                feature = getattr(__future__, alias.name, None)
                flags |= getattr(feature, "compiler_flag", 0)


def _replaced_builtins(before: dict[str, Any], patches: set[str]) -> list[str]:
    """The builtins the setup replaced or deleted, from ``before`` (its snapshot): not
    ``__dunder__`` names (restored after it), nor patches of the module (``builtins.print = f``)."""
    space = vars(builtins)
    return sorted(n for n, v in before.items() if not n.startswith("__") and n not in patches
                  and n not in SITE_HELPERS and space.get(n, _MISSING) is not v)


def _put_back(before: dict[str, Any], patches: set[str]) -> None:
    """A refused setup: every builtin as it was before it (its patches of the module stay)."""
    space = vars(builtins)
    for name in [n for n in space if n not in before and n not in patches]:
        del space[name]
    for name, value in before.items():
        if name not in patches and space.get(name, _MISSING) is not value:
            space[name] = value
    _later.clear()


def _settle(before: dict[str, Any], patches: set[str], set_globals: dict[str, Any], dunders: set[str]) -> None:
    """After a setup ran (to its end or to the line that raised): record the names it
    defined (what :func:`_uninstall` takes away), and put back the ``__dunder__`` names
    running as ``__main__`` changed (``__name__``, ``__doc__``, exec's ``__builtins__``);
    the ``dunders`` the setup bound itself (``__version__``) are names of it as the others."""
    global _set_globals_version
    space = vars(builtins)
    for name in list(space):
        if name.startswith("__"):
            if name in dunders and name not in before:
                _installed[name] = _MISSING
            elif name not in before:
                del space[name]
            elif space[name] is not before[name]:
                space[name] = before[name]
        elif name not in patches and (name not in before or space[name] is not before[name]):
            _installed[name] = before.get(name, _MISSING)
    for name in SITE_HELPERS & before.keys():  # (``del exit``: put back with the setup's removal)
        if name not in space and name not in patches:
            _installed[name] = before[name]
    for name in [n for n in _later if n in _installed]:
        del _later[name]
    if set_globals or _SET_GLOBALS:
        _SET_GLOBALS.clear()
        _SET_GLOBALS.update(set_globals)
        _set_globals_version += 1


class _RecordingBuiltins(types.ModuleType):
    """The class of the builtins module while a setup runs: what is set as its
    attribute (``builtins.print = f``, by the setup or a library it imports) is
    a patch of the builtins, told from the names the setup's code binds in its
    namespace: a patch is neither refused nor taken away with the setup."""

    def __setattr__(self, name: str, value: Any) -> None:
        if _patches is not None:
            _patches.add(name)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if _patches is not None:
            _patches.add(name)
        super().__delattr__(name)


_patches: set[str] | None = None  # while a setup runs: the attributes set on the builtins module
# The names in the builtins' namespace when the installed setup had run, its own included (None: no
# setup installed). A name there at its removal that was not then, a setup function wrote later into
# its globals (``globals()[k] = v``, ``exec(src, globals())``): a name of the setup, taken away with
# it (:func:`_uninstall`) as a name it binds with ``global`` is.
_baseline: frozenset[str] | None = None


def _late_names() -> dict[str, Any]:
    """The names added to the builtins' namespace since the installed setup ran, other
    than with ``global`` (those are in :data:`_later`), each mapped to ``_MISSING``.

    Those a task's code sets on the builtins module then go too (a library's
    ``builtins.ic = ic`` in a task: nothing tells it from a setup function's
    ``globals()['ic'] = ic``, the two write the same dict), but not mpmagic's own
    (``display``, ``get_ipython``: a Dask task adds them where missing)."""
    if _baseline is None:
        return {}
    return {name: _MISSING for name, value in list(vars(builtins).items())
            if name not in _baseline and name not in _later and not _of_mpmagic(value)}


def _of_mpmagic(value: Any) -> bool:
    """Whether ``value`` is one of mpmagic's own (a function of its modules)."""
    try:
        return str(getattr(value, "__module__", "")).startswith("mpmagic.")
    except Exception:  # (an odd object whose attribute lookup raises: not ours)
        return False


@contextlib.contextmanager
def _in_builtins(patches: set[str]) -> Iterator[None]:
    """While a piece of the setup runs: the builtins module is ``sys.modules["__main__"]``,
    named ``"__main__"``, and records the attributes set on it in ``patches``.

    A notebook cell runs in ``__main__``, so the setup does too: its
    ``__name__`` is ``"__main__"`` (an ``if __name__ == "__main__":`` block
    runs, as in the notebook), the functions and classes it defines are of
    ``__main__`` (pickled by value, as the notebook's are: a task may return
    their instances), and what looks the module of a class up in
    ``sys.modules`` finds the setup's names (``@dataclass`` does, and failed
    with ``'NoneType' object has no attribute '__dict__'`` on a namespace
    that was no module). The worker's own ``__main__`` and the builtins'
    name are put back after.
    """
    global _patches
    space = vars(builtins)
    saved_main, saved_name = sys.modules.get("__main__"), space.get("__name__")
    sys.modules["__main__"] = builtins
    space["__name__"] = "__main__"
    _patches = patches
    builtins.__class__ = _RecordingBuiltins
    try:
        yield
    finally:
        builtins.__class__ = types.ModuleType
        _patches = None
        space["__name__"] = saved_name
        if saved_main is not None:
            sys.modules["__main__"] = saved_main


# The names ``site`` adds to the builtins for the interactive prompt (``python -S`` has none; IPython
# hides ``exit`` and ``quit`` while a cell runs, a worker has them): no library relies on them, so a
# setup may bind them as any name, as serially (``exit = False`` passed the notebook's check and was
# refused by every worker, whose builtins have site's ``exit``).
SITE_HELPERS = frozenset({"exit", "quit", "help", "copyright", "credits", "license"})


def is_builtin_name(name: str) -> bool:
    """Whether a setup binding ``name`` would replace a Python builtin (the same answer in the
    notebook and in every worker: ``site``'s interactive helpers are not counted, see
    :data:`SITE_HELPERS`)."""
    return name not in SITE_HELPERS and hasattr(builtins, name)


def shadowing(names: Any) -> list[str]:
    """The names among ``names`` a setup may not define: those of Python builtins.

    A setup's names become builtins of the worker process (see the module's
    docstring), so ``type = 'resnet50'`` or ``from numpy import *`` (``sum``,
    ``max``, ``round``...) would replace the real ones for all the code of the
    worker: mpmagic's own, multiprocessing's, Dask's, every library's.
    ``__dunder__`` names are checked by the notebook (:func:`dunder_shadowing`);
    nor is a name refused whose value (``names`` a dict) is that builtin itself
    (``from builtins import *``), nor one of ``site``'s helpers (``exit``...).
    """
    values = names if isinstance(names, dict) else {}
    return sorted(n for n in names if isinstance(n, str) and not n.startswith("__") and is_builtin_name(n)
                  and (n not in values or values[n] is not getattr(builtins, n)))


def shadow_message(names: list[str]) -> str:
    """Why a setup defining builtins' names is refused, and what to do (the end of one line)."""
    shown = ", ".join(f"`{n}`" for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return (f"it defines {shown}, {'names of Python builtins' if len(names) > 1 else 'the name of a Python builtin'}: "
            "a setup's names become builtins of the worker, so this would replace "
            f"{'those builtins' if len(names) > 1 else 'that builtin'} for all the code in the worker "
            "(mpmagic's, multiprocessing's, every library's), not only the notebook's functions; "
            "use another name (for a star import, import the module by name, e.g. `import numpy as np`)")


def _shadow_line(names: list[str], wid: Any) -> str:
    return (f"setup refused on worker {wid}: {shadow_message(names)}; "
            "the worker runs tasks without the setup until it is fixed and run again")


def _failure_line(exc: BaseException, entry: _Entry, wid: Any) -> str:
    """``setup failed on worker 3, %%pool setup, line 3 (`model = load(p)`): OSError: ...``
    (the line counted from the ``%%pool setup`` line, as IPython numbers the cell).

    The error as Python's traceback ends: ``KeyboardInterrupt`` without a message, and
    ``E: <exception str() failed>`` where its ``__str__`` raises (which, raised here,
    killed the worker: its setup's error was lost for "the worker died while running it").
    """
    where = entry.name if entry.kind == "func" else "%%pool setup"
    frames = traceback.extract_tb(exc.__traceback__)
    if entry.kind == "code":
        mine = [f for f in frames if f.filename == SETUP_FILENAME]
    else:  # (the function's frames: not this module's, nor those running it in its world)
        from . import context

        ours = {os.path.normcase(__file__), os.path.normcase(context.__file__)}
        mine = [f for f in frames if os.path.normcase(f.filename) not in ours]
    if mine:
        f = mine[-1] if entry.kind == "code" else mine[0]
        text = (f.line or "").strip()
        where += f", line {f.lineno}" + (f" (`{text}`)" if text else "")
    return (
        f"setup failed on worker {wid}, {where}: {debugging.exception_line(exc)} "
        "(the worker still runs tasks without it; fix the setup and run it again, %pool shows which workers are set up)"
    )


def _by_value_globals(func: Any) -> dict[str, Any] | None:
    """The globals dict of the notebook function ``func`` is (or wraps), if cloudpickle
    made it (a function pickled by value); None for a module's function or no function.

    Unwraps ``functools.partial`` (the usual port of ``initargs``), bound
    methods, and wrappers keeping the function as ``.func`` (``--seed``'s).
    A module's own function writes its module's globals, which that module's
    functions read in the worker anyway: nothing to carry over.
    """
    import functools
    import inspect

    for _ in range(8):
        if isinstance(func, functools.partial):
            func = func.func
        elif isinstance(func, types.MethodType):
            func = func.__func__
        elif isinstance(func, types.FunctionType):
            g = func.__globals__
            module = sys.modules.get(g.get("__name__", ""))
            return None if module is not None and getattr(module, "__dict__", None) is g else g
        elif callable(getattr(func, "__dict__", {}).get("func")):
            func = func.__dict__["func"]
        elif isinstance(inspect.getattr_static(type(func), "__call__", None), types.FunctionType):
            func = inspect.getattr_static(type(func), "__call__")
        else:
            return None
    return None


def use_set_globals(func: Any, displaced: dict[str, Any] | None) -> dict[str, Any] | None:
    """Give the notebook function ``func`` the values the setup's functions assigned with
    ``global`` (:data:`_SET_GLOBALS`) for the names its globals hold; returns what they
    displaced, to pass back at the next change of the setup (``displaced``: what an
    earlier call returned, put back first). None: nothing displaced.

    Why: ``Pool(initializer=init)``'s ``global model; model = ...`` is what its
    tasks read, also when the module defined ``model`` before (a default, the
    notebook's copy). Here cloudpickle sends the notebook's ``model`` with the
    task's function, into a globals dict of its own, so without this the
    notebook's value would silently win over the initializer's (migrate14).
    """
    g = _by_value_globals(func)
    if g is None:
        return None
    for name, value in (displaced or {}).items():
        g[name] = value
    out = {name: g[name] for name in _SET_GLOBALS if name in g}
    for name in out:
        g[name] = _SET_GLOBALS[name]
    return out or None


@functools.lru_cache(maxsize=64)  # (each failing item of a collect map asks again: its code's reads once)
def _global_reads(code: types.CodeType) -> frozenset[str]:
    """The global names ``code`` reads (its ``LOAD_GLOBAL`` / ``LOAD_NAME`` instructions)."""
    import dis

    return frozenset(i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"))


def note_notebook_value(exc: BaseException, func: Any) -> None:
    """A task of the notebook function ``func`` raised ``exc``: when the notebook
    function that raised it reads a name both the notebook and this worker's setup
    define, add one line saying the value it read was the notebook's, and how to
    read the setup's instead.

    Why: cloudpickle sends the notebook's values of the names a function reads,
    and those win over the setup's (as serially, where the notebook's function
    reads the notebook's). A ``MODEL = None`` left in the notebook under a
    ``%%pool setup`` loading ``MODEL`` failed with a bare ``TypeError: 'NoneType'
    object is not subscriptable``. Only the raising frame's own global reads
    count (the deepest frame running in ``func``'s globals): a function that
    also sends such a name but failed elsewhere gets no note. Not the names the
    setup's functions assigned with ``global``: the setup's values are those
    (:func:`use_set_globals`). Called on failures only: nothing on success.
    """
    if not _installed and not _later:
        return
    g = _by_value_globals(func)
    if g is None:
        return
    _note_hidden(exc, g, g, "function")


def note_notebook_value_in_cell(exc: BaseException, ns: dict[str, Any], sent: dict[str, Any]) -> None:
    """A ``%%parallel`` rank raised ``exc`` running in ``ns``: the line of
    :func:`note_notebook_value` when the raising code (the cell's, or a function it
    defined) reads a name of the notebook's ``sent`` with the cell that this worker's
    setup also defines. Only the notebook's names: one the cell binds itself is its
    own, as serially. A map task had that line, a cell's rank failed without it."""
    if not _installed and not _later:
        return
    _note_hidden(exc, ns, sent, "cell")


def _note_hidden(exc: BaseException, g: dict[str, Any], sent: dict[str, Any], what: str) -> None:
    """Add :func:`note_notebook_value`'s line to ``exc`` for the names the deepest raising
    frame running in globals ``g`` reads, that are the notebook's (in ``sent``, sent with
    the ``what``: "function" or "cell", and still that value: not rebound by the cell)
    and this worker's setup's too."""
    code = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals is g:
            code = tb.tb_frame.f_code
        tb = tb.tb_next
    if code is None:
        return
    space = vars(builtins)
    read = _global_reads(code)
    names = sorted(n for n in read if n in g and n in sent and g[n] is sent[n]  # (not one the cell bound itself)
                   and n in space and (n in _installed or n in _later)
                   and n not in _SET_GLOBALS and not n.startswith("__"))
    if not names:
        return
    shown = [(n, debugging._bounded_repr(g[n], 60)) for n in names]  # (a value's repr, cut: one line)
    said = (f"{names[0]} here is the notebook's ({shown[0][1]})" if len(names) == 1
            else " and ".join(f"{n} ({r})" for n, r in shown) + " here are the notebook's")
    from .errors import add_note

    add_note(exc, f"mpmagic: {said}, sent with the {what}, not the {_setup_called}'s: "
                  f"del {', '.join(names)} in the notebook to use the setup's")


def use_set_globals_in(names: dict[str, Any]) -> dict[str, Any]:
    """``names`` (a ``%%parallel`` cell's notebook names) with the setup's ``global`` values
    winning, as :func:`use_set_globals` does for a function's globals."""
    if not _SET_GLOBALS or _SET_GLOBALS.keys().isdisjoint(names):
        return names
    return {**names, **{k: v for k, v in _SET_GLOBALS.items() if k in names}}


def set_globals_version() -> int:
    """Changes whenever the setup's ``global`` values change (a loaded function applies them again)."""
    return _set_globals_version


def _uninstall() -> None:
    """Take the current setup's names out of the builtins (those its functions bound
    later with ``global`` too), putting back what they shadowed.

    The setup's own functions keep them (in their ``__builtins__``, see
    :func:`_own_builtins`): a wrapper it patched in (``builtins.print = myprint``
    reading ``_orig``) stays in running workers and goes on working, as serially,
    where the notebook keeps the names; tasks no longer see them."""
    global _set_globals_version, _shadow, _baseline
    space = vars(builtins)
    late = _late_names()
    _baseline = None
    for name, old in [*_installed.items(), *_later.items(), *late.items()]:
        if _shadow is not None and name in space:  # (as it is now: a global rebinding's value too)
            _shadow[name] = space[name]
        if old is _MISSING:
            space.pop(name, None)
        else:
            space[name] = old
    _installed.clear()
    _later.clear()
    _shadow = None
    if _SET_GLOBALS:  # (and the globals the setup's functions assigned: none any more)
        _SET_GLOBALS.clear()
        _set_globals_version += 1


# -- Dask -------------------------------------------------------------------

PLUGIN_NAME = "mpmagic-setup"


def _plugin_base() -> type:
    from distributed.diagnostics.plugin import WorkerPlugin

    return WorkerPlugin


# Where a setup's one-line note about a Dask worker death says what happened (dask_apply).
_DASK_KILLED = ("mpmagic: a Dask worker was killed while running the worker setup (its connection closed: {exc}; "
                "from outside, or out of memory); the setup stays in force: {where} "
                f"({KILLED_IN_A_ROW} deaths in a row in it switch it off)\n")
# How long dask_apply waits, after a worker died in the setup, for the cluster to have as many
# workers as before, all set up (the nanny starts one in the dead one's place); past it, the
# workers left are enough (a worker without a nanny is not started again).
DASK_REPLACEMENT_WAIT = 30.0
# The Dask worker whose setup the plugin runs in this thread (its event loop's): worker_id().
_dask_setting_up = threading.local()
_dask_shown: dict[tuple[str, int], None] = {}  # (Dask worker id, setup version) whose output was shown
_dask_pending: list[dict[str, Any]] | None = None  # a dask_apply's: setup events meanwhile (it shows them)


def make_plugin(msg: Setup, topic: str = "") -> Any:
    """A Dask ``WorkerPlugin`` that runs the setup in every worker, also those joining later.

    With ``topic`` (the notebook's event topic, ``DaskBackend._events_topic``), a
    worker whose setup printed or failed says so there (:func:`dask_event`): one that
    joined later or that its nanny started again after a death ran the setup with no
    notebook waiting for it, and what it printed was dropped."""

    class SetupPlugin(_plugin_base()):  # type: ignore[misc]
        name = PLUGIN_NAME

        def __init__(self, ver: int, data: bytes | None, topic: str) -> None:
            self.ver, self.data, self.topic = ver, data, topic

        def setup(self, worker: Any) -> None:
            _dask_plugin_setup(worker, self.ver, self.data, self.topic)

    return SetupPlugin(msg.version, msg.payload, topic)


def _dask_plugin_setup(worker: Any, ver: int, data: bytes | None, topic: str) -> None:
    """The plugin's ``setup`` on Dask worker ``worker`` (a module function: the plugin,
    a local class, is pickled by value with its globals, and this module's are not all
    picklable): run the setup there, keep its reply for :func:`dask_status`, and tell
    the notebook on ``topic`` what it printed or its error (:func:`dask_event`)."""
    _dask_setting_up.wid = worker.name  # (mpmagic.worker_id() in the setup: this worker's, as locally)
    try:
        reply = run_setup(ver, data, worker.name)
    finally:
        _dask_setting_up.wid = None
    worker._mpmagic_setup = reply  # read by dask_status()
    if reply.error:
        log.debug("%s", reply.error)  # the notebook reports it (dask_apply, dask_event)
    if topic and (reply.output or reply.error):
        try:
            worker.log_event(topic, {"mpmagic_setup": True, "id": worker.id, "version": reply.version,
                                     "worker": str(reply.worker), "output": reply.output,
                                     "error": reply.error, "address": worker.address})
        except Exception:  # (the scheduler's connection is gone: the worker is closing)
            log.debug("could not send the setup's output to the notebook", exc_info=True)


def dask_status(dask_worker: Any = None) -> SetupDone | None:
    """The setup reply of this Dask worker (run with ``client.run``)."""
    return getattr(dask_worker, "_mpmagic_setup", None)


def _dask_reply(dask_worker: Any = None) -> tuple[str, SetupDone | None]:
    """This Dask worker's id (one per process: a nanny's restart is a new one) and setup reply."""
    return str(getattr(dask_worker, "id", "")), dask_status(dask_worker)


def dask_state(reply: SetupDone | None) -> str:
    """``%pool``'s word for a Dask worker's setup reply."""
    if reply is None or reply.version != _version:
        return "setting up"
    return "setup failed" if reply.error else "set up"


def _dask_drop(dask_worker: Any = None) -> None:
    """On a Dask worker: remove the setup's names (the plugin is gone)."""
    run_setup(0, None, None)
    if dask_worker is not None:
        dask_worker._mpmagic_setup = None


def _dask_first_show(wid: str, ver: int) -> bool:
    """Under the lock: True the first time worker process ``wid``'s setup ``ver`` is shown."""
    if (wid, ver) in _dask_shown:
        return False
    _dask_shown[(wid, ver)] = None
    while len(_dask_shown) > _STATUS_KEPT:
        del _dask_shown[next(iter(_dask_shown))]
    return True


def dask_event(msg: Any) -> list[tuple[str, str]]:
    """A Dask worker's setup event (:func:`make_plugin`), from Dask's thread: the
    (text, stream) to hold for the next run's cell, as a local later worker's
    (``LocalBackend._say_setup_output``): what its setup printed, labelled
    ``[worker N]``, on stdout, and a failure's line (once, :func:`record`) on stderr.
    Empty: not a setup event, an older setup's, shown already, or a ``dask_apply``
    in the notebook's thread is running and shows it itself."""
    if not isinstance(msg, dict) or not msg.get("mpmagic_setup"):
        return []
    with _lock:
        if msg.get("version") != _version or not _entries:
            return []
        if _dask_pending is not None:
            _dask_pending.append(msg)
            return []
        if not _dask_first_show(str(msg.get("id")), _version):
            return []
    return _dask_said(msg)


def _dask_said(msg: dict[str, Any]) -> list[tuple[str, str]]:
    """:func:`dask_event`'s (text, stream) pairs of one worker's setup event."""
    reply = SetupDone(msg["version"], msg.get("worker"), msg.get("error"), [], msg.get("output") or "")
    said = []
    printed = take_output(reply)
    if printed:
        said.append((printed, "stdout"))
    failed = record(msg.get("address"), reply)
    if failed:
        said.append((failed, "stderr"))
    return said


def _dask_after_death(client: Any, ver: int, before: int) -> tuple[bool, dict[str, Any]]:
    """After a worker died running setup ``ver`` (the registration's connection closed):
    wait (:data:`DASK_REPLACEMENT_WAIT` at most) for the cluster to have ``before``
    workers again, every one done with it. (True, their replies) when they are, or
    when the time is up with every worker left done; (False, ...) when workers go on
    dying in it (a worker that died while asked counts): :data:`KILLED_IN_A_ROW`
    deaths in a row, the first included, are the setup's own doing, as locally."""
    deaths, deadline = 1, time.monotonic() + DASK_REPLACEMENT_WAIT
    while True:
        try:
            replies = client.run(_dask_reply, on_error="return")
        except OSError:  # (the scheduler lost a worker while it asked: one more death)
            replies = {"": OSError("closed")}
        died_now = [a for a, r in replies.items() if isinstance(r, BaseException)]
        if died_now:
            deaths += 1
            if deaths >= KILLED_IN_A_ROW:
                return False, {}
        answered = {a: r for a, r in replies.items() if not isinstance(r, BaseException)}
        done = bool(answered) and not died_now and all(r[1] is not None and r[1].version == ver
                                                       for r in answered.values())
        if done and (len(answered) >= before or time.monotonic() > deadline):
            return True, answered
        if time.monotonic() > deadline:
            return False, {}
        time.sleep(0.1)


def dask_apply(client: Any, topic: str = "") -> list[str]:
    """Install the current setup on a Dask cluster as a plugin (also for workers joining
    later; with ``topic``, they tell the notebook what they printed, :func:`dask_event`);
    the one-line errors of the workers where it failed.

    A worker that dies while running it closes the registration's connection. Its nanny
    starts another in its place, which runs the setup: when it finishes, the death was
    no doing of the setup's (a ``kill``, the OOM killer) and the setup stays in force, in
    one line (:func:`_dask_after_death`; before, any such death unregistered it, and
    every worker ran without it). When the workers go on dying in it, it is unregistered."""
    global _dask_pending
    msg = message()
    if msg is None:
        return []
    if msg.payload is None:
        dask_remove(client)
        return []
    with _lock:
        _dask_pending = []
    try:
        return _dask_register(client, msg, topic)
    finally:
        with _lock:
            pending, _dask_pending = _dask_pending or [], None
        for event in pending:  # (a worker's setup ended while this one's cell waited: shown here)
            with _lock:
                first = event.get("version") == _version and _dask_first_show(str(event.get("id")), _version)
            for text, stream in _dask_said(event) if first else []:
                (sys.stdout if stream == "stdout" else sys.stderr).write(text)


def _dask_register(client: Any, msg: Setup, topic: str) -> list[str]:
    """:func:`dask_apply`'s registration and its workers' replies (output shown, errors returned)."""
    try:
        before = len(client.run(dask_status))
    except Exception:  # (a worker lost while asked: the count of the others)
        log.debug("could not count the Dask workers", exc_info=True)
        before = 0
    try:
        client.register_plugin(make_plugin(msg, topic), name=PLUGIN_NAME)
        replies = client.run(_dask_reply)
    except OSError as exc:  # (CommClosedError) a worker died running it: the nanny restarts one into it
        log.debug("setup plugin registration failed", exc_info=True)
        kept, replies = _dask_after_death(client, msg.version, before)
        if not kept:
            dask_remove(client)
            return [f"setup failed on the Dask workers: a worker died while running it (its connection closed: "
                    f"{type(exc).__name__}), and so did its replacements; the setup was unregistered from the "
                    "cluster, so its workers (and those the nanny restarts) run without it (fix it and run "
                    "%%pool setup again)"]
        where = ("the worker the nanny started in its place ran it" if len(replies) >= before
                 else f"the {len(replies)} workers left ran it")
        sys.stderr.write(_DASK_KILLED.format(exc=type(exc).__name__, where=where))
    errors = []
    for addr, (wid, reply) in replies.items():
        if reply is not None:
            record(addr, reply)
            with _lock:
                first = _dask_first_show(wid, reply.version) if wid else True
            shown = take_output(reply) if first else None  # (collected by an explicit %%pool setup; else its cell's)
            if shown:
                sys.stdout.write(shown)
            if reply.error:
                errors.append(reply.error)
    return errors


def dask_remove(client: Any) -> None:
    """Remove the setup plugin and its names from the cluster's workers (switching away)."""
    try:
        client.unregister_worker_plugin(PLUGIN_NAME)
    except Exception:  # never registered (a plugin name unknown to the scheduler)
        log.debug("no setup plugin to remove", exc_info=True)
        return
    try:
        client.run(_dask_drop)
    except Exception:
        log.debug("could not drop setup names on the Dask workers", exc_info=True)


__all__ = ["worker_id", "set_code", "add_function", "clear", "describe", "message", "run_setup"]
