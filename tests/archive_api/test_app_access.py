"""Every route against every role, no token and a bad token; derived from the app itself, so
a route added without a permission (or outside the public list) fails here."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, routing

from archive_api.app import PUBLIC_PATHS
from archive_api.audit import AuditOutcome
from archive_api.auth import ROLE_PERMISSIONS, SESSION_COOKIE, Permission, Role
from archive_api.routes.deps import route_permission
from tests.archive_api.api_support import ROLES, ApiEnv, api_env

# Path parameters filled with ids that do not exist: an allowed caller gets 404 (or 422),
# never a change, so every route can be called by every role.
SAMPLE_PARAMS = {
    "record_id": "nope-404",
    "hold_id": "hold-404",
    "job_id": "exp-0000000000000000",
    "name": "nobody",
    "version": "999",
}
STATIC_MOUNTS = {"/docs/static"}


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # the template, /api/v1/messages/{record_id}
    permissions: tuple[Permission, ...]

    @property
    def url(self) -> str:
        return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: SAMPLE_PARAMS[m.group(1)], self.path)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _routes(app: FastAPI) -> Iterator[Any]:
    # FastAPI versions that keep included routers as their own objects expose the flattened
    # routes through iter_route_contexts; older ones list APIRoutes directly.
    flatten = getattr(routing, "iter_route_contexts", None)
    yield from flatten(app.routes) if flatten is not None else app.routes


def endpoints(app: FastAPI) -> tuple[list[Endpoint], set[str]]:
    """(every endpoint with the permissions its dependencies require, the mounts)."""
    found: list[Endpoint] = []
    mounts: set[str] = set()
    for route in _routes(app):
        methods = getattr(route, "methods", None)
        if not methods:
            mounts.add(route.path)
            continue
        dependant = getattr(route, "dependant", None)
        permissions = tuple(route_permission(dependant.dependencies)) if dependant else ()
        for method in sorted(methods - {"HEAD"}):
            found.append(Endpoint(method, route.path, permissions))
    return found, mounts


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[ApiEnv]:
    async with api_env(tmp_path) as made:
        yield made


async def call(env: ApiEnv, endpoint: Endpoint, headers: dict[str, str]) -> Any:
    body: dict[str, Any] | None = {} if endpoint.method in ("POST", "PUT", "PATCH") else None
    return await env.client.request(endpoint.method, endpoint.url, headers=headers, json=body)


async def test_every_route_is_public_or_needs_exactly_one_permission(env: ApiEnv) -> None:
    found, mounts = endpoints(env.service.app)
    assert mounts <= STATIC_MOUNTS
    paths = {e.path for e in found}
    assert paths >= PUBLIC_PATHS
    assert len(found) >= 25  # the whole API, not an empty router
    for endpoint in found:
        if endpoint.path in PUBLIC_PATHS:
            assert endpoint.permissions == (), endpoint
        else:
            assert endpoint.path.startswith("/api/v1/"), endpoint
            assert len(endpoint.permissions) == 1, f"{endpoint} declares {endpoint.permissions}"


async def test_every_route_against_every_role(env: ApiEnv) -> None:
    found, _ = endpoints(env.service.app)
    checked = 0
    for endpoint in found:
        if endpoint.path in PUBLIC_PATHS:
            continue
        (permission,) = endpoint.permissions
        for role in ROLES:
            response = await call(env, endpoint, env.auth(role))
            if permission in ROLE_PERMISSIONS[role]:
                assert response.status_code not in (401, 403), (str(endpoint), role, response.text)
            else:
                assert response.status_code == 403, (str(endpoint), role, response.text)
                body = response.json()
                assert body["error"] == "forbidden"
                assert permission.value in body["detail"]
            checked += 1
    assert checked >= 75


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"Authorization": "Bearer sg_" + "A" * 43}, "unknown"),
        ({"Authorization": "Bearer not-a-token"}, "malformed"),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "malformed"),
        ({"Authorization": "Bearer " + "x" * 5000}, "malformed"),
        ({"Cookie": f"{SESSION_COOKIE}=1.forged.mac"}, "session-invalid"),
    ],
)
async def test_every_protected_route_refuses_a_missing_or_bad_credential(
    env: ApiEnv, headers: dict[str, str], reason: str
) -> None:
    found, _ = endpoints(env.service.app)
    for endpoint in found:
        if endpoint.path in PUBLIC_PATHS:
            continue
        response = await call(env, endpoint, headers)
        assert response.status_code == 401, (str(endpoint), response.text)
        body = response.json()
        assert (body["error"], body["reason"]) == ("unauthenticated", reason)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "sg_AAAA" not in response.text  # a presented token is never echoed


async def test_public_routes_need_no_credential(env: ApiEnv) -> None:
    for path in sorted(PUBLIC_PATHS):
        response = await env.client.get(path)
        assert response.status_code == 200, (path, response.text)


async def test_a_revoked_token_stops_at_once(env: ApiEnv) -> None:
    assert (await env.get(Role.OFFICER, "/api/v1/holds")).status_code == 200
    revoked = await env.post(Role.ADMIN, "/api/v1/tokens/officer-1/revoke")
    assert revoked.status_code == 200
    again = await env.get(Role.OFFICER, "/api/v1/holds")
    assert (again.status_code, again.json()["reason"]) == (401, "revoked")


async def test_an_expired_token_is_refused(env: ApiEnv) -> None:
    made = await env.post(
        Role.ADMIN, "/api/v1/tokens", json={"name": "short", "role": "officer", "expires_days": 1}
    )
    secret = made.json()["secret"]
    headers = {"Authorization": f"Bearer {secret}"}
    assert (await env.client.get("/api/v1/holds", headers=headers)).status_code == 200
    env.clock.advance(2 * 86400)
    refused = await env.client.get("/api/v1/holds", headers=headers)
    assert (refused.status_code, refused.json()["reason"]) == (401, "expired")


async def test_the_session_cookie_signs_in_the_ui_and_changes_need_our_origin(
    env: ApiEnv,
) -> None:
    _, session = await env.ctx.authenticator.sign_in(env.secrets[Role.ADMIN])
    cookies = {SESSION_COOKIE: session}
    env.client.cookies.update(cookies)
    try:
        assert (await env.client.get("/api/v1/holds")).status_code == 200
        hold = {"case_name": "case", "scope": {"kind": "person", "jid": "alice@corp.example"}}
        foreign = await env.client.post(
            "/api/v1/holds", json=hold, headers={"Origin": "https://evil.example"}
        )
        assert foreign.status_code == 401
        assert "own pages" in foreign.json()["detail"]
        ours = await env.client.post(
            "/api/v1/holds", json=hold, headers={"Origin": "http://testserver"}
        )
        assert ours.status_code == 201, ours.text
        # The session names its token: revoking the token ends the session.
        await env.ctx.tokens.revoke(
            (await env.ctx.authenticator.authenticate_bearer(env.secrets[Role.ADMIN])),
            "admin-1",
        )
        ended = await env.client.get("/api/v1/holds")
        assert ended.status_code == 401
    finally:
        env.client.cookies.clear()


async def test_a_refused_read_is_audited_as_denied(env: ApiEnv) -> None:
    refused = await env.get(Role.OFFICER, "/api/v1/audit")
    assert refused.status_code == 403
    last = (await env.events())[-1]
    assert (last.actor, last.action, last.outcome) == (
        "token:officer-1",
        "audit-read",
        AuditOutcome.DENIED.value,
    )
    assert last.params["permission"] == "audit.read"
