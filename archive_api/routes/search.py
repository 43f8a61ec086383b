"""Search, the message view and the conversation view (permissions `search` and `view`)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query

from archive_api.audit import AuditAction
from archive_api.auth import Identity, Permission
from archive_api.context import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from archive_api.errors import InvalidInput
from archive_api.holds import conversation_scope, scope_query
from archive_api.proofs import record_proof
from archive_api.routes.deps import Ctx, audited, require
from archive_api.routes.views import (
    facets_json,
    history_entry,
    hit_json,
    record_detail,
    record_summary,
)
from archive_api.store.errors import NotFound
from archive_api.store.exchanges import fold_exchanges, session_key
from archive_api.store.query import MAX_QUERY_LENGTH, parse_query

router = APIRouter(tags=["search"])

RECORD_ID_PATTERN = r"^[0-9A-Za-z_-]{1,128}$"
MAX_CURSOR_CHARS = 1000

Cursor = Annotated[
    str | None,
    Query(max_length=MAX_CURSOR_CHARS, description="Opaque cursor from the previous page."),
]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Records per page.")]
RecordId = Annotated[str, Path(pattern=RECORD_ID_PATTERN, description="A record id.")]


@router.get("/search", summary="Search the archive")
async def search(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.SEARCH))],
    q: Annotated[
        str,
        Query(
            max_length=MAX_QUERY_LENGTH * 4,
            description='The search language: words, "phrases", -negation, from: to: with: '
            "after: before: type: room: verdict: has: is: (docs/api.md).",
        ),
    ] = "",
    sort: Annotated[Literal["time", "relevance"], Query()] = "time",
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE_SIZE,
    facets: Annotated[
        bool | None, Query(description="Include facets and the total (default: first page).")
    ] = None,
) -> dict[str, Any]:
    """One page of matching records, newest first (or best match first), with highlighted
    snippets; the first page also carries the total and facets by verdict, remote domain
    and day."""
    params = {"q": q, "sort": sort, "limit": limit, "page": "next" if cursor else "first"}
    async with audited(ctx, identity, AuditAction.SEARCH, params) as note:
        query = parse_query(q)
        note.params["query"] = str(query)
        page = await ctx.store.search(query, limit=limit, cursor=cursor, sort=sort)
        body: dict[str, Any] = {
            "query": str(query),
            "sort": sort,
            "hits": [hit_json(hit) for hit in page.hits],
            "next_cursor": page.next_cursor,
        }
        if facets if facets is not None else cursor is None:
            body["total"] = await ctx.store.count(query)
            body["facets"] = facets_json(await ctx.store.facets(query))
        note.count = len(page.hits)
    return body


@router.get("/messages/{record_id}", summary="One archived record, with its proof")
async def message(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.VIEW))],
    record_id: RecordId,
) -> dict[str, Any]:
    """Every field of the record, the raw XML, verdict reasons, observations, its edit and
    retraction history, the legal holds and retention that apply, and its chain position
    with a proof that verifies (docs/api.md)."""
    async with audited(ctx, identity, AuditAction.VIEW, {"record_id": record_id}) as note:
        record = await ctx.store.get(record_id)
        if record is None:
            raise NotFound(f"no record {record_id!r} in the archive")
        linked = (await ctx.store.linked_records([record_id])).get(record_id, ())
        position = await ctx.store.record_position(record_id)
        proof = None
        if position is not None:
            proof = await record_proof(ctx.store, record_id, position, ctx.audit.public_key)
        holds = await ctx.store.holds_covering([record_id])
        retention = await ctx.store.retention_of(record_id)
        note.count = 1
    return {
        "record": record_detail(record),
        "history": [history_entry(r) for r in sorted((*linked, record), key=_when)],
        "holds": list(holds.get(record_id, ())),
        "retention": None
        if retention is None
        else {
            "class": retention.retention_class,
            "expires_at": retention.expires_at.isoformat(),
            "assigned_at": retention.assigned_at.isoformat(),
        },
        "chain": proof.to_json() if proof is not None else None,
    }


def _when(record: Any) -> tuple[datetime, str]:
    return (record.occurred_at, record.record_id)


def _time_param(value: str | None, name: str) -> datetime | None:
    """A date (a UTC day boundary) or an ISO 8601 date-time (UTC when it has no offset)."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        at = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"{name}: {value[:40]!r} is not a date (YYYY-MM-DD) or ISO 8601 date-time"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


@router.get("/conversations", summary="A 1:1 conversation or a room, in order")
async def conversation(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.VIEW))],
    with_: Annotated[
        list[str] | None,
        Query(alias="with", max_length=2, description="The two parties (bare JIDs)."),
    ] = None,
    room: Annotated[str | None, Query(max_length=3100, description="A room's bare JID.")] = None,
    after: Annotated[str | None, Query(max_length=64, description="From (inclusive).")] = None,
    before: Annotated[str | None, Query(max_length=64, description="Until (exclusive).")] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE_SIZE,
) -> dict[str, Any]:
    """The records between two people (both directions) or in a room, oldest first, each
    with its corrections and retractions. The steps of a call or file transfer on the page
    are folded into their first step, which carries the session as `exchange`."""
    params = {"with": with_, "room": room, "after": after, "before": before, "limit": limit}
    async with audited(ctx, identity, AuditAction.CONVERSATION, params) as note:
        if with_ is not None and any(len(jid) > 3100 for jid in with_):
            raise InvalidInput("with: a JID is at most 3071 characters")
        pair = (with_[0], with_[1]) if with_ is not None and len(with_) == 2 else None
        if with_ is not None and pair is None:
            raise InvalidInput("with: give exactly two parties (with=a&with=b)")
        scope = conversation_scope(
            participants=pair,
            room=room,
            after=_time_param(after, "after"),
            before=_time_param(before, "before"),
        )
        query = scope_query(scope)
        note.params["query"] = str(query)
        page = await ctx.store.search(query, limit=limit, cursor=cursor, sort="time_asc")
        records = [hit.record for hit in page.hits]
        linked = await ctx.store.linked_records([r.record_id for r in records])
        exchanges = fold_exchanges(records)
        items = []
        for record in records:
            key = session_key(record)
            if key is not None:
                summary = exchanges.pop(key, None)
                if summary is None:
                    continue  # a later step of a session already shown
                item = record_summary(record)
                item["exchange"] = summary.to_json()
                item["edits"], item["retracted"] = [], False
                items.append(item)
                continue
            item = record_summary(record)
            # An original carries its corrections; a correction names what it corrects.
            history = (
                () if record.replaces_id or record.retracts_id else linked.get(record.record_id, ())
            )
            item["edits"] = [history_entry(r) for r in history if r.replaces_id]
            item["retracted"] = any(r.retracts_id for r in history)
            items.append(item)
        note.count = len(records)
    return {"query": str(query), "records": items, "next_cursor": page.next_cursor}
