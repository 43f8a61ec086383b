"""Calls, whiteboards and file transfers: Jingle, SI and IBB iqs as archived, governed events.

`read_exchange` looks at one `<iq type='set'/>` and, when it carries a Jingle (XEP-0166),
stream-initiation (XEP-0095 with the XEP-0096 file profile) or in-band bytestream (XEP-0047)
payload, describes it as an `Exchange`; `proxy.stanza` wraps that with the stanza's parties
into an `ExchangeEvent`. Payloads are read with ElementTree (slixmpp 1.17 has no Jingle
stanzas; its XEP-0234 `File` is used only for its namespace), and nothing here raises on
hostile input: a missing sid, a bogus size or base64 block is recorded as a `problem` and the
stanza is still archived and decided (a malformed offer must not slip past policy).

Each signalling step becomes one append-only record (kinds CALL, FILE, FILE_DATA) carrying
`ExchangeDetails`; steps of one session share the sid and are folded into one event when read
(`archive_api.store.exchanges`). `ExchangeSessions` is the proxy's bounded memory of sessions
it has seen: when a session was offered and accepted (so the terminating step carries the
duration), the verdict of its opening (every later step of a refused session is refused too),
and how many IBB bytes were archived (blocks past `ibb_archive_max_bytes` keep only their size
and SHA-256, not their bytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import islice
from typing import Final
from xml.etree import ElementTree as ET

from slixmpp.plugins.xep_0234.stanza import File as JingleFile

from archive_api.store.records import (
    ArchiveRecord,
    Attachment,
    Direction,
    ExchangeDetails,
    Observation,
    ObservationVia,
    RecordKind,
    RecordStatus,
    deterministic_record_id,
)
from classifier.verdict import Verdict

JINGLE_NS: Final = "urn:xmpp:jingle:1"
RTP_NS: Final = "urn:xmpp:jingle:apps:rtp:1"
SI_NS: Final = "http://jabber.org/protocol/si"
SI_FILE_NS: Final = "http://jabber.org/protocol/si/profile/file-transfer"
IBB_NS: Final = "http://jabber.org/protocol/ibb"
# XEP-0234 revisions in use: :5 is current (and slixmpp's), :4 and :3 are still deployed.
FILE_TRANSFER_NSS: Final = frozenset(
    {
        JingleFile.namespace,
        "urn:xmpp:jingle:apps:file-transfer:4",
        "urn:xmpp:jingle:apps:file-transfer:3",
    }
)
_HASH_NSS: Final = ("urn:xmpp:hashes:2", "urn:xmpp:hashes:1")
# Bytes that make an iq worth parsing (the pipeline's cheap look before parsing).
MARKERS: Final = (JINGLE_NS.encode(), SI_NS.encode(), IBB_NS.encode())

# Jingle actions that become records; transport-*, description-info, security-info and
# session-info (ICE candidates, ringing, DTMF) are signalling noise: they are governed (a
# refused session stays refused) but not archived.
ARCHIVED_JINGLE_ACTIONS: Final = frozenset(
    {
        "session-initiate",
        "session-accept",
        "session-terminate",
        "content-add",
        "content-accept",
        "content-reject",
        "content-remove",
        "content-modify",
    }
)
# What opens a session: decided by the classifier. Later steps inherit the verdict.
OPENING_ACTIONS: Final = frozenset({"session-initiate", "offer", "open"})

_MAX_CONTENTS: Final = 32  # read at most this many <content/>s; more is a problem, not work
_MAX_HASHES: Final = 8
_MAX_TEXT: Final = 1024
_MAX_SID: Final = 256
_MAX_SIZE: Final = 2**63 - 1  # a file size must fit a signed 64-bit column


@dataclass(frozen=True, slots=True)
class FileOffer:
    """A file described by a Jingle file-transfer description or an SI file profile."""

    name: str | None = None
    size: int | None = None
    media_type: str | None = None
    description: str | None = None
    hashes: tuple[tuple[str, str], ...] = ()  # (algorithm, value as sent)

    @property
    def sha256_hex(self) -> str | None:
        for algo, value in self.hashes:
            if algo == "sha-256":
                digest = _b64(value)
                if digest is not None and len(digest) == 32:
                    return digest.hex()
        return None


@dataclass(frozen=True, slots=True)
class Exchange:
    """The payload of one Jingle, SI or IBB iq-set."""

    protocol: str  # "jingle", "si", "ibb"
    action: str  # Jingle action, "offer" (SI), "open" / "data" / "close" (IBB)
    sid: str
    media: tuple[str, ...] = ()
    initiator: str | None = None
    responder: str | None = None
    reason: str | None = None
    reason_text: str | None = None
    files: tuple[FileOffer, ...] = ()
    seq: int | None = None
    block_size: int | None = None
    data: bytes | None = field(default=None, repr=False)  # decoded IBB block
    problems: frozenset[str] = frozenset()

    @property
    def kind(self) -> RecordKind:
        if self.protocol == "ibb":
            return RecordKind.FILE_DATA if self.action == "data" else RecordKind.FILE
        if self.protocol == "si" or (self.media and set(self.media) <= {"file"}):
            return RecordKind.FILE
        return RecordKind.CALL

    @property
    def archived(self) -> bool:
        return self.protocol != "jingle" or self.action in ARCHIVED_JINGLE_ACTIONS

    @property
    def opens(self) -> bool:
        return self.action in OPENING_ACTIONS


@dataclass(frozen=True, slots=True)
class ExchangeEvent:
    """A Jingle, SI or IBB iq-set as it crossed the proxy, with its resolved parties."""

    leg: Direction
    sender: str
    sender_full: str
    recipient: str
    recipient_full: str
    received_at: datetime
    raw: bytes = field(repr=False)
    exchange: Exchange
    iq_id: str | None = None
    seen_by: str = ""
    client_address: str | None = None

    @property
    def session_key(self) -> tuple[str, str, str, str]:
        """The session this step belongs to: protocol family, sid and the two parties."""
        first, second = sorted((self.sender.lower(), self.recipient.lower()))
        family = "ibb" if self.exchange.protocol == "ibb" else "session"
        return family, self.exchange.sid, first, second


# --- reading -------------------------------------------------------------------------------


def read_exchange(iq: ET.Element) -> Exchange | None:
    """The Jingle, SI or IBB payload of an iq-set, or None when it has none."""
    for child in islice(iq, 4):  # an iq-set has exactly one payload; an error may follow it
        tag = child.tag if isinstance(child.tag, str) else ""
        if tag == f"{{{JINGLE_NS}}}jingle":
            return _jingle(child)
        if tag == f"{{{SI_NS}}}si":
            return _si(child)
        if tag.startswith(f"{{{IBB_NS}}}"):
            return _ibb(child, tag[len(IBB_NS) + 2 :])
    return None


def _sid(value: str | None, problems: set[str]) -> str:
    if not value:
        problems.add("missing-sid")
        return ""
    if len(value) > _MAX_SID:
        problems.add("long-sid")
        return value[:_MAX_SID]
    return value


def _text(value: str | None) -> str | None:
    return value[:_MAX_TEXT] if value else None


def _jingle(jingle: ET.Element) -> Exchange:
    problems: set[str] = set()
    action = (jingle.get("action") or "").strip()[:40] or "unknown"
    if action == "unknown":
        problems.add("missing-action")
    sid = _sid(jingle.get("sid"), problems)
    media: list[str] = []
    files: list[FileOffer] = []
    contents = jingle.iterfind(f"{{{JINGLE_NS}}}content")
    for count, content in enumerate(contents):
        if count >= _MAX_CONTENTS:
            problems.add("too-many-contents")
            break
        for description in islice(content, 8):
            tag = description.tag if isinstance(description.tag, str) else ""
            if not tag.endswith("}description"):
                continue
            namespace = tag[1:].partition("}")[0]
            kind, offer = _description(description, namespace, problems)
            if kind not in media:
                media.append(kind)
            if offer is not None:
                files.append(offer)
    reason, reason_text = _jingle_reason(jingle.find(f"{{{JINGLE_NS}}}reason"))
    return Exchange(
        protocol="jingle",
        action=action,
        sid=sid,
        media=tuple(media),
        initiator=_text(jingle.get("initiator")),
        responder=_text(jingle.get("responder")),
        reason=reason,
        reason_text=reason_text,
        files=tuple(files),
        problems=frozenset(problems),
    )


def _description(
    description: ET.Element, namespace: str, problems: set[str]
) -> tuple[str, FileOffer | None]:
    if namespace == RTP_NS:
        media = description.get("media")
        return (media if media in ("audio", "video") else "other"), None
    if namespace in FILE_TRANSFER_NSS:
        file = description.find(f"{{{namespace}}}file")
        if file is None:
            return "file", None
        size = _size(file.findtext(f"{{{namespace}}}size"), problems)
        hashes = tuple(
            (algo[:40], (h.text or "").strip()[:200])
            for h in islice(_hash_elements(file), _MAX_HASHES)
            if (algo := h.get("algo")) and h.text
        )
        return "file", FileOffer(
            name=_text(file.findtext(f"{{{namespace}}}name")),
            size=size,
            media_type=_text(file.findtext(f"{{{namespace}}}media-type")),
            description=_text(file.findtext(f"{{{namespace}}}desc")),
            hashes=hashes,
        )
    lowered = namespace.lower()
    if "whiteboard" in lowered or "sxe" in lowered:  # XEP-0284 shared editing and the like
        return "whiteboard", None
    return "other", None


def _hash_elements(file: ET.Element) -> list[ET.Element]:
    found: list[ET.Element] = []
    for namespace in _HASH_NSS:
        found.extend(islice(file.iterfind(f"{{{namespace}}}hash"), _MAX_HASHES))
    return found


def _jingle_reason(reason: ET.Element | None) -> tuple[str | None, str | None]:
    if reason is None:
        return None, None
    condition = None
    text = None
    for child in islice(reason, 8):
        tag = child.tag if isinstance(child.tag, str) else ""
        local = tag.rpartition("}")[2]
        if local == "text":
            text = _text(child.text)
        elif condition is None and tag.startswith(f"{{{JINGLE_NS}}}"):
            condition = local[:40]
    return condition, text


def _size(text: str | None, problems: set[str]) -> int | None:
    if text is None:
        return None
    text = text.strip()
    # isascii: str.isdigit() accepts '²', which int() refuses.
    if not text or not text.isascii() or not text.isdigit() or len(text) > 19:
        problems.add("bad-size")
        return None
    size = int(text)
    if size > _MAX_SIZE:
        problems.add("bad-size")
        return None
    return size


def _si(si: ET.Element) -> Exchange:
    problems: set[str] = set()
    sid = _sid(si.get("id"), problems)
    file = si.find(f"{{{SI_FILE_NS}}}file")
    files: tuple[FileOffer, ...] = ()
    if file is not None:
        digest = file.get("hash")  # XEP-0096: MD5 of the file, hex
        files = (
            FileOffer(
                name=_text(file.get("name")),
                size=_size(file.get("size"), problems),
                media_type=_text(si.get("mime-type")),
                description=_text(file.findtext(f"{{{SI_FILE_NS}}}desc")),
                hashes=(("md5", digest[:200]),) if digest else (),
            ),
        )
    else:
        problems.add("unknown-profile")
    return Exchange(
        protocol="si",
        action="offer",
        sid=sid,
        media=("file",),
        files=files,
        problems=frozenset(problems),
    )


def _ibb(element: ET.Element, name: str) -> Exchange:
    problems: set[str] = set()
    sid = _sid(element.get("sid"), problems)
    if name == "open":
        block = _size(element.get("block-size"), problems)
        if block is not None and block > 65535:
            problems.add("bad-block-size")
        return Exchange(
            "ibb", "open", sid, ("file",), block_size=block, problems=frozenset(problems)
        )
    if name == "data":
        seq = _size(element.get("seq"), problems)
        if seq is not None and seq > 65535:
            problems.add("bad-seq")
            seq = None
        data = _b64(element.text or "")
        if data is None:
            problems.add("bad-base64")
        return Exchange(
            "ibb", "data", sid, ("file",), seq=seq, data=data, problems=frozenset(problems)
        )
    if name == "close":
        return Exchange("ibb", "close", sid, ("file",), problems=frozenset(problems))
    return Exchange(
        "ibb", name[:40] or "unknown", sid, ("file",), problems=frozenset({"unknown-ibb"})
    )


def _b64(text: str) -> bytes | None:
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


# --- the proxy's memory of sessions --------------------------------------------------------


@dataclass(slots=True)
class SessionState:
    started_at: datetime | None = None
    accepted_at: datetime | None = None
    kind: RecordKind | None = None
    verdict: Verdict | None = None  # of the opening step, when this proxy decided it
    ibb_seen: int = 0  # decoded bytes of every data block seen
    ibb_archived: int = 0  # of those, bytes kept in the archive
    ibb_digest: hashlib._Hash | None = None  # of every data block seen; IBB sessions only


class ExchangeSessions:
    """A bounded memory of the sessions this proxy saw (oldest forgotten first)."""

    def __init__(self, capacity: int = 50_000) -> None:
        self._sessions: OrderedDict[tuple[str, str, str, str], SessionState] = OrderedDict()
        self._capacity = capacity

    def get(self, key: tuple[str, str, str, str]) -> SessionState | None:
        return self._sessions.get(key)

    def state(self, key: tuple[str, str, str, str]) -> SessionState:
        state = self._sessions.get(key)
        if state is None:
            state = self._sessions[key] = SessionState()
            if len(self._sessions) > self._capacity:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(key)
        return state

    def forget(self, key: tuple[str, str, str, str]) -> None:
        self._sessions.pop(key, None)


def advance_session(state: SessionState, event: ExchangeEvent, ibb_archive_max_bytes: int) -> bool:
    """Note one first-seen step in its session; for an IBB block, whether to keep its bytes.

    Blocks are kept while the session's archived bytes stay within `ibb_archive_max_bytes`;
    the first block that would pass it, and every later one, keeps only size and SHA-256.
    """
    ex = event.exchange
    now = event.received_at
    if ex.opens and state.started_at is None:
        state.started_at = now
    if state.kind is None and ex.media and ex.kind is not RecordKind.FILE_DATA:
        state.kind = ex.kind
    if ex.action == "session-accept" and state.accepted_at is None:
        state.accepted_at = now
    if ex.protocol == "ibb" and ex.action == "data" and ex.data is not None:
        size = len(ex.data)
        state.ibb_seen += size
        if state.ibb_digest is None:
            state.ibb_digest = hashlib.sha256()
        state.ibb_digest.update(ex.data)
        if state.ibb_archived == state.ibb_seen - size and (
            state.ibb_archived + size <= ibb_archive_max_bytes
        ):
            state.ibb_archived += size
            return True
        return False
    return True


# --- records ---------------------------------------------------------------------------------


def exchange_record_id(event: ExchangeEvent) -> str:
    """Both legs of a local call (and a retry) agree: no leg, no time unless there is no id."""
    ex = event.exchange
    parts = [
        "exchange",
        ex.protocol,
        ex.action,
        ex.sid,
        event.sender.lower(),
        event.recipient.lower(),
        event.iq_id or f"at:{int(event.received_at.timestamp()) // 60}",
    ]
    if ex.protocol == "ibb" and ex.action == "data":
        parts += [str(ex.seq), hashlib.sha256(ex.data or b"").hexdigest()]
    return deterministic_record_id(*(p.encode("utf-8", "replace").decode() for p in parts))


def observation_of_exchange(
    event: ExchangeEvent, session_jid: str | None, now: datetime
) -> Observation:
    via = ObservationVia.COMPONENT if event.leg == Direction.COPY else ObservationVia.LIVE
    return Observation(at=now, jid=session_jid or event.seen_by, via=via, direction=event.leg)


def exchange_record(
    event: ExchangeEvent,
    verdict: Verdict,
    status: RecordStatus,
    observation: Observation,
    *,
    session: SessionState | None = None,
    keep_data: bool = True,
) -> ArchiveRecord:
    """The record of one step; `session` (already advanced by this step) adds times and sums.

    An IBB data block not kept (`keep_data`, see `advance_session`) keeps its size and
    SHA-256 but not its bytes: `raw` is then empty.
    """
    ex = event.exchange
    details = ExchangeDetails(
        protocol=ex.protocol,
        action=ex.action,
        sid=ex.sid,
        media=ex.media,
        initiator=ex.initiator,
        responder=ex.responder,
        reason=ex.reason,
        reason_text=ex.reason_text,
        hashes=tuple(h for f in ex.files for h in f.hashes),
        seq=ex.seq,
        block_size=ex.block_size,
    )
    raw = event.raw
    kind = ex.kind
    if session is not None:
        if ex.protocol == "jingle" and not ex.media and session.kind is not None:
            kind = session.kind  # an accept or terminate names no media: the session's kind
        details = replace(details, started_at=session.started_at, accepted_at=session.accepted_at)
        if ex.action == "session-terminate" and session.accepted_at is not None:
            duration = (event.received_at - session.accepted_at).total_seconds()
            details = replace(details, duration_seconds=max(duration, 0.0))
        if ex.action == "close" and ex.protocol == "ibb":
            details = replace(
                details,
                data_size=session.ibb_seen,
                data_sha256=(session.ibb_digest or hashlib.sha256()).hexdigest(),
                data_archived=session.ibb_archived == session.ibb_seen,
            )
    if ex.action == "data" and ex.protocol == "ibb":
        data = ex.data or b""
        details = replace(
            details,
            data_size=len(data),
            data_sha256=hashlib.sha256(data).hexdigest() if ex.data is not None else None,
            data_archived=keep_data and ex.data is not None,
        )
        if not keep_data:
            raw = b""  # a block that is not base64 is kept whole: it is evidence, not a file
    attachments = tuple(
        Attachment(
            url="",
            source=ex.protocol,
            media_type=f.media_type,
            name=f.name,
            size=f.size,
            sha256=f.sha256_hex,
        )
        for f in ex.files
    )
    return ArchiveRecord(
        record_id=exchange_record_id(event),
        kind=kind,
        occurred_at=event.received_at,
        direction=event.leg,
        sender=event.sender,
        sender_full=event.sender_full,
        recipient=event.recipient,
        recipient_full=event.recipient_full,
        stanza_type=ex.action,
        body=summary(kind, details, ex.files),
        thread=ex.sid or None,
        message_id=event.iq_id,
        attachments=attachments,
        client_address=event.client_address,
        exchange=details,
        verdict=verdict,
        status=status,
        raw=raw,
        observations=(observation,),
    )


def summary(kind: RecordKind, details: ExchangeDetails, files: tuple[FileOffer, ...]) -> str:
    """Searchable words for the record: what kind of session, which step, which files."""
    what = {RecordKind.CALL: "call", RecordKind.FILE: "file transfer"}.get(kind, "file data")
    if "whiteboard" in details.media:
        what = "whiteboard"
    words = [f"{what} {details.action}"]
    media = [m for m in details.media if m != "file"]
    if media:
        words.append("(" + ", ".join(media) + ")")
    if details.reason:
        words.append(f"reason: {details.reason}")
    if details.reason_text:
        words.append(f"“{details.reason_text}”")
    for f in files:
        described = f.name or "unnamed file"
        if f.size is not None:
            described += f" ({f.size} bytes)"
        if f.description:
            described += f": {f.description}"
        words.append(described)
    return " ".join(words)
