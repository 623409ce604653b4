"""How many items go in each chunk sent to a worker.

One message per item makes tiny tasks 100x slower than serial; one huge chunk
per worker leaves cores idle when items differ in cost. The planner starts
small, measures the time per item in the workers, and sizes later chunks to
take about ``target`` seconds, while keeping several chunks per worker for
the tail of the input so no worker finishes long before the others. Chunks
are also kept under ``max_bytes`` of packed items (measured as they are
packed), so large items never make a chunk that floods memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict

# Seconds and packed bytes per item measured for recent functions (by payload
# key), so a repeated call starts with well-sized chunks instead of small probes.
_remembered: OrderedDict[bytes, tuple[float, float | None]] = OrderedDict()
_REMEMBER = 64


class ChunkPlanner:
    """Adaptive chunk sizes from measured per-item times (or a fixed size)."""

    def __init__(
        self,
        n_items: int | None,
        workers: int,
        chunksize: int | None = None,
        target: float = 0.05,
        max_chunk: int = 100_000,
        max_bytes: int = 64 << 20,
        key: bytes | None = None,
        ramp: bool = False,
    ) -> None:
        self.n_items = n_items
        # Each chunk at most twice the largest sent so far (from 1): a stream over
        # a lazy input (streaming.StreamJob) then reads about as far ahead of the
        # results it gave as they were in number, not a whole 0.05 s chunk of
        # tiny items (100,000) after its first three results.
        self.ramp = ramp
        self._largest = 0
        self.workers = max(1, workers)
        self.fixed = chunksize
        self.target = target
        self.max_chunk = max_chunk
        self.max_bytes = max_bytes
        self.min_seconds = 0.002  # a chunk shorter than this costs more in messages than in work
        last = _remembered.get(key) if key is not None else None
        self.bytes_per_item: float | None = last[1] if last else None  # largest packed size per item seen
        self.key = key
        # smoothed seconds per item: what this function took last time, until measured
        self.per_item: float | None = last[0] if last else None
        self._weight = 0.0  # items behind per_item (older chunks count half at each new one)
        self.sent = 0
        # The sizes of the chunks sent (note_sent), not those planned: a chunk is cut
        # to what its worker has left of max_tasks_per_child, and a lazy input may
        # give fewer items (a 3-item iterator after a call that had measured tiny
        # items was reported as "100000 items per chunk").
        self.sizes_used: set[int] = set()
        self._lone_last: int | None = None  # the latest chunk's size when no other chunk had it
        self._tail: int | None = None  # chunk size once the input's end is near (see _adaptive)

    def next_size(self) -> int:
        """Size of the next chunk to cut (at least 1); the chunk really sent is counted by ``note_sent``."""
        return self.size_hint()

    def size_hint(self) -> int:
        """What ``next_size`` would say now, without counting it as used."""
        if self.fixed:
            return self.fixed
        size = self._adaptive()
        return min(size, max(1, 2 * self._largest)) if self.ramp else size

    def pair_size(self) -> int:
        """The next two chunks' sizes together, cut as one chunk (``jobs.MapJob.next_unit``'s
        ``pair``: the backend would queue both on the same worker, one behind the other).
        A fixed size, or a ramp, stays as it is: one chunk."""
        first = self.size_hint()
        if self.fixed or self.ramp:
            return first
        self.sent += first  # (the second as if the first were sent: the tail's split is the same)
        try:
            return first + self.size_hint()
        finally:
            self.sent -= first

    def _adaptive(self) -> int:
        remaining = None if self.n_items is None else max(1, self.n_items - self.sent)
        if self.per_item is None:
            # Before any measurement: a small first chunk per worker.
            if remaining is None:
                return 1
            size = min(remaining // (self.workers * 4), 16)
        else:
            size = int(self.target / max(self.per_item, 1e-9))
        if self.bytes_per_item:
            size = min(size, int(self.max_bytes / self.bytes_per_item))
        if self.per_item is None:
            return max(1, size)
        if remaining is not None:
            # Keep the tail balanced: at least ~2 chunks per worker remain...
            size = min(size, math.ceil(remaining / (self.workers * 2)))
            # ...but never chunks so short that the message costs more than the work
            # (tiny items would otherwise end in dozens of 1-item round trips).
            floor = int(self.min_seconds / max(self.per_item, 1e-9))
            if self.bytes_per_item:
                floor = min(floor, int(self.max_bytes / self.bytes_per_item))
            # ...and never fewer chunks than workers: a time remembered from an
            # earlier call may be wrong for these items, and items may wait on
            # one another (queues, events), so each worker gets a share. Once
            # what is left is too little to cut finer, it is split evenly once
            # (halving the rest at each step would end in a dozen round trips
            # of a few items each): into two chunks a worker while those take
            # at least half the floor, so that packing the next chunk overlaps
            # running one and the last round ends together. (Floor-sized chunks
            # first left an odd one out: 100,000 tiny items went as 35k + 32.5k
            # + 32.5k, the last running alone on one of 2 workers, 10.6 ms;
            # 4 x 25k: 9.8 ms.)
            # The split's last chunk takes the few items a division leaves over.
            if remaining <= 2 * floor * self.workers:
                if self._tail is None:
                    rounds = 2 if remaining >= floor * self.workers else 1
                    self._tail = max(1, remaining // (rounds * self.workers))
                size = remaining if remaining < 2 * self._tail else self._tail
                return max(1, min(size, self.max_chunk))
            size = max(size, floor)
        return max(1, min(size, self.max_chunk))

    def record(self, n_items: int, seconds: float) -> None:
        """Feed back the compute time a worker measured for a chunk."""
        if n_items <= 0:
            return
        if self.per_item is None or not self._weight:  # the first measurement of this call
            self.per_item, self._weight = seconds / n_items, float(n_items)
        else:
            # Each chunk weighs by its items, older ones half at each new chunk:
            # a 16-item probe that paid a fresh worker's first-use costs must not
            # count as much as the 10,000-item chunk after it. A plain 50/50
            # average kept 1/8 of such a probe: a 0.15 us/item function read as
            # over 2 us, so its crash-position blocks went (see jobs._block).
            kept = 0.5 * self._weight
            self.per_item = (self.per_item * kept + seconds) / (kept + n_items)
            self._weight = kept + n_items
        if self.key is not None:
            _remembered[self.key] = (self.per_item, self.bytes_per_item)
            _remembered.move_to_end(self.key)
            while len(_remembered) > _REMEMBER:
                _remembered.popitem(last=False)

    def note_bytes(self, n_items: int, nbytes: int) -> None:
        """Feed back how many bytes a chunk of ``n_items`` packed into."""
        if n_items > 0:
            b = nbytes / n_items
            self.bytes_per_item = max(b, self.bytes_per_item or 0.0)

    def note_sent(self, n: int) -> None:
        """A chunk of ``n`` items went out: what the report states as its size."""
        self.sent += n
        self._largest = max(self._largest, n)
        self._lone_last = None if n in self.sizes_used else n
        self.sizes_used.add(n)

    def _fixed_sizes(self) -> set[int]:
        """The sizes sent under a fixed chunk size, less the input's remainder: the last
        chunk, when it alone was smaller than the others (100 items in chunks of 40 are
        "40 items per chunk, 3 chunks", as ``multiprocessing`` counts them)."""
        sizes, last = self.sizes_used, self._lone_last
        if last is not None and len(sizes) > 1 and last < min(sizes - {last}):
            return sizes - {last}
        return sizes

    @property
    def cut_from(self) -> int | None:
        """The fixed chunk size asked for, when chunks were sent smaller than it (other
        than the input's remainder): a worker's ``max_tasks_per_child`` allowance or a
        lazy input's reads cut them; None otherwise."""
        if not self.fixed or not self.sizes_used:
            return None
        if len(self.sizes_used) == 1 and self._lone_last is not None:
            return None  # one chunk: the whole input, shorter than a chunk (or just as long)
        return self.fixed if min(self._fixed_sizes()) < self.fixed else None

    def describe(self) -> str:
        """For the report: the sizes of the chunks sent (``auto (lo-hi)`` when the planner
        chose them); a fixed size as given while the chunks had it (see ``cut_from``)."""
        if self.fixed:
            if not self.sizes_used:
                return str(self.fixed)
            if self.cut_from is None:  # the size given; or the one chunk's, of an input shorter than it
                return str(min(self.fixed, max(self.sizes_used)))
            sizes = self._fixed_sizes()
            lo, hi = min(sizes), max(sizes)
            return str(lo) if lo == hi else f"{lo}-{hi}"
        if not self.sizes_used:
            return "auto"
        lo, hi = min(self.sizes_used), max(self.sizes_used)
        return f"auto ({lo})" if lo == hi else f"auto ({lo}-{hi})"
