"""The documentation site builds in strict mode, with the notebooks' real outputs.

``docs/build_site.py --strict`` (MkDocs + Material + mkdocs-jupyter) fails on
a broken link or anchor and on a notebook that raises. The notebooks are the
ones ``tests/test_notebooks.py`` executes: whichever test runs first executes
each one, once per session (tests/executed_notebooks.py).
"""

from __future__ import annotations

import shutil

import executed_notebooks
import nbformat
import pytest
from nbformat.v4 import new_markdown_cell, new_notebook
from test_notebooks import NOTEBOOKS, execute_all

pytest.importorskip("mkdocs", reason="needs the test extra: pip install 'mpmagic[test]'")
build_site = executed_notebooks.build_site


@pytest.fixture(scope="module")
def executed() -> None:
    """Every example notebook executed in this session (a failing cell fails here)."""
    execute_all(NOTEBOOKS, timeout=240)


def test_the_site_builds_strictly_with_every_page_and_executed_notebook(executed, tmp_path) -> None:
    site = tmp_path / "site"
    log = build_site.build(strict=True, site=site)
    assert all(f"reused the executed {name}" in log for name in NOTEBOOKS), log  # no notebook ran twice
    for page in build_site.DOCS.glob("*.md"):
        stem = "" if page.stem == "index" else page.stem + "/"
        assert (site / stem / "index.html").exists(), page.name
    quickstart = (site / "examples" / "quickstart" / "index.html").read_text()
    assert "pmap: 8 items on" in quickstart  # the timing line of the executed run
    assert "mpmagic-report" in quickstart  # its HTML report table
    assert "%pmap" in (site / "reference" / "index.html").read_text()
    for name in NOTEBOOKS:
        assert (site / "examples" / name.removesuffix(".ipynb") / "index.html").exists(), name


def test_a_broken_link_fails_the_strict_build(tmp_path, monkeypatch) -> None:
    """The real pages and mkdocs.yml plus one broken link: strict mode fails, and says which link.

    The notebooks are one-heading stand-ins, saved as their executed copies: a
    link to a page has nothing to do with a notebook's outputs, and rendering
    the executed ones is most of a full build (the test above builds those).
    """
    docs = tmp_path / "docs"
    shutil.copytree(build_site.DOCS, docs, ignore=shutil.ignore_patterns("__pycache__"))
    with (docs / "index.md").open("a") as f:
        f.write("\nSee [the missing page](no-such-page.md).\n")
    examples = tmp_path / "examples"
    examples.mkdir()
    for name in NOTEBOOKS:
        nbformat.write(new_notebook(cells=[new_markdown_cell(f"# {name}")]), examples / name)
    monkeypatch.setattr(build_site, "DOCS", docs)
    monkeypatch.setattr(build_site, "EXAMPLES", examples)
    monkeypatch.setattr(build_site, "EXECUTED", tmp_path / "executed")
    monkeypatch.setattr(build_site, "STAGE", tmp_path / "stage")
    for name in NOTEBOOKS:
        build_site.save_executed(examples / name, nbformat.read(examples / name, as_version=4))
    with pytest.raises(build_site.BuildFailed) as info:
        build_site.build(strict=True, site=tmp_path / "site")
    output = info.value.log
    warnings = [line for line in output.splitlines() if line.startswith("WARNING")]
    # The broken link is what failed it (not a stand-in notebook, nor anything else).
    assert warnings and all("no-such-page.md" in line for line in warnings), output


def test_a_notebook_that_raises_fails_the_build(tmp_path, monkeypatch) -> None:
    from nbclient.exceptions import CellExecutionError
    from nbformat.v4 import new_code_cell

    path = tmp_path / "broken.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("1 / 0")]), path)
    monkeypatch.setattr(build_site, "EXECUTED", tmp_path / "executed")
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        build_site.execute(path, timeout=60)
    assert not (tmp_path / "executed" / "broken.ipynb").exists()
