"""The contracts between the pool, the API and the backends, written down.

``pool``, ``api``, ``scaling`` and ``shared`` use a backend only through
:class:`Backend`; a backend uses a job only through :class:`Job`. Both are
``typing.Protocol``: the local pool and the Dask backend match them by shape,
and ``tests/test_engine.py`` checks that they do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ..engine import Run


@runtime_checkable
class Job(Protocol):
    """What a backend calls on a job (``jobs.MapJob``, ``jobs.CellJob``)."""

    kind: str  # "map" or "cell"
    call_id: int
    timeout: float | None
    func_key: bytes | None
    func_payload: bytes | None
    items_done: int
    items_failed: int
    items_total: int | None

    @property
    def finished(self) -> bool: ...
    @property
    def has_work(self) -> bool: ...
    @property
    def failed(self) -> bool: ...
    def next_unit(self) -> Any: ...
    def message(self, unit: Any) -> tuple: ...
    def done(self, unit: Any, data: bytes, seconds: float, meta: dict | None = None) -> None: ...
    def error(self, unit: Any, index: int, info: Any, partial: bytes, seconds: float) -> None: ...
    def unpicklable(self, unit: Any, index: int | None, info: Any) -> None: ...
    def lost(
        self, unit: Any, reason: str, timed_out: bool = False, index: int | None = None, worker_kept: bool = False
    ) -> None: ...
    def requeue(self, unit: Any) -> None: ...
    def output(self, tag: Any, stream: str, text: str) -> None: ...
    def release_shared(self) -> None: ...
    def redirect(self, out: Callable[[str, str], None], progress: Callable[[int], None] | None) -> tuple: ...
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
    def start_method(self) -> str | None: ...  # None where it does not apply (Dask)
    #: ``make_shared(kind, *args, **kwargs)`` for ``mpmagic.Queue()`` etc., or
    #: None where ``shared`` makes its own (the local pool: POSIX shared memory).
    @property
    def make_shared(self) -> Callable[..., Any] | None: ...

    @property
    def workers(self) -> int: ...
    @property
    def running(self) -> bool: ...
    @property
    def cold(self) -> bool: ...  # workers not all up yet (the next run pays for their start)
    def start(self) -> None: ...
    def wait_ready(self, timeout: float = 60.0) -> None: ...
    def stop(self, timeout: float = 2.0) -> None: ...
    def restart(self) -> None: ...
    def resize(self, workers: int) -> None: ...
    def status(self) -> dict[str, Any]: ...
    def submit(self, job: Job, workers: int | None = None) -> Run: ...
