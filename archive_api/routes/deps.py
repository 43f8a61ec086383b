"""What every route shares: the context, who is asking, what they may do, errors, auditing.

- `get_context` / `Ctx`: the `ApiContext` the app was built with (`request.app.state.ctx`).
- `require(permission)`: a dependency that authenticates the caller (a Bearer token, or the
  web UI's session cookie) and checks the one permission the route declares; it answers
  401 or 403 and returns the `Identity`. A refused caller of an audited permission is
  itself audited (outcome `denied`).
- `audited(...)`: wraps the work of a route that reads archive content or changes anything,
  and appends its audit event (actor, action, parameters, result count) before the route
  returns; a failed attempt is recorded with outcome `invalid` or `failed`. If the event
  cannot be recorded the request fails (`AuditError` → 503): nothing is answered unaudited.
- `classify(exc)`: the one table from our exceptions to HTTP status and error word, used by
  the app's exception handlers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

from fastapi import Depends, Request

from archive_api.audit import AuditAction, AuditOutcome
from archive_api.auth import SESSION_COOKIE, Identity, Permission, check
from archive_api.context import ApiContext, PolicyConflict, PolicyInvalid, ReviewUnavailable
from archive_api.errors import (
    ArchiveApiError,
    AuditError,
    AuthConfigError,
    AuthenticationFailed,
    ExportError,
    HoldAlreadyReleased,
    InvalidInput,
    NotPermitted,
    UnknownHold,
)
from archive_api.export_jobs import ExportNotReady, UnknownExport
from archive_api.store.errors import (
    AlreadyExists,
    InvalidCursor,
    InvalidRequest,
    NotFound,
    QuerySyntaxError,
    StoreError,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

API_PREFIX: Final = "/api/v1"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


def get_context(request: Request) -> ApiContext:
    ctx = request.app.state.ctx
    assert isinstance(ctx, ApiContext)
    return ctx


Ctx = Annotated[ApiContext, Depends(get_context)]


# --- errors -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorShape:
    status: int
    error: str  # a short machine-readable word
    extra: Mapping[str, Any] = field(default_factory=dict)


def classify(exc: BaseException) -> ErrorShape | None:
    """The HTTP answer for one of our exceptions; None for anything else (a bug: 500)."""
    match exc:
        case AuthenticationFailed():
            return ErrorShape(401, "unauthenticated", {"reason": exc.reason})
        case NotPermitted():
            return ErrorShape(403, "forbidden")
        case QuerySyntaxError():
            return ErrorShape(400, "query-syntax", {"position": exc.position})
        case InvalidCursor():
            return ErrorShape(400, "bad-cursor")
        case AlreadyExists():
            return ErrorShape(409, "already-exists")
        case InvalidRequest() | InvalidInput():
            return ErrorShape(400, "invalid-request")
        case NotFound() | UnknownHold() | UnknownExport():
            return ErrorShape(404, "not-found")
        case HoldAlreadyReleased():
            return ErrorShape(409, "already-released")
        case ExportNotReady():
            return ErrorShape(409, "export-not-ready")
        case PolicyInvalid():
            return ErrorShape(
                422, "invalid-policy", {"problems": [p.to_json() for p in exc.problems]}
            )
        case PolicyConflict():
            return ErrorShape(409, "policy-conflict")
        case AuditError():
            return ErrorShape(503, "audit-unavailable")
        case StoreUnavailable():
            return ErrorShape(503, "store-unavailable")
        case ReviewUnavailable():
            return ErrorShape(503, "review-unavailable")
        case ExportError():
            return ErrorShape(503, "export-unavailable")
        case AuthConfigError():
            return ErrorShape(503, "misconfigured")
        case StoreError() | ArchiveApiError():
            return ErrorShape(500, "internal")
    return None


def error_body(error: str, detail: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"error": error, "detail": detail, **(extra or {})}


# --- who is asking ------------------------------------------------------------------------


def _same_origin(request: Request) -> bool:
    """A cookie-authenticated change must come from a page of this service: browsers send
    Origin with every cross-site POST/PUT/DELETE, and SameSite=Strict keeps the cookie off
    most of them anyway."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    host = request.headers.get("host", "")
    return bool(parts.netloc) and parts.netloc.lower() == host.lower()


async def authenticate(request: Request) -> Identity:
    """The caller's identity from `Authorization: Bearer ...`, else the session cookie."""
    cached = getattr(request.state, "identity", None)
    if isinstance(cached, Identity):
        return cached
    ctx = get_context(request)
    header = request.headers.get("authorization")
    if header is not None:
        identity = await ctx.authenticator.authenticate_header(header)
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            raise AuthenticationFailed(
                "missing", "no API token (Authorization: Bearer <token>) and not signed in"
            )
        try:
            identity = await ctx.authenticator.authenticate_session(cookie)
        except AuthConfigError:
            raise AuthenticationFailed(
                "session-invalid", "sign-in sessions are not enabled on this service"
            ) from None
        if request.method not in SAFE_METHODS and not _same_origin(request):
            raise AuthenticationFailed(
                "session-invalid", "a signed-in change must come from this service's own pages"
            )
    request.state.identity = identity
    return identity


# Refusals of these permissions are audited under the action the route would have done.
DENIAL_ACTIONS: Final[Mapping[Permission, AuditAction]] = {
    Permission.SEARCH: AuditAction.SEARCH,
    Permission.VIEW: AuditAction.VIEW,
    Permission.EXPORT: AuditAction.EXPORT,
    Permission.HOLD_CREATE: AuditAction.HOLD,
    Permission.HOLD_RELEASE: AuditAction.HOLD_RELEASE,
    Permission.POLICY_WRITE: AuditAction.POLICY_CHANGE,
    Permission.AUDIT_READ: AuditAction.AUDIT_READ,
    Permission.AUDIT_VERIFY: AuditAction.AUDIT_VERIFY,
}


class Require:
    """The dependency `require(permission)` makes; `permission` is what the route needs
    (tests read it from each route's dependencies)."""

    def __init__(self, permission: Permission) -> None:
        self.permission = permission

    async def __call__(self, request: Request) -> Identity:
        identity = await authenticate(request)
        if not identity.can(self.permission):
            action = DENIAL_ACTIONS.get(self.permission)
            if action is not None:
                await get_context(request).audit.record(
                    identity.actor,
                    action,
                    {
                        "method": request.method,
                        "path": request.url.path[:500],
                        "permission": self.permission.value,
                    },
                    outcome=AuditOutcome.DENIED,
                )
            check(identity, self.permission)
        return identity


def require(permission: Permission) -> Require:
    return Require(permission)


def route_permission(dependencies: Any) -> list[Permission]:
    """The permissions a route's dependency tree requires (FastAPI `Dependant`s)."""
    found: list[Permission] = []
    for dependant in dependencies:
        if isinstance(dependant.call, Require):
            found.append(dependant.call.permission)
        found.extend(route_permission(dependant.dependencies))
    return found


# --- auditing -----------------------------------------------------------------------------


@dataclass
class AuditNote:
    """What a route fills in while it works: the result count and any parameters it learns
    (the canonical query, a new hold's id)."""

    params: dict[str, Any]
    count: int | None = None
    outcome: AuditOutcome = AuditOutcome.OK


@asynccontextmanager
async def audited(
    ctx: ApiContext, identity: Identity, action: AuditAction, params: Mapping[str, Any]
) -> AsyncIterator[AuditNote]:
    """Run a route's work and record it. On success the event is written before the route
    returns (AuditError, a 503, if it cannot be); a refused or failed attempt is recorded
    with its outcome and the error re-raised."""
    note = AuditNote(dict(params))
    try:
        yield note
    except Exception as exc:
        shape = classify(exc)
        status = shape.status if shape is not None else 500
        if status in (401, 403):
            outcome = AuditOutcome.DENIED
        elif status < 500:
            outcome = AuditOutcome.INVALID
        else:
            outcome = AuditOutcome.FAILED
        failed = {**note.params, "error": shape.error if shape else "internal"}
        try:
            await ctx.audit.record(identity.actor, action, failed, outcome=outcome)
        except AuditError:
            if status < 500:
                raise  # the refusal cannot be recorded: answer 503, not the 4xx
            log.error("audit: could not record a failed %s", action.value)
        raise
    await ctx.audit.record(
        identity.actor, action, note.params, result_count=note.count, outcome=note.outcome
    )
