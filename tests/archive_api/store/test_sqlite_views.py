"""The store's reads for the API's views: record positions, edit histories, dashboard activity."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from archive_api.store.base import MAX_LINKED_RECORDS, ChainPosition
from archive_api.store.errors import InvalidRequest
from archive_api.store.records import ArchiveRecord, Direction
from archive_api.store.sqlite import SqliteStore
from classifier.verdict import Action, Reason, Verdict
from tests.archive_api.store.conformance import T0, ChainWriter, observation, observe_entry, record


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "archive.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


def minutes(n: int) -> datetime:
    return T0 + timedelta(minutes=n)


async def test_record_position_names_chain_and_seq(store: SqliteStore) -> None:
    spool, other = ChainWriter(), ChainWriter()
    await store.apply(spool.records(record("a"), record("b", at=minutes(1))))
    await store.apply(spool.add(observe_entry("a", observation("bob@partner.example/x"))))
    await store.apply(other.records(record("c")), chain="proxy-2")
    assert await store.record_position("b") == ChainPosition("spool", 2)
    assert await store.record_position("c") == ChainPosition("proxy-2", 1)
    assert await store.record_position("nope") is None
    assert await store.record_position("' OR 1=1 --") is None


async def test_linked_records_give_the_whole_history_either_way(store: SqliteStore) -> None:
    writer = ChainWriter()
    original = record("orig", message_id="m1")
    fix1 = record("fix1", at=minutes(1), replaces_id="m1")
    fix2 = record("fix2", at=minutes(2), replaces_id="origin-orig")  # by origin id
    gone = record("gone", at=minutes(3), retracts_id="m1", body=None)
    # Same message id from someone else: not part of alice's history.
    stranger = record("other", at=minutes(4), sender="mallory@bad.example", replaces_id="m1")
    plain = record("plain", at=minutes(5))
    await store.apply(writer.records(original, fix1, fix2, gone, stranger, plain))
    linked = await store.linked_records(["orig", "fix1", "gone", "plain", "other", "nope"])
    assert [r.record_id for r in linked["orig"]] == ["fix1", "fix2", "gone"]
    assert [r.record_id for r in linked["fix1"]] == ["orig", "fix2", "gone"]
    assert [r.record_id for r in linked["gone"]] == ["orig", "fix1", "fix2"]
    assert "plain" not in linked and "nope" not in linked
    assert "other" not in linked  # its "original" is not from its sender
    assert linked["orig"][0].body == "hello"  # full records, with their content


async def test_linked_records_are_bounded(store: SqliteStore) -> None:
    writer = ChainWriter()
    fixes = [
        record(f"fix{n}", at=minutes(n + 1), replaces_id="m1")
        for n in range(MAX_LINKED_RECORDS + 5)
    ]
    await store.apply(writer.records(record("orig", message_id="m1"), *fixes))
    linked = await store.linked_records(["orig"])
    assert len(linked["orig"]) == MAX_LINKED_RECORDS
    with pytest.raises(InvalidRequest):
        await store.linked_records([f"id{n}" for n in range(1001)])
    assert await store.linked_records([]) == {}


def judged(record_id: str, at: datetime, action: Action, *rules: str, sender: str) -> ArchiveRecord:
    """An incoming message (the sender is the remote party) with a verdict of its own."""
    reasons = tuple(Reason(rule, "x", 1.0, action) for rule in rules)
    incoming = record(
        record_id,
        at=at,
        sender=sender,
        recipient="alice@corp.example",
        direction=Direction.TO_CLIENT,
    )
    return replace(
        incoming,
        verdict=Verdict(action, 1.0, reasons),
    )


async def test_activity_counts_days_blocked_domains_and_rules(store: SqliteStore) -> None:
    day1 = datetime(2026, 3, 1, 10, tzinfo=UTC)
    day2 = day1 + timedelta(days=1)
    records = [
        record("ok1", at=day1),
        record("ok2", at=day2),
        judged("rej1", day1, Action.REJECT, "federation", sender="a@bad.example"),
        judged("rej2", day2, Action.REJECT, "federation", "model", sender="b@bad.example"),
        judged("drop", day2, Action.DROP, "blocklist", sender="c@worse.example"),
        judged("held", day2, Action.QUARANTINE, "model", sender="d@worse.example"),
        judged("later", day2 + timedelta(days=5), Action.REJECT, "x", sender="e@late.example"),
    ]
    await store.apply(ChainWriter().records(*records))
    since = datetime(2026, 3, 1, tzinfo=UTC)
    activity = await store.activity(since, since + timedelta(days=2), top=5)
    assert [(d.day, d.total) for d in activity.days] == [
        (date(2026, 3, 1), 2),
        (date(2026, 3, 2), 4),
    ]
    assert dict(activity.days[1].by_action) == {
        Action.ALLOW: 1,
        Action.QUARANTINE: 1,
        Action.REJECT: 1,
        Action.DROP: 1,
    }
    assert activity.blocked_domains == (("bad.example", 2), ("worse.example", 1))
    assert activity.rules == (("federation", 2), ("model", 2), ("blocklist", 1))
    one = await store.activity(since, since + timedelta(days=2), top=1)
    assert one.rules == (("federation", 2),)
    with pytest.raises(InvalidRequest):
        await store.activity(since, since, top=5)
    with pytest.raises(InvalidRequest):
        await store.activity(since, since + timedelta(days=1), top=0)
    far = await store.activity(datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))
    assert sum(d.total for d in far.days) == len(records)
