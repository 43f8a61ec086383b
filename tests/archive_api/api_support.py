"""The API under test: the real composition (`stanzaguard.api_wiring.ApiService`) on a real
SQLite store in a temporary data directory, an httpx client over ASGI, one API token per
role, and a small archive written through the store's `apply` as the indexer writes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from archive_api.audit import AuditLog
from archive_api.auth import AuthMethod, Identity, Role
from archive_api.context import ApiContext
from archive_api.store.audit import AuditEvent
from archive_api.store.chain import CheckpointSigner
from archive_api.store.records import ArchiveRecord, Direction, RecordStatus, SpoolEntry
from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from classifier.verdict import Action, Reason, Verdict
from stanzaguard.api_wiring import ApiService, MailboxReview
from stanzaguard.keys import load_or_create_signer
from stanzaguard.quarantine import FileChannel
from stanzaguard.settings import Settings
from tests.archive_api.store.conformance import ChainWriter, rec_entry, record

T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
NOW = datetime(2026, 1, 20, 9, 0, tzinfo=UTC)
SESSION_SECRET = "test-session-secret-0123456789-abcdefghij"
ROLES = (Role.ADMIN, Role.OFFICER, Role.AUDITOR)
POLICY = 'version = 1\nlocal_domains = ["corp.example"]\n'
OPERATOR = Identity("cli:tester", "tester", Role.ADMIN, AuthMethod.CLI)


def verdict(action: Action, *rules: str) -> Verdict:
    reasons = tuple(Reason(rule, f"{rule} said {action.value}", 1.0, action) for rule in rules)
    return Verdict(action, 1.0 if action is not Action.ALLOW else 0.0, reasons)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def seed_records() -> list[ArchiveRecord]:
    """A small archive: a 1:1 conversation with a correction and a retraction, a room, and
    quarantined, rejected, dropped and flagged messages from strangers."""
    alice = "alice@corp.example"
    bob = "bob@partner.example"
    return [
        record("r-alice-1", at=at(0), body="we guarantee a return on this deal"),
        record(
            "r-bob-1",
            at=at(1),
            sender=bob,
            recipient=alice,
            direction=Direction.TO_CLIENT,
            body="sounds good, lunch on friday",
        ),
        record(
            "r-alice-2",
            at=at(2),
            body="we guarantee returns (corrected)",
            replaces_id="id-r-alice-1",
        ),
        record(
            "r-bob-2",
            at=at(3),
            sender=bob,
            recipient=alice,
            direction=Direction.TO_CLIENT,
            body=None,
            retracts_id="id-r-bob-1",
        ),
        replace(
            record(
                "r-held",
                at=at(4),
                sender="eve@spam.example",
                recipient=alice,
                direction=Direction.TO_CLIENT,
                body="cheap pills at http://pills.example",
                action=Action.QUARANTINE,
                status=RecordStatus.HELD,
            ),
            verdict=verdict(Action.QUARANTINE, "stranger", "model"),
        ),
        replace(
            record(
                "r-rejected",
                at=at(5),
                sender="mallory@bad.example",
                recipient=alice,
                direction=Direction.TO_CLIENT,
                body="hello from a denied domain",
                action=Action.REJECT,
                status=RecordStatus.REJECTED,
            ),
            verdict=verdict(Action.REJECT, "federation"),
        ),
        replace(
            record(
                "r-dropped",
                at=at(6),
                sender="bot@bad.example",
                recipient=alice,
                direction=Direction.TO_CLIENT,
                body="spam spam",
                action=Action.DROP,
                status=RecordStatus.DROPPED,
            ),
            verdict=verdict(Action.DROP, "blocklist", "federation"),
        ),
        replace(
            record(
                "r-flagged",
                at=at(7),
                sender="carol@corp.example",
                recipient=bob,
                body="guaranteed profit, tell nobody",
                action=Action.FLAG,
            ),
            verdict=verdict(Action.FLAG, "lexicon"),
        ),
        record(
            "r-room",
            at=at(8),
            recipient="desk@conference.corp.example",
            stanza_type="groupchat",
            room="desk@conference.corp.example",
            body="morning desk",
        ),
    ]


@dataclass
class ApiEnv:
    service: ApiService
    client: httpx.AsyncClient
    clock: ManualClock
    secrets: dict[Role, str]
    data_dir: Path
    policy_path: Path
    signer: CheckpointSigner
    writer: ChainWriter

    @property
    def ctx(self) -> ApiContext:
        return self.service.context

    @property
    def store(self) -> SqliteStore:
        store = self.service.store
        assert isinstance(store, SqliteStore)  # these tests run the API on SQLite
        return store

    @property
    def audit(self) -> AuditLog:
        return self.ctx.audit

    def auth(self, role: Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[role]}"}

    async def add(self, *entries: SpoolEntry) -> None:
        await self.store.apply(self.writer.add(*entries))

    async def add_records(self, *records: ArchiveRecord) -> None:
        await self.add(*(rec_entry(r) for r in records))

    async def checkpoint(self) -> None:
        """Sign the chain's head, as the spool does at its checkpoints."""
        await self.store.add_checkpoint(
            self.signer.sign("spool", self.writer.seq, self.writer.head)
        )

    async def events(self) -> list[AuditEvent]:
        """Every audit event, oldest first (read from the store, not through the API)."""
        await self.audit.flush()
        page = await self.store.audit_events(newest_first=False, limit=1000)
        return list(page.events)

    async def get(self, role: Role | None, path: str, **kwargs: Any) -> httpx.Response:
        headers = self.auth(role) if role is not None else {}
        return await self.client.get(path, headers=headers, **kwargs)

    async def post(self, role: Role | None, path: str, **kwargs: Any) -> httpx.Response:
        headers = self.auth(role) if role is not None else {}
        return await self.client.post(path, headers=headers, **kwargs)


@asynccontextmanager
async def api_env(
    tmp_path: Path,
    *,
    seed: bool = True,
    environment: str = "production",
    mailbox_wait: float = 0.05,
) -> AsyncIterator[ApiEnv]:
    data_dir = tmp_path / "data"
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(POLICY)
    settings = Settings(
        data_dir=data_dir,
        policy=policy_path,
        domain=["corp.example"],
        environment=environment,
        session_secret=SESSION_SECRET,
    )
    clock = ManualClock(NOW)
    service = await ApiService.open(settings, clock, routers=())
    service.context.review = MailboxReview(FileChannel(data_dir), service.store, wait=mailbox_wait)
    try:
        secrets = {}
        for role in ROLES:
            issued = await service.context.tokens.create(
                OPERATOR, name=f"{role.value}-1", role=role
            )
            secrets[role] = issued.secret
        transport = httpx.ASGITransport(app=service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            env = ApiEnv(
                service,
                client,
                clock,
                secrets,
                data_dir,
                policy_path,
                load_or_create_signer(data_dir / "keys"),
                ChainWriter(),
            )
            if seed:
                await env.add_records(*seed_records())
                await env.checkpoint()
            yield env
    finally:
        await service.close()
