"""Shared counters in a real redis-server (tests/support/redis.py): several proxies, one count."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from classifier.context import DecisionContext
from classifier.limits import CounterStore, DuplicateRule, LimitKind, RateLimitRule
from proxy.redis_state import MAX_PLAIN_BYTES, RedisCounterStore, SharedStateUnavailable
from tests.classifier.helpers import CLOCK, make_ctx
from tests.support.protocols import implements
from tests.support.redis import RedisServer
from tests.support.services import free_port

T0 = CLOCK.now()


def at(seconds: float, **overrides: Any) -> DecisionContext:
    return make_ctx(timestamp=T0 + timedelta(seconds=seconds), **overrides)


@pytest.fixture
def two_proxies(redis_server: RedisServer) -> Iterator[tuple[RedisCounterStore, RedisCounterStore]]:
    """Two independent clients, as two proxy replicas would hold."""
    first = RedisCounterStore.from_url(redis_server.url)
    second = RedisCounterStore.from_url(redis_server.url)
    yield first, second
    first.close()
    second.close()


def test_is_a_counter_store(two_proxies: tuple[RedisCounterStore, RedisCounterStore]) -> None:
    assert implements(two_proxies[0], CounterStore)


def test_hits_slide_with_the_injected_clock(
    two_proxies: tuple[RedisCounterStore, RedisCounterStore],
) -> None:
    a, b = two_proxies
    assert [a.hit("k", t, 60, 100) for t in (0, 10, 20)] == [1, 2, 3]
    assert b.hit("k", 30, 60, 100) == 4  # the other proxy sees the same count
    assert a.hit("k", 65, 60, 100) == 4  # the event at 0 left the window (it is (5, 65])
    assert b.hit("k", 200, 60, 100) == 1
    assert a.hit("other", 200, 60, 100) == 1


def test_hits_stop_counting_at_the_cap(
    two_proxies: tuple[RedisCounterStore, RedisCounterStore],
) -> None:
    a, b = two_proxies
    counts = [(a if t % 2 else b).hit("k", float(t), 60, 5) for t in range(10)]
    assert counts == [1, 2, 3, 4, 5, 5, 5, 5, 5, 5]
    assert a.hit("k", 10.0, 60, 8) == 6  # a larger cap (policy reload) keeps what is kept


def test_distinct_members_are_shared_and_expire(
    two_proxies: tuple[RedisCounterStore, RedisCounterStore],
) -> None:
    a, b = two_proxies
    assert a.add_distinct("k", "x", 0, 60, 10) == 1
    assert b.add_distinct("k", "x", 1, 60, 10) == 1  # the same member, from the other proxy
    assert b.add_distinct("k", "y", 2, 60, 10) == 2
    assert a.add_distinct("k", "z", 61.5, 60, 10) == 2  # "x" (last seen at 1) left
    assert a.add_distinct("k", "w", 500, 60, 10) == 1
    for i in range(20):
        b.add_distinct("cap", f"m{i}", 300, 60, 5)
    assert a.add_distinct("cap", "last", 300, 60, 5) == 5


def test_keys_expire_in_redis(redis_server: RedisServer) -> None:
    store = RedisCounterStore.from_url(redis_server.url)
    store.hit("idle", 0.0, 2.0, 10)
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = client.keys("sg:cnt:*")
        assert keys == [b"sg:cnt:idle"]
        ttl = client.pttl(keys[0])
        assert 0 < ttl <= 3000  # one window plus a second of slack collects an idle key
    finally:
        client.close()
        store.close()


def test_rate_limit_counts_across_two_proxies(
    two_proxies: tuple[RedisCounterStore, RedisCounterStore],
) -> None:
    # One spammer spreads a burst over two replicas: each rule instance sees the whole burst.
    first = RateLimitRule(LimitKind.SENDER, 3, two_proxies[0])
    second = RateLimitRule(LimitKind.SENDER, 3, two_proxies[1])
    results = [(first if i % 2 else second).evaluate(at(i)) for i in range(5)]
    assert results[:3] == [None, None, None]
    assert results[3] is not None and results[4] is not None
    assert "more than 3 stanzas" in results[3].detail
    assert first.evaluate(at(2, sender="someone@else.example")) is None
    assert second.evaluate(at(120)) is None  # the window moved on


def test_duplicate_bodies_across_two_proxies(
    two_proxies: tuple[RedisCounterStore, RedisCounterStore],
) -> None:
    rules = [
        DuplicateRule(two_proxies[0], recipients=3),
        DuplicateRule(two_proxies[1], recipients=3),
    ]
    results = [
        rules[i % 2].evaluate(at(i, recipient=f"user{i}@corp.example", body="Buy now 123"))
        for i in range(4)
    ]
    assert results[:2] == [None, None]
    assert results[2] is not None and results[3] is not None


def test_hostile_keys_and_members(two_proxies: tuple[RedisCounterStore, RedisCounterStore]) -> None:
    a, b = two_proxies
    long_key = "rate:sender:" + "x" * 100_000
    assert a.hit(long_key, 0, 60, 10) == 1
    assert b.hit(long_key, 1, 60, 10) == 2  # a long key is hashed, consistently
    weird = "k\x00\n*3\r\n$3\r\nDEL\r\n\udcff"  # NUL, RESP framing, a lone surrogate
    assert a.add_distinct(weird, weird, 0, 60, 10) == 1
    assert b.add_distinct(weird, "m" * (MAX_PLAIN_BYTES * 10), 0, 60, 10) == 2
    assert a.add_distinct(weird, "m" * (MAX_PLAIN_BYTES * 10), 0, 60, 10) == 2
    for bad_now, bad_window in ((float("nan"), 60.0), (0.0, float("inf")), (0.0, 0.0)):
        with pytest.raises(ValueError):
            a.hit("k", bad_now, bad_window, 10)


def test_unreachable_redis_is_an_error_not_a_pass() -> None:
    store = RedisCounterStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    with pytest.raises(SharedStateUnavailable):
        store.hit("k", 0.0, 60.0, 10)
    with pytest.raises(SharedStateUnavailable):
        RedisCounterStore.from_url("http://not-redis.example/")


def test_survives_a_redis_restart(redis_server: RedisServer) -> None:
    store = RedisCounterStore.from_url(redis_server.url)
    try:
        assert store.hit("k", 0.0, 60, 10) == 1
        redis_server.stop()
        with pytest.raises(SharedStateUnavailable):
            store.hit("k", 1.0, 60, 10)
        redis_server.start()
        # The script cache and the counts were lost with the server; counting starts again.
        assert store.hit("k", 2.0, 60, 10) == 1
    finally:
        store.close()
