"""The fast paths of issue 6 give the same answers as the slow ones.

* large numpy arrays as items, results and captured globals travel through
  shared memory (read-only in workers unless asked), and no segment is left
  in /dev/shm;
* a function's payload is reused while nothing it captures changed, and a
  changed global (rebound, or changed in place) is seen by the next call;
* input is consumed lazily, and a generator that raises midway raises in the
  notebook and leaves the pool usable.

No timing here: speed is measured in benchmarks/bench_core.py.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from conftest import ensure_pool, run

import mpmagic
from mpmagic import payload_cache, posixshm, shm
from mpmagic import pool as pool_module

pytestmark = pytest.mark.skipif(not shm.ENABLED, reason="POSIX shared memory only")


@pytest.fixture(scope="module", params=["forkserver", "spawn"])
def local_pool(request):
    """A 2-worker local pool per start method, scoped to this module.

    (Not conftest's session-scoped ``method``: its parameters make pytest
    regroup tests of other modules around ours.)
    """
    return ensure_pool(request.param)


@pytest.fixture(autouse=True, scope="module")
def _forget_the_pool_afterwards():
    """Leave no pool behind for later modules (worker numbering starts again at 0)."""
    yield
    pool_module.shutdown()

BIG = (2 << 20) // 8  # float64 elements in a 2 MB array: over the 1 MB threshold


def our_segments(kind: str = "") -> list[str]:
    """Names in /dev/shm that this notebook (or its workers) made."""
    if not os.path.isdir("/dev/shm"):
        return []
    prefix = f"mpm_{posixshm.owned_by(os.getpid())}{kind}"
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def test_array_items_arrive_read_only_and_correct(ip, local_pool):
    run(ip, f"import numpy as np\nparts = [np.arange({BIG}, dtype=np.float64) + k for k in range(6)]")
    run(ip, "def total(a):\n    return float(a.sum())")
    assert run(ip, "%pmap -q total, parts") == [float((np.arange(BIG) + k).sum()) for k in range(6)]
    # Workers map the notebook's copy: read-only, so an in-place write is an error.
    run(ip, "def writable(a):\n    return a.flags.writeable")
    assert run(ip, "%pmap -q writable, parts[:2]") == [False, False]
    run(ip, "def scale(a):\n    a *= 2\n    return a")
    with pytest.raises(ValueError, match="read-only") as info:
        run(ip, "%pmap -q scale, parts[:1]")
    assert any("shm.configure(writable=True)" in n for n in getattr(info.value, "__notes__", []))
    # ...unless asked for: then writes stay in the worker's copy.
    shm.configure(writable=True)
    try:
        out = run(ip, "%pmap -q scale, parts[:2]")
    finally:
        shm.configure(writable=False)
    assert np.array_equal(out[1], (np.arange(BIG) + 1) * 2)
    assert np.array_equal(ip.user_ns["parts"][1], np.arange(BIG) + 1)  # the notebook's array is untouched
    # Pooled segments are reused, not piled up: at most a few per worker.
    assert len(our_segments("p")) <= 8


def test_array_results_come_back_whole_and_writable(ip, local_pool):
    run(ip, f"def make(k):\n    return np.full({BIG}, k, dtype=np.float64)")
    run(ip, "import numpy as np")
    out = run(ip, "%pmap -q make, range(5)")
    assert [float(a[0]) for a in out] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(a.shape == (BIG,) and a.flags.writeable for a in out)
    out[0][:] = 7  # the notebook owns the memory
    assert float(out[0].sum()) == 7.0 * BIG
    assert our_segments("g") == []  # result segments are unlinked as soon as they arrive


def test_small_arrays_and_mixed_results_still_use_the_pipe(ip, local_pool):
    run(ip, "def halves(n):\n    return (n, np.ones(n) / 2)")
    out = run(ip, f"%pmap -q halves, [3, {BIG}, 5]")
    assert [n for n, _ in out] == [3, BIG, 5]
    assert [float(a.sum()) for _, a in out] == [1.5, BIG / 2, 2.5]


def test_captured_global_array_is_sent_once_and_changes_are_seen(ip, local_pool):
    run(ip, f"table = np.arange({BIG}, dtype=np.float64)\ndef look(i):\n    return float(table[i])")
    before = dict(payload_cache.stats)
    assert run(ip, "%pmap -q look, [0, 5, 9]") == [0.0, 5.0, 9.0]
    assert run(ip, "%pmap -q look, [1, 2]") == [1.0, 2.0]
    # The second call found the same bytes: no new payload, no new segment.
    assert payload_cache.stats["built"] - before["built"] <= 1
    assert payload_cache.stats["same"] - before["same"] >= 1
    run(ip, "table[5] = -1.0")  # changed in place
    assert run(ip, "%pmap -q look, [5]") == [-1.0]
    run(ip, f"table = np.zeros({BIG})")  # rebound
    assert run(ip, "%pmap -q look, [5, 6]") == [0.0, 0.0]
    # A worker sees the captured array read-only too.
    run(ip, "def poke(i):\n    table[i] = 1.0")
    with pytest.raises(ValueError, match="read-only"):
        run(ip, "%pmap -q poke, [0]")


def test_a_warm_call_reports_checking_its_captured_global_and_names_it(ip, pool2):
    """Each warm call compares a captured array with the workers' copy (a tester's 500 MB
    global cost 0.2-0.7 s per call, and the advice blamed sending chunks): the report
    times it, says how it was served and names the global; share() arrays count nothing."""
    run(ip, f"checked = np.arange({4 * BIG}, dtype=np.float64)\nbook = {{'a': checked[:{BIG}].copy(), 'n': 1}}\n"
            "def peek(i):\n    return float(checked[i]) + len(book)")
    assert run(ip, "%pmap -q peek, [1, 2]") == [3.0, 4.0]
    assert run(ip, "%pmap -q peek, [3]") == [5.0]
    report = mpmagic.last_report()
    assert report.payload_served == "same" and report.payload_bytes == (4 * BIG + BIG) * 8
    assert 0 < report.payload_seconds < report.wall
    sizes = payload_cache.large_captures(ip.user_ns["peek"])
    assert sizes == [("checked", 4 * BIG * 8, "array"), ("book", BIG * 8, "dict")]
    run(ip, "checked = mpmagic.share(checked)")  # shared by reference: nothing to compare
    try:
        assert payload_cache.large_captures(ip.user_ns["peek"]) == [("book", BIG * 8, "dict")]
    finally:
        run(ip, "del checked, book, peek")  # (frees the share() segment)


def test_freeing_a_dropped_globals_copy_is_not_blamed_on_the_next_functions_captures(ip, pool2, monkeypatch):
    """After ``del G`` of a captured 300 MB global, the next %pmap of a function that
    captures nothing frees G's shared-memory copy first (payload_cache drops the dead
    entry): 12 ms of a 14 ms call, reported as preparing the function, and the advice
    said it "captures large objects" and sent the user to mpmagic.share(). The freeing
    is timed apart (Report.payload_freed_seconds) and the advice on preparing leaves it
    out. Here freeing is made slow (0.2 s a segment), whether the function's payload
    was reused ("fast") or built by this call."""
    run(ip, f"import numpy as np\ndropped1 = np.arange({BIG}, dtype=np.float64)\ndropped2 = dropped1 + 1\n"
            "def use1(i):\n    return float(dropped1[i])\ndef use2(i):\n    return float(dropped2[i])\n"
            "def tiny(a):\n    return float(a.sum())\ndef tiny2(a):\n    return float(a.sum()) + 1")
    assert run(ip, "%pmap -q use1, [1]") == [1.0] and run(ip, "%pmap -q use2, [1]") == [2.0]
    assert run(ip, "%pmap -q tiny, [np.ones(3)]") == [3.0]  # (its payload is cached: the next call is "fast")
    let_go = shm.let_go

    def slow_let_go(name: str) -> None:
        import time

        time.sleep(0.2)
        let_go(name)

    monkeypatch.setattr(shm, "let_go", slow_let_go)
    for dropped, func, served in (("dropped1", "tiny", "fast"), ("dropped2", "tiny2", "built")):
        run(ip, f"del {dropped}\nimport gc\ngc.collect()")
        serial = ip.user_ns[func](np.ones(3))
        assert run(ip, f"%pmap -q {func}, [np.ones(3)]") == [serial]
        report = mpmagic.last_report()
        assert report.payload_served == served and report.payload_bytes == 0, func
        assert "preparing the function" not in (report.advice or "") and "share(" not in (report.advice or ""), (
            report.advice)
        assert report.payload_freed_seconds >= 0.2 and report.payload_seconds >= report.payload_freed_seconds
        assert report.payload_captures == ()


def test_equal_bytes_finds_a_difference_anywhere_in_a_large_buffer():
    """The check of a captured array against its shared-memory copy (memcmp in steps of
    64 MB): a change in the first or last byte of any step is seen, read-only buffers too."""
    a = np.zeros((64 << 20) + 4096, dtype=np.uint8)
    b = a.copy()
    b.flags.writeable = False  # (a read-only array's buffer)
    view = memoryview(a).cast("B")
    assert shm._equal_bytes(view, memoryview(b).cast("B"))
    for at in (0, (64 << 20) - 1, 64 << 20, a.nbytes - 1):
        a[at] = 1
        assert not shm._equal_bytes(view, memoryview(b).cast("B")), at
        a[at] = 0
    assert shm._equal_bytes(view, memoryview(b).cast("B"))


def test_writable_captured_array_is_each_workers_own_copy(ip, local_pool):
    """With writable=True a captured array of 1 MB or more is mapped copy-on-write:
    a task sees its own worker's earlier writes (as with a small captured array),
    never another worker's, and the notebook's array never changes."""
    shm.configure(writable=True)
    try:
        run(ip, f"import os, time\nimport numpy as np\nmarks = np.zeros({BIG})\n"
                "def mark(i):\n    before = float(marks.sum())\n    marks[i] = 1\n    time.sleep(0.02)\n"
                "    return os.getpid(), before")
        out = run(ip, "%pmap -q -n 2 --chunksize 1 mark, range(6)")
    finally:
        shm.configure(writable=False)
    for pid in {p for p, _ in out}:  # each worker's tasks, in order: 0, 1, 2... of its own writes
        seen = [before for p, before in out if p == pid]
        assert seen == [float(k) for k in range(len(seen))], out
    assert float(ip.user_ns["marks"].sum()) == 0.0


def test_captured_array_copy_is_freed_with_the_array(ip, local_pool):
    """The shared-memory copy of a captured array goes when the notebook drops the
    array (the function lives on), by the next run; %pool shows it meanwhile."""
    run(ip, f"import numpy as np\ngone = np.ones({BIG})\ndef read(i):\n    return float(gone[i])")
    before = set(our_segments("l"))
    assert run(ip, "%pmap -q read, [0]") == [1.0]
    copy = set(our_segments("l")) - before
    assert len(copy) == 1
    assert "copies of captured arrays" in str(mpmagic.pool_status())
    run(ip, f"gone = np.ones({BIG})")  # an equal new array: its copy is kept, and watched
    assert run(ip, "%pmap -q read, [1]") == [1.0]
    assert copy <= set(our_segments("l"))
    run(ip, "del gone\nimport gc\ngc.collect()")
    run(ip, "%pmap -q abs, [-1]")
    assert not copy & set(our_segments("l"))


def test_a_captured_array_resizes_after_a_map_as_serially_and_its_copy_still_goes_with_it(ip, pool2):
    """numpy refuses to resize an array a weak reference points to ("cannot resize an array
    that references or is referenced by another object", refcheck or not): the cache's
    ``weakref.finalize`` on each captured array (to free its copy with it) broke
    ``big.resize(n)`` after a map, for a global, a dict's item, an attribute, a closure's or a
    default's array alike. Now it finds each again where the function reaches it: resized,
    the next map sees the new size; dropped (``del``, rebound, popped), its copy goes."""
    run(ip, f"import numpy as np\nbig = np.zeros({BIG})\ntables = {{'t': np.ones({BIG})}}\n"
            f"class Box:\n    __slots__ = ('a', '__dict__')\nbox = Box()\nbox.a = np.full({BIG}, 2.0)\n"
            f"def make(c):\n    def inner(i, d=np.full({BIG}, 4.0)):\n"
            "        return [a.shape[0] + float(a.sum()) + i for a in (big, tables['t'], box.a, c, d)]\n"
            f"    return inner\nsizes = make(np.full({BIG}, 3.0))")
    before = set(our_segments("l"))
    serial = run(ip, "list(map(sizes, [1]))")
    assert run(ip, "%pmap -q sizes, [1]") == serial
    copy = set(our_segments("l")) - before
    assert len(copy) == 1
    resize = (f"big.resize({2 * BIG})\ntables['t'].resize({3 * BIG})\nbox.a.resize({BIG // 2}, refcheck=False)\n"
              f"sizes.__closure__[0].cell_contents.resize({BIG + 7})\nsizes.__defaults__[0].resize({BIG - 7})")
    run(ip, resize)  # (refcheck=True: nothing else refers to them, serially or after a map)
    serial = run(ip, "list(map(sizes, [1]))")
    assert run(ip, "%pmap -q sizes, [1]") == serial
    assert not copy & set(our_segments("l"))  # (changed: built again)
    copy = set(our_segments("l")) - before
    run(ip, "tables.pop('t')\nimport gc\ngc.collect()")  # (the function lives on, its array is gone)
    run(ip, "%pmap -q abs, [-1]")
    assert not copy & set(our_segments("l"))
    run(ip, "del big, tables, box, sizes, make")


def test_a_captured_array_found_nowhere_by_place_is_still_freed_with_it(ip, pool2):
    """An array the cache cannot find again where the function reaches it (here a dict's
    item under a frozenset key; a DataFrame's blocks alike) is watched by a weak
    reference, as all were: its copy still goes with it."""
    run(ip, f"import numpy as np\nodd = {{frozenset({{1}}): np.ones({BIG})}}\n"
            "def odd_sum(i):\n    return float(odd[frozenset({1})].sum()) + i")
    before = set(our_segments("l"))
    assert run(ip, "%pmap -q odd_sum, [1]") == [BIG + 1.0]
    copy = set(our_segments("l")) - before
    assert len(copy) == 1
    run(ip, "odd.clear()\nimport gc\ngc.collect()")
    run(ip, "%pmap -q abs, [-1]")
    assert not copy & set(our_segments("l"))
    run(ip, "del odd, odd_sum")


def test_strided_views_of_a_shared_array_travel_without_copies(ip, local_pool):
    """Column blocks and reversed views of a share() array reach the workers as the
    same memory with the same strides: read-only, no copy, sums equal to serial."""
    run(ip, "import mpmagic\nimport numpy as np\nSV = mpmagic.share(np.random.default_rng(0).random((1000, 600)))\n"
            "views = [SV[:, :200], SV[:, 200:400], SV[::-1], SV.T[::2]]\n"
            "def info(b):\n    return b.strides, b.flags.writeable, float(b.sum())")
    pooled = set(our_segments("p"))
    got = run(ip, "%pmap -q info, views")
    want = run(ip, "list(map(info, views))")
    assert [(s, t) for s, _, t in got] == [(s, t) for s, _, t in want]
    assert not any(w for _, w, _ in got)
    assert set(our_segments("p")) <= pooled
    run(ip, "del SV, views")


def test_cached_payload_sees_every_kind_of_change(ip, local_pool):
    run(ip, "FACTOR = 2\ndef helper(x):\n    return x * FACTOR\ndef f(x):\n    return helper(x) + 1")
    assert run(ip, "%pmap -q f, range(3)") == [1, 3, 5]
    fast = payload_cache.stats["fast"]
    assert run(ip, "%pmap -q f, range(3)") == [1, 3, 5]
    assert payload_cache.stats["fast"] == fast + 1  # nothing changed: not even re-pickled
    run(ip, "FACTOR = 10")  # a global of a function it calls
    assert run(ip, "%pmap -q f, range(3)") == [1, 11, 21]
    run(ip, "def helper(x):\n    return -x")  # the called function redefined
    assert run(ip, "%pmap -q f, range(3)") == [1, 0, -1]
    # A mutable global changed in place (identity unchanged) is seen too.
    run(ip, "WEIGHTS = [1, 2]\ndef g(x):\n    return x * sum(WEIGHTS)")
    assert run(ip, "%pmap -q g, [1]") == [3]
    run(ip, "WEIGHTS.append(10)")
    assert run(ip, "%pmap -q g, [1]") == [13]
    # Closures and defaults.
    run(ip, "def make(k):\n    def h(x, d=(1,)):\n        return x + k + d[0]\n    return h\nh = make(5)")
    assert run(ip, "%pmap -q h, [0]") == [6]
    run(ip, "h = make(7)")
    assert run(ip, "%pmap -q h, [0]") == [8]
    # A slice is immutable, but what it holds may not be (it was taken as unchangeable: the stale [1]).
    run(ip, "SL = slice(0, [1])\ndef stop(x):\n    return SL.stop[0]")
    assert run(ip, "%pmap -q stop, [0]") == [1]
    run(ip, "SL.stop[0] = 2")
    assert run(ip, "%pmap -q stop, [0]") == run(ip, "list(map(stop, [0]))") == [2]


def test_a_warm_payload_takes_the_cache_lock_once_and_becomes_the_most_recent(monkeypatch):
    """A warm call's payload (nothing it captures changed) is served under one trip
    to the cache's lock, and its entry is the most recently used after it."""
    def first(x):
        return x + 1

    def second(x):
        return x + 2

    key, data = payload_cache.function_payload(first)
    payload_cache.function_payload(second)
    trips = []
    real = payload_cache._lock

    class Counting:
        def __enter__(self):
            trips.append(1)
            return real.__enter__()

        def __exit__(self, *exc):
            return real.__exit__(*exc)

    monkeypatch.setattr(payload_cache, "_lock", Counting())
    frames = []
    sys.setprofile(lambda frame, event, arg: event == "call" and frames.append(frame.f_code.co_name))
    try:
        assert payload_cache.function_payload(first) == (key, data)
    finally:
        sys.setprofile(None)
    assert payload_cache.last_served() == ("fast", 0)
    assert len(trips) == 1
    assert "<genexpr>" not in frames  # (the captured objects are compared in C, not a frame each)
    assert next(reversed(payload_cache._entries)) == (id(first), False)

def test_lazy_input_is_consumed_while_results_come_back(ip, local_pool):
    # Each item records when the notebook pulled it; each result when a worker ran it.
    run(
        ip,
        "import time\n"
        "pulled = []\n"
        "def items(n):\n    for i in range(n):\n        pulled.append(time.monotonic())\n        yield i\n"
        "def stamp(i):\n    time.sleep(0.001)\n    return time.monotonic()",
    )
    ran = run(ip, "%pmap -q stamp, items(400)")
    pulled = ip.user_ns["pulled"]
    assert len(ran) == len(pulled) == 400
    # Not materialised up front: when the first item had run, most were not pulled yet
    # (chunks of ~50 items of 1 ms, a few chunks in flight per worker).
    assert sum(p < ran[0] for p in pulled) < 300
    assert pulled[-1] > ran[0]


def test_large_generator_gives_all_results_in_order(ip, local_pool):
    out = run(ip, "%pmap -q lambda x: x % 7, (i for i in range(300_000))")
    assert len(out) == 300_000 and out[:8] == [0, 1, 2, 3, 4, 5, 6, 0] and out[-1] == 299_999 % 7


def test_generator_that_raises_midway(ip, local_pool):
    run(
        ip,
        "def bad_items():\n    for i in range(1000):\n        if i == 600:\n"
        "            raise KeyError('item source broke at 600')\n        yield np.ones(1000) * i\n",
    )
    with pytest.raises(KeyError, match="broke at 600"):
        run(ip, "%pmap -q lambda a: float(a[0]), bad_items()")
    assert run(ip, "%pmap -q abs, [-1, -2]") == [1, 2]  # the pool is still usable


def test_no_segment_is_left_after_the_pool_stops(ip):
    run(ip, f"arrs = [np.ones({BIG}) * k for k in range(4)]\ndef ident(a):\n    return a")
    out = run(ip, "%pmap -q ident, arrs")
    assert [float(a[0]) for a in out] == [0.0, 1.0, 2.0, 3.0]
    run(ip, "def cap(i):\n    return float(arrs[i][0])")
    assert run(ip, "%pmap -q cap, [3]") == [3.0]
    assert our_segments()  # pooled item segments and the captured copy are kept for reuse
    mpmagic.stop_pool()
    assert our_segments() == []
    assert run(ip, "%pmap -q cap, [2]") == [2.0]  # a new pool builds what it needs again
    mpmagic.stop_pool()
    assert our_segments() == []


def test_shared_array_travels_without_copies(ip, local_pool):
    run(ip, f"import numpy as np\nimport mpmagic\nS = mpmagic.share(np.arange({4 * BIG}, dtype=np.float64))")
    run(ip, "def total(a):\n    return float(a.sum())\ndef at(i):\n    return float(S[i])")
    pooled, copies = set(our_segments("p")), set(our_segments("l"))
    expected = [float(p.sum()) for p in np.array_split(np.arange(4 * BIG, dtype=np.float64), 4)]
    assert run(ip, "%pmap -q total, np.array_split(S, 4)") == expected
    assert run(ip, "%pmap -q at, [0, 7]") == [0.0, 7.0]
    # Neither the slices nor the captured array were copied into a segment of ours.
    assert set(our_segments("p")) <= pooled and set(our_segments("l")) <= copies
    run(ip, "S[7] = -1.0")  # workers map the very memory the notebook writes
    assert run(ip, "%pmap -q at, [7]") == [-1.0]
    run(ip, "def poke(i):\n    S[i] = 0.0")
    with pytest.raises(ValueError, match="read-only"):
        run(ip, "%pmap -q poke, [1]")
    assert len(our_segments("s")) == 1
    run(ip, "del S, at, poke\nimport gc\ngc.collect()")
    assert our_segments("s") == []  # freed with the last view of the array


@pytest.mark.parametrize("block", [1, 3, 32])
@pytest.mark.parametrize("star", [False, True])
def test_worker_chunk_loop_keeps_order_and_the_failing_index(block, star):
    """The worker's C-level loop (list.extend over map, in blocks between
    crash-position marks) gives the same results and failing index as a
    plain loop, with and without --errors collect."""
    from multiprocessing.sharedctypes import RawValue

    from mpmagic.worker import ErrorInfo, run_items

    def f(x, y=0):
        if x in (45, 70):
            raise ValueError(f"bad {x}")
        return x * 2 + y

    items = [(x, 1) for x in range(100)] if star else list(range(100))
    expected = [x * 2 + (1 if star else 0) for x in range(100)]
    for position in (None, RawValue("q", -1)):
        results, _, error = run_items(f, items, star, False, position, block)
        assert results == expected[:45]
        assert error is not None and error[0] == 45 and "bad 45" in error[1].exc_text
        if position is not None:
            # The mark the notebook would read had this item killed the worker:
            # the first item of its block (the item itself with blocks of 1).
            assert position.value == (45 // block) * block
        results, _, error = run_items(f, items, star, True, position, block)
        assert error is None and len(results) == 100
        assert [i for i, r in enumerate(results) if isinstance(r, ErrorInfo)] == [45, 70]
        assert [r for r in results if not isinstance(r, ErrorInfo)] == [e for i, e in enumerate(expected) if i not in (45, 70)]


def test_worker_chunk_loop_views_a_workers_position_word_once():
    """The loop writes the running item's index through a view of the worker's
    shared position word: made once per word, not per chunk (the buffer export
    and two casts cost ~1 us of a tiny chunk's ~40), and a new word gets its own."""
    from multiprocessing.sharedctypes import RawValue

    from mpmagic import worker

    first, second = RawValue("q", -1), RawValue("q", -1)
    worker.run_items(abs, [1, -2, 3], False, False, first)
    view = worker._position_view
    worker.run_items(abs, [1, -2], False, False, first)
    assert worker._position_view is view and first.value == 1
    worker.run_items(abs, [1, -2, 3, 4], False, False, second)
    assert worker._position_view[0] is second and second.value == 3 and first.value == 1


def test_a_workers_plain_results_are_pickled_as_they_are(monkeypatch):
    """A chunk's results that are all plain values skip the shared-memory collector
    and the scan for notebook code (a tenth of a warm 1-item chunk in the worker);
    any other value still goes through them, and both load back the same."""
    import pickle
    from fractions import Fraction

    from mpmagic import shm, worker

    collected: list = []
    real = shm.dumps_result
    monkeypatch.setattr(shm, "dumps_result", lambda obj, dumps: collected.append(obj) or real(obj, dumps))
    plain = [1, 2.5, "__main__.f", b"x" * 100, None, True, bytearray(b"y"), (1, [2.0, {"k": None}])]
    assert pickle.loads(worker._dumps_result(plain)) == plain and collected == []
    mixed = [1, Fraction(1, 3)]
    assert pickle.loads(worker._dumps_result(mixed)) == mixed and collected == [mixed]
    inside = [(1, Fraction(1, 3))]
    assert pickle.loads(worker._dumps_result(inside)) == inside and collected == [mixed, inside]


def _plan(planner, per_item: float) -> list[int]:
    """Chunk sizes a planner hands out for its whole input, each chunk's time fed back."""
    sizes = []
    while planner.sent < planner.n_items:
        size = min(planner.next_size(), planner.n_items - planner.sent)
        planner.note_sent(size)
        planner.record(size, size * per_item)
        sizes.append(size)
    return sizes


@pytest.mark.parametrize("per_item", [5e-8, 1e-6, 1e-4])
def test_chunk_plan_ends_in_one_even_split_not_a_string_of_tiny_chunks(per_item):
    from mpmagic.chunking import ChunkPlanner

    sizes = _plan(ChunkPlanner(100_000, 2), per_item)
    assert sum(sizes) == 100_000
    floor = int(0.002 / per_item)  # a chunk's work should outweigh its message
    # Past the first probes, every chunk is worth ~1 ms or more, but for the
    # input's end split evenly once: never a tail of ..., 4, 2, 1 items.
    small = [s for s in sizes[2:] if s < floor // 2]
    assert len(small) <= 2, sizes
    assert sizes[-1] >= sizes[-2] - 1 >= 1, sizes  # the end splits evenly


def test_a_slow_first_probe_does_not_outweigh_the_big_chunks_after_it():
    """The per-item estimate weighs chunks by their items: two 16-item probes that
    paid a fresh worker's first-use costs, then two big chunks at the real speed."""
    from mpmagic.chunking import ChunkPlanner

    planner = ChunkPlanner(20_000, 2)
    for n, per_item in ((16, 50e-6), (16, 20e-6), (9_984, 0.15e-6), (9_984, 0.15e-6)):
        planner.record(n, n * per_item)
    assert planner.per_item is not None and planner.per_item < 0.2e-6  # tiny items: well under 2 us
    planner.record(100, 100 * 1e-3)  # and a change of speed shows at once
    assert planner.per_item > 1e-5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_resident_size_in_a_forked_child_is_the_childs_own():
    """``rss.resident_bytes`` keeps /proc/self/statm open; a forked child (a task
    may fork) must read its own, not the parent's file: 100 MB touched in the
    child show in what it reads."""
    from mpmagic.rss import resident_bytes

    before = resident_bytes()
    assert before is not None
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if it saw its own growth
        start = resident_bytes() or 0
        block = bytearray(100 << 20)
        block[::4096] = b"\1" * len(block[::4096])
        grown = (resident_bytes() or 0) - start
        os._exit(0 if grown >= 80 << 20 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_private_memory_leaves_out_shared_pages_it_only_maps():
    """``rss.private_bytes`` (what the pool's ``max_memory`` compares) counts
    this process's own pages: 64 MB of shared memory touched here grow the
    resident size, not the private one; 64 MB of its own grow both."""
    import mmap

    from mpmagic.rss import private_bytes, resident_bytes

    if private_bytes() is None:
        pytest.skip("no /proc/self/statm")
    shared = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_SHARED)
    try:
        p0, r0 = private_bytes() or 0, resident_bytes() or 0
        page = b"\1" * 4096
        for _ in range(16384):
            shared.write(page)
        p1, r1 = private_bytes() or 0, resident_bytes() or 0
        assert r1 - r0 >= 48 << 20 and p1 - p0 < 16 << 20, (p1 - p0, r1 - r0)
        own = bytearray(64 << 20)  # (zero-filled: every page touched)
        assert (private_bytes() or 0) - p1 >= 48 << 20
        del own
    finally:
        shared.close()


def test_a_range_goes_as_ranges_and_gives_serials_results(ip, local_pool):
    """Each chunk of a range input travels as a range (a few bytes), not as the
    list of its numbers; the workers iterate and index it alike: results,
    collected failures and a crash blamed on its item are serial map's."""
    items = range(-7, 200_000, 3)
    assert mpmagic.pmap(abs, items) == list(map(abs, items))
    report = mpmagic.last_report()
    assert report.chunks >= 2 and report.bytes_sent < 200 * report.chunks, report.bytes_sent  # a list: ~6 bytes per item
    run(ip, "import mpmagic\ndef fails(x):\n    if x % 1000 == 999:\n        raise ValueError(x)\n    return -x\n")
    got = run(ip, "mpmagic.pmap(fails, range(3000), errors='collect')")
    assert [(f.index, f.item) for f in got if isinstance(f, mpmagic.Failed)] == [(999, 999), (1999, 1999), (2999, 2999)]
    assert [r for r in got if not isinstance(r, mpmagic.Failed)] == [-x for x in range(3000) if x % 1000 != 999]
    assert mpmagic.pmap(divmod, range(10, 20), range(1, 11)) == list(map(divmod, range(10, 20), range(1, 11)))


def test_large_bytes_and_str_items_skip_the_notebook_code_scan(monkeypatch):
    """A chunk of plain bytes/str (and numbers) names no notebook code, so its
    pickle is not scanned for ``__main__`` (the scan cost 4x the pickling of
    100 kB bytes items): bytes that merely contain the marker still go by
    plain pickle. A notebook class among them, or a str subclass of one, is
    still found and goes by value."""
    from mpmagic import payload

    real = payload.cloudpickle_dumps
    by_value: list = []
    monkeypatch.setattr(payload, "cloudpickle_dumps", lambda obj, cb=None: by_value.append(obj) or real(obj, cb))
    items = [b"_main__" * 100, "__main__ " * 50, 3, None, 2.5, bytearray(b"__mp_main__" * 40)]
    assert payload.loads(payload.dumps_data(items)) == items and by_value == []
    assert payload.loads(payload.dumps_data(tuple(items))) == tuple(items) and by_value == []

    class Note(str):
        pass

    Note.__module__ = "__main__"  # as a notebook cell defines it
    for odd in (Note("n" * 400), Note):
        payload.dumps_data([*items, odd])
        assert by_value and by_value.pop()[-1] is odd
    assert payload.loads(payload.dumps_data([b"_main__"])) == [b"_main__"] and by_value  # small: scanned as before


def test_a_chunk_of_atoms_is_pickled_as_dumps_data_would_with_no_lease():
    """A chunk of numbers, strings, bytes (a list, tuple or range, and the builtin
    containers of them: starmap's tuples) is pickled as it is, the very bytes
    ``dumps_data`` makes, with no shared-memory lease and no helper kept (it can
    hold neither); anything else (a subclass, a class, any other object) goes
    the general way. A str that merely contains ``__main__`` is data."""
    import pickle
    from fractions import Fraction

    from mpmagic import jobs, payload

    class Int(int):
        pass

    nested = [(1, "a"), [2.5, None], {"k": (b"v",)}, {3}, frozenset({4})]
    # (short lists and tuples of atoms go by pickle.dumps, longer ones by the plain pickler: the same bytes)
    for items in ([1, 2.5, "x", b"y", None, True, bytearray(b"z")], (1, 2), range(3, 90, 4), [], nested,
                  ["s"] * payload._FEW_ATOMS, list(range(payload._FEW_ATOMS + 1)), tuple(range(40))):
        assert payload.dumps_atoms(items) == payload.dumps_data(items)
        assert pickle.loads(payload.dumps_atoms(items)) == items
    for items in ([1, Int(2)], [1, [Int(2)]], [Fraction(1, 3)], [int], [len], [(1, object())]):
        assert payload.dumps_atoms(items) is None, items
    assert pickle.loads(payload.dumps_atoms(["__main__", b"__main__.f"])) == ["__main__", b"__main__.f"]
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert payload.dumps_plain(deep) is None  # too deep for pickle: the general path says what
    assert payload.all_atoms([1, "x", None, bytearray()]) and payload.all_atoms(())
    assert not payload.all_atoms([1, [2]]) and not payload.all_atoms([Int(1)])

    for items, lent in (([-1, 2], False), ([[-1], (2, "x")], False), ([Fraction(-1), Fraction(2)], True)):
        job = jobs.MapJob(len, items, 2, False, 2, shared_memory=True)
        unit = job.next_unit()
        assert unit is not None and (unit.lease is not None) is lent
        assert payload.loads(unit.data) == items[: unit.count]
        job.release_shared()


def test_a_read_only_write_reworded_by_a_library_gets_the_note_and_the_item_one_line(ip, local_pool):
    """xarray re-raises numpy's read-only error as "Assignment destination is a
    view" (numpy's as the cause): no note said why; and the item's multi-line
    repr split the "raised by item" note over two lines."""
    run(ip, f"import numpy as np\nclass Box:\n    def __init__(self, a):\n        self.a = a\n"
            f"    def __repr__(self):\n        return '<Box>\\nvalues: ' + repr(self.a[:2])\n"
            f"boxes = [Box(np.arange({BIG}, dtype=np.float64))]\n"
            "def poke(b):\n    try:\n        b.a[0] = -1\n    except ValueError as e:\n"
            "        raise ValueError('Assignment destination is a view.') from e\n")
    with pytest.raises(ValueError, match="is a view") as info:
        run(ip, "%pmap -q poke, boxes")
    notes = getattr(info.value, "__notes__", [])
    assert any("read-only" in n and "shm.configure(writable=True)" in n for n in notes)
    assert any(n.startswith("mpmagic: raised by item 0 of the input: poke(<Box> values: array(") for n in notes)
    assert not any("\n" in n for n in notes)


class _Storage:
    def __init__(self, nbytes):
        self._nbytes = nbytes

    def nbytes(self):
        return self._nbytes


def test_items_that_are_views_of_a_big_torch_tensor_say_so_once(ip, monkeypatch, capsys):
    """torch pickles a view with its whole storage: 100 row views of a 4 MB
    tensor sent 400 MB, and nothing said why the run was slow."""
    import types

    torch = types.ModuleType("torch")  # a stand-in: CI has no torch

    class Tensor:
        def __init__(self, stored, data):
            self.stored, self.nbytes = stored, data

        def untyped_storage(self):
            return _Storage(self.stored)

    Tensor.__module__, torch.Tensor = "torch", Tensor
    monkeypatch.setitem(sys.modules, "torch", torch)
    pool_module.shutdown()
    mpmagic.use_local(2, "fork")
    try:
        ip.user_ns["_rows"] = [Tensor(4 << 20, 8 << 10) for _ in range(6)]
        ip.user_ns["_own"] = [Tensor(8 << 10, 8 << 10) for _ in range(6)]
        assert run(ip, "%pmap -q --chunksize 2 lambda t: t.nbytes, _own") == [8 << 10] * 6
        assert "view of a larger torch tensor" not in capsys.readouterr().err
        assert run(ip, "%pmap -q --chunksize 2 lambda t: t.nbytes, _rows") == [8 << 10] * 6
        err = capsys.readouterr().err
        assert err.count("mpmagic: item 0 is a view of a larger torch tensor") == 1 and "t.clone()" in err
    finally:
        pool_module.shutdown()
        for name in ("_rows", "_own"):
            ip.user_ns.pop(name, None)


def test_a_module_registered_while_another_run_is_packed_does_not_end_that_run(monkeypatch):
    """The manager thread packing a run iterated the modules sent by value while a
    caller's thread registered one more: "dictionary changed size during iteration"
    ended the run being packed, which had nothing to do with it."""
    import types

    import cloudpickle

    from mpmagic import compat, payload

    for name in ("_by_value_names", "_by_value_modules", "_by_value_marks"):
        monkeypatch.setattr(payload, name, getattr(payload, name))  # (restored after)
    modules = [types.ModuleType(f"mpm_running_{i}") for i in range(2)]
    register = compile("import mpmagic.payload as p\np.send_running_modules_by_value()", "<m>", "exec")
    real = compat.module_initializing

    def registering(module):  # (the other thread, between two steps of the iteration)
        if len(payload._by_value_marks) == 1:
            exec(register, modules[1].__dict__)
        return real(module)

    try:
        for module in modules:
            monkeypatch.setitem(sys.modules, module.__name__, module)
        exec(register, modules[0].__dict__)
        monkeypatch.setattr(compat, "module_initializing", registering)
        assert payload.loads(payload.dumps_data([1, "two"])) == [1, "two"]
        assert len(payload._by_value_marks) == 2
    finally:
        for module in modules:
            if module.__name__ in cloudpickle.list_registry_pickle_by_value():
                cloudpickle.unregister_pickle_by_value(module)
