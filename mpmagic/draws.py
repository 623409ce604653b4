"""Random draws a task makes that cannot mean what they mean serially, said in one line.

A generator object the mapped function captures (``rng = np.random.default_rng(0)``)
goes to each worker as a copy in its state at the call: two workers draw the same
numbers and the notebook's generator never moves on. ``random``'s or numpy's global
state is each worker's own: a seed the notebook set (``random.seed(0)``) reaches no
worker. Serially neither happens, and nothing said so (the project's rule: a parallel
run means what the serial code means, or says in one line why not). This module reads
what a function draws from (its code, the values of the names it reads, the notebook
functions it calls, a few levels down), whether a notebook cell seeded a global state
(the input history), and says it once per function. Advice only: it never raises.
"""

from __future__ import annotations

import dis
import functools
import random
import re
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cell import names_used
from .payload_cache import (
    _ATOMIC,
    _MAX_CODES,
    _MISSING,
    _by_reference,
    _codes,
    _extract_code_globals,
)

# Random draws a task makes that cannot mean what they mean serially (random23): from a
# generator object the function captures (each worker draws from its own copy, as it was
# at the call: two workers draw the same numbers, and the notebook's never moves on), or
# from ``random``'s or numpy's global state (each worker's own, never the notebook's: a
# seed the notebook set does not reach them). Read from the code and the values of the
# names it reads, through the notebook functions it calls, a few levels down.


@dataclass(frozen=True)
class RandomUse:
    """``func`` (its name) draws from ``source``: "generator" (the notebook's object
    ``name``, a ``kind`` such as "numpy Generator"; ``argument``: given as that argument
    of a ``functools.partial``), "random" or "numpy" (that module's global state, through
    the notebook's name ``name``). ``code``: the code object of the function that draws
    (what "once per function" counts; a generator's own method given as the function:
    ``(id(generator), method name)``, as it cannot be weakly referenced)."""

    func: str
    source: str
    name: str
    kind: str = ""
    argument: bool = False
    code: Any = field(default=None, compare=False)
    default: bool = False  # (``name`` is the argument whose default it is: ``def f(x, r=rng)``)
    # (``name`` is a drawing function imported from a global state, ``from numpy.random import rand``:
    # a method of that state's object, which goes to each worker as a copy, as a captured generator does)
    imported: bool = False


def random_uses(func: Any) -> list[RandomUse]:
    """What ``func`` (and the notebook functions it calls, or a partial holds: the user's
    function in the pandas accessor's task) draws random numbers from, beyond its own
    arguments: captured generators first. Never raises (it only decides a line of advice);
    nothing is imported (numpy is looked at only if imported)."""
    found: list[RandomUse] = []
    try:
        _uses_of(func, found, set(), 0)
    except Exception:  # (advice only: nothing odd may break a run)
        return []
    if not found:  # (the usual: nothing drawn, nothing to order)
        return found
    found = list(dict.fromkeys(found))
    return sorted(found, key=lambda u: u.source != "generator")


def func_name_of(f: Any) -> str:
    """A function's name for a line (a lambda: "the lambda")."""
    name = getattr(getattr(f, "__func__", f), "__name__", None) or type(f).__name__
    return "the lambda" if name == "<lambda>" else name


# (the drawing machinery of random and numpy, read once numpy.random is imported: _kinds)
_kinds_for: list[Any] = [object(), None]


def _kinds() -> tuple[Any, Any, Any, Any, tuple[tuple[type, str], ...]]:
    """``(random's hidden instance, numpy, numpy.random, numpy's legacy global RandomState,
    ((generator type, its words)...))``, from what is imported (nothing is imported)."""
    npr = sys.modules.get("numpy.random")
    if _kinds_for[0] is not npr:
        np = sys.modules.get("numpy")
        kinds: list[tuple[type, str]] = [(random.Random, "random.Random")]
        legacy = None
        if npr is not None:
            legacy = getattr(getattr(npr, "mtrand", None), "_rand", None)
            for attr, words in (("Generator", "numpy Generator"), ("RandomState", "numpy RandomState"),
                                ("BitGenerator", "numpy bit generator")):
                t = getattr(npr, attr, None)
                if isinstance(t, type):
                    kinds.append((t, words))
        _kinds_for[:] = [npr, (getattr(random, "_inst", None), np, npr, legacy, tuple(kinds))]
    return _kinds_for[1]


def _generator_kind(v: Any) -> str:
    """"numpy Generator", "numpy RandomState", "numpy bit generator" or "random.Random" for
    a random generator object of the notebook's own (not a module's global one), else ""."""
    inst, _, _, legacy, kinds = _kinds()
    if v is inst or v is legacy:
        return ""
    cls = type(v)  # (its own type: isinstance asks a __class__ that may raise, or say Generator in a Mock)
    for t, words in kinds:
        if issubclass(cls, t):
            return words
    return ""


def _global_draw(value: Any, name: str, chains: frozenset[tuple[str, ...]]) -> str:
    """"random" or "numpy" when ``value``, the notebook's ``name`` the code reads
    (``chains``: the code's ``name.attr.attr`` look-ups), draws from that module's global
    state: a drawing function looked up on it (``random.random()``, ``np.random.rand()``),
    or such a function imported by itself (``from random import choice``)."""
    inst, np, npr, legacy, _ = _kinds()
    if type(value) is types.ModuleType:
        if value is random:
            return "random" if any(c[0] == name and len(c) > 1 and getattr(getattr(random, c[1], None), "__self__",
                                                                           None) is inst for c in chains) else ""
        at = 1 if value is npr else 2 if value is np and npr is not None else 0
        if at and legacy is not None and any(
                c[0] == name and len(c) > at and (at == 1 or c[1] == "random")
                and getattr(getattr(npr, c[at], None), "__self__", None) is legacy for c in chains):
            return "numpy"
        return ""
    owner = getattr(value, "__self__", None)  # (from random import choice: a bound method of random's instance)
    if owner is None:
        return ""
    return "random" if owner is inst else "numpy" if legacy is not None and owner is legacy else ""


_LOOKUPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF"})


def _chains(code: types.CodeType) -> frozenset[tuple[str, ...]]:
    """The ``name.attr.attr`` look-ups of ``code`` and the code nested in it: a name's
    load followed by attribute loads (``np.random.rand`` -> ``("np", "random", "rand")``)."""
    out: set[tuple[str, ...]] = set()
    for c in _codes(code):
        chain: list[str] = []
        for ins in dis.get_instructions(c):
            if ins.opname == "CACHE":
                continue
            if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and chain:
                chain.append(str(ins.argval))
                continue
            if len(chain) > 1:
                out.add(tuple(chain))
            chain = [str(ins.argval)] if ins.opname in _LOOKUPS else []
        if len(chain) > 1:
            out.add(tuple(chain))
    return frozenset(out)


def _uses_of(func: Any, found: list[RandomUse], seen: set, depth: int) -> None:
    if isinstance(func, functools.partial):
        if id(func) in seen or depth > 4:
            return
        seen.add(id(func))
        inner = func.func
        while isinstance(inner, functools.partial):
            inner = inner.func
        code = getattr(getattr(inner, "__func__", inner), "__code__", None)
        for k, v in [*enumerate(func.args), *(func.keywords or {}).items()]:
            kind = _generator_kind(v)
            if kind:  # (a generator bound as an argument: partial(f, rng=rng))
                found.append(RandomUse(func_name_of(inner), "generator", str(k), kind, True, code))
            elif callable(v) and not isinstance(v, type):  # (the accessor's task holds the user's function)
                _uses_of(v, found, seen, depth + 1)
        func = func.func
    owner = getattr(func, "__self__", None)
    if owner is not None and type(func) is not types.FunctionType and not isinstance(owner, types.ModuleType):
        kind = _generator_kind(owner)  # (pmap(rng.random, ...): the notebook's generator's own method)
        if kind:
            name = next((k for k, v in getattr(sys.modules.get("__main__"), "__dict__", {}).items()
                         if v is owner and not k.startswith("_")), "")
            method = func_name_of(func)  # (said as rng.random: "random" alone reads as the module)
            found.append(RandomUse(f"{name}.{method}" if name else method, "generator", name, kind,
                                   code=(id(owner), method)))
            return
    if isinstance(func, types.MethodType):
        if owner is not None and _notebook_class(type(owner)):  # (pmap(sim.step, ...): sim holds a generator)
            method = func.__name__
            name = next((k for k, v in getattr(sys.modules.get("__main__"), "__dict__", {}).items()
                         if v is owner and not k.startswith("_")), "")
            for attr, kind in _held_generators(owner, name, frozenset({(name, method)})):
                found.append(RandomUse(f"{name}.{method}" if name else method, "generator",
                                       f"{name}.{attr}" if name else attr, kind, code=func.__func__.__code__))
        func = func.__func__
    if type(func) is not types.FunctionType or id(func) in seen or depth > 4 or _by_reference(func):
        return
    seen.add(id(func))
    code = func.__code__
    positional = code.co_varnames[:code.co_argcount]
    defaults = [*zip(positional[len(positional) - len(func.__defaults__ or ()):], func.__defaults__ or (),
                     strict=True), *(func.__kwdefaults__ or {}).items()]
    for name, v in defaults:  # (def f(x, r=rng): the default goes with the function, a copy per worker)
        kind = _generator_kind(v) if type(v) not in _ATOMIC else ""
        if kind:
            found.append(RandomUse(func_name_of(func), "generator", name, kind, code=code, default=True))
    chains, reads = _read(code)
    values = [(n, func.__globals__.get(n, _MISSING)) for n in reads]
    for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=False):
        try:
            values.append((name, cell.cell_contents))
        except ValueError:
            continue
    for name, v in values:
        t = type(v)
        if t is types.FunctionType:
            _uses_of(v, found, seen, depth + 1)
            continue
        if t in _ATOMIC or t is type:  # (most of what code reads: nothing random about them)
            continue
        kind = _generator_kind(v)
        if kind:
            if not _only_tested(code, name):  # (``x if rng is None else ...``: nothing drawn)
                found.append(RandomUse(func_name_of(func), "generator", name, kind, code=code))
            continue
        held = _held_generators(v, name, chains)
        if held:  # (sim.step() drawing from sim.rng: a copy of the object, its generator too, per worker)
            found.extend(RandomUse(func_name_of(func), "generator", f"{name}.{attr}", kind, code=code)
                         for attr, kind in held)
            continue
        try:
            source = _global_draw(v, name, chains)
        except Exception:  # (a value whose __getattr__ raises: it draws nothing of random's or numpy's)
            continue
        if source and type(v) is not types.ModuleType:  # (from numpy.random import rand: a copy per worker)
            found.append(RandomUse(func_name_of(func), "generator", name, _STATE_WORDS[source], code=code,
                                   imported=True))
        elif source:  # (np.random.rand(): each worker's own global state)
            found.append(RandomUse(func_name_of(func), source, name, code=code))


_STATE_WORDS = {"random": "random's global state", "numpy": "numpy.random's global state"}


#: How many of an object's attributes the draws line looks at (bounded work per object).
_MAX_HELD = 64


def _notebook_class(cls: type) -> bool:
    """Whether ``cls`` was defined in the notebook (or the script run as ``__main__``):
    the objects the draws line looks into, one level (a library's are left alone)."""
    return type(cls.__dict__.get("__module__")) is str and cls.__dict__["__module__"] == "__main__"


def _held_generators(value: Any, name: str, chains: frozenset[tuple[str, ...]]) -> list[tuple[str, str]]:
    """``[(attribute, kind)]``: the generators ``value``, an instance of a notebook class the
    code reads as ``name``, holds one level down (its ``__dict__``, its ``__slots__``: the first
    :data:`_MAX_HELD`) that the code draws from: read as ``name.attr`` (``sim.rng.random()``),
    or named in a method it calls on it (``sim.step()``, whose code reads ``self.rng``). The
    object goes to each worker as a copy, its generator too, as a captured generator does.
    No code of the object runs (its type's and object's own dictionaries are read); never raises."""
    try:
        cls = type(value)
        if not _notebook_class(cls):
            return []
        used = {c[1] for c in chains if c[0] == name and len(c) > 1}
        if not used:
            return []
        items: list[tuple[str, Any]] = []
        try:
            own = object.__getattribute__(value, "__dict__")
        except AttributeError:
            own = None
        if type(own) is dict:
            for attr, v in own.items():
                if len(items) >= _MAX_HELD:
                    break
                items.append((attr, v))
        for klass in cls.__mro__[:8]:
            slots = klass.__dict__.get("__slots__", ())
            for attr in (slots,) if isinstance(slots, str) else slots if isinstance(slots, (tuple, list)) else ():
                slot = klass.__dict__.get(attr)
                if type(slot) is types.MemberDescriptorType and len(items) < _MAX_HELD:
                    try:
                        items.append((attr, slot.__get__(value, cls)))
                    except AttributeError:  # (a slot not set)
                        continue
        found = []
        for attr, v in items:
            if type(v) in _ATOMIC or not isinstance(attr, str):
                continue
            kind = _generator_kind(v)
            if kind and (attr in used or any(attr in _names_in(_static_function(cls, m)) for m in used)):
                found.append((attr, kind))
        return found
    except Exception:  # (advice only: an odd object says nothing)
        return []


def _static_function(cls: type, name: str) -> Any:
    """The function ``cls.name`` is (a method, a staticmethod's, a classmethod's, a property's
    getter), found in the classes' own dictionaries (no descriptor runs), or None."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            f = klass.__dict__[name]
            f = f.fget if isinstance(f, property) else getattr(f, "__func__", f)
            return f if type(f) is types.FunctionType else None
    return None


def _names_in(func: Any) -> frozenset[str]:
    """The names (attributes, globals) ``func``'s code and the code nested in it use."""
    if func is None:
        return frozenset()
    return _code_names(func.__code__)


@functools.lru_cache(maxsize=256)  # (a method called at each map: read once)
def _code_names(code: types.CodeType) -> frozenset[str]:
    return frozenset(n for c in _codes(code) for n in c.co_names)


# (what follows a load that only tests it against None: ``rng is None``, ``if rng is not None``)
_NONE_TESTS = ("IS_OP", "COMPARE_OP")


@functools.lru_cache(maxsize=256)  # (each call of a function that tests a generator: read once)
def _only_tested(code: types.CodeType, name: str) -> bool:
    """Whether each load of ``name`` in ``code`` (and the code nested in it) only tests it
    against None (``x if rng is None else x + 1``): a function reading the notebook's
    generator so draws nothing from it, the same serially and in the workers."""
    loads = 0
    for c in _codes(code):
        ins = [i for i in dis.get_instructions(c) if i.opname != "CACHE"]
        for k, one in enumerate(ins):
            if one.opname not in _LOOKUPS or one.argval != name:
                continue
            loads += 1
            after = ins[k + 1:k + 3]
            if after and after[0].opname.endswith(("IF_NONE", "IF_NOT_NONE")):
                continue
            if (len(after) == 2 and after[0].opname == "LOAD_CONST" and after[0].argval is None
                    and after[1].opname in _NONE_TESTS):
                continue
            return False
    return loads > 0


# (per code object: its look-up chains, and the globals it reads; kept as _code_changes is)
_code_reads: dict[types.CodeType, tuple[frozenset[tuple[str, ...]], tuple[str, ...]]] = {}


def _read(code: types.CodeType) -> tuple[frozenset[tuple[str, ...]], tuple[str, ...]]:
    """:func:`_chains` of ``code``, and the globals it reads (cloudpickle's list: those its
    payload captures), read once per code object."""
    got = _code_reads.get(code)
    if got is None:
        reads = tuple(_extract_code_globals(code)) if _extract_code_globals is not None else ()
        if len(_code_reads) >= _MAX_CODES:
            _code_reads.clear()
        _code_reads[code] = got = (_chains(code), reads)
    return got


#: The functions (their code) whose random draws were said (once each).
_said_draws: weakref.WeakSet[types.CodeType] = weakref.WeakSet()


#: A generator's own method given as the function (``pmap(rng.random, ...)``), said once:
#: ``(id(generator), method name)`` (a numpy generator cannot be weakly referenced).
_said_methods: set[Any] = set()


def _draws_said(code: Any) -> bool:
    """Whether the draws of the function ``code`` stands for were said already."""
    if isinstance(code, types.CodeType):
        return code in _said_draws
    return code is not None and code in _said_methods


def say_random_draws(func: Callable, workers: int | None, advised: bool, accessor: bool = False,
                     notes: dict | None = None) -> None:
    """One line, once per function: its random draws cannot mean what they mean serially
    (random23). A generator object it captures (``rng = np.random.default_rng(0)``) goes
    to each worker as a copy in the state of the call, so two workers drew the same
    numbers (serially: one stream, going on), silently. ``random``'s or numpy's global
    state is each worker's own: a seed the notebook set (``random.seed(0)``) reaches no
    worker, so the results differ from serial and from one run to the next, silently
    (said only once the notebook seeded that state; else serial draws are as unrepeatable).
    A drawing function imported from a global state (``from numpy.random import rand``) is
    a method of that state's object, which goes to each worker as a copy: said as a generator.
    ``workers``: those the run may use (None: the pool's). ``advised``: --compare's advice
    line says the results differ and why, already. ``accessor``: the pandas accessor's run
    (it has no seed=: the remedy is a generator seeded from what each call is given).
    ``notes``: the function's notes in the payload cache (``payload_cache.last_notes``: its
    fast check served this run, so the function and all it reads are the objects of the
    runs before): once a look found nothing drawn, with ``numpy.random`` as imported now
    (what numpy's global state and generator types are read from), the look is not made
    again (~200 bytecodes of every warm call)."""
    inner = func.func if isinstance(func, functools.partial) else func
    if not accessor and getattr(inner, "__module__", None) == "mpmagic.pandas_accessor":
        return  # (the accessor says it, with its own remedy: pandas_accessor._run)
    npr = sys.modules.get("numpy.random")
    if notes is not None and notes.get("draws", _MISSING) is npr:
        return  # (nothing drawn, found by a look at these very objects)
    found = random_uses(func)
    if notes is not None and not found:
        notes["draws"] = npr
    uses = [u for u in found if not _draws_said(u.code)]
    if not uses:
        return
    use = uses[0]
    if use.source == "generator":
        what = (f"{use.kind}, through `{use.name}` imported from it" if use.imported
                else f"the {use.kind} it is given as argument {use.name}" if use.argument
                else f"the {use.kind} its argument {use.name} defaults to" if use.default
                else f"the notebook's {use.kind} `{use.name}`" if use.name else f"the notebook's {use.kind} it is a "
                "method of")
        if workers is None:
            from . import pool

            workers = getattr(pool.current_pool(), "workers", 2)
        alike = "so workers draw the same numbers, and " if not isinstance(workers, int) or workers > 1 else ""
        line = (f"{use.func} draws from {what}: each worker draws from its own copy of it as it was at the call, "
                f"{alike}the notebook's does not move on (a next call draws the same numbers again)")
    else:
        seeded = notebook_seeded()
        use = next((u for u in uses if u.source in seeded), None)  # type: ignore[assignment]
        if use is None or advised:
            return
        state = "random's global state" if use.source == "random" else "numpy.random's global state"
        line = (f"{use.func} draws from {state}, which the notebook seeded: each worker draws from a state of "
                "its own, not the notebook's, so the numbers differ from a serial run's and from one run to the "
                "next, and the notebook's state does not move on")
    if isinstance(use.code, types.CodeType):
        _said_draws.add(use.code)
    elif use.code is not None:
        if len(_said_methods) > 1000:
            _said_methods.clear()
        _said_methods.add(use.code)
    remedy = ("seed a generator in the function from what it is given (np.random.default_rng of a row's or "
              "group's .name)" if accessor else "use --seed S (seed=S), and mpmagic.rng() for a Generator")
    sys.stderr.write(f"mpmagic: {line}; for draws that differ per item and repeat on any number of workers "
                     f"{remedy}\n")


#: The ``%%parallel`` cells (hashes of their text) whose draws were said (once each).
_said_cells: set[int] = set()


def say_cell_draws(code: str, namespace: Any) -> None:
    """One line, once per cell text: a ``%%parallel`` cell (``code``, reading the notebook's
    ``namespace``) draws what the cell run once per rank here would not. A generator the
    notebook made (``rng.random()``, also through a notebook function the cell calls, or a
    function imported from a global state, ``from numpy.random import rand``) goes to each
    rank as a copy in its state at the run: the ranks drew the same numbers, where the cell
    run here draws successive ones. ``random``'s or numpy's global state, which a notebook
    cell seeded (``random.seed(0)``): each rank draws from its worker's own state instead.
    Silently, both. Not said for a cell that seeds the state itself (``random.seed(rank)``)
    or makes its own generator; the caller skips it with ``--seed``. Advice only: it never raises."""
    try:
        key = hash(code)
        if key in _said_cells:
            return
        compiled = compile(code, "<cell>", "exec", dont_inherit=True)
        names = sorted(names_used(code))  # (the notebook's names it reads: not a rank's own, not attributes)
    except Exception:  # (not Python as written, an odd namespace: nothing said)
        return
    chains = _chains(compiled)
    line = _cell_copy_line(compiled, names, namespace, chains)
    if line is None:
        line = _cell_seeded_line(code, _loaded_names(compiled), namespace, chains)
    if line is None:
        return
    if len(_said_cells) > 1000:
        _said_cells.clear()
    _said_cells.add(key)
    sys.stderr.write(f"mpmagic: the cell draws from {line}; for draws that differ per rank and repeat use "
                     "--seed S" + (" and mpmagic.rng() for a Generator" if "copy" in line else "")
                     + " (each rank its own stream from S and its rank)\n")


def _cell_copy_line(compiled: types.CodeType, names: list[str], namespace: Any,
                    chains: frozenset[tuple[str, ...]]) -> str | None:
    """The line's words for a notebook generator the cell draws from (each rank a copy), or None."""
    for name in names:
        try:
            value = namespace.get(name, _MISSING)
            if value is _MISSING or type(value) in _ATOMIC or type(value) is type:
                continue
            if type(value) is types.FunctionType:  # (a notebook function the cell calls)
                use = next((u for u in random_uses(value) if u.source == "generator"), None)
                what = None if use is None else _copied_words(use)
            elif (kind := _generator_kind(value)) and not _only_tested(compiled, name):
                what = f"the notebook's {kind} `{name}`"
            elif held := _held_generators(value, name, chains):
                what = f"the notebook's {held[0][1]} `{name}.{held[0][0]}`"
            elif (source := _global_draw(value, name, chains)) and type(value) is not types.ModuleType:
                what = f"{_STATE_WORDS[source]}, through `{name}` imported from it"
            else:
                what = None
        except Exception:  # (a value whose __getattr__ raises: it draws nothing of ours to say)
            continue
        if what is not None:
            return (f"{what}: each rank draws from its own copy of it as it was at the run, so ranks draw the same "
                    "numbers, and the notebook's does not move on (a next run draws the same numbers again)")
    return None


def _copied_words(use: RandomUse) -> str | None:
    """What a notebook function draws from, in the cell's line: a generator it reads (as
    :func:`say_random_draws` says it), None for one given as an argument or a default
    (the cell's own call decides what it passes)."""
    if use.imported:
        return f"{use.kind}, through `{use.name}` imported from it"
    if use.argument or use.default or not use.name:
        return None
    return f"the notebook's {use.kind} `{use.name}`"


def _loaded_names(compiled: types.CodeType) -> list[str]:
    """The names the cell's code looks up as names (``random`` of ``import random`` in the
    cell too), not the attributes it reads (``rand`` of ``rs.rand()``, which is no draw
    from the global ``rand`` the notebook may have imported)."""
    return sorted({str(ins.argval) for c in _codes(compiled) for ins in dis.get_instructions(c)
                   if ins.opname in ("LOAD_NAME", "LOAD_GLOBAL")})


def _cell_seeded_line(code: str, names: list[str], namespace: Any, chains: frozenset[tuple[str, ...]]) -> str | None:
    """The line's words for a global state the notebook seeded that the cell draws from, or None."""
    seeded = notebook_seeded()
    if not seeded:
        return None
    if any(pattern.search(_code_only(code)) for pattern in _SEEDS.values()):
        return None  # (the cell seeds its own state: a rank draws what the cell run here would)
    modules = {"random": random, "np": sys.modules.get("numpy"), "numpy": sys.modules.get("numpy")}
    for name in names:
        try:
            value = namespace.get(name, _MISSING)
            if value is _MISSING:  # (``import random`` in the cell: the module it imports)
                value = modules.get(name)
            if value is None or type(value) in _ATOMIC:
                continue
            source = _global_draw(value, name, chains)
        except Exception:  # (a value whose __getattr__ raises: it draws nothing of random's or numpy's)
            continue
        if source in seeded:
            state = "random's global state" if source == "random" else "numpy.random's global state"
            return (f"{state}, which the notebook seeded: each rank draws from its worker's own state, not the "
                    "notebook's, so the numbers differ from the cell run once per rank here and from one run to "
                    "the next")
    return None


# A notebook cell that seeds random's or numpy's global state (not a %%pool setup or a
# %%parallel cell: those run in the workers). An argument is required: random.seed()
# reseeds from the OS, as unrepeatable as no seed.
_SEEDS = {
    "random": re.compile(r"(?<![\w.])random\.(?:seed\s*\(\s*[^)\s]|setstate\s*\()"),
    "numpy": re.compile(r"\b(?:np|numpy)\.random\.(?:seed\s*\(\s*[^)\s]|set_state\s*\()"),
    "both": re.compile(r"\b(?:set_seed|seed_everything|set_random_seed|seed_all)\s*\(\s*[^)\s]"),
}
_seed_scan: list[Any] = [None, 0, set()]  # [the shell, cells read, the states seeded so far]


def notebook_seeded() -> set[str]:
    """"random" and/or "numpy": the global states a cell of this IPython session seeded
    (``random.seed(0)``, ``np.random.seed(0)``, a library's ``set_seed(0)``), read from
    its input history, each cell once. Empty outside IPython (nothing is imported)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    cells = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None)
    if not isinstance(cells, list):
        return set()
    if _seed_scan[0] is not shell or _seed_scan[1] > len(cells):
        _seed_scan[:] = [shell, 0, set()]
    found: set[str] = _seed_scan[2]
    for cell in cells[_seed_scan[1]:]:
        if not isinstance(cell, str) or "seed" not in cell and "_state" not in cell:
            continue
        if cell.lstrip().startswith(("%%pool", "%%parallel")):
            continue
        code = _code_only(cell)
        for state, pattern in _SEEDS.items():
            if pattern.search(code):
                found.update(("random", "numpy") if state == "both" else (state,))
    _seed_scan[1] = len(cells)
    return found


def _code_only(cell: str) -> str:
    """``cell`` without its comments and strings (``# np.random.seed(0) was here`` seeds
    nothing); the cell as it is where it cannot be read as Python tokens (a ``!ls`` line)."""
    import io
    import tokenize

    skip = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    lines = cell.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    chars = list(cell)
    try:
        for t in tokenize.generate_tokens(io.StringIO(cell).readline):
            if t.type in skip:  # (blanked where it is, so the rest reads as it was written)
                for at in range(starts[t.start[0] - 1] + t.start[1], starts[t.end[0] - 1] + t.end[1]):
                    if chars[at] != "\n":
                        chars[at] = " "
    except Exception:  # (tokenize.TokenError, SyntaxError on 3.12+: a shell escape, an unclosed bracket)
        return cell
    return "".join(chars)
