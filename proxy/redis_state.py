"""State several proxies share through Redis: the rate, fan-out and duplicate counters.

`RedisCounterStore` implements `classifier.limits.CounterStore` with one sorted set per key
(score: the event's time from the injected clock), updated by a Lua script so that trimming,
adding and counting are one atomic step even with many proxies hitting the same key. A
spammer who spreads a burst over several proxy replicas meets one count.

Calls are synchronous (the rules are), one loopback round trip each, with a short socket
timeout: a Redis that does not answer raises `SharedStateUnavailable`, and the rule chain
treats that like any failing rule (its configured failure action), never as ALLOW by silence.

Keys are namespaced (``sg:cnt:``) and hashed when long, since they carry user-chosen text
(JIDs, domains); each key expires one window after its last event.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, cast

import redis
from redis.commands.core import Script

from proxy.errors import ProxyError

KEY_PREFIX = "sg:cnt:"
#: Longer keys and members are stored as their SHA-256 (they are user-chosen text).
MAX_PLAIN_BYTES = 200

# KEYS[1] the sorted set; ARGV: now, window, cap, member.
# Keeps the events in (now - window, now], at most `cap` of them (the newest), and returns how
# many there are. The TTL only collects idle keys; the window itself is computed from `now`.
_SLIDE = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
redis.call('ZADD', key, ARGV[1], ARGV[4])
local n = redis.call('ZCARD', key)
if n > cap then
  redis.call('ZREMRANGEBYRANK', key, 0, n - cap - 1)
  n = cap
end
redis.call('PEXPIRE', key, math.ceil(window * 1000) + 1000)
return n
"""


class SharedStateUnavailable(ProxyError):
    """Redis, which holds the shared counters, could not be reached or refused the call."""


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
        try:
            client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        except (ValueError, redis.RedisError) as exc:
            raise SharedStateUnavailable(f"bad redis_url: {exc}") from None
        return cls(client)

    def close(self) -> None:
        self._client.close()

    def hit(self, key: str, now: float, window: float, cap: int) -> int:
        # Every event is its own member: a random id, so two proxies' hits never merge.
        return self._run(key, now, window, cap, b"e:" + os.urandom(9).hex().encode())

    def add_distinct(self, key: str, member: str, now: float, window: float, cap: int) -> int:
        return self._run(key, now, window, cap, b"m:" + _bounded(member))

    def _run(self, key: str, now: float, window: float, cap: int, member: bytes) -> int:
        if not (math.isfinite(now) and math.isfinite(window) and window > 0):
            raise ValueError("now and window must be finite, and window positive")
        try:
            count: Any = self._slide(
                keys=[self._prefix + _bounded(key)],
                args=[repr(float(now)), repr(float(window)), max(1, cap), member],
            )
        except redis.RedisError as exc:
            raise SharedStateUnavailable(f"shared counters unavailable: {exc}") from exc
        return int(cast(int, count))
