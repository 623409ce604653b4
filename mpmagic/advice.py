"""One line of advice when a parallel run did not pay off, from what was measured.

A run "did not pay" when it was slower than serial, or its efficiency
(speedup / workers) is below :data:`LOW_EFFICIENCY`. The likely cause is
picked from the report's measurements, most specific first:

* items run again after their worker died (--retries);
* a cell whose ranks each took about as long as the whole cell serially (--compare:
  the ranks repeat the work instead of splitting it; only for a cell of 5 ms or
  more serially, whose ranks each took 0.7-2x that; not said when --reduce
  found the reduced value equal to the serial one, which shows they split it,
  and judged without the one-time imports in the ranks' times, or left to a
  warm run when those were not timed);
* tasks blocked in mpmagic's own helpers (a Lock or a Value's lock, which lets
  one task at a time through; ``Queue.get()`` waiting for a producer;
  ``Event.wait()``) for a good share of the time the run lost, as the helpers
  measured it (``report.helper_wait_seconds``, :mod:`mpmagic.waits`);
* imports a cell's temporary workers paid (its ranks beyond the idle pool
  workers get new workers, stopped after it): every call pays them again, so
  ``%pool resize`` to the ranks keeps workers that have them;
* one-time costs the next call will not pay, as the workers measured them:
  modules imported during the call, the function's first loading, the
  workers' start (``report.one_time``, see warmup.py);
* the pool was still starting during the run (workers start on first use);
* the run's items waited for workers still running the ``%%pool setup``
  (``report.waited_for_setup``: no item's time, and never counted as a
  cost of sending below);
* preparing the function here: a big mutable global it captures (an array,
  a dict of arrays, a DataFrame) compared with the workers' copy on every
  call, or copied when changed, where ``mpmagic.share`` needs neither;
* tasks that ran slower in the workers than serially here (``--compare``
  measured both, less their time blocked in mpmagic's helpers: memory
  bandwidth or threads shared by the workers);
* more workers than usable CPU cores (also when the estimate looks good:
  on CPU-bound work, measured by the workers' CPU time, it counts waiting);
* large arguments or results copied to and from the workers;
* large numpy arrays copied into shared memory for the call, where
  ``mpmagic.share`` would have avoided the copy;
* the workers shared with other runs in flight (a background run, another
  thread's): the wall time counts waiting for them, so what follows, which
  reads the loss from the wall time, would blame sending or one slow task;
* tasks too small for the cost of sending them (per chunk, compute time below
  the overhead the run actually paid per chunk);
* too few items to keep every worker busy;
* one slow item (or chunk, or rank) holding everything up; when the run took
  about as long as that one item, nothing but splitting the item helps.

Results that differ from serial (``--compare``) get the likely cause
instead: the state the function visibly changes (``report.extra["state"]``, a
global it assigns, a list default...), else randomness, hashing and float sums.

A good run gets no advice at all.
"""

from __future__ import annotations

from typing import Any

# (all up front, as report.py imports this module: a notebook out of file descriptors cannot import)
from .fmt import fmt_bytes, fmt_seconds, imports_text, noun
from .threads import cap_for, configured, threads_per_worker
from .waits import TAKEOVER
from .waits import names as helper_names

# Tasks this much slower in the workers than serially here are worth naming
# (below it, timer noise and turbo clocks explain the difference).
SLOWER_IN_WORKERS = 1.5
# ...and only when the workers' chunks took this long: around a chunk of
# microseconds, the timing and loop overhead is most of what is measured.
MIN_TIMED_CHUNK = 0.005
# One-time costs are the cause when they are at least this share of what the
# run lost against ideal (wall - work per worker).
ONE_TIME_SHARE = 0.3
# "The ranks repeat the work" needs a serial cell of at least this long (each rank's own fixed
# cost, ~0.5 ms of its task time, is then small beside it) and ranks taking at most this many
# times its serial time (about the serial time each: repeated, not slowed by something else).
MIN_REPEAT_SERIAL = 0.005
REPEAT_AT_MOST = 2.0
LOW_EFFICIENCY = 0.6  # below this share of ideal speedup, say why (2 workers: under 1.2x)
LARGE_BYTES = 1_000_000  # copying less than this is never the main cost
# Array data copied into shared memory per call worth pointing at share():
# a copy costs more than one pass over the data (a sum) on any machine.
SHARED_COPY_BYTES = 16 << 20
# Preparing the function's payload here (checking or copying what it captures) is
# the cause when it took at least this share of what the run lost against ideal.
PAYLOAD_SHARE = 0.5
# The tasks' time blocked in mpmagic's helpers is the cause when it is at least this
# share of the worker time the run lost (workers x wall, less the work done).
HELPER_WAIT_SHARE = 0.3


#: Below this speedup a run "did not pay": a run on one worker at ~1.0x (0.98x:
#: its start and sending) was told to run serially over noise.
NOT_PAID = 0.95


def did_not_pay(report: Any) -> bool:
    """Slower than serial, or efficiency below :data:`LOW_EFFICIENCY`."""
    sp, eff = report.speedup, report.efficiency
    if sp is None or eff is None:
        return False
    return sp < NOT_PAID or eff < LOW_EFFICIENCY


def oversubscribed(report: Any) -> bool:
    """More workers ran CPU-bound tasks at once than there are usable cores
    (``Report.waited_for_cores``: from the chunks' start and end times and the
    tasks' CPU time, so a pool that grew, or ranks that start together, count)."""
    return bool(report.waited_for_cores)


def threads_oversubscribed(report: Any) -> float | None:
    """Threads per worker, when the workers' threads together exceeded the cores.

    A task's CPU time above its wall time means it ran several threads (BLAS,
    OpenMP); workers x those threads beyond the usable cores only take turns.
    """
    per = threads_per_worker(report.cpu_seconds, report.task_seconds)
    cores, workers = report.cores, max(1, min(report.workers, report.chunks or report.workers))
    if per is None or not cores or per < 1.3 or workers * per <= 1.15 * cores:
        return None
    # The CPU time also holds each chunk's unpickling of its items (counted from where
    # the unit starts: worker._cpu_of_unit), which the task time does not: only chunks of 20 ms of work or more make the ratio mean threads
    # (1,000,000 items of x + 1 measured 1.2-1.9 CPU/task in 5 ms chunks).
    if report.task_seconds / max(1, report.chunks or report.items) < 0.02:
        return None
    return per


def _thread_remedy(report: Any, cap: int) -> str:
    """What to do about the workers' extra threads, given the BLAS/OpenMP cap now set
    (``%config MPMagic.worker_threads``). Where the cap is in force already (the
    default, or a value at or below ``cap``), setting it would change nothing: the
    threads are ones the tasks start themselves (joblib's, scikit-learn's
    ``n_jobs=-1``), so that is what is named."""
    setting = configured()
    _, notebook = cap_for(max(1, report.workers), setting)
    if setting == 0:
        return f"cap them with %config MPMagic.worker_threads = {cap} (now 0: no cap) and %pool restart"
    if setting is None and notebook:  # the notebook's variables win over the default cap in the workers
        names = ", ".join(f"{var}={value}" for var, value in sorted(notebook.items()))
        return (f"the notebook's {names} wins over the workers' default cap: unset it, or force the cap with "
                f"%config MPMagic.worker_threads = {cap}, and %pool restart")
    if setting is not None and setting > cap:
        return f"cap them with %config MPMagic.worker_threads = {cap} (now {setting}) and %pool restart"
    now = "the default, None" if setting is None else str(setting)
    return (f"BLAS/OpenMP threads are capped already (%config MPMagic.worker_threads: {now}), so these are "
            "threads the tasks start themselves, as n_jobs=-1 in joblib or scikit-learn does: pass n_jobs=1 "
            "inside the tasks (or give -n fewer workers)")


def advise(report: Any) -> str | None:
    """The likely cause and what to try, in one line; None for a good, failed or interrupted run.

    An interrupted run's figures stop at the interrupt: the unit that was running has
    no task time and its wait is all wall time, so every cause below reads it wrongly
    (a 60 s item read as "sending and collecting a chunk cost ~3.09 s", a cell that used
    both its workers was told to use -n 1). docs/experience.md: "no speedup, no advice"."""

    if report.interrupted or report.extra.get("error"):
        return None
    if report.equal is False and report.extra.get("failed_only_there"):  # --compare --errors collect
        return (f"the results differ from the serial run's: {report.extra['failed_only_there']} and not in the "
                "serial run here: does the function read what only one side has (a file, an environment "
                "variable, a notebook object changed since, the process itself)? (troubleshooting: RESULTS "
                "DIFFER)")
    if report.failed:
        return None
    if report.items == 0 and report.caller != "call":  # an empty map ran nothing: nothing to advise on
        return None
    if report.equal is False and "serial_value" in report.extra:  # %%parallel --compare --reduce
        return ("the reduced value differs from the cell's value as rank 0 of 1 (size 1): does each rank do "
                "its share of the work by rank and size, and does --reduce combine the shares into the "
                "whole? (troubleshooting: RESULTS DIFFER)")
    if report.equal is False and report.extra.get("failed_only_here"):  # --compare --errors collect
        return (f"the results differ from the serial run's: {report.extra['failed_only_here']} and not in the "
                "workers: does the function read what only one side has (a file, an environment variable, a "
                "notebook object changed since, the process itself)? (troubleshooting: RESULTS DIFFER)")
    if report.equal is False and report.extra.get("changes"):  # --compare, and the code changes a notebook list...
        return (f"the results differ from the serial run's: {report.extra['changes']} in its workers' copies, so a "
                "task sees only what earlier tasks on its own worker did, and the notebook's is never changed by "
                "them (--compare's serial run here did change it): return the values and combine them in the "
                "notebook, or share them through an mpmagic.Queue, Value or Array (troubleshooting: A task that "
                "changes state)")
    if report.equal is False and report.extra.get("state"):  # --compare, and the code shows it keeps state
        return (f"the results differ from the serial run's: the function changes state ({report.extra['state']}); "
                "each worker changes its own copy, so a task sees only its own worker's earlier changes "
                "(troubleshooting: A task that changes state)")
    if report.equal is False:  # --compare: what first to look at (troubleshooting.md, RESULTS DIFFER)
        seed = ("draws from a generator made without a seed (np.random.default_rng(), os.urandom, uuid.uuid4()) "
                "differ on every call: seed it from the item; ") if report.extra.get("seeded") else (
            "random draws differ in each process unless --seed S gives every item its own repeatable stream; ")
        if _accessor(report):  # (it takes no seed: the function seeds its own draws)
            seed = ("random draws differ in each process unless the function seeds its own generator from what "
                    "it is given (np.random.default_rng of a row's or group's .name, say); ")
        return (f"the results differ from the serial run's: {seed}hash() of strings and set order differ "
                "between processes, and a float sum that cancels to near zero can differ by more than the "
                "rounding allowed for its size (troubleshooting: RESULTS DIFFER)")
    workers = max(1, report.workers)
    if oversubscribed(report):  # shown even when the estimate looks good: it counts the waiting
        cores = report.cores
        # (the report's first words say the workers the run had: "4 ranks on 4 workers"; fewer may have run at once)
        busy = report.peak_busy or workers
        at_once = f" (up to {busy} at once)" if busy < workers else ""
        of = f"{workers} workers{at_once} share {cores} CPU core{'s' if cores != 1 else ''} on CPU-bound work"
        setting = f"{_workers_option(report, cores)} (or %config MPMagic.workers = {cores})"
        if report.serial is not None:  # measured: the speedup is real, and no more than `cores` ran at a time
            return (f"{of}, so they take turns: no more than {cores} run at a time either way, and {setting} "
                    "does as well with less switching between them")
        # (where the workers measured their wait for a core, the estimate leaves it out: Report.runq_seconds)
        counts = "leaves their waiting out" if report.subtracts_waiting else "counts their waiting"
        return f"{of}, so they take turns (an estimated serial time {counts}): use {setting}"
    per = threads_oversubscribed(report)
    if per is not None:  # measured: CPU time per task above wall time per task
        return (
            f"each worker ran ~{per:.1f} threads (CPU time {per:.1f}x its task time), so {workers} workers "
            f"oversubscribed the {report.cores} CPU cores: {_thread_remedy(report, max(1, report.cores // workers))}"
        )
    if not did_not_pay(report):
        return None
    what = report.item_noun
    home = report.home_seconds
    if home and home >= 0.5 * (report.wall - report.task_seconds / workers):  # the pandas accessor's own work
        return (
            f"of the call's {fmt_seconds(report.wall)}, {fmt_seconds(home)} went to pandas here, splitting "
            "the input and assembling the result from the workers' values: that much runs serially whatever "
            "the workers do; with a function this quick, call pandas alone"
        )
    if report.retried:  # the lost attempt and the new worker are in the wall time, in no task time
        n = report.retried
        which = f"{n} item{'s' if n != 1 else ''} ran again after {'its worker' if n == 1 else 'their workers'}"
        if report.backend == "dask":  # (Dask's own retry, with no --retries: the worker died or left the cluster)
            return (
                f"{which} died or left the cluster (Dask ran {'it' if n == 1 else 'them'} again on another worker): "
                "the run paid for the lost work, and an item with side effects had them twice; find out why the "
                "worker went (memory? a crash in a library? the cluster scaled down?): see docs/troubleshooting.md"
            )
        return (
            f"{which} died (--retries): the run paid for the lost work and for starting a new worker; find out why the "
            "worker died (memory? a crash in a library?): see docs/troubleshooting.md"
        )
    repeated = _ranks_repeat_the_work(report)
    if repeated:
        return repeated
    blocked = _helper_waits(report)
    if blocked:
        return blocked
    once = _one_time(report)
    if once:
        return once
    if report.cold_start and _start_mattered(report):
        return (
            "the workers were still starting during this run (they start on first use, and "
            "this run paid for it): run it again to time the work alone"
        )
    setup = _setup_waited(report)
    if setup:
        return setup
    prepared = _payload_prep(report)
    if prepared:
        return prepared
    if report.cores and workers > report.cores and report.cpu_seconds is None:
        return (
            f"{workers} workers share {report.cores} CPU core{'s' if report.cores != 1 else ''}, "
            f"so they take turns: use {_workers_option(report, report.cores)} (or %config MPMagic.workers = "
            f"{report.cores})"
        )
    copied = report.bytes_sent + report.bytes_back
    if copied >= LARGE_BYTES and copied / max(report.task_seconds, 1e-9) > 50e6:
        direction = "arguments" if report.bytes_sent >= report.bytes_back else "results"
        return (
            f"{fmt_bytes(copied)} of data was pickled and copied between the notebook and the "
            f"workers, more than the {fmt_seconds(report.task_seconds)} of work could repay "
            f"(mostly {direction}): send small things (file names, index ranges, seeds) and "
            "load or make the big data in the workers"
        )
    slower = _slower_in_workers(report)
    if slower:
        return slower
    if report.bytes_shared >= SHARED_COPY_BYTES:
        return (
            f"{fmt_bytes(report.bytes_shared)} of numpy arrays among the items was copied into "
            "shared memory for this call, and copying costs more than a quick pass over the data: "
            "make the array once with `x = mpmagic.share(x)`, and later calls pass it (and slices "
            "of it) to the workers with no copy"
        )
    shared = _shared_workers(report)
    if shared:
        return shared
    # Before "too small": the time others spent waiting for one slow task reads
    # as transfer cost per chunk (a tester got "tasks too small" for one 0.2 s item).
    slowest, where = report.slowest_task, report.slowest_where
    ideal = report.task_seconds / workers
    if report.items >= workers and slowest and slowest > 0.5 * report.wall and slowest > 1.5 * ideal:
        alone = where is not None and not where.startswith("the chunk")  # one item (or rank) ran alone
        if alone and slowest >= 0.9 * report.wall:  # the run took as long as that item: nothing does better
            share = slowest / max(report.task_seconds, slowest)
            return (
                f"one slow {what[:-1]} is most of the work: {where} took "
                f"{fmt_seconds(slowest)} ({share:.0%} of the task time) and the run {fmt_seconds(report.wall)}, "
                "so no number of workers or chunk size finishes sooner: only splitting that "
                f"{what[:-1]}'s work into smaller pieces helps"
            )
        accessor = _accessor(report)
        if accessor and accessor.get("chunks") and report.chunks and report.chunks < workers:
            n = report.chunks
            return (f"the {report.items} {what} went in {n} piece{'s' if n != 1 else ''} (chunks={accessor['chunks']}), "
                    f"so only {n} of the {workers} workers had work: pass chunks={workers} or more, or leave it out "
                    f"({_per_worker(accessor)})")
        if report.kind == "pmap" and _users_chunksize(report) and report.chunks and report.chunks < workers:
            return (
                f"the {report.items} items went in {report.chunks} chunk{'s' if report.chunks != 1 else ''} "
                + (f"(%config MPMagic.chunksize = {_asked(report)}), so only {report.chunks} of the {workers} "
                   "workers had work: set a smaller one, or %config MPMagic.chunksize = None (the default splits "
                   "the items among the workers)"
                   if report.extra.get("chunksize_setting") else
                   f"(--chunksize {_asked(report)}), so only {report.chunks} of the {workers} workers had work: "
                   "use a smaller --chunksize, or none (the default splits the items among the workers)")
            )
        if report.cores and workers > report.cores:  # (a rank or item that waited for a core reads as slow)
            what = "ranks" if report.kind == "parallel" else "workers"
            return (
                f"{workers} {what} shared {report.cores} CPU core{'s' if report.cores != 1 else ''}, so they took "
                f"turns, and {where or 'one task'} took {fmt_seconds(slowest)} of the {fmt_seconds(report.wall)} "
                f"run: use {_workers_option(report, report.cores)} to time the work alone"
            )
        return (
            f"one slow task held everything up: {where or 'one task'} took {fmt_seconds(slowest)} "
            f"of the {fmt_seconds(report.wall)} run while other workers waited: "
            + (
                "split that rank's share of the work more evenly"
                if report.kind == "parallel"
                else f"pass a larger chunks= (chunks={report.items} sends each {what[:-1]} alone) so slow {what} run "
                f"in pieces of their own, or put the slow {what} first"
                if accessor
                else "use --chunksize 1 so slow items run alone, or put the slow items first"
            )
        )
    if report.kind == "pmap" and report.chunks:
        per_chunk = report.task_seconds / report.chunks
        busy = min(workers, report.chunks)  # workers that had a chunk at all
        paid_once = (report.one_time or {}).get("total", 0.0) * busy  # not a cost of sending
        prepared = report.payload_seconds * busy  # nor preparing the function, before any chunk went out
        setup = report.setup_wait_seconds  # nor waiting for a worker's %%pool setup
        overhead = max(0.0, report.wall * busy - report.task_seconds - paid_once - prepared - setup) / report.chunks
        if per_chunk < overhead:
            per_item = report.task_seconds / max(1, report.items_run)
            fixed = _users_chunksize(report)
            setting = report.extra.get("chunksize_setting")
            accessor = _accessor(report)
            if accessor and accessor.get("chunks"):  # (chunks=: a number of pieces, not a size)
                n = accessor["chunks"]
                fix = (f"chunks={n} cut the {report.items} {what} into {n} piece{'s' if n != 1 else ''}: leave chunks= "
                       f"out ({_per_worker(accessor)}) or make it smaller (fewer, larger pieces)")
            elif accessor:
                fix = f"pass chunks={workers} (one larger piece per worker)"
            elif fixed and report.extra.get("timed"):  # (automatic sizing under --timeout: chunks of 1)
                fix = (("set a larger %config MPMagic.chunksize" if setting else "make --chunksize larger")
                       + " (each item is still timed alone; without a chunk size --timeout sends each item alone)")
            elif fixed:
                fix = ("set %config MPMagic.chunksize = None (automatic sizing) or a larger one" if setting
                       else "drop --chunksize (automatic sizing) or make it larger")
            elif report.extra.get("timeout_chunks"):
                fix = ("--timeout without a chunk size sends each item in a chunk of its own (a stopped item takes no "
                       "other item's result with it): pass --chunksize N as well (each item is still timed alone; "
                       "the finished items of a stopped chunk run again), give each call more work, or leave "
                       "--timeout out")
            else:
                fix = "give each call more work (pass a batch of items per call)"
            # (On Dask the cost per chunk is the scheduler's too: assigning, queueing on a worker.)
            cost = "Dask scheduling, sending and collecting" if report.backend == "dask" else "sending and collecting"
            return (
                f"tasks too small for the transfer cost: each {what[:-1]} computes in "
                f"~{fmt_seconds(per_item)}, {_chunk_words(report, fixed)} in "
                f"~{fmt_seconds(per_chunk)}, but {cost} a chunk cost "
                f"~{fmt_seconds(overhead)}: {fix}{_or_serially(report)}"
            )
    if report.items < workers:
        return (
            f"only {report.items} {what if report.items != 1 else what[:-1]} for {workers} workers: "
            "some workers had nothing to do; "
            f"use {_workers_option(report, max(1, report.items))} or split the work into more {what}"
        )
    overhead = report.wall - ideal - report.waited_for_setup  # (a setup's time is no cost of sending)
    return (
        f"the run spent ~{fmt_seconds(max(0.0, overhead))} beyond its share of work "
        f"({fmt_seconds(ideal)} per worker) on starting, sending and collecting: "
        f"give the workers more work per call{_or_serially(report)}"
    )


def _payload_prep(report: Any) -> str | None:
    """Preparing the function here took most of what the run lost: a function that
    captures a big mutable global (an array, a dict of arrays, a DataFrame) has it
    compared with the workers' copy on every call, or copied when it changed
    (payload_cache.py). Batching items cannot help; ``mpmagic.share`` does (a tester's
    warm call on a 500 MB global spent 0.3-0.7 s there and was told to batch items)."""
    # Freeing the copies of arrays the notebook dropped (another function's captured
    # global, deleted) is timed apart: no cost of this function's captures. A payload
    # served "fast" pickled and compared nothing: its time is not its captures' either.
    seconds = report.payload_seconds - report.payload_freed_seconds
    lost = report.wall - report.task_seconds / max(1, report.workers)
    if report.payload_served in ("", "fast") or seconds < 0.005 or seconds < PAYLOAD_SHARE * lost:
        return None
    captures = report.payload_captures
    if captures:
        what = ", ".join(f"{name} ({fmt_bytes(n)})" for name, n, _kind in captures[:3])
        what += f" and {len(captures) - 3} more" if len(captures) > 3 else ""
    elif report.payload_bytes:
        what = f"{fmt_bytes(report.payload_bytes)} of arrays"
    else:
        what = "large objects"
    if report.payload_served == "same" and not report.payload_bytes:  # (no copy to compare with: Dask, a dict)
        done = f"each call pickles what it captures ({what}) again to check that it did not change (nothing was sent)"
    elif report.payload_served == "same":
        done = (f"each call checks that what it captures did not change, comparing {what} byte for byte "
                "with the workers' copy (nothing was sent)")
    else:
        done = (f"it captures {what}, copied for the workers (by the first call, and by each call that finds "
                "it changed)")
    name, _n, kind = captures[0] if captures else ("x", 0, "array")
    code = {"array": f"`{name} = mpmagic.share({name})`",
            "dict": f"`{name} = {{k: mpmagic.share(v) for k, v in {name}.items()}}`"}.get(kind)
    if report.backend == "dask":  # (share() is for workers on this machine)
        fix = f"load or make {name} in the workers with %%pool setup instead of capturing it"
    elif code is not None:
        fix = (f"make it once with {code}: workers then map that memory itself, so no call copies or compares "
               "it, and they see the notebook's changes to it")
    else:
        fix = (f"keep {name}'s data in mpmagic.share() arrays (workers map them: no call copies or compares them), "
               "or make it in the workers with %%pool setup")
    return (f"preparing the function took {fmt_seconds(seconds)} of the {fmt_seconds(report.wall)} call, here "
            f"in the notebook: {done}; {fix}")


def _accessor(report: Any) -> dict | None:
    """The pandas accessor's call (``df.mp.apply``...: ``extra["accessor"]``), or None.

    Its options are ``workers=`` and ``chunks=`` (a number of pieces, ``unit``
    rows, columns or groups each), not ``-n`` and ``--chunksize``, which the
    advice named ("drop --chunksize (automatic sizing)" after ``s.mp.map(f, chunks=3)``).
    """
    accessor = report.extra.get("accessor")
    return accessor if isinstance(accessor, dict) else None


def _workers_option(report: Any, n: int) -> str:
    """The option that sets ``n`` workers, as the call that made ``report`` takes it."""
    return f"workers={n}" if _accessor(report) else f"-n {n}"


def _per_worker(accessor: dict) -> str:
    """The accessor's automatic number of pieces, in words."""
    n = accessor.get("per_worker")
    return f"{n} pieces per worker" if n else "automatic"


def _users_chunksize(report: Any) -> bool:
    """Did the user fix the chunk size (--chunksize, %config MPMagic.chunksize)? Not when
    --timeout alone made the chunks of 1 (the advice said "drop --chunksize" to a
    user who never gave it)."""
    size = str(report.chunksize)
    return size not in ("-", "") and not size.startswith("auto") and not report.extra.get("timeout_chunks")


def _asked(report: Any) -> str:
    """The chunk size the user fixed: the one asked for, where the chunks sent were cut smaller."""
    return str(report.chunksize_asked or report.chunksize)


def _chunk_words(report: Any, fixed: bool) -> str:
    """The chunks the advice's chunk time is the average of, as the user would
    say them: ``--chunksize 3`` over 10 items is "a chunk of up to 3 (2.5 on
    average)", not "a chunk of 2" (the rounded average, which the user never gave).
    Chunks cut below the size asked (``max_tasks_per_child``) are "up to" the largest sent."""
    average = report.items_run / report.chunks
    mean = f"{average:.0f}" if average.is_integer() else f"{average:.1f}"
    if _accessor(report):  # (pieces of rows: "~100 rows" is no size the user gave)
        return (f"a piece of {mean} {noun(report.item_noun, 1 if mean == '1' else None)}"
                + ("" if average.is_integer() else " on average"))
    largest = str(report.chunksize).rsplit("-", 1)[-1]  # ("5-40": chunks of 5 to 40 items went)
    if fixed and largest != mean:
        return f"a chunk of up to {largest} ({mean} on average)"
    return f"a chunk of {mean}" if average.is_integer() else f"a chunk of {mean} items on average"


def _or_serially(report: Any) -> str:
    """", or run it serially" for a run slower than serial; nothing for one that
    still paid off (a 1.7x run on 4 threads was told to run serially)."""
    sp = report.speedup
    return ", or run it serially" if sp is None or sp < 1.0 else ""


def _ranks_repeat_the_work(report: Any) -> str | None:
    """--compare on a cell whose every rank took about as long as the whole cell serially here:
    the ranks repeat the work instead of splitting it (no overhead explains that).

    Read from the ranks' CPU time when the workers report it: 4 ranks sharing
    2 cores each take as long as the whole cell in wall time while doing a
    quarter of its work (the demo's split sum of squares was told it repeated
    the work)."""
    if report.kind != "parallel" or report.serial is None or report.serial <= 0 or report.items < 2:
        return None
    if report.equal is True and "serial_value" in report.extra:
        # --reduce: the ranks' shares combined are the whole cell's value, so they split the work
        # (on a tiny cell each rank's overhead outlasts the serial run: it said "results equal" and then this)
        return None
    # Ranks that sleep or wait for I/O use next to no CPU (0.5 % of their time): their wall time says it, and
    # they wait for no core. CPU-bound ranks sharing cores still use a share of one (4 on 2 cores: ~25-50 %).
    # (Their time blocked in mpmagic's helpers is no work: a consumer rank waiting in Queue.get() for the
    # producer's 400 ms made the two ranks' average the serial time, "the ranks repeat the work".)
    work = report.work_seconds
    cpu_bound = report.cpu_seconds is not None and report.cpu_seconds >= 0.1 * work
    # (never above the task time: the CPU time also holds each rank's loading and sending, 3.6 ms of it
    # against a 0.6 ms task on a tiny cell, which read as a rank repeating a 0.25 ms serial cell)
    per_rank = (min(report.cpu_seconds, work) if cpu_bound else work) / report.items
    # One-time costs in the ranks' times (a first run importing sklearn in each worker) are not the
    # work: without them, the ranks of a cell that does split its work were told they repeat it.
    o = report.one_time or {}
    temp = o.get("temporary") or {}  # (a cell's temporary workers: their imports are in their ranks' times too)
    imports = [*(o.get("imports") or {}).values(), *(temp.get("imports") or {}).values()]
    if report.task_imports and any(t is None for t in imports):
        return None  # imports inside the ranks' times, untimed: the next (warm) run tells
    paid = max(o.get("import_seconds", 0.0) + o.get("load", 0.0), temp.get("import_seconds", 0.0) + temp.get("load", 0.0))
    per_rank -= paid * min(report.workers, report.items) / report.items
    if per_rank < 0.7 * report.serial:
        return None
    # Repeating the work makes a rank take about the serial time, not many times it: a rank far
    # slower than that, or a cell too quick to tell its work from each rank's fixed cost (a 2-14x
    # slower rank of a 0.25 ms cell that split its work by rank), is left to the fixed-cost advice.
    if report.serial < MIN_REPEAT_SERIAL or per_rank > REPEAT_AT_MOST * report.serial:
        return None
    return (
        f"each rank took about as long as the whole cell serially ({fmt_seconds(per_rank)} per rank against "
        f"{fmt_seconds(report.serial)} here): the ranks repeat the work instead of sharing it; "
        "give each rank its part, e.g. range(rank, n, size)"
    )


def _helper_waits(report: Any) -> str | None:
    """The tasks were blocked in mpmagic's own helpers for a good share of the time the
    run lost (:data:`HELPER_WAIT_SHARE`): a lock lets one task at a time through, a
    consumer waits for its producer. Measured by the helpers (``report.helper_wait_seconds``);
    the estimate leaves that time out, and --compare's serial run (of a lock's users: work
    using a Queue or Event gets none, serial_copy.py) waits for nothing, so
    without this the loss was blamed on memory bandwidth or transfer costs."""
    waited = report.helper_wait_seconds
    if waited < 0.005 or not report.helper_wait_kinds:
        return None
    running = max(1, min(report.workers, report.chunks or report.items))  # (units that could run at once)
    lost = running * report.wall - report.work_seconds  # worker time not spent on the work
    if lost <= 0 or waited < HELPER_WAIT_SHARE * lost:
        return None
    who = "ranks" if report.kind == "parallel" else "tasks"
    head = (f"the {who} spent {fmt_seconds(waited)} of their {fmt_seconds(report.task_seconds)} waiting on "
            f"{helper_names(report.helper_wait_kinds)}")
    first = report.helper_wait_kinds[0]
    if first == TAKEOVER:
        return (f"{head}: an interrupted, timed-out or killed task left it held, and the next process to need "
                "it waits a quarter of a second before it finds the holder gone and takes it over; a cost of that "
                "stop, paid once, not of the work or of a slow producer")
    if first == "Queue":
        return (f"{head} (in get() for items, or in put() for room in a bounded queue), so they went at the pace "
                "of what filled the queue rather than beside it: give the producing to more tasks "
                "(mpmagic.Queue(producers=N), one close() each), or map the items with %pmap when they are "
                "known in advance")
    if first in ("Value access", "Array access"):  # (no lock the user took: each read and write takes it)
        update = "v.value += 1" if first == "Value access" else "a[i] += 1"
        return (f"{head}: one task at a time reads or writes it, so those accesses ran serially; and "
                f"`{update}` is a read then a write, not one step: what other tasks wrote in between is lost. "
                f"Make the update with the lock held (`with {update[0]}.get_lock(): {update}`), update shared "
                "state less often (add up a task's count and add it once), or return values and combine them "
                "in the notebook")
    if first == "Event":
        return (f"{head} until another process set() it, doing no work meanwhile: set it sooner, or do the "
                "work that does not need it before waiting")
    return (f"{head}, which lets one task at a time through: the code it guards ran serially; hold it only around the shared update (compute outside `with lock:`), update shared state less "
            "often (add up a task's count and add it once), or return values and combine them in the notebook")


def _one_time(report: Any) -> str | None:
    """Name the one-time cost (imports, first loading, start) when it explains the loss."""
    o = report.one_time or {}
    total = o.get("total", 0.0)
    # --compare measured the work: imports inside the tasks inflate their times, not the serial time.
    work = report.serial if report.serial is not None and report.task_imports else report.task_seconds
    lost = report.wall - work / max(1, report.workers)
    recurring = _every_call(report, lost)
    if recurring:
        return recurring
    untimed = [n for n, t in (o.get("imports") or {}).items() if t is None]
    if untimed and total < ONE_TIME_SHARE * lost:
        # Imported by the tasks themselves (``import x`` in the function): inside their times.
        return (
            f"the tasks imported {', '.join(untimed[:3])} in the workers during this call "
            "(inside the task times); the next call will not pay it"
        )
    if total <= 0 or total < ONE_TIME_SHARE * lost:
        return None
    if o.get("imports") and o.get("import_seconds", 0.0) >= max(o.get("load", 0.0), o.get("start", 0.0)):
        started = f" (and started, {fmt_seconds(o['start'])})" if o.get("start", 0.0) >= 0.001 else ""
        # The modules the tasks imported themselves (joblib bringing dask in) are not ones the notebook had.
        by_tasks = set(report.task_imports)
        theirs = {k: t for k, t in o["imports"].items() if k.split(", ")[0] in by_tasks}
        preloaded = {k: t for k, t in o["imports"].items() if k not in theirs}
        if o.get("preloading") and preloaded:
            preloading = "idle workers were still importing them in the background when this call began"
            if theirs:
                return (
                    f"the workers imported {imports_text(_short(preloaded))} during this call{started}, as the "
                    f"notebook had ({preloading}), and the tasks imported {imports_text(_short(theirs))} "
                    "themselves; the next call will not pay it"
                )
            return (
                f"the workers imported {imports_text(_short(preloaded))} during this call{started}; "
                f"the next call will not pay it (the notebook had imported them: {preloading})"
            )
        return (
            f"the workers imported {imports_text(_short(o['imports']))} during this call{started}; "
            "the next call will not pay it (modules the notebook imports are imported by idle workers in the "
            "background: import them in an earlier cell)"
        )
    if o.get("start", 0.0) >= o.get("load", 0.0):
        return (
            f"the workers were starting during this call ({fmt_seconds(o['start'])}); "
            "the next call will not pay it: run it again to time the work alone"
        )
    return (
        f"the workers spent {fmt_seconds(o['load'])} loading the function (sent once, with what it "
        "captures); the next call reuses it while nothing it captures changes"
    )


def _every_call(report: Any, lost: float) -> str | None:
    """A cell's temporary workers (its ranks beyond the idle pool workers get new
    workers, stopped after the cell) imported modules during it: the next call
    starts new ones, which import them again, so the cure is workers that stay,
    not "the next call will not pay it" (said on every call of a ``%%parallel -n 4``
    on 2 workers). Named when their timed imports are at least
    :data:`ONE_TIME_SHARE` of what the run lost, or when the ranks' code imported
    them (untimed: inside the ranks' times)."""
    temp = (report.one_time or {}).get("temporary") or {}
    imports = temp.get("imports") or {}
    untimed = any(t is None for t in imports.values())
    imported = bool(imports) and (untimed or temp.get("import_seconds", 0.0) >= ONE_TIME_SHARE * lost)
    start = temp.get("start", 0.0)
    slow_start = start >= 0.005 and start >= ONE_TIME_SHARE * lost  # (a spawn worker: ~0.5 s, every call)
    if not (imported or slow_start):
        return None
    n, size = temp["workers"], report.workers
    pool = temp.get("pool") or max(1, size - n)
    head = f"the {n} temporary worker{'s' if n != 1 else ''} started for the ranks beyond the pool's {pool} "
    instead = f"(or -n {pool} runs the ranks on the pool's workers)"
    took = f"took {fmt_seconds(start)} to start" if slow_start else ""
    if not imported:
        return f"{head}{took} during this call, and every call starts new ones: %pool resize {size} keeps {size} workers {instead}"
    them = "it" if len(imports) == 1 and ", " not in next(iter(imports)) else "them"
    inside = " (inside the ranks' times)" if untimed else ""
    return (
        f"{head}{took + ' and ' if took else ''}imported {imports_text(_short(imports))} during this call{inside}, "
        f"and every call starts new ones, which import {them} again: %pool resize {size} keeps {size} workers "
        f"that have {them} {instead}"
    )


def _short(imports: dict[str, float | None]) -> dict[str, float | None]:
    """``imports`` with each entry (modules imported together) cut to three names
    (``sklearn, scipy, joblib and 7 more``): an advice line, not a list of 29 modules."""
    out: dict[str, float | None] = {}
    for key, seconds in imports.items():
        names = key.split(", ")
        out[", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")] = seconds
    return out


def _slower_in_workers(report: Any) -> str | None:
    """With --compare: the same tasks took longer in the workers than serially here."""
    if report.serial is None or report.serial <= 0 or report.kind != "pmap" or not report.chunks:
        return None
    if report.extra.get("compare_left_out"):  # the serial run left items out: its time is not all the tasks'
        return None
    if report.task_seconds / report.chunks < MIN_TIMED_CHUNK:
        return None  # the workers' clocks around tiny chunks measure mostly themselves
    # (their time blocked in mpmagic's helpers is not slower work: a map serialised by a Lock,
    # 1.9x "slower", was blamed on memory bandwidth)
    work = report.work_seconds
    ratio = work / report.serial
    if ratio < SLOWER_IN_WORKERS:
        return None
    n = max(1, report.items_run)  # (a resumed checkpoint's stored items ran neither here nor there)
    return (
        f"tasks ran {ratio:.1f}x slower in the workers than here ({fmt_seconds(work / n)} "
        f"against {fmt_seconds(report.serial / n)} per item): the workers compete for memory "
        "bandwidth, or each uses several threads (numpy's BLAS) on the same cores; "
        "see docs/performance.md, \"Slower in the workers\""
    )


def _shared_workers(report: Any) -> str | None:
    """Other runs held workers while this one ran (``Report.shared_workers``):
    its wall time is partly waiting for them, not sending or collecting chunks
    (a quick %pmap behind a --bg run was told "sending and collecting a chunk
    cost ~392.4 ms")."""
    if not report.shared_workers:
        return None
    waited = report.waited_for_workers
    if report.backend == "dask":  # the cluster's workers: other clients' tasks, abandoned ones, joining ones
        wait = f"waited ~{fmt_seconds(waited)}" if waited >= 0.001 else "waited"
        return (
            f"this run {wait} for Dask workers (busy with other tasks: another run of this notebook, as runs on Dask "
            "take turns, another client's, or ones a timeout or interrupt left running; or still joining the cluster), so its time counts waiting for them and "
            "says little about its own cost: time it while the cluster is free"
        )
    wait = f"waited ~{fmt_seconds(waited)} for workers busy with" if waited >= 0.001 else "shared the workers with"
    return (
        f"this run {wait} another run (a background run, or another thread's), so its time counts "
        "waiting for them and says little about its own cost: time it while no other run is in flight"
    )


def _setup_waited(report: Any) -> str | None:
    """The run's items waited for workers still running the ``%%pool setup`` for a good
    share of what it lost (``report.waited_for_setup``, the longest wait of one worker):
    a slow setup is no item's time, and the next run does not wait for it. It read as
    a cost of sending ("sending and collecting a chunk cost ~2.50 s" for a 5 s setup)."""
    waited = report.waited_for_setup
    lost = report.wall - report.task_seconds / max(1, report.workers)
    if waited < 0.005 or waited < ONE_TIME_SHARE * lost:
        return None
    return (
        f"the run waited {fmt_seconds(waited)} of its {fmt_seconds(report.wall)} for workers still running the "
        "%%pool setup (no item's time, and a run after the setup ended does not wait): run it again to time "
        "the work alone"
    )


def _start_mattered(report: Any) -> bool:
    """Did the workers' start cost this run much? Measured when the workers
    said (``one_time["start"]``): a pool started in the background a moment
    ago may look cold and yet be ready before the first chunk."""
    if report.one_time is None:  # not measured (a cell, another backend): trust the flag
        return True
    lost = report.wall - report.task_seconds / max(1, report.workers)
    return report.one_time.get("start", 0.0) >= ONE_TIME_SHARE * lost
