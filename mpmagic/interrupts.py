"""Repeated Ctrl-C after a run has already stopped.

People press interrupt several times when a cell seems stuck. The first
SIGINT stops the run (the backends' cleanup defers any that arrive while it
works); the others can land after the magic has returned, while the kernel
sends the cell's reply. ipykernel raises KeyboardInterrupt for SIGINT during
its whole message handler, and one raised there is only logged
("KeyboardInterrupt caught in kernel"): the reply is never sent and the
frontend waits for it. So, once a run was interrupted, SIGINTs in the next
moment are taken as repeats of that interrupt and dropped. The guard lasts
until ipykernel restores its own handler at the end of the request, the
next run starts (or a wait on a background run's results, or a blocking
wait in one of the shared helpers, ``Lock.acquire``, ``Event.wait``,
``Queue.get`` / ``put``: its first Ctrl-C is the user's, to act on), or a
later SIGINT comes, which then goes to the handler that was there before.
Outside a kernel (a script, a bare IPython shell) nothing restores it at a
request's end: the user's next code runs inside the window (a wait that is
not mpmagic's, a plain ``time.sleep``, still loses a press made in it).

This module imports no IPython.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("mpmagic")

# What signal.signal() accepts back: a Python callable, SIG_DFL / SIG_IGN, or
# a raw signal number (typeshed's private ``signal._HANDLER`` minus None).
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers

#: Seconds after an interrupted run during which further SIGINTs are repeats.
WINDOW = 0.5

# The guard installed and the handler it stands in front of, while it is there.
_installed: tuple[_Handler, _Handler] | None = None


def absorb_late_interrupts(window: float = WINDOW) -> None:
    """Drop SIGINTs for ``window`` seconds from now (main thread only)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    restore()
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:
        return
    if previous is None:
        # The handler was installed from C, not from Python: signal.signal()
        # cannot put it back (it rejects None), so the guard would replace it
        # for good, and restoring would raise TypeError. Leave it alone.
        log.debug("SIGINT handler was not installed from Python; late interrupts are not absorbed")
        return
    until = time.monotonic() + window

    def guard(signum: int, frame: FrameType | None) -> None:
        if time.monotonic() < until:
            return  # a repeat of the interrupt that already stopped the run
        restore()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signum)

    try:
        signal.signal(signal.SIGINT, guard)
    except ValueError:
        return
    _installed = (guard, previous)


def restore() -> None:
    """Put back the handler the guard stood in front of, if it is still there.

    Called when the next run starts, when a wait on a background run's results
    starts (``result()``, ``wait()``, an ``imap`` loop), and when a shared helper's
    wait blocks (local and Dask: ``Lock.acquire``, ``Event.wait``, ``Queue.get`` /
    ``put``), so its own interrupt is never taken for a repeat of the last one.
    """
    global _installed
    if _installed is None or threading.current_thread() is not threading.main_thread():
        return
    guard, previous = _installed
    _installed = None
    try:
        if signal.getsignal(signal.SIGINT) is guard:
            signal.signal(signal.SIGINT, previous)
    except ValueError:
        pass
