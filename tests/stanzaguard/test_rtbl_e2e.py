"""Real-time block lists end to end: pubsub node → RTBL subscriber → policy → bounce.

The whole service runs in front of a real Prosody whose ``pubsub.localhost`` hosts the lists
(published by ``rtbladmin``) and whose second host, ``remote.localhost``, plays another server
(the policy lists only ``localhost`` as local). Alice is connected through the proxy; the
remote senders connect straight to Prosody, so their messages reach the proxy on Alice's leg,
inbound, which is where block lists are applied. Publishing the sending domain, or the SHA-256
of the sender's JID, makes the proxy bounce the next message; retracting lets it through
again. Each wait polls with fresh messages until the outcome changes (generous deadline, no
timing assertion).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import pytest

from tests.conftest import ProsodyFactory
from tests.stanzaguard.conftest import (
    ArchivingFactory,
    ArchivingProxy,
    remote_clients,
    send,
    stanza_error,
)
from tests.support.clients import ChatClient, ReceivedMessage
from tests.support.prosody import ProsodyServer
from tests.support.rtbl import (
    DOMAINS_NODE,
    JIDS_NODE,
    REMOTE,
    RTBL_USER,
    RTBL_USERS,
    Publisher,
    eventually,
    jid_sha256,
    rtbl_prosody_config,
)

REMOTE_USERS = {"spammer": "spammer-secret", "friend": "friend-secret"}
SPAMMER = f"spammer@{REMOTE}"
TIMEOUT = 10.0
POLICY = """
version = 1
local_domains = ["localhost"]

[blocklists]
action = "reject"
"""

pytestmark = pytest.mark.integration


@pytest.fixture
def prosody(prosody_factory: ProsodyFactory) -> ProsodyServer:
    server = prosody_factory(rtbl_prosody_config(), users=RTBL_USERS)
    for user, password in REMOTE_USERS.items():
        server.register_on_host(REMOTE, user, password)
    return server


@pytest.fixture
async def publisher(prosody: ProsodyServer) -> AsyncIterator[Publisher]:
    operator = Publisher(prosody)
    await operator.connect()
    try:
        await operator.create(DOMAINS_NODE)
        await operator.create(JIDS_NODE)
        yield operator
    finally:
        await operator.disconnect()


@pytest.fixture
async def remote(prosody: ProsodyServer) -> AsyncIterator[Callable[[str], Awaitable[ChatClient]]]:
    """Connected clients of ``remote.localhost`` users, straight to Prosody (no proxy)."""
    async with remote_clients(prosody, REMOTE, REMOTE_USERS) as connect:
        yield connect


async def start_service(
    archiving_factory: ArchivingFactory, prosody: ProsodyServer
) -> ArchivingProxy:
    service = prosody.pubsub_domain
    running = await archiving_factory(
        policy=POLICY,
        rtbl_jid=prosody.jid(RTBL_USER),
        rtbl_password=prosody.users[RTBL_USER],
        rtbl_server=f"{prosody.host}:{prosody.c2s_port}",
        rtbl_ca_file=prosody.tls.ca,
        rtbl_nodes=[f"{service}/{DOMAINS_NODE}", f"{service}/{JIDS_NODE}"],
    )
    rtbl = running.service.rtbl
    assert rtbl is not None
    await eventually(rtbl.synced.is_set, "the RTBL subscriber fetched its nodes")
    return running


async def poll_until(
    want: Literal["delivered", "bounced"], sender: ChatClient, recipient: ChatClient, what: str
) -> ReceivedMessage:
    """Send probes until one is ``want``; return that message or bounce."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    probe = 0
    while True:
        probe += 1
        outcome, message = await send(sender, recipient, f"{what} #{probe}")
        if outcome == want:
            return message
        if loop.time() > deadline:
            raise AssertionError(f"not {want} within {TIMEOUT}s: {what}")
        await asyncio.sleep(0.02)


async def test_publishing_blocks_a_remote_sender_and_retracting_unblocks(
    archiving_factory: ArchivingFactory,
    prosody: ProsodyServer,
    publisher: Publisher,
    remote: Callable[[str], Awaitable[ChatClient]],
) -> None:
    running = await start_service(archiving_factory, prosody)
    alice = running.client("alice")
    await alice.connect()
    spammer = await remote("spammer")
    friend = await remote("friend")
    assert (await send(spammer, alice, "hello, before any listing"))[0] == "delivered"

    # The sending domain is published: the next message from it is bounced.
    await publisher.publish(DOMAINS_NODE, REMOTE)
    bounce = await poll_until("bounced", spammer, alice, "domain listed")
    _, condition, text = stanza_error(bounce)
    assert condition == "policy-violation"
    assert f"domain {REMOTE} is on a block list ({prosody.pubsub_domain}/{DOMAINS_NODE})" in text
    assert (await send(friend, alice, "me too?"))[0] == "bounced"  # the whole domain

    await publisher.retract(DOMAINS_NODE, REMOTE)
    await poll_until("delivered", spammer, alice, "domain retracted")
    assert (await send(friend, alice, "back again"))[0] == "delivered"

    # Only the sender's JID, as its SHA-256: the rest of the domain still gets through.
    await publisher.publish(JIDS_NODE, jid_sha256(SPAMMER))
    bounce = await poll_until("bounced", spammer, alice, "JID hash listed")
    _, condition, text = stanza_error(bounce)
    assert condition == "policy-violation"
    assert f"address {SPAMMER} is on a block list ({prosody.pubsub_domain}/{JIDS_NODE})" in text
    assert (await send(friend, alice, "just me"))[0] == "delivered"

    await publisher.retract(JIDS_NODE, jid_sha256(SPAMMER))
    await poll_until("delivered", spammer, alice, "JID hash retracted")

    # The refusals are in the archive, with the block-list rule as the reason.
    await running.drain()
    page = await running.store.search("verdict:reject", limit=10)
    bodies = sorted(h.record.body or "" for h in page.hits)
    assert len(bodies) == 3, bodies
    assert bodies[0].startswith("JID hash listed #")
    assert bodies[1].startswith("domain listed #")
    assert bodies[2] == "me too?"
    for hit in page.hits:
        assert "blocklist" in [r.rule_id for r in hit.record.verdict.reasons]
