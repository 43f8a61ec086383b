"""The spool's disk thread: commits leave the event loop, and a hung disk holds only its callers.

A slow or hung `fsync` is stood in for by a job that blocks the spool's one disk thread (a
real thread, a real spool on real files): every commit queued behind it waits, while the
event loop goes on serving everything that does not need the disk.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from classifier.clock import ManualClock
from proxy.spool import Spool, _DiskThread


async def open_spool(path: Path) -> Spool:
    return await Spool.open(path, clock=ManualClock())


async def test_a_hung_disk_holds_its_commits_but_not_the_event_loop(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    disk_free = threading.Event()
    try:
        hung = asyncio.ensure_future(spool._disk.run(disk_free.wait, 30))
        waiting = asyncio.ensure_future(spool.append([b"archivable"]))
        # Meanwhile the loop keeps turning: a session forwarding non-archivable traffic
        # only needs the loop, and it gets it.
        turns = 0
        for _ in range(20):
            await asyncio.sleep(0.005)
            turns += 1
        assert turns == 20
        assert not waiting.done(), "a commit finished although the disk was hung"
        disk_free.set()
        links = await asyncio.wait_for(waiting, 10)
        assert [link.seq for link in links] == [1]
        assert await hung is True
    finally:
        disk_free.set()
        await spool.close()


async def test_jobs_run_in_order_and_errors_reach_the_caller() -> None:
    disk = _DiskThread("test-disk")
    seen: list[int] = []

    def fail() -> None:
        raise OSError(5, "I/O error")

    try:
        first = asyncio.ensure_future(disk.run(seen.append, 1))
        broken = asyncio.ensure_future(disk.run(fail))
        last = asyncio.ensure_future(disk.run(seen.append, 2))
        await first
        with pytest.raises(OSError, match="I/O error"):
            await broken
        await last
        assert seen == [1, 2]
    finally:
        disk.stop()


async def test_a_cancelled_caller_does_not_withdraw_its_job() -> None:
    # Like a commit the writer already took: its entries may be written; the outcome has
    # nobody to go to, and settling it must not fail in the loop.
    disk = _DiskThread("test-disk")
    gate = threading.Event()
    done = threading.Event()
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))

    def slow() -> str:
        gate.wait(10)
        done.set()
        return "written"

    try:
        caller = asyncio.ensure_future(disk.run(slow))
        await asyncio.sleep(0.01)
        caller.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert await disk.run(done.is_set) is True
        await asyncio.sleep(0.01)  # the settling callback has run by now
        assert loop_errors == []
    finally:
        gate.set()
        disk.stop()


async def test_a_stopped_disk_thread_refuses_new_jobs() -> None:
    disk = _DiskThread("test-disk")
    assert await disk.run(lambda: 7) == 7
    disk.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        await disk.run(lambda: 8)
