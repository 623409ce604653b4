"""The notebook's record of each source file it loaded: the file's stat at that
moment, and the order of the loads.

Why: workers that (re)load a user's module read the file as it is on disk.
When it was saved again after the notebook loaded it (``importlib.reload``
then another save, or an edit before the first parallel run), the workers ran
``v3`` where the notebook's serial map ran ``v2``, and no line said so: the
only baseline was a stat taken at the module's first parallel run, already
after the second save. And a reload of ``m1`` (which does ``from m2 import
g``) before one of ``m2`` leaves the notebook's ``m1.g`` old; workers
reloading in ``sys.modules`` order (``m2`` first) gave the new one.

So ``import mpmagic`` puts a finder at the front of ``sys.meta_path`` (a
local pool's worker keeps it too and reports its loads of the user's files:
:func:`report_loads`). It finds nothing
itself: it asks the finders after it, returns their spec unchanged (so no
finder runs twice), and for a spec of a ``.py`` file notes the file's
``(mtime_ns, size)`` and a load number. ``importlib.reload`` (and
``%autoreload``) goes through ``sys.meta_path`` too, and the module's new
``__spec__`` is that spec, so :func:`loaded` tells whether the record is of
the load the notebook runs. Cost: a stat per ``.py`` module imported.

IPython 9's ``%autoreload`` goes round the import system: it runs the edited
file's new definitions into the old module (no new spec, no finder asked).
``warmup`` has it call :func:`reexecuted` after each such update
(``compat.follow_inplace_reloads``): a new load number and the file's stat
then, for the same spec, so that update counts as a reload (the workers
reload the module; its file is not "changed since the notebook loaded it").
Modules imported before mpmagic have no record (warmup.py falls back on a
stat at their first parallel run).

A load of a module that is still in ``sys.modules`` is a reload (importlib
tells the two apart the same way): its number is noted too, so that
:func:`reloaded_since` tells ``%pdebug`` which modules were reloaded after a
run (a function of such a module travels by name: the replay runs its new code).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
import uuid
from typing import Any

# module name -> (the spec found for its latest load, its file's (mtime_ns, size) then, load number)
_loads: dict[str, tuple[Any, tuple[int, int], int]] = {}
_inplace: dict[str, int] = {}  # module name -> how many times it was re-run in place (autoreload)
# module name -> load number of its latest reload here (importlib.reload, %autoreload): a load
# of a module already in sys.modules, as importlib tells a reload from a first import
_reloads: dict[str, int] = {}
_numbers = itertools.count(1)
# Load numbers are this process's: a Dask worker serving several notebooks tells
# theirs apart by this (see dask_tasks.follow_reloads).
NOTEBOOK = uuid.uuid4().hex[:12]
# In a local pool's worker (report_loads): the modules it (re)loaded from a source file
# outside ``_skip`` since its last reply, each with its file's stamp then (take_loads).
_fresh: dict[str, tuple[int, int]] | None = None
_skip: tuple[str, ...] = ()


class _LoadStamps:
    """A ``sys.meta_path`` finder that notes the file of each spec the finders after it find."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        """The spec the next finders find for ``name`` (None if none), noting its file."""
        meta_path = sys.meta_path
        try:
            rest = meta_path[meta_path.index(self) + 1:]
        except ValueError:  # taken out meanwhile
            return None
        for finder in rest:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(name, path, target)
            if spec is None:
                continue
            origin = getattr(spec, "origin", None)
            if isinstance(origin, str) and origin.endswith(".py"):
                at_load = stamp(origin)
                if at_load is not None:
                    number = next(_numbers)
                    _loads[name] = (spec, at_load, number)
                    if name in sys.modules:  # (importlib.reload looks for the spec of a module it has)
                        _reloads[name] = number
                    if _fresh is not None and not origin.startswith(_skip):
                        _fresh[name] = at_load
            return spec
        return None


_FINDER = _LoadStamps()


def stamp(path: Any) -> tuple[int, int] | None:
    """A source file's ``(mtime_ns, size)``: what tells one version of it from
    another here (None when it cannot be read: no file, a module without one)."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return st.st_mtime_ns, st.st_size


def signature(path: str) -> tuple[int, int, int] | None:
    """A source file's ``(mtime_ns, size, inode)`` (None when it cannot be read): the
    :func:`stamp` and the inode, which an editor's save by rename changes too."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def digest(path: Any) -> str | None:
    """A source file's content hash (None when it cannot be read): what tells a
    worker's copy of a module's file from the notebook's on another machine,
    where the stat differs for the same text."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha1(f.read(), usedforsecurity=False).hexdigest()
    except (OSError, TypeError, ValueError):
        return None


def install() -> None:
    """Put the finder first in ``sys.meta_path`` (once; the notebook's ``import mpmagic``)."""
    if not any(isinstance(f, _LoadStamps) for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)


def report_loads(skip: tuple[str, ...]) -> None:
    """In a local pool's worker (``worker.main``): note each module it (re)loads from now on
    from a source file not under ``skip`` (installed code, mpmagic's), with the file's stamp
    then, for its next reply to take home (:func:`take_loads`).

    Why: a worker that imports the user's ``mymod.py`` after it was saved with new code
    (not reloaded in the notebook: recycled by ``max_tasks_per_child``, added by a resize,
    replacing a dead worker) runs the new file, where the notebook and serial Python run
    the version loaded. The notebook compares these stamps with its own and says so
    (``LocalBackend._say_other_versions``). Cost: the finder's stat per ``.py`` import, and
    a dict lookup per reply. The records a fork copied from the notebook are of the modules
    it inherited, which are the notebook's versions: they stay, and are not reported."""
    global _fresh, _skip
    _skip = skip
    _fresh = {}
    install()


def take_loads() -> dict[str, tuple[int, int]] | None:
    """The loads :func:`report_loads` noted since the last call (None when none)."""
    global _fresh
    if not _fresh:
        return None
    loads, _fresh = _fresh, {}
    return loads


def reexecuted(module: Any) -> None:
    """The notebook ran ``module``'s file again into the module itself (IPython's
    in-place autoreload): a new load of the same spec, with the file's stat now."""
    name = getattr(module, "__name__", None)
    spec = getattr(module, "__spec__", None)
    at_load = stamp(getattr(module, "__file__", None))
    if not isinstance(name, str) or spec is None or at_load is None:
        return
    number = _reloads[name] = next(_numbers)
    _loads[name] = (spec, at_load, number)
    _inplace[name] = _inplace.get(name, 0) + 1


def version(name: str, module: Any) -> tuple[Any, int]:
    """What tells one load of ``module`` (as ``name``) in the notebook from the next:
    its ``__spec__`` (``importlib.reload`` makes a new one) and how many times it
    was re-run in place since (:func:`reexecuted`). Compare with ``is`` and ``==``."""
    return getattr(module, "__spec__", None), _inplace.get(name, 0)


def next_number() -> int:
    """A load number later than every one given so far (for a reload with no record here)."""
    return next(_numbers)


def reloaded_since(number: int) -> list[str]:
    """The modules the notebook reloaded (``importlib.reload``, ``%autoreload``) after
    :func:`next_number` gave ``number``, in the order of their latest reload."""
    return sorted((name for name, n in _reloads.items() if n > number), key=_reloads.__getitem__)


def loaded(name: str, module: Any) -> tuple[tuple[int, int], int] | None:
    """``((mtime_ns, size), load number)`` of the file when the notebook loaded the
    ``module`` it has now as ``name``; None if not known (imported before mpmagic)."""
    record = _loads.get(name)
    if record is None or record[0] is not getattr(module, "__spec__", None):
        return None
    return record[1], record[2]


def reload_number(name: str) -> int | None:
    """The load number of the notebook's latest reload of ``name`` (``importlib.reload``,
    ``%autoreload``), None if it was never reloaded here. Later than the :func:`loaded`
    number of a module that does ``from name import ...``: that module holds what it
    took from the version before (``checkpoint_keys.held_from_reloaded``)."""
    return _reloads.get(name)
