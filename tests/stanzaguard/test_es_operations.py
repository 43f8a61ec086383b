"""Operations on store=elasticsearch: the commands (tokens, `verify --audit`, purge, export),
the retention job, and `stanzaguard run` serving the API and running retention, all on
osmem-server, with nothing written to a SQLite archive beside it.

The data directory is built as `stanzaguard run` leaves it (spool, keys) with its records
indexed into Elasticsearch and a legal hold there; the commands find the store through the
settings (`--config`), as an operator's would.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from elasticsearch import Elasticsearch
from typer.testing import CliRunner, Result

from archive_api.audit import AuditAction
from archive_api.auth import Role
from archive_api.exports import MANIFEST_NAME, verify_manifest
from archive_api.holds import HoldService, person_scope
from archive_api.store.audit import AuditEvent, AuditFilter
from archive_api.store.elasticsearch import INDEX_KINDS, ElasticsearchStore
from classifier.clock import ManualClock
from proxy.spool import Spool
from stanzaguard import access
from stanzaguard.api_wiring import start_beside
from stanzaguard.cli import app
from stanzaguard.keys import load_or_create_signer
from stanzaguard.operations import Paths
from stanzaguard.retention_job import RetentionJob
from stanzaguard.stores import EsSpec
from tests.archive_api.store.conformance import ChainWriter, rec_entry
from tests.stanzaguard import es_support
from tests.stanzaguard.conftest import ArchivingFactory, receive
from tests.stanzaguard.es_support import EsLocation, drop_prefix
from tests.stanzaguard.test_purge_cli import RETENTION, records

osmem_server = es_support.osmem_server
es_client = es_support.es_client
es_location = es_support.es_location

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SESSION_SECRET = "test-session-secret-0123456789-abcdefghij"


@dataclass(frozen=True)
class EsDataDir:
    """A data directory whose archive is in Elasticsearch, and the settings file naming it."""

    data_dir: Path
    config: Path
    retention: Path
    location: EsLocation

    @property
    def spec(self) -> EsSpec:
        return EsSpec((self.location.url,), self.location.prefix)

    def args(self) -> list[str]:
        return ["--data-dir", str(self.data_dir), "--config", str(self.config)]


def es_config(location: EsLocation) -> str:
    return (
        f'store = "elasticsearch"\nes_url = ["{location.url}"]\n'
        f'es_index_prefix = "{location.prefix}"\n'
    )


@pytest.fixture
def es_data(tmp_path: Path, es_location: EsLocation) -> Iterator[EsDataDir]:
    paths = Paths(tmp_path / "data")

    async def build() -> None:
        clock = ManualClock(NOW)
        spool = await Spool.open(
            paths.spool, clock=clock, signer=load_or_create_signer(paths.keys), fsync=False
        )
        try:
            links = await spool.append([rec_entry(r).payload() for r in records()])  # type: ignore[arg-type]
        finally:
            await spool.close()
        store = await ElasticsearchStore.open(es_location.url, index_prefix=es_location.prefix)
        try:
            await store.apply(links)
            await HoldService(store, clock, new_id=lambda: "hold-mallory").place(
                "Inquiry 7", person_scope("mallory@spam.example"), actor="officer@corp.example"
            )
        finally:
            await store.close()

    asyncio.run(build())
    config = tmp_path / "es.toml"
    config.write_text(es_config(es_location))
    retention = tmp_path / "retention.toml"
    retention.write_text(RETENTION)
    yield EsDataDir(paths.data_dir, config, retention, es_location)
    # Nothing of the archive went into a SQLite file beside Elasticsearch.
    assert not paths.store.exists()


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, [*args], catch_exceptions=False)


async def _on_es(location: EsLocation) -> ElasticsearchStore:
    return await ElasticsearchStore.open(location.url, index_prefix=location.prefix)


def remaining(location: EsLocation) -> set[str]:
    async def run() -> set[str]:
        store = await _on_es(location)
        try:
            page = await store.search("", limit=100)
            return {hit.record.record_id for hit in page.hits}
        finally:
            await store.close()

    return asyncio.run(run())


async def read_audit_events(location: EsLocation, action: str | None = None) -> list[AuditEvent]:
    store = await _on_es(location)
    try:
        page = await store.audit_events(AuditFilter(action=action), limit=100, newest_first=False)
        return list(page.events)
    finally:
        await store.close()


def audit_events(location: EsLocation, action: str | None = None) -> list[AuditEvent]:
    return asyncio.run(read_audit_events(location, action))


# -- tokens and the audit log ------------------------------------------------------------------


def test_token_commands_and_audit_verify_use_elasticsearch(es_data: EsDataDir) -> None:
    created = cli("token", "create", "--role", "officer", "--name", "es-officer", *es_data.args())
    assert created.exit_code == 0, created.output
    listed = cli("token", "list", "--json", *es_data.args())
    assert listed.exit_code == 0, listed.output
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["name"], row["role"], row["state"]) == ("es-officer", "officer", "active")
    revoked = cli("token", "revoke", "es-officer", *es_data.args())
    assert revoked.exit_code == 0, revoked.output
    actions = [e.action for e in audit_events(es_data.location)]
    assert actions.count("token-create") == 1 and actions.count("token-revoke") == 1, actions
    verified = cli("verify", "--audit", *es_data.args())
    assert verified.exit_code == 0, verified.output
    assert "OK" in verified.stdout and "2 events" in verified.stdout
    # Without the settings the commands look for the SQLite archive, and say it is not there.
    bare = cli("token", "list", "--data-dir", str(es_data.data_dir))
    assert bare.exit_code == 2 and "no archive at" in bare.output


def test_audit_tampering_in_elasticsearch_is_found(
    es_data: EsDataDir, es_client: Elasticsearch
) -> None:
    for name in ("one", "two"):
        assert (
            cli("token", "create", "--role", "auditor", "--name", name, *es_data.args()).exit_code
            == 0
        )
    index = es_data.location.index("audit")
    es_client.update(index=index, id=f"{1:020d}", doc={"actor": "cli:someone-else"}, refresh=True)
    broken = cli("verify", "--audit", *es_data.args())
    assert broken.exit_code == 1, broken.output
    assert "BROKEN" in broken.stdout and "seq 1" in broken.stdout


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ('store = "elasticsearch"\nes_url = ["ftp://127.0.0.1:9200"]\n', "es_url"),
        ('store = "elasticsearch"\n', "es_url"),
        (
            'store = "elasticsearch"\nes_url = ["http://127.0.0.1:9200"]\nes_index_prefix = "A*"\n',
            "es_index_prefix",
        ),
        ('store = "elasticsearch"\nes_url = [' + '"http://x",' * 5000 + "]\n", "es_url"),
        ("store = [[[\n", "settings"),
        ('store = "elasticsearch"\nes_url = ["http://127.0.0.1:9"]\n', "unavailable|connect|reach"),
    ],
)
def test_bad_or_unreachable_store_settings_are_clear_errors(
    es_data: EsDataDir, tmp_path: Path, config: str, why: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(config)
    args = ["--data-dir", str(es_data.data_dir), "--config", str(bad)]
    for command in (
        ["token", "list"],
        ["token", "create", "--role", "admin", "--name", "x"],
        ["verify", "--audit"],
        ["purge", "--dry-run"],
        ["export", "--out", str(tmp_path / "out"), "--query", ""],
    ):
        result = cli(*command, *args)
        assert result.exit_code == 2, (command, result.output)
        assert "Traceback" not in result.output
        assert re.search(why, result.output, re.IGNORECASE), (command, result.output)


# -- purge and export ----------------------------------------------------------------------------


def test_purge_and_export_run_on_elasticsearch(es_data: EsDataDir, tmp_path: Path) -> None:
    retention = str(es_data.retention)
    dry = cli("purge", "--retention", retention, "--dry-run", *es_data.args())
    assert dry.exit_code == 0, dry.output
    assert "would purge 3 record(s)" in dry.output
    assert "1 record(s) past retention kept by legal holds" in dry.output
    assert remaining(es_data.location) == {"a1", "a2", "a3", "m1", "d1"}

    done = cli("purge", "--retention", retention, *es_data.args())
    assert done.exit_code == 0, done.output
    assert "purged 3 record(s) (short: 3)" in done.output
    assert remaining(es_data.location) == {"m1", "d1"}
    (batch,) = [e for e in audit_events(es_data.location, AuditAction.PURGE) if "batch" in e.params]
    assert sorted(batch.params["record_ids"]) == ["a1", "a2", "a3"]
    # The purged records leave tombstones: the spool still matches the chain in Elasticsearch.
    verified = cli("verify", *es_data.args())
    assert verified.exit_code == 0, verified.output
    assert cli("verify", "--audit", *es_data.args()).exit_code == 0

    held = tmp_path / "held"
    exported = cli("export", "--hold", "hold-mallory", "--out", str(held), *es_data.args())
    assert exported.exit_code == 0, exported.output
    assert verify_manifest(held) == []
    lines = (held / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["record_id"] for line in lines] == ["m1"]
    searched = tmp_path / "searched"
    exported = cli(
        "export", "--query", "kept", "--format", "csv", "--out", str(searched), *es_data.args()
    )
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((searched / MANIFEST_NAME).read_text())
    assert manifest["record_count"] == 1
    exports = audit_events(es_data.location, AuditAction.EXPORT)
    assert [e.result_count for e in exports] == [1, 1]
    # An unknown hold is an error, and the attempt is audited too.
    missing = cli("export", "--hold", "no-such-hold", "--out", str(tmp_path / "x"), *es_data.args())
    assert missing.exit_code == 2, missing.output
    assert len(audit_events(es_data.location, AuditAction.EXPORT)) == 3


# -- the retention job ---------------------------------------------------------------------------


def test_the_retention_job_purges_in_elasticsearch(es_data: EsDataDir) -> None:
    job = RetentionJob(
        Paths(es_data.data_dir),
        es_data.retention,
        policy_file=None,
        clock=ManualClock(NOW),
        interval=3600.0,
        store_spec=es_data.spec,
    )
    outcome = asyncio.run(job.run_once())
    assert (outcome.purged, outcome.held_back) == (3, 1)
    assert remaining(es_data.location) == {"m1", "d1"}
    batch = [e for e in audit_events(es_data.location, AuditAction.PURGE) if "batch" in e.params]
    assert [e.actor for e in batch] == ["system:retention"]


# -- `stanzaguard run` on Elasticsearch: the API beside the proxy, and the retention job ---------


async def test_run_serves_the_api_and_runs_retention_on_elasticsearch(
    es_location: EsLocation, archiving_factory: ArchivingFactory, tmp_path: Path
) -> None:
    # Old records from another proxy's chain, due for purge under the retention policy.
    seeded = await _on_es(es_location)
    try:
        await seeded.apply(ChainWriter().records(*records()), chain="other-proxy")  # type: ignore[arg-type]
    finally:
        await seeded.close()
    retention = tmp_path / "retention.toml"
    retention.write_text(RETENTION)
    data_dir = tmp_path / "run-data"
    data_dir.mkdir()
    spec = EsSpec((es_location.url,), es_location.prefix)
    issued = await access.create_token(
        Paths(data_dir), name="officer-1", role=Role.OFFICER, expires_days=None, store_spec=spec
    )
    running = await archiving_factory(
        data_dir=data_dir,
        store="elasticsearch",
        es_url=[es_location.url],
        es_index_prefix=es_location.prefix,
        retention_file=retention,
        retention_interval=3600.0,
        api_listen="127.0.0.1:0",
        session_secret=SESSION_SECRET,
    )
    service = running.service
    assert isinstance(service.store, ElasticsearchStore)
    assert service.retention is not None
    api = await start_beside(service.settings, service)  # what `stanzaguard run` does
    assert api is not None
    try:
        alice, bob = running.client("alice"), running.client("bob")
        await alice.connect()
        await bob.connect()
        alice.send_chat("bob@localhost", "figures for the regulator, via elasticsearch")
        await receive(bob, "figures for the regulator, via elasticsearch")
        await running.drain()
        retention_job = service.retention
        for _ in range(200):  # the first round runs at start-up
            if retention_job.rounds >= 1 or retention_job.failures:
                break
            await asyncio.sleep(0.05)
        assert (retention_job.rounds, retention_job.failures) == (1, 0)
        assert retention_job.last is not None and retention_job.last.purged == 4

        host, port = api.address
        auth = {"Authorization": f"Bearer {issued.secret}"}
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            found = await client.get("/api/v1/search", params={"q": "regulator"}, headers=auth)
            assert found.status_code == 200, found.text
            (hit,) = found.json()["hits"]
            assert hit["sender"] == "alice@localhost"
            gone = await client.get("/api/v1/search", params={"q": "old"}, headers=auth)
            assert gone.status_code == 200 and gone.json()["hits"] == []
            assert (await client.get("/api/v1/search", params={"q": "x"})).status_code == 401
    finally:
        await api.stop()
    await running.stop()
    events = await read_audit_events(es_location)
    purges = [e for e in events if e.action == AuditAction.PURGE and "batch" in e.params]
    assert purges and all(e.actor == "system:retention" for e in purges)
    assert any(e.action.startswith("search") and e.actor == "token:officer-1" for e in events)
    assert not (data_dir / "archive.sqlite3").exists()


# -- the test fixture's own clean-up ---------------------------------------------------------------


async def test_dropping_a_prefix_leaves_the_cluster_clean(
    es_location: EsLocation, es_client: Elasticsearch
) -> None:
    store = await _on_es(es_location)
    await store.close()
    templates = es_client.indices.get_index_template(name=f"{es_location.prefix}-*")
    assert {t["name"] for t in templates["index_templates"]} == {
        es_location.index(kind) for kind in INDEX_KINDS
    }
    drop_prefix(es_client, es_location.prefix)
    assert not es_client.indices.get(index=f"{es_location.prefix}-*", allow_no_indices=True).body
    left = es_client.options(ignore_status=404).indices.get_index_template(
        name=f"{es_location.prefix}-*"
    )
    assert not left.body.get("index_templates")
