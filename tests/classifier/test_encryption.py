from __future__ import annotations

import pytest

from classifier.context import Direction
from classifier.encryption import EncryptionRule
from classifier.verdict import Action
from tests.classifier.helpers import make_ctx

RULE = EncryptionRule(
    {"omemo": Action.REJECT, "openpgp": Action.FLAG, "otr": Action.ALLOW},
    other=Action.QUARANTINE,
)


def test_unencrypted_is_not_this_rules_business() -> None:
    assert RULE.evaluate(make_ctx()) is None
    assert RULE.evaluate(make_ctx(encryption="")) is None


@pytest.mark.parametrize("direction", list(Direction))
def test_reject(direction: Direction) -> None:
    result = RULE.evaluate(make_ctx(encryption="omemo", direction=direction))
    assert result is not None
    assert result.action is Action.REJECT
    assert result.detail == (
        "end-to-end encryption (omemo) is not allowed here: messages must be archived"
    )


def test_flag_allow_and_other() -> None:
    flagged = RULE.evaluate(make_ctx(encryption="OpenPGP"))
    assert flagged is not None
    assert (flagged.action, flagged.detail) == (
        Action.FLAG,
        "end-to-end encrypted (openpgp): not archived in clear",
    )
    assert RULE.evaluate(make_ctx(encryption="otr")) is None
    other = RULE.evaluate(make_ctx(encryption="x" * 500))
    assert other is not None and other.action is Action.QUARANTINE
    assert len(other.detail) < 120


def test_missing_methods_are_allowed() -> None:
    rule = EncryptionRule({"omemo": Action.REJECT})
    assert rule.evaluate(make_ctx(encryption="otr")) is None
    assert rule.rule_id == "encryption"
    assert tuple(rule.methods) == ("omemo",)
