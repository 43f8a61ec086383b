"""Deliveries of plain messages a local client sent: the record id by look-up, not re-reading.

`plain_copy` and `plain_key` (proxy/stanza.py) and the pipeline's `SentPlainMessages`: the
server's delivery of a plain one-to-one message to a local recipient becomes an observation
of the sender's record without a second normalisation. The property that matters: with the
look-up on or off, the pipeline writes the same spool entries and links the same reports.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive_api.store.records import Direction, EntryOp, SpoolEntry
from classifier.clock import ManualClock
from classifier.context import DecisionContext
from classifier.verdict import ALLOW, Verdict
from proxy import pipeline as pipeline_module
from proxy.hook import Decision, SessionInfo
from proxy.pipeline import Pipeline
from proxy.spool import Spool, iter_spool_segments
from proxy.stanza import MessageEvent, dedupe_key, normalise, plain_copy, plain_key
from proxy.stream import Element, Framer, FramingLimits
from tests.conftest import ProxyFactory
from tests.support.native import interpreted

DOMAIN = "corp.example"
TIMEOUT = 10.0
DELAY = "<delay xmlns='urn:xmpp:delay' from='corp.example' stamp='2026-01-01T00:00:00Z'/>"
ALICE = f"alice@{DOMAIN}/laptop"
BOB = f"bob@{DOMAIN}/phone"
UPLOAD = "upload.corp.example"
HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='corp.example' version='1.0'>"
)


def element(xml: str) -> Element:
    framer = Framer(FramingLimits())
    framer.feed(HEADER)
    (frame,) = framer.feed(xml.encode())
    assert isinstance(frame, Element)
    return frame


def tree(xml: str) -> ET.Element:
    return element(xml).tree()


def read(xml: str, leg: Direction) -> MessageEvent:
    """`normalise` as the pipeline calls it: the sender's leg is Alice's, the copy's Bob's."""
    mine = leg is Direction.FROM_CLIENT
    event = normalise(
        tree(xml),
        xml.encode(),
        direction=leg,
        session_jid=ALICE if mine else BOB,
        client_address="192.0.2.1" if mine else "192.0.2.2",
        now=ManualClock().now(),
        upload_hosts=frozenset({UPLOAD}),
    )
    assert isinstance(event, MessageEvent)
    return event


def sent_event(xml: str) -> MessageEvent:
    return read(xml, Direction.FROM_CLIENT)


def copy_event(xml: str) -> MessageEvent:
    return read(xml, Direction.TO_CLIENT)


# -- what counts as plain ---------------------------------------------------------------------

PLAIN_SENT = f"<message to='bob@{DOMAIN}' id='m1' type='chat'><body>hello</body></message>"
PLAIN_COPY = (
    f"<message from='{ALICE}' to='{BOB}' id='m1' type='chat'><body>hello</body>"
    f"<stanza-id xmlns='urn:xmpp:sid:0' by='bob@{DOMAIN}' id='s1'/></message>"
)


def test_a_plain_copy_has_the_key_of_the_message_sent_and_the_same_record() -> None:
    key = plain_key(sent_event(PLAIN_SENT))
    copy = plain_copy(tree(PLAIN_COPY), BOB, ManualClock().now())
    assert key == (f"alice@{DOMAIN}", f"bob@{DOMAIN}", "m1", "hello")
    assert copy is not None and copy.key == key
    assert dedupe_key(sent_event(PLAIN_SENT)) == dedupe_key(copy_event(PLAIN_COPY))
    assert [(ref.id, ref.by) for ref in copy.stanza_ids] == [("s1", f"bob@{DOMAIN}")]


def test_a_stanza_id_claimed_by_someone_else_is_not_believed() -> None:
    xml = PLAIN_COPY.replace(f"by='bob@{DOMAIN}'", "by='mallory@evil.example'")
    copy = plain_copy(tree(xml), BOB, ManualClock().now())
    assert copy is not None and copy.stanza_ids == ()
    assert copy.stanza_ids == copy_event(xml).stanza_ids


@pytest.mark.parametrize(
    "xml",
    [
        # what the content digest covers besides the body
        "<message from='{a}' to='{b}' id='m1'><body>x</body><subject>s</subject></message>",
        "<message from='{a}' to='{b}' id='m1'><body>x</body><body xml:lang='de'>y</body></message>",
        "<message from='{a}' to='{b}' id='m1'><body>x</body>"
        "<replace xmlns='urn:xmpp:message-correct:0' id='m0'/></message>",
        "<message from='{a}' to='{b}' id='m1'><body>x</body>"
        "<retract xmlns='urn:xmpp:message-retract:1' id='m0'/></message>",
        "<message from='{a}' to='{b}' id='m1'><body>x</body>"
        "<x xmlns='jabber:x:oob'><url>https://files.example/a.png</url></x></message>",
        "<message from='{a}' to='{b}' id='m1'><body>x</body>"
        "<x xmlns='jabber:x:conference' jid='room@muc.example'/></message>",
        "<message from='{a}' to='{b}' id='m1'><body>x</body>"
        "<openpgp xmlns='urn:xmpp:openpgp:0'>AAAA</openpgp></message>",
        # history, groupchat, errors, nothing to key on
        "<message from='{a}' to='{b}' id='m1'><body>x</body>" + DELAY + "</message>",
        "<message from='{a}' to='{b}' id='m1' type='groupchat'><body>x</body></message>",
        "<message from='{a}' to='{b}' id='m1' type='error'><body>x</body></message>",
        "<message from='{a}' to='{b}' id='m1' type='headline'><body>x</body></message>",
        "<message from='{a}' to='{b}'><body>x</body></message>",
        "<message from='{a}' to='{b}' id='m1'><body/></message>",
        "<message from='{a}' to='{b}' id='m1'/>",
        # addresses: none, bare (the server on the account's behalf), not a JID
        "<message to='{b}' id='m1'><body>x</body></message>",
        "<message from='alice@@corp.example/x' to='{b}' id='m1'><body>x</body></message>",
        "<message from='{a}' to='bob@@corp.example' id='m1'><body>x</body></message>",
        # a carbon wrapper
        "<message from='bob@corp.example' to='{b}' id='m1'>"
        "<received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
        "<message xmlns='jabber:client' from='{a}' to='bob@corp.example' id='m1'>"
        "<body>x</body></message></forwarded></received></message>",
    ],
)
def test_anything_but_a_plain_delivery_takes_the_ordinary_path(xml: str) -> None:
    assert plain_copy(tree(xml.format(a=ALICE, b=BOB)), BOB, ManualClock().now()) is None


def test_no_bound_session_means_no_look_up() -> None:
    assert plain_copy(tree(PLAIN_COPY), None, ManualClock().now()) is None


@pytest.mark.parametrize(
    "xml",
    [
        f"<message to='bob@{DOMAIN}' id='m1'><body>x</body><subject>s</subject></message>",
        f"<message to='bob@{DOMAIN}'><body>x</body></message>",
        f"<message to='bob@{DOMAIN}' id='m1' type='groupchat'><body>x</body></message>",
        f"<message to='bob@{DOMAIN}' id='m1'><body>{'x' * 4097}</body></message>",
        f"<message to='bob@{DOMAIN}' id='m1'><body>x</body>"
        "<x xmlns='jabber:x:oob'><url>https://files.example/a.png</url></x></message>",
        # a spoofed `from` is an anomaly: never plain
        f"<message from='mallory@{DOMAIN}/x' to='bob@{DOMAIN}' id='m1'><body>x</body></message>",
    ],
)
def test_what_a_client_sends_that_is_not_plain_has_no_key(xml: str) -> None:
    assert plain_key(sent_event(xml)) is None


def test_an_upload_link_in_the_body_is_still_plain() -> None:
    # Upload attachments are derived from the body and left out of the digest.
    url = f"https://{UPLOAD}/abc/cat.png"
    sent = sent_event(f"<message to='bob@{DOMAIN}' id='m1'><body>{url}</body></message>")
    assert [a.source for a in sent.attachments] == ["upload"]
    assert plain_key(sent) == (f"alice@{DOMAIN}", f"bob@{DOMAIN}", "m1", url)


# -- the pipeline, with the look-up on and off -------------------------------------------------


class AllowAll:
    def evaluate(self, ctx: DecisionContext) -> Verdict:
        return ALLOW


@dataclass
class Run:
    pipeline: Pipeline
    spool: Spool
    directory: Path


async def start(
    directory: Path,
    clock: ManualClock,
    *,
    remember: int,
    domain: str = DOMAIN,
    module: ModuleType = pipeline_module,
) -> Run:
    spool = await Spool.open(directory, clock=clock, fsync=False)
    pipeline = module.Pipeline(
        module.PipelineConfig(
            local_domains=frozenset({domain}),
            upload_hosts=frozenset({UPLOAD}),
            sent_plain_messages=remember,
        ),
        decider=AllowAll(),
        spool=spool,
        clock=clock,
    )
    return Run(pipeline, spool, directory)


ALICE_SESSION = SessionInfo("s-alice", "192.0.2.1:5000", DOMAIN, ALICE)
BOB_SESSION = SessionInfo("s-bob", "192.0.2.2:5000", DOMAIN, BOB)
ALICE_SESSION.authenticated = BOB_SESSION.authenticated = True


async def exchange(run: Run, pairs: Sequence[tuple[str, str]]) -> list[Decision]:
    decisions: list[Decision] = []
    for sent, delivered in pairs:
        decisions += await run.pipeline.process(
            ALICE_SESSION, Direction.FROM_CLIENT, [element(sent)]
        )
        decisions += await run.pipeline.process(
            BOB_SESSION, Direction.TO_CLIENT, [element(delivered)]
        )
    await run.spool.flush()
    await run.spool.close()
    return decisions


def written(run: Run) -> list[bytes]:
    return [link.payload for link in iter_spool_segments(run.directory)]


async def test_a_local_conversation_skips_the_second_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    legs: list[Direction] = []
    # The source copy: the compiled pipeline calls normalise directly, past any monkeypatch.
    pure = interpreted("proxy.pipeline")
    real = pure.normalise

    def counting(*args: object, **kwargs: object) -> object:
        legs.append(kwargs["direction"])  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pure, "normalise", counting)
    run = await start(tmp_path / "spool", ManualClock(), remember=16, module=pure)
    await exchange(run, [(PLAIN_SENT, PLAIN_COPY)])
    assert legs == [Direction.FROM_CLIENT]  # the delivery was never normalised
    entries = [SpoolEntry.from_payload(p) for p in written(run)]
    assert [e.op for e in entries] == [EntryOp.RECORD, EntryOp.OBSERVE]
    assert entries[0].record_id == entries[1].record_id
    observation = entries[1].observation
    assert observation is not None and observation.jid == BOB
    # Spam reports naming the stanza-id bob's server gave the copy find the record.
    found = run.pipeline.delivered.find(
        f"bob@{DOMAIN}", f"alice@{DOMAIN}", [("s1", "bob@" + DOMAIN)]
    )
    assert found == [entries[0].record_id]


async def test_a_reused_id_with_another_body_is_a_new_record(tmp_path: Path) -> None:
    run = await start(tmp_path / "spool", ManualClock(), remember=16)
    forged = PLAIN_COPY.replace("hello", "hello, it is me")
    await exchange(run, [(PLAIN_SENT, forged)])
    entries = [SpoolEntry.from_payload(p) for p in written(run)]
    assert [e.op for e in entries] == [EntryOp.RECORD, EntryOp.RECORD]
    assert entries[0].record_id != entries[1].record_id


_BODIES = st.sampled_from(
    ["hello", "hello ", "Hello", "", "?OTR:AAMG", f"see https://{UPLOAD}/k/cat.png", "x" * 4100]
)
_SENT_EXTRAS = st.lists(
    st.sampled_from(
        [
            "<subject>s</subject>",
            "<thread>t1</thread>",
            "<active xmlns='http://jabber.org/protocol/chatstates'/>",
            "<request xmlns='urn:xmpp:receipts'/>",
            "<x xmlns='jabber:x:oob'><url>https://files.example/a.png</url></x>",
            "<replace xmlns='urn:xmpp:message-correct:0' id='m0'/>",
            "<body xml:lang='de'>hallo</body>",
            "<html xmlns='http://jabber.org/protocol/xhtml-im'><body "
            "xmlns='http://www.w3.org/1999/xhtml'>hi</body></html>",
        ]
    ),
    max_size=3,
    unique=True,
)
_COPY_CHANGES = st.lists(
    st.sampled_from(
        [
            "stanza-id",
            "foreign-stanza-id",
            "delay",
            "other-body",
            "bare-to",
            "no-from",
            "upper-case-from",
            "drop-origin-id",
            "groupchat",
            "other-sender",
            "remote-sender",
            "other-recipient",
        ]
    ),
    max_size=3,
    unique=True,
)


@st.composite
def conversations(draw: st.DrawFn) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(1, 5))):
        ident = draw(st.sampled_from(["m1", "m2"]))  # reused ids on purpose
        origin = draw(st.sampled_from([None, "o1", "o2"]))
        body = draw(_BODIES)
        mtype = draw(st.sampled_from([None, "chat", "normal"]))
        extras = "".join(draw(_SENT_EXTRAS))
        changes = set(draw(_COPY_CHANGES))
        type_attr = f" type='{mtype}'" if mtype else ""
        origin_el = f"<origin-id xmlns='urn:xmpp:sid:0' id='{origin}'/>" if origin else ""
        body_el = f"<body>{body}</body>" if body else "<body/>"
        sent = f"<message to='bob@{DOMAIN}' id='{ident}'{type_attr}>{body_el}{origin_el}{extras}"
        sent += "</message>"

        sender = "carol@corp.example/pc" if "other-sender" in changes else ALICE
        if "upper-case-from" in changes:
            sender = "Alice@Corp.Example/laptop"
        if "remote-sender" in changes:
            sender = "alice@elsewhere.example/laptop"
        to = f"bob@{DOMAIN}" if "bare-to" in changes else BOB
        if "other-recipient" in changes:
            to = f"dave@{DOMAIN}/pc"
        from_attr = "" if "no-from" in changes else f" from='{sender}'"
        copy_type = " type='groupchat'" if "groupchat" in changes else type_attr
        copy_body = "<body>other</body>" if "other-body" in changes else body_el
        copy_origin = "" if "drop-origin-id" in changes else origin_el
        more = ""
        if "stanza-id" in changes:
            more += f"<stanza-id xmlns='urn:xmpp:sid:0' by='bob@{DOMAIN}' id='s-{ident}'/>"
        if "foreign-stanza-id" in changes:
            more += "<stanza-id xmlns='urn:xmpp:sid:0' by='evil.example' id='x'/>"
        if "delay" in changes:
            more += (
                "<delay xmlns='urn:xmpp:delay' from='corp.example' stamp='2026-01-01T00:00:00Z'/>"
            )
        copy = (
            f"<message{from_attr} to='{to}' id='{ident}'{copy_type}>{copy_body}{copy_origin}"
            f"{extras}{more}</message>"
        )
        pairs.append((sent, copy))
    return pairs


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(pairs=conversations())
async def test_the_look_up_changes_nothing_the_pipeline_writes(
    tmp_path_factory: pytest.TempPathFactory, pairs: list[tuple[str, str]]
) -> None:
    base = tmp_path_factory.mktemp("plain")
    with_look_up = await start(base / "on", ManualClock(), remember=4096)
    without = await start(base / "off", ManualClock(), remember=0)
    assert await exchange(with_look_up, pairs) == await exchange(without, pairs)
    assert written(with_look_up) == written(without)
    assert with_look_up.pipeline.delivered._keys == without.pipeline.delivered._keys
    assert not without.pipeline.sent_plain._ids  # nothing remembered: the ordinary path only


# -- through a real Prosody, real clients ------------------------------------------------------


async def test_through_prosody_the_recipients_copy_is_an_observation_by_look_up(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    clock = ManualClock()
    run = await start(tmp_path / "spool", clock, remember=4096, domain="localhost")
    running = await proxy_factory(run.pipeline)
    alice = running.client("alice", resource="laptop")
    bob = running.client("bob", resource="desk")
    await alice.connect()
    await bob.connect()
    plain_id = alice.send_chat("bob@localhost", "plain words")
    await bob.next_message(TIMEOUT, where=lambda m: m.body == "plain words")
    subject = ET.Element("{jabber:client}subject")
    subject.text = "about"
    alice.send_chat("bob@localhost", "with a subject", payload=[subject])
    await bob.next_message(TIMEOUT, where=lambda m: m.body == "with a subject")
    await run.spool.flush()

    # Only the plain message's copy was found by look-up; the other took the ordinary path.
    assert run.pipeline.plain_copies_observed == 1
    entries = [SpoolEntry.from_payload(link.payload) for link in iter_spool_segments(run.directory)]
    by_record: dict[str, list[tuple[EntryOp, str | None]]] = {}
    for entry in entries:
        jid = entry.observation.jid if entry.observation is not None else None
        if entry.record is not None and entry.record.observations:
            jid = entry.record.observations[0].jid
        by_record.setdefault(entry.record_id, []).append((entry.op, jid))
    records = {e.record.body: e.record for e in entries if e.record is not None and e.record.body}
    plain = records["plain words"]
    assert plain.message_id == plain_id
    assert by_record[plain.record_id] == [
        (EntryOp.RECORD, "alice@localhost/laptop"),
        (EntryOp.OBSERVE, "bob@localhost/desk"),
    ]
    assert by_record[records["with a subject"].record_id] == [
        (EntryOp.RECORD, "alice@localhost/laptop"),
        (EntryOp.OBSERVE, "bob@localhost/desk"),
    ]
