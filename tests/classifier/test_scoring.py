from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from classifier.chain import RuleChain
from classifier.context import Direction, StanzaKind
from classifier.errors import RuleError
from classifier.scoring import ModelRule, ModelThresholds, TextScorer
from classifier.trust import TrustResolver
from classifier.verdict import Action
from tests.classifier.helpers import make_ctx
from tests.support.protocols import implements


def constant(p: Any) -> TextScorer:
    def scorer(text: str) -> float:
        return p  # type: ignore[no-any-return]

    return scorer


class Recorder:
    def __init__(self, p: float) -> None:
        self.p = p
        self.texts: list[str] = []

    def __call__(self, text: str) -> float:
        self.texts.append(text)
        return self.p


class TestThresholds:
    def test_action_for(self) -> None:
        t = ModelThresholds(flag=0.5, quarantine=0.8, reject=0.95)
        assert t.action_for(0.4) is None
        assert t.action_for(0.5) == (Action.FLAG, 0.5)
        assert t.action_for(0.9) == (Action.QUARANTINE, 0.8)
        assert t.action_for(1.0) == (Action.REJECT, 0.95)
        assert ModelThresholds(None, None, None).action_for(1.0) is None

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"quarantine": 1.5},
            {"flag": -0.1},
            {"flag": 0.9, "quarantine": 0.5},
            {"quarantine": 0.9, "reject": 0.8},
            {"flag": 0.9, "quarantine": None, "reject": 0.8},
        ],
    )
    def test_invalid(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(RuleError):
            ModelThresholds(**kwargs)


class TestModelRule:
    def test_contributes_weighted_probability(self) -> None:
        rule = ModelRule(constant(0.5), weight=4.0)
        result = rule.evaluate(make_ctx())
        assert result is not None
        assert (result.action, result.score) == (Action.ALLOW, 2.0)
        assert result.detail == "spam probability 0.500"
        assert rule.rule_id == "text-model"

    def test_thresholds_and_strangers(self) -> None:
        rule = ModelRule(
            constant(0.8),
            thresholds=ModelThresholds(quarantine=0.9, reject=0.99),
            stranger_thresholds=ModelThresholds(quarantine=0.7, reject=0.95),
        )
        contact = rule.evaluate(make_ctx(sender_in_recipient_roster=True))
        assert contact is not None and contact.action is Action.ALLOW
        stranger = rule.evaluate(make_ctx(sender_in_recipient_roster=False))
        assert stranger is not None
        assert stranger.action is Action.QUARANTINE
        assert stranger.detail == (
            "spam probability 0.800 reached the quarantine threshold 0.7 for a stranger"
        )
        # Unknown relationship: normal thresholds unless told otherwise.
        unknown = rule.evaluate(make_ctx())
        assert unknown is not None and unknown.action is Action.ALLOW
        strict = ModelRule(
            constant(0.8),
            stranger_thresholds=ModelThresholds(quarantine=0.7),
            trust=TrustResolver(unknown_is_stranger=True),
        )
        result = strict.evaluate(make_ctx())
        assert result is not None and result.action is Action.QUARANTINE

    def test_reject(self) -> None:
        rule = ModelRule(constant(0.999), thresholds=ModelThresholds(reject=0.99))
        result = rule.evaluate(make_ctx())
        assert result is not None and result.action is Action.REJECT

    @pytest.mark.parametrize(
        "overrides",
        [
            {"body": None},
            {"body": "  "},
            {"encryption": "omemo"},
            {"stanza_type": "groupchat"},
            {"direction": Direction.OUTBOUND},
            {"kind": StanzaKind.CALL},
            {"kind": StanzaKind.MUC_JOIN},
        ],
    )
    def test_not_scored(self, overrides: dict[str, Any]) -> None:
        recorder = Recorder(0.99)
        assert ModelRule(recorder).evaluate(make_ctx(**overrides)) is None
        assert recorder.texts == []

    @pytest.mark.parametrize("kind", [StanzaKind.SUBSCRIPTION, StanzaKind.MUC_INVITE])
    def test_subscriptions_and_invitations_are_scored(self, kind: StanzaKind) -> None:
        recorder = Recorder(0.1)
        assert ModelRule(recorder).evaluate(make_ctx(kind=kind, body="add me")) is not None
        assert recorder.texts == ["add me"]

    def test_long_bodies_are_cut(self) -> None:
        recorder = Recorder(0.1)
        ModelRule(recorder).evaluate(make_ctx(body="x" * 1_000_000))
        assert len(recorder.texts[0]) == 20_000

    def test_numpy_probabilities(self) -> None:
        for value in (np.float32(0.95), np.float64(0.95)):
            result = ModelRule(constant(value)).evaluate(make_ctx())
            assert result is not None and result.action is Action.QUARANTINE

    @pytest.mark.parametrize("value", [math.nan, -0.1, 1.5, "0.5", None, True])
    def test_bad_output_fails_the_rule(self, value: Any) -> None:
        with pytest.raises(RuleError):
            ModelRule(constant(value)).evaluate(make_ctx())

    def test_broken_model_gets_the_failure_action_in_a_chain(self) -> None:
        def broken(text: str) -> float:
            raise RuntimeError("model file missing")

        chain = RuleChain([ModelRule(broken)])
        verdict = chain.evaluate(make_ctx())
        assert verdict.action is Action.QUARANTINE
        assert chain.metrics.snapshot().rules["text-model"].errors == 1

    @pytest.mark.parametrize("weight", [math.inf, math.nan, 1e12])
    def test_bad_weight(self, weight: float) -> None:
        with pytest.raises(RuleError):
            ModelRule(constant(0.5), weight=weight)

    def test_scorer_protocol(self) -> None:
        assert implements(constant(0.1), TextScorer)
        assert ModelRule(constant(0.1)).scorer is not None
