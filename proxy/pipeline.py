"""The per-stanza pipeline: normalise, decide, spool durably, then let the transport forward.

It is the proxy's `StanzaHook`. For each batch of stanzas that arrived together on one leg:
1. stanzas nobody archives (presence updates, pings, most iqs) pass untouched, unparsed;
2. the rest are normalised into events (`proxy.stanza`);
3. live messages, subscription requests and MUC joins are decided by the classifier; history
   (carbons, MAM pages, offline redelivery, MUC history) and second sightings of a message
   already decided (the recipient's leg of a local conversation, MUC reflections) are never
   re-decided and never blocked: they only add an observation;
4. every record and observation of the batch is appended to the spool in one group commit;
5. only then the decisions are returned: nothing is forwarded before it is durable. If the
   spool cannot be written the batch fails closed (the sender gets `<wait/>`
   `resource-constraint`), unless fail-open is configured.

Calls, whiteboards and file transfers (Jingle, SI and IBB iq-sets, `proxy.jingle`) are decided
once per session as CALLs; a refused step is answered with an iq error (an iq is never left
unanswered), and each archived step is a record of its own (docs/calls-and-files.md).

What the pipeline learns on the way (for the classifier and the review tools):
- roster results and pushes go to the `RosterObserver` (`proxy.trust` feeds a `TrustStore`);
- with a `TrustStore`, every incoming stanza's context says whether the recipient knows the
  sender, and every message a local user sends makes the recipient their correspondent;
- a spam report (XEP-0377), once durable, goes to the `ReportObserver` with the archived
  records it reports, found by the XEP-0359 stanza-ids it names or, failing that, as the
  newest message from the reported JID to the reporter that crossed this proxy.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Final, Protocol
from xml.sax.saxutils import escape, quoteattr

from archive_api.store.records import (
    ArchiveRecord,
    Attachment,
    Direction,
    EntryOp,
    Observation,
    ObservationVia,
    RecordKind,
    RecordStatus,
    SpoolEntry,
    StanzaIdRef,
    deterministic_record_id,
)
from classifier.clock import Clock
from classifier.context import DecisionContext, StanzaKind
from classifier.context import Direction as DecisionDirection
from classifier.trust import TrustStore
from classifier.verdict import Action, Reason, Verdict
from proxy.errors import SpoolUnavailable
from proxy.hook import PASS, Decision, DecisionKind, SessionInfo
from proxy.jingle import MARKERS as EXCHANGE_MARKERS
from proxy.jingle import (
    ExchangeEvent,
    ExchangeSessions,
    advance_session,
    exchange_record,
    exchange_record_id,
    observation_of_exchange,
)
from proxy.stanza import (
    Event,
    MessageEvent,
    MucJoinEvent,
    PlainKey,
    ReportEvent,
    RosterEvent,
    SubscriptionEvent,
    dedupe_key,
    normalise,
    observation_of,
    plain_copy,
    plain_key,
    to_records,
)
from proxy.stream import Element

log = logging.getLogger(__name__)

STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
_URL = re.compile(r"(?:https?|aesgcm)://[^\s<>\"']+", re.IGNORECASE)
_SUBSCRIPTION_TYPES = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})
_STATUS_OF_ACTION = {
    Action.ALLOW: RecordStatus.DELIVERED,
    Action.FLAG: RecordStatus.DELIVERED,
    Action.QUARANTINE: RecordStatus.HELD,
    Action.REJECT: RecordStatus.REJECTED,
    Action.DROP: RecordStatus.DROPPED,
}
# Enum members read in the per-stanza path: a module constant is one dict lookup, the class
# attribute an enum-metaclass lookup.
_TO_CLIENT: Final = Direction.TO_CLIENT
_FROM_CLIENT: Final = Direction.FROM_CLIENT
_RECORD: Final = EntryOp.RECORD
_OBSERVE: Final = EntryOp.OBSERVE
HISTORY_VERDICT = Verdict(
    Action.ALLOW, 0.0, (Reason("history", "a copy of an earlier message: never re-decided"),)
)


class Decider(Protocol):
    def evaluate(self, ctx: DecisionContext) -> Verdict: ...


class SpoolWriter(Protocol):
    async def append(self, payloads: Sequence[bytes]) -> object: ...

    def append_behind(self, payloads: Sequence[bytes]) -> None:
        """Queue entries to be made durable soon, without waiting (observations)."""
        ...


class RosterObserver(Protocol):
    def roster_seen(self, owner: str, event: RosterEvent) -> None: ...


@dataclass(frozen=True, slots=True)
class ReportNotice:
    """One reported JID of a spam report that is now durably archived.

    Attributes:
        report_record_id: The REPORT record.
        reporter: Bare JID of the local user who reported.
        reported: Bare JID of the reported sender.
        reason: "spam", "abuse", or the reason as sent (None if none).
        text: The reporter's own words, if any.
        at: When the proxy saw the report.
        record_ids: Archived messages the report is about (may be empty).
    """

    report_record_id: str
    reporter: str
    reported: str
    reason: str | None
    text: str | None
    at: datetime
    record_ids: tuple[str, ...] = ()


class ReportObserver(Protocol):
    def reports_seen(self, notices: Sequence[ReportNotice]) -> None:
        """Called after the reports are in the spool; must not wait (queue any I/O)."""
        ...


class AttachmentSink(Protocol):
    """Takes attachments of newly archived records for fetching (`proxy.attachments`)."""

    def submit(self, record_id: str, attachment: Attachment) -> bool:
        """Must never wait: queue or skip."""
        ...


#: Record ids a proxy remembers to tell a first sighting from a copy.
RECENT_IDS: Final = 500_000


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    local_domains: frozenset[str]
    upload_hosts: frozenset[str] = frozenset()
    fail_open: bool = False
    recent_ids: int = RECENT_IDS  # record ids remembered to tell a first sighting from a copy
    report_links: int = 100_000  # delivered messages remembered to link spam reports to
    # In-band bytestream (XEP-0047) bytes archived per session; later blocks keep only their
    # size and SHA-256 (docs/calls-and-files.md).
    ibb_archive_max_bytes: int = 10 * 1024 * 1024
    exchange_sessions: int = 50_000  # call / transfer sessions remembered (verdict, times)
    # Plain messages sent by local clients whose local deliveries skip a second normalisation;
    # a delivery comes milliseconds after the message, so a few thousand cover any burst.
    sent_plain_messages: int = 4096


@dataclass(slots=True)
class _Planned:
    index: int
    entries: list[SpoolEntry] = field(default_factory=list)
    decision: Decision = PASS
    # What to do instead when the spool is down; built only then (a bounce costs ~15 µs).
    fail_closed: Callable[[], Decision] | None = None
    reports: list[ReportNotice] = field(default_factory=list)
    # Only observations of records already durable: forwarding need not wait for them.
    behind: bool = False


class SeenIds(Protocol):
    """Record ids already spooled: by this process (`RecentIds`), or by any proxy
    (`proxy.redis_state.SharedRecentIds`)."""

    def __contains__(self, record_id: object) -> bool: ...

    def add(self, record_id: str) -> None: ...


class RecentIds:
    """A bounded memory of record ids already spooled by this process."""

    def __init__(self, capacity: int) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._ids

    def add(self, record_id: str) -> None:
        self._ids[record_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)


class RecentMessages:
    """A bounded memory of which record a message delivered to a local user became.

    Keys: ``("sid", archive JID, stanza-id)`` for each XEP-0359 stanza-id the message
    carried, and ``("last", recipient, sender)`` for the newest message between the two.
    Spam reports name what they report this way.
    """

    def __init__(self, capacity: int) -> None:
        self._keys: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._capacity = capacity

    def note(self, event: MessageEvent, record_id: str) -> None:
        self.note_parts(event.stanza_ids, event.recipient, event.sender, record_id)

    def note_parts(
        self, stanza_ids: Sequence[StanzaIdRef], recipient: str, sender: str, record_id: str
    ) -> None:
        for ref in stanza_ids:
            self._put(("sid", ref.by.lower(), ref.id), record_id)
        self._put(("last", recipient.lower(), sender.lower()), record_id)

    def _put(self, key: tuple[str, str, str], record_id: str) -> None:
        self._keys[key] = record_id
        self._keys.move_to_end(key)
        if len(self._keys) > self._capacity:
            self._keys.popitem(last=False)

    def find(self, owner: str, sender: str, stanza_ids: Sequence[tuple[str, str]]) -> list[str]:
        """Records for ``(stanza id, by)`` pairs; else the newest from sender to owner."""
        found: list[str] = []
        for ident, by in stanza_ids:
            record_id = self._keys.get(("sid", by.lower(), ident))
            if record_id is not None and record_id not in found:
                found.append(record_id)
        if not found:
            last = self._keys.get(("last", owner.lower(), sender.lower()))
            if last is not None:
                found.append(last)
        return found


class SentPlainMessages:
    """Record ids of plain messages local clients sent lately (`proxy.stanza.plain_key`).

    The server's delivery of such a message to a local recipient is then an observation of a
    known record found by a dictionary look-up, not by a second normalisation: about half
    the cost of the recipient's leg of a local conversation. Bounded; a miss only means the
    copy takes the ordinary path.
    """

    def __init__(self, capacity: int) -> None:
        self._ids: OrderedDict[PlainKey, str] = OrderedDict()
        self._capacity = capacity

    def note(self, key: PlainKey, record_id: str) -> None:
        self._ids[key] = record_id
        self._ids.move_to_end(key)
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def find(self, key: PlainKey) -> str | None:
        return self._ids.get(key)


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        *,
        decider: Decider,
        spool: SpoolWriter,
        clock: Clock,
        on_spooled: Callable[[], None] | None = None,
        roster_observer: RosterObserver | None = None,
        local_domains: Callable[[], frozenset[str]] | None = None,
        attachments: AttachmentSink | None = None,
        trust: TrustStore | None = None,
        report_observer: ReportObserver | None = None,
        recent: SeenIds | None = None,
    ) -> None:
        self.config = config
        self.attachments = attachments  # fetches upload-service files of new records
        # Which domains are local is the policy's to say (its `local_domains`, e.g. the MUC
        # service, default: the served domains) and changes when the policy is reloaded;
        # `config.local_domains` (the served domains) is only the fallback.
        self._local_domains = local_domains
        self.decider = decider
        self.spool = spool
        self.clock = clock
        self.on_spooled = on_spooled
        self.roster_observer = roster_observer
        self.recent: SeenIds = recent if recent is not None else RecentIds(config.recent_ids)
        # Who knows whom (rosters, correspondents): asked for every incoming stanza's
        # context, told about every message a local user sends.
        self.trust = trust
        self.report_observer = report_observer
        self.delivered = RecentMessages(config.report_links)
        self.sent_plain = SentPlainMessages(config.sent_plain_messages)
        self.plain_copies_observed = 0  # deliveries taken as observations by look-up
        self.exchanges = ExchangeSessions(config.exchange_sessions)

    # -- StanzaHook ---------------------------------------------------------------------

    async def process(
        self, session: SessionInfo, direction: Direction, stanzas: Sequence[Element]
    ) -> Sequence[Decision]:
        now = self.clock.now()
        decisions: list[Decision] = [PASS] * len(stanzas)
        plans: list[_Planned] = []
        for index, element in enumerate(stanzas):
            if not _worth_reading(element, direction):
                continue
            if direction is _TO_CLIENT and element.name == "message":
                known = self._known_copy(index, element, session, now)
                if known is not None:
                    plans.append(known)
                    continue
            event = normalise(
                element.tree(),
                element.data,
                direction=direction,
                session_jid=session.bound_jid,
                client_address=session.client_address,
                now=now,
                upload_hosts=self.config.upload_hosts,
            )
            plan = self._plan(index, event, element, session, now)
            if plan is not None:
                plans.append(plan)
        behind = [entry for plan in plans if plan.behind for entry in plan.entries]
        if behind:
            self._spool_behind(behind)
            plans = [plan for plan in plans if not plan.behind]
        entries = [entry for plan in plans for entry in plan.entries]
        if entries:
            await self._spool(entries, plans)
            for plan in plans:
                for entry in plan.entries:
                    self.recent.add(entry.record_id)
            # -- attachments: hand the files of newly spooled records to the fetcher --
            if self.attachments is not None:
                for plan in plans:
                    for entry in plan.entries:
                        if entry.record is not None:
                            for attachment in entry.record.attachments:
                                self.attachments.submit(entry.record_id, attachment)
            # -- end attachments --
            if self.on_spooled is not None:
                self.on_spooled()
            # -- reports: durable now, so the learning side may count them --
            notices = [n for plan in plans if plan.entries for n in plan.reports]
            if notices and self.report_observer is not None:
                try:
                    self.report_observer.reports_seen(notices)
                except Exception:
                    log.exception("report observer failed")
        for plan in plans:
            decisions[plan.index] = plan.decision
        return decisions

    def _known_copy(
        self, index: int, element: Element, session: SessionInfo, now: datetime
    ) -> _Planned | None:
        """The delivery of a plain message a local client sent, as an observation of its
        record; None sends the stanza down the ordinary path (normalise, then plan)."""
        if not self._is_local(element.attrs.get("from", "")):
            return None  # only local clients' messages are remembered: no reading twice
        copy = plain_copy(element.tree(), session.bound_jid, now)
        if copy is None:
            return None
        record_id = self.sent_plain.find(copy.key)
        if record_id is None or record_id not in self.recent:
            return None
        self.delivered.note_parts(copy.stanza_ids, copy.key[1], copy.key[0], record_id)
        assert session.bound_jid is not None  # plain_copy says None without one
        observation = Observation(
            at=now, jid=session.bound_jid, via=ObservationVia.LIVE, direction=_TO_CLIENT
        )
        entry = SpoolEntry(_OBSERVE, record_id, observation=observation)
        self.plain_copies_observed += 1
        return _Planned(index, [entry], PASS, behind=True)

    def local_domains(self) -> frozenset[str]:
        if self._local_domains is not None:
            return self._local_domains()
        return self.config.local_domains

    def _spool_behind(self, entries: list[SpoolEntry]) -> None:
        try:
            self.spool.append_behind([entry.payload() for entry in entries])
        except SpoolUnavailable as exc:
            # The records these observe are archived; only the sighting is lost.
            log.error(
                "spool unavailable: %d observations not archived",
                len(entries),
                extra={"error": str(exc)},
            )

    async def _spool(self, entries: list[SpoolEntry], plans: list[_Planned]) -> None:
        try:
            await self.spool.append([entry.payload() for entry in entries])
        except SpoolUnavailable as exc:
            if self.config.fail_open:
                log.error(
                    "spool unavailable: FAIL-OPEN delivers %d stanzas unarchived",
                    len(plans),
                    extra={"error": str(exc)},
                )
                for plan in plans:
                    plan.entries = []
                return
            log.error("spool unavailable: failing closed", extra={"error": str(exc)})
            for plan in plans:
                plan.entries = []
                plan.decision = plan.fail_closed() if plan.fail_closed else Decision.drop()

    async def session_bound(self, session: SessionInfo) -> None:
        await self._session_event(session, "start")

    async def session_ended(self, session: SessionInfo) -> None:
        if session.bound_jid is not None:
            await self._session_event(session, "end")

    async def _session_event(self, session: SessionInfo, kind: str) -> None:
        jid = session.bound_jid or ""
        now = self.clock.now()
        record = ArchiveRecord(
            record_id=deterministic_record_id("session", session.session_id, kind),
            kind=RecordKind.SESSION,
            occurred_at=now,
            direction=Direction.FROM_CLIENT,
            sender=jid.split("/", 1)[0],
            sender_full=jid,
            stanza_type=kind,
            client_address=session.client_address,
        )
        try:
            await self.spool.append(
                [SpoolEntry(EntryOp.RECORD, record.record_id, record).payload()]
            )
        except SpoolUnavailable:
            log.error("spool unavailable: session %s event not archived", kind)
            return
        if self.on_spooled is not None:
            self.on_spooled()

    # -- planning one stanza --------------------------------------------------------------

    def _plan(
        self,
        index: int,
        event: Event,
        element: Element,
        session: SessionInfo,
        now: datetime,
    ) -> _Planned | None:
        if isinstance(event, MessageEvent):
            if not event.archivable or event.stanza_type == "error":
                return None
            return self._plan_message(index, event, element, session, now)
        if isinstance(event, SubscriptionEvent):
            return self._plan_subscription(index, event, element, session, now)
        if isinstance(event, ReportEvent):
            observation = observation_of(event, session.bound_jid, now)
            records = to_records(event, Verdict(Action.ALLOW), RecordStatus.DELIVERED, observation)
            fresh = [r for r in records if r.record_id not in self.recent]
            return _Planned(
                index,
                [SpoolEntry(EntryOp.RECORD, r.record_id, r) for r in records],
                fail_closed=partial(_fail_closed, element, session, Direction.FROM_CLIENT),
                reports=[self._report_notice(event, record, now) for record in fresh],
            )
        if isinstance(event, RosterEvent):
            if self.roster_observer is not None:
                self.roster_observer.roster_seen(event.owner, event)
            return None
        if isinstance(event, MucJoinEvent) and event.leg == Direction.FROM_CLIENT:
            return self._plan_join(index, event, element, session, now)
        if isinstance(event, ExchangeEvent):
            return self._plan_exchange(index, event, element, session, now)
        return None

    def _plan_exchange(
        self,
        index: int,
        event: ExchangeEvent,
        element: Element,
        session: SessionInfo,
        now: datetime,
    ) -> _Planned | None:
        """A call, whiteboard or file-transfer step (`proxy.jingle`).

        A session is decided once, at the first of its steps this proxy sees (normally the
        session-initiate, SI offer or IBB open), as a CALL for federation, barriers and
        limits; every later step inherits that verdict, so a refused session stays refused.
        A refused step is answered with an iq error (an iq must never go unanswered).
        """
        exchange = event.exchange
        record_id = exchange_record_id(event)
        fail_closed = partial(_fail_closed, element, session, event.leg)
        if exchange.archived and record_id in self.recent:
            # The other leg of a local session, or a retry: one more observation.
            observation = observation_of_exchange(event, session.bound_jid, now)
            entry = SpoolEntry(EntryOp.OBSERVE, record_id, observation=observation)
            return _Planned(index, [entry], PASS, fail_closed, behind=True)
        state = self.exchanges.state(event.session_key)
        verdict = state.verdict
        if verdict is None:
            verdict = state.verdict = self.decider.evaluate(self._exchange_context(event, now))
        decision = _enforce_iq(verdict, element, session, event.leg)
        if not exchange.archived:
            return _Planned(index, [], decision)
        keep = advance_session(state, event, self.config.ibb_archive_max_bytes)
        observation = observation_of_exchange(event, session.bound_jid, now)
        record = exchange_record(
            event,
            verdict,
            _STATUS_OF_ACTION[verdict.action],
            observation,
            session=state,
            keep_data=keep,
        )
        entry = SpoolEntry(EntryOp.RECORD, record_id, record)
        return _Planned(index, [entry], decision, fail_closed)

    def _exchange_context(self, event: ExchangeEvent, now: datetime) -> DecisionContext:
        return DecisionContext(
            kind=StanzaKind.CALL,
            direction=_decision_direction(event.leg),
            sender=event.sender,
            recipient=event.recipient,
            timestamp=now,
            local_domains=self.local_domains(),
            sender_full=event.sender_full or None,
            recipient_full=event.recipient_full or None,
            stanza_type=event.exchange.action,
            sender_in_recipient_roster=self._knows(event.leg, event.recipient, event.sender, now),
        )

    def _plan_message(
        self,
        index: int,
        event: MessageEvent,
        element: Element,
        session: SessionInfo,
        now: datetime,
    ) -> _Planned:
        record_id = dedupe_key(event)
        observation = observation_of(event, session.bound_jid, now)
        if event.stanza_type != "groupchat" and (
            event.direction == _TO_CLIENT or self._copy_to_local(event)
        ):
            self.delivered.note(event, record_id)
        if record_id in self.recent:
            # A copy of a record already decided: one more observation, never a new decision.
            # Written behind, so it can never fail closed: no bounce to prepare.
            entry = SpoolEntry(_OBSERVE, record_id, observation=observation)
            return _Planned(index, [entry], PASS, behind=True)
        fail_closed = partial(_fail_closed, element, session, event.leg)
        if event.history is not None:
            # History is never blocked; but a first sighting (a remote sender's message that
            # waited offline, or a forged delay) is still scored so reviewers see it.
            verdict = self._history_verdict(event, now)
            (record,) = to_records(
                event, verdict, RecordStatus.DELIVERED, observation, record_id=record_id
            )
            self._note_correspondent(event, now)
            return _Planned(
                index, [SpoolEntry(EntryOp.RECORD, record_id, record)], PASS, fail_closed
            )
        verdict = self.decider.evaluate(self._context(event, now))
        if verdict.action.delivers:
            self._note_correspondent(event, now)
            key = plain_key(event)
            if key is not None:
                self.sent_plain.note(key, record_id)
        status = _STATUS_OF_ACTION[verdict.action]
        (record,) = to_records(event, verdict, status, observation, record_id=record_id)
        entry = SpoolEntry(_RECORD, record_id, record)
        return _Planned(index, [entry], _enforce(verdict, element, session, event.leg), fail_closed)

    def _history_verdict(self, event: MessageEvent, now: datetime) -> Verdict:
        if event.direction == Direction.FROM_CLIENT:
            return HISTORY_VERDICT  # the user's own message: decided when it was sent
        verdict = self.decider.evaluate(self._context(event, now))
        if verdict.action.delivers:
            return verdict
        note = Reason(
            "history",
            f"history is never blocked (would be {verdict.action.value})",
            0.0,
            Action.FLAG,
        )
        return Verdict(Action.FLAG, verdict.score, (*verdict.reasons, note))

    def _plan_subscription(
        self,
        index: int,
        event: SubscriptionEvent,
        element: Element,
        session: SessionInfo,
        now: datetime,
    ) -> _Planned:
        ctx = DecisionContext(
            kind=StanzaKind.SUBSCRIPTION,
            direction=self._direction_of(event.leg, event.sender),
            sender=event.sender,
            recipient=event.recipient,
            timestamp=now,
            local_domains=self.local_domains(),
            sender_full=event.sender_full or None,
            recipient_full=event.recipient_full or None,
            stanza_type=event.stanza_type,
            sender_in_recipient_roster=self._knows(event.leg, event.recipient, event.sender, now),
        )
        verdict = self.decider.evaluate(ctx)
        observation = observation_of(event, session.bound_jid, now)
        (record,) = to_records(event, verdict, _STATUS_OF_ACTION[verdict.action], observation)
        entry = SpoolEntry(EntryOp.RECORD, record.record_id, record)
        if record.record_id in self.recent:
            entry = SpoolEntry(EntryOp.OBSERVE, record.record_id, observation=observation)
        return _Planned(
            index,
            [entry],
            _enforce(verdict, element, session, event.leg),
            partial(_fail_closed, element, session, event.leg),
        )

    def _plan_join(
        self,
        index: int,
        event: MucJoinEvent,
        element: Element,
        session: SessionInfo,
        now: datetime,
    ) -> _Planned | None:
        sender = session.bare_jid or ""
        ctx = DecisionContext(
            kind=StanzaKind.MUC_JOIN,
            direction=DecisionDirection.OUTBOUND,
            sender=sender,
            recipient=event.room,
            timestamp=now,
            local_domains=self.local_domains(),
            room=event.room,
        )
        verdict = self.decider.evaluate(ctx)
        if verdict.action.delivers:
            return None  # joins are not archived; only refusals are enforced
        return _Planned(index, [], _enforce(verdict, element, session, event.leg))

    def _context(self, event: MessageEvent, now: datetime) -> DecisionContext:
        body = event.body
        if event.other_bodies:  # a second-language body must not hide from the rules
            body = "\n".join([body or "", *(text for _, text in event.other_bodies)])
        urls = tuple(_URL.findall(body)) if body else ()
        if event.attachments:
            urls += tuple(a.url for a in event.attachments if a.url not in urls)
        kind = StanzaKind.MUC_INVITE if event.invitation is not None else StanzaKind.MESSAGE
        known = None
        if event.stanza_type != "groupchat" and event.room is None:
            known = self._knows(event.leg, event.recipient, event.sender, now)
        return DecisionContext(
            kind=kind,
            direction=self._direction_of(event.leg, event.sender),
            sender=event.sender,
            recipient=event.recipient,
            timestamp=now,
            local_domains=self.local_domains(),
            sender_full=event.sender_full or None,
            recipient_full=event.recipient_full or None,
            stanza_type=event.stanza_type,
            body=body,
            urls=urls,
            encryption=event.encryption,
            room=event.room,
            sender_in_recipient_roster=known,
        )

    def _is_local(self, jid: str) -> bool:
        """Whether a (bare or full) JID belongs to a domain this service serves."""
        return jid.partition("/")[0].rpartition("@")[2].lower() in self.local_domains()

    def _direction_of(self, leg: Direction, sender: str) -> DecisionDirection:
        """A server's copy (component mode) has no leg: a local sender makes it outbound."""
        if leg == Direction.COPY:
            local = self._is_local(sender)
            return DecisionDirection.OUTBOUND if local else DecisionDirection.INBOUND
        return _decision_direction(leg)

    def _copy_to_local(self, event: MessageEvent) -> bool:
        """A server's copy of a message to a local user: a spam report may name it."""
        if event.leg != Direction.COPY or not event.recipient:
            return False
        return self._is_local(event.recipient)

    # -- trust and reports ----------------------------------------------------------------

    def _knows(self, leg: Direction, recipient: str, sender: str, now: datetime) -> bool | None:
        """For a stanza arriving for a local user: does the recipient know the sender?"""
        if self.trust is None or leg != Direction.TO_CLIENT or not recipient or not sender:
            return None
        if not self._is_local(recipient):
            return None
        try:
            return self.trust.knows(recipient, sender, now)
        except Exception:
            log.exception("trust store failed; the relationship counts as unknown")
            return None

    def _note_correspondent(self, event: MessageEvent, now: datetime) -> None:
        """A local user wrote to someone: that someone is now their correspondent."""
        if self.trust is None or event.direction != Direction.FROM_CLIENT:
            return
        if event.stanza_type == "groupchat" or event.room is not None or not event.recipient:
            return
        try:
            self.trust.note_correspondent(event.sender, event.recipient, now)
        except Exception:
            log.exception("trust store refused a correspondent")

    def _report_notice(
        self, event: ReportEvent, record: ArchiveRecord, now: datetime
    ) -> ReportNotice:
        reported = (record.reported_jid or record.recipient).split("/", 1)[0]
        ids = [(ref.id, ref.by) for ref in record.stanza_ids]
        return ReportNotice(
            report_record_id=record.record_id,
            reporter=event.reporter,
            reported=reported,
            reason=record.report_reason,
            text=record.report_text,
            at=now,
            record_ids=tuple(self.delivered.find(event.reporter, reported, ids)),
        )


def _decision_direction(leg: Direction) -> DecisionDirection:
    return DecisionDirection.OUTBOUND if leg == Direction.FROM_CLIENT else DecisionDirection.INBOUND


def _worth_reading(element: Element, direction: Direction) -> bool:
    """A cheap look at the name, attributes and bytes before anything is parsed."""
    name = element.name
    if name == "message":
        return True
    if name == "presence":
        kind = element.attrs.get("type")
        if kind in _SUBSCRIPTION_TYPES:
            return True
        return direction == Direction.FROM_CLIENT and b"http://jabber.org/protocol/muc" in (
            element.data
        )
    if name == "iq":
        data = element.data
        if element.attrs.get("type") == "set" and any(m in data for m in EXCHANGE_MARKERS):
            return True  # a call, whiteboard or file-transfer step
        if direction == Direction.FROM_CLIENT:
            return b"urn:xmpp:blocking" in data
        return b"jabber:iq:roster" in data
    return False


def _enforce(verdict: Verdict, element: Element, session: SessionInfo, leg: Direction) -> Decision:
    action = verdict.action
    if action.delivers:
        return PASS
    if action == Action.REJECT and element.attrs.get("type") != "error":
        bounce = error_reply(
            element, session, leg, "modify", "policy-violation", verdict.reason_text
        )
        if leg == Direction.FROM_CLIENT:
            return Decision.drop(inject_to_client=(bounce,))
        return Decision(DecisionKind.DROP, inject_to_server=(bounce,))
    return Decision.drop()  # QUARANTINE holds, DROP is silent


def _enforce_iq(
    verdict: Verdict, element: Element, session: SessionInfo, leg: Direction
) -> Decision:
    """Like `_enforce`, but an iq is always answered: a client waits for its result.

    Nothing can be held in quarantine in a live call, so QUARANTINE refuses like REJECT;
    DROP answers `service-unavailable`, what a server says for a recipient it will not
    reveal (RFC 6121 §8.5), so a silent drop stays uninformative to the sender.
    """
    action = verdict.action
    if action.delivers:
        return PASS
    if action == Action.DROP:
        bounce = error_reply(
            element, session, leg, "cancel", "service-unavailable", "not available"
        )
    else:
        bounce = error_reply(
            element, session, leg, "modify", "policy-violation", verdict.reason_text
        )
    if leg == Direction.FROM_CLIENT:
        return Decision.drop(inject_to_client=(bounce,))
    return Decision(DecisionKind.DROP, inject_to_server=(bounce,))


def _fail_closed(element: Element, session: SessionInfo, leg: Direction) -> Decision:
    if element.attrs.get("type") == "error":
        return Decision.drop()
    bounce = error_reply(
        element,
        session,
        leg,
        "wait",
        "resource-constraint",
        "the compliance archive is unavailable; try again later",
    )
    if leg == Direction.FROM_CLIENT:
        return Decision.drop(inject_to_client=(bounce,))
    return Decision(DecisionKind.DROP, inject_to_server=(bounce,))


def error_reply(
    element: Element,
    session: SessionInfo,
    leg: Direction,
    error_type: str,
    condition: str,
    text: str,
) -> bytes:
    """A stanza error answering `element`, addressed back to its sender (RFC 6120 §8.3)."""
    attrs = element.attrs
    if leg == Direction.FROM_CLIENT:
        to = session.bound_jid or ""
        sender = attrs.get("to", session.domain)
    else:
        to = attrs.get("from", "")
        sender = attrs.get("to", session.bound_jid or "")
    name = element.name if element.name in ("message", "presence", "iq") else "message"
    id_attr = f" id={quoteattr(attrs['id'])}" if "id" in attrs else ""
    return (
        f"<{name} xmlns='jabber:client' type='error' from={quoteattr(sender)} "
        f"to={quoteattr(to)}{id_attr}><error type='{error_type}'>"
        f"<{condition} xmlns='{STANZAS_NS}'/>"
        f"<text xmlns='{STANZAS_NS}'>{escape(text)}</text></error></{name}>"
    ).encode()
