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


def test_an_on_off_option_takes_what_if_reads_as_true_or_false(pool2):
    """True/False, a numpy bool (``arr.any()``), 0/1 and None are taken for the options
    that are on or off (a string or 2 is refused: see REFUSED)."""
    serial = list(map(abs, XS))
    assert mpmagic.pmap(abs, XS, star=np.False_, compare=np.bool_(False), progress=0, insights=None) == serial
    assert mpmagic.pmap(abs, XS, show_report=False, block=np.True_) == serial
    assert list(mpmagic.imap(abs, XS, ordered=1)) == serial
    assert mpmagic.parallel("rank", workers=2, label_output=np.True_, keep=0, namespace={}) == [0, 1]


def test_none_for_an_on_off_option_is_its_default(pool2, capsys):
    """None is the option's default, on or off: ``block=None`` is a blocking call (it
    returned a background run, as block=False), ``label_output=None`` labels (the
    default), ``compare=None`` compares nothing (the default)."""
    serial = list(map(abs, XS))
    assert mpmagic.pmap(abs, XS, block=None, compare=None) == serial
    assert mpmagic.parallel("print(rank)", workers=2, label_output=None, block=None, namespace={}) == [None, None]
    out = capsys.readouterr().out
    assert "[rank 0] 0" in out and "[rank 1] 1" in out, out


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
    # an on/off option is True or False: "False" and "no" were true, so the option was on
    (lambda: mpmagic.pmap(abs, XS, star="False"), "star must be True or False", "'False'", UsageError),
    (lambda: mpmagic.pmap(abs, XS, compare="no"), "compare must be True or False", "'no'", UsageError),
    (lambda: mpmagic.pmap(abs, XS, block="x"), "block must be True or False", "'x'", UsageError),
    (lambda: mpmagic.submit(abs, XS, show_report=2), "show_report must be True or False", "2", UsageError),
    (lambda: mpmagic.imap(abs, XS, ordered="x"), "ordered must be True or False", "'x'", UsageError),
    (lambda: mpmagic.parallel("rank", keep="yes", namespace={}), "keep must be True or False", "'yes'", UsageError),
    (lambda: mpmagic.parallel("rank", label_output="False", namespace={}), "label_output must be True or False",
     "'False'", UsageError),
    # a keyword the API has no parameter for: Python's error, with the one meant (Python 3.11's named none)
    (lambda: mpmagic.pmap(abs, XS, n=2), "pmap() got an unexpected keyword argument 'n'", "; did you mean workers=?",
     TypeError),
    (lambda: mpmagic.parallel("rank", n_jobs=2), "parallel() got an unexpected keyword argument 'n_jobs'",
     "; did you mean workers=?", TypeError),
    (lambda: mpmagic.submit(abs, XS, chunk_size=2), "submit() got an unexpected keyword argument 'chunk_size'",
     "; did you mean chunksize=?", TypeError),
    (lambda: mpmagic.pmap(abs, XS, timout=2), "pmap() got an unexpected keyword argument 'timout'",
     "; did you mean timeout=?", TypeError),
    (lambda: mpmagic.imap(pow, XS, XS, strict=True), "imap() got an unexpected keyword argument 'strict'",
     "imap(f, zip(xs, ys, strict=True), star=True)", TypeError),
    (lambda: mpmagic.pmap(abs, XS, verbose=True), "pmap() got an unexpected keyword argument 'verbose'",
     "(it takes workers=, chunksize=, star=,", TypeError),
    (lambda: mpmagic.start_pool(n=2), "start_pool() got an unexpected keyword argument 'n'",
     "; did you mean workers=?", TypeError),
    (lambda: mpmagic.use_local(processes=2), "use_local() got an unexpected keyword argument 'processes'",
     "; did you mean workers=?", TypeError),
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


class _NoUnitsPerRank(jobs.CellJob):
    """A cell job that fails the test if made for more ranks than the machine runs: one
    for 10**8 ranks took 16 s and then a SystemError from ``deque``, one for 10**400
    grew to 23 GB (a tester's report)."""

    def __init__(self, spec: bytes, size: int, **kwargs) -> None:
        from mpmagic.backends.local import max_workers

        assert size <= max_workers(), f"a CellJob of {size} ranks was built before the size was checked"
        super().__init__(spec, size, **kwargs)


HUGE_RANKS = [(1000, "1000"), (10**8, "100000000"), (10**400, "10**400"),
              (99999999999999999999999999999, "999999... (29 digits)"), (np.int64(10**12), "1000000000000")]


@pytest.mark.parametrize("workers, shown", HUGE_RANKS, ids=[r[1] for r in HUGE_RANKS])
def test_more_ranks_than_the_machine_runs_are_refused_before_anything_per_rank(pool2, monkeypatch, workers, shown):
    """``parallel(code, workers=N)``: the size was checked at submit, after the job had
    made one unit per rank (``-n 1000`` was quick, ``10**8`` and ``10**400`` were not)."""
    monkeypatch.setattr(api, "CellJob", _NoUnitsPerRank)
    from mpmagic.backends.local import max_workers
    from mpmagic.cpus import available_cpus

    before = mpmagic.last_report()
    for block in (True, False):
        with pytest.raises(UsageError) as info:
            mpmagic.parallel("rank", workers=workers, namespace={}, block=block)
        assert str(info.value) == (f"workers = {shown} is more ranks than this machine can run at once "
                                   f"(at most {max_workers()} with {available_cpus()} CPUs)")
    assert mpmagic.last_report() is before  # (no run started)
    assert pool_module.current_pool() is pool2 and pool2.workers == 2


def test_a_refused_number_is_shown_abbreviated_past_twenty_digits():
    """``pmap(workers=10**400)`` printed all 401 digits; past 4300 digits ``repr`` of an
    int raises ValueError, which would have replaced the refusal."""
    from mpmagic.checks import number_text

    assert [number_text(v) for v in (2, -7, 10**20 - 1, np.int64(5), 2.5, "x")] == [
        "2", "-7", "99999999999999999999", "np.int64(5)", "2.5", "'x'"]
    assert number_text(10**400) == "10**400" and number_text(-(10**30)) == "-10**30"
    assert number_text(123456789 * 10**400) == "123456... (409 digits)"
    assert number_text(10**5000 + 1) == "100000... (5001 digits)"  # (str() of it raises ValueError)
    with pytest.raises(UsageError, match=r"^workers = 10\*\*400 is more processes than this machine can run"):
        mpmagic.pmap(abs, XS, workers=10**400)
    with pytest.raises(UsageError, match=r"^chunksize must be a whole number of at least 1, not -10\*\*400$"):
        mpmagic.pmap(abs, XS, chunksize=-(10**400))


def test_a_dask_pool_refuses_more_ranks_than_its_worker_processes_before_connecting():
    """A Dask pool not running yet: mpmagic's own cluster starts with a known size; a
    cluster elsewhere is counted once connected, and only an absurd size is refused now."""
    from mpmagic.backends import dask as dask_backend

    backend = object.__new__(dask_backend.DaskBackend)  # (its attributes, without a cluster)
    backend.client, backend._most_workers, backend.address, backend.scheduler_file = None, 0, None, None
    backend.owns_cluster, backend.requested_workers = True, 2
    backend.check_ranks(2)
    with pytest.raises(UsageError, match=r"^workers = 3 needs 3 Dask worker processes at once \(one per rank\), "
                                         r"and the local Dask cluster has 2: use workers = 2 or fewer"):
        backend.check_ranks(3)
    backend.owns_cluster, backend.address = False, "tcp://10.0.0.1:8786"
    backend.check_ranks(1000)  # (perhaps: the run counts the workers once connected)
    with pytest.raises(UsageError, match=r"^workers = 10\*\*400 is more ranks than mpmagic runs at once \(at most 65536"):
        backend.check_ranks(10**400)


@pytest.fixture
def no_local_cluster(monkeypatch):
    """Dask's LocalCluster and Client replaced by a failure: a refusal must come before either is made."""
    from mpmagic.backends import dask as dask_backend

    def made(*args, **kwargs):
        raise AssertionError(f"a Dask cluster or client was made: {args} {kwargs}")

    monkeypatch.setattr(dask_backend, "_OwnLocalCluster", made)
    monkeypatch.setattr(dask_backend, "Client", made)
    return dask_backend


@pytest.mark.parametrize("size, shown", [(10**400, r"10\*\*400"), (100000, "100000"), (np.int64(100000), "100000")],
                         ids=["10**400", "100000", "np.int64(100000)"])
def test_mpmagics_own_dask_cluster_is_refused_past_the_machines_limit_before_it_starts(no_local_cluster, size, shown):
    """``use_dask(workers=10**400)`` grew to 23 GB and was OOM-killed, ``workers=100000``
    hung starting processes: mpmagic's LocalCluster runs on this machine, so it has the
    local pool's limit, refused in the local pool's words before anything starts."""
    from mpmagic.backends.local import max_workers
    from mpmagic.cpus import available_cpus

    before = pool_module.current_pool()
    said = (rf"^workers = {shown} is more processes than this machine can run at once "
            rf"\(at most {max_workers()} with {available_cpus()} CPUs\)$")
    with pytest.raises(UsageError, match=said):
        mpmagic.use_dask(workers=size)
    with pytest.raises(UsageError, match=said):
        no_local_cluster.DaskBackend(workers=size)
    assert pool_module.current_pool() is before  # (the pool there was stays)
    backend = object.__new__(no_local_cluster.DaskBackend)  # (%pool resize N on it: before any scale)
    backend.owns_cluster, backend.address, backend.scheduler_file, backend.requested_workers = True, None, None, 2
    backend.client = backend.cluster = None
    with pytest.raises(UsageError, match=said):
        backend.resize(size)
    assert backend.requested_workers == 2
    backend.resize(max_workers())  # (the limit itself is a size: not running, it is only kept)
    assert backend.requested_workers == max_workers()


def test_a_connected_dask_clusters_worker_count_is_not_this_machines_limit(no_local_cluster):
    """With a scheduler, ``workers=N`` is a count of workers to wait for, on machines of
    their own: mpmagic starts nothing for it, so no limit of this machine's applies (the
    first thing tried is connecting)."""
    with pytest.raises(AssertionError, match="a Dask cluster or client was made"):
        no_local_cluster.DaskBackend("tcp://127.0.0.1:9", workers=100000)


def test_pool_dask_n_past_the_machines_limit_is_one_usage_line(ip, no_local_cluster):
    """``%pool dask -n 100000`` hung 40 s+ starting processes; ``%pool start -n 100000`` is refused at once."""
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        result = ip.run_cell("%pool dask -n 100000", store_history=False)
    assert "%pool: -n 100000 is more processes than this machine can run at once" in str(result.error_in_exec)
    assert "was made" not in cap.stdout + cap.stderr


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
