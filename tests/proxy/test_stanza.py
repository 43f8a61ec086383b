"""Normalisation of parsed stanzas into typed events, record ids and archive records."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slixmpp.stanza import Iq, Message, Presence

from archive_api.store.records import (
    Direction,
    ObservationVia,
    RecordKind,
    RecordStatus,
    StanzaIdRef,
)
from classifier.verdict import ALLOW
from proxy import stanza, stanza_classes
from proxy.errors import StanzaError
from proxy.stanza import (
    Anomaly,
    BindEvent,
    Event,
    HistoryKind,
    Ignored,
    Invitation,
    MessageEvent,
    MucJoinEvent,
    ReportEvent,
    RosterEntry,
    RosterEvent,
    Signal,
    SubscriptionEvent,
    dedupe_key,
    normalise,
    observation_of,
    to_record,
    to_records,
)
from tests.support.native import interpreted

ALICE = "alice@corp.example/laptop"
ALICE_DESK = "alice@corp.example/desk"
BOB = "bob@corp.example/phone"
BOB_DESK = "bob@corp.example/desk"
ROOM = "desk@conference.corp.example"
NOW = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
UPLOAD = frozenset({"upload.corp.example"})
CLIENT = "192.0.2.7"
FROM_CLIENT = Direction.FROM_CLIENT
TO_CLIENT = Direction.TO_CLIENT

SID = "xmlns='urn:xmpp:sid:0'"
FWD = "xmlns='urn:xmpp:forward:0'"
CARBONS = "xmlns='urn:xmpp:carbons:2'"


def norm(
    xml: str,
    *,
    leg: Direction,
    session: str | None,
    now: datetime = NOW,
    upload_hosts: frozenset[str] = UPLOAD,
    reader: Callable[..., Event] = normalise,
) -> Event:
    element = ET.fromstring(xml)
    before = ET.tostring(element)
    event = reader(
        element,
        xml.encode(),
        direction=leg,
        session_jid=session,
        client_address=CLIENT,
        now=now,
        upload_hosts=upload_hosts,
    )
    # Reading must never write into the tree the framer handed over.
    assert ET.tostring(element) == before
    return event


def message(
    xml: str,
    *,
    leg: Direction,
    session: str | None,
    now: datetime = NOW,
    upload_hosts: frozenset[str] = UPLOAD,
) -> MessageEvent:
    event = norm(xml, leg=leg, session=session, now=now, upload_hosts=upload_hosts)
    assert isinstance(event, MessageEvent), event
    return event


def inner(attrs: str, payload: str) -> str:
    return f"<message xmlns='jabber:client' {attrs}>{payload}</message>"


# One alice → bob chat message and the copies of it the proxy can see.
PAYLOAD = (
    "<body>Lunch at noon?</body>"
    f"<origin-id {SID} id='orig-1'/>"
    "<active xmlns='http://jabber.org/protocol/chatstates'/>"
    "<request xmlns='urn:xmpp:receipts'/>"
    "<markable xmlns='urn:xmpp:chat-markers:0'/>"
    "<thread>t-7</thread>"
)
SENT_BY_ALICE = inner("to='bob@corp.example' type='chat' id='m-1'", PAYLOAD)
DELIVERED_TO_BOB = inner(
    f"from='{ALICE}' to='{BOB}' type='chat' id='m-1'",
    PAYLOAD + f"<stanza-id {SID} id='bob-arch-1' by='bob@corp.example'/>",
)
STORED = inner(f"from='{ALICE}' to='bob@corp.example' type='chat' id='m-1'", PAYLOAD)


def carbon(kind: str, outer_from: str | None, to: str, forwarded: str) -> str:
    sender = f" from='{outer_from}'" if outer_from else ""
    return (
        f"<message xmlns='jabber:client'{sender} to='{to}' type='chat'>"
        f"<{kind} {CARBONS}><forwarded {FWD}>{forwarded}</forwarded></{kind}></message>"
    )


def mam(outer_from: str | None, to: str, archive_id: str, stamp: str, forwarded: str) -> str:
    sender = f" from='{outer_from}'" if outer_from else ""
    return (
        f"<message xmlns='jabber:client'{sender} to='{to}' id='mam-page'>"
        f"<result xmlns='urn:xmpp:mam:2' queryid='q1' id='{archive_id}'><forwarded {FWD}>"
        f"<delay xmlns='urn:xmpp:delay' stamp='{stamp}'/>{forwarded}</forwarded></result>"
        "</message>"
    )


# --- plain messages ------------------------------------------------------------------------------


def test_message_sent_by_the_local_user() -> None:
    event = message(SENT_BY_ALICE, leg=FROM_CLIENT, session=ALICE)
    assert event.leg is FROM_CLIENT and event.direction is FROM_CLIENT
    assert (event.sender, event.sender_full) == ("alice@corp.example", ALICE)
    assert (event.recipient, event.recipient_full) == ("bob@corp.example", "bob@corp.example")
    assert event.stanza_type == "chat"
    assert event.body == "Lunch at noon?"
    assert event.thread == "t-7"
    assert (event.message_id, event.origin_id) == ("m-1", "orig-1")
    assert event.signals == {Signal.CHAT_STATE, Signal.RECEIPT_REQUEST, Signal.MARKABLE}
    assert event.history is None and not event.anomalies
    assert event.is_content and event.archivable
    assert event.client_address == CLIENT and event.received_at == NOW
    assert event.seen_by == ALICE


def test_message_delivered_to_the_local_user_keeps_only_trusted_stanza_ids() -> None:
    xml = inner(
        f"from='{ALICE}' to='{BOB}' type='chat' id='m-1'",
        PAYLOAD
        + f"<stanza-id {SID} id='bob-arch-1' by='bob@corp.example'/>"
        + f"<stanza-id {SID} id='fake' by='eve@evil.example'/>",
    )
    event = message(xml, leg=TO_CLIENT, session=BOB)
    assert event.direction is TO_CLIENT
    assert (event.sender_full, event.recipient_full) == (ALICE, BOB)
    assert event.stanza_ids == (StanzaIdRef("bob-arch-1", "bob@corp.example"),)


def test_client_assigned_stanza_ids_are_dropped() -> None:
    xml = inner(
        "to='bob@corp.example' type='chat'", f"<body>x</body><stanza-id {SID} id='s' by='x@y'/>"
    )
    assert message(xml, leg=FROM_CLIENT, session=ALICE).stanza_ids == ()


def test_client_claiming_another_sender_is_flagged_and_attributed_to_the_session() -> None:
    xml = inner("from='ceo@corp.example/x' to='bob@corp.example' type='chat'", "<body>wire</body>")
    event = message(xml, leg=FROM_CLIENT, session=ALICE)
    assert Anomaly.SPOOFED_FROM in event.anomalies
    assert event.sender_full == ALICE


def test_message_without_to_from_client_goes_to_the_own_account() -> None:
    event = message(inner("type='chat'", "<body>note</body>"), leg=FROM_CLIENT, session=ALICE)
    assert event.recipient_full == "alice@corp.example"


def test_message_without_from_to_client_is_from_the_own_account() -> None:
    event = message(inner(f"to='{BOB}'", "<body>server says hi</body>"), leg=TO_CLIENT, session=BOB)
    assert event.sender_full == "bob@corp.example"
    assert event.stanza_type == "normal"


@pytest.mark.parametrize(
    ("payload", "signals"),
    [
        ("<composing xmlns='http://jabber.org/protocol/chatstates'/>", {Signal.CHAT_STATE}),
        ("<received xmlns='urn:xmpp:receipts' id='m-1'/>", {Signal.RECEIPT}),
        ("<displayed xmlns='urn:xmpp:chat-markers:0' id='m-1'/>", {Signal.MARKER}),
        ("<event xmlns='http://jabber.org/protocol/pubsub#event'><items node='x'/></event>", set()),
        ("<body></body>", set()),
    ],
)
def test_signals_alone_are_not_content(payload: str, signals: set[Signal]) -> None:
    event = message(
        inner(f"from='{ALICE}' to='{BOB}' type='chat'", payload), leg=TO_CLIENT, session=BOB
    )
    assert event.signals == signals
    assert not event.is_content and not event.archivable
    assert event.content_digest == ""


def test_error_bounces_are_not_content() -> None:
    xml = inner(f"from='bob@corp.example' to='{ALICE}' type='error' id='m-1'", "<body>echo</body>")
    event = message(xml, leg=TO_CLIENT, session=ALICE)
    assert event.stanza_type == "error" and not event.is_content


def test_unknown_type_is_normal() -> None:
    xml = inner(f"from='{ALICE}' to='{BOB}' type='bogus'", "<body>x</body>")
    assert message(xml, leg=TO_CLIENT, session=BOB).stanza_type == "normal"


def test_groupchat_subject_change_is_content_even_when_cleared() -> None:
    xml = inner(f"from='{ROOM}/carol' to='{BOB}' type='groupchat' id='s1'", "<subject/>")
    event = message(xml, leg=TO_CLIENT, session=BOB)
    assert event.subject == ""
    assert event.is_content


def test_bodies_in_other_languages_are_kept_and_archived() -> None:
    xml = (
        f"<message xmlns='jabber:client' from='{ALICE}' to='{BOB}' type='chat' xml:lang='en'>"
        "<body>hello</body><body xml:lang='de'>KAUFEN SIE JETZT</body></message>"
    )
    event = message(xml, leg=TO_CLIENT, session=BOB)
    assert event.body == "hello"
    assert event.other_bodies == (("de", "KAUFEN SIE JETZT"),)
    record = to_record(event, ALLOW, RecordStatus.DELIVERED, observation_of(event, BOB, NOW))
    assert record.body is not None and "KAUFEN SIE JETZT" in record.body


def test_huge_body_and_raw_are_not_copied() -> None:
    body = "spam " * 50_000
    xml = inner(f"from='{ALICE}' to='{BOB}' type='chat'", f"<body>{body}</body>")
    element = ET.fromstring(xml)
    raw = xml.encode()
    event = normalise(
        element, raw, direction=TO_CLIENT, session_jid=BOB, client_address=None, now=NOW
    )
    assert isinstance(event, MessageEvent)
    assert event.body is element.findtext("{jabber:client}body") or event.body is element[0].text
    assert event.raw is raw
    assert "raw" not in repr(event)


# --- carbons ------------------------------------------------------------------------------------


def test_received_carbon_describes_the_inner_message() -> None:
    xml = carbon("received", "bob@corp.example", BOB_DESK, STORED)
    event = message(xml, leg=TO_CLIENT, session=BOB_DESK)
    assert event.history is HistoryKind.CARBON_RECEIVED
    assert event.direction is TO_CLIENT and event.leg is TO_CLIENT
    assert (event.sender_full, event.recipient) == (ALICE, "bob@corp.example")
    assert event.body == "Lunch at noon?"
    assert event.seen_by == BOB_DESK
    assert not event.anomalies


def test_sent_carbon_is_the_users_own_message() -> None:
    sent = inner(f"from='{ALICE_DESK}' to='bob@corp.example' type='chat' id='m-1'", PAYLOAD)
    event = message(carbon("sent", None, ALICE, sent), leg=TO_CLIENT, session=ALICE)
    assert event.history is HistoryKind.CARBON_SENT
    assert event.direction is FROM_CLIENT and event.leg is TO_CLIENT
    assert event.sender_full == ALICE_DESK


@pytest.mark.parametrize(
    ("outer_from", "leg", "session"),
    [
        ("eve@evil.example", TO_CLIENT, BOB),  # a stranger's wrapper
        (BOB_DESK, TO_CLIENT, BOB),  # own account, but a full JID: servers send from bare
        ("bob@corp.example", FROM_CLIENT, BOB),  # a client never sends carbons
        ("bob@corp.example", TO_CLIENT, None),  # unverifiable before bind
    ],
)
def test_forged_carbon_is_flagged_and_describes_the_outer_message(
    outer_from: str, leg: Direction, session: str | None
) -> None:
    forged = inner(f"from='ceo@corp.example/x' to='{BOB}' type='chat'", "<body>pay now</body>")
    event = message(carbon("received", outer_from, BOB, forged), leg=leg, session=session)
    assert Anomaly.FORGED_CARBON in event.anomalies
    assert event.history is None
    assert event.body is None and event.sender != "ceo@corp.example"
    assert event.archivable and not event.is_content
    other = forged.replace("pay now", "pay later")
    again = message(carbon("received", outer_from, BOB, other), leg=leg, session=session)
    assert dedupe_key(again) != dedupe_key(event)


def test_carbon_without_forwarded_message_is_ignored() -> None:
    xml = (
        f"<message xmlns='jabber:client' to='{BOB}'><received {CARBONS}><forwarded {FWD}/>"
        "</received>"
        "</message>"
    )
    assert isinstance(norm(xml, leg=TO_CLIENT, session=BOB), Ignored)


def test_only_one_level_of_forwarding_is_interpreted() -> None:
    # The forwarded message itself carries a carbon wrapper: its content is the inner body.
    nested = inner(
        f"from='{ALICE}' to='{BOB}' type='chat' id='n1'",
        f"<body>outer text</body><received {CARBONS}><forwarded {FWD}>"
        + inner("from='mallory@evil.example/x' to='bob@corp.example'", "<body>deep</body>")
        + "</forwarded></received>",
    )
    event = message(carbon("received", "bob@corp.example", BOB, nested), leg=TO_CLIENT, session=BOB)
    assert event.history is HistoryKind.CARBON_RECEIVED
    assert Anomaly.NESTED_FORWARD in event.anomalies
    assert event.body == "outer text" and event.sender_full == ALICE


# --- MAM, offline, MUC history ------------------------------------------------------------------


def test_mam_result_from_own_archive() -> None:
    xml = mam(None, BOB, "arch-9", "2025-12-31T23:59:00Z", STORED)
    event = message(xml, leg=TO_CLIENT, session=BOB)
    assert event.history is HistoryKind.MAM
    assert event.direction is TO_CLIENT
    assert event.delay_stamp == datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    assert event.occurred_at == event.delay_stamp
    assert StanzaIdRef("arch-9", "bob@corp.example") in event.stanza_ids


def test_mam_copy_of_own_message_is_outgoing() -> None:
    xml = mam("alice@corp.example", ALICE, "arch-1", "2025-12-31T23:59:00Z", STORED)
    event = message(xml, leg=TO_CLIENT, session=ALICE_DESK)
    assert event.direction is FROM_CLIENT
    assert event.stanza_ids == (StanzaIdRef("arch-1", "alice@corp.example"),)


def test_mam_result_from_the_room_is_trusted_and_from_others_forged() -> None:
    reflected = inner(
        f"from='{ROOM}/carol' type='groupchat' id='g-1'",
        f"<body>hi</body><origin-id {SID} id='og'/>",
    )
    room = message(
        mam(ROOM, BOB, "r-5", "2025-12-31T10:00:00Z", reflected), leg=TO_CLIENT, session=BOB
    )
    assert room.history is HistoryKind.MAM and room.room == ROOM
    assert room.stanza_ids == (StanzaIdRef("r-5", ROOM),)
    forged = message(
        mam("eve@evil.example", BOB, "r-5", "2025-12-31T10:00:00Z", reflected),
        leg=TO_CLIENT,
        session=BOB,
    )
    assert Anomaly.FORGED_MAM in forged.anomalies and forged.history is None


def test_offline_redelivery_needs_a_delay_from_the_own_domain() -> None:
    offline = STORED.replace(
        "</message>",
        "<delay xmlns='urn:xmpp:delay' from='corp.example' stamp='2026-01-01T08:00:00Z'/>"
        "</message>",
    )
    event = message(offline, leg=TO_CLIENT, session=BOB)
    assert event.history is HistoryKind.OFFLINE
    assert event.delay_from == "corp.example"
    assert event.occurred_at == datetime(2026, 1, 1, 8, tzinfo=UTC)

    claimed = STORED.replace(
        "</message>",
        "<delay xmlns='urn:xmpp:delay' from='evil.example' stamp='2020-01-01T00:00:00Z'/>"
        "</message>",
    )
    live = message(claimed, leg=TO_CLIENT, session=BOB)
    assert live.history is None
    assert live.delay_stamp == datetime(2020, 1, 1, tzinfo=UTC)
    assert live.occurred_at == NOW  # a live message's own delay is not believed


def test_muc_history_is_a_delay_from_the_room() -> None:
    xml = inner(
        f"from='{ROOM}/carol' to='{BOB}' type='groupchat' id='g-1'",
        "<body>earlier</body>"
        f"<delay xmlns='urn:xmpp:delay' from='{ROOM}' stamp='2026-01-01T09:00:00Z'/>",
    )
    event = message(xml, leg=TO_CLIENT, session=BOB)
    assert event.history is HistoryKind.MUC_HISTORY
    assert observation_of(event, BOB, NOW).via is ObservationVia.MUC_REFLECTION


@pytest.mark.parametrize(
    "stamp",
    ["yesterday", "2026-01-01T08:00:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"],
)
def test_unusable_delay_stamps_are_ignored(stamp: str) -> None:
    xml = inner(
        f"from='{ALICE}' to='{BOB}'",
        f"<body>x</body><delay xmlns='urn:xmpp:delay' from='corp.example' stamp='{stamp}'/>",
    )
    event = message(xml, leg=TO_CLIENT, session=BOB)
    assert not event.anomalies
    assert event.delay_stamp is None and event.occurred_at == NOW


# --- record ids ---------------------------------------------------------------------------------


def test_every_copy_of_a_chat_message_has_the_same_record_id() -> None:
    sent_carbon = inner(f"from='{ALICE}' to='bob@corp.example' type='chat' id='m-1'", PAYLOAD)
    offline = STORED.replace(
        "</message>",
        "<delay xmlns='urn:xmpp:delay' from='corp.example' stamp='2026-01-01T12:00:01Z'/>"
        "</message>",
    )
    copies = [
        message(SENT_BY_ALICE, leg=FROM_CLIENT, session=ALICE),
        message(DELIVERED_TO_BOB, leg=TO_CLIENT, session=BOB),
        message(
            carbon("received", "bob@corp.example", BOB_DESK, STORED),
            leg=TO_CLIENT,
            session=BOB_DESK,
        ),
        message(
            carbon("sent", "alice@corp.example", ALICE_DESK, sent_carbon),
            leg=TO_CLIENT,
            session=ALICE_DESK,
        ),
        message(mam(None, BOB, "a1", "2026-01-01T12:00:01Z", STORED), leg=TO_CLIENT, session=BOB),
        message(
            mam(None, ALICE, "a2", "2026-01-01T12:00:01Z", STORED), leg=TO_CLIENT, session=ALICE
        ),
        message(offline, leg=TO_CLIENT, session=BOB),
    ]
    assert len({dedupe_key(c) for c in copies}) == 1
    vias = [observation_of(c, c.seen_by, NOW).via for c in copies]
    assert vias == [
        ObservationVia.LIVE,
        ObservationVia.LIVE,
        ObservationVia.CARBON_RECEIVED,
        ObservationVia.CARBON_SENT,
        ObservationVia.MAM,
        ObservationVia.MAM,
        ObservationVia.OFFLINE,
    ]


def test_muc_sender_copy_and_reflections_share_a_record() -> None:
    body = f"<body>Morning all</body><origin-id {SID} id='og-1'/>"
    sent = inner(f"to='{ROOM}' type='groupchat' id='g-1'", body)
    to_bob = inner(
        f"from='{ROOM}/alice' to='{BOB}' type='groupchat' id='g-1'",
        body + f"<stanza-id {SID} id='room-77' by='{ROOM}'/>",
    )
    to_alice = to_bob.replace(f"to='{BOB}'", f"to='{ALICE}'")
    sender = message(sent, leg=FROM_CLIENT, session=ALICE)
    bob = message(to_bob, leg=TO_CLIENT, session=BOB)
    echo = message(to_alice, leg=TO_CLIENT, session=ALICE)
    assert sender.room == bob.room == echo.room == ROOM
    assert (sender.sender, bob.sender, bob.sender_full) == (
        "alice@corp.example",
        ROOM,
        f"{ROOM}/alice",
    )
    assert bob.nick == "alice" and sender.nick is None
    assert bob.stanza_ids == (StanzaIdRef("room-77", ROOM),)
    assert dedupe_key(sender) == dedupe_key(bob) == dedupe_key(echo)
    assert observation_of(sender, ALICE, NOW).via is ObservationVia.LIVE
    assert observation_of(bob, BOB, NOW).via is ObservationVia.MUC_REFLECTION
    assert observation_of(echo, ALICE, NOW).direction is TO_CLIENT


def test_muc_history_replay_shares_the_record() -> None:
    live = inner(f"from='{ROOM}/carol' to='{BOB}' type='groupchat' id='g-9'", "<body>x</body>")
    history = live.replace(
        "</message>",
        f"<delay xmlns='urn:xmpp:delay' from='{ROOM}' stamp='2026-01-01T09:00:00Z'/></message>",
    )
    a = message(live, leg=TO_CLIENT, session=BOB)
    b = message(history, leg=TO_CLIENT, session=ALICE, now=NOW + timedelta(hours=5))
    assert dedupe_key(a) == dedupe_key(b)


def test_a_reused_id_with_other_content_is_a_new_record() -> None:
    first = inner(
        f"from='{ROOM}/alice' to='{BOB}' type='groupchat' id='g-1'", "<body>innocent</body>"
    )
    second = inner(
        f"from='{ROOM}/eve' to='{BOB}' type='groupchat' id='g-1'", "<body>insider tip</body>"
    )
    chat1 = inner("to='bob@corp.example' type='chat' id='c-1'", "<body>hello</body>")
    chat2 = inner("to='bob@corp.example' type='chat' id='c-1'", "<body>sell everything</body>")
    assert dedupe_key(message(first, leg=TO_CLIENT, session=BOB)) != dedupe_key(
        message(second, leg=TO_CLIENT, session=BOB)
    )
    assert dedupe_key(message(chat1, leg=FROM_CLIENT, session=ALICE)) != dedupe_key(
        message(chat2, leg=FROM_CLIENT, session=ALICE)
    )


def test_origin_id_wins_over_the_message_id() -> None:
    # The room gives an id to a message that had none; the origin-id survives every copy.
    sent = inner(f"to='{ROOM}' type='groupchat'", f"<body>x</body><origin-id {SID} id='og-3'/>")
    reflected = inner(
        f"from='{ROOM}/alice' to='{BOB}' type='groupchat' id='room-made'",
        f"<body>x</body><origin-id {SID} id='og-3'/>",
    )
    assert dedupe_key(message(sent, leg=FROM_CLIENT, session=ALICE)) == dedupe_key(
        message(reflected, leg=TO_CLIENT, session=BOB)
    )


def test_messages_without_any_id_fall_back_to_a_minute_bucket() -> None:
    xml = inner("to='bob@corp.example' type='chat'", "<body>ok</body>")
    base = NOW.replace(second=5)
    a = message(xml, leg=FROM_CLIENT, session=ALICE, now=base)
    b = message(xml, leg=FROM_CLIENT, session=ALICE, now=base + timedelta(seconds=40))
    c = message(xml, leg=FROM_CLIENT, session=ALICE, now=base + timedelta(minutes=2))
    assert dedupe_key(a) == dedupe_key(b) != dedupe_key(c)


def test_room_subject_replayed_on_each_join_collapses() -> None:
    subject = inner(
        f"from='{ROOM}/carol' to='{BOB}' type='groupchat'",
        "<subject>Q1 numbers</subject>"
        f"<delay xmlns='urn:xmpp:delay' from='{ROOM}' stamp='2025-11-02T10:00:00Z'/>",
    )
    first = message(subject, leg=TO_CLIENT, session=BOB)
    later = message(subject, leg=TO_CLIENT, session=BOB, now=NOW + timedelta(days=3))
    assert first.history is HistoryKind.MUC_HISTORY
    assert dedupe_key(first) == dedupe_key(later)


def test_direct_and_groupchat_keys_differ() -> None:
    chat = inner(f"from='{ROOM}/carol' to='{BOB}' type='chat' id='z'", "<body>x</body>")
    group = chat.replace("type='chat'", "type='groupchat'")
    assert dedupe_key(message(chat, leg=TO_CLIENT, session=BOB)) != dedupe_key(
        message(group, leg=TO_CLIENT, session=BOB)
    )


# --- corrections, retractions -------------------------------------------------------------------


def test_correction_is_a_new_record_linked_to_the_original() -> None:
    original = message(SENT_BY_ALICE, leg=FROM_CLIENT, session=ALICE)
    fix = inner(
        "to='bob@corp.example' type='chat' id='m-2'",
        "<body>Lunch at one?</body><replace xmlns='urn:xmpp:message-correct:0' id='m-1'/>",
    )
    event = message(fix, leg=FROM_CLIENT, session=ALICE)
    assert event.replaces_id == original.message_id
    assert dedupe_key(event) != dedupe_key(original)
    record = to_record(event, ALLOW, RecordStatus.DELIVERED, observation_of(event, ALICE, NOW))
    assert record.replaces_id == "m-1" and record.body == "Lunch at one?"


@pytest.mark.parametrize(
    "payload",
    [
        "<retract xmlns='urn:xmpp:message-retract:1' id='orig-1'/>",
        "<apply-to xmlns='urn:xmpp:fasten:0' id='orig-1'>"
        "<retract xmlns='urn:xmpp:message-retract:0'/>"
        "</apply-to>",
    ],
)
def test_retraction_links_to_the_original_and_is_content(payload: str) -> None:
    event = message(
        inner("to='bob@corp.example' type='chat' id='r-1'", payload), leg=FROM_CLIENT, session=ALICE
    )
    assert event.retracts_id == "orig-1"
    assert event.is_content and event.body is None
    record = to_record(event, ALLOW, RecordStatus.DELIVERED, observation_of(event, ALICE, NOW))
    assert record.retracts_id == "orig-1"


def test_fastening_without_retract_is_not_a_retraction() -> None:
    payload = "<apply-to xmlns='urn:xmpp:fasten:0' id='orig-1'><reaction/></apply-to>"
    event = message(
        inner("to='bob@corp.example' type='chat'", payload), leg=FROM_CLIENT, session=ALICE
    )
    assert event.retracts_id is None and not event.is_content


# --- attachments ------------------------------------------------------------------------------

SHA256_B64 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
SHA256_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_oob_attachment() -> None:
    payload = (
        "<body>see</body><x xmlns='jabber:x:oob'><url> https://files.example.org/a.pdf </url>"
        "<desc>A</desc>"
        "</x>"
    )
    event = message(inner(f"from='{ALICE}' to='{BOB}'", payload), leg=TO_CLIENT, session=BOB)
    assert [(a.url, a.source) for a in event.attachments] == [
        ("https://files.example.org/a.pdf", "oob")
    ]
    assert event.is_content


def test_sims_attachment_with_metadata_wins_over_oob_and_body_url() -> None:
    url = "https://upload.corp.example/s/summit.jpg"
    payload = (
        f"<body>{url}</body>"
        "<reference xmlns='urn:xmpp:reference:0' type='data'>"
        "<media-sharing xmlns='urn:xmpp:sims:1'>"
        "<file xmlns='urn:xmpp:jingle:apps:file-transfer:5'>"
        "<media-type>image/jpeg</media-type><name>summit.jpg</name><size>3032449</size>"
        f"<hash xmlns='urn:xmpp:hashes:2' algo='sha3-256'>ignored</hash>"
        f"<hash xmlns='urn:xmpp:hashes:2' algo='sha-256'>{SHA256_B64}</hash>"
        "</file><sources>"
        f"<reference xmlns='urn:xmpp:reference:0' type='data' uri='{url}'/>"
        "</sources></media-sharing></reference>"
        f"<x xmlns='jabber:x:oob'><url>{url}</url></x>"
    )
    event = message(inner(f"from='{ALICE}' to='{BOB}'", payload), leg=TO_CLIENT, session=BOB)
    (attachment,) = event.attachments
    assert attachment.source == "sims" and attachment.url == url
    assert (attachment.media_type, attachment.name, attachment.size) == (
        "image/jpeg",
        "summit.jpg",
        3032449,
    )
    assert attachment.sha256 == SHA256_HEX


def test_mention_references_are_not_attachments() -> None:
    payload = (
        "<body>hi bob</body>"
        "<reference xmlns='urn:xmpp:reference:0' type='mention' uri='xmpp:bob@corp.example'"
        " begin='3' end='6'/>"
    )
    assert (
        message(
            inner(f"from='{ALICE}' to='{BOB}'", payload), leg=TO_CLIENT, session=BOB
        ).attachments
        == ()
    )


@pytest.mark.parametrize(("size", "expected"), [("6144", 6144), ("-5", None), ("\u00b2", None)])
def test_stateless_file_sharing_attachment(size: str, expected: int | None) -> None:
    payload = (
        "<file-sharing xmlns='urn:xmpp:sfs:0' disposition='inline'>"
        "<file xmlns='urn:xmpp:file:metadata:0'><media-type>text/plain</media-type>"
        f"<name>notes.txt</name><size>{size}</size>"
        f"<hash xmlns='urn:xmpp:hashes:2' algo='sha-256'>{SHA256_B64}</hash>"
        "</file><sources>"
        "<url-data xmlns='http://jabber.org/protocol/url-data'"
        " target='https://upload.corp.example/n.txt'/>"
        "</sources></file-sharing>"
    )
    event = message(inner(f"from='{ALICE}' to='{BOB}'", payload), leg=TO_CLIENT, session=BOB)
    (attachment,) = event.attachments
    assert (attachment.source, attachment.name, attachment.size, attachment.sha256) == (
        "sfs",
        "notes.txt",
        expected,
        SHA256_HEX,
    )
    assert attachment.media_type == "text/plain"
    assert event.is_content  # no body, the file is the content


def test_upload_urls_in_body_only_for_configured_hosts() -> None:
    body = (
        "<body>report https://upload.corp.example/abc/q1.xlsx and "
        "https://evil.example/x and aesgcm://upload.corp.example/e/img.jpg#KEY</body>"
    )
    event = message(inner(f"from='{ALICE}' to='{BOB}'", body), leg=TO_CLIENT, session=BOB)
    assert [(a.url, a.source) for a in event.attachments] == [
        ("https://upload.corp.example/abc/q1.xlsx", "upload"),
        ("aesgcm://upload.corp.example/e/img.jpg#KEY", "upload"),
    ]
    unconfigured = message(
        inner(f"from='{ALICE}' to='{BOB}'", body),
        leg=TO_CLIENT,
        session=BOB,
        upload_hosts=frozenset(),
    )
    assert unconfigured.attachments == ()
    # Derived attachments stay out of the digest: the key must not depend on configuration.
    assert dedupe_key(event) == dedupe_key(unconfigured)


def test_attachment_count_is_bounded() -> None:
    oobs = "".join(
        f"<x xmlns='jabber:x:oob'><url>https://f.example/{i}</url></x>" for i in range(500)
    )
    event = message(inner(f"from='{ALICE}' to='{BOB}'", oobs), leg=TO_CLIENT, session=BOB)
    assert len(event.attachments) == 32


# --- encryption ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "marker"),
    [
        (
            "<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'/>"
            "<payload>AAAA</payload>"
            "</encrypted>",
            "omemo",
        ),
        (
            "<encrypted xmlns='urn:xmpp:omemo:2'><header sid='1'/><payload>BBBB</payload>"
            "</encrypted>",
            "omemo",
        ),
        ("<openpgp xmlns='urn:xmpp:openpgp:0'>CCCC</openpgp>", "openpgp"),
        ("<x xmlns='jabber:x:encrypted'>DDDD</x>", "openpgp"),
        ("<body>?OTRv3?OTR:AAMG...</body>", "otr"),
    ],
)
def test_encryption_markers(payload: str, marker: str) -> None:
    event = message(inner(f"from='{ALICE}' to='{BOB}' id='e'", payload), leg=TO_CLIENT, session=BOB)
    assert event.encryption == marker
    assert event.is_content


def test_encrypted_payloads_with_the_same_fallback_get_different_keys() -> None:
    def omemo(data: str) -> str:
        return inner(
            "to='bob@corp.example' id='same'",
            "<body>I sent you an OMEMO encrypted message</body>"
            f"<encrypted xmlns='eu.siacs.conversations.axolotl'><payload>{data}</payload>"
            "</encrypted>",
        )

    a = message(omemo("AAAA"), leg=FROM_CLIENT, session=ALICE)
    b = message(omemo("BBBB"), leg=FROM_CLIENT, session=ALICE)
    assert dedupe_key(a) != dedupe_key(b)


def test_omemo_key_transport_is_not_content() -> None:
    payload = (
        "<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'><iv>x</iv></header>"
        "</encrypted>"
    )
    event = message(inner(f"from='{ALICE}' to='{BOB}'", payload), leg=TO_CLIENT, session=BOB)
    assert event.encryption == "omemo" and not event.is_content


# --- invitations --------------------------------------------------------------------------------


def test_mediated_invitation_delivered_by_the_room() -> None:
    payload = (
        "<x xmlns='http://jabber.org/protocol/muc#user'>"
        "<invite from='eve@evil.example/x'><reason>Free crypto signals</reason></invite>"
        "<password>secret</password></x>"
    )
    event = message(inner(f"from='{ROOM}' to='{BOB}' id='i1'", payload), leg=TO_CLIENT, session=BOB)
    assert event.invitation == Invitation(
        room=ROOM,
        mediated=True,
        inviter="eve@evil.example",
        invitee="bob@corp.example",
        reason="Free crypto signals",
    )
    assert event.is_content
    record = to_record(event, ALLOW, RecordStatus.DELIVERED, observation_of(event, BOB, NOW))
    assert record.room == ROOM


def test_mediated_invitation_sent_through_the_room() -> None:
    payload = "<x xmlns='http://jabber.org/protocol/muc#user'><invite to='bob@corp.example'/></x>"
    event = message(inner(f"to='{ROOM}' id='i2'", payload), leg=FROM_CLIENT, session=ALICE)
    assert event.invitation == Invitation(
        room=ROOM, mediated=True, inviter="alice@corp.example", invitee="bob@corp.example"
    )


def test_direct_invitation() -> None:
    payload = f"<x xmlns='jabber:x:conference' jid='{ROOM}' password='p' reason='join us'/>"
    event = message(inner(f"from='{ALICE}' to='{BOB}'", payload), leg=TO_CLIENT, session=BOB)
    assert event.invitation == Invitation(
        room=ROOM,
        mediated=False,
        inviter="alice@corp.example",
        invitee="bob@corp.example",
        reason="join us",
    )


# --- reports --------------------------------------------------------------------------------------


def block(items: str, leg: Direction = FROM_CLIENT, iq_id: str = "blk-1") -> Event:
    xml = (
        f"<iq xmlns='jabber:client' type='set' id='{iq_id}'>"
        f"<block xmlns='urn:xmpp:blocking'>{items}</block></iq>"
    )
    return norm(xml, leg=leg, session=BOB)


def test_spam_report_reporting_1() -> None:
    event = block(
        "<item jid='spam@evil.example'>"
        "<report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:spam'>"
        f"<stanza-id {SID} by='bob@corp.example' id='s-42'/>"
        "<text xml:lang='en'>Crypto scam</text></report></item>"
    )
    assert isinstance(event, ReportEvent)
    assert (event.reporter, event.reporter_full, event.iq_id) == ("bob@corp.example", BOB, "blk-1")
    (item,) = event.items
    assert (item.jid, item.reason, item.text) == ("spam@evil.example", "spam", "Crypto scam")
    assert item.stanza_ids == (StanzaIdRef("s-42", "bob@corp.example"),)
    record = to_record(event, ALLOW, RecordStatus.DELIVERED, observation_of(event, BOB, NOW))
    assert record.kind is RecordKind.REPORT
    assert (record.reported_jid, record.report_reason, record.report_text) == (
        "spam@evil.example",
        "spam",
        "Crypto scam",
    )
    assert record.stanza_ids == item.stanza_ids and record.raw == event.raw


@pytest.mark.parametrize(("child", "reason"), [("spam", "spam"), ("abuse", "abuse")])
def test_spam_report_reporting_0(child: str, reason: str) -> None:
    event = block(
        f"<item jid='x@evil.example'><report xmlns='urn:xmpp:reporting:0'><{child}/>"
        "<text>go away</text></report></item>"
    )
    assert isinstance(event, ReportEvent)
    assert event.items[0].reason == reason and event.items[0].text == "go away"


def test_report_on_several_jids_makes_one_record_each() -> None:
    event = block(
        "<item jid='a@evil.example'>"
        "<report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:abuse'/>"
        "</item>"
        "<item jid='b@evil.example'>"
        "<report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:spam'/>"
        "</item>"
        "<item jid='c@evil.example'/>"
    )
    assert isinstance(event, ReportEvent)
    assert [(i.jid, i.reason) for i in event.items] == [
        ("a@evil.example", "abuse"),
        ("b@evil.example", "spam"),
    ]
    observation = observation_of(event, BOB, NOW)
    records = to_records(event, ALLOW, RecordStatus.DELIVERED, observation)
    assert [r.reported_jid for r in records] == ["a@evil.example", "b@evil.example"]
    assert len({r.record_id for r in records}) == 2
    with pytest.raises(StanzaError):
        to_record(event, ALLOW, RecordStatus.DELIVERED, observation)


def test_plain_block_and_block_pushes_are_not_reports() -> None:
    assert isinstance(block("<item jid='x@evil.example'/>"), Ignored)
    report = (
        "<item jid='x@e.example'>"
        "<report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:spam'/>"
        "</item>"
    )
    assert isinstance(block(report, leg=TO_CLIENT), Ignored)


def test_resent_report_keeps_its_record_id() -> None:
    items = (
        "<item jid='x@e.example'>"
        "<report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:spam'/>"
        "</item>"
    )
    first, again, other = block(items), block(items), block(items, iq_id="blk-2")
    assert isinstance(first, ReportEvent) and isinstance(again, ReportEvent)
    assert isinstance(other, ReportEvent)
    assert dedupe_key(first) == dedupe_key(again) != dedupe_key(other)


# --- roster, bind, subscriptions, MUC joins -----------------------------------------------------

ROSTER_ITEMS = (
    "<item jid='alice@corp.example' subscription='both' name='Alice'><group>Desk</group></item>"
    "<item jid='partner@bank.example' subscription='to'/>"
    "<item jid='new@bank.example' subscription='none' ask='subscribe'/>"
    "<item jid='odd@bank.example' subscription='bogus'/>"
    "<item jid=''/>"
)


def test_roster_result() -> None:
    xml = (
        f"<iq xmlns='jabber:client' type='result' id='r1' to='{BOB}'>"
        f"<query xmlns='jabber:iq:roster' ver='v7'>{ROSTER_ITEMS}</query></iq>"
    )
    event = norm(xml, leg=TO_CLIENT, session=BOB)
    assert event == RosterEvent(
        owner="bob@corp.example",
        items=(
            RosterEntry("alice@corp.example", "both", name="Alice"),
            RosterEntry("partner@bank.example", "to"),
            RosterEntry("new@bank.example", "none", ask=True),
            RosterEntry("odd@bank.example", "none"),
        ),
        is_push=False,
        version="v7",
    )


def test_roster_push_from_own_account_is_trusted_and_others_ignored() -> None:
    def push(sender: str) -> str:
        return (
            f"<iq xmlns='jabber:client' type='set' id='p1' {sender} to='{BOB}'>"
            "<query xmlns='jabber:iq:roster'><item jid='eve@evil.example' subscription='both'/>"
            "</query>"
            "</iq>"
        )

    for trusted in ("", "from='bob@corp.example'"):
        event = norm(push(trusted), leg=TO_CLIENT, session=BOB)
        assert isinstance(event, RosterEvent) and event.is_push
    for forged in ("from='eve@evil.example'", f"from='{BOB_DESK}'"):
        assert isinstance(norm(push(forged), leg=TO_CLIENT, session=BOB), Ignored)
    assert isinstance(norm(push(""), leg=FROM_CLIENT, session=BOB), Ignored)


def test_bind_result() -> None:
    xml = (
        "<iq xmlns='jabber:client' type='result' id='bind_1'>"
        "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>Bob@Corp.Example/phone</jid></bind>"
        "</iq>"
    )
    assert norm(xml, leg=TO_CLIENT, session=None) == BindEvent(jid=BOB, bare="bob@corp.example")
    bad = xml.replace("Bob@Corp.Example/phone", "@@@")
    assert isinstance(norm(bad, leg=TO_CLIENT, session=None), Ignored)


def test_iq_without_id_is_not_given_one() -> None:
    # slixmpp's Iq() writes id='0' into an iq without one unless told it was received.
    xml = "<iq xmlns='jabber:client' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"
    assert isinstance(norm(xml, leg=FROM_CLIENT, session=BOB), Ignored)


def test_subscription_request_from_a_stranger() -> None:
    xml = (
        "<presence xmlns='jabber:client' from='eve@evil.example/x' to='bob@corp.example'"
        " type='subscribe' id='s1'>"
        "<nick xmlns='http://jabber.org/protocol/nick'>Cheap Meds</nick>"
        "<status>Visit pills.example</status><preauth xmlns='urn:xmpp:pars:0' token='t0k'/>"
        "</presence>"
    )
    event = norm(xml, leg=TO_CLIENT, session=BOB)
    assert isinstance(event, SubscriptionEvent)
    assert (event.stanza_type, event.sender, event.recipient) == (
        "subscribe",
        "eve@evil.example",
        "bob@corp.example",
    )
    assert (event.nick, event.status, event.preauth) == ("Cheap Meds", "Visit pills.example", True)
    assert "t0k" not in repr(event)
    record = to_record(event, ALLOW, RecordStatus.HELD, observation_of(event, BOB, NOW))
    assert record.kind is RecordKind.SUBSCRIPTION
    assert (record.body, record.subject, record.status) == (
        "Visit pills.example",
        "Cheap Meds",
        RecordStatus.HELD,
    )
    assert record.observations[0].jid == BOB


def test_subscription_resent_at_each_login_keeps_its_record() -> None:
    xml = (
        "<presence xmlns='jabber:client' from='eve@evil.example' to='bob@corp.example'"
        " type='subscribe'/>"
    )
    a = norm(xml, leg=TO_CLIENT, session=BOB)
    b = norm(xml, leg=TO_CLIENT, session=BOB_DESK, now=NOW + timedelta(hours=2))
    c = norm(xml, leg=TO_CLIENT, session=BOB, now=NOW + timedelta(days=1))
    assert isinstance(a, SubscriptionEvent) and isinstance(b, SubscriptionEvent)
    assert isinstance(c, SubscriptionEvent)
    assert dedupe_key(a) == dedupe_key(b) != dedupe_key(c)


@pytest.mark.parametrize("ptype", ["subscribed", "unsubscribe", "unsubscribed"])
def test_subscription_answers_from_the_client(ptype: str) -> None:
    xml = f"<presence xmlns='jabber:client' to='eve@evil.example' type='{ptype}'/>"
    event = norm(xml, leg=FROM_CLIENT, session=BOB)
    assert isinstance(event, SubscriptionEvent)
    assert (event.stanza_type, event.sender_full, event.recipient) == (
        ptype,
        BOB,
        "eve@evil.example",
    )
    assert observation_of(event, None, NOW).jid == BOB


def test_muc_join_and_confirmation() -> None:
    join = (
        f"<presence xmlns='jabber:client' to='{ROOM}/bobby'>"
        "<x xmlns='http://jabber.org/protocol/muc'><password>p</password></x>"
        "</presence>"
    )
    assert norm(join, leg=FROM_CLIENT, session=BOB) == MucJoinEvent(
        leg=FROM_CLIENT, room=ROOM, nick="bobby", user_jid=BOB
    )
    no_nick = join.replace("/bobby", "")
    assert isinstance(norm(no_nick, leg=FROM_CLIENT, session=BOB), Ignored)
    confirm = (
        f"<presence xmlns='jabber:client' from='{ROOM}/bob' to='{BOB}'>"
        "<x xmlns='http://jabber.org/protocol/muc#user'>"
        "<item affiliation='member' role='participant'/>"
        "<status code='110'/><status code='210'/></x></presence>"
    )
    assert norm(confirm, leg=TO_CLIENT, session=BOB) == MucJoinEvent(
        leg=TO_CLIENT, room=ROOM, nick="bob", user_jid=BOB, confirmed=True
    )
    other = confirm.replace("<status code='110'/>", "")
    assert isinstance(norm(other, leg=TO_CLIENT, session=BOB), Ignored)


# Stanzas read through slixmpp's stanza classes, whose plugins find their language (and with
# it themselves) through a weak reference to the stanza they are in: the reader must keep the
# outer stanza alive while it reads them. Compiled (docs/native.md), a local is dropped after
# its last use, and a report inside an iq with xml:lang came out as "block without a report".
SLIXMPP_READ = {
    "report": (
        "<iq xmlns='jabber:client' type='set' id='b1'><block xmlns='urn:xmpp:blocking'>"
        "<item jid='spam@evil.example'>"
        "<report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:spam'>"
        f"<stanza-id {SID} by='bob@corp.example' id='s-42'/><text>scam</text></report>"
        "</item></block></iq>",
        FROM_CLIENT,
    ),
    "report-0": (
        "<iq xmlns='jabber:client' type='set' id='b2'><block xmlns='urn:xmpp:blocking'>"
        "<item jid='x@evil.example'><report xmlns='urn:xmpp:reporting:0'><abuse/>"
        "<text>go away</text></report></item></block></iq>",
        FROM_CLIENT,
    ),
    "roster": (
        f"<iq xmlns='jabber:client' type='result' id='r1' to='{BOB}'>"
        f"<query xmlns='jabber:iq:roster' ver='v7'>{ROSTER_ITEMS}</query></iq>",
        TO_CLIENT,
    ),
    "bind": (
        "<iq xmlns='jabber:client' type='result' id='bind_1'>"
        f"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>{BOB}</jid></bind></iq>",
        TO_CLIENT,
    ),
    "subscription": (
        "<presence xmlns='jabber:client' from='eve@evil.example/x' to='bob@corp.example'"
        " type='subscribe'><nick xmlns='http://jabber.org/protocol/nick'>Cheap Meds</nick>"
        "<status>Visit pills.example</status></presence>",
        TO_CLIENT,
    ),
    "muc-join": (
        f"<presence xmlns='jabber:client' to='{ROOM}/bobby'>"
        "<x xmlns='http://jabber.org/protocol/muc'/></presence>",
        FROM_CLIENT,
    ),
    "muc-confirm": (
        f"<presence xmlns='jabber:client' from='{ROOM}/bob' to='{BOB}'>"
        "<x xmlns='http://jabber.org/protocol/muc#user'><status code='110'/></x></presence>",
        TO_CLIENT,
    ),
}


@pytest.mark.parametrize("case", list(SLIXMPP_READ))
@pytest.mark.parametrize("lang", ["en", "de-CH"])
def test_a_language_on_the_stanza_changes_nothing_read(case: str, lang: str) -> None:
    xml, leg = SLIXMPP_READ[case]
    plain = norm(xml, leg=leg, session=BOB)
    assert not isinstance(plain, Ignored)
    tagged = xml.replace(" xmlns='jabber:client'", f" xmlns='jabber:client' xml:lang='{lang}'", 1)
    assert repr(norm(tagged, leg=leg, session=BOB)) == repr(plain)


@pytest.mark.parametrize(
    "xml",
    [
        "<presence xmlns='jabber:client'/>",
        "<presence xmlns='jabber:client' type='unavailable'/>",
        "<iq xmlns='jabber:client' type='get' id='1'><query xmlns='jabber:iq:roster'/></iq>",
        "<r xmlns='urn:xmpp:sm:3'/>",
        "<message xmlns='jabber:server' from='a@b' to='c@d'><body>x</body></message>",
        "<message><body>no namespace</body></message>",
    ],
)
def test_everything_else_is_ignored(xml: str) -> None:
    assert isinstance(norm(xml, leg=TO_CLIENT, session=BOB), Ignored)


# --- hostile input ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["@@@", "a@b@c", "user@", "/res", "a@-bad-.example", "x" * 5000])
def test_invalid_jids_degrade_to_raw_text(bad: str) -> None:
    xml = (
        f"<message xmlns='jabber:client' from='{bad}' to='{BOB}' type='chat' id='i'><body>x</body>"
        "</message>"
    )
    event = message(xml, leg=TO_CLIENT, session=BOB)
    assert Anomaly.INVALID_JID in event.anomalies
    assert event.sender_full == bad
    assert dedupe_key(event)  # still has a stable id
    to_record(event, ALLOW, RecordStatus.DELIVERED, observation_of(event, BOB, NOW))


@given(st.text(max_size=80))
def test_jid_parsing_never_raises(text: str) -> None:
    parsed = stanza._jid(text)
    assert parsed.full == (text if not parsed.valid else parsed.full)


def test_reader_failure_degrades_to_an_archivable_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("bug")

    # The source copy: compiled, normalise calls _scan directly, past any monkeypatch.
    pure = interpreted("proxy.stanza")
    monkeypatch.setattr(pure, "_scan", broken)
    event = norm(DELIVERED_TO_BOB, leg=TO_CLIENT, session=BOB, reader=pure.normalise)
    assert event.anomalies == {pure.Anomaly.UNREADABLE}
    assert event.archivable and event.sender_full == ALICE and event.message_id == "m-1"
    assert pure.dedupe_key(event)


def test_private_classes_leave_slixmpp_stanzas_alone() -> None:
    for base in (Iq, Message, Presence):
        registered = base.plugin_attrib_map.values()
        assert not any(plugin.__module__ == stanza_classes.__name__ for plugin in registered)


def test_to_record_refuses_events_that_are_not_archived() -> None:
    # Compiled (mypyc), the argument's type is checked at the call: TypeError before the body.
    with pytest.raises((StanzaError, TypeError)):
        to_records(Ignored("x"), ALLOW, RecordStatus.DELIVERED, None)  # type: ignore[arg-type]


def test_message_record_fields() -> None:
    event = message(DELIVERED_TO_BOB, leg=TO_CLIENT, session=BOB)
    observation = observation_of(event, BOB, NOW)
    record = to_record(event, ALLOW, RecordStatus.DELIVERED, observation)
    assert record.record_id == dedupe_key(event)
    assert record.kind is RecordKind.MESSAGE and record.direction is TO_CLIENT
    assert (record.sender, record.recipient, record.remote_domain) == (
        "alice@corp.example",
        "bob@corp.example",
        "corp.example",
    )
    assert (record.message_id, record.origin_id, record.thread) == ("m-1", "orig-1", "t-7")
    assert record.raw == DELIVERED_TO_BOB.encode()
    assert record.observations == (observation,)
    assert record.client_address == CLIENT
    assert record.occurred_at == NOW


# --- property: garbage never makes normalise raise ----------------------------------------------

NAMESPACES = [
    "jabber:client",
    "urn:xmpp:carbons:2",
    "urn:xmpp:forward:0",
    "urn:xmpp:mam:2",
    "urn:xmpp:delay",
    "urn:xmpp:sid:0",
    "jabber:x:oob",
    "urn:xmpp:reference:0",
    "urn:xmpp:sims:1",
    "urn:xmpp:jingle:apps:file-transfer:5",
    "urn:xmpp:sfs:0",
    "urn:xmpp:file:metadata:0",
    "http://jabber.org/protocol/url-data",
    "urn:xmpp:hashes:2",
    "urn:xmpp:message-correct:0",
    "urn:xmpp:message-retract:1",
    "urn:xmpp:message-retract:0",
    "urn:xmpp:fasten:0",
    "http://jabber.org/protocol/muc#user",
    "http://jabber.org/protocol/muc",
    "jabber:x:conference",
    "eu.siacs.conversations.axolotl",
    "urn:xmpp:omemo:2",
    "urn:xmpp:openpgp:0",
    "urn:xmpp:blocking",
    "urn:xmpp:reporting:1",
    "urn:xmpp:reporting:0",
    "jabber:iq:roster",
    "urn:ietf:params:xml:ns:xmpp-bind",
    "http://jabber.org/protocol/nick",
    "http://jabber.org/protocol/chatstates",
]
NAMES = [
    "message", "presence", "iq", "body", "subject", "thread", "sent", "received", "forwarded",
    "result", "delay", "stanza-id", "origin-id", "x", "url", "reference", "media-sharing", "file",
    "sources", "hash", "size", "name", "media-type", "file-sharing", "url-data", "replace",
    "retract", "apply-to", "invite", "reason", "encrypted", "payload", "openpgp", "block", "item",
    "report", "text", "spam", "abuse", "query", "bind", "jid", "nick", "status", "active",
]  # fmt: skip
ATTRS = [
    "from", "to", "type", "id", "by", "stamp", "jid", "uri", "target", "algo", "reason",
    "subscription", "ask", "name", "ver", "code", "{http://www.w3.org/XML/1998/namespace}lang",
]  # fmt: skip
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "@",
            "a@b@c",
            ALICE,
            BOB,
            "bob@corp.example",
            "corp.example",
            ROOM,
            f"{ROOM}/nick",
            "chat",
            "groupchat",
            "error",
            "subscribe",
            "result",
            "set",
            "2025-01-01T00:00:00Z",
            "9999-99-99T99:99:99Z",
            "9999-12-31T23:59:59-01:00",
            "2026-01-01T10:00:00.123456789+05:30",
            SHA256_B64,
            "sha-256",
            "https://upload.corp.example/a",
            "urn:xmpp:reporting:spam",
            "110",
            "x" * 4000,
        ]
    ),
)


def _element(
    tag: str, attrs: dict[str, str], text: str | None, children: list[ET.Element]
) -> ET.Element:
    element = ET.Element(tag, attrs)
    element.text = text
    element.extend(children)
    return element


TAGS = st.builds(
    lambda ns, name: f"{{{ns}}}{name}", st.sampled_from(NAMESPACES), st.sampled_from(NAMES)
)
LEAVES = st.builds(
    _element,
    TAGS,
    st.dictionaries(st.sampled_from(ATTRS), VALUES, max_size=4),
    st.none() | VALUES,
    st.just([]),
)
TREES = st.recursive(
    LEAVES,
    lambda children: st.builds(
        _element,
        TAGS,
        st.dictionaries(st.sampled_from(ATTRS), VALUES, max_size=4),
        st.none() | VALUES,
        st.lists(children, max_size=5),
    ),
    max_leaves=12,
)
STANZAS = st.builds(
    _element,
    st.sampled_from(["{jabber:client}message", "{jabber:client}presence", "{jabber:client}iq"]),
    st.dictionaries(st.sampled_from(ATTRS), VALUES, max_size=5),
    st.none() | VALUES,
    st.lists(TREES, max_size=5),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    element=STANZAS,
    leg=st.sampled_from(list(Direction)),
    session=st.sampled_from([None, BOB, ALICE, "@@@"]),
)
def test_garbage_never_makes_normalise_raise(
    element: ET.Element, leg: Direction, session: str | None
) -> None:
    before = ET.tostring(element)
    event = normalise(
        element,
        before,
        direction=leg,
        session_jid=session,
        client_address=None,
        now=NOW,
        upload_hosts=UPLOAD,
    )
    assert ET.tostring(element) == before
    if isinstance(event, MessageEvent):
        # The safety net is for bugs; garbage must be handled by the reader itself.
        assert Anomaly.UNREADABLE not in event.anomalies
    if isinstance(event, MessageEvent | SubscriptionEvent | ReportEvent):
        observation = observation_of(event, session, NOW)
        for record in to_records(event, ALLOW, RecordStatus.DELIVERED, observation):
            assert record.record_id == dedupe_key(event) or isinstance(event, ReportEvent)
            record.to_json()


TEMPLATES = [
    SENT_BY_ALICE,
    DELIVERED_TO_BOB,
    carbon("received", "bob@corp.example", BOB, STORED),
    carbon("sent", None, ALICE, STORED),
    mam(None, BOB, "a1", "2026-01-01T12:00:01Z", STORED),
    mam(ROOM, BOB, "r1", "2026-01-01T12:00:01Z", STORED.replace("type='chat'", "type='groupchat'")),
    inner(
        f"from='{ALICE}' to='{BOB}'",
        "<body>https://upload.corp.example/x</body>"
        "<reference xmlns='urn:xmpp:reference:0' type='data'>"
        "<media-sharing xmlns='urn:xmpp:sims:1'>"
        "<file xmlns='urn:xmpp:jingle:apps:file-transfer:5'><size>1</size>"
        f"<hash xmlns='urn:xmpp:hashes:2' algo='sha-256'>{SHA256_B64}</hash></file>"
        "<sources><reference xmlns='urn:xmpp:reference:0' uri='https://upload.corp.example/x'/>"
        "</sources>"
        "</media-sharing></reference>"
        "<x xmlns='http://jabber.org/protocol/muc#user'><invite from='e@x'><reason>r</reason>"
        "</invite>"
        "</x>"
        "<apply-to xmlns='urn:xmpp:fasten:0' id='o'><retract xmlns='urn:xmpp:message-retract:0'/>"
        "</apply-to>"
        f"<delay xmlns='urn:xmpp:delay' from='corp.example' stamp='2026-01-01T00:00:00Z'/>",
    ),
    "<iq xmlns='jabber:client' type='set' id='b'><block xmlns='urn:xmpp:blocking'>"
    "<item jid='x@e.example'>"
    "<report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:spam'>"
    f"<stanza-id {SID} by='bob@corp.example' id='s'/><text>t</text></report></item></block></iq>",
    "<iq xmlns='jabber:client' type='result' id='r'>"
    f"<query xmlns='jabber:iq:roster'>{ROSTER_ITEMS}</query>"
    "</iq>",
    "<iq xmlns='jabber:client' type='result' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
    f"<jid>{BOB}</jid></bind></iq>",
    "<presence xmlns='jabber:client' from='e@x' to='bob@corp.example' type='subscribe'>"
    "<nick xmlns='http://jabber.org/protocol/nick'>n</nick><status>s</status></presence>",
    f"<presence xmlns='jabber:client' from='{ROOM}/b' to='{BOB}'>"
    "<x xmlns='http://jabber.org/protocol/muc#user'>"
    "<status code='110'/></x></presence>",
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    template=st.sampled_from(TEMPLATES),
    data=st.data(),
    leg=st.sampled_from(list(Direction)),
    session=st.sampled_from([None, BOB, ALICE]),
)
def test_mutated_real_stanzas_never_make_normalise_raise(
    template: str, data: st.DataObject, leg: Direction, session: str | None
) -> None:
    root = ET.fromstring(template)
    nodes = list(root.iter())
    for _ in range(data.draw(st.integers(1, 6))):
        node = data.draw(st.sampled_from(nodes))
        action = data.draw(st.sampled_from(["attr", "text", "drop", "dup", "clear"]))
        if action == "attr":
            node.set(data.draw(st.sampled_from(ATTRS)), data.draw(VALUES))
        elif action == "text":
            node.text = data.draw(st.none() | VALUES)
        elif action == "drop" and len(node):
            node.remove(node[data.draw(st.integers(0, len(node) - 1))])
        elif action == "dup" and len(node):
            node.append(node[data.draw(st.integers(0, len(node) - 1))])
        elif action == "clear":
            node.attrib.clear()
    before = ET.tostring(root)
    event = normalise(
        root,
        before,
        direction=leg,
        session_jid=session,
        client_address=None,
        now=NOW,
        upload_hosts=UPLOAD,
    )
    assert ET.tostring(root) == before
    if isinstance(event, MessageEvent):
        assert Anomaly.UNREADABLE not in event.anomalies
    if isinstance(event, MessageEvent | SubscriptionEvent | ReportEvent):
        for record in to_records(
            event, ALLOW, RecordStatus.DELIVERED, observation_of(event, session, NOW)
        ):
            record.to_json()


def test_record_ids_never_change() -> None:
    # Record ids key deduplication across restarts and the indexer's exactly-once writes:
    # a faster way to derive them must give the same ids. Pinned: ASCII parts, non-ASCII
    # JIDs and ids, and a lone surrogate (possible only in events built in code).
    plain = message(
        "<message xmlns='jabber:client' to='bob@corp.example' id='m1' type='chat'>"
        "<body>hello</body></message>",
        leg=FROM_CLIENT,
        session=ALICE,
    )
    accented = message(
        "<message xmlns='jabber:client' to='jürgen@corp.example' id='é1' type='chat'>"
        "<body>grüße</body></message>",
        leg=FROM_CLIENT,
        session=ALICE,
    )
    surrogate = dataclasses.replace(plain, sender="al\ud800ice@corp.example")
    assert dedupe_key(plain) == "837755479e13336e810d101ffb416838"
    assert dedupe_key(accented) == "8da9d9bcb23067739536cdd112c3e7eb"
    assert dedupe_key(surrogate) == "dd93af3ab32a25741a88f3447ab89dd9"
    # Without a record id handed in, the record derives the same one itself.
    observation = observation_of(surrogate, ALICE, NOW)
    record = to_record(surrogate, ALLOW, RecordStatus.DELIVERED, observation)
    assert record.record_id == dedupe_key(surrogate)
