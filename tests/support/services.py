"""Helpers for tests that start real servers and clients as subprocesses.

Everything here is about keeping real-server tests honest and tidy: a missing binary skips
(or fails under ``STANZAGUARD_REQUIRE_SERVICES=1``, which CI sets so that a broken image cannot
turn the integration suite into a row of skips), ports come from the kernel instead of being
guessed, and every process started is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn

import pytest

REQUIRE_SERVICES_ENV = "STANZAGUARD_REQUIRE_SERVICES"

#: How long a process gets to exit after SIGTERM before it is killed.
DEFAULT_GRACE_SECONDS = 5.0


def services_required() -> bool:
    """True when missing services must fail tests instead of skipping them."""
    return os.environ.get(REQUIRE_SERVICES_ENV, "") == "1"


def service_unavailable(reason: str) -> NoReturn:
    """Skip the current test, or fail it when services are required."""
    if services_required():
        pytest.fail(f"{reason} ({REQUIRE_SERVICES_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str) -> str:
    """Return the absolute path of ``name`` on PATH, or skip/fail the test."""
    found = shutil.which(name)
    if found is None:
        service_unavailable(f"{name!r} is not installed (see scripts/install-deps.sh)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago.

    Asking the kernel beats guessing, but the port is released before the caller binds it, so
    another process could in principle take it in between; the servers started from it fail
    loudly in that case rather than talking to a stranger.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 15.0,
    *,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until something accepts TCP connections on ``host:port``.

    With ``process`` given, give up at once if it exits: waiting out the whole timeout for a
    server that already died only hides the reason in a slower failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ProcessExitedError(
                f"process {process.pid} exited with {process.returncode} "
                f"before {host}:{port} opened"
            )
        if port_is_open(host, port):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
        time.sleep(0.02)


class ProcessExitedError(RuntimeError):
    """A server process ended while we were waiting for it to become ready."""


def stop_pid(proc: subprocess.Popen[bytes], grace: float = DEFAULT_GRACE_SECONDS) -> int | None:
    """Stop ``proc`` by its PID: SIGTERM, then SIGKILL once ``grace`` seconds have passed.

    Returns the exit status (negative for a signal), or None if it could not be reaped.
    """
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        return None


@dataclass
class ManagedProcess:
    """A long-running child process whose output goes to a log file."""

    argv: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = DEFAULT_GRACE_SECONDS) -> int | None:
        try:
            return stop_pid(self.popen, grace)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-max_chars:]

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_process(
    argv: Sequence[str],
    *,
    log_path: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    group: str | None = None,
) -> ManagedProcess:
    """Start ``argv`` with stdout and stderr appended to ``log_path``.

    ``user``/``group`` switch identity in the child itself (Popen's setuid/setgid), so the PID we
    hold is the server's own PID. A wrapper such as ``runuser`` would hold the PID instead and,
    on SIGTERM, sleep two seconds before killing its child outright: slower, and not a clean stop.
    """
    log_file = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
            # Own process group, so a Ctrl-C aimed at pytest does not also hit the server
            # halfway through a test; teardown stops it properly.
            start_new_session=True,
        )
    except BaseException:
        log_file.close()
        raise
    return ManagedProcess(tuple(argv), popen, log_path, log_file)


# -- leftovers of test runs that died without teardown ---------------------------------------

OWNER_FILE = "owner.pid"
SERVER_PID_FILE = "server.pid"


def claim_directory(directory: Path) -> None:
    """Record that this test process owns ``directory`` (see :func:`reap_abandoned`)."""
    (directory / OWNER_FILE).write_text(f"{os.getpid()}\n")


def record_server_pid(directory: Path, pid: int) -> None:
    (directory / SERVER_PID_FILE).write_text(f"{pid}\n")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; it is dead for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _cmdline_mentions(pid: int, needle: str) -> bool:
    try:
        return needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def reap_abandoned(base: Path, prefix: str, grace: float = DEFAULT_GRACE_SECONDS) -> list[Path]:
    """Stop servers and remove directories left by test processes that no longer exist.

    A pytest run killed by SIGKILL or SIGPIPE never reaches fixture teardown, so its servers
    keep running. Only a directory whose recorded owner is dead is touched, and its server is
    signalled only if that PID's command line still names the directory (PIDs get reused), so
    concurrent test runs never hurt each other.
    """
    reaped: list[Path] = []
    for directory in sorted(base.glob(f"{prefix}*")):
        owner = _read_pid(directory / OWNER_FILE)
        if owner is None or pid_alive(owner):
            continue
        server = _read_pid(directory / SERVER_PID_FILE)
        if server is not None and pid_alive(server) and _cmdline_mentions(server, str(directory)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while pid_alive(server) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(server):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)
        reaped.append(directory)
    return reaped
