"""SQLite-specific behaviour: file settings, tamper detection, time slots, threading, errors."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from archive_api.store.base import VerifyReport
from archive_api.store.errors import StoreCorrupted, StoreUnavailable
from archive_api.store.query import parse_query
from archive_api.store.records import RecordStatus
from archive_api.store.sqlite import SqliteStore, _plan
from tests.archive_api.store.conformance import (
    SHA_A,
    SHA_B,
    T0,
    ChainWriter,
    corpus,
    fetch_failed,
    fetch_ok,
    observation,
    observe_entry,
    record,
    search_all,
    status_entry,
    with_upload,
)


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
    """The corpus (seq 1..15), then an OBSERVE (16) and a STATUS (17)."""
    writer = ChainWriter()
    await store.apply(writer.records(*corpus()))
    await store.apply(
        writer.add(
            observe_entry("r01", observation("alice@corp.example/laptop")),
            status_entry("r04", RecordStatus.RELEASED, T0 + timedelta(days=3)),
        )
    )
    return store


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A second, ordinary connection: how someone with file access would tamper."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def seq_of(conn: sqlite3.Connection, record_id: str) -> int:
    (entry,) = conn.execute(
        "SELECT entry FROM records WHERE record_id = ?", (record_id,)
    ).fetchone()
    return int(entry) & ((1 << 40) - 1)


def located(report: VerifyReport) -> list[tuple[str | None, int | None]]:
    return [(p.chain, p.seq) for p in report.problems]


# --- the file --------------------------------------------------------------------------


async def test_file_settings(store: SqliteStore, db_path: Path) -> None:
    await store.apply(ChainWriter().records(record("a")))
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        (sql,) = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'fts'").fetchone()
        assert "unicode61 remove_diacritics 2" in sql
        assert "content = 'records'" in sql
    synchronous = await store._run(lambda: store._conn.execute("PRAGMA synchronous").fetchone())
    assert synchronous == (1,)  # NORMAL


async def test_data_survives_reopening(db_path: Path) -> None:
    writer = ChainWriter()
    async with await SqliteStore.open(db_path) as store:
        await store.apply(writer.records(*corpus()))
    async with await SqliteStore.open(db_path) as store:
        assert await store.last_seq() == 15
        assert await store.count("guaranteed") == 3
        await store.apply(writer.records(record("later", at=T0 + timedelta(days=30))))
        assert (await store.verify()).ok


async def test_foreign_and_damaged_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreCorrupted):
        await SqliteStore.open(junk)
    other = tmp_path / "other.db"
    with raw(other) as conn:
        conn.execute("CREATE TABLE notes (x)")
    with pytest.raises(StoreCorrupted):
        await SqliteStore.open(other)
    newer = tmp_path / "newer.db"
    async with await SqliteStore.open(newer):
        pass
    with raw(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreCorrupted, match="schema version 99"):
        await SqliteStore.open(newer)


async def test_a_version_1_store_is_upgraded(db_path: Path) -> None:
    writer = ChainWriter()
    async with await SqliteStore.open(db_path) as store:
        await store.apply(writer.records(with_upload("u1")))
    with raw(db_path) as conn:  # what a store written before attachment fetches looks like
        conn.execute("DROP TABLE attachment_fetches")
        conn.execute("PRAGMA user_version = 1")
    async with await SqliteStore.open(db_path) as store:
        await store.apply(writer.add(fetch_ok("u1")))
        got = await store.get("u1")
        assert got is not None and got.attachments[0].sha256 == SHA_A
        assert (await store.verify()).ok
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)


async def test_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        await SqliteStore.open(tmp_path / "missing-dir" / "archive.db")


async def test_locked_database_is_unavailable(db_path: Path) -> None:
    async with await SqliteStore.open(db_path, busy_timeout_ms=50) as store:
        with raw(db_path) as other:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailable):
                await store.apply(ChainWriter().records(record("a")))
            other.execute("ROLLBACK")
        await store.apply(ChainWriter().records(record("a")))
        assert await store.count("") == 1


async def test_dropped_table_reads_as_corrupted(store: SqliteStore, db_path: Path) -> None:
    await store.apply(ChainWriter().records(record("a")))
    with raw(db_path) as conn:
        conn.execute("DROP TABLE statuses")
    with pytest.raises(StoreCorrupted):
        await store.get("a")


# --- tamper detection ------------------------------------------------------------------


async def test_untouched_store_verifies(loaded: SqliteStore) -> None:
    report = await loaded.verify()
    assert report.ok, report.problems
    assert report.entries_checked == 17 and report.records_checked == 15
    assert report.first_break is None


async def test_edited_body_is_named(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("UPDATE records SET body = 'nothing to see' WHERE record_id = 'r03'")
        seq = seq_of(conn, "r03")
    report = await loaded.verify()
    assert report.first_break is not None
    assert (report.first_break.chain, report.first_break.seq) == ("spool", seq)
    assert report.first_break.record_id == "r03"
    assert "body" in report.first_break.problem
    # The FTS index still holds the old words: that is reported too, without a seq.
    assert any("full-text index" in p.problem for p in report.problems)


async def test_edited_sender_and_time_are_named(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("UPDATE records SET sender = 'nobody@corp.example' WHERE record_id = 'r05'")
        # Moving a record's rowid would hide it from time-window searches.
        conn.execute("UPDATE records SET id = id + 1024 * 1000000 WHERE record_id = 'r06'")
        seqs = {seq_of(conn, "r05"), seq_of(conn, "r06")}
    report = await loaded.verify()
    problems = {p.seq: p.problem for p in report.problems if p.seq is not None}
    assert set(problems) == seqs
    assert "sender" in problems[seq_of_id(report, "r05")]
    assert "wrong time" in problems[seq_of_id(report, "r06")]


def seq_of_id(report: VerifyReport, record_id: str) -> int:
    return next(p.seq for p in report.problems if p.record_id == record_id and p.seq is not None)


async def test_edited_payload_is_named(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        seq = seq_of(conn, "r02")
        (payload,) = conn.execute(
            "SELECT payload FROM ledger WHERE id = (1 << 40) | ?", (seq,)
        ).fetchone()
        conn.execute(
            "UPDATE ledger SET payload = ? WHERE id = (1 << 40) | ?",
            (payload.replace(b"lunch", b"brunch"), seq),
        )
    report = await loaded.verify()
    assert report.first_break is not None and report.first_break.seq == seq
    assert "edited" in report.first_break.problem


async def test_deleted_ledger_row_is_a_gap(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("DELETE FROM ledger WHERE id = (1 << 40) | 7")
    report = await loaded.verify()
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.problem) == (7, "entries 7..7 are missing")
    # r07's row now points at nothing, which is reported at the same place.
    assert all(p.seq == 7 for p in report.problems)


async def test_deleted_tail_is_a_truncation(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("DELETE FROM ledger WHERE id >= (1 << 40) | 16")
        conn.execute("DELETE FROM observations WHERE entry >= (1 << 40) | 16")
        conn.execute("DELETE FROM statuses WHERE entry >= (1 << 40) | 16")
    report = await loaded.verify()
    assert report.first_break is not None and report.first_break.seq == 16
    assert "removed from the end" in report.first_break.problem


async def test_deleted_record_row_is_named(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        seq = seq_of(conn, "r08")
        conn.execute("DELETE FROM records WHERE record_id = 'r08'")
    report = await loaded.verify()
    assert report.first_break is not None
    assert (report.first_break.seq, report.first_break.record_id) == (seq, "r08")
    assert "missing from the records table" in report.first_break.problem


async def test_swapped_payloads_are_detected(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        rows = dict(
            conn.execute("SELECT id, payload FROM ledger WHERE id IN ((1<<40)|4, (1<<40)|9)")
        )
        a, b = sorted(rows)
        conn.execute("UPDATE ledger SET payload = ? WHERE id = ?", (rows[b], a))
        conn.execute("UPDATE ledger SET payload = ? WHERE id = ?", (rows[a], b))
    report = await loaded.verify()
    assert report.first_break is not None and report.first_break.seq == 4
    assert {4, 9} <= {p.seq for p in report.problems}


async def test_swapped_record_rows_are_detected(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        bodies = dict(
            conn.execute("SELECT record_id, body FROM records WHERE record_id IN ('r01', 'r05')")
        )
        for rid, other in (("r01", "r05"), ("r05", "r01")):
            conn.execute("UPDATE records SET body = ? WHERE record_id = ?", (bodies[other], rid))
        seqs = {seq_of(conn, "r01"), seq_of(conn, "r05")}
    report = await loaded.verify()
    assert seqs <= {p.seq for p in report.problems}


async def test_forged_rows_are_detected(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("DELETE FROM observations WHERE entry = (1 << 40) | 16")
        conn.execute("UPDATE statuses SET status = 'held' WHERE entry = (1 << 40) | 17")
        conn.execute(
            "INSERT INTO observations VALUES ((1 << 40) | 3, 1, 'r03', '{\"forged\":true}')"
        )
        conn.execute("INSERT INTO statuses VALUES ((7 << 40) | 1, 'r01', 'released', NULL, 'x', 1)")
    report = await loaded.verify()
    assert {(p.seq, p.record_id) for p in report.problems if p.seq} == {
        (16, "r01"),
        (17, "r04"),
        (3, "r03"),
    }
    assert any("unknown chain" in p.problem for p in report.problems)


async def test_forged_attachment_fetches_are_detected(store: SqliteStore, db_path: Path) -> None:
    writer = ChainWriter()
    await store.apply(writer.records(with_upload("f1"), with_upload("f2")))
    await store.apply(writer.add(fetch_ok("f1"), fetch_failed("f2"), fetch_ok("f2", SHA_B, 5)))
    assert (await store.verify()).ok
    with raw(db_path) as conn:
        # Swap the stored file's digest, turn a failure into a success, drop a row, add one.
        conn.execute("UPDATE attachment_fetches SET sha256 = ? WHERE seq = 3", (SHA_B,))
        conn.execute(
            "UPDATE attachment_fetches SET status = 'ok', sha256 = ?, size = 1 WHERE seq = 4",
            (SHA_A,),
        )
        conn.execute("DELETE FROM attachment_fetches WHERE seq = 5")
        conn.execute(
            "INSERT INTO attachment_fetches VALUES ((1 << 40) | 1, 'f1', 'https://x/', 'ok', "
            "?, 1, NULL, NULL, 1, NULL, 'spool', 1)",
            (SHA_A,),
        )
        conn.execute(
            "INSERT INTO attachment_fetches VALUES ((9 << 40) | 1, 'f1', 'https://x/', 'ok', "
            "?, 1, NULL, NULL, 1, NULL, 'x', 1)",
            (SHA_A,),
        )
    report = await store.verify()
    assert {(p.seq, p.record_id) for p in report.problems if p.seq} == {
        (1, "f1"),
        (3, "f1"),
        (4, "f2"),
        (5, "f2"),
    }
    assert any("unknown chain" in p.problem for p in report.problems)
    assert all("attachment" in p.problem or "unknown chain" in p.problem for p in report.problems)


async def test_edited_chain_head_is_detected(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("UPDATE chains SET last_seq = 20")
    report = await loaded.verify()
    assert report.first_break is not None and report.first_break.seq == 18


# --- time slots ------------------------------------------------------------------------


async def test_more_than_1024_records_in_one_microsecond(store: SqliteStore) -> None:
    writer = ChainWriter()
    same = [record(f"s{i:04d}", at=T0) for i in range(1100)]
    after = record("after", at=T0 + timedelta(microseconds=1))
    after2 = record("after2", at=T0 + timedelta(microseconds=1))
    await store.apply(writer.records(*same[:600]))
    # One batch: a neighbour slot gets an id, then the overflow spills into that very slot,
    # then the neighbour slot is used again.
    await store.apply(writer.records(after, *same[600:], after2))
    assert await store.count("") == 1102
    assert await store.count("before:2026-01-15T12:00:00.000001Z") == 1100
    assert await store.count("after:2026-01-15T12:00:00.000001Z") == 2
    assert (
        await store.count("after:2026-01-15T12:00:00Z before:2026-01-15T12:00:00.000001Z") == 1100
    )
    assert (await store.verify()).ok
    newest = await search_all(store, "", sort="time")
    assert len(newest) == len(set(newest)) == 1102


async def test_times_far_outside_the_slot_range(store: SqliteStore) -> None:
    ancient = record("ancient", at=datetime(1500, 6, 1, tzinfo=UTC))
    future = record("future", at=datetime(2600, 6, 1, tzinfo=UTC))
    naive = replace(record("naive"), occurred_at=datetime(2026, 1, 15, 12))  # read as UTC
    await store.apply(ChainWriter().records(ancient, future, naive))
    assert await search_all(store, "before:1600-01-01") == ["ancient"]
    assert await search_all(store, "after:2500-01-01") == ["future"]
    assert await search_all(store, "after:1600-01-01 before:2500-01-01") == ["naive"]
    assert await search_all(store, "before:2700-01-01 after:2599-01-01") == ["future"]
    assert await search_all(store, "", sort="time_asc") == ["ancient", "naive", "future"]
    assert (await store.verify()).ok


async def test_late_records_take_their_place_in_time(store: SqliteStore) -> None:
    writer = ChainWriter()
    await store.apply(writer.records(record("b", at=T0 + timedelta(hours=2))))
    await store.apply(writer.records(record("c", at=T0 + timedelta(hours=3))))
    await store.apply(writer.records(record("a", at=T0 + timedelta(hours=1))))  # offline, late
    assert await search_all(store, "", sort="time_asc") == ["a", "b", "c"]


# --- query plans -----------------------------------------------------------------------


def plan_of(store: SqliteStore, query: str) -> str:
    plan = _plan(parse_query(query), 0)
    sql = f"SELECT r.id FROM {plan.source} WHERE {plan.where} ORDER BY {plan.id_col} DESC"  # noqa: S608
    rows = store._conn.execute("EXPLAIN QUERY PLAN " + sql, plan.all_params()).fetchall()
    return " | ".join(str(row[-1]) for row in rows)


async def test_time_windows_are_rowid_ranges(loaded: SqliteStore) -> None:
    window = "after:2026-01-16 before:2026-01-17"
    text_plan = await loaded._run(plan_of, loaded, f"deal {window}")
    plain_plan = await loaded._run(plan_of, loaded, window)
    assert "SEARCH r USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plain_plan
    assert "VIRTUAL TABLE INDEX" in text_plan and "TEMP B-TREE" not in text_plan


async def test_domain_and_party_filters_use_indexes(loaded: SqliteStore) -> None:
    domain_plan = await loaded._run(plan_of, loaded, "from:*@partner.example")
    assert "INDEX records_sender_domain (sender_domain=?)" in domain_plan
    assert "TEMP B-TREE" not in domain_plan  # the index already yields time order
    bare_plan = await loaded._run(plan_of, loaded, "to:bob@partner.example")
    assert "INDEX records_recipient (recipient=?)" in bare_plan


# --- threading -------------------------------------------------------------------------


async def test_big_batches_do_not_block_the_event_loop(store: SqliteStore) -> None:
    writer = ChainWriter()
    links = writer.records(
        *(record(f"b{i:05d}", at=T0 + timedelta(seconds=i)) for i in range(3000))
    )
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await store.apply(links)
    done.set()
    await task
    assert ticks > 1
    assert await store.last_seq() == 3000


async def test_concurrent_calls_are_serialised_safely(store: SqliteStore) -> None:
    writer = ChainWriter()
    batches = [
        writer.records(
            *(record(f"c{b}-{i}", at=T0 + timedelta(minutes=b, seconds=i)) for i in range(50))
        )
        for b in range(10)
    ]

    async def reader() -> int:
        return await store.count("hello")

    results = await asyncio.gather(
        *(store.apply(b) for b in batches), *(reader() for _ in range(10))
    )
    assert all(isinstance(r, int) for r in results[10:])
    assert await store.count("") == 500
    assert (await store.verify()).ok


async def test_unreadable_rows_read_as_corrupted(loaded: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("UPDATE observations SET obs = '{\"forged\":true}' WHERE record_id = 'r03'")
    with pytest.raises(StoreCorrupted):
        await loaded.get("r03")
    with pytest.raises(StoreCorrupted):
        await loaded.search("cafe")
    assert await loaded.get("r01") is not None


async def test_chain_links_stay_inside_their_chain(loaded: SqliteStore) -> None:
    other = ChainWriter()
    await loaded.apply(other.records(record("o1")), chain="other")
    assert [link.seq async for link in loaded.chain_links(-5, 2)] == [1, 2]
    assert [link.seq async for link in loaded.chain_links(16)] == [16, 17]
    assert [link async for link in loaded.chain_links(1 << 41)] == []
    assert [link async for link in loaded.chain_links(5, -1)] == []
    assert [link async for link in loaded.chain_links(chain="other")] == other.links
