"""`Indexer.drain()` while the in-process indexer's loop is running (`index_worker=false`).

The quarantine and learning services call `drain()` on a running service, so a drain can
start while the loop has a batch in flight. Each spool entry must then reach the store once:
the drain waits for the loop's batch and applies only what remains. Without that, both
apply the same links at once; on Elasticsearch the second one fails with `ChainConflict`
("another writer advanced the chain meanwhile"), and the loop counts a failure.

Real spool files, a real SQLite file and a real osmem-server (tests/support/opensearch.py).
The only thing between the indexer and the store is `HeldStore`, which passes every call
through and holds the loop's first batch in `apply` until a second apply starts (the race,
made certain) or `HOLD_SECONDS` have passed (a drain that waits never starts one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from archive_api.store.base import DEFAULT_CHAIN, ArchiveStore
from archive_api.store.chain import ChainLink
from archive_api.store.elasticsearch import ElasticsearchStore
from archive_api.store.records import ArchiveRecord, Direction, EntryOp, RecordKind, SpoolEntry
from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from proxy.indexer import Indexer
from proxy.spool import Spool
from tests.stanzaguard import es_support
from tests.stanzaguard.es_support import EsLocation

osmem_server = es_support.osmem_server
es_client = es_support.es_client
es_location = es_support.es_location

ENTRIES = 7
BATCH = 3  # several batches, the last one short
#: How long the loop's first batch waits for a second, overlapping apply. Only a bound: a
#: drain that races reaches `apply` within milliseconds; one that waits never does.
HOLD_SECONDS = 1.5
#: Safety net so a hang fails the test instead of hitting the suite's timeout.
DEADLINE_SECONDS = 60.0


def message(n: int) -> bytes:
    record = ArchiveRecord(
        record_id=f"drain-race-{n:04d}",
        kind=RecordKind.MESSAGE,
        occurred_at=datetime(2026, 3, 1, tzinfo=UTC),
        direction=Direction.FROM_CLIENT,
        sender="alice@corp.example",
        recipient="bob@corp.example",
        stanza_type="chat",
        body=f"message {n}",
    )
    return SpoolEntry(EntryOp.RECORD, record.record_id, record=record).payload()


class HeldStore:
    """A real store, with every `apply` recorded and the first one held (see module doc)."""

    def __init__(self, store: ArchiveStore) -> None:
        self.store = store
        self.applied_seqs: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.first_apply_started = asyncio.Event()
        self._another_apply_started = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def apply(self, links: Sequence[ChainLink], *, chain: str = DEFAULT_CHAIN) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if not self.first_apply_started.is_set():
                self.first_apply_started.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._another_apply_started.wait(), HOLD_SECONDS)
            else:
                self._another_apply_started.set()
            await self.store.apply(links, chain=chain)
            self.applied_seqs.extend(link.seq for link in links)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = await Spool.open(tmp_path / "spool", clock=ManualClock(), segment_max_entries=2)
    yield opened
    await opened.close()


@pytest.fixture(params=["sqlite", "elasticsearch"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ArchiveStore]:
    opened: ArchiveStore
    if request.param == "sqlite":
        opened = await SqliteStore.open(tmp_path / "archive.sqlite3")
    else:
        location: EsLocation = request.getfixturevalue("es_location")
        opened = await ElasticsearchStore.open(location.url, index_prefix=location.prefix)
    yield opened
    await opened.close()


@pytest.mark.parametrize("drains", [1, 2])
async def test_drain_during_a_running_batch_applies_each_entry_once(
    spool: Spool, store: ArchiveStore, drains: int
) -> None:
    await spool.append([message(n) for n in range(1, ENTRIES + 1)])
    held = HeldStore(store)
    indexer = Indexer(spool, cast(ArchiveStore, held), batch_size=BATCH, idle_wait=0.05)
    indexer.start()
    try:
        async with asyncio.timeout(DEADLINE_SECONDS):
            await held.first_apply_started.wait()  # the loop's first batch is in flight
            # The quarantine and the learning service may both drain at the same moment.
            await asyncio.gather(*(indexer.drain() for _ in range(drains)))
            # A drain returns only once the store has everything spooled before it.
            assert await store.last_seq(chain=spool.chain_name) == ENTRIES
    finally:
        await indexer.stop()
    assert held.most_in_flight == 1, "two batches were applied at the same time"
    repeated = {seq: n for seq, n in collections.Counter(held.applied_seqs).items() if n > 1}
    assert repeated == {}, "entries applied more than once"
    assert sorted(held.applied_seqs) == list(range(1, ENTRIES + 1))
    assert indexer.failures == 0
    assert indexer.indexed == ENTRIES
    assert spool.cursor() == ENTRIES
    last = await store.get(f"drain-race-{ENTRIES:04d}")
    assert last is not None and last.body == f"message {ENTRIES}"


async def test_drain_without_a_running_loop_indexes_everything(
    spool: Spool, tmp_path: Path
) -> None:
    """The lock that serialises drains with the loop must not need the loop (tests, shutdown)."""
    store = await SqliteStore.open(tmp_path / "archive.sqlite3")
    try:
        await spool.append([message(n) for n in range(1, ENTRIES + 1)])
        indexer = Indexer(spool, store, batch_size=BATCH)
        await indexer.drain()
        await indexer.drain()  # nothing left: a second drain changes nothing
        assert await store.last_seq(chain=spool.chain_name) == ENTRIES
        assert indexer.indexed == ENTRIES
        assert spool.cursor() == ENTRIES
    finally:
        await store.close()
