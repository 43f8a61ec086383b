"""The embedded archive store: one SQLite file, WAL, FTS5. The only module that speaks SQL.

Layout and the reasons for it:

- `ledger` keeps every chain link (prev_hash, hash, payload) so the chain can be verified
  from the store alone. Its rowid is `chain_id << 40 | seq`, so a (chain, seq) lookup or
  range is a rowid lookup or range and needs no extra index.
- The RECORD link's payload is the record's canonical document. `records` holds only the
  searchable columns derived from it plus `entry` (the ledger rowid of that payload), so the
  document is stored once and is byte-for-byte what the hash covers.
- `records.id` grows with time: `occurred_at in µs * 1024 + tie-breaker`. A time window is
  then a rowid range (FTS5 and the b-tree both seek on it), and a record that arrives late
  simply lands in its place. Ties share the µs slot in arrival order; past 1024 of them a
  record spills into the next slot, and `meta.max_spill_us` widens `before:` bounds by the
  largest spill so time filters stay exact (the exact `occurred_us` check is always there).
  Times outside ±2^53 µs (years 1684-2255) are clamped to the edge slots.
- `observations` and `statuses` are one row per chain entry (a projection of the ledger),
  keyed by record_id rather than by the record row, so an OBSERVE or STATUS that arrives
  before its RECORD (another proxy's chain) needs no special case. Duplicate observations
  collapse when a record is read. The observations a record's own RECORD entry carries are
  numbered 0..n-1 and read through `records.entry`; those of every other entry (OBSERVE, a
  repeated RECORD) are numbered -n..-1, and only those are in the record_id index.
- `attachment_fetches` is the same kind of projection for ATTACHMENT entries (one row per
  fetch attempt, ok or failed). Reading a record merges the newest successful fetch of each
  attachment URL into it (sha256, size, and the media type when the message named none).
- `fts` is an external-content FTS5 table over records(body, subject): the text is stored
  once, snippet() and highlight() still work (they read the content row), and because body
  and subject never change after insert there is nothing to keep in sync with triggers.
  A future purge must issue the FTS5 'delete' command with the old values before deleting
  the row. A contentless table would save nothing here and lose snippets.

Ingest cost (see docs/benchmarks.md): a random-keyed index costs about one page write per
record once the table outgrows a batch, written twice (WAL, then checkpoint), so indexes
hold only what a query plan needs: `records_action` leaves out the allowed majority (a
`verdict:allow` filter scans in time order, which is what its LIMIT wants anyway), and the
observations' record_id index leaves out the rows found through `records.entry`. Every
other index serves an operator of the search language.

SQL text is assembled only from constants of this module (column names, `?` placeholders,
fragments chosen by AST node type); every value from a query or a record is a bound
parameter, which is why the S608 warnings below are silenced line by line.

Every call runs on one dedicated worker thread that owns the connection, so the event loop
never blocks and SQLite sees one writer; an `apply` batch is one transaction.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import math
import re
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from json.encoder import encode_basestring
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive_api.store.audit import (
    AUDIT_CHAIN,
    MAX_APPEND_BATCH,
    AuditEntry,
    AuditEvent,
    AuditFilter,
    AuditHead,
    AuditPage,
    AuditRow,
    AuditVerifier,
    AuditVerifyReport,
    CheckedEntry,
    chain_entry,
    check_entry,
    check_page_args,
    decode_cursor,
    encode_cursor,
    from_us,
    imported_rows,
    to_us,
)
from archive_api.store.base import (
    DEFAULT_CHAIN,
    HIGHLIGHT_END,
    HIGHLIGHT_START,
    MAX_LINKED_RECORDS,
    MAX_PAGE_SIZE,
    SORT_ORDERS,
    Activity,
    ArchiveStore,
    BlocklistEntry,
    BlocklistStore,
    ChainPosition,
    ChainState,
    DayActivity,
    Facets,
    Hit,
    HoldRecord,
    PurgeBatch,
    PurgedRecord,
    RetentionAssignment,
    RetentionState,
    RetentionSubject,
    RetentionSubjectPage,
    RetentionUpdate,
    SearchPage,
    SnippetPart,
    SortOrder,
    Tombstone,
    VerifyProblem,
    VerifyReport,
    check_new_hold,
    check_release,
    parse_marked,
    tombstones_in,
)
from archive_api.store.chain import GENESIS, ChainLink, Checkpoint, link_hash, verify_links
from archive_api.store.errors import (
    AlreadyExists,
    ChainConflict,
    ChainGap,
    InvalidCursor,
    InvalidEntry,
    InvalidRequest,
    NotFound,
    StoreCorrupted,
    StoreError,
    StoreUnavailable,
)
from archive_api.store.query import (
    Clause,
    Flag,
    FlagTerm,
    JidKind,
    JidPattern,
    Party,
    PartyTerm,
    Query,
    RecordType,
    RoomTerm,
    TextTerm,
    TimeBound,
    TimeTerm,
    TypeTerm,
    VerdictTerm,
    as_query,
    jid_domain,
    normalize_jid,
    parse_query,
)
from archive_api.store.records import (
    ArchiveRecord,
    Attachment,
    Direction,
    EntryOp,
    FetchStatus,
    Observation,
    ObservationVia,
    RecordKind,
    RecordStatus,
    SpoolEntry,
)
from archive_api.store.tokens import StoredToken, check_token_name
from classifier.verdict import Action

T = TypeVar("T")

SCHEMA_VERSION: Final = 2

_SEQ_BITS: Final = 40
_SEQ_MASK: Final = (1 << _SEQ_BITS) - 1
_TIE_BITS: Final = 10
_TIES: Final = 1 << _TIE_BITS
# Edge slots leave room above for spills and keep every rowid inside a signed 64-bit int.
_MAX_SLOT: Final = (1 << 53) - (1 << 20)
_MIN_SLOT: Final = -_MAX_SLOT
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_US: Final = 86_400_000_000
_MAX_CHAIN_NAME: Final = 200
_SNIPPET_TOKENS: Final = 16
_PLAIN_SNIPPET_CHARS: Final = 200
_CHUNK: Final = 2000
_MAX_PROBLEMS: Final = 1000
_CURSOR_VERSION: Final = 1
_PAGE_SIZE: Final = 8192
_WAL_CHECKPOINT_BYTES: Final = 128 << 20
_SPILL_BYTES: Final = 128 << 20

_SCHEMA: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value ANY) STRICT;
CREATE TABLE chains (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_seq INTEGER NOT NULL,
    head BLOB NOT NULL
) STRICT;
CREATE TABLE ledger (
    id INTEGER PRIMARY KEY,          -- chain_id << 40 | seq
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    payload BLOB NOT NULL
) STRICT;
CREATE TABLE records (
    id INTEGER PRIMARY KEY,          -- occurred_at µs * 1024 + tie-breaker
    record_id TEXT NOT NULL UNIQUE,
    entry INTEGER NOT NULL UNIQUE,   -- ledger id of the RECORD payload
    occurred_us INTEGER NOT NULL,
    kind TEXT NOT NULL,
    rtype TEXT NOT NULL,             -- what type: matches
    direction TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_full TEXT NOT NULL,
    sender_domain TEXT NOT NULL,
    recipient TEXT NOT NULL,
    recipient_full TEXT NOT NULL,
    recipient_domain TEXT NOT NULL,
    remote_domain TEXT NOT NULL,
    room TEXT,
    action TEXT NOT NULL,
    has_attachment INTEGER NOT NULL,
    encrypted INTEGER NOT NULL,
    message_id TEXT,
    origin_id TEXT,
    replaces_id TEXT,
    retracts_id TEXT,
    body TEXT,
    subject TEXT
) STRICT;
CREATE INDEX records_sender ON records (sender);
CREATE INDEX records_recipient ON records (recipient);
CREATE INDEX records_sender_domain ON records (sender_domain);
CREATE INDEX records_recipient_domain ON records (recipient_domain);
CREATE INDEX records_room ON records (room) WHERE room IS NOT NULL;
CREATE INDEX records_action ON records (action) WHERE action <> 'allow';
CREATE INDEX records_replaces ON records (replaces_id) WHERE replaces_id IS NOT NULL;
CREATE INDEX records_retracts ON records (retracts_id) WHERE retracts_id IS NOT NULL;
CREATE TABLE observations (
    entry INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    record_id TEXT NOT NULL,
    obs TEXT NOT NULL,               -- canonical JSON of one Observation
    PRIMARY KEY (entry, idx)
) STRICT, WITHOUT ROWID;
CREATE INDEX observations_record ON observations (record_id) WHERE idx < 0;
CREATE TABLE statuses (
    entry INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL,
    status TEXT NOT NULL,
    at_us INTEGER,
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL
) STRICT;
CREATE INDEX statuses_record ON statuses (record_id);
CREATE TABLE attachment_fetches (
    entry INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL,
    url TEXT NOT NULL,
    status TEXT NOT NULL,            -- ok, failed
    sha256 TEXT,
    size INTEGER,
    media_type TEXT,
    error TEXT,
    attempt INTEGER NOT NULL,
    at_us INTEGER,
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL
) STRICT;
CREATE INDEX attachment_fetches_record ON attachment_fetches (record_id);
CREATE TABLE checkpoints (
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL,
    head BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (chain, seq, signature)
) STRICT;
CREATE VIRTUAL TABLE fts USING fts5 (
    body, subject,
    content = 'records', content_rowid = 'id',
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO meta (key, value) VALUES ('max_spill_us', 0);
INSERT INTO meta (key, value) VALUES ('layout', 1);
"""

# Schema upgrades, by the version they start from; each runs in the opening transaction.
_MIGRATIONS: Final = {
    1: """
CREATE TABLE attachment_fetches (
    entry INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL,
    url TEXT NOT NULL,
    status TEXT NOT NULL,
    sha256 TEXT,
    size INTEGER,
    media_type TEXT,
    error TEXT,
    attempt INTEGER NOT NULL,
    at_us INTEGER,
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL
) STRICT;
CREATE INDEX attachment_fetches_record ON attachment_fetches (record_id);
""",
}

# Index layout changes that keep the tables as they are, by the `layout` they start from
# (`meta.layout`; a store without it is layout 0). Each runs once, in one transaction at open.
_LAYOUT: Final = 1
_LAYOUT_UPGRADES: Final = {
    # Partial indexes (see the module notes): only OBSERVE and repeated RECORD entries'
    # observations are renumbered -n..-1 and indexed by record_id, and only records that
    # were not simply allowed are indexed by action.
    0: """
DROP INDEX observations_record;
UPDATE observations SET idx = idx - (
    SELECT count(*) FROM observations AS o WHERE o.entry = observations.entry
) WHERE entry NOT IN (SELECT entry FROM records);
CREATE INDEX observations_record ON observations (record_id) WHERE idx < 0;
DROP INDEX records_action;
CREATE INDEX records_action ON records (action) WHERE action <> 'allow';
""",
}

# The columns derived from a record's payload; apply writes them and verify recomputes them
# from the payload with the same function.
_COLUMNS: Final = (
    "record_id",
    "occurred_us",
    "kind",
    "rtype",
    "direction",
    "sender",
    "sender_full",
    "sender_domain",
    "recipient",
    "recipient_full",
    "recipient_domain",
    "remote_domain",
    "room",
    "action",
    "has_attachment",
    "encrypted",
    "message_id",
    "origin_id",
    "replaces_id",
    "retracts_id",
    "body",
    "subject",
)
_BODY_COL: Final = _COLUMNS.index("body")
_SUBJECT_COL: Final = _COLUMNS.index("subject")
_OCCURRED_COL: Final = _COLUMNS.index("occurred_us")
_INSERT_RECORD: Final = (
    f"INSERT INTO records (id, entry, {', '.join(_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' * (len(_COLUMNS) + 2))})"
)

# --- error translation ------------------------------------------------------------------

_UNAVAILABLE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_AUTH,
    }
)
_CORRUPT_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def _translate(exc: sqlite3.Error) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    closed = isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc)
    if closed or primary in _UNAVAILABLE_CODES:
        return StoreUnavailable(f"SQLite store unavailable: {exc}")
    if primary in _CORRUPT_CODES or "no such table" in str(exc) or "no such column" in str(exc):
        return StoreCorrupted(f"SQLite store damaged: {exc}")
    return StoreError(f"SQLite store error: {exc}")


# --- deriving columns from a record's canonical JSON -------------------------------------


_ONE_US: Final = timedelta(microseconds=1)


def _to_us(at: datetime) -> int:
    if at.tzinfo is None:  # records are UTC; a naive stamp is read as UTC, never local time
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // _ONE_US


def _slot(us: int) -> int:
    return min(max(us, _MIN_SLOT), _MAX_SLOT)


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{key} is not a string")
    return value


# The optional string fields `_derive` reads, in one tuple so one C-level pass fetches them.
_STR_FIELDS: Final = (
    "sender",
    "sender_full",
    "recipient",
    "recipient_full",
    "stanza_type",
    "room",
    "message_id",
    "origin_id",
    "replaces_id",
    "retracts_id",
    "body",
    "subject",
)
_STR_OR_NONE: Final = frozenset({str, type(None)})
_MESSAGE: Final = RecordKind.MESSAGE.value
_FROM_CLIENT: Final = Direction.FROM_CLIENT.value
_ALLOW: Final = Action.ALLOW.value


def _derive(rec: dict[str, Any]) -> tuple[Any, ...]:
    """The searchable columns of a record, from its canonical JSON (in `_COLUMNS` order).

    Works on the parsed dict rather than an ArchiveRecord: building the dataclass costs
    several times the JSON parse and would dominate ingest. This runs once per record on
    ingest and again in verify, so it is written for speed: the string fields are fetched
    and type-checked in one pass, and nothing is normalised twice.
    """
    record_id = rec["record_id"]
    if not isinstance(record_id, str) or not record_id:
        raise ValueError("record_id is missing")
    kind = _KINDS[rec["kind"]]
    direction = _DIRECTIONS[rec["direction"]]
    occurred_us = _to_us(datetime.fromisoformat(rec["occurred_at"]))
    values = tuple(map(rec.get, _STR_FIELDS))
    if not _STR_OR_NONE.issuperset(map(type, values)):
        for key, value in zip(_STR_FIELDS, values, strict=True):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{key} is not a string")
    (
        sender,
        sender_full,
        recipient,
        recipient_full,
        stanza_type,
        room,
        message_id,
        origin_id,
        replaces_id,
        retracts_id,
        body,
        subject,
    ) = values
    sender = normalize_jid(sender or "")
    recipient = normalize_jid(recipient or "")
    sender_domain = jid_domain(sender)
    recipient_domain = jid_domain(recipient)
    verdict = rec.get("verdict")
    return (
        record_id,
        occurred_us,
        kind,
        (stanza_type or "normal") if kind == _MESSAGE else kind,
        direction,
        sender,
        normalize_jid(sender_full or ""),
        sender_domain,
        recipient,
        normalize_jid(recipient_full or ""),
        recipient_domain,
        # Same rule as ArchiveRecord.remote_domain, on the normalised JIDs.
        recipient_domain if direction == _FROM_CLIENT else sender_domain,
        normalize_jid(room) if room else None,
        _ACTIONS[verdict["action"]] if verdict else _ALLOW,
        1 if rec.get("attachments") else 0,
        1 if rec.get("encryption") else 0,
        message_id,
        origin_id,
        replaces_id,
        retracts_id,
        body,
        subject,
    )


# value -> value (a plain str): a dict look-up both checks a value and normalises it to str.
_KINDS: Final = {k.value: k.value for k in RecordKind}
_DIRECTIONS: Final = {d.value: d.value for d in Direction}
_VIAS: Final = frozenset(v.value for v in ObservationVia)
_ACTIONS: Final = {a.value: a.value for a in Action}
_OPS: Final = {op.value: op for op in EntryOp}
_OBSERVATION_KEYS: Final = frozenset({"at", "jid", "via", "direction"})


def _obs_text(data: Any) -> str:
    """Canonical text of one observation, after checking it is one (what from_json needs).

    Byte for byte `canonical_json(data).decode()`: once checked, an observation is exactly
    four string fields, so the text is assembled from their JSON string forms in sorted key
    order, with the encoder `json.dumps(..., ensure_ascii=False)` itself uses for strings.
    """
    if (
        not isinstance(data, dict)
        or data.keys() != _OBSERVATION_KEYS
        or not isinstance(jid := data["jid"], str)
        or (via := data["via"]) not in _VIAS
        or (direction := data["direction"]) not in _DIRECTIONS
    ):
        raise ValueError("malformed observation")
    at = data["at"]
    datetime.fromisoformat(at)  # also proves `at` is a string
    text: str = (
        f'{{"at":{encode_basestring(at)},"direction":{encode_basestring(direction)},'
        f'"jid":{encode_basestring(jid)},"via":{encode_basestring(via)}}}'
    )
    if not text.isascii():
        text.encode()  # like canonical_json, refuse what is not valid UTF-8 (lone surrogates)
    return text


def _status_row(entry_json: dict[str, Any]) -> tuple[str, int | None]:
    status = RecordStatus(entry_json["status"]).value
    at = entry_json.get("at")
    return status, _to_us(datetime.fromisoformat(at)) if at else None


_HEX: Final = frozenset("0123456789abcdef")
_FetchRow = tuple[str, str, str | None, int | None, str | None, str | None, int, int | None]


def _fetch_row(entry_json: dict[str, Any]) -> _FetchRow:
    """(url, status, sha256, size, media_type, error, attempt, at_us) of an ATTACHMENT entry."""
    fetch = entry_json["fetch"]
    if not isinstance(fetch, dict):
        raise ValueError("malformed attachment fetch")
    url = fetch["url"]
    if not isinstance(url, str) or not url:
        raise ValueError("attachment fetch without a url")
    status = FetchStatus(fetch["status"])
    attempt, size = fetch["attempt"], fetch.get("size")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise ValueError("attachment fetch attempt must be a positive integer")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ValueError("attachment size must be a non-negative integer")
    sha256 = _opt_str(fetch, "sha256")
    if sha256 is not None and (len(sha256) != 64 or not _HEX.issuperset(sha256)):
        raise ValueError("attachment sha256 must be 64 lower-case hex digits")
    if status is FetchStatus.OK and (sha256 is None or size is None):
        raise ValueError("a successful attachment fetch needs sha256 and size")
    at = entry_json.get("at")
    return (
        url,
        status.value,
        sha256,
        size,
        _opt_str(fetch, "media_type"),
        _opt_str(fetch, "error"),
        attempt,
        _to_us(datetime.fromisoformat(at)) if at else None,
    )


class _Parsed(NamedTuple):
    """What apply and verify need from one payload (a tuple: built once per entry, fast)."""

    op: EntryOp
    record_id: str
    columns: tuple[Any, ...] | None
    observations: tuple[str, ...]
    status: tuple[str, int | None] | None
    fetch: _FetchRow | None = None


_ObsRow = tuple[int, int, str, str]  # entry, idx, record_id, obs


def _observation_rows(entry: int, parsed: _Parsed, *, own: bool) -> list[_ObsRow]:
    """The observations rows of one entry.

    A RECORD that creates its record's row (`own`) numbers its observations 0..n-1 and they
    are found through `records.entry`; every other entry (OBSERVE, a repeated RECORD) numbers
    them -n..-1, which puts them, and only them, in the `observations_record` index.
    """
    texts = parsed.observations
    start = 0 if own else -len(texts)
    rid = parsed.record_id
    return [(entry, start + i, rid, text) for i, text in enumerate(texts)]


def _loads(payload: bytes) -> Any:
    """`json.loads` at about a third of the cost, for the payloads the pipeline writes.

    orjson refuses a few things the standard parser reads (NaN, numbers out of float range,
    lone surrogates, UTF-16 input); those go to the standard parser, so the same payloads
    parse to the same values. The one difference: an integer beyond 64 bits comes back as a
    float. No derived column is a number, and the attachment fetch checks refuse a float
    where the insert would have refused such an integer before.
    """
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return json.loads(payload)


def _parse_payload(payload: bytes) -> _Parsed:
    """Parse and check one payload; raise ValueError (or a subclass) when it is not valid."""
    try:
        data = _loads(payload)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        op = _OPS.get(data["op"])
        if op is None:
            raise ValueError(f"unknown op {data['op']!r}")
        record_id = data["record_id"]
        if not isinstance(record_id, str) or not record_id:
            raise ValueError("record_id is missing")
        if op is EntryOp.RECORD:
            rec = data["record"]
            columns = _derive(rec)
            if columns[0] != record_id:
                raise ValueError("the record's id differs from the entry's record_id")
            observations = tuple(_obs_text(o) for o in rec.get("observations", []))
            return _Parsed(op, record_id, columns, observations, None)
        if op is EntryOp.OBSERVE:
            return _Parsed(op, record_id, None, (_obs_text(data["observation"]),), None)
        if op is EntryOp.ATTACHMENT:
            return _Parsed(op, record_id, None, (), None, _fetch_row(data))
        return _Parsed(op, record_id, None, (), _status_row(data))
    except (KeyError, TypeError, AttributeError, OverflowError, UnicodeDecodeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc


# --- translating the query AST -----------------------------------------------------------


def _fts_phrase(term: TextTerm) -> str:
    """One term as an FTS5 string: always a quoted phrase, so no user text is ever syntax."""
    # Control characters separate tokens anyway, and FTS5 stops reading at a NUL.
    cleaned = "".join(" " if ord(ch) < 32 or ch == "\x7f" else ch for ch in term.text)
    phrase = '"' + cleaned.replace('"', '""') + '"'
    if term.prefix and any(ch.isalnum() for ch in cleaned):
        phrase += " *"
    return phrase


@dataclass(frozen=True, slots=True)
class _Plan:
    """A query as SQL: `FROM {source} WHERE {where}`, with the id column to order by."""

    match: str | None  # FTS5 expression of the positive text terms, bound as the first param
    where: str
    params: tuple[Any, ...]
    # With text: which side drives the join. Text first (the default) walks the FTS5 matches
    # in time order; filter first walks an index of a selective filter (a person, a domain)
    # and asks FTS5 about each of its rows. Same rows, same order; see _choose_plan.
    filter_first: bool = False

    @property
    def id_col(self) -> str:
        return "fts.rowid" if self.match is not None and not self.filter_first else "r.id"

    @property
    def source(self) -> str:
        # CROSS JOIN fixes the outer loop. fts outside yields rowids already in time order and
        # honours rowid ranges, which is what makes LIMIT cheap; records outside yields them
        # in time order from an equality index (sender = ?, ...) and FTS5 seeks each rowid.
        if self.match is not None and self.filter_first:
            return "records AS r CROSS JOIN fts ON fts.rowid = r.id"
        if self.match is not None:
            return "fts CROSS JOIN records AS r ON r.id = fts.rowid"
        return "records AS r"

    @property
    def text_only(self) -> bool:
        """Positive text and nothing else: the FTS5 table alone answers a count."""
        return self.match is not None and self.where == "fts MATCH ?" and not self.params

    def all_params(self) -> tuple[Any, ...]:
        return ((self.match,) if self.match is not None else ()) + self.params


def _party_sql(side: str, jid: JidPattern) -> tuple[str, list[Any]]:
    if jid.kind is JidKind.DOMAIN:
        return f"r.{side}_domain = ?", [jid.value]
    if jid.kind is JidKind.BARE:
        return f"r.{side} = ?", [jid.value]
    # The bare column is indexed; the full one only narrows what the index found.
    return f"(r.{side} = ? AND r.{side}_full = ?)", [jid.bare, jid.value]


# A correction or retraction is linked to its original by the original's id from the same
# sender. The subquery probes the small partial index; INDEXED BY because without
# statistics the planner may pick records_sender, which can be huge for one busy sender.
# Alone, is:edited walks the (time-ordered) records; combine it with a window or a party.
_EDITED_SQL: Final = (
    "(r.replaces_id IS NOT NULL OR EXISTS (SELECT 1 FROM records AS c "
    "INDEXED BY records_replaces "
    "WHERE c.replaces_id IN (r.message_id, r.origin_id) AND c.sender = r.sender))"
)
_RETRACTED_SQL: Final = (
    "(r.retracts_id IS NOT NULL OR EXISTS (SELECT 1 FROM records AS c "
    "INDEXED BY records_retracts "
    "WHERE c.retracts_id IN (r.message_id, r.origin_id) AND c.sender = r.sender))"
)


def _rowid_bound(term: TimeTerm, max_spill: int) -> int | None:
    """The rowid an `after:` (>=) or `before:` (<) bound implies, None where slots clamp."""
    us = _to_us(term.at)
    if term.bound is TimeBound.AFTER and _MIN_SLOT < us <= _MAX_SLOT:
        return us * _TIES
    if term.bound is TimeBound.BEFORE and _MIN_SLOT < us < _MAX_SLOT - max_spill:
        return (us + max_spill) * _TIES
    return None


def _filter_sql(clause: Clause, id_col: str, max_spill: int) -> tuple[str, list[Any]]:
    term = clause.term
    match term:
        case PartyTerm(party=party, jid=jid):
            if party is Party.FROM:
                return _party_sql("sender", jid)
            if party is Party.TO:
                return _party_sql("recipient", jid)
            left, left_params = _party_sql("sender", jid)
            right, right_params = _party_sql("recipient", jid)
            return f"({left} OR {right})", left_params + right_params
        case RoomTerm(room=room):
            if room.kind is JidKind.DOMAIN:
                return "substr(r.room, instr(r.room, '@') + 1) = ?", [room.value]
            return "r.room = ?", [room.value]
        case TimeTerm(bound=bound, at=at):
            us = _to_us(at)
            exact = "r.occurred_us >= ?" if bound is TimeBound.AFTER else "r.occurred_us < ?"
            # The rowid bound is what makes the window fast; it is a superset of the exact
            # one (spills only move records later), so both together are exact.
            rowid = _rowid_bound(term, max_spill)
            if rowid is not None:
                compare = ">=" if bound is TimeBound.AFTER else "<"
                return f"({id_col} {compare} ? AND {exact})", [rowid, us]
            return exact, [us]
        case TypeTerm(type=record_type):
            if record_type is RecordType.FILE:
                return "(r.rtype = ? OR r.has_attachment = 1)", [record_type.value]
            return "r.rtype = ?", [record_type.value]
        case VerdictTerm(action=action):
            if action is Action.ALLOW:  # most records: a scan in time order is the plan
                return "r.action = ?", [action.value]
            # Repeating the partial index's condition is what lets the planner use it.
            return "(r.action = ? AND r.action <> 'allow')", [action.value]
        case FlagTerm(flag=flag):
            return {
                Flag.ATTACHMENT: "r.has_attachment = 1",
                Flag.ENCRYPTED: "r.encrypted = 1",
                Flag.EDITED: _EDITED_SQL,
                Flag.RETRACTED: _RETRACTED_SQL,
            }[flag], []
        case TextTerm():
            raise AssertionError("text terms are translated to FTS5, not to filters")


def _plan(query: Query, max_spill: int, *, filter_first: bool = False) -> _Plan:
    positive: list[str] = []
    negative: list[str] = []
    for clause in query.text_clauses:
        if isinstance(clause.term, TextTerm):
            (negative if clause.negated else positive).append(_fts_phrase(clause.term))
    match: str | None = None
    where: list[str] = []
    params: list[Any] = []
    if positive:
        match = " AND ".join(positive)
        if negative:
            match = f"({match}) NOT ({' OR '.join(negative)})"
        where.append("fts MATCH ?")
    elif negative:
        where.append("r.id NOT IN (SELECT rowid FROM fts WHERE fts MATCH ?)")
        params.append(" OR ".join(negative))
    filter_first = filter_first and match is not None
    id_col = "fts.rowid" if match is not None and not filter_first else "r.id"
    for clause in query.filter_clauses:
        sql, clause_params = _filter_sql(clause, id_col, max_spill)
        # `IS NOT 1` rather than NOT: a NULL column (no room, say) must count as "not this".
        where.append(f"({sql}) IS NOT 1" if clause.negated else sql)
        params.extend(clause_params)
    return _Plan(match, " AND ".join(where) or "1", tuple(params), filter_first)


# Document-local relevance: matched spans (subject counts double) per length of body. No
# corpus statistics, so a record's score never moves and relevance cursors stay stable.
_SCORE_SQL: Final = (
    "((2.0 * coalesce(length(highlight(fts, 1, char(2), '')) - length(r.subject), 0)"
    " + coalesce(length(highlight(fts, 0, char(2), '')) - length(r.body), 0))"
    " / (1.0 + length(coalesce(r.body, '')) / 500.0))"
)


# --- choosing the join order -----------------------------------------------------------------

# A probe counts at most this many rows: enough to tell a person's few hundred messages from
# a word in tens of thousands, in a millisecond or two.
_PROBE_CAP: Final = 20_000
# Below this many text matches, walking all of them is cheap whatever the filters are.
_FEW_TEXT_MATCHES: Final = 2_000
# An FTS5 seek for one rowid costs about ten lookups of a records row by rowid (it visits
# every index segment); filter first only pays when the filter keeps that many times fewer.
_SEEK_COST_RATIO: Final = 10


_SIDES: Final = {
    Party.FROM: ("sender",),
    Party.TO: ("recipient",),
    Party.WITH: ("sender", "recipient"),
}


def _probe_sql(clause: Clause) -> tuple[str, list[Any]] | None:
    """An indexed condition that a positive filter implies, to count its rows from the index
    alone; None for a filter that no index answers by itself."""
    if clause.negated:
        return None
    match clause.term:
        case PartyTerm(party=party, jid=jid):
            # A full JID is counted by its bare part: an upper bound, and index-only.
            pattern = JidPattern(JidKind.BARE, jid.bare) if jid.kind is JidKind.FULL else jid
            parts = [_party_sql(side, pattern) for side in _SIDES[party]]
            return "(" + " OR ".join(sql for sql, _ in parts) + ")", [
                value for _, values in parts for value in values
            ]
        case RoomTerm(room=room) if room.kind is not JidKind.DOMAIN:
            return "r.room = ?", [room.value]
        case VerdictTerm(action=action) if action is not Action.ALLOW:
            return _filter_sql(clause, "r.id", 0)
        case _:
            return None


# Facets pass over slices of about this many records (see SqliteStore._facets); at most
# this many slices, so a sparse query over a long archive stays a few hundred seeks.
_FACET_SLICE_RECORDS: Final = 100_000
_MAX_FACET_SLICES: Final = 1000


def _by_severity(counted: tuple[Action, int]) -> int:
    return counted[0].severity


def _capped_count(conn: sqlite3.Connection, source: str, params: Sequence[Any]) -> int:
    (total,) = conn.execute(
        f"SELECT count(*) FROM (SELECT 1 FROM {source} LIMIT ?)",  # noqa: S608
        (*params, _PROBE_CAP),
    ).fetchone()
    return int(total)


def _choose_plan(conn: sqlite3.Connection, query: Query) -> _Plan:
    """The plan of a search, count or facets: text first unless a filter is far narrower.

    Text first is right for rare words and for filters most records pass; for a common word
    and one person (`trade from:alice`) it walks every match of the word to find the few
    that are hers, where filter first reads her rows from an index and asks FTS5 about each.
    Both give the same rows in the same order; bounded counts decide which is cheaper.
    """
    max_spill = _max_spill(conn)
    plan = _plan(query, max_spill)
    if plan.match is None:
        return plan
    probes = [probe for clause in query.filter_clauses if (probe := _probe_sql(clause))]
    if not probes:
        return plan
    text_rows = _capped_count(conn, "fts WHERE fts MATCH ?", (plan.match,))
    if text_rows < _FEW_TEXT_MATCHES:
        return plan
    filter_rows = min(
        _capped_count(conn, f"records AS r WHERE {sql}", params) for sql, params in probes
    )
    if filter_rows * _SEEK_COST_RATIO < text_rows:
        return _plan(query, max_spill, filter_first=True)
    return plan


# --- relevance without scoring every match ---------------------------------------------------

_INSTANCES_TABLE: Final = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.fts_instances USING fts5vocab(main, fts, instance)"
)
# Per term: in how many records, and how many times in all.
_TERMS_TABLE: Final = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.fts_terms USING fts5vocab(main, fts, row)"
)
# What unicode61 makes of ASCII text: runs of letters and digits, lower-cased.
_ASCII_TOKEN: Final = re.compile(r"[0-9a-z]+")


def _instance_probe(term: TextTerm) -> tuple[str, list[Any]] | None:
    """A condition on fts5vocab's `term` that one token of every instance of the phrase meets.

    Only for ASCII text, whose tokens the regex finds exactly as FTS5 does; None for other
    text (its folding is FTS5's own) and for a term without a token.
    """
    if not term.text.isascii():
        return None
    tokens = _ASCII_TOKEN.findall(term.text.lower())
    if not tokens:
        return None
    whole = tokens[:-1] if term.prefix else tokens
    if whole:
        return "term = ?", [max(whole, key=len)]  # the longest: likely the rarest
    prefix = tokens[-1]  # every term that starts with these bytes
    return "term >= ? AND term < ?", [prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)]


def _relevance_sql(
    plan: _Plan,
    after: tuple[int, float | None] | None,
    limit: int,
    *,
    candidates: Sequence[int] | None = None,
    floor: float | None = None,
) -> tuple[str, list[Any]]:
    """The page after `after` by relevance; only among `candidates` and above `floor` if given."""
    score_sql = _SCORE_SQL if plan.match is not None else "0.0"
    params = list(plan.all_params())
    where = plan.where
    if candidates is not None:
        # `+` keeps FTS5 from taking the list as rowids to seek one by one (a seek costs a
        # visit to every index segment); each match is looked up in the list instead.
        where += f" AND +{plan.id_col} IN (SELECT value FROM json_each(?))"  # noqa: S608
        params.append(json.dumps(list(candidates)))
    outer = []
    if floor is not None:
        outer.append("score > ?")
        params.append(float(floor))
    if after is not None:
        outer.append("(score < ? OR (score = ? AND id < ?))")
        params += [after[1], after[1], after[0]]
    sql = (
        f"SELECT id, record_id, score FROM (SELECT {plan.id_col} AS id, r.record_id AS "  # noqa: S608
        f"record_id, {score_sql} AS score FROM {plan.source} WHERE {where}) "
        f"{'WHERE ' + ' AND '.join(outer) if outer else ''} ORDER BY score DESC, id DESC LIMIT ?"
    )
    params.append(limit + 1)
    return sql, params


def _relevance_shortcut(
    conn: sqlite3.Connection,
    query: Query,
    plan: _Plan,
    limit: int,
    after: tuple[int, float | None] | None,
) -> list[tuple[int, str, float]] | None:
    """The page by relevance from the few records that can top it, or None to score them all.

    The score (_SCORE_SQL) is matched spans, subject ones twice, over 1 + len(body)/500, and
    a phrase has no more instances in a column than any one of its tokens. So a record whose
    tokens (one per phrase) occur n times, subject ones twice, scores at most n, and below n
    unless it has no body. fts5vocab counts the tokens from the index alone, without reading
    a record; only records with n above a floor are scored. If more than `limit` of them
    score above the floor, nothing else can come before them: they are the page, exactly.
    """
    probes = []
    for clause in query.text_clauses:
        if isinstance(clause.term, TextTerm) and not clause.negated:
            probe = _instance_probe(clause.term)
            if probe is None:
                return None
            probes.append(probe)
    if not probes or plan.filter_first:
        return None
    conn.execute(_INSTANCES_TABLE)
    conn.execute(_TERMS_TABLE)
    # Counting the tokens costs a microsecond or two per instance, scoring a match about
    # ten. The shortcut counts every instance of the tokens and scores the records with
    # more than one; it loses when many records have several (`the`), or when the phrases
    # meet in few records (`deal price`): then scoring those few is the cheaper way.
    stats = [
        conn.execute(
            f"SELECT coalesce(sum(doc), 0), coalesce(sum(cnt), 0) FROM temp.fts_terms "  # noqa: S608
            f"WHERE {sql}",
            probe_values,
        ).fetchone()
        for sql, probe_values in probes
    ]
    instances = sum(cnt for _, cnt in stats)
    # Records with a token more than once (the candidates, bar subject matches) number at
    # most the instances beyond one per record.
    extra = sum(cnt - docs for docs, cnt in stats)
    if extra <= limit or 4 * extra > min(docs for docs, _ in stats):
        return None
    if len(probes) > 1:  # one phrase: its token's records are about its matches
        matches = _capped_count(conn, "fts WHERE fts MATCH ?", (plan.match,))
        if matches < _PROBE_CAP and matches * 10 < instances:
            return None
    values = [value for _, probe_values in probes for value in probe_values]
    union = " UNION ALL ".join(
        f"SELECT doc, col FROM temp.fts_instances WHERE {sql}"  # noqa: S608
        for sql, _ in probes
    )
    floors = (2 * len(probes), len(probes))
    tokens: dict[int, int] = dict(
        conn.execute(
            f"SELECT doc, count(*) + count(*) FILTER (WHERE col = 'subject') AS n "  # noqa: S608
            f"FROM ({union}) GROUP BY doc HAVING n > ?",
            (*values, floors[-1]),
        ).fetchall()
    )
    if len(tokens) <= limit:
        return None
    # Which of them match the whole query, and their body lengths: the length of the body,
    # read without tokenising it, bounds the score further (highlight() is the costly part).
    sql = (
        f"SELECT {plan.id_col}, length(coalesce(r.body, '')) FROM {plan.source} "  # noqa: S608
        f"WHERE {plan.where} AND +{plan.id_col} IN (SELECT value FROM json_each(?))"
    )
    matching = conn.execute(sql, (*plan.all_params(), json.dumps(list(tokens)))).fetchall()
    for floor in floors:
        # The same float operations as _SCORE_SQL, with the token count for the spans: an
        # upper bound of the score that SQLite will compute, never below it.
        candidates = [
            rowid for rowid, length in matching if tokens[rowid] / (1.0 + length / 500.0) > floor
        ]
        if len(candidates) <= limit:
            continue
        sql, params = _relevance_sql(plan, after, limit, candidates=candidates, floor=floor)
        rows: list[tuple[int, str, float]] = conn.execute(sql, params).fetchall()
        if len(rows) > limit:
            return rows
    return None


# --- cursors -----------------------------------------------------------------------------


def _query_key(query: Query, sort: SortOrder) -> str:
    return hashlib.sha256(f"{sort}\n{query}".encode()).hexdigest()[:16]


def _encode_cursor(query: Query, sort: SortOrder, last_id: int, score: float | None) -> str:
    data = [_CURSOR_VERSION, _query_key(query, sort), last_id, score]
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, query: Query, sort: SortOrder) -> tuple[int, float | None]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, key, last_id, score = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidCursor("malformed paging cursor") from None
    if version != _CURSOR_VERSION or key != _query_key(query, sort):
        raise InvalidCursor("the paging cursor belongs to a different query or sort order")
    if not isinstance(last_id, int) or isinstance(last_id, bool) or abs(last_id) >= 1 << 63:
        raise InvalidCursor("malformed paging cursor")
    if sort == "relevance" and (
        not isinstance(score, float | int) or isinstance(score, bool) or not math.isfinite(score)
    ):
        raise InvalidCursor("malformed paging cursor")
    return last_id, float(score) if sort == "relevance" else None


# --- the store -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ChainRow:
    id: int
    name: str
    last_seq: int
    head: bytes


def _check_chain_name(chain: str) -> None:
    if not chain or len(chain) > _MAX_CHAIN_NAME or not chain.isprintable():
        raise InvalidRequest(f"invalid chain name {chain[:40]!r}")


class SqliteStore:
    """`ArchiveStore` on one SQLite file. Create with `await SqliteStore.open(path)`."""

    def __init__(self, path: Path, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self._path = path
        self._executor = executor
        self._conn = conn
        self._closed = False

    # -- lifecycle --

    @classmethod
    async def open(
        cls, path: str | PathLike[str], *, cache_mb: int = 64, busy_timeout_ms: int = 5000
    ) -> SqliteStore:
        """Open (creating if needed) the store file; ":memory:" works for throwaway stores.

        `busy_timeout_ms` is how long to wait for another process holding the write lock
        (a CLI `verify` or `reindex` on the same file) before StoreUnavailable.
        """
        target = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(
                executor, functools.partial(_connect, str(path), cache_mb, busy_timeout_ms)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(target, executor, conn)

    @property
    def path(self) -> Path:
        return self._path

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, _close, self._conn)
        finally:
            self._executor.shutdown(wait=True)

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(_guard, fn, *args))

    # -- ingest --

    async def apply(
        self, links: Sequence[ChainLink], *, chain: str = DEFAULT_CHAIN, tombstones: bool = False
    ) -> None:
        _check_chain_name(chain)
        if links:
            await self._run(self._apply, chain, tuple(links), tombstones)

    def _apply(self, chain: str, links: tuple[ChainLink, ...], tombstones: bool = False) -> None:
        conn = self._conn
        first = links[0].seq
        for offset, link in enumerate(links):
            if link.seq != first + offset:
                raise ChainGap(chain, first + offset, f"the batch jumps to seq {link.seq}")
        if first < 1 or links[-1].seq > _SEQ_MASK:
            raise InvalidRequest(f"seq out of range in chain {chain!r}")
        with _transaction(conn):
            row = _chain_row(conn, chain, create=True)
            assert row is not None
            base = row.id << _SEQ_BITS
            old = [link for link in links if link.seq <= row.last_seq]
            if old:
                stored = dict(
                    conn.execute(
                        "SELECT id, hash FROM ledger WHERE id BETWEEN ? AND ?",
                        (base | old[0].seq, base | old[-1].seq),
                    ).fetchall()
                )
                for link in old:
                    if stored.get(base | link.seq) != link.hash:
                        raise ChainConflict(
                            chain, link.seq, "differs from the entry already applied (fork?)"
                        )
            new = links[len(old) :]
            if not new:
                return
            moved = _moved_tombstones(conn, chain, new) if tombstones else frozenset()
            broken = verify_links(
                new, start_seq=row.last_seq + 1, start_prev=row.head, unhashable=moved
            )
            if broken is not None:
                if broken.seq == row.last_seq + 1 and new[0].seq > row.last_seq + 1:
                    raise ChainGap(chain, broken.seq, f"not applied yet; {broken.problem}")
                raise ChainConflict(chain, broken.seq, broken.problem)
            self._ingest(conn, chain, base, new, moved)
            conn.execute(
                "UPDATE chains SET last_seq = ?, head = ? WHERE id = ?",
                (new[-1].seq, new[-1].hash, row.id),
            )

    def _ingest(
        self,
        conn: sqlite3.Connection,
        chain: str,
        base: int,
        links: Sequence[ChainLink],
        moved_tombstones: frozenset[int] = frozenset(),
    ) -> None:
        ledger_rows = []
        obs_rows: list[tuple[int, int, str, str]] = []
        status_rows = []
        fetch_rows = []
        fresh: list[tuple[int, _Parsed]] = []
        for link in links:
            entry = base | link.seq
            ledger_rows.append((entry, link.prev_hash, link.hash, link.payload))
            if link.seq in moved_tombstones:
                continue  # a purged entry of a moved archive: nothing left to index
            try:
                parsed = _parse_payload(link.payload)
            except ValueError as exc:
                raise InvalidEntry(chain, link.seq, f"not a valid spool entry ({exc})") from None
            if parsed.columns is not None:
                fresh.append((entry, parsed))  # its observations are filed with its row
            elif parsed.observations:
                obs_rows.extend(_observation_rows(entry, parsed, own=False))
            if parsed.status is not None:
                status, at_us = parsed.status
                status_rows.append((entry, parsed.record_id, status, at_us, chain, link.seq))
            if parsed.fetch is not None:
                fetch_rows.append((entry, parsed.record_id, *parsed.fetch, chain, link.seq))
        # Holds/retention section: entries of records purged before stay tombstones.
        _entomb_arrivals(conn, ledger_rows, fresh, obs_rows, status_rows, fetch_rows)
        if fresh:
            obs_rows.extend(self._insert_records(conn, fresh))
        conn.executemany(
            "INSERT INTO ledger (id, prev_hash, hash, payload) VALUES (?, ?, ?, ?)", ledger_rows
        )
        conn.executemany(
            "INSERT INTO observations (entry, idx, record_id, obs) VALUES (?, ?, ?, ?)", obs_rows
        )
        conn.executemany(
            "INSERT INTO statuses (entry, record_id, status, at_us, chain, seq) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            status_rows,
        )
        conn.executemany(
            "INSERT INTO attachment_fetches (entry, record_id, url, status, sha256, size, "
            "media_type, error, attempt, at_us, chain, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            fetch_rows,
        )

    @staticmethod
    def _insert_records(
        conn: sqlite3.Connection, fresh: Sequence[tuple[int, _Parsed]]
    ) -> list[_ObsRow]:
        """Insert the records rows (and their FTS rows) a batch's RECORD entries create.

        Returns the observations rows of these entries, numbered by whether each entry got
        its own records row.
        """
        known = _existing_record_ids(conn, [parsed.record_id for _, parsed in fresh])
        allocator = _RowidAllocator(conn)
        rows: list[tuple[Any, ...]] = []
        obs_rows: list[_ObsRow] = []
        for entry, parsed in fresh:
            columns = parsed.columns
            # A repeated RECORD for a known id only contributes its observations.
            own = columns is not None and parsed.record_id not in known
            obs_rows.extend(_observation_rows(entry, parsed, own=own))
            if columns is None or not own:
                continue
            known.add(parsed.record_id)
            rowid = allocator.allocate(columns[_OCCURRED_COL])
            if rowid is not None:
                rows.append((rowid, entry, *columns))
                continue
            # The slot is full. The gap search reads the table, so everything allocated so
            # far must be in it, and so must the spilled row before anything else is handed
            # out in the slot it lands in.
            _write_records(conn, rows)
            rows = []
            _write_records(conn, [(allocator.spill(columns[_OCCURRED_COL]), entry, *columns)])
        _write_records(conn, rows)
        allocator.save()
        return obs_rows

    async def last_seq(self, *, chain: str = DEFAULT_CHAIN) -> int:
        _check_chain_name(chain)
        row = await self._run(lambda: _chain_row(self._conn, chain, create=False))
        return row.last_seq if row is not None else 0

    async def chains(self) -> tuple[str, ...]:
        rows = await self._run(
            lambda: self._conn.execute("SELECT name FROM chains ORDER BY name").fetchall()
        )
        return tuple(name for (name,) in rows)

    # -- reading --

    async def get(self, record_id: str) -> ArchiveRecord | None:
        records = await self._run(self._load_records, [record_id])
        return records.get(record_id)

    def _load_records(self, record_ids: Sequence[str]) -> dict[str, ArchiveRecord]:
        """Full records (payload + merged observations + effective status) by record_id."""
        conn = self._conn
        out: dict[str, ArchiveRecord] = {}
        if not record_ids:
            return out
        marks = ", ".join("?" * len(record_ids))
        rows = conn.execute(
            f"SELECT r.record_id, r.entry, l.payload FROM records AS r JOIN ledger AS l "  # noqa: S608
            f"ON l.id = r.entry WHERE r.record_id IN ({marks})",
            tuple(record_ids),
        ).fetchall()
        # A record's own observations sit under its RECORD entry; later ones (OBSERVE,
        # repeated RECORDs) are found by record_id. Together, in (entry, idx) order.
        own_of = {entry: rid for rid, entry, _ in rows}
        found: list[tuple[int, int, str, str]] = []
        if own_of:
            found += (
                (entry, idx, own_of[entry], text)
                for entry, idx, text in conn.execute(
                    f"SELECT entry, idx, obs FROM observations "  # noqa: S608
                    f"WHERE entry IN ({', '.join('?' * len(own_of))}) AND idx >= 0",
                    tuple(own_of),
                )
            )
        found += conn.execute(
            f"SELECT entry, idx, record_id, obs FROM observations "  # noqa: S608
            f"WHERE record_id IN ({marks}) AND idx < 0",
            tuple(record_ids),
        ).fetchall()
        obs_rows = [(rid, text) for _, _, rid, text in sorted(found)]
        # Later rows win: ordered by the documented precedence (at, chain, seq).
        status_rows = conn.execute(
            f"SELECT record_id, status FROM statuses WHERE record_id IN ({marks}) "  # noqa: S608
            "ORDER BY at_us IS NOT NULL, at_us, chain, seq",
            tuple(record_ids),
        ).fetchall()
        # The newest successful fetch of each attachment wins, by the same precedence.
        fetch_rows = conn.execute(
            f"SELECT record_id, url, sha256, size, media_type FROM attachment_fetches "  # noqa: S608
            f"WHERE record_id IN ({marks}) AND status = 'ok' "
            "ORDER BY at_us IS NOT NULL, at_us, chain, seq",
            tuple(record_ids),
        ).fetchall()
        fetched = {(rid, url): (sha, size, media) for rid, url, sha, size, media in fetch_rows}
        try:
            observations: dict[str, list[Observation]] = {}
            for rid, text in obs_rows:
                seen = observations.setdefault(rid, [])
                observation = Observation.from_json(json.loads(text))
                if observation not in seen:
                    seen.append(observation)
            statuses = {rid: RecordStatus(status) for rid, status in status_rows}
            for rid, _, payload in rows:
                record = SpoolEntry.from_payload(payload).record
                if record is None:
                    raise ValueError("the stored payload is not a RECORD entry")
                out[rid] = replace(
                    record,
                    attachments=_merge_fetches(rid, record.attachments, fetched),
                    observations=tuple(observations.get(rid, ())),
                    status=statuses.get(rid, record.status),
                )
        except (ValueError, KeyError, TypeError) as exc:
            # Only tampering or a bug gets here: apply checked all of it on the way in.
            raise StoreCorrupted(f"stored record data unreadable ({exc})") from exc
        return out

    async def search(
        self,
        query: Query | str,
        *,
        limit: int = 50,
        cursor: str | None = None,
        sort: SortOrder = "time",
    ) -> SearchPage:
        parsed = as_query(query)
        if sort not in SORT_ORDERS:
            raise InvalidRequest(f"unknown sort order {sort!r}")
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        after = _decode_cursor(cursor, parsed, sort) if cursor is not None else None
        return await self._run(self._search, parsed, limit, after, sort)

    def _search(
        self,
        query: Query,
        limit: int,
        after: tuple[int, float | None] | None,
        sort: SortOrder,
    ) -> SearchPage:
        conn = self._conn
        plan = _choose_plan(conn, query)
        id_col = plan.id_col
        rows: list[tuple[int, str, float | None]]
        if sort == "relevance":
            shortcut = _relevance_shortcut(conn, query, plan, limit, after)
            if shortcut is not None:
                rows = list(shortcut)
            else:
                sql, params = _relevance_sql(plan, after, limit)
                rows = conn.execute(sql, params).fetchall()
        else:
            params = list(plan.all_params())
            direction, compare = ("DESC", "<") if sort == "time" else ("ASC", ">")
            keyset = f" AND {id_col} {compare} ?" if after is not None else ""
            if after is not None:
                params.append(after[0])
            sql = (
                f"SELECT {id_col}, r.record_id, NULL FROM {plan.source} "  # noqa: S608
                f"WHERE {plan.where}{keyset} ORDER BY {id_col} {direction} LIMIT ?"
            )
            params.append(limit + 1)
            rows = conn.execute(sql, params).fetchall()
        page, more = rows[:limit], len(rows) > limit
        records = self._load_records([rid for _, rid, _ in page])
        snippets = self._snippets(plan, [rowid for rowid, _, _ in page])
        hits = []
        for rowid, rid, score in page:
            record = records.get(rid)
            if record is None:
                raise StoreCorrupted(f"record {rid} has no stored payload")
            hits.append(
                Hit(
                    record,
                    snippets.get(rowid, ()),
                    float(score) if sort == "relevance" and score is not None else None,
                )
            )
        next_cursor = None
        if more and page:
            last_id, _, last_score = page[-1]
            next_cursor = _encode_cursor(
                query,
                sort,
                last_id,
                float(last_score) if sort == "relevance" and last_score is not None else None,
            )
        return SearchPage(tuple(hits), next_cursor)

    def _snippets(self, plan: _Plan, rowids: Sequence[int]) -> dict[int, tuple[SnippetPart, ...]]:
        conn = self._conn
        out: dict[int, tuple[SnippetPart, ...]] = {}
        for rowid in rowids:
            text: str | None = None
            if plan.match is not None:
                found = conn.execute(
                    "SELECT snippet(fts, -1, ?, ?, '…', ?) FROM fts "
                    "WHERE fts MATCH ? AND rowid = ?",
                    (HIGHLIGHT_START, HIGHLIGHT_END, _SNIPPET_TOKENS, plan.match, rowid),
                ).fetchone()
                text = found[0] if found is not None else None
            if not text:
                found = conn.execute(
                    "SELECT coalesce(body, subject, '') FROM records WHERE id = ?", (rowid,)
                ).fetchone()
                plain = found[0] if found is not None else ""
                if len(plain) > _PLAIN_SNIPPET_CHARS:
                    plain = plain[:_PLAIN_SNIPPET_CHARS] + "…"
                out[rowid] = (SnippetPart(plain),) if plain else ()
            else:
                out[rowid] = parse_marked(text)
        return out

    async def count(self, query: Query | str) -> int:
        parsed = as_query(query)

        def run() -> int:
            plan = _choose_plan(self._conn, parsed)
            # Every FTS5 row has its records row (apply inserts both, purge deletes both,
            # verify checks it), so text alone is counted in the index without the join.
            source = "fts" if plan.text_only else plan.source
            sql = f"SELECT count(*) FROM {source} WHERE {plan.where}"  # noqa: S608
            (total,) = self._conn.execute(sql, plan.all_params()).fetchone()
            return int(total)

        return await self._run(run)

    async def facets(self, query: Query | str, *, top: int = 20) -> Facets:
        parsed = as_query(query)
        if not 1 <= top <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"top must be between 1 and {MAX_PAGE_SIZE}")
        return await self._run(self._facets, parsed, top)

    def _facets(self, query: Query, top: int, slice_records: int = _FACET_SLICE_RECORDS) -> Facets:
        conn = self._conn
        plan = _choose_plan(conn, query)
        # SQLite aggregates by sorting: GROUP BY would sort every matching row once per
        # facet. Instead one pass hands the domains and days over as JSON arrays, which
        # Counter tallies in C, and counts actions with FILTER, which needs no sort. The
        # pass runs over slices of the id (time) space that hold about `slice_records`
        # records each, so the arrays stay small however many records match.
        actions = tuple(Action)
        split = ", ".join("count(*) FILTER (WHERE r.action = ?)" for _ in actions)
        # Floor division that is also right before 1970 (SQLite's / truncates toward zero).
        day = f"(r.occurred_us - ((r.occurred_us % {_DAY_US}) + {_DAY_US}) % {_DAY_US}) / {_DAY_US}"
        # The slice's bounds come first: SQLite seeks on the first rowid range it is given.
        sql = (
            f"SELECT json_group_array(r.remote_domain), json_group_array({day}), {split} "  # noqa: S608
            f"FROM {plan.source} WHERE {plan.id_col} >= ? AND {plan.id_col} < ? "
            f"AND {plan.where}"
        )
        domains: Counter[str] = Counter()
        days: Counter[int] = Counter()
        action_counts = [0] * len(actions)
        for low, high in _id_slices(conn, query, _max_spill(conn), slice_records):
            found = conn.execute(
                sql, (*(a.value for a in actions), low, high, *plan.all_params())
            ).fetchone()
            domains.update(_loads(found[0]))
            days.update(_loads(found[1]))
            for i, n in enumerate(found[2:]):
                action_counts[i] += n
        # Python orders str by code point, as SQLite orders UTF-8 text byte by byte.
        by_domain = sorted(domains.items(), key=lambda r: (-r[1], r[0]))
        return Facets(
            by_action=tuple(
                (a, n)
                for a, n in sorted(zip(actions, action_counts, strict=True), key=_by_severity)
                if n
            ),
            by_remote_domain=tuple(by_domain[:top]),
            by_day=tuple(
                (date(1970, 1, 1) + timedelta(days=d), n) for d, n in sorted(days.items())
            ),
        )

    # -- the chain --

    async def chain_links(
        self, start_seq: int = 1, end_seq: int | None = None, *, chain: str = DEFAULT_CHAIN
    ) -> AsyncIterator[ChainLink]:
        _check_chain_name(chain)
        row = await self._run(lambda: _chain_row(self._conn, chain, create=False))
        if row is None:
            return
        first = max(start_seq, 1)
        last = min(end_seq if end_seq is not None else _SEQ_MASK, _SEQ_MASK)
        if first > last:
            return
        base = row.id << _SEQ_BITS
        low, high = base + first, base + last
        while low <= high:
            batch = await self._run(self._links_page, low, high)
            for entry, prev_hash, digest, payload in batch:
                yield ChainLink(entry & _SEQ_MASK, prev_hash, digest, payload)
            if len(batch) < _CHUNK:
                return
            low = batch[-1][0] + 1

    def _links_page(self, low: int, high: int) -> list[tuple[int, bytes, bytes, bytes]]:
        rows: list[tuple[int, bytes, bytes, bytes]] = self._conn.execute(
            "SELECT id, prev_hash, hash, payload FROM ledger WHERE id BETWEEN ? AND ? "
            "ORDER BY id LIMIT ?",
            (low, high, _CHUNK),
        ).fetchall()
        return rows

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        _check_chain_name(checkpoint.chain_name)
        await self._run(self._add_checkpoint, checkpoint)

    def _add_checkpoint(self, cp: Checkpoint) -> None:
        conn = self._conn
        with _transaction(conn):
            row = _chain_row(conn, cp.chain_name, create=False)
            if row is not None and 1 <= cp.seq <= row.last_seq:
                found = conn.execute(
                    "SELECT hash FROM ledger WHERE id = ?", ((row.id << _SEQ_BITS) | cp.seq,)
                ).fetchone()
                if found is not None and found[0] != cp.head:
                    raise ChainConflict(
                        cp.chain_name, cp.seq, "checkpoint head differs from the stored hash"
                    )
            conn.execute(
                "INSERT OR IGNORE INTO checkpoints (chain, seq, head, signature) "
                "VALUES (?, ?, ?, ?)",
                (cp.chain_name, cp.seq, cp.head, cp.signature),
            )

    async def checkpoints(self, chain: str | None = None) -> tuple[Checkpoint, ...]:
        def run() -> tuple[Checkpoint, ...]:
            sql = "SELECT chain, seq, head, signature FROM checkpoints"
            args: tuple[Any, ...] = ()
            if chain is not None:
                sql += " WHERE chain = ?"
                args = (chain,)
            rows = self._conn.execute(sql + " ORDER BY chain, seq, signature", args)
            return tuple(Checkpoint(*row) for row in rows)

        return await self._run(run)

    # -- holds, retention and purge (docs/retention.md) --

    async def add_hold(self, hold: HoldRecord) -> None:
        check_new_hold(hold)
        await self._run(self._add_hold, hold)

    def _add_hold(self, hold: HoldRecord) -> None:
        conn = self._conn
        with _transaction(conn):
            if conn.execute("SELECT 1 FROM holds WHERE id = ?", (hold.hold_id,)).fetchone():
                raise InvalidRequest(f"a hold with id {hold.hold_id[:80]!r} exists already")
            conn.execute(
                f"INSERT INTO holds ({_HOLD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, NULL)",  # noqa: S608
                (
                    hold.hold_id,
                    hold.case_name,
                    hold.created_by,
                    _to_us(hold.created_at),
                    hold.scope,
                    hold.query,
                ),
            )

    async def release_hold(
        self, hold_id: str, *, released_by: str, released_at: datetime, reason: str | None = None
    ) -> HoldRecord:
        check_release(released_by, reason)
        return await self._run(self._release_hold, hold_id, released_by, released_at, reason)

    def _release_hold(
        self, hold_id: str, released_by: str, released_at: datetime, reason: str | None
    ) -> HoldRecord:
        conn = self._conn
        with _transaction(conn):
            found = self._get_hold(hold_id)
            if found is None:
                raise NotFound(f"no legal hold with id {hold_id[:80]!r}")
            if not found.active:
                raise InvalidRequest(f"legal hold {hold_id[:80]!r} was released already")
            conn.execute(
                "UPDATE holds SET released_us = ?, released_by = ?, release_reason = ? "
                "WHERE id = ?",
                (_to_us(released_at), released_by, reason, hold_id),
            )
            released = self._get_hold(hold_id)
        assert released is not None
        return released

    async def get_hold(self, hold_id: str) -> HoldRecord | None:
        return await self._run(self._get_hold, hold_id)

    def _get_hold(self, hold_id: str) -> HoldRecord | None:
        found = self._conn.execute(
            f"SELECT {_HOLD_COLUMNS} FROM holds WHERE id = ?",  # noqa: S608
            (hold_id,),
        ).fetchone()
        return _hold_from_row(found) if found is not None else None

    async def list_holds(self, *, include_released: bool = True) -> tuple[HoldRecord, ...]:
        where = "" if include_released else " WHERE released_us IS NULL"

        def run() -> tuple[HoldRecord, ...]:
            rows = self._conn.execute(
                f"SELECT {_HOLD_COLUMNS} FROM holds{where} ORDER BY created_us, id"  # noqa: S608
            )
            return tuple(_hold_from_row(row) for row in rows)

        return await self._run(run)

    async def holds_covering(self, record_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        ids = sorted(set(record_ids))
        return await self._run(self._holds_covering, ids) if ids else {}

    def _holds_covering(self, ids: list[str]) -> dict[str, tuple[str, ...]]:
        conn = self._conn
        covering: dict[str, list[str]] = {}
        for hold_id, plan in _active_hold_plans(conn):
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i : i + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                for (rid,) in conn.execute(
                    f"SELECT r.record_id FROM {plan.source} WHERE {plan.where} "  # noqa: S608
                    f"AND r.record_id IN ({marks})",
                    (*plan.all_params(), *chunk),
                ):
                    covering.setdefault(rid, []).append(hold_id)
        return {rid: tuple(holds) for rid, holds in covering.items()}

    async def set_retention(
        self, assignments: Sequence[RetentionAssignment], *, assigned_at: datetime
    ) -> RetentionUpdate:
        latest: dict[str, tuple[str, int]] = {}
        for item in assignments:
            if not item.record_id or not item.retention_class:
                raise InvalidRequest("a retention assignment needs a record id and a class")
            expires_us = _to_us(item.expires_at)
            known = latest.get(item.record_id)
            if known is None or expires_us > known[1]:
                latest[item.record_id] = (item.retention_class, expires_us)
        if not latest:
            return RetentionUpdate()
        return await self._run(self._set_retention, latest, _to_us(assigned_at))

    def _set_retention(
        self, latest: dict[str, tuple[str, int]], assigned_us: int
    ) -> RetentionUpdate:
        conn = self._conn
        assigned = extended = kept = unknown = 0
        ids = sorted(latest)
        with _transaction(conn):
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i : i + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                current = {
                    rid: (expires_us, purged_us)
                    for rid, expires_us, purged_us in conn.execute(
                        f"SELECT record_id, expires_us, purged_us FROM retention "  # noqa: S608
                        f"WHERE record_id IN ({marks})",
                        chunk,
                    )
                }
                present = _existing_record_ids(conn, [r for r in chunk if r not in current])
                inserts, updates = [], []
                for rid in chunk:
                    cls, expires_us = latest[rid]
                    if rid in current:
                        old_expiry, purged_us = current[rid]
                        if purged_us is not None or expires_us <= old_expiry:
                            kept += 1  # extend-only: an earlier expiry never replaces a later one
                        else:
                            updates.append((cls, expires_us, assigned_us, rid))
                            extended += 1
                    elif rid in present:
                        inserts.append((rid, cls, expires_us, assigned_us))
                        assigned += 1
                    else:
                        unknown += 1
                conn.executemany(
                    "INSERT INTO retention (record_id, class, expires_us, assigned_us) "
                    "VALUES (?, ?, ?, ?)",
                    inserts,
                )
                # The condition repeats the check above inside the write, so even a caller
                # racing this one through another connection can only lengthen a retention.
                conn.executemany(
                    "UPDATE retention SET class = ?1, expires_us = ?2, assigned_us = ?3 "
                    "WHERE record_id = ?4 AND expires_us < ?2 AND purged_us IS NULL",
                    updates,
                )
        return RetentionUpdate(assigned, extended, kept, unknown)

    async def import_purges(self, purges: Sequence[RetentionState]) -> int:
        rows: dict[str, tuple[str, int, int, int]] = {}
        for state in purges:
            if state.purged_at is None or not state.record_id or not state.retention_class:
                raise InvalidRequest("an imported purge needs a record id, a class and a time")
            rows[state.record_id] = (
                state.retention_class,
                _to_us(state.expires_at),
                _to_us(state.assigned_at),
                _to_us(state.purged_at),
            )
        if not rows:
            return 0
        return await self._run(self._import_purges, rows)

    def _import_purges(self, rows: dict[str, tuple[str, int, int, int]]) -> int:
        conn = self._conn
        ids = sorted(rows)
        new = 0
        with _transaction(conn):
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i : i + _IN_CHUNK]
                held_here = _existing_record_ids(conn, chunk)
                if held_here:
                    raise InvalidRequest(
                        f"record {min(held_here)!r} is in this store: it cannot be marked purged"
                    )
                marks = ", ".join("?" * len(chunk))
                current = {
                    rid: (cls, expires_us, purged_us)
                    for rid, cls, expires_us, purged_us in conn.execute(
                        "SELECT record_id, class, expires_us, purged_us FROM retention "  # noqa: S608
                        f"WHERE record_id IN ({marks})",
                        chunk,
                    )
                }
                for rid in chunk:
                    cls, expires_us, assigned_us, purged_us = rows[rid]
                    if rid in current:
                        if current[rid] != (cls, expires_us, purged_us):
                            raise InvalidRequest(
                                f"record {rid!r}: this store recorded another retention or purge"
                            )
                        continue
                    conn.execute(
                        "INSERT INTO retention (record_id, class, expires_us, assigned_us, "
                        "purged_us) VALUES (?, ?, ?, ?, ?)",
                        (rid, cls, expires_us, assigned_us, purged_us),
                    )
                    new += 1
        return new

    async def retention_of(self, record_id: str) -> RetentionState | None:
        found = await self._run(
            lambda: self._conn.execute(
                "SELECT class, expires_us, assigned_us, purged_us FROM retention "
                "WHERE record_id = ?",
                (record_id,),
            ).fetchone()
        )
        if found is None:
            return None
        cls, expires_us, assigned_us, purged_us = found
        return RetentionState(
            record_id,
            cls,
            _from_us(expires_us),
            _from_us(assigned_us),
            _from_us(purged_us) if purged_us is not None else None,
        )

    async def retention_subjects(
        self,
        *,
        cursor: str | None = None,
        limit: int = 1000,
        unassigned_only: bool = False,
        expiring_by: datetime | None = None,
    ) -> RetentionSubjectPage:
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        if unassigned_only and expiring_by is not None:
            raise InvalidRequest("unassigned records have no expiry: choose one filter")
        after = _MIN_SLOT * _TIES - 1
        if cursor is not None:
            try:
                after = int(cursor, 16)
            except ValueError:
                raise InvalidCursor("malformed retention cursor") from None
            if abs(after) >= 1 << 63:
                raise InvalidCursor("malformed retention cursor")
        expiring_us = _to_us(expiring_by) if expiring_by is not None else None
        return await self._run(self._retention_subjects, after, limit, unassigned_only, expiring_us)

    def _retention_subjects(
        self, after: int, limit: int, unassigned_only: bool, expiring_us: int | None
    ) -> RetentionSubjectPage:
        only, params = "", [after]
        if unassigned_only:
            only = " AND t.record_id IS NULL"
        elif expiring_us is not None:
            only = " AND t.expires_us <= ? AND t.purged_us IS NULL"
            params.append(expiring_us)
        rows = self._conn.execute(
            "SELECT r.id, r.record_id, r.occurred_us, r.rtype, r.direction, r.sender, "  # noqa: S608
            "r.recipient, r.room, t.class, t.expires_us FROM records AS r "
            "LEFT JOIN retention AS t ON t.record_id = r.record_id "
            f"WHERE r.id > ?{only} ORDER BY r.id LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        page = rows[:limit]
        subjects = tuple(
            RetentionSubject(
                record_id=row[1],
                occurred_at=_from_us(row[2]),
                record_type=row[3],
                direction=row[4],
                sender=row[5],
                recipient=row[6],
                room=row[7],
                retention_class=row[8],
                expires_at=_from_us(row[9]) if row[9] is not None else None,
            )
            for row in page
        )
        more = len(rows) > limit
        return RetentionSubjectPage(subjects, format(page[-1][0], "x") if more and page else None)

    async def purge(
        self,
        now: datetime,
        *,
        limit: int = 1000,
        dry_run: bool = False,
        record_ids: Sequence[str] | None = None,
        counts: bool = False,
    ) -> PurgeBatch:
        if not 1 <= limit <= 100_000:
            raise InvalidRequest("limit must be between 1 and 100000")
        only = tuple(sorted(set(record_ids))) if record_ids is not None else None
        if only is not None and len(only) > limit:
            raise InvalidRequest("more record ids than the batch limit")
        return await self._run(self._purge, _to_us(now), limit, dry_run, only, counts)

    def _purge(
        self,
        now_us: int,
        limit: int,
        dry_run: bool,
        only: tuple[str, ...] | None,
        counts: bool,
    ) -> PurgeBatch:
        conn = self._conn
        # One transaction: the holds read here are the holds in force when the rows go.
        with _transaction(conn):
            not_held, held_params = _not_held_sql(_active_hold_plans(conn), "p")
            expired = (
                "FROM retention AS t JOIN records AS p ON p.record_id = t.record_id "
                "WHERE t.purged_us IS NULL AND t.expires_us <= ?"
            )
            base_params: tuple[Any, ...] = (now_us,)
            if only is not None:
                expired += f" AND t.record_id IN ({', '.join('?' * len(only))})"
                base_params += only
            due = held_back = None
            if counts:
                (total,) = conn.execute(f"SELECT count(*) {expired}", base_params).fetchone()
                (due,) = conn.execute(
                    f"SELECT count(*) {expired} AND {not_held}",
                    (*base_params, *held_params),
                ).fetchone()
                held_back = int(total) - int(due)
            rows = conn.execute(
                f"SELECT p.id, p.record_id, p.entry, p.body, p.subject, t.class, t.expires_us "
                f"{expired} AND {not_held} ORDER BY t.expires_us, p.id LIMIT ?",
                (*base_params, *held_params, limit + 1),
            ).fetchall()
            purged = []
            for row in rows[:limit]:
                entries = 0 if dry_run else _purge_record(conn, row, now_us)
                purged.append(PurgedRecord(row[1], row[5], _from_us(row[6]), entries))
        return PurgeBatch(tuple(purged), len(rows) > limit, dry_run, due, held_back)

    # -- audit log and API tokens (the work is in the module's section of that name) --

    async def append_audit(self, entries: Sequence[AuditEntry]) -> tuple[AuditEvent, ...]:
        if len(entries) > MAX_APPEND_BATCH:
            raise InvalidRequest(f"at most {MAX_APPEND_BATCH} audit events per append")
        checked = tuple(check_entry(entry) for entry in entries)
        if not checked:
            return ()
        return await self._run(_audit_append, self._conn, checked)

    async def import_audit(self, events: Sequence[AuditEvent]) -> int:
        if len(events) > MAX_APPEND_BATCH:
            raise InvalidRequest(f"at most {MAX_APPEND_BATCH} audit events per import")
        if not events:
            return 0
        return await self._run(_audit_import, self._conn, tuple(events))

    async def audit_events(
        self,
        where: AuditFilter = AuditFilter(),  # noqa: B008 (frozen, so a shared default is safe)
        *,
        limit: int = 50,
        cursor: str | None = None,
        newest_first: bool = True,
    ) -> AuditPage:
        check_page_args(limit)
        where.checked()
        after = decode_cursor(cursor, where, newest_first) if cursor is not None else None
        return await self._run(_audit_page, self._conn, where, limit, after, newest_first)

    async def audit_head(self) -> AuditHead:
        head = await self._run(_audit_head, self._conn)
        if head is None:
            raise StoreCorrupted("the audit log's head record is missing (tampered?)")
        return head

    async def add_audit_checkpoint(self, checkpoint: Checkpoint) -> None:
        if checkpoint.chain_name != AUDIT_CHAIN:
            raise InvalidRequest(f"not an audit checkpoint (chain {checkpoint.chain_name[:40]!r})")
        await self._run(_audit_add_checkpoint, self._conn, checkpoint)

    async def audit_checkpoints(self) -> tuple[Checkpoint, ...]:
        return await self._run(_audit_checkpoints, self._conn)

    async def verify_audit(
        self, *, public_key: Ed25519PublicKey | None = None
    ) -> AuditVerifyReport:
        return await self._run(_audit_verify, self._conn, public_key)

    async def add_token(self, token: StoredToken) -> None:
        token.check()
        await self._run(_token_add, self._conn, token)

    async def token_by_hash(self, secret_hash: bytes) -> StoredToken | None:
        if not isinstance(secret_hash, bytes) or len(secret_hash) != 32:
            raise InvalidRequest("a token secret hash is 32 bytes (SHA-256)")
        return await self._run(_token_where, self._conn, "secret_hash", secret_hash)

    async def token_by_name(self, name: str) -> StoredToken | None:
        check_token_name(name)
        return await self._run(_token_where, self._conn, "name", name)

    async def tokens(self) -> tuple[StoredToken, ...]:
        def run() -> tuple[StoredToken, ...]:
            rows = self._conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM api_tokens ORDER BY created_us, name"  # noqa: S608
            )
            return tuple(_token_from_row(row) for row in rows)

        return await self._run(run)

    async def revoke_token(self, name: str, *, at: datetime) -> StoredToken:
        check_token_name(name)
        return await self._run(_token_revoke, self._conn, name, to_us(at))

    # -- the published block list (the work is in the module's section) --

    async def blocklist_entries(
        self, *, kind: str | None = None, state: str | None = None
    ) -> tuple[BlocklistEntry, ...]:
        return await self._run(_blocklist_select, self._conn, kind, state)

    async def blocklist_entry(self, kind: str, value: str) -> BlocklistEntry | None:
        found = await self._run(_blocklist_select, self._conn, kind, None, value)
        return found[0] if found else None

    async def put_blocklist_entries(self, entries: Sequence[BlocklistEntry]) -> int:
        for entry in entries:
            try:
                entry.check()
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
        return await self._run(_blocklist_put, self._conn, tuple(entries))

    async def blocklist_version(self) -> int:
        return await self._run(_meta_version, self._conn, "blocklist_version")

    # -- message view, conversations and dashboard (the work is in the module's section) --

    async def record_position(self, record_id: str) -> ChainPosition | None:
        return await self._run(_record_position, self._conn, record_id)

    async def linked_records(
        self, record_ids: Sequence[str]
    ) -> dict[str, tuple[ArchiveRecord, ...]]:
        ids = list(dict.fromkeys(record_ids))
        if len(ids) > MAX_PAGE_SIZE:
            raise InvalidRequest(f"at most {MAX_PAGE_SIZE} record ids at once")
        if not ids:
            return {}

        def run() -> dict[str, tuple[ArchiveRecord, ...]]:
            links = _linked_ids(self._conn, ids)
            wanted = sorted({rid for found in links.values() for rid in found})
            records: dict[str, ArchiveRecord] = {}
            for start in range(0, len(wanted), 500):
                records.update(self._load_records(wanted[start : start + 500]))
            return {
                rid: tuple(records[other] for other in found if other in records)
                for rid, found in links.items()
            }

        return await self._run(run)

    async def activity(self, since: datetime, until: datetime, *, top: int = 10) -> Activity:
        if not 1 <= top <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"top must be between 1 and {MAX_PAGE_SIZE}")
        since_us, until_us = _to_us(since), _to_us(until)
        if until_us <= since_us:
            raise InvalidRequest("the window must end after it starts")
        return await self._run(_activity, self._conn, since_us, until_us, top)

    # -- verification --

    async def verify(self, *, public_key: Ed25519PublicKey | None = None) -> VerifyReport:
        """Check the whole store; slow (reads everything), meant for `stanzaguard verify`.

        Checks, per chain: seqs run 1..last_seq with no gap, each link's prev_hash is the
        hash before it and its hash covers (prev_hash, seq, payload), the last entry is the
        recorded head, every checkpoint matches the stored hash at its seq, lies within the
        chain and (with `public_key`) carries a valid signature. Per entry: the payload is a
        readable spool entry; a RECORD has its records row whose id slot and searchable
        columns equal those derived from the payload (or, for a repeated RECORD, the row of
        the first one); its observations, an OBSERVE's observation, a STATUS's status and an
        ATTACHMENT's fetch result are stored exactly as the payload says. Every records,
        observations, statuses and attachment_fetches row must be accounted for by an
        entry. Finally the FTS5 index must match the records' text and SQLite's own
        page-level quick_check must pass.
        """
        return await self._run(self._verify, public_key)

    def _verify(self, public_key: Ed25519PublicKey | None) -> VerifyReport:
        checker = _Verifier(self._conn, public_key)
        return checker.run()


def _merge_fetches(
    record_id: str,
    attachments: tuple[Attachment, ...],
    fetched: dict[tuple[str, str], tuple[str, int, str | None]],
) -> tuple[Attachment, ...]:
    if not fetched:
        return attachments
    merged = []
    for attachment in attachments:
        found = fetched.get((record_id, attachment.url))
        if found is not None:
            sha256, size, media_type = found
            attachment = replace(
                attachment,
                sha256=sha256,
                size=size,
                media_type=attachment.media_type or media_type,
            )
        merged.append(attachment)
    return tuple(merged)


def _guard(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except sqlite3.Error as exc:
        raise _translate(exc) from exc


def _connect(path: str, cache_mb: int, busy_timeout_ms: int) -> sqlite3.Connection:
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so a batch is one transaction
        # and reads never sit inside a stale implicit one.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _translate(exc) from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # Only a new, empty file takes this (a WAL file keeps the page size it has). Every
        # page a commit changes costs a WAL frame and later a checkpoint copy, two system
        # calls each whatever the size: 8 KiB pages hold three or four ledger rows where
        # 4 KiB pages hold one or two. Larger pages would save more calls while the indexes
        # are small, but once they outgrow a batch each random-keyed index costs one page
        # write per record, and 16 KiB pages then write twice the bytes of 8 KiB ones
        # (measurements in docs/benchmarks.md).
        conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL may lose the last commits on power loss but never corrupts; the spool
        # is the durable copy and the indexer resumes from last_seq(), which rolls back too.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA cache_size = {-1024 * int(cache_mb)}")
        conn.execute("PRAGMA temp_store = MEMORY")
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        # Checkpoint per ~128 MiB of WAL instead of the default 1000 pages, which one batch
        # of records outgrows: a page that several batches change (the newest leaf of an
        # index) is then copied into the file once, not once per batch.
        conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_CHECKPOINT_BYTES // page_size}")
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_CHECKPOINT_BYTES}")
        # A batch of 5000 records changes ~100 MiB of pages; spilling them into the WAL
        # before the commit (when they outgrow the cache) writes many of them twice.
        conn.execute(f"PRAGMA cache_spill = {_SPILL_BYTES // page_size}")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == 0:
            with _transaction(conn):
                # Read again under the write lock: another process may have just created it.
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                (tables,) = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
                if version == 0 and tables:
                    raise StoreCorrupted(f"{path} is a SQLite file but not an archive store")
                if version == 0:
                    for statement in _split_schema(_SCHEMA):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    version = SCHEMA_VERSION
        if version in _MIGRATIONS:
            with _transaction(conn):
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                while version in _MIGRATIONS:
                    for statement in _split_schema(_MIGRATIONS[version]):
                        conn.execute(statement)
                    version += 1
                    conn.execute(f"PRAGMA user_version = {version}")
        if version != SCHEMA_VERSION:
            raise StoreCorrupted(f"{path} has schema version {version}; expected {SCHEMA_VERSION}")
        _upgrade_section(conn, path, "layout", _LAYOUT_UPGRADES, _LAYOUT, "index layout")
        _upgrade_section(  # audit log and API tokens
            conn, path, "access_schema", _ACCESS_SCHEMA_SQL, _ACCESS_SCHEMA, "audit/token schema"
        )
        _upgrade_section(  # holds, retention and purge
            conn,
            path,
            "retention_schema",
            {0: _RETENTION_SCHEMA},
            _RETENTION_SCHEMA_VERSION,
            "retention schema",
        )
        _upgrade_section(  # the published block list
            conn,
            path,
            "blocklist_schema",
            _BLOCKLIST_SCHEMA_SQL,
            _BLOCKLIST_SCHEMA,
            "block list schema",
        )
    except sqlite3.Error as exc:
        conn.close()
        raise _translate(exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _close(conn: sqlite3.Connection) -> None:
    try:
        # Keeps planner statistics current, as SQLite recommends before closing; the limit
        # bounds the work on a large file.
        conn.execute("PRAGMA analysis_limit = 1000")
        conn.execute("PRAGMA optimize")
    except sqlite3.Error:
        pass  # statistics are an optimisation; closing must not fail over them
    finally:
        conn.close()


def _split_schema(script: str) -> list[str]:
    """Statements of the schema script (executescript would commit our transaction)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front, so a batch never fails half-way on BUSY.
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        elif self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


def _chain_row(conn: sqlite3.Connection, chain: str, *, create: bool) -> _ChainRow | None:
    found = conn.execute(
        "SELECT id, name, last_seq, head FROM chains WHERE name = ?", (chain,)
    ).fetchone()
    if found is None and create:
        cursor = conn.execute(
            "INSERT INTO chains (name, last_seq, head) VALUES (?, 0, ?)", (chain, GENESIS)
        )
        assert cursor.lastrowid is not None
        return _ChainRow(cursor.lastrowid, chain, 0, GENESIS)
    return _ChainRow(*found) if found is not None else None


def _meta_version(conn: sqlite3.Connection, key: str) -> int:
    found = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(found[0]) if found is not None else 0


def _upgrade_section(
    conn: sqlite3.Connection,
    path: str,
    key: str,
    upgrades: Mapping[int, str],
    target: int,
    what: str,
) -> None:
    """Bring a part of the schema versioned by `meta.<key>` to `target` (at open).

    `upgrades[v]` takes it from version v to v + 1 (0: create). Runs in one transaction and
    reads the version again under the write lock, so two processes opening at once do not
    both upgrade.
    """
    version = _meta_version(conn, key)
    if version < target:
        with _transaction(conn):
            version = _meta_version(conn, key)
            while version < target:
                for statement in _split_schema(upgrades[version]):
                    conn.execute(statement)
                version += 1
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, version))
    if version != target:
        raise StoreCorrupted(f"{path} has {what} {version}; expected {target}")


def _id_slices(
    conn: sqlite3.Connection, query: Query, max_spill: int, records_per_slice: int
) -> list[tuple[int, int]]:
    """Half-open id ranges [low, high) covering every record the query's time window lets
    through, each holding about `records_per_slice` records if they were spread evenly."""
    # Two subqueries: min() and max() in one SELECT would scan the table instead of
    # reading the two ends of the rowid b-tree.
    low, high = conn.execute(
        "SELECT (SELECT min(id) FROM records), (SELECT max(id) FROM records)"
    ).fetchone()
    if low is None:
        return []
    start, stop = low, high + 1
    for clause in query.filter_clauses:
        if isinstance(clause.term, TimeTerm) and not clause.negated:
            rowid = _rowid_bound(clause.term, max_spill)
            if rowid is not None and clause.term.bound is TimeBound.AFTER:
                start = max(start, rowid)
            elif rowid is not None:
                stop = min(stop, rowid)
    if start >= stop:
        return []
    # Chain entries outnumber records (observations, statuses): slices come out smaller.
    (entries,) = conn.execute("SELECT coalesce(sum(last_seq), 0) FROM chains").fetchone()
    expected = int(entries) * (stop - start) // (high + 1 - low)
    slices = max(1, min(_MAX_FACET_SLICES, -(-expected // records_per_slice)))
    width = -(-(stop - start) // slices)
    return [(edge, min(edge + width, stop)) for edge in range(start, stop, width)]


def _max_spill(conn: sqlite3.Connection) -> int:
    found = conn.execute("SELECT value FROM meta WHERE key = 'max_spill_us'").fetchone()
    return int(found[0]) if found is not None else 0


def _existing_record_ids(conn: sqlite3.Connection, record_ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(record_ids), 500):
        chunk = record_ids[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        found.update(
            rid
            for (rid,) in conn.execute(
                f"SELECT record_id FROM records WHERE record_id IN ({marks})",  # noqa: S608
                chunk,
            )
        )
    return found


def _write_records(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    conn.executemany(_INSERT_RECORD, rows)
    conn.executemany(
        "INSERT INTO fts (rowid, body, subject) VALUES (?, ?, ?)",
        [(row[0], row[2 + _BODY_COL], row[2 + _SUBJECT_COL]) for row in rows],
    )


class _RowidAllocator:
    """Hands out time-ordered rowids for one batch: `slot * 1024 + next free tie-breaker`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._top: dict[int, int] = {}  # slot -> highest id taken in it so far
        self._spilled: dict[int, int] = {}  # slot -> last id its overflow took
        self._max_spill = self._initial_spill = _max_spill(conn)
        # Every row above this id was handed out by this allocator (and is in `_top`), so a
        # slot above it needs no look-up: records mostly arrive in time order, and then a
        # batch costs one query here instead of one per record.
        (ceiling,) = conn.execute("SELECT max(id) FROM records").fetchone()
        self._ceiling: int = ceiling if ceiling is not None else _MIN_SLOT * _TIES - 1

    def allocate(self, occurred_us: int) -> int | None:
        """The next id in the record's own slot, or None when the slot is full."""
        slot = _slot(occurred_us)
        low = slot * _TIES
        top = self._top.get(slot)
        if top is None and low <= self._ceiling:
            (top,) = self._conn.execute(
                "SELECT max(id) FROM records WHERE id >= ? AND id < ?", (low, low + _TIES)
            ).fetchone()
        rowid = low if top is None else top + 1
        if rowid >= low + _TIES:
            return None
        self._top[slot] = rowid
        return rowid

    def spill(self, occurred_us: int) -> int:
        """More than 1024 records in one µs: the first free id after the slot (rare)."""
        slot = _slot(occurred_us)
        # Start where this slot's previous overflow ended, so a burst stays linear.
        start = self._spilled.get(slot, slot * _TIES)
        (rowid,) = self._conn.execute(
            "SELECT r.id + 1 FROM records AS r WHERE r.id >= ? AND NOT EXISTS "
            "(SELECT 1 FROM records AS n WHERE n.id = r.id + 1) ORDER BY r.id LIMIT 1",
            (start,),
        ).fetchone()
        self._spilled[slot] = rowid
        # The slot it lands in must be read from the table again before its next id.
        self._top.pop(rowid >> _TIE_BITS, None)
        self._ceiling = max(self._ceiling, rowid)
        self._max_spill = max(self._max_spill, (rowid >> _TIE_BITS) - slot)
        return int(rowid)

    def save(self) -> None:
        if self._max_spill != self._initial_spill:
            self._conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'max_spill_us'", (self._max_spill,)
            )


# --- holds, retention and purge (docs/retention.md) ------------------------------------------

# These tables are versioned by `meta.retention_schema` rather than by user_version, so they
# are added to stores of any record-schema version without a migration of their own.
_RETENTION_SCHEMA_VERSION: Final = 1
_RETENTION_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS retention (
    record_id TEXT PRIMARY KEY,
    class TEXT NOT NULL,
    expires_us INTEGER NOT NULL,
    assigned_us INTEGER NOT NULL,
    purged_us INTEGER                -- when the record was purged; the row stays as its trace
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS retention_due ON retention (expires_us) WHERE purged_us IS NULL;
CREATE INDEX IF NOT EXISTS retention_purged ON retention (record_id) WHERE purged_us IS NOT NULL;
CREATE TABLE IF NOT EXISTS holds (
    id TEXT PRIMARY KEY,
    case_name TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    scope TEXT NOT NULL,             -- canonical JSON, the service layer's description
    query TEXT NOT NULL,             -- canonical search text of what the hold covers
    released_us INTEGER,
    released_by TEXT,
    release_reason TEXT
) STRICT;
"""
_IN_CHUNK: Final = 500


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _hold_from_row(row: tuple[Any, ...]) -> HoldRecord:
    hold_id, case_name, created_by, created_us, scope, query, released_us, released_by = row[:8]
    return HoldRecord(
        hold_id=hold_id,
        case_name=case_name,
        created_by=created_by,
        created_at=_from_us(created_us),
        scope=scope,
        query=query,
        released_at=_from_us(released_us) if released_us is not None else None,
        released_by=released_by,
        release_reason=row[8],
    )


_HOLD_COLUMNS: Final = (
    "id, case_name, created_by, created_us, scope, query, released_us, released_by, release_reason"
)


def _active_hold_plans(conn: sqlite3.Connection) -> list[tuple[str, _Plan]]:
    """Every active hold as a query plan. A hold whose stored query no longer parses stops
    the caller: what it holds cannot be known, so nothing may be purged around it."""
    max_spill = _max_spill(conn)
    plans = []
    for hold_id, text in conn.execute(
        "SELECT id, query FROM holds WHERE released_us IS NULL ORDER BY created_us, id"
    ):
        try:
            query = parse_query(text)
        except InvalidRequest as exc:
            raise StoreCorrupted(f"legal hold {hold_id} has an unreadable query ({exc})") from None
        plans.append((hold_id, _plan(query, max_spill)))
    return plans


def _not_held_sql(plans: Sequence[tuple[str, _Plan]], outer: str) -> tuple[str, list[Any]]:
    """SQL true for a records row `outer` that no hold covers, probed per row by its id."""
    parts: list[str] = []
    params: list[Any] = []
    for _, plan in plans:
        parts.append(
            f"NOT EXISTS (SELECT 1 FROM {plan.source} "  # noqa: S608
            f"WHERE {plan.where} AND {plan.id_col} = {outer}.id)"
        )
        params.extend(plan.all_params())
    return (" AND ".join(parts) or "1"), params


def _moved_tombstones(
    conn: sqlite3.Connection, chain: str, links: Sequence[ChainLink]
) -> frozenset[int]:
    """The seqs of links that are tombstones of purges recorded here (`import_purges`);
    a tombstone naming no such purge, or another one, is refused."""
    named = tombstones_in(links, chain)
    if not named:
        return frozenset()
    traces = _purged_record_ids(conn, {t.record_id for t in named.values()})
    for seq, tombstone in named.items():
        trace = traces.get(tombstone.record_id)
        if trace is None or trace.tombstone(tombstone.record_id) != tombstone:
            raise InvalidEntry(
                chain, seq, "a tombstone that names no purge recorded here (import_purges)"
            )
    return frozenset(named)


def _purged_record_ids(conn: sqlite3.Connection, record_ids: set[str]) -> dict[str, _PurgeTrace]:
    """The purge traces of those of `record_ids` that were purged (usually none)."""
    any_purged = "SELECT 1 FROM retention WHERE purged_us IS NOT NULL LIMIT 1"
    if conn.execute(any_purged).fetchone() is None:
        return {}
    ids = sorted(record_ids)
    found: dict[str, _PurgeTrace] = {}
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for rid, cls, expires_us, purged_us in conn.execute(
            f"SELECT record_id, class, expires_us, purged_us FROM retention "  # noqa: S608
            f"WHERE record_id IN ({marks}) AND purged_us IS NOT NULL",
            chunk,
        ):
            found[rid] = _PurgeTrace(cls, expires_us, purged_us)
    return found


class _PurgeTrace(NamedTuple):
    retention_class: str
    expires_us: int
    purged_us: int

    def tombstone(self, record_id: str) -> Tombstone:
        return Tombstone(
            record_id, _from_us(self.purged_us), self.retention_class, _from_us(self.expires_us)
        )


def _entomb_arrivals(
    conn: sqlite3.Connection,
    ledger_rows: list[tuple[int, bytes, bytes, bytes]],
    fresh: list[tuple[int, _Parsed]],
    obs_rows: list[_ObsRow],
    status_rows: list[tuple[Any, ...]],
    fetch_rows: list[tuple[Any, ...]],
) -> set[int]:
    """Entries of a batch that belong to records purged earlier (a replay from another chain,
    a late observation) are stored as tombstones straight away, so a purge is never undone.

    Filters the projection lists in place; returns the ledger ids that became tombstones.
    """
    owner: dict[int, str] = {entry: parsed.record_id for entry, parsed in fresh}
    owner.update((row[0], row[2]) for row in obs_rows)
    owner.update((row[0], row[1]) for row in status_rows)
    owner.update((row[0], row[1]) for row in fetch_rows)
    if not owner:
        return set()
    purged = _purged_record_ids(conn, set(owner.values()))
    if not purged:
        return set()
    gone = {entry for entry, rid in owner.items() if rid in purged}
    for i, (entry, prev_hash, digest, _) in enumerate(ledger_rows):
        if entry in gone:
            payload = purged[owner[entry]].tombstone(owner[entry]).payload()
            ledger_rows[i] = (entry, prev_hash, digest, payload)
    fresh[:] = [item for item in fresh if item[0] not in gone]
    obs_rows[:] = [row for row in obs_rows if row[0] not in gone]
    status_rows[:] = [row for row in status_rows if row[0] not in gone]
    fetch_rows[:] = [row for row in fetch_rows if row[0] not in gone]
    return gone


def _purge_record(
    conn: sqlite3.Connection,
    row: tuple[int, str, int, str | None, str | None, str, int],
    purged_us: int,
) -> int:
    """Turn every chain entry of one record into a tombstone and delete what was derived
    from them; returns how many entries became tombstones."""
    rowid, rid, entry, body, subject, cls, expires_us = row
    tombstone = _PurgeTrace(cls, expires_us, purged_us).tombstone(rid).payload()
    entries = {entry}
    for sql in (
        "SELECT entry FROM observations WHERE record_id = ? AND idx < 0",
        "SELECT entry FROM statuses WHERE record_id = ?",
        "SELECT entry FROM attachment_fetches WHERE record_id = ?",
    ):
        entries.update(e for (e,) in conn.execute(sql, (rid,)))
    conn.executemany(
        "UPDATE ledger SET payload = ? WHERE id = ?", [(tombstone, e) for e in sorted(entries)]
    )
    conn.execute("DELETE FROM observations WHERE entry = ? AND idx >= 0", (entry,))
    conn.execute("DELETE FROM observations WHERE record_id = ? AND idx < 0", (rid,))
    conn.execute("DELETE FROM statuses WHERE record_id = ?", (rid,))
    conn.execute("DELETE FROM attachment_fetches WHERE record_id = ?", (rid,))
    # External-content FTS5: the 'delete' command needs the values that were indexed.
    conn.execute(
        "INSERT INTO fts (fts, rowid, body, subject) VALUES ('delete', ?, ?, ?)",
        (rowid, body, subject),
    )
    conn.execute("DELETE FROM records WHERE id = ?", (rowid,))
    conn.execute("UPDATE retention SET purged_us = ? WHERE record_id = ?", (purged_us, rid))
    return len(entries)


class _Verifier:
    """One verification run: walks each chain in seq order in chunks, then the leftovers."""

    def __init__(self, conn: sqlite3.Connection, public_key: Ed25519PublicKey | None) -> None:
        self._conn = conn
        self._key = public_key
        self._problems: list[VerifyProblem] = []
        self._truncated = False
        self._entries = 0
        self._records = 0
        self._max_spill = _max_spill(conn)

    def _problem(
        self, problem: str, chain: str | None = None, seq: int | None = None, rid: str | None = None
    ) -> None:
        if len(self._problems) >= _MAX_PROBLEMS:
            self._truncated = True
            return
        self._problems.append(VerifyProblem(problem, chain, seq, rid))

    def run(self) -> VerifyReport:
        conn = self._conn
        chains = [_ChainRow(*row) for row in conn.execute("SELECT * FROM chains ORDER BY name")]
        states = [self._chain(row) for row in chains]
        self._orphans()
        try:
            conn.execute("INSERT INTO fts (fts, rank) VALUES ('integrity-check', 1)")
        except sqlite3.DatabaseError:
            self._problem("the full-text index does not match the records' text")
        quick = [msg for (msg,) in conn.execute("PRAGMA quick_check")]
        if quick != ["ok"]:
            self._problem(f"SQLite quick_check: {'; '.join(quick[:5])}")
        problems = sorted(
            self._problems,
            key=lambda p: (p.seq is None, p.chain or "", p.seq if p.seq is not None else 0),
        )
        return VerifyReport(
            tuple(states), self._entries, self._records, tuple(problems), self._truncated
        )

    def _chain(self, chain: _ChainRow) -> ChainState:
        conn = self._conn
        base = chain.id << _SEQ_BITS
        end = base | _SEQ_MASK
        wanted: dict[int, list[tuple[bytes, bytes]]] = {}
        for seq, head, signature in conn.execute(
            "SELECT seq, head, signature FROM checkpoints WHERE chain = ?", (chain.name,)
        ):
            wanted.setdefault(seq, []).append((head, signature))
        hashes: dict[int, bytes] = {}
        expected, prev, last_seq, last_hash = 1, GENESIS, 0, GENESIS
        low = base
        while low <= end:
            rows = conn.execute(
                "SELECT id, prev_hash, hash, payload FROM ledger WHERE id BETWEEN ? AND ? "
                "ORDER BY id LIMIT ?",
                (low, end, _CHUNK),
            ).fetchall()
            high = rows[-1][0] if len(rows) == _CHUNK else end
            parsed: dict[int, tuple[int, _Parsed | None]] = {}
            tombstones: dict[int, Tombstone] = {}  # ledger id -> what replaced its payload
            for entry, prev_hash, digest, payload in rows:
                seq = entry & _SEQ_MASK
                self._entries += 1
                if seq != expected:
                    self._problem(
                        f"entries {expected}..{seq - 1} are missing", chain.name, expected
                    )
                    prev = prev_hash  # resynchronise so one gap is reported once
                if prev_hash != prev:
                    self._problem(
                        "previous-hash does not match the entry before it", chain.name, seq
                    )
                tombstone = self._tombstone(chain.name, seq, payload)
                if tombstone is not None:
                    # Body gone by retention: the hash stays unrecomputable but still links.
                    tombstones[entry] = tombstone
                elif link_hash(prev_hash, seq, payload) != digest:
                    self._problem("content does not match its hash (edited)", chain.name, seq)
                if seq in wanted:
                    hashes[seq] = digest
                if tombstone is not None:
                    parsed[entry] = (seq, None)
                    prev, expected, last_seq, last_hash = digest, seq + 1, seq, digest
                    continue
                try:
                    SpoolEntry.from_payload(payload)  # everything get() will need must parse
                    parsed[entry] = (seq, _parse_payload(payload))
                except (ValueError, KeyError, TypeError) as exc:
                    self._problem(f"payload is not a valid spool entry ({exc})", chain.name, seq)
                    parsed[entry] = (seq, None)
                prev, expected, last_seq, last_hash = digest, seq + 1, seq, digest
            self._check_tombstones(chain.name, tombstones)
            self._check_rows(chain.name, low, high, parsed, frozenset(tombstones))
            low = high + 1
        if last_seq != chain.last_seq or last_hash != chain.head:
            self._problem(
                f"the chain ends at seq {last_seq} but the store recorded its head at seq "
                f"{chain.last_seq} (entries removed from the end?)",
                chain.name,
                min(last_seq, chain.last_seq) + 1,
            )
        for seq, signed in sorted(wanted.items()):
            for head, signature in signed:
                if seq > last_seq:
                    self._problem(
                        "a signed checkpoint lies past the end of the stored chain (truncated)",
                        chain.name,
                        seq,
                    )
                elif seq not in hashes:
                    self._problem("the entry a checkpoint signs is missing", chain.name, seq)
                elif hashes[seq] != head:
                    self._problem("stored hash differs from the signed checkpoint", chain.name, seq)
                if self._key is not None:
                    cp = Checkpoint(chain.name, seq, head, signature)
                    if not cp.verify(self._key):
                        self._problem("checkpoint signature does not verify", chain.name, seq)
        return ChainState(chain.name, last_seq, last_hash, sum(map(len, wanted.values())))

    def _tombstone(self, chain: str, seq: int, payload: bytes) -> Tombstone | None:
        """The tombstone this payload is (None: an ordinary entry); a malformed one is
        reported and treated as a tombstone, so it is not reported twice."""
        try:
            return Tombstone.from_payload(payload)
        except ValueError as exc:
            self._problem(f"payload is a malformed tombstone ({exc})", chain, seq)
            return Tombstone("", _EPOCH, "", _EPOCH)

    def _check_tombstones(self, chain: str, tombstones: dict[int, Tombstone]) -> None:
        """Each tombstone must name a purge the store recorded, after the record's expiry."""
        named = sorted({t.record_id for t in tombstones.values() if t.record_id})
        traces: dict[str, tuple[str, int, int | None]] = {}
        for i in range(0, len(named), _IN_CHUNK):
            chunk = named[i : i + _IN_CHUNK]
            traces.update(
                (rid, (cls, expires_us, purged_us))
                for rid, cls, expires_us, purged_us in self._conn.execute(
                    "SELECT record_id, class, expires_us, purged_us FROM retention "  # noqa: S608
                    f"WHERE record_id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
            )
        for entry, tombstone in tombstones.items():
            if not tombstone.record_id:
                continue  # malformed, reported already
            seq, rid = entry & _SEQ_MASK, tombstone.record_id
            trace = traces.get(rid)
            if trace is None or trace[2] is None:
                self._problem(
                    "payload replaced by a tombstone, but no purge of the record is recorded "
                    "(deleted outside retention?)",
                    chain,
                    seq,
                    rid,
                )
            elif trace != (
                tombstone.retention_class,
                _to_us(tombstone.expires_at),
                _to_us(tombstone.purged_at),
            ):
                self._problem("tombstone differs from the recorded purge", chain, seq, rid)
            if tombstone.expires_at > tombstone.purged_at:
                self._problem(
                    "tombstone records a purge before the record expired", chain, seq, rid
                )

    def _check_rows(
        self,
        chain: str,
        low: int,
        high: int,
        parsed: dict[int, tuple[int, _Parsed | None]],
        tombstoned: frozenset[int] = frozenset(),
    ) -> None:
        """Compare the derived rows for ledger ids low..high with what the payloads say."""
        conn = self._conn
        records = {
            row[1]: row
            for row in conn.execute(
                f"SELECT id, entry, {', '.join(_COLUMNS)} FROM records "  # noqa: S608
                "WHERE entry BETWEEN ? AND ?",
                (low, high),
            )
        }
        observations: dict[int, list[tuple[int, str, str]]] = {}
        for entry, idx, rid, text in conn.execute(
            "SELECT entry, idx, record_id, obs FROM observations WHERE entry BETWEEN ? AND ? "
            "ORDER BY entry, idx",
            (low, high),
        ):
            observations.setdefault(entry, []).append((idx, rid, text))
        statuses = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT entry, record_id, status, at_us, chain, seq FROM statuses "
                "WHERE entry BETWEEN ? AND ?",
                (low, high),
            )
        }
        fetches = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT entry, record_id, url, status, sha256, size, media_type, error, "
                "attempt, at_us, chain, seq FROM attachment_fetches WHERE entry BETWEEN ? AND ?",
                (low, high),
            )
        }
        for entry, (seq, item) in parsed.items():
            row = records.pop(entry, None)
            obs_rows = observations.pop(entry, [])
            status_row = statuses.pop(entry, None)
            fetch_row = fetches.pop(entry, None)
            if entry in tombstoned and (row or obs_rows or status_row or fetch_row):
                rid = row[2] if row else None
                self._problem("data of a purged entry is still stored", chain, seq, rid)
            if item is None:
                continue
            rid = item.record_id
            own = False  # observations numbered 0..n-1 (the row's own RECORD) or -n..-1
            if item.columns is not None:
                if row is not None:
                    own = True
                    self._compare_record(chain, seq, row, item.columns)
                elif not self._check_repeated_record(chain, seq, rid):
                    # The record's row is gone, which is reported; either numbering fits.
                    own = bool(obs_rows) and obs_rows[0][0] >= 0
            elif row is not None:
                self._problem("a records row claims a non-RECORD entry", chain, seq, row[2])
            expected = [(i, r, t) for _, i, r, t in _observation_rows(entry, item, own=own)]
            if obs_rows != expected:
                self._problem("stored observations differ from the entry", chain, seq, rid)
            expected_status = (rid, *item.status, chain, seq) if item.status is not None else None
            if status_row != expected_status:
                self._problem("stored status change differs from the entry", chain, seq, rid)
            expected_fetch = (rid, *item.fetch, chain, seq) if item.fetch is not None else None
            if fetch_row != expected_fetch:
                self._problem("stored attachment fetch differs from the entry", chain, seq, rid)
        for entry, row in records.items():
            self._problem(
                "records row refers to a ledger entry that does not exist",
                chain,
                entry & _SEQ_MASK,
                row[2],
            )
        for entry, obs in observations.items():
            self._problem(
                "observation refers to a ledger entry that does not exist",
                chain,
                entry & _SEQ_MASK,
                obs[0][1],
            )
        for entry, status in statuses.items():
            self._problem(
                "status change refers to a ledger entry that does not exist",
                chain,
                entry & _SEQ_MASK,
                status[0],
            )
        for entry, fetch in fetches.items():
            self._problem(
                "attachment fetch refers to a ledger entry that does not exist",
                chain,
                entry & _SEQ_MASK,
                fetch[0],
            )

    def _compare_record(
        self, chain: str, seq: int, row: tuple[Any, ...], columns: tuple[Any, ...]
    ) -> None:
        self._records += 1
        stored = row[2:]
        wrong = [name for name, a, b in zip(_COLUMNS, stored, columns, strict=True) if a != b]
        if wrong:
            self._problem(
                f"searchable fields differ from the chain's payload: {', '.join(wrong)}",
                chain,
                seq,
                columns[0],
            )
        spill = (row[0] >> _TIE_BITS) - _slot(columns[_OCCURRED_COL])
        if not 0 <= spill <= self._max_spill:
            self._problem("record is filed under the wrong time", chain, seq, columns[0])

    def _check_repeated_record(self, chain: str, seq: int, rid: str) -> bool:
        """A RECORD without its own row must repeat one that has a row (False: none has)."""
        found = self._conn.execute(
            "SELECT l.payload FROM records AS r JOIN ledger AS l ON l.id = r.entry "
            "WHERE r.record_id = ?",
            (rid,),
        ).fetchone()
        if found is None:
            self._problem("record is missing from the records table", chain, seq, rid)
            return False
        try:
            first = _parse_payload(found[0])
        except ValueError:
            return True  # reported where that entry itself is checked
        if first.op is not EntryOp.RECORD or first.record_id != rid:
            self._problem("record row points at an entry for another record", chain, seq, rid)
        return True

    def _orphans(self) -> None:
        """Rows whose entry lies in no known chain (the chunked walk never saw them)."""
        for table in ("records", "observations", "statuses", "attachment_fetches"):
            for entry, rid in self._conn.execute(
                f"SELECT entry, record_id FROM {table} "  # noqa: S608
                f"WHERE (entry >> {_SEQ_BITS}) NOT IN (SELECT id FROM chains) LIMIT 100"
            ):
                self._problem(f"{table} row refers to an unknown chain (entry {entry})", rid=rid)


# --- audit log and API tokens ----------------------------------------------------------------
#
# Their own tables, versioned by `meta.access_schema` rather than by the archive's
# `user_version`, so they evolve apart from the record tables. `audit_events` keeps each
# event's fields (params as canonical JSON text) and its link; the payload its hash covers is
# rebuilt from the fields (archive_api/store/audit.py), so any edited field shows. Its rowid
# is the seq. `audit_head` is the last seq and hash, written in the same transaction as the
# events: an append reads it under the write lock (BEGIN IMMEDIATE), which is what serialises
# appenders of every process, and verify compares it with the last event (removed tail).
# Writes here are few and must survive power loss, so they commit with synchronous = FULL.

_ACCESS_SCHEMA: Final = 1
_ACCESS_SCHEMA_SQL: Final = {
    0: """
CREATE TABLE audit_events (
    seq INTEGER PRIMARY KEY,
    at_us INTEGER NOT NULL,
    actor TEXT NOT NULL,
    role TEXT,
    action TEXT NOT NULL,
    params TEXT NOT NULL,            -- canonical JSON object
    result_count INTEGER,
    outcome TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
) STRICT;
CREATE INDEX audit_events_actor ON audit_events (actor);
CREATE INDEX audit_events_action ON audit_events (action);
CREATE INDEX audit_events_at ON audit_events (at_us);
CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL
) STRICT;
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, zeroblob(32));
CREATE TABLE audit_checkpoints (
    seq INTEGER NOT NULL,
    head BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (seq, signature)
) STRICT;
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    secret_hash BLOB NOT NULL UNIQUE, -- SHA-256 of the secret; the secret is never stored
    created_us INTEGER NOT NULL,
    expires_us INTEGER,
    revoked_us INTEGER
) STRICT;
""",
}
_AUDIT_COLUMNS: Final = (
    "seq, at_us, actor, role, action, params, result_count, outcome, prev_hash, hash"
)
_TOKEN_COLUMNS: Final = "name, role, secret_hash, created_us, expires_us, revoked_us"  # noqa: S105


class _durable:
    """synchronous = FULL for the transaction inside: it is on disk when the call returns."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("PRAGMA synchronous = FULL")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._conn.execute("PRAGMA synchronous = NORMAL")


class _snapshot:
    """One read transaction: every query inside sees the same committed state (WAL)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._conn.in_transaction:
            self._conn.execute("COMMIT")


def _audit_head(conn: sqlite3.Connection) -> AuditHead | None:
    found = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    return AuditHead(int(found[0]), bytes(found[1])) if found is not None else None


def _audit_append(
    conn: sqlite3.Connection, entries: tuple[CheckedEntry, ...]
) -> tuple[AuditEvent, ...]:
    rows: list[AuditRow] = []
    with _durable(conn), _transaction(conn):
        head = _locked_audit_head(conn)
        seq, prev = head.seq, head.hash
        for entry in entries:
            seq += 1
            row = chain_entry(entry, seq, prev)
            rows.append(row)
            prev = row.hash
        _insert_audit_rows(conn, rows)
    return tuple(AuditEvent.from_row(row) for row in rows)


def _locked_audit_head(conn: sqlite3.Connection) -> AuditHead:
    """The recorded head, read inside the write transaction that appends after it."""
    head = _audit_head(conn)
    if head is None:
        raise StoreCorrupted("the audit log's head record is missing (tampered?)")
    return head


def _insert_audit_rows(conn: sqlite3.Connection, rows: list[AuditRow]) -> None:
    """Store chained rows and move the head to the last (inside the caller's transaction)."""
    try:
        conn.executemany(
            f"INSERT INTO audit_events ({_AUDIT_COLUMNS}) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    except sqlite3.IntegrityError:
        raise StoreCorrupted(
            "the audit log's recorded head is behind its events (tampered?); "
            "run `stanzaguard verify --audit`"
        ) from None
    conn.execute(
        "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (rows[-1].seq, rows[-1].hash)
    )


def _audit_import(conn: sqlite3.Connection, events: tuple[AuditEvent, ...]) -> int:
    with _durable(conn), _transaction(conn):
        rows = imported_rows(events, _locked_audit_head(conn))
        _insert_audit_rows(conn, rows)
    return len(rows)


def _audit_rows(cursor: sqlite3.Cursor) -> list[AuditRow]:
    return [AuditRow(*row) for row in cursor]


def _audit_page(
    conn: sqlite3.Connection,
    where: AuditFilter,
    limit: int,
    after: int | None,
    newest_first: bool,
) -> AuditPage:
    actor, action, since, until = where.checked()
    clauses: list[str] = []
    params: list[Any] = []
    for sql, value in (
        ("actor = ?", actor),
        ("action = ?", action),
        ("at_us >= ?", since),
        ("at_us < ?", until),
        ("seq < ?" if newest_first else "seq > ?", after),
    ):
        if value is not None:
            clauses.append(sql)
            params.append(value)
    order = "DESC" if newest_first else "ASC"
    rows = _audit_rows(
        conn.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_events "  # noqa: S608
            f"WHERE {' AND '.join(clauses) or '1'} ORDER BY seq {order} LIMIT ?",
            (*params, limit + 1),
        )
    )
    page, more = rows[:limit], len(rows) > limit
    try:
        events = tuple(AuditEvent.from_row(row) for row in page)
    except ValueError as exc:
        raise StoreCorrupted(f"stored audit event unreadable ({exc})") from None
    next_cursor = encode_cursor(where, newest_first, page[-1].seq) if more and page else None
    return AuditPage(events, next_cursor)


def _audit_checkpoints(conn: sqlite3.Connection) -> tuple[Checkpoint, ...]:
    return tuple(
        Checkpoint(AUDIT_CHAIN, int(seq), bytes(head), bytes(signature))
        for seq, head, signature in conn.execute(
            "SELECT seq, head, signature FROM audit_checkpoints ORDER BY seq, signature"
        )
    )


def _audit_add_checkpoint(conn: sqlite3.Connection, cp: Checkpoint) -> None:
    with _durable(conn), _transaction(conn):
        head = _audit_head(conn)
        last = head.seq if head is not None else 0
        if not 1 <= cp.seq <= last:
            raise InvalidRequest(
                f"audit checkpoint at seq {cp.seq} lies outside the log (1..{last})"
            )
        found = conn.execute("SELECT hash FROM audit_events WHERE seq = ?", (cp.seq,)).fetchone()
        if found is None or found[0] != cp.head:
            raise ChainConflict(AUDIT_CHAIN, cp.seq, "checkpoint head differs from the stored hash")
        conn.execute(
            "INSERT OR IGNORE INTO audit_checkpoints (seq, head, signature) VALUES (?, ?, ?)",
            (cp.seq, cp.head, cp.signature),
        )


def _audit_verify(conn: sqlite3.Connection, key: Ed25519PublicKey | None) -> AuditVerifyReport:
    with _snapshot(conn):
        verifier = AuditVerifier(_audit_checkpoints(conn), key)
        after: int | None = None
        while True:
            rows = _audit_rows(
                conn.execute(
                    f"SELECT {_AUDIT_COLUMNS} FROM audit_events "  # noqa: S608
                    f"{'WHERE seq > ? ' if after is not None else ''}ORDER BY seq LIMIT ?",
                    (*(() if after is None else (after,)), _CHUNK),
                )
            )
            for row in rows:
                verifier.feed(row)
            if len(rows) < _CHUNK:
                break
            after = rows[-1].seq
        return verifier.finish(_audit_head(conn))


def _token_from_row(row: tuple[Any, ...]) -> StoredToken:
    name, role, secret_hash, created_us, expires_us, revoked_us = row
    return StoredToken(
        name=name,
        role=role,
        secret_hash=bytes(secret_hash),
        created_at=from_us(created_us),
        expires_at=from_us(expires_us) if expires_us is not None else None,
        revoked_at=from_us(revoked_us) if revoked_us is not None else None,
    )


def _token_where(conn: sqlite3.Connection, column: str, value: Any) -> StoredToken | None:
    assert column in ("name", "secret_hash")
    found = conn.execute(
        f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE {column} = ?",  # noqa: S608
        (value,),
    ).fetchone()
    return _token_from_row(found) if found is not None else None


def _token_add(conn: sqlite3.Connection, token: StoredToken) -> None:
    with _durable(conn), _transaction(conn):
        if _token_where(conn, "name", token.name) is not None:
            raise AlreadyExists(f"a token named {token.name!r} exists (names are never reused)")
        try:
            conn.execute(
                f"INSERT INTO api_tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    token.name,
                    token.role,
                    token.secret_hash,
                    to_us(token.created_at),
                    to_us(token.expires_at) if token.expires_at is not None else None,
                    to_us(token.revoked_at) if token.revoked_at is not None else None,
                ),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists("a token with this secret exists") from None


def _token_revoke(conn: sqlite3.Connection, name: str, at_us: int) -> StoredToken:
    with _durable(conn), _transaction(conn):
        conn.execute(
            "UPDATE api_tokens SET revoked_us = coalesce(revoked_us, ?) WHERE name = ?",
            (at_us, name),
        )
        token = _token_where(conn, "name", name)
    if token is None:
        raise NotFound(f"no token named {name!r}")
    return token


# --- end of audit log and API tokens ----------------------------------------------------------


# --- message view, conversations and dashboard ------------------------------------------------
#
# Reads for the API's views (archive_api/routes). An edit history is found the way the search
# language's is:edited finds it: a correction or retraction names its original by the
# original's message id or origin id, from the same sender; the partial indexes on
# replaces_id and retracts_id make "what corrects this" cheap. "What does this correct" has
# no index of its own: it walks the sender's index from the newest record down and stops at
# the first match, which is normally close to the correction.

_LINKED_ROW: Final = "record_id, id, sender, message_id, origin_id, replaces_id, retracts_id"


def _record_position(conn: sqlite3.Connection, record_id: str) -> ChainPosition | None:
    found = conn.execute(
        "SELECT c.name, r.entry FROM records AS r JOIN chains AS c "  # noqa: S608
        f"ON c.id = (r.entry >> {_SEQ_BITS}) WHERE r.record_id = ?",
        (record_id,),
    ).fetchone()
    if found is None:
        return None
    return ChainPosition(str(found[0]), int(found[1]) & _SEQ_MASK)


def _original_of(
    conn: sqlite3.Connection, sender: str, ref: str, not_id: int
) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = conn.execute(
        f"SELECT {_LINKED_ROW} FROM records INDEXED BY records_sender "  # noqa: S608
        "WHERE sender = ? AND (message_id = ? OR origin_id = ?) AND id <> ? "
        "ORDER BY id DESC LIMIT 1",
        (sender, ref, ref, not_id),
    ).fetchone()
    return row


def _children_of(conn: sqlite3.Connection, root: tuple[Any, ...]) -> list[tuple[int, str]]:
    """(rowid, record_id) of every correction and retraction of `root`."""
    _, _, sender, message_id, origin_id, _, _ = root
    refs = [ref for ref in (message_id, origin_id) if ref]
    if not refs:
        return []
    marks = ", ".join("?" * len(refs))
    out: list[tuple[int, str]] = []
    for column, index in (("replaces_id", "records_replaces"), ("retracts_id", "records_retracts")):
        out += conn.execute(
            f"SELECT id, record_id FROM records INDEXED BY {index} "  # noqa: S608
            f"WHERE {column} IN ({marks}) AND sender = ? ORDER BY id LIMIT ?",
            (*refs, sender, MAX_LINKED_RECORDS),
        ).fetchall()
    return out


def _linked_ids(conn: sqlite3.Connection, record_ids: Sequence[str]) -> dict[str, list[str]]:
    """record_id -> the ids of its history (original first, then by time), itself left out."""
    rows = conn.execute(
        f"SELECT {_LINKED_ROW} FROM records "  # noqa: S608
        f"WHERE record_id IN ({', '.join('?' * len(record_ids))})",
        tuple(record_ids),
    ).fetchall()
    out: dict[str, list[str]] = {}
    for row in rows:
        rid, rowid, sender, _, _, replaces_id, retracts_id = row
        root = row
        ref = replaces_id or retracts_id
        if ref:
            original = _original_of(conn, sender, ref, rowid)
            if original is not None:
                root = original
        members = {int(root[1]): str(root[0])}
        members.update(_children_of(conn, root))
        found = [other for _, other in sorted(members.items()) if other != rid]
        if found:
            out[rid] = found[:MAX_LINKED_RECORDS]
    return out


def _activity(conn: sqlite3.Connection, since_us: int, until_us: int, top: int) -> Activity:
    # A time window as a rowid range (fast) and the exact bounds, as the query plan does it.
    spill = _max_spill(conn)
    low = since_us * _TIES if _MIN_SLOT < since_us <= _MAX_SLOT else -(1 << 63)
    high = (until_us + spill) * _TIES if _MIN_SLOT < until_us < _MAX_SLOT - spill else (1 << 63) - 1
    window = "r.id >= ? AND r.id < ? AND r.occurred_us >= ? AND r.occurred_us < ?"
    params = (low, high, since_us, until_us)
    day = f"(r.occurred_us - ((r.occurred_us % {_DAY_US}) + {_DAY_US}) % {_DAY_US}) / {_DAY_US}"
    per_day: dict[int, dict[str, int]] = {}
    for day_number, action, count in conn.execute(
        f"SELECT {day} AS d, r.action, count(*) FROM records AS r "  # noqa: S608
        f"WHERE {window} GROUP BY d, r.action",
        params,
    ):
        per_day.setdefault(int(day_number), {})[str(action)] = int(count)
    severity = {a.value: a.severity for a in Action}
    days = tuple(
        DayActivity(
            date(1970, 1, 1) + timedelta(days=number),
            sum(counts.values()),
            tuple((Action(a), n) for a, n in sorted(counts.items(), key=lambda i: severity[i[0]])),
        )
        for number, counts in sorted(per_day.items())
    )
    # Repeating the partial index's condition lets the planner use records_action.
    not_allowed = "r.action <> 'allow'"
    blocked = conn.execute(
        f"SELECT r.remote_domain, count(*) AS n FROM records AS r "  # noqa: S608
        f"WHERE {window} AND r.action IN ('reject', 'drop') AND {not_allowed} "
        "GROUP BY r.remote_domain ORDER BY n DESC, r.remote_domain LIMIT ?",
        (*params, top),
    ).fetchall()
    # The reasons are only in the record's canonical document; the records read are the
    # few that were not allowed. CAST: SQLite's JSON functions do not read BLOBs.
    rules = conn.execute(
        "SELECT json_extract(j.value, '$.rule_id') AS rule, count(DISTINCT r.id) AS n "  # noqa: S608
        "FROM records AS r JOIN ledger AS l ON l.id = r.entry, "
        "json_each(CAST(l.payload AS TEXT), '$.record.verdict.reasons') AS j "
        f"WHERE {window} AND {not_allowed} AND rule IS NOT NULL "
        "GROUP BY rule ORDER BY n DESC, rule LIMIT ?",
        (*params, top),
    ).fetchall()
    return Activity(
        days,
        tuple((str(d), int(n)) for d, n in blocked),
        tuple((str(rule), int(n)) for rule, n in rules),
    )


# --- end of message view, conversations and dashboard -----------------------------------------


# --- the published block list (docs/rtbl-publishing.md) ---------------------------------------
#
# Versioned by `meta.blocklist_schema`. One row per (kind, value); `meta.blocklist_version`
# grows with every write, in the same transaction, so a poller (the pubsub publisher, another
# process) sees a change without reading the whole list.

_BLOCKLIST_SCHEMA: Final = 1
_BLOCKLIST_SCHEMA_SQL: Final = {
    0: """
CREATE TABLE blocklist_entries (
    kind TEXT NOT NULL,              -- domain | jid
    value TEXT NOT NULL,             -- normalised domain or bare JID
    state TEXT NOT NULL,             -- pending | listed | rejected | retracted
    origin TEXT NOT NULL,            -- rule | officer
    reason TEXT NOT NULL,
    updated_us INTEGER NOT NULL,
    actor TEXT,
    PRIMARY KEY (kind, value)
) STRICT, WITHOUT ROWID;
CREATE INDEX blocklist_entries_state ON blocklist_entries (state, kind, value);
INSERT OR IGNORE INTO meta (key, value) VALUES ('blocklist_version', 0);
""",
}
_BLOCKLIST_COLUMNS: Final = "kind, value, state, origin, reason, updated_us, actor"


def _blocklist_select(
    conn: sqlite3.Connection, kind: str | None, state: str | None, value: str | None = None
) -> tuple[BlocklistEntry, ...]:
    where: list[str] = []
    params: list[str] = []
    for column, wanted in (("kind", kind), ("state", state), ("value", value)):
        if wanted is not None:
            where.append(f"{column} = ?")
            params.append(wanted)
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    rows = conn.execute(
        f"SELECT {_BLOCKLIST_COLUMNS} FROM blocklist_entries {clause}"  # noqa: S608
        "ORDER BY kind, value",
        params,
    )
    return tuple(
        BlocklistEntry(
            kind=str(k),
            value=str(v),
            state=str(st),
            origin=str(o),
            reason=str(r),
            updated=from_us(int(u)),
            actor=None if a is None else str(a),
        )
        for k, v, st, o, r, u, a in rows
    )


def _blocklist_put(conn: sqlite3.Connection, entries: tuple[BlocklistEntry, ...]) -> int:
    with _durable(conn), _transaction(conn):
        conn.executemany(
            f"INSERT OR REPLACE INTO blocklist_entries ({_BLOCKLIST_COLUMNS}) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (e.kind, e.value, e.state, e.origin, e.reason, to_us(e.updated), e.actor)
                for e in entries
            ],
        )
        version = _meta_version(conn, "blocklist_version") + (1 if entries else 0)
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('blocklist_version', ?)",
            (version,),
        )
    return version


# --- end of the published block list ---------------------------------------------------------


if TYPE_CHECKING:  # mypy proves SqliteStore implements the protocol
    _conforms: type[ArchiveStore] = SqliteStore
    _conforms_blocklist: type[BlocklistStore] = SqliteStore
