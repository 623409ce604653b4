"""The matplotlib backend of tasks whose notebook draws inline.

In a Jupyter notebook ``plt.show()`` shows the figures in the cell (the
inline backend, which ipykernel names in ``MPLBACKEND``). A worker inherits
that variable, but the inline backend needs a kernel: in a task it printed
``Figure(640x480)`` and the figure was lost. Workers use this backend instead
(``task_builtins.matplotlib_backend``): it draws like Agg, and ``show()`` sends
each open figure to the notebook as a PNG (``task_builtins.display``), then
closes them, as the inline backend does.

As the inline backend shows a cell's figures when the cell ends, without
``plt.show()``, and closes them (its ``flush_figures``), the end of a task (a
``%%parallel`` rank, a ``%pmap`` chunk: ``worker.execute_map``/``execute_cell``)
sends the figures still open and closes them (:func:`flush_figures`): each is
shown once, in the cell whose task drew it, and none stays open in the worker
to show again in a later task. Imports no IPython.
"""

from __future__ import annotations

from typing import Any

from matplotlib._pylab_helpers import Gcf
from matplotlib.backends.backend_agg import FigureCanvasAgg

from .task_builtins import display

FigureCanvas = FigureCanvasAgg


def show(*args: Any, **kwargs: Any) -> None:
    """Send every open figure to the notebook's cell, then close them."""
    try:
        for manager in Gcf.get_all_fig_managers():
            display(manager.canvas.figure)
    finally:
        if Gcf.get_all_fig_managers():
            import matplotlib.pyplot as plt  # (loaded already: show() is called through it)

            plt.close("all")


def flush_figures() -> None:
    """At a task's end: send the figures still open and close them, as the
    inline backend does at a cell's end, if pyplot still draws with this
    backend (a task that switched to another, e.g. Agg, does not show its
    figures, as a notebook that left the inline backend does not; they are
    closed all the same, by ``task_builtins.close_figures``)."""
    import matplotlib

    if Gcf.get_all_fig_managers() and matplotlib.get_backend() == f"module://{__name__}":
        show()
