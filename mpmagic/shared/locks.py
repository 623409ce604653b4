"""Lock, RLock and Event between any processes, on named semaphores.

The lock itself is :class:`~mpmagic.shared.base._HolderLock` (it records its
holder's pid, so a lock whose holder was killed is taken over); these
classes give it the standard library's API and a name to travel by.
"""

from __future__ import annotations

import time

from .. import waits
from ..checks import wait_timeout
from ..errors import interrupted_at_callers_line
from .base import _SEM_MAX, _SLICE, _Helper, _LockSide, _notify, _wait

# --------------------------------------------------------------------------
# Lock, RLock, Event


class SharedLock(_Helper):
    """A lock any process can take, like ``multiprocessing.Lock``.

    ``acquire(block=True, timeout=None)``, ``release()``, ``with lock:``. If a
    process dies holding it, the next waiter takes it over (with a warning).
    """

    _kind = "Lock"
    _letters = "l"
    _recursive = False

    def _setup(self) -> None:
        self._lock = self._own_lock(self._recursive)
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def _after_fork(self) -> None:
        self._lock.after_fork()

    # ``with lock:`` calls the inner lock's own methods (see _LockSide).
    __enter__ = _LockSide(exit=False)
    __exit__ = _LockSide(exit=True)

    def locked(self) -> bool:
        """Is it held (by any process) right now?"""
        return self._lock.locked()

    def __repr__(self) -> str:
        holder = self._seg.words[1]
        return f"<mpmagic.{self._kind} {'held by pid ' + str(holder) if holder else 'free'}>"


class SharedRLock(SharedLock):
    """A recursive lock: the holding thread may take it again, and must release it as often."""

    _kind = "RLock"
    _recursive = True


class SharedEvent(_Helper):
    """A flag processes can wait for, like ``multiprocessing.Event``."""

    _kind = "Event"
    _letters = "e"

    def _sem_init(self, letter: str) -> tuple[int, int]:
        return 0, _SEM_MAX

    def _setup(self) -> None:
        self._sem = self._sems["e"]

    def is_set(self) -> bool:
        """Is the flag set now? As ``multiprocessing.Event.is_set``."""
        return bool(self._seg.words[1])

    def set(self) -> None:
        """Set the flag and wake every process waiting in :meth:`wait`, as
        ``multiprocessing.Event.set``."""
        self._seg.words[1] = 1
        _notify(self._sem)

    def clear(self) -> None:
        """Unset the flag: later :meth:`wait` calls block again until the next
        :meth:`set`, as ``multiprocessing.Event.clear``."""
        self._seg.words[1] = 0
        while self._sem.acquire(False):  # drop stale wake-ups
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is set (True) or ``timeout`` seconds pass (False).

        A task's wait with no timeout says so once it has lasted
        :data:`mpmagic.waits.NOTE_AFTER` seconds (an event nobody sets waits for ever).
        A timeout too large to wait on (``10**400``) is no limit (``checks.wait_timeout``),
        as ``threading.Event.wait`` takes it on a set event: ``since + 10**400`` raised OverflowError."""
        timeout = wait_timeout(timeout)
        since = time.monotonic()
        deadline = None if timeout is None else since + timeout
        before = waits.mark() if deadline is not None else None
        while not self._seg.words[1]:
            step = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            if step <= 0:
                waits.timed_out(before)  # (serial code waits as long: work, see mpmagic.waits)
                return False
            if deadline is None and waits.due(since):
                waits.note_long_wait(
                    "mpmagic.Event.wait()",
                    "the event is not set; if no process will set() it, it waits for ever: interrupt to stop it, "
                    "or give wait() a timeout",
                    since,
                )
            try:
                woken = _wait(self._sem, step, "Event")
            except KeyboardInterrupt as exc:
                interrupted_at_callers_line(exc)
                raise
            if woken:
                _notify(self._sem)  # pass the wake-up on to the next waiter
        return True

    def __repr__(self) -> str:
        return f"<mpmagic.Event {'set' if self.is_set() else 'unset'}>"


