"""Issue 6: `stanzaguard reindex --from SPEC --to SPEC` moves an archive between stores.

SQLite to Elasticsearch (osmem-server) and back, SQLite to SQLite; a re-run continues where
the last one stopped; at the end the chains, heads and record counts are compared and the
target verifies, so a tampered target document is reported; a target holding another
archive, unknown schemes, unreachable servers and hostile specs get clear errors.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from elasticsearch import Elasticsearch
from typer.testing import CliRunner

from archive_api.store.audit import AUDIT_CHAIN, AuditEvent
from archive_api.store.base import (
    ArchiveStore,
    HoldRecord,
    RetentionAssignment,
    RetentionState,
    Tombstone,
)
from archive_api.store.chain import CheckpointSigner
from archive_api.store.elasticsearch import ElasticsearchStore
from archive_api.store.sqlite import SqliteStore
from archive_api.store.tokens import StoredToken
from stanzaguard.cli import app
from stanzaguard.errors import StanzaGuardError
from stanzaguard.operations import move_archive
from stanzaguard.stores import EsSpec, SqliteSpec
from tests.archive_api.store.audit_conformance import entry as audit_entry
from tests.archive_api.store.conformance import T0, ChainWriter, record
from tests.stanzaguard import es_support
from tests.stanzaguard.conftest import run_cli
from tests.stanzaguard.es_support import EsLocation
from tests.support.services import free_port

osmem_server = es_support.osmem_server
es_client = es_support.es_client
es_location = es_support.es_location

ENTRIES = 250
runner = CliRunner()


def build_sqlite_archive(path: Path, *, words: str = "figures", entries: int = ENTRIES) -> bytes:
    """A SQLite archive of `entries` records plus a signed checkpoint; returns the head."""

    async def build() -> bytes:
        writer = ChainWriter()
        links = writer.records(
            *(record(f"r{i:04d}", body=f"{words} number {i}", at=T0) for i in range(entries))
        )
        store = await SqliteStore.open(path)
        try:
            await store.apply(links)
            signer = CheckpointSigner.generate()
            at = min(100, entries)
            await store.add_checkpoint(signer.sign("spool", at, links[at - 1].hash))
        finally:
            await store.close()
        return writer.head

    return asyncio.run(build())


def reindex(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["reindex", *args])
    return result.exit_code, result.output


async def _es_summary(location: EsLocation) -> tuple[int, int, int]:
    store = await ElasticsearchStore.open(location.url, index_prefix=location.prefix)
    try:
        return await store.last_seq(), await store.count(""), len(await store.checkpoints())
    finally:
        await store.close()


def es_summary(location: EsLocation) -> tuple[int, int, int]:
    return asyncio.run(_es_summary(location))


def test_sqlite_to_elasticsearch_and_back(tmp_path: Path, es_location: EsLocation) -> None:
    source = tmp_path / "archive.sqlite3"
    head = build_sqlite_archive(source)
    to_es = ("--to", es_location.spec, "--to-prefix", es_location.prefix)
    code, out = reindex("--from", f"sqlite:{source}", *to_es, "--batch-size", "64")
    assert code == 0, out
    assert f"chain spool: {ENTRIES} entries (0 already there), head {head.hex()[:16]}" in out
    assert f"copied {ENTRIES} entries and 1 checkpoint(s)" in out
    assert "OK" in out
    assert es_summary(es_location) == (ENTRIES, ENTRIES, 1)

    back = tmp_path / "back.sqlite3"
    from_es = ("--from", es_location.spec, "--from-prefix", es_location.prefix)
    code, out = reindex(*from_es, "--to", f"sqlite:{back}")
    assert code == 0, out
    assert "OK" in out

    async def read_back() -> tuple[int, int, bool, list[str | None]]:
        store = await SqliteStore.open(back)
        try:
            page = await store.search('"number 7"', limit=5)
            return (
                await store.last_seq(),
                await store.count(""),
                (await store.verify()).ok,
                [hit.record.body for hit in page.hits],
            )
        finally:
            await store.close()

    assert asyncio.run(read_back()) == (ENTRIES, ENTRIES, True, ["figures number 7"])


def test_sqlite_to_sqlite_then_a_rerun_copies_nothing(tmp_path: Path) -> None:
    source, target = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    build_sqlite_archive(source)
    args = ("--from", f"sqlite:{source}", "--to", f"sqlite:{target}")
    code, out = reindex(*args)
    assert code == 0, out
    code, out = reindex(*args)
    assert code == 0, out
    assert f"{ENTRIES} entries ({ENTRIES} already there)" in out
    assert "copied 0 entries and 0 checkpoint(s)" in out


async def test_an_interrupted_move_continues_where_it_stopped(
    tmp_path: Path, es_location: EsLocation
) -> None:
    source = tmp_path / "archive.sqlite3"
    await asyncio.to_thread(build_sqlite_archive, source)
    # The target already got the first 90 entries (a run that stopped there).
    partial = await ElasticsearchStore.open(es_location.url, index_prefix=es_location.prefix)
    store = await SqliteStore.open(source)
    try:
        await partial.apply([link async for link in store.chain_links(1, 90)])
    finally:
        await store.close()
        await partial.close()
    seen: list[tuple[int, int]] = []
    outcome = await move_archive(
        SqliteSpec(source),
        EsSpec((es_location.url,), es_location.prefix),
        batch_size=50,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert outcome.ok, outcome.problems
    assert outcome.copied == ENTRIES - 90
    assert [move.already_there for move in outcome.chains] == [90]
    assert seen[0] == (0, ENTRIES - 90)
    assert seen[-1] == (ENTRIES - 90, ENTRIES - 90)
    assert all(total == ENTRIES - 90 for _, total in seen)


def test_a_tampered_target_document_is_reported(
    tmp_path: Path, es_location: EsLocation, es_client: Elasticsearch
) -> None:
    source = tmp_path / "archive.sqlite3"
    build_sqlite_archive(source)
    args = (
        "--from",
        f"sqlite:{source}",
        "--to",
        es_location.spec,
        "--to-prefix",
        es_location.prefix,
    )
    assert reindex(*args)[0] == 0
    ledger = es_location.index("ledger")
    hits = es_client.search(index=ledger, query={"term": {"seq": 42}}, size=2)["hits"]["hits"]
    assert len(hits) == 1
    doc = hits[0]["_source"]
    payload = base64.b64decode(doc["payload"]).replace(b"number 41", b"number 99")
    doc["payload"] = base64.b64encode(payload).decode()
    es_client.index(index=ledger, id=hits[0]["_id"], document=doc, refresh=True)
    code, out = reindex(*args)
    assert code == 1, out
    assert "MISMATCH" in out
    assert "42" in out.split("MISMATCH", 1)[1].splitlines()[0]


def test_a_target_holding_another_archive_is_refused(
    tmp_path: Path, es_location: EsLocation
) -> None:
    first, second = tmp_path / "first.sqlite3", tmp_path / "second.sqlite3"
    build_sqlite_archive(first, words="figures")
    build_sqlite_archive(second, words="other words", entries=ENTRIES + 10)
    to_es = ("--to", es_location.spec, "--to-prefix", es_location.prefix)
    assert reindex("--from", f"sqlite:{first}", *to_es)[0] == 0
    code, out = reindex("--from", f"sqlite:{second}", *to_es)
    assert code == 2
    assert "holds a different chain 'spool'" in " ".join(out.split())
    assert es_summary(es_location)[:2] == (ENTRIES, ENTRIES)  # nothing of the second written
    # A target further along than the source is another archive too.
    small = tmp_path / "small.sqlite3"
    build_sqlite_archive(small, entries=120)
    code, out = reindex("--from", f"sqlite:{small}", *to_es)
    assert code == 2
    assert "holds a different archive" in " ".join(out.split())


def test_moving_into_the_source_itself_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "archive.sqlite3"
    build_sqlite_archive(source, entries=3)
    code, out = reindex(
        "--from", f"sqlite:{source}", "--to", f"sqlite:{tmp_path}/./archive.sqlite3"
    )
    assert code == 2
    assert "the same store" in out


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("--from", "mongodb://x", "--to", "sqlite:/tmp/x"), "unknown store scheme"),
        (("--from", "sqlite:/nonexistent/a.sqlite3", "--to", "es:ftp://x"), "http:// or"),
        (("--from", "sqlite:/nonexistent/a.sqlite3", "--to", "es:https://u:p@x"), "credentials"),
        (("--to", "sqlite:/tmp/x"), "give both --from and --to"),
        (("--from", "sqlite:/tmp/x"), "give both --from and --to"),
        (("--from-prefix", "x"), "go with --from and --to"),
        (("--from", "sqlite:/a\x07b", "--to", "sqlite:/tmp/x"), "control characters"),
        (("--from", "es:https://x:9200", "--from-prefix", "UP", "--to", "sqlite:/x"), "prefix"),
        (("--from", "es:https://x:9200/" + "a" * 9000, "--to", "sqlite:/x"), "too long"),
    ],
)
def test_bad_specs_are_clear_errors(args: tuple[str, ...], why: str) -> None:
    code, out = reindex(*args)
    assert code == 2, out
    assert why in " ".join(out.split())


def test_a_missing_source_and_an_unreachable_target(tmp_path: Path) -> None:
    code, out = reindex("--from", f"sqlite:{tmp_path}/none.sqlite3", "--to", f"sqlite:{tmp_path}/b")
    assert code == 2
    assert "no archive at" in out
    source = tmp_path / "archive.sqlite3"
    build_sqlite_archive(source, entries=3)
    closed = f"es:http://127.0.0.1:{free_port()}"
    code, out = reindex("--from", f"sqlite:{source}", "--to", closed)
    assert code == 2
    assert "cannot reach the target" in " ".join(out.split())


async def test_checkpoint_signatures_are_checked_with_the_archives_key(
    tmp_path: Path, es_location: EsLocation
) -> None:
    source = tmp_path / "archive.sqlite3"
    await asyncio.to_thread(build_sqlite_archive, source, entries=120)
    # The checkpoint was signed by another key than this one: the target does not verify.
    outcome = await move_archive(
        SqliteSpec(source),
        EsSpec((es_location.url,), es_location.prefix),
        public_key=CheckpointSigner.generate().public_key,
    )
    assert not outcome.ok
    assert any("signature" in problem for problem in outcome.problems), outcome.problems


def test_the_real_command_moves_into_osmem(tmp_path: Path, es_location: EsLocation) -> None:
    source = tmp_path / "archive.sqlite3"
    build_sqlite_archive(source, entries=40)
    result = run_cli(
        "reindex",
        "--from",
        f"sqlite:{source}",
        "--to",
        es_location.spec,
        "--to-prefix",
        es_location.prefix,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    assert es_summary(es_location)[:2] == (40, 40)


def test_move_refuses_a_zero_batch(tmp_path: Path) -> None:
    with pytest.raises(StanzaGuardError, match="batch-size"):
        asyncio.run(
            move_archive(SqliteSpec(tmp_path / "a"), SqliteSpec(tmp_path / "b"), batch_size=0)
        )


# -- legal holds and retention move with the records -----------------------------------------

LATER = T0 + timedelta(days=1)
AUDIT_SIGNER = CheckpointSigner.generate()


def held(hold_id: str, query: str, *, released: bool = False) -> HoldRecord:
    hold = HoldRecord(hold_id, f"Case {hold_id}", "officer@corp.example", T0, "{}", query)
    if released:
        hold = dataclasses.replace(
            hold, released_at=LATER, released_by="counsel@corp.example", release_reason="settled"
        )
    return hold


async def add_holds_and_retention(store: ArchiveStore) -> None:
    await store.add_hold(held("h-active", '"number 7"'))
    await store.add_hold(held("h-released", "from:alice@corp.example"))
    await store.release_hold(
        "h-released", released_by="counsel@corp.example", released_at=LATER, reason="settled"
    )
    seven_years = T0 + timedelta(days=7 * 365)
    await store.set_retention(
        [RetentionAssignment(f"r{i:04d}", "finra-3y", seven_years) for i in range(100)],
        assigned_at=T0,
    )
    await store.set_retention(
        [
            RetentionAssignment(f"r{i:04d}", "short", T0 + timedelta(days=30))
            for i in range(100, 130)
        ],
        assigned_at=LATER,
    )
    events = await store.append_audit(
        [audit_entry(i, actor="token:officer-1", action="hold.create") for i in range(3)]
    )
    await store.add_audit_checkpoint(AUDIT_SIGNER.sign(AUDIT_CHAIN, 3, events[-1].hash))
    await store.add_token(StoredToken("ci-export", "auditor", b"\x01" * 32, T0, LATER))
    await store.add_token(StoredToken("old-officer", "officer", b"\x02" * 32, T0))
    await store.revoke_token("old-officer", at=LATER)


async def snapshot(
    store: ArchiveStore,
) -> tuple[
    tuple[HoldRecord, ...],
    list[RetentionState | None],
    tuple[AuditEvent, ...],
    tuple[StoredToken, ...],
]:
    states = [await store.retention_of(f"r{i:04d}") for i in (0, 99, 100, 129, 130, ENTRIES - 1)]
    audit = await store.audit_events(newest_first=False)
    return await store.list_holds(), states, audit.events, await store.tokens()


async def test_holds_and_retention_move_there_and_back(
    tmp_path: Path, es_location: EsLocation
) -> None:
    source = tmp_path / "archive.sqlite3"
    await asyncio.to_thread(build_sqlite_archive, source)
    store = await SqliteStore.open(source)
    try:
        await add_holds_and_retention(store)
        expected = await snapshot(store)
    finally:
        await store.close()
    assert expected[1][4] is None and expected[1][5] is None  # never assigned: stays so
    es = EsSpec((es_location.url,), es_location.prefix)

    outcome = await move_archive(SqliteSpec(source), es, batch_size=64)
    assert outcome.ok, outcome.problems
    assert (outcome.holds_copied, outcome.retention_copied) == (2, 130)
    assert (outcome.audit_copied, outcome.audit_checkpoints_copied) == (3, 1)
    assert outcome.tokens_copied == 2
    target = await ElasticsearchStore.open(es_location.url, index_prefix=es_location.prefix)
    try:
        assert await snapshot(target) == expected
        # The target's own purge now honours the moved hold: r0007 stays past its expiry.
        batch = await target.purge(T0 + timedelta(days=8 * 365), dry_run=True, limit=500)
        assert "r0007" not in {p.record_id for p in batch.purged}
        assert "r0008" in {p.record_id for p in batch.purged}
    finally:
        await target.close()

    rerun = await move_archive(SqliteSpec(source), es, batch_size=64)
    assert rerun.ok, rerun.problems
    assert (rerun.copied, rerun.holds_copied, rerun.retention_copied) == (0, 0, 0)
    assert (rerun.audit_copied, rerun.audit_checkpoints_copied, rerun.tokens_copied) == (0, 0, 0)

    back = tmp_path / "back.sqlite3"
    code, out = await asyncio.to_thread(
        reindex,
        "--from",
        es_location.spec,
        "--from-prefix",
        es_location.prefix,
        "--to",
        f"sqlite:{back}",
    )
    assert code == 0, out
    assert "legal holds copied or released: 2; retention assignments copied: 130" in out
    store = await SqliteStore.open(back)
    try:
        assert await snapshot(store) == expected
    finally:
        await store.close()


async def test_a_hold_released_in_the_source_after_a_move_is_released_by_the_next(
    tmp_path: Path,
) -> None:
    source, target = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    await asyncio.to_thread(build_sqlite_archive, source, entries=5)
    store = await SqliteStore.open(source)
    try:
        await store.add_hold(held("h1", "lunch"))
        assert (await move_archive(SqliteSpec(source), SqliteSpec(target))).holds_copied == 1
        await store.release_hold("h1", released_by="counsel@corp.example", released_at=LATER)
    finally:
        await store.close()
    outcome = await move_archive(SqliteSpec(source), SqliteSpec(target))
    assert outcome.ok, outcome.problems
    assert outcome.holds_copied == 1
    moved = await SqliteStore.open(target)
    try:
        hold = await moved.get_hold("h1")
        assert hold is not None and hold.released_at == LATER
    finally:
        await moved.close()


async def test_conflicting_holds_and_longer_retention_in_the_target_are_reported(
    tmp_path: Path,
) -> None:
    source, target = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    await asyncio.to_thread(build_sqlite_archive, source, entries=5)
    await asyncio.to_thread(build_sqlite_archive, target, entries=5)  # the same archive
    src, dst = await SqliteStore.open(source), await SqliteStore.open(target)
    try:
        await src.add_hold(held("h1", "lunch"))
        await dst.add_hold(held("h1", "from:someone@else.example"))  # same id, other scope
        await src.add_token(StoredToken("ci", "auditor", b"\x01" * 32, T0))
        await dst.add_token(StoredToken("ci", "admin", b"\x03" * 32, T0))  # same name, other
        await src.add_token(StoredToken("reused", "auditor", b"\x03" * 32, T0))  # dst's secret
        await src.set_retention(
            [RetentionAssignment("r0001", "short", T0 + timedelta(days=30))], assigned_at=T0
        )
        await dst.set_retention(  # the target keeps it longer: never shortened by a move
            [RetentionAssignment("r0001", "long", T0 + timedelta(days=3000))], assigned_at=T0
        )
    finally:
        await src.close()
        await dst.close()
    outcome = await move_archive(SqliteSpec(source), SqliteSpec(target))
    assert not outcome.ok
    assert any("hold 'h1'" in problem for problem in outcome.problems)
    assert any("record 'r0001': retention long" in problem for problem in outcome.problems)
    assert "token 'ci': the target holds a different token" in outcome.problems
    assert "token 'reused': its secret is another token's in the target" in outcome.problems
    moved = await SqliteStore.open(target)
    try:
        hold = await moved.get_hold("h1")
        assert hold is not None and hold.query == "from:someone@else.example"
        state = await moved.retention_of("r0001")
        assert state is not None and state.retention_class == "long"
    finally:
        await moved.close()


# -- archives whose retention purged records -----------------------------------------------------


async def purge_some(path: Path) -> tuple[int, list[RetentionState | None]]:
    """Expire and purge r0010..r0019 of a built archive, then replay one of them from another
    proxy's chain (entombed on arrival); returns the record count and their states."""
    store = await SqliteStore.open(path)
    try:
        gone = [f"r{i:04d}" for i in range(10, 20)]
        await store.set_retention(
            [RetentionAssignment(rid, "short", T0 + timedelta(days=30)) for rid in gone],
            assigned_at=T0,
        )
        await store.add_hold(held("h-keep", '"number 15"'))  # one of them is held: it stays
        batch = await store.purge(T0 + timedelta(days=31))
        assert len(batch.purged) == 9
        other = ChainWriter()
        await store.apply(other.records(record("r0011", body="replayed")), chain="proxy-2")
        assert (await store.verify()).ok
        return await store.count(""), [await store.retention_of(rid) for rid in gone]
    finally:
        await store.close()


async def test_an_archive_with_purged_records_moves_there_and_back(
    tmp_path: Path, es_location: EsLocation
) -> None:
    source = tmp_path / "archive.sqlite3"
    await asyncio.to_thread(build_sqlite_archive, source)
    records, states = await purge_some(source)
    assert records == ENTRIES - 9
    es = EsSpec((es_location.url,), es_location.prefix)

    outcome = await move_archive(SqliteSpec(source), es, batch_size=7)
    assert outcome.ok, outcome.problems
    assert outcome.copied == ENTRIES + 1
    assert (outcome.source_records, outcome.target_records) == (records, records)
    target = await ElasticsearchStore.open(es_location.url, index_prefix=es_location.prefix)
    try:
        assert [await target.retention_of(f"r{i:04d}") for i in range(10, 20)] == states
        assert await target.get("r0012") is None
        assert await target.get("r0015") is not None  # the held one
        (link,) = [entry async for entry in target.chain_links(chain="proxy-2")]
        assert Tombstone.from_payload(link.payload) is not None
    finally:
        await target.close()
    assert (await move_archive(SqliteSpec(source), es)).copied == 0  # a re-run: nothing

    back = tmp_path / "back.sqlite3"
    code, out = await asyncio.to_thread(
        reindex,
        *("--from", es_location.spec, "--from-prefix", es_location.prefix),
        *("--to", f"sqlite:{back}", "--batch-size", "5"),
    )
    assert code == 0, out
    assert "OK" in out
    store = await SqliteStore.open(back)
    try:
        report = await store.verify()
        assert report.ok, report.problems
        assert await store.count("") == records
        assert [await store.retention_of(f"r{i:04d}") for i in range(10, 20)] == states
    finally:
        await store.close()


async def test_a_source_tombstone_without_its_purge_is_refused(tmp_path: Path) -> None:
    source, target = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    await asyncio.to_thread(build_sqlite_archive, source, entries=30)
    await purge_some(source)
    # Someone rewrote the source's purge record: its tombstones no longer match it.
    with sqlite3.connect(source) as conn:
        conn.execute("UPDATE retention SET class = 'forged' WHERE record_id = 'r0012'")
    with pytest.raises(StanzaGuardError, match="no matching purge"):
        await move_archive(SqliteSpec(source), SqliteSpec(target))


async def test_a_target_with_an_audit_log_of_its_own_keeps_it_and_says_so(tmp_path: Path) -> None:
    source, target = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    await asyncio.to_thread(build_sqlite_archive, source, entries=5)
    src, dst = await SqliteStore.open(source), await SqliteStore.open(target)
    try:
        await src.append_audit([audit_entry(i) for i in range(4)])
        theirs = await dst.append_audit([audit_entry(0, actor="cli:root", role=None)])
    finally:
        await src.close()
        await dst.close()
    outcome = await move_archive(SqliteSpec(source), SqliteSpec(target))
    assert not outcome.ok
    assert outcome.problems == ["audit log: the target has an audit log of its own; not copied"]
    assert outcome.copied == 5  # the records moved all the same
    moved = await SqliteStore.open(target)
    try:
        assert (await moved.audit_events()).events == theirs
    finally:
        await moved.close()
