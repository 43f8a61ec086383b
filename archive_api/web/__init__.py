"""The officers' web UI: server-rendered pages (Jinja2) with htmx, under /ui.

`build_web_router()` gives a router for `create_app(ctx, routers=[...])` to include, and
`router` is one built on import (what `stanzaguard.api_wiring` looks for). It carries
`html_errors`, the handler `create_app` installs to answer errors of non-API requests from
browsers as pages (`app.state.html_errors`). Everything the pages load (htmx, the style sheet) is
served by the router itself from the package: nothing comes from another origin.

Pages (docs/ui.md): sign-in and sign-out, dashboard, search, message, conversation,
review queues, legal holds, exports, policy editor, audit log and its verification.
Each page requires the permission of the API route it mirrors and calls that route's
function, so checks and audit events are the API's own.
"""

from __future__ import annotations

from fastapi import APIRouter

from archive_api.web.archive_pages import add_archive_routes
from archive_api.web.case_pages import add_case_routes
from archive_api.web.control_pages import add_control_routes
from archive_api.web.rendering import WEB_PREFIX, HtmlErrors, Renderer
from archive_api.web.session_pages import add_session_routes

__all__ = ["WEB_PREFIX", "HtmlErrors", "WebRouter", "build_web_router", "router"]


class WebRouter(APIRouter):
    """An APIRouter that also knows how to answer errors as HTML pages."""

    def __init__(self, renderer: Renderer) -> None:
        super().__init__(tags=["web UI"], include_in_schema=False)
        self.renderer = renderer
        self.html_errors = HtmlErrors(renderer)


def build_web_router() -> WebRouter:
    """The web UI's routes, with a fresh template environment."""
    renderer = Renderer()
    router = WebRouter(renderer)
    add_session_routes(router, renderer)
    add_archive_routes(router, renderer)
    add_case_routes(router, renderer)
    add_control_routes(router, renderer)
    return router


router: WebRouter = build_web_router()
"""The UI's router for the service (templates and static files are read from the package;
nothing is opened or connected)."""
