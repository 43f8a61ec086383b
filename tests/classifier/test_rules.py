from __future__ import annotations

import math

import pytest

from classifier.context import Direction, StanzaKind
from classifier.errors import RuleError
from classifier.patterns import UserGroup
from classifier.rules import (
    DomainList,
    FederationMode,
    FederationRule,
    Rule,
    RuleResult,
)
from classifier.verdict import Action
from tests.classifier.helpers import make_ctx
from tests.support.protocols import implements

TRADERS = UserGroup.of("traders", ["*@traders.corp.example", "alice@corp.example"])
INTERNS = UserGroup.of("interns", ["ivan@corp.example", "alice@corp.example"])


def deny(*domains: str) -> DomainList:
    return DomainList.of("deny", domains)


def allow(*domains: str) -> DomainList:
    return DomainList.of("allow", domains)


class TestRuleResult:
    def test_defaults(self) -> None:
        assert RuleResult() == RuleResult(Action.ALLOW, 0.0, "")

    @pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf, 1e10, -1e10])
    def test_score_must_be_finite_and_bounded(self, score: float) -> None:
        with pytest.raises(ValueError, match="finite"):
            RuleResult(Action.FLAG, score)

    def test_action_must_be_an_action(self) -> None:
        with pytest.raises(TypeError):
            RuleResult("reject")  # type: ignore[arg-type]


class TestDomainList:
    def test_bad_mode(self) -> None:
        with pytest.raises(RuleError, match="mode must be 'allow' or 'deny', got 'maybe'"):
            DomainList.of("maybe", [])

    def test_refusal(self) -> None:
        assert deny("evil.example").refusal("evil.example") == "deny-list entry 'evil.example'"
        assert deny("evil.example").refusal("good.example") is None
        assert allow("good.example").refusal("good.example") is None
        assert allow("good.example").refusal("evil.example") == "not on the allow-list"
        assert DomainList.of(FederationMode.ALLOW, []).refusal("any.example") is not None


def test_federation_rule_is_a_rule() -> None:
    rule = FederationRule(deny())
    assert implements(rule, Rule)
    assert not implements(object(), Rule)
    assert rule.rule_id == "federation"
    assert rule.description


class TestFederationDefaultDeny:
    rule = FederationRule(deny("evil.example", "*.evil.example"))

    def test_inbound_from_denied_domain_is_rejected(self) -> None:
        result = self.rule.evaluate(make_ctx(sender="x@evil.example"))
        assert result is not None
        assert result.action is Action.REJECT
        assert result.score == 0.0
        assert result.detail == (
            "federation with evil.example is not allowed (deny-list entry 'evil.example')"
        )

    def test_subdomain_by_wildcard_case_insensitive(self) -> None:
        result = self.rule.evaluate(make_ctx(sender="x@Chat.EVIL.example/r"))
        assert result is not None
        assert "chat.evil.example" in result.detail
        assert "'*.evil.example'" in result.detail

    def test_outbound_to_denied_domain_is_rejected(self) -> None:
        ctx = make_ctx(
            direction=Direction.OUTBOUND, sender="bob@corp.example", recipient="x@evil.example"
        )
        result = self.rule.evaluate(ctx)
        assert result is not None and result.action is Action.REJECT

    def test_other_domains_pass(self) -> None:
        assert self.rule.evaluate(make_ctx(sender="x@fine.example")) is None

    def test_local_traffic_is_not_its_business(self) -> None:
        assert self.rule.evaluate(make_ctx(sender="alice@corp.example")) is None

    @pytest.mark.parametrize("kind", list(StanzaKind))
    def test_applies_to_every_kind(self, kind: StanzaKind) -> None:
        result = self.rule.evaluate(make_ctx(kind=kind, sender="x@evil.example"))
        assert result is not None and result.action is Action.REJECT

    def test_subscription_inbound(self) -> None:
        ctx = make_ctx(
            kind=StanzaKind.SUBSCRIPTION, stanza_type="subscribe", sender="x@evil.example"
        )
        assert self.rule.evaluate(ctx) is not None

    def test_muc_join_checks_the_room_domain(self) -> None:
        ctx = make_ctx(
            kind=StanzaKind.MUC_JOIN,
            direction=Direction.OUTBOUND,
            sender="bob@corp.example",
            recipient="lobby@muc.evil.example",
            room="lobby@muc.evil.example",
        )
        result = self.rule.evaluate(ctx)
        assert result is not None
        assert "muc.evil.example" in result.detail

    def test_inbound_muc_message_from_remote_room(self) -> None:
        ctx = make_ctx(
            stanza_type="groupchat",
            sender="lobby@muc.evil.example",
            sender_full="lobby@muc.evil.example/nick",
            room="lobby@muc.evil.example",
        )
        assert self.rule.evaluate(ctx) is not None

    def test_invite_from_fine_user_to_denied_room(self) -> None:
        ctx = make_ctx(
            kind=StanzaKind.MUC_INVITE, sender="carol@fine.example", room="r@muc.evil.example"
        )
        result = self.rule.evaluate(ctx)
        assert result is not None and "muc.evil.example" in result.detail

    def test_idna_spellings(self) -> None:
        rule = FederationRule(deny("bücher.example"))
        assert rule.evaluate(make_ctx(sender="x@xn--bcher-kva.example")) is not None
        assert rule.evaluate(make_ctx(sender="x@BÜCHER.example")) is not None


class TestFederationDefaultAllow:
    rule = FederationRule(allow("partner.example", "*.partner.example"))

    def test_listed_domain_passes(self) -> None:
        assert self.rule.evaluate(make_ctx(sender="x@partner.example")) is None
        assert self.rule.evaluate(make_ctx(sender="x@chat.partner.example")) is None

    def test_unlisted_domain_is_rejected(self) -> None:
        result = self.rule.evaluate(make_ctx(sender="x@other.example"))
        assert result is not None
        assert result.action is Action.REJECT
        assert result.detail == (
            "federation with other.example is not allowed (not on the allow-list)"
        )

    def test_every_remote_party_must_be_allowed(self) -> None:
        ctx = make_ctx(
            kind=StanzaKind.MUC_INVITE, sender="x@partner.example", room="r@muc.other.example"
        )
        result = self.rule.evaluate(ctx)
        assert result is not None and "muc.other.example" in result.detail

    def test_empty_allow_list_refuses_all_federation(self) -> None:
        rule = FederationRule(allow())
        assert rule.evaluate(make_ctx()) is not None
        assert rule.evaluate(make_ctx(sender="alice@corp.example")) is None


class TestFederationGroups:
    rule = FederationRule(
        deny("evil.example"),
        groups=[
            (TRADERS, allow("partner.example")),
            (INTERNS, deny("partner.example", "games.example")),
        ],
    )

    def test_user_in_no_group_gets_the_default(self) -> None:
        assert self.rule.evaluate(make_ctx(sender="x@other.example")) is None
        result = self.rule.evaluate(make_ctx(sender="x@evil.example"))
        assert result is not None
        assert "for group" not in result.detail

    def test_group_list_replaces_the_default(self) -> None:
        ctx = make_ctx(recipient="tom@traders.corp.example", sender="x@evil.example")
        result = self.rule.evaluate(ctx)
        assert result is not None
        assert result.detail == (
            "federation with evil.example is not allowed for group traders (not on the allow-list)"
        )
        ok = make_ctx(recipient="tom@traders.corp.example", sender="x@partner.example")
        assert self.rule.evaluate(ok) is None

    def test_group_applies_outbound_by_sender(self) -> None:
        ctx = make_ctx(
            direction=Direction.OUTBOUND, sender="ivan@corp.example", recipient="x@games.example"
        )
        result = self.rule.evaluate(ctx)
        assert result is not None and "for group interns" in result.detail

    def test_member_of_several_groups_needs_every_list_to_permit(self) -> None:
        # alice is a trader (allow partner.example only) and an intern (deny partner.example).
        both = make_ctx(recipient="alice@corp.example", sender="x@partner.example")
        result = self.rule.evaluate(both)
        assert result is not None and "for group interns" in result.detail
        other = make_ctx(recipient="alice@corp.example", sender="x@other.example")
        result = self.rule.evaluate(other)
        assert result is not None and "for group traders" in result.detail

    def test_outcome_does_not_depend_on_group_order(self) -> None:
        reordered = FederationRule(
            deny("evil.example"),
            groups=[(INTERNS, deny("partner.example")), (TRADERS, allow("partner.example"))],
        )
        ctx = make_ctx(recipient="alice@corp.example", sender="x@partner.example")
        first, second = self.rule.evaluate(ctx), reordered.evaluate(ctx)
        assert first is not None and second is not None
        assert first.action is second.action

    def test_lists_for(self) -> None:
        assert [g for g, _ in self.rule.lists_for("alice@corp.example")] == ["traders", "interns"]
        assert [g for g, _ in self.rule.lists_for("bob@corp.example")] == [None]
        assert [g for g, _ in self.rule.lists_for(None)] == [None]


class TestFederationOptions:
    def test_flag_action_is_a_dry_run(self) -> None:
        rule = FederationRule(deny("evil.example"), action=Action.FLAG)
        result = rule.evaluate(make_ctx(sender="x@evil.example"))
        assert result is not None and result.action is Action.FLAG

    def test_kinds_restrict_scope(self) -> None:
        rule = FederationRule(deny("evil.example"), kinds=[StanzaKind.MESSAGE])
        assert rule.evaluate(make_ctx(kind=StanzaKind.CALL, sender="x@evil.example")) is None
        assert rule.evaluate(make_ctx(sender="x@evil.example")) is not None

    def test_custom_rule_id(self) -> None:
        assert FederationRule(deny(), rule_id="fed-strict").rule_id == "fed-strict"

    def test_allow_action_is_refused(self) -> None:
        with pytest.raises(RuleError, match="must not be ALLOW"):
            FederationRule(deny(), action=Action.ALLOW)

    def test_duplicate_groups_are_refused(self) -> None:
        with pytest.raises(RuleError, match="duplicate group"):
            FederationRule(deny(), groups=[(TRADERS, deny()), (TRADERS, allow())])
