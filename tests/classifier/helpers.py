"""Builders and Hypothesis strategies shared by the classifier tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from classifier.clock import ManualClock
from classifier.context import DecisionContext, Direction, StanzaKind

LOCAL = frozenset({"corp.example", "traders.corp.example", "conference.corp.example"})
CLOCK = ManualClock()


def make_ctx(**overrides: Any) -> DecisionContext:
    """An inbound chat message from a remote stranger to bob, unless overridden."""
    fields: dict[str, Any] = {
        "kind": StanzaKind.MESSAGE,
        "direction": Direction.INBOUND,
        "sender": "mallory@remote.example",
        "recipient": "bob@corp.example",
        "timestamp": CLOCK.now(),
        "local_domains": LOCAL,
        "stanza_type": "chat",
        "body": "hello",
    }
    fields.update(overrides)
    return DecisionContext(**fields)


_label = st.from_regex(r"[a-z0-9-]{1,10}", fullmatch=True)
_plain_domain = st.builds(lambda ls: ".".join(ls), st.lists(_label, min_size=1, max_size=4))
# Domains as they may arrive on the wire: plausible ones, local ones, and arbitrary junk.
domains = st.one_of(
    _plain_domain,
    st.sampled_from(sorted(LOCAL)),
    st.sampled_from(["Evil.Example", "bücher.example", "EVIL.example.", "xn--bcher-kva.example"]),
    st.text(max_size=30),
)
jids = st.one_of(
    st.builds(lambda local, domain: f"{local}@{domain}", st.text(max_size=10), domains),
    st.builds(
        lambda local, domain, res: f"{local}@{domain}/{res}",
        st.text(max_size=10),
        domains,
        st.text(max_size=10),
    ),
    domains,
    st.text(max_size=40),
)
contexts = st.builds(
    DecisionContext,
    kind=st.sampled_from(StanzaKind),
    direction=st.sampled_from(Direction),
    sender=jids,
    recipient=jids,
    timestamp=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    local_domains=st.frozensets(domains, max_size=4) | st.just(LOCAL),
    sender_full=st.none() | jids,
    recipient_full=st.none() | jids,
    stanza_type=st.none() | st.sampled_from(["chat", "normal", "groupchat", "error", "x"]),
    body=st.none() | st.text(max_size=200),
    urls=st.lists(st.text(max_size=40), max_size=3).map(tuple),
    encryption=st.none() | st.sampled_from(["omemo", "openpgp", "otr"]),
    room=st.none() | jids,
    sender_in_recipient_roster=st.none() | st.booleans(),
)
