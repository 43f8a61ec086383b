"""Information barriers ("ethical walls"): two groups of local users who must not talk.

Regulated firms separate, for example, research from traders. A barrier names two groups
from the policy's ``[groups]``; any message, subscription request, invitation or call between
a member of one and a member of the other is refused, whichever of them starts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from classifier.context import DecisionContext, StanzaKind
from classifier.errors import RuleError
from classifier.jid import normalise_bare
from classifier.patterns import UserGroup
from classifier.rules import RuleResult
from classifier.trust import is_groupchat
from classifier.verdict import Action

BARRIER_KINDS = frozenset(
    {StanzaKind.MESSAGE, StanzaKind.SUBSCRIPTION, StanzaKind.MUC_INVITE, StanzaKind.CALL}
)


@dataclass(frozen=True, slots=True)
class Barrier:
    """A barrier between two groups.

    ``reason`` replaces the default reason text (sent to the sender with a bounce);
    ``action`` is what a crossing gets: REJECT by default, FLAG for a dry run.
    """

    first: UserGroup
    second: UserGroup
    reason: str | None = None
    action: Action = Action.REJECT

    def __post_init__(self) -> None:
        if self.first.name == self.second.name:
            raise RuleError(f"a barrier needs two different groups, got {self.first.name} twice")
        if self.action is Action.ALLOW:
            raise RuleError("a barrier's action must not be ALLOW")

    @property
    def detail(self) -> str:
        return self.reason or (
            f"information barrier between {self.first.name} and {self.second.name}"
        )

    def separates(self, one: str, other: str) -> bool:
        """Whether users ``one`` and ``other`` are on opposite sides (either way round)."""
        return (self.first.contains(one) and self.second.contains(other)) or (
            self.second.contains(one) and self.first.contains(other)
        )


class BarrierRule:
    """Refuses stanzas that cross an information barrier.

    Only traffic between two local users can cross one (the groups hold local users). Room
    messages are not checked here (their sender is the room, not a person); invitations are.
    A user in both groups of a barrier cannot reach members of either other than themselves:
    the policy says they are on both sides.
    """

    def __init__(
        self,
        barriers: Sequence[Barrier],
        *,
        kinds: Iterable[StanzaKind] = BARRIER_KINDS,
        rule_id: str = "information-barrier",
    ) -> None:
        """Create the rule.

        Args:
            barriers: The barriers. When several separate the two users, the most severe
                action wins (the first such barrier is reported).
            kinds: The stanza kinds checked.
            rule_id: Name in reasons and metrics.
        """
        self._barriers = tuple(barriers)
        self._kinds = frozenset(kinds)
        self._rule_id = rule_id

    @property
    def rule_id(self) -> str:
        return self._rule_id

    @property
    def description(self) -> str:
        return "no traffic between members of groups separated by an information barrier"

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        if ctx.kind not in self._kinds or is_groupchat(ctx):
            return None
        if not (ctx.is_local(ctx.sender) and ctx.is_local(ctx.recipient)):
            return None
        sender, recipient = normalise_bare(ctx.sender), normalise_bare(ctx.recipient)
        if sender == recipient:
            return None
        crossed = [b for b in self._barriers if b.separates(str(sender), str(recipient))]
        if not crossed:
            return None
        worst = max(crossed, key=lambda b: b.action.severity)
        return RuleResult(worst.action, 0.0, worst.detail)
