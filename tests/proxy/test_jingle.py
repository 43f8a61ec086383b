"""Calls, whiteboards and file transfers: reading Jingle, SI and IBB iqs, their records, the
pipeline's decisions on them and the read-time fold into one event."""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from archive_api.store.exchanges import fold_exchanges
from archive_api.store.records import (
    ArchiveRecord,
    Direction,
    EntryOp,
    ExchangeDetails,
    RecordKind,
    RecordStatus,
    SpoolEntry,
)
from classifier.clock import ManualClock
from classifier.context import DecisionContext, StanzaKind
from classifier.policy import PolicyHolder, parse_policy
from classifier.verdict import ALLOW, Action, Reason, Verdict
from proxy.hook import DecisionKind, SessionInfo
from proxy.jingle import Exchange, ExchangeEvent, read_exchange
from proxy.pipeline import Pipeline, PipelineConfig
from proxy.stanza import Ignored
from tests.proxy.test_attachments import stanza
from tests.proxy.test_stanza import ALICE, NOW, norm
from tests.proxy.test_trust import MemorySpool

JINGLE = "urn:xmpp:jingle:1"
RTP = "urn:xmpp:jingle:apps:rtp:1"
FT = "urn:xmpp:jingle:apps:file-transfer:5"
BOB_REMOTE = "bob@partner.example/phone"
PDF_SHA = hashlib.sha256(b"%PDF-1.7 quarterly").digest()


def jingle(action: str, body: str = "", *, sid: str | None = "s1", to: str = BOB_REMOTE) -> str:
    sid_attr = f" sid='{sid}'" if sid is not None else ""
    return (
        f"<iq xmlns='jabber:client' type='set' id='j-{action}' to='{to}'>"
        f"<jingle xmlns='{JINGLE}' action='{action}'{sid_attr} initiator='{ALICE}'>"
        f"{body}</jingle></iq>"
    )


def rtp(*media: str) -> str:
    return "".join(
        f"<content creator='initiator' name='{m}'><description xmlns='{RTP}' media='{m}'/>"
        "</content>"
        for m in media
    )


def file_offer(name: str = "report.pdf", size: str = "18", digest: bytes = PDF_SHA) -> str:
    encoded = base64.b64encode(digest).decode()
    return (
        f"<content creator='initiator' name='f'><description xmlns='{FT}'><file>"
        f"<media-type>application/pdf</media-type><name>{name}</name><size>{size}</size>"
        f"<desc>Q3 numbers</desc><hash xmlns='urn:xmpp:hashes:2' algo='sha-256'>{encoded}</hash>"
        "</file></description></content>"
    )


def si_offer(sid: str = "si1", size: str = "1022") -> str:
    return (
        f"<iq xmlns='jabber:client' type='set' id='si' to='{BOB_REMOTE}'>"
        f"<si xmlns='http://jabber.org/protocol/si' id='{sid}' mime-type='text/plain' "
        "profile='http://jabber.org/protocol/si/profile/file-transfer'>"
        "<file xmlns='http://jabber.org/protocol/si/profile/file-transfer' name='test.txt' "
        f"size='{size}' hash='552da749930852c69ae5d2141d3766b1'><desc>notes</desc></file>"
        "</si></iq>"
    )


def ibb(payload: str, iq_id: str = "i1") -> str:
    return f"<iq xmlns='jabber:client' type='set' id='{iq_id}' to='{BOB_REMOTE}'>{payload}</iq>"


def ibb_data(seq: int, data: bytes, sid: str = "b1") -> str:
    encoded = base64.b64encode(data).decode()
    return ibb(
        f"<data xmlns='http://jabber.org/protocol/ibb' sid='{sid}' seq='{seq}'>{encoded}</data>",
        iq_id=f"d{seq}",
    )


def read(xml: str) -> ExchangeEvent:
    event = norm(xml, leg=Direction.FROM_CLIENT, session=ALICE)
    assert isinstance(event, ExchangeEvent), event
    return event


def exchange_of(xml: str) -> Exchange:
    return read(xml).exchange


# --- reading ---------------------------------------------------------------------------------


def test_an_audio_video_call_offer() -> None:
    event = read(jingle("session-initiate", rtp("audio", "video")))
    ex = event.exchange
    assert (ex.protocol, ex.action, ex.sid, ex.media) == (
        "jingle",
        "session-initiate",
        "s1",
        ("audio", "video"),
    )
    assert ex.initiator == ALICE and ex.kind is RecordKind.CALL and ex.opens
    assert (event.sender, event.sender_full) == ("alice@corp.example", ALICE)
    assert (event.recipient, event.iq_id) == ("bob@partner.example", "j-session-initiate")
    assert ex.problems == frozenset()


def test_accept_and_terminate_with_a_reason() -> None:
    assert exchange_of(jingle("session-accept", rtp("audio"))).action == "session-accept"
    ended = exchange_of(
        jingle(
            "session-terminate",
            f"<reason xmlns='{JINGLE}'><success/><text>bye now</text></reason>",
        )
    )
    assert (ended.reason, ended.reason_text, ended.media) == ("success", "bye now", ())
    declined = exchange_of(jingle("session-terminate", "<reason><decline/></reason>"))
    assert declined.reason == "decline"  # the Jingle namespace is inherited
    foreign = exchange_of(jingle("session-terminate", "<reason xmlns='urn:x'><busy/></reason>"))
    assert foreign.reason is None  # a <reason/> in another namespace is not Jingle's


def test_a_jingle_file_offer_keeps_name_size_type_and_hash() -> None:
    ex = exchange_of(jingle("session-initiate", file_offer()))
    assert ex.kind is RecordKind.FILE and ex.media == ("file",)
    (offer,) = ex.files
    assert (offer.name, offer.size, offer.media_type, offer.description) == (
        "report.pdf",
        18,
        "application/pdf",
        "Q3 numbers",
    )
    assert offer.sha256_hex == PDF_SHA.hex()


def test_older_file_transfer_namespaces_and_other_hashes() -> None:
    body = file_offer().replace(FT, "urn:xmpp:jingle:apps:file-transfer:4")
    body = body.replace("algo='sha-256'", "algo='sha3-256'")
    (offer,) = exchange_of(jingle("session-initiate", body)).files
    assert offer.name == "report.pdf" and offer.sha256_hex is None
    assert offer.hashes == (("sha3-256", base64.b64encode(PDF_SHA).decode()),)


@pytest.mark.parametrize("namespace", ["urn:xmpp:sxe:0", "urn:example:whiteboard:1"])
def test_a_whiteboard_session_is_a_call_with_whiteboard_media(namespace: str) -> None:
    body = f"<content creator='initiator' name='wb'><description xmlns='{namespace}'/></content>"
    ex = exchange_of(jingle("session-initiate", body))
    assert ex.media == ("whiteboard",) and ex.kind is RecordKind.CALL


def test_unknown_applications_are_other() -> None:
    body = "<content name='x'><description xmlns='urn:example:game'/></content>" + rtp("text")
    assert exchange_of(jingle("session-initiate", body)).media == ("other",)


def test_an_si_file_offer() -> None:
    ex = exchange_of(si_offer())
    assert (ex.protocol, ex.action, ex.sid, ex.kind) == ("si", "offer", "si1", RecordKind.FILE)
    (offer,) = ex.files
    assert (offer.name, offer.size, offer.media_type, offer.description) == (
        "test.txt",
        1022,
        "text/plain",
        "notes",
    )
    assert offer.hashes == (("md5", "552da749930852c69ae5d2141d3766b1"),)


def test_ibb_open_data_and_close() -> None:
    opened = exchange_of(
        ibb("<open xmlns='http://jabber.org/protocol/ibb' sid='b1' block-size='4096'/>")
    )
    assert (opened.action, opened.block_size, opened.kind) == ("open", 4096, RecordKind.FILE)
    data = exchange_of(ibb_data(0, b"hello bytes"))
    assert (data.action, data.seq, data.data, data.kind) == (
        "data",
        0,
        b"hello bytes",
        RecordKind.FILE_DATA,
    )
    closed = exchange_of(ibb("<close xmlns='http://jabber.org/protocol/ibb' sid='b1'/>"))
    assert closed.action == "close" and not closed.opens


def test_results_errors_and_other_iqs_are_not_exchanges() -> None:
    result = f"<iq xmlns='jabber:client' type='result' id='x'><jingle xmlns='{JINGLE}'/></iq>"
    assert isinstance(norm(result, leg=Direction.TO_CLIENT, session=ALICE), Ignored)
    ping = "<iq xmlns='jabber:client' type='set' id='p'><ping xmlns='urn:xmpp:ping'/></iq>"
    assert isinstance(norm(ping, leg=Direction.FROM_CLIENT, session=ALICE), Ignored)


def test_an_incoming_offer_is_from_the_remote_party() -> None:
    xml = jingle("session-initiate", rtp("audio"), to=ALICE).replace(
        "type='set'", f"type='set' from='{BOB_REMOTE}'"
    )
    event = norm(xml, leg=Direction.TO_CLIENT, session=ALICE)
    assert isinstance(event, ExchangeEvent)
    assert (event.sender, event.recipient_full) == ("bob@partner.example", ALICE)


# --- malformed and hostile -------------------------------------------------------------------


def test_missing_sid_and_action_are_problems_not_failures() -> None:
    ex = exchange_of(jingle("session-initiate", rtp("audio"), sid=None).replace("action=", "x="))
    assert (ex.sid, ex.action) == ("", "unknown")
    assert ex.problems == {"missing-sid", "missing-action"}
    assert exchange_of(ibb("<close xmlns='http://jabber.org/protocol/ibb'/>")).problems == {
        "missing-sid"
    }


@pytest.mark.parametrize(
    "size", ["99999999999999999999999", "-1", "1e9", "²", "", "9223372036854775808"]
)
def test_bogus_sizes_are_dropped(size: str) -> None:
    ex = exchange_of(jingle("session-initiate", file_offer(size=size)))
    assert ex.files[0].size is None
    assert "bad-size" in ex.problems
    assert exchange_of(si_offer(size=size)).files[0].size is None


def test_the_largest_legal_size_is_kept() -> None:
    (offer,) = exchange_of(jingle("session-initiate", file_offer(size=str(2**63 - 1)))).files
    assert offer.size == 2**63 - 1


def test_bogus_base64_and_hashes() -> None:
    bad = ibb("<data xmlns='http://jabber.org/protocol/ibb' sid='b1' seq='70000'>@@not*</data>")
    ex = exchange_of(bad)
    assert ex.data is None and ex.seq is None and ex.problems == {"bad-base64", "bad-seq"}
    (offer,) = exchange_of(jingle("session-initiate", file_offer(digest=b"short"))).files
    assert offer.sha256_hex is None


def test_ten_thousand_contents_are_read_only_up_to_the_cap_and_flagged() -> None:
    # The file offer after 10,000 audio contents is never reached: reading stops at 32.
    ex = exchange_of(jingle("session-initiate", rtp("audio") * 10_000 + file_offer()))
    assert ex.media == ("audio",) and ex.files == ()
    assert "too-many-contents" in ex.problems


def test_long_texts_and_sids_are_capped() -> None:
    long_name = "n" * 50_000
    ex = exchange_of(jingle("session-initiate", file_offer(name=long_name), sid="s" * 5000))
    assert len(ex.sid) == 256 and "long-sid" in ex.problems
    assert ex.files[0].name is not None and len(ex.files[0].name) == 1024


def test_read_exchange_ignores_a_payload_buried_deep() -> None:
    iq = ET.fromstring(
        "<iq xmlns='jabber:client' type='set'>"
        + "<x xmlns='urn:example'/>" * 5
        + f"<jingle xmlns='{JINGLE}' action='session-initiate' sid='s'/></iq>"
    )
    assert read_exchange(iq) is None


# --- records -----------------------------------------------------------------------------


def test_details_round_trip_and_other_records_are_unchanged() -> None:
    details = ExchangeDetails(
        protocol="jingle",
        action="session-terminate",
        sid="s1",
        media=("audio",),
        reason="success",
        started_at=NOW,
        accepted_at=NOW + timedelta(seconds=5),
        duration_seconds=60.0,
        hashes=(("sha-256", "abc="),),
    )
    record = ArchiveRecord("r", RecordKind.CALL, NOW, Direction.FROM_CLIENT, exchange=details)
    assert ArchiveRecord.from_json(record.to_json()) == record
    plain = ArchiveRecord("m", RecordKind.MESSAGE, NOW, Direction.FROM_CLIENT, body="hi")
    assert "exchange" not in plain.to_json()  # older records keep their exact bytes and hash


# --- the pipeline --------------------------------------------------------------------------


@dataclass
class DenyDomain:
    """Refuses calls with one remote domain, as the federation rule would; records contexts."""

    domain: str = "denied.example"
    action: Action = Action.REJECT
    contexts: list[DecisionContext] = field(default_factory=list)

    def evaluate(self, ctx: DecisionContext) -> Verdict:
        self.contexts.append(ctx)
        if self.domain in (ctx.recipient.rpartition("@")[2], ctx.sender.rpartition("@")[2]):
            reason = Reason("federation", f"federation with {self.domain} is not allowed")
            return Verdict(self.action, 1.0, (reason,))
        return ALLOW


SESSION = SessionInfo("s1", "192.0.2.1", "corp.example", ALICE)


def make_pipeline(
    decider: DenyDomain, clock: ManualClock, **config: int
) -> tuple[Pipeline, MemorySpool]:
    spool = MemorySpool()
    pipeline = Pipeline(
        PipelineConfig(local_domains=frozenset({"corp.example"}), **config),  # type: ignore[arg-type]
        decider=decider,
        spool=spool,
        clock=clock,
    )
    return pipeline, spool


def records_of(spool: MemorySpool) -> list[ArchiveRecord]:
    return [e.record for e in spool.entries if e.op is EntryOp.RECORD and e.record is not None]


async def send(
    pipeline: Pipeline, xml: str, leg: Direction = Direction.FROM_CLIENT
) -> DecisionKind:
    (decision,) = await pipeline.process(SESSION, leg, [stanza(xml)])
    return decision.kind


async def test_a_call_is_decided_once_and_folds_into_one_event_with_its_duration() -> None:
    clock = ManualClock(NOW)
    decider = DenyDomain()
    pipeline, spool = make_pipeline(decider, clock)
    assert (
        await send(pipeline, jingle("session-initiate", rtp("audio", "video"))) is DecisionKind.PASS
    )
    clock.advance(3)
    transport = jingle("transport-info", "<content name='audio'/>")
    assert await send(pipeline, transport) is DecisionKind.PASS  # passes, not archived
    assert (
        await send(pipeline, jingle("session-accept", rtp("audio", "video"))) is DecisionKind.PASS
    )
    clock.advance(125)
    terminate = jingle("session-terminate", f"<reason xmlns='{JINGLE}'><success/></reason>")
    assert await send(pipeline, terminate) is DecisionKind.PASS
    assert [c.kind for c in decider.contexts] == [StanzaKind.CALL]  # once per session
    records = records_of(spool)
    assert [r.stanza_type for r in records] == [
        "session-initiate",
        "session-accept",
        "session-terminate",
    ]
    assert {r.kind for r in records} == {RecordKind.CALL}
    assert {r.thread for r in records} == {"s1"}
    last = records[-1].exchange
    assert last is not None and last.duration_seconds == 125.0
    assert last.started_at == NOW and last.accepted_at == NOW + timedelta(seconds=3)
    ((_, event),) = fold_exchanges(records).items()
    assert (event.kind, event.media, event.outcome, event.duration_seconds) == (
        "call",
        ("audio", "video"),
        "success",
        125.0,
    )
    assert (event.initiator, event.responder) == ("alice@corp.example", "bob@partner.example")
    # A retry of the terminate (same id) is an observation, not a second record.
    await send(pipeline, terminate)
    assert len(records_of(spool)) == 3


@pytest.mark.parametrize("action", [Action.REJECT, Action.QUARANTINE, Action.DROP])
async def test_a_call_to_a_denied_domain_is_answered_with_an_iq_error(action: Action) -> None:
    pipeline, spool = make_pipeline(DenyDomain(action=action), ManualClock(NOW))
    offer = jingle("session-initiate", rtp("audio"), to="mallory@denied.example/x")
    (decision,) = await pipeline.process(SESSION, Direction.FROM_CLIENT, [stanza(offer)])
    assert decision.kind is DecisionKind.DROP
    (bounce,) = decision.inject_to_client
    error = ET.fromstring(bounce)
    assert (error.tag, error.get("type"), error.get("id")) == (
        "{jabber:client}iq",
        "error",
        "j-session-initiate",
    )
    condition = "service-unavailable" if action is Action.DROP else "policy-violation"
    assert error.find(f".//{{urn:ietf:params:xml:ns:xmpp-stanzas}}{condition}") is not None
    (record,) = records_of(spool)
    assert record.status is not RecordStatus.DELIVERED and record.kind is RecordKind.CALL
    # Every later step of the refused session is refused as well, archived or not.
    later = jingle("transport-info", "", to="mallory@denied.example/x")
    assert await send(pipeline, later) is DecisionKind.DROP


async def test_an_incoming_call_from_a_denied_domain_is_refused_towards_the_server() -> None:
    pipeline, _ = make_pipeline(DenyDomain(), ManualClock(NOW))
    offer = jingle("session-initiate", rtp("audio"), to=ALICE).replace(
        "type='set'", "type='set' from='eve@denied.example/x'"
    )
    (decision,) = await pipeline.process(SESSION, Direction.TO_CLIENT, [stanza(offer)])
    assert decision.kind is DecisionKind.DROP and decision.inject_to_client == ()
    (bounce,) = decision.inject_to_server
    error = ET.fromstring(bounce)
    assert (error.get("to"), error.get("type")) == ("eve@denied.example/x", "error")
    assert b"policy-violation" in bounce


async def test_ibb_bytes_are_archived_up_to_the_limit_then_only_hashed() -> None:
    pipeline, spool = make_pipeline(DenyDomain(), ManualClock(NOW), ibb_archive_max_bytes=10)
    await send(
        pipeline, ibb("<open xmlns='http://jabber.org/protocol/ibb' sid='b1' block-size='8'/>")
    )
    blocks = [b"12345678", b"ab", b"overflow", b"x"]
    for seq, block in enumerate(blocks):
        assert await send(pipeline, ibb_data(seq, block)) is DecisionKind.PASS
    await send(pipeline, ibb("<close xmlns='http://jabber.org/protocol/ibb' sid='b1'/>", "c"))
    records = records_of(spool)
    data = [r for r in records if r.kind is RecordKind.FILE_DATA]
    kept = [r.exchange.data_archived for r in data if r.exchange]
    assert kept == [True, True, False, False]
    assert [bool(r.raw) for r in data] == [True, True, False, False]
    assert all(
        r.exchange and r.exchange.data_sha256 == hashlib.sha256(b).hexdigest()
        for r, b in zip(data, blocks, strict=True)
    )
    close = records[-1].exchange
    assert close is not None and close.data_size == sum(map(len, blocks))
    assert close.data_sha256 == hashlib.sha256(b"".join(blocks)).hexdigest()
    assert close.data_archived is False
    ((_, event),) = fold_exchanges(records).items()
    assert (event.kind, event.data_size, event.data_archived) == ("file", 19, False)


async def test_a_file_offer_record_carries_the_file_as_an_attachment() -> None:
    pipeline, spool = make_pipeline(DenyDomain(), ManualClock(NOW))
    await send(pipeline, jingle("session-initiate", file_offer()))
    (record,) = records_of(spool)
    assert record.kind is RecordKind.FILE
    (attachment,) = record.attachments
    assert (attachment.name, attachment.size, attachment.sha256, attachment.source) == (
        "report.pdf",
        18,
        PDF_SHA.hex(),
        "jingle",
    )
    assert record.body is not None and "report.pdf" in record.body
    assert (
        SpoolEntry.from_payload(SpoolEntry(EntryOp.RECORD, "x", record).payload()).record == record
    )


async def test_a_bogus_ibb_block_is_archived_with_its_stanza() -> None:
    pipeline, spool = make_pipeline(DenyDomain(), ManualClock(NOW))
    bad = ibb("<data xmlns='http://jabber.org/protocol/ibb' sid='b9' seq='0'>!!!</data>")
    assert await send(pipeline, bad) is DecisionKind.PASS
    (record,) = records_of(spool)
    assert record.raw and record.exchange is not None and record.exchange.data_sha256 is None


BARRIER_POLICY = """
version = 1
local_domains = ["corp.example"]
[groups.research]
members = ["alice@corp.example"]
[groups.traders]
members = ["tom@corp.example"]
[[barriers]]
between = ["research", "traders"]
reason = "Research and trading are separated"
[federation]
mode = "deny"
domains = ["denied.example"]
"""


@pytest.mark.parametrize(
    ("to", "refused_because"),
    [
        ("tom@corp.example/desk", "Research and trading are separated"),
        ("mallory@denied.example/x", "denied.example"),
        ("bob@partner.example/phone", None),
    ],
)
async def test_the_real_policy_governs_file_offers_and_ibb(
    to: str, refused_because: str | None
) -> None:
    holder = PolicyHolder(parse_policy(BARRIER_POLICY))
    spool = MemorySpool()
    pipeline = Pipeline(
        PipelineConfig(local_domains=frozenset({"corp.example"})),
        decider=holder,
        spool=spool,
        clock=ManualClock(NOW),
    )
    for xml in (
        si_offer().replace(BOB_REMOTE, to),
        ibb("<open xmlns='http://jabber.org/protocol/ibb' sid='b1' block-size='8'/>").replace(
            BOB_REMOTE, to
        ),
        jingle("session-initiate", file_offer(), to=to),
    ):
        (decision,) = await pipeline.process(SESSION, Direction.FROM_CLIENT, [stanza(xml)])
        if refused_because is None:
            assert decision.kind is DecisionKind.PASS
            continue
        assert decision.kind is DecisionKind.DROP
        (bounce,) = decision.inject_to_client
        assert b"policy-violation" in bounce and refused_because.encode() in bounce
    statuses = {r.status for r in records_of(spool)}
    assert statuses == {
        RecordStatus.DELIVERED if refused_because is None else RecordStatus.REJECTED
    }
