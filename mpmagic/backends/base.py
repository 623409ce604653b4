"""The contracts between the pool, the API and the backends, written down.

``pool``, ``api``, ``scaling`` and ``shared`` use a backend only through
:class:`Backend`; a backend (and ``engine.Run``) uses a job only through the
members of :class:`Job`. Both are ``typing.Protocol``: the local pool and the
Dask backend match them by shape, and so do ``jobs.MapJob``, ``jobs.CellJob``
and ``ranks.KeptCellJob``. mypy checks each job class against :class:`Job`
(the assignments at the end of this module), and ``tests/test_engine.py``
checks at run time that every backend and job matches, and that the backends
and the engine name no member of a job that :class:`Job` does not list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..engine import Run

if TYPE_CHECKING:
    from ..chunking import ChunkPlanner


@runtime_checkable
class Job(Protocol):
    """What a backend calls on a job (``jobs.MapJob``, ``jobs.CellJob``, ``ranks.KeptCellJob``).

    One protocol for both kinds: a member that belongs to one kind has a
    neutral value on the other (said beside it), so a backend branches on
    ``kind`` or ``pinned``, never on a job's class.
    """

    kind: str  # "map" or "cell"
    call_id: int
    # The notebook's numeric-library settings when the job was made, in the calling
    # thread (context.libraries): the backend passes them to context.current.
    libs: tuple
    collect: bool  # errors="collect": a failed item stands as a Failed in the results (False for a cell)
    timeout: float | None
    # Set by the backend: other runs held workers while this one was in flight,
    # and how long its first unit waited for them (the report's advice reads them).
    shared_workers: bool
    waited_for_workers: float
    # Set by the backend: worker -> seconds the run's units waited in it for a %%pool setup
    # still running there (no item's time: the report says it, the advice leaves it out).
    setup_waits: dict
    # Set by a backend whose run used other than the workers asked for: the worker
    # threads a map was given (Dask: ``-n`` capped by the cluster's free threads, more
    # if a busy one came free during it), not how many got work, as the local pool's
    # line counts its workers; None: the workers asked for (the report's line counts them).
    ran_on: int | None
    # Set by a backend whose workers get no %pool restart or sys.path from the notebook
    # (a Dask cluster mpmagic connected to): what to do when the function needs a module
    # they cannot import; None: the local pool's advice (restart, or install it).
    missing_module_advice: str | None
    # A cell whose rank failed while others still run: the monotonic time at which the
    # backend calls ``abort`` and then stops the workers still busy with its units (and
    # ends the run), as an MPI job aborts; None (always for a map) while nothing is due.
    abort_at: float | None

    # Read-only here (a job may compute them: CellJob.items_failed is a property).
    @property
    def items_total(self) -> int | None: ...
    @property
    def func_key(self) -> bytes | None: ...
    @property
    def func_payload(self) -> bytes | None: ...
    @property
    def items_done(self) -> int: ...
    @property
    def items_failed(self) -> int: ...
    @property
    def func(self) -> Callable | None:
        """A map's function (warm-up scans it for modules, Dask names the run after it); None for a cell."""
    @property
    def size(self) -> int:
        """A cell's ranks, which all run at once, each on a worker of its own; 0 for a map."""
    @property
    def ranks_pending(self) -> int:
        """A cell's ranks not handed out yet (the local pool starts workers for them); 0 for a map."""
    @property
    def pinned(self) -> bool:
        """Each unit runs only on the worker pinned to it (``%%parallel --keep``: ``next_unit_for``)."""
    @property
    def planner(self) -> ChunkPlanner | None:
        """A map's chunk planner (its measured cost per item sets the local pool's queue depth); None for a cell."""
    @property
    def failure(self) -> BaseException | None:
        """What failed the run (a map's first failing item in input order, ``CancelledError``
        once cancelled; a cell's lowest failing rank), or None."""

    @property
    def finished(self) -> bool: ...
    @property
    def has_work(self) -> bool: ...
    @property
    def failed(self) -> bool: ...
    def next_unit(self, limit: int | None = None, pair: bool = False) -> Any:
        """The next unit to send, or None; a map's has at most ``limit`` items (a worker's
        ``max_tasks_per_child`` allowance), a rank is always one. ``pair``: a map's next
        two chunks as one (both would queue on the same worker)."""
    def next_unit_for(self, wid: int) -> Any:
        """The next unit that may run on worker ``wid`` (a pinned job's; otherwise ``next_unit()``)."""
    def drop_orphans(self, live: set[int]) -> None:
        """Fail the pending units pinned to a worker not in ``live`` (it is gone); nothing for an unpinned job."""
    def split(self, unit: Any) -> list[int]:
        """Send a map unit's items out again one per unit, in its place; returns their ids (ValueError for a rank)."""
    def payload_lost(self) -> bool:
        """Did a pool stop unlink a shared-memory segment the job's payload names (the
        captured arrays of a map's function, a cell's large names) since it was built?"""
    def prepare_payload_again(self) -> None:
        """Build the payload again for the pool as it is now (after ``payload_lost``)."""
    def prefill(self) -> None:
        """Read a lazy input's first chunk in the submitting thread, before the backend's lock; nothing for a cell."""
    def read_input(self, n: int | None = None) -> None:
        """Read more of a lazy input, in the thread that waits on the run (``engine.Run``); nothing for a cell."""
    def input_wait(self) -> float | None:
        """Seconds until a read in progress may have items to take, or None when no read goes on."""
    def describe_unit(self, unit: Any) -> str:
        """``unit`` in the user's words, for a backend's messages: "item 3", "items 4-7",
        "the call" (``mpmagic.call``), "rank 2"."""
    def message(self, unit: Any) -> tuple: ...
    def done(self, unit: Any, data: bytes, seconds: float, meta: dict | None = None) -> None: ...
    def error(self, unit: Any, index: int, info: Any, partial: bytes, seconds: float) -> None: ...
    def came_back_late(self, unit: Any, data: bytes) -> None: ...  # a Done after the run ended (failed)
    def ran_without_setup(self, unit: Any, note: str) -> None:
        """The worker answering ``unit`` (told before its reply) runs without the pool's setup: it
        failed or was skipped there. ``note``: one line saying so, added to a NameError of the unit."""
    def ran_other_code(self, unit: Any, modules: list[str]) -> None:
        """The Dask worker answering ``unit`` (told before its reply) runs these user modules from
        a file that is not the one the notebook loaded: its results are not checkpointed."""
    def unpicklable(self, unit: Any, index: int | None, info: Any) -> None: ...
    def collected(self, unit: Any, index: int, info: Any) -> None:
        """Item ``index`` of the running ``unit`` raised, collected (told before the unit's
        reply, so that its error outlives a worker that dies later in the unit). A cell: never called."""
    def lost(
        self, unit: Any, reason: str, timed_out: bool = False, index: int | None = None, worker_kept: bool = False
    ) -> None: ...
    def not_run(self, unit: Any, reason: str) -> None:
        """``unit`` could not run at all (no worker to run it, for ``reason``): its items fail as not run."""
    def ran_again_elsewhere(self, unit: Any, index: int) -> None:
        """The cluster ran ``unit`` again on another worker (Dask's own retry) after its worker died
        or left running its item ``index``: the report says so. A cell: never called."""
    def requeue(self, unit: Any) -> None: ...
    def abort(self) -> None:
        """``abort_at`` came: from now on a unit given back (``requeue``) is stopped, not sent
        again; units not handed out never run. (Never called on a map: its ``abort_at`` is None.)"""
    def output(self, tag: Any, stream: str, text: str) -> None: ...
    def release_shared(self) -> None: ...
    def redirect(
        self, out: Callable[[str, str], None], progress: Callable[[int], None] | None,
        chunk: Callable[[int, list], None] | None, ask_input: Callable[[], None] | None,
    ) -> tuple: ...
    def results(self) -> list: ...


@runtime_checkable
class Backend(Protocol):
    """What ``pool``, ``api``, ``scaling`` and ``shared`` use of a backend."""

    # Read-only members (properties here, so a backend's plain class attribute
    # of a narrower type, e.g. ``start_method = "forkserver"``, satisfies them).
    @property
    def name(self) -> str: ...  # "local" or "dask"
    @property
    def shares_memory(self) -> bool: ...  # may large arrays travel through shared memory (same machine)?
    @property
    def owns_workers(self) -> bool: ...  # does mpmagic start (and %pool restart renew) them? not a cluster it joined
    @property
    def start_method(self) -> str | None: ...  # None where it does not apply (Dask)
    #: ``make_shared(kind, *args, **kwargs)`` for ``mpmagic.Queue()`` etc., or
    #: None where ``shared`` makes its own (the local pool: POSIX shared memory).
    @property
    def make_shared(self) -> Callable[..., Any] | None: ...
    def runs_held(self) -> Any: ...  # a context manager: the runs in flight, none may start meanwhile

    @property
    def workers(self) -> int: ...
    @property
    def running(self) -> bool: ...
    @property
    def cold(self) -> bool: ...  # workers not all up yet (the next run pays for their start)
    def start(self) -> None: ...
    def wait_ready(self, timeout: float = 60.0) -> None: ...
    # What made the last stop or restart, in the user's words (``%pool stop``, ``use_dask()``;
    # None: nothing said): the runs it failed name it ("the pool was stopped by %pool dask
    # while this run was in flight: run it again"). ``by`` below sets it.
    stopped_by: str | None

    def stop(self, timeout: float = 2.0, *, by: str | None = None) -> None: ...
    def retire(self, timeout: float = 2.0, wait_busy: bool = True, *, by: str | None = None) -> None:
        """Stop for good: another pool replaced this one (``by``, in the user's words).
        Nothing starts it again, and a run that chose it just before fails with "the pool
        was stopped by BY while this run was in flight: run it again" (``wait_busy=False``:
        busy local workers get no time to finish)."""
    def restart(self, wait: bool = True, *, by: str | None = None) -> None: ...  # wait: until the workers are ready again
    def resize(self, workers: int) -> None: ...
    # A usage error for a map's ``workers`` this backend could never run (the local
    # pool's cap), asked before the run is made: a mistake in the call makes no report.
    def check_workers(self, workers: int | None) -> None: ...
    # The same for a cell's ``size`` ranks (a whole number of at least 1), asked before
    # the job builds anything per rank: ``-n 10**30`` must be refused at once, not
    # after the memory for 10**30 units ran out.
    def check_ranks(self, size: int) -> None: ...
    def status(self) -> dict[str, Any]: ...
    # The ids ``worker_setup`` knows the live workers' setup module files by: the
    # local pool's workers (stamped as each reports it ran the setup), a Dask
    # cluster's one key (stamped as the notebook sends it the setup); ``checkpoint``
    # asks whether they run a setup module older than its file. None: no record
    # tells, and a checkpointed run under a setup importing the user's modules goes
    # without the checkpoint.
    def setup_workers(self) -> list[Any] | None: ...
    # Replace the workers still running (or yet to run) a setup sent to them, as the setup
    # changes (no run in flight): they would finish it before the new one, a hung one never.
    # The ids of those replaced; Dask: none (its workers run the plugin as the cluster starts them).
    def replace_setting_up(self) -> list[Any]: ...
    def submit(self, job: Job, workers: int | None = None, background: bool = False) -> Run: ...
    # The run of ``job`` in flight, if any: a Ctrl-C that lands as ``submit`` hands its run
    # over (after the run began, before the caller holds it) reaches a caller with no
    # handle, which finds the run here to cancel it. None once it ended, or before it began.
    def run_of(self, job: Job) -> Run | None: ...


if TYPE_CHECKING:  # mypy checks here that every job class has every member of Job, with its types
    from ..jobs import CellJob, MapJob
    from ..ranks import KeptCellJob

    _map_job: type[Job] = MapJob
    _cell_job: type[Job] = CellJob
    _kept_cell_job: type[Job] = KeptCellJob
