"""`BufferedRedisCounters` against a real redis-server: shared counts without a round trip per
counted stanza. Flushes are made by the tests (`flush()`); the background thread's interval is
an hour here, so it never interferes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from classifier.limits import CounterStore, LimitKind, RateLimitRule
from proxy.redis_state import BufferedRedisCounters, RedisCounterStore
from stanzaguard.settings import Settings
from tests.proxy.test_redis_state import at
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

HOUR = 3600.0


def buffered(server: RedisServer, **kwargs: int) -> BufferedRedisCounters:
    return BufferedRedisCounters(RedisCounterStore.from_url(server.url), interval=HOUR, **kwargs)


@pytest.fixture
def replicas(redis_server: RedisServer) -> Iterator[tuple[BufferedRedisCounters, ...]]:
    made = (buffered(redis_server), buffered(redis_server))
    yield made
    for store in made:
        store.close()


def test_is_a_counter_store(replicas: tuple[BufferedRedisCounters, ...]) -> None:
    store: CounterStore = replicas[0]
    assert store.hit("k", 1.0, 60.0, 10) == 1


def test_a_lone_replica_counts_exactly_and_stops_at_the_cap(
    replicas: tuple[BufferedRedisCounters, ...],
) -> None:
    first = replicas[0]
    assert [first.hit("k", float(t), 10.0, 100) for t in range(5)] == [1, 2, 3, 4, 5]
    assert first.flush()
    assert first.hit("k", 5.0, 10.0, 100) == 6  # shared 5 at the flush + 1 of its own since
    assert first.hit("k", 20.0, 10.0, 100) == 1  # the window moved on: the shared count too
    assert [first.hit("c", 1.0, 10.0, 3) for _ in range(5)] == [1, 2, 3, 3, 3]


def test_each_replica_sees_the_others_events_after_a_flush(
    replicas: tuple[BufferedRedisCounters, ...],
) -> None:
    first, second = replicas
    for t in range(5):
        first.hit("spammer", float(t), 60.0, 100)
    assert second.hit("spammer", 5.0, 60.0, 100) == 1  # nothing flushed yet: its own only
    assert first.flush() and second.flush()
    assert second.hit("spammer", 6.0, 60.0, 100) == 7  # 6 in Redis at its flush, +1 since
    assert first.hit("spammer", 7.0, 60.0, 100) == 6  # 5 at its flush, +1 since
    assert first.flush()
    # Redis had 7 at that flush (second's last event still waits in second's queue), +1.
    assert first.hit("spammer", 8.0, 60.0, 100) == 8


def test_distinct_members_across_replicas(replicas: tuple[BufferedRedisCounters, ...]) -> None:
    first, second = replicas
    assert first.add_distinct("fanout", "a@x", 1.0, 60.0, 100) == 1
    assert first.add_distinct("fanout", "b@x", 1.0, 60.0, 100) == 2
    assert second.add_distinct("fanout", "a@x", 1.0, 60.0, 100) == 1
    assert first.flush() and second.flush()
    assert second.add_distinct("fanout", "c@x", 2.0, 60.0, 100) == 3  # {a, b} + c


def test_a_rate_limit_spread_over_two_replicas_is_caught_after_a_flush(
    replicas: tuple[BufferedRedisCounters, ...],
) -> None:
    first = RateLimitRule(LimitKind.SENDER, 3, replicas[0])
    second = RateLimitRule(LimitKind.SENDER, 3, replicas[1])
    assert [first.evaluate(at(i)) for i in range(2)] == [None, None]
    assert [second.evaluate(at(2 + i)) for i in range(2)] == [None, None]  # 2 each, unflushed
    for store in replicas:
        store.flush()
    flagged = second.evaluate(at(4))
    assert flagged is not None and "more than 3 stanzas" in flagged.detail


def test_a_dead_redis_never_reaches_the_hot_path(
    replicas: tuple[BufferedRedisCounters, ...], redis_server: RedisServer
) -> None:
    first = replicas[0]
    first.hit("k", 1.0, 60.0, 100)
    assert first.flush()
    redis_server.stop()
    # RedisCounterStore would raise SharedStateUnavailable on each of these.
    assert [first.hit("k", 2.0 + t, 60.0, 100) for t in range(3)] == [2, 3, 4]
    assert first.add_distinct("m", "x", 2.0, 60.0, 100) == 1
    assert not first.flush()  # the writes are dropped and counted
    assert first.dropped == 4 and first.failures == 1
    redis_server.start()  # an empty one: counting goes on from what arrives
    first.hit("k", 10.0, 60.0, 100)
    assert first.flush()


def test_queued_writes_are_bounded(redis_server: RedisServer) -> None:
    store = buffered(redis_server, max_pending=3)
    try:
        for t in range(5):
            store.hit("k", float(t), 60.0, 100)
        assert store.dropped == 2
        assert store.flush()
    finally:
        store.close()


def test_hostile_keys_and_bad_numbers(replicas: tuple[BufferedRedisCounters, ...]) -> None:
    first = replicas[0]
    hostile = "\ud800" + "k" * 10_000
    assert first.hit(hostile, 1.0, 60.0, 10) == 1
    assert first.add_distinct(hostile + "m", "\x00member\ud800", 1.0, 60.0, 10) == 1
    for now, window in ((math.nan, 60.0), (1.0, math.inf), (1.0, 0.0)):
        with pytest.raises(ValueError):  # as RedisCounterStore: the rule's failure action
            first.hit("bad", now, window, 10)
    assert first.flush()
    assert first.hit(hostile, 2.0, 60.0, 10) == 2  # shared 1 at the flush + 1 since


def test_the_interval_setting() -> None:
    base: dict[str, Any] = {
        "domain": ["corp.example"],
        "counters": "redis",
        "redis_url": "redis://h:6379/0",
    }
    assert Settings(**base).counters_flush_interval == 0.0  # exact, a round trip each
    assert Settings(**base, counters_flush_interval=0.05).counters_flush_interval == 0.05
    for bad in (-1.0, 11.0, math.nan, math.inf):
        with pytest.raises(ValidationError):
            Settings(**base, counters_flush_interval=bad)


def test_a_flush_carries_many_events_of_a_key_in_a_few_calls(
    replicas: tuple[BufferedRedisCounters, ...],
) -> None:
    first, second = replicas
    for i in range(2500):  # three script calls for this key (at most 1,000 events each)
        first.hit("busy", i / 1000.0, 60.0, 10_000)
    assert first.flush()
    assert second.hit("busy", 2.5, 60.0, 10_000) == 1
    assert second.flush()
    assert second.hit("busy", 2.6, 60.0, 10_000) == 2502  # all of first's, both of its own
