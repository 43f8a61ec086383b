"""The per-sender reputation from spam reports: ledger, rule, policy section, chain."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from classifier.context import Direction, StanzaKind
from classifier.errors import PolicyError, RuleError
from classifier.policy import (
    PolicyHolder,
    ReputationPolicy,
    build_chain,
    parse_policy,
    policy_fingerprint,
    policy_from_dict,
    policy_to_dict,
)
from classifier.reputation import ReputationLedger, ReputationRule, decay
from classifier.verdict import Action
from tests.classifier.helpers import CLOCK, make_ctx

NOW = CLOCK.now()
HOUR = timedelta(hours=1)
SPAMMER = "mallory@remote.example"
HEAD = 'version = 1\nlocal_domains = ["corp.example"]\n'


def ledger_with(*reporters: str, at_offset: timedelta = timedelta(0)) -> ReputationLedger:
    ledger = ReputationLedger()
    for reporter in reporters:
        ledger.note_report(SPAMMER, NOW - at_offset, reporter=reporter)
    return ledger


class TestLedger:
    def test_unreported_sender_weighs_nothing(self) -> None:
        assert ReputationLedger().weight(SPAMMER, NOW) == (0.0, 0)

    def test_one_reporter_counts_once_however_often_they_report(self) -> None:
        ledger = ReputationLedger()
        for minutes in range(5):
            ledger.note_report(
                SPAMMER, NOW + timedelta(minutes=minutes), reporter="bob@corp.example"
            )
        weight, reporters = ledger.weight(SPAMMER, NOW + timedelta(minutes=4))
        assert (weight, reporters) == (1.0, 1)

    def test_distinct_reporters_add_up(self) -> None:
        ledger = ledger_with("bob@corp.example", "carol@corp.example", "dave@corp.example")
        assert ledger.weight(SPAMMER, NOW) == (3.0, 3)

    def test_bare_jid_is_the_key(self) -> None:
        ledger = ReputationLedger()
        ledger.note_report("Mallory@Remote.Example/phone", NOW, reporter="bob@corp.example/x")
        ledger.note_report(SPAMMER, NOW, reporter="BOB@corp.example")
        assert ledger.weight("mallory@remote.example/other", NOW) == (1.0, 1)

    def test_reports_decay_by_half_life(self) -> None:
        ledger = ledger_with("bob@corp.example", at_offset=timedelta(hours=24))
        weight, _ = ledger.weight(SPAMMER, NOW, timedelta(hours=24))
        assert weight == pytest.approx(0.5)
        weight, _ = ledger.weight(SPAMMER, NOW, timedelta(hours=12))
        assert weight == pytest.approx(0.25)

    def test_a_report_from_the_future_counts_fully(self) -> None:
        ledger = ReputationLedger()
        ledger.note_report(SPAMMER, NOW + HOUR, reporter="bob@corp.example")
        assert ledger.weight(SPAMMER, NOW)[0] == 1.0

    def test_weight_is_capped_and_nonpositive_weights_ignored(self) -> None:
        ledger = ReputationLedger()
        ledger.note_report(SPAMMER, NOW, reporter="a@corp.example", weight=5.0)
        ledger.note_report(SPAMMER, NOW, reporter="b@corp.example", weight=0.0)
        ledger.note_report(SPAMMER, NOW, reporter="c@corp.example", weight=-1.0)
        ledger.note_report(SPAMMER, NOW, reporter="d@corp.example", weight=float("nan"))
        assert ledger.weight(SPAMMER, NOW) == (1.0, 1)

    def test_low_weight_reporter_counts_less(self) -> None:
        ledger = ReputationLedger()
        ledger.note_report(SPAMMER, NOW, reporter="cried-wolf@corp.example", weight=0.25)
        assert ledger.weight(SPAMMER, NOW)[0] == pytest.approx(0.25)

    def test_withdraw_removes_one_reporter(self) -> None:
        ledger = ledger_with("bob@corp.example", "carol@corp.example")
        assert ledger.withdraw(SPAMMER, "bob@corp.example") is True
        assert ledger.withdraw(SPAMMER, "bob@corp.example") is False
        assert ledger.weight(SPAMMER, NOW) == (1.0, 1)
        assert ledger.withdraw(SPAMMER, "carol@corp.example") is True
        assert len(ledger) == 0

    def test_anonymous_reports_each_count(self) -> None:
        ledger = ReputationLedger()
        ledger.note_report(SPAMMER, NOW)
        ledger.note_report(SPAMMER, NOW)
        assert ledger.weight(SPAMMER, NOW) == (2.0, 2)

    def test_memory_is_bounded(self) -> None:
        ledger = ReputationLedger(max_senders=2, max_reporters=2)
        for n in range(5):
            ledger.note_report(f"s{n}@remote.example", NOW, reporter="bob@corp.example")
            ledger.note_report(SPAMMER, NOW, reporter=f"r{n}@corp.example")
        assert len(ledger) == 2
        assert ledger.weight(SPAMMER, NOW)[1] == 2

    def test_naive_time_is_refused(self) -> None:
        with pytest.raises(RuleError):
            ReputationLedger().note_report(SPAMMER, NOW.replace(tzinfo=None))

    @given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=500))
    def test_decay_is_between_zero_and_one_and_halves(self, hours: int, half: int) -> None:
        factor = decay(timedelta(hours=hours), timedelta(hours=half))
        assert 0.0 <= factor <= 1.0
        twice = decay(timedelta(hours=hours + half), timedelta(hours=half))
        assert twice == pytest.approx(factor / 2, abs=1e-12)


class TestRule:
    def test_no_reports_no_result(self) -> None:
        assert ReputationRule(ReputationLedger()).evaluate(make_ctx()) is None

    def test_one_report_scores_and_flags(self) -> None:
        rule = ReputationRule(ledger_with("bob@corp.example"), points=2.0)
        result = rule.evaluate(make_ctx())
        assert result is not None
        assert result.action is Action.FLAG
        assert result.score == pytest.approx(2.0)
        assert "reported as spam by 1 reporter" in result.detail

    def test_a_report_made_a_moment_ago_still_counts_as_one(self) -> None:
        ledger = ledger_with("bob@corp.example", at_offset=timedelta(seconds=30))
        result = ReputationRule(ledger).evaluate(make_ctx())
        assert result is not None and result.action is Action.FLAG
        assert result.score < 1.0

    def test_enough_reporters_quarantine(self) -> None:
        rule = ReputationRule(ledger_with("a@corp.example", "b@corp.example", "c@corp.example"))
        result = rule.evaluate(make_ctx())
        assert result is not None and result.action is Action.QUARANTINE

    def test_below_thresholds_only_scores(self) -> None:
        ledger = ReputationLedger()
        ledger.note_report(SPAMMER, NOW, reporter="bob@corp.example", weight=0.5)
        result = ReputationRule(ledger).evaluate(make_ctx())
        assert result is not None and result.action is Action.ALLOW
        assert result.score == pytest.approx(0.5)

    def test_old_reports_fade_away(self) -> None:
        ledger = ledger_with("bob@corp.example", at_offset=timedelta(days=60))
        assert ReputationRule(ledger, half_life=timedelta(hours=24)).evaluate(make_ctx()) is None

    def test_directions_and_rooms(self) -> None:
        rule = ReputationRule(ledger_with("bob@corp.example"), directions=[Direction.INBOUND])
        outbound = make_ctx(direction=Direction.OUTBOUND)
        assert rule.evaluate(outbound) is None
        groupchat = make_ctx(stanza_type="groupchat", room=SPAMMER)
        assert rule.evaluate(groupchat) is None
        assert rule.evaluate(make_ctx(kind=StanzaKind.MUC_JOIN)) is None
        assert rule.evaluate(make_ctx(kind=StanzaKind.SUBSCRIPTION)) is not None

    def test_bad_configuration_is_refused(self) -> None:
        ledger = ReputationLedger()
        with pytest.raises(RuleError):
            ReputationRule(ledger, half_life=timedelta(0))
        with pytest.raises(RuleError):
            ReputationRule(ledger, flag_at=3.0, quarantine_at=1.0)
        with pytest.raises(RuleError):
            ReputationRule(ledger, flag_at=0.0)
        with pytest.raises(RuleError):
            ReputationRule(ledger, points=float("inf"))


class TestPolicySection:
    def test_defaults(self) -> None:
        policy = parse_policy(HEAD + "[reputation]\n")
        assert policy.reputation == ReputationPolicy()

    def test_round_trip_and_fingerprint(self) -> None:
        text = HEAD + (
            "[reputation]\npoints = 4.0\nhalf_life_hours = 12\nflag_at = 0.5\n"
            'quarantine_at = false\ndirections = ["inbound"]\n'
        )
        policy = parse_policy(text)
        assert policy.reputation == ReputationPolicy(4.0, 12.0, 0.5, None, (Direction.INBOUND,))
        assert policy_from_dict(policy_to_dict(policy)) == policy
        assert policy_fingerprint(policy) != policy_fingerprint(parse_policy(HEAD))

    def test_absent_section_keeps_the_fingerprint(self) -> None:
        assert "reputation" not in policy_to_dict(parse_policy(HEAD))

    @pytest.mark.parametrize(
        ("body", "where"),
        [
            ("half_life_hours = 0", "reputation.half_life_hours"),
            ("half_life_hours = 100000", "reputation.half_life_hours"),
            ("flag_at = 2\nquarantine_at = 1", "reputation.flag_at"),
            ("flag_at = true", "reputation.flag_at"),
            ("quarantine_at = -1", "reputation.quarantine_at"),
            ("points = 1e9", "reputation.points"),
            ("threshold = 1", "reputation.threshold"),
            ('directions = ["sideways"]', "reputation.directions"),
        ],
    )
    def test_errors_name_the_key(self, body: str, where: str) -> None:
        with pytest.raises(PolicyError, match=where.replace(".", r"\.")):
            parse_policy(HEAD + "[reputation]\n" + body + "\n")


class TestChain:
    def test_rule_exists_only_with_a_ledger(self) -> None:
        policy = parse_policy(HEAD + "[reputation]\n")
        assert "reputation" not in build_chain(policy).rule_ids
        assert "reputation" in build_chain(policy, reputation=ReputationLedger()).rule_ids

    def test_a_report_raises_the_next_verdict_at_once(self) -> None:
        ledger = ReputationLedger()
        holder = PolicyHolder(
            parse_policy(HEAD + "[reputation]\npoints = 3.0\n"), reputation=ledger
        )
        before = holder.evaluate(make_ctx())
        ledger.note_report(SPAMMER, NOW, reporter="bob@corp.example")
        after = holder.evaluate(make_ctx())
        assert after.score > before.score
        assert after.action is Action.FLAG
        assert [r.rule_id for r in after.reasons] == ["reputation"]

    def test_reports_survive_a_policy_reload(self) -> None:
        ledger = ledger_with("a@corp.example", "b@corp.example", "c@corp.example")
        holder = PolicyHolder(parse_policy(HEAD), reputation=ledger)
        assert holder.evaluate(make_ctx()).action is Action.QUARANTINE
        holder.replace_text(HEAD + "[reputation]\nquarantine_at = false\n")
        assert holder.evaluate(make_ctx()).action is Action.FLAG
        assert holder.reputation is ledger

    def test_score_thresholds_see_the_contribution(self) -> None:
        text = HEAD + (
            "[decision]\nquarantine_threshold = 5.0\n"
            "[reputation]\npoints = 5.0\nflag_at = false\nquarantine_at = false\n"
        )
        holder = PolicyHolder(parse_policy(text), reputation=ledger_with("bob@corp.example"))
        verdict = holder.evaluate(make_ctx())
        assert verdict.action is Action.QUARANTINE
        assert [r.rule_id for r in verdict.reasons] == ["reputation", "score-threshold"]
