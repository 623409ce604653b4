"""A backend's own lines for the notebook that come while no run is in flight.

Both backends have things to say from threads that are not the notebook's: the
local pool's manager (a replacement worker's setup failed again, a fork hazard
found before forking one), the Dask backend's helper threads (a worker it gave
up on could not be restarted, a cancel on the scheduler failed). Written from
such a thread, a line lands in whichever cell runs then (in Jupyter maybe one
that has nothing to do with the pool), or in none. So it is held here, and the
next run writes it first, in its own thread: its cell (:meth:`HeldLines.say`).
"""

from __future__ import annotations

import sys
import threading

#: A replacement failing its setup again and again is not kept for ever: past these
#: lines, the next run says how many more there were.
HELD_MAX = 200


class HeldLines:
    """Lines kept for the next run's cell; any thread may hold, the run's says them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # (a Dask helper thread holds while a run's thread says)
        self._lines: list[tuple[str, str]] = []  # (stream, line)
        self._more = 0  # lines past HELD_MAX, counted only

    def hold(self, text: str, stream: str = "stderr") -> None:
        """Keep ``text`` (whole lines) for the next run's cell, on ``stream`` ("stderr": the
        backend's own lines; "stdout": what a later worker's setup printed, where ``%%pool
        setup`` shows the first ones'); past :data:`HELD_MAX` lines, only counted."""
        with self._lock:
            for line in text.splitlines(keepends=True):
                if len(self._lines) < HELD_MAX:
                    self._lines.append((stream, line if line.endswith("\n") else line + "\n"))
                else:
                    self._more += 1

    def say(self) -> None:
        """Write the lines held so far on their streams, in order, in the calling thread
        (a run's, before its own output: its cell), and forget them."""
        with self._lock:
            if not self._lines:
                return
            held, more, self._lines, self._more = self._lines, self._more, [], 0
        if more:
            held.append(("stderr", f"mpmagic: ... and {more:,} more line{'s' * (more != 1)} held while no run "
                                   "was in flight\n"))
        start = 0
        for i in range(1, len(held) + 1):  # (each stream's consecutive lines in one write)
            if i == len(held) or held[i][0] != held[start][0]:
                stream = sys.stdout if held[start][0] == "stdout" else sys.stderr
                stream.write("".join(line for _, line in held[start:i]))
                if i < len(held):
                    stream.flush()  # (in order with the other stream's next lines)
                start = i


__all__ = ["HELD_MAX", "HeldLines"]
