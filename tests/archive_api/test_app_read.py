"""Search, the message view (with its chain proof) and the conversation view, through HTTP."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive_api.auth import Role
from archive_api.store.chain import Checkpoint, link_hash
from tests.archive_api.api_support import ApiEnv, api_env, at
from tests.archive_api.store.conformance import record

API = "/api/v1"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[ApiEnv]:
    async with api_env(tmp_path) as made:
        yield made


# --- search ---------------------------------------------------------------------------------


async def test_search_highlights_matches_and_gives_facets_on_the_first_page(env: ApiEnv) -> None:
    response = await env.get(Role.OFFICER, f"{API}/search", params={"q": "guarantee"})
    assert response.status_code == 200, response.text
    body = response.json()
    ids = [hit["record_id"] for hit in body["hits"]]
    assert ids == ["r-alice-2", "r-alice-1"]  # newest first
    snippet = body["hits"][0]["snippet"]
    assert {"text": "guarantee", "match": True} in snippet
    assert "".join(part["text"] for part in snippet) == "we guarantee returns (corrected)"
    assert body["total"] == 2
    assert body["facets"]["verdict"] == [{"value": "allow", "count": 2}]
    assert body["facets"]["remote_domain"] == [{"value": "partner.example", "count": 2}]
    assert body["facets"]["day"] == [{"value": "2026-01-15", "count": 2}]
    assert body["query"] == "guarantee" and body["next_cursor"] is None


async def test_search_pages_with_a_stable_cursor_and_sorts_by_relevance(env: ApiEnv) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"q": "to:alice@corp.example", "limit": "2"}
        if cursor:
            params["cursor"] = cursor
        body = (await env.get(Role.OFFICER, f"{API}/search", params=params)).json()
        pages += 1
        assert ("facets" in body) == (cursor is None)
        seen += [hit["record_id"] for hit in body["hits"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ["r-dropped", "r-rejected", "r-held", "r-bob-2", "r-bob-1"]
    assert pages == 3 and len(set(seen)) == len(seen)
    relevance = await env.get(
        Role.OFFICER, f"{API}/search", params={"q": "guarantee", "sort": "relevance"}
    )
    hits = relevance.json()["hits"]
    assert all(hit["score"] is not None for hit in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


@pytest.mark.parametrize(
    ("query", "position"),
    [
        ("from:", 5),
        ('"unterminated phrase', 0),
        ("lunch colour:red", 6),
        ("verdict:maybe", 8),
        ("after:2026-13-01", 6),
        ("-", 0),
        ("x\x01y", 1),
    ],
)
async def test_a_malformed_query_is_a_400_pointing_at_the_problem(
    env: ApiEnv, query: str, position: int
) -> None:
    response = await env.get(Role.OFFICER, f"{API}/search", params={"q": query})
    assert response.status_code == 400, response.text
    body = response.json()
    assert (body["error"], body["position"]) == ("query-syntax", position)
    assert body["detail"]
    last = (await env.events())[-1]
    assert (last.action, last.outcome, last.params["q"]) == ("search", "invalid", query)


@pytest.mark.parametrize(
    "cursor",
    ["garbage", "e30", "WzEsImFiYyIsMSxudWxsXQ", "%00", "x" * 999],
)
async def test_a_bad_cursor_is_a_400(env: ApiEnv, cursor: str) -> None:
    response = await env.get(Role.OFFICER, f"{API}/search", params={"q": "", "cursor": cursor})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad-cursor"


async def test_a_cursor_of_another_query_is_refused(env: ApiEnv) -> None:
    first = await env.get(Role.OFFICER, f"{API}/search", params={"q": "", "limit": "1"})
    cursor = first.json()["next_cursor"]
    other = await env.get(Role.OFFICER, f"{API}/search", params={"q": "lunch", "cursor": cursor})
    assert (other.status_code, other.json()["error"]) == (400, "bad-cursor")


@pytest.mark.parametrize(
    "params",
    [
        {"q": "a" * 20_000},
        {"q": "x", "limit": "201"},
        {"q": "x", "limit": "0"},
        {"q": "x", "limit": "many"},
        {"q": "x", "sort": "random"},
        {"q": "x", "cursor": "c" * 1001},
    ],
)
async def test_oversized_or_wrong_parameters_are_4xx_json(
    env: ApiEnv, params: dict[str, str]
) -> None:
    response = await env.get(Role.OFFICER, f"{API}/search", params=params)
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"] in ("validation", "query-syntax")


# --- the message view ---------------------------------------------------------------------------


async def test_the_message_view_has_everything_and_a_proof_that_verifies(env: ApiEnv) -> None:
    response = await env.get(Role.OFFICER, f"{API}/messages/r-alice-1")
    assert response.status_code == 200, response.text
    body = response.json()
    rec = body["record"]
    assert rec["record_id"] == "r-alice-1" and rec["body"] == "we guarantee a return on this deal"
    assert rec["raw_xml"] == "<message id='id-r-alice-1'/>"
    assert base64.b64decode(rec["raw_base64"]) == b"<message id='id-r-alice-1'/>"
    assert rec["observations"][0]["jid"] == "alice@corp.example/phone"
    assert rec["verdict"]["action"] == "allow"
    assert [(h["record_id"], h["role"]) for h in body["history"]] == [
        ("r-alice-1", "original"),
        ("r-alice-2", "correction"),
    ]
    chain = body["chain"]
    assert (chain["chain"], chain["seq"], chain["verified"], chain["covered"]) == (
        "spool",
        1,
        True,
        True,
    )
    assert {check["name"] for check in chain["checks"]} >= {
        "payload",
        "link-hash",
        "previous",
        "next",
        "path",
        "checkpoint-head",
        "checkpoint-signature",
    }
    # What a reader can check alone: the link's hash, its neighbour, the signature.
    link = chain["link"]
    payload = base64.b64decode(link["payload_base64"])
    assert link_hash(bytes.fromhex(link["prev_hash"]), 1, payload).hex() == link["hash"]
    assert chain["next"]["prev_hash"] == link["hash"]
    assert chain["previous"] is None and link["prev_hash"] == "00" * 32
    checkpoint = chain["checkpoint"]
    signed = Checkpoint(
        "spool",
        checkpoint["seq"],
        bytes.fromhex(checkpoint["head"]),
        bytes.fromhex(checkpoint["signature"]),
    )
    key = env.signer.public_key
    assert isinstance(key, Ed25519PublicKey) and signed.verify(key)
    # Only hashes of the neighbours, never their content.
    assert "payload_base64" not in chain["next"]


async def test_a_record_newer_than_the_last_checkpoint_is_not_yet_covered(env: ApiEnv) -> None:
    await env.add_records(record("r-late", at=at(30), body="after the checkpoint"))
    chain = (await env.get(Role.OFFICER, f"{API}/messages/r-late")).json()["chain"]
    assert chain["covered"] is False and chain["verified"] is True
    assert chain["checkpoint"]["seq"] < chain["seq"]


async def test_a_tampered_ledger_entry_fails_the_proof(env: ApiEnv) -> None:
    import sqlite3

    with sqlite3.connect(env.store.path) as conn:
        conn.execute(
            "UPDATE ledger SET payload = CAST(replace(CAST(payload AS TEXT), 'lunch', 'LUNCH')"
            " AS BLOB) WHERE id = (1 << 40 | 2)"
        )
    chain = (await env.get(Role.OFFICER, f"{API}/messages/r-alice-1")).json()["chain"]
    assert chain["verified"] is False
    failed = [check["name"] for check in chain["checks"] if not check["ok"]]
    assert failed == ["path"]


async def test_the_history_of_a_correction_and_a_retraction(env: ApiEnv) -> None:
    body = (await env.get(Role.OFFICER, f"{API}/messages/r-alice-2")).json()
    assert [h["record_id"] for h in body["history"]] == ["r-alice-1", "r-alice-2"]
    retracted = (await env.get(Role.OFFICER, f"{API}/messages/r-bob-1")).json()
    assert [(h["record_id"], h["role"]) for h in retracted["history"]] == [
        ("r-bob-1", "original"),
        ("r-bob-2", "retraction"),
    ]


@pytest.mark.parametrize(
    ("record_id", "status"),
    [("nope", 404), ("..%2F..%2Fetc%2Fpasswd", 404), ("a" * 129, 422), ("bad$id", 422)],
)
async def test_unknown_or_malformed_record_ids(env: ApiEnv, record_id: str, status: int) -> None:
    response = await env.get(Role.OFFICER, f"{API}/messages/{record_id}")
    assert response.status_code == status, response.text
    assert response.json()["error"] in ("not-found", "validation")


# --- the conversation view ----------------------------------------------------------------------


async def test_a_conversation_in_order_with_its_edits(env: ApiEnv) -> None:
    response = await env.get(
        Role.OFFICER,
        f"{API}/conversations",
        params=[("with", "bob@partner.example"), ("with", "Alice@Corp.Example")],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    records = body["records"]
    assert [r["record_id"] for r in records] == ["r-alice-1", "r-bob-1", "r-alice-2", "r-bob-2"]
    first = records[0]
    assert [e["record_id"] for e in first["edits"]] == ["r-alice-2"]
    assert first["retracted"] is False
    assert records[1]["retracted"] is True
    assert records[2]["replaces_id"] == "id-r-alice-1" and records[2]["edits"] == []


async def test_a_conversation_window_and_a_room(env: ApiEnv) -> None:
    windowed = await env.get(
        Role.OFFICER,
        f"{API}/conversations",
        params=[
            ("with", "alice@corp.example"),
            ("with", "bob@partner.example"),
            ("after", "2026-01-15T12:01:00"),
            ("before", "2026-01-15T12:03:00+00:00"),
        ],
    )
    assert [r["record_id"] for r in windowed.json()["records"]] == ["r-bob-1", "r-alice-2"]
    room = await env.get(
        Role.OFFICER, f"{API}/conversations", params={"room": "desk@conference.corp.example"}
    )
    assert [r["record_id"] for r in room.json()["records"]] == ["r-room"]


@pytest.mark.parametrize(
    "params",
    [
        [],
        [("with", "alice@corp.example")],
        [("with", "a@x.example"), ("with", "b@x.example"), ("with", "c@x.example")],
        [("with", "a@x.example"), ("with", "b@x.example"), ("room", "r@muc.example")],
        [("with", "a@x.example"), ("with", "a@x.example")],
        [("with", "a b@x.example"), ("with", "b@x.example")],
        [("room", "*@muc.example")],
        [("room", "r@muc.example"), ("after", "yesterday")],
        [("room", "r@muc.example"), ("after", "2026-02-01"), ("before", "2026-01-01")],
        [("room", "r" * 5000)],
    ],
)
async def test_bad_conversation_parameters_are_4xx(
    env: ApiEnv, params: list[tuple[str, str]]
) -> None:
    response = await env.get(Role.OFFICER, f"{API}/conversations", params=params)
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"] in ("invalid-request", "validation")


async def test_reads_are_audited_with_parameters_and_counts(env: ApiEnv) -> None:
    await env.get(Role.OFFICER, f"{API}/search", params={"q": "from:alice@corp.example"})
    await env.get(Role.OFFICER, f"{API}/messages/r-held")
    await env.get(
        Role.OFFICER,
        f"{API}/conversations",
        params=[("with", "alice@corp.example"), ("with", "bob@partner.example")],
    )
    search, view, conversation = (await env.events())[-3:]
    assert (search.action, search.actor, search.role, search.result_count) == (
        "search",
        "token:officer-1",
        "officer",
        3,
    )
    assert search.params["query"] == "from:alice@corp.example"
    assert (view.action, view.params, view.result_count) == ("view", {"record_id": "r-held"}, 1)
    assert (conversation.action, conversation.result_count) == ("conversation", 4)
    assert conversation.params["query"] == "with:alice@corp.example with:bob@partner.example"
    report = await env.audit.verify()
    assert report.ok, report.problems
