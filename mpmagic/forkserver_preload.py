"""Imported only by multiprocessing's forkserver process, as a preload module.

The forkserver remembers the SIGINT handler it had when it started and gives
it to every process it forks. Python installs its KeyboardInterrupt handler
at startup, so a worker would be killed by an "interrupt kernel" (SIGINT to
the kernel's whole process group) that arrives in the milliseconds before
the worker ignores SIGINT itself, e.g. during the restart that follows a
first interrupt. Preload modules are imported before the forkserver records
its handlers: ignoring SIGINT here makes every worker ignore it from birth.

Never import this module anywhere else: it would make that process deaf to
Ctrl-C.
"""

from __future__ import annotations

import signal
import sys

if "multiprocessing.forkserver" in sys.modules and sys.argv[:1] == ["-c"]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
