"""The dashboard, health and readiness, metrics and the OpenAPI document with its viewer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from archive_api.auth import Role
from tests.archive_api.api_support import ApiEnv, api_env

API = "/api/v1"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[ApiEnv]:
    async with api_env(tmp_path) as made:
        yield made


async def test_the_dashboard_counts_per_day_and_lists_the_top(env: ApiEnv) -> None:
    response = await env.get(Role.AUDITOR, f"{API}/dashboard", params={"days": "7"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["since"], body["until"]) == (
        "2026-01-14T00:00:00+00:00",
        "2026-01-21T00:00:00+00:00",
    )
    days = {d["day"]: d for d in body["days"]}
    assert list(days) == [f"2026-01-{n}" for n in range(14, 21)]
    assert days["2026-01-15"] == {
        "day": "2026-01-15",
        "messages": 9,
        "blocked": 2,
        "quarantined": 1,
        "flagged": 1,
    }
    assert days["2026-01-16"]["messages"] == 0
    assert body["totals"] == {"messages": 9, "blocked": 2, "quarantined": 1, "flagged": 1}
    assert body["top_blocked_domains"] == [{"domain": "bad.example", "count": 2}]
    assert body["top_rules"][0] == {"rule": "federation", "count": 2}
    assert {r["rule"] for r in body["top_rules"]} == {
        "federation",
        "blocklist",
        "stranger",
        "model",
        "lexicon",
    }
    # A window that leaves the seeded day out.
    short = (await env.get(Role.OFFICER, f"{API}/dashboard", params={"days": "2"})).json()
    assert short["totals"]["messages"] == 0 and short["top_rules"] == []


@pytest.mark.parametrize("params", [{"days": "0"}, {"days": "367"}, {"top": "1000"}])
async def test_bad_dashboard_windows_are_422(env: ApiEnv, params: dict[str, str]) -> None:
    response = await env.get(Role.AUDITOR, f"{API}/dashboard", params=params)
    assert response.status_code == 422


async def test_health_readiness_and_metrics(env: ApiEnv) -> None:
    assert (await env.client.get("/healthz")).json() == {"status": "ok"}
    ready = await env.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    await env.get(Role.OFFICER, f"{API}/search", params={"q": "lunch"})
    metrics = (await env.client.get("/metrics")).text
    assert (
        'stanzaguard_api_requests_total{method="GET",route="/api/v1/search",status="200"} 1.0'
        in metrics
    )
    assert "lunch" not in metrics  # labels are route templates, never what was asked
    await env.store.close()
    down = await env.client.get("/readyz")
    assert (down.status_code, down.json()["error"]) == (503, "not-ready")
    assert (await env.client.get("/healthz")).status_code == 200


async def test_the_openapi_document_and_its_viewer_need_nothing_from_outside(
    env: ApiEnv,
) -> None:
    spec = (await env.client.get("/openapi.json")).json()
    assert f"{API}/search" in spec["paths"] and f"{API}/messages/{{record_id}}" in spec["paths"]
    page = await env.client.get("/docs")
    assert page.status_code == 200
    assert "/docs/static/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text.replace(
        "https://fastapi.tiangolo.com", ""
    )
    script = await env.client.get("/docs/static/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000


async def test_unknown_paths_and_methods_answer_json(env: ApiEnv) -> None:
    missing = await env.client.get(f"{API}/nothing-here")
    assert (missing.status_code, missing.json()["error"]) == (404, "not-found")
    wrong = await env.client.delete(f"{API}/search", headers=env.auth(Role.OFFICER))
    assert (wrong.status_code, wrong.json()["error"]) == (405, "method-not-allowed")
