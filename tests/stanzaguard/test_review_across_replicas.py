"""Officers' review with several proxy replicas (review_queue = "redis").

Two archiving services stand for two replicas of the proxy StatefulSet: one Prosody behind
both, one Redis, one archive in Elasticsearch (osmem-server), each replica with its own chain
and spool. Eve (on ``remote.localhost``, straight to Prosody) sends a stranger's URL to Bob,
which the policy quarantines. Then:

- a release decided on the replica Bob is *not* connected through reaches Bob's live session
  through the other one, stamped with its original time;
- a release requested through the API's queue while Bob is offline waits, and reaches him at
  his next login, through whichever replica he logs in with, once;
- two replicas deciding one held message both ways: the first decision wins, even before
  either replica's status entry is indexed;
- garbage in the shared queue is dropped and the next request is applied; a stopped Redis
  makes a review action unavailable (HTTP 503 in the API), never half-applied.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from pydantic import ValidationError

from archive_api.context import ReviewLabel, ReviewUnavailable
from archive_api.store.records import (
    ArchiveRecord,
    EntryOp,
    ObservationVia,
    RecordStatus,
    SpoolEntry,
)
from proxy.redis_state import REVIEW_PREFIX, RedisReviewBus
from stanzaguard import quarantine
from stanzaguard.api_wiring import MailboxReview, ServiceReview
from stanzaguard.quarantine import RedisChannel
from stanzaguard.settings import Settings
from tests.stanzaguard import es_support, test_quarantine_e2e
from tests.stanzaguard.conftest import ArchivingFactory, ArchivingProxy, run_cli
from tests.stanzaguard.es_support import EsLocation
from tests.stanzaguard.test_quarantine_e2e import (
    BOB,
    EVE,
    POLICY,
    SPAM,
    TIMEOUT,
    RemoteFactory,
    assert_released_copy,
    eventually,
    login,
    no_message_from,
)
from tests.support.clients import ChatClient
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

# The fixtures this module uses (pytest finds them as module attributes).
osmem_server = es_support.osmem_server
es_client = es_support.es_client
es_location = es_support.es_location
prosody = test_quarantine_e2e.prosody
remote = test_quarantine_e2e.remote

Replicas = tuple[ArchivingProxy, ArchivingProxy]


@pytest.fixture
async def replicas(
    es_location: EsLocation, redis_server: RedisServer, archiving_factory: ArchivingFactory
) -> Replicas:
    # es_location first: its indices are dropped only after the services have stopped.
    async def replica(n: int) -> ArchivingProxy:
        return await archiving_factory(
            policy=POLICY,
            chain_name=f"replica-{n}",
            store="elasticsearch",
            es_url=[es_location.url],
            es_index_prefix=es_location.prefix,
            index_worker=True,
            review_queue="redis",
            redis_url=redis_server.url,
        )

    return await replica(0), await replica(1)


@pytest.fixture
async def api_review(replicas: Replicas, redis_server: RedisServer) -> AsyncIterator[MailboxReview]:
    """The review actions of an API Deployment: no proxy in its process, only the queue."""
    channel = RedisChannel(RedisReviewBus.from_url(redis_server.url, consumer="api"))
    yield MailboxReview(channel, replicas[0].service.store, wait=TIMEOUT)
    await channel.close()


async def held_on(running: ArchivingProxy, sender: str) -> ArchiveRecord:
    """The record of ``sender``'s spam, once the replica that held it indexed it."""
    store = running.service.store

    async def find() -> ArchiveRecord | None:
        await running.drain()
        page = await store.search(f"from:{sender} type:chat", limit=10, sort="time_asc")
        found = [hit.record for hit in page.hits if hit.record.body == SPAM]
        return found[-1] if found else None

    record = await eventually(find, f"a record of {sender}'s message")
    assert isinstance(record, ArchiveRecord)
    assert record.status is RecordStatus.HELD
    return record


async def statuses(running: ArchivingProxy, record_id: str) -> list[SpoolEntry]:
    """STATUS entries of one record in one replica's chain."""
    await running.drain()
    chain = running.service.settings.chain_name
    out = []
    async for link in running.service.store.chain_links(chain=chain):
        entry = SpoolEntry.from_payload(link.payload)
        if entry.op is EntryOp.STATUS and entry.record_id == record_id:
            out.append(entry)
    return out


def shared_review(event: str) -> float:
    """The replicas' `stanzaguard_shared_review_total` for one event (one process here)."""
    found = REGISTRY.get_sample_value("stanzaguard_shared_review_total", {"event": event})
    return found or 0.0


async def spam_held_for_bob(
    replica: ArchivingProxy, remote: RemoteFactory
) -> tuple[ChatClient, ChatClient, ArchiveRecord]:
    """Bob logged in through `replica`; eve's spam to him, held there. (Bob, eve, record.)"""
    bob = await login(replica, "bob", resource="desk")
    eve = await remote("eve")
    eve.send_chat(BOB, SPAM)
    return bob, eve, await held_on(replica, EVE)


async def spam_held_for_offline_bob(replicas: Replicas, remote: RemoteFactory) -> ArchiveRecord:
    """Eve's spam held for Bob on the first replica; then Bob gone from both replicas."""
    bob, _eve, held = await spam_held_for_bob(replicas[0], remote)
    await bob.disconnect()

    async def offline() -> bool:
        return not any(r.service.proxy.sessions_of(BOB) for r in replicas)

    await until(offline, "bob's session gone from both replicas")
    return held


async def until(check: Callable[[], Awaitable[object]], what: str) -> None:
    await eventually(check, what, timeout=TIMEOUT)


async def test_a_release_on_one_replica_reaches_the_session_on_the_other(
    replicas: Replicas, remote: RemoteFactory
) -> None:
    deciding, holding = replicas
    bob, _eve, held = await spam_held_for_bob(holding, remote)
    assert no_message_from(await bob.drain(), EVE)
    delivered_before = shared_review("delivered")

    outcome = await quarantine.release(deciding.service, held.record_id, "olivia")
    assert outcome.ok and outcome.status is RecordStatus.RELEASED, outcome
    copy = await bob.next_message(TIMEOUT, where=lambda m: m.body == SPAM)
    assert_released_copy(copy, held, bob.jid)
    assert outcome.delivered_to in ((bob.jid,), ()), outcome  # () if it took over a second

    async def counted() -> bool:
        # Counted after the copy went out and Redis was told: bob may have it sooner.
        return shared_review("delivered") >= delivered_before + 1

    await until(counted, "the delivery counted")
    assert shared_review("delivered") == delivered_before + 1

    # The decision is in the deciding replica's chain; the delivery in the holding one's.
    (status,) = await statuses(deciding, held.record_id)
    assert (status.status, status.actor) == (RecordStatus.RELEASED, "olivia")
    assert await statuses(holding, held.record_id) == []

    async def released() -> bool:
        await deciding.drain()
        await holding.drain()
        record = await holding.service.store.get(held.record_id)
        return record is not None and (
            record.status is RecordStatus.RELEASED
            and any(
                o.via is ObservationVia.RELEASE and o.jid == bob.jid for o in record.observations
            )
        )

    await until(released, "the archive shows the release and the delivery")
    # Releasing again, on either replica, delivers nothing more.
    again = await quarantine.release(holding.service, held.record_id, "olivia")
    assert again.ok and again.detail == "already released"
    await asyncio.sleep(0.5)
    assert no_message_from(await bob.drain(), EVE)


async def test_a_release_through_the_api_reaches_an_offline_recipient_once(
    replicas: Replicas, remote: RemoteFactory, api_review: MailboxReview, redis_server: RedisServer
) -> None:
    first, second = replicas
    held = await spam_held_for_offline_bob(replicas, remote)
    outcome = await api_review.release(held.record_id, "token:olivia")
    assert outcome.ok and not outcome.queued, outcome
    assert "next login" in outcome.detail, outcome

    phone = await login(second, "bob", resource="phone")  # through the other replica
    copy = await phone.next_message(TIMEOUT, where=lambda m: m.body == SPAM)
    assert_released_copy(copy, held, phone.jid)
    raw = redis.Redis.from_url(redis_server.url)
    try:

        async def delivered() -> bool:
            return not raw.smembers(REVIEW_PREFIX + "pending-targets")

        await until(delivered, "nothing pending in Redis any more")
    finally:
        raw.close()
    # Delivered once: another login, on either replica, gets nothing more.
    laptop = await login(first, "bob", resource="laptop")
    await asyncio.sleep(1.0)
    assert no_message_from(await laptop.drain(), EVE)
    assert no_message_from(await phone.drain(), EVE)


async def test_the_first_decision_wins_across_replicas(
    replicas: Replicas, remote: RemoteFactory
) -> None:
    first, second = replicas
    bob, _eve, held = await spam_held_for_bob(second, remote)

    # Back to back: neither status entry is indexed when the other replica decides.
    confirmed = await quarantine.confirm_spam(second.service, held.record_id, "olivia")
    refused = await quarantine.release(first.service, held.record_id, "mallory")
    assert confirmed.ok and confirmed.status is RecordStatus.CONFIRMED_SPAM
    assert not refused.ok and refused.detail == "confirmed spam is never delivered", refused
    assert await statuses(first, held.record_id) == []
    await asyncio.sleep(0.5)
    assert no_message_from(await bob.drain(), EVE)


async def test_garbage_in_the_queue_is_dropped_and_redis_down_is_unavailable(
    replicas: Replicas, remote: RemoteFactory, api_review: MailboxReview, redis_server: RedisServer
) -> None:
    first = replicas[0]
    bob, eve, held = await spam_held_for_bob(first, remote)

    dropped_before = shared_review("request_dropped")
    applied_before = shared_review("request_applied")
    raw = redis.Redis.from_url(redis_server.url)
    try:
        stream = REVIEW_PREFIX + "requests"
        for garbage in (
            b"not json",
            b"[" * 50_000,
            b'{"request_id": "0123456789abcdef", "kind": "release", "record_id": "../x",'
            b' "actor": "a", "requested_at": "2026-01-01T00:00:00+00:00"}',
            b'{"request_id": "0123456789abcdef", "kind": "release", "record_id": "r",'
            b' "actor": "a\\u0000b", "requested_at": "2026-01-01T00:00:00+00:00"}',
            b'{"request_id": "nope", "kind": "explode"}',
        ):
            raw.xadd(stream, {b"request": garbage})
        raw.xadd(stream, {b"other-field": b"x"})
        outcome = await api_review.confirm_spam(held.record_id, "token:olivia")
        assert outcome.ok and outcome.status == "confirmed-spam", outcome

        async def emptied() -> bool:
            # A request is counted just after it left the stream: wait for both.
            counted = (
                shared_review("request_dropped") >= dropped_before + 6
                and shared_review("request_applied") >= applied_before + 1
            )
            return raw.xlen(stream) == 0 and counted

        await until(emptied, "every request, garbage too, taken off the queue and counted")
    finally:
        raw.close()
    assert shared_review("request_dropped") == dropped_before + 6
    assert shared_review("request_applied") == applied_before + 1
    assert no_message_from(await bob.drain(), EVE)

    eve.send_chat(BOB, SPAM)
    later = await eventually(lambda: _newest_held(first, held.record_id), "a second held message")
    assert isinstance(later, ArchiveRecord)
    redis_server.stop()
    review = ServiceReview(first.service.quarantine, first.service.store)  # type: ignore[arg-type]
    with pytest.raises(ReviewUnavailable):
        await review.release(later.record_id, "token:olivia")
    assert await statuses(first, later.record_id) == []  # nothing half-done
    redis_server.start()
    done = await review.release(later.record_id, "token:olivia")
    assert done.ok and done.status == "released", done
    copy = await bob.next_message(TIMEOUT, where=lambda m: m.body == SPAM)
    assert_released_copy(copy, later, bob.jid)


async def _newest_held(running: ArchivingProxy, other_than: str) -> ArchiveRecord | None:
    await running.drain()
    page = await running.service.store.search(f"from:{EVE} verdict:quarantine", limit=10)
    found = [
        h.record
        for h in page.hits
        if h.record.record_id != other_than and h.record.status is RecordStatus.HELD
    ]
    return found[0] if found else None


def test_the_shared_review_queue_needs_redis(tmp_path: Path) -> None:
    base: dict[str, Any] = {"domain": ["corp.example"], "data_dir": tmp_path}
    with pytest.raises(ValidationError, match="review_queue=redis"):
        Settings(**base, review_queue="redis")
    with pytest.raises(ValidationError):
        Settings(**base, review_queue="carrier-pigeon")
    ok = Settings(**base, review_queue="redis", redis_url="redis://127.0.0.1:6379/0")
    assert ok.review_queue == "redis"
    assert Settings(**base).review_queue == "files"


async def test_the_commands_use_the_shared_queue_by_their_settings(
    replicas: Replicas,
    remote: RemoteFactory,
    redis_server: RedisServer,
    es_location: EsLocation,
    tmp_path: Path,
) -> None:
    first = replicas[0]
    _bob, _eve, held = await spam_held_for_bob(first, remote)
    config = tmp_path / "officer.toml"
    config.write_text(
        f'domain = ["localhost"]\nreview_queue = "redis"\nredis_url = "{redis_server.url}"\n'
        f'store = "elasticsearch"\nes_url = ["{es_location.url}"]\n'
        f'es_index_prefix = "{es_location.prefix}"\n'
    )
    # No data directory here: the archive is in Elasticsearch, requests go through Redis.
    listed = await asyncio.to_thread(
        run_cli, "quarantine", "list", "--json", "--config", str(config),
        "--data-dir", str(tmp_path / "none"),
    )  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert [json.loads(line)["record_id"] for line in listed.stdout.splitlines()] == [
        held.record_id
    ]
    args = ["quarantine", "confirm-spam", held.record_id, "--actor", "olivia"]
    args += ["--config", str(config), "--data-dir", str(tmp_path / "none")]
    done = await asyncio.to_thread(run_cli, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "confirmed spam" in done.stdout
    again = await asyncio.to_thread(run_cli, *args)
    assert again.returncode == 0 and "already confirmed spam" in again.stdout
    refused = await asyncio.to_thread(
        run_cli, "quarantine", "release", held.record_id, "--actor", "mallory",
        "--config", str(config),
    )  # fmt: skip
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "never delivered" in refused.stdout
    redis_server.stop()
    down = await asyncio.to_thread(run_cli, *args, "--wait", "1")
    assert down.returncode == 2, down.stdout + down.stderr
    assert "review queue is unavailable" in down.stderr


async def test_a_delivery_lost_with_redis_data_is_announced_again_on_a_repeated_release(
    replicas: Replicas, remote: RemoteFactory, redis_server: RedisServer
) -> None:
    first, second = replicas
    held = await spam_held_for_offline_bob(replicas, remote)
    outcome = await quarantine.release(first.service, held.record_id, "olivia")
    assert outcome.ok and outcome.pending, outcome
    await first.drain()  # the release is in the archive, as it would be long before a loss
    raw = redis.Redis.from_url(redis_server.url)
    try:
        raw.flushall()  # Redis lost its data (no persistence) before bob came back
    finally:
        raw.close()
    again = await quarantine.release(second.service, held.record_id, "olivia")
    assert again.ok and "announced again" in again.detail, again

    phone = await login(second, "bob", resource="phone")
    copy = await phone.next_message(TIMEOUT, where=lambda m: m.body == SPAM)
    assert_released_copy(copy, held, phone.jid)

    async def observed() -> bool:
        await second.drain()
        record = await second.service.store.get(held.record_id)
        return record is not None and any(
            o.via is ObservationVia.RELEASE for o in record.observations
        )

    await until(observed, "the delivery in the archive")
    third = await quarantine.release(first.service, held.record_id, "olivia")
    assert third.ok and third.detail == "already released", third  # delivered: nothing more


async def test_a_request_failing_unexpectedly_is_answered_not_retried(
    replicas: Replicas, remote: RemoteFactory, api_review: MailboxReview, redis_server: RedisServer
) -> None:
    first = replicas[0]
    _bob, _eve, held = await spam_held_for_bob(first, remote)
    for replica in replicas:  # a directory where the examples file goes: an OSError
        examples = replica.service.settings.data_dir / "learning" / "examples.jsonl"
        examples.unlink(missing_ok=True)
        examples.mkdir(parents=True)
    applied_before = shared_review("request_applied")
    outcome = await api_review.label(held.record_id, ReviewLabel.SPAM, "token:olivia")
    assert not outcome.ok and "failed" in outcome.detail, outcome

    async def counted() -> bool:
        # Counted just after the outcome is stored, which the API may read first.
        return shared_review("request_applied") >= applied_before + 1

    await until(counted, "the request counted as applied")
    assert shared_review("request_applied") == applied_before + 1
    raw = redis.Redis.from_url(redis_server.url)
    try:
        assert raw.xlen(REVIEW_PREFIX + "requests") == 0  # answered, so never taken again
    finally:
        raw.close()
