"""A chaos soak: many ``%pmap`` / ``%%parallel`` calls with faults injected at random.

Used by ``benchmarks/bench_reliability.py --chaos`` (1,000 calls, figures in
docs/reliability.md) and, in a short form (100 calls), by tests/test_chaos.py.

Each call is planned by a seeded RNG (:func:`plan`): what it runs (a map of
small items, a map of large numpy arrays that travel through shared memory,
``mpmagic.Queue`` producers as tasks with the notebook consuming, a
``%%parallel`` cell of 2 or 3 ranks) and which faults it meets: items that
raise, an item that sleeps past ``--timeout``, a SIGKILL of a busy worker and
a SIGINT to the notebook sent from a timer thread while the call runs,
``--errors collect``, ``--retries``, and now and then calls from a second
thread at the same time. The functions are defined with ``run_cell`` in an
InteractiveShell, so ``__main__`` has no file, as in a notebook.

Every call is judged against serial Python computed here with the same
functions (:func:`judge_map`, :func:`judge_cell`, :func:`judge_queue`): the
right results, or the right clear error (the task's own exception for the
first failing item in input order, ``TaskTimeoutError`` naming the item that
hung, ``WorkerLostError`` only when a kill landed in the call's window and no
retry could absorb it, ``KeyboardInterrupt`` only when an interrupt was sent),
within a bound (a call past it is a hang: every thread's stack is dumped and
the call is interrupted). Timing decides which of the allowed outcomes a call
gets (a kill may land on an idle worker, or after the call's last item), so a
seed fixes the plan, not the outcome; a problem names its seed and call.

At the end (:func:`leaks`): shared-memory segments ``/dev/shm/mpm_<pid>_*``
still leased (the pool's free segments kept for reuse are counted apart, and
all must be gone once the pool stops), the queues' segments and semaphores,
child processes other than the pool's workers (and none once it stops), open
fds and threads against their baseline after warm-up, and the notebook's RSS.
Every ``every`` calls (:meth:`Soak.checkpoint`) the notebook's RSS (heap and
shared memory apart), fds, result segments mapped and Python objects are
recorded, so a slow leak shows as a trend (:func:`slope_per_100`), not only
as one end figure. After each call the harness drops what IPython itself
keeps of past cells (:func:`forget_outputs`): that is the shell's, not ours.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import mpmagic
from mpmagic import debugging, shm
from mpmagic import pool as pool_module

# The notebook's cells. ``compute`` / ``arr_compute`` are the pure part: the
# serial oracle calls them here, the tasks call them in the workers.
SETUP = """
import os, time
import numpy as np
import mpmagic

def compute(v, mode):
    if mode == "raise":
        raise ValueError(f"bad item {v}")
    return v * v + 1

def task(item):
    v, pause, mode = item
    if mode == "hang":
        time.sleep(CHAOS_HANG)
    elif pause:
        time.sleep(pause)
    return compute(v, mode)

def arr_compute(a, mode):
    if mode == "raise":
        raise ValueError(f"bad array {float(a[0])}")
    return a * 2.0 + 1.0

def arr_task(item):
    a, pause, mode = item
    if mode == "hang":
        time.sleep(CHAOS_HANG)
    elif pause:
        time.sleep(pause)
    return arr_compute(a, mode)

def produce(item):
    v, k, size, pause = item
    for j in range(k):
        chaos_q.put((v, j, b"q" * size))
        if pause:
            time.sleep(pause)
    return v

def rank_value(rank, spec):
    pause, mode = spec[rank]
    if mode == "hang":
        time.sleep(CHAOS_HANG)
    elif pause:
        time.sleep(pause)
    return compute(rank, mode)
"""

CONSUME = """
chaos_q.close()
chaos_got, chaos_lost = [], None
try:
    for _it in chaos_q:
        chaos_got.append(_it)
except mpmagic.SharedObjectGone as _e:   # QueueItemsLost: a producer died holding items
    chaos_lost = _e
"""

KINDS = ("pmap", "numpy", "queue", "parallel")


@dataclass
class Plan:
    """What one call runs and which faults it meets (all drawn from the seeded RNG)."""

    index: int
    kind: str
    items: list = field(default_factory=list)  # (value, pause, mode) / (array, pause, mode) / producer args
    chunksize: int | None = None
    collect: bool = False
    timeout: float | None = None
    retries: int = 0
    kill_at: float | None = None  # seconds into the call
    interrupt_at: float | None = None
    ranks: int = 2
    side_calls: int = 0  # API calls from a second thread during this one


@dataclass
class Window:
    """When a call ran, and what reached it."""

    start: float
    end: float = 0.0
    hung: bool = False


@dataclass
class Summary:
    calls: int = 0
    seed: int = 0
    faults: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    leaks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    slowest_call: float = 0.0
    # Every ``every`` calls (and at 0, after warm-up): the notebook's memory and fds (see ``checkpoint``).
    trend: list[dict] = field(default_factory=list)

    def table(self) -> str:
        """Markdown: calls, faults by kind, outcomes by kind, leaks, RSS, duration."""
        rows = [
            f"{self.calls} calls (seed {self.seed}) in {self.seconds:.0f} s "
            f"(slowest call {self.slowest_call:.1f} s); problems: {len(self.problems)}",
            "",
            "| faults injected | count |",
            "|---|---|",
        ]
        rows += [f"| {k} | {v} |" for k, v in sorted(self.faults.items())]
        rows += ["", "| outcome | calls |", "|---|---|"]
        rows += [f"| {k} | {v} |" for k, v in sorted(self.outcomes.items())]
        rows += ["", "| at the end | value |", "|---|---|"]
        rows += [f"| {k} | {v} |" for k, v in self.leaks.items() if not k.startswith("_")]
        rows += self.trend_table()
        if self.problems:
            rows += ["", "Problems:"] + [f"- {p}" for p in self.problems]
        return "\n".join(rows)

    def trend_table(self) -> list[str]:
        """The notebook's memory every N calls, and its growth per 100 calls (a trend, not one end figure)."""
        if not self.trend:
            return []
        rows = ["", "| calls | RSS (MB) | RSS after malloc_trim (MB) | heap, RssAnon (MB) | heap after malloc_trim (MB) "
                "| shared memory, RssShmem (MB) | open fds | result segments mapped | Python objects "
                "| arrays kept for %pdebug (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
        rows += [f"| {t['calls']} | {t['rss']:.1f} | {t['rss trimmed']:.1f} | {t['anon']:.1f} | {t['anon trimmed']:.1f} "
                 f"| {t['shmem']:.1f} | {t['fds']:.0f} | {t['results mapped']:.0f} | {t['objects']} "
                 f"| {t['kept']:.1f} |" for t in self.trend]
        per = {k: slope_per_100(self.trend, k) for k in ("rss", "rss trimmed", "anon", "anon trimmed", "shmem", "objects")}
        if per["rss"] is not None:
            rows += ["", f"growth per 100 calls (least squares, after the first {self.trend[1]['calls']} calls, "
                     f"which fill caches once): RSS {per['rss']:+.2f} MB ({per['rss trimmed']:+.2f} after malloc_trim), "
                     f"heap {per['anon']:+.2f} MB ({per['anon trimmed']:+.2f} after malloc_trim), "
                     f"shared memory {per['shmem']:+.2f} MB, Python objects {per['objects']:+.0f}"]
        return rows


# -- planning -------------------------------------------------------------------


def plan(rng: random.Random, index: int, timeout: float, big: int) -> Plan:
    """One call, drawn from ``rng``: its kind, items and faults."""
    kind = rng.choices(KINDS, weights=(55, 12, 13, 20))[0]
    p = Plan(index, kind)
    # Most calls last 20-300 ms here: early faults, so that most land while it runs.
    if rng.random() < 0.22:
        p.kill_at = rng.uniform(0.005, 0.12)
    if rng.random() < 0.08:
        p.interrupt_at = rng.uniform(0.005, 0.12)
    if kind == "queue":
        n = rng.randint(2, 6)
        size = rng.choice([16, 16, 100_000])  # 100 kB items overflow the 1 MiB ring into backlogs
        p.items = [(v, rng.randint(1, 5), size, rng.choice([0, 0.01])) for v in range(n)]
        p.chunksize = rng.choice([None, 1])
        return p
    hang = rng.random() < 0.12
    if hang or rng.random() < 0.08:
        p.timeout = timeout
    if kind == "parallel":
        p.ranks = rng.choice([2, 2, 3])  # 3 on a 2-worker pool: a temporary worker
        p.items = [(rng.uniform(0, 0.08), _mode(rng, 0.15)) for _ in range(p.ranks)]
        if hang:
            p.items[rng.randrange(p.ranks)] = (0.0, "hang")
        return p
    n = rng.randint(2, 6) if kind == "numpy" else rng.randint(3, 16)
    modes = [_mode(rng, 0.06 if rng.random() < 0.3 else 0.0) for _ in range(n)]
    if hang:
        modes[rng.randrange(n)] = "hang"
    pauses = [rng.choice([0.0, rng.uniform(0, 0.04)]) for _ in range(n)]
    if kind == "numpy":
        p.items = [(np.full(big, float(i)), pauses[i], modes[i]) for i in range(n)]
    else:
        p.items = [(rng.randint(-1000, 1000), pauses[i], modes[i]) for i in range(n)]
    p.chunksize = rng.choice([None, None, 1, 2, 4])
    p.collect = rng.random() < 0.3
    if rng.random() < (0.5 if p.kill_at is not None else 0.1):
        p.retries = rng.choice([1, 2])
    if kind == "pmap" and rng.random() < 0.07:
        p.side_calls = rng.randint(1, 3)
    return p


def _mode(rng: random.Random, raise_p: float) -> str:
    return "raise" if rng.random() < raise_p else "ok"


# -- judging ------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def _item_index(err: BaseException) -> int | None:
    m = re.search(r"\bitems? (\d+)", str(err))
    return int(m.group(1)) if m else None


def serial(ip: InteractiveShell, p: Plan) -> list:
    """Each item's value or exception, computed here by the same functions (the oracle)."""
    fn = ip.user_ns["arr_compute" if p.kind == "numpy" else "compute"]
    out: list = []
    for a, _pause, mode in p.items:
        try:
            out.append(fn(a, "ok" if mode == "hang" else mode))
        except Exception as exc:  # the oracle's exception is the expected one
            out.append(exc)
    return out


def judge_map(p: Plan, expected: list, value: Any, error: BaseException | None,
              kills: int, interrupted: bool) -> tuple[str, str | None]:
    """(outcome, problem or None) of a map call against the serial oracle."""
    modes = [it[2] for it in p.items]
    failing = [i for i, m in enumerate(modes) if m in ("raise", "hang")]
    first = failing[0] if failing else None
    lost_ok = kills > p.retries
    if error is None:
        if not p.collect:
            if first is not None:
                return "WRONG", f"expected an error at item {first} ({modes[first]}), got results"
            if len(value) != len(expected) or not all(_same(a, b) for a, b in zip(value, expected, strict=True)):
                return "WRONG", "results differ from serial"
            return "results", None
        return _judge_collected(modes, expected, value, kills if lost_ok else 0)
    if isinstance(error, KeyboardInterrupt):
        return ("KeyboardInterrupt", None) if interrupted else ("WRONG", "KeyboardInterrupt with no interrupt sent")
    if isinstance(error, mpmagic.WorkerLostError):
        k = _item_index(error)
        if p.collect or not lost_ok:
            return "WRONG", f"WorkerLostError ({kills} kills, retries {p.retries}, collect {p.collect}): {error}"
        if first is not None and (k is None or k > first):
            return "WRONG", f"WorkerLostError for item {k}, but item {first} fails first: {error}"
        return "WorkerLostError", None
    if isinstance(error, mpmagic.TaskTimeoutError):
        if p.collect or first is None or modes[first] != "hang" or _item_index(error) != first:
            return "WRONG", f"TaskTimeoutError, expected item {first}: {error}"
        return "TaskTimeoutError", None
    if first is not None and modes[first] == "raise" and not p.collect:
        want = expected[first]
        if type(error) is type(want) and str(error) == str(want):
            return "task's exception", None
    return "WRONG", f"{type(error).__name__}: {error} (first failing item {first})"


def _judge_collected(modes: list, expected: list, value: list, lost_ok: int) -> tuple[str, str | None]:
    if len(value) != len(expected):
        return "WRONG", f"{len(value)} results for {len(expected)} items"
    # One kill is one WorkerLostError; it names one item, or a whole chunk when
    # the worker died before starting any item of it (loading it): each item
    # of that chunk is then a Failed with the same error.
    lost: set[str] = set()
    for i, (mode, want, got) in enumerate(zip(modes, expected, value, strict=True)):
        if isinstance(got, mpmagic.Failed):
            err = got.error
            if got.index != i:
                return "WRONG", f"Failed.index {got.index} at position {i}"
            if isinstance(err, mpmagic.WorkerLostError) and len(lost | {str(err)}) <= lost_ok:
                lost.add(str(err))
                continue
            if mode == "hang" and isinstance(err, mpmagic.TaskTimeoutError):
                continue
            if mode == "raise" and type(err) is type(want) and str(err) == str(want):
                continue
            return "WRONG", f"item {i} ({mode}): {type(err).__name__}: {err}"
        if mode != "ok" or not _same(got, want):
            return "WRONG", f"item {i} ({mode}): got {got!r:.80}"
    return "results (collected)", None


def judge_cell(p: Plan, ip: InteractiveShell, value: Any, error: BaseException | None,
               kills: int, interrupted: bool) -> tuple[str, str | None]:
    compute = ip.user_ns["compute"]
    expected: list = []
    for r, (_pause, mode) in enumerate(p.items):
        try:
            expected.append(compute(r, "ok" if mode == "hang" else mode))
        except Exception as exc:
            expected.append(exc)
    modes = [m for _p, m in p.items]
    if error is None:
        if any(m != "ok" for m in modes):
            return "WRONG", f"ranks {modes} but the cell returned {value!r}"
        return ("results", None) if list(value) == expected else ("WRONG", f"{value!r} != {expected!r}")
    if isinstance(error, KeyboardInterrupt):
        return ("KeyboardInterrupt", None) if interrupted else ("WRONG", "KeyboardInterrupt with no interrupt sent")
    if not isinstance(error, mpmagic.ParallelError):
        return "WRONG", f"{type(error).__name__}: {error}"
    lost = 0
    for r, mode in enumerate(modes):
        err = error.failures.get(r)
        if err is None:
            if mode != "ok" or error.values.get(r) != expected[r]:
                return "WRONG", f"rank {r} ({mode}): value {error.values.get(r)!r}"
            continue
        if isinstance(err, mpmagic.WorkerLostError) and lost < kills:
            lost += 1
        elif mode == "hang" and isinstance(err, mpmagic.TaskTimeoutError) and f"rank {r}" in str(err):
            pass
        elif mode == "raise" and type(err) is type(expected[r]) and str(err) == str(expected[r]):
            pass
        else:
            return "WRONG", f"rank {r} ({mode}): {type(err).__name__}: {err}"
    return "ParallelError (" + ", ".join(sorted({type(e).__name__ for e in error.failures.values()})) + ")", None


def judge_queue(p: Plan, ip: InteractiveShell, error: BaseException | None,
                kills: int, interrupted: bool) -> tuple[str, str | None]:
    got, lost = ip.user_ns["chaos_got"], ip.user_ns["chaos_lost"]
    want = {(v, j) for v, k, _size, _pause in p.items for j in range(k)}
    seen = [(v, j) for v, j, _data in got]
    sizes_ok = all(len(data) == p.items[v][2] for v, _j, data in got)
    faulted = bool(kills) or interrupted
    if error is None and not faulted:
        if lost is not None or sorted(seen) != sorted(want) or not sizes_ok:
            return "WRONG", f"queue: {len(seen)} of {len(want)} items, lost={lost!r}"
        return "results + every queue item", None
    if error is not None and not isinstance(error, KeyboardInterrupt | mpmagic.WorkerLostError):
        return "WRONG", f"queue producers: {type(error).__name__}: {error}"
    if isinstance(error, KeyboardInterrupt) and not interrupted:
        return "WRONG", "KeyboardInterrupt with no interrupt sent"
    if isinstance(error, mpmagic.WorkerLostError) and not kills:
        return "WRONG", f"WorkerLostError with no kill: {error}"
    # A killed producer's chunk is sent again (its items may be put twice) and
    # its backlog is lost (counted): items are a subset, each of the right size.
    if not set(seen) <= want or not sizes_ok:
        return "WRONG", f"queue: items not put by any producer: {sorted(set(seen) - want)[:5]}"
    if error is None and lost is None and set(seen) == want:
        return "results + every queue item", None
    return "queue after a fault (" + (type(error).__name__ if error else "results") + \
        (", QueueItemsLost" if lost is not None else "") + ")", None


# -- the soak -------------------------------------------------------------------


class Soak:
    """Runs planned calls in ``ip`` on the current local pool, injecting faults."""

    def __init__(self, ip: InteractiveShell, seed: int, timeout: float, bound: float, big: int) -> None:
        self.ip = ip
        self.rng = random.Random(seed)
        self.timeout = timeout
        self.bound = bound
        self.big = big
        self.summary = Summary(seed=seed)
        self._lock = threading.Lock()
        self._active = False  # a main-thread call is running: faults may be sent
        self.kill_times: list[float] = []
        self.interrupt_times: list[float] = []
        self._windows: list[Window] = []  # calls the watchdog looks after
        self._stop = threading.Event()
        self.queue_stems: list[str] = []
        ip.user_ns["CHAOS_HANG"] = 2 * bound  # a timeout that does not fire is a hang
        self.ip.run_cell(SETUP, store_history=False)

    # -- faults ------------------------------------------------------------------
    def _kill(self) -> None:
        with self._lock:
            if not self._active:
                return
            backend = pool_module.current_pool()
            slots = [s for s in list(getattr(backend, "slots", [])) if s.pid and s.ready]
            busy = [s for s in slots if s.inflight]
            victims = busy or slots
            if not victims:
                return
            victim = self.rng_faults.choice(victims)
            try:
                os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.kill_times.append(time.monotonic())
            self.summary.faults["SIGKILL of a busy worker" if busy else "SIGKILL of an idle worker"] += 1

    def _interrupt(self) -> None:
        with self._lock:
            if not self._active:
                return
            self.interrupt_times.append(time.monotonic())
            self.summary.faults["SIGINT to the notebook"] += 1
            os.kill(os.getpid(), signal.SIGINT)

    def _watch(self) -> None:
        """A call past the bound is a hang: dump every stack, interrupt the main thread."""
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for w in list(self._windows):
                if not w.end and not w.hung and now - w.start > self.bound:
                    w.hung = True
                    # sys.__stderr__: the cell's capture_output() has replaced sys.stderr
                    # (a StringIO, which faulthandler cannot write to).
                    err = sys.__stderr__ or sys.stderr
                    err.write(f"chaos: a call passed {self.bound:g} s (hang); stacks:\n")
                    err.flush()
                    faulthandler.dump_traceback(file=err, all_threads=True)
                    os.kill(os.getpid(), signal.SIGINT)

    def _in(self, times: list[float], w: Window) -> int:
        return sum(w.start <= t <= w.end for t in times)

    # -- one call ------------------------------------------------------------------
    def _cell(self, code: str) -> tuple[Any, BaseException | None]:
        try:
            with capture_output():
                r = self.ip.run_cell(code, store_history=False)
        except KeyboardInterrupt as exc:  # landed in IPython's own code around the cell
            return None, exc
        return r.result, r.error_in_exec or r.error_before_exec

    def _map_line(self, p: Plan, func: str) -> str:
        opts = ["-q"]
        if p.chunksize:
            opts.append(f"--chunksize {p.chunksize}")
        if p.collect:
            opts.append("--errors collect")
        if p.timeout:
            opts.append(f"--timeout {p.timeout}")
        if p.retries:
            opts.append(f"--retries {p.retries}")
        return f"%pmap {' '.join(opts)} {func}, chaos_items"

    def call(self, p: Plan) -> None:
        """Run one planned call with its faults and judge it."""
        f = self.summary.faults
        f[f"{p.kind} calls"] += 1
        modes = [it[-1] for it in p.items] if p.kind in ("pmap", "numpy", "parallel") else []
        f["items that raise"] += modes.count("raise")
        f["items past --timeout"] += modes.count("hang")
        f["--errors collect"] += p.collect
        f["--retries"] += bool(p.retries)
        if p.kind == "queue":
            self.ip.run_cell("chaos_q = mpmagic.Queue()", store_history=False)
            self.queue_stems.append(self.ip.user_ns["chaos_q"]._stem.lstrip("/"))
        self.ip.user_ns["chaos_items"] = p.items
        if p.kind == "parallel":
            self.ip.user_ns["chaos_spec"] = p.items
            opts = f"-n {p.ranks} -q" + (f" --timeout {p.timeout}" if p.timeout else "")
            code = f"%%parallel {opts}\nrank_value(rank, chaos_spec)\n"
        else:
            code = self._map_line(p, {"pmap": "task", "numpy": "arr_task", "queue": "produce"}[p.kind])
        side = [self._side_plan() for _ in range(p.side_calls)]
        w = Window(time.monotonic())
        self._windows.append(w)
        timers = []
        if p.kill_at is not None:
            timers.append(threading.Timer(p.kill_at, self._kill))
        if p.interrupt_at is not None:
            timers.append(threading.Timer(p.interrupt_at, self._interrupt))
        side_thread = None
        if side:
            side_thread = threading.Thread(target=self._side, args=(side,), name="chaos-side", daemon=True)
        with self._lock:
            self._active = True
        for t in timers:
            t.start()
        if side_thread:
            side_thread.start()
        value, error = self._cell(code)
        try:
            with self._lock:
                self._active = False
            for t in timers:
                t.cancel()
            time.sleep(0.002)  # a SIGINT sent just before is taken here, not in the next call
        except KeyboardInterrupt:
            self.summary.faults["SIGINT that landed after its call returned"] += 1
        if p.kind == "queue":
            _, consume_error = self._cell(CONSUME)
            if consume_error is not None:
                error = error or consume_error
        w.end = time.monotonic()
        if side_thread:
            side_thread.join(self.bound)
            if side_thread.is_alive():
                self._problem(p, "a second-thread call hung")
        self._windows.remove(w)
        kills = self._in(self.kill_times, w)
        interrupted = self._in(self.interrupt_times, w) > 0
        if p.kind == "parallel":
            outcome, problem = judge_cell(p, self.ip, value, error, kills, interrupted)
        elif p.kind == "queue":
            outcome, problem = judge_queue(p, self.ip, error, kills, interrupted)
        else:
            outcome, problem = judge_map(p, serial(self.ip, p), value, error, kills, interrupted)
        if w.hung:
            outcome, problem = "HANG", f"passed {self.bound:g} s; then {outcome}: {problem}"
        self.summary.outcomes[outcome] += 1
        self.summary.slowest_call = max(self.summary.slowest_call, w.end - w.start)
        if problem:
            self._problem(p, problem)
        self.ip.user_ns["chaos_items"] = self.ip.user_ns["chaos_spec"] = None
        forget_outputs(self.ip)  # the shell's output cache is not ours to measure

    def _side_plan(self) -> Plan:
        q = Plan(-1, "pmap", chunksize=self.rng.choice([None, 1, 3]), collect=self.rng.random() < 0.3)
        n = self.rng.randint(3, 12)
        q.items = [(self.rng.randint(-99, 99), self.rng.uniform(0, 0.02), _mode(self.rng, 0.05)) for _ in range(n)]
        return q

    def _side(self, plans: list[Plan]) -> None:
        """API calls from a second thread while the main thread's call runs."""
        task = self.ip.user_ns["task"]
        for q in plans:
            self.summary.faults["second-thread calls"] += 1
            w = Window(time.monotonic())
            self._windows.append(w)
            value, error = None, None
            try:
                value = mpmagic.pmap(task, q.items, chunksize=q.chunksize,
                                     errors="collect" if q.collect else "raise")
            except BaseException as exc:  # judged below, like a cell's error
                error = exc
            w.end = time.monotonic()
            self._windows.remove(w)
            outcome, problem = judge_map(q, serial(self.ip, q), value, error, self._in(self.kill_times, w), False)
            self.summary.outcomes["second thread: " + outcome] += 1
            if problem:
                self._problem(q, "second thread: " + problem)

    def _problem(self, p: Plan, text: str) -> None:
        self.summary.problems.append(f"seed {self.summary.seed} call {p.index} ({p.kind}): {text}")

    # -- the whole soak ----------------------------------------------------------
    def checkpoint(self, calls: int) -> None:
        """Record the notebook's memory, fds and objects after ``calls`` calls (the trend)."""
        now = snapshot()
        self.summary.trend.append({"calls": calls, **{k: now[k] for k in (
            "rss", "rss trimmed", "anon", "anon trimmed", "shmem", "fds", "results mapped", "objects")},
            "kept": _kept_for_pdebug()})

    def run(self, calls: int, warmup: int = 3, every: int = 100) -> Summary:
        self.rng_faults = random.Random(self.summary.seed + 1)  # the timer threads' choices
        watchdog = threading.Thread(target=self._watch, name="chaos-watchdog", daemon=True)
        watchdog.start()
        try:
            for i in range(warmup):  # every kind once, no faults: imports, caches, segments
                for kind in KINDS:
                    p = plan(random.Random(i), -1, self.timeout, self.big)
                    p.kind = kind
                    p.kill_at = p.interrupt_at = None
                    p.timeout, p.side_calls = None, 0
                    p.items = {"queue": [(0, 2, 16, 0), (1, 2, 100_000, 0)],
                               "numpy": [(np.full(self.big, 1.0), 0, "ok")] * 3,
                               "parallel": [(0.0, "ok")] * 3,
                               "pmap": [(v, 0, "ok") for v in range(8)]}[kind]
                    p.ranks = 3 if kind == "parallel" else 2
                    self.call(p)
            warm = Summary(seed=self.summary.seed)
            warm.problems = self.summary.problems  # a problem in warm-up still counts
            self.summary = warm
            time.sleep(0.5)
            forget_outputs(self.ip)
            base = snapshot()
            self.checkpoint(0)
            t0 = time.monotonic()
            for i in range(calls):
                self.call(plan(self.rng, i, self.timeout, self.big))
                if (i + 1) % every == 0:
                    self.checkpoint(i + 1)
                    t = self.summary.trend[-1]
                    if calls >= 200:  # a long soak says where it is
                        (sys.__stderr__ or sys.stderr).write(
                            f"chaos: {i + 1} calls, {time.monotonic() - t0:.0f} s, "
                            f"{len(self.summary.problems)} problems; RSS {t['rss']:.1f} MB "
                            f"(heap {t['anon']:.1f}, {t['anon trimmed']:.1f} after malloc_trim; shared "
                            f"{t['shmem']:.1f}; kept for %pdebug {t['kept']:.1f}), fds {t['fds']:.0f}\n")
            self.summary.seconds = time.monotonic() - t0
            self.summary.calls = calls
            self.summary.leaks = leaks(self.ip, base, self.queue_stems)
        finally:
            self._stop.set()
            watchdog.join()
        return self.summary


# -- resources ----------------------------------------------------------------


def _helpers() -> set[int]:
    """multiprocessing's forkserver and resource tracker: kept until exit, not ours to count."""
    found = set()
    for c in psutil.Process().children():
        try:
            cmd = " ".join(c.cmdline())
        except psutil.Error:
            continue
        if "forkserver" in cmd or "resource_tracker" in cmd:
            found.add(c.pid)
    return found


def _children() -> list[int]:
    helpers = _helpers()
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            if c.pid not in helpers and c.status() != psutil.STATUS_ZOMBIE:
                out.append(c.pid)
        except psutil.Error:
            continue
    return out


def _segments() -> list[str]:
    prefix = f"mpm_{os.getpid()}_"
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


def _fd_targets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return sorted(out)


def _mapped_results() -> list[str]:
    """Result segments (``mpm_<pid>_[ns<tag>_]g<worker>_<n>``, unlinked on arrival) this
    process still maps: read from ``/proc/self/maps``, since a mapping holds no fd
    (``compat.map_fd``)."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            hit = re.search(r"/(mpm_\d+_(?:ns[0-9a-f]+_)?g\d+_\d+) \(deleted\)$", line.rstrip("\n"))
            if hit:
                found.add(hit.group(1))
    return sorted(found)


def forget_outputs(ip: InteractiveShell) -> None:
    """Drop what IPython keeps of past cells, as ``%reset -f out`` would, so
    that what stays alive after a call is mpmagic's, not the shell's.

    Found with ``gc.get_referrers`` on the result arrays still mapped after
    the soak (docs/reliability.md, section 11): IPython's output cache keeps
    the last displayed results in ``Out`` / ``_oh`` and ``_<n>``, and the
    display hook keeps its own ``_``, ``__``, ``___`` (clearing the user's
    names alone leaves those, and so does ``user_ns_hidden``, where it
    pushes them too), and the shell's ``last_execution_result`` holds the
    last cell's value; a result array from shared memory keeps its
    segment mapped (3.2 MB each). With ``store_history=False`` the
    execution count never moves, so every call's printed output is appended
    to one ``history_manager.outputs`` list that grows for ever (~70 entries
    per 100 calls). The last exception (``sys.last_value``..., and the
    traceback display's own ``tb``, kept for ``%debug``) holds the frames,
    and so the locals, of the cell that raised.
    """
    hook = ip.displayhook
    for name in ("_", "__", "___"):
        setattr(hook, name, "")
        ip.user_ns[name] = None
        if name in ip.user_ns_hidden:  # (the display hook pushes them there too)
            ip.user_ns_hidden[name] = None
    ip.last_execution_result = None  # (its .result is the last cell's value)
    out = ip.user_ns.get("_oh")
    if out is not None:
        for n in list(out):
            ip.user_ns.pop(f"_{n}", None)
            ip.user_ns_hidden.pop(f"_{n}", None)
        out.clear()
    history = ip.history_manager
    if history is not None:
        for kept in ("outputs", "output_hist", "output_hist_reprs", "exceptions"):  # (outputs, exceptions: IPython 9)
            getattr(history, kept, {}).clear()
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    if getattr(ip.InteractiveTB, "tb", None) is not None:  # the traceback it showed last, for %debug
        ip.InteractiveTB.tb = None


def snapshot() -> dict[str, float]:
    """Resources of this process; the segment pool's free segments kept for reuse
    (up to ``shm.KEEP_BYTES``) are destroyed first, so the counts compare."""
    shm.pool().trim(0)
    gc.collect()
    me = psutil.Process()
    fds = _fd_targets()
    mapped = _mapped_results()
    # tqdm starts one monitor thread per process on first use and keeps it: not a leak.
    threads = [t.name for t in threading.enumerate() if t.name != "tqdm_monitor"]
    rss, parts = me.memory_info().rss / 2**20, _rss_parts()
    trimmed = _malloc_trim()
    return {"fds": len(fds), "results mapped": len(mapped), "fd list": fds, "threads": len(threads), "thread names": sorted(threads), "os threads": me.num_threads(),
            "children": len(_children()), "rss": rss, **parts,
            "rss trimmed": me.memory_info().rss / 2**20 if trimmed else rss,
            "anon trimmed": _rss_parts()["anon"] if trimmed else parts["anon"],
            "objects": len(gc.get_objects())}


def _malloc_trim() -> bool:
    """Have glibc give freed heap memory back to the system (``malloc_trim(0)``).

    Why: the heap part of the RSS jumps by 4 to 28 MB at some checkpoints and
    falls back at the next, with no more Python objects alive; with
    tracemalloc the live memory moved by 1 MB at most there. That is memory
    the allocator keeps after the 3.2 MB arrays are freed, not a leak; after
    ``malloc_trim`` what is left is what is alive (and fragmentation). The
    RSS is read before and after, and both are reported. False where there
    is no glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def _rss_parts() -> dict[str, float]:
    """RSS split as Linux counts it (MB): the heap and other private memory
    (``RssAnon``), shared memory mapped (``RssShmem``: result segments still
    alive, the queues' rings), files mapped (``RssFile``: code, libraries).
    A leak of Python objects grows the first; a result kept alive, the second."""
    parts = {"anon": 0.0, "shmem": 0.0, "file": 0.0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = {"RssAnon:": "anon", "RssShmem:": "shmem", "RssFile:": "file"}.get(line.split(None, 1)[0])
                if key:
                    parts[key] = int(line.split()[1]) / 1024
    except OSError:  # not Linux: the total alone
        pass
    return parts


def _kept_for_pdebug() -> float:
    """MB of arrays the last failed run's record keeps on purpose (``debugging.LastRun``:
    its inputs and the results it got, for ``%pdebug`` and ``--rerun-failed``):
    a numpy call that failed holds up to six 3.2 MB inputs until the next run."""
    np_ndarray = np.ndarray
    last = debugging.last_run()
    if last is None:
        return 0.0
    seen: set[int] = set()

    def size(obj: Any, depth: int = 0) -> int:
        if id(obj) in seen or depth > 3:
            return 0
        seen.add(id(obj))
        if isinstance(obj, np_ndarray):
            return obj.nbytes
        if isinstance(obj, list | tuple):
            return sum(size(x, depth + 1) for x in obj)
        if isinstance(obj, mpmagic.Failed):
            return size(obj.item, depth + 1)
        return 0

    return (size(last.inputs) + size(last.results)) / 2**20


def slope_per_100(trend: list[dict], key: str) -> float | None:
    """Least-squares growth of ``key`` per 100 calls over the checkpoints after the
    first (the first calls fill caches that then stay: imports, the segment pool,
    IPython's parsed copies of the files its tracebacks showed)."""
    pts = [(t["calls"], t[key]) for t in trend[1:]]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    den = sum((x - mx) ** 2 for x, _ in pts)
    return 100 * sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def leaks(ip: InteractiveShell, base: dict[str, float], stems: list[str], settle: float = 10.0) -> dict[str, Any]:
    """What is left after the soak, against ``base`` (taken after warm-up), then after the pool stops."""
    ip.run_cell("chaos_q = chaos_got = chaos_lost = _it = _e = None", store_history=False)
    # The last failed run is kept on purpose, with its inputs and the results
    # it got (debugging.LastRun, for %pdebug and --rerun-failed): a numpy
    # result from shared memory keeps its segment mapped. A plain
    # call replaces it; the shell's caches are dropped after every call.
    for _ in range(2):
        ip.run_cell("_ = %pmap -q task, [(1, 0, 'ok')] * 4", store_history=False)
    forget_outputs(ip)
    deadline = time.monotonic() + settle
    now = snapshot()
    # Temporary workers stop once idle and reaper threads end once their
    # process is gone: give them a few seconds.
    while time.monotonic() < deadline and any(now[k] > base[k] for k in ("fds", "threads", "children")):
        time.sleep(0.2)
        now = snapshot()
    free = {s.name.lstrip("/") for s in shm.pool().free}
    leased = [n for n in _segments() if n not in free]
    ours = [n for n in os.listdir("/dev/shm") if any(s in n for s in stems)]
    out: dict[str, Any] = {
        "notebook RSS after warm-up -> end (MB)": f"{base['rss']:.1f} -> {now['rss']:.1f} ({now['rss'] - base['rss']:+.1f})",
        "notebook RSS after malloc_trim, after warm-up -> end (MB)":
            f"{base['rss trimmed']:.1f} -> {now['rss trimmed']:.1f} ({now['rss trimmed'] - base['rss trimmed']:+.1f})",
        "open fds besides mapped results (baseline -> end)": f"{base['fds']:.0f} -> {now['fds']:.0f}",
        "result segments still mapped by the notebook (baseline -> end)":
            f"{base['results mapped']:.0f} -> {now['results mapped']:.0f}",
        "threads (baseline -> end)": f"{base['threads']:.0f} -> {now['threads']:.0f}",
        "child processes besides forkserver / resource tracker (baseline -> end)": f"{base['children']:.0f} -> {now['children']:.0f}",
        "segments mpm_<pid>_* still leased (pool running)": len(leased),
        "queue segments / semaphores left (sem.mpsh... of our queues)": len(ours),
    }
    mpmagic.stop_pool()
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and (_children() or _segments()):
        time.sleep(0.2)
    out["segments mpm_<pid>_* after the pool stopped"] = len(_segments())
    out["child processes after the pool stopped"] = len(_children())
    out["_leaked"] = (bool(leased) or bool(ours) or bool(_segments()) or bool(_children())
                      or now["fds"] > base["fds"] or now["threads"] > base["threads"]
                      or now["children"] > base["children"] or now["results mapped"] > base["results mapped"])
    out["_new_fds"] = sorted((Counter(now["fd list"]) - Counter(base["fd list"])).elements())
    out["_new_threads"] = sorted((Counter(now["thread names"]) - Counter(base["thread names"])).elements())
    out["_results_mapped"] = now["results mapped"]
    out["_rss_growth_mb"] = now["rss"] - base["rss"]
    return out


def soak(calls: int = 1000, seed: int = 0, timeout: float = 1.0, bound: float = 60.0,
         big: int = 400_000, workers: int = 2, start_method: str = "forkserver",
         ip: InteractiveShell | None = None, every: int = 100) -> Summary:
    """Run the soak on a fresh local pool of ``workers``; the pool is stopped at the end."""
    # A process started in the background by a shell without job control
    # (``cmd &`` in a script) inherits SIGINT ignored, and Python then keeps
    # it ignored: the interrupts would all be no-ops. A notebook's kernel
    # gets them, so the soak does too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ip = ip or InteractiveShell.instance(colors="nocolor")
    ip.run_cell("%load_ext mpmagic", store_history=False)
    pool_module.shutdown()
    mpmagic.use_local(workers, start_method).wait_ready()
    return Soak(ip, seed, timeout, bound, big).run(calls, every=every)
