"""Exports on the Elasticsearch store read one consistent view: a point in time where the
server has it, a scroll otherwise, search_after paging as the last resort (probed once)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from elasticsearch import AsyncElasticsearch

from archive_api.store.elasticsearch import (
    INDEX_KINDS,
    ElasticsearchStore,
    SnapshotMode,
    choose_snapshot_mode,
)
from archive_api.store.errors import InvalidRequest, QuerySyntaxError
from tests.archive_api.store.conformance import T0, ChainWriter, record
from tests.support.opensearch import SearchServer, drop_prefix

# What each server this suite runs on offers (checked by probing it: osmem-server 0.1.6 has
# scroll but no point in time; Elasticsearch has both).
EXPECTED: dict[str, SnapshotMode] = {"osmem": "scroll", "elasticsearch": "point_in_time"}


@pytest.mark.parametrize(
    ("pit", "scroll", "mode"),
    [
        (True, True, "point_in_time"),
        (True, False, "point_in_time"),
        (False, True, "scroll"),
        (False, False, "search_after"),
    ],
)
def test_the_best_mode_the_server_offers_is_chosen(pit: bool, scroll: bool, mode: str) -> None:
    assert choose_snapshot_mode(point_in_time=pit, scroll=scroll) == mode


@pytest.fixture
async def store(search_server: SearchServer) -> AsyncIterator[ElasticsearchStore]:
    prefix = f"sgsnap-{uuid.uuid4().hex[:12]}"
    opened = await ElasticsearchStore.open(search_server.url, index_prefix=prefix)
    yield opened
    await opened.close()
    client = AsyncElasticsearch(search_server.url)
    try:
        await drop_prefix(client, prefix, INDEX_KINDS)
    finally:
        await client.close()


async def test_the_server_is_probed_once(
    store: ElasticsearchStore, search_server: SearchServer
) -> None:
    assert await store.snapshot_mode() == EXPECTED[search_server.name]
    assert store._snapshot == EXPECTED[search_server.name]


async def collect(
    store: ElasticsearchStore, writer: ChainWriter, query: str, page_size: int
) -> list[str]:
    """Every record id a snapshot gives, adding matching records after the first page."""
    seen: list[str] = []
    pages = 0
    async for page in store.snapshot_pages(query, page_size=page_size):
        pages += 1
        seen += [r.record_id for r in page]
        if pages == 1:
            late = [
                record(f"late{i}", at=T0 + timedelta(days=1), body="report late") for i in range(3)
            ]
            await store.apply(writer.records(*late))
    return seen


@pytest.mark.parametrize("mode", ["point_in_time", "scroll", "search_after"])
async def test_every_match_oldest_first_in_pages(
    store: ElasticsearchStore, search_server: SearchServer, mode: SnapshotMode
) -> None:
    offered = EXPECTED[search_server.name]
    if mode == "point_in_time" and offered != "point_in_time":
        pytest.skip(f"{search_server.name} has no point in time")
    writer = ChainWriter()
    batch = [
        record(f"r{i:02d}", at=T0 + timedelta(minutes=i), body=f"report {i}") for i in range(25)
    ]
    batch.append(record("other", body="lunch"))
    await store.apply(writer.records(*batch))
    store._snapshot = mode  # force the mode: each path is exercised where the server has it
    seen = await collect(store, writer, "report", page_size=10)
    first = [f"r{i:02d}" for i in range(25)]
    if mode == "search_after":
        # No snapshot: records indexed meanwhile that sort later are seen too; still none is
        # repeated or skipped.
        assert seen == [*first, "late0", "late1", "late2"]
    else:
        assert seen == first  # the index as it stood when the first page was read
    assert await store.count("late") == 3


async def test_bad_arguments(store: ElasticsearchStore) -> None:
    with pytest.raises(InvalidRequest):
        [p async for p in store.snapshot_pages("x", page_size=0)]
    with pytest.raises(InvalidRequest):
        [p async for p in store.snapshot_pages("x", page_size=100_000)]
    with pytest.raises(QuerySyntaxError):
        [p async for p in store.snapshot_pages('from: "unclosed')]
    assert [p async for p in store.snapshot_pages("nothing matches")] == []
