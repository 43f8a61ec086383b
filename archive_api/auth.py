"""Who may do what: roles, permissions, API tokens and the web UI's session cookie.

Framework-free: the FastAPI glue calls `Authenticator.authenticate_header` (API) or
`authenticate_session` (UI) to get an `Identity`, then `check(identity, permission)` with
the permission its route declares; both raise typed errors (`AuthenticationFailed` → 401,
`PermissionDenied` → 403, both in `archive_api.errors`).

Roles and permissions (the only place they are decided; docs/api.md has the same table):

=================  =====  =======  =======
permission         admin  officer  auditor
=================  =====  =======  =======
search             yes    yes
view               yes    yes
export             yes    yes
hold.read          yes    yes
hold.create        yes    yes
hold.release       yes
review             yes    yes
policy.read        yes
policy.write       yes
audit.read                         yes
audit.verify       yes             yes
tokens.manage      yes
dashboard          yes    yes      yes
=================  =====  =======  =======

Admins run the service but do not read the audit log: it records what admins do, and
separating the two duties is what makes it worth reading. They can still verify it.

API tokens: `sg_` followed by 43 URL-safe characters (32 random bytes). The prefix lets
secret scanners and people recognise one; only its SHA-256 is stored. Names are unique
forever and an identity made from a token has the subject ``token:NAME``.

Sessions: after signing in with a token, the UI keeps a cookie naming that token, signed
with HMAC-SHA256 under a key derived from the `session_secret` setting and expiring after
`max_age`. Each request re-checks the token, so revoking it ends its sessions at once.
OIDC sign-in can be added as another way to make an `Identity` (method `oidc`, subject
``oidc:ISSUER#SUB``, role mapped from a claim) put in the same cookie; such sessions carry
their role and last until they expire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from archive_api.audit import Actor, AuditAction, AuditLog, AuditOutcome
from archive_api.errors import AuthConfigError, AuthenticationFailed, PermissionDenied
from archive_api.store.base import TokenStore
from archive_api.store.errors import InvalidRequest, NotFound
from archive_api.store.tokens import StoredToken, check_token_name
from classifier.clock import Clock

# --- roles and permissions ---------------------------------------------------------------------


class Role(StrEnum):
    ADMIN = "admin"
    OFFICER = "officer"
    AUDITOR = "auditor"


class Permission(StrEnum):
    """What a route may require. Each route declares exactly one."""

    SEARCH = "search"
    VIEW = "view"  # a message, a conversation, an attachment
    EXPORT = "export"
    HOLD_READ = "hold.read"
    HOLD_CREATE = "hold.create"
    HOLD_RELEASE = "hold.release"
    REVIEW = "review"  # review queues: release, confirm-spam, not-spam, labels
    POLICY_READ = "policy.read"
    POLICY_WRITE = "policy.write"  # policy and retention classes
    AUDIT_READ = "audit.read"
    AUDIT_VERIFY = "audit.verify"
    TOKENS_MANAGE = "tokens.manage"
    DASHBOARD = "dashboard"


def _role_table() -> Mapping[Role, frozenset[Permission]]:
    p = Permission
    return MappingProxyType(
        {
            Role.ADMIN: frozenset(Permission) - {p.AUDIT_READ},
            Role.OFFICER: frozenset(
                {p.SEARCH, p.VIEW, p.EXPORT, p.HOLD_READ, p.HOLD_CREATE, p.REVIEW, p.DASHBOARD}
            ),
            Role.AUDITOR: frozenset({p.AUDIT_READ, p.AUDIT_VERIFY, p.DASHBOARD}),
        }
    )


ROLE_PERMISSIONS: Final = _role_table()
"""role -> the permissions it grants; the table in the module notes and docs/api.md."""


def allowed(role: Role, permission: Permission) -> bool:
    return permission in ROLE_PERMISSIONS[role]


class AuthMethod(StrEnum):
    TOKEN = "token"  # noqa: S105 (an API token in the Authorization header)
    SESSION = "session"  # the UI's cookie, made by signing in with a token
    OIDC = "oidc"  # reserved: OpenID Connect sign-in
    CLI = "cli"  # the stanzaguard command on the server itself


@dataclass(frozen=True, slots=True)
class Identity:
    """Someone signed in: the same shape whatever the way in (token, session, OIDC, CLI).

    `subject` is stable and namespaced by method (``token:NAME``, ``cli:USER``,
    ``oidc:ISSUER#SUB``); it is what the audit log records as the actor.
    """

    subject: str
    display_name: str
    role: Role
    method: AuthMethod
    token_name: str | None = None  # the token behind a TOKEN or SESSION identity

    @property
    def actor(self) -> Actor:
        return Actor(self.subject, self.role.value)

    def can(self, permission: Permission) -> bool:
        return allowed(self.role, permission)


def check(identity: Identity, permission: Permission) -> None:
    """Raise PermissionDenied unless the identity's role grants the permission."""
    if not allowed(identity.role, permission):
        raise PermissionDenied(identity.subject, identity.role.value, permission.value)


def token_identity(token: StoredToken, role: Role, method: AuthMethod) -> Identity:
    return Identity(f"token:{token.name}", token.name, role, method, token.name)


# --- API tokens ----------------------------------------------------------------------------------

TOKEN_PREFIX: Final = "sg_"  # noqa: S105 (the public prefix, not a secret)
TOKEN_SECRET_BYTES: Final = 32
TOKEN_PATTERN: Final = re.compile(r"sg_[A-Za-z0-9_-]{43}")
MAX_CREDENTIAL_CHARS: Final = 4096  # longer input is refused before any other work


class FailureReason(StrEnum):
    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"
    BAD_ROLE = "bad-role"
    SESSION_INVALID = "session-invalid"
    SESSION_EXPIRED = "session-expired"


def new_token_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_SECRET_BYTES)


def hash_token_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def token_state(token: StoredToken, now: datetime) -> str:
    """``active``, ``revoked`` or ``expired``: what `tokens list` shows.

    A revocation counts whatever its time: a clock running behind must not revive a token.
    """
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return "expired"
    return "active"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just created: the only time its secret exists outside its holder's hands."""

    token: StoredToken
    secret: str = field(repr=False)


def _failed(reason: FailureReason, message: str, token: str | None = None) -> AuthenticationFailed:
    return AuthenticationFailed(reason.value, message, token_name=token)


# --- sessions ------------------------------------------------------------------------------------

SESSION_COOKIE: Final = "stanzaguard_session"
"""Set it HttpOnly, Secure, SameSite=Strict, Path=/."""
DEVELOPMENT_SESSION_SECRET: Final = "stanzaguard-development-session-secret-not-for-production"  # noqa: S105
"""Published on purpose: used only in development, refused anywhere else."""
MIN_SESSION_SECRET_CHARS: Final = 32
DEFAULT_SESSION_MAX_AGE: Final = timedelta(hours=8)
_SESSION_VERSION: Final = "1"
_PLACEHOLDERS: Final = frozenset({"changeme", "change-me", "secret", "password", "stanzaguard"})


def session_key(secret: str | None, *, development: bool) -> bytes:
    """The HMAC key for session cookies, derived (HKDF-SHA256) from the `session_secret`.

    Outside development the secret must be set, at least MIN_SESSION_SECRET_CHARS long and
    not the development default nor a placeholder (AuthConfigError naming the setting).
    In development an unset secret means the published DEVELOPMENT_SESSION_SECRET.
    """
    if not secret:
        if not development:
            raise AuthConfigError(
                "session_secret: required outside environment=development (at least "
                f"{MIN_SESSION_SECRET_CHARS} random characters, e.g. from "
                "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        secret = DEVELOPMENT_SESSION_SECRET
    if not development:
        if secret == DEVELOPMENT_SESSION_SECRET or secret.strip().lower() in _PLACEHOLDERS:
            raise AuthConfigError(
                "session_secret: the default or a placeholder secret is refused outside "
                "environment=development"
            )
        if len(secret) < MIN_SESSION_SECRET_CHARS:
            raise AuthConfigError(
                f"session_secret: at least {MIN_SESSION_SECRET_CHARS} characters outside "
                "environment=development"
            )
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"stanzaguard-session-v1")
    return kdf.derive(secret.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """What a session cookie says, once its signature and age have been checked."""

    subject: str
    display_name: str
    role: Role
    method: AuthMethod
    token_name: str | None
    issued_at: datetime
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    """Strict: only the canonical encoding (unused low bits zero), so a value has one form."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not canonical base64url")
    return data


class SessionCodec:
    """Issues and reads signed, expiring session values (the cookie's content).

    Format: ``1.<payload>.<mac>``, payload the base64url of a small JSON object, mac the
    base64url HMAC-SHA256 of ``1.<payload>`` under the session key. Nothing secret is in
    the payload: it is signed, not encrypted.
    """

    def __init__(
        self, key: bytes, clock: Clock, *, max_age: timedelta = DEFAULT_SESSION_MAX_AGE
    ) -> None:
        if len(key) < 32:
            raise AuthConfigError("session key must be at least 32 bytes")
        if max_age <= timedelta(0):
            raise AuthConfigError("session max_age must be positive")
        self._key = key
        self._clock = clock
        self.max_age = max_age

    @classmethod
    def from_secret(
        cls,
        secret: str | None,
        *,
        development: bool,
        clock: Clock,
        max_age: timedelta = DEFAULT_SESSION_MAX_AGE,
    ) -> SessionCodec:
        return cls(session_key(secret, development=development), clock, max_age=max_age)

    def _mac(self, signed: bytes) -> crypto_hmac.HMAC:
        mac = crypto_hmac.HMAC(self._key, hashes.SHA256())
        mac.update(b"stanzaguard-session\n" + signed)
        return mac

    def issue(self, identity: Identity) -> str:
        now = self._clock.now()
        claims = {
            "sub": identity.subject,
            "name": identity.display_name,
            "role": identity.role.value,
            "m": identity.method.value,
            "tok": identity.token_name,
            "iat": int(now.timestamp()),
            "exp": int((now + self.max_age).timestamp()),
        }
        payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        signed = f"{_SESSION_VERSION}.{payload}"
        return f"{signed}.{_b64(self._mac(signed.encode()).finalize())}"

    def read(self, value: str) -> SessionClaims:
        """The claims of a genuine, unexpired session value; AuthenticationFailed otherwise."""
        invalid = _failed(FailureReason.SESSION_INVALID, "the session is not valid; sign in again")
        if not isinstance(value, str) or len(value) > MAX_CREDENTIAL_CHARS or not value.isascii():
            raise invalid
        version, _, rest = value.partition(".")
        payload, _, mac_text = rest.partition(".")
        if version != _SESSION_VERSION or not payload or not mac_text:
            raise invalid
        try:
            self._mac(f"{version}.{payload}".encode()).verify(_unb64(mac_text))
            data = json.loads(_unb64(payload))
        except (InvalidSignature, ValueError, binascii.Error):
            raise invalid from None
        try:
            issued = datetime.fromtimestamp(data["iat"], UTC)
            expires = datetime.fromtimestamp(data["exp"], UTC)
            claims = SessionClaims(
                subject=str(data["sub"]),
                display_name=str(data["name"]),
                role=Role(data["role"]),
                method=AuthMethod(data["m"]),
                token_name=None if data["tok"] is None else str(data["tok"]),
                issued_at=issued,
                expires_at=min(expires, issued + self.max_age),
            )
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            raise invalid from None  # signed by us, so only a format change gets here
        if self._clock.now() >= claims.expires_at:
            raise _failed(FailureReason.SESSION_EXPIRED, "the session has expired; sign in again")
        return claims


# --- authentication ------------------------------------------------------------------------------


class Authenticator:
    """Turns a credential (API token, session value) into an `Identity`, or refuses it.

    Store errors (`StoreUnavailable`) pass through: that is a 503, not a failed sign-in.
    """

    def __init__(
        self, store: TokenStore, clock: Clock, sessions: SessionCodec | None = None
    ) -> None:
        self._store = store
        self._clock = clock
        self._sessions = sessions

    async def authenticate_bearer(self, token: str | None) -> Identity:
        """The identity an API token stands for.

        Refused (AuthenticationFailed, with `reason`): missing, too long or not of the
        token format (no store look-up then), unknown, revoked, expired, or with a role
        this version does not know. The token is found by its SHA-256, and the hash
        compared again in constant time.
        """
        if not token:
            raise _failed(FailureReason.MISSING, "no API token given")
        if not isinstance(token, str) or len(token) > MAX_CREDENTIAL_CHARS:
            raise _failed(FailureReason.MALFORMED, "the API token is too long")
        if TOKEN_PATTERN.fullmatch(token) is None:
            raise _failed(
                FailureReason.MALFORMED,
                f"not a StanzaGuard API token ({TOKEN_PREFIX} followed by 43 characters)",
            )
        digest = hash_token_secret(token)
        stored = await self._store.token_by_hash(digest)
        if stored is None or not hmac.compare_digest(stored.secret_hash, digest):
            raise _failed(FailureReason.UNKNOWN, "unknown API token")
        return self._usable(stored, AuthMethod.TOKEN)

    async def authenticate_header(self, authorization: str | None) -> Identity:
        """The identity of an ``Authorization: Bearer <token>`` header value."""
        if not authorization:
            raise _failed(FailureReason.MISSING, "no Authorization header (Bearer token)")
        if len(authorization) > MAX_CREDENTIAL_CHARS:
            raise _failed(FailureReason.MALFORMED, "the Authorization header is too long")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _failed(FailureReason.MALFORMED, "expected 'Authorization: Bearer <token>'")
        return await self.authenticate_bearer(token.strip())

    def _usable(self, stored: StoredToken, method: AuthMethod) -> Identity:
        now = self._clock.now()
        state = token_state(stored, now)
        if state == "revoked":
            raise _failed(
                FailureReason.REVOKED, f"API token {stored.name!r} was revoked", stored.name
            )
        if state == "expired":
            raise _failed(
                FailureReason.EXPIRED, f"API token {stored.name!r} has expired", stored.name
            )
        try:
            role = Role(stored.role)
        except ValueError:
            raise _failed(
                FailureReason.BAD_ROLE,
                f"API token {stored.name!r} has a role this version does not know",
                stored.name,
            ) from None
        return token_identity(stored, role, method)

    def _codec(self) -> SessionCodec:
        if self._sessions is None:
            raise AuthConfigError("sessions are not configured (no session secret)")
        return self._sessions

    async def sign_in(self, token: str) -> tuple[Identity, str]:
        """Check a token typed into the sign-in page; return its identity and a session value."""
        identity = await self.authenticate_bearer(token)
        session = replace_method(identity, AuthMethod.SESSION)
        return session, self._codec().issue(session)

    def issue_session(self, identity: Identity) -> str:
        """A session value for an identity established some other way (OIDC, later)."""
        return self._codec().issue(identity)

    async def authenticate_session(self, value: str | None) -> Identity:
        """The identity of a session cookie; a token-based one only while its token is usable."""
        if not value:
            raise _failed(FailureReason.MISSING, "not signed in")
        claims = self._codec().read(value)
        if claims.token_name is None:
            return Identity(claims.subject, claims.display_name, claims.role, claims.method, None)
        try:
            check_token_name(claims.token_name)
        except InvalidRequest:
            raise _failed(FailureReason.SESSION_INVALID, "the session is not valid") from None
        stored = await self._store.token_by_name(claims.token_name)
        if stored is None:
            raise _failed(FailureReason.SESSION_INVALID, "the session's token no longer exists")
        return self._usable(stored, AuthMethod.SESSION)


def replace_method(identity: Identity, method: AuthMethod) -> Identity:
    return Identity(
        identity.subject, identity.display_name, identity.role, method, identity.token_name
    )


# --- token management ----------------------------------------------------------------------------

MAX_TOKEN_LIFETIME: Final = timedelta(days=3650)


class TokenService:
    """Creates, lists and revokes API tokens; every change is audited (and so is a refusal)."""

    def __init__(self, store: TokenStore, audit: AuditLog, clock: Clock) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock

    async def _refuse_unless_allowed(self, actor: Identity, action: AuditAction, name: str) -> None:
        if not actor.can(Permission.TOKENS_MANAGE):
            await self._audit.record(
                actor.actor, action, {"name": name}, outcome=AuditOutcome.DENIED
            )
            check(actor, Permission.TOKENS_MANAGE)

    async def create(
        self,
        actor: Identity,
        *,
        name: str,
        role: Role,
        expires_in: timedelta | None = None,
    ) -> IssuedToken:
        """A new token; its secret is in the result and nowhere else.

        Raises PermissionDenied, InvalidRequest (bad name or lifetime), AlreadyExists.
        """
        shown = str(name)[:64]
        await self._refuse_unless_allowed(actor, AuditAction.TOKEN_CREATE, shown)
        params: dict[str, Any] = {"name": shown, "role": str(role)[:64]}
        try:
            check_token_name(name)
            if role not in set(Role):
                raise InvalidRequest(f"unknown role {str(role)[:40]!r}")
            if expires_in is not None and not timedelta(0) < expires_in <= MAX_TOKEN_LIFETIME:
                raise InvalidRequest("a token's lifetime must be more than 0 and at most 3650 days")
            now = self._clock.now()
            expires_at = now + expires_in if expires_in is not None else None
            params["expires_at"] = expires_at
            secret = new_token_secret()
            stored = StoredToken(name, Role(role).value, hash_token_secret(secret), now, expires_at)
            await self._store.add_token(stored)
        except InvalidRequest:
            await self._audit.record(
                actor.actor, AuditAction.TOKEN_CREATE, params, outcome=AuditOutcome.INVALID
            )
            raise
        await self._audit.record(actor.actor, AuditAction.TOKEN_CREATE, params, result_count=1)
        return IssuedToken(stored, secret)

    async def revoke(self, actor: Identity, name: str) -> StoredToken:
        """Revoke a token now (or keep its earlier revocation). Raises NotFound."""
        shown = str(name)[:64]
        await self._refuse_unless_allowed(actor, AuditAction.TOKEN_REVOKE, shown)
        try:
            token = await self._store.revoke_token(name, at=self._clock.now())
        except (InvalidRequest, NotFound):
            await self._audit.record(
                actor.actor, AuditAction.TOKEN_REVOKE, {"name": shown}, outcome=AuditOutcome.INVALID
            )
            raise
        await self._audit.record(
            actor.actor,
            AuditAction.TOKEN_REVOKE,
            {"name": name, "revoked_at": token.revoked_at},
            result_count=1,
        )
        return token

    async def list(self) -> tuple[StoredToken, ...]:
        return await self._store.tokens()
