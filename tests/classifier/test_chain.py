from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from classifier.chain import (
    DEFAULT_FAILURE_ACTION,
    THRESHOLD_RULE_ID,
    RuleChain,
    RuleMetrics,
    Thresholds,
)
from classifier.context import DecisionContext
from classifier.errors import RuleError
from classifier.patterns import UserGroup
from classifier.rules import DomainList, FederationRule, RuleResult
from classifier.verdict import Action, Reason, Verdict
from tests.classifier.helpers import contexts, make_ctx


@dataclass
class Fixed:
    """A rule that always returns the same result and counts its calls."""

    rule_id: str
    result: RuleResult | None
    description: str = "test rule"
    calls: int = field(default=0)

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        self.calls += 1
        return self.result


@dataclass
class Raising:
    rule_id: str
    error: BaseException = field(default_factory=lambda: ZeroDivisionError("boom"))
    description: str = "always fails"

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        raise self.error


@dataclass
class ReturnsGarbage:
    rule_id: str = "garbage"
    description: str = "returns a str"

    def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
        return "reject"  # type: ignore[return-value]


def fixed(rule_id: str, action: Action = Action.ALLOW, score: float = 0.0) -> Fixed:
    return Fixed(rule_id, RuleResult(action, score, f"{rule_id} says {action.value}"))


def test_empty_chain_allows() -> None:
    verdict = RuleChain([]).evaluate(make_ctx())
    assert verdict == Verdict(Action.ALLOW, 0.0, ())


def test_rules_returning_none_leave_no_reason() -> None:
    verdict = RuleChain([Fixed("quiet", None)]).evaluate(make_ctx())
    assert verdict.action is Action.ALLOW
    assert verdict.reasons == ()


class TestOrdering:
    @pytest.mark.parametrize("final", [Action.REJECT, Action.DROP])
    def test_first_final_action_wins_and_stops_the_chain(self, final: Action) -> None:
        before = fixed("before", Action.FLAG, 1.0)
        decider = fixed("decider", final, 2.0)
        later_drop = fixed("later", Action.DROP, 5.0)
        chain = RuleChain([before, decider, later_drop])
        verdict = chain.evaluate(make_ctx())
        assert verdict.action is final
        assert later_drop.calls == 0
        assert [r.rule_id for r in verdict.reasons] == ["before", "decider"]
        assert verdict.score == 3.0
        assert verdict.reason_text == f"decider says {final.value}"

    def test_reject_before_drop_means_reject(self) -> None:
        chain = RuleChain([fixed("r", Action.REJECT), fixed("d", Action.DROP)])
        assert chain.evaluate(make_ctx()).action is Action.REJECT

    def test_rules_run_in_the_given_order(self) -> None:
        chain = RuleChain([fixed("b"), fixed("a"), fixed("c")])
        assert chain.rule_ids == ("b", "a", "c")
        assert [r.rule_id for r in chain.evaluate(make_ctx()).reasons] == ["b", "a", "c"]


class TestAccumulation:
    def test_most_severe_non_final_action_wins(self) -> None:
        chain = RuleChain(
            [
                fixed("f1", Action.FLAG, 1.5),
                fixed("q", Action.QUARANTINE, 2.0),
                fixed("f2", Action.FLAG),
            ]
        )
        verdict = chain.evaluate(make_ctx())
        assert verdict.action is Action.QUARANTINE
        assert verdict.score == 3.5
        assert verdict.reasons == (
            Reason("f1", "f1 says flag", 1.5, Action.FLAG),
            Reason("q", "q says quarantine", 2.0, Action.QUARANTINE),
            Reason("f2", "f2 says flag", 0.0, Action.FLAG),
        )

    def test_score_only_results_keep_allow(self) -> None:
        verdict = RuleChain([fixed("a", score=2.0), fixed("b", score=-0.5)]).evaluate(make_ctx())
        assert verdict.action is Action.ALLOW
        assert verdict.score == 1.5
        assert [r.contribution for r in verdict.reasons] == [2.0, -0.5]

    def test_empty_detail_falls_back_to_rule_id(self) -> None:
        verdict = RuleChain([Fixed("quiet", RuleResult(Action.FLAG))]).evaluate(make_ctx())
        assert verdict.reasons[0].detail == "quiet"


class TestThresholds:
    def chain(self, *scores: float) -> RuleChain:
        return RuleChain(
            [fixed(f"s{i}", score=s) for i, s in enumerate(scores)],
            thresholds=Thresholds(quarantine=5.0, reject=10.0),
        )

    def test_below_thresholds(self) -> None:
        assert self.chain(2.0, 2.9).evaluate(make_ctx()).action is Action.ALLOW

    def test_quarantine_threshold_is_inclusive(self) -> None:
        verdict = self.chain(2.0, 3.0).evaluate(make_ctx())
        assert verdict.action is Action.QUARANTINE
        assert verdict.reasons[-1] == Reason(
            THRESHOLD_RULE_ID, "score 5 reached the quarantine threshold 5", 0.0, Action.QUARANTINE
        )

    def test_reject_threshold(self) -> None:
        verdict = self.chain(6.0, 6.0).evaluate(make_ctx())
        assert verdict.action is Action.REJECT
        assert verdict.reason_text == "score 12 reached the reject threshold 10"

    def test_negative_contributions_count(self) -> None:
        assert self.chain(8.0, 4.0, -8.0).evaluate(make_ctx()).action is Action.ALLOW

    def test_threshold_never_lowers_a_rule_action(self) -> None:
        chain = RuleChain(
            [fixed("q", Action.QUARANTINE, 6.0)], thresholds=Thresholds(quarantine=1.0)
        )
        assert chain.evaluate(make_ctx()).action is Action.QUARANTINE

    def test_only_reject_threshold(self) -> None:
        chain = RuleChain([fixed("s", score=3.0)], thresholds=Thresholds(reject=3.0))
        assert chain.evaluate(make_ctx()).action is Action.REJECT

    @pytest.mark.parametrize(
        ("quarantine", "reject", "message"),
        [
            (float("nan"), None, "finite"),
            (None, float("inf"), "finite"),
            (10.0, 5.0, "must not exceed"),
        ],
    )
    def test_invalid_thresholds(
        self, quarantine: float | None, reject: float | None, message: str
    ) -> None:
        with pytest.raises(RuleError, match=message):
            Thresholds(quarantine, reject)


class TestFailures:
    def test_default_failure_action_is_quarantine(self) -> None:
        assert DEFAULT_FAILURE_ACTION is Action.QUARANTINE
        verdict = RuleChain([Raising("broken")]).evaluate(make_ctx())
        assert verdict.action is Action.QUARANTINE
        assert verdict.reasons == (
            Reason("broken", "rule broken failed: ZeroDivisionError", 0.0, Action.QUARANTINE),
        )

    def test_failure_does_not_stop_later_rules(self) -> None:
        later = fixed("later", Action.REJECT)
        verdict = RuleChain([Raising("broken"), later]).evaluate(make_ctx())
        assert later.calls == 1
        assert verdict.action is Action.REJECT

    def test_final_failure_action_stops_the_chain(self) -> None:
        later = fixed("later")
        chain = RuleChain([Raising("broken"), later], failure_action=Action.REJECT)
        verdict = chain.evaluate(make_ctx())
        assert verdict.action is Action.REJECT
        assert verdict.reason_text == "rule broken failed: ZeroDivisionError"
        assert later.calls == 0

    @pytest.mark.parametrize("action", [Action.FLAG, Action.QUARANTINE, Action.REJECT, Action.DROP])
    def test_configured_failure_action(self, action: Action) -> None:
        assert (
            RuleChain([Raising("x")], failure_action=action).evaluate(make_ctx()).action is action
        )

    def test_failure_action_allow_is_refused(self) -> None:
        with pytest.raises(RuleError, match="must not be ALLOW"):
            RuleChain([], failure_action=Action.ALLOW)

    def test_rule_error_is_a_failure_too(self) -> None:
        verdict = RuleChain([Raising("r", RuleError("cannot decide"))]).evaluate(make_ctx())
        assert verdict.reason_text == "rule r failed: RuleError"

    def test_invalid_return_value_is_a_failure(self) -> None:
        verdict = RuleChain([ReturnsGarbage()]).evaluate(make_ctx())
        assert verdict.action is Action.QUARANTINE
        assert verdict.reason_text == "rule garbage failed: RuleError"

    def test_exception_from_inside_result_validation_is_a_failure(self) -> None:
        @dataclass
        class BadScore:
            rule_id: str = "nan"
            description: str = "returns a NaN score"

            def evaluate(self, ctx: DecisionContext) -> RuleResult | None:
                return RuleResult(Action.FLAG, float("nan"))

        verdict = RuleChain([BadScore()]).evaluate(make_ctx())
        assert verdict.reason_text == "rule nan failed: ValueError"

    def test_base_exceptions_are_not_swallowed(self) -> None:
        with pytest.raises(KeyboardInterrupt):
            RuleChain([Raising("r", KeyboardInterrupt())]).evaluate(make_ctx())

    def test_failure_is_logged_without_flooding(self, caplog: pytest.LogCaptureFixture) -> None:
        chain = RuleChain([Raising("broken")])
        for _ in range(100):
            chain.evaluate(make_ctx())
        logged = [r for r in caplog.records if "rule broken failed" in r.getMessage()]
        # The 1st, 2nd, 4th ... 64th failures: 7 lines for 100 failures.
        assert len(logged) == 7
        assert logged[0].exc_info is not None
        assert chain.metrics.snapshot().rules["broken"].errors == 100


def test_duplicate_rule_ids_are_refused() -> None:
    with pytest.raises(RuleError, match="duplicate rule ids: a"):
        RuleChain([fixed("a"), fixed("b"), fixed("a")])


def test_policy_fingerprint_is_stamped() -> None:
    verdict = RuleChain([fixed("a", Action.FLAG)], policy_fingerprint="abc").evaluate(make_ctx())
    assert verdict.policy_fingerprint == "abc"
    assert Verdict.from_json(verdict.to_json()) == verdict


def test_verdict_json_without_fingerprint_is_unchanged() -> None:
    verdict = RuleChain([fixed("a", Action.FLAG)]).evaluate(make_ctx())
    assert "policy_fingerprint" not in verdict.to_json()


class TestMetrics:
    def test_counts(self) -> None:
        chain = RuleChain([fixed("flagger", Action.FLAG), Fixed("quiet", None), Raising("broken")])
        for _ in range(3):
            chain.evaluate(make_ctx())
        snap = chain.metrics.snapshot()
        assert snap.rules["flagger"].evaluations == 3
        assert dict(snap.rules["flagger"].hits) == {Action.FLAG: 3}
        assert snap.rules["quiet"].evaluations == 3
        assert dict(snap.rules["quiet"].hits) == {}
        assert snap.rules["broken"].errors == 3
        assert dict(snap.rules["broken"].errors_by_type) == {"ZeroDivisionError": 3}
        assert dict(snap.rules["broken"].hits) == {}
        assert dict(snap.verdicts) == {Action.QUARANTINE: 3}
        assert snap.evaluations == 3

    def test_rules_after_a_final_action_are_not_counted(self) -> None:
        chain = RuleChain([fixed("r", Action.REJECT), fixed("never")])
        chain.evaluate(make_ctx())
        assert "never" not in chain.metrics.snapshot().rules

    def test_a_final_action_counts_the_rules_that_ran_and_the_verdict(self) -> None:
        # The chain records an evaluation's counts at the end, also when a rule ends it early.
        chain = RuleChain(
            [Fixed("quiet", None), fixed("flagger", Action.FLAG), fixed("r", Action.REJECT)]
        )
        for _ in range(2):
            chain.evaluate(make_ctx())
        snap = chain.metrics.snapshot()
        assert {rule: stats.evaluations for rule, stats in snap.rules.items()} == {
            "quiet": 2,
            "flagger": 2,
            "r": 2,
        }
        assert dict(snap.rules["r"].hits) == {Action.REJECT: 2}
        assert dict(snap.rules["flagger"].hits) == {Action.FLAG: 2}
        assert dict(snap.verdicts) == {Action.REJECT: 2}

    def test_snapshot_is_a_copy(self) -> None:
        chain = RuleChain([fixed("a", Action.FLAG)])
        chain.evaluate(make_ctx())
        snap = chain.metrics.snapshot()
        chain.evaluate(make_ctx())
        assert snap.rules["a"].evaluations == 1
        with pytest.raises(TypeError):
            snap.rules["a"].hits[Action.FLAG] = 9  # type: ignore[index]

    def test_metrics_can_be_shared_across_chains(self) -> None:
        metrics = RuleMetrics()
        RuleChain([fixed("a")], metrics=metrics).evaluate(make_ctx())
        RuleChain([fixed("a")], metrics=metrics).evaluate(make_ctx())
        assert metrics.snapshot().rules["a"].evaluations == 2

    def test_concurrent_updates_are_not_lost(self) -> None:
        chain = RuleChain([fixed("a", Action.FLAG)])
        ctx = make_ctx()

        def work() -> None:
            for _ in range(500):
                chain.evaluate(ctx)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert chain.metrics.snapshot().rules["a"].hits[Action.FLAG] == 2000


# --- properties ---------------------------------------------------------------------------

_domain_lists = st.lists(
    st.sampled_from(["remote.example", "*.example", "corp.example", "*", "bücher.example"]),
    max_size=4,
)
_errors = st.sampled_from(
    [ValueError("v"), KeyError("k"), RuleError("r"), RecursionError(), MemoryError(), TypeError()]
)


@st.composite
def chains(draw: st.DrawFn) -> RuleChain:
    rules: list[object] = [
        FederationRule(
            DomainList.of(draw(st.sampled_from(["allow", "deny"])), draw(_domain_lists)),
            groups=[
                (
                    UserGroup.of("g", ["*@corp.example"]),
                    DomainList.of(draw(st.sampled_from(["allow", "deny"])), draw(_domain_lists)),
                )
            ],
        )
    ]
    for i in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            rules.append(Raising(f"raise{i}", draw(_errors)))
        else:
            action = draw(st.sampled_from(Action))
            score = draw(st.floats(-1e9, 1e9, allow_nan=False))
            rules.append(fixed(f"fixed{i}", action, score))
    rules.append(ReturnsGarbage())
    quarantine = draw(st.none() | st.floats(-10, 10))
    reject = draw(st.none() | st.floats(10, 20))
    return RuleChain(
        rules,  # type: ignore[arg-type]
        failure_action=draw(st.sampled_from([a for a in Action if a is not Action.ALLOW])),
        thresholds=Thresholds(quarantine, reject),
    )


@given(contexts, chains())
def test_no_context_makes_the_chain_raise(ctx: DecisionContext, chain: RuleChain) -> None:
    verdict = chain.evaluate(ctx)
    assert isinstance(verdict.action, Action)
    assert verdict.score == verdict.score  # not NaN
    # Every chain here contains a failing rule unless a final action came first: never ALLOW.
    assert verdict.action is not Action.ALLOW
    assert sum(r.contribution for r in verdict.reasons) == pytest.approx(verdict.score)
    Verdict.from_json(verdict.to_json())


@given(contexts)
def test_federation_only_chain_never_raises(ctx: DecisionContext) -> None:
    chain = RuleChain([FederationRule(DomainList.of("allow", ["partner.example"]))])
    verdict = chain.evaluate(ctx)
    assert verdict.action in (Action.ALLOW, Action.REJECT)
    assert (verdict.action is Action.REJECT) == bool(
        [d for d in ctx.remote_domains if d != "partner.example"]
    )


class TestStrangerThresholds:
    def chain(self, is_stranger: Any) -> RuleChain:
        return RuleChain(
            [fixed("score", score=3.0)],
            thresholds=Thresholds(5.0, 10.0),
            stranger_thresholds=Thresholds(2.0, 4.0),
            is_stranger=is_stranger,
        )

    def test_strangers_get_the_strict_thresholds(self) -> None:
        verdict = self.chain(lambda ctx: True).evaluate(make_ctx())
        assert verdict.action is Action.QUARANTINE
        assert verdict.reasons[-1].detail == "score 3 reached the stranger quarantine threshold 2"
        assert self.chain(lambda ctx: False).evaluate(make_ctx()).action is Action.ALLOW

    def test_asked_only_when_it_matters(self) -> None:
        calls: list[DecisionContext] = []

        def spy(ctx: DecisionContext) -> bool:
            calls.append(ctx)
            return True

        chain = RuleChain(
            [fixed("score", score=0.5)],
            thresholds=Thresholds(5.0),
            stranger_thresholds=Thresholds(2.0),
            is_stranger=spy,
        )
        chain.evaluate(make_ctx())
        assert calls == []

    def test_a_failing_test_means_stranger(self) -> None:
        def broken(ctx: DecisionContext) -> bool:
            raise ConnectionError("trust store unreachable")

        chain = self.chain(broken)
        assert chain.evaluate(make_ctx()).action is Action.QUARANTINE
        stats = chain.metrics.snapshot().rules["stranger-test"]
        assert stats.errors_by_type == {"ConnectionError": 1}

    def test_without_a_test_no_stranger_thresholds(self) -> None:
        chain = RuleChain([fixed("score", score=3.0)], stranger_thresholds=Thresholds(2.0))
        assert chain.stranger_thresholds is None
        assert chain.evaluate(make_ctx()).action is Action.ALLOW
