"""Exports: every format parses back, the manifest matches the files, memory stays bounded."""

from __future__ import annotations

import asyncio
import csv
import email
import email.policy
import hashlib
import io
import json
import mailbox
import tracemalloc
from collections.abc import AsyncIterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader

from archive_api.errors import ExportError
from archive_api.exports import (
    CSV_COLUMNS,
    MANIFEST_NAME,
    ExportFormat,
    ExportResult,
    ExportSource,
    PdfFonts,
    export_records,
    verify_manifest,
)
from archive_api.holds import HoldService, conversation_scope
from archive_api.store.errors import QuerySyntaxError
from archive_api.store.records import ArchiveRecord, Direction
from archive_api.store.sqlite import SqliteStore
from classifier.clock import ManualClock
from tests.archive_api.store.conformance import ALL, DAY, HOUR, T0, ChainWriter, corpus, record

NOW = T0 + timedelta(days=30)
ACTOR = "token:officer-1"

# Records in scripts a Latin-1 font lacks, and text a spreadsheet or mail reader might run.
EXTRA = [
    record("x1", at=T0 + 11 * DAY, body="Привет, это сделка века"),
    record("x2", at=T0 + 11 * DAY + HOUR, body="Καλημέρα σας — 你好，世界"),  # noqa: RUF001
    record(
        "x3",
        at=T0 + 11 * DAY + 2 * HOUR,
        message_id='=HYPERLINK("http://evil.example")',
        body="line one\r\nline two\x00 with a NUL",
    ),
    record(
        "x4",
        at=T0 + 12 * DAY,
        sender="eve@corp.example",
        sender_resource="x\r\nBcc: victim@corp.example",
        recipient="bob@partner.example",
        body="header injection attempt",
    ),
]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "archive.db")
    try:
        await opened.apply(ChainWriter().records(*corpus(), *EXTRA))
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


async def run_export(
    store: SqliteStore,
    out: Path,
    fmt: ExportFormat,
    clock: ManualClock,
    query: str = "",
    **kwargs: object,
) -> ExportResult:
    return await export_records(
        store,
        ExportSource.of_query(query),
        fmt,
        out,
        actor=ACTOR,
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )


def manifest(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / MANIFEST_NAME).read_text())
    return data


# --- JSON Lines --------------------------------------------------------------------------------


async def test_jsonl_round_trips_every_record(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    out = tmp_path / "export"
    result = await run_export(store, out, ExportFormat.JSONL, clock, page_size=4)
    lines = (out / "records.jsonl").read_bytes().splitlines()
    records = [ArchiveRecord.from_json(json.loads(line)) for line in lines]
    assert [r.record_id for r in records] == [*sorted(ALL), "x1", "x2", "x3", "x4"]
    for rec in records:
        assert rec == await store.get(rec.record_id)
    assert result.record_count == len(records) == 19
    assert [f.name for f in result.files] == ["records.jsonl"]
    assert verify_manifest(out) == []


async def test_manifest_describes_the_export(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    out = tmp_path / "export"
    result = await run_export(
        store, out, ExportFormat.JSONL, clock, query="FROM:Alice@corp.example"
    )
    data = manifest(out)
    assert data["source"] == {"kind": "query", "query": "from:alice@corp.example"}
    assert (data["actor"], data["format"], data["format_version"]) == (ACTOR, "jsonl", 1)
    assert (data["record_count"], data["manifest_version"]) == (result.record_count, 1)
    assert data["started_at"] == NOW.isoformat()
    [entry] = data["files"]
    body = (out / "records.jsonl").read_bytes()
    assert entry["sha256"] == hashlib.sha256(body).hexdigest()
    assert entry["size"] == len(body) and entry["records"] == result.record_count
    assert result.manifest_sha256 == hashlib.sha256((out / MANIFEST_NAME).read_bytes()).hexdigest()
    # Any change to a file is caught by the manifest.
    (out / "records.jsonl").write_bytes(body.replace(b"alice", b"alicf", 1))
    assert verify_manifest(out) == ["records.jsonl: content differs from the manifest"]
    (out / "records.jsonl").unlink()
    assert verify_manifest(out) == ["records.jsonl: missing"]


# --- CSV -----------------------------------------------------------------------------------------


async def test_csv_has_the_metadata_columns_and_no_text(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    out = tmp_path / "export"
    await run_export(store, out, ExportFormat.CSV, clock)
    text = (out / "records.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == 19
    by_id = {row["record_id"]: row for row in rows}
    assert by_id["r05"]["verdict"] == "reject" and by_id["r05"]["status"] == "rejected"
    assert by_id["r03"]["attachments"] == "1" and by_id["r04"]["room"] == (
        "desk@conference.corp.example"
    )
    assert by_id["r01"]["body_chars"] == str(len("Guaranteed return on this deal"))
    assert "Guaranteed" not in text and "Привет" not in text  # metadata only
    # A cell a spreadsheet would run as a formula is defused; a line break cannot split a row.
    assert by_id["x3"]["message_id"].startswith("'=HYPERLINK")
    assert "\n" not in by_id["x4"]["sender_full"] and "Bcc" in by_id["x4"]["sender_full"]
    assert verify_manifest(out) == []


# --- EML -----------------------------------------------------------------------------------------


def read_eml(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert not message.defects, message.defects
    return message


async def test_eml_is_one_message_per_conversation_and_day(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    out = tmp_path / "export"
    result = await run_export(store, out, ExportFormat.EML, clock, query="with:bob@partner.example")
    # alice<->bob on days 0 (r01, r02), 4, 5 (r08, r09), 9, 10, 11 (x1-x3); eve<->bob on 12.
    files = sorted((out / "eml").iterdir())
    assert len(files) == len(result.files) == 7
    assert sum(f.records for f in result.files) == result.record_count == 11
    messages = {path.name[:10]: read_eml(path) for path in files if "eve" not in path.name}
    day5 = messages["2026-01-20"]
    assert str(day5["From"]) == "alice@corp.example"
    assert str(day5["To"]) == "bob@partner.example"
    assert "alice@corp.example, bob@partner.example" in str(day5["Subject"])
    assert "(2 records)" in str(day5["Subject"])
    assert day5["Date"].datetime == T0 + 5 * DAY
    assert day5["Message-ID"].startswith("<") and day5["Message-ID"].endswith(
        "@stanzaguard.export>"
    )
    assert day5.get_content_type() == "multipart/mixed"
    body = day5.get_body(preferencelist=("plain",))
    assert body is not None
    transcript = body.get_content()
    assert "Guaranteed return on this deal!!" in transcript and "retraction of message m02" in (
        transcript
    )
    [attachment] = list(day5.iter_attachments())
    assert attachment.get_filename() == "records.jsonl"
    attached = [
        ArchiveRecord.from_json(json.loads(x)) for x in attachment.get_content().splitlines()
    ]
    assert [r.record_id for r in attached] == ["r08", "r09"]
    day11 = messages["2026-01-26"]
    plain = day11.get_body(preferencelist=("plain",))
    assert plain is not None
    assert "Привет" in plain.get_content() and "你好" in plain.get_content()
    assert verify_manifest(out) == []


async def test_eml_headers_cannot_be_injected_and_mailbox_tools_read_it(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    out = tmp_path / "export"
    await run_export(store, out, ExportFormat.EML, clock)
    box = mailbox.mbox(tmp_path / "all.mbox")
    paths = sorted((out / "eml").iterdir())
    for path in paths:
        message = read_eml(path)
        assert message["Bcc"] is None
        for name in ("From", "To", "Date", "Subject", "Message-ID"):
            assert message[name], (path.name, name)
        box.add(message)
    box.flush()
    box.close()
    reread = mailbox.mbox(tmp_path / "all.mbox")
    ids = {m["Message-ID"] for m in reread}
    assert len(ids) == len(paths)  # every conversation-day has its own id
    reread.close()
    injected = read_eml(next(p for p in paths if "eve" in p.name))
    plain = injected.get_body(preferencelist=("plain",))
    assert plain is not None and "Bcc: victim@corp.example" in plain.get_content()  # as text
    # A JID that is not a plain mail address gets a stand-in address with the JID as name.
    room = read_eml(next(p for p in paths if "desk" in p.name))
    assert "desk@conference.corp.example" in str(room["To"])
    session = read_eml(next(p for p in paths if p.name.startswith("2026-01-22")))
    assert str(session["From"]) == "alice@corp.example"


async def test_eml_message_ids_are_stable_across_exports(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    await run_export(store, first, ExportFormat.EML, clock, query="type:groupchat")
    await run_export(
        store, second, ExportFormat.EML, clock, query="room:desk@conference.corp.example"
    )
    [a], [b] = list((first / "eml").iterdir()), list((second / "eml").iterdir())
    assert read_eml(a)["Message-ID"] == read_eml(b)["Message-ID"]


# --- PDF -----------------------------------------------------------------------------------------


async def test_pdf_transcript_in_volumes_with_unicode_text(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    out = tmp_path / "export"
    result = await run_export(store, out, ExportFormat.PDF, clock, pdf_volume_records=8)
    names = [f.name for f in result.files]
    assert names == ["transcript-0001.pdf", "transcript-0002.pdf", "transcript-0003.pdf"]
    assert [f.records for f in result.files] == [8, 8, 3]
    texts = []
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(b"%PDF-")
        reader = PdfReader(io.BytesIO(data))
        assert len(reader.pages) >= 1
        texts.append("\n".join(page.extract_text() for page in reader.pages))
    assert "Guaranteed return on this deal" in texts[0]
    assert "search: (everything)" in texts[0] and "Exported by token:officer-1" in texts[0]
    assert "Volume 2" in texts[1] and "Привет" in texts[1]
    assert "Volume 3" in texts[2] and "Καλημέρα" in texts[2]
    if PdfFonts.system().fallbacks:  # fonts-droid-fallback installed: CJK renders too
        assert "你好" in texts[2]
    assert verify_manifest(out) == []


async def test_pdf_pages_grow_with_the_transcript(tmp_path: Path, clock: ManualClock) -> None:
    async with await SqliteStore.open(tmp_path / "long.db") as store:
        await store.apply(
            ChainWriter().records(
                *(record(f"m{i:04d}", at=T0 + i * HOUR, body=f"message {i}") for i in range(300))
            )
        )
        one = await run_export(store, tmp_path / "one", ExportFormat.PDF, clock, query="message 7")
        many = await run_export(store, tmp_path / "many", ExportFormat.PDF, clock)
    assert one.record_count == 1 and many.record_count == 300
    short = PdfReader(tmp_path / "one" / "transcript-0001.pdf")
    long = PdfReader(tmp_path / "many" / "transcript-0001.pdf")
    assert len(short.pages) == 1
    # Each record takes two lines (heading and text) plus a gap: well over a page per 40.
    assert 300 // 40 <= len(long.pages) <= 300 // 10
    last = long.pages[-1].extract_text()
    assert "message 299" in last and f"page {len(long.pages)}" in last


async def test_an_empty_pdf_export_says_so(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    out = tmp_path / "export"
    result = await run_export(store, out, ExportFormat.PDF, clock, query="nothingmatchesthis")
    assert result.record_count == 0
    assert "No records match" in PdfReader(out / "transcript-0001.pdf").pages[0].extract_text()


async def test_pdf_without_its_font_fails_cleanly(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    out = tmp_path / "export"
    missing = PdfFonts(tmp_path / "none.ttf", tmp_path / "none-bold.ttf")
    with pytest.raises(ExportError, match="fonts-dejavu-core"):
        await run_export(store, out, ExportFormat.PDF, clock, pdf_fonts=missing)
    assert not out.exists()  # nothing half-written is left behind


# --- holds, progress, bad input ----------------------------------------------------------------


async def test_export_of_a_hold(store: SqliteStore, tmp_path: Path, clock: ManualClock) -> None:
    holds = HoldService(store, clock)
    hold = await holds.place(
        "FINRA 2026-3", conversation_scope(room="desk@conference.corp.example"), actor="o"
    )
    out = tmp_path / "export"
    result = await export_records(
        store, ExportSource.of_hold(hold), "jsonl", out, actor=ACTOR, clock=clock
    )
    assert result.record_count == 1
    assert manifest(out)["source"] == {
        "kind": "hold",
        "hold_id": hold.hold_id,
        "case_name": "FINRA 2026-3",
        "hold_active": True,
        "query": "room:desk@conference.corp.example",
    }


async def test_progress_is_reported_per_page(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    seen: list[tuple[int, int | None]] = []
    await run_export(
        store,
        tmp_path / "export",
        ExportFormat.CSV,
        clock,
        page_size=5,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(0, 19), (5, 19), (10, 19), (15, 19), (19, 19)]


async def test_bad_inputs_get_clear_errors(
    store: SqliteStore, tmp_path: Path, clock: ManualClock
) -> None:
    with pytest.raises(QuerySyntaxError) as caught:
        ExportSource.of_query("from:alice@corp.example after:yesterday")
    assert caught.value.position == len("from:alice@corp.example after:")
    with pytest.raises(ExportError, match="unknown export format"):
        await run_export(store, tmp_path / "a", "docx", clock)  # type: ignore[arg-type]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="not empty"):
        await run_export(store, busy, ExportFormat.JSONL, clock)
    assert (busy / "keep.txt").read_text() == "precious"
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        await run_export(store, afile, ExportFormat.JSONL, clock)
    with pytest.raises(ExportError, match="actor"):
        await export_records(
            store, ExportSource.of_query(""), "csv", tmp_path / "b", actor=" ", clock=clock
        )
    with pytest.raises(ExportError, match="page_size"):
        await run_export(store, tmp_path / "c", ExportFormat.CSV, clock, page_size=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    await run_export(store, empty, ExportFormat.JSONL, clock, query="type:call")
    assert manifest(empty)["record_count"] == 0


# --- bounded memory ------------------------------------------------------------------------------

BIG = 50_000
BIG_BODY = 700


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50,000 records in several conversations over a week, about 1 KiB of JSON each."""
    path = tmp_path_factory.mktemp("big") / "archive.db"

    async def build() -> None:
        writer = ChainWriter()
        async with await SqliteStore.open(path) as store:
            for start in range(0, BIG, 5000):
                batch = [
                    record(
                        f"b{i:06d}",
                        at=T0 + timedelta(seconds=12 * i),
                        sender=f"user{i % 50}@corp.example",
                        recipient=f"peer{i % 7}@partner.example",
                        direction=Direction.FROM_CLIENT,
                        body=f"message {i} " + "lorem ipsum dolor sit amet " * (BIG_BODY // 27),
                    )
                    for i in range(start, start + 5000)
                ]
                await store.apply(writer.records(*batch))

    asyncio.run(build())
    return path


@pytest.mark.parametrize(
    ("fmt", "query", "count"),
    [
        (ExportFormat.JSONL, "", BIG),
        # EML, the slowest format to write, over its first day and a half (about 10,800
        # records in 350 conversations a day): enough to spill its buffer many times.
        (ExportFormat.EML, "before:2026-01-17", 10_800),
    ],
)
async def test_exports_stream_in_bounded_memory(
    big_store: Path, tmp_path: Path, fmt: ExportFormat, query: str, count: int
) -> None:
    out = tmp_path / "export"
    async with await SqliteStore.open(big_store) as store:
        tracemalloc.start()
        try:
            result = await export_records(
                store, ExportSource.of_query(query), fmt, out, actor=ACTOR, clock=ManualClock(NOW)
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    written = sum(f.size for f in result.files)
    assert result.record_count == count
    assert written > 30 * 1024 * 1024  # the export is big ...
    assert peak < 8 * 1024 * 1024  # ... the memory it took is not (pages of 200 records)
    assert peak < written / 4
    assert verify_manifest(out) == []
