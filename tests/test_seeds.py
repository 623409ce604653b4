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


def test_a_seeded_run_leaves_the_workers_own_random_state(ip, backend):
    """A --seed run left each worker's global state at its last item's stream: the next
    unseeded map went on with those streams, so it drew the same numbers in every session
    on every start method (and two workers whose last seeded items were alike drew alike),
    though the docs say workers never share a state without --seed. As the serial run
    leaves the notebook's state as it was, the workers go back to their own."""
    import random

    import numpy as np

    from mpmagic import seeding

    run(ip, DRAW + "import time\ndef _nos(x):\n    time.sleep(0.02)\n"
            "    return random.random(), float(np.random.rand())\n")
    saved = random.getstate(), np.random.get_state()
    try:  # each stream's next draws after its item's one (what a worker left on it would give)
        nexts: tuple[set, set] = (set(), set())
        for i in range(8):
            seeding.enter(7, i)
            random.random(), np.random.rand()
            for _ in range(8):
                nexts[0].add(random.random())
                nexts[1].add(float(np.random.rand()))
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        seeding._current = None
        seeding.forget()
    for cell in ("%pmap -q --seed 7 --chunksize 1 _draw, range(8)",
                 "%pmap -q --seed 7 --chunksize 4 _draw, range(8)",
                 "%%parallel -n 2 -q --seed 7\nrandom.random(), np.random.rand()"):
        run(ip, cell)
        after = run(ip, "%pmap -q --chunksize 1 _nos, range(8)")
        for k in (0, 1):  # random's and numpy's draws: no two alike, none going on with a seeded stream
            drawn = {r[k] for r in after}
            assert len(drawn) == 8 and not drawn & nexts[k], (cell, after)


def test_a_captured_generator_says_workers_draw_from_copies(ip, local_pool, capsys):
    """random23: ``rng = np.random.default_rng(0)`` read by the mapped function went to each
    worker as a copy in the call's state: two workers drew the same numbers, silently, where
    serial map() draws one stream on ([0.637, 0.637, 0.270, 0.041, 0.270, 0.041] for serial's
    6 distinct). One line says so, once per function; --seed says nothing."""
    import numpy as np

    mpmagic.draws._said_draws.clear()  # (once per function: an equal function of the other start method's run)
    run(ip, "import numpy as np, random, mpmagic, functools\nrng = np.random.default_rng(0)\n"
            "def _g(x):\n    return float(rng.random())\n"
            "def _g2(x):\n    return float(rng.random())\n"
            "def _calls_g(x):\n    return _g2(x)\n"
            "def _own(x):\n    return float(np.random.default_rng(x).random())\n"
            "gen = random.Random(3)\ndef _r(x, g=None):\n    return g.random()\n")
    serial = [float(v) for v in np.random.default_rng(0).random(6)]
    got = run(ip, "%pmap -q --chunksize 1 _g, range(6)")
    assert len(set(serial)) == 6 and set(got) <= set(serial)  # (each a draw of a copy of the stream)
    err = capsys.readouterr().err
    assert ("mpmagic: _g draws from the notebook's numpy Generator `rng`: each worker draws from its own copy of "
            "it as it was at the call, so workers draw the same numbers, and the notebook's does not move on (a "
            "next call draws the same numbers again); for draws that differ per item and repeat on any number of "
            "workers use --seed S (seed=S), and mpmagic.rng() for a Generator\n") in err, err
    run(ip, "_ = %pmap -q _g, range(4)")
    assert "mpmagic:" not in capsys.readouterr().err  # (once per function)
    run(ip, "_ = %pmap -q _calls_g, range(4)")  # (through a notebook function it calls)
    assert "mpmagic: _g2 draws from the notebook's numpy Generator `rng`" in capsys.readouterr().err
    run(ip, "_ = %pmap -q functools.partial(_r, g=gen), range(4)")
    assert "mpmagic: _r draws from the random.Random it is given as argument g:" in capsys.readouterr().err
    run(ip, "_ = %pmap -q _own, range(4)")
    run(ip, "_ = %pmap -q --seed 1 lambda x: float(rng.random()), range(4)")
    assert "mpmagic:" not in capsys.readouterr().err
    run(ip, "def _bg(x):\n    return float(rng.random())\n")
    run(ip, "_h = %pmap --bg -q _bg, range(4)")  # (a background run says it as it starts)
    ip.user_ns["_h"].result(60)
    assert "mpmagic: _bg draws from the notebook's numpy Generator `rng`" in capsys.readouterr().err


def test_a_warm_function_drawing_nothing_is_looked_at_again_only_once_what_it_reads_changes(ip, pool2, monkeypatch,
                                                                                          capsys):
    """The draws line and the state line look at the function and what it reads after every
    run. A function served by the payload cache's fast check (itself and all it reads the
    same objects, none of which can change in place) that the looks found nothing in is not
    looked at again (payload_cache.last_notes): ~270 bytecodes of every warm call. A global
    it reads rebound to a generator is a new object: the next run looks, and says it."""
    from mpmagic import api, draws, payload_cache

    run(ip, "import random, mpmagic\n_R = 5\ndef _late_draw(x):\n    return _R if type(_R) is int else _R.random()\n")
    looks: list[str] = []
    random_uses, accumulates = draws.random_uses, payload_cache.accumulates
    monkeypatch.setattr(draws, "random_uses", lambda f: looks.append("draws") or random_uses(f))
    monkeypatch.setattr(api.payload_cache, "accumulates", lambda code: looks.append("state") or accumulates(code))
    for _ in range(4):
        assert run(ip, "mpmagic.pmap(_late_draw, range(2))") == [5, 5]
    # (the first run builds the payload; the second, served fast, looks and keeps what it found)
    assert looks == ["state", "draws"] * 2
    run(ip, "_R = random.Random(0)")
    run(ip, "_ = mpmagic.pmap(_late_draw, range(2))")
    assert looks[4:] == ["state", "draws"]
    assert "mpmagic: _late_draw draws from the notebook's random.Random `_R`" in capsys.readouterr().err


def test_draws_from_a_global_state_the_notebook_seeded_say_so(ip, local_pool, capsys):
    """random23: ``random.seed(0)`` (or ``np.random.seed(0)``) in the notebook, then a map
    of a function drawing from that global state: serially a repeatable stream; the
    workers draw from their own states, different on every run, silently. One line
    says so, once per function (not before the notebook seeds; not with --seed)."""
    import random

    run(ip, "import random, numpy as np\nfrom random import choice\n"
            "def _a(x):\n    return random.random()\n"
            "def _b(x):\n    return float(np.random.rand())\n"
            "def _c(x):\n    return choice([1, 2, 3])\n")
    # (as if the session's cells so far seeded nothing: the other start method's run did)
    mpmagic.draws._seed_scan[:] = [ip, len(ip.history_manager.input_hist_raw), set()]
    mpmagic.draws._said_draws.clear()
    run(ip, "_ = %pmap -q _a, range(4)")
    assert "mpmagic:" not in capsys.readouterr().err  # (not seeded: serial draws do not repeat either)
    ip.run_cell("random.seed(0)", store_history=True)
    random_serial = [random.random() for _ in range(4)]
    random.seed(0)
    got = run(ip, "%pmap -q _a, range(4)")
    assert got != random_serial
    err = capsys.readouterr().err
    assert ("mpmagic: _a draws from random's global state, which the notebook seeded: each worker draws from a "
            "state of its own, not the notebook's, so the numbers differ from a serial run's and from one run to "
            "the next, and the notebook's state does not move on; for draws that differ per item and repeat on "
            "any number of workers use --seed S (seed=S)") in err, err
    run(ip, "_ = %pmap -q _a, range(4)")
    run(ip, "_ = %pmap -q _b, range(4)")  # (numpy's state: not seeded yet)
    assert "mpmagic:" not in capsys.readouterr().err
    ip.run_cell("np.random.seed(0)", store_history=True)
    run(ip, "_ = %pmap -q _b, range(4)")
    run(ip, "_ = %pmap -q _c, range(4)")
    err = capsys.readouterr().err
    assert "mpmagic: _b draws from numpy.random's global state, which the notebook seeded" in err, err
    assert "mpmagic: _c draws from random's global state" in err, err
    run(ip, "def _d(x):\n    return random.random()\n")
    run(ip, "_ = %pmap -q --seed 3 _d, range(4)")
    ip.run_cell("%%pool setup\nimport random\nrandom.seed(0)", store_history=True)  # (seeds the workers)
    run(ip, "%pool setup clear")
    assert "_d draws" not in capsys.readouterr().err


def test_a_drawing_function_imported_from_a_global_state_says_workers_draw_from_copies(ip, local_pool, capsys):
    """``from numpy.random import rand`` (or ``from random import random``) read by the
    mapped function is a method of the module's global state object, and goes to each
    worker with a copy of that object: two workers drew the same numbers, seeded or not
    (serially: one stream, going on). Nothing was said before the notebook seeded the
    state, and then the line said each worker drew from "a state of its own"."""
    mpmagic.draws._said_draws.clear()
    mpmagic.draws._seed_scan[:] = [ip, len(ip.history_manager.input_hist_raw), set()]  # (nothing seeded)
    run(ip, "from numpy.random import rand as _np_rand\nfrom random import random as _py_random\n"
            "def _imp_np(x):\n    return float(_np_rand())\n"
            "def _imp_py(x):\n    return _py_random()\n")
    got = run(ip, "%pmap -q --chunksize 1 _imp_np, range(4)")
    assert len(set(got)) < 4  # (each worker's first draw is the same number: copies of one state)
    err = capsys.readouterr().err
    assert ("mpmagic: _imp_np draws from numpy.random's global state, through `_np_rand` imported from it: each "
            "worker draws from its own copy of it as it was at the call, so workers draw the same numbers, and the "
            "notebook's does not move on (a next call draws the same numbers again); for draws that differ per "
            "item and repeat on any number of workers use --seed S (seed=S), and mpmagic.rng() for a "
            "Generator\n") in err, err
    run(ip, "_ = %pmap -q --chunksize 1 _imp_py, range(4)")
    assert ("mpmagic: _imp_py draws from random's global state, through `_py_random` imported from it: each "
            "worker draws from its own copy") in capsys.readouterr().err


def test_one_generator_given_as_several_items_says_they_draw_the_same_numbers(ip, local_pool, capsys):
    """numpy's advice is to pass the generator: ``map(simulate, params, [rng] * n)`` draws one
    stream serially, each item going on from the last; each item went to the workers as a
    copy of ``rng`` in its state at the call, so every item drew the same numbers, silently.
    One line says so; a generator per item (``rng.spawn(n)``) says nothing."""
    run(ip, "import numpy as np, itertools\n_items_rng = np.random.default_rng(0)\n"
            "def _sim(p, g):\n    return p + float(g.random())\n")
    got = run(ip, "%pmap -q --chunksize 1 _sim, [0, 0, 0, 0], [_items_rng] * 4")
    assert len(set(got)) == 1  # (serially four successive draws of one stream)
    err = capsys.readouterr().err
    assert ("mpmagic: items 0 and 1 hold the same numpy Generator: each item gets its own copy of it as it was at "
            "the call, so they draw the same numbers (serially: one stream, each item going on from the last), and "
            "the notebook's does not move on; give each item its own generator (rng.spawn(n) makes n independent "
            "ones)\n") in err, err
    assert err.count("mpmagic:") == 1  # (once per run)
    run(ip, "_ = %pmap -q _sim, range(3), itertools.repeat(_items_rng, 3)")
    assert "items 0 and 1 hold the same numpy Generator" in capsys.readouterr().err
    run(ip, "_ = %pmap -q _sim, range(4), _items_rng.spawn(4)")
    run(ip, "_ = %pmap -q lambda g: float(g.random()), _items_rng.spawn(4)")
    assert "mpmagic:" not in capsys.readouterr().err


def test_a_generator_only_tested_or_a_seed_in_a_comment_says_nothing(ip):
    """A function that reads the notebook's generator only to test it against None
    (``x if rng is None else x + 1``) draws nothing from it: serially and in the workers
    the results are the same, so no line of random draws. A seed written in a comment or
    a string of a cell (``# np.random.seed(0) was here``) seeded nothing: a function
    drawing from numpy's global state is as unrepeatable serially."""
    import numpy as np

    from mpmagic import draws

    rng = np.random.default_rng(0)
    ns = {"rng": rng}
    exec("def tested(x):\n    return x if rng is None else x + 1\n"
         "def tested2(x):\n    if rng is not None and x:\n        return 1\n    return rng == None\n"
         "def draws(x):\n    return rng.random() if rng is not None else x\n", ns)
    assert [x if rng is None else x + 1 for x in range(3)] == list(map(ns["tested"], range(3)))
    assert draws.random_uses(ns["tested"]) == []
    assert draws.random_uses(ns["tested2"]) == []
    assert [u.name for u in draws.random_uses(ns["draws"])] == ["rng"]
    mpmagic.draws._seed_scan[:] = [ip, len(ip.history_manager.input_hist_raw), set()]
    ip.run_cell("# np.random.seed(0) was here\n_s = 'random.seed(1)'\n_t = '''\nnp.random.seed(2)'''",
                store_history=True)
    assert mpmagic.draws.notebook_seeded() == set()
    ip.run_cell("np.random.seed(0)  # random.seed(1) too", store_history=True)
    assert mpmagic.draws.notebook_seeded() == {"numpy"}


def test_a_generator_as_a_default_or_the_function_itself_says_workers_draw_from_copies(ip, local_pool, capsys):
    """random23's line missed two ways a notebook's generator goes to the workers as a
    copy: as a default argument (``def f(x, r=rng)``) and as the function itself
    (``pmap(rng.random, ...)``, its bound method). Serial map() draws one stream on
    (distinct numbers); two workers drew the same numbers from their copies, silently.
    The line names each, once."""
    import numpy as np

    mpmagic.draws._said_draws.clear()
    mpmagic.draws._said_methods.clear()
    run(ip, "import numpy as np\nrng = np.random.default_rng(0)\n"
            "def _dflt(x, r=rng):\n    return float(r.random())\n")
    serial = [float(v) for v in np.random.default_rng(0).random(6)]
    got = run(ip, "%pmap -q --chunksize 1 _dflt, range(6)")
    assert len(set(serial)) == 6 and set(got) <= set(serial)
    err = capsys.readouterr().err
    assert ("mpmagic: _dflt draws from the numpy Generator its argument r defaults to: each worker draws from its "
            "own copy of it as it was at the call") in err, err
    got = run(ip, "[float(v[0]) for v in mpmagic.pmap(rng.random, [1] * 6, chunksize=1)]")
    assert set(got) <= set(serial)
    err = capsys.readouterr().err
    assert "mpmagic: rng.random draws from the notebook's numpy Generator `rng`: each worker draws from its own" in err
    run(ip, "_ = mpmagic.pmap(rng.random, [1] * 2)")
    assert "mpmagic:" not in capsys.readouterr().err  # (once)


def test_an_odd_global_neither_hides_nor_fakes_a_generators_draws():
    """The draws line reads the values of the names a function reads. An object whose
    ``__class__`` raises (a lazy proxy) made the whole reading give up, so the function's
    real draws from ``rng`` went unsaid; one whose ``__class__`` says numpy Generator (a
    ``Mock(spec=Generator)``) was said as a generator the function draws from. The
    value's own type decides, and no code of the value runs."""
    from unittest import mock

    import numpy as np

    from mpmagic import draws

    class Lazy:
        @property
        def __class__(self):  # type: ignore[override]
            raise RuntimeError("not loaded")

        def __getattr__(self, name):
            raise RuntimeError("not loaded")

    ns = {"rng": np.random.default_rng(0), "lazy": Lazy(), "fake": mock.Mock(spec=np.random.Generator)}
    exec("def draws(x):\n    return (lazy, rng.random())\n"
         "def fakes(x):\n    return fake.random()\n", ns)
    assert [u.name for u in draws.random_uses(ns["draws"])] == ["rng"]
    assert draws.random_uses(ns["fakes"]) == []


def test_an_object_holding_a_generator_says_workers_draw_from_copies(ip, local_pool, capsys):
    """A notebook object holding a generator (``sim = Sim(np.random.default_rng(0))``,
    ``sim.step()`` drawing from ``self.rng``) goes to each worker as a copy too: two
    workers drew the same numbers where serial map() draws one stream on, and nothing
    was said (only the function's own names were looked at). One level into an
    instance of a notebook class is read: its ``__dict__`` and ``__slots__``."""
    import numpy as np

    mpmagic.draws._said_draws.clear()
    run(ip, "import numpy as np\nclass _Sim:\n    def __init__(self, rng):\n        self.rng = rng\n"
            "    def step(self):\n        return float(self.rng.random())\n"
            "sim = _Sim(np.random.default_rng(0))\n")
    serial = [float(v) for v in np.random.default_rng(0).random(6)]
    got = run(ip, "%pmap -q --chunksize 1 lambda i: sim.step(), range(6)")
    assert len(set(serial)) == 6 and set(got) <= set(serial)  # (each a draw of a copy of the stream)
    err = capsys.readouterr().err
    assert ("mpmagic: the lambda draws from the notebook's numpy Generator `sim.rng`: each worker draws from its "
            "own copy of it as it was at the call, so workers draw the same numbers") in err, err
    run(ip, "def _direct(i):\n    return float(sim.rng.random())\n_ = %pmap -q _direct, range(2)")
    assert "mpmagic: _direct draws from the notebook's numpy Generator `sim.rng`" in capsys.readouterr().err


def test_an_object_holding_a_generator_it_does_not_draw_from_says_nothing():
    """The look into a notebook object is one level, only for what the function uses of it:
    a generator attribute the function neither reads nor a method it calls reads says
    nothing; an object that raises on every look never makes the reading raise."""
    from mpmagic import draws

    ns: dict = {"__name__": "__main__"}
    exec("class Holder:\n    def __init__(self, rng):\n        self.rng = rng\n        self.name = 'h'\n"
         "    def label(self):\n        return self.name\n    def draw(self):\n        return self.rng.random()\n"
         "class Slotted:\n    __slots__ = ('gen', 'unset')\n    def __init__(self, gen):\n        self.gen = gen\n"
         "    def draw(self):\n        return self.gen.random()\n"
         "class Odd:\n    def __getattribute__(self, name):\n        raise RuntimeError('no')\n"
         "h = Holder(__import__('numpy').random.default_rng(0))\ns = Slotted(__import__('random').Random(1))\n"
         "odd = Odd()\n"
         "def names(x):\n    return h.name, h.label()\n"
         "def draws(x):\n    return h.draw()\n"
         "def slots(x):\n    return s.draw()\n"
         "def odd_one(x):\n    return odd.draw()\n", ns)
    assert draws.random_uses(ns["names"]) == []
    assert [(u.name, u.kind) for u in draws.random_uses(ns["draws"])] == [("h.rng", "numpy Generator")]
    assert [(u.name, u.kind) for u in draws.random_uses(ns["slots"])] == [("s.gen", "random.Random")]
    assert draws.random_uses(ns["odd_one"]) == []


def test_a_parallel_cell_drawing_from_a_notebook_generator_says_ranks_draw_from_copies(ip, local_pool, capsys):
    """``rng = np.random.default_rng(0)`` in the notebook, then ``%%parallel -n 2`` drawing
    ``rng.random()``: the cell run once per rank here draws two successive numbers; each
    rank drew from its own copy of ``rng`` as it was at the run, so both ranks got the same
    number, silently (the line was %pmap's only). Also through a notebook function the
    cell calls, and through a function imported from a global state (a copy of that
    state's object). Nothing for a cell that makes its own generator or only tests it."""
    mpmagic.draws._said_cells.clear()
    mpmagic.draws._seed_scan[:] = [ip, len(ip.history_manager.input_hist_raw), set()]  # (nothing seeded)
    run(ip, "import numpy as np\n_cell_rng = np.random.default_rng(0)\nfrom numpy.random import rand as _cell_rand\n"
            "def _cell_draw():\n    return float(_cell_rng.random())\n")
    got = run(ip, "%%parallel -n 2 -q\nfloat(_cell_rng.random())")
    assert got[0] == got[1]
    assert ("mpmagic: the cell draws from the notebook's numpy Generator `_cell_rng`: each rank draws from its own "
            "copy of it as it was at the run, so ranks draw the same numbers, and the notebook's does not move on "
            "(a next run draws the same numbers again); for draws that differ per rank and repeat use --seed S and "
            "mpmagic.rng() for a Generator (each rank its own stream from S and its rank)\n") in capsys.readouterr().err
    run(ip, "%%parallel -n 2 -q\n_cell_draw()")
    assert "mpmagic: the cell draws from the notebook's numpy Generator `_cell_rng`: each rank draws from its own " \
        "copy" in capsys.readouterr().err
    run(ip, "%%parallel -n 2 -q\nfloat(_cell_rand())")
    assert ("mpmagic: the cell draws from numpy.random's global state, through `_cell_rand` imported from it: each "
            "rank draws from its own copy") in capsys.readouterr().err
    run(ip, "%%parallel -n 2 -q\n_cell_rng = np.random.default_rng(rank)\nfloat(_cell_rng.random())")
    run(ip, "%%parallel -n 2 -q\n_cell_rng is None")
    run(ip, "%%parallel -n 2 -q --seed 1\nfloat(_cell_rng.random()) + 1")
    assert "mpmagic:" not in capsys.readouterr().err


def test_a_parallel_cell_drawing_from_a_global_state_the_notebook_seeded_says_so(ip, local_pool, capsys):
    """``random.seed(0)`` in the notebook, then ``%%parallel -n 2`` drawing ``random.random()``:
    the cell run once per rank here draws successive numbers of the seeded stream; each
    worker drew from its own state instead, and nothing was said (the line was %pmap's
    only). One line says so, once per cell text; not with --seed, not for a cell that
    draws nothing or seeds the state itself."""
    import random

    mpmagic.draws._seed_scan[:] = [ip, len(ip.history_manager.input_hist_raw), set()]
    mpmagic.draws._said_cells.clear()
    run(ip, "import random, numpy as np")
    cell = "%%parallel -n 2 -q\nrandom.random()"
    run(ip, cell)
    assert "mpmagic:" not in capsys.readouterr().err  # (not seeded: the cell run here does not repeat either)
    ip.run_cell("random.seed(0)", store_history=True)
    serial = [random.random() for _rank in range(2)]  # (the cell run once per rank here, after the seed)
    random.seed(0)
    got = run(ip, cell)
    assert list(got) != serial
    err = capsys.readouterr().err
    assert ("mpmagic: the cell draws from random's global state, which the notebook seeded: each rank draws from "
            "its worker's own state, not the notebook's, so the numbers differ from the cell run once per rank "
            "here and from one run to the next; for draws that differ per rank and repeat use --seed S (each rank "
            "its own stream from S and its rank)\n") in err, err
    run(ip, cell)  # (once per cell text)
    run(ip, "%%parallel -n 2 -q --seed 1\nrandom.random() + 1")
    run(ip, "%%parallel -n 2 -q\nrank + 1")
    run(ip, "%%parallel -n 2 -q\nrandom.seed(rank)\nrandom.random()")
    run(ip, "%%parallel -n 2 -q\nnp.random.rand()")  # (numpy's state: not seeded)
    assert "mpmagic:" not in capsys.readouterr().err
    ip.run_cell("np.random.seed(0)", store_history=True)
    run(ip, "%%parallel -n 2 -q\nnp.random.rand()")
    assert "mpmagic: the cell draws from numpy.random's global state, which the notebook seeded" in \
        capsys.readouterr().err
