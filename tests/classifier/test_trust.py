from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from classifier.context import Direction, StanzaKind
from classifier.errors import RuleError
from classifier.trust import (
    InMemoryTrustStore,
    RosterItem,
    StrangerRule,
    Subscription,
    TrustResolver,
    TrustStore,
    is_groupchat,
    owner_and_contact,
)
from classifier.verdict import Action
from tests.classifier.helpers import CLOCK, make_ctx
from tests.support.protocols import implements

NOW = CLOCK.now()
BOB = "bob@corp.example"


def store_with(*items: RosterItem, owner: str = BOB) -> InMemoryTrustStore:
    store = InMemoryTrustStore()
    store.set_roster(owner, items)
    return store


class TestRosterItem:
    @pytest.mark.parametrize(
        ("item", "trusted"),
        [
            (RosterItem("a@x.example", Subscription.BOTH), True),
            (RosterItem("a@x.example", Subscription.TO), True),
            (RosterItem("a@x.example", Subscription.FROM), True),
            (RosterItem("a@x.example", Subscription.NONE), False),
            (RosterItem("a@x.example", Subscription.NONE, ask=True), True),
            (RosterItem("a@x.example", Subscription.NONE, approved=True), True),
            (RosterItem("a@x.example", Subscription.REMOVE, ask=True), False),
        ],
    )
    def test_trusted(self, item: RosterItem, trusted: bool) -> None:
        assert item.trusted is trusted


class TestInMemoryTrustStore:
    def test_is_a_trust_store(self) -> None:
        assert implements(InMemoryTrustStore(), TrustStore)

    def test_unknown_owner(self) -> None:
        assert InMemoryTrustStore().knows(BOB, "a@x.example", NOW) is None

    def test_complete_roster(self) -> None:
        store = store_with(
            RosterItem("Alice@X.example", Subscription.BOTH),
            RosterItem("declined@x.example", Subscription.NONE),
        )
        assert store.knows("BOB@corp.example/phone", "alice@x.example/res", NOW) is True
        assert store.knows(BOB, "declined@x.example", NOW) is False
        assert store.knows(BOB, "stranger@x.example", NOW) is False
        assert len(store) == 1

    def test_set_roster_replaces(self) -> None:
        store = store_with(RosterItem("a@x.example", Subscription.BOTH))
        store.set_roster(BOB, [RosterItem("b@x.example", Subscription.TO)])
        assert store.knows(BOB, "a@x.example", NOW) is False
        assert store.knows(BOB, "b@x.example", NOW) is True

    def test_pushes(self) -> None:
        store = InMemoryTrustStore()
        store.update_roster(BOB, RosterItem("a@x.example", Subscription.BOTH))
        # A push alone does not tell the whole roster: others stay unknown.
        assert store.knows(BOB, "a@x.example", NOW) is True
        assert store.knows(BOB, "b@x.example", NOW) is None
        store.set_roster(BOB, [RosterItem("a@x.example", Subscription.BOTH)])
        store.update_roster(BOB, RosterItem("a@x.example", Subscription.REMOVE))
        assert store.knows(BOB, "a@x.example", NOW) is False
        store.update_roster(BOB, RosterItem("c@x.example", Subscription.NONE, ask=True))
        assert store.knows(BOB, "c@x.example", NOW) is True

    def test_domain_item_vouches_for_its_users(self) -> None:
        store = store_with(RosterItem("gateway.example", Subscription.BOTH))
        assert store.knows(BOB, "anyone@gateway.example", NOW) is True
        assert store.knows(BOB, "anyone@other.example", NOW) is False

    def test_correspondents_expire(self) -> None:
        store = InMemoryTrustStore(correspondent_ttl=timedelta(days=1))
        store.set_roster(BOB, [])
        store.note_correspondent(BOB, "pen.pal@x.example", NOW)
        assert store.knows(BOB, "Pen.Pal@x.example", NOW + timedelta(hours=23)) is True
        assert store.knows(BOB, "pen.pal@x.example", NOW + timedelta(days=2)) is False
        # Clock stepped back: still a correspondent.
        assert store.knows(BOB, "pen.pal@x.example", NOW - timedelta(hours=1)) is True

    def test_forget(self) -> None:
        store = store_with(RosterItem("a@x.example", Subscription.BOTH))
        store.forget("Bob@corp.example")
        assert store.knows(BOB, "a@x.example", NOW) is None

    def test_owner_limit_evicts_least_recently_used(self) -> None:
        store = InMemoryTrustStore(max_owners=2)
        for owner in ("a@corp.example", "b@corp.example"):
            store.set_roster(owner, [])
        store.knows("a@corp.example", "x@y.example", NOW)  # a is now the most recent
        store.set_roster("c@corp.example", [])
        assert len(store) == 2
        assert store.knows("b@corp.example", "x@y.example", NOW) is None
        assert store.knows("a@corp.example", "x@y.example", NOW) is False

    def test_roster_limit_makes_the_roster_incomplete(self) -> None:
        store = InMemoryTrustStore(max_roster_items=2)
        store.set_roster(BOB, [RosterItem(f"u{i}@x.example", Subscription.BOTH) for i in range(3)])
        assert store.knows(BOB, "u0@x.example", NOW) is True
        assert store.knows(BOB, "u2@x.example", NOW) is None  # not "stranger": unknown
        store.set_roster(BOB, [RosterItem("u0@x.example", Subscription.BOTH)])
        store.update_roster(BOB, RosterItem("u1@x.example", Subscription.BOTH))
        store.update_roster(BOB, RosterItem("u2@x.example", Subscription.BOTH))
        assert store.knows(BOB, "u3@x.example", NOW) is None

    def test_correspondent_limit(self) -> None:
        store = InMemoryTrustStore(max_correspondents=2)
        store.set_roster(BOB, [])
        for name in ("a", "b", "c"):
            store.note_correspondent(BOB, f"{name}@x.example", NOW)
        assert store.knows(BOB, "a@x.example", NOW) is False
        assert store.knows(BOB, "c@x.example", NOW) is True

    @pytest.mark.parametrize(
        "kwargs",
        [{"max_owners": 0}, {"max_roster_items": 0}, {"correspondent_ttl": timedelta(0)}],
    )
    def test_bad_limits(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(RuleError):
            InMemoryTrustStore(**kwargs)  # type: ignore[arg-type]

    def test_threads(self) -> None:
        store = InMemoryTrustStore(max_owners=50)

        def work(n: int) -> None:
            for i in range(300):
                owner = f"u{(n * 7 + i) % 80}@corp.example"
                store.update_roster(owner, RosterItem(f"c{i}@x.example", Subscription.BOTH))
                store.note_correspondent(owner, f"d{i}@x.example", NOW)
                store.knows(owner, f"c{i}@x.example", NOW)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(store) <= 50


class TestResolver:
    def test_context_wins_over_the_store(self) -> None:
        store = store_with(RosterItem("mallory@remote.example", Subscription.BOTH))
        resolver = TrustResolver(store)
        assert resolver.known(make_ctx()) is True
        assert resolver.known(make_ctx(sender_in_recipient_roster=False)) is False
        assert TrustResolver().known(make_ctx()) is None
        assert TrustResolver().known(make_ctx(sender_in_recipient_roster=True)) is True

    def test_outbound_asks_the_senders_roster(self) -> None:
        store = store_with(RosterItem("partner@remote.example", Subscription.BOTH))
        resolver = TrustResolver(store)
        out = make_ctx(direction=Direction.OUTBOUND, sender=BOB, recipient="partner@remote.example")
        assert resolver.known(out) is True
        assert owner_and_contact(out) == (BOB, "partner@remote.example")
        # The remote recipient's roster is never visible, whatever the context says.
        other = make_ctx(
            direction=Direction.OUTBOUND,
            sender=BOB,
            recipient="other@remote.example",
            sender_in_recipient_roster=True,
        )
        assert resolver.known(other) is False

    def test_self_is_known(self) -> None:
        assert TrustResolver().known(make_ctx(sender=BOB, recipient="Bob@corp.example")) is True

    def test_strangers(self) -> None:
        store = store_with(RosterItem("friend@remote.example", Subscription.BOTH))
        resolver = TrustResolver(store)
        assert resolver.is_stranger(make_ctx()) is True
        assert resolver.is_stranger(make_ctx(sender="friend@remote.example")) is False
        # Local senders, rooms, outbound stanzas and joins are never strangers.
        assert resolver.is_stranger(make_ctx(sender="eve@corp.example")) is False
        assert resolver.is_stranger(make_ctx(stanza_type="groupchat")) is False
        assert resolver.is_stranger(make_ctx(direction=Direction.OUTBOUND)) is False
        assert resolver.is_stranger(make_ctx(kind=StanzaKind.MUC_JOIN)) is False

    def test_one_answer_per_stanza(self) -> None:
        store = store_with()
        resolver = TrustResolver(store)
        first = make_ctx()
        assert resolver.known(first) is False
        store.update_roster(BOB, RosterItem("mallory@remote.example", Subscription.BOTH))
        # The rules judging the same stanza keep seeing one answer; the next stanza asks.
        assert resolver.known(first) is False
        assert resolver.known(make_ctx()) is True

    def test_unknown_relationship(self) -> None:
        assert TrustResolver().is_stranger(make_ctx()) is False
        assert TrustResolver(unknown_is_stranger=True).is_stranger(make_ctx()) is True


def test_is_groupchat() -> None:
    assert is_groupchat(make_ctx(stanza_type="groupchat"))
    assert is_groupchat(make_ctx(room="r@conference.remote.example", stanza_type=None))
    assert not is_groupchat(make_ctx(room="r@conference.remote.example", stanza_type="chat"))
    assert not is_groupchat(make_ctx(kind=StanzaKind.MUC_INVITE, room="r@c.example"))
    assert not is_groupchat(make_ctx())


class TestStrangerRule:
    rule = StrangerRule(TrustResolver())
    url = ("https://spam.example/x",)

    def test_stranger_with_url_is_quarantined(self) -> None:
        result = self.rule.evaluate(make_ctx(urls=self.url, sender_in_recipient_roster=False))
        assert result is not None
        assert result.action is Action.QUARANTINE
        assert "first contact carrying a URL" in result.detail
        assert self.rule.rule_id == "stranger"

    @pytest.mark.parametrize(
        "overrides",
        [
            {"sender_in_recipient_roster": False},  # no URL
            {"urls": url, "sender_in_recipient_roster": True},  # a contact
            {"urls": url},  # relationship unknown
            {"urls": url, "sender_in_recipient_roster": False, "kind": StanzaKind.MUC_JOIN},
            {"urls": url, "sender_in_recipient_roster": False, "stanza_type": "groupchat"},
        ],
    )
    def test_no_result(self, overrides: dict[str, object]) -> None:
        assert self.rule.evaluate(make_ctx(**overrides)) is None

    @pytest.mark.parametrize("kind", [StanzaKind.SUBSCRIPTION, StanzaKind.MUC_INVITE])
    def test_subscriptions_and_invitations_count(self, kind: StanzaKind) -> None:
        ctx = make_ctx(kind=kind, urls=self.url, sender_in_recipient_roster=False)
        assert self.rule.evaluate(ctx) is not None

    def test_configurable_action(self) -> None:
        ctx = make_ctx(urls=self.url, sender_in_recipient_roster=False)
        reject = StrangerRule(TrustResolver(), url_action=Action.REJECT).evaluate(ctx)
        assert reject is not None and reject.action is Action.REJECT
        assert StrangerRule(TrustResolver(), url_action=Action.ALLOW).evaluate(ctx) is None

    def test_uses_the_store(self) -> None:
        rule = StrangerRule(TrustResolver(store_with()))
        assert rule.evaluate(make_ctx(urls=self.url)) is not None
