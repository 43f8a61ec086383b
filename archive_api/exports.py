"""Exports of a search or a legal hold: JSON Lines, CSV, EML and PDF, with a manifest.

Every export writes into one directory (new, or empty): the export's files and, last,
`manifest.json`, which names the source (query or hold), the actor, the time, the record
count and the SHA-256 and size of every file. A directory without a manifest is an export
that did not finish. Formats (docs/retention.md has the details):

- `jsonl`: `records.jsonl`, one full record a line (`ArchiveRecord.to_json`, raw XML in
  base64), which `ArchiveRecord.from_json` reads back unchanged;
- `csv`: `records.csv`, metadata only (no message text), one row a record;
- `eml`: `eml/*.eml`, one RFC 5322 message per conversation (a 1:1 pair or a room) and UTC
  day: a text/plain transcript and the day's records as an attached `records.jsonl`, with
  From/To/Date/Subject/Message-ID that eDiscovery tools index; the Message-ID is derived
  from the conversation and day, so exporting the same day twice yields the same id;
- `pdf`: `transcript-0001.pdf`, ... a readable transcript in volumes of a bounded number of
  records, set in an embedded Unicode font (DejaVu Sans, with Droid Sans Fallback for CJK
  when installed).

Exports stream: records are read a page at a time, in time order, through the store's
consistent snapshot where it has one (`SnapshotReader`) and its cursor paging otherwise, and
written as they come, so memory stays bounded whatever the size of the export (an EML message
holds one conversation-day, a PDF volume its records). The caller writes the audit event;
`ExportResult` carries what it needs.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import re
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from email.utils import format_datetime, formataddr
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Protocol

import orjson
from fpdf import FPDF
from fpdf.enums import XPos, YPos
from fpdf.errors import FPDFException

from archive_api.errors import ExportError
from archive_api.holds import Hold
from archive_api.store.base import MAX_PAGE_SIZE, ArchiveStore, SnapshotReader
from archive_api.store.query import Query, normalize_jid, parse_query
from archive_api.store.records import ArchiveRecord, RecordKind
from classifier.clock import Clock
from classifier.verdict import Action

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ExportFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    EML = "eml"
    PDF = "pdf"


# Bumped when a format's content changes in a way a reader would notice.
FORMAT_VERSIONS: dict[ExportFormat, int] = {
    ExportFormat.JSONL: 1,
    ExportFormat.CSV: 1,
    ExportFormat.EML: 1,
    ExportFormat.PDF: 1,
}

ProgressCallback = Callable[[int, int | None], None]
"""Called with (records written so far, records expected or None) after every page."""


@dataclass(frozen=True, slots=True)
class ExportSource:
    """What is exported: the records a query matches, or those a hold covers."""

    query: Query
    hold: Hold | None = None

    @classmethod
    def of_query(cls, text: str) -> ExportSource:
        """Parse the query (QuerySyntaxError, with its position, when malformed)."""
        return cls(parse_query(text))

    @classmethod
    def of_hold(cls, hold: Hold) -> ExportSource:
        return cls(hold.query, hold)

    def to_json(self) -> dict[str, Any]:
        if self.hold is None:
            return {"kind": "query", "query": str(self.query)}
        return {
            "kind": "hold",
            "hold_id": self.hold.hold_id,
            "case_name": self.hold.case_name,
            "hold_active": self.hold.active,
            "query": str(self.query),
        }

    def describe(self) -> str:
        if self.hold is None:
            return f"search: {str(self.query) or '(everything)'}"
        return f"legal hold {self.hold.hold_id} ({self.hold.case_name})"


@dataclass(frozen=True, slots=True)
class ExportedFile:
    name: str  # relative to the export directory, with '/' separators
    sha256: str
    size: int
    records: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "size": self.size,
            "records": self.records,
        }


@dataclass(frozen=True, slots=True)
class ExportResult:
    directory: Path
    format: ExportFormat
    record_count: int
    files: tuple[ExportedFile, ...]
    manifest_sha256: str  # of manifest.json, which covers every file: one value to audit


@dataclass(frozen=True, slots=True)
class PdfFonts:
    """TrueType fonts for PDF transcripts: a Unicode text face, its bold, and fallbacks for
    scripts they lack (tried in order, per character)."""

    regular: Path
    bold: Path
    fallbacks: tuple[Path, ...] = ()

    @classmethod
    def system(cls) -> PdfFonts:
        """The Debian fonts (fonts-dejavu-core, and fonts-droid-fallback when present)."""
        dejavu = Path("/usr/share/fonts/truetype/dejavu")
        droid = Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf")
        return cls(
            dejavu / "DejaVuSans.ttf",
            dejavu / "DejaVuSans-Bold.ttf",
            (droid,) if droid.is_file() else (),
        )


# --- reading -------------------------------------------------------------------------------


async def iter_records(
    store: ArchiveStore, query: Query, *, page_size: int = 500
) -> AsyncIterator[list[ArchiveRecord]]:
    """The matching records, oldest first, one page (a list) at a time.

    From one consistent view where the store offers it (`SnapshotReader`: Elasticsearch's
    point in time or scroll), so records indexed or purged while an export runs neither
    shift its pages nor end it early; otherwise through `search` cursor paging (SQLite).
    """
    if isinstance(store, SnapshotReader):
        async for records in store.snapshot_pages(query, page_size=page_size):
            yield records
        return
    cursor: str | None = None
    while True:
        page = await store.search(query, limit=page_size, cursor=cursor, sort="time_asc")
        if page.hits:
            yield [hit.record for hit in page.hits]
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


# --- files that hash themselves --------------------------------------------------------------


class _HashingFile:
    """A new file (never an existing one) whose SHA-256 and size are kept while writing."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.path = root / name
        self._file: IO[bytes] = self.path.open("xb")
        self._digest = hashlib.sha256()
        self.size = 0
        self.records = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._digest.update(data)
        self.size += len(data)

    def close(self) -> ExportedFile:
        self._file.close()
        return ExportedFile(self.name, self._digest.hexdigest(), self.size, self.records)

    def discard(self) -> None:
        self._file.close()


class _TextSink:
    """What csv.writer needs: a write(str) that lands as UTF-8 in a hashing file."""

    def __init__(self, target: _HashingFile) -> None:
        self._target = target

    def write(self, text: str) -> int:
        self._target.write(text.encode("utf-8", "replace"))
        return len(text)


class _Writer(Protocol):
    def write(self, records: Sequence[ArchiveRecord]) -> None: ...

    def finish(self) -> list[ExportedFile]: ...

    def abort(self) -> None: ...


# --- text helpers ------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _clean_text(text: str) -> str:
    """Text fit for a transcript: control characters and lone surrogates become U+FFFD."""
    return _UNSAFE.sub("\ufffd", text.replace("\r\n", "\n").replace("\r", "\n"))


def _one_line(text: str, limit: int = 300) -> str:
    """Header-safe text: no line breaks or control characters, bounded length."""
    flat = " ".join(_clean_text(text).replace("\ufffd", " ").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _utc(at: datetime) -> datetime:
    return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _record_lines(record: ArchiveRecord) -> tuple[str, str]:
    """(heading, text) of one record in a transcript."""
    at = _utc(record.occurred_at).strftime("%Y-%m-%d %H:%M:%S UTC")
    sender = record.sender_full or record.sender or "(unknown)"
    target = record.room or record.recipient or ""
    heading = f"{at}  {sender}" + (f" → {target}" if target else "")
    kind = record.stanza_type if record.kind is RecordKind.MESSAGE else record.kind.value
    notes = [kind] if kind else []
    if record.verdict.action is not Action.ALLOW:
        notes.append(f"verdict {record.verdict.action.value}")
    if record.status.value != "delivered":
        notes.append(record.status.value)
    if notes:
        heading += f"  [{', '.join(notes)}]"
    lines = []
    if record.replaces_id:
        lines.append(f"(correction of message {record.replaces_id})")
    if record.retracts_id:
        lines.append(f"(retraction of message {record.retracts_id})")
    if record.kind is RecordKind.SUBSCRIPTION:
        lines.append(f"(presence {record.stanza_type})")
    if record.kind is RecordKind.REPORT:
        reported = record.reported_jid or "?"
        lines.append(f"(spam report on {reported}: {record.report_reason or 'no reason given'})")
        if record.report_text:
            lines.append(record.report_text)
    if record.subject:
        lines.append(f"Subject: {record.subject}")
    if record.body:
        lines.append(record.body)
    elif record.encryption:
        lines.append(f"(end-to-end encrypted: {record.encryption})")
    lines.extend(
        f"attachment: {a.name or ''} {a.url}".replace("  ", " ") for a in record.attachments
    )
    return _one_line(heading, 2000), _clean_text("\n".join(lines))


# --- JSON Lines ------------------------------------------------------------------------------


def record_line(record: ArchiveRecord) -> bytes:
    """One record as a JSON Lines line (sorted keys, UTF-8; ends with a newline)."""
    data = record.to_json()
    try:
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        # orjson refuses what is not valid UTF-8 (a lone surrogate a hostile client sent);
        # the standard encoder escapes it, and json.loads gives the same string back.
        return json.dumps(data, sort_keys=True).encode() + b"\n"


class _JsonlWriter:
    def __init__(self, root: Path) -> None:
        self._file = _HashingFile(root, "records.jsonl")

    def write(self, records: Sequence[ArchiveRecord]) -> None:
        self._file.write(b"".join(record_line(r) for r in records))
        self._file.records += len(records)

    def finish(self) -> list[ExportedFile]:
        return [self._file.close()]

    def abort(self) -> None:
        self._file.discard()


# --- CSV -------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "record_id",
    "occurred_at",
    "kind",
    "type",
    "direction",
    "sender",
    "sender_full",
    "recipient",
    "recipient_full",
    "room",
    "verdict",
    "score",
    "rules",
    "status",
    "message_id",
    "origin_id",
    "thread",
    "replaces_id",
    "retracts_id",
    "encryption",
    "body_chars",
    "attachments",
    "delivered_to",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    """A CSV cell; text a spreadsheet would run as a formula is prefixed with a quote."""
    if value is None:
        return ""
    text = _one_line(str(value), 100_000) if isinstance(value, str) else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_row(record: ArchiveRecord) -> list[str]:
    delivered = dict.fromkeys(o.jid for o in record.observations if o.jid != record.sender_full)
    values: list[object] = [
        record.record_id,
        _utc(record.occurred_at).isoformat(),
        record.kind.value,
        record.stanza_type,
        record.direction.value,
        record.sender,
        record.sender_full,
        record.recipient,
        record.recipient_full,
        record.room,
        record.verdict.action.value,
        f"{record.verdict.score:.4f}",
        ";".join(dict.fromkeys(r.rule_id for r in record.verdict.reasons)),
        record.status.value,
        record.message_id,
        record.origin_id,
        record.thread,
        record.replaces_id,
        record.retracts_id,
        record.encryption,
        len(record.body or ""),
        len(record.attachments),
        " ".join(delivered),
    ]
    return [_cell(v) for v in values]


class _CsvWriter:
    def __init__(self, root: Path) -> None:
        self._file = _HashingFile(root, "records.csv")
        self._csv = csv.writer(_TextSink(self._file), lineterminator="\r\n")
        self._csv.writerow(CSV_COLUMNS)

    def write(self, records: Sequence[ArchiveRecord]) -> None:
        self._csv.writerows(csv_row(r) for r in records)
        self._file.records += len(records)

    def finish(self) -> list[ExportedFile]:
        return [self._file.close()]

    def abort(self) -> None:
        self._file.discard()


# --- EML ---------------------------------------------------------------------------------------

_EML_DIR = "eml"
_EML_BUFFER_BYTES = 2 * 1024 * 1024  # pending conversation text kept in memory at most
_MAX_ADDRESSES = 100
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
    r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*"
)
_EML_POLICY = SMTP  # CRLF line ends, as RFC 5322 has them


def conversation_key(record: ArchiveRecord) -> tuple[str, ...]:
    """("room", room) for a room; ("pair", a, b) for the two parties, whichever spoke."""
    if record.room:
        return ("room", normalize_jid(record.room).split("/", 1)[0])
    parties = {normalize_jid(p).split("/", 1)[0] for p in (record.sender, record.recipient) if p}
    return ("pair", *sorted(parties))


def _address(jid: str) -> str:
    """An email address for a JID: the JID itself when it is a plain address, otherwise a
    stable stand-in at .invalid (RFC 2606) with the JID as display name (RFC 2047-encoded
    when it is not ASCII)."""
    bare = _one_line(normalize_jid(jid).split("/", 1)[0], 500)
    if _PLAIN_ADDRESS.fullmatch(bare):
        return bare
    digest = hashlib.sha256(bare.encode("utf-8", "replace")).hexdigest()[:20]
    return formataddr((bare or "(unknown)", f"jid-{digest}@xmpp.invalid"), charset="utf-8")


def _transcript_entry(record: ArchiveRecord) -> bytes:
    heading, text = _record_lines(record)
    lines = [heading, *(f"    {part}" for part in text.split("\n") if text), ""]
    return "\n".join(lines).encode("utf-8", "replace") + b"\n"


@dataclass
class _ConversationDay:
    first: ArchiveRecord
    count: int = 0
    participants: dict[str, None] = field(default_factory=dict)  # ordered set of bare JIDs
    records: bytearray = field(default_factory=bytearray)  # JSON Lines not yet spilled
    transcript: bytearray = field(default_factory=bytearray)  # transcript not yet spilled
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # spilled: offset, sizes


class _EmlWriter:
    """Groups the time-ordered records by conversation within each UTC day; a finished day
    becomes one message per conversation. What the day's conversations hold waits in memory
    up to `_EML_BUFFER_BYTES` in all, then is appended to one work file (the conversation
    keeps where its pieces are), so memory holds a bounded buffer plus the conversation-day
    being written."""

    def __init__(self, root: Path) -> None:
        self._root = root
        (root / _EML_DIR).mkdir()
        self._work_path = root / ".eml-work"
        self._work: IO[bytes] | None = None
        self._day: date | None = None
        self._conversations: dict[tuple[str, ...], _ConversationDay] = {}
        self._buffered = 0
        self._files: list[ExportedFile] = []

    def write(self, records: Sequence[ArchiveRecord]) -> None:
        for record in records:
            day = _utc(record.occurred_at).date()
            if self._day is not None and day != self._day:
                self._flush_day()
            self._day = day
            key = conversation_key(record)
            conversation = self._conversations.get(key)
            if conversation is None:
                conversation = self._conversations[key] = _ConversationDay(record)
            conversation.count += 1
            for party in (record.sender, record.recipient, record.room):
                if party and len(conversation.participants) < _MAX_ADDRESSES:
                    conversation.participants.setdefault(normalize_jid(party).split("/", 1)[0])
            line, entry = record_line(record), _transcript_entry(record)
            conversation.records += line
            conversation.transcript += entry
            self._buffered += len(line) + len(entry)
            if self._buffered > _EML_BUFFER_BYTES:
                self._spill()

    def _spill(self) -> None:
        if self._work is None:
            self._work = self._work_path.open("w+b")
        work = self._work
        work.seek(0, 2)
        for conversation in self._conversations.values():
            if conversation.records:
                conversation.spans.append(
                    (work.tell(), len(conversation.records), len(conversation.transcript))
                )
                work.write(conversation.records)
                work.write(conversation.transcript)
                conversation.records, conversation.transcript = bytearray(), bytearray()
        self._buffered = 0

    def _gather(self, conversation: _ConversationDay) -> tuple[bytes, bytes]:
        """The conversation-day's JSON Lines and transcript, spilled pieces first."""
        records, transcript = [], []
        if conversation.spans:
            assert self._work is not None
            self._work.flush()
            for offset, records_size, transcript_size in conversation.spans:
                self._work.seek(offset)
                records.append(self._work.read(records_size))
                transcript.append(self._work.read(transcript_size))
        records.append(bytes(conversation.records))
        transcript.append(bytes(conversation.transcript))
        return b"".join(records), b"".join(transcript)

    def _flush_day(self) -> None:
        assert self._day is not None
        for key, conversation in self._conversations.items():
            data, transcript = self._gather(conversation)
            message = self._message(key, self._day, conversation, data, transcript)
            name = f"{_EML_DIR}/{self._day.isoformat()}_{_slug(key)}.eml"
            target = _HashingFile(self._root, name)
            target.write(message.as_bytes(policy=_EML_POLICY))
            target.records = conversation.count
            self._files.append(target.close())
        self._conversations.clear()
        self._buffered = 0
        if self._work is not None:
            self._work.seek(0)
            self._work.truncate()

    def _message(
        self,
        key: tuple[str, ...],
        day: date,
        conversation: _ConversationDay,
        data: bytes,
        entries: bytes,
    ) -> MIMEMultipart:
        """The message, built with the email package's MIME classes: the legacy (compat32)
        ones, several times faster than EmailMessage for the same RFC 5322 output. Every
        header value has been through `_one_line` or `_address`: no line break gets in."""
        label = ", ".join(key[1:]) or "(no parties)"
        what = "group chat" if key[0] == "room" else "chat"
        intro = f"XMPP {what}: {label}\nDay: {day.isoformat()} (UTC)\n"
        transcript = intro + f"Records: {conversation.count}\n\n" + entries.decode()
        first = conversation.first
        sender = normalize_jid(first.sender or first.room or "").split("/", 1)[0]
        others = [p for p in conversation.participants if p != sender] or [sender]
        message = MIMEMultipart()
        message["From"] = _address(sender)
        message["To"] = ", ".join(_address(p) for p in others)
        message["Date"] = format_datetime(_utc(first.occurred_at))
        subject = f"XMPP {what}: {label} on {day.isoformat()} ({conversation.count} records)"
        message["Subject"] = _one_line(subject, 900)
        seed = "\x1f".join((*key, day.isoformat())).encode("utf-8", "replace")
        digest = hashlib.sha256(seed).hexdigest()[:40]
        message["Message-ID"] = f"<{digest}@stanzaguard.export>"
        # A fixed boundary keeps exports reproducible; '=_' never occurs in base64 lines.
        message.set_boundary(f"=_stanzaguard_{digest}")
        message["X-StanzaGuard-Conversation"] = _one_line(label, 900)
        message["X-StanzaGuard-Records"] = str(conversation.count)
        message.attach(MIMEText(transcript, "plain", "utf-8"))
        attachment = MIMEApplication(data, "x-ndjson")
        attachment.add_header("Content-Disposition", "attachment", filename="records.jsonl")
        message.attach(attachment)
        return message

    def finish(self) -> list[ExportedFile]:
        if self._conversations:
            self._flush_day()
        self.abort()
        return self._files

    def abort(self) -> None:
        if self._work is not None:
            self._work.close()
            self._work = None
        self._work_path.unlink(missing_ok=True)


def _slug(key: tuple[str, ...]) -> str:
    """A file-name-safe label for a conversation, unique through a short digest."""
    label = "_".join(key[1:]) or "none"
    safe = re.sub(r"[^A-Za-z0-9@._-]+", "-", label)[:80].strip(".-") or "x"
    digest = hashlib.sha256("\x1f".join(key).encode("utf-8", "replace")).hexdigest()[:10]
    return f"{safe}_{digest}"


# --- PDF ---------------------------------------------------------------------------------------

_PDF_VOLUME_RECORDS = 2000
_FONT = "text"
_FALLBACK = "fallback"


class _TranscriptPdf(FPDF):
    footer_text = ""

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(_FONT, size=7)
        self.cell(0, 5, f"{self.footer_text}    page {self.page_no()}", align="C")


class _PdfWriter:
    def __init__(
        self,
        root: Path,
        *,
        title: str,
        actor: str,
        created_at: datetime,
        fonts: PdfFonts,
        volume_records: int,
    ) -> None:
        for font in (fonts.regular, fonts.bold):
            if not font.is_file():
                raise ExportError(
                    f"PDF export needs the Unicode font {font} (Debian: fonts-dejavu-core)"
                )
        self._root = root
        self._title = _one_line(title, 500)
        self._actor = _one_line(actor, 300)
        self._created_at = created_at
        self._fonts = fonts
        self._volume_records = volume_records
        self._pdf: _TranscriptPdf | None = None
        self._in_volume = 0
        self._written = 0
        self._files: list[ExportedFile] = []

    def _start_volume(self) -> _TranscriptPdf:
        number = len(self._files) + 1
        pdf = _TranscriptPdf(format="A4")
        pdf.set_title(f"StanzaGuard transcript: {self._title}")
        pdf.set_creator("StanzaGuard")
        pdf.set_creation_date(self._created_at)
        try:
            pdf.add_font(_FONT, "", str(self._fonts.regular))
            pdf.add_font(_FONT, "B", str(self._fonts.bold))
            fallbacks = []
            for i, path in enumerate(self._fonts.fallbacks):
                if path.is_file():
                    pdf.add_font(f"{_FALLBACK}{i}", "", str(path))
                    fallbacks.append(f"{_FALLBACK}{i}")
            if fallbacks:
                pdf.set_fallback_fonts(fallbacks, exact_match=False)
        except (OSError, FPDFException, RuntimeError, ValueError) as exc:
            raise ExportError(f"cannot load the PDF fonts: {exc}") from None
        pdf.footer_text = f"{self._title}    volume {number}"
        pdf.set_auto_page_break(auto=True, margin=16)
        pdf.add_page()
        pdf.set_font(_FONT, "B", size=13)
        pdf.multi_cell(0, 7, "StanzaGuard transcript", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_font(_FONT, size=9)
        pdf.multi_cell(
            0,
            5,
            f"{self._title}\nExported by {self._actor} at {self._created_at.isoformat()}\n"
            f"Volume {number}, from record {self._written + 1} (oldest first)",
            new_x=XPos.LMARGIN,
            new_y=YPos.NEXT,
        )
        pdf.ln(3)
        return pdf

    def write(self, records: Sequence[ArchiveRecord]) -> None:
        for record in records:
            if self._pdf is None:
                self._pdf = self._start_volume()
            pdf = self._pdf
            heading, text = _record_lines(record)
            pdf.set_font(_FONT, "B", size=8)
            pdf.multi_cell(0, 4.2, heading, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            if text:
                pdf.set_font(_FONT, size=9)
                pdf.set_x(pdf.l_margin + 4)
                pdf.multi_cell(0, 4.6, text, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(1.5)
            self._in_volume += 1
            self._written += 1
            if self._in_volume >= self._volume_records:
                self._finish_volume()

    def _finish_volume(self) -> None:
        assert self._pdf is not None
        target = _HashingFile(self._root, f"transcript-{len(self._files) + 1:04d}.pdf")
        target.write(bytes(self._pdf.output()))
        target.records = self._in_volume
        self._files.append(target.close())
        self._pdf, self._in_volume = None, 0

    def finish(self) -> list[ExportedFile]:
        if self._pdf is None and not self._files:
            self._pdf = self._start_volume()  # an empty export still gets its (empty) volume
            self._pdf.set_font(_FONT, size=9)
            self._pdf.multi_cell(0, 5, "No records match.", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        if self._pdf is not None:
            self._finish_volume()
        return self._files

    def abort(self) -> None:
        self._pdf = None


# --- the export --------------------------------------------------------------------------------


def _prepare_directory(out_dir: Path) -> bool:
    """Make sure `out_dir` is an empty directory; True when this call created it."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            raise ExportError(f"{out_dir} is not empty; an export needs a new or empty directory")
        return False
    try:
        out_dir.mkdir(parents=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    return True


def _generator() -> dict[str, str]:
    try:
        version = metadata.version("stanzaguard")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": "stanzaguard", "version": version}


async def export_records(
    store: ArchiveStore,
    source: ExportSource,
    export_format: ExportFormat | str,
    out_dir: Path,
    *,
    actor: str,
    clock: Clock,
    progress: ProgressCallback | None = None,
    page_size: int = 200,
    pdf_fonts: PdfFonts | None = None,
    pdf_volume_records: int = _PDF_VOLUME_RECORDS,
) -> ExportResult:
    """Write the records of `source` to `out_dir` in one format, then the manifest.

    Raises ExportError (bad format or directory, missing font, write failure; partial files
    are removed) and the store's errors as they are.
    """
    try:
        fmt = ExportFormat(export_format)
    except ValueError:
        known = ", ".join(f.value for f in ExportFormat)
        raise ExportError(
            f"unknown export format {str(export_format)[:40]!r}; use {known}"
        ) from None
    if not actor.strip():
        raise ExportError("an export needs an actor (who is exporting)")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ExportError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    if pdf_volume_records < 1:
        raise ExportError("pdf_volume_records must be at least 1")
    started = clock.now()
    created_dir = _prepare_directory(out_dir)
    total = await store.count(source.query)
    writer: _Writer | None = None
    try:
        writer = _make_writer(fmt, out_dir, source, actor, started, pdf_fonts, pdf_volume_records)
        written = 0
        if progress is not None:
            progress(0, total)
        async for records in iter_records(store, source.query, page_size=page_size):
            writer.write(records)
            written += len(records)
            if progress is not None:
                progress(written, max(total, written))
        files = tuple(writer.finish())
        writer = None
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "generator": _generator(),
            "format": fmt.value,
            "format_version": FORMAT_VERSIONS[fmt],
            "source": source.to_json(),
            "order": "time ascending",
            "actor": actor,
            "started_at": started.isoformat(),
            "finished_at": clock.now().isoformat(),
            "record_count": written,
            "files": [f.to_json() for f in files],
        }
        data = (json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode()
        (out_dir / MANIFEST_NAME).write_bytes(data)
    except OSError as exc:
        _clean_up(out_dir, writer, created_dir)
        raise ExportError(f"cannot write the export to {out_dir}: {exc.strerror or exc}") from None
    except BaseException:
        _clean_up(out_dir, writer, created_dir)
        raise
    return ExportResult(out_dir, fmt, written, files, hashlib.sha256(data).hexdigest())


def _make_writer(
    fmt: ExportFormat,
    out_dir: Path,
    source: ExportSource,
    actor: str,
    started: datetime,
    pdf_fonts: PdfFonts | None,
    pdf_volume_records: int,
) -> _Writer:
    if fmt is ExportFormat.JSONL:
        return _JsonlWriter(out_dir)
    if fmt is ExportFormat.CSV:
        return _CsvWriter(out_dir)
    if fmt is ExportFormat.EML:
        return _EmlWriter(out_dir)
    return _PdfWriter(
        out_dir,
        title=source.describe(),
        actor=actor,
        created_at=started,
        fonts=pdf_fonts or PdfFonts.system(),
        volume_records=pdf_volume_records,
    )


def _clean_up(out_dir: Path, writer: _Writer | None, created_dir: bool) -> None:
    """Remove what a failed export wrote: a half export must not pass for a whole one."""
    if writer is not None:
        with contextlib.suppress(OSError):
            writer.abort()
    for child in list(out_dir.iterdir()) if out_dir.is_dir() else []:
        with contextlib.suppress(OSError):
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    if created_dir:
        with contextlib.suppress(OSError):
            out_dir.rmdir()


def verify_manifest(out_dir: Path) -> list[str]:
    """Re-hash every file the manifest lists; the problems found (empty when intact)."""
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_bytes())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"manifest unreadable: {exc}"]
    problems = []
    for entry in files:
        name = str(entry.get("name", ""))
        path = out_dir / name
        if ".." in Path(name).parts or not path.is_file():
            problems.append(f"{name}: missing")
            continue
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != entry.get("sha256") or path.stat().st_size != entry.get("size"):
            problems.append(f"{name}: content differs from the manifest")
    return problems
