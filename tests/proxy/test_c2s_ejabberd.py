"""The inline c2s proxy in front of Debian's ejabberd: the Prosody scenarios, second upstream.

One ejabberd for the run (``ejabberd`` fixture: an Erlang VM takes seconds to start); every
test registers fresh accounts (``register_fresh``) and starts its own in-process
``C2SProxy`` in front of it, so tests share nothing but the VM. The scenarios are those of
``test_c2s.py`` (chat, carbons, MUC, offline, SASL, stream management with a dropped stanza,
resumption after a TCP cut, go-sendxmpp) with ejabberd's own ways of saying things: accounts
through ``mod_http_api``, offline queues counted by ``get_offline_count``, ack trouble read
from ejabberd's log.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from archive_api.store.records import Direction
from proxy.hook import Decision, SessionInfo, StanzaHook
from proxy.stream import Element
from tests.support.clients import AuthenticationFailed, ChatClient, go_sendxmpp
from tests.support.clients import TlsMode as ClientTls
from tests.support.ejabberd import EjabberdServer
from tests.support.proxy import RecordingHook, RunningProxy, metric, start_proxy, wait_until
from tests.support.rawxmpp import CLIENT_NS, SM_NS, TLS_NS, RawXmppClient, local

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:12]}"


class EjabberdProxyFactory(Protocol):
    async def __call__(
        self, hook: StanzaHook | None = None, **config_overrides: Any
    ) -> RunningProxy: ...


@pytest.fixture
async def proxy_factory(ejabberd: EjabberdServer) -> AsyncIterator[EjabberdProxyFactory]:
    """Start ``C2SProxy``s in front of the shared ejabberd; stopped at teardown."""
    running: list[RunningProxy] = []

    async def factory(hook: StanzaHook | None = None, **config_overrides: Any) -> RunningProxy:
        started = await start_proxy(ejabberd, hook, **config_overrides)
        running.append(started)
        return started

    try:
        yield factory
    finally:
        for started in reversed(running):
            await started.stop()


@pytest.fixture
async def c2s_proxy(proxy_factory: EjabberdProxyFactory) -> RunningProxy:
    return await proxy_factory()


async def offline_count(server: EjabberdServer, user: str, count: int) -> None:
    """Poll ejabberd until ``mod_offline`` holds ``count`` messages for ``user``."""
    while server.offline_count(user) < count:
        await asyncio.sleep(0.05)


def no_ack_trouble(server: EjabberdServer, users: dict[str, str]) -> None:
    """ejabberd did not complain about any acknowledgement of these users' sessions."""
    assert server.ack_complaints(users.values()) == [], server.diagnostics()


# -- slixmpp through the proxy -----------------------------------------------------------------


async def test_two_clients_chat_and_the_bound_jid_is_learned(
    ejabberd: EjabberdServer, proxy_factory: EjabberdProxyFactory
) -> None:
    users = ejabberd.register_fresh("alice", "bob")
    hook = RecordingHook()
    running = await proxy_factory(hook)
    alice = running.client(users["alice"], resource="desk")
    bob = running.client(users["bob"], resource="phone", direct_tls=True)
    await alice.connect()
    await bob.connect()
    assert alice.tls_active and bob.tls_active
    assert (alice.jid, bob.jid) == (
        ejabberd.jid(users["alice"], "desk"),
        ejabberd.jid(users["bob"], "phone"),
    )

    hello = unique("hello bob")
    sent_id = alice.send_chat(ejabberd.jid(users["bob"]), hello)
    got = await bob.next_message()
    assert (got.body, got.from_, got.id, got.type) == (hello, alice.jid, sent_id, "chat")
    reply = unique("hi alice")
    bob.send_chat(alice.jid, reply)
    assert (await alice.next_message()).body == reply

    bound = {info.bound_jid: info for info in hook.bound}
    assert set(bound) == {alice.jid, bob.jid}
    assert all(info.authenticated and info.tls for info in bound.values())
    [out] = hook.stanzas(Direction.FROM_CLIENT, hello.encode())
    [delivered] = hook.stanzas(Direction.TO_CLIENT, hello.encode())
    assert (out.bound_jid, delivered.bound_jid) == (alice.jid, bob.jid)
    [session] = running.sessions_of(ejabberd.jid(users["alice"]))
    assert session.info.bound_jid == alice.jid


async def test_carbons_reach_the_second_resource(
    ejabberd: EjabberdServer, c2s_proxy: RunningProxy
) -> None:
    users = ejabberd.register_fresh("alice", "bob")
    laptop = c2s_proxy.client(users["alice"], resource="laptop", carbons=True)
    phone = c2s_proxy.client(users["alice"], resource="phone", carbons=True, direct_tls=True)
    bob = c2s_proxy.client(users["bob"])
    for client in (laptop, phone, bob):
        await client.connect()

    incoming = unique("to the laptop")
    bob.send_chat(laptop.jid, incoming)
    assert (await laptop.next_message()).body == incoming
    copy = await phone.next_message()
    assert (copy.is_carbon, copy.body, copy.to) == (True, incoming, laptop.jid)

    outgoing = unique("from the laptop")
    laptop.send_chat(ejabberd.jid(users["bob"]), outgoing)
    assert (await bob.next_message()).body == outgoing
    copy = await phone.next_message()
    assert (copy.is_carbon, copy.body, copy.from_) == (True, outgoing, laptop.jid)


async def test_muc_room_with_three_occupants(
    ejabberd: EjabberdServer, c2s_proxy: RunningProxy
) -> None:
    users = ejabberd.register_fresh("alice", "bob", "carol")
    room = f"desk-{uuid.uuid4().hex[:8]}@{ejabberd.muc_domain}"
    clients = {role: c2s_proxy.client(user, muc=True) for role, user in users.items()}
    for role, client in clients.items():
        await client.connect()
        await client.join_room(room, nick=role)

    for sender in ("alice", "carol"):
        body = unique(f"morning from {sender}")
        clients[sender].send_groupchat(room, body)
        for client in clients.values():
            got = await client.next_message(where=lambda m, b=body: m.body == b)  # type: ignore[misc]
            assert (got.type, got.from_) == ("groupchat", f"{room}/{sender}")


async def test_offline_recipient_gets_messages_at_login(
    ejabberd: EjabberdServer, c2s_proxy: RunningProxy
) -> None:
    users = ejabberd.register_fresh("alice", "carol")
    alice = c2s_proxy.client(users["alice"])
    await alice.connect()
    bodies = [unique("while you were out"), unique("and another")]
    for body in bodies:
        alice.send_chat(ejabberd.jid(users["carol"]), body)
    await asyncio.wait_for(offline_count(ejabberd, users["carol"], 2), TIMEOUT)

    carol = c2s_proxy.client(users["carol"], direct_tls=True)
    await carol.connect()
    got = [await carol.next_message(), await carol.next_message()]
    assert [(m.body, m.delayed) for m in got] == [(b, True) for b in bodies]
    await wait_until(lambda: ejabberd.offline_count(users["carol"]) == 0)


# -- a real client nobody in this project wrote -----------------------------------------------


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
async def test_go_sendxmpp_delivers_through_the_proxy(
    ejabberd: EjabberdServer, c2s_proxy: RunningProxy, direct_tls: bool
) -> None:
    users = ejabberd.register_fresh("alice", "bob")
    body = unique('grüße <b>&</b> "quoted"')
    result = await asyncio.to_thread(
        go_sendxmpp,
        jid=ejabberd.jid(users["alice"]),
        password=ejabberd.users[users["alice"]],
        recipient=ejabberd.jid(users["bob"]),
        message=body,
        port=c2s_proxy.tls_port if direct_tls else c2s_proxy.port,
        direct_tls=direct_tls,
    )
    assert result.ok, result.describe()
    assert ejabberd.offline_count(users["bob"]) == 1
    hook = c2s_proxy.hook
    assert isinstance(hook, RecordingHook)
    [seen] = hook.stanzas(Direction.FROM_CLIENT, b"<body>")
    assert seen.bound_jid is not None
    assert seen.bound_jid.startswith(ejabberd.jid(users["alice"]) + "/")

    bob = c2s_proxy.client(users["bob"])
    await bob.connect()
    got = await bob.next_message()
    assert (got.body, got.from_, got.delayed) == (body, seen.bound_jid, True)


# -- SASL through the proxy ----------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"])
async def test_sasl_mechanisms_authenticate_through_the_proxy(
    ejabberd: EjabberdServer, c2s_proxy: RunningProxy, mechanism: str
) -> None:
    users = ejabberd.register_fresh("dave", "erin")
    # TLS 1.2 toward the proxy: were the server's channel binding to leak through, slixmpp
    # would pick a -PLUS mechanism and fail.
    dave = c2s_proxy.client(
        users["dave"], mechanism=mechanism, tls_max_version=ssl.TLSVersion.TLSv1_2
    )
    erin = c2s_proxy.client(users["erin"], direct_tls=True)
    await dave.connect()
    await erin.connect()
    assert dave.mechanism_used == mechanism
    assert not any(m.endswith("-PLUS") for m in dave.offered_mechanisms)
    body = unique(f"authenticated with {mechanism}")
    dave.send_chat(erin.jid, body)
    assert (await erin.next_message()).body == body


async def test_wrong_password_fails_cleanly_through_the_proxy(
    ejabberd: EjabberdServer, c2s_proxy: RunningProxy
) -> None:
    users = ejabberd.register_fresh("alice")
    client = c2s_proxy.client(users["alice"], password="not-the-password")
    with pytest.raises(AuthenticationFailed, match="not-authorized"):
        await client.connect()


async def test_features_the_client_sees(ejabberd: EjabberdServer, c2s_proxy: RunningProxy) -> None:
    users = ejabberd.register_fresh("alice")
    raw = RawXmppClient(c2s_proxy.host, c2s_proxy.port, ejabberd.domain)
    try:
        await raw.connect()
        await raw.starttls()
        # ejabberd's features, without its own (optional) starttls offer.
        features = await raw.open_stream()
        assert features.find(f"{{{TLS_NS}}}starttls") is None
        assert sorted(raw.mechanisms()) == [
            "PLAIN",
            "SCRAM-SHA-1",
            "SCRAM-SHA-256",
            "SCRAM-SHA-512",
        ]
        assert b"-PLUS" not in raw.received and b"sasl-channel-binding" not in raw.received
        await raw.auth_plain(users["alice"], ejabberd.users[users["alice"]])
        assert raw.features is not None
        after = {local(child.tag)[1] for child in raw.features}
        assert {"bind", "sm"} <= after and "starttls" not in after
    finally:
        await raw.close()


async def test_channel_binding_of_a_tls_upstream_is_hidden(
    ejabberd: EjabberdServer, proxy_factory: EjabberdProxyFactory
) -> None:
    users = ejabberd.register_fresh("bob", "carol")
    upstream = ssl.create_default_context()
    upstream.check_hostname = False
    upstream.verify_mode = ssl.CERT_NONE
    running = await proxy_factory(upstream_port=ejabberd.c2s_direct_tls_port, upstream_tls=upstream)
    raw = RawXmppClient(running.host, running.port, ejabberd.domain)
    try:
        await raw.connect()
        await raw.starttls()
        await raw.open_stream()
        assert not any(m.endswith("-PLUS") for m in raw.mechanisms())
        assert b"-PLUS" not in raw.received
        await raw.auth_plain(users["bob"], ejabberd.users[users["bob"]])
        assert await raw.bind("tls-upstream") == ejabberd.jid(users["bob"], "tls-upstream")
    finally:
        await raw.close()
    # The same leg, seen directly: the -PLUS offer really is there to be hidden.
    direct = ChatClient(
        ejabberd.jid(users["carol"]),
        ejabberd.users[users["carol"]],
        port=ejabberd.c2s_direct_tls_port,
        tls=ClientTls.DIRECT,
    )
    try:
        await direct.connect()
        assert any(m.endswith("-PLUS") for m in direct.offered_mechanisms)
    finally:
        await direct.disconnect()


# -- stream management with a hook that drops and injects ----------------------------------------


def injected_message(domain: str, to: str, body: str) -> bytes:
    return (
        f"<message xmlns='jabber:client' from='{domain}' to='{to}' type='chat' "
        f"id='inj-{uuid.uuid4().hex[:8]}'><body>{body}</body></message>"
    ).encode()


def has_body(element: Element, text: str) -> bool:
    return element.name == "message" and f"<body>{text}</body>".encode() in element.data


async def test_sm_survives_a_drop_and_an_injection_with_slixmpp(
    ejabberd: EjabberdServer, proxy_factory: EjabberdProxyFactory
) -> None:
    users = ejabberd.register_fresh("alice", "bob")
    drop_body, inject_on, injected_body = unique("drop me"), unique("inject on me"), unique("inj")
    dropped_before = metric("stanzaguard_stanzas_dropped_total", direction="from-client")

    def rule(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if direction is Direction.FROM_CLIENT and has_body(element, drop_body):
            return Decision.drop()
        if direction is Direction.FROM_CLIENT and has_body(element, inject_on):
            to = str(info.bound_jid)
            return Decision(
                inject_to_client=(injected_message(ejabberd.domain, to, injected_body),)
            )
        return None

    running = await proxy_factory(RecordingHook([rule]))
    alice = running.client(users["alice"], resource="sm", stream_management=True)
    bob = running.client(users["bob"], resource="sm", stream_management=True, direct_tls=True)
    await alice.connect()
    await bob.connect()
    assert alice.sm_enabled and bob.sm_enabled

    before = [unique("before"), unique("before")]
    after = [unique("after"), unique("after")]
    for body in (before[0], drop_body, before[1], inject_on):
        alice.send_chat(bob.jid, body)
    got = [await bob.next_message() for _ in range(3)]
    assert [m.body for m in got] == [before[0], before[1], inject_on]
    injected = await alice.next_message()
    assert (injected.body, injected.from_) == (injected_body, ejabberd.domain)

    # More traffic both ways, over the <r/> ejabberd sends behind its stanzas.
    bob.send_chat(alice.jid, after[0])
    alice.send_chat(bob.jid, after[1])
    assert (await alice.next_message()).body == after[0]
    assert (await bob.next_message()).body == after[1]
    assert await bob.drain() == []

    # Force an ack: ejabberd's h, translated, covers every stanza alice sent (the dropped one
    # included), so her queue of unacknowledged stanzas empties and nothing is resent.
    sm = alice.xmpp.plugin["xep_0198"]
    acked: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_ack(stanza: Any) -> None:
        if not acked.done():
            acked.set_result(int(stanza["h"]))

    alice.xmpp.register_handler(Callback("test ack", MatchXPath(f"{{{SM_NS}}}a"), on_ack))
    alice.send_raw(f"<r xmlns='{SM_NS}'/>")
    h = await asyncio.wait_for(acked, TIMEOUT)
    await wait_until(lambda: sm.last_ack == sm.seq)
    assert h == sm.seq and len(sm.unacked_queue) == 0
    # ejabberd closes the stream when a client acknowledges more than it sent; both still
    # stand, and its log has no such complaint about the injection.
    assert alice.sm_enabled and bob.sm_enabled
    last = unique("still open")
    alice.send_chat(bob.jid, last)
    assert (await bob.next_message()).body == last
    no_ack_trouble(ejabberd, users)
    dropped = metric("stanzaguard_stanzas_dropped_total", direction="from-client")
    assert dropped - dropped_before == 1


async def test_sm_counts_are_exact_with_a_raw_client(
    ejabberd: EjabberdServer, proxy_factory: EjabberdProxyFactory
) -> None:
    """Counts checked number by number, including stanzas sent right behind ``<enable/>``."""
    users = ejabberd.register_fresh("bob", "carol")
    drop_body, inject_on = unique("drop me"), unique("inject on me")
    injections: list[bytes] = []

    def rule(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if direction is Direction.FROM_CLIENT and has_body(element, drop_body):
            return Decision.drop()
        if direction is Direction.FROM_CLIENT and has_body(element, inject_on):
            data = injected_message(ejabberd.domain, str(info.bound_jid), unique("injected"))
            injections.append(data)
            return Decision(inject_to_client=(data,))
        return None

    running = await proxy_factory(RecordingHook([rule]))
    bob = running.client(users["bob"])
    await bob.connect()
    raw = RawXmppClient(running.host, running.port, ejabberd.domain)
    carol = users["carol"]
    try:
        jid = await raw.login(carol, ejabberd.users[carol], resource="counted")
        await raw.presence()
        first = unique("right behind enable")
        sm = await raw.enable_sm(
            then=f"<message to='{bob.jid}' type='chat'><body>{first}</body></message>".encode()
        )
        assert sm.sm_id
        raw.send_message(bob.jid, drop_body)
        raw.send_message(bob.jid, unique("third"))
        raw.send_message(bob.jid, inject_on)
        await raw.drain()
        # ejabberd received 3 of carol's 4 stanzas; the proxy makes that 4 for her.
        assert await raw.request_ack() == sm.outbound == 4
        [injected] = await raw.messages(1)
        [injection] = injections
        body_tag = f"{{{CLIENT_NS}}}body"
        assert injected.findtext(body_tag) == ET.fromstring(injection).findtext(body_tag)
        # Acks to ejabberd's <r/> (answered by the raw client as they come) include the
        # injection, which ejabberd never sent: the proxy must take it out again.
        for _ in range(3):
            bob.send_chat(jid, unique("to carol"))
        await raw.messages(3)
        raw.send(f"<a xmlns='{SM_NS}' h='{sm.inbound}'/>".encode())
        assert sm.inbound == 4  # 3 from bob and the injection; presence came before enable
        raw.send_message(bob.jid, unique("still open"))
        assert await raw.request_ack() == sm.outbound == 5
        bodies = [(await bob.next_message()).body for _ in range(4)]
        bodies += [m.body for m in await bob.drain()]
        assert len(bodies) == 4 and bodies[0] == first and drop_body not in bodies
        assert not raw.ended
    finally:
        await raw.close()
    no_ack_trouble(ejabberd, users)


async def test_resumption_loses_nothing_and_duplicates_nothing(
    ejabberd: EjabberdServer, proxy_factory: EjabberdProxyFactory
) -> None:
    users = ejabberd.register_fresh("alice", "carol")
    carol = users["carol"]
    total = 40
    bodies = [f"m{i:02d} {uuid.uuid4().hex[:6]}" for i in range(total)]
    dropped = bodies[7]
    injected_body = unique("injected for carol")
    carol_jid = ejabberd.jid(carol, "resumable")

    def rule(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if direction is not Direction.TO_CLIENT or info.bound_jid != carol_jid:
            return None
        if has_body(element, dropped):
            return Decision.drop()
        if has_body(element, bodies[5]):
            message = injected_message(ejabberd.domain, carol_jid, injected_body)
            return Decision(inject_to_client=(message,))
        return None

    hook = RecordingHook([rule])
    running = await proxy_factory(hook)
    alice = running.client(users["alice"])
    await alice.connect()

    first = RawXmppClient(running.host, running.port, ejabberd.domain)
    assert await first.login(carol, ejabberd.users[carol], resource="resumable") == carol_jid
    await first.presence()
    sm = await first.enable_sm()
    assert sm.sm_id

    async def send_all() -> None:
        for body in bodies:
            alice.send_chat(carol_jid, body)
            await asyncio.sleep(0.01)

    sender = asyncio.create_task(send_all())
    received: list[str] = []
    while len(received) < 12:
        [message] = await first.messages(1)
        received.append(message.findtext(f"{{{CLIENT_NS}}}body") or "")
    h = sm.inbound
    first.abort()  # mid-stream, no </stream:stream>, no close_notify
    await sender

    second = RawXmppClient(running.host, running.port, ejabberd.domain)
    try:
        await second.connect()
        await second.starttls()
        await second.open_stream()
        await second.auth_plain(carol, ejabberd.users[carol])
        second.sm = sm
        await second.resume(sm.sm_id, h)
        expected = [b for b in bodies if b != dropped] + [injected_body]
        while len(received) < len(expected):
            [message] = await second.messages(1)
            received.append(message.findtext(f"{{{CLIENT_NS}}}body") or "")
        received += [
            m.findtext(f"{{{CLIENT_NS}}}body") or "" for m in await _quiet_messages(second)
        ]
        assert sorted(received) == sorted(expected)  # every one, exactly once
        last = unique("after resumption")
        alice.send_chat(carol_jid, last)
        [message] = await second.messages(1)
        assert message.findtext(f"{{{CLIENT_NS}}}body") == last
        [seen] = hook.stanzas(Direction.TO_CLIENT, last.encode())
        assert seen.bound_jid == carol_jid
        assert await second.request_ack() == sm.outbound
        assert not second.ended
    finally:
        await second.close()
    no_ack_trouble(ejabberd, users)


async def _quiet_messages(client: RawXmppClient, quiet_for: float = 0.5) -> list[ET.Element]:
    """Messages that still arrive until none has for ``quiet_for`` seconds."""
    found: list[ET.Element] = []
    while True:
        try:
            found += await client.messages(1, timeout=quiet_for)
        except AssertionError:
            return found


async def test_the_ack_check_sees_a_bad_count(ejabberd: EjabberdServer) -> None:
    """Control for ``no_ack_trouble``: straight to ejabberd, an ``h`` too high is fatal."""
    users = ejabberd.register_fresh("mallory")
    raw = RawXmppClient(ejabberd.host, ejabberd.c2s_port, ejabberd.domain)
    try:
        await raw.login(users["mallory"], ejabberd.users[users["mallory"]])
        await raw.enable_sm()
        raw.send(f"<a xmlns='{SM_NS}' h='5'/>".encode())
        data = await raw.read_until_closed()
    finally:
        await raw.close()
    assert b"Client acknowledged more stanzas than sent by server" in data
    await wait_until(lambda: ejabberd.ack_complaints(users.values()) != [])
    [complaint] = ejabberd.ack_complaints(users.values())
    assert "acknowledged 5 stanzas, but only 0 were sent" in complaint
