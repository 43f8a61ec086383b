"""Roles and permissions, API tokens, sign-in sessions and token management."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive_api.audit import AuditLog
from archive_api.auth import (
    DEVELOPMENT_SESSION_SECRET,
    MAX_CREDENTIAL_CHARS,
    ROLE_PERMISSIONS,
    TOKEN_PATTERN,
    Authenticator,
    AuthMethod,
    FailureReason,
    Identity,
    Permission,
    Role,
    SessionCodec,
    TokenService,
    check,
    hash_token_secret,
    new_token_secret,
    session_key,
    token_state,
)
from archive_api.errors import (
    AuthConfigError,
    AuthenticationFailed,
    NotPermitted,
    PermissionDenied,
)
from archive_api.store.audit import AuditFilter
from archive_api.store.errors import AlreadyExists, InvalidRequest, NotFound
from archive_api.store.sqlite import SqliteStore
from archive_api.store.tokens import StoredToken
from classifier.clock import ManualClock

T0 = datetime(2026, 5, 4, 9, 30, tzinfo=UTC)
SECRET = "x" * 48  # a stand-in session secret of acceptable length

# -- roles and permissions --------------------------------------------------------------------

# The documented table (docs/api.md), written out again on purpose: a change to the code's
# table must be a deliberate change here too.
EXPECTED = {
    "search": {"admin", "officer"},
    "view": {"admin", "officer"},
    "export": {"admin", "officer"},
    "hold.read": {"admin", "officer"},
    "hold.create": {"admin", "officer"},
    "hold.release": {"admin"},
    "review": {"admin", "officer"},
    "policy.read": {"admin"},
    "policy.write": {"admin"},
    "audit.read": {"auditor"},
    "audit.verify": {"admin", "auditor"},
    "tokens.manage": {"admin"},
    "dashboard": {"admin", "officer", "auditor"},
}


def identity(role: Role, name: str = "someone") -> Identity:
    return Identity(f"token:{name}", name, role, AuthMethod.TOKEN, name)


def test_every_permission_is_in_the_documented_table() -> None:
    assert {p.value for p in Permission} == set(EXPECTED)
    assert set(ROLE_PERMISSIONS) == set(Role)


@pytest.mark.parametrize("permission", list(Permission))
@pytest.mark.parametrize("role", list(Role))
def test_role_permission_table(role: Role, permission: Permission) -> None:
    expected = role.value in EXPECTED[permission.value]
    who = identity(role)
    assert who.can(permission) is expected
    if expected:
        check(who, permission)
    else:
        with pytest.raises(PermissionDenied) as denied:
            check(who, permission)
        assert isinstance(denied.value, NotPermitted)  # the service layer's tree
        assert (denied.value.role, denied.value.permission) == (role.value, permission.value)
        assert str(denied.value) == f"token:someone (role {role.value}) may not {permission}"


def test_the_table_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        ROLE_PERMISSIONS[Role.OFFICER] = frozenset(Permission)  # type: ignore[index]


def test_an_identity_names_its_audit_actor() -> None:
    who = identity(Role.AUDITOR, "ann")
    assert (who.actor.name, who.actor.role) == ("token:ann", "auditor")


# -- tokens -------------------------------------------------------------------------------------


def test_secrets_are_random_recognisable_and_hashed() -> None:
    secrets_ = {new_token_secret() for _ in range(200)}
    assert len(secrets_) == 200
    assert all(TOKEN_PATTERN.fullmatch(s) for s in secrets_)
    one = next(iter(secrets_))
    assert hash_token_secret(one) == hashlib.sha256(one.encode()).digest()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "archive.sqlite3"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(db_path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def audit(store: SqliteStore, clock: ManualClock) -> AsyncIterator[AuditLog]:
    from archive_api.store.chain import CheckpointSigner

    log = AuditLog(store, CheckpointSigner.generate(), clock)
    yield log
    await log.close()


@pytest.fixture
def tokens(store: SqliteStore, audit: AuditLog, clock: ManualClock) -> TokenService:
    return TokenService(store, audit, clock)


@pytest.fixture
def sessions(clock: ManualClock) -> SessionCodec:
    return SessionCodec.from_secret(SECRET, development=False, clock=clock)


@pytest.fixture
def auth(store: SqliteStore, clock: ManualClock, sessions: SessionCodec) -> Authenticator:
    return Authenticator(store, clock, sessions)


ADMIN = Identity("cli:root", "root (command line)", Role.ADMIN, AuthMethod.CLI)


async def test_a_created_token_authenticates_as_its_role(
    tokens: TokenService, auth: Authenticator
) -> None:
    issued = await tokens.create(ADMIN, name="desk-officer", role=Role.OFFICER)
    assert issued.secret not in repr(issued)
    who = await auth.authenticate_bearer(issued.secret)
    assert who == Identity(
        "token:desk-officer", "desk-officer", Role.OFFICER, AuthMethod.TOKEN, "desk-officer"
    )
    assert await auth.authenticate_header(f"Bearer {issued.secret}") == who
    assert await auth.authenticate_header(f"  bearer   {issued.secret}  ") == who


async def test_the_secret_never_reaches_the_database_file(
    tokens: TokenService, audit: AuditLog, store: SqliteStore, db_path: Path
) -> None:
    issued = [await tokens.create(ADMIN, name=f"t{i}", role=Role.AUDITOR) for i in range(5)]
    await audit.close()
    await store.close()  # everything written out (WAL checkpointed into the main file)
    files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]
    data = b"".join(p.read_bytes() for p in files)
    for token in issued:
        secret = token.secret.encode()
        assert secret not in data
        assert secret[3:] not in data  # nor the random part alone
        assert base64.b64encode(secret) not in data
        assert hash_token_secret(token.secret) in data  # the hash is what is kept
    assert b"t4" in data  # the file was really read


async def test_the_secret_is_not_in_the_audit_log(tokens: TokenService, audit: AuditLog) -> None:
    issued = await tokens.create(
        ADMIN, name="ci-export", role=Role.OFFICER, expires_in=timedelta(days=7)
    )
    [event] = (await audit.events()).events
    assert (event.actor, event.role, event.action, event.outcome) == (
        "cli:root",
        "admin",
        "token-create",
        "ok",
    )
    assert event.params == {
        "name": "ci-export",
        "role": "officer",
        "expires_at": (T0 + timedelta(days=7)).isoformat(),
    }
    assert issued.secret not in json.dumps(event.to_json())


@pytest.mark.parametrize(
    ("credential", "reason"),
    [
        (None, FailureReason.MISSING),
        ("", FailureReason.MISSING),
        ("sg_short", FailureReason.MALFORMED),
        ("gh_" + "a" * 43, FailureReason.MALFORMED),
        ("sg_" + "a" * 42 + "!", FailureReason.MALFORMED),
        ("sg_" + "a" * 43 + "\n", FailureReason.MALFORMED),
        ("sg_" + "a" * 44, FailureReason.MALFORMED),
        ("sg_" + "é" * 43, FailureReason.MALFORMED),
        ("x" * (MAX_CREDENTIAL_CHARS + 1), FailureReason.MALFORMED),
        ("sg_" + "x" * 10_000_000, FailureReason.MALFORMED),
        ("sg_" + "a" * 43, FailureReason.UNKNOWN),
    ],
)
async def test_bad_tokens_are_refused_clearly(
    auth: Authenticator, credential: str | None, reason: FailureReason
) -> None:
    with pytest.raises(AuthenticationFailed) as failed:
        await auth.authenticate_bearer(credential)
    assert failed.value.reason == reason.value
    assert failed.value.token_name is None
    if credential:
        assert credential[:20] not in str(failed.value)  # the credential is never echoed


@pytest.mark.parametrize(
    "header",
    [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token sg_x", "x" * 5000],
)
async def test_bad_authorization_headers_are_refused(
    auth: Authenticator, header: str | None
) -> None:
    with pytest.raises(AuthenticationFailed) as failed:
        await auth.authenticate_header(header)
    assert failed.value.reason in {FailureReason.MISSING.value, FailureReason.MALFORMED.value}


async def test_a_revoked_token_is_refused_from_then_on(
    tokens: TokenService, auth: Authenticator, clock: ManualClock, audit: AuditLog
) -> None:
    issued = await tokens.create(ADMIN, name="leaver", role=Role.OFFICER)
    await auth.authenticate_bearer(issued.secret)
    clock.advance(3600)
    revoked = await tokens.revoke(ADMIN, "leaver")
    assert revoked.revoked_at == clock.now()
    with pytest.raises(AuthenticationFailed, match="'leaver' was revoked") as failed:
        await auth.authenticate_bearer(issued.secret)
    assert (failed.value.reason, failed.value.token_name) == ("revoked", "leaver")
    revoke_event = (await audit.events(AuditFilter(action="token-revoke"))).events[0]
    assert revoke_event.params == {"name": "leaver", "revoked_at": clock.now().isoformat()}


async def test_a_token_expires_at_its_time(
    tokens: TokenService, auth: Authenticator, clock: ManualClock
) -> None:
    issued = await tokens.create(
        ADMIN, name="temp", role=Role.AUDITOR, expires_in=timedelta(days=1)
    )
    clock.advance(86_400 - 1)
    assert (await auth.authenticate_bearer(issued.secret)).role is Role.AUDITOR
    clock.advance(1)
    with pytest.raises(AuthenticationFailed, match="expired") as failed:
        await auth.authenticate_bearer(issued.secret)
    assert failed.value.reason == "expired"
    assert token_state(issued.token, clock.now()) == "expired"


async def test_a_token_with_a_role_this_version_does_not_know_is_refused(
    store: SqliteStore, auth: Authenticator
) -> None:
    secret = new_token_secret()
    await store.add_token(StoredToken("future", "superuser", hash_token_secret(secret), T0))
    with pytest.raises(AuthenticationFailed) as failed:
        await auth.authenticate_bearer(secret)
    assert failed.value.reason == "bad-role"


async def test_token_changes_need_tokens_manage_and_refusals_are_audited(
    tokens: TokenService, audit: AuditLog
) -> None:
    officer = identity(Role.OFFICER, "officer-1")
    with pytest.raises(PermissionDenied):
        await tokens.create(officer, name="sneaky", role=Role.ADMIN)
    with pytest.raises(PermissionDenied):
        await tokens.revoke(officer, "anything")
    assert await tokens.list() == ()
    events = (await audit.events(newest_first=False)).events
    assert [(e.actor, e.action, e.outcome) for e in events] == [
        ("token:officer-1", "token-create", "denied"),
        ("token:officer-1", "token-revoke", "denied"),
    ]


async def test_bad_token_requests_are_refused_and_audited(
    tokens: TokenService, audit: AuditLog
) -> None:
    await tokens.create(ADMIN, name="ops", role=Role.ADMIN)
    with pytest.raises(AlreadyExists):
        await tokens.create(ADMIN, name="ops", role=Role.OFFICER)
    with pytest.raises(InvalidRequest, match="token name"):
        await tokens.create(ADMIN, name="bad name", role=Role.OFFICER)
    with pytest.raises(InvalidRequest, match="unknown role"):
        await tokens.create(ADMIN, name="x", role="root")  # type: ignore[arg-type]
    for lifetime in (timedelta(0), timedelta(days=-1), timedelta(days=3651)):
        with pytest.raises(InvalidRequest, match="lifetime"):
            await tokens.create(ADMIN, name="y", role=Role.OFFICER, expires_in=lifetime)
    with pytest.raises(NotFound):
        await tokens.revoke(ADMIN, "nobody")
    with pytest.raises(InvalidRequest):
        await tokens.revoke(ADMIN, "no body")
    events = (await audit.events(newest_first=False)).events
    assert [e.outcome for e in events] == ["ok"] + ["invalid"] * 8
    assert [t.name for t in await tokens.list()] == ["ops"]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(credential=st.text(max_size=80) | st.from_regex(r"sg_[A-Za-z0-9_-]{43}", fullmatch=True))
async def test_no_random_credential_authenticates(auth: Authenticator, credential: str) -> None:
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate_bearer(credential)
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate_header(f"Bearer {credential}")
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate_session(credential)


# -- sessions -------------------------------------------------------------------------------------


async def test_sign_in_issues_a_session_that_names_the_token(
    tokens: TokenService, auth: Authenticator, sessions: SessionCodec
) -> None:
    issued = await tokens.create(ADMIN, name="ann", role=Role.AUDITOR)
    who, cookie = await auth.sign_in(issued.secret)
    assert who.method is AuthMethod.SESSION and who.token_name == "ann"
    assert issued.secret not in cookie
    claims = sessions.read(cookie)
    assert (claims.subject, claims.role, claims.token_name) == ("token:ann", Role.AUDITOR, "ann")
    assert claims.expires_at - claims.issued_at == timedelta(hours=8)
    assert await auth.authenticate_session(cookie) == who


async def test_a_session_expires(
    tokens: TokenService, auth: Authenticator, clock: ManualClock
) -> None:
    issued = await tokens.create(ADMIN, name="ann", role=Role.AUDITOR)
    _, cookie = await auth.sign_in(issued.secret)
    clock.advance(8 * 3600 - 1)
    await auth.authenticate_session(cookie)
    clock.advance(1)
    with pytest.raises(AuthenticationFailed, match="expired") as failed:
        await auth.authenticate_session(cookie)
    assert failed.value.reason == "session-expired"


async def test_a_shorter_max_age_applies_to_sessions_already_issued(
    tokens: TokenService, store: SqliteStore, clock: ManualClock
) -> None:
    issued = await tokens.create(ADMIN, name="ann", role=Role.AUDITOR)
    long = Authenticator(store, clock, SessionCodec(b"k" * 32, clock, max_age=timedelta(days=7)))
    short = Authenticator(store, clock, SessionCodec(b"k" * 32, clock, max_age=timedelta(hours=1)))
    _, cookie = await long.sign_in(issued.secret)
    clock.advance(3600)
    await long.authenticate_session(cookie)
    with pytest.raises(AuthenticationFailed, match="expired"):
        await short.authenticate_session(cookie)


async def test_revoking_the_token_ends_its_sessions(
    tokens: TokenService, auth: Authenticator
) -> None:
    issued = await tokens.create(ADMIN, name="leaver", role=Role.OFFICER)
    _, cookie = await auth.sign_in(issued.secret)
    await tokens.revoke(ADMIN, "leaver")
    with pytest.raises(AuthenticationFailed, match="revoked"):
        await auth.authenticate_session(cookie)


async def test_every_tampered_byte_of_a_session_is_refused(
    tokens: TokenService, auth: Authenticator
) -> None:
    issued = await tokens.create(ADMIN, name="ann", role=Role.OFFICER)
    _, cookie = await auth.sign_in(issued.secret)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for i, ch in enumerate(cookie):
        other = alphabet[(alphabet.index(ch) + 1) % len(alphabet)]
        forged = cookie[:i] + other + cookie[i + 1 :]
        with pytest.raises(AuthenticationFailed) as failed:
            await auth.authenticate_session(forged)
        assert failed.value.reason == "session-invalid", (i, forged)


async def test_a_session_with_a_promoted_role_is_refused(
    tokens: TokenService, auth: Authenticator
) -> None:
    issued = await tokens.create(ADMIN, name="ann", role=Role.OFFICER)
    _, cookie = await auth.sign_in(issued.secret)
    version, payload, mac = cookie.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["role"] = "admin"
    promoted = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate_session(f"{version}.{promoted}.{mac}")


async def test_a_session_signed_with_another_secret_is_refused(
    tokens: TokenService, store: SqliteStore, clock: ManualClock, auth: Authenticator
) -> None:
    issued = await tokens.create(ADMIN, name="ann", role=Role.OFFICER)
    elsewhere = Authenticator(
        store, clock, SessionCodec.from_secret("y" * 48, development=False, clock=clock)
    )
    _, cookie = await elsewhere.sign_in(issued.secret)
    with pytest.raises(AuthenticationFailed, match="not valid"):
        await auth.authenticate_session(cookie)


@pytest.mark.parametrize(
    "value",
    ["", "1", "1..", "2.abc.def", "1.!!!.!!!", "1." + "a" * 5000 + ".b", "1.é.x", "\x00"],
)
async def test_malformed_sessions_are_refused(auth: Authenticator, value: str) -> None:
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate_session(value)


async def test_sessions_for_other_sign_in_methods_carry_their_role(
    auth: Authenticator, clock: ManualClock
) -> None:
    """How OIDC will plug in: an identity made elsewhere, kept in the same cookie."""
    oidc = Identity("oidc:https://idp.example#42", "Ann Example", Role.AUDITOR, AuthMethod.OIDC)
    cookie = auth.issue_session(oidc)
    assert await auth.authenticate_session(cookie) == oidc
    clock.advance(8 * 3600)
    with pytest.raises(AuthenticationFailed, match="expired"):
        await auth.authenticate_session(cookie)


async def test_sessions_need_a_configured_codec(store: SqliteStore, clock: ManualClock) -> None:
    bare = Authenticator(store, clock)
    with pytest.raises(AuthConfigError, match="sessions are not configured"):
        await bare.authenticate_session("1.a.b")


def test_session_secret_policy() -> None:
    assert len(session_key(None, development=True)) == 32
    assert session_key(None, development=True) == session_key(
        DEVELOPMENT_SESSION_SECRET, development=True
    )
    assert session_key(SECRET, development=False) != session_key("z" * 48, development=False)
    for refused in (None, "", DEVELOPMENT_SESSION_SECRET, "changeme", "short-secret"):
        with pytest.raises(AuthConfigError, match="session_secret"):
            session_key(refused, development=False)
    with pytest.raises(AuthConfigError):
        SessionCodec(b"too short", ManualClock())
    with pytest.raises(AuthConfigError):
        SessionCodec(b"k" * 32, ManualClock(), max_age=timedelta(0))
