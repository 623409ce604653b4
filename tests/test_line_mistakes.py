"""Mistakes in a magic's line print the one-line usage error and nothing else,
whichever way an option is spelled; ``--help`` / ``-h`` show the magic's help."""

from __future__ import annotations

import pytest
from IPython.utils.capture import capture_output

from mpmagic import api


def error_of(ip, cell: str) -> tuple[BaseException | None, str, int]:
    """The cell's error, what it printed, and how many displays it showed."""
    with capture_output() as cap:
        result = ip.run_cell(cell, store_history=False)
    return result.error_in_exec, cap.stdout + cap.stderr, len(cap.outputs)


def test_pmap_over_the_machines_cap_shows_no_report_of_a_run(ip):
    ip.run_cell("%pool start -n 1", store_history=False)
    before = api.last_report()
    err, said, shown = error_of(ip, "%pmap -n 100000 abs, [1, 2, 3]")
    assert "100000 is more processes than this machine can run" in str(err)
    assert api.last_report() is before and shown == 0 and "stopped by" not in said
