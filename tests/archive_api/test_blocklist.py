"""The published block list: the service (archive_api/blocklist.py) and its routes.

The routes run in the real composition (`stanzaguard.api_wiring.ApiService`) on a real
SQLite store, through httpx over ASGI, with real API tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from archive_api.auth import AuthMethod, Identity, Role
from archive_api.blocklist import (
    BlocklistPolicy,
    BlocklistService,
    ListFormat,
    etag_matches,
    strong_etag,
)
from archive_api.errors import InvalidInput
from archive_api.store.errors import NotFound
from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from classifier.listing import (
    Decision,
    EntryKind,
    EntryState,
    ListingRule,
    ReviewMode,
    SenderEvidence,
)
from stanzaguard.api_wiring import ApiService
from stanzaguard.settings import Settings

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OWN = frozenset({"corp.example"})
OPERATOR = Identity("cli:tester", "tester", Role.ADMIN, AuthMethod.CLI)
CONFIRMED = SenderEvidence(officer_spam=1)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with await SqliteStore.open(tmp_path / "a.sqlite3") as opened:
        yield opened


def service_on(store: SqliteStore, mode: ReviewMode, domain_jids: int = 2) -> BlocklistService:
    rule = ListingRule(own_domains=OWN, domain_listed_jids=domain_jids)
    return BlocklistService(store, ManualClock(NOW), BlocklistPolicy(rule, mode))


# --- the service ------------------------------------------------------------------------------


async def test_auto_mode_lists_at_once_and_the_domain_follows(store: SqliteStore) -> None:
    service = service_on(store, ReviewMode.AUTO)
    await service.consider_jid("a@spam.example", CONFIRMED)
    assert await service.published_ids(EntryKind.DOMAIN) == frozenset()
    changed = await service.consider_jid("b@spam.example", CONFIRMED)
    assert {(e.kind, e.value, e.state) for e in changed} == {
        ("jid", "b@spam.example", "listed"),
        ("domain", "spam.example", "listed"),
    }
    assert await service.published_ids(EntryKind.JID) == {
        sha("a@spam.example"),
        sha("b@spam.example"),
    }
    # An officer clears one sender: it is retracted, and the domain falls below the threshold.
    changed = await service.consider_jid("b@spam.example", SenderEvidence(cleared=True))
    assert {(e.value, e.state) for e in changed} == {
        ("b@spam.example", "retracted"),
        ("spam.example", "retracted"),
    }
    assert await service.published_ids(EntryKind.DOMAIN) == frozenset()


async def test_approve_mode_waits_for_an_officer(store: SqliteStore) -> None:
    service = service_on(store, ReviewMode.APPROVE)
    await service.consider_jid("a@spam.example", CONFIRMED)
    assert await service.published_ids(EntryKind.JID) == frozenset()
    pending = await service.entries(state=EntryState.PENDING)
    assert [e.value for e in pending] == ["a@spam.example"]
    await service.decide(EntryKind.JID, "A@Spam.Example", Decision.APPROVE, "officer-1", None)
    assert await service.published_ids(EntryKind.JID) == {sha("a@spam.example")}
    approved = await store.blocklist_entry("jid", "a@spam.example")
    assert approved is not None and approved.actor == "officer-1"
    # Approval agrees with the rule: a later clearing still retracts it.
    await service.consider_jid("a@spam.example", SenderEvidence(cleared=True))
    assert await service.published_ids(EntryKind.JID) == frozenset()


async def test_a_rejected_entry_is_not_proposed_again(store: SqliteStore) -> None:
    service = service_on(store, ReviewMode.APPROVE)
    await service.consider_jid("a@spam.example", CONFIRMED)
    await service.decide(EntryKind.JID, "a@spam.example", Decision.REJECT, "officer-1", "no")
    assert await service.consider_jid("a@spam.example", SenderEvidence(officer_spam=9)) == ()
    found = await store.blocklist_entry("jid", "a@spam.example")
    assert found is not None and found.state == "rejected" and found.reason == "no"


async def test_an_officer_listing_is_not_undone_by_the_rule(store: SqliteStore) -> None:
    service = service_on(store, ReviewMode.AUTO)
    await service.decide(EntryKind.DOMAIN, "spam.example", Decision.ADD, "officer-1", None)
    await service.consider_jid("a@spam.example", SenderEvidence(cleared=True))
    assert await service.published_ids(EntryKind.DOMAIN) == {"spam.example"}
    await service.decide(EntryKind.DOMAIN, "spam.example", Decision.RETRACT, "officer-1", None)
    assert await service.published_ids(EntryKind.DOMAIN) == frozenset()


async def test_own_and_malformed_senders_are_never_listed(store: SqliteStore) -> None:
    service = service_on(store, ReviewMode.AUTO)
    for sender in ("alice@corp.example", "ALICE@Corp.Example", "", "no-at", "a@b/c"):
        assert await service.consider_jid(sender, SenderEvidence(officer_spam=5)) == ()
    assert await service.entries() == ()


@pytest.mark.parametrize(
    ("kind", "value", "decision", "error"),
    [
        (EntryKind.JID, "nobody@spam.example", Decision.RETRACT, NotFound),
        (EntryKind.JID, "nobody@spam.example", Decision.APPROVE, NotFound),
        (EntryKind.DOMAIN, "corp.example", Decision.ADD, InvalidInput),
        (EntryKind.JID, "x@spam.example/r", Decision.ADD, InvalidInput),
        (EntryKind.DOMAIN, "*", Decision.ADD, InvalidInput),
        (EntryKind.DOMAIN, "\u202espam.example", Decision.ADD, InvalidInput),
    ],
)
async def test_bad_decisions_are_refused(
    store: SqliteStore,
    kind: EntryKind,
    value: str,
    decision: Decision,
    error: type[Exception],
) -> None:
    service = service_on(store, ReviewMode.AUTO)
    with pytest.raises(error):
        await service.decide(kind, value, decision, "officer-1", None)
    assert await service.entries() == ()


async def test_the_rendered_list_changes_its_etag_with_its_content(store: SqliteStore) -> None:
    service = service_on(store, ReviewMode.AUTO)
    empty = await service.render(ListFormat.DOMAINS)
    assert empty.body == b""
    await service.decide(EntryKind.DOMAIN, "b.example", Decision.ADD, "o", None)
    await service.decide(EntryKind.DOMAIN, "a.example", Decision.ADD, "o", None)
    text = await service.render(ListFormat.DOMAINS)
    assert text.body == b"a.example\nb.example\n"
    assert text.etag == strong_etag(text.body) != empty.etag
    assert (await service.render(ListFormat.DOMAINS)).etag == text.etag
    with pytest.raises(InvalidInput):
        await service.render("../../etc/passwd")


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ('"abc"', True),
        ('W/"abc"', True),
        ('"x", "abc"', True),
        ("*", True),
        ("abc", False),
        ('"abc', False),
        ("", False),
        (None, False),
        ('"' + "a" * 9000 + '"', False),
        ("\x00\xff garbage ,,,", False),
        ('"ab"c"', False),
    ],
)
def test_if_none_match_parsing(header: str | None, matches: bool) -> None:
    assert etag_matches(header, '"abc"') is matches


# --- the routes -------------------------------------------------------------------------------


@dataclass
class Api:
    service: ApiService
    client: httpx.AsyncClient
    tokens: dict[Role, str]

    def auth(self, role: Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    async def decide(self, role: Role, **body: Any) -> httpx.Response:
        return await self.client.post("/api/v1/rtbl/decisions", json=body, headers=self.auth(role))

    async def actions(self) -> list[tuple[str, str, dict[str, Any]]]:
        await self.service.context.audit.flush()
        page = await self.service.store.audit_events(newest_first=False, limit=1000)
        return [(e.action, e.outcome, dict(e.params)) for e in page.events]


async def open_api(tmp_path: Path, **settings: Any) -> tuple[ApiService, dict[Role, str]]:
    config = Settings(
        data_dir=tmp_path / "data",
        domain=["corp.example"],
        environment="production",
        session_secret="test-session-secret-0123456789-abcdefghij",
        blocklist_learning=True,
        **settings,
    )
    service = await ApiService.open(config, ManualClock(NOW), routers=())
    tokens = {}
    for role in (Role.ADMIN, Role.OFFICER, Role.AUDITOR):
        issued = await service.context.tokens.create(OPERATOR, name=f"{role.value}-1", role=role)
        tokens[role] = issued.secret
    return service, tokens


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    service, tokens = await open_api(
        tmp_path, blocklist_http="public", blocklist_http_plain_jids=True
    )
    try:
        transport = httpx.ASGITransport(app=service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Api(service, client, tokens)
    finally:
        await service.close()


async def test_lists_are_plain_text_with_etag_and_304(api: Api) -> None:
    answer = await api.decide(
        Role.OFFICER, kind="jid", value="Spammer@Spam.Example", decision="add"
    )
    assert answer.status_code == 200, answer.text
    hashed = await api.client.get("/api/v1/rtbl/jids-sha256.txt")
    assert hashed.status_code == 200
    assert hashed.headers["content-type"].startswith("text/plain")
    assert hashed.text == sha("spammer@spam.example") + "\n"
    etag = hashed.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    again = await api.client.get("/api/v1/rtbl/jids-sha256.txt", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    plain = await api.client.get("/api/v1/rtbl/jids.txt")
    assert plain.text == "spammer@spam.example\n"
    domains = await api.client.get("/api/v1/rtbl/domains.txt")
    assert domains.status_code == 200 and domains.text == ""
    head = await api.client.head("/api/v1/rtbl/jids.txt")
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"]


@pytest.mark.parametrize(
    "header", ["garbage", '"', "W/", "*,*", '"' * 500, "\t", 'W/"nope", "other"']
)
async def test_if_none_match_garbage_gets_the_whole_list(api: Api, header: str) -> None:
    await api.decide(Role.OFFICER, kind="domain", value="spam.example", decision="add")
    answer = await api.client.get("/api/v1/rtbl/domains.txt", headers={"If-None-Match": header})
    assert answer.status_code == 200 and answer.text == "spam.example\n"


async def test_unknown_lists_are_404(api: Api) -> None:
    for path in ("nothing.txt", "..%2f..%2fetc%2fpasswd.txt", "x" * 3000 + ".txt"):
        answer = await api.client.get(f"/api/v1/rtbl/{path}")
        assert answer.status_code == 404, path


async def test_review_and_decisions_need_the_review_permission_and_are_audited(
    api: Api,
) -> None:
    denied = await api.decide(Role.AUDITOR, kind="domain", value="spam.example", decision="add")
    assert denied.status_code == 403
    anonymous = await api.client.post(
        "/api/v1/rtbl/decisions", json={"kind": "domain", "value": "x.example", "decision": "add"}
    )
    assert anonymous.status_code == 401
    assert (await api.client.get("/api/v1/rtbl/entries")).status_code == 401
    ok = await api.decide(Role.OFFICER, kind="domain", value="spam.example", decision="add")
    assert ok.status_code == 200
    retracted = await api.decide(
        Role.ADMIN, kind="domain", value="spam.example", decision="retract", reason="mistake"
    )
    assert retracted.json()["changed"][0]["state"] == "retracted"
    unknown = await api.decide(Role.OFFICER, kind="jid", value="x@y.example", decision="retract")
    assert unknown.status_code == 404
    listing = await api.client.get(
        "/api/v1/rtbl/entries", params={"state": "retracted"}, headers=api.auth(Role.OFFICER)
    )
    assert listing.status_code == 200
    assert [e["value"] for e in listing.json()["entries"]] == ["spam.example"]
    assert listing.json()["mode"] == "approve"
    decided = [(o, p["decision"]) for a, o, p in await api.actions() if a == "rtbl-decide"]
    assert decided == [("ok", "add"), ("ok", "retract"), ("invalid", "retract")]
    assert any(a == "rtbl-read" for a, _, _ in await api.actions())


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "jid", "value": "", "decision": "add"},
        {"kind": "jid", "value": "x" * 5000, "decision": "add"},
        {"kind": "ip", "value": "1.2.3.4", "decision": "add"},
        {"kind": "jid", "value": "x@spam.example", "decision": "nuke"},
        {"kind": "jid", "value": "x@spam.example", "decision": "add", "extra": 1},
        {"kind": "jid", "value": "x@spam.example/res", "decision": "add"},
        {"kind": "jid", "value": "boss@corp.example", "decision": "add"},
        {"kind": "domain", "value": "*.spam.example", "decision": "add"},
        {"kind": "domain", "value": "<b>.example", "decision": "add"},
        {"kind": "jid", "value": ["x@spam.example"], "decision": "add"},
    ],
)
async def test_malformed_decisions_are_refused(api: Api, body: dict[str, Any]) -> None:
    answer = await api.decide(Role.OFFICER, **body)
    assert answer.status_code in (400, 422), answer.text
    assert (await api.client.get("/api/v1/rtbl/jids.txt")).text == ""


async def test_a_huge_list_is_served_whole(api: Api) -> None:
    from archive_api.store.base import BlocklistEntry

    entries = [
        BlocklistEntry("jid", f"u{i:05}@spam.example", "listed", "officer", "bulk", NOW)
        for i in range(20_000)
    ]
    store = api.service.store
    assert isinstance(store, SqliteStore)
    await store.put_blocklist_entries(entries)
    answer = await api.client.get("/api/v1/rtbl/jids-sha256.txt")
    lines = answer.text.splitlines()
    assert len(lines) == 20_000 and lines == sorted(lines)
    assert answer.headers["x-entries"] == "20000"


async def test_token_mode_needs_a_token_and_off_mode_hides_plain_jids(tmp_path: Path) -> None:
    service, tokens = await open_api(tmp_path, blocklist_http="token")
    try:
        transport = httpx.ASGITransport(app=service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/api/v1/rtbl/domains.txt")).status_code == 401
            headers = {"Authorization": f"Bearer {tokens[Role.AUDITOR]}"}
            answer = await client.get("/api/v1/rtbl/domains.txt", headers=headers)
            assert answer.status_code == 200
            # jids.txt (names in clear) is only there when asked for
            assert (await client.get("/api/v1/rtbl/jids.txt", headers=headers)).status_code == 404
    finally:
        await service.close()


async def test_off_mode_serves_no_lists_but_keeps_the_review(tmp_path: Path) -> None:
    service, tokens = await open_api(tmp_path, blocklist_http="off")
    try:
        transport = httpx.ASGITransport(app=service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            headers = {"Authorization": f"Bearer {tokens[Role.ADMIN]}"}
            answer = await client.get("/api/v1/rtbl/domains.txt", headers=headers)
            assert answer.status_code == 404
            entries = await client.get("/api/v1/rtbl/entries", headers=headers)
            assert entries.status_code == 200
    finally:
        await service.close()


async def test_without_blocklist_learning_there_are_no_routes(tmp_path: Path) -> None:
    config = Settings(
        data_dir=tmp_path / "data",
        domain=["corp.example"],
        environment="development",
    )
    service = await ApiService.open(config, ManualClock(NOW), routers=())
    try:
        transport = httpx.ASGITransport(app=service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/api/v1/rtbl/domains.txt")).status_code in (401, 404)
    finally:
        await service.close()
