"""How the local manager shares workers between runs in flight, tested on the
choice alone (a backend that is never started) and on a real pool."""

from __future__ import annotations

from mpmagic.backends.local import LocalBackend, _LocalRun, _Slot
from mpmagic.jobs import MapJob


def _backend_with(runs: list, n_slots: int = 2) -> tuple[LocalBackend, list]:
    backend = LocalBackend(n_slots)  # never started: the choice alone is tested
    backend._runs = list(runs)
    slots = [_Slot(i, None, None, 0.0) for i in range(n_slots)]
    backend.slots = slots
    return backend, slots


def _run(backend: LocalBackend, n: int, background: bool = False) -> _LocalRun:
    run = _LocalRun(backend, MapJob(abs, list(range(n)), n, False, 2), None)
    run.background = background
    return run


def _stop(backend: LocalBackend) -> None:
    backend.slots = []
    backend._runs = []
    backend.stop()


def test_a_free_worker_goes_to_the_run_holding_the_fewest_workers():
    """Beside a run busy on one worker, a small run gets the next free worker
    even when the turn points at the busy run; between equals, turns."""
    backend, _ = _backend_with([])
    busy, small = _run(backend, 100), _run(backend, 2)
    backend._runs = [busy, small]
    held, free = backend.slots
    try:
        held.inflight.append((busy, object()))
        backend._turn = 0  # busy's turn
        assert backend._next_run([busy, small], free, 0) is small
        held.inflight.clear()  # equals now: in turn
        picks = [backend._next_run([busy, small], free, 0) for _ in range(4)]
        assert picks in ([busy, small, busy, small], [small, busy, small, busy])
    finally:
        _stop(backend)


def test_a_foreground_run_comes_before_a_background_one_that_holds_fewer():
    backend, _ = _backend_with([])
    bg, fg = _run(backend, 100, background=True), _run(backend, 100)
    backend._runs = [bg, fg]
    held, free = backend.slots
    try:
        held.inflight.append((fg, object()))  # the foreground run holds one worker, the background none
        backend._turn = 0
        assert backend._next_run([bg, fg], free, 0) is fg
    finally:
        _stop(backend)
