"""Reading a spool from another process (`SpoolTail`) and entries written behind.

Real files, real fsyncs. The index worker follows the spool with `SpoolTail`; the proxy
queues observations with `append_behind`, which must become durable without a wait of their
own and survive a refused write.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from archive_api.store.chain import verify_links
from classifier.clock import ManualClock
from proxy.errors import SpoolCorrupt
from proxy.spool import FRAME_OVERHEAD, Spool, SpoolTail, iter_spool_segments


def payload(n: int, size: int = 100) -> bytes:
    return f"{n:08d}".encode().ljust(size, b".")


async def open_spool(path: Path, **kwargs: object) -> Spool:
    return await Spool.open(path, clock=ManualClock(), **kwargs)  # type: ignore[arg-type]


async def test_tail_follows_a_growing_spool_across_segments(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, segment_max_entries=7)
    tail = SpoolTail(tmp_path)
    try:
        for n in range(1, 26):
            await spool.append([payload(n)])
        links = tail.read(1, 10, through=25)
        assert [link.seq for link in links] == list(range(1, 11))
        # The next read continues where the last one stopped, into later segments.
        links += tail.read(11, 100, through=25)
        assert [link.seq for link in links] == list(range(1, 26))
        assert [link.payload for link in links] == [payload(n) for n in range(1, 26)]
        assert verify_links(links) is None
        # Never past what the writer said is durable.
        assert tail.read(26, 10, through=25) == []
        for n in range(26, 31):
            await spool.append([payload(n)])
        assert [link.seq for link in tail.read(26, 10, through=28)] == [26, 27, 28]
        # A fresh reader (a restarted worker) starts anywhere.
        assert [link.seq for link in SpoolTail(tmp_path).read(15, 3, through=30)] == [15, 16, 17]
    finally:
        await spool.close()


async def test_tail_refuses_bad_arguments_and_sealed_entries(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, segment_max_entries=5)
    try:
        for n in range(1, 13):
            await spool.append([payload(n)])
        await spool.commit_cursor(12)
        sealed = await spool.seal_indexed()
        assert sealed
        tail = SpoolTail(tmp_path)
        with pytest.raises(ValueError):
            tail.read(0, 5, through=12)
        with pytest.raises(ValueError):
            tail.read(1, 0, through=12)
        with pytest.raises(ValueError, match="sealed"):
            tail.read(1, 5, through=12)
        assert [link.seq for link in tail.read(11, 5, through=12)] == [11, 12]
    finally:
        await spool.close()


async def test_tail_detects_a_damaged_durable_entry(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    try:
        for n in range(1, 6):
            await spool.append([payload(n)])
    finally:
        await spool.close()
    (segment,) = sorted(tmp_path.glob("segment-*.log"))
    data = bytearray(segment.read_bytes())
    data[-10] ^= 0xFF  # inside the last frame's payload
    segment.write_bytes(bytes(data))
    tail = SpoolTail(tmp_path)
    assert [link.seq for link in tail.read(1, 4, through=4)] == [1, 2, 3, 4]
    with pytest.raises(SpoolCorrupt):
        SpoolTail(tmp_path).read(1, 10, through=5)


async def test_tail_says_when_durable_entries_are_missing(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    try:
        for n in range(1, 4):
            await spool.append([payload(n)])
    finally:
        await spool.close()
    with pytest.raises(SpoolCorrupt, match="missing"):
        SpoolTail(tmp_path).read(2, 10, through=9)


async def test_written_behind_entries_need_no_fsync_of_their_own(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    try:
        await spool.append([payload(1)])
        fsyncs = spool.stats.fsyncs
        for n in range(2, 12):
            spool.append_behind([payload(n)])
        # One durable append carries all ten behind it: a single fsync.
        await spool.append([payload(12)])
        assert spool.stats.fsyncs == fsyncs + 1
        assert spool.head()[0] == 12
        # Alone, they are written within the time given.
        spool.append_behind([payload(13)], within=0.01)
        for _ in range(100):
            if spool.head()[0] == 13:
                break
            await asyncio.sleep(0.01)
        assert spool.head()[0] == 13
    finally:
        await spool.close()
    assert [link.payload for link in iter_spool_segments(tmp_path)] == [
        payload(n) for n in range(1, 14)
    ]


async def spool_with_a_refused_write_behind(tmp_path: Path) -> Spool:
    """Entries 1-3 written, entry 4 written behind and refused (kept for a retry)."""
    size = 100
    # Room for three frames of unindexed backlog only.
    spool = await open_spool(tmp_path, max_spool_bytes=3 * (FRAME_OVERHEAD + size) + 60)
    for n in range(1, 4):
        await spool.append([payload(n)])
    spool.append_behind([payload(4)])
    await spool.flush()  # refused: the backlog is full; kept for a retry
    return spool


async def test_written_behind_entries_survive_a_refused_write(tmp_path: Path) -> None:
    spool = await spool_with_a_refused_write_behind(tmp_path)
    try:
        assert spool.head()[0] == 3
        # The indexer catches up and sealing frees room: the retry goes through.
        await spool.commit_cursor(3)
        spool._max_spool_bytes = None
        await spool.flush()
        assert spool.head()[0] == 4
    finally:
        await spool.close()
    assert [link.payload for link in iter_spool_segments(tmp_path)][-1] == payload(4)


async def test_a_flush_retries_what_a_retry_already_on_the_disk_fails_to_write(
    tmp_path: Path,
) -> None:
    # The retry timer's attempt is on the disk (and will be refused) when room returns and
    # the flush is called: that attempt began before the flush, so the flush tries again.
    spool = await spool_with_a_refused_write_behind(tmp_path)
    try:
        spool._wake_for_behind()  # the retry timer fires: the attempt goes to the disk
        # Block the loop (the attempt's outcome cannot be taken in) until the disk thread
        # is past the attempt: a job behind it sets the event.
        past_it = threading.Event()
        spool._disk.submit(asyncio.get_running_loop(), lambda _: past_it.set(), None, _ignore)
        assert past_it.wait(30)
        spool._max_spool_bytes = None  # room again, after that attempt was refused
        await spool.flush()
        assert spool.head()[0] == 4
    finally:
        await spool.close()


def _ignore(_result: object, _error: BaseException | None) -> None:
    return None


async def test_flush_returns_at_once_when_nothing_is_queued(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    try:
        await asyncio.wait_for(spool.flush(), 5)
        with pytest.raises(ValueError):
            spool.append_behind([b"x" * (17 * 1024 * 1024)])
    finally:
        await spool.close()


async def test_flush_waits_for_the_batch_the_writer_is_writing(tmp_path: Path) -> None:
    # The index drain flushes, then reads the head: entries the writer had already taken
    # from its queue but not yet written must count, or the drain stops short of them
    # (a MAM sighting written behind went missing from the archive this way).
    spool = await open_spool(tmp_path)
    disk_free = threading.Event()

    async def flush_then_head() -> int:
        await spool.flush()
        return spool.head()[0]

    try:
        await spool.append([payload(1)])
        # A slow disk: the writer's one thread is busy when it takes the entries below.
        busy = asyncio.ensure_future(spool._disk.run(disk_free.wait, 30))
        spool.append_behind([payload(2)], within=0)
        for _ in range(1000):
            if not spool._queue:
                break
            await asyncio.sleep(0.005)
        assert not spool._queue, "the writer did not take the entry written behind"
        flushed = asyncio.ensure_future(flush_then_head())
        await asyncio.sleep(0.05)
        disk_free.set()
        assert await asyncio.wait_for(flushed, 10) == 2
        assert await busy is True
    finally:
        disk_free.set()
        await spool.close()
