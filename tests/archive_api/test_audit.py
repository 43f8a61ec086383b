"""`AuditLog`: recording, group commit, checkpoints, hostile parameters, verification."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive_api.audit import (
    ANONYMOUS,
    MAX_PARAMS_DEPTH,
    MAX_RECORDED_PARAMS_BYTES,
    Actor,
    AuditAction,
    AuditLog,
    AuditOutcome,
    audit_params,
)
from archive_api.errors import AuditError
from archive_api.store.audit import (
    AUDIT_CHAIN,
    AuditFilter,
    canonical_params,
    event_payload,
    params_text,
    to_us,
)
from archive_api.store.chain import CheckpointSigner
from archive_api.store.records import canonical_json
from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock

OFFICER = Actor("token:officer-1", "officer")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 4, 1, 8, 0, tzinfo=UTC))


@pytest.fixture
def signer() -> CheckpointSigner:
    return CheckpointSigner.generate()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "archive.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def audit(store: SqliteStore, signer: CheckpointSigner, clock: ManualClock) -> AuditLog:
    return AuditLog(store, signer, clock, checkpoint_every=5)


async def test_record_returns_the_durable_event(audit: AuditLog, clock: ManualClock) -> None:
    event = await audit.record(
        OFFICER, AuditAction.SEARCH, {"query": "from:alice@corp.example"}, result_count=12
    )
    assert (event.seq, event.actor, event.role, event.action) == (
        1,
        "token:officer-1",
        "officer",
        "search",
    )
    assert (event.params, event.result_count, event.outcome) == (
        {"query": "from:alice@corp.example"},
        12,
        "ok",
    )
    assert event.at == clock.now()
    clock.advance(60)
    denied = await audit.record(ANONYMOUS, AuditAction.LOGIN, outcome=AuditOutcome.DENIED)
    assert (denied.seq, denied.actor, denied.role, denied.params) == (2, "anonymous", None, {})
    assert denied.at == clock.now() and denied.outcome == "denied"
    page = await audit.events(AuditFilter(action="login"))
    assert page.events == (denied,)


async def test_many_concurrent_tasks_make_one_unbroken_chain_in_call_order(
    audit: AuditLog,
) -> None:
    events = await asyncio.gather(
        *(audit.record(OFFICER, AuditAction.VIEW, {"i": i}, result_count=1) for i in range(300))
    )
    # Group commit keeps FIFO order: the i-th call gets seq i + 1.
    assert [e.seq for e in events] == list(range(1, 301))
    assert [e.params["i"] for e in events] == list(range(300))
    for before, after in itertools.pairwise(events):
        assert after.prev_hash == before.hash
    report = await audit.verify()
    assert report.ok and report.last_seq == 300 and report.signatures_checked


async def test_records_from_waves_of_tasks_while_writes_are_in_flight(audit: AuditLog) -> None:
    async def burst(wave: int) -> list[int]:
        done = []
        for i in range(20):
            event = await audit.record(OFFICER, AuditAction.SEARCH, {"wave": wave, "i": i})
            done.append(event.seq)
        return done

    waves = await asyncio.gather(*(burst(w) for w in range(10)))
    seqs = sorted(seq for wave in waves for seq in wave)
    assert seqs == list(range(1, 201))
    for wave in waves:
        assert wave == sorted(wave)  # each task's own events stay in its order
    assert (await audit.verify()).ok


async def test_checkpoints_every_n_events_and_on_close(
    audit: AuditLog, store: SqliteStore, signer: CheckpointSigner
) -> None:
    for i in range(12):
        await audit.record(OFFICER, AuditAction.SEARCH, {"i": i})
    assert [cp.seq for cp in await store.audit_checkpoints()] == [5, 10]
    await audit.close()
    checkpoints = await store.audit_checkpoints()
    assert [cp.seq for cp in checkpoints] == [5, 10, 12]
    assert all(cp.chain_name == AUDIT_CHAIN and cp.verify(signer.public_key) for cp in checkpoints)
    with pytest.raises(AuditError, match="closed"):
        await audit.record(OFFICER, AuditAction.SEARCH)
    await audit.close()  # twice is harmless


async def test_checkpoint_of_an_empty_log_is_none_and_twice_is_one(
    audit: AuditLog, store: SqliteStore
) -> None:
    assert await audit.checkpoint() is None
    await audit.record(OFFICER, AuditAction.EXPORT, {"format": "jsonl"}, result_count=10)
    first = await audit.checkpoint()
    second = await audit.checkpoint()
    assert first == second and first is not None and first.seq == 1
    assert len(await store.audit_checkpoints()) == 1


async def test_a_second_writer_on_the_same_file_shares_the_chain(
    tmp_path: Path, signer: CheckpointSigner, clock: ManualClock
) -> None:
    """The service and a CLI command (another connection) append to one log, no fork."""
    path = tmp_path / "shared.sqlite3"
    one, two = await SqliteStore.open(path), await SqliteStore.open(path)
    try:
        service = AuditLog(one, signer, clock, checkpoint_every=7)
        command = AuditLog(two, signer, clock, checkpoint_every=7)
        await asyncio.gather(
            *(service.record(OFFICER, AuditAction.SEARCH, {"i": i}) for i in range(30)),
            *(
                command.record(Actor("cli:root", "admin"), AuditAction.TOKEN_CREATE)
                for _ in range(30)
            ),
        )
        await service.close()
        await command.close()
        report = await service.verify()
        assert report.ok, report.problems
        assert report.last_seq == 60
    finally:
        await one.close()
        await two.close()


async def test_store_failure_reaches_every_waiting_caller(
    audit: AuditLog, store: SqliteStore
) -> None:
    await audit.record(OFFICER, AuditAction.SEARCH)
    await store.close()
    results = await asyncio.gather(
        *(audit.record(OFFICER, AuditAction.SEARCH) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, AuditError) and "unavailable" in str(r) for r in results)


@pytest.mark.parametrize(
    ("actor", "match"),
    [
        (Actor(""), "actor"),
        (Actor("x" * 300), "actor"),
        (Actor("token:a\nforged line"), "actor"),
        (Actor("token:a", ""), "role"),
    ],
)
async def test_bad_actors_are_refused_without_failing_others(
    audit: AuditLog, actor: Actor, match: str
) -> None:
    good = asyncio.ensure_future(audit.record(OFFICER, AuditAction.SEARCH))
    with pytest.raises(AuditError, match=match):
        await audit.record(actor, AuditAction.SEARCH)
    assert (await good).seq == 1


async def test_unknown_actions_and_outcomes_are_refused(audit: AuditLog) -> None:
    with pytest.raises(ValueError):
        await audit.record(OFFICER, "drop-table")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await audit.record(OFFICER, AuditAction.SEARCH, outcome="fine")  # type: ignore[arg-type]


async def test_negative_result_count_is_refused(audit: AuditLog) -> None:
    with pytest.raises(AuditError, match="result_count"):
        await audit.record(OFFICER, AuditAction.SEARCH, result_count=-1)


# -- parameters --


class Color(Enum):
    RED = "red"


def test_params_are_made_json_safe() -> None:
    when = datetime(2026, 4, 1, 8, 0, tzinfo=UTC)
    params = {
        "action": AuditAction.HOLD,
        "color": Color.RED,
        "at": when,
        "day": date(2026, 4, 1),
        "range": (1, 2),
        "nan": float("nan"),
        "inf": float("-inf"),
        "surrogate": "a\ud800b",
        "keys": {1: "one", None: "none", "\udfff": "lone"},
        "deep": {"list": [{"x": 1.5}]},
    }
    assert audit_params(params) == {
        "action": "hold",
        "color": "red",
        "at": when.isoformat(),
        "day": "2026-04-01",
        "range": [1, 2],
        "nan": "nan",
        "inf": "-inf",
        "surrogate": "a\ufffdb",
        "keys": {"1": "one", "None": "none", "\ufffd": "lone"},
        "deep": {"list": [{"x": 1.5}]},
    }
    assert audit_params(None) == {}


def test_params_without_a_json_form_are_a_programming_error() -> None:
    with pytest.raises(AuditError, match="bytes"):
        audit_params({"raw": b"\x00"})
    with pytest.raises(AuditError, match="mapping"):
        audit_params(["a"])  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="set"):
        audit_params({"s": {1, 2}})


def test_too_deep_params_are_refused() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(MAX_PARAMS_DEPTH + 1):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(AuditError, match="deeper"):
        audit_params(deep)


async def test_oversized_params_are_kept_as_their_digest(audit: AuditLog) -> None:
    huge = {"query": "spam " * 100_000, "format": "csv"}
    event = await audit.record(OFFICER, AuditAction.EXPORT, huge)
    text = canonical_params(huge).encode()
    assert event.params == {
        "oversized": {
            "bytes": len(text),
            "sha256": hashlib.sha256(text).hexdigest(),
            "keys": ["format", "query"],
        }
    }
    assert len(params_text(event.params)) < MAX_RECORDED_PARAMS_BYTES


async def test_hostile_text_is_stored_as_data(audit: AuditLog, store: SqliteStore) -> None:
    hostile = {
        "query": "'); DROP TABLE audit_events; --",
        "html": "<script>alert(1)</script>",
        "ctl": "\x00\x1b[31m\n\r",
        "quote": '","actor":"token:admin',
    }
    event = await audit.record(OFFICER, AuditAction.SEARCH, hostile)
    [read] = (await store.audit_events()).events
    assert read == event and read.params == hostile and read.actor == OFFICER.name
    assert (await audit.verify()).ok


# -- the payload format (property tests) --

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    params=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    actor=st.text(min_size=1, max_size=20).filter(str.isprintable),
    count=st.none() | st.integers(min_value=0, max_value=2**62),
    micros=st.integers(min_value=0, max_value=10**6 - 1),
)
def test_the_hashed_payload_is_the_canonical_json_of_the_event(
    params: dict[str, Any], actor: str, count: int | None, micros: int
) -> None:
    try:
        text = params_text(params)
    except ValueError:
        return  # lone surrogates: refused, tested elsewhere
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    payload = event_payload(to_us(at), actor, "officer", "search", text, count, "ok")
    assert payload == canonical_json(
        {
            "action": "search",
            "actor": actor,
            "at": at.isoformat(),
            "outcome": "ok",
            "params": json.loads(text),
            "result_count": count,
            "role": "officer",
            "v": 1,
        }
    )
    assert params_text(json.loads(text)) == text  # the stored text reads back unchanged


@settings(max_examples=150, deadline=None)
@given(params=st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_any_json_params_become_recordable(params: dict[str, Any]) -> None:
    safe = audit_params(params)
    text = params_text(safe)  # never raises for what audit_params returns
    assert json.loads(text) == safe
