"""What StanzaGuard publishes as a real-time block list: the listing rule, pure.

StanzaGuard publishes the spam sources it is confident about (remote domains, and SHA-256 of
bare JIDs) in the format of xmppbl.org's ``spam_source_domains`` and
``spam_source_jids_sha256`` nodes. This module decides *what* to list; the store keeps the
entries, the edge (``proxy.rtbl_publish``) publishes them and the API serves them.

The rule (docs/rtbl-publishing.md):

- A **JID** is wanted on the list when officers confirmed at least ``jid_officer_spam``
  distinct messages of it as spam, or when users' spam reports of it weigh at least
  ``jid_report_weight`` (each reporter counts once, with their reporter weight, which drops
  when officers contradict their reports), and in both cases no officer has cleared it since:
  when the newest officer decision about its messages is *not spam* (a release), it is not
  wanted, whatever the reports say.
- A **domain** is wanted when at least ``domain_listed_jids`` distinct JIDs of it are
  listed (published, not merely pending).
- Classifier verdicts alone never list anything: a model's false positive would otherwise be
  broadcast to every server that subscribes, and it would feed itself. Verdicts reach the
  list through an officer's confirmation or users' reports.
- Never the organisation's own domains or JIDs at them: the served domains and the policy's
  ``local_domains``, matched exactly as the policy matches them everywhere else (a MUC or
  upload service of the organisation belongs in ``local_domains`` anyway).
- Officers may also add or retract an entry by hand; a rule never undoes an officer's
  decision (an entry an officer added stays until an officer retracts it, and one an officer
  rejected or retracted is not proposed again by the rule until an officer lists it).

Each entry has a state (`EntryState`): ``pending`` (proposed, waiting for approval in review
mode ``approve``), ``listed`` (published), ``rejected`` (an officer said no), ``retracted``
(was listed, taken off). `next_state` is the whole transition table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from classifier.blocklists import jid_hashes
from classifier.errors import RuleError
from classifier.jid import normalise_bare, normalise_domain

MAX_ENTRY_CHARS = 1024
"""Longest domain or bare JID accepted as an entry (a JID's parts are 1023 bytes each)."""


# A normalised domain: dot-separated labels (IDNs as A-labels), as DNS host names are spelled.
_DOMAIN = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)
# What RFC 7622 forbids in a localpart, and whitespace and control characters.
_BAD_LOCAL = re.compile(r"[\s\x00-\x1f\x7f\"&'/:<>@]")


class EntryKind(StrEnum):
    DOMAIN = "domain"
    JID = "jid"


class EntryState(StrEnum):
    PENDING = "pending"
    LISTED = "listed"
    REJECTED = "rejected"
    RETRACTED = "retracted"


class Origin(StrEnum):
    RULE = "rule"  # proposed by the listing rule from reports and officers' labels
    OFFICER = "officer"  # added by hand


class ReviewMode(StrEnum):
    AUTO = "auto"  # what the rule wants is published at once
    APPROVE = "approve"  # an officer approves each proposal first


class Decision(StrEnum):
    """What an officer does with an entry."""

    APPROVE = "approve"  # a pending entry is published
    REJECT = "reject"  # a pending entry is not (and the rule will not propose it again)
    ADD = "add"  # list this now (approves a pending one)
    RETRACT = "retract"  # take it off the list


@dataclass(frozen=True, slots=True)
class ListingRule:
    """The thresholds of the rule, and the domains never listed."""

    own_domains: frozenset[str]
    jid_officer_spam: int = 1
    jid_report_weight: float = 3.0
    domain_listed_jids: int = 3

    def __post_init__(self) -> None:
        if self.jid_officer_spam < 1:
            raise RuleError("jid_officer_spam must be at least 1")
        if not self.jid_report_weight > 0:
            raise RuleError("jid_report_weight must be more than 0")
        if self.domain_listed_jids < 1:
            raise RuleError("domain_listed_jids must be at least 1")


@dataclass(frozen=True, slots=True)
class SenderEvidence:
    """What is known about one sender (a bare JID) from reports and officers.

    Attributes:
        officer_spam: Distinct messages of it officers confirmed or labelled spam (the newest
            officer label of each message counts).
        report_weight: Sum over distinct reporters of their reporter weight, counting only
            messages no officer labelled not-spam.
        cleared: The newest officer decision about any of its messages is not-spam.
    """

    officer_spam: int = 0
    report_weight: float = 0.0
    cleared: bool = False


@dataclass(frozen=True, slots=True)
class Want:
    """The rule's answer for one entry: wanted on the list or not, and why."""

    listed: bool
    reason: str


def is_own(domain: str, own_domains: Iterable[str]) -> bool:
    """``domain`` is one of ``own_domains`` (both normalised)."""
    return domain in set(own_domains)


def check_entry(kind: EntryKind, value: str, own_domains: Iterable[str]) -> str:
    """The normalised entry (a domain, or a bare JID), or RuleError saying what is wrong.

    Refuses wildcards, full JIDs, empty or oversized text, and the organisation's domains.
    """
    text = value.strip()
    if not text or len(text) > MAX_ENTRY_CHARS:
        raise RuleError(f"an entry is 1 to {MAX_ENTRY_CHARS} characters")
    if not text.isprintable():  # control and format characters (bidi overrides, ...)
        raise RuleError("an entry has no control or format characters")
    if "*" in text:
        raise RuleError("wildcards are not listed: name the domain or JID itself")
    try:
        if kind is EntryKind.DOMAIN:
            if "@" in text or "/" in text:
                raise RuleError("give a domain, without '@' or '/'")
            domain = normalise_domain(text)
            normalised = domain
        else:
            if "/" in text:
                raise RuleError("give a bare JID, without '/resource'")
            bare = normalise_bare(text)
            if bare.localpart is None:
                raise RuleError("give a JID user@domain (list a domain as a domain)")
            domain = bare.domain
            normalised = str(bare)
    except RuleError:
        raise
    except (ValueError, UnicodeError) as exc:
        raise RuleError(f"not a valid {kind.value}: {str(exc)[:200]}") from None
    if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
        raise RuleError(f"not a valid domain: {text[:80]!r}")
    local, _, _ = normalised.rpartition("@")
    if kind is EntryKind.JID and (not local or _BAD_LOCAL.search(local)):
        raise RuleError(f"not a valid JID: {text[:80]!r}")
    own = tuple(normalise_domain(d) for d in own_domains)
    if is_own(domain, own):
        raise RuleError(f"{normalised[:200]!r} is at one of the organisation's own domains")
    return normalised


def item_ids(kind: EntryKind, value: str) -> tuple[str, ...]:
    """The pubsub item ids (and HTTP list lines) of a normalised entry.

    A domain is its own id. A JID is the hex SHA-256 of its bare form; for a domain with
    A-labels also of the Unicode form, which is how Prosody hashes it (`jid_hashes`).
    """
    if kind is EntryKind.DOMAIN:
        return (value,)
    return jid_hashes(value)


def want_jid(evidence: SenderEvidence, rule: ListingRule) -> Want:
    """Whether the rule wants a JID listed, given what is known about it."""
    if evidence.cleared:
        return Want(False, "an officer cleared its latest message (not spam)")
    if evidence.officer_spam >= rule.jid_officer_spam:
        return Want(True, f"officers confirmed {evidence.officer_spam} message(s) as spam")
    if evidence.report_weight >= rule.jid_report_weight:
        return Want(True, f"spam reports weigh {evidence.report_weight:.2f}")
    return Want(False, "not enough evidence")


def want_domain(listed_jids: int, rule: ListingRule) -> Want:
    """Whether the rule wants a remote domain listed, given how many of its JIDs are."""
    if listed_jids >= rule.domain_listed_jids:
        return Want(True, f"{listed_jids} JIDs of it are listed")
    return Want(False, f"{listed_jids} JIDs of it are listed")


def next_state(
    current: EntryState | None, current_origin: Origin | None, want: bool, mode: ReviewMode
) -> EntryState | None:
    """The state the *rule* moves an entry to (None: no entry, or leave it as it is).

    The rule proposes (``pending`` or straight to ``listed`` per mode) what it wants and is
    not listed yet, retracts what it listed and no longer wants, and never touches what an
    officer decided: an officer's entry, a rejected one, or one an officer retracted.
    """
    if current_origin is Origin.OFFICER or current is EntryState.REJECTED:
        return None
    if want:
        if current in (None, EntryState.RETRACTED):
            return EntryState.LISTED if mode is ReviewMode.AUTO else EntryState.PENDING
        return None
    if current in (EntryState.LISTED, EntryState.PENDING):
        return EntryState.RETRACTED
    return None


def officer_state(current: EntryState | None, decision: Decision) -> EntryState:
    """The state an officer's decision moves an entry to.

    Raises:
        RuleError: if the decision does not apply (approving what is not pending, ...).
    """
    if decision is Decision.APPROVE:
        if current is not EntryState.PENDING:
            raise RuleError(f"only a pending entry can be approved (it is {_name(current)})")
        return EntryState.LISTED
    if decision is Decision.REJECT:
        if current is not EntryState.PENDING:
            raise RuleError(f"only a pending entry can be rejected (it is {_name(current)})")
        return EntryState.REJECTED
    if decision is Decision.ADD:
        if current is EntryState.LISTED:
            raise RuleError("it is listed already")
        return EntryState.LISTED
    if current is not EntryState.LISTED and current is not EntryState.PENDING:
        raise RuleError(f"only a listed or pending entry can be retracted (it is {_name(current)})")
    return EntryState.RETRACTED


def _name(state: EntryState | None) -> str:
    return "not on the list" if state is None else state.value
