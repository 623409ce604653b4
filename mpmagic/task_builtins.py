"""What notebook code calls that a worker has no console or IPython for.

A notebook function or a ``%%parallel`` cell may call ``display(...)`` without
importing it (IPython puts it in ``builtins``), ``get_ipython()``, ``input()``,
``getpass.getpass()``, ``breakpoint()`` or ``plt.show()``. A worker has no
IPython shell, no keyboard and no notebook to draw in, so there:

* ``display(obj)`` sends the object's forms home (the mime bundle IPython
  would show: ``_repr_html_``, ``_repr_png_``... and a matplotlib figure as
  a PNG, with its text form), as one marked line of the task's stdout, in
  order with what it prints; the notebook shows it as rich output in the
  cell (``display_relay``), or its text form outside IPython;
* ``get_ipython()`` returns None, as ``IPython.get_ipython()`` does outside
  IPython, so ``if get_ipython() is not None`` guards work as in a script;
* ``input()``, ``getpass.getpass()`` and ``sys.stdin`` fail at once with an
  EOFError saying why, and ``breakpoint()`` is skipped with one line pointing
  to ``%pdebug`` (:func:`no_console`);
* the notebook's inline matplotlib backend becomes ``task_matplotlib``
  (:func:`matplotlib_backend`), whose ``show()`` sends the figures home.

Installed by the local worker at start (over a fork's copies of IPython's)
and by a Dask task before it runs (where missing). Imports no IPython.
"""

from __future__ import annotations

import base64
import builtins
import io
import json
import os
import sys
from typing import Any

#: A displayed object travels as one line of the task's stdout that starts
#: with this marker (ASCII "record separator", never in printed text), then JSON.
MARK = "\x1empmagic-display "

# The forms IPython looks for, by method, in its order of preference.
_METHODS = (("_repr_html_", "text/html"), ("_repr_markdown_", "text/markdown"), ("_repr_svg_", "image/svg+xml"),
            ("_repr_png_", "image/png"), ("_repr_jpeg_", "image/jpeg"), ("_repr_latex_", "text/latex"),
            ("_repr_json_", "application/json"))
_BINARY = ("image/png", "image/jpeg")


def bundle(obj: Any) -> dict[str, Any]:
    """The object's mime bundle as IPython's formatters would make it (without
    IPython): its ``_repr_mimebundle_`` and ``_repr_*_`` methods, a matplotlib
    figure as a PNG, always ``text/plain`` (its ``repr``). Binary forms are
    base64 text, as Jupyter carries them. A form that raises is left out."""
    data: dict[str, Any] = {}
    method = getattr(obj, "_repr_mimebundle_", None)
    if callable(method) and not isinstance(obj, type):
        try:
            got = method()
            got = got[0] if isinstance(got, tuple) else got
            if isinstance(got, dict):
                data.update(got)
        except Exception:
            pass
    for name, mime in _METHODS:
        method = getattr(obj, name, None)
        if mime in data or not callable(method) or isinstance(obj, type):
            continue
        try:
            value = method()
        except Exception:
            continue
        value = value[0] if isinstance(value, tuple) else value
        if value is not None:
            data[mime] = value
    if not any(m.startswith("image/") for m in data) and _is_figure(obj):
        buf = io.BytesIO()
        try:
            obj.savefig(buf, format="png", bbox_inches="tight")
            data["image/png"] = buf.getvalue()
        except Exception:
            pass
    for mime in _BINARY:
        if isinstance(data.get(mime), bytes):
            data[mime] = base64.b64encode(data[mime]).decode("ascii")
    data.setdefault("text/plain", repr(obj))
    return data


def _is_figure(obj: Any) -> bool:
    """A matplotlib Figure (looked up, never imported here)."""
    figure = getattr(sys.modules.get("matplotlib.figure"), "Figure", None)
    return figure is not None and isinstance(obj, figure)


def display(*objs: Any, **kwargs: Any) -> None:
    """Send each object's forms to the notebook, which shows them in the cell
    as IPython's ``display`` would (``kwargs``: ``raw``, ``display_id``...
    have nothing to act on here)."""
    for obj in objs:
        data = bundle(obj)
        try:
            line = json.dumps(data)
        except (TypeError, ValueError):  # a form that is not JSON: the text form alone
            line = json.dumps({"text/plain": data["text/plain"]})
        sys.stdout.write(f"{MARK}{line}\n")


def end_task() -> None:
    """At a task's end (a rank, a map chunk): under the task matplotlib backend,
    the figures still open go home and are closed (``task_matplotlib.flush_figures``).
    Nothing to do (no import) when the task drew nothing with it."""
    backend = sys.modules.get("mpmagic.task_matplotlib")
    if backend is None:
        return
    try:
        backend.flush_figures()
    except Exception as exc:  # (never the task's failure: its results stand)
        sys.stderr.write(f"mpmagic: could not send the figures the task left open: {type(exc).__name__}: {exc}\n")


_INLINE = ("module://matplotlib_inline.backend_inline", "inline", "module://ipykernel.pylab.backend_inline")
_TASK_BACKEND = "module://mpmagic.task_matplotlib"


def matplotlib_backend(value: str) -> str:
    """The ``MPLBACKEND`` a worker uses for the notebook's ``value``: the inline
    backend (which needs a kernel) becomes ours (``task_matplotlib``: ``plt.show()``
    sends the figures to the cell); any other stays."""
    return _TASK_BACKEND if value in _INLINE else value


def get_ipython() -> None:
    """None: a task runs without IPython (as ``IPython.get_ipython()`` outside it)."""
    return None


class NoInput(io.TextIOBase):
    """A worker's ``sys.stdin``: ``input()`` in a task fails at once with
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
    """``input`` and ``getpass.getpass`` in a worker: the notebook's
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


_console_gone = False


def no_console() -> None:
    """A worker's ``input()``, ``getpass.getpass()`` and ``sys.stdin`` fail at once
    with an EOFError that says why (see :class:`NoInput`), and ``breakpoint()``
    is skipped with a line saying so. Once per process (a local worker at its
    start; a Dask worker at its first task of ours)."""
    global _console_gone
    if _console_gone:
        return
    _console_gone = True
    import getpass  # (small; patched now, else its own fallback printed "Password input may be echoed")

    sys.breakpointhook = _no_breakpoint
    sys.stdin = NoInput()
    builtins.input = _no_input
    getpass.getpass = _no_input


def use_task_backend() -> None:
    """At a worker's start: the inline matplotlib backend it inherited becomes ours."""
    value = os.environ.get("MPLBACKEND")
    if value is not None:
        os.environ["MPLBACKEND"] = matplotlib_backend(value)


def install(force: bool = False) -> None:
    """Add ``display`` and ``get_ipython`` to this process's builtins where missing;
    ``force`` (a local worker): also over IPython's, which a forked worker
    copied from the notebook (its ``get_ipython()`` was the notebook's shell)."""
    for name, value in (("display", display), ("get_ipython", get_ipython)):
        if force or not hasattr(builtins, name):
            setattr(builtins, name, value)
