"""What cloudpickle cannot send, mpmagic can (issue 13, class 3).

Each case is a cell a user writes; the oracle is plain ``map`` in the same
shell: equal results, of the notebook's own types.
"""

from __future__ import annotations

import sys

import pytest
from conftest import ensure_pool, low_recursion_limit, run

import mpmagic

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


ENUMS = '''
import enum

class Planet(enum.Enum):  # the Python docs' example: __init__ sets attributes on each member
    MERCURY = (3.303e+23, 2.4397e6)
    EARTH = (5.976e+24, 6.37814e6)
    def __init__(self, mass, radius):
        self.mass = mass
        self.radius = radius
    @property
    def gravity(self):
        return 6.673e-11 * self.mass / (self.radius * self.radius)

class Status(enum.Enum):  # "an enum with a label": __new__ sets _value_ and .label
    def __new__(cls, code, label):
        obj = object.__new__(cls)
        obj._value_ = code
        obj.label = label
        return obj
    OK = (200, "ok")
    NOT_FOUND = (404, "not found")

class Tagged(enum.IntEnum):
    A = 1
    B = 2
Tagged.A.extra = "set later"

def describe(member):
    return (member.name, getattr(member, "mass", None), getattr(member, "label", None),
            getattr(member, "extra", None), member is type(member)[member.name])
'''


@pytest.fixture
def enums(ip):
    run(ip, ENUMS)
    return ip


def test_enum_members_keep_what_their_init_or_new_set(enums, any_method):
    """cloudpickle rebuilds a notebook Enum from {name: value}: the attributes the
    members' __init__/__new__ set, or set on them later, were missing in the worker
    (an AttributeError serial never raises). The members stay the class's own."""
    ensure_pool(any_method)
    for args in ("describe, [*Planet, *Status, *Tagged]",
                 "lambda name: round(Planet[name].gravity, 3), ['MERCURY', 'EARTH']",
                 "lambda code: (Status(code).label, Status(code) is Status.NOT_FOUND), [200, 404]"):
        same_as_serial(enums, args)
    back = run(enums, "%pmap -q lambda m: m, [Planet.EARTH, Status.OK, Tagged.A]")
    assert back == [enums.user_ns["Planet"].EARTH, enums.user_ns["Status"].OK, enums.user_ns["Tagged"].A]
    assert all(a is b for a, b in zip(back, run(enums, "[Planet.EARTH, Status.OK, Tagged.A]"), strict=True))
    # A member's attribute changed in the notebook: the next run sees it.
    run(enums, "Tagged.A.extra = 'changed'\nStatus.OK.label = 'fine'")
    same_as_serial(enums, "describe, [*Status, *Tagged]")


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


def test_a_memoryview_keeps_its_format_and_shape(cells, local_pool):
    """cloudpickle sends a memoryview as bytes: ``m[1]`` of a view of
    ``arange(4)`` read byte 1 (0), not element 1, silently."""
    run(cells, "import numpy as np\nviews = [memoryview(np.arange(4)), memoryview(np.array([1.5, 2.5])), "
               "memoryview(np.arange(6).reshape(2, 3)), memoryview(b'ab'), memoryview(np.arange(10)[::3])]")
    oracle = run(cells, "[(m[1] if m.ndim == 1 else m[1, 2], m.format, m.shape, m.readonly) for m in views]")
    assert run(cells, "%pmap -q lambda m: (m[1] if m.ndim == 1 else m[1, 2], m.format, m.shape, m.readonly), views") == oracle
    back = run(cells, "%pmap -q lambda i: memoryview(np.arange(3) * i), [2]")[0]
    assert (type(back), back.format, back.tolist(), back.readonly) == (memoryview, "l", [0, 2, 4], False)


def test_what_cannot_keep_its_meaning_is_refused_with_advice_that_fits(cells, local_pool):
    """A memoryview of a format cast cannot rebuild is refused, not sent as bytes;
    a structure nested past the recursion limit is told to be flatter, not
    told to "return plain data (lists)" or "not capture it": it was an item."""
    from mpmagic.errors import SerializationError

    run(cells, "import numpy as np\nbig_endian = memoryview(np.arange(3, dtype='>i4'))\n"
               "def nest(n):\n    x = []\n    for _ in range(n):\n        x = [x]\n    return x\n")
    texts = []
    for line, says in (("len, [big_endian]", "Send the array it views"),
                       ("lambda i: memoryview(np.arange(3, dtype='>i4')), [1]", "Return the array it views"),
                       ("nest, [100_000]", "nested too deeply for pickle"),
                       ("len, [nest(100_000)]", "nested too deeply for pickle")):
        with pytest.raises(SerializationError) as info:
            cells.run_cell(f"%pmap -q {line}").raise_error()
        texts.append(str(info.value))
        assert says in texts[-1] and "capturing it" not in texts[-1] and "Return plain data" not in texts[-1], texts[-1]
    assert "return it flatter" in texts[2] and "send it flatter" in texts[3], texts[2:]
    assert "raise the limit in the notebook (sys.setrecursionlimit(" in texts[3], texts[3]
    assert texts[2].startswith("the result of item 0 of the input (100000) cannot be sent back"), texts[2]
    assert texts[3].startswith("cannot send item 0 ("), texts[3]


def test_the_notebooks_sys_stdout_in_a_function_is_the_tasks_own(capsys):
    """A function holding the notebook's sys.stdout / sys.stderr (a default argument,
    ``functools.partial(print, file=sys.stderr)``) was refused with ipykernel's
    internals (``session -> _trait_values -> 'auth'`` is an hmac.HMAC). ipykernel's
    stream, and ``sys.__stdout__``, now go as the task's own stream, looked up
    when used (a function is loaded before its task's output is captured)."""
    import functools
    import io
    import sys

    import cloudpickle
    from ipykernel.iostream import OutStream

    from mpmagic import payload

    kernel_stream = OutStream.__new__(OutStream)  # (a real one needs a kernel's session)
    kernel_stream.name = "stderr"
    say = functools.partial(print, file=kernel_stream)
    loaded = cloudpickle.loads(payload.cloudpickle_dumps(say))
    to_dunder = cloudpickle.loads(payload.cloudpickle_dumps(functools.partial(print, file=sys.__stdout__)))
    capsys.readouterr()
    task_out, task_err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = task_out, task_err  # (as a worker captures a task's streams)
    try:
        loaded("to stderr")
        to_dunder("to stdout")
    finally:
        sys.stdout, sys.stderr = old
    assert task_err.getvalue() == "to stderr\n" and task_out.getvalue() == "to stdout\n"


ALIASES = '''
import enum, typing

UserId = typing.NewType("UserId", int)

def new_id(i: UserId) -> UserId:  # annotations: evaluated when the def runs
    return (UserId(i + 1), UserId.__name__, UserId.__supertype__, UserId.__module__)

# (enum.member and enum.nonmember are Python 3.11+: on 3.10 a function in an Enum's
# body is its method and any other value a member, serially as in the workers)
member = getattr(enum, "member", lambda value: value)
nonmember = getattr(enum, "nonmember", lambda value: value)

class Op(enum.Enum):  # a function member (enum.member): cloudpickle's {name: value} made it a method
    @member
    def double(x):
        return 2 * x
    triple = member(lambda x: 3 * x)
    ident = 1
    limit = nonmember(10)

def use_op(x):
    return [(m.name, m.value(x) if callable(m.value) else m.value) for m in Op], Op.limit
'''


@pytest.fixture
def aliases(ip):
    run(ip, ALIASES)
    return ip


def test_a_notebook_newtype_and_enum_function_members_reach_the_workers(aliases, method):
    """A notebook ``typing.NewType`` pickles by reference (``__main__.UserId``),
    which a worker cannot import: "could not be loaded in a worker" for a function
    merely annotated with it. An Enum member that is a function (``enum.member``)
    came back a plain function there (``Op.double.name``: AttributeError)."""
    ensure_pool(method)
    same_as_serial(aliases, "new_id, [1, 2]")
    same_as_serial(aliases, "use_op, [0, 5]")


TYPE_ALIASES = '''
type Vec = list[float]
type Tree = int | list[Tree]           # recursive: its value names itself
type Pair[T] = tuple[T, T]             # generic
type Later = list[NotYetDefined]       # its value cannot be evaluated (serial never asks)

def scale(x: float) -> Vec:            # annotations: evaluated when the def runs
    return [x, 2 * x]

def aliases_seen(x: Later) -> Pair[int]:
    return (Vec.__name__, str(Vec.__value__), Vec.__module__, str(Tree.__value__),
            str(Pair[int]), [p.__name__ for p in Pair.__type_params__], Later.__name__)

def later_value(x):
    try:
        return str(Later.__value__)
    except NameError as e:
        return "NameError", str(e)
'''


@pytest.mark.skipif(sys.version_info < (3, 12), reason="the `type` statement (PEP 695) is Python 3.12+")
def test_a_notebook_type_alias_reaches_the_workers(ip, method):
    """A notebook ``type`` alias (typing.TypeAliasType) pickles by reference
    (``__main__.Vec``), which a worker cannot import: a function merely annotated
    with it failed with "could not be loaded in a worker". It goes by value, its
    value as in the notebook (a recursive one too), or the same NameError serial
    raises when its value names what is not defined."""
    run(ip, TYPE_ALIASES)
    ensure_pool(method)
    same_as_serial(ip, "scale, [1.0, 2.0]")
    same_as_serial(ip, "aliases_seen, [0]")
    same_as_serial(ip, "later_value, [0]")
    back = run(ip, "%pmap -q lambda i: Vec, [0]")[0]
    assert (back.__name__, back.__value__, back.__module__) == ("Vec", list[float], "__main__")


CACHED = '''
import functools

class Circle:
    """A notebook class with a cached_property (Python 3.11's holds a thread lock)."""
    def __init__(self, r):
        self.r = r
    @functools.cached_property
    def area(self):
        return 3 * self.r * self.r
    def scaled(self, k):
        return self.area * k

def area_of(r):
    return Circle(r).area

def cached_area(c):
    c.area
    return c.__dict__["area"], c.area
'''


def test_a_notebook_class_with_a_cached_property_is_sent(ip, backend):
    """fidelity24: a notebook class using ``functools.cached_property`` could not be sent on
    Python 3.11 (``Circle -> area -> lock is a _thread.RLock ... create it inside the
    function``: the lock is functools'), though serial map runs it. It goes as the property
    of its function, made again in the worker, where it caches as it does here."""
    run(ip, CACHED)
    assert same_as_serial(ip, "area_of, [1, 2]") == [3, 12]
    assert same_as_serial(ip, "Circle(2).scaled, [1, 2]") == [12, 24]
    assert same_as_serial(ip, "cached_area, [Circle(1), Circle(3)]") == [(3, 3), (27, 27)]
    returned = run(ip, "%pmap -q Circle, [5]")[0]
    assert type(returned) is ip.user_ns["Circle"] and returned.area == 75


QUALNAMES = '''
import dataclasses

class Outer:
    @dataclasses.dataclass
    class Inner:
        x: int

def shown(x):
    return repr(Outer.Inner(x)), type(Outer.Inner(x)).__qualname__

def made_here(x):
    @dataclasses.dataclass
    class Point:
        x: int
    return Point(x)
'''


def test_a_class_keeps_its_qualified_name_both_ways(ip, local_pool):
    """fidelity26: cloudpickle rebuilds a class sent by value from its ``__name__``: a nested
    notebook class was ``Inner`` in a task (a dataclass's repr ``Inner(x=1)``, serially
    ``Outer.Inner(x=1)``), and a class a task made came back as ``Point``, not
    ``made_here.<locals>.Point``. Its ``__qualname__`` goes with it."""
    run(ip, QUALNAMES)
    assert same_as_serial(ip, "shown, [1]") == [("Outer.Inner(x=1)", "Outer.Inner")]
    back = run(ip, "%pmap -q made_here, [1]")[0]
    assert type(back).__qualname__ == "made_here.<locals>.Point" and repr(back) == repr(run(ip, "made_here(1)"))


def test_a_mapped_callable_that_cannot_be_sent_is_told_to_map_a_function_not_to_stop_capturing_it(ip, pool2):
    """fidelity26: ``%pmap np.frompyfunc(g, 1, 1), xs`` (a ufunc made in the notebook)
    was told "Create it inside the function ... instead of capturing it from the
    notebook": it is the function mapped, captured by nothing. The advice says what to map."""
    from mpmagic.errors import SerializationError

    run(ip, "import numpy as np\ndef twice(x):\n    return 2 * x\nvectorized = np.frompyfunc(twice, 1, 1)\n")
    with pytest.raises(SerializationError) as info:
        ip.run_cell("%pmap -q vectorized, [1, 2]").raise_error()
    text = str(info.value)
    assert text.startswith("cannot send the function to the workers: `twice (vectorized)` is a numpy.ufunc"), text
    assert "capturing it" not in text and "It is the function mapped itself" in text, text
    with pytest.raises(SerializationError) as info:  # (captured by a lambda: the advice as before)
        ip.run_cell("%pmap -q lambda x: vectorized(x), [1, 2]").raise_error()
    assert "instead of capturing it from the notebook" in str(info.value), info.value


PROXY = '''
class Proxy:
    def __init__(self, target):
        self.target = target
    def __getattr__(self, name):
        return getattr(self.target, name)
    def shout(self, x):
        return self.upper() + str(x)

wrapped = Proxy("ab")
'''


def test_a_delegating_getattr_that_recurses_as_pickle_rebuilds_its_object_says_why(ip, pool2):
    """fidelity26: a wrapper whose ``__getattr__`` reads ``self.target`` runs serially, and in a
    map failed with a bare RecursionError (its method mapped: "could not be loaded in a
    worker") or with "Return types the notebook can import" (returned): pickle asks the new
    object for ``__setstate__`` before its attributes are set, and ``__getattr__`` calls
    itself for ``self.target``. The error names the method and the fix."""
    from mpmagic.errors import SerializationError

    run(ip, PROXY)
    assert run(ip, "list(map(wrapped.shout, [1]))") == ["AB1"]
    with pytest.raises(RecursionError) as info:  # (the API: IPython's display of a recursion's frames takes seconds)
        mpmagic.pmap(ip.user_ns["wrapped"].shout, [1])
    said = " ".join(getattr(info.value, "__notes__", []))
    assert "__getattr__ recursed while pickle rebuilt its object" in said, said
    assert "raise AttributeError for names that start with '__'" in said, said
    with pytest.raises(SerializationError) as info:
        ip.run_cell("%pmap -q Proxy, ['a']").raise_error()
    text = str(info.value)
    assert "Proxy.__getattr__ recursed while pickle rebuilt a Proxy" in text, text
    assert "Return types the notebook can import" not in text, text


def test_a_delegating_getattr_sent_to_a_parallel_cell_says_why(ip, pool2):
    """small27: the same wrapper sent to a ``%%parallel`` cell (a name the cell uses) failed
    each rank with a bare RecursionError (note: "raised by rank 0 of 2" only): the cell's names
    are loaded before its code runs, and the note of the map path was not given there."""
    from mpmagic.errors import ParallelError

    run(ip, PROXY)
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(low_recursion_limit())  # (travels to the workers: short tracebacks to show)
    try:
        with pytest.raises(ParallelError) as info:
            mpmagic.parallel("wrapped.shout(rank)", workers=2, namespace=ip.user_ns, label_output=False)
    finally:
        sys.setrecursionlimit(before)
    assert sorted(info.value.failures) == [0, 1], info.value
    for rank, failure in info.value.failures.items():
        said = " ".join(getattr(failure, "__notes__", []))
        assert f"raised by rank {rank} of 2 mpmagic: the cell's names could not be loaded in the worker" in said, said
        # (as the map's API path; its frame qualified, the class is named, as for a result)
        assert "Proxy.__getattr__ recursed while pickle rebuilt a Proxy" in said, said
        assert "raise AttributeError for names that start with '__'" in said, said
