"""The inline c2s proxy's transport, end to end: a real server behind it, real clients in front.

Scenarios that must hold whatever the server is run against each test server in turn (the
``upstream`` fixture: ids ``[prosody]`` and ``[ejabberd]``), with accounts of their own
(``register_fresh``). The rest needs a server configured, stopped or fresh, and runs against a
Prosody of its own (``prosody``); what only ejabberd does is in ``test_c2s_ejabberd.py``. In
front of the server, an in-process ``C2SProxy`` on free loopback ports (``proxy_for``,
``proxy_factory``); clients are slixmpp (``ChatClient``), the Debian command-line clients
go-sendxmpp and sendxmpp, and a raw client (``RawXmppClient``) where a test needs control over
single bytes or the TCP connection.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

import pytest
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from archive_api.store.records import Direction
from proxy.c2s import rewrite_features
from proxy.hook import Decision, SessionInfo
from proxy.stream import Element
from tests.conftest import ProsodyFactory, ProxyFactory, ProxyStarter
from tests.support.clients import AuthenticationFailed, ChatClient, go_sendxmpp, sendxmpp
from tests.support.clients import TlsMode as ClientTls
from tests.support.ejabberd import EjabberdServer
from tests.support.prosody import ProsodyConfig, ProsodyServer
from tests.support.proxy import RecordingHook, RunningProxy, closed_count, metric, wait_until
from tests.support.rawxmpp import (
    CLIENT_NS,
    SASL_NS,
    SM_NS,
    TLS_NS,
    RawXmppClient,
    StreamEnded,
    local,
)
from tests.support.upstream import ServerUnderTest

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:12]}"


def stream_error_in(data: bytes, condition: str) -> bool:
    return (
        f"<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>".encode() in data
        and data.rstrip().endswith(b"</stream:stream>")
    )


async def offline_count(server: ServerUnderTest, user: str, count: int) -> None:
    """Poll the server until it holds ``count`` offline messages for ``user``."""
    while server.offline_count(user) < count:
        await asyncio.sleep(0.02)


def sasl_offer(server: ServerUnderTest) -> list[str]:
    """The SASL mechanisms a test server's default config offers a client, sorted.

    Prosody keeps SCRAM keys for SHA-1 only; ejabberd keeps the password, so it offers every
    SCRAM it knows (tests/support/prosody.py, tests/support/ejabberd.py).
    """
    if isinstance(server, EjabberdServer):
        return ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"]
    return ["PLAIN", "SCRAM-SHA-1"]


def plus_tls_version(server: ServerUnderTest) -> ssl.TLSVersion | None:
    """The newest TLS version on which the server offers ``-PLUS`` (None: any).

    Prosody 0.12 binds channels to tls-unique only, which TLS 1.3 does not have.
    """
    return ssl.TLSVersion.TLSv1_2 if isinstance(server, ProsodyServer) else None


# -- features, unit level ----------------------------------------------------------------------

FEATURES_WITH_PLUS = (
    b"<stream:features>"
    b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
    b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
    b"<mechanism>SCRAM-SHA-1-PLUS</mechanism><mechanism>SCRAM-SHA-1</mechanism>"
    b"<mechanism>SCRAM-SHA-256-PLUS</mechanism><mechanism>PLAIN</mechanism>"
    b"</mechanisms>"
    b"<sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'>"
    b"<channel-binding type='tls-server-end-point'/><channel-binding type='tls-exporter'/>"
    b"</sasl-channel-binding>"
    b"<sm xmlns='urn:xmpp:sm:3'><optional/></sm>"
    b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    b"</stream:features>"
)


def test_rewrite_features_strips_plus_channel_binding_and_starttls() -> None:
    out = rewrite_features(FEATURES_WITH_PLUS)
    assert out == (
        b"<stream:features>"
        b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
        b"<mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism>"
        b"</mechanisms>"
        b"<sm xmlns='urn:xmpp:sm:3'><optional/></sm>"
        b"</stream:features>"
    )
    # Parses, and nothing else was touched.
    ET.fromstring(out.replace(b"stream:features", b"features"))
    kept = rewrite_features(FEATURES_WITH_PLUS, strip_starttls=False)
    assert kept.count(b"<starttls") == 2 and b"-PLUS" not in kept


def test_rewrite_features_leaves_clean_features_byte_for_byte() -> None:
    clean = (
        b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
        b"<mechanism>PLAIN</mechanism><mechanism>SCRAM-SHA-256</mechanism></mechanisms>"
        b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>"
    )
    assert rewrite_features(clean) == clean


# -- slixmpp through the proxy -----------------------------------------------------------------


async def test_two_clients_chat_and_the_bound_jid_is_learned(
    upstream: ServerUnderTest, proxy_for: ProxyStarter
) -> None:
    users = upstream.register_fresh("alice", "bob")
    hook = RecordingHook()
    running = await proxy_for(upstream, hook)
    alice = running.client(users["alice"], resource="desk")
    bob = running.client(users["bob"], resource="phone", direct_tls=True)
    await alice.connect()
    await bob.connect()
    assert alice.tls_active and bob.tls_active
    assert (alice.jid, bob.jid) == (
        upstream.jid(users["alice"], "desk"),
        upstream.jid(users["bob"], "phone"),
    )

    hello = unique("hello bob")
    sent_id = alice.send_chat(upstream.jid(users["bob"]), hello)
    got = await bob.next_message()
    assert (got.body, got.from_, got.id, got.type) == (hello, alice.jid, sent_id, "chat")
    reply = unique("hi alice")
    bob.send_chat(alice.jid, reply)
    assert (await alice.next_message()).body == reply

    # The transport told the hook who each session is, and attributed every stanza to it.
    bound = {info.bound_jid: info for info in hook.bound}
    assert set(bound) == {alice.jid, bob.jid}
    assert all(info.authenticated and info.tls for info in bound.values())
    assert all(info.domain == upstream.domain for info in bound.values())
    [out] = hook.stanzas(Direction.FROM_CLIENT, hello.encode())
    [delivered] = hook.stanzas(Direction.TO_CLIENT, hello.encode())
    assert (out.bound_jid, delivered.bound_jid) == (alice.jid, bob.jid)
    assert out.session_id != delivered.session_id
    assert {s.bound_jid for s in hook.seen if s.direction is Direction.FROM_CLIENT} >= {
        alice.jid,
        bob.jid,
    }
    # The proxy can find the live sessions of a user (to deliver released messages).
    [session] = running.sessions_of(upstream.jid(users["alice"]))
    assert session.info.bound_jid == alice.jid


async def test_carbons_reach_the_second_resource(
    upstream: ServerUnderTest, upstream_proxy: RunningProxy
) -> None:
    users = upstream.register_fresh("alice", "bob")
    laptop = upstream_proxy.client(users["alice"], resource="laptop", carbons=True)
    phone = upstream_proxy.client(users["alice"], resource="phone", carbons=True, direct_tls=True)
    bob = upstream_proxy.client(users["bob"])
    for client in (laptop, phone, bob):
        await client.connect()

    incoming = unique("to the laptop")
    bob.send_chat(laptop.jid, incoming)
    assert (await laptop.next_message()).body == incoming
    copy = await phone.next_message()
    assert (copy.is_carbon, copy.body, copy.to) == (True, incoming, laptop.jid)

    outgoing = unique("from the laptop")
    laptop.send_chat(upstream.jid(users["bob"]), outgoing)
    assert (await bob.next_message()).body == outgoing
    copy = await phone.next_message()
    assert (copy.is_carbon, copy.body, copy.from_) == (True, outgoing, laptop.jid)


async def test_muc_room_with_three_occupants(
    upstream: ServerUnderTest, upstream_proxy: RunningProxy
) -> None:
    users = upstream.register_fresh("alice", "bob", "carol")
    room = f"desk-{uuid.uuid4().hex[:8]}@{upstream.muc_domain}"
    clients = {role: upstream_proxy.client(user, muc=True) for role, user in users.items()}
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
    upstream: ServerUnderTest, upstream_proxy: RunningProxy
) -> None:
    users = upstream.register_fresh("alice", "carol")
    alice = upstream_proxy.client(users["alice"])
    await alice.connect()
    bodies = [unique("while you were out"), unique("and another")]
    for body in bodies:
        alice.send_chat(upstream.jid(users["carol"]), body)
    await asyncio.wait_for(offline_count(upstream, users["carol"], 2), TIMEOUT)
    if isinstance(upstream, ProsodyServer):  # its store can be read: these very messages
        assert [m.body for m in upstream.offline_messages(users["carol"])] == bodies

    carol = upstream_proxy.client(users["carol"], direct_tls=True)
    await carol.connect()
    got = [await carol.next_message(), await carol.next_message()]
    assert [(m.body, m.delayed) for m in got] == [(b, True) for b in bodies]
    await wait_until(lambda: upstream.offline_count(users["carol"]) == 0)


# -- Debian's command-line clients through the proxy -------------------------------------------


# The command-line clients block; they run in a thread so the proxy's loop keeps serving.


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
async def test_go_sendxmpp_delivers_through_the_proxy(
    upstream: ServerUnderTest, upstream_proxy: RunningProxy, direct_tls: bool
) -> None:
    users = upstream.register_fresh("alice", "bob")
    alice, bob = users["alice"], users["bob"]
    body = unique('grüße <b>&</b> "quoted"')
    result = await asyncio.to_thread(
        go_sendxmpp,
        jid=upstream.jid(alice),
        password=upstream.users[alice],
        recipient=upstream.jid(bob),
        message=body,
        port=upstream_proxy.tls_port if direct_tls else upstream_proxy.port,
        direct_tls=direct_tls,
    )
    assert result.ok, result.describe()
    # The client may be gone before the proxy has passed the message on to the server: wait
    # for it there rather than read the server's store at once.
    await asyncio.wait_for(offline_count(upstream, bob, 1), TIMEOUT)
    assert upstream.offline_count(bob) == 1
    hook = upstream_proxy.hook
    assert isinstance(hook, RecordingHook)
    [seen] = hook.stanzas(Direction.FROM_CLIENT, b"<body>")
    assert seen.bound_jid is not None
    assert seen.bound_jid.startswith(upstream.jid(alice) + "/")
    if isinstance(upstream, ProsodyServer):  # its store can be read: the very message
        [stored] = upstream.offline_messages(bob)
        assert (stored.body, stored.to, stored.sender) == (body, upstream.jid(bob), seen.bound_jid)

    recipient = upstream_proxy.client(bob)
    await recipient.connect()
    got = await recipient.next_message()
    assert (got.body, got.from_, got.delayed) == (body, seen.bound_jid, True)


@pytest.mark.parametrize("tls", [ClientTls.STARTTLS, ClientTls.DIRECT], ids=str)
async def test_sendxmpp_delivers_through_the_proxy(
    prosody: ProsodyServer, c2s_proxy: RunningProxy, tls: ClientTls
) -> None:
    running = c2s_proxy
    body = unique(f"sendxmpp over {tls}")
    result = await asyncio.to_thread(
        sendxmpp,
        user="carol",
        domain=prosody.domain,
        password=prosody.users["carol"],
        recipient=prosody.jid("bob"),
        message=body,
        port=running.tls_port if tls is ClientTls.DIRECT else running.port,
        tls=tls,
    )
    assert result.ok, result.describe()
    # As above: the message may still be on its way through the proxy when sendxmpp exits.
    await asyncio.wait_for(offline_count(prosody, "bob", 1), TIMEOUT)
    assert [(m.sender, m.body) for m in prosody.offline_messages("bob")] == [
        ("carol@localhost/sendxmpp", body)
    ]


# -- SASL through the proxy ----------------------------------------------------------------------


async def mechanism_authenticates(
    running: RunningProxy, dave: str, erin: str, mechanism: str
) -> None:
    """``dave`` logs in through ``running`` with ``mechanism`` and writes to ``erin``."""
    # TLS 1.2 toward the proxy: were the server's channel binding to leak through, slixmpp
    # would pick a -PLUS mechanism and fail.
    sender = running.client(dave, mechanism=mechanism, tls_max_version=ssl.TLSVersion.TLSv1_2)
    recipient = running.client(erin, direct_tls=True)
    await sender.connect()
    await recipient.connect()
    assert sender.mechanism_used == mechanism
    assert not any(m.endswith("-PLUS") for m in sender.offered_mechanisms)
    body = unique(f"authenticated with {mechanism}")
    sender.send_chat(recipient.jid, body)
    assert (await recipient.next_message()).body == body


@pytest.mark.parametrize(
    ("mechanism", "authentication", "password_hash"),
    [
        ("PLAIN", "internal_hashed", "SHA-1"),
        ("SCRAM-SHA-1", "internal_hashed", "SHA-1"),
        ("SCRAM-SHA-256", "internal_hashed", "SHA-256"),
        ("SCRAM-SHA-256", "internal_plain", "SHA-1"),
    ],
)
async def test_sasl_mechanisms_authenticate_through_the_proxy(
    prosody_factory: ProsodyFactory,
    proxy_factory: ProxyFactory,
    mechanism: str,
    authentication: str,
    password_hash: str,
) -> None:
    """Prosody offers a mechanism by how it stores passwords (ejabberd: test_c2s_ejabberd.py)."""
    server = prosody_factory(
        ProsodyConfig(authentication=authentication, password_hash=password_hash),
        users={"dave": "dave-secret", "erin": "erin-secret"},
    )
    running = await proxy_factory(server=server)
    await mechanism_authenticates(running, "dave", "erin", mechanism)


async def test_wrong_password_fails_cleanly_through_the_proxy(
    upstream: ServerUnderTest, upstream_proxy: RunningProxy
) -> None:
    users = upstream.register_fresh("alice")
    client = upstream_proxy.client(users["alice"], password="not-the-password")
    with pytest.raises(AuthenticationFailed, match="not-authorized"):
        await client.connect()


async def test_features_the_client_sees(
    upstream: ServerUnderTest, upstream_proxy: RunningProxy
) -> None:
    alice = upstream.register_fresh("alice")["alice"]
    raw = RawXmppClient(upstream_proxy.host, upstream_proxy.port, upstream.domain)
    try:
        await raw.connect()
        # Before TLS: the proxy's own stream offers STARTTLS, required, and nothing else.
        first = await raw.open_stream()
        assert [local(child.tag) for child in first] == [(TLS_NS, "starttls")]
        assert first.find(f"{{{TLS_NS}}}starttls/{{{TLS_NS}}}required") is not None
        assert raw.stream_attrs["from"] == upstream.domain
        raw.send(f"<starttls xmlns='{TLS_NS}'/>".encode())
        assert (await raw.next_element()).tag == f"{{{TLS_NS}}}proceed"
        await raw.start_tls()
        # After TLS: the server's features, without its own starttls offer (no duplication).
        features = await raw.open_stream()
        assert features.find(f"{{{TLS_NS}}}starttls") is None
        assert sorted(raw.mechanisms()) == sasl_offer(upstream)
        assert b"-PLUS" not in raw.received and b"sasl-channel-binding" not in raw.received
        assert raw.received.count(b"urn:ietf:params:xml:ns:xmpp-tls'><required/>") == 1
        await raw.auth_plain(alice, upstream.users[alice])
        assert raw.features is not None
        after = {local(child.tag)[1] for child in raw.features}
        assert {"bind", "sm"} <= after and "starttls" not in after
    finally:
        await raw.close()


async def test_channel_binding_of_a_tls_upstream_is_hidden(
    upstream: ServerUnderTest, proxy_for: ProxyStarter
) -> None:
    # Upstream over TLS, where the server offers SCRAM-*-PLUS. The client must not see it:
    # channel binding cannot cross two TLS sessions.
    users = upstream.register_fresh("bob", "carol")
    bob, carol = users["bob"], users["carol"]
    newest_tls = plus_tls_version(upstream)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if newest_tls is not None:
        context.maximum_version = newest_tls
    assert upstream.c2s_direct_tls_port is not None
    running = await proxy_for(
        upstream, upstream_port=upstream.c2s_direct_tls_port, upstream_tls=context
    )
    raw = RawXmppClient(running.host, running.port, upstream.domain)
    try:
        await raw.connect()
        await raw.starttls()
        await raw.open_stream()
        assert sorted(raw.mechanisms()) == sasl_offer(upstream)
        assert b"-PLUS" not in raw.received
        await raw.auth_plain(bob, upstream.users[bob])
        assert await raw.bind("tls-upstream") == upstream.jid(bob, "tls-upstream")
    finally:
        await raw.close()
    # The same leg, seen directly: the -PLUS offer really is there to be hidden.
    direct = ChatClient(
        upstream.jid(carol),
        upstream.users[carol],
        port=upstream.c2s_direct_tls_port,
        tls=ClientTls.DIRECT,
        tls_max_version=newest_tls,
    )
    try:
        await direct.connect()
        assert "SCRAM-SHA-1-PLUS" in direct.offered_mechanisms
    finally:
        await direct.disconnect()


# -- refusals before the splice --------------------------------------------------------------------


async def test_plaintext_client_is_refused(prosody: ProsodyServer, c2s_proxy: RunningProxy) -> None:
    before = closed_count("policy-violation")
    raw = RawXmppClient(c2s_proxy.host, c2s_proxy.port, prosody.domain)
    await raw.connect()
    await raw.open_stream()
    raw.send(
        f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>AGFsaWNlAGFsaWNlLXNlY3JldA==</auth>".encode()
    )
    data = await raw.read_until_closed()
    assert stream_error_in(data, "policy-violation"), data
    await wait_until(lambda: closed_count("policy-violation") == before + 1)


async def test_plaintext_is_spliced_when_allowed(
    prosody: ProsodyServer, proxy_factory: ProxyFactory
) -> None:
    running = await proxy_factory(allow_plaintext=True)
    hook = running.hook
    assert isinstance(hook, RecordingHook)
    plain = running.client("alice", tls=ClientTls.PLAIN)
    starttls = running.client("bob")  # STARTTLS is still offered, and works
    await plain.connect()
    await starttls.connect()
    assert not plain.tls_active and starttls.tls_active
    body = unique("in the clear")
    plain.send_chat(starttls.jid, body)
    assert (await starttls.next_message()).body == body
    tls_flags = {info.bound_jid: info.tls for info in hook.bound}
    assert tls_flags == {plain.jid: False, starttls.jid: True}


async def test_plaintext_without_a_certificate_when_allowed(
    prosody: ProsodyServer, proxy_factory: ProxyFactory
) -> None:
    running = await proxy_factory(allow_plaintext=True, server_tls=None)
    plain = running.client("alice", tls=ClientTls.PLAIN)
    other = running.client("bob", tls=ClientTls.PLAIN)
    await plain.connect()
    await other.connect()
    body = unique("no certificate at all")
    plain.send_chat(other.jid, body)
    assert (await other.next_message()).body == body


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
async def test_unknown_domain_is_host_unknown(
    prosody: ProsodyServer, c2s_proxy: RunningProxy, direct_tls: bool
) -> None:
    before = closed_count("host-unknown")
    port = c2s_proxy.tls_port if direct_tls else c2s_proxy.port
    raw = RawXmppClient(c2s_proxy.host, port, "elsewhere.example")
    await raw.connect(direct_tls=direct_tls)
    with pytest.raises(StreamEnded, match="host-unknown"):
        await raw.open_stream()
    data = await raw.read_until_closed()
    assert stream_error_in(data, "host-unknown"), data
    await wait_until(lambda: closed_count("host-unknown") == before + 1)


async def test_upstream_down_is_remote_connection_failed(
    prosody: ProsodyServer, c2s_proxy: RunningProxy
) -> None:
    prosody.stop()
    before = closed_count("remote-connection-failed")
    raw = RawXmppClient(c2s_proxy.host, c2s_proxy.tls_port, prosody.domain)
    await raw.connect(direct_tls=True)
    with pytest.raises(StreamEnded, match="remote-connection-failed"):
        await raw.open_stream()
    await wait_until(lambda: closed_count("remote-connection-failed") == before + 1)


# -- stream management with a hook that drops and injects -----------------------------------------


def injected_message(domain: str, to: str, body: str) -> bytes:
    return (
        f"<message xmlns='jabber:client' from='{domain}' to='{to}' type='chat' "
        f"id='inj-{uuid.uuid4().hex[:8]}'><body>{body}</body></message>"
    ).encode()


def has_body(element: Element, text: str) -> bool:
    return element.name == "message" and f"<body>{text}</body>".encode() in element.data


def no_ack_trouble(server: ServerUnderTest, users: Mapping[str, str]) -> None:
    """The server did not complain about any acknowledgement of these users' sessions."""
    assert server.ack_complaints(users.values()) == [], server.diagnostics()


async def test_the_ack_check_sees_a_bad_count(upstream: ServerUnderTest) -> None:
    """Control for ``no_ack_trouble``: straight to the server, an ``h`` too high is fatal."""
    users = upstream.register_fresh("mallory")
    raw = RawXmppClient(upstream.host, upstream.c2s_port, upstream.domain)
    try:
        await raw.login(users["mallory"], upstream.users[users["mallory"]])
        await raw.enable_sm()
        raw.send(f"<a xmlns='{SM_NS}' h='5'/>".encode())
        data = await raw.read_until_closed()
    finally:
        await raw.close()
    assert b"Client acknowledged more stanzas than sent by server" in data
    await wait_until(lambda: upstream.ack_complaints(users.values()) != [])
    [complaint] = upstream.ack_complaints(users.values())
    if isinstance(upstream, EjabberdServer):
        assert "acknowledged 5 stanzas, but only 0 were sent" in complaint
    else:
        assert "The client says it handled 5 new stanzas, but we sent 0" in complaint


async def test_sm_survives_a_drop_and_an_injection_with_slixmpp(
    upstream: ServerUnderTest, proxy_for: ProxyStarter
) -> None:
    users = upstream.register_fresh("alice", "bob")
    drop_body, inject_on, injected_body = unique("drop me"), unique("inject on me"), unique("inj")
    dropped_before = metric("stanzaguard_stanzas_dropped_total", direction="from-client")
    injected_before = metric("stanzaguard_stanzas_injected_total", direction="to-client")

    def rule(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if direction is Direction.FROM_CLIENT and has_body(element, drop_body):
            return Decision.drop()
        if direction is Direction.FROM_CLIENT and has_body(element, inject_on):
            injection = injected_message(upstream.domain, str(info.bound_jid), injected_body)
            return Decision(inject_to_client=(injection,))
        return None

    running = await proxy_for(upstream, RecordingHook([rule]))
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
    assert (injected.body, injected.from_) == (injected_body, upstream.domain)

    # Further traffic in both directions, over the acks the server requests behind stanzas.
    bob.send_chat(alice.jid, after[0])
    alice.send_chat(bob.jid, after[1])
    assert (await alice.next_message()).body == after[0]
    assert (await bob.next_message()).body == after[1]
    assert await bob.drain() == []

    # Force an ack: the server's h, translated, covers every stanza alice sent (the dropped
    # one included), so her queue of unacknowledged stanzas empties and nothing is resent.
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
    # A server closes the stream when a client acknowledges more than it sent (ejabberd) or
    # logs it (Prosody): both streams still stand, and no such complaint about the injection.
    assert alice.sm_enabled and bob.sm_enabled
    last = unique("still open")
    alice.send_chat(bob.jid, last)
    assert (await bob.next_message()).body == last
    no_ack_trouble(upstream, users)
    dropped = metric("stanzaguard_stanzas_dropped_total", direction="from-client")
    injected_count = metric("stanzaguard_stanzas_injected_total", direction="to-client")
    assert (dropped - dropped_before, injected_count - injected_before) == (1, 1)


async def test_sm_counts_are_exact_with_a_raw_client(
    upstream: ServerUnderTest, proxy_for: ProxyStarter
) -> None:
    """Counts checked number by number, including stanzas sent right behind ``<enable/>``."""
    users = upstream.register_fresh("bob", "carol")
    drop_body, inject_on = unique("drop me"), unique("inject on me")
    injections: list[bytes] = []

    def rule(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if direction is Direction.FROM_CLIENT and has_body(element, drop_body):
            return Decision.drop()
        if direction is Direction.FROM_CLIENT and has_body(element, inject_on):
            data = injected_message(upstream.domain, str(info.bound_jid), unique("injected"))
            injections.append(data)
            return Decision(inject_to_client=(data,))
        return None

    running = await proxy_for(upstream, RecordingHook([rule]))
    bob = running.client(users["bob"])
    await bob.connect()
    raw = RawXmppClient(running.host, running.port, upstream.domain)
    carol = users["carol"]
    try:
        jid = await raw.login(carol, upstream.users[carol], resource="counted")
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
        # The server received 3 of carol's 4 stanzas; the proxy makes that 4 for her.
        assert await raw.request_ack() == sm.outbound == 4
        [injected] = await raw.messages(1)
        [injection] = injections
        body_tag = f"{{{CLIENT_NS}}}body"
        assert injected.findtext(body_tag) == ET.fromstring(injection).findtext(body_tag)
        # Acks to the server's <r/> (answered by the raw client as they come) include the
        # injection, which the server never sent: the proxy must take it out again.
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
    no_ack_trouble(upstream, users)


async def test_resumption_loses_nothing_and_duplicates_nothing(
    upstream: ServerUnderTest, proxy_for: ProxyStarter
) -> None:
    users = upstream.register_fresh("alice", "carol")
    carol = users["carol"]
    total = 40
    bodies = [f"m{i:02d} {uuid.uuid4().hex[:6]}" for i in range(total)]
    dropped = bodies[7]
    injected_body = unique("injected for carol")
    carol_jid = upstream.jid(carol, "resumable")

    def rule(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if direction is not Direction.TO_CLIENT or info.bound_jid != carol_jid:
            return None
        if has_body(element, dropped):
            return Decision.drop()
        if has_body(element, bodies[5]):
            message = injected_message(upstream.domain, carol_jid, injected_body)
            return Decision(inject_to_client=(message,))
        return None

    hook = RecordingHook([rule])
    running = await proxy_for(upstream, hook)
    alice = running.client(users["alice"])
    await alice.connect()

    first = RawXmppClient(running.host, running.port, upstream.domain)
    assert await first.login(carol, upstream.users[carol], resource="resumable") == carol_jid
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

    second = RawXmppClient(running.host, running.port, upstream.domain)
    try:
        await second.connect()
        await second.starttls()
        await second.open_stream()
        await second.auth_plain(carol, upstream.users[carol])
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
        # The resumed session is still carol's: the hook sees her JID on new traffic.
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
    no_ack_trouble(upstream, users)


async def _quiet_messages(client: RawXmppClient, quiet_for: float = 0.5) -> list[ET.Element]:
    """Messages that still arrive until none has for ``quiet_for`` seconds."""
    found: list[ET.Element] = []
    while True:
        try:
            found += await client.messages(1, timeout=quiet_for)
        except AssertionError:
            return found


# -- how streams end ---------------------------------------------------------------------------


async def test_a_clean_close_gets_the_servers_last_ack_and_close(
    prosody: ProsodyServer, c2s_proxy: RunningProxy
) -> None:
    bob = c2s_proxy.client("bob")
    await bob.connect()
    raw = RawXmppClient(c2s_proxy.host, c2s_proxy.port, prosody.domain)
    jid = await raw.login("carol", prosody.users["carol"], resource="closing")
    sm = await raw.enable_sm()
    for _ in range(3):
        raw.send_message(bob.jid, unique("before closing"))
    raw.send(b"</stream:stream>")
    data = await raw.read_until_closed()
    # RFC 6120 §4.4 and XEP-0198: the server answers a close with its last <a/> and its own
    # close; the proxy lets both through before it hangs up.
    last_ack = re.search(rb"<a xmlns='urn:xmpp:sm:3' h=[\"'](\d+)[\"']/></stream:stream>$", data)
    assert last_ack is not None, data[-300:]
    assert int(last_ack.group(1)) == sm.outbound == 3
    # Bob's copies travel on his own connection: wait for each, then check there is no more.
    for _ in range(3):
        await bob.next_message()
    assert await bob.drain() == []
    await wait_until(lambda: c2s_proxy.sessions_of("carol@localhost") == [])
    assert jid == "carol@localhost/closing"


async def test_a_servers_stream_error_reaches_the_client(
    prosody: ProsodyServer, c2s_proxy: RunningProxy
) -> None:
    first = RawXmppClient(c2s_proxy.host, c2s_proxy.port, prosody.domain)
    await first.login("carol", prosody.users["carol"], resource="same")
    second = RawXmppClient(c2s_proxy.host, c2s_proxy.tls_port, prosody.domain)
    try:
        # Same resource again: Prosody replaces the first session with a <conflict/> error.
        await second.login("carol", prosody.users["carol"], resource="same", direct_tls=True)
        data = await first.read_until_closed()
        assert stream_error_in(data, "conflict"), data[-300:]
        await second.presence()
    finally:
        await second.close()


async def test_a_failing_hook_costs_only_its_own_stream(
    prosody: ProsodyServer, proxy_factory: ProxyFactory
) -> None:
    poison = unique("poison")

    def rule(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if has_body(element, poison):
            raise RuntimeError("the hook broke")
        return None

    running = await proxy_factory(RecordingHook([rule]))
    alice = running.client("alice")
    bob = running.client("bob")
    await alice.connect()
    await bob.connect()
    before = closed_count("internal-server-error")
    raw = RawXmppClient(running.host, running.port, prosody.domain)
    await raw.login("carol", prosody.users["carol"])
    raw.send_message(bob.jid, poison)
    data = await raw.read_until_closed()
    assert stream_error_in(data, "internal-server-error"), data[-300:]
    await wait_until(lambda: closed_count("internal-server-error") == before + 1)
    body = unique("unaffected")
    alice.send_chat(bob.jid, body)
    assert (await bob.next_message()).body == body
    assert poison not in [m.body for m in await bob.drain()]
