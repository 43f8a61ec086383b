from __future__ import annotations

from typing import Any

import pytest

from classifier.barriers import Barrier, BarrierRule
from classifier.context import DecisionContext, Direction, StanzaKind
from classifier.errors import RuleError
from classifier.patterns import UserGroup
from classifier.verdict import Action
from tests.classifier.helpers import make_ctx

RESEARCH = UserGroup.of("research", ["*@research.corp.example", "rita@corp.example"])
TRADERS = UserGroup.of("traders", ["*@traders.corp.example", "tom@corp.example"])
LOCAL = frozenset(
    {"corp.example", "research.corp.example", "traders.corp.example", "conference.corp.example"}
)
RULE = BarrierRule([Barrier(RESEARCH, TRADERS)])


def local_ctx(sender: str, recipient: str, **overrides: Any) -> DecisionContext:
    return make_ctx(sender=sender, recipient=recipient, local_domains=LOCAL, **overrides)


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize(
    ("sender", "recipient"),
    [
        ("ann@research.corp.example", "tom@corp.example"),
        ("tom@corp.example", "ann@research.corp.example"),
        ("Rita@Corp.Example/desk", "joe@traders.corp.example"),
    ],
)
def test_crossing_is_rejected_either_way(sender: str, recipient: str, direction: Direction) -> None:
    result = RULE.evaluate(local_ctx(sender, recipient, direction=direction))
    assert result is not None
    assert result.action is Action.REJECT
    assert result.detail == "information barrier between research and traders"


@pytest.mark.parametrize(
    "kind", [StanzaKind.MESSAGE, StanzaKind.SUBSCRIPTION, StanzaKind.MUC_INVITE, StanzaKind.CALL]
)
def test_every_kind_between_people(kind: StanzaKind) -> None:
    ctx = local_ctx("ann@research.corp.example", "tom@corp.example", kind=kind)
    assert RULE.evaluate(ctx) is not None


@pytest.mark.parametrize(
    ("sender", "recipient", "overrides"),
    [
        ("ann@research.corp.example", "bea@research.corp.example", {}),  # same side
        ("ann@research.corp.example", "ivan@corp.example", {}),  # not in a group
        ("ann@research.corp.example", "tom@remote.example", {}),  # remote: federation's job
        ("ann@research.corp.example", "tom@corp.example", {"kind": StanzaKind.MUC_JOIN}),
        ("ann@research.corp.example", "tom@corp.example", {"stanza_type": "groupchat"}),
    ],
)
def test_no_result(sender: str, recipient: str, overrides: dict[str, object]) -> None:
    assert RULE.evaluate(local_ctx(sender, recipient, **overrides)) is None


def test_member_of_both_groups_only_talks_to_themselves() -> None:
    both = UserGroup.of("traders", ["*@traders.corp.example", "rita@corp.example"])
    rule = BarrierRule([Barrier(RESEARCH, both)])
    assert rule.evaluate(local_ctx("rita@corp.example", "ann@research.corp.example")) is not None
    assert rule.evaluate(local_ctx("rita@corp.example", "Rita@corp.example/other")) is None


def test_custom_reason_and_most_severe_action() -> None:
    legal = UserGroup.of("legal", ["*@corp.example"])
    rule = BarrierRule(
        [
            Barrier(RESEARCH, legal, reason="dry run", action=Action.FLAG),
            Barrier(RESEARCH, TRADERS, reason="Chinese wall (policy 7.2)"),
        ]
    )
    result = rule.evaluate(local_ctx("ann@research.corp.example", "tom@corp.example"))
    assert result is not None
    assert (result.action, result.detail) == (Action.REJECT, "Chinese wall (policy 7.2)")
    only_flag = rule.evaluate(local_ctx("ann@research.corp.example", "ivan@corp.example"))
    assert only_flag is not None and only_flag.action is Action.FLAG
    assert rule.rule_id == "information-barrier"


def test_bad_barriers() -> None:
    with pytest.raises(RuleError, match="two different groups"):
        Barrier(RESEARCH, RESEARCH)
    with pytest.raises(RuleError, match="ALLOW"):
        Barrier(RESEARCH, TRADERS, action=Action.ALLOW)
