"""Imported only by multiprocessing's forkserver process, as a preload module.

The forkserver remembers the SIGINT handler it had when it started and gives
it to every process it forks. Python installs its KeyboardInterrupt handler
at startup, so a worker would be killed by an "interrupt kernel" (SIGINT to
the kernel's whole process group) that arrives in the milliseconds before
the worker ignores SIGINT itself, e.g. during the restart that follows a
first interrupt. Preload modules are imported before the forkserver records
its handlers: ignoring SIGINT here makes every worker ignore it from birth.

The forkserver is also the workers' watchdog when the notebook dies (see
docs/reliability.md §4). A worker notices its notebook's death from a
thread, which cannot run while a task holds the GIL inside C code
(``sum(range(10**12))``, a backtracking ``re``): such workers ran on for
the rest of their task, or for ever. The forkserver is a separate,
single-threaded process that exits when the notebook is gone (its "alive"
pipe ends), and its workers ask the kernel to SIGKILL them when it exits
(``PR_SET_PDEATHSIG``, ``worker._die_with_the_forkserver``). So that a
Jupyter kill of the kernel's process group does not take it down at once
(the workers would then die without cleaning up), it leads a session of its
own, and on its way out (:func:`_after_the_notebook`) gives the workers a
moment to clean up themselves, then kills those still running (with what
their tasks started) and sweeps the dead notebook's shared memory, and
removes its own socket's ``/tmp/pymp-XXXX`` directory (the notebook's exit
would have).

Importing it anywhere else runs none of this (:func:`_imported_by_the_fork_server`);
a test may import it to call its functions.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time

#: Seconds the workers get to notice their notebook's death and clean up themselves.
GRACE = 1.0


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux; empty elsewhere)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        pass
    from mpmagic import posixshm

    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fields = posixshm.stat_fields(int(entry))
        except OSError:
            continue
        if fields[0] not in (b"Z", b"X") and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _remove_socket_dir() -> None:
    """Remove this forkserver's socket file and its ``/tmp/pymp-XXXX`` directory, if then empty.

    multiprocessing makes that directory in the notebook and removes it at the
    notebook's exit: a SIGKILLed kernel left one for good (hundreds on a
    shared machine). Only the socket and an empty directory go: anything else
    the dead notebook's other processes made there stays.
    """
    from mpmagic import compat

    path = compat.forkserver_socket_path()
    if path is None or not os.path.basename(os.path.dirname(path)).startswith("pymp-"):
        return
    try:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


#: ``PF_EXITING`` in a process's flags (``/proc/PID/stat``, field 9): set as its exit
#: begins, before its files (the alive pipe's end among them) are closed.
_PF_EXITING = 0x4


def _notebook_gone(pid: int) -> bool:
    """Is the notebook ``pid`` dead or dying? Read at once, not waited for: when
    the notebook stops the forkserver itself (every kernel shutdown and %pool
    restart of a forkserver pool) it is alive and not exiting, and waiting for it
    to die made each such stop 1 s longer. A killed notebook is past its
    ``PF_EXITING`` (or a zombie, or gone) by the time its pipe's end closes."""
    from mpmagic import posixshm

    try:
        fields = posixshm.stat_fields(pid)
        return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & _PF_EXITING)
    except (OSError, ValueError, IndexError):
        return True  # (no such process)


def _after_the_notebook(notebook: int, me: int) -> None:
    """At the forkserver's exit: if the notebook died, end what it left running.

    Not when the notebook stopped the forkserver itself (a kernel's shutdown:
    the notebook still runs). Workers still running after :data:`GRACE`
    (a task holding the GIL) are killed with their process groups (each leads
    its own: what its task started goes too), and the notebook's and their
    shared memory is swept, as they would have done themselves; then the
    forkserver's socket directory goes (:func:`_remove_socket_dir`).
    """
    if os.getpid() != me:  # (a worker forked from here ends with os._exit; in case one does not)
        return
    try:
        from mpmagic import posixshm, shm

        if not _notebook_gone(notebook):
            return  # the notebook stopped us (a shutdown, a restart): its workers are its own business
        deadline = time.monotonic() + 1.0  # (the pipe closes while a killed process is torn down)
        while posixshm.pid_alive(notebook) and time.monotonic() < deadline:
            time.sleep(0.02)
        deadline = time.monotonic() + GRACE
        left = _children(me)
        while left and time.monotonic() < deadline:
            time.sleep(0.02)
            _reap()
            left = _children(me)
        for pid in left:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if left:
            shm.sweep_notebook(notebook)
            for pid in left:
                shm.sweep_helpers(pid)
        _remove_socket_dir()
    except Exception:  # never a traceback from a process nobody watches any more
        pass


def _imported_by_the_fork_server() -> bool:
    """Is this import the fork server's own, of its preload modules (``multiprocessing
    .forkserver.main`` is on the stack)? Only then is this process the fork server.

    The test was ``multiprocessing.forkserver`` imported and ``sys.argv == ["-c"]``,
    which any ``python -c`` process using a forkserver pool passes (a pytest-xdist
    worker): a test importing this module to call its functions made that process
    ignore SIGINT, lead a session of its own and sweep its parent's processes at exit.
    """
    main = getattr(sys.modules.get("multiprocessing.forkserver"), "main", None)
    code = getattr(main, "__code__", None)
    frame = sys._getframe(1) if code is not None else None
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


if _imported_by_the_fork_server():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            os.setsid()  # out of the kernel's process group: a group kill leaves the watchdog
        except OSError:
            pass
        atexit.register(_after_the_notebook, os.getppid(), os.getpid())
