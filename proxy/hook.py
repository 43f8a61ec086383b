"""The seam between the proxy's transport and whatever decides about stanzas.

The transport calls a `StanzaHook` with every stanza (message, presence, iq) of an
authenticated session, in order, in batches of whatever arrived together; the hook answers
one `Decision` per stanza. Batching lets a hook that writes to disk share one fsync among
the stanzas of a burst without reordering anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from archive_api.store.records import Direction
from proxy.stream import Element


class DecisionKind(StrEnum):
    PASS = "pass"  # noqa: S105 - a decision, not a password
    DROP = "drop"
    REPLACE = "replace"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one stanza, plus anything to inject into either leg."""

    kind: DecisionKind = DecisionKind.PASS
    replacement: bytes | None = None
    inject_to_client: tuple[bytes, ...] = ()
    inject_to_server: tuple[bytes, ...] = ()

    @classmethod
    def drop(cls, *, inject_to_client: tuple[bytes, ...] = ()) -> Decision:
        return cls(DecisionKind.DROP, inject_to_client=inject_to_client)

    @classmethod
    def replace_with(cls, data: bytes) -> Decision:
        return cls(DecisionKind.REPLACE, replacement=data)


PASS = Decision()


@dataclass(slots=True)
class SessionInfo:
    """What the proxy knows about one client session; the hook reads it, never writes it."""

    session_id: str
    client_address: str
    domain: str = ""
    bound_jid: str | None = None
    sm_id: str | None = None
    authenticated: bool = False
    tls: bool = False
    extras: dict[str, str] = field(default_factory=dict)

    @property
    def bare_jid(self) -> str | None:
        return self.bound_jid.split("/", 1)[0] if self.bound_jid else None


class StanzaHook(Protocol):
    async def process(
        self, session: SessionInfo, direction: Direction, stanzas: Sequence[Element]
    ) -> Sequence[Decision]:
        """Decide about each stanza, in order; return exactly one decision per stanza."""
        ...

    async def session_bound(self, session: SessionInfo) -> None:
        """The session's full JID is known (bind or SASL2 result seen)."""
        ...

    async def session_ended(self, session: SessionInfo) -> None:
        """The client's connection is gone (the SM session may still be resumed)."""
        ...


class PassThroughHook:
    """Lets everything through untouched: the transport alone, for tests and benchmarks."""

    async def process(
        self, session: SessionInfo, direction: Direction, stanzas: Sequence[Element]
    ) -> Sequence[Decision]:
        return [PASS] * len(stanzas)

    async def session_bound(self, session: SessionInfo) -> None:
        return None

    async def session_ended(self, session: SessionInfo) -> None:
        return None
