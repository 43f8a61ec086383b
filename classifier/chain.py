"""Runs rules in order and turns their results into one `Verdict`.

Semantics (see DESIGN.md, Verdicts):

- rules run in the order given; the first REJECT or DROP ends the chain and decides;
- FLAG and QUARANTINE do not stop the chain: the most severe one seen is kept, and every
  rule's score contribution is summed;
- after the last rule, optional thresholds on the summed score can raise the action to
  QUARANTINE or REJECT; a stanza from a stranger (not in the recipient's roster) is held to
  the stricter stranger thresholds when the chain has them;
- a rule that raises (or returns something that is not a `RuleResult`) is counted, logged and
  treated as if it had returned the chain's failure action. The failure action can be FLAG,
  QUARANTINE, REJECT or DROP, never ALLOW: a broken rule must not wave traffic through unseen.

The default failure action is QUARANTINE: nothing is delivered that a rule could not check,
and nothing is lost either (an officer can release the held stanzas once the rule is fixed),
whereas REJECT would bounce every stanza to its sender for a fault of ours and tell remote
parties about it, and FLAG would deliver unchecked traffic.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from classifier.context import DecisionContext
from classifier.errors import RuleError
from classifier.rules import Rule, RuleResult
from classifier.verdict import Action, Reason, Verdict

_log = logging.getLogger(__name__)

DEFAULT_FAILURE_ACTION = Action.QUARANTINE
THRESHOLD_RULE_ID = "score-threshold"
STRANGER_TEST_ID = "stranger-test"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Score thresholds; ``None`` disables one. A score reaching a threshold triggers it."""

    quarantine: float | None = None
    reject: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("quarantine", self.quarantine), ("reject", self.reject)):
            if value is not None and not math.isfinite(value):
                raise RuleError(f"{name} threshold must be finite, got {value!r}")
        if (
            self.quarantine is not None
            and self.reject is not None
            and self.quarantine > self.reject
        ):
            raise RuleError(
                f"quarantine threshold ({self.quarantine:g}) must not exceed the reject "
                f"threshold ({self.reject:g})"
            )

    def action_for(self, score: float) -> Action | None:
        """The action the thresholds call for at ``score``, or ``None``."""
        if self.reject is not None and score >= self.reject:
            return Action.REJECT
        if self.quarantine is not None and score >= self.quarantine:
            return Action.QUARANTINE
        return None

    def threshold_of(self, action: Action) -> float | None:
        return self.reject if action is Action.REJECT else self.quarantine


@dataclass(frozen=True, slots=True)
class RuleStats:
    """Counters of one rule, as of a snapshot.

    Attributes:
        evaluations: Times the rule was run (including runs that raised).
        hits: Results returned, by action (a ``None`` result is not a hit).
        errors: Runs that raised or returned an invalid result.
        errors_by_type: ``errors`` split by exception class name.
    """

    evaluations: int = 0
    hits: Mapping[Action, int] = field(default_factory=lambda: MappingProxyType({}))
    errors: int = 0
    errors_by_type: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """A consistent copy of all counters, for export (Prometheus counters at the edge).

    Attributes:
        rules: Per-rule counters by rule id.
        verdicts: Verdicts returned by the chain, by final action.
    """

    rules: Mapping[str, RuleStats]
    verdicts: Mapping[Action, int]

    @property
    def evaluations(self) -> int:
        """Stanzas judged (verdicts returned)."""
        return sum(self.verdicts.values())


class _MutableStats:
    __slots__ = ("errors", "errors_by_type", "evaluations", "hits")

    def __init__(self) -> None:
        self.evaluations = 0
        self.hits: Counter[Action] = Counter()
        self.errors = 0
        self.errors_by_type: Counter[str] = Counter()

    def freeze(self) -> RuleStats:
        return RuleStats(
            self.evaluations,
            MappingProxyType(dict(self.hits)),
            self.errors,
            MappingProxyType(dict(self.errors_by_type)),
        )


class RuleMetrics:
    """In-memory counters of rule evaluations, hits and errors; no I/O.

    Counters only ever grow, so one instance can be shared across policy reloads (pass it to
    each new chain) and exported as monotonic Prometheus counters. Safe to update from several
    threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: dict[str, _MutableStats] = {}
        self._verdicts: Counter[Action] = Counter()

    def _stats(self, rule_id: str) -> _MutableStats:
        stats = self._rules.get(rule_id)
        if stats is None:
            stats = self._rules[rule_id] = _MutableStats()
        return stats

    def record_result(self, rule_id: str, result: RuleResult | None) -> None:
        """Count one evaluation of ``rule_id`` that returned ``result``."""
        with self._lock:
            stats = self._stats(rule_id)
            stats.evaluations += 1
            if result is not None:
                stats.hits[result.action] += 1

    def record_error(self, rule_id: str, error: BaseException) -> int:
        """Count one evaluation of ``rule_id`` that failed with ``error``.

        Returns:
            How many times this rule has now failed with this exception type.
        """
        with self._lock:
            stats = self._stats(rule_id)
            stats.evaluations += 1
            stats.errors += 1
            name = type(error).__name__
            stats.errors_by_type[name] += 1
            return stats.errors_by_type[name]

    def record_verdict(self, action: Action) -> None:
        """Count one verdict of the chain."""
        with self._lock:
            self._verdicts[action] += 1

    def record_evaluation(
        self, results: Sequence[tuple[str, RuleResult | None]], action: Action
    ) -> None:
        """Count one judged stanza: what each rule that ran returned, then the verdict.

        The same counts as `record_result` per rule and `record_verdict`, under one lock:
        the chain calls this once per stanza instead of taking the lock once per rule.
        """
        with self._lock:
            for rule_id, result in results:
                stats = self._stats(rule_id)
                stats.evaluations += 1
                if result is not None:
                    stats.hits[result.action] += 1
            self._verdicts[action] += 1

    def snapshot(self) -> MetricsSnapshot:
        """A consistent, immutable copy of every counter."""
        with self._lock:
            rules = {rule_id: stats.freeze() for rule_id, stats in self._rules.items()}
            verdicts = dict(self._verdicts)
        return MetricsSnapshot(MappingProxyType(rules), MappingProxyType(verdicts))


class RuleChain:
    """An ordered list of rules and the settings that combine their results."""

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        failure_action: Action = DEFAULT_FAILURE_ACTION,
        thresholds: Thresholds | None = None,
        metrics: RuleMetrics | None = None,
        policy_fingerprint: str | None = None,
        stranger_thresholds: Thresholds | None = None,
        is_stranger: Callable[[DecisionContext], bool] | None = None,
    ) -> None:
        """Create a chain.

        Args:
            rules: Rules in the order they run (cheapest and most decisive first).
            failure_action: What a failing rule counts as; anything but ALLOW.
            thresholds: Score thresholds applied after the last rule.
            metrics: Counters to update; a fresh `RuleMetrics` if omitted. Share one across
                reloads to keep counters monotonic.
            policy_fingerprint: Stamped on every verdict, so the archive says which policy
                decided.
            stranger_thresholds: Score thresholds for stanzas from strangers, used instead
                of ``thresholds`` when ``is_stranger`` says so.
            is_stranger: Tells strangers apart (`classifier.trust.TrustResolver.is_stranger`).
                Asked only when a stranger threshold could change the outcome; if it
                raises, the stanza is treated as a stranger's (the stricter choice) and the
                error is counted under ``stranger-test``.

        Raises:
            RuleError: if ``failure_action`` is ALLOW or two rules share a rule id.
        """
        if failure_action is Action.ALLOW:
            raise RuleError("failure_action must not be ALLOW: a failing rule must not pass")
        # Rule ids are read once here: they key reasons and metrics, and a property that
        # misbehaves later must not be able to break evaluation.
        ids = [str(rule.rule_id) for rule in rules]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise RuleError(f"duplicate rule ids: {', '.join(duplicates)}")
        self._rules = tuple(zip(ids, rules, strict=True))
        self._failure_action = failure_action
        self._thresholds = thresholds or Thresholds()
        self._metrics = metrics if metrics is not None else RuleMetrics()
        self._fingerprint = policy_fingerprint
        self._stranger_thresholds = stranger_thresholds if is_stranger is not None else None
        self._is_stranger = is_stranger

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(rule for _, rule in self._rules)

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(rule_id for rule_id, _ in self._rules)

    @property
    def failure_action(self) -> Action:
        return self._failure_action

    @property
    def thresholds(self) -> Thresholds:
        return self._thresholds

    @property
    def stranger_thresholds(self) -> Thresholds | None:
        return self._stranger_thresholds

    @property
    def metrics(self) -> RuleMetrics:
        return self._metrics

    def _thresholds_for(self, ctx: DecisionContext, score: float) -> tuple[Thresholds, str]:
        """The thresholds that apply to ``ctx`` and a word for the reason text."""
        strict = self._stranger_thresholds
        if strict is None or self._is_stranger is None:
            return self._thresholds, ""
        # Only ask when it matters: the stranger test may consult a store.
        if strict.action_for(score) == self._thresholds.action_for(score):
            return self._thresholds, ""
        try:
            stranger = bool(self._is_stranger(ctx))
        except Exception as exc:
            self._metrics.record_error(STRANGER_TEST_ID, exc)
            _log.warning("the stranger test failed", exc_info=True)
            stranger = True
        return (strict, "stranger ") if stranger else (self._thresholds, "")

    @property
    def policy_fingerprint(self) -> str | None:
        return self._fingerprint

    def _run(
        self,
        rule_id: str,
        rule: Rule,
        ctx: DecisionContext,
        counted: list[tuple[str, RuleResult | None]],
    ) -> RuleResult | None:
        """Run one rule; a result is appended to ``counted``, a failure counted at once."""
        try:
            # Called as returning `object`: what a rule returns is checked here, not trusted
            # (compiled, a call typed by the protocol raises TypeError instead; docs/native.md).
            evaluate: Callable[[DecisionContext], object] = rule.evaluate
            outcome = evaluate(ctx)
            result: RuleResult | None
            if outcome is None or isinstance(outcome, RuleResult):
                result = outcome
            else:
                raise RuleError(f"returned {type(outcome).__name__}, not a RuleResult")
        except Exception as exc:
            # Any exception, including RuleError: the stanza still needs a verdict, and
            # the failure action (never ALLOW) gives it one.
            count = self._metrics.record_error(rule_id, exc)
            # A broken rule fails on every stanza; log the 1st, 2nd, 4th, 8th... failure of
            # each kind so the log shows it without being flooded (metrics count them all).
            if count & (count - 1) == 0:
                _log.warning(
                    "rule %s failed (%d times with %s)",
                    rule_id,
                    count,
                    type(exc).__name__,
                    exc_info=True,
                )
            return RuleResult(
                self._failure_action, 0.0, f"rule {rule_id} failed: {type(exc).__name__}"
            )
        counted.append((rule_id, result))
        return result

    def evaluate(self, ctx: DecisionContext) -> Verdict:
        """Judge one stanza. Never raises for a failing rule.

        Returns:
            The verdict, listing every rule that returned a result (and any threshold that
            fired) with its contribution.
        """
        reasons: list[Reason] = []
        counted: list[tuple[str, RuleResult | None]] = []  # metrics, recorded with the verdict
        score = 0.0
        action = Action.ALLOW
        for rule_id, rule in self._rules:
            result = self._run(rule_id, rule, ctx, counted)
            if result is None:
                continue
            reasons.append(Reason(rule_id, result.detail or rule_id, result.score, result.action))
            score += result.score
            if result.action.is_final:
                return self._verdict(result.action, score, reasons, counted)
            if result.action.severity > action.severity:
                action = result.action
        thresholds, whose = self._thresholds_for(ctx, score)
        by_score = thresholds.action_for(score)
        if by_score is not None:
            threshold = thresholds.threshold_of(by_score)
            reasons.append(
                Reason(
                    THRESHOLD_RULE_ID,
                    f"score {score:g} reached the {whose}{by_score.value} threshold {threshold:g}",
                    0.0,
                    by_score,
                )
            )
            if by_score.severity > action.severity:
                action = by_score
        return self._verdict(action, score, reasons, counted)

    def _verdict(
        self,
        action: Action,
        score: float,
        reasons: list[Reason],
        counted: list[tuple[str, RuleResult | None]],
    ) -> Verdict:
        self._metrics.record_evaluation(counted, action)
        return Verdict(action, score, tuple(reasons), policy_fingerprint=self._fingerprint)
