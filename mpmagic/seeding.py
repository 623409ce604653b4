"""Reproducible randomness: one independent random stream per item (or rank).

With ``seed=S`` (``--seed S``) item ``i`` of the input runs with
``numpy.random.SeedSequence(S, spawn_key=(i,))``, the same sequence that
``SeedSequence(S).spawn(n)[i]`` gives: independent streams, and the stream
depends only on S and the item's *index*, never on which worker ran it or
how the items were chunked. So 1, 2 or 4 workers, any chunk size and the
serial ``--compare`` run give the same results. ``random``,
``numpy.random``'s global state and, where the notebook uses PyTorch, torch's
default generator (``torch.manual_seed``) are seeded from it for the item, and
:func:`rng` returns the item's ``numpy.random.Generator``.

The notebook wraps the function (:class:`Seeded`) and numbers the items, so
nothing changes in the engine and the per-item cost (a SeedSequence and two
reseeds, a few microseconds) is paid only when a seed is given.

numpy's global state is seeded only when the notebook has imported numpy (or
the function's code names it): seeding never imports numpy into a notebook
(or a ``--compare`` timing) that does not use it. ``random`` gets the same
stream either way (:func:`_state_words` is SeedSequence's in pure Python),
and :func:`rng` makes the item's Generator when first asked. Without numpy
installed, ``random`` alone is seeded and :func:`rng` is unavailable. torch
is seeded on the same terms (imported in the notebook, or named by the code),
so seeding never imports torch either.

This module imports no IPython (workers import it).
"""

from __future__ import annotations

import importlib
import random
import sys
from typing import TYPE_CHECKING, Any

from .fmt import func_name

if TYPE_CHECKING:
    import numpy

_current: Any = None  # the running item's Generator (or the key to make it lazily)
# The global states the first seeded item (or rank) found, put back by restore(): None when
# nothing is seeded over. (random's, numpy's, torch's; None for one not seeded.)
_saved: tuple[Any, Any, Any] | None = None


def _check_seed(seed: Any) -> int:
    """``seed`` as a plain int of 0 or more (a numpy integer is the int it is), else a UsageError."""
    from .checks import check_whole

    return check_whole("seed", seed, 0)


def uses_numpy(code: Any = None) -> bool:
    """Seed numpy too? Decided in the notebook (the workers follow it): numpy is
    imported there, or ``code`` (a function or a cell's text) names it."""
    return _uses("numpy", code)


def uses_torch(code: Any = None) -> bool:
    """Seed torch too? As :func:`uses_numpy`: torch is imported in the notebook, or ``code`` names it."""
    return _uses("torch", code)


def _uses(module: str, code: Any) -> bool:
    """``module`` is imported here, or ``code`` (a function or a cell's text) names it."""
    if module in sys.modules:
        return True
    if isinstance(code, str):
        return module in code
    from .warmup import _code_names

    f = getattr(code, "__func__", getattr(code, "func", code))
    c = getattr(f, "__code__", None)
    return c is not None and module in _code_names(c)


def _seed_torch(words: list[int]) -> None:
    """torch's default generator (CPU, and CUDA's lazily) from two words of the stream."""
    try:
        torch: Any = importlib.import_module("torch")
    except ImportError:
        return
    torch.manual_seed(words[0] | words[1] << 32)


def enter(seed: int, key: int, numpy: bool = True, torch: bool = False) -> None:
    """Seed ``random`` (with ``numpy``, numpy's global state; with ``torch``,
    torch's default generator) for stream ``key`` of ``seed``. The states found
    before the first seeded item are kept for :func:`restore`."""
    global _current
    np: Any = None
    if numpy or "numpy" in sys.modules:
        try:
            import numpy as np
        except ImportError:
            pass
    if _saved is None:  # (after numpy's import: a state it seeds over is kept, never one it had not yet)
        _save(numpy and np is not None, torch)
    if np is None:  # (not imported: the same words as numpy's, in pure Python)
        words = _state_words(seed, key)
        random.seed(int.from_bytes(b"".join(w.to_bytes(4, "little") for w in words), "little"))
        if torch:
            _seed_torch(words[2:])
        _current = (seed, key)  # rng() makes the Generator if asked
        return
    ss = np.random.SeedSequence(seed, spawn_key=(key,))
    state = ss.generate_state(4)  # uint32 x 4: a 128-bit seed for random, one word for numpy
    random.seed(int.from_bytes(state.tobytes(), "little"))
    if numpy:
        np.random.seed(state[:2])  # the legacy global RandomState (np.random.rand...)
    if torch:
        _seed_torch([int(w) for w in state[2:]])
    _current = ss


def _save(numpy: bool, torch: bool) -> None:
    """Keep the global states :func:`enter` is about to seed over (numpy's, torch's
    only where they are imported and seeded: ~70 us for numpy's, so once per call)."""
    global _saved
    if torch and "torch" not in sys.modules:  # (imported first, as _seed_torch does, so its state is kept)
        try:
            importlib.import_module("torch")
        except ImportError:
            pass
    np, th = sys.modules.get("numpy"), sys.modules.get("torch")
    _saved = (random.getstate(),
              np.random.get_state() if numpy and np is not None else None,
              th.get_rng_state() if torch and th is not None else None)


def restore() -> None:
    """Put back the global states the seeded items of a call found (a worker, at its
    first unit of the next call, and before a setup runs). A seeded call otherwise left
    a worker drawing on from its last item's stream: the next unseeded call drew the
    same numbers in every session, and workers whose last items were alike drew alike.
    The serial run leaves the notebook's state as it was likewise (api._random_state_kept)."""
    global _saved
    if _saved is None:
        return
    saved, _saved = _saved, None
    random.setstate(saved[0])
    np, th = sys.modules.get("numpy"), sys.modules.get("torch")
    if saved[1] is not None and np is not None:
        np.random.set_state(saved[1])
    if saved[2] is not None and th is not None:
        th.set_rng_state(saved[2])


def forget() -> None:
    """Drop what :func:`enter` kept, without putting it back (the notebook's serial run
    restores the notebook's states itself)."""
    global _saved
    _saved = None


# numpy.random.SeedSequence's mixing (numpy/random/bit_generator.pyx), for random's seed without numpy.
_MASK32 = 0xFFFFFFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715


def _uint32_words(n: int) -> list[int]:
    words = []
    while True:
        words.append(n & _MASK32)
        n >>= 32
        if not n:
            return words


def _state_words(seed: int, key: int, pool_size: int = 4) -> list[int]:
    """``SeedSequence(seed, spawn_key=(key,)).generate_state(4)`` as ints, without numpy."""
    entropy = _uint32_words(seed)
    entropy += [0] * max(0, pool_size - len(entropy))  # (padded: a spawn key follows)
    entropy += _uint32_words(key)
    hash_const = _INIT_A

    def hashmix(value: int) -> int:
        nonlocal hash_const
        value ^= hash_const
        hash_const = (hash_const * _MULT_A) & _MASK32
        value = (value * hash_const) & _MASK32
        return value ^ (value >> 16)

    def mix(x: int, y: int) -> int:
        r = (_MIX_L * x - _MIX_R * y) & _MASK32
        return r ^ (r >> 16)

    pool = [hashmix(entropy[i] if i < len(entropy) else 0) for i in range(pool_size)]
    for src in range(pool_size):
        for dst in range(pool_size):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(pool_size, len(entropy)):
        for dst in range(pool_size):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    out, h = [], _INIT_B
    for i in range(4):
        v = pool[i % pool_size] ^ h
        h = (h * _MULT_B) & _MASK32
        v = (v * h) & _MASK32
        out.append(v ^ (v >> 16))
    return out


def rng() -> numpy.random.Generator:
    """The running item's ``numpy.random.Generator`` (with ``--seed``).

    Without a seed (or in the notebook) a fresh, unseeded Generator.
    """
    global _current
    import numpy as np

    if _current is None:
        return np.random.default_rng()
    if isinstance(_current, tuple):  # (seeded without numpy: the same SeedSequence, made now)
        _current = np.random.SeedSequence(_current[0], spawn_key=(_current[1],))
    if isinstance(_current, np.random.SeedSequence):
        _current = np.random.Generator(np.random.PCG64(_current))
    return _current


class Seeded:
    """``func`` run on ``(index, item)`` pairs, each item with its own stream."""

    def __init__(self, func: Any, seed: int, star: bool) -> None:
        self.func, self.seed, self.star = func, seed, star
        self.numpy = uses_numpy(func)  # (decided here: every worker and the serial run seed alike)
        self.torch = uses_torch(func)
        self.__name__ = func_name(func)  # (%pool runs, reports: a partial or callable object by its type, as without seed=)
        self.__qualname__ = getattr(func, "__qualname__", self.__name__)

    @staticmethod
    def mpmagic_item(pair: tuple[int, Any]) -> Any:
        """The item of an ``(index, item)`` pair: what errors and ``Failed.item`` show (jobs.py)."""
        return pair[1]

    def __call__(self, pair: tuple[int, Any]) -> Any:
        global _current
        __tracebackhide__ = True  # (ours: a task's traceback shows the user's frames only, as without --seed)
        index, item = pair
        enter(self.seed, index, self.numpy, self.torch)
        try:
            return self.func(*item) if self.star else self.func(item)
        finally:
            _current = None  # rng() outside a seeded item is not this item's stream


def seed_rank(seed: int | None, rank: int, numpy: bool = True, torch: bool = False) -> None:
    """A ``%%parallel`` rank's stream (``--seed``): the same per rank on every run."""
    if seed is not None:
        enter(seed, rank, numpy, torch)


__all__ = ["rng", "Seeded", "seed_rank", "enter", "restore", "forget", "uses_numpy", "uses_torch"]
