"""The timing report of one run: one honest line, or a small HTML table.

The serial time is *measured* only when the work really ran serially in the
notebook (``compare=True``); otherwise it is *estimated* as the sum of the
compute times the workers measured around each task, and the line says so.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


@dataclass
class Report:
    """What a ``pmap`` or ``parallel`` run did and how long it took."""

    kind: str  # "pmap" or "parallel"
    items: int
    workers: int
    backend: str
    start_method: str | None
    wall: float
    task_seconds: float
    chunks: int = 0
    chunksize: str = "-"
    serial: float | None = None  # measured serial time, with compare
    equal: bool | None = None  # serial and parallel results equal, with compare
    failed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def serial_measured(self) -> bool:
        return self.serial is not None

    @property
    def serial_time(self) -> float:
        """The measured serial time, or the estimate from task times."""
        return self.serial if self.serial is not None else self.task_seconds

    @property
    def speedup(self) -> float | None:
        if self.wall <= 0 or self.serial_time <= 0:
            return None
        return self.serial_time / self.wall

    @property
    def efficiency(self) -> float | None:
        sp = self.speedup
        return None if sp is None else sp / max(1, self.workers)

    def _where(self) -> str:
        how = self.backend if not self.start_method else self.start_method
        return f"{self.workers} worker{'s' if self.workers != 1 else ''} ({how})"

    def _what(self) -> str:
        if self.kind == "parallel":
            return f"{self.items} rank{'s' if self.items != 1 else ''}"
        return f"{self.items} item{'s' if self.items != 1 else ''}"

    def _serial_text(self) -> str:
        if self.serial is not None:
            eq = ""
            if self.equal is True:
                eq = ", results equal"
            elif self.equal is False:
                eq = ", RESULTS DIFFER"
            return f"serial {fmt_seconds(self.serial)} (measured{eq})"
        return f"serial ~{fmt_seconds(self.task_seconds)} (estimated from task times)"

    def _speedup_text(self) -> str:
        sp = self.speedup
        if sp is None:
            return "speedup n/a"
        return f"speedup {sp:.2f}x" if self.serial is not None else f"speedup ~{sp:.1f}x"

    def line(self) -> str:
        """The one-line summary printed after a run."""
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (
            f"{self.kind}: {self._what()}{failed} on {self._where()} in {fmt_seconds(self.wall)}"
            f" | {self._serial_text()} | {self._speedup_text()}"
        )

    def __str__(self) -> str:
        return self.line()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.line())

    def rows(self) -> list[tuple[str, str]]:
        eff = self.efficiency
        rows = [
            ("items" if self.kind == "pmap" else "ranks", str(self.items)),
            ("workers", self._where()),
        ]
        if self.kind == "pmap":
            rows.append(("chunks", f"{self.chunks} (size {self.chunksize})"))
        rows += [
            ("wall", fmt_seconds(self.wall)),
            ("serial", self._serial_text().removeprefix("serial ")),
            ("speedup", self._speedup_text().removeprefix("speedup ")),
            ("efficiency", "-" if eff is None else f"{eff:.0%}"),
        ]
        if self.failed:
            rows.append(("failed", str(self.failed)))
        return rows

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self.rows()
        )
        return (
            f"<table class='mpmagic-report' title='{html.escape(self.line(), quote=True)}'>"
            f"<caption style='text-align:left'><b>{html.escape(self.kind)}</b></caption>"
            f"{cells}</table>"
        )
