"""Signed spool checkpoints reach the store in distributed mode, and `verify` checks them.

Two proxies' data directories (own spool, own signing key, evidence kept), each shipping with
a `CeleryIndexer` over a real redis-server to one real `stanzaguard worker` writing the SQLite
store in proxy-0's data directory. Afterwards the store holds each proxy's periodic and seal
checkpoints under its own chain, and `stanzaguard verify` (the command, and the operation per
data directory) checks their signatures against each proxy's key.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from archive_api.store.chain import CheckpointSigner
from archive_api.store.sqlite import SqliteStore
from archive_api.tasks import ADD_CHECKPOINTS, checkpoints_to_json, create_celery_app
from proxy.spool import read_checkpoints
from stanzaguard import operations
from stanzaguard.celery_indexer import CeleryIndexer
from stanzaguard.stores import SqliteSpec
from tests.stanzaguard.conftest import run_cli
from tests.stanzaguard.test_celery_indexing import start_worker
from tests.stanzaguard.test_chain_per_proxy import message, open_proxy_spool
from tests.support.redis import running_redis

pytestmark = pytest.mark.integration

ENTRIES = 23  # checkpoint_every=5, segments of 4: periodic and seal checkpoints both


async def test_spool_checkpoints_reach_the_store_and_verify(tmp_path: Path) -> None:
    dirs = (tmp_path / "proxy-0", tmp_path / "proxy-1")
    chains = ("proxy-0", "proxy-1")
    store_path = dirs[0] / "archive.sqlite3"
    with running_redis(tmp_path / "redis") as redis_server:
        app = create_celery_app(redis_server.url)
        spools = [await open_proxy_spool(d, c) for d, c in zip(dirs, chains, strict=True)]
        shippers = [
            CeleryIndexer(spool, app, batch_size=6, task_timeout=5.0, idle_wait=0.05)
            for spool in spools
        ]
        worker = start_worker(dirs[0], redis_server.url, tmp_path / "worker.log")
        try:
            for shipper in shippers:
                shipper.start()
            for n in range(1, ENTRIES + 1):
                for index, (spool, shipper) in enumerate(zip(spools, shippers, strict=True)):
                    await spool.append([message(f"p{index}-{n}", f"proxy{index} {n}")])
                    shipper.notify()
            for shipper in shippers:
                await asyncio.wait_for(shipper.drain(), 60)
            in_spool = {
                chain: read_checkpoints(d / "spool") for d, chain in zip(dirs, chains, strict=True)
            }
            spooled = {chain: {c.seq for c in found} for chain, found in in_spool.items()}
        finally:
            for shipper in shippers:
                await shipper.stop()
            for spool in spools:
                await spool.close()
            worker.stop()
    for chain, shipper in zip(chains, shippers, strict=True):
        # Periodic (every 5) and seal (every 4: segments 1-4, 5-8, ...) checkpoints.
        assert {5, 10, 15, 20, 4, 8, 12} <= spooled[chain]
        assert shipper.checkpoints_sent == len(in_spool[chain])

    store = await SqliteStore.open(store_path)
    try:
        for chain in chains:
            assert await store.last_seq(chain=chain) == ENTRIES
            stored = {c.seq for c in await store.checkpoints(chain)}
            assert stored == spooled[chain]
        assert (await store.verify()).ok
    finally:
        await store.close()

    for data_dir, chain in zip(dirs, chains, strict=True):
        outcome = await operations.verify(
            operations.Paths(data_dir), store_spec=SqliteSpec(store_path)
        )
        assert outcome.ok, (chain, outcome.store.problems, outcome.spool_problems)
        assert outcome.spool_entries_checked == ENTRIES
        assert outcome.not_yet_indexed == 0
        own = [c for c in outcome.store.chains if c.chain == chain]
        assert own and own[0].checkpoints == len(spooled[chain])
        # The other proxy's checkpoints are checked by hash here, by signature in its pod.
        assert outcome.foreign_signatures == [c for c in chains if c != chain]

    # The command, on the data directory that holds the store (proxy-0's).
    result = run_cli("verify", "--data-dir", str(dirs[0]))
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_checkpoint_signed_by_another_key_is_named_by_verify(tmp_path: Path) -> None:
    """The worker has no proxy's key: it checks a shipped checkpoint's head against the
    stored hash only. One signed by another key is stored, and `verify` on the proxy's data
    directory (which holds the key) names it."""
    data_dir = tmp_path / "proxy-0"
    store_path = data_dir / "archive.sqlite3"
    with running_redis(tmp_path / "redis") as redis_server:
        app = create_celery_app(redis_server.url)
        spool = await open_proxy_spool(data_dir, "proxy-0")
        shipper = CeleryIndexer(spool, app, batch_size=6, task_timeout=5.0, idle_wait=0.05)
        worker = start_worker(data_dir, redis_server.url, tmp_path / "worker.log")
        try:
            shipper.start()
            for n in range(1, 11):
                await spool.append([message(f"p0-{n}", f"zero {n}")])
                shipper.notify()
            await asyncio.wait_for(shipper.drain(), 60)
            store = await SqliteStore.open(store_path)
            try:
                (link,) = [x async for x in store.chain_links(3, 3, chain="proxy-0")]
            finally:
                await store.close()
            forged = CheckpointSigner.generate().sign("proxy-0", 3, link.hash)
            # Over the real wire, as a shipper (or anyone with access to the broker) sends it.
            stored = await asyncio.to_thread(
                app.send_task(ADD_CHECKPOINTS, args=["proxy-0", checkpoints_to_json([forged])]).get,
                timeout=30,
            )
            assert stored == 1
        finally:
            await shipper.stop()
            await spool.close()
            worker.stop()
    assert (
        await operations.verify(
            operations.Paths(tmp_path / "unrelated"), store_spec=SqliteSpec(store_path)
        )
    ).store.ok
    outcome = await operations.verify(operations.Paths(data_dir))
    assert not outcome.ok
    assert [(p.chain, p.seq) for p in outcome.store.problems] == [("proxy-0", 3)]
