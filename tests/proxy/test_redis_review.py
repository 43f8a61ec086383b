"""`RedisReviewBus` against a real redis-server: the replicas' shared review state.

Requests go through a stream and a consumer group (each to one replica, taken over when the
replica holding it dies), status claims decide a held record once, pending deliveries and
their targets change in one step, delivery marks let each session get a released copy once,
and every replica hears of a release on one channel. JIDs in keys are digests; garbage in
Redis or a stopped Redis is an error of ours, never a crash or a silent success.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis

from proxy.redis_state import (
    MAX_REVIEW_PAYLOAD_BYTES,
    REVIEW_PREFIX,
    RedisReviewBus,
    SharedDelivery,
    SharedStateUnavailable,
)
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(redis_server: RedisServer) -> AsyncIterator[RedisReviewBus]:
    made = RedisReviewBus.from_url(redis_server.url, consumer="replica-0")
    yield made
    await made.close()


def raw_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


async def test_a_request_is_taken_once_and_answered(
    bus: RedisReviewBus, redis_server: RedisServer
) -> None:
    other = RedisReviewBus.from_url(redis_server.url, consumer="replica-1")
    try:
        await bus.submit(b'{"request_id": "r1"}')
        first = await bus.take(block=0.2)
        second = await other.take(block=0.2)  # the group gave it to one replica only
        assert [r.payload for r in first] == [b'{"request_id": "r1"}']
        assert second == []
        await bus.finish(first[0].entry_id, "0123456789abcdef", b'{"ok": true}')
        assert await other.outcome("0123456789abcdef") == b'{"ok": true}'
        assert await bus.outcome("fedcba9876543210") is None
        raw = raw_client(redis_server)
        assert raw.xlen(bus.requests_key) == 0  # acknowledged requests leave the stream
        raw.close()
    finally:
        await other.close()


async def test_a_request_left_by_a_dead_replica_is_taken_over(redis_server: RedisServer) -> None:
    dying = RedisReviewBus.from_url(redis_server.url, consumer="replica-0")
    survivor = RedisReviewBus(
        redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=2.0),
        consumer="replica-1",
        # Long enough that the "not yet" check below holds on a loaded machine too.
        claim_idle=1.5,
    )
    try:
        await dying.submit(b"release me")
        assert [r.payload for r in await dying.take(block=0.2)] == [b"release me"]
        await dying.close()  # it never finished the request
        assert await survivor.take(block=0.1) == []  # not idle long enough yet
        await asyncio.sleep(1.6)
        (taken,) = await survivor.take(block=0.1)
        assert taken.payload == b"release me"
        await survivor.finish(taken.entry_id, None, b"")
        assert await survivor.take(block=0.1) == []
    finally:
        await survivor.close()


async def test_a_request_made_before_any_replica_started_is_not_lost(
    redis_server: RedisServer,
) -> None:
    api = RedisReviewBus.from_url(redis_server.url, consumer="api")
    await api.submit(b"early")
    await api.close()
    late = RedisReviewBus.from_url(redis_server.url, consumer="replica-0")
    try:
        assert [r.payload for r in await late.take(block=0.2)] == [b"early"]
    finally:
        await late.close()


async def test_oversized_requests_and_bad_ids_are_refused(bus: RedisReviewBus) -> None:
    with pytest.raises(SharedStateUnavailable, match="too large"):
        await bus.submit(b"x" * (MAX_REVIEW_PAYLOAD_BYTES + 1))
    for bad in ("", "../x", "a" * 129, "id with space", "ré"):
        with pytest.raises(SharedStateUnavailable, match="not a record or request id"):
            await bus.outcome(bad)
        with pytest.raises(SharedStateUnavailable):
            await bus.claim_status(bad, "released")


async def test_the_first_decision_on_a_record_wins(
    bus: RedisReviewBus, redis_server: RedisServer
) -> None:
    other = RedisReviewBus.from_url(redis_server.url, consumer="replica-1")
    try:
        assert await bus.claim_status("rec-1", "released") is None
        assert await other.claim_status("rec-1", "confirmed-spam") == "released"
        assert await bus.claim_status("rec-1", "released") == "released"
        await other.drop_claim("rec-1", "confirmed-spam")  # not its claim: nothing changes
        assert await other.claim_status("rec-1", "confirmed-spam") == "released"
        await bus.drop_claim("rec-1", "released")  # its spool refused the entry
        assert await other.claim_status("rec-1", "confirmed-spam") is None
    finally:
        await other.close()


async def test_pending_deliveries_and_their_targets_change_together(
    bus: RedisReviewBus, redis_server: RedisServer
) -> None:
    hostile = "\u0410lice\ud800@corp.example" + "x" * 3000  # long, lone surrogate
    first = SharedDelivery("rec-1", "bob@corp.example", "to-client")
    second = SharedDelivery("rec-2", "bob@corp.example", "to-client")
    third = SharedDelivery("rec-3", hostile, "from-client")
    for delivery in (first, second, third):
        await bus.add_pending(delivery)
    assert await bus.pending_for("bob@corp.example") == [first, second]
    assert await bus.pending_for(hostile) == [third]
    assert await bus.pending_targets() == {"bob@corp.example", hostile}
    await bus.remove_pending(first)
    assert await bus.pending_targets() >= {"bob@corp.example"}  # rec-2 still waits
    await bus.remove_pending(second)
    await bus.remove_pending(second)  # twice is harmless
    assert "bob@corp.example" not in await bus.pending_targets()
    assert await bus.pending_for("bob@corp.example") == []
    raw = raw_client(redis_server)
    try:
        keys = [
            str(k, "utf-8") if isinstance(k, bytes) else k for k in raw.keys(REVIEW_PREFIX + "*")
        ]
        assert all(len(k) < 120 and "corp.example" not in k for k in keys), keys
    finally:
        raw.close()


async def test_each_destination_gets_a_release_once(bus: RedisReviewBus) -> None:
    assert await bus.claim_delivery("rec-1", "bob@corp.example/desk") is True
    assert await bus.claim_delivery("rec-1", "bob@corp.example/desk") is False
    assert await bus.claim_delivery("rec-1", "bob@corp.example/phone") is True
    assert await bus.delivered_to("rec-1") == ["bob@corp.example/desk", "bob@corp.example/phone"]
    assert await bus.delivered_to("rec-2") == []
    # A replica that could not deliver after all (its spool refused) gives its claims back.
    await bus.drop_delivery_claims("rec-1", ["bob@corp.example/desk"])
    await bus.drop_delivery_claims("rec-1", [])
    assert await bus.claim_delivery("rec-1", "bob@corp.example/desk") is True


async def test_every_replica_hears_of_a_release(
    bus: RedisReviewBus, redis_server: RedisServer
) -> None:
    listener = RedisReviewBus.from_url(redis_server.url, consumer="replica-1")
    pubsub = await listener.announcements()
    try:
        delivery = SharedDelivery("rec-9", "carol@corp.example", "to-client")
        await bus.add_pending(delivery)
        raw = None
        for _ in range(20):
            raw = await listener.next_announcement(pubsub, 0.5)
            if raw is not None:
                break
        assert raw is not None
        assert SharedDelivery.from_json(raw) == delivery
        assert await listener.next_announcement(pubsub, 0.1) is None
    finally:
        await listener.close_announcements(pubsub)
        await listener.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"record_id": "../x", "target": "a@b", "direction": "to-client"}',
        b'{"record_id": "r1", "target": "", "direction": "to-client"}',
        b'{"record_id": "r1"}',
        b"[" * 100_000,
        json.dumps({"record_id": "r1", "target": "x" * MAX_REVIEW_PAYLOAD_BYTES}).encode(),
    ],
)
def test_garbage_announcements_are_refused(garbage: bytes) -> None:
    with pytest.raises(SharedStateUnavailable, match="unreadable delivery announcement"):
        SharedDelivery.from_json(garbage)


async def test_a_stopped_redis_is_an_error_for_every_call(
    bus: RedisReviewBus, redis_server: RedisServer
) -> None:
    await bus.add_pending(SharedDelivery("rec-1", "bob@corp.example", "to-client"))
    redis_server.stop()
    calls = [
        bus.submit(b"{}"),
        bus.take(block=0.1),
        bus.finish("1-0", "0123456789abcdef", b"{}"),
        bus.outcome("0123456789abcdef"),
        bus.claim_status("rec-1", "released"),
        bus.drop_claim("rec-1", "released"),
        bus.add_pending(SharedDelivery("rec-2", "bob@corp.example", "to-client")),
        bus.pending_for("bob@corp.example"),
        bus.pending_targets(),
        bus.remove_pending(SharedDelivery("rec-1", "bob@corp.example", "to-client")),
        bus.claim_delivery("rec-1", "bob@corp.example/desk"),
        bus.delivered_to("rec-1"),
        bus.drop_delivery_claims("rec-1", ["bob@corp.example/desk"]),
        bus.announcements(),
    ]
    for call in calls:
        with pytest.raises(SharedStateUnavailable):
            await call
    redis_server.start()  # an empty one (no persistence here): the bus starts over by itself
    await bus.submit(b"after the restart")
    assert [r.payload for r in await bus.take(block=0.2)] == [b"after the restart"]
    assert await bus.claim_status("rec-1", "released") is None


async def test_a_foreign_value_under_a_key_is_an_error(
    bus: RedisReviewBus, redis_server: RedisServer
) -> None:
    raw = raw_client(redis_server)
    try:
        raw.set(bus.requests_key, b"someone else's string")
        raw.set(REVIEW_PREFIX + "pending-targets", b"not a set")
    finally:
        raw.close()
    with pytest.raises(SharedStateUnavailable):
        await bus.submit(b"{}")
    with pytest.raises(SharedStateUnavailable):
        await bus.take(block=0.1)
    with pytest.raises(SharedStateUnavailable):
        await bus.pending_targets()
