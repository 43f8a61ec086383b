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
import hashlib
import itertools
import json
import math
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

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
    AuditEntry,
    AuditEvent,
    AuditFilter,
    AuditHead,
    AuditPage,
    AuditVerifyReport,
)
from archive_api.store.base import (
    DEFAULT_CHAIN,
    HIGHLIGHT_END,
    HIGHLIGHT_START,
    MAX_PAGE_SIZE,
    SORT_ORDERS,
    Activity,
    ArchiveStore,
    ChainPosition,
    ChainState,
    Facets,
    Hit,
    HoldRecord,
    PurgeBatch,
    RetentionAssignment,
    RetentionState,
    RetentionSubjectPage,
    RetentionUpdate,
    SearchPage,
    SnippetPart,
    SortOrder,
    VerifyProblem,
    VerifyReport,
    parse_marked,
)
from archive_api.store.chain import GENESIS, ChainLink, Checkpoint, link_hash
from archive_api.store.errors import (
    ChainConflict,
    ChainGap,
    InvalidCursor,
    InvalidEntry,
    InvalidRequest,
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
from archive_api.store.tokens import StoredToken
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
_BULK_CHUNK_DOCS: Final = 500
_BULK_CHUNK_BYTES: Final = 10 * 1024 * 1024
_BULK_RETRIES: Final = 5
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
}


class NotSupportedByBackend(StoreError, NotImplementedError):
    """The Elasticsearch store does not implement this part of the protocol yet."""

    def __init__(self, method: str) -> None:
        super().__init__(
            f"ElasticsearchStore.{method} is not implemented yet (see docs/elasticsearch.md); "
            "use the SQLite store for this feature"
        )
        self.method = method


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


class ElasticsearchStore:
    """`ArchiveStore` on Elasticsearch. Create with `await ElasticsearchStore.open(url)`."""

    def __init__(self, client: AsyncElasticsearch, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._closed = False

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
        store = cls(client, index_prefix)
        try:
            await store._ensure_indices()
        except BaseException:
            await client.close()
            raise
        return store

    def index(self, kind: str) -> str:
        """The alias every read and write of one kind of document goes through."""
        return f"{self._prefix}-{kind}"

    async def _ensure_indices(self) -> None:
        try:
            for kind, mappings in _MAPPINGS.items():
                alias = self.index(kind)
                settings: dict[str, Any] = {"analysis": _ANALYSIS} if kind == "records" else {}
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
        try:
            async for ok, item in async_streaming_bulk(
                self._client,
                actions,
                chunk_size=_BULK_CHUNK_DOCS,
                max_chunk_bytes=_BULK_CHUNK_BYTES,
                max_retries=_BULK_RETRIES,
                initial_backoff=0.5,
                max_backoff=30,
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
        """Documents by `_id` (realtime: no refresh needed); missing ones are left out."""
        out: dict[str, dict[str, Any]] = {}
        if not ids:
            return out
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

    async def apply(self, links: Sequence[ChainLink], *, chain: str = DEFAULT_CHAIN) -> None:
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
                if _entry_from_source(src).link != link:
                    raise ChainConflict(chain, link.seq, "differs from the applied entry")
        prev = head
        entries: list[tuple[ChainLink, SpoolEntry]] = []
        for link in new:
            if link.prev_hash != prev:
                raise ChainConflict(chain, link.seq, "previous-hash does not continue the chain")
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
        await self._write_ledger(chain, entries)
        await self._write_records(chain, entries)
        await self.refresh()
        await self._advance_chain(chain, state, entries[-1][0])

    async def _write_ledger(self, chain: str, entries: list[tuple[ChainLink, SpoolEntry]]) -> None:
        def source(link: ChainLink, entry: SpoolEntry) -> dict[str, Any]:
            return {
                "chain": chain,
                "seq": link.seq,
                "prev_hash": link.prev_hash.hex(),
                "hash": link.hash.hex(),
                "payload": base64.b64encode(link.payload).decode("ascii"),
                "op": entry.op.value,
                "record_id": entry.record_id,
            }

        alias = self.index("ledger")
        results = await self._bulk(
            [
                {
                    "_op_type": "create",
                    "_index": alias,
                    "_id": _ledger_id(chain, link.seq),
                    "_source": source(link, entry),
                }
                for link, entry in entries
            ]
        )
        existing = [link for (link, _), (ok, _) in zip(entries, results, strict=True) if not ok]
        if not existing:
            return
        # Past the committed head, so left by a batch that failed half-way: replace what differs.
        stored = await self._mget("ledger", [_ledger_id(chain, link.seq) for link in existing])
        by_seq = {link.seq: entry for link, entry in entries}
        await self._bulk(
            [
                {
                    "_op_type": "index",
                    "_index": alias,
                    "_id": _ledger_id(chain, link.seq),
                    "_source": source(link, by_seq[link.seq]),
                }
                for link in existing
                if (src := stored.get(_ledger_id(chain, link.seq))) is None
                or _entry_from_source(src).link != link
            ]
        )

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
                            "_index": self.index("records"),
                            "_id": hit["_id"],
                            "doc": {flag: True},
                        }
                        async for hit in originals
                    ]
                )
        await self._bulk(
            [
                {
                    "_op_type": "create",
                    "_index": self.index("records"),
                    "_id": _record_doc_id(record_id),
                    "_source": doc,
                }
                for record_id, doc in docs.items()
            ]
        )

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

    # -- not implemented yet on this backend (docs/elasticsearch.md) --

    async def append_audit(self, entries: Sequence[AuditEntry]) -> tuple[AuditEvent, ...]:
        raise NotSupportedByBackend("append_audit")

    async def audit_events(
        self,
        where: AuditFilter = AuditFilter(),  # noqa: B008 (frozen, so a shared default is safe)
        *,
        limit: int = 50,
        cursor: str | None = None,
        newest_first: bool = True,
    ) -> AuditPage:
        raise NotSupportedByBackend("audit_events")

    async def audit_head(self) -> AuditHead:
        raise NotSupportedByBackend("audit_head")

    async def add_audit_checkpoint(self, checkpoint: Checkpoint) -> None:
        raise NotSupportedByBackend("add_audit_checkpoint")

    async def audit_checkpoints(self) -> tuple[Checkpoint, ...]:
        raise NotSupportedByBackend("audit_checkpoints")

    async def verify_audit(
        self, *, public_key: Ed25519PublicKey | None = None
    ) -> AuditVerifyReport:
        raise NotSupportedByBackend("verify_audit")

    async def add_token(self, token: StoredToken) -> None:
        raise NotSupportedByBackend("add_token")

    async def token_by_hash(self, secret_hash: bytes) -> StoredToken | None:
        raise NotSupportedByBackend("token_by_hash")

    async def token_by_name(self, name: str) -> StoredToken | None:
        raise NotSupportedByBackend("token_by_name")

    async def tokens(self) -> tuple[StoredToken, ...]:
        raise NotSupportedByBackend("tokens")

    async def revoke_token(self, name: str, *, at: datetime) -> StoredToken:
        raise NotSupportedByBackend("revoke_token")

    async def linked_records(
        self, record_ids: Sequence[str]
    ) -> dict[str, tuple[ArchiveRecord, ...]]:
        raise NotSupportedByBackend("linked_records")

    async def activity(self, since: datetime, until: datetime, *, top: int = 10) -> Activity:
        raise NotSupportedByBackend("activity")

    async def add_hold(self, hold: HoldRecord) -> None:
        raise NotSupportedByBackend("add_hold")

    async def release_hold(
        self, hold_id: str, *, released_by: str, released_at: datetime, reason: str | None = None
    ) -> HoldRecord:
        raise NotSupportedByBackend("release_hold")

    async def get_hold(self, hold_id: str) -> HoldRecord | None:
        raise NotSupportedByBackend("get_hold")

    async def list_holds(self, *, include_released: bool = True) -> tuple[HoldRecord, ...]:
        raise NotSupportedByBackend("list_holds")

    async def holds_covering(self, record_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        raise NotSupportedByBackend("holds_covering")

    async def set_retention(
        self, assignments: Sequence[RetentionAssignment], *, assigned_at: datetime
    ) -> RetentionUpdate:
        raise NotSupportedByBackend("set_retention")

    async def retention_of(self, record_id: str) -> RetentionState | None:
        raise NotSupportedByBackend("retention_of")

    async def retention_subjects(
        self,
        *,
        cursor: str | None = None,
        limit: int = 1000,
        unassigned_only: bool = False,
        expiring_by: datetime | None = None,
    ) -> RetentionSubjectPage:
        raise NotSupportedByBackend("retention_subjects")

    async def purge(
        self,
        now: datetime,
        *,
        limit: int = 1000,
        dry_run: bool = False,
        record_ids: Sequence[str] | None = None,
        counts: bool = False,
    ) -> PurgeBatch:
        raise NotSupportedByBackend("purge")


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
            if link_hash(link.prev_hash, link.seq, link.payload) != link.hash:
                self._problem("content does not match its hash (edited)", chain, link.seq)
            if link.seq in wanted:
                hashes[link.seq] = link.hash
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
        return count
