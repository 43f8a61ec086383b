"""The policy editor's API: read (`policy.read`), validate, write a new version
(`policy.write`, audited with the old and new version), and the version history."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from archive_api.audit import AuditAction
from archive_api.auth import Identity, Permission
from archive_api.routes.deps import Ctx, audited, require

router = APIRouter(tags=["policy"])

MAX_POLICY_TEXT = 4 * 1024 * 1024
"""Largest policy document the API takes (the proxy itself reads up to 16 MiB)."""


class PolicyTextIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=MAX_POLICY_TEXT, description="The policy document (TOML).")


class PolicyWriteIn(PolicyTextIn):
    base_version: int | None = Field(
        None,
        ge=0,
        le=10**9,
        description="The version this edit started from; refused (409) if it changed since.",
    )
    comment: str | None = Field(None, max_length=2000, description="Why, for the history.")


@router.get("/policy", summary="The policy in force")
async def get_policy(
    ctx: Ctx, identity: Annotated[Identity, Depends(require(Permission.POLICY_READ))]
) -> dict[str, Any]:
    return (await ctx.policy.current()).to_json()


@router.post("/policy/validate", summary="Check a candidate policy")
async def validate_policy(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.POLICY_READ))],
    given: Annotated[PolicyTextIn, Body()],
) -> dict[str, Any]:
    """Every problem found, with line and column where they can be told; nothing changes."""
    problems = await ctx.policy.validate(given.text)
    return {"valid": not problems, "problems": [p.to_json() for p in problems]}


@router.put("/policy", summary="Put a new version of the policy in force")
async def put_policy(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.POLICY_WRITE))],
    given: Annotated[PolicyWriteIn, Body()],
) -> dict[str, Any]:
    """Validated (422 with every problem), kept as the next version, and put in force:
    running proxies pick it up within a second, without a restart."""
    before = await ctx.policy.current()
    params: dict[str, Any] = {
        "old_version": before.version,
        "old_sha256": before.sha256,
        "new_sha256": hashlib.sha256(given.text.encode("utf-8", "surrogatepass")).hexdigest(),
        "base_version": given.base_version,
        "comment": given.comment,
    }
    async with audited(ctx, identity, AuditAction.POLICY_CHANGE, params) as note:
        version = await ctx.policy.write(
            given.text,
            actor=identity.subject,
            base_version=given.base_version,
            comment=given.comment,
        )
        note.params["new_version"] = version.version
        note.count = 1
    return version.to_json()


@router.get("/policy/versions", summary="The policy's version history")
async def policy_versions(
    ctx: Ctx, identity: Annotated[Identity, Depends(require(Permission.POLICY_READ))]
) -> dict[str, Any]:
    versions = await ctx.policy.versions()
    return {"versions": [v.to_json() for v in versions]}


@router.get("/policy/versions/{version}", summary="The text of one policy version")
async def policy_version(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.POLICY_READ))],
    version: Annotated[int, Path(ge=1, le=10**9)],
) -> dict[str, Any]:
    return {"version": version, "text": await ctx.policy.version_text(version)}
