"""The durable spool, on real files with real fsyncs: no mocks.

The full-disk test mounts a 1 MiB tmpfs (needs root); the RLIMIT_FSIZE test makes writes fail
with EFBIG in a child process and runs anywhere. The crash test kills a child with SIGKILL
while it appends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from archive_api.store.chain import GENESIS, ChainLink, CheckpointSigner, verify_links
from archive_api.store.records import (
    ArchiveRecord,
    Direction,
    EntryOp,
    RecordKind,
    SpoolEntry,
)
from classifier.clock import ManualClock
from proxy.errors import SpoolCorrupt, SpoolUnavailable
from proxy.spool import (
    FRAME_OVERHEAD,
    SEGMENT_HEADER_SIZE,
    Spool,
    encode_frame,
    iter_evidence,
    iter_spool_segments,
    read_checkpoints,
    segment_name,
)

REPO = Path(__file__).resolve().parents[2]


def entry_payload(n: int) -> bytes:
    record = ArchiveRecord(
        record_id=f"rec-{n:06d}",
        kind=RecordKind.MESSAGE,
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        direction=Direction.FROM_CLIENT,
        sender="alice@corp.example",
        recipient="bob@partner.example",
        stanza_type="chat",
        body=f"message number {n}",
    )
    return SpoolEntry(EntryOp.RECORD, record.record_id, record=record).payload()


def fixed(n: int, size: int = 100) -> bytes:
    """A payload of exactly `size` bytes, so frame offsets are easy to compute."""
    return f"{n:08d}".encode().ljust(size, b".")


def frame_offset(index_in_segment: int, payload_size: int) -> int:
    return SEGMENT_HEADER_SIZE + index_in_segment * (FRAME_OVERHEAD + payload_size)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.log"))


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0xFF]))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def signer() -> CheckpointSigner:
    return CheckpointSigner.generate()


@pytest.fixture
async def spool(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Spool]:
    s = await Spool.open(tmp_path / "spool", clock=clock)
    try:
        yield s
    finally:
        await s.close()


async def read_all(spool: Spool, start: int = 1) -> list[ChainLink]:
    return await spool.read_from(start, 1_000_000)


# -- basics ------------------------------------------------------------------------------------


async def test_append_read_round_trip(spool: Spool) -> None:
    assert spool.head() == (0, GENESIS)
    assert await spool.read_from(1, 10) == []
    payloads = [entry_payload(n) for n in range(5)]

    first = await spool.append(payloads[:2])
    second = await spool.append(payloads[2:])

    assert [link.seq for link in first + second] == [1, 2, 3, 4, 5]
    assert spool.head() == (5, second[-1].hash)
    read = await read_all(spool)
    assert read == first + second
    assert [SpoolEntry.from_payload(link.payload) for link in read] == [
        SpoolEntry.from_payload(p) for p in payloads
    ]
    assert await spool.read_from(3, 2) == read[2:4]
    assert await spool.read_from(6, 10) == []
    assert await spool.append([]) == []


async def test_chain_verifies_across_segments(tmp_path: Path, clock: ManualClock) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock, segment_max_bytes=1024) as spool:
        for n in range(40):
            await spool.append([fixed(n)])
        await spool.append([fixed(n, 50) for n in range(40, 60)])
        links = await read_all(spool)
    assert len(segments(directory)) > 5
    assert [link.seq for link in links] == list(range(1, 61))
    assert verify_links(links) is None
    for path in segments(directory):
        assert path.stat().st_size <= 1024


async def test_an_entry_larger_than_a_segment_gets_its_own(
    tmp_path: Path, clock: ManualClock
) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock, segment_max_bytes=1024) as spool:
        await spool.append([fixed(1)])
        await spool.append([fixed(2, 4000)])
        await spool.append([fixed(3)])
        links = await read_all(spool)
    assert [len(link.payload) for link in links] == [100, 4000, 100]
    assert [p.name for p in segments(directory)] == [segment_name(n) for n in (1, 2, 3)]


async def test_group_commit_shares_fsyncs_and_keeps_order(spool: Spool) -> None:
    async def appender(i: int) -> list[ChainLink]:
        return await spool.append([f"{i}:{k}".encode() for k in range(1 + i % 3)])

    results = await asyncio.gather(*(appender(i) for i in range(200)))

    seqs = [link.seq for links in results for link in links]
    assert sorted(seqs) == list(range(1, len(seqs) + 1))
    for i, links in enumerate(results):
        # One append's entries are consecutive and in the order given.
        assert [link.seq for link in links] == list(range(links[0].seq, links[0].seq + len(links)))
        assert [link.payload for link in links] == [f"{i}:{k}".encode() for k in range(len(links))]
    read = await read_all(spool)
    assert verify_links(read) is None
    by_seq = {link.seq: link for links in results for link in links}
    assert read == [by_seq[seq] for seq in range(1, len(seqs) + 1)]
    stats = spool.stats
    assert stats.appends == 200
    assert stats.entries == len(seqs)
    assert stats.batches < 20  # 200 appends shared a handful of fsyncs
    assert stats.fsyncs == stats.batches


async def test_append_after_close_is_refused(tmp_path: Path, clock: ManualClock) -> None:
    spool = await Spool.open(tmp_path / "spool", clock=clock)
    await spool.append([b"a"])
    await spool.close()
    with pytest.raises(SpoolUnavailable):
        await spool.append([b"b"])


# -- recovery ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", ["half-frame", "garbage", "zeros", "header-only"])
async def test_torn_tail_is_truncated_on_reopen(
    tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture, tail: str
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.spool")
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock) as spool:
        links = await spool.append([fixed(n) for n in range(10)])
    path = segments(directory)[-1]
    durable_size = path.stat().st_size
    frame = encode_frame(11, links[-1].hash, b"\x01" * 32, fixed(11))
    torn = {
        "half-frame": frame[: len(frame) // 2],
        "garbage": os.urandom(300).replace(b"\xb7", b"\xb6"),
        "zeros": bytes(4096),  # what some filesystems show after a crash mid-extend
        "header-only": frame[:10],
    }[tail]
    with path.open("ab") as f:
        f.write(torn)

    async with await Spool.open(directory, clock=clock) as spool:
        assert path.stat().st_size == durable_size
        assert spool.head() == (10, links[-1].hash)
        new = await spool.append([fixed(11)])
        assert new[0].seq == 11
        read = await read_all(spool)
    assert verify_links(read) is None
    assert read[:10] == links
    if tail == "zeros":
        # Zeros are the room the writer makes ahead of its data, or a crash mid-extend:
        # dropped without calling them torn.
        assert "dropping 4096 bytes of room" in caplog.text
        assert "torn tail" not in caplog.text
    else:
        assert "torn tail" in caplog.text


async def test_torn_header_of_a_new_segment_is_removed(tmp_path: Path, clock: ManualClock) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock) as spool:
        links = await spool.append([fixed(n) for n in range(3)])
    (directory / segment_name(4)).write_bytes(b"SGSPOOL1\x00\x00")
    async with await Spool.open(directory, clock=clock) as spool:
        assert spool.head() == (3, links[-1].hash)
        await spool.append([fixed(4)])
        assert verify_links(await read_all(spool)) is None


@pytest.mark.parametrize("where", ["payload", "length"])
async def test_corrupt_middle_frame_is_an_error(
    tmp_path: Path, clock: ManualClock, where: str
) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock) as spool:
        await spool.append([fixed(n) for n in range(10)])
    offset = frame_offset(2, 100) + (FRAME_OVERHEAD + 50 if where == "payload" else 3)
    flip_byte(segments(directory)[-1], offset)
    with pytest.raises(SpoolCorrupt, match="valid entries follow"):
        await Spool.open(directory, clock=clock)


async def test_corrupt_frame_in_an_older_segment_fails_reads_and_sealing(
    tmp_path: Path, clock: ManualClock
) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock, segment_max_entries=5) as spool:
        for n in range(12):
            await spool.append([fixed(n)])
    flip_byte(segments(directory)[0], frame_offset(3, 100) + FRAME_OVERHEAD + 1)
    async with await Spool.open(directory, clock=clock, segment_max_entries=5) as spool:
        with pytest.raises(SpoolCorrupt, match="checksum"):
            await spool.read_from(1, 100)
        assert len(await spool.read_from(6, 100)) == 7  # the damage is contained
        await spool.commit_cursor(12)
        with pytest.raises(SpoolCorrupt):
            await spool.seal_indexed()
    assert len(segments(directory)) == 3


async def test_a_damaged_last_entry_covered_by_a_checkpoint_is_an_error(
    tmp_path: Path, clock: ManualClock, signer: CheckpointSigner
) -> None:
    # A damaged last frame looks like a torn tail; the checkpoint proves it was durable.
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock, signer=signer, checkpoint_every=10) as s:
        for n in range(10):
            await s.append([fixed(n)])
    flip_byte(segments(directory)[-1], frame_offset(9, 100) + FRAME_OVERHEAD + 1)
    with pytest.raises(SpoolCorrupt, match="checkpoint covers seq 10"):
        await Spool.open(directory, clock=clock, signer=signer)


async def test_a_missing_segment_is_an_error(tmp_path: Path, clock: ManualClock) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock, segment_max_entries=2) as spool:
        for n in range(6):
            await spool.append([fixed(n)])
    segments(directory)[0].unlink()
    with pytest.raises(SpoolCorrupt, match="entries are missing"):
        await Spool.open(directory, clock=clock)


# -- room ahead of the data ----------------------------------------------------------------------


def data_end(directory: Path) -> int:
    """Where the frames of a one-segment spool end (read as a reader beside the writer would)."""
    assert len(segments(directory)) == 1
    links = list(iter_spool_segments(directory))
    return SEGMENT_HEADER_SIZE + sum(FRAME_OVERHEAD + len(link.payload) for link in links)


async def test_the_active_segment_has_room_and_a_closed_spool_none(
    tmp_path: Path, clock: ManualClock
) -> None:
    directory = tmp_path / "spool"
    spool = await Spool.open(directory, clock=clock)
    await spool.append([fixed(n) for n in range(10)])
    await spool.append([fixed(10)])
    path = segments(directory)[-1]
    end = frame_offset(11, 100)
    assert data_end(directory) == end
    # The file was extended once, ahead of the data: appends no longer change its size.
    assert path.stat().st_size >= end + 1024 * 1024
    assert path.read_bytes()[end:].count(0) == path.stat().st_size - end
    assert path.stat().st_blocks * 512 < 1024 * 1024  # a hole, not written zeros
    await spool.close()
    assert path.stat().st_size == end


ROOM_CRASH_CHILD = """
    import asyncio, os, sys
    from classifier.clock import ManualClock
    from proxy.spool import Spool

    async def main(directory):
        spool = await Spool.open(directory, clock=ManualClock())
        for n in range(50):
            await spool.append([b"entry %d" % n])
        os._exit(0)  # no close: the room stays, as after a crash

    asyncio.run(main(sys.argv[1]))
"""


async def test_room_left_by_a_crash_is_dropped_quietly_on_reopen(
    tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    child = run_child(ROOM_CRASH_CHILD, str(directory), stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    path = segments(directory)[-1]
    end = data_end(directory)
    assert path.stat().st_size > end  # the crash left the room behind
    caplog.set_level(logging.INFO, logger="proxy.spool")
    async with await Spool.open(directory, clock=clock) as spool:
        assert path.stat().st_size == end
        assert spool.head()[0] == 50
        assert (await spool.append([b"after"]))[0].seq == 51
        read = await read_all(spool)
    assert verify_links(read) is None
    assert [link.payload for link in read[:50]] == [b"entry %d" % n for n in range(50)]
    assert "of room" in caplog.text
    assert "torn tail" not in caplog.text


async def test_a_torn_frame_inside_the_room_is_still_a_torn_tail(
    tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock) as spool:
        links = await spool.append([fixed(n) for n in range(3)])
    path = segments(directory)[-1]
    end = path.stat().st_size
    frame = encode_frame(4, links[-1].hash, b"\x01" * 32, fixed(4))
    with path.open("r+b") as f:  # half a frame, then the rest of the room: zeros
        f.truncate(end + 65536)
        f.seek(end)
        f.write(frame[: len(frame) // 2])
    async with await Spool.open(directory, clock=clock) as spool:
        assert path.stat().st_size == end
        assert spool.head() == (3, links[-1].hash)
    assert "torn tail" in caplog.text


async def test_a_closed_segment_ends_with_its_last_frame(
    tmp_path: Path, clock: ManualClock
) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock, segment_max_bytes=4096) as spool:
        for n in range(150):
            await spool.append([fixed(n)])
            closed = segments(directory)[:-1]
            for path in closed:  # at every moment, not only after close
                assert path.read_bytes()[-1:] == b"."  # the padding of the last payload
        assert len(segments(directory)) > 5
        # Sealing reads each closed segment to its end and would refuse trailing room.
        await spool.commit_cursor(spool.head()[0])
        sealed = await spool.seal_indexed()
        assert len(sealed) > 5 and len(segments(directory)) == 1


# -- checkpoints and cursor --------------------------------------------------------------------


async def test_checkpoints_are_signed_and_stored(
    tmp_path: Path, clock: ManualClock, signer: CheckpointSigner
) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock, signer=signer, checkpoint_every=5) as s:
        for n in range(7):
            await s.append([fixed(n)])
        await s.append([fixed(n) for n in range(7, 12)])
        manual = await s.checkpoint()
        links = await read_all(s)
    stored = read_checkpoints(directory)
    assert [c.seq for c in stored] == [5, 10, 12]
    assert stored[-1] == manual
    for checkpoint in stored:
        assert checkpoint.verify(signer.public_key)
        assert checkpoint.head == links[checkpoint.seq - 1].hash
    text = (directory / "checkpoints.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["at"] == clock.now().isoformat()
    assert [line["reason"] for line in lines] == ["periodic", "periodic", "manual"]


async def test_torn_checkpoint_line_is_dropped(
    tmp_path: Path, clock: ManualClock, signer: CheckpointSigner
) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock, signer=signer, checkpoint_every=2) as s:
        await s.append([b"a", b"b"])
    with (directory / "checkpoints.jsonl").open("ab") as f:
        f.write(b'{"chain":"spool","se')
    async with await Spool.open(directory, clock=clock, signer=signer, checkpoint_every=2) as s:
        await s.append([b"c", b"d"])
    assert [c.seq for c in read_checkpoints(directory)] == [2, 4]


async def test_cursor_persists_atomically(tmp_path: Path, clock: ManualClock) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock) as spool:
        assert spool.cursor() == 0
        await spool.append([fixed(n) for n in range(8)])
        await spool.commit_cursor(3)
        await spool.commit_cursor(5)
        await spool.commit_cursor(5)
        with pytest.raises(ValueError, match="back"):
            await spool.commit_cursor(4)
        with pytest.raises(ValueError, match="past the spool head"):
            await spool.commit_cursor(9)
    assert json.loads((directory / "cursor.json").read_text()) == {"seq": 5}
    assert not list(directory.glob("*.tmp"))
    async with await Spool.open(directory, clock=clock) as spool:
        assert spool.cursor() == 5


# -- sealing -----------------------------------------------------------------------------------


async def _fill(spool: Spool, count: int) -> list[ChainLink]:
    links = []
    for n in range(count):
        links += await spool.append([entry_payload(n)])
    return links


async def test_sealing_moves_indexed_segments_to_evidence(
    tmp_path: Path, clock: ManualClock, signer: CheckpointSigner
) -> None:
    directory, evidence = tmp_path / "spool", tmp_path / "evidence"
    options: dict[str, Any] = {
        "clock": clock,
        "signer": signer,
        "segment_max_entries": 4,
        "keep_evidence": True,
        "evidence_dir": evidence,
    }
    async with await Spool.open(directory, **options) as spool:
        links = await _fill(spool, 10)  # segments 1-4, 5-8, 9-10
        assert await spool.seal_indexed() == []  # nothing indexed yet

        await spool.commit_cursor(6)
        first = await spool.seal_indexed()
        assert [(s.first_seq, s.last_seq) for s in first] == [(1, 4)]
        await spool.commit_cursor(10)
        second = await spool.seal_indexed()
        assert [(s.first_seq, s.last_seq) for s in second] == [(5, 8)]  # 9-10 is still active

        assert [p.name for p in segments(directory)] == [segment_name(9)]
        assert spool.sealed_through() == (8, links[7].hash)
        with pytest.raises(ValueError, match="sealed"):
            await spool.read_from(8, 10)
        remaining = await spool.read_from(9, 10)

    assert sorted(p.name for p in evidence.iterdir()) == [
        segment_name(1),
        segment_name(1) + ".seal.json",
        segment_name(5),
        segment_name(5) + ".seal.json",
    ]
    seal = json.loads((evidence / (segment_name(5) + ".seal.json")).read_text())
    assert (seal["first_seq"], seal["last_seq"], seal["last_hash"]) == (5, 8, links[7].hash.hex())
    assert first[0].signature is not None
    seal_checkpoints = [c for c in read_checkpoints(directory) if c.seq in (4, 8)]
    assert [c.signature.hex() for c in seal_checkpoints] == [
        first[0].signature.hex(),
        seal["signature"],
    ]

    from_evidence = list(iter_evidence(evidence, public_key=signer.public_key))
    assert from_evidence == links[:8]
    assert verify_links(from_evidence + remaining) is None

    other_key = CheckpointSigner.generate().public_key
    with pytest.raises(SpoolCorrupt, match="signature"):
        list(iter_evidence(evidence, public_key=other_key))


async def test_tampered_or_missing_evidence_is_detected(
    tmp_path: Path, clock: ManualClock, signer: CheckpointSigner
) -> None:
    directory, evidence = tmp_path / "spool", tmp_path / "evidence"
    async with await Spool.open(
        directory,
        clock=clock,
        signer=signer,
        segment_max_entries=2,
        keep_evidence=True,
        evidence_dir=evidence,
    ) as spool:
        await _fill(spool, 7)
        await spool.commit_cursor(7)
        assert len(await spool.seal_indexed()) == 3

    pristine = tmp_path / "pristine"
    shutil.copytree(evidence, pristine)
    flip_byte(evidence / segment_name(3), 200)
    with pytest.raises(SpoolCorrupt, match="sha256"):
        list(iter_evidence(evidence, public_key=signer.public_key))

    shutil.rmtree(evidence)
    shutil.copytree(pristine, evidence)
    (evidence / segment_name(3)).unlink()
    (evidence / (segment_name(3) + ".seal.json")).unlink()
    with pytest.raises(SpoolCorrupt, match="a segment is missing"):
        list(iter_evidence(evidence, public_key=signer.public_key))


async def test_sealing_without_evidence_deletes_and_frees_space(
    tmp_path: Path, clock: ManualClock
) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(directory, clock=clock, segment_max_entries=3) as spool:
        await _fill(spool, 10)
        before = spool.spool_bytes
        await spool.commit_cursor(10)
        seals = await spool.seal_indexed()
        assert [(s.first_seq, s.last_seq, s.signature) for s in seals] == [
            (1, 3, None),
            (4, 6, None),
            (7, 9, None),
        ]
        assert [p.name for p in segments(directory)] == [segment_name(10)]
        assert spool.spool_bytes == segments(directory)[0].stat().st_size < before


async def test_reopen_continues_the_chain_after_sealing(
    tmp_path: Path, clock: ManualClock, signer: CheckpointSigner
) -> None:
    directory, evidence = tmp_path / "spool", tmp_path / "evidence"
    options: dict[str, Any] = {
        "clock": clock,
        "signer": signer,
        "segment_max_entries": 4,
        "keep_evidence": True,
        "evidence_dir": evidence,
    }
    async with await Spool.open(directory, **options) as spool:
        links = await _fill(spool, 8)
        await spool.append([fixed(9)])  # rolls: segment 9 is active, 1-8 can be sealed
        await spool.commit_cursor(9)
        assert len(await spool.seal_indexed()) == 2
        head = spool.head()

    async with await Spool.open(directory, **options) as spool:
        assert spool.head() == head
        assert spool.sealed_through() == (8, links[-1].hash)
        assert spool.cursor() == 9
        more = await spool.append([fixed(10)])
        assert more[0].seq == 10
        assert more[0].prev_hash == head[1]
        in_spool = await spool.read_from(9, 10)
    assert verify_links(list(iter_evidence(evidence)) + in_spool) is None


async def test_recovery_finishes_an_interrupted_seal(tmp_path: Path, clock: ManualClock) -> None:
    # sealed.json was written but the crash came before the segment was unlinked.
    directory, evidence = tmp_path / "spool", tmp_path / "evidence"
    options: dict[str, Any] = {
        "clock": clock,
        "segment_max_entries": 4,
        "keep_evidence": True,
        "evidence_dir": evidence,
    }
    async with await Spool.open(directory, **options) as spool:
        await _fill(spool, 6)
        await spool.commit_cursor(6)
        await spool.seal_indexed()
    shutil.copy(evidence / segment_name(1), directory / segment_name(1))
    async with await Spool.open(directory, **options) as spool:
        assert [p.name for p in segments(directory)] == [segment_name(5)]
        await spool.append([fixed(7)])
        assert verify_links(list(iter_evidence(evidence)) + await spool.read_from(5, 10)) is None


# -- failing closed ----------------------------------------------------------------------------


async def test_backlog_over_max_spool_bytes_fails_closed_until_sealed(
    tmp_path: Path, clock: ManualClock
) -> None:
    directory = tmp_path / "spool"
    async with await Spool.open(
        directory, clock=clock, segment_max_bytes=2048, max_spool_bytes=8192
    ) as spool:
        acked: list[ChainLink] = []
        with pytest.raises(SpoolUnavailable, match="max_spool_bytes"):
            while True:
                acked += await spool.append([fixed(len(acked), 400)])
        head = spool.head()
        assert head == (acked[-1].seq, acked[-1].hash)
        assert spool.spool_bytes <= 8192
        with pytest.raises(SpoolUnavailable):
            await spool.append([fixed(0, 400)])

        await spool.commit_cursor(head[0])
        await spool.seal_indexed()
        more = await spool.append([fixed(0, 400)])
        assert more[0].seq == head[0] + 1
        assert more[0].prev_hash == head[1]


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE test still covers failures)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_full_filesystem_fails_closed_and_recovers(
    tmp_path: Path, clock: ManualClock, signer: CheckpointSigner
) -> None:
    with tiny_tmpfs(tmp_path / "fs", "1m") as fs:
        filler = fs / "filler"
        filler.write_bytes(b"\0" * 256 * 1024)
        directory = fs / "spool"
        options: dict[str, Any] = {
            "clock": clock,
            "signer": signer,
            "checkpoint_every": 25,
            "segment_max_bytes": 96 * 1024,
        }
        spool = await Spool.open(directory, **options)
        acked: list[ChainLink] = []
        with pytest.raises(SpoolUnavailable, match="No space left") as refused:
            while True:
                acked += await spool.append([fixed(len(acked), 3000), fixed(0, 1000)])
        assert isinstance(refused.value.__cause__, OSError)
        assert refused.value.__cause__.errno == errno.ENOSPC
        assert len(acked) > 100
        head = spool.head()
        assert head == (acked[-1].seq, acked[-1].hash)
        # Nothing of the refused batch is left on disk: files end at the durable entries.
        assert sum(p.stat().st_size for p in segments(directory)) == spool.spool_bytes
        assert await read_all(spool) == acked
        with pytest.raises(SpoolUnavailable):
            await spool.append([fixed(0, 3000)] * 4)  # still full: still refused

        filler.unlink()
        more = await spool.append([fixed(1, 3000)])
        assert more[0].seq == head[0] + 1
        assert more[0].prev_hash == head[1]
        await spool.close()

        async with await Spool.open(directory, **options) as reopened:
            assert reopened.head() == (more[0].seq, more[0].hash)
            read = await read_all(reopened)
        assert read == acked + more
        assert verify_links(read) is None
        for checkpoint in read_checkpoints(directory):
            assert checkpoint.verify(signer.public_key)
            assert checkpoint.head == read[checkpoint.seq - 1].hash


async def test_removed_directory_fails_closed(tmp_path: Path, clock: ManualClock) -> None:
    directory = tmp_path / "spool"
    spool = await Spool.open(directory, clock=clock)
    await spool.append([b"before"])
    shutil.rmtree(directory)
    with pytest.raises(SpoolUnavailable, match="removed"):
        await spool.append([b"lost"])
    # The durable entries went with the directory: stay closed rather than start a file with
    # a hole before it.
    with pytest.raises(SpoolUnavailable, match="No such file"):
        await spool.append([b"still lost"])
    assert spool.head()[0] == 1
    await spool.close()


def run_child(script: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        cwd=REPO,
        text=True,
        **kwargs,
    )


FSIZE_CHILD = """
    import asyncio, json, resource, signal, sys
    from classifier.clock import ManualClock
    from proxy.errors import SpoolUnavailable
    from proxy.spool import Spool

    async def main(directory):
        # Past the limit, write() fails with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        spool = await Spool.open(directory, clock=ManualClock(), segment_max_bytes=1 << 20)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
        acked, error, errno_ = 0, None, None
        while True:
            try:
                acked = (await spool.append([b"x" * 900, b"y" * 900]))[-1].seq
            except SpoolUnavailable as exc:
                error, errno_ = str(exc), exc.__cause__.errno
                break
        head_after_failure = spool.head()[0]
        try:
            await spool.append([b"x" * 900, b"y" * 900])
            retry = "written"
        except SpoolUnavailable:
            retry = "refused"
        size_after_failure = spool.spool_bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        recovered = (await spool.append([b"w"]))[0].seq
        await spool.close()
        print(json.dumps({"acked": acked, "error": error, "errno": errno_,
                          "head_after_failure": head_after_failure, "retry": retry,
                          "size_after_failure": size_after_failure, "recovered": recovered}))

    asyncio.run(main(sys.argv[1]))
"""


async def test_write_failure_fails_closed_and_recovers_rlimit(
    tmp_path: Path, clock: ManualClock
) -> None:
    directory = tmp_path / "spool"
    child = run_child(FSIZE_CHILD, str(directory), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    result = json.loads(out)
    assert result["errno"] == errno.EFBIG
    assert result["acked"] >= 10
    assert result["head_after_failure"] == result["acked"]
    assert result["retry"] == "refused"
    assert result["size_after_failure"] <= 20_000
    assert result["recovered"] == result["acked"] + 1
    async with await Spool.open(directory, clock=clock) as spool:
        links = await read_all(spool)
    assert [link.seq for link in links] == list(range(1, result["acked"] + 2))
    assert verify_links(links) is None


CRASH_CHILD = """
    import asyncio, sys
    from classifier.clock import ManualClock
    from proxy.spool import Spool

    async def appender(spool, n):
        i = 0
        while True:
            links = await spool.append([f"{n}:{i}".encode() * 20, f"{n}:{i}+".encode()])
            # Printed only once append() returned: these entries were acknowledged.
            print(links[0].seq, links[1].seq, flush=True)
            i += 1

    async def main(directory):
        spool = await Spool.open(directory, clock=ManualClock(), segment_max_bytes=32 * 1024)
        await asyncio.gather(*(appender(spool, n) for n in range(16)))

    asyncio.run(main(sys.argv[1]))
"""


def test_kill_9_loses_no_acknowledged_entry(tmp_path: Path, clock: ManualClock) -> None:
    directory = tmp_path / "spool"
    child = run_child(CRASH_CHILD, str(directory), stdout=subprocess.PIPE)
    assert child.stdout is not None
    acked: set[int] = set()
    try:
        while len(acked) < 3000:
            line = child.stdout.readline()
            if not line:
                break
            acked.update(int(seq) for seq in line.split())
        child.send_signal(signal.SIGKILL)
        # Lines already in the pipe were printed after their appends returned: count them.
        rest = child.stdout.read()
        acked.update(int(seq) for seq in rest.split())
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert len(acked) >= 3000

    async def reopen() -> list[ChainLink]:
        async with await Spool.open(directory, clock=clock) as spool:
            links = await read_all(spool)
            assert spool.head()[0] == len(links)
            await spool.append([b"after the crash"])
            return await read_all(spool)

    links = asyncio.run(reopen())
    assert verify_links(links) is None
    assert acked <= {link.seq for link in links}
    assert len(segments(directory)) > 3
