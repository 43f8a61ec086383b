"""The audit-on-read rule through HTTP, the audit log's own routes, and fail-closed auditing."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from archive_api.auth import Role
from tests.archive_api.api_support import ApiEnv, api_env

API = "/api/v1"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[ApiEnv]:
    async with api_env(tmp_path) as made:
        yield made


# (role, method, path, body, the action recorded, its result count)
AUDITED: list[tuple[Role, str, str, Any, str, int | None]] = [
    (Role.OFFICER, "GET", f"{API}/search?q=lunch", None, "search", 1),
    (Role.OFFICER, "GET", f"{API}/messages/r-bob-1", None, "view", 1),
    (
        Role.OFFICER,
        "GET",
        f"{API}/conversations?room=desk@conference.corp.example",
        None,
        "conversation",
        1,
    ),
    (Role.OFFICER, "GET", f"{API}/review/quarantine", None, "search", 1),
    (Role.OFFICER, "GET", f"{API}/review/flagged", None, "search", 1),
    (
        Role.OFFICER,
        "POST",
        f"{API}/holds",
        {"case_name": "c", "scope": {"kind": "person", "jid": "*@spam.example"}},
        "hold",
        1,
    ),
    (Role.OFFICER, "POST", f"{API}/exports", {"query": "lunch"}, "export", 1),
    (Role.OFFICER, "POST", f"{API}/review/r-flagged/confirm-spam", None, "confirm-spam", 1),
    (Role.OFFICER, "POST", f"{API}/review/r-held/not-spam", None, "not-spam", 1),
    (Role.OFFICER, "POST", f"{API}/review/r-held/release", None, "release", 1),
    (Role.OFFICER, "POST", f"{API}/review/r-bob-1/label", {"label": "spam"}, "label", 1),
    (
        Role.ADMIN,
        "PUT",
        f"{API}/policy",
        {"text": 'version = 1\nlocal_domains = ["corp.example"]\n'},
        "policy-change",
        1,
    ),
    (Role.ADMIN, "POST", f"{API}/tokens", {"name": "n1", "role": "officer"}, "token-create", 1),
    (Role.ADMIN, "POST", f"{API}/tokens/n1/revoke", None, "token-revoke", 1),
    (Role.AUDITOR, "GET", f"{API}/audit?limit=2", None, "audit-read", 2),
    (Role.AUDITOR, "GET", f"{API}/audit/verify", None, "audit-verify", None),
]


async def test_every_read_and_change_is_audited_and_the_chain_verifies(env: ApiEnv) -> None:
    for role, method, path, body, action, count in AUDITED:
        before = len(await env.events())
        response = await env.client.request(
            method, path, headers=env.auth(role), **({"json": body} if body is not None else {})
        )
        assert response.status_code < 300, (path, response.text)
        events = await env.events()
        assert len(events) == before + 1, (path, [e.action for e in events[before:]])
        event = events[-1]
        assert (event.action, event.actor, event.role, event.outcome) == (
            action,
            f"token:{role.value}-1",
            role.value,
            "ok",
        ), path
        if count is not None:
            assert event.result_count == count, (path, event)
    report = await env.audit.verify()
    assert report.ok and report.signatures_checked, report.problems


async def test_the_audit_log_pages_newest_first_with_filters(env: ApiEnv) -> None:
    for query in ("lunch", "deal", "pills"):
        await env.get(Role.OFFICER, f"{API}/search", params={"q": query})
    page = (await env.get(Role.AUDITOR, f"{API}/audit", params={"limit": "2"})).json()
    assert [e["action"] for e in page["events"]] == ["search", "search"]
    assert page["events"][0]["params"]["q"] == "pills"
    assert len(page["events"][0]["hash"]) == 64
    rest = await env.get(
        Role.AUDITOR, f"{API}/audit", params={"limit": "2", "cursor": page["next_cursor"]}
    )
    assert rest.json()["events"][0]["params"]["q"] == "lunch"
    searches = await env.get(
        Role.AUDITOR,
        f"{API}/audit",
        params={"action": "search", "actor": "token:officer-1", "oldest_first": "true"},
    )
    assert [e["params"]["q"] for e in searches.json()["events"]] == ["lunch", "deal", "pills"]
    window = await env.get(
        Role.AUDITOR,
        f"{API}/audit",
        params={"since": "2026-01-21T00:00:00+00:00", "until": "2026-01-22T00:00:00Z"},
    )
    assert window.json()["events"] == []


@pytest.mark.parametrize(
    "params",
    [
        {"since": "2026-01-01T00:00:00"},  # no zone
        {"since": "yesterday"},
        {"limit": "100000"},
        {"cursor": "bogus"},
        {"actor": "x" * 300},
        {"actor": "bad\nactor"},
    ],
)
async def test_bad_audit_queries_are_4xx(env: ApiEnv, params: dict[str, str]) -> None:
    response = await env.get(Role.AUDITOR, f"{API}/audit", params=params)
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"] in ("validation", "bad-cursor", "invalid-request")


async def test_verify_names_the_first_break_of_a_tampered_log(env: ApiEnv) -> None:
    await env.get(Role.OFFICER, f"{API}/search", params={"q": "lunch"})
    whole = (await env.get(Role.ADMIN, f"{API}/audit/verify")).json()
    assert whole["ok"] is True and whole["first_break"] is None
    await env.audit.flush()
    with sqlite3.connect(env.store.path) as conn:
        conn.execute("UPDATE audit_events SET actor = 'token:nobody' WHERE seq = 4")
    broken = (await env.get(Role.ADMIN, f"{API}/audit/verify")).json()
    assert broken["ok"] is False
    assert broken["first_break"] == {
        "seq": 4,
        "problem": "content does not match its hash (edited)",
    }


async def test_when_the_audit_log_cannot_record_nothing_is_answered(env: ApiEnv) -> None:
    await env.audit.close()
    for path in (f"{API}/search?q=lunch", f"{API}/messages/r-bob-1"):
        response = await env.get(Role.OFFICER, path)
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["error"] == "audit-unavailable"
        assert "lunch on friday" not in response.text
    hold = await env.post(
        Role.OFFICER,
        f"{API}/holds",
        json={"case_name": "c", "scope": {"kind": "person", "jid": "a@b.example"}},
    )
    assert hold.status_code == 503
