"""Build the documentation site (docs/ pages + executed example notebooks) into site/.

    python docs/build_site.py            # what `python3 dev.py docs` runs
    python docs/build_site.py --strict   # a broken link, anchor or notebook fails the build

Why MkDocs + Material + mkdocs-jupyter, not Sphinx + myst-nb: the pages are
already plain Markdown with relative links (they read well on GitHub too), and
MkDocs takes them as they are; Sphinx would need MyST directives or rewrites for
the same pages. Material gives search, dark mode and code copy buttons without
theme work; mkdocs-jupyter renders a notebook *with the outputs saved in it*
(HTML report tables, plots, progress widgets), so the site shows a real run.
Strict mode turns every warning (missing page, broken anchor) into an error.

Where the notebooks' outputs come from. The notebooks in examples/ are
committed without outputs. ``tests/test_notebooks.py`` executes each one and
saves the executed copy into ``build/executed/`` (``tests/executed_notebooks.py``)
tagged with the hash of the committed notebook; this script uses that copy
when the hash still matches and executes the notebook (nbclient, a real kernel)
only when there is none, so a test run builds the site without running any
notebook twice. A notebook that raises fails the build.

The pages are staged into ``build/site-src/`` first: the examples go next to
them, their ``../examples/`` links are rewritten to ``examples/``, and the
reference tables are regenerated from the code (docs/make_reference.py).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
EXECUTED = ROOT / "build" / "executed"
STAGE = ROOT / "build" / "site-src"
SITE = ROOT / "site"
HASH_KEY = "mpmagic_source_sha256"


def source_hash(path: Path) -> str:
    """What an executed copy must have been made from: the committed notebook's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def executed_copy(path: Path) -> Path | None:
    """The saved executed copy of the notebook at ``path``, if it matches the current source."""
    import nbformat

    copy = EXECUTED / path.name
    if not copy.exists():
        return None
    nb = nbformat.read(copy, as_version=4)
    return copy if nb.metadata.get(HASH_KEY) == source_hash(path) else None


def save_executed(path: Path, nb: object) -> Path:
    """Save an executed notebook for the site, tagged with its source's hash."""
    import nbformat

    EXECUTED.mkdir(parents=True, exist_ok=True)
    nb.metadata[HASH_KEY] = source_hash(path)  # type: ignore[attr-defined]
    out = EXECUTED / path.name
    nbformat.write(nb, out)
    return out


def execute(path: Path, timeout: int = 240) -> Path:
    """Run the notebook in a fresh kernel (raises on a failing cell) and save it."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # A cell's last outputs are waited for 30 s after its reply (nbclient's 4 s can drop a
    # final print on a loaded machine), and outputs still missing then are an error.
    NotebookClient(nb, timeout=timeout, kernel_name="python3", iopub_timeout=30, raise_on_iopub_timeout=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return save_executed(path, nb)


def stage(log: list[str]) -> None:
    """Copy the pages and the executed notebooks into build/site-src/."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
    (STAGE / "examples").mkdir(parents=True)
    sys.path.insert(0, str(DOCS))
    import make_reference

    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        if page.name == "reference.md":
            text = make_reference.render(text)  # from the code, as the tests check it
        text = re.sub(r"\]\(\.\./examples/", "](examples/", text)
        (STAGE / page.name).write_text(text)
    for notebook in sorted(EXAMPLES.glob("*.ipynb")):
        copy = executed_copy(notebook)
        if copy is None:
            t0 = time.perf_counter()
            copy = execute(notebook)
            log.append(f"executed {notebook.name} in {time.perf_counter() - t0:.1f} s")
        else:
            log.append(f"reused the executed {notebook.name}")
        shutil.copy2(copy, STAGE / "examples" / notebook.name)


class BuildFailed(Exception):
    """MkDocs stopped (in strict mode, on a warning); ``log`` holds what it said."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


def build(strict: bool = False, site: Path = SITE) -> list[str]:
    """Stage and build into ``site``; returns what it did. Raises BuildFailed when mkdocs fails.

    MkDocs runs in this process, not as ``python -m mkdocs``: its start (the
    plugins import jupytext, nbconvert and jsonschema) took longer than
    building the pages, and a second build in the same process (the tests
    build twice) pays it once.
    """
    import logging
    import os

    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    from mkdocs.exceptions import MkDocsException

    log: list[str] = []
    t0 = time.perf_counter()
    stage(log)
    # mkdocs.yml with this stage as docs_dir (tests stage elsewhere): a config that inherits it.
    config = STAGE.parent / (STAGE.name + ".mkdocs.yml")
    config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {STAGE}\n")
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(f"{record.levelname} - {record.getMessage()}")  # type: ignore[method-assign]
    logger = logging.getLogger("mkdocs")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    cwd = os.getcwd()
    os.chdir(ROOT)  # mkdocs-jupyter keeps its cache in .cache/ of the working directory
    try:
        mkdocs_build(load_config(str(config), site_dir=str(site), strict=strict))
    except (MkDocsException, SystemExit) as exc:  # Abort (strict mode), a bad config, a plugin's error
        raise BuildFailed(f"mkdocs build failed: {exc}", "\n".join([*said, str(exc)])) from None
    finally:
        os.chdir(cwd)
        logger.removeHandler(handler)
        logger.setLevel(level)
    log.append(f"built {site} in {time.perf_counter() - t0:.1f} s")
    return log


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="warnings (broken links...) fail the build")
    opts = parser.parse_args(argv)
    try:
        log = build(opts.strict)
    except BuildFailed as exc:
        print(exc.log)
        return 1
    print("\n".join(log))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
