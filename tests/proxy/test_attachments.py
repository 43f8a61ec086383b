"""Attachment fetching against real HTTP servers on loopback, into a real spool and store.

The "upload service" is an `http.server` on 127.0.0.1; the "other host" one on 127.0.0.2,
which must never see a request. Results travel the real way: ATTACHMENT entries in a Spool,
indexed by the Indexer into a SqliteStore, merged into the record that `get()` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from archive_api.store.records import (
    ArchiveRecord,
    Attachment,
    AttachmentFetch,
    Direction,
    EntryOp,
    FetchStatus,
    RecordKind,
    SpoolEntry,
)
from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from classifier.context import DecisionContext
from classifier.verdict import ALLOW, Verdict
from proxy.attachments import AttachmentFetcher, FetcherConfig, content_path, host_allowed
from proxy.hook import SessionInfo
from proxy.indexer import Indexer
from proxy.pipeline import Pipeline, PipelineConfig
from proxy.spool import Spool
from proxy.stream import Element, Framer
from stanzaguard.errors import SettingsError
from stanzaguard.settings import Settings
from stanzaguard.wiring import build_fetcher_config

LIMIT = 64 * 1024
PDF = b"%PDF-1.7 quarterly numbers " * 100
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20


# --- the HTTP servers ------------------------------------------------------------------------


class FileServer:
    """A tiny upload service: files by path, plus misbehaving paths. Records every request."""

    def __init__(self, host: str) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.failures: dict[str, tuple[int, int]] = {}  # path -> (status, how many times)
        self.requests: list[str] = []
        self.release = threading.Event()  # lets stalled responses finish at teardown
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    server.answer(self)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        path = parts.path
        status, times = self.failures.get(path, (0, 0))
        if times:
            self.failures[path] = (status, times - 1)
            self.send(h, status, b"try again later")
        elif path in self.files:
            content, media_type = self.files[path]
            self.send(h, 200, content, media_type)
        elif path == "/redirect":
            h.send_response(302)
            h.send_header("Location", parse_qs(parts.query)["to"][0])
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif path == "/huge-declared":
            h.send_response(200)
            h.send_header("Content-Length", str(LIMIT + 1))
            h.send_header("Connection", "close")
            h.end_headers()
        elif path == "/huge-streamed":  # no Content-Length: the limit must be counted
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            for _ in range(LIMIT // 1024 + 50):
                h.wfile.write(b"x" * 1024)
        elif path == "/stall":  # headers and a little body, then nothing
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            h.wfile.write(b"partial")
            h.wfile.flush()
            self.release.wait(30)
        else:
            self.send(h, 404, b"no such file")

    @staticmethod
    def send(
        h: BaseHTTPRequestHandler, status: int, body: bytes, media: str = "text/plain"
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", media)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def upload() -> Iterator[FileServer]:
    server = FileServer("127.0.0.1")
    server.files["/f/report.pdf"] = (PDF, "application/pdf; charset=binary")
    server.files["/f/photo.png"] = (PNG, "image/png")
    server.files["/f/again.pdf"] = (PDF, "application/pdf")
    yield server
    server.close()


@pytest.fixture
def other() -> Iterator[FileServer]:
    """A server on another host: it must never be asked for anything."""
    server = FileServer("127.0.0.2")
    server.files["/f/report.pdf"] = (PDF, "application/pdf")
    yield server
    server.close()


# --- the archive ------------------------------------------------------------------------------


T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


@dataclass
class Archive:
    directory: Path
    spool: Spool
    store: SqliteStore
    indexer: Indexer
    fetcher: AttachmentFetcher

    async def settle(self) -> None:
        await self.fetcher.wait_idle()
        await self.indexer.drain()

    async def archive(self, rec: ArchiveRecord) -> None:
        """Spool and index a record, then hand its attachments over as the pipeline does."""
        await self.spool.append([SpoolEntry(EntryOp.RECORD, rec.record_id, rec).payload()])
        for attachment in rec.attachments:
            self.fetcher.submit(rec.record_id, attachment)

    async def fetches(self, record_id: str) -> list[AttachmentFetch]:
        out = []
        async for link in self.store.chain_links():
            entry = SpoolEntry.from_payload(link.payload)
            if entry.op is EntryOp.ATTACHMENT and entry.record_id == record_id:
                assert entry.fetch is not None and entry.at == T0
                out.append(entry.fetch)
        return out

    def stored_files(self) -> list[Path]:
        return sorted(p for p in (self.directory / "sha256").rglob("*") if p.is_file())

    def leftovers(self) -> list[Path]:
        return list((self.directory / "tmp").iterdir())


ArchiveFactory = Callable[..., Awaitable[Archive]]


@pytest.fixture
async def make_archive(tmp_path: Path, upload: FileServer) -> AsyncIterator[ArchiveFactory]:
    opened: list[Archive] = []

    async def factory(**overrides: Any) -> Archive:
        clock = ManualClock(T0)
        base = tmp_path / f"data-{len(opened)}"
        spool = await Spool.open(base / "spool", clock=clock)
        store = await SqliteStore.open(base / "archive.sqlite3")
        indexer = Indexer(spool, store, seal=False)
        settings: dict[str, Any] = {
            "directory": base / "attachments",
            "upload_hosts": frozenset({"127.0.0.1"}),
            "max_bytes": LIMIT,
            "timeout": 5.0,
            "connect_timeout": 2.0,
            "retries": 2,
            "retry_delay": 0.01,
            "allow_http": True,
            **overrides,
        }
        fetcher = AttachmentFetcher(
            FetcherConfig(**settings), spool=spool, clock=clock, on_spooled=indexer.notify
        )
        await fetcher.start()
        archive = Archive(base / "attachments", spool, store, indexer, fetcher)
        opened.append(archive)
        return archive

    yield factory
    for archive in opened:
        await archive.fetcher.stop()
        await archive.spool.close()
        await archive.store.close()


def message(record_id: str, *urls: str) -> ArchiveRecord:
    return ArchiveRecord(
        record_id=record_id,
        kind=RecordKind.MESSAGE,
        occurred_at=T0,
        direction=Direction.FROM_CLIENT,
        sender="alice@corp.example",
        sender_full="alice@corp.example/phone",
        recipient="bob@partner.example",
        stanza_type="chat",
        body=" ".join(urls),
        attachments=tuple(Attachment(url, "upload") for url in urls),
    )


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded by the test timeout) until the condition holds."""
    while not condition():
        await asyncio.sleep(0.01)


# --- through the pipeline --------------------------------------------------------------------


class AllowAll:
    def evaluate(self, ctx: DecisionContext) -> Verdict:
        return ALLOW


def stanza(xml: str) -> Element:
    header = (
        "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
        "to='corp.example'>"
    )
    frames = Framer().feed((header + xml).encode())
    element = frames[-1]
    assert isinstance(element, Element)
    return element


async def test_a_shared_file_is_fetched_stored_and_archived(
    make_archive: ArchiveFactory, upload: FileServer, other: FileServer
) -> None:
    archive = await make_archive()
    pipeline = Pipeline(
        PipelineConfig(local_domains=frozenset({"corp.example"}), upload_hosts=frozenset()),
        decider=AllowAll(),
        spool=archive.spool,
        clock=ManualClock(T0),
        attachments=archive.fetcher,
    )
    session = SessionInfo("s1", "192.0.2.1", "corp.example", "alice@corp.example/phone")
    file_url = upload.url("/f/report.pdf")
    foreign = other.url("/f/report.pdf")
    element = stanza(
        f"<message to='bob@partner.example' type='chat' id='m1'><body>{file_url}</body>"
        f"<x xmlns='jabber:x:oob'><url>{file_url}</url></x>"
        f"<x xmlns='jabber:x:oob'><url>{foreign}</url></x></message>"
    )
    decisions = await pipeline.process(session, Direction.FROM_CLIENT, [element])
    assert [d.kind.value for d in decisions] == ["pass"]
    await archive.settle()

    (found,) = (await archive.store.search("has:attachment")).hits
    rec = found.record
    by_url = {a.url: a for a in rec.attachments}
    digest = hashlib.sha256(PDF).hexdigest()
    assert by_url[file_url].sha256 == digest and by_url[file_url].size == len(PDF)
    assert by_url[file_url].media_type == "application/pdf"
    assert by_url[foreign].sha256 is None and by_url[foreign].size is None
    assert await archive.store.get(rec.record_id) == rec

    path = content_path(archive.directory, digest)
    assert path == archive.directory / "sha256" / digest[:2] / digest[2:4] / digest
    assert path.read_bytes() == PDF
    assert not stat.S_IMODE(path.stat().st_mode) & 0o222  # stored read-only
    assert archive.stored_files() == [path] and archive.leftovers() == []
    (fetch,) = await archive.fetches(rec.record_id)
    assert fetch == AttachmentFetch(
        file_url, FetchStatus.OK, 1, digest, len(PDF), "application/pdf"
    )
    assert upload.requests == ["/f/report.pdf"]
    assert other.requests == []
    report = await archive.store.verify()
    assert report.ok, report.problems


# --- only the named upload hosts --------------------------------------------------------------


def test_host_matching_is_exact() -> None:
    hosts = frozenset({"upload.corp.example", "files.corp.example:5281", "[::1]:8443"})
    assert host_allowed("https://upload.corp.example/a", hosts)
    assert host_allowed("https://UPLOAD.corp.example:5281/a", hosts)
    assert host_allowed("https://files.corp.example:5281/a", hosts)
    assert host_allowed("https://[::1]:8443/a", hosts)
    assert not host_allowed("https://files.corp.example/a", hosts)
    assert not host_allowed("https://files.corp.example:443/a", hosts)
    assert not host_allowed("https://evil.upload.corp.example/a", hosts)
    assert not host_allowed("https://upload.corp.example.evil.example/a", hosts)
    assert not host_allowed("https://upload.corp.example@evil.example/a", hosts)
    assert not host_allowed("https://evil.example/upload.corp.example", hosts)
    assert not host_allowed("https://upload.corp.example:99999/a", hosts)
    assert not host_allowed("https:///a", hosts)


async def test_other_hosts_are_never_requested(
    make_archive: ArchiveFactory, upload: FileServer, other: FileServer
) -> None:
    second = FileServer("127.0.0.1")  # the right host name but not the named port
    second.files["/f/report.pdf"] = (PDF, "application/pdf")
    try:
        archive = await make_archive(upload_hosts=frozenset({f"127.0.0.1:{upload.port}"}))
        fetcher = archive.fetcher
        not_ours = [
            other.url("/f/report.pdf"),
            second.url("/f/report.pdf"),
            f"http://127.0.0.1:{upload.port}@127.0.0.2:{other.port}/f/report.pdf",
            f"ftp://127.0.0.1:{upload.port}/f/report.pdf",
        ]
        for url in not_ours:
            assert not fetcher.submit("r0", Attachment(url, "oob")), url
        # An upload URL that redirects elsewhere: refused, recorded, not retried.
        escape = upload.url(f"/redirect?to={other.url('/f/report.pdf')}")
        await archive.archive(message("r1", escape))
        await archive.settle()
    finally:
        second.close()
    (fetch,) = await archive.fetches("r1")
    assert fetch.status is FetchStatus.FAILED and fetch.attempt == 1
    assert fetch.error is not None and "redirect" in fetch.error
    assert other.requests == [] and second.requests == []
    assert upload.requests == [urlsplit(escape).path + "?" + urlsplit(escape).query]
    got = await archive.store.get("r1")
    assert got is not None and got.attachments[0].sha256 is None


async def test_redirects_on_the_upload_host_are_followed(
    make_archive: ArchiveFactory, upload: FileServer
) -> None:
    archive = await make_archive()
    await archive.archive(message("r1", upload.url(f"/redirect?to={upload.url('/f/photo.png')}")))
    await archive.settle()
    (fetch,) = await archive.fetches("r1")
    assert fetch.status is FetchStatus.OK and fetch.sha256 == hashlib.sha256(PNG).hexdigest()
    assert upload.requests[-1] == "/f/photo.png"


async def test_plain_http_is_refused_unless_allowed(
    make_archive: ArchiveFactory, upload: FileServer
) -> None:
    archive = await make_archive(allow_http=False)
    await archive.archive(message("r1", upload.url("/f/report.pdf")))
    await archive.settle()
    (fetch,) = await archive.fetches("r1")
    assert fetch.status is FetchStatus.FAILED and fetch.error is not None
    assert "http" in fetch.error and fetch.attempt == 1
    assert upload.requests == []


# --- limits and failures -------------------------------------------------------------------


async def test_too_large_files_fail_without_retry(
    make_archive: ArchiveFactory, upload: FileServer
) -> None:
    archive = await make_archive()
    await archive.archive(message("r1", upload.url("/huge-declared")))
    await archive.archive(message("r2", upload.url("/huge-streamed")))
    await archive.settle()
    for rid in ("r1", "r2"):
        (fetch,) = await archive.fetches(rid)
        assert fetch.status is FetchStatus.FAILED and fetch.attempt == 1
        assert fetch.error is not None and "too large" in fetch.error
    assert archive.stored_files() == [] and archive.leftovers() == []


async def test_a_stalling_response_times_out_and_is_recorded(
    make_archive: ArchiveFactory, upload: FileServer
) -> None:
    archive = await make_archive(timeout=0.5, retries=1)
    await archive.archive(message("r1", upload.url("/stall")))
    await archive.settle()
    fetches = await archive.fetches("r1")
    assert [(f.status, f.attempt) for f in fetches] == [
        (FetchStatus.FAILED, 1),
        (FetchStatus.FAILED, 2),
    ]
    assert all(f.error is not None and "timed out" in f.error for f in fetches)
    assert upload.requests == ["/stall", "/stall"]
    assert archive.stored_files() == [] and archive.leftovers() == []


async def test_a_server_error_is_retried_until_the_file_comes(
    make_archive: ArchiveFactory, upload: FileServer
) -> None:
    archive = await make_archive()
    upload.failures["/f/report.pdf"] = (500, 1)
    await archive.archive(message("r1", upload.url("/f/report.pdf")))
    await archive.settle()
    first, second = await archive.fetches("r1")
    assert (first.status, first.attempt, first.error) == (FetchStatus.FAILED, 1, "HTTP 500")
    assert (second.status, second.attempt) == (FetchStatus.OK, 2)
    got = await archive.store.get("r1")
    assert got is not None and got.attachments[0].sha256 == hashlib.sha256(PDF).hexdigest()
    assert upload.requests == ["/f/report.pdf", "/f/report.pdf"]
    assert (await archive.store.verify()).ok


async def test_retries_stop_at_the_limit_and_client_errors_are_final(
    make_archive: ArchiveFactory, upload: FileServer
) -> None:
    archive = await make_archive(retries=2)
    upload.failures["/f/photo.png"] = (503, 10)
    await archive.archive(message("r1", upload.url("/f/photo.png")))
    await archive.archive(message("r2", upload.url("/f/gone.pdf")))
    await archive.settle()
    assert [(f.attempt, f.error) for f in await archive.fetches("r1")] == [
        (1, "HTTP 503"),
        (2, "HTTP 503"),
        (3, "HTTP 503"),
    ]
    assert [(f.attempt, f.error) for f in await archive.fetches("r2")] == [(1, "HTTP 404")]
    assert archive.fetcher.stats.retried == 2


async def test_the_same_file_twice_is_stored_once(
    make_archive: ArchiveFactory, upload: FileServer
) -> None:
    archive = await make_archive()
    await archive.archive(message("r1", upload.url("/f/report.pdf")))
    await archive.archive(message("r2", upload.url("/f/again.pdf"), upload.url("/f/photo.png")))
    await archive.settle()
    pdf, png = hashlib.sha256(PDF).hexdigest(), hashlib.sha256(PNG).hexdigest()
    r1, r2 = await archive.store.get("r1"), await archive.store.get("r2")
    assert r1 is not None and r2 is not None
    assert [a.sha256 for a in r1.attachments] == [pdf]
    assert [a.sha256 for a in r2.attachments] == [pdf, png]
    assert archive.stored_files() == sorted(
        [content_path(archive.directory, pdf), content_path(archive.directory, png)]
    )
    assert archive.fetcher.stats.deduplicated == 1
    assert archive.leftovers() == []


async def test_submitting_never_waits(make_archive: ArchiveFactory, upload: FileServer) -> None:
    archive = await make_archive(queue_size=2)
    fetcher = archive.fetcher
    file = Attachment(upload.url("/f/report.pdf"), "upload")
    # No await in between: the workers cannot take anything off the queue meanwhile.
    assert fetcher.submit("r1", file)
    assert not fetcher.submit("r1", file)  # already pending
    assert fetcher.submit("r2", file)
    assert not fetcher.submit("r3", file)  # queue full: skipped and counted
    assert fetcher.stats.dropped == 1
    await archive.settle()


async def test_stopping_abandons_a_download_and_its_partial_file(
    make_archive: ArchiveFactory, upload: FileServer
) -> None:
    archive = await make_archive(timeout=60.0)
    await archive.archive(message("r1", upload.url("/stall")))
    await until(lambda: upload.requests == ["/stall"])
    await until(lambda: archive.leftovers() != [])  # the partial download is on disk
    await archive.fetcher.stop()
    await until(lambda: archive.leftovers() == [])
    assert archive.stored_files() == []
    assert archive.fetcher.submit("r2", Attachment(upload.url("/f/photo.png"), "upload")) is False


async def test_leftover_partial_files_are_removed_at_start(
    make_archive: ArchiveFactory, tmp_path: Path
) -> None:
    directory = tmp_path / "data-0" / "attachments" / "tmp"
    directory.mkdir(parents=True)
    (directory / "fetch-crashed").write_bytes(b"half a file")
    archive = await make_archive()
    assert archive.leftovers() == []


# --- settings -----------------------------------------------------------------------------


def test_fetcher_settings(tmp_path: Path) -> None:
    base: dict[str, Any] = {"domain": ["corp.example"], "data_dir": tmp_path}
    assert build_fetcher_config(Settings(**base)) is None
    config = build_fetcher_config(
        Settings(
            **base,
            upload_hosts="Upload.corp.example, files.corp.example:5281",
            attachment_max_bytes=1000,
            attachment_timeout=5,
            attachment_retries=0,
        )
    )
    assert config is not None
    assert config.upload_hosts == {"upload.corp.example", "files.corp.example:5281"}
    assert (config.max_bytes, config.timeout, config.connect_timeout) == (1000, 5.0, 5.0)
    assert config.retries == 0 and config.allow_http is False
    assert config.directory == tmp_path / "attachments"
    with pytest.raises(SettingsError, match="attachment_allow_http"):
        build_fetcher_config(Settings(**base, attachment_allow_http=True))
    dev = Settings(**base, environment="development", attachment_allow_http=True)
    assert build_fetcher_config(replace_hosts(dev)) is not None


def replace_hosts(settings: Settings) -> Settings:
    return settings.model_copy(update={"upload_hosts": ["upload.corp.example"]})
