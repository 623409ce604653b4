"""Cleanup and start-up paths never swallow an exception silently (issue 14.5).

Each failure on those paths is logged on the ``mpmagic`` logger, and one
backend's failing cleanup at interpreter exit does not stop the others'.
"""

from __future__ import annotations

import logging

from mpmagic.backends import dask as dask_backend
from mpmagic.backends import local


class _Stops:
    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.stopped = False

    def stop(self, timeout: float = 2.0, wait_busy: bool = True) -> None:
        self.stopped = True
        if self.fails:
            raise RuntimeError("cannot stop")


def _exit_cleanup_survives_one_failure(module, monkeypatch, caplog) -> None:
    first, second = _Stops(fails=True), _Stops(fails=False)
    monkeypatch.setattr(module, "_live_backends", [first, second])
    with caplog.at_level(logging.WARNING, logger="mpmagic"):
        module.stop_all()
    assert first.stopped and second.stopped
    assert any("at exit failed" in r.getMessage() and r.exc_info for r in caplog.records), caplog.text


def test_local_pools_at_exit_each_stop_and_failures_are_logged(monkeypatch, caplog):
    _exit_cleanup_survives_one_failure(local, monkeypatch, caplog)


def test_dask_pools_at_exit_each_stop_and_failures_are_logged(monkeypatch, caplog):
    _exit_cleanup_survives_one_failure(dask_backend, monkeypatch, caplog)


def test_a_failed_cancel_on_dask_is_logged(caplog):
    """Logged with its traceback, and said in one line held for a run's cell: a WARNING
    record from its thread went to ``logging.lastResort``, whichever cell ran then."""
    class Client:
        def cancel(self, futures, force=False):
            raise OSError("scheduler gone")

    said: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="mpmagic"):
        dask_backend._cancel_quietly(Client(), [1, 2], said.append)
    assert "cancelling 2 Dask tasks failed" in caplog.text and "scheduler gone" in caplog.text
    assert said == ["mpmagic: cancelling 2 Dask tasks failed (OSError: scheduler gone); they may run on until they "
                    "return\n"], said


def test_a_failed_background_prestart_is_logged(monkeypatch, caplog):
    import mpmagic
    from mpmagic import pool

    class Broken:
        running = False

        def start(self):
            raise OSError("no processes today")

    backend = Broken()
    monkeypatch.setattr(pool, "_backend", backend)
    with caplog.at_level(logging.INFO, logger="mpmagic"):
        mpmagic._start_if_current(backend)
    assert "starting the pool in the background failed" in caplog.text
