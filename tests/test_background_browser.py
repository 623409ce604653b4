"""A background run's live area in a real browser (issue 16): its progress bar
advances while another cell runs, and it ends with the report.

JupyterLab and headless Chromium as in tests/test_browser.py (its ``lab``
fixture serves ``tmp_path/notebooks``; this test writes its own notebook
there). Skipped without the browser stack, except under CI.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
from test_browser import CHROMIUM, CHROMIUM_ARGS, Lab, lab  # noqa: F401 (lab is the fixture)

CELLS = [
    "%load_ext mpmagic\n%pool start -n 2\nimport time\n"
    "def slow(x):\n    time.sleep(0.3)\n    print('bg says', x)\n    return x",
    "run = %pmap --bg slow, range(20)",
    "time.sleep(3)\n'foreground done'",
]


def test_the_live_area_advances_while_another_cell_runs(lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "notebooks" / "bg.ipynb")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{lab.base}/lab/tree/bg.ipynb?token={lab.token}", wait_until="domcontentloaded",
                      timeout=90_000)
            lab.run_all(page, 3)

            cells = page.locator(".jp-Notebook .jp-CodeCell")
            bar = cells.nth(1).locator(".mpmagic-run progress")
            bar.wait_for(timeout=60_000)
            busy = cells.nth(2).locator(".jp-InputPrompt")
            # Values of the bar seen while the third cell is running (prompt "[*]").
            seen = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                running = "*" in busy.inner_text()
                value = int(bar.get_attribute("value") or 0)
                if running:
                    seen.append(value)
                elif seen:
                    break
                time.sleep(0.2)
            assert len(set(seen)) >= 2 and seen[-1] > seen[0], seen
            page.wait_for_function(
                "document.querySelector('.mpmagic-run') && document.querySelector('.mpmagic-run')"
                ".innerText.includes('20/20 items')", polling=250, timeout=60_000)
            area = cells.nth(1).locator(".jp-OutputArea").inner_text()
            assert "done" in area and "bg says 19" in area and "speedup" in area, area
            assert "bg says" not in cells.nth(2).locator(".jp-OutputArea").inner_text()
        finally:
            browser.close()
