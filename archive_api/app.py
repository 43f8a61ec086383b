"""The FastAPI application: `create_app(ctx)` → the search, review and audit service.

Routes live in `archive_api/routes/` under `/api/v1` (docs/api.md lists them by group);
`/healthz`, `/readyz`, `/metrics` and the OpenAPI document (`/openapi.json`, browsable at
`/docs`, served from the package rather than a CDN) are outside it and need no sign-in.

For other routers (the web UI): pass them as `routers=` or call `app.include_router` on the
result. The context is `request.app.state.ctx` (or the `get_context` / `Ctx` dependency),
and `require(permission)` authenticates (Bearer token or the session cookie) and checks
the permission. Errors are JSON `{"error": WORD, "detail": TEXT, ...}` with the status
`archive_api.routes.deps.classify` gives; a router passed in `routers=` with an
`html_errors` attribute (a callable `(request, status, body) -> Response`) has it installed
as `app.state.html_errors`, used for requests outside `/api/` whose client accepts HTML.

The app does not own the store, the audit log or the other parts of the context: whoever
built the context closes them after the server stops. It does own its export jobs, which
are cancelled on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final
from weakref import WeakKeyDictionary

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from archive_api.context import ApiContext
from archive_api.errors import ArchiveApiError, AuthenticationFailed
from archive_api.export_jobs import ExportJobs
from archive_api.routes import access, dashboard, exports, holds, policy, review, search
from archive_api.routes.deps import (
    API_PREFIX,
    Ctx,
    classify,
    error_body,
    get_context,
    require,
)
from archive_api.store.errors import StoreError

__all__ = ["API_PREFIX", "PUBLIC_PATHS", "Ctx", "create_app", "get_context", "require"]

log = logging.getLogger(__name__)

PUBLIC_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})
"""The only routes that need no sign-in (a test holds every other route to a permission)."""

MAX_BODY_BYTES: Final = 8 * 1024 * 1024
"""Largest request body accepted (a policy document is the biggest thing sent)."""

HtmlErrors = Callable[[Request, int, dict[str, Any]], Response]

# --- metrics --------------------------------------------------------------------------------


class _ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "stanzaguard_api_requests",
            "API requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "stanzaguard_api_request_seconds",
            "Time to answer an API request, by route template.",
            ["route"],
            registry=registry,
        )


# One set of collectors per registry: two apps sharing a registry (the default one, or a
# test building several apps) must not register the same names twice.
_METRICS: WeakKeyDictionary[CollectorRegistry, _ApiMetrics] = WeakKeyDictionary()


def _metrics_for(registry: CollectorRegistry) -> _ApiMetrics:
    found = _METRICS.get(registry)
    if found is None:
        found = _METRICS[registry] = _ApiMetrics(registry)
    return found


class _MeasureRequests:
    """Counts and times each HTTP request by its route template (never its raw path, which
    would let callers create unbounded label values)."""

    def __init__(self, app: ASGIApp, ctx: ApiContext) -> None:
        self.app = app
        self.ctx = ctx
        self.metrics = _metrics_for(ctx.metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = self.ctx.clock.monotonic()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = _route_label(scope)
            self.metrics.requests.labels(route, scope.get("method", ""), str(status)).inc()
            self.metrics.seconds.labels(route).observe(
                max(0.0, self.ctx.clock.monotonic() - started)
            )


def _route_label(scope: Scope) -> str:
    """The matched route's template. Routers included under a prefix keep their own route
    objects (with paths relative to the router), so the API's prefix is put back here."""
    template = getattr(scope.get("route"), "path", None)
    if not isinstance(template, str):
        return "unmatched"
    path = str(scope.get("path", ""))
    if path.startswith(API_PREFIX + "/") and not template.startswith(API_PREFIX):
        return API_PREFIX + template
    return template


class _LimitBody:
    """Refuses request bodies over `limit` bytes (413), declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _too_large(send, self.limit)
                return
        seen = 0
        started = False

        async def receiving() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        except _BodyTooLarge:
            if not started:
                await _too_large(send, self.limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Send, limit: int) -> None:
    response = JSONResponse(
        error_body("too-large", f"the request body is larger than {limit} bytes"),
        status_code=413,
    )
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


# --- errors ---------------------------------------------------------------------------------


def _wants_html(request: Request) -> bool:
    handler = getattr(request.app.state, "html_errors", None)
    return (
        handler is not None
        and not request.url.path.startswith("/api/")
        and "text/html" in request.headers.get("accept", "")
    )


def _answer(
    request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    if _wants_html(request):
        handler: HtmlErrors = request.app.state.html_errors
        return handler(request, status, body)
    return JSONResponse(body, status_code=status, headers=headers)


async def _our_error(request: Request, exc: Exception) -> Response:
    shape = classify(exc)
    if shape is None or shape.status >= 500:
        if shape is None or shape.error == "internal":
            log.error("request failed: %s", exc, exc_info=exc)
            return _answer(request, 500, error_body("internal", "internal error"))
        log.warning("request failed (%s): %s", shape.error, exc)
    assert shape is not None
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationFailed) else None
    return _answer(request, shape.status, error_body(shape.error, str(exc), shape.extra), headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {
            "location": [str(part) for part in error.get("loc", ())],
            "message": str(error.get("msg", "")),
            "type": str(error.get("type", "")),
        }
        for error in exc.errors()[:50]
    ]
    first = problems[0] if problems else {"location": [], "message": "invalid request"}
    where = ".".join(first["location"]) or "request"
    return _answer(
        request,
        422,
        error_body("validation", f"{where}: {first['message']}", {"problems": problems}),
    )


_HTTP_WORDS: Final = {
    400: "bad-request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    413: "too-large",
}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    word = _HTTP_WORDS.get(exc.status_code, "error" if exc.status_code < 500 else "internal")
    headers = dict(exc.headers) if exc.headers else None
    return _answer(request, exc.status_code, error_body(word, str(exc.detail)), headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return _answer(request, 500, error_body("internal", "internal error"))


# --- the app --------------------------------------------------------------------------------


def create_app(ctx: ApiContext, *, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The service on `ctx`; `routers` (the web UI's) are included as they are."""
    if ctx.export_jobs is None:
        ctx.export_jobs = ExportJobs(
            ctx.store,
            ctx.clock,
            ctx.config.export_dir,
            max_running=ctx.config.max_export_jobs_running,
        )
    jobs = ctx.export_jobs

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await jobs.close()

    app = FastAPI(
        title=f"{ctx.config.title} search, review and audit API",
        version="1",
        description="Search, review and audit the StanzaGuard archive. Every read of archive "
        "content and every change is recorded in the hash-chained audit log. Authenticate "
        "with `Authorization: Bearer <token>` (`stanzaguard token create`).",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.html_errors = None

    api = APIRouter(prefix=API_PREFIX)
    for module in (search, holds, exports, review, policy, access, dashboard):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(dashboard.health)
    for router in routers:
        app.include_router(router)
        # A router that renders pages (the web UI) brings its own error pages.
        html_errors = getattr(router, "html_errors", None)
        if callable(html_errors):
            app.state.html_errors = html_errors

    app.mount("/docs/static", StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{ctx.config.title} API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon-32x32.png",
        )

    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
        ArchiveApiError: _our_error,
        StoreError: _our_error,
        RequestValidationError: _validation_error,
        StarletteHTTPException: _http_error,
        Exception: _unexpected,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
    app.add_middleware(_LimitBody, limit=MAX_BODY_BYTES)
    app.add_middleware(_MeasureRequests, ctx=ctx)
    return app
