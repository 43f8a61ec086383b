from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given

from classifier.context import DecisionContext, Direction, StanzaKind
from tests.classifier.helpers import contexts, make_ctx


def test_local_domains_are_normalised() -> None:
    ctx = make_ctx(local_domains=frozenset({"Corp.Example.", "BÜCHER.example"}))
    assert ctx.local_domains == frozenset({"corp.example", "xn--bcher-kva.example"})


def test_naive_timestamp_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_ctx(timestamp=datetime(2026, 1, 1))


def test_is_remote_and_is_local() -> None:
    ctx = make_ctx()
    assert ctx.is_local("bob@corp.example/phone")
    assert ctx.is_local("CORP.example")
    assert ctx.is_remote("mallory@remote.example")
    # Subdomains of a local domain are not implied to be local.
    assert ctx.is_remote("x@sub.corp.example")


def test_has_url() -> None:
    assert not make_ctx().has_url
    assert make_ctx(urls=("https://x.example/",)).has_url


def test_inbound_message() -> None:
    ctx = make_ctx()
    assert ctx.local_party == "bob@corp.example"
    assert ctx.remote_domains == ("remote.example",)
    assert ctx.remote_domain == "remote.example"
    assert ctx.sender_domain == "remote.example"
    assert ctx.recipient_domain == "corp.example"
    assert ctx.room_domain is None


def test_outbound_message() -> None:
    ctx = make_ctx(
        direction=Direction.OUTBOUND,
        sender="Alice@corp.example",
        recipient="carol@Partner.Example",
    )
    assert ctx.local_party == "alice@corp.example"
    assert ctx.remote_domains == ("partner.example",)
    assert ctx.remote_domain == "partner.example"


def test_local_traffic_has_no_remote_domain() -> None:
    ctx = make_ctx(sender="alice@corp.example")
    assert ctx.remote_domains == ()
    assert ctx.remote_domain is None


def test_outbound_muc_join_puts_the_room_first() -> None:
    ctx = make_ctx(
        kind=StanzaKind.MUC_JOIN,
        direction=Direction.OUTBOUND,
        sender="alice@corp.example",
        recipient="room@conference.partner.example",
        recipient_full="room@conference.partner.example/alice",
        room="room@conference.partner.example",
    )
    assert ctx.remote_domain == "conference.partner.example"
    assert ctx.remote_domains == ("conference.partner.example",)


def test_direct_invite_involves_inviter_and_room() -> None:
    ctx = make_ctx(
        kind=StanzaKind.MUC_INVITE,
        sender="carol@partner.example",
        room="room@conference.evil.example",
    )
    assert ctx.remote_domains == ("conference.evil.example", "partner.example")
    assert ctx.remote_domain == "conference.evil.example"


def test_local_party_falls_back_when_direction_is_confused() -> None:
    ctx = make_ctx(direction=Direction.OUTBOUND)  # sender is remote, recipient local
    assert ctx.local_party == "bob@corp.example"
    assert make_ctx(recipient="x@elsewhere.example").local_party is None


def test_context_is_frozen() -> None:
    ctx = make_ctx()
    with pytest.raises(AttributeError):
        ctx.body = "changed"  # type: ignore[misc]


@given(contexts)
def test_properties_never_raise(ctx: DecisionContext) -> None:
    assert isinstance(ctx.remote_domains, tuple)
    assert ctx.remote_domain is None or ctx.remote_domain in ctx.remote_domains
    assert ctx.local_party is None or ctx.is_local(ctx.local_party)
    _ = ctx.has_url, ctx.room_domain, ctx.sender_domain, ctx.recipient_domain
