"""Stream-management states in a store: the stored form, and Redis shared by two replicas.

The Redis tests run a real redis-server (tests/support/redis.py). A stored state is read back
by another replica, so everything it holds is checked like wire input: garbage, wrong shapes,
oversized values and values of the wrong Redis type are refused, never half-used.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from proxy.redis_state import MAX_SM_RECORD_BYTES, SM_KEY_PREFIX, RedisSmStore
from proxy.sm import (
    MODULUS,
    DirectionLedger,
    SmRegistry,
    SmState,
    SmStateCorrupt,
    SmStore,
    SmStoreUnavailable,
)
from tests.support.redis import RedisServer
from tests.support.services import free_port


def busy_state(sm_id: str = "sm-1") -> SmState:
    state = SmState(sm_id, bound_jid="carol@localhost/phone")
    for _ in range(3):
        state.to_client.forwarded()
    state.to_client.dropped()
    state.to_client.forwarded()
    state.to_client.injected(b"<message id='inj'/>")
    state.to_server.forwarded()
    state.to_server.dropped()
    return state


# -- the stored form ---------------------------------------------------------------------------


def test_a_state_survives_its_record() -> None:
    state = busy_state()
    back = SmState.from_record(json.loads(json.dumps(state.to_record(detached=True))), "sm-1")
    assert back.bound_jid == state.bound_jid and back.exact
    for ledger, copy in ((state.to_client, back.to_client), (state.to_server, back.to_server)):
        assert (copy.source_count, copy.sink_count) == (ledger.source_count, ledger.sink_count)
        assert list(copy.unacked_injections) == list(ledger.unacked_injections)
        assert [copy.translate(h) for h in range(ledger.sink_count + 1)] == [
            ledger.translate(h) for h in range(ledger.sink_count + 1)
        ]


def test_a_record_written_while_live_is_not_exact() -> None:
    back = SmState.from_record(busy_state().to_record(detached=False), "sm-1")
    assert not back.exact


@given(st.lists(st.sampled_from(["fwd", "drop", "inject"]), max_size=60), st.integers(0, 30))
def test_a_lagging_copy_translates_like_the_live_ledger(ops: list[str], lag: int) -> None:
    """A replica reads a copy written at the last change; plain forwarding went on after it."""
    live = DirectionLedger()
    for op in ops:
        getattr(live, {"fwd": "forwarded", "drop": "dropped", "inject": "injected"}[op])(
            *((b"x",) if op == "inject" else ())
        )
    copy = DirectionLedger.from_record(live.to_record())
    for _ in range(lag):
        live.forwarded()
    for h in range(live.sink_count + 1):
        assert copy.translate_near(h) == live.translate(h)


def test_resumption_near_a_lagging_count_across_the_wrap() -> None:
    ledger = DirectionLedger(source_count=MODULUS - 3, sink_count=MODULUS - 3)
    ledger.dropped()
    copy = DirectionLedger.from_record(ledger.to_record())
    # The client wrapped past 2^32 after the copy was written: h=2 is ahead, not behind.
    source_h, _ = copy.restart_at(2)
    assert source_h == 3  # one dropped stanza later in the source's numbering


GOOD = busy_state().to_record(detached=True)


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(json.dumps(GOOD))
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return record


@pytest.mark.parametrize(
    "record",
    [
        None,
        [],
        "text",
        {},
        _with(("v",), 2),
        _with(("id",), "another id"),
        _with(("epoch",), -1),
        _with(("epoch",), 1.5),
        _with(("epoch",), True),
        _with(("jid",), 42),
        _with(("jid",), ""),
        _with(("jid",), "x" * 20_000),
        _with(("detached",), "yes"),
        _with(("to_client",), None),
        _with(("to_client", "source"), -1),
        _with(("to_client", "sink"), "3"),
        _with(("to_client", "sink"), 2**70),
        _with(("to_client", "marks"), []),
        _with(("to_client", "marks"), [[0, 0], [9, 1], [5, 1]]),
        _with(("to_client", "marks"), [[0, 0], [99, 1]]),
        _with(("to_client", "marks"), [[0]]),
        _with(("to_client", "marks"), [[0, 0]] * 100_001),
        _with(("to_client", "injections"), [[5, "not base64!"]]),
        _with(("to_client", "injections"), [[5, 7]]),
        _with(("to_client", "injections"), {"5": "eA=="}),
        {**GOOD, "extra": 1},
    ],
    ids=lambda r: json.dumps(r)[:60] if not isinstance(r, dict) or len(json.dumps(r)) < 60 else "",
)
def test_garbage_records_are_refused(record: Any) -> None:
    with pytest.raises(SmStateCorrupt):
        SmState.from_record(record, "sm-1")


async def test_the_memory_registry_is_a_store_of_live_objects() -> None:
    registry: SmStore = SmRegistry()
    state = registry.create("abc")
    state.to_client.dropped()
    await registry.save(state, detached=True)
    assert not state.changed
    assert await registry.fetch("abc") is state
    await registry.discard("abc")
    assert await registry.fetch("abc") is None


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[tuple[RedisSmStore, RedisSmStore]]:
    """Two stores on one Redis, as two proxy replicas hold them."""
    first = RedisSmStore.from_url(redis_server.url, ttl=600)
    second = RedisSmStore.from_url(redis_server.url, ttl=600)
    yield first, second
    await first.close()
    await second.close()


@pytest.fixture
def raw_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def sm_key(raw: redis.Redis, sm_id: str) -> bytes:
    [key] = [k for k in raw.keys(f"{SM_KEY_PREFIX}*") if isinstance(k, bytes)]
    return key


async def test_another_replica_reads_what_one_wrote(
    replicas: tuple[RedisSmStore, RedisSmStore], raw_redis: redis.Redis
) -> None:
    first, second = replicas
    state = first.create("sm-1")
    state.to_client.dropped()
    await first.save(state)
    copy = await second.fetch("sm-1")
    assert copy is not None and copy is not state and not copy.exact
    assert copy.to_client.translate(0) == 1
    assert await second.fetch("never-enabled") is None
    # The key is the id's hash (ids come back from clients), and it expires.
    key = sm_key(raw_redis, "sm-1")
    assert b"sm-1" not in key and 0 < raw_redis.pttl(key) <= 600_000


async def test_a_connection_the_session_left_cannot_write_back(
    replicas: tuple[RedisSmStore, RedisSmStore],
) -> None:
    first, second = replicas
    old = first.create("sm-1")
    await first.save(old)
    resumed = await second.fetch("sm-1")
    assert resumed is not None
    resumed.epoch += 1
    resumed.to_client.dropped()
    await second.save(resumed)
    old.to_client.forwarded()
    await first.save(old, detached=True)  # the old connection ends late: ignored
    again = await first.fetch("sm-1")
    assert again is not None and again.epoch == 1 and again.to_client.translate(0) == 1


async def test_the_local_live_state_wins_at_the_same_epoch(
    replicas: tuple[RedisSmStore, RedisSmStore],
) -> None:
    first, _ = replicas
    state = first.create("sm-1")
    await first.save(state)
    state.to_client.forwarded()  # newer than the stored copy
    assert await first.fetch("sm-1") is state


@pytest.mark.parametrize(
    "value",
    [
        b"plain string",
        {b"epoch": b"0", b"data": b"not json"},
        {b"epoch": b"0", b"data": b"[" * 100_000},
        {b"epoch": b"0", b"data": b"{}"},
        {b"epoch": b"0", b"data": b" " * (MAX_SM_RECORD_BYTES + 1)},
        {b"epoch": b"0", b"data": json.dumps({**GOOD, "id": "sm-other"}).encode()},
    ],
    ids=["wrong-type", "not-json", "deep", "empty", "oversized", "other-id"],
)
async def test_garbage_in_redis_is_refused_and_overwritten(
    replicas: tuple[RedisSmStore, RedisSmStore], raw_redis: redis.Redis, value: Any
) -> None:
    first, second = replicas
    state = first.create("sm-1")
    await first.save(state)
    key = sm_key(raw_redis, "sm-1")
    raw_redis.delete(key)
    if isinstance(value, bytes):
        raw_redis.set(key, value)
    else:
        raw_redis.hset(key, mapping=value)
    with pytest.raises(SmStateCorrupt):
        await second.fetch("sm-1")
    await first.save(state)  # the owner's next write replaces it
    assert await second.fetch("sm-1") is not None


async def test_redis_down_is_unavailable(redis_server: RedisServer) -> None:
    store = RedisSmStore.from_url(redis_server.url, ttl=600, timeout=0.3)
    try:
        state = store.create("sm-1")
        redis_server.stop()
        with pytest.raises(SmStoreUnavailable):
            await store.save(state)
        with pytest.raises(SmStoreUnavailable):
            await store.fetch("sm-1")
        redis_server.start()
        await store.save(state)
    finally:
        await store.close()


async def test_nothing_listening_is_unavailable() -> None:
    store = RedisSmStore.from_url(f"redis://127.0.0.1:{free_port()}/0", ttl=600, timeout=0.3)
    try:
        with pytest.raises(SmStoreUnavailable):
            await store.fetch("x")
    finally:
        await store.close()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(SmStoreUnavailable):
        RedisSmStore.from_url("nonsense://", ttl=600)
    with pytest.raises(ValueError, match="ttl"):
        RedisSmStore.from_url("redis://127.0.0.1:1/0", ttl=0)
