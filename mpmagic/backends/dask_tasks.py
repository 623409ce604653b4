"""What runs inside a Dask worker for mpmagic. It imports no IPython.

Dask pickles a task's function by reference, so the function every mpmagic
task runs must live in a module the workers can import: this one. It takes
the same packed message a local worker gets (``protocol.pack(job.message(unit))``)
and answers with the same packed replies (``mpmagic/protocol.py``), so
``jobs.py`` cannot tell the backends apart:

* the notebook function travels once per worker (its payload bytes are the
  result of a :func:`hold` task every chunk depends on); the loaded function
  is cached here by its content key, so later chunks only name it (one a
  task can change is loaded again for each new call: see ``_function``);
* map chunks and cells run through the very functions a local worker uses
  (:func:`mpmagic.worker.execute_map`, :func:`mpmagic.worker.execute_cell`);
* what a task prints is captured per thread (a Dask worker may run several
  tasks at once) and streamed home in whole lines as Dask events
  (``log_event``); the rest comes back with the result as ``Out`` messages,
  with the count of lines already streamed so the notebook can wait for
  stragglers. The capture is installed in ``sys.stdout``/``sys.stderr`` only
  while at least one mpmagic task runs in the process, and the streams found
  there are put back after: a worker of a cluster we do not own is left as
  it was.
* the notebook's world (``mpmagic/context.py``: directory, environment,
  ``sys.path``, recursion limit, warnings filters) is applied only on the
  ``LocalCluster`` mpmagic started (same machine, its own processes), where
  the notebook sends it with each task; a cluster mpmagic connected to is
  shared and may be on other machines, and gets none of it.
* every task logs a start event and, whatever happens, an end event: the
  notebook knows when a task it gave up on (timeout, interrupt) frees its
  worker thread, and sends no new work there meanwhile. Each process also
  keeps the tags of the tasks it runs (:func:`running_tags`): the notebook asks
  for them when an end event is late (a lost event must not mark a worker busy
  for good).
* the user's modules the notebook reloaded (``importlib.reload``,
  ``%autoreload``) are reloaded here too, before the task runs, once per worker
  process and in the notebook's order: each task carries the notebook's list
  (``warmup.Reloads.for_tasks``), and :func:`follow_reloads` reloads those this
  process has not followed yet (a Dask worker takes no message between tasks,
  as a local worker takes ``Reload``). A worker whose copy of such a file
  differs from the notebook's (another machine), or that could not reload it,
  says so with its reply.
* the user's modules a task reaches are those the notebook loaded: each task
  carries the digest of each one's file as the notebook loaded it
  (``warmup.Reloads.loaded_for_tasks``), and :func:`follow_versions` reloads one
  this process loaded from another version (a cluster outlives the kernel that
  had it import the module) when the file here is the notebook's, and says with
  the reply when it is not (those results are then not checkpointed).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import io
import logging
import signal
import sys
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .. import context, loadstamps, payload_cache, seeding, task_builtins, worker_logging
from ..protocol import Cell, Context, Map, Out, ProtocolError, pack, unpack
from ..warmup import ImportLog
from ..worker import Loaded, execute_cell, execute_map

_FLUSH_INTERVAL = 0.1  # seconds between streamed output events of one task
_funcs: OrderedDict[Any, Loaded] = OrderedDict()  # by key, or (key, call) for a stateful function
_funcs_lock = threading.Lock()
# Tasks running in this process now: tag -> the address of the worker running it
# (an in-process cluster has several workers in one process). The notebook asks
# for them (:func:`running_tags`) when a task it gave up on sent no end event.
_running: dict[Any, str | None] = {}
_running_lock = threading.Lock()
log = logging.getLogger("mpmagic")


# --------------------------------------------------------------------------
# Output: per-thread capture of sys.stdout / sys.stderr


class _TaskOutput:
    """The captured output of one running task, streamed as Dask events.

    stdout and stderr are held in one list in the order they were written and
    go out in that order (held per stream, a task's stderr line came before
    stdout lines printed earlier, as on the local pool before the same fix).
    """

    def __init__(self, topic: str | None, tag: Any) -> None:
        self.topic = topic
        self.tag = tag
        self.worker = _current_worker()  # the flusher thread has no worker context
        self.parts: list[tuple[str, str]] = []  # (stream, text), as written
        self.last = time.monotonic()
        self.streamed = 0
        self.lock = threading.Lock()

    def write(self, stream: str, text: str) -> None:
        with self.lock:
            self.parts.append((stream, text))
            if "\n" in text and self.topic and time.monotonic() - self.last > _FLUSH_INTERVAL:
                self._stream_lines()

    def _runs(self) -> list[tuple[str, str]]:
        """The parts with consecutive writes to one stream joined."""
        runs: list[tuple[str, str]] = []
        for stream, text in self.parts:
            if runs and runs[-1][0] == stream:
                runs[-1] = (stream, runs[-1][1] + text)
            else:
                runs.append((stream, text))
        return runs

    def _stream_lines(self) -> None:
        """Send the complete lines, in write order; a stream's unfinished line
        waits, joined to what that stream writes next."""
        ready: list[tuple[str, str]] = []
        partial: dict[str, str] = {}
        for stream, text in self._runs():
            text = partial.pop(stream, "") + text
            cut = text.rfind("\n") + 1
            if cut:
                ready.append((stream, text[:cut]))
            if cut < len(text):
                partial[stream] = text[cut:]
        unsent: list[tuple[str, str]] = []
        for stream, text in ready:
            if not unsent and _log_event(self.topic, {"tag": self.tag, "stream": stream, "text": text}, self.worker):
                self.streamed += 1
            else:  # not in a Dask worker: kept, in order, for the reply
                unsent.append((stream, text))
        self.parts = unsent + list(partial.items())
        self.last = time.monotonic()

    def flush_due(self) -> None:
        """Stream complete lines that waited out the rate limit (flusher thread)."""
        with self.lock:
            if self.topic and time.monotonic() - self.last > _FLUSH_INTERVAL:
                if any("\n" in text for _, text in self.parts):
                    self._stream_lines()

    def rest(self) -> list[tuple[str, str]]:
        """What was not streamed yet, in write order, to travel home with the result."""
        with self.lock:
            out = [(s, t) for s, t in self._runs() if t]
            self.parts = []
            return out


class _ThreadRouter(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` stand-in: a task thread's writes go to its
    :class:`_TaskOutput`, every other thread's to the real stream."""

    def __init__(self, stream: str, real: Any) -> None:
        self.stream = stream
        self.real = real
        self.captures: dict[int, _TaskOutput] = {}

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        cap = self.captures.get(threading.get_ident())
        if cap is None:
            return self.real.write(s)
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        cap.write(self.stream, s)
        return len(s)

    def flush(self) -> None:
        if threading.get_ident() not in self.captures:
            try:
                self.real.flush()
            except Exception:
                log.debug("mpmagic: flushing the worker's own stream failed", exc_info=True)

    def fileno(self) -> int:
        """The Dask worker's own stream's fd: bytes written there (``faulthandler``,
        a subprocess given ``sys.stdout``) go to the worker's log or terminal, not home."""
        return self.real.fileno()

    # As the local pool's worker stream (worker._StreamToParent): what code that
    # works serially in the notebook reads.
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return getattr(self.real, "errors", None) or "strict"

    @property
    def name(self) -> str:
        return f"<{self.stream}>"

    def isatty(self) -> bool:
        return False


_install_lock = threading.Lock()
_installed: tuple[_ThreadRouter, _ThreadRouter] | None = None  # while tasks run
_active = 0  # mpmagic tasks running in this process


_flusher: threading.Thread | None = None


def _flush_loop() -> None:
    """Stream lines a task printed and then went quiet after (a long computation)."""
    while True:
        time.sleep(_FLUSH_INTERVAL)
        routers = _installed
        if routers is None:
            continue
        for output in list(routers[0].captures.values()):
            try:
                output.flush_due()
            except Exception:
                log.debug("mpmagic: streaming a task's output failed", exc_info=True)


def _enter_routers() -> tuple[_ThreadRouter, _ThreadRouter]:
    """Install the routers for one more running task (the first task installs them)."""
    global _flusher, _installed, _active
    with _install_lock:
        if _flusher is None:
            _flusher = threading.Thread(target=_flush_loop, name="mpmagic-output", daemon=True)
            _flusher.start()
        if _installed is None:
            # A task's own threads write to the worker's streams, not home: their
            # warnings and records are not a task's here (see worker_logging).
            worker_logging.THREADS_HOME = False
            # The worker may be the user's own, serving others after mpmagic's calls:
            # our logging and warnings hooks are in place only while units run.
            worker_logging.HOOKS_PER_UNIT = True
            _installed = (_ThreadRouter("stdout", sys.stdout), _ThreadRouter("stderr", sys.stderr))
            sys.stdout, sys.stderr = _installed
        _active += 1
        return _installed


def _exit_routers() -> None:
    """One task fewer; the last one puts the worker's own streams back.

    A stream someone else replaced ours with in the meantime stays theirs.
    """
    global _installed, _active
    with _install_lock:
        _active -= 1
        if _active or _installed is None:
            return
        out, err = _installed
        if sys.stdout is out:
            sys.stdout = out.real
        if sys.stderr is err:
            sys.stderr = err.real
        _installed = None


class _capture:
    """Route this thread's prints into a :class:`_TaskOutput` while a task runs."""

    def __init__(self, topic: str | None, tag: Any) -> None:
        self.output = _TaskOutput(topic, tag)

    def __enter__(self) -> _TaskOutput:
        self.routers = _enter_routers()
        ident = threading.get_ident()
        for r in self.routers:
            r.captures[ident] = self.output
        return self.output

    def __exit__(self, *exc: Any) -> None:
        ident = threading.get_ident()
        for r in self.routers:
            r.captures.pop(ident, None)
        _exit_routers()


def _current_worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except Exception:
        return None


def _log_event(topic: str | None, msg: dict, worker: Any = None) -> bool:
    worker = worker or _current_worker()
    if not topic or worker is None:
        return False
    try:
        worker.log_event(topic, msg)
        return True
    except Exception:
        return False


def _item_starts(topic: str | None, tag: Any) -> Callable[[int], None]:
    """A task's ``started`` for ``worker.run_items`` (a chunk of several items under
    a --timeout, ``Map.item_clock``): an event as each item begins, so the notebook
    times each item, not the chunk, and names the one that ran past the timeout
    (Dask can neither stop nor ask a running task). Runs without a timeout send none."""
    worker = _current_worker()

    def started(index: int) -> None:
        _log_event(topic, {"tag": tag, "item": index}, worker)

    return started


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:
        return None


# --------------------------------------------------------------------------
# The task


def hold(data: bytes) -> bytes:
    """The function payload as a task result: every chunk depends on it, so each
    worker fetches it once, and Dask recomputes it if its holders die."""
    return data


def _function(key: bytes, data: bytes, imports: ImportLog, call: Any) -> Any:
    """The notebook function for ``key``, loaded from ``data`` on first use
    (the time it took, its imports included, noted in ``imports``), and again
    for a new ``call`` if a task can change its state (see :class:`mpmagic.worker.Loaded`:
    each call starts from the notebook's state; the tasks of one call, on
    this worker's threads, share one copy). A stateful function is kept per
    call (``(key, call)``), at most ``_COPIES_PER_FUNCTION`` calls' copies: a
    background run and a foreground run of it at once each keep their own,
    instead of loading it again at every switch."""
    with _funcs_lock:
        loaded = _cached(key, call)
        if loaded is not None:
            return loaded.ready()
    with imports.watching("function"):
        fresh = Loaded.load(data)
    with _funcs_lock:
        loaded = _cached(key, call)  # another thread of this call loaded it meanwhile
        if loaded is not None:
            return loaded.ready()
        fresh.call = call
        if fresh.data is None:  # stateless: one copy serves every call
            _funcs[key] = fresh
        else:
            _funcs[(key, call)] = fresh
            copies = [k for k in _funcs if type(k) is tuple and k[0] == key]
            for old in copies[:-_COPIES_PER_FUNCTION]:  # (oldest first)
                del _funcs[old]
        for old in payload_cache.excess(_funcs, Loaded.nbytes):  # (the least recently used first)
            del _funcs[old]
        return fresh.ready()


_COPIES_PER_FUNCTION = 2  # calls of one stateful function that keep a copy each (see _function)


def forget(keys: list[bytes]) -> None:
    """Drop the loaded functions of these payload keys, a stateful one's copies too.

    The notebook's cache dropped them (the function was defined again, a global it
    captures rebound: ``payload_cache.retired_since``); each copy holds all its
    function captured by value, and no later task names it (one that does loads it
    again from its payload). Run on every worker by ``Client.run``."""
    gone = set(keys)
    with _funcs_lock:
        for k in [k for k in _funcs if (k[0] if type(k) is tuple else k) in gone]:
            del _funcs[k]


def _cached(key: bytes, call: Any) -> Loaded | None:
    """The loaded function for ``key`` in ``call``, if kept (under ``_funcs_lock``)."""
    loaded = _funcs.get(key)  # a stateless one
    if loaded is None or loaded.stale(call):
        loaded = _funcs.get((key, call))
        if loaded is None:
            return None
        _funcs.move_to_end((key, call))
    else:
        _funcs.move_to_end(key)
    loaded.call = call
    return loaded


_reload_lock = threading.Lock()
# (notebook, module) -> the load number of that notebook's reload this process has followed:
# per notebook, since a worker process may serve two, whose load numbers are unrelated
# (keyed by module alone, the two notebooks' tasks in turn reloaded it on every task)
_followed: dict[tuple[str, str], int] = {}


# A module whose reload here failed: what follow_reloads and follow_versions return for it, with
# the names of the modules whose file differs: (name, the reload's error on one line).
Failed = tuple[str, str]

# module name -> (its __spec__ after a reload here that failed, the error on one line): that module
# still runs the version it had, although its __spec__ (and loadstamps' record) is the new file's
_reload_failed: dict[str, tuple[Any, str]] = {}


def _reload(name: str, imports: ImportLog) -> bool:
    """Reload ``name`` (imported here); True if it was, else its failure noted in :data:`_reload_failed`."""
    if not imports.reload([name]):
        _reload_failed.pop(name, None)
        return True
    if name in imports.errors:  # (no error: no module to reload, zipp's overlay, nothing to say)
        _reload_failed[name] = (getattr(sys.modules.get(name), "__spec__", None), imports.errors[name])
    return False


def _failed_reload(name: str, module: Any) -> str | None:
    """The error of the failed reload ``module`` (``sys.modules[name]`` here) stands on, or None."""
    record = _reload_failed.get(name)
    if record is None or module is None or record[0] is not getattr(module, "__spec__", None):
        return None
    return record[1]


def entry_name(entry: str | Failed) -> str:
    """The module an entry of a task's ``differs`` names (see :data:`Failed`)."""
    return entry if isinstance(entry, str) else entry[0]


def follow_reloads(reloads: Any, imports: ImportLog) -> list[str | Failed]:
    """Reload here the user's modules the notebook reloaded that this worker process
    has not followed yet, in the order given (the notebook's: ``m1`` does ``from m2
    import g``); return the names of those whose file here differs from the one the
    notebook loaded (a worker on another machine runs its own copy), and as
    ``(name, error)`` those whose file is the notebook's but whose reload failed
    here (they run the version this process had: not the notebook's code either).

    ``reloads`` is ``warmup.Reloads.for_tasks()``: ``(module, (notebook, load number),
    digest)``. A module this process has not imported is only noted (its first
    import reads the file as it is now); one imported at a time nobody knows (by
    another task, a worker plugin) is reloaded once. The cached functions are
    dropped: one pickled by reference is the old module's. Under a lock, so the
    first of several tasks running at once reloads and the others wait for it.
    Per task, when nothing is new: a dict lookup per reloaded module.
    """
    if not reloads or all(_followed.get((version[0], name)) == version[1] for name, version, _ in reloads):
        return []
    differs: list[str | Failed] = []
    with _reload_lock:
        todo = [(name, version, digest) for name, version, digest in reloads if _newer(name, version)]
        reloaded = False
        for name, version, digest in todo:
            module = sys.modules.get(name)
            if module is not None and _reload(name, imports):  # (a failure is one line of the log)
                reloaded = True
            _followed[(version[0], name)] = version[1]
            failed = _failed_reload(name, sys.modules.get(name))
            if digest is not None:
                path = getattr(sys.modules.get(name), "__file__", None) or _source_file(name)
                if path is not None and loadstamps.digest(path) != digest:
                    differs.append(name)
                    continue
            if failed is not None:
                differs.append((name, failed))
        if reloaded:
            with _funcs_lock:
                _funcs.clear()
    return differs


# module name -> (the notebook's digest of it, this process's module's __spec__ then, whether this process
# runs another version: True, or the error of its failed reload): what follow_versions found, for as long as neither changes
_checked: dict[str, tuple[str, Any, bool | str]] = {}  # (the third: the failed reload's error, see Failed)
_digests: dict[str, tuple[tuple[int, int] | None, str | None]] = {}  # file -> (its stat, its digest then)


def follow_versions(versions: Any, imports: ImportLog) -> tuple[list[str], list[str | Failed]]:
    """Bring this worker process's user modules to the versions the notebook loaded, before a task.

    ``versions`` is ``warmup.Reloads.loaded_for_tasks()``: ``(module, digest of the file the
    notebook loaded)``, a module after those it imports. Why: the worker processes of a cluster
    mpmagic connects to outlive the kernel. One that imported ``mymod`` for an earlier kernel
    (or for this one, before an edit) kept that version, and the notebook's reloads, which
    :func:`follow_reloads` replays, never named it: a new kernel's ``%pmap`` ran the old code
    and ``--checkpoint`` stored its results under the new file's key.

    A module this process loaded (loadstamps notes its file's stat at each load and reload
    here too, as ``import mpmagic`` does anywhere) from the notebook's version is left alone;
    one it loaded from another version (or at a time nobody knows: once) is reloaded when the
    file here is the notebook's. Returns ``(reloaded, differs)``: the modules reloaded, and
    those this process runs (or, not imported yet, will import) from a file that is not the
    notebook's (another machine's copy), or as ``(name, error)`` whose reload here failed
    (it runs the version it had): this task's results are not the notebook's code's. Per task, when nothing changed: two dict lookups per module.
    """
    if not versions:
        return [], []
    modules = sys.modules
    differs: list[str | Failed] = []
    for name, digest in versions:
        seen = _checked.get(name)
        if seen is None or seen[0] != digest or seen[1] is not getattr(modules.get(name), "__spec__", None):
            break
        if seen[2]:
            differs.append(name if seen[2] is True else (name, seen[2]))
    else:
        return [], differs
    reloaded: list[str] = []
    differs = []
    with _reload_lock:
        for name, digest in versions:
            module = modules.get(name)
            seen = _checked.get(name)
            if seen is None or seen[0] != digest or seen[1] is not getattr(module, "__spec__", None):
                seen = _check_version(name, digest, module, imports, reloaded)
            if seen[2]:
                differs.append(name if seen[2] is True else (name, seen[2]))
        if reloaded:
            with _funcs_lock:
                _funcs.clear()  # (a function pickled by reference is the old module's)
    return reloaded, differs


def _check_version(name: str, digest: str, module: Any, imports: ImportLog, reloaded: list[str]) -> tuple:
    """:func:`follow_versions` for one module whose state here is not known yet (under the lock).

    An entry of ``sys.modules`` here that is no module (zipp's overlay, a namespace holding
    the standard library's zipfile.py, as the notebook's) was loaded from no file of the
    user's: left alone, never said to differ (its failed reload printed a traceback, and the
    cell's values were not checkpointed). A module whose reload fails still runs the version
    it had (one line of the log says so): its results are not the notebook's code's, and its
    entry holds the reload's error (the line in the cell says why, not that the file differs:
    the file here is the notebook's)."""
    seen: tuple[str, Any, bool | str]
    if module is not None and not isinstance(module, types.ModuleType):
        seen = _checked[name] = (digest, getattr(module, "__spec__", None), False)
        return seen
    path = getattr(module, "__file__", None) if module is not None else _source_file(name)
    on_disk = _file_digest(path)
    if module is not None and _loaded_digest(name, module) != digest and on_disk == digest:
        if _reload(name, imports):  # (a failure is one line of the log: the task shows its own error)
            reloaded.append(name)
        module = sys.modules.get(name)
    failed = _failed_reload(name, module)
    other: bool | str
    if module is None:  # its first import here reads the file as it is
        other = on_disk is not None and on_disk != digest
    elif failed is not None and on_disk == digest:
        other = failed
    else:
        other = _loaded_digest(name, module) != digest
    seen = _checked[name] = (digest, getattr(module, "__spec__", None), other)
    return seen


def _loaded_digest(name: str, module: Any) -> str | None:
    """The digest of the file this process loaded ``module`` from, None when not known (loaded
    before mpmagic was imported here, or its file changed since, or its reload failed)."""
    at_load = loadstamps.loaded(name, module)
    path = getattr(module, "__file__", None)
    if at_load is None or _failed_reload(name, module) is not None or loadstamps.stamp(path) != at_load[0]:
        return None
    return _file_digest(path)


def _file_digest(path: str | None) -> str | None:
    """A file's content digest, read again only when its stat changed (None: no such file)."""
    if path is None:
        return None
    at = loadstamps.stamp(path)
    known = _digests.get(path)
    if known is None or known[0] != at:
        known = _digests[path] = (at, loadstamps.digest(path) if at is not None else None)
    return known[1]


def _newer(name: str, version: tuple[str, int]) -> bool:
    """Is this reload one this process has not followed for that notebook? (A notebook
    seen here for the first time: once, as for a module imported at a time nobody knows.)"""
    seen = _followed.get((version[0], name))
    return seen is None or seen < version[1]


def _source_file(name: str) -> str | None:
    """Where this worker would import ``name`` from, without importing anything."""
    parent, _, _ = name.rpartition(".")
    path = getattr(sys.modules.get(parent), "__path__", None) if parent else None
    if parent and path is None:
        return None
    try:
        spec = importlib.machinery.PathFinder.find_spec(name, path)
    except Exception:
        return None
    origin = getattr(spec, "origin", None)
    return origin if isinstance(origin, str) else None


_context_lock = threading.Lock()
_context_seen: tuple[int, Any] | None = None  # (context version, call) last adopted here


def _adopt_context(msg: Context, call: Any) -> None:
    """The notebook's world in this worker process, as a local worker adopts it:
    loaded when its version is new, put back at the start of each new call
    (a task of an earlier call may have changed it), and its per-thread library
    settings in every task's own thread and context. The variables Dask's
    nanny sets for its workers (thread caps) stay the worker's own."""
    global _context_seen
    with _context_lock:
        if _context_seen is None:
            import dask.config

            for name in ("distributed.nanny.pre-spawn-environ", "distributed.nanny.environ"):
                context.own_env.update(dask.config.get(name, None) or {})
        if _context_seen is None or _context_seen[0] != msg.version:
            context.apply(msg)
        elif _context_seen[1] != call:
            context.reassert()
        _context_seen = (msg.version, call)
    context.reassert_libraries()  # (in this task's thread and context)


def run_message(
    data: bytes, func_payload: bytes | None, topic: str | None, tag: Any, world: Context | None = None,
    reloads: Any = (), versions: Any = (),
) -> tuple[int, list[bytes], list[str | Failed], list[str]]:
    """Run one unit of a job in this Dask worker; return its packed replies.

    ``data`` is ``protocol.pack(job.message(unit))``, a ``Map`` or ``Cell``;
    ``func_payload`` the function's bytes (a future of the :func:`hold` task
    on the notebook side, its bytes here); ``topic`` the Dask event topic that
    streams output and the start and end signals; ``tag`` the task's key;
    ``world`` the notebook's context (only on the cluster mpmagic started,
    see the module's docstring); ``reloads`` the modules the notebook reloaded
    (:func:`follow_reloads`); ``versions`` the user modules the task reaches, with the
    digest of the file the notebook loaded (:func:`follow_versions`). Returns ``(lines
    streamed, [Out..., reply], differs, reloaded)``, every message packed as a local worker
    packs it; the reply is a ``Done``, ``Error`` or ``Unpicklable``; ``differs`` the modules
    this process runs from a file that is not the one the notebook loaded (the results are
    not the notebook's code's), or as ``(name, error)`` whose reload failed here,
    ``reloaded`` those it reloaded because it had loaded another
    version than the notebook's.
    """
    msg = unpack(data)
    if type(msg) not in (Map, Cell):
        raise ProtocolError(f"a Dask task runs Map or Cell messages, not {type(msg).__name__}")
    with _running_lock:
        _running[tag] = _worker_address()
    _log_event(topic, {"tag": tag, "start": True})
    try:
        return _run(msg, func_payload, topic, tag, world, reloads, versions)
    finally:  # (an abandoned task's thread is free again: see the module's docstring)
        with _running_lock:
            _running.pop(tag, None)
        _log_event(topic, {"tag": tag, "end": True})


_seeds_call: list[Any] = [None]  # the call of the last task here (_random_states_back)


def _random_states_back(call: Any) -> None:
    """The first task of a new call here: this worker's own random states again, after a
    --seed call's items left them on their streams (seeding.restore), as a local worker
    puts them back at its next call: the next unseeded call went on with those streams."""
    with _context_lock:
        if _seeds_call[0] != call:
            _seeds_call[0] = call
            seeding.restore()


def running_tags(dask_worker: Any = None) -> list[Any]:
    """The tags of the mpmagic tasks this worker runs now, for ``Client.run``.

    The notebook asks when it marked a worker busy with a task it gave up on
    and that task's end event has not come: it never comes if the notebook's
    client reconnected meanwhile (its topic subscription is not renewed) or
    the event was lost on the way. Without this, the worker stayed "busy" for
    the rest of the session."""
    address = getattr(dask_worker, "address", None)
    with _running_lock:
        return [tag for tag, where in _running.items() if address is None or where in (address, None)]


def _run(
    msg: Any, func_payload: bytes | None, topic: str | None, tag: Any, world: Context | None, reloads: Any,
    versions: Any,
) -> tuple[int, list[bytes], list[str | Failed], list[str]]:
    _random_states_back(msg.call)
    if world is not None:
        _adopt_context(world, msg.call)  # (first: its sys.path is where the reloaded modules are found)
    imports = ImportLog()
    differs = follow_reloads(reloads, imports)
    reloaded, other = follow_versions(versions, imports)  # (after the notebook's reloads: they come first)
    named = {entry_name(entry) for entry in differs}
    differs += [entry for entry in other if entry_name(entry) not in named]
    where = _worker_address()
    cpu0 = time.thread_time()  # this thread's: other tasks may run in the process at once

    def cpu() -> float:
        return time.thread_time() - cpu0

    # One-time costs of this task alone (the function's first loading, the
    # imports it caused) go home in its reply's meta["once"]. Several tasks may
    # run at once in a Dask worker: an import another thread caused meanwhile
    # can be counted here too (no warm-up is sent to a cluster: see warmup.py).
    task_builtins.install()  # display() and get_ipython() for notebook code (where missing)
    task_builtins.no_console()  # input() and breakpoint(): a line saying why, not pdb on a task's thread
    with _capture(topic, tag) as out:
        if type(msg) is Map:
            func = _function(msg.key or b"", func_payload or b"", imports, msg.call)
            # A position word, as a local worker has (nobody reads it here): items
            # then run as there, so a StopIteration comes back with its value,
            # cause and frame (the no-position path's map() swallows it).
            position = ctypes.c_int64(-1)
            started = _item_starts(topic, tag) if msg.item_clock else None
            reply = execute_map(msg, func, where, cpu, position=position, imports=imports, started=started)
        else:
            reply = execute_cell(msg, where, cpu, imports)
    rest = [pack(Out(msg.call, msg.tag, stream, text)) for stream, text in out.rest()]
    return out.streamed, rest + [pack(reply)], differs, reloaded


# --------------------------------------------------------------------------
# Worker set-up for clusters mpmagic starts itself


def ignore_sigint() -> None:
    """Make this worker process ignore SIGINT.

    The worker processes of a ``LocalCluster`` share the kernel's process
    group, and Jupyter's "interrupt kernel" signals the whole group: without
    this, an interrupt would kill them instead of cancelling the futures.
    Runs on the worker's event loop, which is its main thread.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


try:
    from distributed.diagnostics.plugin import WorkerPlugin

    class IgnoreSigint(WorkerPlugin):
        """Applies :func:`ignore_sigint` to every worker, restarted ones included."""

        name = "mpmagic-ignore-sigint"

        def setup(self, worker: Any) -> None:
            ignore_sigint()

except ImportError:  # pragma: no cover - only imported where distributed is
    IgnoreSigint = None  # type: ignore[assignment,misc]
