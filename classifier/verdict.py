"""What a decision says: the action to take, the score, and every reason that led to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Action(StrEnum):
    """What happens to a stanza, in increasing order of severity."""

    ALLOW = "allow"
    FLAG = "flag"  # deliver, queue for review
    QUARANTINE = "quarantine"  # hold, releasable
    REJECT = "reject"  # bounce <policy-violation/> with a reason text
    DROP = "drop"  # silent

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    @property
    def delivers(self) -> bool:
        return self in (Action.ALLOW, Action.FLAG)

    @property
    def is_final(self) -> bool:
        """REJECT and DROP end the rule chain: the first one wins."""
        return self in (Action.REJECT, Action.DROP)


_SEVERITY = {
    Action.ALLOW: 0,
    Action.FLAG: 1,
    Action.QUARANTINE: 2,
    Action.REJECT: 3,
    Action.DROP: 4,
}


@dataclass(frozen=True, slots=True)
class Reason:
    """One rule's contribution to a verdict."""

    rule_id: str
    detail: str
    contribution: float = 0.0
    action: Action = Action.ALLOW

    def to_json(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id,
            "detail": self.detail,
            "contribution": self.contribution,
            "action": self.action._value_,  # not the `value` property: once per reason
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reason:
        return cls(
            rule_id=str(data["rule_id"]),
            detail=str(data["detail"]),
            contribution=float(data.get("contribution", 0.0)),
            action=Action(data.get("action", Action.ALLOW.value)),
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    score: float = 0.0
    reasons: tuple[Reason, ...] = field(default_factory=tuple)
    # Which policy decided (`classifier.policy.policy_fingerprint`); None when no policy did.
    policy_fingerprint: str | None = None

    def __init__(
        self,
        action: Action,
        score: float = 0.0,
        reasons: tuple[Reason, ...] = (),
        policy_fingerprint: str | None = None,
    ) -> None:
        # Spelled out, not generated: compiled, this stores the fields directly (docs/native.md).
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "reasons", reasons)
        object.__setattr__(self, "policy_fingerprint", policy_fingerprint)

    @property
    def reason_text(self) -> str:
        """The human-readable text sent back with a bounce: the deciding reasons only."""
        deciding = [r.detail for r in self.reasons if r.action == self.action]
        return "; ".join(deciding or [r.detail for r in self.reasons]) or self.action.value

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "action": self.action._value_,
            "score": self.score,
            "reasons": [r.to_json() for r in self.reasons],
        }
        # Only present when set, so verdicts without one serialise exactly as before.
        if self.policy_fingerprint is not None:
            data["policy_fingerprint"] = self.policy_fingerprint
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        return cls(
            action=Action(data["action"]),
            score=float(data.get("score", 0.0)),
            reasons=tuple(Reason.from_json(r) for r in data.get("reasons", [])),
            policy_fingerprint=(
                None if data.get("policy_fingerprint") is None else str(data["policy_fingerprint"])
            ),
        )


ALLOW = Verdict(Action.ALLOW)
