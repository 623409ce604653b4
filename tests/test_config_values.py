"""``%config MPMagic.<name> = value`` refuses a value out of range at the %config
line, in one line naming the setting, and the setting keeps its old value."""

from __future__ import annotations

import pytest
from conftest import run
from IPython.utils.capture import capture_output

from mpmagic import config


@pytest.mark.parametrize("name, bad, good", [
    ("workers", -1, 3), ("workers", 0, 3), ("chunksize", 0, 5), ("worker_threads", -5, 0),
    ("checkpoint_max_bytes", -1, 0), ("shm_threshold", 0, 4096), ("progress_delay", -1.0, 0.0),
    ("worker_max_memory", "'junk'", "'1GB'"),
])
def test_a_bad_value_is_refused_and_the_old_one_stays(ip, name, bad, good):
    run(ip, f"%config MPMagic.{name} = {good}")
    before = getattr(config.current(), name)
    with capture_output() as cap:
        run(ip, f"%config MPMagic.{name} = {bad}")
    said = cap.stdout + cap.stderr
    assert getattr(config.current(), name) == before
    if not said:  # %config logs it (logging, not the captured streams): ask the trait directly
        with pytest.raises(Exception) as err:
            setattr(config.current(), name, eval(str(bad)))
        said = str(err.value)
    assert f"MPMagic.{name}" in said and "refused" in said and len(said.strip().splitlines()) == 1


@pytest.mark.parametrize("name, value", [
    ("workers", None), ("chunksize", None), ("worker_threads", 0), ("worker_threads", None),
    ("checkpoint_max_bytes", None), ("checkpoint_max_bytes", 0), ("worker_max_memory", None),
    ("worker_max_memory", "0"), ("progress_delay", 0.0),
])
def test_the_documented_special_values_are_still_taken(name, value):
    setattr(config.current(), name, value)
    assert getattr(config.current(), name) == value


def test_pmap_runs_after_a_refused_workers_setting(ip):
    run(ip, "%config MPMagic.workers = -1")
    assert run(ip, "%pmap -q -n 2 abs, [-1, -2]") == [1, 2]


def test_a_refused_value_left_in_the_shells_config_does_not_stop_the_extension_loading(monkeypatch, capsys):
    """IPython keeps a value %config refused in the shell's config (ipython_config.py may
    hold one too): %reload_ext takes the default for it, and the other settings."""
    from traitlets.config import Config, Configurable

    shell = Configurable(config=Config({"MPMagic": {"workers": -1, "progress_delay": 2.0}}))
    shell.configurables = []
    monkeypatch.setattr(config, "_current", None)
    settings = config.register(shell)
    assert settings.workers is None and settings.progress_delay == 2.0
    assert "MPMagic.workers = -1 refused" in capsys.readouterr().err
