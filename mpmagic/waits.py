"""Time a task spends blocked in mpmagic's own helpers, and the note a long wait gives.

A task that waits for an ``mpmagic.Lock`` (or a ``Value``'s lock), in
``Queue.get()`` or in ``Event.wait()`` does none of its work meanwhile, yet
that wait is inside the task time the worker measures. Summed into the
report's serial estimate it read as work: a map serialised by a lock was
estimated at ~1.9x where ``--compare`` measured 1.00x, and the consumer rank
of a producer/consumer cell counted its whole wait for items.

So the helpers add up, per thread, the seconds they spend blocked (a
``time.monotonic`` pair around the blocking call only: a lock taken at once,
an item already in the queue pay nothing), by kind of helper, and the worker
(:func:`mpmagic.worker.execute_map` / ``execute_cell``, the local worker's and
the Dask task's alike) resets the tally when a unit starts (:func:`begin`) and
sends it home with the unit's meta (``meta["helper_wait"]``,
:func:`take`). The report leaves it out of the estimate and says so
(``report.Report.helper_wait_seconds``). Per thread: only the task's own thread
is timed; a thread a task starts, or a queue's feeder thread, waits on its own
tally, which no unit reads.

A call that ends by its own timeout (``get(timeout=)`` raising ``queue.Empty``,
``put(timeout=)`` raising ``queue.Full``, ``acquire(timeout=)`` or
``wait(timeout)`` returning False) is not counted: serial code waits just as
long, so that time is the task's own, as a ``time.sleep`` is. The helper takes
its :func:`mark` before such a call and puts it back (:func:`timed_out`) when
the call ends so: a map of ``get(timeout=0.3)`` on an empty queue read
`speedup <0.1x` (its whole time left out, the advice blaming a slow producer)
where ``--compare`` measured ~2x. A polling loop's timed-out gets
(``while True: try: q.get(timeout=0.1) ...``) are therefore counted as work,
which a serial run would not do; a ``get()`` with no timeout (or a
``for item in q``) waits the same time and is left out.

The same place says something about a wait that may never end: a task
blocked in ``Queue.get()`` (with nothing put and the queue not closed) or in
``Event.wait()`` (not set) for :data:`NOTE_AFTER` seconds writes one line to
its stderr, which reaches the cell as the task's printed output does, once
per unit (:func:`note_long_wait`). A wait that ends sooner says nothing. The
notebook's own waits say nothing: the cell there is visibly running and
Ctrl-C ends it.

It imports no IPython, and of mpmagic only :mod:`mpmagic.debugging` (which
says what the running unit is) at import time: workers, the helpers and the
report all use it.
"""

from __future__ import annotations

import sys
import threading
from time import monotonic

from . import debugging

#: Seconds a task waits in ``Queue.get()`` / ``Event.wait()`` with nothing
#: arriving before it says so (once per unit). A module constant: a test, or a
#: task, may set it lower in the worker (``mpmagic.waits.NOTE_AFTER = 1``).
NOTE_AFTER = 10.0

#: The kind of a wait that ended by taking over a lock whose holder had died (an interrupted,
#: timed-out or killed task's worker): a quarter of a second of recovery (shared.md), counted
#: apart, so the line and advice do not blame it on a producer or on the lock's other users.
TAKEOVER = "takeover"

#: What each kind of helper is called in the report's line and advice.
NAMES = {
    "Lock": "mpmagic.Lock",
    "RLock": "mpmagic.RLock",
    "Value": "mpmagic.Value's lock",
    "Array": "mpmagic.Array's lock",
    # The lock a read or write takes by itself (``v.value``, ``a[i]``), not one the user took:
    "Value access": "the lock each mpmagic.Value .value read and write takes",
    "Array access": "the lock each mpmagic.Array item read and write takes",
    "Queue": "mpmagic.Queue",
    "Event": "mpmagic.Event",
    TAKEOVER: "a lock a stopped process had held (until taking it over)",
}


class _Tally(threading.local):
    """This thread's seconds blocked in helpers since :func:`begin`, by kind; and
    whether the running unit has said it waits (:func:`note_long_wait`)."""

    seconds: dict[str, float] | None = None
    said = False


_tally = _Tally()


def add(kind: str, seconds: float) -> None:
    """``seconds`` this thread spent blocked in a helper of ``kind`` ("Lock", "Queue"...)."""
    tally = _tally
    got = tally.seconds
    if got is None:
        tally.seconds = {kind: seconds}
    else:
        got[kind] = got.get(kind, 0.0) + seconds


def mark() -> dict[str, float] | None:
    """This thread's tally now (a copy): what :func:`timed_out` puts back."""
    got = _tally.seconds
    return None if got is None else dict(got)


def timed_out(before: dict[str, float] | None) -> None:
    """The helper call that began at :func:`mark` (``before``) ended by its own
    timeout: serial code waits as long, so the time it was blocked is the task's
    work, not a wait the estimate leaves out; the tally goes back to ``before``."""
    _tally.seconds = before


def begin() -> None:
    """A unit starts in this thread: its tally starts at nothing, and it has said nothing."""
    tally = _tally
    tally.seconds = None
    tally.said = False


def take() -> dict[str, float] | None:
    """The seconds this thread was blocked in helpers since :func:`begin`, by kind
    (None if it never was), and the tally starts again."""
    tally = _tally
    got, tally.seconds = tally.seconds, None
    return got


def watching() -> bool:
    """Is this a task (not the notebook) that has not yet said it waits (:func:`note_long_wait`)?"""
    return debugging.TASK is not None and not _tally.said


def due(since: float) -> bool:
    """Has a wait that began at ``since`` (``time.monotonic``) lasted :data:`NOTE_AFTER`,
    in a task that has not said so yet? Cheap: the helpers ask at each slice of a wait."""
    return debugging.TASK is not None and not _tally.said and monotonic() - since >= NOTE_AFTER


def note_long_wait(where: str, why: str, since: float) -> None:
    """Once per unit, in a task: one line saying it has waited since ``since`` in
    ``where`` (``mpmagic.Queue.get()``), ``why`` it may never end and what to do.

    Written to the task's stderr, the channel that carries a task's notes home
    (a local worker streams it while the task runs; a Dask task as events):
    ``mpmagic: item 3 has waited 10 s in ...``; a rank's lines are labelled at
    home (``[rank 1] mpmagic: this rank has waited ...``). Nothing in the notebook.
    """
    tally = _tally
    task = debugging.TASK
    if tally.said or task is None:
        return
    tally.said = True
    if task.startswith("rank"):
        who = "this rank"
    else:
        from . import worker_logging

        item = worker_logging.label().strip(" []")
        who = item or "this task"
    waited = monotonic() - since
    took = f"{waited:.0f} s" if waited >= 10 else f"{waited:.1f} s"
    try:
        sys.stderr.write(f"mpmagic: {who} has waited {took} in {where}: {why}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # (the stream is gone: the worker is ending)
        pass


def names(kinds: tuple[str, ...]) -> str:
    """``mpmagic.Lock``, ``mpmagic.Queue and mpmagic.Lock``: the kinds (the longest
    wait first) as the report's line and advice name them."""
    said = [NAMES.get(k, f"mpmagic.{k}") for k in kinds]
    return said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
