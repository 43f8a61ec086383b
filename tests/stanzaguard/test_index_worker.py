"""The index worker process: it follows the spool, survives being killed, stops cleanly.

Real spool files, a real SQLite store, a real child process (`python -m
stanzaguard.index_worker`).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from proxy.spool import Spool
from stanzaguard.index_worker import IndexWorker, _Worker
from tests.proxy.test_spool import entry_payload


async def store_count(path: Path) -> int:
    store = await SqliteStore.open(path)
    try:
        return await store.last_seq()
    finally:
        await store.close()


async def test_worker_indexes_restarts_after_a_kill_and_drains_on_stop(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool", clock=ManualClock(), segment_max_entries=50)
    store_path = tmp_path / "archive.sqlite3"
    worker = IndexWorker(spool, store_path, notify_interval=0.001, cursor_interval=0.05)
    worker.start()
    try:
        for n in range(1, 121):
            await spool.append([entry_payload(n)])
            worker.notify()
        await asyncio.wait_for(worker.drain(), 60)
        assert await store_count(store_path) == 120
        assert spool.cursor() == 120
        assert worker.failures == 0

        proc = worker._proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        for _ in range(200):
            if worker.restarts:
                break
            await asyncio.sleep(0.05)
        assert worker.restarts == 1
        for n in range(121, 201):
            await spool.append([entry_payload(n)])
            worker.notify()
        await asyncio.wait_for(worker.drain(), 60)
        assert await store_count(store_path) == 200
        # Full segments were sealed out of the spool once indexed.
        assert spool.sealed_through()[0] >= 150

        for n in range(201, 231):
            await spool.append([entry_payload(n)])
        worker.notify()
    finally:
        await worker.stop()  # indexes what is spooled, then the worker exits
        await spool.close()
    assert await store_count(store_path) == 230
    assert worker._proc is not None and worker._proc.returncode == 0


async def test_entries_written_behind_alone_reach_the_store(tmp_path: Path) -> None:
    # A sighting written behind calls no notify(); with nothing else spooled after it (a quiet
    # hour), the worker must still learn of it and index it.
    spool = await Spool.open(tmp_path / "spool", clock=ManualClock())
    store_path = tmp_path / "archive.sqlite3"
    worker = IndexWorker(spool, store_path, follow_interval=0.05)
    worker.start()
    try:
        await spool.append([entry_payload(1)])
        worker.notify()
        for _ in range(600):  # the worker was told of entry 1 and indexed it
            if await store_count(store_path) == 1:
                break
            await asyncio.sleep(0.05)
        assert await store_count(store_path) == 1
        spool.append_behind([entry_payload(2)], within=0.01)
        for _ in range(600):
            if await store_count(store_path) == 2:
                break
            await asyncio.sleep(0.05)
        assert await store_count(store_path) == 2
    finally:
        await worker.stop()
        await spool.close()


async def test_drain_waits_for_entries_written_behind(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool", clock=ManualClock())
    store_path = tmp_path / "archive.sqlite3"
    worker = IndexWorker(spool, store_path)
    worker.start()
    try:
        await spool.append([entry_payload(1)])
        spool.append_behind([entry_payload(2)], within=30.0)
        worker.notify()
        await asyncio.wait_for(worker.drain(), 60)
        assert await store_count(store_path) == 2
    finally:
        await worker.stop()
        await spool.close()


@pytest.mark.parametrize(
    "line",
    ["", "H", "H -1", "H 1 2", "D", "D x", "D x y", "Z 1", "H 99999999999999999999x", "\x00" * 50],
)
def test_worker_ignores_malformed_commands(line: str) -> None:
    sent: list[str] = []
    worker = _Worker(None, None, Path("."), 10, sent.append)  # type: ignore[arg-type]
    worker.command(line)
    assert worker.through == 0 and worker.drains == []


def test_worker_takes_well_formed_commands() -> None:
    worker = _Worker(None, None, Path("."), 10, [].append)  # type: ignore[arg-type]
    worker.command("H 5")
    worker.command("H 3")  # never backwards
    worker.command("D t1 9")
    assert worker.through == 9 and worker.drains == [("t1", 9)]
