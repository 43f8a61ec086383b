"""The block list StanzaGuard publishes: entries in the store, officers' decisions, list text.

`classifier.listing` says what the rule wants; this service applies it to the entries kept in
the store (`BlocklistStore`), takes officers' decisions (approve, reject, add, retract), and
renders the list as the HTTP routes serve it (one entry a line, with a strong ETag) and as
the pubsub publisher (``proxy.rtbl_publish``) mirrors it. Audit records of officers'
decisions are written by the callers (the routes, the CLI), which know who acts.

Domains are reconsidered whenever one of their JIDs changes state: a domain is wanted once
``domain_listed_jids`` of its JIDs are *listed* (pending ones do not count).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from archive_api.errors import InvalidInput
from archive_api.store.base import BlocklistEntry, BlocklistStore
from archive_api.store.errors import NotFound
from classifier.clock import Clock
from classifier.errors import RuleError
from classifier.jid import domain_of
from classifier.listing import (
    Decision,
    EntryKind,
    EntryState,
    ListingRule,
    Origin,
    ReviewMode,
    SenderEvidence,
    Want,
    check_entry,
    item_ids,
    next_state,
    officer_state,
    want_domain,
    want_jid,
)

MAX_REASON_CHARS: Final = 500


class ListFormat:
    """Names of the HTTP list formats."""

    DOMAINS: Final = "domains"  # one domain a line (spam_source_domains)
    JIDS_SHA256: Final = "jids-sha256"  # hex SHA-256 of bare JIDs (spam_source_jids_sha256)
    JIDS: Final = "jids"  # bare JIDs in clear, opt-in (mod_firewall cannot hash to hex)

    ALL: Final = (DOMAINS, JIDS_SHA256, JIDS)


@dataclass(frozen=True, slots=True)
class ListText:
    """One rendering of the published list: the body, its strong ETag and the store version."""

    body: bytes
    etag: str
    version: int
    count: int


def strong_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:40] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header matches ``etag`` (RFC 9110: weak comparison).

    ``*`` matches; otherwise a comma-separated list of entity tags, each optionally ``W/``.
    Anything malformed simply does not match (the list is sent in full).
    """
    if not if_none_match or len(if_none_match) > 8192:
        return False
    if if_none_match.strip() == "*":
        return True
    for raw in if_none_match.split(","):
        tag = raw.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if len(tag) >= 2 and tag[0] == '"' and tag[-1] == '"' and tag == etag:
            return True
    return False


@dataclass(frozen=True, slots=True)
class BlocklistPolicy:
    """How entries are decided: the rule's thresholds and whether officers approve first."""

    rule: ListingRule
    mode: ReviewMode = ReviewMode.APPROVE


class BlocklistService:
    """Entries of the published list in `store`, changed by the rule and by officers."""

    def __init__(self, store: BlocklistStore, clock: Clock, policy: BlocklistPolicy) -> None:
        self.store = store
        self.clock = clock
        self.policy = policy
        self._lock = asyncio.Lock()
        self._rendered: dict[str, ListText] = {}

    # -- reading --

    async def entries(
        self, *, kind: EntryKind | None = None, state: EntryState | None = None
    ) -> tuple[BlocklistEntry, ...]:
        return await self.store.blocklist_entries(
            kind=None if kind is None else kind.value, state=None if state is None else state.value
        )

    async def published_ids(self, kind: EntryKind) -> frozenset[str]:
        """The item ids of every listed entry of ``kind`` (what the pubsub node should hold)."""
        listed = await self.store.blocklist_entries(kind=kind.value, state=EntryState.LISTED)
        return frozenset(i for entry in listed for i in item_ids(kind, entry.value))

    async def render(self, list_format: str) -> ListText:
        """The list in ``list_format`` (`ListFormat`), sorted, one entry a line."""
        if list_format not in ListFormat.ALL:
            raise InvalidInput(f"unknown list format {list_format[:40]!r}")
        version = await self.store.blocklist_version()
        cached = self._rendered.get(list_format)
        if cached is not None and cached.version == version:
            return cached
        if list_format == ListFormat.DOMAINS:
            lines = sorted(await self.published_ids(EntryKind.DOMAIN))
        elif list_format == ListFormat.JIDS_SHA256:
            lines = sorted(await self.published_ids(EntryKind.JID))
        else:
            listed = await self.store.blocklist_entries(kind="jid", state=EntryState.LISTED)
            lines = sorted(entry.value for entry in listed)
        body = "".join(line + "\n" for line in lines).encode("utf-8")
        text = ListText(body, strong_etag(body), version, len(lines))
        self._rendered[list_format] = text
        return text

    # -- the rule --

    async def consider_jid(self, jid: str, evidence: SenderEvidence) -> tuple[BlocklistEntry, ...]:
        """Apply the rule to one sender; returns the entries it changed (the JID's, and its
        domain's). A JID that cannot be listed (own domain, malformed) changes nothing."""
        try:
            value = check_entry(EntryKind.JID, jid, self.policy.rule.own_domains)
        except RuleError:
            return ()
        want = want_jid(evidence, self.policy.rule)
        async with self._lock:
            changed = await self._by_rule(EntryKind.JID, value, want)
            changed += await self._reconsider_domain(domain_of(value))
        return changed

    async def _by_rule(self, kind: EntryKind, value: str, want: Want) -> tuple[BlocklistEntry, ...]:
        current = await self.store.blocklist_entry(kind.value, value)
        state = next_state(
            None if current is None else EntryState(current.state),
            None if current is None else Origin(current.origin),
            want.listed,
            self.policy.mode,
        )
        if state is None:
            return ()
        entry = BlocklistEntry(
            kind=kind.value,
            value=value,
            state=state.value,
            origin=Origin.RULE.value,
            reason=want.reason[:MAX_REASON_CHARS],
            updated=self.clock.now(),
        )
        await self.store.put_blocklist_entries([entry])
        return (entry,)

    async def _reconsider_domain(self, domain: str) -> tuple[BlocklistEntry, ...]:
        try:
            value = check_entry(EntryKind.DOMAIN, domain, self.policy.rule.own_domains)
        except RuleError:
            return ()
        listed = await self.store.blocklist_entries(kind="jid", state=EntryState.LISTED)
        count = sum(1 for entry in listed if domain_of(entry.value) == value)
        return await self._by_rule(EntryKind.DOMAIN, value, want_domain(count, self.policy.rule))

    # -- officers --

    async def decide(
        self, kind: EntryKind, value: str, decision: Decision, actor: str, reason: str | None
    ) -> tuple[BlocklistEntry, ...]:
        """An officer's decision about one entry; returns the entries it changed (the
        entry, and its domain when a JID's change tips the domain rule).

        Raises:
            InvalidInput: a malformed or own-domain entry, or a decision that does not apply.
            NotFound: approving, rejecting or retracting an entry that does not exist.
        """
        try:
            normalised = check_entry(kind, value, self.policy.rule.own_domains)
        except RuleError as exc:
            raise InvalidInput(str(exc)) from None
        async with self._lock:
            current = await self.store.blocklist_entry(kind.value, normalised)
            if current is None and decision is not Decision.ADD:
                raise NotFound(f"{normalised[:200]!r} is not on the list")
            try:
                state = officer_state(
                    None if current is None else EntryState(current.state), decision
                )
            except RuleError as exc:
                raise InvalidInput(str(exc)) from None
            # Approving agrees with the rule's proposal: the rule may still retract it when
            # the evidence reverses (an officer releases the sender's message).
            keep_rule = decision is Decision.APPROVE and current is not None
            origin = current.origin if keep_rule and current is not None else Origin.OFFICER.value
            default = {
                Decision.APPROVE: current.reason if current is not None else "",
                Decision.REJECT: "rejected by an officer",
                Decision.ADD: "listed by an officer",
                Decision.RETRACT: "retracted by an officer",
            }[decision]
            entry = BlocklistEntry(
                kind=kind.value,
                value=normalised,
                state=state.value,
                origin=origin,
                reason=(reason or default)[:MAX_REASON_CHARS],
                updated=self.clock.now(),
                actor=actor,
            )
            await self.store.put_blocklist_entries([entry])
            changed: tuple[BlocklistEntry, ...] = (entry,)
            if kind is EntryKind.JID:
                changed += await self._reconsider_domain(domain_of(normalised))
        return changed


def entry_summary(entries: Sequence[BlocklistEntry]) -> list[dict[str, object]]:
    return [entry.to_json() for entry in entries]
