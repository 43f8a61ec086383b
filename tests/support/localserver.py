"""What the test Prosody and the test ejabberd have in common, written once.

Both are a server process of ours, run as the package's system user when we are root, with
its config, data and logs in a directory of its own, and accounts on one domain. How each is
configured, started and administered stays in ``prosody.py`` and ``ejabberd.py``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from tests.support.services import DEFAULT_GRACE_SECONDS, ManagedProcess

LOOPBACK = "127.0.0.1"


class LocalXmppServer(ABC):
    """A server process started by a test, stopped by its PID, its files in ``directory``.

    A subclass sets the attributes below in ``__init__`` and provides ``start()`` and
    ``register()``.
    """

    host = LOOPBACK
    #: How long the server gets to shut down after SIGTERM before it is killed.
    stop_grace: float = DEFAULT_GRACE_SECONDS

    directory: Path
    domain: str
    log_path: Path
    console_log_path: Path
    users: dict[str, str]
    _process: ManagedProcess | None
    #: The system user the server runs as (we are root), or None to run as ourselves.
    _run_user: str | None

    # -- lifecycle -------------------------------------------------------------------------

    @abstractmethod
    def start(self) -> None:
        """Start the server and return once it serves clients."""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self) -> int | None:
        """Stop the server by its PID (SIGTERM, then SIGKILL); return its exit status."""
        if self._process is None:
            return None
        proc, self._process = self._process, None
        return proc.stop(grace=self.stop_grace)

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- logs ------------------------------------------------------------------------------

    def diagnostic_logs(self) -> tuple[Path, ...]:
        """The files whose tails ``diagnostics()`` shows."""
        return (self.console_log_path, self.log_path)

    def diagnostics(self, max_chars: int = 4000) -> str:
        """The tail of each log file, for a failing test's report."""
        parts = []
        for path in self.diagnostic_logs():
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            parts.append(f"--- {path.name} ---\n{text[-max_chars:]}")
        return "\n".join(parts)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- accounts --------------------------------------------------------------------------

    def jid(self, user: str, resource: str | None = None) -> str:
        bare = f"{user}@{self.domain}"
        return f"{bare}/{resource}" if resource else bare

    @abstractmethod
    def register(self, user: str, password: str) -> None:
        """Create ``user`` on ``domain`` and remember the password in ``users``."""

    def register_many(self, users: Mapping[str, str]) -> None:
        for user, password in users.items():
            self.register(user, password)

    def register_fresh(self, *roles: str) -> dict[str, str]:
        """Register one new account per role (``alice`` -> ``alice-1f3a9c``); role -> user.

        Tests sharing one server (the session-wide ejabberd) get accounts nobody else has
        touched: no leftover offline messages, roster entries or sessions.
        """
        chosen: dict[str, str] = {}
        for role in roles:
            user = f"{role}-{uuid.uuid4().hex[:8]}"
            self.register(user, f"{user}-secret")
            chosen[role] = user
        return chosen

    # -- internals -------------------------------------------------------------------------

    def _hand_over_directory(self) -> None:
        """Give the server's directory to the user the server runs as."""
        if self._run_user is None:
            return
        entry = pwd.getpwnam(self._run_user)
        for root, dirs, files in os.walk(self.directory):
            os.chown(root, entry.pw_uid, entry.pw_gid)
            for name in (*dirs, *files):
                os.chown(
                    os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False
                )
