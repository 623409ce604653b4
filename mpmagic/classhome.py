"""Results that are instances of this process's own classes: the classes stay as they are.

cloudpickle sends a class of the notebook (or of a module sent by value) by
value, with a tracker id. Loading a worker's result in the notebook finds the
notebook's class by that id, so ``isinstance`` holds, and then sets the
worker's copy of the class's state on it: the notebook's class got the
worker's copies of its methods, whose globals are only the names sent with
them. A function defined in a later cell was then missing (``NameError: name
'helper' is not defined`` in ``C().show()``), and a global rebound later was
not seen. :func:`loads` leaves this process's own classes as they are (their
code is the one the worker had: it came from here). A copy built here from
another process's pickle is still updated, as cloudpickle does: a worker's
copy follows a method the notebook changed.

This module imports no IPython: workers import it.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import weakref
from typing import Any

from . import compat

_setstate = compat.cloudpickle_class_setstate()
# Classes defined in this process that went by value from it: found, when first
# sent, under their name in their module (a copy built by cloudpickle is in no module).
_own: weakref.WeakSet = weakref.WeakSet()
if hasattr(os, "register_at_fork"):  # a forked worker's classes are copies to update, as a spawned one's
    os.register_at_fork(after_in_child=_own.clear)


def sent(cls: type) -> None:
    """``cls`` is being pickled by value here: note it if it is this process's own class."""
    try:
        if cls not in _own and getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is cls:
            _own.add(cls)
    except TypeError:  # (not hashable or not weakly referenceable: cloudpickle's behaviour)
        pass


def own(cls: type) -> None:
    """``cls`` is this process's own, though in no module: a class a worker's ``%%pool setup``
    defined (its module, ``__main__`` while the setup ran, is not the worker's ``__main__``).
    Its instances coming back from the notebook, which sends its copy with the class's tracker
    id, leave its methods as they are (their globals are the setup's live names)."""
    try:
        _own.add(cls)
    except TypeError:  # (not weakly referenceable)
        pass


def _class_setstate(cls: type, state: Any) -> type:
    if cls in _own:
        return cls  # ours, found by its tracker id: its own methods (their globals are the live module's) stay
    return _setstate(cls, state)  # type: ignore[misc]


def enum_setstate(cls: type, state: tuple[Any, dict[str, dict[str, Any]]]) -> type:
    """The state of a notebook Enum class sent by value (``payload.enum_reduce``): the
    class's own (as cloudpickle sets it), then each member's attributes.

    cloudpickle rebuilds an Enum from ``{name: value}`` before the class has its
    methods, so the members' ``__init__``/``__new__`` never run there: the
    attributes they set (the Python docs' ``Planet.mass``, a ``.label``), and any
    set on a member later, were missing in the worker. A class of this process's
    own (a worker's result coming home) is left as it is, members included."""
    class_state, members = state
    if cls in _own:
        return cls
    cls = _setstate(cls, class_state) if _setstate is not None else cls
    member_map = getattr(cls, "_member_map_", {})
    for name, attrs in members.items():
        member = member_map.get(name)
        if member is not None:
            vars(member).update(attrs)
    return cls


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "cloudpickle.cloudpickle" and name == "_class_setstate":
            return _class_setstate
        return super().find_class(module, name)


#: In a pickle that sets a by-value class's state (cloudpickle names this function in it).
_SETS_CLASS_STATE = b"_class_setstate"
#: A pickle this long or longer is not scanned for it: ``_Unpickler`` costs a microsecond or two
#: more than ``pickle.loads`` whatever the size, a scan of 1 MB about a millisecond.
_SCAN_BELOW = 4096


def loads_item(data: bytes) -> Any:
    """A shared helper's item (an ``mpmagic.Queue``'s) as :func:`loads` loads a result:
    a class of this process that a task's pickle carries keeps its own methods.

    Only where it can matter: in a process that sent classes of its own by value
    (the notebook), and for a short pickle only if it sets a by-value class's
    state (an instance of a notebook class); any other item is a plain
    ``pickle.loads`` (a queue of numbers in a worker pays one look at ``_own``).
    A long one goes through ``_Unpickler``, which changes nothing where no such
    class is in it, at a cost that does not grow with its size (a scan's would)."""
    if not _own or _setstate is None:
        return pickle.loads(data)
    if len(data) < _SCAN_BELOW and _SETS_CLASS_STATE not in data:
        return pickle.loads(data)
    return _Unpickler(io.BytesIO(data)).load()


def loads(data: Any, buffers: Any = None) -> Any:
    """``pickle.loads``, leaving this process's own classes untouched (see the module's doc).
    The plain ``pickle.loads`` while no class of ours has been sent (~2 us less a load)."""
    if not _own or _setstate is None:
        return pickle.loads(data, buffers=buffers)
    return _Unpickler(io.BytesIO(data), buffers=buffers).load()
