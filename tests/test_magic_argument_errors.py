"""A magic's wrong arguments against serial ``map()``: ``%pmap --scaling`` checks and
reads its input as ``%pmap`` does, a wrong FUNC or ITERABLE is a ``TypeError`` a cell
can catch (and still one line), and the line's small mistakes say what was meant."""

from __future__ import annotations

import pytest
from conftest import run
from IPython.core.error import UsageError as IPythonUsageError
from IPython.utils.capture import capture_output

SETUP = """
import itertools
def f(x): return x * 10
def g(x, y): return x + y
xs = [1, 2, 3]
class IterNotIter:
    def __iter__(self): return 5
class Counted:
    '''An iterator of 0, 1, 2, ... that counts its reads and stops at 1000 (a test
    that reads it all fails on the count, not on memory).'''
    def __init__(self): self.reads = 0
    def __iter__(self): return self
    def __next__(self):
        if self.reads == 1000: raise StopIteration
        self.reads += 1
        return self.reads - 1
"""


def outcome(ip, cell: str) -> tuple:
    """``("ok", value)`` or ``("exc", type name, message)`` of ``__v = <cell>``, and what it printed."""
    with capture_output() as cap:
        result = ip.run_cell(f"__v = {cell}", store_history=False)
    err = result.error_in_exec or result.error_before_exec
    if err is not None:
        return ("exc", type(err).__name__, str(err)), cap.stdout + cap.stderr
    return ("ok", ip.user_ns["__v"]), cap.stdout + cap.stderr


@pytest.fixture
def names(ip, pool2):
    run(ip, SETUP)


def test_scaling_reads_several_iterables_as_far_as_map_does(ip, names):
    """``%pmap --scaling g, itertools.count(), [1, 2]`` read the endless iterator into a
    list for ever (the tester's process was OOM-killed); map() reads it three times."""
    run(ip, "it = Counted(); serial = list(map(g, it, [1, 2])); serial_reads = it.reads")
    run(ip, "it = Counted()\ns = %pmap --scaling -n 1 g, it, [1, 2]")
    assert ip.user_ns["serial"] == [1, 3]
    assert ip.user_ns["it"].reads == ip.user_ns["serial_reads"] == 3
    assert [p.workers for p in ip.user_ns["s"].points] == [1]
    # the endless one itself: done, as plain %pmap is
    assert outcome(ip, "%pmap --scaling -n 1 -q g, itertools.count(), [1, 2]")[0][0] == "ok"


@pytest.mark.parametrize("args", ["f, 5", "5, xs", "f, None", "f, IterNotIter()", "f", "None, [1], 2",
                                  "async_f, xs"])
def test_scaling_refuses_wrong_arguments_as_plain_pmap_does(ip, names, args):
    """A non-iterable, a non-callable FUNC... gave a bare TypeError through scaling.py's
    reading of the input (or api._serial_map's first call) instead of %pmap's line."""
    run(ip, "async def async_f(x): return x")
    plain, _ = outcome(ip, f"%pmap -q {args}")
    scaled, said = outcome(ip, f"%pmap --scaling -n 1 -q {args}")
    assert plain[0] == "exc" and scaled == plain
    assert "Traceback" not in said and "mpmagic/" not in said, said


def test_scaling_with_star_over_non_tuples_fails_as_plain_pmap_does(ip, names):
    """``--star`` over ints: plain %pmap raises the item's TypeError with the note naming
    it; --scaling's serial run raised it bare, through api._serial_map's frames."""
    plain, _ = outcome(ip, "%pmap -q --star f, xs")
    scaled, said = outcome(ip, "%pmap --scaling -n 1 -q --star f, xs")
    serial, _ = outcome(ip, "list(__import__('itertools').starmap(f, xs))")
    assert plain[:2] == scaled[:2] == serial[:2] == ("exc", "TypeError")
    assert "mpmagic: raised by item 0 of the input: f(*1)" in said
    assert "mpmagic/" not in said, said


def test_scaling_stops_at_a_failing_item_with_its_note(ip, names):
    run(ip, "def fails_at_2(x):\n    if x == 2:\n        raise ValueError('two')\n    return x")
    serial, _ = outcome(ip, "list(map(fails_at_2, xs))")
    scaled, said = outcome(ip, "%pmap --scaling -n 1 -q fails_at_2, xs")
    assert scaled == serial == ("exc", "ValueError", "two")
    assert "mpmagic: raised by item 1 of the input: fails_at_2(2)" in said and "mpmagic/" not in said, said


def test_scaling_of_a_cell_whose_serial_run_fails_says_it_was_the_serial_run(ip, names):
    """A cell that cannot run as one rank (``1 / (size - 1)``) stopped --scaling with the
    cell's bare traceback, read as the cell failing on the ranks; a failing item of a map
    says which item, and this says it was the serial run here, as rank 0 of size 1."""
    with capture_output() as cap:
        result = ip.run_cell("%%parallel --scaling -n 1\n1 / (size - 1)", store_history=False)
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    said = cap.stdout + cap.stderr
    assert "mpmagic: raised by --scaling's serial run here (the cell as rank 0 of size 1)" in said, said
    assert "mpmagic/" not in said, said


def test_scaling_copies_for_its_serial_runs_what_the_runs_send_and_says_what_cannot_be_sent_as_they_do(ip, names):
    """--scaling's serial runs work on copies made as the runs' are: what cannot be sent is
    named as a run names it ("item 1 (<lock>)", "lk"), never as the copy's pickle path, and a
    cell that assigns the notebook name holding a lock runs, as it does on the ranks."""
    run(ip, "import threading\nlk = threading.Lock()\nwith_lock = [1, lk, 3]\ndef one(x):\n    return 1\n")
    plain, said = outcome(ip, "%pmap -q one, with_lock")
    scaled, said = outcome(ip, "%pmap --scaling -n 1 -q one, with_lock")
    assert plain[:2] == ("exc", "SerializationError") and scaled == plain, (scaled, plain)
    assert "cannot send item 1 (<unlocked _thread.lock" in scaled[2], scaled
    errors = []
    for line in ("%%parallel -q -n 1\nwith lk:\n    pass\nrank", "%%parallel --scaling -n 1\nwith lk:\n    pass\nrank"):
        with capture_output():
            errors.append(str(ip.run_cell(line, store_history=False).error_in_exec))
    assert errors[0] == errors[1] and errors[0].startswith("cannot send lk to the ranks: `lk` is a _thread.lock"), errors
    with capture_output():
        result = ip.run_cell("%%parallel --scaling -n 1\nlk = 5\nlk", store_history=False)
    assert result.error_in_exec is None and [p.workers for p in result.result.points] == [1]


@pytest.mark.parametrize("args", ["f, None", "None, [1]", "f, 5", "f, IterNotIter()", "f", "f, xs, chunksize=2"])
def test_a_wrong_func_or_iterable_is_caught_as_serial_maps_type_error(ip, names, args):
    """``try: r = %pmap f, None`` / ``except TypeError:`` did not catch it: the magic
    turned the API's ArgumentTypeError (a TypeError) into IPython's plain UsageError."""
    cell = "try:\n    r = {}\nexcept TypeError:\n    __v = 'caught'\nelse:\n    __v = 'not raised'"
    with capture_output():
        ip.run_cell(cell.format(f"list(map({args}))"), store_history=False)
    serial = ip.user_ns.pop("__v")
    with capture_output():
        ip.run_cell(cell.format(f"%pmap -q {args}"), store_history=False)
    assert ip.user_ns.get("__v") == serial == "caught"


def test_an_api_usage_error_stays_a_value_error_in_the_magic(ip, names):
    """The API's UsageError is a ValueError: the magic's line for it is one too."""
    import mpmagic

    with pytest.raises(ValueError) as api_error:
        mpmagic.pmap(abs, [1], workers=100000)
    with capture_output():
        result = ip.run_cell("%pmap -q -n 100000 abs, [1]", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, ValueError) and isinstance(err, IPythonUsageError)
    assert str(api_error.value).startswith("workers = 100000 is more processes")
    assert str(api_error.value).replace("workers = ", "-n ", 1) in str(err)  # (the size as the line gave it)


def test_a_wrong_func_or_iterable_is_one_line_and_a_type_error(ip, names):
    """The display is still IPython's one UsageError line (and the usage), no traceback,
    the same as a plain UsageError of the line (an unknown option) looks."""
    with capture_output() as cap:
        result = ip.run_cell("%pmap -q f, None", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, TypeError) and isinstance(err, IPythonUsageError)
    assert type(err).__name__ == "UsageError"  # (a kernel's error reply says ename 'UsageError', as for a plain one)
    assert (cap.stdout + cap.stderr).strip().splitlines() == [f"UsageError: {str(err).splitlines()[0]}",
                                                             str(err).splitlines()[1]]
    with capture_output() as plain:
        ip.run_cell("%pmap --nope f, xs", store_history=False)
    assert (plain.stdout + plain.stderr).strip().splitlines()[1] == str(err).splitlines()[1]


@pytest.mark.parametrize("cell, said", [
    ("%pmap -q —compare f, xs", "'—compare' starts with an em dash (U+2014), not the ASCII '-' or '--' an option "
                                "starts with: write --compare"),
    ("%pmap −n 2 f, xs", "'−n' starts with a minus sign (U+2212), not the ASCII '-' or '--' an option starts with: "
                         "write -n"),
    ("%pmap -q f, xs, –compare", "'–compare' starts with an en dash (U+2013)"),
    ("%%parallel -n 1 —compare\nrank", "unexpected argument '—compare'; '—compare' starts with an em dash"),
    ("%pmap # f, xs", "%pmap: missing FUNC and ITERABLE"),
    ("%pmap -q # only a comment", "%pmap: missing FUNC and ITERABLE"),
    ("%pmap f # xs", "%pmap: missing ITERABLE after FUNC"),
    ("%%parallel -n 1 -- -q\nrank", "unexpected argument '-q' after --: %%parallel takes options only"),
])
def test_line_mistakes_say_what_was_meant(ip, names, cell, said):
    with capture_output():
        result = ip.run_cell(cell, store_history=False)
    assert said in str(result.error_in_exec), result.error_in_exec


def test_double_dash_ends_parallels_options(ip, names):
    """``%%parallel -n 2 --`` said "unknown option --"."""
    assert run(ip, "%%parallel -n 1 -q --\nrank * 10") == [0]


def test_rerun_failed_with_only_a_comment_is_rerun_failed(ip, names):
    """``%pmap --rerun-failed # c``: no FUNC (an IndexError before), as without the comment."""
    run(ip, "%pmap -q f, xs")
    with capture_output():
        bare = ip.run_cell("%pmap --rerun-failed", store_history=False).error_in_exec
        commented = ip.run_cell("%pmap --rerun-failed # c", store_history=False).error_in_exec
    assert type(commented) is type(bare) and str(commented) == str(bare) and "no failed" in str(bare)
