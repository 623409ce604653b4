"""Write the example notebooks from the cell sources below.

The notebooks in this folder are generated so that they stay short, reviewable
in a diff and free of outputs. Edit the cells here, then run::

    python examples/make_notebooks.py

``tests/test_notebooks.py`` executes every notebook in a real kernel and
checks what it prints; ``tests/test_browser.py`` opens ``quickstart.ipynb`` in
JupyterLab.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Each notebook: a list of ("md" | "code", source). Sources are dedented text.

QUICKSTART = [
    ("md", """\
# mpmagic quickstart

mpmagic runs the functions you write in a notebook on a pool of worker
processes: `%pmap` is a parallel `map()`, `%%parallel` runs a cell on several
processes at once, `%pool` shows and manages the workers. After each run it
prints one line saying how long it took and how that compares with running the
same work serially here."""),
    ("code", "%load_ext mpmagic"),
    ("md", """\
A function defined in a cell: plain `multiprocessing` cannot send it to
spawn or forkserver workers (they cannot import the notebook); mpmagic can."""),
    ("code", """\
def work(n):
    \"\"\"CPU-bound: the sum of i*i for i < n, in pure Python.\"\"\"
    s = 0
    for i in range(n):
        s += i * i
    return s"""),
    ("md", """\
`%pmap` takes exactly what `map()` takes. The results come back as a list in
input order; above them, the timing report: the number of items, the workers
(and how they were started), the chunk size (items sent per message, chosen
from measured task times), the wall time, the serial time *estimated* as the
sum of the times the tasks took in the workers, the speedup (serial / wall)
and the efficiency (speedup per worker). The first run also pays for starting
the workers; later runs reuse them."""),
    ("code", "%pmap work, [1_000_000] * 8"),
    ("md", """\
With `--compare` the serial run really happens here in the notebook, so the
serial time and the speedup are *measured*, and the report says whether the
serial and parallel results are equal."""),
    ("code", "%pmap --compare work, [1_000_000] * 8"),
    ("md", """\
A lambda needs no parentheses, and the result can be assigned. Several
iterables are zipped exactly as `map()` does."""),
    ("code", """\
squares = %pmap -q lambda x: x * x, range(10)
squares"""),
    ("code", "%pmap -q pow, range(10), [2] * 10"),
    ("md", """\
A failing item need not stop the others: with `--errors collect` its place in
the results holds a `Failed` that says what went wrong (without it, the
exception is raised here with the worker's traceback and the item's index)."""),
    ("code", "%pmap -q --errors collect lambda x: 10 / x, [5, 0, 2]"),
    ("md", """\
`%%parallel` runs the whole cell in several processes at once. Each copy sees
`rank` and `size`; what it prints is labelled with its rank, and the last
expression of every rank comes back as a list in rank order. This cell does
almost no work, so the report most likely adds a line of *advice*: the time
went on starting and collecting the ranks, not on computing. Such a line
appears whenever a run did not pay off, with what to try."""),
    ("code", """\
%%parallel -n 2
import os
print(f"rank {rank} of {size} runs in process {os.getpid()}")
rank * 10"""),
    ("md", "`%pool` shows the workers: start method, process ids, tasks run, memory."),
    ("code", "%pool"),
    ("md", """\
A longer run (about 3 seconds on two cores) shows a progress bar that counts
items while it works."""),
    ("code", "long_results = %pmap work, [5_000_000] * 16"),
    ("code", """\
import mpmagic

print(len(long_results), "results;", mpmagic.last_report())"""),
]

CLASSIC_LESSONS = [
    ("md", """\
# The classic multiprocessing lessons, in a notebook

The standard `multiprocessing` tutorial teaches five things: start processes,
map a function with a pool, pass work through a queue, share a counter, and
split a big sum into ranges. Each one below is what it becomes with mpmagic:
the functions live in cells, the pool is managed for you (sized to your cores,
started once, released at exit) and every run says how it compared with
serial."""),
    ("code", """\
%load_ext mpmagic
import mpmagic"""),
    ("md", """\
## 1. Start processes that each run a task with their number

`Process(target=task, args=(i,))`, `start()` and `join()` for each `i` become
one `%%parallel` cell: it runs on `-n` processes at once and each copy knows
its `rank`."""),
    ("code", """\
%%parallel -n 4
import os
print(f"task {rank} of {size} in process {os.getpid()}")
rank"""),
    ("md", """\
## 2. A pool maps a function over data

`Pool(4).map(square, range(10))` is `%pmap square, range(10)`, and
`Pool.starmap` is `%pmap --star` over argument tuples."""),
    ("code", """\
def square(x):
    return x * x

%pmap -q square, range(10)"""),
    ("code", "%pmap -q --star pow, [(2, 10), (3, 4), (10, 3)]"),
    ("md", """\
## 3. Producer and consumer through a queue

`mpmagic.Queue()` can be handed to workers that are already running, which a
`multiprocessing.Queue` cannot. The tutorial's consumer loops
`while not q.empty()`, which can stop early if it looks before the producer
has put anything. Here the producer closes the queue when it is done, and the
consumer's `for item in q` ends once the queue is closed *and* drained."""),
    ("code", """\
q = mpmagic.Queue()"""),
    ("code", """\
%%parallel -n 2 -q
if rank == 0:                      # the producer
    for i in range(1, 11):
        q.put(i * i)
    q.close()                      # end of stream
    received = None
else:                              # the consumer
    received = [item for item in q]
received"""),
    ("md", """\
## 4. A shared counter

`mpmagic.Value("i", 0)` lives in shared memory. A cell function captures it,
the workers increment it under its lock, and the notebook reads the live
value."""),
    ("code", """\
counter = mpmagic.Value("i", 0)

def add(times):
    for _ in range(times):
        with counter.get_lock():
            counter.value += 1
    return times

%pmap -q add, [1000] * 4
counter.value"""),
    ("md", """\
## 5. The sum of squares of 1..1,000,000, split four ways

The tutorial's `Pool.starmap(compute_range, ranges)` with four ranges:"""),
    ("code", """\
def compute_range(start, stop):
    return sum(i * i for i in range(start, stop))

N = 1_000_000
ranges = [(k * N // 4 + 1, (k + 1) * N // 4 + 1) for k in range(4)]
ranges"""),
    ("md", """\
`--compare` runs the same four calls serially here as well, so the speedup
is measured, not estimated."""),
    ("code", """\
parts = %pmap --star --compare compute_range, ranges
print("total:", sum(parts))"""),
    ("md", """\
The same split written as one SPMD cell: each of the four ranks works out its
own range from `rank` and `size`, and `--reduce sum` adds up their values.
`--compare` also runs the cell once here as a single rank covering the whole
range."""),
    ("code", """\
%%parallel -n 4 --compare --reduce sum
start, stop = rank * N // size + 1, (rank + 1) * N // size + 1
sum(i * i for i in range(start, stop))"""),
    ("md", """\
The tutorial's advice, which mpmagic follows for you: no more worker processes
than cores (the pool is sized to the CPUs this kernel may use), always release
the pool (it stops with the kernel), and split the work evenly (`%pmap` sizes
its chunks from measured task times)."""),
]

DATA_WORK = [
    ("md", """\
# Exploratory data work in parallel

Three everyday jobs, each run with `--compare` so the report shows the
measured serial time, the speedup, and whether the results are equal:
image-style processing of a large array in strips, a Monte Carlo estimate, and
a per-group computation on a pandas DataFrame."""),
    ("code", """\
%load_ext mpmagic
import numpy as np
import pandas as pd"""),
    ("md", """\
## Image processing in strips

A 2048 x 2048 image is smoothed with 30 passes of a 3 x 3 box blur. Each
strip is sent with a margin (halo) of 30 rows on each side, so that after
cropping, the stitched result is exactly the whole-image result."""),
    ("code", """\
rng = np.random.default_rng(0)
image = rng.random((2048, 2048), dtype=np.float32)
PASSES = 30

def smooth(a, passes=PASSES):
    \"\"\"Box-blur a 2-D array `passes` times; the border pixels stay as they are.\"\"\"
    a = a.copy()
    for _ in range(passes):
        a[1:-1, 1:-1] = (a[:-2, :-2] + a[:-2, 1:-1] + a[:-2, 2:]
                         + a[1:-1, :-2] + a[1:-1, 1:-1] + a[1:-1, 2:]
                         + a[2:, :-2] + a[2:, 1:-1] + a[2:, 2:]) / 9
    return a

def strips(img, n, halo=PASSES):
    \"\"\"Cut `img` into `n` row strips, each with `halo` extra rows on both sides.\"\"\"
    bounds = np.linspace(0, len(img), n + 1).astype(int)
    return [(img[max(lo - halo, 0):hi + halo], lo - max(lo - halo, 0), hi - lo)
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

def smooth_strip(strip, skip, rows):
    return smooth(strip)[skip:skip + rows]"""),
    ("code", """\
pieces = %pmap --star --compare smooth_strip, strips(image, 8)
smoothed = np.vstack(pieces)
print("same as smoothing the whole image:", np.array_equal(smoothed, smooth(image)))"""),
    ("md", """\
## A Monte Carlo estimate of pi

Each task draws its own random points from its own seed, so the answer is the
same serially and in parallel."""),
    ("code", """\
def count_inside(seed, n=3_000_000):
    \"\"\"How many of n random points in the unit square fall inside the quarter circle.\"\"\"
    rng = np.random.default_rng(seed)
    x, y = rng.random(n), rng.random(n)
    return int(np.count_nonzero(x * x + y * y <= 1.0))

hits = %pmap --compare count_inside, range(8)
print(f"pi is about {4 * sum(hits) / (8 * 3_000_000):.4f}")"""),
    ("md", """\
## A group-wise computation with pandas

A bootstrap confidence interval of the mean sale for each store: the groups of
a `groupby` are independent, so each one can go to a worker."""),
    ("code", """\
rng = np.random.default_rng(1)
sales = pd.DataFrame({
    "store": rng.integers(0, 8, 200_000),
    "amount": rng.gamma(2.0, 20.0, 200_000).round(2),
})

def bootstrap_mean(group, resamples=500):
    \"\"\"Mean sale of one store with a 95% bootstrap confidence interval.\"\"\"
    values = group["amount"].to_numpy()
    rng = np.random.default_rng(int(group["store"].iat[0]))
    means = [rng.choice(values, values.size).mean() for _ in range(resamples)]
    low, high = np.percentile(means, [2.5, 97.5])
    return {"store": int(group["store"].iat[0]), "mean": values.mean(), "low": low, "high": high}

groups = [group for _, group in sales.groupby("store")]"""),
    ("code", """\
rows = %pmap --compare bootstrap_mean, groups
pd.DataFrame(rows).set_index("store").round(2)"""),
]

SCALING_OUT = [
    ("md", """\
# Scaling out: the same cells on a Dask cluster

When one machine is not enough, `%pool dask ADDRESS` points the same magics at
a Dask cluster. Here `%pool dask` starts a small local cluster, so the notebook
runs anywhere (`pip install "mpmagic[dask]"`); with a real cluster, only the
address changes."""),
    ("code", """\
%load_ext mpmagic
%pool dask -n 2"""),
    ("code", """\
def work(n):
    s = 0
    for i in range(n):
        s += i * i
    return s"""),
    ("md", "The same `%pmap` as on local processes: same results, same order, same report."),
    ("code", "%pmap --compare work, [1_000_000] * 8"),
    ("code", """\
%%parallel -n 2
import os
print(f"rank {rank} of {size} on a Dask worker, process {os.getpid()}")
rank * 10"""),
    ("md", "`%pool` shows the cluster: scheduler address, workers, threads, memory."),
    ("code", "%pool"),
    ("md", "`%pool local` stops the cluster and goes back to processes on this machine."),
    ("code", """\
%pool local
%pmap -q work, [10, 100]"""),
]

NOTEBOOKS = {
    "quickstart.ipynb": QUICKSTART,
    "classic_lessons.ipynb": CLASSIC_LESSONS,
    "data_work.ipynb": DATA_WORK,
    "scaling_out.ipynb": SCALING_OUT,
}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook (no outputs) with a Python 3 kernelspec from ``cells``."""
    nb = new_notebook(
        cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
    )
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids keep the diffs small
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> int:
    """Write every notebook; with ``--check``, only report the ones that are stale."""
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / name
        text = nbformat.writes(build(cells)) + "\n"
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        path.write_text(text)
        print(f"wrote {path.relative_to(HERE.parent)}")
    if stale:
        print(f"stale notebooks (run python examples/make_notebooks.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
