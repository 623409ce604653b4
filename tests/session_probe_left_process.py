"""A test that leaves a process running: run alone by tests/test_session_checks.py
(its name does not start with ``test_``: the suite never collects it) to check that
the session's end (conftest.py ``pytest_sessionfinish``) fails such a run."""

import os
import subprocess
import sys
from pathlib import Path


def test_leaves_a_process_running():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    Path(os.environ["MPMAGIC_TESTS_PROBE_PID_FILE"]).write_text(str(child.pid))
