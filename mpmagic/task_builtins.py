"""What notebook code calls that a worker has no console or IPython for.

A notebook function or a ``%%parallel`` cell may call ``display(...)`` without
importing it (IPython puts it in ``builtins``), ``get_ipython()``, ``input()``,
``getpass.getpass()``, ``breakpoint()`` or ``plt.show()``. A worker has no
IPython shell, no keyboard and no notebook to draw in, so there:

* ``display(obj)`` sends the object's forms home (the mime bundle IPython
  would show: ``_repr_html_``, ``_repr_png_``... and a matplotlib figure as
  a PNG, with its text form), as one marked line of the task's stdout, in
  order with what it prints; the notebook shows it as rich output in the
  cell (``display_relay``), or its text form outside IPython; with a
  ``display_id`` it returns a :class:`DisplayHandle` whose ``update`` (and
  ``update_display``) replaces what the cell shows under that id;
* ``get_ipython()`` returns None, as ``IPython.get_ipython()`` does outside
  IPython, so ``if get_ipython() is not None`` guards work as in a script;
  but ``get_ipython().<attribute>``, IPython's form of a magic line in a
  ``def`` (``r = %pmap f, xs``, ``!cmd``), gets ``task_shell``'s stand-in,
  which runs a ``%pmap`` line serially and refuses the rest in one line;
* ``input()``, ``getpass.getpass()`` and ``sys.stdin`` fail at once with an
  EOFError saying why, and ``breakpoint()`` and ``pdb.set_trace()`` are skipped
  with one line pointing to ``%pdebug`` (:func:`no_console`);
* the notebook's inline matplotlib backend becomes ``task_matplotlib``
  (:func:`matplotlib_backend`), whose ``show()`` sends the figures home.

Installed by the local worker at start (over a fork's copies of IPython's)
and by a Dask task before it runs (where missing; never in the notebook's own
process, whose threads a Dask worker may be). Imports no IPython.
"""

from __future__ import annotations

import base64
import builtins
import importlib.abc
import io
import json
import os
import sys
import types
from typing import Any

from . import task_shell

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


#: Keys of a sent bundle that are no mime type: the display id, and whether it updates
#: the output shown under that id (``display_relay.show`` takes them out).
DISPLAY_ID = "\x1edisplay_id"
UPDATE = "\x1eupdate"


class DisplayHandle:
    """What ``display(obj, display_id=...)`` returns in a task, as IPython's
    ``DisplayHandle``: ``update(obj)`` replaces what the cell shows under the
    id (an ``update_display_data`` message), ``display(obj)`` shows it again."""

    def __init__(self, display_id: str | None = None) -> None:
        self.display_id = display_id if display_id is not None else os.urandom(16).hex()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} display_id={self.display_id}>"

    def display(self, obj: Any, **kwargs: Any) -> None:
        display(obj, display_id=self.display_id, **kwargs)

    def update(self, obj: Any, **kwargs: Any) -> None:
        update_display(obj, display_id=self.display_id, **kwargs)


def display(*objs: Any, include: Any = None, exclude: Any = None, raw: bool = False,
            display_id: Any = None, update: bool = False, **kwargs: Any) -> DisplayHandle | None:
    """Send each object's forms to the notebook, which shows them in the cell
    as IPython's ``display`` would: ``raw`` (each object is a mime bundle
    already), ``include`` and ``exclude`` (mime types kept, left out) as there;
    ``display_id`` (True: a new one) shows them under that id and returns a
    :class:`DisplayHandle` whose ``update`` replaces them, ``update=True``
    replaces what shows under it; the other ``kwargs`` (``metadata``...) have
    nothing to act on here."""
    if display_id is True:
        display_id = DisplayHandle().display_id
    for obj in objs:
        if raw:
            data = dict(obj) if isinstance(obj, dict) else {"text/plain": repr(obj)}
        else:
            data = bundle(obj)
        if include is not None or exclude is not None:
            data = {m: v for m, v in data.items()
                    if (include is None or m in include) and (exclude is None or m not in exclude)}
            if not data:
                continue  # (IPython shows nothing either)
        _send(data, display_id, update)
    return DisplayHandle(str(display_id)) if display_id is not None else None


def update_display(obj: Any, *, display_id: Any, **kwargs: Any) -> None:
    """IPython's ``update_display`` in a worker: replace what shows under ``display_id``."""
    kwargs.pop("update", None)
    display(obj, display_id=display_id, update=True, **kwargs)


def _send(data: dict[str, Any], display_id: Any = None, update: bool = False) -> None:
    try:
        line = json.dumps(data)
    except (TypeError, ValueError):  # a form that is not JSON: the text form alone
        line = json.dumps({"text/plain": str(data.get("text/plain", ""))})
    if display_id is not None:  # (no mime type: the notebook's relay takes them out)
        line = line[:-1] + ("," if len(line) > 2 else "") + \
            json.dumps({DISPLAY_ID: str(display_id), UPDATE: bool(update)})[1:]
    sys.stdout.write(f"{MARK}{line}\n")


def publish_display_data(data: dict[str, Any], metadata: Any = None, source: Any = None, **kwargs: Any) -> None:
    """IPython's ``publish_display_data`` in a worker: the bundle goes home as
    :func:`display` sends one (IPython's would start a shell in the worker),
    with its ``transient`` display id and ``update`` flag."""
    transient = kwargs.get("transient") or {}
    _send(dict(data), transient.get("display_id"), bool(kwargs.get("update")))


def clear_output(wait: bool = False) -> None:
    """IPython's ``clear_output`` in a worker: nothing. Output from several tasks
    shares the notebook's cell, so one task clearing it would wipe the others'
    (IPython's, with no shell, printed terminal escape codes as text)."""


def open_figures() -> frozenset:
    """The numbers of the pyplot figures open now (at a task's start), for :func:`end_task`.

    Empty, with nothing imported, while no task in this process has imported pyplot.
    """
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return frozenset()
    try:
        return frozenset(pyplot.get_fignums())
    except Exception:  # (a broken matplotlib: the task itself will say so)
        return frozenset()


def end_task(before: frozenset = frozenset()) -> None:
    """At a task's end (a rank, a map chunk): under the task matplotlib backend,
    the figures still open go home and are closed (``task_matplotlib.flush_figures``);
    under any other backend the figures the task opened are closed
    (:func:`close_figures`; ``before``: those open at its start, from
    :func:`open_figures`). Nothing to do (no import) when no task drew with pyplot."""
    backend = sys.modules.get("mpmagic.task_matplotlib")
    if backend is not None:
        try:
            backend.flush_figures()
        except Exception as exc:  # (never the task's failure: its results stand)
            sys.stderr.write(f"mpmagic: could not send the figures the task left open: {type(exc).__name__}: {exc}\n")
    close_figures(before)


def close_figures(before: frozenset = frozenset()) -> None:
    """Close the pyplot figures a task opened and left open, whatever the backend.

    Under Agg (a script, terminal IPython, a savefig pipeline) nothing closed
    them: the next task or rank on this worker, of any function or cell, then
    drew on a leftover figure (``plt.plot`` on an earlier task's axes, saved
    with its lines), and they piled up. Serially they would be open in the
    notebook, where its own ``plt.close`` reaches them; a worker's cannot. A
    figure the task returns or keeps still works (``savefig``, drawing): it only
    leaves pyplot's list, as a closed figure does in the notebook. Figures open
    before the task (``before``: a worker's setup, or the notebook's own where
    Dask runs tasks in the notebook's process) stay. Nothing is imported: a
    worker whose tasks never imported pyplot does nothing.
    """
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    try:
        for number in pyplot.get_fignums():
            if number not in before:
                pyplot.close(number)
    except Exception as exc:  # (never the task's failure: its results stand)
        sys.stderr.write(f"mpmagic: could not close the figures the task left open: {type(exc).__name__}: {exc}\n")


# --------------------------------------------------------------------------
# IPython's own display functions, when a task imports them in a worker.

_IPYTHON_DISPLAY = "IPython.core.display_functions"
#: The names a worker replaces, and where IPython binds them at import.
_OURS = {"display": display, "clear_output": clear_output, "publish_display_data": publish_display_data,
         "update_display": update_display}
_BINDINGS = (_IPYTHON_DISPLAY, "IPython.display", "IPython.core.display", "IPython.core.interactiveshell")


def _patch_ipython_display() -> None:
    """Put our :data:`_OURS` in place of IPython's, in every loaded module of
    :data:`_BINDINGS` that holds IPython's own function under that name."""
    functions = sys.modules.get(_IPYTHON_DISPLAY)
    if functions is None:
        return
    originals = {name: getattr(functions, f"_mpmagic_{name}", getattr(functions, name, None)) for name in _OURS}
    for name, original in originals.items():
        if original is not None and original is not _OURS[name]:
            setattr(functions, f"_mpmagic_{name}", original)
    for module_name in _BINDINGS:
        module = sys.modules.get(module_name)
        for name, ours in _OURS.items():
            if module is not None and originals[name] is not None and getattr(module, name, None) is originals[name]:
                setattr(module, name, ours)


class _PatchingLoader(importlib.abc.Loader):
    """The loader of ``IPython.core.display_functions`` in a worker: runs it,
    then swaps its functions for ours before anything can import them."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        sys.modules.setdefault(module.__name__, module)
        _patch_ipython_display()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename...: the real loader's (tracebacks)
        return getattr(self.loader, name)


class IPythonDisplayHook(importlib.abc.MetaPathFinder):
    """Makes IPython's ``display`` a worker's (:func:`display`) whenever a task imports it.

    ``from IPython.display import display`` (or ``IPython.display.display``,
    ``IPython.core.display_functions.display``) in a worker got IPython's
    real function, which with no shell prints ``repr(obj)``: HTML, images and
    DataFrames came home as ``<... object>``. Patching at the task's start
    misses an import the task makes, and patching after it is too late for
    the name the task already bound. This finder, first on ``sys.meta_path``
    of a worker, finds ``IPython.core.display_functions`` with the other
    finders and wraps its loader: right after the module runs, its
    ``display``, ``clear_output`` and ``publish_display_data`` become ours, so
    every later ``from ... import display`` (``IPython.display`` itself
    re-exports them) binds ours. Modules loaded before (a fork copies the
    notebook's IPython) are patched when it is installed. It never imports
    IPython; it only looks at one module name.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _IPYTHON_DISPLAY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def _notebooks_own_process() -> bool:
    """Is this the notebook's (or a script's) own process, where a Dask worker may run
    tasks in threads (``Client(processes=False)``)? It is where an IPython shell runs or
    an mpmagic pool was made: a worker's set-up must leave that process's display,
    console and debugger as they are (a local worker, forked from it, says ``force``)."""
    shell = sys.modules.get("IPython.core.interactiveshell")
    pool = sys.modules.get("mpmagic.pool")
    return bool((shell is not None and shell.InteractiveShell.initialized())
                or (pool is not None and pool.current_pool() is not None))


def ipython_display(force: bool = False) -> None:
    """IPython's display functions in this process become ours, now and when
    imported later (:class:`IPythonDisplayHook`). Without ``force`` (a Dask
    worker, which may be a thread of the notebook itself) only where no
    IPython shell runs and no mpmagic pool was made in the process (never in
    the notebook's own process, nor a script's that runs Dask in threads)."""
    if not force and _notebooks_own_process():
        return
    if not any(isinstance(f, IPythonDisplayHook) for f in sys.meta_path):
        sys.meta_path.insert(0, IPythonDisplayHook())
    _patch_ipython_display()


_INLINE = ("module://matplotlib_inline.backend_inline", "inline", "module://ipykernel.pylab.backend_inline")
_TASK_BACKEND = "module://mpmagic.task_matplotlib"


def matplotlib_backend(value: str) -> str:
    """The ``MPLBACKEND`` a worker uses for the notebook's ``value``: the inline
    backend (which needs a kernel) becomes ours (``task_matplotlib``: ``plt.show()``
    sends the figures to the cell); any other stays."""
    return _TASK_BACKEND if value in _INLINE else value


def get_ipython() -> task_shell.TaskShell | None:
    """None: a task runs without IPython (as ``IPython.get_ipython()`` outside it);
    but for ``get_ipython().<attribute>`` (a magic line or ``!cmd`` in a notebook
    function, as IPython writes it) the stand-in shell of :mod:`mpmagic.task_shell`,
    whose ``%pmap`` runs serially in the task and whose other magics say what to
    write instead, where ``None.run_line_magic`` said nothing of use."""
    return task_shell.shell_for_caller(sys._getframe(1))


class NoInput(io.TextIOBase):
    """A worker's ``sys.stdin``: ``input()`` in a task fails at once with
    an EOFError that says why (a worker has no keyboard; the notebook's input
    box belongs to the kernel), where a bare ``EOF when reading a line`` said nothing."""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        __tracebackhide__ = True  # noqa: F841 (the task's traceback ends at its input() line: errors.extract_frames)
        raise EOFError("a task cannot read input (input(), sys.stdin): it runs in a worker process with no "
                       "keyboard; read the value in the notebook and pass it in as an argument")

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        __tracebackhide__ = True  # noqa: F841
        return self.read()


def _no_input(*args: Any, **kwargs: Any) -> str:
    """``input`` and ``getpass.getpass`` in a worker: the notebook's
    versions (ipykernel's, inherited by a fork) would wait for ever for an
    answer that can never come; this fails at once saying why."""
    __tracebackhide__ = True  # noqa: F841
    return NoInput().read()


_skipped_said: set[str] = set()  # what this worker said it skips (each once)


def _skipped(what: str) -> None:
    """Say once per worker that ``what`` (a way into the debugger) is skipped in a task."""
    if what not in _skipped_said:
        _skipped_said.add(what)
        sys.stderr.write(f"mpmagic: {what} in a task is skipped: a worker has no console to debug in. After a "
                         "failure, %pdebug replays the item in the notebook under the debugger\n")


def _no_breakpoint(*args: Any, **kwargs: Any) -> None:
    """``breakpoint()`` in a task: there is no console to debug in (spawn and
    forkserver opened pdb on a closed stdin and ended the cell with a hidden
    BdbQuit; fork skipped it silently). Skipped, said once per worker."""
    _skipped("breakpoint()")


def _skip_console_debuggers() -> None:
    """``pdb.set_trace()`` (and IPython's or ipdb's ``set_trace()``, all ``bdb.Bdb``'s)
    in a task is skipped as ``breakpoint()`` is, when the debugger would read its
    commands from the worker's stdin (:class:`NoInput`): pdb read EOF there and quit
    with a BdbQuit, which IPython hides, so the cell ended with no result and no
    error. A debugger given a stdin of its own (``pdb.Pdb(stdin=...)``) and a
    tracer with none (a ``bdb.Bdb`` subclass that only logs) run as they are."""
    import bdb

    real = bdb.Bdb.set_trace
    if getattr(real, "_mpmagic_skips", False):
        return

    def set_trace(self: bdb.Bdb, frame: types.FrameType | None = None, *args: Any, **kwargs: Any) -> None:
        if not isinstance(getattr(self, "stdin", None), NoInput):
            # (its caller's frame, as Bdb's own takes when given none: not this one)
            return real(self, sys._getframe(1) if frame is None else frame, *args, **kwargs)
        _skipped("set_trace()")  # (pdb's, IPython's, ipdb's: a kernel's fork may have any of them as pdb.Pdb)
        return None

    set_trace._mpmagic_skips = True  # type: ignore[attr-defined]
    bdb.Bdb.set_trace = set_trace  # type: ignore[method-assign]


_console_gone = False


def no_console(force: bool = False) -> None:
    """A worker's ``input()``, ``getpass.getpass()`` and ``sys.stdin`` fail at once
    with an EOFError that says why (see :class:`NoInput`), and ``breakpoint()`` and
    ``pdb.set_trace()`` are skipped with a line saying so. Once per process (a local
    worker at its start, with ``force``: a fork copied the notebook's shell and pool; a Dask
    worker at its first task of ours). Without ``force``, never in the notebook's
    own process (a Dask worker in its threads): its ``input()``, ``sys.stdin`` and
    debugger (pdb reads its commands through ``input()``) stay the notebook's."""
    global _console_gone
    if _console_gone or (not force and _notebooks_own_process()):
        return
    _console_gone = True
    import getpass  # (small; patched now, else its own fallback printed "Password input may be echoed")

    sys.breakpointhook = _no_breakpoint
    _skip_console_debuggers()
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
    copied from the notebook (its ``get_ipython()`` was the notebook's shell).
    IPython's own display functions become ours too (:func:`ipython_display`)."""
    for name, value in (("display", display), ("get_ipython", get_ipython)):
        if force or not hasattr(builtins, name):
            setattr(builtins, name, value)
    ipython_display(force)
