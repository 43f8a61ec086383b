"""The shared ArchiveStore conformance suite on the Elasticsearch store, plus tamper tests.

Runs against osmem-server (always, started once per session) and a real Elasticsearch when
STANZAGUARD_TEST_ES_URL is set. Every store gets its own index prefix, and its indices and
templates are deleted afterwards.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from elasticsearch import AsyncElasticsearch

from archive_api.store.base import ArchiveStore
from archive_api.store.elasticsearch import INDEX_KINDS, ElasticsearchStore
from archive_api.store.errors import InvalidRequest, StoreUnavailable
from tests.archive_api.store.audit_conformance import (
    AuditStoreConformance,
    TokenStoreConformance,
)
from tests.archive_api.store.conformance import (
    T0,
    ArchiveStoreConformance,
    ChainWriter,
    StoreFactory,
    corpus,
    record,
)
from tests.support.opensearch import SearchServer, drop_prefix


@pytest.fixture
async def es_client(search_server: SearchServer) -> AsyncIterator[AsyncElasticsearch]:
    """A raw client on the same server, for reaching around the store (tampering, cleanup)."""
    client = AsyncElasticsearch(search_server.url)
    yield client
    await client.close()


@pytest.fixture
async def store_factory(
    search_server: SearchServer, es_client: AsyncElasticsearch
) -> AsyncIterator[StoreFactory]:
    prefixes: list[str] = []

    async def factory() -> ArchiveStore:
        prefix = f"sgtest-{uuid.uuid4().hex[:12]}"
        prefixes.append(prefix)
        return await ElasticsearchStore.open(search_server.url, index_prefix=prefix)

    yield factory
    for prefix in prefixes:
        await drop_prefix(es_client, prefix, INDEX_KINDS)


class TestElasticsearchConformance(ArchiveStoreConformance):
    pass


# --- tampering: reach around the store and edit its documents ---------------------------------


@pytest.fixture
async def es_store(store_factory: StoreFactory) -> AsyncIterator[ElasticsearchStore]:
    store = await store_factory()
    assert isinstance(store, ElasticsearchStore)
    await store.apply(ChainWriter().records(*corpus()))
    yield store
    await store.close()


async def _only_doc(client: AsyncElasticsearch, index: str, query: dict[str, object]) -> str:
    found = await client.search(index=index, query=query, size=2)
    hits = found["hits"]["hits"]
    assert len(hits) == 1, hits
    doc_id: str = hits[0]["_id"]
    return doc_id


async def test_verify_finds_an_edited_payload(
    es_store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    assert (await es_store.verify()).ok
    ledger = es_store.index("ledger")
    doc_id = await _only_doc(es_client, ledger, {"term": {"seq": 4}})
    doc = (await es_client.get(index=ledger, id=doc_id))["_source"]
    payload = base64.b64decode(doc["payload"]).replace(b"everyone", b"no one")
    doc["payload"] = base64.b64encode(payload).decode()
    await es_client.index(index=ledger, id=doc_id, document=doc, refresh=True)
    report = await es_store.verify()
    assert not report.ok
    assert report.first_break is not None
    assert (report.first_break.chain, report.first_break.seq) == ("spool", 4)
    assert "hash" in report.first_break.problem


async def test_verify_finds_a_deleted_entry(
    es_store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    ledger = es_store.index("ledger")
    doc_id = await _only_doc(es_client, ledger, {"term": {"seq": 7}})
    await es_client.delete(index=ledger, id=doc_id, refresh=True)
    report = await es_store.verify()
    assert report.first_break is not None and report.first_break.seq == 7
    # The record whose RECORD entry vanished is reported too.
    assert any(p.record_id == "r07" for p in report.problems)


async def test_verify_finds_an_edited_index_field(
    es_store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    records = es_store.index("records")
    doc_id = await _only_doc(es_client, records, {"term": {"record_id": "r05"}})
    await es_client.update(
        index=records, id=doc_id, doc={"body": "nothing to see", "sender": "x@y"}, refresh=True
    )
    report = await es_store.verify()
    (problem,) = report.problems
    assert (problem.chain, problem.seq, problem.record_id) == ("spool", 5, "r05")
    assert "body" in problem.problem and "sender" in problem.problem
    # Search sees the forged field (the index is what was tampered with)...
    assert await es_store.count('"nothing to see"') == 1
    # ...but what a reader gets is the chain's payload.
    got = await es_store.get("r05")
    assert got is not None and got.body == "buy cheap pills now"


async def test_verify_finds_a_record_missing_from_the_index(
    es_store: ElasticsearchStore, es_client: AsyncElasticsearch
) -> None:
    records = es_store.index("records")
    doc_id = await _only_doc(es_client, records, {"term": {"record_id": "r02"}})
    await es_client.delete(index=records, id=doc_id, refresh=True)
    report = await es_store.verify()
    assert [(p.seq, p.record_id) for p in report.problems] == [(2, "r02")]
    assert report.records_checked == len(corpus()) - 1


# --- hostile configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix", ["", "UPPER", "-lead", "a/b", "a*", "a,b", "x" * 80, "é", "a b", "_all"]
)
async def test_bad_index_prefixes_are_refused(search_server: SearchServer, prefix: str) -> None:
    with pytest.raises(InvalidRequest):
        await ElasticsearchStore.open(search_server.url, index_prefix=prefix)


async def test_unreachable_server_is_unavailable() -> None:
    from tests.support.services import free_port

    with pytest.raises(StoreUnavailable):
        await ElasticsearchStore.open(
            f"http://127.0.0.1:{free_port()}", index_prefix="nowhere", request_timeout=2
        )


# --- the audit log and API tokens ------------------------------------------------------------


class TestElasticsearchAuditConformance(AuditStoreConformance):
    pass


class TestElasticsearchTokenConformance(TokenStoreConformance):
    pass


# --- sizes: bulk chunking, index walks past one page, oversized text -------------------------


async def test_batches_larger_than_a_bulk_chunk_and_a_page(store_factory: StoreFactory) -> None:
    store = await store_factory()
    try:
        writer = ChainWriter()
        many = [
            record(f"m{i:04d}", at=T0 + i * timedelta(seconds=1), body=f"bulk {i}")
            for i in range(1234)
        ]
        await store.apply(writer.records(*many))
        assert await store.last_seq() == 1234
        assert await store.count("bulk") == 1234
        links = [link async for link in store.chain_links()]
        assert links == writer.links
        report = await store.verify()
        assert report.ok, report.problems
        assert (report.entries_checked, report.records_checked) == (1234, 1234)
    finally:
        await store.close()


async def test_an_oversized_body_is_stored_whole_and_snippeted_short(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    try:
        body = "filler " * 40_000 + "needle " + "filler " * 1000  # about 290 kB
        await store.apply(ChainWriter().records(record("big", body=body)))
        got = await store.get("big")
        assert got is not None and got.body == body
        (hit,) = (await store.search("needle")).hits
        assert [p.text for p in hit.snippet if p.match] == ["needle"]
        assert len("".join(p.text for p in hit.snippet)) < 300
        (plain,) = (await store.search("")).hits
        assert len("".join(p.text for p in plain.snippet)) <= 201
    finally:
        await store.close()
