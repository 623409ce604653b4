"""What a user sees when a task fails: their own frames, named as IPython
names notebook cells ("Cell In[2], line 3"), and one line from us; never a
frame of mpmagic, cloudpickle or multiprocessing (issue 13 class 6, issue 22
item 4).

Cells run with ``store_history=True`` so that they are numbered In[N] as in a
notebook; the text checked is what IPython displays (captured output).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import traceback

import pytest
from conftest import ensure_pool, low_recursion_limit
from IPython.utils.capture import capture_output

import mpmagic

INTERNAL = ("mpmagic/", "mpmagic\\", "cloudpickle", "multiprocessing", "interactiveshell.py", "<parallel-cell-",
            "skipping hidden")  # (IPython's note for frames it hides: ours, with the extension loaded, are gone)
PACKAGE = os.path.dirname(mpmagic.__file__)


@pytest.fixture(scope="module")
def method() -> str:
    """The start method of every ``local_pool`` here: forkserver only.

    A task's traceback is made in the worker and shown by the notebook by the same
    code whichever start method made the worker (spawn cost the suite ~3 s more).
    """
    return "forkserver"


def shown(ip, code: str) -> tuple[int, str, BaseException | None]:
    """Run ``code`` as a numbered cell: (its In[N], the text displayed, its error)."""
    with capture_output() as cap:
        result = ip.run_cell(code, store_history=True)
    return result.execution_count, cap.stdout + cap.stderr, result.error_in_exec


def defined(ip, code: str) -> int:
    n, text, err = shown(ip, code)
    assert err is None, text
    return n


def last_traceback_frames() -> list[tuple[str, str]]:
    """(file, function) of the frames ``%debug`` walks, innermost last (those of the last error shown)."""
    return [(frame.f_code.co_filename, frame.f_code.co_name) for frame, _ in traceback.walk_tb(sys.last_traceback)]


def assert_clean(text: str) -> None:
    for name in INTERNAL:
        assert name not in text, f"{name!r} shown:\n{text}"


def test_a_task_frame_is_named_as_its_cell(ip, local_pool):
    n = defined(ip, "def inverse(x):\n    y = x - 1\n    return 1 / y\n")
    _, text, err = shown(ip, "%pmap inverse, [3, 1]")
    assert isinstance(err, ZeroDivisionError)
    assert_clean(text)
    assert f"Cell In[{n}], line 3" in text and "return 1 / y" in text
    assert "mpmagic: raised by item 1 of the input: inverse(1)" in text
    # As serial map shows it: the cell's line, then the task's frames, nothing between.
    assert "skipping hidden" not in text
    assert re.search(r"----> 1 get_ipython\(\).run_line_magic\('pmap', 'inverse, \[3, 1\]'\)\n\n" + re.escape(f"Cell In[{n}], line 3"), text), text


def test_the_item_note_names_a_partial_and_a_callable_object_as_their_call(ip, local_pool):
    # (both were named "func": "raised by item 2 of the input: func(2)")
    defined(ip, "import functools\ndef pick(a, x, k=0):\n    return a[x + k]\n"
                "class Scaler:\n    def __call__(self, x):\n        return 10 / x\n")
    cases = {"functools.partial(pick, [1, 2], k=1)": ("pick([1, 2], 1, k=1)", [0, 1]),
             "Scaler()": ("<Scaler object>(0)", [1, 0])}  # (not "Scaler(0)": a call of the class)
    for func, (call, items) in cases.items():
        _, _, serial = shown(ip, f"list(map({func}, {items}))")
        _, text, err = shown(ip, f"%pmap -q {func}, {items}")
        assert type(err) is type(serial) and err.__notes__ == [f"mpmagic: raised by item 1 of the input: {call}"], text
        _, _, seeded = shown(ip, f"%pmap -q --seed 1 {func}, {items}")
        assert seeded.__notes__ == err.__notes__


def test_cause_and_effect_both_shown_as_python_does(ip, local_pool):
    n = defined(ip, "def lookup(k):\n    try:\n        return {}[k]\n    except KeyError as e:\n        raise LookupError(k) from e\n")
    _, text, err = shown(ip, "%pmap lookup, ['a']")
    assert isinstance(err, LookupError) and isinstance(err.__cause__, KeyError)
    assert_clean(text)
    assert "The above exception was the direct cause of the following exception" in text
    assert f"Cell In[{n}], line 3" in text and f"Cell In[{n}], line 5" in text


def test_syntax_error_raised_in_a_task(ip, local_pool):
    n = defined(ip, "def parse(src):\n    return compile(src, 'formula', 'eval')\n")
    _, text, err = shown(ip, "%pmap parse, ['1 +']")
    assert type(err) is SyntaxError
    assert_clean(text)
    assert f"Cell In[{n}], line 2" in text and "SyntaxError" in text and "formula" in text


def test_exception_group_shows_its_sub_exceptions(ip, local_pool):
    if sys.version_info < (3, 11):  # (the backport, as anyio, trio and pytest raise them there)
        run_cell = ip.run_cell("from exceptiongroup import ExceptionGroup", store_history=False)
        assert run_cell.success
    n = defined(ip, "def several(x):\n    raise ExceptionGroup('two', [ValueError(x), TypeError('t')])\n")
    _, text, err = shown(ip, "%pmap several, [7]")
    assert type(err).__name__ == "ExceptionGroup"
    assert_clean(text)
    assert f"Cell In[{n}], line 2" in text and "ValueError: 7" in text and "TypeError: t" in text


def test_generator_input_that_raises_shows_the_generator(ip, local_pool):
    n = defined(ip, "def numbers():\n    yield 1\n    raise KeyError('ran dry')\n")
    _, text, err = shown(ip, "%pmap abs, numbers()")
    assert isinstance(err, KeyError)
    assert_clean(text)
    assert f"Cell In[{n}], line 3, in numbers" in text


def test_a_generator_another_thread_is_inside_is_one_line_not_our_frames(ip, local_pool):
    """``ValueError: generator already executing`` (another run, the loop or a thread
    was inside the input's generator when the run read it) showed mpmagic's frames
    only (background.py, streaming.py, jobs.py). It is one line that names the input."""
    defined(ip, "import itertools, threading, mpmagic\n"
                "inside, release = threading.Event(), threading.Event()\n"
                "def held(n):\n    yield from range(3)\n    inside.set()\n    release.wait(60)\n    yield from range(3, n)\n")
    release = ip.user_ns["release"]
    try:
        for line in ("mpmagic.pmap(abs, g)", "%pmap abs, g", "for r in mpmagic.imap(abs, g):\n    pass"):
            release.clear()
            defined(ip, "inside.clear()\ng = held(10)\n"  # (a thread waits inside g: it took items 0-2)
                        "holder = threading.Thread(target=lambda: list(itertools.islice(g, 4)))\n"
                        "holder.start()\nassert inside.wait(30)")
            _, text, err = shown(ip, line)
            release.set()
            ip.user_ns["holder"].join()
            assert_clean(text)
            said = "argument 2 of map (the generator `held`) was being advanced elsewhere while this run read it"
            if line.startswith("%pmap"):  # (the magic says its errors of the input as its usage errors, with its usage)
                assert text.strip().startswith(f"UsageError: %pmap: {said}") and len(text.strip().splitlines()) == 2, text
            else:  # a ValueError still, as Python's was
                assert isinstance(err, ValueError) and isinstance(err, mpmagic.UsageError), text
                assert text.strip().startswith(f"UsageError: {said}") and len(text.strip().splitlines()) == 1, text
    finally:
        release.set()


def test_a_seeded_task_shows_no_frame_of_ours(ip, local_pool):
    # (--seed's wrapper, seeding.Seeded.__call__, was shown between the cell's line and the task)
    n = defined(ip, "def drawn(x):\n    return 1 / x\n")
    for line in ("%pmap --seed 7 drawn, [1, 0]", "mpmagic.pmap(drawn, [1, 0], seed=7)"):
        _, text, err = shown(ip, "import mpmagic\n" + line)
        assert isinstance(err, ZeroDivisionError)
        assert_clean(text)
        assert f"Cell In[{n}], line 2" in text
        frames = last_traceback_frames()
        assert frames[-1][1] == "drawn" and not [f for f in frames if f[0].startswith(PACKAGE)], frames  # (%debug)


def test_every_failing_rank_names_the_cell_and_its_line(ip, local_pool):
    n, text, err = shown(ip, "%%parallel -n 2 -q\nx = rank\nif x >= 0:\n    raise ValueError(f'rank {x}')\n")
    assert type(err).__name__ == "ParallelError"
    assert_clean(text)
    for rank in (0, 1):
        assert f"[rank {rank}] Cell In[{n}], line 4" in text
        assert f"[rank {rank}] ValueError: rank {rank}" in text


def test_a_ranks_warning_shows_its_own_line(ip, local_pool, notebook_warnings):
    # The body is numbered as its cell (the %%parallel line is line 1), as the
    # failing ranks' frames above are, and named as the cell, as serially.
    _, text, err = shown(ip, "%%parallel -n 1 -q\nimport warnings\nx = 'line two'\n"
                             "warnings.warn('raised on line 3')\nNone\n")
    assert err is None, text
    assert re.search(r"\[rank 0\] <ipython-input-\d+-\w+>:4: UserWarning: raised on line 3\n"
                     r"\[rank 0\]   warnings.warn\('raised on line 3'\)\n", text), text


def test_deep_recursion_is_collapsed(ip, local_pool):
    n = defined(ip, "def down(k):\n    return down(k + 1)\n")
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(low_recursion_limit())  # (travels to the worker: fewer frames for IPython to format, the same collapse)
    try:
        _, text, err = shown(ip, "%pmap down, [0]")
    finally:
        sys.setrecursionlimit(before)
    assert isinstance(err, RecursionError)
    assert_clean(text)
    assert "skipping similar frames" in text and f"Cell In[{n}], line 2" in text
    assert len(text.splitlines()) < 40, text


RECURSIONS = ("def down(n):\n    if n == 0: raise ValueError('bottom')\n"
              "    return down(n - 1) if n % 2 else (down(n - 1))\n"  # (two calls on one line, at other columns)
              "def a(n):\n    return b(n) if n else 1 / n\n"
              "def b(n):\n    return a(n - 1) if n % 2 else (a(n - 1))\n"
              "def up(n):\n    return up(n + 1) if n % 3 else (up(n + 1))\n"
              "f = lambda n: g(n); g = lambda n: f(n - 1) if n else 1 / n\n")  # (two functions, one name and line)


def _as_serial(ip, call: str, modes: tuple[str, ...]) -> dict[str, str]:
    """The text IPython shows for ``call`` failing, serially (``list(map(f, x))``) and
    through ``mpmagic.pmap(f, x)``, under each ``%xmode`` of ``modes``: the same but for
    the calling cell's number and text, and mpmagic's one note. Returns the serial
    texts by mode."""
    def text(code: str, *, verbose: bool) -> str:
        n, out, err = shown(ip, code)
        assert err is not None, out
        out = out.replace(f"Cell In[{n}]", "Cell In[CALL]").replace(code, "CALL")
        out = re.sub(r"\nmpmagic: raised by item 0 of the input: .*", "", out)
        out = re.sub(r" at 0x[0-9a-f]+>", " at 0x...>", out)  # (a function's address: the worker's is its own)
        if verbose:  # (an expression's value, `n % 2 = 0`, needs the value itself: the worker sends reprs)
            out = re.sub(r"\n {8}(?![A-Za-z_]\w* = )\S[^\n]* = [^\n]*", "", out)
        if isinstance(err, RecursionError):  # (how deep it got depends on the stack under the call: a worker's is not the notebook's)
            out = re.sub(r"\(\d+ times\)", "(N times)", out)
        return out

    serials = {}
    try:
        for mode in modes:
            ip.run_line_magic("xmode", mode)
            serial = serials[mode] = text(f"list(map({call}))", verbose=mode == "Verbose")
            parallel = text(f"mpmagic.pmap({call})", verbose=mode == "Verbose")
            assert parallel == serial, f"%xmode {mode}\n{parallel}\n----- serially:\n{serial}"
        return serials
    finally:
        ip.run_line_magic("xmode", "Context")


def test_recursion_collapses_as_serially(ip, local_pool):
    """A recursion's frames are skipped as serially: the calls of ``down`` on its
    line 3 fail at two places (``down(n - 1)`` and ``(down(n - 1))``), and the
    rebuilt traceback had a code object per place: IPython (which groups frames
    by code and line) showed an extra frame and "[... skipping similar frames:
    down at line 3 (72 times), down at line 3 (72 times)]" where serial says
    "down at line 3 (17 times)"; mutual recursion likewise. (Lines counted from
    the ``def``: the cell's line 4, as the display says.) A depth of 20 shows it as well as 150 did, at
    a seventh of the cost: IPython's Context and Verbose displays scan every loaded
    module once per frame (``inspect.getmodule``), ~2 ms a frame once the suite
    has loaded pandas, Dask and Jupyter."""
    defined(ip, "import mpmagic\n" + RECURSIONS)
    shown = _as_serial(ip, "down, [20]", ("Plain", "Context", "Verbose"))
    assert "[... skipping similar frames: down at line 4 (17 times)]" in shown["Context"], shown["Context"]
    _as_serial(ip, "a, [10]", ("Plain", "Context", "Verbose"))  # (a and b in turn: 20 frames)
    _as_serial(ip, "f, [20]", ("Context",))
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(low_recursion_limit(50))  # (see test_deep_recursion_is_collapsed)
    try:
        _as_serial(ip, "up, [0]", ("Context",))  # (Plain shows every frame: as many as the depth allows)
    finally:
        sys.setrecursionlimit(before)


ONE_LINERS = ("import mpmagic\ndef c(x): return x\n"
              "def a(x, *args, **kw): return 1/0\n"
              "def b(x):\n    y = 2\n    r = a(x, 5)\n    z = 3\n    return r\n"
              "def key(x, *args): return {}['k']\n"
              "def attr(x, *args): return x.nope\n"
              "def less(x, *args): return x < 'a'\n"
              "def spread(x): return a(x, *range(3), **{str(i): i for i in range(2)})\n"
              "def each(x, f=key): return [f(x, i) for i in range(2)]\n"
              "def chain(x): return attr(x) if x else less(x, key)\n"
              "def put(x, *args): x[0] = -x\n"
              "def loop(x, *args): return [y for y in x]\n"
              "def feed(x): return [y for y in (1 / i for i in range(x))]\n")


def _executing_nodes(err: BaseException) -> list[tuple]:
    """Per frame of the functions of ONE_LINERS: the node of the line that ``executing``
    (IPython's Verbose display, through stack_data) finds failing, and its statement."""
    import executing

    out = []
    for tb in _walk(err.__traceback__):
        if tb.tb_frame.f_code.co_name in ("a", "b", "key", "attr", "less", "spread", "each", "chain", "put", "loop",
                                          "feed", "<listcomp>", "<genexpr>"):
            found = executing.Source.executing(tb)
            out.append((tb.tb_frame.f_code.co_name, tb.tb_lineno, found.node and _node_text(found.node),
                        sorted(type(s).__name__ for s in found.statements)))
    return out


def _walk(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _node_text(node) -> str:
    import ast

    return f"{ast.dump(node)} at {node.lineno}:{node.col_offset}-{node.end_lineno}:{node.end_col_offset}"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 records no columns: executing matches a frame "
                    "by its whole bytecode there, which no rebuilt frame has (see errors.failing_op)")
@pytest.mark.parametrize("call", ["b, [1]", "key, [1]", "attr, [1]", "less, [1]", "spread, [1]", "each, [1]",
                                  "chain, [1]", "chain, [0]", "put, [1]", "loop, [1]", "feed, [1]"])
def test_verbose_one_line_functions_as_serially(ip, local_pool, call):
    """Under ``%xmode Verbose`` a one-line function's frame (``def a(x, *args): return 1/0``)
    shows its line and its variables as serially. The rebuilt frame raised at a
    ``raise`` placed at the failing expression's columns, which ``executing`` cannot
    match to the expression there (``1/0`` is not a raise): it falls back to every
    statement of the line, the ``def`` and its ``return``, and stack_data takes the
    first of that set as the frame's scope, which by chance was the module: the frame
    listed the cell's lines around it, and no variables (tester-regress21, item 3).
    The stub now fails at the same kind of operation (a call, ``/``, a subscript, an
    attribute, a comparison, a store, a loop), so the same node is found."""
    defined(ip, ONE_LINERS)
    for name in ("r", "y", "z", "i"):  # (b's locals and the comprehensions' `i`: serially, Verbose shows a
        ip.user_ns.pop(name, None)  # notebook global of a name on the line that the frame has not bound;
    # an earlier test file's `r` differed, and test_shared's `for i in range(50_000)` left i = 49999, shown
    # in spread's frame serially whenever both files ran in one process)
    _, _, serial = shown(ip, f"list(map({call}))")
    _, _, parallel = shown(ip, f"mpmagic.pmap({call})")
    assert type(parallel) is type(serial)
    assert _executing_nodes(parallel) == _executing_nodes(serial)
    if call not in ("each, [1]", "feed, [1]"):  # (a comprehension's frame shows only its argument, .0: documented)
        _as_serial(ip, call, ("Verbose",))


_SCRIPT = """
import io, sys
import mpmagic
{functions}
def both(f, x):
    texts = []
    for run in (lambda: list(map(f, [x])), lambda: mpmagic.pmap(f, [x])):
        try:
            run()
        except BaseException as exc:
            sys.stderr = out = io.StringIO()
            sys.excepthook(type(exc), exc, exc.__traceback__)  # (Python's own, as for an uncaught error)
            sys.stderr = sys.__stderr__
            texts.append(out.getvalue())
    return texts

if __name__ == "__main__":
    mpmagic.use_local(1, "forkserver")
    for f, x in ((down, 150), (a, 150), (up, 0)):
        print(repr(both(f, x)))
"""


def test_recursion_collapses_as_serially_in_a_script(tmp_path):
    """A plain script's default ``sys.excepthook`` (on CPython 3.11 a C printer,
    which compares frames' file and name strings by identity) says
    "[Previous line repeated 147 more times]" for a task's recursion as for
    the same recursion run serially."""
    import ast
    import subprocess

    script = tmp_path / "recursions.py"
    script.write_text(_SCRIPT.format(functions=RECURSIONS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(PACKAGE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    results = [ast.literal_eval(line) for line in done.stdout.splitlines()]
    assert len(results) == 3, done.stdout
    for serial, parallel in results:
        parallel = re.sub(r"\nmpmagic: raised by item 0 of the input: .*", "", parallel)
        if "RecursionError" in serial:  # (see _as_serial)
            serial, parallel = (re.sub(r"repeated \d+ more", "repeated N more", t) for t in (serial, parallel))
        serial, parallel = (re.sub(r'  File "[^"]*", line \d+, in (both|<lambda>)\n(    .*\n)*', "", t)
                            for t in (serial, parallel))  # (the calling frames: the script's own)
        assert parallel == serial
    assert "[Previous line repeated 147 more times]" in results[0][0], results[0][0]


def test_a_result_the_notebook_cannot_load_is_one_line(ip, local_pool):
    defined(
        ip,
        "def worker_only(x):\n    import sys, types\n"
        "    mod = sys.modules.setdefault('only_in_worker_r', types.ModuleType('only_in_worker_r'))\n"
        "    exec('class Thing:\\n    pass\\n', mod.__dict__)\n    return mod.Thing()\n",
    )
    _, text, err = shown(ip, "%pmap worker_only, [1]")
    assert type(err).__name__ == "SerializationError"
    assert_clean(text)
    assert "cannot be loaded in the notebook" in text and len(text.strip().splitlines()) == 1, text


def test_a_function_that_cannot_load_in_a_worker_shows_no_frame_of_ours(ip, local_pool):
    ip.user_ns["_modname"] = "made_after_the_pool_started"
    defined(ip, "import sys, types\n_m = types.ModuleType(_modname)\n_m.__file__ = '/nowhere.py'\nsys.modules[_modname] = _m\n"
                "exec('def helper(x):\\n    return x', _m.__dict__)\nhelper = _m.helper\n"
                "def needs_it(x):\n    return helper(x)\n")
    try:
        _, text, err = shown(ip, "%pmap needs_it, [1]")
        assert isinstance(err, ModuleNotFoundError)
        assert_clean(text)
        assert "could not be loaded in a worker" in text
    finally:
        import sys

        sys.modules.pop("made_after_the_pool_started", None)


@pytest.mark.parametrize("call", ["abs, [1], [2]", "len, [1, 2]", "one, [1], [2]"])
def test_an_error_with_no_frame_of_the_task_shows_the_calling_line_as_serially(ip, local_pool, call):
    """A builtin's error (``abs()`` of two arguments, ``len(1)``) or a call with the
    wrong arguments raises before any frame of the task's: serially IPython shows the
    cell's line that called the map, then the error. A task's showed the error alone,
    as an error of ours that no call of the function raised (its load failing in the
    worker) does. Now its calling line, in the API and in the magic (whose line IPython
    shows as its call, ``get_ipython().run_line_magic(...)``, as for any task's error)."""
    defined(ip, "import mpmagic\ndef one(x):\n    return x\n")
    _as_serial(ip, call, ("Plain", "Context", "Verbose"))
    n, serial, _ = shown(ip, f"list(map({call}))")
    m, parallel, err = shown(ip, f"%pmap -q {call}")
    assert isinstance(err, TypeError) and "mpmagic: raised by item 0 of the input" in parallel, parallel
    assert "_render_traceback_" not in vars(err)  # (its vars as serially)
    assert_clean(parallel)
    assert parallel.replace(f"Cell In[{m}]", f"Cell In[{n}]").replace(
        f"get_ipython().run_line_magic('pmap', '-q {call}')", f"list(map({call}))").startswith(serial.rstrip("\n")), \
        (parallel, serial)


# --------------------------------------------------------------------------
# A real kernel: ipykernel names cells /tmp/ipykernel_NNN/NNN.py

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_real_kernel_shows_cell_numbers_for_tasks_and_ranks(kernel):
    kernel.ok("def halve(x):\n    assert x % 2 == 0, f'odd {x}'\n    return x // 2\n")  # In[2]
    reply = kernel.execute("%pmap halve, [2, 3]")
    assert reply.status == "error" and reply.ename == "AssertionError"
    text = ANSI.sub("", "\n".join(line for t, c in reply.outputs if t == "error" for line in c["traceback"]))
    assert_clean(text)
    assert "Cell In[2], line 2, in halve" in text and "ipykernel_" not in text, text
    assert re.search(r"----> 2\s+assert x % 2 == 0", text), text  # the arrow on the failing line
    assert "skipping hidden" not in text

    reply = kernel.execute("%%parallel -n 2 -q\ny = 1\nassert rank == 0, 'not rank 0'\n")  # In[4]
    assert reply.status == "error"
    shown_text = ANSI.sub("", reply.stream("stderr") + "\n".join(
        line for t, c in reply.outputs if t == "error" for line in c["traceback"]))
    assert_clean(shown_text)
    assert "[rank 1] Cell In[4], line 3" in shown_text and "ipykernel_" not in shown_text, shown_text


def _kernel_frame_headers(reply) -> list[str]:
    """The "Cell In[N], line L, in f(...)" lines of a kernel cell's error."""
    text = ANSI.sub("", "\n".join(line for t, c in reply.outputs if t == "error" for line in c["traceback"]))
    return re.findall(r"^Cell In\[\d+\], line \d+, in .*$", text, flags=re.M)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="frames are named by their qualified name from 3.11")
def test_real_kernel_names_task_frames_by_their_qualified_name_as_serially(kernel):
    """A kernel names a method's frame ``in Model.predict(self, x)`` and a nested
    function's ``in Model.scale.<locals>.inner(y)`` (the code's qualified name);
    a task's said ``in predict(self, x)`` and ``in inner(y)``."""
    kernel.ok("class Model:\n    def __init__(self, k):\n        self.k = k\n"
              "    def predict(self, x):\n        return self.scale(x)\n"
              "    def scale(self, x):\n        def inner(y):\n            return y / self.k\n"
              "        return inner(x)\n"
              "model = Model(0)\n")
    serial = kernel.execute("list(map(model.predict, [1]))")
    parallel = kernel.execute("%pmap -q model.predict, [1]")
    assert serial.ename == parallel.ename == "ZeroDivisionError"
    headers = _kernel_frame_headers(parallel)
    assert headers[-3:] == _kernel_frame_headers(serial)[-3:], (serial.outputs, parallel.outputs)
    assert headers[-1].endswith("in Model.scale.<locals>.inner(y)") and headers[-3].endswith(
        "in Model.predict(self, x)"), headers


# --------------------------------------------------------------------------
# Where on the line: Python 3.11+ marks the failing expression (``~~^~~``)


def _frame_lines(exc: BaseException, filename: str) -> list[str]:
    """The lines Python's traceback module shows for the frame(s) in ``filename``."""
    import traceback

    lines = "".join(traceback.format_exception(exc)).splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith(f'  File "{filename}"'):
            out += [line] + [rest for rest in lines[i + 1:i + 3] if rest.startswith("    ")]
    return out


def test_the_failing_expression_is_marked_as_in_serial_python(tmp_path, local_pool):
    import mpmagic

    path = tmp_path / "tasks_tb.py"
    path.write_text("def f(x):\n    y = 0; return 1 / x + y  # a longer line\n")
    namespace: dict = {"__name__": "tasks_tb"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 (by value to the workers)
    f = namespace["f"]
    try:
        list(map(f, [1, 0]))
    except ZeroDivisionError as exc:
        serial = _frame_lines(exc, str(path))
    try:
        mpmagic.pmap(f, [1, 0], workers=2)
    except ZeroDivisionError as exc:
        parallel = _frame_lines(exc, str(path))
    assert parallel == serial, (parallel, serial)
    if sys.version_info >= (3, 11):
        assert serial[-1] == "                  ~~^~~", serial  # (what Python shows: the test checks itself)


def test_no_marks_where_the_worker_had_no_columns():
    import traceback

    from mpmagic.errors import FrameInfo, fake_traceback

    tb = fake_traceback([FrameInfo(__file__, 3, "f", None, 1)])  # columns unknown (Python 3.10, say)
    exc = ZeroDivisionError("x")
    text = "".join(traceback.format_exception(ZeroDivisionError, exc, tb))
    assert "^" not in text and "~" not in text, text


def test_a_rank_under_time_above_parallel_is_named_as_its_cell(ip, local_pool):
    """%%time above %%parallel: a failing rank said `<parallel-cell-...>:2` (the body's own lines)."""
    n, text, _ = shown(ip, "%%time\n%%parallel -n 2 -q\nv = rank\n1 / rank")
    assert f"[rank 0] Cell In[{n}], line 4" in text and "<parallel-cell-" not in text, text


def test_a_ranks_error_of_ours_is_one_line_naming_the_variable_as_pmaps_is(ip, local_pool):
    """tutorial22 #1: a rank's ``q.get()`` (``q.put()``) on a closed mpmagic.Queue showed a
    full traceback through three frames of mpmagic/shared/queues.py, where %pmap and the
    notebook show the error's one line; and both named the queue by its /dev/shm segment
    (``mpmagic.Queue mpsh20511_..._c4216039``), not by the notebook's ``q``."""
    defined(ip, "import mpmagic\nq = mpmagic.Queue()\nq.close()\ndef g(x):\n    return q.get()\n")
    _, mapped, err = shown(ip, "%pmap g, range(2)")
    assert "QueueClosed: mpmagic.Queue 'q' is closed and every item has been taken" in mapped, mapped
    for body, line in (("q.get()", "QueueClosed: mpmagic.Queue 'q' is closed and every item has been taken"),
                       ("q.put(rank)", "UsageError: mpmagic.Queue 'q' is closed: nothing more can be put in it")):
        _, text, err = shown(ip, f"%%parallel -n 2\n{body}")
        assert isinstance(err, mpmagic.ParallelError), text
        for rank in (0, 1):
            assert f"[rank {rank}] {line}" in text and f"[rank {rank}] mpmagic: raised by rank {rank} of 2" in text, text
        assert "queues.py" not in text and "Traceback" not in text and "mpsh" not in text, text
        assert line in str(err), str(err)
    # A user's own error still shows its frames (the cell's line), as before.
    _, text, _ = shown(ip, "%%parallel -n 2\n1 / 0")
    assert "[rank 0] ZeroDivisionError" in text and "----> 2 1 / 0" in text.replace("\x1b", ""), text


def test_a_helper_no_variable_names_is_described_never_by_its_segment(ip, local_pool):
    """The notebook's own call, and a rank's error where two queues made in one cell are
    not told apart by a name of their own: how and where it was made (``mpmagic.Queue(maxsize=3)
    made in cell In[N]``), never only the segment's name; alike ones in one list are ``in 'qs'``."""
    n = defined(ip, "import mpmagic\nbounded = mpmagic.Queue(maxsize=3)\nbounded.close()\n")
    _, text, err = shown(ip, "bounded.get()")
    assert str(err) == f"mpmagic.Queue(maxsize=3) made on line 2 of cell In[{n}] is closed and every item has been taken"
    # Made on one line, in one list: alike, and both "in 'qs'" (not `each`, bound to the last).
    defined(ip, "qs = [mpmagic.Queue(), mpmagic.Queue()]\nfor each in qs:\n    each.close()\n")
    _, text, err = shown(ip, "%%parallel -n 2\nqs[rank].get()")
    assert "[rank 1] QueueClosed: mpmagic.Queue in 'qs' is closed and every item has been taken" in text, text
    # Made in one cell, on two lines: each named by its own variable.
    defined(ip, "first_q = mpmagic.Queue()\nsecond_q = mpmagic.Queue()\nfirst_q.close()\n")
    _, text, err = shown(ip, "%%parallel -n 2\nif rank == 0:\n    first_q.get()\nelse:\n    second_q.qsize()")
    assert "[rank 0] QueueClosed: mpmagic.Queue 'first_q' is closed" in text, text
    # Made on one line, and named apart: described (how and where), never by the segment.
    one, other = mpmagic.Queue(), mpmagic.Queue()
    one.close()
    ip.user_ns.update(one_q=one, other_q=other)
    _, text, err = shown(ip, "%%parallel -n 2\nif rank == 0:\n    one_q.get()\nelse:\n    other_q.qsize()")
    assert "[rank 0] QueueClosed: mpmagic.Queue made on line " in text and " of test_tracebacks.py is closed" in text
    assert "mpsh" not in text, text
    for name in ("one_q", "other_q", "first_q", "second_q", "qs", "each", "bounded"):
        ip.user_ns.pop(name, None)
    del one, other


def _tenth(x: int) -> float:
    return 10 // (x - 2)


def test_a_script_sees_its_own_line_then_the_task_frames(local_pool):
    """Outside IPython (a script, ``traceback.format_exc()`` in its ``except``), a task's
    error shows the caller's line and the task's frames, no frame of mpmagic (report
    migrate14 finding 8: api.py's pmap and jobs.py's results stood between them)."""
    calls = {
        "pmap": lambda: mpmagic.pmap(_tenth, range(4), workers=2),
        "submit": lambda: mpmagic.submit(_tenth, range(4), workers=2).result(),
        "imap": lambda: list(mpmagic.imap(_tenth, range(4), workers=2)),
    }
    for name, call in calls.items():
        try:
            call()
        except ZeroDivisionError:
            text = traceback.format_exc()
        else:
            raise AssertionError(f"{name}: no error")
        files = re.findall(r'File "([^"]+)", line \d+, in (\w+)', text)
        ours = [fn for f, fn in files if f.startswith(PACKAGE)]
        if sys.version_info >= (3, 11):
            assert files and not ours, (name, text)
        else:  # a bare raise keeps the frame its except caught in: the API's own, and only it (see hide_our_frames)
            assert files and len(ours) == 1 and files[-2][0].startswith(PACKAGE), (name, text)
        assert [fn for _, fn in files][-1] == "_tenth", (name, text)


@pytest.mark.parametrize("code, line", [
    ("q = mpmagic.Queue(); q.close(); q.put(1)", "UsageError: mpmagic.Queue "),
    ("mpmagic.submit(abs, [1], bogus=1)", "TypeError: submit() got an unexpected keyword argument 'bogus'"),
    ("mpmagic.imap(abs, [1], bogus=1)", "TypeError: imap() got an unexpected keyword argument 'bogus'"),
])
def test_our_refusals_of_a_put_and_a_keyword_are_one_line_without_our_frames(ip, code, line):
    """``put`` on a closed queue showed queues.py:624 (``get`` was one line); a bad keyword, api.py's frame."""
    _, text, err = shown(ip, f"import mpmagic\n{code}")
    assert err is not None and text.strip().startswith(line) and len(text.strip().splitlines()) == 1, text
    assert_clean(text)


def test_python_3_10s_hook_prints_the_item_note_and_no_frame_of_ours(pool2, capsys, monkeypatch):
    """Python 3.10 prints no ``__notes__``: a plain script lost "raised by item 3 of the
    input" and showed api.py's frame. The hook mpmagic gives 3.10 (in place of Python's
    own only) prints them as 3.11 does, without our frames (a refusal raised deep in
    mpmagic has four), and each note once also where the ``exceptiongroup`` backport has
    patched ``TracebackException`` to print notes (pytest 9 imports it on 3.10: every
    note was printed twice)."""
    from mpmagic import errors

    def inverse(x):
        return 1 / x

    wanted = {"failed": "ZeroDivisionError: division by zero\nmpmagic: raised by item 1 of the input: inverse(0)",
              "refused": "mpmagic.errors.UsageError: workers must be a whole number of at least 1, or -1 / None "
                         "(the whole pool), not 'x'"}
    for what, call in (("failed", lambda: mpmagic.pmap(inverse, [1, 0])),
                       ("refused", lambda: mpmagic.pmap(abs, [1], workers="x"))):
        with pytest.raises(Exception) as info:
            call()
        capsys.readouterr()
        errors.print_with_notes(info.type, info.value, info.value.__traceback__)
        shown = capsys.readouterr().err
        assert shown.startswith("Traceback (most recent call last):\n"), shown
        assert shown.endswith(f"{wanted[what]}\n") and f"{os.sep}mpmagic{os.sep}" not in shown, shown
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.delitem(sys.modules, "exceptiongroup", raising=False)  # (a script that has not imported it)
    errors._show_notes_at_top_level()
    assert sys.excepthook is errors.print_with_notes
    monkeypatch.setattr(sys, "excepthook", print)  # another hook (IPython's): left alone
    errors._show_notes_at_top_level()
    assert sys.excepthook is print


def test_python_3_10s_hook_leaves_an_error_without_notes_or_our_frames_to_python(capsys):
    """Once a map's failure got its note, the hook mpmagic gives 3.10 printed every
    later error of the script, serial ones too, without what only Python's own printer
    adds there: "Did you mean: 'append'?" (the ``traceback`` module adds it from 3.12)."""
    from mpmagic import errors

    try:
        [].apend  # noqa: B018
    except AttributeError as error:
        exc = error
    sys.__excepthook__(type(exc), exc, exc.__traceback__)
    python = capsys.readouterr().err
    errors.print_with_notes(type(exc), exc, exc.__traceback__)
    assert capsys.readouterr().err == python
    assert python.endswith("Did you mean: 'append'?\n"), python


def test_python_3_10s_hook_keeps_did_you_mean_of_an_error_raised_while_handling_a_maps(capsys):
    """A script's NameError in the ``except`` around a failed map (whose error has our
    note) went to the hook's own printing, for the note: it lost Python's "Did you mean:
    'values'?" (only Python's printer adds it before 3.12)."""
    from mpmagic import errors

    def inverse(x):
        return 1 / x

    values = [1, 0]
    try:
        try:
            mpmagic.pmap(inverse, values)
        except ZeroDivisionError:
            valuse  # noqa: B018, F821
    except NameError as error:
        exc = error
    errors.print_with_notes(type(exc), exc, exc.__traceback__)
    shown = capsys.readouterr().err
    assert "mpmagic: raised by item 1 of the input: inverse(0)\n" in shown, shown
    assert shown.endswith("NameError: name 'valuse' is not defined. Did you mean: 'values'?\n"), shown
    del values


@pytest.fixture
def few_globals(ip):
    """The notebook's namespace with IPython's own names only (``__name__``, ``In``, ``_i``),
    for the test: those earlier tests and cells left (``_i12``, ``_12``, their
    definitions) are set aside, and come back after it, and the test's own go. Python
    offers no "Did you mean" among too many names (see ``errors._MAX_SCOPE_NAMES``),
    so what a NameError suggests depends on how long the session ran."""
    ns = ip.user_ns

    def extra(name: str) -> bool:
        return not (name in ip.user_ns_hidden or name.startswith("__") or name in ("_", "_i", "_ii", "_iii"))

    aside = {name: value for name, value in ns.items() if extra(name)}
    for name in aside:
        del ns[name]
    yield ns
    for name in [name for name in ns if extra(name)]:
        del ns[name]
    ns.update(aside)


def _said(ip, capsys, calls: list[str]) -> list[str]:
    """The NameError line Python's printer (a script's ``sys.excepthook``) prints for
    each call's error (a %%parallel cell's: its rank 0's)."""
    said = []
    for call in calls:
        _, text, exc = shown(ip, call)
        exc = exc.failures[0] if isinstance(exc, mpmagic.ParallelError) else exc
        assert isinstance(exc, NameError), text
        sys.__excepthook__(type(exc), exc, exc.__traceback__)
        said += [line for line in capsys.readouterr().err.splitlines() if line.startswith("NameError")]
    return said


def _many_globals(ns: dict, count: int = 800) -> None:
    """A long session's namespace: more names than Python suggests from."""
    ns.update((f"_dummy_{i}", None) for i in range(count))


@pytest.mark.parametrize("globals_", ["few", "many"])
@pytest.mark.parametrize("body, name, local", [
    ("return totls + x", "totals", False),  # the notebook's global
    ("local_total = x\n    return locl_total", "local_total", True),  # the function's own variable
])
def test_a_tasks_name_error_suggests_what_serial_python_suggests(ip, local_pool, capsys, few_globals, globals_,
                                                                 body, name, local):
    """Python's printer (a script's ``sys.excepthook``, ``traceback`` from 3.12) adds
    "Did you mean: 'totals'?" to a NameError from the names of the frame that raised
    it. A task's came without it: that frame is the worker's, and the notebook's copy
    of it (``errors.fake_traceback``) had none of its names. The worker finds the name
    and the copy carries it. With more than 750 notebook globals (a long session's
    ``_i12`` names) Python suggests no global, but still the function's own variable
    (3.11, 3.12: its printer checks the code's variables, the globals and the
    builtins each on its own), where %pmap's said nothing: the notebook looked for the
    name among its globals only."""
    if globals_ == "many":
        _many_globals(few_globals)
    defined(ip, f"totals = 5\ndef typo(x):\n    {body}\n")
    said = _said(ip, capsys, ["typo(1)", "%pmap -q typo, [1]"])
    suggests = globals_ == "few" or (local and sys.version_info < (3, 13))  # (3.13: 750 names at most, all joined)
    assert said[0].endswith(f". Did you mean: '{name}'?") if suggests else "Did you mean" not in said[0], said
    assert said == [said[0]] * 2, said


@pytest.mark.parametrize("globals_", ["few", "many"])
def test_a_parallel_cells_name_error_suggests_what_serial_python_suggests(ip, local_pool, capsys, few_globals,
                                                                          globals_):
    """A %%parallel cell's frame is a module's: its names are the notebook's globals,
    with those the cell bound before the error (``cell_total`` here: the serial run,
    second, binds it too)."""
    if globals_ == "many":
        _many_globals(few_globals)
    cell = "cell_total = 1\ncell_totl + rank"
    said = _said(ip, capsys, [f"%%parallel -n 1 -q\n{cell}", f"rank = 0\n{cell}"])
    if globals_ == "few":
        assert said[0].endswith(". Did you mean: 'cell_total'?"), said
    assert said == [said[0]] * 2, said


def _said_by_both(ip, calls: list[str]) -> list[tuple[str, str]]:
    """The NameError line of each call's error (a %%parallel cell's: its rank 0's) as
    ``sys.excepthook``'s printer (a script's) and as the ``traceback`` module
    (``traceback.print_exc``, ``logging.exception``) print it: on Python 3.12 their rules differ."""
    said = []
    for call in calls:
        _, text, exc = shown(ip, call)
        exc = exc.failures[0] if isinstance(exc, mpmagic.ParallelError) else exc
        assert isinstance(exc, NameError), text
        printed = io.StringIO()
        with contextlib.redirect_stderr(printed):
            sys.__excepthook__(type(exc), exc, exc.__traceback__)
        hook = [line for line in printed.getvalue().splitlines() if line.startswith("NameError")]
        listed = [line for line in "".join(traceback.format_exception(exc)).splitlines() if line.startswith("NameError")]
        said.append((hook[-1], listed[-1]))
    return said


@pytest.mark.parametrize("code, cell", [
    ("def typo(x):\n    if x > 5:\n        total = 1\n    return totl + x\n", False),  # a local not bound yet
    ("def _make():\n    total = 1\n    def typo(x):\n        return (total, totl)\n    return typo\n"
     "typo = _make()\n", False),  # a closure's variable
    ("def typo(x):\n    total = 1\n    return totl + x\n", False),  # a bound local, past 750 globals
    ("def typo(x):\n    return lenn(x)\n", False),  # a builtin, past 750 globals
    ("", True),  # a %%parallel cell's own name among 400 globals (the traceback module counts them twice)
])
def test_each_printer_suggests_for_a_tasks_name_error_what_it_suggests_serially(ip, local_pool, few_globals,
                                                                                 code, cell):
    """Python 3.12's two printers of "Did you mean" differ even serially: ``sys.excepthook``'s
    checks the code's variables (bound or not), the globals and the builtins each on its
    own (a list of 750 names or more skipped); the ``traceback`` module's
    (``traceback.print_exc``, ``logging.exception``) the bound variables, closure ones too, globals and
    builtins joined (none past 750 in all). A task's copy followed the excepthook's
    answer for both: ``traceback`` suggested 'total' for a local not bound yet, and none
    for a closure's variable, where serially the reverse. Each says what it says serially."""
    if cell:
        _many_globals(few_globals, 400)
        calls = ["%%parallel -n 1 -q\ncell_total = 1\ncell_totl + rank", "rank = 0\ncell_total = 1\ncell_totl + rank"]
    else:
        if "lenn" in code or "total = 1\n    return" in code:
            _many_globals(few_globals)
        defined(ip, code)
        calls = ["typo(1)", "%pmap -q typo, [1]"]
    said = _said_by_both(ip, calls)
    assert said[1] == said[0], said


@pytest.mark.parametrize("kind", ["forkserver", "spawn"])
@pytest.mark.parametrize("code", [
    "totals = 5\ndef typo(x):\n    return totals + totls\n",  # the notebook's global
    "def typo(x):\n    totals = x + 4\n    return totals + totls\n",  # the function's own variable
    "def typo(totals):\n    return totals + totls\n",  # its parameter
    "def typo(x):\n    return abs(x) + abss(x)\n",  # a builtin (Verbose shows none)
])
def test_a_suggested_name_on_the_failing_line_shows_its_value_as_serially(ip, few_globals, kind, request, code):
    """The copy of a NameError's last frame has the name Python suggests ("Did you
    mean: 'totals'?") among its globals, for the notebook's printer to suggest it
    (``errors.fake_traceback``): valued None, ``%xmode Verbose`` showed ``totals = None``
    on ``return totals + totls`` where serial shows the notebook's ``totals = 5``, or
    the function's own variable's value."""
    ensure_pool(kind, request)
    defined(ip, "import mpmagic\n" + code)
    shown_ = _as_serial(ip, "typo, [1]", ("Plain", "Context", "Verbose"))
    assert re.search(r"\btotals = [15]\b", shown_["Verbose"]) if "totals" in code else "abs = " not in shown_["Verbose"], \
        shown_["Verbose"]


def _frame_headers(text: str) -> list[str]:
    """The "Cell In[N], line L, in f(...)" lines of a displayed traceback."""
    return re.findall(r"^Cell In\[\d+\], line \d+, in .*$", text, flags=re.M)


def test_task_frames_name_their_arguments_as_serial_ipython_does(ip, local_pool):
    """Each task frame's header lists its function's parameters, as for a local
    error: ``in outer(a, b, *rest, c, **kw)``, not ``in outer()`` (tester-exc
    report, item 6); under ``%xmode Verbose`` the raising frame's values are the
    worker's reprs."""
    defined(ip, "def inner(x, y=2):\n    return 10 / x\n"
                "def outer(a, /, b, *rest, c=0, **kw):\n    return inner(a - b)\n"
                "def call(v):\n    return outer(v, v, c=1)\n")
    _, serial, _ = shown(ip, "list(map(call, [1]))")
    _, parallel, err = shown(ip, "%pmap call, [1]")
    assert isinstance(err, ZeroDivisionError)
    assert_clean(parallel)
    headers = _frame_headers(parallel)
    assert headers[-3:] == _frame_headers(serial)[-3:], (serial, parallel)
    assert headers[-1].endswith("in inner(x, y)") and headers[-2].endswith("in outer(a, b, c, *rest, **kw)"), parallel
    ip.run_line_magic("xmode", "Verbose")
    try:
        _, verbose, err = shown(ip, "%pmap call, [1]")
    finally:
        ip.run_line_magic("xmode", "Context")
    assert isinstance(err, ZeroDivisionError)
    verbose_headers = _frame_headers(verbose)
    assert verbose_headers[-1].endswith("in inner(x=0, y=2)"), verbose
    assert verbose_headers[-2].endswith("in outer(a=1, b=1, c=1, *rest=(), **kw={})"), verbose


def _verbose(ip, code: str) -> tuple[list[str], BaseException | None]:
    """The frame headers ``code`` shows under ``%xmode Verbose`` (``in f(x=1)``),
    and its error. (IPython's lists of the variables of each frame's line, which
    follow, show what serial Python evaluates there, ``x + 1 = 2``: the worker
    sends the arguments' reprs, not the values.)"""
    ip.run_line_magic("xmode", "Verbose")
    try:
        _, text, err = shown(ip, code)
    finally:
        ip.run_line_magic("xmode", "Context")
    return _frame_headers(text), err


@pytest.mark.parametrize("kind", ["fork", "spawn", "forkserver", "dask"])
def test_verbose_shows_each_frames_arguments_as_serially(ip, kind, request):
    """Under ``%xmode Verbose`` IPython heads each frame with its arguments' values.
    A task's outer frames showed ``outer(x=<not sent>, y=<not sent>)`` and every
    frame's ``*args`` / ``**kwargs`` ``()`` / ``{}`` (only the raising frame's
    named arguments came home). Now each frame's come as the worker's reprs:
    ``*args`` past the 20 IPython shows (then "..."), a ``**kwargs`` key that is
    the name of a positional-only parameter, a generator expression's ``.0``."""
    ensure_pool(kind, request)
    defined(ip, "import mpmagic\ndef inner(a, *rest, **kw):\n    return sum(1 / (r - 6) for r in rest)\n"
                "def outer(x, y=3):\n    return inner(x + 1, 5, 6, k=7)\n"
                "def first(a, /, *many, b=None, **kw):\n    return outer(a, y=len(many))\n"
                "def call(v):\n    return first(v, *range(30), b=[1, 'two'], a=2, z=None)\n")
    serial, serial_err = _verbose(ip, "list(map(call, [1]))")
    assert [h.split(", in ")[1] for h in serial] == [
        "call(v=1)",
        "first(a=1, b=[1, 'two'], *many=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, ...), "
        "**kw={'a': 2, 'z': None})",
        "outer(x=1, y=30)", "inner(a=2, *rest=(5, 6), **kw={'k': 7})", "<genexpr>(.0=<tuple_iterator object>)"], serial
    for code in ("%pmap call, [1]", "mpmagic.pmap(call, [1])"):
        parallel, err = _verbose(ip, code)
        assert type(err) is type(serial_err) is ZeroDivisionError
        assert parallel == serial, (code, serial, parallel)


def _variables(text: str) -> list[str]:
    """The ``name = value`` lines ``%xmode Verbose`` lists under a frame's failing line
    (not an expression's, ``x - 2 = 0``: the worker sends reprs, not values)."""
    return re.findall(r"^ {8}[A-Za-z_]\w* = .*$", text, flags=re.M)


def test_verbose_lists_the_raising_frames_own_variables_as_serially(ip, local_pool):
    """Under ``%xmode Verbose`` IPython lists the variables of a frame's failing line
    with their values: serially ``x = 2`` under ``y = 1 / (x - 2)``. A rank's frame
    (a %%parallel cell's own code) listed none, and a task's only its arguments: the
    notebook's copy of the raising frame had no other variable. The worker's reprs of
    that frame's variables (``debugging.failure_context``) are the copy's now: the
    rank's and the task's values, never the notebook's ``x``."""
    defined(ip, "import mpmagic\ndef doubled(v):\n    x = v * 2\n    return 1 / (x - 2)\n")
    ip.user_ns["x"] = 100
    serial = _as_serial(ip, "doubled, [1]", ("Verbose",))["Verbose"]
    assert _variables(serial) == ["        x = 2"], serial
    ip.run_line_magic("xmode", "Verbose")
    try:
        _, serial, _ = shown(ip, "rank = 1\nx = rank * 2\ny = 1 / (x - 2)")
        ip.user_ns["x"] = 100
        _, parallel, err = shown(ip, "%%parallel -n 2 -q\nx = rank * 2\ny = 1 / (x - 2)")
    finally:
        ip.run_line_magic("xmode", "Context")
        for name in ("x", "rank"):
            ip.user_ns.pop(name, None)
    assert isinstance(err, mpmagic.ParallelError) and list(err.failures) == [1], parallel
    rank_1 = "\n".join(line.removeprefix("[rank 1] ") for line in parallel.splitlines() if line.startswith("[rank 1]"))
    assert _variables(rank_1) == _variables(serial) == ["        x = 2"], (rank_1, serial)


def test_verbose_lists_the_failing_lines_variables_of_a_frame_with_many(ip, local_pool):
    """The worker sends the reprs of 20 of the raising frame's variables (``debugging.MAX_LOCALS``):
    the first 20, which for a rank were the notebook's names the cell reads, never the
    ``x`` of its failing line. Those of the failing line go first."""
    names = [f"given_{i}" for i in range(25)]
    ip.user_ns.update(dict.fromkeys(names, 0))
    cell = f"total = {' + '.join(names)}\nx = rank * 2\ny = 1 / (x - total)"
    try:
        ip.run_line_magic("xmode", "Verbose")
        _, serial, _ = shown(ip, f"rank = 0\n{cell}")
        _, text, err = shown(ip, f"%%parallel -n 1 -q\n{cell}")
    finally:
        ip.run_line_magic("xmode", "Context")
        for name in [*names, "rank", "total", "x"]:
            ip.user_ns.pop(name, None)
    assert isinstance(err, mpmagic.ParallelError), text
    assert _variables(text.replace("[rank 0] ", "")) == _variables(serial) == ["        total = 0", "        x = 0"], \
        (text, serial)


def test_verbose_arguments_whose_repr_fails_or_hangs_do_not_stop_the_error(ip, local_pool):
    """An argument's repr is taken in the worker as the raising frame's locals are:
    one that raises shows why, one that hangs is stopped after a second (the
    second all the reprs of a failure may take: an object's after it is not
    taken, a builtin value's still is), and the task's own exception comes home."""
    defined(ip, "import time\n"
                "class Broken:\n    def __repr__(self):\n        raise ValueError('no repr')\n"
                "class Slow:\n    def __repr__(self):\n        time.sleep(20)\n        return 'slow'\n"
                "def leaf(v):\n    return 1 / v\n"
                "def middle(broken, slow, *rest):\n    return leaf(0)\n"
                "def top(x):\n    return middle(Broken(), Slow(), x, Broken())\n")
    headers, err = _verbose(ip, "%pmap top, [4]")
    text = "\n".join(headers)
    assert isinstance(err, ZeroDivisionError)
    assert "in top(x=4)" in text and "in leaf(v=0)" in text, text
    assert ("in middle(broken=<Broken: repr failed: ValueError>, slow=<Slow object: its repr took over 1 s and was "
            "stopped>, *rest=(4, <Broken object: repr not taken, the reprs of the locals before it took the 1 s "
            "they may>))") in text, text


def test_a_deep_recursion_sends_the_arguments_of_its_first_and_last_frames_only():
    """A RecursionError has a thousand frames: the worker sends the arguments of
    the innermost ARGUMENT_FRAMES_INNER and outermost ARGUMENT_FRAMES_OUTER (what
    IPython shows of it: the outer frames, the first repeats, the last), the
    innermost first, all within ARGUMENT_CHARS; the others are not sent."""
    from mpmagic import debugging, errors

    def down(k, text):
        return down(k + 1, text)

    def catch():
        try:
            down(0, "x" * 10_000)
        except RecursionError as exc:
            return exc

    def sent(arguments_chars: int) -> tuple[list[errors.FrameInfo], list[int]]:
        debugging.new_unit()
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(debugging, "ARGUMENT_CHARS", arguments_chars)
                with debugging.FailureReprs() as reprs:
                    frames = errors.extract_frames(catch().__traceback__, reprs.arguments)
        finally:
            debugging.end_unit()
        return frames, [i for i, f in enumerate(frames) if f.values is not None and f.values.named]

    frames, with_values = sent(10 ** 6)
    n = len(frames)
    assert n > 100 and frames[0].name == "catch" and frames[1].name == "down"
    assert with_values == [*range(1, errors.ARGUMENT_FRAMES_OUTER), *range(n - errors.ARGUMENT_FRAMES_INNER, n)]
    assert frames[1].values.named == {"k": "0", "text": repr("x" * 10_000)[:debugging.MAX_REPR - 3] + "..."}
    assert frames[-1].values.named["k"] == str(n - 2)
    frames, with_values = sent(4000)  # (a text of 200 characters per frame: 20 of them fit)
    assert with_values == [*range(n - errors.ARGUMENT_FRAMES_INNER, n)]  # (the innermost frames first)
    tb = errors.fake_traceback(frames)
    headers = [repr(frame.f_locals.get("k")) for frame, _ in traceback.walk_tb(tb)]
    assert headers[1:3] == ["<not sent>", "<not sent>"] and headers[-1] == str(n - 2)


def test_a_frame_of_a_setup_function_shows_its_line(ip, local_pool):
    """A task failing inside a function the %%pool setup defined showed IPython's
    'Could not get source' for that frame (the notebook never had ``<pool-setup>``
    in its linecache), in %pmap, in %%parallel's [rank N] tracebacks and in
    ``traceback.format_exception`` of a collected failure; serially the line shows."""
    from mpmagic import setup_api

    defined(ip, "%%pool setup\nLIMIT = 3\ndef _check(x):\n    if x >= LIMIT:\n        raise ValueError(f'{x} too big')\n"
                "    return x\n")
    try:
        defined(ip, "def _via_setup(x):\n    return _check(x)")
        for code in ("%pmap -q _via_setup, range(5)", "%%parallel -n 2 -q\n_check(rank + 3)"):
            _, text, err = shown(ip, code)
            assert err is not None, text
            assert "Could not get source" not in text and "raise ValueError(f'{x} too big')" in text, text
            assert "<pool-setup>:5" in text, text  # (line 5 of the cell: the %%pool setup line is line 1)
        _, text, err = shown(ip, "import traceback\nout = %pmap -q --errors collect _via_setup, range(5)\n"
                                 "print(''.join(traceback.format_exception(out[3].error)))")
        assert err is None, text
        assert "raise ValueError(f'{x} too big')" in text, text
    finally:
        setup_api.clear()
