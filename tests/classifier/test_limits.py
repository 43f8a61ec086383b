from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

import pytest

from classifier.context import DecisionContext, Direction, StanzaKind
from classifier.errors import RuleError
from classifier.limits import (
    CounterStore,
    DuplicateRule,
    InMemoryCounterStore,
    LimitKind,
    RateLimitRule,
    body_digest,
    normalise_body,
)
from classifier.trust import InMemoryTrustStore, RosterItem, Subscription, TrustResolver
from classifier.verdict import Action
from tests.classifier.helpers import CLOCK, make_ctx
from tests.support.protocols import implements

T0 = CLOCK.now()


def at(seconds: float, **overrides: Any) -> DecisionContext:
    return make_ctx(timestamp=T0 + timedelta(seconds=seconds), **overrides)


class TestInMemoryCounterStore:
    def test_is_a_counter_store(self) -> None:
        assert implements(InMemoryCounterStore(), CounterStore)

    def test_hit_slides(self) -> None:
        store = InMemoryCounterStore()
        assert [store.hit("k", t, 60, 100) for t in (0, 10, 20)] == [1, 2, 3]
        assert store.hit("k", 65, 60, 100) == 3  # the event at 0 left the window
        assert store.hit("k", 200, 60, 100) == 1
        assert store.hit("other", 200, 60, 100) == 1

    def test_hit_stops_counting_at_the_cap(self) -> None:
        store = InMemoryCounterStore()
        counts = [store.hit("k", float(t), 60, 5) for t in range(10)]
        assert counts == [1, 2, 3, 4, 5, 5, 5, 5, 5, 5]
        assert store.hit("k", 10.0, 60, 8) == 6  # a new cap (policy reload) keeps the past

    def test_add_distinct(self) -> None:
        store = InMemoryCounterStore()
        assert store.add_distinct("k", "a", 0, 60, 10) == 1
        assert store.add_distinct("k", "a", 1, 60, 10) == 1
        assert store.add_distinct("k", "b", 2, 60, 10) == 2
        assert store.add_distinct("k", "c", 61.5, 60, 10) == 2  # "a" (last seen at 1) left
        assert store.add_distinct("k", "d", 200, 60, 10) == 1
        for i in range(20):
            store.add_distinct("cap", f"m{i}", 300, 60, 5)
        assert store.add_distinct("cap", "last", 300, 60, 5) == 5

    def test_idle_keys_are_evicted(self) -> None:
        store = InMemoryCounterStore()
        for i in range(100):
            store.hit(f"k{i}", 0.0, 60, 10)
        assert len(store) == 100
        store.hit("late", 61.0, 60, 10)
        assert len(store) == 1

    def test_max_keys(self) -> None:
        store = InMemoryCounterStore(max_keys=10)
        for i in range(100):
            store.add_distinct(f"k{i}", "m", 0.0, 60, 10)
        assert len(store) == 10
        with pytest.raises(RuleError):
            InMemoryCounterStore(max_keys=0)

    def test_clock_stepping_back_does_not_fail(self) -> None:
        store = InMemoryCounterStore()
        store.hit("k", 100.0, 60, 10)
        assert store.hit("k", 50.0, 60, 10) == 2
        assert store.add_distinct("d", "a", 100.0, 60, 10) == 1
        assert store.add_distinct("d", "b", 50.0, 60, 10) == 2

    def test_threads(self) -> None:
        store = InMemoryCounterStore(max_keys=100)

        def work(n: int) -> None:
            for i in range(2000):
                store.hit(f"k{i % 150}", float(i), 60, 50)
                store.add_distinct(f"d{i % 150}", f"m{n}", float(i), 60, 50)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(store) <= 100


class TestRateLimits:
    def test_per_sender(self) -> None:
        rule = RateLimitRule(LimitKind.SENDER, 3, InMemoryCounterStore())
        results = [rule.evaluate(at(i)) for i in range(5)]
        assert results[:3] == [None, None, None]
        assert results[3] is not None and results[4] is not None
        assert results[3].action is Action.QUARANTINE
        assert results[3].detail == "rate limit: more than 3 stanzas a minute from this sender"
        # Other senders are counted apart; the window moves on.
        assert rule.evaluate(at(5, sender="other@remote.example")) is None
        assert rule.evaluate(at(70)) is None
        assert rule.rule_id == "limit-sender"

    def test_per_domain(self) -> None:
        rule = RateLimitRule(LimitKind.DOMAIN, 2, InMemoryCounterStore(), action=Action.REJECT)
        senders = ["a@Remote.example", "b@remote.example", "c@remote.example"]
        results = [rule.evaluate(at(i, sender=s)) for i, s in enumerate(senders)]
        assert results[2] is not None
        assert results[2].action is Action.REJECT
        assert results[2].detail == "rate limit: more than 2 stanzas a minute from remote.example"
        assert rule.evaluate(at(3, sender="x@corp.example")) is None  # local: no domain

    def test_per_domain_outbound(self) -> None:
        rule = RateLimitRule(
            LimitKind.DOMAIN, 1, InMemoryCounterStore(), directions=[Direction.OUTBOUND]
        )
        out = {"direction": Direction.OUTBOUND, "sender": "bob@corp.example"}
        assert rule.evaluate(at(0, recipient="a@far.example", **out)) is None
        result = rule.evaluate(at(1, recipient="b@far.example", **out))
        assert result is not None and result.detail.endswith("to far.example")
        assert rule.evaluate(at(2)) is None  # inbound not counted here

    def test_new_recipients(self) -> None:
        store = InMemoryTrustStore()
        store.set_roster(
            "known@corp.example", [RosterItem("mallory@remote.example", Subscription.BOTH)]
        )
        rule = RateLimitRule(
            LimitKind.NEW_RECIPIENTS, 2, InMemoryCounterStore(), trust=TrustResolver(store)
        )
        assert rule.evaluate(at(0, recipient="a@corp.example")) is None
        assert rule.evaluate(at(1, recipient="a@corp.example")) is None  # same recipient
        assert rule.evaluate(at(2, recipient="known@corp.example")) is None  # knows the sender
        assert rule.evaluate(at(3, recipient="b@corp.example")) is None
        result = rule.evaluate(at(4, recipient="c@corp.example"))
        assert result is not None
        assert (
            result.detail == "fan-out limit: more than 2 new recipients a minute from this sender"
        )

    def test_contacts_are_exempt_unless_configured(self) -> None:
        counters = InMemoryCounterStore()
        rule = RateLimitRule(LimitKind.SENDER, 1, counters)
        friendly = {"sender_in_recipient_roster": True}
        assert [rule.evaluate(at(i, **friendly)) for i in range(3)] == [None, None, None]
        strict = RateLimitRule(LimitKind.SENDER, 1, counters, exempt_contacts=False)
        assert strict.evaluate(at(3, **friendly)) is None
        assert strict.evaluate(at(4, **friendly)) is not None

    @pytest.mark.parametrize(
        "overrides",
        [
            {"stanza_type": "groupchat"},
            {"kind": StanzaKind.MUC_JOIN},
            {"direction": Direction.OUTBOUND},
        ],
    )
    def test_not_counted(self, overrides: dict[str, Any]) -> None:
        rule = RateLimitRule(LimitKind.SENDER, 1, InMemoryCounterStore())
        assert [rule.evaluate(at(i, **overrides)) for i in range(3)] == [None, None, None]

    @pytest.mark.parametrize(
        "kind", [StanzaKind.SUBSCRIPTION, StanzaKind.MUC_INVITE, StanzaKind.CALL]
    )
    def test_subscriptions_invites_and_calls_count(self, kind: StanzaKind) -> None:
        rule = RateLimitRule(LimitKind.SENDER, 1, InMemoryCounterStore())
        assert rule.evaluate(at(0, kind=kind)) is None
        assert rule.evaluate(at(1, kind=kind)) is not None

    def test_custom_window(self) -> None:
        rule = RateLimitRule(LimitKind.SENDER, 1, InMemoryCounterStore(), window=10)
        assert rule.evaluate(at(0)) is None
        result = rule.evaluate(at(5))
        assert result is not None and "in 10 s" in result.detail
        assert rule.evaluate(at(20)) is None

    def test_shared_store_counts_across_rules(self) -> None:
        # Two proxies (two chains) sharing one store see one burst.
        counters = InMemoryCounterStore()
        first = RateLimitRule(LimitKind.SENDER, 2, counters)
        second = RateLimitRule(LimitKind.SENDER, 2, counters)
        assert first.evaluate(at(0)) is None
        assert second.evaluate(at(1)) is None
        assert first.evaluate(at(2)) is not None

    @pytest.mark.parametrize(
        "kwargs", [{"limit": 0}, {"window": 0}, {"window": float("nan")}, {"action": Action.ALLOW}]
    )
    def test_bad_configuration(self, kwargs: dict[str, Any]) -> None:
        args: dict[str, Any] = {"limit": 1, **kwargs}
        limit = args.pop("limit")
        with pytest.raises(RuleError):
            RateLimitRule(LimitKind.SENDER, limit, InMemoryCounterStore(), **args)

    def test_descriptions(self) -> None:
        for kind in LimitKind:
            assert "60 s" in RateLimitRule(kind, 5, InMemoryCounterStore()).description


class TestDuplicates:
    def test_normalise_body(self) -> None:
        assert normalise_body("  Call  ME at 555-0101\n now!! ") == "call me at 000-0000 now!!"
        assert body_digest("WIN 100$") == body_digest("win   999$")
        assert body_digest("win") != body_digest("lose")
        assert body_digest(" \n ") is None

    def test_same_body_to_many_recipients_from_one_sender(self) -> None:
        rule = DuplicateRule(InMemoryCounterStore(), recipients=3)
        bodies = ["Cheap pills 50% off", "CHEAP pills 70% off", "cheap  pills 10% off"]
        results = [
            rule.evaluate(at(i, recipient=f"u{i}@corp.example", body=body))
            for i, body in enumerate(bodies)
        ]
        assert results[:2] == [None, None]
        assert results[2] is not None
        assert results[2].action is Action.QUARANTINE
        assert (
            results[2].detail == "the same text went to 3 recipients within 300 s from this sender"
        )
        assert rule.rule_id == "duplicate-body"

    def test_same_body_from_one_domain(self) -> None:
        rule = DuplicateRule(InMemoryCounterStore(), recipients=2, action=Action.FLAG)
        assert rule.evaluate(at(0, sender="a@bots.example", recipient="u1@corp.example")) is None
        result = rule.evaluate(at(1, sender="b@bots.example", recipient="u2@corp.example"))
        assert result is not None
        assert result.action is Action.FLAG
        assert result.detail.endswith("from bots.example")

    def test_same_recipient_twice_is_one(self) -> None:
        rule = DuplicateRule(InMemoryCounterStore(), recipients=2)
        assert rule.evaluate(at(0)) is None
        assert rule.evaluate(at(1)) is None

    def test_window(self) -> None:
        rule = DuplicateRule(InMemoryCounterStore(), recipients=2, window=60)
        assert rule.evaluate(at(0, recipient="u1@corp.example")) is None
        assert rule.evaluate(at(61, recipient="u2@corp.example")) is None
        assert rule.evaluate(at(62, recipient="u3@corp.example")) is not None

    @pytest.mark.parametrize(
        "overrides",
        [
            {"encryption": "omemo"},
            {"body": None},
            {"body": "   "},
            {"stanza_type": "groupchat"},
            {"sender_in_recipient_roster": True},
            {"direction": Direction.OUTBOUND},
        ],
    )
    def test_not_counted(self, overrides: dict[str, Any]) -> None:
        rule = DuplicateRule(InMemoryCounterStore(), recipients=2)
        results = [
            rule.evaluate(at(i, recipient=f"u{i}@corp.example", **overrides)) for i in range(3)
        ]
        assert results == [None, None, None]

    def test_subscription_status_texts_count(self) -> None:
        rule = DuplicateRule(InMemoryCounterStore(), recipients=2)
        sub = {"kind": StanzaKind.SUBSCRIPTION, "body": "add me for free crypto"}
        assert rule.evaluate(at(0, recipient="u1@corp.example", **sub)) is None
        assert rule.evaluate(at(1, recipient="u2@corp.example", **sub)) is not None

    @pytest.mark.parametrize(
        "kwargs", [{"recipients": 1}, {"window": -1}, {"action": Action.ALLOW}]
    )
    def test_bad_configuration(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(RuleError):
            DuplicateRule(InMemoryCounterStore(), **kwargs)

    def test_huge_body(self) -> None:
        rule = DuplicateRule(InMemoryCounterStore(), recipients=2)
        assert rule.evaluate(at(0, body="x" * 5_000_000)) is None


def test_timestamps_before_1970_and_far_future() -> None:
    rule = RateLimitRule(LimitKind.SENDER, 1, InMemoryCounterStore())
    old = datetime(1900, 1, 1, tzinfo=T0.tzinfo)
    assert rule.evaluate(make_ctx(timestamp=old)) is None
    assert rule.evaluate(make_ctx(timestamp=datetime(9999, 1, 1, tzinfo=T0.tzinfo))) is None
