"""The published block list's table in the SQLite store."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from archive_api.store.base import BlocklistEntry
from archive_api.store.errors import InvalidRequest
from archive_api.store.sqlite import SqliteStore

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def entry(value: str, state: str = "listed", kind: str = "jid", **fields: str) -> BlocklistEntry:
    return BlocklistEntry(
        kind=kind,
        value=value,
        state=state,
        origin=fields.get("origin", "rule"),
        reason=fields.get("reason", "test"),
        updated=AT,
        actor=fields.get("actor"),
    )


async def test_entries_are_kept_replaced_and_filtered(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "a.sqlite3") as store:
        assert await store.blocklist_version() == 0
        v1 = await store.put_blocklist_entries(
            [entry("b@spam.example"), entry("a@spam.example", "pending")]
        )
        v2 = await store.put_blocklist_entries(
            [entry("spam.example", kind="domain"), entry("a@spam.example", "listed")]
        )
        assert v2 > v1 > 0
        assert await store.blocklist_version() == v2
        listed = await store.blocklist_entries(state="listed")
        assert [(e.kind, e.value) for e in listed] == [
            ("domain", "spam.example"),
            ("jid", "a@spam.example"),
            ("jid", "b@spam.example"),
        ]
        jids = await store.blocklist_entries(kind="jid")
        assert len(jids) == 2
        found = await store.blocklist_entry("jid", "a@spam.example")
        assert found is not None and found.state == "listed" and found.updated == AT
        assert await store.blocklist_entry("jid", "nobody@spam.example") is None


async def test_entries_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    async with await SqliteStore.open(path) as store:
        await store.put_blocklist_entries([entry("x@spam.example", actor="officer-1")])
    async with await SqliteStore.open(path) as store:
        found = await store.blocklist_entry("jid", "x@spam.example")
        assert found is not None and found.actor == "officer-1"
        assert await store.blocklist_version() == 1


async def test_a_store_made_before_the_block_list_gets_its_table(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    async with await SqliteStore.open(path):
        pass
    with sqlite3.connect(path) as conn:  # as a store from before this schema section
        conn.execute("DROP TABLE blocklist_entries")
        conn.execute("DELETE FROM meta WHERE key IN ('blocklist_schema', 'blocklist_version')")
    async with await SqliteStore.open(path) as store:
        assert await store.blocklist_entries() == ()
        await store.put_blocklist_entries([entry("x@spam.example")])
        assert len(await store.blocklist_entries()) == 1


@pytest.mark.parametrize(
    "bad",
    [
        entry("x@spam.example", kind="ip"),
        entry("x@spam.example", state="maybe"),
        entry("x@spam.example", origin="robot"),
        entry(""),
        entry("x" * 5000),
        entry("x@spam.example", reason="r" * 5000),
    ],
)
async def test_invalid_entries_are_refused_and_nothing_is_written(
    tmp_path: Path, bad: BlocklistEntry
) -> None:
    async with await SqliteStore.open(tmp_path / "a.sqlite3") as store:
        with pytest.raises(InvalidRequest):
            await store.put_blocklist_entries([entry("ok@spam.example"), bad])
        assert await store.blocklist_entries() == ()
        assert await store.blocklist_version() == 0


async def test_a_large_list_is_written_in_one_transaction(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "a.sqlite3") as store:
        many = [entry(f"u{i}@spam.example") for i in range(20_000)]
        version = await store.put_blocklist_entries(many)
        assert version == 1
        assert len(await store.blocklist_entries(state="listed")) == 20_000
