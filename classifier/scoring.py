"""The adapter that plugs a text model into the rule chain.

A model is anything callable as ``scorer(text) -> probability of spam`` (`TextScorer`): the
trained text model of ``classifier.model`` qualifies through its scoring method, and tests
pass plain functions. `ModelRule` turns the probability into a score contribution
(``weight * p``) and, past its own probability thresholds, into an action; strangers (see
`classifier.trust`) get stricter thresholds, as DESIGN.md asks.

Why probability thresholds on the model besides the chain's score thresholds: the model's
output is calibrated on its own scale, so "hold at p >= 0.9" is meaningful on its own, while
the chain's thresholds combine the model's contribution with every other rule's.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from classifier.context import DecisionContext, Direction, StanzaKind
from classifier.errors import RuleError
from classifier.rules import MAX_CONTRIBUTION, RuleResult
from classifier.trust import TrustResolver, is_groupchat
from classifier.verdict import Action

SCORED_KINDS = frozenset({StanzaKind.MESSAGE, StanzaKind.SUBSCRIPTION, StanzaKind.MUC_INVITE})
# The model sees at most this much of a body: its features saturate long before, and the
# cost of scoring must not grow with hostile input.
MAX_SCORED_CHARS = 20_000


class TextScorer(Protocol):
    """A text model: the probability, in [0, 1], that ``text`` is spam."""

    def __call__(self, text: str) -> float: ...


@dataclass(frozen=True, slots=True)
class ModelThresholds:
    """Probability thresholds of the model; ``None`` disables one.

    ``flag <= quarantine <= reject`` where set; each in [0, 1].
    """

    flag: float | None = None
    quarantine: float | None = 0.9
    reject: float | None = None

    def __post_init__(self) -> None:
        previous: tuple[str, float] | None = None
        for name, value in (
            ("flag", self.flag),
            ("quarantine", self.quarantine),
            ("reject", self.reject),
        ):
            if value is None:
                continue
            if not (0.0 <= value <= 1.0):
                raise RuleError(f"model {name} threshold must be within [0, 1], got {value!r}")
            if previous is not None and value < previous[1]:
                raise RuleError(
                    f"model {name} threshold ({value:g}) must not be below the "
                    f"{previous[0]} threshold ({previous[1]:g})"
                )
            previous = (name, value)

    def action_for(self, probability: float) -> tuple[Action, float] | None:
        """The action these thresholds call for at ``probability``, and its threshold."""
        for action, value in (
            (Action.REJECT, self.reject),
            (Action.QUARANTINE, self.quarantine),
            (Action.FLAG, self.flag),
        ):
            if value is not None and probability >= value:
                return action, value
        return None


class ModelRule:
    """Scores the body with a text model.

    Contributes ``weight * p`` to the verdict's score and, when ``p`` reaches a threshold,
    that threshold's action (the strangers' thresholds for strangers). Bodies of encrypted
    stanzas are not scored (they are a fixed fallback text), nor are room messages.

    A model that raises or returns something that is not a probability in [0, 1] makes the
    rule fail, and the chain applies its failure action: a broken model never waves spam
    through.
    """

    def __init__(
        self,
        scorer: TextScorer,
        *,
        weight: float = 1.0,
        thresholds: ModelThresholds | None = None,
        stranger_thresholds: ModelThresholds | None = None,
        trust: TrustResolver | None = None,
        directions: Iterable[Direction] = (Direction.INBOUND,),
        kinds: Iterable[StanzaKind] = SCORED_KINDS,
        rule_id: str = "text-model",
    ) -> None:
        """Create the rule.

        Args:
            scorer: The model.
            weight: Factor from probability to score contribution (0 contributes nothing).
            thresholds: Probability thresholds for everyone but strangers.
            stranger_thresholds: For strangers; ``thresholds`` if omitted.
            trust: Decides who is a stranger.
            directions: The directions scored; INBOUND only by default (the model learned
                what spam from outside looks like).
            kinds: The stanza kinds scored.
            rule_id: Name in reasons and metrics.

        Raises:
            RuleError: if ``weight`` is not finite or too large.
        """
        if not math.isfinite(weight) or abs(weight) > MAX_CONTRIBUTION:
            raise RuleError(f"model weight must be finite and within ±{MAX_CONTRIBUTION:g}")
        self._scorer = scorer
        self._weight = weight
        self._thresholds = thresholds or ModelThresholds()
        self._strangers = stranger_thresholds or self._thresholds
        self._trust = trust or TrustResolver()
        self._directions = frozenset(directions)
        self._kinds = frozenset(kinds)
        self._rule_id = rule_id
        # A scorer may name its model (``model_version``: a retrained version, "default"):
        # the reason then says which model decided, which matters once models are swapped.
        version = getattr(scorer, "model_version", None)
        self._model_note = f" (model {version})" if isinstance(version, str) and version else ""

    @property
    def rule_id(self) -> str:
        return self._rule_id

    @property
    def description(self) -> str:
        return "spam probability of the body according to the text model"

    @property
    def scorer(self) -> TextScorer:
        return self._scorer

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        if ctx.direction not in self._directions or ctx.kind not in self._kinds:
            return None
        if not ctx.body or not ctx.body.strip() or ctx.encryption or is_groupchat(ctx):
            return None
        # Called as returning `object`: the model's output is checked below, not trusted
        # (see RuleChain._run).
        scorer: Callable[[str], object] = self._scorer
        raw = scorer(ctx.body[:MAX_SCORED_CHARS])
        if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
            raise RuleError(f"the model returned {type(raw).__name__}, not a probability")
        probability = float(raw)
        if not (0.0 <= probability <= 1.0):  # also refuses NaN
            raise RuleError(f"the model returned {probability!r}, not a probability in [0, 1]")
        stranger = self._trust.is_stranger(ctx)
        thresholds = self._strangers if stranger else self._thresholds
        decided = thresholds.action_for(probability)
        score = self._weight * probability
        if decided is None:
            return RuleResult(
                Action.ALLOW, score, f"spam probability {probability:.3f}{self._model_note}"
            )
        action, threshold = decided
        who = " for a stranger" if stranger else ""
        return RuleResult(
            action,
            score,
            f"spam probability {probability:.3f} reached the {action.value} threshold "
            f"{threshold:g}{who}{self._model_note}",
        )
