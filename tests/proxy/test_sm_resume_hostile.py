"""Resumptions the proxy must not pass on as they are: forged ids, overreaching or garbage
`h`, and the server's `<failed h/>` for an expired session (translated, never raw).

One in-process proxy (the in-memory SM store) in front of a real Prosody; the phone is the raw
client. Two replicas sharing Redis: tests/stanzaguard/test_sm_across_proxies.py.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from archive_api.store.records import Direction
from proxy.c2s import _failed_with_h
from proxy.hook import Decision, SessionInfo
from proxy.sm import SmState
from proxy.stream import Element
from tests.conftest import ProsodyFactory, ProxyFactory
from tests.support.prosody import ProsodyConfig, ProsodyServer
from tests.support.proxy import RecordingHook, RunningProxy, wait_until
from tests.support.rawxmpp import SM_NS, RawXmppClient, SmCounters, StreamEnded, local

pytestmark = pytest.mark.integration

STANZA_ERRORS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"


async def broken_phone(
    running: RunningProxy, prosody: ProsodyServer, *, messages_to_self: int = 0
) -> SmCounters:
    """Carol with SM, who sends ``messages_to_self`` and then loses her connection."""
    phone = RawXmppClient(running.host, running.port, prosody.domain)
    await phone.login("carol", prosody.users["carol"], resource="phone")
    await phone.presence()
    sm = await phone.enable_sm()
    for n in range(messages_to_self):
        phone.send_message("carol@localhost/phone", f"note {n}")
    if messages_to_self:
        assert await phone.request_ack() == sm.outbound
    phone.abort()
    await wait_until(lambda: not running.sessions_of("carol@localhost"))
    return sm


async def new_stream(running: RunningProxy, prosody: ProsodyServer) -> RawXmppClient:
    client = RawXmppClient(running.host, running.port, prosody.domain)
    await client.connect()
    await client.starttls()
    await client.open_stream()
    await client.auth_plain("carol", prosody.users["carol"])
    return client


async def answer_to(client: RawXmppClient, resume: bytes) -> ET.Element:
    client.send(resume)
    return await client.wait_for(lambda e: local(e.tag)[0] == SM_NS and local(e.tag)[1] != "r")


def condition(answer: ET.Element) -> str:
    assert local(answer.tag) == (SM_NS, "failed"), ET.tostring(answer)
    [name] = [local(c.tag)[1] for c in answer if local(c.tag)[0] == STANZA_ERRORS_NS]
    return name


async def test_forged_ids_and_overreaching_h_are_refused_by_the_proxy(
    prosody: ProsodyServer, proxy_factory: ProxyFactory
) -> None:
    running = await proxy_factory()
    sm = await broken_phone(running, prosody, messages_to_self=2)
    assert sm.sm_id
    client = await new_stream(running, prosody)
    try:
        for forged in ("nope", "A" * 4000, "&lt;x/&gt;", "\u00e9\u0301", sm.sm_id.upper() + "x"):
            resume = f"<resume xmlns='{SM_NS}' previd='{forged}' h='0'/>".encode()
            assert condition(await answer_to(client, resume)) == "item-not-found"
        too_many = f"<resume xmlns='{SM_NS}' previd='{sm.sm_id}' h='{sm.inbound + 1}'/>"
        assert condition(await answer_to(client, too_many.encode())) == "unexpected-request"
        wrapped = f"<resume xmlns='{SM_NS}' previd='{sm.sm_id}' h='{2**32 - 1}'/>"
        assert condition(await answer_to(client, wrapped.encode())) == "unexpected-request"
        # None of it reached the server: the genuine resumption still works.
        client.sm = sm
        assert await client.resume(sm.sm_id, sm.inbound) == sm.outbound == 2
    finally:
        await client.close()
    assert "acknowledged" not in prosody.log_text()


@pytest.mark.parametrize("h", ["-1", "4294967296", "1e3", "", "0x10", "1_0", " 1", "\uff11"])
async def test_a_garbage_h_in_resume_ends_the_stream_as_invalid_xml(
    prosody: ProsodyServer, proxy_factory: ProxyFactory, h: str
) -> None:
    running = await proxy_factory()
    sm = await broken_phone(running, prosody)
    client = await new_stream(running, prosody)
    try:
        client.send(f"<resume xmlns='{SM_NS}' previd='{sm.sm_id}' h='{h}'/>".encode())
        with pytest.raises(StreamEnded, match="invalid-xml"):
            await client.next_element()
    finally:
        await client.close()


async def test_the_servers_failed_h_is_translated_for_an_expired_session(
    prosody_factory: ProsodyFactory, proxy_factory: ProxyFactory
) -> None:
    """Prosody answers a resumption of an expired session with ``<failed h/>``: how many of
    the client's stanzas it received. The proxy dropped one, so the client sent one more."""
    prosody = prosody_factory(
        ProsodyConfig(extra_global="smacks_hibernation_time = 1", log_level="debug")
    )

    def drop_secret(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if direction is Direction.FROM_CLIENT and b"<body>secret</body>" in element.data:
            return Decision.drop()
        return None

    running = await proxy_factory(RecordingHook([drop_secret]), server=prosody)
    phone = RawXmppClient(running.host, running.port, prosody.domain)
    await phone.login("carol", prosody.users["carol"], resource="phone")
    sm = await phone.enable_sm()
    phone.send_message("bob@localhost", "first")
    phone.send_message("bob@localhost", "secret")
    phone.send_message("bob@localhost", "third")
    assert await phone.request_ack() == sm.outbound == 3
    phone.abort()
    await wait_until(lambda: "Destroying session for hibernating too long" in prosody.log_text())
    client = await new_stream(running, prosody)
    try:
        resume = f"<resume xmlns='{SM_NS}' previd='{sm.sm_id}' h='{sm.inbound}'/>".encode()
        answer = await answer_to(client, resume)
        assert condition(answer) == "item-not-found"
        assert answer.get("h") == "3"  # Prosody said 2: it never got the dropped one
        assert await client.bind("fresh") == "carol@localhost/fresh"
    finally:
        await client.close()


def _resuming_with_one_drop_to_the_server() -> SmState:
    state = SmState("sm-1")
    state.to_server.forwarded()
    state.to_server.dropped()
    state.to_server.forwarded()
    return state


@pytest.mark.parametrize(
    ("failed", "expected"),
    [
        (b"<failed xmlns='urn:xmpp:sm:3' h='2'/>", b"<failed xmlns='urn:xmpp:sm:3' h='3'/>"),
        (
            b'<failed xmlns="urn:xmpp:sm:3" h="2" previd="x"><item-not-found/></failed>',
            b'<failed xmlns="urn:xmpp:sm:3" previd="x" h=\'3\'><item-not-found/></failed>',
        ),
        # Out of range or not a number: left out rather than passed on.
        (b"<failed xmlns='urn:xmpp:sm:3' h='99999999999'/>", b"<failed xmlns='urn:xmpp:sm:3'/>"),
        (b"<failed xmlns='urn:xmpp:sm:3' h='x'/>", b"<failed xmlns='urn:xmpp:sm:3'/>"),
    ],
)
def test_failed_h_is_translated_or_left_out(failed: bytes, expected: bytes) -> None:
    assert _failed_with_h(failed, _resuming_with_one_drop_to_the_server()) == expected


def test_failed_h_without_a_known_mapping_is_left_out() -> None:
    assert _failed_with_h(b"<failed xmlns='urn:xmpp:sm:3' h='2'/>", None) == (
        b"<failed xmlns='urn:xmpp:sm:3'/>"
    )
