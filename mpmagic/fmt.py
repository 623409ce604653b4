"""How figures read in reports, advice, status and errors: one leaf module.

It imports nothing of mpmagic, so any layer may use it (``report``,
``advice``, ``pool``, ``scaling``... each used to import the formatter from
``report``, which tied them into one import cycle).
"""

from __future__ import annotations

import codecs
import sys
from typing import Any


def func_name(func: Any) -> str:
    """What a run of ``func`` is called in messages and ``%pool runs`` (a
    ``functools.partial`` or a callable object by its type)."""
    return getattr(func, "__name__", None) or type(func).__name__


def micro() -> str:
    """``µs``, or ``us`` where the notebook's stdout or stderr cannot encode "µ"
    (``LC_ALL=C PYTHONIOENCODING=ascii``, a terminal in an ASCII locale): the
    timing line raised UnicodeEncodeError there, after the run, and
    ``r = %pmap ...`` was never assigned."""
    return "µs" if _streams_encode("µ") else "us"


def ellipsis() -> str:
    """``…``, or ``...`` where the notebook's stdout or stderr cannot encode it (as :func:`micro`)."""
    return "…" if _streams_encode("…") else "..."


def _streams_encode(char: str) -> bool:
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None)
        if isinstance(encoding, str) and not _encodes(char, encoding):
            return False
    return True


_encodes_by_encoding: dict[tuple[str, str], bool] = {}


def _encodes(char: str, encoding: str) -> bool:
    ok = _encodes_by_encoding.get((char, encoding))
    if ok is None:
        try:
            codecs.encode(char, encoding)
            ok = True
        except (LookupError, UnicodeError, TypeError):
            ok = False
        _encodes_by_encoding[(char, encoding)] = ok
    return ok


#: Characters of a cell's first line that a background run's label shows.
SNIPPET_CHARS = 40


def code_snippet(code: str, limit: int = SNIPPET_CHARS) -> str:
    """The start of a cell, as a background run's label names it: its first
    non-blank line, cut at a space near ``limit`` characters, then ``…`` when
    more of the cell follows (``if rank == 1: …``). The label used to cut the
    line at 30 characters as it fell, with no mark, and its ``, 2/2 ranks``
    then read as code (``print('x', , 2/2 ranks``)."""
    lines = [line.strip() for line in code.splitlines() if line.strip()]
    if not lines:
        return ""
    first, more = lines[0], len(lines) > 1
    if len(first) > limit:
        cut = first[:limit]
        space = cut.rfind(" ")
        if space >= limit // 2:  # (a word's end, unless that drops most of the line)
            cut = cut[:space]
        first, more = cut.rstrip(" ,;"), True
    return f"{first} {ellipsis()}" if more else first


def fmt_seconds(s: float | None) -> str:
    """``512 µs`` (``us`` on an ASCII stream: ``micro``), ``3.4 ms``, ``1.25 s``; ``-`` when not measured."""
    if s is None:
        return "-"
    # The unit is picked after rounding: 0.9996 ms is "1.0 ms", not "1000 µs".
    if round(s * 1e6) < 1000:
        return f"{s * 1e6:.0f} {micro()}"
    if round(s * 1e3, 1) < 1000:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def imports_text(imports: dict[str, float | None], limit: int = 3) -> str:
    """``numpy (290 ms), pandas (410 ms)``: the slowest first, ``limit`` at most."""
    ranked = sorted(imports.items(), key=lambda kv: -(kv[1] or 0.0))
    parts = [f"{n} ({fmt_seconds(t)})" if t else n for n, t in ranked[:limit]]
    if len(ranked) > limit:
        parts.append(f"{len(ranked) - limit} more")
    return ", ".join(parts)


def fmt_bytes(n: float | None) -> str:
    """``512 B``, ``15.7 kB``, ``3.2 MB``, ``17 MB``, ``1.5 GB``; ``-`` when not measured.

    Every size mpmagic prints goes through here, in decimal units (1 MB is
    10**6 bytes): the units ``max_memory="2GB"`` is parsed in
    (:func:`mpmagic.pool.parse_memory`), and the ones Docker and ``df -H``
    use, so a limit set as 2GB reads back as ``2.0 GB``. Below 10 of a unit one
    decimal, above it none: three figures at most. The unit is picked after
    rounding, so 999,999 bytes read ``1 MB``, not ``1000 kB``.
    """
    if n is None:
        return "-"
    if round(abs(n)) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if round(abs(n), 1) < 10:
            return f"{n:.1f} {unit}"
        if round(abs(n)) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}"
    raise AssertionError("unreachable")


def fmt_speedup(sp: float | None, measured: bool = True) -> str:
    """A speedup as a run's report shows it: "1.50x" (measured), "~1.5x" (estimated),
    "<0.1x" below a tenth ("0.00x" read as "nothing happened"; two digits of a
    tiny ratio mean nothing), "n/a" when there is none. The scaling table's too."""
    if sp is None:
        return "n/a"
    if sp < 0.1:
        return "<0.1x"
    return f"{sp:.2f}x" if measured else f"~{sp:.1f}x"


def fmt_efficiency(eff: float | None) -> str:
    """An efficiency (speedup per worker) as a percentage: "75%", "<1%" for one that
    would round to "0%" (as the "<0.1x" speedup beside it), "-" when there is none."""
    if eff is None:
        return "-"
    return "<1%" if 0 < eff < 0.005 else f"{eff:.0%}"


def noun(plural: str, n: int | None) -> str:
    """``plural`` ("items", "ranks", "rows") as a count of ``n`` takes it: singular for
    exactly one ("0 of 1 item", "1 item"), as the run's lines say it."""
    return plural[:-1] if n == 1 and plural.endswith("s") else plural


def retried_words(n: int) -> str:
    """``1 retried after its worker died``: ``n`` items (or ranks) that ran again, side
    effects too, after their worker died: the report's words, and a cell's error's."""
    return f"{n} retried after {'its worker' if n == 1 else 'their workers'} died"


def _results_words(n: int, total: int | None) -> str:
    """``n`` results in words: "1 result", "3 results", "3 of 8 results", "1 of 8 results"."""
    return f"{n} of {total} results" if total is not None else f"{n} result{'s' if n != 1 else ''}"


def cancelled_words(n: int, total: int | None, ordered: bool) -> str:
    """What the loop of a cancelled imap (or ``as_completed``) got, and which items will not come, for
    ``n`` results given of ``total`` items (None: an input of unknown length), in
    words right for none, one and many ("none of its 10 items will come", "its one
    item will not come", "item 7, its last, will not come")."""
    if total is not None and n >= total:
        if total == 0:
            return "the loop had no item to get a result for"
        return "the loop had got its one result" if total == 1 else f"the loop had got all {n} results"
    if not n:
        if total == 1:
            return "the loop got no result; its one item will not come"
        return f"the loop got no result; none of its {'' if total is None else f'{total} '}items will come"
    left = None if total is None else total - n
    if ordered:
        got = ("the result of its first item" + ("" if total is None else f" (of {total})") if n == 1
               else f"the results of its first {n}{'' if total is None else f' of {total}'} items")
        rest = f"item {n}, its last, will not come" if left == 1 else f"item {n} and the items after it will not come"
        return f"the loop got {got}; {rest}"
    rest = "the other item will not come" if left == 1 else "the other items will not come"
    return f"the loop got {_results_words(n, total)} (as they finished); {rest}"


def stopped_words(n: int, total: int | None) -> str:
    """The next ``next()`` after a cancelled imap's ``CancelledError`` (or an ``as_completed``
    loop's, or its run's first error): what the loop got
    (``n`` results of ``total`` items), in words right for none, one and many."""
    if not n:
        return "the loop got no result, and nothing more comes"
    if total is not None and n >= total:
        return "the loop had got its one result, and nothing more comes" if total == 1 else (
            f"the loop had got all {n} results, and nothing more comes")
    others = "the other item gave none" if total is not None and total - n == 1 else "the other items gave none"
    return f"the loop got {_results_words(n, total)}, {others}, and nothing more comes"
