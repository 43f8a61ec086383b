"""The policy in force, shared through a real redis-server so replicas enforce one version."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from classifier.policy import PolicyHolder, parse_policy, policy_to_dict
from proxy.redis_state import (
    MAX_POLICY_DOCUMENT_BYTES,
    POLICY_KEY,
    PolicySync,
    RedisPolicyVersion,
    SharedPolicyInvalid,
    SharedStateUnavailable,
)
from tests.support.redis import RedisServer
from tests.support.services import free_port

BASE = 'version = 1\nlocal_domains = ["localhost"]\n'
FLAGGING = BASE + '[[lexicons]]\nname = "secrecy"\nterms = ["off the record"]\n'
DENYING = BASE + '[federation]\nmode = "deny"\ndomains = ["spam.example"]\n'


@pytest.fixture
def raw_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


class Replica:
    """A policy file, the holder loaded from it, and the sync of one proxy replica."""

    def __init__(self, url: str, path: Path, text: str, mtime_ns: int) -> None:
        self.path = path
        self.write(text, mtime_ns)
        self.holder = PolicyHolder(parse_policy(text))
        self.sync = PolicySync(RedisPolicyVersion.from_url(url), self.holder, path)

    def write(self, text: str, mtime_ns: int) -> None:
        self.path.write_text(text)
        os.utime(self.path, ns=(mtime_ns, mtime_ns))

    def edit(self, text: str, mtime_ns: int) -> None:
        """What the file watcher does on a change: the new file's policy is in force."""
        self.write(text, mtime_ns)
        self.holder.replace(parse_policy(text))

    @property
    def fingerprint(self) -> str:
        return self.holder.current.fingerprint


MakeReplica = Callable[[str, str, int], Replica]


@pytest.fixture
async def replicas(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[MakeReplica]:
    made: list[Replica] = []

    def make(name: str, text: str, mtime_ns: int) -> Replica:
        replica = Replica(redis_server.url, tmp_path / f"{name}.toml", text, mtime_ns)
        made.append(replica)
        return replica

    yield make
    for replica in made:
        await replica.sync.shared.close()


SECOND = 1_000_000_000


async def test_an_edit_on_one_replica_reaches_the_other(replicas: MakeReplica) -> None:
    a = replicas("a", BASE, 100 * SECOND)
    b = replicas("b", BASE, 100 * SECOND)
    assert await a.sync.check() == "published"
    assert await b.sync.check() == "unchanged"  # the same version: nothing to do
    assert await b.sync.check() == "unchanged"
    a.edit(FLAGGING, 200 * SECOND)
    assert await a.sync.check() == "published"
    assert await b.sync.check() == "adopted"
    assert b.fingerprint == a.fingerprint and b.holder.current.policy.lexicons
    assert await b.sync.check() == "unchanged"
    # And back the other way: b's own edit, later, wins for both.
    b.edit(DENYING, 300 * SECOND)
    assert await b.sync.check() == "published"
    assert await a.sync.check() == "adopted"
    assert a.fingerprint == b.fingerprint


async def test_a_replica_restarting_with_an_older_file_follows_the_shared_version(
    replicas: MakeReplica,
) -> None:
    a = replicas("a", FLAGGING, 200 * SECOND)
    assert await a.sync.check() == "published"
    stale = replicas("stale", BASE, 100 * SECOND)
    assert await stale.sync.check() == "adopted"
    assert stale.fingerprint == a.fingerprint
    assert await a.sync.check() == "unchanged"  # and it did not undo a's version


async def test_redis_down_keeps_the_policy_in_force(
    replicas: MakeReplica, redis_server: RedisServer
) -> None:
    a = replicas("a", BASE, 100 * SECOND)
    before = a.fingerprint
    redis_server.stop()
    with pytest.raises(SharedStateUnavailable):
        await a.sync.check()
    assert a.fingerprint == before
    redis_server.start()
    assert await a.sync.check() == "published"


async def test_nothing_listening_is_unavailable() -> None:
    shared = RedisPolicyVersion.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
    try:
        with pytest.raises(SharedStateUnavailable):
            await shared.read()
    finally:
        await shared.close()


def _good_fields() -> dict[str, Any]:
    policy = parse_policy(FLAGGING)
    holder = PolicyHolder(policy)
    return {
        "serial": 7,
        "fingerprint": holder.current.fingerprint,
        "changed_at": 5,
        "document": json.dumps(policy_to_dict(policy)),
    }


def _tampered() -> dict[str, Any]:
    fields = _good_fields()
    document = json.loads(fields["document"])
    document["lexicons"][0]["terms"] = ["something else"]
    return {**fields, "document": json.dumps(document)}


@pytest.mark.parametrize(
    "value",
    [
        "a string",
        {**_good_fields(), "serial": "seven"},
        {**_good_fields(), "serial": 0},
        {**_good_fields(), "fingerprint": "../../etc"},
        {**_good_fields(), "changed_at": ""},
        {**_good_fields(), "document": "not json"},
        {**_good_fields(), "document": "[" * 100_000},
        {**_good_fields(), "document": json.dumps({"version": 99})},
        {**_good_fields(), "document": json.dumps([1, 2])},
        {**_good_fields(), "document": " " * (MAX_POLICY_DOCUMENT_BYTES + 1)},
        {k: v for k, v in _good_fields().items() if k != "document"},
        _tampered(),
    ],
    ids=[
        "wrong-type",
        "serial-text",
        "serial-zero",
        "fingerprint",
        "changed-at",
        "not-json",
        "deep-json",
        "bad-policy",
        "not-a-table",
        "oversized",
        "no-document",
        "tampered",
    ],
)
async def test_garbage_shared_policy_is_refused_and_replaced(
    replicas: MakeReplica, raw_redis: redis.Redis, value: Any
) -> None:
    a = replicas("a", BASE, 100 * SECOND)
    before = a.fingerprint
    if isinstance(value, str):
        raw_redis.set(POLICY_KEY, value)
    else:
        raw_redis.hset(POLICY_KEY, mapping=value)
    with pytest.raises(SharedPolicyInvalid):
        await a.sync.shared.read()
    # A sync round publishes a's own version over the garbage; nothing of it is enforced.
    assert await a.sync.check() == "published"
    assert a.fingerprint == before
    shared = await a.sync.shared.read()
    assert shared is not None and shared.fingerprint == a.fingerprint
