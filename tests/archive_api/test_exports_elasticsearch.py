"""Exports from the Elasticsearch store read one consistent view (`snapshot_pages`: point in
time or scroll), and write the same bytes as the same records exported from SQLite."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from elasticsearch import AsyncElasticsearch

from archive_api.exports import ExportFormat, ExportSource, export_records, iter_records
from archive_api.store.base import SnapshotReader
from archive_api.store.elasticsearch import INDEX_KINDS, ElasticsearchStore
from archive_api.store.query import parse_query
from archive_api.store.records import ArchiveRecord
from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from tests.archive_api.store.conformance import T0, ChainWriter, record
from tests.stanzaguard import es_support
from tests.support.opensearch import SearchServer, drop_prefix

osmem_server = es_support.osmem_server


@pytest.fixture
async def es_store(osmem_server: SearchServer) -> AsyncIterator[ElasticsearchStore]:
    prefix = f"sgexport-{uuid.uuid4().hex[:12]}"
    opened = await ElasticsearchStore.open(osmem_server.url, index_prefix=prefix)
    yield opened
    await opened.close()
    client = AsyncElasticsearch(osmem_server.url)
    try:
        await drop_prefix(client, prefix, INDEX_KINDS)
    finally:
        await client.close()


def corpus() -> list[ArchiveRecord]:
    return [
        record(f"r{i}", at=T0 + timedelta(minutes=i), body=f"quarterly report part {i}")
        for i in range(7)
    ] + [record("other", at=T0 + timedelta(minutes=3), body="lunch?")]


def test_only_elasticsearch_offers_a_snapshot() -> None:
    assert issubclass(ElasticsearchStore, SnapshotReader)
    assert not issubclass(SqliteStore, SnapshotReader)


async def test_records_indexed_during_an_export_are_left_out(es_store: ElasticsearchStore) -> None:
    writer = ChainWriter()
    await es_store.apply(writer.records(*corpus()))
    seen: list[str] = []
    async for page in iter_records(es_store, parse_query("quarterly"), page_size=2):
        if not seen:  # while the export runs, matching records arrive, older and newer
            late = [
                record("late-old", at=T0 - timedelta(days=1), body="quarterly late"),
                record("late-new", at=T0 + timedelta(days=1), body="quarterly late"),
            ]
            await es_store.apply(writer.records(*late))
        seen += [r.record_id for r in page]
    assert seen == [f"r{i}" for i in range(7)]


@pytest.mark.parametrize("fmt", list(ExportFormat))
async def test_the_same_records_export_to_the_same_bytes_as_from_sqlite(
    es_store: ElasticsearchStore, tmp_path: Path, fmt: ExportFormat
) -> None:
    links = ChainWriter().records(*corpus())
    await es_store.apply(links)
    source = ExportSource.of_query("quarterly")
    clock = ManualClock(T0 + timedelta(days=30))
    async with await SqliteStore.open(tmp_path / "a.sqlite3") as sqlite:
        await sqlite.apply(links)
        from_sqlite = await export_records(
            sqlite, source, fmt, tmp_path / "sqlite", actor="officer", clock=clock, page_size=3
        )
    from_es = await export_records(
        es_store, source, fmt, tmp_path / "es", actor="officer", clock=clock, page_size=3
    )
    assert from_es.record_count == from_sqlite.record_count == 7
    assert [(f.name, f.sha256) for f in from_es.files] == [
        (f.name, f.sha256) for f in from_sqlite.files
    ]
    assert from_es.manifest_sha256 == from_sqlite.manifest_sha256
