"""A notebook session in a fresh process, for tests/test_warm.py.

Run as ``python warm_session.py METHOD``: an InteractiveShell (its
``__main__`` has no file, as in a notebook) whose imports the test controls,
because this process imported nothing heavy. Prints one JSON line of what it
saw. Kept out of test_warm.py so the pytest process (which imports numpy)
cannot leak modules into the notebook under test.
"""

from __future__ import annotations

import json
import sys

from IPython.core.interactiveshell import InteractiveShell


def main(method: str, mode: str) -> None:
    ip = InteractiveShell.instance(colors="nocolor")

    def run(code: str):  # (conftest.run's twin: importing conftest would set MPMAGIC_WARM=0 here)
        r = ip.run_cell(code, store_history=False)
        if r.error_before_exec is not None:
            raise r.error_before_exec
        if r.error_in_exec is not None:
            raise r.error_in_exec
        return r.result

    import mpmagic
    from mpmagic.api import last_report

    out: dict = {"notebook_had_numpy": "numpy" in sys.modules}
    if mode == "preimported":
        preimported(run, method, out)
        return
    run("%load_ext mpmagic")
    run(f"%pool start -n 2 --start-method {method}")
    mpmagic.get_pool().wait_ready()
    # A task that looks at sys.modules without importing anything.
    run("def has(name):\n    import sys\n    return name in sys.modules\n")
    out["idle_numpy"] = run("%pmap has, ['numpy'] * 4")

    # Import and use numpy in one cell: the workers import it during this call.
    run("import numpy as np\n"
        "def total(x):\n    return int(np.arange(x).sum())\n"
        "first = %pmap total, range(4)")
    rep = last_report()
    out["first"] = run("first")
    out["first_one_time"] = rep.one_time
    out["first_line"] = rep.line()
    out["first_advice"] = rep.advice
    run("second = %pmap total, range(4)")
    out["second_one_time"] = last_report().one_time
    out["second_line"] = last_report().line()

    # A module imported in a cell reaches the idle workers before the next items.
    run("import tqdm")
    out["tqdm_after_cell"] = run("%pmap has, ['tqdm'] * 4")
    # Replacements start with what the notebook imported.
    run("%pool restart")
    out["tqdm_after_restart"] = run("%pmap has, ['tqdm'] * 4")
    out["status"] = str(mpmagic.pool_status())
    mpmagic.stop_pool()
    print("RESULT " + json.dumps(out, default=str))


def preimported(run, method: str, out: dict) -> None:
    """numpy imported before the pool starts: workers have it before any task;
    under forkserver the fork server itself has it (replacements are born warm)."""
    import mpmagic

    run("import numpy as np")
    run("%load_ext mpmagic")
    run(f"%pool start -n 2 --start-method {method}")
    mpmagic.get_pool().wait_ready()
    run("def has(name):\n    import sys\n    return name in sys.modules\n")
    out["numpy"] = run("%pmap has, ['numpy'] * 4")
    if method == "forkserver":
        from multiprocessing import forkserver

        import psutil

        pid = forkserver._forkserver._forkserver_pid
        maps = [m.path for m in psutil.Process(pid).memory_maps()]
        out["forkserver_has_numpy"] = any("numpy" in path for path in maps)
    mpmagic.stop_pool()
    print("RESULT " + json.dumps(out, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "main")
