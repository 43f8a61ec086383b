"""Issue 3, end to end: every message of a real multi-client conversation is archived once.

The whole archiving service (proxy, spool, indexer, SQLite store) in front of each test server
in turn (``upstream``: ids ``[prosody]`` and ``[ejabberd]``), slixmpp clients through it.
Alice has two resources with carbons on, Bob one, Carol logs in late; they chat, meet in a
three-occupant room, correct and retract. Afterwards the store must hold each message exactly
once, with one observation for every place it was delivered: Bob's resource, Alice's second
resource (carbon), each occupant's reflection, Carol's offline redelivery, the MAM replay.
Corrections and retractions are records of their own, linked to the original, which stays
readable. The policy scenario runs against Prosody only (its log shows what reached it).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.stanza import Presence
from slixmpp.xmlstream import ET

from archive_api.store.base import ArchiveStore
from archive_api.store.records import (
    ArchiveRecord,
    Direction,
    ObservationVia,
    RecordKind,
    RecordStatus,
)
from classifier.verdict import Action
from stanzaguard.wiring import ArchivingService
from tests.stanzaguard.conftest import (
    ArchivingFactory,
    ArchivingProxy,
    receive,
    server_archived_bodies,
    stanza_error,
    start_archiving_service,
)
from tests.support.clients import ChatClient, ReceivedMessage
from tests.support.prosody import ProsodyServer
from tests.support.upstream import ServerUnderTest

ROOM = "desk@conference.localhost"
TIMEOUT = 10.0

Seen = tuple[str, ObservationVia, Direction]


def sightings(record: ArchiveRecord) -> set[Seen]:
    return {(o.jid, o.via, o.direction) for o in record.observations}


def live_from(jid: str) -> Seen:
    return (jid, ObservationVia.LIVE, Direction.FROM_CLIENT)


def to(jid: str, via: ObservationVia = ObservationVia.LIVE) -> Seen:
    return (jid, via, Direction.TO_CLIENT)


async def all_messages(store: ArchiveStore) -> list[ArchiveRecord]:
    records: list[ArchiveRecord] = []
    for query in ("type:chat", "type:groupchat"):
        page = await store.search(query, limit=1000)
        assert page.next_cursor is None
        records += [hit.record for hit in page.hits]
    return records


def one(records: list[ArchiveRecord], message_id: str) -> ArchiveRecord:
    found = [r for r in records if r.message_id == message_id]
    assert len(found) == 1, f"{message_id}: {len(found)} records: {[r.body for r in found]}"
    return found[0]


@dataclass
class UpstreamArchiving:
    """A started ``ArchivingService`` in front of ``server``, with the clients made through it."""

    service: ArchivingService
    server: ServerUnderTest
    clients: list[ChatClient] = field(default_factory=list)

    @property
    def store(self) -> ArchiveStore:
        return self.service.store

    def client(self, user: str, **kwargs: Any) -> ChatClient:
        """An unconnected STARTTLS client for ``user`` of the server, through the service."""
        (host, port), _ = self.service.bound
        password = self.server.users[user]
        client = ChatClient(self.server.jid(user), password, host=host, port=port, **kwargs)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            await client.disconnect()
        await self.service.stop()


@pytest.fixture
async def upstream_archiving(
    upstream: ServerUnderTest, tmp_path: Path
) -> AsyncIterator[UpstreamArchiving]:
    service = await start_archiving_service(
        upstream, data_dir=tmp_path / "stanzaguard", policy_path=None
    )
    running = UpstreamArchiving(service, upstream)
    try:
        yield running
    finally:
        await running.stop()


@pytest.mark.integration
async def test_conversation_archived_once_with_every_delivery(
    upstream: ServerUnderTest, upstream_archiving: UpstreamArchiving
) -> None:
    archiving = upstream_archiving
    users = upstream.register_fresh("alice", "bob", "carol")
    room = f"desk-{uuid.uuid4().hex[:8]}@{upstream.muc_domain}"
    laptop = archiving.client(users["alice"], resource="laptop", carbons=True, muc=True)
    phone = archiving.client(users["alice"], resource="phone", carbons=True, plugins=["xep_0313"])
    bob = archiving.client(users["bob"], resource="desk", muc=True)
    carol = archiving.client(users["carol"], resource="home", muc=True)
    await laptop.connect()
    await phone.connect()
    await bob.connect()
    a1, a2, b = laptop.jid, phone.jid, bob.jid
    assert (a1, a2, b) == (
        upstream.jid(users["alice"], "laptop"),
        upstream.jid(users["alice"], "phone"),
        upstream.jid(users["bob"], "desk"),
    )
    bob_bare, carol_bare = upstream.jid(users["bob"]), upstream.jid(users["carol"])
    sent: dict[str, str] = {}  # message id -> body

    # 1. Alice (laptop) to Bob's bare JID: Bob gets it, Alice's phone a sent-carbon.
    body = "Q3 numbers are in the shared folder"
    sent[laptop.send_chat(bob_bare, body)] = body
    await receive(bob, body)
    await receive(phone, body, carbon=True)

    # 2. Bob to Alice's laptop: the phone gets a received-carbon.
    body = "thanks, looking now"
    sent[bob.send_chat(a1, body)] = body
    await receive(laptop, body)
    await receive(phone, body, carbon=True)

    ids = list(sent)

    # 3. Bob to Carol while she is offline: the server stores it, delivers it when she logs in.
    body = "call me when you are back"
    offline_id = bob.send_chat(carol_bare, body)
    sent[offline_id] = body
    for _ in range(200):
        if upstream.offline_count(users["carol"]) == 1:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the server did not store the message for offline Carol")
    if isinstance(upstream, ProsodyServer):  # its store can be read: this very message
        assert [m.id for m in upstream.offline_messages(users["carol"])] == [offline_id]
    await carol.connect()
    c = carol.jid
    redelivered = await receive(carol, body)
    assert redelivered.delayed, "Carol's copy should be the offline redelivery (with <delay/>)"

    # 4. A three-occupant room; each groupchat message is reflected to every occupant.
    await laptop.join_room(room, "alice")
    await bob.join_room(room, "bob")
    await carol.join_room(room, "carol")
    groupchat: dict[str, str] = {}
    for sender, body in (
        (laptop, "stand-up in five minutes"),
        (bob, "I will dial in"),
        (carol, "running late, start without me"),
    ):
        groupchat[sender.send_groupchat(room, body)] = body
        for occupant in (laptop, bob, carol):
            reflection = await receive(occupant, body)
            assert reflection.type == "groupchat"

    # 5. A correction (XEP-0308) and a retraction (XEP-0424) of an earlier message.
    original = "the deal closes on Friday"
    original_id = laptop.send_chat(bob_bare, original)
    sent[original_id] = original
    await receive(bob, original)
    await receive(phone, original, carbon=True)
    corrected = "the deal closes on Monday"
    replace = ET.Element("{urn:xmpp:message-correct:0}replace", {"id": original_id})
    correction_id = laptop.send_chat(bob_bare, corrected, payload=[replace])
    sent[correction_id] = corrected
    await receive(bob, corrected)
    await receive(phone, corrected, carbon=True)
    retraction_text = "alice retracted a message"
    retract = ET.Element("{urn:xmpp:message-retract:1}retract", {"id": original_id})
    fallback = ET.Element("{urn:xmpp:fallback:0}fallback", {"for": "urn:xmpp:message-retract:1"})
    retraction_id = laptop.send_chat(bob_bare, retraction_text, payload=[retract, fallback])
    sent[retraction_id] = retraction_text
    await receive(bob, retraction_text)
    await receive(phone, retraction_text, carbon=True)

    # 6. Alice's phone replays her conversation with Bob from the server's archive (MAM).
    replay = await phone.xmpp.plugin["xep_0313"].retrieve(with_jid=JID(bob_bare))
    replayed = [r["mam_result"]["forwarded"]["stanza"]["id"] for r in replay["mam"]["results"]]
    with_bob = [ids[0], ids[1], original_id, correction_id, retraction_id]
    assert sorted(replayed) == sorted(with_bob)

    # Every copy of every message has been delivered; now index what the proxy spooled.
    await archiving.service.indexer.drain()
    records = await all_messages(archiving.store)
    bodies = Counter(r.body for r in records)
    for body in (*sent.values(), *groupchat.values()):
        assert bodies[body] == 1, f"{body!r} archived {bodies[body]} times"
    for message_id in (*sent, *groupchat):
        record = one(records, message_id)
        assert record.kind is RecordKind.MESSAGE
        # What `search` returned is what `get` returns.
        assert await archiving.store.get(record.record_id) == record

    # Chat: the sender's copy, the recipient's, the carbon to Alice's other resource, and the
    # MAM replay to that resource.
    assert sightings(one(records, ids[0])) == {
        live_from(a1),
        to(b),
        to(a2, ObservationVia.CARBON_SENT),
        to(a2, ObservationVia.MAM),
    }
    assert sightings(one(records, ids[1])) == {
        live_from(b),
        to(a1),
        to(a2, ObservationVia.CARBON_RECEIVED),
        to(a2, ObservationVia.MAM),
    }
    # Offline redelivery is an observation of the record made when Bob sent it.
    offline = one(records, offline_id)
    assert offline.direction is Direction.FROM_CLIENT
    assert offline.sender_full == b
    assert sightings(offline) == {live_from(b), to(c, ObservationVia.OFFLINE)}

    # Groupchat: the sender's copy plus one reflection per occupant (the sender included).
    occupants = (a1, b, c)
    for (message_id, body), author in zip(groupchat.items(), occupants, strict=True):
        record = one(records, message_id)
        assert (record.room, record.stanza_type, record.body) == (room, "groupchat", body)
        assert sightings(record) == {
            live_from(author),
            *(to(occupant, ObservationVia.MUC_REFLECTION) for occupant in occupants),
        }

    # Corrections and retractions: new records linked to the original, which stays readable.
    delivered = {
        live_from(a1),
        to(b),
        to(a2, ObservationVia.CARBON_SENT),
        to(a2, ObservationVia.MAM),
    }
    first = one(records, original_id)
    correction = one(records, correction_id)
    retraction = one(records, retraction_id)
    assert len({first.record_id, correction.record_id, retraction.record_id}) == 3
    assert (first.body, first.replaces_id, first.retracts_id) == (original, None, None)
    assert (correction.body, correction.replaces_id) == (corrected, original_id)
    assert retraction.retracts_id == original_id
    for record in (first, correction, retraction):
        assert sightings(record) == delivered
    kept = await archiving.store.get(first.record_id)
    assert kept is not None and kept.body == original
    edited = await archiving.store.search("is:edited", limit=100)
    assert {h.record.record_id for h in edited.hits} == {first.record_id, correction.record_id}
    retracted = await archiving.store.search("is:retracted", limit=100)
    assert {h.record.record_id for h in retracted.hits} == {
        first.record_id,
        retraction.record_id,
    }
    assert await archiving.store.count('"the deal closes"') == 2

    # Nothing else slipped in as a duplicate: one record per message id.
    per_id = Counter(r.message_id for r in records if r.message_id in (*sent, *groupchat))
    assert set(per_id.values()) == {1}
    assert len(per_id) == len(sent) + len(groupchat)
    # And the archive proves itself whole.
    report = await archiving.store.verify()
    assert report.ok, report.problems


# -- policy: a refused message is bounced, archived as rejected, and never reaches the server --

DENY_EVIL = """
version = 1
local_domains = ["localhost", "conference.localhost"]

[federation]
mode = "deny"
domains = ["evil.example", "*.evil.example"]
"""

DENY_OTHER = DENY_EVIL.replace('"evil.example", "*.evil.example"', '"other.example"')

# Alice's group may talk to partner.example only; everyone else keeps the default (allow all).
TRADERS_ALLOW_LIST = """
version = 1
local_domains = ["localhost", "conference.localhost"]

[groups.traders]
members = ["alice@localhost"]

[federation.groups.traders]
mode = "allow"
domains = ["partner.example"]
"""

SERVER_NOT_FOUND = "remote-server-not-found"


async def wait_for_reloads(running: ArchivingProxy, count: int) -> None:
    watcher = running.service.policy_watcher
    assert watcher is not None
    for _ in range(400):
        if watcher.reloads >= count:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(
        f"policy not reloaded (reloads={watcher.reloads}, errors={watcher.errors})"
    )


def errors(messages: list[ReceivedMessage]) -> list[str]:
    return [m.xml for m in messages if m.type == "error"]


async def test_denied_domain_is_bounced_archived_and_never_reaches_the_server(
    archiving_factory: ArchivingFactory,
) -> None:
    running = await archiving_factory(policy=DENY_EVIL)
    prosody = running.prosody
    alice = running.client("alice", resource="laptop", muc=True)
    bob = running.client("bob", resource="desk")
    await alice.connect()
    await bob.connect()
    assert running.service.policy_watcher is not None
    assert running.service.policy_watcher.reloads == 0

    body = "cheap watches, reply now"
    message_id = alice.send_chat("mallory@evil.example", body)
    bounce = await alice.next_message(TIMEOUT, where=lambda m: m.type == "error")
    assert bounce.id == message_id
    assert bounce.from_ == "mallory@evil.example"
    error_type, condition, text = stanza_error(bounce)
    assert (error_type, condition) == ("modify", "policy-violation")
    assert "federation with evil.example is not allowed" in text
    assert "deny-list entry 'evil.example'" in text
    # Had the proxy forwarded it, Prosody (which has no s2s) would answer with
    # remote-server-not-found and log the failed connection (the control below shows both).
    # Local traffic keeps flowing meanwhile.
    # Joining a room on a denied MUC service is refused the same way.
    refused_join: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_presence(presence: Presence) -> None:
        if presence["type"] == "error" and not refused_join.done():
            refused_join.set_result(str(presence))

    alice.xmpp.add_event_handler("presence", on_presence)
    alice.send_raw(
        "<presence to='lounge@conference.evil.example/alice'>"
        "<x xmlns='http://jabber.org/protocol/muc'/></presence>"
    )
    join_error = await asyncio.wait_for(refused_join, TIMEOUT)
    assert "policy-violation" in join_error
    assert "federation with conference.evil.example is not allowed" in join_error
    alice.send_chat("bob@localhost", "lunch?")
    await receive(bob, "lunch?")
    assert errors(await alice.drain(quiet_for=1.0)) == []
    assert "evil.example" not in prosody.log_text()
    assert "lunch?" in server_archived_bodies(prosody, "alice")
    assert body not in server_archived_bodies(prosody, "alice")

    await running.drain()
    page = await running.store.search("to:mallory@evil.example", limit=10)
    assert [h.record.message_id for h in page.hits] == [message_id]
    rejected = page.hits[0].record
    assert rejected.body == body
    assert rejected.verdict.action is Action.REJECT
    assert rejected.status is RecordStatus.REJECTED
    assert [r.rule_id for r in rejected.verdict.reasons] == ["federation"]
    assert sightings(rejected) == {live_from(alice.jid)}
    assert await running.store.count("verdict:reject") == 1

    # A new policy file is in force without a restart: evil.example is no longer denied,
    # so the next message goes to Prosody, which cannot reach evil.example and says so.
    assert running.policy_path is not None
    running.policy_path.write_text(DENY_OTHER)
    await wait_for_reloads(running, 1)
    alice.send_chat("mallory@evil.example", "second try")
    failed = await alice.next_message(TIMEOUT, where=lambda m: m.type == "error")
    assert stanza_error(failed)[1] == SERVER_NOT_FOUND
    # Prosody logs the attempt before the failure: wait for the failure line itself.
    for _ in range(200):
        if "failed outgoing connection to evil.example" in prosody.log_text():
            break
        await asyncio.sleep(0.05)
    assert "failed outgoing connection to evil.example" in prosody.log_text()
    assert "second try" in server_archived_bodies(prosody, "alice")

    # A per-group allow-list: Alice may only reach partner.example now; the room on the
    # local MUC service (listed in local_domains) is not federation and keeps working.
    running.policy_path.write_text(TRADERS_ALLOW_LIST)
    await wait_for_reloads(running, 2)
    alice.send_chat("mallory@evil.example", "third try")
    refused = await alice.next_message(TIMEOUT, where=lambda m: m.type == "error")
    _, condition, text = stanza_error(refused)
    assert condition == "policy-violation"
    assert "for group traders (not on the allow-list)" in text
    room_alice = running.client("alice", resource="room", muc=True)
    await room_alice.connect()
    await room_alice.join_room(ROOM, "alice")
    room_alice.send_groupchat(ROOM, "allow-list day")
    got = await room_alice.next_message(TIMEOUT, where=lambda m: m.body == "allow-list day")
    assert got.type == "groupchat", f"the room message was refused: {got}"

    await running.drain()
    verdicts = {
        h.record.body: (h.record.verdict.action, h.record.status)
        for h in (await running.store.search("from:alice@localhost", limit=100)).hits
    }
    assert verdicts["second try"] == (Action.ALLOW, RecordStatus.DELIVERED)
    assert verdicts["third try"] == (Action.REJECT, RecordStatus.REJECTED)
    assert verdicts["allow-list day"] == (Action.ALLOW, RecordStatus.DELIVERED)
