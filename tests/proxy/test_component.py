"""The component's edge without a server: what a forward is believed to be, and the decider.

`read_forward` is where slixmpp's parsed elements become our `ForwardedCopy`; everything a
hostile user or a broken server could put there must come out as a `Refused`, never as a copy.
The end-to-end tests with a real Prosody are in tests/stanzaguard/test_component_e2e.py.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from archive_api.store.records import Direction
from classifier.context import DecisionContext, StanzaKind
from classifier.context import Direction as DecisionDirection
from classifier.policy import PolicyHolder, policy_from_dict
from classifier.verdict import Action
from proxy.component import (
    CLIENT_NS,
    ForwardedCopy,
    ObserveOnlyDecider,
    Refused,
    as_client_stanza,
    read_forward,
)
from proxy.stanza import Anomaly, MessageEvent, SubscriptionEvent, dedupe_key, normalise

SERVER = frozenset({"corp.example"})
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LIMIT = 64 * 1024
INNER = (
    "<message xmlns='jabber:client' from='alice@corp.example/laptop' to='bob@corp.example' "
    "type='chat' id='m-1'><body>quarterly numbers</body></message>"
)


def forward(inner: str = INNER, sender: str = "corp.example", extra: str = "") -> ET.Element:
    """The outer message as slixmpp's component stream parses it."""
    return ET.fromstring(
        f"<message xmlns='jabber:component:accept' from='{sender}' to='archive.corp.example'>"
        f"<forwarded xmlns='urn:xmpp:forward:0'>{inner}</forwarded>{extra}</message>"
    )


def read(element: ET.Element, limit: int = LIMIT) -> ForwardedCopy:
    copy = read_forward(element, SERVER, limit)
    assert isinstance(copy, ForwardedCopy), copy
    return copy


def refused(element: ET.Element, limit: int = LIMIT) -> str:
    result = read_forward(element, SERVER, limit)
    assert isinstance(result, Refused), result
    return result.outcome


def test_a_servers_forward_becomes_a_client_stanza_copy() -> None:
    copy = read(forward())
    assert (copy.forwarder, copy.name) == ("corp.example", "message")
    assert copy.attrs["from"] == "alice@corp.example/laptop"
    tree = copy.element().tree()
    assert tree.tag == f"{{{CLIENT_NS}}}message"
    assert tree.findtext(f"{{{CLIENT_NS}}}body") == "quarterly numbers"


@pytest.mark.parametrize("namespace", ["jabber:server", "jabber:component:accept"])
def test_other_stream_namespaces_are_read_as_client_stanzas(namespace: str) -> None:
    inner = INNER.replace("jabber:client", namespace)
    tree = read(forward(inner)).element().tree()
    assert tree.tag == f"{{{CLIENT_NS}}}message"
    assert tree.findtext(f"{{{CLIENT_NS}}}body") == "quarterly numbers"


def test_payload_namespaces_are_kept() -> None:
    inner = INNER.replace("</message>", "<origin-id xmlns='urn:xmpp:sid:0' id='o-1'/></message>")
    tree = read(forward(inner)).element().tree()
    assert tree.find("{urn:xmpp:sid:0}origin-id") is not None


def test_the_copy_has_the_record_id_the_inline_proxy_gives_the_same_message() -> None:
    """Why one message is one record when both modes see it."""
    copy = read(forward())
    as_copy = normalise(
        copy.element().tree(),
        copy.data,
        direction=Direction.COPY,
        session_jid=None,
        client_address="component",
        now=NOW,
    )
    # What alice's client sent through the inline proxy (no `from`: the server stamps it).
    sent = INNER.replace(" from='alice@corp.example/laptop'", "").encode()
    inline = normalise(
        ET.fromstring(sent),
        sent,
        direction=Direction.FROM_CLIENT,
        session_jid="alice@corp.example/laptop",
        client_address="192.0.2.1",
        now=NOW,
    )
    assert isinstance(as_copy, MessageEvent) and isinstance(inline, MessageEvent)
    assert as_copy.leg is Direction.COPY and as_copy.sender == "alice@corp.example"
    assert dedupe_key(as_copy) == dedupe_key(inline)


def test_a_forwarded_subscription_request_is_a_subscription_event() -> None:
    inner = (
        "<presence xmlns='jabber:client' from='eve@elsewhere.example' to='bob@corp.example' "
        "type='subscribe'/>"
    )
    copy = read(forward(inner))
    assert copy.name == "presence" and copy.attrs["type"] == "subscribe"
    event = normalise(
        copy.element().tree(),
        copy.data,
        direction=Direction.COPY,
        session_jid=None,
        client_address=None,
        now=NOW,
    )
    assert isinstance(event, SubscriptionEvent)
    assert (event.sender, event.recipient) == ("eve@elsewhere.example", "bob@corp.example")


@pytest.mark.parametrize(
    "sender",
    [
        "alice@corp.example/laptop",  # a user's own <forwarded/>: the server stamps her JID
        "alice@corp.example",
        "corp.example/resource",
        "elsewhere.example",  # another server (s2s) is not ours
        "archive.corp.example",
        "",
        "not a jid@@",
        "x" * 5000,
    ],
)
def test_forwards_not_from_the_server_itself_are_refused(sender: str) -> None:
    assert refused(forward(sender=sender)) == "forged"


def test_a_forward_without_from_is_refused() -> None:
    element = forward()
    del element.attrib["from"]
    assert refused(element) == "forged"


@pytest.mark.parametrize(
    ("inner", "extra"),
    [
        ("", ""),  # nothing forwarded
        ("just text", ""),
        (INNER + INNER, ""),  # two stanzas in one wrapper
        ("<foo xmlns='jabber:client'/>", ""),  # not a stanza
        ("<message xmlns='urn:example:other'/>", ""),  # not a stanza namespace
        (INNER, "<forwarded xmlns='urn:xmpp:forward:0'>" + INNER + "</forwarded>"),
    ],
)
def test_malformed_forwards_are_refused(inner: str, extra: str) -> None:
    assert refused(forward(inner, extra=extra)) == "malformed"


def test_forwarded_iqs_are_ignored() -> None:
    # ejabberd's mod_service_log copies every stanza, iqs (pings, rosters) included.
    assert refused(forward("<iq xmlns='jabber:client' type='set' id='1'/>")) == "ignored"


CARBON = (
    "<message xmlns='jabber:client' {attrs}><received xmlns='urn:xmpp:carbons:2'>"
    "<forwarded xmlns='urn:xmpp:forward:0'>" + INNER + "</forwarded></received></message>"
)
MAM = (
    "<message xmlns='jabber:client' {attrs}><result xmlns='urn:xmpp:mam:2' id='a1'>"
    "<forwarded xmlns='urn:xmpp:forward:0'>" + INNER + "</forwarded></result></message>"
)


@pytest.mark.parametrize(
    "inner",
    [
        CARBON.format(attrs="from='bob@corp.example' to='bob@corp.example/phone'"),
        CARBON.format(attrs="to='bob@corp.example/phone'"),
        MAM.format(attrs="from='bob@corp.example' to='bob@corp.example/phone'"),
        MAM.format(attrs="from='desk@conference.corp.example' to='bob@corp.example/phone'"),
    ],
)
def test_the_servers_own_carbons_and_archive_results_are_history(inner: str) -> None:
    assert refused(forward(inner)) == "history"


@pytest.mark.parametrize(
    "inner",
    [
        CARBON.format(attrs="from='eve@elsewhere.example/x' to='bob@corp.example/phone'"),
        CARBON.format(attrs="from='eve@elsewhere.example' to='bob@corp.example/phone'"),
        MAM.format(attrs="from='eve@elsewhere.example/x' to='bob@corp.example/phone'"),
    ],
)
def test_forged_carbons_and_archive_results_are_kept_as_evidence(inner: str) -> None:
    copy = read(forward(inner))
    event = normalise(
        copy.element().tree(),
        copy.data,
        direction=Direction.COPY,
        session_jid=None,
        client_address=None,
        now=NOW,
    )
    assert isinstance(event, MessageEvent) and event.archivable
    assert event.anomalies & {Anomaly.FORGED_CARBON, Anomaly.FORGED_MAM}


def test_a_plain_message_is_not_a_forward() -> None:
    plain = ET.fromstring(
        "<message xmlns='jabber:component:accept' from='corp.example' to='archive.corp.example'>"
        "<body>hi</body></message>"
    )
    assert refused(plain) == "malformed"


def test_oversized_copies_are_refused() -> None:
    inner = INNER.replace("quarterly numbers", "x" * 5000)
    assert refused(forward(inner), limit=4096) == "oversized"
    assert read(forward(inner), limit=8192).name == "message"


def test_a_deeply_nested_or_odd_copy_still_round_trips() -> None:
    nested = "<a xmlns='urn:example:n'>" * 200 + "</a>" * 200
    odd = INNER.replace(
        "<body>quarterly numbers</body>",
        f"<body>&lt;script&gt; &amp; \u202e\U0001f600 ]]&gt;</body>{nested}",
    )
    copy = read(forward(odd))
    tree = copy.element().tree()
    assert tree.findtext(f"{{{CLIENT_NS}}}body") == "<script> & \u202e\U0001f600 ]]>"


def test_as_client_stanza_does_not_touch_the_original() -> None:
    original = forward()
    before = ET.tostring(original)
    as_client_stanza(original)
    assert ET.tostring(original) == before


# -- deciding without blocking ---------------------------------------------------------------------


def context(sender: str) -> DecisionContext:
    return DecisionContext(
        kind=StanzaKind.MESSAGE,
        direction=DecisionDirection.INBOUND,
        sender=sender,
        recipient="bob@corp.example",
        timestamp=NOW,
        local_domains=SERVER,
        stanza_type="chat",
        body="hello",
    )


def test_observe_only_turns_refusals_into_flags_and_keeps_the_rest() -> None:
    policy = PolicyHolder(
        policy_from_dict(
            {
                "version": 1,
                "local_domains": ["corp.example"],
                "federation": {"mode": "deny", "domains": ["spam.example"], "action": "reject"},
            }
        )
    )
    decider = ObserveOnlyDecider(policy)
    direct = policy.evaluate(context("eve@spam.example"))
    assert direct.action is Action.REJECT
    observed = decider.evaluate(context("eve@spam.example"))
    assert observed.action is Action.FLAG and observed.action.delivers
    assert observed.score == direct.score
    assert observed.reasons[: len(direct.reasons)] == direct.reasons
    assert "would be reject" in observed.reasons[-1].detail
    allowed = decider.evaluate(context("friend@partner.example"))
    assert allowed == policy.evaluate(context("friend@partner.example"))
    assert allowed.action is Action.ALLOW
