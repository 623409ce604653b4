"""The notebook experience, round 2 (issue 22, items 3-6; issue 13, class 6 for interrupts).

A failed run says it failed in one line; option typos name the closest
option and every usage error ends with the pointer to the help; an
interrupt shows only our line (in a shell and in a real kernel); and the
formatting polish: "<0.1x", chunk sizes in words, Failed's repr, µs,
%pool's heading and Dask table, %pool local's confirmation, the insights
legend and the table under the scaling plot.
"""

from __future__ import annotations

import re

import pytest
from conftest import ensure_pool, interrupted_cell, run
from IPython.core.error import UsageError as IPythonUsageError
from IPython.utils.capture import capture_output

import mpmagic
from mpmagic import api, pool, shm
from mpmagic.fmt import fmt_speedup
from mpmagic.insights import TEXT_LEGEND
from mpmagic.report import Report, fmt_seconds
from mpmagic.status import PoolStatus

INTERRUPTED = (
    "KeyboardInterrupt: {magic} interrupted: the work still running was stopped and its workers "
    "replaced; the pool is ready for the next run"
)


@pytest.fixture
def pool2(ip):
    backend = ensure_pool("forkserver")
    backend.wait_ready()
    run(ip, "def inv(x):\n    return 1 / (x - 3)\n"
            "def spin(x):\n    print('spinning', x, flush=True)\n    while True:\n        pass\n")
    return backend


def shown(cap) -> list[dict]:
    """What the cell displayed (rich outputs: the report), as mime bundles."""
    return [o.data for o in cap.outputs]


# -- issue 22 item 3: a failed run says it failed --------------------------------


def test_a_failed_pmap_shows_one_line_instead_of_the_timing_table(ip, pool2):
    with capture_output() as cap:
        result = ip.run_cell("%pmap --chunksize 1 inv, range(6)", store_history=False)
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    [report] = shown(cap)
    assert re.fullmatch(r"pmap failed at item 3 after [0-5] of 6 items, [\d.]+ (µs|ms|s)", report["text/plain"]), report
    assert "<table" not in report["text/html"] and "pmap failed at item 3" in report["text/html"]
    assert "speedup" not in report["text/plain"] and "advice" not in report["text/plain"]


def test_a_collected_failure_keeps_the_table_with_the_failed_count(ip, pool2):
    with capture_output() as cap:
        values = run(ip, "%pmap --errors collect inv, range(6)")
    assert sum(isinstance(v, mpmagic.Failed) for v in values) == 1
    [report] = shown(cap)
    assert "<table" in report["text/html"] and ">failed</th>" in report["text/html"]
    assert report["text/plain"].startswith("pmap: 6 items (1 failed) on 2 workers")


def test_a_failed_cell_shows_one_line_naming_the_ranks(ip, pool2):
    with capture_output() as cap:
        result = ip.run_cell("%%parallel -n 3\n1 / (rank - 1)\n", store_history=False)
    assert isinstance(result.error_in_exec, mpmagic.ParallelError)
    [report] = shown(cap)
    assert re.fullmatch(r"parallel: 1 of 3 ranks failed \(rank 1\), [\d.]+ (µs|ms|s)", report["text/plain"]), report
    assert "<table" not in report["text/html"]


# -- issue 22 item 5: options ------------------------------------------------------

TYPOS = [
    ("%pmap --worker 2 abs, [1]", "%pmap: unknown option --worker; did you mean -n/--workers?"),
    ("%pmap --work 2 abs, [1]", "%pmap: unknown option --work; did you mean -n/--workers?"),  # no abbreviations
    ("%pmap --chunk 4 abs, [1]", "%pmap: unknown option --chunk; did you mean --chunksize?"),
    ("%pmap --comapre abs, [1]", "%pmap: unknown option --comapre; did you mean --compare?"),
    ("%pmap --zzz abs, [1]", "%pmap: unknown option --zzz"),
    ("%%parallel --worker 2\nrank", "%%parallel: unknown option --worker; did you mean -n/--workers?"),
    ("%%parallel --gathr x\nrank", "%%parallel: unknown option --gathr; did you mean --gather?"),
    ("%%parallel -n 2 extra\nrank", "%%parallel: unexpected argument 'extra'"),
    ("%pool start --worker 2", "%pool: unknown option --worker; did you mean -n/--workers?"),
    ("%pool start --start-metod spawn", "%pool: unknown option --start-metod; did you mean --start-method?"),
    # a short option in the other case (the Shift key) was named with no suggestion
    ("%pmap -N 2 abs, [1]", "%pmap: unknown option -N; did you mean -n/--workers?"),
    ("%pmap -Q abs, [1]", "%pmap: unknown option -Q; did you mean -q/--quiet?"),
    ("%%parallel -O out\nrank", "%%parallel: unknown option -O; did you mean -o/--output?"),
    ("%pool start -N 2", "%pool: unknown option -N; did you mean -n/--workers?"),
]

OTHER_USAGE_ERRORS = [
    "%pmap",
    "%pmap abs",
    "%pmap abs, [1], key=2",
    "%pmap -n 0 abs, [1]",
    "%pmap --star abs, [1], [2]",
    "%%parallel --reduce 42\nrank",
    "%%parallel -o 1x\nrank",
    "%pool resize 0",
    "%pool frobnicate",
    "%pool start -n 100000",
]


def _usage_error(ip, cell: str) -> list[str]:
    with capture_output() as cap:
        result = ip.run_cell(cell, store_history=False)
    err = result.error_in_exec or result.error_before_exec
    assert isinstance(err, IPythonUsageError), repr(err)
    assert "Traceback" not in cap.stdout + cap.stderr
    return str(err).splitlines()


@pytest.mark.parametrize("cell, first", TYPOS, ids=[c.split("\n")[0] for c, _ in TYPOS])
def test_an_unknown_option_is_named_with_the_closest_one(ip, pool2, cell, first):
    lines = _usage_error(ip, cell)
    magic = first.split(":")[0]
    assert lines[0] == first
    assert len(lines) == 2 and lines[1].startswith(f"usage: {magic} ") and lines[1].endswith(f"(see {magic}?)")


@pytest.mark.parametrize("cell", OTHER_USAGE_ERRORS, ids=[c.split("\n")[0] for c in OTHER_USAGE_ERRORS])
def test_every_usage_error_ends_with_the_pointer_to_the_help(ip, pool2, cell):
    lines = _usage_error(ip, cell)
    magic = cell.split()[0]
    assert lines[0].startswith(f"{magic}: ") and len(lines) == 2, lines
    assert lines[-1].endswith(f"(see {magic}?)"), lines


def test_a_task_raising_our_usage_error_is_the_tasks_error_not_the_lines(ip, pool2):
    run(ip, "import mpmagic\ndef picky(x):\n    raise mpmagic.UsageError('picky says no')\n")
    with capture_output():
        result = ip.run_cell("%pmap -q picky, [1]", store_history=False)
    assert isinstance(result.error_in_exec, mpmagic.UsageError), repr(result.error_in_exec)


def test_set_and_dict_literals_on_the_line_are_python_not_expanded(ip, pool2):
    """IPython expands {expr} in magic lines; %pmap's line is Python."""
    assert run(ip, "%pmap -q lambda x: x, {5, 1, 3}") == list({5, 1, 3})
    assert run(ip, "%pmap -q str, {'b': 1, 'a': 2}") == ["b", "a"]


# -- issue 22 item 4 / issue 13 class 6: an interrupt shows only our line --------


@pytest.mark.parametrize("magic, cell", [("%pmap", "%pmap -q spin, range(4)"),
                                         ("%pmap", "%pmap --scaling -n 2 spin, range(4)"),
                                         ("%%parallel", "%%parallel -n 2 -q\nwhile True:\n    pass\n")])
def test_an_interrupt_shows_only_our_line_in_a_shell(ip, pool2, magic, cell):
    text, err = interrupted_cell(ip, cell)
    assert type(err) is KeyboardInterrupt
    text = text.replace("spinning 0\n", "").replace("spinning 1\n", "")
    assert text.strip() == INTERRUPTED.format(magic=magic), text


def test_an_interrupted_pool_setup_says_in_one_line_that_it_stays_and_the_workers_go_on(ip, pool2):
    from mpmagic import setup_api, worker_setup

    try:
        text, err = interrupted_cell(ip, "%%pool setup\nimport time\ntime.sleep(1.5)\n")
        assert type(err) is KeyboardInterrupt
        assert text.strip() == (
            "KeyboardInterrupt: %%pool setup interrupted: the worker setup stays installed (%pool setup shows it) "
            "and the workers go on running it (a run waits for it); %pool setup clear removes it "
            "and replaces the workers still running it (so does a new %%pool setup)"), text
        with capture_output() as shown:
            run(ip, "%pool setup")
        assert "time.sleep(1.5)" in shown.stdout  # as the line says
    finally:
        worker_setup.clear()
        setup_api.apply_now()  # (waits for the workers still sleeping)
    assert run(ip, "%pmap -q abs, [-1, 2]") == [1, 2]


@pytest.fixture(scope="module")
def kernel():
    from test_kernel import Kernel

    k = Kernel()
    try:
        k.ok("%load_ext mpmagic\n%pool start -n 2\n"
             "def spin(x):\n    print('spinning', x, flush=True)\n    while True:\n        pass\n")
        yield k
    finally:
        k.close()


@pytest.mark.parametrize("magic, cell, when", [
    ("%pmap", "%pmap -q spin, range(4)", "spinning"),
    ("%%parallel", "%%parallel -n 2 -q\nprint('rank', rank, 'started', flush=True)\nwhile True:\n    pass\n",
     ("[rank 0] rank 0 started", "[rank 1] rank 1 started")),
])
def test_an_interrupt_shows_only_our_line_in_a_kernel(kernel, magic, cell, when):
    reply = kernel.execute(cell, interrupt_when=when)
    assert reply.status == "error" and reply.ename == "KeyboardInterrupt"
    errors = [c for t, c in reply.outputs if t == "error"]
    assert len(errors) == 1 and errors[0]["traceback"] == [INTERRUPTED.format(magic=magic)], errors
    everything = str(reply.outputs)
    assert "magics.py" not in everything and "Traceback" not in everything


# -- issue 22 item 6: polish ---------------------------------------------------------


def _report(**kw) -> Report:
    base = dict(kind="pmap", items=8, workers=2, backend="local", start_method="forkserver",
                wall=1.0, task_seconds=1.8, chunks=8, chunksize="auto (1)")
    return Report(**{**base, **kw})


def test_microseconds_are_written_with_the_micro_sign():
    assert fmt_seconds(4.2e-6) == "4 µs"
    assert fmt_seconds(0.0123) == "12.3 ms"


def test_tiny_speedups_read_below_a_tenth():
    assert "speedup <0.1x" in _report(task_seconds=0.03).line()
    assert "speedup <0.1x" in _report(serial=0.002).line()
    assert "speedup ~0.1x" in _report(task_seconds=0.12).line()
    assert "speedup 0.12x" in _report(serial=0.12).line()


def test_chunk_size_in_words():
    rows = dict(_report().rows())
    assert rows["chunk size"] == "auto: 1 item per chunk, 8 chunks"
    assert dict(_report(chunksize="auto (2-5)", chunks=3).rows())["chunk size"] == "auto: 2-5 items per chunk, 3 chunks"
    assert dict(_report(chunksize="4", chunks=1).rows())["chunk size"] == "4 items per chunk, 1 chunk"
    # chunks sent smaller than the size given (a worker's max_tasks_per_child allowance): what went, and what was asked
    assert dict(_report(chunksize="5", chunksize_asked=40, chunks=20, items=100).rows())["chunk size"] == (
        "5 items per chunk (cut from the 40 asked), 20 chunks")


def test_a_real_run_reports_its_chunks_in_words(ip, pool2):
    run(ip, "%pmap -q --chunksize 1 abs, range(4)")
    assert dict(api.last_report().rows())["chunk size"] == "1 item per chunk, 4 chunks"


def test_failed_repr_names_item_input_and_error(ip, pool2):
    values = run(ip, "%pmap -q --errors collect lambda x: 1 / x, [1, 0]")
    assert repr(values[1]) == "<Failed item 1: input=0, ZeroDivisionError: division by zero>"


def test_pool_heading_is_not_squeezed_into_a_caption(ip, pool2):
    shm.pool().trim(0)  # (free segments an earlier file's maps kept would add their own row)
    page = run(ip, "%pool")._repr_html_()
    assert "<caption" not in page
    assert re.search(r"<div style='[^']*white-space:nowrap'>pool: local, 2 workers", page), page
    assert page.count("<tr>") == 4  # header, one row per worker, the counts


def test_pool_local_confirms_that_nothing_was_stopped(ip, pool2):
    status = run(ip, "%pool local")
    assert str(status).splitlines()[0] == "%pool local: already on local worker processes; nothing was stopped"
    assert "nothing was stopped" in status._repr_html_()


DASK_INFO = {
    "backend": "dask", "cluster": "connected to a running scheduler", "scheduler": "tcp://127.0.0.1:8786",
    "running": True, "calls_run": 3, "tasks_run": 12, "dashboard": "http://127.0.0.1:8787/status",
    "workers": 2, "threads": 2, "memory_limit": 4 * 2**30,
    "processes": [
        {"address": "tcp://127.0.0.1:40001", "name": "w0", "host": "127.0.0.1", "threads": 1,
         "memory": 120 * 2**20, "memory_limit": 2 * 2**30, "executing": 0},
        {"address": "tcp://127.0.0.1:40002", "name": "w1", "host": "127.0.0.1", "threads": 1,
         "memory": 130 * 2**20, "memory_limit": 2 * 2**30, "executing": 1},
    ],
}


def test_dask_status_table_has_readable_headers_decimal_units_and_a_link():
    page = PoolStatus(DASK_INFO)._repr_html_()
    heads = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    assert heads == ["worker", "name", "threads", "memory used", "memory limit", "tasks running"]
    assert "126 MB" in page and "2.1 GB" in page and "4.3 GB" in page  # fmt.fmt_bytes, as everywhere
    assert "GiB" not in page and "GiB" not in str(PoolStatus(DASK_INFO))
    assert "<a href='http://127.0.0.1:8787/status' target='_blank'>" in page
    assert "<caption" not in page


def test_dask_status_and_switching_back_to_local(ip, dask_cluster):
    try:
        run(ip, f"%pool dask {dask_cluster.address}")
        run(ip, "%pmap -q abs, range(4)")
        status = run(ip, "%pool")
        page = status._repr_html_()
        assert ">memory used</th>" in page and "GiB" not in page and "GiB" not in str(status)
        assert page.count("<tr>") == 1 + status.info["workers"] + 4  # header, workers, notes
        back = run(ip, "%pool local")
        assert str(back).splitlines()[0] == (
            f"%pool local: disconnected from the Dask scheduler at {dask_cluster.address} "
            "(its workers keep running); now on local worker processes"
        )
        assert pool.get_pool().name == "local"
    finally:
        if pool.get_pool().name != "local":
            pool.shutdown()


def test_insights_timeline_has_a_legend(ip, pool2):
    pytest.importorskip("matplotlib")
    run(ip, "%pmap -q --insights abs, range(40)")
    insights = api.last_report().insights
    assert TEXT_LEGEND in str(insights)
    [legend] = insights.figure().legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["a chunk of items", "the next chunk on that worker", "holds the slowest item"]


def test_scaling_plot_has_a_table_of_the_measured_points(ip, pool2):
    scaling = run(ip, "%pmap --scaling -n 2 abs, range(8)")
    page = scaling._repr_html_()
    rows = re.findall(r"<tr><td[^>]*>(\d)</td>", page)
    assert rows == ["1", "2"], page[-800:]
    # Each measured point in its own row, figures as the run's report line writes them
    # (a speedup below a tenth reads "<0.1x" there and here, not "0.00x").
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr><td.*?</tr>", page)]
    for p, row in zip(scaling.points, cells, strict=True):
        assert row[0] == str(p.workers) and fmt_seconds(p.wall) in row and fmt_speedup(p.speedup).replace("<", "&lt;") in row, row
