"""Reading labelled message files: the SMS collection, CSV, JSON Lines, and their errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stanzaguard.datasets import MAX_LINE_BYTES, DatasetError, DatasetFormat, load_dataset
from tests.support.textdata import SMS_SHA256, sms_collection


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


class TestSmsCollection:
    def test_reads_every_line(self) -> None:
        dataset = load_dataset(sms_collection(), "sms")
        assert len(dataset.samples) == 5574
        assert dataset.ham == 4827
        assert dataset.spam == 747
        assert dataset.sha256 == SMS_SHA256
        assert dataset.describe()["rows"] == 5574
        # The lines a CSV reader would merge: texts that begin with a double quote.
        quoted = [text for text, _ in dataset.samples if text.startswith('"')]
        assert len(quoted) > 2


class TestSms:
    def test_splits_on_the_first_tab_only_and_keeps_quotes(self, tmp_path: Path) -> None:
        data = b'ham\t"quoted start\nspam\tWin\tnow "free"\r\nHAM \tok\n\n'
        dataset = load_dataset(write(tmp_path, "d.txt", data), DatasetFormat.SMS)
        assert dataset.samples == [('"quoted start', 0), ('Win\tnow "free"', 1), ("ok", 0)]
        assert dataset.sha256 == hashlib.sha256(data).hexdigest()

    @pytest.mark.parametrize(
        ("data", "line", "message"),
        [
            (b"ham\tok\nspam no tab\n", 2, "no tab"),
            (b"ham\tok\nmaybe\ttext\n", 2, "label must be 'ham' or 'spam'"),
            (b"ham\tok\nham\t\xff\xfe bad\n", 2, "invalid UTF-8"),
            (b"ham\tok\nham\tok\nspam\t" + b"x" * (MAX_LINE_BYTES + 1) + b"\n", 3, "bytes long"),
        ],
    )
    def test_errors_name_the_line(
        self, tmp_path: Path, data: bytes, line: int, message: str
    ) -> None:
        path = write(tmp_path, "d.txt", data)
        with pytest.raises(DatasetError, match=message) as info:
            load_dataset(path, "sms")
        assert info.value.line == line
        assert f"{path}:{line}:" in str(info.value)

    def test_empty_file_and_missing_file_and_unknown_format(self, tmp_path: Path) -> None:
        with pytest.raises(DatasetError, match="no labelled messages"):
            load_dataset(write(tmp_path, "empty.txt", b"\n\n"), "sms")
        with pytest.raises(DatasetError, match="cannot read"):
            load_dataset(tmp_path / "absent.txt", "sms")
        with pytest.raises(DatasetError, match="unknown format"):
            load_dataset(write(tmp_path, "d.txt", b"ham\tok\n"), "xml")

    def test_byte_order_mark_is_ignored(self, tmp_path: Path) -> None:
        dataset = load_dataset(write(tmp_path, "d.txt", b"\xef\xbb\xbfspam\tWIN\n"), "sms")
        assert dataset.samples == [("WIN", 1)]


class TestCsv:
    def test_header_quoting_and_multiline_fields(self, tmp_path: Path) -> None:
        data = b'id,Text,Label\n1,"hello, ""world""",ham\n2,"two\nlines",SPAM\n3,"""quoted""",ham\n'
        dataset = load_dataset(write(tmp_path, "d.csv", data), "csv")
        assert dataset.samples == [
            ('hello, "world"', 0),
            ("two\nlines", 1),
            ('"quoted"', 0),
        ]

    @pytest.mark.parametrize(
        ("data", "line", "message"),
        [
            (b"text,label\nhi,ham\nbye,maybe\n", 3, "label must be"),
            (b"text,label\nhi,ham\nbye,ham,extra\n", 3, "expected 2 fields"),
            (b"message,class\nhi,ham\n", 1, "header must name"),
            (b'text,label\n"unterminated,ham\n', 2, "malformed CSV"),
            (b"text,label\nhi,ham\n\xc3(,spam\n", 3, "invalid UTF-8"),
        ],
    )
    def test_errors_name_the_line(
        self, tmp_path: Path, data: bytes, line: int, message: str
    ) -> None:
        with pytest.raises(DatasetError, match=message) as info:
            load_dataset(write(tmp_path, "d.csv", data), "csv")
        assert info.value.line == line

    def test_long_field_within_the_line_limit(self, tmp_path: Path) -> None:
        text = "y" * 200_000  # beyond the csv module's default field limit
        dataset = load_dataset(
            write(tmp_path, "d.csv", f"text,label\n{text},spam\n".encode()), "csv"
        )
        assert dataset.samples == [(text, 1)]


class TestJsonl:
    def test_objects_with_label_and_text(self, tmp_path: Path) -> None:
        lines = [
            {"label": "spam", "text": "win"},
            {"label": "ham", "text": "hi", "extra": 1},
        ]
        data = "\n".join(json.dumps(x) for x in lines).encode() + b"\n\n"
        dataset = load_dataset(write(tmp_path, "d.jsonl", data), "jsonl")
        assert dataset.samples == [("win", 1), ("hi", 0)]

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            (b"{not json", "invalid JSON"),
            (b"[1, 2]", "JSON object"),
            (b'{"label": "ham"}', "needs 'label' and 'text'"),
            (b'{"label": "ham", "text": 5}', "'text' must be a string"),
            (b'{"label": 1, "text": "x"}', "label must be"),
        ],
    )
    def test_errors_name_the_line(self, tmp_path: Path, line: bytes, message: str) -> None:
        data = b'{"label": "ham", "text": "ok"}\n' + line + b"\n"
        with pytest.raises(DatasetError, match=message) as info:
            load_dataset(write(tmp_path, "d.jsonl", data), "jsonl")
        assert info.value.line == 2
