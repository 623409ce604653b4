"""A trailing ``# comment`` on a magic line is a comment, as on any Python line.

The docs (and people) write ``%pool dask   # a local cluster`` and
``%pmap f, xs  # why``; the comment must not become an argument.
"""

from __future__ import annotations

from conftest import run


def test_pmap_line_may_end_with_a_comment(ip, backend) -> None:
    assert run(ip, "%pmap -q abs, [-1, -2]  # absolute values, (unbalanced") == [1, 2]


def test_parallel_line_may_end_with_a_comment(ip, backend) -> None:
    assert run(ip, "%%parallel -n 2 -q   # two ranks\nrank + 1") == [1, 2]


def test_pool_line_may_end_with_a_comment(ip, backend) -> None:
    status = run(ip, "%pool   # what is running")
    assert "pool:" in str(status)
