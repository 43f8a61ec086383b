"""The Elasticsearch store's audit log beyond the shared suite: how sequence numbers are
allocated without transactions (create-only `_id` = seq), concurrent appenders, a head left
behind by an appender that stopped, and tampering, which must reach around the store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from elasticsearch import AsyncElasticsearch

from archive_api.store.chain import GENESIS, link_hash
from archive_api.store.elasticsearch import INDEX_KINDS, ElasticsearchStore
from archive_api.store.errors import StoreCorrupted
from tests.archive_api.store.audit_conformance import entry, expected_payload
from tests.support.opensearch import SearchServer, drop_prefix


@pytest.fixture
async def es_client(search_server: SearchServer) -> AsyncIterator[AsyncElasticsearch]:
    client = AsyncElasticsearch(search_server.url)
    yield client
    await client.close()


@pytest.fixture
async def prefix(es_client: AsyncElasticsearch) -> AsyncIterator[str]:
    name = f"sgaudit-{uuid.uuid4().hex[:12]}"
    yield name
    await drop_prefix(es_client, name, INDEX_KINDS)


@pytest.fixture
async def store(search_server: SearchServer, prefix: str) -> AsyncIterator[ElasticsearchStore]:
    opened = await ElasticsearchStore.open(search_server.url, index_prefix=prefix)
    yield opened
    await opened.close()


async def test_concurrent_appenders_never_fork_the_chain(
    search_server: SearchServer, store: ElasticsearchStore, prefix: str
) -> None:
    # Four stores on one prefix stand for four processes appending at once.
    others = [
        await ElasticsearchStore.open(search_server.url, index_prefix=prefix) for _ in range(3)
    ]
    try:
        writers = [store, *others]

        async def append(n: int, writer: ElasticsearchStore) -> list[int]:
            seqs = []
            for i in range(5):
                events = await writer.append_audit([entry(i, actor=f"token:w{n}")] * 2)
                seqs += [event.seq for event in events]
            return seqs

        taken = await asyncio.gather(*(append(n, w) for n, w in enumerate(writers)))
    finally:
        for other in others:
            await other.close()
    everyone = sorted(seq for seqs in taken for seq in seqs)
    assert everyone == list(range(1, 41))  # every seq taken exactly once, no gap
    for seqs in taken:
        assert seqs == sorted(seqs)  # each writer's events in its own order
    head = await store.audit_head()
    assert head.seq == 40
    report = await store.verify_audit()
    assert report.ok, report.problems
    assert report.events_checked == 40


async def test_a_head_left_behind_is_caught_up(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    await store.append_audit([entry(i) for i in range(3)])
    # An appender that stopped after writing its events but before moving the head.
    await es_client.index(
        index=store.index("audit_head"),
        id="head",
        document={
            "seq": 1,
            "hash": (await store.audit_events(newest_first=False)).events[0].hash.hex(),
        },
        refresh=True,
    )
    assert (await store.audit_head()).seq == 3
    [event] = await store.append_audit([entry(3)])
    assert event.seq == 4
    assert (await store.verify_audit()).ok


async def test_an_edited_event_is_found(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    events = await store.append_audit([entry(i) for i in range(3)])
    assert events[1].hash == link_hash(events[0].hash, 2, expected_payload(events[1]))
    await es_client.update(
        index=store.index("audit"),
        id=f"{2:020d}",
        doc={"params": '{"query":"nothing to see"}'},
        refresh=True,
    )
    report = await store.verify_audit()
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.problem) == (
        2,
        "content does not match its hash (edited)",
    )


async def test_deleted_events_are_found_in_the_middle_and_at_the_end(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    await store.append_audit([entry(i) for i in range(5)])
    for seq in (2, 5):
        await es_client.delete(index=store.index("audit"), id=f"{seq:020d}", refresh=True)
    report = await store.verify_audit()
    seqs = [p.seq for p in report.problems]
    assert seqs[0] == 2 and "missing" in report.problems[0].problem
    assert any("removed from the end" in p.problem for p in report.problems)


async def test_a_deleted_head_is_not_recreated(
    search_server: SearchServer, store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    await store.append_audit([entry(0)])
    await es_client.delete(index=store.index("audit_head"), id="head", refresh=True)
    with pytest.raises(StoreCorrupted, match="head"):
        await store.audit_head()
    with pytest.raises(StoreCorrupted, match="head"):
        await store.append_audit([entry(1)])
    reopened = await ElasticsearchStore.open(search_server.url, index_prefix=store.index("x")[:-2])
    try:
        with pytest.raises(StoreCorrupted):  # reopening does not paper over it
            await reopened.audit_head()
        report = await reopened.verify_audit()
        assert not report.ok and "head" in report.problems[0].problem
    finally:
        await reopened.close()


async def test_an_unreadable_event_is_corruption_not_a_crash(
    store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    await store.append_audit([entry(0)])
    await es_client.index(
        index=store.index("audit"),
        id=f"{2:020d}",
        document={
            "seq": 2,
            "at_us": 0,
            "actor": "x",
            "action": "y",
            "params": "{}",
            "outcome": "ok",
            "prev_hash": "zz",
            "hash": GENESIS.hex(),
        },
        refresh=True,
    )
    with pytest.raises(StoreCorrupted):
        await store.audit_events()
