"""Run by tests/test_session_checks.py with session_probe_names_a.py (see there)."""


def test_b_sees_none_of_module_a(ip, method):
    assert not {"shared", "a_fixture", "a_forkserver", "a_spawn"} & set(ip.user_ns), sorted(ip.user_ns)
    assert ip.user_ns.get("mine", "b") == "b"  # (its own, from its forkserver test, or none)
    if method == "spawn":
        assert ip.user_ns["b_forkserver"] is True
    ip.run_cell(f"mine = 'b'\nb_{method} = True", store_history=False)
