"""The built wheel works on its own: installed (not editable) in a fresh venv.

A checkout hides packaging mistakes: a module left out of the wheel, a data
file (the forkserver preload module, ``py.typed``) not shipped, an import of a
package that is only a test or extra dependency. So the wheel is built once
from a copy of the sources, installed into a new virtual environment with its
runtime dependencies only (pip's cache makes that a few seconds after the
first time), and a script there loads the extension in an InteractiveShell and
runs ``%pmap`` on forkserver workers. The same venv proves that the optional
extras stay optional: without dask and matplotlib, ``%pool dask`` and the
``--scaling`` plot say which extra to install, in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What the fresh venv runs: a notebook-like shell, the magics, forkserver workers.
SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    from IPython.core.interactiveshell import InteractiveShell

    import mpmagic
    ip = InteractiveShell.instance(colors="nocolor")
    out = {"file": mpmagic.__file__}

    def run(code):
        r = ip.run_cell(code, store_history=False)
        err = r.error_before_exec or r.error_in_exec
        return r.result, (f"{type(err).__name__}: {err}" if err else None)

    run("%load_ext mpmagic")
    out["start"] = run("%pool start -n 2 --start-method forkserver")[1]
    run("def cube(x):\\n    return x ** 3")
    out["pmap"] = run("%pmap -q cube, range(20)")
    out["status"] = str(mpmagic.pool_status())
    out["missing"] = {m: importlib.util.find_spec(m) is None
                      for m in ("dask", "distributed", "matplotlib", "ipywidgets", "pandas", "numpy")}
    out["dask"] = run("%pool dask")[1]
    import io, contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ip.run_cell("%pmap --scaling -n 2 cube, range(40)", store_history=False)
    out["scaling"] = buf.getvalue()
    ip.run_cell("%pool stop", store_history=False)
    print("RESULT " + json.dumps(out, default=str))
    """
)


def _sources(dest: Path) -> Path:
    """A copy of what the build needs, so that building leaves nothing in the checkout."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "mpmagic", dest / "mpmagic", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """What ``python -m build`` does (the sdist, then the wheel from that sdist,
    in an isolated environment holding only the build requirements the
    pyproject declares), checked by twine.

    With build's own API rather than its command, so that both are built in one
    isolated environment: the command makes a second one for the wheel, the
    same requirements installed again (seconds).
    """
    pytest.importorskip("build", reason="needs the test extra: pip install 'mpmagic[test]'")
    import tarfile

    import build
    import build.env

    src = _sources(tmp_path_factory.mktemp("src"))
    dist = tmp_path_factory.mktemp("dist")
    unpacked = tmp_path_factory.mktemp("sdist")
    with build.env.DefaultIsolatedEnv() as env:
        builder = build.ProjectBuilder.from_isolated_env(env, src)
        env.install(builder.build_system_requires)
        env.install(builder.get_requires_for_build("sdist"))
        sdist = builder.build("sdist", dist)
        with tarfile.open(sdist) as archive:
            archive.extractall(unpacked, filter="data")
        [root] = unpacked.iterdir()
        builder = build.ProjectBuilder.from_isolated_env(env, root)
        env.install(builder.get_requires_for_build("wheel"))
        builder.build("wheel", dist)
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    return wheels[0]


def test_the_wheel_ships_every_module_and_the_typing_marker(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mpmagic").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert "mpmagic/py.typed" in names
    assert "mpmagic/forkserver_preload.py" in names
    assert not any(n.startswith(("tests/", "examples/", "docs/")) for n in names)


def test_the_wheel_runs_pmap_in_a_fresh_venv_with_runtime_dependencies_only(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    # No pip inside the new venv: this interpreter's pip installs into it
    # (``pip --python``), which saves the ~3 s of bootstrapping a pip there.
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["MPMAGIC_PRESTART"] = "0"
    # --no-compile: pip would byte-compile every installed module (IPython, jedi...,
    # seconds); the script compiles the ones it imports, as any first import does.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--disable-pip-version-check", "--no-compile", str(wheel)],
                   check=True, env=env, timeout=300, capture_output=True)
    done = subprocess.run([str(python), "-c", SCRIPT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    out = json.loads(lines[-1].removeprefix("RESULT "))

    assert Path(out["file"]).is_relative_to(env_dir), out["file"]  # the wheel's copy, not the checkout
    assert out["start"] is None, out["start"]
    assert out["pmap"] == [[x**3 for x in range(20)], None], out["pmap"]
    assert "forkserver" in out["status"], out["status"]
    # Runtime dependencies only: none of the extras came along.
    assert all(out["missing"].values()), out["missing"]
    # The features that need an extra say which one, in one line.
    # One line says what is missing and which extra brings it; the usage line follows, as for every usage error.
    first, *rest = out["dask"].splitlines()
    assert 'pip install "mpmagic[dask]"' in first and all(line.startswith("usage: %pool") for line in rest), out["dask"]
    assert 'pip install "mpmagic[plot]"' in out["scaling"], out["scaling"]
