"""Dashboard figures (`dashboard`) and the service's health: /healthz, /readyz, /metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from archive_api.auth import Identity, Permission
from archive_api.dashboard import dashboard
from archive_api.routes.deps import Ctx, error_body, require
from archive_api.store.errors import StoreError

router = APIRouter(tags=["dashboard"])
health = APIRouter(tags=["health"])


@router.get("/dashboard", summary="Messages, blocked and quarantined over time; top lists")
async def dashboard_figures(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.DASHBOARD))],
    days: Annotated[int | None, Query(ge=1, le=366, description="Days, ending today.")] = None,
    top: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    """Per UTC day: every record, the rejected or dropped ones, the quarantined and the
    flagged ones; the remote domains most blocked and the rules that stopped most."""
    span = min(days or ctx.config.dashboard_days, ctx.config.max_dashboard_days)
    figures = await dashboard(ctx.store, ctx.clock, days=span, top=top)
    return figures.to_json()


@health.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/readyz", summary="The archive store answers", response_model=None)
async def readyz(ctx: Ctx) -> dict[str, Any] | JSONResponse:
    try:
        head = await ctx.store.audit_head()
    except StoreError as exc:
        return JSONResponse(error_body("not-ready", f"the archive store: {exc}"), status_code=503)
    return {"status": "ready", "audit_seq": head.seq}


@health.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(ctx: Ctx) -> Response:
    return Response(generate_latest(ctx.metrics), media_type=CONTENT_TYPE_LATEST)
