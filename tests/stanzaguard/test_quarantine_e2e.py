"""Strangers, quarantine, release and reports, end to end.

A real Prosody serves two hosts: ``localhost`` behind the archiving service (alice, bob,
carol connect through the proxy) and ``remote.localhost``, which stands for the federated
network: its users (eve the spammer, frank a partner) connect to Prosody directly, so their
messages reach local users the way a remote server's would, on the proxy's server→client leg.
The policy quarantines a stranger's first contact carrying a URL.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from subprocess import CompletedProcess
from typing import Any

import pytest

from archive_api.store.records import (
    ArchiveRecord,
    EntryOp,
    ObservationVia,
    RecordStatus,
    SpoolEntry,
)
from classifier.verdict import Action
from stanzaguard import quarantine
from stanzaguard.learning import Label, Source
from tests.conftest import ProsodyFactory
from tests.stanzaguard.conftest import ArchivingFactory, ArchivingProxy, remote_clients, run_cli
from tests.support.clients import ChatClient, ReceivedMessage, TlsMode
from tests.support.prosody import ProsodyConfig, ProsodyServer

REMOTE = "remote.localhost"
REMOTE_USERS = {"eve": "eve-secret", "frank": "frank-secret"}
EVE = f"eve@{REMOTE}"
FRANK = f"frank@{REMOTE}"
BOB = "bob@localhost"
SPAM = "You won! Claim it at http://prize.example/claim"
TIMEOUT = 10.0
POLICY = """
version = 1

[strangers]
first_contact_url = "quarantine"

[reputation]
points = 2.0
"""

pytestmark = pytest.mark.integration


@pytest.fixture
def prosody(prosody_factory: ProsodyFactory) -> ProsodyServer:
    """Prosody with a second host, ``remote.localhost``, holding eve and frank."""
    server = prosody_factory(ProsodyConfig(extra_config=f'VirtualHost "{REMOTE}"'))
    served = server.domain
    try:
        # `register` registers on the server's domain; point it at the other host meanwhile.
        server.domain = REMOTE
        for user, password in REMOTE_USERS.items():
            server.register(user, password)
    finally:
        server.domain = served
    return server


RemoteFactory = Callable[[str], Awaitable[ChatClient]]


@pytest.fixture
async def remote(prosody: ProsodyServer) -> AsyncIterator[RemoteFactory]:
    """Connected clients of ``remote.localhost`` users, straight to Prosody (no proxy)."""
    async with remote_clients(prosody, REMOTE, REMOTE_USERS) as connect:
        yield connect


@pytest.fixture
async def running(archiving_factory: ArchivingFactory) -> ArchivingProxy:
    return await archiving_factory(policy=POLICY)


async def login(running: ArchivingProxy, user: str, **kwargs: object) -> ChatClient:
    """A user through the proxy who, as clients do, fetches the roster after login."""
    client = running.client(user, **kwargs)
    await client.connect()
    await client.xmpp.get_roster()
    return client


async def eventually(
    check: Callable[[], Awaitable[object]], what: str, timeout: float = TIMEOUT
) -> object:
    """Poll ``check`` until it returns something truthy (a wait, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def records_from(running: ArchivingProxy, sender: str) -> list[ArchiveRecord]:
    await running.drain()
    page = await running.store.search(f"from:{sender} type:chat", limit=100, sort="time_asc")
    return [hit.record for hit in page.hits]


async def held_from(running: ArchivingProxy, sender: str, body: str = SPAM) -> ArchiveRecord:
    """Wait until the proxy archived ``sender``'s message ``body``; return its record."""

    async def find() -> ArchiveRecord | None:
        found = [r for r in await records_from(running, sender) if r.body == body]
        return found[-1] if found else None

    record = await eventually(find, f"a record of {sender}'s message {body!r}")
    assert isinstance(record, ArchiveRecord)
    return record


async def sign_off(running: ArchivingProxy, client: ChatClient, jid: str) -> None:
    """Disconnect ``client`` and wait until the proxy holds no session of ``jid``."""
    await client.disconnect()

    async def gone() -> bool:
        return not running.service.proxy.sessions_of(jid)

    await eventually(gone, f"{jid}'s session gone from the proxy")


async def as_officer(running: ArchivingProxy, *args: str) -> CompletedProcess[str]:
    """`stanzaguard ARGS` as officer olivia on the service's data, in its own process."""
    return await asyncio.to_thread(
        run_cli, *args, "--actor", "olivia", "--data-dir", str(running.data_dir)
    )


async def cli_listing(running: ArchivingProxy) -> list[dict[str, Any]]:
    """`stanzaguard quarantine list --all --json`, one object per listed message."""
    listing = await asyncio.to_thread(
        run_cli, "quarantine", "list", "--all", "--json", "--data-dir", str(running.data_dir)
    )
    assert listing.returncode == 0, listing.stderr
    return [json.loads(line) for line in listing.stdout.splitlines()]


async def status_entries(running: ArchivingProxy, record_id: str) -> list[SpoolEntry]:
    """The audited STATUS entries of one record, read back from the hash-chained ledger."""
    await running.drain()
    entries = []
    async for link in running.store.chain_links(1):
        entry = SpoolEntry.from_payload(link.payload)
        if entry.op is EntryOp.STATUS and entry.record_id == record_id:
            entries.append(entry)
    return entries


def delay_of(message: ReceivedMessage) -> tuple[str, datetime]:
    delay = message.element.find("{urn:xmpp:delay}delay")
    assert delay is not None, message.xml
    return delay.get("from", ""), datetime.fromisoformat(
        delay.get("stamp", "").replace("Z", "+00:00")
    )


def assert_released_copy(message: ReceivedMessage, record: ArchiveRecord, to: str) -> None:
    assert (message.from_.split("/")[0], message.to, message.body) == (EVE, to, SPAM)
    origin, stamp = delay_of(message)
    assert origin == "localhost"
    # The stamp is the original time of the held message (XEP-0082, milliseconds).
    assert stamp == record.occurred_at.replace(
        microsecond=record.occurred_at.microsecond // 1000 * 1000
    )


def no_message_from(messages: list[ReceivedMessage], sender: str) -> bool:
    return not any(m.from_.split("/")[0] == sender for m in messages)


async def befriend_directly(prosody: ProsodyServer, remote: RemoteFactory) -> None:
    """Make bob and frank mutual contacts, bob logged in straight to Prosody (no proxy)."""
    frank = await remote("frank")
    await frank.xmpp.get_roster()
    bob = ChatClient(
        BOB, prosody.users["bob"], host=prosody.host, port=prosody.c2s_port, tls=TlsMode.PLAIN
    )
    await bob.connect()
    try:
        await bob.xmpp.get_roster()
        bob.xmpp.send_presence_subscription(pto=FRANK)

        async def mutual() -> bool:
            return bool(bob.xmpp.client_roster[FRANK]["subscription"] == "both")

        await eventually(mutual, "bob and frank subscribed to each other")
    finally:
        await bob.disconnect()


# -- the tests ---------------------------------------------------------------------------------


async def test_stranger_url_is_held_and_contact_is_delivered_then_officer_releases(
    running: ArchivingProxy, prosody: ProsodyServer, remote: RemoteFactory
) -> None:
    await befriend_directly(prosody, remote)
    bob = await login(running, "bob", resource="desk")  # the roster result names frank
    assert running.service.trust.knows(BOB, FRANK, running.service.clock.now()) is True
    assert running.service.trust.knows(BOB, EVE, running.service.clock.now()) is False
    eve = await remote("eve")
    frank = await remote("frank")

    eve.send_chat(BOB, SPAM)
    held = await held_from(running, EVE)
    frank.send_chat(BOB, SPAM)  # the very same text, from a contact
    got = await bob.next_message(TIMEOUT, where=lambda m: m.body == SPAM)
    assert got.from_.split("/")[0] == FRANK
    assert no_message_from(await bob.drain(), EVE)

    assert held.status is RecordStatus.HELD
    assert held.verdict.action is Action.QUARANTINE
    assert [r.rule_id for r in held.verdict.reasons] == ["stranger"]
    (delivered,) = [r for r in await records_from(running, FRANK) if r.body == SPAM]
    assert delivered.status is RecordStatus.DELIVERED
    assert delivered.verdict.action is Action.ALLOW
    # Officers find it with the search language too.
    page = await running.store.search(f"verdict:quarantine from:{EVE}", limit=10)
    assert [hit.record.record_id for hit in page.hits] == [held.record_id]

    outcome = await quarantine.release(running.service, held.record_id, "olivia")
    assert outcome.ok and outcome.delivered_to == (bob.jid,), outcome
    copy = await bob.next_message(TIMEOUT, where=lambda m: m.body == SPAM)
    assert_released_copy(copy, held, bob.jid)
    assert copy.delayed

    (status,) = await status_entries(running, held.record_id)
    assert (status.status, status.actor) == (RecordStatus.RELEASED, "olivia")
    released = await running.store.get(held.record_id)
    assert released is not None and released.status is RecordStatus.RELEASED
    assert any(o.via is ObservationVia.RELEASE and o.jid == bob.jid for o in released.observations)
    # Releasing again changes nothing and delivers nothing.
    again = await quarantine.release(running.service, held.record_id, "olivia")
    assert again.ok and again.detail == "already released"
    assert no_message_from(await bob.drain(), EVE)
    # The officer's release is a "ham" example.
    examples = running.service.learning.examples.effective()  # type: ignore[union-attr]
    assert [(e.label, e.source, e.actor, e.record_id) for e in examples] == [
        (Label.HAM, Source.OFFICER, "olivia", held.record_id)
    ]


async def test_a_cli_release_is_in_the_archive_when_the_command_returns(
    archiving_factory: ArchivingFactory, remote: RemoteFactory
) -> None:
    # The index worker hears of new entries once a minute here: only the service draining
    # it before it answers the request puts the new status in the store in time.
    running = await archiving_factory(policy=POLICY, index_worker_batch_interval=60)
    bob = await login(running, "bob", resource="desk")  # the proxy sees what reaches him
    eve = await remote("eve")
    eve.send_chat(BOB, SPAM)

    async def held() -> ArchiveRecord | None:
        await running.drain()
        found = [r for r in await records_from(running, EVE) if r.body == SPAM]
        return found[-1] if found else None

    record = await eventually(held, "eve's message held")
    assert isinstance(record, ArchiveRecord)
    # Offline, so the release is a pending delivery: nothing on that path indexes anything.
    await sign_off(running, bob, BOB)
    done = await as_officer(running, "quarantine", "release", record.record_id)
    assert done.returncode == 0, done.stdout + done.stderr
    (listed,) = await cli_listing(running)
    assert (listed["record_id"], listed["status"]) == (record.record_id, "released")


async def test_release_through_the_cli_reaches_an_offline_recipient_at_next_login(
    running: ArchivingProxy, remote: RemoteFactory
) -> None:
    bob = await login(running, "bob", resource="desk")
    eve = await remote("eve")
    eve.send_chat(BOB, SPAM)
    held = await held_from(running, EVE)
    await sign_off(running, bob, BOB)

    # The CLI runs in another process: it leaves a request the running service picks up.
    done = await as_officer(running, "quarantine", "release", held.record_id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "next login" in done.stdout
    pending = json.loads((running.data_dir / "review" / "pending-deliveries.json").read_text())
    assert [p["record_id"] for p in pending] == [held.record_id]

    (listed,) = await cli_listing(running)
    assert (listed["record_id"], listed["status"]) == (held.record_id, "released")

    back = await login(running, "bob", resource="laptop")
    copy = await back.next_message(TIMEOUT, where=lambda m: m.body == SPAM)
    assert_released_copy(copy, held, back.jid)
    await running.service.quarantine.settle()  # type: ignore[union-attr]
    assert json.loads((running.data_dir / "review" / "pending-deliveries.json").read_text()) == []
    await running.drain()
    released = await running.store.get(held.record_id)
    assert released is not None
    assert [o.jid for o in released.observations if o.via is ObservationVia.RELEASE] == [back.jid]
    (status,) = await status_entries(running, held.record_id)
    assert (status.status, status.actor) == (RecordStatus.RELEASED, "olivia")


async def test_adding_the_sender_to_the_roster_releases_what_was_held(
    running: ArchivingProxy, remote: RemoteFactory
) -> None:
    bob = await login(running, "bob", resource="desk")
    eve = await remote("eve")
    eve.send_chat(BOB, SPAM)
    held = await held_from(running, EVE)
    assert no_message_from(await bob.drain(), EVE)

    bob.xmpp.send_presence_subscription(pto=EVE)  # the server pushes eve with ask='subscribe'
    copy = await bob.next_message(TIMEOUT, where=lambda m: m.body == SPAM)
    assert_released_copy(copy, held, bob.jid)
    await running.service.quarantine.settle()  # type: ignore[union-attr]
    (status,) = await status_entries(running, held.record_id)
    assert (status.status, status.actor) == (RecordStatus.RELEASED, f"roster:{BOB}")
    # Eve is known now: her next message with a URL goes straight through.
    eve.send_chat(BOB, SPAM + " (again)")
    again = await bob.next_message(TIMEOUT, where=lambda m: m.body.endswith("(again)"))
    assert again.element.find("{urn:xmpp:delay}delay") is None


async def test_confirmed_spam_is_never_delivered(
    running: ArchivingProxy, remote: RemoteFactory
) -> None:
    bob = await login(running, "bob", resource="desk")
    eve = await remote("eve")
    eve.send_chat(BOB, SPAM)
    held = await held_from(running, EVE)

    done = await as_officer(running, "quarantine", "confirm-spam", held.record_id)
    assert done.returncode == 0, done.stdout + done.stderr
    refused = await quarantine.release(running.service, held.record_id, "oscar")
    assert not refused.ok and refused.status is RecordStatus.CONFIRMED_SPAM
    bob.xmpp.send_presence_subscription(pto=EVE)  # not even the recipient's roster frees it

    async def known() -> bool:
        return running.service.trust.knows(BOB, EVE, running.service.clock.now()) is True

    await eventually(known, "bob's roster push naming eve")
    await running.service.quarantine.settle()  # type: ignore[union-attr]
    assert no_message_from(await bob.drain(), EVE)

    (status,) = await status_entries(running, held.record_id)
    assert (status.status, status.actor) == (RecordStatus.CONFIRMED_SPAM, "olivia")
    stored = await running.store.get(held.record_id)
    assert stored is not None and stored.status is RecordStatus.CONFIRMED_SPAM
    # An officer's "spam" is a labelled example and counts against the sender at once.
    examples = running.service.learning.examples.effective()  # type: ignore[union-attr]
    assert [(e.label, e.source, e.text) for e in examples] == [(Label.SPAM, Source.OFFICER, SPAM)]
    weight, _ = running.service.reputation.weight(EVE, running.service.clock.now())
    assert weight > 0


def report_iq(iq_id: str, jid: str, stanza_id: str | None, by: str) -> str:
    sid = f"<stanza-id xmlns='urn:xmpp:sid:0' by='{by}' id='{stanza_id}'/>" if stanza_id else ""
    return (
        f"<iq type='set' id='{iq_id}'><block xmlns='urn:xmpp:blocking'><item jid='{jid}'>"
        "<report xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:spam'>"
        f"{sid}<text xml:lang='en'>unsolicited offer</text></report></item></block></iq>"
    )


async def test_a_report_raises_the_senders_score_and_becomes_an_example(
    running: ArchivingProxy, remote: RemoteFactory
) -> None:
    bob = await login(running, "bob", resource="desk")
    alice = await login(running, "alice", resource="laptop")
    eve = await remote("eve")
    first = "Cheap watches, just reply"
    eve.send_chat(BOB, first)  # no URL: delivered, even from a stranger
    got = await bob.next_message(TIMEOUT, where=lambda m: m.body == first)
    stanza_id = got.element.find("{urn:xmpp:sid:0}stanza-id")
    assert stanza_id is not None and stanza_id.get("by") == BOB, got.xml
    before = await held_from(running, EVE, first)
    assert before.verdict.action is Action.ALLOW
    assert "reputation" not in [r.rule_id for r in before.verdict.reasons]

    # The report, as a client sends it: a XEP-0191 block carrying a XEP-0377 report.
    bob.send_raw(report_iq("rep-1", EVE, stanza_id.get("id"), BOB))
    learning = running.service.learning
    assert learning is not None

    async def reported() -> bool:
        await learning.flush()
        return len(learning.examples) > 0

    await eventually(reported, "the report recorded as an example")
    # Reporting the same message again (another iq) counts once.
    bob.send_raw(report_iq("rep-2", EVE, stanza_id.get("id"), BOB))
    await eventually(lambda: report_count_reaches(running, 2), "both report records archived")
    await learning.flush()

    # Bob blocked eve at his server; she writes to alice next.
    second = "Cheap watches, last chance"
    eve.send_chat("alice@localhost", second)
    await alice.next_message(TIMEOUT, where=lambda m: m.body == second)  # flagged: delivered
    after = await held_from(running, EVE, second)
    reasons = {r.rule_id: r for r in after.verdict.reasons}
    assert "reputation" in reasons, after.verdict
    assert reasons["reputation"].contribution == pytest.approx(2.0)
    assert after.verdict.score > before.verdict.score
    assert after.verdict.action is Action.FLAG

    (example,) = learning.examples.effective()
    assert (example.label, example.source, example.actor, example.sender) == (
        Label.SPAM,
        Source.REPORT,
        BOB,
        EVE,
    )
    assert (example.record_id, example.text, example.weight) == (before.record_id, first, 1.0)
    assert example.report_record_id is not None
    report = await running.store.get(example.report_record_id)
    assert report is not None and report.reported_jid == EVE
    lines = (running.data_dir / "learning" / "examples.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["record_id"] == before.record_id

    # An officer disagrees: the message was fine. The report stops counting against eve,
    # and bob's reports weigh less from now on.
    done = await as_officer(running, "label", before.record_id, "ham")
    assert done.returncode == 0, done.stdout + done.stderr
    assert running.service.reputation.weight(EVE, running.service.clock.now()) == (0.0, 0)
    assert learning.examples.reporter_weight(BOB) == pytest.approx(0.5)
    (label,) = learning.examples.effective()
    assert (label.label, label.source, label.actor, label.record_id) == (
        Label.HAM,
        Source.OFFICER,
        "olivia",
        before.record_id,
    )


async def report_count_reaches(running: ArchivingProxy, count: int) -> bool:
    await running.drain()
    page = await running.store.search("type:report", limit=10)
    return len(page.hits) >= count
