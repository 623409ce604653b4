"""The magics' settings, the IPython way: ``%config MPMagic.<name> = value``.

``MPMagic`` is a traitlets ``Configurable`` that ``%load_ext mpmagic``
registers with the shell, so each setting can be changed with ``%config``
and given a default in ``ipython_config.py``::

    c.MPMagic.workers = 4
    c.MPMagic.progress = False

The magics read these settings for every option the user did not give; the
plain API (``mpmagic.pmap(...)``) takes explicit arguments instead, but the
checkpoint store's place and cap (``checkpoint_dir``, ``checkpoint_max_bytes``),
how a report shows (``report``, ``advice``) and the settings applied as they
are set (``shm_threshold``, ``worker_max_memory``, ``worker_threads``) hold
for its runs too.
Pool settings (``workers``, ``start_method``) are applied to the local pool
before the next run after they change (or by ``%pool start``/``restart``),
never in the middle of one: a new start method waits for the runs in flight.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from traitlets import (
    Bool,
    CaselessStrEnum,
    Float,
    Int,
    TraitError,
    TraitType,
    Unicode,
    default,
    observe,
    validate,
)
from traitlets.config import LoggingConfigurable

REPORT_MODES = ("auto", "line", "html", "none")


class Size(TraitType):
    """A memory size as ``start_pool(max_memory=)`` takes it: a whole number of bytes
    (``0``, ``2_000_000_000``), a float, or a string with a unit (``'2GB'``), or None.

    The setting's validator checks the value with ``pool.parse_memory`` (a
    ``Unicode`` trait refused ``0`` with traitlets' "expected a unicode string"
    though the docs say the setting takes bytes). From the command line
    (``--MPMagic.worker_max_memory=2GB``) the text is kept as it is.
    """

    info_text = "bytes or a size such as '2GB'"


class _ToStderr(logging.Handler):
    """One ``mpmagic: ...`` line on the ``sys.stderr`` of the moment (a notebook's cell)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"mpmagic: {record.getMessage()}\n")
        except Exception:
            self.handleError(record)


def _settings_logger() -> logging.Logger:
    """The logger traitlets warns on about a setting name ``MPMagic`` lacks."""
    log = logging.getLogger("mpmagic.settings")
    if not log.handlers:
        log.addHandler(_ToStderr())
        log.propagate = False  # (the root logger would print it a second time, as WARNING:...)
    return log


class MPMagic(LoggingConfigurable):
    """Defaults for ``%pmap``, ``%%parallel`` and the pool they run on.

    A ``LoggingConfigurable``: traitlets then says an unknown name
    (``%config MPMagic.worker = 2``, "Did you mean ... workers?") on ``log``
    every time, where a plain ``Configurable`` gave a ``UserWarning`` that
    Python shows once per session, so a repeated typo did nothing, silently.
    """

    @default("log")
    def _log_default(self) -> logging.Logger:
        return _settings_logger()

    workers = Int(
        None,
        allow_none=True,
        help="Worker processes of the local pool (None or -1: one per usable CPU), applied "
        "before the next run after it changes; -n of %pmap and %%parallel defaults to the pool's size.",
    ).tag(config=True)

    start_method = Unicode(
        None,
        allow_none=True,
        help="How local workers start: forkserver, spawn or fork, those this platform has "
        "(None: forkserver on Linux, spawn elsewhere).",
    ).tag(config=True)

    chunksize = Int(
        None,
        allow_none=True,
        help="Items per message for %pmap (None: sized automatically from measured task times).",
    ).tag(config=True)

    progress = Bool(
        True,
        help="Show a progress bar for runs that last longer than progress_delay "
        "(--progress / --no-progress override it per call).",
    ).tag(config=True)

    progress_delay = Float(
        1.0,
        help="Seconds of work before the progress bar appears, so short runs stay quiet.",
    ).tag(config=True)

    report = CaselessStrEnum(
        REPORT_MODES,
        default_value="auto",
        help="The timing report after each run: 'auto' (HTML table in Jupyter, one line "
        "in a terminal), 'line' (one line everywhere), 'html' (the full table, also as "
        "text in a terminal), 'none'. -q hides it for one call.",
    ).tag(config=True)

    advice = Bool(
        True,
        help="Add one line of advice to the report when parallel did not pay off.",
    ).tag(config=True)

    checkpoint = Bool(
        False,
        help="Checkpoint every %pmap and %%parallel run, as if --checkpoint were given (docs/checkpoint.md).",
    ).tag(config=True)

    checkpoint_dir = Unicode(
        None,
        allow_none=True,
        help="Folder of the checkpoint store (None: .mpmagic in the kernel's working directory).",
    ).tag(config=True)

    checkpoint_max_bytes = Int(
        10 * 1024**3,
        allow_none=True,
        help="Size cap of the checkpoint store in bytes; the least recently used runs are "
        "deleted past it (None: no cap).",
    ).tag(config=True)

    shm_threshold = Int(
        1 << 20,
        help="Smallest numpy buffer (bytes) sent to local workers through shared memory "
        "(/dev/shm) instead of the pipe; a huge value sends everything through the pipe.",
    ).tag(config=True)

    @observe("shm_threshold")
    def _shm_threshold_changed(self, change: dict) -> None:
        from . import shm

        shm.configure(threshold=change["new"])

    worker_max_memory = Size(
        None,
        allow_none=True,
        help="A local worker holding more of its own memory than this after a task (bytes, or a size "
        "such as '2GB') is replaced before its next task (None or 0: no limit). Private memory: shared memory it only reads "
        "(share(), big items) is not counted. With a limit, each worker gets one chunk at a time.",
    ).tag(config=True)

    @observe("worker_max_memory")
    def _max_memory_changed(self, change: dict) -> None:
        from . import pool

        pool.set_max_memory(change["new"])

    worker_threads = Int(
        None,
        allow_none=True,
        help="BLAS/OpenMP threads per worker (None: usable CPUs // workers, so workers x threads "
        "never exceeds the CPUs; 0: no cap). Applies to workers started after it changes (%pool restart).",
    ).tag(config=True)

    @observe("worker_threads")
    def _worker_threads_changed(self, change: dict) -> None:
        from . import threads

        threads.configure(change["new"])

    # A value out of range is refused at the %config line (TraitError, which
    # %config prints as one line) and the setting keeps its old value: found
    # only at the next run, it failed every run, even one with -n given, with
    # a message that did not name the setting. None means the default and is
    # taken as it is: traitlets skips its allow_none shortcut when %config
    # cross-validates (update_config holds the notifications), so None does
    # reach these validators. A bool is refused (traitlets' Int takes True as 1).
    @validate("workers", "chunksize")
    def _at_least_one(self, proposal: Any) -> int | None:
        value = proposal["value"]
        if proposal["trait"].name == "workers":
            from .backends.local import max_workers

            most = max_workers()  # the bound -n has: a size no pool could start is refused now
            if _whole(value) and value == -1:  # joblib's n_jobs=-1: one per usable CPU, as None
                return None
            return _check(proposal, value is None or (_whole(value) and 1 <= value <= most),
                          f"a whole number from 1 to {most} (this machine's limit), or None / -1 (one per usable CPU)")
        return _check(proposal, value is None or (_whole(value) and value >= 1),
                      "a whole number of at least 1, or None (sized automatically)")

    @validate("worker_threads")
    def _threads_valid(self, proposal: Any) -> int | None:
        value = proposal["value"]
        return _check(proposal, value is None or (_whole(value) and value >= 0),
                      "a whole number of at least 1, 0 (no cap) or None (usable CPUs // workers)")

    @validate("checkpoint_max_bytes")
    def _max_bytes_valid(self, proposal: Any) -> int | None:
        value = proposal["value"]
        return _check(proposal, value is None or (_whole(value) and value >= 0),
                      "a number of bytes (0 or more), or None (no cap)")

    @validate("shm_threshold")
    def _shm_threshold_valid(self, proposal: Any) -> int:
        return _check(proposal, _whole(proposal["value"]) and proposal["value"] >= 1, "a number of bytes of at least 1")

    @validate("progress_delay")
    def _progress_delay_valid(self, proposal: Any) -> float:
        value = proposal["value"]
        return _check(proposal, math.isfinite(value) and value >= 0, "a number of seconds (0 or more)")

    @validate("start_method")
    def _start_method_valid(self, proposal: Any) -> str | None:
        # The check %pool --start-method and start_pool make (its enum took 'FORK', which they refuse).
        from .backends.local import start_method_refused

        value = proposal["value"]
        why = None if value is None else start_method_refused(value)
        if why is not None:
            raise TraitError(f"%config MPMagic.start_method = {value!r} refused: {why}; the setting keeps its value")
        return value

    @validate("worker_max_memory")
    def _max_memory_valid(self, proposal: Any) -> int | float | str | None:
        # parse_memory is start_pool(max_memory=)'s check: the refusal gives its reason.
        from .errors import UsageError
        from .pool import parse_memory

        try:
            parse_memory(proposal["value"])
        except UsageError as err:
            raise TraitError(f"%config MPMagic.worker_max_memory = {proposal['value']!r} refused: {err}; "
                             "the setting keeps its value") from None
        return proposal["value"]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Settings from ipython_config.py count as changed: the first run applies them.
        self._pool_pending = self.workers is not None or self.start_method is not None
        self._workers_pending = self.workers is not None
        self._deferred_said = False  # the line that a new start method waits for runs in flight

    @observe("workers", "start_method")
    def _pool_setting_changed(self, change: dict) -> None:
        if change["old"] != change["new"]:
            self._pool_pending = True
            if change["name"] == "workers":
                self._workers_pending = True

    def apply_pool_settings(self) -> None:
        """Bring the local pool in line with ``workers`` / ``start_method`` if they changed.

        Called by the magics before a run. A Dask backend is left alone: its
        size is the cluster's business. The size is applied only when the
        ``workers`` setting itself changed: a new start method keeps the size
        a ``%pool resize`` chose since.
        """
        if not getattr(self, "_pool_pending", False):
            return
        from . import pool
        from .backends.local import LocalBackend

        backend = pool.current_pool()
        workers = self._pending_size()
        self._pool_pending = self._workers_pending = False
        if backend is not None and not isinstance(backend, LocalBackend):
            return
        method = self.start_method
        if backend is None:
            pool.use_local(workers, method)
            return
        if method and method != backend.start_method and backend.runs_in_flight():
            # A new start method is a new pool: stopping this one would fail the
            # runs in flight (a --bg run died at the next %pmap). It waits for them.
            self._pool_pending = True
            self._workers_pending = workers is not None
            if not self._deferred_said:
                self._deferred_said = True
                sys.stderr.write(f"mpmagic: MPMagic.start_method = {method!r} applies once the runs in flight "
                                 f"have ended; %pool restart applies it now and stops them\n")
            if workers and workers != backend.workers:
                backend.resize(workers)  # (a size needs no new pool)
                self._workers_pending = False
            return
        self._deferred_said = False
        if (method and method != backend.start_method) or (workers and workers != backend.workers):
            pool.use_local(workers, method)

    def _pending_size(self) -> int | None:
        """The size to apply when ``workers`` changed, else None (keep the pool's).

        ``workers = None`` is the default size, one worker per usable CPU,
        counted now: passed on as None, it read as "no change" to the pool,
        which kept the size an earlier setting gave it."""
        if not self._workers_pending:
            return None
        if self.workers is not None:
            return self.workers
        from .cpus import available_cpus

        return available_cpus()

    def pending_pool_settings(self) -> tuple[int | None, str | None]:
        """What :meth:`take_pool_settings` would take, left pending."""
        if not self._pool_pending:
            return None, None
        return self._pending_size(), self.start_method

    def take_pool_settings(self) -> tuple[int | None, str | None]:
        """``(workers, start_method)`` changed by ``%config`` (or given by ``ipython_config.py``)
        and not applied yet, now taken (None for each that did not change; ``workers = None``
        set since is the number of usable CPUs): the pool started at ``%load_ext``,
        ``%pool start`` and ``%pool restart`` apply them, as the next run would."""
        workers, method = self.pending_pool_settings()
        self._pool_pending = self._workers_pending = self._deferred_said = False
        return workers, method

    def reset(self) -> None:
        """Every setting back to its default (for tests and ``%config``-happy sessions)."""
        for name, trait in self.traits(config=True).items():
            setattr(self, name, trait.default())
        self._pool_pending = self._workers_pending = False


def _whole(value: Any) -> bool:
    """An int that is not a bool (``True`` is not a number of workers)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check(proposal: Any, ok: bool, takes: str) -> Any:
    """``proposal``'s value if ``ok``, else a TraitError naming the setting, the value and what it takes."""
    if not ok:
        name = proposal["trait"].name
        raise TraitError(f"%config MPMagic.{name} = {proposal['value']!r} refused: {name} takes {takes}; "
                         "the setting keeps its value")
    return proposal["value"]


_current: MPMagic | None = None


def current() -> MPMagic:
    """The settings registered with the shell (or stand-alone defaults)."""
    global _current
    if _current is None:
        _current = MPMagic()
    return _current


def register(shell: Any) -> MPMagic:
    """Create the shell's ``MPMagic`` (reading ``ipython_config.py``) and let ``%config`` see it."""
    global _current
    for c in getattr(shell, "configurables", []):
        if isinstance(c, MPMagic):
            _current = c
            return c
    _drop_refused(shell)  # (first: the one MPMagic made then says each unknown name once)
    _current = MPMagic(parent=shell)
    shell.configurables.append(_current)
    return _current


def _drop_refused(shell: Any) -> None:
    """Say and drop the values of the shell's config that a setting refuses, so that
    the extension loads with their defaults: one from ipython_config.py, or one a
    %config line had refused (IPython's own config keeps it, and %reload_ext failed).

    Only the settings' own names are tried here, one each: a name ``MPMagic`` lacks
    is said by traitlets when the settings are made, once (each try said it again)."""
    from traitlets.config import Config

    section = shell.config.get("MPMagic") or {}
    known = MPMagic.class_traits(config=True)
    for name in [n for n in section if n in known]:
        try:
            MPMagic(config=Config({"MPMagic": {name: section[name]}}))
        except TraitError as exc:
            said = str(exc).splitlines()[0].split("; the setting keeps")[0]
            sys.stderr.write(f"mpmagic: {said} (the default is used)\n")
            del section[name]


def unregister(shell: Any) -> None:
    """Remove ``MPMagic`` from the shell at ``%unload_ext``.

    IPython keeps in the shell's config every ``%config MPMagic.x = v`` line run,
    the ones refused (``workers = -2``) and misspelled (``worker = 2``) too, and
    ``%load_ext`` reads it again: each of those was said once more, long after it
    had been said at its line and fixed (a misspelled name three times). What the
    section keeps now is what the settings held at the unload: each setting's
    value in force (a refused value never was; the one before it was), and no
    name the settings lack, which was said when it was read.
    """
    global _current
    configurables = getattr(shell, "configurables", [])
    settings = next((c for c in configurables if isinstance(c, MPMagic)), None)
    section = getattr(shell, "config", {}).get("MPMagic")
    if settings is not None and section:
        known = settings.traits(config=True)
        for name in list(section):
            if name in known:
                section[name] = getattr(settings, name)
            else:
                del section[name]
    configurables[:] = [c for c in configurables if not isinstance(c, MPMagic)]
    _current = None


def add_options(parser: Any, what: str = "items") -> None:
    """Add the experience options (progress, insights, scaling) to a magic's parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help=f"show a progress bar counting {what} (default: %%config MPMagic.progress)")
    group.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar for this run")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", action="store_true", default=None,
                       help=f"store each finished {what[:-1]}'s result; a re-run computes only what is "
                       "missing (default: %%config MPMagic.checkpoint)")
    group.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                       help="no checkpoint for this run (when %%config MPMagic.checkpoint is on)")
    parser.add_argument("--insights", action="store_true",
                        help="record per-worker busy/idle/transfer time and the slowest "
                        f"{what}; show a timeline of tasks")
    parser.add_argument("--scaling", action="store_true",
                        help="run serially and on 1..N workers (N: -n or the pool's size); "
                        "plot measured speedup against ideal (each run takes the line's run options, "
                        "e.g. --timeout or --seed; options it cannot honour are refused)")


def apply(opts: Any) -> MPMagic:
    """Fill a magic's unset options from the settings, and apply pending pool settings.

    Options given on the line always win; ``report = 'none'`` acts as ``-q``.
    """
    settings = current()
    settings.apply_pool_settings()  # so -n defaults to the pool's size, as set by `workers`
    if hasattr(opts, "chunksize") and opts.chunksize is None:
        opts.chunksize = settings.chunksize
        # (the advice then names the setting, not a --chunksize the user never typed)
        opts.chunksize_setting = settings.chunksize is not None
    if getattr(opts, "progress", None) is None:
        opts.progress = settings.progress
    if settings.report == "none":
        opts.quiet = True
    return settings


def run_kwargs(opts: Any) -> dict[str, Any]:
    """The API keywords for progress and insights, from options filled by :func:`apply`."""
    return {
        "progress": bool(opts.progress),
        "progress_delay": current().progress_delay,
        "insights": bool(getattr(opts, "insights", False)),
        "checkpoint": _checkpoint(opts),
    }


def _checkpoint(opts: Any) -> bool:
    """``--checkpoint`` / ``--no-checkpoint``, else the ``%config MPMagic.checkpoint`` default,
    which says nothing where a checkpoint cannot be used (``%%parallel --keep``/``--reset``):
    only a typed ``--checkpoint`` is refused there."""
    given = getattr(opts, "checkpoint", None)
    if given is not None:
        return bool(given)
    if getattr(opts, "keep", False) or getattr(opts, "reset", False):
        return False
    return bool(current().checkpoint)
