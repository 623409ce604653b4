"""Persistent ranks (issue 18): %%parallel --keep cells share each rank's namespace,
pinned to its worker; a kept rank whose worker died says so."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import run

import mpmagic
from mpmagic import ranks


@pytest.fixture(autouse=True)
def _no_kept_ranks():
    ranks.reset()
    yield
    ranks.reset()


def test_value_kept_between_cells(ip, local_pool):
    run(ip, "shard_size = 3")
    cell = "%%parallel --keep -q\nshard = [rank * 10 + i for i in range(shard_size)]\nlen(shard)"
    assert list(run(ip, cell)) == [3, 3]
    run(ip, "shard_size = 100")  # the rank's own names win over the notebook's
    look = "%%parallel --keep -q\nshard.append(-1)\n(sum(shard), len(shard), __import__('os').getpid())"
    first, second = run(ip, look), run(ip, look)
    assert [v[:2] for v in first] == [(2, 4), (32, 4)]
    assert [v[:2] for v in second] == [(1, 5), (31, 5)]
    assert [v[2] for v in first] == [v[2] for v in second]  # same rank, same worker (pinned)
    assert "kept ranks (%%parallel --keep): rank 0 on worker" in str(mpmagic.pool_status())
    with pytest.raises(mpmagic.ParallelError, match="NameError"):  # plain cells start empty
        run(ip, "%%parallel -q\nshard")


def test_killed_kept_rank_says_so_and_reset(ip, local_pool):
    run(ip, "%%parallel --keep -q\nstate = rank + 1")
    victim = ranks.kept()[1][1]
    pid = next(s.pid for s in local_pool.slots if s.wid == victim)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    run(ip, "%pmap -q abs, range(4)")  # the pool notices and replaces the worker
    with pytest.raises(mpmagic.MPMagicError, match=r"rank 1's kept state is gone: its worker \d+ \(pid \d+\) died"):
        run(ip, "%%parallel --keep -q\nstate")
    assert list(run(ip, "%%parallel --keep --reset -q\nstate = 10 * (rank + 1)\nstate")) == [10, 20]
    assert list(run(ip, "%%parallel --keep -q\nstate")) == [10, 20]


def test_kept_rank_whose_worker_timed_out_is_named_by_the_pid_it_had(ip, local_pool):
    run(ip, "%%parallel --keep -q\nacc = rank")
    victim = ranks.kept()[0][1]
    pid = next(s.pid for s in local_pool.slots if s.wid == victim)
    slow = "%%parallel --keep -q --timeout 0.5 --no-progress\nimport time\nif rank == 0: time.sleep(30)\nacc"
    with pytest.raises(mpmagic.ParallelError, match="timeout"):
        run(ip, slow)  # rank 0's worker is stopped and replaced during the cell
    with pytest.raises(mpmagic.MPMagicError, match=rf"rank 0's kept state is gone: its worker {victim} \(pid {pid}\) died"):
        run(ip, "%%parallel --keep -q\nacc")


def test_kept_rank_stopped_after_another_failed_says_its_state_is_lost(ip, local_pool, monkeypatch):
    """Rank 1 raises while rank 0 still runs (waiting on it): rank 0 is stopped, as an
    MPI job aborts, and its worker with the state it kept: its error says so, and the
    next --keep cell names the worker gone."""
    from mpmagic import jobs

    monkeypatch.setattr(jobs, "RANK_FAILURE_GRACE", 0.2)
    run(ip, "%%parallel --keep -q\nacc = rank")
    body = "%%parallel --keep -q --no-progress\nimport time\nif rank == 1:\n    raise ValueError('bad')\ntime.sleep(30)\n"
    with pytest.raises(mpmagic.ParallelError) as info:
        run(ip, body)
    stopped = info.value.failures[0]
    assert isinstance(stopped, mpmagic.RankStoppedError)
    assert "its kept state (--keep, keep=True) went with its worker: the next --keep cell needs --reset" in str(stopped)
    with pytest.raises(mpmagic.MPMagicError, match="rank 0's kept state is gone"):
        run(ip, "%%parallel --keep -q\nacc")
    assert list(run(ip, "%%parallel --keep --reset -q\nrank")) == [0, 1]  # the pool is usable


def test_kept_rank_gone_without_a_known_pid_says_no_pid(local_pool):
    ranks._kept[0] = (local_pool.pool_key, -1, None)  # a worker never seen alive by the notebook
    with pytest.raises(mpmagic.MPMagicError) as err:
        ranks.check(local_pool, 1, False)
    assert "its worker -1 died" in str(err.value) and "None" not in str(err.value)


def test_keep_usage_errors(ip, local_pool):
    run(ip, "%%parallel --keep -q\nx = 1")
    with pytest.raises(Exception, match="the kept ranks are 2"):
        run(ip, "%%parallel --keep -n 1 -q\nx")
    with pytest.raises(Exception, match="use it with keep=True"):
        run(ip, "%%parallel --reset -q\nx")
    with pytest.raises(Exception, match="%pool resize 3 first"):
        run(ip, "%%parallel --keep --reset -n 3 -q\nx")


def test_notebook_names_a_kept_rank_read_follow_the_notebook(ip, local_pool):
    """Serially (each rank's namespace kept, the notebook's names under it), a name the
    rank never bound is the notebook's current one: a variable, a function, an array
    changed in the notebook after a --keep cell read them reach the next --keep cell.
    The rank's own names (``shard``) stay, and so does a notebook name the rank rebound
    (``x = x * 10``); one it deleted is the notebook's again."""
    run(ip, "scale = 1\ndef f(x): return x * scale\nimport numpy as np\nbig = np.zeros(300_000)\nx = 2\ny = 3")
    first = "%%parallel --keep --reset -q\nshard = [rank]\nx = x * 10\ndel y\n(f(10), scale, float(big[5]))"
    assert list(run(ip, first)) == [(10, 1, 0.0), (10, 1, 0.0)]
    run(ip, "scale = 100\ndef f(x): return -x\nbig[5] = 8\nx = 5\ny = 7")
    assert list(run(ip, "%%parallel --keep -q\n(f(10), scale, float(big[5]), shard, x, y)")) == [
        (-10, 100, 8.0, [0], 20, 7), (-10, 100, 8.0, [1], 20, 7)]
    # A notebook name it read, then bound itself: its own from then on.
    run(ip, "%%parallel --keep -q\nscale = scale + rank")
    run(ip, "scale = 1000")
    assert list(run(ip, "%%parallel --keep -q\nscale")) == [100, 101]
    # A rank that failed: what its top level bound before the failing line is its own.
    run(ip, "z = 1\nw = 2")
    with pytest.raises(mpmagic.ParallelError, match="ZeroDivisionError"):
        run(ip, "%%parallel --keep -q\nz = z + 0\nif rank == 1: w = w * 3\n1 / 0\nw = w + 0")
    run(ip, "z = 10\nw = 20")
    assert list(run(ip, "%%parallel --keep -q\n(z, w)")) == [(1, 20), (1, 6)]
    # Deleted by the rank: the notebook's again.
    run(ip, "%%parallel --keep -q\ndel scale")
    assert list(run(ip, "%%parallel --keep -q\nscale")) == [1000, 1000]
    # Changed in place by the rank: still the notebook's, whose value comes again.
    run(ip, "lst = [1]")
    assert list(run(ip, "%%parallel --keep -q\nlst.append(rank)\nlen(lst)")) == [2, 2]
    assert list(run(ip, "%%parallel --keep -q\nlen(lst)")) == [1, 1]


def test_a_notebook_name_a_kept_rank_rebinds_to_the_same_object_in_a_branch_is_the_ranks(ip, local_pool):
    """Serially the cell's assignment happened, so the name is the rank's from then on:
    ``if rank == 0: k = k + 0`` (the very same small int), ``m = m`` in a loop, a loop's
    target, a ``with ... as``, a walrus. Identity alone said "not bound": the
    notebook's later value came. A branch that did not run, or a function's local of
    the same name, binds nothing: those stay the notebook's."""
    run(ip, "import contextlib\nk, m, n, p, q, c, r, s = 1, 'a', 7, 3, 4, 5, 6, 8")
    cell = ("%%parallel --keep --reset -q\n"
            "if rank == 0:\n    k = k + 0\n"
            "for _ in range(1):\n    m = m\n"
            "while True:\n    n = n * 1\n    break\n"
            "if (p := p) and rank == 1:\n    pass\n"
            "for q in [q]:\n    pass\n"
            "with contextlib.nullcontext(c) as c:\n    pass\n"
            "if rank == 5:\n    r = r\n"
            "def g():\n    s = s_ = 0\n    return s_\n"
            "g()")
    assert list(run(ip, cell)) == [0, 0]
    run(ip, "k, m, n, p, q, c, r, s = 10, 'b', 70, 30, 40, 50, 60, 80")
    assert list(run(ip, "%%parallel --keep -q\n(k, m, n, p, q, c, r, s)")) == [
        (1, "a", 7, 3, 4, 5, 60, 80), (10, "a", 7, 3, 4, 5, 60, 80)]


def test_a_notebook_name_a_match_pattern_captures_in_a_kept_rank_is_the_ranks(ip, local_pool):
    """A ``match`` case's capture pattern binds as an assignment does: ``case k:`` (the
    very same object as the notebook's ``k``), ``case [m, *n]:`` and a mapping's
    ``**p``. Serially the name is the rank's from then on; it stayed the notebook's, and
    the next --keep cell got the notebook's later value. A case that did not match
    binds nothing: that name stays the notebook's."""
    run(ip, "k, m, n, p, r = 1, 2, [3], {}, 6")
    cell = ("%%parallel --keep --reset -q\n"
            "match k:\n    case k:\n        pass\n"
            "match [m, *n]:\n    case [m, *n]:\n        pass\n"
            "match {'a': 1, **p}:\n    case {'a': 1, **p}:\n        pass\n"
            "match 0:\n    case 1:\n        pass\n    case [r]:\n        pass\n"
            "0")
    ns = {"k": 1, "m": 2, "n": [3], "p": {}, "r": 6}
    exec("match k:\n    case k:\n        pass\nmatch [m, *n]:\n    case [m, *n]:\n        pass\n", ns)
    assert ns["k"] == 1 and ns["m"] == 2 and ns["n"] == [3]
    assert list(run(ip, cell)) == [0, 0]
    run(ip, "k, m, n, p, r = 10, 20, [30], {'x': 1}, 60")
    assert list(run(ip, "%%parallel --keep -q\n(k, m, n, p, r)")) == [(1, 2, [3], {}, 60)] * 2


def test_pool_status_says_once_that_kept_ranks_went_with_a_restarted_pool(ip, pool2):
    """After a restart (or a stop) the ranks' workers are gone: %pool says so in one clause,
    with what to do, not "(gone)" per rank; the next --keep cell still says the state is lost."""
    run(ip, "%%parallel --keep -q\nacc = rank")
    assert "rank 0 on worker" in str(mpmagic.pool_status())
    pool2.restart()
    line = next(s for s in str(mpmagic.pool_status()).splitlines() if "kept ranks" in s)
    assert line.strip() == ("kept ranks (%%parallel --keep): ranks 0-1 went with the workers that held them "
                            "(stopped, restarted or died): the next --keep cell needs --reset")
    with pytest.raises(mpmagic.MPMagicError, match="rank 0's kept state is gone"):
        run(ip, "%%parallel --keep -q\nacc")
    assert list(run(ip, "%%parallel --keep --reset -q\nacc = rank\nacc")) == [0, 1]
    line = next(s for s in str(mpmagic.pool_status()).splitlines() if "kept ranks" in s)
    assert "went with" not in line and ", rank 1 on worker" in line


def test_pool_status_tells_kept_ranks_of_another_pool_from_this_pools_workers(pool2):
    """A kept rank recorded in another pool (same worker id, other pool key) is not on this pool's worker."""
    ranks._kept[0] = (pool2.pool_key, pool2.slots[0].wid, None)
    ranks._kept[1] = (object(), pool2.slots[1].wid, None)
    line = ranks.status_line(pool2.status()["processes"], pool2.pool_key)
    assert line is not None and line.startswith(f"kept ranks (%%parallel --keep): rank 0 on worker {pool2.slots[0].wid} (")
    assert line.endswith("; rank 1 went with the worker that held it (stopped, restarted or died): "
                         "the next --keep cell needs --reset")
    assert ranks._spans([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
