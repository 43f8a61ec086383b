"""The audit log (`audit.read`, `audit.verify`) and API tokens (`tokens.manage`)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from archive_api.audit import AuditAction
from archive_api.auth import Identity, Permission, Role, token_state
from archive_api.context import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from archive_api.routes.deps import Ctx, audited, require
from archive_api.routes.search import Cursor
from archive_api.store.audit import MAX_ACTION_CHARS, MAX_ACTOR_CHARS, AuditFilter
from archive_api.store.tokens import StoredToken

router = APIRouter(tags=["access"])


@router.get("/audit", summary="Page the audit log")
async def audit_events(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.AUDIT_READ))],
    actor: Annotated[str | None, Query(max_length=MAX_ACTOR_CHARS)] = None,
    action: Annotated[str | None, Query(max_length=MAX_ACTION_CHARS)] = None,
    since: Annotated[AwareDatetime | None, Query(description="Inclusive, with a zone.")] = None,
    until: Annotated[AwareDatetime | None, Query(description="Exclusive, with a zone.")] = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    oldest_first: bool = False,
) -> dict[str, Any]:
    """Events newest first (or oldest first), filtered by actor, action and time window,
    each with its hash, so a copy kept elsewhere can be compared. Reading is audited."""
    where = AuditFilter(actor=actor or None, action=action or None, since=since, until=until)
    params = {
        "actor": actor,
        "action": action,
        "since": since,
        "until": until,
        "page": "next" if cursor else "first",
        "oldest_first": oldest_first,
    }
    async with audited(ctx, identity, AuditAction.AUDIT_READ, params) as note:
        page = await ctx.audit.events(
            where, limit=limit, cursor=cursor, newest_first=not oldest_first
        )
        note.count = len(page.events)
    return {"events": [event.to_json() for event in page.events], "next_cursor": page.next_cursor}


@router.get("/audit/verify", summary="Verify the audit log")
async def audit_verify(
    ctx: Ctx, identity: Annotated[Identity, Depends(require(Permission.AUDIT_VERIFY))]
) -> dict[str, Any]:
    """The whole log's hash chain and signed checkpoints: whole, or its first break."""
    async with audited(ctx, identity, AuditAction.AUDIT_VERIFY, {}) as note:
        report = await ctx.audit.verify()
        note.count = report.events_checked
        note.params["ok"] = report.ok
    first = report.first_break
    return {
        "ok": report.ok,
        "last_seq": report.last_seq,
        "head": report.head.hex(),
        "events_checked": report.events_checked,
        "checkpoints_checked": report.checkpoints_checked,
        "signatures_checked": report.signatures_checked,
        "first_break": None if first is None else {"seq": first.seq, "problem": first.problem},
        "problems": [{"seq": p.seq, "problem": p.problem} for p in report.problems[:100]],
        "problems_truncated": report.problems_truncated or len(report.problems) > 100,
    }


# --- tokens -------------------------------------------------------------------------------


def _when(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def token_json(token: StoredToken, now: datetime) -> dict[str, Any]:
    return {
        "name": token.name,
        "role": token.role,
        "state": token_state(token, now),
        "created_at": _when(token.created_at),
        "expires_at": _when(token.expires_at),
        "revoked_at": _when(token.revoked_at),
    }


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, description="Unique forever: letters, digits, . _ @ -")
    role: Role
    expires_days: int | None = Field(None, ge=1, le=3650)


TokenName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")]


@router.get("/tokens", summary="API tokens (never their secrets)")
async def list_tokens(
    ctx: Ctx, identity: Annotated[Identity, Depends(require(Permission.TOKENS_MANAGE))]
) -> dict[str, Any]:
    now = ctx.clock.now()
    return {"tokens": [token_json(t, now) for t in await ctx.tokens.list()]}


@router.post("/tokens", status_code=201, summary="Create an API token")
async def create_token(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.TOKENS_MANAGE))],
    given: Annotated[TokenIn, Body()],
) -> dict[str, Any]:
    """The secret is in this response and nowhere else (only its SHA-256 is stored)."""
    expires = timedelta(days=given.expires_days) if given.expires_days is not None else None
    issued = await ctx.tokens.create(identity, name=given.name, role=given.role, expires_in=expires)
    return token_json(issued.token, ctx.clock.now()) | {"secret": issued.secret}


@router.post("/tokens/{name}/revoke", summary="Revoke an API token")
async def revoke_token(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.TOKENS_MANAGE))],
    name: TokenName,
) -> dict[str, Any]:
    token = await ctx.tokens.revoke(identity, name)
    return token_json(token, ctx.clock.now())
