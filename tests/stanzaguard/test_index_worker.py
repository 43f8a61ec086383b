"""The index worker process: it follows the spool, survives being killed, stops cleanly.

Real spool files, a real SQLite store, a real child process (`python -m
stanzaguard.index_worker`).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
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


async def test_entries_gather_for_the_interval_and_go_to_the_store_in_one_commit(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path / "spool", clock=ManualClock())
    store_path = tmp_path / "archive.sqlite3"
    # The follow loop would tell the worker of the head on its own: out of the way here. The
    # interval outlasts a round's fsync'd appends even on a loaded machine.
    worker = IndexWorker(spool, store_path, notify_interval=2.0, follow_interval=3600)
    worker.start()
    try:
        # A child that comes up is told of the head at once: let it be up before round 1.
        await asyncio.wait_for(worker.drain(), 60)
        for round_, count in enumerate((20, 5), start=1):
            first = spool.head()[0] + 1
            for n in range(first, first + count):
                await spool.append([entry_payload(n)])
                worker.notify()  # one per stanza, as the pipeline does
            await wait_for(lambda: worker.indexed == spool.head()[0], "indexed")
            assert worker.batches == round_
        assert await store_count(store_path) == 25
    finally:
        await worker.stop()
        await spool.close()


async def test_drain_does_not_wait_for_the_interval(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool", clock=ManualClock())
    store_path = tmp_path / "archive.sqlite3"
    worker = IndexWorker(spool, store_path, notify_interval=3600, follow_interval=3600)
    worker.start()
    try:
        await spool.append([entry_payload(1)])
        worker.notify()
        await asyncio.wait_for(worker.drain(), 60)
        assert await store_count(store_path) == 1
    finally:
        await worker.stop()
        await spool.close()


@pytest.mark.parametrize(
    "line",
    [
        "",
        "H",
        "H -1",
        "H 1 2",
        "D",
        "D x",
        "D x y",
        "Z 1",
        "H 99999999999999999999x",
        "\x00" * 50,
        "Q 1",
        "QQ",
    ],
)
def test_worker_ignores_malformed_commands(line: str) -> None:
    sent: list[str] = []
    worker = _Worker(None, None, Path("."), 10, sent.append)  # type: ignore[arg-type]
    worker.command(line)
    assert worker.through == 0 and worker.drains == [] and not worker.quitting


def test_worker_takes_well_formed_commands() -> None:
    worker = _Worker(None, None, Path("."), 10, [].append)  # type: ignore[arg-type]
    worker.command("H 5")
    worker.command("H 3")  # never backwards
    worker.command("D t1 9")
    assert worker.through == 9 and worker.drains == [("t1", 9)]


# -- CPU priority: idle by default in the service, boosted to low while far behind ----------


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)  # the low successor runs only until it has caught up


def child_policy(worker: IndexWorker) -> tuple[int, int] | None:
    """(scheduling policy, nice) of the running child, None while there is none."""
    proc = worker._proc
    if proc is None or proc.returncode is not None:
        return None
    try:
        return os.sched_getscheduler(proc.pid), os.getpriority(os.PRIO_PROCESS, proc.pid)
    except ProcessLookupError:
        return None


async def test_an_idle_worker_runs_under_sched_idle_and_indexes(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool", clock=ManualClock())
    store_path = tmp_path / "archive.sqlite3"
    worker = IndexWorker(spool, store_path, priority="idle", notify_interval=0.001)
    worker.start()
    try:
        await wait_for(lambda: child_policy(worker) is not None, "the child runs")
        await wait_for(
            lambda: (child_policy(worker) or (None,))[0] == os.SCHED_IDLE, "it is SCHED_IDLE"
        )
        for n in range(1, 31):
            await spool.append([entry_payload(n)])
            worker.notify()
        await asyncio.wait_for(worker.drain(), 60)
        assert await store_count(store_path) == 30
        assert worker.boosted is False and worker.priority_changes == 0
    finally:
        await worker.stop()
        await spool.close()


async def test_a_far_behind_idle_worker_is_replaced_by_a_low_one_and_back(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path / "spool", clock=ManualClock())
    store_path = tmp_path / "archive.sqlite3"
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    worker = IndexWorker(spool, store_path, priority="idle", boost_backlog=5, follow_interval=0.05)
    worker.start()
    try:
        await wait_for(lambda: worker._ready.is_set(), "the first child is ready")
        first = worker._proc
        # Spooled without notify(): only the follow loop tells the worker, and looks at the
        # backlog in the same breath, before the worker can have caught up.
        for n in range(1, 51):
            await spool.append([entry_payload(n)])
        await wait_for(lambda: worker.priority_changes >= 1, "the worker was boosted")
        await wait_for(
            lambda: (
                worker._proc is not first
                and child_policy(worker) == (os.SCHED_OTHER, min(own_nice + 5, 19))
            ),
            "a low-priority successor runs",
        )
        assert first is not None and first.returncode == 0  # it quit when asked
        await wait_for(lambda: worker.priority_changes >= 2, "the worker went back to idle")
        await wait_for(
            lambda: (child_policy(worker) or (None,))[0] == os.SCHED_IDLE, "an idle child runs"
        )
        await asyncio.wait_for(worker.drain(), 60)
        assert await store_count(store_path) == 50
        assert spool.cursor() == 50
        assert worker.boosted is False
        # Planned replacements are neither failures nor restarts.
        assert worker.failures == 0 and worker.restarts == 0
    finally:
        await worker.stop()
        await spool.close()


def test_the_worker_refuses_an_unknown_priority(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="priority"):
        IndexWorker(None, tmp_path / "a.sqlite3", priority="realtime")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="boost_backlog"):
        IndexWorker(None, tmp_path / "a.sqlite3", boost_backlog=0)  # type: ignore[arg-type]


def test_q_asks_the_worker_to_quit_after_its_batch() -> None:
    worker = _Worker(None, None, Path("."), 10, [].append)  # type: ignore[arg-type]
    worker.command("Q")
    assert worker.quitting and worker.wake.is_set()
    assert worker.through == 0 and worker.drains == []
