"""Calls and file transfers end to end: real Prosody, the `ArchivingService` in front of it, two
slixmpp clients sending raw Jingle, SI and IBB iqs through the proxy, and the API beside it.

A call (initiate → accept → terminate) is archived as three linked steps the conversation view
folds into one event with its duration; a call to a domain the federation policy denies is
answered with an iq error by the proxy (Prosody, with no s2s, would say
remote-server-not-found instead); a file offer is found with `type:file`; an in-band transfer
keeps its bytes in the archive.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import xml.etree.ElementTree as ET

import httpx
from slixmpp.stanza import Iq
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatcherId, MatchXPath
from slixmpp.xmlstream.stanzabase import StanzaBase

from archive_api.auth import AuthMethod, Identity, Role
from archive_api.store.records import RecordKind
from stanzaguard.api_wiring import start_beside
from tests.stanzaguard.conftest import ArchivingFactory
from tests.support.clients import ChatClient

TIMEOUT = 10.0
JINGLE = "urn:xmpp:jingle:1"
IBB = "http://jabber.org/protocol/ibb"
SI = "http://jabber.org/protocol/si"
POLICY = (
    'version = 1\nlocal_domains = ["localhost"]\n'
    '[federation]\nmode = "deny"\ndomains = ["denied.example"]\naction = "reject"\n'
)
OPERATOR = Identity("cli:tester", "tester", Role.ADMIN, AuthMethod.CLI)
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answer_sessions(client: ChatClient) -> None:
    """Answer Jingle, SI and IBB sets with a result, as a real client would accept them."""

    def answer(stanza: StanzaBase) -> None:
        assert isinstance(stanza, Iq)
        stanza.reply(clear=True).send()  # type: ignore[no-untyped-call]

    for name, namespace, tag in (("jingle", JINGLE, "jingle"), ("si", SI, "si")):
        matcher = MatchXPath(f"{{jabber:client}}iq/{{{namespace}}}{tag}")
        client.xmpp.register_handler(Callback(f"test-{name}", matcher, answer))
    for tag in ("open", "data", "close"):
        matcher = MatchXPath(f"{{jabber:client}}iq/{{{IBB}}}{tag}")
        client.xmpp.register_handler(Callback(f"test-ibb-{tag}", matcher, answer))


async def send_set(client: ChatClient, to: str, payload: str) -> ET.Element:
    """Send an iq-set and return the reply as XML (result or error).

    Not `Iq.send()`: slixmpp's `IqError` refuses `policy-violation`, a condition its error
    stanza predates (RFC 6120), and the reply would be lost in a callback.
    """
    iq = client.xmpp.make_iq_set(ito=to)
    iq.xml.append(ET.fromstring(payload))
    reply: asyncio.Future[ET.Element] = asyncio.get_running_loop().create_future()

    def got(stanza: StanzaBase) -> None:
        if not reply.done():
            reply.set_result(stanza.xml)

    ident = iq["id"]
    client.xmpp.register_handler(Callback(f"reply-{ident}", MatcherId(ident), got, once=True))
    client.xmpp.send_raw(str(iq))
    return await asyncio.wait_for(reply, TIMEOUT)


async def accepted(client: ChatClient, to: str, payload: str) -> None:
    answer = await send_set(client, to, payload)
    assert answer.get("type") == "result", ET.tostring(answer)


def jingle(action: str, sid: str, initiator: str, body: str = "") -> str:
    return (
        f"<jingle xmlns='{JINGLE}' action='{action}' sid='{sid}' initiator='{initiator}'>"
        f"{body}</jingle>"
    )


AUDIO = (
    "<content creator='initiator' name='voice'>"
    "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></content>"
)
FILE_BYTES = b"quarterly numbers, do not forward"
FILE_OFFER = (
    "<content creator='initiator' name='f'>"
    "<description xmlns='urn:xmpp:jingle:apps:file-transfer:5'><file>"
    "<name>quarterly-report.pdf</name><size>33</size>"
    "<hash xmlns='urn:xmpp:hashes:2' algo='sha-256'>"
    f"{base64.b64encode(hashlib.sha256(FILE_BYTES).digest()).decode()}</hash>"
    "</file></description></content>"
)


async def test_calls_and_transfers_are_archived_governed_and_searchable(
    archiving_factory: ArchivingFactory,
) -> None:
    running = await archiving_factory(policy=POLICY, api_listen=f"127.0.0.1:{free_port()}")
    alice = running.client("alice")
    bob = running.client("bob")
    await alice.connect()
    await bob.connect()
    answer_sessions(alice)
    answer_sessions(bob)

    # A call: initiate (alice), accept (bob), terminate (alice).
    await accepted(alice, bob.jid, jingle("session-initiate", "call-1", alice.jid, AUDIO))
    await accepted(bob, alice.jid, jingle("session-accept", "call-1", alice.jid, AUDIO))
    ended = "<reason><success/><text>thanks</text></reason>"
    await accepted(alice, bob.jid, jingle("session-terminate", "call-1", alice.jid, ended))

    # A call to a denied domain: refused by the proxy with an iq error, nothing forwarded.
    refused = await send_set(
        alice, "mallory@denied.example/x", jingle("session-initiate", "c2", alice.jid, AUDIO)
    )
    assert refused.get("type") == "error", ET.tostring(refused)
    error = refused.find("{jabber:client}error")
    assert error is not None
    assert error.find(f"{{{STANZAS_NS}}}policy-violation") is not None, ET.tostring(refused)
    assert "denied.example" in (error.findtext(f"{{{STANZAS_NS}}}text") or "")
    # Prosody never saw it: it would have tried (and logged) an s2s connection to the domain.
    assert "denied.example" not in running.prosody.log_text()

    # A Jingle file offer and an in-band transfer of its bytes.
    await accepted(alice, bob.jid, jingle("session-initiate", "ft-1", alice.jid, FILE_OFFER))
    await accepted(alice, bob.jid, f"<open xmlns='{IBB}' sid='ibb-1' block-size='16'/>")
    blocks = [FILE_BYTES[:16], FILE_BYTES[16:32], FILE_BYTES[32:]]
    for seq, block in enumerate(blocks):
        data = base64.b64encode(block).decode()
        await accepted(alice, bob.jid, f"<data xmlns='{IBB}' sid='ibb-1' seq='{seq}'>{data}</data>")
    await accepted(alice, bob.jid, f"<close xmlns='{IBB}' sid='ibb-1'/>")

    await running.drain()
    store = running.store
    calls = (await store.search("type:call from:alice@localhost")).hits
    assert {h.record.stanza_type for h in calls} >= {"session-initiate", "session-terminate"}
    refused_call = [h.record for h in calls if h.record.recipient == "mallory@denied.example"]
    assert [r.status.value for r in refused_call] == ["rejected"]
    data_records = (await store.search("with:bob@localhost")).hits
    blocks_seen = [h.record for h in data_records if h.record.kind is RecordKind.FILE_DATA]
    assert len(blocks_seen) == 3 and all(r.raw for r in blocks_seen)
    assert (await store.verify()).ok

    api = await start_beside(running.service.settings, running.service)
    assert api is not None
    try:
        context = api.service.context
        secret = (await context.tokens.create(OPERATOR, name="o1", role=Role.OFFICER)).secret
        host, port = api.address
        headers = {"Authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", headers=headers) as web:
            found = await web.get("/api/v1/search", params={"q": "type:file quarterly"})
            assert found.status_code == 200, found.text
            hits = found.json()["hits"]
            assert [h["type"] for h in hits] == ["file"] and hits[0]["attachments"] == 1
            conversation = await web.get(
                "/api/v1/conversations", params={"with": ["alice@localhost", "bob@localhost"]}
            )
            assert conversation.status_code == 200, conversation.text
            events = {
                item["exchange"]["sid"]: item["exchange"]
                for item in conversation.json()["records"]
                if "exchange" in item
            }
            assert set(events) == {"call-1", "ft-1", "ibb-1"}
            call = events["call-1"]
            assert (call["kind"], call["media"], call["outcome"]) == ("call", ["audio"], "success")
            assert call["duration_seconds"] is not None and call["duration_seconds"] >= 0
            assert len(call["record_ids"]) == 3  # three steps, one event
            offer = events["ft-1"]["files"][0]
            assert (offer["name"], offer["size"]) == ("quarterly-report.pdf", 33)
            assert offer["sha256"] == hashlib.sha256(FILE_BYTES).hexdigest()
            transfer = events["ibb-1"]
            assert transfer["data_size"] == len(FILE_BYTES) and transfer["data_archived"] is True
            assert transfer["data_sha256"] == hashlib.sha256(FILE_BYTES).hexdigest()
    finally:
        await api.stop()
