"""The listing rule of the published block list (classifier/listing.py)."""

from __future__ import annotations

import hashlib

import pytest

from classifier.errors import RuleError
from classifier.listing import (
    Decision,
    EntryKind,
    EntryState,
    ListingRule,
    Origin,
    ReviewMode,
    SenderEvidence,
    check_entry,
    item_ids,
    next_state,
    officer_state,
    want_domain,
    want_jid,
)

OWN = ("corp.example", "conference.corp.example")
RULE = ListingRule(own_domains=frozenset(OWN), jid_officer_spam=2, jid_report_weight=2.5)


def test_a_jid_is_wanted_after_enough_officer_confirmations() -> None:
    assert not want_jid(SenderEvidence(officer_spam=1), RULE).listed
    assert want_jid(SenderEvidence(officer_spam=2), RULE).listed


def test_a_jid_is_wanted_after_enough_weighted_reports() -> None:
    assert not want_jid(SenderEvidence(report_weight=2.4), RULE).listed
    wanted = want_jid(SenderEvidence(report_weight=2.5), RULE)
    assert wanted.listed
    assert "2.50" in wanted.reason


def test_an_officer_clearing_wins_over_every_report_and_confirmation() -> None:
    evidence = SenderEvidence(officer_spam=5, report_weight=50.0, cleared=True)
    assert not want_jid(evidence, RULE).listed


def test_a_domain_is_wanted_from_the_threshold_of_listed_jids() -> None:
    rule = ListingRule(own_domains=frozenset(), domain_listed_jids=3)
    assert not want_domain(2, rule).listed
    assert want_domain(3, rule).listed


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"jid_officer_spam": 0}, "jid_officer_spam"),
        ({"jid_report_weight": 0.0}, "jid_report_weight"),
        ({"jid_report_weight": float("nan")}, "jid_report_weight"),
        ({"domain_listed_jids": 0}, "domain_listed_jids"),
    ],
)
def test_nonsense_thresholds_are_refused(fields: dict[str, float], word: str) -> None:
    with pytest.raises(RuleError, match=word):
        ListingRule(own_domains=frozenset(), **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        (EntryKind.DOMAIN, "Spam.Example.", "spam.example"),
        (EntryKind.DOMAIN, "bücher.example", "xn--bcher-kva.example"),
        (EntryKind.JID, "Spammer@Spam.Example", "spammer@spam.example"),
        (EntryKind.JID, "  x@spam.example ", "x@spam.example"),
    ],
)
def test_entries_are_normalised(kind: EntryKind, value: str, expected: str) -> None:
    assert check_entry(kind, value, OWN) == expected


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (EntryKind.DOMAIN, ""),
        (EntryKind.DOMAIN, "   "),
        (EntryKind.DOMAIN, "*.spam.example"),
        (EntryKind.DOMAIN, "user@spam.example"),
        (EntryKind.DOMAIN, "spam.example/res"),
        (EntryKind.DOMAIN, "sp am.example"),
        (EntryKind.DOMAIN, "\x00bad.example"),
        (EntryKind.DOMAIN, "<script>.example"),
        (EntryKind.DOMAIN, "a" * 5000),
        (EntryKind.DOMAIN, "corp.example"),
        (EntryKind.DOMAIN, "CORP.example"),
        (EntryKind.DOMAIN, "conference.corp.example"),
        (EntryKind.JID, "bot@conference.corp.example"),
        (EntryKind.JID, "spam.example"),
        (EntryKind.JID, "x@spam.example/resource"),
        (EntryKind.JID, "@spam.example"),
        (EntryKind.JID, "x@"),
        (EntryKind.JID, "x@@spam.example"),
        (EntryKind.JID, "a b@spam.example"),
        (EntryKind.JID, "x@sp am.example"),
        (EntryKind.JID, "*@spam.example"),
        (EntryKind.JID, "alice@corp.example"),
        (EntryKind.JID, "x" * 2000 + "@spam.example"),
    ],
)
def test_malformed_and_own_entries_are_refused(kind: EntryKind, value: str) -> None:
    with pytest.raises(RuleError):
        check_entry(kind, value, OWN)


def test_only_the_own_domains_themselves_are_own() -> None:
    # As the policy's local_domains: a name under an own domain is not own unless listed.
    assert check_entry(EntryKind.DOMAIN, "other.corp.example", OWN) == "other.corp.example"


def test_item_ids_are_the_domain_or_the_sha256_of_the_bare_jid() -> None:
    assert item_ids(EntryKind.DOMAIN, "spam.example") == ("spam.example",)
    digest = hashlib.sha256(b"spammer@spam.example").hexdigest()
    assert item_ids(EntryKind.JID, "spammer@spam.example") == (digest,)


def test_an_idn_jid_is_published_in_both_spellings() -> None:
    # Prosody hashes the Unicode form of the domain; others the A-label form.
    ids = item_ids(EntryKind.JID, "x@xn--bcher-kva.example")
    assert hashlib.sha256("x@bücher.example".encode()).hexdigest() in ids
    assert hashlib.sha256(b"x@xn--bcher-kva.example").hexdigest() in ids


@pytest.mark.parametrize(
    ("current", "origin", "want", "mode", "expected"),
    [
        (None, None, True, ReviewMode.AUTO, EntryState.LISTED),
        (None, None, True, ReviewMode.APPROVE, EntryState.PENDING),
        (None, None, False, ReviewMode.AUTO, None),
        (EntryState.PENDING, Origin.RULE, True, ReviewMode.APPROVE, None),
        (EntryState.LISTED, Origin.RULE, True, ReviewMode.AUTO, None),
        (EntryState.LISTED, Origin.RULE, False, ReviewMode.AUTO, EntryState.RETRACTED),
        (EntryState.PENDING, Origin.RULE, False, ReviewMode.APPROVE, EntryState.RETRACTED),
        (EntryState.RETRACTED, Origin.RULE, True, ReviewMode.AUTO, EntryState.LISTED),
        (EntryState.RETRACTED, Origin.RULE, False, ReviewMode.AUTO, None),
        # an officer's decision is never undone by the rule
        (EntryState.REJECTED, Origin.OFFICER, True, ReviewMode.AUTO, None),
        (EntryState.RETRACTED, Origin.OFFICER, True, ReviewMode.AUTO, None),
        (EntryState.LISTED, Origin.OFFICER, False, ReviewMode.AUTO, None),
    ],
)
def test_the_rule_transitions(
    current: EntryState | None,
    origin: Origin | None,
    want: bool,
    mode: ReviewMode,
    expected: EntryState | None,
) -> None:
    assert next_state(current, origin, want, mode) is expected


def test_officer_decisions() -> None:
    assert officer_state(EntryState.PENDING, Decision.APPROVE) is EntryState.LISTED
    assert officer_state(EntryState.PENDING, Decision.REJECT) is EntryState.REJECTED
    assert officer_state(None, Decision.ADD) is EntryState.LISTED
    assert officer_state(EntryState.REJECTED, Decision.ADD) is EntryState.LISTED
    assert officer_state(EntryState.LISTED, Decision.RETRACT) is EntryState.RETRACTED
    assert officer_state(EntryState.PENDING, Decision.RETRACT) is EntryState.RETRACTED


@pytest.mark.parametrize(
    ("current", "decision"),
    [
        (None, Decision.APPROVE),
        (EntryState.LISTED, Decision.APPROVE),
        (None, Decision.REJECT),
        (EntryState.LISTED, Decision.ADD),
        (None, Decision.RETRACT),
        (EntryState.RETRACTED, Decision.RETRACT),
        (EntryState.REJECTED, Decision.RETRACT),
    ],
)
def test_officer_decisions_that_do_not_apply_are_refused(
    current: EntryState | None, decision: Decision
) -> None:
    with pytest.raises(RuleError):
        officer_state(current, decision)
