"""The docs cannot drift from the code: every snippet runs, every link resolves.

* Every ```` ```python ```` block of ``README.md`` and ``docs/*.md`` is run, in
  order, one file at a time, in the test session's IPython shell with mpmagic
  loaded (so ``%pmap``, ``%%parallel`` and ``%pool`` lines work as in a
  notebook). Each file starts from a clean namespace and default settings.
  Output examples go in ```` ```text ```` blocks, shell commands in
  ```` ```bash ````; those are not run. Two HTML comments, invisible on the
  page, may stand right before a python block (use them sparingly):
  ``<!-- docs-test: skip (why) -->`` does not run it, and
  ``<!-- docs-test: raises NameOfError -->`` runs it and expects that error.
* Every relative link (and ``#anchor``) in those files points at a file or
  heading that exists, and ``docs/index.md`` links every page in ``docs/``.
* ``docs/reference.md`` is current: its option and setting tables are the
  ones ``docs/make_reference.py`` generates from the magics' parsers, the
  ``%config`` traits and the API's docstrings.

A site builder (MkDocs, Sphinx) was considered: these pages link to the
example notebooks and the README outside ``docs/``, which MkDocs' strict build
rejects, and GitHub renders the Markdown as it is; this test does the checks
a strict build would (links, anchors) plus running the code, without one more
toolchain.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest
from markdown_it import MarkdownIt

import mpmagic
from mpmagic import config
from mpmagic import pool as pool_module

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.glob("*.md")])
# Tests reach only this machine: a snippet naming another host is not run.
REMOTE = re.compile(r"\b(?:tcp|tls|ucx|wss?|https?)://(?!127\.|localhost\b|\[::1\])[\w.\-\[\]:]+")
MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|raises)\b\s*([^>]*?)\s*-->")

_md = MarkdownIt("commonmark").enable("table")


@dataclass
class Snippet:
    """One ```python block: where it is, its code, and what the test does with it."""

    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: bool = False
    raises: str | None = None

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    """The python blocks of a page, with their docs-test markers."""
    found = []
    tokens = _md.parse(page.read_text())
    for i, tok in enumerate(tokens):
        if tok.type != "fence" or tok.info.strip().split(" ")[0] != "python":
            continue
        snip = Snippet(page, tok.map[0] + 1, tok.content)
        prev = tokens[i - 1] if i else None
        if prev is not None and prev.type == "html_block" and (m := MARKER.search(prev.content)):
            if m.group(1) == "skip":
                snip.skip = True
            else:
                snip.raises = m.group(2).split()[0] if m.group(2) else "Exception"
        found.append(snip)
    return found


def github_slug(text: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = unicodedata.normalize("NFKC", text).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page (with GitHub's -1, -2 for repeats)."""
    seen: dict[str, int] = {}
    out = set()
    tokens = _md.parse(page.read_text())
    for i, tok in enumerate(tokens):
        if tok.type != "heading_open":
            continue
        inline = tokens[i + 1]
        text = "".join(c.content for c in inline.children or [] if c.type in ("text", "code_inline"))
        slug = github_slug(text)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    for m in re.finditer(r'<a\s+(?:name|id)="([^"]+)"', page.read_text()):
        out.add(m.group(1))
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line, href) of every link and image in a page."""
    out = []
    for tok in _md.parse(page.read_text()):
        if tok.type != "inline":
            continue
        for child in tok.children or []:
            href = child.attrGet("href") if child.type == "link_open" else child.attrGet("src") if child.type == "image" else None
            if href:
                out.append((tok.map[0] + 1 if tok.map else 0, str(href)))
    return out


@pytest.fixture
def docs_shell(ip):
    """The session's shell, reset to defaults around one page's snippets."""
    before = set(ip.user_ns)
    config.current().reset()
    yield ip
    for name in set(ip.user_ns) - before:
        ip.user_ns.pop(name, None)
    config.current().reset()
    backend = pool_module.current_pool()
    if backend is not None and (getattr(backend, "name", None) != "local" or backend.workers != 2):
        mpmagic.use_local(2)


PAGES_WITH_CODE = [p for p in PAGES if snippets(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run(docs_shell, page: Path) -> None:
    """Every python block of the page runs, in order, as in one notebook."""
    for snip in snippets(page):
        if snip.skip:
            continue
        remote = REMOTE.search(snip.code)
        assert remote is None, (
            f"{snip.where()}: the snippet would connect to {remote.group(0)}; tests reach only 127.0.0.1. "
            "Show it as a ```text block, or mark it <!-- docs-test: skip (why) -->"
        )
        result = docs_shell.run_cell(snip.code, store_history=False, silent=False)
        error = result.error_before_exec or result.error_in_exec
        if snip.raises:
            assert error is not None, f"{snip.where()}: expected {snip.raises}, but the snippet ran without error"
            names = {cls.__name__ for cls in type(error).__mro__}
            assert snip.raises in names, f"{snip.where()}: expected {snip.raises}, got {type(error).__name__}: {error}"
        elif error is not None:
            raise AssertionError(
                f"{snip.where()}: the snippet raised {type(error).__name__}: {error}\n{snip.code}"
            ) from error


def test_markers_are_rare_and_used_right() -> None:
    """Skipping is for what cannot run here; every marker sits right before a python block."""
    skipped = [s.where() for p in PAGES for s in snippets(p) if s.skip]
    total = sum(len(snippets(p)) for p in PAGES)
    assert len(skipped) <= max(3, total // 10), f"too many snippets skipped: {skipped}"
    for page in PAGES:
        blocks = [t for t in _md.parse(page.read_text()) if t.type == "html_block"]
        n_markers = sum(len(MARKER.findall(t.content)) for t in blocks)
        n_used = sum(1 for s in snippets(page) if s.skip or s.raises)
        assert n_markers == n_used, f"{page.name}: a docs-test marker is not right before a ```python block"


def test_relative_links_resolve() -> None:
    broken = []
    for page in PAGES:
        for line, href in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", href):  # http:, https:, mailto: ...
                continue
            path, _, anchor = href.partition("#")
            target = (page.parent / unquote(path)).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{line}: {href}"
            if not target.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                broken.append(f"{where} (no heading #{anchor} in {target.name})")
            elif ROOT not in target.parents and target != ROOT:
                broken.append(f"{where} (outside the repository)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_index_links_every_page() -> None:
    index = DOCS / "index.md"
    linked = {(DOCS / unquote(h.partition("#")[0])).resolve() for _, h in links(index) if not re.match(r"^[a-z]+:", h)}
    missing = [p.name for p in DOCS.glob("*.md") if p != index and p.resolve() not in linked]
    assert not missing, f"docs/index.md does not link: {missing}"


def test_reference_is_current() -> None:
    """docs/reference.md holds what make_reference.py generates from the code now."""
    from importlib import util

    spec = util.spec_from_file_location("make_reference", DOCS / "make_reference.py")
    assert spec and spec.loader
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (DOCS / "reference.md").read_text()
    assert module.render(current) == current, "docs/reference.md is stale: run python docs/make_reference.py"


def test_reference_names_every_option_and_setting() -> None:
    """Belt and braces: each option string, %config trait and API name appears in the reference."""
    from mpmagic import magics

    text = (DOCS / "reference.md").read_text()
    for parser in (magics._pmap_parser(), magics._parallel_parser(), magics._pool_parser()):
        for action in parser._actions:
            for opt in action.option_strings:
                assert f"`{opt}" in text, f"{parser.prog} {opt} is not in docs/reference.md"
    for name in config.MPMagic.class_traits(config=True):
        assert f"MPMagic.{name}" in text, f"%config MPMagic.{name} is not in docs/reference.md"
    for name in mpmagic.__all__:
        assert f"`{name}" in text or f"mpmagic.{name}" in text, f"mpmagic.{name} is not in docs/reference.md"
