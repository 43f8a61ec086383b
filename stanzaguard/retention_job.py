"""The service's own retention job: classify new records, then purge what is due, on a timer.

`stanzaguard run` starts it when `retention_file` is set, on the configured store (SQLite or
Elasticsearch). Each round is exactly what
`stanzaguard purge` does (`retention_ops.purge`: extend-only classification, holds win, one
audited batch at a time), acting as ``system:retention`` in the admin role. A round that fails
is logged and tried again at the next interval; nothing is purged without its audit event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from archive_api.auth import AuthMethod, Identity, Role
from classifier.clock import Clock
from stanzaguard.operations import Paths
from stanzaguard.retention_ops import PurgeOutcome, load_retention, purge
from stanzaguard.stores import StoreSpec

log = logging.getLogger(__name__)

SYSTEM_IDENTITY = Identity(
    "system:retention", "retention job (stanzaguard run)", Role.ADMIN, AuthMethod.CLI
)


class RetentionJob:
    def __init__(
        self,
        paths: Paths,
        retention_file: Path,
        *,
        policy_file: Path | None,
        clock: Clock,
        interval: float,
        purge_due: bool = True,
        store_spec: StoreSpec | None = None,
        local_domains: frozenset[str] = frozenset(),
    ) -> None:
        self.paths = paths
        self.local_domains = local_domains  # the served domains (see load_retention)
        self.retention_file = retention_file
        self.policy_file = policy_file
        self.clock = clock
        self.interval = interval
        self.purge_due = purge_due
        self.store_spec = store_spec  # the configured store; None: the data directory's SQLite
        self.rounds = 0
        self.failures = 0
        self.last: PurgeOutcome | None = None
        self._task: asyncio.Task[None] | None = None

    def check(self) -> None:
        """Read the retention policy once, so a broken file stops start-up."""
        load_retention(self.retention_file, self.policy_file, self.local_domains)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention job")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_once(self) -> PurgeOutcome:
        # Re-read every round: the policy may have changed since the last one.
        retention = load_retention(self.retention_file, self.policy_file, self.local_domains)
        outcome = await purge(
            self.paths,
            clock=self.clock,
            retention=retention,
            dry_run=not self.purge_due,
            identity=SYSTEM_IDENTITY,
            store_spec=self.store_spec,
        )
        self.rounds += 1
        self.last = outcome
        log.info(
            "retention round",
            extra={
                "classified": outcome.classified.update.assigned if outcome.classified else 0,
                "purged": outcome.purged,
                "held_back": outcome.held_back,
            },
        )
        return outcome

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures += 1
                log.exception("retention round failed; trying again at the next interval")
            await asyncio.sleep(self.interval)
