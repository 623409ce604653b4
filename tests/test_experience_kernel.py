"""The progress bar in a real Jupyter kernel: it shows, and an interrupt closes it.

The kernel is this venv's ``python3`` kernelspec started by jupyter_client;
"interrupt kernel" is ``KernelManager.interrupt_kernel()``, the same SIGINT a
notebook front end sends. The kernel (and its pool) is always shut down in
the fixture's teardown.
"""

from __future__ import annotations

import ast
import os
import time
from queue import Empty

import pytest

jupyter_client = pytest.importorskip("jupyter_client")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _execute(kc, code: str, timeout: float = 60.0) -> tuple[dict, list[dict]]:
    """Run ``code``; return its shell reply and the iopub messages it caused."""
    msg_id = kc.execute(code)
    return _finish(kc, msg_id, timeout)


def _finish(kc, msg_id: str, timeout: float, seen: list | None = None) -> tuple[dict, list[dict]]:
    """Collect iopub messages of ``msg_id`` until the kernel is idle again, then the reply."""
    deadline = time.monotonic() + timeout
    msgs = seen if seen is not None else []
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the kernel did not finish within {timeout:g} s"
        try:
            msg = kc.get_iopub_msg(timeout=min(left, 1.0))
        except Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        msgs.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    # This request's reply: not an extra kernel_info reply that wait_for_ready
    # left behind (it asks again each second a loaded kernel is slow to answer),
    # which made every later cell read the reply of the cell before it.
    reply = kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
    return reply, msgs


def _collect_until(kc, msg_id: str, seen: list[dict], deadline: float, found, what: str) -> None:
    """Add ``msg_id``'s iopub messages to ``seen`` until one of them is ``found``."""
    while not any(found(m) for m in seen):
        assert time.monotonic() < deadline, f"{what} within 30 s: {[m['msg_type'] for m in seen]}"
        try:
            msg = kc.get_iopub_msg(timeout=1.0)
        except Empty:
            continue
        if msg["parent_header"].get("msg_id") == msg_id:
            seen.append(msg)


def _value(msgs: list[dict]):
    for m in msgs:
        if m["msg_type"] == "execute_result":
            return ast.literal_eval(m["content"]["data"]["text/plain"])
    errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
    raise AssertionError(f"no value: {errors}")


def _widget_opened(msg: dict) -> bool:
    """tqdm's notebook bar appeared: the comm of an ipywidgets progress model opened.

    ipywidgets is in the test extra, so in this kernel the bar is the widget
    (tqdm.auto's choice in Jupyter), never the text bar on stderr.
    """
    if msg["msg_type"] != "comm_open":
        return False
    model = msg["content"].get("data", {}).get("state", {}).get("_model_name")
    return model in ("FloatProgressModel", "IntProgressModel")  # the bar (not its style model)


@pytest.fixture
def kernel():
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(cwd=ROOT)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        try:
            _execute(kc, "import mpmagic; mpmagic.stop_pool()", timeout=20)
        except Exception:
            pass
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_progress_bar_closed_after_interrupt(kernel):
    km, kc = kernel
    reply, msgs = _execute(
        kc,
        "%load_ext mpmagic\n"
        "%config MPMagic.progress_delay = 0.3\n"
        "%pool start -n 2\n"
        "import time\n"
        "def slow(x):\n"
        "    time.sleep(0.5)\n"
        "    return x\n",
    )
    assert reply["content"]["status"] == "ok", msgs
    # 400 items of 0.5 s on 2 workers would take 100 s: only the interrupt ends it soon.
    # One item a chunk: the planner's first chunks of 16 items kept the bar at 0 for 8 s.
    msg_id = kc.execute("%pmap --chunksize 1 slow, range(400)")
    seen: list[dict] = []
    deadline = time.monotonic() + 30
    _collect_until(kc, msg_id, seen, deadline, _widget_opened, "no progress widget")
    # Interrupted once the bar counts an item (a fixed wait interrupted a loaded
    # machine's run before any item ended, and the check below wants 0 < n).
    bar = next(m["content"]["comm_id"] for m in seen if _widget_opened(m))
    _collect_until(kc, msg_id, seen, deadline, lambda m: m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == bar
                   and m["content"]["data"].get("state", {}).get("value", 0) >= 1, "the bar counted no item")
    km.interrupt_kernel()
    reply, msgs = _finish(kc, msg_id, timeout=30, seen=seen)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"

    # In the kernel: the bar was shown, then closed as interrupted; tqdm holds no open bar.
    _, msgs = _execute(
        kc,
        "import mpmagic.progress as P\n"
        "from tqdm.std import tqdm as T\n"
        "(P.last.shown, P.last.closed, P.last.outcome, len(T._instances), 0 < P.last.n < 400)",
    )
    assert _value(msgs) == (True, True, "interrupted", 0, True)

    # The notebook widget (seen above) turned red: its state marks the stopped run.
    bars = [m["content"]["comm_id"] for m in seen if _widget_opened(m)]
    assert len(bars) == 1, bars
    updates = [
        m["content"]["data"].get("state", {})
        for m in seen
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == bars[0]
    ]
    assert any(u.get("bar_style") == "danger" for u in updates), updates[-3:]

    # The pool is ready for the next run, and a short run shows no bar.
    reply, msgs = _execute(kc, "%config MPMagic.progress_delay = 1.0\nres = %pmap -q abs, range(-3, 3)\nres")
    assert reply["content"]["status"] == "ok"
    assert _value(msgs) == [3, 2, 1, 0, 1, 2]
    _, msgs = _execute(kc, "P.last.shown")
    assert _value(msgs) is False


def test_finished_bars_beyond_the_last_few_become_still_copies_and_the_kernel_lets_their_widgets_go(kernel):
    """Every run that showed a bar kept its ipywidgets (11) registered in the kernel for
    good: ipywidgets' registry and the kernel's comms grew by a bar per long run. Past the
    last KEEP_WIDGET_BARS, a finished bar's output is replaced (update_display_data, by its
    display id) by its still copy, then its widgets' comms are closed."""
    km, kc = kernel
    reply, msgs = _execute(
        kc,
        "%load_ext mpmagic\n"
        "%pool start -n 2\n"
        "import time, mpmagic, mpmagic.progress as P\n"
        "from ipywidgets.widgets import widget as W\n"
        "def nap(x):\n"
        "    time.sleep(0.05)\n"
        "    return x\n"
        "mpmagic.pmap(abs, range(4), show_report=False)\n"
        "BEFORE = len(W._instances)\n"
        "P.KEEP_WIDGET_BARS",
    )
    assert reply["content"]["status"] == "ok", msgs
    kept = _value(msgs)
    runs = kept + 2
    reply, msgs = _execute(
        kc,
        f"for _ in range({runs}):\n"
        "    assert mpmagic.pmap(nap, range(4), chunksize=1, progress=True, progress_delay=0, show_report=False) "
        "== [0, 1, 2, 3]\n"
        "    assert P.last.shown\n"
        "(len(W._instances) - BEFORE, len(P._widget_bars))",
        timeout=120,
    )
    assert reply["content"]["status"] == "ok", msgs
    assert _value(msgs) == (kept * 11, kept)
    shown = [m for m in msgs if m["msg_type"] == "display_data"
             and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
    assert len(shown) == runs
    ids = [m["content"]["transient"]["display_id"] for m in shown]
    updates = [m for m in msgs if m["msg_type"] == "update_display_data"]
    assert [m["content"]["transient"]["display_id"] for m in updates] == ids[:2]
    for m in updates:
        assert "<progress value='4' max='4'" in m["content"]["data"]["text/html"], m["content"]["data"]
        assert m["content"]["data"]["text/plain"].startswith("pmap: 100% 4/4 ["), m["content"]["data"]
    opened = {m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_open"}
    closed = {m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_close"}
    assert len(opened) == runs * 11 and len(closed) == 2 * 11 and closed <= opened
    retired = {m["content"]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] for m in shown[:2]}
    assert retired <= closed  # (the two oldest bars' containers among them)
