"""Several proxies, one archive: each proxy's spool is its own hash chain in the shared store.

Two proxies' data directories (each with its own spool, signing key and evidence), one real
SQLite store: proxy-0 indexes in-process (`Indexer`), proxy-1 through the index worker child
(`python -m stanzaguard.index_worker --chain proxy-1`). Then the store, `stanzaguard verify`
and the rebuild from evidence must see both chains whole.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from archive_api.store.chain import CheckpointSigner
from archive_api.store.records import ArchiveRecord, Direction, EntryOp, RecordKind, SpoolEntry
from archive_api.store.sqlite import SqliteStore
from archive_api.tasks import create_celery_app
from classifier.clock import ManualClock
from proxy.indexer import Indexer
from proxy.spool import Spool, read_chain_name
from stanzaguard import operations
from stanzaguard.celery_indexer import CeleryIndexer
from stanzaguard.errors import SettingsError
from stanzaguard.index_worker import IndexWorker
from stanzaguard.keys import load_or_create_signer
from stanzaguard.settings import load_settings
from stanzaguard.stores import SqliteSpec
from stanzaguard.wiring import open_spool
from tests.stanzaguard.conftest import run_cli
from tests.stanzaguard.test_celery_indexing import start_worker
from tests.support.redis import running_redis

ENTRIES = 23  # per proxy: several segments sealed, several checkpoints signed


def message(record_id: str, body: str) -> bytes:
    record = ArchiveRecord(
        record_id=record_id,
        kind=RecordKind.MESSAGE,
        occurred_at=datetime(2026, 3, 1, tzinfo=UTC),
        direction=Direction.FROM_CLIENT,
        sender="alice@corp.example",
        recipient="bob@corp.example",
        stanza_type="chat",
        body=body,
    )
    return SpoolEntry(EntryOp.RECORD, record.record_id, record=record).payload()


async def open_proxy_spool(data_dir: Path, chain: str) -> Spool:
    """A proxy's spool as `stanzaguard run` lays it out: own key, evidence kept."""
    return await Spool.open(
        data_dir / "spool",
        clock=ManualClock(),
        signer=load_or_create_signer(data_dir / "keys"),
        checkpoint_every=5,
        segment_max_entries=4,
        keep_evidence=True,
        evidence_dir=data_dir / "evidence",
        chain_name=chain,
    )


@dataclass
class TwoProxies:
    dirs: tuple[Path, Path]
    store_path: Path  # the shared store (in proxy-0's data directory)


@pytest.fixture
async def two_proxies(tmp_path: Path) -> AsyncIterator[TwoProxies]:
    dirs = (tmp_path / "proxy-0", tmp_path / "proxy-1")
    store_path = dirs[0] / "archive.sqlite3"
    dirs[0].mkdir()
    store = await SqliteStore.open(store_path)
    spool0 = await open_proxy_spool(dirs[0], "proxy-0")
    spool1 = await open_proxy_spool(dirs[1], "proxy-1")
    in_process = Indexer(spool0, store, batch_size=7)
    worker = IndexWorker(spool1, store_path, batch_size=7, notify_interval=0.001)
    worker.start()
    try:
        for n in range(1, ENTRIES + 1):
            # Interleaved, as two live proxies write; the same message seen by both once.
            both = message("shared", "both saw this") if n == 10 else None
            await spool0.append([both or message(f"p0-{n}", f"zero {n}")])
            await spool1.append([both or message(f"p1-{n}", f"one {n}")])
            worker.notify()
            if n % 6 == 0:
                await in_process.index_once()
        await in_process.drain()
        await in_process.copy_checkpoints()
        await asyncio.wait_for(worker.drain(), 60)
    finally:
        await worker.stop()
        await spool0.close()
        await spool1.close()
        await store.close()
    assert worker.failures == 0
    yield TwoProxies(dirs, store_path)


async def test_both_chains_land_in_one_store_and_verify(two_proxies: TwoProxies) -> None:
    store = await SqliteStore.open(two_proxies.store_path)
    try:
        assert await store.chains() == ("proxy-0", "proxy-1")
        assert await store.last_seq(chain="proxy-0") == ENTRIES
        assert await store.last_seq(chain="proxy-1") == ENTRIES
        assert await store.last_seq() == 0  # nobody wrote the default chain
        report = await store.verify()
        assert report.ok, report.problems
        assert {c.chain for c in report.chains} == {"proxy-0", "proxy-1"}
        # Each proxy's signed checkpoints were copied under its own chain.
        assert {c.chain_name for c in await store.checkpoints()} == {"proxy-0", "proxy-1"}
        assert {5, 10, 15, 20} <= {c.seq for c in await store.checkpoints("proxy-1")}
        # Search sees both proxies' messages; the one both saw is one record.
        assert await store.count("zero") == ENTRIES - 1
        assert await store.count("one") == ENTRIES - 1
        assert await store.count('"both saw this"') == 1
        assert await store.count("") == 2 * ENTRIES - 1
    finally:
        await store.close()

    for data_dir, chain in zip(two_proxies.dirs, ("proxy-0", "proxy-1"), strict=True):
        assert read_chain_name(data_dir / "spool") == chain
        outcome = await operations.verify(
            operations.Paths(data_dir), store_spec=SqliteSpec(two_proxies.store_path)
        )
        assert outcome.ok, (chain, outcome.store.problems, outcome.spool_problems)
        # Every entry, sealed or still spooled, compared with the store's copy of its chain.
        assert outcome.spool_entries_checked == ENTRIES
        assert outcome.not_yet_indexed == 0


async def test_verify_compares_the_spool_with_its_own_chain(
    two_proxies: TwoProxies, tmp_path: Path
) -> None:
    # A store holding the two chains under each other's names: each chain verifies on its
    # own, but proxy-1's spool is not what the store calls proxy-1.
    swapped = tmp_path / "swapped.sqlite3"
    store = await SqliteStore.open(two_proxies.store_path)
    other = await SqliteStore.open(swapped)
    try:
        for theirs, ours in (("proxy-0", "proxy-1"), ("proxy-1", "proxy-0")):
            links = [link async for link in store.chain_links(chain=theirs)]
            await other.apply(links, chain=ours)
    finally:
        await other.close()
        await store.close()
    outcome = await operations.verify(
        operations.Paths(two_proxies.dirs[1]), store_spec=SqliteSpec(swapped)
    )
    assert outcome.store.ok
    assert not outcome.ok
    assert outcome.spool_problems[0] == "seq 1: the archive's entry differs from the spooled one"


def test_cli_verify_on_a_data_dir_whose_spool_is_a_named_chain(
    two_proxies: TwoProxies, tmp_path: Path
) -> None:
    # proxy-1's data directory with a copy of the shared store in it.
    copy = tmp_path / "copy-1"
    shutil.copytree(two_proxies.dirs[1], copy)
    shutil.copy(two_proxies.store_path, copy / "archive.sqlite3")
    result = run_cli("verify", "--data-dir", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if ":" in line}
    # Its own chain's signatures checked with its own key; proxy-0's key is not here.
    assert lines["chain proxy-1"].endswith("signed checkpoint(s) checked")
    assert lines["chain proxy-0"].endswith("signed by another proxy's key")
    assert f"{ENTRIES} spooled entries checked" in result.stdout
    assert "not indexed yet" not in result.stdout

    # A spooled entry whose archive copy is gone is found in chain proxy-1.
    (copy / "evidence" / "segment-00000000000000000001.log").write_bytes(b"")
    broken = run_cli("verify", "--data-dir", str(copy))
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "segment-00000000000000000001.log" in broken.stdout


async def test_a_checkpoint_of_its_own_chain_signed_by_another_key_breaks_verify(
    two_proxies: TwoProxies, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.sqlite3"
    shutil.copy(two_proxies.store_path, copy)
    store = await SqliteStore.open(copy)
    try:
        [third] = [link async for link in store.chain_links(3, 3, chain="proxy-1")]
        forged = CheckpointSigner.generate().sign("proxy-1", 3, third.hash)
        await store.add_checkpoint(forged)
    finally:
        await store.close()
    own = await operations.verify(
        operations.Paths(two_proxies.dirs[1]), store_spec=SqliteSpec(copy)
    )
    assert not own.ok
    assert [str(p) for p in own.store.problems] == [
        "chain 'proxy-1', seq 3: checkpoint signature does not verify"
    ]
    # From proxy-0's data directory, chain proxy-1 is another key's: not judged there.
    other = await operations.verify(
        operations.Paths(two_proxies.dirs[0]), store_spec=SqliteSpec(copy)
    )
    assert other.ok, other.store.problems
    assert other.foreign_signatures == ["proxy-1"]


def test_cli_verify_refuses_a_bad_chain_name(tmp_path: Path) -> None:
    config = tmp_path / "stanzaguard.toml"
    config.write_text('chain_name = "Proxy 0"\n')
    (tmp_path / "data").mkdir()
    result = run_cli("verify", "--data-dir", str(tmp_path / "data"), "--config", str(config))
    assert result.returncode != 0
    assert "chain_name" in result.stdout + result.stderr


async def test_rebuild_from_evidence_keeps_the_spool_chain(
    two_proxies: TwoProxies, tmp_path: Path
) -> None:
    target = tmp_path / "rebuilt.sqlite3"
    applied = await operations.rebuild(operations.Paths(two_proxies.dirs[1]), target)
    assert applied == ENTRIES
    store = await SqliteStore.open(target)
    try:
        assert await store.chains() == ("proxy-1",)
        assert await store.last_seq(chain="proxy-1") == ENTRIES
        assert {c.chain_name for c in await store.checkpoints()} == {"proxy-1"}
        assert await store.count("one") == ENTRIES - 1
    finally:
        await store.close()


# -- the chain_name setting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Proxy-0",
        "proxy 0",
        "proxy/0",
        "proxy\n0",
        "proxy\x00",
        "prøxy",
        "x" * 64,
        "audit",  # the audit log's chain, signed by the same key
    ],
)
def test_bad_chain_names_are_refused(name: str) -> None:
    with pytest.raises(SettingsError, match="chain_name"):
        load_settings(chain_name=name)


@pytest.mark.parametrize(
    "name", ["spool", "proxy-0", "chat-stanzaguard-proxy-12", "a.b_c", "x" * 63]
)
def test_good_chain_names_are_taken(name: str) -> None:
    assert load_settings(chain_name=name).chain_name == name


def test_chain_name_defaults_to_spool_and_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STANZAGUARD_CHAIN_NAME", raising=False)
    assert load_settings().chain_name == "spool"
    monkeypatch.setenv("STANZAGUARD_CHAIN_NAME", "sg-proxy-1")
    assert load_settings().chain_name == "sg-proxy-1"


async def test_the_proxy_refuses_a_data_dir_whose_spool_is_another_chain(tmp_path: Path) -> None:
    first = load_settings(data_dir=tmp_path, chain_name="proxy-0")
    spool = await open_spool(first, ManualClock())
    assert spool.chain_name == "proxy-0"
    await spool.close()
    renamed = load_settings(data_dir=tmp_path, chain_name="proxy-1")
    with pytest.raises(SettingsError, match="holds chain 'proxy-0'"):
        await open_spool(renamed, ManualClock())


# -- distributed mode: two proxies' shippers, one Celery worker, one store ----------------------


@pytest.mark.integration
async def test_two_shippers_send_their_own_chains_to_one_celery_worker(tmp_path: Path) -> None:
    data_dir = tmp_path / "worker-data"
    with running_redis(tmp_path / "redis") as redis_server:
        app = create_celery_app(redis_server.url)
        spools = [
            await Spool.open(tmp_path / name / "spool", clock=ManualClock(), chain_name=name)
            for name in ("proxy-0", "proxy-1")
        ]
        shippers = [
            CeleryIndexer(spool, app, batch_size=40, task_timeout=5.0, idle_wait=0.05)
            for spool in spools
        ]
        worker = start_worker(data_dir, redis_server.url, tmp_path / "worker.log")
        try:
            assert [shipper.chain for shipper in shippers] == ["proxy-0", "proxy-1"]
            for shipper in shippers:
                shipper.start()
            for n in range(1, 101):
                for index, (spool, shipper) in enumerate(zip(spools, shippers, strict=True)):
                    await spool.append([message(f"p{index}-{n}", f"celery{index} {n}")])
                    shipper.notify()
            for shipper in shippers:
                await asyncio.wait_for(shipper.drain(), 60)
        finally:
            for shipper in shippers:
                await shipper.stop()
            for spool in spools:
                await spool.close()
            worker.stop()
    store = await SqliteStore.open(data_dir / "archive.sqlite3")
    try:
        assert await store.chains() == ("proxy-0", "proxy-1")
        assert [await store.last_seq(chain=c) for c in ("proxy-0", "proxy-1")] == [100, 100]
        assert (await store.count("celery0"), await store.count("celery1")) == (100, 100)
        assert (await store.verify()).ok
    finally:
        await store.close()
