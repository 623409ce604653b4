"""The mpmagic demo: the classic multiprocessing lessons as notebook cells.

Runs each cell in a real IPython shell (functions defined in cells live in a
``__main__`` without a file, as in a notebook) and prints it as a session
transcript, with mpmagic's timing line after each parallel run.

    python3 dev.py demo        # or: .venv/bin/python examples/demo.py
"""

from __future__ import annotations

import sys

from IPython.core.interactiveshell import InteractiveShell

CELLS = [
    ("Load the extension", "%load_ext mpmagic"),
    (
        "A CPU-bound function defined in a cell",
        "def work(n):\n"
        "    s = 0\n"
        "    for i in range(n):\n"
        "        s += i * i\n"
        "    return s",
    ),
    ("Lesson 2: a pool maps a function over data", "%pmap lambda x: x * x, range(10)"),
    ("Parallel map with the serial run measured too", "%pmap --compare work, [1_500_000] * 8"),
    (
        "Lesson 1: start N processes that each run a task with their number",
        "%%parallel -n 4 -q\nimport os\nprint(f'rank {rank} of {size} in process {os.getpid()}')",
    ),
    (
        "Lesson 3: producer and consumers through a Queue that ends cleanly",
        "import mpmagic\n"
        "jobs = mpmagic.Queue()",
    ),
    (
        "Rank 0 produces 200 items and closes the queue; ranks 1-3 share them out (sum: 200)",
        "%%parallel -n 4 -q\n"
        "import time\n"
        "taken = []\n"
        "if rank == 0:\n"
        "    for i in range(200):\n"
        "        jobs.put(i)\n"
        "    jobs.close()\n"
        "else:\n"
        "    for item in jobs:   # ends when the queue is closed and drained\n"
        "        taken.append(item)\n"
        "        time.sleep(0.002)  # the work on each item\n"
        "    print(f'took {len(taken)} items')\n"
        "len(taken)",
    ),
    (
        "Lesson 4: a shared counter, incremented under its lock by 4 running workers",
        "counter = mpmagic.Value('i', 0)\n"
        "def bump(times):\n"
        "    for _ in range(times):\n"
        "        with counter.get_lock():\n"
        "            counter.value += 1\n"
        "%pmap -q --chunksize 1 bump, [10_000] * 4\n"
        "counter.value",
    ),
    (
        "Lesson 5: the sum of squares of 1..1,000,000 in four ranges, with starmap",
        "def compute_range(lo, hi):\n"
        "    return sum(i * i for i in range(lo, hi))\n"
        "\n"
        "ranges = [(1, 250_001), (250_001, 500_001), (500_001, 750_001), (750_001, 1_000_001)]\n"
        "parts = %pmap --star --compare compute_range, ranges\n"
        "sum(parts)",
    ),
    (
        "Lesson 5 again: the same split as an SPMD cell",
        "%%parallel -n 4 --reduce sum --compare\n"
        "N = 1_000_000\n"
        "lo, hi = rank * N // size + 1, (rank + 1) * N // size + 1\n"
        "sum(i * i for i in range(lo, hi))",
    ),
    (
        "Errors come back with the cell's own line and the failing item",
        "def risky(x):\n"
        "    return 10 / (x - 3)\n"
        "%pmap -q --errors collect risky, range(6)",
    ),
    ("The managed pool, reused by every call", "%pool"),
]


def main() -> int:
    shell = InteractiveShell.instance(colors="nocolor")
    failures = 0
    for title, code in CELLS:
        print(f"\n# {title}")
        lines = code.splitlines()
        n = shell.execution_count
        print(f"In [{n}]: {lines[0]}")
        for line in lines[1:]:
            print(f"{' ' * (len(str(n)) + 4)}...: {line}")
        sys.stdout.flush()
        result = shell.run_cell(code, store_history=True)
        if not result.success:
            failures += 1
    shell.run_cell("%unload_ext mpmagic")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
