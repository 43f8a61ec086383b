"""What every store must do for the audit log and API tokens, as reusable test classes.

A backend's module subclasses `AuditStoreConformance` and `TokenStoreConformance` (names
starting with `Test`) beside a `store_factory` fixture, as for `ArchiveStoreConformance`.
Nothing here reaches around the store: tamper tests live with each backend.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from archive_api.store.audit import (
    AUDIT_CHAIN,
    MAX_APPEND_BATCH,
    MAX_PARAMS_BYTES,
    AuditEntry,
    AuditEvent,
    AuditFilter,
)
from archive_api.store.base import ArchiveStore
from archive_api.store.chain import GENESIS, CheckpointSigner, link_hash
from archive_api.store.errors import (
    AlreadyExists,
    ChainConflict,
    InvalidCursor,
    InvalidRequest,
    NotFound,
)
from archive_api.store.records import canonical_json
from archive_api.store.tokens import StoredToken
from tests.archive_api.store.conformance import StoreFactory

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def entry(
    i: int = 0,
    *,
    actor: str = "token:officer-1",
    action: str = "search",
    params: dict[str, Any] | None = None,
    at: datetime | None = None,
    role: str | None = "officer",
    result_count: int | None = 3,
    outcome: str = "ok",
) -> AuditEntry:
    return AuditEntry(
        at=at if at is not None else T0 + timedelta(seconds=i),
        actor=actor,
        action=action,
        params={"query": f"from:alice@corp.example n{i}"} if params is None else params,
        outcome=outcome,
        role=role,
        result_count=result_count,
    )


def expected_payload(event: AuditEvent) -> bytes:
    """The documented payload: canonical JSON of the event's fields (store/audit.py)."""
    return canonical_json(
        {
            "action": event.action,
            "actor": event.actor,
            "at": event.at.isoformat(),
            "outcome": event.outcome,
            "params": event.params,
            "result_count": event.result_count,
            "role": event.role,
            "v": 1,
        }
    )


def token(name: str, *, byte: int = 1, role: str = "officer", **dates: Any) -> StoredToken:
    return StoredToken(
        name=name,
        role=role,
        secret_hash=bytes([byte]) * 32,
        created_at=dates.pop("created_at", T0),
        **dates,
    )


async def all_events(store: ArchiveStore, where: AuditFilter, **kw: Any) -> list[int]:
    """Every seq a filter pages through, two at a time, following cursors."""
    seqs: list[int] = []
    cursor = None
    while True:
        page = await store.audit_events(where, limit=2, cursor=cursor, **kw)
        seqs += [event.seq for event in page.events]
        if page.next_cursor is None:
            return seqs
        cursor = page.next_cursor


class _StoreFixture:
    @pytest.fixture
    async def store(self, store_factory: StoreFactory) -> AsyncIterator[ArchiveStore]:
        opened = await store_factory()
        try:
            yield opened
        finally:
            await opened.close()


class AuditStoreConformance(_StoreFixture):
    async def test_empty_log(self, store: ArchiveStore) -> None:
        head = await store.audit_head()
        assert (head.seq, head.hash) == (0, GENESIS)
        page = await store.audit_events()
        assert page.events == () and page.next_cursor is None
        assert await store.audit_checkpoints() == ()
        report = await store.verify_audit()
        assert report.ok and report.last_seq == 0 and report.events_checked == 0
        assert await store.append_audit([]) == ()

    async def test_a_log_imported_from_another_store_keeps_its_seqs_and_hashes(
        self, store: ArchiveStore, store_factory: StoreFactory
    ) -> None:
        events = await store.append_audit([entry(i) for i in range(5)])
        signer = CheckpointSigner.generate()
        target = await store_factory()
        try:
            # Hostile or broken input first: nothing of it may be written.
            forged = replace(events[1], actor="token:someone-else")
            with pytest.raises(InvalidRequest, match="does not match its hash"):
                await target.import_audit([events[0], forged])
            with pytest.raises(InvalidRequest, match="does not continue"):
                await target.import_audit(events[1:])  # a gap: seq 1 is missing
            with pytest.raises(InvalidRequest, match="does not continue"):
                await target.import_audit([events[0], events[0]])
            with pytest.raises(InvalidRequest):
                await target.import_audit([events[0]] * (MAX_APPEND_BATCH + 1))
            assert (await target.audit_head()).seq == 0
            assert await target.import_audit([]) == 0

            assert await target.import_audit(events[:2]) == 2
            assert await target.import_audit(events[2:]) == 3
            with pytest.raises(InvalidRequest):  # once more: it no longer continues the log
                await target.import_audit(events[4:])
            page = await target.audit_events(newest_first=False)
            assert page.events == events
            head = await target.audit_head()
            assert (head.seq, head.hash) == (5, events[-1].hash)
            await target.add_audit_checkpoint(signer.sign(AUDIT_CHAIN, 5, events[-1].hash))
            report = await target.verify_audit(public_key=signer.public_key)
            assert report.ok and report.events_checked == 5
            # The log goes on from there as if it had always been this store's.
            (sixth,) = await target.append_audit([entry(5)])
            assert (sixth.seq, sixth.prev_hash) == (6, events[-1].hash)
            assert (await target.verify_audit()).ok
        finally:
            await target.close()

    async def test_append_chains_events_in_order(self, store: ArchiveStore) -> None:
        first = await store.append_audit([entry(0), entry(1)])
        second = await store.append_audit([entry(2, actor="cli:root", role=None)])
        events = first + second
        assert [e.seq for e in events] == [1, 2, 3]
        prev = GENESIS
        for event in events:
            assert event.prev_hash == prev
            assert event.hash == link_hash(prev, event.seq, expected_payload(event))
            prev = event.hash
        assert events[2].actor == "cli:root" and events[2].role is None
        assert events[0].params == {"query": "from:alice@corp.example n0"}
        assert events[0].at == T0 and events[0].result_count == 3 and events[0].outcome == "ok"
        head = await store.audit_head()
        assert (head.seq, head.hash) == (3, events[2].hash)
        page = await store.audit_events(newest_first=False)
        assert page.events == events

    async def test_times_keep_microseconds_and_become_utc(self, store: ArchiveStore) -> None:
        plus_two = timezone(timedelta(hours=2))
        at = datetime(2026, 3, 1, 11, 0, 0, 123456, tzinfo=plus_two)
        [event] = await store.append_audit([entry(at=at)])
        assert event.at == at and event.at.utcoffset() == timedelta(0)
        [read] = (await store.audit_events()).events
        assert read == event

    async def test_unicode_and_nested_params_round_trip(self, store: ArchiveStore) -> None:
        params = {"q": '"guaranteed return" -lunch ☃ 𝄞', "n": [1, 2.5, None, True], "d": {"é": {}}}
        [event] = await store.append_audit([entry(params=params)])
        [read] = (await store.audit_events()).events
        assert read.params == params == event.params

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"actor": ""}, "actor"),
            ({"actor": "x" * 257}, "actor"),
            ({"actor": "evil\nactor"}, "actor"),
            ({"action": ""}, "action"),
            ({"action": "search\x00"}, "action"),
            ({"action": "a" * 65}, "action"),
            ({"outcome": ""}, "outcome"),
            ({"role": ""}, "role"),
            ({"role": "r" * 65}, "role"),
            ({"at": datetime(2026, 3, 1, 9, 0)}, "timezone"),
            ({"result_count": -1}, "result_count"),
            ({"result_count": True}, "result_count"),
            ({"result_count": 1 << 63}, "result_count"),
            ({"params": {"x": float("nan")}}, "not JSON"),
            ({"params": {"x": float("inf")}}, "not JSON"),
            ({"params": {"x": "\ud800"}}, "not JSON"),
            ({"params": {"x": object()}}, "not JSON"),
            ({"params": {"x": "y" * MAX_PARAMS_BYTES}}, "too large"),
            ({"params": ["not", "a", "mapping"]}, "JSON object"),
        ],
    )
    async def test_bad_entries_are_refused_and_nothing_is_stored(
        self, store: ArchiveStore, change: dict[str, Any], field: str
    ) -> None:
        good = entry(0)
        bad = replace(good, **change)
        with pytest.raises(InvalidRequest, match=field):
            await store.append_audit([good, bad])
        assert (await store.audit_head()).seq == 0
        assert (await store.audit_events()).events == ()

    async def test_batch_size_is_bounded(self, store: ArchiveStore) -> None:
        with pytest.raises(InvalidRequest, match="at most"):
            await store.append_audit([entry(i) for i in range(MAX_APPEND_BATCH + 1)])
        events = await store.append_audit([entry(i) for i in range(MAX_APPEND_BATCH)])
        assert events[-1].seq == MAX_APPEND_BATCH

    async def test_paging_both_ways_never_repeats_or_skips(self, store: ArchiveStore) -> None:
        await store.append_audit([entry(i) for i in range(7)])
        assert await all_events(store, AuditFilter()) == [7, 6, 5, 4, 3, 2, 1]
        assert await all_events(store, AuditFilter(), newest_first=False) == list(range(1, 8))

    async def test_newest_first_paging_is_stable_while_events_arrive(
        self, store: ArchiveStore
    ) -> None:
        await store.append_audit([entry(i) for i in range(5)])
        page = await store.audit_events(limit=2)
        assert [e.seq for e in page.events] == [5, 4]
        await store.append_audit([entry(i) for i in range(5, 8)])
        rest = await store.audit_events(limit=10, cursor=page.next_cursor)
        assert [e.seq for e in rest.events] == [3, 2, 1]

    async def test_filters(self, store: ArchiveStore) -> None:
        await store.append_audit(
            [
                entry(0, actor="token:a", action="search"),
                entry(1, actor="token:b", action="view"),
                entry(2, actor="token:a", action="view"),
                entry(3, actor="token:a", action="export"),
                entry(4, actor="token:b", action="search"),
            ]
        )
        assert await all_events(store, AuditFilter(actor="token:a")) == [4, 3, 1]
        assert await all_events(store, AuditFilter(action="view")) == [3, 2]
        assert await all_events(store, AuditFilter(actor="token:b", action="search")) == [5]
        window = AuditFilter(since=T0 + timedelta(seconds=1), until=T0 + timedelta(seconds=3))
        assert await all_events(store, window, newest_first=False) == [2, 3]
        assert await all_events(store, AuditFilter(actor="token:nobody")) == []
        empty = AuditFilter(since=T0 + timedelta(days=1), until=T0)
        assert await all_events(store, empty) == []

    async def test_cursors_are_bound_to_their_filter_and_order(self, store: ArchiveStore) -> None:
        await store.append_audit([entry(i) for i in range(5)])
        page = await store.audit_events(AuditFilter(action="search"), limit=2)
        assert page.next_cursor is not None
        with pytest.raises(InvalidCursor):
            await store.audit_events(AuditFilter(action="view"), cursor=page.next_cursor)
        with pytest.raises(InvalidCursor):
            await store.audit_events(
                AuditFilter(action="search"), cursor=page.next_cursor, newest_first=False
            )

    @pytest.mark.parametrize(
        "cursor",
        [
            "",
            "!!!",
            "a" * 5000,
            base64.urlsafe_b64encode(b"[1, 2]").decode(),
            base64.urlsafe_b64encode(b'{"seq": 3}').decode(),
            base64.urlsafe_b64encode(json.dumps([1, "x", "1"]).encode()).decode(),
            base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        ],
    )
    async def test_malformed_cursors_are_refused(self, store: ArchiveStore, cursor: str) -> None:
        await store.append_audit([entry(0)])
        with pytest.raises(InvalidCursor):
            await store.audit_events(cursor=cursor)

    async def test_a_forged_cursor_for_the_right_filter_is_refused_if_out_of_range(
        self, store: ArchiveStore
    ) -> None:
        await store.append_audit([entry(i) for i in range(3)])
        page = await store.audit_events(limit=1)
        assert page.next_cursor is not None
        raw = base64.urlsafe_b64decode(page.next_cursor + "==")
        version, key, _ = json.loads(raw)
        for bad in (-1, 1 << 62, True, 2.5, "3"):
            forged = base64.urlsafe_b64encode(json.dumps([version, key, bad]).encode()).decode()
            with pytest.raises(InvalidCursor):
                await store.audit_events(cursor=forged.rstrip("="))

    @pytest.mark.parametrize("limit", [0, -1, MAX_APPEND_BATCH + 1, True])
    async def test_page_limits(self, store: ArchiveStore, limit: Any) -> None:
        with pytest.raises(InvalidRequest, match="limit"):
            await store.audit_events(limit=limit)

    async def test_bad_filters_are_refused(self, store: ArchiveStore) -> None:
        for where in (
            AuditFilter(actor=""),
            AuditFilter(actor="x" * 300),
            AuditFilter(action="a\nb"),
            AuditFilter(since=datetime(2026, 1, 1)),
        ):
            with pytest.raises(InvalidRequest):
                await store.audit_events(where)

    async def test_checkpoints(self, store: ArchiveStore) -> None:
        signer = CheckpointSigner.generate()
        events = await store.append_audit([entry(i) for i in range(4)])
        second = signer.sign(AUDIT_CHAIN, 2, events[1].hash)
        fourth = signer.sign(AUDIT_CHAIN, 4, events[3].hash)
        await store.add_audit_checkpoint(fourth)
        await store.add_audit_checkpoint(second)
        await store.add_audit_checkpoint(second)  # the same again: no-op
        assert await store.audit_checkpoints() == (second, fourth)
        report = await store.verify_audit(public_key=signer.public_key)
        assert report.ok and report.checkpoints_checked == 2 and report.signatures_checked

    async def test_checkpoints_that_do_not_fit_are_refused(self, store: ArchiveStore) -> None:
        signer = CheckpointSigner.generate()
        events = await store.append_audit([entry(i) for i in range(2)])
        with pytest.raises(ChainConflict):
            await store.add_audit_checkpoint(signer.sign(AUDIT_CHAIN, 2, events[0].hash))
        with pytest.raises(InvalidRequest, match="outside"):
            await store.add_audit_checkpoint(signer.sign(AUDIT_CHAIN, 3, events[1].hash))
        with pytest.raises(InvalidRequest, match="outside"):
            await store.add_audit_checkpoint(signer.sign(AUDIT_CHAIN, 0, GENESIS))
        with pytest.raises(InvalidRequest, match="not an audit checkpoint"):
            await store.add_audit_checkpoint(signer.sign("spool", 1, events[0].hash))
        assert await store.audit_checkpoints() == ()

    async def test_verify_names_a_checkpoint_signed_by_another_key(
        self, store: ArchiveStore
    ) -> None:
        ours, theirs = CheckpointSigner.generate(), CheckpointSigner.generate()
        events = await store.append_audit([entry(i) for i in range(3)])
        await store.add_audit_checkpoint(ours.sign(AUDIT_CHAIN, 1, events[0].hash))
        await store.add_audit_checkpoint(theirs.sign(AUDIT_CHAIN, 3, events[2].hash))
        report = await store.verify_audit(public_key=ours.public_key)
        assert report.first_break is not None
        assert (report.first_break.seq, report.first_break.problem) == (
            3,
            "checkpoint signature does not verify",
        )
        unsigned = await store.verify_audit()  # no key: only heads are compared
        assert unsigned.ok and not unsigned.signatures_checked


class TokenStoreConformance(_StoreFixture):
    async def test_add_and_look_up(self, store: ArchiveStore) -> None:
        first = token("ops-1", byte=1, role="admin", expires_at=T0 + timedelta(days=30))
        second = token("auditor.2", byte=2, role="auditor", created_at=T0 + timedelta(hours=1))
        await store.add_token(second)
        await store.add_token(first)
        assert await store.token_by_hash(bytes([1]) * 32) == first
        assert await store.token_by_name("auditor.2") == second
        assert await store.token_by_hash(bytes([9]) * 32) is None
        assert await store.token_by_name("nobody") is None
        assert await store.tokens() == (first, second)  # oldest first

    async def test_names_and_secrets_are_never_reused(self, store: ArchiveStore) -> None:
        await store.add_token(token("ops", byte=1))
        with pytest.raises(AlreadyExists, match="ops"):
            await store.add_token(token("ops", byte=2))
        with pytest.raises(AlreadyExists, match="secret"):
            await store.add_token(token("other", byte=1))
        await store.revoke_token("ops", at=T0)
        with pytest.raises(AlreadyExists):
            await store.add_token(token("ops", byte=3))
        assert [t.name for t in await store.tokens()] == ["ops"]

    async def test_revoke_keeps_the_first_revocation(self, store: ArchiveStore) -> None:
        await store.add_token(token("ops"))
        revoked = await store.revoke_token("ops", at=T0 + timedelta(days=1))
        assert revoked.revoked_at == T0 + timedelta(days=1)
        again = await store.revoke_token("ops", at=T0 + timedelta(days=2))
        assert again.revoked_at == T0 + timedelta(days=1)
        assert await store.token_by_name("ops") == again
        with pytest.raises(NotFound):
            await store.revoke_token("nobody", at=T0)

    @pytest.mark.parametrize(
        "name",
        ["", " ops", "ops admin", ".ops", "-ops", "o" * 65, "öps", "ops\n", "ops/1", "a'b", "%"],
    )
    async def test_bad_names_are_refused(self, store: ArchiveStore, name: str) -> None:
        with pytest.raises(InvalidRequest, match="token name"):
            await store.add_token(token(name))
        with pytest.raises(InvalidRequest, match="token name"):
            await store.token_by_name(name)
        with pytest.raises(InvalidRequest, match="token name"):
            await store.revoke_token(name, at=T0)

    @pytest.mark.parametrize(
        "change",
        [
            {"secret_hash": b"short"},
            {"secret_hash": "00" * 32},
            {"role": ""},
            {"role": "r\n"},
            {"created_at": datetime(2026, 1, 1)},
            {"expires_at": datetime(2026, 1, 1)},
        ],
    )
    async def test_bad_fields_are_refused(
        self, store: ArchiveStore, change: dict[str, Any]
    ) -> None:
        good = token("ops")
        with pytest.raises(InvalidRequest):
            await store.add_token(replace(good, **change))
        assert await store.tokens() == ()

    async def test_lookups_by_malformed_hash_are_refused(self, store: ArchiveStore) -> None:
        for bad in (b"", b"x" * 31, b"x" * 33):
            with pytest.raises(InvalidRequest):
                await store.token_by_hash(bad)
