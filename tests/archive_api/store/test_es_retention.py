"""Retention and purge on the Elasticsearch store where it differs from SQLite: no
transactions, so the retention index is the authority and the records documents carry a copy;
a purge that stopped half-way is resumed; tombstones are checked against recorded purges.
These tests reach around the store to simulate crashes and tampering."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from elasticsearch import AsyncElasticsearch

from archive_api.store.base import HoldRecord, RetentionAssignment, Tombstone
from archive_api.store.elasticsearch import INDEX_KINDS, ElasticsearchStore
from tests.archive_api.store.conformance import DAY, T0, ChainWriter, corpus, record
from tests.support.opensearch import SearchServer, drop_prefix

NOW = T0 + timedelta(days=400)
PAST = NOW - DAY
LATER = NOW + 365 * DAY


@pytest.fixture
async def es_client(search_server: SearchServer) -> AsyncIterator[AsyncElasticsearch]:
    client = AsyncElasticsearch(search_server.url)
    yield client
    await client.close()


@pytest.fixture
async def store(
    search_server: SearchServer, es_client: AsyncElasticsearch
) -> AsyncIterator[ElasticsearchStore]:
    prefix = f"sgret-{uuid.uuid4().hex[:12]}"
    opened = await ElasticsearchStore.open(search_server.url, index_prefix=prefix)
    await opened.apply(ChainWriter().records(*corpus()))
    yield opened
    await opened.close()
    await drop_prefix(es_client, prefix, INDEX_KINDS)


async def _doc_id(client: AsyncElasticsearch, index: str, record_id: str) -> str:
    found = await client.search(index=index, query={"term": {"record_id": record_id}}, size=2)
    [hit] = found["hits"]["hits"]
    doc_id: str = hit["_id"]
    return doc_id


async def test_a_forged_tombstone_is_found(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    ledger = store.index("ledger")
    found = await es_client.search(index=ledger, query={"term": {"seq": 3}}, size=1)
    [hit] = found["hits"]["hits"]
    forged = Tombstone("r03", NOW, "short", PAST).payload()
    await es_client.update(
        index=ledger,
        id=hit["_id"],
        doc={"payload": base64.b64encode(forged).decode(), "op": "tombstone"},
        refresh=True,
    )
    report = await store.verify()
    problems = {(p.seq, p.problem) for p in report.problems}
    assert (3, "tombstone names no recorded purge") in problems


async def test_a_purge_that_stopped_half_way_is_completed(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    await store.set_retention([RetentionAssignment("r02", "short", PAST)], assigned_at=T0)
    # The first step of a purge (marking the retention document) happened, then a crash.
    retention = store.index("retention")
    doc_id = await _doc_id(es_client, retention, "r02")
    stopped_at = NOW - timedelta(hours=1)
    await es_client.update(
        index=retention,
        id=doc_id,
        doc={"purged_us": int(stopped_at.timestamp() * 1e6)},
        refresh=True,
    )
    batch = await store.purge(NOW)
    assert [p.record_id for p in batch.purged] == ["r02"]
    assert await store.get("r02") is None
    state = await store.retention_of("r02")
    assert state is not None and state.purged_at == stopped_at  # the purge it finished
    report = await store.verify()
    assert report.ok, report.problems


async def test_an_earlier_copy_of_the_expiry_never_purges_early(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    await store.set_retention([RetentionAssignment("r02", "long", LATER)], assigned_at=T0)
    # A writer stopped between the two writes of an extension (or someone edited the copy).
    records = store.index("records")
    doc_id = await _doc_id(es_client, records, "r02")
    await es_client.update(
        index=records, id=doc_id, doc={"expires_us": int(PAST.timestamp() * 1e6)}, refresh=True
    )
    batch = await store.purge(NOW)
    assert batch.purged == ()
    assert await store.get("r02") is not None
    # The copy was repaired from the authority, so the next purge does not pick it again.
    due = await store.retention_subjects(expiring_by=NOW)
    assert due.subjects == ()


async def test_a_record_purged_then_indexed_again_is_found(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    records = store.index("records")
    doc_id = await _doc_id(es_client, records, "r02")
    saved = (await es_client.get(index=records, id=doc_id))["_source"]
    await store.set_retention([RetentionAssignment("r02", "short", PAST)], assigned_at=T0)
    await store.purge(NOW)
    # Someone puts the records document back by hand.
    await es_client.index(index=records, id=doc_id, document=saved, refresh=True)
    report = await store.verify()
    assert any(p.record_id == "r02" for p in report.problems)


async def test_purge_by_hold_on_fresh_records(store: ElasticsearchStore) -> None:
    # A record indexed after the hold was placed is covered too (holds are queries).
    await store.add_hold(
        HoldRecord("h1", "Case", "o@corp.example", T0, "{}", "from:late@x.example")
    )
    await store.apply(
        ChainWriter().records(record("late", sender="late@x.example")), chain="proxy-2"
    )
    await store.set_retention([RetentionAssignment("late", "short", PAST)], assigned_at=T0)
    batch = await store.purge(NOW, counts=True)
    assert batch.purged == () and batch.held_back == 1
    assert await store.holds_covering(["late"]) == {"late": ("h1",)}
