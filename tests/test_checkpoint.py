"""Durable runs (issue 17): %pmap --checkpoint, %%parallel --checkpoint, the store.

Functions are defined with ``ip.run_cell`` (no file, as in a notebook) and
record every call in a file, so a test knows which items were really
computed. Serial Python is the oracle for the values. Every store lives in a
tmp dir (``%config MPMagic.checkpoint_dir``).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
from conftest import run
from IPython.utils.capture import capture_output

import mpmagic
from mpmagic import api, checkpoint
from mpmagic.checkpoint_keys import item_key, keyed_copy, run_key, unstable_reason
from mpmagic.checkpoint_store import DB_NAME, Store
from mpmagic.fmt import fmt_bytes

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store_dir(ip, tmp_path):
    """A fresh checkpoint folder for this test, and a recording `work` function."""
    folder = tmp_path / "ckpt"
    record = tmp_path / "calls.txt"
    run(ip, f"%config MPMagic.checkpoint_dir = {str(folder)!r}")
    run(ip, f"RECORD = {str(record)!r}\nOFFSET = 0\n"
            "def work(x):\n"
            "    with open(RECORD, 'a') as f:\n"
            "        f.write(f'{x}\\n')\n"
            "    return x * x + OFFSET\n")
    yield folder
    checkpoint.close_stores()


def calls(ip) -> list:
    path = Path(ip.user_ns["RECORD"])
    if not path.exists():
        return []
    out = [int(line) for line in path.read_text().split()]
    path.unlink()
    return out


# --------------------------------------------------------------------------
# keys


_KEY_SCRIPT = textwrap.dedent("""
    import sys
    from mpmagic.checkpoint_keys import run_key, item_key
    src = '''
    import math
    SCALE = 3
    class Point:
        def __init__(self, x): self.x = x
        def norm(self): return abs(self.x)
    def helper(v):
        return v if v in {"a", "b", "c", "d"} else Point(v).norm() * SCALE
    def work(x, *, k=2):
        return helper(x) + math.sqrt(k)
    '''
    ns = {"__name__": "__main__"}
    exec(compile(src, sys.argv[1], "exec"), ns)
    print(run_key(ns["work"], False)[0].hex(), item_key(ns["Point"](3))[0].hex())
""")


def _key_in_new_process(filename: str, seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _KEY_SCRIPT, filename], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_run_key_is_equal_across_processes_with_other_filenames_and_hash_seeds():
    # A kernel's cell file has its pid in it; string hashing differs per process.
    a = _key_in_new_process("/tmp/ipykernel_111/abc.py", "1")
    b = _key_in_new_process("/tmp/ipykernel_222/def.py", "2")
    assert a == b


def test_run_key_changes_with_code_captured_global_called_function_and_default(ip):
    run(ip, "G = 1\ndef inner(x):\n    return x + G\ndef outer(x, d=5):\n    return inner(x) * 2\n")
    base = run_key(ip.user_ns["outer"], False)[0]
    assert run_key(ip.user_ns["outer"], False)[0] == base
    assert run_key(ip.user_ns["outer"], True)[0] != base  # star changes the call
    run(ip, "G = 2")
    assert run_key(ip.user_ns["outer"], False)[0] != base
    run(ip, "G = 1\ndef inner(x):\n    return x - G\n")
    assert run_key(ip.user_ns["outer"], False)[0] != base
    run(ip, "def inner(x):\n    return x + G\n")
    assert run_key(ip.user_ns["outer"], False)[0] == base
    run(ip, "def outer(x, d=6):\n    return inner(x) * 2\n")
    assert run_key(ip.user_ns["outer"], False)[0] != base


def test_a_notebook_class_moved_down_a_line_keeps_its_keys(ip):
    """Python 3.13 records the line a class starts on (``__firstlineno__``), and the
    keys had it: a comment added above a class the function uses, or whose instances
    are the items, gave every stored item a new key (0 of 6 from the checkpoint).
    Below 3.13 the attribute is written out, as 3.13 sets it."""
    def keys(pad: int) -> tuple[bytes, bytes]:
        own = "" if sys.version_info >= (3, 13) else f"    __firstlineno__ = {pad + 2}\n"
        run(ip, "\n" * pad + "# points\nclass Pt:\n" + own + "    def __init__(self, x):\n        self.x = x\n"
                "def use(x):\n    return Pt(x).x\n")
        return run_key(ip.user_ns["use"], False)[0], item_key(ip.user_ns["Pt"](3))[0]

    assert keys(0) == keys(3)


def test_item_keys_tell_items_apart_and_sets_of_strings_are_flagged():
    assert item_key(1)[0] == item_key(1)[0]
    assert item_key(1)[0] != item_key(1.0)[0] != item_key(True)[0]
    assert item_key((1, "a"))[0] != item_key((1, "b"))[0]
    np = pytest.importorskip("numpy")
    a = np.arange(300_000)
    assert item_key(a)[0] == item_key(a.copy())[0]
    b = a.copy()
    b[-1] = -1
    assert item_key(a)[0] != item_key(b)[0]
    if sys.flags.hash_randomization:
        assert unstable_reason(item_key({"x", "y"})[1]) is not None
    assert unstable_reason(item_key({1, 2})[1]) is None
    assert unstable_reason(item_key(("a", "b"))[1]) is None


def test_a_private_copy_has_the_key_of_its_item_and_keeps_the_keyed_state(ip):
    """Background runs send copies made when keyed (keyed_copy): their keys must
    be the blocking run's (item_key), or neither would find the other's results."""
    np = pytest.importorskip("numpy")
    run(ip, "class Box:\n    def __init__(self, v):\n        self.v = v\n")
    box = ip.user_ns["Box"]([1, 2])
    array = np.arange(300_000)
    for item in (7, "s", (1, "a"), {"v": [1]}, array, box, [box, array]):
        key, _, copy = keyed_copy(item)
        assert key == item_key(item)[0]
        assert item_key(copy)[0] == key
    _, _, copy = keyed_copy(array)
    array[0] = -1
    box.v.append(3)
    assert copy[0] == 0 and copy.flags.writeable
    assert keyed_copy(box)[2].v == [1, 2, 3] and type(keyed_copy(box)[2]) is type(box)


@pytest.mark.skipif(not sys.flags.hash_randomization, reason="string hashes are fixed (PYTHONHASHSEED)")
def test_a_captured_set_of_strings_is_flagged_once_in_one_line(ip, store_dir):
    run(ip, "WORDS = {'alpha', 'beta', 'gamma'}\ndef count(x):\n    return len(WORDS) + x\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(ip, "%pmap -q --checkpoint count, range(3)") == [3, 4, 5]
    flagged = [str(w.message) for w in caught if "set of strings" in str(w.message)]
    assert len(flagged) == 1 and "`count` captures" in flagged[0] and "\n" not in flagged[0]
    run(ip, "WORDS = ('alpha', 'beta', 'gamma')")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(ip, "%pmap -q --checkpoint count, range(3)")
    assert not [w for w in caught if "set of strings" in str(w.message)]


# --------------------------------------------------------------------------
# %pmap --checkpoint in a notebook-like shell


def test_a_resumed_runs_time_per_item_is_of_the_items_it_computed(ip, store_dir):
    """2,000 tiny items stored, 2,007 asked: the 7 computed items' task times were divided
    by 2,007 ("high for items this small: ~1 ns each")."""
    run(ip, "def sq_ck(x):\n    return x * x\n")
    assert run(ip, "%pmap -q --checkpoint sq_ck, range(2000)") == [x * x for x in range(2000)]
    assert run(ip, "%pmap -q --checkpoint sq_ck, range(2007)") == [x * x for x in range(2007)]
    report = api.last_report()
    assert "resumed: 2,000 of 2,007 items from the checkpoint, 7 computed" in report.line()
    per_item = report.task_seconds / 7
    if 0 < per_item < 1e-6:
        assert f"high for items this small: ~{per_item * 1e9:.0f} ns each" in report.line(), report.line()
    else:
        assert "ns each" not in report.line(), report.line()


def test_lines_about_one_item_say_item_not_items():
    """"resumed: 0 of 1 items" where the failure line said "of 1 item"."""
    from types import SimpleNamespace

    from conftest import synthetic_report

    one = {"resumed": 0, "total": 1, "computed": 1}
    assert "resumed: 0 of 1 item from the checkpoint, 1 computed" in synthetic_report(
        items=1, total=1, extra={"checkpoint": one}).line()
    assert "resumed: 0 of 1 rank from the checkpoint" in synthetic_report(
        kind="parallel", items=1, extra={"checkpoint": one}).line()
    assert "resumed: 3 of 8 items" in synthetic_report(extra={"checkpoint": {**one, "resumed": 3, "total": 8}}).line()
    assert "interrupted after 0 of 1 item finished" in synthetic_report(
        items=0, total=1, interrupted=True, failed=1).line()
    assert "for 0 of 1 item)" in synthetic_report(items=1, serial=1.0, extra={"compare_left_out": 1}).line()
    writer = SimpleNamespace(store=SimpleNamespace(readonly=False), error=None, items=1)
    plan = SimpleNamespace(keys=[b"k" * 16], missing=[0], results=[None])  # its one item computed and stored
    kept = checkpoint.MapCheckpoint.kept(SimpleNamespace(writer=writer, resumed=0, items=[1], total=1, plan=plan,
                                                         _offered={b"k" * 16}))
    assert kept == "; its checkpoint keeps the result of its one item: the same call again computes none"


def test_rerun_computes_nothing_new_items_only_they_and_report_says_so(ip, store_dir):
    assert run(ip, "%pmap -q --checkpoint work, range(30)") == [x * x for x in range(30)]
    assert sorted(calls(ip)) == list(range(30))
    assert run(ip, "%pmap -q --checkpoint work, range(30)") == [x * x for x in range(30)]
    assert calls(ip) == []
    assert "resumed: 30 of 30 items from the checkpoint, 0 computed" in api.last_report().line()
    assert run(ip, "%pmap -q --checkpoint work, range(40)") == [x * x for x in range(40)]
    assert sorted(calls(ip)) == list(range(30, 40))
    report = api.last_report()
    assert "resumed: 30 of 40 items from the checkpoint, 10 computed" in report.line()
    # Jupyter shows the table: its checkpoint cell (the line is also in its title)
    assert "<td style='padding:2px 10px;text-align:left'>30 of 40 items from the checkpoint, 10 computed</td>" in (
        report._repr_html_())
    assert run(ip, "%pmap -q work, range(5)") == [x * x for x in range(5)]  # without: computes
    assert sorted(calls(ip)) == list(range(5))


def test_compare_says_why_nothing_was_compared_when_everything_came_from_the_store(ip, store_dir, capfd):
    """--compare (and --insights) with nothing computed: one line says so, not silence."""
    run(ip, "%pmap -q --checkpoint work, range(4)")
    ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", "rank + 1\n")
    calls(ip), capfd.readouterr()  # (what these two runs did)
    assert run(ip, "%pmap -q --compare --checkpoint work, range(4)") == [0, 1, 4, 9]
    assert calls(ip) == [] and api.last_report().equal is None
    assert ("mpmagic: every item came from the checkpoint, so nothing ran here or in the workers: compare=True "
            "(--compare) had nothing to act on; run without the checkpoint (checkpoint=False, --no-checkpoint) "
            "to compute them again") in capfd.readouterr().err
    ip.run_cell_magic("parallel", "-n 2 -q --compare --checkpoint", "rank + 1\n")
    assert "every rank's value came from the checkpoint" in capfd.readouterr().err
    run(ip, "%pmap -q --checkpoint work, range(4)")  # no option that acts on a run: no line
    assert "mpmagic:" not in capfd.readouterr().err


def test_a_line_mistake_is_refused_also_when_every_item_is_stored(ip, store_dir):
    """``-n 100000`` is a usage error before anything runs (troubleshooting.md): with
    every item stored it returned the stored results, silently; with one missing it
    was refused. The store's contents no longer decide whether a call is a mistake."""
    from IPython.core.error import UsageError as IPythonUsageError

    from mpmagic.backends.local import available_cpus, max_workers

    assert run(ip, "%pmap -q --checkpoint work, [1, 2]") == [1, 4]
    calls(ip)
    said = (f"workers = 100000 is more processes than this machine can run at once "
            f"(at most {max_workers()} with {available_cpus()} CPUs)")
    with pytest.raises(IPythonUsageError) as info:
        run(ip, "%pmap -q --checkpoint -n 100000 work, [1, 2]")
    assert str(info.value).splitlines()[0] == "%pmap: " + said.replace("workers = ", "-n ")  # (as the line said it)
    for call in (lambda: mpmagic.pmap(ip.user_ns["work"], [1, 2], workers=100000, checkpoint=True),
                 lambda: mpmagic.submit(ip.user_ns["work"], [1, 2], workers=100000, checkpoint=True),
                 lambda: list(mpmagic.imap(ip.user_ns["work"], [1, 2], workers=100000, checkpoint=True))):
        with pytest.raises(mpmagic.UsageError) as info:
            call()
        assert str(info.value) == said
    assert calls(ip) == []
    assert run(ip, "%pmap -q --checkpoint -n 2 work, [1, 2]") == [1, 4] and calls(ip) == []  # (a right -n: stored)


def test_leftovers_of_a_killed_write_are_harmless_and_clear_removes_them(tmp_path):
    np = pytest.importorskip("numpy")
    store = Store(tmp_path)
    (tmp_path / "blobs").mkdir(exist_ok=True)
    (tmp_path / "blobs" / ".tmp-deadbeef").write_bytes(b"half a result")  # killed before its rename
    (tmp_path / "blobs" / "orphan.bin").write_bytes(b"renamed, never committed")  # killed before its row
    big = np.arange(200_000.0)
    store.put(b"r" * 16, "f", [(b"k" * 16, big)])
    assert np.array_equal(store.load(b"r" * 16, [b"k" * 16])[b"k" * 16], big)
    store.clear()
    assert list((tmp_path / "blobs").iterdir()) == []
    store.close()


def test_a_changed_captured_global_or_code_recomputes(ip, store_dir):
    run(ip, "%pmap -q --checkpoint work, range(10)")
    calls(ip)
    run(ip, "OFFSET = 7")
    assert run(ip, "%pmap -q --checkpoint work, range(10)") == [x * x + 7 for x in range(10)]
    assert sorted(calls(ip)) == list(range(10))
    run(ip, "OFFSET = 0")  # back as before: the first run's results are there again
    assert run(ip, "%pmap -q --checkpoint work, range(10)") == [x * x for x in range(10)]
    assert calls(ip) == []
    run(ip, "def work(x):\n    with open(RECORD, 'a') as f:\n        f.write(f'{x}\\n')\n    return x + 1\n")
    assert run(ip, "%pmap -q --checkpoint work, range(10)") == [x + 1 for x in range(10)]
    assert sorted(calls(ip)) == list(range(10))


def test_config_checkpoint_is_the_default_and_api_takes_a_folder(ip, store_dir, tmp_path):
    run(ip, "%config MPMagic.checkpoint = True")
    run(ip, "%pmap -q work, range(6)")
    calls(ip)
    run(ip, "%pmap -q work, range(6)")
    assert calls(ip) == []
    other = tmp_path / "elsewhere"
    work = ip.user_ns["work"]
    assert mpmagic.pmap(work, [1, 2], checkpoint=str(other)) == [1, 4]
    assert mpmagic.pmap(work, [1, 2], checkpoint=str(other)) == [1, 4]
    assert sorted(calls(ip)) == [1, 2]
    assert (other / DB_NAME).exists()


@pytest.mark.parametrize("call", [
    lambda: mpmagic.pmap(abs, [1], checkpoint=5), lambda: mpmagic.submit(abs, [1], checkpoint=5),
    lambda: mpmagic.imap(abs, [1], checkpoint=5), lambda: mpmagic.parallel("rank", workers=1, checkpoint=5),
])
def test_a_checkpoint_that_is_no_folder_is_refused_in_one_line_naming_it(call):
    """``checkpoint=5`` failed in pathlib: ``TypeError: expected str, bytes or os.PathLike object, not int``."""
    with pytest.raises(mpmagic.UsageError, match=r"^checkpoint must be True/False or a folder \(a str or path\), not 5$"):
        call()


def test_errors_collect_failures_are_not_stored_and_are_retried(ip, store_dir):
    run(ip, "FAIL = {3, 5}\n"
            "def flaky(x):\n"
            "    with open(RECORD, 'a') as f:\n"
            "        f.write(f'{x}\\n')\n"
            "    if x in FAIL_NOW:\n"
            "        raise ValueError(f'bad {x}')\n"
            "    return -x\n"
            "FAIL_NOW = FAIL\n")
    # FAIL_NOW is captured: keep it the same object-content between runs
    res = run(ip, "%pmap -q --checkpoint --errors collect flaky, range(8)")
    assert [type(r).__name__ for r in res].count("Failed") == 2
    assert res[3].index == 3 and res[5].index == 5
    assert sorted(calls(ip)) == list(range(8))
    res = run(ip, "%pmap -q --checkpoint --errors collect flaky, range(8)")
    assert sorted(calls(ip)) == [3, 5]  # only the failures ran again
    assert res[3].index == 3 and [r for i, r in enumerate(res) if i not in (3, 5)] == [0, -1, -2, -4, -6, -7]
    assert "item 5 of the input" in " ".join(res[5].error.__notes__)  # 5 of the input, not 1 of the re-run


def test_an_error_in_a_resumed_run_names_the_items_place_in_the_whole_input(ip, store_dir):
    run(ip, "def picky(x):\n    if x == 7 and BROKEN:\n        raise ValueError(x)\n    return x\nBROKEN = False\n")
    run(ip, "%pmap -q --checkpoint picky, range(5)")
    run(ip, "BROKEN = True")  # a new key: nothing resumed; store 0-4 under it first
    run(ip, "%pmap -q --checkpoint picky, range(5)")
    with pytest.raises(ValueError) as info:
        run(ip, "%pmap -q --checkpoint picky, range(10)")  # items 5-9 computed: 7 is the 3rd of them
    assert "item 7 of the input" in " ".join(info.value.__notes__)


def test_a_failing_run_keeps_what_finished(ip, store_dir):
    run(ip, "def boom(x):\n"
            "    with open(RECORD, 'a') as f:\n"
            "        f.write(f'{x}\\n')\n"
            "    if x == 19:\n"
            "        raise KeyError(x)\n"
            "    return x\n")
    with pytest.raises(KeyError):
        run(ip, "%pmap -q --checkpoint --chunksize 5 -n 1 boom, range(20)")
    first = calls(ip)
    assert len(first) == 20
    with pytest.raises(KeyError):
        run(ip, "%pmap -q --checkpoint --chunksize 5 -n 1 boom, range(20)")
    assert sorted(calls(ip)) == [19]  # chunks 0-14 were stored, and 15-18, which ran before 19 failed


def test_lazy_generator_input_and_several_iterables(ip, store_dir):
    assert run(ip, "%pmap -q --checkpoint work, (x for x in range(1200))") == [x * x for x in range(1200)]
    assert len(calls(ip)) == 1200
    assert run(ip, "%pmap -q --checkpoint work, (x for x in range(1300))") == [x * x for x in range(1300)]
    assert sorted(calls(ip)) == list(range(1200, 1300))
    assert run(ip, "%pmap -q --checkpoint pow, range(6), [2] * 6") == [x**2 for x in range(6)]
    assert run(ip, "%pmap -q --checkpoint pow, range(6), [3] * 6") == [x**3 for x in range(6)]
    assert "resumed: 0 of 6" in api.last_report().line()
    assert run(ip, "%pmap -q --checkpoint pow, range(6), [2] * 6") == [x**2 for x in range(6)]
    assert "resumed: 6 of 6" in api.last_report().line()


class _CountingKeyReads:
    """A store's connection that counts the chunks whose keys a lookup reads."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn, self.chunks_read = conn, 0

    def __getattr__(self, name: str):
        return getattr(self.conn, name)

    def __enter__(self):
        return self.conn.__enter__()

    def __exit__(self, *exc):
        return self.conn.__exit__(*exc)

    def execute(self, sql: str, *args):
        cursor = self.conn.execute(sql, *args)
        if sql.startswith("SELECT id, keys FROM chunks"):
            rows = cursor.fetchall()
            self.chunks_read += len(rows)
            return iter(rows)
        return cursor


def test_a_lazy_input_reads_each_stored_chunks_keys_once_not_once_per_batch(ip, store_dir, monkeypatch):
    # A generator is looked up batch by batch; each lookup read the keys of every chunk
    # of the run: quadratic (100,000 stored items: 6.5 s from a generator, 0.27 s from a list).
    monkeypatch.setattr(checkpoint, "_LAZY_BATCH", 10)
    run(ip, "%pmap -q --checkpoint --chunksize 5 work, range(200)")
    calls(ip)
    store = checkpoint.open_store()
    with store._lock:
        chunks = store.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    counting = _CountingKeyReads(store.conn)
    monkeypatch.setattr(store, "conn", counting)
    assert run(ip, "%pmap -q --checkpoint work, (x for x in range(200))") == [x * x for x in range(200)]
    assert calls(ip) == []
    assert counting.chunks_read == chunks == 40


def test_large_numpy_results_go_to_files_and_come_back_equal(ip, store_dir):
    np = pytest.importorskip("numpy")
    run(ip, "import numpy as np\ndef big(n):\n    return np.full(n, n, dtype=np.float64)\n")
    first = run(ip, "%pmap -q --checkpoint big, [300_000, 10]")
    files = list((store_dir / "blobs").iterdir())
    assert len(files) == 1  # 2.4 MB: a file; 80 bytes: a row
    again = run(ip, "%pmap -q --checkpoint big, [300_000, 10]")
    assert "resumed: 2 of 2" in api.last_report().line()
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    again[0][0] = 1.0  # writable, as a computed result is


def test_parallel_checkpoint_keeps_each_ranks_value(ip, store_dir):
    cell = ("with open(RECORD, 'a') as f:\n    f.write(f'{rank}\\n')\n"
            "total = rank * 10 + OFFSET\ntotal\n")
    values = ip.run_cell_magic("parallel", "-n 2 -q --checkpoint --gather total", cell)
    assert list(values) == [0, 10]
    assert sorted(calls(ip)) == [0, 1]
    values = ip.run_cell_magic("parallel", "-n 2 -q --checkpoint --gather total", cell)
    assert list(values) == [0, 10] and ip.user_ns["total"] == [0, 10]
    assert calls(ip) == []
    assert "resumed: 2 of 2 ranks" in api.last_report().line()
    run(ip, "OFFSET = 1")
    assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == [1, 11]
    assert sorted(calls(ip)) == [0, 1]



def test_a_cell_assigning_an_unpicklable_notebook_name_is_checkpointed_without_it(ip, store_dir):
    """A notebook lock of a name the cell assigns is left out of what the ranks get
    (cell.leave_out_unpicklable), so the key does not cover it either: the cell
    had no key (it ran without a checkpoint, every time) once the run itself worked."""
    run(ip, "import threading\nheld_ck = threading.RLock()")
    cell = ("with open(RECORD, 'a') as f:\n    f.write(f'{rank}\\n')\n"
            "if rank:\n    held_ck = rank * 10\nelse:\n    held_ck = -1\nheld_ck\n")
    assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == [-1, 10]
    assert sorted(calls(ip)) == [0, 1]
    assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == [-1, 10]
    assert calls(ip) == [] and "resumed: 2 of 2 ranks" in api.last_report().line()
    ip.user_ns.pop("held_ck")


# --------------------------------------------------------------------------
# the store: damage, foreign files, two writers, listing, the cap


def test_a_corrupt_store_file_warns_once_and_starts_fresh(ip, store_dir):
    run(ip, "%pmap -q --checkpoint work, range(5)")
    calls(ip)
    checkpoint.close_stores()
    (store_dir / DB_NAME).write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(str(store_dir / DB_NAME) + suffix).unlink(missing_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(ip, "%pmap -q --checkpoint work, range(5)") == [x * x for x in range(5)]
    messages = [str(w.message) for w in caught if "checkpoint store" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and "started a fresh one" in messages[0]
    assert sorted(calls(ip)) == list(range(5))
    assert list(store_dir.glob(f"{DB_NAME}.bad-*"))
    run(ip, "%pmap -q --checkpoint work, range(5)")
    assert calls(ip) == []


@pytest.mark.parametrize("call", [
    "%pmap -q --checkpoint work, range(4)",
    "r = %pmap --bg --checkpoint work, range(4)\nr.result(60)",
    "list(mpmagic.imap(work, range(4), checkpoint=True))",
    "%%parallel -n 2 -q --checkpoint\nrank * 2",
])
def test_an_unusable_checkpoint_folder_warns_once_at_the_users_line_and_the_run_claims_none(ip, store_dir, caplog,
                                                                                            call):
    store_dir.write_text("a file where the folder should be")
    run(ip, "import mpmagic")
    for _ in range(2):  # every run says so (not once per line of the notebook's shared __main__)
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            value = run(ip, call)
        said = [w for w in caught if "checkpoint" in str(w.message)]
        assert [str(w.message) for w in said] == [
            f"mpmagic: cannot open the checkpoint store in {store_dir.resolve()} (ckpt is a file, not a folder); "
            "running without a checkpoint"]
        # At the user's line (the cell's), never a line of mpmagic or IPython; and only there (no log line too).
        assert "mpmagic" not in said[0].filename and "IPython" not in said[0].filename, said[0].filename
        assert not [r for r in caplog.records if "checkpoint" in r.getMessage()]
        if "work" in call:
            assert list(value) == [0, 1, 4, 9] and sorted(calls(ip)) == [0, 1, 2, 3]
            report = ip.user_ns["r"].report() if "--bg" in call else api.last_report()
            if "imap" not in call:  # the run went on without a checkpoint, and its report says none
                assert "checkpoint" not in report.line() and "resumed" not in report.line(), report.line()
        else:
            assert list(value) == [0, 2] and "checkpoint" not in api.last_report().line()


@pytest.mark.parametrize("action, done", [("", "nothing to list"), (" clear", "nothing was deleted")])
def test_pool_checkpoints_on_an_unusable_folder_says_so_in_one_line_of_its_own(ip, store_dir, action, done):
    from IPython.utils.capture import capture_output

    store_dir.write_text("a file where the folder should be")
    with warnings.catch_warnings(record=True) as caught, capture_output() as cap:
        warnings.simplefilter("always")
        result = ip.run_cell(f"%pool checkpoints{action}", store_history=False)
    assert not caught  # no "running without a checkpoint": there is no run
    assert isinstance(result.error_in_exec, mpmagic.MPMagicError)
    assert (cap.stdout + cap.stderr).strip() == (
        f"MPMagicError: %pool checkpoints: cannot open the checkpoint store in {store_dir} (ckpt is a file, "
        f"not a folder): {done}; set %config MPMagic.checkpoint_dir to a folder")


def test_a_warning_at_a_line_whose_globals_have_no_loader_stays_a_warning(monkeypatch):
    """IPython's and a Jupyter kernel's ``__main__`` have ``__loader__ = __spec__ = None``:
    Python 3.12+'s ``warn_explicit`` raises ValueError for such ``module_globals``, so every
    --checkpoint warning failed the cell and lost the run's results. 3.11 took them, so
    3.12's rule is applied here on any Python; a module with a loader still passes its globals."""
    from mpmagic import checkpoint_store

    real, seen = warnings.warn_explicit, []

    def as_on_312(*args, module_globals=None, **kwargs):
        if module_globals is not None and module_globals.get("__loader__") is None \
                and getattr(module_globals.get("__spec__"), "loader", None) is None:
            raise ValueError("Module globals is missing a __spec__.loader")
        seen.append(module_globals)
        return real(*args, module_globals=module_globals, **kwargs)

    monkeypatch.setattr(warnings, "warn_explicit", as_on_312)
    cell = {"__name__": "__main__", "__loader__": None, "__spec__": None, "warn": checkpoint_store.warn}
    with pytest.warns(RuntimeWarning, match="the store is gone") as caught:
        exec(compile("warn('the store is gone')", "<a-cell>", "exec"), cell)
    assert (caught[0].filename, caught[0].lineno, seen) == ("<a-cell>", 1, [None])
    module = {"__name__": "pytest", "__loader__": pytest.__loader__, "__spec__": pytest.__spec__,
              "warn": checkpoint_store.warn}
    with pytest.warns(RuntimeWarning, match="read-only"):
        exec(compile("warn('read-only')", "<a-module>", "exec"), module)
    assert seen[1] is module


def test_a_foreign_sqlite_file_warns_and_starts_fresh(tmp_path):
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("CREATE TABLE photos(id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.warns(RuntimeWarning, match="other tables"):
        store = Store(tmp_path)
    store.put(b"r" * 16, "f", [(b"k" * 16, 42)])
    assert store.load(b"r" * 16, [b"k" * 16]) == {b"k" * 16: 42}
    store.close()


def test_a_damaged_chunk_is_computed_again_never_returned(ip, store_dir):
    run(ip, "%pmap -q --checkpoint --chunksize 2 work, range(4)")
    calls(ip)
    checkpoint.close_stores()
    conn = sqlite3.connect(store_dir / DB_NAME)
    key = item_key(2)[0]
    (cid, blob), = [(i, k) for i, k in conn.execute("SELECT id, keys FROM chunks") if key in k]
    conn.execute("UPDATE chunks SET data=? WHERE id=?", (pickle.dumps([999, 999]), cid))
    conn.commit()
    conn.close()
    with pytest.warns(RuntimeWarning, match="failed their check"):
        assert run(ip, "%pmap -q --checkpoint work, range(4)") == [0, 1, 4, 9]
    assert sorted(calls(ip)) == [2, 3]


def _hold_the_store(folder: Path, seconds: float) -> threading.Timer:
    """As another kernel's long write (a ``%pool checkpoints clear``): the write lock for ``seconds``."""
    conn = sqlite3.connect(folder / DB_NAME, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN EXCLUSIVE")
    timer = threading.Timer(seconds, lambda: (conn.execute("COMMIT"), conn.close()))
    timer.start()
    return timer


def test_a_run_says_when_it_waits_for_another_process_holding_the_store(tmp_path, monkeypatch, capfd):
    """Another kernel writing the same store held a run back for up to a minute in
    silence; and Ctrl-C then said "the work still running was stopped" of a run
    whose work had all finished (it was waiting for the store)."""
    import signal

    from mpmagic import checkpoint_store
    from mpmagic.errors import STOPPED_OUTCOME, interrupt_outcome

    monkeypatch.setattr(checkpoint_store, "_SAY_WAITING", 0.1)
    mpmagic.pmap(abs, [1], checkpoint=str(tmp_path))  # (the store exists)
    _hold_the_store(tmp_path, 0.3)
    assert mpmagic.pmap(abs, [-1, -2], checkpoint=str(tmp_path)) == [1, 2]
    line = f"mpmagic: waiting for the checkpoint store {tmp_path}, in use by another process…"
    assert capfd.readouterr().err.count(line) == 1
    assert mpmagic.pmap(abs, [-1, -2], checkpoint=str(tmp_path)) == [1, 2]  # stored once the store was free

    def interrupt(*_):
        raise KeyboardInterrupt

    holder = _hold_the_store(tmp_path, 0.6)
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt) as caught:
            mpmagic.pmap(abs, [-3], checkpoint=str(tmp_path))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    outcome = interrupt_outcome(caught.value) or STOPPED_OUTCOME
    assert outcome.startswith(f"its work had finished and it was waiting for the checkpoint store {tmp_path}, "
                              "in use by another process"), outcome
    holder.join()
    checkpoint.close_stores()  # (after the write that waited)


def _interrupted_after_four_of_gated(ip, tmp_path, call: str, more: str = "") -> tuple[KeyboardInterrupt, Path]:
    """Run ``call`` (an unclosed ``mpmagic.pmap(gated, ...`` over items from 0 up) with an
    ``on_chunk`` that presses Ctrl-C once four results came, the items from 4 on held by
    a gate file until the caller makes it (``more``: more code for the cell that defines them).
    Returns the interrupt and the gate."""
    gate = tmp_path / "gate"
    run(ip, f"GATE = {str(gate)!r}\n"
            "import os, signal, threading, time, mpmagic\n"
            "def gated(x):\n"
            "    work(x)\n"
            "    while x >= 4 and not os.path.exists(GATE):\n"
            "        time.sleep(0.02)\n"
            "    return x * x\n"
            "got = []\n"
            "def press_after_four(start, results):\n"
            "    got.extend(results)\n"
            "    if len(got) == 4:  # (the others wait for the gate: no more come)\n"
            "        threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()\n"
            + more)
    with capture_output():
        result = ip.run_cell(call + ", on_chunk=press_after_four)", store_history=False)
    err = result.error_in_exec
    assert isinstance(err, KeyboardInterrupt), err
    return err, gate


def test_an_interrupted_run_says_how_many_items_its_checkpoint_keeps(ip, store_dir, tmp_path):
    """Ctrl-C during a checkpointed run said only "the work still running was stopped
    and its workers replaced", as for a plain run whose results are all lost: not that
    the items that had finished are in the checkpoint, nor that the same call again
    computes only the others. The line now says both, and the count is what the next
    run takes from the store."""
    from mpmagic.errors import STOPPED_OUTCOME

    call = f"mpmagic.pmap(gated, range(8), chunksize=1, checkpoint={str(store_dir)!r}"
    err, gate = _interrupted_after_four_of_gated(ip, tmp_path, call)
    assert str(err) == (f"mpmagic.pmap interrupted: {STOPPED_OUTCOME}; its checkpoint keeps the results of 4 of "
                        "its 8 items: the same call again computes only the other 4"), str(err)
    calls(ip)
    gate.touch()
    assert run(ip, call + ")") == [x * x for x in range(8)]
    assert sorted(calls(ip)) == [4, 5, 6, 7]


def test_an_interrupted_runs_count_of_kept_items_counts_equal_items_by_place(ip, store_dir, tmp_path):
    """The count was of the results stored, not of the places in the input they answer:
    four results stored for items 0-3 of range(8) + [0, 1, 2, 3] said "keeps the results
    of 4 of its 12 items: the same call again computes only the other 8", and it computed 4."""
    from mpmagic.errors import STOPPED_OUTCOME

    call = f"mpmagic.pmap(gated, list(range(8)) + [0, 1, 2, 3], chunksize=1, checkpoint={str(store_dir)!r}"
    err, gate = _interrupted_after_four_of_gated(ip, tmp_path, call)
    assert str(err) == (f"mpmagic.pmap interrupted: {STOPPED_OUTCOME}; its checkpoint keeps the results of 8 of "
                        "its 12 items: the same call again computes only the other 4"), str(err)
    calls(ip)
    gate.touch()
    assert run(ip, call + ")") == [x * x for x in list(range(8)) + [0, 1, 2, 3]]
    assert sorted(calls(ip)) == [4, 5, 6, 7]


def test_an_interrupted_run_over_a_generator_says_it_was_read_further_than_what_finished(ip, store_dir, tmp_path):
    """"the same call again computes only the others" over the same generator went on from
    where the run had read it (512 items in, in batches), not from what finished: the items
    read and not computed were silently missing from the next result."""
    from mpmagic.errors import STOPPED_OUTCOME

    call = f"mpmagic.pmap(gated, gen, chunksize=1, checkpoint={str(store_dir)!r}"
    err, gate = _interrupted_after_four_of_gated(ip, tmp_path, call, "gen = (x for x in range(8))\n")
    assert str(err) == (f"mpmagic.pmap interrupted: {STOPPED_OUTCOME}; its checkpoint keeps the results of 4 items: "
                        "the same call again computes only the others, over its input made again (an iterator: "
                        "this one was read 8 items in, and goes on from there)"), str(err)
    gate.touch()


def _writer(folder: str, run_id: int, n: int, barrier) -> None:
    store = Store(folder)
    barrier.wait(60)  # both write at once: 2 x 200 small transactions interleave
    for start in range(0, n, 10):
        store.put(bytes([run_id]) * 16, f"w{run_id}", [(i.to_bytes(16, "big"), (run_id, i)) for i in range(start, start + 10)])
    store.close()


def test_two_processes_writing_one_store_at_once_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    Store(tmp_path).close()
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), r, 2000, barrier)) for r in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = Store(tmp_path)
    for r in (1, 2):
        found = store.load(bytes([r]) * 16, [i.to_bytes(16, "big") for i in range(2000)])
        assert len(found) == 2000 and found[(1999).to_bytes(16, "big")] == (r, 1999)
    store.close()


def test_pool_checkpoints_lists_clears_by_name_and_the_cap_evicts_lru(ip, store_dir):
    run(ip, "def other(x):\n    return -x\n")
    run(ip, "%pmap -q --checkpoint work, range(20)")
    run(ip, "%pmap -q --checkpoint other, range(5)")
    listing = repr(run(ip, "%pool checkpoints"))
    assert "work" in listing and "other" in listing and "20" in listing
    run(ip, "%pool checkpoints clear other")
    listing = repr(run(ip, "%pool checkpoints"))
    assert "other" not in listing and "work" in listing
    # A name no run has (a typo): it said "deleted 0 checkpointed runs named 'wrok' ... (4.2 kB
    # freed)", the bytes being the store's log written back, and named none of the runs there.
    with capture_output() as cap:
        run(ip, "%pool checkpoints clear wrok")
    assert cap.stdout == (f"no checkpointed run named 'wrok' in {checkpoint.directory()}: nothing was deleted "
                          "(stored: work; %pool checkpoints lists them)\n")
    assert "work" in repr(run(ip, "%pool checkpoints"))
    run(ip, "%config MPMagic.checkpoint_max_bytes = 100")
    run(ip, "%pmap -q --checkpoint other, range(5)")  # the newest run stays; work goes
    names = [r.name for r in checkpoint.list_runs()]
    assert names == ["other"]
    run(ip, "%pool checkpoints clear")
    assert repr(run(ip, "%pool checkpoints")).startswith("no checkpoints in")


def test_pool_checkpoints_names_a_method_by_its_objects_class_and_clears_it_by_that_name(ip, store_dir):
    """Two classes' ``run`` methods (and two subclasses' inherited ``step``) were each listed
    as ``run`` (``step``): which stored runs were whose, and what to clear, could not be told."""
    run(ip, "class Fast:\n    def run(self, x):\n        return x\nclass Slow:\n    def run(self, x):\n        return -x\n"
            "class Base:\n    def step(self, x):\n        return x\nclass Left(Base):\n    pass\n"
            "class Right(Base):\n    pass\n")
    for obj in ("Fast()", "Slow()", "Left()", "Right()"):
        run(ip, f"%pmap -q --checkpoint {obj}.{'step' if obj in ('Left()', 'Right()') else 'run'}, range(3)")
    assert sorted(r.name for r in checkpoint.list_runs()) == ["Fast.run", "Left.step", "Right.step", "Slow.run"]
    run(ip, "%pool checkpoints clear Slow.run")
    assert sorted(r.name for r in checkpoint.list_runs()) == ["Fast.run", "Left.step", "Right.step"]



def test_two_objects_of_one_class_are_two_keys_of_one_name_and_never_take_each_others_results(ip, store_dir):
    """small27 (a guard, not a fix): ``a.step`` then ``b.step`` share the name ``Model.step``,
    but each run's key covers its object's state (it is pickled with the method), so ``b``
    computes its own results, and each resumes from its own, as docs/checkpoint.md says."""
    run(ip, "class Model:\n    def __init__(self, k):\n        self.k = k\n    def step(self, x):\n"
            "        return x * self.k\na, b = Model(10), Model(100)\n")
    assert run(ip, "%pmap -q --checkpoint a.step, range(4)") == [0, 10, 20, 30]
    assert run(ip, "%pmap -q --checkpoint b.step, range(4)") == [0, 100, 200, 300]
    assert "resumed: 0 of 4" in api.last_report().line()
    assert run(ip, "%pmap -q --checkpoint b.step, range(4)") == [0, 100, 200, 300]
    assert "resumed: 4 of 4" in api.last_report().line()
    runs = [r for r in checkpoint.list_runs() if r.name == "Model.step"]
    assert len(runs) == 2 and runs[0].key != runs[1].key, runs

def test_dask_backend_stores_results_on_the_notebook_side(ip, store_dir, dask_cluster, request):
    from conftest import ensure_pool

    ensure_pool("dask", request)
    try:
        assert run(ip, "%pmap -q --checkpoint work, range(12)") == [x * x for x in range(12)]
        calls(ip)  # the record file is shared: same machine
        assert run(ip, "%pmap -q --checkpoint work, range(12)") == [x * x for x in range(12)]
        assert calls(ip) == []
        assert "resumed: 12 of 12" in api.last_report().line()
    finally:
        from mpmagic import pool as pool_module

        pool_module.shutdown()


# --------------------------------------------------------------------------
# what is stored, and a store that cannot be written (tester's findings)


def test_results_changed_by_on_chunk_are_stored_as_the_worker_returned_them(ip, store_dir):
    # The store keeps a snapshot taken before the caller gets the objects: changing them
    # in place (normal code: they are the caller's) does not change what a re-run returns.
    run(ip, "import mpmagic\ndef box(x):\n    return {'x': x}\n"
            "def mark(start, results):\n"
            "    for r in results:\n"
            "        r['count'] = r.get('count', 0) + 1\n")
    first = run(ip, "mpmagic.pmap(box, range(40), chunksize=2, checkpoint=True, on_chunk=mark)")
    assert first == [{"x": x, "count": 1} for x in range(40)]
    again = run(ip, "mpmagic.pmap(box, range(40), checkpoint=True)")
    assert "resumed: 40 of 40" in api.last_report().line()
    assert again == [{"x": x} for x in range(40)]


def _rows_scaled_down(monkeypatch) -> None:
    """SQLite's largest value (1 GB by default) set to 3 MB on the test's store, and the
    row bound (64 MB) to 2 MB, so that results of a few MB show what results of a GB do."""
    from mpmagic import checkpoint_store

    conn = checkpoint.open_store().conn
    if not hasattr(conn, "setlimit"):  # (Python 3.11+)
        pytest.skip("sqlite3.Connection.setlimit is Python 3.11+")
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 3_000_000)
    monkeypatch.setattr(checkpoint_store, "_ROW_BYTES", 2_000_000)


# (the function's cell, the map's arguments, the items, what serial map gives)
_BIG_PLAIN_RESULTS = {
    # bytes, strings, lists pickle in-band (only numpy buffers went to files): a chunk of
    # big ones was one row over SQLite's limit ("string or blob too big"), and the run,
    # and every run of that call after it, stored nothing more.
    "too big for one sqlite value": ("def blob(x):\n    return bytes([x]) * 2_000_000 if x % 2 else [x] * 10\n",
                                     "--chunksize 4 blob, range(12)", 12,
                                     [bytes([x]) * 2_000_000 if x % 2 else [x] * 10 for x in range(12)]),
    # Each result under the file threshold, the chunk's pickle over the row bound: the
    # results past the bound go to files.
    "many mid-sized in one chunk": ("def mid(x):\n    return str(x) * 300_000\n",  # 600 kB each
                                    "--chunksize 10 mid, range(10, 30)", 20,
                                    [str(x) * 300_000 for x in range(10, 30)]),
}


@pytest.mark.parametrize("case", list(_BIG_PLAIN_RESULTS))
def test_big_plain_results_are_stored_and_resumed_with_no_row_over_the_limit(ip, store_dir, monkeypatch, case):
    cell, args, n, serial = _BIG_PLAIN_RESULTS[case]
    run(ip, cell)
    _rows_scaled_down(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run(ip, f"%pmap -q --checkpoint {args}")
    assert [str(w.message) for w in caught if "checkpoint" in str(w.message)] == []
    again = run(ip, f"%pmap -q --checkpoint {args}")
    assert f"resumed: {n} of {n}" in api.last_report().line()
    assert first == again == serial


def test_a_full_disk_at_open_leaves_the_store_alone_and_warns_once(ip, store_dir, monkeypatch):
    run(ip, "%pmap -q --checkpoint work, range(5)")
    calls(ip)
    checkpoint.close_stores()

    def full(self, conn):
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as m:
        m.setattr(Store, "_check", full)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run(ip, "%pmap -q --checkpoint work, range(5)") == [x * x for x in range(5)]
    said = [str(w.message) for w in caught if "checkpoint" in str(w.message)]
    assert len(said) == 1 and "database or disk is full" in said[0] and "running without a checkpoint" in said[0]
    assert not list(store_dir.glob(f"{DB_NAME}.bad-*"))  # not declared damaged, not moved aside
    calls(ip)
    checkpoint.close_stores()
    assert run(ip, "%pmap -q --checkpoint work, range(5)") == [x * x for x in range(5)]
    assert calls(ip) == []  # the space came back: every stored result is still there


def test_a_store_that_can_be_read_but_not_written_is_read_with_one_warning(ip, store_dir):
    run(ip, "%pmap -q --checkpoint work, range(4)")
    calls(ip)
    store = checkpoint.open_store()
    store.conn.close()
    store.conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None,
                                 check_same_thread=False)  # (as another user's file: read-only)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(ip, "%pmap -q --checkpoint work, range(6)") == [x * x for x in range(6)]
    assert sorted(calls(ip)) == [4, 5]  # the stored ones were read
    said = [str(w.message) for w in caught if "checkpoint" in str(w.message)]
    assert len(said) == 1 and "could not write to the checkpoint store" in said[0], said


def test_a_large_result_that_cannot_be_written_warns_as_a_small_one_does(ip, store_dir, monkeypatch):
    pytest.importorskip("numpy")
    run(ip, "import numpy as np\ndef big(n):\n    return np.full(n, n, dtype=np.float64)\n")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Store, "_write_file", no_space)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(ip, "%pmap -q --checkpoint big, [300_000, 10]")
    said = [str(w.message) for w in caught if "checkpoint" in str(w.message)]
    assert len(said) == 1 and "could not write to the checkpoint store" in said[0] and "No space" in said[0]
    assert "\n" not in said[0]


def test_a_dataclass_or_an_empty_set_is_not_flagged_as_a_set_of_strings(ip):
    # An empty set pickles with no ADDITEMS: the scan ran on to unrelated strings after it.
    run(ip, "import dataclasses\n"
            "@dataclasses.dataclass\nclass Pt:\n    x: int\n    name: str = 'p'\n"
            "def mk(x):\n    return Pt(x)\n"
            "EMPTY = set()\nLABEL = 'some text'\n"
            "def uses_empty(x):\n    return (x in EMPTY, LABEL)\n")
    assert unstable_reason(run_key(ip.user_ns["mk"], False)[1]) is None
    assert unstable_reason(run_key(ip.user_ns["uses_empty"], False)[1]) is None
    assert unstable_reason(item_key((set(), "a string after it"))[1]) is None
    if sys.flags.hash_randomization:  # still found: after an empty set, and inside tuples in a set
        assert unstable_reason(item_key((set(), {"x", "y"}))[1]) is not None
        assert unstable_reason(item_key({("a", 1), ("b", 2)})[1]) is not None


def test_the_config_default_says_nothing_to_keep_and_no_checkpoint_opts_out_for_one_call(ip, store_dir):
    run(ip, "%config MPMagic.checkpoint = True")
    try:
        cell = "z = rank * 2\nz\n"
        assert list(ip.run_cell_magic("parallel", "-n 2 -q --keep", cell)) == [0, 2]  # not refused
        ip.run_cell_magic("parallel", "-n 2 -q --keep --reset", "rank")
        assert run(ip, "%pmap -q --no-checkpoint work, range(4)") == [0, 1, 4, 9]
        assert "checkpoint" not in api.last_report().line()
        run(ip, "%pmap -q --no-checkpoint work, range(4)")
        assert sorted(calls(ip)) == [0, 0, 1, 1, 2, 2, 3, 3]  # nothing stored, nothing taken
        with pytest.raises(Exception, match="do not go together"):  # typed: still refused
            ip.run_cell_magic("parallel", "-n 2 -q --keep --checkpoint", cell)
        run(ip, "def half(x):\n    return 1 / (x - 2)\n")
        run(ip, "%pmap -q --errors collect half, range(4)")
        with pytest.raises(Exception, match="MPMagic.checkpoint is on; --no-checkpoint runs a call without it"):
            run(ip, "%pmap -q --rerun-failed")
    finally:
        run(ip, "%config MPMagic.checkpoint = False")


def test_run_key_covers_cached_notebook_functions_modules_beside_the_notebook_and_the_pool_setup(ip, tmp_path,
                                                                                                  monkeypatch):
    # Code pickled by reference was keyed by its name alone: a fixed function gave the old results.
    run(ip, "import functools\n@functools.cache\ndef price(x):\n    return x * 1.10\n"
            "def total(x):\n    return price(x) + 1\n")
    before = run_key(ip.user_ns["price"], False)[0], run_key(ip.user_ns["total"], False)[0]
    run(ip, "@functools.cache\ndef price(x):\n    return x * 1.20\n")
    assert run_key(ip.user_ns["price"], False)[0] != before[0]
    assert run_key(ip.user_ns["total"], False)[0] != before[1]
    # a module beside the notebook: its file's contents count
    (tmp_path / "mylib_ck.py").write_text("def score(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run(ip, "import mylib_ck\ndef use(x):\n    return mylib_ck.score(x)\nfrom mylib_ck import score\n")
    keys = run_key(ip.user_ns["use"], False)[0], run_key(ip.user_ns["score"], False)[0]
    (tmp_path / "mylib_ck.py").write_text("def score(x):\n    return x + 100\n")
    run(ip, "import importlib\nimportlib.reload(mylib_ck)\nfrom mylib_ck import score\n")
    assert run_key(ip.user_ns["use"], False)[0] != keys[0]
    assert run_key(ip.user_ns["score"], False)[0] != keys[1]
    # the %%pool setup whose names the workers see
    from mpmagic import worker_setup

    monkeypatch.setattr(worker_setup, "_entries", [])
    plain = run_key(ip.user_ns["total"], False)[0]
    monkeypatch.setattr(worker_setup, "_entries", [worker_setup._Entry("code", "%%pool setup", "MODEL = 1")])
    one = run_key(ip.user_ns["total"], False)[0]
    monkeypatch.setattr(worker_setup, "_entries", [worker_setup._Entry("code", "%%pool setup", "MODEL = 2")])
    assert len({plain, one, run_key(ip.user_ns["total"], False)[0]}) == 3
    sys.modules.pop("mylib_ck", None)


def test_run_key_covers_the_users_modules_the_pool_setup_imports(ip, tmp_path, monkeypatch):
    """A module of the user's imported only by the %%pool setup (the notebook never imports
    it) was not in the key: edited, its old results were returned (also after %pool
    restart, or in a new kernel). Covered by its file's contents now, as a module the
    function names; found without importing it in the notebook."""
    from mpmagic import worker_setup

    pkg = tmp_path / "setuppkg_ck"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text("W = 1\n")
    (tmp_path / "setupmod_ck.py").write_text("def f(x):\n    return x + 1000\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(worker_setup, "_entries", [])
    monkeypatch.setattr(worker_setup, "_files", {})
    run(ip, "def via_setup(x):\n    return setupmod_ck.f(x)\n")
    func = ip.user_ns["via_setup"]
    keys = []
    for source in ("import os, setupmod_ck", "from setuppkg_ck import model\nimport json"):
        worker_setup.set_code(source)
        keys.append(run_key(func, False)[0])
        assert run_key(func, False)[0] == keys[-1]  # the same files: the same key
    assert not {"setupmod_ck", "setuppkg_ck", "setuppkg_ck.model"} & set(sys.modules)  # nothing imported here
    assert [os.path.basename(f) for f in worker_setup.module_files()] == ["__init__.py", "model.py"]
    (pkg / "model.py").write_text("W = 22\n")  # a submodule, imported with `from package import submodule`
    assert run_key(func, False)[0] != keys[1]
    worker_setup.set_code("import os, setupmod_ck")
    (tmp_path / "setupmod_ck.py").write_text("def f(x):\n    return x + 20000\n")
    edited = run_key(func, False)[0]
    assert edited != keys[0]
    (tmp_path / "setupmod_ck.py").write_text("def f(x):\n    return x + 1000\n")  # back as it was
    assert run_key(func, False)[0] == keys[0]
    # an on_worker_start function that imports it in its body
    worker_setup.clear()
    run(ip, "def load_model():\n    import setupmod_ck\n    global F\n    F = setupmod_ck.f\n")
    worker_setup.add_function(ip.user_ns["load_model"])
    before = run_key(func, False)[0]
    (tmp_path / "setupmod_ck.py").write_text("def f(x):\n    return x + 300000\n")
    assert run_key(func, False)[0] != before
    worker_setup.clear()
    # which files changed since a worker imported them: its first setup run counts (a later
    # setup's `import` of a module it has is a no-op); a reload does not run the setup again
    from mpmagic.protocol import SetupDone

    monkeypatch.setattr(worker_setup, "_loaded", {})
    monkeypatch.setattr(worker_setup, "_status", {})
    path = str((tmp_path / "setupmod_ck.py").resolve())
    worker = ("test", 0)
    worker_setup.set_code("import setupmod_ck")
    worker_setup.record(worker, SetupDone(worker_setup.version(), 0, None, [], ""))
    assert worker_setup.files_changed([worker]) == []
    (tmp_path / "setupmod_ck.py").write_text("def f(x):\n    return x + 4000000\n")
    assert worker_setup.files_changed([worker]) == [path]
    assert worker_setup.files_changed([("test", 1)]) == []  # (a worker that did not run it)
    worker_setup.set_code("import setupmod_ck")  # the same cell again
    worker_setup.record(worker, SetupDone(worker_setup.version(), 0, None, [], ""))
    assert worker_setup.files_changed([worker]) == [path]
    worker_setup.clear()


def _without_checkpoint(ip, cell: str, module: str) -> list:
    """Run ``cell`` (a ``%pmap --checkpoint``) whose workers run an older ``module``
    than its file: it runs without the checkpoint, and one warning says why and
    to ``%pool restart``. Returns the cell's results."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run(ip, cell)
    said = [str(w.message) for w in caught if f"{module}.py changed on disk" in str(w.message)]
    assert len(said) == 1 and "%pool restart" in said[0]
    assert "checkpoint" not in mpmagic.last_report().line()
    return results


def test_a_pool_setups_own_module_edited_is_computed_again(ip, store_dir, tmp_path, monkeypatch, local_pool):
    """%%pool setup imports the user's module, which the notebook does not: after the module
    was edited and the pool restarted, --checkpoint returned the old code's stored results
    ([1000, 1001, 1002] where the workers now give [20000, ...]). Edited while the workers
    still run the version they imported, the run goes without the checkpoint, so no old
    code's results are stored under the new file's key."""
    import runpy

    path = tmp_path / "setupmod_e2e.py"
    path.write_text("def f(x):\n    return x + 1000\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run(ip, "%%pool setup\nimport setupmod_e2e")
        run(ip, "def via_setup(x):\n    return setupmod_e2e.f(x)\n")
        assert "setupmod_e2e" not in sys.modules
        first = [x + 1000 for x in range(3)]
        assert run(ip, "%pmap -q --checkpoint via_setup, range(3)") == first
        assert run(ip, "%pmap -q --checkpoint via_setup, range(3)") == first  # the same module: reused
        assert "resumed: 3 of 3" in mpmagic.last_report().line()
        path.write_text("def f(x):\n    return x + 20000\n")
        # the workers still run the version they imported: no checkpoint (and one line says why)
        assert _without_checkpoint(ip, "%pmap -q --checkpoint via_setup, range(3)", "setupmod_e2e") == first
        run(ip, "%%pool setup\nimport setupmod_e2e")  # the same cell again: the workers keep their module
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run(ip, "%pmap -q --checkpoint via_setup, range(3)") == first
        assert any("setupmod_e2e.py changed on disk" in str(w.message) for w in caught)
        mpmagic.restart_pool()
        oracle = [runpy.run_path(str(path))["f"](x) for x in range(3)]  # the code as it is now, serially
        assert run(ip, "%pmap -q --checkpoint via_setup, range(3)") == oracle
        assert "resumed: 0 of 3" in mpmagic.last_report().line()
        assert run(ip, "%pmap -q --checkpoint via_setup, range(3)") == oracle
        assert "resumed: 3 of 3" in mpmagic.last_report().line()
        # another setup text (same module): not reused either
        run(ip, "%%pool setup\nimport setupmod_e2e\nSCALE = 2")
        assert run(ip, "%pmap -q --checkpoint via_setup, range(3)") == oracle
        assert "resumed: 0 of 3" in mpmagic.last_report().line()
    finally:
        run(ip, "%pool setup clear")
        sys.modules.pop("setupmod_e2e", None)
        from mpmagic import pool

        pool.shutdown()  # (a restarted pool numbers its workers on: pages tested later show workers 0 and 1)


def test_a_pool_setups_own_module_edited_on_mpmagics_dask_cluster_is_computed_again(ip, store_dir, tmp_path,
                                                                                    monkeypatch):
    """On Dask the edited module went unnoticed (tester-dask4): the workers' old results
    ([100..103] from BASE = 100) were stored under the edited file's key, and after
    %pool restart the checkpoint returned them where the code now gives [200..203].
    The notebook stamps the setup's module files as it sends the setup to the cluster
    (again at a restart), so the run after the edit goes without the checkpoint, as
    on the local pool, and the restarted workers' results are the file's as it is now."""
    pytest.importorskip("distributed")
    import runpy

    from mpmagic import pool as pool_module

    path = tmp_path / "setupmod_dk.py"
    path.write_text("BASE = 100\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pool_module.shutdown()
    mpmagic.use_dask(workers=1)
    try:
        run(ip, "%%pool setup\nimport setupmod_dk\nOFF = setupmod_dk.BASE")
        run(ip, "def addoff(x):\n    return x + OFF\n")
        first = [x + 100 for x in range(4)]
        assert run(ip, "%pmap -q --checkpoint addoff, range(4)") == first
        assert run(ip, "%pmap -q --checkpoint addoff, range(4)") == first  # nothing changed: reused
        assert "resumed: 4 of 4" in mpmagic.last_report().line()
        path.write_text("BASE = 200 \n")  # (another size: a new stamp even within the clock's tick)
        assert _without_checkpoint(ip, "%pmap -q --checkpoint addoff, range(4)", "setupmod_dk") == first  # (old)
        mpmagic.restart_pool()
        oracle = [x + runpy.run_path(str(path))["BASE"] for x in range(4)]  # the file as it is now, serially
        assert run(ip, "%pmap -q --checkpoint addoff, range(4)") == oracle
        assert "resumed: 0 of 4" in mpmagic.last_report().line()
        assert run(ip, "%pmap -q --checkpoint addoff, range(4)") == oracle
        assert "resumed: 4 of 4" in mpmagic.last_report().line()
    finally:
        run(ip, "%pool setup clear")
        sys.modules.pop("setupmod_dk", None)
        pool_module.shutdown()


def test_a_setup_importing_user_modules_without_a_record_of_the_workers_runs_without_the_checkpoint(
        tmp_path, monkeypatch):
    """A backend whose ``setup_workers`` gives no record (None) cannot tell which version
    of the setup's module its workers imported: the run goes without the checkpoint and
    says so, never storing what may be the old code's results (Dask's None skipped the
    check: tester-dask4). A setup importing none of the user's modules is not concerned."""
    from types import SimpleNamespace

    from mpmagic import pool as pool_module
    from mpmagic import worker_setup

    (tmp_path / "setupmod_nr.py").write_text("BASE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stand_in = SimpleNamespace(running=True, owns_workers=True, setup_workers=lambda: None)
    monkeypatch.setattr(pool_module, "current_pool", lambda: stand_in)
    try:
        worker_setup.set_code("import setupmod_nr\nOFF7 = setupmod_nr.BASE\n")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ValueError):
                checkpoint._check_setup_files("this run")
        said = [str(w.message) for w in caught]
        assert len(said) == 1 and "no record of the version of setupmod_nr.py" in said[0]
        assert "runs without the checkpoint (nothing read from it or stored)" in said[0]
        worker_setup.set_code("import os\nSEP = os.sep\n")  # no module of the user's: nothing to tell
        checkpoint._check_setup_files("this run")
    finally:
        worker_setup.clear()


def test_a_pool_setups_copy_from_a_module_reloaded_in_the_notebook_is_not_stored(ip, store_dir, tmp_path,
                                                                                  monkeypatch, local_pool):
    """%%pool setup copies a value out of the user's module (`BASE = setupmod_rl.BASE`); the notebook
    imports the module too, and after editing it runs importlib.reload. The workers reload the module,
    which does not run the setup again: BASE stays the old one. The first --checkpoint run warned and
    went without the checkpoint, the second said nothing and stored [1000, ...] under the edited file's
    key, and after %pool restart --checkpoint returned those where the workers give [2000, ...]."""
    import importlib
    import runpy

    path = tmp_path / "setupmod_rl.py"
    _save(path, "BASE = 1000\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run(ip, "import setupmod_rl")
        run(ip, "%%pool setup\nimport setupmod_rl\nBASE = setupmod_rl.BASE")
        run(ip, "def from_setup(x):\n    return BASE + x\n")
        old = [1000 + x for x in range(3)]
        assert run(ip, "%pmap -q --checkpoint from_setup, range(3)") == old
        _save(path, "BASE = 20000\n")
        importlib.reload(sys.modules["setupmod_rl"])
        for _ in range(2):  # each run until the setup runs again: the workers' (stale) values, not stored
            assert _without_checkpoint(ip, "%pmap -q --checkpoint from_setup, range(3)", "setupmod_rl") == old
        mpmagic.restart_pool()
        base = runpy.run_path(str(path))["BASE"]  # the setup on the file as it is now, serially
        oracle = [base + x for x in range(3)]
        assert run(ip, "%pmap -q from_setup, range(3)") == oracle
        assert run(ip, "%pmap -q --checkpoint from_setup, range(3)") == oracle
        assert "resumed: 0 of 3" in mpmagic.last_report().line()
    finally:
        run(ip, "%pool setup clear")
        sys.modules.pop("setupmod_rl", None)
        ip.user_ns.pop("setupmod_rl", None)
        from mpmagic import pool

        pool.shutdown()


def test_a_function_capturing_shared_helpers_resumes_after_they_are_made_again(ip, store_dir):
    """Value, Lock, Queue... pickle by the name of their shared memory, new for each one
    made: a function capturing a counter never resumed after the cell making it ran
    again (or in a new kernel), and %pool checkpoints gained a row each time."""
    make = ("import mpmagic\ncounter = mpmagic.Value('i', 0)\nlock = mpmagic.Lock()\n"
            "def counted(x):\n    with counter.get_lock():\n        counter.value += 1\n"
            "    with lock:\n        return x * 3\n")
    run(ip, make)
    oracle = [x * 3 for x in range(6)]
    assert run(ip, "%pmap -q --checkpoint counted, range(6)") == oracle
    assert ip.user_ns["counter"].value == 6
    run(ip, make)  # the cell again: new segments
    assert run(ip, "%pmap -q --checkpoint counted, range(6)") == oracle
    assert "resumed: 6 of 6" in mpmagic.last_report().line()
    assert ip.user_ns["counter"].value == 0  # (a stored item's side effects are not done again)
    assert len(checkpoint.list_runs()) == 1
    # what a helper is counts, its value does not
    key = lambda h: run_key(lambda x: (h, x), False)[0]  # noqa: E731
    made = {
        "Value('i')": lambda: mpmagic.Value("i", 0), "Value('i', 5)": lambda: mpmagic.Value("i", 5),
        "Value('d')": lambda: mpmagic.Value("d", 0), "Value('i', lock=False)": lambda: mpmagic.Value("i", 0, False),
        "Array('i', 3)": lambda: mpmagic.Array("i", 3), "Array('i', 4)": lambda: mpmagic.Array("i", 4),
        "Queue()": lambda: mpmagic.Queue(), "Queue(2)": lambda: mpmagic.Queue(2),
        "Lock()": lambda: mpmagic.Lock(), "RLock()": lambda: mpmagic.RLock(), "Event()": lambda: mpmagic.Event(),
        "get_lock()": lambda: mpmagic.Value("i", 0).get_lock(),
    }
    keys = {}
    for name, new in made.items():
        a, b = new(), new()
        keys[name] = key(a)
        assert key(b) == keys[name], name
    assert keys.pop("Value('i', 5)") == keys["Value('i')"]  # the value is state, not what it is
    assert len(set(keys.values())) == len(keys)
    # an item keeps its helper's name: two queues given as items are two items (also beside notebook code)
    run(ip, "def tag():\n    pass\n")
    a, b = mpmagic.Queue(), mpmagic.Queue()
    assert item_key(a)[0] != item_key(b)[0]
    assert item_key((a, ip.user_ns["tag"]))[0] != item_key((b, ip.user_ns["tag"]))[0]


def test_items_of_a_class_from_a_module_beside_the_notebook_count_by_that_modules_file(ip, store_dir, tmp_path,
                                                                                        monkeypatch):
    """Only items naming __main__ were keyed with module digests: items of a class
    from the user's own module kept their stored results after the class's
    method was edited and reloaded (stale [0, 1, 4, 9] where map gives [0, 10, 40, 90])."""
    (tmp_path / "shapes_ck.py").write_text("class Sq:\n    def __init__(self, s):\n        self.s = s\n"
                                          "    def area(self):\n        return self.s * self.s\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run(ip, "import shapes_ck\ndef area(sq):\n    return sq.area()\n")
        assert run(ip, "%pmap -q --checkpoint area, [shapes_ck.Sq(i) for i in range(4)]") == [0, 1, 4, 9]
        (tmp_path / "shapes_ck.py").write_text("class Sq:\n    def __init__(self, s):\n        self.s = s\n"
                                              "    def area(self):\n        return self.s * self.s * 10\n")
        run(ip, "import importlib\nimportlib.reload(shapes_ck)\nitems = [shapes_ck.Sq(i) for i in range(4)]")
        mpmagic.restart_pool()  # (the workers import the new module)
        oracle = run(ip, "list(map(area, items))")
        assert run(ip, "%pmap -q --checkpoint area, items") == oracle
        assert run(ip, "%pmap -q --checkpoint area, items") == oracle  # and found again
        assert "resumed: 4 of 4" in mpmagic.last_report().line()
    finally:
        sys.modules.pop("shapes_ck", None)
        from mpmagic import pool

        pool.shutdown()  # (a restarted pool numbers its workers on: pages tested later show workers 0 and 1)


def test_a_module_reloaded_in_the_notebook_is_reloaded_in_running_workers(ip, store_dir, tmp_path, monkeypatch,
                                                                          method, capsys):
    """Workers that imported the user's module kept its old code after importlib.reload
    in the notebook: %pmap gave v1 where map gave v2, and --checkpoint stored the v1
    results under the new file's key (returned even after %pool restart)."""
    from conftest import ensure_pool

    ensure_pool(method)
    (tmp_path / "mymod_rl.py").write_text("def f(x):\n    return ('v1', x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run(ip, "import importlib, mymod_rl")
        assert run(ip, "%pmap -q mymod_rl.f, range(4)") == [("v1", i) for i in range(4)]
        assert run(ip, "%pmap -q --checkpoint mymod_rl.f, range(4)") == [("v1", i) for i in range(4)]
        (tmp_path / "mymod_rl.py").write_text("def f(x):\n    return ('v2', x)\n")
        run(ip, "importlib.reload(mymod_rl)")
        oracle = run(ip, "list(map(mymod_rl.f, range(4)))")
        capsys.readouterr()
        assert run(ip, "%pmap -q mymod_rl.f, range(4)") == oracle  # by reference
        assert "workers reload mymod_rl" in capsys.readouterr().err
        assert run(ip, "%pmap -q lambda x: mymod_rl.f(x), range(4)") == oracle  # through a global
        assert run(ip, "%pmap -q --checkpoint mymod_rl.f, range(4)") == oracle  # computed again, with v2
        assert "resumed: 0 of 4" in mpmagic.last_report().line()
        assert run(ip, "%pmap -q --checkpoint mymod_rl.f, range(4)") == oracle  # and found again
        assert "resumed: 4 of 4" in mpmagic.last_report().line()
    finally:
        sys.modules.pop("mymod_rl", None)


def _edited_line(ip, cell: str, module: str) -> list:
    """Run ``cell`` (a checkpointed run) whose ``module`` changed on disk since the notebook
    loaded it: one warning says it runs without the checkpoint (and the warm-up's own
    line about the edit is not said too); its report claims no checkpoint."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run(ip, cell)
    said = [str(w.message) for w in caught if "changed on disk" in str(w.message)]
    assert len(said) == 1, said
    assert said[0].startswith(f"mpmagic: --checkpoint: {module}.py changed on disk since the notebook loaded it")
    assert "without the checkpoint (nothing read from it or stored)" in said[0]
    assert f"importlib.reload({module})" in said[0]
    assert "checkpoint" not in mpmagic.last_report().line()
    return results


@pytest.mark.parametrize("mod, cell, again", [
    ("edmod_ck", "import edmod_ck\ndef via_mod(x):\n    return edmod_ck.g(x)\n", ""),  # through the module
    ("edmod_ck2", "import edmod_ck2\nfrom edmod_ck2 import g\ndef via_mod(x):\n    return g(x)\n",
     "from edmod_ck2 import g"),  # g unchanged, the h it calls edited
])
def test_a_module_edited_and_not_reloaded_runs_without_the_checkpoint_so_its_old_results_are_never_resumed(
        ip, store_dir, tmp_path, monkeypatch, local_pool, mod, cell, again):
    """tester-bgdurable: after an edit of the user's module and no reload, --checkpoint
    computed the old code's results (what the notebook and its workers have loaded) and
    stored them under the key of the edited file; after the importlib.reload the warning
    asked for (or a kernel restart) the next run resumed 5 of 5 old results where map gave
    the new code's. Such a run goes without the checkpoint now: nothing read or stored."""
    path = tmp_path / f"{mod}.py"
    path.write_text("def h(x):\n    return x + 1\ndef g(x):\n    return h(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run(ip, "import importlib\n" + cell)
        old = [x + 1 for x in range(5)]
        assert run(ip, "%pmap -q --checkpoint via_mod, range(5)") == old
        path.write_text("def h(x):\n    return x * 100\ndef g(x):\n    return h(x)\n")  # no reload
        assert run(ip, "list(map(via_mod, range(5)))") == old  # (the notebook runs what it loaded)
        assert _edited_line(ip, "%pmap -q --checkpoint via_mod, range(5)", mod) == old
        assert _edited_line(ip, "%pmap -q --checkpoint via_mod, range(5)", mod) == old  # each run
        run(ip, f"importlib.reload({mod})\n" + again)
        oracle = run(ip, "list(map(via_mod, range(5)))")
        assert oracle == [x * 100 for x in range(5)]
        assert run(ip, "%pmap -q --checkpoint via_mod, range(5)") == oracle
        assert "resumed: 0 of 5" in mpmagic.last_report().line()
        assert run(ip, "%pmap -q --checkpoint via_mod, range(5)") == oracle  # stored: the new code's
        assert "resumed: 5 of 5" in mpmagic.last_report().line()
    finally:
        sys.modules.pop(mod, None)


EDIT_DEFS = """
import importlib, os, time, {mod}
NEW_SOURCE = "def g(x):\\n    return ('NEW', x)  # saved while the run went on\\n"
EDIT_MARK = {mark!r}
def f_edit(x):
    path = {mod}.__file__
    if x == 0 and os.path.exists(EDIT_MARK):  # the user saves {mod}.py (no reload) while the run goes on
        st = os.stat(path)
        with open(path, 'w') as fh:
            fh.write(NEW_SOURCE)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    elif x == 1 and os.path.exists(EDIT_MARK):  # (item 1's worker, which imported it too, waits for the save)
        deadline = time.time() + 60
        while time.time() < deadline:
            with open(path) as fh:
                if 'NEW' in fh.read():
                    break
            time.sleep(0.01)
    return {mod}.g(x)
"""


def module_to_edit(tmp_path: Path, monkeypatch, mod: str) -> tuple[Path, Path]:
    """``mod.py`` (old code: ``g(x)`` gives ``('old', x)``) importable from ``tmp_path``, and the
    mark file whose presence tells item 0 (rank 0) to save the new code while the run goes on."""
    source = tmp_path / f"{mod}.py"
    _save(source, "def g(x):\n    return ('old', x)\n")
    mark = tmp_path / "edit-now"
    mark.touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    return source, mark


@pytest.mark.parametrize("start", ["forkserver", "spawn"])
def test_a_module_saved_while_a_checkpointed_run_goes_on_stores_none_of_its_new_codes_results(
        ip, store_dir, tmp_path, monkeypatch, capsys, start):
    """tester-bg22: mymod.py saved with new code (not reloaded) while a blocking `--checkpoint` run
    went on. Workers that imported it after the save (here recycled by max_tasks_per_child) ran the
    new file: the results mixed both versions (serial map gives the old code's: the notebook has it
    loaded), nothing said so, and the mix was stored under the old file's key for good (the old file
    back, or a new kernel, "resumed" the new code's results). The check of the files ran only at the
    run's start; now a chunk is stored only while the files the key covers are as keyed."""
    mod = f"blockedit_{start}"
    source, mark = module_to_edit(tmp_path, monkeypatch, mod)
    try:
        run(ip, EDIT_DEFS.format(mod=mod, mark=str(mark)))
        mpmagic.start_pool(workers=2, start_method=start, max_tasks_per_child=1, wait=True)
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mixed = run(ip, "%pmap -q --checkpoint --chunksize 1 f_edit, range(8)")
        # (documented: a worker that imports the module now runs the file's code)
        assert mixed[0] == ("old", 0) and mixed[2:] == [("NEW", x) for x in range(2, 8)], mixed
        err = capsys.readouterr().err
        assert err.count(f"mpmagic: {mod}.py changed on disk while this run went on") == 1, err
        assert f"importlib.reload({mod})" in err
        said = [str(w.message) for w in caught if "mpmagic: --checkpoint:" in str(w.message)]
        assert len(said) == 1 and f"{mod}.py changed on disk while this run of `f_edit` went on" in said[0], said
        assert f"importlib.reload({mod})" in said[0] and "not stored" in said[0]
        # The old file back, reloaded: the run's own key again, which must hold no new code's result.
        _save(source, "def g(x):\n    return ('old', x)\n")
        mark.unlink()
        run(ip, f"importlib.reload({mod})")
        oracle = run(ip, "list(map(f_edit, range(8)))")
        assert oracle == [("old", x) for x in range(8)]
        assert run(ip, "%pmap -q --checkpoint f_edit, range(8)") == oracle
        assert "resumed: 0 of 8 items from the checkpoint, 8 computed" in mpmagic.last_report().line()
        assert run(ip, "%pmap -q --checkpoint f_edit, range(8)") == oracle  # (stored now: one version)
        assert "resumed: 8 of 8" in mpmagic.last_report().line()
    finally:
        sys.modules.pop(mod, None)
        from mpmagic import pool as pool_module

        pool_module.shutdown()  # (this test's pool, its start method and recycling, is not the next test's)


def test_a_module_saved_while_a_plain_run_goes_on_is_said_where_a_worker_ran_its_new_code(
        ip, tmp_path, monkeypatch, capsys):
    """Without --checkpoint too: the run's results mixed the two versions (serial map gives the
    old code's) and nothing said so; the start's line is said only when the file changed before
    the run. Now one line when a worker is found to run a version saved during the run, and none
    when no worker did (the same call after the reload)."""
    mod = "plainedit"
    source, mark = module_to_edit(tmp_path, monkeypatch, mod)
    try:
        run(ip, EDIT_DEFS.format(mod=mod, mark=str(mark)))
        mpmagic.start_pool(workers=2, start_method="forkserver", max_tasks_per_child=1, wait=True)
        capsys.readouterr()
        mixed = run(ip, "%pmap -q --chunksize 1 f_edit, range(6)")
        assert mixed[0] == ("old", 0) and mixed[2:] == [("NEW", x) for x in range(2, 6)], mixed
        err = capsys.readouterr().err
        assert err.count(f"mpmagic: {mod}.py changed on disk while this run went on: worker ") == 1, err
        assert "so the items it runs use the file's new code, where serial Python" in err
        assert f"importlib.reload({mod}) (or put the old file back)" in err
        mark.unlink()
        run(ip, f"importlib.reload({mod})")  # (the new code, in the notebook and the workers)
        assert run(ip, "%pmap -q --chunksize 1 f_edit, range(6)") == run(ip, "list(map(f_edit, range(6)))")
        assert "changed on disk" not in capsys.readouterr().err
    finally:
        sys.modules.pop(mod, None)
        from mpmagic import pool as pool_module

        pool_module.shutdown()  # (this test's pool, its start method and recycling, is not the next test's)


@pytest.mark.parametrize("start", ["forkserver", "spawn"])
def test_a_module_saved_while_a_checkpointed_cell_runs_stores_none_of_its_ranks_values(
        ip, store_dir, tmp_path, monkeypatch, capsys, start):
    """The same for `%%parallel --checkpoint`: rank 0 imports the module, then the file is saved
    with new code (not reloaded); rank 1 imports it after that and runs the new code. The ranks'
    values, stored when the cell ended, went under the old file's key."""
    mod = f"celledit_{start}"
    source, mark = module_to_edit(tmp_path, monkeypatch, mod)
    cell = textwrap.dedent(f"""\
        import os, time
        if rank == 1 and os.path.exists(EDIT_MARK):  # imports it once the file was saved
            deadline = time.time() + 60
            while time.time() < deadline and not os.path.exists(EDIT_MARK + '.saved'):
                time.sleep(0.01)
        import {mod}
        if rank == 0 and os.path.exists(EDIT_MARK):  # the user saves {mod}.py (no reload) meanwhile
            st = os.stat({mod}.__file__)
            with open({mod}.__file__, 'w') as fh:
                fh.write(NEW_SOURCE)
            os.utime({mod}.__file__, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
            open(EDIT_MARK + '.saved', 'w').close()
        {mod}.g(rank)
        """)
    try:
        run(ip, f"import importlib, {mod}\nEDIT_MARK = {str(mark)!r}\n"
                "NEW_SOURCE = \"def g(x):\\n    return ('NEW', x)  # saved while the cell ran\\n\"")
        mpmagic.start_pool(workers=2, start_method=start, wait=True)
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == [("old", 0), ("NEW", 1)]
        err = capsys.readouterr().err
        assert err.count(f"mpmagic: {mod}.py changed on disk while this run went on") == 1, err
        said = [str(w.message) for w in caught if "mpmagic: --checkpoint:" in str(w.message)]
        assert len(said) == 1 and f"{mod}.py changed on disk while this cell went on" in said[0], said
        assert f"importlib.reload({mod})" in said[0] and "not stored" in said[0]
        _save(source, "def g(x):\n    return ('old', x)\n")
        mark.unlink()
        run(ip, f"importlib.reload({mod})")
        oracle = [run(ip, cell.replace("rank", str(r))) for r in range(2)]  # serial: the cell, rank by rank
        assert oracle == [("old", 0), ("old", 1)]
        assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == oracle
        assert "resumed: 0 of 2" in api.last_report().line()
    finally:
        sys.modules.pop(mod, None)
        from mpmagic import pool as pool_module

        pool_module.shutdown()  # (this test's pool, its start method and recycling, is not the next test's)


def test_a_parallel_cells_own_module_counts_by_its_file_and_edited_turns_the_checkpoint_off(
        ip, store_dir, tmp_path, monkeypatch, local_pool):
    """A %%parallel cell's modules travel by name, and were keyed by name: a module of the
    user's edited and reloaded kept the cell's stored values ([1, 2] where the ranks now
    give [0, 100]). By its file now; edited without a reload, the cell runs without the
    checkpoint, as a map does."""
    path = tmp_path / "cellmod_ck.py"
    path.write_text("def g(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cell = "v = cellmod_ck.g(rank)\nv\n"
    try:
        run(ip, "import importlib, cellmod_ck")
        assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == [1, 2]
        path.write_text("def g(x):\n    return x * 100\n")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == [1, 2]  # (loaded: old)
        said = [str(w.message) for w in caught if "changed on disk" in str(w.message)]
        assert len(said) == 1 and said[0].startswith("mpmagic: --checkpoint: cellmod_ck.py changed on disk"), said
        assert "so this cell runs without the checkpoint" in said[0]
        run(ip, "importlib.reload(cellmod_ck)")
        assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == [0, 100]
        assert "resumed: 0 of 2" in api.last_report().line()
        assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == [0, 100]
        assert "resumed: 2 of 2" in api.last_report().line()
    finally:
        sys.modules.pop("cellmod_ck", None)


@pytest.mark.parametrize("imported_here", [True, False])
def test_a_module_a_parallel_cell_imports_itself_counts_by_its_file(
        ip, store_dir, tmp_path, monkeypatch, local_pool, imported_here):
    """A cell whose code imports the user's module itself (`import cellmod_in` in the cell) was
    keyed without it (only modules named by notebook globals counted): edited and reloaded (or
    only edited, when the notebook never imported it), the cell's old values were resumed where
    its ranks, and the cell run serially, give the new ones."""
    mod = f"cellmod_in_{imported_here}"
    path = tmp_path / f"{mod}.py"
    _save(path, "def g(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cell = f"import {mod}\nv = {mod}.g(rank)\nv\n"
    try:
        run(ip, "import importlib" + (f", {mod}" if imported_here else ""))
        assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == [1, 2]
        assert list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell)) == [1, 2]
        assert "resumed: 2 of 2" in api.last_report().line()
        _save(path, "def g(x):\n    return x * 100\n")
        if imported_here:
            run(ip, f"importlib.reload({mod})")
        else:  # (the workers keep what they imported: new ones import the file)
            mpmagic.restart_pool()
        values = list(ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", cell))
        assert "resumed: 0 of 2" in api.last_report().line()
        oracle = [run(ip, cell.replace("rank", str(r))) for r in range(2)]  # serial: the cell, rank by rank
        assert values == oracle == [0, 100]
    finally:
        sys.modules.pop(mod, None)


def test_items_of_a_class_from_a_module_edited_and_not_reloaded_are_not_read_or_stored(ip, store_dir, tmp_path,
                                                                                       monkeypatch, local_pool):
    """As for the function's module: items of a class of the user's module edited without a
    reload were computed by the class the workers had loaded and stored under the edited
    file's key, then resumed after the reload (stale areas where map gives the new ones)."""
    path = tmp_path / "shapes_ed.py"
    path.write_text("class Sq:\n    def __init__(self, s):\n        self.s = s\n"
                    "    def area(self):\n        return self.s * self.s\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run(ip, "import importlib, shapes_ed\ndef area(sq):\n    return sq.area()\n"
                "items = [shapes_ed.Sq(i) for i in range(4)]")
        assert run(ip, "%pmap -q --checkpoint area, items") == [0, 1, 4, 9]
        path.write_text("class Sq:\n    def __init__(self, s):\n        self.s = s\n"
                        "    def area(self):\n        return self.s * self.s * 10\n")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run(ip, "%pmap -q --checkpoint area, items") == run(ip, "list(map(area, items))")
        said = [str(w.message) for w in caught if "changed on disk" in str(w.message)]
        assert len(said) == 1 and said[0].startswith(
            "mpmagic: --checkpoint: items of this run of `area` name shapes_ed.py, changed on disk"), said
        assert "importlib.reload(shapes_ed)" in said[0]
        run(ip, "importlib.reload(shapes_ed)\nitems = [shapes_ed.Sq(i) for i in range(4)]")
        oracle = run(ip, "list(map(area, items))")
        assert oracle == [0, 10, 40, 90]
        assert run(ip, "%pmap -q --checkpoint area, items") == oracle
        assert "resumed: 0 of 4" in mpmagic.last_report().line()
        assert run(ip, "%pmap -q --checkpoint area, items") == oracle
        assert "resumed: 4 of 4" in mpmagic.last_report().line()
    finally:
        sys.modules.pop("shapes_ed", None)


def test_a_module_the_functions_module_imports_counts_by_its_file_and_the_code_taken_from_it(
        ip, store_dir, tmp_path, monkeypatch, local_pool):
    """tester-bgdurable finding 2: f calls m1.g, which calls m2.k; m2 edited and reloaded,
    --checkpoint returned the stored results of the old k, without a word (map gave the
    new). The user's modules that a covered module imports count by their file too, and a
    function m1 took with `from m2 import k` by the code m1 has (a reload of m2 alone leaves
    m1's k the old one, in the notebook and in the workers: a kernel restart gives the new)."""
    (tmp_path / "m2_tr.py").write_text("def k(x):\n    return 0\n")
    (tmp_path / "m1_tr.py").write_text("import m2_tr\nfrom m2_tr import k\n"
                                       "def g(x):\n    return x + m2_tr.k(x)\ndef g2(x):\n    return x + k(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run(ip, "import importlib, m1_tr, m2_tr\ndef via(x):\n    return m1_tr.g(x)\n"
                "def via2(x):\n    return m1_tr.g2(x)\n")
        assert run(ip, "%pmap -q --checkpoint via, range(4)") == [0, 1, 2, 3]
        fresh2 = run_key(ip.user_ns["via2"], False)[0]
        (tmp_path / "m2_tr.py").write_text("def k(x):\n    return 5000\n")
        # edited, not reloaded: m2 is under the key, so the run goes without the checkpoint
        assert _edited_line(ip, "%pmap -q --checkpoint via, range(4)", "m2_tr") == [0, 1, 2, 3]
        run(ip, "importlib.reload(m2_tr)")
        oracle = run(ip, "list(map(via, range(4)))")
        assert oracle == [5000, 5001, 5002, 5003]
        assert run(ip, "%pmap -q --checkpoint via, range(4)") == oracle
        assert "resumed: 0 of 4" in mpmagic.last_report().line()
        # m1's own k is still the old one: its key is neither the old files' nor that of m1 loaded afresh
        stale2 = run_key(ip.user_ns["via2"], False)[0]
        assert run(ip, "list(map(via2, range(4)))") == [0, 1, 2, 3]
        run(ip, "importlib.reload(m1_tr)")
        assert run(ip, "list(map(via2, range(4)))") == [5000, 5001, 5002, 5003]
        assert len({fresh2, stale2, run_key(ip.user_ns["via2"], False)[0]}) == 3
    finally:
        sys.modules.pop("m1_tr", None)
        sys.modules.pop("m2_tr", None)


_CFG_V1 = "THRESHOLD = 10\nclass C:\n    def s(self):\n        return 1\n"
_CFG_V2 = "THRESHOLD = 1000\nclass C:\n    def s(self):\n        return 7\n"


@pytest.mark.parametrize("n, taker, took", [
    (1, "from cfg_st1 import THRESHOLD, C\ndef g(x):\n    return x * THRESHOLD + C().s()\n", "THRESHOLD, C"),
    (2, "from cfg_st2 import THRESHOLD\ndef g(x):\n    return x * THRESHOLD + 1\n", "THRESHOLD"),  # a value only
    (3, "from cfg_st3 import C\nINST = C()\ndef g(x):\n    return x * 10 + INST.s()\n", "C"),  # an instance made
    (4, "import cfg_st4\nT = cfg_st4.THRESHOLD\ndef g(x):\n    return x * T + cfg_st4.C().s()\n", ""),  # at import
], ids=["value_and_class", "value", "instance", "module_used_at_import"])
def test_a_module_holding_names_taken_from_a_module_reloaded_after_it_runs_without_the_checkpoint(
        ip, store_dir, tmp_path, monkeypatch, local_pool, method, n, taker, took):
    """tester-regress21 finding 1: m5 does `from cfg import THRESHOLD, C`; cfg.py edited and
    cfg alone reloaded. m5 still holds the old names (the serial map gives [1, 11, 21]); the
    checkpointed run computed that and stored it under the key of the new cfg.py, and in a new
    kernel (where map gives [7, 1007, 2007]) it said "resumed: 3 of 3" and returned [1, 11, 21].
    Such a run goes without the checkpoint now, after one line asking to reload m5 too; a new
    kernel computes with the new files, and stores."""
    from conftest import ensure_pool

    from mpmagic import pool as pool_module

    monkeypatch.syspath_prepend(str(tmp_path))
    _save(tmp_path / f"cfg_st{n}.py", _CFG_V1)
    _save(tmp_path / f"m5_st{n}.py", taker)
    imports = f"import importlib, m5_st{n}, cfg_st{n}\ndef via_st(x):\n    return m5_st{n}.g(x)\n"
    cell = "%pmap -q --checkpoint via_st, range(3)"
    try:
        run(ip, imports)
        old = run(ip, "list(map(via_st, range(3)))")
        assert run(ip, cell) == old
        _save(tmp_path / f"cfg_st{n}.py", _CFG_V2)
        run(ip, f"importlib.reload(cfg_st{n})")
        held = run(ip, "list(map(via_st, range(3)))")  # (m5 holds what it took: old THRESHOLD, old C...)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run(ip, cell) == held
        said = [str(w.message) for w in caught if "mpmagic: --checkpoint" in str(w.message)]
        assert len(said) == 1, said
        what = f"took {took} from cfg_st{n}.py" if took else f"used cfg_st{n}.py"
        assert said[0].startswith(f"mpmagic: --checkpoint: m5_st{n}.py {what} when it was loaded, "
                                  f"before cfg_st{n} was reloaded, so this run of `via_st` runs without the checkpoint "
                                  "(nothing read from it or stored)"), said
        assert said[0].endswith(f"importlib.reload(m5_st{n}) to run one version, which the checkpoint keeps")
        assert "checkpoint" not in mpmagic.last_report().line()
        # A new kernel: the modules imported afresh, new workers.
        sys.modules.pop(f"m5_st{n}"), sys.modules.pop(f"cfg_st{n}")
        pool_module.shutdown()
        ensure_pool(method)
        run(ip, imports)
        oracle = run(ip, "list(map(via_st, range(3)))")
        assert oracle not in (old, held)
        assert run(ip, cell) == oracle
        assert "resumed: 0 of 3" in mpmagic.last_report().line()
        assert run(ip, cell) == oracle
        assert "resumed: 3 of 3" in mpmagic.last_report().line()
        # After reloading m5 too (the line's advice), one version runs: the checkpoint is used.
        _save(tmp_path / f"cfg_st{n}.py", _CFG_V1)
        run(ip, f"importlib.reload(cfg_st{n})\nimportlib.reload(m5_st{n})")
        assert run(ip, cell) == old == run(ip, "list(map(via_st, range(3)))")
        assert "resumed: 3 of 3" in mpmagic.last_report().line()  # (what the first run stored)
    finally:
        sys.modules.pop(f"m5_st{n}", None)
        sys.modules.pop(f"cfg_st{n}", None)



def test_run_key_covers_a_module_a_value_is_taken_from_and_one_imported_in_a_functions_body(ip, tmp_path,
                                                                                            monkeypatch):
    """`from cfg import THRESHOLD` (an int: nothing in the module names cfg) and `import lazy`
    inside a function: neither cfg.py nor lazy.py was in the key, so after an edit a new kernel
    resumed the old files' results. Their files count now, as an imported module's do."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "cfg_vk.py").write_text("THRESHOLD = 10\n")
    (tmp_path / "lazy_vk.py").write_text("Z = 1\n")  # (never imported in the notebook)
    (tmp_path / "m_vk.py").write_text("from cfg_vk import THRESHOLD\n"
                                      "def g(x):\n    import lazy_vk\n    return x * THRESHOLD + lazy_vk.Z\n")
    try:
        run(ip, "import m_vk\ndef via_vk(x):\n    return m_vk.g(x)\n")
        used: dict = {}
        first = run_key(ip.user_ns["via_vk"], False, used)[0]
        assert {"m_vk", "cfg_vk", "lazy_vk"} <= set(used)
        _save(tmp_path / "cfg_vk.py", "THRESHOLD = 1000\n")
        second = run_key(ip.user_ns["via_vk"], False)[0]
        _save(tmp_path / "lazy_vk.py", "Z = 2\n")
        assert len({first, second, run_key(ip.user_ns["via_vk"], False)[0]}) == 3
    finally:
        sys.modules.pop("m_vk", None)
        sys.modules.pop("cfg_vk", None)


def test_a_module_reloaded_in_the_notebook_is_said_to_be_reloaded_on_dask(ip, dask_cluster, request, tmp_path,
                                                                           monkeypatch, capsys):
    """Dask workers ran the old code without a word; they reload it now (test_dask.py shows the results)."""
    from conftest import ensure_pool

    from mpmagic import pool as pool_module

    ensure_pool("dask", request)
    (tmp_path / "mymod_dk.py").write_text("K = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run(ip, "import importlib, mymod_dk")
        assert run(ip, "%pmap -q abs, [-1]") == [1]  # (the pool sees the module as first loaded)
        (tmp_path / "mymod_dk.py").write_text("K = 2\n")
        run(ip, "importlib.reload(mymod_dk)")
        capsys.readouterr()
        assert run(ip, "%pmap -q abs, [-2]") == [2]
        assert "workers reload mymod_dk where they imported it (reloaded in the notebook)" in capsys.readouterr().err
    finally:
        sys.modules.pop("mymod_dk", None)
        pool_module.shutdown()


def _save(path: Path, text: str, n: list[int] = [0]) -> None:  # noqa: B006 (a counter)
    """Write a module file with an mtime seconds after the last one (a .pyc goes by seconds and size)."""
    n[0] += 5
    path.write_text(text)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + n[0] * 1_000_000_000))


def test_a_module_changed_on_disk_since_the_notebook_loaded_it_is_said(ip, tmp_path, monkeypatch, capsys):
    """Workers (re)load the file as it is on disk. Saved again after the notebook's reload, or after
    its import and before the first run, they ran v3 (v2) where map ran v2 (v1), with no line: the
    file's stat was first taken at the module's first parallel run, after the second save."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mymod_ed", "mymod_ed2"):
        _save(tmp_path / f"{name}.py", "def f(x):\n    return ('v1', x)\n")
    line = "changed on disk since the notebook loaded it"
    try:
        run(ip, "import importlib, mymod_ed, mymod_ed2")
        capsys.readouterr()
        run(ip, "%pmap -q mymod_ed.f, range(2)")
        assert line not in capsys.readouterr().err  # nothing changed: no line
        _save(tmp_path / "mymod_ed.py", "def f(x):\n    return ('v2', x)\n")
        run(ip, "importlib.reload(mymod_ed)")
        _save(tmp_path / "mymod_ed.py", "def f(x):\n    return ('v3', x)\n")  # saved, not reloaded
        run(ip, "%pmap -q mymod_ed.f, range(2)")
        assert f"mymod_ed.py {line}" in capsys.readouterr().err
        _save(tmp_path / "mymod_ed2.py", "def f(x):\n    return ('v2', x)\n")  # before its first run
        run(ip, "%pmap -q mymod_ed2.f, range(2)")
        assert f"mymod_ed2.py {line}" in capsys.readouterr().err
        run(ip, "importlib.reload(mymod_ed)")
        assert run(ip, "%pmap -q mymod_ed.f, range(2)") == [("v3", 0), ("v3", 1)]
        assert line not in capsys.readouterr().err  # one version again
    finally:
        sys.modules.pop("mymod_ed", None)
        sys.modules.pop("mymod_ed2", None)


def test_an_inplace_autoreload_reaches_the_workers_and_the_store(ip, store_dir, tmp_path, monkeypatch, capsys):
    """IPython 9's %autoreload 2 updates the module's functions in place (no importlib.reload):
    map gave v2 while %pmap gave v1 (by reference, from-imported, through a cell function), said
    "changed on disk ... importlib.reload", and --checkpoint stored the v1 results under v2's key."""
    deduper = pytest.importorskip("IPython.extensions.deduperreload.deduperreload")
    from IPython.extensions.autoreload import ModuleReloader

    monkeypatch.setattr(deduper.DeduperReloader, "maybe_reload_module", deduper.DeduperReloader.maybe_reload_module)
    monkeypatch.syspath_prepend(str(tmp_path))
    _save(tmp_path / "mymod_ar.py", "def f(x):\n    return ('v1', x)\n")
    try:
        run(ip, "import mymod_ar\nfrom mymod_ar import f as f_ar\ndef g_ar(x):\n    return mymod_ar.f(x)")
        reloader = ModuleReloader()  # what %autoreload 2 runs before each cell
        reloader.enabled = True
        assert run(ip, "%pmap -q --checkpoint mymod_ar.f, range(2)") == [("v1", 0), ("v1", 1)]
        _save(tmp_path / "mymod_ar.py", "def f(x):\n    return ('v2', x)\n")
        before = sys.modules["mymod_ar"].__spec__
        reloader.check()
        assert sys.modules["mymod_ar"].__spec__ is before  # in place: no importlib.reload
        capsys.readouterr()
        v2 = [("v2", 0), ("v2", 1)]
        assert run(ip, "%pmap -q --checkpoint mymod_ar.f, range(2)") == v2 == run(ip, "list(map(f_ar, range(2)))")
        assert "resumed: 0 of 2" in mpmagic.last_report().line()  # computed again, by v2
        assert run(ip, "%pmap -q f_ar, range(2)") == v2 == run(ip, "%pmap -q g_ar, range(2)")
        err = capsys.readouterr().err
        assert "workers reload mymod_ar" in err and "changed on disk" not in err
    finally:
        sys.modules.pop("mymod_ar", None)


def test_workers_reload_modules_in_the_order_the_notebook_did(ip, tmp_path, monkeypatch):
    """m1 does `from m2 import g`; the notebook reloaded m1, then m2, so m1.g stayed v1. Workers reloaded
    in sys.modules order (m2 first) and gave v2."""
    monkeypatch.syspath_prepend(str(tmp_path))
    _save(tmp_path / "mymod_o1.py", "from mymod_o2 import g\ndef f(x):\n    return g(x)\n")
    _save(tmp_path / "mymod_o2.py", "def g(x):\n    return ('v1', x)\n")
    try:
        run(ip, "import importlib, mymod_o1, mymod_o2")
        assert run(ip, "%pmap -q mymod_o1.f, range(2)") == [("v1", 0), ("v1", 1)]
        _save(tmp_path / "mymod_o2.py", "def g(x):\n    return ('v2', x)\n")
        run(ip, "importlib.reload(mymod_o1); importlib.reload(mymod_o2)")
        assert run(ip, "%pmap -q mymod_o1.f, range(2)") == run(ip, "list(map(mymod_o1.f, range(2)))")
    finally:
        sys.modules.pop("mymod_o1", None)
        sys.modules.pop("mymod_o2", None)


def test_a_module_imported_after_one_left_sys_modules_is_still_watched_for_reloads(tmp_path, monkeypatch):
    """The scan of sys.modules went on from its old length: after a `del sys.modules[m]`, the
    next module imported was skipped, and its reload never reached the workers."""
    import importlib

    from mpmagic.warmup import Warmth

    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mymod_sa", "mymod_sb"):
        _save(tmp_path / f"{name}.py", "X = 1\n")
    try:
        importlib.import_module("mymod_sa")
        warmth = Warmth()
        warmth.reloads.check(None, None)
        del sys.modules["mymod_sa"]
        importlib.import_module("mymod_sb")  # sys.modules as long as at the last look
        warmth.reloads.check(None, None)
        importlib.reload(sys.modules["mymod_sb"])
        assert warmth.reloads.check(None, None)  # mymod_sb's reload is seen
    finally:
        sys.modules.pop("mymod_sa", None)
        sys.modules.pop("mymod_sb", None)


def test_resumed_instances_of_a_notebook_class_are_instances_of_the_notebooks_class(ip, store_dir):
    # A new kernel has a new class object (the cell run again): the stored results, pickled with
    # the old one by value, must come back as the notebook's class, as live results do.
    cell = ("import dataclasses\nG = 1\n@dataclasses.dataclass\nclass Point:\n    x: int\n"
            "    def g(self):\n        return G\n"
            "def mk(x):\n    return Point(x)\n")
    run(ip, cell)
    first = run(ip, "%pmap -q --checkpoint mk, range(4)")
    run(ip, cell)  # as a new kernel: another Point class object, same code (same run key)
    again = run(ip, "%pmap -q --checkpoint mk, range(4)")
    assert "resumed: 4 of 4" in api.last_report().line()
    point = ip.user_ns["Point"]
    assert [type(r) for r in again] == [point] * 4 and again == [point(x) for x in range(4)] and first
    run(ip, "G = 2")
    assert again[0].g() == 2  # the notebook's class untouched: its methods read the notebook's globals


def test_renumbering_keeps_notes_a_library_set_as_a_tuple_or_a_str():
    """A resumed run's "item N" counts in the whole input; a str ``__notes__``
    became a list of its characters, a tuple a list."""
    from mpmagic import checkpoint

    exc = ValueError("x")
    exc.__notes__ = ("from the library", "mpmagic: raised by item 1 of the input: f(3)")
    checkpoint._renumber(exc, [5, 7])
    assert exc.__notes__ == ("from the library", "mpmagic: raised by item 7 of the input: f(3)")
    exc.__notes__ = "from the library"
    checkpoint._renumber(exc, [5, 7])
    assert exc.__notes__ == "from the library"


def test_parallel_checkpoint_traceback_names_the_notebook_cell(ip, store_dir, capsys):
    """With --checkpoint the cell's spec is built twice (to key the run, then to
    run it): the first build replaced IPython's linecache entry, so the second
    found no origin and a failing rank showed `File <parallel-cell-…>:2`.
    The oracle: the same cell without --checkpoint."""
    cell = "if rank == 1:\n    raise ValueError('rank 1 broke')\nrank\n"
    for flag in ("", " --checkpoint"):
        result = ip.run_cell(f"%%parallel -n 2{flag}\n{cell}", store_history=True)  # (numbered, as in a notebook)
        assert isinstance(result.error_in_exec, mpmagic.ParallelError)
        shown = capsys.readouterr()
        text = shown.out + shown.err
        assert f"[rank 1] Cell In[{result.execution_count}], line 3" in text, (flag, text)
        assert "parallel-cell" not in text, (flag, text)


# --------------------------------------------------------------------------
# bounded writes, read-only stores, full disks, disk space given back


def test_the_writer_commits_in_bounded_batches_and_put_waits_for_room(monkeypatch):
    # A kill loses what is queued plus one transaction: both must stay bounded when
    # results come faster than the disk takes them (before: one batch of everything).
    monkeypatch.setattr(checkpoint, "_BATCH_BYTES", 3000)
    monkeypatch.setattr(checkpoint, "_QUEUE_BYTES", 5000)
    gate, batches = threading.Event(), []

    class SlowStore:
        readonly = False

        def put_packed(self, run, name, chunks, waiting=None):
            gate.wait(10)
            batches.append(len(chunks))
            return 0

        def evict(self, max_bytes, keep=None):
            return []

    writer = checkpoint._Writer(SlowStore(), b"r" * 16, "f")
    putter = threading.Thread(target=lambda: [writer.put([(bytes([i]) * 16, bytes(1000))]) for i in range(20)])
    putter.start()
    putter.join(0.5)
    assert putter.is_alive()  # put waits for room
    assert writer._queued <= 5000 + 1100
    gate.set()
    putter.join(10)
    writer.finish()
    assert sum(batches) == 20 and max(batches) <= 3, batches


def test_files_a_killed_write_left_are_removed_when_the_store_is_opened(tmp_path):
    np = pytest.importorskip("numpy")
    store = Store(tmp_path)
    run_key_, held = b"r" * 16, b"k" * 16
    store.put(run_key_, "f", [(held, np.arange(200_000.0))])
    store.close()
    blobs = tmp_path / "blobs"
    old_tmp, old_orphan = blobs / ".tmp-deadbeef", blobs / f"{run_key_.hex()}-{(b'o' * 16).hex()}.bin"
    young_orphan = blobs / f"{run_key_.hex()}-{(b'y' * 16).hex()}.bin"  # maybe another kernel's, row on its way
    for f in (old_tmp, old_orphan, young_orphan):
        f.write_bytes(b"left by a kill")
    for f in (old_tmp, old_orphan, *blobs.glob(f"*{held.hex()}.bin")):
        os.utime(f, (1, 1))
    store = Store(tmp_path)
    assert not old_tmp.exists() and not old_orphan.exists() and young_orphan.exists()
    assert len(store.load(run_key_, [held])) == 1  # the file a row names stays
    store.close()


_READONLY_SCRIPT = textwrap.dedent("""
    import os, sqlite3, sys, warnings
    from mpmagic import checkpoint
    from mpmagic.checkpoint_store import Store
    if len(sys.argv) > 2:  # as on Python < 3.11: SQLite's errors carry no sqlite_errorcode, only a message
        real = Store._connect
        def bare(self):
            try:
                return real(self)
            except sqlite3.Error as exc:
                raise type(exc)(str(exc)) from None
        Store._connect = bare
    store = Store(sys.argv[1])
    print(store.readonly, store.load(b"r" * 16, [b"k" * 16]))
    os.chdir(os.path.dirname(sys.argv[1]))
    print(repr(checkpoint.manage(None)).splitlines()[0])
    try:
        checkpoint.manage("clear")
    except Exception as exc:
        print(type(exc).__name__, exc)
""")


@pytest.mark.parametrize("error_code", [True, False], ids=["sqlite_errorcode", "message_only"])
def test_a_store_in_a_folder_this_user_may_only_read_is_read(tmp_path, error_code):
    folder = tmp_path / ".mpmagic"
    store = Store(folder)
    store.put(b"r" * 16, "f", [(b"k" * 16, "stored")])
    store.close()
    prefix = []
    if os.geteuid() == 0:  # root ignores file modes unless it drops these capabilities
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]
    os.chmod(folder / DB_NAME, 0o444)
    os.chmod(folder, 0o555)
    try:
        out = subprocess.run([*prefix, sys.executable, "-c", _READONLY_SCRIPT, str(folder),
                              *([] if error_code else ["bare"])], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        os.chmod(folder, 0o755)
    lines = out.stdout.splitlines()
    assert lines[0] == "True {b'kkkkkkkkkkkkkkkk': 'stored'}", out.stdout + out.stderr
    assert "read-only for this user" in lines[1]
    assert lines[2].startswith("MPMagicError") and "read-only" in lines[2] and len(lines) == 3


@pytest.mark.parametrize("error_code", [True, False], ids=["sqlite_errorcode", "message_only"])  # (< 3.11: no code)
def test_clear_on_a_full_disk_deletes_the_files_first_and_else_says_so_in_one_line(ip, store_dir, monkeypatch,
                                                                                   error_code):
    np = pytest.importorskip("numpy")
    store = checkpoint.open_store()
    store.put(b"r" * 16, "big", [(b"k" * 16, np.arange(200_000.0))])
    real, tries = Store._delete_rows, []

    def full_once(self, run_):
        tries.append(sorted(p.name for p in self.blobs.iterdir()))
        if len(tries) == 1:
            exc = sqlite3.OperationalError("database or disk is full")
            if error_code:
                exc.sqlite_errorcode = 13
            raise exc
        return real(self, run_)

    monkeypatch.setattr(Store, "_delete_rows", full_once)
    run(ip, "%pool checkpoints clear big")
    assert tries[1] == [] and checkpoint.list_runs() == []  # the files went first, to make room
    store.put(b"r" * 16, "big", [(b"k" * 16, 1)])

    def full(self, run_):
        exc = sqlite3.OperationalError("database or disk is full")
        if error_code:
            exc.sqlite_errorcode = 13
        raise exc

    store.put(b"o" * 16, "other", [(b"k" * 16, 2)])
    monkeypatch.setattr(Store, "_delete_rows", full)
    with pytest.raises(mpmagic.MPMagicError, match="is full.*clear every run.*free some space"):
        checkpoint.manage("clear", "big")
    assert sorted(r.name for r in checkpoint.list_runs()) == ["big", "other"]
    # Every run: the rows cannot be deleted, the store's files can (tests below).
    with capture_output() as out:
        checkpoint.manage("clear")
    assert out.stdout.startswith("deleted 2 checkpointed runs from") and checkpoint.list_runs() == []


def test_clear_and_eviction_give_the_space_back_to_the_disk(tmp_path):
    store = Store(tmp_path)
    for i in range(4):
        store.put(bytes([i]) * 16, f"f{i}", [(b"k" * 16, os.urandom(4 << 20))])
    size = (tmp_path / DB_NAME).stat().st_size
    assert size > 16 << 20
    store.evict(1, keep=b"\x03" * 16)
    store.clear()
    store.close()
    assert (tmp_path / DB_NAME).stat().st_size < 1 << 20
    # Small results live in the WAL until a checkpoint: a clear gives that back too (a full disk stayed full)
    store = Store(tmp_path)
    store.put(b"s" * 16, "small", [(bytes([i % 256, i // 256]) * 8, os.urandom(2000)) for i in range(300)])
    wal = tmp_path / (DB_NAME + "-wal")
    assert wal.exists() and wal.stat().st_size > 300 * 2000
    store.clear()
    assert wal.stat().st_size == 0 if wal.exists() else True
    store.close()


class _FullDisk:
    """A store's connection on a disk the store filled: the statements named raise SQLITE_FULL,
    as SQLite does there (deleting rows and writing the log back both need room first)."""

    def __init__(self, conn, refused):
        self.conn, self.refused = conn, refused

    def _check(self, sql):
        if any(word in sql for word in self.refused):
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = 13
            raise exc

    def execute(self, sql, *args):
        self._check(sql)
        return self.conn.execute(sql, *args)

    def executescript(self, sql):
        self._check(sql)
        return self.conn.executescript(sql)

    def __enter__(self):
        return self.conn.__enter__()

    def __exit__(self, *exc):
        return self.conn.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.conn, name)


# The two outcomes the tester saw on a 4 MB tmpfs the store filled, one per run:
# the rows deleted but the log not written back ("deleted", the disk still full),
# or the rows not deleted either (refused, "delete the folder").
_FULL_DISK = {"rows_deleted": ("incremental_vacuum", "wal_checkpoint", "VACUUM"),
              "nothing_deleted": ("DELETE", "incremental_vacuum", "wal_checkpoint", "VACUUM")}


@pytest.mark.parametrize("refused", list(_FULL_DISK.values()), ids=list(_FULL_DISK))
def test_clear_of_every_run_on_a_disk_the_store_filled_frees_its_log_and_says_how_much(ip, store_dir, refused):
    """%pool checkpoints clear on a disk the store filled said "deleted" and left the
    4 MB write-ahead log (0 bytes free: every later --checkpoint run warned again),
    or refused: now the store's files are deleted and an empty store takes their place."""
    store = checkpoint.open_store()
    store.put(b"s" * 16, "small", [(bytes([i % 256, i // 256]) * 8, os.urandom(2000)) for i in range(300)])
    store.put(b"t" * 16, "tiny", [(b"k" * 16, 1)])
    wal = store_dir / (DB_NAME + "-wal")
    logged = wal.stat().st_size
    assert logged > 300 * 2000  # (small results live in the log until a checkpoint)
    store.conn = _FullDisk(store.conn, refused)
    with capture_output() as out:
        run(ip, "%pool checkpoints clear")
    said = out.stdout.strip()
    assert said.startswith("deleted 2 checkpointed runs from") and len(said.splitlines()) == 1, said
    freed = re.search(r"\((\d+) kB freed\)", said)  # (the log's 600 kB and more)
    assert freed and int(freed.group(1)) * 1000 >= logged * 0.9, (said, logged)
    assert not wal.exists() or wal.stat().st_size < logged // 10
    assert checkpoint.list_runs() == [] and isinstance(checkpoint.open_store().conn, sqlite3.Connection)
    assert run(ip, "%pmap -q --checkpoint work, range(3)") == [0, 1, 4]  # the store works again
    assert [r.items for r in checkpoint.list_runs()] == [3]


def test_clear_of_some_runs_on_a_disk_the_store_filled_says_the_disk_is_still_full(ip, store_dir):
    """Only a clear of every run can delete the store's files: one of some runs
    says truthfully that the disk stays full, and how to free it."""
    store = checkpoint.open_store()
    store.put(b"s" * 16, "small", [(bytes([i % 256, i // 256]) * 8, os.urandom(2000)) for i in range(300)])
    store.put(b"t" * 16, "tiny", [(b"k" * 16, 1)])
    store.conn = _FullDisk(store.conn, _FULL_DISK["rows_deleted"])
    with capture_output() as out:
        run(ip, "%pool checkpoints clear small")
    said = out.stdout.strip()
    assert said.startswith("deleted 1 checkpointed run named 'small' from") and len(said.splitlines()) == 1
    assert "the disk is still full" in said and "clear every run" in said, said
    assert [r.name for r in checkpoint.list_runs()] == ["tiny"]


def test_clear_leaves_a_store_another_kernel_has_open_and_says_so(ip, store_dir):
    """The store's files are deleted only when no other process has them open
    (SQLite's own locks say so): another kernel's connection must not lose its files."""
    store = checkpoint.open_store()
    store.put(b"t" * 16, "tiny", [(b"k" * 16, 1)])
    other = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
         "c.execute('SELECT count(*) FROM runs').fetchall(); print('open', flush=True); sys.stdin.read()",
         str(store_dir / DB_NAME)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "open"
        store.conn = _FullDisk(store.conn, _FULL_DISK["nothing_deleted"])
        with pytest.raises(mpmagic.MPMagicError, match="is full.*another kernel has the checkpoint store"):
            checkpoint.manage("clear")
        assert [r.name for r in checkpoint.list_runs()] == ["tiny"] and (store_dir / DB_NAME).exists()
    finally:
        other.communicate("", timeout=30)
    store.conn = _FullDisk(checkpoint.open_store().conn, _FULL_DISK["nothing_deleted"])
    with capture_output() as out:
        checkpoint.manage("clear")
    assert out.stdout.startswith("deleted 1 checkpointed run from") and checkpoint.list_runs() == []


_FILL_AND_CLEAR = """
import os, shutil, sys
from mpmagic.checkpoint_store import Store
folder = sys.argv[1]
store = Store(folder)
try:
    for i in range(20):  # 800 kB results: rows (not blobs/), in the log until a checkpoint
        store.put(bytes([i]) * 16, "big", [(b"k" * 16, os.urandom(800_000))])
except Exception as exc:
    print("full:", exc)
print("free before:", shutil.disk_usage(folder).free)
stored = len(store.runs())
cleared = store.clear()
print("cleared:", stored > 0 and int(cleared) == stored, cleared.freed > 3_000_000, repr(cleared.still_full))
print("free after:", shutil.disk_usage(folder).free > 3_000_000)
store.put(b"n" * 16, "next", [(b"k" * 16, os.urandom(800_000))])
print("stored:", [(r.name, r.items) for r in store.runs()])
"""


def test_clear_on_a_real_disk_the_store_filled(tmp_path):
    """The tester's case on a real 4 MB tmpfs (needs root to mount one in a private
    mount namespace): clear frees the disk every time, and the next run stores again."""
    folder = tmp_path / "disk"
    folder.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(_FILL_AND_CLEAR)
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("mounting a small tmpfs needs root and unshare")
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=4M tmpfs "$1" || exit 77; exec "$2" "$3" "$1"', "sh",
         str(folder), sys.executable, str(script)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("full:") and "disk is full" in lines[0], done.stdout
    assert lines[1:] == ["free before: 0", "cleared: True True ''", "free after: True", "stored: [('next', 1)]"], \
        done.stdout


def test_the_listing_counts_distinct_items_and_tells_runs_of_one_name_apart(tmp_path):
    store = Store(tmp_path)
    for _ in range(2):  # two kernels that ran the same call at once
        store.put(b"a" * 16, "work", [(bytes([i]) * 16, i) for i in range(3)])
    store.put(b"b" * 16, "work", [(b"k" * 16, 1)])
    runs = store.runs()
    assert sorted(r.items for r in runs) == [1, 3]
    listing = checkpoint.Checkpoints(runs)
    assert (b"a" * 4).hex() in repr(listing) and (b"b" * 4).hex() in repr(listing)
    store.close()


def _serial_failures(func, items) -> list[int]:
    """The oracle: the input positions at which serial ``map`` meets an error."""
    bad = []
    for i, x in enumerate(items):
        try:
            func(x)
        except Exception:
            bad.append(i)
    return bad


def test_a_resumed_run_names_failed_items_by_their_place_in_the_whole_input(ip, store_dir):
    """Resuming items 0-2, item 3's failure was item 6 in last_failures() (a collected
    failure was renumbered twice: as its chunk came, then again with the record), so
    ``%pdebug 3`` said item 3 did not fail; a raising run's line said "failed at item 0
    after 0 of 1 item" (its place among the computed items)."""
    run(ip, "def bad3(x):\n    if x in (3, 4):\n        raise ValueError(x)\n    return x\n")
    oracle = _serial_failures(ip.user_ns["bad3"], range(8))
    run(ip, "%pmap -q --checkpoint bad3, [0, 1, 2]")
    results = run(ip, "%pmap -q --checkpoint --errors collect -n 2 --chunksize 1 bad3, range(8)")
    assert [r.index for r in results if isinstance(r, mpmagic.Failed)] == oracle
    assert [(f.index, f.item) for f in mpmagic.last_failures()] == [(i, i) for i in oracle]
    from mpmagic import postmortem

    assert postmortem._pick(3)[1].index == 3  # (what %pdebug 3 replays)
    error = ip.run_cell("%pmap -q --checkpoint -n 2 --chunksize 1 bad3, range(8)").error_in_exec
    assert isinstance(error, ValueError) and f"raised by item {oracle[0]} of the input" in error.__notes__[-1]
    assert [f.index for f in mpmagic.last_failures()] == oracle[:1]
    line = api.last_report().line()
    assert line.startswith(f"pmap failed at item {oracle[0]} after ") and " of 8 items" in line, line


def test_a_resumed_runs_insights_name_the_slowest_item_by_its_place_in_the_input(ip, store_dir):
    """--insights after resuming items 0-2 named the slowest item by its place among the
    computed ones (item 1 for item 4)."""
    run(ip, "import time\ndef slow4(x):\n    if x == 4:\n        time.sleep(0.05)\n    return x\n")
    run(ip, "%pmap -q --checkpoint slow4, [0, 1, 2]")
    run(ip, "%pmap -q --checkpoint --insights -n 2 --chunksize 1 slow4, range(6)")
    report = api.last_report()
    insights = report.insights
    assert insights.slowest[0].index == 4 and {t.first for t in insights.tasks} == {3, 4, 5}
    assert report.slowest_where == "item 4"


def test_a_store_under_a_folder_that_may_not_be_entered_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    """``chmod 000`` on a folder on the way: Python 3.11's ``Path.exists()`` raises
    EACCES, and it did so while the warning was built (``_why``): a bare
    PermissionError from checkpoint.py lost the run instead of the documented line."""
    store = tmp_path / "locked" / "ckpt"
    denied = PermissionError(13, "Permission denied", str(store))

    def opens(path):
        raise denied

    def exists(self):
        raise denied

    monkeypatch.setattr(checkpoint, "_open", opens)
    monkeypatch.setattr(Path, "exists", exists)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert checkpoint.open_store(store) is None
    assert [str(w.message) for w in caught] == [
        f"mpmagic: cannot open the checkpoint store in {store} (PermissionError: {denied}); "
        "running without a checkpoint"]


def test_pool_checkpoints_clear_of_a_run_frees_the_size_the_listing_shows(ip, store_dir):
    """%pool checkpoints listed a run of 170 B and its clear said "(50 kB freed)": the
    store's files measured before and after, the log of the other runs written back
    too. Now the clear says what it deleted: the run's size as the listing shows it
    (its rows and its files), whatever else the store gave back."""
    import numpy as np

    store = checkpoint.open_store()
    store.put(b"w" * 16, "work", [(i.to_bytes(16, "big"), os.urandom(2000)) for i in range(100)])  # (in the log)
    store.put(b"t" * 16, "tiny", [(b"k" * 16, 1)])
    store.put(b"a" * 16, "arrays", [(b"a" * 16, np.ones(150_000))])  # (1.2 MB: in blobs/)
    sizes = {r.name: r.size for r in checkpoint.list_runs()}
    files = sum(f.stat().st_size for f in (store_dir / "blobs").iterdir())
    assert files > 150_000 * 8 and sizes["arrays"] >= files * 0.99 and sizes["tiny"] < 1000
    listing = repr(run(ip, "%pool checkpoints"))
    for name in ("tiny", "arrays"):
        row = next(line for line in listing.splitlines() if line.split()[:1] == [name])
        assert f" {fmt_bytes(sizes[name])} " in row
        with capture_output() as cap:
            run(ip, f"%pool checkpoints clear {name}")
        assert cap.stdout == (f"deleted 1 checkpointed run named {name!r} from {checkpoint.directory()} "
                              f"({fmt_bytes(sizes[name])} freed)\n")
    assert not list((store_dir / "blobs").iterdir())
    assert [r.name for r in checkpoint.list_runs()] == ["work"]


def test_a_lookup_index_made_stale_by_a_clear_never_gives_another_items_result(tmp_path):
    """A lazy input's lookups keep where the run's keys are (``KeyIndex``); a clear in
    between, and a chunk stored after it under a reused chunk id, must not make a key
    read the result at its old place."""
    from mpmagic.checkpoint_store import KeyIndex

    store = Store(tmp_path)
    try:
        run_id, k1, k2, k3 = b"r" * 16, b"1" * 16, b"2" * 16, b"3" * 16
        store.put(run_id, "f", [(k1, "old 1"), (k2, "old 2")])
        index = KeyIndex()
        assert store.load(run_id, [k1], index) == {k1: "old 1"}
        store.clear()
        store.put(run_id, "f", [(k2, "new 2"), (k1, "new 1")])  # (the same chunk id, SQLite's max + 1)
        assert store.load(run_id, [k1, k2], index) == {k1: "new 1", k2: "new 2"}
        store.put(run_id, "f", [(k3, "new 3")])
        assert store.load(run_id, [k3], index) == {k3: "new 3"}
    finally:
        store.close()


def test_a_clear_while_a_large_result_is_being_written_leaves_no_row_without_its_file(tmp_path, monkeypatch):
    """A clear (``%pool checkpoints clear`` while a background run goes on) between a large
    result's file and its row deleted the file, and the row came after it: the next lookup
    warned "failed their check (damaged file?)". (A clear of every run also deleted the
    file being written, and its rename stopped the run's storing.) A chunk's files and its
    row are one step for the other threads of the process now."""
    np = pytest.importorskip("numpy")
    store = Store(tmp_path)
    run_id = b"r" * 16
    store.put(run_id, "f", [(b"a" * 16, np.ones(300_000))])
    written, go = threading.Event(), threading.Event()
    write_file = Store._write_file

    def slow_write(self, *args):
        out = write_file(self, *args)
        written.set()
        go.wait(30)  # (a large result's fsync)
        return out

    monkeypatch.setattr(Store, "_write_file", slow_write)
    writer = threading.Thread(target=store.put, args=(run_id, "f", [(b"b" * 16, np.full(300_000, 2.0))]))
    writer.start()
    try:
        assert written.wait(30)
        clearing = threading.Thread(target=store.clear)
        clearing.start()
        clearing.join(1.0)  # (the clear may go first: it must not then leave the row without its file)
    finally:
        go.set()
        writer.join(30)
    clearing.join(30)
    monkeypatch.setattr(Store, "_write_file", write_file)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = store.load(run_id, [b"a" * 16, b"b" * 16])
        assert [str(w.message) for w in caught] == []
        assert found == {}  # (the clear came after the write: both deleted)
    finally:
        store.close()


def test_a_failed_run_over_a_generator_says_how_far_it_was_read_in_the_input(ip, store_dir):
    """The plain run inside a checkpointed one reads the checkpoint's iterator of missing
    items: its note counted in that, not in the user's input. The note counts in the input."""
    run(ip, "def fails_at_5(x):\n    if x == 5:\n        raise ValueError('item 5')\n    return work(x)\n"
            "gen = iter(range(10**6))")
    with pytest.raises(ValueError) as e:
        run(ip, f"mpmagic.pmap(fails_at_5, gen, checkpoint={str(store_dir)!r})")
    read = run(ip, "10**6 - sum(1 for _ in gen)")
    notes = [n for n in e.value.__notes__ if "make its input again" in n]
    assert notes == [f"mpmagic: to map it again, make its input again (an iterator: this one was read {read} items "
                     "in, past item 5, which failed, and goes on from there)"], e.value.__notes__


def _other_runs_lines(caught) -> list[str]:
    return [str(w.message) for w in caught if "resumes nothing" in str(w.message)]


def test_a_run_resuming_nothing_while_runs_of_its_name_are_stored_says_so_once(ip, store_dir):
    """The function changed (its code, or what it captures) since runs of its name were
    stored: its new key finds none of them, so nothing is resumed, and under -q nothing
    said so (the user expected the stored results). One line per run; none when its own
    run is stored, or when no other run of its name is."""
    run(ip, "def area(x):\n    return x * 2\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(ip, "%pmap -q --checkpoint area, range(6)") == [0, 2, 4, 6, 8, 10]
        assert run(ip, "%pmap -q --checkpoint area, range(6)") == [0, 2, 4, 6, 8, 10]  # (its own run: resumed)
    assert _other_runs_lines(caught) == []
    run(ip, "def area(x):\n    return x * 3\n")  # the code changed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(ip, "%pmap -q --checkpoint area, range(6)") == [0, 3, 6, 9, 12, 15]
    assert _other_runs_lines(caught) == [
        f"mpmagic: --checkpoint: this run of `area` resumes nothing: the store in {store_dir} holds 1 run of a "
        "function named `area` under other code, captured values or worker setup, whose results are not this "
        "code's; %pool checkpoints lists them, %pool checkpoints clear area deletes them"]
    with warnings.catch_warnings(record=True) as caught:  # (now its own run is stored: it resumes, nothing to say)
        warnings.simplefilter("always")
        assert run(ip, "%pmap -q --checkpoint area, range(8)") == [0, 3, 6, 9, 12, 15, 18, 21]
    assert _other_runs_lines(caught) == []
    run(ip, "import mpmagic\nK = 5\ndef area(x):\n    return x * K\n")  # a captured value: two other runs now, said once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(ip, f"mpmagic.pmap(area, iter(range(3)), checkpoint={str(store_dir)!r})") == [0, 5, 10]
    lines = _other_runs_lines(caught)
    assert len(lines) == 1 and "holds 2 runs of a function named `area`" in lines[0], lines


def test_a_cell_ending_in_an_assignment_is_keyed_apart_where_ipython_shows_assignments(ip, store_dir):
    """With ``ast_node_interactivity = 'last_expr_or_assign'`` a cell ending in ``x = ...`` has
    x as its value (cell.shows_last_assignment): the same cell's stored Nones from a run
    without it were returned."""
    assert ip.run_cell_magic("parallel", "-n 2 -q --checkpoint -o vals", "x = rank * 10\n") is None
    assert run(ip, "vals") == [None, None]
    run(ip, "%config InteractiveShell.ast_node_interactivity = 'last_expr_or_assign'")
    try:
        assert ip.run_cell_magic("parallel", "-n 2 -q --checkpoint", "x = rank * 10\n") == [0, 10]
    finally:
        run(ip, "%config InteractiveShell.ast_node_interactivity = 'last_expr'")
