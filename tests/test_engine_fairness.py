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


def _short(run: _LocalRun) -> _LocalRun:
    run.job.planner.per_item = 1e-7  # tiny items, as an earlier call of the function measured them
    return run


def _hand_out(backend: LocalBackend, monkeypatch) -> list[tuple]:
    """What one hand-out (``_assign``) sends: (slot, run, first item, items), nothing written."""
    sent: list[tuple] = []

    def send(slot: _Slot, run: _LocalRun, unit) -> None:
        sent.append((slot, run, unit.start, unit.count))
        slot.inflight.append((run, unit))

    monkeypatch.setattr(backend, "_send_unit", send)
    backend._assign()
    return sent


def test_a_runs_two_short_chunks_that_would_queue_on_one_worker_go_as_one(monkeypatch):
    """Eight threads each mapping 1,000 tiny items at once: beside a worker busy with
    another run, each run's two short chunks went to the free worker one behind the
    other (pipelining): two messages, two replies, two wake-ups for what one chunk
    does. They go as one chunk now, the same items on the same worker. A run alone
    still gets a chunk on each free worker, and so does a run beside another free one."""
    backend, (busy, free) = _backend_with([])
    try:
        other, run = _short(_run(backend, 100)), _short(_run(backend, 1000))
        other.job.exhausted = True  # (its last unit runs on ``busy``)
        backend._runs = [other, run]
        busy.inflight.append((other, object()))
        assert _hand_out(backend, monkeypatch) == [(free, run, 0, 1000)]
        # Both workers free, two runs: each run on a worker of its own, whole.
        busy.inflight.clear()
        free.inflight.clear()
        first, second = _short(_run(backend, 1000)), _short(_run(backend, 1000))
        backend._runs = [first, second]
        assert sorted(_hand_out(backend, monkeypatch), key=lambda s: s[0].wid) == [(busy, first, 0, 1000),
                                                                                   (free, second, 0, 1000)]
        # Planned for 4 workers (4 chunks of 250): the first two as one, and no third
        # queued behind them, as the second was behind the first.
        busy.inflight.clear()
        free.inflight.clear()
        busy.inflight.append((other, object()))
        wide = _short(_LocalRun(backend, MapJob(abs, list(range(1000)), 1000, False, 4), None))
        backend._runs = [other, wide]
        assert _hand_out(backend, monkeypatch) == [(free, wide, 0, 500)]
        # A run alone: a chunk on each worker, as before.
        busy.inflight.clear()
        free.inflight.clear()
        alone = _short(_run(backend, 1000))
        backend._runs = [alone]
        assert _hand_out(backend, monkeypatch) == [(busy, alone, 0, 500), (free, alone, 500, 500)]
    finally:
        _stop(backend)
