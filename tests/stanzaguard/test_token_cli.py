"""`stanzaguard token create|list|revoke` and `stanzaguard verify --audit`, run in-process."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from archive_api.auth import TOKEN_PATTERN, Authenticator, Role
from archive_api.errors import AuthenticationFailed
from archive_api.store.audit import AuditEvent
from archive_api.store.sqlite import SqliteStore
from stanzaguard.cli import app
from stanzaguard.clock import SystemClock

UNIX_USER = pwd.getpwuid(os.getuid()).pw_name


def flat(text: str) -> str:
    """Output with rich's line wrapping (and box drawing) undone, for substring checks."""
    return " ".join(text.replace("│", " ").split())


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    return directory


def create(data_dir: Path, name: str, role: str = "officer", *extra: str) -> str:
    result = run(
        "token", "create", "--role", role, "--name", name, "--data-dir", str(data_dir), *extra
    )
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def audit_events(data_dir: Path) -> list[AuditEvent]:
    async def read() -> list[AuditEvent]:
        store = await SqliteStore.open(data_dir / "archive.sqlite3")
        try:
            return list((await store.audit_events(newest_first=False, limit=1000)).events)
        finally:
            await store.close()

    return asyncio.run(read())


def authenticate(data_dir: Path, secret: str) -> Role:
    async def check() -> Role:
        store = await SqliteStore.open(data_dir / "archive.sqlite3")
        try:
            return (await Authenticator(store, SystemClock()).authenticate_bearer(secret)).role
        finally:
            await store.close()

    return asyncio.run(check())


def test_create_prints_the_secret_once_on_stdout_and_audits_it(data_dir: Path) -> None:
    result = run(
        "token", "create", "--role", "auditor", "--name", "ann", "--expires", "30",
        "--data-dir", str(data_dir),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert TOKEN_PATTERN.fullmatch(secret), result.stdout
    assert "will not be shown again" in flat(result.stderr) and secret not in result.stderr
    assert authenticate(data_dir, secret) is Role.AUDITOR
    [event] = audit_events(data_dir)
    assert (event.actor, event.role, event.action, event.outcome, event.result_count) == (
        f"cli:{UNIX_USER}",
        "admin",
        "token-create",
        "ok",
        1,
    )
    assert event.params["name"] == "ann" and event.params["role"] == "auditor"
    assert secret not in json.dumps(event.to_json())
    listing = run("token", "list", "--data-dir", str(data_dir))
    assert secret not in listing.output


def test_list_and_revoke(data_dir: Path) -> None:
    officer = create(data_dir, "desk-1")
    create(data_dir, "boss", "admin")
    result = run("token", "revoke", "desk-1", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    assert "'desk-1' revoked at" in result.stdout
    with pytest.raises(AuthenticationFailed, match="revoked"):
        authenticate(data_dir, officer)
    listed = run("token", "list", "--json", "--data-dir", str(data_dir))
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["name"], r["role"], r["state"]) for r in rows] == [
        ("desk-1", "officer", "revoked"),
        ("boss", "admin", "active"),
    ]
    assert all(
        set(r) == {"name", "role", "state", "created_at", "expires_at", "revoked_at"} for r in rows
    )
    table = run("token", "list", "--data-dir", str(data_dir))
    assert table.exit_code == 0 and "desk-1" in table.stdout and "revoked" in table.stdout
    actions = [(e.action, e.outcome, e.params["name"]) for e in audit_events(data_dir)]
    assert actions == [
        ("token-create", "ok", "desk-1"),
        ("token-create", "ok", "boss"),
        ("token-revoke", "ok", "desk-1"),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "root", "--name", "x"], "--role must be admin, officer or auditor"),
        (["--role", "officer", "--name", "two words"], "invalid token name"),
        (["--role", "officer", "--name", "n" * 500], "invalid token name"),
        (["--role", "officer", "--name", "naïve"], "invalid token name"),
        (["--role", "officer", "--name", "x", "--expires", "0"], "greater than or equal to 1"),
        (["--role", "officer", "--name", "x", "--expires", "99999"], "less than or equal to 3650"),
    ],
)
def test_bad_create_requests_are_clear_errors(
    data_dir: Path, args: list[str], message: str
) -> None:
    result = run("token", "create", *args, "--data-dir", str(data_dir))
    assert result.exit_code == 2
    assert message in flat(result.output)
    assert "Traceback" not in result.output


def test_names_are_never_reused_and_failures_are_audited(data_dir: Path) -> None:
    create(data_dir, "ops")
    run("token", "revoke", "ops", "--data-dir", str(data_dir))
    again = run("token", "create", "--role", "admin", "--name", "ops", "--data-dir", str(data_dir))
    assert again.exit_code == 2 and "never reused" in flat(again.output)
    unknown = run("token", "revoke", "ghost", "--data-dir", str(data_dir))
    assert unknown.exit_code == 2 and "no token named 'ghost'" in flat(unknown.output)
    outcomes = [(e.action, e.outcome) for e in audit_events(data_dir)]
    assert outcomes[2:] == [("token-create", "invalid"), ("token-revoke", "invalid")]


def test_a_missing_data_directory_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run("token", "create", "--role", "admin", "--name", "x", "--data-dir", str(missing))
    assert result.exit_code == 2 and "no data directory" in result.output
    assert not missing.exists()
    for args in (["token", "list"], ["verify", "--audit"]):
        result = run(*args, "--data-dir", str(missing))
        assert result.exit_code == 2 and "no archive" in result.output


# -- verify --audit ------------------------------------------------------------------------------


@pytest.fixture
def audited(data_dir: Path) -> Path:
    """Four CLI commands: events 1..4, each followed by a signed checkpoint of the head."""
    for name in ("a", "b", "c", "d"):
        create(data_dir, name)
    return data_dir


def test_verify_audit_of_an_untouched_log(audited: Path) -> None:
    result = run("verify", "--audit", "--data-dir", str(audited))
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert "4 events, last seq 4" in out
    assert "4 signed checkpoint(s) checked" in out
    assert "OK: no gap, no edit, no deletion in the audit log" in out


def test_verify_audit_warns_when_it_cannot_check_signatures(audited: Path) -> None:
    (audited / "keys" / "checkpoint-signing.pub.pem").unlink()
    result = run("verify", "--audit", "--data-dir", str(audited))
    assert result.exit_code == 0, result.output
    assert "signatures were not checked" in flat(result.stderr)


def edit_param(conn: sqlite3.Connection) -> None:
    (params,) = conn.execute("SELECT params FROM audit_events WHERE seq = 2").fetchone()
    conn.execute(
        "UPDATE audit_events SET params = ? WHERE seq = 2",
        (params.replace('"name":"b"', '"name":"z"'),),
    )


def delete_one(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit_events WHERE seq = 3")


def swap_two(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit_events SET seq = -1 WHERE seq = 1")
    conn.execute("UPDATE audit_events SET seq = 1 WHERE seq = 3")
    conn.execute("UPDATE audit_events SET seq = 3 WHERE seq = -1")


def forge_signature(conn: sqlite3.Connection) -> None:
    (signature,) = conn.execute("SELECT signature FROM audit_checkpoints WHERE seq = 2").fetchone()
    conn.execute(
        "UPDATE audit_checkpoints SET signature = ? WHERE seq = 2",
        (bytes(64 - len(signature)) + signature[::-1],),
    )


@pytest.mark.parametrize(
    ("tamper", "first_break"),
    [
        (edit_param, "first break at seq 2: content does not match its hash (edited)"),
        (delete_one, "first break at seq 3: event 3 is missing (deleted)"),
        (swap_two, "first break at seq 1: previous-hash does not match the event before it"),
        (forge_signature, "first break at seq 2: checkpoint signature does not verify"),
    ],
)
def test_verify_audit_names_the_first_break(
    audited: Path, tamper: object, first_break: str
) -> None:
    conn = sqlite3.connect(audited / "archive.sqlite3", isolation_level=None)
    try:
        tamper(conn)  # type: ignore[operator]
    finally:
        conn.close()
    result = run("verify", "--audit", "--data-dir", str(audited))
    assert result.exit_code == 1, result.output
    assert "BROKEN" in result.stdout
    assert first_break in flat(result.stdout)
