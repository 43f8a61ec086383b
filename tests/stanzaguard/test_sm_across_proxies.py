"""Issue 6: a client resumes its XEP-0198 session through another proxy replica.

Two real proxies in front of one Prosody share stream-management states through a real
redis-server. The proxies drop a stanza (so the `h` mapping is not the identity) and the
first also injects one; the client's connection breaks, it resumes through the second proxy,
and Prosody must neither close the stream (an `h` it never sent) nor resend what the client
already has: every message arrives exactly once, counted by id.

Hostile resumptions end in a `<failed/>` from the proxy (a wrong `h` is never passed on),
after which the client binds a fresh session on the same stream.
"""

from __future__ import annotations

import asyncio
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from archive_api.store.records import Direction
from classifier.verdict import Action
from proxy.c2s import ClientSession
from proxy.hook import Decision, SessionInfo
from proxy.redis_state import SM_KEY_PREFIX, RedisSmStore
from proxy.sm import SmStoreUnavailable
from proxy.stream import Element
from stanzaguard.settings import Settings
from tests.conftest import ProxyFactory
from tests.stanzaguard.conftest import ArchivingFactory
from tests.support.clients import ChatClient
from tests.support.prosody import ProsodyServer
from tests.support.proxy import RecordingHook, Rule, RunningProxy, wait_until
from tests.support.rawxmpp import CLIENT_NS, SM_NS, RawXmppClient, SmCounters, local
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

CAROL = "carol@localhost/phone"
STANZA_ERRORS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"


@dataclass
class Replicas:
    first: RunningProxy
    second: RunningProxy
    first_store: RedisSmStore
    second_store: RedisSmStore
    first_hook: RecordingHook
    second_hook: RecordingHook


def drop_rule(bodies: tuple[str, ...]) -> Rule:
    """Both replicas run one policy: the same stanzas are dropped whichever one sees them."""
    needles = [f"<body>{body}</body>".encode() for body in bodies]

    def rule(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if direction is Direction.TO_CLIENT and any(n in element.data for n in needles):
            return Decision.drop()
        return None

    return rule


def inject_rule(on_body: str, injected: bytes) -> Rule:
    def rule(info: SessionInfo, direction: Direction, element: Element) -> Decision | None:
        if direction is Direction.TO_CLIENT and f"<body>{on_body}</body>".encode() in element.data:
            return Decision(inject_to_client=(injected,))
        return None

    return rule


class Burst:
    """Numbered messages from alice to carol; the policy drops two, the first replica injects
    one in between (so the mapping is off by one after all three, not back to the identity)."""

    def __init__(self, total: int = 30) -> None:
        self.bodies = [f"m{i:02d} {uuid.uuid4().hex[:6]}" for i in range(total)]
        self.dropped = (self.bodies[2], self.bodies[6])
        self.inject_on = self.bodies[4]
        self.injected_id = f"inj-{uuid.uuid4().hex[:8]}"
        self.injected = (
            f"<message xmlns='jabber:client' from='localhost' to='{CAROL}' type='chat' "
            f"id='{self.injected_id}'><body>from the proxy</body></message>"
        ).encode()
        self.ids: list[str] = []

    async def send(self, alice: ChatClient) -> None:
        for body in self.bodies:
            self.ids.append(alice.send_chat(CAROL, body, id=f"burst-{body[:3]}-{body[4:]}"))
            await asyncio.sleep(0.01)

    @property
    def expected_ids(self) -> Counter[str]:
        kept = [i for i, b in zip(self.ids, self.bodies, strict=True) if b not in self.dropped]
        return Counter([*kept, self.injected_id])


@pytest.fixture
async def replicas(
    prosody: ProsodyServer, proxy_factory: ProxyFactory, redis_server: RedisServer
) -> AsyncIterator[tuple[Replicas, Burst]]:
    burst = Burst()
    first_store = RedisSmStore.from_url(redis_server.url, ttl=600)
    second_store = RedisSmStore.from_url(redis_server.url, ttl=600)
    first_hook = RecordingHook(
        [drop_rule(burst.dropped), inject_rule(burst.inject_on, burst.injected)]
    )
    second_hook = RecordingHook([drop_rule(burst.dropped)])
    first = await proxy_factory(first_hook, sm_registry=first_store)
    second = await proxy_factory(second_hook, sm_registry=second_store)
    yield Replicas(first, second, first_store, second_store, first_hook, second_hook), burst
    await first.stop()
    await second.stop()
    await first_store.close()
    await second_store.close()


def message_ids(elements: list[ET.Element]) -> list[str]:
    return [e.get("id", "") for e in elements if e.tag == f"{{{CLIENT_NS}}}message"]


def no_ack_trouble(prosody: ProsodyServer) -> None:
    log = prosody.log_text()
    for complaint in ("acknowledged more stanzas", "The client says it handled", "less stanzas"):
        assert complaint not in log, prosody.diagnostics()


async def phone_on(running: RunningProxy, prosody: ProsodyServer) -> RawXmppClient:
    phone = RawXmppClient(running.host, running.port, prosody.domain)
    assert await phone.login("carol", prosody.users["carol"], resource="phone") == CAROL
    await phone.presence()
    return phone


async def authenticated_stream(running: RunningProxy, prosody: ProsodyServer) -> RawXmppClient:
    """A new TCP connection (a new local port), TLS and SASL, not yet bound or resumed."""
    client = RawXmppClient(running.host, running.port, prosody.domain)
    await client.connect()
    await client.starttls()
    await client.open_stream()
    await client.auth_plain("carol", prosody.users["carol"])
    return client


async def sm_answer(client: RawXmppClient, previd: str, h: int) -> ET.Element:
    """Send ``<resume/>``; the SM element that answers it (``<resumed/>`` or ``<failed/>``)."""
    client.send(f"<resume xmlns='{SM_NS}' previd='{previd}' h='{h}'/>".encode())
    return await client.wait_for(lambda e: local(e.tag)[0] == SM_NS and local(e.tag)[1] != "r")


def failed_condition(answer: ET.Element) -> str:
    assert local(answer.tag) == (SM_NS, "failed"), ET.tostring(answer)
    [condition] = [local(c.tag)[1] for c in answer if local(c.tag)[0] == STANZA_ERRORS_NS]
    return condition


async def receive_until(client: RawXmppClient, received: list[str], count: int) -> None:
    while len(received) < count:
        received += message_ids(await client.messages(1))


async def quiet_ids(client: RawXmppClient, quiet_for: float = 0.5) -> list[str]:
    found: list[str] = []
    while True:
        try:
            found += message_ids(await client.messages(1, timeout=quiet_for))
        except AssertionError:
            return found


@pytest.mark.parametrize("how", ["abort", "vanish"])
async def test_resuming_through_another_replica_loses_and_repeats_nothing(
    prosody: ProsodyServer, replicas: tuple[Replicas, Burst], how: str
) -> None:
    """``abort``: the connection is reset, the first replica sees it end and writes final
    counts. ``vanish``: the old socket just goes quiet (a phone that changed networks), so
    the first replica still carries the session when the second one resumes it and reads the
    state written at the drop and injection, with lagging counts."""
    pair, burst = replicas
    alice = pair.second.client("alice")  # the sender may be on either replica
    await alice.connect()
    phone = await phone_on(pair.first, prosody)
    sm = await phone.enable_sm()
    assert sm.sm_id
    sender = asyncio.create_task(burst.send(alice))
    received: list[str] = []
    await receive_until(phone, received, 10)  # past the drop and the injection
    own = [
        phone.send_message("alice@localhost", f"mine {n} {uuid.uuid4().hex[:6]}") for n in (1, 2)
    ]
    await phone.drain()
    h = sm.inbound
    if how == "abort":
        phone.abort()
        await wait_until(lambda: not pair.first.sessions_of("carol@localhost"))
    await sender

    second = await authenticated_stream(pair.second, prosody)
    try:
        second.sm = sm
        await second.resume(sm.sm_id, h)
        await receive_until(second, received, sum(burst.expected_ids.values()))
        received += await quiet_ids(second)
        assert Counter(received) == burst.expected_ids  # each once, across both connections
        # Both of carol's own messages reached alice once, and the server counts them.
        assert await second.request_ack() == sm.outbound
        got = await alice.ids_until(own)
        assert sorted(i for i in got if i in own) == sorted(own)
        after = alice.send_chat(CAROL, "after resumption")
        assert message_ids(await second.messages(1)) == [after]
        [seen] = pair.second_hook.stanzas(Direction.TO_CLIENT, b"after resumption")
        assert seen.bound_jid == CAROL
    finally:
        await second.close()
        if how == "vanish":
            phone.abort()
    no_ack_trouble(prosody)


@pytest.mark.parametrize("trouble", ["redis-down", "garbage-state", "wrong-type"])
async def test_an_unreadable_state_fails_resumption_cleanly_and_a_fresh_bind_works(
    prosody: ProsodyServer,
    replicas: tuple[Replicas, Burst],
    redis_server: RedisServer,
    trouble: str,
) -> None:
    pair, _ = replicas
    phone = await phone_on(pair.first, prosody)
    sm = await phone.enable_sm()
    assert sm.sm_id
    phone.abort()
    await wait_until(lambda: not pair.first.sessions_of("carol@localhost"))
    if trouble == "redis-down":
        redis_server.stop()
    else:
        raw = redis.Redis.from_url(redis_server.url)
        for key in raw.keys(f"{SM_KEY_PREFIX}*"):
            if trouble == "wrong-type":
                raw.delete(key)
                raw.rpush(key, b"not a hash")
            else:
                raw.hset(key, "data", b'{"v": 1, "id": "x", "to_client": 5}')
        raw.close()
    second = await authenticated_stream(pair.second, prosody)
    try:
        answer = await sm_answer(second, sm.sm_id, 0)
        assert failed_condition(answer) == "internal-server-error"
        assert answer.get("h") is None  # no count the proxy cannot vouch for
        assert await second.bind("fresh") == "carol@localhost/fresh"
        await second.presence()
    finally:
        await second.close()


async def test_forged_and_overreaching_resumptions_are_refused(
    prosody: ProsodyServer, replicas: tuple[Replicas, Burst]
) -> None:
    pair, _ = replicas
    alice = pair.second.client("alice")
    await alice.connect()
    phone = await phone_on(pair.first, prosody)
    sm = await phone.enable_sm()
    assert sm.sm_id
    for n in range(3):
        alice.send_chat(CAROL, f"before the break {n}")
    await phone.messages(3)
    phone.abort()
    await wait_until(lambda: not pair.first.sessions_of("carol@localhost"))

    second = await authenticated_stream(pair.second, prosody)
    try:
        for forged in ("not-an-id", "x" * 3000, "' h='99", sm.sm_id + "0"):
            quoted = forged.replace("'", "&apos;")
            answer = await sm_answer(second, quoted, 0)
            assert failed_condition(answer) == "item-not-found"
        # Claims to have handled more than it was ever sent: refused before the server sees it.
        answer = await sm_answer(second, sm.sm_id, sm.inbound + 5)
        assert failed_condition(answer) == "unexpected-request"
        # The genuine resumption still works on the same stream, nothing lost.
        second.sm = sm
        assert await second.resume(sm.sm_id, sm.inbound) == sm.outbound
        alice.send_chat(CAROL, "after the refusals")
        [message] = await second.messages(1)
        assert message.findtext(f"{{{CLIENT_NS}}}body") == "after the refusals"
    finally:
        await second.close()
    no_ack_trouble(prosody)


# -- the whole service: settings wire the shared states -------------------------------------------

BASE_POLICY = 'version = 1\nlocal_domains = ["localhost", "conference.localhost"]\n'
FLAGGING_POLICY = BASE_POLICY + '[[lexicons]]\nname = "secrecy"\nterms = ["off the record"]\n'


async def test_two_services_share_sm_states_and_the_policy_in_force(
    prosody: ProsodyServer, archiving_factory: ArchivingFactory, redis_server: RedisServer
) -> None:
    shared: dict[str, Any] = {
        "redis_url": redis_server.url,
        "sm_store": "redis",
        "policy_sync": "redis",
    }
    first = await archiving_factory(policy=BASE_POLICY, **shared)
    second = await archiving_factory(policy=BASE_POLICY, **shared)
    assert first.service.policy.current.fingerprint == second.service.policy.current.fingerprint

    # A policy edit on the first replica's machine: the second one enforces it too.
    assert first.policy_path is not None
    first.policy_path.write_text(FLAGGING_POLICY)
    await wait_until(lambda: second.service.policy.current.policy.lexicons != (), timeout=15)
    assert first.service.policy.current.fingerprint == second.service.policy.current.fingerprint
    bob = second.client("bob")
    await bob.connect()

    # Carol's phone enables SM on the first replica and resumes through the second.
    phone = RawXmppClient(first.host, first.port, prosody.domain)
    await phone.login("carol", prosody.users["carol"], resource="phone")
    await phone.presence()
    sm = await phone.enable_sm()
    assert sm.sm_id
    phone.send_message(bob.jid, "before the break")
    assert (await bob.next_message()).body == "before the break"
    phone.abort()
    resumed = RawXmppClient(second.host, second.port, prosody.domain)
    try:
        await resumed.connect()
        await resumed.starttls()
        await resumed.open_stream()
        await resumed.auth_plain("carol", prosody.users["carol"])
        resumed.sm = sm
        assert await resumed.resume(sm.sm_id, sm.inbound) == sm.outbound == 1
        flagged = resumed.send_message(bob.jid, "this is off the record")
        assert (await bob.next_message()).body == "this is off the record"
        assert await resumed.request_ack() == sm.outbound == 2
    finally:
        await resumed.close()
    # Judged on the second replica by the policy edited on the first.
    await second.drain()
    page = await second.store.search("type:chat", limit=100)
    [record] = [hit.record for hit in page.hits if hit.record.message_id == flagged]
    assert record.verdict.action is Action.FLAG, record.verdict
    no_ack_trouble(prosody)


def test_shared_states_need_a_redis_url(tmp_path: Path) -> None:
    for setting in ("sm_store", "policy_sync"):
        chosen: dict[str, Any] = {setting: "redis"}
        with pytest.raises(ValidationError, match="redis_url"):
            Settings(domain=["localhost"], data_dir=tmp_path, **chosen)
    with pytest.raises(ValidationError):
        Settings(domain=["localhost"], data_dir=tmp_path, sm_resume_timeout=0)


class GatedSaves:
    """The first replica's SM store, with its writes held at a gate (or failing) on demand."""

    def __init__(self, store: RedisSmStore) -> None:
        self.store = store
        self.real = store.save
        self.open = asyncio.Event()
        self.open.set()
        self.fail = False
        self.waiting = 0

    async def save(self, state: Any, *, detached: bool = False) -> None:
        self.waiting += 1
        try:
            await self.open.wait()
        finally:
            self.waiting -= 1
        if self.fail and not detached:
            raise SmStoreUnavailable("redis said no")
        await self.real(state, detached=detached)


@dataclass
class GatedPhone:
    gate: GatedSaves
    phone: RawXmppClient
    sm: SmCounters
    sm_id: str
    session: ClientSession


async def gated_phone(
    pair: Replicas, prosody: ProsodyServer, monkeypatch: pytest.MonkeyPatch
) -> GatedPhone:
    """Carol on the first replica with SM enabled, that replica's SM writes behind a gate."""
    gate = GatedSaves(pair.first_store)
    monkeypatch.setattr(pair.first_store, "save", gate.save)
    phone = await phone_on(pair.first, prosody)
    sm = await phone.enable_sm()
    assert sm.sm_id
    [session] = pair.first.sessions_of("carol@localhost")
    return GatedPhone(gate, phone, sm, sm.sm_id, session)


def released(to: str) -> tuple[str, bytes]:
    ident = f"rel-{uuid.uuid4().hex[:8]}"
    data = (
        f"<message xmlns='jabber:client' from='alice@localhost/x' to='{to}' type='chat' "
        f"id='{ident}'><body>released by an officer</body></message>"
    ).encode()
    return ident, data


async def test_a_delivered_message_waits_for_its_mapping_and_is_not_repeated_on_resumption(
    prosody: ProsodyServer, replicas: tuple[Replicas, Burst], monkeypatch: pytest.MonkeyPatch
) -> None:
    pair, _ = replicas
    carol = await gated_phone(pair, prosody, monkeypatch)
    gate, phone, sm, session = carol.gate, carol.phone, carol.sm, carol.session
    ident, data = released(CAROL)

    gate.open.clear()
    session.deliver(Direction.TO_CLIENT, data)  # what the quarantine's release does
    await wait_until(lambda: gate.waiting == 1)
    assert await quiet_ids(phone, 0.5) == []  # held while the mapping is being written
    gate.open.set()
    assert message_ids(await phone.messages(1)) == [ident]

    # The saved mapping counts it: resuming elsewhere with this h repeats nothing.
    h = sm.inbound
    phone.abort()
    await wait_until(lambda: not pair.first.sessions_of("carol@localhost"))
    second = await authenticated_stream(pair.second, prosody)
    try:
        second.sm = sm
        await second.resume(carol.sm_id, h)
        assert ident not in await quiet_ids(second)
        alice = pair.second.client("alice")
        await alice.connect()
        after = alice.send_chat(CAROL, "after the release")
        assert message_ids(await second.messages(1)) == [after]
    finally:
        await second.close()
    no_ack_trouble(prosody)


async def test_a_failed_mapping_write_after_a_delivery_ends_the_sm_session(
    prosody: ProsodyServer, replicas: tuple[Replicas, Burst], monkeypatch: pytest.MonkeyPatch
) -> None:
    pair, _ = replicas
    carol = await gated_phone(pair, prosody, monkeypatch)
    gate, phone, sm, session = carol.gate, carol.phone, carol.sm, carol.session
    _, data = released(CAROL)
    gate.fail = True
    session.deliver(Direction.TO_CLIENT, data)
    # The proxy closes the server's stream; the server's close ends the client's stream too.
    await phone.read_until_closed(timeout=10)
    await wait_until(lambda: not pair.first.sessions_of("carol@localhost"))
    # No replica can resume it: the server ended the SM session with the stream.
    second = await authenticated_stream(pair.second, prosody)
    try:
        answer = await sm_answer(second, carol.sm_id, sm.inbound)
        assert local(answer.tag) == (SM_NS, "failed"), ET.tostring(answer)
    finally:
        await second.close()
