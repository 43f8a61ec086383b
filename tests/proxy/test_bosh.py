"""The BOSH front end (XEP-0124/0206) in front of a real Prosody, through the real C2SProxy.

A raw BOSH client (tests/support/webxmpp.py, httpx) chats with a slixmpp TCP client through
the same proxy; the hook sees its stanzas like TCP ones. Hostile requests get the XEP-0124
terminal condition and end only their own session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from archive_api.store.records import Direction
from proxy.bosh import BoshConfig, BoshFrontEnd
from proxy.stream import FramingLimits
from tests.conftest import ProxyFactory
from tests.support.prosody import ProsodyServer
from tests.support.proxy import RecordingHook, RunningProxy, proxy_tls_context, wait_until
from tests.support.webxmpp import (
    BOSH_NS,
    CLIENT_NS,
    SASL_NS,
    BoshXmppClient,
    bind_request,
    bound_jid,
    chat,
    plain_auth,
)

pytestmark = pytest.mark.integration

MAX_STANZA_BYTES = 16 * 1024
INACTIVITY = 2


@dataclass
class BoshSetup:
    running: RunningProxy
    prosody: ProsodyServer
    front: BoshFrontEnd
    url: str

    def client(self) -> BoshXmppClient:
        client = BoshXmppClient(self.url, self.prosody.domain)
        self.clients.append(client)
        return client

    def __post_init__(self) -> None:
        self.clients: list[BoshXmppClient] = []


@pytest.fixture
async def bosh(prosody: ProsodyServer, proxy_factory: ProxyFactory) -> AsyncIterator[BoshSetup]:
    running = await proxy_factory(limits=FramingLimits(max_stanza_bytes=MAX_STANZA_BYTES))
    front = BoshFrontEnd(
        running.proxy,
        BoshConfig(tls=proxy_tls_context(prosody.tls), max_wait=2, inactivity=INACTIVITY),
    )
    host, port = await front.start("127.0.0.1", 0)
    setup = BoshSetup(running, prosody, front, f"https://{host}:{port}/http-bind")
    yield setup
    for client in setup.clients:
        await client.close()
    await front.stop()


async def test_bosh_client_and_tcp_client_chat_both_ways(bosh: BoshSetup) -> None:
    bob = bosh.running.client("bob", resource="tcp")
    await bob.connect()
    alice = bosh.client()
    created = await alice.create(ack="1")
    assert created.status == 200, created.text
    body = created.body
    assert body is not None and body.get("sid") and body.get("requests") == "2"
    assert body.get("{urn:xmpp:xbosh}version") == "1.0" and body.get("authid")
    assert body.get("inactivity") == str(INACTIVITY)
    assert body.get("ack") == str(alice.rid)  # acknowledgements were asked for (ack='1')
    features = await alice.features()
    assert all("starttls" not in child.tag for child in features)

    jid = await _finish_login(alice, "alice", bosh)
    assert jid == "alice@localhost/bosh"

    await alice.send(chat(bob.jid, "hello over bosh"))
    received = await bob.next_message(where=lambda m: m.body == "hello over bosh")
    assert received.from_ == "alice@localhost/bosh"

    bob.send_chat("alice@localhost/bosh", "hello from tcp")
    message = await alice.wait_for(
        lambda e: (
            e.tag == f"{{{CLIENT_NS}}}message"
            and e.findtext(f"{{{CLIENT_NS}}}body") == "hello from tcp"
        )
    )
    assert message.get("from", "").startswith("bob@localhost")

    hook = bosh.running.hook
    assert isinstance(hook, RecordingHook)
    sent = hook.stanzas(Direction.FROM_CLIENT, b"hello over bosh")
    assert len(sent) == 1 and sent[0].bound_jid == "alice@localhost/bosh"

    ended = await alice.send(
        f"<presence xmlns='{CLIENT_NS}' type='unavailable'/>", type="terminate"
    )
    assert ended.terminated and ended.condition is None
    await wait_until(lambda: bosh.running.sessions_of("alice@localhost") == [])
    assert bosh.front.sessions == {}


async def _finish_login(client: BoshXmppClient, user: str, bosh: BoshSetup) -> str:
    await client.send(plain_auth(user, bosh.prosody.users[user]))
    await client.wait_for(lambda e: e.tag == f"{{{SASL_NS}}}success")
    await client.send(to=bosh.prosody.domain, xmpp__restart="true")
    await client.features()
    await client.send(bind_request("bosh"))
    jid = bound_jid(await client.wait_for(lambda e: e.get("id") == "bind-1"))
    await client.send(f"<presence xmlns='{CLIENT_NS}'/>")
    return jid


async def test_requests_are_processed_in_rid_order(bosh: BoshSetup) -> None:
    bob = bosh.running.client("bob", resource="tcp")
    await bob.connect()
    alice = bosh.client()
    await alice.login("alice", bosh.prosody.users["alice"])
    first, second = alice.next_rid(), alice.next_rid()
    # The later rid is sent first; it must wait for the earlier one.
    late = asyncio.create_task(alice.post(alice.wrap(chat(bob.jid, "second"), rid=second)))
    await asyncio.sleep(0.2)
    assert not late.done()
    early = await alice.post(alice.wrap(chat(bob.jid, "first"), rid=first))
    assert early.status == 200 and not early.terminated
    assert (await late).status == 200
    got = [(await bob.next_message(where=lambda m: m.body in ("first", "second"))).body]
    got.append((await bob.next_message(where=lambda m: m.body in ("first", "second"))).body)
    assert got == ["first", "second"]


async def test_repeated_rid_gets_the_same_response(bosh: BoshSetup) -> None:
    alice = bosh.client()
    await alice.login("alice", bosh.prosody.users["alice"])
    rid = alice.next_rid()
    payload = f"<iq xmlns='{CLIENT_NS}' type='get' id='ping-1'><ping xmlns='urn:xmpp:ping'/></iq>"
    first = await alice.post(alice.wrap(payload, rid=rid))
    again = await alice.post(alice.wrap(payload, rid=rid))
    assert again.text == first.text and again.status == 200
    hook = bosh.running.hook
    assert isinstance(hook, RecordingHook)
    assert len(hook.stanzas(Direction.FROM_CLIENT, b"ping-1")) == 1


@pytest.mark.parametrize(
    ("body", "status", "condition"),
    [
        (b"not xml at all", 400, "bad-request"),
        (b"<body xmlns='jabber:client' rid='1'/>", 400, "bad-request"),
        (b"<body xmlns='" + BOSH_NS.encode() + b"' rid='1'><unclosed></body>", 400, "bad-request"),
        (b"<!DOCTYPE body [<!ENTITY x 'y'>]><body/>", 400, "bad-request"),
        (b"<body xmlns='" + BOSH_NS.encode() + b"' rid='-1'/>", 200, "bad-request"),
        (b"<body xmlns='" + BOSH_NS.encode() + b"' rid='99999999999999999'/>", 200, "bad-request"),
        (b"<body xmlns='" + BOSH_NS.encode() + b"' rid='5' sid='nope'/>", 404, "item-not-found"),
        # A session request without xmpp:version is not XEP-0206.
        (
            b"<body xmlns='" + BOSH_NS.encode() + b"' rid='5' to='localhost' wait='5' hold='1'/>",
            200,
            "bad-request",
        ),
        (
            b"<body xmlns='" + BOSH_NS.encode() + b"' xmlns:xmpp='urn:xmpp:xbosh' rid='5' "
            b"to='elsewhere.example' xmpp:version='1.0'/>",
            200,
            "host-unknown",
        ),
    ],
)
async def test_hostile_requests(bosh: BoshSetup, body: bytes, status: int, condition: str) -> None:
    client = bosh.client()
    reply = await client.post(body)
    assert reply.status == status, reply.text
    assert reply.terminated and reply.condition == condition
    assert bosh.front.sessions == {}


async def test_oversized_body_is_refused(bosh: BoshSetup) -> None:
    client = bosh.client()
    await client.create()
    reply = await client.send(chat("bob@localhost", "x" * (4 * MAX_STANZA_BYTES)))
    assert reply.status == 413 and reply.terminated


async def test_stanza_over_the_limit_in_a_body_under_it_is_refused(bosh: BoshSetup) -> None:
    client = bosh.client()
    await client.create()
    reply = await client.send(chat("bob@localhost", "x" * (MAX_STANZA_BYTES + 1024)))
    assert reply.status == 400 and reply.condition == "policy-violation"


async def test_rid_outside_the_window_ends_the_session(bosh: BoshSetup) -> None:
    client = bosh.client()
    await client.create()
    reply = await client.post(client.wrap(rid=client.rid + 10))
    assert reply.terminated and reply.condition == "item-not-found"
    assert bosh.front.sessions == {}
    after = await client.send()
    assert after.status == 404 and after.condition == "item-not-found"


async def test_too_many_simultaneous_requests_is_a_policy_violation(bosh: BoshSetup) -> None:
    client = bosh.client()
    await client.create()
    await client.features()
    base = client.rid
    held = asyncio.create_task(client.post(client.wrap(rid=base + 1)))  # held: nothing to say
    early = asyncio.create_task(client.post(client.wrap(rid=base + 3)))  # waits for base + 2
    await asyncio.sleep(0.2)
    assert not held.done() and not early.done()
    third = await client.post(client.wrap(rid=base + 4))
    assert third.terminated and third.condition == "policy-violation"
    assert (await held).terminated and (await early).terminated
    assert bosh.front.sessions == {}


async def test_inactivity_ends_the_session(bosh: BoshSetup) -> None:
    client = bosh.client()
    await client.login("carol", bosh.prosody.users["carol"])
    assert bosh.running.sessions_of("carol@localhost")
    await wait_until(lambda: bosh.front.sessions == {}, timeout=INACTIVITY * 5)
    await wait_until(lambda: bosh.running.sessions_of("carol@localhost") == [])
    reply = await client.send()
    assert reply.condition == "item-not-found"


async def test_malformed_child_ends_nothing_but_that_request(bosh: BoshSetup) -> None:
    alice = bosh.client()
    await alice.login("alice", bosh.prosody.users["alice"])
    bad = await alice.post(alice.wrap("<message xmlns='jabber:client'><body>x</body>"))
    assert bad.status == 400 and bad.condition == "bad-request"
    # The rid was not consumed; the session goes on with the same one.
    alice.rid -= 1
    ok = await alice.send(chat("bob@localhost", "fine"))
    assert ok.status == 200 and not ok.terminated


async def test_polling_keeps_the_session_past_the_idle_timeout(
    prosody: ProsodyServer, proxy_factory: ProxyFactory
) -> None:
    """Empty polls carry no bytes to the session; the front end must tell its idle timer."""
    running = await proxy_factory(idle_timeout=3.0)
    front = BoshFrontEnd(running.proxy, BoshConfig(tls=proxy_tls_context(prosody.tls), max_wait=1))
    host, port = await front.start("127.0.0.1", 0)
    client = BoshXmppClient(f"https://{host}:{port}/http-bind", prosody.domain)
    try:
        await client.login("alice", prosody.users["alice"])
        loop = asyncio.get_running_loop()
        until = loop.time() + 8.0  # well past idle_timeout
        while loop.time() < until:
            reply = await client.send()
            assert reply.status == 200 and not reply.terminated, reply.text
        assert len(running.sessions_of("alice@localhost")) == 1
    finally:
        await client.close()
        await front.stop()
