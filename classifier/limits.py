"""Rate limits, fan-out limits and duplicate-body bursts, over sliding windows.

SPIM comes in bursts: one account writing to hundreds of users, one server sending
thousands of messages, the same text sprayed at many recipients. These rules count events
in a `CounterStore` keyed by sender, domain and normalised body, on windows that slide with
``ctx.timestamp`` (the injected clock), so tests move time by hand.

The store is the only state. `InMemoryCounterStore` serves one proxy and bounds its memory
(idle keys are evicted, every key holds at most what its limit needs); several proxies share
counts through a store with the same protocol on Redis (sorted sets for both operations), so
a spammer cannot spread a burst across replicas.

What is counted, and what every rule here skips:

- message, subscription, invitation and call stanzas, not room messages (a room's sender is
  the room: a busy room is not a flood) and not room joins;
- by default INBOUND stanzas only, so a message between two local users is counted once;
- with ``exempt_contacts`` (the default), stanzas between people who know each other
  (roster, recent correspondents) are neither counted nor limited.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Iterable
from enum import StrEnum
from typing import Protocol

from classifier.context import DecisionContext, Direction, StanzaKind
from classifier.errors import RuleError
from classifier.jid import normalise_bare
from classifier.rules import RuleResult
from classifier.trust import TrustResolver, is_groupchat
from classifier.verdict import Action

COUNTED_KINDS = frozenset(
    {StanzaKind.MESSAGE, StanzaKind.SUBSCRIPTION, StanzaKind.MUC_INVITE, StanzaKind.CALL}
)
MINUTE = 60.0


class CounterStore(Protocol):
    """Sliding-window counters shared by the limit rules.

    ``now`` and ``window`` are seconds (``now`` from ``ctx.timestamp``). ``cap`` bounds what
    the store must remember for a key: the rules only need to know whether a count exceeds
    their limit, so a store may stop counting at ``cap`` (and must count at least that far).
    """

    def hit(self, key: str, now: float, window: float, cap: int) -> int:
        """Record one event under ``key`` at ``now``.

        Returns:
            Events under ``key`` in the window ``(now - window, now]``, this one included,
            counted up to ``cap``.
        """
        ...

    def add_distinct(self, key: str, member: str, now: float, window: float, cap: int) -> int:
        """Record ``member`` under ``key`` at ``now`` (again, if already there).

        Returns:
            Distinct members under ``key`` seen in ``(now - window, now]``, this one
            included, counted up to ``cap``.
        """
        ...


class _Events:
    __slots__ = ("expires", "times")

    def __init__(self, cap: int) -> None:
        self.times: deque[float] = deque(maxlen=cap)
        self.expires = -math.inf


class _Members:
    __slots__ = ("expires", "seen")

    def __init__(self) -> None:
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.expires = -math.inf


class InMemoryCounterStore:
    """A thread-safe `CounterStore` in process memory, with bounded memory.

    Keys are kept in least-recently-used order; a key whose window has passed without an
    event is dropped as soon as it reaches the front, and beyond ``max_keys`` the least
    recently used key is dropped even if live (its count restarts, which errs towards
    letting traffic through, never towards blocking it). A key holds at most ``cap``
    timestamps or members.

    Timestamps are expected to grow; if the clock steps back, counts are approximate until
    it catches up, and nothing fails.
    """

    def __init__(self, *, max_keys: int = 200_000) -> None:
        if max_keys < 1:
            raise RuleError("max_keys must be at least 1")
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, _Events | _Members] = OrderedDict()

    def __len__(self) -> int:
        """Live keys (including idle ones not yet evicted)."""
        return len(self._keys)

    def _evict(self, now: float) -> None:
        keys = self._keys
        while keys:
            first = next(iter(keys.values()))
            if first.expires > now and len(keys) <= self._max_keys:
                break
            keys.popitem(last=False)

    def hit(self, key: str, now: float, window: float, cap: int) -> int:
        cap = max(1, cap)
        with self._lock:
            entry = self._keys.get(key)
            if not isinstance(entry, _Events):
                entry = self._keys[key] = _Events(cap)
            elif entry.times.maxlen != cap:  # the limit changed with a policy reload
                entry.times = deque(entry.times, maxlen=cap)
            self._keys.move_to_end(key)
            times = entry.times
            times.append(now)
            horizon = now - window
            while times and times[0] <= horizon:
                times.popleft()
            entry.expires = now + window
            self._evict(now)
            return len(times)

    def add_distinct(self, key: str, member: str, now: float, window: float, cap: int) -> int:
        cap = max(1, cap)
        with self._lock:
            entry = self._keys.get(key)
            if not isinstance(entry, _Members):
                entry = self._keys[key] = _Members()
            self._keys.move_to_end(key)
            seen = entry.seen
            seen[member] = now
            seen.move_to_end(member)
            horizon = now - window
            while seen and next(iter(seen.values())) <= horizon:
                seen.popitem(last=False)
            while len(seen) > cap:
                seen.popitem(last=False)
            entry.expires = now + window
            self._evict(now)
            return len(seen)


# --- shared scope -----------------------------------------------------------------------------


class _Scope:
    """Which stanzas a counting rule looks at (see the module docstring)."""

    def __init__(
        self,
        directions: Iterable[Direction],
        trust: TrustResolver | None,
        exempt_contacts: bool,
    ) -> None:
        self.directions = frozenset(directions)
        self.trust = trust or TrustResolver()
        self.exempt_contacts = exempt_contacts

    def counts(self, ctx: DecisionContext) -> bool:
        if ctx.direction not in self.directions or ctx.kind not in COUNTED_KINDS:
            return False
        if is_groupchat(ctx):
            return False
        return not (self.exempt_contacts and self.trust.known(ctx) is True)


def _remote_domain(ctx: DecisionContext) -> str | None:
    """The counterparty's domain if it is remote: the sender's for INBOUND stanzas, the
    recipient's for OUTBOUND ones."""
    party = ctx.sender if ctx.direction is Direction.INBOUND else ctx.recipient
    return None if ctx.is_local(party) else normalise_bare(party).domain


def _seconds(ctx: DecisionContext) -> float:
    return ctx.timestamp.timestamp()


def _check_action(action: Action, what: str) -> None:
    if action is Action.ALLOW:
        raise RuleError(f"{what} action must not be ALLOW")


# --- rate and fan-out limits -----------------------------------------------------------------


class LimitKind(StrEnum):
    """What a `RateLimitRule` counts."""

    SENDER = "sender"  # stanzas per sender
    NEW_RECIPIENTS = "new-recipients"  # distinct recipients who do not know the sender
    DOMAIN = "domain"  # stanzas per remote domain


class RateLimitRule:
    """Acts on a sender or remote domain that exceeds a per-window limit.

    - ``SENDER``: more than ``limit`` stanzas from one sender (bare JID) in the window;
    - ``NEW_RECIPIENTS``: stanzas from one sender to more than ``limit`` distinct
      recipients who do not know the sender (the fan-out of a spammer working through a
      directory); a recipient who knows the sender never counts;
    - ``DOMAIN``: more than ``limit`` stanzas from one remote domain (for OUTBOUND
      stanzas: to one remote domain).

    Every stanza past the limit gets ``action`` until the window has room again; the
    stanzas within the limit pass.
    """

    def __init__(
        self,
        kind: LimitKind,
        limit: int,
        counters: CounterStore,
        *,
        window: float = MINUTE,
        action: Action = Action.QUARANTINE,
        directions: Iterable[Direction] = (Direction.INBOUND,),
        trust: TrustResolver | None = None,
        exempt_contacts: bool = True,
        rule_id: str | None = None,
    ) -> None:
        """Create the rule.

        Args:
            kind: What to count.
            limit: Events allowed per window (at least 1).
            counters: Where counts live.
            window: Window length in seconds.
            action: What a stanza past the limit gets; QUARANTINE by default, so an officer
                can release a false alarm and nothing bounces to a legitimate burst.
            directions: The directions counted; INBOUND only by default.
            trust: Who knows whom.
            exempt_contacts: Neither count nor limit stanzas between people who know each
                other.
            rule_id: Name in reasons and metrics; ``limit-<kind>`` by default.

        Raises:
            RuleError: if ``limit`` or ``window`` is not positive or ``action`` is ALLOW.
        """
        if limit < 1 or not (math.isfinite(window) and window > 0):
            raise RuleError("a rate limit needs a limit of at least 1 and a positive window")
        _check_action(action, "RateLimitRule")
        self._kind = LimitKind(kind)
        self._limit = limit
        self._counters = counters
        self._window = float(window)
        self._action = action
        self._scope = _Scope(directions, trust, exempt_contacts)
        self._rule_id = rule_id or f"limit-{self._kind.value}"

    @property
    def rule_id(self) -> str:
        return self._rule_id

    @property
    def description(self) -> str:
        per = f"{self._window:g} s"
        return {
            LimitKind.SENDER: f"at most {self._limit} stanzas per sender per {per}",
            LimitKind.NEW_RECIPIENTS: f"at most {self._limit} new recipients per sender per {per}",
            LimitKind.DOMAIN: f"at most {self._limit} stanzas per remote domain per {per}",
        }[self._kind]

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        if not self._scope.counts(ctx):
            return None
        now, cap = _seconds(ctx), self._limit + 1
        per = "a minute" if self._window == MINUTE else f"in {self._window:g} s"
        if self._kind is LimitKind.SENDER:
            key = f"rate:sender:{normalise_bare(ctx.sender)}"
            if self._counters.hit(key, now, self._window, cap) <= self._limit:
                return None
            detail = f"rate limit: more than {self._limit} stanzas {per} from this sender"
        elif self._kind is LimitKind.NEW_RECIPIENTS:
            if self._scope.trust.known(ctx) is True:
                return None  # counted only when the recipient does not know the sender
            key = f"fanout:{normalise_bare(ctx.sender)}"
            member = str(normalise_bare(ctx.recipient))
            if self._counters.add_distinct(key, member, now, self._window, cap) <= self._limit:
                return None
            detail = f"fan-out limit: more than {self._limit} new recipients {per} from this sender"
        else:
            domain = _remote_domain(ctx)
            if domain is None:
                return None
            key = f"rate:domain:{domain}"
            if self._counters.hit(key, now, self._window, cap) <= self._limit:
                return None
            where = "from" if ctx.direction is Direction.INBOUND else "to"
            shown = domain if len(domain) <= 80 else domain[:77] + "..."
            detail = f"rate limit: more than {self._limit} stanzas {per} {where} {shown}"
        return RuleResult(self._action, 0.0, detail)


# --- duplicate bodies ------------------------------------------------------------------------

_DIGIT = re.compile(r"\d")
# Enough to tell campaigns apart; a longer body is compared on its beginning only, so that a
# megabyte body costs no more than this to normalise.
MAX_COMPARED_CHARS = 20_000


def normalise_body(text: str) -> str:
    """The form in which bodies are compared: NFKC, case-folded, every digit masked as
    ``0``, whitespace runs collapsed to one space, trimmed.

    Masking digits makes "call 555-0101" and "call 555-0199" one campaign: spammers vary
    numbers (codes, phone numbers, amounts) more than words.
    """
    folded = unicodedata.normalize("NFKC", text[:MAX_COMPARED_CHARS]).casefold()
    return " ".join(_DIGIT.sub("0", folded).split())


def body_digest(text: str) -> str | None:
    """SHA-256 (hex, first 32 characters) of the normalised body; ``None`` if empty."""
    normal = normalise_body(text)
    if not normal:
        return None
    return hashlib.sha256(normal.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class DuplicateRule:
    """Acts on the same text sent to many distinct recipients within a window.

    Two ledgers are kept per normalised body: recipients per sender, and recipients per
    remote sending domain (a campaign spread over many accounts of one server). When a
    body reaches ``recipients`` distinct recipients in either, that stanza and every later
    one with the same body get ``action`` until the window moves on. The first
    ``recipients - 1`` copies have already been delivered: this rule limits a campaign's
    reach, it cannot recall it.

    Encrypted stanzas are skipped (their body is a fixed fallback text such as "this
    message is encrypted").
    """

    def __init__(
        self,
        counters: CounterStore,
        *,
        recipients: int = 5,
        window: float = 300.0,
        action: Action = Action.QUARANTINE,
        directions: Iterable[Direction] = (Direction.INBOUND,),
        trust: TrustResolver | None = None,
        exempt_contacts: bool = True,
        rule_id: str = "duplicate-body",
    ) -> None:
        """Create the rule.

        Args:
            counters: Where the ledgers live.
            recipients: Distinct recipients of one body that trigger the rule (at least 2).
            window: Window length in seconds.
            action: What a triggering stanza gets; QUARANTINE by default.
            directions: The directions counted; INBOUND only by default.
            trust: Who knows whom.
            exempt_contacts: Skip stanzas between people who know each other.
            rule_id: Name in reasons and metrics.

        Raises:
            RuleError: if ``recipients`` < 2, ``window`` is not positive or ``action`` is
                ALLOW.
        """
        if recipients < 2 or not (math.isfinite(window) and window > 0):
            raise RuleError("duplicate detection needs recipients >= 2 and a positive window")
        _check_action(action, "DuplicateRule")
        self._counters = counters
        self._recipients = recipients
        self._window = float(window)
        self._action = action
        self._scope = _Scope(directions, trust, exempt_contacts)
        self._rule_id = rule_id

    @property
    def rule_id(self) -> str:
        return self._rule_id

    @property
    def description(self) -> str:
        return (
            f"the same text to {self._recipients} or more recipients within "
            f"{self._window:g} s, from one sender or one remote domain"
        )

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        if not ctx.body or ctx.encryption or not self._scope.counts(ctx):
            return None
        digest = body_digest(ctx.body)
        if digest is None:
            return None
        now, recipient = _seconds(ctx), str(normalise_bare(ctx.recipient))
        sender = normalise_bare(ctx.sender)
        ledgers = [(f"dup:sender:{sender}:{digest}", "this sender")]
        domain = _remote_domain(ctx) if ctx.direction is Direction.INBOUND else None
        if domain is not None:
            shown = domain if len(domain) <= 80 else domain[:77] + "..."
            ledgers.append((f"dup:domain:{domain}:{digest}", shown))
        hit: str | None = None
        for key, origin in ledgers:
            # Every ledger is updated, even after a hit, so both keep their counts.
            count = self._counters.add_distinct(key, recipient, now, self._window, self._recipients)
            if count >= self._recipients and hit is None:
                hit = origin
        if hit is None:
            return None
        return RuleResult(
            self._action,
            0.0,
            f"the same text went to {self._recipients} recipients within "
            f"{self._window:g} s from {hit}",
        )
