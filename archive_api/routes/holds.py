"""Legal holds: list, read, place (`hold.create`), release (`hold.release`, admins only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from archive_api.audit import AuditAction
from archive_api.auth import Identity, Permission
from archive_api.errors import InvalidInput
from archive_api.holds import (
    MAX_CASE_NAME,
    MAX_REASON,
    HoldScope,
    conversation_scope,
    person_scope,
    saved_search_scope,
    scope_query,
)
from archive_api.routes.deps import Ctx, audited, require
from archive_api.store.query import MAX_QUERY_LENGTH

router = APIRouter(tags=["holds"])

HoldId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,80}$", description="A hold id.")]
_JID = 3100  # longest JID text accepted (3 x 1023 + separators)


class PersonScopeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["person"]
    jid: str = Field(max_length=_JID, description="A bare JID or *@domain.")


class ConversationScopeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["conversation"]
    participants: list[str] | None = Field(None, min_length=2, max_length=2)
    room: str | None = Field(None, max_length=_JID)
    after: datetime | None = None
    before: datetime | None = None


class SearchScopeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["search"]
    query: str = Field(max_length=MAX_QUERY_LENGTH * 4)


class HoldIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    case_name: str = Field(min_length=1, max_length=MAX_CASE_NAME * 4)
    scope: PersonScopeIn | ConversationScopeIn | SearchScopeIn = Field(discriminator="kind")


class ReleaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=MAX_REASON * 4)


def _scope(given: PersonScopeIn | ConversationScopeIn | SearchScopeIn) -> HoldScope:
    if isinstance(given, PersonScopeIn):
        return person_scope(given.jid)
    if isinstance(given, SearchScopeIn):
        return saved_search_scope(given.query)  # QuerySyntaxError keeps its position
    if given.participants is not None and any(len(p) > _JID for p in given.participants):
        raise InvalidInput("participants: a JID is at most 3071 characters")
    pair = (given.participants[0], given.participants[1]) if given.participants else None
    return conversation_scope(
        participants=pair, room=given.room, after=given.after, before=given.before
    )


@router.get("/holds", summary="Legal holds")
async def list_holds(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.HOLD_READ))],
    include_released: Annotated[bool, Query()] = True,
) -> dict[str, Any]:
    holds = await ctx.holds.list(include_released=include_released)
    return {"holds": [hold.to_json() for hold in holds]}


@router.get("/holds/{hold_id}", summary="One legal hold")
async def get_hold(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.HOLD_READ))],
    hold_id: HoldId,
) -> dict[str, Any]:
    return (await ctx.holds.get(hold_id)).to_json()


@router.post("/holds", status_code=201, summary="Place a legal hold")
async def place_hold(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.HOLD_CREATE))],
    given: Annotated[HoldIn, Body()],
) -> dict[str, Any]:
    """A hold by person (`with:` a JID or *@domain), conversation (two JIDs or a room, with
    an optional window) or saved search; it covers what matches now and what arrives later.
    The audit event's result count is how many records it covers now."""
    params = {"case_name": given.case_name, "scope": given.scope.model_dump(mode="json")}
    async with audited(ctx, identity, AuditAction.HOLD, params) as note:
        scope = _scope(given.scope)
        hold = await ctx.holds.place(given.case_name, scope, actor=identity.subject)
        note.params.update(hold_id=hold.hold_id, query=str(scope_query(scope)))
        note.count = await ctx.store.count(hold.query)
    return hold.to_json() | {"records_covered": note.count}


@router.post("/holds/{hold_id}/release", summary="Release a legal hold (admins)")
async def release_hold(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.HOLD_RELEASE))],
    hold_id: HoldId,
    given: Annotated[ReleaseIn, Body()] = ReleaseIn(),  # noqa: B008 (immutable default)
) -> dict[str, Any]:
    params = {"hold_id": hold_id, "reason": given.reason}
    async with audited(ctx, identity, AuditAction.HOLD_RELEASE, params) as note:
        hold = await ctx.holds.release(
            hold_id, actor=identity.subject, actor_role=identity.role, reason=given.reason
        )
        note.params["case_name"] = hold.case_name
        note.count = 1
    return hold.to_json()
