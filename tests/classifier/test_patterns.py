from __future__ import annotations

import pytest

from classifier.errors import RuleError
from classifier.patterns import DomainMatcher, UserGroup, parse_domain_pattern, parse_member_pattern


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Example.COM", "example.com"),
        (" example.com. ", "example.com"),
        ("*.Example.com", "*.example.com"),
        ("*", "*"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("_xmpp.example", "_xmpp.example"),
        ("192.0.2.1", "192.0.2.1"),
    ],
)
def test_parse_domain_pattern(raw: str, normal: str) -> None:
    assert parse_domain_pattern(raw) == normal


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "empty"),
        ("*.", "empty"),
        ("evil*.com", "only 'domain', '*.domain'"),
        ("*example.com", "only 'domain', '*.domain'"),
        ("a.*.example", "only 'domain', '*.domain'"),
        ("ex?mple.com", "only 'domain', '*.domain'"),
        ("user@example.com", "looks like a JID"),
        ("example.com/res", "looks like a JID"),
        ("a..example", "bad label ''"),
        ("exa mple.com", "bad label"),
        ("a" * 64 + ".example", "bad label"),
        ("a." * 130 + "example", "longer than 253"),
        ("[::1]", "only 'domain', '*.domain'"),
    ],
)
def test_parse_domain_pattern_rejects(raw: str, message: str) -> None:
    with pytest.raises(RuleError, match=message.replace("*", r"\*").replace("?", r"\?")):
        parse_domain_pattern(raw)


def test_error_messages_are_cut_short() -> None:
    with pytest.raises(RuleError) as info:
        parse_domain_pattern("x y" * 10_000)
    assert len(str(info.value)) < 300


class TestDomainMatcher:
    matcher = DomainMatcher(["evil.example", "*.spam.example", "*.evil.example"])

    @pytest.mark.parametrize(
        ("domain", "pattern"),
        [
            ("evil.example", "evil.example"),
            ("EVIL.Example.", "evil.example"),
            ("chat.evil.example", "*.evil.example"),
            ("a.b.c.spam.example", "*.spam.example"),
            ("spam.example", None),  # '*.x' does not cover x itself
            ("notevil.example", None),
            ("evil.example.org", None),
            ("example", None),
            ("", None),
        ],
    )
    def test_match(self, domain: str, pattern: str | None) -> None:
        assert self.matcher.match(domain) == pattern

    def test_exact_entry_is_reported_before_wildcard(self) -> None:
        matcher = DomainMatcher(["*.example", "a.example"])
        assert matcher.match("a.example") == "a.example"
        assert matcher.match("b.example") == "*.example"

    def test_star_matches_everything(self) -> None:
        matcher = DomainMatcher(["*"])
        assert matcher.match("anything.example") == "*"
        assert matcher.match("") == "*"

    def test_unicode_and_a_label_spellings_match_each_other(self) -> None:
        assert DomainMatcher(["bücher.example"]).match("xn--bcher-kva.example")
        assert DomainMatcher(["xn--bcher-kva.example"]).match("BÜCHER.example")

    def test_patterns_are_canonical(self) -> None:
        matcher = DomainMatcher(["B.example", "*.a.example", "b.example", "*"])
        assert matcher.patterns == ("*", "*.a.example", "b.example")
        assert len(matcher) == 3

    def test_large_list(self) -> None:
        matcher = DomainMatcher(f"d{i}.example" for i in range(50_000))
        assert matcher.match("d49999.example") == "d49999.example"
        assert matcher.match("x.d1.example") is None


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Alice@Corp.Example", "alice@corp.example"),
        ("*@Traders.Corp.Example", "*@traders.corp.example"),
        ("Straße@corp.example", "strasse@corp.example"),  # localparts are case-folded
    ],
)
def test_parse_member_pattern(raw: str, normal: str) -> None:
    assert parse_member_pattern(raw) == normal


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("corp.example", "must be 'user@domain'"),
        ("alice@corp.example/phone", "without a '/resource'"),
        ("@corp.example", "not a valid localpart"),
        ("a b@corp.example", "not a valid localpart"),
        ("a*@corp.example", "wildcards are only supported"),
        ("*@*.corp.example", "wildcards are only supported"),
        ("x" * 1024 + "@corp.example", "longer than 1023 bytes"),
    ],
)
def test_parse_member_pattern_rejects(raw: str, message: str) -> None:
    with pytest.raises(RuleError, match=message):
        parse_member_pattern(raw)


def test_user_group_membership() -> None:
    group = UserGroup.of("traders", ["alice@corp.example", "*@traders.corp.example"])
    assert group.contains("alice@corp.example")
    assert group.contains("ALICE@corp.example/phone")
    assert group.contains("anyone@traders.corp.example")
    assert not group.contains("bob@corp.example")
    assert not group.contains("traders.corp.example")  # a server JID is not a user
    assert not group.contains("alice@evil.example")
    assert group.members == ("*@traders.corp.example", "alice@corp.example")
