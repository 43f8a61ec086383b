"""Legal holds: scopes, what they cover, that they win over retention, release by admins."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from archive_api.auth import Role
from archive_api.errors import HoldAlreadyReleased, InvalidInput, NotPermitted, UnknownHold
from archive_api.holds import (
    ConversationScope,
    Hold,
    HoldScope,
    HoldService,
    PersonScope,
    SavedSearchScope,
    conversation_scope,
    person_scope,
    saved_search_scope,
    scope_from_json,
    scope_query,
    scope_to_json,
)
from archive_api.store.base import RetentionAssignment
from archive_api.store.errors import QuerySyntaxError
from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from tests.archive_api.store.conformance import (
    ALL,
    DAY,
    T0,
    ChainWriter,
    corpus,
    record,
    search_all,
)

NOW = T0 + timedelta(days=400)


@pytest.fixture
def writer() -> ChainWriter:
    return ChainWriter()


@pytest.fixture
async def store(tmp_path: Path, writer: ChainWriter) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "archive.db")
    try:
        await opened.apply(writer.records(*corpus()))
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def holds(store: SqliteStore, clock: ManualClock) -> HoldService:
    counter = iter(range(1, 1000))
    return HoldService(store, clock, new_id=lambda: f"h{next(counter)}")


async def expire_everything(store: SqliteStore) -> None:
    await store.set_retention(
        [RetentionAssignment(rid, "short", NOW - DAY) for rid in ALL], assigned_at=T0
    )


# What each kind of scope covers in the corpus (see tests/archive_api/store/conformance.py).
SCOPES: list[tuple[str, HoldScope, set[str]]] = [
    (
        "person",
        person_scope("bob@partner.example"),
        {"r01", "r02", "r07", "r08", "r09", "r14", "r15"},
    ),
    ("person-domain", person_scope("*@spam.example"), {"r05", "r06"}),
    (
        "conversation-pair",
        conversation_scope(participants=("Bob@partner.example", "alice@corp.example")),
        {"r01", "r02", "r07", "r08", "r09", "r14", "r15"},
    ),
    (
        "conversation-pair-window",
        conversation_scope(
            participants=("alice@corp.example", "bob@partner.example"),
            after=T0 + timedelta(minutes=30),
            before=T0 + 5 * DAY,
        ),
        {"r02", "r07"},
    ),
    ("room", conversation_scope(room="desk@conference.corp.example"), {"r04"}),
    ("saved-search", saved_search_scope('"guaranteed return" -lunch'), {"r01", "r08"}),
]


@pytest.mark.parametrize(("name", "scope", "covered"), SCOPES, ids=[s[0] for s in SCOPES])
async def test_each_scope_protects_what_it_covers_from_purge(
    store: SqliteStore, holds: HoldService, name: str, scope: HoldScope, covered: set[str]
) -> None:
    assert set(await search_all(store, str(scope_query(scope)))) == covered
    placed = await holds.place(f"Case {name}", scope, actor="officer@corp.example")
    for rid in ALL:
        assert await holds.is_held(rid) == (rid in covered)
    await expire_everything(store)
    batch = await store.purge(NOW, counts=True)
    assert {p.record_id for p in batch.purged} == ALL - covered
    assert batch.held_back == len(covered)
    assert set(await search_all(store, "")) == covered
    assert (await store.verify()).ok
    # Released by an admin, the records are no longer protected.
    await holds.release(placed.hold_id, actor="admin@corp.example", actor_role=Role.ADMIN)
    assert {p.record_id for p in (await store.purge(NOW)).purged} == covered
    assert await store.count("") == 0


async def test_a_hold_also_covers_records_that_arrive_later(
    store: SqliteStore, holds: HoldService, writer: ChainWriter
) -> None:
    await holds.place("Case", person_scope("zed@corp.example"), actor="officer@corp.example")
    await store.apply(writer.records(record("z1", sender="zed@corp.example")))
    assert await holds.is_held("z1")


async def test_only_an_admin_releases_a_hold(holds: HoldService, clock: ManualClock) -> None:
    placed = await holds.place(
        "  SEC inquiry 2026-17  ", person_scope("alice@corp.example"), actor="officer@corp.example"
    )
    assert placed.case_name == "SEC inquiry 2026-17" and placed.created_at == NOW
    for role in (Role.OFFICER, Role.AUDITOR, "ADMIN", "", "admin "):
        with pytest.raises(NotPermitted):
            await holds.release(placed.hold_id, actor="someone", actor_role=role)
    assert (await holds.get(placed.hold_id)).active
    clock.advance(3600)
    released = await holds.release(
        placed.hold_id, actor="admin@corp.example", actor_role="admin", reason="case closed"
    )
    assert not released.active
    assert (released.released_by, released.released_at) == ("admin@corp.example", clock.now())
    assert released.release_reason == "case closed"
    with pytest.raises(HoldAlreadyReleased):
        await holds.release(placed.hold_id, actor="admin@corp.example", actor_role=Role.ADMIN)
    with pytest.raises(UnknownHold):
        await holds.release("h404", actor="admin@corp.example", actor_role=Role.ADMIN)
    with pytest.raises(UnknownHold):
        await holds.get("h404")


async def test_holds_are_listed_and_survive_reopening(tmp_path: Path) -> None:
    clock = ManualClock(NOW)
    async with await SqliteStore.open(tmp_path / "a.db") as store:
        service = HoldService(store, clock)
        first = await service.place("A", person_scope("alice@corp.example"), actor="o1")
        clock.advance(60)
        second = await service.place(
            "B", conversation_scope(room="desk@conference.corp.example"), actor="o2"
        )
        await service.release(second.hold_id, actor="root", actor_role=Role.ADMIN)
    async with await SqliteStore.open(tmp_path / "a.db") as store:
        service = HoldService(store, clock)
        listed = await service.list()
        assert [h.hold_id for h in listed] == [first.hold_id, second.hold_id]
        assert listed[0] == first
        assert [h.hold_id for h in await service.list(include_released=False)] == [first.hold_id]
        assert first.hold_id.startswith("hold-") and first.hold_id != second.hold_id


async def test_holds_on_a_record_and_held_ids_of_a_query(
    store: SqliteStore, holds: HoldService
) -> None:
    a = await holds.place("A", person_scope("*@spam.example"), actor="o")
    b = await holds.place("B", saved_search_scope("cheap"), actor="o")
    assert [h.hold_id for h in await holds.holds_on("r05")] == [a.hold_id, b.hold_id]
    assert await holds.holds_on("r01") == ()
    held = [rid async for rid in holds.held_record_ids("-verdict:allow", page_size=1)]
    assert held == ["r05", "r06"]


def test_scopes_round_trip_through_json() -> None:
    for _, scope, _ in SCOPES:
        data = json.loads(json.dumps(scope_to_json(scope)))
        assert scope_from_json(data) == scope
    hold = Hold("h1", "Case", "o", NOW, SCOPES[3][1])
    assert Hold.from_record(hold.to_record()) == hold
    assert hold.to_json()["query"] == str(scope_query(SCOPES[3][1]))


def test_scopes_are_canonical() -> None:
    assert person_scope(" Alice@CORP.example ") == PersonScope("alice@corp.example")
    assert conversation_scope(participants=("b@x.example", "a@x.example")) == ConversationScope(
        participants=("a@x.example", "b@x.example")
    )
    assert saved_search_scope("FROM:Alice@corp.example   lunch") == SavedSearchScope(
        "from:alice@corp.example lunch"
    )
    window = conversation_scope(
        room="r@conference.x.example",
        after=datetime(2026, 1, 1, 12, tzinfo=UTC).astimezone(),
    )
    assert window.after == datetime(2026, 1, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    "make",
    [
        lambda: person_scope(""),
        lambda: person_scope("alice@corp.example/phone"),
        lambda: person_scope("alice@corp.example before:2020-01-01"),
        lambda: person_scope('alice"@corp.example'),
        lambda: person_scope("a*@corp.example"),
        lambda: person_scope("alice@@corp.example"),
        lambda: person_scope("x" * 5000 + "@corp.example"),
        lambda: person_scope("\x00@corp.example"),
        lambda: conversation_scope(),
        lambda: conversation_scope(participants=("a@x.example", "b@x.example"), room="r@c.x"),
        lambda: conversation_scope(participants=("a@x.example", "A@X.example")),
        lambda: conversation_scope(participants=("a@x.example", "*@x.example")),
        lambda: conversation_scope(participants=("a@x.example",)),  # type: ignore[arg-type]
        lambda: conversation_scope(room="*@conference.x.example"),
        lambda: conversation_scope(
            room="r@c.example", after=datetime(2026, 2, 1), before=datetime(2026, 3, 1)
        ),
        lambda: conversation_scope(
            room="r@c.example",
            after=datetime(2026, 3, 1, tzinfo=UTC),
            before=datetime(2026, 3, 1, tzinfo=UTC),
        ),
        lambda: saved_search_scope("   "),
    ],
)
def test_bad_scopes_are_refused_with_a_reason(make: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        make()
    assert str(caught.value)


def test_a_malformed_saved_search_points_at_the_problem() -> None:
    with pytest.raises(QuerySyntaxError) as caught:
        saved_search_scope("from:alice@corp.example verdict:maybe")
    assert caught.value.position == len("from:alice@corp.example verdict:")


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "person",
        {},
        {"kind": "person"},
        {"kind": "person", "jid": 5},
        {"kind": "nope", "jid": "a@b.example"},
        {"kind": "search", "query": "from:"},
        {"kind": "conversation", "participants": "a@x.example"},
        {"kind": "conversation", "participants": ["a@x.example", 7]},
        {"kind": "conversation", "room": ["r@c.example"]},
        {"kind": "conversation", "room": "r@c.example", "after": "yesterday"},
        {"kind": "conversation", "room": "r@c.example", "after": 20260101},
        {"kind": "conversation", "room": "r@c.example", "after": "2026-01-01T00:00:00"},
    ],
)
def test_hostile_scope_json_is_refused(data: Any) -> None:
    with pytest.raises(InvalidInput):
        scope_from_json(data)


async def test_place_checks_its_inputs(holds: HoldService) -> None:
    scope = person_scope("alice@corp.example")
    for case in ("", "   ", "x" * 201, "line\nbreak"):
        with pytest.raises(InvalidInput):
            await holds.place(case, scope, actor="o")
    with pytest.raises(InvalidInput):
        await holds.place("Case", scope, actor=" ")
    placed = await holds.place("Case", scope, actor="o")
    with pytest.raises(InvalidInput):
        await holds.release(placed.hold_id, actor="a", actor_role=Role.ADMIN, reason="x" * 3000)
    assert (await holds.get(placed.hold_id)).active
