"""Typed records of the archive and the spool entries that carry them.

One `ArchiveRecord` type covers every kind of archived thing (message, subscription request,
spam report, session start/end); fields that do not apply to a kind stay empty. Records are
serialised to canonical JSON, and that exact byte string is what the hash chain covers.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import orjson

from classifier.verdict import ALLOW, Verdict


class Direction(StrEnum):
    FROM_CLIENT = "from-client"  # sent by a local user through the proxy
    TO_CLIENT = "to-client"  # delivered to a local user through the proxy
    COPY = "copy"  # a copy forwarded by the server (component mode)


class RecordKind(StrEnum):
    MESSAGE = "message"
    SUBSCRIPTION = "subscription"
    REPORT = "report"
    SESSION = "session"
    CALL = "call"  # a Jingle call or whiteboard session: one record per signalling step
    FILE = "file"  # a file offer or transfer step (Jingle XEP-0234, SI XEP-0096, IBB open/close)
    FILE_DATA = "file-data"  # one in-band bytestream (XEP-0047) data block


class ObservationVia(StrEnum):
    LIVE = "live"
    CARBON_SENT = "carbon-sent"
    CARBON_RECEIVED = "carbon-received"
    MAM = "mam"
    OFFLINE = "offline"
    MUC_REFLECTION = "muc-reflection"
    COMPONENT = "component"
    RELEASE = "release"


class RecordStatus(StrEnum):
    DELIVERED = "delivered"
    HELD = "held"  # quarantined, not delivered
    RELEASED = "released"
    REJECTED = "rejected"
    DROPPED = "dropped"
    CONFIRMED_SPAM = "confirmed-spam"


# One encoder for every call: `json.dumps` with options builds a new one each time. Same
# options, so the same bytes (the hash chain covers them).
_CANONICAL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(data: Any) -> bytes:
    return _CANONICAL_ENCODER.encode(data).encode()


def _prints_alike(value: float) -> bool:
    """Whether orjson writes this number as `float.__repr__` (json's form) does.

    They differ below 1e-4 (`1e-05` against `0.00001`, `2.5e-07` against `2.5e-7`); at
    1e16 and above both use exponents, which is left to json to be safe. Not-a-number and
    the infinities (orjson writes `null`) fail the test too.
    """
    return value == 0.0 or 1e-4 <= abs(value) < 1e16


def _orjson_agrees() -> bool:
    # A probe at import: another orjson version that writes anything differently turns
    # the fast path off instead of changing what the chain hashes.
    probe = {
        "z": [0.0, -0.0, 1.0, 0.5, 1e-4, 0.30000000000000004, 9999999999999998.0, -123.456],
        "a": "".join(chr(c) for c in range(0x80)) + "\u00e9\u2028\u2029\ufeff\U0001f600",
        "m": {"b": None, "a": True, "c": False, "é": 10**18, "B": ""},
        "t": ("x", 1),
    }
    try:
        return orjson.dumps(probe, option=orjson.OPT_SORT_KEYS) == canonical_json(probe)
    except orjson.JSONEncodeError:
        return False


_ORJSON_AGREES = _orjson_agrees()


_TWO_DIGITS: Final = tuple(f"{n:02d}" for n in range(100))


def iso_datetime(value: datetime) -> str:
    """``value.isoformat()``, built directly for the UTC stamps every entry carries.

    CPython formats each field of ``isoformat()`` (and the offset) with its own ``sprintf``:
    about 0.8 µs a stamp, a few per stanza. Anything but a plain ``datetime`` in
    ``datetime.UTC`` from year 1000 on goes to ``isoformat()`` itself, so the text is the same
    in every case (the hash chain covers it; tests compare the two).
    """
    if type(value) is not datetime or value.tzinfo is not UTC:
        return value.isoformat()
    year = value.year
    if year < 1000:
        return value.isoformat()
    two = _TWO_DIGITS
    micro = value.microsecond
    fraction = "." + str(1_000_000 + micro)[1:] if micro else ""
    return (
        f"{year}-{two[value.month]}-{two[value.day]}"
        f"T{two[value.hour]}:{two[value.minute]}:{two[value.second]}{fraction}+00:00"
    )


def _dt(value: datetime | None) -> str | None:
    return iso_datetime(value) if value is not None else None


def _parse_dt(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass(frozen=True, slots=True)
class Attachment:
    url: str
    source: str  # "oob", "sims" or "upload"
    media_type: str | None = None
    name: str | None = None
    size: int | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "source": self.source,
            "media_type": self.media_type,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attachment:
        return cls(
            url=data["url"],
            source=data["source"],
            media_type=data.get("media_type"),
            name=data.get("name"),
            size=data.get("size"),
            sha256=data.get("sha256"),
        )


@dataclass(frozen=True, slots=True)
class ExchangeDetails:
    """One signalling step of a call, whiteboard or file transfer (CALL, FILE, FILE_DATA).

    Steps of one session share `sid` (the Jingle sid, SI id or IBB sid) and are separate,
    append-only records; readers fold them into one event (`archive_api.store.exchanges`).
    The file offered, if any, is the record's attachment. Times are what this proxy saw.
    """

    protocol: str  # "jingle", "si" or "ibb"
    action: str  # session-initiate, session-accept, session-terminate, offer, open, data, ...
    sid: str
    media: tuple[str, ...] = ()  # "audio", "video", "file", "whiteboard", "other"
    initiator: str | None = None  # full JID as the initiator stated it
    responder: str | None = None
    reason: str | None = None  # Jingle <reason/> condition: success, decline, busy, ...
    reason_text: str | None = None
    started_at: datetime | None = None  # when the session was offered (known to this proxy)
    accepted_at: datetime | None = None
    duration_seconds: float | None = None  # accepted → terminated, on the terminating step
    hashes: tuple[tuple[str, str], ...] = ()  # (algorithm, value as sent) of the offered file
    seq: int | None = None  # IBB data block number
    block_size: int | None = None  # IBB open
    data_size: int | None = None  # IBB: decoded bytes of this block, or of the whole stream
    data_sha256: str | None = None  # IBB: hex digest of the same bytes
    data_archived: bool | None = None  # IBB data: the block's bytes are in `raw`

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "action": self.action,
            "sid": self.sid,
            "media": list(self.media),
            "initiator": self.initiator,
            "responder": self.responder,
            "reason": self.reason,
            "reason_text": self.reason_text,
            "started_at": _dt(self.started_at),
            "accepted_at": _dt(self.accepted_at),
            "duration_seconds": self.duration_seconds,
            "hashes": [list(pair) for pair in self.hashes],
            "seq": self.seq,
            "block_size": self.block_size,
            "data_size": self.data_size,
            "data_sha256": self.data_sha256,
            "data_archived": self.data_archived,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExchangeDetails:
        return cls(
            protocol=data["protocol"],
            action=data["action"],
            sid=data["sid"],
            media=tuple(data.get("media", ())),
            initiator=data.get("initiator"),
            responder=data.get("responder"),
            reason=data.get("reason"),
            reason_text=data.get("reason_text"),
            started_at=_parse_dt(data.get("started_at")),
            accepted_at=_parse_dt(data.get("accepted_at")),
            duration_seconds=data.get("duration_seconds"),
            hashes=tuple((str(a), str(v)) for a, v in data.get("hashes", ())),
            seq=data.get("seq"),
            block_size=data.get("block_size"),
            data_size=data.get("data_size"),
            data_sha256=data.get("data_sha256"),
            data_archived=data.get("data_archived"),
        )


@dataclass(frozen=True, slots=True)
class StanzaIdRef:
    """An XEP-0359 stanza-id: the id an archive (`by`) gave the message."""

    id: str
    by: str

    def __init__(
        self,
        id: str,
        by: str,
    ) -> None:
        # Spelled out, not generated: compiled, this stores the fields directly (docs/native.md).
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "by", by)

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "by": self.by}


@dataclass(frozen=True, slots=True)
class Observation:
    """One place and time a record was seen: sent by or delivered to a full JID."""

    at: datetime
    jid: str
    via: ObservationVia
    direction: Direction

    def __init__(
        self,
        at: datetime,
        jid: str,
        via: ObservationVia,
        direction: Direction,
    ) -> None:
        # Spelled out, not generated: compiled, this stores the fields directly (docs/native.md).
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "jid", jid)
        object.__setattr__(self, "via", via)
        object.__setattr__(self, "direction", direction)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": iso_datetime(self.at),
            "jid": self.jid,
            # `_value_` (enum's own attribute) rather than the `value` property: these run
            # for every archived stanza, and the property costs a descriptor call each.
            "via": self.via._value_,
            "direction": self.direction._value_,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Observation:
        return cls(
            at=datetime.fromisoformat(data["at"]),
            jid=data["jid"],
            via=ObservationVia(data["via"]),
            direction=Direction(data["direction"]),
        )


@dataclass(frozen=True, slots=True)
class ArchiveRecord:
    record_id: str
    kind: RecordKind
    occurred_at: datetime
    direction: Direction
    sender: str = ""  # bare JID
    sender_full: str = ""
    recipient: str = ""  # bare JID
    recipient_full: str = ""
    stanza_type: str = ""  # chat, groupchat, normal, headline; subscribe, ...; start/end
    room: str | None = None
    body: str | None = None
    subject: str | None = None
    thread: str | None = None
    message_id: str | None = None
    origin_id: str | None = None
    stanza_ids: tuple[StanzaIdRef, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    encryption: str | None = None  # "omemo", "openpgp", "otr"
    replaces_id: str | None = None  # XEP-0308: id of the corrected message
    retracts_id: str | None = None  # XEP-0424: id of the retracted message
    delay_stamp: datetime | None = None
    client_address: str | None = None
    reported_jid: str | None = None  # spam reports: who is reported
    report_reason: str | None = None
    report_text: str | None = None
    exchange: ExchangeDetails | None = None  # CALL, FILE and FILE_DATA records
    verdict: Verdict = ALLOW
    status: RecordStatus = RecordStatus.DELIVERED
    raw: bytes = b""
    observations: tuple[Observation, ...] = field(default_factory=tuple)

    def __init__(
        self,
        record_id: str,
        kind: RecordKind,
        occurred_at: datetime,
        direction: Direction,
        sender: str = "",
        sender_full: str = "",
        recipient: str = "",
        recipient_full: str = "",
        stanza_type: str = "",
        room: str | None = None,
        body: str | None = None,
        subject: str | None = None,
        thread: str | None = None,
        message_id: str | None = None,
        origin_id: str | None = None,
        stanza_ids: tuple[StanzaIdRef, ...] = (),
        attachments: tuple[Attachment, ...] = (),
        encryption: str | None = None,
        replaces_id: str | None = None,
        retracts_id: str | None = None,
        delay_stamp: datetime | None = None,
        client_address: str | None = None,
        reported_jid: str | None = None,
        report_reason: str | None = None,
        report_text: str | None = None,
        exchange: ExchangeDetails | None = None,
        verdict: Verdict = ALLOW,
        status: RecordStatus = RecordStatus.DELIVERED,
        raw: bytes = b"",
        observations: tuple[Observation, ...] = (),
    ) -> None:
        # Spelled out, not generated: compiled, this stores the fields directly (docs/native.md).
        object.__setattr__(self, "record_id", record_id)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "occurred_at", occurred_at)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "sender", sender)
        object.__setattr__(self, "sender_full", sender_full)
        object.__setattr__(self, "recipient", recipient)
        object.__setattr__(self, "recipient_full", recipient_full)
        object.__setattr__(self, "stanza_type", stanza_type)
        object.__setattr__(self, "room", room)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "thread", thread)
        object.__setattr__(self, "message_id", message_id)
        object.__setattr__(self, "origin_id", origin_id)
        object.__setattr__(self, "stanza_ids", stanza_ids)
        object.__setattr__(self, "attachments", attachments)
        object.__setattr__(self, "encryption", encryption)
        object.__setattr__(self, "replaces_id", replaces_id)
        object.__setattr__(self, "retracts_id", retracts_id)
        object.__setattr__(self, "delay_stamp", delay_stamp)
        object.__setattr__(self, "client_address", client_address)
        object.__setattr__(self, "reported_jid", reported_jid)
        object.__setattr__(self, "report_reason", report_reason)
        object.__setattr__(self, "report_text", report_text)
        object.__setattr__(self, "exchange", exchange)
        object.__setattr__(self, "verdict", verdict)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "observations", observations)

    @property
    def remote_domain(self) -> str:
        """The other party's domain (the recipient's for outgoing, the sender's for incoming)."""
        other = self.recipient if self.direction == Direction.FROM_CLIENT else self.sender
        return other.rpartition("@")[2].split("/", 1)[0]

    def with_observation(self, observation: Observation) -> ArchiveRecord:
        if observation in self.observations:
            return self
        return replace(self, observations=(*self.observations, observation))

    def to_json(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "kind": self.kind._value_,  # `_value_`: see Observation.to_json
            "occurred_at": iso_datetime(self.occurred_at),
            "direction": self.direction._value_,
            "sender": self.sender,
            "sender_full": self.sender_full,
            "recipient": self.recipient,
            "recipient_full": self.recipient_full,
            "stanza_type": self.stanza_type,
            "room": self.room,
            "body": self.body,
            "subject": self.subject,
            "thread": self.thread,
            "message_id": self.message_id,
            "origin_id": self.origin_id,
            "stanza_ids": [s.to_json() for s in self.stanza_ids],
            "attachments": [a.to_json() for a in self.attachments],
            "encryption": self.encryption,
            "replaces_id": self.replaces_id,
            "retracts_id": self.retracts_id,
            "delay_stamp": _dt(self.delay_stamp),
            "client_address": self.client_address,
            "reported_jid": self.reported_jid,
            "report_reason": self.report_reason,
            "report_text": self.report_text,
            "verdict": self.verdict.to_json(),
            "status": self.status._value_,
            "raw": base64.b64encode(self.raw).decode("ascii"),
            "observations": [o.to_json() for o in self.observations],
        } | (
            # Only when present: every other record's canonical JSON (and hash) is unchanged.
            {"exchange": self.exchange.to_json()} if self.exchange is not None else {}
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArchiveRecord:
        return cls(
            record_id=data["record_id"],
            kind=RecordKind(data["kind"]),
            occurred_at=datetime.fromisoformat(data["occurred_at"]),
            direction=Direction(data["direction"]),
            sender=data.get("sender", ""),
            sender_full=data.get("sender_full", ""),
            recipient=data.get("recipient", ""),
            recipient_full=data.get("recipient_full", ""),
            stanza_type=data.get("stanza_type", ""),
            room=data.get("room"),
            body=data.get("body"),
            subject=data.get("subject"),
            thread=data.get("thread"),
            message_id=data.get("message_id"),
            origin_id=data.get("origin_id"),
            stanza_ids=tuple(StanzaIdRef(s["id"], s["by"]) for s in data.get("stanza_ids", [])),
            attachments=tuple(Attachment.from_json(a) for a in data.get("attachments", [])),
            encryption=data.get("encryption"),
            replaces_id=data.get("replaces_id"),
            retracts_id=data.get("retracts_id"),
            delay_stamp=_parse_dt(data.get("delay_stamp")),
            client_address=data.get("client_address"),
            reported_jid=data.get("reported_jid"),
            report_reason=data.get("report_reason"),
            report_text=data.get("report_text"),
            exchange=(
                ExchangeDetails.from_json(data["exchange"]) if data.get("exchange") else None
            ),
            verdict=Verdict.from_json(data["verdict"]) if data.get("verdict") else ALLOW,
            status=RecordStatus(data.get("status", RecordStatus.DELIVERED.value)),
            raw=base64.b64decode(data.get("raw", "")),
            observations=tuple(Observation.from_json(o) for o in data.get("observations", [])),
        )


def deterministic_record_id(*parts: str) -> str:
    """A record id derived from what identifies the stanza, so a retry yields the same id."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return digest[:32]


class EntryOp(StrEnum):
    RECORD = "record"  # a new record
    OBSERVE = "observe"  # another observation of an existing record
    STATUS = "status"  # a status change (released, confirmed spam, ...)
    ATTACHMENT = "attachment"  # the outcome of fetching one of a record's attachments


class FetchStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class AttachmentFetch:
    """One attempt at fetching an attachment's file (XEP-0363 HTTP upload) into the archive.

    A record is immutable in the hash chain, so what the fetch found is a later entry of its
    own; readers merge the newest successful fetch into the record's attachment (`sha256`,
    `size`). A failed attempt carries the error; `attempt` counts from 1 per record and URL.
    """

    url: str
    status: FetchStatus
    attempt: int
    sha256: str | None = None  # lower-case hex of the stored content (OK only)
    size: int | None = None  # bytes stored (OK only)
    media_type: str | None = None  # the Content-Type the upload service answered
    error: str | None = None  # why it failed (FAILED only)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.status.value,
            "attempt": self.attempt,
            "sha256": self.sha256,
            "size": self.size,
            "media_type": self.media_type,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttachmentFetch:
        return cls(
            url=data["url"],
            status=FetchStatus(data["status"]),
            attempt=data["attempt"],
            sha256=data.get("sha256"),
            size=data.get("size"),
            media_type=data.get("media_type"),
            error=data.get("error"),
        )


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """What one spool slot holds. `payload()` is the byte string the hash chain covers."""

    op: EntryOp
    record_id: str
    record: ArchiveRecord | None = None
    observation: Observation | None = None
    status: RecordStatus | None = None
    actor: str | None = None
    at: datetime | None = None
    fetch: AttachmentFetch | None = None  # ATTACHMENT entries only

    def __init__(
        self,
        op: EntryOp,
        record_id: str,
        record: ArchiveRecord | None = None,
        observation: Observation | None = None,
        status: RecordStatus | None = None,
        actor: str | None = None,
        at: datetime | None = None,
        fetch: AttachmentFetch | None = None,
    ) -> None:
        # Spelled out, not generated: compiled, this stores the fields directly (docs/native.md).
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "record_id", record_id)
        object.__setattr__(self, "record", record)
        object.__setattr__(self, "observation", observation)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "actor", actor)
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "fetch", fetch)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"op": self.op._value_, "record_id": self.record_id}
        if self.record is not None:
            data["record"] = self.record.to_json()
        if self.observation is not None:
            data["observation"] = self.observation.to_json()
        if self.status is not None:
            data["status"] = self.status.value
        if self.fetch is not None:
            data["fetch"] = self.fetch.to_json()
        if self.actor is not None:
            data["actor"] = self.actor
        if self.at is not None:
            data["at"] = iso_datetime(self.at)
        return data

    def payload(self) -> bytes:
        """`canonical_json(self.to_json())`, through orjson whenever that gives those bytes.

        The two agree on everything a spool entry holds (checked at import, and against
        random entries in the tests) except floats in json's exponent range: an entry whose
        verdict carries one, or with an exchange, takes json. So does anything orjson
        refuses (integers beyond 64 bits, lone surrogates), with json's own outcome.
        """
        data = self.to_json()
        if _ORJSON_AGREES and self._floats_print_alike():
            try:
                return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
            except orjson.JSONEncodeError:
                pass
        return canonical_json(data)

    def _floats_print_alike(self) -> bool:
        record = self.record
        if record is None:
            return True  # observations, statuses and fetches carry no floats
        if record.exchange is not None:
            return False
        verdict = record.verdict
        return _prints_alike(verdict.score) and all(
            _prints_alike(reason.contribution) for reason in verdict.reasons
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpoolEntry:
        return cls(
            op=EntryOp(data["op"]),
            record_id=data["record_id"],
            record=ArchiveRecord.from_json(data["record"]) if "record" in data else None,
            observation=(
                Observation.from_json(data["observation"]) if "observation" in data else None
            ),
            status=RecordStatus(data["status"]) if "status" in data else None,
            actor=data.get("actor"),
            at=_parse_dt(data.get("at")),
            fetch=AttachmentFetch.from_json(data["fetch"]) if "fetch" in data else None,
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> SpoolEntry:
        return cls.from_json(json.loads(payload))
