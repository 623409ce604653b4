"""ANSI colour codes in text, as HTML: a leaf module (it imports nothing of mpmagic).

A background run's live area is HTML (``text/html``, which Jupyter shows in
preference to ``text/plain``), and the text in it is what the tasks printed:
a failed rank's IPython traceback, coloured logging, rich, all of it written
with ANSI escape sequences. Escaped as plain text they showed literally
(``[31m-----[39m``), where a cell's stream shows colours. :func:`to_html` turns
the colour and weight codes (SGR: the 8 and 16 colours, 256 colours, 24-bit,
bold, italic, underline) into ``<span style=...>`` and drops every other
escape sequence (cursor moves, erase line, titles).
"""

from __future__ import annotations

import html
import re

# Jupyter's own ANSI palette (JupyterLab's and the classic notebook's stylesheets),
# normal then intense: the live area's colours match those of the cell's stream.
_PALETTE = (
    "#3E424D", "#E75C58", "#00A250", "#DDB62B", "#208FFB", "#D160C4", "#60C6C8", "#C5C1B4",
    "#282C36", "#B22B31", "#007427", "#B27D12", "#0065CA", "#A03196", "#258F8F", "#A1A6B2",
)
_CUBE = (0, 95, 135, 175, 215, 255)  # the 6 levels of the 256-colour cube

# CSI (``ESC [ params final``), OSC (``ESC ] ... BEL`` or ``ESC \\``), a two-character
# escape, or a lone ESC (a sequence cut short): each one is taken out of the text.
_ESCAPE = re.compile(r"\x1b(?:\[([0-?]*)[ -/]*([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_]?)")


def _color_256(n: int) -> str | None:
    if 0 <= n < 16:
        return _PALETTE[n]
    if 16 <= n < 232:
        n -= 16
        return f"#{_CUBE[n // 36]:02X}{_CUBE[n // 6 % 6]:02X}{_CUBE[n % 6]:02X}"
    if 232 <= n < 256:
        level = 8 + 10 * (n - 232)
        return f"#{level:02X}{level:02X}{level:02X}"
    return None


# SGR codes that set or clear one flag: code -> (attribute, value).
_FLAGS = {1: ("bold", True), 3: ("italic", True), 4: ("underline", True),
          22: ("bold", False), 23: ("italic", False), 24: ("underline", False)}


class _Style:
    """The SGR state: colours, bold, italic, underline."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.fg: str | None = None
        self.bg: str | None = None
        self.bold = self.italic = self.underline = False

    def css(self) -> str:
        parts = []
        if self.fg:
            parts.append(f"color:{self.fg}")
        if self.bg:
            parts.append(f"background-color:{self.bg}")
        if self.bold:
            parts.append("font-weight:bold")
        if self.italic:
            parts.append("font-style:italic")
        if self.underline:
            parts.append("text-decoration:underline")
        return ";".join(parts)

    def apply(self, params: str) -> None:
        """One SGR sequence's parameters (``31``, ``38;5;28;01``, ``39;00``, empty: a reset)."""
        try:
            codes = [int(p) if p else 0 for p in params.replace(":", ";").split(";")]
        except ValueError:  # (private parameters such as ``?``: no style)
            return
        i = 0
        while i < len(codes):
            code = codes[i]
            i += 1
            if code == 0:
                self.reset()
            elif code in _FLAGS:
                setattr(self, *_FLAGS[code])
            elif 30 <= code <= 37 or 90 <= code <= 97:
                self.fg = _PALETTE[code - 30 if code < 90 else code - 90 + 8]
            elif 40 <= code <= 47 or 100 <= code <= 107:
                self.bg = _PALETTE[code - 40 if code < 100 else code - 100 + 8]
            elif code == 39:
                self.fg = None
            elif code == 49:
                self.bg = None
            elif code in (38, 48):  # 256 colours (5;n) or 24-bit (2;r;g;b)
                color = None
                if i < len(codes) and codes[i] == 5 and i + 1 < len(codes):
                    color = _color_256(codes[i + 1])
                    i += 2
                elif i < len(codes) and codes[i] == 2 and i + 3 < len(codes):
                    r, g, b = (min(255, c) for c in codes[i + 1:i + 4])
                    color = f"#{r:02X}{g:02X}{b:02X}"
                    i += 4
                else:
                    i = len(codes)  # (malformed: the rest of the sequence is its arguments)
                if code == 38:
                    self.fg = color
                else:
                    self.bg = color


def to_html(text: str) -> str:
    """``text`` escaped for HTML, its ANSI colours as ``<span style=...>``, other escapes dropped."""
    if "\x1b" not in text:  # (the usual output: no colour at all)
        return html.escape(text)
    out: list[str] = []
    style = _Style()
    css = ""

    def emit(piece: str) -> None:
        if piece:
            escaped = html.escape(piece)
            out.append(f"<span style='{css}'>{escaped}</span>" if css else escaped)

    pos = 0
    for match in _ESCAPE.finditer(text):
        emit(text[pos:match.start()])
        pos = match.end()
        if match.group(2) == "m":
            style.apply(match.group(1))
            css = style.css()
    emit(text[pos:])
    return "".join(out)

