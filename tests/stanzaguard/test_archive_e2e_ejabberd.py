"""Issue 3's conversation, archived exactly once, with Debian's ejabberd as the upstream.

The same whole archiving service as ``test_archive_e2e.py`` (proxy, spool, indexer, SQLite
store), in front of ejabberd instead of Prosody: Alice with two resources and carbons, Bob,
Carol offline then online, a three-occupant room, and a MAM replay from ejabberd's archive.
Every message must be one record with one observation per delivery, whatever the server.
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

from archive_api.store.base import ArchiveStore
from archive_api.store.records import ArchiveRecord, Direction, ObservationVia, RecordKind
from stanzaguard.wiring import ArchivingService
from tests.stanzaguard.conftest import receive, start_archiving_service
from tests.stanzaguard.test_archive_e2e import live_from, one, sightings, to
from tests.support.clients import ChatClient, TlsMode
from tests.support.ejabberd import EjabberdServer

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


@dataclass
class EjabberdArchiving:
    """A started ``ArchivingService`` in front of the shared ejabberd."""

    service: ArchivingService
    server: EjabberdServer
    host: str
    port: int
    clients: list[ChatClient] = field(default_factory=list)

    @property
    def store(self) -> ArchiveStore:
        return self.service.store

    def client(self, user: str, **kwargs: Any) -> ChatClient:
        client = ChatClient(
            self.server.jid(user),
            self.server.users[user],
            host=self.host,
            port=self.port,
            tls=TlsMode.STARTTLS,
            **kwargs,
        )
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            await client.disconnect()
        await self.service.stop()


@pytest.fixture
async def archiving(ejabberd: EjabberdServer, tmp_path: Path) -> AsyncIterator[EjabberdArchiving]:
    service = await start_archiving_service(
        ejabberd, data_dir=tmp_path / "stanzaguard", policy_path=None
    )
    (host, port), _ = service.bound
    running = EjabberdArchiving(service, ejabberd, host, port)
    try:
        yield running
    finally:
        await running.stop()


async def all_messages(store: ArchiveStore) -> list[ArchiveRecord]:
    records: list[ArchiveRecord] = []
    for query in ("type:chat", "type:groupchat"):
        page = await store.search(query, limit=1000)
        assert page.next_cursor is None
        records += [hit.record for hit in page.hits]
    return records


async def test_conversation_archived_once_with_every_delivery(
    ejabberd: EjabberdServer, archiving: EjabberdArchiving
) -> None:
    users = ejabberd.register_fresh("alice", "bob", "carol")
    room = f"desk-{uuid.uuid4().hex[:8]}@{ejabberd.muc_domain}"
    laptop = archiving.client(users["alice"], resource="laptop", carbons=True, muc=True)
    phone = archiving.client(users["alice"], resource="phone", carbons=True, plugins=["xep_0313"])
    bob = archiving.client(users["bob"], resource="desk", muc=True)
    carol = archiving.client(users["carol"], resource="home", muc=True)
    await laptop.connect()
    await phone.connect()
    await bob.connect()
    a1, a2, b = laptop.jid, phone.jid, bob.jid
    bob_bare, carol_bare = ejabberd.jid(users["bob"]), ejabberd.jid(users["carol"])
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

    # 3. Bob to Carol while she is offline: mod_offline keeps it until she logs in.
    body = "call me when you are back"
    offline_id = bob.send_chat(carol_bare, body)
    sent[offline_id] = body
    for _ in range(200):
        if ejabberd.offline_count(users["carol"]) == 1:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("ejabberd did not store the message for offline Carol")
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

    # 5. Alice's phone replays her conversation with Bob from ejabberd's archive (MAM).
    replay = await phone.xmpp.plugin["xep_0313"].retrieve(with_jid=JID(bob_bare))
    replayed = [r["mam_result"]["forwarded"]["stanza"]["id"] for r in replay["mam"]["results"]]
    assert sorted(replayed) == sorted(ids)

    await archiving.service.indexer.drain()
    records = await all_messages(archiving.store)
    bodies = Counter(r.body for r in records)
    for body in (*sent.values(), *groupchat.values()):
        assert bodies[body] == 1, f"{body!r} archived {bodies[body]} times"
    for message_id in (*sent, *groupchat):
        record = one(records, message_id)
        assert record.kind is RecordKind.MESSAGE
        assert await archiving.store.get(record.record_id) == record

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
    offline = one(records, offline_id)
    assert offline.direction is Direction.FROM_CLIENT
    assert offline.sender_full == b
    assert sightings(offline) == {live_from(b), to(c, ObservationVia.OFFLINE)}

    occupants = (a1, b, c)
    for (message_id, body), author in zip(groupchat.items(), occupants, strict=True):
        record = one(records, message_id)
        assert (record.room, record.stanza_type, record.body) == (room, "groupchat", body)
        assert sightings(record) == {
            live_from(author),
            *(to(occupant, ObservationVia.MUC_REFLECTION) for occupant in occupants),
        }

    per_id = Counter(r.message_id for r in records if r.message_id in (*sent, *groupchat))
    assert set(per_id.values()) == {1}
    assert len(per_id) == len(sent) + len(groupchat)
    report = await archiving.store.verify()
    assert report.ok, report.problems
