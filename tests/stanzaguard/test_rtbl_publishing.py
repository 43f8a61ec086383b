"""The published block list's wiring (stanzaguard/rtbl_publishing.py): evidence from the
labelled examples file, the learner on a real SQLite store, settings, and the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from classifier.listing import EntryKind, EntryState, SenderEvidence
from stanzaguard.errors import SettingsError
from stanzaguard.learning import Label, LabelledExample, LabelledExamples, Source
from stanzaguard.rtbl_publishing import (
    BlocklistLearner,
    RtblPublishing,
    build_publish_config,
    evidence_by_sender,
)
from stanzaguard.settings import Settings
from tests.stanzaguard.conftest import run_cli

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SPAMMER = "spammer@spam.example"


class Examples:
    """A real examples file, written as the service writes it."""

    def __init__(self, path: Path) -> None:
        self.examples = LabelledExamples.load(path)
        self.n = 0

    def add(
        self,
        label: Label,
        source: Source,
        actor: str,
        sender: str = SPAMMER,
        record_id: str | None = None,
    ) -> None:
        self.n += 1
        self.examples.append(
            LabelledExample(
                example_id=f"e{self.n}",
                at=T0 + timedelta(minutes=self.n),
                label=label,
                source=source,
                actor=actor,
                sender=sender,
                record_id=record_id if record_id is not None else f"r{self.n}",
                text="buy now",
            )
        )


@pytest.fixture
def examples(tmp_path: Path) -> Examples:
    return Examples(tmp_path / "learning" / "examples.jsonl")


def test_officer_confirmations_count_per_message(examples: Examples) -> None:
    examples.add(Label.SPAM, Source.OFFICER, "officer-1", record_id="m1")
    examples.add(Label.SPAM, Source.OFFICER, "officer-2", record_id="m1")  # same message
    examples.add(Label.SPAM, Source.OFFICER, "officer-1", record_id="m2")
    assert evidence_by_sender(examples.examples)[SPAMMER] == SenderEvidence(officer_spam=2)


def test_reports_count_once_per_reporter_with_their_weight(examples: Examples) -> None:
    for reporter in ("a@corp.example", "a@corp.example", "b@corp.example"):
        examples.add(Label.SPAM, Source.REPORT, reporter)
    assert evidence_by_sender(examples.examples)[SPAMMER].report_weight == pytest.approx(2.0)


def test_a_report_an_officer_contradicted_no_longer_counts(examples: Examples) -> None:
    examples.add(Label.SPAM, Source.REPORT, "a@corp.example", record_id="m1")
    examples.add(Label.HAM, Source.OFFICER, "officer-1", record_id="m1")
    evidence = evidence_by_sender(examples.examples)[SPAMMER]
    assert evidence.report_weight == 0.0
    assert evidence.cleared


def test_the_newest_officer_decision_about_a_sender_decides_clearing(examples: Examples) -> None:
    examples.add(Label.HAM, Source.OFFICER, "officer-1", record_id="m1")
    examples.add(Label.SPAM, Source.OFFICER, "officer-1", record_id="m2")
    evidence = evidence_by_sender(examples.examples)[SPAMMER]
    assert not evidence.cleared and evidence.officer_spam == 1
    examples.add(Label.HAM, Source.OFFICER, "officer-1", record_id="m3")  # a release
    assert evidence_by_sender(examples.examples)[SPAMMER].cleared


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with await SqliteStore.open(tmp_path / "archive.sqlite3") as opened:
        yield opened


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(
        data_dir=tmp_path,
        domain=["corp.example"],
        blocklist_learning=True,
        environment="development",
        **values,  # type: ignore[arg-type]
    )


async def test_the_learner_lists_and_retracts_as_officers_decide(
    tmp_path: Path, examples: Examples, store: SqliteStore
) -> None:
    parts = RtblPublishing(
        settings(tmp_path, blocklist_review="auto"),
        store,
        examples.examples,
        ManualClock(T0),
    )
    learner = parts.learner
    await learner.start()
    try:
        examples.add(Label.SPAM, Source.OFFICER, "officer-1", record_id="m1")
        examples.add(Label.SPAM, Source.OFFICER, "officer-1", sender="x@corp.example")  # own
        assert await learner.check() == 1
        assert await parts.service.published_ids(EntryKind.JID) == {
            hashlib.sha256(SPAMMER.encode()).hexdigest()
        }
        assert await learner.check() == 0  # nothing new, nothing done
        examples.add(Label.HAM, Source.OFFICER, "officer-1", record_id="m9")  # released one
        assert await learner.check() == 1
        entry = await store.blocklist_entry("jid", SPAMMER)
        assert entry is not None and entry.state == EntryState.RETRACTED
    finally:
        await learner.stop()


async def test_the_learner_catches_up_at_start_in_approve_mode(
    tmp_path: Path, examples: Examples, store: SqliteStore
) -> None:
    for reporter in ("a@corp.example", "b@corp.example", "c@corp.example"):
        examples.add(Label.SPAM, Source.REPORT, reporter)
    learner = BlocklistLearner(
        examples.examples,
        RtblPublishing(settings(tmp_path), store, examples.examples, ManualClock(T0)).service,
    )
    await learner.start()
    await learner.stop()
    pending = await store.blocklist_entries(state="pending")
    assert [e.value for e in pending] == [SPAMMER]
    assert "reports weigh 3.00" in pending[0].reason


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"blocklist_learning": False}, "blocklist_learning"),
        ({"rtbl_publish_jid": "no-at-sign"}, "rtbl_publish_jid"),
        ({"rtbl_publish_jid": "a@b/res"}, "rtbl_publish_jid"),
        ({"rtbl_publish_password": None}, "rtbl_publish_password"),
        ({"rtbl_publish_domain_nodes": "spam_source_jids_sha256"}, "holds jid_sha256"),
        ({"environment": "production", "rtbl_publish_password": "changeme"}, "placeholder"),
        ({"environment": "production", "rtbl_publish_tls": "plain"}, "plain"),
    ],
)
def test_publish_settings_are_checked(
    tmp_path: Path, values: dict[str, object], problem: str
) -> None:
    base: dict[str, object] = {
        "data_dir": tmp_path,
        "domain": ["corp.example"],
        "environment": "development",
        "blocklist_learning": True,
        "rtbl_publish_service": "pubsub.corp.example",
        "rtbl_publish_jid": "rtbl@corp.example",
        "rtbl_publish_password": "a-real-secret-password",
        "session_secret": "x" * 40,
    }
    base.update(values)
    with pytest.raises(SettingsError, match=problem):
        build_publish_config(Settings(**base))  # type: ignore[arg-type]


def test_publish_settings_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANZAGUARD_RTBL_PUBLISH_JID_NODES", "muc_bans_sha256, my_jids")
    made = Settings(
        data_dir=tmp_path,
        domain=["corp.example"],
        environment="development",
        blocklist_learning=True,
        rtbl_publish_service="pubsub.corp.example",
        rtbl_publish_jid="rtbl@corp.example",
        rtbl_publish_password="a-real-secret-password",
        rtbl_publish_server="127.0.0.1:5222",
    )
    config = build_publish_config(made)
    assert config is not None
    assert list(config.nodes) == ["spam_source_domains", "muc_bans_sha256", "my_jids"]
    assert (config.host, config.port) == ("127.0.0.1", 5222)
    assert "a-real-secret-password" not in repr(config)


@pytest.mark.integration
def test_cli_decides_lists_and_audits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "stanzaguard.toml"
    config.write_text(
        f'data_dir = "{data}"\ndomain = ["corp.example"]\nblocklist_learning = true\n'
        'environment = "development"\n'
    )
    added = run_cli("rtbl", "decide", "jid", "Spammer@Spam.Example", "add", "--config", str(config))
    assert added.returncode == 0, added.stderr
    assert "spammer@spam.example: listed" in added.stdout
    own = run_cli("rtbl", "decide", "domain", "corp.example", "add", "--config", str(config))
    assert own.returncode != 0 and "own domains" in own.stderr
    unknown = run_cli("rtbl", "decide", "jid", "x@y.example", "retract", "--config", str(config))
    assert unknown.returncode != 0
    bad = run_cli("rtbl", "decide", "ip", "1.2.3.4", "add", "--config", str(config))
    assert bad.returncode != 0
    listed = run_cli("rtbl", "list", "--json", "--state", "listed", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["kind"], r["value"], r["actor"]) for r in rows] == [
        ("jid", "spammer@spam.example", rows[0]["actor"])
    ]
    assert rows[0]["actor"].startswith("cli:")
    audit = run_cli("verify", "--audit", "--data-dir", str(data))
    assert audit.returncode == 0, audit.stdout + audit.stderr

    async def events() -> list[tuple[str, str, str | None]]:
        async with await SqliteStore.open(data / "archive.sqlite3") as store:
            page = await store.audit_events(newest_first=False, limit=100)
            return [(e.action, e.outcome, e.params.get("decision")) for e in page.events]

    assert [e for e in asyncio.run(events()) if e[0].startswith("rtbl-")] == [
        ("rtbl-decide", "ok", "add"),
        ("rtbl-decide", "invalid", "add"),
        ("rtbl-decide", "invalid", "retract"),
        ("rtbl-read", "ok", None),
    ]
