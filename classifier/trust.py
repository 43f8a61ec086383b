"""Who knows whom: rosters and correspondents, and the stranger test built on them.

The strongest cheap anti-SPIM signal is whether the recipient knows the sender (rspamd's
"known senders", XEP-0159's correspondents list, Prosody ``mod_anti_spam``'s stranger test).
The proxy learns rosters from the roster results and pushes it sees on the client leg and
records whom each local user writes to; it feeds both into a `TrustStore`. Rules only ask
`TrustStore.knows`, through a `TrustResolver` that also honours what the edge put in the
`DecisionContext` itself.

Everything here is in memory and does no I/O. A store shared by several proxies (Redis) can
implement the same protocol by keeping a local replica that it updates from pub/sub: ``knows``
is called on the hot path for every stanza and must answer synchronously.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from classifier.context import DecisionContext, Direction, StanzaKind
from classifier.errors import RuleError
from classifier.jid import normalise_bare
from classifier.rules import RuleResult
from classifier.verdict import Action


class Subscription(StrEnum):
    """A roster item's ``subscription`` attribute (RFC 6121 section 2.1.2.5)."""

    NONE = "none"
    TO = "to"
    FROM = "from"
    BOTH = "both"
    REMOVE = "remove"  # only in roster pushes: the item is gone


@dataclass(frozen=True, slots=True)
class RosterItem:
    """One roster item as the server reported it.

    Attributes:
        jid: The contact (bare JID, or a bare domain for a gateway).
        subscription: The subscription state.
        ask: The owner asked to subscribe and the contact has not answered (``ask='subscribe'``).
        approved: The owner pre-approved the contact's subscription (RFC 6121 3.4).
    """

    jid: str
    subscription: Subscription = Subscription.NONE
    ask: bool = False
    approved: bool = False

    @property
    def trusted(self) -> bool:
        """Whether this item makes the contact known (the same test as Prosody's).

        A subscription either way, a pending request *by the owner* or a pre-approval all
        show the owner wants to hear from the contact; an item with subscription ``none`` and
        nothing pending does not (it is what a declined request leaves behind).
        """
        if self.subscription is Subscription.REMOVE:
            return False
        return self.subscription is not Subscription.NONE or self.ask or self.approved


def bare_key(jid: str) -> str:
    """The normalised bare JID used as a key everywhere in this module."""
    return str(normalise_bare(jid))


class TrustStore(Protocol):
    """What the proxy has learned about who knows whom.

    ``owner`` is always a local user; every JID may be given in any form (it is normalised).
    The writing methods are called by the edge, ``knows`` by the rules.
    """

    def knows(self, owner: str, contact: str, at: datetime) -> bool | None:
        """Whether ``owner`` knows ``contact`` at time ``at``.

        Returns:
            True if the contact is trusted in the owner's roster (or its domain is, as for a
            gateway) or the owner wrote to the contact recently; False if the owner's whole
            roster is known and says neither; None if the store cannot tell.
        """
        ...

    def set_roster(self, owner: str, items: Iterable[RosterItem]) -> None:
        """Replace the owner's roster with a complete roster result."""
        ...

    def update_roster(self, owner: str, item: RosterItem) -> None:
        """Apply one roster push (subscription ``remove`` deletes the item)."""
        ...

    def note_correspondent(self, owner: str, contact: str, at: datetime) -> None:
        """Record that ``owner`` sent a message to ``contact`` at ``at``."""
        ...

    def forget(self, owner: str) -> None:
        """Drop everything known about ``owner`` (account deleted, roster unknown again)."""
        ...


class _Owner:
    __slots__ = ("complete", "correspondents", "roster")

    def __init__(self) -> None:
        self.roster: dict[str, RosterItem] = {}
        self.complete = False
        # contact -> last time the owner wrote to it, oldest first
        self.correspondents: OrderedDict[str, datetime] = OrderedDict()


DEFAULT_CORRESPONDENT_TTL = timedelta(days=90)


class InMemoryTrustStore:
    """A bounded, thread-safe `TrustStore` in process memory.

    Memory is bounded three ways: at most ``max_owners`` owners (the least recently used is
    forgotten, which makes its answers ``None`` again, never wrong), at most
    ``max_roster_items`` items per roster (a longer roster is kept partially and marked
    incomplete, so unknown contacts give ``None`` rather than a false "stranger"), and at most
    ``max_correspondents`` correspondents per owner (the oldest go first).
    """

    def __init__(
        self,
        *,
        max_owners: int = 100_000,
        max_roster_items: int = 20_000,
        max_correspondents: int = 5_000,
        correspondent_ttl: timedelta = DEFAULT_CORRESPONDENT_TTL,
    ) -> None:
        if min(max_owners, max_roster_items, max_correspondents) < 1:
            raise RuleError("InMemoryTrustStore limits must be at least 1")
        if correspondent_ttl <= timedelta(0):
            raise RuleError("correspondent_ttl must be positive")
        self._max_owners = max_owners
        self._max_items = max_roster_items
        self._max_correspondents = max_correspondents
        self._ttl = correspondent_ttl
        self._lock = threading.Lock()
        self._owners: OrderedDict[str, _Owner] = OrderedDict()

    def __len__(self) -> int:
        """How many owners the store knows something about."""
        return len(self._owners)

    def _owner(self, owner: str, *, create: bool) -> _Owner | None:
        key = bare_key(owner)
        state = self._owners.get(key)
        if state is not None:
            self._owners.move_to_end(key)
            return state
        if not create:
            return None
        state = self._owners[key] = _Owner()
        while len(self._owners) > self._max_owners:
            self._owners.popitem(last=False)
        return state

    def knows(self, owner: str, contact: str, at: datetime) -> bool | None:
        with self._lock:
            state = self._owner(owner, create=False)
            if state is None:
                return None
            contact_key = bare_key(contact)
            item = state.roster.get(contact_key)
            if item is not None and item.trusted:
                return True
            # A domain in the roster vouches for its users: that is how gateways and
            # transports appear, and ejabberd and Prosody make the same exception.
            domain_item = state.roster.get(normalise_bare(contact).domain)
            if domain_item is not None and domain_item.trusted:
                return True
            last = state.correspondents.get(contact_key)
            # A correspondent noted "in the future" (clock stepped back) still counts.
            if last is not None and at - last <= self._ttl:
                return True
            return False if state.complete else None

    def set_roster(self, owner: str, items: Iterable[RosterItem]) -> None:
        roster: dict[str, RosterItem] = {}
        complete = True
        for item in items:
            if item.subscription is Subscription.REMOVE:
                continue
            if len(roster) >= self._max_items:
                complete = False
                break
            roster[bare_key(item.jid)] = item
        with self._lock:
            state = self._owner(owner, create=True)
            assert state is not None
            state.roster = roster
            state.complete = complete

    def update_roster(self, owner: str, item: RosterItem) -> None:
        key = bare_key(item.jid)
        with self._lock:
            state = self._owner(owner, create=True)
            assert state is not None
            if item.subscription is Subscription.REMOVE:
                state.roster.pop(key, None)
            elif key in state.roster or len(state.roster) < self._max_items:
                state.roster[key] = item
            else:
                state.complete = False

    def note_correspondent(self, owner: str, contact: str, at: datetime) -> None:
        key = bare_key(contact)
        with self._lock:
            state = self._owner(owner, create=True)
            assert state is not None
            state.correspondents[key] = at
            state.correspondents.move_to_end(key)
            while len(state.correspondents) > self._max_correspondents:
                state.correspondents.popitem(last=False)

    def forget(self, owner: str) -> None:
        with self._lock:
            self._owners.pop(bare_key(owner), None)


# --- relationship of the parties of one stanza ----------------------------------------------


def is_groupchat(ctx: DecisionContext) -> bool:
    """Whether ``ctx`` is a message in a room (its sender is the room, not a person)."""
    return ctx.kind is StanzaKind.MESSAGE and (
        ctx.stanza_type == "groupchat" or (ctx.room is not None and ctx.stanza_type != "chat")
    )


def owner_and_contact(ctx: DecisionContext) -> tuple[str, str]:
    """The local user a stanza is about and the other party, as ``(owner, contact)``.

    INBOUND: the recipient and the sender; OUTBOUND: the sender and the recipient.
    """
    if ctx.direction is Direction.INBOUND:
        return ctx.recipient, ctx.sender
    return ctx.sender, ctx.recipient


class TrustResolver:
    """Answers "do the parties of this stanza know each other?" for rules.

    What the edge put in ``ctx.sender_in_recipient_roster`` wins (it saw this very stanza's
    circumstances); otherwise the store is asked. Never raises for hostile input: a failing
    store is the chain's business (the rule fails, and the chain applies its failure action).

    The answer for the most recent context is remembered (by identity), so the several rules
    judging one stanza ask the store once and all see the same answer, even if a roster
    push lands meanwhile. Contexts are built per stanza, so a new stanza asks again.
    """

    def __init__(self, store: TrustStore | None = None, *, unknown_is_stranger: bool = False):
        """Create a resolver.

        Args:
            store: Learned rosters and correspondents; without one only the context speaks.
            unknown_is_stranger: Treat a sender whose relationship is unknown as a stranger.
                Off by default: when rosters are not visible (component mode), everyone would
                be a stranger and get the strict thresholds.
        """
        self._store = store
        self._unknown_is_stranger = unknown_is_stranger
        # (context, answer); replaced as a whole, so readers on other threads see either the
        # old pair or the new one.
        self._last: tuple[DecisionContext, bool | None] | None = None

    @property
    def store(self) -> TrustStore | None:
        return self._store

    @property
    def unknown_is_stranger(self) -> bool:
        return self._unknown_is_stranger

    def known(self, ctx: DecisionContext) -> bool | None:
        """Whether the local party knows the other party (``None``: cannot tell).

        For INBOUND stanzas: does the recipient know the sender; for OUTBOUND ones: does the
        sending local user know the recipient (the remote side's roster is never visible).
        """
        if ctx.direction is Direction.INBOUND and ctx.sender_in_recipient_roster is not None:
            return ctx.sender_in_recipient_roster
        last = self._last
        if last is not None and last[0] is ctx:
            return last[1]
        answer = self._ask(ctx)
        self._last = (ctx, answer)
        return answer

    def _ask(self, ctx: DecisionContext) -> bool | None:
        owner, contact = owner_and_contact(ctx)
        if bare_key(owner) == bare_key(contact):
            return True  # notes to self, carbons of one's own messages
        if self._store is None or not ctx.is_local(owner):
            return None
        return self._store.knows(owner, contact, ctx.timestamp)

    def is_stranger(self, ctx: DecisionContext) -> bool:
        """Whether ``ctx`` comes from a stranger: an inbound stanza from a remote person whom
        the recipient does not know.

        Local senders are never strangers (our own server authenticated them; rate limits
        still apply to them), and neither are rooms speaking in a groupchat the user joined.
        """
        if ctx.direction is not Direction.INBOUND or ctx.kind is StanzaKind.MUC_JOIN:
            return False
        if is_groupchat(ctx) or ctx.is_local(ctx.sender):
            return False
        known = self.known(ctx)
        if known is None:
            return self._unknown_is_stranger
        return not known


FIRST_CONTACT_KINDS = frozenset(
    {StanzaKind.MESSAGE, StanzaKind.SUBSCRIPTION, StanzaKind.MUC_INVITE, StanzaKind.CALL}
)


class StrangerRule:
    """Holds stanzas from strangers that carry a URL (the commonest SPIM shape).

    "A first contact carrying a URL is quarantined by default": until the recipient adds the
    sender (which is also what releases the quarantined stanza), every stanza from them that
    carries a URL gets ``action``. Subscription requests and invitations count too, their
    status text or reason being their body.
    """

    def __init__(
        self,
        trust: TrustResolver,
        *,
        url_action: Action = Action.QUARANTINE,
        rule_id: str = "stranger",
    ) -> None:
        """Create the rule.

        Args:
            trust: Decides who is a stranger.
            url_action: What a stranger's stanza with a URL gets; ALLOW turns the check off
                (the rule then only exists for its metrics).
            rule_id: Name in reasons and metrics.
        """
        self._trust = trust
        self._action = url_action
        self._rule_id = rule_id

    @property
    def rule_id(self) -> str:
        return self._rule_id

    @property
    def description(self) -> str:
        return "a stanza from a stranger (not in the recipient's roster) carrying a URL"

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        if self._action is Action.ALLOW or ctx.kind not in FIRST_CONTACT_KINDS:
            return None
        if not ctx.has_url or not self._trust.is_stranger(ctx):
            return None
        return RuleResult(
            self._action,
            0.0,
            "first contact carrying a URL (held until the recipient adds the sender)",
        )
