"""Bugs that mypy's checks found once the Round 2 override came off.

Each test drives the real code path the type error pointed at.
"""

from __future__ import annotations

import signal
import threading

import pytest

from mpmagic import interrupts


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread only")
def test_a_sigint_handler_installed_from_c_is_left_alone(monkeypatch):
    """signal.getsignal() is None for a handler installed from C: the guard
    must not replace it (signal.signal cannot put None back; restoring raised
    TypeError at the start of the next run)."""
    before = signal.getsignal(signal.SIGINT)
    try:
        monkeypatch.setattr(signal, "getsignal", lambda signum: None)
        interrupts.absorb_late_interrupts()
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is before  # no guard put over it
        interrupts.restore()  # nothing to restore, and no TypeError
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        monkeypatch.undo()
        interrupts._installed = None
        signal.signal(signal.SIGINT, before)


def test_magics_without_a_shell_say_so():
    """Magics(shell=None) is allowed; running ours then read None.user_ns
    (AttributeError). Now it is a one-line error saying what to do."""
    from IPython.core.error import UsageError as IPythonUsageError

    from mpmagic.errors import UsageError
    from mpmagic.magics import MPMagics

    magics = MPMagics()
    with pytest.raises(UsageError, match="need an IPython shell: load them with %load_ext mpmagic"):
        magics.pmap("abs, [1, -2]")
    # (%%parallel reads the namespace inside its run: the magic's usage error says it)
    with pytest.raises(IPythonUsageError, match="need an IPython shell: load them with %load_ext mpmagic"):
        magics.parallel("-n 2", "rank")


GOOD_USER_CODE = '''
from __future__ import annotations
import mpmagic
from mpmagic import Failed, Run, as_completed, imap, parallel, pmap, submit


def square(x: int) -> int:
    return x * x


def main() -> None:
    out: list[int] = pmap(square, range(3), workers=2, seed=1)
    mixed: list[int | Failed] = pmap(square, range(3), errors="collect")
    run: Run[list[int]] = submit(square, range(3), chunksize=1)
    total: int = sum(run.result(timeout=5.0)) + sum(as_completed(run))
    later: Run[list[int]] = pmap(square, range(3), block=False)
    streamed: list[str] = [str(x + 1) for x in imap(square, range(3), ordered=False, seed=2)]
    ranks: mpmagic.RankValues = parallel("rank", workers=2)
    best: int = parallel("rank", workers=2, reduce=max)
    wid: int | str | None = mpmagic.worker_id()
    x: float = mpmagic.rng().random()
    mpmagic.start_pool(workers=2, gpus=[0, 1]).workers + 1
    print(out, mixed, total, later, streamed, ranks, best, wid, x)
'''

BAD_USER_CODE = '''
import mpmagic


def square(x: int) -> int:
    return x * x


def main() -> None:
    mpmagic.pmapp(square, range(3))
    s: str = mpmagic.pmap(square, range(3))
    for x in mpmagic.imap(square, range(3)):
        x.upper()
    print(s)
'''


def test_mypy_strict_checks_user_code_against_the_api(tmp_path):
    """mypy --strict on a user's script: the API's real types pass documented
    use, and catch a misspelled name and a wrong type. The module-level
    __getattr__ (lazy imports) had made every name Any, misspellings too, and
    pmap / submit / imap returned Any."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "good.py").write_text(GOOD_USER_CODE)
    (tmp_path / "bad.py").write_text(BAD_USER_CODE)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MYPYPATH": str(root)}  # this checkout's mpmagic; its own errors silent, as an install's
    # A cache kept between runs (gitignored, as mkdocs-jupyter's next to it): a cold
    # mypy reads some 800 modules (typeshed, IPython, numpy...) in 10-18 s, a warm
    # one under a second. mypy rechecks whatever changed since (it compares each
    # file's size, mtime and hash, and the options), so the result is a cold run's.
    cache = root / ".cache" / "mypy-user-code"
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
                          "--cache-dir", str(cache), "good.py", "bad.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert not [line for line in lines if line.startswith("good.py")], out.stdout
    bad = "\n".join(lines)
    assert 'bad.py:10: error: Module has no attribute "pmapp"' in bad
    assert 'bad.py:11: error: Incompatible types in assignment (expression has type "list[int]", variable has type "str")' in bad
    assert 'bad.py:13: error: "int" has no attribute "upper"' in bad
