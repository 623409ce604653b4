"""What a function's payload costs in memory once the notebook has moved on.

* Each worker kept its last 16 loaded payloads, whatever their size, and each
  holds its own copy of what the function captures by value (a dict, a list,
  ``bytes``). Re-running the cell that defines ``f`` over an unchanged 100 MB
  table, or a loop that loads each part into the same global, left one more
  full copy in every worker per pass (136 -> 554 MB per worker after five
  edits) where serial Python holds one. The notebook now tells the workers
  which payloads it replaced or dropped (``protocol.Forget``).
* A finished run's job stayed alive in a reference cycle (its ``OpenLines``
  closed over the job; a background handle's ``Forward`` and live area, and a
  Dask run's driver, held their run) with its pickled payload until a full
  collection: a loop over 50 MB parts grew the notebook by 50 MB a pass.
"""

from __future__ import annotations

import gc
import time

import psutil
import pytest
from conftest import ensure_pool, run

import mpmagic
from mpmagic.backends import dask_tasks

# The body of a %%parallel rank (one per worker): how many function payloads that
# worker holds whose function reads the global ``name``.
_COPIES = """
import gc as _gc
from mpmagic.worker import _Worker as _W
_w = next(o for o in _gc.get_objects() if type(o) is _W)
sum(1 for _l in _w.funcs.values() if {name!r} in getattr(_l.func, "__globals__", ()))
"""


def _copies_per_worker(name: str) -> list[int]:
    """Per worker of the 2-worker pool, the payloads it holds that read the global ``name``."""
    return list(mpmagic.parallel(_COPIES.format(name=name), workers=2))


def test_a_redefined_function_leaves_one_payload_per_worker(ip):
    """Re-running the cell that defines ``f`` (an edit) over an unchanged table it
    reads: every worker kept every version's payload, each with its own copy of
    the table (up to 16). The notebook dropped the old version's payload: so do
    the workers."""
    ensure_pool("forkserver")
    run(ip, "MEM_TABLE = list(range(2000))")  # a list: captured by value, a copy per payload
    for k in range(4):
        run(ip, f"def mem_edited(i):\n    return len(MEM_TABLE) + i * {k}")
        assert mpmagic.pmap(ip.user_ns["mem_edited"], range(4), chunksize=1) == [2000 + i * k for i in range(4)]
    copies = _copies_per_worker("MEM_TABLE")
    assert max(copies) == 1, copies  # (4 each before)
    # The latest version still runs where it was loaded, and the old ones are gone for good.
    assert mpmagic.pmap(ip.user_ns["mem_edited"], range(4), chunksize=1) == [2000 + i * 3 for i in range(4)]


def test_a_global_rebound_between_runs_leaves_one_payload_per_worker(ip):
    """A loop that loads each part into the same global and maps over it: the
    payload with the old part is replaced in the notebook, and in the workers."""
    ensure_pool("forkserver")
    run(ip, "def mem_part(i):\n    return len(MEM_PART) + i")
    for k in range(4):
        run(ip, f"MEM_PART = list(range({1000 + k}))")
        assert mpmagic.pmap(ip.user_ns["mem_part"], range(4), chunksize=1) == [1000 + k + i for i in range(4)]
    copies = _copies_per_worker("MEM_PART")
    assert max(copies) == 1, copies
    # A lambda per call: each dies after its run, and its payload goes with the next call.
    for k in range(4):
        f = eval(f"lambda i: len(MEM_PART) + i + {k}", ip.user_ns)
        assert mpmagic.pmap(f, range(2), chunksize=1) == [1003 + k, 1004 + k]
        del f
    copies = _copies_per_worker("MEM_PART")
    assert max(copies) == 1, copies  # mem_part's (still defined): each lambda's went once it died


def test_a_run_in_flight_whose_payload_was_dropped_still_finishes_right(ip):
    """A background run of ``f`` goes on while the global ``f`` reads is rebound and
    ``f`` is mapped again: the notebook replaces the payload and the workers drop
    the old one, and the background run's later chunks bring it again, so every
    result is still the old global's, as it was sent."""
    from mpmagic import payload_cache

    ensure_pool("forkserver")
    run(ip, "import time\nMEM_BG = list(range(100))\ndef mem_bg(i):\n    time.sleep(0.02)\n    return len(MEM_BG) + i")
    f = ip.user_ns["mem_bg"]
    handle = mpmagic.pmap(f, range(40), chunksize=1, block=False)
    seen = payload_cache.last_retired()
    run(ip, "MEM_BG = list(range(200))")
    assert mpmagic.pmap(f, range(4), chunksize=1) == [200, 201, 202, 203]
    assert payload_cache.last_retired() > seen  # (the first run's payload was dropped)
    assert handle.result() == [100 + i for i in range(40)]
    assert mpmagic.pmap(f, range(4), chunksize=1) == [200, 201, 202, 203]


def _private_mb(pid: int) -> float:
    return psutil.Process(pid).memory_full_info().uss / 2**20


def test_worker_memory_stays_flat_when_a_loop_rebinds_a_big_global(ip):
    """The tester's loop, measured: a 48 MB ``bytes`` global rebound for each of
    four runs grew each worker by ~48 MB a run (144 MB after the first), and
    ``del`` freed none of it. Now each worker holds the latest part only."""
    backend = ensure_pool("forkserver")
    run(ip, "import os\ndef mem_big(i):\n    return len(MEM_BIG) + i")
    for k in range(4):
        run(ip, "MEM_BIG = os.urandom(48 * 2**20)")
        assert mpmagic.pmap(ip.user_ns["mem_big"], range(2), chunksize=1) == [48 * 2**20, 48 * 2**20 + 1]
        if k == 0:
            pids = [s.pid for s in backend.slots]
            first = [_private_mb(p) for p in pids]
    sizes = [_private_mb(p) for p in pids]
    run(ip, "del MEM_BIG")
    grown = [after - before for before, after in zip(first, sizes, strict=True)]
    assert max(grown) < 40, (first, sizes)  # (about +144 MB each before)


def test_dask_workers_drop_the_payloads_the_notebook_replaced(ip, dask_cluster, request):
    """The same on Dask: each worker process kept every version's loaded copy (and the
    notebook the hold future of each, a copy of the bytes in every worker)."""
    backend = ensure_pool("dask", request)
    run(ip, "MEM_DTABLE = list(range(2000))")
    for k in range(3):
        run(ip, f"def mem_dedited(i):\n    return len(MEM_DTABLE) + i * {k}")
        assert mpmagic.pmap(ip.user_ns["mem_dedited"], range(8), chunksize=1) == [2000 + i * k for i in range(8)]
    assert mpmagic.pmap(abs, [-1]) == [1]  # (the next run tells the cluster what the last one dropped)
    held = "sum('MEM_DTABLE' in getattr(l.func, '__globals__', ()) for l in {}._funcs.values())".format(
        "__import__('mpmagic.backends.dask_tasks', fromlist=['_funcs'])")
    deadline = time.monotonic() + 30
    while max(copies := backend.client.run(eval, held).values()) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)  # (told in the background)
    assert max(copies) == 1, copies  # (3 each before)
    assert len(backend._payloads) <= 2  # the last version's, and abs's


def test_the_dask_backend_keeps_the_payloads_of_many_small_functions(dask_cluster, request, monkeypatch):
    """The Dask backend kept the hold tasks of its 8 most recent functions whatever their
    size: a notebook cycling through 12 tiny ones sent each payload to the cluster again at
    every call (a new hold task, replicated to every worker). It keeps small ones as the
    workers keep loaded functions (``payload_cache.excess``) and big ones as before."""
    from mpmagic import payload_cache

    backend = ensure_pool("dask", request)
    small, extra = _payloads(12), _payloads(13)[-1]
    try:
        first = [backend._payload_future(key, data) for key, data in small]
        backend.client.gather(first)  # (all computed: a pending one is reused only by a run free of restrictions)
        again = [backend._payload_future(key, data) for key, data in small]
        assert [f.key for f in again] == [f.key for f in first]  # (the first 4 were sent again)
        monkeypatch.setattr(payload_cache, "KEEP_BYTES", 0)  # (as if they were big)
        backend._payload_future(*extra)
        assert list(backend._payloads) == [key for key, _ in [*small[-7:], extra]]  # the 8 most recent, as before
    finally:
        for key, _ in [*small, extra]:
            backend._payloads.pop(key, None)


def test_dask_workers_forget_the_payloads_the_notebook_dropped():
    """A Dask worker process keeps loaded functions by key as a local worker does:
    the keys each task carries as retired are dropped there."""
    from mpmagic import payload
    from mpmagic.warmup import ImportLog

    datas = [payload.dumps_function(eval(f"lambda x: x + {k}"), "the function") for k in range(3)]
    keys = [payload.payload_key(d) for d in datas]
    dask_tasks._funcs.clear()
    for k, (key, data) in enumerate(zip(keys, datas, strict=True)):
        assert dask_tasks._function(key, data, ImportLog(), call=k)(1) == 1 + k
    assert all(key in dask_tasks._funcs for key in keys)
    dask_tasks.forget(keys[:2])
    assert list(dask_tasks._funcs) == keys[2:]
    dask_tasks._funcs.clear()


def _payloads(count: int, size: int = 0) -> list[tuple[bytes, bytes]]:
    """``(key, payload)`` of ``count`` distinct functions, each capturing ``size`` bytes by value."""
    from mpmagic import payload

    out = []
    for k in range(count):
        f = eval(f"lambda x: len(B) + x + {k}", {"B": bytes([k % 256]) * size, "__name__": "__main__"})
        out.append((f"f{k}-{size}".encode(), payload.dumps_function(f, "the function")))  # (any distinct key)
    return out


def test_workers_keep_many_small_functions_and_few_big_ones():
    """A notebook cycling through 17 tiny functions (a cell each, run again and again)
    had every worker load each one again at every call: it kept its 16 most recent
    whatever their size. Now a worker (local or Dask) keeps up to 64 and, past its
    16 most recent, only while their payloads come to 32 MB (the oldest go first):
    big captured globals cost what 16 of them did. The cache's rule, checked on the
    worker's own load path (no process)."""
    import types
    from collections import OrderedDict

    from mpmagic import payload_cache
    from mpmagic.warmup import ImportLog
    from mpmagic.worker import _Worker

    def worker() -> types.SimpleNamespace:
        return types.SimpleNamespace(funcs=OrderedDict(), func_segments={}, imports=ImportLog())

    small = _payloads(65)
    w = worker()
    for key, data in small[:64]:
        _Worker.load_function(w, key, data)
    assert list(w.funcs) == [key for key, _ in small[:64]]  # (the 16 most recent before)
    _Worker.load_function(w, *small[64])
    assert list(w.funcs) == [key for key, _ in small[1:]]  # the least recently used went
    dask_tasks._funcs.clear()
    for k, (key, data) in enumerate(small[:20]):
        assert dask_tasks._function(key, data, ImportLog(), call=0)(1) == 1 + k
    assert len(dask_tasks._funcs) == 20
    dask_tasks._funcs.clear()

    big = _payloads(20, 3 << 20)  # (3 MB each: 16 of them are past the budget)
    w = worker()
    for key, data in big:
        _Worker.load_function(w, key, data)
    assert list(w.funcs) == [key for key, _ in big[-16:]]  # the 16 most recent: as before, no more
    for key, data in small[:30]:
        _Worker.load_function(w, key, data)
    kept = [loaded.size for loaded in w.funcs.values()]
    assert len(kept) == 16 + 30 - 6 and sum(kept) <= payload_cache.KEEP_BYTES  # 10 big ones went for the small
    assert list(w.funcs)[-30:] == [key for key, _ in small[:30]]


def test_the_notebook_keeps_the_payloads_of_many_small_functions():
    """The notebook's payload cache kept 32 functions and told the workers to drop
    the ones it dropped: cycling through 40 built every payload again at each call
    (pickled, sent, loaded). It keeps 64 small ones now."""
    from mpmagic import payload_cache

    funcs = [eval(f"lambda x: x + {k}", {"__name__": "__main__"}) for k in range(40)]
    for f in funcs:
        payload_cache.function_payload(f)
    before = dict(payload_cache.stats)
    for f in funcs:
        payload_cache.function_payload(f)
    assert payload_cache.stats["fast"] - before["fast"] == 40, (before, payload_cache.stats)


@pytest.mark.parametrize("how", ["pmap", "parallel", "submit", "imap"])
def test_a_finished_run_leaves_no_cyclic_garbage(ip, backend, how):
    """A finished run's job (and its pickled payload) must go when the last
    reference to it does, not wait for a full collection: a cell looping over
    50 MB parts grew the notebook by 50 MB a pass (134 -> 334 MB) until one
    came (and a background run's handle, results included, once dropped). Checked
    with the collector off during the run: nothing of mpmagic's is left for it to find."""
    run(ip, "def mem_plain(i):\n    return i + 1")
    f = ip.user_ns["mem_plain"]
    mpmagic.pmap(f, range(2))  # (the pool is up and warm: its own objects made before)
    gc.collect()
    gc.disable()
    try:
        if how == "pmap":
            assert mpmagic.pmap(f, range(4), chunksize=1) == [1, 2, 3, 4]
        elif how == "parallel":
            values = mpmagic.parallel("rank + 1", workers=2)
            assert list(values) == [1, 2]
            del values
        elif how == "submit":
            handle = mpmagic.submit(f, [3])
            assert handle.result() == [4]
            del handle
        else:
            assert list(mpmagic.imap(f, range(4))) == [1, 2, 3, 4]
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
    finally:
        gc.set_debug(0)
        gc.enable()
    left = sorted({type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("mpmagic")})
    gc.garbage.clear()
    assert not left, left
