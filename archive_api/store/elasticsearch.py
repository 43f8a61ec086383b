"""The Elasticsearch (and OpenSearch-dialect) archive store. The only module importing it.

Layout: four plain indices, each created as `{prefix}-{kind}-000001` behind the alias
`{prefix}-{kind}` from an index template `{prefix}-{kind}` (so a later rollover only has to
add a new backing index). Data streams and ILM are not used yet: osmem-server, the server
the conformance suite runs against, supports neither (docs/elasticsearch.md).

- `ledger`: one document per chain link, `_id` derived from (chain, seq), holding
  prev_hash, hash and the payload (base64) plus the entry's op and record_id. It is the
  store's copy of the hash chain, and `get` merges observations, status changes and
  attachment fetches from it at read time (so an entry that arrives before its RECORD
  needs no special case).
- `records`: one document per record, `_id` derived from the record id, holding the
  searchable fields derived from the RECORD payload and where that payload sits in the
  ledger (chain, seq). The record itself is always read back from the ledger payload, so
  what a reader sees is byte-for-byte what the hash covers.
- `chains`: one document per chain with last_seq and head; updated last in `apply`, with
  optimistic concurrency, so `last_seq` only moves once a batch's documents are written.
- `checkpoints`: signed chain heads.

Writes are create-only with deterministic ids through `async_streaming_bulk` (chunked by
count and bytes, retried with backoff on 429); a 409 on an existing `_id` means the
document is there already, which is success for an idempotent retry. The one exception is
a ledger document past the chain's committed head that differs from the link being
written: it is the leftover of a batch that failed half-way, never committed, and is
overwritten.

Search compiles the query AST to bool queries of term/match_phrase/match_phrase_prefix/
range clauses; user text only ever reaches `match_phrase*` as a value, never
`query_string`. Relevance is a sum of constant scores (1 per text term matching the body,
2 per term matching the subject), a function of the query and the document alone, so
relevance cursors stay stable while records are added.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import itertools
import json
import math
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    ConflictError,
    NotFoundError,
    TransportError,
)
from elasticsearch.helpers import async_streaming_bulk

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
    chain_entry,
    check_entry,
    check_page_args,
    decode_cursor,
    encode_cursor,
    imported_rows,
)
from archive_api.store.audit import to_us as audit_us
from archive_api.store.base import (
    DEFAULT_CHAIN,
    HIGHLIGHT_END,
    HIGHLIGHT_START,
    MAX_LINKED_RECORDS,
    MAX_PAGE_SIZE,
    SORT_ORDERS,
    TOMBSTONE_OP,
    Activity,
    ArchiveStore,
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
from archive_api.store.chain import GENESIS, ChainLink, Checkpoint, link_hash
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
)
from archive_api.store.records import (
    ArchiveRecord,
    Direction,
    EntryOp,
    FetchStatus,
    Observation,
    RecordKind,
    RecordStatus,
    SpoolEntry,
)
from archive_api.store.tokens import StoredToken, check_token_name
from classifier.verdict import Action

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_MAX_CHAIN_NAME: Final = 200
_PREFIX_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,60}")
_PAGE: Final = 1000  # documents per request when walking an index
_MAX_PROBLEMS: Final = 1000
_CURSOR_VERSION: Final = 1
_PLAIN_SNIPPET_CHARS: Final = 200
_SNIPPET_LEAD_CHARS: Final = 60
_PHRASE_PREFIX_EXPANSIONS: Final = 1024
_SEP: Final = "\x1f"  # joins (sender, message id) into one keyword; never in a JID

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

# Derived from the RECORD payload alone; verify recomputes exactly these and compares.
_DERIVED_FIELDS: Final = (
    "record_id",
    "occurred_us",
    "occurred_at",
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
    "room_domain",
    "action",
    "reasons",
    "has_attachment",
    "encrypted",
    "message_id",
    "origin_id",
    "edit_keys",
    "replaces_key",
    "retracts_key",
    "body",
    "subject",
)

_KEYWORD: Final = {"type": "keyword"}
_STORED_ONLY: Final = {"type": "keyword", "index": False, "doc_values": False}
_TEXT: Final = {"type": "text", "analyzer": "folded"}
_STORED_TEXT: Final = {"type": "text", "index": False}  # kept in _source, any length

_ANALYSIS: Final = {
    # Case- and accent-insensitive words of letters and digits, like SQLite's FTS5 unicode61
    # tokenizer with remove_diacritics 2: every other character separates words (the
    # standard tokenizer alone would keep `_wild_` and `don't` whole).
    "char_filter": {
        "separators": {
            "type": "pattern_replace",
            "pattern": "[^\\p{L}\\p{N}\\p{M}]+",
            "replacement": " ",
        }
    },
    "analyzer": {
        "folded": {
            "type": "custom",
            "char_filter": ["separators"],
            "tokenizer": "standard",
            "filter": ["lowercase", "asciifolding"],
        }
    },
}

_MAPPINGS: Final[dict[str, dict[str, Any]]] = {
    "ledger": {
        "dynamic": "strict",
        "properties": {
            "chain": _KEYWORD,
            "seq": {"type": "long"},
            "prev_hash": _STORED_ONLY,
            "hash": _STORED_ONLY,
            "payload": {"type": "binary"},
            "op": _KEYWORD,
            "record_id": _KEYWORD,
        },
    },
    "records": {
        "dynamic": "strict",
        "properties": {
            "record_id": _KEYWORD,
            "chain": _KEYWORD,
            "seq": {"type": "long"},
            "occurred_us": {"type": "long"},
            "occurred_at": {"type": "date"},
            "kind": _KEYWORD,
            "rtype": _KEYWORD,
            "direction": _KEYWORD,
            "sender": _KEYWORD,
            "sender_full": _KEYWORD,
            "sender_domain": _KEYWORD,
            "recipient": _KEYWORD,
            "recipient_full": _KEYWORD,
            "recipient_domain": _KEYWORD,
            "remote_domain": _KEYWORD,
            "room": _KEYWORD,
            "room_domain": _KEYWORD,
            "action": _KEYWORD,
            "reasons": _KEYWORD,
            "has_attachment": {"type": "boolean"},
            "encrypted": {"type": "boolean"},
            "message_id": _KEYWORD,
            "origin_id": _KEYWORD,
            "edit_keys": _KEYWORD,
            "replaces_key": _KEYWORD,
            "retracts_key": _KEYWORD,
            "edited": {"type": "boolean"},
            "retracted": {"type": "boolean"},
            "body": _TEXT,
            "subject": _TEXT,
            # A copy of the record's retention (the `retention` index is the authority), so
            # purge can select due and unheld records with one query; see set_retention.
            "retention_class": _KEYWORD,
            "expires_us": {"type": "long"},
        },
    },
    "chains": {
        "dynamic": "strict",
        "properties": {"chain": _KEYWORD, "last_seq": {"type": "long"}, "head": _STORED_ONLY},
    },
    "checkpoints": {
        "dynamic": "strict",
        "properties": {
            "chain": _KEYWORD,
            "seq": {"type": "long"},
            "head": _STORED_ONLY,
            "signature": _KEYWORD,
        },
    },
    # --- the audit log, API tokens, holds and retention (see their section below) ---
    "audit": {
        "dynamic": "strict",
        "properties": {
            "seq": {"type": "long"},
            "at_us": {"type": "long"},
            "actor": _KEYWORD,
            "role": _KEYWORD,
            "action": _KEYWORD,
            "params": _STORED_TEXT,
            "result_count": {"type": "long"},
            "outcome": _KEYWORD,
            "prev_hash": _STORED_ONLY,
            "hash": _STORED_ONLY,
        },
    },
    "audit_head": {
        "dynamic": "strict",
        "properties": {"seq": {"type": "long"}, "hash": _STORED_ONLY},
    },
    "audit_checkpoints": {
        "dynamic": "strict",
        "properties": {"seq": {"type": "long"}, "head": _STORED_ONLY, "signature": _KEYWORD},
    },
    "tokens": {
        "dynamic": "strict",
        "properties": {
            "name": _KEYWORD,
            "role": _KEYWORD,
            "secret_hash": _KEYWORD,
            "created_us": {"type": "long"},
            "expires_us": {"type": "long"},
            "revoked_us": {"type": "long"},
        },
    },
    "token_secrets": {"dynamic": "strict", "properties": {"name": _KEYWORD}},
    "holds": {
        "dynamic": "strict",
        "properties": {
            "hold_id": _KEYWORD,
            "case_name": _STORED_TEXT,
            "created_by": _STORED_TEXT,
            "created_us": {"type": "long"},
            "scope": _STORED_TEXT,
            "query": _STORED_TEXT,
            "released_us": {"type": "long"},
            "released_by": _STORED_TEXT,
            "release_reason": _STORED_TEXT,
        },
    },
    "retention": {
        "dynamic": "strict",
        "properties": {
            "record_id": _KEYWORD,
            "retention_class": _KEYWORD,
            "expires_us": {"type": "long"},
            "assigned_us": {"type": "long"},
            "purged_us": {"type": "long"},
        },
    },
}
_MAPPINGS["dedup"] = {"dynamic": "strict", "properties": {"kind": _KEYWORD}}
_ROLLING_KINDS: Final = frozenset({"ledger", "records"})
"""The kinds whose alias may span several backing indices (rollover); the others never roll
over: their create-only `_id`s and compare-and-swap writes need one index."""
INDEX_KINDS: Final = tuple(_MAPPINGS)
"""Every kind of index the store keeps, each `{prefix}-{kind}` (an alias) with a template."""


# --- deriving documents ---------------------------------------------------------------------


def _to_us(at: datetime) -> int:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // _US


def _doc_id(*parts: str) -> str:
    """A deterministic `_id` within Elasticsearch's 512-byte limit, whatever the parts."""
    return hashlib.sha256(_SEP.join(parts).encode()).hexdigest()[:40]


def _ledger_id(chain: str, seq: int) -> str:
    return _doc_id("ledger", chain, str(seq))


def _record_doc_id(record_id: str) -> str:
    return _doc_id("record", record_id)


def _check_fetch(fetch: Any) -> None:
    if not isinstance(fetch, dict):
        raise ValueError("malformed attachment fetch")
    url = fetch.get("url")
    if not isinstance(url, str) or not url:
        raise ValueError("attachment fetch without a url")
    status = FetchStatus(fetch["status"])
    attempt, size, sha256 = fetch["attempt"], fetch.get("size"), fetch.get("sha256")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise ValueError("attachment fetch attempt must be a positive integer")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ValueError("attachment size must be a non-negative integer")
    if sha256 is not None and (
        not isinstance(sha256, str)
        or len(sha256) != 64
        or not frozenset("0123456789abcdef").issuperset(sha256)
    ):
        raise ValueError("attachment sha256 must be 64 lower-case hex digits")
    if status is FetchStatus.OK and (sha256 is None or size is None):
        raise ValueError("a successful attachment fetch needs sha256 and size")


def _parse_entry(payload: bytes) -> tuple[SpoolEntry, dict[str, Any]]:
    """The spool entry a payload holds (and its JSON); ValueError when it is not one."""
    try:
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        op = EntryOp(data["op"])
        record_id = data["record_id"]
        if not isinstance(record_id, str) or not record_id:
            raise ValueError("record_id is missing")
        if op is EntryOp.RECORD:
            rec = data["record"]
            if not isinstance(rec, dict):
                raise ValueError("record is not an object")
            for key in _STR_FIELDS:
                if rec.get(key) is not None and not isinstance(rec[key], str):
                    raise ValueError(f"{key} is not a string")
            if rec.get("record_id") != record_id:
                raise ValueError("the record's id differs from the entry's record_id")
        elif op is EntryOp.OBSERVE and not isinstance(data.get("observation"), dict):
            raise ValueError("observe entry without an observation")
        elif op is EntryOp.STATUS:
            RecordStatus(data["status"])
        elif op is EntryOp.ATTACHMENT:
            _check_fetch(data.get("fetch"))
        entry = SpoolEntry.from_json(data)
    except (KeyError, TypeError, AttributeError, OverflowError, UnicodeDecodeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    return entry, data


def _edit_keys(sender: str, *ids: str | None) -> list[str]:
    return [f"{sender}{_SEP}{i}" for i in ids if i]


def _derive(rec: ArchiveRecord) -> dict[str, Any]:
    """The searchable fields of a record (exactly `_DERIVED_FIELDS`)."""
    sender = normalize_jid(rec.sender)
    recipient = normalize_jid(rec.recipient)
    sender_domain, recipient_domain = jid_domain(sender), jid_domain(recipient)
    room = normalize_jid(rec.room) if rec.room else None
    occurred_us = _to_us(rec.occurred_at)
    kind = rec.kind.value
    return {
        "record_id": rec.record_id,
        "occurred_us": occurred_us,
        # Milliseconds for the day histogram; occurred_us is what sorts and filters.
        "occurred_at": occurred_us // 1000,
        "kind": kind,
        "rtype": (rec.stanza_type or "normal") if rec.kind is RecordKind.MESSAGE else kind,
        "direction": rec.direction.value,
        "sender": sender,
        "sender_full": normalize_jid(rec.sender_full),
        "sender_domain": sender_domain,
        "recipient": recipient,
        "recipient_full": normalize_jid(rec.recipient_full),
        "recipient_domain": recipient_domain,
        # Same rule as ArchiveRecord.remote_domain, on the normalised JIDs.
        "remote_domain": (
            recipient_domain if rec.direction is Direction.FROM_CLIENT else sender_domain
        ),
        "room": room,
        "room_domain": room.rpartition("@")[2] if room else None,
        "action": rec.verdict.action.value,
        "reasons": sorted({r.rule_id for r in rec.verdict.reasons}),
        "has_attachment": bool(rec.attachments),
        "encrypted": bool(rec.encryption),
        "message_id": rec.message_id,
        "origin_id": rec.origin_id,
        "edit_keys": _edit_keys(sender, rec.message_id, rec.origin_id),
        "replaces_key": _edit_keys(sender, rec.replaces_id)[0] if rec.replaces_id else None,
        "retracts_key": _edit_keys(sender, rec.retracts_id)[0] if rec.retracts_id else None,
        "body": rec.body,
        "subject": rec.subject,
    }


# --- compiling the query AST ------------------------------------------------------------------


def _text_query(term: TextTerm) -> dict[str, Any]:
    """One text term: a phrase (its last word a prefix for `word*`) in body or subject.

    Every term is a phrase of its words, as in the SQLite store, and its text is only ever
    the value of a match_phrase query: analysed, never parsed as query syntax.
    """
    text = term.text.replace('"', " ")
    should = []
    for field, weight in (("body", 1.0), ("subject", 2.0)):
        if term.prefix:
            inner: dict[str, Any] = {
                "match_phrase_prefix": {
                    field: {"query": text, "max_expansions": _PHRASE_PREFIX_EXPANSIONS}
                }
            }
        else:
            inner = {"match_phrase": {field: {"query": text}}}
        should.append({"constant_score": {"filter": inner, "boost": weight}})
    return {"bool": {"should": should, "minimum_should_match": 1}}


def _party(side: str, jid: JidPattern) -> dict[str, Any]:
    if jid.kind is JidKind.DOMAIN:
        return {"term": {f"{side}_domain": jid.value}}
    if jid.kind is JidKind.BARE:
        return {"term": {side: jid.value}}
    return {"bool": {"filter": [{"term": {side: jid.bare}}, {"term": {f"{side}_full": jid.value}}]}}


def _filter(clause: Clause) -> dict[str, Any]:
    match clause.term:
        case PartyTerm(party=party, jid=jid):
            if party is Party.FROM:
                return _party("sender", jid)
            if party is Party.TO:
                return _party("recipient", jid)
            return {
                "bool": {
                    "should": [_party("sender", jid), _party("recipient", jid)],
                    "minimum_should_match": 1,
                }
            }
        case RoomTerm(room=room):
            if room.kind is JidKind.DOMAIN:
                return {"term": {"room_domain": room.value}}
            return {"term": {"room": room.value}}
        case TimeTerm(bound=bound, at=at):
            op = "gte" if bound is TimeBound.AFTER else "lt"
            return {"range": {"occurred_us": {op: _to_us(at)}}}
        case TypeTerm(type=record_type):
            if record_type is RecordType.FILE:
                return {
                    "bool": {
                        "should": [
                            {"term": {"rtype": record_type.value}},
                            {"term": {"has_attachment": True}},
                        ],
                        "minimum_should_match": 1,
                    }
                }
            return {"term": {"rtype": record_type.value}}
        case VerdictTerm(action=action):
            return {"term": {"action": action.value}}
        case FlagTerm(flag=flag):
            field = {
                Flag.ATTACHMENT: "has_attachment",
                Flag.ENCRYPTED: "encrypted",
                Flag.EDITED: "edited",
                Flag.RETRACTED: "retracted",
            }[flag]
            return {"term": {field: True}}
        case TextTerm():
            raise AssertionError("text terms are compiled by _text_query")


@dataclass(frozen=True, slots=True)
class _Compiled:
    query: dict[str, Any]
    highlight: dict[str, Any] | None  # the positive text terms, when there are any


def _compile(query: Query) -> _Compiled:
    must: list[dict[str, Any]] = []
    must_not: list[dict[str, Any]] = []
    filters: list[dict[str, Any]] = []
    for clause in query.clauses:
        if isinstance(clause.term, TextTerm):
            (must_not if clause.negated else must).append(_text_query(clause.term))
        else:
            (must_not if clause.negated else filters).append(_filter(clause))
    compiled: dict[str, Any] = {"bool": {"must": must, "must_not": must_not, "filter": filters}}
    highlight = {"bool": {"should": must, "minimum_should_match": 1}} if must else None
    return _Compiled(compiled, highlight)


def _sort(sort: SortOrder) -> list[dict[str, Any]]:
    # record_id is the tie-breaker that makes the order total, so search_after is exact.
    if sort == "time_asc":
        return [{"occurred_us": "asc"}, {"record_id": "asc"}]
    if sort == "relevance":
        return [{"_score": "desc"}, {"occurred_us": "desc"}, {"record_id": "desc"}]
    return [{"occurred_us": "desc"}, {"record_id": "desc"}]


# --- cursors ----------------------------------------------------------------------------------


def _query_key(query: Query, sort: SortOrder) -> str:
    return hashlib.sha256(f"{sort}\n{query}".encode()).hexdigest()[:16]


def _encode_cursor(query: Query, sort: SortOrder, after: list[Any]) -> str:
    data = [_CURSOR_VERSION, _query_key(query, sort), after]
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 63


def _decode_cursor(cursor: str, query: Query, sort: SortOrder) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, key, after = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidCursor("malformed paging cursor") from None
    if version != _CURSOR_VERSION or key != _query_key(query, sort):
        raise InvalidCursor("the paging cursor belongs to a different query or sort order")
    if not isinstance(after, list):
        raise InvalidCursor("malformed paging cursor")
    if sort == "relevance":
        if len(after) != 3:
            raise InvalidCursor("malformed paging cursor")
        score, after = after[0], after[1:]
        if (
            not isinstance(score, float | int)
            or isinstance(score, bool)
            or not math.isfinite(score)
        ):
            raise InvalidCursor("malformed paging cursor")
    if len(after) != 2 or not _is_int(after[0]) or not isinstance(after[1], str):
        raise InvalidCursor("malformed paging cursor")
    return [score, *after] if sort == "relevance" else after


# --- snippets ---------------------------------------------------------------------------------


def _snippet_from_highlight(marked: str) -> tuple[SnippetPart, ...]:
    # Words of one phrase come back marked one by one; a run of matches separated only by
    # spaces is one match, as the SQLite store marks it.
    marked = re.sub(f"{HIGHLIGHT_END}(\\s+){HIGHLIGHT_START}", r"\1", marked)
    first = marked.find(HIGHLIGHT_START)
    if len(marked) > _PLAIN_SNIPPET_CHARS + 2 * marked.count(HIGHLIGHT_START):
        start = max(0, first - _SNIPPET_LEAD_CHARS)
        window = marked[start : start + _PLAIN_SNIPPET_CHARS]
        if window.count(HIGHLIGHT_START) > window.count(HIGHLIGHT_END):
            window += HIGHLIGHT_END
        marked = ("…" if start else "") + window + "…"
    return parse_marked(marked)


def _plain_snippet(rec: ArchiveRecord) -> tuple[SnippetPart, ...]:
    plain = rec.body or rec.subject or ""
    if len(plain) > _PLAIN_SNIPPET_CHARS:
        plain = plain[:_PLAIN_SNIPPET_CHARS] + "…"
    return (SnippetPart(plain),) if plain else ()


# --- documents of the audit log, tokens, holds and retention ----------------------------------

_AUDIT_HEAD_ID: Final = "head"
_RETENTION_CURSOR_VERSION: Final = 1


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _audit_doc_id(seq: int) -> str:
    return f"{seq:020d}"  # the seq itself: create-only, so each seq is taken once


def _audit_source(row: AuditRow) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "at_us": row.at_us,
        "actor": row.actor,
        "role": row.role,
        "action": row.action,
        "params": row.params,
        "result_count": row.result_count,
        "outcome": row.outcome,
        "prev_hash": row.prev_hash.hex(),
        "hash": row.hash.hex(),
    }


def _audit_row_from(src: dict[str, Any]) -> AuditRow:
    try:
        count = src.get("result_count")
        return AuditRow(
            seq=int(src["seq"]),
            at_us=int(src["at_us"]),
            actor=str(src["actor"]),
            role=None if src.get("role") is None else str(src["role"]),
            action=str(src["action"]),
            params=str(src["params"]),
            result_count=None if count is None else int(count),
            outcome=str(src["outcome"]),
            prev_hash=bytes.fromhex(src["prev_hash"]),
            hash=bytes.fromhex(src["hash"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreCorrupted(f"unreadable audit event ({exc})") from None


def _token_doc_id(name: str) -> str:
    return _doc_id("token", name)


def _token_source(token: StoredToken) -> dict[str, Any]:
    def us(at: datetime | None) -> int | None:
        return audit_us(at) if at is not None else None

    return {
        "name": token.name,
        "role": token.role,
        "secret_hash": token.secret_hash.hex(),
        "created_us": audit_us(token.created_at),
        "expires_us": us(token.expires_at),
        "revoked_us": us(token.revoked_at),
    }


def _token_from_source(src: dict[str, Any]) -> StoredToken:
    def at(key: str) -> datetime | None:
        value = src.get(key)
        return _from_us(int(value)) if value is not None else None

    try:
        return StoredToken(
            name=str(src["name"]),
            role=str(src["role"]),
            secret_hash=bytes.fromhex(src["secret_hash"]),
            created_at=_from_us(int(src["created_us"])),
            expires_at=at("expires_us"),
            revoked_at=at("revoked_us"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreCorrupted(f"unreadable API token ({exc})") from None


def _hold_doc_id(hold_id: str) -> str:
    return _doc_id("hold", hold_id)


def _hold_source(hold: HoldRecord) -> dict[str, Any]:
    return {
        "hold_id": hold.hold_id,
        "case_name": hold.case_name,
        "created_by": hold.created_by,
        "created_us": _to_us(hold.created_at),
        "scope": hold.scope,
        "query": hold.query,
        "released_us": _to_us(hold.released_at) if hold.released_at is not None else None,
        "released_by": hold.released_by,
        "release_reason": hold.release_reason,
    }


def _hold_from_source(src: dict[str, Any]) -> HoldRecord:
    try:
        released = src.get("released_us")
        return HoldRecord(
            hold_id=str(src["hold_id"]),
            case_name=str(src["case_name"]),
            created_by=str(src["created_by"]),
            created_at=_from_us(int(src["created_us"])),
            scope=str(src["scope"]),
            query=str(src["query"]),
            released_at=_from_us(int(released)) if released is not None else None,
            released_by=src.get("released_by"),
            release_reason=src.get("release_reason"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreCorrupted(f"unreadable legal hold ({exc})") from None


def _retention_id(record_id: str) -> str:
    return _doc_id("retention", record_id)


def _subject_from_source(src: dict[str, Any]) -> RetentionSubject:
    expires = src.get("expires_us")
    return RetentionSubject(
        record_id=src["record_id"],
        occurred_at=_from_us(int(src["occurred_us"])),
        record_type=src["rtype"],
        direction=src["direction"],
        sender=src["sender"],
        recipient=src["recipient"],
        room=src.get("room"),
        retention_class=src.get("retention_class") if expires is not None else None,
        expires_at=_from_us(int(expires)) if expires is not None else None,
    )


def _encode_retention_cursor(after: list[Any]) -> str:
    data = [_RETENTION_CURSOR_VERSION, after]
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _decode_retention_cursor(cursor: str) -> list[Any]:
    if not isinstance(cursor, str) or len(cursor) > 1000:
        raise InvalidCursor("malformed retention cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, after = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidCursor("malformed retention cursor") from None
    if (
        version != _RETENTION_CURSOR_VERSION
        or not isinstance(after, list)
        or len(after) != 2
        or not _is_int(after[0])
        or not isinstance(after[1], str)
    ):
        raise InvalidCursor("malformed retention cursor")
    return after


# --- the store --------------------------------------------------------------------------------


def _check_chain_name(chain: str) -> None:
    if not chain or len(chain) > _MAX_CHAIN_NAME or not chain.isprintable():
        raise InvalidRequest(f"invalid chain name {chain[:40]!r}")


def _translate(exc: Exception) -> StoreError:
    if isinstance(exc, ApiError):
        if exc.meta.status in (429, 502, 503, 504):
            return StoreUnavailable(f"Elasticsearch is busy or unavailable: {exc}")
        return StoreError(f"Elasticsearch refused a request: {exc}")
    return StoreUnavailable(f"Elasticsearch cannot be reached: {exc}")


@dataclass(frozen=True, slots=True)
class _ChainDoc:
    last_seq: int
    head: bytes
    seq_no: int | None  # for optimistic concurrency; None when the chain is new
    primary_term: int | None


@dataclass(frozen=True, slots=True)
class _Entry:
    """A ledger document, decoded."""

    chain: str
    seq: int
    prev_hash: bytes
    hash: bytes
    payload: bytes

    @property
    def link(self) -> ChainLink:
        return ChainLink(self.seq, self.prev_hash, self.hash, self.payload)


def _is_tombstone(payload: bytes) -> bool:
    try:
        return Tombstone.from_payload(payload) is not None
    except ValueError:
        return False


def _same_link(stored: ChainLink, link: ChainLink) -> bool:
    """A re-sent link is the stored one, or the one whose payload a purge made a tombstone."""
    if stored == link:
        return True
    try:
        tombstone = Tombstone.from_payload(stored.payload)
    except ValueError:
        return False
    return tombstone is not None and (stored.seq, stored.prev_hash, stored.hash) == (
        link.seq,
        link.prev_hash,
        link.hash,
    )


def _entry_from_source(src: dict[str, Any]) -> _Entry:
    try:
        return _Entry(
            src["chain"],
            int(src["seq"]),
            bytes.fromhex(src["prev_hash"]),
            bytes.fromhex(src["hash"]),
            base64.b64decode(src["payload"], validate=True),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise StoreCorrupted(f"unreadable ledger document ({exc})") from exc


@dataclass(frozen=True, slots=True)
class BulkLimits:
    """How `async_streaming_bulk` cuts and retries writes: a request carries at most
    `chunk_docs` actions and `chunk_bytes` bytes; actions refused with 429 (the cluster's
    write queue is full) are sent again up to `retries` times, waiting `initial_backoff`
    seconds, doubling up to `max_backoff`."""

    chunk_docs: int = 500
    chunk_bytes: int = 10 * 1024 * 1024
    retries: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        for name in ("chunk_docs", "chunk_bytes", "retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name != "retries"):
                raise InvalidRequest(f"bulk {name} must be a whole number of at least 1")
        if not 0 < self.initial_backoff <= self.max_backoff <= 3600:
            raise InvalidRequest("bulk backoff must satisfy 0 < initial <= max <= 3600 seconds")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the server offers beyond plain indices and aliases."""

    lifecycle: bool  # index lifecycle management (`_ilm`): rolls ledger and records over
    rollover: bool  # the rollover API; without it `roll_over` moves the alias itself


_ROLLOVER_SIZE: Final = "50gb"
_ROLLOVER_AGE: Final = "30d"

SnapshotMode = Literal["point_in_time", "scroll", "search_after"]
_UNSUPPORTED: Final = frozenset({400, 403, 404, 405, 501})  # no such API, or not ours to use
_PROBE_KEEP_ALIVE: Final = "10s"
_SNAPSHOT_KEEP_ALIVE: Final = "5m"  # between two pages of an export


def choose_snapshot_mode(*, point_in_time: bool, scroll: bool) -> SnapshotMode:
    """Point in time where the server has it (it survives shard moves and costs less than a
    scroll), a scroll otherwise, plain search_after paging when it has neither."""
    if point_in_time:
        return "point_in_time"
    if scroll:
        return "scroll"
    return "search_after"


class ElasticsearchStore:
    """`ArchiveStore` on Elasticsearch. Create with `await ElasticsearchStore.open(url)`."""

    def __init__(
        self, client: AsyncElasticsearch, prefix: str, bulk: BulkLimits | None = None
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._closed = False
        self._bulk_limits = bulk if bulk is not None else BulkLimits()
        self._snapshot: SnapshotMode | None = None  # probed on first use
        self._capabilities: Capabilities | None = None  # probed on first use

    @classmethod
    async def open(
        cls,
        url: str | Sequence[str],
        *,
        index_prefix: str = "stanzaguard",
        request_timeout: float = 30.0,
        basic_auth: tuple[str, str] | None = None,
        api_key: str | None = None,
        ca_certs: str | None = None,
        bulk: BulkLimits | None = None,
    ) -> ElasticsearchStore:
        """Connect, and create the index templates and indices when they are missing."""
        if not _PREFIX_RE.fullmatch(index_prefix):
            raise InvalidRequest(
                "index prefix must be lower-case letters, digits, '-' or '_' (at most 61)"
            )
        hosts = [url] if isinstance(url, str) else list(url)
        options: dict[str, Any] = {}
        if ca_certs is not None:
            options["ca_certs"] = ca_certs
        client = AsyncElasticsearch(
            hosts,
            request_timeout=request_timeout,
            basic_auth=basic_auth,
            api_key=api_key,
            retry_on_status=(502, 503, 504),
            max_retries=3,
            **options,
        )
        store = cls(client, index_prefix, bulk)
        try:
            await store._ensure_indices()
            await store._ensure_audit_head()
        except BaseException:
            await client.close()
            raise
        return store

    def index(self, kind: str) -> str:
        """The alias every read and write of one kind of document goes through."""
        return f"{self._prefix}-{kind}"

    async def _ensure_indices(self) -> None:
        lifecycle = await self._ensure_lifecycle_policy()
        try:
            for kind, mappings in _MAPPINGS.items():
                alias = self.index(kind)
                settings: dict[str, Any] = {"analysis": _ANALYSIS} if kind == "records" else {}
                if lifecycle is not None and kind in _ROLLING_KINDS:
                    settings["index.lifecycle.name"] = lifecycle
                    settings["index.lifecycle.rollover_alias"] = alias
                await self._client.indices.put_index_template(
                    name=alias,
                    index_patterns=[f"{alias}-*"],
                    template={"settings": settings, "mappings": mappings},
                    priority=100,
                )
                if not await self._client.indices.exists_alias(name=alias):
                    try:
                        await self._client.indices.create(
                            index=f"{alias}-000001", aliases={alias: {"is_write_index": True}}
                        )
                    except ApiError as exc:  # another process created it meanwhile
                        if exc.meta.status != 400 or "already_exists" not in str(exc):
                            raise
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc

    # -- what the server offers, probed at start-up (docs/elasticsearch.md) --

    async def _supported(self, probe: Awaitable[Any]) -> bool:
        """Whether a probing request worked; False when the server has no such API."""
        try:
            await probe
        except ApiError as exc:
            if exc.meta.status in _UNSUPPORTED:
                return False
            raise _translate(exc) from exc
        except TransportError as exc:
            raise _translate(exc) from exc
        return True

    async def capabilities(self) -> Capabilities:
        """Index lifecycle management and rollover: probed once. (Data streams are not
        probed: the store does not use them, docs/elasticsearch.md.)"""
        if self._capabilities is None:
            client = self._client
            self._capabilities = Capabilities(
                lifecycle=await self._supported(client.ilm.get_status()),
                rollover=await self._supported(
                    client.indices.rollover(alias=self.index("ledger"), dry_run=True)
                ),
            )
        return self._capabilities

    async def _ensure_lifecycle_policy(self) -> str | None:
        """Where the server has ILM: a policy that rolls `ledger` and `records` over by size
        and age and never deletes (purge deletes, record by record, around legal holds).
        Returns its name, or None on servers without ILM (plain indices behind aliases)."""
        if not await self._supported(self._client.ilm.get_status()):
            return None
        name = f"{self._prefix}-rollover"
        try:
            await self._client.ilm.put_lifecycle(
                name=name,
                policy={
                    "_meta": {"managed_by": "stanzaguard", "deletes": "never (see purge)"},
                    "phases": {
                        "hot": {
                            "actions": {
                                "rollover": {
                                    "max_primary_shard_size": _ROLLOVER_SIZE,
                                    "max_age": _ROLLOVER_AGE,
                                }
                            }
                        }
                    },
                },
            )
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        return name

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._client.close()

    async def refresh(self) -> None:
        """Make everything written so far visible to search (apply already does this)."""
        self._check_open()
        try:
            await self._client.indices.refresh(index=",".join(self.index(k) for k in _MAPPINGS))
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc

    # -- low-level helpers --

    async def _search(self, kind: str, **body: Any) -> dict[str, Any]:
        self._check_open()
        try:
            resp = await self._client.search(index=self.index(kind), **body)
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        result: dict[str, Any] = resp.body
        return result

    async def _scan(
        self, kind: str, query: dict[str, Any], sort: list[dict[str, Any]], **extra: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Every matching document's hit, in `sort` order (which must be total)."""
        after: list[Any] | None = None
        while True:
            kw: dict[str, Any] = {"query": query, "sort": sort, "size": _PAGE, **extra}
            if after is not None:
                kw["search_after"] = after
            hits = (await self._search(kind, **kw))["hits"]["hits"]
            for hit in hits:
                yield hit
            if len(hits) < _PAGE:
                return
            after = hits[-1]["sort"]

    async def _bulk(self, actions: list[dict[str, Any]]) -> list[tuple[bool, dict[str, Any]]]:
        """Run bulk actions; returns (created, item) per action, a 409 counting as not created.

        Chunks by count and bytes; 429s are retried with exponential backoff by the helper.
        """
        out: list[tuple[bool, dict[str, Any]]] = []
        if not actions:
            return out
        self._check_open()
        limits = self._bulk_limits
        try:
            async for ok, item in async_streaming_bulk(
                self._client,
                actions,
                chunk_size=limits.chunk_docs,
                max_chunk_bytes=limits.chunk_bytes,
                max_retries=limits.retries,
                initial_backoff=limits.initial_backoff,
                max_backoff=limits.max_backoff,
                raise_on_error=False,
                raise_on_exception=True,
            ):
                (result,) = item.values()
                if not ok and result.get("status") != 409:
                    status = result.get("status")
                    error = result.get("error")
                    if status == 429:
                        raise StoreUnavailable(f"Elasticsearch kept refusing writes: {error}")
                    raise StoreError(f"Elasticsearch refused a write ({status}): {error}")
                out.append((ok, result))
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        return out

    async def _chain_doc(self, chain: str) -> _ChainDoc | None:
        self._check_open()
        try:
            resp = await self._client.get(index=self.index("chains"), id=_doc_id("chain", chain))
        except NotFoundError:
            return None
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        src = resp["_source"]
        return _ChainDoc(
            int(src["last_seq"]), bytes.fromhex(src["head"]), resp["_seq_no"], resp["_primary_term"]
        )

    async def _mget(self, kind: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Documents by `_id` (realtime: no refresh needed); missing ones are left out.

        For the kinds that roll over, a search on every backing index (refreshed data).
        """
        out: dict[str, dict[str, Any]] = {}
        if not ids:
            return out
        if kind in _ROLLING_KINDS:
            return {
                doc_id: hit["_source"] for doc_id, hit in (await self._locate(kind, ids)).items()
            }
        self._check_open()
        try:
            for start in range(0, len(ids), _PAGE):
                resp = await self._client.mget(
                    index=self.index(kind), ids=ids[start : start + _PAGE]
                )
                for doc in resp["docs"]:
                    if doc.get("found"):
                        out[doc["_id"]] = doc["_source"]
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        return out

    # -- apply --

    async def apply(
        self, links: Sequence[ChainLink], *, chain: str = DEFAULT_CHAIN, tombstones: bool = False
    ) -> None:
        _check_chain_name(chain)
        self._check_open()
        if not links:
            return
        state = await self._chain_doc(chain)
        last, head = (state.last_seq, state.head) if state else (0, GENESIS)
        if links[0].seq > last + 1:
            raise ChainGap(chain, last + 1, f"batch starts at seq {links[0].seq}")
        for before, after in itertools.pairwise(links):
            if after.seq > before.seq + 1:
                raise ChainGap(chain, before.seq + 1, f"batch skips to seq {after.seq}")
            if after.seq != before.seq + 1:
                raise ChainConflict(chain, after.seq, "out of order or repeated entry")
        applied = [link for link in links if link.seq <= last]
        new = [link for link in links if link.seq > last]
        if applied:
            stored = await self._mget("ledger", [_ledger_id(chain, link.seq) for link in applied])
            for link in applied:
                src = stored.get(_ledger_id(chain, link.seq))
                if src is None:
                    raise StoreCorrupted(f"chain {chain!r} has no stored entry at seq {link.seq}")
                if not _same_link(_entry_from_source(src).link, link):
                    raise ChainConflict(chain, link.seq, "differs from the applied entry")
        moved = await self._moved_tombstones(chain, new) if tombstones else {}
        prev = head
        entries: list[tuple[ChainLink, SpoolEntry]] = []
        for link in new:
            if link.prev_hash != prev:
                raise ChainConflict(chain, link.seq, "previous-hash does not continue the chain")
            if link.seq in moved:
                # A purged entry of a moved archive: its hash covered a payload that is gone.
                # As a stand-in entry it is entombed (and not indexed) like a late arrival.
                entries.append((link, SpoolEntry(EntryOp.RECORD, moved[link.seq].record_id)))
                prev = link.hash
                continue
            if link_hash(link.prev_hash, link.seq, link.payload) != link.hash:
                raise ChainConflict(chain, link.seq, "content does not match its hash")
            try:
                entry, _ = _parse_entry(link.payload)
            except ValueError as exc:
                raise InvalidEntry(chain, link.seq, f"not a spool entry ({exc})") from None
            entries.append((link, entry))
            prev = link.hash
        if not entries:
            return
        ledger_entries, live = await self._entomb_arrivals(entries)
        await self._write_ledger(chain, ledger_entries)
        await self._write_records(chain, live)
        await self._refresh("ledger", "records", "chains")
        await self._advance_chain(chain, state, entries[-1][0])

    async def _moved_tombstones(
        self, chain: str, links: Sequence[ChainLink]
    ) -> dict[int, Tombstone]:
        """The links that are tombstones of purges recorded here (`import_purges`), by seq;
        a tombstone naming no such purge, or another one, is refused."""
        named = tombstones_in(links, chain)
        if not named:
            return named
        ids = sorted({t.record_id for t in named.values()})
        traces = await self._mget("retention", [_retention_id(rid) for rid in ids])
        for seq, tombstone in named.items():
            src = traces.get(_retention_id(tombstone.record_id))
            recorded = (
                None
                if src is None or src.get("purged_us") is None
                else Tombstone(
                    tombstone.record_id,
                    _from_us(int(src["purged_us"])),
                    src["retention_class"],
                    _from_us(int(src["expires_us"])),
                )
            )
            if recorded != tombstone:
                raise InvalidEntry(
                    chain, seq, "a tombstone that names no purge recorded here (import_purges)"
                )
        return named

    async def _entomb_arrivals(
        self, entries: list[tuple[ChainLink, SpoolEntry]]
    ) -> tuple[list[tuple[ChainLink, SpoolEntry]], list[tuple[ChainLink, SpoolEntry]]]:
        """Entries of records purged earlier (a replay from another chain, a late observation)
        are stored as tombstones straight away, so a purge is never undone. Returns the
        entries for the ledger and those still to be indexed."""
        ids = sorted({entry.record_id for _, entry in entries})
        traces = await self._mget("retention", [_retention_id(rid) for rid in ids])
        purged = {
            src["record_id"]: src for src in traces.values() if src.get("purged_us") is not None
        }
        if not purged:
            return entries, entries
        ledger: list[tuple[ChainLink, SpoolEntry]] = []
        for link, entry in entries:
            src = purged.get(entry.record_id)
            if src is not None:
                tombstone = Tombstone(
                    entry.record_id,
                    _from_us(int(src["purged_us"])),
                    src["retention_class"],
                    _from_us(int(src["expires_us"])),
                )
                link = replace(link, payload=tombstone.payload())
            ledger.append((link, entry))
        return ledger, [(link, e) for link, e in entries if e.record_id not in purged]

    async def _write_ledger(self, chain: str, entries: list[tuple[ChainLink, SpoolEntry]]) -> None:
        def source(link: ChainLink, entry: SpoolEntry) -> dict[str, Any]:
            return {
                "chain": chain,
                "seq": link.seq,
                "prev_hash": link.prev_hash.hex(),
                "hash": link.hash.hex(),
                "payload": base64.b64encode(link.payload).decode("ascii"),
                "op": TOMBSTONE_OP if _is_tombstone(link.payload) else entry.op.value,
                "record_id": entry.record_id,
            }

        alias = self.index("ledger")
        ids = {link.seq: _ledger_id(chain, link.seq) for link, _ in entries}
        claimed = await self._claim("ledger", list(ids.values()))
        results = await self._bulk(
            [
                {
                    "_op_type": "create",
                    "_index": alias,
                    "_id": ids[link.seq],
                    "_source": source(link, entry),
                }
                for link, entry in entries
                if ids[link.seq] in claimed
            ]
        )
        created = {item["_id"] for ok, item in results if ok}
        again = [(link, entry) for link, entry in entries if ids[link.seq] not in created]
        if not again:
            return
        # Claimed before, so written (or half-written) by an attempt whose batch failed
        # half-way and was never committed (it is past the committed head), maybe into a
        # backing index the alias has since rolled away from: write what is missing and
        # replace what differs, where it is.
        await self._refresh("ledger")
        stored = await self._locate("ledger", [ids[link.seq] for link, _ in again])
        actions: list[dict[str, Any]] = []
        for link, entry in again:
            hit = stored.get(ids[link.seq])
            if hit is None:
                actions.append(
                    {
                        "_op_type": "create",
                        "_index": alias,
                        "_id": ids[link.seq],
                        "_source": source(link, entry),
                    }
                )
            elif _entry_from_source(hit["_source"]).link != link:
                actions.append(
                    {
                        "_op_type": "index",
                        "_index": hit["_index"],
                        "_id": ids[link.seq],
                        "_source": source(link, entry),
                    }
                )
        await self._bulk(actions)

    async def _write_records(self, chain: str, entries: list[tuple[ChainLink, SpoolEntry]]) -> None:
        docs: dict[str, dict[str, Any]] = {}
        for link, entry in entries:
            if entry.record is not None and entry.record_id not in docs:
                docs[entry.record_id] = {**_derive(entry.record), "chain": chain, "seq": link.seq}
        if not docs:
            return
        # Corrections and retractions: a record is edited (retracted) when it is one, or when
        # one from the same sender names its message or origin id.
        for flag, key in (("edited", "replaces_key"), ("retracted", "retracts_key")):
            targets = {d[key] for d in docs.values() if d[key]}
            own_keys = sorted({k for d in docs.values() for k in d["edit_keys"]})
            found: set[str] = set()
            if own_keys:
                hits = self._scan(
                    "records",
                    {"bool": {"filter": [{"terms": {key: own_keys}}]}},
                    [{"record_id": "asc"}],
                    _source=[key],
                )
                found = {hit["_source"][key] async for hit in hits}
            for d in docs.values():
                d[flag] = bool(d[key]) or any(k in targets or k in found for k in d["edit_keys"])
            if targets:
                # Originals indexed by earlier batches learn that they were corrected now.
                originals = self._scan(
                    "records",
                    {
                        "bool": {
                            "filter": [{"terms": {"edit_keys": sorted(targets)}}],
                            "must_not": [{"term": {flag: True}}],
                        }
                    },
                    [{"record_id": "asc"}],
                    _source=False,
                )
                await self._bulk(
                    [
                        {
                            "_op_type": "update",
                            "_index": hit["_index"],  # its backing index, wherever it is
                            "_id": hit["_id"],
                            "doc": {flag: True},
                        }
                        async for hit in originals
                    ]
                )
        # One records document per record, even across rollovers: the duplicate ledger says
        # which records were written before; of those only the ones whose document never
        # landed (a batch that failed half-way) are written now.
        ids = {record_id: _record_doc_id(record_id) for record_id in docs}
        claimed = await self._claim("records", list(ids.values()))
        earlier = [rid for rid in docs if ids[rid] not in claimed]
        if earlier:
            await self._refresh("records")
            landed = await self._locate("records", [ids[rid] for rid in earlier])
            claimed |= {ids[rid] for rid in earlier if ids[rid] not in landed}
        await self._bulk(
            [
                {
                    "_op_type": "create",
                    "_index": self.index("records"),
                    "_id": ids[record_id],
                    "_source": doc,
                }
                for record_id, doc in docs.items()
                if ids[record_id] in claimed
            ]
        )

    # -- the duplicate ledger and rollover (docs/elasticsearch.md) --
    #
    # Create-only `_id`s de-duplicate within one backing index only: once `ledger` or
    # `records` rolls over, a retried write would land a second copy in the new index. So
    # every `_id` written to them is first claimed, create-only, in `dedup`, an index that
    # never rolls over; a 409 there means "written before", and the writer then looks the
    # document up across every backing index (`_locate`) instead of writing blindly. Reads
    # by `_id` of those two kinds go through `_locate` too (a search on `ids`), since a get
    # through an alias reaches only its write index.

    async def _claim(self, kind: str, doc_ids: Sequence[str]) -> set[str]:
        """Claim `_id`s of `kind` in the duplicate ledger; returns those claimed just now."""
        results = await self._bulk(
            [
                {
                    "_op_type": "create",
                    "_index": self.index("dedup"),
                    "_id": f"{kind}-{doc_id}",
                    "_source": {"kind": kind},
                }
                for doc_id in doc_ids
            ]
        )
        return {item["_id"].partition("-")[2] for ok, item in results if ok}

    async def _locate(self, kind: str, doc_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The hits (with `_index` and `_source`) of documents by `_id` in every backing
        index of `kind` (what a refresh made visible); missing ones are left out."""
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(doc_ids), _PAGE):
            chunk = list(doc_ids[start : start + _PAGE])
            hits = (
                await self._search(
                    kind,
                    query={"ids": {"values": chunk}},
                    size=2 * len(chunk),  # room for a duplicate left by an older version
                    track_total_hits=False,
                )
            )["hits"]["hits"]
            for hit in hits:
                out.setdefault(hit["_id"], hit)
        return out

    async def roll_over(self, kind: str) -> str:
        """Start a new backing index behind the `ledger` or `records` alias and make it the
        write index (what ILM does by size and age); returns its name. Uses the server's
        rollover API where it has one, else creates the next index and moves the alias."""
        if kind not in _ROLLING_KINDS:
            raise InvalidRequest(f"only {', '.join(sorted(_ROLLING_KINDS))} roll over")
        self._check_open()
        alias = self.index(kind)
        try:
            if (await self.capabilities()).rollover:
                resp = await self._client.indices.rollover(alias=alias)
                return str(resp["new_index"])
            current = (await self._client.indices.get_alias(name=alias)).body
            last = max(current)
            new = f"{alias}-{int(last.rpartition('-')[2]) + 1:06d}"
            await self._client.indices.create(index=new)  # the template gives it its mappings
            await self._client.indices.update_aliases(
                actions=[
                    *(
                        {"add": {"index": name, "alias": alias, "is_write_index": False}}
                        for name in sorted(current)
                    ),
                    {"add": {"index": new, "alias": alias, "is_write_index": True}},
                ]
            )
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        return new

    async def _advance_chain(self, chain: str, state: _ChainDoc | None, last: ChainLink) -> None:
        source = {"chain": chain, "last_seq": last.seq, "head": last.hash.hex()}
        try:
            if state is None:
                await self._client.create(
                    index=self.index("chains"),
                    id=_doc_id("chain", chain),
                    document=source,
                    refresh=True,
                )
            else:
                await self._client.index(
                    index=self.index("chains"),
                    id=_doc_id("chain", chain),
                    document=source,
                    if_seq_no=state.seq_no,
                    if_primary_term=state.primary_term,
                    refresh=True,
                )
        except ConflictError:
            raise ChainConflict(
                chain, last.seq, "another writer advanced the chain meanwhile"
            ) from None
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc

    async def last_seq(self, *, chain: str = DEFAULT_CHAIN) -> int:
        _check_chain_name(chain)
        state = await self._chain_doc(chain)
        return state.last_seq if state else 0

    async def chains(self) -> tuple[str, ...]:
        hits = self._scan("chains", {"match_all": {}}, [{"chain": "asc"}], _source=["chain"])
        return tuple([hit["_source"]["chain"] async for hit in hits])

    # -- reading records --

    async def _load(self, docs: Sequence[dict[str, Any]]) -> dict[str, ArchiveRecord]:
        """Records from their records documents, with observations, fetches and status merged."""
        if not docs:
            return {}
        positions = {d["record_id"]: (d["chain"], int(d["seq"])) for d in docs}
        own = await self._mget("ledger", [_ledger_id(c, s) for c, s in positions.values()])
        others: dict[str, list[tuple[_Entry, SpoolEntry]]] = {rid: [] for rid in positions}
        hits = self._scan(
            "ledger",
            {"bool": {"filter": [{"terms": {"record_id": sorted(positions)}}]}},
            [{"chain": "asc"}, {"seq": "asc"}],
        )
        async for hit in hits:
            if hit["_source"].get("op") == TOMBSTONE_OP:
                continue  # an entry of an earlier life of this record id, purged
            stored = _entry_from_source(hit["_source"])
            entry = self._entry_of(stored)
            if (stored.chain, stored.seq) != positions[entry.record_id]:
                others[entry.record_id].append((stored, entry))
        out: dict[str, ArchiveRecord] = {}
        for rid, (chain, seq) in positions.items():
            src = own.get(_ledger_id(chain, seq))
            if src is None:
                raise StoreCorrupted(f"record {rid} has no stored payload")
            record = self._entry_of(_entry_from_source(src)).record
            if record is None or record.record_id != rid:
                raise StoreCorrupted(f"record {rid} points at an entry that is not its RECORD")
            out[rid] = _merge(record, others[rid])
        return out

    @staticmethod
    def _entry_of(stored: _Entry) -> SpoolEntry:
        try:
            return _parse_entry(stored.payload)[0]
        except ValueError as exc:
            raise StoreCorrupted(
                f"chain {stored.chain!r} seq {stored.seq}: stored payload unreadable ({exc})"
            ) from exc

    async def get(self, record_id: str) -> ArchiveRecord | None:
        found = await self._mget("records", [_record_doc_id(record_id)])
        if not found:
            return None
        return (await self._load(list(found.values())))[record_id]

    async def record_position(self, record_id: str) -> ChainPosition | None:
        found = await self._mget("records", [_record_doc_id(record_id)])
        for doc in found.values():
            return ChainPosition(doc["chain"], int(doc["seq"]))
        return None

    # -- search --

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
        compiled = _compile(parsed)
        body: dict[str, Any] = {
            "query": compiled.query,
            "sort": _sort(sort),
            "size": limit + 1,
            "track_total_hits": False,
        }
        if sort == "relevance":
            body["track_scores"] = True
        if after is not None:
            body["search_after"] = after
        # Random printable tags: some servers trim control characters at the field's edges,
        # and no message will ever contain these by chance.
        nonce = secrets.token_hex(8)
        start_tag, end_tag = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue001"
        if compiled.highlight is not None:
            body["highlight"] = {
                "fields": {
                    "body": {"number_of_fragments": 0},
                    "subject": {"number_of_fragments": 0},
                },
                "pre_tags": [start_tag],
                "post_tags": [end_tag],
                "highlight_query": compiled.highlight,
                "require_field_match": True,
            }
        hits = (await self._search("records", **body))["hits"]["hits"]
        page, more = hits[:limit], len(hits) > limit
        records = await self._load([h["_source"] for h in page])
        out = []
        for hit in page:
            record = records[hit["_source"]["record_id"]]
            snippet = _plain_snippet(record)
            for field in ("body", "subject"):
                fragments = hit.get("highlight", {}).get(field)
                if fragments and start_tag in fragments[0]:
                    text = fragments[0].replace(start_tag, HIGHLIGHT_START)
                    snippet = _snippet_from_highlight(text.replace(end_tag, HIGHLIGHT_END))
                    break
            score = float(hit["sort"][0]) if sort == "relevance" else None
            out.append(Hit(record, snippet, score))
        next_cursor = _encode_cursor(parsed, sort, page[-1]["sort"]) if more and page else None
        return SearchPage(tuple(out), next_cursor)

    async def count(self, query: Query | str) -> int:
        compiled = _compile(as_query(query))
        self._check_open()
        try:
            resp = await self._client.count(index=self.index("records"), query=compiled.query)
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        return int(resp["count"])

    async def facets(self, query: Query | str, *, top: int = 20) -> Facets:
        parsed = as_query(query)
        if not 1 <= top <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"top must be between 1 and {MAX_PAGE_SIZE}")
        aggs = {
            "by_action": {"terms": {"field": "action", "size": len(Action)}},
            "by_domain": {
                "terms": {
                    "field": "remote_domain",
                    "size": top,
                    "order": [{"_count": "desc"}, {"_key": "asc"}],
                }
            },
            "by_day": {
                "date_histogram": {
                    "field": "occurred_at",
                    "calendar_interval": "day",
                    "min_doc_count": 1,
                    "time_zone": "UTC",
                }
            },
        }
        resp = await self._search(
            "records", query=_compile(parsed).query, size=0, aggs=aggs, track_total_hits=False
        )
        result = resp["aggregations"]
        actions = {b["key"]: int(b["doc_count"]) for b in result["by_action"]["buckets"]}
        domains = [(b["key"], int(b["doc_count"])) for b in result["by_domain"]["buckets"]]
        domains.sort(key=lambda pair: (-pair[1], pair[0]))
        days = [
            ((_EPOCH + timedelta(milliseconds=b["key"])).date(), int(b["doc_count"]))
            for b in result["by_day"]["buckets"]
            if b["doc_count"]
        ]
        return Facets(
            by_action=tuple(
                (a, actions[a.value])
                for a in sorted(Action, key=lambda a: a.severity)
                if actions.get(a.value)
            ),
            by_remote_domain=tuple(domains[:top]),
            by_day=tuple(sorted(days)),
        )

    # -- the chain --

    async def chain_links(
        self, start_seq: int = 1, end_seq: int | None = None, *, chain: str = DEFAULT_CHAIN
    ) -> AsyncIterator[ChainLink]:
        _check_chain_name(chain)
        state = await self._chain_doc(chain)
        if state is None:
            return
        last = state.last_seq if end_seq is None else min(end_seq, state.last_seq)
        first = max(start_seq, 1)
        if first > last:
            return
        hits = self._scan(
            "ledger",
            {
                "bool": {
                    "filter": [
                        {"term": {"chain": chain}},
                        {"range": {"seq": {"gte": first, "lte": last}}},
                    ]
                }
            },
            [{"seq": "asc"}],
        )
        async for hit in hits:
            yield _entry_from_source(hit["_source"]).link

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        cp = checkpoint
        _check_chain_name(cp.chain_name)
        state = await self._chain_doc(cp.chain_name)
        if state is not None and 1 <= cp.seq <= state.last_seq:
            stored = await self._mget("ledger", [_ledger_id(cp.chain_name, cp.seq)])
            for src in stored.values():
                if _entry_from_source(src).hash != cp.head:
                    raise ChainConflict(
                        cp.chain_name, cp.seq, "checkpoint head differs from the stored hash"
                    )
        await self._bulk(
            [
                {
                    "_op_type": "create",
                    "_index": self.index("checkpoints"),
                    "_id": _doc_id("checkpoint", cp.chain_name, str(cp.seq), cp.signature.hex()),
                    "_source": {
                        "chain": cp.chain_name,
                        "seq": cp.seq,
                        "head": cp.head.hex(),
                        "signature": cp.signature.hex(),
                    },
                }
            ]
        )
        try:
            await self._client.indices.refresh(index=self.index("checkpoints"))
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc

    async def checkpoints(self, chain: str | None = None) -> tuple[Checkpoint, ...]:
        query: dict[str, Any] = (
            {"term": {"chain": chain}} if chain is not None else {"match_all": {}}
        )
        hits = self._scan(
            "checkpoints", query, [{"chain": "asc"}, {"seq": "asc"}, {"signature": "asc"}]
        )
        out = []
        async for hit in hits:
            src = hit["_source"]
            out.append(
                Checkpoint(
                    src["chain"],
                    int(src["seq"]),
                    bytes.fromhex(src["head"]),
                    bytes.fromhex(src["signature"]),
                )
            )
        return tuple(out)

    async def verify(self, *, public_key: Ed25519PublicKey | None = None) -> VerifyReport:
        """Check the whole store (reads everything; meant for `stanzaguard verify`).

        Per chain: seqs 1..last_seq with no gap, every link hashes and links to the one
        before, the last is the recorded head; every checkpoint matches the hash at its seq,
        lies within its chain and (with a key) carries a valid signature. Every payload is
        a readable spool entry; every RECORD entry's record has a records document, and
        every records document points at a RECORD entry of its record whose derived
        searchable fields it holds exactly.
        """
        return await _Verifier(self, public_key).run()

    # -- exports: every match from one consistent view of the index (docs/elasticsearch.md) --

    async def snapshot_mode(self) -> SnapshotMode:
        """How this server gives a consistent view, probed once: point in time (Elasticsearch
        7.10+), else a scroll (OpenSearch dialects), else plain search_after paging."""
        if self._snapshot is None:
            self._snapshot = choose_snapshot_mode(
                point_in_time=await self._probe_point_in_time(), scroll=await self._probe_scroll()
            )
        return self._snapshot

    async def _probe_point_in_time(self) -> bool:
        self._check_open()

        async def open_and_close() -> None:
            opened = await self._client.open_point_in_time(
                index=self.index("records"), keep_alive=_PROBE_KEEP_ALIVE
            )
            await self._client.close_point_in_time(id=opened["id"])

        return await self._supported(open_and_close())

    async def _probe_scroll(self) -> bool:
        self._check_open()
        scrolled = False

        async def scroll_once() -> None:
            nonlocal scrolled
            resp = await self._client.search(
                index=self.index("records"), scroll=_PROBE_KEEP_ALIVE, size=1
            )
            if resp.get("_scroll_id"):
                scrolled = True
                await self._client.options(ignore_status=404).clear_scroll(
                    scroll_id=resp["_scroll_id"]
                )

        return await self._supported(scroll_once()) and scrolled

    async def snapshot_pages(
        self, query: Query | str, *, page_size: int = 500
    ) -> AsyncIterator[list[ArchiveRecord]]:
        """Every record a query matches, oldest first, a page at a time, as the index stood
        when the first page was read (records indexed meanwhile are left out), for exports.
        Servers with neither point in time nor scroll get search_after paging (records
        indexed meanwhile may or may not appear; none is repeated or skipped)."""
        parsed = as_query(query)
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        body: dict[str, Any] = {
            "query": _compile(parsed).query,
            "sort": _sort("time_asc"),
            "size": page_size,
            "track_total_hits": False,
        }
        mode = await self.snapshot_mode()
        if mode == "point_in_time":
            pages = self._point_in_time_pages(body)
        elif mode == "scroll":
            pages = self._scroll_pages(body)
        else:
            pages = self._search_after_pages(body)
        async for hits in pages:
            records = await self._load([hit["_source"] for hit in hits])
            yield [records[hit["_source"]["record_id"]] for hit in hits]

    async def _point_in_time_pages(
        self, body: dict[str, Any]
    ) -> AsyncIterator[list[dict[str, Any]]]:
        self._check_open()
        try:
            opened = await self._client.open_point_in_time(
                index=self.index("records"), keep_alive=_SNAPSHOT_KEEP_ALIVE
            )
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        pit_id = str(opened["id"])
        try:
            after: list[Any] | None = None
            while True:
                kw = {**body, "pit": {"id": pit_id, "keep_alive": _SNAPSHOT_KEEP_ALIVE}}
                if after is not None:
                    kw["search_after"] = after
                try:
                    resp = await self._client.search(**kw)
                except (ApiError, TransportError) as exc:
                    raise _translate(exc) from exc
                pit_id = str(resp.get("pit_id", pit_id))  # the server may hand a new id
                hits: list[dict[str, Any]] = resp["hits"]["hits"]
                if hits:
                    yield hits
                if len(hits) < body["size"]:
                    return
                after = hits[-1]["sort"]
        finally:
            with contextlib.suppress(ApiError, TransportError):
                await self._client.close_point_in_time(id=pit_id)

    async def _scroll_pages(self, body: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        self._check_open()
        try:
            # A scroll must count its hits: track_total_hits=false is refused there.
            counted = {k: v for k, v in body.items() if k != "track_total_hits"}
            resp = await self._client.search(
                index=self.index("records"), scroll=_SNAPSHOT_KEEP_ALIVE, **counted
            )
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        scroll_id = resp.get("_scroll_id")
        try:
            while True:
                hits: list[dict[str, Any]] = resp["hits"]["hits"]
                if not hits:
                    return
                yield hits
                if scroll_id is None:
                    raise StoreError("the server ended a scroll without an id")
                try:
                    resp = await self._client.scroll(
                        scroll_id=scroll_id, scroll=_SNAPSHOT_KEEP_ALIVE
                    )
                except (ApiError, TransportError) as exc:
                    raise _translate(exc) from exc
                scroll_id = resp.get("_scroll_id", scroll_id)
        finally:
            if scroll_id is not None:
                with contextlib.suppress(ApiError, TransportError):
                    await self._client.options(ignore_status=404).clear_scroll(scroll_id=scroll_id)

    async def _search_after_pages(
        self, body: dict[str, Any]
    ) -> AsyncIterator[list[dict[str, Any]]]:
        after: list[Any] | None = None
        while True:
            kw = dict(body)
            if after is not None:
                kw["search_after"] = after
            hits: list[dict[str, Any]] = (await self._search("records", **kw))["hits"]["hits"]
            if hits:
                yield hits
            if len(hits) < body["size"]:
                return
            after = hits[-1]["sort"]

    # -- the audit log, API tokens, holds and retention (docs/elasticsearch.md) --
    #
    # The audit log is append-only and hash-chained without transactions: the `_id` of an
    # event is its seq, written create-only, so a seq can be taken once only. An appender
    # finds the tail (the `audit_head` document, then a realtime GET of each following seq
    # until one is missing: a writer that stopped between its events and the head leaves
    # the head behind) and creates tail+1 chained to the tail's hash; on 409 another writer
    # took that seq first, so it reads that event and continues after it. The chain never
    # forks and has no gap; concurrent batches may interleave. The head document only ever
    # moves forward (compare-and-swap on _seq_no) and is what verification compares the
    # last event with, so events removed from the end show.

    async def _get(self, kind: str, doc_id: str) -> dict[str, Any] | None:
        """One document by `_id`, realtime, with `_seq_no` and `_primary_term`; None if absent."""
        self._check_open()
        try:
            resp = await self._client.get(index=self.index(kind), id=doc_id)
        except NotFoundError:
            return None
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        found: dict[str, Any] = resp.body
        return found

    async def _create(self, kind: str, doc_id: str, source: dict[str, Any]) -> bool:
        """Create-only write; False when a document with that `_id` exists already."""
        self._check_open()
        try:
            await self._client.create(index=self.index(kind), id=doc_id, document=source)
        except ConflictError:
            return False
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        return True

    async def _replace(self, kind: str, found: dict[str, Any], source: dict[str, Any]) -> bool:
        """Overwrite a document read by `_get` unless it changed since; False if it did."""
        self._check_open()
        try:
            await self._client.index(
                index=found["_index"],
                id=found["_id"],
                document=source,
                if_seq_no=found["_seq_no"],
                if_primary_term=found["_primary_term"],
            )
        except ConflictError:
            return False
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        return True

    async def _refresh(self, *kinds: str) -> None:
        self._check_open()
        try:
            await self._client.indices.refresh(index=",".join(self.index(k) for k in kinds))
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc

    async def _ensure_audit_head(self) -> None:
        """Create the audit head for an empty log. A head missing beside stored events is
        tampering: it is not recreated (audit_head raises, verify reports it)."""
        if await self._get("audit_head", _AUDIT_HEAD_ID) is not None:
            return
        await self._refresh("audit")
        try:
            events = (await self._client.count(index=self.index("audit")))["count"]
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        if not events:
            await self._create("audit_head", _AUDIT_HEAD_ID, {"seq": 0, "hash": GENESIS.hex()})

    async def _audit_row(self, seq: int) -> AuditRow | None:
        found = await self._get("audit", _audit_doc_id(seq))
        return _audit_row_from(found["_source"]) if found is not None else None

    async def _audit_recorded_head(self) -> tuple[AuditHead, dict[str, Any]] | None:
        found = await self._get("audit_head", _AUDIT_HEAD_ID)
        if found is None:
            return None
        try:
            src = found["_source"]
            return AuditHead(int(src["seq"]), bytes.fromhex(src["hash"])), found
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorrupted(f"the audit log's head is unreadable ({exc})") from None

    async def _audit_tail(self) -> AuditHead:
        recorded = await self._audit_recorded_head()
        if recorded is None:
            raise StoreCorrupted("the audit log's head record is missing (tampered?)")
        seq, prev = recorded[0].seq, recorded[0].hash
        while (row := await self._audit_row(seq + 1)) is not None:
            seq, prev = row.seq, row.hash
        return AuditHead(seq, prev)

    async def _advance_audit_head(self, head: AuditHead) -> None:
        while True:
            recorded = await self._audit_recorded_head()
            if recorded is None:
                raise StoreCorrupted("the audit log's head record is missing (tampered?)")
            if recorded[0].seq >= head.seq:
                return
            if await self._replace(
                "audit_head", recorded[1], {"seq": head.seq, "hash": head.hash.hex()}
            ):
                return

    async def append_audit(self, entries: Sequence[AuditEntry]) -> tuple[AuditEvent, ...]:
        if len(entries) > MAX_APPEND_BATCH:
            raise InvalidRequest(f"at most {MAX_APPEND_BATCH} audit events per append")
        checked = tuple(check_entry(entry) for entry in entries)
        if not checked:
            return ()
        tail = await self._audit_tail()
        seq, prev = tail.seq, tail.hash
        rows: list[AuditRow] = []
        for entry in checked:
            while True:
                row = chain_entry(entry, seq + 1, prev)
                if await self._create("audit", _audit_doc_id(row.seq), _audit_source(row)):
                    break
                taken = await self._audit_row(row.seq)  # another writer's: continue after it
                if taken is None:
                    raise StoreUnavailable("an audit event vanished while appending; retry")
                seq, prev = taken.seq, taken.hash
            rows.append(row)
            seq, prev = row.seq, row.hash
        await self._advance_audit_head(AuditHead(seq, prev))
        await self._refresh("audit")
        return tuple(AuditEvent.from_row(row) for row in rows)

    async def import_audit(self, events: Sequence[AuditEvent]) -> int:
        if len(events) > MAX_APPEND_BATCH:
            raise InvalidRequest(f"at most {MAX_APPEND_BATCH} audit events per import")
        if not events:
            return 0
        rows = imported_rows(events, await self._audit_tail())
        results = await self._bulk(
            [
                {
                    "_op_type": "create",
                    "_index": self.index("audit"),
                    "_id": _audit_doc_id(row.seq),
                    "_source": _audit_source(row),
                }
                for row in rows
            ]
        )
        if not all(ok for ok, _ in results):
            raise InvalidRequest(
                "audit events were appended here meanwhile: stop the service writing to this "
                "store while an archive moves in"
            )
        await self._advance_audit_head(AuditHead(rows[-1].seq, rows[-1].hash))
        await self._refresh("audit")
        return len(rows)

    async def audit_events(
        self,
        where: AuditFilter = AuditFilter(),  # noqa: B008 (frozen, so a shared default is safe)
        *,
        limit: int = 50,
        cursor: str | None = None,
        newest_first: bool = True,
    ) -> AuditPage:
        check_page_args(limit)
        actor, action, since, until = where.checked()
        after = decode_cursor(cursor, where, newest_first) if cursor is not None else None
        filters: list[dict[str, Any]] = []
        if actor is not None:
            filters.append({"term": {"actor": actor}})
        if action is not None:
            filters.append({"term": {"action": action}})
        if since is not None:
            filters.append({"range": {"at_us": {"gte": since}}})
        if until is not None:
            filters.append({"range": {"at_us": {"lt": until}}})
        if after is not None:
            filters.append({"range": {"seq": {"lt" if newest_first else "gt": after}}})
        hits = (
            await self._search(
                "audit",
                query={"bool": {"filter": filters}},
                sort=[{"seq": "desc" if newest_first else "asc"}],
                size=limit + 1,
                track_total_hits=False,
            )
        )["hits"]["hits"]
        rows = [_audit_row_from(hit["_source"]) for hit in hits]
        page, more = rows[:limit], len(rows) > limit
        try:
            events = tuple(AuditEvent.from_row(row) for row in page)
        except ValueError as exc:
            raise StoreCorrupted(f"stored audit event unreadable ({exc})") from None
        next_cursor = encode_cursor(where, newest_first, page[-1].seq) if more and page else None
        return AuditPage(events, next_cursor)

    async def audit_head(self) -> AuditHead:
        return await self._audit_tail()

    async def add_audit_checkpoint(self, checkpoint: Checkpoint) -> None:
        cp = checkpoint
        if cp.chain_name != AUDIT_CHAIN:
            raise InvalidRequest(f"not an audit checkpoint (chain {cp.chain_name[:40]!r})")
        last = (await self._audit_tail()).seq
        if not 1 <= cp.seq <= last:
            raise InvalidRequest(
                f"audit checkpoint at seq {cp.seq} lies outside the log (1..{last})"
            )
        row = await self._audit_row(cp.seq)
        if row is None or row.hash != cp.head:
            raise ChainConflict(AUDIT_CHAIN, cp.seq, "checkpoint head differs from the stored hash")
        await self._create(
            "audit_checkpoints",
            _doc_id("audit-checkpoint", str(cp.seq), cp.signature.hex()),
            {"seq": cp.seq, "head": cp.head.hex(), "signature": cp.signature.hex()},
        )
        await self._refresh("audit_checkpoints")

    async def audit_checkpoints(self) -> tuple[Checkpoint, ...]:
        hits = self._scan(
            "audit_checkpoints", {"match_all": {}}, [{"seq": "asc"}, {"signature": "asc"}]
        )
        out = []
        async for hit in hits:
            src = hit["_source"]
            try:
                out.append(
                    Checkpoint(
                        AUDIT_CHAIN,
                        int(src["seq"]),
                        bytes.fromhex(src["head"]),
                        bytes.fromhex(src["signature"]),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise StoreCorrupted(f"unreadable audit checkpoint ({exc})") from None
        return tuple(out)

    async def verify_audit(
        self, *, public_key: Ed25519PublicKey | None = None
    ) -> AuditVerifyReport:
        recorded = await self._audit_recorded_head()
        if recorded is not None:
            # A head left behind by an appender that stopped early is brought forward first,
            # so only a head *past* the last event (a removed tail) is reported.
            with contextlib.suppress(StoreCorrupted):
                await self._advance_audit_head(await self._audit_tail())
            recorded = await self._audit_recorded_head()
        await self._refresh("audit", "audit_checkpoints")
        verifier = AuditVerifier(await self.audit_checkpoints(), public_key)
        async for hit in self._scan("audit", {"match_all": {}}, [{"seq": "asc"}]):
            verifier.feed(_audit_row_from(hit["_source"]))
        return verifier.finish(recorded[0] if recorded is not None else None)

    # -- API tokens: the name is the `_id` of the token (create-only, so never reused), and
    # a create-only claim document keyed by the secret's hash keeps secrets unique.

    async def add_token(self, token: StoredToken) -> None:
        token.check()
        taken = f"a token named {token.name!r} exists (names are never reused)"
        if await self._get("tokens", _token_doc_id(token.name)) is not None:
            raise AlreadyExists(taken)
        secret_id = token.secret_hash.hex()
        if not await self._create("token_secrets", secret_id, {"name": token.name}):
            raise AlreadyExists("a token with this secret exists")
        if not await self._create("tokens", _token_doc_id(token.name), _token_source(token)):
            try:  # lost a race for the name: give the secret back
                await self._client.delete(index=self.index("token_secrets"), id=secret_id)
            except (ApiError, TransportError) as exc:
                raise _translate(exc) from exc
            raise AlreadyExists(taken)
        await self._refresh("tokens", "token_secrets")

    async def token_by_hash(self, secret_hash: bytes) -> StoredToken | None:
        if not isinstance(secret_hash, bytes) or len(secret_hash) != 32:
            raise InvalidRequest("a token secret hash is 32 bytes (SHA-256)")
        claim = await self._get("token_secrets", secret_hash.hex())
        if claim is None:
            return None
        found = await self._get("tokens", _token_doc_id(str(claim["_source"]["name"])))
        if found is None:
            return None  # a claim whose token was never written (a writer stopped between)
        token = _token_from_source(found["_source"])
        return token if token.secret_hash == secret_hash else None

    async def token_by_name(self, name: str) -> StoredToken | None:
        check_token_name(name)
        found = await self._get("tokens", _token_doc_id(name))
        return _token_from_source(found["_source"]) if found is not None else None

    async def tokens(self) -> tuple[StoredToken, ...]:
        hits = self._scan("tokens", {"match_all": {}}, [{"created_us": "asc"}, {"name": "asc"}])
        return tuple([_token_from_source(hit["_source"]) async for hit in hits])

    async def revoke_token(self, name: str, *, at: datetime) -> StoredToken:
        check_token_name(name)
        at_us = audit_us(at)
        while True:
            found = await self._get("tokens", _token_doc_id(name))
            if found is None:
                raise NotFound(f"no token named {name!r}")
            token = _token_from_source(found["_source"])
            if token.revoked_at is not None:
                return token
            source = {**found["_source"], "revoked_us": at_us}
            if await self._replace("tokens", found, source):
                await self._refresh("tokens")
                return _token_from_source(source)

    # -- message view and dashboard --

    async def linked_records(
        self, record_ids: Sequence[str]
    ) -> dict[str, tuple[ArchiveRecord, ...]]:
        ids = list(dict.fromkeys(record_ids))
        if len(ids) > MAX_PAGE_SIZE:
            raise InvalidRequest(f"at most {MAX_PAGE_SIZE} record ids at once")
        if not ids:
            return {}
        docs = await self._mget("records", [_record_doc_id(rid) for rid in ids])
        found: dict[str, list[dict[str, Any]]] = {}
        for doc in docs.values():
            rid = doc["record_id"]
            root = doc
            ref = doc.get("replaces_key") or doc.get("retracts_key")
            if ref:
                originals = (
                    await self._search(
                        "records",
                        query={
                            "bool": {
                                "filter": [{"term": {"edit_keys": ref}}],
                                "must_not": [{"term": {"record_id": rid}}],
                            }
                        },
                        sort=[{"occurred_us": "desc"}, {"record_id": "desc"}],
                        size=1,
                    )
                )["hits"]["hits"]
                if originals:
                    root = originals[0]["_source"]
            members = {root["record_id"]: root}
            keys = root.get("edit_keys") or []
            if keys:
                children = (
                    await self._search(
                        "records",
                        query={
                            "bool": {
                                "should": [
                                    {"terms": {"replaces_key": keys}},
                                    {"terms": {"retracts_key": keys}},
                                ],
                                "minimum_should_match": 1,
                            }
                        },
                        sort=[{"occurred_us": "asc"}, {"record_id": "asc"}],
                        size=2 * MAX_LINKED_RECORDS,
                    )
                )["hits"]["hits"]
                for hit in children:
                    members.setdefault(hit["_source"]["record_id"], hit["_source"])
            ordered = sorted(
                members.values(), key=lambda d: (d is not root, d["occurred_us"], d["record_id"])
            )
            others = [d for d in ordered if d["record_id"] != rid][:MAX_LINKED_RECORDS]
            if others:
                found[rid] = others
        wanted = {d["record_id"]: d for docs_ in found.values() for d in docs_}
        records = await self._load(list(wanted.values()))
        return {
            rid: tuple(records[d["record_id"]] for d in docs_ if d["record_id"] in records)
            for rid, docs_ in found.items()
        }

    async def activity(self, since: datetime, until: datetime, *, top: int = 10) -> Activity:
        if not 1 <= top <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"top must be between 1 and {MAX_PAGE_SIZE}")
        since_us, until_us = _to_us(since), _to_us(until)
        if until_us <= since_us:
            raise InvalidRequest("the window must end after it starts")
        not_allowed = {"bool": {"must_not": [{"term": {"action": Action.ALLOW.value}}]}}
        blocked = {"terms": {"action": [Action.REJECT.value, Action.DROP.value]}}
        by_count = [{"_count": "desc"}, {"_key": "asc"}]
        aggs = {
            "days": {
                "date_histogram": {
                    "field": "occurred_at",
                    "calendar_interval": "day",
                    "min_doc_count": 1,
                    "time_zone": "UTC",
                },
                "aggs": {"actions": {"terms": {"field": "action", "size": len(Action)}}},
            },
            "blocked": {
                "filter": blocked,
                "aggs": {
                    "domains": {"terms": {"field": "remote_domain", "size": top, "order": by_count}}
                },
            },
            "not_allowed": {
                "filter": not_allowed,
                "aggs": {"rules": {"terms": {"field": "reasons", "size": top, "order": by_count}}},
            },
        }
        window = {"range": {"occurred_us": {"gte": since_us, "lt": until_us}}}
        resp = await self._search(
            "records",
            query={"bool": {"filter": [window]}},
            size=0,
            aggs=aggs,
            track_total_hits=False,
        )
        result = resp["aggregations"]
        days = []
        for bucket in result["days"]["buckets"]:
            if not bucket["doc_count"]:
                continue
            counts = {b["key"]: int(b["doc_count"]) for b in bucket["actions"]["buckets"]}
            days.append(
                DayActivity(
                    (_EPOCH + timedelta(milliseconds=bucket["key"])).date(),
                    sum(counts.values()),
                    tuple(
                        (a, counts[a.value])
                        for a in sorted(Action, key=lambda a: a.severity)
                        if counts.get(a.value)
                    ),
                )
            )

        def ranked(buckets: list[dict[str, Any]]) -> tuple[tuple[str, int], ...]:
            pairs = sorted(
                ((str(b["key"]), int(b["doc_count"])) for b in buckets), key=lambda p: (-p[1], p[0])
            )
            return tuple(pairs[:top])

        return Activity(
            tuple(sorted(days, key=lambda d: d.day)),
            ranked(result["blocked"]["domains"]["buckets"]),
            ranked(result["not_allowed"]["rules"]["buckets"]),
        )

    # -- holds --

    async def add_hold(self, hold: HoldRecord) -> None:
        check_new_hold(hold)
        if not await self._create("holds", _hold_doc_id(hold.hold_id), _hold_source(hold)):
            raise InvalidRequest(f"a hold with id {hold.hold_id[:80]!r} exists already")
        await self._refresh("holds")

    async def release_hold(
        self, hold_id: str, *, released_by: str, released_at: datetime, reason: str | None = None
    ) -> HoldRecord:
        check_release(released_by, reason)
        while True:
            found = await self._get("holds", _hold_doc_id(hold_id))
            if found is None:
                raise NotFound(f"no legal hold with id {hold_id[:80]!r}")
            if not _hold_from_source(found["_source"]).active:
                raise InvalidRequest(f"legal hold {hold_id[:80]!r} was released already")
            source = {
                **found["_source"],
                "released_us": _to_us(released_at),
                "released_by": released_by,
                "release_reason": reason,
            }
            if await self._replace("holds", found, source):
                await self._refresh("holds")
                return _hold_from_source(source)

    async def get_hold(self, hold_id: str) -> HoldRecord | None:
        found = await self._get("holds", _hold_doc_id(hold_id))
        return _hold_from_source(found["_source"]) if found is not None else None

    async def list_holds(self, *, include_released: bool = True) -> tuple[HoldRecord, ...]:
        query: dict[str, Any] = (
            {"match_all": {}}
            if include_released
            else {"bool": {"must_not": [{"exists": {"field": "released_us"}}]}}
        )
        hits = self._scan("holds", query, [{"created_us": "asc"}, {"hold_id": "asc"}])
        return tuple([_hold_from_source(hit["_source"]) async for hit in hits])

    async def _held_queries(self) -> list[tuple[str, dict[str, Any]]]:
        """Every active hold's query, compiled. A hold whose stored query no longer parses
        stops the caller: what it holds cannot be known, so nothing may be purged around it."""
        await self._refresh("holds")
        out = []
        for hold in await self.list_holds(include_released=False):
            try:
                query = as_query(hold.query)
            except InvalidRequest as exc:
                raise StoreCorrupted(
                    f"legal hold {hold.hold_id} has an unreadable query ({exc})"
                ) from None
            out.append((hold.hold_id, _compile(query).query))
        return out

    async def _covering(
        self, held: Sequence[tuple[str, dict[str, Any]]], ids: Sequence[str]
    ) -> dict[str, tuple[str, ...]]:
        covering: dict[str, list[str]] = {}
        for hold_id, query in held:
            for start in range(0, len(ids), _PAGE):
                chunk = list(ids[start : start + _PAGE])
                hits = self._scan(
                    "records",
                    {"bool": {"filter": [query, {"terms": {"record_id": chunk}}]}},
                    [{"record_id": "asc"}],
                    _source=["record_id"],
                )
                async for hit in hits:
                    covering.setdefault(hit["_source"]["record_id"], []).append(hold_id)
        return {rid: tuple(holds) for rid, holds in covering.items()}

    async def holds_covering(self, record_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        ids = sorted(set(record_ids))
        if not ids:
            return {}
        return await self._covering(await self._held_queries(), ids)

    # -- retention: the `retention` index (one document per record, `_id` from the record id)
    # is the authority; each records document carries a copy of class and expiry, written
    # *before* the authority, so the copy is never earlier than the truth for long and
    # purge, which selects on the copy, re-checks every candidate against the authority.

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
        assigned_us = _to_us(assigned_at)
        assigned = extended = kept = unknown = 0
        ids = sorted(latest)
        for start in range(0, len(ids), _PAGE):
            pending = ids[start : start + _PAGE]
            while pending:  # again for the few another writer changed meanwhile
                current = await self._mget_docs("retention", [_retention_id(r) for r in pending])
                present = await self._locate("records", [_record_doc_id(r) for r in pending])
                raced: list[str] = []
                copies: list[dict[str, Any]] = []
                writes: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = []
                for rid in pending:
                    cls, expires_us = latest[rid]
                    found = current.get(_retention_id(rid))
                    if found is not None:
                        src = found["_source"]
                        if src.get("purged_us") is not None or expires_us <= int(src["expires_us"]):
                            kept += 1  # extend-only
                            continue
                    elif _record_doc_id(rid) not in present:
                        unknown += 1
                        continue
                    source = {
                        "record_id": rid,
                        "retention_class": cls,
                        "expires_us": expires_us,
                        "assigned_us": assigned_us,
                        "purged_us": None,
                    }
                    writes.append((rid, found, source))
                    where = present.get(_record_doc_id(rid))
                    if where is not None:
                        copies.append(
                            {
                                "_op_type": "update",
                                "_index": where["_index"],  # its backing index
                                "_id": _record_doc_id(rid),
                                "doc": {"retention_class": cls, "expires_us": expires_us},
                            }
                        )
                await self._bulk(copies)
                for rid, found, source in writes:
                    if found is None:
                        done = await self._create("retention", _retention_id(rid), source)
                    else:
                        done = await self._replace("retention", found, source)
                    if not done:
                        raced.append(rid)
                    elif found is None:
                        assigned += 1
                    else:
                        extended += 1
                pending = raced
        await self._refresh("records", "retention")
        return RetentionUpdate(assigned, extended, kept, unknown)

    async def _mget_docs(self, kind: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Like `_mget`, but whole documents (with `_seq_no` and `_primary_term`)."""
        out: dict[str, dict[str, Any]] = {}
        if not ids:
            return out
        self._check_open()
        try:
            for start in range(0, len(ids), _PAGE):
                resp = await self._client.mget(
                    index=self.index(kind), ids=list(ids[start : start + _PAGE])
                )
                for doc in resp["docs"]:
                    if doc.get("found"):
                        if "_seq_no" not in doc:  # some servers leave it out of mget
                            full = await self._get(kind, doc["_id"])
                            if full is None:
                                continue
                            doc = full
                        out[doc["_id"]] = doc
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        return out

    async def import_purges(self, purges: Sequence[RetentionState]) -> int:
        sources: dict[str, dict[str, Any]] = {}
        for state in purges:
            if state.purged_at is None or not state.record_id or not state.retention_class:
                raise InvalidRequest("an imported purge needs a record id, a class and a time")
            sources[state.record_id] = {
                "record_id": state.record_id,
                "retention_class": state.retention_class,
                "expires_us": _to_us(state.expires_at),
                "assigned_us": _to_us(state.assigned_at),
                "purged_us": _to_us(state.purged_at),
            }
        ids = sorted(sources)
        new = 0
        for start in range(0, len(ids), _PAGE):
            chunk = ids[start : start + _PAGE]
            held_here = await self._locate("records", [_record_doc_id(r) for r in chunk])
            if held_here:
                rid = min(hit["_source"]["record_id"] for hit in held_here.values())
                raise InvalidRequest(f"record {rid!r} is in this store: it cannot be marked purged")
            current = await self._mget("retention", [_retention_id(r) for r in chunk])
            for rid in chunk:
                wanted = sources[rid]
                found = current.get(_retention_id(rid))
                if found is not None:
                    keys = ("retention_class", "expires_us", "purged_us")
                    if any(found.get(k) != wanted[k] for k in keys):
                        raise InvalidRequest(
                            f"record {rid!r}: this store recorded another retention or purge"
                        )
                    continue
                if not await self._create("retention", _retention_id(rid), wanted):
                    raise InvalidRequest(f"record {rid!r}: its retention changed meanwhile")
                new += 1
        await self._refresh("retention")
        return new

    async def retention_of(self, record_id: str) -> RetentionState | None:
        found = await self._get("retention", _retention_id(record_id))
        if found is None:
            return None
        src = found["_source"]
        purged = src.get("purged_us")
        return RetentionState(
            record_id,
            src["retention_class"],
            _from_us(int(src["expires_us"])),
            _from_us(int(src["assigned_us"])),
            _from_us(int(purged)) if purged is not None else None,
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
        after = _decode_retention_cursor(cursor) if cursor is not None else None
        filters: list[dict[str, Any]] = []
        must_not: list[dict[str, Any]] = []
        if unassigned_only:
            must_not.append({"exists": {"field": "expires_us"}})
        elif expiring_by is not None:
            filters.append({"range": {"expires_us": {"lte": _to_us(expiring_by)}}})
        body: dict[str, Any] = {
            "query": {"bool": {"filter": filters, "must_not": must_not}},
            "sort": [{"occurred_us": "asc"}, {"record_id": "asc"}],
            "size": limit + 1,
            "track_total_hits": False,
        }
        if after is not None:
            body["search_after"] = after
        hits = (await self._search("records", **body))["hits"]["hits"]
        page = hits[:limit]
        subjects = tuple(_subject_from_source(hit["_source"]) for hit in page)
        more = len(hits) > limit
        next_cursor = _encode_retention_cursor(page[-1]["sort"]) if more and page else None
        return RetentionSubjectPage(subjects, next_cursor)

    # -- purge: holds win. Candidates are selected by one query that excludes every active
    # hold's query (must_not), re-checked against the retention authority, and right before
    # anything is deleted the active holds are read again (refreshed) and any record one
    # covers now is left alone. Per record: the retention document is marked purged first
    # (so the tombstones name a recorded purge and a purge that stopped half-way is resumed,
    # never undone), then its ledger payloads become tombstones, then its records document
    # goes. Nothing is ever deleted by lifecycle management (docs/elasticsearch.md).

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
        only = sorted(set(record_ids)) if record_ids is not None else None
        if only is not None and len(only) > limit:
            raise InvalidRequest("more record ids than the batch limit")
        now_us = _to_us(now)
        await self._refresh("ledger", "records", "retention", "holds")
        held = await self._held_queries()
        expired: list[dict[str, Any]] = [{"range": {"expires_us": {"lte": now_us}}}]
        if only is not None:
            expired.append({"terms": {"record_id": only}})
        not_held = [query for _, query in held]
        due = held_back = None
        if counts:
            total = await self._count({"bool": {"filter": expired}})
            due = await self._count({"bool": {"filter": expired, "must_not": not_held}})
            held_back = total - due
        candidates: list[dict[str, Any]] = []
        hits = self._scan(
            "records",
            {"bool": {"filter": expired, "must_not": not_held}},
            [{"expires_us": "asc"}, {"record_id": "asc"}],
            _source=["record_id"],
        )
        async for hit in hits:
            candidates.append(hit)
            if len(candidates) > limit:
                break
        more = len(candidates) > limit
        chosen = [hit["_source"]["record_id"] for hit in candidates[:limit]]
        backing = {hit["_source"]["record_id"]: str(hit["_index"]) for hit in candidates}
        authority = await self._mget_docs("retention", [_retention_id(r) for r in chosen])
        stale: list[tuple[str, dict[str, Any]]] = []
        batch: list[tuple[str, dict[str, Any]]] = []
        for rid in chosen:
            found = authority.get(_retention_id(rid))
            if found is None or int(found["_source"]["expires_us"]) > now_us:
                stale.append((backing[rid], found or {"_source": {"record_id": rid}}))
                continue
            batch.append((rid, found))
        if not dry_run:
            await self._resync_retention_copies(stale)
            if batch:  # holds again, as late as possible: one added meanwhile wins
                covered = await self._covering(await self._held_queries(), [r for r, _ in batch])
                batch = [(rid, found) for rid, found in batch if rid not in covered]
        purged = []
        for rid, found in batch:
            src = found["_source"]
            entries = 0 if dry_run else await self._purge_one(rid, found, now_us, backing[rid])
            purged.append(
                PurgedRecord(rid, src["retention_class"], _from_us(int(src["expires_us"])), entries)
            )
        if purged and not dry_run:
            await self.refresh()
        return PurgeBatch(tuple(purged), more, dry_run, due, held_back)

    async def _count(self, query: dict[str, Any]) -> int:
        self._check_open()
        try:
            resp = await self._client.count(index=self.index("records"), query=query)
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        return int(resp["count"])

    async def _resync_retention_copies(self, stale: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Records documents whose retention copy is earlier than the authority (a writer
        stopped between the two writes): copy the authority again."""
        await self._bulk(
            [
                {
                    "_op_type": "update",
                    "_index": index,
                    "_id": _record_doc_id(src["record_id"]),
                    "doc": {
                        "retention_class": src.get("retention_class"),
                        "expires_us": src.get("expires_us"),
                    },
                }
                for index, found in stale
                if (src := found["_source"])
            ]
        )

    async def _purge_one(self, rid: str, found: dict[str, Any], now_us: int, index: str) -> int:
        src = found["_source"]
        purged_us = src.get("purged_us")
        if purged_us is None:  # mark the purge first; a half-done one is resumed as it was
            purged_us = now_us
            if not await self._replace("retention", found, {**src, "purged_us": purged_us}):
                return 0  # changed meanwhile (extended?): leave it to the next batch
        tombstone = Tombstone(
            rid,
            _from_us(int(purged_us)),
            src["retention_class"],
            _from_us(int(src["expires_us"])),
        )
        payload = base64.b64encode(tombstone.payload()).decode("ascii")
        hits = self._scan(
            "ledger",
            {"bool": {"filter": [{"term": {"record_id": rid}}]}},
            [{"chain": "asc"}, {"seq": "asc"}],
            _source=False,
        )
        updates = [
            {
                "_op_type": "update",
                "_index": hit["_index"],
                "_id": hit["_id"],
                "doc": {"payload": payload, "op": TOMBSTONE_OP},
            }
            async for hit in hits
        ]
        await self._bulk(updates)
        self._check_open()
        try:
            await self._client.options(ignore_status=404).delete(
                index=index, id=_record_doc_id(rid)
            )
        except (ApiError, TransportError) as exc:
            raise _translate(exc) from exc
        return len(updates)


def _as_archive_store(store: ElasticsearchStore) -> ArchiveStore:
    """Never called: makes mypy prove the class implements the whole protocol."""
    return store


# --- merging entries into a record --------------------------------------------------------------


def _order_key(entry: SpoolEntry, stored: _Entry) -> tuple[bool, int, str, int]:
    # (at, chain, seq), entries without `at` first: the order every backend agrees on.
    at = entry.at
    return (at is not None, _to_us(at) if at is not None else 0, stored.chain, stored.seq)


def _merge(record: ArchiveRecord, others: Iterable[tuple[_Entry, SpoolEntry]]) -> ArchiveRecord:
    observations: list[Observation] = list(dict.fromkeys(record.observations))
    status: tuple[tuple[bool, int, str, int], RecordStatus] | None = None
    fetched: dict[str, tuple[tuple[bool, int, str, int], str | None, int | None, str | None]] = {}
    for stored, entry in others:
        found: Iterable[Observation] = ()
        if entry.op is EntryOp.RECORD and entry.record is not None:
            found = entry.record.observations
        elif entry.op is EntryOp.OBSERVE and entry.observation is not None:
            found = (entry.observation,)
        elif entry.op is EntryOp.STATUS and entry.status is not None:
            key = _order_key(entry, stored)
            if status is None or key > status[0]:
                status = (key, entry.status)
        elif entry.op is EntryOp.ATTACHMENT and entry.fetch is not None:
            fetch = entry.fetch
            if fetch.status is FetchStatus.OK:
                key = _order_key(entry, stored)
                current = fetched.get(fetch.url)
                if current is None or key > current[0]:
                    fetched[fetch.url] = (key, fetch.sha256, fetch.size, fetch.media_type)
        for obs in found:
            if obs not in observations:
                observations.append(obs)
    attachments = tuple(
        replace(
            a,
            sha256=got[1],
            size=got[2],
            media_type=a.media_type or got[3],
        )
        if (got := fetched.get(a.url)) is not None
        else a
        for a in record.attachments
    )
    return replace(
        record,
        observations=tuple(observations),
        status=status[1] if status is not None else record.status,
        attachments=attachments,
    )


# --- verify --------------------------------------------------------------------------------------


class _Verifier:
    def __init__(self, store: ElasticsearchStore, public_key: Ed25519PublicKey | None) -> None:
        self._store = store
        self._key = public_key
        self._problems: list[VerifyProblem] = []
        self._truncated = False
        self._entries = 0
        # (chain, seq) of every RECORD entry -> (record_id, derived fields)
        self._record_entries: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {}
        self._tombstones: list[tuple[str, int, Tombstone]] = []
        self._indexed: set[str] = set()

    def _problem(
        self, problem: str, chain: str | None = None, seq: int | None = None, rid: str | None = None
    ) -> None:
        if len(self._problems) >= _MAX_PROBLEMS:
            self._truncated = True
            return
        self._problems.append(VerifyProblem(problem, chain, seq, rid))

    async def run(self) -> VerifyReport:
        store = self._store
        checkpoints: dict[str, list[Checkpoint]] = {}
        for cp in await store.checkpoints():
            checkpoints.setdefault(cp.chain_name, []).append(cp)
        states = []
        names = await store.chains()
        for chain in names:
            states.append(await self._chain(chain, checkpoints.get(chain, [])))
        for chain, cps in checkpoints.items():
            if chain not in names:
                for cp in cps:
                    self._problem("checkpoint for a chain the store does not hold", chain, cp.seq)
        records = await self._records()
        await self._check_tombstones()
        problems = sorted(
            self._problems,
            key=lambda p: (p.chain is None, p.chain or "", p.seq or 0, p.record_id or ""),
        )
        return VerifyReport(tuple(states), self._entries, records, tuple(problems), self._truncated)

    async def _chain(self, chain: str, checkpoints: list[Checkpoint]) -> ChainState:
        store = self._store
        state = await store._chain_doc(chain)
        last_seq, head = (state.last_seq, state.head) if state else (0, GENESIS)
        wanted = {cp.seq for cp in checkpoints}
        hashes: dict[int, bytes] = {}
        expected, prev = 1, GENESIS
        async for link in store.chain_links(chain=chain):
            self._entries += 1
            if link.seq != expected:
                self._problem(f"missing entries (next stored is seq {link.seq})", chain, expected)
            elif link.prev_hash != prev:
                self._problem("previous-hash does not match the entry before it", chain, link.seq)
            if link.seq in wanted:
                hashes[link.seq] = link.hash
            try:
                tombstone = Tombstone.from_payload(link.payload)
            except ValueError as exc:
                self._problem(f"payload is a malformed tombstone ({exc})", chain, link.seq)
                expected, prev = link.seq + 1, link.hash
                continue
            if tombstone is not None:
                # Its hash covered the purged payload: checked are the links around it and
                # that it names a recorded purge (in _tombstones).
                self._tombstones.append((chain, link.seq, tombstone))
                expected, prev = link.seq + 1, link.hash
                continue
            if link_hash(link.prev_hash, link.seq, link.payload) != link.hash:
                self._problem("content does not match its hash (edited)", chain, link.seq)
            try:
                entry, _ = _parse_entry(link.payload)
            except ValueError as exc:
                self._problem(f"payload is not a spool entry ({exc})", chain, link.seq)
            else:
                if entry.record is not None:
                    self._record_entries[(chain, link.seq)] = (
                        entry.record_id,
                        _derive(entry.record),
                    )
            expected, prev = link.seq + 1, link.hash
        if expected <= last_seq:
            self._problem(f"entries {expected}..{last_seq} are missing", chain, expected)
        elif prev != head:
            self._problem("the last entry is not the recorded chain head", chain, last_seq)
        for cp in checkpoints:
            if cp.seq > last_seq or cp.seq < 1:
                self._problem("checkpoint lies past the end of the chain", chain, cp.seq)
            elif hashes.get(cp.seq) != cp.head:
                self._problem("checkpoint does not match the stored hash", chain, cp.seq)
            elif self._key is not None and not cp.verify(self._key):
                self._problem("checkpoint signature does not verify", chain, cp.seq)
        return ChainState(chain, last_seq, prev if expected > 1 else GENESIS, len(checkpoints))

    async def _records(self) -> int:
        count = 0
        indexed: set[str] = set()
        hits = self._store._scan("records", {"match_all": {}}, [{"record_id": "asc"}])
        async for hit in hits:
            count += 1
            doc = hit["_source"]
            rid = doc.get("record_id")
            if not isinstance(rid, str) or hit["_id"] != _record_doc_id(rid):
                self._problem(f"records document {hit['_id']} is not where its id puts it")
                continue
            indexed.add(rid)
            position = (doc.get("chain"), doc.get("seq"))
            found = self._record_entries.get(position)
            if found is None or found[0] != rid:
                self._problem("record points at no RECORD entry of its own", *position, rid=rid)
                continue
            derived = found[1]
            differs = sorted(f for f in _DERIVED_FIELDS if doc.get(f) != derived[f])
            if differs:
                self._problem(
                    f"indexed fields differ from the chain's payload: {', '.join(differs)}",
                    *position,
                    rid=rid,
                )
        for (chain, seq), (rid, _) in self._record_entries.items():
            if rid not in indexed:
                self._problem("record is missing from the index", chain, seq, rid)
                indexed.add(rid)  # one problem per record, at its first entry
        self._indexed = indexed
        return count

    async def _check_tombstones(self) -> None:
        """Every tombstone names a purge the retention index recorded, with the same class,
        expiry and time, and nothing of the purged record is left searchable."""
        if not self._tombstones:
            return
        ids = sorted({t.record_id for _, _, t in self._tombstones})
        traces = await self._store._mget("retention", [_retention_id(rid) for rid in ids])
        for chain, seq, tomb in self._tombstones:
            trace = traces.get(_retention_id(tomb.record_id))
            if (
                trace is None
                or trace.get("purged_us") != _to_us(tomb.purged_at)
                or trace.get("retention_class") != tomb.retention_class
                or trace.get("expires_us") != _to_us(tomb.expires_at)
            ):
                self._problem("tombstone names no recorded purge", chain, seq, tomb.record_id)
            elif tomb.record_id in self._indexed:
                self._problem("a purged record is still in the index", chain, seq, tomb.record_id)
