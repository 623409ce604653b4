"""The session's end (conftest.py ``pytest_sessionfinish``) fails a run that left a
process behind: in one pytest process, and under pytest-xdist, whose test processes'
exit status alone does not fail the run (``python3 dev.py test`` runs two)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("processes", [["-p", "no:xdist"], ["-n", "2"]], ids=["one process", "xdist"])
def test_a_process_a_test_left_running_fails_the_run_and_is_named(tmp_path, processes):
    pid_file = tmp_path / "pid"
    env = {**os.environ, "MPMAGIC_TESTS_PROBE_PID_FILE": str(pid_file), "MPMAGIC_TESTS_LEFT_WAIT": "0.5"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *processes,
             str(TESTS / "session_probe_left_process.py")],
            cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=120,
        )
        pid = int(pid_file.read_text())
        assert done.returncode == 1, done.stdout + done.stderr
        assert "1 passed" in done.stdout  # (the test passed: the session's end failed the run)
        assert "LEAKED PROCESSES after the test session" in done.stdout and str(pid) in done.stdout, done.stdout
        assert "time.sleep(120)" in done.stdout
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_notebook_names_a_module_made_are_its_own_even_as_modules_interleave():
    """conftest.py's ``_notebook_names_of_this_module_only``: a name one test file
    leaves in the session's shell is no later file's notebook global (a ``%%pool
    setup`` of the same name would see it, as serially), and is still there for the
    file's own later tests, though pytest ran another file's tests in between."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "no:xdist",
         str(TESTS / "session_probe_names_a.py"), str(TESTS / "session_probe_names_b.py")],
        cwd=TESTS.parent, env={**os.environ, "MPMAGIC_TESTS_LEFT_WAIT": "0.5"},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and "6 passed" in done.stdout, done.stdout + done.stderr
    ran = [line.split("::")[1].split()[0] for line in done.stdout.splitlines() if " PASSED" in line]
    assert ran == ["test_a_binds[forkserver]", "test_a_reads_its_names[forkserver]",
                   "test_b_sees_none_of_module_a[forkserver]",  # (module b between module a's tests)
                   "test_a_binds[spawn]", "test_a_reads_its_names[spawn]",
                   "test_b_sees_none_of_module_a[spawn]"], done.stdout
