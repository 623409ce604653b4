"""What ``--checkpoint`` costs, and how fast a resumed run is (issue 17).

One command, every figure a median over several repeats:

    .venv/bin/python benchmarks/bench_checkpoint.py            # about a minute
    .venv/bin/python benchmarks/bench_checkpoint.py --quick    # smoke run

* **overhead, 1 ms items**: ``pmap(f, 400 items of 1 ms)`` with and without
  ``checkpoint=True`` (the store emptied before each repeat, so every item
  is computed and stored; the store file itself exists, as it does after a
  notebook's first checkpointed run); target: at most 10 % slower.
* **100,000 tiny items stored**: the same map of ``x + 1`` with and without
  a checkpoint; the difference is what keying and storing cost; target
  under 0.3 s. Also the store alone (``Store.put`` in chunks of 5,000).
* **resumed 100,000 items**: the call again once every item is stored
  (no pool run at all); target under 0.5 s.
* **--bg**: the 1 ms map as a background run (``submit(...).result()``),
  with and without a checkpoint, and resumed with every item stored.
* **100 MB numpy result**: ``Store.put`` of one 100 MB array (one ``writev``
  of the array's memory into a temp file, fsync, rename) and reading it back.

Stores live in a temporary folder, removed at the end. The printed markdown
goes into docs/performance.md under "Checkpoints".
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mpmagic
from mpmagic import checkpoint
from mpmagic.checkpoint_keys import item_key
from mpmagic.checkpoint_store import Store


def busy(x):
    t = time.perf_counter() + 0.001
    while time.perf_counter() < t:
        pass
    return x


def tiny(x):
    return x + 1


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _fresh(root: Path, name: str) -> Path:
    """``root/name`` holding an empty store (made once: a notebook's store exists after its first run)."""
    folder = root / name
    checkpoint.clear(location=folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few repeats, smaller inputs (smoke run)")
    args = ap.parse_args()
    repeats = 1 if args.quick else 5
    n_busy = 100 if args.quick else 400
    n_tiny = 100_000
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    rows = []
    try:
        mpmagic.start_pool(2)
        mpmagic.pmap(tiny, range(1000))  # warm

        plain, ckpt = [], []
        for _ in range(repeats):
            plain.append(_timed(lambda: mpmagic.pmap(busy, range(n_busy))))
            folder = _fresh(root, "busy")
            ckpt.append(_timed(lambda folder=folder: mpmagic.pmap(busy, range(n_busy), checkpoint=folder)))
        p, c = statistics.median(plain), statistics.median(ckpt)
        rows.append((f"{n_busy} items of 1 ms, 2 workers", f"{p:.3f} s", f"{c:.3f} s", f"{(c / p - 1):+.1%}", "<= +10%"))

        # --bg: the same map submitted and waited on (the pump thread settles the
        # store before the handle says done, so result() includes the last commit).
        plain, ckpt, resumed = [], [], []
        for _ in range(repeats):
            plain.append(_timed(lambda: mpmagic.submit(busy, range(n_busy)).result()))
            folder = _fresh(root, "busy_bg")
            ckpt.append(_timed(lambda folder=folder: mpmagic.submit(busy, range(n_busy), checkpoint=folder).result()))
            resumed.append(_timed(lambda folder=folder: mpmagic.submit(busy, range(n_busy), checkpoint=folder).result()))
        p, c, r = (statistics.median(x) for x in (plain, ckpt, resumed))
        rows.append((f"--bg: {n_busy} items of 1 ms, 2 workers", f"{p:.3f} s", f"{c:.3f} s", f"{(c / p - 1):+.1%}",
                     "<= +10%"))
        rows.append((f"--bg: {n_busy} items resumed, all stored (handle done at once)", "-", f"{r:.4f} s", "-", "-"))

        plain, ckpt, resumed = [], [], []
        for _ in range(repeats):
            plain.append(_timed(lambda: mpmagic.pmap(tiny, range(n_tiny))))
            folder = _fresh(root, "tiny")
            ckpt.append(_timed(lambda folder=folder: mpmagic.pmap(tiny, range(n_tiny), checkpoint=folder)))
            resumed.append(_timed(lambda folder=folder: mpmagic.pmap(tiny, range(n_tiny), checkpoint=folder)))
        p, c, r = (statistics.median(x) for x in (plain, ckpt, resumed))
        rows.append((f"{n_tiny:,} tiny items: keyed and stored", f"{p:.3f} s", f"{c:.3f} s", f"+{c - p:.3f} s", "< 0.3 s"))
        rows.append((f"{n_tiny:,} tiny items: resumed, all stored", "-", f"{r:.3f} s", "-", "< 0.5 s"))

        puts = []
        keys = [item_key(i)[0] for i in range(n_tiny)]
        for _ in range(repeats):
            folder = _fresh(root, "put")
            checkpoint.close_stores()
            store = Store(folder)
            t0 = time.perf_counter()
            for s in range(0, n_tiny, 5000):
                store.put(b"r" * 16, "tiny", list(zip(keys[s : s + 5000], range(s + 1, s + 5001), strict=True)))
            puts.append(time.perf_counter() - t0)
            store.close()
        rows.append((f"Store.put of {n_tiny:,} ints (chunks of 5,000)", "-", f"{statistics.median(puts):.3f} s", "-", "-"))

        try:
            import numpy as np
        except ImportError:
            np = None
        if np is not None:
            big = np.random.default_rng(0).random(100 * 2**20 // 8)
            writes, reads = [], []
            for _ in range(max(1, repeats // 2)):
                folder = _fresh(root, "big")
                checkpoint.close_stores()
                store = Store(folder)
                writes.append(_timed(lambda store=store: store.put(b"b" * 16, "big", [(b"k" * 16, big)])))
                reads.append(_timed(lambda store=store: store.load(b"b" * 16, [b"k" * 16])))
                store.close()
            mb = big.nbytes / 2**20
            rows.append((f"{mb:.0f} MB numpy result: store (writev, fsync, rename)", "-",
                         f"{statistics.median(writes):.3f} s", f"{mb / statistics.median(writes):.0f} MB/s", "one write"))
            rows.append((f"{mb:.0f} MB numpy result: load and check", "-",
                         f"{statistics.median(reads):.3f} s", f"{mb / statistics.median(reads):.0f} MB/s", "-"))
    finally:
        checkpoint.close_stores()
        mpmagic.stop_pool()
        shutil.rmtree(root, ignore_errors=True)

    print(f"repeats: {repeats} (medians)\n")
    print("| case | without | with --checkpoint | cost | target |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
