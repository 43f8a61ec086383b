"""Normalisation: one parsed top-level stanza in, one typed and frozen event out.

`normalise` turns the `{jabber:client}message|presence|iq` element the framer parsed (plus the
raw bytes, which are kept by reference, never re-serialised) into a `MessageEvent`,
`SubscriptionEvent`, `ReportEvent`, `RosterEvent`, `BindEvent`, `MucJoinEvent`,
`ExchangeEvent` (a Jingle, SI or IBB iq-set: calls and file transfers, `proxy.jingle`) or
`Ignored`.
It never raises on hostile input: invalid JIDs degrade to their raw text plus an `Anomaly`, and
a message that still trips the reader comes out as a minimal, archivable event flagged
`Anomaly.UNREADABLE` rather than as something the pipeline would let through unrecorded.

What is content (`MessageEvent.is_content`) and so archived: a message of any type but `error`
that carries a body (any language), a subject (for groupchat even an empty one: clearing the
topic is an act), an attachment, an encrypted payload (OMEMO, OpenPGP), a correction, a
retraction or a MUC invitation. Pure chat states, receipts, chat markers, PEP/pubsub headlines
and error bounces (which echo a message already archived) are not. `archivable` adds messages
whose forwarding wrapper was forged: they are evidence even without a body of their own.

History (`HistoryKind`) and trust, on the server→client leg only (a client cannot deliver
history to itself, so wrappers it sends are treated as forged):
- carbons count only when the outer `from` is absent or exactly the user's bare JID;
- MAM results only when the outer `from` is absent, the user's bare JID, or the bare JID of
  the room the forwarded groupchat message came from (MUC MAM);
- offline redelivery is a `<delay from='<the user's own domain>'/>`;
- MUC history is a groupchat `<delay from='<room bare JID>'/>` (Prosody strips such delays from
  what occupants send, so only the room can set it).
Only one level of forwarding is interpreted; anything forwarded inside the forwarded message
is left alone and flagged `Anomaly.NESTED_FORWARD`.
`history` says how a copy arrived, not that the pipeline has seen it: a remote sender's message
first reaches an offline user as offline or MAM history, and a `<delay/>` claiming the user's
domain can be forged by a remote sender. So the pipeline should skip deciding only when the
record id (`dedupe_key`) is already known, and decide otherwise.

Record ids (`dedupe_key`) collapse the copies of one message: the sender's live copy, carbons,
MAM replays, offline redelivery and each MUC reflection. See `dedupe_key` for the design.

How slixmpp is used (figures measured on a loaded 2-core machine, see `_scan`):
- presence and iq stanzas (subscriptions, MUC joins, bind, block/report, roster detection) are
  wrapped in private subclasses of slixmpp's stanza classes with exactly the plugins needed
  (`proxy.stanza_classes`, registered once at import); their interfaces read the payloads;
- messages, the stanza every conversation produces two or more times, are read with
  ElementTree in one pass over the children, with every tag name taken from slixmpp's stanza
  classes; roster items are read from the tree too (a roster can have thousands);
- JIDs are validated with slixmpp's `JID` (cached), and always from the raw attribute: its
  getters build a `JID` that raises `InvalidJID` on hostile input.
Reading a missing plugin as `stanza['plugin']` would insert an empty element into the parsed
tree, and `Iq(xml=...)` without `recv=True` writes `id='0'` into it; hence `get_plugin(...,
check=True)` and `recv=True` throughout: normalising never mutates the element.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Final, TypeAlias, TypeVar
from urllib.parse import urlsplit

from slixmpp.jid import JID, InvalidJID
from slixmpp.plugins.xep_0045.stanza import MUCInvite, MUCMessage
from slixmpp.plugins.xep_0066.stanza import OOB
from slixmpp.plugins.xep_0085.stanza import Active, Composing, Gone, Inactive, Paused
from slixmpp.plugins.xep_0184.stanza import Received as ReceiptReceived
from slixmpp.plugins.xep_0184.stanza import Request as ReceiptRequest
from slixmpp.plugins.xep_0203.stanza import Delay
from slixmpp.plugins.xep_0234.stanza import File as JingleFile
from slixmpp.plugins.xep_0249.stanza import Invite
from slixmpp.plugins.xep_0280.stanza import ReceivedCarbon, SentCarbon
from slixmpp.plugins.xep_0297.stanza import Forwarded
from slixmpp.plugins.xep_0300.stanza import Hash
from slixmpp.plugins.xep_0308.stanza import Replace
from slixmpp.plugins.xep_0313.stanza import Result as MamResult
from slixmpp.plugins.xep_0333.stanza import Acknowledged, Displayed, Markable
from slixmpp.plugins.xep_0333.stanza import Received as MarkerReceived
from slixmpp.plugins.xep_0359.stanza import OriginID, StanzaID
from slixmpp.plugins.xep_0372.stanza import Reference
from slixmpp.plugins.xep_0385.stanza import Sims
from slixmpp.plugins.xep_0385.stanza import Sources as SimsSources
from slixmpp.plugins.xep_0422.stanza import ApplyTo
from slixmpp.plugins.xep_0424.stanza import Retract
from slixmpp.plugins.xep_0446.stanza import File as FileMetadata
from slixmpp.plugins.xep_0447.stanza import Sources as SfsSources
from slixmpp.plugins.xep_0447.stanza import StatelessFileSharing, UrlData
from slixmpp.stanza import Message
from slixmpp.stanza.roster import RosterItem
from slixmpp.xmlstream import ElementBase

from archive_api.store.records import (
    ArchiveRecord,
    Attachment,
    Direction,
    Observation,
    ObservationVia,
    RecordKind,
    RecordStatus,
    StanzaIdRef,
    deterministic_record_id,
)
from classifier.verdict import Verdict
from proxy.errors import StanzaError
from proxy.jingle import Exchange, ExchangeEvent, read_exchange
from proxy.stanza_classes import BlockItemPayload, IqStanza, PresenceStanza

logger = logging.getLogger(__name__)

CLIENT_NS: Final = "jabber:client"
MESSAGE_TYPES: Final = frozenset({"chat", "groupchat", "normal", "headline", "error"})
SUBSCRIPTION_TYPES: Final = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})

_XML_LANG: Final = "{http://www.w3.org/XML/1998/namespace}lang"
_BODY: Final = "{jabber:client}body"
_SUBJECT: Final = "{jabber:client}subject"
_THREAD: Final = "{jabber:client}thread"
_OMEMO_LEGACY: Final = "{eu.siacs.conversations.axolotl}encrypted"
_OMEMO_LEGACY_PAYLOAD: Final = "{eu.siacs.conversations.axolotl}payload"
_OMEMO_2: Final = "{urn:xmpp:omemo:2}encrypted"
_OMEMO_2_PAYLOAD: Final = "{urn:xmpp:omemo:2}payload"
_OPENPGP: Final = "{urn:xmpp:openpgp:0}openpgp"
_LEGACY_PGP: Final = "{jabber:x:encrypted}x"
_RETRACT_0: Final = "{urn:xmpp:message-retract:0}retract"
_REPORTING_0: Final = "urn:xmpp:reporting:0"
_PREAUTH: Final = "{urn:xmpp:pars:0}preauth"
_MUC_USER_STATUS: Final = "{http://jabber.org/protocol/muc#user}status"

# Far more than any real message carries; bounds the work and the record a hostile stanza costs.
_MAX_ATTACHMENTS: Final = 32
_MAX_TEXT_ATTR: Final = 1024
# Ids and JIDs longer than any legal one are parsed without caching so they cannot evict real
# entries (a JID has three parts of at most 1023 bytes).
_MAX_CACHED_JID: Final = 3071
# Copies of a message without any id are told apart by a coarse time bucket (see dedupe_key).
_NO_ID_BUCKET_SECONDS: Final = 60

_URL = re.compile(r"(?:https?|aesgcm)://[^\s<>\"']+", re.IGNORECASE)


# --- public types -------------------------------------------------------------------------------


class HistoryKind(StrEnum):
    """How a copy of an earlier message reached the client; `None` on an event means live."""

    CARBON_SENT = "carbon-sent"
    CARBON_RECEIVED = "carbon-received"
    MAM = "mam"
    OFFLINE = "offline"
    MUC_HISTORY = "muc-history"


class Anomaly(StrEnum):
    """Something about a stanza a well-behaved server or client would not produce."""

    FORGED_CARBON = "forged-carbon"  # carbon not from the user's own bare JID, or client-sent
    FORGED_MAM = "forged-mam"  # MAM result from someone else, or client-sent
    NESTED_FORWARD = "nested-forward"  # the forwarded message itself forwards something
    INVALID_JID = "invalid-jid"  # from/to (or a JID payload) failed JID validation
    SPOOFED_FROM = "spoofed-from"  # client stanza whose from is not the session's account
    UNREADABLE = "unreadable"  # the reader failed; only attributes and raw bytes are kept


class Signal(StrEnum):
    """Non-content payloads: they never make a message archivable on their own."""

    CHAT_STATE = "chat-state"
    RECEIPT_REQUEST = "receipt-request"
    RECEIPT = "receipt"
    MARKABLE = "markable"
    MARKER = "marker"


@dataclass(frozen=True, slots=True)
class Invitation:
    """A MUC invitation: mediated through the room (XEP-0045) or direct (XEP-0249).

    The room password is never kept: it is a credential, and the raw bytes hold it anyway.
    """

    room: str
    mediated: bool
    inviter: str | None = None
    invitee: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """One message as the archive and the classifier see it.

    For carbons and MAM results everything describes the forwarded (inner) message; `leg` is
    the leg it was seen on and `direction` is relative to the local user: `FROM_CLIENT` when
    the user sent it (also a sent carbon or a MAM copy of the user's own message), `TO_CLIENT`
    when it was sent to the user (`COPY` for a server's copy in component mode). For groupchat
    reflections `sender` is the room's bare JID and `sender_full` the occupant JID
    (`room@service/nick`); the real JID is not known there. `raw` is the top-level stanza as
    it crossed the proxy (for carbons and MAM results, the wrapper), kept by reference.
    """

    leg: Direction
    direction: Direction
    stanza_type: str
    sender: str
    sender_full: str
    recipient: str
    recipient_full: str
    received_at: datetime
    raw: bytes = field(repr=False)
    seen_by: str = ""  # full JID of the session the stanza crossed (the observer)
    body: str | None = None
    other_bodies: tuple[tuple[str, str], ...] = ()  # (xml:lang, text) beyond `body`
    subject: str | None = None
    thread: str | None = None
    message_id: str | None = None
    origin_id: str | None = None
    stanza_ids: tuple[StanzaIdRef, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    encryption: str | None = None  # "omemo", "openpgp", "otr"
    replaces_id: str | None = None
    retracts_id: str | None = None
    delay_stamp: datetime | None = None
    delay_from: str | None = None
    room: str | None = None  # bare room JID, groupchat only
    nick: str | None = None  # occupant nick of a groupchat reflection
    invitation: Invitation | None = None
    signals: frozenset[Signal] = frozenset()
    history: HistoryKind | None = None
    anomalies: frozenset[Anomaly] = frozenset()
    client_address: str | None = None
    is_content: bool = False
    content_digest: str = ""

    def __init__(
        self,
        leg: Direction,
        direction: Direction,
        stanza_type: str,
        sender: str,
        sender_full: str,
        recipient: str,
        recipient_full: str,
        received_at: datetime,
        raw: bytes,
        seen_by: str = "",
        body: str | None = None,
        other_bodies: tuple[tuple[str, str], ...] = (),
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
        delay_from: str | None = None,
        room: str | None = None,
        nick: str | None = None,
        invitation: Invitation | None = None,
        signals: frozenset[Signal] = frozenset(),
        history: HistoryKind | None = None,
        anomalies: frozenset[Anomaly] = frozenset(),
        client_address: str | None = None,
        is_content: bool = False,
        content_digest: str = "",
    ) -> None:
        # Spelled out, not generated: compiled, this stores the fields directly (docs/native.md).
        object.__setattr__(self, "leg", leg)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "stanza_type", stanza_type)
        object.__setattr__(self, "sender", sender)
        object.__setattr__(self, "sender_full", sender_full)
        object.__setattr__(self, "recipient", recipient)
        object.__setattr__(self, "recipient_full", recipient_full)
        object.__setattr__(self, "received_at", received_at)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "seen_by", seen_by)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "other_bodies", other_bodies)
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
        object.__setattr__(self, "delay_from", delay_from)
        object.__setattr__(self, "room", room)
        object.__setattr__(self, "nick", nick)
        object.__setattr__(self, "invitation", invitation)
        object.__setattr__(self, "signals", signals)
        object.__setattr__(self, "history", history)
        object.__setattr__(self, "anomalies", anomalies)
        object.__setattr__(self, "client_address", client_address)
        object.__setattr__(self, "is_content", is_content)
        object.__setattr__(self, "content_digest", content_digest)

    @property
    def archivable(self) -> bool:
        forged = Anomaly.FORGED_CARBON in self.anomalies or Anomaly.FORGED_MAM in self.anomalies
        return self.is_content or forged or Anomaly.UNREADABLE in self.anomalies

    @property
    def occurred_at(self) -> datetime:
        """When the message was sent: the server's stamp for history, else when we saw it.

        A live message's own `<delay/>` is the sender's claim and is not believed.
        """
        if self.history is not None and self.delay_stamp is not None:
            return self.delay_stamp
        return self.received_at


@dataclass(frozen=True, slots=True)
class SubscriptionEvent:
    """A presence subscription request or answer (RFC 6121 §3).

    `preauth` only says that a XEP-0379 token came along; the token itself is a credential.
    """

    leg: Direction
    stanza_type: str  # subscribe, subscribed, unsubscribe, unsubscribed
    sender: str
    sender_full: str
    recipient: str
    recipient_full: str
    received_at: datetime
    raw: bytes = field(repr=False)
    stanza_id: str | None = None
    nick: str | None = None
    status: str | None = None
    preauth: bool = False
    anomalies: frozenset[Anomaly] = frozenset()
    client_address: str | None = None


@dataclass(frozen=True, slots=True)
class ReportItem:
    """One reported JID of a XEP-0191 block command carrying a XEP-0377 report."""

    jid: str
    reason: str | None  # "spam", "abuse", or the reason URI as sent
    text: str | None = None
    stanza_ids: tuple[StanzaIdRef, ...] = ()  # the reported messages


@dataclass(frozen=True, slots=True)
class ReportEvent:
    """A spam/abuse report: the user blocked someone and said why."""

    reporter: str
    reporter_full: str
    iq_id: str | None
    items: tuple[ReportItem, ...]
    received_at: datetime
    raw: bytes = field(repr=False)
    client_address: str | None = None


@dataclass(frozen=True, slots=True)
class RosterEntry:
    jid: str  # bare JID, or the raw text when invalid
    subscription: str  # none, to, from, both, remove
    ask: bool = False  # an outgoing subscription request is pending
    name: str | None = None


@dataclass(frozen=True, slots=True)
class RosterEvent:
    """A roster result or push on the server→client leg: whom the owner trusts."""

    owner: str
    items: tuple[RosterEntry, ...]
    is_push: bool
    version: str | None = None


@dataclass(frozen=True, slots=True)
class BindEvent:
    """The server's bind result: the session's full JID from here on."""

    jid: str
    bare: str


@dataclass(frozen=True, slots=True)
class MucJoinEvent:
    """The user joins a room (client leg), or the room confirms the join (status 110)."""

    leg: Direction
    room: str
    nick: str
    user_jid: str | None
    confirmed: bool = False


@dataclass(frozen=True, slots=True)
class Ignored:
    """Anything else; `reason` is for logs and metrics, never shown to users."""

    reason: str


Event: TypeAlias = (
    MessageEvent
    | SubscriptionEvent
    | ReportEvent
    | RosterEvent
    | BindEvent
    | MucJoinEvent
    | ExchangeEvent
    | Ignored
)
ArchivableEvent: TypeAlias = MessageEvent | SubscriptionEvent | ReportEvent


_E = TypeVar("_E", bound=ElementBase)


def _each(stanza: ElementBase, cls: type[_E]) -> Iterator[_E]:
    for sub in stanza.iterables:
        if isinstance(sub, cls):
            yield sub


def _plugin(stanza: ElementBase, name: str) -> ElementBase | None:
    # check=True: without it slixmpp creates (and appends to the tree) a missing plugin.
    found: ElementBase | None = stanza.get_plugin(name, check=True)
    return found


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _capped(value: str | None) -> str | None:
    return value[:_MAX_TEXT_ATTR] if value is not None else None


# --- JIDs ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Jid:
    full: str
    bare: str
    domain: str
    resource: str
    valid: bool = True

    def as_bare(self) -> _Jid:
        return _Jid(self.bare, self.bare, self.domain, "", self.valid)


_NO_JID: Final = _Jid("", "", "", "")


def _jid(text: str | None) -> _Jid:
    if not text:
        return _NO_JID
    if len(text) > _MAX_CACHED_JID:
        return _invalid_jid(text)
    return _jid_cached(text)


@lru_cache(maxsize=4096)
def _jid_cached(text: str) -> _Jid:
    try:
        jid = JID(text)
    except (InvalidJID, ValueError, UnicodeError):
        return _invalid_jid(text)
    return _Jid(full=jid.full, bare=jid.bare, domain=jid.domain, resource=jid.resource)


def _invalid_jid(text: str) -> _Jid:
    # Kept as text so the archive shows what was sent; lower-cased like a valid bare JID so the
    # copies of one stanza still agree on their key.
    bare, _, resource = text.partition("/")
    bare = bare.lower()
    return _Jid(
        full=text, bare=bare, domain=bare.rpartition("@")[2], resource=resource, valid=False
    )


# --- normalise ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
    leg: Direction
    session: _Jid
    client_address: str | None
    now: datetime
    upload_hosts: frozenset[str]

    def __init__(
        self,
        leg: Direction,
        session: _Jid,
        client_address: str | None,
        now: datetime,
        upload_hosts: frozenset[str],
    ) -> None:
        # Spelled out, not generated: compiled, this stores the fields directly (docs/native.md).
        object.__setattr__(self, "leg", leg)
        object.__setattr__(self, "session", session)
        object.__setattr__(self, "client_address", client_address)
        object.__setattr__(self, "now", now)
        object.__setattr__(self, "upload_hosts", upload_hosts)


def normalise(
    element: ET.Element,
    raw: bytes,
    *,
    direction: Direction,
    session_jid: str | None,
    client_address: str | None,
    now: datetime,
    upload_hosts: frozenset[str] = frozenset(),
) -> Event:
    """Describe one top-level stanza. Never raises on hostile input; never mutates `element`.

    `direction` is the leg (`FROM_CLIENT` for what the local user's client sent); `session_jid`
    is the session's bound full JID (None before bind); `now` is a timezone-aware UTC time;
    `upload_hosts` are lower-case host names of the XEP-0363 upload services whose bare URLs in
    a body count as attachments.
    """
    tag = element.tag if isinstance(element.tag, str) else ""
    namespace, _, name = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
    if namespace != CLIENT_NS:
        return Ignored(f"not a jabber:client stanza: {tag[:100]!r}")
    ctx = _Context(
        leg=direction,
        session=_jid(session_jid),
        client_address=client_address,
        now=now,
        upload_hosts=upload_hosts,
    )
    try:
        if name == "message":
            return _message(element, raw, ctx)
        if name == "presence":
            return _presence(element, raw, ctx)
        if name == "iq":
            return _iq(element, raw, ctx)
    except Exception as exc:
        # A reader bug must not turn a message into something delivered but unrecorded, so a
        # message degrades to an archivable event built from its attributes and raw bytes.
        # Only the exception type and where it arose are logged: messages quoting the input
        # would put message content into the logs.
        logger.warning(
            "could not read a %s stanza: %s at %s", name, type(exc).__name__, _where(exc)
        )
        if name == "message":
            return _unreadable_message(element, raw, ctx)
        return Ignored(f"unreadable {name}: {type(exc).__name__}")
    return Ignored(f"not a stanza: {name[:100]!r}")


def _where(exc: BaseException) -> str:
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return "?"
    return f"{frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}"


# --- messages -----------------------------------------------------------------------------------
# Read with ElementTree in one pass over the children (`_scan`), with tag names taken from
# slixmpp's stanza classes. A first version wrapped messages in slixmpp's classes: 40-45 µs for
# a plain chat message, 100-160 µs for a carbon, 230-570 µs for a MAM result with a SIMS
# attachment, where this reader takes 18-27, 27-36 and 57-70 µs and ElementTree's own parse of
# the same stanza 12-20, 19-27 and 30-44 µs (same loaded machine, min of 7 runs). slixmpp
# discovers every registered plugin eagerly, and each plugin lookup or sub-element read walks
# the xml:lang inheritance up the parent chain through its generic `__getitem__` (2-4 µs per
# read at the top, more the deeper the element), so nesting (carbons, MAM, SIMS) costs most.


def _tag(cls: type[ElementBase]) -> str:
    return f"{{{cls.namespace}}}{cls.name}"


_DELAY: Final = _tag(Delay)
_STANZA_ID: Final = _tag(StanzaID)
_ORIGIN_ID: Final = _tag(OriginID)
_OOB: Final = _tag(OOB)
_OOB_URL: Final = f"{{{OOB.namespace}}}url"
_REPLACE: Final = _tag(Replace)
_RETRACT: Final = _tag(Retract)
_APPLY_TO: Final = _tag(ApplyTo)
_MUC_USER: Final = _tag(MUCMessage)
_MUC_INVITE: Final = _tag(MUCInvite)
_MUC_INVITE_REASON: Final = f"{{{MUCInvite.namespace}}}reason"
_DIRECT_INVITE: Final = _tag(Invite)
_CARBON_SENT: Final = _tag(SentCarbon)
_CARBON_RECEIVED: Final = _tag(ReceivedCarbon)
_MAM_RESULT: Final = _tag(MamResult)
_FORWARDED: Final = _tag(Forwarded)
_REFERENCE: Final = _tag(Reference)
_SIMS: Final = _tag(Sims)
_SIMS_SOURCES: Final = _tag(SimsSources)
_JINGLE_FILE: Final = _tag(JingleFile)
_SFS: Final = _tag(StatelessFileSharing)
_SFS_SOURCES: Final = _tag(SfsSources)
_FILE_METADATA: Final = _tag(FileMetadata)
_URL_DATA: Final = _tag(UrlData)
_HASH: Final = _tag(Hash)

_MESSAGE: Final = _tag(Message)
_SIGNALS: Final[dict[str, Signal]] = {
    **{_tag(state): Signal.CHAT_STATE for state in (Active, Composing, Paused, Inactive, Gone)},
    _tag(ReceiptRequest): Signal.RECEIPT_REQUEST,
    _tag(ReceiptReceived): Signal.RECEIPT,
    _tag(Markable): Signal.MARKABLE,
    **{_tag(marker): Signal.MARKER for marker in (MarkerReceived, Displayed, Acknowledged)},
}
_WRAPPERS: Final = {
    _CARBON_SENT: HistoryKind.CARBON_SENT,
    _CARBON_RECEIVED: HistoryKind.CARBON_RECEIVED,
    _MAM_RESULT: HistoryKind.MAM,
}


class _Scan:
    """What one pass over a message's children found; the elements are the parsed ones."""

    __slots__ = (
        "bodies",
        "delays",
        "direct_invite",
        "encryption",
        "muc_user",
        "nested",
        "oobs",
        "origin_id",
        "payload",
        "references",
        "replaces_id",
        "retracts_id",
        "sfs",
        "signals",
        "stanza_ids",
        "subject",
        "thread",
        "wrapper",
    )

    def __init__(self) -> None:
        self.bodies: list[ET.Element] = []
        self.subject: ET.Element | None = None
        self.thread: str | None = None
        self.origin_id: str | None = None
        self.stanza_ids: list[ET.Element] = []
        self.delays: list[ET.Element] = []
        self.references: list[ET.Element] = []
        self.sfs: list[ET.Element] = []
        self.oobs: list[ET.Element] = []
        self.replaces_id: str | None = None
        self.retracts_id: str | None = None
        self.muc_user: ET.Element | None = None
        self.direct_invite: ET.Element | None = None
        self.encryption: str | None = None
        self.payload: str | None = None
        self.signals: set[Signal] = set()
        self.wrapper: ET.Element | None = None
        self.nested = False


def _scan(element: ET.Element, *, inner: bool) -> _Scan:
    scan = _Scan()
    for child in element:
        tag = child.tag
        if not isinstance(tag, str):
            continue
        if tag == _BODY:
            scan.bodies.append(child)
        elif tag in _SIGNALS:
            scan.signals.add(_SIGNALS[tag])
        elif tag == _ORIGIN_ID:
            scan.origin_id = scan.origin_id or child.get("id") or None
        elif tag == _STANZA_ID:
            scan.stanza_ids.append(child)
        elif tag == _DELAY:
            scan.delays.append(child)
        elif tag == _SUBJECT:
            scan.subject = child if scan.subject is None else scan.subject
        elif tag == _THREAD:
            scan.thread = scan.thread or child.text or None
        elif tag == _REFERENCE:
            scan.references.append(child)
        elif tag == _SFS:
            scan.sfs.append(child)
        elif tag == _OOB:
            scan.oobs.append(child)
        elif tag == _REPLACE:
            scan.replaces_id = scan.replaces_id or child.get("id") or None
        elif tag == _RETRACT:
            scan.retracts_id = scan.retracts_id or child.get("id") or None
        elif tag == _APPLY_TO:
            if child.find(_RETRACT_0) is not None:
                scan.retracts_id = scan.retracts_id or child.get("id") or None
        elif tag == _MUC_USER:
            scan.muc_user = child if scan.muc_user is None else scan.muc_user
        elif tag == _DIRECT_INVITE:
            scan.direct_invite = child if scan.direct_invite is None else scan.direct_invite
        elif tag in (_OMEMO_LEGACY, _OMEMO_2):
            scan.encryption = "omemo"
            payload = _OMEMO_LEGACY_PAYLOAD if tag == _OMEMO_LEGACY else _OMEMO_2_PAYLOAD
            scan.payload = child.findtext(payload) or scan.payload
        elif tag in (_OPENPGP, _LEGACY_PGP):
            scan.encryption = "openpgp"
            scan.payload = child.text or scan.payload
        elif tag in _WRAPPERS or tag == _FORWARDED:
            if inner:
                scan.nested = True
            elif tag != _FORWARDED and scan.wrapper is None:
                scan.wrapper = child
    return scan


def _message(element: ET.Element, raw: bytes, ctx: _Context) -> Event:
    own = ctx.session
    outer_from = _jid(element.get("from"))
    anomalies: set[Anomaly] = set()
    if not (outer_from.valid and _jid(element.get("to")).valid):
        anomalies.add(Anomaly.INVALID_JID)
    scan = _scan(element, inner=False)
    wrapper = scan.wrapper
    if wrapper is None:
        return _live_message(element, scan, raw, ctx, anomalies)

    kind = _WRAPPERS[str(wrapper.tag)]
    forwarded = wrapper.find(_FORWARDED)
    inner = forwarded.find(_MESSAGE) if forwarded is not None else None
    from_account = not outer_from.full or (
        own.bare != "" and outer_from.bare == own.bare and not outer_from.resource
    )
    if kind is HistoryKind.MAM and inner is not None and not from_account:
        # MUC MAM: the room answers for its own archive, from its bare JID.
        from_account = (
            inner.get("type") == "groupchat"
            and not outer_from.resource
            and _jid(inner.get("from")).bare == outer_from.bare
        )
    if ctx.leg != Direction.TO_CLIENT or not from_account:
        anomalies.add(Anomaly.FORGED_MAM if kind is HistoryKind.MAM else Anomaly.FORGED_CARBON)
        return _live_message(element, scan, raw, ctx, anomalies)
    if forwarded is None or inner is None:
        return Ignored("forwarding wrapper without a forwarded message")

    sender, recipient = _jid(inner.get("from")), _jid(inner.get("to"))
    if not (sender.valid and recipient.valid):
        anomalies.add(Anomaly.INVALID_JID)
    extra_ids: tuple[StanzaIdRef, ...] = ()
    if kind is HistoryKind.MAM:
        mine = own.bare != "" and sender.bare == own.bare
        direction = Direction.FROM_CLIENT if mine else Direction.TO_CLIENT
        archive_id, by = wrapper.get("id"), outer_from.bare or own.bare
        if archive_id and by:
            extra_ids = (StanzaIdRef(archive_id, by),)
    else:
        direction = (
            Direction.FROM_CLIENT if kind is HistoryKind.CARBON_SENT else Direction.TO_CLIENT
        )
        if not sender.full and kind is HistoryKind.CARBON_SENT:
            sender = own
    delay = forwarded.find(_DELAY)
    return _describe(
        inner,
        _scan(inner, inner=True),
        raw,
        ctx,
        direction=direction,
        sender=sender,
        recipient=recipient,
        history=kind,
        delay_stamp=_stamp(delay.get("stamp")) if delay is not None else None,
        delay_from=None,
        extra_stanza_ids=extra_ids,
        anomalies=anomalies,
        seen_by=_seen_by(element, ctx),
    )


def _live_message(
    element: ET.Element, scan: _Scan, raw: bytes, ctx: _Context, anomalies: set[Anomaly]
) -> MessageEvent:
    own = ctx.session
    stated_from = _jid(element.get("from"))
    to = _jid(element.get("to"))
    if ctx.leg == Direction.FROM_CLIENT:
        # Clients usually omit `from`; the server stamps the bound JID, so that is the sender.
        if stated_from.full and own.bare and stated_from.bare != own.bare:
            anomalies.add(Anomaly.SPOOFED_FROM)
        sender = own if own.full else stated_from
        recipient = to if to.full else own.as_bare()
        direction = Direction.FROM_CLIENT
    elif ctx.leg == Direction.TO_CLIENT:
        # RFC 6120 §8.1.2.1: no `from` means the user's own account (the server on its behalf).
        sender = stated_from if stated_from.full else own.as_bare()
        recipient = to if to.full else own
        direction = Direction.TO_CLIENT
    else:
        sender, recipient, direction = stated_from, to, ctx.leg

    history: HistoryKind | None = None
    chosen: ET.Element | None = None
    is_groupchat = element.get("type") == "groupchat"
    if ctx.leg == Direction.TO_CLIENT:
        for delay in scan.delays:
            delay_from = _jid(delay.get("from"))
            if is_groupchat and delay_from.bare and delay_from.bare == sender.bare:
                history, chosen = HistoryKind.MUC_HISTORY, delay
                break
            if not is_groupchat and own.domain and delay_from.full == own.domain:
                history, chosen = HistoryKind.OFFLINE, delay
                break
    if chosen is None and scan.delays:
        chosen = scan.delays[0]
    return _describe(
        element,
        scan,
        raw,
        ctx,
        direction=direction,
        sender=sender,
        recipient=recipient,
        history=history,
        delay_stamp=_stamp(chosen.get("stamp")) if chosen is not None else None,
        delay_from=(_jid(chosen.get("from")).full or None) if chosen is not None else None,
        extra_stanza_ids=(),
        anomalies=anomalies,
        seen_by=_seen_by(element, ctx),
    )


def _seen_by(outer: ET.Element, ctx: _Context) -> str:
    if ctx.session.full:
        return ctx.session.full
    local = outer.get("from") if ctx.leg == Direction.FROM_CLIENT else outer.get("to")
    return _jid(local).full


def _describe(
    element: ET.Element,
    scan: _Scan,
    raw: bytes,
    ctx: _Context,
    *,
    direction: Direction,
    sender: _Jid,
    recipient: _Jid,
    history: HistoryKind | None,
    delay_stamp: datetime | None,
    delay_from: str | None,
    extra_stanza_ids: tuple[StanzaIdRef, ...],
    anomalies: set[Anomaly],
    seen_by: str,
) -> MessageEvent:
    stanza_type = element.get("type") or "normal"
    if stanza_type not in MESSAGE_TYPES:
        stanza_type = "normal"  # RFC 6121 §5.2.2: an unknown type is treated as normal
    if scan.nested:
        anomalies.add(Anomaly.NESTED_FORWARD)

    body, other_bodies = _bodies(element, scan.bodies)
    subject = (scan.subject.text or "") if scan.subject is not None else None
    room = nick = None
    if stanza_type == "groupchat":
        occupant = recipient if direction == Direction.FROM_CLIENT else sender
        room = occupant.bare or None
        if direction != Direction.FROM_CLIENT:
            nick = sender.resource or None
    encryption = scan.encryption
    if encryption is None and body is not None and body.startswith("?OTR"):
        encryption = "otr"
    attachments = _attachments(scan, body, ctx.upload_hosts)
    invitation = _invitation(scan, direction, sender, recipient)
    is_content = stanza_type != "error" and bool(
        body
        or other_bodies
        or subject
        or (subject is not None and stanza_type == "groupchat")
        or attachments
        or scan.payload
        or scan.replaces_id
        or scan.retracts_id
        or invitation
    )
    digest = ""
    if is_content:
        digest = _content_digest(
            body,
            *(f"{lang}\x1e{text}" for lang, text in other_bodies),
            subject,
            scan.payload,
            scan.replaces_id,
            scan.retracts_id,
            # Derived upload attachments are left out: they depend on configuration.
            *(a.url for a in attachments if a.source != "upload"),
            invitation.room if invitation else None,
            invitation.reason if invitation else None,
        )
    elif Anomaly.FORGED_CARBON in anomalies or Anomaly.FORGED_MAM in anomalies:
        # Archived as evidence though it has no content of its own: its payload is inside the
        # wrapper, so the bytes tell two forgeries apart.
        digest = hashlib.sha256(raw).hexdigest()[:32]
    return MessageEvent(
        leg=ctx.leg,
        direction=direction,
        stanza_type=stanza_type,
        sender=sender.bare,
        sender_full=sender.full,
        recipient=recipient.bare,
        recipient_full=recipient.full,
        received_at=ctx.now,
        raw=raw,
        seen_by=seen_by,
        body=body,
        other_bodies=other_bodies,
        subject=subject,
        thread=scan.thread,
        message_id=element.get("id") or None,
        origin_id=scan.origin_id,
        stanza_ids=_stanza_ids(scan, ctx, room, extra_stanza_ids),
        attachments=attachments,
        encryption=encryption,
        replaces_id=scan.replaces_id,
        retracts_id=scan.retracts_id,
        delay_stamp=delay_stamp,
        delay_from=delay_from,
        room=room,
        nick=nick,
        invitation=invitation,
        signals=frozenset(scan.signals),
        history=history,
        anomalies=frozenset(anomalies),
        client_address=ctx.client_address,
        is_content=is_content,
        content_digest=digest,
    )


def _bodies(
    element: ET.Element, found: list[ET.Element]
) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    # Every language counts: a spammer can hide text in a second <body xml:lang='..'/> that
    # some clients show. The primary one is the body in the stanza's own language.
    if not found:
        return None, ()
    if len(found) == 1:
        return found[0].text or None, ()
    lang = element.get(_XML_LANG, "")
    primary = next((b for b in found if b.get(_XML_LANG, lang) == lang), found[0])
    others = tuple((b.get(_XML_LANG, lang), b.text) for b in found if b is not primary and b.text)
    return primary.text or None, others


def _stamp(text: str | None) -> datetime | None:
    # slixmpp's xep_0082.parse costs ~18 µs (strptime, and an exception for the common stamp
    # without fractions) and rejects nanosecond stamps; fromisoformat takes under 1 µs. A
    # stamp without a zone is not XEP-0082 and not believed.
    if not text or len(text) > 64:
        return None
    try:
        stamp = datetime.fromisoformat(text)
        # Year 9999 at -01:00 is valid ISO 8601 and out of range in UTC.
        return stamp.astimezone(UTC) if stamp.tzinfo is not None else None
    except (ValueError, OverflowError):
        return None


def _stanza_ids(
    scan: _Scan, ctx: _Context, room: str | None, extra: tuple[StanzaIdRef, ...]
) -> tuple[StanzaIdRef, ...]:
    # Only archives that speak for this copy are believed: the user's own server (by = own bare
    # JID) and the room. Prosody strips stanza-ids claiming either from what others send, so
    # those left are genuine; any other is the sender's say-so. A client assigns none.
    if ctx.leg == Direction.FROM_CLIENT or not scan.stanza_ids:
        return extra
    trusted = {ctx.session.bare, room} if ctx.leg == Direction.TO_CLIENT else None
    found = list(extra)
    for sid in scan.stanza_ids:
        ident, by = sid.get("id"), _jid(sid.get("by")).bare
        if not ident or not by or (trusted is not None and by not in trusted):
            continue
        ref = StanzaIdRef(ident, by)
        if ref not in found:
            found.append(ref)
    return tuple(found)


def _invitation(
    scan: _Scan, direction: Direction, sender: _Jid, recipient: _Jid
) -> Invitation | None:
    invite = scan.muc_user.find(_MUC_INVITE) if scan.muc_user is not None else None
    if invite is not None:
        # Mediated: the client sends it to the room, the room passes it on from itself.
        outgoing = direction == Direction.FROM_CLIENT
        room = recipient if outgoing else sender
        inviter = _jid(invite.get("from")).bare or (sender.bare if outgoing else "")
        invitee = _jid(invite.get("to")).bare or ("" if outgoing else recipient.bare)
        return Invitation(
            room=room.bare,
            mediated=True,
            inviter=inviter or None,
            invitee=invitee or None,
            reason=invite.findtext(_MUC_INVITE_REASON) or None,
        )
    direct = scan.direct_invite
    if direct is not None:
        return Invitation(
            room=_jid(direct.get("jid")).bare,
            mediated=False,
            inviter=sender.bare or None,
            invitee=recipient.bare or None,
            reason=direct.get("reason") or None,
        )
    return None


def _attachments(
    scan: _Scan, body: str | None, upload_hosts: frozenset[str]
) -> tuple[Attachment, ...]:
    upload_urls = bool(body and upload_hosts and "://" in body)
    if not (scan.references or scan.sfs or scan.oobs or upload_urls):
        return ()  # the common chat message: nothing to look at
    # Richest description first; the same URL again (SIMS + OOB + the URL as body is what
    # Conversations-style clients send) keeps the first.
    found: dict[str, Attachment] = {}

    def add(url: str | None, source: str, meta: _FileMeta = (None, None, None, None)) -> None:
        url = url.strip() if url else None
        if url and len(found) < _MAX_ATTACHMENTS and url not in found:
            found[url] = Attachment(url, source, *meta)

    for ref in scan.references:
        sims = ref.find(_SIMS)
        sources = sims.find(_SIMS_SOURCES) if sims is not None else None
        if sims is None or sources is None:
            continue
        meta = _file_meta(sims.find(_JINGLE_FILE), JingleFile.namespace)
        for source in sources.iterfind(_REFERENCE):
            add(source.get("uri"), "sims", meta)
    for sfs in scan.sfs:
        sources = sfs.find(_SFS_SOURCES)
        if sources is None:
            continue
        meta = _file_meta(sfs.find(_FILE_METADATA), FileMetadata.namespace)
        for url_data in sources.iterfind(_URL_DATA):
            add(url_data.get("target"), "sfs", meta)
    for oob in scan.oobs:
        add(oob.findtext(_OOB_URL), "oob")
    if body and upload_urls:
        for url in _upload_urls(body, upload_hosts):
            add(url, "upload")
    return tuple(found.values())


_FileMeta: TypeAlias = tuple[str | None, str | None, int | None, str | None]


def _file_meta(file: ET.Element | None, namespace: str) -> _FileMeta:
    """(media type, name, size, sha-256 as hex) of a XEP-0234 or XEP-0446 file element."""
    if file is None:
        return None, None, None, None
    size_text = file.findtext(f"{{{namespace}}}size")
    # isascii: str.isdigit() accepts '²', which int() refuses.
    digits = size_text is not None and size_text.isascii() and size_text.isdigit()
    size = int(size_text) if digits and size_text and len(size_text) < 20 else None
    sha256 = None
    # XEP-0300 hashes; slixmpp's XEP-0234 `hash` interface looks for them in the file's own
    # namespace, where they never are.
    for digest in file.iterfind(_HASH):
        if digest.get("algo") == "sha-256" and digest.text:
            sha256 = _b64_to_hex(digest.text)
            if sha256:
                break
    return (
        _capped(file.findtext(f"{{{namespace}}}media-type") or None),
        _capped(file.findtext(f"{{{namespace}}}name") or None),
        size,
        sha256,
    )


def _b64_to_hex(text: str) -> str | None:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == hashlib.sha256().digest_size else None


def _upload_urls(body: str, upload_hosts: frozenset[str]) -> Iterator[str]:
    for count, match in enumerate(_URL.finditer(body)):
        if count >= _MAX_ATTACHMENTS:
            return
        url = match.group(0)
        try:
            parts = urlsplit(url)
            host, netloc = (parts.hostname or "").lower(), parts.netloc.lower()
        except ValueError:
            continue
        if host in upload_hosts or netloc in upload_hosts:
            yield url


def _content_digest(*parts: str | None) -> str:
    # Over what every copy of a message carries unchanged (servers add stanza-ids and delays
    # and rewrite from/to, but never touch these), so all copies agree.
    digest = hashlib.sha256()
    for part in parts:
        if part is not None:
            digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x1f")
    return digest.hexdigest()[:32]


def _unreadable_message(element: ET.Element, raw: bytes, ctx: _Context) -> MessageEvent:
    stated_from, to = _jid(element.get("from")), _jid(element.get("to"))
    sender = ctx.session if ctx.leg == Direction.FROM_CLIENT and ctx.session.full else stated_from
    recipient = to if to.full or ctx.leg != Direction.TO_CLIENT else ctx.session
    stanza_type = element.get("type") or "normal"
    return MessageEvent(
        leg=ctx.leg,
        direction=ctx.leg,
        stanza_type=stanza_type if stanza_type in MESSAGE_TYPES else "normal",
        sender=sender.bare,
        sender_full=sender.full,
        recipient=recipient.bare,
        recipient_full=recipient.full,
        received_at=ctx.now,
        raw=raw,
        message_id=element.get("id") or None,
        anomalies=frozenset({Anomaly.UNREADABLE}),
        client_address=ctx.client_address,
        content_digest=hashlib.sha256(raw).hexdigest()[:32],
    )


# --- presence -----------------------------------------------------------------------------------


def _presence(element: ET.Element, raw: bytes, ctx: _Context) -> Event:
    ptype = element.get("type", "")
    if ptype in SUBSCRIPTION_TYPES:
        return _subscription(element, raw, ctx, ptype)
    if ptype:
        return Ignored(f"presence {ptype[:40]}")
    presence = PresenceStanza(xml=element, recv=True)
    to = _jid(element.get("to"))
    if ctx.leg == Direction.FROM_CLIENT and _plugin(presence, "muc_join") is not None:
        if not to.resource or not to.valid:
            return Ignored("MUC join without a valid occupant JID")
        return MucJoinEvent(
            leg=ctx.leg,
            room=to.bare,
            nick=to.resource,
            user_jid=ctx.session.full or None,
        )
    muc_user = _plugin(presence, "muc")
    if ctx.leg == Direction.TO_CLIENT and muc_user is not None:
        stated_from = _jid(element.get("from"))
        # Status 110 marks the room's presence about the user itself: it confirms the join
        # and carries the nick the room actually assigned.
        own = any(s.get("code") == "110" for s in muc_user.xml.iterfind(_MUC_USER_STATUS))
        if own and stated_from.resource and stated_from.valid:
            return MucJoinEvent(
                leg=ctx.leg,
                room=stated_from.bare,
                nick=stated_from.resource,
                user_jid=to.full or ctx.session.full or None,
                confirmed=True,
            )
    return Ignored("presence")


def _subscription(element: ET.Element, raw: bytes, ctx: _Context, ptype: str) -> SubscriptionEvent:
    presence = PresenceStanza(xml=element, recv=True)
    stated_from, to = _jid(element.get("from")), _jid(element.get("to"))
    anomalies: set[Anomaly] = set()
    if not (stated_from.valid and to.valid):
        anomalies.add(Anomaly.INVALID_JID)
    own = ctx.session
    if ctx.leg == Direction.FROM_CLIENT:
        if stated_from.full and own.bare and stated_from.bare != own.bare:
            anomalies.add(Anomaly.SPOOFED_FROM)
        sender = own if own.full else stated_from
        recipient = to
    else:
        sender = stated_from
        recipient = to if to.full else own
    # Every plugin is read before the last use of `presence` (see _report).
    nick = _plugin(presence, "nick")
    nick_text = _str(nick["nick"]) if nick is not None else None
    status = presence["status"]
    return SubscriptionEvent(
        leg=ctx.leg,
        stanza_type=ptype,
        sender=sender.bare,
        sender_full=sender.full,
        recipient=recipient.bare,
        recipient_full=recipient.full,
        received_at=ctx.now,
        raw=raw,
        stanza_id=element.get("id") or None,
        nick=nick_text,
        status=_str(status),
        preauth=element.find(_PREAUTH) is not None,
        anomalies=frozenset(anomalies),
        client_address=ctx.client_address,
    )


# --- iq -----------------------------------------------------------------------------------------


def _iq(element: ET.Element, raw: bytes, ctx: _Context) -> Event:
    itype = element.get("type", "")
    # recv=True: otherwise slixmpp writes id='0' into an iq that has no id.
    iq = IqStanza(xml=element, recv=True)  # type: ignore[no-untyped-call]
    if ctx.leg == Direction.TO_CLIENT and itype in ("result", "set"):
        roster = _plugin(iq, "roster")
        if roster is not None:
            return _roster(element, iq, roster, ctx, is_push=itype == "set")
        bind = _plugin(iq, "bind")
        if bind is not None and itype == "result":
            bound = _jid(_str(bind["jid"]))
            if not bound.valid or not bound.resource:
                return Ignored("bind result without a valid full JID")
            return BindEvent(jid=bound.full, bare=bound.bare)
    if ctx.leg == Direction.FROM_CLIENT and itype == "set":
        block = _plugin(iq, "block")
        if block is not None:
            return _report(element, raw, iq, block, ctx)
    if itype == "set":
        exchange = read_exchange(element)
        if exchange is not None:
            return _exchange(element, raw, ctx, exchange)
    return Ignored(f"iq {itype[:20]}")


def _exchange(element: ET.Element, raw: bytes, ctx: _Context, exchange: Exchange) -> Event:
    """A Jingle, SI or IBB step (`proxy.jingle`), with its parties resolved like a message's."""
    own = ctx.session
    stated_from, to = _jid(element.get("from")), _jid(element.get("to"))
    if ctx.leg == Direction.FROM_CLIENT:
        sender = own if own.full else stated_from
        recipient = to if to.full else own.as_bare()
    elif ctx.leg == Direction.TO_CLIENT:
        sender = stated_from if stated_from.full else own.as_bare()
        recipient = to if to.full else own
    else:
        sender, recipient = stated_from, to
    return ExchangeEvent(
        leg=ctx.leg,
        sender=sender.bare,
        sender_full=sender.full,
        recipient=recipient.bare,
        recipient_full=recipient.full,
        received_at=ctx.now,
        raw=raw,
        exchange=exchange,
        iq_id=_capped(element.get("id") or None),
        seen_by=_seen_by(element, ctx),
        client_address=ctx.client_address,
    )


_ROSTER_ITEM: Final = _tag(RosterItem)
_SUBSCRIPTIONS: Final = frozenset({"none", "to", "from", "both", "remove"})


def _roster(
    element: ET.Element, iq: ElementBase, roster: ElementBase, ctx: _Context, *, is_push: bool
) -> Event:
    # `iq` is passed only to stay referenced while `roster` is read (see _report).
    stated_from = _jid(element.get("from"))
    own = ctx.session
    # RFC 6121 §2.1.6: a roster push (or result) from anyone but the account itself is an
    # attack on the client's view of whom it trusts.
    if stated_from.full and not (own.bare and stated_from.full == own.bare):
        return Ignored("roster stanza not from the user's own account")
    owner = own.bare or _jid(element.get("to")).bare
    if not owner:
        return Ignored("roster stanza for an unknown account")
    # Items are read from the tree: wrapping each one as a slixmpp RosterItem measured ~13 µs
    # an item, tens of milliseconds of a blocked event loop for a large shared roster.
    items = []
    for item in roster.xml.iterfind(_ROSTER_ITEM):
        jid = _jid(item.get("jid"))
        if not jid.bare:
            continue
        subscription = item.get("subscription") or "none"
        items.append(
            RosterEntry(
                jid=jid.bare,
                subscription=subscription if subscription in _SUBSCRIPTIONS else "none",
                ask=item.get("ask") == "subscribe",
                name=_capped(item.get("name") or None),
            )
        )
    return RosterEvent(owner=owner, items=tuple(items), is_push=is_push, version=roster["ver"])


def _report(
    element: ET.Element, raw: bytes, iq: ElementBase, block: ElementBase, ctx: _Context
) -> Event:
    # `iq` is passed only to stay referenced while `block` is read: slixmpp finds a plugin's
    # language (and with it the plugin) through a weak reference to the parent stanza, and
    # compiled code (docs/native.md) drops a local after its last use, not at the return.
    items = []
    for item in _each(block, BlockItemPayload):
        jid = _jid(item.xml.get("jid"))
        if not jid.full:
            continue
        read = _report_of(item)
        if read is None:
            continue
        reason, text, stanza_ids = read
        items.append(ReportItem(jid=jid.full, reason=reason, text=text, stanza_ids=stanza_ids))
    if not items:
        return Ignored("block without a report")
    own = ctx.session
    reporter = own if own.full else _jid(element.get("from"))
    return ReportEvent(
        reporter=reporter.bare,
        reporter_full=reporter.full,
        iq_id=element.get("id") or None,
        items=tuple(items),
        received_at=ctx.now,
        raw=raw,
        client_address=ctx.client_address,
    )


def _report_of(item: ElementBase) -> tuple[str | None, str | None, tuple[StanzaIdRef, ...]] | None:
    report = _plugin(item, "report")
    if report is not None:
        ids = tuple(
            StanzaIdRef(ident, by)
            for sid in _each(report, StanzaID)
            if (ident := _str(sid["id"])) and (by := _str(sid["by"]))
        )
        return _reason(_str(report["reason"])), _str(report["text"]), ids
    # reporting:0 marks the reason with an empty <spam/> or <abuse/> child; slixmpp only
    # knows reporting:1.
    old = item.xml.find(f"{{{_REPORTING_0}}}report")
    if old is None:
        return None
    reason = _reason(old.get("reason"))
    for kind in ("spam", "abuse"):
        if reason is None and old.find(f"{{{_REPORTING_0}}}{kind}") is not None:
            reason = kind
    ids = tuple(
        StanzaIdRef(ident, by)
        for sid in old.iterfind(_STANZA_ID)
        if (ident := sid.get("id")) and (by := sid.get("by"))
    )
    return reason, old.findtext(f"{{{_REPORTING_0}}}text") or None, ids


def _reason(value: str | None) -> str | None:
    if not value:
        return None
    for kind in ("spam", "abuse"):
        if value in (f"urn:xmpp:reporting:{kind}", kind):
            return kind
    return value[:200]


# --- record ids, records, observations -------------------------------------------------------


def dedupe_key(event: ArchivableEvent) -> str:
    """The deterministic record id every copy of the same stanza shares.

    Messages: `direct | sender bare | recipient bare` or `groupchat | room bare`, then the
    origin-id (XEP-0359), else the message id, else a one-minute time bucket, and last the
    content digest. Why each part:
    - groupchat keys name the room, not the sender: the sender's own copy comes from their
      account (`alice@corp/phone` → `room@service`), reflections from `room@service/nick`,
      and nothing in a reflection maps the nick back to the account. Prosody 0.12 keeps the
      sender's id when it reflects (and makes one up only when there is none);
    - origin-id before id: clients that set one keep it through every copy, and a room adds
      an id to a stanza that had none, which would split the sender's copy from reflections;
    - the content digest makes a reused id (a client bug, or a sender trying to hide a second
      message behind the id of an innocent first one, or another occupant copying an id) a
      new record, not an observation of the old one. It covers only what no server rewrites;
    - with no id at all, copies agree only when they fall into the same minute (history copies
      use the server's delay stamp). Near a minute boundary that yields two records: a
      duplicate, never a loss. Two identical id-less messages within one minute collapse into
      one record, with one observation per copy seen.
    Known splits (duplicates, not losses): MUC private messages (one record per leg: the
    sender writes to `room/nick`, the recipient gets it from `room/their-nick`); a server
    that rewrites a body; a groupchat message with neither id nor origin-id (the room makes
    up an id for the reflections). The one collapse of distinct messages: another occupant
    repeating both the id and the exact content, which then shows only as more observations.

    Subscriptions: type, both bare JIDs, nick and status, and the UTC day, so a server
    re-sending a pending request at each login adds observations, not records.
    Reports: reporter, iq id (or minute bucket); `to_records` adds the reported JID per item.
    """
    parts = _key_parts(event)
    # Almost every key is ASCII (JIDs, ids, hex digests): one check of the joined parts
    # saves cleaning them one by one.
    if not "".join(parts).isascii():
        parts = tuple(map(_clean, parts))
    return deterministic_record_id(*parts)


# --- copies of plain messages: the record id without a second normalisation --------------

PlainKey: TypeAlias = tuple[str, str, str, str]
"""(sender bare, recipient bare, origin-id or id, body) of a plain one-to-one message."""

_PLAIN_TYPES: Final = frozenset({"chat", "normal"})
_PLAIN_BODY_MAX: Final = 4096  # longer bodies are not remembered: the memory is bounded


@dataclass(frozen=True, slots=True)
class PlainCopy:
    """What the pipeline needs of a server's delivery of a plain message to a local client."""

    key: PlainKey
    stanza_ids: tuple[StanzaIdRef, ...]

    def __init__(
        self,
        key: PlainKey,
        stanza_ids: tuple[StanzaIdRef, ...],
    ) -> None:
        # Spelled out, not generated: compiled, this stores the fields directly (docs/native.md).
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "stanza_ids", stanza_ids)


def plain_key(event: MessageEvent) -> PlainKey | None:
    """The key of a plain message a local client sent, or None when it is not plain.

    Plain: one-to-one, live, one body and nothing else that `_content_digest` covers (no
    other-language body, subject, encrypted payload, correction, retraction, invitation or
    attachment of its own), and an id. For two plain messages, equal keys mean equal
    `dedupe_key`s: the digest then covers the body alone, and the other parts of the key are
    in the tuple. That is why a delivered copy with the same key (`plain_copy`) may take the
    sender's record id without being normalised again.
    """
    if (
        event.leg != Direction.FROM_CLIENT
        or event.history is not None
        or event.stanza_type not in _PLAIN_TYPES
        or not event.body
        or len(event.body) > _PLAIN_BODY_MAX
        or event.other_bodies
        or event.subject is not None
        or event.replaces_id is not None
        or event.retracts_id is not None
        or event.invitation is not None
        or event.anomalies
        or any(attachment.source != "upload" for attachment in event.attachments)
    ):
        return None
    if event.encryption is not None and event.encryption != "otr":
        return None
    ident = event.origin_id or event.message_id
    if not ident:
        return None
    return (event.sender, event.recipient, ident, event.body)


def plain_copy(element: ET.Element, session_jid: str | None, now: datetime) -> PlainCopy | None:
    """A server's delivery of a plain message to the local client of `session_jid`, or None.

    Reads only what `plain_key` compares, with the same readers `normalise` uses, and says
    None for anything it would have to think about: history (a delay or a forwarding
    wrapper), groupchat, an invalid address, or any child the content digest covers.
    """
    if element.tag != _MESSAGE or not session_jid:
        return None
    stanza_type = element.get("type") or "normal"
    if stanza_type not in _PLAIN_TYPES:
        return None
    sender, to = _jid(element.get("from")), _jid(element.get("to"))
    if not (sender.full and sender.valid and to.valid):
        return None
    scan = _scan(element, inner=False)
    if (
        len(scan.bodies) != 1
        or scan.delays
        or scan.wrapper is not None
        or scan.nested
        or scan.subject is not None
        or scan.references
        or scan.sfs
        or scan.oobs
        or scan.replaces_id is not None
        or scan.retracts_id is not None
        or scan.muc_user is not None
        or scan.direct_invite is not None
        or scan.encryption is not None
        or scan.payload is not None
    ):
        return None
    body = scan.bodies[0].text
    ident = scan.origin_id or element.get("id")
    if not body or not ident:
        return None
    own = _jid(session_jid)
    recipient = to if to.full else own
    ctx = _Context(Direction.TO_CLIENT, own, None, now, frozenset())
    return PlainCopy(
        key=(sender.bare, recipient.bare, ident, body),
        stanza_ids=_stanza_ids(scan, ctx, None, ()),
    )


def _key_parts(event: ArchivableEvent) -> tuple[str, ...]:
    if isinstance(event, MessageEvent):
        if event.stanza_type == "groupchat":
            head: tuple[str, ...] = ("groupchat", event.room or event.recipient)
        else:
            head = ("direct", event.sender, event.recipient)
        ident = event.origin_id or event.message_id
        tail = ("id", ident) if ident else ("at", _bucket(event.occurred_at))
        return (*head, *tail, event.content_digest)
    if isinstance(event, SubscriptionEvent):
        day = event.received_at.astimezone(UTC).date().isoformat()
        digest = _content_digest(event.nick, event.status)
        return ("subscription", event.stanza_type, event.sender, event.recipient, digest, day)
    when = ("id", event.iq_id) if event.iq_id else ("at", _bucket(event.received_at))
    return ("report", event.reporter, *when)


def _bucket(moment: datetime) -> str:
    return str(int(moment.timestamp()) // _NO_ID_BUCKET_SECONDS)


def _clean(part: str) -> str:
    # Parsed XML cannot hold lone surrogates, but elements built in code can; the record id
    # must not be where that fails.
    if part.isascii():
        return part
    return part.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def observation_of(event: ArchivableEvent, session_jid: str | None, now: datetime) -> Observation:
    """Where and how this copy was seen: by which full JID, on which leg, through what."""
    if isinstance(event, ReportEvent):
        return Observation(
            at=now,
            jid=session_jid or event.reporter_full,
            via=ObservationVia.LIVE,
            direction=Direction.FROM_CLIENT,
        )
    if isinstance(event, SubscriptionEvent):
        local = event.sender_full if event.leg == Direction.FROM_CLIENT else event.recipient_full
        via = ObservationVia.COMPONENT if event.leg == Direction.COPY else ObservationVia.LIVE
        return Observation(at=now, jid=session_jid or local, via=via, direction=event.leg)
    return Observation(
        at=now, jid=session_jid or event.seen_by, via=_via(event), direction=event.leg
    )


def _via(event: MessageEvent) -> ObservationVia:
    if event.leg == Direction.COPY:
        return ObservationVia.COMPONENT
    if event.history is not None:
        return _VIA_OF_HISTORY[event.history]
    if event.stanza_type == "groupchat" and event.leg == Direction.TO_CLIENT:
        return ObservationVia.MUC_REFLECTION
    return ObservationVia.LIVE


# ObservationVia has no value of its own for a room's join-time history; it is the room
# delivering its copy, like a reflection.
_VIA_OF_HISTORY: Final = {
    HistoryKind.CARBON_SENT: ObservationVia.CARBON_SENT,
    HistoryKind.CARBON_RECEIVED: ObservationVia.CARBON_RECEIVED,
    HistoryKind.MAM: ObservationVia.MAM,
    HistoryKind.OFFLINE: ObservationVia.OFFLINE,
    HistoryKind.MUC_HISTORY: ObservationVia.MUC_REFLECTION,
}


def to_records(
    event: ArchivableEvent,
    verdict: Verdict,
    status: RecordStatus,
    observation: Observation,
    *,
    record_id: str | None = None,
) -> tuple[ArchiveRecord, ...]:
    """The archive records for an event: one, except one per reported JID for a report.

    `record_id`, for a message, is its `dedupe_key` when the caller already has it (the
    pipeline computes it first to tell a copy from a first sighting); it is not checked.
    """
    if isinstance(event, MessageEvent):
        return (_message_record(event, verdict, status, observation, record_id),)
    if isinstance(event, SubscriptionEvent):
        return (_subscription_record(event, verdict, status, observation),)
    if isinstance(event, ReportEvent):
        base = dedupe_key(event)
        return tuple(
            _report_record(event, item, base, verdict, status, observation) for item in event.items
        )
    raise StanzaError(f"{type(event).__name__} is not archived")


def to_record(
    event: ArchivableEvent, verdict: Verdict, status: RecordStatus, observation: Observation
) -> ArchiveRecord:
    """The single archive record of an event; a report naming several JIDs needs `to_records`."""
    records = to_records(event, verdict, status, observation)
    if len(records) != 1:
        raise StanzaError(f"event makes {len(records)} records; use to_records")
    return records[0]


def _message_record(
    event: MessageEvent,
    verdict: Verdict,
    status: RecordStatus,
    observation: Observation,
    record_id: str | None = None,
) -> ArchiveRecord:
    body = event.body
    if event.other_bodies:
        # The record has one body field; other languages are searchable text too.
        extra = "\n\n".join(f"[xml:lang={lang}] {text}" for lang, text in event.other_bodies)
        body = f"{body}\n\n{extra}" if body else extra
    invitation = event.invitation
    return ArchiveRecord(
        record_id=record_id if record_id is not None else dedupe_key(event),
        kind=RecordKind.MESSAGE,
        occurred_at=event.occurred_at,
        direction=event.direction,
        sender=event.sender,
        sender_full=event.sender_full,
        recipient=event.recipient,
        recipient_full=event.recipient_full,
        stanza_type=event.stanza_type,
        room=event.room or (invitation.room if invitation else None),
        body=body,
        subject=event.subject,
        thread=event.thread,
        message_id=event.message_id,
        origin_id=event.origin_id,
        stanza_ids=event.stanza_ids,
        attachments=event.attachments,
        encryption=event.encryption,
        replaces_id=event.replaces_id,
        retracts_id=event.retracts_id,
        delay_stamp=event.delay_stamp,
        client_address=event.client_address,
        verdict=verdict,
        status=status,
        raw=event.raw,
        observations=(observation,),
    )


def _subscription_record(
    event: SubscriptionEvent, verdict: Verdict, status: RecordStatus, observation: Observation
) -> ArchiveRecord:
    # The request's free text is where subscription spam lives: status as the body, the
    # XEP-0172 nick as the subject.
    return ArchiveRecord(
        record_id=dedupe_key(event),
        kind=RecordKind.SUBSCRIPTION,
        occurred_at=event.received_at,
        direction=event.leg,
        sender=event.sender,
        sender_full=event.sender_full,
        recipient=event.recipient,
        recipient_full=event.recipient_full,
        stanza_type=event.stanza_type,
        body=event.status,
        subject=event.nick,
        message_id=event.stanza_id,
        client_address=event.client_address,
        verdict=verdict,
        status=status,
        raw=event.raw,
        observations=(observation,),
    )


def _report_record(
    event: ReportEvent,
    item: ReportItem,
    base: str,
    verdict: Verdict,
    status: RecordStatus,
    observation: Observation,
) -> ArchiveRecord:
    reported = _jid(item.jid)
    return ArchiveRecord(
        record_id=deterministic_record_id(base, _clean(item.jid)),
        kind=RecordKind.REPORT,
        occurred_at=event.received_at,
        direction=Direction.FROM_CLIENT,
        sender=event.reporter,
        sender_full=event.reporter_full,
        recipient=reported.bare,
        recipient_full=reported.full,
        stanza_type="report",
        message_id=event.iq_id,
        stanza_ids=item.stanza_ids,  # the reported messages, to link to their records
        client_address=event.client_address,
        reported_jid=item.jid,
        report_reason=item.reason,
        report_text=item.text,
        verdict=verdict,
        status=status,
        raw=event.raw,
        observations=(observation,),
    )
