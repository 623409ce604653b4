"""What cloudpickle cannot send, mpmagic can (issue 13, class 3).

Each case is a cell a user writes; the oracle is plain ``map`` in the same
shell: equal results, of the notebook's own types.
"""

from __future__ import annotations

import pytest
from conftest import run

CELLS = '''
import dataclasses, functools, types

@functools.lru_cache(maxsize=64)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

@functools.cache
def square(n):
    return n * n

def calls_cached(n):
    return fib(n) + square(n)

class Slotted:
    __slots__ = ("a", "b")
    def __init__(self, a):
        self.a = a
        self.b = [a] * 2
    def __eq__(self, other):
        return type(other) is Slotted and (self.a, self.b) == (other.a, other.b)

class SlottedChild(Slotted):
    __slots__ = ("c",)
    def __init__(self, a):
        super().__init__(a)
        self.c = -a
    def __eq__(self, other):
        return super().__eq__(other) if type(other) is Slotted else (
            type(other) is SlottedChild and (self.a, self.b, self.c) == (other.a, other.b, other.c))

@dataclasses.dataclass(slots=True)
class Point:
    x: int
    y: list

@dataclasses.dataclass(slots=True, frozen=True)
class Frozen:
    x: int

def make_slotted(i):
    return Slotted(i)

def make_child(i):
    return SlottedChild(i)

def make_point(i):
    return Point(i, [i, i])

def make_frozen(i):
    return Frozen(i)
'''


@pytest.fixture
def cells(ip):
    run(ip, CELLS)
    return ip


def same_as_serial(ip, args: str) -> list:
    serial = run(ip, f"list(map({args}))")
    parallel = run(ip, f"%pmap -q {args}")
    assert parallel == serial
    assert [type(p) for p in parallel] == [type(s) for s in serial]
    return parallel


@pytest.mark.parametrize("func", ["fib", "square", "calls_cached"])
def test_lru_cache_and_cache_functions_and_their_callers(cells, backend, func):
    same_as_serial(cells, f"{func}, range(25)")


def test_a_cached_function_stays_cached_in_the_worker(cells, local_pool):
    # The worker wraps the function again: a cache, with lru_cache's own parameters.
    info = run(cells, "%pmap -q lambda n: (fib(n), fib.cache_info().maxsize), [20]")
    assert info == [(6765, 64)]


@pytest.mark.parametrize(
    "func, cls", [("make_slotted", "Slotted"), ("make_child", "SlottedChild"), ("make_point", "Point"), ("make_frozen", "Frozen")]
)
def test_slotted_instances_come_back(cells, backend, func, cls):
    results = same_as_serial(cells, f"{func}, range(4)")
    assert all(isinstance(r, cells.user_ns[cls]) for r in results)  # the notebook's own class


def test_slotted_instance_with_an_unset_slot(cells, local_pool):
    run(cells, "def half(i):\n    s = Slotted.__new__(Slotted)\n    s.a = i\n    return s\n")
    back = run(cells, "%pmap -q half, [3]")[0]
    assert back.a == 3 and not hasattr(back, "b") and type(back).__name__ == "Slotted"


def test_a_module_built_in_the_notebook_is_never_sent_stale(cells, local_pool):
    run(cells, "cfg = types.ModuleType('cfg')\ncfg.scale = 2\ndef scaled(i):\n    return i * cfg.scale\n")
    assert run(cells, "%pmap -q scaled, [1, 2]") == [2, 4]
    run(cells, "cfg.scale = 10")
    assert run(cells, "%pmap -q scaled, [1, 2]") == [10, 20]
    run(cells, "cfg.scale = 3")
    assert run(cells, "%pmap -q scaled, [1, 2]") == run(cells, "list(map(scaled, [1, 2]))") == [3, 6]
