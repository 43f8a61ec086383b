"""Who may open a page: the API's own `require(permission)`, plus what browsers need.

`page(permission)` is a `Require` (so the test that holds every route to one permission
sees the UI's routes too) that also

- asks htmx to send the browser to the sign-in page when a session has ended (a plain
  401 would leave the half-updated page as it is), and
- checks the CSRF token of every state-changing request (archive_api/web/csrf.py) before
  the permission, so a forged request is refused without leaving a trace in the audit log
  under the victim's name.
"""

from __future__ import annotations

from typing import Final

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from archive_api.auth import SESSION_COOKIE, Identity, Permission
from archive_api.errors import AuthenticationFailed
from archive_api.routes.deps import SAFE_METHODS, Require, authenticate
from archive_api.web.csrf import check_session_csrf
from archive_api.web.rendering import SIGN_IN_PATH, is_htmx

HX_REDIRECT: Final = "HX-Redirect"


class PageAccess(Require):
    """`require(permission)` for pages; `csrf` for routes that change something."""

    def __init__(self, permission: Permission, *, csrf: bool = False) -> None:
        super().__init__(permission)
        self.csrf = csrf

    async def __call__(self, request: Request) -> Identity:
        try:
            await authenticate(request)
        except AuthenticationFailed as exc:
            if is_htmx(request):
                raise StarletteHTTPException(
                    401, str(exc), headers={HX_REDIRECT: SIGN_IN_PATH}
                ) from None
            raise
        if self.csrf and request.method not in SAFE_METHODS:
            await check_session_csrf(request, request.cookies.get(SESSION_COOKIE))
        return await super().__call__(request)


def page(permission: Permission) -> PageAccess:
    """A page that shows something (GET)."""
    return PageAccess(permission)


def action(permission: Permission) -> PageAccess:
    """A form that changes something (POST): CSRF-checked."""
    return PageAccess(permission, csrf=True)
