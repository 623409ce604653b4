"""Each example notebook is executed once per test session, and saved for the docs site.

``tests/test_notebooks.py`` checks the outputs of an executed notebook,
``tests/test_docs_site.py`` renders the same outputs into the site: whichever
runs first executes the notebook, the other reuses that very run (executing
the five notebooks takes most of a minute). Each executed copy is also saved
in build/executed/ (docs/build_site.py), so ``python3 dev.py docs`` after a
test run executes nothing.

In a session whose tests read them, conftest.py starts executing them as the
tests begin (``test_notebooks.execute_in_background``): they run beside the
tests before theirs, and ``reuse`` waits for the one asked, or raises the error
its execution raised (a failing cell fails the test that reads it, as when that
test executed it).
"""

from __future__ import annotations

import copy
import importlib.util
from concurrent.futures import Future
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

_spec = importlib.util.spec_from_file_location("build_site", ROOT / "docs" / "build_site.py")
assert _spec and _spec.loader
build_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_site)

_session: dict[str, nbformat.NotebookNode] = {}
#: Notebooks being executed in the background (test_notebooks.execute_in_background).
_pending: dict[str, Future] = {}


def reuse(name: str) -> nbformat.NotebookNode | None:
    """The notebook executed earlier in this session, if any; one being executed in
    the background is waited for (its execution's error, if it failed, is raised)."""
    if name not in _session and name in _pending:
        _pending[name].result()  # (keep() stored it, or its error is raised here)
    return _session.get(name)


def pending(names: list[str]) -> dict[str, Future]:
    """A future for each of ``names``, for the one that executes them in the background."""
    for name in names:
        _pending[name] = Future()
    return {name: _pending[name] for name in names}


def keep(name: str, nb: nbformat.NotebookNode) -> None:
    """Remember an executed notebook for this session and save a copy for the site."""
    _session[name] = nb
    build_site.save_executed(EXAMPLES / name, copy.deepcopy(nb))
