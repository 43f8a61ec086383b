"""The WebSocket front end (RFC 7395) in front of a real Prosody, through the real C2SProxy.

A raw WebSocket client (tests/support/webxmpp.py) chats with a slixmpp TCP client through
the same proxy: the hook sees the web client's stanzas exactly as it sees TCP ones. Hostile
frames end only the offending connection, with the stream error RFC 7395 says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from xml.etree import ElementTree as ET

import pytest
from websockets.exceptions import InvalidStatus

from archive_api.store.records import Direction
from proxy.stream import FramingLimits
from proxy.websocket import WebSocketConfig, WebSocketFrontEnd
from tests.conftest import ProxyFactory
from tests.support.prosody import ProsodyServer
from tests.support.proxy import RecordingHook, RunningProxy, proxy_tls_context, wait_until
from tests.support.webxmpp import (
    FRAMING_NS,
    STREAM_NS,
    WsXmppClient,
    chat,
    stream_error_condition,
)

pytestmark = pytest.mark.integration

MAX_STANZA_BYTES = 16 * 1024


@dataclass
class WebSetup:
    running: RunningProxy
    prosody: ProsodyServer
    url: str

    def client(self) -> WsXmppClient:
        return WsXmppClient(self.url, self.prosody.domain)


@pytest.fixture
async def web(prosody: ProsodyServer, proxy_factory: ProxyFactory) -> AsyncIterator[WebSetup]:
    running = await proxy_factory(limits=FramingLimits(max_stanza_bytes=MAX_STANZA_BYTES))
    front = WebSocketFrontEnd(running.proxy, WebSocketConfig(tls=proxy_tls_context(prosody.tls)))
    host, port = await front.start("127.0.0.1", 0)
    yield WebSetup(running, prosody, f"wss://{host}:{port}/xmpp-websocket")
    await front.stop()


async def test_web_client_and_tcp_client_chat_both_ways(web: WebSetup) -> None:
    bob = web.running.client("bob", resource="tcp")
    await bob.connect()
    alice = web.client()
    await alice.connect()
    try:
        jid = await alice.login("alice", web.prosody.users["alice"], resource="web")
        assert jid == "alice@localhost/web"
        # No STARTTLS is offered to the web client: the WebSocket is the TLS layer.
        assert not any("starttls" in frame for frame in alice.frames)

        await alice.send(chat(bob.jid, "hello from the browser", id="m1"))
        received = await bob.next_message(where=lambda m: m.body == "hello from the browser")
        assert received.from_.startswith("alice@localhost/web")

        bob.send_chat("alice@localhost/web", "hello from tcp")
        message = await alice.wait_for(
            lambda e: (
                e.tag == "{jabber:client}message"
                and e.findtext("{jabber:client}body") == "hello from tcp"
            )
        )
        assert message.get("from", "").startswith("bob@localhost")

        hook = web.running.hook
        assert isinstance(hook, RecordingHook)
        sent = hook.stanzas(Direction.FROM_CLIENT, b"hello from the browser")
        assert len(sent) == 1 and sent[0].bound_jid == "alice@localhost/web"
        assert len(hook.stanzas(Direction.TO_CLIENT, b"hello from tcp")) >= 1

        # Every frame the client got is a standalone document in the right namespace.
        await alice.send(f"<close xmlns='{FRAMING_NS}'/>")
        assert await alice.close_code() == 1000
        assert alice.frames[-1] == f"<close xmlns='{FRAMING_NS}'/>"
    finally:
        await alice.close()
    await wait_until(lambda: web.running.sessions_of("alice@localhost") == [])


async def test_features_frame_declares_the_stream_namespace(web: WebSetup) -> None:
    client = web.client()
    await client.connect()
    try:
        features = await client.open()
        assert features.tag == f"{{{STREAM_NS}}}features"
        assert "xmlns:stream=" in client.frames[1]
        assert client.frames[0].startswith(f"<open xmlns='{FRAMING_NS}'")
    finally:
        await client.close()


async def test_wrong_path_and_missing_subprotocol_are_refused(web: WebSetup) -> None:
    client = WsXmppClient(web.url.replace("/xmpp-websocket", "/other"), web.prosody.domain)
    with pytest.raises(InvalidStatus) as wrong_path:
        await client.connect()
    assert wrong_path.value.response.status_code == 404

    for offered in ([], ["chat"]):
        client = web.client()
        with pytest.raises(InvalidStatus) as refused:
            await client.connect(subprotocols=offered)
        assert refused.value.response.status_code == 400


async def expect_stream_error(client: WsXmppClient, condition: str) -> None:
    code = await client.close_code()
    assert code == 1000
    errors = [f for f in client.frames if f.startswith("<stream:error")]
    assert errors, client.frames
    assert stream_error_condition(ET.fromstring(errors[-1])) == condition
    assert client.frames[-1] == f"<close xmlns='{FRAMING_NS}'/>"


@pytest.mark.parametrize(
    ("frame", "condition"),
    [
        (b"\x00\x01binary", "unsupported-encoding"),
        ("<message xmlns='jabber:client'><body>x</body></message>", "invalid-namespace"),
        ("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost'", "not-well-formed"),
        ("<a xmlns='x'/><b xmlns='x'/>", "not-well-formed"),
        # Inside the stream a DTD cannot even appear where XML allows one.
        ("<!DOCTYPE x [<!ENTITY e 'e'>]><x/>", "not-well-formed"),
        ("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='&e;'/>", "not-well-formed"),
        ("<?pi x?><open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>", "restricted-xml"),
        ("<!-- hi --><open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>", "restricted-xml"),
        ("just text", "not-well-formed"),
    ],
)
async def test_hostile_first_frames(web: WebSetup, frame: str | bytes, condition: str) -> None:
    client = web.client()
    await client.connect()
    try:
        await client.send(frame)
        await expect_stream_error(client, condition)
        # The front end's own <open/> comes first, so the error is in a stream.
        assert client.frames[0].startswith(f"<open xmlns='{FRAMING_NS}'")
    finally:
        await client.close()


async def test_two_elements_in_one_frame_after_login(web: WebSetup) -> None:
    client = web.client()
    await client.connect()
    try:
        await client.login("carol", web.prosody.users["carol"])
        await client.send(chat("bob@localhost", "one") + chat("bob@localhost", "two"))
        await expect_stream_error(client, "not-well-formed")
    finally:
        await client.close()
    await wait_until(lambda: web.running.sessions_of("carol@localhost") == [])
    hook = web.running.hook
    assert isinstance(hook, RecordingHook)
    assert hook.stanzas(Direction.FROM_CLIENT, b"<body>one</body>") == []


async def test_unknown_domain_gets_host_unknown(web: WebSetup) -> None:
    client = WsXmppClient(web.url, "elsewhere.example")
    await client.connect()
    try:
        await client.send(f"<open xmlns='{FRAMING_NS}' to='elsewhere.example' version='1.0'/>")
        await expect_stream_error(client, "host-unknown")
    finally:
        await client.close()


async def test_oversized_frame_closes_with_1009(web: WebSetup) -> None:
    client = web.client()
    await client.connect()
    try:
        await client.open()
        await client.send("<message xmlns='jabber:client'><body>" + "x" * (2 * MAX_STANZA_BYTES))
        assert await client.close_code() == 1009
    finally:
        await client.close()


async def test_hostile_client_costs_only_its_own_connection(web: WebSetup) -> None:
    bystander = web.client()
    await bystander.connect()
    bob = web.running.client("bob", resource="tcp")
    await bob.connect()
    try:
        await bystander.login("alice", web.prosody.users["alice"], resource="web")
        attacker = web.client()
        await attacker.connect()
        await attacker.send(b"\xff\xfe")
        assert await attacker.close_code() == 1000
        await bystander.send(chat(bob.jid, "still here"))
        await bob.next_message(where=lambda m: m.body == "still here")
    finally:
        await bystander.close()


async def test_an_open_socket_keeps_the_session_past_the_idle_timeout(
    prosody: ProsodyServer, proxy_factory: ProxyFactory
) -> None:
    """WebSocket pings keep the socket alive but never reach the session: the front end
    must tell the session's idle timer, or quiet web clients are cut off."""
    running = await proxy_factory(idle_timeout=2.0)
    front = WebSocketFrontEnd(running.proxy, WebSocketConfig(tls=proxy_tls_context(prosody.tls)))
    host, port = await front.start("127.0.0.1", 0)
    client = WsXmppClient(f"wss://{host}:{port}/xmpp-websocket", prosody.domain)
    await client.connect()
    try:
        await client.login("alice", prosody.users["alice"])
        with pytest.raises(TimeoutError):  # nothing comes: no stream error, no close
            await client.wait_for(lambda e: e.tag == f"{{{STREAM_NS}}}error", timeout=6.0)
        assert len(running.sessions_of("alice@localhost")) == 1
    finally:
        await client.close()
        await front.stop()
