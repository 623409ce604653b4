"""``%config MPMagic.<name> = value`` refuses a value out of range at the %config
line, in one line naming the setting, and the setting keeps its old value."""

from __future__ import annotations

import pytest
from conftest import run
from IPython.utils.capture import capture_output

from mpmagic import config


@pytest.mark.parametrize("name, bad, good", [
    ("workers", -2, 3), ("workers", 0, 3), ("chunksize", 0, 5), ("worker_threads", -5, 0),
    ("checkpoint_max_bytes", -1, 0), ("shm_threshold", 0, 4096), ("progress_delay", -1.0, 0.0),
    ("worker_max_memory", "'junk'", "'1GB'"),
    ("worker_max_memory", "'1e400'", "'1GB'"), ("worker_max_memory", "'nan'", "'1GB'"),
    ("worker_max_memory", "'0.5'", "'1GB'"),
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


def test_workers_minus_one_is_one_per_cpu_as_joblibs_n_jobs(ip):
    """joblib's n_jobs=-1 ported as MPMagic.workers = -1, %pmap -n -1, pmap(workers=-1):
    one per usable CPU / the whole pool, as leaving it out (report migrate14 finding 7)."""
    import mpmagic

    config.current().workers = 3
    config.current().workers = -1
    assert config.current().workers is None
    assert run(ip, "%pmap -q -n -1 abs, [-1, -2]") == [1, 2]
    assert mpmagic.pmap(abs, [-3], workers=-1) == [3]
    assert run(ip, "%%parallel -q -n -1\nsize") == [mpmagic.get_pool().workers] * mpmagic.get_pool().workers


def test_pool_size_minus_one_is_one_per_cpu_in_pool_start_and_resize_as_in_the_api(ip, pool2, monkeypatch):
    """%pool start -n -1, %pool resize -1 and start_pool(workers=-1) size the pool to one worker
    per usable CPU, as MPMagic.workers = -1 does; -2 stays refused, as workers=-2 is in the API."""
    import mpmagic
    from mpmagic.backends import local

    monkeypatch.setattr(local, "available_cpus", lambda: 3)  # (one more than the pool has: a change to see)
    try:
        for line in ("%pool resize -1", "%pool resize -n -1", "%pool start -n -1", "%pool restart -n -1"):
            run(ip, "%pool resize 1")
            with capture_output():
                run(ip, line)
            assert pool2.workers == 3, line
        mpmagic.start_pool(workers=1)
        mpmagic.start_pool(workers=-1)
        assert pool2.workers == 3
        for line in ("%pool start -n -2", "%pool resize -2"):
            result = ip.run_cell(line, store_history=False)
            assert "must be at least 1, not -2 (-1: one per usable CPU)" in str(result.error_in_exec), line
        # A size that looks negative but is no number (argparse took it for an option:
        # "unknown option -1GB"), as resize's N and as -n:
        for line, said in (("%pool resize -1GB", "%pool: resize N: '-1GB' is not a whole number"),
                           ("%pool start -n -1GB", "%pool: argument -n/--workers: '-1GB' is not a whole number")):
            result = ip.run_cell(line, store_history=False)
            assert str(result.error_in_exec).startswith(said), (line, str(result.error_in_exec))
        with pytest.raises(mpmagic.UsageError, match=r"at least 1 or -1 \(one per usable CPU\), not -2"):
            mpmagic.start_pool(workers=-2)
        assert pool2.workers == 3
    finally:
        mpmagic.start_pool(workers=2)


def test_pmap_runs_after_a_refused_workers_setting(ip):
    run(ip, "%config MPMagic.workers = -2")
    assert run(ip, "%pmap -q -n 2 abs, [-1, -2]") == [1, 2]


def test_a_refused_value_left_in_the_shells_config_does_not_stop_the_extension_loading(monkeypatch, capsys):
    """IPython keeps a value %config refused in the shell's config (ipython_config.py may
    hold one too): %reload_ext takes the default for it, and the other settings."""
    from traitlets.config import Config, Configurable

    shell = Configurable(config=Config({"MPMagic": {"workers": -2, "progress_delay": 2.0}}))
    shell.configurables = []
    monkeypatch.setattr(config, "_current", None)
    settings = config.register(shell)
    assert settings.workers is None and settings.progress_delay == 2.0
    assert "MPMagic.workers = -2 refused" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["workers", "chunksize", "worker_threads", "checkpoint_max_bytes"])
def test_setting_back_to_none_says_nothing(ip, caplog, name):
    """None is each of these settings' documented default: %config cross-validates
    it (update_config), and the validators' None >= 1 printed an ERROR line."""
    run(ip, f"%config MPMagic.{name} = 3")
    with capture_output() as cap:
        run(ip, f"%config MPMagic.{name} = None")
    assert getattr(config.current(), name) is None
    assert cap.stdout + cap.stderr == "" and not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("bad", ["10000", "True"])
def test_workers_out_of_the_pools_range_is_refused_at_the_config_line(ip, bad):
    """The pool refuses more than max_workers() and bools: the setting took them,
    and the next run failed with a message not naming it (later runs ignored it)."""
    from mpmagic.backends.local import max_workers

    run(ip, "%config MPMagic.workers = 1")
    with pytest.raises(Exception) as err:
        config.current().workers = eval(bad)
    said = str(err.value)
    assert config.current().workers == 1 and len(said.splitlines()) == 1
    assert f"MPMagic.workers = {bad} refused" in said and f"from 1 to {max_workers()}" in said


def test_workers_10000_in_ipython_config_is_said_and_dropped(monkeypatch, capsys):
    from traitlets.config import Config, Configurable

    shell = Configurable(config=Config({"MPMagic": {"workers": 10000}}))
    shell.configurables = []
    monkeypatch.setattr(config, "_current", None)
    assert config.register(shell).workers is None
    err = capsys.readouterr().err
    assert "MPMagic.workers = 10000 refused" in err and len(err.strip().splitlines()) == 1


def test_workers_back_to_none_is_one_per_cpu_again(ip, pool2):
    """None read as "no change" to the pool: after workers = 1, the pool stayed
    at 1 worker for good (next run, %pool stop + start)."""
    from mpmagic import pool
    from mpmagic.cpus import available_cpus

    run(ip, "%config MPMagic.workers = 1")
    run(ip, "%pmap -q abs, [-1, -2]")
    assert pool.current_pool().workers == 1
    run(ip, "%config MPMagic.workers = None")
    run(ip, "%pmap -q abs, [-1, -2]")
    assert pool.current_pool().workers == available_cpus()
    run(ip, "%config MPMagic.workers = 1")
    run(ip, "%config MPMagic.workers = None")
    run(ip, "%pool start")  # %pool start applies it too
    assert pool.current_pool().workers == available_cpus()


def test_the_pool_started_at_load_takes_the_profiles_settings(ip, monkeypatch):
    """The pool %load_ext starts was made with the defaults (forkserver, one per CPU)
    though ipython_config.py said spawn / 1: the first run threw it away and cold-started."""
    import mpmagic
    from mpmagic import pool
    from mpmagic.backends import local

    monkeypatch.setattr(local, "can_start_in_background", lambda: True)
    monkeypatch.delenv("MPMAGIC_PRESTART", raising=False)
    pool.shutdown()
    settings = config.current()
    settings.workers, settings.start_method = 1, "spawn"  # (as ipython_config.py gives them: pending)
    try:
        mpmagic._prestart_pool()
        made = pool.current_pool()
        assert (made.workers, made.start_method) == (1, "spawn")
        assert settings.pending_pool_settings() == (None, None)  # the first run keeps this pool
    finally:
        pool.shutdown()


def test_the_advice_names_the_chunksize_setting_not_an_option_never_typed(ip, pool2):
    """With %config MPMagic.chunksize = 3 and a plain %pmap, the advice said "drop --chunksize"."""
    from conftest import synthetic_report

    import mpmagic
    from mpmagic.advice import advise

    run(ip, "%config MPMagic.chunksize = 3")
    run(ip, "%pmap -q abs, range(12)")
    assert mpmagic.last_report().extra.get("chunksize_setting") is True
    run(ip, "%pmap -q --chunksize 3 abs, range(12)")  # typed: the option is named
    assert "chunksize_setting" not in mpmagic.last_report().extra

    small = dict(items=12, chunks=4, chunksize="3", wall=0.05, task_seconds=0.001)
    assert "drop --chunksize" in advise(synthetic_report(**small))
    said = advise(synthetic_report(**small, extra={"chunksize_setting": True}))
    assert "%config MPMagic.chunksize = None" in said and "--chunksize" not in said
    idle = dict(items=10, chunks=1, chunksize="100", wall=0.5, task_seconds=0.5, slowest_task=0.5,
                slowest_where="the chunk of items 0-9", extra={"chunksize_setting": True})
    said = advise(synthetic_report(**idle))
    assert "(%config MPMagic.chunksize = 100)" in said and "--chunksize" not in said


def test_a_misspelled_setting_is_said_every_time_in_one_line(ip):
    """traitlets' UserWarning for an unknown name showed once per session: a repeated
    typo then did nothing, silently."""
    for value in (2, 3):
        with capture_output() as cap:
            run(ip, f"%config MPMagic.worker = {value}")
        assert cap.stderr == ("mpmagic: Config option `worker` not recognized by `MPMagic`.  "
                              "Did you mean one of: `worker_threads, workers`?\n")
    ip.config.MPMagic.pop("worker", None)  # (%config keeps it in the shell's config)


def test_reloading_the_extension_says_no_old_complaint_again_and_keeps_the_settings_in_force(ip):
    """IPython keeps every %config line in the shell's config, and %load_ext after
    %unload_ext read them again: ``worker`` (misspelled, said at its line) was said
    three times more, and the refused values once more each, "(the default is used)"
    where the setting had kept the value set before them."""
    with capture_output():
        for line in ("worker = 2", "progress_delay = 2.5", "progress_delay = -1", "start_method = 'FORK'"):
            ip.run_line_magic("config", f"MPMagic.{line}")
    assert config.current().progress_delay == 2.5
    try:
        with capture_output() as cap:
            run(ip, "%unload_ext mpmagic")
            run(ip, "%load_ext mpmagic")
        assert cap.stdout + cap.stderr == ""
        assert config.current().progress_delay == 2.5 and config.current().start_method is None
        with capture_output() as cap:  # (a name still misspelled at a new line is said there, once)
            ip.run_line_magic("config", "MPMagic.worker = 3")
        assert cap.stderr.count("Config option `worker` not recognized") == 1, cap.stderr
    finally:
        ip.config.MPMagic.pop("worker", None)
        ip.config.MPMagic.pop("progress_delay", None)
        ip.config.MPMagic.pop("start_method", None)


def test_an_unknown_name_beside_a_refused_value_in_ipython_config_is_said_once(monkeypatch, capsys):
    from traitlets.config import Config, Configurable

    shell = Configurable(config=Config({"MPMagic": {"worker": 2, "workers": -2}}))
    shell.configurables = []
    monkeypatch.setattr(config, "_current", None)
    assert config.register(shell).workers is None
    err = capsys.readouterr().err
    assert err.count("Config option `worker` not recognized") == 1, err
    assert err.count("MPMagic.workers = -2 refused") == 1 and len(err.strip().splitlines()) == 2, err


@pytest.mark.parametrize("value, limit", [(0, None), (2_000_000_000, 2_000_000_000), ("2GB", 2 * 10**9),
                                          (1.5e9, 1_500_000_000), ("0", None), (None, None)])
def test_worker_max_memory_takes_bytes_as_start_pool_does(ip, value, limit):
    """troubleshooting.md: the setting takes bytes or a size with a unit, and 0 is no
    limit, as start_pool(max_memory=0) does; `%config MPMagic.worker_max_memory = 0`
    was refused with traitlets' "expected a unicode string, not the int 0"."""
    from mpmagic import pool

    with capture_output() as cap:
        run(ip, f"%config MPMagic.worker_max_memory = {value!r}")
    assert cap.stdout + cap.stderr == ""
    assert config.current().worker_max_memory == value
    assert pool._max_memory == limit == pool.parse_memory(value)


@pytest.mark.parametrize("bad", [-1, 0.5, float("nan"), True, [1]])
def test_worker_max_memory_refuses_what_start_pool_refuses_with_its_words(ip, bad):
    """The refusal names the setting and gives start_pool's own reason, in one line."""
    import mpmagic
    from mpmagic import pool

    config.current().worker_max_memory = "1GB"
    with pytest.raises(mpmagic.UsageError) as api:
        pool.parse_memory(bad)
    with pytest.raises(Exception) as err:
        config.current().worker_max_memory = bad
    said = str(err.value)
    assert config.current().worker_max_memory == "1GB" and pool._max_memory == 10**9
    assert f"MPMagic.worker_max_memory = {bad!r} refused" in said and str(api.value) in said
    assert len(said.splitlines()) == 1
