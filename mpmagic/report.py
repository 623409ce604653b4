"""The timing report of one run: one honest line, or a small HTML table.

The serial time is *measured* only when the work really ran serially in the
notebook (``compare=True``); otherwise it is *estimated* as the sum of the
compute times the workers measured around each task (less the time the tasks
were blocked in mpmagic's own Lock, Queue or Event, which the helpers measure,
and the time they waited for a core because more workers than cores ran,
where the workers measured it: Linux; the two overlap, so together never
more than the time the tasks were off a CPU), and the line says so.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

# Imported up front, not when a report is first shown: a notebook out of file
# descriptors cannot import (its .py or .pyc cannot be opened), and the report of
# the very run that said "too many open files" failed to show with an OSError
# from importing this, chained onto that message.
from .advice import advise
from .fmt import fmt_efficiency, fmt_seconds, fmt_speedup, imports_text, noun, retried_words
from .waits import names as helper_names

# Items under this many seconds each: the workers' time around each call (their
# loop, the crash-position marks) and the notebook packing chunks on the same
# cores are a large share of the task times, so the estimate runs high (a
# tester: 200,000 items of x + 1 estimated at ~2x the serial time).
TINY_ITEM = 1e-6
# The tasks' time blocked in mpmagic's helpers is left out of the estimate (and
# said so) from this share of the task times: below it, a lock taken now and
# then moves the estimate by less than the noise of timing it.
HELPER_WAIT_SHARE = 0.05


@dataclass
class Report:
    """What a ``pmap`` or ``parallel`` run did and how long it took."""

    kind: str  # "pmap" or "parallel"
    items: int
    workers: int
    backend: str
    start_method: str | None
    wall: float
    task_seconds: float
    chunks: int = 0
    chunksize: str = "-"  # the sizes of the chunks sent: "auto (lo-hi)", or a fixed size
    # A fixed chunk size whose chunks were sent smaller (a worker's max_tasks_per_child
    # allowance, a lazy input's reads cut them): the size asked for; ``chunksize`` is what went.
    chunksize_asked: int | None = None
    serial: float | None = None  # measured serial time, with compare
    equal: bool | None = None  # serial and parallel results equal, with compare
    # compare: the serial run here raised (parallel and serial code differ in
    # what they can do): its "Type: message"; nothing was measured.
    serial_error: str | None = None
    failed: int = 0
    # A run that raised: the input index of the item that failed (when known)
    # and the number of items in the input (when it has a length).
    failed_at: int | None = None
    total: int | None = None
    failed_ranks: tuple[int, ...] = ()
    # (e.g. "checkpoint"; "chunksize_setting": the chunk size came from %config
    # MPMagic.chunksize, which the advice then names instead of --chunksize)
    extra: dict[str, Any] = field(default_factory=dict)
    # What the advice line reasons from (see advice.py); zero / None when not measured.
    cold_start: bool = False  # the pool was not running when the run began
    cores: int | None = None  # usable CPU cores, for a local pool
    bytes_sent: int = 0  # pickled arguments sent to the workers
    bytes_back: int = 0  # pickled results sent back
    bytes_shared: int = 0  # array data among the items copied into shared memory
    cpu_seconds: float | None = None  # CPU time of the tasks, when the workers report it
    # Of task_seconds, the seconds the tasks waited on a run queue for a core (Linux:
    # cpus.run_queue_seconds; None where not measured). With more workers than cores
    # the estimate leaves them out (see subtracts_waiting): CPU-bound work with -n 4
    # and -n 8 on 2 cores was estimated at 2.9-7.3x without it; a task that sleeps or
    # waits for I/O waits for no core, which the CPU time alone could not tell from
    # CPU-bound tasks that other processes left less than their share of a core.
    runq_seconds: float | None = None
    # Of task_seconds, the seconds the tasks were blocked in mpmagic's own helpers (an
    # mpmagic.Lock, a Value's lock, Queue.get(), Event.wait(): measured by the helpers in
    # the task's thread, mpmagic.waits), and their kinds ("Lock", "Queue"...), the longest
    # wait first. No work is done meanwhile, so the estimate leaves them out
    # (subtracts_helper_wait): a map serialised by a Lock was estimated at ~1.9x where
    # --compare measured 1.00x, and a consumer rank counted its wait for items as work.
    helper_wait_seconds: float = 0.0
    helper_wait_kinds: tuple[str, ...] = ()
    slowest_task: float | None = None  # longest chunk or rank, in seconds
    slowest_where: str | None = None  # which items or rank that was
    insights: Any = None  # an insights.Insights with --insights
    # Costs the next run will not pay (warmup.OneTimeCosts.summary): ``imports``
    # {module: seconds or None}, ``import_seconds``, ``load`` (unpickling the
    # function), ``start`` (workers starting), ``total`` (the most a worker paid);
    # ``temporary``: what a cell's temporary workers paid, which every such call
    # pays again (``workers``, ``imports``, ``import_seconds``, ``load``, ``total``,
    # ``pool``: the pool's size), or None.
    one_time: dict[str, Any] | None = None
    advice_enabled: bool = True
    # What the estimate assumes, said on the line itself (see _estimate_text):
    peak_busy: int | None = None  # most workers running tasks at the same moment (when measured)
    over_cores_seconds: float = 0.0  # how long more workers than cores ran tasks at once
    task_imports: tuple[str, ...] = ()  # modules the tasks imported in the workers during this run
    task_import_workers: int = 0  # how many workers did (each one's import is in the task times)
    capped_threads: int | None = None  # BLAS/OpenMP threads per worker, when capped below the cores
    capped_libs: tuple[str, ...] = ()  # the threaded libraries the tasks use (numpy, torch...)
    retried: int = 0  # items sent again after their worker died (--retries)
    # Items that ran twice: they had finished in a chunk whose worker died (or was
    # stopped at a timeout) before it sent the chunk's results (jobs.MapJob.ran_again).
    ran_again: tuple[int, ...] = ()
    ran_again_cause: str = ""  # how their worker ended: "died", "was stopped at --timeout" (or both)
    timed_out: int = 0  # items stopped at --timeout (with errors="collect": among the failed)
    serial_imports: tuple[str, ...] = ()  # compare: modules the serial run here imported while timed
    interrupted: bool = False  # the run was interrupted: the line says so, and no speedup
    # Other runs held workers while this one ran (a background run, another
    # thread's): the wall time counts waiting for them; and how long its first
    # unit waited for a worker busy with another run.
    shared_workers: bool = False
    waited_for_workers: float = 0.0
    # The run's units waited in workers still running the %%pool setup (a slow one, whose
    # %%pool setup wait was interrupted; a new worker's): the longest wait of one worker,
    # and the waits of all workers together. No item's time: the line says it, and the
    # advice leaves it out of the costs of sending (it blamed "sending and collecting a
    # chunk cost ~2.50 s" for a 5 s setup).
    waited_for_setup: float = 0.0
    setup_wait_seconds: float = 0.0
    # What ``workers`` counts: "worker" (processes), or "worker thread" on Dask,
    # whose worker processes run several tasks at once (a thread each).
    worker_noun: str = "worker"
    # The pandas accessor (df.mp...): of the wall time, the part spent here outside
    # the run (cutting the input, pandas assembling the result). The wall is the
    # whole call's, so the line's speedup is the call's; the estimate stays the
    # task times, and the line says how much of the wall was spent here.
    home_seconds: float = 0.0
    # Preparing the function's payload here, inside the wall time: pickling what it
    # captures, or (a warm call) checking it did not change (payload_cache.py).
    # ``payload_served``: "fast" (nothing to check), "same" (pickled again and
    # ``payload_bytes`` of captured arrays compared with the workers' copy),
    # "built" (``payload_bytes`` copied into shared memory), "" (not measured);
    # ``payload_captures``: (name, bytes, kind) of the large captured globals,
    # looked up only when the preparation took a good part of the call;
    # ``payload_freed_seconds``: of ``payload_seconds``, freeing the shared-memory
    # copies of arrays the notebook dropped (``del G`` of another function's
    # captured global: freed at the next call), which the advice does not blame
    # on this function.
    payload_seconds: float = 0.0
    payload_freed_seconds: float = 0.0
    payload_served: str = ""
    payload_bytes: int = 0
    payload_captures: tuple[tuple[str, int, str], ...] = ()
    # The call that made it when not ``kind`` (``imap``: a map, named so in its lines;
    # ``call``: mpmagic.call's one call, whose lines count no items)
    caller: str = ""

    @classmethod
    def of(cls, given: dict[str, Any]) -> Report:
        """``Report(**given)``, for the report every run makes: the ~60 fields go into
        the new report at once, where the generated ``__init__`` matched each keyword
        to its parameter and stored each in turn (~200 bytecodes a ``pmap``). A field
        left out takes its default; a missing required field or an unknown name is
        refused with the TypeError ``__init__`` raises."""
        names = given.keys()
        # (a missing required field or an unknown name, asked as subset tests: the set
        # differences built two sets of ~60 names each, ~5 us a run)
        if not (names >= _REQUIRED and names <= _FIELD_NAMES):
            return cls(**given)  # (its error, in its words)
        report = cls.__new__(cls)
        # (simple defaults are class attributes; each default_factory makes a new value)
        report.__dict__.update({name: make() for name, make in _FACTORIES if name not in given})
        report.__dict__.update(given)
        return report

    @property
    def name(self) -> str:
        """What its lines begin with: ``pmap``, ``parallel``, or the call that made it (``imap``)."""
        return self.caller or self.kind

    @property
    def items_run(self) -> int:
        """The items (or ranks) that ran in this run: ``items`` less those a checkpoint
        took from its store, which no task time covers (the time per item of a run that
        resumed 100,000 items and computed 7 read "~0 ns each")."""
        stored = self.extra.get("checkpoint")
        return self.items - stored["resumed"] if stored else self.items

    @property
    def serial_measured(self) -> bool:
        return self.serial is not None

    @property
    def subtracts_waiting(self) -> bool:
        """Does the estimate leave out the tasks' measured wait for a core? Only when
        more workers than cores made them wait (``waited_for_cores``): a serial run
        would not. Waiting for other processes' work is left in, as a serial run
        here would wait for them too (taken out, a busy machine read as no speedup)."""
        return self.runq_seconds is not None and self.waited_for_cores

    @property
    def subtracts_helper_wait(self) -> bool:
        """Does the estimate leave out the tasks' time blocked in mpmagic's helpers?
        When it is a noticeable share of the task times (:data:`HELPER_WAIT_SHARE`)."""
        waited = self.helper_wait_seconds
        return waited > 0 and waited >= HELPER_WAIT_SHARE * self.task_seconds

    @property
    def waits_overlap(self) -> bool:
        """Do the two waits the estimate leaves out add up to more than the tasks'
        time off a CPU? A waiter woken from a helper's lock waits for a core before it
        runs (more workers than cores): that time is in both its helper wait and its
        wait for a core, and left out twice. 4 ranks on 2 cores each taking a Value's
        lock 10,000 times read ``serial ~3.6 ms`` where serial code takes ~45 ms. The
        tasks' CPU time is neither wait, so together they leave out at most the task
        times less it (its least with tasks that ran threads: the task times)."""
        cpu = self.cpu_seconds
        if cpu is None or not (self.subtracts_waiting and self.subtracts_helper_wait):
            return False
        left_out = (self.runq_seconds or 0.0) + self.helper_wait_seconds
        return left_out > self.task_seconds - min(cpu, self.task_seconds)

    @property
    def estimated_serial(self) -> float:
        """The task times, less what the tasks waited for a core among too many workers
        and what they were blocked in mpmagic's helpers (both: no work was done), and
        never below their CPU time (the two overlap: :attr:`waits_overlap`)."""
        seconds = self.task_seconds
        if self.subtracts_waiting:
            seconds -= self.runq_seconds or 0.0
        if self.subtracts_helper_wait:
            seconds -= self.helper_wait_seconds
        if self.waits_overlap:
            seconds = min(self.cpu_seconds or 0.0, self.task_seconds)
        return max(0.0, seconds)

    @property
    def work_seconds(self) -> float:
        """The task times less their time blocked in mpmagic's helpers: what the tasks
        computed (what advice compares with a measured serial time)."""
        return max(0.0, self.task_seconds - self.helper_wait_seconds)

    @property
    def serial_time(self) -> float:
        """The measured serial time, or the estimate from task times."""
        return self.serial if self.serial is not None else self.estimated_serial

    @property
    def speedup(self) -> float | None:
        """Serial time over wall time; None (n/a) when either is zero, and for a run
        of no items (an empty map: --compare timed an empty loop, "<0.1x")."""
        if self.wall <= 0 or self.serial_time <= 0 or (self.items == 0 and self.caller != "call"):
            return None
        return self.serial_time / self.wall

    @property
    def efficiency(self) -> float | None:
        sp = self.speedup
        return None if sp is None else sp / max(1, self.workers)

    def _where(self) -> str:
        how = self.backend if not self.start_method else self.start_method
        return f"{self.workers} {self.worker_noun}{'s' if self.workers != 1 else ''} ({how})"

    @property
    def item_noun(self) -> str:
        """What ``items`` counts, plural: "items", "ranks", or the pandas accessor's "rows",
        "columns" or "groups" (``extra["accessor"]["unit"]``: not the pieces they went in)."""
        if self.kind == "parallel":
            return "ranks"
        accessor = self.extra.get("accessor")
        return accessor.get("unit") or "items" if isinstance(accessor, dict) else "items"

    def _what(self) -> str:
        if self.caller == "call":  # (mpmagic.call: one call, no items to count)
            return "1 call"
        noun = self.item_noun
        return f"{self.items} {noun if self.items != 1 else noun[:-1]}"

    @property
    def waited_for_cores(self) -> bool:
        """More workers ran CPU-bound tasks at once than there are usable cores, so
        the task times (and an estimate from them) include waiting for a core.

        Measured from the chunks' start and end times: more than ``cores`` of
        them running at once for a tenth of the run or more, and tasks that
        used at least 60 % of the CPU share such crowding leaves each one
        (4 CPU-bound workers on 2 cores: about half a core each; sleeping or
        I/O-bound tasks use next to none and wait for nothing). Without those
        times, the average cores the tasks' CPU time kept busy (near all of them).
        Where the workers measured their wait for a core (``runq_seconds``):
        that wait, a tenth of the task times or more, with more workers than
        cores at once (for a tenth of the run) instead of the CPU share.
        """
        cores, cpu = self.cores, self.cpu_seconds
        if not cores or self.wall <= 0:
            return False
        if self.runq_seconds is not None:  # measured: the tasks waited for a core, and more ran than cores
            crowded = self.workers > cores if self.peak_busy is None else (
                self.peak_busy > cores and self.over_cores_seconds >= 0.1 * self.wall)
            return crowded and self.runq_seconds >= 0.1 * self.task_seconds > 0
        if cpu is None:
            return False
        if self.peak_busy is None:
            return self.workers > cores and cpu / self.wall > 0.75 * cores
        if self.peak_busy <= cores or self.over_cores_seconds < 0.1 * self.wall or self.task_seconds <= 0:
            return False
        return cpu / self.task_seconds >= 0.6 * cores / self.peak_busy

    def _serial_text(self) -> str:
        if self.serial is not None:
            eq = ""
            if self.equal is True:  # (equal only to float rounding: how far apart, so a value that varies shows)
                rounding = self.extra.get("rounding")
                eq = f", results equal within float rounding: {rounding}" if rounding else ", results equal"
            elif self.equal is False:
                eq = ", RESULTS DIFFER"
            if self.serial_imports:  # a lazy import the workers had done before (warm-up) was timed here
                eq += f"; it imported {_names(self.serial_imports)} here"
            left_out = self.extra.get("compare_left_out", 0)  # (items not run here: they killed a worker or timed out)
            ran = self.items_run  # (--compare times the items computed, not those a checkpoint resumed)
            of = f" for {ran - left_out} of {ran} {noun('items', ran)}" if left_out else ""
            return f"serial {fmt_seconds(self.serial)} (measured{of}{eq})"
        if self.serial_error is not None:
            return f"serial ~{fmt_seconds(self.estimated_serial)} (estimated: the --compare run here raised {self.serial_error})"
        nothing = ("; --compare left out every item, so nothing was compared"
                   if self.items_run > 0 and self.extra.get("compare_left_out", 0) >= self.items_run else "")
        skipped = self.extra.get("compare_skipped")  # (shared state: no serial copy, see serial_copy.py)
        if skipped:
            nothing += f"; --compare ran no serial copy: {skipped}"
        return f"serial ~{fmt_seconds(self.estimated_serial)} ({self._estimate_text()}{nothing})"

    def _estimate_text(self) -> str:
        """``estimated from task times``, and what that assumes when it is not the serial time."""
        # A cell's ranks each run the whole cell: their times add up to serial only if they split the work.
        text = "estimated: the sum of the ranks' times" if self.kind == "parallel" else "estimated from task times"
        include = []
        if self.task_imports:  # each worker paid the import; serial would once (or not at all)
            where = "in each worker" if self.task_import_workers > 1 else "in the worker"
            include.append(f"importing {_names(self.task_imports)} {where}")
        busy = self.peak_busy or self.workers
        # (the line begins with the run's workers, "4 ranks on 4 workers": fewer may have run at once)
        on_cores = (f"{busy} workers" if busy >= self.workers else f"up to {busy} of them at once") + (
            f" on {self.cores} core{'s' if self.cores != 1 else ''}")
        subtracted = self.subtracts_waiting
        if self.waited_for_cores and not subtracted:  # (not measured: the CPU times say they waited)
            include.append(f"waiting for a core: {on_cores}")
        if include:
            text += ", which include " + " and ".join(include)
        less = []
        if self.subtracts_helper_wait:  # (blocked in a Lock, Queue.get()...: no work, and serial would not wait)
            less.append(f"the {fmt_seconds(self.helper_wait_seconds)} they waited on "
                        f"{helper_names(self.helper_wait_kinds)}")
        if subtracted:
            less.append(f"the {fmt_seconds(self.runq_seconds or 0.0)} they waited for a core: {on_cores}")
        if less:
            text += ", less " + " and ".join(less)
        if self.waits_overlap:  # (a woken waiter's wait for a core is in both: see waits_overlap)
            off = self.task_seconds - self.estimated_serial
            text += (f", which overlap: only the {fmt_seconds(off)} the tasks were off a CPU is left out"
                     ", so the estimate is their CPU time and may run high")
        per_item = self.task_seconds / self.items_run if self.kind == "pmap" and self.items_run > 0 else None
        if per_item is not None and 0 < per_item < TINY_ITEM:  # the workers' loop and waits are most of it
            text += f", high for items this small: ~{per_item * 1e9:.0f} ns each"
        if self.capped_threads and self.capped_libs:  # serial here runs them on all the cores' threads
            n = self.capped_threads
            text += f", with {_names(self.capped_libs)} at {n} thread{'s' if n != 1 else ''} per worker"
        if self.home_seconds >= 0.001:
            text += f"; the wall includes {fmt_seconds(self.home_seconds)} here, splitting the input and assembling"
        return text

    def _speedup_text(self) -> str:
        measured = self.serial is not None
        # (the estimate is then the tasks' CPU time, the lock's contention included: a bound)
        bound = "at most " if not measured and self.waits_overlap and self.speedup is not None else ""
        return f"speedup {bound}{fmt_speedup(self.speedup, measured=measured)}"

    def _chunk_text(self) -> str:
        """``auto: 1 item per chunk, 8 chunks`` from the planner's ``auto (1)`` or a fixed ``5``."""
        size = self.chunksize
        auto = size.startswith("auto")
        sizes = size.removeprefix("auto").strip(" ()") or "-"
        # (a size that names its unit, the pandas accessor's "~5000 rows", keeps it)
        per = "" if any(c.isalpha() for c in sizes) else " item" if sizes == "1" else " items"
        chunks = f"{self.chunks} chunk{'s' if self.chunks != 1 else ''}"
        if sizes == "-":
            return f"auto, {chunks}" if auto else chunks
        cut = f" (cut from the {self.chunksize_asked} asked)" if self.chunksize_asked else ""
        return f"{'auto: ' if auto else ''}{sizes}{per} per chunk{cut}, {chunks}"

    @property
    def failed_run(self) -> bool:
        """The run raised (pmap with errors="raise", or a cell with failing ranks), or was interrupted."""
        return self.interrupted or bool(self.extra.get("error")) or (self.kind == "parallel" and self.failed > 0)

    def failed_line(self) -> str:
        """The one line that replaces the timing report of a run that raised (or was interrupted)."""
        took = fmt_seconds(self.wall)
        if self.caller == "call":  # (mpmagic.call: one call, not "failed at item 0 after 0 of 1 item")
            return f"call {'interrupted' if self.interrupted else 'failed'}, {took}{self._ran_again_text(' | ')}"
        stopped = self.extra.get("stopped_by")
        if self.interrupted or (self.kind == "parallel" and stopped):  # (a cell the pool was stopped under)
            what = "ranks" if self.kind == "parallel" else "items"
            of = "" if self.total is None else f" of {self.total}"
            failed = ""
            if self.kind == "parallel" and self.failed:  # (counted apart: a failed rank did not finish)
                ranks = ", ".join(map(str, self.failed_ranks))
                failed = f", {self.failed} failed" + (f" (rank{'s' if len(self.failed_ranks) != 1 else ''} {ranks})"
                                                      if ranks else "")
            how = "interrupted" if self.interrupted else f"stopped by {stopped}"
            what = noun(what, self.items if self.total is None else self.total)
            return f"{self.name} {how} after {self.items}{of} {what} finished{failed}, {took}"
        # (what ran twice before the run failed, side effects too: said as of a run that succeeded)
        retried = f", {self._retried_text()}" if self.retried else ""
        if self.kind == "parallel":
            ranks = ", ".join(map(str, self.failed_ranks))
            which = f" (rank{'s' if len(self.failed_ranks) != 1 else ''} {ranks})" if ranks else ""
            return f"parallel: {self.failed} of {self.items} ranks failed{which}{retried}, {took}"
        at = "" if self.failed_at is None else f" at item {self.failed_at}"
        of = "" if self.total is None else f" of {self.total}"
        done = f"{self.items}{of} item{'s' if (self.total if self.total is not None else self.items) != 1 else ''}"
        if self.extra.get("stopped_by"):  # the run's own error (its on_chunk raised), not an item's
            return (f"{self.name} stopped by {self.extra['stopped_by']} after {done} finished{retried}, {took}"
                    f"{self._ran_again_text(' | ')}")
        return f"{self.name} failed{at} after {done}{retried}, {took}{self._ran_again_text(' | ')}"

    def one_time_mattered(self) -> bool:
        """Did one-time costs take a noticeable share of the run (5% of the wall, 5 ms)?"""
        t = (self.one_time or {}).get("total", 0.0)
        return t >= 0.005 and t >= 0.05 * self.wall

    def every_call_mattered(self) -> bool:
        """Did a cell's temporary workers' imports take a noticeable share of the run
        (5% of the wall, 5 ms), as :meth:`one_time_mattered` asks of one-time costs?"""
        t = ((self.one_time or {}).get("temporary") or {}).get("total", 0.0)
        return t >= 0.005 and t >= 0.05 * self.wall

    def every_call_text(self) -> str:
        """``2 temporary workers started (512.0 ms) and imported numpy (73.8 ms)``: a cell's
        workers started for ranks beyond the idle pool workers, and stopped after it, so
        every such call pays this again (never "one-time"); empty when they imported
        nothing and started at once (under 1 ms)."""
        temp = (self.one_time or {}).get("temporary") or {}
        paid = ([f"started ({fmt_seconds(temp['start'])})"] if temp.get("start", 0.0) >= 0.001 else []) + (
            [f"imported {imports_text(temp['imports'])}"] if temp.get("imports") else [])
        if not paid:
            return ""
        n = temp["workers"]
        return f"{n} temporary worker{'s' if n != 1 else ''} {' and '.join(paid)}"

    def setup_wait_mattered(self) -> bool:
        """Did the run wait for a worker's setup a noticeable share of it (5% of the wall, 5 ms)?"""
        return self.waited_for_setup >= 0.005 and self.waited_for_setup >= 0.05 * self.wall

    def setup_wait_text(self) -> str:
        """``waited 5.00 s for the %%pool setup`` (a worker still ran it when the run's items came)."""
        return f"waited {fmt_seconds(self.waited_for_setup)} for the %%pool setup"

    def one_time_text(self) -> str:
        """``workers started 120 ms, imported numpy 290 ms, loaded the function 4.0 ms``."""
        o = self.one_time or {}
        parts = []
        if o.get("start", 0.0) >= 0.001:
            parts.append(f"workers started {fmt_seconds(o['start'])}")
        if o.get("imports"):
            parts.append(f"imported {imports_text(o['imports'])}")
        if o.get("load", 0.0) >= 0.001:
            parts.append(f"loaded the function {fmt_seconds(o['load'])}")
        return ", ".join(parts)

    def line(self) -> str:
        """The one-line summary printed after a run (the failure line for a run that raised)."""
        memo = self.__dict__.get("_shown")
        if memo is None:
            return self._line()
        if "line" not in memo:
            memo["line"] = self._line()
        return memo["line"]

    def _line(self) -> str:
        if self.failed_run:
            return self.failed_line()
        failed = self._failed_text()
        resumed = self._resumed_text()
        if resumed and not self.extra["checkpoint"]["computed"]:  # nothing ran: no workers, no speedup
            return f"{self.name}: {self._what()} in {fmt_seconds(self.wall)} | {resumed}"
        once = self.one_time_text() if self.one_time_mattered() else ""  # shown only when it mattered
        every = self.every_call_text() if self.every_call_mattered() else ""
        setup = self.setup_wait_text() if self.setup_wait_mattered() else ""
        return (
            f"{self.name}: {self._what()}{failed} on {self._where()} in {fmt_seconds(self.wall)}"
            f" | {self._serial_text()} | {self._speedup_text()}" + (f" | {resumed}" if resumed else "")
            + (f" | {setup}" if setup else "")
            + (f" | one-time: {once}" if once else "") + (f" | every call: {every}" if every else "")
            + self._ran_again_text(" | ")
        )

    def _ran_again_text(self, sep: str) -> str:
        """``items 0-1 ran again: their worker died before sending their results`` (or "was
        stopped at --timeout"; after ``sep``); empty when no finished item had to run again."""
        if not self.ran_again:
            return ""
        spans = _spans(sorted(set(self.ran_again)))
        n = len(set(self.ran_again))
        which = f"item{'s' if n != 1 else ''} {spans}"
        whose = "its worker" if n == 1 else "their worker"
        how = self.ran_again_cause or "died"
        return f"{sep}{which} ran again: {whose} {how} before sending {'its' if n == 1 else 'their'} results"

    def _failures(self) -> str:
        """``1 failed``, ``1 timed out``, ``2 failed, 1 of them timed out``; empty when none failed."""
        if not self.failed:
            return ""
        if self.timed_out >= self.failed:
            return f"{self.failed} timed out"
        if self.timed_out:
            return f"{self.failed} failed, {self.timed_out} of them timed out"
        return f"{self.failed} failed"

    def _failed_text(self) -> str:
        """`` (1 failed, 1 retried after its worker died)``; `` (1 timed out)``."""
        parts = [self._failures()] if self.failed else []
        if self.retried:
            parts.append(self._retried_text())
        return f" ({', '.join(parts)})" if parts else ""

    def _retried_text(self) -> str:
        """``1 retried after its worker died``: items (ranks) that ran again, side effects too."""
        return retried_words(self.retried)

    def _resumed_text(self) -> str:
        """With --checkpoint: how much came from the store (checkpoint.py fills extra["checkpoint"])."""
        c = self.extra.get("checkpoint")
        if not c:
            return ""
        what = "items" if self.kind == "pmap" else "ranks"
        return (f"resumed: {c['resumed']:,} of {c['total']:,} {noun(what, c['total'])} from the checkpoint, "
                f"{c['computed']:,} computed")

    def __str__(self) -> str:
        return self.line()

    def __repr__(self) -> str:
        # The dataclass's repr was ~900 characters of raw floats: a REPL's
        # ``>>> mpmagic.last_report()`` shows the one line instead.
        return f"<mpmagic.Report {self.line()}>"

    @property
    def advice(self) -> str | None:
        """One line on why parallel did not pay and what to try; None for a good run."""
        memo = self.__dict__.get("_shown")
        if memo is not None and "advice" in memo:
            return memo["advice"]
        if not self.advice_enabled or not _setting("advice", True):
            tip = None
        else:
            tip = advise(self)
        if memo is not None:
            memo["advice"] = tip
        return tip

    @contextmanager
    def shown_once(self) -> Iterator[Report]:
        """While it lasts, the line and the advice are each worked out once: a display
        asks for the text and the HTML, and both read both (the advice reasons over
        ~30 properties: about a third of a shown report's making). For a report
        nothing changes meanwhile (the one a magic shows, once its run ended)."""
        self.__dict__["_shown"] = {}
        try:
            yield self
        finally:
            self.__dict__.pop("_shown", None)

    def text(self) -> str:
        """The line, plus the advice line when the run did not pay off."""
        tip = self.advice
        return self.line() if tip is None else f"{self.line()}\nadvice: {tip}"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """In a terminal: the line (+ advice), or the table when ``report = 'html'``; then insights."""
        out = self.table() if _setting("report", "auto") == "html" and not self.failed_run else self.text()
        if self.insights is not None:
            out += "\n" + str(self.insights)
        p.text(out)

    def table(self) -> str:
        """The full report as aligned text rows (what ``%config MPMagic.report = 'html'`` shows in a terminal)."""
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        out = [f"{self.name} report"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
        tip = self.advice
        if tip:
            out.append(f"  {'advice'.ljust(width)}  {tip}")
        return "\n".join(out)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs of the full report, formatted exactly as in :meth:`line`."""
        eff = self.efficiency
        rows = [
            (self.item_noun, str(self.items)),
            ("workers", self._where()),
        ]
        if self.kind == "pmap":
            rows.append(("chunk size", self._chunk_text()))
        rows += [
            ("wall", fmt_seconds(self.wall)),
            ("serial", self._serial_text().removeprefix("serial ")),
            ("speedup", self._speedup_text().removeprefix("speedup ")),
            ("efficiency", fmt_efficiency(eff)),
        ]
        if self.failed:
            rows.append(("failed", str(self.failed) + (f" ({self.timed_out} timed out)" if self.timed_out else "")))
        if self.retried:
            rows.append(("retried", f"{self.retried} (worker died)"))
        if self.setup_wait_mattered():
            rows.append(("setup wait", fmt_seconds(self.waited_for_setup)))
        once = self.one_time_text() if self.one_time_mattered() else ""
        if once:
            rows.append(("one-time", once))
        every = self.every_call_text() if self.every_call_mattered() else ""
        if every:
            rows.append(("every call", every))
        resumed = self._resumed_text()
        if resumed:
            if not self.extra["checkpoint"]["computed"]:  # nothing ran: no workers, no speedup
                rows = [rows[0], ("wall", fmt_seconds(self.wall))]
            rows.append(("checkpoint", resumed.removeprefix("resumed: ")))
        return rows

    def _repr_html_(self) -> str | None:
        """A compact two-row table (labels over values), the advice line under it, then insights.

        None (so Jupyter shows the text line) when ``%config MPMagic.report = 'line'``.
        """
        if _setting("report", "auto") == "line":
            return None
        if self.failed_run:  # one line, not a table of timings of work that did not finish
            return (
                "<div class='mpmagic-report mpmagic-failed' style='color:#a15c00'>"
                f"{html.escape(self.failed_line())}</div>"
            )
        rows = self.rows()
        th = "padding:2px 10px;text-align:left;font-weight:600"
        td = "padding:2px 10px;text-align:left"
        head = "".join(f"<th style='{th}'>{html.escape(k)}</th>" for k, _ in rows)
        body = "".join(f"<td style='{td}'>{html.escape(v)}</td>" for _, v in rows)
        tip = self.advice
        foot = ""
        if tip:
            foot = (
                f"<tfoot><tr><td colspan='{len(rows)}' style='{td};color:#a15c00'>"
                f"advice: {html.escape(tip)}</td></tr></tfoot>"
            )
        return (
            f"<table class='mpmagic-report' title='{html.escape(self.line(), quote=True)}'>"
            f"<caption style='text-align:left'><b>{html.escape(self.name)}</b></caption>"
            f"<thead><tr>{head}</tr></thead><tbody><tr>{body}</tr></tbody>{foot}</table>"
            + (self.insights._repr_html_() if self.insights is not None else "")
        )


def _names(names: tuple[str, ...]) -> str:
    """``numpy, pandas`` (three at most, then ``2 more``), as the advice names imports."""
    return imports_text(dict.fromkeys(names))


# What Report.of checks and fills: every field's name, those without a default, and the
# fields whose default is made per report (a class attribute holds every other default).
_FIELD_NAMES = frozenset(f.name for f in fields(Report))
_REQUIRED = frozenset(f.name for f in fields(Report) if f.default is MISSING and f.default_factory is MISSING)
_FACTORIES = tuple((f.name, f.default_factory) for f in fields(Report) if f.default_factory is not MISSING)


def _setting(name: str, default: Any) -> Any:
    """A display setting of ``%config MPMagic`` (how reports render, whether to advise)."""
    try:
        from .config import current

        return getattr(current(), name)
    except Exception:
        return default


class RankValues(list):
    """The last values of a ``parallel`` cell, in rank order.

    ``gathered`` maps each ``gather`` name to its per-rank values; ``report``
    is the run's timing report.
    """

    gathered: dict[str, list]
    report: Report | None = None
    #: the ranks that ran on a worker without the ``%%pool setup`` (it failed there)
    ranks_without_setup: tuple[int, ...] = ()
    #: rank -> the user modules it ran from a Dask worker's copy that is not the notebook's file
    ranks_other_code: dict[int, tuple[str, ...]] = {}  # noqa: RUF012 (read only: each run sets its own)


def _spans(indexes: list[int]) -> str:
    """``0-2, 7, 9-10`` from sorted item indexes."""
    out: list[str] = []
    i = 0
    while i < len(indexes):
        j = i
        while j + 1 < len(indexes) and indexes[j + 1] == indexes[j] + 1:
            j += 1
        out.append(str(indexes[i]) if i == j else f"{indexes[i]}-{indexes[j]}")
        i = j + 1
    return ", ".join(out)
