"""The matplotlib backend of tasks whose notebook draws inline.

In a Jupyter notebook ``plt.show()`` shows the figures in the cell (the
inline backend, which ipykernel names in ``MPLBACKEND``). A worker inherits
that variable, but the inline backend needs a kernel: in a task it printed
``Figure(640x480)`` and the figure was lost. Workers use this backend instead
(``task_builtins.matplotlib_backend``): it draws like Agg, and ``show()`` sends
each open figure to the notebook as a PNG (``task_builtins.display``), then
closes them, as the inline backend does. Imports no IPython.
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
