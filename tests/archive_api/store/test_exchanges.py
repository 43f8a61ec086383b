"""Folding the steps of calls and transfers into events (archive_api/store/exchanges.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from archive_api.store.exchanges import fold_exchanges, session_key
from archive_api.store.records import (
    ArchiveRecord,
    Direction,
    ExchangeDetails,
    RecordKind,
    RecordStatus,
)
from tests.archive_api.store.conformance import T0, record


def step(
    rid: str,
    action: str,
    *,
    seconds: int = 0,
    sid: str = "s1",
    kind: RecordKind = RecordKind.CALL,
    reverse: bool = False,
    status: RecordStatus = RecordStatus.DELIVERED,
    **details: Any,
) -> ArchiveRecord:
    a, b = "alice@corp.example", "bob@partner.example"
    base = record(
        rid,
        at=T0 + timedelta(seconds=seconds),
        sender=b if reverse else a,
        recipient=a if reverse else b,
        direction=Direction.TO_CLIENT if reverse else Direction.FROM_CLIENT,
        kind=kind,
        stanza_type=action,
        status=status,
    )
    protocol = details.pop("protocol", "jingle")
    return replace(
        base, exchange=ExchangeDetails(protocol=protocol, action=action, sid=sid, **details)
    )


def test_both_directions_of_one_session_fold_together_and_others_stay_apart() -> None:
    records = [
        step("a", "session-initiate", media=("audio",)),
        step("b", "session-initiate", sid="s2", media=("video",)),
        step("c", "session-accept", seconds=4, reverse=True),
        step("d", "session-terminate", seconds=64, reverse=True, reason="success"),
        record("m", body="just a message"),
    ]
    events = fold_exchanges(reversed(records))  # order of arrival does not matter
    assert len(events) == 2
    call = events[session_key(records[0])]  # type: ignore[index]
    assert (call.initiator, call.responder) == ("alice@corp.example", "bob@partner.example")
    assert (call.outcome, call.duration_seconds, call.record_ids) == (
        "success",
        60.0,
        ("a", "c", "d"),
    )
    assert call.started_at == T0 and call.ended_at == T0 + timedelta(seconds=64)
    other = events[session_key(records[1])]  # type: ignore[index]
    assert (other.outcome, other.duration_seconds, other.media) == ("unanswered", None, ("video",))


def test_refused_whiteboard_and_ibb_outcomes() -> None:
    refused = fold_exchanges([step("r", "session-initiate", status=RecordStatus.REJECTED)])
    assert [e.outcome for e in refused.values()] == ["refused"]
    board = fold_exchanges([step("w", "session-initiate", media=("whiteboard",))])
    assert [e.kind for e in board.values()] == ["whiteboard"]
    ibb = fold_exchanges(
        [
            step("o", "open", kind=RecordKind.FILE, protocol="ibb", sid="b"),
            step(
                "d1",
                "data",
                kind=RecordKind.FILE_DATA,
                protocol="ibb",
                sid="b",
                seq=0,
                data_size=5,
                data_archived=True,
            ),
            step(
                "d2",
                "data",
                kind=RecordKind.FILE_DATA,
                protocol="ibb",
                sid="b",
                seq=1,
                data_size=7,
                data_archived=False,
            ),
        ]
    )
    (transfer,) = ibb.values()
    assert (transfer.kind, transfer.outcome, transfer.data_size, transfer.data_archived) == (
        "file",
        "open",
        12,
        False,
    )


def test_records_without_details_are_not_steps() -> None:
    bare_call = record("x", kind=RecordKind.CALL)
    assert session_key(bare_call) is None
    assert fold_exchanges([bare_call, record("m")]) == {}
