"""The process's resource limits (``ulimit -n``, ``-f``, ``-u``) and what counts against ``ulimit -u``.

A leaf any layer may import (stdlib only). ``rlimit`` reads one soft limit
for the messages that name it (too many open files, a segment over the
file-size limit); the rest is the accounting of this user's processes and
threads (``RLIMIT_NPROC``) that the local pool checks before it starts a
worker: out of them halfway, workers died starting with tracebacks.
"""

from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger("mpmagic")


def rlimit(name: str) -> int | None:
    """The soft limit ``resource.<name>`` (``"RLIMIT_NOFILE"``...), or None when it
    is unlimited or cannot be read (no ``resource`` module, a limit this system
    lacks). Callers say what None means to them ("?", "unlimited")."""
    try:
        import resource

        soft = resource.getrlimit(getattr(resource, name))[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


class NoRoomForTasks(Exception):
    """A worker cannot start: the user's processes and threads reached ``ulimit -u``."""


def task_limit() -> int | None:
    """The soft limit on this user's processes and threads (``ulimit -u``), or None
    where it does not bind (unlimited, root, no ``resource``)."""
    limit = rlimit("RLIMIT_NPROC")
    if limit is None or os.geteuid() == 0:  # (root is not held to it)
        return None
    return limit


def tasks_in_use(limit: int) -> int:
    """How many processes and threads count against ``limit`` now (this user's, in
    /proc). The system's total (/proc/loadavg, one read) answers when it is below
    the limit: only near it are this user's processes counted (~1 ms per 100).

    0 where /proc cannot be read (no check: a start that fails with ``EAGAIN``
    or "can't start new thread" still says ``ulimit -u``, see ``out_of_tasks``).
    In a container, /proc shows only the container's processes while the limit
    counts the user's across the host: the count is low, and that same
    fallback covers it."""
    try:
        with open("/proc/loadavg") as f:
            total = int(f.read().split()[3].split("/")[1])
        if total < limit // 2:
            return total
        uid, used = os.getuid(), 0
        with os.scandir("/proc") as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                try:
                    if entry.stat().st_uid != uid:
                        continue
                    with open(f"/proc/{entry.name}/status") as f:
                        for line in f:
                            if line.startswith("Threads:"):
                                used += int(line.split()[1])
                                break
                except OSError:  # (gone meanwhile)
                    continue
        return used
    except (OSError, ValueError, IndexError):
        log.debug("mpmagic: could not count this user's processes in /proc", exc_info=True)
        return 0


def room_for_tasks(n: int) -> None:
    """Raise ``NoRoomForTasks`` unless ``n`` more processes or threads fit under
    ``ulimit -u`` (free where there is no such limit, as for root)."""
    limit = task_limit()
    if limit is not None and tasks_in_use(limit) + n > limit:
        raise NoRoomForTasks()


def no_thread(exc: BaseException) -> bool:
    """Was ``exc`` a thread that could not start for lack of processes or threads
    (``ulimit -u``)? Not a thread refused at interpreter shutdown (3.12+'s
    "can't create new thread at interpreter shutdown")."""
    return isinstance(exc, RuntimeError) and "can't start new thread" in str(exc)


def out_of_tasks(exc: BaseException, n: int) -> bool:
    """Did a start that needed ``n`` processes or threads fail on the process/thread
    limit? A fork's EAGAIN, a thread that could not start, or (the fork server's
    child failed: an EOFError here) any failure while this user is at the limit."""
    if no_thread(exc):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.EAGAIN:
        return True
    limit = task_limit()
    return limit is not None and tasks_in_use(limit) + n > limit


def task_limit_named() -> str:
    """``ulimit -u, 20``: the limit and its value, for a message."""
    limit = task_limit()
    return f"ulimit -u, {limit}" if limit is not None else "ulimit -u"
