"""Properties of the anti-SPIM and compliance rules over arbitrary stanzas.

No context makes any rule raise (the chain would hide it behind its failure action, so the
rules are called directly, and the chain's error counters are checked too), and lexicons
never block.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from classifier.barriers import Barrier, BarrierRule
from classifier.blocklists import BlockList, BlocklistRule, ListKind
from classifier.chain import RuleChain, Thresholds
from classifier.context import DecisionContext, Direction
from classifier.encryption import EncryptionRule
from classifier.lexicons import Lexicon, LexiconRule, words_of
from classifier.limits import DuplicateRule, InMemoryCounterStore, LimitKind, RateLimitRule
from classifier.patterns import UserGroup
from classifier.policy import build_chain, parse_policy, policy_from_dict
from classifier.rules import Rule
from classifier.scoring import ModelRule, ModelThresholds
from classifier.trust import (
    InMemoryTrustStore,
    RosterItem,
    StrangerRule,
    Subscription,
    TrustResolver,
)
from classifier.verdict import Action
from tests.classifier.helpers import contexts
from tests.classifier.test_policy_sections import FULL

_hostile_urls = st.lists(
    st.sampled_from(
        [
            "https://evil.example/x",
            "http://www.evil.example:99999/",
            "http://[",
            "http://[::1]/",
            "https://user@bücher.example/",
            "https:///nohost",
            "\x00://\udcff",
            "",
        ]
    )
    | st.text(max_size=30),
    max_size=4,
).map(tuple)
stanzas = st.one_of(
    contexts,
    st.builds(lambda ctx, urls: dataclasses.replace(ctx, urls=urls), contexts, _hostile_urls),
)

TRUST = InMemoryTrustStore(max_owners=100)
TRUST.set_roster("bob@corp.example", [RosterItem("friend@remote.example", Subscription.BOTH)])
RESOLVER = TrustResolver(TRUST)
LISTS = BlockList.of(
    domains=["spam.example", "*.spam.example", "xn--bcher-kva.example"],
    jids=["bad@remote.example"],
    jid_sha256=[hashlib.sha256(b"mallory@remote.example").hexdigest()],
    url_hosts=["evil.example"],
)
COUNTERS = InMemoryCounterStore(max_keys=1000)
RESEARCH = UserGroup.of("research", ["*@corp.example"])
TRADERS = UserGroup.of("traders", ["*@traders.corp.example", "bob@corp.example"])


def _model(text: str) -> float:
    return (hash(text) % 1000) / 999


RULES: list[Rule] = [
    StrangerRule(RESOLVER),
    StrangerRule(TrustResolver(unknown_is_stranger=True), url_action=Action.REJECT),
    BlocklistRule([LISTS], trust=RESOLVER, directions=list(Direction)),
    BlocklistRule([LISTS], exempt_contacts=False, kind_actions={ListKind.URL_HOSTS: Action.FLAG}),
    BarrierRule([Barrier(RESEARCH, TRADERS)]),
    EncryptionRule({"omemo": Action.REJECT, "otr": Action.FLAG}, other=Action.QUARANTINE),
    *(
        RateLimitRule(kind, 2, COUNTERS, trust=RESOLVER, directions=list(Direction))
        for kind in LimitKind
    ),
    DuplicateRule(COUNTERS, recipients=2, trust=RESOLVER, directions=list(Direction)),
    LexiconRule(Lexicon.of("g", ["guaranteed return", "risk-free", "ß", "İstanbul"])),
    ModelRule(
        _model,
        thresholds=ModelThresholds(0.5, 0.8, 0.99),
        stranger_thresholds=ModelThresholds(0.3, 0.6, 0.9),
        trust=RESOLVER,
        directions=list(Direction),
    ),
]


@settings(max_examples=200, deadline=None)
@given(stanzas)
def test_no_context_makes_any_rule_raise(ctx: DecisionContext) -> None:
    for rule in RULES:
        result = rule.evaluate(ctx)
        if result is not None:
            assert isinstance(result.action, Action)
            assert len(result.detail) < 400


FULL_POLICY = parse_policy(FULL)


@settings(max_examples=100, deadline=None)
@given(st.lists(stanzas, min_size=1, max_size=5))
def test_no_context_makes_the_full_chain_raise_or_fail_a_rule(
    batch: list[DecisionContext],
) -> None:
    chain = build_chain(FULL_POLICY, model=_model, trust=TRUST, counters=COUNTERS, blocklists=LISTS)
    for ctx in batch:
        verdict = chain.evaluate(ctx)
        assert verdict.score == verdict.score
        assert sum(r.contribution for r in verdict.reasons) == pytest.approx(verdict.score)
    snapshot = chain.metrics.snapshot()
    assert {rule_id: s.errors for rule_id, s in snapshot.rules.items() if s.errors} == {}


_terms = st.lists(
    st.text(min_size=1, max_size=20).filter(lambda t: 0 < len(words_of(t)) <= 16),
    min_size=1,
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(_terms, stanzas, st.text(max_size=200))
def test_lexicons_never_block(terms: list[str], ctx: DecisionContext, extra: str) -> None:
    rule = LexiconRule(Lexicon.of("l", terms))
    # The body contains a term half of the time, so hits are common.
    for body in (extra, f"{extra} {terms[0]} {ctx.body or ''}"):
        result = rule.evaluate(dataclasses.replace(ctx, body=body))
        assert result is None or (result.action is Action.FLAG and result.score == 0.0)
    chain = RuleChain(
        [rule, LexiconRule(Lexicon.of("m", terms[::-1]))],
        thresholds=Thresholds(0.001, 0.002),
        stranger_thresholds=Thresholds(0.001, 0.001),
        is_stranger=lambda c: True,
    )
    verdict = chain.evaluate(dataclasses.replace(ctx, body=f"{terms[-1]} {extra}"))
    assert verdict.action in (Action.ALLOW, Action.FLAG)
    assert verdict.score == 0.0


@settings(max_examples=100, deadline=None)
@given(_terms, stanzas)
def test_lexicon_only_policies_never_block(terms: list[str], ctx: DecisionContext) -> None:
    policy = policy_from_dict(
        {
            "version": 1,
            "local_domains": ["corp.example"],
            "decision": {"quarantine_threshold": 0.5, "reject_threshold": 1},
            "strangers": {"first_contact_url": "allow"},
            "lexicons": [{"name": "l", "terms": terms, "action": "flag"}],
        }
    )
    verdict = build_chain(policy).evaluate(dataclasses.replace(ctx, body=" ".join(terms)))
    assert verdict.action in (Action.ALLOW, Action.FLAG)
    assert all(r.action in (Action.ALLOW, Action.FLAG) for r in verdict.reasons)
