"""Review queues, the policy editor and the audit log.

As everywhere in the UI, each page calls the JSON API's route function for the same
thing, so permissions, validation and audit events are the API's; these handlers turn
forms into the API's request models and its answers into pages (or, for htmx, into the
part of the page that changed).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from archive_api.auth import Identity, Permission
from archive_api.context import DEFAULT_PAGE_SIZE, PolicyConflict, PolicyInvalid
from archive_api.errors import InvalidInput
from archive_api.routes import access as access_api
from archive_api.routes import policy as policy_api
from archive_api.routes import review as review_api
from archive_api.routes.deps import Ctx
from archive_api.routes.policy import MAX_POLICY_TEXT, PolicyTextIn, PolicyWriteIn
from archive_api.routes.search import Cursor, RecordId
from archive_api.store.audit import MAX_ACTION_CHARS, MAX_ACTOR_CHARS
from archive_api.store.errors import InvalidCursor, InvalidRequest, NotFound
from archive_api.web.access import action, page
from archive_api.web.case_pages import problem_text
from archive_api.web.rendering import WEB_PREFIX, Renderer, is_htmx, redirect, url

REVIEW_PATH: Final = f"{WEB_PREFIX}/review"
POLICY_PATH: Final = f"{WEB_PREFIX}/policy"
AUDIT_PATH: Final = f"{WEB_PREFIX}/audit"
EXCERPT_CHARS: Final = 240

Queue = Literal["quarantine", "flagged"]
Decision = Literal["release", "confirm-spam", "not-spam"]
DECISION_LABELS: Final = {
    "release": "Released",
    "confirm-spam": "Confirmed as spam",
    "not-spam": "Cleared as not spam",
}


def located_problems(problems: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Each problem with the line it points at, split around its column, for display."""
    lines = text.split("\n")
    out = []
    for problem in problems:
        item = dict(problem)
        line, column = problem.get("line"), problem.get("column")
        if isinstance(line, int) and 1 <= line <= len(lines):
            source = lines[line - 1].rstrip("\r")[:EXCERPT_CHARS]
            col = column - 1 if isinstance(column, int) and column >= 1 else 0
            col = min(col, len(source))
            item["excerpt"] = {
                "before": source[:col],
                "at": source[col : col + 1] or " ",
                "after": source[col + 1 :],
            }
        out.append(item)
    return out


def _day(value: str | None, what: str) -> datetime | None:
    if not value:
        return None
    try:
        day = date.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(f"{what}: {value[:40]!r} is not a date (YYYY-MM-DD)") from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def add_control_routes(router: APIRouter, renderer: Renderer) -> None:
    # --- review -------------------------------------------------------------------------

    async def review_view(
        request: Request,
        ctx: Ctx,
        identity: Identity,
        queue: Queue,
        cursor: str | None,
        *,
        notice: str | None = None,
        error: str | None = None,
        status: int = 200,
    ) -> Response:
        data: dict[str, Any] | None = None
        try:
            if queue == "quarantine":
                data = await review_api.quarantine_queue(
                    ctx, identity, cursor=cursor, limit=DEFAULT_PAGE_SIZE, include_decided=False
                )
            else:
                data = await review_api.flagged_queue(
                    ctx, identity, cursor=cursor, limit=DEFAULT_PAGE_SIZE
                )
        except (InvalidCursor, InvalidRequest) as exc:
            error, status = str(exc), 400
        more = None
        if data is not None and data["next_cursor"]:
            more = url(REVIEW_PATH, queue=queue, cursor=data["next_cursor"])
        return renderer.page(
            request,
            "review.html",
            title="Review: quarantined" if queue == "quarantine" else "Review: flagged",
            status=status,
            queue=queue,
            data=data,
            more=more,
            notice=notice,
            error=error,
        )

    @router.get(REVIEW_PATH, include_in_schema=False)
    async def review_page(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.REVIEW))],
        queue: Annotated[Queue, Query()] = "quarantine",
        cursor: Cursor = None,
    ) -> Response:
        return await review_view(request, ctx, identity, queue, cursor)

    @router.post(f"{REVIEW_PATH}/{{record_id}}/{{decision}}", include_in_schema=False)
    async def decide(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(action(Permission.REVIEW))],
        record_id: RecordId,
        decision: Annotated[Decision, Path()],
        queue: Annotated[Queue, Form()] = "quarantine",
    ) -> Response:
        handlers = {
            "release": review_api.release,
            "confirm-spam": review_api.confirm_spam,
            "not-spam": review_api.not_spam,
        }
        try:
            answer: JSONResponse = await handlers[decision](ctx, identity, record_id)
            body = json.loads(bytes(answer.body))
            ok = answer.status_code < 300
            outcome = body if ok else body.get("outcome") or {"detail": body.get("detail", "")}
            detail = str(outcome.get("detail", ""))
        except NotFound as exc:
            ok, outcome, detail = False, {}, str(exc)
        queued = bool(outcome.get("queued"))
        label = DECISION_LABELS[decision]
        if ok:
            message = f"{label}: {detail}" + (
                " (waiting for the proxy to apply it)" if queued else ""
            )
        else:
            message = f"Refused: {detail}"
        if is_htmx(request):
            return renderer.fragment(
                request,
                "review_done.html",
                ok=ok,
                message=message,
                record_id=record_id,
                record_status=outcome.get("status"),
            )
        return await review_view(
            request,
            ctx,
            identity,
            queue,
            None,
            notice=message if ok else None,
            error=None if ok else message,
            status=200 if ok else 409,
        )

    # --- policy -------------------------------------------------------------------------

    async def policy_view(
        request: Request,
        ctx: Ctx,
        identity: Identity,
        *,
        text: str | None = None,
        base_version: int | None = None,
        comment: str = "",
        problems: list[dict[str, Any]] | None = None,
        valid: bool | None = None,
        notice: str | None = None,
        error: str | None = None,
        shown_version: dict[str, Any] | None = None,
        status: int = 200,
    ) -> Response:
        current = await policy_api.get_policy(ctx, identity)
        versions = (await policy_api.policy_versions(ctx, identity))["versions"]
        return renderer.page(
            request,
            "policy.html",
            title="Policy",
            status=status,
            current=current,
            text=current["text"] if text is None else text,
            base_version=current["version"] if text is None else base_version,
            comment=comment,
            versions=list(reversed(versions)),
            problems=problems,
            valid=valid,
            notice=notice,
            error=error,
            shown_version=shown_version,
            can_write=identity.can(Permission.POLICY_WRITE) and current["editable"],
        )

    @router.get(POLICY_PATH, include_in_schema=False)
    async def policy_page(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.POLICY_READ))],
        version: Annotated[int | None, Query(ge=1, le=10**9)] = None,
        saved: Annotated[int | None, Query(ge=1, le=10**9)] = None,
    ) -> Response:
        shown = None
        if version is not None:
            shown = await policy_api.policy_version(ctx, identity, version)
        notice = f"Saved as version {saved}; running proxies pick it up." if saved else None
        return await policy_view(request, ctx, identity, notice=notice, shown_version=shown)

    def _normalise(text: str) -> str:
        # Browsers send a textarea's line breaks as CRLF; keep the document's own LF.
        return text.replace("\r\n", "\n")

    @router.post(f"{POLICY_PATH}/validate", include_in_schema=False)
    async def validate_policy(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(action(Permission.POLICY_READ))],
        text: Annotated[str, Form(max_length=MAX_POLICY_TEXT)] = "",
        base_version: Annotated[str, Form(max_length=12)] = "",
        comment: Annotated[str, Form(max_length=2000)] = "",
    ) -> Response:
        text = _normalise(text)
        answer = await policy_api.validate_policy(ctx, identity, PolicyTextIn(text=text))
        problems = located_problems(answer["problems"], text)
        if is_htmx(request):
            return renderer.fragment(
                request, "policy_result.html", valid=answer["valid"], problems=problems
            )
        return await policy_view(
            request,
            ctx,
            identity,
            text=text,
            base_version=int(base_version) if base_version.isdigit() else None,
            comment=comment,
            problems=problems,
            valid=answer["valid"],
        )

    @router.post(POLICY_PATH, include_in_schema=False)
    async def save_policy(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(action(Permission.POLICY_WRITE))],
        text: Annotated[str, Form(max_length=MAX_POLICY_TEXT)] = "",
        base_version: Annotated[str, Form(max_length=12)] = "",
        comment: Annotated[str, Form(max_length=2000)] = "",
    ) -> Response:
        text = _normalise(text)
        base = int(base_version) if base_version.isdigit() else None
        try:
            given = PolicyWriteIn(text=text, base_version=base, comment=comment.strip() or None)
            version = await policy_api.put_policy(ctx, identity, given)
        except PolicyInvalid as exc:
            problems = located_problems([p.to_json() for p in exc.problems], text)
            return await policy_view(
                request,
                ctx,
                identity,
                text=text,
                base_version=base,
                comment=comment,
                problems=problems,
                valid=False,
                status=422,
            )
        except (PolicyConflict, ValidationError) as exc:
            return await policy_view(
                request,
                ctx,
                identity,
                text=text,
                base_version=base,
                comment=comment,
                error=problem_text(exc),
                status=409 if isinstance(exc, PolicyConflict) else 400,
            )
        return redirect(url(POLICY_PATH, saved=version["version"]))

    # --- audit log ----------------------------------------------------------------------

    @router.get(AUDIT_PATH, include_in_schema=False)
    async def audit_page(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.AUDIT_READ))],
        actor: Annotated[str | None, Query(max_length=MAX_ACTOR_CHARS)] = None,
        audit_action: Annotated[
            str | None, Query(alias="action", max_length=MAX_ACTION_CHARS)
        ] = None,
        since: Annotated[str | None, Query(max_length=10)] = None,
        until: Annotated[str | None, Query(max_length=10)] = None,
        cursor: Cursor = None,
    ) -> Response:
        filters = {
            "actor": (actor or "").strip(),
            "action": (audit_action or "").strip(),
            "since": (since or "").strip(),
            "until": (until or "").strip(),
        }
        data: dict[str, Any] | None = None
        error = None
        try:
            data = await access_api.audit_events(
                ctx,
                identity,
                actor=filters["actor"] or None,
                action=filters["action"] or None,
                since=_day(filters["since"], "since"),
                until=_day(filters["until"], "until"),
                cursor=cursor,
                limit=DEFAULT_PAGE_SIZE,
                oldest_first=False,
            )
        except (InvalidInput, InvalidRequest, InvalidCursor) as exc:
            error = str(exc)
        more = None
        if data is not None and data["next_cursor"]:
            more = url(AUDIT_PATH, filters, cursor=data["next_cursor"])
        return renderer.page(
            request,
            "audit.html",
            title="Audit log",
            status=400 if error else 200,
            filters=filters,
            data=data,
            more=more,
            error=error,
            can_verify=identity.can(Permission.AUDIT_VERIFY),
        )

    @router.get(f"{AUDIT_PATH}/verify", include_in_schema=False)
    async def audit_verify(
        request: Request,
        ctx: Ctx,
        identity: Annotated[Identity, Depends(page(Permission.AUDIT_VERIFY))],
        run: Annotated[bool, Query()] = False,
    ) -> Response:
        """The verification page; with `run`, verify now (a full read of the log, audited)."""
        report = await access_api.audit_verify(ctx, identity) if run else None
        if is_htmx(request):
            return renderer.fragment(request, "audit_verify_result.html", report=report)
        return renderer.page(
            request, "audit_verify.html", title="Verify the audit log", report=report
        )
