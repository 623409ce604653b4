"""The API's option values: what serial Python and the stdlib take is taken, what
they refuse is one usage line naming the option, the value and what it takes
(a tester's report: numpy numbers refused as "not a whole number", ``timeout=10**400``
killing the pool's manager and another run with it, values failing inside mpmagic).

The oracle is serial Python: ``list(map(f, xs))``, ``range(np.int64(3))``,
``multiprocessing.Pool(np.int64(2)).map(f, xs, chunksize=np.int64(1))``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

import mpmagic
from mpmagic import api, jobs
from mpmagic import pool as pool_module
from mpmagic.errors import UsageError

N = np.int64(2)  # a count computed with numpy (arr.sum(), np.argmax, df[c].nunique())
XS = [-3, -2, -1, 0, 1]


def _nap(x: float) -> float:
    time.sleep(x)
    return x


def test_numpy_numbers_are_the_numbers_they_are(pool2):
    """``np.int64(2)`` was refused as "not a whole number" by every count, and
    ``np.float32(0.5)`` as a timeout; ``max_tasks_per_child`` alone took them."""
    serial = list(map(abs, XS))
    for option in ("workers", "chunksize", "retries", "seed"):
        assert mpmagic.pmap(abs, XS, **{option: N}) == serial, option
    assert mpmagic.pmap(abs, XS, timeout=N) == mpmagic.pmap(abs, XS, timeout=np.float32(5.0)) == serial
    assert list(mpmagic.imap(abs, XS, buffer=N, chunksize=N)) == serial
    assert mpmagic.submit(abs, XS, workers=N, progress_delay=np.float32(0.5)).result(30) == serial
    assert mpmagic.parallel("rank", workers=N, timeout=np.float32(5.0), seed=N, namespace={}) == [0, 1]
    assert mpmagic.start_pool(workers=N) is pool2 and pool2.workers == 2


def test_checked_values_are_plain_ints_and_floats():
    """They travel to the workers and into the reports as plain numbers, not numpy scalars."""
    checked = api.check_map_args(abs, (XS,), N, np.int32(3), np.float32(0.5), "raise", False, np.uint8(1))
    assert checked[1:] == (2, 3, 0.5, 1)
    assert [type(v) for v in checked[1:]] == [int, int, float, int]
    assert api.check_map_args(abs, (XS,), np.int64(-1), None, None, "raise", False).workers is None  # (the pool)
    assert type(pool_module.parse_memory(np.int64(10**9))) is int
    assert pool_module.parse_memory(np.float64(1.5e9)) == 1_500_000_000
    from mpmagic.backends.local import pool_size

    assert type(pool_size(N)) is int and pool_size(N) == 2
    assert pool_module.gpu_devices([np.int64(0), 1, "MIG-a"]) == ["0", "1", "MIG-a"]
    assert pool_module.gpu_devices("0, 1") == ["0", "1"] and pool_module.gpu_devices("") == []


def test_a_timeout_too_large_to_wait_on_is_no_limit_as_its_float_is(pool2):
    """``timeout=10**400`` passed the check as an int, and the pool's manager raised
    OverflowError adding it to its clock; ``1e400`` (``inf``) always meant no limit."""
    assert api.check_map_args(abs, (XS,), None, None, 10**400, "raise", False).timeout == math.inf
    serial = list(map(abs, XS))
    assert mpmagic.pmap(abs, XS, timeout=10**400) == serial
    assert list(mpmagic.imap(abs, XS, timeout=10**400)) == serial
    assert mpmagic.parallel("rank", workers=2, timeout=10**400, namespace={}) == [0, 1]
    run = mpmagic.submit(abs, XS)
    assert sorted(mpmagic.as_completed(run, timeout=10**400)) == sorted(serial)  # (threading refuses it)
    assert run.result(timeout=math.inf) == serial


def test_a_background_run_in_flight_survives_another_calls_huge_timeout(pool2):
    """The manager's OverflowError failed every run in flight: the background run
    ``h`` raised it from ``result()`` instead of giving its results."""
    items = [0.2] * 4
    h = mpmagic.submit(_nap, items, chunksize=1)
    assert mpmagic.pmap(abs, [1, -2], timeout=10**400) == [1, 2]
    assert h.result(60) == list(map(_nap, items))


def test_a_bad_timeout_that_reaches_the_manager_ends_its_own_run_alone(pool2, monkeypatch):
    """Defence in depth: with the checks taken away, the value reaches the manager's
    clock, where it fails that run alone (its error), not the other runs nor the manager."""
    unchecked = lambda value, name="timeout": value  # noqa: E731
    monkeypatch.setattr(api, "run_timeout", unchecked)
    monkeypatch.setattr(jobs, "run_timeout", unchecked)
    items = [0.2] * 4
    h = mpmagic.submit(_nap, items, chunksize=1)
    with pytest.raises(OverflowError):
        mpmagic.pmap(abs, [1, -2], timeout=10**400)
    assert h.result(60) == list(map(_nap, items))
    monkeypatch.undo()
    assert mpmagic.pmap(abs, XS, timeout=5) == list(map(abs, XS))  # (the same manager serves the next run)


def _in_flight() -> mpmagic.Run:
    return mpmagic.submit(abs, [1])


# (call, the argument, the value as the line shows it, the error's exact type)
REFUSED = [
    (lambda: mpmagic.pmap(abs, XS, timeout=float("nan")), "timeout", "nan", UsageError),
    (lambda: mpmagic.pmap(abs, XS, timeout="1"), "timeout", "'1'", UsageError),
    (lambda: mpmagic.pmap(abs, XS, workers=2.0), "workers", "2.0", UsageError),
    (lambda: mpmagic.pmap(abs, XS, chunksize=np.float64(2)), "chunksize", "np.float64(2.0)", UsageError),
    (lambda: mpmagic.imap(abs, XS, buffer=True), "buffer", "True", UsageError),
    (lambda: mpmagic.start_pool(gpus=5), "gpus", "5", UsageError),
    (lambda: mpmagic.start_pool(gpus=[0, None]), "gpus", "None", UsageError),
    (lambda: mpmagic.start_pool(gpus="0,,1"), "gpus", "'0,,1'", UsageError),
    (lambda: mpmagic.start_pool(max_memory=np.float32("nan")), "max_memory", "np.float32(nan)", UsageError),
    (lambda: mpmagic.pmap(abs, XS, progress_delay="x"), "progress_delay", "'x'", UsageError),
    (lambda: mpmagic.submit(abs, XS, progress_delay=-1), "progress_delay", "-1", UsageError),
    (lambda: mpmagic.parallel("rank", progress_delay="x", namespace={}), "progress_delay", "'x'", UsageError),
    (lambda: mpmagic.pmap(abs, XS, on_chunk=5), "on_chunk", "5", UsageError),
    (lambda: mpmagic.submit(abs, XS, on_chunk=5), "on_chunk", "5", UsageError),
    (lambda: mpmagic.as_completed(_in_flight(), timeout="1"), "timeout", "'1'", UsageError),
    (lambda: _in_flight().result(timeout="1"), "timeout", "'1'", UsageError),
    (lambda: mpmagic.parallel("rank", namespace=5), "namespace", "5", UsageError),
    (lambda: mpmagic.rerun_failed(bogus=1), "rerun_failed() got an unexpected keyword argument 'bogus'",
     "workers, chunksize", TypeError),
    (lambda: mpmagic.rerun_failed(star=True), "rerun_failed() takes no star=", "star", UsageError),
    (lambda: mpmagic.use_dask("tcp://127.0.0.1:9", bogus=1), "use_dask() got an unexpected keyword argument 'bogus'",
     "scheduler_file", TypeError),
]


@pytest.mark.parametrize("call, name, given, error", REFUSED, ids=[f"{r[1][:40]}={r[2]}" for r in REFUSED])
def test_a_bad_value_is_one_line_naming_the_argument_before_anything_runs(pool2, call, name, given, error):
    """Each failed inside mpmagic (``'int' object is not iterable``, a TypeError from
    ``threading`` or the progress bar, ``on_chunk=5`` only once the run was under way,
    ``namespace=5`` ignored, an unknown option named ``pmap()`` or ``DaskBackend.__init__``)."""
    before = mpmagic.last_report()
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    message = str(info.value)
    assert "\n" not in message and name in message and given in message, message
    assert mpmagic.last_report() is before  # (no run started: none made a report)
    assert pool_module.current_pool() is pool2 and pool2.running  # (the pool as it was)


def test_gather_names_from_numpy_are_plain_str_keys(pool2):
    """``gather=np.array(['x', 'y'])`` holds ``np.str_`` names, which became the keys of
    ``.gathered`` as they were (``np.str_('x')``): the keys are the variables' names,
    plain str, as ``gather=['x', 'y']`` gives them."""
    names = api.variable_names(np.array(["x", "y"]), "gather=")
    assert names == ("x", "y") and [type(name) for name in names] == [str, str]
    code = "x = rank\ny = -rank"
    got = mpmagic.parallel(code, workers=2, gather=np.array(["x", "y"]), namespace={}).gathered
    assert got == mpmagic.parallel(code, workers=2, gather=["x", "y"], namespace={}).gathered
    assert [type(key) for key in got] == [str, str]
