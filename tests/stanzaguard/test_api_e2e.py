"""`stanzaguard api` as a real process: it answers /healthz and a token-authenticated search,
audits the search, and stops cleanly on SIGTERM with the audit head signed."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import httpx
from typer.testing import CliRunner

from archive_api.store.sqlite import SqliteStore
from stanzaguard.cli import app
from tests.archive_api.store.conformance import ChainWriter, record
from tests.support.proxy import stanzaguard_command
from tests.support.services import free_port, start_process, wait_for_port

LOOPBACK = "127.0.0.1"


async def seed(data_dir: Path) -> None:
    store = await SqliteStore.open(data_dir / "archive.sqlite3")
    try:
        await store.apply(ChainWriter().records(record("r1", body="quarterly numbers attached")))
    finally:
        await store.close()


async def audit_of(data_dir: Path) -> tuple[list[tuple[str, str, int | None]], bool, int]:
    store = await SqliteStore.open(data_dir / "archive.sqlite3")
    try:
        page = await store.audit_events(newest_first=False, limit=100)
        report = await store.verify_audit()
        checkpoints = await store.audit_checkpoints()
    finally:
        await store.close()
    events = [(e.action, e.actor, e.result_count) for e in page.events]
    return events, report.ok, len(checkpoints)


def test_stanzaguard_api_serves_alone(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    asyncio.run(seed(data_dir))
    made = CliRunner().invoke(
        app,
        ["token", "create", "--role", "officer", "--name", "e2e", "--data-dir", str(data_dir)],
        catch_exceptions=False,
    )
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANZAGUARD_")}
    env["STANZAGUARD_LOG_FORMAT"] = "text"
    argv = [
        *stanzaguard_command(),
        "api",
        "--data-dir",
        str(data_dir),
        "--listen",
        f"{LOOPBACK}:{port}",
    ]
    process = start_process(argv, log_path=tmp_path / "api.log", cwd=tmp_path, env=env)
    try:
        wait_for_port(LOOPBACK, port, 30.0, process=process.popen)
        base = f"http://{LOOPBACK}:{port}"
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        refused = httpx.get(f"{base}/api/v1/search", params={"q": "numbers"})
        assert refused.status_code == 401
        found = httpx.get(
            f"{base}/api/v1/search",
            params={"q": "numbers"},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert found.status_code == 200, found.text
        assert [hit["record_id"] for hit in found.json()["hits"]] == ["r1"]
    finally:
        status = process.stop(grace=15.0)
    log = process.log_tail()
    assert status == 0, log
    assert "web UI sign-in is off" in log  # production without a session secret
    events, whole, checkpoints = asyncio.run(audit_of(data_dir))
    assert ("search", "token:e2e", 1) in events
    assert whole and checkpoints >= 1  # the head was signed on the way out


def test_stanzaguard_api_refuses_a_taken_port(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            app, ["api", "--data-dir", str(data_dir), "--listen", f"{LOOPBACK}:{port}"]
        )
    assert result.exit_code == 2
    assert "api_listen: cannot listen" in result.output
