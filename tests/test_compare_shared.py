"""``--compare`` runs no serial copy of work that uses mpmagic's shared helpers.

``--compare`` re-ran the work serially here after the parallel run. For a
function taking items from an ``mpmagic.Queue`` the parallel run had emptied
it, and the serial copy waited in ``get()`` for ever, saying nothing; a
``%%parallel --compare`` cell run here as rank 0 of 1 waited for what its
(absent) rank 1 puts; a function adding to an ``mpmagic.Value`` counted twice.
Now such a run says in one line why it has no serial copy, and its serial
time stays the estimate, labelled so. A lock alone still gets its serial copy
(tests/test_helper_waits.py measures a Lock-serialised map that way).

Serial Python is the oracle: a serial map consumes the queue once and counts
each item once. No test can hang: a watchdog feeds the queue a blocked serial
copy waits on after ``_HANG`` seconds, and the test then fails saying so.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from conftest import run

import mpmagic

_HANG = 30.0  # seconds: a parallel run of these takes milliseconds


@contextlib.contextmanager
def unblocked(queue, n: int) -> Iterator[list[bool]]:
    """If the code inside still runs after ``_HANG`` s, put ``n`` items into ``queue``
    (what a serial copy blocked in ``get()`` waits for) and note it: the test fails
    instead of hanging."""
    fired: list[bool] = []

    def feed() -> None:
        fired.append(True)
        for _ in range(n):
            queue.put(-1)

    timer = threading.Timer(_HANG, feed)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def _estimated(line: str) -> None:
    assert "measured" not in line and "(estimated" in line, line


def test_a_map_taking_from_a_queue_has_no_serial_copy(ip, pool2, capsys):
    run(ip, "import mpmagic\njobs = mpmagic.Queue()\nfor i in range(4):\n    jobs.put(i)\n"
            "def consume(_):\n    return jobs.get() * 10\n")
    capsys.readouterr()
    with unblocked(ip.user_ns["jobs"], 4) as fired:
        results = run(ip, "%pmap -q --compare consume, range(4)")
    assert not fired, "the serial copy waited in jobs.get() for the items the parallel run took"
    assert sorted(results) == [0, 10, 20, 30]  # (a serial map takes each item once)
    assert ip.user_ns["jobs"].empty()
    report = mpmagic.last_report()
    assert report.serial is None and report.equal is None
    line = report.line()
    _estimated(line)
    assert "--compare ran no serial copy: the function uses mpmagic.Queue 'jobs'" in line, line
    err = capsys.readouterr().err
    assert ("mpmagic: compare=True (--compare): no serial run here: the function uses mpmagic.Queue 'jobs', and a "
            "serial copy would put into it or take from it again (and wait for ever for items the parallel run "
            "took); the serial time is estimated") in err, err


def test_a_cell_whose_rank_0_takes_what_rank_1_puts_has_no_serial_copy(ip, pool2, capsys):
    run(ip, "import mpmagic\nq2 = mpmagic.Queue()")
    capsys.readouterr()
    with unblocked(ip.user_ns["q2"], 3) as fired:
        values = run(ip, "%%parallel -n 2 -q --compare\nif rank == 1:\n    for i in range(3):\n        q2.put(i)\n"
                         "    took_q2 = None\nelse:\n    took_q2 = [q2.get() for _ in range(3)]\ntook_q2")
    assert not fired, "rank 0 alone (the serial copy) waited in q2.get() for what no rank 1 put"
    assert list(values) == [[0, 1, 2], None]
    report = mpmagic.last_report()
    assert report.serial is None and "serial_value" not in report.extra
    _estimated(report.line())
    assert "--compare ran no serial copy: the cell uses mpmagic.Queue 'q2'" in report.line()
    err = capsys.readouterr().err
    assert ("no serial run here: the cell uses mpmagic.Queue 'q2', and a serial copy would put into it or take "
            "from it again (and wait for ever for what other ranks put)") in err, err


_COUNTER = """
import mpmagic
counter = mpmagic.Value("i", 0)
def add(n):
    with counter.get_lock():
        counter.value += n
    return n
"""


def test_a_counter_counts_each_item_once_with_compare(ip, pool2, capsys):
    """Serially, ``list(map(add, [1] * 8))`` adds 8; --compare added 16 (its serial copy added again)."""
    run(ip, _COUNTER)
    assert run(ip, "%pmap -q --compare add, [1] * 8") == [1] * 8
    assert ip.user_ns["counter"].value == 8
    report = mpmagic.last_report()
    assert report.serial is None
    assert "the function uses mpmagic.Value 'counter'" in report.line()
    assert "change it a second time" in capsys.readouterr().err
    # The Python API likewise, and a cell adding once per rank.
    assert mpmagic.pmap(ip.user_ns["add"], [1] * 8, compare=True) == [1] * 8
    assert ip.user_ns["counter"].value == 16
    run(ip, "%%parallel -n 2 -q --compare\nwith counter.get_lock():\n    counter.value += 1\n")
    assert ip.user_ns["counter"].value == 18
    assert mpmagic.last_report().serial is None


def test_a_helper_among_the_items_or_in_a_list_is_found(ip, pool2, capsys):
    """The pickling finds a helper wherever the payload names it: an item (``--star``)
    and a list of them the function reads (named by the list)."""
    run(ip, "import mpmagic\nbox = mpmagic.Queue()\ndef put_in(q, x):\n    q.put(x)\n    return x\n")
    assert run(ip, "%pmap -q --compare --star put_in, [(box, 1), (box, 2)]") == [1, 2]
    assert ip.user_ns["box"].qsize() == 2  # (not 4: nothing was put a second time)
    assert mpmagic.last_report().serial is None
    run(ip, "inboxes = [mpmagic.Queue() for _ in range(2)]\ndef post(i):\n    inboxes[i].put(i)\n    return i\n")
    assert run(ip, "%pmap -q --compare post, range(2)") == [0, 1]
    assert [q.qsize() for q in ip.user_ns["inboxes"]] == [1, 1]
    assert "the function uses mpmagic.Queue in 'inboxes' (and 1 more helper)" in mpmagic.last_report().line()


def test_a_helper_made_inside_the_task_is_no_shared_state(ip, pool2):
    """A queue each call makes for itself is not shared: the serial copy is the same
    computation, and --compare measures it."""
    run(ip, "import mpmagic\ndef own(x):\n    q = mpmagic.Queue()\n    q.put(x)\n    return q.get() + 1\n")
    assert run(ip, "%pmap -q --compare own, range(3)") == [1, 2, 3]
    report = mpmagic.last_report()
    assert report.serial is not None and report.equal is True
    assert "shared_state" not in report.extra


def test_the_pandas_accessor_runs_no_serial_copy_of_a_counter(ip, pool2):
    import pandas as pd

    run(ip, _COUNTER)
    s = pd.Series([1] * 6)
    assert s.mp.map(ip.user_ns["add"], quiet=True, compare=True).tolist() == [1] * 6
    assert ip.user_ns["counter"].value == 6
    assert mpmagic.last_report().serial is None


def test_only_a_lock_allows_the_serial_copy():
    from mpmagic import serial_copy

    class Ref:  # (what the job records: weak references to the helpers)
        def __init__(self, obj):
            self.obj = obj

        def __call__(self):
            return self.obj

    lock, q = object(), object()
    assert serial_copy.judge([("Lock", Ref(lock)), ("RLock", None)], {"lock": lock}) is None
    no = serial_copy.judge([("Lock", Ref(lock)), ("Event", Ref(q))], {"lock": lock, "done": q})
    assert no == serial_copy.NoSerialCopy("Event", "mpmagic.Event 'done'")
    # A helper no name holds any more (or never did): named by its kind alone.
    assert serial_copy.judge([("Queue", None)], {}) == serial_copy.NoSerialCopy("Queue", "mpmagic.Queue")
