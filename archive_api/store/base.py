"""The `ArchiveStore` protocol that every backend (SQLite now, Elasticsearch later) implements.

A store is fed by the indexer with hash-chained spool links, in sequence order, and answers
the service's questions: get one record, search, count, facet, stream the chain back out and
verify itself. What it must guarantee, whatever the backend:

- `apply` is idempotent per `(chain, seq)`: an already-applied link is skipped after
  checking it is byte-identical to the stored one; a batch either lands whole or not at all.
  The indexer resumes from `last_seq()` (which commits together with the records), never from
  a position it persisted elsewhere.
- One record per `record_id`. OBSERVE entries add observations (an observation that is
  already there is not repeated), STATUS entries change the status. Both may arrive before
  their RECORD (another proxy's chain), and take effect when it does.
- The effective status is that of the STATUS entry with the greatest `(at, chain, seq)`
  (entries without `at` first), or the RECORD's own status when there is none; so every
  backend agrees, whatever order chains were indexed in.
- ATTACHMENT entries record one attempt at fetching an attachment's file (ok or failed);
  like OBSERVE and STATUS they may arrive before their RECORD. The newest successful one per
  (record, url), by the same `(at, chain, seq)` order, fills that attachment's `sha256` and
  `size` (and its `media_type` when the message named none); failed attempts change nothing
  a reader sees but stay in the chain.
- The RECORD link's payload is the record's canonical document; `get` returns it with the
  merged observations, attachment fetches and effective status.
- Paging cursors are opaque and stable: paging through a result never repeats a record nor
  skips one that existed when the first page was read; records indexed meanwhile may or may
  not appear. For that reason relevance is a function of the query and the document alone
  (no corpus statistics that would shift under concurrent inserts).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive_api.store.audit import (
    AuditEntry,
    AuditEvent,
    AuditFilter,
    AuditHead,
    AuditPage,
    AuditVerifyReport,
)
from archive_api.store.chain import ChainLink, Checkpoint
from archive_api.store.errors import InvalidEntry, InvalidRequest
from archive_api.store.query import Query, parse_query
from archive_api.store.records import ArchiveRecord, canonical_json
from archive_api.store.tokens import StoredToken
from classifier.verdict import Action

DEFAULT_CHAIN = "spool"

SortOrder = Literal["time", "time_asc", "relevance"]
"""`time`: newest first; `time_asc`: oldest first (transcripts, exports); `relevance`: best
text match first, newest first among equals."""

SORT_ORDERS: tuple[SortOrder, ...] = ("time", "time_asc", "relevance")
MAX_PAGE_SIZE = 1000

# Highlight markers in snippets. XML 1.0 forbids these control characters, so no XMPP body
# can contain them and a marker can never be confused with message text.
HIGHLIGHT_START = "\x02"
HIGHLIGHT_END = "\x03"


@dataclass(frozen=True, slots=True)
class SnippetPart:
    text: str
    match: bool = False  # part of a text-term match; the UI emphasises it


def parse_marked(text: str) -> tuple[SnippetPart, ...]:
    """Split text carrying HIGHLIGHT_START/END markers into parts; stray markers are dropped."""
    parts: list[SnippetPart] = []
    match = False
    current: list[str] = []
    for ch in text:
        if ch in (HIGHLIGHT_START, HIGHLIGHT_END):
            if current:
                parts.append(SnippetPart("".join(current), match))
                current = []
            match = ch == HIGHLIGHT_START
        else:
            current.append(ch)
    if current:
        parts.append(SnippetPart("".join(current), match))
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class Hit:
    record: ArchiveRecord
    snippet: tuple[SnippetPart, ...]  # an excerpt of body (or subject), matches marked
    score: float | None = None  # only with sort="relevance"; higher is better


@dataclass(frozen=True, slots=True)
class SearchPage:
    hits: tuple[Hit, ...]
    next_cursor: str | None  # None when this is the last page


@dataclass(frozen=True, slots=True)
class Facets:
    """Counts over every record a query matches (not just one page)."""

    by_action: tuple[tuple[Action, int], ...]  # every action with a non-zero count
    by_remote_domain: tuple[tuple[str, int], ...]  # biggest first, at most `top`
    by_day: tuple[tuple[date, int], ...]  # UTC days, oldest first, days with records only


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    """One thing verification found wrong, as precisely located as the store can say."""

    problem: str
    chain: str | None = None
    seq: int | None = None
    record_id: str | None = None

    def __str__(self) -> str:
        where = []
        if self.chain is not None:
            where.append(f"chain {self.chain!r}")
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        if self.record_id is not None:
            where.append(f"record {self.record_id}")
        return f"{', '.join(where) or 'store'}: {self.problem}"


@dataclass(frozen=True, slots=True)
class ChainState:
    chain: str
    last_seq: int
    head: bytes  # hash of the last entry; 32 zero bytes for an empty chain
    checkpoints: int  # how many stored checkpoints were checked against it


@dataclass(frozen=True, slots=True)
class VerifyReport:
    chains: tuple[ChainState, ...]
    entries_checked: int
    records_checked: int
    problems: tuple[VerifyProblem, ...]  # located ones first, by chain and seq
    problems_truncated: bool = False  # more were found than the report keeps

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_break(self) -> VerifyProblem | None:
        return self.problems[0] if self.problems else None


# --- holds, retention and purge (docs/retention.md) ---------------------------------------


@dataclass(frozen=True, slots=True)
class HoldRecord:
    """A legal hold as the store keeps it.

    The service layer (`archive_api.holds`) gives the scope its meaning; the store needs only
    `query`, the canonical search text of the records the hold covers, frozen at creation and
    evaluated by the store itself whenever it must know what is held (purge).
    """

    hold_id: str
    case_name: str
    created_by: str
    created_at: datetime
    scope: str  # canonical JSON of the scope, for display and the audit trail
    query: str  # canonical search text (str(Query))
    released_at: datetime | None = None
    released_by: str | None = None
    release_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.released_at is None


MAX_HOLD_FIELD = 10_000
"""Longest hold id, case name, author, scope, releaser or release reason a store keeps."""


def check_new_hold(hold: HoldRecord) -> None:
    """What every store checks before it keeps a new hold (InvalidRequest, QuerySyntaxError)."""
    parse_query(hold.query)  # a hold must be evaluable from day one
    for name, value in (
        ("hold_id", hold.hold_id),
        ("case_name", hold.case_name),
        ("created_by", hold.created_by),
        ("scope", hold.scope),
    ):
        if not value or len(value) > MAX_HOLD_FIELD:
            raise InvalidRequest(f"hold {name} must be 1-{MAX_HOLD_FIELD} characters")
    if not hold.active:
        raise InvalidRequest("a new hold must not be released already")


def check_release(released_by: str, reason: str | None) -> None:
    """What every store checks before it releases a hold (InvalidRequest)."""
    if not released_by or len(released_by) > MAX_HOLD_FIELD:
        raise InvalidRequest(f"released_by must be 1-{MAX_HOLD_FIELD} characters")
    if reason is not None and len(reason) > MAX_HOLD_FIELD:
        raise InvalidRequest(f"the release reason must be at most {MAX_HOLD_FIELD} characters")


@dataclass(frozen=True, slots=True)
class RetentionAssignment:
    """A retention class and the expiry it gives one record (the service computes both)."""

    record_id: str
    retention_class: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class RetentionState:
    """What the store holds about one record's retention."""

    record_id: str
    retention_class: str
    expires_at: datetime
    assigned_at: datetime
    purged_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RetentionUpdate:
    """The outcome of `set_retention`: extend-only, so some assignments change nothing."""

    assigned: int = 0  # records that had no retention yet
    extended: int = 0  # records whose expiry moved later
    kept: int = 0  # records whose recorded expiry was as late or later (or already purged)
    unknown: int = 0  # record ids the store does not hold


@dataclass(frozen=True, slots=True)
class RetentionSubject:
    """What a retention policy looks at to classify one record (no text)."""

    record_id: str
    occurred_at: datetime
    record_type: str  # what `type:` matches: chat, groupchat, normal, headline, subscription...
    direction: str
    sender: str  # bare JID, normalised
    recipient: str  # bare JID, normalised
    room: str | None
    retention_class: str | None = None  # the current assignment, when there is one
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RetentionSubjectPage:
    subjects: tuple[RetentionSubject, ...]
    next_cursor: str | None  # None when this is the last page


@dataclass(frozen=True, slots=True)
class PurgedRecord:
    record_id: str
    retention_class: str
    expires_at: datetime
    entries: int  # chain entries whose payload became a tombstone (0 in a dry run)


@dataclass(frozen=True, slots=True)
class PurgeBatch:
    """One call of `purge`: at most `limit` records, so the caller can audit each batch.

    The totals cost a pass over every expired record, so they are there only when asked
    for (`counts=True`); `more` is always known.
    """

    purged: tuple[PurgedRecord, ...]  # purged now (in a dry run: that would be)
    more: bool  # more records are due than this batch took: call `purge` again
    dry_run: bool = False
    due: int | None = None  # records past expiry and under no active hold, batch included
    held_back: int | None = None  # records past expiry that an active hold keeps


TOMBSTONE_OP = "tombstone"


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What a purged entry's payload becomes. The link keeps its seq, prev_hash and hash.

    The hash can no longer be recomputed (the payload it covers is gone by retention), so
    verification checks the links on both sides of it, that the tombstone names a purge the
    store recorded, and that nothing of the record is left in the store.
    """

    record_id: str
    purged_at: datetime
    retention_class: str
    expires_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "op": TOMBSTONE_OP,
            "record_id": self.record_id,
            "purged_at": self.purged_at.isoformat(),
            "retention_class": self.retention_class,
            "expires_at": self.expires_at.isoformat(),
        }

    def payload(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_payload(cls, payload: bytes) -> Tombstone | None:
        """The tombstone a payload is, None for any other payload; ValueError if malformed."""
        if b'"op":"tombstone"' not in payload:  # cheap: other payloads are never tombstones
            return None
        try:
            data = json.loads(payload)
            if not isinstance(data, dict) or data.get("op") != TOMBSTONE_OP:
                return None
            record_id, cls_name = data["record_id"], data["retention_class"]
            if not isinstance(record_id, str) or not isinstance(cls_name, str):
                raise TypeError("record_id and retention_class must be strings")
            tombstone = cls(
                record_id,
                datetime.fromisoformat(data["purged_at"]),
                cls_name,
                datetime.fromisoformat(data["expires_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed tombstone ({exc})") from None
        if tombstone.payload() != payload:
            raise ValueError("tombstone is not in canonical form")
        return tombstone


def tombstones_in(links: Sequence[ChainLink], chain: str) -> dict[int, Tombstone]:
    """The links of a batch whose payload is a tombstone, by seq (moving an archive whose
    source purged records); a malformed one is an InvalidEntry."""
    found: dict[int, Tombstone] = {}
    for link in links:
        try:
            tombstone = Tombstone.from_payload(link.payload)
        except ValueError as exc:
            raise InvalidEntry(chain, link.seq, str(exc)) from None
        if tombstone is not None:
            found[link.seq] = tombstone
    return found


# --- audit log and API tokens (docs/api.md; formats in store/audit.py, store/tokens.py) ------


class AuditStore(Protocol):
    """The audit log's storage: an append-only, hash-chained, checkpointed list of events.

    Whatever the backend: appends are durable when they return and serialised across every
    writer (threads, processes, machines), so the chain never forks; events are never
    changed or deleted through this interface.
    """

    async def append_audit(self, entries: Sequence[AuditEntry]) -> tuple[AuditEvent, ...]:
        """Append entries (at most MAX_APPEND_BATCH) as one durable batch, in order.

        The store gives each the next seq and the hash of the event before it, under its
        write serialisation; returns the stored events. Raises InvalidRequest naming a bad
        field (nothing of the batch is stored then).
        """
        ...

    async def audit_events(
        self,
        where: AuditFilter = AuditFilter(),  # noqa: B008 (frozen, so a shared default is safe)
        *,
        limit: int = 50,
        cursor: str | None = None,
        newest_first: bool = True,
    ) -> AuditPage:
        """One page of events matching `where`, by seq. A cursor is valid only with the filter
        and order it came from (InvalidCursor); paging never repeats nor skips an event."""
        ...

    async def import_audit(self, events: Sequence[AuditEvent]) -> int:
        """Append events copied from another store's audit log (moving an archive), keeping
        their seqs, times and hashes; they must continue this log's head exactly and hash
        (`audit.imported_rows`), else InvalidRequest and nothing is written. At most
        MAX_APPEND_BATCH per call; returns how many were appended."""
        ...

    async def audit_head(self) -> AuditHead:
        """The last event's seq and hash (seq 0 and 32 zero bytes when the log is empty)."""
        ...

    async def add_audit_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Keep a signed head of the audit log (chain name AUDIT_CHAIN); the same one twice is
        a no-op. Raises ChainConflict if the stored hash at its seq differs, InvalidRequest
        if it is for another chain or past the end of the log."""
        ...

    async def audit_checkpoints(self) -> tuple[Checkpoint, ...]:
        """The stored audit checkpoints, by seq."""
        ...

    async def verify_audit(
        self, *, public_key: Ed25519PublicKey | None = None
    ) -> AuditVerifyReport:
        """Check the whole log with `AuditVerifier`; every problem located by seq."""
        ...


class TokenStore(Protocol):
    """API tokens (`StoredToken`): created, looked up by secret hash or name, revoked."""

    async def add_token(self, token: StoredToken) -> None:
        """Keep a new token. Raises AlreadyExists if its name (even of a revoked token) or
        its secret hash is taken, InvalidRequest if a field is invalid."""
        ...

    async def token_by_hash(self, secret_hash: bytes) -> StoredToken | None:
        """The token whose secret hashes to `secret_hash` (revoked and expired ones too)."""
        ...

    async def token_by_name(self, name: str) -> StoredToken | None: ...

    async def tokens(self) -> tuple[StoredToken, ...]:
        """Every token, revoked and expired ones too, oldest first."""
        ...

    async def revoke_token(self, name: str, *, at: datetime) -> StoredToken:
        """Revoke a token from `at` on and return it; a token revoked before keeps its first
        revocation time. Raises NotFound for an unknown name."""
        ...


# --- the published block list (docs/rtbl-publishing.md) ---------------------------------------

BLOCKLIST_KINDS = frozenset({"domain", "jid"})
BLOCKLIST_STATES = frozenset({"pending", "listed", "rejected", "retracted"})
BLOCKLIST_ORIGINS = frozenset({"rule", "officer"})
MAX_BLOCKLIST_VALUE = 1024
MAX_BLOCKLIST_REASON = 1000


@dataclass(frozen=True, slots=True)
class BlocklistEntry:
    """One entry of the block list StanzaGuard publishes (`classifier.listing` decides).

    `kind` is ``domain`` or ``jid`` (a bare JID; its SHA-256 is what is published),
    `state` ``pending``, ``listed``, ``rejected`` or ``retracted``, `origin` who made the
    last change (``rule`` or ``officer``), `actor` the officer's name for officer changes.
    """

    kind: str
    value: str
    state: str
    origin: str
    reason: str
    updated: datetime
    actor: str | None = None

    def check(self) -> None:
        """Raise ValueError unless every field is one the store accepts."""
        if self.kind not in BLOCKLIST_KINDS:
            raise ValueError(f"unknown block list kind {self.kind[:40]!r}")
        if self.state not in BLOCKLIST_STATES:
            raise ValueError(f"unknown block list state {self.state[:40]!r}")
        if self.origin not in BLOCKLIST_ORIGINS:
            raise ValueError(f"unknown block list origin {self.origin[:40]!r}")
        if not self.value or len(self.value) > MAX_BLOCKLIST_VALUE:
            raise ValueError(f"a block list value is 1 to {MAX_BLOCKLIST_VALUE} characters")
        if len(self.reason) > MAX_BLOCKLIST_REASON:
            raise ValueError(f"a block list reason is at most {MAX_BLOCKLIST_REASON} characters")
        if self.actor is not None and len(self.actor) > MAX_BLOCKLIST_REASON:
            raise ValueError("a block list actor is too long")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "state": self.state,
            "origin": self.origin,
            "reason": self.reason,
            "updated": self.updated.isoformat(),
            "actor": self.actor,
        }


class BlocklistStore(Protocol):
    """The published block list's entries. Only the SQLite store has them: the list lives
    in the service's own database even when the archive is in Elasticsearch."""

    async def blocklist_entries(
        self, *, kind: str | None = None, state: str | None = None
    ) -> tuple[BlocklistEntry, ...]:
        """Entries, optionally of one kind and/or state, ordered by kind and value."""
        ...

    async def blocklist_entry(self, kind: str, value: str) -> BlocklistEntry | None: ...

    async def put_blocklist_entries(self, entries: Sequence[BlocklistEntry]) -> int:
        """Insert or replace entries (keyed by kind and value) in one transaction; return
        the list's new version. Raises InvalidRequest for an invalid entry."""
        ...

    async def blocklist_version(self) -> int:
        """A number that grows with every change of the entries (0 before the first)."""
        ...


# --- message view, conversations and dashboard (archive_api/routes; docs/api.md) -------------


@dataclass(frozen=True, slots=True)
class ChainPosition:
    """Where a record's RECORD entry sits: which chain, which seq."""

    chain: str
    seq: int


@dataclass(frozen=True, slots=True)
class DayActivity:
    """One UTC day of the archive: how many records, by verdict action."""

    day: date
    total: int
    by_action: tuple[tuple[Action, int], ...]  # every action with a non-zero count


@dataclass(frozen=True, slots=True)
class Activity:
    """What the dashboard shows for a time window (`since` inclusive, `until` exclusive)."""

    days: tuple[DayActivity, ...]  # oldest first, days with records only
    blocked_domains: tuple[tuple[str, int], ...]  # remote domains of reject/drop, biggest first
    rules: tuple[tuple[str, int], ...]  # rule ids in the reasons of records not allowed


MAX_LINKED_RECORDS = 100
"""Most corrections and retractions `linked_records` returns for one record."""


class ViewStore(Protocol):
    """Reads the API's message, conversation and dashboard views need beyond `search`."""

    async def record_position(self, record_id: str) -> ChainPosition | None:
        """The chain and seq of a record's RECORD entry (None for an unknown record)."""
        ...

    async def linked_records(
        self, record_ids: Sequence[str]
    ) -> dict[str, tuple[ArchiveRecord, ...]]:
        """Each record's edit history: the original it corrects or retracts (same sender,
        XEP-0308/0424 id match) and every correction and retraction of that original, oldest
        first, the record itself left out. Records without any are left out of the dict; at
        most MAX_LINKED_RECORDS per record."""
        ...

    async def activity(self, since: datetime, until: datetime, *, top: int = 10) -> Activity:
        """Per-day counts by action, the `top` remote domains of rejected and dropped
        records, and the `top` rules named in the reasons of records not allowed."""
        ...


class ArchiveStore(AuditStore, TokenStore, ViewStore, Protocol):
    async def apply(
        self, links: Sequence[ChainLink], *, chain: str = DEFAULT_CHAIN, tombstones: bool = False
    ) -> None:
        """Ingest spool links in seq order as one atomic batch.

        Raises ChainGap if the batch starts past `last_seq() + 1`, ChainConflict if a link
        does not hash, does not continue the stored chain, or differs from an applied link
        with the same seq, and InvalidEntry if a payload is not a spool entry.

        `tombstones` (moving an archive whose source purged records, never the spool): a link
        whose payload is a `Tombstone` naming a purge this store recorded (`import_purges`)
        is accepted without its hash (the payload it covers is gone), provided it continues
        the chain; one naming no such purge is an InvalidEntry.
        """
        ...

    async def import_purges(self, purges: Sequence[RetentionState]) -> int:
        """Record purges another store made (moving an archive): each state needs its
        `purged_at`. Returns how many were new; a purge already recorded the same way is
        skipped. Raises InvalidRequest for a state without `purged_at`, for a record this
        store holds (it was not purged here) and for a different purge of the same record.
        """
        ...

    async def last_seq(self, *, chain: str = DEFAULT_CHAIN) -> int:
        """The highest applied seq of the chain; 0 when nothing was applied."""
        ...

    async def chains(self) -> tuple[str, ...]:
        """Names of every chain the store holds entries of."""
        ...

    async def get(self, record_id: str) -> ArchiveRecord | None: ...

    async def search(
        self,
        query: Query | str,
        *,
        limit: int = 50,
        cursor: str | None = None,
        sort: SortOrder = "time",
    ) -> SearchPage:
        """One page of matching records. A string query is parsed (QuerySyntaxError).

        A cursor is valid only with the query and sort it came from (InvalidCursor).
        """
        ...

    async def count(self, query: Query | str) -> int: ...

    async def facets(self, query: Query | str, *, top: int = 20) -> Facets: ...

    def chain_links(
        self, start_seq: int = 1, end_seq: int | None = None, *, chain: str = DEFAULT_CHAIN
    ) -> AsyncIterator[ChainLink]:
        """The stored links from start_seq to end_seq (inclusive; None: to the end)."""
        ...

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Keep a signed chain head. Adding the same checkpoint twice is a no-op.

        Raises ChainConflict if the store already holds that seq with a different hash.
        """
        ...

    async def checkpoints(self, chain: str | None = None) -> tuple[Checkpoint, ...]:
        """Stored checkpoints, by chain then seq; only one chain's when named."""
        ...

    async def verify(self, *, public_key: Ed25519PublicKey | None = None) -> VerifyReport:
        """Check the store against itself; see the backend for the exact list of checks.

        Every backend checks at least: each chain is gap-free, every link hashes and links
        to the one before, every checkpoint matches the stored hash at its seq (and its
        signature, when a key is given) and none lies past the end of the chain, and every
        record's searchable fields, observations and attachment fetches match the chain's
        payloads.
        """
        ...

    # -- holds, retention and purge (docs/retention.md) --

    async def add_hold(self, hold: HoldRecord) -> None:
        """Keep a new legal hold (active: its released_* fields must be empty).

        Raises QuerySyntaxError if its query does not parse, InvalidRequest if its id is
        taken or a field is empty.
        """
        ...

    async def release_hold(
        self, hold_id: str, *, released_by: str, released_at: datetime, reason: str | None = None
    ) -> HoldRecord:
        """Release a hold (final; who may is the service's decision). Returns it released.

        Raises NotFound for an unknown id, InvalidRequest if it was released already.
        """
        ...

    async def get_hold(self, hold_id: str) -> HoldRecord | None: ...

    async def list_holds(self, *, include_released: bool = True) -> tuple[HoldRecord, ...]:
        """Holds, oldest first."""
        ...

    async def holds_covering(self, record_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """The active holds covering each of the given records (ids of records under none
        are left out), hold ids oldest first."""
        ...

    async def set_retention(
        self, assignments: Sequence[RetentionAssignment], *, assigned_at: datetime
    ) -> RetentionUpdate:
        """Record retention classes and expiries, extend-only.

        A record without one takes the assignment; a record with one takes it only when
        the new expiry is later (with its class); otherwise, and for purged records,
        nothing changes. Several assignments for one record: the latest expiry counts.
        """
        ...

    async def retention_of(self, record_id: str) -> RetentionState | None: ...

    async def retention_subjects(
        self,
        *,
        cursor: str | None = None,
        limit: int = 1000,
        unassigned_only: bool = False,
        expiring_by: datetime | None = None,
    ) -> RetentionSubjectPage:
        """Records as a retention policy sees them, in store order, a page at a time: all,
        those without a retention yet (`unassigned_only`), or those whose recorded expiry
        is at or before `expiring_by` (the next purge's candidates; not with the other)."""
        ...

    async def purge(
        self,
        now: datetime,
        *,
        limit: int = 1000,
        dry_run: bool = False,
        record_ids: Sequence[str] | None = None,
        counts: bool = False,
    ) -> PurgeBatch:
        """Purge up to `limit` records whose expiry is at or before `now` and that no active
        hold covers (only among `record_ids` when given: a batch planned by a dry run and
        audited before it runs). `counts` also counts what is due and what holds keep.

        Every chain entry of such a record keeps seq, prev_hash and hash and gets a
        `Tombstone` payload; the record, its observations, status changes, attachment
        fetches and full-text entry are deleted. Holds are evaluated in the same
        transaction, so a record held when the batch runs is never purged.
        """
        ...

    async def close(self) -> None: ...


@runtime_checkable
class SnapshotReader(Protocol):
    """A store that reads every match of a query from one consistent view (Elasticsearch:
    point in time or scroll). Exports use it where a store has it; SQLite pages `search`."""

    def snapshot_pages(
        self, query: Query | str, *, page_size: int = 500
    ) -> AsyncIterator[list[ArchiveRecord]]:
        """Every matching record, oldest first (as `search(sort="time_asc")`), a page at a
        time, as the index stood when the first page was read."""
        ...
