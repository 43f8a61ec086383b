"""The proxy learns who knows whom: roster results and pushes, correspondents, the context.

Unit tests of the observer, then a real Prosody with the pipeline in front of it: bob logs in
through the proxy and fetches his roster as clients do; alice and carol talk to Prosody
directly, so their messages reach bob on the proxy's server→client leg and are decided there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from archive_api.store.records import EntryOp, SpoolEntry
from classifier.clock import ManualClock
from classifier.context import DecisionContext
from classifier.context import Direction as DecisionDirection
from classifier.trust import InMemoryTrustStore, RosterItem, Subscription
from classifier.verdict import ALLOW, Verdict
from proxy.pipeline import Pipeline, PipelineConfig
from proxy.stanza import RosterEntry, RosterEvent
from proxy.trust import RosterObservers, TrustRosterObserver, adds_contact, roster_item
from tests.conftest import ProxyFactory
from tests.support.clients import ChatClient, TlsMode
from tests.support.prosody import ProsodyServer

CLOCK = ManualClock()
NOW = CLOCK.now()
BOB = "bob@localhost"
ALICE = "alice@localhost"
CAROL = "carol@localhost"
TIMEOUT = 10.0

# -- units -----------------------------------------------------------------------------------


def test_roster_entries_become_roster_items() -> None:
    assert roster_item(RosterEntry("a@x.example", "both")) == RosterItem(
        "a@x.example", Subscription.BOTH
    )
    assert roster_item(RosterEntry("a@x.example", "none", ask=True)) == RosterItem(
        "a@x.example", Subscription.NONE, ask=True
    )
    assert roster_item(RosterEntry("a@x.example", "bogus")).subscription is Subscription.NONE
    assert roster_item(RosterEntry("a@x.example", "remove")).subscription is Subscription.REMOVE


@pytest.mark.parametrize(
    ("subscription", "ask", "adds"),
    [
        ("to", False, True),
        ("both", False, True),
        ("none", True, True),
        ("from", False, False),  # the contact may see us; we did not ask for them
        ("none", False, False),
        ("remove", False, False),
    ],
)
def test_what_counts_as_adding_a_contact(subscription: str, ask: bool, adds: bool) -> None:
    assert adds_contact(RosterEntry("a@x.example", subscription, ask=ask)) is adds


def test_results_replace_and_pushes_update_the_store() -> None:
    store = InMemoryTrustStore()
    observer = TrustRosterObserver(store)
    assert store.knows(BOB, "pal@x.example", NOW) is None  # nothing seen yet
    observer.roster_seen(BOB, RosterEvent(BOB, (RosterEntry("pal@x.example", "both"),), False))
    assert store.knows(BOB, "pal@x.example", NOW) is True
    assert store.knows(BOB, "new@x.example", NOW) is False  # the whole roster is known
    observer.roster_seen(BOB, RosterEvent(BOB, (RosterEntry("new@x.example", "to"),), True))
    assert store.knows(BOB, "new@x.example", NOW) is True
    observer.roster_seen(BOB, RosterEvent(BOB, (RosterEntry("pal@x.example", "remove"),), True))
    assert store.knows(BOB, "pal@x.example", NOW) is False
    # A new result replaces everything pushed before.
    observer.roster_seen(BOB, RosterEvent(BOB, (), False))
    assert store.knows(BOB, "new@x.example", NOW) is False


def test_one_failing_observer_does_not_stop_the_others() -> None:
    seen: list[str] = []

    def broken(owner: str, event: RosterEvent) -> None:
        raise RuntimeError("boom")

    def recording(owner: str, event: RosterEvent) -> None:
        seen.append(owner)

    RosterObservers(broken, recording).roster_seen(BOB, RosterEvent(BOB, (), False))
    assert seen == [BOB]


# -- through a real Prosody --------------------------------------------------------------------


@dataclass
class MemorySpool:
    entries: list[SpoolEntry] = field(default_factory=list)

    async def append(self, payloads: Sequence[bytes]) -> object:
        self.entries += [SpoolEntry.from_payload(p) for p in payloads]
        return None

    def append_behind(self, payloads: Sequence[bytes]) -> None:
        self.entries += [SpoolEntry.from_payload(p) for p in payloads]


@dataclass
class RecordingDecider:
    contexts: list[DecisionContext] = field(default_factory=list)

    def evaluate(self, ctx: DecisionContext) -> Verdict:
        self.contexts.append(ctx)
        return ALLOW

    def inbound(self, body: str) -> DecisionContext:
        found = [
            c for c in self.contexts if c.body == body and c.direction is DecisionDirection.INBOUND
        ]
        assert len(found) == 1, [c.body for c in self.contexts]
        return found[0]


@dataclass
class Setup:
    trust: InMemoryTrustStore
    decider: RecordingDecider
    spool: MemorySpool
    bob: ChatClient
    direct: Callable[[str], Awaitable[ChatClient]]


async def eventually(check: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {TIMEOUT}s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def direct(prosody: ProsodyServer) -> AsyncIterator[Callable[[str], Awaitable[ChatClient]]]:
    """Clients straight to Prosody, fetching their roster (as the remote side would)."""
    clients: list[ChatClient] = []

    async def connect(user: str) -> ChatClient:
        client = ChatClient(
            prosody.jid(user),
            prosody.users[user],
            host=prosody.host,
            port=prosody.c2s_port,
            tls=TlsMode.PLAIN,
        )
        clients.append(client)
        await client.connect()
        await client.xmpp.get_roster()
        return client

    try:
        yield connect
    finally:
        for client in clients:
            await client.disconnect()


async def start(
    proxy_factory: ProxyFactory, direct: Callable[[str], Awaitable[ChatClient]]
) -> Setup:
    trust = InMemoryTrustStore()
    decider = RecordingDecider()
    spool = MemorySpool()
    pipeline = Pipeline(
        PipelineConfig(local_domains=frozenset({"localhost"})),
        decider=decider,
        spool=spool,
        clock=CLOCK,
        roster_observer=TrustRosterObserver(trust),
        trust=trust,
    )
    running = await proxy_factory(pipeline)
    bob = running.client("bob", resource="desk")
    await bob.connect()
    return Setup(trust, decider, spool, bob, direct)


async def test_roster_result_pushes_and_correspondents_reach_the_context(
    proxy_factory: ProxyFactory, direct: Callable[[str], Awaitable[ChatClient]]
) -> None:
    s = await start(proxy_factory, direct)
    assert s.trust.knows(BOB, ALICE, NOW) is None  # bob has not fetched his roster yet
    await s.bob.xmpp.get_roster()
    assert s.trust.knows(BOB, ALICE, NOW) is False  # an empty roster, seen in full

    alice = await s.direct("alice")
    alice.send_chat(BOB, "hi 1")
    await s.bob.next_message(TIMEOUT, where=lambda m: m.body == "hi 1")
    assert s.decider.inbound("hi 1").sender_in_recipient_roster is False

    # Bob asks to subscribe: the server pushes alice with ask='subscribe', then 'to'.
    s.bob.xmpp.send_presence_subscription(pto=ALICE)
    await eventually(lambda: s.trust.knows(BOB, ALICE, NOW) is True, "the push naming alice")
    alice.send_chat(BOB, "hi 2")
    await s.bob.next_message(TIMEOUT, where=lambda m: m.body == "hi 2")
    assert s.decider.inbound("hi 2").sender_in_recipient_roster is True

    # Removing alice from the roster (a push with subscription='remove') forgets her.
    s.bob.xmpp.del_roster_item(ALICE)  # type: ignore[no-untyped-call]
    await eventually(lambda: s.trust.knows(BOB, ALICE, NOW) is False, "the removal push")

    # Whom bob writes to becomes his correspondent, roster or not.
    carol = await s.direct("carol")
    s.bob.send_chat(CAROL, "lunch?")
    await carol.next_message(TIMEOUT, where=lambda m: m.body == "lunch?")
    assert s.trust.knows(BOB, CAROL, NOW) is True
    carol.send_chat(BOB, "sure")
    await s.bob.next_message(TIMEOUT, where=lambda m: m.body == "sure")
    assert s.decider.inbound("sure").sender_in_recipient_roster is True
    # Every message was archived as usual.
    bodies = {e.record.body for e in s.spool.entries if e.op is EntryOp.RECORD and e.record}
    assert {"hi 1", "hi 2", "lunch?", "sure"} <= bodies


async def test_roster_learned_from_the_result_fetched_at_login(
    proxy_factory: ProxyFactory,
    prosody: ProsodyServer,
    direct: Callable[[str], Awaitable[ChatClient]],
) -> None:
    # Bob and alice become contacts while bob is logged in straight to Prosody...
    alice = await direct("alice")
    bob_direct = await direct("bob")
    bob_direct.xmpp.send_presence_subscription(pto=ALICE)

    def mutual() -> bool:
        return bool(bob_direct.xmpp.client_roster[ALICE]["subscription"] == "both")

    await eventually(mutual, "bob and alice subscribed to each other")
    await bob_direct.disconnect()
    # ...so the proxy learns it only from the roster result at bob's next login through it.
    s = await start(proxy_factory, direct)
    await s.bob.xmpp.get_roster()
    assert s.trust.knows(BOB, ALICE, NOW) is True
    assert s.trust.knows(BOB, CAROL, NOW) is False
    alice.send_chat(BOB, "hello friend")
    await s.bob.next_message(TIMEOUT, where=lambda m: m.body == "hello friend")
    assert s.decider.inbound("hello friend").sender_in_recipient_roster is True


async def test_a_roster_push_forged_by_another_user_is_ignored(
    proxy_factory: ProxyFactory, direct: Callable[[str], Awaitable[ChatClient]]
) -> None:
    s = await start(proxy_factory, direct)
    await s.bob.xmpp.get_roster()
    mallory = await s.direct("carol")
    mallory.send_raw(
        f"<iq type='set' to='{s.bob.jid}' id='forged'><query xmlns='jabber:iq:roster'>"
        f"<item jid='{CAROL}' subscription='both'/></query></iq>"
    )
    mallory.send_chat(BOB, "trust me")
    await s.bob.next_message(TIMEOUT, where=lambda m: m.body == "trust me")
    assert s.trust.knows(BOB, CAROL, NOW) is False
    assert s.decider.inbound("trust me").sender_in_recipient_roster is False
