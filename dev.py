#!/usr/bin/env python3
"""Set up mpmagic and run its demo or its whole test suite, with only Python 3.

    python3 dev.py demo    # make .venv, install mpmagic with its extras, run the demo
    python3 dev.py test    # the same set-up, then ruff, mypy, the import contracts and the whole test suite (CI runs this)
    python3 dev.py docs    # the same set-up, then the documentation site into site/

Extra arguments after ``test`` go to pytest (``python3 dev.py test -k pmap``).
The virtual environment is reused; it is reinstalled when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")


def sh(*cmd: object, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def ensure_env() -> None:
    """Create .venv and install mpmagic[all] into it (again if pyproject changed)."""
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=VENV.exists()).create(VENV)
    stamp = VENV / ".mpmagic-install-stamp"
    # compat: the editable install is a plain path entry (.pth), which mypy and other
    # type checkers follow; setuptools' default import hook hides the package from them
    # ("Cannot find implementation or library stub for module named mpmagic").
    install = ("-m", "pip", "install", "--quiet", "--config-settings", "editable_mode=compat", "-e", ".[all]")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + repr(install).encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != want:
        sh(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
        sh(PY, *install)
        stamp.write_text(want)


def ensure_browser() -> None:
    """The browser test needs Debian's chromium; install it where we can."""
    script = ROOT / ".ci" / "setup-browser.sh"
    if script.exists() and shutil.which("bash"):
        sh("bash", script)


def demo() -> int:
    ensure_env()
    return subprocess.call([str(PY), str(ROOT / "examples" / "demo.py")], cwd=ROOT)


def test(args: list[str]) -> int:
    ensure_env()
    ensure_browser()
    sh(PY, "-m", "ruff", "check", "mpmagic", "tests", "benchmarks", "examples", "dev.py")
    sh(PY, "-m", "mypy")  # configured in pyproject.toml ([tool.mypy])
    sh(BIN / "lint-imports")  # the import contracts in pyproject.toml ([tool.importlinter])
    return subprocess.call([str(PY), "-m", "pytest", *PYTEST_PROCESSES, *args], cwd=ROOT)


#: The suite waits far more than it computes (workers and kernels start, items sleep,
#: timeouts run out): two pytest processes (pytest-xdist), each test file in one of them
#: with its tests in their usual order, take ~7 minutes where one takes ~10.5 on a
#: 2-core machine. ``python3 dev.py test -n 0`` runs it in one process. A test that hangs
#: past its timeout ends its process (pyproject.toml): the run stops there and says which
#: test (xdist would start another process to run the test's file again, and hang again).
PYTEST_PROCESSES = ["-n", "2", "--dist", "loadfile", "--max-worker-restart", "0"]


def docs() -> int:
    """Build the documentation site into site/ (docs/build_site.py says how)."""
    ensure_env()
    return subprocess.call([str(PY), str(ROOT / "docs" / "build_site.py")], cwd=ROOT)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "docs"):
        print(__doc__)
        return 2
    if argv[0] == "demo":
        return demo()
    if argv[0] == "docs":
        return docs()
    return test(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
