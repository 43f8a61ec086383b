"""The rule protocol and the rules themselves.

A rule looks at one `DecisionContext` and either has nothing to say (``None``) or returns a
`RuleResult`: an action, a score contribution and a human-readable detail. Rules are pure and
must not keep per-stanza state; the chain decides what their results add up to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from classifier.context import DecisionContext, StanzaKind
from classifier.errors import RuleError
from classifier.patterns import DomainMatcher, UserGroup
from classifier.verdict import Action

# Bound on one rule's score contribution: large enough for any real weighting, small enough
# that no sum of contributions can overflow to infinity (which would poison JSON and thresholds).
MAX_CONTRIBUTION = 1e9


@dataclass(frozen=True, slots=True)
class RuleResult:
    """What a rule says about a stanza.

    Attributes:
        action: ALLOW if the rule only contributes a score; otherwise what it wants done.
        score: Contribution to the verdict's score (negative for trust signals); finite and at
            most `MAX_CONTRIBUTION` in magnitude.
        detail: Human-readable reason; REJECT details are sent back to the sender.
    """

    action: Action = Action.ALLOW
    score: float = 0.0
    detail: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            raise TypeError(f"RuleResult.action must be an Action, got {self.action!r}")
        if not math.isfinite(self.score) or abs(self.score) > MAX_CONTRIBUTION:
            raise ValueError(f"RuleResult.score must be finite and within ±{MAX_CONTRIBUTION:g}")


class Rule(Protocol):
    """One check in a `RuleChain`.

    ``rule_id`` names the rule in verdict reasons and metrics (stable, short, kebab-case);
    ``description`` says in one line what it checks.
    """

    @property
    def rule_id(self) -> str: ...

    @property
    def description(self) -> str: ...

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        """Judge one stanza; ``None`` means "nothing to say"."""
        ...


class FederationMode(StrEnum):
    """How a federation domain list is read."""

    ALLOW = "allow"  # only the listed remote domains are permitted
    DENY = "deny"  # the listed remote domains are refused, all others permitted


@dataclass(frozen=True, slots=True)
class DomainList:
    """An allow-list or deny-list of remote domains."""

    mode: FederationMode
    matcher: DomainMatcher

    @classmethod
    def of(cls, mode: FederationMode | str, patterns: Iterable[str]) -> DomainList:
        """Build from a mode and raw patterns (see `classifier.patterns`).

        Raises:
            RuleError: if the mode or a pattern is invalid.
        """
        try:
            parsed_mode = FederationMode(mode)
        except ValueError:
            raise RuleError(f"mode must be 'allow' or 'deny', got {mode!r}") from None
        return cls(parsed_mode, DomainMatcher(patterns))

    def refusal(self, domain: str) -> str | None:
        """Why ``domain`` is refused by this list, or ``None`` if it is permitted."""
        pattern = self.matcher.match(domain)
        if self.mode is FederationMode.DENY:
            return None if pattern is None else f"deny-list entry '{pattern}'"
        return "not on the allow-list" if pattern is None else None


ALL_KINDS = frozenset(StanzaKind)


class FederationRule:
    """Refuses traffic with remote domains that a federation list does not permit.

    The local user's groups choose the list: a user in no group that has its own list gets the
    default list; a user in groups with lists gets those lists only, and a remote domain must
    be permitted by *every one* of them (the most restrictive wins, so the outcome never
    depends on the order in which groups are written).

    Every remote domain involved is checked (the room's service, the recipient's and the
    sender's), so the rule works the same in both directions and for MUC joins and invites.
    Purely local traffic is not this rule's business.
    """

    def __init__(
        self,
        default: DomainList,
        *,
        groups: Sequence[tuple[UserGroup, DomainList]] = (),
        action: Action = Action.REJECT,
        kinds: Iterable[StanzaKind] = ALL_KINDS,
        rule_id: str = "federation",
    ) -> None:
        """Create the rule.

        Args:
            default: The list for users in no group with a list of its own.
            groups: Group-specific lists.
            action: What a refusal does; REJECT by default (the sender learns why). FLAG
                gives a dry-run mode that only reports what would be refused.
            kinds: The stanza kinds the rule applies to; all of them by default.
            rule_id: Name in reasons and metrics.

        Raises:
            RuleError: if ``action`` is ALLOW or two groups share a name.
        """
        if action is Action.ALLOW:
            raise RuleError("FederationRule action must not be ALLOW")
        names = [group.name for group, _ in groups]
        if len(names) != len(set(names)):
            raise RuleError(f"FederationRule: duplicate group names in {names}")
        self._rule_id = rule_id
        self._default = default
        self._groups = tuple(groups)
        self._action = action
        self._kinds = frozenset(kinds)

    @property
    def rule_id(self) -> str:
        return self._rule_id

    @property
    def description(self) -> str:
        return "remote domains must be permitted by the federation policy of the local user"

    def lists_for(self, user: str | None) -> list[tuple[str | None, DomainList]]:
        """The lists that apply to ``user`` as ``(group name or None, list)`` pairs."""
        if user is not None and self._groups:
            applicable: list[tuple[str | None, DomainList]] = [
                (group.name, domains) for group, domains in self._groups if group.contains(user)
            ]
            if applicable:
                return applicable
        return [(None, self._default)]

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        if ctx.kind not in self._kinds:
            return None
        remote = ctx.remote_domains
        if not remote:
            return None
        lists = self.lists_for(ctx.local_party)
        for domain in remote:
            for group, domains in lists:
                why = domains.refusal(domain)
                if why is not None:
                    scope = "" if group is None else f" for group {group}"
                    return RuleResult(
                        self._action,
                        0.0,
                        f"federation with {domain} is not allowed{scope} ({why})",
                    )
        return None
