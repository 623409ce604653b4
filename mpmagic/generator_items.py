"""One random generator object in several items of a map: each item gets its own copy.

numpy advises passing a generator to the function that draws (``simulate(p, rng)``), so a
notebook maps ``map(simulate, params, [rng] * n)``: serially each item draws on from where
the last one left ``rng``, one stream. Each item goes to the workers pickled, a copy of
``rng`` in its state at the call, so every item drew the same numbers, and nothing said
so. The job (``jobs.MapJob``) asks here for each chunk of items that are not plain atoms,
and says the line once per run. A leaf: the job layer imports it (``draws.py``, which
reads functions, imports the pool).
"""

from __future__ import annotations

import random
import sys
from typing import Any

#: How many generator objects a run's items are checked against (bounded memory per run).
_MAX_ITEM_GENERATORS = 10_000
_item_kinds_for: list[Any] = [object(), {}]  # [numpy.random when made, {generator type: its words}]


def _item_kinds() -> dict[type, str]:
    """The random generator types an item may hold, by exact type (a dict look-up per value:
    a subclass check for each would cost a map of many small tuples ~0.5 us an item)."""
    npr = sys.modules.get("numpy.random")
    if _item_kinds_for[0] is not npr:
        kinds: dict[type, str] = {random.Random: "random.Random"}
        if npr is not None:
            for attr, words in (("Generator", "numpy Generator"), ("RandomState", "numpy RandomState"),
                                ("PCG64", "numpy bit generator"), ("PCG64DXSM", "numpy bit generator"),
                                ("MT19937", "numpy bit generator"), ("Philox", "numpy bit generator"),
                                ("SFC64", "numpy bit generator")):
                t = getattr(npr, attr, None)
                if isinstance(t, type):
                    kinds[t] = words
        _item_kinds_for[:] = [npr, kinds]
    return _item_kinds_for[1]


def shared_generator(items: Any, start: int, seen: dict[int, tuple[Any, int]]) -> str | None:
    """The line (without "mpmagic: ") when an item of ``items`` (the chunk starting at input
    position ``start``), or an argument in it, is a random generator object an earlier item
    held too, else None. Serially each item draws on from where the last one left the
    generator; each item goes to the workers as a copy of it in its state at the call, so
    they draw the same numbers. ``seen``: the run's generators so far (id: (object, item)),
    the objects held so a freed one's id is never taken for a new one's."""
    kinds = _item_kinds()
    for i, item in enumerate(items):
        for value in item if type(item) is tuple else (item,):
            words = kinds.get(type(value))
            if words is None:
                continue
            first = seen.get(id(value))
            if first is not None and first[0] is value:
                return (f"items {first[1]} and {start + i} hold the same {words}: each item gets its own copy of "
                        "it as it was at the call, so they draw the same numbers (serially: one stream, each item "
                        "going on from the last), and the notebook's does not move on; give each item its own "
                        "generator (rng.spawn(n) makes n independent ones)")
            if len(seen) < _MAX_ITEM_GENERATORS:
                seen[id(value)] = (value, start + i)
    return None
