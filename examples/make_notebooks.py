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
iterables are zipped exactly as `map()` does. (These cells show the syntax:
ten squares are microseconds of work, far less than sending them costs, so
`-q` hides a report that could only say "slower than serial".)"""),
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
A longer run (about 3 seconds of work, half that on two cores) shows a progress bar that counts
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
its `rank`. This lesson is about processes, not speed: the cell does no work,
so its report shows a speedup far below 1 (and it asks for 4 processes on a
machine that may have 2 cores: mpmagic starts 2 temporary extra workers for
this cell)."""),
    ("code", """\
%%parallel -n 4
import os
print(f"task {rank} of {size} in process {os.getpid()}")
rank"""),
    ("md", """\
## 2. A pool maps a function over data

`Pool(4).map(square, range(10))` is `%pmap square, range(10)`, and
`Pool.starmap` is `%pmap --star` over argument tuples. Ten squares are far too
little work to gain anything from other processes (`-q` hides the report that
would say so); lesson 5 has work worth sharing."""),
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
consumer's `for item in q` ends once the queue is closed *and* drained.
(Two processes passing ten numbers: a lesson in coordination, not speed.)"""),
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
value. The lock makes the increments take turns, so this is no faster than one
process: correctness, not speed, is the lesson."""),
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
## 5. The sum of squares of 1..16,000,000, split four ways

The tutorial's `Pool.starmap(compute_range, ranges)` with four ranges. The
tutorial sums to 1,000,000, a few tens of milliseconds of work: about what it
costs to feed the workers. Sixteen million (about half a second here) is
enough for two cores to pay off."""),
    ("code", """\
def compute_range(start, stop):
    return sum(i * i for i in range(start, stop))

N = 16_000_000
ranges = [(k * N // 4 + 1, (k + 1) * N // 4 + 1) for k in range(4)]
ranges"""),
    ("md", """\
The tutorial's own numbers first: 1..1,000,000 in four ranges. The answer
is the tutorial's 333333833333500000. `--compare` also runs the four calls
serially here, so the timing line's speedup is measured. The whole sum is a
few tens of milliseconds of work: two cores can save at most half of it, and
sending the calls and collecting the results costs milliseconds too, so the
line may show a small gain or a loss, whichever the machine's load of the
moment gives."""),
    ("code", """\
classic_ranges = [(k * 250_000 + 1, (k + 1) * 250_000 + 1) for k in range(4)]
classic = %pmap --compare --star compute_range, classic_ranges
print("total:", sum(classic))"""),
    ("md", """\
Now the sixteen million, with `--compare` again, so the speedup is measured,
not estimated."""),
    ("code", """\
parts = %pmap --star --compare compute_range, ranges
print("total:", sum(parts))"""),
    ("md", """\
The same split written as one SPMD cell: each of the four ranks works out its
own range from `rank` and `size`, and `--reduce sum` adds up their values.
`--compare` also runs the cell once here as a single rank covering the whole
range, and says whether the reduced sum equals it (`results equal`)."""),
    ("code", """\
%%parallel -n 4 --compare --reduce sum
start, stop = rank * N // size + 1, (rank + 1) * N // size + 1
sum(i * i for i in range(start, stop))"""),
    ("md", """\
The tutorial's advice, and what mpmagic does about it:

- *No more worker processes than cores.* The pool is sized to the CPUs this
  kernel may use (`%pool` shows how many). A cell may still ask for more ranks,
  as lessons 1 and 5 do with `-n 4`: mpmagic then starts temporary extra
  workers for that cell, and they share the cores. On a 2-core machine four
  ranks finish no sooner than two would; ask for more ranks than cores only
  when the ranks wait (on I/O, on each other) rather than compute.
- *Always release the pool.* It stops with the kernel (or `%pool stop`).
- *Split the work evenly.* `%pmap` sizes its chunks from measured task times;
  in a `%%parallel` cell, the ranges are yours to balance."""),
]

DATA_WORK = [
    ("md", """\
# Exploratory data work in parallel

Everyday jobs, each run with `--compare` (or timed against pandas itself) so
the report shows the measured serial time, the speedup, and whether the
results are equal: image-style processing of a large array in strips, a Monte
Carlo estimate, a per-group computation, and a quarter-million-row table worked with
pandas' own `apply` and `map`, run on the pool through `df.mp`."""),
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

Each task draws its own random points from its own seed (the item is the
seed), so the answer is the same serially and in parallel. Points are drawn in
blocks of a million, so the memory stays small however many are drawn."""),
    ("code", """\
def count_inside(seed, n=8_000_000, block=1_000_000):
    \"\"\"How many of n random points in the unit square fall inside the quarter circle.\"\"\"
    rng = np.random.default_rng(seed)
    inside = 0
    for _ in range(n // block):
        x, y = rng.random(block), rng.random(block)
        inside += int(np.count_nonzero(x * x + y * y <= 1.0))
    return inside

hits = %pmap --compare count_inside, range(8)
print(f"pi is about {4 * sum(hits) / (8 * 8_000_000):.4f}")"""),
    ("md", """\
## A group-wise computation with pandas

A bootstrap confidence interval of the mean sale for each store: the groups of
a `groupby` are independent, so each one can go to a worker. Each store's
amounts go as a numpy array (with `--star`, the store and its array are the
two arguments): the workers need not import pandas for this."""),
    ("code", """\
rng = np.random.default_rng(1)
sales = pd.DataFrame({
    "store": rng.integers(0, 8, 100_000),
    "amount": rng.gamma(2.0, 20.0, 100_000).round(2),
})

def bootstrap_mean(store, values, resamples=1000):
    \"\"\"Mean sale of one store with a 95% bootstrap confidence interval.\"\"\"
    rng = np.random.default_rng(store)
    means = [rng.choice(values, values.size).mean() for _ in range(resamples)]
    low, high = np.percentile(means, [2.5, 97.5])
    return {"store": store, "mean": values.mean(), "low": low, "high": high}

groups = [(int(store), group["amount"].to_numpy()) for store, group in sales.groupby("store")]"""),
    ("code", """\
rows = %pmap --star --compare bootstrap_mean, groups
pd.DataFrame(rows).set_index("store").round(2)"""),
    ("md", """\
## A quarter of a million orders, the pandas way: `df.mp`

With pandas imported, every DataFrame, Series and GroupBy has an `.mp`
accessor: `df.mp.apply(f, axis=1)`, `series.mp.map(f)` and
`df.groupby(key).mp.apply(f)` cut the table into pieces (row chunks or whole
groups), run pandas' own call on each piece in the workers, and return exactly
what the same call without `.mp` returns: same index, columns and dtypes.
The first call that sends pandas data makes each worker import pandas once
(a few tenths of a second, in the workers, in parallel)."""),
    ("code", """\
import time

rng = np.random.default_rng(2)
n = 250_000
orders = pd.DataFrame({
    "customer": rng.integers(0, 500, n),
    "product": pd.Categorical(rng.choice(["tea", "coffee", "cocoa", "juice"], n)),
    "quantity": rng.integers(1, 6, n),
    "price": rng.gamma(3.0, 4.0, n).round(2),
    "when": pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 365 * 24 * 60, n), unit="min"),
})
customers = pd.DataFrame({"region": rng.choice(["north", "south", "east", "west"], 500)})
orders.head()"""),
    ("md", """\
`series.mp.map` is `Series.map` on the pool, for a function of one value that
pandas cannot vectorise: here, which part of the day each order was placed in,
read from its timestamp (a few microseconds per row, about a second for the
quarter million). This first call also pays for the workers' import of pandas.

The timing line times the whole call, as the stopwatch below does. Part of it
runs here whatever the workers do: pandas assembles the result from the
values the workers send back, walking the timestamps once more. For a
function this quick that part takes about as long as the work itself, so the
call is no faster than pandas alone (the line then says where the time went);
`.mp` pays off when each call takes longer, as in the groupby below."""),
    ("code", """\
def daypart(when):
    hour = when.hour + when.minute / 60
    if when.day_of_week >= 5:
        return "weekend"
    return "morning" if hour < 12 else "afternoon" if hour < 18 else "evening"

t0 = time.perf_counter()
parts = orders["when"].mp.map(daypart)
parallel = time.perf_counter() - t0
t0 = time.perf_counter()
expected = orders["when"].map(daypart)
serial = time.perf_counter() - t0
print(f"pandas alone {serial:.2f} s, with .mp {parallel:.2f} s: {serial / parallel:.2f}x; "
      f"same result: {parts.equals(expected)}")
parts.value_counts()"""),
    ("md", """\
A profile of each of the 500 customers (500 orders each): how many orders,
what they spent, their favourite product, the longest gap between two orders.
Several pandas operations per group, about 2 ms each: a second of work. (Many
more, much smaller groups would gain less: pandas itself assembles the result
at home, at some tens of microseconds per group.)"""),
    ("code", """\
def profile(mine):
    gaps = mine["when"].sort_values().diff().dt.total_seconds() / 86_400
    return pd.Series({
        "orders": len(mine),
        "spend": (mine["quantity"] * mine["price"]).sum().round(2),
        "favourite": mine["product"].value_counts().index[0],
        "longest_gap_days": round(gaps.max(), 1),
    })

bought = ["when", "quantity", "price", "product"]  # the columns it reads (pandas 2 warns if the key goes too)
t0 = time.perf_counter()
profiles = orders.groupby("customer")[bought].mp.apply(profile)
parallel = time.perf_counter() - t0"""),
    ("md", "pandas alone, for the measured speedup and to check the result is the same:"),
    ("code", """\
t0 = time.perf_counter()
expected = orders.groupby("customer")[bought].apply(profile)
serial = time.perf_counter() - t0
print(f"pandas alone {serial:.2f} s, with .mp {parallel:.2f} s: {serial / parallel:.2f}x; "
      f"same result: {profiles.equals(expected)}")"""),
    ("md", """\
Joining the results back is plain pandas: the profiles meet the customers'
regions, and the spend is summed per region and favourite product."""),
    ("code", """\
summary = profiles.join(customers).groupby(["region", "favourite"], observed=True)["spend"].sum().unstack()
summary.round(0)"""),
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
    ("md", """\
The same `%pmap` as on local processes: same results, same order, same report.
Each of the 8 items is about a fifth of a second of work, so that the Dask
overhead (a few milliseconds per task) stays small beside it."""),
    ("code", "%pmap --compare work, [3_000_000] * 8"),
    ("md", """\
A `%%parallel` cell runs each rank on its own Dask worker. This one only says
where it ran: no work, so its report shows the scheduling cost, not a speedup."""),
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

IMAGE_PROCESSING = [
    ("md", """\
# Image processing: a folder of pictures, in parallel

A batch job many notebooks do: read every image in a folder, clean it up,
make a thumbnail, measure something, and look at the results. Each image is
independent, so `%pmap` sends them to the workers. The images are made here
(numpy and Pillow, no download): 200 pictures of 128 x 128 pixels, coloured
waves with a few discs and some noise."""),
    ("code", """\
%load_ext mpmagic
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

folder = Path(tempfile.mkdtemp(prefix="mpmagic-images-"))"""),
    ("md", """\
Making the pictures is itself parallel work: each one from its own seed (the
item), written to its own file: about 5 ms each, a second for all of them."""),
    ("code", """\
def make_image(seed, size=128):
    \"\"\"Write picture number `seed` (waves, discs, noise) as a PNG; return its path.\"\"\"
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.empty((size, size, 3))
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.random()
        img[..., c] = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * x + fy * y + phase))
    for _ in range(6):
        cx, cy, r = rng.random(), rng.random(), rng.uniform(0.05, 0.2)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.random(3)
    img += rng.normal(0, 0.1, img.shape)
    path = folder / f"img_{seed:03d}.png"
    Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(path)
    return path

paths = %pmap make_image, range(200)
print(len(paths), "pictures in", folder)"""),
    ("md", """\
The processing: a median filter takes out the noise, a slight blur smooths
it, a high-quality (Lanczos) resize makes a 96 x 96 thumbnail, and an edge
filter measures how busy the picture is: about 7 ms a picture, reading and
writing files included. `--compare` also runs it serially here, so the
speedup in the report is measured."""),
    ("code", """\
def process(path):
    \"\"\"Denoise, blur and shrink one picture; save the thumbnail; return its path and edge score.\"\"\"
    with Image.open(path) as im:
        clean = im.convert("RGB").filter(ImageFilter.MedianFilter(3)).filter(ImageFilter.GaussianBlur(1))
    thumb = clean.resize((96, 96), Image.Resampling.LANCZOS)
    out = path.with_name(path.stem + "_thumb.png")
    thumb.save(out)
    edges = np.asarray(thumb.convert("L").filter(ImageFilter.FIND_EDGES), dtype=np.float32)
    return out, float(edges.mean())

results = %pmap --compare process, paths"""),
    ("md", "The 24 busiest pictures (most edges), as one contact sheet:"),
    ("code", """\
busiest = sorted(results, key=lambda r: r[1], reverse=True)[:24]
sheet = Image.new("RGB", (6 * 100, 4 * 100), "white")
for k, (thumb, _score) in enumerate(busiest):
    with Image.open(thumb) as im:
        sheet.paste(im, (100 * (k % 6) + 2, 100 * (k // 6) + 2))
print(f"edge scores from {busiest[-1][1]:.1f} to {busiest[0][1]:.1f}")
sheet"""),
    ("md", "The folder is temporary: remove it when done."),
    ("code", """\
import shutil

shutil.rmtree(folder)
folder.exists()"""),
]

SIMULATION = [
    ("md", """\
# Simulation: pricing an option by Monte Carlo

A European call option pays `max(S_T - K, 0)` at time `T`, where the share
price `S` follows a geometric Brownian motion. Its price is the discounted mean
payoff over many simulated paths. Black and Scholes gave the exact answer,
so we can watch the Monte Carlo estimate converge to it.

Every batch of paths gets its own **random stream** with `--seed`: batch `k`
draws from the stream of the seed and its index `k` (`mpmagic.rng()` in the
function), so it always draws the same numbers, whichever worker runs it and
in whatever order. The parallel result equals the serial one exactly, and a
rerun with the same seed repeats it."""),
    ("code", """\
%load_ext mpmagic
import math

import numpy as np

import mpmagic

S0, K, RATE, SIGMA, T = 100.0, 105.0, 0.03, 0.25, 1.0

def black_scholes_call(s0, k, r, sigma, t):
    \"\"\"The exact price of a European call.\"\"\"
    d1 = (math.log(s0 / k) + (r + sigma ** 2 / 2) * t) / (sigma * math.sqrt(t))
    d2 = d1 - sigma * math.sqrt(t)
    return s0 * normal_cdf(d1) - k * math.exp(-r * t) * normal_cdf(d2)

def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))

exact = black_scholes_call(S0, K, RATE, SIGMA, T)
print(f"Black-Scholes price: {exact:.4f}")"""),
    ("md", """\
One batch: 2,000,000 paths (in blocks, so memory stays small) drawn from the
batch's own stream, returning the sum of the discounted payoffs and of their
squares, enough to build the mean and its standard error from any number of
batches."""),
    ("code", """\
def batch(k, paths=2_000_000, block=500_000):
    \"\"\"Sum and sum of squares of discounted payoffs over `paths` paths of batch `k`.\"\"\"
    rng = mpmagic.rng()  # batch k's own stream under --seed
    total = squares = 0.0
    for _ in range(paths // block):
        z = rng.standard_normal(block)
        s_t = S0 * np.exp((RATE - SIGMA ** 2 / 2) * T + SIGMA * math.sqrt(T) * z)
        payoff = math.exp(-RATE * T) * np.maximum(s_t - K, 0.0)
        total += float(payoff.sum())
        squares += float((payoff * payoff).sum())
    return total, squares"""),
    ("md", """\
A first small run checks the set-up: two batches. Like any first call, it
also pays for the workers' one-time import of numpy (a few tenths of a
second), which the report would otherwise count against the main run."""),
    ("code", """\
%pmap --seed 2024 batch, range(2)"""),
    ("md", """\
Then 16 batches, 32 million paths, with `--compare` for the measured speedup
(its serial run draws the same streams, so the results are equal):"""),
    ("code", """\
sums = %pmap --compare --seed 2024 batch, range(16)"""),
    ("code", """\
paths_per_batch = 2_000_000
n = paths_per_batch * np.arange(1, len(sums) + 1)
total = np.cumsum([s for s, _ in sums])
squares = np.cumsum([q for _, q in sums])
estimate = total / n
stderr = np.sqrt((squares / n - estimate ** 2) / n)
print(f"estimate {estimate[-1]:.4f} +/- {1.96 * stderr[-1]:.4f} (95%), exact {exact:.4f}")"""),
    ("md", """\
The estimate after each batch, with its 95% band, closing in on the exact
price as the paths add up (the band narrows as one over the square root of
the number of paths)."""),
    ("code", """\
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
ax.fill_between(n / 1e6, estimate - 1.96 * stderr, estimate + 1.96 * stderr, alpha=0.3, label="95% band")
ax.plot(n / 1e6, estimate, "o-", label="Monte Carlo estimate")
ax.axhline(exact, color="black", linestyle="--", label="Black-Scholes")
ax.set_xlabel("paths (millions)")
ax.set_ylabel("option price")
ax.legend()
plt.show()"""),
]

NOTEBOOKS = {
    "quickstart.ipynb": QUICKSTART,
    "classic_lessons.ipynb": CLASSIC_LESSONS,
    "data_work.ipynb": DATA_WORK,
    "scaling_out.ipynb": SCALING_OUT,
    "image_processing.ipynb": IMAGE_PROCESSING,
    "simulation.ipynb": SIMULATION,
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
