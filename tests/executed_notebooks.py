"""Each example notebook is executed once per test session, and saved for the docs site.

``tests/test_notebooks.py`` checks the outputs of an executed notebook,
``tests/test_docs_site.py`` renders the same outputs into the site: whichever
runs first executes the notebook, the other reuses that very run (executing
the five notebooks takes most of a minute). Each executed copy is also saved
in build/executed/ (docs/build_site.py), so ``python3 dev.py docs`` after a
test run executes nothing.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

_spec = importlib.util.spec_from_file_location("build_site", ROOT / "docs" / "build_site.py")
assert _spec and _spec.loader
build_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_site)

_session: dict[str, nbformat.NotebookNode] = {}


def reuse(name: str) -> nbformat.NotebookNode | None:
    """The notebook executed earlier in this session, if any."""
    return _session.get(name)


def keep(name: str, nb: nbformat.NotebookNode) -> None:
    """Remember an executed notebook for this session and save a copy for the site."""
    _session[name] = nb
    build_site.save_executed(EXAMPLES / name, copy.deepcopy(nb))
