"""Signing in and out, the UI's static files, and the way in (`/`, `/ui/`).

Sign-in takes an API token (docs/api.md): `Authenticator.sign_in` checks it and makes the
session value, which goes into the `stanzaguard_session` cookie (HttpOnly,
SameSite=Strict, Secure unless the service is configured for plain-http development and
not reached over TLS). Every sign-in, refused ones included, and every sign-out is
recorded in the audit log (`login`, `logout`); the token itself never is, nor is it echoed.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Annotated, Final

from fastapi import APIRouter, Form, Query, Request
from starlette.responses import Response

from archive_api.audit import ANONYMOUS, AuditAction, AuditOutcome
from archive_api.auth import MAX_CREDENTIAL_CHARS, SESSION_COOKIE
from archive_api.errors import AuthConfigError, AuthenticationFailed
from archive_api.routes.deps import authenticate, get_context
from archive_api.web.csrf import (
    CSRF_FIELD,
    MAX_TOKEN_CHARS,
    SIGN_IN_COOKIE,
    SIGN_IN_COOKIE_MAX_AGE,
    check_session_csrf,
    new_sign_in_nonce,
    same_origin,
    tokens_match,
)
from archive_api.web.rendering import (
    HOME_PATH,
    SECURITY_HEADERS,
    SIGN_IN_PATH,
    WEB_PREFIX,
    Renderer,
    forget_session,
    redirect,
    safe_next,
    secure_cookies,
)

STATIC_FILES: Final = {
    "htmx.min.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
"""The only files served under /ui/static (names are looked up here, never used as paths)."""


def _load_static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("archive_api.web").joinpath("static")
    loaded = {}
    for name in STATIC_FILES:
        data = folder.joinpath(name).read_bytes()
        loaded[name] = (data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"')
    return loaded


def add_session_routes(router: APIRouter, renderer: Renderer) -> None:
    static = _load_static()

    @router.get("/", include_in_schema=False)
    async def root() -> Response:
        return redirect(HOME_PATH)

    @router.get(WEB_PREFIX, include_in_schema=False)
    @router.get(f"{WEB_PREFIX}/", include_in_schema=False)
    async def home() -> Response:
        return redirect(HOME_PATH)

    @router.get(f"{WEB_PREFIX}/static/{{name}}", include_in_schema=False)
    async def static_file(request: Request, name: str) -> Response:
        found = static.get(name)
        if found is None:
            return Response("not found", status_code=404, media_type="text/plain")
        data, etag = found
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=STATIC_FILES[name], headers=headers)

    def sign_in_form(
        request: Request,
        *,
        next_path: str,
        error: str | None = None,
        status: int = 200,
    ) -> Response:
        nonce = new_sign_in_nonce()
        response = renderer.page(
            request,
            "sign_in.html",
            title="Sign in",
            status=status,
            nonce=nonce,
            next_path=next_path,
            error=error,
        )
        response.set_cookie(
            SIGN_IN_COOKIE,
            nonce,
            max_age=SIGN_IN_COOKIE_MAX_AGE,
            path=SIGN_IN_PATH,
            httponly=True,
            samesite="strict",
            secure=secure_cookies(request),
        )
        return response

    @router.get(SIGN_IN_PATH, include_in_schema=False)
    async def sign_in_page(
        request: Request,
        next_path: Annotated[str | None, Query(alias="next", max_length=2000)] = None,
    ) -> Response:
        target = safe_next(next_path)
        if request.cookies.get(SESSION_COOKIE):
            try:
                await authenticate(request)
            except (AuthenticationFailed, AuthConfigError):
                pass  # not (or no longer) signed in: show the form
            else:
                return redirect(target)
        return sign_in_form(request, next_path=target)

    @router.post(SIGN_IN_PATH, include_in_schema=False)
    async def sign_in(
        request: Request,
        token: Annotated[str, Form(max_length=MAX_CREDENTIAL_CHARS * 2)] = "",
        csrf_token: Annotated[str, Form(alias=CSRF_FIELD, max_length=MAX_TOKEN_CHARS)] = "",
        next_path: Annotated[str, Form(alias="next", max_length=2000)] = "",
    ) -> Response:
        ctx = get_context(request)
        target = safe_next(next_path)
        nonce = request.cookies.get(SIGN_IN_COOKIE, "")
        if not same_origin(request) or not tokens_match(nonce, csrf_token):
            return sign_in_form(
                request,
                next_path=target,
                error="The sign-in form expired or did not come from this service; "
                "please try again.",
                status=403,
            )
        try:
            identity, session = await ctx.authenticator.sign_in(token.strip())
        except AuthenticationFailed as exc:
            params = {"method": "session", "reason": exc.reason, "token_name": exc.token_name}
            await ctx.audit.record(
                ANONYMOUS, AuditAction.LOGIN, params, outcome=AuditOutcome.DENIED
            )
            return sign_in_form(request, next_path=target, error=str(exc), status=401)
        except AuthConfigError:
            return sign_in_form(
                request,
                next_path=target,
                error="Signing in to the web UI is not enabled on this service "
                "(no session secret is configured).",
                status=503,
            )
        await ctx.audit.record(
            identity.actor,
            AuditAction.LOGIN,
            {"method": "session", "token_name": identity.token_name},
            result_count=1,
        )
        response = redirect(target)
        response.set_cookie(
            SESSION_COOKIE,
            session,
            max_age=int(ctx.config.session_max_age.total_seconds()),
            path="/",
            httponly=True,
            samesite="strict",
            secure=secure_cookies(request),
        )
        response.delete_cookie(
            SIGN_IN_COOKIE,
            path=SIGN_IN_PATH,
            secure=secure_cookies(request),
            httponly=True,
            samesite="strict",
        )
        return response

    @router.post(f"{WEB_PREFIX}/sign-out", include_in_schema=False)
    async def sign_out(request: Request) -> Response:
        ctx = get_context(request)
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            await check_session_csrf(request, session)
            try:
                identity = await authenticate(request)
            except (AuthenticationFailed, AuthConfigError):
                pass  # an expired or revoked session: just forget the cookie
            else:
                await ctx.audit.record(
                    identity.actor, AuditAction.LOGOUT, {"method": "session"}, result_count=1
                )
        response = redirect(SIGN_IN_PATH)
        forget_session(response, request)
        return response
