from __future__ import annotations

import pytest

from classifier.context import Direction, StanzaKind
from classifier.errors import RuleError
from classifier.lexicons import Lexicon, LexiconRule, words_of
from classifier.verdict import Action
from tests.classifier.helpers import make_ctx

GUARANTEES = Lexicon.of("guarantees", ["guaranteed return", "risk-free", "guaranteed"])
RULE = LexiconRule(GUARANTEES)


def test_words_of() -> None:
    assert words_of(
        "Risk-Free, " + "".join(chr(ord(c) + 0xFEE0) for c in "GUARANTEED") + "  return!"
    ) == (
        "risk",
        "free",
        "guaranteed",
        "return",
    )


@pytest.mark.parametrize(
    ("body", "found"),
    [
        ("This is a GUARANTEED RETURN of 12%", ("guaranteed return",)),
        ("totally risk free", ("risk-free",)),
        ("Risk-free and guaranteed.", ("risk-free", "guaranteed")),
        ("guaranteed\n  return", ("guaranteed return",)),
        ("unguaranteed returns", ()),
        ("riskfree", ()),
        ("", ()),
    ],
)
def test_find(body: str, found: tuple[str, ...]) -> None:
    assert GUARANTEES.find(body) == found


def test_find_reports_at_most_a_few_terms() -> None:
    lexicon = Lexicon.of("x", [f"w{i}" for i in range(10)])
    assert len(lexicon.find(" ".join(f"w{i}" for i in range(10)))) == 3


def test_rule_flags_with_the_lexicon_and_term() -> None:
    result = RULE.evaluate(make_ctx(body="a guaranteed return, risk-free"))
    assert result is not None
    assert result.action is Action.FLAG
    assert result.score == 0.0
    assert result.detail == "lexicon guarantees: 'guaranteed return', 'risk-free'"
    assert RULE.rule_id == "lexicon-guarantees"


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("kind", list(StanzaKind))
def test_every_kind_and_direction_with_a_body(kind: StanzaKind, direction: Direction) -> None:
    ctx = make_ctx(kind=kind, direction=direction, body="Risk free!")
    result = RULE.evaluate(ctx)
    assert result is not None and result.action is Action.FLAG


def test_groupchat_is_surveilled_too() -> None:
    assert RULE.evaluate(make_ctx(stanza_type="groupchat", body="risk-free")) is not None


def test_no_body() -> None:
    assert RULE.evaluate(make_ctx(body=None)) is None


@pytest.mark.parametrize("term", ["", "  ", "!!!", "$$$"])
def test_terms_need_words(term: str) -> None:
    with pytest.raises(RuleError, match="no letters or digits"):
        Lexicon.of("x", [term])


def test_too_many_words() -> None:
    with pytest.raises(RuleError, match="more than 16 words"):
        Lexicon.of("x", [" ".join(["w"] * 17)])


def test_many_terms_stay_fast() -> None:
    lexicon = Lexicon.of("big", [f"term{i} phrase{i}" for i in range(50_000)])
    body = " ".join(f"term{i}" for i in range(5_000)) + " term49999 phrase49999"
    assert lexicon.find(body) == ("term49999 phrase49999",)
