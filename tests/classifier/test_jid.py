from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from classifier.jid import BareJid, domain_of, normalise_bare, normalise_domain, split_jid


@pytest.mark.parametrize(
    ("jid", "parts"),
    [
        ("alice@corp.example/phone", ("alice", "corp.example", "phone")),
        ("alice@corp.example", ("alice", "corp.example", None)),
        ("corp.example", (None, "corp.example", None)),
        ("corp.example/res@with/slash", (None, "corp.example", "res@with/slash")),
        ("room@conf.example/nick@home", ("room", "conf.example", "nick@home")),
        ("", (None, "", None)),
    ],
)
def test_split_jid(jid: str, parts: tuple[str | None, str, str | None]) -> None:
    assert split_jid(jid) == parts


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Corp.Example", "corp.example"),
        ("corp.example.", "corp.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("bücher\u3002example", "xn--bcher-kva.example"),  # ideographic full stop
        ("faß.example", "xn--fa-hia.example"),  # IDNA 2008: ß is not mapped to ss
        ("u\u0308ber.example", "xn--ber-goa.example"),  # NFC before encoding
    ],
)
def test_normalise_domain(raw: str, normal: str) -> None:
    assert normalise_domain(raw) == normal


def test_normalise_bare_case_folds_and_drops_resource() -> None:
    assert normalise_bare("Alice@Corp.Example/Phone") == BareJid("alice", "corp.example")
    assert str(normalise_bare("Corp.Example")) == "corp.example"
    assert domain_of("x@EVIL.example/r") == "evil.example"


def test_long_inputs_are_not_cached_but_work() -> None:
    long = "a" * 5000 + ".example"
    assert normalise_domain(long.upper()) == long


@given(st.text())
def test_normalisation_never_raises(text: str) -> None:
    normalise_domain(text)
    normalise_bare(text)


@given(st.from_regex(r"[A-Za-zäöüßÄÖÜ0-9-]{1,12}(\.[A-Za-zäöü0-9-]{1,12}){0,3}", fullmatch=True))
def test_normalisation_is_idempotent_on_domains(domain: str) -> None:
    once = normalise_domain(domain)
    assert normalise_domain(once) == once
    assert once.isascii()


def test_lone_surrogate_does_not_raise() -> None:
    assert normalise_domain("\ud800.example").endswith(".example")
