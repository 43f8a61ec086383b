"""The durable append-only spool: every record is here, fsync'd, before its stanza moves on.

A spool directory holds:

    segment-<first seq, 20 digits>.log   hash-chained entries; only the newest segment grows
    checkpoints.jsonl                    signed chain heads, one JSON object a line
    cursor.json                          the indexer's cursor: every seq <= it is indexed
    sealed.json                          the newest entry sealed out of the spool (seq, hash)
    chain.json                           the name of the hash chain the entries belong to

Segment file (integers big-endian):

    header  b"SGSPOOL1" | first seq u64 | hash before the first entry (32) | crc32 u32
    frame   magic 0xB7 u8 | version 1 u8 | length u32 | crc32 u32 | body (length bytes)
    body    seq u64 | prev hash (32) | hash (32) | payload

The header's crc32 covers the 48 bytes before it; a frame's crc32 (zlib, IEEE) covers magic,
version, length and body. hash = link_hash(prev hash, seq, payload) as in
`archive_api.store.chain`, and the payload is `SpoolEntry.payload()`.

Because every segment names the hash its first entry follows, a segment is verifiable on its
own, and the chain continues after older segments were sealed away.

Writes go through one dedicated thread, so the event loop never waits on the disk: an append
to an idle spool is handed over at once; appends made while a commit is on the disk wait in a
queue and go together as the next commit, written and fsynced once (group commit). The
commit's outcome comes back to the loop as one callback that settles every caller in it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import re
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive_api.store.chain import GENESIS, ChainLink, Checkpoint, CheckpointSigner, link_hash
from archive_api.store.records import canonical_json
from classifier.clock import Clock
from proxy.errors import SpoolCorrupt, SpoolUnavailable

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

MiB = 1024 * 1024

SEGMENT_MAGIC = b"SGSPOOL1"
_SEGMENT_HEAD = struct.Struct(">8sQ32s")
SEGMENT_HEADER_SIZE = _SEGMENT_HEAD.size + 4

FRAME_MAGIC = 0xB7
FRAME_VERSION = 1
_FRAME_HEAD = struct.Struct(">BBII")
_FRAME_PREFIX = struct.Struct(">BBI")  # the part of the frame head the crc covers
_BODY_HEAD = struct.Struct(">Q32s32s")
FRAME_OVERHEAD = _FRAME_HEAD.size + _BODY_HEAD.size
_FRAME_MARK = bytes([FRAME_MAGIC, FRAME_VERSION])

# A stanza is capped far below this by the stream limits; the cap only bounds what a corrupt
# length field can make a reader allocate.
MAX_PAYLOAD_BYTES = 16 * MiB

# One group commit takes at most this much, so one huge burst does not delay its own first
# callers behind a write of unbounded size.
_MAX_BATCH_ENTRIES = 4096
_BEHIND_RETRY = 1.0  # seconds before entries written behind are tried again after a failure
_MAX_BATCH_BYTES = 8 * MiB
# The segment being appended to is extended ahead of its data, in steps of this size, with a
# hole (ftruncate): an append then does not change the file's size, and its fsync costs about
# a third less CPU and wall time on ext4 (docs/benchmarks.md, "Room ahead of the data"). The
# room is cut off when the segment closes; recovery drops room left by a crash.
_ROOM_STEP = 4 * MiB

_SEGMENT_NAME = re.compile(r"^segment-(\d{20})\.log$")
_CHECKPOINTS = "checkpoints.jsonl"
_CURSOR = "cursor.json"
_SEALED = "sealed.json"
_CHAIN = "chain.json"
#: The chain of a spool directory made before chain names were recorded (the only name then).
LEGACY_CHAIN_NAME = "spool"
_MAX_CHAIN_NAME = 128  # what the stores accept
_SEAL_SUFFIX = ".seal.json"

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def segment_name(first_seq: int) -> str:
    return f"segment-{first_seq:020d}.log"


def encode_frame(seq: int, prev_hash: bytes, hash_: bytes, payload: bytes) -> bytes:
    body = _BODY_HEAD.pack(seq, prev_hash, hash_) + payload
    prefix = _FRAME_PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, len(body))
    crc = zlib.crc32(body, zlib.crc32(prefix))
    return prefix + crc.to_bytes(4, "big") + body


def _encode_segment_header(first_seq: int, prev_hash: bytes) -> bytes:
    head = _SEGMENT_HEAD.pack(SEGMENT_MAGIC, first_seq, prev_hash)
    return head + zlib.crc32(head).to_bytes(4, "big")


def _decode_segment_header(data: bytes) -> tuple[int, bytes] | None:
    if len(data) < SEGMENT_HEADER_SIZE:
        return None
    head = data[: _SEGMENT_HEAD.size]
    crc = int.from_bytes(data[_SEGMENT_HEAD.size : SEGMENT_HEADER_SIZE], "big")
    magic, first_seq, prev_hash = _SEGMENT_HEAD.unpack(head)
    if magic != SEGMENT_MAGIC or zlib.crc32(head) != crc:
        return None
    return first_seq, prev_hash


class _DiskThread:
    """The one thread that does the spool's writes, in the order they were handed over.

    Why not `loop.run_in_executor` on a one-thread `ThreadPoolExecutor`: at a paced rate
    almost every group commit carries one stanza, so the handoff is paid per stanza, and the
    executor's costs twice the CPU of this one (a concurrent future wrapped in an asyncio
    future, an idle-semaphore check on every submit, callbacks on both sides): 98-124 vs
    51-67 µs CPU per round trip on the loaded 2-vCPU benchmark VM (docs/benchmarks.md). A job
    goes through a `SimpleQueue` and its outcome wakes the loop once, through
    `call_soon_threadsafe`. The loop still never waits on the disk: a hung `fsync` blocks
    only this thread and the callers waiting for that commit.

    The thread is a daemon: at interpreter exit a write nobody was told is durable may be
    abandoned, which breaks no promise (nothing is forwarded before its commit returned).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._stopped = False

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the thread, after every job handed over before it.

        Cancelling the caller does not withdraw a job already handed over (like a commit
        the writer took: its entries may still be written).
        """
        if self._stopped:
            raise RuntimeError("the spool's disk thread is stopped")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()

        def job() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller, as the executor would
                _call_in_loop(loop, _settle_error, future, exc)
            else:
                _call_in_loop(loop, _settle, future, result)

        self._hand_over(job)
        return await future

    def submit(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[..., _T],
        arg: Any,
        on_done: Callable[[_T | None, BaseException | None], None],
    ) -> None:
        """Run ``fn(arg)`` on the thread; ``on_done(result, error)`` then runs in `loop`.

        The callback form of `run`, for the commit path: no future and no task to resume in
        between, so a commit costs the loop one wake-up (the outcome) instead of three.
        """
        if self._stopped:
            raise RuntimeError("the spool's disk thread is stopped")

        def job() -> None:
            try:
                result = fn(arg)
            except BaseException as exc:
                _call_in_loop(loop, on_done, None, exc)
            else:
                _call_in_loop(loop, on_done, result, None)

        self._hand_over(job)

    def _hand_over(self, job: Callable[[], None]) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._worker.start()
        self._jobs.put(job)

    def stop(self) -> None:
        """Let the thread end once the jobs handed over so far are done; do not wait."""
        self._stopped = True
        if self._worker is not None:
            self._jobs.put(None)

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    # A closed loop raises RuntimeError: nobody waits for this outcome any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future[_T], result: _T) -> None:
    if not future.done():  # the caller may have been cancelled meanwhile
        future.set_result(result)


def _settle_error(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class _BadFrame(Exception):
    """A frame that does not parse: torn by a crash, or damaged."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason


def _decode_frame(buf: bytes, offset: int, end: int) -> tuple[ChainLink, int]:
    """Decode the frame at `offset`; return it and where the next one starts."""
    if end - offset < _FRAME_HEAD.size:
        raise _BadFrame(offset, "incomplete frame header")
    magic, version, length, crc = _FRAME_HEAD.unpack_from(buf, offset)
    if magic != FRAME_MAGIC or version != FRAME_VERSION:
        raise _BadFrame(offset, f"bad frame magic/version {magic:#04x}/{version}")
    if not _BODY_HEAD.size <= length <= _BODY_HEAD.size + MAX_PAYLOAD_BYTES:
        raise _BadFrame(offset, f"implausible frame length {length}")
    body_start = offset + _FRAME_HEAD.size
    next_offset = body_start + length
    if next_offset > end:
        raise _BadFrame(offset, "incomplete frame")
    body = buf[body_start:next_offset]
    if zlib.crc32(body, zlib.crc32(buf[offset : offset + _FRAME_PREFIX.size])) != crc:
        raise _BadFrame(offset, "checksum mismatch")
    seq, prev_hash, hash_ = _BODY_HEAD.unpack_from(body)
    return ChainLink(seq, prev_hash, hash_, body[_BODY_HEAD.size :]), next_offset


def _chain_problem(
    link: ChainLink, seq: int, prev: bytes, *, check_hash: bool = True
) -> str | None:
    if link.seq != seq:
        return f"found seq {link.seq} where {seq} was expected"
    if link.prev_hash != prev:
        return "previous-hash does not match the entry before it"
    if check_hash and link_hash(link.prev_hash, link.seq, link.payload) != link.hash:
        return "content does not match its hash"
    return None


def _walk_segment(
    data: bytes, first_seq: int, prev: bytes, name: str
) -> Iterator[tuple[ChainLink, int]]:
    """Yield every frame of a segment's bytes with the offset after it, checking the chain.

    Raises `_BadFrame` where framing stops, `SpoolCorrupt` for a well-framed entry that breaks
    the chain (a crash cannot produce one, so it is never treated as a torn tail).
    """
    offset = SEGMENT_HEADER_SIZE
    seq = first_seq
    while offset < len(data):
        link, next_offset = _decode_frame(data, offset, len(data))
        problem = _chain_problem(link, seq, prev)
        if problem is not None:
            raise SpoolCorrupt(f"{name} offset {offset}: {problem}")
        yield link, next_offset
        offset = next_offset
        seq += 1
        prev = link.hash


def _has_frame_after(data: bytes, start: int) -> bool:
    """Whether any checksum-valid frame begins at or after `start`."""
    pos = data.find(_FRAME_MARK, start)
    while pos != -1:
        try:
            _decode_frame(data, pos, len(data))
        except _BadFrame:
            pos = data.find(_FRAME_MARK, pos + 1)
        else:
            return True
    return False


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[written:]
        offset += written


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomic(path: Path, data: bytes, *, fsync: bool) -> None:
    """Replace `path` so a crash leaves either the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC, 0o640)
    try:
        _pwrite_all(fd, data, 0)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Seal:
    """What `<segment>.seal.json` says about a segment moved to the evidence directory."""

    segment: str
    chain_name: str
    first_seq: int
    last_seq: int
    prev_hash: bytes  # the hash the first entry follows
    last_hash: bytes
    size: int
    sha256: str
    signature: bytes | None  # checkpoint signature over (chain_name, last_seq, last_hash)
    sealed_at: datetime

    def checkpoint(self) -> Checkpoint | None:
        if self.signature is None:
            return None
        return Checkpoint(self.chain_name, self.last_seq, self.last_hash, self.signature)

    def to_json(self) -> dict[str, Any]:
        return {
            "segment": self.segment,
            "chain": self.chain_name,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "prev_hash": self.prev_hash.hex(),
            "last_hash": self.last_hash.hex(),
            "size": self.size,
            "sha256": self.sha256,
            "signature": self.signature.hex() if self.signature is not None else None,
            "sealed_at": self.sealed_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Seal:
        signature = data.get("signature")
        return cls(
            segment=data["segment"],
            chain_name=data["chain"],
            first_seq=int(data["first_seq"]),
            last_seq=int(data["last_seq"]),
            prev_hash=bytes.fromhex(data["prev_hash"]),
            last_hash=bytes.fromhex(data["last_hash"]),
            size=int(data["size"]),
            sha256=data["sha256"],
            signature=bytes.fromhex(signature) if signature is not None else None,
            sealed_at=datetime.fromisoformat(data["sealed_at"]),
        )

    def same_content(self, other: Seal) -> bool:
        """Equal but for when and by which key it was signed (a re-seal after a crash)."""
        return (
            self.segment,
            self.chain_name,
            self.first_seq,
            self.last_seq,
            self.prev_hash,
            self.last_hash,
            self.sha256,
        ) == (
            other.segment,
            other.chain_name,
            other.first_seq,
            other.last_seq,
            other.prev_hash,
            other.last_hash,
            other.sha256,
        )


@dataclass(frozen=True, slots=True)
class SpoolStats:
    appends: int  # append() calls that succeeded
    entries: int  # entries durably written
    batches: int  # group commits that succeeded
    fsyncs: int
    failed_batches: int


@dataclass(slots=True)
class _Counters:
    appends: int = 0
    entries: int = 0
    batches: int = 0
    fsyncs: int = 0
    failed_batches: int = 0


@dataclass(slots=True)
class _Segment:
    first_seq: int
    prev_hash: bytes
    path: Path
    size: int  # bytes known durable
    last_seq: int  # first_seq - 1 while empty


@dataclass(slots=True)
class _Chunk:
    """Bytes of one batch bound for one segment file."""

    first_seq: int
    prev_hash: bytes
    new: bool  # a segment this batch creates
    buf: bytearray
    size: int  # the segment's size once written
    last_seq: int
    path: Path | None = None
    fd: int | None = None


@dataclass(slots=True)
class _Request:
    payloads: Sequence[bytes]
    size: int
    future: asyncio.Future[list[ChainLink]]
    behind: bool = False  # nobody waits: on failure it is retried, not refused


@dataclass(frozen=True, slots=True)
class _ReadHint:
    """Where the entry after the last read is, so the indexer's next read need not rescan."""

    path: Path
    seq: int
    offset: int
    prev_hash: bytes


@dataclass(slots=True)
class _RecoveredState:
    segments: list[_Segment] = field(default_factory=list)
    head_seq: int = 0
    head_hash: bytes = GENESIS
    cursor: int = 0
    sealed_seq: int = 0
    sealed_hash: bytes = GENESIS


class Spool:
    """An append-only, hash-chained, fsync'd log of spool entries in segment files.

    Create one with `await Spool.open(...)`. `append` returns only once its entries are on
    disk; concurrent callers share fsyncs. Failure to write is `SpoolUnavailable` and leaves
    nothing of that append behind.
    """

    def __init__(
        self,
        directory: Path,
        *,
        clock: Clock,
        signer: CheckpointSigner | None,
        segment_max_bytes: int,
        segment_max_entries: int | None,
        checkpoint_every: int,
        fsync: bool,
        max_spool_bytes: int | None,
        keep_evidence: bool,
        evidence_dir: Path | None,
        chain_name: str,
    ) -> None:
        self._dir = directory
        self._clock = clock
        self._signer = signer
        self._segment_max_bytes = segment_max_bytes
        self._segment_max_entries = segment_max_entries
        self._checkpoint_every = checkpoint_every
        self._fsync = fsync
        self._max_spool_bytes = max_spool_bytes
        self._keep_evidence = keep_evidence
        self._evidence_dir = evidence_dir
        self._chain_name = chain_name

        # Guards the segment list, head, cursor and sizes shared by the writer thread, reader
        # threads and the sealing thread. Never held across I/O.
        self._lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._seal_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._head_seq = 0
        self._head_hash = GENESIS
        self._cursor = 0
        self._sealed_seq = 0
        self._sealed_hash = GENESIS
        self._spool_bytes = 0
        self._read_hint: _ReadHint | None = None

        # Owned by the writer thread only.
        self._fd: int | None = None
        self._room_end = 0  # the active segment file's size: its data plus room ahead
        self._stale_paths: set[Path] = set()
        self._pending_checkpoints: list[tuple[int, bytes]] = []
        self._counters = _Counters()

        self._disk = _DiskThread("spool-writer")
        self._queue: deque[_Request] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._committing: list[_Request] | None = None  # the batch the disk thread writes
        self._idle = asyncio.Event()  # nothing queued and nothing being written
        self._idle.set()
        self._cursor_lock = asyncio.Lock()
        self._closing = False
        self._behind_timer: asyncio.TimerHandle | None = None
        self._retry: list[_Request] = []  # written-behind entries whose write failed
        self._taken = 0  # requests the writer has taken from the queue, ever
        self._in_flight = 0  # requests taken from the queue whose batch is being written
        self._progress = asyncio.Event()
        self._closed = False

    @classmethod
    async def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        clock: Clock,
        signer: CheckpointSigner | None = None,
        segment_max_bytes: int = 64 * MiB,
        segment_max_entries: int | None = None,
        checkpoint_every: int = 1000,
        fsync: bool = True,
        max_spool_bytes: int | None = None,
        keep_evidence: bool = False,
        evidence_dir: str | os.PathLike[str] | None = None,
        chain_name: str = LEGACY_CHAIN_NAME,
    ) -> Spool:
        """Open (or create) the spool in `directory`, recovering from a crash.

        Recovery validates every frame of the newest segment. A torn tail (frames that do
        not parse, with nothing valid after them: the unacknowledged end of a write cut
        short) is truncated and logged; anything else that fails verification raises
        `SpoolCorrupt` rather than being skipped.

        Args:
            clock: the time source for checkpoint and seal timestamps.
            signer: signs checkpoints and seals; None writes unsigned seals and no checkpoints.
            segment_max_bytes: a segment takes no further entry past this size (an entry
                larger than it gets a segment of its own).
            segment_max_entries: optionally also roll after this many entries.
            checkpoint_every: sign the chain head at every multiple of this seq (0: never).
            fsync: False only for benchmarks and unregulated set-ups: durability is lost.
            max_spool_bytes: refuse appends (fail closed) while the segments in the spool
                directory would exceed this; `seal_indexed` frees space.
            keep_evidence: move sealed segments to `evidence_dir` instead of deleting them.
            chain_name: the hash chain the entries belong to in the store (one per proxy
                writing to a shared store). Recorded in a new spool; reopening a spool with
                another name is a ValueError.
        """
        if not chain_name or len(chain_name) > _MAX_CHAIN_NAME or not chain_name.isprintable():
            raise ValueError(f"invalid chain name {chain_name[:40]!r}")
        if segment_max_bytes <= SEGMENT_HEADER_SIZE + FRAME_OVERHEAD:
            raise ValueError("segment_max_bytes is too small to hold one entry")
        if segment_max_entries is not None and segment_max_entries < 1:
            raise ValueError("segment_max_entries must be positive")
        if checkpoint_every < 0:
            raise ValueError("checkpoint_every must not be negative")
        spool_dir = Path(directory)
        ev_dir = Path(evidence_dir) if evidence_dir is not None else None
        if keep_evidence and ev_dir is None:
            raise ValueError("keep_evidence needs an evidence_dir")
        spool = cls(
            spool_dir,
            clock=clock,
            signer=signer,
            segment_max_bytes=segment_max_bytes,
            segment_max_entries=segment_max_entries,
            checkpoint_every=checkpoint_every,
            fsync=fsync,
            max_spool_bytes=max_spool_bytes,
            keep_evidence=keep_evidence,
            evidence_dir=ev_dir,
            chain_name=chain_name,
        )
        try:
            await spool._disk.run(spool._recover)
        except BaseException:
            spool._disk.stop()
            raise
        spool._loop = asyncio.get_running_loop()
        return spool

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Write what is queued, then close the files. Appends after this fail."""
        if self._closed:
            return
        self._closing = True
        if self._behind_timer is not None:
            self._behind_timer.cancel()
            self._behind_timer = None
        self._commit_next()
        await self._idle.wait()
        for request in self._retry:
            if not request.future.done():
                request.future.set_exception(SpoolUnavailable("the spool closed"))
        self._retry.clear()
        await self._disk.run(self._close_active)
        self._disk.stop()
        self._closed = True

    # -- appending ---------------------------------------------------------------------------

    async def append(self, payloads: Sequence[bytes]) -> list[ChainLink]:
        """Append entries as one unit and return their links once they are durable.

        Sequence numbers and hashes are assigned in write order. Raises `SpoolUnavailable`
        when the entries could not be made durable; then none of them was written. Cancelling
        the caller does not withdraw entries already handed to the writer.
        """
        if not payloads:
            return []
        if self._closing:
            raise SpoolUnavailable("the spool is closed")
        size = 0
        for payload in payloads:
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise ValueError(f"a spool entry is limited to {MAX_PAYLOAD_BYTES} bytes")
            size += FRAME_OVERHEAD + len(payload)
        future: asyncio.Future[list[ChainLink]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(list(payloads), size, future))
        self._commit_next()
        return await future

    def append_behind(self, payloads: Sequence[bytes], *, within: float = 0.02) -> None:
        """Queue entries whose caller need not wait for them to be durable.

        For what adds to an already durable record (an observation of a delivered copy):
        they ride along with the next group commit, or are written `within` seconds from
        now, whichever comes first, so they cost no fsync of their own. A write that fails
        later is logged; it cannot be undone for the caller.
        """
        if not payloads:
            return
        if self._closing:
            raise SpoolUnavailable("the spool is closed")
        size = 0
        for payload in payloads:
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise ValueError(f"a spool entry is limited to {MAX_PAYLOAD_BYTES} bytes")
            size += FRAME_OVERHEAD + len(payload)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[ChainLink]] = loop.create_future()
        future.add_done_callback(_report_behind)
        self._queue.append(_Request(list(payloads), size, future, behind=True))
        if self._behind_timer is None:
            self._behind_timer = loop.call_later(within, self._wake_for_behind)

    async def flush(self) -> None:
        """Write everything queued so far now, also what waits to be written behind.

        Returns once the writer tried it all: written, refused, or (written behind) failed
        again and kept for a later retry.
        """
        # A batch already on the disk was taken before this flush: let it finish first, so
        # that written-behind entries it fails to write get a try of this flush's own below
        # rather than waiting for the retry timer.
        on_disk = self._taken + self._in_flight
        while self._taken < on_disk and not self._closed:
            self._progress.clear()
            await self._progress.wait()
        if self._retry:
            self._queue.extend(self._retry)
            self._retry.clear()
        # What the writer took but has not finished counts too: a flush that returned before
        # that batch is durable lets a drain read a head without it.
        target = self._taken + self._in_flight + len(self._queue)
        if self._taken >= target:
            return
        self._commit_next()
        while self._taken < target and not self._closed:
            self._progress.clear()
            await self._progress.wait()

    def _wake_for_behind(self) -> None:
        self._behind_timer = None
        if self._retry:
            # Failed before (a full disk, say): back in line, after what came meanwhile.
            self._queue.extend(self._retry)
            self._retry.clear()
        self._commit_next()

    # Group commit without a writer task: when nothing is being written, an append hands its
    # batch to the disk thread at once; what arrives meanwhile waits in the queue and goes
    # as the next batch when the outcome comes back (`_committed`, run in the loop).

    def _commit_next(self) -> None:
        if self._committing is not None or not self._queue:
            return
        assert self._loop is not None
        batch = self._take_batch()
        self._committing = batch
        self._in_flight = len(batch)
        self._idle.clear()
        self._disk.submit(
            self._loop, self._commit_batch, [r.payloads for r in batch], self._committed
        )

    def _committed(
        self,
        outcomes: list[list[ChainLink] | SpoolUnavailable] | None,
        error: BaseException | None,
    ) -> None:
        batch = self._committing
        assert batch is not None
        self._committing = None
        if outcomes is None:
            # _commit_batch maps I/O failures itself; this is a bug, still fail closed.
            logger.error("spool writer failed unexpectedly", exc_info=error)
            cause = error if error is not None else RuntimeError("no outcome")
            outcomes = [_unavailable(f"spool writer failed: {cause}", cause) for _ in batch]
        self._taken += len(batch)
        self._in_flight = 0
        self._progress.set()
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.future.done():  # the caller was cancelled
                continue
            if isinstance(outcome, SpoolUnavailable) and request.behind and not self._closing:
                self._retry.append(request)
                continue
            if isinstance(outcome, SpoolUnavailable):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)
        if self._queue:
            self._commit_next()
            return
        if self._retry and self._behind_timer is None and not self._closing:
            assert self._loop is not None
            self._behind_timer = self._loop.call_later(_BEHIND_RETRY, self._wake_for_behind)
        self._idle.set()

    def _take_batch(self) -> list[_Request]:
        batch = [self._queue.popleft()]
        entries = len(batch[0].payloads)
        size = batch[0].size
        while self._queue:
            nxt = self._queue[0]
            if (
                entries + len(nxt.payloads) > _MAX_BATCH_ENTRIES
                or size + nxt.size > _MAX_BATCH_BYTES
            ):
                break
            batch.append(self._queue.popleft())
            entries += len(nxt.payloads)
            size += nxt.size
        return batch

    def _commit_batch(
        self, requests: list[Sequence[bytes]]
    ) -> list[list[ChainLink] | SpoolUnavailable]:
        """Write and fsync a batch (writer thread). Per request: its links or its error."""
        outcomes: list[list[ChainLink] | SpoolUnavailable] = []
        with self._lock:
            active = self._segments[-1]
            room = (
                None if self._max_spool_bytes is None else self._max_spool_bytes - self._spool_bytes
            )
        seq, prev = self._head_seq, self._head_hash
        chunks = [
            _Chunk(
                first_seq=active.first_seq,
                prev_hash=active.prev_hash,
                new=False,
                buf=bytearray(),
                size=active.size,
                last_seq=active.last_seq,
            )
        ]
        planned = 0
        admitted: list[int] = []
        for index, payloads in enumerate(requests):
            need = sum(FRAME_OVERHEAD + len(p) for p in payloads)
            if room is not None and planned + need > room:
                outcomes.append(
                    SpoolUnavailable(
                        f"the spool would exceed max_spool_bytes ({self._max_spool_bytes}): "
                        "the unindexed backlog is too big"
                    )
                )
                continue
            links: list[ChainLink] = []
            for payload in payloads:
                seq += 1
                hash_ = link_hash(prev, seq, payload)
                frame = encode_frame(seq, prev, hash_, payload)
                chunk = chunks[-1]
                if self._must_roll(chunk, len(frame)):
                    chunk = _Chunk(
                        first_seq=seq,
                        prev_hash=prev,
                        new=True,
                        buf=bytearray(_encode_segment_header(seq, prev)),
                        size=SEGMENT_HEADER_SIZE,
                        last_seq=seq - 1,
                    )
                    chunks.append(chunk)
                    planned += SEGMENT_HEADER_SIZE
                chunk.buf += frame
                chunk.size += len(frame)
                chunk.last_seq = seq
                links.append(ChainLink(seq, prev, hash_, payload))
                prev = hash_
            planned += need
            admitted.append(index)
            outcomes.append(links)
        if not admitted:
            return outcomes

        try:
            self._write_chunks(active, chunks)
        except BaseException as exc:
            self._roll_back(active, chunks)
            self._counters.failed_batches += 1
            if not isinstance(exc, OSError):
                raise
            logger.error(
                "spool write failed, %d append(s) refused (fail closed): %s", len(admitted), exc
            )
            for index in admitted:
                outcomes[index] = _unavailable(f"the spool cannot be written: {exc}", exc)
            return outcomes

        new_segments = [
            _Segment(c.first_seq, c.prev_hash, c.path, c.size, c.last_seq)
            for c in chunks[1:]
            if c.path is not None
        ]
        with self._lock:
            active.size = chunks[0].size
            active.last_seq = chunks[0].last_seq
            self._segments.extend(new_segments)
            self._spool_bytes += sum(len(c.buf) for c in chunks)
            self._head_seq, self._head_hash = seq, prev
        if len(chunks) > 1:
            # The newest segment becomes the one appended to; the others are complete.
            for chunk in chunks[1:-1]:
                if chunk.fd is not None:
                    os.close(chunk.fd)
            self._close_fd()
            self._fd = chunks[-1].fd
            self._room_end = chunks[-1].size
        self._counters.batches += 1
        self._counters.appends += len(admitted)
        self._counters.entries += sum(len(requests[i]) for i in admitted)
        self._checkpoint_after_batch(outcomes)
        return outcomes

    def _must_roll(self, chunk: _Chunk, frame_size: int) -> bool:
        entries = chunk.last_seq - chunk.first_seq + 1
        if entries == 0:
            return False
        if chunk.size + frame_size > self._segment_max_bytes:
            return True
        return self._segment_max_entries is not None and entries >= self._segment_max_entries

    def _write_chunks(self, active: _Segment, chunks: list[_Chunk]) -> None:
        if self._fd is None:
            self._reopen_active(active)
        self._remove_stale_segments()
        assert self._fd is not None
        for chunk in chunks:
            if not chunk.buf:
                continue
            if chunk.new:
                if chunk is chunks[1]:
                    # A closed segment must end with its last frame, durably so before the
                    # next segment exists: recovery and sealing read a closed one to its end.
                    self._cut_room(chunks[0].size)
                chunk.path = self._dir / segment_name(chunk.first_seq)
                # O_TRUNC: a file of that name can only be left over from a refused batch.
                chunk.fd = os.open(
                    chunk.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC, 0o640
                )
                _pwrite_all(chunk.fd, chunk.buf, 0)
            else:
                if chunk.size > self._room_end:
                    self._make_room(chunk.size)
                _pwrite_all(self._fd, chunk.buf, active.size)
        fds = [self._fd if not c.new else c.fd for c in chunks if c.buf]
        if self._fsync:
            for fd in fds:
                assert fd is not None
                os.fsync(fd)
                self._counters.fsyncs += 1
            if len(chunks) > 1:
                _fsync_dir(self._dir)
        for fd in fds:
            assert fd is not None
            # Writing to a file whose last name is gone succeeds but keeps nothing.
            if os.fstat(fd).st_nlink == 0:
                raise OSError(errno.ENOENT, "the segment file was removed while in use")

    def _make_room(self, needed: int) -> None:
        assert self._fd is not None
        step_end = min(self._room_end + _ROOM_STEP, self._segment_max_bytes)
        end = max(needed, step_end)
        try:
            os.ftruncate(self._fd, end)
        except OSError:
            # No room to be had (a file size limit, a filesystem without holes): this batch
            # grows the file by its own write, as without room; the write reports what fails.
            end = needed
        self._room_end = end

    def _cut_room(self, data_end: int) -> None:
        if self._fd is None or self._room_end <= data_end:
            return
        os.ftruncate(self._fd, data_end)
        if self._fsync:
            os.fsync(self._fd)
            self._counters.fsyncs += 1
        self._room_end = data_end

    def _roll_back(self, active: _Segment, chunks: list[_Chunk]) -> None:
        """Undo a refused batch: the active segment back to its durable size, new files gone."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, active.size)
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                # The next batch reopens and truncates again before writing anything.
                logger.warning("could not truncate %s after a failed write: %s", active.path, exc)
            # Reopen for the next batch: a failed fsync may leave the descriptor's error state
            # or a removed file behind it.
            self._close_fd()
        for chunk in chunks:
            if chunk.fd is not None:
                os.close(chunk.fd)
                chunk.fd = None
            if chunk.path is not None:
                try:
                    chunk.path.unlink(missing_ok=True)
                except OSError:
                    self._stale_paths.add(chunk.path)
        if self._fsync and any(c.path is not None for c in chunks):
            with contextlib.suppress(OSError):
                _fsync_dir(self._dir)

    def _reopen_active(self, active: _Segment) -> None:
        # No O_CREAT: if the segment vanished, its entries are gone and the spool must stay
        # closed until an operator looks, not quietly start a file with a hole before it.
        fd = os.open(active.path, os.O_RDWR | _O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < active.size:
                raise OSError(
                    errno.EIO,
                    f"{active.path} is shorter ({size}) than its durable end ({active.size}): "
                    "entries were lost",
                )
            if size > active.size:
                os.ftruncate(fd, active.size)
                if self._fsync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._room_end = active.size

    def _remove_stale_segments(self) -> None:
        for path in list(self._stale_paths):
            path.unlink(missing_ok=True)
            self._stale_paths.discard(path)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _close_active(self) -> None:
        # A spool closed in order leaves its files exactly as long as their data.
        with self._lock:
            data_end = self._segments[-1].size if self._segments else 0
        try:
            self._cut_room(data_end)
        except OSError as exc:
            logger.warning("could not cut the room off the active spool segment: %s", exc)
        self._close_fd()

    # -- checkpoints -------------------------------------------------------------------------

    def _checkpoint_after_batch(self, outcomes: list[list[ChainLink] | SpoolUnavailable]) -> None:
        if self._signer is None or self._checkpoint_every == 0:
            return
        for outcome in outcomes:
            if isinstance(outcome, list):
                self._pending_checkpoints.extend(
                    (link.seq, link.hash)
                    for link in outcome
                    if link.seq % self._checkpoint_every == 0
                )
        if not self._pending_checkpoints:
            return
        try:
            self._store_checkpoints(self._pending_checkpoints, "periodic")
        except OSError as exc:
            # The entries are durable already; their appends must not fail for this. Retry
            # with the next batch.
            logger.warning("could not write spool checkpoints (will retry): %s", exc)
        else:
            self._pending_checkpoints.clear()

    def _store_checkpoints(
        self, heads: Sequence[tuple[int, bytes]], reason: str
    ) -> list[Checkpoint]:
        assert self._signer is not None
        checkpoints = [self._signer.sign(self._chain_name, seq, head) for seq, head in heads]
        at = self._clock.now().isoformat()
        lines = b"".join(
            canonical_json(
                {
                    "chain": c.chain_name,
                    "seq": c.seq,
                    "head": c.head.hex(),
                    "signature": c.signature.hex(),
                    "at": at,
                    "reason": reason,
                }
            )
            + b"\n"
            for c in checkpoints
        )
        path = self._dir / _CHECKPOINTS
        with self._checkpoint_lock:
            created = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o640)
            try:
                size = os.fstat(fd).st_size
                try:
                    _pwrite_all(fd, lines, size)
                    if self._fsync:
                        os.fsync(fd)
                except OSError:
                    # Leave no half line for the next writer to append after.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
            if created and self._fsync:
                _fsync_dir(self._dir)
        return checkpoints

    async def checkpoint(self) -> Checkpoint:
        """Sign the current head now and store the checkpoint."""
        if self._signer is None:
            raise ValueError("the spool has no signer")
        seq, head = self.head()
        try:
            stored = await asyncio.to_thread(self._store_checkpoints, [(seq, head)], "manual")
        except OSError as exc:
            raise SpoolUnavailable(f"could not store a checkpoint: {exc}") from exc
        return stored[0]

    # -- reading and the cursor --------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def chain_name(self) -> str:
        """The hash chain this spool's entries belong to (one per proxy sharing a store)."""
        return self._chain_name

    def head(self) -> tuple[int, bytes]:
        """The newest durable entry: (seq, hash); (0, GENESIS) when nothing was written."""
        with self._lock:
            return self._head_seq, self._head_hash

    def cursor(self) -> int:
        """Every entry up to this seq is indexed."""
        with self._lock:
            return self._cursor

    def sealed_through(self) -> tuple[int, bytes]:
        """The newest entry sealed out of the spool: (seq, hash)."""
        with self._lock:
            return self._sealed_seq, self._sealed_hash

    @property
    def spool_bytes(self) -> int:
        with self._lock:
            return self._spool_bytes

    @property
    def stats(self) -> SpoolStats:
        c = self._counters
        return SpoolStats(c.appends, c.entries, c.batches, c.fsyncs, c.failed_batches)

    async def commit_cursor(self, seq: int) -> None:
        """Record that every entry up to `seq` is indexed (atomically, durably)."""
        async with self._cursor_lock:
            with self._lock:
                current, head = self._cursor, self._head_seq
            if seq < current:
                raise ValueError(f"the cursor cannot move back from {current} to {seq}")
            if seq > head:
                raise ValueError(f"cursor {seq} is past the spool head {head}")
            if seq == current:
                return
            try:
                await asyncio.to_thread(
                    _write_file_atomic,
                    self._dir / _CURSOR,
                    canonical_json({"seq": seq}) + b"\n",
                    fsync=self._fsync,
                )
            except OSError as exc:
                raise SpoolUnavailable(f"could not store the indexer cursor: {exc}") from exc
            with self._lock:
                self._cursor = seq

    async def read_from(self, seq: int, max_entries: int) -> list[ChainLink]:
        """Up to `max_entries` durable entries from `seq` on, across segments, verified.

        Returns [] past the head. Raises ValueError for a seq already sealed out of the
        spool (read those with `iter_evidence`) and `SpoolCorrupt` for a damaged entry.
        """
        if seq < 1 or max_entries < 1:
            raise ValueError("seq and max_entries must be positive")
        return await asyncio.to_thread(self._read, seq, max_entries)

    def _read(self, seq: int, max_entries: int) -> list[ChainLink]:
        with self._lock:
            segments = [(s.first_seq, s.prev_hash, s.path, s.size) for s in self._segments]
            head_seq, sealed_seq, hint = self._head_seq, self._sealed_seq, self._read_hint
        if seq <= sealed_seq:
            raise ValueError(f"entries up to seq {sealed_seq} were sealed out of the spool")
        if seq > head_seq:
            return []
        out: list[ChainLink] = []
        index = bisect.bisect_right([s[0] for s in segments], seq) - 1
        first_seq, prev, path, size = segments[index]
        expected, offset = first_seq, SEGMENT_HEADER_SIZE
        if hint is not None and hint.path == path and hint.seq == seq:
            expected, offset, prev = hint.seq, hint.offset, hint.prev_hash
        while True:
            offset, expected, prev = self._read_segment(
                path, offset, size, expected, prev, seq, max_entries, out
            )
            index += 1
            if len(out) >= max_entries or index >= len(segments) or expected > head_seq:
                break
            first_seq, header_prev, path, size = segments[index]
            if first_seq != expected or header_prev != prev:
                raise SpoolCorrupt(f"{path.name} does not continue the chain of the one before")
            offset = SEGMENT_HEADER_SIZE
        with self._lock:
            self._read_hint = _ReadHint(path, expected, offset, prev)
        return out

    def _read_segment(
        self,
        path: Path,
        offset: int,
        size: int,
        expected: int,
        prev: bytes,
        want_from: int,
        max_entries: int,
        out: list[ChainLink],
    ) -> tuple[int, int, bytes]:
        """Read frames of one segment into `out`; return (offset, next seq, prev hash)."""
        with _open_unsealed(path) as f:
            f.seek(offset)
            while offset < size and len(out) < max_entries:
                head = f.read(_FRAME_HEAD.size)
                length = _FRAME_HEAD.unpack(head)[2] if len(head) == _FRAME_HEAD.size else 0
                if offset + _FRAME_HEAD.size + length > size:
                    raise SpoolCorrupt(f"{path.name} offset {offset}: frame overruns the segment")
                frame = head + f.read(length)
                try:
                    link, _ = _decode_frame(frame, 0, len(frame))
                except _BadFrame as exc:
                    raise SpoolCorrupt(f"{path.name} offset {offset}: {exc.reason}") from None
                # Entries before the wanted one are only skipped; their crc still checked.
                wanted = link.seq >= want_from
                problem = _chain_problem(link, expected, prev, check_hash=wanted)
                if problem is not None:
                    raise SpoolCorrupt(f"{path.name} offset {offset}: {problem}")
                if wanted:
                    out.append(link)
                offset += len(frame)
                expected += 1
                prev = link.hash
        return offset, expected, prev

    # -- sealing -----------------------------------------------------------------------------

    async def seal_indexed(self) -> list[Seal]:
        """Seal every segment whose entries are all indexed, except the one being written.

        For each: verify it, sign a checkpoint of its last entry, then move it to the
        evidence directory with its `.seal.json` (keep_evidence) or delete it. Raises
        `SpoolCorrupt` if a segment fails verification and OSError if a directory cannot be
        written; segments sealed before the failure stay sealed.
        """
        return await asyncio.to_thread(self._seal_indexed)

    def _seal_indexed(self) -> list[Seal]:
        sealed: list[Seal] = []
        with self._seal_lock:
            while (pair := self._next_sealable()) is not None:
                sealed.append(self._seal_segment(*pair))
        return sealed

    def _next_sealable(self) -> tuple[_Segment, _Segment] | None:
        """The oldest segment and the one after it, if every entry of the oldest is indexed."""
        with self._lock:
            if len(self._segments) < 2:
                return None
            segment, following = self._segments[0], self._segments[1]
            if following.first_seq - 1 > self._cursor:
                return None
            return segment, following

    def _seal_segment(self, segment: _Segment, following: _Segment) -> Seal:
        last_seq, last_hash = following.first_seq - 1, following.prev_hash
        data = segment.path.read_bytes()
        self._verify_sealable(segment, data, last_seq, last_hash)
        signature = None
        if self._signer is not None:
            signature = self._store_checkpoints([(last_seq, last_hash)], "seal")[0].signature
        seal = Seal(
            segment=segment.path.name,
            chain_name=self._chain_name,
            first_seq=segment.first_seq,
            last_seq=last_seq,
            prev_hash=segment.prev_hash,
            last_hash=last_hash,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            signature=signature,
            sealed_at=self._clock.now(),
        )
        if self._keep_evidence:
            self._place_evidence(segment.path, data, seal)
        # Record the seal before the segment leaves: a crash in between leaves a segment that
        # recovery knows to be sealed (and removes) rather than a hole in the chain.
        _write_file_atomic(
            self._dir / _SEALED,
            canonical_json({"seq": last_seq, "hash": last_hash.hex()}) + b"\n",
            fsync=self._fsync,
        )
        with self._lock:
            self._segments.remove(segment)
            self._spool_bytes -= segment.size
            self._sealed_seq, self._sealed_hash = last_seq, last_hash
        segment.path.unlink()
        if self._fsync:
            _fsync_dir(self._dir)
        logger.info(
            "sealed spool segment %s (seq %d-%d)%s",
            seal.segment,
            seal.first_seq,
            seal.last_seq,
            " into the evidence directory" if self._keep_evidence else "",
        )
        return seal

    @staticmethod
    def _verify_sealable(segment: _Segment, data: bytes, last_seq: int, last_hash: bytes) -> None:
        name = segment.path.name
        if _decode_segment_header(data) != (segment.first_seq, segment.prev_hash):
            raise SpoolCorrupt(f"{name}: segment header changed")
        seq, head, end = segment.first_seq - 1, segment.prev_hash, SEGMENT_HEADER_SIZE
        try:
            for link, offset in _walk_segment(data, segment.first_seq, segment.prev_hash, name):
                seq, head, end = link.seq, link.hash, offset
        except _BadFrame as exc:
            raise SpoolCorrupt(f"{name} offset {exc.offset}: {exc.reason}") from None
        if end != len(data) or (seq, head) != (last_seq, last_hash):
            raise SpoolCorrupt(f"{name} does not end where the next segment continues")

    def _place_evidence(self, source: Path, data: bytes, seal: Seal) -> None:
        assert self._evidence_dir is not None
        evidence = self._evidence_dir
        evidence.mkdir(parents=True, exist_ok=True)
        target = evidence / seal.segment
        seal_path = evidence / (seal.segment + _SEAL_SUFFIX)
        # Evidence storage may be write-once: an earlier, interrupted seal of this segment is
        # accepted when identical and never overwritten.
        if target.exists():
            if _sha256_file(target) != seal.sha256:
                raise SpoolCorrupt(f"{target} exists with different content")
        else:
            tmp = evidence / (seal.segment + ".tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(source, tmp)
            except OSError:
                # Another filesystem (or one without hard links): copy.
                _write_file_atomic(tmp, data, fsync=self._fsync)
            os.replace(tmp, target)
        if seal_path.exists():
            existing = _load_seal(seal_path)
            if not existing.same_content(seal):
                raise SpoolCorrupt(f"{seal_path} exists and describes other content")
        else:
            _write_file_atomic(
                seal_path,
                json.dumps(seal.to_json(), indent=2, sort_keys=True).encode() + b"\n",
                fsync=self._fsync,
            )
        if self._fsync:
            _fsync_dir(evidence)

    # -- recovery ----------------------------------------------------------------------------

    def _recover(self) -> None:
        if self._evidence_dir is not None and self._evidence_dir.resolve() == self._dir.resolve():
            raise ValueError("the evidence directory must not be the spool directory")
        state = _recover_directory(self._dir, fsync=self._fsync, chain_name=self._chain_name)
        self._segments = state.segments
        self._head_seq, self._head_hash = state.head_seq, state.head_hash
        self._cursor = state.cursor
        self._sealed_seq, self._sealed_hash = state.sealed_seq, state.sealed_hash
        self._spool_bytes = sum(s.size for s in state.segments)
        self._reopen_active(self._segments[-1])


def _open_unsealed(path: Path) -> BinaryIO:
    """A segment for reading; ValueError if sealing removed it since it was listed."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise ValueError(f"{path.name} was sealed out of the spool meanwhile") from None


def _report_behind(future: asyncio.Future[list[ChainLink]]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        logger.error("spool: entries written behind were lost: %s", exc)


def _unavailable(message: str, cause: BaseException) -> SpoolUnavailable:
    error = SpoolUnavailable(message)
    error.__cause__ = cause
    return error


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise SpoolCorrupt(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SpoolCorrupt(f"{path} does not hold a JSON object")
    return data


def _load_seal(path: Path) -> Seal:
    data = _load_json(path)
    if data is None:
        raise SpoolCorrupt(f"{path} is missing")
    try:
        return Seal.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpoolCorrupt(f"{path} is not a valid seal: {exc!r}") from None


def read_checkpoints(directory: str | os.PathLike[str]) -> list[Checkpoint]:
    """The checkpoints stored in a spool directory, oldest first.

    A torn last line (a crash while appending) is ignored; any other bad line is
    `SpoolCorrupt`.
    """
    path = Path(directory) / _CHECKPOINTS
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    complete = raw[: raw.rfind(b"\n") + 1]
    checkpoints = []
    for number, line in enumerate(complete.splitlines(), start=1):
        try:
            data = json.loads(line)
            checkpoints.append(
                Checkpoint(
                    data["chain"],
                    int(data["seq"]),
                    bytes.fromhex(data["head"]),
                    bytes.fromhex(data["signature"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpoolCorrupt(f"{path} line {number} is not a checkpoint: {exc!r}") from None
    return checkpoints


def read_chain_name(directory: str | os.PathLike[str]) -> str | None:
    """The chain a spool directory's entries belong to, as recorded when it was created.

    None when nothing is recorded: a new directory, or one made before chain names were
    recorded (its chain is `LEGACY_CHAIN_NAME`). `SpoolCorrupt` for an unreadable record.
    """
    path = Path(directory) / _CHAIN
    data = _load_json(path)
    if data is None:
        return None
    name = data.get("chain")
    if (
        not isinstance(name, str)
        or not name
        or len(name) > _MAX_CHAIN_NAME
        or not name.isprintable()
    ):
        raise SpoolCorrupt(f"{path} does not name a chain")
    return name


def _claim_chain(directory: Path, chain_name: str, *, fsync: bool) -> None:
    """Record the chain of a new spool; refuse to continue a spool under another chain name.

    Continuing a spool's entries under a new name would start that chain at a seq past 1 (or
    repeat the old chain's entries under the new name), which no store can verify.
    """
    recorded = read_chain_name(directory)
    if recorded is None:
        has_entries = (directory / _SEALED).exists() or any(
            _SEGMENT_NAME.match(path.name) for path in directory.iterdir()
        )
        if has_entries:
            recorded = LEGACY_CHAIN_NAME
        _write_file_atomic(
            directory / _CHAIN,
            canonical_json({"chain": recorded or chain_name}) + b"\n",
            fsync=fsync,
        )
    if recorded is not None and recorded != chain_name:
        raise ValueError(
            f"the spool in {directory} holds chain {recorded[:_MAX_CHAIN_NAME]!r}, not "
            f"{chain_name[:_MAX_CHAIN_NAME]!r}: a spool keeps the chain name it was created "
            f"with (set chain_name to {recorded[:_MAX_CHAIN_NAME]!r} for this data directory)"
        )


def _recover_directory(directory: Path, *, fsync: bool, chain_name: str) -> _RecoveredState:
    """Bring a spool directory to a consistent state after any crash and describe it."""
    if not directory.exists():
        directory.mkdir(parents=True)
        if fsync:
            _fsync_dir(directory.parent)
    for tmp in directory.glob("*.tmp"):
        tmp.unlink()
    _claim_chain(directory, chain_name, fsync=fsync)

    state = _RecoveredState()
    try:
        sealed = _load_json(directory / _SEALED)
        if sealed is not None:
            state.sealed_seq = int(sealed["seq"])
            state.sealed_hash = bytes.fromhex(sealed["hash"])
        cursor = _load_json(directory / _CURSOR)
        # Sealing needs the cursor past the sealed entries, so it is at least that far.
        state.cursor = max(int(cursor["seq"]) if cursor is not None else 0, state.sealed_seq)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpoolCorrupt(f"unreadable spool state in {directory}: {exc!r}") from None

    _repair_checkpoints(directory, fsync=fsync)
    checkpoints = [c for c in read_checkpoints(directory) if c.chain_name == chain_name]
    last_checkpoint = max((c.seq for c in checkpoints), default=0)

    state.segments = _read_segment_headers(directory)
    # A crash between recording a seal and deleting its segment: finish the deletion.
    while len(state.segments) >= 2 and state.segments[1].first_seq - 1 <= state.sealed_seq:
        logger.info("removing already sealed spool segment %s", state.segments[0].path.name)
        state.segments.pop(0).path.unlink()

    if not state.segments:
        if last_checkpoint > state.sealed_seq:
            raise SpoolCorrupt(
                f"no spool segment left, but a checkpoint covers seq {last_checkpoint}, past "
                f"the last sealed seq {state.sealed_seq}"
            )
        state.segments.append(
            _create_segment(directory, state.sealed_seq + 1, state.sealed_hash, fsync=fsync)
        )
    first = state.segments[0]
    if (first.first_seq, first.prev_hash) != (state.sealed_seq + 1, state.sealed_hash):
        raise SpoolCorrupt(
            f"the spool's first segment {first.path.name} does not continue from the last "
            f"sealed entry (seq {state.sealed_seq}): entries are missing"
        )
    for segment, following in zip(state.segments, state.segments[1:], strict=False):
        # Sizes and the last seq of closed segments come from the next header; their frames
        # are verified when read or sealed.
        segment.size = segment.path.stat().st_size
        segment.last_seq = following.first_seq - 1

    last = state.segments[-1]
    state.head_hash = _recover_last_segment(last, fsync=fsync)
    state.head_seq = last.last_seq

    if state.cursor > state.head_seq:
        raise SpoolCorrupt(f"the cursor ({state.cursor}) is past the spool head ({state.head_seq})")
    if last_checkpoint > state.head_seq:
        raise SpoolCorrupt(
            f"a checkpoint covers seq {last_checkpoint}, past the spool head ({state.head_seq}): "
            "durable entries are missing"
        )
    return state


def _read_segment_headers(directory: Path) -> list[_Segment]:
    named = sorted(
        (int(m.group(1)), directory / m.group(0))
        for m in (_SEGMENT_NAME.match(p.name) for p in directory.iterdir())
        if m is not None
    )
    segments: list[_Segment] = []
    for position, (name_seq, path) in enumerate(named):
        with path.open("rb") as f:
            raw = f.read(SEGMENT_HEADER_SIZE + 1)
        header = _decode_segment_header(raw)
        if header is None:
            if position == len(named) - 1 and len(raw) <= SEGMENT_HEADER_SIZE:
                # Created by a roll that crashed before its first entry was durable.
                logger.warning("removing spool segment %s with a torn header", path.name)
                path.unlink()
                continue
            raise SpoolCorrupt(f"{path.name} has a damaged segment header")
        first_seq, prev_hash = header
        if first_seq != name_seq:
            raise SpoolCorrupt(f"{path.name} says its first seq is {first_seq}")
        segments.append(_Segment(first_seq, prev_hash, path, SEGMENT_HEADER_SIZE, first_seq - 1))
    return segments


def _recover_last_segment(segment: _Segment, *, fsync: bool) -> bytes:
    """Validate every frame of the newest segment, truncating a torn tail; return its head."""
    data = segment.path.read_bytes()
    name = segment.path.name
    good_end, seq, head = SEGMENT_HEADER_SIZE, segment.first_seq - 1, segment.prev_hash
    try:
        for link, end in _walk_segment(data, segment.first_seq, segment.prev_hash, name):
            good_end, seq, head = end, link.seq, link.hash
    except _BadFrame as exc:
        if _has_frame_after(data, exc.offset + 1):
            raise SpoolCorrupt(
                f"{name} offset {exc.offset}: {exc.reason}, and valid entries follow"
            ) from None
        if data.count(0, good_end) == len(data) - good_end:
            # Only zeros: the room made ahead of the data (`_make_room`), nothing was torn.
            logger.info("spool segment %s: dropping %d bytes of room", name, len(data) - good_end)
        else:
            logger.warning(
                "spool segment %s: truncating a torn tail of %d bytes at offset %d (%s) "
                "after seq %d",
                name,
                len(data) - good_end,
                good_end,
                exc.reason,
                seq,
            )
        fd = os.open(segment.path, os.O_RDWR | _O_CLOEXEC)
        try:
            os.ftruncate(fd, good_end)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    segment.size, segment.last_seq = good_end, seq
    return head


def _create_segment(directory: Path, first_seq: int, prev_hash: bytes, *, fsync: bool) -> _Segment:
    path = directory / segment_name(first_seq)
    header = _encode_segment_header(first_seq, prev_hash)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC, 0o640)
    try:
        _pwrite_all(fd, header, 0)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if fsync:
        _fsync_dir(directory)
    return _Segment(first_seq, prev_hash, path, len(header), first_seq - 1)


def _repair_checkpoints(directory: Path, *, fsync: bool) -> None:
    path = directory / _CHECKPOINTS
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    keep = raw.rfind(b"\n") + 1
    if keep == len(raw):
        return
    logger.warning("dropping a torn last line of %s (%d bytes)", path, len(raw) - keep)
    fd = os.open(path, os.O_RDWR | _O_CLOEXEC)
    try:
        os.ftruncate(fd, keep)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def iter_evidence(
    evidence_dir: str | os.PathLike[str],
    *,
    public_key: Ed25519PublicKey | None = None,
    chain_name: str = LEGACY_CHAIN_NAME,
) -> Iterator[ChainLink]:
    """Every entry of the sealed segments in an evidence directory, in order, verified.

    Each segment must match its seal (size, sha256, first/last seq and hash, and the seal's
    signature when `public_key` is given), its entries must chain, and each segment must
    continue the one before. The first segment may start after seq 1 (evidence kept only
    from some point on). Raises `SpoolCorrupt` at the first problem. A segment without a
    seal (an interrupted seal) is skipped with a warning.
    """
    directory = Path(evidence_dir)
    seals: list[Seal] = []
    for path in directory.iterdir():
        if _SEGMENT_NAME.match(path.name) is None:
            continue
        seal_path = directory / (path.name + _SEAL_SUFFIX)
        if not seal_path.exists():
            logger.warning("evidence segment %s has no seal; skipping it", path.name)
            continue
        seals.append(_load_seal(seal_path))
    for seal_path in directory.glob("segment-*.log" + _SEAL_SUFFIX):
        if not (directory / seal_path.name.removesuffix(_SEAL_SUFFIX)).exists():
            raise SpoolCorrupt(f"{seal_path.name} has no segment file")
    seals.sort(key=lambda s: s.first_seq)

    previous: tuple[int, bytes] | None = None
    for seal in seals:
        path = directory / seal.segment
        name = seal.segment
        if seal.chain_name != chain_name:
            raise SpoolCorrupt(f"{name} belongs to chain {seal.chain_name!r}")
        if public_key is not None:
            checkpoint = seal.checkpoint()
            if checkpoint is None or not checkpoint.verify(public_key):
                raise SpoolCorrupt(f"{name}: the seal's signature does not verify")
        data = path.read_bytes()
        if len(data) != seal.size or hashlib.sha256(data).hexdigest() != seal.sha256:
            raise SpoolCorrupt(f"{name} does not match its seal's sha256")
        if _decode_segment_header(data) != (seal.first_seq, seal.prev_hash):
            raise SpoolCorrupt(f"{name}: header does not match its seal")
        if previous is not None and previous != (seal.first_seq - 1, seal.prev_hash):
            raise SpoolCorrupt(
                f"{name} does not continue the evidence before it (seq {previous[0]}): "
                "a segment is missing"
            )
        seq, head = seal.first_seq - 1, seal.prev_hash
        try:
            for link, _ in _walk_segment(data, seal.first_seq, seal.prev_hash, name):
                seq, head = link.seq, link.hash
                yield link
        except _BadFrame as exc:
            raise SpoolCorrupt(f"{name} offset {exc.offset}: {exc.reason}") from None
        if (seq, head) != (seal.last_seq, seal.last_hash):
            raise SpoolCorrupt(f"{name} does not end where its seal says")
        previous = (seq, head)


def iter_spool_segments(directory: str | os.PathLike[str]) -> Iterator[ChainLink]:
    """Every durable entry still in a spool directory, read-only (safe beside a running proxy).

    A frame being written at this moment looks torn; reading stops there. Entries are checked
    against their checksums and the chain, as on open; `SpoolCorrupt` where they are not.
    """
    base = Path(directory)
    named = sorted(
        (int(m.group(1)), base / m.group(0))
        for m in (_SEGMENT_NAME.match(p.name) for p in base.iterdir())
        if m is not None
    )
    for name_seq, path in named:
        data = path.read_bytes()
        header = _decode_segment_header(data[: SEGMENT_HEADER_SIZE + 1])
        if header is None:
            return  # a segment whose header is still being written
        first_seq, prev_hash = header
        if first_seq != name_seq:
            raise SpoolCorrupt(f"{path.name} says its first seq is {first_seq}")
        try:
            for link, _ in _walk_segment(data, first_seq, prev_hash, path.name):
                yield link
        except _BadFrame:
            return


class SpoolTail:
    """Reads the durable entries of a spool that another process writes (the index worker).

    The writer tells the reader how far the spool is durable (`through`): frames past it may
    be half-written or rolled back after a failed fsync, so they are never read. Reading keeps
    its place between calls, so following a growing spool costs only the new bytes.
    """

    def __init__(self, directory: str | os.PathLike[str], *, chunk_bytes: int = MiB) -> None:
        self._dir = Path(directory)
        self._chunk = chunk_bytes
        self._hint: _ReadHint | None = None

    def _segments(self) -> list[tuple[int, Path]]:
        return sorted(
            (int(m.group(1)), self._dir / m.group(0))
            for m in (_SEGMENT_NAME.match(name) for name in os.listdir(self._dir))
            if m is not None
        )

    def read(self, seq: int, max_entries: int, through: int) -> list[ChainLink]:
        """Entries from `seq` to at most `through`, at most `max_entries`, chain-checked.

        Raises ValueError when `seq` was sealed out of the spool, `SpoolCorrupt` when a
        durable entry is damaged or missing.
        """
        if seq < 1 or max_entries < 1:
            raise ValueError("seq and max_entries must be positive")
        last = min(through, seq + max_entries - 1)
        if seq > last:
            return []
        out: list[ChainLink] = []
        hint = self._hint
        if hint is not None and hint.seq == seq and hint.path.exists():
            path, expected, offset, prev = hint.path, hint.seq, hint.offset, hint.prev_hash
            segments = self._segments()
            index = next((i for i, (_, p) in enumerate(segments) if p == path), -1)
        else:
            segments = self._segments()
            index = bisect.bisect_right([first for first, _ in segments], seq) - 1
            if index < 0:
                raise ValueError(f"entry {seq} was sealed out of the spool")
            path = segments[index][1]
            header = self._header(path)
            expected, prev = header
            offset = SEGMENT_HEADER_SIZE
        while True:
            offset, expected, prev = self._read_segment(
                path, offset, expected, prev, seq, last, out
            )
            if expected > last:
                break
            index += 1
            if index <= 0 or index >= len(segments):
                break
            path = segments[index][1]
            first_seq, header_prev = self._header(path)
            if first_seq != expected or header_prev != prev:
                raise SpoolCorrupt(f"{path.name} does not continue the chain of the one before")
            offset = SEGMENT_HEADER_SIZE
        if out and out[-1].seq < last:
            raise SpoolCorrupt(f"durable entries {out[-1].seq + 1}..{last} are missing")
        if not out:
            raise SpoolCorrupt(f"durable entry {seq} is missing")
        self._hint = _ReadHint(path, expected, offset, prev)
        return out

    @staticmethod
    def _header(path: Path) -> tuple[int, bytes]:
        try:
            with path.open("rb") as f:
                header = _decode_segment_header(f.read(SEGMENT_HEADER_SIZE))
        except FileNotFoundError:
            raise ValueError(f"{path.name} was sealed out of the spool meanwhile") from None
        if header is None:
            raise SpoolCorrupt(f"{path.name} has no valid header")
        return header

    def _read_segment(
        self,
        path: Path,
        offset: int,
        expected: int,
        prev: bytes,
        want_from: int,
        last: int,
        out: list[ChainLink],
    ) -> tuple[int, int, bytes]:
        with _open_unsealed(path) as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            buf = b""
            base = offset  # file offset of buf[0]
            pos = 0
            while expected <= last and base + pos < size:
                if len(buf) - pos < _FRAME_HEAD.size:
                    buf = buf[pos:] + f.read(self._chunk)
                    base, pos = base + pos, 0
                    if len(buf) < _FRAME_HEAD.size:
                        break
                length = _FRAME_HEAD.unpack_from(buf, pos)[2]
                need = _FRAME_HEAD.size + min(length, _BODY_HEAD.size + MAX_PAYLOAD_BYTES)
                if len(buf) - pos < need:
                    buf = buf[pos:] + f.read(max(self._chunk, need))
                    base, pos = base + pos, 0
                try:
                    link, next_pos = _decode_frame(buf, pos, len(buf))
                except _BadFrame as exc:
                    raise SpoolCorrupt(f"{path.name} offset {base + pos}: {exc.reason}") from None
                wanted = link.seq >= want_from
                problem = _chain_problem(link, expected, prev, check_hash=wanted)
                if problem is not None:
                    raise SpoolCorrupt(f"{path.name} offset {base + pos}: {problem}")
                if wanted:
                    out.append(link)
                pos = next_pos
                expected += 1
                prev = link.hash
            return base + pos, expected, prev
