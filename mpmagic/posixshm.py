"""POSIX shared-memory names: the one layer under :mod:`mpmagic.shm` and :mod:`mpmagic.shared`.

Both the large-buffer path (``shm``: segments ``mpm_<notebook pid>_...``) and
the helpers (``shared``: segments ``mpsh...`` and semaphores ``sem.mpsh...``)
create, map and unlink names in ``/dev/shm``, ask whether a process still
lives, and sweep names nobody will unlink. They do it here, once.

Why segments are *reserved* before use: ``ftruncate`` only sets a segment's
size; tmpfs gives it pages when they are first touched. If ``/dev/shm`` is
full at that moment (Docker gives containers 64 MB by default), the kernel
cannot back the page and sends SIGBUS to whoever wrote it, and a SIGBUS in
the notebook ends the kernel with all its state. ``os.posix_fallocate``
allocates every page up front and fails with ``ENOSPC`` instead, an ordinary
error the callers turn into "send it through the pipe" (``shm``) or a clear
message (``shared``). On tmpfs the pages it allocates are the ones the
write would have faulted in anyway, so it moves the cost rather than adding
one (measured in ``benchmarks/bench_shared.py``, see docs/performance.md).

This module imports no IPython and no numpy: workers import it.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import sys
from collections.abc import Callable

from . import compat  # _posixshmem / _multiprocessing, each behind a guarded accessor
from .fmt import fmt_bytes
from .proclimits import rlimit

SHM_DIR = "/dev/shm"

log = logging.getLogger("mpmagic")


def dev_shm_usable() -> bool:
    """Linux: is ``/dev/shm`` a directory this process may create files in? (Elsewhere True.)"""
    if not sys.platform.startswith("linux"):
        return True
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)


def shm_available() -> bool:
    """Can this process make named POSIX shared memory (the module, or Linux's /dev/shm)?

    On Linux, only with a ``/dev/shm`` it may create files in (missing on AWS
    Lambda and in some minimal containers, or mounted read-only): there,
    shm_open *is* a file in /dev/shm, and each new segment failed."""
    return os.name == "posix" and dev_shm_usable() and compat.shm_open_available()


ENABLED = shm_available()


class NoRoom(OSError):
    """``/dev/shm`` cannot hold a new segment of ``need`` bytes (it is full or too small).

    ``file_limit``: set (the soft ``RLIMIT_FSIZE``, bytes) when the cause was the
    process's file-size limit (``ulimit -f``: ``EFBIG``), not ``/dev/shm``'s
    room: the messages name that limit (a huge, empty /dev/shm was reported as
    full, with advice that could not help).
    """

    def __init__(self, need: int, too_big: bool = False) -> None:
        self.need = need
        self.free, self.total = room()
        self.file_limit = file_size_limit() if too_big else None
        super().__init__(errno.EFBIG if too_big else errno.ENOSPC, self.why())

    def why(self) -> str:
        """What stopped the segment, in the user's words."""
        if self.file_limit is not None:
            return (f"the file-size limit (ulimit -f, {fmt_bytes(self.file_limit)}) is below the "
                    f"{fmt_bytes(self.need)} a /dev/shm segment needs")
        return f"/dev/shm has no room for {fmt_bytes(self.need)} ({describe_room()})"


def file_size_limit() -> int | None:
    """The soft limit on a file's size (``ulimit -f``), in bytes; None when unlimited or unknown."""
    return rlimit("RLIMIT_FSIZE")


def room() -> tuple[int, int]:
    """``(free, total)`` bytes of the filesystem on ``/dev/shm`` (0, 0 if unknown)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0, 0
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def describe_room() -> str:
    free, total = room()
    return f"{fmt_bytes(free)} free of {fmt_bytes(total)}" if total else "size unknown"


def _path(name: str) -> str:
    return "/" + name.lstrip("/")


#: Called with the size wanted when ``/dev/shm`` has no room for a new segment,
#: before :func:`create` tries once more: whoever keeps segments for later (the
#: local pool: the notebook's free pooled segments, its workers' mappings of
#: them) gives them back. Without this, a map of large items left most of a
#: small ``/dev/shm`` in free pooled segments, and ``mpmagic.Queue()`` and
#: ``share()`` then failed for lack of room.
_reclaimers: list[Callable[[int], None]] = []


def on_no_room(reclaim: Callable[[int], None]) -> None:
    """Register ``reclaim`` (see :data:`_reclaimers`)."""
    if reclaim not in _reclaimers:
        _reclaimers.append(reclaim)


def create(name: str, size: int) -> mmap.mmap:
    """A new segment ``name`` of ``size`` bytes, every page reserved, mapped here
    (the mapping holds no file descriptor: :func:`mpmagic.compat.map_fd`).

    Raises :class:`NoRoom` when ``/dev/shm`` cannot hold it even after the
    segments kept for later were given back (nothing is left behind),
    ``FileExistsError`` when the name is taken.
    """
    try:
        return _create(name, size)
    except NoRoom:
        if not _reclaimers:
            raise
    for reclaim in list(_reclaimers):
        try:
            reclaim(size)
        except Exception:  # (one that fails must not hide the NoRoom: the retry says it again)
            log.debug("mpmagic: giving back shared memory failed", exc_info=True)
    return _create(name, size)


def _create(name: str, size: int) -> mmap.mmap:
    fd = compat.shm_open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:  # (EFBIG: the file-size limit, ulimit -f; NoRoom names it)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise NoRoom(size, too_big=exc.errno == errno.EFBIG) from None
            raise
        reserve(fd, size)
        return compat.map_fd(fd, size)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def reserve(fd: int, size: int) -> None:
    """Give the file behind ``fd`` all its pages now, or raise :class:`NoRoom`."""
    if not hasattr(os, "posix_fallocate"):  # macOS: no tmpfs, shm is not page-faulted this way
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise NoRoom(size, too_big=exc.errno == errno.EFBIG) from None
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # A filesystem that cannot preallocate: at least check the free space.
        free, total = room()
        if total and free < size:
            raise NoRoom(size) from None


def attach(name: str, size: int | None = None, private: bool = False) -> mmap.mmap:
    """Map the existing segment ``name`` (all of it when ``size`` is None), holding
    no file descriptor once mapped (:func:`mpmagic.compat.map_fd`).

    ``private``: copy-on-write (``MAP_PRIVATE``): this process's writes go
    into its own pages and never reach the segment or other processes.
    """
    fd = compat.shm_open(_path(name), os.O_RDWR, 0o600)
    try:
        if size is None:
            size = os.fstat(fd).st_size
        return compat.map_fd(fd, size, private)
    finally:
        os.close(fd)


def open_fd(name: str) -> int:
    """A new descriptor of segment ``name`` (the caller closes it)."""
    return compat.shm_open(_path(name), os.O_RDWR, 0o600)


def exists(name: str) -> bool:
    """Is there a segment ``name`` (not unlinked by its owner)?"""
    try:
        os.close(open_fd(name))
    except FileNotFoundError:
        return False
    return True


def unlink(name: str) -> bool:
    """Remove segment ``name``; False if it was already gone."""
    try:
        compat.shm_unlink(_path(name))
    except FileNotFoundError:
        return False
    return True


def unlink_semaphore(name: str) -> bool:
    """Remove named semaphore ``name``; False if it was already gone."""
    try:
        compat.sem_unlink(_path(name))
    except FileNotFoundError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` running? A zombie (killed, not yet reaped) is not.

    Reads ``/proc/PID/stat`` (about 10 us) where there is one; elsewhere
    ``kill(pid, 0)``, which cannot tell a zombie from a live process.
    """
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        fields = stat_fields(pid)
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return fields[0] not in (b"Z", b"X")


def stat_fields(pid: int) -> list[bytes]:
    """The fields of ``/proc/PID/stat`` after the command name: the state first
    (``Z`` zombie, ``X`` dead), then the parent's pid, ..., the flags at [6].
    Raises OSError (FileNotFoundError: no such process)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()  # (the command name may hold spaces and parentheses)


def names(prefix: str) -> list[str]:
    """Entries of ``/dev/shm`` starting with ``prefix`` (empty if there is none)."""
    try:
        return [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except OSError:
        return []


#: Every name a shared helper creates starts with this (/dev/shm/mpsh<pid>_...,
#: /dev/shm/sem.mpsh<pid>_...); the pool's own segments with "mpm_<pid>_".
HELPER_PREFIX = "mpsh"


def _namespace_tag() -> str:
    """``ns<hex>``: this process's PID namespace (the low bits of its inode, which
    the kernel numbers in order), or ``""`` where there is none to tell (not Linux).

    A pid means something only in its own namespace: containers that share
    ``/dev/shm`` but not their pids (``--ipc=host``, a Kubernetes pod's
    memory-backed ``/dev/shm``) see each other's names, and a sweep judging
    the other one's pids as dead deleted a live notebook's segments.
    """
    try:
        ino = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"ns{ino & 0xFFFFF:x}"


#: This process's PID namespace in the names it makes (see :func:`owned_by`).
NAMESPACE_TAG = _namespace_tag()


def owned_by(pid: int) -> str:
    """The part of a name after its prefix that says who made it: ``<pid>_``, with
    this PID namespace's tag after it on Linux (``<pid>_ns1a2b3_``), so a sweep
    judges only pids of its own namespace (:func:`is_stale`). (No tag where
    there are no namespaces: macOS allows 31 characters in a name.)"""
    return f"{pid}_{NAMESPACE_TAG}_" if NAMESPACE_TAG else f"{pid}_"


def is_stale(name: str, prefix: str) -> bool:
    """Is ``name`` (``prefix`` + :func:`owned_by`'s part + the rest) the leftover
    of a process of this PID namespace that no longer runs? A name made in
    another namespace (another tag, or none) is never judged: its pid is not
    comparable with ours, and its owner may well be running."""
    owner, sep, rest = name[len(prefix) :].partition("_")
    if not sep or not owner.isdigit():
        return False
    if NAMESPACE_TAG and not rest.startswith(NAMESPACE_TAG + "_"):
        return False
    return not pid_alive(int(owner))


# --------------------------------------------------------------------------
# A dead notebook's workers sweep its names themselves: other sweeps wait
#
# A notebook that dies without cleaning up (os._exit, SIGKILL) leaves its
# helpers' names registered with its resource tracker, which lives on until
# its workers exit. The workers sweep those names and take them off the
# tracker's list (shm.sweep_notebook), but only the names they unlinked
# themselves (two telling it of one name print a KeyError). Another
# notebook's pool start (shm.sweep_stale) in that second unlinked them
# first: the tracker then printed "leaked semaphore objects" and one "No such
# file" warning per name (on a machine where others start pools often, in a
# third of the runs). So each worker holds an abstract Unix socket named
# after its notebook while it runs (no file: it goes with the process), and a
# sweep of dead owners leaves the names of a notebook whose workers still run.

_SERVING = "mpmagic-serves-"
_serving: list[int] = []  # this worker's socket's descriptor (kept open for its life)


def mark_serving(notebook_pid: int) -> None:
    """In a worker: say, for the life of this process, that it serves ``notebook_pid``.

    The socket is kept as a bare descriptor, which the process's exit closes: a
    socket object left for Python's shutdown to collect said "ResourceWarning:
    unclosed <socket.socket ...>" in every spawn worker of a notebook that shows
    those warnings (``-X dev``), whose filters the workers take.
    """
    try:
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except (OSError, AttributeError):  # no Unix sockets: sweeps do not wait
        return
    try:
        sock.bind(f"\0{_SERVING}{owned_by(notebook_pid)}{os.getpid()}")
    except (OSError, ValueError):  # no abstract sockets (not Linux): sweeps do not wait
        sock.close()
        return
    _serving.append(sock.detach())


def _served_owners() -> set[str]:
    """The ``owned_by`` parts of notebooks that some worker still serves."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    found = set()
    for line in lines:
        path = line.rpartition(" ")[2]
        if path.startswith("@" + _SERVING):
            found.add(path[1 + len(_SERVING) :].rpartition("_")[0] + "_")
    return found


def ours(name: str) -> bool:
    """Does ``/dev/shm/name`` belong to this process's user (its effective uid)?

    On a multi-user machine ``/dev/shm`` is one sticky directory for every
    user: another user's dead notebook leaves names a sweep here may judge
    stale (the pid is dead here too) but may not remove (``EPERM``), and is
    none of this user's business anyway (a root notebook could remove them,
    and must not either: the other user's workers may still use them).
    """
    try:
        return os.stat(os.path.join(SHM_DIR, name)).st_uid == os.geteuid()
    except OSError:  # gone meanwhile, or not ours to look at
        return False


def sweep(prefix: str, dead_owner: bool = False, unlinked: list[str] | None = None) -> int:
    """Unlink the segments named ``prefix...`` that belong to this user (:func:`ours`);
    returns how many. Never raises for a name it may not remove (skipped).

    ``dead_owner``: only those whose owner, named right after ``prefix``
    (``mpm_<pid>_ns<tag>_...``), is a process of this PID namespace that no
    longer runs (:func:`is_stale`) and has no worker left to sweep them (see
    :func:`mark_serving`): the leftovers of a notebook killed before it could
    clean up. ``unlinked``: the names this call removed are appended.
    """
    n = 0
    served: set[str] | None = None
    for name in names(prefix):
        if dead_owner:
            if not is_stale(name, prefix):
                continue
            if served is None:
                served = _served_owners()
            if any(name[len(prefix) :].startswith(owner) for owner in served):
                continue  # its workers still run: they sweep it and tell its resource tracker
        if not ours(name):
            continue  # another user's (a shared node's sticky /dev/shm): not ours to judge
        try:
            removed = unlink(name)
        except OSError as exc:  # (EPERM/EACCES: its owner changed meanwhile; EROFS: a read-only mount)
            log.debug("mpmagic: could not remove /dev/shm/%s (%s): left", name, exc)
            continue
        if removed:
            n += 1
            if unlinked is not None:
                unlinked.append(name)
    return n


# --------------------------------------------------------------------------
# Work a process must do before it exits normally (a queue's backlog)

_exit_hooks: list[Callable[[], object]] = []


def on_exit(hook: Callable[[], object]) -> None:
    """Run ``hook()`` when this process stops normally (see :func:`run_exit_hooks`)."""
    if hook not in _exit_hooks:
        _exit_hooks.append(hook)


def run_exit_hooks() -> None:
    """Run the exit hooks now. A worker calls this when it leaves on the notebook's
    word (a "stop" message, or the notebook closing its pipe), since it ends with
    ``os._exit`` and no ``atexit`` handler would run."""
    for hook in list(_exit_hooks):
        try:
            hook()
        except Exception:
            log.warning("mpmagic: an exit hook failed", exc_info=True)
