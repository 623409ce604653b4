"""A Dask cluster as the pool: the same magics when one machine is not enough.

:class:`DaskBackend` has the interface of :class:`~mpmagic.backends.local.LocalBackend`
(``start``/``stop``/``restart``/``resize``/``status``/``run``), so ``%pmap``,
``%%parallel`` and ``%pool`` behave the same on a cluster. It drives the same
backend-independent jobs (``mpmagic/jobs.py``); only the transport differs:

* A job unit (a chunk of a map, a rank of a cell) becomes one Dask task that
  runs :func:`mpmagic.backends.dask_tasks.run_message` with the very message
  a local worker would get. Chunks, not items: a plain ``client.map`` over
  100,000 tiny items pays Dask's per-task overhead 100,000 times.
* The function's payload travels once per worker: it is the result of one
  small task every chunk depends on (kept between calls of the same
  function); each worker loads it once and caches it by content key.
* Keys are unique and non-pure, so two calls with side effects both run.
* A bounded number of chunks is in flight (two per worker thread, one with a
  timeout), so the chunk planner's measurements keep steering the sizes.
* What a task prints is streamed home as Dask events and shown in the cell.
* A worker that dies: Dask runs its tasks again elsewhere (its
  ``allowed-failures`` setting; 0 on the LocalCluster mpmagic started: the
  first death fails them). Dask then blames every task that was on the
  dying workers, so a blamed chunk runs once more alone; if it kills its worker
  again, each of its items runs alone in turn, and the job hears which one
  was lost (Dask cannot say which item of a chunk was running).
* On the LocalCluster mpmagic started, a worker that dies is always started
  again by its nanny (``_OwnLocalCluster``; ``_heal`` for a nanny closed anyway).
  Dask's own log is silenced while it runs (``_DaskLogSilenced``), and closing
  it kills the worker processes that outlive the close (``_close_cluster``).
* No worker left for the backend's ``worker_wait`` during a map, the scheduler
  out of reach, or the pool stopped under a run: the run fails as a whole,
  saying so; no item is blamed for what the cluster did. With
  ``errors="collect"`` a map with no worker left instead keeps the results it
  has, and each item that could not run is a ``Failed`` saying why.
* ``%%parallel`` ranks are pinned to distinct worker processes (worker
  restrictions), so they run at the same time and can talk to one another.
* An interrupt, a cancel or a ``--timeout`` cancels the futures at once;
  tasks already running cannot be stopped by Dask. On the LocalCluster
  mpmagic started, their worker processes are killed (the nannies start new
  ones, never waited on) and left out while the scheduler still lists them
  (``_killed``). Elsewhere they run on, and later runs send no work
  to their workers until their end events come (``_plan``); the notebook is
  told which, and the interrupt's message says what happened.
* ``-n N`` (``workers=N``) restricts a map to N worker threads.
* A cluster mpmagic connected to is not its own: a ``--timeout`` or
  ``%pool restart`` never restarts its workers (issue 14.4), and the
  notebook's context (``context.py``) is sent only to the LocalCluster.

Dask is optional: importing this module needs ``distributed``; ``pool.use_dask``
turns its absence into an install hint.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, NamedTuple, TypedDict

from distributed import Client, LocalCluster, Nanny
from distributed.deploy.cluster import Cluster

from .. import compat, context, exiting, payload_cache, posixshm, warmup, worker_setup
from ..checks import check_real, check_whole, number_text, size_refused, whole
from ..cpus import available_cpus
from ..engine import SIGNAL_POLL, DrivenRun
from ..errors import MPMagicError, UsageError, set_interrupt_outcome
from ..fmt import func_name
from ..protocol import Done, Error, Out, ProtocolError, Unpicklable, pack, unpack
from . import dask_tasks
from .base import Job
from .held_lines import HeldLines
from .local import _no_main_module, pool_size

_LARGE_MESSAGE = 1_000_000  # bytes: bigger units are scattered, not put in the task graph
_RESULT_OUTPUT_GRACE = 1.0  # seconds to wait for output events that trail a result
_CANCEL_BUDGET = 1.5  # seconds an interrupt may spend cancelling before it returns
# Function payloads kept on the cluster between calls (their hold futures: a copy of the
# bytes on every worker): the ``_PAYLOADS_ALWAYS`` most recent, and up to
# ``payload_cache.KEEP_FUNCTIONS`` within ``payload_cache.KEEP_BYTES`` (``payload_cache.excess``,
# the rule of each worker's loaded functions). A notebook cycling through 12 tiny functions
# sent each one again at every call when 8 were kept whatever their size (a new hold task,
# replicated to every worker, the old one released: +20 ms a call, docs/performance.md); big
# payloads still cost no more than the 8 most recent did.
_PAYLOADS_ALWAYS = 8
_SETUP_KEYS = itertools.count(1)  # mpmagic's own clusters' setup stamp keys (DaskBackend._setup_key)
_CLOSE_GRACE = 5.0  # seconds mpmagic's own cluster may take to close before its worker processes are killed
_KILLED_LISTED = 60.0  # seconds a worker mpmagic killed is left out while the scheduler still lists it
_LOST_INPUT_RESENDS = 3  # times a unit is sent again after Dask lost one of its inputs on a worker
_ABANDONED_ASKED = 1.0  # seconds between asking the workers which tasks given up on still run
_ABANDONED_WAIT = 2.0  # seconds a run waits for their answer (the question goes on in its thread)
# The most ranks a cell may ask of a cluster not yet connected (one worker process each):
# beyond any cluster's size, refused before one unit per rank is built (check_ranks).
_MOST_RANKS = 65_536
# Seconds a %%parallel rank may take to start before the notebook is told why it
# waits (its worker busy with other tasks): ranks that meet wait for it silently.
RANK_START_NOTICE = 3.0
# Seconds a foreground run may wait for its turn (another run of this notebook
# holds the backend: runs take turns) before one line says which run it waits for.
TURN_NOTICE = 1.0
# What to do about a module the workers of a cluster mpmagic connected to cannot import.
CONNECTED_MISSING_MODULE = (
    "Install it (or put its file) where the Dask workers run, on every worker machine: a cluster mpmagic "
    "connected to gets neither the notebook's sys.path nor a restart from %pool restart (see docs/dask.md)")
_keys = itertools.count()

log = logging.getLogger("mpmagic")

_live_backends: weakref.WeakSet = weakref.WeakSet()


def stop_all() -> None:
    """Stop every Dask pool (exit, or a kernel asked to shut down)."""
    for backend in list(_live_backends):
        try:
            backend.stop(timeout=1.0)
        except Exception as exc:  # one backend's cleanup must not stop the others'
            _stop_failed(exc)


def _stop_failed(exc: Exception) -> None:
    """Log a Dask pool's failed stop at exit: one line where CPython 3.12.0-3.12.2
    refused the thread Dask needed (not Dask's traceback), else with the traceback."""
    if exiting.no_thread_at_exit(exc):
        log.warning("mpmagic: stopping a Dask pool at exit failed: Python %s refused to start a thread "
                    "while exiting (CPython 3.12.0-3.12.2 do; 3.12.3+ does not)",
                    ".".join(map(str, sys.version_info[:3])))
    else:
        log.warning("mpmagic: stopping a Dask pool at exit failed", exc_info=True)


#: Seconds into the close of mpmagic's own cluster at exit after a Ctrl-C that its worker
#: processes are killed (their tasks are being stopped: no grace to wait out).
_CLOSE_AT_ONCE = 0.5


def _stop_at_exit(at_once: bool) -> None:
    """Stop every Dask pool for good at exit (``retire``: a run that waited for its turn
    must not start a new cluster once this one is stopped: it did, after a Ctrl-C during
    the exit's wait, and its close waited out the grace again, ~8 s in all). ``at_once``
    (a Ctrl-C): the workers are killed :data:`_CLOSE_AT_ONCE` into the close, busy or not.

    ``distributed``'s records are silenced from here to the end, as while mpmagic's own
    cluster runs (``_DaskLogSilenced``): closing with tasks in flight made the scheduler
    log INFO lines and a callback tornado logged as an error with a traceback ("cannot
    schedule new futures after shutdown": Dask's callback pool was shut down already).
    mpmagic's one line said what happened; they go to mpmagic's debug log."""
    logging.getLogger("distributed").setLevel(_SILENT)
    logging.getLogger("tornado.application").addFilter(_FromDistributed())
    for backend in list(_live_backends):
        try:
            backend.retire(timeout=1.0, wait_busy=not at_once)
        except Exception as exc:  # one backend's cleanup must not stop the others'
            _stop_failed(exc)


@atexit.register
def _at_exit() -> None:
    """The exit hook: as the local pool's (``local._at_exit``), wait for the runs in flight
    (``exiting.wait_for_runs``: not in a kernel's shutdown; Ctrl-C stops them), then
    close the client, and the cluster if mpmagic started it. (Registered after the
    local pool's and Dask's own hooks: it runs before them, while the cluster and the
    local workers still run.) The wait that matters for Dask came earlier, before
    Python's exit stopped the scheduler's thread pools (``wait_before_threads_join``)."""
    stop_now = exiting.wait_for_runs()
    with exiting.sigint_dropped():
        _stop_at_exit(at_once=stop_now)


def _waited_at_exit() -> list[tuple[DrivenRun, threading.Thread]]:
    """What the exit waits for of the Dask pools: the foreground runs another thread
    submitted and drives (a daemon thread's ``pmap``, its turn come or not). A
    background run is its handle's (``background`` counts it); a thread that is gone
    (this process was forked from the one it ran in) drives nothing."""
    return [(run, run.starter) for backend in list(_live_backends) for run in list(backend._foreground)
            if not run.done() and run.starter.is_alive()]


exiting.count_runs(_waited_at_exit)
exiting.on_stop(lambda: _stop_at_exit(at_once=True))
# Python's exit stops every ThreadPoolExecutor (``distributed`` uses them: its scheduler
# in this process takes no task after that) before it joins the threads: the exit's
# first wait runs before that hook, registered on importing ``distributed``, above.
exiting.wait_before_threads_join()


class _ToDebugLog(logging.Filter):
    """Lets no record through: each goes to mpmagic's log at debug level instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.debug("mpmagic: Dask said while closing: %s", record.getMessage(), exc_info=record.exc_info)
        return False


class _FromDistributed(_ToDebugLog):
    """For tornado's log at exit: the errors of ``distributed``'s own callbacks (their
    traceback runs through its code) go to mpmagic's debug log; any other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        tb = record.exc_info[2] if record.exc_info else None
        files = [frame.filename for frame in traceback.extract_tb(tb)] if tb is not None else []
        if not any(f"{os.sep}distributed{os.sep}" in f for f in files):
            return True
        return super().filter(record)


class _OfOurTasks(logging.Filter):
    """For the ``distributed.client`` logger, as long as this module is loaded: its records
    about mpmagic's own tasks (their keys begin ``mpmagic-``) go to mpmagic's debug log;
    any other (the user's own client's) passes.

    Why: after an item killed its worker on a cluster mpmagic connected to (whose log is
    not silenced, as is that of mpmagic's own cluster: ``_DaskLogSilenced``), the client
    logged ``Couldn't gather 1 keys, rescheduling ('mpmagic-...',)`` into the next cell:
    a raw Dask line where mpmagic says in its own words what became of the worker and
    its items, about a task Dask runs again anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # (a record whose arguments do not fit its format: Dask's to show)
            return True
        if "'mpmagic-" not in text and '"mpmagic-' not in text:
            return True
        log.debug("mpmagic: Dask's client said of mpmagic's tasks: %s", text, exc_info=record.exc_info)
        return False


logging.getLogger("distributed.client").addFilter(_OfOurTasks())


@contextlib.contextmanager
def _quiet_client_log() -> Iterator[None]:
    """Closing a client whose scheduler is gone cancels its attempts to reconnect,
    and Dask logs that as an error with a long traceback, shown in the cell of
    the ``%pool local`` or ``%pool stop`` that closed it. The connection was
    already reported as lost; the traceback only alarms: mpmagic's debug log."""
    logger = logging.getLogger("distributed.client")
    quiet = _ToDebugLog()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


# Above CRITICAL: no record of Dask's own gets through (``silence_logs`` of mpmagic's own cluster).
_SILENT = logging.CRITICAL + 10


@contextlib.contextmanager
def _quiet_dask_log() -> Iterator[None]:
    """While mpmagic's own cluster closes, Dask's records (a nanny whose worker was
    still starting logs a traceback) go to mpmagic's debug log, not the cell."""
    quiet = _ToDebugLog()
    handlers = {h for name in ("distributed", "distributed.client") for h in logging.getLogger(name).handlers}
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


class _DaskLogSilenced:
    """Dask's own log in the kernel is silenced while mpmagic's own cluster runs.

    Its scheduler and nannies run in the kernel, and a worker that dies (a task's
    ``os._exit``, a ``--timeout``'s kill) made them log ERROR lines and tracebacks
    ("Couldn't gather keys", "marked as failed because 4 workers died") in the cell
    beside mpmagic's one line saying what happened. The ``distributed`` logger's
    level (which its loggers inherit) is raised from the cluster's start to its
    close and then set back; the user's own loggers are left alone. (Its worker
    processes get the same level through ``silence_logs``.)"""

    def __init__(self) -> None:
        self.logger = logging.getLogger("distributed")
        self.level = self.logger.level
        self.logger.setLevel(_SILENT)

    def restore(self) -> None:
        if self.logger.level == _SILENT:  # (unless someone set another level meanwhile)
            self.logger.setLevel(self.level)


# The process name Dask's nanny gives the worker process it starts (distributed.nanny.WorkerProcess):
# those of mpmagic's own cluster never run a script's __main__ (compat.children_named_ignore_main).
_NANNY_CHILD = "Dask Worker process (from Nanny)"


class _OwnLocalCluster(LocalCluster):
    """mpmagic's own ``LocalCluster``: a worker process that dies is started
    again by its nanny, always (as the local pool replaces a worker).

    A ``SpecCluster`` closes a worker's nanny for good when, 15 s after its
    worker left the scheduler (``distributed.deploy.lost-worker-timeout``), no
    worker of that name is registered, and nothing starts it again. That is
    meant for a batch job that vanished; here the nanny is on this machine and
    restarting its worker is the replacement. A task that killed its worker
    again and again (Dask's retries, then mpmagic's run alone) left the nannies
    mid-restart at that moment: both were closed, and the cluster stayed with
    no worker (the next run failed). So a worker that leaves is only noted
    here, not timed; ``DaskBackend._heal`` starts any nanny that was closed
    all the same (should a later Dask close one elsewhere).
    """

    def _update_worker_status(self, op: str, msg: Any) -> None:  # (SpecCluster's adds the hard close)
        Cluster._update_worker_status(self, op, msg)


class _NotebookEnvironTaken:
    """What the nannies of mpmagic's own cluster set in the notebook's ``os.environ`` to
    start their workers, taken back once none is starting one (:class:`_OwnNanny`).

    A variable the notebook had gets its value back; one it had not is removed; one
    the notebook changed meanwhile (no longer the nanny's value) is left as it is.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starting = 0
        self._before: dict[str, str | None] = {}  # the notebook's values, before the first nanny's
        self._set: dict[str, str] = {}  # what the nannies set

    def enter(self, env: dict[str, str]) -> None:
        """A nanny is about to start its worker with ``env`` set in this process."""
        with self._lock:
            if not self._starting:
                self._before, self._set = {}, {}
            for name, value in env.items():
                if name not in self._set:
                    self._before.setdefault(name, os.environ.get(name))
                self._set[name] = str(value)
            self._starting += 1

    def leave(self) -> None:
        """A nanny's worker started (or failed to): the last one puts the notebook's values back."""
        with self._lock:
            self._starting -= 1
            if self._starting:
                return
            for name, value in self._set.items():
                if os.environ.get(name) != value:
                    continue  # (changed since: the notebook's now)
                before = self._before.get(name)
                if before is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = before


_notebook_environ = _NotebookEnvironTaken()


class _OwnNanny(Nanny):
    """The nanny of mpmagic's own ``LocalCluster``: what it sets in the notebook's
    environment to start a worker is taken back once the worker started.

    A LocalCluster's nannies run in the notebook's process, and each puts Dask's
    ``distributed.nanny.pre-spawn-environ`` (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1,
    OPENBLAS_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_) and PYTHONHASHSEED=6640 into
    ``os.environ`` before it spawns its worker (they must be there as the worker's
    process starts), and leaves them: ``%pool dask`` left them in the notebook for
    good, where a later local pool's workers took OMP_NUM_THREADS=1 as the user's
    own, over their cap (and a fork server started then passed it on, stale), and
    every subprocess of the notebook inherited them. The workers keep them
    (``dask_tasks._adopt_context`` counts them as the workers' own).
    """

    async def instantiate(self) -> Any:
        _notebook_environ.enter(self.pre_spawn_env)
        try:
            return await super().instantiate()
        finally:
            _notebook_environ.leave()


def _security(address: str | None, ca: str | None, cert: str | None, key: str | None) -> Any:
    """A ``distributed.security.Security`` for TLS options, or None for plain tcp."""
    given = {"--tls-ca-file": ca, "--tls-cert": cert, "--tls-key": key}
    tls_address = bool(address and address.startswith("tls://"))
    if not tls_address and not any(given.values()):
        return None
    missing = [opt for opt, v in given.items() if not v]
    if missing:
        raise UsageError(
            f"a tls:// scheduler needs the CA certificate, a client certificate and its key: "
            f"add {' '.join(f'{m} FILE' for m in missing)}"
        )
    for opt, path in given.items():
        if not os.path.isfile(str(path)):
            raise UsageError(f"{opt} {path}: no such file")
    from distributed.security import Security

    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


class _HeldPayload(NamedTuple):
    """A function payload kept on the cluster: the future of its hold task, and its size in bytes."""

    future: Any
    size: int


class _TaskEvent(TypedDict, total=False):
    """What a task logs on the run's event topic (``dask_tasks._log_event``)."""

    tag: str  # the task's key
    start: bool  # the task began running (timeouts count from here)
    item: int  # a chunk under a --timeout: this item of it began (dask_tasks._item_starts)
    stream: str  # an output line: "stdout" or "stderr"...
    text: str  # ...and its text
    worker: str  # added by the scheduler: the address of the worker that logged it


@dataclass(eq=False)
class _Task:
    """One unit of a job on its way through Dask."""

    key: str
    unit: Any
    future: Any
    target: str | None = None  # the worker a rank is pinned to
    prefer: str | None = None  # the worker a map's chunk was sent to (loosely: see _DaskRun._spread_to)
    started: float | None = None  # monotonic time the task began running
    # A chunk of several items under a --timeout: the item it runs (as its last
    # event said) and, from its second item on, when that item began: each item,
    # not the chunk, gets the timeout (_check_deadlines).
    item: int | None = None
    item_started: float | None = None
    worker: str | None = None  # where it is running
    streamed: int = 0  # output events received
    data_future: Any = None  # a large unit's scattered message
    gather_wait: float | None = None  # seconds the next fetch of its result may take (see _finish)

    def describe(self, job: Job) -> str:
        return job.describe_unit(self.unit)

    def clock(self) -> float | None:
        """When the --timeout of its running item began (None: not running yet)."""
        return self.item_started if self.item_started is not None else self.started


_ADDRESS_LOOKS = "a scheduler address looks like tcp://HOST:8786 (HOST:PORT alone means tcp://)"


def _serves_a_page(link: str) -> bool:
    """False only when ``link`` answers 404. No answer, or another error, keeps
    it: the user's browser may reach what this process cannot. No proxy: a
    dashboard is reached directly, and a loopback one must not go out."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(link, timeout=2):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code != 404
    except (OSError, ValueError):
        return True


def _scheduler_address(given: str) -> str:
    """``given`` as the scheduler address to connect to (``HOST:PORT`` gets ``tcp://``),
    or a one-line usage error naming it: Dask's own error for a malformed address
    (no port, the dashboard's http:// URL) came with a traceback of 10-13 frames."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    text = str(given).strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("http", "https"):
        raise UsageError(f"{given!r} is the Dask dashboard's address, not the scheduler's: the scheduler's is "
                         "usually tcp://HOST:8786 (the same host, port 8786 unless it was started with --port)")
    address = text if scheme else f"tcp://{text}"
    try:
        scheme, location = parse_address(address)
        get_backend(scheme)  # a scheme Dask knows
        if scheme in ("tcp", "tls", "ws", "wss"):
            _host, port = parse_host_port(location)  # a host and a port, a number
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is out of range")
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{given!r} is not a Dask scheduler address ({exc}): {_ADDRESS_LOOKS}") from None
    return address


class DaskBackend:
    """The pool on a Dask cluster: a local one mpmagic starts, or a running scheduler.

    ``address`` (``tcp://host:8786``, ``tls://...``) or ``scheduler_file``
    connects to a running scheduler; with neither, a ``LocalCluster`` of
    ``workers`` single-threaded worker processes starts here (by default as
    many as the local pool would have; at most the local pool's limit,
    ``local.max_workers()``, refused before it starts). With an address, ``workers`` means
    "wait until that many workers have joined". ``timeout`` bounds the wait
    for the scheduler (and for workers).
    """

    name = "dask"
    start_method = None  # worker processes are the cluster's (see backends/base.py)
    shares_memory = False  # workers may be on other machines: everything travels pickled

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        scheduler_file: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        if address is not None and scheduler_file is not None:
            raise UsageError("give either a scheduler ADDRESS or --scheduler-file, not both")
        if whole(workers) == -1:  # joblib's n_jobs=-1: as None (one per CPU; no count to wait for)
            workers = None
        if workers is not None:
            workers = check_whole("workers", workers, 1, "a whole number of at least 1 or -1 (one per usable CPU)")
            if address is None and scheduler_file is None:
                # mpmagic's own LocalCluster runs on this machine: the local pool's limit, before
                # anything starts (workers=10**400 grew to 23 GB, 100000 hung starting processes).
                # With a scheduler, workers is a count to wait for: nothing starts for it.
                workers = pool_size(workers)
        timeout = check_real("timeout", timeout, "a number of seconds greater than 0", lambda seconds: seconds > 0)
        if address is not None:
            address = _scheduler_address(address)
        if scheduler_file is not None and not os.path.isfile(scheduler_file):
            raise UsageError(
                f"--scheduler-file {scheduler_file}: no such file (a scheduler writes it when started "
                f"with `dask scheduler --scheduler-file {scheduler_file}`)"
            )
        self.address = address
        self.scheduler_file = scheduler_file
        self.owns_cluster = address is None and scheduler_file is None
        if self.owns_cluster and any((tls_ca_file, tls_cert, tls_key)):
            raise UsageError("the --tls-* options are for connecting to a tls:// scheduler: give its ADDRESS too")
        self.security = _security(address, tls_ca_file, tls_cert, tls_key)
        # How it was told to connect (for a cluster it did not start): use_dask with the same is this pool again.
        self._connected_as = (address, scheduler_file, tls_ca_file, tls_cert, tls_key)
        self.requested_workers = workers
        self.timeout = float(timeout)
        self.client: Any = None
        self.cluster: Any = None
        # The scheduler's address once connected, kept after a stop: messages
        # name it (``address`` is None for the cluster mpmagic starts).
        self.scheduler_address: str | None = address
        self.calls_run = 0
        self.tasks_run = 0
        # The dashboard link last checked, and whether it serves a dashboard (_dashboard).
        self._dashboard_checked: tuple[str, bool] | None = None
        self._most_workers = 0  # the most workers seen at once
        # Stops and restarts so far: a run in flight when it changes was cut
        # off by the user (``%pool stop``/``restart``), not by the cluster.
        self.stops = 0
        self.stopped_by: str | None = None  # what made the last stop or restart, in the user's words (see stop)
        self._retired = False  # replaced by another pool (see retire): never started or connected again
        self._nthreads_cache: tuple[float, dict[str, int]] | None = None
        self._own_setup_key: Any = ("dask-own", next(_SETUP_KEYS))  # (see _setup_key)
        self._setup_errors: list[str] = []  # worker setup failures found when connecting (worker_setup.py)
        self._reloads = warmup.Reloads()  # the user's modules reloaded in the notebook (each task carries them)
        # (module, digest[, error]): a worker's file said to differ, or its reload to have failed
        self._said_differs: set[tuple] = set()
        self._said_reloaded: set[tuple] = set()  # ((module, digest), ...): workers said to reload them
        self._topic = ""
        self._topic_client: Any = None
        self._event_sink: Any = None  # the running job's inbox
        # Lines of mpmagic's own threads here (a worker given up on that Dask could not
        # restart, a cancel that failed): said by the run's thread, in its cell, as the
        # local pool's manager's are (_run, _DaskRun._loop and _cancel say them).
        self._said_later = HeldLines()
        self._payloads: OrderedDict[bytes, _HeldPayload] = OrderedDict()  # func_key -> its hold task (_payload_future)
        # The last payload the notebook's cache dropped that the cluster was told of (_forget_retired).
        self._retired_seen = payload_cache.last_retired()
        # Tasks this notebook gave up on while they ran (a timeout, an interrupt,
        # a cancel): key -> worker address. Dask cannot stop a running task, so
        # its worker thread stays busy until the task's end event arrives (or the
        # worker leaves); runs send no work there meanwhile (see _plan).
        self._abandoned: dict[str, str] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # keys of tasks whose end event came (recent ones)
        self._abandoned_asked = 0.0  # when the workers were last asked which of those still run (_expire_abandoned)
        self._abandoned_asking = False  # that question is out (its thread: _ask_abandoned)
        # Workers of mpmagic's own cluster it killed (a timeout, an interrupt, a cancel):
        # address -> when. Gone, though the scheduler lists them for a moment: runs
        # leave them out (``_nthreads``) and wait for no task of theirs.
        self._killed: dict[str, float] = {}
        self.created = time.time()
        self._lock = threading.RLock()
        # Runs take turns: one event sink per backend (background runs, issue 16).
        self._run_lock = threading.RLock()
        self._driving: DrivenRun | None = None  # the run holding _run_lock now (named by runs_held)
        # Foreground runs submitted and not ended (other threads' pmap), for the exit's wait (_waited_at_exit).
        self._foreground: weakref.WeakSet[DrivenRun] = weakref.WeakSet()
        self._silenced: _DaskLogSilenced | None = None  # Dask's log while our own cluster runs
        # Lets its worker processes (re)start running the script's __main__ again (_start_local_cluster)
        self._main_hidden: Callable[[], None] | None = None
        _live_backends.add(self)
        self.start()

    # -- lifecycle ---------------------------------------------------------
    def kept_for(self, address: str | None, **options: Any) -> bool:
        """Is ``use_dask(address, **options)`` this pool again? Then it stays, started
        again if it was stopped, with the new ``timeout``:

        - ``%pool dask ADDRESS`` run once more (the same scheduler and certificates):
          the connection, waiting for ``workers`` if given. A new connection would fail
          the runs in flight and orphan the helpers made on this one, as ``%pool stop``
          does, for a scheduler that never changed.
        - ``%pool dask [-n N]`` run once more, on the cluster mpmagic started: that
          cluster, scaled to ``workers`` if given and different (``resize``). It was
          closed and a new one started (seconds of start, the runs in flight failed,
          the workers' state and helpers gone) for the very shape it already had.
        """
        if self._retired:
            return False
        own = address is None and options.get("scheduler_file") is None
        if own != self.owns_cluster:
            return False
        if own:
            if any(options.get(name) is not None for name in ("tls_ca_file", "tls_cert", "tls_key")):
                return False  # (refused by the new pool's check, in its words)
        else:
            given = (
                None if address is None else _scheduler_address(address), options.get("scheduler_file"),
                options.get("tls_ca_file"), options.get("tls_cert"), options.get("tls_key"),
            )
            if given != self._connected_as:
                return False
        workers = options.get("workers")
        if whole(workers) == -1:
            workers = available_cpus() if own else None
        if workers is not None:
            workers = check_whole("workers", workers, 1, "a whole number of at least 1 or -1 (one per usable CPU)")
        timeout_before = self.timeout
        if options.get("timeout") is not None:
            self.timeout = float(check_real("timeout", options["timeout"], "a number of seconds greater than 0",
                                            lambda seconds: seconds > 0))
        try:
            if own:
                if workers is not None and workers != self.workers:
                    self.resize(workers)  # (not running: the size it starts at below)
                self.start()
            else:
                self.start()
                if workers is not None:
                    self._wait_for_workers(workers)
                    self.requested_workers = workers
        except BaseException:  # (too few workers in time: the pool stays as it was, as a new one's failure leaves it)
            self.timeout = timeout_before
            raise
        return True

    @property
    def running(self) -> bool:
        return self.client is not None and self.client.status == "running"

    @property
    def where(self) -> str:
        """The scheduler, in words, for messages."""
        if self.address:
            return self.address
        if self.scheduler_file:
            return f"the scheduler in {self.scheduler_file}"
        return "the local Dask cluster"

    def start(self) -> None:
        """Connect (or start the local cluster); a clear error if that fails in time."""
        with self._lock:
            if self._retired:
                raise MPMagicError("this Dask pool was replaced by another one (use_local(), use_dask(), or the "
                                   "extension's unload) and stays stopped: mpmagic.get_pool() is the pool now")
            if self.running:
                return
            if self.client is not None:  # (it lost its scheduler: the helpers made on it say so)
                from .dask_shared import connection_lost

                connection_lost(self.client, self.scheduler_address or self.where)
            self._close_quietly()
            if self.owns_cluster:
                self._start_local_cluster()
            else:
                self._connect()
            self.scheduler_address = self.client.scheduler.address or self.scheduler_address
            from .dask_shared import serving

            serving(self.client, self.scheduler_address or self.where)  # (a helper says where it was lost)
            if self.requested_workers and not self.owns_cluster:
                self._wait_for_workers(self.requested_workers)
            if self.owns_cluster:  # new worker processes: what they import is stamped afresh
                self._new_setup_key()
            if worker_setup.has_setup():  # worker setup (worker_setup.py): a plugin, also for later workers
                worker_setup.sent(self._setup_key())
                self._setup_errors = worker_setup.dask_apply(self.client, self._events_topic())
                for error in [] if worker_setup.is_quiet() else self._setup_errors:
                    sys.stderr.write(f"mpmagic: {error}\n")

    def _start_local_cluster(self) -> None:
        n = self.requested_workers or available_cpus()
        try:
            # Its worker processes are spawned: keep them from re-running a script's __main__,
            # at the start (_no_main_module) and whenever a nanny starts one again later,
            # from its own thread (a worker died, %pool restart, a scale): as long as it runs.
            if self._main_hidden is None:
                self._main_hidden = compat.children_named_ignore_main(_NANNY_CHILD)
            with _no_main_module():
                self.cluster = _OwnLocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    worker_class=_OwnNanny,  # (the notebook's environment stays the notebook's)
                    host="127.0.0.1",
                    dashboard_address=":0",  # never a fixed port another cluster holds
                    silence_logs=_SILENT,  # (mpmagic says in one line what became of a worker)
                    # A worker's death fails its tasks at once (Dask's default: the 4th death),
                    # and mpmagic's run alone names the culprit (_DaskRun._failed): a task
                    # calling os._exit took 8 worker restarts, 38 s on a busy machine.
                    scheduler_kwargs={"allowed_failures": 0},
                )
            self._silenced = _DaskLogSilenced()
            self.client = Client(self.cluster, set_as_default=False, timeout=self.timeout)
            # Its workers share the kernel's process group: keep "interrupt kernel" off them.
            self.client.register_plugin(dask_tasks.IgnoreSigint())
        except Exception as exc:
            self._close_quietly()
            raise MPMagicError(f"could not start a local Dask cluster of {n} workers: {type(exc).__name__}: {exc}") from None

    def _connect(self) -> None:
        where = self.where
        kwargs: dict[str, Any] = {"set_as_default": False, "timeout": self.timeout}
        if self.security is not None:
            kwargs["security"] = self.security
        if self.scheduler_file:
            kwargs["scheduler_file"] = self.scheduler_file
        t0 = time.monotonic()
        try:
            self.client = Client(self.address, **kwargs)
        except ValueError as exc:  # an address _scheduler_address let through that Dask cannot parse
            self._close_quietly()
            raise UsageError(f"{where!r} is not a Dask scheduler address Dask can use ({exc}): "
                             f"{_ADDRESS_LOOKS}") from None
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:  # (two classes before 3.11)
            waited = time.monotonic() - t0
            self._close_quietly()
            hint = (
                "check the address and that `dask scheduler` runs there"
                + (", and that the certificates match the scheduler's" if self.security else "")
                + "; timeout=S (--timeout S) waits longer"
            )
            raise MPMagicError(
                f"could not connect to the Dask scheduler at {where} within the timeout of "
                f"{self.timeout:g} s (gave up after {waited:.1f} s: {exc}); {hint}"
            ) from None

    def _nthreads(self, fresh: bool = False) -> dict[str, int]:
        """Worker address -> threads; asked of the scheduler at most once a second
        unless ``fresh`` (one round trip saved on every warm call)."""
        now = time.monotonic()
        if fresh or self._nthreads_cache is None or now - self._nthreads_cache[0] > 1.0:
            self._nthreads_cache = (now, dict(self.client.nthreads()))
        listed = self._nthreads_cache[1]
        if not self._killed:
            return listed
        with self._lock:  # workers mpmagic killed are gone: forgotten once the scheduler lists them no more
            for address, when in list(self._killed.items()):
                if address not in listed or now - when > _KILLED_LISTED:
                    del self._killed[address]
            return {a: n for a, n in listed.items() if a not in self._killed}

    @property
    def worker_wait(self) -> float:
        """Seconds a run waits for workers to (re)join: the ``timeout``; on mpmagic's
        own ``LocalCluster`` at least 30 s, the time its nannies may take to start
        new worker processes on a busy machine (as ``restart`` allows)."""
        return max(self.timeout, 30.0) if self.owns_cluster else self.timeout

    def _heal(self) -> None:
        """On mpmagic's own ``LocalCluster``: start again the workers whose nanny
        Dask closed (``_OwnLocalCluster`` keeps it from doing so after a crash;
        this is for any other way). ``scale`` to the size it has opens every
        worker of its spec that has no nanny."""
        cluster = self.cluster
        if not self.owns_cluster or cluster is None:
            return
        try:
            if set(cluster.worker_spec) - set(cluster.workers):
                log.debug("mpmagic: starting again the Dask workers whose nannies were closed")
                cluster.scale(len(cluster.worker_spec))
        except Exception:  # (a cluster closing meanwhile: the run's own checks say what became of it)
            log.debug("mpmagic: could not start the closed Dask workers again", exc_info=True)

    def _wait_for_workers(self, n: int) -> dict[str, int]:
        """Worker address -> threads, once at least ``n`` workers are there
        (``n`` is the ``-n`` of ``%pool dask`` when above 1, else "any");
        up to ``worker_wait`` seconds."""
        wait = self.worker_wait
        deadline = time.monotonic() + wait
        fresh = False
        while True:
            nthreads = self._nthreads(fresh)
            fresh = True
            if len(nthreads) >= n:
                return nthreads
            self._heal()
            if time.monotonic() >= deadline:
                have = f"{_cap(self.where)} has {len(nthreads)} worker{'s' if len(nthreads) != 1 else ''}"
                if n > 1:
                    have += f", fewer than the {number_text(n)} asked for, and no more joined"
                else:
                    have += ", and none joined"
                if self.owns_cluster:
                    todo = ("restart_pool() (`%pool restart`) to start them again, or use_local() (`%pool local`) "
                            "to run on this machine")
                else:
                    todo = (f"start {'more' if nthreads else 'workers'} with "
                            f"`dask worker {self.client.scheduler.address}` (or scale the cluster)")
                raise MPMagicError(f"{have} within {wait:g} s: {todo}")
            time.sleep(0.1)

    def stop(self, timeout: float = 2.0, kill_after: float | None = None, *, by: str | None = None) -> None:
        """Disconnect; a local cluster mpmagic started is shut down (its processes end).
        ``kill_after``: its worker processes are killed that many seconds into the close
        (busy ones end then, not when the close gives up on them). ``by``: what asked
        for the stop, in the user's words, kept as ``stopped_by`` for the runs it fails."""
        with self._lock:
            client, cluster = self.client, self.cluster
            self.client = self.cluster = None
            self.stopped_by = by  # (before the count: a run that sees the count reads this)
            self.stops += 1
            self._payloads.clear()
            self._nthreads_cache = None
            self._killed.clear()
        if client is not None:
            from .dask_shared import closed_by, serving  # (the helpers made on it name the stop)

            serving(client, None)
            if by is not None:
                closed_by(client, by)
        if client is not None and not self.owns_cluster and worker_setup.has_setup():
            worker_setup.dask_remove(client)  # worker setup: leave a shared cluster as we found it
        if client is not None:
            try:
                with _quiet_client_log():
                    client.close(timeout=timeout)
            except Exception:
                log.info("mpmagic: closing the Dask client failed", exc_info=True)
        if cluster is not None:
            self._close_cluster(cluster, max(timeout, _CLOSE_GRACE), kill_after)
        silenced, self._silenced = self._silenced, None
        if silenced is not None:
            silenced.restore()
        main_hidden, self._main_hidden = self._main_hidden, None
        if main_hidden is not None:
            main_hidden()

    def retire(self, timeout: float = 2.0, wait_busy: bool = True, *, by: str | None = None) -> None:
        """Stop this pool for good: another pool replaced it (``use_local``, ``use_dask``,
        the extension's unload), or the exit. Dask's tasks are cancelled; ``wait_busy=False``
        (a Ctrl-C at exit) kills the busy workers of mpmagic's own cluster after
        ``_CLOSE_AT_ONCE``, not the grace its close may take otherwise.

        A run that chose this pool just before it was replaced (another thread's ``pmap``,
        waiting for its turn while ``use_local()`` stopped the cluster) then fails with
        "the pool was stopped by BY while this run was in flight: run it again"; nothing starts or connects
        it again. Its run used to start a new cluster: its worker process ran on, out of
        ``%pool``'s sight and out of ``stop_pool()``'s reach, one more per switch, until
        the interpreter exited. ``by``: what replaced it, as ``stop``'s.
        """
        with self._lock:
            self._retired = True
        self.stop(timeout, kill_after=None if wait_busy else _CLOSE_AT_ONCE, by=by)

    @staticmethod
    def _close_cluster(cluster: Any, timeout: float, kill_after: float | None = None) -> None:
        """Close mpmagic's own ``LocalCluster``; kill the worker processes that outlive it.

        A nanny still starting a worker (one a ``--timeout`` or a cancel killed
        a moment ago) keeps Dask's close waiting for that worker to come up, so
        the close timed out, printed a traceback, and left the new worker
        process running in the kernel. Whatever is alive after ``timeout`` is
        killed here: the close always ends, and says nothing (Dask's own
        records of it go to mpmagic's debug log).

        ``kill_after`` (a Ctrl-C at exit): the worker processes are killed that
        many seconds into the close. A worker busy with a task took the close
        ~4 s; a close cut short by a timeout instead is closed again by Dask's
        own exit hook, which waited 10 s more. Killed while their nannies close,
        they are not started again, and the close ends at once."""
        processes = _worker_processes(cluster)
        killer = None
        if kill_after is not None:
            killer = threading.Timer(kill_after, _kill_left, args=(processes,))
            killer.daemon = True
            killer.start()
        try:
            with _quiet_dask_log():
                cluster.close(timeout=timeout)
        except Exception as exc:  # (Dask's TimeoutError: a nanny waits for its starting worker)
            log.debug("mpmagic: closing mpmagic's local Dask cluster did not end in %g s: %s", timeout, exc)
        finally:
            if killer is not None:
                killer.cancel()
        _kill_left(processes)

    def _close_quietly(self) -> None:
        try:
            self.stop(timeout=1.0)
        except Exception:
            pass

    def restart(self, wait: bool = True, *, by: str | None = None) -> None:
        """Start afresh (``by``: as ``stop``'s). On the ``LocalCluster`` mpmagic started, restart every worker
        process (``client.restart()``: clears their state, stops tasks an interrupt
        left running, releases every key; ``wait``: until they are back). On a
        cluster it connected to, restart nothing (its workers may serve others):
        drop this notebook's cached function payloads there and say so."""
        self.start()
        self._payloads.clear()  # releases them on the cluster
        self._nthreads_cache = None
        if not self.owns_cluster:
            sys.stderr.write(
                f"mpmagic: did not restart the workers of {self.where}: the cluster is not mpmagic's "
                "(its workers may serve others). Dropped this notebook's cached functions there; tasks an "
                "interrupt or a timeout left running finish in the background. To clear the workers' state, "
                "restart them where the cluster runs.\n"
            )
            return
        self.stopped_by = by  # (before the count: a run that sees the count reads this)
        self.stops += 1  # (its tasks are cancelled: a run in flight says the pool was stopped)
        self._new_setup_key()  # new processes import the setup's modules as they are now
        if worker_setup.has_setup():
            worker_setup.sent(self._setup_key())
        try:
            self.client.restart(timeout=max(self.timeout, 30.0), wait_for_workers=wait)
        except ValueError as exc:  # workers without nannies
            raise MPMagicError(f"Dask cannot restart these workers ({exc}); restart them where they run") from None
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:  # (two classes before 3.11)
            raise MPMagicError(f"the Dask workers did not come back after a restart: {exc}") from None

    def check_workers(self, workers: int | None) -> None:
        """Nothing to check before a map: a cluster's size is the cluster's business (see Backend)."""

    def check_ranks(self, size: int) -> None:
        """A usage error for a cell of ``size`` ranks the cluster has too few worker processes
        for (one per rank, as ``_rank_workers`` places them), before the run builds one
        unit per rank: ``-n 10**30`` ran out of memory before this was asked.

        Running: the workers it has (asked of the scheduler afresh before refusing),
        or the most it had (a worker restarting after a timeout is waited for). Not
        running: the size mpmagic's own cluster starts at; a cluster elsewhere is
        counted when the run connects, and only more than ``_MOST_RANKS`` is refused now.
        """
        if size <= _MOST_RANKS and size <= self._most_workers:
            return
        if self.running:
            try:
                have = len(self._nthreads())
                if size > max(have, self._most_workers):
                    have = len(self._nthreads(fresh=True))
            except Exception:  # (the scheduler went away: the run says so, and refuses too many ranks then)
                log.debug("mpmagic: could not count the Dask workers", exc_info=True)
            else:
                if size > max(have, self._most_workers):
                    raise self._too_few_workers(size, have)
                return
        elif self.owns_cluster:
            have = self.requested_workers or available_cpus()
            if size > have:
                raise self._too_few_workers(size, have)
            return
        if size > _MOST_RANKS:
            raise size_refused("{} is more ranks than mpmagic runs at once (at most "
                               f"{_MOST_RANKS}: each rank is a Dask worker process of its own)", size)

    def _too_few_workers(self, size: int, have: int) -> UsageError:
        """The error for a cell of ``size`` ranks on a cluster of ``have`` worker processes."""
        where = str(self.where).replace("{", "{{").replace("}", "}}")  # (a template: see size_refused)
        return size_refused(
            f"{{}} needs {number_text(size)} Dask worker processes at once (one per rank), and "
            f"{where} has {have}: use {{}} or fewer, or add workers"
            + (" (start_pool(workers=N), %pool resize N)" if self.owns_cluster else " (`dask worker ADDRESS`, or scale the cluster)"),
            size, have)

    def resize(self, workers: int) -> None:
        """Scale the local cluster mpmagic started (-1: one worker per usable CPU); a cluster
        run elsewhere is scaled there."""
        workers = check_whole("workers", available_cpus() if whole(workers) == -1 else workers, 1,
                              "a whole number of at least 1 or -1 (one per usable CPU)")
        if not self.owns_cluster:
            raise UsageError(
                f"the workers of {self.where} are managed where the cluster runs: start more "
                "`dask worker` processes, or call cluster.scale(N) on its dask-jobqueue or "
                "Kubernetes cluster object"
            )
        workers = pool_size(workers)  # this machine's limit, before the scale (100000 hung starting them)
        self.requested_workers = workers
        if not self.running:
            return
        self.cluster.scale(workers)
        self._nthreads_cache = None
        deadline = time.monotonic() + max(self.timeout, 30.0)
        while len(self.client.nthreads()) != workers:
            if time.monotonic() > deadline:
                raise MPMagicError(f"the local Dask cluster did not reach {workers} workers in time")
            time.sleep(0.1)

    @property
    def workers(self) -> int:
        """Worker processes connected now (what ``-n`` defaults to)."""
        if self.running:
            try:
                return max(1, len(self._nthreads()))
            except Exception:  # the scheduler went away: say what was asked for
                log.debug("mpmagic: could not count the Dask workers", exc_info=True)
        return self.requested_workers or (available_cpus() if self.owns_cluster else 1)

    def apply_setup(self, wait: bool = True) -> list[str]:
        """Run the current worker setup on every worker, now and on joining ones (worker_setup.py)."""
        if not self.running:
            self._setup_errors = []
            self.start()  # connecting installs the setup
            return list(self._setup_errors)
        worker_setup.sent(self._setup_key())
        return worker_setup.dask_apply(self.client, self._events_topic())

    def _setup_key(self) -> Any:
        """The key ``worker_setup`` stamps this cluster's setup module files under
        (``setup_workers``). mpmagic's own cluster: one per start and restart (new
        processes). A cluster it connected to: its scheduler's address, for the
        session: its workers may keep a module they imported from an earlier
        connection, and mpmagic cannot tell when they restart."""
        if self.owns_cluster:
            return self._own_setup_key
        return ("dask", self.scheduler_address or self.where)

    def _new_setup_key(self) -> None:
        """mpmagic's own cluster has new worker processes: stamps start afresh."""
        worker_setup.forget_stamps(self._own_setup_key)
        self._own_setup_key = ("dask-own", next(_SETUP_KEYS))

    # -- status ------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<mpmagic Dask pool: {self.where}, {'running' if self.running else 'stopped'}>"

    def _dashboard(self, link: str) -> str | None:
        """``link``, or None when it answers 404: a scheduler started with
        ``--no-dashboard`` still lists its HTTP server (health checks, metrics)
        as "dashboard" in its services, and the link Dask makes of it showed in
        ``%pool`` as the dashboard, a page that is not there. Asked once per link."""
        if self._dashboard_checked is None or self._dashboard_checked[0] != link:
            self._dashboard_checked = (link, _serves_a_page(link))
        return link if self._dashboard_checked[1] else None

    @property
    def owns_workers(self) -> bool:
        """Only for the cluster mpmagic started (``%pool restart`` restarts it): the workers
        of one it connected to are managed where that cluster runs."""
        return self.owns_cluster

    def replace_setting_up(self) -> list[Any]:
        """None replaced (see ``Backend``): a Dask worker runs the setup plugin as it
        registers; mpmagic does not track which is still in it."""
        return []

    def setup_workers(self) -> list[Any] | None:
        """The one key ``worker_setup`` stamped the setup's module files under as this
        notebook sent the setup to the cluster (``_setup_key``; see ``Backend``): Dask
        workers do not report when each ran it, and one that joins later (a nanny's
        restart, a resize) imports the file as it is then, which a stamp taken before
        only ever takes for changed. None: no stamp tells (the checkpoint then runs
        without a setup that imports the user's modules)."""
        key = self._setup_key()
        return [key] if worker_setup.recorded(key) else None

    def status(self) -> dict[str, Any]:
        """For ``%pool``: scheduler, dashboard, workers with threads and memory."""
        base: dict[str, Any] = {
            "backend": "dask",
            "cluster": "local cluster started by mpmagic" if self.owns_cluster else "a running scheduler's cluster",
            "owned": self.owns_cluster,
            "scheduler": self.address or self.scheduler_file,
            "running": self.running,
            "calls_run": self.calls_run,
            "tasks_run": self.tasks_run,
            "dashboard": None,
            "workers": 0,
            "threads": 0,
            "memory_limit": 0,
            "processes": [],
        }
        if not self.running:
            return base
        try:
            info = self.client.scheduler_info(n_workers=-1)
        except Exception as exc:
            base["error"] = f"scheduler unreachable: {exc}"
            return base
        base["scheduler"] = info.get("address") or self.client.scheduler.address
        if "dashboard" in info.get("services", {}):
            try:
                base["dashboard"] = self._dashboard(self.client.dashboard_link)
            except Exception:
                log.debug("mpmagic: no dashboard link", exc_info=True)
            if base["dashboard"] is None:
                base["dashboard_off"] = True
        try:
            # Tasks running now, as the scheduler has them at this moment: the workers'
            # own counts in scheduler_info are heartbeat metrics of a moment ago
            # (a worker idle since showed "1 running", a busy one none).
            processing: dict[str, Any] | None = dict(self.client.processing())
        except Exception:  # (no figure rather than a wrong one)
            log.debug("mpmagic: could not ask the Dask scheduler for its tasks", exc_info=True)
            processing = None
        # Tasks this notebook gave up on run on, but the scheduler forgot them when they were cancelled.
        stuck = self._busy({a: w.get("nthreads", 0) for a, w in info.get("workers", {}).items()})
        procs = []
        for addr, w in sorted(info.get("workers", {}).items()):
            metrics = w.get("metrics", {})
            nthreads = w.get("nthreads", 0)
            # (processing: assigned to the worker, at most one running per thread)
            running = (
                None if processing is None else min(len(processing.get(addr, ())) + stuck.get(addr, 0), nthreads)
            )
            procs.append(
                {
                    "address": addr,
                    "name": w.get("name"),
                    "host": w.get("host"),
                    "threads": w.get("nthreads", 0),
                    "memory": metrics.get("memory"),
                    "memory_limit": w.get("memory_limit") or None,
                    "executing": running,
                }
            )
        if worker_setup.has_setup():  # worker setup (worker_setup.py): set up or failed, per worker
            try:
                replies = self.client.run(worker_setup.dask_status)
            except Exception:  # a worker leaving meanwhile: its state shows as "setting up"
                log.debug("mpmagic: could not ask the Dask workers for their setup state", exc_info=True)
                replies = {}
            for p in procs:
                p["setup"] = worker_setup.dask_state(replies.get(p["address"]))
        base["processes"] = procs
        base["workers"] = len(procs)
        base["threads"] = sum(p["threads"] for p in procs)
        base["memory_limit"] = sum(p["memory_limit"] or 0 for p in procs)
        return base

    def _events_topic(self) -> str:
        """The Dask event topic this client's tasks report on (start, output lines).

        One per connection, not per call: the scheduler keeps a bounded log per
        topic but never drops topics. Events of runs that ended are ignored.
        """
        with self._lock:
            if self._topic_client is not self.client:
                self._topic = f"mpmagic-{uuid.uuid4().hex[:12]}"
                self.client.subscribe_topic(self._topic, self._on_event)
                self._topic_client = self.client
            return self._topic

    def _on_event(self, event: Any) -> None:
        msg = event[1] if isinstance(event, tuple) and len(event) > 1 else None
        if isinstance(msg, dict) and msg.get("mpmagic_setup"):  # a worker that joined or restarted ran the setup
            for text, stream in worker_setup.dask_event(msg):  # (what it printed: the next run's cell, labelled)
                self._said_later.hold(text, stream)
            return
        if isinstance(msg, dict) and msg.get("end"):
            with self._lock:  # (Dask's thread): a task's worker thread is free again
                tag = msg.get("tag", "")
                self._abandoned.pop(tag, None)
                self._ended[tag] = None
                while len(self._ended) > 1000:
                    self._ended.popitem(last=False)
        sink = self._event_sink
        if sink is not None:
            sink(event)

    # -- tasks given up on while they ran ------------------------------------
    def _give_up(self, tasks: list[_Task], stop: bool) -> list[str]:
        """Note running ``tasks`` this notebook gave up on (their futures are
        cancelled already); with ``stop``, on the ``LocalCluster`` mpmagic
        started, kill their worker processes (the nannies start new ones).

        Dask cannot stop a running task: on a cluster mpmagic connected to, the
        task runs on and its worker thread stays busy until it returns, so later
        runs send no work to that worker meanwhile (``_plan``). Returns the
        addresses of the workers that were killed.
        """
        killed = self._kill_workers({t.worker for t in tasks if t.worker}) if stop and self.owns_cluster else []
        with self._lock:  # (a killed worker is not busy: it is gone, and a new one starts)
            for t in tasks:
                if t.worker and t.key not in self._ended and t.worker not in killed:
                    self._abandoned[t.key] = t.worker
        return killed

    def _kill_workers(self, addresses: set[str]) -> list[str]:
        """Kill these worker processes of mpmagic's own ``LocalCluster`` at once;
        their nannies start new ones in the background. Never waits for them:
        a nanny's own restart first asks the worker to close (4 s for a stuck
        task) and could take its 30 s limit, in the caller's wait."""
        cluster = self.cluster
        killed = []
        for nanny in list(getattr(cluster, "workers", {}).values()) if cluster is not None else []:
            address, pid = getattr(nanny, "worker_address", None), getattr(nanny, "pid", None)
            if address in addresses and pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(address)
                except OSError:
                    log.debug("mpmagic: could not kill Dask worker %s (pid %s)", address, pid, exc_info=True)
        now = time.monotonic()
        with self._lock:
            self._killed.update((address, now) for address in killed)
        self._forget_workers(cluster, killed)
        rest = sorted(addresses - set(killed))
        if rest:  # (no nanny process found: Dask's own restart, in the background; busy until then)
            threading.Thread(target=_restart_quietly, args=(self.client, rest, self._said_later.hold),
                             daemon=True).start()
        return killed

    @staticmethod
    def _forget_workers(cluster: Any, addresses: list[str]) -> None:
        """Tell mpmagic's own scheduler (in this process) at once that these killed
        workers are gone. Until it noticed, it sent the next task to a live worker
        with the function's payload to fetch from the dead one, and Dask's connect
        retried that for its 30 s limit (a call after a cancel took 30 s, 1 run in 3)."""
        scheduler = getattr(cluster, "scheduler", None)
        if scheduler is None:
            return
        for address in addresses:
            try:
                cluster.sync(scheduler.remove_worker, address=address, stimulus_id=f"mpmagic-killed-{time.time()}",
                             close=False, callback_timeout=2.0)
            except Exception:  # (the scheduler notices the closed connection itself)
                log.debug("mpmagic: could not tell the scheduler that worker %s is gone", address, exc_info=True)

    def _busy(self, nthreads: dict[str, int]) -> dict[str, int]:
        """Worker address -> threads still held by tasks given up on (workers that
        left the cluster are forgotten)."""
        with self._lock:
            for key, address in list(self._abandoned.items()):
                if address not in nthreads:
                    del self._abandoned[key]
        self._expire_abandoned()
        with self._lock:
            busy: dict[str, int] = {}
            for address in self._abandoned.values():
                busy[address] = busy.get(address, 0) + 1
            return busy

    def _expire_abandoned(self) -> None:
        """Forget the tasks given up on that their workers no longer run.

        A mark is cleared by the task's end event, but that event does not
        always come: after the client reconnected to the scheduler its topic
        is no longer subscribed, and an event can be lost on the way. The
        worker then stayed "busy" for the rest of the session, and every later
        run (``--scaling`` too) left it out. So, at most once a second while
        marks are left, the marked workers are asked which mpmagic tasks they
        run (``dask_tasks.running_tags``); a worker that does not answer keeps
        its marks. The asking runs in a thread of its own, one at a time, and
        a run waits on it for 2 s at most: ``Client.run`` has no timeout, and a marked worker
        whose event loop a task holding the GIL stalls, or one dying, kept a
        run that asked it waiting (a map whose item killed its worker hung
        past the test's 300 s)."""
        now = time.monotonic()
        with self._lock:
            if (not self._abandoned or now - self._abandoned_asked < _ABANDONED_ASKED
                    or self._abandoned_asking):
                return
            self._abandoned_asked = now
            self._abandoned_asking = True
            marked = dict(self._abandoned)
        asking = threading.Thread(target=self._ask_abandoned, args=(marked,), name="mpmagic-dask-ask-busy",
                                  daemon=True)
        asking.start()
        asking.join(_ABANDONED_WAIT)  # (the answer, for this run, when it comes soon; else the marks stay)

    def _ask_abandoned(self, marked: dict[str, str]) -> None:
        """:meth:`_expire_abandoned`'s question, in its own thread: drop the marks of
        ``marked`` (task key -> worker address) whose workers answered without them."""
        try:
            replies = self.client.run(dask_tasks.running_tags, workers=sorted(set(marked.values())),
                                      on_error="return")
        except Exception:
            log.debug("mpmagic: could not ask the Dask workers which tasks they still run", exc_info=True)
            replies = {}
        with self._lock:
            self._abandoned_asking = False
            for key, address in marked.items():
                tags = replies.get(address)
                if isinstance(tags, list) and key not in tags:
                    self._abandoned.pop(key, None)

    def _plan(
        self, nthreads: dict[str, int], workers: int | None, depth: int, quiet: bool = False
    ) -> tuple[list[str] | None, int, int]:
        """Where a map's chunks may go and how many may be in flight:
        ``(worker addresses or None for any, capacity, worker threads it runs on)``.

        Workers still busy with a task given up on are left out (their queue
        would hold the chunks until that task returns), and ``workers`` (``-n``)
        caps the tasks running at once: the chunks go to that many worker
        threads, two in flight per thread (``depth``), or, where worker
        threads do not add up to it, one per asked worker.
        """
        busy = self._busy(nthreads)
        free = {a: n - busy.get(a, 0) for a, n in nthreads.items() if n - busy.get(a, 0) > 0}
        total = sum(free.values())
        want = min(workers or total, total)
        if busy and not quiet:
            self._say_busy(busy, free, want)
        if not free:  # every worker is busy: the run waits for them (said above)
            threads = min(workers or sum(nthreads.values()), sum(nthreads.values()))
            return None, max(1, threads) * depth, max(1, threads)
        picked, threads = [], 0
        for address in sorted(free, key=lambda a: (-free[a], a)):
            if threads + free[address] <= want:
                picked.append(address)
                threads += free[address]
        if threads != want:  # (multi-threaded workers that cannot make up ``want``)
            picked, depth = sorted(free), 1
        # (Restricted while a worker mpmagic killed is still listed: Dask would send chunks there.)
        restrict = None if len(picked) == len(nthreads) and not self._killed else picked
        return restrict, want * depth, want

    def _say_busy(self, busy: dict[str, int], free: dict[str, int], want: int = 0) -> None:
        """One line: which workers a run leaves out, or that it waits for them.
        ``want``: the worker threads the run uses (the report's line counts them too)."""
        names = ", ".join(sorted(busy))
        one = len(busy) == 1
        what = (
            f"Dask worker{'' if one else 's'} {names} {'is' if one else 'are'} still busy with a task an earlier "
            "timeout or interrupt gave up on (Dask cannot stop a running task)"
        )
        if free:
            total = sum(free.values())
            want = want or total
            uses = f"the other {total}" if want == total else f"{want} of the other {total}"
            sys.stderr.write(f"mpmagic: {what}: this run uses {uses} worker thread{'s' if total != 1 else ''}\n")
        else:
            sys.stderr.write(f"mpmagic: {what}, and no other worker is free: this run waits until they return\n")

    def _payload_future(self, key: bytes, data: bytes, workers: list[str] | None = None) -> Any:
        """A future for the function payload, reused by later calls of the same function.

        Not ``scatter``: scattered data that loses its last replica (its workers
        died) cannot be recomputed, and Dask cancels every task that needs it.
        A task that returns the bytes can be: the scheduler keeps its input and
        runs it again. Its result is replicated to every worker once.

        ``workers``: where the run's chunks may go (``_plan``). The payload is
        computed there too: on a worker still busy with a task given up on, it
        waited behind that task, and every chunk with it, none of them started,
        so no --timeout could fire (a hang for as long as the old task ran).
        """
        with self._lock:
            if payload_cache.news(self._retired_seen):
                self._forget_retired()
            held = self._payloads.get(key)
            fut = held.future if held is not None else None
            if fut is not None and (fut.status == "finished" or (fut.status == "pending" and workers is None)):
                self._payloads.move_to_end(key)
                return fut
            where: dict[str, Any] = {} if workers is None else {"workers": workers, "allow_other_workers": False}
            fut = self.client.submit(
                dask_tasks.hold, data, key=f"mpmagic-payload-{key.hex()[:16]}-{uuid.uuid4().hex[:8]}", pure=False,
                **where,
            )
            # On every worker now, so that where it was computed does not pull the
            # chunks there (Dask places tasks near their data).
            # (In the background: a slow or dying worker must not hold the call.)
            threading.Thread(target=_replicate_quietly, args=(self.client, fut), daemon=True).start()
            self._payloads.pop(key, None)  # (a newer one's place: the most recent)
            self._payloads[key] = _HeldPayload(fut, len(data))
            for old in payload_cache.excess(self._payloads, attrgetter("size"), _PAYLOADS_ALWAYS):
                del self._payloads[old]  # (released on the cluster)
            return fut

    def _forget_retired(self) -> None:
        """Payloads the notebook's cache dropped (a function defined again, a global it
        captures rebound: ``payload_cache.retired_since``): their hold futures go (Dask's
        copy of the bytes on every worker), and the workers drop their loaded copies,
        each holding all its function captured (``dask_tasks.forget``). In the
        background, as the replication: a busy or slow worker must not hold the run."""
        keys, self._retired_seen = payload_cache.retired_since(self._retired_seen)
        if not keys or self.client is None:
            return
        for key in keys:
            self._payloads.pop(key, None)
        threading.Thread(target=_forget_quietly, args=(self.client, keys), daemon=True).start()

    # -- shared helpers ------------------------------------------------------
    def make_shared(self, kind: str, *args: Any, **kwargs: Any) -> Any:
        """``mpmagic.Queue()`` etc. on this cluster (Dask's coordination primitives)."""
        from .dask_shared import make_shared

        self.start()
        return make_shared(self.client, kind, *args, **kwargs)

    # -- running a job -----------------------------------------------------
    @property
    def cold(self) -> bool:
        """The cluster's workers are up before any run (``start`` waits for them)."""
        return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Start (connect) and wait for at least one worker."""
        self.start()
        self._wait_for_workers(1)

    def submit(self, job: Job, workers: int | None = None, background: bool = False) -> DrivenRun:
        """A run handle; the thread that waits on it drives the job (see ``engine.DrivenRun``).

        Ctrl-C lands in that wait as in ``run``, which cancels the run's futures.
        Once the exit hook began, a daemon thread's new run ends that thread (``exiting.refuse_late_run``).
        """
        exiting.refuse_late_run()
        stops = self.stops  # (in flight from here: a stop before its turn ends it, see ``run``)

        def drive() -> None:
            __tracebackhide__ = True
            if not self._take_turn(run):
                return  # (cancelled while it waited for its turn: nothing sent, its job's failure says so)
            try:
                self._driving = run
                try:
                    self._run(job, workers, stops)
                finally:
                    self._driving = None
            finally:
                self._run_lock.release()

        # The user's modules the notebook reloaded: each task of the run has its worker reload them first.
        self._reloads.check(job.func, job.func_key)
        run = DrivenRun(job, drive)
        run.background = background
        if not background:
            self._foreground.add(run)
        return run

    def run_of(self, job: Job) -> DrivenRun | None:
        """None (see ``Backend.run_of``): a Dask run begins in the first wait on its
        handle (``engine.DrivenRun``), so one its caller never held has sent nothing."""
        return None

    def _take_turn(self, run: DrivenRun) -> bool:
        """Acquire ``_run_lock`` for ``run``: runs take turns on this backend. True once
        taken; False, not taken, once ``run`` was cancelled while it waited.

        A foreground run that waits more than :data:`TURN_NOTICE` seconds for
        another run of this notebook says so in one line, naming that run (a
        quick ``%pmap`` behind an 8 s ``--bg`` run sat there for 8 s in silence),
        and its report counts the wait as one for workers busy with another run.
        The rest of the wait is in slices of ``engine.SIGNAL_POLL``: a cancel of the
        waiting run (``background.Run.cancel``: ``DrivenRun.cancel_requested``) ends it, as
        does, in the main thread, a Ctrl-C another thread took. In one wait with no
        limit, both came only once the run holding the turn had ended (an hour's
        run: an hour; ``cancel()`` returned after its 10 s with the run "running").
        """
        __tracebackhide__ = True
        if self._run_lock.acquire(blocking=False):
            return True
        t0 = time.monotonic()
        if run.background or not self._run_lock.acquire(timeout=TURN_NOTICE):
            if not run.background:
                sys.stderr.write(f"mpmagic: this run waits for {self._describe(self._driving)} to end: on Dask the "
                                 "runs of one notebook take turns, one at a time (%pool runs lists the background ones, %pool cancel ID "
                                 "stops one; see docs/dask.md)\n")
            while not self._run_lock.acquire(timeout=SIGNAL_POLL):
                if run.cancel_requested or run.job.failure is not None:
                    return False
        self._note_turn_wait(run, t0)
        return True

    @staticmethod
    def _note_turn_wait(run: DrivenRun, t0: float) -> None:
        """The run's report: its wall time counts its wait for another run's turn."""
        waited = time.monotonic() - t0
        if waited > 0.05:
            run.job.shared_workers = True
            run.job.waited_for_workers += waited

    @staticmethod
    def _describe(holder: DrivenRun | None) -> str:
        """The run holding the backend, as the waiting run's line names it."""
        if holder is None:
            return "another run"
        if holder.label:  # a background run's handle: "run 3 (pmap nap)"
            return f"background {holder.label}"
        job = holder.job
        kind = {"map": "a pmap", "cell": "a %%parallel cell"}.get(job.kind, "a run")
        func = job.func if job.kind == "map" else None
        return kind + (f" of {func_name(func)}" if func is not None else "") + f" in thread {holder.thread!r}"

    @contextlib.contextmanager
    def runs_held(self) -> Iterator[list[Any]]:
        """Yield the run being driven now (empty when none; None for one of unknown origin); while the body runs with
        none, no run starts (runs take turns on ``_run_lock``).

        For a change every run depends on, the worker setup (``setup_api``): its
        plugin is registered on every worker at once, tasks running or not, so it
        is made only between runs, and a run waiting for its turn starts after it.
        """
        if not self._run_lock.acquire(blocking=False):
            yield [self._driving]  # (None: a run started by ``run`` itself, scaling's)
            return
        try:
            yield []
        finally:
            self._run_lock.release()

    def run(self, job: Job, workers: int | None = None) -> None:
        """Drive ``job`` to completion on the cluster; raise what interrupts it.

        ``workers`` limits a map to that many chunks running at once.
        """
        __tracebackhide__ = True
        # One run at a time on this backend: the task events have one sink
        # (``_event_sink``), so a background run and a foreground one take turns.
        # A run waiting for its turn is in flight: a stop meanwhile (``%pool stop``,
        # ``restart``) ends it as it ends the run being driven, as on the local pool
        # (it started a new cluster once its turn came, and ran after the stop).
        stops = self.stops
        with self._run_lock:
            self._run(job, workers, stops)

    def _run(self, job: Job, workers: int | None, stops_before: int) -> None:
        __tracebackhide__ = True
        self._said_later.say()  # (what mpmagic's threads had to say while no run was in flight: this run's cell, first)
        with self._lock:
            if self._retired or self.stops != stops_before:  # (replaced or stopped while it waited for its turn)
                raise exiting.stopped_error(self.stopped_by)
            self.start()
            stops = self.stops
        try:
            run = self._prepare(job, workers, stops)
        except Exception:
            if self.stops != stops:  # stopped (or replaced) from another thread meanwhile: the stop is the cause
                raise exiting.stopped_error(self.stopped_by) from None
            raise
        run.execute()

    def _prepare(self, job: Job, workers: int | None, stops: int) -> _DaskRun:
        """``_run``'s plan of the run, on the cluster as it was when ``stops`` was read."""
        __tracebackhide__ = True
        self._heal()
        self.calls_run += 1
        if not self.owns_cluster:  # (%pool restart restarts nothing there, and sys.path is not sent)
            job.missing_module_advice = CONNECTED_MISSING_MODULE
        t0 = time.monotonic()
        nthreads = self._wait_for_workers(1)
        if time.monotonic() - t0 > 0.5:  # no worker at first: the wall time counts the wait for one to join
            job.shared_workers = True
            job.waited_for_workers += time.monotonic() - t0
        self._most_workers = max(self._most_workers, len(nthreads))
        targets: list[str] = []
        restrict: list[str] | None = None
        if job.kind == "cell":
            size = job.size  # its ranks
            nthreads = self._nthreads(fresh=True)  # ranks are pinned: no stale addresses
            if len(nthreads) < size <= self._most_workers:
                # A worker is restarting (after a timeout or a crash): wait for it.
                nthreads = self._wait_for_workers(size)
            targets = self._rank_workers(size, nthreads)
            capacity = size
        else:
            depth = 1 if job.timeout else 2  # one queued behind each running chunk hides the round trip
            stuck = self._busy(nthreads)
            if stuck and all(stuck.get(a, 0) >= n for a, n in nthreads.items()):
                job.shared_workers = True  # every worker busy with a task given up on: the run waits for one
            restrict, capacity, job.ran_on = self._plan(nthreads, workers, depth)
        run = _DaskRun(self, job, capacity, targets, restrict)
        run.stops = stops
        run.asked = workers
        if job.kind == "map" and restrict is None:
            run.spread = nthreads
        return run

    def _rank_workers(self, size: int, nthreads: dict[str, int]) -> list[str]:
        """One distinct worker process per rank, or a clear error."""
        if len(nthreads) < size:
            raise self._too_few_workers(size, len(nthreads))
        # Idle workers first, so ranks start at once on a shared cluster; last,
        # those still busy with a task this notebook gave up on (Dask does not
        # count those: their ranks would wait until that task returns).
        try:
            busy = {a: len(ks) for a, ks in self.client.processing().items()}
        except Exception:
            busy = {}
        stuck = self._busy(nthreads)
        chosen = sorted(nthreads, key=lambda a: (stuck.get(a, 0), busy.get(a, 0), a))[:size]
        if any(a in stuck for a in chosen):
            self._say_busy({a: n for a, n in stuck.items() if a in chosen}, {})
        return chosen


def _cap(text: str) -> str:
    """``text`` to start a sentence: "the local Dask cluster" takes a capital; an address does not."""
    return text if "://" in text.split(" ", 1)[0] else text[:1].upper() + text[1:]


def _run_name(job: Job) -> str:
    """What a run is called (``%pool runs``): a map's function's name, or its type's (a partial); "cell"."""
    func = job.func
    return "cell" if func is None else getattr(func, "__name__", type(func).__name__)


#: How many times, and how far apart (s), a run whose result fetch failed with an
#: OSError asks whether the scheduler still takes connections (_scheduler_reachable):
#: only on that failure, so the ~0.5 s it may add is paid only by a run that fails.
_REACH_TRIES = 3
_REACH_PAUSE = 0.25


class _DaskRun:
    """The wait loop of one job on Dask (the counterpart of LocalBackend._loop).

    One inbox receives, from Dask's threads, the completion of each future
    and the events tasks send (start signal, output lines); the notebook's
    main thread waits on it, so Ctrl-C lands here and cancels.
    """

    def __init__(
        self, backend: DaskBackend, job: Job, capacity: int, targets: list[str], restrict: list[str] | None = None
    ) -> None:
        self.backend = backend
        self.client = backend.client
        self.job = job
        self.capacity = max(1, capacity)  # units in flight
        self.targets = targets  # a cell's ranks' workers
        self.restrict = restrict  # the workers a map's chunks may go to (None: any)
        # A map free to use every worker: their threads, to spread its chunks over (see _spread_to).
        self.spread: dict[str, int] = {}
        self._turn = 0  # which of equally loaded workers gets the next chunk (in turn)
        self.asked: int | None = None  # -n / workers=: the most tasks running at once
        # The notebook's world, for the cluster mpmagic started (same machine): see dask_tasks.
        self.world = context.current(job.call_id, job.libs) if backend.owns_cluster else None
        # The user's modules the notebook reloaded, for each task's worker to follow (dask_tasks.follow_reloads).
        self.reloads = backend._reloads.for_tasks()
        # The user's modules the job reaches, as the notebook loaded them (dask_tasks.follow_versions).
        self.versions = backend._reloads.loaded_for_tasks(job.func_key if job.kind != "cell" else None)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.token = uuid.uuid4().hex[:12]
        self.topic = backend._events_topic()
        self.tasks: dict[str, _Task] = {}
        self.deferred: list[str] = []
        self.payload_future: Any = None
        self.resent: dict[int, int] = {}  # unit id -> times resent after losing its scattered data
        self.killed: set[int] = set()  # units already resent once after a KilledWorker
        # Such units that had started on their dead worker: unit id -> the item it was running.
        # Their run alone that finishes ran those items a second time (the report says so).
        self.started_before: dict[int, int] = {}
        self.quarantine: deque[Any] = deque()  # such units, waiting to run alone
        self.solo = False  # a quarantined unit is running: nothing else is sent
        # One-item units split from a chunk that killed its worker even alone
        # (MapJob.split): each is quarantined in turn as the job hands it out.
        self.suspects: set[int] = set()
        self.stops = backend.stops  # the backend's stops when this run began (see _check_cluster)
        self.handle = backend._driving  # the run's handle (None: a run ``run`` drives), for its cancel
        self._no_workers_since: float | None = None  # since when the cluster has had no worker
        # Why this run's units cannot run (a collect map on a cluster whose workers all
        # left, none back in time): they fail as not run until a worker joins (_strand).
        self.stranded: str | None = None
        self._last_count = time.monotonic()
        self.name = _run_name(job)
        self._last_sweep = time.monotonic()
        self.began = time.monotonic()
        self._ranks_check_at = self.began + RANK_START_NOTICE  # (a cell: when to look for ranks not started)
        self._waiting_ranks: set[str] = set()  # keys of ranks said to wait for a busy worker
        self._any_started = False  # a task of this run has started (a map's first waited for the cluster)

    # -- the loop ----------------------------------------------------------
    def execute(self) -> None:
        __tracebackhide__ = True
        self.backend._event_sink = self._on_event
        try:
            key, data = self.job.func_key, self.job.func_payload
            if data is not None:
                assert key is not None  # a job that has a function payload has its content key (jobs.MapJob)
                self.payload_future = self.backend._payload_future(key, data, self.restrict)
            self._loop()
        except KeyboardInterrupt as exc:
            set_interrupt_outcome(exc, self._abandon(interrupted=True))
            raise
        except BaseException as exc:
            self._abandon(interrupted=False, stop=isinstance(exc, CancelledError))
            if self.backend.stops != self.stops and not isinstance(exc, (MPMagicError, CancelledError)):
                # Dask's own error as the pool stopped under the run (a submit to the
                # closed client): the stop is the cause, not the run's items.
                log.debug("mpmagic: a Dask run failed as the pool stopped", exc_info=True)
                raise exiting.stopped_error(self.backend.stopped_by) from None
            raise
        finally:
            self.backend._event_sink = None
            self.payload_future = None

    def _loop(self) -> None:
        job = self.job
        while not job.finished:
            self.backend._said_later.say()  # (a line of mpmagic's own threads meanwhile: in this cell)
            self._check_cluster()
            self._submit_more()
            if job.finished:
                break
            self._wait(self._next_wait())
            self._sweep()
            self._check_deadlines()
            if job.kind == "cell":
                self._check_cancelled()
                self._check_rank_workers()
                self._check_ranks_started()
                self._check_abort()
            else:
                self._check_workers_left()
        if self.tasks:  # a map that failed early, or was cancelled (Run.cancel()): drop the rest
            cancelled = isinstance(job.failure, CancelledError)
            self._abandon(interrupted=False, stop=cancelled)

    def _sweep(self) -> None:
        """Safety net, once a second: a finished future whose callback went missing
        is handled anyway, so no race in Dask's callbacks can hang the notebook."""
        now = time.monotonic()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for key, task in list(self.tasks.items()):
            if task.future.status in ("finished", "error", "cancelled") and key not in self.deferred:
                self._finish(key)

    def _next_wait(self) -> float:
        wait = 0.2
        if self.job.timeout:
            now = time.monotonic()
            for t in self.tasks.values():
                began = t.clock()
                if began is not None:
                    wait = min(wait, max(0.0, began + self.job.timeout - now))
        return wait

    def _wait(self, timeout: float) -> None:
        """Handle one message (waiting up to ``timeout``), then all that are queued."""
        if self.deferred:
            self._finish(self.deferred.pop(0))
            return
        try:
            msg = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        self._handle(msg)
        while not self.job.finished:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                break
            self._handle(msg)

    # -- from Dask's threads to the inbox ------------------------------------
    def _on_event(self, event: Any) -> None:
        self.inbox.put(("event", event[1]))

    def _on_done(self, future: Any) -> None:
        self.inbox.put(("done", future.key))

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "event":
            self._event(msg[1])
        else:
            self._finish(msg[1])

    def _event(self, ev: _TaskEvent) -> None:
        task = self.tasks.get(ev.get("tag", ""))
        if task is None:
            return  # from a task this run already gave up on
        item = ev.get("item")
        if item is not None:  # (not an output line: not counted in ``streamed``)
            task.item = item
            if item:  # (the first item's clock is the task's: it began with it, as on the local pool)
                task.item_started = time.monotonic()
            return
        if ev.get("start"):
            if task.started is not None:
                # Dask runs it again: its worker died or left running it (allowed-failures); a
                # rank only where its worker came back at its address (pinned: _check_rank_workers).
                self.job.ran_again_elsewhere(task.unit, task.item or 0)
            task.started = time.monotonic()
            task.item = task.item_started = None  # (Dask may run it again after its worker died)
            task.worker = ev.get("worker")
            first = not self._any_started
            self._any_started = True
            if task.key in self._waiting_ranks or (first and self.job.shared_workers and self.job.kind == "map"):
                # It waited for a worker busy with other tasks: the report's advice must not read
                # the wait as this run's cost ("one slow rank": the rank that waited for it).
                self.job.waited_for_workers = max(self.job.waited_for_workers, task.started - self.began)
            return
        task.streamed += 1
        self.job.output(task.unit.id, ev.get("stream", "stdout"), ev.get("text", ""))

    # -- sending -----------------------------------------------------------
    def _submit_more(self) -> None:
        job = self.job
        if self.stranded is not None:  # no worker to send them to: each fails as not run (see _strand)
            while job.has_work:
                unit = job.next_unit()
                if unit is None:
                    break
                self.suspects.discard(unit.id)
                job.not_run(unit, self.stranded)
            return
        if self.quarantine or self.solo:
            if self.tasks:
                return  # wait until the cluster is free of this run's other units
            if self.quarantine:
                self.solo = True
                self._submit(self.quarantine.popleft())
                return
            self.solo = False
        while len(self.tasks) < self.capacity and job.has_work:
            unit = job.next_unit()
            if unit is None:
                break
            if unit.id in self.suspects:  # an item of a chunk that killed its worker alone: it runs alone too
                self.suspects.discard(unit.id)
                self.killed.add(unit.id)
                self.quarantine.append(unit)
                break
            self._submit(unit)

    def _submit(self, unit: Any) -> None:
        job = self.job
        if self.handle is not None:
            self.handle.units_sent = True  # (an interrupt's one line: work of it went out)
        key = f"mpmagic-{self.name}-{job.kind}{unit.id}-{next(_keys)}-{self.token}"
        msg = pack(job.message(unit))
        arg: Any = msg
        data_future = None
        if len(msg) > _LARGE_MESSAGE:  # keep big data out of the scheduler's task graph
            arg = data_future = self.client.scatter([msg], hash=False)[0]
        kwargs: dict[str, Any] = {"key": key, "pure": False}
        target = prefer = None
        if job.kind == "cell":
            target = self.targets[unit.id]
            kwargs.update(workers=[target], allow_other_workers=False)
        elif self.restrict is not None:
            kwargs.update(workers=self.restrict, allow_other_workers=False)
        elif len(self.spread) > 1:
            prefer = self._spread_to()
            kwargs.update(workers=[prefer], allow_other_workers=True)
        future = self.client.submit(
            dask_tasks.run_message, arg, self.payload_future, self.topic, key, self.world, self.reloads,
            self.versions, **kwargs
        )
        self.tasks[key] = _Task(key, unit, future, target=target, data_future=data_future, prefer=prefer)
        future.add_done_callback(self._on_done)

    def _spread_to(self) -> str:
        """The worker for a map's next chunk: the one holding the fewest of this run's
        chunks per thread (equals in turn). Sent there loosely (``allow_other_workers``:
        a worker that left, or work stealing, moves it). Left to Dask, every chunk
        went where the function's payload was computed (it places tasks near their
        data, and had no duration for mpmagic's tasks to weigh): 4 items of 0.5 s
        on 2 workers ran all on one in 5 of 14 runs, taking 2 s instead of 1 s.
        """
        held: dict[str, int] = {}
        for task in self.tasks.values():
            if task.prefer is not None:
                held[task.prefer] = held.get(task.prefer, 0) + 1
        workers = sorted(self.spread)
        self._turn = (self._turn + 1) % len(workers)
        order = workers[self._turn:] + workers[:self._turn]
        return min(order, key=lambda a: held.get(a, 0) / max(1, self.spread[a]))

    # -- receiving ---------------------------------------------------------
    def _finish(self, key: str) -> None:
        task = self.tasks.get(key)
        if task is None:
            return
        future, job, unit = task.future, self.job, task.unit
        status = future.status
        if status not in ("finished", "error", "cancelled"):
            # Pending again: its result was lost with a worker and Dask computes it
            # again. A done callback fires once: ask for the next completion.
            future.add_done_callback(self._on_done)
            return
        self.tasks.pop(key, None)
        if status == "error":
            self._failed(task, future.exception())
            return
        try:
            # Fetched with a time limit: when the worker holding the result dies,
            # Dask computes it again, and with no worker left a plain result()
            # waited for ever, out of the loop's checks. On time out the task goes
            # back (the loop checks the cluster, the sweep asks again), with twice
            # the time next, so a big result on a slow link still comes.
            wait = task.gather_wait = (task.gather_wait or self.backend.timeout / 2) * 2
            reply = None if status == "cancelled" else future.result(timeout=wait)
        except CancelledError:
            reply = None
        except (TimeoutError, asyncio.TimeoutError):  # Dask's is asyncio's: not the builtin before 3.11
            self.tasks[key] = task
            future.add_done_callback(self._on_done)
            return
        except Exception as exc:
            self._failed(task, exc)
            return
        if reply is None:
            # Cancelled: by a stop or restart of the pool, or because the client
            # lost the scheduler (Dask cancels every future then). Neither is
            # the fault of this unit's items.
            self._check_cluster(_cancel_reason(future))
            data = task.data_future
            if data is not None and data.status != "finished" and self.resent.get(unit.id, 0) < 3:
                # The worker holding this chunk's scattered data died: send it again.
                self.resent[unit.id] = self.resent.get(unit.id, 0) + 1
                job.requeue(unit)
                return
            job.lost(unit, "had its task cancelled on the cluster (was it restarted?)", worker_kept=True)
            return
        try:
            n_streamed, packed, differs, reloaded = reply
        except (TypeError, ValueError):
            raise ProtocolError(
                f"a Dask task on {self.backend.where} replied with a {type(reply).__name__}, not mpmagic's "
                "reply: do its workers run the same mpmagic version as the notebook?"
            ) from None
        self._await_output(task, n_streamed)
        if reloaded:
            self._say_reloaded(unit, reloaded)
        if differs:
            self._say_differs(unit, differs, task.worker)
            job.ran_other_code(unit, [entry if isinstance(entry, str) else entry[0] for entry in differs])  # (before its Done: its results are not checkpointed)
        for data in packed:
            self._reply(unit, unpack(data))

    def _say_reloaded(self, unit: Any, names: list[str]) -> None:
        """A worker reloaded modules it had loaded from another version than the notebook's
        (an earlier kernel had it import them, or this one before an edit): one line per
        modules and notebook versions, in the cell, as the local pool's "workers reload" line."""
        versions = dict(self.versions)
        said = tuple((name, versions.get(name)) for name in names)
        if said in self.backend._said_reloaded:
            return
        self.backend._said_reloaded.add(said)
        shown = ", ".join(names)
        self.job.output(unit.id, "stderr", (
            f"mpmagic: Dask workers reload {shown}: they had imported another version of "
            f"{'it' if len(names) == 1 else 'them'} than the notebook loaded (for an earlier kernel, or before "
            "an edit)\n"))

    def _say_differs(self, unit: Any, entries: list[str | tuple[str, str]], worker: str | None) -> None:
        """A worker reloaded (or imported) a module the notebook reloaded from a file that is
        not the notebook's (another machine's copy), or could not reload it (an entry
        ``(name, error)``: its file is the notebook's, the reload raised): one line per module
        and notebook file, in the cell, naming that worker."""
        versions = {name: digest for name, _, digest in self.reloads}
        versions.update(self.versions)
        for entry in entries:
            name, error = (entry, None) if isinstance(entry, str) else entry
            said = (name, versions.get(name)) if error is None else (name, versions.get(name), error)
            if said in self.backend._said_differs:
                continue
            self.backend._said_differs.add(said)
            if error is not None:
                self.job.output(unit.id, "stderr", (
                    f"mpmagic: Dask worker {worker or 'of the cluster'} could not reload {name} ({error}): its tasks "
                    f"run the version of {name} it had imported, not the notebook's\n"))
                continue
            module = sys.modules.get(name)
            shown = os.path.basename(getattr(module, "__file__", None) or name)
            self.job.output(unit.id, "stderr", (
                f"mpmagic: {shown} on Dask worker {worker or 'of the cluster'} differs from the file the notebook "
                f"loaded: {name} there runs that copy's code, not the notebook's (copy the notebook's file to that "
                f"machine, or reload {name} in the notebook if you saved it since)\n"))

    def _reply(self, unit: Any, msg: tuple) -> None:
        """What the task said, handed to the job as the local backend does."""
        job = self.job
        if isinstance(msg, Out):
            job.output(unit.id, msg.stream, msg.text)
        elif isinstance(msg, (Done, Error)):
            self.backend.tasks_run += unit.count
            started = self.started_before.pop(unit.id, None)
            if started is not None:  # run alone after its worker died under it: those items ran twice
                job.ran_again_elsewhere(unit, started)
            if isinstance(msg, Done):
                job.done(unit, msg.data, msg.seconds, msg.meta)
            else:
                job.error(unit, msg.index, msg.info, msg.partial, msg.seconds)
        elif isinstance(msg, Unpicklable):
            job.unpicklable(unit, msg.index, msg.info)
        else:
            raise ProtocolError(f"a Dask task replied with a {type(msg).__name__} message, which tasks never send")

    def _await_output(self, task: _Task, n_streamed: int) -> None:
        """Output events can trail the result by a moment: wait briefly for them."""
        deadline = time.monotonic() + _RESULT_OUTPUT_GRACE
        self.tasks[task.key] = task  # so its events still find it
        try:
            while task.streamed < n_streamed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    msg = self.inbox.get(timeout=left)
                except queue.Empty:
                    break
                if msg[0] == "event":
                    self._event(msg[1])
                else:
                    self.deferred.append(msg[1])
        finally:
            self.tasks.pop(task.key, None)

    def _failed(self, task: _Task, exc: BaseException | None) -> None:
        """Dask itself could not run the task (not an exception of the user's code).

        A pool stopped under the run is the cause of whatever Dask says then (a
        result fetched as the client closed: "RuntimeError: ConnectionPool is
        closed"): the run fails as stopped, blaming no item."""
        self.tasks.pop(task.key, None)
        if self.backend.stops != self.stops:
            raise exiting.stopped_error(self.backend.stopped_by)
        from distributed.scheduler import KilledWorker

        if isinstance(exc, KilledWorker):
            if self.job.kind == "map" and task.unit.id not in self.killed:
                # Dask blames every task that was on a dying worker, queued ones
                # too. Run this unit once more, alone on the cluster: if it kills
                # its worker again, it is the culprit; if not, it was innocent.
                self.killed.add(task.unit.id)
                self.quarantine.append(task.unit)
                if task.started is not None:
                    self.started_before[task.unit.id] = task.item or 0
                return
            self.started_before.pop(task.unit.id, None)  # (the culprit: it is reported lost, not run again)
            if task.unit.count > 1:  # (a map's chunk: a rank is one unit of one item)
                # A chunk that killed its worker alone: one of its items did, and
                # Dask cannot say which. Each item runs alone in turn, so only
                # the culprit fails (the local pool knows the item at once).
                self.suspects.update(self.job.split(task.unit))
                return
            # (On mpmagic's own cluster Dask fails a task at its worker's first death: no retry of Dask's.)
            own, rank = self.backend.owns_cluster, self.job.kind == "cell"
            if own:
                how = "died (KilledWorker)" if rank else "died, and so did the worker mpmagic ran it on again, alone (KilledWorker)"
            else:
                how = ("died, and so did the workers Dask ran it on again (KilledWorker)" if rank else
                       "died, and so did the workers Dask and then mpmagic ran them on again (KilledWorker)")
            self.job.lost(task.unit, how, worker_kept=True)
            return
        found = self._lost_input(task, exc)
        if found is not None:
            lost, lost_key = found
            if self.resent.get(task.unit.id, 0) < _LOST_INPUT_RESENDS:
                # Dask ran the task on a worker that no longer held an input it
                # thought was there (a worker of the cluster died or left meanwhile:
                # its bookkeeping of who holds what races with that). Not the unit's
                # fault, and none of its code ran: send it again.
                log.debug("mpmagic: %s lost %s on its worker: sent again", task.describe(self.job), lost)
                self.resent[task.unit.id] = self.resent.get(task.unit.id, 0) + 1
                if lost == "the function's payload":
                    self._renew_payload()
                self.job.requeue(task.unit)
                return
            raise MPMagicError(
                f"Dask could not run {task.describe(self.job)}: the worker it went to no longer held {lost} "
                f"(KeyError: {lost_key!r}), {self.resent[task.unit.id] + 1} times in a row; Dask loses track of "
                "such data when workers of the cluster die or leave: run the call again"
            ) from None
        if isinstance(exc, ImportError) and "mpmagic" in str(exc):
            raise MPMagicError(
                f"the Dask workers of {self.backend.where} cannot import mpmagic ({exc}): install "
                "the same mpmagic version in the workers' environment (pip install \"mpmagic[dask]\")"
            ) from None
        if isinstance(exc, OSError) and not self._scheduler_reachable():
            # A result fetch that failed as the scheduler died (CommClosedError): the
            # connection is lost, no item is to blame (the client may not know yet).
            self._check_cluster("scheduler-connection-lost")
        raise MPMagicError(
            f"Dask could not run {task.describe(self.job)}: {type(exc).__name__}: {exc}"
        ) from exc

    def _lost_input(self, task: _Task, exc: BaseException | None) -> tuple[str, Any] | None:
        """What ``exc`` says the task's worker lacked when Dask began it, and its key, if it is
        Dask's ``KeyError`` for one of the task's own inputs: "the function's payload"
        (its :func:`dask_tasks.hold` result) or "the unit's data" (a large unit's
        scattered message). Such a KeyError is raised by Dask before the task's
        function runs (``Worker._prepare_args_for_execution``), never by the user's
        code (its errors come back in the task's reply)."""
        if not isinstance(exc, KeyError) or not exc.args:
            return None
        key = exc.args[0]
        payload = self.payload_future
        if (payload is not None and key == payload.key) or (isinstance(key, str) and key.startswith("mpmagic-payload-")):
            return "the function's payload", key
        if task.data_future is not None and key == task.data_future.key:
            return "the unit's data", key
        return None

    def _renew_payload(self) -> None:
        """A new hold task for the function's payload (new key), for the units sent
        from now on: the old one's key is the one a worker's bookkeeping lost."""
        key, data = self.job.func_key, self.job.func_payload
        if key is None or data is None:
            return
        backend = self.backend
        with backend._lock:
            held = backend._payloads.get(key)
            if held is not None and held.future is self.payload_future:
                del backend._payloads[key]
        self.payload_future = backend._payload_future(key, data, self.restrict)

    def _scheduler_reachable(self) -> bool:
        """Does the scheduler's port still take a connection? Asked :data:`_REACH_TRIES`
        times, :data:`_REACH_PAUSE` apart (1 s at most each): a scheduler being killed
        closed the client's connection (the fetch's ``CommClosedError``) and still took
        one connection more on a loaded machine, its listening socket not yet closed,
        so the run blamed an item for the scheduler's death ("Dask could not run item
        1: CommClosedError: ... Stream is closed"; 1 run of the suite's in a few)."""
        address = getattr(self.client.scheduler, "address", "") or ""
        host_port = address.partition("://")[2]
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit():
            return True  # (an in-process cluster: nothing to reach)
        for attempt in range(_REACH_TRIES):
            if attempt:
                time.sleep(_REACH_PAUSE)
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            except OSError:
                return False
        return True

    # -- timeouts and lost ranks ---------------------------------------------
    def _check_deadlines(self) -> None:
        timeout = self.job.timeout
        if not timeout:
            return
        now = time.monotonic()
        kept = False  # a worker of a cluster not ours stays busy with a task given up on
        replan = False  # a worker of our own cluster was killed: the chunks to come go to the others
        for task in list(self.tasks.values()):
            began = task.clock()  # (a later item of a chunk: its own start, as its event came)
            if began is None or now < began + timeout:
                continue
            self.tasks.pop(task.key, None)
            self._cancel([task.future])
            # Our own cluster: its worker is killed (a new one starts in the
            # background). Not ours: its workers may serve other clients, and the
            # task runs on there; later runs leave that worker out until it returns.
            self.backend._give_up([task], stop=True)
            if self.backend.owns_cluster:
                self.job.lost(task.unit, "ran past its timeout", timed_out=True, index=task.item)
                replan = True
            else:
                self.job.lost(
                    task.unit,
                    f"Dask cannot stop a running task, and the workers of {self.backend.where} are not "
                    f"mpmagic's to restart: it keeps one thread of worker {task.worker or '?'} busy until it "
                    "returns (later runs use the other workers meanwhile)",
                    timed_out=True,
                    index=task.item,
                    worker_kept=True,
                )
                kept = True
        if kept:
            self._leave_busy_workers()
        elif replan:
            self._plan_again()

    def _leave_busy_workers(self) -> None:
        """Chunks of this map that Dask queued on a worker now busy with a task
        given up on would wait behind it, never started, so no --timeout would
        fire for them (a test hung so, 1 run in 6): they go out again, to the
        other workers. Only those the scheduler has on such a worker (none of
        them can have started: its thread is the stuck task's)."""
        nthreads = self._plan_again()
        busy = [a for a, n in self.backend._busy(nthreads).items() if n >= nthreads.get(a, 1)]
        if not busy or self.restrict is None:
            return  # (no free worker: the run waits for them, as _plan said)
        try:
            queued = {key for keys in self.client.processing(workers=busy).values() for key in keys}
        except Exception:  # (the scheduler did not answer: the next check of the workers replans)
            log.debug("mpmagic: asking the scheduler for the tasks of busy workers failed", exc_info=True)
            return
        self._send_again([t for t in self.tasks.values() if t.key in queued and t.started is None and not t.future.done()])

    def _plan_again(self) -> dict[str, int]:
        """Where this map's chunks may go now (``DaskBackend._plan``, quietly); the workers' threads."""
        nthreads = self.backend._nthreads(fresh=True)
        self.restrict, self.capacity, threads = self.backend._plan(
            nthreads, self.asked, 1 if self.job.timeout else 2, quiet=True
        )
        self.job.ran_on = max(self.job.ran_on or 0, threads)
        self.spread = nthreads if self.restrict is None else {}
        return nthreads

    def _send_again(self, stale: list[_Task]) -> None:
        """Cancel these tasks and give their units back to the job, to go out as planned now."""
        self._cancel([t.future for t in stale])
        for t in stale:
            self.tasks.pop(t.key, None)
            self.job.requeue(t.unit)

    def _check_cluster(self, reason: str | None = None) -> None:
        """Fail the whole run, blaming no item, when the pool was stopped or the
        scheduler is out of reach: its tasks are gone, not lost by their items.

        ``reason``: why Dask cancelled a future of this run, if one was.
        """
        backend = self.backend
        if backend.stops != self.stops:
            raise exiting.stopped_error(backend.stopped_by)
        lost = reason == "scheduler-connection-lost" or self.client.status != "running"
        if not lost and reason != "scheduler-restart":
            return
        where = backend.scheduler_address or backend.where
        blameless = self._progress(f"no {'item' if self.job.kind == 'map' else 'rank'} is to blame")
        if lost:
            raise MPMagicError(
                f"lost the connection to the Dask scheduler at {where} during this run ({blameless}): once "
                "the scheduler is up again, run the cell again (mpmagic reconnects), or use_local() (`%pool local`) to run "
                "on this machine"
            )
        raise MPMagicError(
            f"the Dask scheduler at {where} was restarted during this run, which cancelled its tasks "
            f"({blameless}; did another client of the cluster restart it?): run the cell again"
        )

    def _alive_workers(self) -> set[str] | None:
        """The cluster's worker addresses, asked at most every 0.5 s (a scheduler
        round trip); None between two asks, or when the scheduler is out of reach
        (``_check_cluster`` says so)."""
        now = time.monotonic()
        if now - self._last_count < 0.5:
            return None
        self._last_count = now
        try:
            return set(self.client.nthreads())
        except Exception:
            log.debug("mpmagic: could not ask the Dask scheduler for its workers", exc_info=True)
            return None

    def _check_workers_left(self) -> None:
        """A map on a cluster with no worker would wait forever: once it has had
        none for the backend's ``worker_wait`` (the wait a run allows at its
        start, ``_wait_for_workers``), fail with what to do. With
        ``errors="collect"`` the run is not failed as a whole: the items that
        finished keep their results, and those that could not run are
        ``Failed`` saying why (``_strand``). Asked at most every 0.5 s."""
        alive = self._alive_workers()
        if alive is None:
            return
        now = time.monotonic()
        if self.restrict is not None and not set(self.restrict) <= alive:
            self._replan(alive)
        if alive:
            self._no_workers_since = None
            self.stranded = None  # (workers are back: what is left goes out again)
            return
        backend = self.backend
        backend._heal()
        if self._no_workers_since is None:
            self._no_workers_since = now
        wait = backend.worker_wait
        if self.stranded is not None or now - self._no_workers_since < wait:
            return
        where = backend.scheduler_address or backend.where
        todo = (
            "restart_pool() (`%pool restart`) to start them again"
            if backend.owns_cluster
            else f"start workers again (`dask worker {where}`)"
        )
        if self.job.collect:
            self._strand(
                f"every worker of the Dask cluster at {where} left during this run, and none joined within "
                f"{wait:g} s: {todo} and run the failed items again (rerun_failed(), `%pmap --rerun-failed`), "
                "or use_local() (`%pool local`) to run on this machine"
            )
            return
        raise MPMagicError(
            f"every worker of the Dask cluster at {where} left during this run ({self._progress()}), and none "
            f"joined within the timeout of {wait:g} s: {todo} and run the cell again, or use_local() (`%pool local`) "
            "to run on this machine"
        )

    def _strand(self, reason: str) -> None:
        """No worker to run this map's units on (``_check_workers_left``), with
        ``errors="collect"``: each unit in flight or not sent yet fails, item by
        item, with ``reason`` (``job.not_run``), so the run ends with the results
        it has; units go out again if workers join before it ends. A task Dask
        itself failed (``KilledWorker``) keeps that verdict."""
        self.stranded = reason
        for key, task in list(self.tasks.items()):
            if task.future.status == "error":
                self._finish(key)
        units = [t.unit for t in self.tasks.values()] + list(self.quarantine)
        self._cancel([t.future for t in self.tasks.values()])
        self.tasks.clear()
        self.quarantine.clear()
        self.solo = False
        for unit in units:
            self.job.not_run(unit, reason)

    def _replan(self, alive: set[str]) -> None:
        """A worker this map's chunks were restricted to left (killed after a
        timeout, or gone): chunks that have not started, or that ran there, go
        out again to the workers there are now (restricted to a worker that is
        gone, Dask would keep them waiting for ever)."""
        gone = set(self.restrict or ()) - alive
        self._plan_again()
        self._send_again([t for t in self.tasks.values() if not t.future.done() and (t.started is None or t.worker in gone)])

    def _progress(self, *more: str) -> str:
        """How far a map got, for messages ("7 of 20 items finished"), and ``more``."""
        parts = list(more)
        if self.job.kind == "map":
            done, total = self.job.items_done, self.job.items_total
            count = total if total is not None else done
            of = f" of {total}" if total is not None else ""
            parts.insert(0, f"{done}{of} item{'s' if count != 1 else ''} finished")
        return "; ".join(parts)

    def _check_rank_workers(self) -> None:
        """A rank pinned to a worker that left would wait forever: report it lost."""
        alive = self._alive_workers()
        if alive is None:
            return
        for task in list(self.tasks.values()):
            if task.target not in alive and task.future.status == "pending":
                self.tasks.pop(task.key, None)
                self._cancel([task.future])
                self.job.lost(task.unit, f"(Dask worker {task.target}) left the cluster while running it", worker_kept=True)

    def _check_cancelled(self) -> None:
        """A cell's background run was cancelled (``DrivenRun.cancel_requested``): it ends here,
        its ranks given up as on an interrupt (``execute``). A map's job takes the cancel itself
        (its failure: ``background._stop_driven``); a cell's loop went on until its ranks
        returned, and ``cancel()`` waited 10 s, then left the run "running"."""
        if self.handle is not None and self.handle.cancel_requested:
            raise CancelledError("cancelled")

    def _check_abort(self) -> None:
        """A rank failed ``RANK_FAILURE_GRACE`` seconds ago and others still run (maybe
        waiting on it for ever): they are stopped, as an MPI job aborts (``CellJob.abort``);
        on the cluster mpmagic started their workers are replaced, elsewhere Dask cannot stop
        a running task and it runs on (as after a ``--timeout``). The run then ends."""
        at = self.job.abort_at
        if at is None or time.monotonic() < at:
            return
        self.job.abort()
        running = list(self.tasks.values())
        self._abandon(interrupted=False, stop=True)
        for task in running:
            self.job.requeue(task.unit)  # (aborting: the rank is stopped, not sent again)

    def _check_ranks_started(self) -> None:
        """Ranks of a cell run at once, each pinned to its worker. On a shared
        cluster that worker may be busy with another client's task: Dask queues
        the rank behind it, and ranks that wait for it (a Queue it feeds) wait
        too, with nothing shown (for ever, if that task never ends). Once,
        ``RANK_START_NOTICE`` seconds in, one line names the ranks not started
        whose workers the scheduler says are busy with other tasks."""
        now = time.monotonic()
        if now < self._ranks_check_at:
            return
        self._ranks_check_at = now + RANK_START_NOTICE
        waiting = [t for t in self.tasks.values() if t.started is None and t.future.status == "pending"
                   and t.key not in self._waiting_ranks]
        if not waiting:
            return
        stuck = self.backend._busy(self.backend._nthreads())  # (those were named when the run began)
        targets = sorted({t.target for t in waiting if t.target and t.target not in stuck})
        try:
            processing = self.client.processing(workers=targets) if targets else {}
        except Exception:  # (the scheduler did not answer: the next look asks again)
            log.debug("mpmagic: asking the scheduler what busy workers run failed", exc_info=True)
            return
        busy = {a for a, keys in processing.items() if any(self.token not in str(k) for k in keys)}
        late = [t for t in waiting if t.target in busy]
        if not late:
            return
        self._waiting_ranks.update(t.key for t in late)
        self.job.shared_workers = True
        ranks = sorted(t.unit.id for t in late)
        one = len(ranks) == 1
        names = ", ".join(sorted(busy & {t.target for t in late if t.target}))
        sys.stderr.write(
            f"mpmagic: rank{'' if one else 's'} {', '.join(map(str, ranks))} {'has' if one else 'have'} not "
            f"started after {now - self.began:.0f} s: {'its' if one else 'their'} Dask worker"
            f"{'' if len(busy) == 1 else 's'} {names} {'is' if len(busy) == 1 else 'are'} busy with other tasks "
            f"(another client's?), and ranks that wait for {'it' if one else 'them'} wait too: this run waits "
            f"until {'it is' if len(busy) == 1 else 'they are'} free (interrupt to stop; with -n "
            f"{max(1, self.job.size - len(ranks))} the ranks go to idle workers)\n"
        )

    # -- giving up -----------------------------------------------------------
    def _cancel(self, futures: list) -> None:
        """Cancel, but never let a slow scheduler hold the notebook past the budget."""
        if not futures or self.client.status != "running":
            return  # (a client that lost its scheduler cancelled every future itself)
        t = threading.Thread(target=_cancel_quietly, args=(self.client, futures, self.backend._said_later.hold),
                             daemon=True)
        t.start()
        t.join(_CANCEL_BUDGET)
        self.backend._said_later.say()  # (its failure within the budget: in this cell; a later one, the next run's)

    def _started_unseen(self, tasks: list[_Task], running: list[_Task]) -> set[str]:
        """Workers of mpmagic's own cluster the scheduler has this run's tasks on, with
        none of them known to have started: a task's start event can trail its start
        (a loaded machine), and such a task, cancelled but not stopped, kept its worker
        for 30 s while the next call was queued there. Those workers are killed too."""
        keys = {t.key for t in tasks if t.started is None and not t.future.done()}
        if not keys:
            return set()
        try:
            processing = self.client.processing()
        except Exception:  # (the scheduler did not answer: nothing more is killed)
            log.debug("mpmagic: asking the scheduler where a run's tasks are failed", exc_info=True)
            return set()
        seen = {t.worker for t in running}
        return {a for a, ks in processing.items() if a not in seen and any(str(k) in keys for k in ks)}

    def _running_unseen(self, tasks: list[_Task]) -> list[_Task]:
        """Tasks of a cluster mpmagic connected to that run though their start event has not
        come (it trails the start on a loaded machine): an interrupt counted them as queued
        and cancelled ("the pool is ready for the next run") while they ran on, and later
        runs were sent to their busy workers. The workers the scheduler has them on are
        asked which mpmagic tasks they run (``dask_tasks.running_tags``, within
        :data:`_ABANDONED_WAIT`); those found get their worker, as if their event had come."""
        unseen = {t.key: t for t in tasks if t.started is None and not t.future.done()}
        if not unseen:
            return []
        try:
            processing = self.client.processing()
        except Exception:  # (the scheduler did not answer: they count as queued)
            log.debug("mpmagic: asking the scheduler where a run's tasks are failed", exc_info=True)
            return []
        where = sorted(a for a, keys in processing.items() if any(str(k) in unseen for k in keys))
        if not where:
            return []
        replies: dict[str, Any] = {}

        def ask() -> None:
            try:
                replies.update(self.client.run(dask_tasks.running_tags, workers=where, on_error="return"))
            except Exception:
                log.debug("mpmagic: could not ask the Dask workers which tasks they run", exc_info=True)

        asking = threading.Thread(target=ask, name="mpmagic-dask-ask-running", daemon=True)
        asking.start()
        asking.join(_ABANDONED_WAIT)
        found = []
        for address, tags in dict(replies).items():
            for tag in tags if isinstance(tags, list) else []:
                task = unseen.pop(tag, None)
                if task is not None:
                    task.started, task.worker = time.monotonic(), address
                    found.append(task)
        return found

    def _abandon(self, interrupted: bool, stop: bool = False) -> str | None:
        """Cancel every future of this run. Tasks already running cannot be
        stopped by Dask: with ``stop`` (an interrupt, a cancel) their workers are
        killed and replaced on the cluster mpmagic started; elsewhere they run on,
        and later runs leave their workers out until they return. On interrupt,
        returns what became of the run's work (which tasks still run, where),
        for the one line the interrupt shows (None when not interrupted)."""
        while True:  # learn which tasks had started
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "event":
                ev = msg[1]
                task = self.tasks.get(ev.get("tag"))
                if task is not None and ev.get("start"):
                    task.started, task.worker = time.monotonic(), ev.get("worker")
        tasks = list(self.tasks.values())
        self.tasks.clear()
        running = [t for t in tasks if t.started is not None and not t.future.done()]
        backend = self.backend
        unseen = self._started_unseen(tasks, running) if (stop or interrupted) and backend.owns_cluster else set()
        if not backend.owns_cluster and (stop or interrupted):
            running += self._running_unseen(tasks)
        self._cancel([t.future for t in tasks])
        backend._give_up(running, stop=stop or interrupted)
        if unseen:
            backend._kill_workers(unseen)
        if not interrupted:
            return None
        queued = len(tasks) - len(running)
        outcome = f"its {queued} queued Dask task{'s were' if queued != 1 else ' was'} cancelled"
        if not running:
            return outcome + "; the pool is ready for the next run"
        # (One line, the interrupt's, as on the local pool: it names the tasks
        # still running and where; no second note on stderr.)
        n = len(running)
        where = sorted({t.worker or "?" for t in running})
        what = ", ".join(t.describe(self.job) for t in running[:6]) + (", ..." if n > 6 else "")
        if backend.owns_cluster:
            return outcome + (
                f", and the worker{'s' if len(where) != 1 else ''} running the {n} task{'s' if n != 1 else ''} "
                f"already started (Dask cannot stop a running task) {'were' if len(where) != 1 else 'was'} killed; "
                f"new ones are starting for the next run ({what}; on {', '.join(where)})"
            )
        try:
            nthreads = backend._nthreads(fresh=True)
            busy = backend._busy(nthreads)
            free = any(n > busy.get(a, 0) for a, n in nthreads.items())
        except Exception:  # (the scheduler out of reach: the next run says so)
            free = True
        later = (
            "the next run uses the other workers until they return"
            if free
            else "the next run waits until they return (no other worker is free)"
        )
        return outcome + (
            f"; the {n} already running ({what}; on {', '.join(where)}) cannot be stopped by Dask: they run to the "
            f"end in the background at {backend.where} (its workers are not mpmagic's to restart), their results "
            f"dropped, and {later}"
        )


def _cancel_reason(future: Any) -> str | None:
    """Why Dask cancelled ``future`` ("scheduler-connection-lost", "scheduler-restart"...), if it says."""
    try:
        future.result(timeout=0)
    except CancelledError as exc:
        return getattr(exc, "reason", None)
    except Exception:
        return None
    return None


def _worker_processes(cluster: Any) -> list[Any]:
    """The nannies' ``WorkerProcess`` objects of mpmagic's own ``LocalCluster``: a nanny
    that restarts its worker starts the new process in the same object."""
    nannies = list(getattr(cluster, "workers", {}).values())
    return [proc for proc in (getattr(nanny, "process", None) for nanny in nannies) if proc is not None]


def _pids_of(processes: list[Any]) -> list[int]:
    """The pids of the worker processes these ``WorkerProcess`` objects run now."""
    pids = []
    for proc in processes:
        pid = getattr(getattr(proc, "process", None), "pid", None)
        if isinstance(pid, int) and pid > 0:
            pids.append(pid)
    return pids


def _kill_left(processes: list[Any]) -> None:
    """Kill the worker processes of these ``WorkerProcess`` objects still alive (our children)."""
    left = [pid for pid in _pids_of(processes) if _is_our_child(pid)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if left:
        log.debug("mpmagic: killed the Dask worker processes the close left running: %s", left)


def _is_our_child(pid: int) -> bool:
    """Is ``pid`` a live (not zombie) child of this process? (A pid is not killed once reused.)"""
    try:
        fields = posixshm.stat_fields(pid)
    except (OSError, ValueError):
        return False
    return fields[0] not in (b"Z", b"X") and int(fields[1]) == os.getpid()


def _replicate_quietly(client: Any, future: Any) -> None:
    try:
        client.replicate([future])
    except Exception:  # an optimisation: workers fetch the payload on first use anyway
        log.debug("mpmagic: replicating the function payload failed", exc_info=True)


def _forget_quietly(client: Any, keys: list[bytes]) -> None:
    try:
        client.run(dask_tasks.forget, keys, on_error="ignore")
    except Exception:  # memory only: each worker's own limit (payload_cache.excess) still holds
        log.debug("mpmagic: telling the workers which payloads were dropped failed", exc_info=True)


def _restart_quietly(client: Any, addresses: list[str], say: Callable[[str], None]) -> None:
    """Restart workers through their nannies (a background thread: it may take
    Dask's 30 s limit); ``say`` holds its failure's line for a run's cell
    (``held_lines``: printed from here, it landed in whichever cell ran then)."""
    try:
        client.restart_workers(addresses, timeout=30.0, raise_for_error=False)
    except Exception as exc:
        say(
            f"mpmagic: could not restart Dask worker{'s' if len(addresses) != 1 else ''} {', '.join(addresses)} "
            f"to stop a task mpmagic gave up on ({exc}); it runs on there until it returns\n"
        )


def _cancel_quietly(client: Any, futures: list, say: Callable[[str], None]) -> None:
    """Cancel ``futures`` (a background thread: ``_DaskRun._cancel`` waits for it a
    while); ``say`` holds its failure's line for a run's cell (see ``_restart_quietly``)."""
    try:
        client.cancel(futures, force=True)
    except Exception as exc:
        log.debug("mpmagic: cancelling %d Dask tasks failed", len(futures), exc_info=True)
        say(f"mpmagic: cancelling {len(futures)} Dask task{'s' if len(futures) != 1 else ''} failed "
            f"({type(exc).__name__}: {exc}); they may run on until they return\n")


__all__ = ["DaskBackend"]
