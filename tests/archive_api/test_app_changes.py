"""Holds, exports, review decisions, policy versions and tokens through HTTP; each audited."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from archive_api.auth import Role
from archive_api.exports import verify_manifest
from stanzaguard.quarantine import RequestQueue, ReviewPaths
from tests.archive_api.api_support import POLICY, ApiEnv, api_env

API = "/api/v1"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[ApiEnv]:
    async with api_env(tmp_path) as made:
        yield made


async def last_event(env: ApiEnv) -> Any:
    return (await env.events())[-1]


# --- holds ------------------------------------------------------------------------------------


async def test_place_list_and_release_a_hold(env: ApiEnv) -> None:
    placed = await env.post(
        Role.OFFICER,
        f"{API}/holds",
        json={"case_name": "SEC 2026-17", "scope": {"kind": "person", "jid": "Alice@Corp.Example"}},
    )
    assert placed.status_code == 201, placed.text
    hold = placed.json()
    assert (hold["case_name"], hold["query"], hold["records_covered"]) == (
        "SEC 2026-17",
        "with:alice@corp.example",
        8,
    )
    event = await last_event(env)
    assert (event.action, event.result_count, event.params["hold_id"]) == (
        "hold",
        8,
        hold["hold_id"],
    )
    listed = (await env.get(Role.OFFICER, f"{API}/holds")).json()["holds"]
    assert [h["hold_id"] for h in listed] == [hold["hold_id"]]
    view = (await env.get(Role.OFFICER, f"{API}/messages/r-alice-1")).json()
    assert view["holds"] == [hold["hold_id"]]
    # Only admins release, with a reason; the second release is refused.
    refused = await env.post(Role.OFFICER, f"{API}/holds/{hold['hold_id']}/release", json={})
    assert refused.status_code == 403
    released = await env.post(
        Role.ADMIN, f"{API}/holds/{hold['hold_id']}/release", json={"reason": "case closed"}
    )
    assert released.status_code == 200, released.text
    assert released.json()["active"] is False and released.json()["released_by"] == "token:admin-1"
    event = await last_event(env)
    assert (event.action, event.params["reason"], event.result_count) == (
        "hold-release",
        "case closed",
        1,
    )
    again = await env.post(Role.ADMIN, f"{API}/holds/{hold['hold_id']}/release", json={})
    assert (again.status_code, again.json()["error"]) == (409, "already-released")
    active = (await env.get(Role.OFFICER, f"{API}/holds?include_released=false")).json()
    assert active["holds"] == []


async def test_conversation_and_saved_search_holds(env: ApiEnv) -> None:
    pair = await env.post(
        Role.OFFICER,
        f"{API}/holds",
        json={
            "case_name": "pair",
            "scope": {
                "kind": "conversation",
                "participants": ["alice@corp.example", "bob@partner.example"],
                "after": "2026-01-01T00:00:00Z",
            },
        },
    )
    assert pair.status_code == 201 and pair.json()["records_covered"] == 4
    saved = await env.post(
        Role.OFFICER,
        f"{API}/holds",
        json={"case_name": "words", "scope": {"kind": "search", "query": "guarantee*"}},
    )
    assert saved.status_code == 201 and saved.json()["records_covered"] == 3


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"case_name": "x", "scope": {"kind": "search", "query": "from:"}}, 400, "query-syntax"),
        ({"case_name": "x", "scope": {"kind": "person", "jid": "a/b@c"}}, 400, "invalid-request"),
        ({"case_name": "  ", "scope": {"kind": "person", "jid": "a@b.example"}}, 400, None),
        ({"case_name": "x", "scope": {"kind": "planet"}}, 422, "validation"),
        ({"case_name": "x", "scope": {"kind": "person", "jid": "a@b", "x": 1}}, 422, None),
        ({"case_name": "x" * 2000, "scope": {"kind": "person", "jid": "a@b"}}, 422, None),
        ({"scope": {"kind": "person", "jid": "a@b"}}, 422, "validation"),
        (
            {"case_name": "x", "scope": {"kind": "conversation", "room": "r@m", "after": "soon"}},
            422,
            None,
        ),
        (
            {
                "case_name": "x",
                "scope": {"kind": "conversation", "participants": ["a@b", "c@d"], "room": "r@m"},
            },
            400,
            None,
        ),
    ],
)
async def test_bad_holds_are_refused(
    env: ApiEnv, body: dict[str, Any], status: int, error: str | None
) -> None:
    response = await env.post(Role.OFFICER, f"{API}/holds", json=body)
    assert response.status_code == status, response.text
    if error is not None:
        assert response.json()["error"] == error
    if error == "query-syntax":
        assert response.json()["position"] == 5
    assert (await env.get(Role.OFFICER, f"{API}/holds")).json()["holds"] == []


async def test_unknown_holds_are_404(env: ApiEnv) -> None:
    assert (await env.get(Role.OFFICER, f"{API}/holds/hold-nope")).status_code == 404
    missing = await env.post(Role.ADMIN, f"{API}/holds/hold-nope/release", json={})
    assert missing.status_code == 404
    assert (await last_event(env)).outcome == "invalid"


# --- exports ----------------------------------------------------------------------------------


async def run_export(env: ApiEnv, body: dict[str, Any]) -> dict[str, Any]:
    started = await env.post(Role.OFFICER, f"{API}/exports", json=body)
    assert started.status_code == 202, started.text
    job = started.json()
    assert env.ctx.export_jobs is not None
    await env.ctx.export_jobs.wait(job["job_id"])
    done = await env.get(Role.OFFICER, f"{API}/exports/{job['job_id']}")
    result: dict[str, Any] = done.json()
    return result


async def test_an_export_runs_in_the_background_and_downloads_with_its_manifest(
    env: ApiEnv,
) -> None:
    job = await run_export(env, {"query": "from:alice@corp.example", "format": "jsonl"})
    assert (job["state"], job["written"], job["total"]) == ("done", 3, 3)
    started = next(e for e in await env.events() if e.action == "export")
    assert (started.result_count, started.params["job_id"]) == (3, job["job_id"])
    job_id = job["job_id"]
    manifest = await env.get(Role.OFFICER, f"{API}/exports/{job_id}/files/manifest.json")
    assert manifest.status_code == 200
    described = manifest.json()
    assert described["record_count"] == 3 and described["actor"] == "token:officer-1"
    (listed,) = described["files"]
    data = await env.get(Role.OFFICER, f"{API}/exports/{job_id}/files/{listed['name']}")
    assert data.status_code == 200
    assert hashlib.sha256(data.content).hexdigest() == listed["sha256"]
    lines = [json.loads(line) for line in data.content.splitlines()]
    assert [r["record_id"] for r in lines] == ["r-alice-1", "r-alice-2", "r-room"]
    download = await last_event(env)
    assert (download.action, download.params["file"], download.result_count) == (
        "export",
        "records.jsonl",
        3,
    )
    listing = (await env.get(Role.ADMIN, f"{API}/exports")).json()["exports"]
    assert [j["job_id"] for j in listing] == [job_id]
    assert env.ctx.export_jobs is not None
    assert verify_manifest(env.ctx.export_jobs.root / job_id / "files") == []


async def test_an_export_of_a_hold_in_csv(env: ApiEnv) -> None:
    hold = await env.post(
        Role.OFFICER,
        f"{API}/holds",
        json={"case_name": "c", "scope": {"kind": "person", "jid": "*@bad.example"}},
    )
    job = await run_export(env, {"hold_id": hold.json()["hold_id"], "format": "csv"})
    assert job["state"] == "done" and job["written"] == 2
    assert job["source"]["kind"] == "hold"


@pytest.mark.parametrize(
    "name",
    [
        "../job.json",
        "..%2Fjob.json",
        "%2e%2e/%2e%2e/keys/checkpoint-signing.pem",
        "/etc/passwd",
        "files/../../../keys/checkpoint-signing.pem",
        "records.jsonl%2F..",
        "RECORDS.JSONL",
        "job.json",
        "x" * 1001,
    ],
)
async def test_export_downloads_cannot_leave_the_export(env: ApiEnv, name: str) -> None:
    job = await run_export(env, {"query": "lunch", "format": "jsonl"})
    response = await env.client.get(
        f"{API}/exports/{job['job_id']}/files/{name}", headers=env.auth(Role.OFFICER)
    )
    assert response.status_code in (404, 422), (name, response.status_code)
    assert b"PRIVATE KEY" not in response.content
    assert response.json()["error"] in ("not-found", "validation")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"query": "x", "hold_id": "hold-1"}, 422),
        ({"query": "x", "format": "docx"}, 422),
        ({"query": "from:"}, 400),
        ({"hold_id": "hold-nope"}, 404),
        ({"hold_id": "../../etc"}, 422),
    ],
)
async def test_bad_exports_are_refused(env: ApiEnv, body: dict[str, Any], status: int) -> None:
    response = await env.post(Role.OFFICER, f"{API}/exports", json=body)
    assert response.status_code == status, response.text
    assert (await env.get(Role.OFFICER, f"{API}/exports")).json()["exports"] == []


async def test_unknown_export_jobs_are_404(env: ApiEnv) -> None:
    missing = await env.get(Role.OFFICER, f"{API}/exports/exp-0123456789abcdef")
    assert missing.status_code == 404
    files = await env.get(Role.OFFICER, f"{API}/exports/exp-0123456789abcdef/files/manifest.json")
    assert files.status_code == 404
    malformed = await env.get(Role.OFFICER, f"{API}/exports/exp-zz")
    assert malformed.status_code == 422


# --- review -----------------------------------------------------------------------------------


async def test_review_queues_list_held_and_flagged_messages(env: ApiEnv) -> None:
    held = (await env.get(Role.OFFICER, f"{API}/review/quarantine")).json()
    assert [r["record_id"] for r in held["records"]] == ["r-held"]
    assert [reason["rule_id"] for reason in held["records"][0]["reasons"]] == ["stranger", "model"]
    flagged = (await env.get(Role.OFFICER, f"{API}/review/flagged")).json()
    assert [r["record_id"] for r in flagged["records"]] == ["r-flagged"]
    listing = await last_event(env)
    assert (listing.action, listing.params["queue"], listing.result_count) == ("search", "flag", 1)


async def test_a_decision_goes_to_the_running_proxy_through_the_mailbox(env: ApiEnv) -> None:
    # No proxy runs here: the request waits in DATA/review and the answer says so (202).
    response = await env.post(Role.OFFICER, f"{API}/review/r-held/release")
    assert response.status_code == 202, response.text
    assert response.json()["queued"] is True
    pending = RequestQueue(ReviewPaths.of(env.data_dir)).pending()
    ((_, request),) = pending
    assert request is not None
    assert (request.kind.value, request.record_id, request.actor) == (
        "release",
        "r-held",
        "token:officer-1",
    )
    event = await last_event(env)
    assert (event.action, event.params["queued"], event.outcome) == ("release", True, "ok")
    # A flagged message's confirm-spam is a spam label; not-spam on a held one a release.
    await env.post(Role.OFFICER, f"{API}/review/r-flagged/confirm-spam")
    await env.post(Role.OFFICER, f"{API}/review/r-held/not-spam")
    await env.post(Role.OFFICER, f"{API}/review/r-bob-1/label", json={"label": "ham"})
    kinds = [r.kind.value for _, r in RequestQueue(ReviewPaths.of(env.data_dir)).pending() if r]
    assert kinds == ["release", "label-spam", "release", "label-ham"]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/review/nope/release", None, 404),
        ("/review/nope/label", {"label": "spam"}, 404),
        ("/review/r-held/label", {"label": "eggs"}, 422),
        ("/review/r-held/label", {}, 422),
        ("/review/..%2Fx/release", None, 404),
    ],
)
async def test_bad_review_requests(
    env: ApiEnv, path: str, body: dict[str, Any] | None, status: int
) -> None:
    response = await env.post(Role.OFFICER, f"{API}{path}", json=body)
    assert response.status_code == status, response.text
    assert RequestQueue(ReviewPaths.of(env.data_dir)).pending() == []


# --- policy -----------------------------------------------------------------------------------

GOOD = POLICY + '\n[federation]\nmode = "deny"\ndomains = ["spam.example"]\n'


async def test_policy_validate_put_and_versions(env: ApiEnv) -> None:
    current = (await env.get(Role.ADMIN, f"{API}/policy")).json()
    assert (current["text"], current["version"], current["editable"]) == (POLICY, None, True)
    valid = await env.post(Role.ADMIN, f"{API}/policy/validate", json={"text": GOOD})
    assert valid.json() == {"valid": True, "problems": []}
    put = await env.client.put(
        f"{API}/policy",
        json={"text": GOOD, "comment": "deny spam.example"},
        headers=env.auth(Role.ADMIN),
    )
    assert put.status_code == 200, put.text
    # The file found on disk became version 1, the new text version 2.
    assert put.json()["version"] == 2
    assert env.policy_path.read_text() == GOOD
    event = await last_event(env)
    assert (event.action, event.params["old_version"], event.params["new_version"]) == (
        "policy-change",
        None,
        2,
    )
    assert event.params["comment"] == "deny spam.example"
    versions = (await env.get(Role.ADMIN, f"{API}/policy/versions")).json()["versions"]
    assert [(v["version"], v["actor"]) for v in versions] == [(1, "file"), (2, "token:admin-1")]
    first = (await env.get(Role.ADMIN, f"{API}/policy/versions/1")).json()
    assert first["text"] == POLICY
    assert (await env.get(Role.ADMIN, f"{API}/policy")).json()["version"] == 2
    # An edit from a stale version is refused, and so is one from the right version twice.
    stale = await env.client.put(
        f"{API}/policy", json={"text": POLICY, "base_version": 1}, headers=env.auth(Role.ADMIN)
    )
    assert (stale.status_code, stale.json()["error"]) == (409, "policy-conflict")
    fresh = await env.client.put(
        f"{API}/policy", json={"text": POLICY, "base_version": 2}, headers=env.auth(Role.ADMIN)
    )
    assert fresh.status_code == 200 and fresh.json()["version"] == 3


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("version = 1\nlocal_domains = [\n", 3, None),  # at the end of the document
        (
            'version = 1\nlocal_domains = ["corp.example"]\n[federation]\nmode = "maybe"\n',
            4,
            "federation.mode",
        ),
        ("version = 1\nlocal_domains = ['corp.example']\nunknown_thing = 3\n", 3, None),
        ("version = 99\n", 1, "version"),
        ("\x00", 1, None),
    ],
)
async def test_an_invalid_policy_is_a_422_with_its_line(
    env: ApiEnv, text: str, line: int, key: str | None
) -> None:
    put = await env.client.put(f"{API}/policy", json={"text": text}, headers=env.auth(Role.ADMIN))
    assert put.status_code == 422, put.text
    body = put.json()
    assert body["error"] == "invalid-policy"
    (problem,) = body["problems"]
    assert problem["line"] == line, problem
    if key is not None:
        assert problem["key"] == key
    assert env.policy_path.read_text() == POLICY  # nothing written
    assert (await env.get(Role.ADMIN, f"{API}/policy/versions")).json()["versions"] == []
    event = await last_event(env)
    assert (event.action, event.outcome) == ("policy-change", "invalid")


async def test_policy_bad_requests(env: ApiEnv) -> None:
    huge = await env.client.put(
        f"{API}/policy", json={"text": "#" * (5 * 1024 * 1024)}, headers=env.auth(Role.ADMIN)
    )
    assert huge.status_code == 422
    assert (await env.get(Role.ADMIN, f"{API}/policy/versions/7")).status_code == 404
    assert (await env.get(Role.ADMIN, f"{API}/policy/versions/0")).status_code == 422
    assert (await env.get(Role.ADMIN, f"{API}/policy/versions/abc")).status_code == 422


async def test_a_body_over_the_limit_is_refused_before_it_is_read(env: ApiEnv) -> None:
    response = await env.client.put(
        f"{API}/policy",
        content=b"{" + b" " * (9 * 1024 * 1024) + b"}",
        headers={**env.auth(Role.ADMIN), "Content-Type": "application/json"},
    )
    assert (response.status_code, response.json()["error"]) == (413, "too-large")


# --- tokens -----------------------------------------------------------------------------------


async def test_tokens_create_list_revoke(env: ApiEnv) -> None:
    made = await env.post(
        Role.ADMIN, f"{API}/tokens", json={"name": "desk-2", "role": "auditor", "expires_days": 30}
    )
    assert made.status_code == 201, made.text
    secret = made.json()["secret"]
    assert secret.startswith("sg_")
    headers = {"Authorization": f"Bearer {secret}"}
    assert (await env.client.get(f"{API}/audit/verify", headers=headers)).status_code == 200
    listed = (await env.get(Role.ADMIN, f"{API}/tokens")).json()["tokens"]
    # Oldest first; these were made at the same instant, so by name.
    assert [t["name"] for t in listed] == ["admin-1", "auditor-1", "desk-2", "officer-1"]
    assert all("secret" not in t for t in listed)
    assert secret not in json.dumps([e.params for e in await env.events()])
    revoked = await env.post(Role.ADMIN, f"{API}/tokens/desk-2/revoke")
    assert revoked.json()["state"] == "revoked"
    assert (await env.client.get(f"{API}/audit/verify", headers=headers)).status_code == 401
    again = await env.post(Role.ADMIN, f"{API}/tokens", json={"name": "desk-2", "role": "officer"})
    assert (again.status_code, again.json()["error"]) == (409, "already-exists")
    missing = await env.post(Role.ADMIN, f"{API}/tokens/nobody/revoke")
    assert missing.status_code == 404
    bad = await env.post(Role.ADMIN, f"{API}/tokens", json={"name": "a b", "role": "officer"})
    assert bad.status_code == 400
    actions = [(e.action, e.outcome) for e in (await env.events())[-6:]]
    assert ("token-create", "ok") in actions and ("token-revoke", "ok") in actions
