"""XEP-0198 stream-management counter arithmetic for a proxy that drops and injects, sans I/O.

Each direction of a stream has a *source* that numbers the stanzas it sent and a *sink* that
numbers the stanzas it received. When the proxy forwards a stanza both counts move; when it
drops one only the source's moves; when it injects one only the sink's moves. An ack `h` from
the sink is in the sink's numbering and must reach the source in the source's numbering, or
the source sees acks for stanzas it never sent (Prosody closes the stream for that) or never
sees the dropped ones acked.

A dropped stanza is treated as acknowledged together with the last stanza the sink got
before it: it will never be delivered, so there is nothing to wait for.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

MODULUS = 2**32


@dataclass
class DirectionLedger:
    """The counts of one direction and the mapping from sink positions to source positions."""

    source_count: int = 0
    sink_count: int = 0
    # (first sink position, offset) pairs: source position = sink position + offset.
    _marks: deque[tuple[int, int]] = field(default_factory=lambda: deque([(0, 0)]))
    # Injected stanzas not yet acknowledged by the sink, by sink position.
    unacked_injections: deque[tuple[int, bytes]] = field(default_factory=deque)

    def forwarded(self) -> None:
        self.source_count += 1
        self.sink_count += 1

    def dropped(self) -> None:
        self.source_count += 1
        self._marks.append((self.sink_count, self.source_count - self.sink_count))

    def injected(self, data: bytes) -> None:
        self.sink_count += 1
        self._marks.append((self.sink_count, self.source_count - self.sink_count))
        self.unacked_injections.append((self.sink_count, data))

    def _unwrap(self, h: int) -> int:
        """Turn a 32-bit `h` into an absolute count near the sink's own count."""
        return self.sink_count - ((self.sink_count - h) % MODULUS)

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
        position = self._unwrap(sink_h)
        offset = self._offset_at(position)
        pending = [data for pos, data in self.unacked_injections if pos > position]
        self.unacked_injections.clear()
        self.sink_count = position
        self.source_count = position + offset
        self._marks = deque([(position, offset)])
        return self.source_count % MODULUS, pending


@dataclass
class SmState:
    """Both directions of one stream-management session, keyed by the server's SM id."""

    sm_id: str
    to_client: DirectionLedger = field(default_factory=DirectionLedger)
    to_server: DirectionLedger = field(default_factory=DirectionLedger)
    last_seen: float = field(default_factory=time.monotonic)
    # The full JID bound on the stream that enabled SM: a resumed stream has no bind of its own.
    bound_jid: str | None = None


class SmRegistry:
    """Stream-management states that outlive a TCP connection, so a client can resume.

    In memory for one proxy; a shared (Redis) registry fills the same interface when several
    proxies serve one domain.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._states: dict[str, SmState] = {}
        self._max_entries = max_entries

    def create(self, sm_id: str) -> SmState:
        if len(self._states) >= self._max_entries:
            oldest = min(self._states.values(), key=lambda s: s.last_seen)
            del self._states[oldest.sm_id]
        state = SmState(sm_id)
        self._states[sm_id] = state
        return state

    def get(self, sm_id: str) -> SmState | None:
        state = self._states.get(sm_id)
        if state is not None:
            state.last_seen = time.monotonic()
        return state

    def forget(self, sm_id: str) -> None:
        self._states.pop(sm_id, None)

    def __len__(self) -> int:
        return len(self._states)
