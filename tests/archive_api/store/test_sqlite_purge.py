"""Retention and purge in the SQLite store: extend-only expiries, tombstones, verify after a
purge, and tampering around tombstones (which must reach around the store, hence here)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from archive_api.store.base import (
    HoldRecord,
    PurgedRecord,
    RetentionAssignment,
    RetentionUpdate,
    Tombstone,
)
from archive_api.store.chain import CheckpointSigner
from archive_api.store.errors import InvalidCursor, InvalidRequest, StoreCorrupted
from archive_api.store.records import RecordStatus
from archive_api.store.sqlite import SqliteStore
from tests.archive_api.store.conformance import (
    DAY,
    T0,
    ChainWriter,
    corpus,
    fetch_ok,
    observation,
    observe_entry,
    rec_entry,
    record,
    search_all,
    status_entry,
    with_upload,
)

NOW = T0 + timedelta(days=400)
PAST = NOW - DAY  # an expiry already reached
LATER = NOW + 365 * DAY  # an expiry not reached


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "archive.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(db_path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def loaded(store: SqliteStore) -> SqliteStore:
    """The corpus (seq 1..15), an OBSERVE (16) and a STATUS (17) of r01 and r04."""
    writer = ChainWriter()
    await store.apply(writer.records(*corpus()))
    await store.apply(
        writer.add(
            observe_entry("r01", observation("alice@corp.example/laptop")),
            status_entry("r04", RecordStatus.RELEASED, T0 + 3 * DAY),
        )
    )
    return store


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


async def expire(store: SqliteStore, *record_ids: str, at: datetime = PAST) -> None:
    await store.set_retention(
        [RetentionAssignment(rid, "short", at) for rid in record_ids], assigned_at=T0
    )


def payload_at(path: Path, seq: int) -> bytes:
    with raw(path) as conn:
        (payload,) = conn.execute(
            "SELECT payload FROM ledger WHERE id = (1 << 40) | ?", (seq,)
        ).fetchone()
    return bytes(payload)


# --- retention assignments -------------------------------------------------------------------


async def test_retention_is_extend_only(loaded: SqliteStore) -> None:
    six, three, seven = T0 + 6 * 365 * DAY, T0 + 3 * 365 * DAY, T0 + 7 * 365 * DAY
    first = await loaded.set_retention([RetentionAssignment("r01", "broker", six)], assigned_at=T0)
    assert first == RetentionUpdate(assigned=1)
    shorter = await loaded.set_retention(
        [RetentionAssignment("r01", "standard", three)], assigned_at=T0 + DAY
    )
    assert shorter == RetentionUpdate(kept=1)
    state = await loaded.retention_of("r01")
    assert state is not None
    assert (state.retention_class, state.expires_at, state.assigned_at) == ("broker", six, T0)
    longer = await loaded.set_retention(
        [RetentionAssignment("r01", "swaps", seven)], assigned_at=T0 + 2 * DAY
    )
    assert longer == RetentionUpdate(extended=1)
    state = await loaded.retention_of("r01")
    assert state is not None and (state.retention_class, state.expires_at) == ("swaps", seven)


async def test_retention_batch_takes_the_latest_expiry_and_skips_unknown_ids(
    loaded: SqliteStore,
) -> None:
    update = await loaded.set_retention(
        [
            RetentionAssignment("r02", "late", LATER),
            RetentionAssignment("r02", "early", PAST),
            RetentionAssignment("no-such-record", "x", LATER),
        ],
        assigned_at=T0,
    )
    assert update == RetentionUpdate(assigned=1, unknown=1)
    state = await loaded.retention_of("r02")
    assert state is not None and state.retention_class == "late"
    assert await loaded.retention_of("no-such-record") is None
    with pytest.raises(InvalidRequest):
        await loaded.set_retention([RetentionAssignment("r02", "", LATER)], assigned_at=T0)


async def test_retention_survives_reopening(db_path: Path) -> None:
    async with await SqliteStore.open(db_path) as store:
        await store.apply(ChainWriter().records(record("a")))
        await expire(store, "a", at=LATER)
    async with await SqliteStore.open(db_path) as store:
        state = await store.retention_of("a")
        assert state is not None and state.expires_at == LATER


async def test_retention_subjects_page_and_filter(loaded: SqliteStore) -> None:
    await expire(loaded, "r01", "r02")
    await loaded.set_retention([RetentionAssignment("r03", "long", LATER)], assigned_at=T0)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await loaded.retention_subjects(cursor=cursor, limit=4)
        seen.extend(s.record_id for s in page.subjects)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"r{i:02d}" for i in range(1, 16)]  # store order is time order
    unassigned = await loaded.retention_subjects(unassigned_only=True)
    assert {s.record_id for s in unassigned.subjects} == {f"r{i:02d}" for i in range(4, 16)}
    due = await loaded.retention_subjects(expiring_by=NOW)
    assert [s.record_id for s in due.subjects] == ["r01", "r02"]
    [r04] = [s for s in (await loaded.retention_subjects()).subjects if s.record_id == "r04"]
    assert (r04.record_type, r04.room) == ("groupchat", "desk@conference.corp.example")
    for bad in ("zz", "1" * 40):
        with pytest.raises(InvalidCursor):
            await loaded.retention_subjects(cursor=bad)
    with pytest.raises(InvalidRequest):
        await loaded.retention_subjects(unassigned_only=True, expiring_by=NOW)
    with pytest.raises(InvalidRequest):
        await loaded.retention_subjects(limit=0)


# --- purge -----------------------------------------------------------------------------------


async def test_purge_takes_only_expired_records(loaded: SqliteStore) -> None:
    await expire(loaded, "r02", "r03")
    await expire(loaded, "r05", at=LATER)
    dry = await loaded.purge(NOW, dry_run=True, counts=True)
    assert ({p.record_id for p in dry.purged}, dry.due, dry.held_back) == ({"r02", "r03"}, 2, 0)
    assert (await loaded.purge(NOW, dry_run=True)).due is None  # counted only when asked
    assert all(p.entries == 0 for p in dry.purged)
    assert await loaded.get("r02") is not None  # a dry run changes nothing
    batch = await loaded.purge(NOW)
    assert {p.record_id: p.entries for p in batch.purged} == {"r02": 1, "r03": 1}
    assert not batch.more
    assert await loaded.get("r02") is None and await loaded.get("r03") is None
    assert await loaded.get("r05") is not None and await loaded.get("r01") is not None
    assert "r02" not in await search_all(loaded, "lunch") and await loaded.count("cafe") == 0
    assert await loaded.count("") == 13
    state = await loaded.retention_of("r02")
    assert state is not None and state.purged_at == NOW
    assert (await loaded.purge(NOW)).purged == ()  # nothing left to do
    report = await loaded.verify()
    assert report.ok, report.problems


async def test_purge_at_exactly_the_expiry_and_in_batches(loaded: SqliteStore) -> None:
    await expire(loaded, *(f"r{i:02d}" for i in range(1, 11)), at=NOW)
    first = await loaded.purge(NOW, limit=4, counts=True)
    assert len(first.purged) == 4 and first.due == 10 and first.more
    rest: list[PurgedRecord] = []
    while True:
        batch = await loaded.purge(NOW, limit=4)
        rest.extend(batch.purged)
        if not batch.more:
            break
    assert len(rest) == 6
    assert sorted(await search_all(loaded, "")) == ["r11", "r12", "r13", "r14", "r15"]
    assert (await loaded.verify()).ok


async def test_purge_of_planned_ids_only(loaded: SqliteStore) -> None:
    await expire(loaded, "r01", "r02", "r03")
    batch = await loaded.purge(NOW, record_ids=["r02", "r14", "nope"])
    assert [p.record_id for p in batch.purged] == ["r02"]  # r14 has not expired
    assert await loaded.get("r01") is not None
    with pytest.raises(InvalidRequest):
        await loaded.purge(NOW, limit=2, record_ids=["a", "b", "c"])
    with pytest.raises(InvalidRequest):
        await loaded.purge(NOW, limit=0)


async def test_every_entry_of_a_purged_record_becomes_a_tombstone(
    loaded: SqliteStore, db_path: Path
) -> None:
    writer_links = [link async for link in loaded.chain_links()]
    await expire(loaded, "r01", "r04")
    batch = await loaded.purge(NOW)
    # r01: its RECORD (1) and the OBSERVE (16); r04: its RECORD (4) and the STATUS (17).
    assert {p.record_id: p.entries for p in batch.purged} == {"r01": 2, "r04": 2}
    after = {link.seq: link async for link in loaded.chain_links()}
    for seq, rid in ((1, "r01"), (16, "r01"), (4, "r04"), (17, "r04")):
        tombstone = Tombstone.from_payload(after[seq].payload)
        assert tombstone is not None and tombstone.record_id == rid
        assert tombstone.purged_at == NOW and tombstone.expires_at == PAST
        before = writer_links[seq - 1]
        assert (after[seq].hash, after[seq].prev_hash) == (before.hash, before.prev_hash)
    assert after[2].payload == writer_links[1].payload  # neighbours untouched
    with raw(db_path) as conn:
        for table in ("observations", "statuses"):
            (left,) = conn.execute(
                f"SELECT count(*) FROM {table} WHERE record_id IN ('r01', 'r04')"  # noqa: S608
            ).fetchone()
            assert left == 0
    assert b"Guaranteed" not in payload_at(db_path, 1)
    report = await loaded.verify()
    assert report.ok, report.problems
    assert report.entries_checked == 17


async def test_attachment_fetches_of_a_purged_record_go_too(store: SqliteStore) -> None:
    writer = ChainWriter()
    await store.apply(writer.records(with_upload("u1"), record("keep")))
    await store.apply(writer.add(fetch_ok("u1")))
    await expire(store, "u1")
    [purged] = (await store.purge(NOW)).purged
    assert (purged.record_id, purged.entries) == ("u1", 2)
    assert (await store.verify()).ok


async def test_reapplying_purged_links_is_a_no_op(store: SqliteStore) -> None:
    writer = ChainWriter()
    links = writer.records(*corpus())
    await store.apply(links)
    await expire(store, "r03")
    await store.purge(NOW)
    await store.apply(links)  # the indexer retrying an old batch: hashes still match
    assert await store.get("r03") is None
    assert (await store.verify()).ok


async def test_late_entries_of_a_purged_record_never_bring_it_back(store: SqliteStore) -> None:
    await store.apply(ChainWriter().records(record("gone", body="secret plan"), record("kept")))
    await expire(store, "gone")
    await store.purge(NOW)
    other = ChainWriter()  # another proxy's chain replays the record and observes it again
    await store.apply(
        other.add(
            rec_entry(record("gone", body="secret plan")),
            observe_entry("gone", observation("bob@partner.example/tablet")),
            status_entry("gone", RecordStatus.RELEASED),
            rec_entry(record("fresh")),
        ),
        chain="proxy-2",
    )
    assert await store.get("gone") is None
    assert await store.count("secret") == 0
    assert await store.get("fresh") is not None
    payloads = [link.payload async for link in store.chain_links(chain="proxy-2")]
    assert [Tombstone.from_payload(p) is not None for p in payloads] == [True, True, True, False]
    report = await store.verify()
    assert report.ok, report.problems


async def test_a_checkpoint_on_a_tombstone_still_verifies(store: SqliteStore) -> None:
    signer = CheckpointSigner.generate()
    writer = ChainWriter()
    links = writer.records(record("a"), record("b"), record("c"))
    await store.apply(links)
    await store.add_checkpoint(signer.sign("spool", 2, links[1].hash))
    await expire(store, "b")
    await store.purge(NOW)
    report = await store.verify(public_key=signer.public_key)
    assert report.ok, report.problems
    assert report.chains[0].checkpoints == 1


# --- holds inside the purge ------------------------------------------------------------------


def hold(hold_id: str, query: str) -> HoldRecord:
    return HoldRecord(hold_id, "Case", "officer@corp.example", T0, '{"kind":"search"}', query)


async def test_a_hold_keeps_expired_records(loaded: SqliteStore) -> None:
    await expire(loaded, *(f"r{i:02d}" for i in range(1, 16)))
    await loaded.add_hold(hold("h1", "from:*@spam.example"))
    await loaded.add_hold(hold("h2", '"guaranteed return"'))  # a full-text hold
    batch = await loaded.purge(NOW, counts=True)
    kept = {"r05", "r06", "r01", "r08"}
    assert {p.record_id for p in batch.purged} == {f"r{i:02d}" for i in range(1, 16)} - kept
    assert batch.held_back == 4
    assert sorted(await search_all(loaded, "")) == sorted(kept)
    await loaded.release_hold("h1", released_by="admin@corp.example", released_at=NOW)
    second = await loaded.purge(NOW)
    assert {p.record_id for p in second.purged} == {"r05", "r06"}
    assert (await loaded.verify()).ok


async def test_holds_covering_names_each_records_holds(loaded: SqliteStore) -> None:
    await loaded.add_hold(hold("h1", "with:bob@partner.example"))
    await loaded.add_hold(hold("h2", "-verdict:allow"))
    covering = await loaded.holds_covering(["r01", "r03", "r05", "r13", "nope"])
    assert covering == {"r01": ("h1",), "r03": ("h2",), "r05": ("h2",)}
    assert await loaded.holds_covering([]) == {}


async def test_store_refuses_bad_holds(loaded: SqliteStore) -> None:
    await loaded.add_hold(hold("h1", "from:alice@corp.example"))
    with pytest.raises(InvalidRequest, match="exists already"):
        await loaded.add_hold(hold("h1", "lunch"))
    with pytest.raises(InvalidRequest):  # QuerySyntaxError is an InvalidRequest
        await loaded.add_hold(hold("h2", "from:"))
    with pytest.raises(InvalidRequest):
        await loaded.add_hold(hold("", "lunch"))
    with pytest.raises(InvalidRequest):
        await loaded.add_hold(
            HoldRecord("h3", "C", "o", T0, "{}", "lunch", released_at=T0, released_by="x")
        )
    assert [h.hold_id for h in await loaded.list_holds()] == ["h1"]


async def test_an_unreadable_hold_stops_the_purge(loaded: SqliteStore, db_path: Path) -> None:
    await expire(loaded, "r01", "r02")
    await loaded.add_hold(hold("h1", "from:alice@corp.example"))
    with raw(db_path) as conn:
        conn.execute("UPDATE holds SET query = 'from:' WHERE id = 'h1'")
    with pytest.raises(StoreCorrupted, match="h1"):
        await loaded.purge(NOW)
    assert await loaded.get("r01") is not None and await loaded.get("r02") is not None


# --- tampering around tombstones -------------------------------------------------------------


@pytest.fixture
async def purged(loaded: SqliteStore) -> SqliteStore:
    """The loaded store with r03 (seq 3) purged."""
    await expire(loaded, "r03")
    await loaded.purge(NOW)
    return loaded


async def test_edited_tombstone_hash_breaks_the_next_link(
    purged: SqliteStore, db_path: Path
) -> None:
    with raw(db_path) as conn:
        conn.execute("UPDATE ledger SET hash = zeroblob(32) WHERE id = (1 << 40) | 3")
    report = await purged.verify()
    assert report.first_break is not None and report.first_break.seq == 4
    assert "previous-hash" in report.first_break.problem


async def test_edited_neighbour_of_a_tombstone_is_named(purged: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        payload = payload_at(db_path, 4)
        conn.execute(
            "UPDATE ledger SET payload = ? WHERE id = (1 << 40) | 4",
            (payload.replace(b"everyone", b"no one"),),
        )
    report = await purged.verify()
    assert report.first_break is not None and report.first_break.seq == 4
    assert "edited" in report.first_break.problem


async def test_deleted_tombstone_is_a_gap(purged: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("DELETE FROM ledger WHERE id = (1 << 40) | 3")
    report = await purged.verify()
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.problem) == (3, "entries 3..3 are missing")


async def test_a_forged_tombstone_without_a_purge_is_detected(
    purged: SqliteStore, db_path: Path
) -> None:
    """Someone deletes r05 and dresses the deletion up as a purge, without a purge record."""
    forged = Tombstone("r05", NOW, "short", PAST).payload()
    with raw(db_path) as conn:
        (entry, rowid, body, subject) = conn.execute(
            "SELECT entry, id, body, subject FROM records WHERE record_id = 'r05'"
        ).fetchone()
        conn.execute("UPDATE ledger SET payload = ? WHERE id = ?", (forged, entry))
        conn.execute(
            "INSERT INTO fts (fts, rowid, body, subject) VALUES ('delete', ?, ?, ?)",
            (rowid, body, subject),
        )
        conn.execute("DELETE FROM observations WHERE entry = ?", (entry,))
        conn.execute("DELETE FROM records WHERE record_id = 'r05'")
    report = await purged.verify()
    assert [(p.seq, p.record_id) for p in report.problems] == [(5, "r05")]
    assert "no purge of the record is recorded" in report.problems[0].problem


async def test_a_tombstone_before_expiry_is_detected(purged: SqliteStore, db_path: Path) -> None:
    early = Tombstone("r03", NOW, "short", NOW + DAY).payload()
    with raw(db_path) as conn:
        conn.execute("UPDATE ledger SET payload = ? WHERE id = (1 << 40) | 3", (early,))
        conn.execute(
            "UPDATE retention SET expires_us = expires_us + 2 * 86400000000 WHERE record_id = 'r03'"
        )
    report = await purged.verify()
    assert [(p.seq, p.problem) for p in report.problems] == [
        (3, "tombstone records a purge before the record expired")
    ]


async def test_a_tombstone_unlike_its_purge_record_is_detected(
    purged: SqliteStore, db_path: Path
) -> None:
    other = Tombstone("r03", NOW, "much-shorter", PAST).payload()
    with raw(db_path) as conn:
        conn.execute("UPDATE ledger SET payload = ? WHERE id = (1 << 40) | 3", (other,))
    report = await purged.verify()
    assert [(p.seq, p.problem) for p in report.problems] == [
        (3, "tombstone differs from the recorded purge")
    ]


async def test_a_malformed_tombstone_is_named(purged: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute(
            "UPDATE ledger SET payload = ? WHERE id = (1 << 40) | 3",
            (b'{"op":"tombstone","record_id":"r03"}',),
        )
    report = await purged.verify()
    assert report.first_break is not None and report.first_break.seq == 3
    assert "malformed tombstone" in report.first_break.problem


async def test_data_left_under_a_tombstone_is_detected(purged: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute(
            "INSERT INTO observations VALUES ((1 << 40) | 3, 0, 'r03', '{\"forged\":true}')"
        )
    report = await purged.verify()
    assert [(p.seq, p.problem) for p in report.problems] == [
        (3, "data of a purged entry is still stored")
    ]


def test_tombstone_payloads_parse_strictly() -> None:
    tombstone = Tombstone("r1", NOW, "3y", PAST)
    assert Tombstone.from_payload(tombstone.payload()) == tombstone
    assert Tombstone.from_payload(b'{"op":"record","record_id":"x"}') is None
    assert Tombstone.from_payload(b"not json at all") is None
    for bad in (
        b'{"op":"tombstone"}',
        b'{"op":"tombstone","record_id":1,"purged_at":"x","retention_class":"a","expires_at":"y"}',
        tombstone.payload().replace(b'"op"', b' "op"'),  # not canonical
        b'{"op":"tombstone",',
    ):
        with pytest.raises(ValueError):
            Tombstone.from_payload(bad)
    assert datetime.fromisoformat(tombstone.to_json()["purged_at"]).tzinfo == UTC
