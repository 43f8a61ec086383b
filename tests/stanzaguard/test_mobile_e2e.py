"""Issue 8: a Conversations-style phone keeps working through the whole archiving service.

Real Prosody with ``mod_csi_simple`` (Client State Indication, XEP-0352) and
``mod_cloud_notify`` (push, XEP-0357), the archiving service in front of it, and a phone
played by the raw client (it must lose its TCP connection without a close, and count
XEP-0198 stanzas itself):

- CSI ``<inactive/>``/``<active/>`` pass the proxy untouched and do not move any `h`; while
  inactive the server holds unimportant stanzas (a chat state) until a message with a body
  comes, and stamps what it held with a delay from the user's own JID;
- push registration (``<enable/>``/``<disable/>`` iqs) passes; while the phone is detached
  the server sends its push to the app server (a second account plays it);
- a burst of messages while the connection is cut and resumed on a new TCP connection:
  each message is handled once, and each is one record in the archive, although Prosody
  sends the unacknowledged ones again after the resumption.
"""

from __future__ import annotations

import asyncio
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Literal

import pytest

from archive_api.store.records import ArchiveRecord, Direction
from tests.conftest import ProsodyFactory
from tests.stanzaguard.conftest import ArchivingFactory, ArchivingProxy
from tests.support.prosody import ProsodyConfig, ProsodyServer
from tests.support.proxy import wait_until
from tests.support.rawxmpp import CLIENT_NS, SM_NS, RawXmppClient, SmCounters, local

pytestmark = pytest.mark.integration

CSI_NS = "urn:xmpp:csi:0"
PUSH_NS = "urn:xmpp:push:0"
PUBSUB_NS = "http://jabber.org/protocol/pubsub"
DATA_FORMS_NS = "jabber:x:data"
CHATSTATES_NS = "http://jabber.org/protocol/chatstates"
DELAY_NS = "urn:xmpp:delay"
PHONE = "carol@localhost/phone"
APP_SERVER = "bob@localhost/push-app-server"


@pytest.fixture
def prosody(prosody_factory: ProsodyFactory) -> ProsodyServer:
    """The suite's Prosody plus what a mobile client leans on (both ship for Prosody 0.12)."""
    return prosody_factory(
        ProsodyConfig(extra_modules=("csi_simple", "cloud_notify"), log_level="debug")
    )


def no_ack_trouble(prosody: ProsodyServer) -> None:
    log = prosody.log_text()
    for complaint in ("acknowledged more stanzas", "The client says it handled", "less stanzas"):
        assert complaint not in log, prosody.diagnostics()


async def phone_through(running: ArchivingProxy, prosody: ProsodyServer) -> RawXmppClient:
    phone = RawXmppClient(running.host, running.port, prosody.domain)
    assert await phone.login("carol", prosody.users["carol"], resource="phone") == PHONE
    await phone.presence()
    return phone


async def resume_on_new_connection(
    running: ArchivingProxy, prosody: ProsodyServer, sm: SmCounters, h: int
) -> RawXmppClient:
    """A new TCP connection (another local port), TLS, SASL and ``<resume/>``."""
    assert sm.sm_id
    new = RawXmppClient(running.host, running.port, prosody.domain)
    await new.connect()
    await new.starttls()
    await new.open_stream()
    await new.auth_plain("carol", prosody.users["carol"])
    new.sm = sm
    sm.inbound = h  # what it handled; anything after that is the server's to resend
    await new.resume(sm.sm_id, h)
    return new


async def indicate(
    phone: RawXmppClient, prosody: ProsodyServer, state: Literal["active", "inactive"]
) -> None:
    """CSI ``<active/>`` or ``<inactive/>`` (a nonza: not counted by SM), waited for until the
    server has acted on it.

    Another client's stanza travels on another connection, so without the wait it can reach
    the server first and be delivered at once. Prosody logs a stanza it received and then
    handles it before it reads anything else, so the log line is proof enough; an
    ``<r/>`` would not do, since its ``<a/>`` is what makes the server flush the phone.
    """
    logged = f"Received[c2s]: <{state} "
    seen = prosody.log_text().count(logged)
    phone.send(f"<{state} xmlns='{CSI_NS}'/>".encode())
    await wait_until(lambda: prosody.log_text().count(logged) > seen)


def chat_state(to: str, msg_id: str) -> str:
    return (
        f"<message to='{to}' type='chat' id='{msg_id}'>"
        f"<composing xmlns='{CHATSTATES_NS}'/></message>"
    )


def held_by_csi(message: ET.Element) -> bool:
    """mod_csi_simple stamps what it held back with a delay from the user's own bare JID."""
    return any(d.get("from") == "carol@localhost" for d in message.iter(f"{{{DELAY_NS}}}delay"))


async def chat_records(running: ArchivingProxy) -> list[ArchiveRecord]:
    await running.drain()
    page = await running.store.search("type:chat", limit=1000)
    assert page.next_cursor is None
    return [hit.record for hit in page.hits]


async def iq_answer(client: RawXmppClient, iq_id: str) -> ET.Element:
    return await client.wait_for(lambda e: e.tag == f"{{{CLIENT_NS}}}iq" and e.get("id") == iq_id)


# -- Client State Indication ----------------------------------------------------------------------


async def test_csi_passes_and_the_server_holds_unimportant_stanzas_while_inactive(
    prosody: ProsodyServer, archiving: ArchivingProxy
) -> None:
    bob = archiving.client("bob", resource="desk")
    await bob.connect()
    phone = await phone_through(archiving, prosody)
    try:
        assert phone.features is not None
        assert phone.features.find(f"{{{CSI_NS}}}csi") is not None  # the proxy kept the feature
        sm = await phone.enable_sm()
        await indicate(phone, prosody, "inactive")
        bob.send_raw(chat_state(PHONE, "typing-1"))
        body_id = bob.send_chat(PHONE, "a message with a body wakes the phone")
        typing, message = await phone.messages(2)
        # The chat state waited for the message (it carries the hold's delay), in order.
        assert (typing.get("id"), message.get("id")) == ("typing-1", body_id)
        assert held_by_csi(typing) and not held_by_csi(message)

        await indicate(phone, prosody, "active")
        bob.send_raw(chat_state(PHONE, "typing-2"))
        [typing] = await phone.messages(1)
        assert typing.get("id") == "typing-2" and not held_by_csi(typing)

        # Counts on both sides still agree: CSI moved no h.
        own_id = phone.send_message(bob.jid, "from the phone")
        assert await phone.request_ack() == sm.outbound == 1
        phone.send(f"<a xmlns='{SM_NS}' h='{sm.inbound}'/>".encode())
        assert sm.inbound == 3
        assert (await bob.next_message()).body == "from the phone"
    finally:
        await phone.close()
    ids = Counter(r.message_id for r in await chat_records(archiving))
    assert (ids[body_id], ids[own_id]) == (1, 1)
    log = prosody.log_text()
    assert "Holding buffer" in log and "Flushing buffer (body" in log, prosody.diagnostics()
    no_ack_trouble(prosody)


# -- push (XEP-0357) -----------------------------------------------------------------------------


async def test_push_registration_passes_and_a_detached_phone_gets_a_push(
    prosody: ProsodyServer, archiving: ArchivingProxy
) -> None:
    app_server = RawXmppClient(prosody.host, prosody.c2s_port, prosody.domain)
    assert (
        await app_server.login("bob", prosody.users["bob"], resource="push-app-server")
        == APP_SERVER
    )
    alice = archiving.client("alice", resource="desk")
    await alice.connect()
    node = f"node-{uuid.uuid4().hex[:10]}"
    phone = await phone_through(archiving, prosody)
    sm = await phone.enable_sm()
    assert sm.sm_id
    phone.send_stanza(
        f"<iq type='set' id='push-on'><enable xmlns='{PUSH_NS}' jid='{APP_SERVER}' "
        f"node='{node}'/></iq>".encode()
    )
    assert (await iq_answer(phone, "push-on")).get("type") == "result"
    h = sm.inbound
    # Acknowledged everything: the server has nothing queued when the phone drops, so the
    # push below is for the message that arrives while it is detached.
    phone.send(f"<a xmlns='{SM_NS}' h='{h}'/>".encode())
    await phone.drain()
    await wait_until(lambda: "#queue = 0" in prosody.log_text())
    phone.abort()  # the network is gone; the server keeps the session (hibernation)
    await wait_until(lambda: not archiving.service.proxy.sessions_of("carol@localhost"))

    message_id = alice.send_chat(PHONE, "while the phone sleeps")
    push = await app_server.wait_for(
        lambda e: e.tag == f"{{{CLIENT_NS}}}iq" and e.get("type") == "set", timeout=15
    )
    publish = push.find(f"{{{PUBSUB_NS}}}pubsub/{{{PUBSUB_NS}}}publish")
    assert publish is not None and publish.get("node") == node, ET.tostring(push)
    assert push.get("from") == prosody.domain  # mod_cloud_notify pushes as the host
    summary = {
        field.get("var"): field.findtext(f"{{{DATA_FORMS_NS}}}value")
        for field in publish.iter(f"{{{DATA_FORMS_NS}}}field")
    }
    assert summary.get("FORM_TYPE") == "urn:xmpp:push:summary" and "message-count" in summary
    assert "while the phone sleeps" not in ET.tostring(push, encoding="unicode")  # no body
    app_server.send(f"<iq type='result' id='{push.get('id')}' to='{push.get('from')}'/>".encode())

    resumed = await resume_on_new_connection(archiving, prosody, sm, h)
    try:
        [message] = await resumed.messages(1)
        assert message.get("id") == message_id
        resumed.send_stanza(
            f"<iq type='set' id='push-off'><disable xmlns='{PUSH_NS}' jid='{APP_SERVER}' "
            f"node='{node}'/></iq>".encode()
        )
        assert (await iq_answer(resumed, "push-off")).get("type") == "result"
        assert await resumed.request_ack() == sm.outbound == 2
    finally:
        await resumed.close()
        await app_server.close()
    records = await chat_records(archiving)
    assert [r.message_id for r in records].count(message_id) == 1
    no_ack_trouble(prosody)


# -- the phone that loses its connection in the middle of a burst ---------------------------------


async def test_a_phone_cut_off_mid_burst_resumes_without_loss_or_duplicates(
    prosody: ProsodyServer, archiving: ArchivingProxy
) -> None:
    alice = archiving.client("alice", resource="desk")
    await alice.connect()
    phone = await phone_through(archiving, prosody)
    sm = await phone.enable_sm()
    total = 40
    sent: list[str] = []

    async def burst() -> None:
        for n in range(total):
            sent.append(alice.send_chat(PHONE, f"burst {n:02d} {uuid.uuid4().hex[:6]}"))
            await asyncio.sleep(0.01)

    sender = asyncio.create_task(burst())
    handled: list[str] = []
    while len(handled) < 10:
        handled += [m.get("id", "") for m in await phone.messages(1)]
    own = [phone.send_message("alice@localhost", f"mine {n}") for n in range(3)]
    await phone.drain()
    h = sm.inbound
    # Three more reach the phone, but it dies before it handles (or acknowledges) them: the
    # server has them unacknowledged and sends them again after the resumption, through the
    # proxy a second time. (Without counters the raw client neither counts nor answers <r/>.)
    phone.sm = None
    await phone.messages(3)
    phone.abort()  # no </stream:stream>, no TLS close: the socket is just gone
    await wait_until(lambda: not archiving.service.proxy.sessions_of("carol@localhost"))
    await sender  # the rest of the burst arrives while the phone is detached

    resumed = await resume_on_new_connection(archiving, prosody, sm, h)
    try:
        while len(handled) < total:
            handled += [m.get("id", "") for m in await resumed.messages(1)]
        alice.send_chat(PHONE, "the end")
        [last] = await resumed.messages(1)
        assert last.findtext(f"{{{CLIENT_NS}}}body") == "the end"  # nothing else queued
        assert Counter(handled) == Counter(sent)  # each exactly once, across both connections
        assert await resumed.request_ack() == sm.outbound == 3
    finally:
        await resumed.close()
    got = await alice.ids_until(own)
    assert sorted(i for i in got if i in own) == sorted(own)

    records = await chat_records(archiving)
    ids = Counter(r.message_id for r in records)
    assert all(ids[i] == 1 for i in [*sent, *own]), {i: ids[i] for i in [*sent, *own]}
    resent = [r for r in records if r.message_id in sent[10:13]]
    assert len(resent) == 3
    for record in resent:
        # Sent to the phone twice (the copy lost in the crash, the one after the resumption):
        # one record, whose delivered-to list names the phone; each sighting is kept with
        # its time, which is what the proxy saw.
        to_phone = [o for o in record.observations if o.direction == Direction.TO_CLIENT]
        assert {o.jid for o in to_phone} == {PHONE}, record.observations
    no_ack_trouble(prosody)


async def test_odd_csi_nonzas_pass_and_cost_no_stanza_count(
    prosody: ProsodyServer, archiving_factory: ArchivingFactory
) -> None:
    """CSI with stray attributes and children, and a flood of them, is the server's business:
    the proxy relays them as they are, counts none of them, and the stream carries on."""
    running = await archiving_factory()
    phone = await phone_through(running, prosody)
    try:
        sm = await phone.enable_sm()
        phone.send(f"<inactive xmlns='{CSI_NS}' x='&amp;&lt;'><junk/></inactive>".encode())
        phone.send(f"<active xmlns='{CSI_NS}'/>".encode() * 200)
        assert await phone.request_ack() == sm.outbound == 0
        echo = phone.send_message(PHONE, "to myself")
        [message] = await phone.messages(1)
        assert message.get("id") == echo
        assert await phone.request_ack() == sm.outbound == 1
        assert not [e for e in phone.inbox if local(e.tag)[0] != SM_NS]
    finally:
        await phone.close()
    no_ack_trouble(prosody)
