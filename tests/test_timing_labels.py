"""The timing line is labelled honestly: what an estimate assumes is said on the line itself.

Unit tests of Report / advice with made-up numbers (no pool), and of the
formatter and --compare's equality.
"""

from __future__ import annotations

import pickle

import numpy as np

from mpmagic.api import _equal
from mpmagic.fmt import fmt_seconds
from mpmagic.report import Report


def _report(**kw) -> Report:
    base = dict(kind="pmap", items=8, workers=2, backend="local", start_method="forkserver",
                wall=1.0, task_seconds=1.8, chunks=8, chunksize="auto (1)")
    return Report(**{**base, **kw})


def test_the_unit_is_picked_after_rounding():
    assert fmt_seconds(0.0009996) == "1.0 ms"
    assert fmt_seconds(0.0009994) == "999 µs"
    assert fmt_seconds(0.99996) == "1.00 s"
    assert fmt_seconds(0.99949) == "999.5 ms"
    assert fmt_seconds(1e-3) == "1.0 ms" and fmt_seconds(1.0) == "1.00 s"


def test_equal_results_in_tuples_with_arrays_and_sets_with_nan_are_equal():
    nan = float("nan")
    for value in [(np.array([0.5, 1.0]), 1.0), (np.array([nan, 1.0]), 2.0), [(np.array([1, 2]), 1.0)] * 2,
                  {nan}, {1, 2, nan}, frozenset({nan}), {"a": (np.array([1]), 2)}]:
        assert _equal(value, pickle.loads(pickle.dumps(value))), value
    for a, b in [((np.array([1, 2]), 1.0), (np.array([1, 3]), 1.0)), ({nan}, {1.0}), ((np.array([1]),), [np.array([1])])]:
        assert not _equal(a, b), (a, b)
