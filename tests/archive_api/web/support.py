"""The web UI under test, on the real parts of `stanzaguard run` minus the XMPP proxy.

`web_env` builds, in a fresh data directory: the real spool, the real indexer moving its
entries into the SQLite archive, the real quarantine service on that spool (so releasing
a held message through the UI is the same `ServiceReview` → `QuarantineService.release`
that `stanzaguard run` uses: a STATUS entry in the hash-chained spool, indexed back into
the archive), and the API service as `stanzaguard.api_wiring.ApiService` composes it,
with the web UI's router. The archive is filled through the spool, as the proxy fills
it, with the API tests' seed records plus a few hostile ones; the spool's head is signed
so message views have a checkpoint to prove against.

`signed_in` signs a client in through the real sign-in form (nonce cookie, hidden field).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import httpx

from archive_api.auth import Role
from archive_api.context import ApiContext
from archive_api.store.base import ArchiveStore
from archive_api.store.records import ArchiveRecord, Direction, RecordStatus
from archive_api.store.sqlite import SqliteStore
from archive_api.web import build_web_router
from classifier.clock import ManualClock
from classifier.verdict import Action
from proxy.indexer import Indexer
from proxy.spool import Spool
from stanzaguard.api_wiring import ApiService
from stanzaguard.quarantine import QuarantineService
from stanzaguard.settings import Settings
from stanzaguard.wiring import open_spool, open_store
from tests.archive_api.api_support import (
    NOW,
    OPERATOR,
    POLICY,
    ROLES,
    SESSION_SECRET,
    at,
    seed_records,
    verdict,
)
from tests.archive_api.store.conformance import rec_entry, record

HOSTILE_BODY = '<script>alert("body")</script><img src=x onerror="alert(1)">&amp; done'
HOSTILE_RESOURCE = "<script>alert('resource')</script>"
HOSTILE_RULE_DETAIL = '<b onmouseover="alert(3)">bold claim</b>'
CSRF_FIELD_PATTERN = re.compile(r'name="csrf_token" value="([^"]*)"')


def hostile_records() -> list[ArchiveRecord]:
    """Records whose text, JIDs and verdict reasons are markup an attacker chose."""
    hostile = record(
        "r-hostile",
        at=at(9),
        sender="mallory@evil.example",
        sender_resource=HOSTILE_RESOURCE,
        recipient="alice@corp.example",
        direction=Direction.TO_CLIENT,
        body=HOSTILE_BODY,
        subject="<i>subject</i>",
        action=Action.QUARANTINE,
        status=RecordStatus.HELD,
    )
    reasons = verdict(Action.QUARANTINE, "stranger").reasons
    hostile = replace(
        hostile,
        verdict=replace(
            verdict(Action.QUARANTINE, "stranger"),
            reasons=(replace(reasons[0], detail=HOSTILE_RULE_DETAIL),),
        ),
        raw=b"<message to='alice@corp.example'><body>&lt;script&gt;</body></message>",
    )
    return [hostile]


@dataclass
class WebEnv:
    service: ApiService
    spool: Spool
    indexer: Indexer
    indexer_store: ArchiveStore
    quarantine: QuarantineService
    clock: ManualClock
    secrets: dict[Role, str]
    data_dir: Path
    policy_path: Path

    @property
    def ctx(self) -> ApiContext:
        return self.service.context

    @property
    def store(self) -> SqliteStore:
        store = self.service.store
        assert isinstance(store, SqliteStore)  # these tests run the API on SQLite
        return store

    async def add_records(self, *records: ArchiveRecord) -> None:
        """Spool records as the proxy does and index them."""
        await self.spool.append([rec_entry(r).payload() for r in records])
        await self.indexer.drain()

    async def checkpoint(self) -> None:
        """Sign the spool's head and copy the checkpoint into the archive."""
        await self.spool.checkpoint()
        await self.indexer.drain()


@asynccontextmanager
async def web_env(
    tmp_path: Path,
    *,
    environment: Literal["production", "development"] = "production",
    seed: bool = True,
) -> AsyncIterator[WebEnv]:
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
    spool = await open_spool(settings, clock)
    indexer_store = await open_store(settings)
    indexer = Indexer(spool, indexer_store)
    quarantine = QuarantineService(
        data_dir,
        spool=spool,
        store=indexer_store,
        indexer=indexer,
        clock=clock,
        domains=["corp.example"],
        on_spooled=indexer.notify,
    )
    indexer.start()
    service: ApiService | None = None
    try:
        service = await ApiService.open(
            settings, clock, quarantine=quarantine, routers=(build_web_router(),)
        )
        secrets = {}
        for role in ROLES:
            issued = await service.context.tokens.create(
                OPERATOR, name=f"{role.value}-1", role=role
            )
            secrets[role] = issued.secret
        env = WebEnv(
            service,
            spool,
            indexer,
            indexer_store,
            quarantine,
            clock,
            secrets,
            data_dir,
            policy_path,
        )
        if seed:
            await env.add_records(*seed_records(), *hostile_records())
            await env.checkpoint()
        yield env
    finally:
        if service is not None:
            await service.close()
        await quarantine.stop()
        await indexer.stop()
        await spool.close()
        await indexer_store.close()


def client_for(env: WebEnv) -> httpx.AsyncClient:
    """A client over ASGI; https so the Secure session cookie is sent back."""
    transport = httpx.ASGITransport(app=env.service.app)
    return httpx.AsyncClient(
        transport=transport, base_url="https://testserver", headers={"Accept": "text/html"}
    )


def csrf_of(html: str) -> str:
    found = CSRF_FIELD_PATTERN.search(html)
    assert found is not None, "no csrf_token field on the page"
    return found.group(1)


async def signed_in(client: httpx.AsyncClient, secret: str) -> str:
    """Sign in through the sign-in form; returns the page's CSRF token for later forms."""
    form = await client.get("/ui/sign-in")
    assert form.status_code == 200, form.text
    answer = await client.post(
        "/ui/sign-in",
        data={"token": secret, "csrf_token": csrf_of(form.text), "next": "/ui/dashboard"},
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/ui/dashboard"
    page = await client.get("/ui/dashboard")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)
