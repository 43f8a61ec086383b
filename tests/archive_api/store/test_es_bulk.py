"""Bulk writes of the Elasticsearch store: chunking by count and by bytes, and backoff when
the cluster answers 429. A pass-through proxy between the store and the search server counts
the bulk requests and refuses the first ones (tests/support/opensearch.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from elasticsearch import AsyncElasticsearch

from archive_api.store.elasticsearch import INDEX_KINDS, BulkLimits, ElasticsearchStore
from archive_api.store.errors import InvalidRequest, StoreUnavailable
from archive_api.store.records import ArchiveRecord
from tests.archive_api.store.conformance import T0, ChainWriter, record
from tests.support.opensearch import BulkRefusingProxy, SearchServer, drop_prefix


@pytest.fixture
async def prefix(search_server: SearchServer) -> AsyncIterator[str]:
    name = f"sgbulk-{uuid.uuid4().hex[:12]}"
    yield name
    client = AsyncElasticsearch(search_server.url)
    try:
        await drop_prefix(client, name, INDEX_KINDS)
    finally:
        await client.close()


async def open_behind(
    proxy: BulkRefusingProxy, prefix: str, limits: BulkLimits
) -> ElasticsearchStore:
    url = await proxy.start()
    return await ElasticsearchStore.open(url, index_prefix=prefix, bulk=limits)


def records(n: int, body: str = "payload") -> list[ArchiveRecord]:
    return [
        record(f"b{i:03d}", at=T0 + i * timedelta(seconds=1), body=f"{body} {i}") for i in range(n)
    ]


async def test_chunks_by_count(search_server: SearchServer, prefix: str) -> None:
    proxy = BulkRefusingProxy(search_server.url)
    store = await open_behind(proxy, prefix, BulkLimits(chunk_docs=7))
    try:
        await store.apply(ChainWriter().records(*records(30)))
        assert await store.count("payload") == 30
    finally:
        await store.close()
        await proxy.close()
    assert max(proxy.bulk_actions) == 7
    # 30 ledger entries and 30 records documents, each first claimed in the duplicate ledger
    assert sum(proxy.bulk_actions) == 120


async def test_chunks_by_bytes_even_below_one_document(
    search_server: SearchServer, prefix: str
) -> None:
    proxy = BulkRefusingProxy(search_server.url)
    store = await open_behind(proxy, prefix, BulkLimits(chunk_bytes=4000))
    try:
        await store.apply(ChainWriter().records(*records(12, body="x" * 1500)))
        got = await store.get("b011")
        assert got is not None and got.body is not None and got.body.endswith(" 11")
        assert (await store.verify()).ok
    finally:
        await store.close()
        await proxy.close()
    # Each request stays under the limit, except a single action larger than it, sent alone.
    assert all(
        size <= 4000 or actions == 1
        for size, actions in zip(proxy.bulk_bytes, proxy.bulk_actions, strict=True)
    )
    assert proxy.bulk_actions.count(1) >= 24  # each 1.5 kB document alone
    assert sum(proxy.bulk_actions) == 48  # (the small duplicate-ledger claims share requests)


async def test_429s_are_retried_with_backoff(search_server: SearchServer, prefix: str) -> None:
    proxy = BulkRefusingProxy(search_server.url, refuse=2)
    store = await open_behind(
        proxy, prefix, BulkLimits(retries=3, initial_backoff=0.01, max_backoff=0.02)
    )
    try:
        await store.apply(ChainWriter().records(*records(5)))
        assert proxy.refused == 2
        assert await store.count("payload") == 5
        assert (await store.verify()).ok
    finally:
        await store.close()
        await proxy.close()


async def test_a_cluster_that_keeps_refusing_is_unavailable(
    search_server: SearchServer, prefix: str
) -> None:
    proxy = BulkRefusingProxy(search_server.url, refuse=100)
    store = await open_behind(
        proxy, prefix, BulkLimits(retries=2, initial_backoff=0.01, max_backoff=0.02)
    )
    try:
        with pytest.raises(StoreUnavailable, match="refusing"):
            await store.apply(ChainWriter().records(*records(3)))
        assert await store.last_seq() == 0  # nothing committed: the indexer retries later
        proxy.refuse = 0
        await store.apply(ChainWriter().records(*records(3)))
        assert await store.last_seq() == 3 and await store.count("payload") == 3
    finally:
        await store.close()
        await proxy.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"chunk_docs": 0},
        {"chunk_docs": True},
        {"chunk_bytes": -1},
        {"retries": -1},
        {"initial_backoff": 0},
        {"initial_backoff": 5, "max_backoff": 1},
        {"max_backoff": 1e9},
    ],
)
def test_bad_bulk_limits_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(InvalidRequest, match="bulk"):
        BulkLimits(**bad)  # type: ignore[arg-type]
    assert BulkLimits(retries=0).retries == 0  # no retry at all is a valid choice
