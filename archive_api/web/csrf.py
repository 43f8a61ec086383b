"""Cross-site request forgery protection for the web UI's forms.

Every state-changing request of the UI (POST) must carry a token the attacker's page cannot
know, in the form field `csrf_token` or, for htmx requests, the `X-CSRF-Token` header (set
for every htmx request by the `hx-headers` attribute on `<body>`).

- Signed in: the token is HMAC-SHA256 keyed with the session cookie's value. The cookie is
  HttpOnly, so no script can read it, and it carries a 256-bit MAC no one else can make;
  the token changes with every sign-in and needs no state on the server, so it works
  across processes and restarts. The token cannot be turned back into the cookie.
- Signing in (no session yet): a random nonce in a short-lived HttpOnly, SameSite=Strict
  cookie, repeated in the form (double submit), so a forged sign-in (login CSRF, which
  would sign the victim in as the attacker) is refused.

These come on top of the session cookie's SameSite=Strict and the API's check that a
cookie-authenticated change carries this service's own Origin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final
from urllib.parse import urlsplit

from starlette.requests import Request

from archive_api.errors import NotPermitted

CSRF_FIELD: Final = "csrf_token"
CSRF_HEADER: Final = "X-CSRF-Token"
SIGN_IN_COOKIE: Final = "stanzaguard_signin"
"""Holds the sign-in form's nonce until the form is sent (HttpOnly, SameSite=Strict)."""
SIGN_IN_COOKIE_MAX_AGE: Final = 3600
MAX_TOKEN_CHARS: Final = 200
_CONTEXT: Final = b"stanzaguard-web-csrf-v1"


class CsrfRejected(NotPermitted):
    """A form or htmx request without the right CSRF token (HTTP 403)."""


def session_csrf_token(session_value: str) -> str:
    """The CSRF token of a signed-in session (deterministic per session cookie value)."""
    mac = hmac.new(session_value.encode("utf-8", "replace"), _CONTEXT, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def new_sign_in_nonce() -> str:
    return secrets.token_urlsafe(32)


def tokens_match(expected: str, given: str | None) -> bool:
    """Constant-time comparison; anything missing, oversized or not ASCII fails."""
    if not expected or not given or len(given) > MAX_TOKEN_CHARS or not given.isascii():
        return False
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii"))


async def submitted_token(request: Request) -> str | None:
    """The token a request carries: the header, else the form field."""
    header = request.headers.get(CSRF_HEADER)
    if header is not None:
        return header
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        return None
    form = await request.form()  # Starlette keeps it, so Form() parameters still see it
    value = form.get(CSRF_FIELD)
    return value if isinstance(value, str) else None


async def check_session_csrf(request: Request, session_value: str | None) -> None:
    """Refuse (CsrfRejected) a state-changing request without this session's token."""
    given = await submitted_token(request)
    if session_value is None or not tokens_match(session_csrf_token(session_value), given):
        raise CsrfRejected(
            "the form is out of date or did not come from this service; reload the page "
            "and try again"
        )


def same_origin(request: Request) -> bool:
    """True unless the browser says the request came from another origin (Origin header)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return bool(parts.netloc) and parts.netloc.lower() == request.headers.get("host", "").lower()
