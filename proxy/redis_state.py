"""State several proxies share through Redis: counters, stream-management states.

`RedisCounterStore` implements `classifier.limits.CounterStore` with one sorted set per key
(score: the event's time from the injected clock), updated by a Lua script so that trimming,
adding and counting are one atomic step even with many proxies hitting the same key. A
spammer who spreads a burst over several proxy replicas meets one count.

Calls are synchronous (the rules are), one loopback round trip each, with a short socket
timeout: a Redis that does not answer raises `SharedStateUnavailable`, and the rule chain
treats that like any failing rule (its configured failure action), never as ALLOW by silence.

`SharedRecentIds` is the duplicate ledger several proxies share: which record ids some proxy
already spooled (hashed keys ``sg:seen:``, expiring after a TTL), so that the recipient's proxy
records another observation of a message the sender's proxy decided instead of deciding it
again. It is an accelerator, never a guarantee: the store merges two RECORD entries of one id
anyway, so a lost or late ledger write costs a second decision, not a duplicate record.

`RedisSmStore` keeps XEP-0198 states (the proxy's `h` mappings, see `proxy.sm`) so that a
client whose connection broke can resume through another replica; it is async, since the
transport awaits it at the few moments a mapping changes. `PolicySync` shares the policy in
force (its canonical form and fingerprint), so that every replica enforces one version.

Keys are namespaced (``sg:cnt:``) and hashed when long, since they carry user-chosen text
(JIDs, domains); each key expires one window after its last event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import redis
import redis.asyncio
from redis.commands.core import AsyncScript, Script

from classifier.clock import Clock
from classifier.errors import PolicyError
from classifier.limits import InMemoryCounterStore
from classifier.policy import (
    ActivePolicy,
    Policy,
    PolicyHolder,
    policy_fingerprint,
    policy_from_dict,
    policy_to_dict,
)
from proxy.errors import ProxyError
from proxy.metrics import SEEN_LEDGER
from proxy.pipeline import RecentIds
from proxy.sm import SmRegistry, SmState, SmStateCorrupt, SmStoreUnavailable

log = logging.getLogger(__name__)

KEY_PREFIX = "sg:cnt:"
#: Longer keys and members are stored as their SHA-256 (they are user-chosen text).
MAX_PLAIN_BYTES = 200

# KEYS[1] the sorted set; ARGV: window, cap, then (time, member) pairs: one event (a counted
# stanza) or several of one key at once (a buffered flush). Keeps the events in
# (newest - window, newest], at most `cap` of them (the newest), and returns how many there
# are. The TTL only collects idle keys; the window itself is computed from the times.
_SLIDE = """
local key = KEYS[1]
local window = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local newest = nil
for i = 3, #ARGV, 2 do
  local t = tonumber(ARGV[i])
  if newest == nil or t > newest then newest = t end
  redis.call('ZADD', key, ARGV[i], ARGV[i + 1])
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', newest - window)
local n = redis.call('ZCARD', key)
if n > cap then
  redis.call('ZREMRANGEBYRANK', key, 0, n - cap - 1)
  n = cap
end
redis.call('PEXPIRE', key, math.ceil(window * 1000) + 1000)
return n
"""
#: Most events of one key one `_SLIDE` call carries.
SLIDE_MANY_EVENTS = 1000


class SharedStateUnavailable(ProxyError):
    """Redis, which holds the shared counters, could not be reached or refused the call."""


def _sync_client(url: str, timeout: float) -> redis.Redis:
    """A client connecting lazily to `url`; every call gives up after `timeout` seconds."""
    try:
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except (ValueError, redis.RedisError) as exc:
        raise SharedStateUnavailable(f"bad redis_url: {exc}") from None


def _async_client(url: str, timeout: float) -> redis.asyncio.Redis:
    """The asyncio form of `_sync_client`."""
    try:
        return redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
    except (ValueError, redis.RedisError) as exc:
        raise SharedStateUnavailable(f"bad redis_url: {exc}") from None


def _check_times(now: float, window: float) -> None:
    if not (math.isfinite(now) and math.isfinite(window) and window > 0):
        raise ValueError("now and window must be finite, and window positive")


def _set_member(member: str | None) -> bytes:
    """A counted event's member in a key's sorted set. An event (`member` None) is its own
    member, a random id, so two proxies' hits never merge; a distinct member is itself."""
    if member is None:
        return b"e:" + os.urandom(9).hex().encode()
    return b"m:" + _bounded(member)


def _bounded(text: str) -> bytes:
    # surrogatepass: JIDs from the wire may carry lone surrogates; they must not raise here.
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_PLAIN_BYTES:
        return raw
    return b"h:" + hashlib.sha256(raw).hexdigest().encode()


class RedisCounterStore:
    """A `CounterStore` in Redis, shared by every proxy pointed at the same database."""

    def __init__(self, client: redis.Redis, *, prefix: str = KEY_PREFIX) -> None:
        self._client = client
        self._prefix = prefix.encode()
        self._slide: Script = client.register_script(_SLIDE)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.5) -> RedisCounterStore:
        """Connect lazily to `url`; every call gives up after `timeout` seconds."""
        client = _sync_client(url, timeout)
        return cls(client)

    def close(self) -> None:
        self._client.close()

    def hit(self, key: str, now: float, window: float, cap: int) -> int:
        return self._run(key, now, window, cap, _set_member(None))

    def add_distinct(self, key: str, member: str, now: float, window: float, cap: int) -> int:
        return self._run(key, now, window, cap, _set_member(member))

    def _run(self, key: str, now: float, window: float, cap: int, member: bytes) -> int:
        try:
            count: Any = self._slide(**self._slide_args(key, window, cap, [(now, member)]))
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"shared counters unavailable: {exc}") from exc
        return int(cast(int, count))

    def _slide_args(
        self, key: str, window: float, cap: int, events: Sequence[tuple[float, bytes]]
    ) -> dict[str, Any]:
        args: list[str | int | bytes] = [repr(float(window)), max(1, cap)]
        for now, member in events:
            _check_times(now, window)
            args += [repr(float(now)), member]
        return {"keys": [self._prefix + _bounded(key)], "args": args}

    def pipeline(self) -> redis.client.Pipeline:
        """A pipeline for `queue_slide_many` calls (one round trip for many counted events)."""
        return self._client.pipeline(transaction=False)

    def queue_slide_many(
        self,
        pipe: redis.client.Pipeline,
        key: str,
        window: float,
        cap: int,
        events: Sequence[tuple[float, bytes]],
    ) -> None:
        """Add several (time, member) events of one key in one script call, in `pipe`."""
        self._slide(client=pipe, **self._slide_args(key, window, cap, events))


@dataclass(slots=True)
class _Known:
    """What Redis said about a key at this replica's last flush of it."""

    shared: int  # every replica's events in the window, this replica's flushed ones included
    own: int  # this replica's own count when its last flushed event was counted
    at: float  # `now` of that event
    window: float


@dataclass(frozen=True, slots=True)
class _Queued:
    key: str
    member: str | None  # None: an event (`hit`); else a distinct member
    now: float
    window: float
    cap: int
    own: int


class BufferedRedisCounters:
    """A `CounterStore` shared through Redis that never waits for Redis on the hot path.

    `RedisCounterStore` costs the rule chain one blocking round trip per counted stanza.
    Here this replica's own events are counted at once in memory (exact), and written to
    Redis by a background thread every `interval` seconds in one pipeline; each write
    returns the shared count, which later answers use: *shared count at the last flush +
    own events since*. So a burst spread over several replicas is seen by each of them
    within about `interval` seconds, and a lone replica's count is exact. Never less than
    this replica's own count; a shared count older than its window is ignored.

    When Redis does not answer, events keep being counted locally (the shared part goes
    stale and is then ignored) and the queued writes are dropped and counted, never
    retried into the past. Bounded: at most `max_pending` queued writes and `max_keys`
    remembered shared counts.
    """

    def __init__(
        self,
        remote: RedisCounterStore,
        *,
        interval: float,
        max_pending: int = 100_000,
        max_keys: int = 200_000,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError("interval must be positive")
        self._remote = remote
        self._local = InMemoryCounterStore(max_keys=max_keys)
        self._interval = interval
        self._max_pending = max_pending
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._pending: list[_Queued] = []
        self._known: dict[str, _Known] = {}
        self._stop = threading.Event()
        self.dropped = 0
        self.failures = 0
        self._thread = threading.Thread(
            target=self._flush_forever, name="stanzaguard-counters", daemon=True
        )
        self._thread.start()

    def hit(self, key: str, now: float, window: float, cap: int) -> int:
        _check_times(now, window)
        own = self._local.hit(key, now, window, cap)
        return self._answer(_Queued(key, None, now, window, max(1, cap), own))

    def add_distinct(self, key: str, member: str, now: float, window: float, cap: int) -> int:
        _check_times(now, window)
        own = self._local.add_distinct(key, member, now, window, cap)
        return self._answer(_Queued(key, member, now, window, max(1, cap), own))

    def _answer(self, event: _Queued) -> int:
        with self._lock:
            if len(self._pending) < self._max_pending:
                self._pending.append(event)
            else:
                self.dropped += 1
            known = self._known.get(event.key)
        count = event.own
        if known is not None and event.now - known.at < known.window:
            count = max(count, known.shared + max(0, event.own - known.own))
        return min(count, event.cap)

    def flush(self) -> bool:
        """Write what is queued now (the thread does it every `interval`); False on failure."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return True
        # One script call per key (events of a key repeat within an interval), in order.
        by_key: dict[str, list[_Queued]] = {}
        for event in batch:
            by_key.setdefault(event.key, []).append(event)
        calls: list[list[_Queued]] = [
            events[i : i + SLIDE_MANY_EVENTS]
            for events in by_key.values()
            for i in range(0, len(events), SLIDE_MANY_EVENTS)
        ]
        try:
            with self._remote.pipeline() as pipe:
                for events in calls:
                    last = events[-1]
                    members = [(e.now, _set_member(e.member)) for e in events]
                    self._remote.queue_slide_many(pipe, last.key, last.window, last.cap, members)
                answers = pipe.execute()
        except (redis.RedisError, ValueError) as exc:
            with self._lock:
                self.failures += 1
                self.dropped += len(batch)
            log.warning("shared counters: flush failed", extra={"error": str(exc)})
            return False
        with self._lock:
            for events, answer in zip(calls, answers, strict=True):
                last = events[-1]
                self._known[last.key] = _Known(int(answer), last.own, last.now, last.window)
            while len(self._known) > self._max_keys:
                del self._known[next(iter(self._known))]
        return True

    def _flush_forever(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self) -> None:
        """Write what is queued, stop the thread, close the client."""
        self._stop.set()
        self._thread.join(5.0)
        self.flush()
        self._remote.close()


# -- stream-management states (XEP-0198), so a client can resume through another replica ------

SM_KEY_PREFIX = "sg:sm:"
#: Largest stored state read back; anything longer is treated as garbage.
MAX_SM_RECORD_BYTES = 8 * 1024 * 1024

# KEYS[1] the state's hash; ARGV: epoch, JSON, TTL in ms.
# Writes unless the stored epoch is newer: a connection the session has already left (it was
# resumed elsewhere) must not put its stale counts back. A value that is not ours is replaced.
_SAVE_SM = """
local key = KEYS[1]
local kind = redis.call('TYPE', key)['ok']
if kind ~= 'none' and kind ~= 'hash' then
  redis.call('DEL', key)
elseif kind == 'hash' then
  local stored = tonumber(redis.call('HGET', key, 'epoch'))
  if stored and stored > tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('HSET', key, 'epoch', ARGV[1], 'data', ARGV[2])
redis.call('PEXPIRE', key, ARGV[3])
return 1
"""


class RedisSmStore:
    """An `SmStore` in Redis, shared by every proxy replica in front of one server.

    One hash per SM id (``sg:sm:`` + SHA-256 of the id, which the client sends back in
    ``<resume previd/>`` and so is attacker-chosen), expiring `ttl` seconds after its last
    write: set it to the server's resumption timeout (Prosody's ``smacks_hibernation_time``).
    States of this replica's own live connections are also kept in memory: they are exact,
    and a resumption through this replica prefers them unless Redis holds a newer epoch.
    """

    def __init__(
        self, client: redis.asyncio.Redis, *, ttl: float, prefix: str = SM_KEY_PREFIX
    ) -> None:
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError("ttl must be positive")
        self._client = client
        self._ttl_ms = math.ceil(ttl * 1000)
        self._prefix = prefix.encode()
        self._save: AsyncScript = client.register_script(_SAVE_SM)
        self._local = SmRegistry()

    @classmethod
    def from_url(cls, url: str, *, ttl: float, timeout: float = 0.5) -> RedisSmStore:
        try:
            client = _async_client(url, timeout)
        except SharedStateUnavailable as exc:
            raise SmStoreUnavailable(str(exc)) from None
        return cls(client, ttl=ttl)

    async def close(self) -> None:
        await self._client.aclose()

    def _key(self, sm_id: str) -> bytes:
        digest = hashlib.sha256(sm_id.encode("utf-8", "surrogatepass")).hexdigest()
        return self._prefix + digest.encode()

    def create(self, sm_id: str) -> SmState:
        return self._local.create(sm_id)

    async def fetch(self, sm_id: str) -> SmState | None:
        local = self._local.get(sm_id)
        try:
            raw: Any = await self._client.hget(self._key(sm_id), "data")
        except redis.ResponseError as exc:  # e.g. WRONGTYPE: someone else's value
            raise SmStateCorrupt(f"stored SM state unreadable: {exc}") from None
        except redis.RedisError as exc:
            raise SmStoreUnavailable(f"SM states unavailable: {exc}") from exc
        if raw is None:
            return local
        if not isinstance(raw, bytes) or len(raw) > MAX_SM_RECORD_BYTES:
            raise SmStateCorrupt("stored SM state too large")
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):
            raise SmStateCorrupt("stored SM state is not JSON") from None
        stored = SmState.from_record(record, sm_id)
        if local is not None and local.epoch >= stored.epoch:
            return local
        self._local.adopt(stored)  # resumed through this replica from now on, most likely
        return stored

    async def save(self, state: SmState, *, detached: bool = False) -> None:
        data = json.dumps(state.to_record(detached=detached), separators=(",", ":"))
        try:
            await self._save(keys=[self._key(state.sm_id)], args=[state.epoch, data, self._ttl_ms])
        except redis.RedisError as exc:
            raise SmStoreUnavailable(f"SM states unavailable: {exc}") from exc
        state.mark_written()

    async def discard(self, sm_id: str) -> None:
        self._local.forget(sm_id)
        try:
            await self._client.delete(self._key(sm_id))
        except redis.RedisError as exc:
            raise SmStoreUnavailable(f"SM states unavailable: {exc}") from exc


# -- the policy in force, shared so that every replica enforces one version ---------------------

POLICY_KEY = "sg:policy"
MAX_POLICY_DOCUMENT_BYTES = 16 * 1024 * 1024
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")

# KEYS[1] the shared policy's hash; ARGV: fingerprint, changed_at (ns), canonical JSON.
# Publishes unless what is shared changed later (by its file's time). Returns {1, serial} when
# published, {2, serial} when that very version is already shared, {0, 0} when the shared one
# is newer (the caller then adopts it). Garbage is replaced.
_PUBLISH_POLICY = """
local key = KEYS[1]
local kind = redis.call('TYPE', key)['ok']
local serial = 0
if kind ~= 'none' and kind ~= 'hash' then
  redis.call('DEL', key)
elseif kind == 'hash' then
  local fields = redis.call('HMGET', key, 'serial', 'changed_at', 'fingerprint')
  serial = tonumber(fields[1]) or 0
  local changed_at = tonumber(fields[2])
  if fields[3] == ARGV[1] and serial > 0 then
    return {2, serial}
  end
  if changed_at and changed_at > tonumber(ARGV[2]) then
    return {0, 0}
  end
end
serial = serial + 1
redis.call('HSET', key, 'serial', serial, 'fingerprint', ARGV[1], 'changed_at', ARGV[2],
  'document', ARGV[3])
return {1, serial}
"""


class SharedPolicyInvalid(ProxyError):
    """The policy shared in Redis is not one a replica published (garbage, or tampered)."""


@dataclass(frozen=True)
class SharedPolicy:
    serial: int
    fingerprint: str
    changed_at_ns: int
    policy: Policy


class RedisPolicyVersion:
    """The policy in force, as one hash: a serial, its fingerprint, when it changed, and its
    canonical form (`policy_to_dict`, JSON). A replica that reads it re-parses the document
    and checks that it has the published fingerprint before it enforces it."""

    def __init__(self, client: redis.asyncio.Redis, *, key: str = POLICY_KEY) -> None:
        self._client = client
        self._key = key
        self._publish: AsyncScript = client.register_script(_PUBLISH_POLICY)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.5) -> RedisPolicyVersion:
        client = _async_client(url, timeout)
        return cls(client)

    async def close(self) -> None:
        await self._client.aclose()

    async def publish(self, active: ActivePolicy, changed_at_ns: int) -> tuple[str, int]:
        """Share `active` unless the shared one changed later.

        Returns ('published' or 'already', serial), or ('newer', 0) when another replica
        shared a version that changed later.
        """
        document = json.dumps(policy_to_dict(active.policy), separators=(",", ":"))
        try:
            answer: Any = await self._publish(
                keys=[self._key], args=[active.fingerprint, max(0, changed_at_ns), document]
            )
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"shared policy unavailable: {exc}") from exc
        code, serial = (int(part) for part in answer)
        return ("newer", "published", "already")[code], serial

    async def read(self) -> SharedPolicy | None:
        try:
            kind: Any = await self._client.type(self._key)
            if kind in (b"none", "none"):
                return None
            if kind not in (b"hash", "hash"):
                raise SharedPolicyInvalid("the shared policy is not a hash")
            fields: Any = await self._client.hmget(
                self._key, ["serial", "fingerprint", "changed_at", "document"]
            )
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"shared policy unavailable: {exc}") from exc
        serial, fingerprint, changed_at, document = fields
        try:
            parsed_serial = int(serial)
            parsed_changed_at = int(changed_at)
            text_fingerprint = fingerprint.decode("ascii")
        except (TypeError, ValueError, AttributeError, UnicodeDecodeError):
            raise SharedPolicyInvalid("the shared policy's fields are malformed") from None
        if not _FINGERPRINT.fullmatch(text_fingerprint) or parsed_serial < 1:
            raise SharedPolicyInvalid("the shared policy's fields are malformed")
        if not isinstance(document, bytes) or len(document) > MAX_POLICY_DOCUMENT_BYTES:
            raise SharedPolicyInvalid("the shared policy document is missing or too large")
        try:
            policy = policy_from_dict(json.loads(document))
        except (ValueError, RecursionError, TypeError, AttributeError, PolicyError) as exc:
            raise SharedPolicyInvalid(f"the shared policy does not parse: {exc}") from None
        if policy_fingerprint(policy) != text_fingerprint:
            raise SharedPolicyInvalid("the shared policy does not match its fingerprint")
        return SharedPolicy(parsed_serial, text_fingerprint, parsed_changed_at, policy)


class PolicySync:
    """Keeps this replica's policy and the shared one the same version.

    When this replica's policy changes (its file was reloaded, or at start-up) it publishes
    it, stamped with the file's modification time; when another replica published a newer
    one, this replica enforces that. So an edit on any replica (the API writes the file of the
    machine it runs on) reaches all of them within `interval` seconds, and a replica that
    restarts with an older file follows the newer shared version instead of undoing it.
    A shared document that does not parse or match its fingerprint is refused (logged) and
    the policy in force stays.
    """

    def __init__(
        self,
        shared: RedisPolicyVersion,
        holder: PolicyHolder,
        policy_file: Path | None,
        *,
        interval: float = 1.0,
    ) -> None:
        self.shared = shared
        self.holder = holder
        self.policy_file = policy_file
        self.interval = interval
        self._synced: str | None = None  # the fingerprint last published or adopted
        self._serial = 0
        self._task: asyncio.Task[None] | None = None
        self.adopted = 0
        self.errors = 0

    def _changed_at_ns(self) -> int:
        if self.policy_file is None:
            return 0
        try:
            return self.policy_file.stat().st_mtime_ns
        except OSError:
            return 0

    async def check(self) -> str:
        """One round: 'published', 'adopted' or 'unchanged'. Raises on an unusable Redis."""
        local = self.holder.current
        if local.fingerprint != self._synced:
            outcome, serial = await self.shared.publish(local, self._changed_at_ns())
            if outcome != "newer":
                self._synced, self._serial = local.fingerprint, serial
                if outcome == "already":
                    return "unchanged"
                log.info("policy published", extra={"fingerprint": local.fingerprint})
                return "published"
        shared = await self.shared.read()
        if shared is None or shared.serial == self._serial:
            return "unchanged"
        self._serial = shared.serial
        if shared.fingerprint == self.holder.current.fingerprint:
            self._synced = shared.fingerprint
            return "unchanged"
        self.holder.replace(shared.policy)
        self._synced = shared.fingerprint
        self.adopted += 1
        log.info("policy adopted from another replica", extra={"fingerprint": shared.fingerprint})
        return "adopted"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except (SharedStateUnavailable, SharedPolicyInvalid) as exc:
                self.errors += 1
                log.warning(
                    "policy sync failed; the policy in force stays", extra={"error": str(exc)}
                )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- the duplicate ledger: record ids some proxy already spooled ---------------------------------

SEEN_KEY_PREFIX = "sg:seen:"
#: Bytes of SHA-256 kept per key: 128 bits make a collision between two record ids as likely
#: as a guessed key, and keep a key at about 24 bytes (record ids carry JIDs and can be long).
SEEN_DIGEST_BYTES = 16
SEEN_WRITE_BATCH = 1000


class RedisSeenLedger:
    """Record ids remembered in Redis for `ttl` seconds: one short string key per id.

    Synchronous, like the counters: the look-up is made while a stanza is planned, one round
    trip with a short socket timeout; writes are batched in one pipeline.
    """

    def __init__(self, client: redis.Redis, *, ttl: float, prefix: str = SEEN_KEY_PREFIX) -> None:
        if not (math.isfinite(ttl) and ttl >= 1):
            raise ValueError("ttl must be at least one second")
        self._client = client
        self._ttl_ms = math.ceil(ttl * 1000)
        self._prefix = prefix.encode()

    @classmethod
    def from_url(cls, url: str, *, ttl: float, timeout: float = 0.2) -> RedisSeenLedger:
        client = _sync_client(url, timeout)
        return cls(client, ttl=ttl)

    def close(self) -> None:
        self._client.close()

    def key(self, record_id: str) -> bytes:
        raw = record_id.encode("utf-8", "surrogatepass")
        return self._prefix + hashlib.sha256(raw).digest()[:SEEN_DIGEST_BYTES]

    def seen(self, record_id: str) -> bool:
        try:
            return bool(self._client.exists(self.key(record_id)))
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"duplicate ledger unavailable: {exc}") from exc

    def remember(self, record_ids: Sequence[str]) -> None:
        """Mark ids as spooled; each expires `ttl` after its newest marking."""
        if not record_ids:
            return
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for record_id in record_ids:
                    pipe.set(self.key(record_id), b"1", px=self._ttl_ms)
                pipe.execute()
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"duplicate ledger unavailable: {exc}") from exc


_STOP: Final = object()


class SharedRecentIds:
    """This proxy's `RecentIds`, backed by a `RedisSeenLedger` every proxy shares.

    The pipeline asks ``record_id in ids`` for every stanza it plans and calls ``add`` for every
    entry it spooled. A local hit costs nothing; a local miss asks Redis once. Writes go to
    Redis from a background thread, after the spool write: the sender's proxy never waits for
    Redis before forwarding, so the recipient's copy can, rarely, arrive before the mark and
    be decided a second time (the store still makes one record of both).

    When Redis does not answer, look-ups say "not seen" (decide again: the safe side) and are
    not tried again for `pause` seconds, so a dead Redis costs one socket timeout per `pause`,
    not one per stanza; marks queued meanwhile are dropped once `max_pending` wait.
    """

    def __init__(
        self,
        local: RecentIds,
        ledger: RedisSeenLedger,
        *,
        clock: Clock,
        pause: float = 5.0,
        max_pending: int = 100_000,
    ) -> None:
        self._local = local
        self._ledger = ledger
        self._clock = clock
        self._pause = pause
        self._paused_until = -math.inf
        self._pending: queue.Queue[object] = queue.Queue(max_pending)
        self._writer = threading.Thread(
            target=self._write_forever, name="stanzaguard-seen-ledger", daemon=True
        )
        self._writer.start()
        self._hit = SEEN_LEDGER.labels("shared_hit")
        self._miss = SEEN_LEDGER.labels("miss")
        self._unavailable = SEEN_LEDGER.labels("unavailable")
        self._dropped = SEEN_LEDGER.labels("dropped")
        self._written = SEEN_LEDGER.labels("written")

    def __contains__(self, record_id: object) -> bool:
        if record_id in self._local:
            return True
        if not isinstance(record_id, str) or self._clock.monotonic() < self._paused_until:
            return False
        try:
            found = self._ledger.seen(record_id)
        except SharedStateUnavailable as exc:
            self._unavailable.inc()
            self._paused_until = self._clock.monotonic() + self._pause
            log.warning(
                "duplicate ledger unavailable: deciding locally",
                extra={"error": str(exc), "retry_in_s": self._pause},
            )
            return False
        if found:
            self._hit.inc()
            self._local.add(record_id)
        else:
            self._miss.inc()
        return found

    def add(self, record_id: str) -> None:
        self._local.add(record_id)
        try:
            self._pending.put_nowait(record_id)
        except queue.Full:
            self._dropped.inc()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every id added so far was handed to Redis (tests, shutdown)."""
        done = threading.Event()
        try:
            self._pending.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending (for at most `timeout` seconds), stop, close the client."""
        if self._writer.is_alive():
            with contextlib.suppress(queue.Full):
                self._pending.put(_STOP, timeout=timeout)
            self._writer.join(timeout)
        self._ledger.close()

    def _write_forever(self) -> None:
        while True:
            batch: list[str] = []
            waiters: list[threading.Event] = []
            item = self._pending.get()
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, threading.Event):
                    waiters.append(item)
                elif isinstance(item, str):
                    batch.append(item)
                if stop or len(batch) >= SEEN_WRITE_BATCH:
                    break
                try:
                    item = self._pending.get_nowait()
                except queue.Empty:
                    break
            self._write(batch)
            for waiter in waiters:
                waiter.set()
            if stop:
                return

    def _write(self, batch: list[str]) -> None:
        if not batch:
            return
        try:
            self._ledger.remember(batch)
        except SharedStateUnavailable as exc:
            self._dropped.inc(len(batch))
            log.warning("duplicate ledger write failed", extra={"error": str(exc)})
        else:
            self._written.inc(len(batch))


# -- officers' review across replicas: requests, status claims, released-message deliveries ------

REVIEW_PREFIX = "sg:review:"
REVIEW_GROUP = "proxies"
#: Requests kept in the stream at most (acknowledged ones are deleted at once).
REVIEW_STREAM_MAXLEN = 100_000
MAX_REVIEW_PAYLOAD_BYTES = 64 * 1024
#: How long outcomes, status claims and delivery marks outlive their last write.
REVIEW_RETENTION_SECONDS = 30 * 86_400
_REVIEW_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")

# KEYS[1] the target's hash of pending deliveries, KEYS[2] the set of targets with some;
# ARGV: record id, direction, target (as the set's member), ttl (ms).
_ADD_PENDING = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

# KEYS as above; ARGV: record id, target. The target leaves the set with its last delivery,
# in one step, so that a delivery added meanwhile never loses its target.
_REMOVE_PENDING = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[2])
end
return removed
"""

# KEYS[1] a record's status claim; ARGV: the claimant's status. Deletes only its own claim.
_DROP_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class SharedReviewRequest:
    """One officer's request as read from the stream (its payload is parsed by the caller)."""

    entry_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class SharedDelivery:
    """A released message waiting for (or announced to) its target's sessions."""

    record_id: str
    target: str  # bare JID, lower case
    direction: str  # the value of `archive_api.store.records.Direction`

    def to_json(self) -> bytes:
        return json.dumps(
            {"record_id": self.record_id, "target": self.target, "direction": self.direction},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SharedDelivery:
        """Raises `SharedStateUnavailable` for anything but a well-formed announcement."""
        try:
            data: Any = json.loads(raw) if len(raw) <= MAX_REVIEW_PAYLOAD_BYTES else None
            delivery = cls(str(data["record_id"]), str(data["target"]), str(data["direction"]))
        except (ValueError, TypeError, KeyError, RecursionError):
            raise SharedStateUnavailable("unreadable delivery announcement") from None
        if not _REVIEW_ID.fullmatch(delivery.record_id) or not delivery.target:
            raise SharedStateUnavailable("unreadable delivery announcement")
        return delivery


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _jid_bytes(jid: str) -> bytes:
    # JIDs read off the wire may hold lone surrogates: they go through as they are.
    return jid.encode("utf-8", "surrogatepass")


def _jid_text(value: Any) -> str:
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return value.decode("utf-8", "replace")


class RedisReviewBus:
    """What the replicas share to carry out officers' review actions.

    - *Requests*: one stream (``sg:review:requests``) read by the consumer group ``proxies``;
      each request goes to one replica, which acknowledges it once its outcome is stored
      (``sg:review:done:REQUEST_ID``). A replica that dies holding a request loses it to the
      next one that finds it idle for `claim_idle` seconds (applying twice is harmless).
    - *Status claims*: the first replica to release or confirm a record claims its status
      (``SET NX``), so two replicas never decide one held message both ways while their
      spools wait to be indexed.
    - *Deliveries*: a released message is pending for its target (a hash per target, a set of
      targets) until some replica delivered it to a live session; every replica hears of it
      on the channel ``sg:review:deliver``, and each session gets it once (a set of delivery
      marks per record, ``SADD`` decides).

    Keys carrying JIDs are SHA-256 digests (JIDs are user-chosen text).
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        consumer: str,
        claim_idle: float = 30.0,
        prefix: str = REVIEW_PREFIX,
    ) -> None:
        if not (math.isfinite(claim_idle) and claim_idle > 0):
            raise ValueError("claim_idle must be positive")
        self._client = client
        self.consumer = consumer
        self._claim_idle_ms = math.ceil(claim_idle * 1000)
        self._prefix = prefix
        self.requests_key = prefix + "requests"
        self.channel = prefix + "deliver"
        self._targets_key = prefix + "pending-targets"
        self._retention_ms = REVIEW_RETENTION_SECONDS * 1000
        self._add_pending: AsyncScript = client.register_script(_ADD_PENDING)
        self._remove_pending: AsyncScript = client.register_script(_REMOVE_PENDING)
        self._drop_claim: AsyncScript = client.register_script(_DROP_CLAIM)
        self._group_ready = False

    @classmethod
    def from_url(cls, url: str, *, consumer: str, timeout: float = 2.0) -> RedisReviewBus:
        client = _async_client(url, timeout)
        return cls(client, consumer=consumer)

    async def close(self) -> None:
        await self._client.aclose()

    def _digest_key(self, kind: str, text: str) -> str:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self._prefix}{kind}:{digest}"

    @staticmethod
    def _checked(record_id: str) -> str:
        if not _REVIEW_ID.fullmatch(record_id):
            raise SharedStateUnavailable(f"not a record or request id: {record_id[:60]!r}")
        return record_id

    # -- requests --

    async def submit(self, payload: bytes) -> str:
        """Add a request to the stream; returns its entry id."""
        if len(payload) > MAX_REVIEW_PAYLOAD_BYTES:
            raise SharedStateUnavailable("review request too large")
        try:
            entry: Any = await self._client.xadd(
                self.requests_key,
                {b"request": payload},
                maxlen=REVIEW_STREAM_MAXLEN,
                approximate=True,
            )
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"review requests unavailable: {exc}") from exc
        return _text(entry)

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._client.xgroup_create(self.requests_key, REVIEW_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def take(self, *, count: int = 20, block: float = 1.0) -> list[SharedReviewRequest]:
        """Requests for this replica: first those another replica left idle, then new ones
        (waiting up to `block` seconds for one)."""
        try:
            return await self._take(count, block)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise SharedStateUnavailable(f"review requests unreadable: {exc}") from exc
            self._group_ready = False  # Redis lost its data (a restart): make the group again
        try:
            return await self._take(count, block)
        except redis.ResponseError as exc:
            raise SharedStateUnavailable(f"review requests unreadable: {exc}") from exc

    async def _take(self, count: int, block: float) -> list[SharedReviewRequest]:
        try:
            await self._ensure_group()
            claimed: Any = await self._client.xautoclaim(
                self.requests_key,
                REVIEW_GROUP,
                self.consumer,
                min_idle_time=self._claim_idle_ms,
                start_id="0-0",
                count=count,
            )
            entries = list(claimed[1]) if claimed else []
            if not entries:
                answer: Any = await self._client.xreadgroup(
                    REVIEW_GROUP,
                    self.consumer,
                    {self.requests_key: ">"},
                    count=count,
                    block=max(1, math.ceil(block * 1000)),
                )
                entries = [item for _, items in answer or [] for item in items]
        except redis.ResponseError:
            raise
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"review requests unavailable: {exc}") from exc
        out: list[SharedReviewRequest] = []
        for entry_id, fields in entries:
            payload = (fields or {}).get(b"request", b"")
            out.append(
                SharedReviewRequest(_text(entry_id), payload if isinstance(payload, bytes) else b"")
            )
        return out

    async def finish(self, entry_id: str, request_id: str | None, outcome: bytes) -> None:
        """Store the request's outcome (when it has an id) and remove it from the stream."""
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                if request_id is not None and _REVIEW_ID.fullmatch(request_id):
                    pipe.set(self._prefix + "done:" + request_id, outcome, px=self._retention_ms)
                pipe.xack(self.requests_key, REVIEW_GROUP, entry_id)
                pipe.xdel(self.requests_key, entry_id)
                await pipe.execute()
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"review requests unavailable: {exc}") from exc

    async def outcome(self, request_id: str) -> bytes | None:
        try:
            found: Any = await self._client.get(self._prefix + "done:" + self._checked(request_id))
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"review outcomes unavailable: {exc}") from exc
        return found if isinstance(found, bytes) else None

    # -- status claims --

    async def claim_status(self, record_id: str, status: str) -> str | None:
        """Claim `status` for the record; None when claimed, else the status claimed before."""
        key = self._prefix + "status:" + self._checked(record_id)
        try:
            if await self._client.set(key, status, nx=True, px=self._retention_ms):
                return None
            before: Any = await self._client.get(key)
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"review statuses unavailable: {exc}") from exc
        return _text(before) if before is not None else None

    async def drop_claim(self, record_id: str, status: str) -> None:
        """Undo this replica's claim (its spool refused the status entry)."""
        key = self._prefix + "status:" + self._checked(record_id)
        try:
            await self._drop_claim(keys=[key], args=[status])
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"review statuses unavailable: {exc}") from exc

    # -- deliveries --

    async def add_pending(self, delivery: SharedDelivery) -> None:
        """Record a released message as pending for its target and tell every replica."""
        self._checked(delivery.record_id)
        try:
            await self._add_pending(
                keys=[self._digest_key("pending", delivery.target), self._targets_key],
                args=[
                    delivery.record_id,
                    delivery.direction,
                    _jid_bytes(delivery.target),
                    self._retention_ms,
                ],
            )
            await self._client.publish(self.channel, delivery.to_json())
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"pending deliveries unavailable: {exc}") from exc

    async def pending_for(self, target: str) -> list[SharedDelivery]:
        try:
            found: Any = await self._client.hgetall(self._digest_key("pending", target))
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"pending deliveries unavailable: {exc}") from exc
        out = [
            SharedDelivery(_text(record_id), target, _text(direction))
            for record_id, direction in (found or {}).items()
        ]
        return sorted((d for d in out if _REVIEW_ID.fullmatch(d.record_id)), key=str)

    async def pending_targets(self) -> set[str]:
        try:
            found: Any = await self._client.smembers(self._targets_key)
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"pending deliveries unavailable: {exc}") from exc
        return {_jid_text(member) for member in found or ()}

    async def remove_pending(self, delivery: SharedDelivery) -> None:
        try:
            await self._remove_pending(
                keys=[self._digest_key("pending", delivery.target), self._targets_key],
                args=[self._checked(delivery.record_id), _jid_bytes(delivery.target)],
            )
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"pending deliveries unavailable: {exc}") from exc

    async def claim_delivery(self, record_id: str, destination: str) -> bool:
        """True for the first replica to deliver the record to `destination` (a full JID, or
        the server for a message a local user sent)."""
        key = self._prefix + "delivered:" + self._checked(record_id)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.sadd(key, _jid_bytes(destination))
                pipe.pexpire(key, self._retention_ms)
                added, _ = await pipe.execute()
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"delivery marks unavailable: {exc}") from exc
        return bool(added)

    async def drop_delivery_claims(self, record_id: str, destinations: Sequence[str]) -> None:
        """Undo `claim_delivery` for destinations this replica could not deliver to after all."""
        if not destinations:
            return
        key = self._prefix + "delivered:" + self._checked(record_id)
        try:
            await self._client.srem(key, *(_jid_bytes(d) for d in destinations))
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"delivery marks unavailable: {exc}") from exc

    async def delivered_to(self, record_id: str) -> list[str]:
        key = self._prefix + "delivered:" + self._checked(record_id)
        try:
            found: Any = await self._client.smembers(key)
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"delivery marks unavailable: {exc}") from exc
        return sorted(_jid_text(member) for member in found or ())

    async def announcements(self) -> redis.asyncio.client.PubSub:
        """A subscription to the delivery channel (read it with `next_announcement`)."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
        except redis.RedisError as exc:
            await self.close_announcements(pubsub)
            raise SharedStateUnavailable(f"delivery channel unavailable: {exc}") from exc
        return pubsub

    @staticmethod
    async def close_announcements(pubsub: redis.asyncio.client.PubSub) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    @staticmethod
    async def next_announcement(pubsub: redis.asyncio.client.PubSub, within: float) -> bytes | None:
        """The next raw announcement, or None when none came within `within` seconds."""
        try:
            message: Any = await pubsub.get_message(ignore_subscribe_messages=True, timeout=within)
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"delivery channel unavailable: {exc}") from exc
        if not message or message.get("type") != "message":
            return None
        data = message.get("data")
        return data if isinstance(data, bytes) else None
