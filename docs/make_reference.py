"""Fill the generated parts of docs/reference.md from the code.

The option tables come from the magics' argparse parsers, the settings table
from the ``MPMagic`` traitlets class, and the API section from
``mpmagic.__all__`` with signatures and docstrings, so the reference says what
the code does. Hand-written text lives between the generated blocks, which
are delimited by ``<!-- generated: KEY -->`` and ``<!-- end generated -->``.

    python docs/make_reference.py          # rewrite docs/reference.md
    python docs/make_reference.py --check  # exit 1 if it is stale

``tests/test_docs.py`` fails when the file is stale.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import mpmagic  # noqa: E402
from mpmagic import config, magics  # noqa: E402

REFERENCE = HERE / "reference.md"
BLOCK = re.compile(r"(<!-- generated: (?P<key>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _rst_to_md(text: str) -> str:
    """Docstring markup to Markdown: ``x`` and :role:`~a.b.x` become `x`."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _argument(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    return f"`{action.metavar or action.dest.upper()}`"


def options_table(parser: argparse.ArgumentParser) -> str:
    """A Markdown table of a parser's options: names, argument, default, meaning."""
    rows = ["| option | argument | default | what it does |", "| --- | --- | --- | --- |"]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings:
            names = ", ".join(f"`{o}`" for o in action.option_strings)
        else:
            names = f"`{action.metavar or action.dest.upper()}` (positional)"
        default = action.default
        flag = action.nargs == 0  # a switch: its "default" is only the opposite state
        shown = "" if flag or default in (None, argparse.SUPPRESS) else f"`{default}`"
        text = formatter._expand_help(action) if action.help else ""  # what %pmap? prints
        if not text and not action.option_strings:
            text = "what to do; see the usage above"
        rows.append(f"| {names} | {_argument(action)} | {shown} | {_cell(text)} |")
    return "\n".join(rows) + "\n"


def config_table() -> str:
    """A Markdown table of every ``%config MPMagic.<name>`` setting."""
    rows = ["| setting | type | default | what it does |", "| --- | --- | --- | --- |"]
    for name, trait in sorted(config.MPMagic.class_traits(config=True).items()):
        kind = type(trait).__name__
        if getattr(trait, "values", None):
            kind += " (" + ", ".join(f"`{v}`" for v in trait.values) + ")"
        rows.append(f"| `MPMagic.{name}` | {kind} | `{trait.default()!r}` | {_cell(trait.help)} |")
    return "\n".join(rows) + "\n"


def _signature(obj: object) -> str:
    """The call signature, with annotations shown as written (not as quoted strings)."""
    try:
        try:
            sig = inspect.signature(obj, eval_str=True)  # type: ignore[arg-type]
        except Exception:  # an annotation that cannot be evaluated here
            sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r"<class '([\w.]+)'>", r"\1", str(sig)).replace("typing.", "").replace("collections.abc.", "")


#: Public classes whose instances mpmagic makes (``submit`` returns a ``Run``).
MADE_BY_MPMAGIC = {"Run"}


def api_section() -> str:
    """Each public name of ``mpmagic``: its signature and its docstring."""
    out = []
    errors = []
    for name in mpmagic.__all__:
        obj = getattr(mpmagic, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            errors.append(obj)
            continue
        doc = _rst_to_md(inspect.cleandoc(obj.__doc__ or "")).strip()
        kind = "class" if isinstance(obj, type) else "function"
        # A class users get from a call, never build (its constructor is internal): no signature.
        signature = "" if name in MADE_BY_MPMAGIC else _signature(obj)
        out.append(f"### `mpmagic.{name}`\n\n{kind}: `{name}{signature}`\n\n{doc}\n")
    if errors:
        out.append("### Exceptions\n")
        out.append("| exception | is a | raised when |\n| --- | --- | --- |")
        for exc in errors:
            bases = ", ".join(f"`{b.__name__}`" for b in exc.__bases__)
            first = _rst_to_md(inspect.cleandoc(exc.__doc__ or "")).split("\n\n")[0]
            out.append(f"| `mpmagic.{exc.__name__}` | {bases} | {_cell(first)} |")
        out.append("")
    return "\n".join(out)


GENERATORS: dict[str, Callable[[], str]] = {
    "pmap-options": lambda: options_table(magics._pmap_parser()),
    "parallel-options": lambda: options_table(magics._parallel_parser()),
    "pool-options": lambda: options_table(magics._pool_parser()),
    "config": config_table,
    "api": api_section,
}


def render(text: str) -> str:
    """``text`` with every generated block replaced by what the code says now."""

    def fill(m: re.Match) -> str:
        key = m.group("key")
        if key not in GENERATORS:
            raise KeyError(f"reference.md has a generated block {key!r} that make_reference.py does not know")
        return m.group(1) + GENERATORS[key]() + m.group(4)

    return BLOCK.sub(fill, text)


def main(argv: list[str]) -> int:
    text = REFERENCE.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("docs/reference.md is stale: run python docs/make_reference.py")
            return 1
        return 0
    REFERENCE.write_text(new)
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
