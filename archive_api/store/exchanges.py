"""Folding the append-only steps of a call or file transfer into one event, when read.

The proxy archives every signalling step of a Jingle session, SI offer or in-band bytestream
as a record of its own (kinds CALL, FILE, FILE_DATA with `ExchangeDetails`): records are
immutable links of the hash chain, so a session's outcome is never written back into its
first record. Readers that want "one call: who, with whom, when, how long, how it ended" fold
the steps that share a session (protocol family, sid, the two parties) with `fold_exchanges`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from archive_api.store.records import ArchiveRecord, Attachment, RecordKind, RecordStatus

EXCHANGE_KINDS = frozenset({RecordKind.CALL, RecordKind.FILE, RecordKind.FILE_DATA})

SessionKey = tuple[str, str, str, str]


def session_key(record: ArchiveRecord) -> SessionKey | None:
    """Which session a step belongs to; None for records that are not steps."""
    details = record.exchange
    if details is None or record.kind not in EXCHANGE_KINDS:
        return None
    first, second = sorted((record.sender.lower(), record.recipient.lower()))
    family = "ibb" if details.protocol == "ibb" else "session"
    return family, details.sid, first, second


@dataclass(frozen=True, slots=True)
class ExchangeSummary:
    """One call, whiteboard session or file transfer, folded from its steps."""

    key: SessionKey
    kind: str  # "call", "whiteboard" or "file"
    protocol: str
    initiator: str  # bare JID of whoever sent the first step seen
    responder: str
    media: tuple[str, ...]
    started_at: datetime
    accepted_at: datetime | None
    ended_at: datetime | None
    duration_seconds: float | None
    outcome: str  # the terminate reason, "refused", "ended", "open" or "unanswered"
    files: tuple[Attachment, ...]
    data_size: int | None  # IBB: bytes seen
    data_sha256: str | None
    data_archived: bool | None
    record_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "sid": self.key[1],
            "kind": self.kind,
            "protocol": self.protocol,
            "initiator": self.initiator,
            "responder": self.responder,
            "media": list(self.media),
            "started_at": self.started_at.isoformat(),
            "accepted_at": self.accepted_at.isoformat() if self.accepted_at else None,
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "duration_seconds": self.duration_seconds,
            "outcome": self.outcome,
            "files": [a.to_json() for a in self.files],
            "data_size": self.data_size,
            "data_sha256": self.data_sha256,
            "data_archived": self.data_archived,
            "record_ids": list(self.record_ids),
        }


def fold_exchanges(records: Iterable[ArchiveRecord]) -> dict[SessionKey, ExchangeSummary]:
    """One summary per session among `records` (steps of other sessions are ignored)."""
    steps: dict[SessionKey, list[ArchiveRecord]] = {}
    for record in records:
        key = session_key(record)
        if key is not None:
            steps.setdefault(key, []).append(record)
    return {
        key: _fold(key, sorted(group, key=lambda r: (r.occurred_at, r.record_id)))
        for key, group in steps.items()
    }


def _fold(key: SessionKey, steps: list[ArchiveRecord]) -> ExchangeSummary:
    first = steps[0]
    media: list[str] = []
    files: list[Attachment] = []
    accepted_at: datetime | None = None
    ended_at: datetime | None = None
    duration: float | None = None
    outcome: str | None = None
    data_size: int | None = None
    data_sha256: str | None = None
    data_archived: bool | None = None
    seen_data = 0
    all_kept = True
    for step in steps:
        details = step.exchange
        assert details is not None  # session_key() chose only records with details
        media += [m for m in details.media if m not in media]
        files += [a for a in step.attachments if a not in files]
        if step.status in (RecordStatus.REJECTED, RecordStatus.DROPPED):
            outcome = "refused"
        if details.accepted_at is not None and accepted_at is None:
            accepted_at = details.accepted_at
        if details.action in ("session-accept",) and accepted_at is None:
            accepted_at = step.occurred_at
        if details.action in ("session-terminate", "close"):
            ended_at = step.occurred_at
            if outcome != "refused":
                outcome = details.reason or "ended"
            if details.duration_seconds is not None:
                duration = details.duration_seconds
            if details.data_size is not None:  # the IBB close sums what the proxy saw
                data_size, data_sha256 = details.data_size, details.data_sha256
                data_archived = details.data_archived
        if details.action == "data" and details.data_size is not None:
            seen_data += details.data_size
            all_kept = all_kept and bool(details.data_archived)
    if duration is None and accepted_at is not None and ended_at is not None:
        duration = max((ended_at - accepted_at).total_seconds(), 0.0)
    if data_size is None and seen_data:
        data_size, data_archived = seen_data, all_kept
    if outcome is None:
        outcome = "open" if accepted_at is not None or key[0] == "ibb" else "unanswered"
    kind = "file" if first.kind is not RecordKind.CALL else "call"
    if "whiteboard" in media:
        kind = "whiteboard"
    details = first.exchange
    assert details is not None
    return ExchangeSummary(
        key=key,
        kind=kind,
        protocol=details.protocol,
        initiator=first.sender,
        responder=first.recipient,
        media=tuple(media),
        started_at=details.started_at or first.occurred_at,
        accepted_at=accepted_at,
        ended_at=ended_at,
        duration_seconds=duration,
        outcome=outcome,
        files=tuple(files),
        data_size=data_size,
        data_sha256=data_sha256,
        data_archived=data_archived,
        record_ids=tuple(step.record_id for step in steps),
    )
