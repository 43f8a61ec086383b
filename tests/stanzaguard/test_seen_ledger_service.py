"""`seen_ledger = "redis"` in the service: two archiving proxies, one Redis, one Prosody.

Alice writes through the first proxy to Bob while he is offline; the first proxy decides and
spools the RECORD and marks its id in Redis. Bob logs in through the second proxy and gets
Prosody's offline redelivery: the second proxy spools only an OBSERVE of that record id, so
its own archive holds one more observation and no second copy of the message.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from archive_api.store.records import Direction, EntryOp, SpoolEntry
from proxy.redis_state import SEEN_KEY_PREFIX
from stanzaguard.settings import Settings
from tests.stanzaguard.conftest import ArchivingFactory, ArchivingProxy
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


async def entries(proxy: ArchivingProxy) -> list[SpoolEntry]:
    await proxy.drain()
    store = proxy.store
    chain = proxy.service.settings.chain_name
    return [SpoolEntry.from_payload(link.payload) async for link in store.chain_links(chain=chain)]


async def test_the_second_proxy_observes_an_offline_redelivery(
    archiving_factory: ArchivingFactory, redis_server: RedisServer
) -> None:
    first = await archiving_factory(seen_ledger="redis", redis_url=redis_server.url)
    second = await archiving_factory(seen_ledger="redis", redis_url=redis_server.url)
    alice = first.client("alice")
    await alice.connect()
    body = "see this when you are back"
    sent_id = alice.send_chat("bob@localhost", body)
    for _ in range(200):
        if any(m.id == sent_id for m in first.prosody.offline_messages("bob")):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("Prosody did not store the message for offline Bob")
    raw = redis.Redis.from_url(redis_server.url)
    try:
        for _ in range(200):  # the mark is written behind the spool write
            if raw.keys(SEEN_KEY_PREFIX + "*"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the first proxy never marked the record in Redis")
    finally:
        raw.close()

    bob = second.client("bob")
    await bob.connect()
    received = await bob.next_message(TIMEOUT, where=lambda m: m.body == body)
    assert received.delayed

    (recorded,) = [e for e in await entries(first) if e.record and e.record.body == body]
    assert recorded.op is EntryOp.RECORD
    seconds = [e for e in await entries(second) if e.record_id == recorded.record_id]
    assert [e.op for e in seconds] == [EntryOp.OBSERVE]
    assert seconds[0].observation is not None
    assert seconds[0].observation.jid.startswith("bob@localhost/")
    assert seconds[0].observation.direction is Direction.TO_CLIENT


def test_the_shared_ledger_needs_redis_and_a_sane_ttl(tmp_path: Path) -> None:
    base = {"domain": ["corp.example"], "data_dir": tmp_path}
    with pytest.raises(ValidationError, match="seen_ledger=redis"):
        Settings(**base, seen_ledger="redis")
    for ttl in (0.0, 0.5, 31 * 86_400.0, float("nan")):
        with pytest.raises(ValidationError):
            Settings(
                **base,
                seen_ledger="redis",
                redis_url="redis://127.0.0.1:6379/0",
                seen_ledger_ttl=ttl,
            )
    with pytest.raises(ValidationError):
        Settings(**base, seen_ledger="disk")
    ok = Settings(**base, seen_ledger="redis", redis_url="redis://127.0.0.1:6379/0")
    assert ok.seen_ledger_ttl == 86_400.0
