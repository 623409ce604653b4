"""Reproducible randomness: one independent random stream per item (or rank).

With ``seed=S`` (``--seed S``) item ``i`` of the input runs with
``numpy.random.SeedSequence(S, spawn_key=(i,))``, the same sequence that
``SeedSequence(S).spawn(n)[i]`` gives: independent streams, and the stream
depends only on S and the item's *index*, never on which worker ran it or
how the items were chunked. So 1, 2 or 4 workers, any chunk size and the
serial ``--compare`` run give the same results. ``random`` and
``numpy.random``'s global state are seeded from it for the item, and
:func:`rng` returns the item's ``numpy.random.Generator``.

The notebook wraps the function (:class:`Seeded`) and numbers the items, so
nothing changes in the engine and the per-item cost (a SeedSequence and two
reseeds, a few microseconds) is paid only when a seed is given. Without numpy,
``random`` alone is seeded with ``(S, i)`` and :func:`rng` is unavailable.

This module imports no IPython (workers import it).
"""

from __future__ import annotations

import random
from typing import Any

_current: Any = None  # the running item's Generator (or the key to make it lazily)


def _check_seed(seed: Any) -> int:
    from .errors import UsageError

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a whole number of 0 or more, not {seed!r}")
    return seed


def enter(seed: int, key: int) -> None:
    """Seed ``random`` and numpy's global state for stream ``key`` of ``seed``."""
    global _current
    try:
        import numpy as np
    except ImportError:
        random.seed(hash((seed, key)))
        _current = None
        return
    ss = np.random.SeedSequence(seed, spawn_key=(key,))
    words = ss.generate_state(4)  # uint32 x 4: a 128-bit seed for random, one word for numpy
    random.seed(int.from_bytes(words.tobytes(), "little"))
    np.random.seed(words[:2])  # the legacy global RandomState (np.random.rand...)
    _current = ss


def rng() -> Any:
    """The running item's ``numpy.random.Generator`` (with ``--seed``).

    Without a seed (or in the notebook) a fresh, unseeded Generator.
    """
    global _current
    import numpy as np

    if _current is None:
        return np.random.default_rng()
    if isinstance(_current, np.random.SeedSequence):
        _current = np.random.Generator(np.random.PCG64(_current))
    return _current


class Seeded:
    """``func`` run on ``(index, item)`` pairs, each item with its own stream."""

    def __init__(self, func: Any, seed: int, star: bool) -> None:
        self.func, self.seed, self.star = func, seed, star
        self.__name__ = getattr(func, "__name__", "func")
        self.__qualname__ = getattr(func, "__qualname__", self.__name__)

    @staticmethod
    def mpmagic_item(pair: tuple[int, Any]) -> Any:
        """The item of an ``(index, item)`` pair: what errors and ``Failed.item`` show (jobs.py)."""
        return pair[1]

    def __call__(self, pair: tuple[int, Any]) -> Any:
        global _current
        index, item = pair
        enter(self.seed, index)
        try:
            return self.func(*item) if self.star else self.func(item)
        finally:
            _current = None  # rng() outside a seeded item is not this item's stream


def seed_rank(seed: int | None, rank: int) -> None:
    """A ``%%parallel`` rank's stream (``--seed``): the same per rank on every run."""
    if seed is not None:
        enter(seed, rank)


__all__ = ["rng", "Seeded", "seed_rank", "enter"]
