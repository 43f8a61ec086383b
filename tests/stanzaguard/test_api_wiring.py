"""The API's composition: the policy store over the policy file, review actions beside a
running proxy and through the mailbox, session settings, and serving on a port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from archive_api.auth import AuthMethod, Identity, Role
from archive_api.context import PolicyConflict, PolicyInvalid, ReviewLabel
from archive_api.store.errors import NotFound
from archive_api.store.records import Direction, EntryOp, RecordStatus, SpoolEntry
from classifier.clock import ManualClock
from classifier.verdict import Action, Reason, Verdict
from stanzaguard.api_wiring import (
    FilePolicyStore,
    MailboxReview,
    ServiceReview,
    locate_key,
    policy_problems,
    session_codec,
    start_api,
    start_beside,
)
from stanzaguard.errors import SettingsError
from stanzaguard.quarantine import FileChannel
from stanzaguard.settings import Settings, load_settings
from stanzaguard.wiring import ArchivingService
from tests.archive_api.store.conformance import record

POLICY = 'version = 1\nlocal_domains = ["corp.example"]\n'
DENY = POLICY + '[federation]\nmode = "deny"\ndomains = ["spam.example"]\naction = "reject"\n'
OPERATOR = Identity("cli:tester", "tester", Role.ADMIN, AuthMethod.CLI)


# --- policy validation and the policy store --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "where"),
    [
        ('[groups.traders]\nmembers = ["a@corp.example"]\n', "groups.traders.members[0]", (2, 1)),
        (
            '[[barriers]]\nname = "a"\n[[barriers]]\nname = "b"\ngroups = 1\n',
            "barriers[1].groups",
            (5, 1),
        ),
        ('[federation]\nmode = "x"\n', "federation", (1, 1)),
        ('[ "federation" ]\n  mode = "x"\n', "federation.mode", (2, 3)),
        ("federation.mode = 'x'\n", "federation.mode", (1, 1)),
        ("version = 1\n", "nothing.here", (None, None)),
        ("version = 1\n", None, (None, None)),
    ],
)
def test_locate_key(text: str, key: str | None, where: tuple[int | None, int | None]) -> None:
    assert locate_key(text, key) == where


def test_policy_problems() -> None:
    assert policy_problems(POLICY, frozenset()) == ()
    # The served domains stand in for a missing local_domains, as when the proxy loads it.
    assert policy_problems("version = 1\n", frozenset({"corp.example"})) == ()
    (syntax,) = policy_problems("version = 1\nx = [\n", frozenset())
    assert (syntax.line, syntax.key) == (3, None) and "TOML" in syntax.message
    (semantic,) = policy_problems(POLICY + '[federation]\nmode = "maybe"\n', frozenset())
    assert (semantic.line, semantic.column, semantic.key) == (4, 1, "federation.mode")
    (huge,) = policy_problems("#" * (17 * 1024 * 1024), frozenset())
    assert "larger" in huge.message
    (deep,) = policy_problems("x = " + "[" * 100_000, frozenset())
    assert deep.message


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 2, 1, tzinfo=UTC))


async def test_the_policy_store_versions_every_write_atomically(
    tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    written: list[int] = []
    store = FilePolicyStore(
        path,
        tmp_path / "history",
        frozenset(),
        clock,
        on_written=lambda: written.append(1),
    )
    assert (await store.current()).version is None
    first = await store.write(DENY, actor="token:admin-1", comment="deny spam")
    assert (first.version, first.actor, first.comment) == (2, "token:admin-1", "deny spam")
    assert path.read_text() == DENY and written == [1]
    assert [v.actor for v in await store.versions()] == ["file", "token:admin-1"]
    assert await store.version_text(1) == POLICY
    assert (await store.current()).version == 2
    # No temporary file is left beside the policy or in the history.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history", "policy.toml"]
    assert not [p for p in (tmp_path / "history").iterdir() if p.name.endswith(".tmp")]
    # Another process (another store on the same files) sees the same history.
    again = FilePolicyStore(path, tmp_path / "history", frozenset(), clock)
    assert [v.version for v in await again.versions()] == [1, 2]
    # An edit made on disk is kept as a version before the next write.
    path.write_text(POLICY + "# hand edit\n")
    assert (await again.current()).version is None
    with pytest.raises(PolicyConflict):
        await again.write(DENY, actor="token:a", base_version=2)
    third = await again.write(DENY, actor="token:a")
    assert third.version == 4
    assert await again.version_text(3) == POLICY + "# hand edit\n"
    with pytest.raises(NotFound):
        await again.version_text(99)
    with pytest.raises(PolicyInvalid) as refused:
        await again.write("version = [", actor="token:a")
    assert refused.value.problems[0].line == 1
    assert path.read_text() == DENY


async def test_without_a_policy_file_the_policy_cannot_be_edited(
    tmp_path: Path, clock: ManualClock
) -> None:
    store = FilePolicyStore(None, tmp_path / "history", frozenset({"corp.example"}), clock)
    current = await store.current()
    assert (current.text, current.editable) == ("", False)
    with pytest.raises(PolicyConflict, match="no policy file"):
        await store.write(POLICY, actor="token:a")


# --- sessions -------------------------------------------------------------------------------


def test_session_settings(clock: ManualClock) -> None:
    assert session_codec(Settings(), clock) is None  # production without a secret: UI off
    with pytest.raises(SettingsError, match="session_secret"):
        session_codec(Settings(session_secret="short"), clock)
    assert session_codec(Settings(environment="development"), clock) is not None


def test_api_listen_setting() -> None:
    assert Settings().api_listen == "127.0.0.1:8080"
    assert Settings(api_listen="off").api_listen is None
    assert load_settings(api_listen="[::1]:9000").api_listen == "[::1]:9000"
    with pytest.raises(SettingsError, match="api_listen"):
        load_settings(api_listen="nowhere")


# --- beside a running proxy -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ArchivingService]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    settings = load_settings(
        environment="development",
        allow_plaintext=True,
        domain=["corp.example"],
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        policy=policy,
        index_worker=False,
        model="off",
        api_listen=f"127.0.0.1:{free_port()}",
    )
    running = ArchivingService(settings)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def spool(service: ArchivingService, *entries: SpoolEntry) -> None:
    await service.spool.append([entry.payload() for entry in entries])
    await service.indexer.drain()


def held(record_id: str) -> Any:
    rec = record(
        record_id,
        sender="eve@spam.example",
        recipient="alice@corp.example",
        direction=Direction.TO_CLIENT,
        action=Action.QUARANTINE,
        status=RecordStatus.HELD,
        body="cheap pills",
    )
    reason = Reason("stranger", "a stranger's link", 1.0, Action.QUARANTINE)
    return replace(
        rec,
        raw=b"<message from='eve@spam.example/x' to='alice@corp.example' type='chat' id='m'>"
        b"<body>cheap pills</body></message>",
        verdict=Verdict(Action.QUARANTINE, 1.0, (reason,)),
    )


async def test_the_api_beside_the_proxy_releases_through_its_quarantine_service(
    service: ArchivingService,
) -> None:
    await spool(
        service,
        SpoolEntry(EntryOp.RECORD, "h1", record=held("h1")),
        SpoolEntry(EntryOp.RECORD, "h2", record=held("h2")),
        SpoolEntry(EntryOp.RECORD, "f1", record=record("f1", action=Action.FLAG)),
    )
    api = await start_beside(service.settings, service)
    assert api is not None
    try:
        context = api.service.context
        assert isinstance(context.review, ServiceReview)
        secret = (await context.tokens.create(OPERATOR, name="o1", role=Role.OFFICER)).secret
        admin = (await context.tokens.create(OPERATOR, name="a1", role=Role.ADMIN)).secret
        host, port = api.address
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            officer = {"Authorization": f"Bearer {secret}"}
            released = await client.post("/api/v1/review/h1/release", headers=officer)
            assert released.status_code == 200, released.text
            assert released.json()["status"] == "released"
            assert "next login" in released.json()["detail"]  # nobody is connected
            spam = await client.post("/api/v1/review/h2/confirm-spam", headers=officer)
            assert spam.status_code == 200 and spam.json()["detail"].startswith("confirmed spam")
            assert spam.json()["status"] == "confirmed-spam"
            again = await client.post("/api/v1/review/h2/release", headers=officer)
            assert again.status_code == 409 and again.json()["error"] == "refused"
            flagged = await client.post("/api/v1/review/f1/not-spam", headers=officer)
            assert flagged.status_code == 200 and flagged.json()["detail"] == "labelled ham"
            await service.indexer.drain()
            stored = await service.store.get("h1")
            assert stored is not None and stored.status is RecordStatus.RELEASED
            # A policy written through the API is in force at once.
            before = service.policy.current.fingerprint
            put = await client.put(
                "/api/v1/policy",
                json={"text": DENY},
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert put.status_code == 200, put.text
            assert service.policy.current.fingerprint != before
            assert "spam.example" in service.policy.current.policy.federation.domains
            metrics = (await client.get("/metrics")).text
            assert "stanzaguard_api_requests_total" in metrics
            assert "stanzaguard_sessions_total" in metrics  # the proxy's, same registry
        events = await context.audit.events(limit=20, newest_first=False)
        actions = [(e.action, e.outcome) for e in events.events]
        assert ("release", "ok") in actions and ("confirm-spam", "ok") in actions
        assert ("release", "invalid") in actions and ("policy-change", "ok") in actions
    finally:
        await api.stop()


async def test_mailbox_review_is_applied_by_the_running_proxy(service: ArchivingService) -> None:
    await spool(service, SpoolEntry(EntryOp.RECORD, "h1", record=held("h1")))
    review = MailboxReview(FileChannel(service.settings.data_dir), service.store, wait=10.0)
    quarantine = service.quarantine
    assert quarantine is not None
    # The running service polls its mailbox every second; the API waits for the outcome.
    outcome = await review.release("h1", "token:officer-1")
    assert outcome.ok and not outcome.queued and outcome.status == "released"
    labelled = await review.label("h1", ReviewLabel.SPAM, "token:officer-1")
    assert labelled.ok and labelled.detail == "labelled spam"
    # With no proxy reading the mailbox, the request waits there and the answer says so.
    elsewhere = service.settings.data_dir.parent / "other-data"
    elsewhere_review = MailboxReview(FileChannel(elsewhere), service.store, wait=0.0)
    queued = await elsewhere_review.release("h1", "token:x")
    assert queued.ok and queued.queued and "queued as request" in queued.detail
    refused = await review.release("../../etc", "token:x")
    assert refused.ok is False


async def test_a_taken_port_is_reported_and_the_proxy_keeps_running(
    service: ArchivingService,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = service.settings.model_copy(update={"api_listen": f"127.0.0.1:{port}"})
        with pytest.raises(SettingsError, match="api_listen: cannot listen"):
            await start_api(settings, service.clock, f"127.0.0.1:{port}")
        assert await start_beside(settings, service) is None
    off = service.settings.model_copy(update={"api_listen": None})
    assert await start_beside(off, service) is None


async def test_the_server_stops_cleanly_while_a_request_is_answered(
    service: ArchivingService,
) -> None:
    api = await start_beside(service.settings, service)
    assert api is not None
    host, port = api.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        assert (await client.get("/healthz")).status_code == 200
        pending = asyncio.create_task(client.get("/readyz"))
        await api.stop()
        with contextlib.suppress(httpx.HTTPError):
            await pending
    with socket.socket() as probe:
        assert probe.connect_ex((host, port)) != 0  # nothing listens any more
