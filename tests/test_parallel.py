"""%%parallel and mpmagic.parallel: SPMD cells with rank/size, gathered values,
labelled output, errors and timing, on each pool in ``conftest.BACKENDS``."""

from __future__ import annotations

import pytest
from conftest import run

import mpmagic


def cell(ip, line: str, body: str):
    return run(ip, f"%%parallel {line}\n{body}")


def test_rank_and_size(ip, backend):
    assert cell(ip, "-n 2 -q", "(rank, size)") == [(0, 2), (1, 2)]


def test_more_ranks_than_workers_all_run_at_once(ip, backend):
    # Four ranks meet at a barrier: only possible if all four run concurrently.
    run(ip, "import tempfile, os\nbarrier_dir = tempfile.mkdtemp()\n")
    body = (
        "import os, time\n"
        "open(os.path.join(barrier_dir, str(rank)), 'w').close()\n"
        "deadline = time.time() + 20\n"
        "while len(os.listdir(barrier_dir)) < size and time.time() < deadline:\n"
        "    time.sleep(0.01)\n"
        "len(os.listdir(barrier_dir))\n"
    )
    assert cell(ip, "-n 4 -q", body) == [4, 4, 4, 4]


def test_notebook_names_function_class_global_module(ip, backend):
    run(
        ip,
        "import numpy as np\n"
        "SCALE = 10\n"
        "def f(x):\n    return x * SCALE\n"
        "class Box:\n    def __init__(self, v):\n        self.v = v\n",
    )
    res = cell(ip, "-n 2 -q", "b = Box(f(rank))\nfloat(np.float64(b.v))")
    assert res == [0.0, 10.0]


def test_imports_and_definitions_inside_the_cell(ip, backend):
    body = "import math\ndef g(r):\n    return math.factorial(r + 2)\ng(rank)"
    assert cell(ip, "-n 3 -q", body) == [2, 6, 24]


def test_output_name_reduce_and_gather(ip, backend):
    cell(ip, "-n 2 -q -o vals", "y = rank * 3\nrank + 1")
    assert run(ip, "vals") == [1, 2]
    assert cell(ip, "-n 4 -q --reduce sum", "rank") == 6
    cell(ip, "-n 2 -q --gather y,z", "y = rank * 3\nz = 'r%d' % rank")
    assert run(ip, "(y, z)") == ([0, 3], ["r0", "r1"])


def test_cell_without_final_expression(ip, backend):
    assert cell(ip, "-n 2 -q -o nothing", "x = rank") is None
    assert run(ip, "nothing") == [None, None]


def test_labelled_output_nothing_lost(ip, backend, capsys):
    capsys.readouterr()
    cell(ip, "-n 4 -q", "for i in range(1000):\n    print(f'line {i} of rank {rank}')")
    out = capsys.readouterr().out.splitlines()
    for r in range(4):
        mine = [line for line in out if line.startswith(f"[rank {r}] ")]
        assert mine == [f"[rank {r}] line {i} of rank {r}" for i in range(1000)]


def test_error_in_one_rank_of_four(ip, backend, capsys):
    capsys.readouterr()
    with pytest.raises(mpmagic.ParallelError) as info:
        cell(ip, "-n 4 -q", "print('before', rank)\nif rank == 2:\n    raise ValueError('bad rank')\nrank")
    assert "1 of 4 ranks failed" in str(info.value)
    assert isinstance(info.value.failures[2], ValueError)
    captured = capsys.readouterr()
    for r in range(4):
        assert f"[rank {r}] before {r}" in captured.out
    # The failing rank's traceback shows the cell's own line and number.
    assert "[rank 2]" in captured.err and "raise ValueError('bad rank')" in captured.err
    assert "line 4" in captured.err  # body line 3 is line 4 of the cell, under %%parallel


def test_classic_split_sum(ip, backend, capsys):
    run(ip, "N = 1_000_001")
    body = "lo, hi = max(1, rank * N // size), (rank + 1) * N // size\nsum(x * x for x in range(lo, hi))"
    assert cell(ip, "-n 4 -q --reduce sum", body) == 333333833333500000
    capsys.readouterr()
    cell(ip, "-n 2 --compare", body)
    out = capsys.readouterr().out
    assert "parallel: 2 ranks" in out and "(measured" in out


def test_timeout_stops_a_rank_and_pool_stays_usable(ip, backend):
    with pytest.raises(mpmagic.ParallelError) as info:
        cell(ip, "-n 2 -q --timeout 1", "import time\nif rank == 1:\n    time.sleep(60)\nrank")
    assert isinstance(info.value.failures[1], mpmagic.TaskTimeoutError)
    assert cell(ip, "-n 2 -q", "rank * 2") == [0, 2]


def test_api(backend):
    values = mpmagic.parallel("rank ** 2", workers=3, namespace={})
    assert list(values) == [0, 1, 4]
    assert values.report.items == 3
