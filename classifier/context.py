"""What the rules see about one stanza.

The proxy builds a `DecisionContext` from the normalised stanza and its own records (roster
results seen on the client leg, the session's bound JID, the injected clock). Rules read it and
nothing else, so they stay pure and testable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from classifier.jid import domain_of, normalise_bare, normalise_domain


class StanzaKind(StrEnum):
    """What a stanza asks for, as far as policy is concerned."""

    MESSAGE = "message"
    SUBSCRIPTION = "subscription"  # presence type=subscribe (and its answers)
    MUC_JOIN = "muc-join"
    MUC_INVITE = "muc-invite"  # mediated (XEP-0045) or direct (XEP-0249)
    CALL = "call"  # Jingle session initiation; not produced by the proxy yet


class Direction(StrEnum):
    """Which way a stanza travels relative to the local user."""

    OUTBOUND = "outbound"  # sent by a local user
    INBOUND = "inbound"  # arriving for a local user


# Every decided stanza carries the same few local domains; normalising them once per distinct
# set (a frozenset caches its hash) instead of once per stanza. Bounded: policies change rarely.
_NORMALISED_DOMAINS: dict[frozenset[str], frozenset[str]] = {}
_NORMALISED_DOMAINS_MAX = 64


def _normalised_domains(domains: frozenset[str]) -> frozenset[str]:
    if not isinstance(domains, frozenset):
        domains = frozenset(domains)
    found = _NORMALISED_DOMAINS.get(domains)
    if found is None:
        found = frozenset(normalise_domain(d) for d in domains)
        if len(_NORMALISED_DOMAINS) >= _NORMALISED_DOMAINS_MAX:
            _NORMALISED_DOMAINS.clear()
        _NORMALISED_DOMAINS[domains] = found
    return found


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """Everything a rule may look at for one stanza.

    Attributes:
        kind: What the stanza is.
        direction: OUTBOUND if a local user sent it, INBOUND if it arrives for a local user.
        sender: Bare JID of the sender (for a MUC message, the room's bare JID).
        recipient: Bare JID of the addressee (for a MUC join, the room's bare JID).
        timestamp: When the proxy saw the stanza, from the injected clock; timezone-aware.
        local_domains: The domains served locally (user hosts and their components, such as
            ``conference.corp.example``), in any spelling; stored normalised. A domain is local
            only if it is listed exactly: subdomains of a local domain are not implied.
        sender_full: Full JID of the sender, when known.
        recipient_full: Full JID of the addressee, when known.
        stanza_type: The stanza's ``type`` attribute (``chat``, ``groupchat``, ``subscribe``...).
        body: The message body, if any.
        urls: URLs found in the body or in out-of-band data, in order of appearance.
        encryption: An end-to-end encryption marker (``"omemo"``, ``"openpgp"``...), if any.
        room: Bare JID of the MUC room involved (join, invite, groupchat), if any.
        sender_in_recipient_roster: Whether the recipient has the sender in their roster;
            ``None`` when the proxy does not know (for example, an outbound stanza to a remote
            user whose roster it never sees).
    """

    kind: StanzaKind
    direction: Direction
    sender: str
    recipient: str
    timestamp: datetime
    local_domains: frozenset[str] = field(default_factory=frozenset)
    sender_full: str | None = None
    recipient_full: str | None = None
    stanza_type: str | None = None
    body: str | None = None
    urls: tuple[str, ...] = ()
    encryption: str | None = None
    room: str | None = None
    sender_in_recipient_roster: bool | None = None

    def __init__(
        self,
        kind: StanzaKind,
        direction: Direction,
        sender: str,
        recipient: str,
        timestamp: datetime,
        local_domains: frozenset[str] = frozenset(),
        sender_full: str | None = None,
        recipient_full: str | None = None,
        stanza_type: str | None = None,
        body: str | None = None,
        urls: tuple[str, ...] = (),
        encryption: str | None = None,
        room: str | None = None,
        sender_in_recipient_roster: bool | None = None,
    ) -> None:
        # Spelled out, not generated: compiled, this stores the fields directly (docs/native.md).
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "sender", sender)
        object.__setattr__(self, "recipient", recipient)
        object.__setattr__(self, "timestamp", timestamp)
        object.__setattr__(self, "local_domains", local_domains)
        object.__setattr__(self, "sender_full", sender_full)
        object.__setattr__(self, "recipient_full", recipient_full)
        object.__setattr__(self, "stanza_type", stanza_type)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "urls", urls)
        object.__setattr__(self, "encryption", encryption)
        object.__setattr__(self, "room", room)
        object.__setattr__(self, "sender_in_recipient_roster", sender_in_recipient_roster)
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.timestamp.tzinfo is None or self.timestamp.utcoffset() is None:
            # Naive datetimes silently shift by the host's offset somewhere down the line;
            # the Clock protocol promises aware UTC times, so a naive one is a wiring bug.
            raise ValueError("DecisionContext.timestamp must be timezone-aware")
        object.__setattr__(self, "local_domains", _normalised_domains(self.local_domains))

    @property
    def has_url(self) -> bool:
        """Whether the stanza carries at least one URL."""
        return bool(self.urls)

    @property
    def sender_domain(self) -> str:
        """The sender's normalised domain."""
        return domain_of(self.sender)

    @property
    def recipient_domain(self) -> str:
        """The recipient's normalised domain."""
        return domain_of(self.recipient)

    @property
    def room_domain(self) -> str | None:
        """The room's normalised domain (the MUC service), if a room is involved."""
        return None if self.room is None else domain_of(self.room)

    def is_local(self, jid: str) -> bool:
        """Whether ``jid`` (any form, or a bare domain) is served by a local domain."""
        return domain_of(jid) in self.local_domains

    def is_remote(self, jid: str) -> bool:
        """Whether ``jid`` (any form, or a bare domain) belongs to a remote domain."""
        return not self.is_local(jid)

    @property
    def local_party(self) -> str | None:
        """The normalised bare JID of the local user this stanza is about.

        The sender for OUTBOUND, the recipient for INBOUND; if that party is not local (a
        confused caller), the other one if it is local; ``None`` if neither is.
        """
        if self.direction is Direction.OUTBOUND:
            candidates = (self.sender, self.recipient)
        else:
            candidates = (self.recipient, self.sender)
        for jid in candidates:
            if self.is_local(jid):
                return str(normalise_bare(jid))
        return None

    @property
    def remote_domains(self) -> tuple[str, ...]:
        """Every remote domain involved: the room's, the recipient's, the sender's.

        Normalised, without duplicates, in that order (the room first, because for MUC traffic
        the room's service is the federation partner that matters most).
        """
        seen: list[str] = []
        for jid in (self.room, self.recipient, self.sender):
            if jid is None:
                continue
            domain = domain_of(jid)
            if domain not in self.local_domains and domain not in seen:
                seen.append(domain)
        return tuple(seen)

    @property
    def remote_domain(self) -> str | None:
        """The main remote party's domain, or ``None`` for purely local traffic.

        For MUC traffic the room's domain; otherwise the sender's for INBOUND and the
        recipient's for OUTBOUND; failing that, any remote domain involved.
        """
        room_domain = self.room_domain
        if room_domain is not None and room_domain not in self.local_domains:
            return room_domain
        counterparty = self.sender if self.direction is Direction.INBOUND else self.recipient
        domain = domain_of(counterparty)
        if domain not in self.local_domains:
            return domain
        remote = self.remote_domains
        return remote[0] if remote else None
