"""Distributed indexing with real processes: redis-server, `stanzaguard worker`, a real spool.

The shipper (`CeleryIndexer`) runs in the test's process, as in a proxy; the worker is the
real command in a subprocess, indexing into a real SQLite store. Faults are real too: the
worker is killed with SIGKILL while a batch is in flight, and redis-server is stopped (losing
its queue, as it runs without persistence) in the middle of a burst.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from archive_api.store.sqlite import SqliteStore
from archive_api.tasks import create_celery_app
from classifier.clock import ManualClock
from proxy.spool import Spool
from stanzaguard.celery_indexer import CeleryIndexer
from tests.proxy.test_spool import entry_payload
from tests.support.redis import RedisServer
from tests.support.services import ManagedProcess, start_process

pytestmark = pytest.mark.integration

ENTRIES = 3000


def start_worker(data_dir: Path, redis_url: str, log: Path) -> ManagedProcess:
    env = dict(os.environ, STANZAGUARD_LOG_FORMAT="text", STANZAGUARD_LOG_LEVEL="info")
    return start_process(
        [
            sys.executable,
            "-m",
            "stanzaguard.cli",
            "worker",
            "--data-dir",
            str(data_dir),
            "--redis-url",
            redis_url,
            "--concurrency",
            "1",
        ],
        log_path=log,
        env=env,
    )


def kill_worker(worker: ManagedProcess) -> None:
    """SIGKILL the worker and its pool child (its own process group, by the worker's id)."""
    os.killpg(worker.pid, signal.SIGKILL)
    worker.popen.wait(timeout=10)
    worker.stop()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = await Spool.open(tmp_path / "spool", clock=ManualClock(), segment_max_entries=500)
    yield spool
    await spool.close()


async def store_state(path: Path) -> tuple[int, int]:
    """(last applied seq, number of records) of the SQLite store the worker writes."""
    store = await SqliteStore.open(path)
    try:
        return await store.last_seq(), await store.count("")
    finally:
        await store.close()


async def spool_burst(spool: Spool, shipper: CeleryIndexer, first: int, last: int) -> None:
    for start in range(first, last + 1, 100):
        await spool.append([entry_payload(n) for n in range(start, min(start + 100, last + 1))])
        shipper.notify()
        await asyncio.sleep(0)


async def wait_for_failures(shipper: CeleryIndexer, more_than: int, limit: float) -> None:
    """Until the shipper has counted more than `more_than` failed (timed-out) batches."""
    for _ in range(int(limit / 0.05)):
        if shipper.failures > more_than:
            break
        await asyncio.sleep(0.05)
    assert shipper.failures > more_than


async def wait_until_indexed(shipper: CeleryIndexer, spool: Spool, seq: int, limit: float) -> None:
    async def reached() -> None:
        while spool.cursor() < seq:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(reached(), limit)


async def test_everything_indexed_once_through_a_worker_killed_mid_batch(
    tmp_path: Path, redis_server: RedisServer, spool: Spool
) -> None:
    data_dir = tmp_path / "data"
    worker = start_worker(data_dir, redis_server.url, tmp_path / "worker1.log")
    app = create_celery_app(redis_server.url)
    shipper = CeleryIndexer(spool, app, batch_size=150, task_timeout=3.0, idle_wait=0.05)
    shipper.start()
    replacement: ManagedProcess | None = None
    try:
        await spool_burst(spool, shipper, 1, ENTRIES)
        # Wait until the worker has stored some batches and has another one in hand.
        await wait_until_indexed(shipper, spool, 300, 25)
        while shipper.in_flight is None:
            await asyncio.sleep(0.001)
        kill_worker(worker)
        failures = shipper.failures
        # With no worker the batch is never answered: it times out. An answer already on its
        # way (the worker stored the batch before it died) moves the cursor first, however
        # late it is taken in; the next batch then times out. Either way the cursor is where
        # it stays once a batch has timed out.
        await wait_for_failures(shipper, failures, 10)
        stalled = spool.cursor()
        assert stalled < ENTRIES
        # Sent again, it times out again, and the cursor stays.
        await wait_for_failures(shipper, failures + 1, 10)
        assert spool.cursor() == stalled
        replacement = start_worker(data_dir, redis_server.url, tmp_path / "worker2.log")
        await wait_until_indexed(shipper, spool, ENTRIES, 25)
        await asyncio.wait_for(shipper.drain(), 10)
    finally:
        await shipper.stop()
        for process in (worker, replacement):
            if process is not None:
                process.stop()
    assert await store_state(data_dir / "archive.sqlite3") == (ENTRIES, ENTRIES)
    assert shipper.indexed == ENTRIES
    # Every segment but the one still being written (500 entries each) was sealed.
    assert spool.sealed_through()[0] == ENTRIES - 500


async def test_a_redis_restart_during_a_burst_loses_nothing(
    tmp_path: Path, redis_server: RedisServer, spool: Spool
) -> None:
    data_dir = tmp_path / "data"
    worker = start_worker(data_dir, redis_server.url, tmp_path / "worker.log")
    app = create_celery_app(redis_server.url)
    shipper = CeleryIndexer(
        spool, app, batch_size=200, task_timeout=3.0, idle_wait=0.05, max_backoff=1.0
    )
    shipper.start()
    try:
        await spool_burst(spool, shipper, 1, ENTRIES // 2)
        await wait_until_indexed(shipper, spool, 200, 25)
        redis_server.stop()  # no persistence: queued tasks and results are gone with it
        failures_before = shipper.failures
        cursor_during_outage = spool.cursor()
        # The proxy keeps spooling while Redis is away; nothing moves the cursor.
        await spool_burst(spool, shipper, ENTRIES // 2 + 1, ENTRIES)
        await wait_for_failures(shipper, failures_before, 10)
        assert spool.cursor() <= cursor_during_outage + 200  # at most the batch that was answered
        stalled = spool.cursor()
        await asyncio.sleep(1.0)
        assert spool.cursor() == stalled
        redis_server.start()  # same port: the worker and the shipper reconnect
        await wait_until_indexed(shipper, spool, ENTRIES, 28)
    finally:
        await shipper.stop()
        worker.stop()
    assert await store_state(data_dir / "archive.sqlite3") == (ENTRIES, ENTRIES)


async def test_nothing_moves_without_a_worker_and_a_late_worker_catches_up(
    tmp_path: Path, redis_server: RedisServer, spool: Spool
) -> None:
    data_dir = tmp_path / "data"
    app = create_celery_app(redis_server.url)
    shipper = CeleryIndexer(spool, app, batch_size=500, task_timeout=1.0, idle_wait=0.05)
    shipper.start()
    worker: ManagedProcess | None = None
    try:
        await spool_burst(spool, shipper, 1, 1000)
        await wait_for_failures(shipper, 0, 5)  # the batch timed out unanswered
        assert spool.cursor() == 0
        # The unanswered copies wait in the queue; the late worker applies them as no-ops.
        worker = start_worker(data_dir, redis_server.url, tmp_path / "worker.log")
        await wait_until_indexed(shipper, spool, 1000, 25)
    finally:
        await shipper.stop()
        if worker is not None:
            worker.stop()
    assert await store_state(data_dir / "archive.sqlite3") == (1000, 1000)
