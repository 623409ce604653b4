"""Bugs that mypy's checks found once the Round 2 override came off.

Each test drives the real code path the type error pointed at.
"""

from __future__ import annotations

import signal
import threading

import pytest

from mpmagic import interrupts


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread only")
def test_a_sigint_handler_installed_from_c_is_left_alone(monkeypatch):
    """signal.getsignal() is None for a handler installed from C: the guard
    must not replace it (signal.signal cannot put None back; restoring raised
    TypeError at the start of the next run)."""
    before = signal.getsignal(signal.SIGINT)
    try:
        monkeypatch.setattr(signal, "getsignal", lambda signum: None)
        interrupts.absorb_late_interrupts()
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is before  # no guard put over it
        interrupts.restore()  # nothing to restore, and no TypeError
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        monkeypatch.undo()
        interrupts._installed = None
        signal.signal(signal.SIGINT, before)


def test_magics_without_a_shell_say_so():
    """Magics(shell=None) is allowed; running ours then read None.user_ns
    (AttributeError). Now it is a one-line error saying what to do."""
    from IPython.core.error import UsageError as IPythonUsageError

    from mpmagic.errors import UsageError
    from mpmagic.magics import MPMagics

    magics = MPMagics()
    with pytest.raises(UsageError, match="need an IPython shell: load them with %load_ext mpmagic"):
        magics.pmap("abs, [1, -2]")
    # (%%parallel reads the namespace inside its run: the magic's usage error says it)
    with pytest.raises(IPythonUsageError, match="need an IPython shell: load them with %load_ext mpmagic"):
        magics.parallel("-n 2", "rank")
