"""Run by tests/test_session_checks.py with session_probe_names_b.py (not collected:
no ``test_`` prefix): the notebook names this module's tests and module-scoped fixture
make are seen by its later tests, even after module b's tests ran between them (pytest
groups tests by the session-scoped ``method``), and by none of module b's."""

import pytest


@pytest.fixture(scope="module")
def a_fixture_names(ip):
    ip.run_cell("a_fixture = 'a'", store_history=False)


def test_a_binds(ip, method, a_fixture_names):
    ip.run_cell(f"mine = 'a'\nshared = 'a'\na_{method} = True", store_history=False)


def test_a_reads_its_names(ip, method):
    assert ip.user_ns["mine"] == "a" and ip.user_ns["shared"] == "a" and ip.user_ns["a_fixture"] == "a"
    if method == "spawn":  # (bound in the forkserver group, before module b's tests ran)
        assert ip.user_ns["a_forkserver"] is True
