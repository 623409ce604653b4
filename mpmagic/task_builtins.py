"""The names IPython adds to a notebook's builtins, for code running in a task.

A notebook function or a ``%%parallel`` cell may call ``display(...)`` without
importing it (IPython puts it in ``builtins``) or ``get_ipython()``. A worker
has no IPython shell and no notebook to draw in, so there:

* ``display(obj)`` prints the object's text form, as IPython's ``display``
  does in a terminal, and once per object type in each worker a line saying
  that its rich form (HTML, an image, a figure) shows only in the notebook:
  return the object and display it there;
* ``get_ipython()`` returns None, as ``IPython.get_ipython()`` does outside
  IPython, so ``if get_ipython() is not None`` guards work as in a script.

Installed by the local worker at start and by a Dask task before it runs,
only where the name is missing. Imports no IPython.
"""

from __future__ import annotations

import builtins
import io
import sys
from typing import Any

# What makes IPython show an object as more than text.
_RICH = ("_repr_html_", "_repr_markdown_", "_repr_svg_", "_repr_png_", "_repr_jpeg_", "_repr_latex_",
         "_repr_mimebundle_", "savefig")
_noted: set[type] = set()


def display(*objs: Any, **kwargs: Any) -> None:
    """The text form of each object, one per line (its ``repr``), as IPython's
    ``display`` prints outside a notebook; ``kwargs`` (``raw``, ``display_id``...)
    have nothing to act on here."""
    for obj in objs:
        print(repr(obj))
        kind = type(obj)
        if kind not in _noted and any(hasattr(obj, name) for name in _RICH):
            _noted.add(kind)
            sys.stderr.write(f"mpmagic: display() in a task prints the text form of a {kind.__name__}; its rich "
                             "form shows only in the notebook: return the object and display it there\n")


def get_ipython() -> None:
    """None: a task runs without IPython (as ``IPython.get_ipython()`` outside it)."""
    return None


class NoInput(io.TextIOBase):
    """A local worker's ``sys.stdin``: ``input()`` in a task fails at once with
    an EOFError that says why (a worker has no keyboard; the notebook's input
    box belongs to the kernel), where a bare ``EOF when reading a line`` said nothing."""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        raise EOFError("a task cannot read input (input(), sys.stdin): it runs in a worker process with no "
                       "keyboard; read the value in the notebook and pass it in as an argument")

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        return self.read()


def _no_input(*args: Any, **kwargs: Any) -> str:
    """``input`` and ``getpass.getpass`` in a local worker: the notebook's
    versions (ipykernel's, inherited by a fork) would wait for ever for an
    answer that can never come; this fails at once saying why."""
    return NoInput().read()


_breakpoint_said = False


def _no_breakpoint(*args: Any, **kwargs: Any) -> None:
    """``breakpoint()`` in a task: there is no console to debug in (spawn and
    forkserver opened pdb on a closed stdin and ended the cell with a hidden
    BdbQuit; fork skipped it silently). Skipped, said once per worker."""
    global _breakpoint_said
    if not _breakpoint_said:
        _breakpoint_said = True
        sys.stderr.write("mpmagic: breakpoint() in a task is skipped: a worker has no console to debug in. After a "
                         "failure, %pdebug replays the item in the notebook under the debugger\n")


def no_console() -> None:
    """A local worker's ``input()``, ``getpass.getpass()`` and ``sys.stdin`` fail
    at once with an EOFError that says why (see :class:`NoInput`), and
    ``breakpoint()`` is skipped with a line saying so."""
    sys.breakpointhook = _no_breakpoint
    sys.stdin = NoInput()
    builtins.input = _no_input
    getpass: Any = sys.modules.get("getpass")  # (patched by ipykernel, and inherited by a fork)
    if getpass is not None:
        getpass.getpass = _no_input


def install() -> None:
    """Add ``display`` and ``get_ipython`` to this process's builtins where missing."""
    for name, value in (("display", display), ("get_ipython", get_ipython)):
        if not hasattr(builtins, name):
            setattr(builtins, name, value)
