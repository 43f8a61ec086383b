"""End-to-end encryption policy.

A regulated deployment must archive what its users say; an end-to-end encrypted message
reaches the archive as ciphertext. The proxy marks such stanzas in
`DecisionContext.encryption` (``"omemo"``, ``"openpgp"`` for XEP-0373/XEP-0027, ``"otr"``
for OTR, including the ``?OTR`` query that starts a session); this rule maps each method to
an action.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from classifier.context import DecisionContext
from classifier.rules import RuleResult
from classifier.verdict import Action

KNOWN_METHODS = ("omemo", "openpgp", "otr")
OTHER = "other"  # any marker not listed above, should the edge learn new ones


class EncryptionRule:
    """Applies the configured action to end-to-end encrypted stanzas, per method."""

    def __init__(
        self,
        actions: Mapping[str, Action],
        *,
        other: Action = Action.ALLOW,
        rule_id: str = "encryption",
    ) -> None:
        """Create the rule.

        Args:
            actions: Action per method (``omemo``, ``openpgp``, ``otr``); a missing method is
                allowed.
            other: Action for a marker not in ``actions``.
            rule_id: Name in reasons and metrics.
        """
        self._actions = MappingProxyType({k.lower(): v for k, v in actions.items()})
        self._other = other
        self._rule_id = rule_id

    @property
    def rule_id(self) -> str:
        return self._rule_id

    @property
    def description(self) -> str:
        return "end-to-end encrypted stanzas, which the archive cannot read"

    @property
    def methods(self) -> Iterable[str]:
        return tuple(self._actions)

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        if not ctx.encryption:
            return None
        method = ctx.encryption.lower()
        action = self._actions.get(method, self._other)
        if action is Action.ALLOW:
            return None
        shown = method if method in self._actions or len(method) <= 40 else method[:37] + "..."
        if action.delivers:
            return RuleResult(action, 0.0, f"end-to-end encrypted ({shown}): not archived in clear")
        return RuleResult(
            action,
            0.0,
            f"end-to-end encryption ({shown}) is not allowed here: messages must be archived",
        )
