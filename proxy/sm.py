"""XEP-0198 stream-management counter arithmetic for a proxy that drops and injects, sans I/O.

Each direction of a stream has a *source* that numbers the stanzas it sent and a *sink* that
numbers the stanzas it received. When the proxy forwards a stanza both counts move; when it
drops one only the source's moves; when it injects one only the sink's moves. An ack `h` from
the sink is in the sink's numbering and must reach the source in the source's numbering, or
the source sees acks for stanzas it never sent (Prosody closes the stream for that) or never
sees the dropped ones acked.

A dropped stanza is treated as acknowledged together with the last stanza the sink got
before it: it will never be delivered, so there is nothing to wait for.

The ledgers of one SM id must outlive the TCP connection (the client resumes on a new one),
and with several proxy replicas they must reach whichever replica the client resumes through:
`SmStore` is that seam. `SmRegistry` keeps them in this process; `proxy.redis_state` has the
shared one. A state is written to a shared store when it is created, whenever its mapping
changes (a drop or an injection: plain forwarding keeps the mapping, so it needs no write),
and when its connection ends; what a replica reads back is therefore never missing a drop it
must translate, though its plain counts may lag (resumption then unwraps `h` near them).
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.errors import ProxyError

MODULUS = 2**32
_HALF = MODULUS // 2

#: Bounds on a state read back from a shared store (its bytes are not ours to trust).
MAX_MARKS = 100_000
MAX_PENDING_INJECTIONS = 10_000
MAX_INJECTION_BYTES = 1024 * 1024
MAX_COUNT = 2**62
MAX_JID_CHARS = 3071 * 3 + 2
RECORD_VERSION = 1


class SmStoreUnavailable(ProxyError):
    """The store that holds stream-management states could not be reached or refused the call."""


class SmStateCorrupt(ProxyError):
    """A stored stream-management state is not one this proxy wrote (garbage, wrong shape)."""


@dataclass
class DirectionLedger:
    """The counts of one direction and the mapping from sink positions to source positions."""

    source_count: int = 0
    sink_count: int = 0
    # (first sink position, offset) pairs: source position = sink position + offset.
    _marks: deque[tuple[int, int]] = field(default_factory=lambda: deque([(0, 0)]))
    # Injected stanzas not yet acknowledged by the sink, by sink position.
    unacked_injections: deque[tuple[int, bytes]] = field(default_factory=deque)
    # The mapping changed since the state was last written to its store.
    changed: bool = False

    def forwarded(self) -> None:
        self.source_count += 1
        self.sink_count += 1

    def dropped(self) -> None:
        self.source_count += 1
        self._marks.append((self.sink_count, self.source_count - self.sink_count))
        self.changed = True

    def injected(self, data: bytes) -> None:
        self.sink_count += 1
        self._marks.append((self.sink_count, self.source_count - self.sink_count))
        self.unacked_injections.append((self.sink_count, data))
        self.changed = True

    def _unwrap(self, h: int) -> int:
        """Turn a 32-bit `h` into an absolute count near the sink's own count."""
        return self.sink_count - ((self.sink_count - h) % MODULUS)

    def unwrap_near(self, h: int) -> int:
        """`h` as the absolute count nearest the sink's count, ahead of it or behind.

        For a state read back from a shared store, whose counts may lag the live ones.
        """
        ahead = (h - self.sink_count) % MODULUS
        return self.sink_count + (ahead - MODULUS if ahead > _HALF else ahead)

    def _offset_at(self, position: int) -> int:
        offset = 0
        for start, mark_offset in self._marks:
            if start > position:
                break
            offset = mark_offset
        return offset

    def translate(self, h: int) -> int:
        """An ack in the sink's numbering, in the source's numbering (mod 2^32)."""
        position = self._unwrap(h)
        return (position + self._offset_at(position)) % MODULUS

    def translate_near(self, h: int) -> int:
        """Like `translate`, for an `h` that may be ahead of a lagging count."""
        position = self.unwrap_near(h)
        return (position + self._offset_at(position)) % MODULUS

    def acknowledge(self, h: int) -> int:
        """Record the sink's ack; forget what it covers; return it in source numbering."""
        position = self._unwrap(h)
        translated = self.translate(h)
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= position:
            marks.popleft()
        while self.unacked_injections and self.unacked_injections[0][0] <= position:
            self.unacked_injections.popleft()
        return translated

    def restart_at(self, sink_h: int) -> tuple[int, list[bytes]]:
        """After a resumption at the sink's `h`: continue numbering from there.

        Returns the source position the source will resume from, and the proxy's own
        injections the sink never acknowledged, which the proxy must send again.
        """
        position = self.unwrap_near(sink_h)
        offset = self._offset_at(position)
        pending = [data for pos, data in self.unacked_injections if pos > position]
        self.unacked_injections.clear()
        self.sink_count = position
        self.source_count = position + offset
        self._marks = deque([(position, offset)])
        self.changed = True
        return self.source_count % MODULUS, pending

    # -- the stored form ------------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        return {
            "source": self.source_count,
            "sink": self.sink_count,
            "marks": [[start, offset] for start, offset in self._marks],
            "injections": [
                [pos, base64.b64encode(data).decode("ascii")]
                for pos, data in self.unacked_injections
            ],
        }

    @classmethod
    def from_record(cls, record: object) -> DirectionLedger:
        """A ledger from `to_record`'s form; `SmStateCorrupt` for anything else."""
        if not isinstance(record, dict) or set(record) != {
            "source",
            "sink",
            "marks",
            "injections",
        }:
            raise SmStateCorrupt("ledger: wrong keys")
        source, sink = _count(record["source"]), _count(record["sink"])
        marks = _pairs(record["marks"], MAX_MARKS, "marks")
        if not marks:
            raise SmStateCorrupt("ledger: no marks")
        parsed_marks = [(_count(start), _offset(offset)) for start, offset in marks]
        starts = [start for start, _ in parsed_marks]
        if starts != sorted(starts) or starts[-1] > sink:
            raise SmStateCorrupt("ledger: marks out of order")
        injections: deque[tuple[int, bytes]] = deque()
        for pos, encoded in _pairs(record["injections"], MAX_PENDING_INJECTIONS, "injections"):
            if not isinstance(encoded, str) or len(encoded) > MAX_INJECTION_BYTES * 4 // 3 + 4:
                raise SmStateCorrupt("ledger: bad injection")
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise SmStateCorrupt("ledger: injection is not base64") from None
            injections.append((_count(pos), data))
        return cls(source, sink, deque(parsed_marks), injections)


def _count(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise SmStateCorrupt("ledger: a count is not a non-negative integer")
    return value


def _offset(value: object) -> int:
    if type(value) is not int or not -MAX_COUNT <= value <= MAX_COUNT:
        raise SmStateCorrupt("ledger: an offset is not an integer")
    return value


def _pairs(value: object, limit: int, what: str) -> list[list[object]]:
    if not isinstance(value, list) or len(value) > limit:
        raise SmStateCorrupt(f"ledger: {what} is not a list of at most {limit}")
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise SmStateCorrupt(f"ledger: {what} holds something other than pairs")
    return value


@dataclass
class SmState:
    """Both directions of one stream-management session, keyed by the server's SM id."""

    sm_id: str
    to_client: DirectionLedger = field(default_factory=DirectionLedger)
    to_server: DirectionLedger = field(default_factory=DirectionLedger)
    last_seen: float = field(default_factory=time.monotonic)
    # The full JID bound on the stream that enabled SM: a resumed stream has no bind of its own.
    bound_jid: str | None = None
    # One more per resumption: a write from a connection the session has left must not
    # overwrite the state of the connection that resumed it (shared stores compare this).
    epoch: int = 0
    # The counts are the live ones (this process's own state, or written when the connection
    # ended); False for a state read back while its connection may still be carrying stanzas.
    exact: bool = True
    # The proxy session carrying the SM session now (not stored): a connection it has left
    # must not write its end into the state.
    owner: str | None = None

    @property
    def changed(self) -> bool:
        return self.to_client.changed or self.to_server.changed

    def mark_written(self) -> None:
        self.to_client.changed = self.to_server.changed = False

    def to_record(self, *, detached: bool) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            "id": self.sm_id,
            "epoch": self.epoch,
            "detached": detached,
            "jid": self.bound_jid,
            "to_client": self.to_client.to_record(),
            "to_server": self.to_server.to_record(),
        }

    @classmethod
    def from_record(cls, record: object, sm_id: str) -> SmState:
        """The state `to_record` wrote for `sm_id`; `SmStateCorrupt` for anything else."""
        if not isinstance(record, dict) or record.get("v") != RECORD_VERSION:
            raise SmStateCorrupt("state: not a record of this version")
        if set(record) != {"v", "id", "epoch", "detached", "jid", "to_client", "to_server"}:
            raise SmStateCorrupt("state: wrong keys")
        if record["id"] != sm_id:
            raise SmStateCorrupt("state: stored under another SM id")
        jid, detached = record["jid"], record["detached"]
        if jid is not None and (not isinstance(jid, str) or not 0 < len(jid) <= MAX_JID_CHARS):
            raise SmStateCorrupt("state: bad JID")
        if not isinstance(detached, bool):
            raise SmStateCorrupt("state: bad detached flag")
        return cls(
            sm_id,
            to_client=DirectionLedger.from_record(record["to_client"]),
            to_server=DirectionLedger.from_record(record["to_server"]),
            bound_jid=jid,
            epoch=_count(record["epoch"]),
            exact=detached,
        )


class SmStore(Protocol):
    """Where stream-management states live between a connection and its resumption.

    `fetch` and `save` raise `SmStoreUnavailable` (and `fetch` also `SmStateCorrupt`); the
    transport then refuses the resumption (`<failed/>`): a guessed mapping would hand the
    server or the client a wrong `h`.
    """

    def create(self, sm_id: str) -> SmState:
        """A new, empty state for an SM id the server just handed out (not yet saved)."""
        ...

    async def fetch(self, sm_id: str) -> SmState | None:
        """The state to resume `sm_id` from, or None when there is none (unknown, expired)."""
        ...

    async def save(self, state: SmState, *, detached: bool = False) -> None:
        """Write `state` (`detached`: its connection has ended, so its counts are final)."""
        ...

    async def discard(self, sm_id: str) -> None:
        """Forget `sm_id` (the stream ended for good)."""
        ...

    async def close(self) -> None:
        """Release connections (the states stay wherever they are kept)."""
        ...


class SmRegistry:
    """Stream-management states that outlive a TCP connection, in this process.

    The live objects themselves are kept, so a resumption through this proxy continues the
    very ledgers the old connection counted in; writes are therefore free. Several proxies
    share states through `proxy.redis_state.RedisSmStore` instead.

    A state whose connection ended (saved ``detached``) is forgotten `ttl` seconds later
    (the server's resumption timeout: it cannot resume after that either), and past
    `max_entries` the least recently used state goes first. States of live connections
    never expire.
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        *,
        ttl: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._states: dict[str, SmState] = {}
        self._max_entries = max_entries
        self._ttl = ttl
        self._monotonic = monotonic
        self._expires: dict[str, float] = {}  # detached states: when they are forgotten
        self._next_sweep = -math.inf

    def _make_room(self) -> None:
        self._sweep()
        if len(self._states) >= self._max_entries:
            oldest = min(self._states.values(), key=lambda s: s.last_seen)
            self.forget(oldest.sm_id)

    def _sweep(self) -> None:
        now = self._monotonic()
        if now < self._next_sweep or not self._expires:
            return
        self._next_sweep = now + 1.0  # at most one scan a second, however many sessions
        for sm_id in [i for i, deadline in self._expires.items() if deadline <= now]:
            self.forget(sm_id)

    def create(self, sm_id: str) -> SmState:
        self._make_room()
        state = SmState(sm_id)
        state.last_seen = self._monotonic()
        self._states[sm_id] = state
        self._expires.pop(sm_id, None)
        return state

    def get(self, sm_id: str) -> SmState | None:
        deadline = self._expires.get(sm_id)
        if deadline is not None and deadline <= self._monotonic():
            self.forget(sm_id)
            return None
        state = self._states.get(sm_id)
        if state is not None:
            state.last_seen = self._monotonic()
            self._expires.pop(sm_id, None)  # being resumed: live again until it ends
        return state

    def forget(self, sm_id: str) -> None:
        self._states.pop(sm_id, None)
        self._expires.pop(sm_id, None)

    def adopt(self, state: SmState) -> None:
        """Keep a state read from elsewhere (a shared store) among this process's own."""
        self.forget(state.sm_id)
        self._make_room()
        state.last_seen = self._monotonic()
        self._states[state.sm_id] = state

    def __len__(self) -> int:
        return len(self._states)

    async def fetch(self, sm_id: str) -> SmState | None:
        return self.get(sm_id)

    async def save(self, state: SmState, *, detached: bool = False) -> None:
        now = self._monotonic()
        state.last_seen = now
        state.mark_written()
        if detached and self._ttl is not None and state.sm_id in self._states:
            self._expires[state.sm_id] = now + self._ttl
        else:
            self._expires.pop(state.sm_id, None)

    async def discard(self, sm_id: str) -> None:
        self.forget(sm_id)

    async def close(self) -> None:
        return None
