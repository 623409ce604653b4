"""The one managed pool of a notebook: which backend, and its lifecycle.

There is one current backend per process. It is created on first use (or by
``start_pool``), reused by every call while it is warm, switched between the
local processes and a Dask cluster with ``use_local`` / ``use_dask``, and
stopped at unload and interpreter exit. What ``%pool`` shows is formatted
by ``status.PoolStatus``.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from . import exiting
from .backends.base import Backend
from .backends.local import (
    LocalBackend,
    check_rank_count,
    check_start_method,
    check_tasks_per_child,
    kill_group,
    pool_size,
)
from .checks import keyword_names, real, unexpected_keyword, whole
from .engine import sigint_deferred
from .errors import UsageError, one_line, one_line_interrupt
from .fmt import fmt_seconds
from .shared import base as _shared_base
from .status import PoolStatus  # formatting lives in status.py; importable from here as before

_lock = threading.RLock()
_backend: Backend | None = None


def get_pool(workers: int | None = None, start_method: str | None = None) -> Backend:
    """The current backend, created (not yet started) on first use: a local pool
    of ``workers`` (None: one per usable CPU) started by ``start_method`` (None:
    the platform's default), both used only when it is created."""
    with _lock:
        if _backend is None:
            return _made(LocalBackend(workers, start_method, max_memory=_max_memory))
        return _backend


def check_run_workers(workers: int) -> None:
    """The usage error a run's ``workers`` (a whole number of at least 1) gets from the
    pool it would run on (more than this machine can run at once, for local workers),
    asked without making or starting a pool: the current pool's check, or, with none
    made yet, the one of the local pool :func:`get_pool` would make."""
    backend = _backend
    if backend is not None:
        backend.check_workers(workers)
    else:
        pool_size(workers)


def check_run_ranks(size: int) -> None:
    """The usage error a cell of ``size`` ranks (a whole number of at least 1) gets from
    the pool it would run on, asked before anything per rank is built and without
    making or starting a pool: the current pool's check, or, with none made yet,
    the local pool's (more ranks than this machine can run at once)."""
    backend = _backend
    if backend is not None:
        backend.check_ranks(size)
    else:
        check_rank_count(size)


def _made(backend: Backend) -> Backend:
    """Make the new ``backend`` the current one (under ``_lock``), and have an IPython
    shell's exit free it (``exiting.watch_shell``, with or without ``%load_ext``).

    Every pool becomes current here, whichever call made it (``get_pool``,
    ``start_pool``, ``use_local``, ``use_dask``, a restart with another start
    method): ``start_pool(2)`` as a kernel's first mpmagic call made its pool
    unwatched, and Jupyter SIGTERMed the kernel ~2.6 s into its shutdown.
    """
    global _backend
    _backend = backend
    exiting.watch_shell(at_shell_exit)
    return backend


def kill_workers_now() -> None:
    """SIGKILL the current local pool's workers and what their tasks started (their
    process groups), nothing else: for a SIGTERM of the notebook
    (``exiting.kill_on_sigterm``), which runs it wherever the main thread was."""
    backend = _backend
    if not isinstance(backend, LocalBackend):
        return
    for slot in list(backend.slots):
        kill_group(slot.pid)


def at_shell_exit() -> None:
    """An IPython shell is told to exit (a kernel's shutdown request, ``exit``): stop
    the pools and free their shared memory and the helpers now, busy workers
    included (their runs end anyway: not 2 s of waiting for them). What the
    exit hooks would do, which a kernel's shutdown may never run; the helper
    processes are stopped after it (``exiting.watch_shell``)."""
    release_everything(wait_busy=False, by=exiting.SHELL_EXIT)


#: True in a process forked from one whose pool had been made (a ``multiprocessing.Process``
#: started by fork from the notebook): see :func:`forked_from_pool`.
_forked_from_pool = False


def forked_from_pool() -> bool:
    """Is this a process forked after its parent had made a pool?

    Its copy of that pool is not usable: the manager thread did not survive the
    fork, and the workers and their pipes are the parent's (what this process
    sent them would mix with the parent's messages). ``pmap`` runs serially
    here instead, as inside a task, and the parent's workers and shared memory
    are left alone (``_after_fork_in_child``).
    """
    return _forked_from_pool


def _after_fork_in_child() -> None:
    """Forget the parent's pool in a forked child: it is never used, stopped or
    cleaned up from here (the child's exit hooks would stop the parent's workers
    and unlink the segments they map)."""
    global _backend, _lock, _forked_from_pool
    _lock = threading.RLock()  # (another thread may have held it at the fork)
    if _backend is not None:
        _forked_from_pool = True
    _backend = None
    from .backends import local

    local.forget_after_fork()
    from . import shm

    shm.forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current_pool() -> Any | None:
    """The current backend, or None when none was made yet."""
    return _backend


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

#: The local pool's per-worker memory limit in bytes (``max_memory``), kept for pools made later.
_max_memory: int | None = None


def parse_memory(value: int | str | None) -> int | None:
    """Bytes from ``2GB``, ``512 MiB``, ``1.5g`` or a whole number of bytes; None for no limit.

    Zero (``0``, ``'0GB'``, ``-0``) is no limit. Every refusal is one ``UsageError``
    line, the same for ``%pool start --max-memory``, ``start_pool(max_memory=)`` and
    ``%config MPMagic.worker_max_memory`` (whose validator calls this): an infinite,
    NaN or overflowing size (``1e400``) is not a size, and one under a byte (``0.5``)
    would round down to no limit.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None  # no limit
    count, number = whole(value), real(value)  # (a numpy number too: the int or float it is)
    if count is None and number is None and not isinstance(value, str):
        raise UsageError(f"max_memory must be a size such as '2GB', not {value!r}")
    if count is not None:
        size: float = count
    else:
        scale = 1
        if isinstance(value, str):
            text = value.strip().lower().replace(" ", "")
            digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
            try:
                number, scale = float(digits), _UNITS[text[len(digits):]]
            except (ValueError, KeyError):
                number = math.nan  # (refused below, with the same words)
        size = (math.nan if number is None else number) * scale
        if not math.isfinite(size):  # nan, inf, 1e400 (float('1e400') is inf), '1e300TB'
            raise UsageError(f"max_memory must be a size such as '2GB' or '512MiB', not {value!r}")
    if size == 0:
        return None  # no limit (``--max-memory 0``, as the help says)
    if size < 0:
        raise UsageError(f"max_memory must be more than 0 bytes (or 0: no limit), not {value!r}")
    if size < 1:
        raise UsageError(f"max_memory must be at least one byte: {value!r} is less than one byte")
    return int(size)


def set_max_memory(value: int | str | None) -> None:
    """A worker holding more than ``value`` after a task is replaced before its next one."""
    global _max_memory
    with _lock:
        _max_memory = parse_memory(value)
        if isinstance(_backend, LocalBackend):
            _backend.max_memory = _max_memory


def _tasks_limit(given: int | None, old: int | None) -> int | None:
    """The recycling limit to use: ``old`` when none is given, none for 0 (as
    ``max_memory=0``), else the one given."""
    if given is None:
        return old
    return given or None


def _check_local_options(
    workers: int | None, start_method: str | None, max_tasks_per_child: int | None, max_memory: int | str | None,
) -> None:
    """A ``UsageError`` for a local pool's option that the pool would refuse, before any
    pool is touched: the same checks as the pool's own and ``%pool``'s, found
    first (``max_memory`` was set on the running pool, ``gpus=`` stopped its workers,
    ``use_local`` stopped a Dask cluster, before a size or a start method was refused)."""
    check_tasks_per_child(max_tasks_per_child)
    parse_memory(max_memory)
    if start_method is not None:
        check_start_method(start_method)
    if workers is not None:
        pool_size(workers)


def _refuse_local_options(
    backend: Backend | None, start_method: str | None, max_tasks_per_child: int | None, max_memory: int | str | None,
) -> None:
    """A usage error when a local pool's option is given while the pool is on Dask:
    its workers are not made by us, so the option could only be ignored, or
    honoured by dropping the cluster without a word (``%pool local`` does that, saying so)."""
    if backend is None or isinstance(backend, LocalBackend):
        return
    given = [(name, flag) for name, flag, value in (
        ("start_method", "--start-method", start_method),
        ("max_tasks_per_child", "--max-tasks-per-child", max_tasks_per_child),
        ("max_memory", "--max-memory", max_memory)) if value is not None]
    if given:
        name, flag = given[0]
        raise UsageError(f"{name}= ({flag}) is for local workers, and the pool is on {backend.name}: "
                         f"use_local({name}=...) (%pool local {flag} ...) switches back to them")


#: What a Ctrl-C during a stop says once the stop finished (``who``: ``stop_pool()``, ``%pool stop``).
STOP_INTERRUPTED = "{who} interrupted: the stop was finished first, and none of the pool's workers is left running"
#: ... during start_pool's or restart_with's change (a new pool made and started, or the pool resized or restarted).
START_INTERRUPTED = ("{who} interrupted: its change was finished first, and the pool ({workers} workers, "
                     "start method {method}) goes on starting; %pool shows its state")
#: ... during start_pool(wait=True)'s wait for the workers.
WAIT_INTERRUPTED = "{who} interrupted while it waited for the workers; they go on starting, and %pool shows their state"


class _finished_then_interrupt:  # noqa: N801 (used as a function: `with _finished_then_interrupt(...):`)
    """A change of the local pool that a Ctrl-C must not leave half done (a stop
    with busy workers takes ~2 s, an interrupt landed in it every time).

    SIGINT is deferred in the body, as ``restart_with`` does (also while it
    waits for ``_lock``). A Ctrl-C that came meanwhile is raised after, as one
    line (``say()``: what the change finished), not as a bare KeyboardInterrupt
    whose traceback was multiprocessing's join. Nested in another deferral (or
    outside the main thread) it does nothing: the outer one holds the signal.
    On Dask it does not defer: connecting to a cluster may take long, and a
    Ctrl-C must stop that wait.
    """

    def __init__(self, say: Callable[[], str]) -> None:
        self.say = say  # called once the change is over
        self.deferred: sigint_deferred | None = None

    def __enter__(self) -> None:
        current = current_pool()
        if current is None or isinstance(current, LocalBackend):
            self.deferred = sigint_deferred()
            self.deferred.__enter__()

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.deferred is None:
            return
        try:
            self.deferred.__exit__(etype, exc, tb)  # delivers a SIGINT that came meanwhile
        except KeyboardInterrupt:
            if exc is not None:
                raise  # (the change's own error goes with it, as the interrupt's context)
            raise one_line_interrupt(self.say()) from None


_naming = threading.local()  # (said_as: the name a magic gives the pool change it calls)


class said_as:  # noqa: N801 (used as a function: `with said_as("%pool start"):`)
    """``with said_as("%pool start"): start_pool(...)``: the one-line interrupts of
    the pool changes inside name the magic the user typed, not the function it
    calls. The outermost name wins (``%pool local`` calls ``use_local``, which
    calls ``start_pool``: the line says ``%pool local``)."""

    def __init__(self, who: str) -> None:
        self.who = who

    def __enter__(self) -> None:
        self.outer = getattr(_naming, "who", None)
        _naming.who = self.outer or self.who

    def __exit__(self, *exc: object) -> None:
        _naming.who = self.outer


def _who(default: str) -> str:
    """The name for a pool change's one-line interrupt: the caller's (``said_as``), or ``default``."""
    return getattr(_naming, "who", None) or default


def _changed(who: str) -> Callable[[], str]:
    """The line of a Ctrl-C held during ``who``'s stop and start (``START_INTERRUPTED``),
    made once the change is over: the pool as it is then."""

    def said() -> str:
        now = current_pool()
        return START_INTERRUPTED.format(who=who, workers=getattr(now, "workers", "?"),
                                        method=getattr(now, "start_method", "?"))

    return said


def _wait_ready_saying(who: str, backend: Backend) -> None:
    """``backend.wait_ready()``; a Ctrl-C cuts that wait short, as one line (``WAIT_INTERRUPTED``)."""
    try:
        backend.wait_ready()
    except KeyboardInterrupt as exc:
        if hasattr(exc, "_render_traceback_"):
            raise  # (one line already)
        raise one_line_interrupt(WAIT_INTERRUPTED.format(who=who)) from None


def start_pool(
    workers: int | None = None,
    start_method: str | None = None,
    max_tasks_per_child: int | None = None,
    wait: bool = False,
    max_memory: int | str | None = None,
    gpus: str | Iterable[int | str] | None = None,
    **refused: Any,
) -> Backend:
    """Start (or re-create, if its settings change) the local pool.

    ``workers``: its size; None keeps the running pool's (a new one has one
    worker per usable CPU), -1 (joblib's ``n_jobs=-1``) is one per usable CPU.

    ``gpus`` (``%pool start --gpus 0,1``): the devices given to the workers'
    ``CUDA_VISIBLE_DEVICES`` in turn (``[0, 1]`` or ``"0,1"``; ``[]`` none);
    running workers restart when that changes, as a GPU is chosen before a
    worker imports anything.

    ``max_memory`` (bytes, or a size such as ``"2GB"``): a worker holding more
    of its own (private) memory after a task is replaced before its next task;
    shared memory it only reads (``share()`` arrays, big items) is not counted,
    and each worker gets one chunk at a time (no pipelining), so the check comes
    before its next chunk is sent. ``max_tasks_per_child`` and ``max_memory`` of
    0 remove the limit; ``max_tasks_per_child`` is otherwise a whole number of
    at least 1. Every option is checked, as ``%pool start`` checks it, before
    any is applied: one refused leaves the pool as it was.

    Another ``start_method`` or ``max_tasks_per_child`` than the running pool's
    replaces the pool (its workers cannot change either): runs other threads
    have in flight on it, or are starting on it, fail with "the pool was
    stopped by start_pool() while this run was in flight: run it again" (as
    after ``stop_pool()``, naming it), and the
    old pool never starts again. ``workers`` and ``max_memory`` are changed
    in place.

    On Dask it starts the cluster's backend again (``workers`` resizes it); the
    local pool's options (``start_method``, ``max_tasks_per_child``,
    ``max_memory``, ``gpus``) are a usage error there, as for ``%pool restart``:
    ``use_local(...)`` switches back first.

    A Ctrl-C while it stops or starts the local workers is held until that is
    done (a few seconds at most, for busy workers), then raised as one line: the
    pool is never left half switched, with the old pool stopped and the new
    settings dropped. Only the wait for the new workers (``wait=True``) is cut
    short; they go on starting.
    """
    if refused:  # (``n=4``, joblib's ``n_jobs=4``: Python's error, with what was meant)
        raise one_line(unexpected_keyword("start_pool", refused, keyword_names(start_pool, skip=0)))
    who = _who("start_pool()")
    current = current_pool()
    _refuse_local_options(current, start_method, max_tasks_per_child, max_memory)
    if current is None or isinstance(current, LocalBackend):  # (Dask checks its size as it resizes)
        _check_local_options(workers, start_method, max_tasks_per_child, max_memory)
    devices = None if gpus is None else gpu_devices(gpus)  # (refused before any change, as the others)

    with _finished_then_interrupt(_changed(who)):
        backend = _start_now(workers, start_method, max_tasks_per_child, max_memory, devices)
    if wait:
        _wait_ready_saying(who, backend)
    return backend


def _start_now(
    workers: int | None, start_method: str | None, max_tasks_per_child: int | None, max_memory: int | str | None,
    gpus: list[str] | None,
) -> Backend:
    """``start_pool``'s change, without its wait for the workers (``gpus``: checked, see ``gpu_devices``)."""
    if max_memory is not None:
        set_max_memory(max_memory)
    if gpus is not None:
        _set_gpus(gpus)
    with _lock:
        old = _backend
        if isinstance(old, LocalBackend):
            same_method = start_method in (None, old.start_method)
            if same_method and _tasks_limit(max_tasks_per_child, old.max_tasks_per_child) == old.max_tasks_per_child:
                if workers is not None and workers != old.workers:
                    old.resize(workers)
                old.start()
                return old
        elif old is not None:
            # Another backend (Dask): start it again rather than switch away from it
            # (its local-only options were refused above).
            _refuse_local_options(old, start_method, max_tasks_per_child, None)
            if workers is not None and workers != old.workers:
                old.resize(workers)
            old.start()
            return old
        if isinstance(old, LocalBackend):
            # One setting changed: the others stay, as %pool restart keeps them (a new
            # recycling limit switched a spawn pool back to the default method).
            workers = old.workers if workers is None else workers  # (a %pool resize since)
            start_method = start_method or old.start_method
            max_tasks_per_child = _tasks_limit(max_tasks_per_child, old.max_tasks_per_child)
        new = LocalBackend(workers, start_method, max_tasks_per_child or None, max_memory=_max_memory)
        if old is not None:
            _retire(old, by=_who("start_pool()"))
        _made(new).start()
        return new


def _retire(backend: Backend, wait_busy: bool = True, *, by: str) -> None:
    """Stop ``backend``, which another replaces (or none, at unload): it stays
    stopped for good (``Backend.retire``, local or Dask), so a run that chose it
    just before fails cleanly instead of starting workers (a Dask cluster) nobody
    would stop. ``by``: what replaced it, in the user's words, for those runs."""
    backend.retire(wait_busy=wait_busy, by=by)


#: What ``start_pool(gpus=)`` takes, as its refusals say it.
GPUS_TAKE = "device IDs such as [0, 1] or '0,1' (one device: [5] or '5'; none: [])"


def gpu_devices(gpus: object) -> list[str]:
    """``start_pool(gpus=)`` as the device IDs for ``CUDA_VISIBLE_DEVICES``, or a UsageError
    before anything changes: ``'0,1'``, ``[0, 1]`` (whole numbers, numpy's too, or
    strings such as ``'MIG-...'``), ``[]`` or ``''`` for none.

    ``gpus=5`` failed inside with ``'int' object is not iterable`` (and could mean five
    GPUs as well as device 5: it is refused, saying how to write device 5); ``[0, None]``
    gave a device ``'None'``, and ``'0,,1'`` dropped its empty entry without a word (as
    ``--gather x,,y`` is refused for it, so is this: ``%pool start --gpus`` comes here too).
    """
    if isinstance(gpus, str):
        entries: list[Any] = gpus.split(",") if gpus.strip() else []
    elif isinstance(gpus, Iterable) and not isinstance(gpus, (bytes, bytearray)):
        entries = list(gpus)
    else:
        raise UsageError(f"gpus must be {GPUS_TAKE}, not {gpus!r}")
    devices = []
    for entry in entries:
        number = whole(entry)
        device = str(number) if number is not None else entry.strip() if isinstance(entry, str) else ""
        if not device:
            raise UsageError(f"gpus must be {GPUS_TAKE}: {entry!r} in {gpus!r} is not a device ID")
        devices.append(device)
    return devices


def _set_gpus(gpus: list[str]) -> None:
    """``start_pool(gpus=)``: the devices of the local workers; running ones stop
    (the start that follows starts them with their device)."""
    from . import worker_setup

    with _lock:
        if _backend is not None and not isinstance(_backend, LocalBackend):
            raise UsageError(f"gpus= is for the local pool, and the pool is on {_backend.name} (use_local() first); "
                             "Dask workers pick their own devices")
        if worker_setup.set_gpus(gpus) and _backend is not None and _backend.running:
            _backend.stop(by=_who("start_pool()"))


def stop_pool() -> None:
    """Stop the workers; the next call starts them again.

    A Ctrl-C during the stop (it gives busy workers 2 s to finish their task)
    is held until the stop is over, then raised as one line: a stop cut short
    left busy workers computing out of the pool, which no later stop reached.
    """
    who = _who("stop_pool()")
    with _finished_then_interrupt(lambda: STOP_INTERRUPTED.format(who=who)):
        with _lock:
            if _backend is not None:
                _backend.stop(by=who)


def restart_pool(wait: bool = True) -> Backend:
    """Stop and start again with the same settings (clears workers' state).

    ``wait``: return once the workers are ready; ``wait=False`` returns at once
    while they start (the next run waits for them).
    """
    with said_as("restart_pool()"):
        return restart_with(wait=wait)


def restart_with(
    workers: int | None = None,
    start_method: str | None = None,
    max_tasks_per_child: int | None = None,
    max_memory: int | str | None = None,
    wait: bool = True,
) -> Backend:
    """Restart the pool with the settings given changed and the others kept
    (``%pool restart -n 3 --start-method spawn``).

    A new start method or recycling limit makes a new local pool (its
    processes are made one way); a new size is set while the pool is stopped,
    so no worker starts only to be stopped. The start method and the limits
    are the local pool's: on Dask they are a usage error, not ignored.
    ``wait``: return once the workers are ready (else at once, while they start).

    On the local pool a Ctrl-C before the new workers are started is held until
    they are (the old ones' stop takes at most a few seconds): the restart is
    never left half done, with the old pool stopped and the new settings
    dropped. The interrupt is then one line saying the restart was finished
    first (as ``start_pool``'s). Only the wait for the new workers is cut short;
    they go on starting, as that interrupt's line says.
    """
    who = _who("restart_with()")
    current = current_pool()
    if current is not None and not isinstance(current, LocalBackend):
        with _lock:
            return _restart_now(workers, start_method, max_tasks_per_child, max_memory, wait)
    _check_local_options(workers, start_method, max_tasks_per_child, max_memory)

    with _finished_then_interrupt(_changed(who)):  # (also while it waits for _lock: a pool starting in the background holds it)
        with _lock:
            backend = _restart_now(workers, start_method, max_tasks_per_child, max_memory, wait=False)
    if wait:
        _wait_ready_saying(who, backend)
    return backend


def _restart_now(
    workers: int | None, start_method: str | None, max_tasks_per_child: int | None, max_memory: int | str | None,
    wait: bool,
) -> Backend:
    """``restart_with``'s work (under ``_lock``); ``wait`` is only the Dask restart's."""
    backend = get_pool()
    _refuse_local_options(backend, start_method, max_tasks_per_child, max_memory)
    if max_memory is not None:
        set_max_memory(max_memory)
    limit = _tasks_limit(max_tasks_per_child, backend.max_tasks_per_child) if isinstance(backend, LocalBackend) else None
    if isinstance(backend, LocalBackend) and (start_method not in (None, backend.start_method)
                                              or limit != backend.max_tasks_per_child):
        # Made (and its settings checked) before the old pool stops: a bad one leaves it running.
        new = LocalBackend(workers or backend.workers, start_method or backend.start_method,
                           limit, max_memory=_max_memory)
        _retire(backend, by=_who("restart_with()"))
        _made(new).start()
        return new
    if workers is not None and workers != backend.workers:
        if isinstance(backend, LocalBackend):
            workers = pool_size(workers)  # before the stop: a size refused leaves the pool running
            backend.stop(by=_who("restart_with()"))
        backend.resize(workers)
    backend.restart(wait, by=_who("restart_with()"))
    return backend


def use_local(
    workers: int | None = None, start_method: str | None = None, max_tasks_per_child: int | None = None,
    max_memory: int | str | None = None, **refused: Any,
) -> Backend:
    """Switch back to processes on this machine (stops a Dask backend).

    The options are ``start_pool``'s (``max_memory`` is kept for the local
    pool it makes or keeps).
    """
    global _backend
    if refused:
        raise one_line(unexpected_keyword("use_local", refused, keyword_names(use_local, skip=0)))
    _check_local_options(workers, start_method, max_tasks_per_child, max_memory)  # (before a Dask pool stops)
    if max_memory is not None:
        set_max_memory(max_memory)
    with _lock:
        if _backend is not None and not isinstance(_backend, LocalBackend):
            _retire(_backend, by=_who("use_local()"))
            _backend = None
        with said_as("use_local()"):
            return start_pool(workers, start_method, max_tasks_per_child)


def use_dask(address: str | None = None, **options: Any) -> Backend:
    """Run on Dask: a new local cluster, or the scheduler at ``address``.

    ``address`` is ``tcp://host:8786`` or ``tls://...``; without it (and
    without ``scheduler_file``) a local cluster of worker processes starts.
    Options: ``workers`` (size of the local cluster; with an address, wait
    until that many workers joined), ``scheduler_file`` (connect to the
    scheduler it describes), ``tls_ca_file``/``tls_cert``/``tls_key`` (for
    ``tls://``), ``timeout`` (seconds to wait for the scheduler, default 10).
    A scheduler that cannot be reached in time is an error and the current
    pool stays. The same scheduler again (address or file, and certificates)
    keeps the current connection, with its runs in flight and helpers; so does
    a local cluster again (no address) while on the one mpmagic started: a new
    ``workers`` scales it.
    See docs/dask.md.
    """
    try:
        from .backends.dask import DaskBackend
    except ImportError as exc:
        raise UsageError(
            f"the Dask backend needs dask.distributed ({exc}); install it with: pip install \"mpmagic[dask]\""
        ) from None
    takes = [name for name in inspect.signature(DaskBackend).parameters if name != "address"]
    for name in options:
        if name not in takes:  # (Python's TypeError named DaskBackend.__init__, which the user never called)
            raise one_line(TypeError(f"use_dask() got an unexpected keyword argument {name!r}; its options are "
                                     f"{', '.join(takes)}"))
    with _lock:
        if isinstance(_backend, DaskBackend) and _backend.kept_for(address, **options):
            return _backend
        new = DaskBackend(address, **options)
        old = _backend
        _made(new)
        if old is not None:
            _retire(old, by=_who("use_dask()"))
            if old.name == "dask" and new.running:
                # Its stop removed the worker setup's plugin (and names) from the
                # cluster, which may be the one the new backend just set up.
                new.apply_setup()
        return new


def shutdown(wait_busy: bool = True, by: str = "%unload_ext mpmagic") -> None:
    """Stop and forget the current backend (extension unload; ``wait_busy=False``:
    busy local workers are not given time to finish, see ``LocalBackend.stop``;
    ``by``: what stops it, for the runs it fails)."""
    global _backend
    with _lock:
        if _backend is not None:
            _retire(_backend, wait_busy, by=by)
        _backend = None


def release_everything(wait_busy: bool = True, by: str = "the exit") -> None:
    """Stop every pool and free all this process's shared memory and helpers now:
    what its exit hooks do, for a kernel whose exit hooks may not run.
    ``wait_busy=False``: busy workers are terminated at once (a shutdown);
    ``by``: what stops them, for the runs it fails."""
    from . import shm
    from .backends import local

    shutdown(wait_busy, by)
    local.stop_all(wait_busy)
    if "mpmagic.backends.dask" in sys.modules:  # (never imported: no Dask pool to stop)
        sys.modules["mpmagic.backends.dask"].stop_all()
    shm.release_all()
    _shared_base.release_all()


def pool_status() -> PoolStatus:
    """Status of the current backend (does not start it), with the background runs if any."""
    background = sys.modules.get("mpmagic.background")  # none were started if it is not imported
    rows = background.runs().rows() if background is not None else []
    return PoolStatus(get_pool().status(), runs=rows)


# mpmagic.Queue() and the other helpers ask the current backend to make them
# (Dask makes its own kind): shared finds it through this lookup rather than
# importing pool (which imports the backends, which import shared).
_shared_base.set_backend_lookup(current_pool)


__all__ = [
    "get_pool",
    "start_pool",
    "stop_pool",
    "restart_pool",
    "use_local",
    "use_dask",
    "pool_status",
    "PoolStatus",
    "fmt_seconds",
]
