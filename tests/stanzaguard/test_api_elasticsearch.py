"""The API on store=elasticsearch (issue 6): the real composition (`ApiService`) on
osmem-server, an httpx client over ASGI. Search, a read that is audited, a legal hold, an
export of it, and the audit log, all kept in Elasticsearch; nothing in a SQLite file beside."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from archive_api.auth import AuthMethod, Identity, Role
from archive_api.store.elasticsearch import ElasticsearchStore
from classifier.clock import ManualClock
from stanzaguard.api_wiring import ApiService, serve_api
from stanzaguard.settings import Settings, load_settings
from tests.archive_api.store.conformance import ChainWriter, record
from tests.stanzaguard import es_support
from tests.stanzaguard.es_support import EsLocation

osmem_server = es_support.osmem_server
es_client = es_support.es_client
es_location = es_support.es_location

API = "/api/v1"
NOW = datetime(2026, 1, 20, 9, 0, tzinfo=UTC)
OPERATOR = Identity("cli:tester", "tester", Role.ADMIN, AuthMethod.CLI)


@pytest.fixture
async def api(
    tmp_path: Path, es_location: EsLocation
) -> AsyncIterator[tuple[ApiService, httpx.AsyncClient, dict[str, str]]]:
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\nlocal_domains = ["corp.example"]\n')
    settings = Settings(
        data_dir=tmp_path / "data",
        policy=policy,
        domain=["corp.example"],
        store="elasticsearch",
        es_url=[es_location.url],
        es_index_prefix=es_location.prefix,
        environment="development",
        session_secret="test-session-secret-0123456789-abcdefghij",
    )
    service = await ApiService.open(settings, ManualClock(NOW), routers=())
    try:
        issued = await service.context.tokens.create(OPERATOR, name="officer-1", role=Role.OFFICER)
        transport = httpx.ASGITransport(app=service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield service, client, {"Authorization": f"Bearer {issued.secret}"}
    finally:
        await service.close()


async def test_search_read_hold_export_and_audit_on_elasticsearch(
    api: tuple[ApiService, httpx.AsyncClient, dict[str, str]], tmp_path: Path
) -> None:
    service, client, auth = api
    store = service.store
    assert isinstance(store, ElasticsearchStore)
    await store.apply(
        ChainWriter().records(
            record("r1", body="quarterly numbers attached"),
            record("r2", body="lunch?", sender="mallory@bad.example"),
        )
    )
    found = await client.get(f"{API}/search", params={"q": "quarterly"}, headers=auth)
    assert found.status_code == 200, found.text
    assert [hit["record_id"] for hit in found.json()["hits"]] == ["r1"]
    assert (await client.get(f"{API}/search", params={"q": "x"})).status_code == 401
    hostile = await client.get(f"{API}/search", params={"q": 'from: "unclosed'}, headers=auth)
    assert hostile.status_code == 400
    read = await client.get(f"{API}/messages/r1", headers=auth)
    assert read.status_code == 200, read.text
    held = await client.post(
        f"{API}/holds",
        json={"case_name": "Case 7", "scope": {"kind": "person", "jid": "*@bad.example"}},
        headers=auth,
    )
    assert held.status_code == 201, held.text
    hold_id = held.json()["hold_id"]
    assert await store.holds_covering(["r1", "r2"]) == {"r2": (hold_id,)}
    started = await client.post(
        f"{API}/exports", json={"hold_id": hold_id, "format": "jsonl"}, headers=auth
    )
    assert started.status_code == 202, started.text
    jobs = service.context.export_jobs
    assert jobs is not None
    await jobs.wait(started.json()["job_id"])
    job: dict[str, Any] = (
        await client.get(f"{API}/exports/{started.json()['job_id']}", headers=auth)
    ).json()
    assert (job["state"], job["written"]) == ("done", 1)
    await service.context.audit.flush()
    events = (await store.audit_events(newest_first=False, limit=100)).events
    actions = [e.action for e in events]
    for wanted in ("search", "view", "hold", "export"):
        assert any(a.startswith(wanted) for a in actions), actions
    assert all(e.actor in ("token:officer-1", "cli:tester") for e in events)
    assert (await store.verify_audit()).ok
    # The audit log, tokens and holds are in Elasticsearch, not in a SQLite file beside it.
    assert not (tmp_path / "data" / "archive.sqlite3").exists()


def test_the_api_alone_serves_the_elasticsearch_store(
    tmp_path: Path, es_location: EsLocation
) -> None:
    settings = load_settings(
        store="elasticsearch",
        es_url=[es_location.url],
        es_index_prefix=es_location.prefix,
        data_dir=tmp_path,
        environment="development",
        session_secret="test-session-secret-0123456789-abcdefghij",
    )

    async def serve_then_stop() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(serve_api(settings, "127.0.0.1:0", ready))
        done, _ = await asyncio.wait(
            [task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        assert task not in done, task.exception()  # it started rather than refused
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(serve_then_stop())
