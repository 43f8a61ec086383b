"""Rollover and the duplicate ledger on the Elasticsearch store.

Create-only `_id`s de-duplicate within one backing index only. These tests roll `ledger` and
`records` over (the server's rollover API, or on osmem-server, which has none, a new index
and the alias moved, as `roll_over` does there) and check that a retried batch, a replay of
a record from another chain, and every read, update and purge still see one copy."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from elasticsearch import AsyncElasticsearch

from archive_api.store.base import RetentionAssignment
from archive_api.store.elasticsearch import INDEX_KINDS, Capabilities, ElasticsearchStore
from archive_api.store.errors import InvalidRequest
from tests.archive_api.store.conformance import (
    DAY,
    T0,
    ChainWriter,
    rec_entry,
    record,
    search_all,
)
from tests.support.opensearch import SearchServer, drop_prefix

EXPECTED = {
    "osmem": Capabilities(lifecycle=False, rollover=False),
    "elasticsearch": Capabilities(lifecycle=True, rollover=True),
}


@pytest.fixture
async def es_client(search_server: SearchServer) -> AsyncIterator[AsyncElasticsearch]:
    client = AsyncElasticsearch(search_server.url)
    yield client
    await client.close()


@pytest.fixture
async def store(
    search_server: SearchServer, es_client: AsyncElasticsearch
) -> AsyncIterator[ElasticsearchStore]:
    prefix = f"sgroll-{uuid.uuid4().hex[:12]}"
    opened = await ElasticsearchStore.open(search_server.url, index_prefix=prefix)
    yield opened
    await opened.close()
    await drop_prefix(es_client, prefix, INDEX_KINDS)


async def copies(client: AsyncElasticsearch, index: str, query: dict[str, object]) -> int:
    await client.indices.refresh(index=index)
    return int((await client.count(index=index, query=query))["count"])


async def test_capabilities_are_probed(
    store: ElasticsearchStore, search_server: SearchServer
) -> None:
    assert await store.capabilities() == EXPECTED[search_server.name]


async def test_roll_over_moves_the_write_index(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    new = await store.roll_over("records")
    aliases = (await es_client.indices.get_alias(name=store.index("records"))).body
    assert set(aliases) == {store.index("records") + "-000001", new}
    assert aliases[new]["aliases"][store.index("records")]["is_write_index"] is True
    with pytest.raises(InvalidRequest):
        await store.roll_over("audit")  # its seq allocation needs one index
    with pytest.raises(InvalidRequest):
        await store.roll_over("../x")


async def test_a_batch_retried_after_a_rollover_is_not_duplicated(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    writer = ChainWriter()
    batch = writer.records(*(record(f"r{i}", body=f"note {i}") for i in range(5)))
    await store.apply(batch)
    # As if the batch had failed after writing its documents but before committing: the
    # chain's head is taken back, then the indices roll over before the indexer retries.
    await es_client.delete(
        index=store.index("chains"),
        id=(await es_client.search(index=store.index("chains"), size=1))["hits"]["hits"][0]["_id"],
        refresh=True,
    )
    assert await store.last_seq() == 0
    await store.roll_over("ledger")
    await store.roll_over("records")
    await store.apply(batch)  # the retry
    assert await store.last_seq() == 5
    assert await copies(es_client, store.index("records"), {"term": {"record_id": "r3"}}) == 1
    assert await copies(es_client, store.index("ledger"), {"term": {"seq": 3}}) == 1
    assert [link async for link in store.chain_links()] == batch
    assert await store.count("note") == 5
    report = await store.verify()
    assert report.ok, report.problems


async def test_after_a_rollover_reads_updates_and_purges_reach_old_indices(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    writer = ChainWriter()
    await store.apply(writer.records(record("orig", message_id="m1"), record("old")))
    await store.roll_over("ledger")
    await store.roll_over("records")
    # A replay of "old" from another proxy's chain, and a correction of "orig".
    other = ChainWriter()
    await store.apply(other.add(rec_entry(record("old"))), chain="proxy-2")
    await store.apply(writer.records(record("fix", at=T0 + DAY, replaces_id="m1")))
    assert await copies(es_client, store.index("records"), {"term": {"record_id": "old"}}) == 1
    got = await store.get("orig")
    assert got is not None and got.message_id == "m1"
    assert sorted(await search_all(store, "is:edited")) == ["fix", "orig"]
    linked = await store.linked_records(["fix"])
    assert [r.record_id for r in linked["fix"]] == ["orig"]
    now = T0 + 400 * DAY
    update = await store.set_retention(
        [RetentionAssignment("old", "short", now - DAY)], assigned_at=T0
    )
    assert update.assigned == 1
    batch = await store.purge(now)
    assert [p.record_id for p in batch.purged] == ["old"]
    assert await store.get("old") is None
    assert await copies(es_client, store.index("records"), {"term": {"record_id": "old"}}) == 0
    report = await store.verify()
    assert report.ok, report.problems


async def test_many_rollovers_and_pages(store: ElasticsearchStore) -> None:
    writer = ChainWriter()
    for round_ in range(3):
        recs = [
            record(f"p{round_}-{i}", at=T0 + timedelta(minutes=round_ * 10 + i), body="page me")
            for i in range(4)
        ]
        await store.apply(writer.records(*recs))
        await store.roll_over("records")
        await store.roll_over("ledger")
    assert len(await search_all(store, "page")) == 12
    exported = [r.record_id async for page in store.snapshot_pages("page") for r in page]
    assert len(exported) == len(set(exported)) == 12
    assert (await store.verify()).ok
