"""Inputs of %pmap compared with serial map() (issue 13, class 5).

The oracle is plain ``map(...)`` with the same argument text, run in the
same notebook-like shell: same values, or the same exception (type and
message). Also: ``--compare`` with an endless iterator among several, a
``range`` too long for ``len()``, and ``pmap`` called inside a task.
"""

from __future__ import annotations

import itertools
import threading
import traceback

import pytest
from conftest import run
from IPython.utils.capture import capture_output

import mpmagic
from mpmagic import api

SETUP = (
    "import itertools\n"
    "import numpy as np\n"
    "def inc(x):\n    return x + 1\n"
    "def pair(a, b):\n    return (a, b)\n"
    "def raises_at_3():\n"
    "    yield 1\n    yield 2\n"
    "    raise ValueError('bad record at 3')\n"
    # Long rather than endless: a regression then fails fast instead of eating memory.
    "def very_long():\n    yield from range(10**7)\n"
    # The function fails at item 5, the input only at 8: serial map raises item 5's
    # error (pmap raised the input's, which it met first while reading ahead).
    "def fails_at_5(x):\n    if x == 5:\n        raise ValueError('item 5')\n    return x\n"
    "def raises_at_8():\n    yield from range(8)\n    raise KeyError('input at 8')\n"
    "import threading\n"
    "UNSENDABLE_AT_8 = list(range(8)) + [threading.Lock()]\n"
    "class BrokenIter:\n    def __iter__(self):\n        raise TypeError('bug inside __iter__')\n"
    # map() calls iter() once and never len(): a buffer whose __iter__ hands its items
    # out once gave [] (asked twice, four times with --compare); a __len__ raising
    # anything but TypeError failed the map.
    "class Drain:\n    def __init__(self, items):\n        self.items, self.iters = list(items), 0\n"
    "    def __iter__(self):\n        self.iters += 1\n        items, self.items = self.items, []\n"
    "        return iter(items)\n"
    "import enum\nclass Color(enum.Enum):\n    RED = 1\n"
    "class LenRaises:\n    def __len__(self):\n        raise RuntimeError('length unknown')\n"
    "    def __iter__(self):\n        return iter([10, 20, 30])\n"
    # Python's words for a generator another thread runs, raised by the generator's own code, and
    # met by one that advances itself: the user's errors, not a run sharing the input (their frame is the last)
    "def says_already_executing():\n    yield 1\n    raise ValueError('generator already executing')\n"
    "_SELVES = []\n"
    "def _advancing_itself():\n    yield 1\n    yield next(_SELVES[-1])\n"
    "def advances_itself():\n    _SELVES.append(_advancing_itself())\n    return _SELVES[-1]\n"
)

# map()'s argument text: each is evaluated afresh for the serial run and for %pmap.
CASES = {
    "empty list": "inc, []",
    "empty generator": "inc, (x for x in ())",
    "several, one empty": "pair, [], [1, 2]",
    "different lengths": "pair, [1, 2, 3], 'ab'",
    "generator raising mid-way": "inc, raises_at_3()",
    "generator raising, with a list": "pair, raises_at_3(), [1, 2, 3, 4]",
    "string": "str.upper, 'héllo'",
    "dict (its keys)": "str, {'a': 1, 'b': 2, 3: 4}",
    "set": "inc, {5, 1, 3}",
    "numpy 1-d array": "float, np.arange(5)",
    "numpy 2-d array (its rows)": "list, np.arange(6).reshape(3, 2)",
    "very long generator with a short list": "pair, very_long(), [7, 8, 9]",
    "endless iterators first and last": "pair, itertools.count(), 'xy', itertools.repeat(0)",
    "range too long for len()": "pair, range(10**20), [1, 2]",
    "two huge ranges and a list": "pair, range(10**20), range(10**19, 10**21), [0]",
    "bytes": "inc, b'ab'",
    "zip of lists": "str, zip([1, 2], 'ab')",
    "an item fails before the generator does": "fails_at_5, raises_at_8()",
    "an item fails before an unpicklable item": "fails_at_5, UNSENDABLE_AT_8",
    "its own __iter__ raises TypeError (not 'not iterable')": "inc, BrokenIter()",
    "an item fails before the generator does, with a list": "lambda x, y: fails_at_5(x), raises_at_8(), range(9)",
    "an iterable that hands its items out once": "inc, Drain([1, 2, 3])",
    "the same, with a list": "pair, Drain('abc'), [1, 2]",
    "its __len__ raises (map never asks)": "inc, LenRaises()",
    "the same immutable objects again and again": "pair, itertools.repeat('ab', 40), itertools.repeat(None, 30)",
    "the same tuple and enum member again": "pair, itertools.repeat((1, 2), 30), (Color.RED for _ in range(30))",
    "a generator raising Python's 'already executing' itself": "inc, says_already_executing()",
    "a generator advancing itself": "inc, advances_itself()",
}


def _outcome(ip, code: str):
    """The cell's value, or (type, message) of the exception it raised."""
    with capture_output():
        result = ip.run_cell(code, store_history=False)
    err = result.error_before_exec or result.error_in_exec
    if err is not None:
        return type(err), str(err)
    return result.result


@pytest.fixture
def shell(ip, backend):
    run(ip, SETUP)
    return ip


@pytest.mark.parametrize("args", list(CASES.values()), ids=list(CASES))
def test_input_gives_what_serial_map_gives(shell, args):
    serial = _outcome(shell, f"list(map({args}))")
    assert _outcome(shell, f"%pmap -q {args}") == serial
    assert _outcome(shell, f"%pmap -q --compare {args}") == serial
    # The pool is fine afterwards, also after an input that raised mid-way.
    assert run(shell, "%pmap -q inc, range(3)") == [1, 2, 3]


def test_an_item_failing_before_an_unpicklable_one_of_its_own_chunk_is_the_error(shell):
    """One chunk holds both (--chunksize 16): the unpicklable item was settled as
    the run's error before the items ahead of it went out."""
    with pytest.raises(ValueError, match="item 5"):
        run(shell, "%pmap -q --chunksize 16 fails_at_5, UNSENDABLE_AT_8")
    assert run(shell, "%pmap -q --chunksize 16 inc, range(3)") == [1, 2, 3]


def test_compare_with_an_endless_iterator_reads_only_what_map_reads(shell):
    """``--compare`` needs the input twice; an endless iterator among several
    must be read only as far as the shortest (it once grew without bound)."""
    run(shell, "seen = []\n"
               "def tap():\n    for n in range(10**7):\n        seen.append(n)\n        yield n\n")
    assert run(shell, "%pmap -q --compare pow, [2, 3, 4], itertools.repeat(2)") == [4, 9, 16]
    assert api.last_report().equal is True
    assert run(shell, "%pmap -q --compare pair, tap(), 'abc'") == [(0, "a"), (1, "b"), (2, "c")]
    parallel_reads = run(shell, "len(seen)")
    run(shell, "seen.clear()\nlist(map(pair, tap(), 'abc'))")
    assert parallel_reads == run(shell, "len(seen)") == 4  # zip reads one past the shortest, as map does


def test_each_input_is_asked_for_its_iterator_once_as_map_does(shell):
    """Whatever reads it (a seeded map, --compare, a background run, imap)."""
    for code in ("%pmap -q --seed 3 lambda x: x, d", "%pmap -q --compare inc, d", "mpmagic.submit(inc, d).result()",
                 "list(mpmagic.imap(inc, d))"):
        run(shell, "import mpmagic\nd = Drain([1, 2, 3])")
        assert run(shell, code) in ([1, 2, 3], [2, 3, 4]), code
        assert run(shell, "d.iters") == 1, code


def test_an_input_that_cannot_be_iterated_is_one_usage_line(shell):
    """A 0-d numpy array: its C __iter__ refuses, so there is no frame of the
    user's to show, and the traceback showed mpmagic's check instead."""
    run(shell, "import mpmagic")
    with pytest.raises(api.UsageError, match="argument 2 of map cannot be iterated: iteration over a 0-d array"):
        run(shell, "mpmagic.pmap(inc, np.array(5))")
    with capture_output() as out:
        result = shell.run_cell("%pmap -q inc, np.array(5)", store_history=False)
    assert "cannot be iterated: iteration over a 0-d array" in str(result.error_in_exec)
    assert "Traceback" not in out.stdout + out.stderr


def test_length_of_inputs_never_raises():
    assert api._length((range(10**20), [1, 2])) == 2
    assert api._length((range(10**20),)) is None
    assert api._length(([1, 2, 3], iter([1]))) is None  # an iterator may be the shortest
    assert api._length(("abc", range(5))) == 3


def test_nested_pmap_runs_serially_in_the_worker_with_a_note(shell, backend):
    """A task that calls mpmagic.pmap: workers are daemonic processes, which
    may not start processes; the inner map runs serially there, with a note."""
    run(shell, "import mpmagic\n"
               "def inner_sum(n):\n    return sum(mpmagic.pmap(abs, range(-n, 0)))\n"
               "def inner_collect(n):\n    return mpmagic.pmap(lambda x: 1 / x, [n, 0], errors='collect')\n")
    # The note is once per worker process: workers that said it already (this test run
    # before in the same session, on the same pool) are as new ones for it again.
    run(shell, f"%%parallel -q -n {backend.workers}\nimport mpmagic.api\nmpmagic.api._nested_noted.clear()")
    with capture_output() as cap:
        values = run(shell, "%pmap -q inner_sum, [3, 4, 5, 6]")
    assert values == [sum(map(abs, range(-n, 0))) for n in (3, 4, 5, 6)]
    notes = cap.stderr.count("pmap called inside a worker runs serially")
    assert 1 <= notes <= backend.workers, cap.stderr  # once per worker process at most
    run(shell, "def inner_pow(n):\n    return mpmagic.pmap(pow, range(n), itertools.repeat(2))\n"
               "def inner_star(n):\n    return mpmagic.pmap(pow, [(n, 2), (n, 3)], star=True)\n")
    assert run(shell, "%pmap -q inner_pow, [3, 4]") == [[0, 1, 4], [0, 1, 4, 9]]
    assert run(shell, "%pmap -q inner_star, [2]") == [[4, 8]]
    collected = run(shell, "%pmap -q inner_collect, [2]")[0]
    assert collected[0] == 0.5 and isinstance(collected[1].error, ZeroDivisionError)


def test_nested_pmap_error_is_the_tasks_error(shell):
    run(shell, "import mpmagic\ndef inner_fails(n):\n    return mpmagic.pmap(lambda x: 1 / x, [n, 0])\n")
    kind, message = _outcome(shell, "%pmap -q inner_fails, [1]")
    assert kind is ZeroDivisionError and "division by zero" in message


def test_nested_parallel_says_it_cannot_run_in_a_worker(shell):
    run(shell, "import mpmagic\ndef inner_cell(n):\n    return mpmagic.parallel('rank', workers=2)\n")
    kind, message = _outcome(shell, "%pmap -q inner_cell, [1]")
    assert issubclass(kind, ValueError) and "cannot run inside a worker" in message, (kind, message)


def test_a_background_run_inside_a_task_says_it_cannot_start_there(shell):
    """``submit`` (``block=False``) in a task tried to start a pool in the
    worker and failed with multiprocessing's own AssertionError."""
    run(shell, "import mpmagic\ndef inner_submit(n):\n    return mpmagic.submit(abs, [n]).result()\n")
    kind, message = _outcome(shell, "%pmap -q inner_submit, [1]")
    assert issubclass(kind, ValueError) and "cannot start inside a worker" in message, (kind, message)


REUSES = (
    "def reuses(n, fresh):\n"  # fresh dicts, then one dict changed before each yield (a reused buffer)
    "    buf = {'v': 0}\n"
    "    for i in range(n):\n"
    "        if i < fresh:\n"
    "            yield {'v': i}\n"
    "        else:\n"
    "            buf['v'] = i\n"
    "            yield buf\n"
    "def v(d):\n    return d['v']\n"
)


@pytest.mark.parametrize("how", ["pmap", "imap", "submit", "pmap checkpoint", "imap checkpoint"])
def test_a_generator_yielding_one_object_changed_in_between_is_an_error_naming_it_not_wrong_results(
        shell, tmp_path, how):
    """Items of a generator are read ahead of the calls and pickled when sent: one
    dict changed before each yield gave [0, 1, 2, 9, 9, ...] where map gives 0..9,
    silently. Now the run raises, after the results before it, saying what to do."""
    import mpmagic

    run(shell, REUSES)
    items, func = shell.user_ns["reuses"](300, 100), shell.user_ns["v"]
    checkpoint = tmp_path if "checkpoint" in how else False
    got: list = []
    with pytest.raises(ValueError, match=r"the input `reuses` yielded the same dict object as items 1\d\d and") as e:
        if how.startswith("pmap"):
            mpmagic.pmap(func, items, checkpoint=checkpoint)
        elif how == "submit":
            mpmagic.submit(func, items).result()
        else:
            for value in mpmagic.imap(func, items, checkpoint=checkpoint):
                got.append(value)
    assert "copy.copy(buf)" in str(e.value)
    if how.startswith("imap"):  # every result before the reuse, as map gives them, then the error
        assert len(got) >= 100 and got[:100] == list(range(100)), got
    assert run(shell, "%pmap -q v, reuses(40, 40)") == list(range(40))  # fresh objects: fine


GATED = (
    "import threading\n"
    "def gated(n, inside, release, off_main=False):\n"  # 0..n-1; one item waits for release, its reader inside
    "    waited = False\n"
    "    for i in range(n):\n"
    "        if not waited and (threading.current_thread() is not threading.main_thread() if off_main else i == 3):\n"
    "            waited = True\n"
    "            inside.set()\n"
    "            release.wait(60)\n"
    "        yield i\n"
    "def v(x):\n    return x\n"
)

SHARED = r"argument {} of map \(the generator `gated`\) was being advanced elsewhere while this run read it"


@pytest.mark.parametrize("how", ["pmap", "imap", "submit", "pmap checkpoint", "imap checkpoint", "several"])
def test_a_generator_another_thread_is_running_is_an_error_naming_it(shell, tmp_path, how):
    """A generator that something else is inside (another run reading it ahead, a
    ``next(g)`` in the loop, a thread) cannot be run: Python raises ``ValueError:
    generator already executing``, as serial map does here. The run failed with it
    and a traceback of mpmagic's frames only; now it is one line naming the input
    and saying how to share it, still a ValueError, and nothing of it was read."""
    import mpmagic

    run(shell, GATED)
    inside, release = threading.Event(), threading.Event()
    g = shell.user_ns["gated"](10, inside, release)
    holder = threading.Thread(target=lambda: list(itertools.islice(g, 4)))  # waits inside g at item 3
    holder.start()
    checkpoint = tmp_path if "checkpoint" in how else False
    func = shell.user_ns["v"]
    try:
        assert inside.wait(30)
        with pytest.raises(ValueError, match="^generator already executing$"):  # serial map meets it too
            list(map(func, g))
        with pytest.raises(api.UsageError, match=SHARED.format(3 if how == "several" else 2)) as e:
            if how.startswith("pmap"):
                mpmagic.pmap(func, g, checkpoint=checkpoint)
            elif how == "submit":
                mpmagic.submit(func, g).result()
            elif how == "several":
                mpmagic.pmap(lambda a, b: b, "abcdefghij", g)
            else:
                list(mpmagic.imap(func, g, checkpoint=checkpoint))
    finally:
        release.set()
        holder.join()
    assert "list(g)" in str(e.value) and "\n" not in str(e.value)
    assert list(g) == [4, 5, 6, 7, 8, 9]  # the run read none of it: the rest is there for whoever reads on


@pytest.mark.parametrize("how", ["imap", "submit"])
def test_a_second_run_over_a_generator_the_first_is_reading_says_so(ip, pool2, how):
    """``zip(imap(f, g), imap(f, g))`` and two ``submit(f, g)``: the first run's own
    thread is inside the generator (it reads ahead) when the second asks it for
    items. The second fails with the one line; the first gives every result."""
    import mpmagic

    run(ip, GATED)
    inside, release = threading.Event(), threading.Event()
    g = ip.user_ns["gated"](300, inside, release, off_main=True)  # waits where the first run's thread reads it
    func = ip.user_ns["v"]
    first = mpmagic.imap(func, g) if how == "imap" else mpmagic.submit(func, g)
    try:
        assert inside.wait(30)
        with pytest.raises(api.UsageError, match=SHARED.format(2)):
            if how == "imap":
                next(zip(mpmagic.imap(func, g), first, strict=False))  # (first's results wait for its reader: after release)
            else:
                mpmagic.submit(func, g).result()
    finally:
        release.set()
    assert (list(first) if how == "imap" else first.result()) == list(range(300))  # map(v, g) with g its own


def test_nested_pmap_names_the_options_it_cannot_apply(ip, local_pool):
    """A nested pmap runs serially: its timeout= passed silently (a 3 s item went
    past timeout=0.5 with no error). The note names the options not applied."""
    run(ip, "import mpmagic, time\ndef inner_timeout(n):\n"
               "    return mpmagic.pmap(abs, [n], timeout=0.5, workers=2)\n")
    with capture_output() as cap:
        assert run(ip, "%pmap -q inner_timeout, [-2]") == [[2]]
    assert "timeout=, workers= are not applied there" in cap.stderr, cap.stderr


def test_apmap_inside_a_task_runs_serially_as_pmap_does(ip, local_pool):
    """asyncio.run(apmap(...)) in a task was refused as "a background run (block=False,
    submit)", which the user had not called."""
    run(ip, "import mpmagic, asyncio\ndef inner_apmap(n):\n"
               "    return asyncio.run(mpmagic.apmap(abs, range(-n, 0)))\n")
    with capture_output() as cap:
        assert run(ip, "%pmap -q inner_apmap, [2, 3]") == [[2, 1], [3, 2, 1]]
    assert "apmap called inside a worker runs serially" in cap.stderr, cap.stderr


def test_nested_pmap_error_names_the_inner_item_without_our_frames(ip, local_pool):
    """A nested pmap's failure showed api.py's pmap, _serial_in_worker and _serial_map
    between the user's frames, and named only the outer item."""
    run(ip, "import mpmagic\ndef inv(x):\n    return 1 / x\ndef outer(n):\n    return mpmagic.pmap(inv, range(n))\n")
    result = ip.run_cell("%pmap -q outer, [2]", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, ZeroDivisionError)
    assert err.__notes__[:2] == ["mpmagic: raised by item 0 of the input: inv(0)",
                                 "mpmagic: raised by item 0 of the input: outer(2)"], err.__notes__
    names = [f.name for f in traceback.extract_tb(err.__traceback__)]
    assert names[-2:] == ["outer", "inv"] and not {"pmap", "_serial_in_worker", "_serial_map"} & set(names), names


@pytest.mark.parametrize("args", [(abs, 5), (5, [1]), (abs,)])
def test_wrong_map_arguments_are_a_type_error_as_maps(args):
    """map() raises TypeError for these; pmap raised UsageError (a ValueError), which the
    `except TypeError` around serial code did not catch."""
    with pytest.raises(TypeError):
        list(map(*args))
    with pytest.raises(TypeError) as info:
        mpmagic.pmap(*args)
    assert isinstance(info.value, mpmagic.UsageError) and "\n" not in str(info.value)


GROUPS = (
    "import itertools\n"
    "DATA = sorted('abcdefghij' * 3 + 'xyz')\n"
    "def count_group(kg):\n    return kg[0], len(list(kg[1]))\n"
    "def count_star(k, g):\n    return k, len(list(g))\n"
    "def total(it):\n    return sum(it)\n"
)

GROUP_LINE = (r"item 0 \(at \[1\](\[1\])? of the item\) is a live iterator \(itertools.groupby's group\): mpmagic reads "
              r"the input ahead of the calls .* pass each group as a list: \(\(k, list\(g\)\) for k, g in groupby")


@pytest.mark.parametrize("how", ["pmap", "%pmap", "%pmap --compare", "%pmap --star", "imap", "submit",
                                 "pmap checkpoint", "several"])
def test_groupby_groups_as_items_are_refused_not_sent_empty(shell, tmp_path, how):
    """map(f, groupby(data)) calls f on each group before it reads the next; mpmagic
    reads the input a chunk ahead and pickles the items later, when each group but
    the last read is empty: ('c', 0) where map gives ('c', 3), silently, on every
    start method. Now the run says so in one line, with the list to pass instead."""
    import mpmagic

    run(shell, GROUPS)
    ns = shell.user_ns
    serial = list(map(ns["count_group"], itertools.groupby(ns["DATA"])))
    assert serial[2] == ("c", 3)  # the oracle: every group whole
    groups = itertools.groupby(ns["DATA"])
    with pytest.raises(ValueError, match=GROUP_LINE) as e:  # (the magic's usage error is a ValueError too)
        if how == "pmap":
            mpmagic.pmap(ns["count_group"], groups)
        elif how.startswith("%pmap"):
            func = "count_star" if "--star" in how else "count_group"
            result = shell.run_cell(f"%pmap -q {how[6:]} {func}, itertools.groupby(DATA)", store_history=False)
            raise result.error_in_exec
        elif how == "imap":
            list(mpmagic.imap(ns["count_group"], groups))
        elif how == "submit":
            mpmagic.submit(ns["count_group"], groups).result()
        elif how == "pmap checkpoint":
            mpmagic.pmap(ns["count_group"], groups, checkpoint=tmp_path)
        else:  # zipped with another input: the group is in the argument tuple map builds
            mpmagic.pmap(lambda n, kg: (kg[0], len(list(kg[1]))), range(40), groups)
    assert "\n" not in str(e.value).partition("\nusage: %pmap")[0]
    if how == "several":
        assert str(e.value).startswith("item 0 (at [1][1] of the item)")
    # What the line says to pass gives map's results.
    assert mpmagic.pmap(ns["count_group"], ((k, list(g)) for k, g in itertools.groupby(ns["DATA"]))) == serial


def test_iterator_items_drawing_on_one_iterator_are_refused_others_run(shell):
    """islice over one shared iterator, yielded lazily: map sums 0+1+2, then 3+4+5...;
    read ahead, every islice was pickled before any consumed the shared iterator (each
    summed 0+1+2). Items drawing on one iterator are refused; iterators over data of
    their own (a generator of ``map(int, line.split())``) run as map runs them, and a
    list of iterators is read as map reads it (nothing is read ahead of what map would)."""
    import mpmagic

    run(shell, GROUPS)
    shared = iter(range(30))
    assert list(map(shell.user_ns["total"], (itertools.islice(shared, 3) for _ in range(4)))) == [3, 12, 21, 30]
    shared = iter(range(30))
    with pytest.raises(api.UsageError, match=r"^item 0 is an iterator \(islice object\) drawing on a "
                                             r"range_iterator something else holds too .*as a list instead"):
        mpmagic.pmap(shell.user_ns["total"], (itertools.islice(shared, 3) for _ in range(4)))
    lines = ["1 2 3", "4 5", "", "6"] * 5
    serial = list(map(shell.user_ns["total"], (map(int, line.split()) for line in lines)))
    assert mpmagic.pmap(shell.user_ns["total"], (map(int, line.split()) for line in lines)) == serial
    assert mpmagic.pmap(list, (iter(line.split(" ")) for line in lines if line), chunksize=2) \
        == list(map(list, (iter(line.split(" ")) for line in lines if line)))
    assert mpmagic.pmap(shell.user_ns["total"], [iter([1, 2]), map(abs, [-3])]) == [3, 3]
    pairs = ["abcd", "efgh"] * 4  # (the pairing idiom: one iterator held twice by its own zip)
    def paired(w: str) -> zip:
        return zip(*[iter(w)] * 2, strict=False)

    assert mpmagic.pmap(list, (paired(w) for w in pairs)) == list(map(list, (paired(w) for w in pairs)))
    shared = iter(range(30))  # (held in a list or a dict of the item: refused too)
    with pytest.raises(api.UsageError, match=r"^item 0 \(at \[0\] of the item\) is an iterator \(islice"):
        mpmagic.pmap(lambda its: sum(its[0]), ([itertools.islice(shared, 3)] for _ in range(6)))
    data = sorted("aabbbc" * 2)
    with pytest.raises(api.UsageError, match=r"^item 0 \(at \['rows'\] of the item\) is a live iterator"):
        mpmagic.pmap(lambda d: len(list(d["rows"])), ({"key": k, "rows": g} for k, g in itertools.groupby(data)))
    shared = iter(range(30))  # (drawing on it through a map of a map: refused too)
    with pytest.raises(api.UsageError, match=r"^item 0 is an iterator \(map object\) drawing on a range_iterator"):
        mpmagic.pmap(shell.user_ns["total"], (map(abs, map(int, itertools.islice(shared, 2))) for _ in range(3)))
    # A generator item is left to the pickling, whose line says what to do.
    with pytest.raises(mpmagic.SerializationError):
        mpmagic.pmap(shell.user_ns["total"], ((x for x in range(3)) for _ in range(2)))


def test_a_generator_changing_a_global_gives_every_item_the_value_at_the_call(shell):
    """What docs/troubleshooting.md says of it (its row said the global's last value,
    [20, 21, 22], where the items see the value at the call: [0, 1, 2])."""
    run(shell, "G = 0\ndef plus_g(x):\n    return x + G\n"
               "def sets_g(n):\n    global G\n    for i in range(n):\n        G = 10 * i\n        yield i\n")
    assert run(shell, "G = 0\nlist(map(plus_g, sets_g(3)))") == [0, 11, 22]
    assert run(shell, "G = 0\n%pmap -q plus_g, sets_g(3)") == [0, 1, 2]
    assert run(shell, "G = 5\n%pmap -q --chunksize 3 plus_g, sets_g(3)") == [5, 6, 7]  # (whatever the chunks)


# An iterator is read ahead of the calls, in chunks: a run that stops early (an item's
# error, an interrupt) has read it further than serial map, whose iterator then goes on
# right after the item that stopped it. The same iterator given again went on from where
# the run had read it, and the items read and never returned were silently missing.
GATED_AT_4 = (
    "import os, time\n"
    "def gated_at_4(x):\n"
    "    if x == 4:\n"
    "        open(STARTED, 'w').close()\n"
    "    while x >= 4 and not os.path.exists(GATE):\n"
    "        time.sleep(0.02)\n"
    "    return x * x\n"
)


def test_a_failed_run_over_an_iterator_says_how_far_it_read_it(ip, pool2):
    run(ip, SETUP)
    run(ip, "gen = iter(range(10**6))\nserial_gen = iter(range(10**6))")
    with pytest.raises(ValueError) as serial:
        run(ip, "list(map(fails_at_5, serial_gen))")
    assert run(ip, "next(serial_gen)") == 6  # serially: read up to the item that failed
    assert not any("an iterator" in n for n in getattr(serial.value, "__notes__", []))
    with pytest.raises(ValueError) as e:
        run(ip, "%pmap -q fails_at_5, gen")
    read = run(ip, "10**6 - sum(1 for _ in gen)")  # (where the same iterator went on)
    assert read > 6  # (read ahead, in chunks: for speed)
    notes = [n for n in e.value.__notes__ if "an iterator" in n]
    assert notes == [f"mpmagic: to map it again, make its input again (an iterator: this one was read {read} items "
                     "in, past item 5, which failed, and goes on from there)"], e.value.__notes__
    # A list (a range, an array) is read anew by each run, as serially: nothing to say.
    with pytest.raises(ValueError) as e:
        run(ip, "%pmap -q fails_at_5, list(range(1000))")
    assert not any("an iterator" in n for n in e.value.__notes__)


def test_an_interrupted_run_over_an_iterator_says_how_far_it_read_it(ip, pool2, tmp_path):
    from conftest import interrupted_cell

    from mpmagic.errors import STOPPED_OUTCOME

    gate, started = tmp_path / "gate", tmp_path / "started"
    run(ip, f"import mpmagic\nGATE, STARTED = {str(gate)!r}, {str(started)!r}\n" + GATED_AT_4)
    run(ip, "gen = iter(range(1000))")
    try:
        shown, err = interrupted_cell(ip, "%pmap -q --chunksize 1 gated_at_4, gen", after=0.3, started=started)
    finally:
        gate.touch()
    assert isinstance(err, KeyboardInterrupt), shown
    read = run(ip, "1000 - sum(1 for _ in gen)")
    assert read > 5  # items 4 and 5 were running, later ones read ahead
    assert str(err) == (f"%pmap interrupted: {STOPPED_OUTCOME}; to map it again, make its input again (an iterator: "
                        f"this one was read {read} items in, past the 4 that finished, and goes on from there)"), shown
    started.unlink()
    gate.unlink()
    run(ip, "gen = iter(range(1000))")
    with pytest.raises(KeyboardInterrupt) as e:
        try:
            interrupted = interrupted_cell(ip, "mpmagic.pmap(gated_at_4, gen, chunksize=1)", after=0.3,
                                           started=started)
        finally:
            gate.touch()
        raise interrupted[1]
    read = run(ip, "1000 - sum(1 for _ in gen)")
    assert str(e.value) == (f"mpmagic.pmap interrupted: {STOPPED_OUTCOME}; to map it again, make its input again (an "
                            f"iterator: this one was read {read} items in, past the 4 that finished, and goes on from "
                            "there)")
    # Over a list, as serially: read anew by the next run, nothing to say.
    started.unlink()
    gate.unlink()
    try:
        shown, err = interrupted_cell(ip, "%pmap -q --chunksize 1 gated_at_4, list(range(1000))", after=0.3,
                                      started=started)
    finally:
        gate.touch()
    assert str(err) == f"%pmap interrupted: {STOPPED_OUTCOME}", shown
