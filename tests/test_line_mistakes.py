"""Mistakes in a magic's line print the one-line usage error and nothing else,
whichever way an option is spelled; ``--help`` / ``-h`` show the magic's help."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError as IPythonUsageError
from IPython.utils.capture import capture_output

from mpmagic import api, pool


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


def _too_many(size: str, what: str) -> str:
    from mpmagic.backends.local import available_cpus, max_workers

    return f"{size} is more {what} than this machine can run at once (at most {max_workers()} with {available_cpus()} CPUs)"


@pytest.mark.parametrize("cell, said", [
    ("%pmap -q -n 1000 abs, [1]", ("%pmap: -n 1000", "processes")),
    ("%pmap -q --workers=1000 --scaling abs, [1]", ("%pmap: -n 1000", "processes")),
    ("%%parallel -q -n 1000\nrank", ("%%parallel: -n 1000", "ranks")),
    ("%pool start -n 1000", ("%pool: -n 1000", "processes")),
    ("%pool resize -n 1000", ("%pool: -n 1000", "processes")),
    ("%pool resize 1000", ("%pool: resize 1000", "processes")),
])
def test_too_many_workers_is_said_in_the_words_the_line_gave_them(ip, pool2, cell, said):
    """``%pmap -n 1000`` was refused as "workers = 1000", the API's keyword, where
    ``%%parallel -n 1000`` said "-n 1000": a magic now says the size as its line gave
    it, and the API (next test) as its call did, nothing run or changed."""
    before, backend, workers = api.last_report(), pool.current_pool(), pool2.workers
    assert first_line_of_usage_error(ip, cell) == _too_many(*said)
    assert api.last_report() is before and pool.current_pool() is backend and backend.workers == workers


def test_too_many_workers_is_said_with_the_calls_keyword(pool2):
    """``parallel(code, workers=1000)`` was refused as "-n 1000", the magic's option."""
    import mpmagic

    for call, what in [(lambda: mpmagic.pmap(abs, [1], workers=1000), "processes"),
                       (lambda: mpmagic.parallel("rank", workers=1000, namespace={}), "ranks"),
                       (lambda: mpmagic.parallel("rank", workers=1000, namespace={}, block=False), "ranks"),
                       (lambda: mpmagic.start_pool(1000), "processes")]:
        with pytest.raises(mpmagic.UsageError) as info:
            call()
        assert str(info.value) == _too_many("workers = 1000", what)
    assert pool.current_pool() is pool2 and pool2.workers == 2


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
    # more words than %pool reads: the unknown subcommand first (it said "unexpected argument 'c'")
    ("%pool foo a b c", "unknown subcommand 'foo' (it takes status, start, stop,"),
    ("%pool strat a b c", "unknown subcommand 'strat'; did you mean start?"),
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


@pytest.mark.parametrize("line, hint, serial", [
    ("%pmap abs, xs -n 2  # was slow", "%pmap -n 2 abs, xs  # was slow", "map(abs, xs)"),
    ("%pmap -q abs, xs --compare # see -n", "%pmap --compare abs, xs  # see -n", "map(abs, xs)"),
    ("%pmap len, ['#'] -n 2", "%pmap -n 2 len, ['#']", "map(len, ['#'])"),
])
def test_the_options_go_before_func_hint_keeps_a_comment_at_the_end(ip, pool2, line, hint, serial):
    """``%pmap f, xs -n 2  # note`` was told ``%pmap -n 2  # note f, xs``: copied, that line
    is all comment after the options (FUNC and ITERABLE gone). The comment stays last."""
    ip.user_ns.update(xs=[1, -2])
    err, _, _ = error_of(ip, line)
    said = [*str(err).splitlines()[:1], *getattr(err, "__notes__", [])]
    assert any(said_line.endswith(f"options go before FUNC: {hint}") for said_line in said), said
    fixed = ip.run_cell(hint.replace("%pmap", "%pmap -q", 1), store_history=False).result
    assert fixed == list(eval(serial, ip.user_ns))


@pytest.mark.parametrize("line", ["%pmap abs xs  # -n 2 was slow", "%pmap abs, undefined_name  # --compare"])
def test_an_option_in_the_comment_gets_no_options_go_before_func_hint(ip, pool2, line):
    err, _, _ = error_of(ip, line)
    assert "options go before FUNC" not in str(err) and not getattr(err, "__notes__", None), err


@pytest.mark.parametrize("line", ["%pmap -q -n '2' abs, xs", '%pmap -q -n "2" --timeout="30" abs, xs',
                                  "%pmap -q --errors 'collect' --seed '3' abs, xs"])
def test_pmap_takes_quoted_option_values_as_parallel_does(ip, pool2, line):
    """``%%parallel -n '2'`` runs (its line is read as shell words) but ``%pmap -n '2'``
    said ``"'2'" is not a whole number``: an option's value loses its quotes in both;
    the argument list keeps its own (``'2'`` there is a str)."""
    ip.user_ns.update(xs=[1, -2, -3])
    assert ip.run_cell(line, store_history=False).result == list(map(abs, ip.user_ns["xs"]))
    assert ip.run_cell("%%parallel -q -n '2'\nrank", store_history=False).result == [0, 1]
    assert ip.run_cell("%pmap -q -n '2' len, ['ab', \"'c'\"]", store_history=False).result == [2, 3]
    err, _, _ = error_of(ip, "%pmap -q -n 'x' abs, xs")
    assert str(err).startswith("%pmap: argument -n/--workers: 'x' is not a whole number"), err


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
    # (the cache as in a fresh kernel: this test run twice in one process found its line compiled already)
    monkeypatch.setattr(magics, "_args_codes", {})
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
    from mpmagic import report as report_module
    from mpmagic.report import Report

    tips = []
    real = advice.advise  # (report imports it up front: its own name is the one it calls)
    monkeypatch.setattr(report_module, "advise", lambda report: tips.append(1) or real(report))
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


# -- an option given twice; values argparse took for options; the API's words (tester-options 3, 8, 9) --

USAGE_TAIL = {"%pmap": "%pmap [options] FUNC, ITERABLE", "%%parallel": "%%parallel [options]", "%pool": "%pool ["}


def first_line_of_usage_error(ip, cell: str) -> str:
    """The usage error's first line (the second is the usage and the pointer to the help)."""
    err, said, shown = error_of(ip, cell)
    assert isinstance(err, IPythonUsageError), repr(err)
    first, usage = str(err).splitlines()
    magic = first.split(":")[0]
    assert usage.startswith("usage: " + USAGE_TAIL[magic]) and usage.endswith(f"(see {magic}?)")
    assert "Traceback" not in said and shown == 0
    return first


@pytest.mark.parametrize("cell, said", [
    ("%pmap -q --timeout 5 --timeout 0.01 abs, [1]", "%pmap: --timeout given twice (5, then 0.01): give it once"),
    ("%pmap -q -n 1 -n 2 abs, [1]", "%pmap: -n/--workers given twice (1, then 2): give it once"),
    ("%pmap -qn-1 --workers=2 abs, [1]", "%pmap: -n/--workers given twice (-1, then 2): give it once"),
    ("%pmap -q --errors collect --errors raise abs, [1]",
     "%pmap: --errors given twice (collect, then raise): give it once"),
    ("%pmap --rerun-failed -n 1 -n 2", "%pmap: -n/--workers given twice (1, then 2): give it once"),
    ("%%parallel -q -n 2 --reduce max --reduce min\nrank",
     "%%parallel: --reduce given twice (max, then min): give it once"),
    ("%%parallel -q -n 2 --reduce 'lambda v: max(v)' --reduce=min\nrank",
     "%%parallel: --reduce given twice ('lambda v: max(v)', then min): give it once"),
    ("%%parallel -q -n 2 -n 1\nrank", "%%parallel: -n/--workers given twice (2, then 1): give it once"),
    ("%pool start -n 1 -n 2", "%pool: -n/--workers given twice (1, then 2): give it once"),
    ("%pool --max-memory 1GB start --max-memory 2GB", "%pool: --max-memory given twice (1GB, then 2GB): give it once"),
])
def test_an_option_given_twice_is_refused_naming_both_values(ip, pool2, cell, said):
    """The last of an option given twice won without a word (``%pmap --timeout 5 --timeout
    0.01`` stopped items at 0.01 s; ``%pool start -n 1 -n 2`` started 2 workers): refused,
    in every magic by one check in their parser, before anything runs or changes."""
    before, backend, workers = api.last_report(), pool.current_pool(), pool2.workers
    assert first_line_of_usage_error(ip, cell) == said
    assert api.last_report() is before and pool.current_pool() is backend and backend.workers == workers


def test_a_flag_given_twice_is_taken_and_a_parse_keeps_no_record_of_what_was_given(ip, pool2):
    from mpmagic.magics import _parallel_parser, _pmap_parser, _pool_parser

    assert ip.run_cell("%pmap -q -q abs, [-1, 2]", store_history=False).result == [1, 2]
    for parser, words in [(_pmap_parser(), ["-n", "2", "--timeout=1"]), (_parallel_parser(), ["-n", "2", "-o", "x"]),
                          (_pool_parser(), ["start", "-n", "2", "--max-memory", "1GB"])]:
        opts = parser.parse_args(words)
        assert set(vars(opts)) == {a.dest for a in parser._actions}  # noqa: SLF001
        assert parser.parse_args(words) == opts  # (the same words again: nothing of the last parse is left)


def test_a_value_that_starts_like_a_negative_number_gets_the_values_own_refusal(ip, pool2):
    """``--max-memory -1GB``: argparse took ``-1GB`` for an option ("expected one argument");
    the magic now says what ``start_pool(max_memory='-1GB')`` says, as for ``--max-memory=-1GB``."""
    from mpmagic.errors import UsageError

    with pytest.raises(UsageError) as api_said:
        pool.parse_memory("-1GB")
    for line in ("%pool start --max-memory -1GB", "%pool start --max-memory=-1GB", "%pool --max-memory -1GB start"):
        assert first_line_of_usage_error(ip, line) == f"%pool: {api_said.value}"
    assert first_line_of_usage_error(ip, "%pool start -n -1GB") == \
        "%pool: argument -n/--workers: '-1GB' is not a whole number (-1: one per usable CPU)"
    assert first_line_of_usage_error(ip, "%pmap -q --timeout -1e3 abs, [1]") == \
        "%pmap: argument --timeout: must be greater than 0, not -1e3"
    assert ip.run_cell("%pmap -q -n -1 abs, [-3]", store_history=False).result == [3]  # (still the whole pool)


def test_a_start_method_is_refused_alike_by_pool_start_pool_and_config(ip, pool2):
    """``%config MPMagic.start_method = 'FORK'`` was taken (a case-blind enum) where
    ``%pool start --start-method FORK`` and ``start_pool(start_method='FORK')`` refused it."""
    from traitlets import TraitError

    import mpmagic
    from mpmagic import config
    from mpmagic.backends.local import start_method_refused

    said = "unknown start method 'FORK': choose one of forkserver, spawn, fork"
    assert start_method_refused("FORK") == said
    assert [start_method_refused(m) for m in ("forkserver", "spawn", "fork")] == [None, None, None]
    assert first_line_of_usage_error(ip, "%pool start --start-method FORK") == f"%pool: argument --start-method: {said}"
    with pytest.raises(mpmagic.UsageError) as api_said:
        mpmagic.start_pool(start_method="FORK")
    assert str(api_said.value) == said
    settings = config.current()
    before = settings.start_method
    with capture_output():
        ip.run_cell("%config MPMagic.start_method = 'FORK'", store_history=False)
    assert settings.start_method == before
    with pytest.raises(TraitError) as config_said:
        settings.start_method = "FORK"
    assert str(config_said.value) == \
        f"%config MPMagic.start_method = 'FORK' refused: {said}; the setting keeps its value"
    assert settings.start_method == before


@pytest.mark.parametrize("cell, said", [
    ("%%parallel --retries 2\nrank",
     "%%parallel: unknown option --retries: a %pmap option (it re-sends an item whose worker died); a rank runs "
     "once, and one whose worker died fails the cell: run the cell again, or map the work with %pmap --retries N"),
    ("%%parallel --errors collect\nrank",
     "%%parallel: unknown option --errors: a %pmap option; a failed rank raises ParallelError, whose .values keeps "
     "the values of the ranks that finished and .failures each failed rank's error"),
    ("%%parallel --retry 2\nrank", "%%parallel: unknown option --retry; --retries is a %pmap option (it re-sends an "
     "item whose worker died); a rank runs once, and one whose worker died fails the cell: run the cell again, or "
     "map the work with %pmap --retries N"),
    ("%pmap -o x abs, [1]", "%pmap: unknown option -o: a %%parallel option; assign %pmap's value instead: "
     "results = %pmap f, xs"),
    ("%pmap --rerun abs", "%pmap: unknown option --rerun; did you mean --rerun-failed?"),
    ("%pmap -q --star pow, [1], [2]", "%pmap: --star takes one iterable of argument tuples, not several iterables"),
])
def test_the_magics_own_words_and_no_unrelated_suggestion(ip, pool2, cell, said):
    """``%%parallel --retries`` was asked "did you mean -n/--workers?" (the dashes made the
    names look alike), and ``%pmap --star f, xs, ys`` said the API's ``star=True``."""
    assert first_line_of_usage_error(ip, cell) == said


def test_after_a_double_dash_the_arguments_get_no_options_go_before_func_hint(ip, pool2):
    """``--`` ends the options: what follows is the argument list, however it reads, so an
    error in it is map()'s alone (the hint told ``%pmap -q -- -n, xs`` to write ``%pmap -n, xs``)."""
    for name in ("n", "compare"):
        ip.user_ns.pop(name, None)
    ip.user_ns["xs"] = [1, 2]
    err, _, _ = error_of(ip, "%pmap -q -- -n, xs")
    assert isinstance(err, NameError) and not getattr(err, "__notes__", None)
    err, _, _ = error_of(ip, "%pmap -q -- abs, xs --compare")
    assert isinstance(err, NameError) and not getattr(err, "__notes__", None)
    assert first_line_of_usage_error(ip, "%pmap -q -- abs, xs -n 2") == \
        "%pmap: 'abs, xs -n 2' is not an argument list like map()'s (Python: invalid syntax. Perhaps you forgot a comma?)"
    err, _, _ = error_of(ip, "%pmap -q abs, xs --compare")  # (without the --: the hint, as before)
    assert err.__notes__ == ["options go before FUNC: %pmap --compare abs, xs"]


@pytest.mark.parametrize("args, said", [
    ("abs, [1, 2,", "its '[' is never closed"),
    ("(abs, xs", "its '(' is never closed"),
    ("abs, {1: 2  # }", "its '{' is never closed"),
    ("abs xs", " (Python: invalid syntax. Perhaps you forgot a comma?)"),
    ("abs, [1 2]", " (Python: invalid syntax. Perhaps you forgot a comma?)"),
    ("abs, x for x in xs", " (Python: Generator expression must be parenthesized)"),
    ("abs, 'x", " (Python: unterminated string literal (detected at line 1))"),
])
def test_an_argument_list_that_is_not_python_says_why_as_map_would(ip, pool2, args, said):
    """``%pmap f, [1, 2,`` and ``%pmap f xs`` said only "is not an argument list like
    map()'s"; ``map(...)`` with the same text names the unclosed bracket, the missing
    comma or the unparenthesized generator: now the line does too."""
    ip.user_ns["xs"] = [1, 2]
    with capture_output():
        serial = ip.run_cell(f"map({args}\n)", store_history=False).error_before_exec
    assert isinstance(serial, SyntaxError)  # (map() refuses the text too)
    assert first_line_of_usage_error(ip, f"%pmap -q {args}") == \
        f"%pmap: {args!r} is not an argument list like map()'s" + (said if said.startswith(" ") else f": {said}")


@pytest.mark.parametrize("line, said", [
    ("%pool checkpoints clear a b", "%pool: unexpected argument 'b': %pool checkpoints takes clear NAME"),
    ("%pool resize 2 3 4", "%pool: unexpected argument '3': %pool resize takes N"),
    ("%pool setup clear a b", "%pool: unexpected argument 'a': %pool setup takes clear"),
    ("%pool runs a b c", "%pool: unexpected argument 'a': %pool runs takes none"),
    ("%pool stop a", "%pool: unexpected argument 'a': %pool stop takes none"),  # (fewer: as before)
])
def test_pool_names_the_first_word_its_subcommand_does_not_take_and_what_it_takes(ip, pool2, line, said):
    """Past the three words %pool reads, argparse's refusal named the last word alone
    (``unexpected argument 'b'``); with fewer, the first extra word and what the subcommand
    takes were named. Now alike, and nothing is done."""
    backend, workers = pool.current_pool(), pool2.workers
    assert first_line_of_usage_error(ip, line) == said
    assert pool.current_pool() is backend and backend.workers == workers
