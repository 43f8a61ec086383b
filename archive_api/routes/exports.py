"""Exports of a search or a legal hold (`export`): start, follow, list, download."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from archive_api.audit import AuditAction
from archive_api.auth import Identity, Permission
from archive_api.context import ApiContext
from archive_api.export_jobs import ExportJobs
from archive_api.exports import MANIFEST_NAME, ExportFormat, ExportSource
from archive_api.routes.deps import Ctx, audited, require
from archive_api.store.query import MAX_QUERY_LENGTH

router = APIRouter(tags=["exports"])

JobId = Annotated[str, Path(pattern=r"^exp-[0-9a-f]{16}$", description="An export job id.")]
_MEDIA_TYPES = {
    ".jsonl": "application/x-ndjson",
    ".csv": "text/csv; charset=utf-8",
    ".eml": "message/rfc822",
    ".pdf": "application/pdf",
    ".json": "application/json",
}


class ExportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: ExportFormat = ExportFormat.JSONL
    query: str | None = Field(None, max_length=MAX_QUERY_LENGTH * 4)
    hold_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,80}$")

    @model_validator(mode="after")
    def _one_source(self) -> ExportIn:
        if (self.query is None) == (self.hold_id is None):
            raise ValueError("give either a query or a hold_id")
        return self


def jobs_of(ctx: ApiContext) -> ExportJobs:
    assert ctx.export_jobs is not None  # create_app makes one
    return ctx.export_jobs


@router.post("/exports", status_code=202, summary="Start an export")
async def start_export(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.EXPORT))],
    given: Annotated[ExportIn, Body()],
) -> dict[str, Any]:
    """Export what a search matches or what a legal hold covers, as JSON Lines, CSV, EML or
    PDF, with a manifest (sha256 of every file). It runs in the background: follow it at
    `/exports/{job_id}`. The audit event counts the records it will contain."""
    params = given.model_dump(mode="json")
    async with audited(ctx, identity, AuditAction.EXPORT, params) as note:
        if given.hold_id is not None:
            source = ExportSource.of_hold(await ctx.holds.get(given.hold_id))
        else:
            source = ExportSource.of_query(given.query or "")
        note.params["source"] = source.to_json()
        note.count = await ctx.store.count(source.query)
        job = await jobs_of(ctx).start(source, given.format, identity.subject)
        note.params["job_id"] = job.job_id
    return job.to_json()


@router.get("/exports", summary="Export jobs")
async def list_exports(
    ctx: Ctx, identity: Annotated[Identity, Depends(require(Permission.EXPORT))]
) -> dict[str, Any]:
    return {"exports": [job.to_json() for job in await jobs_of(ctx).list()]}


@router.get("/exports/{job_id}", summary="One export job and its progress")
async def get_export(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.EXPORT))],
    job_id: JobId,
) -> dict[str, Any]:
    return (await jobs_of(ctx).get(job_id)).to_json()


@router.get("/exports/{job_id}/files/{name:path}", summary="Download a file of an export")
async def download_export_file(
    ctx: Ctx,
    identity: Annotated[Identity, Depends(require(Permission.EXPORT))],
    job_id: JobId,
    name: Annotated[str, Path(max_length=1000, description="manifest.json or a listed file.")],
) -> FileResponse:
    """`manifest.json` or a file the manifest lists (names are matched against that list,
    never used as a path). Each download is audited with the records the file holds."""
    params = {"job_id": job_id, "file": name, "download": True}
    async with audited(ctx, identity, AuditAction.EXPORT, params) as note:
        path, exported = await jobs_of(ctx).file(job_id, name)
        note.count = exported.records if exported is not None else 0
    suffix = path.suffix.lower()
    return FileResponse(
        path,
        media_type=_MEDIA_TYPES.get(suffix, "application/octet-stream"),
        filename=path.name if name != MANIFEST_NAME else MANIFEST_NAME,
    )
