"""The notebook experience: progress bars, %config settings, the report and its
advice, --scaling and --insights, and the %pool status in HTML.

Everything runs through the magics in a notebook-like shell (``ip``), with
functions defined by ``run_cell`` so they live in a file-less ``__main__``.
"""

from __future__ import annotations

import html
import io
import os
import re
import sys
import time
from html.parser import HTMLParser

import IPython.lib.pretty
import pytest
from conftest import ensure_pool, run, synthetic_report
from IPython.utils.capture import capture_output
from tqdm.std import tqdm as std_tqdm

import mpmagic
from mpmagic import config, progress
from mpmagic.jobs import MapJob
from mpmagic.report import Report

# -- helpers -------------------------------------------------------------------

VOID = {"br", "img", "hr", "meta", "input", "col", "wbr", "link", "source"}


class StrictHTML(HTMLParser):
    """Parses HTML and fails on a tag closed out of order or left open."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse_html(markup: str) -> StrictHTML:
    parser = StrictHTML()
    parser.feed(markup)
    parser.close()
    assert not parser.stack, f"unclosed tags: {parser.stack}"
    return parser


class RecordingBar(std_tqdm):
    """tqdm's text bar, written to a string, remembering every instance."""

    made: list[RecordingBar] = []
    touch: str | None = None  # a file each new bar creates (tasks can wait for the bar)

    def __init__(self, *args, **kwargs):
        self.out = io.StringIO()
        kwargs["file"] = self.out
        super().__init__(*args, **kwargs)
        self.closed_at: int | None = None
        self.born_at = progress.last.n if progress.last is not None else None  # items finished when it was made
        RecordingBar.made.append(self)
        if RecordingBar.touch:
            open(RecordingBar.touch, "w").close()

    def close(self):
        if self.closed_at is None:
            self.closed_at = self.n
        super().close()


@pytest.fixture
def bars(monkeypatch):
    """Progress bars made during the test, instead of bars on the terminal."""
    RecordingBar.made = []
    monkeypatch.setattr(RecordingBar, "touch", None)
    monkeypatch.setattr(progress, "_tqdm_class", lambda: RecordingBar)
    return RecordingBar.made


@pytest.fixture
def settings():
    """The shell's %config MPMagic settings, reset to their defaults afterwards."""
    yield config.current()
    config.current().reset()


@pytest.fixture
def pool2(ip):
    """A warm 2-worker forkserver pool (so no run pays for starting workers)."""
    backend = ensure_pool("forkserver")
    backend.wait_ready()
    run(ip, "import time\ndef sq(x):\n    return x * x\ndef nap(s):\n    time.sleep(s)\n    return s\n")
    return backend


def displayed(captured) -> list[dict]:
    return [o.data for o in captured.outputs]


# -- progress ------------------------------------------------------------------


def test_progress_counts_items_not_chunks(ip, backend, settings, bars):
    """10,000 items in 37 chunks: the bar ends at 10,000 of 10,000, with rate and ETA."""
    run(ip, "def sq(x):\n    return x * x\n")
    run(ip, "%config MPMagic.progress_delay = 0")
    result = run(ip, "%pmap -q --progress --chunksize 271 sq, range(10_000)")
    assert result == [x * x for x in range(10_000)]
    assert mpmagic.last_report().chunks == 37
    assert len(bars) == 1
    bar = bars[0]
    assert bar.total == 10_000
    assert bar.closed_at == 10_000
    assert progress.last.closed and progress.last.outcome == "done"
    shown = bar.out.getvalue()
    assert "10000/10000" in shown
    assert "item/s" in shown  # the rate ...
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", shown)  # ... and elapsed<time left


def test_progress_counts_ranks_of_a_cell(ip, pool2, settings, bars):
    run(ip, "%config MPMagic.progress_delay = 0")
    run(ip, "%%parallel -n 2 -q --progress\nrank\n")
    assert len(bars) == 1 and bars[0].total == 2 and bars[0].closed_at == 2


def test_progress_closed_after_an_exception(ip, pool2, settings, bars):
    run(ip, "def boom(x):\n    if x == 900:\n        raise ValueError('bad item')\n    return x\n")
    run(ip, "%config MPMagic.progress_delay = 0")
    with pytest.raises(ValueError, match="bad item"):
        run(ip, "%pmap -q --progress --chunksize 50 boom, range(2000)")
    assert progress.last.closed and progress.last.outcome == "error"
    assert len(bars) == 1 and bars[0].closed_at is not None and bars[0].closed_at < 2000
    assert bars[0] not in std_tqdm._instances  # tqdm's own record of open bars


def test_no_progress_bar_for_short_runs(ip, pool2, settings, bars):
    """The default delay (1 s) keeps quick runs quiet; --no-progress and the setting turn it off."""
    run(ip, "%pmap -q sq, range(200)")
    assert not progress.last.shown
    run(ip, "%config MPMagic.progress_delay = 0")
    run(ip, "%pmap -q --no-progress sq, range(200)")
    assert not progress.last.shown
    run(ip, "%config MPMagic.progress = False")
    run(ip, "%pmap -q sq, range(200)")
    assert not progress.last.shown
    assert bars == []
    run(ip, "%pmap -q --progress sq, range(200)")  # the option beats the setting
    assert progress.last.shown and len(bars) == 1


def _screen(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: ``\\r`` goes back to the line's
    start, and what follows overwrites what was there."""
    lines = []
    for raw in text.split("\n"):
        line: list[str] = []
        for part in raw.split("\r"):
            line[:len(part)] = part
        lines.append("".join(line).rstrip())
    return lines


@pytest.mark.parametrize("cell", [
    "%pmap -q --progress --chunksize 1 says, range(4)",
    "%%parallel -n 2 -q --progress\nsays(rank)\n",
])
def test_task_output_starts_its_own_line_under_a_text_bar(ip, pool2, settings, monkeypatch, cell):
    """A text bar (a terminal, Jupyter without ipywidgets) ends its line without a
    newline, and redraws it with \\r: a task's line printed meanwhile was glued to
    it, ``pmap:  17%|█▋      | 1/6 [00:01<00:05,  1.00s/item]item 2``, as IPython
    in a terminal showed it. The bar is taken off its line while output prints,
    and drawn again after it."""
    screen = io.StringIO()

    class ScreenBar(std_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, file=sys.stdout, **kwargs)  # (the same terminal as the tasks' output)

    monkeypatch.setattr(progress, "_tqdm_class", lambda: ScreenBar)
    run(ip, "def says(x):\n    print(f'said {x}')\n    return x\n")
    run(ip, "%config MPMagic.progress_delay = 0")
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    run(ip, cell)
    monkeypatch.undo()
    assert progress.last.shown  # (a bar was on the line)
    lines = _screen(screen.getvalue())
    said = [i for i, line in enumerate(lines) if "said" in line]
    assert said and all(re.fullmatch(r"(\[rank \d\] )?said \d", lines[i]) for i in said), screen.getvalue()
    [done] = [i for i, line in enumerate(lines) if re.search(r"\| ([24])/\1 \[", line)]
    assert done > said[-1], screen.getvalue()  # (the bar's last frame under the output)


#: Tasks that end only once the bar exists (or after 10 s: then the bar came too late).
UNTIL_THE_BAR = """
import os, time
def until_the_bar(path):
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return path
"""


@pytest.mark.parametrize("cell", [
    "%pmap -q --progress until_the_bar, [bar_file, bar_file]",
    "%pmap -q --compare --progress until_the_bar, [bar_file, bar_file]",
    "%%parallel -n 2 -q --progress\nuntil_the_bar(bar_file)\nrank\n",
    "%%parallel -n 2 --progress\nuntil_the_bar(bar_file)\nrank\n",
])
def test_the_bar_shows_during_a_run_whose_items_all_end_together(ip, pool2, settings, bars, cell, tmp_path):
    """Two ranks (or items) that end together after the delay: the bar was made on
    the first update after the delay, the end of the run, so nothing showed during
    it (then a bar at 1/2 and 2/2 at once; at 2/2 when both came in one update).
    It is made as the delay is over, at the count so far: here the tasks end only
    once it exists, so it must have been made at 0 of 2."""
    RecordingBar.touch = ip.user_ns["bar_file"] = str(tmp_path / "bar")
    run(ip, UNTIL_THE_BAR)
    run(ip, "%config MPMagic.progress_delay = 0.1")
    with capture_output():
        run(ip, cell)
    assert len(bars) == 1 and bars[0].total == 2
    assert bars[0].born_at == 0 and bars[0].closed_at == 2 and progress.last.outcome == "done"


def test_finished_notebook_bars_release_their_widgets_beyond_the_last_few(ip, pool2, settings, monkeypatch, tmp_path):
    """tqdm's notebook bar is ipywidgets (11 per bar), which the kernel keeps registered
    (ipywidgets' registry, its comms) until they are closed: every run that showed a bar
    kept them for good. The last KEEP_WIDGET_BARS finished bars stay live widgets; an older
    one's output is replaced by its still copy (its final text and bar, as HTML), then its
    widgets are closed: after many runs the registry holds the kept bars' widgets only."""
    pytest.importorskip("ipywidgets")
    import tqdm.notebook
    from ipywidgets.widgets import widget as ipywidget

    class WidgetBar(tqdm.notebook.tqdm):  # the bar tqdm.auto gives in Jupyter with ipywidgets
        touch = ""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            open(WidgetBar.touch, "w").close()  # (the tasks end once the bar exists: never born full)

    monkeypatch.setattr(progress, "_tqdm_class", lambda: WidgetBar)
    monkeypatch.setattr(progress, "_widget_bars", progress.deque())  # (this test's bars only)
    run(ip, UNTIL_THE_BAR)
    run(ip, "%config MPMagic.progress_delay = 0")
    kept = progress.KEEP_WIDGET_BARS
    before = set(ipywidget._instances)
    runs = kept + 15
    with capture_output() as cap:
        for i in range(runs):
            WidgetBar.touch = ip.user_ns["bar_file"] = str(tmp_path / f"bar{i}")
            assert run(ip, "%pmap -q --progress until_the_bar, [bar_file, bar_file]") == [WidgetBar.touch] * 2
            assert progress.last.shown and progress.last.outcome == "done"
            assert len(progress._widget_bars) == min(i + 1, kept)
    try:
        shown = [o for o in cap.outputs if not o.update]
        updates = [o for o in cap.outputs if o.update]
        assert len(shown) == runs, [o.data.keys() for o in shown]
        bars = [o.data["application/vnd.jupyter.widget-view+json"]["model_id"] for o in shown]
        ids = [o.transient["display_id"] for o in shown]
        # The registry: the kept bars' widgets, nothing of the older ones.
        added = set(ipywidget._instances) - before
        assert added == {w.model_id for _, widgets, _ in progress._widget_bars for w in widgets}
        assert len(added) == kept * 11
        assert not set(bars[:-kept]) & added and set(bars[-kept:]) <= added
        # Each retired bar's output became its still copy, in its place (by its display id), at 2 of 2.
        assert [o.transient["display_id"] for o in updates] == ids[:-kept]
        for still in updates:
            assert re.fullmatch(r"pmap: 100% 2/2 \[.*item/s\]", still.data["text/plain"]), still.data
            assert "<progress value='2' max='2'" in still.data["text/html"] and "2/2" in still.data["text/html"]
            StrictHTML().feed(still.data["text/html"])
    finally:
        for entry in list(progress._widget_bars):
            progress._retire(*entry)


def test_no_bar_is_born_full():
    """A bar due once the run is over, or once all its items finished, is not made."""
    for ended in (True, False):
        bar = progress.Progress(2, delay=0.0)
        bar.update(2)  # (the update path: a run driven by the waiting thread, as Dask's)
        bar.show(ended=ended)
        assert not bar.shown and bar.bar is None
    bar = progress.Progress(2, delay=0.0)
    bar.show(ended=True)
    assert not bar.shown
    bar = progress.Progress(None, delay=0.0)  # (an input of unknown length: the bar when due)
    assert bar.due_in() == 0.0
    bar.close()
    assert bar.due_in() is None


def test_a_kernel_without_ipywidgets_gets_a_text_bar_and_one_line_of_ours(monkeypatch, capsys):
    """tqdm.auto printed its own warning on the first bar ("TqdmWarning: IProgress not
    found. Please update jupyter and ipywidgets", under a site-packages path) where
    the README promises that mpmagic says what to install."""
    import types
    import warnings

    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))  # a kernel
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # (import ipywidgets raises ImportError)
    for name in ("tqdm.auto", "tqdm.autonotebook", "tqdm.notebook"):  # as in a fresh kernel: not imported yet
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in [n for n in os.environ if n == "QT_API" or n.startswith("SPYDER")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(progress, "_said_no_widgets", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        classes = [progress._tqdm_class(), progress._tqdm_class()]
    assert [str(w.message) for w in caught] == []
    assert classes == [std_tqdm, std_tqdm]
    err = capsys.readouterr().err
    assert err.count("pip install ipywidgets") == 1 and err.startswith("mpmagic: "), err


def test_outside_a_kernel_the_bar_is_tqdm_autos_and_says_nothing(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "ipykernel.zmqshell", raising=False)
    monkeypatch.setattr(progress, "_said_no_widgets", False)
    from tqdm.auto import tqdm as auto_tqdm

    assert progress._tqdm_class() is auto_tqdm
    assert capsys.readouterr().err == ""


# -- %config -------------------------------------------------------------------


def test_config_values_take_effect(ip, pool2, settings):
    run(ip, "%config MPMagic.chunksize = 7")
    run(ip, "%pmap -q sq, range(70)")
    assert mpmagic.last_report().chunks == 10 and mpmagic.last_report().chunksize == "7"
    assert run(ip, "%pmap -q --chunksize 35 sq, range(70)") and mpmagic.last_report().chunks == 2

    run(ip, "%config MPMagic.workers = 3")
    run(ip, "%pmap -q sq, range(30)")
    assert mpmagic.get_pool().workers == 3 and mpmagic.last_report().workers == 3
    run(ip, "%pool resize 2")  # an explicit resize wins until the setting changes again
    run(ip, "%pmap -q sq, range(30)")
    assert mpmagic.get_pool().workers == 2
    run(ip, "%config MPMagic.workers = 3")
    run(ip, "%pmap -q sq, range(30)")
    assert mpmagic.get_pool().workers == 2  # unchanged value: nothing to apply

    run(ip, "%config MPMagic.report = 'line'")
    with capture_output() as cap:
        run(ip, "%pmap sq, range(10)")
    (data,) = displayed(cap)
    assert "text/html" not in data and data["text/plain"].startswith("pmap: 10 items on 2 workers")

    run(ip, "%config MPMagic.report = 'none'")
    with capture_output() as cap:
        run(ip, "%pmap sq, range(10)")
    assert displayed(cap) == []

    run(ip, "%config MPMagic.report = 'auto'")
    with capture_output() as cap:
        run(ip, "%pmap sq, range(10)")
    (data,) = displayed(cap)
    assert "<table" in data["text/html"] and data["text/plain"].startswith("pmap: 10 items")


def test_config_start_method_restarts_the_local_pool(ip, pool2, settings):
    run(ip, "%config MPMagic.start_method = 'spawn'")
    assert run(ip, "%pmap -q sq, range(4)") == [0, 1, 4, 9]
    assert mpmagic.get_pool().start_method == "spawn"


def test_config_start_method_keeps_the_size_a_resize_chose(ip, pool2, settings):
    """A %pool resize is kept when %config changes the start method (the pool
    came back at its default size), unless the workers setting changed too."""
    run(ip, "%pool resize 3")
    run(ip, "%config MPMagic.start_method = 'spawn'")
    assert run(ip, "%pmap -q sq, range(4)") == [0, 1, 4, 9]
    assert (mpmagic.get_pool().start_method, mpmagic.get_pool().workers) == ("spawn", 3)
    run(ip, "%config MPMagic.workers = 1")
    run(ip, "%config MPMagic.start_method = 'forkserver'")
    run(ip, "%pmap -q sq, range(4)")
    assert (mpmagic.get_pool().start_method, mpmagic.get_pool().workers) == ("forkserver", 1)


def test_config_start_method_waits_for_runs_in_flight(ip, pool2, settings, capfd):
    """A --bg run in flight when %config changed the start method died at the
    next %pmap ("the pool was stopped while this run was in flight"): the new
    pool waits for it, and says so once."""
    run(ip, "import time\ndef slow(x):\n    time.sleep(0.05)\n    return x\n")
    run(ip, "bg = %pmap --bg -q slow, range(16)")
    run(ip, "%config MPMagic.start_method = 'spawn'")
    capfd.readouterr()
    assert run(ip, "%pmap -q sq, range(4)") == [0, 1, 4, 9]
    assert "applies once the runs in flight have ended" in capfd.readouterr().err
    assert run(ip, "bg.result(timeout=30)") == list(range(16))
    assert mpmagic.get_pool().start_method == "forkserver"
    run(ip, "%pmap -q sq, range(4)")  # nothing in flight now: the next run applies it
    assert mpmagic.get_pool().start_method == "spawn"


def test_pool_restart_applies_what_config_changed(ip, pool2, settings):
    """%pool restart after %config kept the old start method and size (its status
    said so), and the next run restarted the pool a second time."""
    run(ip, "%config MPMagic.start_method = 'spawn'")
    run(ip, "%config MPMagic.workers = 1")
    status = run(ip, "%pool restart")
    assert (mpmagic.get_pool().start_method, mpmagic.get_pool().workers) == ("spawn", 1)
    assert len(status.info["processes"]) == 1
    pids = [p["pid"] for p in status.info["processes"]]
    run(ip, "%pmap -q sq, range(4)")
    assert [p["pid"] for p in run(ip, "%pool").info["processes"]] == pids  # (not restarted again)


def test_pool_local_takes_the_config_settings_the_line_does_not_give(ip, pool2, settings):
    """Leaving Dask with %pool local made the local pool at the defaults (2
    workers, forkserver) though %config said otherwise."""
    settings.workers, settings.start_method = 1, "spawn"
    settings._pool_pending = False  # (as if applied already: %pool local itself must take them)
    run(ip, "%pool local")
    assert (mpmagic.get_pool().workers, mpmagic.get_pool().start_method) == (1, "spawn")
    run(ip, "%pool local -n 2 --start-method forkserver")  # the line wins
    assert (mpmagic.get_pool().workers, mpmagic.get_pool().start_method) == (2, "forkserver")


def test_config_from_ipython_config_file():
    """What ipython_config.py sets (c.MPMagic.x = ...) becomes the default."""
    from traitlets.config import Config

    cfg = Config()
    cfg.MPMagic.progress = False
    cfg.MPMagic.report = "line"
    cfg.MPMagic.workers = 3
    settings = config.MPMagic(config=cfg)
    assert (settings.progress, settings.report, settings.workers) == (False, "line", 3)
    assert settings._pool_pending  # applied to the pool at the first run


def test_config_listed_by_the_config_magic(ip):
    with capture_output() as cap:
        run(ip, "%config")
    assert "MPMagic" in cap.stdout


# -- the report ----------------------------------------------------------------


def test_html_report_is_valid_and_has_the_numbers_of_the_line(ip, pool2, settings):
    run(ip, "%pmap -q --compare nap, [0.02] * 6")
    report = mpmagic.last_report()
    page = parse_html(report._repr_html_())
    text = " ".join(page.text)
    numbers = re.findall(r"\d+(?:\.\d+)?", report.line())
    assert len(numbers) >= 5
    for n in numbers:
        assert n in text, f"{n} of {report.line()!r} missing from the HTML"
    for label in ("items", "workers", "chunk size", "wall", "serial", "speedup", "efficiency"):
        assert label in text
    assert "measured" in text
    assert f"{report.efficiency:.0%}" in text
    # compact: one row of labels, one of values, and one of advice when there is any
    # (on a busy machine six 20 ms items may not pay, and the report says why)
    assert page.tags.count("tr") == 2 + bool(report.advice)
    assert (f"advice: {report.advice}" in text) if report.advice else "advice" not in text


def test_advice_for_a_too_fine_grained_map(ip, pool2, settings):
    run(ip, "%pmap -q --compare --chunksize 1 sq, range(3000)")
    report = mpmagic.last_report()
    assert report.speedup < 1
    assert report.advice and "too small for the transfer cost" in report.advice
    assert "--chunksize" in report.advice  # what to try
    assert report.text().count("\n") == 1  # the line, then one line of advice
    assert "advice:" in " ".join(parse_html(report._repr_html_()).text)


def test_no_advice_for_a_good_map(ip, pool2, settings):
    run(ip, "%pmap -q nap, [0.15] * 8")
    report = mpmagic.last_report()
    assert report.efficiency > 0.5
    assert report.advice is None
    assert report.text() == report.line()
    assert "advice" not in report._repr_html_()


def test_advice_names_one_slow_item(ip, pool2, settings):
    run(ip, "%pmap -q --chunksize 1 nap, [0.6] + [0.001] * 10")
    report = mpmagic.last_report()
    assert report.advice and "item 0" in report.advice and "slow" in report.advice


def test_advice_can_be_turned_off(ip, pool2, settings):
    run(ip, "%pmap -q --chunksize 1 sq, range(500)")
    assert mpmagic.last_report().advice
    run(ip, "%config MPMagic.advice = False")
    assert mpmagic.last_report().advice is None


def _report(**kw) -> Report:
    return synthetic_report(**kw)


OUT_OF_FILES = r"""
import json, os, resource
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output
ip = start_ipython()
ip.run_line_magic("load_ext", "mpmagic")
import mpmagic
mpmagic.use_local(2, "forkserver")
ip.run_cell("import numpy as np\ndef sq(x):\n    return x * x\ndef big(x):\n    return np.full(1_000_000, x)\n")
assert ip.run_cell("_ = %pmap -q big, range(2)").error_in_exec is None  # (warm, and no report shown yet)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
held = []
try:
    while True:
        held.append(open(os.devnull))
except OSError:
    pass
with capture_output() as ok:
    done = ip.run_cell("%pmap sq, range(4)")
with capture_output() as failed:
    broke = ip.run_cell("%pmap big, range(4)")
for f in held:
    f.close()
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(json.dumps({
    "result": done.result, "ok_error": repr(done.error_in_exec),
    "ok_shown": [o.data.get("text/plain", "") for o in ok.outputs], "ok_text": ok.stdout + ok.stderr,
    "error": type(broke.error_in_exec).__name__, "message": str(broke.error_in_exec),
    "failed_shown": [o.data.get("text/plain", "") for o in failed.outputs], "failed_text": failed.stdout + failed.stderr,
}))
mpmagic.stop_pool()
"""


def test_a_report_shows_in_a_notebook_out_of_file_descriptors(tmp_path):
    """The report imported its advice module when first shown: in a notebook with no file
    descriptor left, that import could not open advice.py, and the report of the very run
    whose error said "too many open files" failed to show with an OSError from inside
    mpmagic, chained onto that message (the report of a run that went well too). It is
    imported with the report: both reports show, the error is mpmagic's one line on fds."""
    pytest.importorskip("numpy")
    import json
    import subprocess

    done = subprocess.run([sys.executable, "-c", OUT_OF_FILES], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["result"] == [x * x for x in range(4)] and seen["ok_error"] == "None", seen
    assert len(seen["ok_shown"]) == 1 and seen["ok_shown"][0].startswith("pmap: 4 items on 2 workers"), seen
    assert seen["error"] == "SerializationError" and "too many open files" in seen["message"], seen
    assert any(shown.startswith("pmap failed at item 0 after 0 of 4 items") for shown in seen["failed_shown"]), seen
    for text in (seen["ok_text"], seen["failed_text"], done.stderr):
        assert "OSError" not in text and "advice.py" not in text and "Unexpected exception" not in text, text


def test_advice_picks_the_cause_from_the_measurements():
    """Each cause from its own measurement (synthetic reports: deterministic)."""
    assert _report().advice is None  # 1.9x on 2 workers
    # CPU-bound on more workers than cores: said even though the estimate looks fine ...
    busy = _report(workers=4, task_seconds=3.6, cpu_seconds=1.9)
    assert "4 workers share 2 CPU cores" in busy.advice and "-n 2" in busy.advice
    # ... but not when the tasks were waiting (sleep, I/O), not computing.
    assert _report(workers=4, task_seconds=3.6, cpu_seconds=0.02).advice is None
    big = _report(wall=0.3, task_seconds=0.001, bytes_sent=20_000_000)
    assert "copied" in big.advice and "arguments" in big.advice
    copied = _report(wall=0.03, task_seconds=0.02, bytes_shared=256 << 20)
    assert copied.advice.startswith("268 MB of numpy arrays") and "mpmagic.share(x)" in copied.advice
    lonely = _report(items=1, chunks=1, wall=0.3, task_seconds=0.3)
    assert lonely.advice.startswith("only 1 item for 2 workers")
    straggler = _report(items=11, chunks=11, wall=0.61, task_seconds=0.61, slowest_task=0.6,
                        slowest_where="item 0")
    assert "item 0 took 600.0 ms" in straggler.advice
    # One 0.2 s item among 0.01 s ones on 4 workers: the others' waiting is not a
    # transfer cost (it said "tasks too small for the transfer cost").
    held = _report(items=20, chunks=20, workers=4, cores=4, wall=0.25, task_seconds=0.39, slowest_task=0.2,
                   slowest_where="item 7")
    assert held.advice.startswith("one slow task held everything up: item 7 took 200.0 ms"), held.advice
    cold = _report(wall=3.0, cold_start=True)
    assert "still starting" in cold.advice
    assert _report(wall=3.0, failed=1).advice is None  # a failed run gets its error, not advice



def test_transfer_cost_advice_names_the_chunksize_given_not_the_rounded_average():
    """``--chunksize 3`` over 10 items was told "a chunk of 2" (10 items / 4 chunks, rounded)."""
    given = _report(items=10, chunks=4, chunksize="3", wall=0.4, task_seconds=0.00004)
    assert "a chunk of up to 3 (2.5 on average) in ~10 µs" in given.advice, given.advice
    even = _report(items=9, chunks=3, chunksize="3", wall=0.4, task_seconds=0.00003)
    assert "a chunk of 3 in" in even.advice and "--chunksize" in even.advice, even.advice
    auto = _report(items=10, chunks=4, chunksize="auto (2-3)", wall=0.4, task_seconds=0.00004)
    assert "a chunk of 2.5 items on average in" in auto.advice, auto.advice
    # --chunksize 40 cut to 5 (max_tasks_per_child): the chunks that went, not "up to 40"
    cut = _report(items=100, chunks=20, chunksize="5", chunksize_asked=40, wall=0.4, task_seconds=0.0002)
    assert "a chunk of 5 in" in cut.advice, cut.advice
    cut = _report(items=100, chunks=24, chunksize="3-5", chunksize_asked=40, wall=0.4, task_seconds=0.0002)
    assert "a chunk of up to 5 (4.2 on average) in" in cut.advice, cut.advice


def test_advice_on_a_fixed_chunksize_names_the_size_given_when_chunks_were_cut():
    """The advice tells the user what to change: the size they gave (``--chunksize 8``),
    not the smaller chunks a worker's max_tasks_per_child allowance cut it to."""
    few = _report(items=10, chunks=2, workers=4, cores=4, chunksize="5", chunksize_asked=8, wall=1.0,
                  task_seconds=1.0, slowest_task=0.6, slowest_where="the chunk of items 0-4")
    assert "the 10 items went in 2 chunks (--chunksize 8), so only 2 of the 4 workers had work" in few.advice, (
        few.advice)


def test_a_resumed_runs_advice_divides_by_the_items_it_computed():
    """With --compare on a partial resume both times are the computed items': per item, by those."""
    stored = {"checkpoint": {"resumed": 990, "total": 1000, "computed": 10}}
    slower = _report(items=1000, chunks=2, serial=0.1, wall=0.2, task_seconds=0.5, extra=stored)
    assert "(50.0 ms against 10.0 ms per item)" in slower.advice, slower.advice


def test_advice_does_not_call_waiting_for_another_runs_workers_a_transfer_cost(ip, pool2, settings):
    """A quick %pmap that waited for workers busy with a --bg run was told
    "sending and collecting a chunk cost ~392.4 ms: give each call more work"."""
    tiny = _report(items=50, chunks=2, wall=0.4, task_seconds=0.001)
    assert "sending and collecting a chunk" in tiny.advice  # alone: the transfer cost, as before
    waited = _report(items=50, chunks=2, wall=0.4, task_seconds=0.001, shared_workers=True, waited_for_workers=0.39)
    assert waited.advice.startswith("this run waited ~390.0 ms for workers busy with another run"), waited.advice
    bg = mpmagic.submit(ip.user_ns["nap"], [0.3] * 4, chunksize=1)  # both workers busy for ~0.6 s
    time.sleep(0.1)
    run(ip, "%pmap -q sq, range(50)")
    report = mpmagic.last_report()
    assert bg.result(30) == [0.3] * 4
    assert report.shared_workers and report.advice.startswith("this run "), report.advice
    assert "another run" in report.advice and "sending" not in report.advice, report.advice
    run(ip, "%pmap -q sq, range(50)")  # alone again: nothing shared
    assert not mpmagic.last_report().shared_workers


# -- scaling -------------------------------------------------------------------


def test_scaling_gives_a_figure(ip, pool2, settings):
    from matplotlib.figure import Figure

    result = run(ip, "%pmap --scaling nap, [0.05] * 8")
    assert [p.workers for p in result.points] == [1, 2]
    assert result.serial >= 0.35  # 8 x 50 ms, measured here
    fig = result.figure
    assert isinstance(fig, Figure)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "measured" in labels and any("ideal" in x for x in labels)
    assert result._repr_png_().startswith(b"\x89PNG")


def test_scaling_of_a_cell(ip, pool2, settings):
    from matplotlib.figure import Figure

    result = run(ip, "%%parallel --scaling\nimport time\ntime.sleep(0.2 / size)\nrank\n")
    assert result.kind == "parallel" and [p.workers for p in result.points] == [1, 2]
    assert isinstance(result.figure, Figure)


def test_scaling_of_a_cell_runs_serially_as_compare_does_on_a_copy_as_main_labelled(ip, pool2, settings, capsys):
    """--scaling's serial runs of a cell ran on the notebook's own objects: a cell's
    ``lst.append(rank)`` made the notebook's list longer at each serial run (and the
    ranks of the runs after it got the longer list), where --compare's serial run works
    on a copy, as a rank does, as ``__main__``, its output labelled ``[serial]``.
    They are that same run now: the notebook's list stays as it was."""
    ip.user_ns.pop("P", None)  # (a notebook P an earlier test left: the cell's class must not become it)
    run(ip, "lst = [1]")
    notebook_main = sys.modules["__main__"]
    body = ("import pickle, __main__\nclass P:\n    pass\npickle.dumps(P())\nassert __main__.P is P\n"
            "lst.append(rank)\nassert len(lst) == 2, lst\nprint('printed', rank, size)\nrank")
    capsys.readouterr()
    result = run(ip, f"%%parallel --scaling\n{body}")
    out = capsys.readouterr().out.splitlines()
    assert [p.workers for p in result.points] == [1, 2]
    assert run(ip, "lst") == [1] and sys.modules["__main__"] is notebook_main and "P" not in ip.user_ns
    assert out.count("[serial] printed 0 1") == 2, out  # (timed before the points and after them)
    assert "[rank 1] printed 1 2" in out and not any(line.startswith("printed") for line in out), out
    capsys.readouterr()
    run(ip, f"%%parallel --scaling -n 1 --no-label\n{body}")
    assert run(ip, "lst") == [1]
    assert capsys.readouterr().out.splitlines().count("printed 0 1") == 3  # (2 serial runs, 1 rank of 1)


def test_scaling_of_a_map_leaves_the_notebooks_objects_as_they_were(ip, pool2, settings, capsys):
    """--scaling's serial runs of a map called the function on the notebook's own
    objects, two or more times (before the points and after them): a function
    appending to a notebook list left it with twice the items (serial ``map`` once: once),
    the points after the first serial run shipped the longer list to the workers, an
    item changed in place was changed twice, and the line that the notebook's list "is
    as it was before the run" was false. Each serial run now works on a copy of the
    function and its items made as a worker's is, as the parallel points do."""
    run(ip, "seen = []\nrows = [[0], [1], [2]]\n"
            "def side(row):\n    seen.append(row[0])\n    row.append(len(seen))\n    return len(seen)\n")
    result = run(ip, "%pmap --scaling side, rows")
    assert [p.workers for p in result.points] == [1, 2] and result.serial > 0
    assert run(ip, "seen") == [] and run(ip, "rows") == [[0], [1], [2]]
    err = capsys.readouterr().err
    assert "it is as it was before the run" in err, err  # (now true)
    result = run(ip, "%pmap --scaling -n 1 --seed 4 side, rows")
    assert run(ip, "seen") == [] and run(ip, "rows") == [[0], [1], [2]]


def test_scaling_table_formats_a_tiny_speedup_as_the_report_line():
    """The table said "0.00x" and "0%" where the run's line says "<0.1x"."""
    from mpmagic.scaling import Scaling, ScalingPoint

    result = Scaling("pmap", 0.001, [ScalingPoint(1, 0.5, 0.002, 0.002), ScalingPoint(2, 0.5, 1.5, 0.75)])
    tiny, fine = (row.split() for row in result.table().splitlines()[2:])
    report = synthetic_report(wall=0.5, serial=0.001)
    assert tiny[3] == report._speedup_text().removeprefix("speedup ") == "<0.1x"
    assert tiny[-1] == dict(report.rows())["efficiency"] == "<1%"
    assert fine[3] == "1.50x" and fine[-1] == "75%"
    cells = [html.unescape(c) for c in re.findall(r"<td[^>]*>([^<]*)</td>", result._repr_html_())]
    assert cells[2:5:2] == ["<0.1x", "<1%"] and cells[7:10:2] == ["1.50x", "75%"]


def test_scaling_without_matplotlib_is_a_text_table(ip, pool2, settings, monkeypatch):
    """Without matplotlib the series is a table, and says what the plot needs: in a
    terminal and in Jupyter (whose HTML showed the table alone, the plot missing unsaid),
    as the insights' timeline does in Jupyter."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = run(ip, "%pmap --scaling nap, [0.02] * 4")
    assert result.figure is None and result._repr_png_() is None
    table = str(result).splitlines()
    assert "serial" in table[0] and "measured" in table[0]
    assert table[1].split() == ["workers", "wall", "speedup", "ideal", "efficiency"]
    assert [row.split()[0] for row in table[2:]] == ["1", "2"]
    needs = 'needs matplotlib: pip install "mpmagic[plot]"'
    assert needs in IPython.lib.pretty.pretty(result) and html.unescape(result._repr_html_()).count(needs) == 1
    with pytest.raises(ImportError, match=re.escape(needs[6:])) as saving:  # (one line, as %pool dask's)
        result.savefig(os.devnull)
    assert saving.value._render_traceback_() == [f"ImportError: {saving.value}"]
    run(ip, "%pmap -q --insights nap, [0.02] * 2")
    insights = mpmagic.last_report().insights
    assert insights.figure() is None and html.unescape(insights._repr_html_()).count(needs) == 1


# -- insights ------------------------------------------------------------------


def test_insights_find_the_slow_item(ip, backend, settings):
    """On every backend: the slow item is named, with its arguments and its worker."""
    run(ip, "import time\ndef slowish(x):\n    time.sleep(0.4 if x == 13 else 0.003)\n    return x\n")
    t0 = time.perf_counter()
    assert run(ip, "%pmap -q --insights slowish, range(40)") == list(range(40))
    outside = time.perf_counter() - t0  # the call as this test timed it
    ins = mpmagic.last_report().insights
    top = ins.slowest[0]
    assert top.index == 13 and top.args == "slowish(13)" and top.seconds >= 0.4
    assert all(s.seconds < 0.2 for s in ins.slowest[1:])
    assert sum(w.tasks for w in ins.per_worker) == 40
    holder = next(w for w in ins.per_worker if w.worker == top.worker)
    assert holder.busy >= 0.4
    # Each part against something measured apart from insights.py's own sums
    # (idle is the rest of the wall time by construction, so busy + idle +
    # transfer == wall would prove nothing): the run's wall time lies within
    # what this test timed around the call, and each worker's busy time is at
    # least the sleeps of the items the timeline says it ran, and not seconds
    # more (the bound allows a loaded machine; a run of 40 items is ~0.5 s).
    assert 0.4 <= ins.wall <= outside
    slept = {i: 0.4 if i == 13 else 0.003 for i in range(40)}
    ran = {w.worker: [] for w in ins.per_worker}
    for t in ins.tasks:
        ran[t.worker].extend(range(t.first, t.first + t.count))
    assert sorted(i for items in ran.values() for i in items) == list(range(40))
    for w in ins.per_worker:
        asleep = sum(slept[i] for i in ran[w.worker])
        assert asleep <= w.busy <= asleep + 2.0, (w, asleep)
        assert len(ran[w.worker]) == w.tasks
        assert 0 <= w.transfer <= w.busy  # unpickling a few ints, within the chunks' time
        assert w.idle == pytest.approx(max(0.0, ins.wall - w.busy - w.transfer))
    assert "item 13: slowish(13)" in str(ins)
    page = parse_html(mpmagic.last_report()._repr_html_())
    assert "img" in page.tags  # the timeline chart
    assert "slowish(13)" in " ".join(page.text)


def test_insights_of_a_cell_and_star_args(ip, pool2, settings):
    run(ip, "%%parallel -q --insights\nimport time\ntime.sleep(0.3 if rank == 1 else 0.01)\n")
    ins = mpmagic.last_report().insights
    assert ins.slowest[0].args == "rank 1"
    run(ip, "def add(a, b):\n    time.sleep(0.3 if a == 2 else 0)\n    return a + b\n")
    run(ip, "%pmap -q --insights --star add, [(i, 10 * i) for i in range(5)]")
    assert mpmagic.last_report().insights.slowest[0].args == "add(2, 20)"


def test_insights_show_a_timed_out_item_and_count_worker_slots(ip, pool2, settings):
    """A timed-out item is among the slowest (its time until it was stopped) and on the
    timeline as stopped, not its worker as idle; the replacement worker's row does not make
    it "3 of 2 workers". -q hides the timing report, not the insights asked for."""
    run(ip, "def stuck(x):\n    time.sleep(5 if x == 1 else 0)\n    return x\n")
    with capture_output() as out:
        run(ip, "%pmap -q --insights --errors collect --timeout 0.3 --chunksize 1 stuck, range(4)")
    ins = mpmagic.last_report().insights
    top = ins.slowest[0]
    assert (top.index, top.fate) == (1, "timed out") and 0.29 <= top.seconds < 1.0  # (epoch floats)
    stopped = [t for t in ins.tasks if t.fate]
    assert [(t.first, t.worker, t.fate) for t in stopped] == [(1, top.worker, "timed out")]
    holder = next(w for w in ins.per_worker if w.worker == top.worker)
    assert holder.busy >= 0.29
    text = str(ins)
    assert text.startswith("insights: 2 of 2 workers (1 replaced) ran tasks")
    assert f"item 1: stuck(1)  (worker {top.worker}, timed out)" in text and "!" in ins.timeline_text()
    shown = displayed(out)  # -q: the insights, not the timing report
    assert len(shown) == 1 and shown[0]["text/plain"].startswith("insights: 2 of 2 workers (1 replaced)")


def test_insights_of_a_chunk_stopped_on_a_later_item_keep_its_earlier_items_time(ip, pool2):
    """Each item of a chunk has its own --timeout: a chunk stopped at its 4th item
    ran its first 3 before, and the timeline shows that time as the stopped
    chunk's, not as its worker idle; the stopped item's own time is ~the timeout."""
    # (0.1 s items under a 1 s timeout: 0.25 s ones under 0.5 s timed out once
    # in a full run on a loaded machine, a second stopped chunk)
    run(ip, "def late(x):\n    time.sleep(5 if x == 3 else 0.1)\n    return x\n")
    try:
        run(ip, "%pmap -q --insights --errors collect --timeout 1 --chunksize 4 late, range(4)")
    finally:  # (the session's one shell: test_worker_setup's setup defines a late() of its own)
        ip.user_ns.pop("late", None)
    ins = mpmagic.last_report().insights
    top = ins.slowest[0]
    assert (top.index, top.fate) == (3, "timed out") and 0.99 <= top.seconds < 2.0, top
    stopped = [t for t in ins.tasks if t.fate]
    assert [(t.first, t.count, t.fate) for t in stopped] == [(0, 4, "timed out")]
    # items 0-2 (0.3 s) and item 3 until its timeout (1 s)
    assert stopped[0].end - stopped[0].start >= 1.25, stopped


def test_compare_leaves_out_items_that_killed_their_worker_or_timed_out(ip, pool2, settings, tmp_path, capfd):
    """--compare's serial run calls no item whose worker died under it (retried or
    not) or that timed out: here it would exit or hang the notebook (%pdebug's rule).
    The rest are compared, and one line says what was left out."""
    run(ip, f"import os\nMARK = {str(tmp_path / 'once')!r}\n"
            "def risky(x):\n"
            "    if x == 2:\n        os._exit(3)\n"
            "    if x == 3 and not os.path.exists(MARK):\n        open(MARK, 'w').close()\n        os._exit(4)\n"
            "    if x == 5:\n        time.sleep(3)\n"
            "    return x * 10\n")
    t0 = time.perf_counter()
    run(ip, "import mpmagic\nout = mpmagic.pmap(risky, range(7), compare=True, errors='collect', retries=1, "
            "timeout=0.5, chunksize=1)")
    out = ip.user_ns["out"]
    took = time.perf_counter() - t0
    assert [type(r.error).__name__ if isinstance(r, mpmagic.Failed) else r for r in out] == [
        0, 10, "WorkerLostError", 30, 40, "TaskTimeoutError", 60]
    assert took < 2.5  # item 5 was not run here to its end (3 s)
    rep = mpmagic.last_report()
    assert rep.equal is True and "measured for 4 of 7 items, results equal" in rep.line()
    err = capfd.readouterr().err
    assert ("mpmagic: compare=True (--compare): the workers running items 2, 3 died and item 5 ran past the "
            "timeout in the parallel run, so they are not run here, where they could do the same to the notebook; "
            "the verdict and the serial time cover the other 4 items") in err


def test_compare_with_every_item_left_out_compares_nothing(ip, pool2, capfd):
    """Every item killed its worker: --compare's serial run has nothing to run, so
    no verdict (not "results equal" over 0 items) and the serial time is an estimate."""
    run(ip, "import os\ndef die(x):\n    os._exit(3)\n")
    run(ip, "import mpmagic\nout = mpmagic.pmap(die, [1, 2], compare=True, errors='collect', chunksize=1)")
    rep = mpmagic.last_report()
    assert rep.equal is None and rep.serial is None
    assert "measured" not in rep.line() and "--compare left out every item, so nothing was compared" in rep.line()
    err = capfd.readouterr().err
    assert "that leaves no item to run here, so nothing was compared and the serial time is estimated" in err
    assert "cover the other 0" not in err


def test_items_are_timed_only_with_insights():
    """Only --insights asks the worker to time items (the Map message's ``timing``)."""
    plain = MapJob(abs, iter(range(4)), 4, False, 2)
    timed = MapJob(abs, iter(range(4)), 4, False, 2, insights=object())
    assert plain.message(plain.next_unit()).timing is False
    assert timed.message(timed.next_unit()).timing is True


# -- %pool ---------------------------------------------------------------------


def test_pool_status_renders_as_html(ip, pool2):
    status = run(ip, "%pool")
    page = parse_html(status._repr_html_())
    text = " ".join(page.text)
    for p in status.info["processes"]:
        assert str(p["pid"]) in text
    assert "forkserver" in text and page.tags.count("tr") == 1 + len(status.info["processes"]) + 1


@pytest.mark.parametrize("cell, values", [
    ("%pmap --compare slow_here, range(4)", "results"),
    ("%%parallel -n 2 --compare\nslow_here(rank)", "ranks' values"),
])
def test_an_interrupt_of_the_serial_compare_run_says_no_worker_was_stopped(ip, pool2, cell, values, tmp_path):
    """--compare's serial run is here, after the parallel run: an interrupt there stops
    no worker, and the message says so, not the one of an interrupted parallel run."""
    import os
    import signal
    import threading

    here = tmp_path / "serial_run_began"
    run(ip, f"import os, time\nHOME_PID = os.getpid()\n"
            f"def slow_here(x):\n    if os.getpid() == HOME_PID:\n        open({str(here)!r}, 'w').close()\n"
            "        time.sleep(30)\n    return x\n")
    replaced = pool2.status()["workers_replaced"]
    over = threading.Event()

    def interrupt_in_the_serial_run() -> None:  # (once it began, not on a fixed 1.5 s timer)
        deadline = time.monotonic() + 30
        while not here.exists() and not over.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not over.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    user = threading.Thread(target=interrupt_in_the_serial_run, daemon=True)
    user.start()
    try:
        with capture_output():
            err = ip.run_cell(cell, store_history=False).error_in_exec
    finally:
        over.set()
        user.join()
    magic = cell.split()[0]
    assert type(err) is KeyboardInterrupt
    assert str(err) == (
        f"{magic} --compare interrupted in its serial run here in the notebook, after the parallel run had "
        f"finished (mpmagic.last_report() is its report): no worker was stopped, and the parallel run's {values} "
        "were dropped with the interrupt; run it without --compare to keep them")
    assert pool2.status()["workers_replaced"] == replaced


@pytest.mark.parametrize("cell, name", [
    ("main = mpmagic.pmap(marked_nap, [0.2] * 60)", "mpmagic.pmap"),
    ("main = mpmagic.parallel(f'open({MARK!r}, \"a\").close()\\nimport time\\ntime.sleep(20)', workers=2)",
     "mpmagic.parallel"),
])
def test_an_interrupted_api_call_shows_one_line_as_the_magic_does(ip, pool2, cell, name, tmp_path):
    """``mpmagic.pmap(...)`` interrupted in a cell showed a KeyboardInterrupt
    traceback through engine.py's Run.wait with an empty message, where
    ``%pmap`` shows its one line (docs/reliability.md, section 2). (Interrupted once
    its work runs: under load a start past a fixed 0.6 s was told, rightly, as "none
    of its work was running".)"""
    from conftest import interrupted_cell

    mark = str(tmp_path / "started")
    run(ip, f"import mpmagic, time\nMARK = {mark!r}\ndef marked_nap(s):\n    open(MARK, 'a').close()\n"
            "    time.sleep(s)\n    return s\n")
    replaced = pool2.status()["workers_replaced"]
    text, err = interrupted_cell(ip, cell, after=0.3, started=mark)
    assert type(err) is KeyboardInterrupt
    assert text.strip() == (f"KeyboardInterrupt: {name} interrupted: the work still running was stopped and its "
                            "workers replaced; the pool is ready for the next run"), text
    assert pool2.status()["workers_replaced"] >= replaced + 1  # the run was stopped, as the line says


def test_advice_on_dask_names_its_costs_and_never_says_serial_for_a_run_that_paid():
    """A tester's run on Dask: 12 items of 0.3 s on 4 worker threads, 1.7x faster
    than serial, was told "sending and collecting a chunk cost ~775.9 ms: ...,
    or run it serially"; waiting for busy or joining workers read as that cost."""
    paid = _report(items=12, chunks=12, workers=4, backend="dask", start_method=None, cores=None, wall=2.15,
                   task_seconds=3.61, worker_noun="worker thread")
    assert paid.line().startswith("pmap: 12 items on 4 worker threads (dask)")
    assert "Dask scheduling, sending and collecting a chunk cost" in paid.advice, paid.advice
    assert "serially" not in paid.advice
    slower = _report(items=50, chunks=2, wall=0.4, task_seconds=0.001)
    assert slower.advice.endswith(", or run it serially")  # slower than serial: still said
    waited = _report(items=12, chunks=12, workers=4, backend="dask", start_method=None, cores=None, wall=2.15,
                     task_seconds=3.61, shared_workers=True, waited_for_workers=1.2)
    assert waited.advice.startswith("this run waited ~1.20 s for Dask workers (busy with other tasks"), waited.advice


def test_results_that_differ_from_serial_get_advice_naming_the_usual_causes():
    """--compare said RESULTS DIFFER and the advice spoke of transfer cost: a
    function drawing random numbers without --seed is the first day's case."""
    from mpmagic.advice import advise

    unseeded = synthetic_report(serial=0.001, equal=False, extra={"seeded": False})
    assert advise(unseeded).startswith("the results differ from the serial run's: random draws differ in each "
                                       "process unless --seed S")
    seeded = advise(synthetic_report(serial=0.001, equal=False, extra={"seeded": True}))
    # (seeded: the draws --seed cannot reach, np.random.default_rng() unseeded, were not named; hash() was first)
    assert seeded.startswith("the results differ from the serial run's: draws from a generator made without a seed "
                             "(np.random.default_rng(), os.urandom, uuid.uuid4()) differ on every call: seed it from "
                             "the item; hash() of strings") and "--seed" not in seeded, seeded
    assert "results differ" not in (advise(synthetic_report(serial=0.001, equal=True)) or "")


@pytest.mark.parametrize("cell, refused", [
    ("%pmap --scaling --compare nap, [0.01]", "--compare"),
    ("%pmap --scaling --progress --insights nap, [0.01]", "--progress, --insights"),
    ("%pmap --scaling --checkpoint nap, [0.01]", "--checkpoint"),
    ("%%parallel --scaling -o out --gather g --reduce sum\ng = rank\nrank", "-o, --reduce, --gather"),
])
def test_scaling_refuses_by_name_the_options_it_cannot_honour(ip, pool2, cell, refused):
    """--scaling parsed these and dropped them without a word (-o stored nothing,
    --reduce reduced nothing); it now says so before anything runs."""
    run(ip, "def nap(x):\n    import time; time.sleep(x)\n    return x\n")
    before = mpmagic.last_report()
    with pytest.raises(Exception, match=f"--scaling does not take {re.escape(refused)}: "):
        run(ip, cell)
    assert mpmagic.last_report() is before  # nothing ran


def test_scaling_gives_each_run_the_lines_timeout_errors_and_seed(ip, pool2, monkeypatch):
    """``%pmap --scaling --timeout 0.3 ...`` ran every item unbounded (6 s for a 0.2 s
    limit), and --errors collect, --seed, --retries never reached the runs."""
    run(ip, f"import os, time\ndef stuck_in_workers(x):\n    if os.getpid() != {os.getpid()}:\n"
            "        time.sleep(30)\n    return x\n")
    t0 = time.perf_counter()
    result = run(ip, "%pmap --scaling -n 1 --timeout 0.3 --errors collect --no-progress stuck_in_workers, [1]")
    assert time.perf_counter() - t0 < 10 and [p.workers for p in result.points] == [1]
    assert result.points[0].wall < 5  # (--no-progress: what it does anyway, not refused)
    seen = []
    real = mpmagic.api.parallel
    monkeypatch.setattr(mpmagic.api, "parallel", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    run(ip, "%%parallel --scaling -n 1 --seed 3 --timeout 20 --no-label\nrank")
    assert seen == [dict(workers=1, namespace=ip.user_ns, timeout=20.0, seed=3, label_output=False)]

def test_the_containers_a_function_changes_are_read_from_its_code_and_never_its_locals(ip):
    """tutorial22 #2: ``results.append(x)``, ``seen.add(k)``, ``d[k] = v`` (``+=``, ``del``) on
    a notebook list, set or dict change each worker's copy only. Read from the code: a
    mutating method called on a captured name, or a subscript store on one; a local
    container (LOAD_FAST), one only read, or a captured one stored *into* a local is none."""
    from mpmagic.payload_cache import changes_words, container_changes

    run(ip, "results, seen, d, TABLE = [], set(), {}, {1: 2}\n"
            "def collect(x):\n    results.append(x)\n    return len(results)\n"
            "def first(x):\n    new = x % 3 not in seen\n    seen.add(x % 3)\n    return new\n"
            "def count(x):\n    d[x % 2] = d.get(x % 2, 0)\n    d[x % 2] += 1\n    del d[x % 2]\n    return x\n"
            "def calls(x):\n    return collect(x)\n"
            "def shown(x):\n    print(x)\n    results.append(x)\n    return x\n"
            "def bump(x):\n    d[x] += 1\n    return x\n"
            "def in_comprehension(xs):\n    return [results.extend([y]) for y in xs]\n"
            "def clean(x):\n    local = []\n    local.append(x)\n    out = {}\n    out[x] = TABLE\n"
            "    out[str(x)] = TABLE[1]\n    out[x] += TABLE[1]\n    out[TABLE[1]] = x\n"
            "    TABLE.get(x)\n    return sorted(seen) + [len(results), local, out]\n"
            "def closure():\n    acc = []\n    def inner(x):\n        acc.append(x)\n        mine = []\n"
            "        def deep():\n            mine.append(1)\n        deep()\n        return x\n    return inner\n"
            "inner = closure()\n"
            "class Box:\n    def __init__(self):\n        self.items = []\n"
            "    def add(self, x):\n        self.items.append(x)\n        return x\n")
    ns = ip.user_ns
    words = lambda f: changes_words(container_changes(f))  # noqa: E731
    assert words(ns["collect"]) == words(ns["calls"]) == "collect changes the notebook's list `results` (results.append)"
    # (Python 3.10: `results` is its name number 1, whose low bit is no NULL there; its own
    # operators, DUP_TOP_TWO and ROT_THREE: neither was read, so nothing was said)
    assert words(ns["shown"]) == "shown changes the notebook's list `results` (results.append)"
    assert words(ns["bump"]) == "bump changes the notebook's dict `d` (d[...] =)"
    assert words(ns["first"]) == "first changes the notebook's set `seen` (seen.add)"
    assert words(ns["count"]) == "count changes the notebook's dict `d` (d[...] =, del d[...])"
    assert words(ns["in_comprehension"]) == "in_comprehension changes the notebook's list `results` (results.extend)"
    assert words(ns["inner"]) == "inner changes the list `acc` of its closure (acc.append)"
    assert words(eval("lambda x: results.append(x)", ns)) == (
        "the lambda changes the notebook's list `results` (results.append)")
    for none in ("clean", "closure"):
        assert container_changes(ns[none]) == [], none
    assert container_changes(ns["Box"]().add) == [] and container_changes(abs) == []
    assert container_changes(ns["first"], (list,)) == []  # (only lists asked for)


def test_a_map_that_changes_a_notebook_list_says_so_and_its_compare_advice_names_it(ip, pool2, capsys):
    """tutorial22 #2: --compare said RESULTS DIFFER and blamed random draws, hash() and float
    sums for ``seen.add`` / ``results.append`` on the notebook's set or list. Its advice
    names the change; without --compare the list stays empty silently (as with
    multiprocessing): one line says so, once per function; a local list says nothing."""
    # (a pid: never the serial result, so the verdict is always RESULTS DIFFER)
    run(ip, "import os\nseen = set()\ndef first(x):\n    seen.add(x % 3)\n    return os.getpid()\n")
    run(ip, "_ = %pmap -q --compare first, range(6)")
    report = mpmagic.last_report()
    assert report.equal is False
    assert report.advice.startswith("the results differ from the serial run's: first changes the notebook's "
                                    "set `seen` (seen.add) in its workers' copies"), report.advice
    assert "random" not in report.advice and "A task that changes state" in report.advice
    assert "(--compare's serial run here did change it)" in report.advice and run(ip, "seen") == {0, 1, 2}
    run(ip, "results = []\ndef collect(x):\n    results.append(x)\n    return x\n")
    assert said_once(ip, capsys, "%pmap -q collect, range(4)", "results.append", (
        "mpmagic: collect changes the notebook's list `results` (results.append) in the workers' copies, not "
        "in the notebook: it is as it was before the run; return the values")) == [0, 1, 2, 3]
    assert run(ip, "results") == []  # (the workers' copies changed, as with multiprocessing)
    run(ip, "def own(x):\n    results = []\n    results.append(x)\n    return results\n")
    run(ip, "_ = %pmap -q own, range(4)")
    assert "mpmagic:" not in capsys.readouterr().err


def test_a_map_that_fills_a_notebook_array_says_so_as_for_a_list(ip, pool2, capsys):
    """The classic parallel fill (``out = np.zeros(n)``, ``def fill(i): out[i] = ...``):
    serially the array is filled; a map filled each worker's copy and left the notebook's
    zeros, silently (a list appended to said so). One line, once per function; an array
    the workers write into for real (``mpmagic.share``: the very shared memory) and a local
    array say nothing."""
    run(ip, "import numpy as np\nout = np.zeros(4)\ndef fill(i):\n    out[i] = i * 2\n    return i\n")
    assert said_once(ip, capsys, "%pmap -q fill, range(4)", "out[...]", (
        "mpmagic: fill changes the notebook's ndarray `out` (out[...] =) in the workers' copies, not in "
        "the notebook: it is as it was before the run; return the values")) == [0, 1, 2, 3]
    assert run(ip, "out.tolist()") == [0.0] * 4
    run(ip, "import mpmagic\nshared_out = mpmagic.share(np.zeros(4))\n"
            "def fill_shared(i):\n    shared_out[i] = 1\n    return i\n"
            "def own_array(i):\n    a = np.zeros(2)\n    a[0] = i\n    return a\n")
    capsys.readouterr()
    run(ip, "_ = %pmap -q --errors collect fill_shared, range(2)")  # (read-only in the workers, as documented)
    run(ip, "_ = %pmap -q own_array, range(2)")
    assert "mpmagic:" not in capsys.readouterr().err
    run(ip, "del shared_out, fill_shared\nimport gc\ngc.collect()")  # (its segment: freed with the array)


def said_once(ip, capsys, line: str, name: str, said: str) -> object:
    """Run the magic ``line`` twice: the first run's stderr has ``said``, the second's no
    mention of ``name`` (a note is said once per function); the first run's value."""
    capsys.readouterr()
    value = run(ip, line)
    err = capsys.readouterr().err
    assert said in err, err
    run(ip, line)
    assert name not in capsys.readouterr().err  # (once per function)
    return value


#: The notebook names test_state_a_function_accumulates_is_read_from_its_code binds.
_ACCUMULATING_NAMES = ("TOTAL", "MODEL", "total", "spelled", "lazy", "last", "counter", "inc", "nth", "local",
                       "Acc", "acc", "tally", "held", "put", "mod", "in_module", "count")


def test_state_a_function_accumulates_is_read_from_its_code(ip):
    """What payload_cache.state_kept_apart reads: an augmented or self-referencing assignment
    to a global, a nonlocal or an attribute of the object a bound method or callable instance
    runs on (or of a notebook object it captures), a list attribute of that object or a list
    default filled in place. A module's attribute (the worker's own module), a shared helper's
    (mpmagic.Value: the notebook sees it), a global set
    once from a call (a worker's lazy set-up) or from what another statement read, a default
    the map's items replace, a local, an unbound class's attribute say nothing."""
    from mpmagic.payload_cache import changes_words, state_kept_apart

    try:
        run(ip, "import functools\nTOTAL, MODEL = 0, None\n"
                "def total(x):\n    global TOTAL\n    TOTAL += x\n    return TOTAL\n"
                "def spelled(k, x):\n    global TOTAL\n    TOTAL = TOTAL + k * x\n    return TOTAL\n"
                "def lazy(x):\n    global MODEL\n    if MODEL is None:\n        MODEL = dict(a=1)\n    return x\n"
                "def last(x):\n    global MODEL\n    print(MODEL)\n    MODEL = x * 2\n    return x\n"
                "def counter():\n    n = 0\n    def inc(x):\n        nonlocal n\n        n += x\n        return n\n"
                "    return inc\ninc = counter()\n"
                "def nth(x, seen=[]):\n    seen.append(x)\n    return len(seen)\n"
                "def local(x):\n    out = [0]\n    out.append(x)\n    n = 0\n    n += x\n    return out, n\n"
                "class Acc:\n    def __init__(self):\n        self.n, self.items, self.cache = 0, [], None\n"
                "    def add(self, x):\n        self.n += x\n        self.items.append(x)\n        return self.n\n"
                "    def setup(self, x):\n        if self.cache is None:\n            self.cache = dict(a=x)\n"
                "        return x\n"
                "    def __call__(s, x):\n        s.n = s.n + x\n        return s.n\n"
                "acc = Acc()\n"
                "def tally(x):\n    acc.n += x\n    acc.items.append(x)\n    return acc.n\n"
                "def held():\n    box = Acc()\n    def put(x):\n        box.n = box.n + x\n        return box.n\n"
                "    return put\nput = held()\n"
                "import types\nmod = types.ModuleType('mod')\nmod.n = 0\n"
                "def in_module(x):\n    mod.n += x\n    return x\n"
                "import mpmagic\ncounter = mpmagic.Value('i', 0)\n"
                "def count(x):\n    with counter.get_lock():\n        counter.value += 1\n    return x\n")
        ns = ip.user_ns
        words = lambda f, positional=1: changes_words(state_kept_apart(f, positional))  # noqa: E731
        assert words(ns["total"]) == "total changes the notebook's int `TOTAL` (TOTAL +=)"
        assert words(ns["functools"].partial(ns["spelled"], 2)) == (
            "spelled changes the notebook's int `TOTAL` (TOTAL = TOTAL + ...)")
        assert words(ns["inc"]) == "inc changes the int `n` of its closure (n +=)"
        assert words(ns["nth"]) == "nth changes the list `seen` of its defaults (seen.append)"
        assert words(ns["acc"].add) == "Acc.add changes the notebook's Acc object `acc` (self.n +=, self.items.append)"
        assert words(ns["acc"]) == "Acc.__call__ changes the notebook's Acc object `acc` (s.n = s.n + ...)"
        assert words(ns["Acc"]().add) == "Acc.add changes its Acc object (self.n +=, self.items.append)"
        assert words(ns["tally"]) == "tally changes the notebook's Acc object `acc` (acc.n +=, acc.items.append)"
        assert words(ns["put"]) == "put changes the Acc object `box` of its closure (box.n = box.n + ...)"
        for none in (ns["lazy"], ns["last"], ns["local"], ns["acc"].setup, ns["Acc"].add, ns["in_module"], ns["count"],
                     abs, len):
            assert state_kept_apart(none, 1) == [], none
        assert state_kept_apart(ns["nth"], 2) == [] and state_kept_apart(ns["nth"], None) == []  # (the items give seen)
    finally:  # (the session's one shell: a notebook name left here wins over a later test's %%pool setup
        # of that name, as the notebook's value does: MODEL = None broke test_worker_setup's MODEL)
        for name in _ACCUMULATING_NAMES:
            ip.user_ns.pop(name, None)


def test_a_map_that_accumulates_notebook_state_says_so_once(ip, pool2, capsys):
    """fidelity26: ``global TOTAL; TOTAL += x``, ``self.n += x`` on the notebook object whose
    method is mapped, a nonlocal counter, a ``seen=[]`` default: serially the notebook's
    state changes and each call sees the earlier ones' (``[0, 1, 3, 6]``); mapped, each
    worker changed its own copy (``[0, 1, 3, 3]``), the notebook's stayed at 0, and nothing
    said so (only a captured list was noted). One line says so, once per function."""
    run(ip, "TOTAL = 0\ndef total(x):\n    global TOTAL\n    TOTAL += x\n    return TOTAL\n"
            "class Acc:\n    def __init__(self):\n        self.n = 0\n"
            "    def add(self, x):\n        self.n += x\n        return self.n\n"
            "acc = Acc()\n")
    said_once(ip, capsys, "%pmap -q total, range(4)", "TOTAL", (
        "mpmagic: total changes the notebook's int `TOTAL` (TOTAL +=) in the workers' copies, not in the "
        "notebook: it is as it was before the run; return the values"))
    assert run(ip, "TOTAL") == 0
    run(ip, "_ = %pmap -q acc.add, range(4)")
    assert run(ip, "acc.n") == 0
    err = capsys.readouterr().err
    assert "mpmagic: Acc.add changes the notebook's Acc object `acc` (self.n +=) in the workers' copies" in err, err


def test_results_that_differ_name_the_state_the_function_changes(ip, pool2):
    """pyfeat13 finding 4: a function with `global TOTAL` or a `seen=[]` default
    got the advice about random draws and hash(); its code shows the cause."""
    from mpmagic.advice import advise
    from mpmagic.payload_cache import state_words

    run(ip, "def total(x):\n    global TOTAL\n    TOTAL += x\n    return TOTAL\n"
            "def nth(x, seen=[]):\n    seen.append(x)\n    return len(seen)\n"
            "def calls_total(x):\n    return total(x)\n"
            "class Acc:\n    n = 0\n    def add(self, x):\n        self.n += x\n        return self.n\n")
    ns = ip.user_ns
    assert state_words(ns["total"]) == state_words(ns["calls_total"]) == "total assigns the global TOTAL"
    assert state_words(ns["nth"]) == "its default seen (a list) keeps what tasks add"
    assert state_words(ns["Acc"]().add) == "the method of a Acc object sets .n"
    assert state_words(lambda x: x + 1) is None and state_words(abs) is None
    words = advise(synthetic_report(serial=0.001, equal=False, extra={"seeded": False, "state": state_words(ns["nth"])}))
    assert "changes state (its default seen (a list)" in words and "random" not in words
    assert "A task that changes state" in words
    run(ip, "import os\ndef where(x, seen=[]):\n    seen.append(x)\n    return os.getpid()\n")
    run(ip, "%pmap -q --compare where, [1, 2]")  # (a pid: never the serial result)
    assert "(its default seen (a list) keeps what tasks add)" in mpmagic.last_report().advice
    # (fidelity26: a notebook object the function captures and adds to: the advice blamed random draws)
    run(ip, "class Box:\n    n = 0\nbox = Box()\ndef tally(x):\n    box.n += x\n    return os.getpid()\n")
    run(ip, "%pmap -q --compare tally, [1, 2]")
    advice = mpmagic.last_report().advice
    assert "changes state (tally changes the notebook's Box object `box` (box.n +=))" in advice, advice
    assert "random" not in advice, advice


def test_a_wait_for_the_worker_setup_is_said_on_the_line_and_is_no_transfer_cost():
    """A run behind a slow %%pool setup (its wait interrupted) was told "sending and
    collecting a chunk cost ~2.50 s": the setup's time read as a cost of sending. The
    line says the wait; the advice names it, and leaves it out of the transfer cost."""
    slow = _report(items=4, chunks=4, wall=5.0, task_seconds=2e-5, waited_for_setup=4.99, setup_wait_seconds=9.9)
    assert slow.line().endswith("| waited 4.99 s for the %%pool setup"), slow.line()
    assert ("setup wait", "4.99 s") in slow.rows()
    assert "transfer cost" not in slow.advice and "sending" not in slow.advice
    assert slow.advice.startswith("the run waited 4.99 s of its 5.00 s for workers still running the %%pool setup")
    # A short wait beside real costs of sending: those are named, without the wait in them.
    small = _report(items=80, chunks=8, wall=1.0, task_seconds=0.01, waited_for_setup=0.1, setup_wait_seconds=0.2)
    assert "a chunk cost ~223.8 ms" in small.advice, small.advice  # (2 x 1.0 s - 0.01 s - 0.2 s) / 8
    assert "waited 100.0 ms for the %%pool setup" in small.line()
    assert "setup" not in _report().line()  # (no wait, nothing said)


def test_a_bound_list_method_mapped_and_imap_and_submit_say_the_notebook_list_is_not_changed(ip, pool2, capsys):
    """fidelity24: serially ``list(map(lst.append, items))`` fills ``lst``; mapped, each
    worker appends to its copy and the notebook's list stays empty, and nothing said so
    (the note read only a function's code: a bound method has none). imap, submit (--bg)
    which run a map too, said nothing even for a function (the pandas accessor: test_pandas_accessor)."""
    run(ip, "import mpmagic\nbag = []")
    capsys.readouterr()
    assert run(ip, "%pmap -q bag.append, [1, 2, 3]") == [None, None, None]
    assert run(ip, "bag") == []  # (as the note says: the workers' copies changed)
    err = capsys.readouterr().err
    assert "mpmagic: bag.append changes the notebook's list `bag` in the workers' copies, not in the notebook" in err, err
    run(ip, "_ = %pmap -q bag.append, [1, 2, 3]")
    assert "bag.append" not in capsys.readouterr().err  # (once per list and method)
    run(ip, "_ = %pmap -q [].append, [1, 2, 3]")  # (a list no name holds: nobody sees it anyway)
    assert "mpmagic:" not in capsys.readouterr().err
    for n, code in enumerate(("list(mpmagic.imap(keep{n}, [1, 2]))", "mpmagic.submit(keep{n}, [1, 2]).result(timeout=60)")):
        run(ip, f"def keep{n}(x):\n    bag.append(x)\n    return x\n")  # (a function of its own: said once each)
        capsys.readouterr()
        assert run(ip, code.format(n=n)) == [1, 2] and run(ip, "bag") == [], code
        err = capsys.readouterr().err
        assert f"mpmagic: keep{n} changes the notebook's list `bag` (bag.append) in the workers' copies" in err, (code, err)
