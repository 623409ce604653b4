"""The quickstart notebook in a real browser, as a new user meets it.

The test starts JupyterLab on 127.0.0.1 with a token (in its own session, on a
copy of ``examples/quickstart.ipynb`` so the repository's copy is never
saved over), opens the notebook in headless Chromium driven by Playwright,
runs every cell through the Run menu, and checks what a person sees: the
results, the timing report tables (``table.mpmagic-report``), the
rank-labelled output of ``%%parallel``, and the progress widget of the long
cell. It saves screenshots to ``artifacts/``. A second test opens a notebook
of its own there: a background run's live area advances while another cell
runs (issue 16). The two share one JupyterLab server (module scope: starting
one takes seconds); each opens its notebook in a fresh workspace and its
kernels are shut down after it.

Chromium is Debian's ``chromium`` package (``.ci/setup-browser.sh`` installs
it): Playwright's own browser downloads are not used. Without Chromium or
Playwright the test is skipped with the reason, except under CI (``CI`` set),
where it fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("MPMAGIC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# JupyterLab plugins that would reach out to the internet; not wanted in a test.
LAB_DISABLED = [
    "@jupyterlab/apputils-extension:announcements",
    "@jupyterlab/extensionmanager-extension",
]


def missing(reason: str) -> None:
    """Skip outside CI; under CI a missing browser stack is a failure, not a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure; run .ci/setup-browser.sh)")
    pytest.skip(f"{reason}; run .ci/setup-browser.sh and pip install -e '.[browser]'")


def require_browser_stack() -> None:
    """JupyterLab, Playwright and Chromium must all be here (checked before starting anything)."""
    if not Path(CHROMIUM).exists():
        missing(f"Chromium is not installed at {CHROMIUM}")
    for module, what in (("jupyterlab", "JupyterLab"), ("playwright.sync_api", "Python Playwright")):
        try:
            __import__(module)
        except ImportError:
            missing(f"{what} is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_tree(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process started in its own session and everything under it.

    Kernels that Jupyter starts are in sessions of their own, so the process
    group alone is not enough: the descendants are collected first.
    """
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


class Lab:
    """A running JupyterLab server: its base URL, token and the folder it serves."""

    def __init__(self, base: str, token: str, root: Path) -> None:
        self.base, self.token, self.root = base, token, root

    def url(self, notebook: str) -> str:
        """The notebook opened in a fresh workspace (``reset``): the server is
        shared by this module's tests, and Lab would otherwise reopen the tabs
        an earlier test left open."""
        return f"{self.base}/lab/tree/{notebook}?reset&token={self.token}"

    def shut_down_kernels(self) -> None:
        """Shut the sessions and their kernels down through the server, as closing them in Lab would."""
        try:
            for session in self.api("sessions"):
                self.api(f"sessions/{session['id']}", method="DELETE")
            for kernel in self.api("kernels"):
                self.api(f"kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass

    def api(self, path: str, method: str = "GET") -> object:
        req = urllib.request.Request(f"{self.base}/api/{path}?token={self.token}", method=method)
        with urllib.request.urlopen(req, timeout=15) as r:
            body = r.read()
        return json.loads(body) if body else None

    def kernel_idle(self) -> bool:
        """Has the notebook's kernel started and reported idle to the server?"""
        sessions = self.api("sessions")
        return any(s.get("kernel", {}).get("execution_state") == "idle" for s in sessions)

    def run_all(self, page, n_code: int) -> None:
        """Once the open notebook's ``n_code`` code cells are on the page and its
        kernel is idle, run all its cells from Lab's Run menu."""
        page.wait_for_function(
            "n => document.querySelectorAll('.jp-Notebook .jp-CodeCell').length === n",
            arg=n_code,
            polling=250,
            timeout=90_000,
        )
        deadline = time.monotonic() + 90
        while not self.kernel_idle():
            assert time.monotonic() < deadline, "the notebook's kernel did not start within 90 s"
            time.sleep(0.25)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
        page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A JupyterLab server for this module's tests (starting one takes seconds),
    stopped with its kernels after them."""
    require_browser_stack()
    tmp_path = tmp_path_factory.mktemp("lab")
    work = tmp_path / "notebooks"
    work.mkdir()
    settings = tmp_path / "lab-settings"
    tracker = settings / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    # Every cell attached to the page, so what is checked is what is rendered.
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    labconfig = tmp_path / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    # What `jupyter labextension disable` would write, in this server's own config dir.
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": dict.fromkeys(LAB_DISABLED, True)}))
    env = dict(
        os.environ,
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),  # kernelspecs still come from sys.prefix
        IPYTHONDIR=str(tmp_path / "ipython"),
        PYTHONUNBUFFERED="1",
    )
    port, token = free_port(), secrets.token_hex(16)
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
        "--ServerApp.port_retries=0", f"--ServerApp.root_dir={work}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    if os.geteuid() == 0:  # CI and these machines run as root
        cmd.append("--allow-root")
    log = (tmp_path / "jupyterlab.log").open("w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within 90 s:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.3)
        server = Lab(base, token, work)
        yield server
        server.shut_down_kernels()
    finally:
        stop_tree(proc)
        log.close()


@pytest.fixture
def lab(lab_server: Lab) -> Iterator[Lab]:
    """The module's server with a fresh copy of the quickstart; the kernels this
    test started are shut down after it, so each test starts from none."""
    shutil.copy(ROOT / "examples" / "quickstart.ipynb", lab_server.root / "quickstart.ipynb")
    yield lab_server
    lab_server.shut_down_kernels()


def test_quickstart_in_jupyterlab(lab: Lab) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    n_code = sum(cell.cell_type == "code" for cell in notebook.cells)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(lab.url("quickstart.ipynb"), wait_until="domcontentloaded", timeout=90_000)
            code_cells = page.locator(".jp-Notebook .jp-CodeCell")
            lab.run_all(page, n_code)

            # Every prompt shows a number (not "[*]" nor empty) when all cells have run;
            # if a cell fails, Lab stops there: no prompt is busy and an error is shown.
            prompts = ".jp-Notebook .jp-CodeCell .jp-InputPrompt"
            stderr = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
            try:
                page.wait_for_function(
                    """([sel, n, err]) => {
                        const p = [...document.querySelectorAll(sel)];
                        if (p.length === n && p.every(e => /\\[\\d+\\]/.test(e.textContent))) return true;
                        const busy = p.some(e => e.textContent.includes('*'));
                        return !busy && document.querySelectorAll(err).length > 0;
                    }""",
                    arg=[prompts, n_code, stderr],
                    polling=500,
                    timeout=150_000,
                )
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "quickstart-failed.png"))
                seen = page.locator(prompts).all_inner_texts()
                pytest.fail(f"the cells did not all run within 150 s; prompts: {seen}")
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=30_000)

            def cell_output(marker: str) -> str:
                cell = code_cells.filter(has_text=marker).first
                return cell.locator(".jp-OutputArea").inner_text()

            text = page.locator(".jp-Notebook").inner_text()
            errors = page.locator(stderr).all_inner_texts()
            assert not errors, "a cell wrote to stderr or failed:\n" + "\n".join(errors)
            assert all(re.search(r"\[\d+\]", t) for t in page.locator(prompts).all_inner_texts())
            # The results a person reads.
            assert "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in text
            assert "ZeroDivisionError" in cell_output("--errors collect")
            spmd = cell_output("%%parallel -n 2")
            assert "[rank 0] rank 0 of 2" in spmd and "[rank 1] rank 1 of 2" in spmd
            assert "[0, 10]" in spmd
            assert "pool: local" in cell_output("%pool")

            # The timing report, rendered as a table, with its speedup row.
            reports = page.locator("table.mpmagic-report")
            assert reports.count() >= 4, f"expected a report table per run, found {reports.count()}"
            first = code_cells.filter(has_text="%pmap work, [1_000_000]").first.locator("table.mpmagic-report")
            # The report's cells, label over value: the item count is the "items" cell.
            labels = first.locator("thead th").all_inner_texts()
            values = first.locator("tbody td").all_inner_texts()
            assert len(labels) == len(values), (labels, values)
            cells = dict(zip((x.strip() for x in labels), (v.strip() for v in values), strict=True))
            assert cells.get("items") == "8", cells
            assert re.fullmatch(r"\d+ workers? \(\w+\)", cells.get("workers", "")), cells
            assert re.fullmatch(r"~\d+\.\d+x", cells.get("speedup", "")), cells  # estimated: "~1.9x"
            compared = code_cells.filter(has_text="%pmap --compare work").first.locator("table.mpmagic-report")
            assert "measured" in compared.inner_text()

            # The long cell: a progress widget that counted all 16 items, then its report.
            long_cell = code_cells.filter(has_text="long_results = %pmap").first
            # ipywidgets' progress bar (tqdm's notebook widget), filled to the end.
            bar = long_cell.locator(".widget-hprogress .progress-bar")
            assert bar.count() == 1, "no progress widget in the long cell"
            assert bar.evaluate("e => e.style.width") == "100%"
            assert "16/16" in long_cell.locator(".jp-OutputArea").inner_text()
            assert long_cell.locator("table.mpmagic-report").count() == 1

            first.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "quickstart-report.png"))
            long_cell.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "quickstart-progress.png"))
        finally:
            browser.close()


# A background run's live area in a real browser (issue 16): its progress bar
# advances while another cell runs, and it ends with the report.
BG_CELLS = [
    "%load_ext mpmagic\n%pool start -n 2\nimport time\n"
    "def slow(x):\n    time.sleep(0.3)\n    print('bg says', x)\n    return x",
    "run = %pmap --bg slow, range(20)",
    "time.sleep(3)\n'foreground done'",
]


def test_the_live_area_advances_while_another_cell_runs(lab: Lab) -> None:
    from playwright.sync_api import sync_playwright

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in BG_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, lab.root / "bg.ipynb")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(lab.url("bg.ipynb"), wait_until="domcontentloaded", timeout=90_000)
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
