"""Labelled message files for training and evaluating the text model.

Three formats, all UTF-8, one message per record:

- ``sms``: ``label<TAB>text`` per line, as the SMS Spam Collection. Each line is split on its
  *first* tab only, and no quoting applies: some texts begin with ``"``, and a CSV reader
  would swallow lines (5,572 rows instead of 5,574).
- ``csv``: a header row naming the columns ``label`` and ``text`` (others are ignored), then
  standard CSV (Python's ``csv`` module; quoted fields may span lines).
- ``jsonl``: one JSON object per line with string fields ``label`` and ``text``.

Labels are ``ham`` or ``spam`` (any case, surrounding spaces ignored). Blank lines are skipped.
Every problem is reported with the file and line number; nothing is skipped silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from stanzaguard.errors import StanzaGuardError

#: Longest accepted line (bytes). Real messages are far shorter; the bound keeps a corrupt
#: or hostile file from turning into one gigantic "message".
MAX_LINE_BYTES = 1 << 20

HAM = 0
SPAM = 1
_LABELS = {"ham": HAM, "spam": SPAM}


class DatasetFormat(StrEnum):
    SMS = "sms"
    CSV = "csv"
    JSONL = "jsonl"


class DatasetError(StanzaGuardError):
    """A dataset file cannot be read; the message names the file and line."""

    def __init__(self, message: str, *, path: Path | None = None, line: int | None = None):
        where = f"{path}:{line}: " if path is not None and line is not None else ""
        if not where and path is not None:
            where = f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line


@dataclass(frozen=True, slots=True)
class Dataset:
    """Labelled texts read from one file.

    Attributes:
        samples: ``(text, label)`` pairs in file order; label 1 is spam, 0 ham.
        sha256: Hex SHA-256 of the file's bytes, to tie a model to its training data.
        path: The file read.
        format: Its format.
    """

    samples: list[tuple[str, int]]
    sha256: str
    path: Path
    format: DatasetFormat

    @property
    def spam(self) -> int:
        return sum(label for _, label in self.samples)

    @property
    def ham(self) -> int:
        return len(self.samples) - self.spam

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary for model metadata and reports."""
        return {
            "path": str(self.path),
            "format": self.format.value,
            "sha256": self.sha256,
            "rows": len(self.samples),
            "ham": self.ham,
            "spam": self.spam,
        }


def load_dataset(path: Path, fmt: DatasetFormat | str) -> Dataset:
    """Read and validate a labelled file; `DatasetError` on the first problem."""
    try:
        fmt = DatasetFormat(fmt)
    except ValueError:
        choices = ", ".join(f.value for f in DatasetFormat)
        raise DatasetError(f"unknown format {fmt!r}; choose one of {choices}") from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read: {exc.strerror or exc}", path=path) from None
    digest = hashlib.sha256(data).hexdigest()
    lines = list(_decoded_lines(data, path))
    if fmt is DatasetFormat.SMS:
        samples = list(_parse_sms(lines, path))
    elif fmt is DatasetFormat.JSONL:
        samples = list(_parse_jsonl(lines, path))
    else:
        samples = list(_parse_csv(lines, path))
    if not samples:
        raise DatasetError("no labelled messages found", path=path)
    return Dataset(samples=samples, sha256=digest, path=path, format=fmt)


def _decoded_lines(data: bytes, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending) for every line, checked for size and UTF-8."""
    if data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark some editors write
        data = data[3:]
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the final newline ends the last line; it does not start one
    for number, raw in enumerate(raw_lines, start=1):
        if len(raw) > MAX_LINE_BYTES:
            raise DatasetError(
                f"line is {len(raw):,} bytes long; at most {MAX_LINE_BYTES:,} are accepted",
                path=path,
                line=number,
            )
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(
                f"invalid UTF-8 at byte {exc.start + 1} of the line", path=path, line=number
            ) from None
        yield number, text


def _label(value: object, path: Path, line: int) -> int:
    if isinstance(value, str):
        label = _LABELS.get(value.strip().lower())
        if label is not None:
            return label
    raise DatasetError(f"label must be 'ham' or 'spam', got {value!r}", path=path, line=line)


def _parse_sms(lines: list[tuple[int, str]], path: Path) -> Iterator[tuple[str, int]]:
    for number, line in lines:
        if not line:
            continue
        label, tab, text = line.partition("\t")
        if not tab:
            raise DatasetError("no tab between label and text", path=path, line=number)
        yield text, _label(label, path, number)


def _parse_jsonl(lines: list[tuple[int, str]], path: Path) -> Iterator[tuple[str, int]]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"invalid JSON: {exc.msg}", path=path, line=number) from None
        if not isinstance(record, dict):
            raise DatasetError("each line must be a JSON object", path=path, line=number)
        if "label" not in record or "text" not in record:
            raise DatasetError("object needs 'label' and 'text'", path=path, line=number)
        text = record["text"]
        if not isinstance(text, str):
            raise DatasetError("'text' must be a string", path=path, line=number)
        yield text, _label(record["label"], path, number)


def _parse_csv(lines: list[tuple[int, str]], path: Path) -> Iterator[tuple[str, int]]:
    # Lines were checked for size and encoding; join them again for the csv module, which
    # handles quoted fields that span lines.
    text = "\n".join(line for _, line in lines)
    # A field may be as long as a line; the module's default limit (128 KiB) is lower.
    if csv.field_size_limit() < MAX_LINE_BYTES:
        csv.field_size_limit(MAX_LINE_BYTES)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise DatasetError("empty file: expected a header row with label,text", path=path)
        names = [name.strip().lower() for name in header]
        if "label" not in names or "text" not in names:
            raise DatasetError(
                f"header must name the columns 'label' and 'text', got {header!r}",
                path=path,
                line=1,
            )
        label_at, text_at = names.index("label"), names.index("text")
        for row in reader:
            number = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(names):
                raise DatasetError(
                    f"expected {len(names)} fields, got {len(row)}", path=path, line=number
                )
            yield row[text_at], _label(row[label_at], path, number)
    except csv.Error as exc:
        raise DatasetError(f"malformed CSV: {exc}", path=path, line=reader.line_num) from None
