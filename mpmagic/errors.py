"""Exceptions mpmagic raises, and how a worker's traceback is carried home.

A task's exception is re-raised in the notebook as the *same* exception type
(when it can be unpickled there), chained from a :class:`RemoteTraceback` whose
text is the worker-side traceback rendered with the notebook's own cell
sources, and carrying a note that says which item or rank raised it.
"""

from __future__ import annotations

import linecache
import signal
import traceback
from dataclasses import dataclass


class MPMagicError(Exception):
    """Base class of the errors mpmagic raises itself.

    In IPython they show as one clear message, without our internal frames.
    """

    def _render_traceback_(self) -> list[str]:
        lines = [f"{type(self).__name__}: {self}"]
        lines += list(getattr(self, "__notes__", ()))
        return lines


class UsageError(MPMagicError, ValueError):
    """Bad arguments to an API function or a magic (one line, says the fix)."""


class WorkerLostError(MPMagicError):
    """A worker process died (crash, kill, out of memory) while running work."""


class TaskTimeoutError(MPMagicError, TimeoutError):
    """A task (``pmap`` item or ``parallel`` rank) ran past its ``timeout``."""


class SerializationError(MPMagicError):
    """Something could not be pickled to go to a worker, or to come back."""


class RemoteError(MPMagicError):
    """A task raised an exception that could not be re-created in the notebook."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


class ParallelError(MPMagicError):
    """One or more ranks of a ``parallel`` cell failed.

    ``failures`` maps each failed rank to its exception; ``values`` maps each
    rank that finished to its last value, so nothing computed is lost.
    """

    def __init__(
        self,
        message: str,
        failures: dict[int, BaseException],
        values: dict[int, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.failures = failures
        self.values = dict(values or {})


class RemoteTraceback(Exception):
    """Carries the text of a worker-side traceback; shown as the cause."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


class RenderRemote:
    """IPython's ``_render_traceback_`` hook for a re-raised worker exception.

    Set on the exception instance, so the notebook shows the worker-side
    traceback (with the cell's lines) instead of mpmagic's own frames.
    """

    def __init__(self, text: str, note: str) -> None:
        self.text = text
        self.note = note

    def __call__(self) -> list[str]:
        lines = self.text.splitlines()
        if lines and lines[0].startswith("Traceback"):
            lines[0] = "Traceback in the worker (most recent call last):"
        return lines + [self.note]


# Frames from these files are our machinery, not the user's code.
_INTERNAL_MARKERS = ("/mpmagic/worker.py", "/mpmagic/payload.py", "/cloudpickle/")


@dataclass
class FrameInfo:
    """A picklable traceback frame: enough to render it where the source is."""

    filename: str
    lineno: int
    name: str
    line: str | None


def extract_frames(tb) -> list[FrameInfo]:
    """Frames of a worker-side traceback, our own machinery left out."""
    frames = []
    for fs in traceback.extract_tb(tb):
        if any(m in fs.filename.replace("\\", "/") for m in _INTERNAL_MARKERS):
            continue
        frames.append(FrameInfo(fs.filename, fs.lineno or 0, fs.name, fs.line or None))
    return frames


def render_traceback(frames: list[FrameInfo], exc_text: str) -> str:
    """Render frames like Python does, filling in notebook cell lines locally.

    The worker cannot see the notebook's cell sources (IPython keeps them in the
    kernel's ``linecache``), so lines it could not find are looked up here.
    """
    out = ["Traceback (most recent call last):"]
    for fr in frames:
        out.append(f'  File "{fr.filename}", line {fr.lineno}, in {fr.name}')
        line = fr.line or linecache.getline(fr.filename, fr.lineno).strip()
        if line:
            out.append(f"    {line}")
    out.append(exc_text.rstrip("\n"))
    return "\n".join(out)


def describe_exitcode(exitcode: int | None) -> str:
    """Say in words how a worker process ended ("killed by SIGKILL ...")."""
    if exitcode is None:
        return "is unresponsive"
    if exitcode < 0:
        signum = -exitcode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hint = {
            "SIGKILL": " (possibly out of memory: the kernel's OOM killer sends SIGKILL)",
            "SIGSEGV": " (a segmentation fault, usually in C code or ctypes)",
            "SIGBUS": " (a bus error, e.g. a truncated memory-mapped file)",
            "SIGABRT": " (an abort, usually a failed assertion in C code)",
            "SIGTERM": " (terminated by another process)",
        }.get(name, "")
        return f"was killed by {name}{hint}"
    return f"exited unexpectedly with exit code {exitcode}"
