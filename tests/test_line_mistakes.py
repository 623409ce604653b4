"""Mistakes in a magic's line print the one-line usage error and nothing else,
whichever way an option is spelled; ``--help`` / ``-h`` show the magic's help."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError as IPythonUsageError
from IPython.utils.capture import capture_output

from mpmagic import api


def error_of(ip, cell: str) -> tuple[BaseException | None, str, int]:
    """The cell's error, what it printed, and how many displays it showed."""
    with capture_output() as cap:
        result = ip.run_cell(cell, store_history=False)
    return result.error_in_exec, cap.stdout + cap.stderr, len(cap.outputs)


def test_pmap_over_the_machines_cap_shows_no_report_of_a_run(ip):
    from conftest import ensure_pool

    ensure_pool("forkserver")  # (the session's 2-worker pool: a test must not leave another)
    before = api.last_report()
    err, said, shown = error_of(ip, "%pmap -n 100000 abs, [1, 2, 3]")
    assert "100000 is more processes than this machine can run" in str(err)
    assert api.last_report() is before and shown == 0 and "stopped by" not in said


@pytest.mark.parametrize("line", ["%pool stop -n2", "%pool status -n2", "%pool runs -n5", "%pool setup -n3",
                                  "%pool stop -n 2", "%pool stop --workers=2"])
def test_pool_refuses_an_option_its_subcommand_ignores_however_written(ip, line):
    err, _, _ = error_of(ip, line)
    assert "-n/--workers goes with start, restart, resize, local and dask" in str(err)


@pytest.mark.parametrize("before, after", [
    ("dask --timeout 1 tcp://127.0.0.1:1", "dask tcp://127.0.0.1:1 --timeout 1"),
    ("checkpoints --timeout 1 clear f", "checkpoints clear f --timeout 1"),
    ("-n 3 resize", "resize -n 3"), ("start --start-method spawn -n 2", "-n 2 start --start-method spawn"),
])
def test_pool_reads_options_and_words_in_any_order(before, after):
    from mpmagic.magics import _pool_parser

    assert vars(_pool_parser().parse_args(before.split())) == vars(_pool_parser().parse_args(after.split()))


def test_pool_names_the_option_a_subcommand_ignores_wherever_it_is_written(ip):
    err, _, _ = error_of(ip, "%pool checkpoints -n 2 clear")
    assert "-n/--workers goes with start, restart, resize, local and dask, not checkpoints" in str(err)
    err, _, _ = error_of(ip, "%pool dask -n 2 tcp://127.0.0.1:1 extra")
    assert "unexpected argument 'extra': %pool dask takes ADDRESS" in str(err)


@pytest.mark.parametrize("cell, magic", [
    ("%pmap --help", "pmap"), ("%pmap -h abs, [1]", "pmap"), ("%pool --help", "pool"), ("%pool stop -h", "pool"),
    ("%%parallel --help\nraise SystemExit('ran')", "parallel"), ("%%parallel -h\nraise SystemExit('ran')", "parallel"),
])
def test_help_option_prints_the_magics_help_and_runs_nothing(ip, cell, magic):
    from mpmagic.magics import MPMagics

    before = api.last_report()
    err, said, _ = error_of(ip, cell)
    assert err is None and api.last_report() is before
    assert said.strip() == getattr(MPMagics, magic).__doc__.strip()


@pytest.mark.parametrize("line, said", [
    # a misspelled option before the subcommand: its value was taken as the subcommand
    ("%pool --worker 2", "unknown option --worker; did you mean -n/--workers?"),
    ("%pool --max-mem 1GB start", "unknown option --max-mem; did you mean --max-memory?"),
    # a misspelled subcommand: argparse's "argument action: invalid choice"
    ("%pool strat", "unknown subcommand 'strat'; did you mean start?"),
    ("%pool stauts", "unknown subcommand 'stauts'; did you mean status?"),
    ("%pool frobnicate", "unknown subcommand 'frobnicate' (it takes status, start, stop,"),
])
def test_pool_names_a_misspelled_option_or_subcommand_wherever_it_is(ip, line, said):
    err, _, _ = error_of(ip, line)
    assert str(err).startswith(f"%pool: {said}"), err
    assert "argument action" not in str(err)


@pytest.mark.parametrize("line", ["%pmap -q -n $n abs, [-1]", "%pmap -q --timeout {t} abs, [-1]",
                                  "%%parallel -q -n $n\nrank", "%%parallel -q -o $out\nrank"])
def test_an_unexpanded_dollar_or_brace_value_gets_a_hint(ip, line):
    """The magics' lines are not expanded (``%pmap -n $n`` said only "'$n' is not a whole number")."""
    ip.user_ns.update(n=2, t=5)
    err, _, _ = error_of(ip, line)
    magic = line.split()[0]
    assert f"; {magic}'s line is not expanded by IPython ($name and {{expr}} stay as written): write the value " \
           "itself, or call mpmagic." in str(err).splitlines()[0], err


def test_options_written_after_the_arguments_get_a_hint_and_keep_maps_meaning(ip, pool2):
    """``%pmap f, xs --compare`` is map(f, xs --compare): its NameError stays, with
    a line saying options go before FUNC; ``-n 2`` there is no argument list."""
    ip.user_ns.update(xs=[1, 2], q=1)
    err, _, _ = error_of(ip, "%pmap abs, xs --compare")
    assert isinstance(err, NameError) and err.__notes__ == ["options go before FUNC: %pmap --compare abs, xs"]
    err, _, _ = error_of(ip, "%pmap abs, xs -n 2")
    assert "is not an argument list like map()'s; options go before FUNC: %pmap -n 2 abs, xs" in str(err)
    err, _, _ = error_of(ip, "%pmap abs, unknown_name")
    assert isinstance(err, NameError) and not getattr(err, "__notes__", None)
    err, _, _ = error_of(ip, "%pmap abs, xs -q")  # ``xs - q``: a list minus an int (q is defined)
    assert isinstance(err, TypeError) and err.__notes__ == ["options go before FUNC: %pmap -q abs, xs"]
    err, _, _ = error_of(ip, "%pmap abs, xs - q")  # no option written: map()'s error alone
    assert isinstance(err, TypeError) and not getattr(err, "__notes__", None)


def test_pmap_takes_maps_keywords_as_this_pythons_map_does(ip, pool2, monkeypatch):
    """``**{}`` is no keyword for map() (it was refused); ``strict=`` is map()'s from 3.14."""
    from mpmagic import magics

    ip.user_ns.update(no_keywords={}, xs=[1, 2, 3], ys=[1, 2])
    assert ip.run_cell("%pmap -q abs, xs, **no_keywords").result == [1, 2, 3]
    monkeypatch.setattr(magics, "_MAP_TAKES_STRICT", False)
    err, _, _ = error_of(ip, "%pmap -q pow, xs, ys, strict=True")
    assert "map() takes no keyword arguments" in str(err)
    monkeypatch.setattr(magics, "_MAP_TAKES_STRICT", True)  # (as on Python 3.14)
    assert ip.run_cell("%pmap -q pow, xs, ys, strict=False").result == [1, 4]
    assert ip.run_cell("%pmap -q pow, ys, ys, strict=True").result == [1, 4]
    err, _, _ = error_of(ip, "%pmap -q pow, xs, ys, strict=True")
    assert isinstance(err, ValueError) and "shorter" in str(err)
    err, _, _ = error_of(ip, "%pmap -q pow, xs, ys, fast=True")
    assert "map() got an unexpected keyword argument 'fast'" in str(err)


def test_a_repeated_pmap_line_is_parsed_and_compiled_once_and_evaluated_each_time(monkeypatch):
    """A warm ``%pmap f, xs`` parsed, checked and compiled its line again each call:
    now once per text; each call still evaluates it (a changed name is seen), under a
    name of its own, and a line naming the collector's own name keeps its meaning."""
    import ast

    from mpmagic import magics

    parses = []
    real_parse = ast.parse
    monkeypatch.setattr(magics.ast, "parse", lambda *a, **k: parses.append(a) or real_parse(*a, **k))
    parser = magics._pmap_parser()
    ns = {"xs": [1, 2], "__mpmagic_args__": 7}
    line = "abs, xs  # a note"
    assert magics._eval_map_args(line, ns, parser) == (abs, [1, 2])
    ns["xs"] = [3]
    assert magics._eval_map_args(line, ns, parser) == (abs, [3])
    assert len(parses) == 1
    assert set(ns) - {"__builtins__"} == {"xs", "__mpmagic_args__"}  # (the lent collector is taken back)
    assert magics._eval_map_args("abs, [__mpmagic_args__]", ns, parser) == (abs, [7])
    with pytest.raises(IPythonUsageError, match="not an argument list"):
        magics._eval_map_args("abs, [", ns, parser)
    with pytest.raises(IPythonUsageError, match="not an argument list"):  # (errors are never cached)
        magics._eval_map_args("abs, [", ns, parser)


def test_a_line_without_options_gets_fresh_defaults_without_argparse(monkeypatch):
    """``%pmap f, xs`` (no option) parsed its empty option list with argparse each call."""
    from mpmagic import magics

    parser = magics._pmap_parser()
    first = parser.parse_args([])
    first.star = True  # (the magic sets attributes on its namespace)
    monkeypatch.setattr(parser, "parse_known_args", lambda *a, **k: pytest.fail("parsed again"))
    second = parser.parse_args([])
    assert second is not first and second.star is False and second.errors == "raise" and second.workers is None


def test_the_report_is_formatted_only_as_text_and_html(monkeypatch):
    """The report's display asks IPython for the two formats a Report has: the other
    ten formatters each looked it up in vain (~30 us a %pmap)."""
    import argparse

    from mpmagic import magics

    shown = []
    monkeypatch.setattr(magics, "display", lambda obj, **kw: shown.append((obj, kw)))
    report = api.Report(kind="pmap", items=2, workers=2, backend="local", start_method="fork", wall=0.001,
                        task_seconds=0.0)
    magics._show_report(argparse.Namespace(quiet=False), report, None)
    assert shown == [(report, {"include": ("text/plain", "text/html")})]
    formats = type(report).__dict__
    assert {"_repr_pretty_", "_repr_html_"} <= set(formats)
    assert not [m for m in formats if m.startswith("_repr_") and m not in ("_repr_pretty_", "_repr_html_")]


def test_a_shown_report_works_out_its_advice_and_line_once(ip, monkeypatch):
    """Its text and its HTML each read the line and the advice: worked out once a display."""
    import argparse

    from mpmagic import advice, magics
    from mpmagic.report import Report

    tips = []
    real = advice.advise
    monkeypatch.setattr(advice, "advise", lambda report: tips.append(1) or real(report))
    report = api.Report(kind="pmap", items=2, workers=2, backend="local", start_method="fork", wall=0.001,
                        task_seconds=0.000002, cores=2)
    lines = []
    real_line = Report._line
    monkeypatch.setattr(Report, "_line", lambda self: lines.append(1) or real_line(self))
    with capture_output() as cap:
        magics._show_report(argparse.Namespace(quiet=False), report, None)
    (shown,) = cap.outputs
    assert set(shown.data) == {"text/plain", "text/html"}
    assert "advice: " in shown.data["text/plain"] and "advice: " in shown.data["text/html"]
    assert len(tips) == 1 and len(lines) == 1
    assert "_shown" not in vars(report)  # (afterwards, each asks again: the report may change)
    report.line(), report.line()
    assert len(lines) == 3


@pytest.mark.parametrize("by_name", [False, True])
def test_a_shown_report_uses_a_formatter_the_user_registered_for_report(ip, by_name):
    """Asking only for text and HTML skipped a formatter the user registered for
    Report in another MIME type (markdown, for nbconvert), which display(report) uses."""
    import argparse

    from mpmagic import magics
    from mpmagic.report import Report

    markdown = ip.display_formatter.formatters["text/markdown"]
    if by_name:
        markdown.for_type_by_name("mpmagic.report", "Report", lambda r: "**" + r.line() + "**")
    else:
        markdown.for_type(Report, lambda r: "**" + r.line() + "**")
    report = api.Report(kind="pmap", items=2, workers=2, backend="local", start_method="fork", wall=0.001,
                        task_seconds=0.0)
    try:
        with capture_output() as cap:
            magics._show_report(argparse.Namespace(quiet=False), report, None, ip)
    finally:
        markdown.type_printers.pop(Report, None)
        markdown.deferred_printers.pop(("mpmagic.report", "Report"), None)
    (shown,) = cap.outputs
    assert set(shown.data) == {"text/plain", "text/html", "text/markdown"}
    assert shown.data["text/markdown"] == "**" + report.line() + "**"
    with capture_output() as cap:  # (unregistered: the two again)
        magics._show_report(argparse.Namespace(quiet=False), report, None, ip)
    assert set(cap.outputs[0].data) == {"text/plain", "text/html"}
