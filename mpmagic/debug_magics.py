"""``%pdebug``: the IPython skin over :func:`mpmagic.postmortem.replay`."""

from __future__ import annotations

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, line_magic, magics_class

from . import postmortem
from .errors import UsageError

PDEBUG_HELP = """\
usage: %pdebug [N]

Replay a failure of the last %pmap or %%parallel run here, under IPython's
debugger, stopped at the line that raised (as %debug does): the function (or
cell) is loaded from the very bytes the workers ran, with the same item (or
the same rank and size). N is the item index (or rank) to replay, e.g. one
of a --errors collect run; the first failure by default. If the replay does
not fail here, the failure depended on the worker: the worker's traceback and
its local variables at the failing line are shown instead.
mpmagic.last_failures() lists the failures with those details.
"""


@magics_class
class DebugMagics(Magics):
    """%pdebug."""

    @line_magic
    def pdebug(self, line: str = "") -> None:
        text = line.strip()
        if text in ("-h", "--help"):
            print(PDEBUG_HELP)
            return
        if text and not text.lstrip("-").isdigit():
            raise IPythonUsageError(f"%pdebug: N must be an item index or rank, not {text!r}\nusage: %pdebug [N]")
        which = int(text) if text else None
        try:
            postmortem.replay(which, debugger=getattr(self.shell, "debugger_cls", None))
        except UsageError as exc:
            raise IPythonUsageError(f"%pdebug: {exc}") from None
