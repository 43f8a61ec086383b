"""The audit log and API tokens on SQLite: conformance, tampering by hand, durability, locking."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from archive_api.store.audit import AUDIT_CHAIN, AuditRow, row_payload
from archive_api.store.chain import CheckpointSigner, link_hash
from archive_api.store.errors import StoreCorrupted
from archive_api.store.sqlite import SqliteStore
from tests.archive_api.store.audit_conformance import (
    AuditStoreConformance,
    TokenStoreConformance,
    entry,
    token,
)
from tests.archive_api.store.conformance import StoreFactory


@pytest.fixture(params=["file", "memory"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    counter = iter(range(1_000_000))

    async def factory() -> SqliteStore:
        where = ":memory:" if request.param == "memory" else tmp_path / f"a-{next(counter)}.db"
        return await SqliteStore.open(where)

    yield factory


class TestSqliteAuditConformance(AuditStoreConformance):
    pass


class TestSqliteTokenConformance(TokenStoreConformance):
    pass


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A second, ordinary connection: how someone with file access would tamper."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


SIGNER = CheckpointSigner.generate()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "archive.sqlite3"


@pytest.fixture
async def ten(db_path: Path) -> Path:
    """A closed store file with events 1..10, signed at 5 and 10."""
    store = await SqliteStore.open(db_path)
    try:
        events = await store.append_audit([entry(i) for i in range(10)])
        for seq in (5, 10):
            await store.add_audit_checkpoint(SIGNER.sign(AUDIT_CHAIN, seq, events[seq - 1].hash))
    finally:
        await store.close()
    return db_path


async def first_break(path: Path) -> tuple[int, str]:
    store = await SqliteStore.open(path)
    try:
        report = await store.verify_audit(public_key=SIGNER.public_key)
    finally:
        await store.close()
    assert report.first_break is not None, "tampering went unnoticed"
    return report.first_break.seq, report.first_break.problem


async def test_untouched_log_verifies(ten: Path) -> None:
    store = await SqliteStore.open(ten)
    try:
        report = await store.verify_audit(public_key=SIGNER.public_key)
        assert report.ok, report.problems
        assert (report.last_seq, report.events_checked, report.checkpoints_checked) == (10, 10, 2)
        # The archive's own verification is not disturbed by the audit tables.
        assert (await store.verify()).ok
    finally:
        await store.close()


async def test_an_edited_parameter_is_found_at_its_seq(ten: Path) -> None:
    with raw(ten) as conn:
        (params,) = conn.execute("SELECT params FROM audit_events WHERE seq = 4").fetchone()
        assert "n3" in params
        conn.execute(
            "UPDATE audit_events SET params = ? WHERE seq = 4", (params.replace("n3", "n9"),)
        )
    assert await first_break(ten) == (4, "content does not match its hash (edited)")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("actor", "token:someone-else"),
        ("role", "admin"),
        ("action", "view"),
        ("result_count", 0),
        ("outcome", "denied"),
        ("at_us", 0),
    ],
)
async def test_any_edited_field_is_found(ten: Path, column: str, value: object) -> None:
    with raw(ten) as conn:
        conn.execute(f"UPDATE audit_events SET {column} = ? WHERE seq = 7", (value,))  # noqa: S608
    assert await first_break(ten) == (7, "content does not match its hash (edited)")


async def test_a_deleted_event_is_found_at_its_seq(ten: Path) -> None:
    with raw(ten) as conn:
        conn.execute("DELETE FROM audit_events WHERE seq = 6")
    assert await first_break(ten) == (6, "event 6 is missing (deleted)")


async def test_two_swapped_events_are_found_at_the_first(ten: Path) -> None:
    with raw(ten) as conn:
        conn.execute("UPDATE audit_events SET seq = -3 WHERE seq = 3")
        conn.execute("UPDATE audit_events SET seq = 3 WHERE seq = 7")
        conn.execute("UPDATE audit_events SET seq = 7 WHERE seq = -3")
    assert await first_break(ten) == (3, "previous-hash does not match the event before it")


async def test_a_bad_checkpoint_signature_is_found_at_its_seq(ten: Path) -> None:
    with raw(ten) as conn:
        (signature,) = conn.execute(
            "SELECT signature FROM audit_checkpoints WHERE seq = 5"
        ).fetchone()
        forged = bytes([signature[0] ^ 1]) + signature[1:]
        conn.execute("UPDATE audit_checkpoints SET signature = ? WHERE seq = 5", (forged,))
    assert await first_break(ten) == (5, "checkpoint signature does not verify")


async def test_a_rewritten_and_rehashed_chain_is_caught_by_its_checkpoint(ten: Path) -> None:
    """Someone who edits an event and recomputes every later hash still cannot re-sign."""
    with raw(ten) as conn:
        rows = [AuditRow(*r) for r in conn.execute("SELECT * FROM audit_events ORDER BY seq")]
        prev = rows[2].hash
        for row in rows[3:]:
            if row.seq == 4:
                row = row._replace(params=row.params.replace("n3", "n9"))
            fixed = row._replace(prev_hash=prev)
            fixed = fixed._replace(hash=link_hash(prev, row.seq, row_payload(fixed)))
            conn.execute(
                "UPDATE audit_events SET params = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (fixed.params, fixed.prev_hash, fixed.hash, fixed.seq),
            )
            prev = fixed.hash
        conn.execute("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,))
    assert await first_break(ten) == (5, "stored hash differs from the signed checkpoint")


async def test_a_removed_tail_is_found(ten: Path) -> None:
    with raw(ten) as conn:
        conn.execute("DELETE FROM audit_events WHERE seq > 8")
    seq, problem = await first_break(ten)
    assert seq == 9 and "ends at seq 8 but its head was recorded at seq 10" in problem


async def test_a_removed_tail_with_its_head_rewound_is_caught_by_the_checkpoint(ten: Path) -> None:
    with raw(ten) as conn:
        (head,) = conn.execute("SELECT hash FROM audit_events WHERE seq = 8").fetchone()
        conn.execute("DELETE FROM audit_events WHERE seq > 8")
        conn.execute("UPDATE audit_head SET seq = 8, hash = ? WHERE id = 1", (head,))
    assert await first_break(ten) == (
        10,
        "a signed checkpoint lies past the end of the log (truncated)",
    )


async def test_a_deleted_head_record_is_reported_and_stops_appends(ten: Path) -> None:
    with raw(ten) as conn:
        conn.execute("DELETE FROM audit_head")
    assert await first_break(ten) == (10, "the log's recorded head is missing")
    store = await SqliteStore.open(ten)
    try:
        with pytest.raises(StoreCorrupted, match="head"):
            await store.append_audit([entry(11)])
        with pytest.raises(StoreCorrupted, match="head"):
            await store.audit_head()
    finally:
        await store.close()


async def test_a_rewound_head_stops_appends_instead_of_forking(ten: Path) -> None:
    with raw(ten) as conn:
        conn.execute("UPDATE audit_head SET seq = 3 WHERE id = 1")
    store = await SqliteStore.open(ten)
    try:
        with pytest.raises(StoreCorrupted, match="behind"):
            await store.append_audit([entry(11)])
        assert (await store.audit_head()).seq == 3  # nothing was written
    finally:
        await store.close()


async def test_events_and_tokens_survive_reopening(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    events = await store.append_audit([entry(i) for i in range(3)])
    await store.add_token(token("ops"))
    await store.close()
    store = await SqliteStore.open(db_path)
    try:
        assert (await store.audit_events(newest_first=False)).events == events
        assert await store.token_by_name("ops") == token("ops")
    finally:
        await store.close()


async def test_two_connections_appending_at_once_keep_one_chain(db_path: Path) -> None:
    """Two stores on one file stand for two processes (the service and a CLI command)."""
    first = await SqliteStore.open(db_path)
    second = await SqliteStore.open(db_path)
    try:

        async def append(store: SqliteStore, who: str) -> None:
            for i in range(40):
                await store.append_audit([entry(i, actor=who)])

        await asyncio.gather(append(first, "token:a"), append(second, "token:b"))
        report = await first.verify_audit()
        assert report.ok, report.problems
        assert report.last_seq == 80
        page = await second.audit_events(limit=100)
        assert sorted(e.seq for e in page.events) == list(range(1, 81))
        assert sum(e.actor == "token:a" for e in page.events) == 40
    finally:
        await first.close()
        await second.close()


async def test_a_store_from_before_the_audit_log_gains_its_tables(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    await store.close()
    with raw(db_path) as conn:
        for table in ("audit_events", "audit_head", "audit_checkpoints", "api_tokens"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("DELETE FROM meta WHERE key = 'access_schema'")
    store = await SqliteStore.open(db_path)
    try:
        [event] = await store.append_audit([entry(0)])
        assert event.seq == 1
        await store.add_token(token("ops"))
    finally:
        await store.close()


async def test_an_unknown_future_audit_schema_is_refused(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    await store.close()
    with raw(db_path) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'access_schema'")
    with pytest.raises(StoreCorrupted, match="audit/token schema 99"):
        await SqliteStore.open(db_path)
