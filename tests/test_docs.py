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
* The output a page shows for a snippet (a ```` ```text ```` block right
  after the python block) is what the snippet shows when it runs (its
  printed text, its Out[] value, its report line, its error): every line of
  the block must appear in the snippet's real output (whitespace runs count
  as one space, so a long line may be wrapped; ``...`` stands for any text,
  for the parts that differ from run to run such as a pid or an object's
  name). Timing figures cannot match from run to run: a block that shows them
  is marked ``<!-- docs-test: example output -->`` (between the python block
  and the text block), and then, on each line holding a figure with a unit
  (``345.8 ms``, ``2.03x``, ``82%``, ``17 MB``), a pid or a session counter
  (``tasks run: 18``, a timeline's ``worker 5 |``), every number stands
  for any number; the words, results and order of the parts must still match.
  An ``advice:`` line depends on those timings: in an example block it is
  compared only when the run gave advice.
* The error texts shown on their own in docs/reliability.md and
  docs/troubleshooting.md (``WorkerLostError: ...``) are compared with the
  error the code raises for the case the page describes (``ERROR_TEXTS``).
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

import functools
import os
import re
import signal
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest
from IPython.utils.capture import capture_output
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
EXAMPLE_MARKER = re.compile(r"<!--\s*docs-test:\s*example output\s*-->")
# Before a standalone error block that needs a machine set up for it (a small
# /dev/shm): the test file named compares its real output with the block.
SHOWN_BY = re.compile(r"<!--\s*docs-test:\s*shown by (tests/[\w/]+\.py)\s*-->")
# A figure whose value differs from run to run: a number with a unit, a pid,
# or a counter of the session (%pool's "calls run: 3, tasks run: 18").
FIGURE = re.compile(r"\d(?:[\d.]*)\s*(?:us|µs|ms|s|x|%|MB)\b|\bpid\s+\d|\brun: \d|\bworker\s+\d+ \|")
NUMBER = re.compile(r"~?\d+(?:\.\d+)?")

_md = MarkdownIt("commonmark").enable("table")


@dataclass
class Snippet:
    """One ```python block: where it is, its code, and what the test does with it."""

    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: bool = False
    raises: str | None = None
    output: str | None = None  # the ```text block shown right after it, if any
    output_line: int = 0
    example: bool = False  # that block is marked "example output"

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
        after = tokens[i + 1] if i + 1 < len(tokens) else None
        if after is not None and after.type == "html_block" and EXAMPLE_MARKER.search(after.content):
            snip.example = True
            after = tokens[i + 2] if i + 2 < len(tokens) else None
        if after is not None and after.type == "fence" and after.info.strip().split(" ")[0] == "text":
            snip.output, snip.output_line = after.content, after.map[0] + 1
        found.append(snip)
    return found


def _squeeze(text: str) -> str:
    return " ".join(text.split())


# In a shown line: "..." (any text), a timeline bar "|###...|", or a number
# with its time unit if it has one ("345.8 ms", "~1.4").
TOKEN = re.compile(r"(\.\.\.)|(\|[#.]+\|)|([~<]?\d+(?:\.\d+)?(?: (?:us|µs|ms|s)\b)?)")


def line_pattern(line: str, example: bool) -> re.Pattern:
    """A shown output line as a regex: ``...`` is any text; in an example
    block, on a line with timing figures, each number is any number (and a
    time in any unit: 831 us in one run is 1.1 ms in the next), and a
    timeline bar is any bar."""
    text = _squeeze(line)
    masked = example and FIGURE.search(text) is not None
    out, pos = [], 0
    for m in TOKEN.finditer(text):
        dots, bar, number = m.groups()
        if dots:
            piece = ".*?"
        elif bar and example:
            piece = r"\|[#.]+\|"
        elif number and masked:
            piece = r"[~<]?\d+(?:\.\d+)?" + (r" (?:us|µs|ms|s)" if " " in number else "")
        else:
            piece = re.escape(m.group(0))
        out += [re.escape(text[pos : m.start()]), piece]
        pos = m.end()
    out.append(re.escape(text[pos:]))
    return re.compile("".join(out))


def shown_lines_missing(shown: str, actual: str, example: bool) -> list[str]:
    """The lines of a page's output block that the snippet's real output lacks."""
    real = _squeeze(actual)
    missing = []
    for line in shown.splitlines():
        if not line.strip():
            continue
        if example and line.startswith("advice:"):
            # Which advice a run gives follows its timings (examples here): the
            # page's advice line stands for whatever advice this run gave.
            continue
        if not line_pattern(line, example).search(real):
            missing.append(line)
    return missing


def what_it_showed(cap, error: BaseException | None) -> str:
    """Everything a snippet put in front of the reader: printed text, displayed
    objects (the report) and the Out[] value, and its error."""
    parts = [cap.stdout, cap.stderr]
    parts += [o.data.get("text/plain", "") for o in cap.outputs]
    if error is not None:
        parts.append(f"{type(error).__name__}: {error}")
    return "\n".join(parts)


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


@pytest.fixture
def default_pool() -> None:
    """The pages show runs on the default pool (2 workers, the default start
    method): a test before may have left a spawn pool (a run alone of
    test_kept_ranks then test_docs failed on "(spawn)" in a report)."""
    from mpmagic.backends.local import default_start_method

    backend = pool_module.current_pool()
    method = default_start_method()
    if backend is None or getattr(backend, "name", None) != "local" or backend.start_method != method:
        mpmagic.use_local(2, method)


PAGES_WITH_CODE = [p for p in PAGES if snippets(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run(docs_shell, default_pool, page: Path) -> None:
    """Every python block of the page runs, in order, as in one notebook."""
    for snip in snippets(page):
        if snip.skip:
            continue
        remote = REMOTE.search(snip.code)
        assert remote is None, (
            f"{snip.where()}: the snippet would connect to {remote.group(0)}; tests reach only 127.0.0.1. "
            "Show it as a ```text block, or mark it <!-- docs-test: skip (why) -->"
        )
        with capture_output() as cap:
            result = docs_shell.run_cell(snip.code, store_history=False, silent=False)
        error = result.error_before_exec or result.error_in_exec
        if snip.output is not None:
            missing = shown_lines_missing(snip.output, what_it_showed(cap, error), snip.example)
            assert not missing, (
                f"{page.relative_to(ROOT)}:{snip.output_line}: the page shows output the snippet at "
                f"{snip.where()} does not give:\n" + "\n".join(missing)
                + f"\n--- it gave:\n{what_it_showed(cap, error)}"
                + ("" if snip.example else "\n(timing figures? mark the block <!-- docs-test: example output -->)")
            )
        if snip.raises:
            assert error is not None, f"{snip.where()}: expected {snip.raises}, but the snippet ran without error"
            names = {cls.__name__ for cls in type(error).__mro__}
            assert snip.raises in names, f"{snip.where()}: expected {snip.raises}, got {type(error).__name__}: {error}"
        elif error is not None:
            raise AssertionError(
                f"{snip.where()}: the snippet raised {type(error).__name__}: {error}\n{snip.code}"
            ) from error


# The cases docs/reliability.md and docs/troubleshooting.md describe, each run
# for real; the error texts those pages show on their own (not as a
# snippet's output) must all appear in what these runs show.
ERROR_PAGES = [DOCS / "reliability.md", DOCS / "troubleshooting.md"]
ERROR_SETUP = """
import os, signal, sqlite3, time
def sigkilled(x):
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x
def stuck(x):
    if x == 3:
        time.sleep(60)
    return x
def spin(x):
    while True:
        pass
conn = sqlite3.connect(":memory:")
def query(x):
    return conn.execute("select ?", (x,)).fetchone()[0]
def dies_once(x):
    if x < 0 and not os.path.exists(MARK):
        open(MARK, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1
"""
ERROR_CASES = [
    "def work(x):\n    # the function of the troubleshooting page\n    return 1 / x\n\n%pmap -q work, [0, 1]",
    "%pmap -q sigkilled, range(8)",
    "%%parallel -n 2 -q\nif rank == 1:\n    os._exit(7)\nrank",
    "_ = %pmap -q dies_once, range(20_000)\n_ = %pmap -q dies_once, xs",  # warm-up; then item 777 dies once
    "%pmap -q --timeout 0.5 stuck, range(6)",
    "%%parallel -n 2 -q --timeout 0.5\nif rank == 1:\n    time.sleep(60)\nrank",
    "%pmap -q query, range(4)",
    "%pmap -n 0 abs, range(3)",
    "%%parallel -n 4 -q\n1 / (rank - 2)",
    "%pmap --worker 2 abs, range(3)",
    "def fails_at_3(x):\n    return 1 / (x - 3)\n\n%pmap fails_at_3, range(6)",  # the failed-run line
    "%%parallel -n 4\n1 / (rank - 2)",
    # (rank 0 waits on rank 1 for ever: stopped after the grace, as an MPI job aborts)
    "%%parallel -n 2 -q\nif rank == 1:\n    raise ValueError('bad input on rank 1')\ntime.sleep(60)",
]
# "<how it ended>": an angle-bracketed phrase with a space stands for any text.
PLACEHOLDER = re.compile(r"<[a-z]+(?: [a-z]+)+>")


def standalone_error_blocks(page: Path, shown_elsewhere: bool = False) -> list[tuple[int, str]]:
    """(line, text) of the ```text blocks of a page that are not a snippet's output.

    Blocks right after a ``shown by`` marker are checked by the test file it
    names; ``shown_elsewhere=True`` lists those instead of the others.
    """
    outputs = {s.output_line for s in snippets(page)}
    lines = page.read_text().splitlines()
    blocks = []
    for t in _md.parse(page.read_text()):
        if t.type != "fence" or t.info.strip().split(" ")[0] != "text" or t.map[0] + 1 in outputs:
            continue
        before = next((ln for ln in reversed(lines[: t.map[0]]) if ln.strip()), "")
        if bool(SHOWN_BY.search(before)) == shown_elsewhere:
            blocks.append((t.map[0] + 1, t.content))
    return blocks


def test_blocks_shown_by_other_tests_are_checked_there() -> None:
    """A ``shown by`` marker names a test file that reads the page it sits on."""
    for page in ERROR_PAGES:
        for match in SHOWN_BY.finditer(page.read_text()):
            test_file = ROOT / match.group(1)
            assert test_file.exists(), match.group(0)
            assert page.name in test_file.read_text(), f"{test_file.name} does not read {page.name}"


def test_error_texts_on_the_pages_are_what_the_code_says(docs_shell, tmp_path) -> None:
    """Each error text shown on its own is what mpmagic says in that case (with
    ``<how it ended>`` and ``...`` standing for the parts that vary)."""
    ip = docs_shell
    if getattr(pool_module.current_pool(), "name", None) != "local":
        mpmagic.use_local(2)
    mpmagic.get_pool().wait_ready()
    ip.user_ns["MARK"] = str(tmp_path / "died")
    xs = list(range(20_000))
    xs[777] = -1
    ip.user_ns["xs"] = xs
    ip.run_cell(ERROR_SETUP, store_history=False)
    shown = []
    try:
        for code in ERROR_CASES:
            with capture_output() as cap:
                result = ip.run_cell(code, store_history=False)
            shown.append(what_it_showed(cap, result.error_before_exec or result.error_in_exec))
        # "interrupt kernel" during a run: SIGINT to this process half a second in.
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with capture_output() as cap:
                result = ip.run_cell("%pmap -q spin, range(4)", store_history=False)
        finally:
            timer.cancel()
        shown.append(what_it_showed(cap, result.error_in_exec))
    finally:
        ip.run_cell("conn.close()", store_history=False)
    everything = "\n".join(shown)
    wrong = []
    checked = 0
    for page in ERROR_PAGES:
        for line, text in standalone_error_blocks(page):
            checked += 1
            missing = shown_lines_missing(PLACEHOLDER.sub("...", text), everything, example=False)
            wrong += [f"{page.relative_to(ROOT)}:{line}: {m}" for m in missing]
    assert checked >= 11, checked  # every block of both pages, none skipped
    assert not wrong, "error texts shown that the code does not give:\n" + "\n".join(wrong) + f"\n--- it gave:\n{everything}"


# Messages the troubleshooting page's tables quote (in `code`), each with the cell that
# gives it, run in this order: the quoted text, a code span of a table row found by how
# it begins, must be what the cell shows (``...`` for any text; the number after
# "worker " for any worker, whose ids differ from session to session). None: a cell
# run for the next ones only.
TABLE_CASES: list[tuple[str, str | None]] = [
    ("%pool bogus", "%pool: unknown subcommand 'bogus'"),
    ("%pool stauts", "unknown subcommand 'stauts'"),
    ("import weakref\nclass Registry:\n    instances = weakref.WeakValueDictionary()\n\ndef f(x):\n    return Registry\n\n"
     "%pmap -q f, [1]", "cannot send the function to the workers: `f -> Registry"),
    ("%pool resize 2 --gpus 0,1", "--gpus goes with start"),
    ("%%parallel -n 2 -q --reduce\nrank", "%%parallel: argument --reduce"),
    ("%%parallel -n 2 -q --reduce ''\nrank", "%%parallel: --reduce needs"),
    ("%%parallel -n 1 -q\nimport threading\nthreading.Lock()", "rank 0: its last value"),
    ("%pmap --seed -1 abs, [1]", "%pmap: argument --seed"),
    ("import mpmagic\nmpmagic.pmap(abs, [1], seed=-1)", "seed must be"),
    ("def fails_at_1(x):\n    return 1 / (x - 1)\n\n_ = %pmap -q --seed 3 --errors collect fails_at_1, range(3)",
     None),
    ("%pmap --rerun-failed", "the last run used seed="),
    ("%pmap -n 0 abs, range(3)", "argument -n/--workers"),
    ("%pmap -q —compare abs, [1]", "'—compare' starts with an em dash"),
    ("%pmap # abs, [1]", "%pmap: missing FUNC and ITERABLE"),
    ("%pmap --retries -1 abs, range(3)", "argument --retries"),
    ("%%pool setup\npath = 'model.bin'\nmodel = open(path, 'rb').read()", "setup failed on worker 3, %%pool setup"),
    ("%pool setup clear", None),
    ("%%parallel -n 2 -q --gather x\ny = rank", "NameError: gather="),
    ("%pdebug", "the rank's code ran to its end"),
    # (a thread waits inside the generator `gen`, as a second run reading it ahead would)
    ("import itertools, threading, mpmagic\ninside, release = threading.Event(), threading.Event()\n"
     "def gen(n):\n    yield from range(3)\n    inside.set()\n    release.wait(60)\n    yield from range(3, n)\n"
     "g = gen(10)\nholder = threading.Thread(target=lambda: list(itertools.islice(g, 4)))\nholder.start()\n"
     "assert inside.wait(30)", None),
    ("mpmagic.pmap(abs, g)", "argument 2 of map (the generator"),
    ("release.set()\nholder.join()", None),
    ("def shell_in_task(x):\n    !ls\n    return x\n\n_ = %pmap -q shell_in_task, [1]", "TaskShellError: !ls cannot"),
]


def table_code_spans(page: Path) -> list[str]:
    """The text of every code span in the rows of a page's tables."""
    spans, in_row = [], False
    for tok in _md.parse(page.read_text()):
        if tok.type in ("tr_open", "tr_close"):
            in_row = tok.type == "tr_open"
        elif in_row and tok.type == "inline":
            spans += [c.content for c in tok.children or [] if c.type == "code_inline"]
    return spans


def test_messages_quoted_in_the_tables_are_what_the_code_says(docs_shell) -> None:
    """A table row quoting a message (``%pool: argument action: invalid choice``, long
    after the message had changed) is what the code says now, for the cases above."""
    ip = docs_shell
    spans = table_code_spans(DOCS / "troubleshooting.md")
    wrong = []
    try:
        for code, start in TABLE_CASES:
            with capture_output() as cap:
                result = ip.run_cell(code, store_history=False)
            if start is None:
                continue
            shown = what_it_showed(cap, result.error_before_exec or result.error_in_exec)
            quoted = [span for span in spans if span.startswith(start)]
            if len(quoted) != 1:
                wrong.append(f"{start!r}: {len(quoted)} quotes in troubleshooting.md begin so, not 1")
                continue
            text = re.sub(r"\bworker \d+\b", "worker ...", quoted[0])
            if shown_lines_missing(text, re.sub(r"\bworker \d+\b", "worker ...", shown), example=False):
                wrong.append(f"{code!r} quoted as {quoted[0]!r}, but it shows:\n{shown}")
    finally:
        ip.run_cell("%pool setup clear", store_history=False)
    assert not wrong, "messages the troubleshooting tables quote that the code does not give:\n" + "\n".join(wrong)


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
    anchors_of = functools.cache(anchors)  # (each page parsed once, not again for each link to it)
    for page in PAGES:
        for line, href in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", href):  # http:, https:, mailto: ...
                continue
            path, _, anchor = href.partition("#")
            target = (page.parent / unquote(path)).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{line}: {href}"
            if not target.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors_of(target):
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
