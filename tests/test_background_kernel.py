"""Background runs in a real Jupyter kernel (issue 16): the kernel stays free,
the run's output goes to the starting cell's live area (by display id), and
an interrupt of a foreground cell leaves the background run alone.
Helpers from tests/test_kernel.py."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("jupyter_client")
from test_kernel import INTERRUPT_BOUND, Kernel  # noqa: E402

BG_TEXT = "bg-item"


@pytest.fixture(scope="module")
def kernel():
    k = Kernel()
    try:
        k.ok(
            "%load_ext mpmagic\n%pool start -n 2\n"
            "import time, mpmagic\n"
            f"def slow(x):\n    time.sleep(0.5)\n    print('{BG_TEXT}', x, flush=True)\n    return x * x\n"
            "def spin(x):\n    print('spinning', x, flush=True)\n    while True:\n        pass\n"
            "def picky(x):\n    if x == 13:\n        raise KeyError(f'no {x}')\n    return x\n"
        )
        yield k
    finally:
        k.close()


def _mentions(content: dict) -> bool:
    return BG_TEXT in str(content)


def _display_id(outputs: list) -> str:
    ids = [c["transient"]["display_id"] for t, c in outputs if t == "display_data" and c.get("transient")]
    assert len(ids) == 1, outputs
    return ids[0]


def test_a_background_run_leaves_the_kernel_free_and_its_output_goes_to_its_own_cell(kernel):
    start = kernel.ok("run = %pmap --bg slow, range(12)")  # ~3 s on 2 workers
    live_id = _display_id(start.outputs)
    later = [kernel.ok("1 + 1"), kernel.ok("print('foreground')"), kernel.ok("run.done()")]
    assert later[0].result() == "2" and later[1].stream() == "foreground\n"
    assert later[2].result() == "False"  # the three cells ran while the run went on
    waited = kernel.ok("run.result(60) == [x * x for x in range(12)]")
    assert waited.result() == "True"
    time.sleep(0.5)  # the pump's last redraw
    tail = kernel.ok("run.report().items")
    assert tail.result() == "12"
    # Every message about the run's output is a redraw of the starting cell's
    # area (its display id), never a stream message in a later cell.
    later += [waited, tail]
    messages = start.arrived + [m for reply in later for m in reply.arrived]  # (in the order they came)
    mentions = [(t, c) for t, c in messages if _mentions(c)]
    assert mentions, "the tasks' output was never shown"
    for t, c in mentions:
        assert t in ("display_data", "update_display_data"), (t, c)
        assert c["transient"]["display_id"] == live_id, c
    for reply in later:
        assert BG_TEXT not in reply.stream() and BG_TEXT not in reply.stream("stderr")
    last = [c for t, c in messages if t == "update_display_data" and c["transient"]["display_id"] == live_id][-1]
    text = last["data"]["text/plain"]
    assert "12/12 items" in text and "done" in text and "speedup" in text, text


def test_an_interrupt_stops_the_foreground_cell_and_the_background_run_goes_on(kernel):
    kernel.ok("run2 = %pmap --bg slow, range(10)")
    reply = kernel.execute("%pmap spin, range(1)", interrupt_when="spinning")
    assert reply.status == "error" and reply.ename == "KeyboardInterrupt", reply.outputs
    assert reply.after_interrupt is not None and reply.after_interrupt < INTERRUPT_BOUND
    assert kernel.value("run2.result(60) == [x * x for x in range(10)]") is True
    assert kernel.value("mpmagic.get_pool().status()['runs_in_flight']") == 0


def test_pool_lists_and_cancels_a_background_run(kernel):
    kernel.ok("run3 = %pmap --bg slow, range(40)")
    listing = kernel.ok("%pool runs").result()
    assert "pmap slow" in listing and "running" in listing, listing
    kernel.ok("%pool cancel {run3.id}".replace("{run3.id}", str(kernel.value("run3.id"))))
    assert kernel.value("run3.state") == "cancelled"
    out = kernel.execute("run3.result()")
    assert out.status == "error" and out.ename == "CancelledError"
    assert kernel.value("mpmagic.get_pool().status()['runs_in_flight']") == 0


def test_a_failing_background_run_shows_its_error_at_once_and_raises_it_in_result(kernel):
    start = kernel.ok("bad = %pmap --bg picky, range(30)")
    live_id = _display_id(start.outputs)
    waited = kernel.ok("bad.wait(60)")
    time.sleep(0.5)  # the pump's last redraw
    tail = kernel.execute("bad.result()")
    assert tail.status == "error" and tail.ename == "KeyError"
    messages = start.arrived + waited.arrived + tail.arrived  # (in the order they came)
    drawn = [c["data"]["text/plain"] for t, c in messages
             if t == "update_display_data" and c["transient"]["display_id"] == live_id]
    assert drawn and "KeyError: 'no 13' (run.result() raises it)" in drawn[-1], drawn[-1:]


def _one_line_error(reply) -> str:
    """The one line a cell's error showed (asserting it was one line, no traceback)."""
    assert reply.status == "error" and reply.ename == "KeyboardInterrupt", reply.outputs
    errors = [c["traceback"] for t, c in reply.outputs if t == "error"]
    assert len(errors) == 1 and len(errors[0]) == 1, errors
    assert "Traceback" not in str(reply.outputs) and ".py" not in errors[0][0], errors
    return errors[0][0]


def test_an_interrupted_wait_on_a_run_is_one_line_saying_what_became_of_the_run(kernel, tmp_path):
    """Interrupt kernel while a cell waits on a background run (as_completed,
    result()) or loops over a stream: one line, never a traceback through our
    waiting code; the background run goes on, the stream's run is cancelled.
    The items wait for a file the test makes, so none can finish while an
    interrupt is on its way: one landing in the cell's own loop body would
    rightly be the user's traceback, not ours."""
    release, never = tmp_path / "release", tmp_path / "never"
    kernel.ok(
        "import os\n"
        "def held(x, path):\n    while not os.path.exists(path):\n        time.sleep(0.01)\n    return x * x\n"
        f"run5 = mpmagic.submit(held, range(4), [{str(release)!r}] * 4)"
    )
    run_id = kernel.value("run5.id")
    waiting = "print('waiting', flush=True)\n"
    for wait in ("for v in mpmagic.as_completed(run5):\n    pass", "run5.result()"):
        line = _one_line_error(kernel.execute(waiting + wait, interrupt_when="waiting", interrupt_after=0.3))
        assert line.endswith(f"interrupted: run {run_id} (pmap held) goes on in the background; "
                             f"cancel() on its handle (or %pool cancel {run_id}) stops it"), line
    assert kernel.value("run5.done()") is False
    release.touch()
    assert kernel.value("run5.result(60) == [x * x for x in range(4)]") is True
    stream = f"for v in mpmagic.imap(held, range(4), [{str(never)!r}] * 4):\n    pass"
    line = _one_line_error(kernel.execute(waiting + stream, interrupt_when="waiting", interrupt_after=0.3))
    assert line.startswith("KeyboardInterrupt: imap interrupted: its run ") and "was cancelled" in line, line
    assert kernel.value("mpmagic.runs()[-1].state") == "cancelled"
    assert kernel.value("mpmagic.get_pool().status()['runs_in_flight']") == 0


def test_an_awaited_apmap_prints_its_tasks_output_in_its_cell_as_pmap_does(kernel):
    """apmap's run never reached the user: its output belongs to the awaiting cell, as a stream."""
    reply = kernel.ok("await mpmagic.apmap(slow, range(2))")
    assert reply.result() == "[0, 1]"
    assert sorted(reply.stream().splitlines()) == [f"{BG_TEXT} 0", f"{BG_TEXT} 1"]
    assert not [t for t, c in reply.outputs if t == "display_data"]  # no live area: nothing to redraw


@pytest.mark.parametrize("code, who", [("%pool stop", "%pool stop"), ("mpmagic.stop_pool()", "stop_pool()")])
def test_an_interrupt_during_pool_stop_with_busy_workers_finishes_the_stop_and_says_so_in_one_line(kernel, code, who):
    """Kernel interrupt while %pool stop (stop_pool()) waited for busy workers: the
    stop was cut short. stop_pool() showed a bare KeyboardInterrupt through
    multiprocessing's join (%pool stop: "interrupted before it finished"), the
    busy workers went on computing out of the pool (no later stop reached them;
    an endless task ran until the kernel died) and its segments stayed. The stop
    now finishes first: one line, no worker left, and the pool starts again."""
    import psutil

    kernel.ok("run6 = mpmagic.submit(spin, range(2))")  # never ends: the stop waits 2 s for its workers
    busy = "sum(p['busy'] for p in mpmagic.pool_status().info['processes'])"
    deadline = time.monotonic() + 30
    while kernel.value(busy) == 0:
        assert time.monotonic() < deadline, "the spinning run never reached a worker"
        time.sleep(0.1)
    workers = kernel.value("[s.pid for s in mpmagic.get_pool().slots]")
    reply = kernel.execute(f"print('stopping', flush=True)\n{code}", interrupt_when="stopping", interrupt_after=0.3)
    assert _one_line_error(reply) == (
        f"KeyboardInterrupt: {who} interrupted: the stop was finished first, and none of the pool's "
        "workers is left running")

    def alive(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    helpers = ("resource_tracker", "forkserver")  # multiprocessing's, the kernel's direct children
    left = [p.pid for p in kernel.descendants() if alive(p)
            and not (p.ppid() == kernel.pid and any(h in " ".join(p.cmdline()) for h in helpers))]
    assert left == [], (left, workers)
    assert kernel.value("run6.state") == "failed"
    kernel.ok("%pool start -n 2")
    assert kernel.ok("%pmap -q lambda x: -x, range(5)").result() == "[0, -1, -2, -3, -4]"
