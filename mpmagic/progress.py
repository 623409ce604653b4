"""A progress bar for long runs that counts items, and stays away for short ones.

The job reports finished items (a map's chunk sizes, a cell's ranks) through
:meth:`Progress.update`. The tqdm bar is only made on the first update after
``delay`` seconds of work, so a quick run prints nothing at all; when it is
made, its clock is set back to the start of the run so that the rate and the
time left are right from the first frame. ``tqdm.auto`` gives the notebook
widget in Jupyter (when ipywidgets is installed) and a text bar elsewhere.
:meth:`Progress.close` must run on every way out (success, error, interrupt):
the API calls it in a ``finally``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

# The most recent Progress (also when closed), so a notebook or a test can
# look at what the last run showed: ``mpmagic.progress.last``.
last: Progress | None = None


def _tqdm_class() -> Any:
    """tqdm's notebook widget in Jupyter with ipywidgets, its text bar elsewhere."""
    from tqdm.auto import tqdm

    return tqdm


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
        last = self

    def update(self, n: int = 1) -> None:
        """``n`` more items finished (called by the job, possibly from a backend thread)."""
        with self._lock:
            self.n += n
            if self.closed or not self.enabled:
                return
            if self.bar is None:
                if time.perf_counter() - self.t0 < self.delay:
                    return
                self.bar = self._make_bar()
                self.shown = self.bar is not None
                if self.bar is None:
                    return
                self.bar.update(self.n)
            else:
                self.bar.update(n)

    def _make_bar(self) -> Any:
        try:
            bar = _tqdm_class()(
                total=self.total,
                desc=self.desc,
                unit=self.unit,
                dynamic_ncols=True,
                mininterval=0.2,
                leave=True,
            )
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
        try:
            if outcome != "done":
                bar.set_postfix_str(outcome, refresh=False)
            bar.close()
        except Exception:  # a display that went away: the run's result matters, not its bar
            logging.getLogger("mpmagic").debug("mpmagic: closing the progress bar failed", exc_info=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close("done")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close("error")
