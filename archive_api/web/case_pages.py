"""Legal holds and exports: list, place, release; start, follow, download.

Forms are turned into the JSON API's own request models (`HoldIn`, `ExportIn`, ...) and
handed to its route functions, so validation, the service call and the audit event are
the API's. A refused form is shown again with what was typed and why it was refused.
After a change the browser is sent to a plain page (POST, redirect, GET), so reloading
it does not place a second hold.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from pydantic import ValidationError
from starlette.responses import FileResponse, Response

from archive_api.auth import Identity, Permission
from archive_api.errors import HoldAlreadyReleased, InvalidInput, UnknownHold
from archive_api.export_jobs import JobState
from archive_api.exports import ExportFormat
from archive_api.holds import MAX_CASE_NAME, MAX_REASON
from archive_api.routes import exports as exports_api
from archive_api.routes import holds as holds_api
from archive_api.routes.deps import Ctx
from archive_api.routes.exports import ExportIn, JobId
from archive_api.routes.holds import HoldId, HoldIn, ReleaseIn
from archive_api.store.errors import InvalidRequest, QuerySyntaxError
from archive_api.store.query import MAX_QUERY_LENGTH
from archive_api.web.access import action, page
from archive_api.web.rendering import SECURITY_HEADERS, WEB_PREFIX, Renderer, is_htmx, redirect, url

HOLDS_PATH: Final = f"{WEB_PREFIX}/holds"
EXPORTS_PATH: Final = f"{WEB_PREFIX}/exports"
_JID_FIELD: Final = 3100
_TIME_FIELD: Final = 64


def form_time(value: str, what: str) -> str | None:
    """A time typed into a form (`YYYY-MM-DD`, or a date-time; UTC unless it says otherwise),
    as ISO 8601 with its offset; None when empty."""
    value = value.strip()
    if not value:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC).isoformat()
        at = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"{what}: {value[:40]!r} is not a date (YYYY-MM-DD) or date-time (YYYY-MM-DDTHH:MM)"
        ) from None
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).isoformat()


def validation_text(exc: ValidationError) -> str:
    """The first problem pydantic found, said plainly."""
    problems = exc.errors()
    if not problems:
        return "the form is not valid"
    first = problems[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if not isinstance(part, int))
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", ""))


def problem_text(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return validation_text(exc)
    if isinstance(exc, QuerySyntaxError):
        return f"search query: {exc}"
    return str(exc)


def add_case_routes(router: APIRouter, renderer: Renderer) -> None:
    async def holds_view(
        request: Request,
        ctx: Ctx,
        identity: Identity,
        *,
        form: dict[str, Any] | None = None,
        error: str | None = None,
        notice: str | None = None,
        status: int = 200,
    ) -> Response:
        listing = await holds_api.list_holds(ctx, identity, include_released=True)
        return renderer.page(
            request,
            "holds.html",
            title="Legal holds",
            status=status,
            holds=listing["holds"],
            form=form
            or {
                "kind": "person",
                "case_name": "",
                "jid": "",
                "query": "",
                "participants": ["", ""],
                "room": "",
                "after": "",
                "before": "",
            },
            error=error,
            notice=notice,
            can_create=identity.can(Permission.HOLD_CREATE),
            can_release=identity.can(Permission.HOLD_RELEASE),
            can_export=identity.can(Permission.EXPORT),
        )

    @router.get(HOLDS_PATH, include_in_schema=False)
    async def holds_page(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.HOLD_READ))],
        placed: Annotated[str | None, Query(max_length=80)] = None,
        released: Annotated[str | None, Query(max_length=80)] = None,
        jid: Annotated[str | None, Query(max_length=_JID_FIELD)] = None,
        query: Annotated[str | None, Query(max_length=MAX_QUERY_LENGTH * 4)] = None,
    ) -> Response:
        notice = None
        for hold_id, verb in ((placed, "placed"), (released, "released")):
            if hold_id:
                try:
                    hold = await ctx.holds.get(hold_id)
                except UnknownHold:
                    continue
                notice = f"Legal hold {hold.hold_id} ({hold.case_name}) {verb}."
        form = None
        if jid or query:
            form = {
                "kind": "search" if query and not jid else "person",
                "case_name": "",
                "jid": jid or "",
                "query": query or "",
                "participants": ["", ""],
                "room": "",
                "after": "",
                "before": "",
            }
        return await holds_view(request, ctx, identity, form=form, notice=notice)

    @router.post(HOLDS_PATH, include_in_schema=False)
    async def place_hold(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(action(Permission.HOLD_CREATE))],
        case_name: Annotated[str, Form(max_length=MAX_CASE_NAME * 4)] = "",
        kind: Annotated[Literal["person", "conversation", "search"], Form()] = "person",
        jid: Annotated[str, Form(max_length=_JID_FIELD)] = "",
        participant: Annotated[list[str] | None, Form(max_length=2)] = None,
        room: Annotated[str, Form(max_length=_JID_FIELD)] = "",
        after: Annotated[str, Form(max_length=_TIME_FIELD)] = "",
        before: Annotated[str, Form(max_length=_TIME_FIELD)] = "",
        query: Annotated[str, Form(max_length=MAX_QUERY_LENGTH * 4)] = "",
    ) -> Response:
        parties = [p for p in participant or [] if len(p) <= _JID_FIELD]
        form = {
            "kind": kind,
            "case_name": case_name,
            "jid": jid,
            "query": query,
            "participants": [*parties, "", ""][:2],
            "room": room,
            "after": after,
            "before": before,
        }
        try:
            scope: dict[str, Any]
            if kind == "person":
                scope = {"kind": "person", "jid": jid.strip()}
            elif kind == "search":
                scope = {"kind": "search", "query": query}
            else:
                named = [p.strip() for p in parties if p.strip()]
                scope = {
                    "kind": "conversation",
                    "participants": named or None,
                    "room": room.strip() or None,
                    "after": form_time(after, "after"),
                    "before": form_time(before, "before"),
                }
            given = HoldIn.model_validate({"case_name": case_name.strip(), "scope": scope})
            placed = await holds_api.place_hold(ctx, identity, given)
        except (ValidationError, InvalidInput, InvalidRequest) as exc:
            return await holds_view(
                request, ctx, identity, form=form, error=problem_text(exc), status=400
            )
        return redirect(url(HOLDS_PATH, placed=placed["hold_id"]))

    @router.post(f"{HOLDS_PATH}/{{hold_id}}/release", include_in_schema=False)
    async def release_hold(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(action(Permission.HOLD_RELEASE))],
        hold_id: HoldId,
        reason: Annotated[str, Form(max_length=MAX_REASON * 4)] = "",
    ) -> Response:
        try:
            given = ReleaseIn(reason=reason.strip() or None)
            await holds_api.release_hold(ctx, identity, hold_id, given)
        except (ValidationError, InvalidInput, HoldAlreadyReleased) as exc:
            return await holds_view(request, ctx, identity, error=problem_text(exc), status=409)
        except UnknownHold as exc:
            return await holds_view(request, ctx, identity, error=str(exc), status=404)
        return redirect(url(HOLDS_PATH, released=hold_id))

    # --- exports ---

    async def exports_view(
        request: Request,
        ctx: Ctx,
        identity: Identity,
        *,
        form: dict[str, Any],
        error: str | None = None,
        status: int = 200,
    ) -> Response:
        jobs = (await exports_api.list_exports(ctx, identity))["exports"]
        holds: list[dict[str, Any]] = []
        if identity.can(Permission.HOLD_READ):
            holds = (await holds_api.list_holds(ctx, identity, include_released=True))["holds"]
        return renderer.page(
            request,
            "exports.html",
            title="Exports",
            status=status,
            jobs=jobs,
            holds=holds,
            formats=[f.value for f in ExportFormat],
            form=form,
            error=error,
            notice=None,
        )

    @router.get(EXPORTS_PATH, include_in_schema=False)
    async def exports_page(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.EXPORT))],
        query: Annotated[str | None, Query(max_length=MAX_QUERY_LENGTH * 4)] = None,
        hold_id: Annotated[str | None, Query(max_length=80)] = None,
    ) -> Response:
        form = {
            "source": "hold" if hold_id else "query",
            "query": query or "",
            "hold_id": hold_id or "",
            "format": ExportFormat.JSONL.value,
        }
        return await exports_view(request, ctx, identity, form=form)

    @router.post(EXPORTS_PATH, include_in_schema=False)
    async def start_export(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(action(Permission.EXPORT))],
        source: Annotated[Literal["query", "hold"], Form()] = "query",
        query: Annotated[str, Form(max_length=MAX_QUERY_LENGTH * 4)] = "",
        hold_id: Annotated[str, Form(max_length=80)] = "",
        export_format: Annotated[str, Form(alias="format", max_length=10)] = "jsonl",
    ) -> Response:
        form = {"source": source, "query": query, "hold_id": hold_id, "format": export_format}
        try:
            given = ExportIn.model_validate(
                {
                    "format": export_format,
                    "query": query if source == "query" else None,
                    "hold_id": hold_id if source == "hold" else None,
                }
            )
            job = await exports_api.start_export(ctx, identity, given)
        except (ValidationError, InvalidInput, InvalidRequest, UnknownHold) as exc:
            return await exports_view(
                request, ctx, identity, form=form, error=problem_text(exc), status=400
            )
        return redirect(f"{EXPORTS_PATH}/{job['job_id']}")

    @router.get(f"{EXPORTS_PATH}/{{job_id}}", include_in_schema=False)
    async def export_page(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.EXPORT))],
        job_id: JobId,
    ) -> Response:
        job = await exports_api.get_export(ctx, identity, job_id)
        return renderer.page(
            request, "export.html", title=f"Export {job_id}", job=job, running=_running(job)
        )

    @router.get(f"{EXPORTS_PATH}/{{job_id}}/progress", include_in_schema=False)
    async def export_progress(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.EXPORT))],
        job_id: JobId,
    ) -> Response:
        """The job's state for htmx to poll; it stops polling once the job has finished."""
        job = await exports_api.get_export(ctx, identity, job_id)
        if not is_htmx(request):
            return redirect(f"{EXPORTS_PATH}/{job_id}")
        return renderer.fragment(request, "export_progress.html", job=job, running=_running(job))

    @router.get(f"{EXPORTS_PATH}/{{job_id}}/files/{{name:path}}", include_in_schema=False)
    async def export_file(
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.EXPORT))],
        job_id: JobId,
        name: Annotated[str, Path(max_length=1000)],
    ) -> Response:
        """A file of a finished export (audited as an export download, like the API's)."""
        response: FileResponse = await exports_api.download_export_file(ctx, identity, job_id, name)
        for header, value in SECURITY_HEADERS.items():
            response.headers.setdefault(header, value)
        return response


def _running(job: dict[str, Any]) -> bool:
    return job["state"] in (JobState.QUEUED.value, JobState.RUNNING.value)
