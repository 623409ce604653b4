"""The function payload of a map, cached by function identity in the notebook.

Workers already cache a function payload by its content hash, so a repeated
call sends only the key. What remained per call was building the payload:
cloudpickle takes 50-100 us for a small function, and seconds for one that
captures a 200 MB dict. So the notebook remembers, per function object, the
payload it built last time and reuses it when a check proves that nothing the
payload depends on changed:

* **fast check, no pickling**: every object the payload captures (the
  globals its code names, closure cells, defaults, recursively through the
  notebook functions it calls) is the *same object* as last time and of a
  kind that cannot change in place (numbers, strings, tuples of those,
  functions, modules, importable classes). Same objects, immutable: same bytes.
* **otherwise** (it captures a list, dict, array, instance...: things that
  change in place), the function is pickled again, with large buffers out of
  band, and compared: the small pickle byte for byte, large buffers against
  the shared-memory copy the workers already map. Equal: the workers' copy is
  still right; no new segment, no new key, nothing sent again.

So a changed global is always seen by the next call, and a large captured
array is copied to shared memory once and sent to each worker once.

A payload this cache drops (the function defined again, a global it captures
rebound, the function collected) is retired: the backends tell their workers
to drop their loaded copies (:func:`retired_since`), each of which holds all
its function captured by value.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import itertools
import mmap
import operator
import sys
import threading
import time
import types
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import compat, payload, shm

#: What a cache of loaded functions keeps: each worker's (``worker._Worker.funcs``,
#: ``dask_tasks._funcs``) and this one, whose drops the workers follow
#: (:func:`retired_since`). Its most recent ``KEEP_FUNCTIONS`` at most; past the
#: cache's always-kept most recent ones (``KEEP_ALWAYS`` in a worker), only while
#: all its payloads come to ``KEEP_BYTES`` or less (see :func:`excess`). A notebook
#: cycling through 17 tiny functions sent and loaded each one again at every call
#: when a worker kept 16 (+0.3-0.5 ms a call); the bytes keep what big captured
#: globals cost a worker where 16 of them did.
KEEP_FUNCTIONS = 64
KEEP_ALWAYS = 16
KEEP_BYTES = 32 << 20
_MAX_ENTRIES = 32  # this cache's always-kept ones (it holds each payload's pickle)
_MISSING = object()
_EMPTY_CELL = object()
_ATOMIC = (int, float, complex, str, bytes, bool, type(None), range, type(Ellipsis))

# (cloudpickle's names, and those a %pmap line in the function reads, which the payload sends too)
_extract_code_globals = payload.code_globals if compat.cloudpickle_extract_code_globals() is not None else None
_should_pickle_by_reference = compat.cloudpickle_by_reference()


@dataclass(eq=False)
class _Entry:
    func: Any  # a weak reference to the function: the cache must not keep it (or what it captures) alive
    shared: bool
    captured: list | None  # the objects of the fast check, or None (always re-pickle)
    inband: bytes  # the pickle without its out-of-band buffers
    key: bytes
    data: bytes  # what workers get: the pickle, or a shared-memory envelope
    segment: shm.Segment | None = None  # our copy of captured arrays (not share() ones)
    refs: list | None = None  # where each large buffer lies
    # Weak references to the shared helpers (mpmagic.Value...) the pickle names:
    # each run reusing it must keep them alive (payload.keeping), as a run that
    # pickled it would. Weak, so the cache never keeps a helper the notebook dropped.
    kept: tuple = ()
    writable: bool = False  # shm.WRITABLE when built (the envelope says how workers map it)
    # Where the function reaches each array copied into ``segment`` (:class:`_Place`): the
    # next call that finds one gone from there (dropped, rebound, resized) drops the entry
    places: tuple = ()
    # id -> weakref.finalize of the copied arrays it found nowhere so (a DataFrame's
    # blocks): their death drops the entry (see _watch_arrays)
    watch: dict = field(default_factory=dict)
    retired: bool = False  # its key was given to the workers to drop already (see retired_since)
    # What a run's notes found looking at the function (``api``, ``draws``: nothing to say),
    # good while ``captured`` holds the same objects: handed to the runs it serves by the
    # fast check (:func:`last_notes`), emptied when ``captured`` is replaced.
    notes: dict = field(default_factory=dict)


_entries: OrderedDict[tuple[int, bool], _Entry] = OrderedDict()
_lock = threading.RLock()
# Entries whose function, or a captured array copied into their segment, was
# collected: dropped on the next call (never from the collector's thread).
_dead: list[tuple[int, bool]] = []
# The entries with places to look at (``_Entry.places``): each call looks (``_sweep``).
_watching: dict[tuple[int, bool], _Entry] = {}
stats = {"fast": 0, "same": 0, "built": 0}  # how calls were served (tests, benchmarks)
# The keys of the payloads dropped here, newest last, numbered (under ``_lock``):
# workers still holding one may let it go (see :func:`retired_since`). Bounded:
# a backend that missed some (it looked too late) leaves them to its workers' own limit.
_RETIRED_KEPT = 64
_retired: deque[tuple[int, bytes]] = deque(maxlen=_RETIRED_KEPT)
_retirements = itertools.count(1)
_last_retired = 0  # the number of the newest in ``_retired`` (0: none yet)
# Slots whose function was collected, appended by its weak reference's callback:
# their keys are retired at the backend's next look, before the entry is dropped
# (by the next call here: the function a run kept alive dies after it ended).
_died: list[tuple[int, bool]] = []
# How this thread's last call was served, for its run's report (see :func:`last_served`):
# ``served`` (how, bytes, segment name, the entry's notes when served by the fast check)
# and ``freed`` (seconds), one attribute each (a thread-local's attribute costs ~1 us to
# set: one per field was ~4 us a warm call).
_last = threading.local()
_NOT_SERVED = ("fast", 0, None, None)


def last_served() -> tuple[str, int]:
    """How this thread's last :func:`function_payload` was served, and how many
    bytes of captured arrays that took: ``("fast", 0)`` (nothing could have
    changed), ``("same", n)`` (pickled again and ``n`` bytes compared with the
    workers' shared-memory copy: unchanged) or ``("built", n)`` (``n`` bytes
    copied into shared memory). A job reads it right after building its
    payload, so that the report can say what the call spent there."""
    how, copies, _, _ = getattr(_last, "served", _NOT_SERVED)
    return how, copies


def last_freed() -> float:
    """Seconds this thread's last :func:`function_payload` spent freeing the copies of
    arrays the notebook dropped (``del G`` of a global another function captured: the
    entry is dropped, and its segment unlinked and unmapped, on the next call).
    Inside that call's time, but no cost of the function it prepared: the advice on
    preparing leaves it out (it blamed a 300 MB ``G`` freed on a function capturing
    nothing)."""
    return getattr(_last, "freed", 0.0)


def last_segment() -> str | None:
    """The name of the segment holding this thread's last :func:`function_payload`'s
    copy of its captured arrays, or None (none was copied). A pool stop unlinks it
    (``LocalBackend.stop``): a run whose payload was built before a stop from
    another thread checks it is still there before the run is handed over, and
    builds its payload again if not (``jobs.MapJob.payload_lost``)."""
    return getattr(_last, "served", _NOT_SERVED)[2]


def last_notes() -> dict | None:
    """The notes of the function this thread's last :func:`function_payload` served by
    the fast check (None: served otherwise): a dict the callers' looks at the function
    (``api``'s notes, ``draws``) keep what they found in, to skip the look at the next
    run it serves. Good for as long as the fast check serves it: the function and every
    object its payload depends on are the same objects, none of which can change in
    place (a new object, or a payload built again, starts a new dict)."""
    return getattr(_last, "served", _NOT_SERVED)[3]


def _served(how: str, copies: int, segment: shm.Segment | None, notes: dict | None = None) -> None:
    stats[how] += 1
    _last.served = (how, copies, segment.name if segment is not None else None, notes)


def function_payload(
    func: Any, shared: bool = False, what: str = "the function", hold: bool = False,
    kept: dict[int, Any] | None = None,
) -> tuple[bytes, bytes]:
    """``(key, payload)`` for ``func``: reused when unchanged, built when not.

    ``shared``: large buffers the function captures go into a shared-memory
    segment (only for workers on this machine), and file-backed memmaps it
    captures go by reference (``payload.memmaps_by_reference``).

    ``kept``: the run's dict of the shared helpers its payload names (see
    ``payload.keeping``), given those a pickling here found. (The caller's own
    ``keeping`` and ``memmaps_by_reference`` around this call cost four
    thread-local stores at each warm call, served without pickling: they are
    taken here, around the pickling alone.)

    ``hold``: the caller takes a reference on that segment (its name:
    :func:`last_segment`) and gives it back with ``shm.let_go(name)`` once
    the run that sends this payload is over. The cache may replace the entry
    meanwhile (another thread's first call of the same function, an array
    changed for the next call): the segment stays until the run lets go, since
    its workers attach to it by name as they start (a pool stop still unlinks
    it: see ``jobs.MapJob.payload_lost``).
    """
    payload.send_running_modules_by_value()  # (a %run -n script's functions: not imported again by workers)
    shared = shared and shm.ENABLED
    slot = (id(func), shared)
    held: str | None = None  # the segment this call holds for its caller (hold=True)
    with _lock:
        if _watching:
            _sweep(keep=slot)
        if _dead:  # (the copies of arrays the notebook dropped: timed apart, see last_freed)
            t0 = time.perf_counter()
            _drop_dead(keep=slot)
            _last.freed = time.perf_counter() - t0
        else:
            _last.freed = 0.0
        entry = _entries.get(slot)
        if entry is not None and (
            entry.func() is not func or not _segment_alive(entry) or entry.writable != shm.WRITABLE
        ):
            _drop(slot)
            entry = None
        if entry is not None:
            # The most recently used now, whichever way it is served (a payload built
            # again goes last too): one trip under the lock less for a warm call.
            _entries.move_to_end(slot)
            # Held before the lock goes: a thread replacing the entry from here on
            # cannot unlink the segment this call may serve (a stop can: payload_lost).
            if hold and entry.segment is not None and shm.pool().hold(entry.segment.name):
                held = entry.segment.name
    try:
        key, data, held = _serve(func, shared, what, slot, entry, held, hold, kept)
    except BaseException:
        if held is not None:
            shm.let_go(held)
        raise
    return key, data


def _serve(
    func: Any, shared: bool, what: str, slot: tuple[int, bool], entry: _Entry | None, held: str | None, hold: bool,
    keep: dict[int, Any] | None = None,
) -> tuple[bytes, bytes, str | None]:
    """:func:`function_payload`'s work once the entry is looked up: ``(key, payload,
    the segment now held for the caller)``; ``held`` is the one held so far."""
    captured = _capture(func)
    if (entry is not None and captured is not None and entry.captured is not None and _same(entry.captured, captured)
            and _keep_again(entry)):
        _served("fast", 0, entry.segment, entry.notes)
        return entry.key, entry.data, held

    collector = shm.Collector(lend=True) if shared else None
    found: dict[int, Any] = {}
    with payload.keeping(found), payload.memmaps_by_reference() if shared else contextlib.nullcontext():
        inband = payload.dumps_function(func, what, collector)
    kept: tuple = ()
    if found:  # (the run being built keeps them: see payload.keeping)
        if keep is not None:
            keep.update((id(h), h) for h in found.values())
        kept = tuple(weakref.ref(h) for h in found.values())
    buffers = collector.buffers if collector is not None else []
    if entry is not None and entry.inband == inband and _same_buffers(entry, buffers):
        _served("same", _copied_bytes(entry.segment, entry.refs), entry.segment)
        entry.captured, entry.kept = captured, kept
        entry.notes = {}  # (what was found of the objects it captured before: not of these)
        if entry.segment is not None:
            _watch_arrays(entry, slot, func, buffers)  # (the arrays may be new ones, equal to the old)
        with _lock:
            _entries.move_to_end(slot)
            _track(slot, entry)
        return entry.key, entry.data, held

    if held is not None:  # (the old entry's segment: not what this payload names)
        shm.let_go(held)
        held = None
    segment = refs = None
    data = inband
    if buffers:
        data, segment, refs = shm.wrap(inband, buffers, "lend")
    _served("built", _copied_bytes(segment, refs), segment)
    key = payload.payload_key(data)

    def forget(_ref: weakref.ref, slot: tuple[int, bool] = slot) -> None:
        _dead.append(slot)  # dropped on the next call (never from the collector's thread)
        _died.append(slot)  # (its key: for the workers, at the backend's next look)

    try:
        ref = weakref.ref(func, forget)
    except TypeError:  # builtins and the like: cheap to pickle, not cached
        if segment is not None and hold and shm.pool().hold(segment.name):
            held = segment.name  # (nobody else's: unlinked when the run lets go)
        return key, data, held
    new = _Entry(ref, shared, captured, inband, key, data, segment, refs, kept, shm.WRITABLE)
    if segment is not None:
        _watch_arrays(new, slot, func, buffers)
    with _lock:
        if segment is not None:
            shm.pool().hold(segment.name)  # the cache's reference (let go by _drop)
            if hold and shm.pool().hold(segment.name):
                held = segment.name
        _drop(slot)
        _entries[slot] = new
        _track(slot, new)
        for old in excess(_entries, _entry_bytes, _MAX_ENTRIES):
            _drop(old)
    return new.key, new.data, held


_K = TypeVar("_K")
_V = TypeVar("_V")


def excess(cache: OrderedDict[_K, _V], size: Callable[[_V], int], always: int = KEEP_ALWAYS) -> list[_K]:
    """The keys ``cache`` (least recently used first) must drop, oldest first, to keep
    at most ``KEEP_FUNCTIONS`` entries and, past its ``always`` most recent ones,
    ``KEEP_BYTES`` of ``size`` in all: many small functions all stay, and big ones
    (a worker's copy of each global captured by value) cost no more than the
    ``always`` most recent did when that was the only bound."""
    count = len(cache)
    if count <= always:
        return []
    total = sum(map(size, cache.values()))
    drop = []
    for key, value in cache.items():
        if count <= KEEP_FUNCTIONS and (count <= always or total <= KEEP_BYTES):
            break
        drop.append(key)
        count -= 1
        total -= size(value)
    return drop


def _entry_bytes(entry: _Entry) -> int:
    """What ``entry`` holds here: its payload, and its copies of captured arrays in shared memory."""
    inband = len(entry.inband) if entry.inband is not entry.data else 0
    return len(entry.data) + inband + _copied_bytes(entry.segment, entry.refs)


def _watch_arrays(entry: _Entry, slot: tuple[int, bool], func: Any, buffers: list) -> None:
    """Drop ``entry`` (and free its segment) once an array copied into it is gone.

    The function outlives its captured arrays in a notebook (``del A`` leaves
    ``f`` defined), and with it the entry: without this, a deleted 400 MB
    global kept its 400 MB copy in /dev/shm until the pool stopped. Each array
    that owns the memory (a view's base) is found again where the function
    reaches it (:class:`_Place`: the global ``A``, ``d["A"]``, ``obj.A``, a
    closure's or a default's), which each call looks at (``_sweep``): gone from
    there, or resized, the entry goes. No weak reference to the array: numpy
    refuses to resize an array one points to, refcheck or not ("cannot resize
    an array that references or is referenced by another object"), which broke
    ``A.resize(n)`` after a map. An array found nowhere so (a DataFrame's
    blocks, past ``_FIND_DEPTH`` steps) gets a ``weakref.finalize``, as all did;
    an owner that was gone by now (made while pickling) is not watched.
    """
    owners = {id(o): o for o in map(_owner, [b.obj for b in buffers])}  # (no loop variable keeps one)
    buffers.clear()
    if (entry.places or entry.watch) and set(owners) == {p.owner for p in entry.places}.union(entry.watch) and all(
            w.alive for w in entry.watch.values()) and all(_there(p, func) for p in entry.places):
        return  # (the same arrays, where they were: the warm call of a function that captures one)
    live = _still_alive(owners)
    places = _find_places(func, live)
    watch = {}
    for key, owner in live.items():
        if key not in places:
            with contextlib.suppress(TypeError):  # (cannot be watched: freed with the function, as before)
                watch[key] = weakref.finalize(owner, _dead.append, slot)
    for old in entry.watch.values():
        old.detach()
    entry.places, entry.watch = tuple(places.values()), watch


def _still_alive(owners: dict[int, Any]) -> dict[int, Any]:
    """``owners`` (emptied) less those only it held (a copy made while pickling).

    Told by weak references dropped before this returns (numpy refuses to resize
    an array only while one exists); one that takes none counts as alive (found
    again, or not watched)."""
    refs = [_weak(o) for o in owners.values()]
    owners.clear()
    return {id(o): o for o in (ref() for ref in refs) if o is not None}


def _weak(obj: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _track(slot: tuple[int, bool], entry: _Entry) -> None:
    """Let each call look at ``entry``'s places if it is the cache's entry for ``slot`` (under ``_lock``)."""
    if entry.places and _entries.get(slot) is entry:
        _watching[slot] = entry
    elif _watching.get(slot) is entry:
        del _watching[slot]


def _owner(obj: Any) -> Any:
    """The array that owns ``obj``'s memory: a numpy view's base, its base's...; else ``obj``."""
    while getattr(obj, "base", None) is not None and type(obj.base) is type(obj):
        obj = obj.base
    return obj


# --------------------------------------------------------------------------
# Where a function reaches the arrays it captures: found once, looked at each call

#: The steps from a function to a captured array the cache looks for (``d["a"]`` of a
#: global ``d``: 2), the objects it visits at most, and the largest container it looks
#: in. Past them the array is watched by a weak reference (see _watch_arrays).
_FIND_DEPTH = 6
_FIND_VISITS = 10_000
_FIND_ITEMS = 10_000

#: A step of a :class:`_Place`: an object of this type gives the next one as ``get(obj, key)``.
#: The ``get`` are C functions (getattr, operator.getitem, object.__getattribute__): a
#: global's place is looked at in well under a microsecond, at each call (see _sweep).
_Step = tuple[type, Callable[[Any, Any], Any], Any]
_getitem = operator.getitem
_getattr_plain = object.__getattribute__  # (an object's __dict__: no __getattr__ of the user's)


def _class(obj: Any, _: Any) -> Any:
    return type(obj)  # (a notebook class goes by value with its instances: its attributes too)


def _slot(obj: Any, member: Any) -> Any:
    return member.__get__(obj)  # (the slot itself: no __getattribute__ of the user's)


@dataclass(frozen=True)
class _Place:
    """Where a function reaches an array copied into its entry's segment: ``steps`` from
    the function to an object of type ``kind`` whose memory belongs to the array
    ``owner`` (its id; ``nbytes``: its size then)."""

    steps: tuple[_Step, ...]
    kind: type
    owner: int
    nbytes: int | None


def _there(place: _Place, func: Any) -> bool:
    """Does ``func`` still reach the same array, of the same size, at ``place``?

    By identity (an ``id``, as the array is not held: a new array there that took
    its address counts as it; the function's next call compares its bytes anyway).
    Each step checks the type it was found with, so no code of the user's runs here
    (an item of a dict, list or tuple, an attribute from an object's ``__dict__``)."""
    obj = func
    try:
        for kind, get, key in place.steps:
            if type(obj) is not kind:
                return False
            obj = get(obj, key)
    except Exception:  # (a name deleted, an item popped, a list shortened)
        return False
    if type(obj) is not place.kind:
        return False
    owner = _owner(obj)
    return id(owner) == place.owner and getattr(owner, "nbytes", None) == place.nbytes


def _sweep(keep: tuple[int, bool] | None = None) -> None:
    """Mark dead (``_dead``) each entry whose function no longer reaches one of its copied
    arrays where it did: ``del A``, ``A = ...``, ``d.pop("A")``, ``A.resize(n)``
    (under ``_lock``). ``keep``: the slot of the function being called now, which
    looks at its own arrays (its payload pickled again: see _watch_arrays)."""
    for slot, entry in _watching.items():
        if slot != keep:
            func = entry.func()
            for place in entry.places:
                if func is None or not _there(place, func):
                    _dead.append(slot)
                    break


def _find_places(func: Any, owners: dict[int, Any]) -> dict[int, _Place]:
    """Where ``func`` reaches each of ``owners`` (arrays by id), breadth first: its globals,
    closure, defaults, the notebook functions it names, dicts, lists and tuples, objects'
    attributes (``__dict__``, ``__slots__``) and their notebook classes'; within
    ``_FIND_DEPTH`` steps and ``_FIND_VISITS`` objects (at each payload built, and at a
    warm call whose arrays are new ones)."""
    found: dict[int, _Place] = {}
    if not owners or _extract_code_globals is None:
        return found
    kinds = {type(o) for o in owners.values()}
    seen = {id(func)}
    level: list[tuple[tuple[_Step, ...], Any]] = [((), func)]
    visits = 0
    try:
        for _ in range(_FIND_DEPTH):
            following = []
            for steps, obj in level:
                for step, child in _children(obj):
                    t = type(child)
                    if t in _ATOMIC or id(child) in seen:
                        continue
                    seen.add(id(child))
                    path = steps + step
                    if t in kinds:
                        owner = _owner(child)
                        if id(owner) in owners and id(owner) not in found:
                            found[id(owner)] = _Place(path, t, id(owner), getattr(owner, "nbytes", None))
                            if len(found) == len(owners):
                                return found
                        continue
                    visits += 1
                    if visits > _FIND_VISITS:
                        return found
                    following.append((path, child))
            level = following
    except Exception:  # (a container changed by another thread meanwhile: those found so far)
        pass
    return found


def _children(obj: Any) -> Iterator[tuple[tuple[_Step, ...], Any]]:
    """``(steps, child)`` of what ``obj``'s pickle holds (see :class:`_Place`)."""
    t = type(obj)
    if t is types.FunctionType:
        if _by_reference(obj):
            return
        assert _extract_code_globals is not None  # (_find_places checks it first)
        g = obj.__globals__
        for name in _extract_code_globals(obj.__code__):
            v = g.get(name, _MISSING)
            if v is not _MISSING:
                yield ((t, getattr, "__globals__"), (dict, _getitem, name)), v
        for i, cell in enumerate(obj.__closure__ or ()):
            with contextlib.suppress(ValueError):  # (an empty cell)
                yield ((t, getattr, "__closure__"), (tuple, _getitem, i),
                       (types.CellType, getattr, "cell_contents")), cell.cell_contents
        for i, v in enumerate(obj.__defaults__ or ()):
            yield ((t, getattr, "__defaults__"), (tuple, _getitem, i)), v
        for name, v in (obj.__kwdefaults__ or {}).items():
            yield ((t, getattr, "__kwdefaults__"), (dict, _getitem, name)), v
        for name, v in obj.__dict__.items():
            yield ((t, getattr, "__dict__"), (dict, _getitem, name)), v
    elif t is types.MethodType:
        yield ((t, getattr, "__self__"),), obj.__self__
        yield ((t, getattr, "__func__"),), obj.__func__
    elif t is functools.partial:
        yield ((t, getattr, "func"),), obj.func
        for i, v in enumerate(obj.args):
            yield ((t, getattr, "args"), (tuple, _getitem, i)), v
        for name, v in obj.keywords.items():
            yield ((t, getattr, "keywords"), (dict, _getitem, name)), v
    elif t is dict:
        if len(obj) <= _FIND_ITEMS:
            for key, v in list(obj.items()):
                if type(key) in _ATOMIC or (type(key) is tuple and all(type(k) in _ATOMIC for k in key)):
                    yield ((t, _getitem, key),), v  # (not a key of the user's type: no __eq__ of theirs each call)
    elif t is list or t is tuple:
        if len(obj) <= _FIND_ITEMS:
            for i, v in enumerate(list(obj)):
                yield ((t, _getitem, i),), v
    elif t is not types.ModuleType and not (isinstance(obj, type) and _by_reference(obj)):
        try:
            attrs = _getattr_plain(obj, "__dict__")
        except Exception:  # (no __dict__: an array, a builtin, slots)
            attrs = None
        if type(attrs) in (dict, types.MappingProxyType) and len(attrs) <= _FIND_ITEMS:
            for name, v in list(attrs.items()):
                if type(name) is str:
                    yield ((t, _getattr_plain, "__dict__"), (type(attrs), _getitem, name)), v
        if not isinstance(obj, type):
            for cls in t.__mro__:
                for member in list(vars(cls).values()):
                    if type(member) is types.MemberDescriptorType:  # (a __slots__ name)
                        with contextlib.suppress(AttributeError):  # (not set)
                            yield ((t, _slot, member),), member.__get__(obj)
            yield ((t, _class, None),), t


def _drop_dead(keep: tuple[int, bool] | None = None) -> None:
    """Drop the entries whose function or watched array was collected (under ``_lock``).

    ``keep``: the slot of the function being called now; it is checked by the
    call itself (an equal new array reuses its segment, a changed one replaces it).
    """
    while _dead:
        slot = _dead.pop()
        entry = _entries.get(slot)
        if entry is not None and (slot != keep or entry.func() is None):
            _drop(slot)
    _died.clear()  # (their entries are dropped, and so retired: see retired_since)


def release_dead() -> None:
    """Free the shared-memory copies of arrays the notebook dropped (``%pool`` calls it)."""
    with _lock:
        _sweep()
        _drop_dead()


def clear() -> None:
    """Forget every cached payload (and free their shared-memory copies)."""
    with _lock:
        for slot in list(_entries):
            _drop(slot)


def _drop(slot: tuple[int, bool]) -> None:
    entry = _entries.pop(slot, None)
    if entry is None:
        return
    for watch in entry.watch.values():
        watch.detach()
    if _watching.get(slot) is entry:
        del _watching[slot]
    if entry.segment is not None:
        shm.let_go(entry.segment.name)  # (unlinked now, or when the last run naming it ends: SegmentPool.hold)
    if not entry.retired:
        _retire(entry)


def _retire(entry: _Entry) -> None:
    """Put ``entry``'s key in the log of retired payloads (under ``_lock``)."""
    global _last_retired
    entry.retired = True
    _last_retired = next(_retirements)
    _retired.append((_last_retired, entry.key))


def last_retired() -> int:
    """The number of the last payload this cache dropped (0: none yet)."""
    return _last_retired


def news(seen: int) -> bool:
    """Has a payload been dropped, or a cached function died, since number ``seen``
    (a number :func:`retired_since` returned)? Cheap, with no lock: a backend
    asks it at every step."""
    return _last_retired != seen or bool(_died)


def retired_since(seen: int) -> tuple[list[bytes], int]:
    """The keys of the payloads dropped after number ``seen`` that no cached
    payload of a live function has now, and the number of the last one.

    A payload is dropped when its function was defined again, a global it
    captures was rebound or changed, or the function was collected: each
    worker holds its own loaded copy of what the function captured (a 100 MB
    table, once per worker per version), which nothing will use again. The
    backends tell their workers to drop these (``protocol.Forget``). A key
    dropped and then built again (a cell re-run unchanged: equal bytes) is
    left out; a run in flight that still names one sends it again with its
    next chunk (a worker that lacks it answers ``Missing``). A collected function's key is
    retired here at once; its entry (and shared-memory copy) goes at the
    next call, in the caller's thread, as before."""
    with _lock:
        while _died:
            entry = _entries.get(_died.pop())
            if entry is not None and not entry.retired and entry.func() is None:
                _retire(entry)
        keys = [key for n, key in _retired if n > seen]
        if keys:
            live = {e.key for e in _entries.values() if not e.retired}
            keys = [key for key in dict.fromkeys(keys) if key not in live]
        return keys, _last_retired


def _keep_again(entry: _Entry) -> bool:
    """Hand the helpers the entry's pickle names to the run being built; False
    if one is gone (the payload would name a released helper: build it again)."""
    if not entry.kept:
        return True
    helpers = [ref() for ref in entry.kept]
    if any(h is None for h in helpers):
        return False
    payload.keep_all(helpers)
    return True


def _segment_alive(entry: _Entry) -> bool:
    return entry.segment is None or entry.segment.name in shm.pool().live


def _same_buffers(entry: _Entry, buffers: list) -> bool:
    if not entry.refs:
        return not buffers
    return shm.same_buffers(entry.segment, entry.refs, buffers)


def _copied_bytes(seg: shm.Segment | None, refs: list | None) -> int:
    """Bytes of a payload's captured arrays that lie in its own segment ``seg`` (copies,
    compared on each check), not in share() arrays (compared by address only)."""
    return sum(n for name, _size, _offset, n in refs or () if seg is not None and name == seg.name)


def _same(old: list, new: list) -> bool:
    return len(old) == len(new) and all(map(operator.is_, old, new))  # (in C: no frame per object)


# --------------------------------------------------------------------------
# What makes a check slow: the large things a function captures, by name


def large_captures(func: Any, minimum: int = 1 << 20) -> list[tuple[str, int, str]]:
    """``(name, bytes, kind)`` of the globals and closure variables ``func``'s code
    names (and those of the notebook functions it names) holding ``minimum`` bytes
    or more of array data, largest first; ``kind``: ``"array"``, ``"dict"`` (of
    arrays), ``"dataframe"`` or ``"other"``. For the advice that names what each
    call checks: sizes are read (``nbytes``), nothing is pickled; share() arrays
    count nothing (they are compared by address)."""
    found: dict[str, tuple[int, str]] = {}
    try:
        _named(func, found, set(), 0)
    except Exception:  # (advice only: whatever was found so far)
        pass
    big = [(name, n, kind) for name, (n, kind) in found.items() if n >= minimum]
    return sorted(big, key=lambda t: -t[1])


def _named(f: Any, found: dict, seen: set, depth: int) -> None:
    if type(f) is functools.partial:
        f = f.func
    if type(f) is types.MethodType:
        f = f.__func__
    if type(f) is not types.FunctionType or id(f) in seen or depth > 4 or _by_reference(f):
        return
    seen.add(id(f))
    names = list(_extract_code_globals(f.__code__)) if _extract_code_globals is not None else []
    values = [(n, f.__globals__.get(n, _MISSING)) for n in names]
    for name, cell in zip(f.__code__.co_freevars, f.__closure__ or (), strict=False):
        try:
            values.append((name, cell.cell_contents))
        except ValueError:
            continue
    for name, v in values:
        if type(v) is types.FunctionType:
            _named(v, found, seen, depth + 1)
            continue
        n, kind = _array_bytes(v, 0)
        if n and name not in found:
            found[name] = (n, kind)


def _in_shared_array(a: Any) -> bool:
    """Does numpy array ``a`` start inside a :func:`mpmagic.share` array, or an
    ``mpmagic.Array``'s data (sent by reference: ``payload.helper_reference``)?"""
    try:
        start = int(a.__array_interface__["data"][0])
    except Exception:
        return False
    return shm.shared_place(start) is not None or payload.in_helper_memory(start)


def _array_bytes(v: Any, depth: int) -> tuple[int, str]:
    """Bytes of array data in ``v`` (an array, a DataFrame or Series, a dict, list or
    tuple of them), without share() arrays; and what ``v`` is."""
    t = type(v)
    if t.__module__ == "numpy" and t.__name__ in ("ndarray", "memmap"):
        if t.__name__ == "memmap" or _in_shared_array(v):
            return 0, "array"  # (a memmap goes by its file; a share() array by reference)
        return int(v.nbytes), "array"
    if t.__module__.startswith("pandas") and t.__name__ in ("DataFrame", "Series"):
        usage = v.memory_usage(index=True, deep=False)
        return int(usage.sum() if t.__name__ == "DataFrame" else usage), "dataframe"
    if depth < 2 and t in (dict, list, tuple):
        values = v.values() if t is dict else v
        if len(values) > 10_000:
            return 0, "other"
        total = sum(_array_bytes(x, depth + 1)[0] for x in values)
        return total, "dict" if t is dict else "other"
    return 0, "other"


# --------------------------------------------------------------------------
# The fast check: what a payload captures, if all of it is immutable


def _capture(func: Any) -> list | None:
    """Every object ``func``'s payload depends on, or None if one may change in place."""
    if _extract_code_globals is None:
        return None
    objs: list = []
    try:
        # objs[0] is func itself: left out, the cache holds it only weakly
        return objs[1:] if _ok(func, objs, set(), 0) else None
    except Exception:  # anything odd: take the safe path
        return None


def _by_reference(obj: Any) -> bool:
    """Pickled by name (an importable module's function or class), not by value?"""
    if _should_pickle_by_reference is None:
        return False
    if type(obj) is types.FunctionType and obj.__module__ == "__main__":
        return False  # (a notebook's function: cloudpickle's answer, without its look-ups, at each call)
    try:
        return bool(_should_pickle_by_reference(obj))
    except Exception:
        return False


def _ok(v: Any, objs: list, seen: set, depth: int) -> bool:
    objs.append(v)
    t = type(v)
    if t in _ATOMIC:
        return True
    if depth > 12:
        return False
    if t is tuple or t is frozenset:
        return len(v) <= 256 and all(_ok(x, objs, seen, depth + 1) for x in v)
    if t is slice:  # (immutable, but its start, stop and step may be any object: ``slice(0, [1])``)
        return all(_ok(x, objs, seen, depth + 1) for x in (v.start, v.stop, v.step))
    if t is types.ModuleType:
        # An imported module goes by name. One built in the notebook
        # (types.ModuleType("cfg")) goes by value, and its attributes change
        # in place: compare its bytes like any mutable capture.
        return _by_reference(v)
    if t is types.BuiltinFunctionType:
        return isinstance(v.__self__, (types.ModuleType, type(None)))
    if isinstance(v, type):
        return _by_reference(v)
    if t is types.FunctionType:
        return _function_ok(v, objs, seen, depth)
    if t is functools.partial:
        return not v.keywords and _ok(v.func, objs, seen, depth + 1) and _ok(v.args, objs, seen, depth + 1)
    return False


def _function_ok(f: types.FunctionType, objs: list, seen: set, depth: int) -> bool:
    if id(f) in seen:
        return True
    seen.add(id(f))
    if _by_reference(f):
        return True
    if f.__dict__ or f.__kwdefaults__:
        return False
    objs += [f.__code__, f.__name__, f.__qualname__, f.__module__, f.__globals__]
    if f.__defaults__ is not None and not _ok(f.__defaults__, objs, seen, depth + 1):
        return False
    for cell in f.__closure__ or ():
        try:
            v = cell.cell_contents
        except ValueError:
            objs.append(_EMPTY_CELL)
            continue
        if not _ok(v, objs, seen, depth + 1):
            return False
    g = f.__globals__
    assert _extract_code_globals is not None  # (_capture checks it first)
    for name in _extract_code_globals(f.__code__):
        v = g.get(name, _MISSING)
        if v is _MISSING:
            objs.append(v)
        elif not _ok(v, objs, seen, depth + 1):
            return False
    return True


# --------------------------------------------------------------------------
# In the worker: may a loaded function be reused by a later call as it is?

# Bytecode that changes state kept between calls: a global, or a closure cell.
_STATE_OPS = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL", "STORE_DEREF", "DELETE_DEREF"})
_STATE_OPCODES = frozenset(dis.opmap[name] for name in _STATE_OPS)


def stateless(func: Any) -> bool:
    """True if no task can change state that a later call of ``func`` would see.

    A worker keeps a loaded function by its content key. A task may change what
    that object holds: a global it assigns (``global TOTAL``), a mutable default
    (``seen=[]``), the object a bound method belongs to. Each call must start
    from the notebook's state, so such a function is loaded again from its bytes
    for each new call. This proves the opposite, cheaply, once per load: the
    function is pickled by reference (its module's state is the worker's world,
    as with ``Pool(fork)``), or everything it captures is immutable (the fast
    check's kinds, :func:`_capture`) and no code reached assigns a global or a
    captured cell. Anything unproven counts as stateful (it is reloaded: slower,
    never wrong).
    """
    if type(func) is types.FunctionType and _by_reference(func):
        return True
    captured = _capture(func)
    if captured is None:
        return False
    try:
        return not any(_writes_state(c) for c in captured if type(c) is types.CodeType)
    except Exception:  # anything odd: take the safe path
        return False


def _writes_state(code: types.CodeType) -> bool:
    """Does ``code`` (or code nested in it) assign a global or a cell it did not make?

    A cell variable of the code itself (a local a nested lambda reads) is made
    afresh by each invocation: assigning it is no state. A nested function's
    free variable may be its parent's local, but is counted (safe side).
    """
    # (co_code has its inline caches zeroed: opcodes are the even bytes. Most
    # code has none of these, and is not decoded at all.)
    if not _STATE_OPCODES.isdisjoint(code.co_code[::2]):
        local = set(code.co_cellvars) - set(code.co_freevars)
        for ins in dis.get_instructions(code):
            if ins.opname in _STATE_OPS and not (ins.opname == "STORE_DEREF" and ins.argval in local):
                return True
    return any(_writes_state(c) for c in code.co_consts if type(c) is types.CodeType)


# --------------------------------------------------------------------------
# An iterator a task advances (``ids = itertools.count()``, ``next(ids)`` in the function):
# each worker gets a copy in its state at the call and advances that one, so two workers
# give the same values (serially: one iterator, going on), and the notebook's never moves.


@dataclass(frozen=True)
class IteratorUse:
    """``func`` (its name) reads ``name``, an iterator of the notebook's (``closure``: of its
    closure), of the type ``kind`` (``itertools.count``, ``list_iterator``)."""

    func: str
    name: str
    kind: str
    closure: bool = False

    def words(self) -> str:
        """``f advances the notebook's iterator `ids` (an itertools.count)``."""
        whose = f"the iterator `{self.name}` of its closure" if self.closure else f"the notebook's iterator `{self.name}`"
        article = "an" if self.kind[:1] in "aeiou" else "a"
        func = "the lambda" if self.func == "<lambda>" else self.func  # (as changes_words says it)
        return f"{func} advances {whose} ({article} {self.kind})"


def iterators_advanced(func: Any) -> list[IteratorUse]:
    """The iterators ``func`` captures (globals its code names, its closure), and those the
    notebook functions it calls capture, a few levels down: reading one advances it. Not a
    generator or a file (those cannot be sent: their own error says so). Never raises (advice only)."""
    found: list[IteratorUse] = []
    try:
        _iterators_of(func, found, set(), 0)
    except Exception:  # (advice only: nothing odd may break a run)
        return []
    return list(dict.fromkeys(found))


def iterator_kind(value: Any) -> str | None:
    """``itertools.count``, ``list_iterator``: the type of ``value`` when it is an iterator
    a task's copy of which advances apart from the notebook's; else None. Not a
    generator or a file (those cannot be sent: their own error says so), nor ours."""
    t = type(value)
    if (not hasattr(t, "__next__") or getattr(t, "__iter__", None) is None or isinstance(value, type)
            or isinstance(value, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType))
            or hasattr(value, "fileno") or t.__module__.startswith("mpmagic")):
        return None
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _iterators_of(func: Any, found: list[IteratorUse], seen: set, depth: int) -> None:
    if isinstance(func, functools.partial):
        func = func.func
    if isinstance(func, types.MethodType):
        func = func.__func__
    if type(func) is not types.FunctionType or id(func) in seen or depth > 4 or _by_reference(func):
        return
    seen.add(id(func))
    code = func.__code__
    named: list[tuple[str, Any, bool]] = []
    for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=False):
        try:
            named.append((name, cell.cell_contents, True))
        except ValueError:  # (an empty cell)
            continue
    if _extract_code_globals is not None:
        named += [(name, func.__globals__.get(name, _MISSING), False) for name in _extract_code_globals(code)]
    for name, value, closure in named:
        kind = iterator_kind(value)
        if kind is not None:
            found.append(IteratorUse(func.__name__, name, kind, closure))
        elif type(value) is types.FunctionType:
            _iterators_of(value, found, seen, depth + 1)


def state_words(func: Any) -> str | None:
    """The state ``func`` visibly changes, in words, or None: for the advice on
    results that differ from serial (``--compare``).

    Read from its code and defaults, and those of the notebook functions it
    calls: globals it assigns (``global TOTAL``), cells it assigns
    (``nonlocal n``), a list, dict or set default (``seen=[]``), the
    attributes a bound method's code sets (``self.n += x``), and the iterators
    it reads (``next(ids)``: :func:`iterators_advanced`).
    """
    found: list[str] = []
    try:
        _state_of(func, found, set(), 0)
    except Exception:  # (advice only: nothing odd may break a run)
        return None
    found += [use.words() for use in iterators_advanced(func)]
    return ", ".join(dict.fromkeys(found)) or None


def _state_of(func: Any, found: list[str], seen: set, depth: int) -> None:
    if isinstance(func, functools.partial):
        func = func.func
    bound = None
    if isinstance(func, types.MethodType) and not isinstance(func.__self__, (type, types.ModuleType)):
        bound, func = func.__self__, func.__func__
    if type(func) is not types.FunctionType or id(func) in seen or depth > 4 or _by_reference(func):
        return
    seen.add(id(func))
    code = func.__code__
    for name, value in [*zip(code.co_varnames[code.co_argcount - len(func.__defaults__ or ()):code.co_argcount],
                             func.__defaults__ or (), strict=False),
                        *(func.__kwdefaults__ or {}).items()]:
        if isinstance(value, (list, dict, set, bytearray)):
            found.append(f"its default {name} (a {type(value).__name__}) keeps what tasks add")
    for c in _codes(code):
        for ins in dis.get_instructions(c):
            if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                found.append(f"{func.__name__} assigns the global {ins.argval}")
            elif ins.opname == "STORE_DEREF" and ins.argval in c.co_freevars:
                found.append(f"{func.__name__} assigns the nonlocal {ins.argval}")
            elif bound is not None and c is code and ins.opname == "STORE_ATTR":
                found.append(f"the method of a {type(bound).__name__} object sets .{ins.argval}")
    if _extract_code_globals is not None:
        for name in _extract_code_globals(code):
            _state_of(func.__globals__.get(name), found, seen, depth + 1)


# --------------------------------------------------------------------------
# A task that changes a notebook list, set or dict it captures (``results.append(x)``,
# ``seen.add(k)``, ``d[k] = v``) changes its worker's copy only: the notebook's stays as
# it was, and a later item sees only what its own worker's items added. Read from the
# code (tutorial22 #2): the names a load of which is followed by a mutating method, or
# is the container of a subscript store or delete; only globals and the function's own
# free variables (a local is LOAD_FAST: never one of them).

#: The methods that change a container of each type in place.
_MUTATORS: dict[type, frozenset[str]] = {
    list: frozenset({"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse"}),
    set: frozenset({"add", "update", "discard", "remove", "pop", "clear", "difference_update",
                    "intersection_update", "symmetric_difference_update"}),
    dict: frozenset({"update", "setdefault", "pop", "popitem", "clear"}),
    bytearray: frozenset({"append", "extend", "insert", "pop", "remove", "clear", "reverse"}),
    deque: frozenset({"append", "appendleft", "extend", "extendleft", "pop", "popleft", "remove", "clear",
                      "rotate"}),
}
_ANY_MUTATOR = frozenset().union(*_MUTATORS.values())
_NAME_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF"})
# LOAD_GLOBAL's arg holds a "push a NULL too" bit from 3.11 on (a function about to be
# called); on 3.10 it is the name's number alone, whose low bit means nothing.
_GLOBAL_NULL_BIT = 1 if sys.version_info >= (3, 11) else 0
# (pops, pushes) of the instructions a subscript's key may be made of (3.10-3.14); any
# other between the container's load and the store makes the check give up (says nothing).
_KEY_OPS: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "LOAD_CONST", "LOAD_SMALL_INT",
                     "LOAD_DEREF", "LOAD_NAME", "LOAD_CLASSDEREF"), (0, 1)),
    **dict.fromkeys(("LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW_LOAD_FAST_BORROW"), (0, 2)),
    **dict.fromkeys(("BINARY_OP", "BINARY_SUBSCR", "COMPARE_OP", "IS_OP", "CONTAINS_OP"), (2, 1)),
    "BINARY_SLICE": (3, 1),
    **dict.fromkeys(("UNARY_NEGATIVE", "UNARY_NOT", "UNARY_INVERT", "TO_BOOL"), (1, 1)),
    **dict.fromkeys(("NOP", "CACHE", "EXTENDED_ARG", "RESUME", "NOT_TAKEN"), (0, 0)),
    # (Python 3.10: an operator of its own per operation, BINARY_OP's from 3.11 on)
    **dict.fromkeys([f"{kind}_{op}" for kind in ("BINARY", "INPLACE") for op in (
        "ADD", "SUBTRACT", "MULTIPLY", "MATRIX_MULTIPLY", "TRUE_DIVIDE", "FLOOR_DIVIDE", "MODULO", "POWER",
        "LSHIFT", "RSHIFT", "AND", "OR", "XOR")], (2, 1)),
    "UNARY_POSITIVE": (1, 1),
}
# What each code object read changes (a plain dict: a weak one's look-up made a weak reference
# each time, ~0.4 us of every map call; the code objects it keeps are dropped past _MAX_CODES).
_code_changes: dict[types.CodeType, tuple[tuple[str, str], ...]] = {}
_MAX_CODES = 1024


@dataclass(frozen=True)
class ContainerChange:
    """A function's code changes state the notebook holds: ``func`` (its name) does
    ``how`` (``results.append``, ``d[...] =``, ``TOTAL +=``, ``self.n +=``) to ``name``,
    of a ``kind`` ("list", "int", a class's name). ``where`` it lives: "global" (the
    notebook's), "closure" (a variable of the function's closure), "default" (a default
    argument's value), "object" (the object a bound method or callable instance is
    called on; ``name`` the notebook's variable holding it, or "")."""

    func: str
    name: str
    kind: str
    how: str
    where: str = "global"


def container_changes(func: Any, kinds: tuple[type, ...] | None = None, *, deep: bool = True) -> list[ContainerChange]:
    """The captured lists, sets, dicts, bytearrays and deques ``func`` changes in place
    (and, ``deep``, the notebook functions it calls, a few levels down), read from the
    code: a mutating method called on a global or closure name bound to one, or a
    subscript store or delete on it (``d[k] = v``, ``d[k] += 1``). ``kinds``: only
    containers of these types. Never raises (advice only); each code object is read
    once, so a function that changes none costs a look-up (not ``deep``: each map's call)."""
    found: list[ContainerChange] = []
    try:
        _changes_of(func, found, set(), 0 if deep else 4, kinds)
    except Exception:  # (advice only: nothing odd may break a run)
        return []
    return list(dict.fromkeys(found))


def _changes_of(func: Any, found: list[ContainerChange], seen: set, depth: int,
                kinds: tuple[type, ...] | None) -> None:
    if isinstance(func, functools.partial):
        func = func.func
    if isinstance(func, types.MethodType):
        func = func.__func__
    if type(func) is not types.FunctionType or id(func) in seen or depth > 4:
        return
    seen.add(id(func))
    code = func.__code__
    changed = _changed_names(code)
    if (not changed and depth == 4) or _by_reference(func):  # (an importable function: not the notebook's state)
        return
    cells = dict(zip(code.co_freevars, func.__closure__ or (), strict=False))
    for name, how in changed:
        closure = name in cells
        try:
            value = cells[name].cell_contents if closure else func.__globals__.get(name, _MISSING)
        except ValueError:  # (an empty cell)
            continue
        kind = next((t for t in _MUTATORS if isinstance(value, t)), None) or _copied_array(value)
        if kind is None or (kinds is not None and not isinstance(value, kinds)):
            continue
        method = how[len(name) + 1:] if how.startswith(name + ".") else ""
        if method and method not in _MUTATORS.get(kind, ()):  # (list.update is no list method; an array: items only)
            continue
        found.append(ContainerChange(func.__name__, name, kind.__name__, how, "closure" if closure else "global"))
    if _extract_code_globals is not None and depth < 4:
        for name in _extract_code_globals(code):
            _changes_of(func.__globals__.get(name), found, seen, depth + 1, kinds)


def filled_kinds() -> tuple[type, ...]:
    """The captured containers a task fills that the notebook meant as its results: lists
    (``results.append(x)``) and numpy arrays (``out[i] = x``, the classic parallel fill;
    :func:`_copied_array`), as opposed to a dict or set, often a worker's own cache on purpose."""
    numpy = sys.modules.get("numpy")
    return (list,) if numpy is None else (list, numpy.ndarray)


def _copied_array(value: Any) -> type | None:
    """The type of a numpy array whose items a task writes in its worker's copy only
    (a notebook array filled by item: ``out[i] = x``), else None: not an array, or one
    the workers write into for real, its memory a file or shared memory mapped again
    in each worker (an ``np.memmap``; a :func:`shm.share` array)."""
    numpy = sys.modules.get("numpy")
    if numpy is None or not isinstance(value, numpy.ndarray):
        return None
    base = value
    while isinstance(base.base, numpy.ndarray):
        base = base.base  # (a view: the array that holds the memory)
    if isinstance(base, numpy.memmap) or isinstance(base.base, mmap.mmap):
        return None
    start = value.__array_interface__["data"][0]
    if value.nbytes and (shm.shared_place(start, value.nbytes) is not None
                         or payload.in_helper_memory(start, value.nbytes)):
        return None  # (a share() array; a view of an mpmagic.Array, sent by reference: payload.helper_reference)
    return type(value)


def changes_captured(code: types.CodeType) -> bool:
    """Does ``code`` change a captured name's container in place (whatever it is bound to
    now)? A dictionary look-up once the code was read (never raises)."""
    try:
        return bool(_changed_names(code))
    except Exception:  # (advice only)
        return False


def _changed_names(code: types.CodeType) -> tuple[tuple[str, str], ...]:
    """(name, how) for each captured name the code (or code nested in it) changes in place:
    ``("results", "results.append")``, ``("d", "d[...] =")``. Cached per code object."""
    got = _code_changes.get(code)
    if got is None:
        out: list[tuple[str, str]] = []
        own = set(code.co_cellvars) - set(code.co_freevars)  # (a cell the call makes: a local)
        for c in _codes(code):
            local = own | (set(c.co_cellvars) - set(c.co_freevars)) if c is not code else own
            ins = [i for i in dis.get_instructions(c) if i.opname != "CACHE"]
            for k, one in enumerate(ins):
                if one.opname in ("LOAD_METHOD", "LOAD_ATTR") and one.argval in _ANY_MUTATOR and k:
                    name = _captured_name(ins[k - 1], local)
                    if name is not None:
                        out.append((name, f"{name}.{one.argval}"))
                elif one.opname in ("STORE_SUBSCR", "DELETE_SUBSCR"):
                    loaded = _container_load(ins, k)
                    name = _captured_name(loaded, local) if loaded is not None else None
                    if name is not None:
                        out.append((name, f"{name}[...] =" if one.opname == "STORE_SUBSCR" else f"del {name}[...]"))
        got = tuple(dict.fromkeys(out))
        if len(_code_changes) >= _MAX_CODES:
            _code_changes.clear()
        _code_changes[code] = got
    return got


def _captured_name(ins: dis.Instruction, local: set[str]) -> str | None:
    """The global or free variable ``ins`` loads by itself (not a call's target, not a local cell)."""
    if ins.opname not in _NAME_LOADS:
        return None
    if ins.opname == "LOAD_GLOBAL" and (ins.arg or 0) & _GLOBAL_NULL_BIT:  # (with a NULL: a function to call)
        return None
    if ins.opname in ("LOAD_DEREF", "LOAD_CLASSDEREF") and ins.argval in local:
        return None
    return ins.argval if isinstance(ins.argval, str) else None


def _container_load(ins: list[dis.Instruction], at: int) -> dis.Instruction | None:
    """The instruction that loaded the container of the subscript store (or delete) at
    ``at``, found by walking back over its key (and, for a store, its value's stack
    moves: ``d[k] += 1`` copies and swaps), or None when the key is more than simple
    loads and operators, or a jump lands inside it."""
    # The container is at depth 1 below the key (a store: [value, container, key]).
    height, target = 0, -2  # (stack positions relative to the height before the store)
    for k in range(at - 1, -1, -1):
        one = ins[k]
        if one.is_jump_target and k != at - 1:
            return None
        arg = one.arg or 0
        if one.opname == "SWAP":
            if target == height - 1:
                target = height - arg
            elif target == height - arg:
                target = height - 1
            continue
        if one.opname == "COPY":
            if target == height - 1:
                target = height - 1 - arg
            height -= 1
            continue
        if one.opname == "DUP_TOP_TWO":  # (3.10's COPY 2; COPY 2: ``d[k] += 1``)
            if target >= height - 2:
                target -= 2
            height -= 2
            continue
        if one.opname == "ROT_THREE":  # (3.10's SWAP 3; SWAP 2: the top goes under the next two)
            target = {height - 3: height - 1, height - 2: height - 3, height - 1: height - 2}.get(target, target)
            continue
        if one.opname == "LOAD_GLOBAL":
            pops, pushes = 0, 1 + (arg & _GLOBAL_NULL_BIT)
        elif one.opname == "LOAD_ATTR":
            pops, pushes = 1, 1 + (arg & 1 if sys.version_info >= (3, 12) else 0)
        elif one.opname == "BUILD_TUPLE":
            pops, pushes = arg, 1
        elif one.opname in _KEY_OPS:
            pops, pushes = _KEY_OPS[one.opname]
        else:
            return None
        if target >= height - pushes:  # (this instruction pushed it)
            return one if pops == 0 and pushes == 1 and target == height - 1 else None
        height += pops - pushes
    return None


#: How changes_words names the state a change is made to, by its ContainerChange.where.
_WHERE_WORDS = {"global": "the notebook's {kind} `{name}`", "closure": "the {kind} `{name}` of its closure",
                "default": "the {kind} `{name}` of its defaults", "object": "the notebook's {kind} object `{name}`",
                "unnamed": "its {kind} object"}


def changes_words(changes: list[ContainerChange]) -> str:
    """``collect changes the notebook's list `results` (results.append)``: each function's
    changes, a container's ways (``results.append, results.extend``) together."""
    by_func: dict[str, dict[tuple[str, str, str], list[str]]] = {}
    for c in changes:
        by_func.setdefault(c.func, {}).setdefault((c.name, c.kind, c.where), []).append(c.how)
    said = []
    for func, containers in by_func.items():
        what = [_WHERE_WORDS[where if name or where != "object" else "unnamed"].format(kind=kind, name=name)
                + f" ({', '.join(hows)})" for (name, kind, where), hows in containers.items()]
        listed = what[0] if len(what) == 1 else ", ".join(what[:-1]) + " and " + what[-1]
        said.append(f"{'the lambda' if func == '<lambda>' else func} changes {listed}")
    return "; ".join(said)


# --------------------------------------------------------------------------
# State a task adds to that the notebook holds outside any container it captures: a global
# or a closure's variable it accumulates (``TOTAL += x``, ``n = n + x``), an attribute of the
# object a bound method or callable instance runs on (``self.n += x``, ``self.items.append``)
# or of a notebook object it captures (``acc.n += x``), a list default it fills (``seen=[]``,
# ``seen.append``). Serially each call sees the earlier ones' and the notebook keeps them; in
# the workers each changes its worker's copy, the notebook's stays as it was and results can
# differ (``[0, 1, 3, 6]`` there ``[0, 1, 3, 3]``), silently. Only what reads its own value back
# (an augmented or self-referencing assignment, a list filled in place): a global assigned once
# from a call (``MODEL = load()``, a worker's own lazy set-up on purpose) is not accumulated
# state, and says nothing; nor does a module's attribute or a shared helper's (mpmagic.Value).

# The 3.10 opcodes of a binary operation (3.11 on: BINARY_OP, whose argrepr is the operator).
_OPERATORS_310 = {"ADD": "+", "SUBTRACT": "-", "MULTIPLY": "*", "MATRIX_MULTIPLY": "@", "TRUE_DIVIDE": "/",
                  "FLOOR_DIVIDE": "//", "MODULO": "%", "POWER": "**", "LSHIFT": "<<", "RSHIFT": ">>",
                  "AND": "&", "OR": "|", "XOR": "^"}
_NAME_STORES = {"STORE_GLOBAL": ("global", ("LOAD_GLOBAL", "LOAD_NAME")),
                "STORE_DEREF": ("nonlocal", ("LOAD_DEREF", "LOAD_CLASSDEREF"))}
# What each code object read accumulates (_accumulated), bounded as _code_changes.
_code_accumulations: dict[types.CodeType, tuple[tuple[str, str, str, str], ...]] = {}


def _operator(ins: dis.Instruction) -> str | None:
    """``+=`` or ``+`` for a binary operation's instruction (3.10's named ones too), else None."""
    if ins.opname == "BINARY_OP":  # (3.14's subscript, BINARY_OP "[]", is none)
        return ins.argrepr if ins.argrepr.rstrip("=") in _OPERATORS_310.values() else None
    kind, _, op = ins.opname.partition("_")
    if kind in ("BINARY", "INPLACE") and op in _OPERATORS_310:
        return _OPERATORS_310[op] + ("=" if kind == "INPLACE" else "")
    return None


def _assigned(op: str, target: str) -> str:
    """How an accumulation reads: ``TOTAL +=`` (augmented), ``n = n + ...`` (not)."""
    return f"{target} {op}" if op.endswith("=") else f"{target} = {target} {op} ..."


def _lines(ins: list[dis.Instruction]) -> list[int | None]:
    """The source line of each instruction: 3.13 on, its ``line_number``; before, the
    ``starts_line`` of the last instruction that started one."""
    out: list[int | None] = []
    line = None
    for i in ins:
        start = getattr(i, "line_number", None) if sys.version_info >= (3, 13) else i.starts_line
        if start is not None:
            line = start
        out.append(line)
    return out


def _holder(ins: dis.Instruction, first: str | None, freevars: tuple[str, ...]) -> tuple[str, str] | None:
    """Whose attribute an instruction's load is the object of: ("self", name) for the code's
    first argument (LOAD_FAST, 3.14's LOAD_FAST_BORROW...), ("global", name) for a global
    loaded alone (not a call's target: no NULL), ("closure", name) for a free variable; else None."""
    if ins.opname.startswith("LOAD_FAST") and first is not None and ins.argval == first:
        return "self", first
    if ins.opname == "LOAD_GLOBAL" and not (ins.arg or 0) & _GLOBAL_NULL_BIT and isinstance(ins.argval, str):
        return "global", ins.argval
    if ins.opname == "LOAD_DEREF" and ins.argval in freevars:
        return "closure", ins.argval
    return None


def _accumulated(code: types.CodeType) -> tuple[tuple[str, str, str, str], ...]:
    """(scope, name, attribute, how) for what ``code`` (itself, not code nested in it)
    accumulates: a global or free variable stored from a binary operation after a load of
    it on the same line (``("global", "TOTAL", "", "TOTAL +=")``; ``print(LAST)`` then
    ``LAST = x * 2`` is no accumulation); an attribute likewise, of its first argument, a
    global or a free variable (``("attr self", "self", "n", "self.n +=")``, ``("attr global",
    "acc", "n", "acc.n +=")``); a list method called on such an attribute (``("list self",
    "self", "items", "self.items.append")``) or on an argument (``("list local", "seen", "",
    "seen.append")``: a default's value if the function has one). Cached per code object;
    the caller resolves what each name holds."""
    got = _code_accumulations.get(code)
    if got is not None:
        return got
    out: list[tuple[str, str, str, str]] = []
    ins = [i for i in dis.get_instructions(code) if i.opname != "CACHE"]
    lines = _lines(ins)
    # (what each line loads: a self-referencing assignment reads the name in its own statement)
    loaded = {(i.opname, i.argval, line) for i, line in zip(ins, lines, strict=True)}
    first = code.co_varnames[0] if code.co_argcount else None
    params = set(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount])
    for k, one in enumerate(ins):
        before = ins[k - 1] if k else None
        op = _operator(before) if before is not None else None
        if one.opname in _NAME_STORES and op is not None:
            scope, loads = _NAME_STORES[one.opname]
            if (scope == "global" or one.argval in code.co_freevars) and any(
                    (o, one.argval, lines[k]) in loaded for o in loads):
                out.append((scope, one.argval, "", _assigned(op, one.argval)))
        elif one.opname == "STORE_ATTR" and before is not None and k >= 2:
            # obj.n += x: obj loaded, COPY 1 (3.10: DUP_TOP), LOAD_ATTR n, ..., BINARY_OP +=,
            # SWAP 2 (3.10: ROT_TWO), STORE_ATTR n; obj.n = obj.n + x: obj, LOAD_ATTR n, ...,
            # BINARY_OP +, obj loaded again, STORE_ATTR n. Both on the store's line.
            op = _operator(ins[k - 2])
            if op is None:
                continue
            same_line = [i for i, line in zip(ins[:k], lines, strict=False) if line == lines[k]]
            holder = None
            if not op.endswith("="):
                holder = _holder(before, first, code.co_freevars)
                if holder is not None and not any(
                        _holder(a, first, code.co_freevars) == holder and b.opname == "LOAD_ATTR"
                        and b.argval == one.argval for a, b in itertools.pairwise(same_line)):
                    holder = None
            elif before.opname in ("SWAP", "ROT_TWO"):
                holder = next((h for a, b, c in zip(same_line, same_line[1:], same_line[2:], strict=False)
                               if b.opname in ("COPY", "DUP_TOP") and c.opname == "LOAD_ATTR"
                               and c.argval == one.argval and (h := _holder(a, first, code.co_freevars))), None)
            if holder is not None:
                out.append((f"attr {holder[0]}", holder[1], one.argval, _assigned(op, f"{holder[1]}.{one.argval}")))
        elif one.opname in ("LOAD_METHOD", "LOAD_ATTR") and one.argval in _MUTATORS[list]:
            if before is not None and before.opname == "LOAD_ATTR" and isinstance(before.argval, str) and k >= 2:
                holder = _holder(ins[k - 2], first, code.co_freevars)
                if holder is not None:
                    out.append((f"list {holder[0]}", holder[1], before.argval,
                                f"{holder[1]}.{before.argval}.{one.argval}"))
            elif (before is not None and before.opname.startswith("LOAD_FAST") and before.argval in params
                  and before.argval != first):
                out.append(("list local", before.argval, "", f"{before.argval}.{one.argval}"))
    got = tuple(dict.fromkeys(out))
    if len(_code_accumulations) >= _MAX_CODES:
        _code_accumulations.clear()
    _code_accumulations[code] = got
    return got


def accumulates(code: types.CodeType) -> bool:
    """Might ``code`` accumulate state the notebook holds (:func:`state_kept_apart`)? A
    dictionary look-up once the code was read (never raises)."""
    got = _code_accumulations.get(code)  # (each map's call: a look-up alone)
    if got is None:
        try:
            got = _accumulated(code)
        except Exception:  # (advice only)
            return False
    return bool(got)


def function_of(func: Any) -> tuple[types.FunctionType | None, Any]:
    """The Python function a map calls for ``func`` and the object it is called on: a bound
    method's (not a class's: a classmethod), a callable instance's ``__call__`` (the
    instance), a partial's function; (None, None) for a builtin or anything else."""
    if type(func) is types.FunctionType:  # (most maps: at once)
        return func, None
    if isinstance(func, functools.partial):
        func = func.func
    if isinstance(func, types.MethodType):
        owner = func.__self__
        func = func.__func__
        if isinstance(owner, (type, types.ModuleType)):
            owner = None
    elif not isinstance(func, (type, types.FunctionType, types.BuiltinFunctionType)):
        # (a callable instance: its class's __call__, looked up as a call does, in the class's MRO)
        owner = func
        func = next((vars(k)["__call__"] for k in type(func).__mro__ if "__call__" in vars(k)), None)
    else:
        owner = None
    return (func, owner) if type(func) is types.FunctionType else (None, None)


def state_kept_apart(func: Any, positional: int | None = None) -> list[ContainerChange]:
    """The state the notebook holds that ``func`` itself accumulates (not the functions it
    calls): its globals and closure variables (``TOTAL += x``), the attributes of the object
    it runs on (``self.n += x``, ``self.items.append``: a list) and of the notebook objects it
    captures (``acc.n += x``; not a module's: the worker's own), the list defaults it fills
    (``seen.append``): each worker changes its own copy of each. ``positional``: how many
    arguments each call is given (a map's iterables), so a default they replace is not
    counted; None (unknown: ``star``) counts keyword-only defaults only. Never raises (advice only)."""
    try:
        return _state_kept_apart(func, positional)
    except Exception:  # (advice only: nothing odd may break a run)
        return []


def _state_kept_apart(func: Any, positional: int | None) -> list[ContainerChange]:
    given = func.args if isinstance(func, functools.partial) else ()
    keywords = func.keywords if isinstance(func, functools.partial) else {}
    f, owner = function_of(func)
    if f is None or _by_reference(f):  # (an importable function: not the notebook's code)
        return []
    code = f.__code__
    cells = dict(zip(code.co_freevars, f.__closure__ or (), strict=False))
    named = code.co_varnames[:code.co_argcount]
    defaults = {**dict(zip(named[code.co_argcount - len(f.__defaults__ or ()):], f.__defaults__ or (), strict=False)),
                **(f.__kwdefaults__ or {})}
    passed = (owner is not None) + len(given) + (code.co_argcount if positional is None else positional)
    for name in (*named[:passed], *keywords):  # (the call gives these: their defaults are not used)
        defaults.pop(name, None)
    subject = f"{type(owner).__name__}.{f.__name__}" if owner is not None else f.__name__
    found: list[ContainerChange] = []
    for scope, name, attr, how in _accumulated(code):
        holder = _MISSING
        if scope in ("global", "attr global", "list global"):
            holder = f.__globals__.get(name, _MISSING)
        elif scope in ("nonlocal", "attr closure", "list closure") and name in cells:
            with contextlib.suppress(ValueError):  # (an empty cell)
                holder = cells[name].cell_contents
        elif scope in ("attr self", "list self") and owner is not None:
            holder, name = owner, _notebook_name(owner)
        elif scope == "list local":
            holder = defaults.get(name, _MISSING)
        if holder is _MISSING or isinstance(holder, types.ModuleType) or _shared_on_purpose(holder):
            continue  # (a module's state is the worker's own; a shared helper's the notebook's too)
        if scope.startswith("list ") and not isinstance(
                holder if scope == "list local" else getattr(holder, "__dict__", {}).get(attr), list):
            continue
        kind = type(holder).__name__
        if scope == "global":
            found.append(ContainerChange(subject, name, kind, how, "global"))
        elif scope == "nonlocal":
            found.append(ContainerChange(subject, name, kind, how, "closure"))
        elif scope == "list local":
            found.append(ContainerChange(subject, name, kind, how, "default"))
        elif scope.endswith(" closure"):
            found.append(ContainerChange(subject, name, f"{kind} object", how, "closure"))
        else:  # (self, or a global: the notebook's object, by its variable if one holds it)
            found.append(ContainerChange(subject, name, kind, how, "object"))
    return list(dict.fromkeys(found))


def _shared_on_purpose(obj: Any) -> bool:
    """An object tasks change for the notebook to see: mpmagic's Value, Array, Queue...
    (``counter.value += 1``), a ``multiprocessing`` Manager's proxy."""
    return str(type(obj).__module__).split(".", 1)[0] in ("mpmagic", "multiprocessing")


def _notebook_name(obj: Any) -> str:
    """The notebook's variable (a global of ``__main__``, not ``_``-named) holding ``obj``, or ""."""
    main = getattr(sys.modules.get("__main__"), "__dict__", {})
    return next((k for k, v in list(main.items()) if v is obj and not k.startswith("_")), "")


def _codes(code: types.CodeType) -> list[types.CodeType]:
    """``code`` and the code objects nested in it."""
    out = [code]
    for c in code.co_consts:
        if type(c) is types.CodeType:
            out += _codes(c)
    return out
