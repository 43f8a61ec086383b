"""A throwaway `redis-server` (Debian's package) on a free loopback port, for real-Redis tests.

No persistence (``--save ''``, ``--appendonly no``): a stop loses everything, which is what the
fault tests want from a Redis restart. The server runs in the foreground as our child and is
stopped by its PID. A missing binary skips the test, or fails it under
``STANZAGUARD_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.services import (
    ManagedProcess,
    claim_directory,
    free_port,
    record_server_pid,
    require_binary,
    start_process,
    wait_for_port,
)

HOST = "127.0.0.1"


@dataclass
class RedisServer:
    """One redis-server process; `stop()` and `start()` again keep its port and directory."""

    binary: str
    directory: Path
    port: int
    process: ManagedProcess | None = field(default=None)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def start(self) -> None:
        if self.running:
            return
        argv = (
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.directory),
            # Names the directory on the command line, so `reap_abandoned` can recognise it.
            "--logfile",
            str(self.directory / "redis.log"),
        )
        self.process = start_process(argv, log_path=self.directory / "stdout.log")
        record_server_pid(self.directory, self.process.pid)
        try:
            wait_for_port(HOST, self.port, timeout=15.0, process=self.process.popen)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def log_tail(self, max_chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "redis.log").read_text(errors="replace")[-max_chars:]
        return ""


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """Start redis-server in ``directory`` (created) and stop it afterwards, whatever happens."""
    binary = require_binary("redis-server")
    directory.mkdir(parents=True, exist_ok=True)
    claim_directory(directory)
    server = RedisServer(binary, directory, free_port(HOST))
    server.start()
    try:
        yield server
    finally:
        server.stop()
