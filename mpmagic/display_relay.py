"""Rich output from tasks, shown in the notebook: the notebook's half of
``task_builtins.display``.

A task's ``display(obj)`` arrives as one marked line of its stdout carrying
the object's mime bundle (JSON). The job cuts those lines out of the task's
output (:func:`split`) and hands each bundle on as output of its own kind,
``"display"``, in its place among the printed lines; whoever prints the run's
output shows it (:func:`show`): as rich output through IPython's display
publisher when IPython runs (the cell that waits on the run gets a
``display_data`` message: HTML, images, figures), as its text form otherwise.
A bundle sent with a display id (``display(x, display_id=...)``, a handle's
``update``) carries it, and whether it updates, under two keys that are no
mime type (``task_builtins.DISPLAY_ID``, ``UPDATE``): it is published with
that id, as an ``update_display_data`` for an update.
A background run's live area shows the text form (:func:`text_form`).

:func:`print_output` is the one writer of a task's output in the notebook,
for a blocking run (``jobs``) and a stream's consumer (``imap``,
``background._Sink.relay_here``) alike: text the notebook's stream cannot
encode (an ASCII terminal) is written with backslash escapes, never an error.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from .progress import clear_for_output
from .task_builtins import DISPLAY_ID, MARK, UPDATE

log = logging.getLogger("mpmagic")


def split(text: str) -> list[tuple[bool, str]]:
    """``text`` as pieces in order: ``(False, printed text)`` and ``(True, bundle JSON)``."""
    pieces: list[tuple[bool, str]] = []
    plain: list[str] = []
    for line in text.split("\n"):
        before, mark, body = line.partition(MARK)
        if not mark:
            plain.append(line)
            continue
        if before:  # a partial line printed just before it
            plain.append(before)
        if plain:
            pieces.append((False, "\n".join(plain) + "\n"))
            plain = []
        pieces.append((True, body))
    if plain and plain != [""]:
        pieces.append((False, "\n".join(plain)))
    return pieces


def _bundle(payload: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
        if isinstance(data, dict):
            return data
    except ValueError:
        log.warning("mpmagic: a malformed display line from a task: %r", payload[:200])
    return {"text/plain": payload}


def is_update(payload: str) -> bool:
    """Does this bundle replace what shows under its display id (``update_display``)?"""
    return "update" in payload and bool(_bundle(payload).get(UPDATE))  # (JSON escapes the key's \x1e)


def text_form(payload: str) -> str:
    """The bundle's text form, one line (for places that show text only; an update
    under a display id shows as a line of its own there)."""
    return str(_bundle(payload).get("text/plain", "")) + "\n"


def print_output(stream: str, text: str) -> None:
    """Print one piece of a task's output here: ``stdout`` or ``stderr`` text to the
    notebook's stream of that name, a ``display`` bundle through :func:`show`.

    A stream that cannot encode what the task printed (``LC_ALL=C
    PYTHONIOENCODING=ascii``, a terminal in an ASCII locale; the worker's own
    stream is UTF-8) gets it with backslash escapes (``na\\xefve``), as Python
    writes such text to stderr: a UnicodeEncodeError here named no item and
    lost the run's results. A text progress bar on the line is taken off it first
    (:func:`progress.clear_for_output`): the text was glued to the bar's frame."""
    clear_for_output()
    if stream == "display":
        show(text, lambda t: write_encodable(sys.stdout, t))
    else:
        write_encodable(sys.stderr if stream == "stderr" else sys.stdout, text)


def write_encodable(target: Any, text: str) -> None:
    """``target.write(text)``, with backslash escapes for what ``target``'s encoding cannot hold."""
    try:
        target.write(text)
    except UnicodeEncodeError:
        encoding = getattr(target, "encoding", None) or "ascii"
        target.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))


def show(payload: str, write: Callable[[str], Any]) -> None:
    """Show a task's displayed object here: rich, through IPython's display
    publisher, when IPython runs; else its text form through ``write``."""
    data = _bundle(payload)
    display_id, update = data.pop(DISPLAY_ID, None), bool(data.pop(UPDATE, False))
    ipython = sys.modules.get("IPython")
    if ipython is None or ipython.get_ipython() is None:
        write(str(data.get("text/plain", "")) + "\n")
        return
    from IPython.display import publish_display_data

    if display_id is None:
        publish_display_data(data)
    else:  # the task's display(..., display_id=...) or its handle's update()
        publish_display_data(data, transient={"display_id": str(display_id)}, update=update)
