"""Fetching files shared by HTTP File Upload (XEP-0363) into the archive, in the background.

The pipeline hands over every attachment of a newly spooled record (`submit`, which never
waits: a bounded queue, and when it is full the attachment is skipped and counted). Only URLs
whose host is one of the configured upload services are taken; nothing is ever requested
from any other host:

- a host matches exactly (`upload.example` on any port, or `upload.example:5281` on that
  port only), case-insensitively; no suffix or wildcard matching;
- https only (`aesgcm://`, XEP-0454, is fetched over https and stored as the ciphertext it
  is); plain http only when `allow_http` is on (development);
- redirects are never followed by the HTTP client: each `Location` is checked against the
  same rule and followed by hand (at most `_MAX_REDIRECTS`), a redirect elsewhere fails;
- the client ignores proxy variables and .netrc from the environment (`trust_env=False`),
  so it cannot be steered through another host.

A download streams to a temporary file under `<directory>/tmp` while it is hashed, stops at
`max_bytes` (a larger `Content-Length` is refused before reading), and the whole attempt is
bounded by `timeout` seconds (connecting by `connect_timeout`). The file is then fsync'd and
linked into place under `<directory>/sha256/ab/cd/<sha256>` (content-addressed: the same file
twice is stored once, and an existing file is never overwritten).

Each attempt, ok or failed, becomes an ATTACHMENT spool entry (the record itself is immutable
in the hash chain), so the archive shows the digest and size of what it holds and every
failure. Transient failures (timeouts, connection errors, 5xx, 408, 425, 429, a full disk)
are retried with exponential backoff, up to `retries` more attempts; the others (refused
scheme or redirect, too large, other 4xx) are final.

What is queued or waiting for a retry lives in memory: a restart forgets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client import Counter

from archive_api.store.records import (
    Attachment,
    AttachmentFetch,
    EntryOp,
    FetchStatus,
    SpoolEntry,
)
from classifier.clock import Clock
from proxy.errors import SpoolUnavailable

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024

FETCHES = Counter(
    "stanzaguard_attachment_fetches", "Attachment fetch attempts, by result", ["result"]
)

_MAX_REDIRECTS: Final = 3
_FLUSH_BYTES: Final = 1 * MiB  # write (and hash) in the thread pool in pieces of this size
_MAX_ERROR_CHARS: Final = 300
_MAX_MEDIA_TYPE_CHARS: Final = 200
_RETRYABLE_STATUS: Final = frozenset({408, 425, 429})
_RECORD_TRIES: Final = 5  # spool appends of one result before giving up on it
_USER_AGENT: Final = "StanzaGuard-archiver"


class SpoolWriter(Protocol):
    async def append(self, payloads: Sequence[bytes]) -> object: ...


@dataclass(frozen=True, slots=True)
class FetcherConfig:
    directory: Path  # DATA_DIR/attachments
    upload_hosts: frozenset[str]  # lower-case `host` or `host:port`
    max_bytes: int = 100 * MiB
    timeout: float = 60.0  # one whole attempt: connect, redirects, headers and body
    connect_timeout: float = 10.0
    retries: int = 3  # further attempts after a transient failure
    retry_delay: float = 30.0  # before the first retry; doubles each time
    max_retry_delay: float = 3600.0
    allow_http: bool = False  # development only
    queue_size: int = 10_000
    workers: int = 2
    fsync: bool = True
    tls: ssl.SSLContext | None = None  # None: the system's trusted CAs


def content_path(directory: Path, sha256: str) -> Path:
    """Where the file with this (lower-case hex) digest is stored under `directory`."""
    return directory / "sha256" / sha256[:2] / sha256[2:4] / sha256


def host_allowed(url: str, upload_hosts: frozenset[str]) -> bool:
    """Whether the URL's host (and port) is exactly one of the upload services."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return False
    if not host:
        return False
    if host in upload_hosts:
        return True
    if port is None:
        return False
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" in upload_hosts


class _Failed(Exception):
    def __init__(self, error: str, *, retry: bool) -> None:
        super().__init__(error)
        self.error = error[:_MAX_ERROR_CHARS]
        self.retry = retry


@dataclass(frozen=True, slots=True)
class _Stored:
    sha256: str
    size: int
    media_type: str | None


@dataclass(frozen=True, slots=True)
class _Job:
    record_id: str
    url: str
    attempt: int = 1

    @property
    def key(self) -> tuple[str, str]:
        return self.record_id, self.url


@dataclass(slots=True)
class FetcherStats:
    queued: int = 0
    stored: int = 0  # successful fetches (whether or not the content was new)
    failed: int = 0  # failed attempts, retried or not
    dropped: int = 0  # not queued (queue full) or not recorded (spool down)
    deduplicated: int = 0  # successful fetches whose content was already stored
    retried: int = 0  # retries scheduled


class AttachmentFetcher:
    """Downloads upload-service attachments of archived records; see the module docstring."""

    def __init__(
        self,
        config: FetcherConfig,
        *,
        spool: SpoolWriter,
        clock: Clock,
        on_spooled: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.clock = clock
        self.on_spooled = on_spooled
        self.stats = FetcherStats()
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=config.queue_size)
        self._pending: set[tuple[str, str]] = set()  # queued, in flight or waiting to retry
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    # -- lifecycle --

    async def start(self) -> None:
        config = self.config
        tmp = config.directory / "tmp"
        await asyncio.to_thread(_prepare_directory, config.directory, tmp)
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            verify=config.tls if config.tls is not None else ssl.create_default_context(),
            timeout=httpx.Timeout(config.timeout, connect=config.connect_timeout),
            limits=httpx.Limits(
                max_connections=config.workers, max_keepalive_connections=config.workers
            ),
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
        )
        self._workers = [
            asyncio.create_task(self._work(), name=f"attachment-fetcher-{i}")
            for i in range(config.workers)
        ]

    async def stop(self) -> None:
        """Cancel what is queued, waiting and in flight (its partial files are removed)."""
        for handle in self._timers.values():
            handle.cancel()
        forgotten = len(self._pending)
        self._timers.clear()
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if forgotten:
            log.warning("attachment fetches abandoned at shutdown", extra={"count": forgotten})
        self._pending.clear()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Until nothing is queued, in flight or waiting for a retry (for tests, shutdown)."""
        await self._idle.wait()

    # -- intake --

    def wants(self, url: str) -> bool:
        """Whether `url` is a file on one of the upload services (any scheme we could fetch)."""
        scheme = url.partition(":")[0].lower()
        return scheme in ("https", "http", "aesgcm") and host_allowed(url, self.config.upload_hosts)

    def submit(self, record_id: str, attachment: Attachment) -> bool:
        """Queue the attachment's file for fetching; never waits. True when it was queued."""
        url = attachment.url
        if not self.wants(url) or not self._workers:
            return False
        job = _Job(record_id, url)
        if job.key in self._pending:
            return False
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            FETCHES.labels("dropped").inc()
            log.warning("attachment queue full: not fetching", extra={"record_id": record_id})
            return False
        self._pending.add(job.key)
        self._idle.clear()
        self.stats.queued += 1
        return True

    # -- the workers --

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._attempt(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("attachment fetch crashed", extra={"record_id": job.record_id})
                self._done(job)
            finally:
                self._queue.task_done()

    async def _attempt(self, job: _Job) -> None:
        try:
            stored = await self._fetch(job.url)
        except _Failed as failure:
            self.stats.failed += 1
            FETCHES.labels("failed").inc()
            final = not failure.retry or job.attempt > self.config.retries
            log.warning(
                "attachment fetch failed",
                extra={
                    "record_id": job.record_id,
                    "attempt": job.attempt,
                    "error": failure.error,
                    "final": final,
                },
            )
            fetch = AttachmentFetch(job.url, FetchStatus.FAILED, job.attempt, error=failure.error)
            await self._record(job, fetch)
            if final:
                self._done(job)
            else:
                self._retry_later(job)
            return
        self.stats.stored += 1
        FETCHES.labels("ok").inc()
        fetch = AttachmentFetch(
            job.url, FetchStatus.OK, job.attempt, stored.sha256, stored.size, stored.media_type
        )
        await self._record(job, fetch)
        self._done(job)

    def _done(self, job: _Job) -> None:
        self._pending.discard(job.key)
        if not self._pending:
            self._idle.set()

    def _retry_later(self, job: _Job) -> None:
        config = self.config
        delay = min(config.retry_delay * 2 ** (job.attempt - 1), config.max_retry_delay)
        self.stats.retried += 1
        again = _Job(job.record_id, job.url, job.attempt + 1)
        loop = asyncio.get_running_loop()
        self._timers[job.key] = loop.call_later(delay, self._requeue, again)

    def _requeue(self, job: _Job) -> None:
        self._timers.pop(job.key, None)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            FETCHES.labels("dropped").inc()
            log.warning("attachment queue full: retry skipped", extra={"record_id": job.record_id})
            self._done(job)

    async def _record(self, job: _Job, fetch: AttachmentFetch) -> None:
        entry = SpoolEntry(EntryOp.ATTACHMENT, job.record_id, at=self.clock.now(), fetch=fetch)
        payload = entry.payload()
        for attempt in range(_RECORD_TRIES):
            try:
                await self.spool.append([payload])
            except SpoolUnavailable as exc:
                log.error(
                    "spool unavailable: attachment fetch result not recorded yet",
                    extra={"record_id": job.record_id, "error": str(exc)},
                )
                await asyncio.sleep(min(2.0**attempt, 30.0))
                continue
            if self.on_spooled is not None:
                self.on_spooled()
            return
        self.stats.dropped += 1
        FETCHES.labels("dropped").inc()

    # -- one download --

    def _request_url(self, url: str) -> str:
        """The URL to request, or _Failed when it must not be requested."""
        try:
            parts = urlsplit(url)
        except ValueError:
            raise _Failed("malformed URL", retry=False) from None
        scheme = parts.scheme.lower()
        if not host_allowed(url, self.config.upload_hosts):
            raise _Failed(f"host not allowed: {parts.netloc[:100]!r}", retry=False)
        if scheme == "aesgcm":
            scheme = "https"
        elif scheme == "http":
            if not self.config.allow_http:
                raise _Failed("plain http refused (attachment_allow_http is off)", retry=False)
        elif scheme != "https":
            raise _Failed(f"scheme not allowed: {scheme[:20]!r}", retry=False)
        if parts.username is not None or parts.password is not None:
            raise _Failed("credentials in the URL refused", retry=False)
        return urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))

    async def _fetch(self, url: str) -> _Stored:
        client = self._client
        assert client is not None, "start() first"
        timeout = self.config.timeout
        try:
            async with asyncio.timeout(timeout):
                current = url
                for _ in range(_MAX_REDIRECTS + 1):
                    target = self._request_url(current)
                    async with client.stream("GET", target) as response:
                        if response.is_redirect:
                            location = response.headers.get("location")
                            if not location:
                                raise _Failed("redirect without a Location", retry=False)
                            current = str(response.url.join(location))
                            if not host_allowed(current, self.config.upload_hosts):
                                raise _Failed("redirect to another host refused", retry=False)
                            continue
                        return await self._receive(response)
                raise _Failed("too many redirects", retry=False)
        except TimeoutError:
            raise _Failed(f"timed out after {timeout:g} s", retry=True) from None
        except httpx.TimeoutException as exc:
            raise _Failed(f"timed out ({type(exc).__name__})", retry=True) from None
        except httpx.HTTPError as exc:
            raise _Failed(f"{type(exc).__name__}: {exc}", retry=True) from None
        except OSError as exc:  # writing the file: disk full, permissions
            raise _Failed(f"cannot store: {exc.strerror or exc}", retry=True) from None

    async def _receive(self, response: httpx.Response) -> _Stored:
        code = response.status_code
        if code != 200:
            retry = code >= 500 or code in _RETRYABLE_STATUS
            raise _Failed(f"HTTP {code}", retry=retry)
        limit = self.config.max_bytes
        declared = response.headers.get("content-length", "")
        encoded = "content-encoding" in response.headers
        if declared.isdigit() and int(declared) > limit and not encoded:
            raise _Failed(f"too large: {declared} bytes (limit {limit})", retry=False)
        media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        loop = asyncio.get_running_loop()
        fd, name = tempfile.mkstemp(dir=self.config.directory / "tmp", prefix="fetch-")
        tmp = Path(name)
        digest = hashlib.sha256()
        size, new = 0, False
        # The file work runs in the thread pool. A cancelled download (timeout, shutdown)
        # must not close the descriptor under a write still running there, so each step is
        # shielded and the clean-up waits for the last one.
        work: asyncio.Future[object] | None = None
        try:
            buffer = bytearray()
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise _Failed(f"too large: over {limit} bytes", retry=False)
                buffer += chunk
                if len(buffer) >= _FLUSH_BYTES:
                    work = loop.run_in_executor(None, _write, fd, digest, bytes(buffer))
                    buffer = bytearray()
                    await asyncio.shield(work)
            work = loop.run_in_executor(None, _finish, fd, digest, bytes(buffer), self.config.fsync)
            await asyncio.shield(work)
            sha256 = digest.hexdigest()
            final = content_path(self.config.directory, sha256)
            work = loop.run_in_executor(None, _place, tmp, final, self.config.fsync)
            new = bool(await asyncio.shield(work))
        finally:
            if work is not None and not work.done():
                work.add_done_callback(lambda _: _discard(fd, tmp))
            else:
                _discard(fd, tmp)
        if not new:
            self.stats.deduplicated += 1
        return _Stored(sha256, size, media_type[:_MAX_MEDIA_TYPE_CHARS] or None)


# --- file work, in the thread pool ---------------------------------------------------------


def _prepare_directory(directory: Path, tmp: Path) -> None:
    (directory / "sha256").mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    for leftover in tmp.glob("fetch-*"):  # partial downloads of a crashed run
        with contextlib.suppress(OSError):
            leftover.unlink()


def _discard(fd: int, tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        tmp.unlink()


def _write(fd: int, digest: hashlib._Hash, data: bytes) -> None:
    digest.update(data)
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _finish(fd: int, digest: hashlib._Hash, data: bytes, fsync: bool) -> None:
    if data:
        _write(fd, digest, data)
    os.fchmod(fd, 0o440)  # the archived copy is read-only
    if fsync:
        os.fsync(fd)


def _place(tmp: Path, final: Path, fsync: bool) -> bool:
    """Link the finished temporary file at its content address; False when already there."""
    if final.exists():
        return False
    created = [p for p in (final.parent.parent, final.parent) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(tmp, final)  # never replaces: an existing file with this digest stays
    except FileExistsError:
        return False
    if fsync:
        for directory in {final.parent, *(p.parent for p in created)}:
            _fsync_dir(directory)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
