"""Reads the policy file and swaps a new policy in when the file changes (no restart)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tomllib
from pathlib import Path
from typing import Any

from classifier.errors import PolicyError
from classifier.policy import Policy, PolicyHolder, policy_from_dict

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 16 * 1024 * 1024


def load_policy(path: Path | None, local_domains: frozenset[str]) -> Policy:
    """The policy in `path`, or an allow-all policy when there is none.

    The served domains are local unless the file lists `local_domains` itself.
    """
    data: dict[str, Any] = {"version": 1}
    if path is not None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None
        if len(raw) > MAX_POLICY_BYTES:
            raise PolicyError(f"policy file {path} is larger than {MAX_POLICY_BYTES} bytes")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"policy file {path}: {exc}") from None
    if "local_domains" not in data:
        data["local_domains"] = sorted(local_domains)
    return policy_from_dict(data)


class PolicyFileWatcher:
    """Polls the file's modification time; a bad new version keeps the old policy in force."""

    def __init__(
        self, path: Path, holder: PolicyHolder, local_domains: frozenset[str], interval: float = 1.0
    ) -> None:
        self.path = path
        self.holder = holder
        self.local_domains = local_domains
        self.interval = interval
        self._stamp = self._current_stamp()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.errors = 0

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def check(self) -> bool:
        """Reload if the file changed; return whether a new policy is in force."""
        stamp = self._current_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            policy = load_policy(self.path, self.local_domains)
        except PolicyError as exc:
            self.errors += 1
            log.error(
                "policy file rejected; the previous policy stays in force",
                extra={"path": str(self.path), "error": str(exc)},
            )
            return False
        self.holder.replace(policy)
        self.reloads += 1
        log.info("policy reloaded", extra={"fingerprint": self.holder.current.fingerprint})
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
