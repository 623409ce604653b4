"""A task's exception comes back as itself (issue 13, class 2).

The oracle is the same cell with plain ``map`` in the same InteractiveShell:
same type (``except HTTPError`` catches it), args, message, attributes,
notes, ``__cause__`` / ``__context__`` / ``__suppress_context__`` down the
chain, and an ExceptionGroup's sub-exceptions. Only a type that cannot be
loaded in the notebook becomes a RemoteError.
"""

from __future__ import annotations

import builtins
import pickle
import re
import sys
import traceback

import pytest
from conftest import low_recursion_limit, run

import mpmagic

GROUP = getattr(builtins, "BaseExceptionGroup", ())  # Python 3.11+
needs_groups = pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is Python 3.11+")

DEFINITIONS = '''
import errno, threading

class HTTPError(Exception):
    def __init__(self, status, *, url):
        super().__init__(status)
        self.status = status
        self.url = url

class WithLock(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()   # cannot be pickled
        self.kept = [1, 2]

class SlottedError(Exception):
    __slots__ = ("code",)
    def __init__(self, code):
        super().__init__(f"code {code}")
        self.code = code

def slotted_error(x):
    raise SlottedError(x)

def kw_only(x):
    raise HTTPError(400 + x, url=f"http://h/{x}")

def chained(x):
    try:
        {}["k%d" % x]
    except KeyError as e:
        raise HTTPError(500, url="u") from e

def implicit(x):
    try:
        1 / 0
    except ZeroDivisionError:
        raise ValueError("while handling")

def from_none(x):
    try:
        1 / 0
    except ZeroDivisionError:
        raise ValueError("hidden") from None

def with_notes(x):
    e = ValueError(x)
    e.add_note("a note of the user's")
    raise e

def with_lock(x):
    raise WithLock(f"lock {x}")

def no_file(x):
    open(f"/nonexistent/{x}")

def group(x):
    raise ExceptionGroup("several", [HTTPError(1, url="a"), ValueError(x)])

def deep(n):
    return deep(n + 1)

class FetchError(OSError):            # a library's IO error: its own __init__ fills the C-level fields
    def __init__(self, path):
        super().__init__(2, "gone")
        self.filename = path

class ConfigSyntax(SyntaxError):
    def __init__(self, line):
        super().__init__("bad syntax", ("cfg.ini", line, 3, "a = = b"))

class PluginMissing(ImportError):
    def __init__(self, mod):
        super().__init__(f"no {mod}", name=mod, path="/x")

def fetch_error(x):
    raise FetchError(f"/data/{x}.csv")

def config_syntax(x):
    raise ConfigSyntax(x)

def plugin_missing(x):
    raise PluginMissing(f"plug{x}")

def http_404(x):
    import io, urllib.error
    raise urllib.error.HTTPError(f"http://x/{x}", 404, "Not Found", {}, io.BytesIO(b""))

def no_attribute(x):
    return object().nope

def no_name(x):
    return undefined_name_xyz
'''


@pytest.fixture(scope="module")
def method() -> str:
    """The start method of every ``local_pool`` here: forkserver only.

    An exception travels back pickled by the same code whichever start method made
    the worker; what differs by method (the function's transfer) is test_fidelity_worker's.
    """
    return "forkserver"


@pytest.fixture
def defined(ip):
    run(ip, DEFINITIONS)
    return ip


def outcome(ip, code: str) -> BaseException:
    """The exception a cell raised (shown output is checked in test_tracebacks)."""
    from IPython.utils.capture import capture_output

    with capture_output():
        result = ip.run_cell(code, store_history=False)
    assert result.error_in_exec is not None, f"{code!r} did not raise"
    return result.error_in_exec


def ours(notes) -> bool:
    return isinstance(notes, str) and notes.startswith("mpmagic: ")


def assert_same(par: BaseException, ser: BaseException, depth: int = 0) -> None:
    """Type, args, message, picklable attributes, notes and chain all equal."""
    assert type(par) is type(ser), (par, ser)
    if isinstance(ser, GROUP):  # args hold the sub-exceptions: compared below
        assert par.message == ser.message and str(par) == str(ser)
    else:
        assert par.args == ser.args and str(par) == str(ser)
    for k, v in vars(ser).items():
        if k == "__notes__":
            continue
        try:
            pickle.dumps(v)
        except Exception:
            continue  # unpicklable attributes stay in the worker (docs/troubleshooting.md)
        assert getattr(par, k) == v, k
    for k in c_fields(type(ser)):  # errno, filename, lineno, name...: kept in C, not in vars()
        a, b = getattr(par, k, None), getattr(ser, k, None)
        assert (type(a) is type(b)) if k == "obj" else (a == b), k
    notes = [n for n in getattr(par, "__notes__", []) if not ours(n)]
    assert notes == getattr(ser, "__notes__", [])
    assert par.__suppress_context__ == ser.__suppress_context__
    for link in ("__cause__", "__context__"):
        a, b = getattr(par, link), getattr(ser, link)
        assert (a is None) == (b is None), link
        if a is not None and depth < 5:
            assert_same(a, b, depth + 1)
    if isinstance(ser, GROUP):
        assert len(par.exceptions) == len(ser.exceptions)
        for a, b in zip(par.exceptions, ser.exceptions, strict=True):
            assert_same(a, b, depth + 1)


def c_fields(cls: type) -> list[str]:
    """The fields builtin exception classes in ``cls``'s MRO keep in C (OSError.errno...)."""
    import types

    own = {"__suppress_context__", "__dict__", "args", "__traceback__", "__context__", "__cause__", "message",
           "exceptions", "characters_written"}
    return [k for base in cls.__mro__ if base.__module__ == "builtins" and issubclass(base, BaseException)
            for k, v in vars(base).items()
            if k not in own and isinstance(v, (types.MemberDescriptorType, types.GetSetDescriptorType))]


def compare(ip, args: str) -> BaseException:
    ser = outcome(ip, f"list(map({args}))")
    par = outcome(ip, f"%pmap -q {args}")
    assert_same(par, ser)
    return par


def test_keyword_only_init_comes_back_as_itself_and_is_caught(defined, backend):
    par = compare(defined, "kw_only, [3]")
    assert par.url == "http://h/3" and par.status == 403
    out = run(defined, "try:\n    %pmap -q kw_only, [1]\nexcept HTTPError as e:\n    caught = e.url\ncaught")
    assert out == "http://h/1"


def test_raise_from_keeps_the_cause(defined, backend):
    par = compare(defined, "chained, [7]")
    assert isinstance(par.__cause__, KeyError) and par.__cause__.args == ("k7",)
    assert any(ours(n) for n in par.__notes__)  # our one line is a note, not the cause


@pytest.mark.parametrize("func", ["implicit", "from_none", "with_notes", "no_file"])
def test_context_suppression_notes_and_oserror_fields(defined, local_pool, func):
    par = compare(defined, f"{func}, [0]")
    if func == "no_file":
        assert isinstance(par, FileNotFoundError) and par.errno == 2 and par.filename == "/nonexistent/0"


@pytest.mark.parametrize("func", ["fetch_error", "config_syntax", "plugin_missing", "no_attribute", "no_name"])
def test_c_level_fields_come_back(defined, local_pool, func):
    """errno/strerror/filename of an OSError subclass with its own __init__, a SyntaxError
    subclass's position, an ImportError subclass's name and path, AttributeError.name/.obj
    and NameError.name: all None in the notebook before (migrate14), and str(e) differed."""
    par = compare(defined, f"{func}, [7]")
    if func == "fetch_error":
        assert par.errno == 2 and par.filename == "/data/7.csv" and str(par) == "[Errno 2] gone: '/data/7.csv'"
    elif func == "no_name":
        assert par.name == "undefined_name_xyz"


def test_http_error_keeps_its_url_as_filename(defined, local_pool):
    """(Its file object is a new one at home: compared field by field, not with assert_same.)"""
    import urllib.error

    par = outcome(defined, "%pmap -q http_404, [7]")
    assert isinstance(par, urllib.error.HTTPError) and par.code == 404 and par.filename == "http://x/7"


def test_exception_with_slots_keeps_them(defined, local_pool):
    par = compare(defined, "slotted_error, [9]")
    assert par.code == 9


def test_unpicklable_attribute_loses_only_that_attribute(defined, local_pool):
    par = compare(defined, "with_lock, [2]")
    assert par.kept == [1, 2] and not hasattr(par, "lock")


def test_an_unpicklable_argument_changes_only_that_argument(defined, local_pool):
    """One argument that cannot be pickled turned every argument into its repr
    string (``e.args[1] == 7`` was ``'7'``). The others come back as they were,
    that one as a stand-in with the same repr and str, so str(e) is serial's."""
    run(defined, "class Handle:\n    def __repr__(self):\n        return 'Handle(3)'\n"
                 "    def __reduce__(self):\n        raise TypeError('cannot pickle Handle')\n"
                 "def with_handle(x):\n    raise ValueError('query failed', x, Handle())\n"
                 "def only_handle(x):\n    raise KeyError(Handle())\n")
    for func in ("with_handle", "only_handle"):
        par, ser = outcome(defined, f"%pmap -q {func}, [7]"), outcome(defined, f"list(map({func}, [7]))")
        assert type(par) is type(ser) and str(par) == str(ser), (par, ser)
        assert par.args[:-1] == ser.args[:-1] and repr(par.args[-1]) == "Handle(3)"
        assert type(par.args[-1]).__name__ == "UnsentArgument" and par.args[-1].type_name.endswith(".Handle")


@needs_groups
def test_exception_group_comes_back_with_its_sub_exceptions(defined, local_pool):
    par = compare(defined, "group, [5]")
    assert type(par).__name__ == "ExceptionGroup"
    assert [type(e).__name__ for e in par.exceptions] == ["HTTPError", "ValueError"]
    assert par.exceptions[0].url == "a"


def test_deep_recursion_is_a_recursion_error(defined, local_pool):
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(low_recursion_limit())  # (travels to the worker: fewer frames to rebuild and format)
    try:
        par = outcome(defined, "%pmap -q deep, [0]")
    finally:
        sys.setrecursionlimit(before)
    assert type(par) is RecursionError
    # Outside IPython too (the API in a script), Python collapses the repeats.
    text = "".join(traceback.format_exception(par))
    assert re.search(r"\[Previous line repeated \d+ more times\]", text) and len(text.splitlines()) < 20, text


def test_a_type_the_notebook_cannot_load_is_a_remote_error(defined, local_pool):
    run(defined, '''
def worker_only_error(x):
    import sys, types
    mod = sys.modules.setdefault("only_in_the_worker", types.ModuleType("only_in_the_worker"))
    exec("class Gone(Exception):\\n    pass\\n", mod.__dict__)
    raise mod.Gone(f"gone {x}")
''')
    par = outcome(defined, "%pmap -q worker_only_error, [4]")
    assert isinstance(par, mpmagic.RemoteError)
    assert par.type_name == "Gone" and par.message == "gone 4"


@needs_groups
def test_dask_keeps_types_and_chain(defined, backend):
    """The same rebuild on every backend (the ``backend`` fixture includes Dask)."""
    compare(defined, "group, [1]")
    compare(defined, "from_none, [1]")


def test_errors_collect_keeps_each_exception_as_itself(defined, local_pool):
    out = run(defined, "%pmap -q --errors collect chained, [1, 2]")
    ser = [outcome(defined, f"chained({i})") for i in (1, 2)]
    for failed, expected in zip(out, ser, strict=True):
        assert isinstance(failed, mpmagic.Failed)
        assert_same(failed.error, expected)


# An exception's __init__ runs once, where the task raised it (issue: it ran 3 times, the
# worker's round-trip check and the notebook's pickle.loads calling it again), and one that
# works only in the task (reads what the task set up) still comes back as its own type.
INIT_EFFECTS = '''
import os

class Counted(Exception):
    def __init__(self, m):
        super().__init__(m)
        with open({path!r}, "a") as f:   # a side effect: logging, a metric, a counter
            f.write("x")

class CountedOwnReduce(Counted):
    def __reduce__(self):                # says how it pickles: loaded through __init__, as pickle does
        return (type(self), self.args, self.__dict__)

class NeedsEnv(Exception):
    def __init__(self, m):
        super().__init__(m)
        self.home = os.environ["MPMAGIC_TEST_ONLY_IN_TASK"]

class NeedsEnvOwnReduce(NeedsEnv):
    def __reduce__(self):
        return (type(self), self.args, self.__dict__)

def counted(x):
    raise Counted(f"bad {{x}}")

def counted_own_reduce(x):
    raise CountedOwnReduce(f"bad {{x}}")

def raise_in_task(cls, x):
    os.environ["MPMAGIC_TEST_ONLY_IN_TASK"] = str(x)   # (stays set in the worker: only the notebook lacks it)
    raise cls(f"bad {{x}}")

def needs_env(x):
    raise_in_task(NeedsEnv, x)

def needs_env_own_reduce(x):
    raise_in_task(NeedsEnvOwnReduce, x)
'''


@pytest.fixture
def effects(ip, tmp_path):
    count = tmp_path / "inits"
    run(ip, INIT_EFFECTS.format(path=str(count)))
    return ip, count


def inits(count, before) -> int:
    """How many times an __init__ ran since ``before`` (its file's length)."""
    return len(count.read_text()) - before if count.exists() else 0


@pytest.mark.parametrize("func, per_error", [("counted", 1), ("counted_own_reduce", 2)])
def test_an_exceptions_init_runs_once_as_serially(effects, backend, func, per_error):
    """Serially an exception's __init__ runs once, at the raise; mpmagic ran it 3 times
    (the raise, the worker's pickle round-trip check, the notebook's pickle.loads): a
    logging __init__ logged 3 lines, one that slept 1 s made the failed run 3 s. Now the
    notebook rebuilds it without __init__; a class with a __reduce__ of its own is loaded
    as it says (as any pickle would), so its __init__ runs a second time, in the notebook."""
    ip, count = effects
    ser = outcome(ip, f"list(map({func}, [1]))")
    assert inits(count, 0) == 1
    par = outcome(ip, f"%pmap -q {func}, [1]")
    assert_same(par, ser)
    assert inits(count, 1) == per_error
    out = run(ip, f"%pmap -q --errors collect {func}, range(3)")
    assert [type(f.error) for f in out] == [type(ser)] * 3
    assert inits(count, 1 + per_error) == 3 * per_error


@pytest.mark.parametrize("func", ["needs_env", "needs_env_own_reduce"])
def test_an_init_that_works_only_in_the_task_still_gives_its_own_type(effects, backend, func):
    """Its class loads in the notebook, but its __init__ needs what the task set up (an
    environment variable, a name of %%pool setup): the worker's round trip worked, so only
    the whole pickle was sent, and its load failing in the notebook left a RemoteError that
    `except NeedsEnv` missed."""
    import os

    ip, _ = effects
    ser = outcome(ip, f"list(map({func}, [1]))")
    os.environ.pop("MPMAGIC_TEST_ONLY_IN_TASK")  # (the serial run set it here)
    par = outcome(ip, f"%pmap -q {func}, [1]")
    assert_same(par, ser)
    assert par.home == "1" and "MPMAGIC_TEST_ONLY_IN_TASK" not in os.environ
    assert run(ip, f"try:\n    %pmap -q {func}, [0, 2]\nexcept NeedsEnv as e:\n    caught = e.home\ncaught") == "0"


def _library_exceptions() -> list[BaseException]:
    import json
    import re
    import subprocess
    import zlib

    def compile_bad():
        compile("a = = b", "f.py", "exec")

    def undefined():
        return undefined_name_xyz  # type: ignore[name-defined]  # noqa: F821

    def missing_module():
        import nope_xyz  # type: ignore[import-not-found]  # noqa: F401

    def block():
        raise BlockingIOError(11, "again", 7)

    def bad_unpack():
        a, b = "abc"

    found = []
    for make in (lambda: int("x"), lambda: {}["k"], lambda: open("/nonexistent/a"), lambda: next(iter([])),
                 lambda: b"\xff".decode("utf8"), compile_bad, undefined, missing_module, block, bad_unpack,
                 lambda: object().nope, lambda: subprocess.run(["false"], check=True), lambda: json.loads("{bad"),
                 lambda: re.compile("(("), lambda: zlib.decompress(b"xx"), lambda: sys.exit(3)):
        try:
            make()
        except BaseException as exc:
            found.append(exc)
    return found


def test_builtin_and_library_exceptions_rebuild_from_their_parts_as_pickle_would():
    """The builtins and the standard library's exceptions come home from their parts
    (no whole pickle, no __init__ call) as exactly as a pickle round trip brings them:
    type, args, str, repr, attributes and C-level fields (errno, lineno, name...). Only
    one that says how it pickles (JSONDecodeError's __reduce__) is pickled whole too."""
    from mpmagic.exc_record import _fields_of, capture, rebuild

    def state(e):
        fields = {k: repr(getattr(e, k, None)) for k in _fields_of(type(e)) if k != "obj"}
        return type(e), repr(e.args), str(e), repr(e), repr(sorted(vars(e).items())), fields

    for exc in _library_exceptions():
        record = pickle.loads(pickle.dumps(capture(exc)))
        assert (record.whole is not None) == (type(exc).__name__ == "JSONDecodeError"), exc
        back = rebuild(record)
        assert state(back) == state(exc), exc
        if isinstance(exc, AttributeError):
            assert back.name == "nope" and type(back.obj) is object


class _ImportableSlotted(Exception):
    __slots__ = ("code",)

    def __init__(self, code):
        super().__init__(f"code {code}")
        self.code = code


def test_capture_and_rebuild_keep_real_slots():
    """An importable exception class with real slots (in the worker a notebook
    class has none: cloudpickle rebuilds it with a __dict__)."""
    from mpmagic.exc_record import capture, rebuild

    try:
        raise _ImportableSlotted(9)
    except _ImportableSlotted as exc:
        record = pickle.loads(pickle.dumps(capture(exc)))
    back = rebuild(record)
    assert type(back) is _ImportableSlotted and back.code == 9 and back.args == ("code 9",)


class _BackportGroup(Exception):
    """The ``exceptiongroup`` backport's BaseExceptionGroup, as on Python 3.10: no builtin's subclass."""

    def __new__(cls, message, exceptions):
        self = super().__new__(cls, message, exceptions)
        self.message, self.exceptions = message, tuple(exceptions)
        return self

    def __init__(self, message, exceptions):
        super().__init__(message, exceptions)


def test_the_exceptiongroup_backports_groups_are_groups_as_on_python_3_10(monkeypatch):
    """Without a builtin BaseExceptionGroup (3.10) nothing was a group: a task's
    backport group (anyio, trio, pytest raise them) came back without its
    sub-exceptions' frames and was shown with mpmagic's frames."""
    import types

    from mpmagic.errors import group_class
    from mpmagic.exc_record import capture, rebuild

    monkeypatch.delattr(builtins, "BaseExceptionGroup", raising=False)  # (3.10 has none)
    backport = types.ModuleType("exceptiongroup")
    backport.BaseExceptionGroup = _BackportGroup  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "exceptiongroup", backport)
    assert group_class() is _BackportGroup
    try:
        raise _BackportGroup("two", [ValueError(7), KeyError("k")])
    except _BackportGroup as exc:
        record = pickle.loads(pickle.dumps(capture(exc)))
    assert record.children is not None and [c.type_name for c in record.children] == ["ValueError", "KeyError"]
    back = rebuild(record)
    assert type(back) is _BackportGroup and [repr(e) for e in back.exceptions] == ["ValueError(7)", "KeyError('k')"]
    monkeypatch.delitem(sys.modules, "exceptiongroup")
    assert group_class() == ()  # (no backport imported: nothing is a group, as before)


def test_an_exception_whose_str_fails_is_still_the_tasks_own(ip, backend):
    """Reading its text in the pool's manager raised there: the notebook got a
    RuntimeError (or RecursionError) and `except ValueError` missed it."""
    run(ip, "class BadStr(ValueError):\n    def __str__(self):\n        raise RuntimeError('str failed')\n"
            "def task(x):\n    if x == 1:\n        raise BadStr('bad input')\n    return x\n")
    with pytest.raises(ValueError) as info:
        run(ip, "%pmap -q task, range(4)")
    assert type(info.value).__name__ == "BadStr"
    assert run(ip, "%pmap -q abs, [-1]") == [1]


ODD_EXCEPTIONS = '''
import dataclasses

@dataclasses.dataclass(frozen=True)
class FrozenErr(Exception):
    code: int

class ReadOnlyErr(Exception):
    def __setattr__(self, k, v):
        raise AttributeError("read-only exception")

def tuple_notes(x):
    e = ValueError("bad item"); e.__notes__ = ("context from a library",); raise e

def str_notes(x):
    e = ValueError("bad item"); e.__notes__ = "context from a library"; raise e

def frozen(x):
    raise FrozenErr(x)

def read_only(x):
    raise ReadOnlyErr("ro")
'''


@pytest.fixture
def odd(ip):
    run(ip, ODD_EXCEPTIONS)
    return ip


@pytest.mark.parametrize("func", ["tuple_notes", "str_notes"])
def test_notes_a_library_assigned_directly_stay_as_they_were(odd, local_pool, func):
    """``__notes__`` set to a tuple or a str: our note made BaseException.add_note
    raise "Cannot add note: __notes__ is not a list" in the manager, which
    replaced the task's ValueError (collect raised it too)."""
    ser = outcome(odd, f"list(map({func}, [1]))")
    for par in (outcome(odd, f"%pmap -q {func}, [1]"), run(odd, f"%pmap -q --errors collect {func}, [1]")[0].error):
        assert type(par) is ValueError and par.args == ser.args
        notes = par.__notes__
        assert type(notes) is type(ser.__notes__)
        if isinstance(notes, tuple):  # ours added after the library's
            assert notes[:1] == ser.__notes__ and any(ours(n) for n in notes[1:])
        else:
            assert notes == ser.__notes__
    rank = outcome(odd, f"%%parallel -n 1 -q\n{func}(rank)\n")
    rank = rank.failures[0] if isinstance(rank, mpmagic.ParallelError) else rank
    assert type(rank) is ValueError and type(rank.__notes__) is type(ser.__notes__)


def test_a_frozen_dataclass_exception_comes_back_as_itself(odd, local_pool):
    """Its own __setattr__ refused the rebuild's writes: it came back as a
    RemoteError that `except FrozenErr` missed, without `.code`."""
    par = compare(odd, "frozen, [1]")
    assert par.code == 1 and any(ours(n) for n in par.__notes__)
    assert run(odd, "try:\n    %pmap -q frozen, [0, 1]\nexcept FrozenErr as e:\n    caught = e.code\ncaught") == 0
    failed = run(odd, "%pmap -q --errors collect frozen, [4]")[0]
    assert type(failed.error).__name__ == "FrozenErr" and failed.error.code == 4


def test_an_exception_refusing_every_attribute_write_is_still_the_tasks_own(odd, local_pool):
    """Its __setattr__ raised out of mpmagic (setting __traceback__, our note):
    an AttributeError of ours, even with --errors collect."""
    compare(odd, "read_only, [1]")
    out = run(odd, "%pmap -q --errors collect read_only, [0]")
    assert isinstance(out[0], mpmagic.Failed) and type(out[0].error).__name__ == "ReadOnlyErr"
    assert out[0].error.args == ("ro",) and out[0].error.__traceback__ is not None


def test_every_exception_mpmagic_exports_round_trips_through_pickle():
    """ParallelError and RemoteError failed to unpickle (their __init__ takes more
    than the message args holds): a ProcessPoolExecutor job that raised one broke
    the executor (BrokenProcessPool). Each exported class keeps message and attributes."""
    from mpmagic.errors import add_note

    samples = {"ParallelError": ("1 of 2 ranks failed", {1: ZeroDivisionError("x")}, {0: 5}),
               "RemoteError": ("WeirdError", "made in a worker"), "ReduceError": ("sum failed", [1, "a"])}
    classes = [c for c in (getattr(mpmagic, n) for n in mpmagic.__all__)
               if isinstance(c, type) and issubclass(c, BaseException)]
    assert len(classes) >= 10 and mpmagic.ParallelError in classes
    for cls in classes:
        exc = cls(*samples.get(cls.__name__, ("one line",)))
        add_note(exc, "a note")  # (ours: BaseException.add_note is 3.11+)
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is cls and str(back) == str(exc) and back.args == exc.args, cls
        assert repr(vars(back)) == repr(vars(exc)), cls  # failures, values, type_name, message, notes


def test_a_big_attribute_error_obj_stays_in_the_worker():
    """AttributeError.obj may be a big frame: it comes home only up to MAX_OBJ_BYTES; its name always."""
    from mpmagic.exc_record import MAX_OBJ_BYTES, capture, rebuild

    for obj, kept in ((b"x" * (MAX_OBJ_BYTES + 1), False), (b"x" * 100, True)):
        try:
            obj.nope  # noqa: B018
        except AttributeError as exc:
            back = rebuild(pickle.loads(pickle.dumps(capture(exc))))
        assert back.name == "nope" and (back.obj == obj if kept else back.obj is None)


def test_a_small_container_of_big_values_is_not_pickled_in_full_to_be_dropped(monkeypatch):
    """AttributeError.obj that is a list of big arrays passed the size check (the list's
    own size is small), was pickled whole by dumps_data on every failure, then dropped."""
    from mpmagic import exc_record, payload

    big = [b"x" * (exc_record.MAX_OBJ_BYTES // 2) for _ in range(40)]  # (20 MB)
    pickled: list = []
    real = payload.dumps_data
    monkeypatch.setattr(payload, "dumps_data", lambda obj, *a: pickled.append(obj) or real(obj, *a))
    written: list[int] = []
    real_write = exc_record._Capped.write
    monkeypatch.setattr(exc_record._Capped, "write", lambda self, data: written.append(len(data)) or real_write(self, data))
    try:
        big.nope  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        back = exc_record.rebuild(pickle.loads(pickle.dumps(exc_record.capture(exc))))
    assert back.name == "nope" and back.obj is None
    assert not any(obj is big for obj in pickled)
    assert sum(written) <= 2 * exc_record.MAX_OBJ_BYTES  # (stopped at the bound, not at 20 MB)
