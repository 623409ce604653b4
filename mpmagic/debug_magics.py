"""``%pdebug``: the IPython skin over :func:`mpmagic.postmortem.replay`."""

from __future__ import annotations

import re

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, line_magic, magics_class

from . import debugging, postmortem
from .errors import UsageError
from .magics import _now, _one_line_interrupts

PDEBUG_HELP = """\
Replay a failure of the last %pmap or %%parallel run here, under IPython's debugger.

usage: %pdebug [N]

It stops at the line that raised (as %debug does): the function (or cell)
is loaded from the very bytes the workers ran, with a copy of the item as
its worker got it (never your own object: a large numpy array comes
read-only, as the workers map it), or the same rank and size. N is the item
index (or rank) to replay, e.g. one of a --errors collect run; by default
the first failure its code raised (a cell's rank that failed first: a rank
stopped because another failed, or one that timed out or whose worker died,
is not replayed). If the replay does not fail here, or fails with another
exception, the failure depended on the worker (or on code reloaded since the
run: the line says so): the worker's traceback and its local variables at
the failing line are shown instead. Code that uses an mpmagic.Queue or Event is not replayed
(it would take other tasks' items, or wait for ever): its worker's traceback
and locals are shown. A replay writes an mpmagic.Value or Array again.
mpmagic.last_failures() lists the failures with those details. The last run
is the last blocking one: a --bg run or an imap stream keeps its failures on
its handle and leaves that run's for %pdebug, --rerun-failed and
last_failures() (as last_report()).
"""


@magics_class
class DebugMagics(Magics):
    """%pdebug."""

    @line_magic
    @_one_line_interrupts("%pdebug", "%pdebug interrupted before its replay started: nothing was replayed")
    def pdebug(self, line: str = "") -> None:
        # (Its help, for %pdebug? and %pdebug -h, is PDEBUG_HELP: set as the docstring below.)
        text = line.strip()
        if text in ("-h", "--help"):
            print(PDEBUG_HELP)
            return
        # (ASCII digits, one optional minus: '--1' and '²' pass str.isdigit(), then int() raised ValueError)
        if text and not re.fullmatch(r"-?[0-9]+", text):
            raise IPythonUsageError(f"%pdebug: N must be an item index or rank, not {text!r}\nusage: %pdebug [N]   (see %pdebug?)")
        which = int(text) if text else None
        # Every blocking %pmap / %%parallel that ended leaves a record, failed or not; a
        # --bg run or an imap stream leaves it as it was.
        if debugging.last_run() is None:
            raise IPythonUsageError(f"%pdebug: {postmortem.NO_RUN}{postmortem.since_hint('replay')}")
        _now("%pdebug interrupted: the replay was stopped; mpmagic.last_failures() has the worker's traceback "
             "and locals")
        try:
            postmortem.replay(which, debugger=getattr(self.shell, "debugger_cls", None))
        except UsageError as exc:
            raise IPythonUsageError(f"%pdebug: {exc}") from None


# What ``%pdebug?`` shows (IPython reads the magic's docstring), as %pmap's
# and %pool's are set in magics.py: one text for ``?`` and ``-h``.
DebugMagics.pdebug.__doc__ = PDEBUG_HELP
