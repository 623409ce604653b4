"""Reproducible randomness (issue 18): --seed gives item i (rank r) its own stream
from the seed and its index, whatever the workers and chunks."""

from __future__ import annotations

import pytest
from conftest import run
from IPython.core.error import UsageError as IPythonUsageError

import mpmagic

DRAW = (
    "import random, numpy as np, mpmagic\n"
    "def _draw(x):\n"
    "    return (x, random.random(), float(np.random.rand()), float(mpmagic.rng().random()))\n"
)


def test_same_results_any_workers_and_chunks(ip, backend):
    run(ip, DRAW)
    runs = [
        run(ip, f"%pmap -q -n {n} --chunksize {c} --seed 7 _draw, range(12)")
        for n, c in ((1, 12), (2, 1), (2, 5))
    ]
    compared = run(ip, "%pmap -q -n 2 --seed 7 --compare _draw, range(12)")
    assert runs[0] == runs[1] == runs[2] == compared
    assert mpmagic.last_report().equal is True  # --compare's serial run drew the same numbers
    assert run(ip, "%pmap -q --seed 8 _draw, range(12)") != compared
    # Different items, different streams (for each of random, numpy, rng()).
    for k in (1, 2, 3):
        assert len({r[k] for r in compared}) == 12


def test_seeded_star_and_several_iterables(ip, local_pool):
    run(ip, DRAW + "def _pair(a, b):\n    return a + b + random.random()\n")
    a = run(ip, "%pmap -q --seed 3 _pair, range(5), range(5)")
    b = run(ip, "%pmap -q --seed 3 --star _pair, list(zip(range(5), range(5)))")
    assert a == b
    failed = run(ip, "%pmap -q --seed 3 --errors collect lambda x: 1 / x, [0, 1]")[0]
    assert failed.item == 0  # the item itself, not the (index, item) pair


def test_seeded_error_names_the_item_as_serial_map_would(ip, local_pool):
    """--seed maps a wrapper over (index, item) pairs: --errors raise still names the item."""
    result = ip.run_cell("%pmap -q --seed 3 lambda x: 1 / x, [5, 0, 1]", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, ZeroDivisionError)
    notes = " ".join(getattr(err, "__notes__", []))
    assert "item 1 of the input: <lambda>(0)" in notes and "(1, 0)" not in notes
    run(ip, "def _add(a, b):\n    return a / b")
    err = ip.run_cell("%pmap -q --seed 3 _add, [1, 2], [1, 0]", store_history=False).error_in_exec
    assert "item 1 of the input: _add(2, 0)" in " ".join(getattr(err, "__notes__", []))


def test_parallel_seed_per_rank(ip, local_pool):
    run(ip, "import random")
    one = run(ip, "%%parallel -n 3 -q --seed 11\nrandom.random()")
    two = run(ip, "%%parallel -n 3 -q --seed 11\nrandom.random()")
    assert list(one) == list(two) and len(set(one)) == 3


@pytest.mark.parametrize("n", [2])
def test_unseeded_workers_never_share_state(ip, any_method, n):
    import numpy
    from conftest import ensure_pool

    from mpmagic import pool

    pool.shutdown()
    numpy.random.rand()  # numpy's global state, made now: fork workers would inherit it
    ensure_pool(any_method)
    # (random reseeds itself after a fork; numpy's global state does not, numpy#9650)
    run(ip, "import time\ndef _r(x):\n    time.sleep(0.05)\n    import mpmagic, numpy\n"
            "    return mpmagic.worker_id(), float(numpy.random.rand())")
    got = run(ip, "%pmap -q --chunksize 1 _r, range(8)")
    first = {}
    for w, v in got:
        first.setdefault(w, v)
    assert len(set(first.values())) == len(first)  # fork shares the notebook's state without the reseed
    if any_method == "fork":
        pool.shutdown()


def test_pdebug_replays_a_seeded_item_with_its_stream_and_rerun_says_why_not(ip, local_pool, capsys):
    import io
    import sys

    run(ip, "import random\ndef _pick(x):\n    r = random.random()\n    assert x != 2, r\n    return r")
    run(ip, "%pmap -q --seed 5 --errors collect _pick, range(4)")
    drawn = mpmagic.last_failures()[0].error.args[0]
    capsys.readouterr()
    saved, sys.stdin = sys.stdin, io.StringIO("p x\np r\nq\n")
    try:
        run(ip, "%pdebug 2")
    finally:
        sys.stdin = saved
    out = capsys.readouterr().out
    assert f"ipdb> 2\nipdb> {drawn!r}\n" in out  # the item itself, with the same random draw
    with pytest.raises(mpmagic.UsageError, match=r"the last run used seed= \(--seed\)"):
        mpmagic.rerun_failed()


def test_parallel_seed_with_bg_and_checkpoint_gives_the_same_values(ip, local_pool, tmp_path):
    """--bg and --checkpoint dropped --seed: each --bg run gave new numbers, and a
    --seed 4 run with --checkpoint returned the values stored by --seed 3. --keep
    went with --bg too (it was dropped); with --checkpoint or --scaling it is refused."""
    body = "import random\nround(random.random(), 6)"
    plain = run(ip, f"%%parallel -n 2 -q --seed 3\n{body}")
    handle = run(ip, f"%%parallel -n 2 -q --seed 3 --bg\n{body}")
    assert handle.result(60) == plain
    folder = str(tmp_path / "ck")

    def checkpointed(seed: int) -> list:
        return list(mpmagic.parallel(body, workers=2, seed=seed, checkpoint=folder, namespace=ip.user_ns))

    assert checkpointed(3) == plain
    assert checkpointed(3) == plain  # (from the store)
    other = run(ip, f"%%parallel -n 2 -q --seed 4\n{body}")
    assert other != plain
    assert checkpointed(4) == other
    run(ip, "%%parallel -n 2 -q --keep --reset --bg -o kept_run\nkept_v = rank * 10").result(60)
    assert run(ip, "%%parallel -n 2 -q --keep\nkept_v") == [0, 10]
    with pytest.raises(mpmagic.UsageError, match="do not go together"):
        mpmagic.parallel("rank", workers=2, keep=True, checkpoint=folder, namespace=ip.user_ns)
    with pytest.raises(IPythonUsageError, match="cannot keep ranks"):
        run(ip, "%%parallel -n 2 -q --keep --scaling\nrank")


def test_imap_takes_seed_as_pmap_does(ip, local_pool):
    """``imap(seed=)`` (it had no seed=): the same draws as ``%pmap --seed``, ordered or not."""
    run(ip, DRAW)
    magic = run(ip, "%pmap -q -n 2 --chunksize 3 --seed 7 _draw, range(12)")
    func = ip.user_ns["_draw"]
    assert list(mpmagic.imap(func, range(12), seed=7, chunksize=1)) == magic
    assert sorted(mpmagic.imap(func, iter(range(12)), seed=7, ordered=False)) == sorted(magic)


@pytest.fixture
def fake_torch(monkeypatch):
    """A stand-in for torch in sys.modules (CI has no torch): one global
    generator, which a fork copies as torch's default generator is copied."""
    import random
    import sys
    import types

    from mpmagic import pool

    torch = types.ModuleType("torch")
    gen = random.Random(12345)
    torch.manual_seed, torch.rand = gen.seed, gen.random
    torch.get_rng_state, torch.set_rng_state = gen.getstate, gen.setstate
    monkeypatch.setitem(sys.modules, "torch", torch)
    pool.shutdown()
    yield torch
    pool.shutdown()  # (its fork workers hold the stand-in)


def test_fork_workers_reseed_torch_too(ip, fake_torch):
    """Fork workers kept a copy of the notebook's torch generator: two workers,
    two distinct draws out of four (and %%parallel ranks drew alike)."""
    from conftest import ensure_pool

    ensure_pool("fork")
    run(ip, "import torch, time\ndef _t(x):\n    time.sleep(0.05)\n    return torch.rand()")
    assert len(set(run(ip, "%pmap -q --chunksize 1 _t, range(4)"))) == 4
    assert len(set(run(ip, "%%parallel -n 2 -q\ntorch.rand()"))) == 2


def test_seed_seeds_torch_when_the_notebook_uses_it(ip, fake_torch):
    from conftest import ensure_pool

    ensure_pool("fork")
    run(ip, "import torch")
    mine = fake_torch.get_rng_state()
    one = run(ip, "%pmap -q -n 1 --seed 5 lambda i: torch.rand(), range(4)")
    two = run(ip, "%pmap -q -n 2 --chunksize 1 --seed 5 --compare lambda i: torch.rand(), range(4)")
    assert one == two and len(set(one)) == 4
    assert mpmagic.last_report().equal is True
    assert fake_torch.get_rng_state() == mine  # the serial run left the notebook's generator as it was
    ranks = run(ip, "%%parallel -n 2 -q --seed 5\ntorch.rand()")
    assert list(ranks) == one[:2]
