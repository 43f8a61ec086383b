"""`stanzaguard purge` and `stanzaguard export` on a real data directory: spool, store, keys.

The records are written through a real spool (as the proxy does) and indexed into the
store, so `stanzaguard verify` also compares the purged store against the spooled copies.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from archive_api.audit import AuditAction
from archive_api.exports import MANIFEST_NAME, verify_manifest
from archive_api.holds import HoldService, person_scope
from archive_api.store.audit import AuditEvent, AuditFilter
from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from proxy.spool import Spool
from stanzaguard.cli import app
from stanzaguard.keys import load_or_create_signer
from stanzaguard.operations import Paths
from tests.archive_api.store.conformance import rec_entry, record

OLD = datetime(2015, 3, 2, 9, 0, tzinfo=UTC)  # long past any retention below
RETENTION = """
[retention]
default = "short"

[retention.classes]
short = "1y"
long = "100y"

[[retention.rules]]
class = "long"
rooms = ["desk@conference.corp.example"]
"""


def records() -> list[object]:
    return [
        record("a1", at=OLD, body="old chat one"),
        record("a2", at=OLD + timedelta(hours=1), body="old chat two"),
        record(
            "m1",
            at=OLD + timedelta(hours=2),
            sender="mallory@spam.example",
            recipient="alice@corp.example",
            body="under legal hold",
        ),
        record(
            "d1",
            at=OLD + timedelta(hours=3),
            recipient="desk@conference.corp.example",
            room="desk@conference.corp.example",
            stanza_type="groupchat",
            body="kept a hundred years",
        ),
        record("a3", at=OLD + timedelta(days=1), body="old chat three"),
    ]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory as `stanzaguard run` leaves it: spool, keys, indexed store, a hold."""
    paths = Paths(tmp_path / "data")

    async def build() -> None:
        clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
        signer = load_or_create_signer(paths.keys)
        spool = await Spool.open(paths.spool, clock=clock, signer=signer, fsync=False)
        try:
            links = await spool.append([rec_entry(r).payload() for r in records()])  # type: ignore[arg-type]
        finally:
            await spool.close()
        async with await SqliteStore.open(paths.store) as store:
            await store.apply(links)
            await HoldService(store, clock, new_id=lambda: "hold-mallory").place(
                "Inquiry 7", person_scope("mallory@spam.example"), actor="officer@corp.example"
            )

    asyncio.run(build())
    (tmp_path / "retention.toml").write_text(RETENTION)
    return paths.data_dir


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, [*args], catch_exceptions=False)


def remaining(data_dir: Path) -> set[str]:
    async def run() -> set[str]:
        async with await SqliteStore.open(data_dir / "archive.sqlite3") as store:
            page = await store.search("", limit=100)
            return {hit.record.record_id for hit in page.hits}

    return asyncio.run(run())


def audit_events(data_dir: Path, action: str) -> list[AuditEvent]:
    async def run() -> list[AuditEvent]:
        async with await SqliteStore.open(data_dir / "archive.sqlite3") as store:
            page = await store.audit_events(
                AuditFilter(action=action), limit=100, newest_first=False
            )
            return list(page.events)

    return asyncio.run(run())


def test_purge_respects_retention_and_holds_and_verify_still_passes(data_dir: Path) -> None:
    retention = str(data_dir.parent / "retention.toml")
    dry = cli("purge", "--data-dir", str(data_dir), "--retention", retention, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would purge 3 record(s)" in dry.output
    assert "1 record(s) past retention kept by legal holds" in dry.output
    assert remaining(data_dir) == {"a1", "a2", "a3", "m1", "d1"}
    [planned] = audit_events(data_dir, AuditAction.PURGE)
    assert planned.params["dry_run"] is True and planned.result_count == 3
    [classified] = audit_events(data_dir, AuditAction.RETENTION_CHANGE)
    assert classified.params["assigned"] == 5 and classified.actor.startswith("cli:")

    done = cli("purge", "--data-dir", str(data_dir), "--retention", retention)
    assert done.exit_code == 0, done.output
    assert "purged 3 record(s) (short: 3)" in done.output
    assert remaining(data_dir) == {"m1", "d1"}
    batch = audit_events(data_dir, AuditAction.PURGE)[-1]
    assert sorted(batch.params["record_ids"]) == ["a1", "a2", "a3"]
    assert batch.params["classes"] == {"short": 3} and batch.result_count == 3

    # The purged store still proves whole, also against the spooled copies of the records.
    verified = cli("verify", "--data-dir", str(data_dir))
    assert verified.exit_code == 0, verified.output
    assert "OK" in verified.output
    audit_ok = cli("verify", "--audit", "--data-dir", str(data_dir))
    assert audit_ok.exit_code == 0, audit_ok.output

    again = cli("purge", "--data-dir", str(data_dir))
    assert again.exit_code == 0 and "purged 0 record(s)" in again.output
    assert "only expiries already recorded count" in again.output


def test_purge_refuses_a_bad_retention_policy(data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[retention]\ndefault = "short"\nclasses = { short = "1 year" }\n')
    result = cli("purge", "--data-dir", str(data_dir), "--retention", str(bad))
    assert result.exit_code == 2
    assert "retention.classes.short" in result.output
    missing = cli("purge", "--data-dir", str(data_dir), "--retention", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "cannot read" in missing.output
    assert remaining(data_dir) == {"a1", "a2", "a3", "m1", "d1"}
    nowhere = cli("purge", "--data-dir", str(tmp_path / "empty"))
    assert nowhere.exit_code == 2 and "no archive" in nowhere.output


def test_export_of_a_query_and_of_a_hold(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "by-query"
    result = cli(
        "export", "--data-dir", str(data_dir), "--query", "old", "--format", "csv",
        "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "exported 3 record(s) as csv" in result.output
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source"] == {"kind": "query", "query": "old"}
    assert manifest["actor"].startswith("cli:") and verify_manifest(out) == []

    held = tmp_path / "by-hold"
    result = cli(
        "export", "--data-dir", str(data_dir), "--hold", "hold-mallory", "--out", str(held)
    )
    assert result.exit_code == 0, result.output
    [line] = (held / "records.jsonl").read_text().splitlines()
    assert json.loads(line)["record_id"] == "m1"

    events = audit_events(data_dir, AuditAction.EXPORT)
    assert [e.result_count for e in events] == [3, 1]
    assert events[1].params["hold_id"] == "hold-mallory"
    assert events[0].params["manifest_sha256"] and events[0].params["format"] == "csv"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--hold", "hold-nobody"], "no legal hold with id 'hold-nobody'"),
        (["--query", "from:alice@corp.example after:yesterday"], "at character"),
        (["--query", "old", "--hold", "hold-mallory"], "either --query or --hold"),
        ([], "either --query or --hold"),
        (["--query", "old", "--format", "docx"], "unknown format"),
    ],
)
def test_export_errors_are_clear(
    data_dir: Path, tmp_path: Path, args: list[str], words: str
) -> None:
    out = tmp_path / "out"
    result = cli("export", "--data-dir", str(data_dir), "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert not out.exists() or not any(out.iterdir())


def test_export_refuses_a_directory_in_use(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "other.txt").write_text("mine")
    result = cli("export", "--data-dir", str(data_dir), "--query", "old", "--out", str(out))
    assert result.exit_code == 2 and "not empty" in result.output
    assert (out / "other.txt").read_text() == "mine"
    [refused] = audit_events(data_dir, AuditAction.EXPORT)
    assert refused.outcome == "invalid" and "not empty" in refused.params["error"]
