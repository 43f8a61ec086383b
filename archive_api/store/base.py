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

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive_api.store.chain import ChainLink, Checkpoint
from archive_api.store.query import Query
from archive_api.store.records import ArchiveRecord
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


class ArchiveStore(Protocol):
    async def apply(self, links: Sequence[ChainLink], *, chain: str = DEFAULT_CHAIN) -> None:
        """Ingest spool links in seq order as one atomic batch.

        Raises ChainGap if the batch starts past `last_seq() + 1`, ChainConflict if a link
        does not hash, does not continue the stored chain, or differs from an applied link
        with the same seq, and InvalidEntry if a payload is not a spool entry.
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

    async def close(self) -> None: ...
