"""The run engine in a real Jupyter kernel: an interrupt cancels the run it hit
and no other (issue 15, point 2). Helpers from tests/test_kernel.py."""

from __future__ import annotations

import pytest

pytest.importorskip("jupyter_client")
from test_kernel import INTERRUPT_BOUND  # noqa: E402


def test_interrupt_cancels_the_cells_run_and_another_threads_run_goes_on(kernel):
    kernel.ok(
        "import threading, time, mpmagic\n"
        "def steady(x):\n    time.sleep(0.05)\n    return x * 3\n"
        "def spin(x):\n    print('spinning', x, flush=True)\n    while True:\n        pass\n"
        "box = {}\n"
        "def background():\n"
        "    try:\n        box['result'] = mpmagic.pmap(steady, range(60), chunksize=1)\n"
        "    except BaseException as exc:\n        box['result'] = repr(exc)\n"
        "bg = threading.Thread(target=background)\n"
        "bg.start()\n"
    )
    reply = kernel.execute("%pmap spin, range(4)", interrupt_when="spinning")
    assert reply.status == "error" and reply.ename == "KeyboardInterrupt", reply.outputs
    assert reply.after_interrupt is not None and reply.after_interrupt < INTERRUPT_BOUND
    assert "spinning" in reply.stream()
    kernel.ok("bg.join(60)")
    assert kernel.value("box['result'] == [x * 3 for x in range(60)]") is True, kernel.value("str(box['result'])[:300]")
    assert kernel.value("mpmagic.get_pool().status()['runs_in_flight']") == 0
    assert kernel.ok("%pmap -q lambda x: -x, range(3)").result() == "[0, -1, -2]"
