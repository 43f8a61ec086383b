"""The published block list over HTTP (`rtbl`), and officers' review of its entries.

- ``GET /api/v1/rtbl/{format}.txt`` (``domains``, ``jids-sha256``, and ``jids`` when
  enabled): plain text, one entry a line, sorted, with a strong ``ETag``; ``If-None-Match``
  answers 304. For servers that poll lists (Prosody ``mod_firewall``'s ``%LIST name:
  http://…``), so it can be served without a token (``public``), which the root decides.
- ``GET /api/v1/rtbl/entries``: every entry with its state (pending ones wait for an
  officer), audited (`rtbl-read`) since it names JIDs.
- ``POST /api/v1/rtbl/decisions``: approve, reject, add or retract one entry, audited
  (`rtbl-decide`) with its outcome.

The router is made by `blocklist_router` with the `BlocklistService` the root built; the
app's context (auth, audit) is used as by every other route.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from archive_api.audit import AuditAction
from archive_api.auth import Identity, Permission
from archive_api.blocklist import BlocklistService, ListFormat, etag_matches
from archive_api.routes.deps import API_PREFIX, Ctx, audited, require
from archive_api.store.base import MAX_BLOCKLIST_VALUE
from archive_api.store.errors import NotFound
from classifier.listing import Decision, EntryKind, EntryState

LIST_MEDIA_TYPE = "text/plain; charset=utf-8"


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: EntryKind
    value: str = Field(min_length=1, max_length=MAX_BLOCKLIST_VALUE)
    decision: Decision
    reason: str | None = Field(default=None, max_length=500)


def blocklist_router(
    service: BlocklistService, *, lists: Literal["public", "token", "off"], plain_jids: bool
) -> APIRouter:
    """The block list routes under ``/api/v1``.

    ``lists``: the ``.txt`` lists need no token (``public``: a firewall polls them; keep the
    port on a trusted network), need one (``token``), or are not served (``off``).
    ``plain_jids``: also serve ``jids.txt`` (bare JIDs in clear, for consumers that cannot
    hash, such as ``mod_firewall``).
    """
    router = APIRouter(prefix=API_PREFIX, tags=["rtbl"])
    formats = {ListFormat.DOMAINS, ListFormat.JIDS_SHA256} | (
        {ListFormat.JIDS} if plain_jids else set()
    )

    async def serve_list(request: Request, name: str) -> Response:
        if name not in formats:
            raise NotFound(f"no list {name[:40]!r}; there are: {', '.join(sorted(formats))}")
        text = await service.render(name)
        headers = {
            "ETag": text.etag,
            "Cache-Control": "no-cache",
            "X-Entries": str(text.count),
        }
        if etag_matches(request.headers.get("if-none-match"), text.etag):
            return Response(status_code=304, headers=headers)
        body = b"" if request.method == "HEAD" else text.body
        return Response(body, media_type=LIST_MEDIA_TYPE, headers=headers)

    if lists == "public":

        @router.api_route(
            "/rtbl/{name}.txt", methods=["GET", "HEAD"], summary="The published block list"
        )
        async def public_list(request: Request, name: str) -> Response:
            """One entry a line; 304 when ``If-None-Match`` has the current ETag."""
            return await serve_list(request, name)

    elif lists == "token":

        @router.api_route(
            "/rtbl/{name}.txt", methods=["GET", "HEAD"], summary="The published block list"
        )
        async def token_list(
            request: Request,
            name: str,
            _identity: Annotated[Identity, Depends(require(Permission.DASHBOARD))],
        ) -> Response:
            """One entry a line; 304 when ``If-None-Match`` has the current ETag."""
            return await serve_list(request, name)

    @router.get("/rtbl/entries", summary="Entries of the published block list")
    async def entries(
        ctx: Ctx,
        identity: Annotated[Identity, Depends(require(Permission.REVIEW))],
        state: Annotated[EntryState | None, Query()] = None,
        kind: Annotated[EntryKind | None, Query()] = None,
    ) -> dict[str, Any]:
        """Pending entries wait for an officer when the review mode is ``approve``."""
        params = {
            "state": None if state is None else state.value,
            "kind": None if kind is None else kind.value,
        }
        async with audited(ctx, identity, AuditAction.RTBL_READ, params) as note:
            found = await service.entries(kind=kind, state=state)
            note.count = len(found)
        return {
            "mode": service.policy.mode.value,
            "entries": [entry.to_json() for entry in found],
        }

    @router.post("/rtbl/decisions", summary="Approve, reject, add or retract an entry")
    async def decide(
        ctx: Ctx,
        identity: Annotated[Identity, Depends(require(Permission.REVIEW))],
        given: Annotated[DecisionIn, Body()],
    ) -> dict[str, Any]:
        """The changed entries: the one decided, and its domain when that changed too."""
        params = {
            "kind": given.kind.value,
            "value": given.value[:300],
            "decision": given.decision.value,
            "reason": (given.reason or "")[:300],
        }
        async with audited(ctx, identity, AuditAction.RTBL_DECIDE, params) as note:
            changed = await service.decide(
                given.kind, given.value, given.decision, identity.subject, given.reason
            )
            note.count = len(changed)
        return {"changed": [entry.to_json() for entry in changed]}

    return router
