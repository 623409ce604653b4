"""The private interpreter and cloudpickle APIs mpmagic uses, behind one door each.

Why private APIs at all: the public ones cost too much or cannot do the job.

* ``_multiprocessing.SemLock`` (and ``SemLock._rebuild``, ``sem_unlink``): a
  named POSIX semaphore that a *running* worker can open by name.
  ``multiprocessing.Lock``/``Semaphore`` refuse to be pickled into a running pool
  ("should only be shared between processes through inheritance"), and a
  Manager's proxies cost ~200 us per operation against ~1 us here.
* ``_posixshmem.shm_open`` / ``shm_unlink``: POSIX shared memory by name, with
  the name and flags we choose (``O_EXCL`` to detect collisions, an ``flock`` on
  the descriptor as the lock-holder guard). ``multiprocessing.shared_memory``
  registers every segment with the resource tracker and has no flags: the
  helper would need workarounds for both.
* ``multiprocessing.resource_tracker.register`` / ``unregister``: undocumented
  functions; the tracker unlinks our names if the notebook dies without its
  finalizers running (SIGKILL of the kernel). Its pipe (``_resource_tracker._fd``)
  and line protocol: a worker that swept a dead notebook's helpers tells the
  tracker so without starting one (``tracker_forget``); whether this process
  has a tracker yet, so a spill registers only with the notebook's
  (``tracker_connected``). ``ensure_running``: started
  before a worker, not inside its start, since it unblocks SIGINT in the
  calling thread once the tracker runs (see ``start_resource_tracker``).
* ``multiprocessing.forkserver._forkserver._stop`` and
  ``multiprocessing.resource_tracker._resource_tracker._stop``: end those
  processes at a kernel's shutdown. ipykernel waits for its children to exit
  before it exits; the tracker ignores SIGTERM and the fork server, once
  SIGTERM ends it, is a zombie nobody reaps: every shutdown or restart took
  ~2.5 s more, until Jupyter killed the kernel. Before them,
  ``multiprocessing.util._run_finalizers(0)`` (the first step of
  multiprocessing's exit hook): stopped first, the tracker unlinked a
  notebook's live ``multiprocessing.Lock`` and its finalizer then printed a
  ``sem_unlink`` traceback at exit.
* ``multiprocessing.forkserver._forkserver._forkserver_alive_fd`` (in a
  forkserver's worker): its copy of the notebook's end of the forkserver's
  "alive" pipe. The forkserver exits when every copy is closed; while the
  workers kept theirs it outlived a killed notebook, and so did the workers
  (``PR_SET_PDEATHSIG``, see ``worker._die_with_the_forkserver``): a worker
  closes it (``forkserver_release_alive_fd``).
* ``multiprocessing.forkserver._forkserver._forkserver_address`` (in the
  forkserver): the file of its socket, in the notebook's ``/tmp/pymp-XXXX``
  directory, which multiprocessing removes at the notebook's exit and never
  after a SIGKILL. The forkserver removes both once the notebook died
  (``forkserver_socket_path``, from ``forkserver_preload``).
* ``multiprocessing.spawn``'s module global ``os``: while a worker starts
  from a directory the notebook is not in (the notebook's was deleted, or the
  workers may not enter it), ``spawn.get_preparation_data`` is shown an
  ``os`` whose ``getcwd`` names that directory. It reads ``os.getcwd()`` for
  the child to ``chdir`` to, which raised (deleted) or made every child die
  at start (``chmod 000``); changing the notebook's own directory for the
  start cannot be undone where it may not be entered.
* ``multiprocessing.spawn.get_preparation_data`` (wrapped once): what a
  spawn or forkserver child is told, read when it starts. For the thread
  starting a worker it drops the parent's ``__main__`` (``children_ignore_main``):
  a ``%run script.py`` could make the script ``__main__`` during a
  background start, and the child then ran the whole script. It drops it
  too for every child of a name a holder registered, whichever thread starts
  it (``children_named_ignore_main``): the worker processes a Dask nanny of
  ``use_dask()``'s cluster starts again, from a thread of its own.
* ``ModuleSpec._initializing``: importlib's mark of a module whose import is
  running; a plain pickle naming a class of it would wait on its import lock
  (``module_initializing``).
* ``importlib._bootstrap._module_locks`` and a module lock's ``owner``: the
  modules another thread is importing now (``imports_elsewhere``). A worker
  forked meanwhile copies the module half run, with its lock held by a thread
  the child does not have: the child's first use of it waited for ever.
* ``multiprocessing.process._children``: the set of ``Process`` objects
  multiprocessing's exit hook terminates and joins. A bare ``os.fork()`` child
  of the notebook inherits it with the notebook's workers in it, and its exit
  killed them all (and printed "can only join a child process"). No public
  API takes a process out of it.
* libc's ``mmap`` with ``MAP_FIXED`` (through ctypes, Python < 3.13): a shared
  segment mapped over an anonymous ``mmap.mmap`` of the same size, so the
  object keeps no file descriptor (``mmap.mmap`` keeps a ``dup`` of the one it
  maps until 3.13's ``trackfd=False``): one per kept result and per helper ran
  a notebook out of files (``map_fd``).
* ``multiprocessing.heap.Arena._dir_candidates``: where the heap behind a
  worker's shared ctypes puts its files; emptied without a usable ``/dev/shm``
  (``heap_off_dev_shm``), or every worker start failed there.
* ``threading._register_atexit``: a hook run at the interpreter's exit before
  the non-daemon threads are joined, where ``concurrent.futures`` waits for
  pending work (and then stops every thread pool, Dask's scheduler's among
  them). A script's exit waits there for its runs in flight (``exiting``):
  in ``atexit`` it was too late for a Dask ``LocalCluster`` in this process,
  which then took no task (``register_before_threads_join``).
* ``warnings._filters_mutated``: a worker swaps a unit's warning filters in
  one step and tells ``warnings`` they changed, where the public route is
  ``resetwarnings`` plus an ``extend`` (``warnings_filters_mutated``).
* cloudpickle's ``cloudpickle._code_reduce``: to keep code objects' real file
  names (so a worker's traceback names the notebook cell);
  ``_extract_code_globals`` and ``_should_pickle_by_reference``: the payload
  cache's fast check of what a function captures; ``_class_setstate``: what
  loading a class by value calls, skipped for the notebook's own classes
  (``classhome``), whose methods it replaced with a worker's copies;
  ``_DYNAMIC_CLASS_TRACKER_BY_CLASS``/``_BY_ID``: a class a ``%%pool setup``
  defines gets the same tracker id in every worker, so its instances come home
  as one class (``cloudpickle_track_class``).
* pandas' ``pandas._config.config._global_config`` and ``_registered_options``:
  the notebook's changed pandas options, read at each call in ~1 us (a
  comparison with the last copy), where ``pd.get_option`` for every option
  costs ~130 us and warns for the deprecated ones (``pandas_option_store``).
* IPython's ``DeduperReloader.maybe_reload_module`` (IPython 9's default
  ``%autoreload``): it updates a module's functions in place, from the edited
  file, without ``importlib.reload``, so nothing public tells that the
  notebook now runs the file's new code. Wrapped (:func:`follow_inplace_reloads`)
  so the workers reload that module too.
* ``executing``'s ``Source._for_filename_and_lines`` (its cache of parsed files, which
  ``stack_data``'s ``Source`` shares the shape of): IPython's tracebacks read a frame's
  failing expression and its variables (``%xmode Verbose``) from that parse, and a
  ``%%parallel`` cell's lines, its ``%%`` line first, do not parse as Python: a rank's
  frame listed no variable. The cell's entry is given the tree of its lines with that
  line as a comment (``parse_magic_cell``), when a rank's frame is rebuilt there.

Each accessor below either returns the real thing, falls back to something
that works (documented at the accessor), or raises :class:`MissingFeatureError`
with one line that says what is missing and what to do. The table of call
sites is in docs/architecture.md ("Private interpreter APIs").
"""

from __future__ import annotations

import errno
import importlib
import linecache
import logging
import mmap
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import MPMagicError

log = logging.getLogger("mpmagic")

_PYTHON = f"Python {sys.version.split()[0]} on {sys.platform}"


class MissingFeatureError(MPMagicError, NotImplementedError):
    """This Python (or cloudpickle) lacks an internal API a feature needs."""


def _module(name: str) -> Any:
    """The module ``name``, or None if this interpreter has none (Windows, other builds)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _cloudpickle_internal(name: str) -> Any:
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - a runtime dependency
        return None
    return getattr(getattr(cloudpickle, "cloudpickle", None), name, None)


# --------------------------------------------------------------------------
# Named semaphores: _multiprocessing.SemLock


def semlock_class() -> Any:
    """``_multiprocessing.SemLock``: a named POSIX semaphore. No fallback: raises.

    Used by the shared helpers (``mpmagic.Lock``, ``Queue``...); without it
    they cannot work inside running tasks, and the message says so.
    """
    mod = _module("_multiprocessing")
    cls = getattr(mod, "SemLock", None)
    if cls is None or not hasattr(cls, "_rebuild"):
        raise MissingFeatureError(
            f"mpmagic's shared helpers (Lock, Queue, Value...) need named semaphores "
            f"(_multiprocessing.SemLock), which {_PYTHON} lacks: use the Dask backend's "
            f"helpers (%pool dask) or pass data as arguments and results"
        )
    return cls


def sem_unlink(name: str) -> None:
    """Remove a named semaphore (``_multiprocessing.sem_unlink``); FileNotFoundError if gone."""
    unlink = getattr(_module("_multiprocessing"), "sem_unlink", None)
    if unlink is None:
        raise MissingFeatureError(f"removing a named semaphore needs _multiprocessing.sem_unlink, which {_PYTHON} lacks")
    unlink(name)


# --------------------------------------------------------------------------
# POSIX shared memory: _posixshmem, with /dev/shm as the fallback on Linux

_DEV_SHM = "/dev/shm"


def shm_open_available() -> bool:
    """Is there a ``shm_open`` here: ``_posixshmem``'s, or our fallback's ``/dev/shm``?
    (Whether the platform's /dev/shm is usable is ``posixshm.shm_available``'s question.)"""
    return _module("_posixshmem") is not None or os.path.isdir(_DEV_SHM)


def heap_off_dev_shm() -> None:
    """multiprocessing's heap for shared ctypes (a worker's ``RawValue``) keeps only
    the directories of its ``Arena._dir_candidates`` (``['/dev/shm']`` on Linux) this
    process may create files in; with none left it uses the temporary directory.
    Its ``Arena`` statvfs'ed a missing /dev/shm (FileNotFoundError) and wrote into
    a read-only one (EROFS): every worker start failed. (The same test as
    ``posixshm.dev_shm_usable``, made on the heap's own list: posixshm imports this
    module.) Without the attribute: nothing changes (logged once at INFO), and such
    starts fail as before."""
    arena = getattr(_module("multiprocessing.heap"), "Arena", None)
    candidates = getattr(arena, "_dir_candidates", None)
    if not isinstance(candidates, list):
        if not _heap_said:
            _heap_said.append(True)
            log.info("multiprocessing.heap.Arena._dir_candidates is missing in %s: without a usable /dev/shm "
                     "workers cannot start", _PYTHON)
        return
    usable = [d for d in candidates if os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK)]
    if usable != candidates:
        arena._dir_candidates = usable  # type: ignore[union-attr]  # (a list was found on it)


_heap_said: list[bool] = []


def shm_open(name: str, flags: int, mode: int = 0o600) -> int:
    """A file descriptor of the shared-memory object ``name`` ("/abc", as shm_open(3) takes).

    Fallback without ``_posixshmem``: on Linux, shm_open(3) *is* an open() of
    /dev/shm/NAME (glibc does exactly that), so we do the same.
    """
    mod = _module("_posixshmem")
    if mod is not None and hasattr(mod, "shm_open"):
        return int(mod.shm_open(name, flags, mode))
    if os.path.isdir(_DEV_SHM):
        return os.open(os.path.join(_DEV_SHM, name.lstrip("/")), flags, mode)
    raise MissingFeatureError(
        f"shared memory needs POSIX shm_open (_posixshmem), which {_PYTHON} lacks: "
        f"large arrays will be pickled instead"
    )


def shm_unlink(name: str) -> None:
    """Remove the shared-memory name (the memory stays while mapped); FileNotFoundError if gone."""
    mod = _module("_posixshmem")
    if mod is not None and hasattr(mod, "shm_unlink"):
        mod.shm_unlink(name)
        return
    if os.path.isdir(_DEV_SHM):
        os.unlink(os.path.join(_DEV_SHM, name.lstrip("/")))
        return
    raise MissingFeatureError(f"removing shared memory needs POSIX shm_unlink (_posixshmem), which {_PYTHON} lacks")


# --------------------------------------------------------------------------
# Mappings that keep no file descriptor: libc's mmap(MAP_FIXED) through ctypes

_MAP_FIXED = 0x10  # (the same on Linux and macOS; Python's mmap module does not export it)
# Linux: an address reservation charged nothing to commit (mmap's MAP_NORESERVE, exported from 3.13 on);
# elsewhere 0 (macOS ignores it anyway).
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
_TRACKFD = sys.version_info >= (3, 13)  # mmap.mmap(..., trackfd=False)
#: Placeholders whose range this process may no longer own (a failed MAP_FIXED that
#: could not be covered again): kept forever, since their close() would munmap it.
_orphans: list[mmap.mmap] = []


def map_fd(fd: int, size: int, private: bool = False) -> mmap.mmap:
    """``mmap.mmap(fd, size)`` (``private``: copy-on-write, ``MAP_PRIVATE``) that
    keeps no file descriptor open: the caller may close ``fd`` and the mapping
    stays, as mmap(2) promises.

    ``size`` is required and must be > 0: 0 raises ``ValueError("cannot mmap
    an empty file")`` on every Python (``mmap.mmap`` would map the whole file
    on 3.13 and fail with EINVAL before it).

    Why: CPython's ``mmap.mmap`` keeps a ``dup`` of the descriptor for the
    object's whole life (for ``size()`` and ``resize()``), so every kept
    numpy result and every shared helper held one: 300 results of 1.2 MB ran
    the notebook out of files under ``ulimit -n 256``, and the 57th
    ``mpmagic.Value`` under ``ulimit -n 64``. Python 3.13 has
    ``trackfd=False``; before it, an anonymous ``mmap.mmap`` (no descriptor,
    ``MAP_NORESERVE``: not charged to committed memory) reserves the
    addresses and libc's ``mmap`` with ``MAP_FIXED`` puts the segment at
    exactly those addresses in place of it, so the object's length, buffer,
    ``close()`` (``munmap``) and export checks are the real mapping's.
    Below 3.13 the object is *not* the real mapping's in two ways, so it must
    not be handed to code that calls them: ``size()`` raises ``EBADF`` (no
    descriptor), and ``resize()`` ``mremap``s without truncating the file.

    Fallbacks: without ctypes or libc's ``mmap``, the plain ``mmap.mmap`` (one
    descriptor per mapping, logged once at INFO); when the reservation itself
    is refused (``ENOMEM``: ``vm.overcommit_memory=2`` ignores
    ``MAP_NORESERVE``), the plain ``mmap.mmap`` too, for that mapping. A
    failed ``MAP_FIXED`` raises an ``OSError`` naming the segment mapping
    (and ``vm.max_map_count`` for ``ENOMEM``).
    """
    if size <= 0:
        raise ValueError("cannot mmap an empty file")
    flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if _TRACKFD:
        return mmap.mmap(fd, size, flags=flags, prot=prot, **{"trackfd": False})
    libc_mmap = _libc_mmap()
    if libc_mmap is None:
        return mmap.mmap(fd, size, flags=flags, prot=prot)
    if size > os.fstat(fd).st_size:  # (what mmap.mmap checks: a page past the file's end is a SIGBUS)
        raise ValueError("mmap length is greater than file size")
    try:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=prot)
    except OSError as exc:
        if exc.errno != errno.ENOMEM:
            raise
        log.debug("mpmagic: reserving %d bytes of addresses was refused (strict overcommit?): "
                  "this mapping keeps its file descriptor", size)
        return mmap.mmap(fd, size, flags=flags, prot=prot)
    import ctypes

    anchor = ctypes.c_char.from_buffer(mapping)  # (an export of the mapping: gone with it, next line)
    address = ctypes.addressof(anchor)
    del anchor
    if libc_mmap(address, size, prot, flags | _MAP_FIXED, fd, 0) != address:
        err = ctypes.get_errno()
        _unmap_failed(mapping, libc_mmap, address, size)
        hint = " (the limit on a process's mappings, vm.max_map_count, may be reached)" if err == errno.ENOMEM else ""
        raise OSError(err, f"mapping a shared-memory segment of {size} bytes failed: {os.strerror(err)}{hint}")
    return mapping


def _unmap_failed(mapping: mmap.mmap, libc_mmap: Any, address: int, size: int) -> None:
    """Close the placeholder after a failed ``MAP_FIXED``, never unmapping another's memory.

    A failed ``MAP_FIXED`` may already have unmapped the range (POSIX allows it;
    Linux does on some ENOMEM paths), and the ctypes call released the GIL: another
    thread may have mapped memory there, which ``close()``'s ``munmap`` would tear
    away. So the range is first covered again by an anonymous placeholder of ours
    (``MAP_FIXED``: atomic), and only then closed; if even that fails, the object is
    kept for good (:data:`_orphans`) and never closed. (Protection 0: PROT_NONE.)
    """
    anon = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", getattr(mmap, "MAP_ANON", 0x20))
    if libc_mmap(address, size, 0, anon | _MAP_NORESERVE | _MAP_FIXED, -1, 0) == address:
        mapping.close()
    else:
        _orphans.append(mapping)


_libc: list[Any] = []  # [libc's mmap, or None], found once


def _libc_mmap() -> Any:
    if not _libc:
        fn = None
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).mmap
            fn.restype = ctypes.c_void_p
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        except (ImportError, OSError, AttributeError):
            log.info("libc's mmap is not reachable through ctypes in %s: each shared-memory mapping keeps "
                     "a file descriptor open", _PYTHON)
            fn = None
        _libc.append(fn)
    return _libc[0]


# --------------------------------------------------------------------------
# warnings' "filters changed" call


def warnings_filters_mutated() -> Callable[[], None] | None:
    """``warnings._filters_mutated``: the call that tells ``warnings`` its filters list
    was changed in place (drops the "already warned" registries). None where it is
    missing (3.14 renamed it ``_filters_mutated_lock_held``, to be called only under
    warnings' own lock, so it is not used): callers then make the public calls
    (``resetwarnings``, ``simplefilter``), slower by a few microseconds a unit."""
    import warnings

    fn = getattr(warnings, "_filters_mutated", None)
    return fn if callable(fn) else None


# --------------------------------------------------------------------------
# The resource tracker: a safety net, so its absence only costs the net


def tracker_register(name: str, rtype: str) -> None:
    """Ask multiprocessing's resource tracker to unlink ``name`` if we die uncleanly.

    Fallback: nothing (logged once). Our own sweep of dead notebooks' names
    (shm.sweep_stale) still removes shared memory at the next pool start.
    """
    fn = _tracker_function("register")
    if fn is not None:
        fn(name, rtype)


def tracker_unregister(name: str, rtype: str) -> None:
    """Tell the resource tracker that ``name`` was unlinked by us (fallback: nothing)."""
    fn = _tracker_function("unregister")
    if fn is not None:
        fn(name, rtype)


def tracker_connected() -> bool:
    """Whether this process already talks to a resource tracker (its pipe is open).

    A fork worker of a notebook that had not started its tracker yet does not:
    ``tracker_register`` there would start a tracker of its own, which the
    notebook never hears from (its ``unregister`` of the name then printed a
    KeyError traceback). Fallback: False (the name is not registered; the
    notebook's sweeps still remove it).
    """
    tracker = getattr(_module("multiprocessing.resource_tracker"), "_resource_tracker", None)
    return isinstance(getattr(tracker, "_fd", None), int) and _tracker_function("register") is not None


def tracker_forget(names: Iterable[tuple[str, str]]) -> None:
    """Tell the resource tracker this process shares (a worker's: the notebook's)
    that ``names`` (``(name, rtype)``, as registered) were unlinked, *without*
    starting a tracker: ``unregister`` starts a new one when the notebook's
    died with its process group. Writes its ``UNREGISTER:name:rtype`` lines to
    the tracker's pipe (``resource_tracker._resource_tracker._fd``).

    For the workers of a notebook that died: they unlink its helpers first,
    and the tracker then tried again, one "No such file" warning per name.
    Fallback: nothing (those warnings stay). A tracker that is gone (its pipe
    broken) is told nothing.
    """
    tracker = getattr(_module("multiprocessing.resource_tracker"), "_resource_tracker", None)
    fd = getattr(tracker, "_fd", None)
    if not isinstance(fd, int) or _tracker_function("unregister") is None:
        return
    for name, rtype in names:
        line = f"UNREGISTER:{name}:{rtype}\n".encode("ascii")
        if len(line) > 512:  # (the tracker's own limit on one message)
            continue
        try:
            os.write(fd, line)
        except OSError:
            return


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker now, if it is not running.

    A spawn or forkserver worker's start starts the tracker first if needed,
    and ``resource_tracker.ensure_running`` then *unblocks* SIGINT in the
    calling thread (it blocks it only while it starts the tracker). The
    worker, or the fork server, exec'ed next had SIGINT unblocked while it
    imported ``site``: an interrupt of the kernel then (jupyter signals its
    whole process group) killed it with "Fatal Python error: init_import_site
    ... KeyboardInterrupt". The caller starts the tracker first and then
    blocks SIGINT again. Fallback: nothing (logged once): the window stays.
    """
    fn = _tracker_function("ensure_running")
    if fn is not None:
        fn()


def stop_helper_processes() -> None:
    """End multiprocessing's fork server and resource tracker processes now.

    For a kernel's shutdown only (a later pool starts new ones). The fork
    server is reaped (a zombie child kept ipykernel waiting), and the
    tracker unlinks what is still registered, as at any exit. Fallback:
    nothing (the kernel then takes ~2.5 s more to exit).

    multiprocessing's own exit finalizers (``util._run_finalizers(0)``, what
    its exit hook runs first) run before the tracker stops: a notebook's
    live ``multiprocessing.Lock`` is then unlinked and unregistered by its
    own finalizer. Stopped first, the tracker unlinked it as "leaked" and
    the finalizer at exit printed a ``FileNotFoundError`` traceback from
    ``sem_unlink`` per lock. Fallback: the tracker's warning and those
    tracebacks at exit, nothing else.
    """
    run_finalizers = getattr(_module("multiprocessing.util"), "_run_finalizers", None)
    if run_finalizers is None:
        log.info("multiprocessing.util._run_finalizers is missing in %s: live locks print at exit", _PYTHON)
    else:
        run_finalizers(0)
    for module, attribute in (
        ("multiprocessing.forkserver", "_forkserver"),
        ("multiprocessing.resource_tracker", "_resource_tracker"),
    ):
        stop = _stopper(module, attribute)
        if stop is None:
            log.info("%s.%s cannot be stopped in %s: the kernel exits later", module, attribute, _PYTHON)
            continue
        stop()


def forkserver_release_alive_fd() -> bool:
    """In a forkserver's worker: close its copy of the forkserver's "alive" pipe
    (see the module docstring), so the forkserver exits with the notebook.
    True if there was one. A task of this worker that uses the forkserver
    start method still gets a forkserver of its own (this process never
    started one: ``ensure_running`` starts it). Fallback: False, nothing done
    (the forkserver, and so the workers, outlive the notebook until they stop)."""
    server = getattr(_module("multiprocessing.forkserver"), "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if not isinstance(fd, int):
        return False
    try:
        os.close(fd)
    except OSError:
        pass
    server._forkserver_alive_fd = None  # type: ignore[union-attr]
    return True


def forkserver_socket_path() -> str | None:
    """In the forkserver: the file of its listening socket (``/tmp/pymp-XXXX/listener-...``),
    None if it has no file (an abstract socket) or cannot be told. Read from
    ``multiprocessing.forkserver._forkserver._forkserver_address``, which the
    forkserver's ``main`` sets. Fallback: None (a killed notebook's
    ``/tmp/pymp-*`` directory stays, as with plain multiprocessing)."""
    server = getattr(_module("multiprocessing.forkserver"), "_forkserver", None)
    address = getattr(server, "_forkserver_address", None)
    return address if isinstance(address, str) and address.startswith("/") else None


def _stopper(module: str, attribute: str) -> Callable[[], None] | None:
    return getattr(getattr(_module(module), attribute, None), "_stop", None)


_warned: set[str] = set()


def _tracker_function(which: str) -> Callable[..., None] | None:
    fn = getattr(_module("multiprocessing.resource_tracker"), which, None)
    if fn is None and which not in _warned:
        _warned.add(which)
        what = ("workers may start before it, with SIGINT unblocked" if which == "ensure_running"
                else "names are not tracked")
        log.info("multiprocessing.resource_tracker.%s is missing in %s: %s", which, _PYTHON, what)
    return fn


# --------------------------------------------------------------------------
# multiprocessing.spawn.get_preparation_data: our children never run __main__

_starting = threading.local()  # .on: this thread is starting a worker (or the fork server for one)
# A child's process name -> how many holders want every child of that name to ignore __main__,
# whichever thread starts it (children_named_ignore_main); changed under _named_lock
_named: dict[str, int] = {}
_named_lock = threading.Lock()


def _main_dropped(get_preparation_data: Callable[[str], dict]) -> Callable[[str], dict]:
    def preparation_data(name: str) -> dict:
        data = get_preparation_data(name)
        if getattr(_starting, "on", False) or _named.get(name):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    preparation_data._mpmagic_wraps = get_preparation_data  # type: ignore[attr-defined]
    return preparation_data


def _wrap_preparation_data() -> bool:
    """Install the wrapper of ``multiprocessing.spawn.get_preparation_data`` (once);
    False when there is none to wrap."""
    spawn = _module("multiprocessing.spawn")
    current = getattr(spawn, "get_preparation_data", None)
    if current is None:
        return False
    if getattr(current, "_mpmagic_wraps", None) is None:
        spawn.get_preparation_data = _main_dropped(current)
    return True


@contextmanager
def children_ignore_main() -> Iterator[bool]:
    """While in it, spawn and forkserver children started by this thread (and a fork
    server it starts) do not run the notebook's ``__main__``; yields False when that
    cannot be arranged (no ``multiprocessing.spawn.get_preparation_data``).

    Why: multiprocessing tells each child to run the parent's ``__main__`` file
    (``init_main_from_path``), read at the moment of the start. Hiding
    ``sys.modules['__main__']`` is not enough from a background thread: a
    ``%run script.py`` in the main thread puts the script there meanwhile, and the
    pool's background start made the child (or the fork server) run the whole
    script again, whose own pmap then failed with multiprocessing's bootstrapping
    traceback. The wrapper is installed once and changes other threads' starts in
    nothing.
    """
    if not _wrap_preparation_data():
        yield False
        return
    before = getattr(_starting, "on", False)
    _starting.on = True
    try:
        yield True
    finally:
        _starting.on = before


def children_named_ignore_main(name: str) -> Callable[[], None] | None:
    """From now until the returned function is called, every spawn or forkserver child
    whose process name is ``name`` does not run the parent's ``__main__``, whichever
    thread starts it, and whenever; None when that cannot be arranged (no
    ``multiprocessing.spawn.get_preparation_data``). Holders count: the name is
    dropped when the last one lets go.

    Why: a Dask nanny starts its worker process from a thread of its own, and starts
    it again there whenever the worker dies, long after the start that
    :func:`children_ignore_main` (a thread's) or a swapped ``sys.modules['__main__']``
    covered. In a script without a ``__main__`` guard, an item that killed its worker
    on ``use_dask()``'s cluster made the new worker process run the whole script
    again, whose ``use_dask`` started a cluster of its own ("Nanny failed to start"),
    again and again. Only the children of that name are changed.
    """
    if not _wrap_preparation_data():
        return None
    with _named_lock:
        _named[name] = _named.get(name, 0) + 1
    released = False

    def release() -> None:
        nonlocal released
        with _named_lock:
            if released:
                return
            released = True
            left = _named.get(name, 0) - 1
            if left > 0:
                _named[name] = left
            else:
                _named.pop(name, None)

    return release


# --------------------------------------------------------------------------
# multiprocessing.spawn's os: the directory a child starts in


class _OsStartingIn(types.ModuleType):
    """``os`` for ``multiprocessing.spawn`` alone, with ``getcwd`` naming another directory."""

    def __init__(self, path: str) -> None:
        super().__init__("os")
        self._path = path

    def getcwd(self) -> str:
        return self._path

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@contextmanager
def children_start_in(path: str) -> Iterator[None]:
    """While in it, spawn and forkserver children start in ``path``, not the notebook's directory.

    Only ``multiprocessing.spawn`` sees the change (its module global ``os``);
    the notebook's directory is untouched. Without that global (another
    multiprocessing), nothing changes: a child then fails as multiprocessing
    makes it (logged once at INFO).
    """
    spawn = _module("multiprocessing.spawn")
    real = getattr(spawn, "os", None)
    if real is not os:
        if "spawn.os" not in _warned:
            _warned.add("spawn.os")
            log.info("mpmagic: multiprocessing.spawn has no os global here: workers start in the notebook's directory")
        yield
        return
    spawn.os = _OsStartingIn(path)
    try:
        yield
    finally:
        spawn.os = real


# --------------------------------------------------------------------------
# threading's hooks run at exit before the non-daemon threads are joined


def register_before_threads_join(hook: Callable[[], None]) -> bool:
    """Call ``hook()`` at the interpreter's exit before it joins the non-daemon threads
    (``threading._register_atexit``, where ``concurrent.futures`` waits for its pending
    work before it stops every thread pool); such hooks run last registered, first.
    True once registered.

    Fallback without it: nothing (logged; False): a script's exit then waits for its
    runs in flight only in mpmagic's ``atexit`` hooks (``exiting.wait_for_runs``), after
    Python's exit stopped the thread pools, where a run on a Dask ``LocalCluster`` of
    this process fails instead of finishing. Also False once the exit began.
    """
    register = getattr(threading, "_register_atexit", None)
    if not callable(register):
        log.info("threading._register_atexit is missing in %s: at exit, mpmagic waits for the runs in flight "
                 "only after the thread pools stopped (Dask's runs then fail)", _PYTHON)
        return False
    try:
        register(hook)
    except RuntimeError:  # "can't register atexit after shutdown"
        return False
    return True


# --------------------------------------------------------------------------
# multiprocessing's list of child processes


def forget_inherited_processes(processes: Iterable[Any]) -> None:
    """In a process just forked from the notebook: take the notebook's
    ``processes`` (its workers) out of ``multiprocessing.process._children``.

    That set is copied by ``os.fork()``; at this process's exit multiprocessing's
    own hook (``util._exit_function``) terminates every daemonic process in it
    and joins it: the notebook's workers died, and the join failed with
    "can only join a child process". (A ``multiprocessing.Process`` empties it
    in the child itself; a bare ``os.fork()`` does not.)

    Fallback without that set: nothing (logged); the child's exit then stops
    the notebook's workers and the pool replaces them at its next run.
    """
    children = getattr(_module("multiprocessing.process"), "_children", None)
    if not isinstance(children, set):
        log.info("multiprocessing.process._children is missing in %s: a forked child's exit "
                 "may stop the notebook's workers", _PYTHON)
        return
    children.difference_update(processes)


# --------------------------------------------------------------------------
# pandas' option store: the notebook's changed options are carried (context.py)

_pandas_store_missing: list[bool] = []  # (logged once)


def pandas_option_store(pd: Any) -> tuple[dict, dict] | None:
    """pandas' option values and its registered options, or None.

    ``pandas._config.config._global_config`` holds every option's value as
    nested dicts (``{"display": {"max_rows": 60, ...}, "future": {...}}``), and
    ``_registered_options`` maps each option's key to its record (``defval``, its
    default). Comparing the first with a copy costs ~1 us, where reading the
    options with ``pd.get_option`` costs ~130 us, and warns for each deprecated one.
    None where either is missing: the notebook's pandas options are not carried
    to the workers (logged once at INFO), as before they were.
    """
    config = getattr(getattr(getattr(pd, "_config", None), "config", None), "_global_config", None)
    registered = getattr(getattr(getattr(pd, "_config", None), "config", None), "_registered_options", None)
    if isinstance(config, dict) and isinstance(registered, dict):
        return config, registered
    if not _pandas_store_missing:
        _pandas_store_missing.append(True)
        log.info("mpmagic: this pandas keeps its options elsewhere; the notebook's pandas options "
                 "(pd.set_option) are not carried to the workers")
    return None


# --------------------------------------------------------------------------
# cloudpickle internals: each one has a slower or plainer fallback


def cloudpickle_code_reduce() -> Callable[[Any], tuple] | None:
    """cloudpickle's reducer of code objects, or None.

    None means: pickle code objects cloudpickle's own way; tracebacks from
    workers then name "<dynamic-code>" instead of the notebook cell.
    """
    return _cloudpickle_internal("_code_reduce")


def cloudpickle_extract_code_globals() -> Callable[[Any], Any] | None:
    """The global names a code object reads, or None: the payload cache then re-pickles every call."""
    return _cloudpickle_internal("_extract_code_globals")


def cloudpickle_by_reference() -> Callable[[Any], bool] | None:
    """Whether cloudpickle pickles an object by name, or None: the cache then assumes by value."""
    return _cloudpickle_internal("_should_pickle_by_reference")


def cloudpickle_class_setstate() -> Callable[[type, Any], type] | None:
    """What a cloudpickle pickle calls to set a class's state (by this name), or None:
    loads then leave it to cloudpickle (the notebook's class gets the worker's copies)."""
    return _cloudpickle_internal("_class_setstate")


def cloudpickle_track_class(cls: type, tracker_id: str) -> bool:
    """Make ``tracker_id`` the id cloudpickle sends ``cls`` by value with (its
    ``_DYNAMIC_CLASS_TRACKER_BY_CLASS`` / ``_BY_ID``); False where this cloudpickle
    has no such trackers: the class then gets its own random id, as before (the
    instances of a setup's class from two workers come home as two classes)."""
    by_class = _cloudpickle_internal("_DYNAMIC_CLASS_TRACKER_BY_CLASS")
    by_id = _cloudpickle_internal("_DYNAMIC_CLASS_TRACKER_BY_ID")
    lock = _cloudpickle_internal("_DYNAMIC_CLASS_TRACKER_LOCK")
    if by_class is None or by_id is None or lock is None:
        return False
    try:
        with lock:
            by_class[cls] = tracker_id
            by_id[tracker_id] = cls
    except TypeError:  # (not weakly referenceable)
        return False
    return True


# --------------------------------------------------------------------------
# importlib's mark of a module still being imported


def module_initializing(module: types.ModuleType) -> bool:
    """Is ``module`` still running its top level as an import (``__spec__._initializing``,
    what importlib itself tests before it waits on the module's import lock)?

    False when not known (no spec, or an importlib without the mark): a plain
    pickle of its classes may then wait on that lock, as it would without mpmagic.
    """
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def imports_elsewhere() -> list[tuple[str, int]]:
    """(module, thread id) for each module a thread other than this one is
    importing now: its import lock (importlib's per-module ``_ModuleLock``) is
    held by that thread.

    Empty when not known (an importlib without these internals): a fork then
    goes ahead, as it would without mpmagic.
    """
    try:
        from importlib import _bootstrap

        refs = list(_bootstrap._module_locks.items())  # type: ignore[attr-defined]
    except Exception:
        return []
    me = threading.get_ident()
    names: list[tuple[str, int]] = []
    for name, ref in refs:
        lock = ref()
        owner = getattr(lock, "owner", None)
        if owner is not None and owner != me:
            names.append((name, owner))
    return names


# --------------------------------------------------------------------------
# executing's and stack_data's parse of a %%parallel cell


def parse_magic_cell(filename: str) -> bool:
    """Give the ``Source`` that ``executing`` and ``stack_data`` (IPython's tracebacks)
    make of ``filename``, a ``%%parallel`` cell whose lines ``linecache`` holds, the
    tree of those lines with the ``%%`` lines above its body made comments: a rank's
    frame then has its failing expression and the variables of its line (``%xmode
    Verbose``: ``x = 2``), as the same cell run serially, where the ``%%parallel`` line
    failed the whole parse. Its lines, which the traceback shows, stay the cell's.
    Called when a rank's frame is rebuilt there (``exc_record.rebuild``), not at each
    run: the two parses cost ~7 ms for a cell of 50 lines, a run ~1 ms.

    True when done; False (logged at DEBUG) where neither library is installed or their
    internals differ: the frame shows its lines, no variables.
    """
    lines = tuple(linecache.getlines(filename))
    parsed = list(lines)
    for i, line in enumerate(lines):  # (the blank and %% lines above the body: errors.CellOrigin.offset)
        if line.lstrip().startswith("%%"):
            parsed[i] = line.replace("%", "#", 1)
        elif line.strip():
            break
    done = False
    for module in ("executing", "stack_data"):  # (stack_data's Source keeps a cache of its own)
        # (imported here if need be: IPython imports them at its first traceback, which may be this one's)
        cls = getattr(_module(module), "Source", None)
        try:
            source = cls._for_filename_and_lines(filename, lines)  # type: ignore[union-attr]
            if source.tree is None:
                with_tree = cls(filename, parsed)  # type: ignore[misc]
                if with_tree.tree is None:
                    continue  # (the body's own syntax error: the rank never ran)
                vars(source).update({k: v for k, v in vars(with_tree).items() if k not in ("text", "lines")})
            done = True
        except Exception:
            log.debug("mpmagic: %s's Source of %s not parsed past its magic lines", module, filename, exc_info=True)
    return done


# --------------------------------------------------------------------------
# IPython's in-place autoreload: followed when present, else nothing to follow

_DEDUPER = "IPython.extensions.deduperreload.deduperreload"


def follow_inplace_reloads(note: Callable[[types.ModuleType], None]) -> None:
    """Call ``note(module)`` after each in-place update of a module by IPython's
    autoreload (``DeduperReloader.maybe_reload_module`` returning True: it ran
    the edited file's new definitions into the old module, with no
    ``importlib.reload``, so the module keeps its ``__spec__`` and no finder
    sees a load). Once; cheap when autoreload is not imported (a dict lookup).

    Missing (IPython 8's autoreload, which calls ``importlib.reload``, or no
    autoreload): nothing to wrap, and nothing is lost. ``note`` must not raise
    into autoreload: its errors are logged at DEBUG.
    """
    cls = getattr(sys.modules.get(_DEDUPER), "DeduperReloader", None)
    original = getattr(cls, "maybe_reload_module", None)
    if original is None or getattr(original, "_mpmagic_follows", False):
        return

    def maybe_reload_module(self: Any, module: types.ModuleType) -> bool:
        patched = original(self, module)
        if patched:
            try:
                note(module)
            except Exception:
                log.debug("mpmagic: noting an in-place autoreload of %r failed", module, exc_info=True)
        return patched

    maybe_reload_module.__doc__ = original.__doc__
    maybe_reload_module._mpmagic_follows = True  # type: ignore[attr-defined]
    cls.maybe_reload_module = maybe_reload_module  # type: ignore[union-attr]


def report() -> dict[str, bool]:
    """Which private APIs this interpreter has (True) and which fall back (False)."""
    return {
        "_multiprocessing.SemLock": getattr(_module("_multiprocessing"), "SemLock", None) is not None,
        "_multiprocessing.sem_unlink": getattr(_module("_multiprocessing"), "sem_unlink", None) is not None,
        "_posixshmem": _module("_posixshmem") is not None,
        "libc mmap (MAP_FIXED)": _TRACKFD or _libc_mmap() is not None,
        "resource_tracker.register": _tracker_function("register") is not None,
        "resource_tracker.ensure_running": _tracker_function("ensure_running") is not None,
        "forkserver._stop": _stopper("multiprocessing.forkserver", "_forkserver") is not None,
        "forkserver._forkserver_address": hasattr(
            getattr(_module("multiprocessing.forkserver"), "_forkserver", None), "_forkserver_address"
        ),
        "forkserver._forkserver_alive_fd": hasattr(
            getattr(_module("multiprocessing.forkserver"), "_forkserver", None), "_forkserver_alive_fd"
        ),
        "resource_tracker._stop": _stopper("multiprocessing.resource_tracker", "_resource_tracker") is not None,
        "resource_tracker._fd": hasattr(getattr(_module("multiprocessing.resource_tracker"), "_resource_tracker", None),
                                        "_fd"),
        "multiprocessing.spawn.os": getattr(_module("multiprocessing.spawn"), "os", None) is os,
        "multiprocessing.heap.Arena._dir_candidates": isinstance(
            getattr(getattr(_module("multiprocessing.heap"), "Arena", None), "_dir_candidates", None), list
        ),
        "multiprocessing.process._children": isinstance(
            getattr(_module("multiprocessing.process"), "_children", None), set
        ),
        "threading._register_atexit": callable(getattr(threading, "_register_atexit", None)),
        "warnings._filters_mutated": warnings_filters_mutated() is not None,
        "cloudpickle._code_reduce": cloudpickle_code_reduce() is not None,
        "cloudpickle._extract_code_globals": cloudpickle_extract_code_globals() is not None,
        "cloudpickle._should_pickle_by_reference": cloudpickle_by_reference() is not None,
        "cloudpickle._class_setstate": cloudpickle_class_setstate() is not None,
        # (without pandas installed there is nothing to carry, and nothing falls back)
        "executing.Source._for_filename_and_lines": (_module("executing") is None or callable(
            getattr(getattr(sys.modules["executing"], "Source", None), "_for_filename_and_lines", None))),
        "pandas._config.config._global_config": (_module("pandas") is None
                                                 or pandas_option_store(sys.modules["pandas"]) is not None),
    }
