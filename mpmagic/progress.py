"""A progress bar for long runs that counts items, and stays away for short ones.

The job reports finished items (a map's chunk sizes, a cell's ranks) through
:meth:`Progress.update`. The bar is made once the run has lasted ``delay``
seconds: the thread waiting on the run wakes then and calls :meth:`Progress.show`
(a Dask run, driven by that thread, makes it on the first update after the
delay). A quick run prints nothing at all, and neither does a run that is over
by then: a bar born at 100% told nothing (two ranks that end together after
1.5 s showed a full bar once the cell was done, and nothing during it). Its
clock is set back to the start of the run, so the rate and the time left are
right from the first frame. ``tqdm.auto`` gives the notebook widget in Jupyter
(when ipywidgets is installed) and a text bar elsewhere; in Jupyter without
ipywidgets, a text bar and one line of mpmagic's saying what to install
(:func:`_tqdm_class`). :meth:`Progress.close` must run on every way out
(success, error, interrupt): the API calls it in a ``finally``.

A notebook bar is made of ipywidgets, which stay registered in the kernel
(ipywidgets' own registry, and the kernel's comms) until closed: 11 per bar,
for good, one bar per run that lasted ``delay``. Closing a widget removes it
from the page, so the last :data:`KEEP_WIDGET_BARS` finished bars stay live
widgets, and an older one's output is replaced by a still copy of its final
state (the same text and bar, as HTML) before its widgets are closed
(:func:`_keep_widget_bar`): what the kernel holds stays bounded, what the
page shows stays the same.
"""

from __future__ import annotations

import html
import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Any

# The most recent Progress (also when closed), so a notebook or a test can
# look at what the last run showed: ``mpmagic.progress.last``.
last: Progress | None = None

#: What a Jupyter kernel without ipywidgets shows once, with the first bar.
NO_WIDGETS_LINE = ("mpmagic: the progress bar is text here: the notebook's bar needs ipywidgets "
                   "(pip install ipywidgets, then restart the kernel)\n")
_said_no_widgets = False

#: Finished notebook bars kept as live widgets (the most recent ones); an older one
#: is shown as a still copy and its widgets closed (released by the kernel).
KEEP_WIDGET_BARS = 10

# The text bars on screen now (made, not closed): see clear_for_output.
_text_bars: list[Progress] = []


def clear_for_output() -> None:
    """A task's output is about to be printed here: take the text bars off their line.

    A text bar (a terminal; Jupyter without ipywidgets) ends its line without a
    newline and redraws it with ``\\r``: a task's line printed meanwhile was glued
    to it (``pmap:  17%|█▋      | 1/6 [00:01<00:05,  1.00s/item]item 2``). The
    bar comes back once the output has been printed (:func:`redraw_after_output`)
    or on its next update, whichever is first: once per burst of output, not per line."""
    if _text_bars:
        for bar in tuple(_text_bars):
            bar._clear()


def redraw_after_output() -> None:
    """The output came so far is printed: draw the text bars it took off their line again."""
    if _text_bars:
        for bar in tuple(_text_bars):
            bar._redraw()


# The finished notebook bars still live: (their display, their widgets, the still copy), oldest first.
_widget_bars: deque[tuple[Any, list[Any], dict[str, str]]] = deque()
_widget_bars_lock = threading.Lock()


def _tqdm_class() -> Any:
    """tqdm's notebook widget in Jupyter with ipywidgets, its text bar elsewhere.

    In Jupyter without ipywidgets, ``tqdm.auto`` warned in its own words on the
    first bar (``TqdmWarning: IProgress not found. Please update jupyter and
    ipywidgets``, under a site-packages path): here the text bar is picked
    directly, and mpmagic says once what to install (:data:`NO_WIDGETS_LINE`).
    """
    global _said_no_widgets
    if _notebook_without_widgets():
        if not _said_no_widgets:
            _said_no_widgets = True
            sys.stderr.write(NO_WIDGETS_LINE)
        from tqdm.std import tqdm as text_bar

        return text_bar
    from tqdm.auto import tqdm

    return tqdm


def _notebook_without_widgets() -> bool:
    """Would ``tqdm.auto`` want the notebook widget (as ``tqdm.autonotebook``
    decides: a Jupyter kernel, not a Qt console or Spyder) and lack ipywidgets?"""
    if "ipykernel.zmqshell" not in sys.modules:
        return False
    if any(name == "QT_API" or name.startswith("SPYDER") for name in os.environ):
        return False
    try:
        from ipywidgets import FloatProgress  # noqa: F401  (what tqdm.notebook's bar is made of)
    except Exception:  # (not installed, or broken: tqdm.auto falls back to its text bar then too)
        return True
    return False


class Progress:
    """Counts finished items and shows a tqdm bar once the run has lasted ``delay`` s."""

    def __init__(
        self,
        total: int | None,
        desc: str = "pmap",
        unit: str = "item",
        delay: float = 1.0,
        enabled: bool = True,
    ) -> None:
        global last
        self.total = total
        self.desc = desc
        self.unit = unit
        self.delay = max(0.0, delay)
        self.enabled = enabled
        self.n = 0
        self.t0 = time.perf_counter()
        self.bar: Any = None
        self.shown = False  # a bar was made
        self.closed = False
        self.outcome: str | None = None  # "done", "error" or "interrupted" after close
        self._lock = threading.Lock()
        self._display: Any = None  # a notebook bar's display (by id), shown by us: see _keep_widget_bar
        self._cleared = False  # a text bar taken off its line for a task's output: see clear_for_output
        last = self

    def update(self, n: int = 1) -> None:
        """``n`` more items finished (called by the job, possibly from a backend thread)."""
        with self._lock:
            self.n += n
            if self.closed or not self.enabled:
                return
            if self.bar is None:
                if time.perf_counter() - self.t0 >= self.delay:
                    self._show()
            else:
                drawn = self.bar.update(n)
                if self._cleared:
                    self._cleared = False
                    if not drawn:
                        self.bar.refresh()

    def due_in(self) -> float | None:
        """Seconds until the bar is due (0: now), or None when no bar is to be made."""
        with self._lock:
            if self.closed or not self.enabled or self.bar is not None:
                return None
            return max(0.0, self.delay - (time.perf_counter() - self.t0))

    def show(self, ended: bool = False) -> None:
        """The delay is over: make the bar now, at the count so far, unless the run
        ``ended`` or all its items finished (a bar born full says nothing)."""
        with self._lock:
            if not ended and not self.closed and self.enabled and self.bar is None:
                self._show()

    def _show(self) -> None:  # (holding the lock)
        if self.total is not None and self.n >= self.total:
            return  # (the run is over, or about to be: no bar whose only frame is "done")
        self.bar = self._make_bar()
        self.shown = self.bar is not None
        if self.bar is not None and self.n:
            self.bar.update(self.n)
        if self.bar is not None and self._display is None and not _is_widget_bar(type(self.bar)):
            _text_bars.append(self)

    def _clear(self) -> None:
        with self._lock:
            if self.bar is not None and not self.closed and not self._cleared:
                self._cleared = True
                self.bar.clear()

    def _redraw(self) -> None:
        with self._lock:
            if self._cleared and not self.closed:
                self._cleared = False
                self.bar.refresh()

    def _make_bar(self) -> Any:
        try:
            cls = _tqdm_class()
            widget = _is_widget_bar(cls)
            # A notebook bar is displayed here, by id, so that it can be replaced by its
            # still copy once its widgets are closed (tqdm's own display has no id).
            extra: dict[str, Any] = {"display": False} if widget else {}
            bar = cls(
                total=self.total,
                desc=self.desc,
                unit=self.unit,
                dynamic_ncols=True,
                mininterval=0.2,
                leave=True,
                **extra,
            )
            if widget:
                from IPython.display import display

                try:
                    self._display = display(bar.container, display_id=True)
                except Exception:
                    bar.close()  # (out of tqdm's record of open bars, as a bar never shown)
                    raise
        except Exception:  # a broken display must never break the run
            self.enabled = False
            return None
        # The run started before the bar: count its rate and ETA from the start.
        # tqdm uses its own time source (time.time), so shift by the elapsed time.
        now = getattr(bar, "_time", time.time)()
        start = now - (time.perf_counter() - self.t0)
        bar.start_t = start
        bar.last_print_t = start
        return bar

    def close(self, outcome: str = "done") -> None:
        """Close the bar for good; ``outcome`` is "done", "error" or "interrupted"."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.outcome = outcome
            bar = self.bar  # kept, closed, so its final count can be read
        if bar is None:
            return
        if self in _text_bars:
            _text_bars.remove(self)
        try:
            if outcome != "done":
                bar.set_postfix_str(outcome, refresh=False)
            bar.close()
            if self._display is not None:
                _keep_widget_bar(self._display, bar.container)
        except Exception:  # a display that went away: the run's result matters, not its bar
            logging.getLogger("mpmagic").debug("mpmagic: closing the progress bar failed", exc_info=True)
        self._display = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close("done")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close("error")


def _is_widget_bar(cls: Any) -> bool:
    """Is ``cls`` tqdm's notebook bar (ipywidgets), as ``tqdm.auto`` gives it in Jupyter?"""
    notebook = sys.modules.get("tqdm.notebook")  # (imported by tqdm.auto for a notebook bar: never here)
    base = getattr(notebook, "tqdm_notebook", None)
    return isinstance(cls, type) and base is not None and issubclass(cls, base)


def _keep_widget_bar(shown: Any, container: Any) -> None:
    """A notebook bar finished: keep it live among the last :data:`KEEP_WIDGET_BARS`; the
    oldest beyond them is replaced on the page by its still copy and its widgets closed."""
    entry = (shown, _widgets_of(container), _still_copy(container))
    with _widget_bars_lock:
        _widget_bars.append(entry)
        retired = [_widget_bars.popleft() for _ in range(len(_widget_bars) - KEEP_WIDGET_BARS)]
    for old in retired:
        _retire(*old)


def _retire(shown: Any, widgets: list[Any], still: dict[str, str]) -> None:
    """The bar's output becomes its still copy (first: a closed widget's view goes from the
    page), then its widgets are closed: ipywidgets and the kernel's comms let them go."""
    try:
        shown.update(still, raw=True)
    except Exception:
        logging.getLogger("mpmagic").debug("mpmagic: replacing a finished progress bar failed", exc_info=True)
    for widget in widgets:
        try:
            widget.close()
        except Exception:
            logging.getLogger("mpmagic").debug("mpmagic: closing a progress bar's widget failed", exc_info=True)


def _widgets_of(root: Any) -> list[Any]:
    """``root`` and every widget it holds (its children, their layouts and styles): tqdm's
    bar is an HBox of two HTML and a progress widget, 11 widgets in all, each registered."""
    try:
        from ipywidgets import Widget
    except Exception:
        return [root]
    found: list[Any] = []
    seen: set[int] = set()
    todo = [root]
    while todo:
        widget = todo.pop()
        if id(widget) in seen:
            continue
        seen.add(id(widget))
        found.append(widget)
        for name in getattr(widget, "keys", ()):
            value = getattr(widget, name, None)
            values = value if isinstance(value, (tuple, list)) else (value,)
            todo.extend(v for v in values if isinstance(v, Widget))
    return found


#: The bar's colour in its still copy, by tqdm's bar style (ipywidgets' colours).
_BAR_COLOURS = {"success": "#4caf50", "danger": "#f44336", "info": "#00bcd4"}


def _still_copy(container: Any) -> dict[str, str]:
    """The finished bar as it looks, without widgets: its left text, its bar, its right
    text (tqdm wrote them into the widgets as escaped HTML, figure spaces for spaces)."""
    left, bar, right = container.children
    colour = _BAR_COLOURS.get(getattr(bar, "bar_style", ""), "")
    accent = f"accent-color:{colour};" if colour else ""
    meter = (f"<progress value='{float(bar.value):g}' max='{float(bar.max):g}' "
             f"style='flex:2;min-width:10em;{accent}'></progress>")
    page = (f"<div class='mpmagic-progress' style='display:flex;align-items:center;gap:4px'>"
            f"<span>{left.value}</span>{meter}<span>{right.value}</span></div>")
    # (tqdm's split of "pmap: 100%|<bar>| 2/2 [...]" leaves the space before "2/2" to the right text)
    plain = html.unescape(left.value + right.value).replace("\u2007", " ").strip()
    return {"text/plain": plain, "text/html": page}
