"""Templates, navigation and the headers every page of the web UI carries.

Templates are Jinja2 with autoescaping on for everything: message bodies, JIDs, rule
details and audit parameters are archive content written by strangers, and reach the page
only as escaped text. The one way to put markup in a page is `markupsafe.Markup`, used only
for the dashboard's SVG charts (archive_api/web/charts.py escapes every text in them).

Each response carries a Content-Security-Policy that allows scripts, styles, images and
requests from this service only (`'self'`), no inline script and no eval: even if some
text escaped the escaping, a browser would not run it; and nothing is loaded from
elsewhere. Pages showing archive content are never cached (`no-store`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from archive_api.auth import SESSION_COOKIE, Identity, Permission
from archive_api.routes.deps import get_context
from archive_api.web.csrf import same_origin, session_csrf_token

WEB_PREFIX: Final = "/ui"
SIGN_IN_PATH: Final = f"{WEB_PREFIX}/sign-in"
HOME_PATH: Final = f"{WEB_PREFIX}/dashboard"

CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make Chrome send `Origin: null`
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
HTMX_CONFIG: Final = json.dumps(
    {
        # No inline <style> (the CSP forbids it; style.css has the indicator rules), no eval,
        # no scripts from swapped content, requests to this origin only, and no copies of
        # archive pages in the browser's localStorage.
        "includeIndicatorStyles": False,
        "allowEval": False,
        "allowScriptTags": False,
        "selfRequestsOnly": True,
        "historyCacheSize": 0,
        "refreshOnHistoryMiss": True,
    },
    separators=(",", ":"),
)


@dataclass(frozen=True, slots=True)
class NavItem:
    label: str
    path: str
    permission: Permission


NAVIGATION: Final = (
    NavItem("Dashboard", f"{WEB_PREFIX}/dashboard", Permission.DASHBOARD),
    NavItem("Search", f"{WEB_PREFIX}/search", Permission.SEARCH),
    NavItem("Conversations", f"{WEB_PREFIX}/conversations", Permission.VIEW),
    NavItem("Review", f"{WEB_PREFIX}/review", Permission.REVIEW),
    NavItem("Holds", f"{WEB_PREFIX}/holds", Permission.HOLD_READ),
    NavItem("Exports", f"{WEB_PREFIX}/exports", Permission.EXPORT),
    NavItem("Policy", f"{WEB_PREFIX}/policy", Permission.POLICY_READ),
    NavItem("Audit log", f"{WEB_PREFIX}/audit", Permission.AUDIT_READ),
    NavItem("Verify audit log", f"{WEB_PREFIX}/audit/verify", Permission.AUDIT_VERIFY),
)
"""Every section of the UI and the permission it needs; a role sees only what it may use
(the server still checks every request)."""


def navigation_for(identity: Identity | None) -> tuple[NavItem, ...]:
    if identity is None:
        return ()
    return tuple(item for item in NAVIGATION if identity.can(item.permission))


def active_section(navigation: Sequence[NavItem], path: str) -> str | None:
    """The path of the section a page belongs to (the longest that contains it)."""
    inside = [
        item.path for item in navigation if path == item.path or path.startswith(item.path + "/")
    ]
    return max(inside, key=len, default=None)


# --- filters and helpers the templates use ---------------------------------------------------


def when(value: datetime | str | None) -> str:
    """A time as `2026-01-15 12:00:00 UTC` (from a datetime or an ISO 8601 string)."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        at = value
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def url(path: str, params: Mapping[str, Any] | None = None, **more: Any) -> str:
    """`path` with a query string; None and empty values are left out, lists repeat."""
    merged = {**(params or {}), **more}
    pairs: list[tuple[str, str]] = []
    for key, value in merged.items():
        values = value if isinstance(value, list | tuple) else [value]
        pairs.extend((key, str(v)) for v in values if v is not None and v != "")
    return f"{path}?{urlencode(pairs)}" if pairs else path


def short_hash(value: str | None, length: int = 16) -> str:
    if not value:
        return ""
    return value if len(value) <= length else value[:length] + "…"


def compact_json(value: Any, limit: int = 600) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip(text: str | None, limit: int = 200) -> str:
    if not text:
        return ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_environment() -> Environment:
    env = Environment(
        loader=PackageLoader("archive_api.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, short_hash=short_hash, compact_json=compact_json, clip=clip)
    env.globals.update(url=url, prefix=WEB_PREFIX, Permission=Permission)
    return env


# --- rendering -----------------------------------------------------------------------------


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def csrf_for(request: Request) -> str:
    """The CSRF token for the forms of this page ('' when not signed in)."""
    session = request.cookies.get(SESSION_COOKIE)
    return session_csrf_token(session) if session else ""


def current_identity(request: Request) -> Identity | None:
    found = getattr(request.state, "identity", None)
    return found if isinstance(found, Identity) else None


class Renderer:
    """Renders a template into a response with the UI's headers and shared context."""

    def __init__(self, environment: Environment | None = None) -> None:
        self.env = environment or build_environment()

    def page(
        self,
        request: Request,
        template: str,
        *,
        title: str,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        identity = current_identity(request)
        navigation = navigation_for(identity)
        html = self.env.get_template(template).render(
            request_path=request.url.path,
            active_path=active_section(navigation, request.url.path),
            title=title,
            identity=identity,
            navigation=navigation,
            csrf=csrf_for(request),
            htmx_config=HTMX_CONFIG,
            **context,
        )
        return HTMLResponse(
            html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})}
        )

    def fragment(
        self, request: Request, template: str, *, status: int = 200, **context: Any
    ) -> HTMLResponse:
        """Part of a page, for htmx to swap in (no layout)."""
        identity = current_identity(request)
        html = self.env.get_template(template).render(
            identity=identity, csrf=csrf_for(request), **context
        )
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def secure_cookies(request: Request) -> bool:
    """Cookies get `Secure` unless the service is set up for plain-http development and
    this request did not come over TLS."""
    config = get_context(request).config
    return config.secure_cookies or request.url.scheme == "https"


def forget_session(response: Response, request: Request) -> None:
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        secure=secure_cookies(request),
        httponly=True,
        samesite="strict",
    )


def redirect(location: str, *, status: int = 303) -> RedirectResponse:
    return RedirectResponse(location, status_code=status, headers=SECURITY_HEADERS)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of the UI only (no open redirect)."""
    if (
        not target
        or len(target) > 2000
        or not target.startswith(f"{WEB_PREFIX}/")
        or "\\" in target
        or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in target)
        or target.startswith(SIGN_IN_PATH)
    ):
        return HOME_PATH
    return target


_ERROR_TITLES: Final = {
    400: "That request could not be understood",
    403: "Not allowed",
    404: "Not found",
    405: "Not allowed here",
    409: "Conflict",
    413: "Too large",
    422: "Invalid input",
    503: "Unavailable",
}


class HtmlErrors:
    """`app.state.html_errors`: error answers as pages for browsers (JSON stays for the API).

    401 sends the browser to the sign-in page (and back afterwards); anything else is a
    page saying what went wrong, with the same status.
    """

    def __init__(self, renderer: Renderer) -> None:
        self._renderer = renderer

    def __call__(self, request: Request, status: int, body: dict[str, Any]) -> Response:
        if status == 401:
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            target = url(SIGN_IN_PATH, next=safe_next(back) if request.method == "GET" else None)
            response: Response
            if is_htmx(request):
                # A redirect would be followed inside the XHR and its page swapped into a
                # fragment's place; htmx itself loads the page named by HX-Redirect.
                response = Response(
                    status_code=401, headers={**SECURITY_HEADERS, "HX-Redirect": SIGN_IN_PATH}
                )
            else:
                response = redirect(target)
            if same_origin(request):  # another site must not be able to sign anyone out
                forget_session(response, request)
            return response
        title = _ERROR_TITLES.get(status, "Something went wrong" if status >= 500 else "Error")
        detail = str(body.get("detail", ""))[:2000]
        problems: Sequence[Any] = body.get("problems") or ()
        return self._renderer.page(
            request,
            "error.html",
            title=title,
            status=status,
            status_code=status,
            error=str(body.get("error", "")),
            detail=detail,
            problems=problems[:20],
        )
