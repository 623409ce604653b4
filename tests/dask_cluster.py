"""A real Dask cluster for the tests: ``dask scheduler`` and ``dask worker``
processes on 127.0.0.1, started as the user would start them.

Each process gets its own session (``start_new_session=True``), so a
notebook interrupt (SIGINT to the test's process group) never reaches them,
and :meth:`DaskProcesses.stop` ends each whole process group (the worker's
nanny and the worker processes it runs), so nothing outlives the tests. If the
test run itself is killed (no teardown runs), Linux ends each command too:
it asks for SIGTERM at its parent's death (``prctl(PR_SET_PDEATHSIG)``, see
``_DIE_WITH_PARENT``), and dask's commands stop their nannies on SIGTERM.

The nannies start their worker processes from a forkserver that has imported
``distributed`` (``distributed.worker.multiprocessing-method: forkserver``, a
setting of Dask's own), not by spawn: a worker a test killed is back in a
fraction of a second instead of the 1-3 s a fresh interpreter takes to import
``distributed`` on a loaded machine, and the worker-death tests wait for those
restarts again and again. What mpmagic sees of a worker is the same either way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

# Run ``python -m dask ...`` after asking Linux for SIGTERM when the test
# process dies (PR_SET_PDEATHSIG = 1); a parent already gone means exit at once.
_DIE_WITH_PARENT = (
    "import ctypes, os, runpy, signal, sys\n"
    "parent = int(sys.argv.pop(1))\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)\n"
    "if os.getppid() != parent:\n"
    "    sys.exit('the test run that started this dask command is gone')\n"
    "sys.argv[0] = 'dask'\n"
    "runpy.run_module('dask', run_name='__main__', alter_sys=True)\n"
)


class DaskProcesses:
    """A scheduler and ``n_commands`` ``dask worker`` commands, each running
    ``per_command`` single-threaded worker processes (``--nworkers``)."""

    def __init__(
        self,
        workdir: Path,
        n_commands: int = 2,
        per_command: int = 1,
        protocol: str = "tcp",
        tls: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.n_commands = n_commands
        self.per_command = per_command
        self.n_workers = n_commands * per_command
        self.protocol = protocol
        self.tls = tls or {}
        self.env = {**os.environ, "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "forkserver", **(env or {})}
        self.scheduler_file = str(self.workdir / "scheduler.json")
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, str] = {}  # (a command's pid: its log's name)
        self.address = ""

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        return ["--tls-ca-file", self.tls["ca"], "--tls-cert", self.tls["cert"], "--tls-key", self.tls["key"]]

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.workdir / log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def start(self, timeout: float = 60.0) -> DaskProcesses:
        """Start everything; return once all workers have joined (or raise)."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        Path(self.scheduler_file).unlink(missing_ok=True)  # (the workers find the scheduler by this file)
        scheduler = self._spawn(
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--protocol", self.protocol,
             "--no-dashboard", "--scheduler-file", self.scheduler_file, *self._tls_args()],
            "scheduler.log",
        )
        # The worker commands start alongside the scheduler, not after it: each waits for the
        # scheduler file (``--scheduler-file``), so their imports of distributed overlap the
        # scheduler's (a start took one interpreter's start-up longer, 1-2 s on a loaded machine).
        for i in range(self.n_commands):
            self._spawn(
                ["worker", "--scheduler-file", self.scheduler_file, "--nworkers", str(self.per_command),
                 "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                 "--local-directory", str(self.workdir / f"w{i}"), *self._tls_args()],
                f"worker{i}.log",
            )
        while not self.address:
            if scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start: {self.log('scheduler.log')}")
            try:
                self.address = json.loads(Path(self.scheduler_file).read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        if self.n_workers:  # (a scheduler alone: nothing to wait for)
            self.wait_for_workers(self.n_workers, deadline - time.monotonic())

    def security(self) -> Any:
        if not self.tls:
            return None
        from distributed.security import Security

        return Security(tls_ca_file=self.tls["ca"], tls_client_cert=self.tls["cert"],
                        tls_client_key=self.tls["key"], require_encryption=True)

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> None:
        from distributed import Client

        kwargs = {"security": self.security()} if self.tls else {}
        with Client(self.address, timeout=max(timeout, 5), set_as_default=False, **kwargs) as client:
            client.wait_for_workers(n, timeout=max(timeout, 5))

    def log(self, name: str) -> str:
        try:
            return (self.workdir / name).read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> list[str]:
        """End every process this started, in Dask's own order; return what
        had to be killed (nothing, when each process ended on its SIGTERM).

        First each ``dask worker`` command alone gets a SIGTERM: its nannies
        close their worker processes (which tell the scheduler, still up, that
        they leave) and the command exits. Its workers must not get that SIGTERM
        too (a SIGTERM to the whole group did): a worker that died before its
        nanny had handled the signal was, to the nanny, a worker that died, and
        it started another, which its close then waited for. Then the
        scheduler, once no worker is left to tell it anything.

        Then a wait until every process of the groups has gone but
        multiprocessing's resource tracker (a nanny's queues are named
        semaphores in /dev/shm: the tracker unlinks those its dead processes
        left, once the last of them has exited, and it ignores SIGTERM). SIGKILL
        only for what is still there after that: a SIGKILL to the whole group at
        once killed the tracker mid-cleanup and left a nanny's 6 semaphores behind.
        """
        groups = [p.pid for p in self.procs]
        self._stop_commands(self.procs[1:], "End worker")
        self._stop_commands(self.procs[:1], "End scheduler")
        _wait_until(lambda: not _non_trackers(groups), 10)
        killed = []
        for q in _non_trackers(groups):
            killed.append(_describe(q))
            _kill(q)
        _wait_until(lambda: not _members(groups), 5)  # (the trackers: unlink, then exit)
        for p in self.procs:
            _signal_group(p, signal.SIGKILL)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        return killed

    def _stop_commands(self, commands: list[subprocess.Popen], last_line: str) -> None:
        """SIGTERM to each command alone; once each has closed what it runs (logged
        ``last_line``), SIGTERM to its whole group: what is left is the command's
        exit (~1 s collecting its garbage; dask's handler is gone after the first
        signal) and, for ``dask worker``, its fork server."""
        for p in commands:
            _signal(p, signal.SIGTERM)
        _wait_until(lambda: all(p.poll() is not None or last_line in self.log(self.logs[p.pid]) for p in commands), 10)
        for p in commands:
            _signal_group(p, signal.SIGTERM)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the command alone (nothing once it has exited and been reaped)."""
    try:
        proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def _non_trackers(groups: list[int]) -> list[psutil.Process]:
    return [q for q in _members(groups) if not _is_tracker(q)]


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid}: {' '.join(proc.cmdline())[:100]}"
    except psutil.Error:
        return str(proc.pid)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _members(groups: list[int]) -> list[psutil.Process]:
    """The live processes of these process groups (zombies, dead but not yet reaped, are not)."""
    found = []
    for q in psutil.process_iter():
        try:
            if os.getpgid(q.pid) in groups and q.status() != psutil.STATUS_ZOMBIE:
                found.append(q)
        except (OSError, psutil.Error):
            pass
    return found


def _is_tracker(proc: psutil.Process) -> bool:
    try:
        return "resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _kill(proc: psutil.Process) -> None:
    try:
        proc.kill()
    except psutil.Error:
        pass


def _wait_until(done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def make_certificates(directory: Path) -> dict[str, str]:
    """A throw-away CA and one certificate for 127.0.0.1 (server and client use).

    Dask's TLS is mutual: the scheduler, the workers and the client each show
    a certificate signed by the CA; one certificate with both uses serves all.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mpmagic test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    return {k: str(v) for k, v in paths.items()}
