"""Shared fixtures: a notebook-like IPython shell, pools per start method, and
a check at the end of the session that no worker process was left behind."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from IPython.core.interactiveshell import InteractiveShell

import mpmagic
from mpmagic import pool as pool_module

START_METHODS = ["forkserver", "spawn", "fork"]


@pytest.fixture(scope="session")
def ip():
    """One InteractiveShell for the session, with mpmagic loaded.

    Functions defined through ``ip.run_cell`` live in a ``__main__`` that has
    no file, exactly as in a notebook.
    """
    shell = InteractiveShell.instance(colors="nocolor")
    shell.run_cell("%load_ext mpmagic", store_history=False)
    yield shell
    mpmagic.stop_pool()


def run(ip, code: str):
    """Run a cell; fail the test with the cell's error if it raised."""
    result = ip.run_cell(code, store_history=False)
    if result.error_before_exec is not None:
        raise result.error_before_exec
    if result.error_in_exec is not None:
        raise result.error_in_exec
    return result.result


@pytest.fixture(scope="session", params=["forkserver", "spawn"])
def method(request):
    """A running 2-worker local pool per start method (reused across tests)."""
    mpmagic.use_local(2, request.param)
    yield request.param


@pytest.fixture(scope="session", params=START_METHODS)
def any_method(request):
    """Like ``method`` but with fork too, for the classic lessons."""
    mpmagic.use_local(2, request.param)
    yield request.param


# Backends the core %pmap / %%parallel tests run against (parametrized, not
# copied). The Dask backend adds "dask" here once it runs against a real
# scheduler and workers started by the fixture below.
BACKENDS = ["local"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The current pool switched to the requested backend for this test."""
    if request.param == "local":
        b = pool_module.get_pool()
        if getattr(b, "name", None) != "local" or b.workers != 2:
            mpmagic.use_local(2)
        return pool_module.get_pool()
    raise ValueError(f"unknown backend {request.param}")


@pytest.fixture
def local_pool(method):
    """The pool for this test; make sure it is local with the test's method."""
    backend = pool_module.get_pool()
    if getattr(backend, "start_method", None) != method or backend.workers != 2:
        mpmagic.use_local(2, method)
    return pool_module.get_pool()


def leftover_processes() -> list[psutil.Process]:
    """Descendants of this process other than multiprocessing's own helpers.

    The forkserver and the resource tracker are direct children that
    multiprocessing keeps until the interpreter exits; everything else (our
    workers, kernels and Dask servers started by tests) must be gone.
    """
    me = psutil.Process(os.getpid())
    helpers = set()
    for p in me.children():
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "forkserver" in cmd or "resource_tracker" in cmd:
            helpers.add(p.pid)
    left = []
    for p in me.children(recursive=True):
        try:
            if p.pid not in helpers and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.Error:
            pass
    return left


def pytest_sessionfinish(session, exitstatus):
    """No worker may outlive the test run: stop everything, then check."""
    pool_module.shutdown()
    deadline = time.monotonic() + 10
    left = leftover_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = leftover_processes()
    if left:
        desc = [(p.pid, " ".join(p.cmdline())[:80]) for p in left if p.is_running()]
        print(f"\nLEAKED PROCESSES after the test session: {desc}")
        session.exitstatus = 1
