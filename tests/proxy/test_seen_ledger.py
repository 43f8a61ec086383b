"""The duplicate ledger several proxies share (`seen_ledger = "redis"`), on a real redis-server.

Unit level: marks written by one proxy's `SharedRecentIds` are found by another's; keys are
short, hashed and expire; hostile ids neither raise nor collide; a dead Redis means "decide
locally", tried again only after a pause, and marks resume once it is back.

End to end: two real proxies in front of one Prosody, each with its own pipeline, decider and
spool, sharing one Redis. Alice writes through the first, Bob reads through the second: the
first decides and spools the RECORD, the second only spools an OBSERVE of the same record id
and never asks its decider. Without the shared ledger (the control) the second decides again
and spools a second RECORD.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import redis

from archive_api.store.records import EntryOp
from classifier.clock import ManualClock
from classifier.context import DecisionContext
from classifier.verdict import ALLOW, Verdict
from proxy.metrics import SEEN_LEDGER
from proxy.pipeline import Pipeline, PipelineConfig, RecentIds, SeenIds
from proxy.redis_state import (
    SEEN_DIGEST_BYTES,
    SEEN_KEY_PREFIX,
    RedisSeenLedger,
    SharedRecentIds,
    SharedStateUnavailable,
)
from tests.conftest import ProxyFactory
from tests.proxy.test_trust import MemorySpool
from tests.support.clients import ChatClient
from tests.support.redis import RedisServer
from tests.support.services import free_port

TIMEOUT = 10.0
BOB = "bob@localhost"


def shared(url: str, clock: ManualClock | None = None, *, ttl: float = 3600) -> SharedRecentIds:
    ledger = RedisSeenLedger.from_url(url, ttl=ttl)
    return SharedRecentIds(RecentIds(100), ledger, clock=clock or ManualClock())


def outcome(name: str) -> float:
    value = SEEN_LEDGER.labels(name)._value.get()
    assert isinstance(value, float)
    return value


@pytest.fixture
def two(redis_server: RedisServer) -> Iterator[tuple[SharedRecentIds, SharedRecentIds]]:
    first, second = shared(redis_server.url), shared(redis_server.url)
    yield first, second
    first.close()
    second.close()


def test_a_mark_made_by_one_proxy_is_seen_by_another(
    two: tuple[SharedRecentIds, SharedRecentIds],
) -> None:
    first, second = two
    assert "direct|alice|bob|m1" not in second
    first.add("direct|alice|bob|m1")
    assert "direct|alice|bob|m1" in first  # its own memory, no round trip
    assert first.flush()
    hits = outcome("shared_hit")
    assert "direct|alice|bob|m1" in second
    assert outcome("shared_hit") == hits + 1
    # Found once, it is remembered locally: the second look-up asks Redis no more.
    assert "direct|alice|bob|m1" in second
    assert outcome("shared_hit") == hits + 1
    assert "direct|alice|bob|m2" not in second


def test_keys_are_short_hashed_and_expire(redis_server: RedisServer) -> None:
    ids = shared(redis_server.url, ttl=90)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        long_id = "direct|" + "a" * 5000 + "@corp.example|bob@corp.example|x"
        ids.add(long_id)
        assert ids.flush()
        keys = raw.keys(SEEN_KEY_PREFIX + "*")
        assert len(keys) == 1
        assert len(keys[0]) == len(SEEN_KEY_PREFIX) + SEEN_DIGEST_BYTES
        assert b"corp.example" not in keys[0]
        ttl_ms = raw.pttl(keys[0])
        assert 0 < ttl_ms <= 90_000
    finally:
        ids.close()
        raw.close()


@pytest.mark.parametrize(
    "hostile",
    [
        "",
        "\ud800lone surrogate",
        "\x00\x01 control",
        "x" * 1_000_000,
        "ünïcødé|😀|" * 100,
        "sg:seen:*",  # a glob is data, not a pattern
    ],
)
def test_hostile_record_ids(two: tuple[SharedRecentIds, SharedRecentIds], hostile: str) -> None:
    first, second = two
    assert hostile not in second
    first.add(hostile)
    assert first.flush()
    assert hostile in second
    assert hostile + "!" not in second


def test_what_is_not_a_string_is_never_seen(two: tuple[SharedRecentIds, SharedRecentIds]) -> None:
    first, _ = two
    assert 42 not in first
    assert None not in first
    assert b"bytes" not in first


def test_a_dead_redis_means_decide_locally_and_pauses_look_ups(redis_server: RedisServer) -> None:
    clock = ManualClock()
    ids = SharedRecentIds(
        RecentIds(100),
        RedisSeenLedger.from_url(redis_server.url, ttl=3600, timeout=0.2),
        clock=clock,
        pause=5.0,
    )
    try:
        ids.add("before")
        assert ids.flush()
        redis_server.stop()
        unavailable = outcome("unavailable")
        assert "other" not in ids  # not seen: the safe side (the rules decide again)
        assert outcome("unavailable") == unavailable + 1
        # During the pause no look-up is tried: no second socket error, no second wait.
        assert "third" not in ids
        assert outcome("unavailable") == unavailable + 1
        assert "before" in ids  # this proxy's own memory still answers
        dropped = outcome("dropped")
        ids.add("while-down")
        assert ids.flush()
        assert outcome("dropped") == dropped + 1  # a mark that could not be written
        redis_server.start()  # an empty server: what it held is gone
        clock.advance(5.1)
        assert "other" not in ids
        assert outcome("unavailable") == unavailable + 1
        ids.add("after")
        assert ids.flush()
    finally:
        ids.close()
    other = shared(redis_server.url)
    try:
        assert "after" in other
        assert "while-down" not in other
    finally:
        other.close()


def test_unreachable_or_bad_urls() -> None:
    with pytest.raises(SharedStateUnavailable):
        RedisSeenLedger.from_url("http://not-redis.example/", ttl=60)
    ledger = RedisSeenLedger.from_url(f"redis://127.0.0.1:{free_port()}/0", ttl=60, timeout=0.2)
    with pytest.raises(SharedStateUnavailable):
        ledger.seen("x")
    with pytest.raises(SharedStateUnavailable):
        ledger.remember(["x"])
    ledger.remember([])  # nothing to write: no round trip, no error
    ledger.close()
    for ttl in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            RedisSeenLedger.from_url("redis://127.0.0.1:1/0", ttl=ttl)


def test_close_writes_what_is_pending(redis_server: RedisServer) -> None:
    ids = shared(redis_server.url)
    for n in range(2500):  # more than one write batch
        ids.add(f"id-{n}")
    ids.close()
    other = shared(redis_server.url)
    try:
        assert all(f"id-{n}" in other for n in (0, 999, 1000, 2499))
    finally:
        other.close()


def test_a_full_queue_drops_marks_instead_of_blocking() -> None:
    # A "Redis" that accepts connections and never answers: the writer thread hangs on its
    # socket timeout while the proxy keeps adding marks.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        ledger = RedisSeenLedger.from_url(f"redis://127.0.0.1:{port}/0", ttl=60, timeout=0.5)
        ids = SharedRecentIds(RecentIds(1000), ledger, clock=ManualClock(), max_pending=1)
        try:
            dropped = outcome("dropped")
            for n in range(500):
                ids.add(f"burst-{n}")  # never waits for the writer
            assert all(f"burst-{n}" in ids for n in (0, 250, 499))  # the local memory has all
            # The writer holds at most one batch, the queue one more mark: the rest dropped.
            assert outcome("dropped") - dropped >= 498
        finally:
            ids.close(timeout=2.0)


# -- two real proxies in front of one Prosody --------------------------------------------------


def ops_for(spool: MemorySpool, body: str) -> list[tuple[EntryOp, str]]:
    """The ops and ids of every entry of the records whose body is `body`."""
    record_ids = {e.record_id for e in spool.entries if e.record and e.record.body == body}
    return [(e.op, e.record_id) for e in spool.entries if e.record_id in record_ids]


@dataclass
class CountingDecider:
    bodies: list[str | None] = field(default_factory=list)

    def evaluate(self, ctx: DecisionContext) -> Verdict:
        self.bodies.append(ctx.body)
        return ALLOW


class WriteThrough(SharedRecentIds):
    """Waits for its writer thread after each mark, so that the sender's proxy has marked the
    record before the recipient's copy can arrive (the service writes behind and accepts the
    rare race: docs/distributed.md)."""

    def add(self, record_id: str) -> None:
        super().add(record_id)
        assert self.flush()


@dataclass
class Side:
    decider: CountingDecider
    spool: MemorySpool
    client: ChatClient


async def side(proxy_factory: ProxyFactory, user: str, resource: str, recent: SeenIds) -> Side:
    decider, spool = CountingDecider(), MemorySpool()
    pipeline = Pipeline(
        PipelineConfig(local_domains=frozenset({"localhost"})),
        decider=decider,
        spool=spool,
        clock=ManualClock(),
        recent=recent,
    )
    running = await proxy_factory(pipeline)
    client = running.client(user, resource=resource)
    await client.connect()
    return Side(decider, spool, client)


@pytest.fixture
async def ledgers(redis_server: RedisServer) -> AsyncIterator[tuple[SharedRecentIds, ...]]:
    clock = ManualClock()
    first = WriteThrough(
        RecentIds(100), RedisSeenLedger.from_url(redis_server.url, ttl=60), clock=clock
    )
    second = SharedRecentIds(
        RecentIds(100), RedisSeenLedger.from_url(redis_server.url, ttl=60), clock=clock
    )
    yield first, second
    first.close()
    second.close()


async def test_the_recipients_proxy_observes_instead_of_deciding_again(
    proxy_factory: ProxyFactory, ledgers: tuple[SharedRecentIds, ...]
) -> None:
    first, second = ledgers
    alice = await side(proxy_factory, "alice", "laptop", first)
    bob = await side(proxy_factory, "bob", "phone", second)

    alice.client.send_chat(BOB, "decided once")
    received = await bob.client.next_message(TIMEOUT, where=lambda m: m.body == "decided once")
    assert received.body == "decided once"
    await asyncio.sleep(0.2)  # the recipient's entry is written behind

    assert alice.decider.bodies.count("decided once") == 1
    assert "decided once" not in bob.decider.bodies
    (sent,) = ops_for(alice.spool, "decided once")
    assert sent[0] is EntryOp.RECORD
    bob_ops = [(e.op, e.record_id) for e in bob.spool.entries if e.record_id == sent[1]]
    assert bob_ops == [(EntryOp.OBSERVE, sent[1])]


async def test_without_the_shared_ledger_the_recipients_proxy_decides_again(
    proxy_factory: ProxyFactory,
) -> None:
    alice = await side(proxy_factory, "alice", "laptop", RecentIds(100))
    bob = await side(proxy_factory, "bob", "phone", RecentIds(100))

    alice.client.send_chat(BOB, "decided twice")
    await bob.client.next_message(TIMEOUT, where=lambda m: m.body == "decided twice")

    assert alice.decider.bodies.count("decided twice") == 1
    assert bob.decider.bodies.count("decided twice") == 1
    (sent,) = ops_for(alice.spool, "decided twice")
    assert ops_for(bob.spool, "decided twice") == [(EntryOp.RECORD, sent[1])]


async def test_with_redis_down_the_recipients_proxy_decides_and_delivers(
    proxy_factory: ProxyFactory, redis_server: RedisServer, ledgers: tuple[SharedRecentIds, ...]
) -> None:
    _, second = ledgers
    alice = await side(proxy_factory, "alice", "laptop", RecentIds(100))
    bob = await side(proxy_factory, "bob", "phone", second)
    redis_server.stop()

    alice.client.send_chat(BOB, "redis is down")
    await bob.client.next_message(TIMEOUT, where=lambda m: m.body == "redis is down")
    assert bob.decider.bodies.count("redis is down") == 1
    assert [op for op, _ in ops_for(bob.spool, "redis is down")] == [EntryOp.RECORD]
