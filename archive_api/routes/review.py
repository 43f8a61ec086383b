"""Review queues (`review`): quarantined and flagged messages, and the officers' decisions.

Listing a queue shows message content, so it is audited like a search. Each decision goes
through the `ReviewActions` the composition root provides and is audited with its outcome:
`ok` when done (or queued for the running proxy), `invalid` when refused.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from archive_api.audit import AuditAction, AuditOutcome
from archive_api.auth import Identity, Permission
from archive_api.context import DEFAULT_PAGE_SIZE, ReviewLabel, ReviewOutcome
from archive_api.routes.deps import Ctx, audited, error_body, require
from archive_api.routes.search import Cursor, Limit, RecordId
from archive_api.routes.views import record_summary
from archive_api.store.base import SortOrder
from archive_api.store.errors import NotFound
from archive_api.store.query import Query, VerdictTerm
from archive_api.store.records import RecordKind, RecordStatus
from classifier.verdict import Action

router = APIRouter(tags=["review"])


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: ReviewLabel


async def _queue(
    ctx: Ctx,
    identity: Identity,
    action: Action,
    *,
    cursor: str | None,
    limit: int,
    held_only: bool,
) -> dict[str, Any]:
    query = Query.of(VerdictTerm(action))
    params = {"queue": action.value, "query": str(query), "limit": limit, "held_only": held_only}
    sort: SortOrder = "time_asc" if action is Action.QUARANTINE else "time"
    async with audited(ctx, identity, AuditAction.SEARCH, params) as note:
        page = await ctx.store.search(query, limit=limit, cursor=cursor, sort=sort)
        records = [
            hit.record
            for hit in page.hits
            if hit.record.kind is RecordKind.MESSAGE
            and (not held_only or hit.record.status is RecordStatus.HELD)
        ]
        items = []
        for record in records:
            item = record_summary(record)
            item["reasons"] = [reason.to_json() for reason in record.verdict.reasons]
            items.append(item)
        note.count = len(items)
    return {"query": str(query), "records": items, "next_cursor": page.next_cursor}


@router.get("/review/quarantine", summary="Quarantined messages, oldest first")
async def quarantine_queue(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.REVIEW))],
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE_SIZE,
    include_decided: bool = False,
) -> dict[str, Any]:
    """Held messages waiting for a decision (with `include_decided`, released and
    confirmed ones too). A page may hold fewer records than `limit`: keep following
    `next_cursor` until it is null."""
    return await _queue(
        ctx,
        identity,
        Action.QUARANTINE,
        cursor=cursor,
        limit=limit,
        held_only=not include_decided,
    )


@router.get("/review/flagged", summary="Flagged messages, newest first")
async def flagged_queue(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.REVIEW))],
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE_SIZE,
) -> dict[str, Any]:
    """Messages delivered with a FLAG verdict, for an officer to confirm or clear."""
    return await _queue(ctx, identity, Action.FLAG, cursor=cursor, limit=limit, held_only=False)


async def _decide(
    ctx: Ctx, identity: Identity, action: AuditAction, record_id: str, label: str | None = None
) -> JSONResponse:
    params: dict[str, Any] = {"record_id": record_id}
    if label is not None:
        params["label"] = label
    async with audited(ctx, identity, action, params) as note:
        if await ctx.store.get(record_id) is None:
            raise NotFound(f"no record {record_id!r} in the archive")
        outcome: ReviewOutcome
        actor = identity.subject
        if action is AuditAction.RELEASE:
            outcome = await ctx.review.release(record_id, actor)
        elif action is AuditAction.CONFIRM_SPAM:
            outcome = await ctx.review.confirm_spam(record_id, actor)
        elif action is AuditAction.NOT_SPAM:
            outcome = await ctx.review.not_spam(record_id, actor)
        else:
            outcome = await ctx.review.label(record_id, ReviewLabel(label or ""), actor)
        note.params.update(detail=outcome.detail[:500], queued=outcome.queued)
        note.count = 1 if outcome.ok else 0
        if not outcome.ok:
            note.outcome = AuditOutcome.INVALID
    if not outcome.ok:
        return JSONResponse(
            error_body("refused", outcome.detail, {"outcome": outcome.to_json()}), status_code=409
        )
    return JSONResponse(outcome.to_json(), status_code=202 if outcome.queued else 200)


@router.post("/review/{record_id}/release", summary="Release a quarantined message")
async def release(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.REVIEW))],
    record_id: RecordId,
) -> JSONResponse:
    """Deliver a held message now (or at the recipient's next login); it also becomes a
    not-spam example for the classifier. 202 when the proxy has yet to apply it."""
    return await _decide(ctx, identity, AuditAction.RELEASE, record_id)


@router.post("/review/{record_id}/confirm-spam", summary="Confirm a message as spam")
async def confirm_spam(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.REVIEW))],
    record_id: RecordId,
) -> JSONResponse:
    """A held message is never delivered; a flagged one is labelled spam. Both teach the
    classifier and count against the sender's reputation."""
    return await _decide(ctx, identity, AuditAction.CONFIRM_SPAM, record_id)


@router.post("/review/{record_id}/not-spam", summary="Clear a message as not spam")
async def not_spam(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.REVIEW))],
    record_id: RecordId,
) -> JSONResponse:
    """A held message is released; a flagged one is labelled ham."""
    return await _decide(ctx, identity, AuditAction.NOT_SPAM, record_id)


@router.post("/review/{record_id}/label", summary="Label a message spam or ham")
async def label(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.REVIEW))],
    record_id: RecordId,
    given: Annotated[LabelIn, Body()],
) -> JSONResponse:
    """Any archived message, as a training example for the text model."""
    return await _decide(ctx, identity, AuditAction.LABEL, record_id, given.label.value)
