"""The chat-spam data set (datasets/chatspam.jsonl) and the script that builds it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from stanzaguard.datasets import load_dataset

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT / "datasets" / "chatspam.jsonl"
README = ROOT / "datasets" / "README.md"
SCRIPT = ROOT / "datasets" / "make_chatspam.py"
FIELDS = ["id", "text", "label", "sender", "kind"]


@pytest.fixture(scope="module")
def make_chatspam() -> ModuleType:
    """The generator script as a module (datasets/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_chatspam", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body runs.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def records() -> list[dict[str, object]]:
    lines = DATASET.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


class TestTheFile:
    def test_the_project_reader_accepts_it(self) -> None:
        dataset = load_dataset(DATASET, "jsonl")
        assert 600 <= len(dataset.samples) <= 800
        assert 0.35 <= dataset.spam / len(dataset.samples) <= 0.45
        assert dataset.ham > 0 and dataset.spam > 0
        # The reader saw every record, in order, with its label.
        assert [text for text, _ in dataset.samples] == [r["text"] for r in records()]
        assert [label for _, label in dataset.samples] == [
            int(r["label"] == "spam") for r in records()
        ]

    def test_records_have_the_documented_fields(self) -> None:
        rows = records()
        for row in rows:
            assert list(row) == FIELDS
            assert row["label"] in ("spam", "ham")
            assert isinstance(row["text"], str) and row["text"].strip()
            assert isinstance(row["sender"], str)
            assert re.fullmatch(r"[^@/\s]+@[a-z0-9.-]+\.[a-z]+", row["sender"])
            assert isinstance(row["kind"], str) and re.fullmatch(r"[a-z_]+", row["kind"])
        assert [row["id"] for row in rows] == [f"cs-{n:04d}" for n in range(1, len(rows) + 1)]
        assert len({row["text"] for row in rows}) == len(rows)
        # Kinds belong to one label each, so they can be reported per label.
        kinds: dict[object, set[object]] = {}
        for row in rows:
            kinds.setdefault(row["kind"], set()).add(row["label"])
        assert all(len(labels) == 1 for labels in kinds.values())

    def test_sha256_matches_the_readme(self) -> None:
        digest = hashlib.sha256(DATASET.read_bytes()).hexdigest()
        documented = re.findall(r"sha256: `([0-9a-f]{64})`", README.read_text(encoding="utf-8"))
        assert documented == [digest]
        assert load_dataset(DATASET, "jsonl").sha256 == digest

    def test_the_script_regenerates_it_byte_for_byte(self) -> None:
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--check"],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "is current" in done.stdout


class TestTheScript:
    def test_check_fails_on_a_stale_file(self, make_chatspam: ModuleType, tmp_path: Path) -> None:
        stale = tmp_path / "chatspam.jsonl"
        stale.write_bytes(DATASET.read_bytes().replace(b"cs-0001", b"cs-9999", 1))
        assert make_chatspam.main(["--check", "--out", str(stale)]) == 1
        assert make_chatspam.main(["--check", "--out", str(tmp_path / "missing.jsonl")]) == 1
        assert make_chatspam.main(["--out", str(stale)]) == 0
        assert stale.read_bytes() == DATASET.read_bytes()

    def test_parses_sections_language_tags_and_escapes(self, make_chatspam: ModuleType) -> None:
        source = (
            "// comment\n\n[spam:crypto_scam]\n{ru} Привет\\u{200b}!\n"
            "[ham:dev_chat]\n```\\nprint('a\\\\b')\\n```\n"
        )
        pieces = make_chatspam.parse_pieces(source)
        assert [(p.label, p.kind, p.language, p.text) for p in pieces] == [
            ("spam", "crypto_scam", "ru", "Привет\u200b!"),
            ("ham", "dev_chat", "en", "```\nprint('a\\b')\n```"),
        ]

    @pytest.mark.parametrize(
        ("source", "line", "message"),
        [
            ("", 1, "no messages"),
            ("hello\n", 1, "before the first"),
            ("[spam:Crypto]\nx\n", 1, "bad section header"),
            ("[eggs:kind]\nx\n", 1, "bad section header"),
            ("[spam:a]\n[ham:b]\nok\n", 2, "is empty"),
            ("[spam:a]\nok\n[ham:b]\n", 3, "is empty"),
            ("[ham:a]\nbad \\q escape\n", 2, "unknown escape"),
            ("[ham:a]\ntrailing \\\n", 2, "unknown escape"),
            ("[ham:a]\n\\u{d800}\n", 2, "not a character"),
            ("[ham:a]\n\\u{110000}\n", 2, "not a character"),
            ("[ham:a]\n{de} \n", 2, "empty message"),
            ("[ham:a]\nsame\n[ham:b]\nsame\n", 4, "same message as line 2"),
            ("[ham:a]\n" + "x" * 4001 + "\n", 2, "at most 4,000"),
        ],
    )
    def test_malformed_pieces_name_the_line(
        self, make_chatspam: ModuleType, source: str, line: int, message: str
    ) -> None:
        with pytest.raises(make_chatspam.PiecesError, match=message) as info:
            make_chatspam.parse_pieces(source)
        assert info.value.line == line

    def test_near_duplicates_ignore_case_digits_punctuation_and_zero_width(
        self, make_chatspam: ModuleType
    ) -> None:
        texts = [
            "Join room42 NOW!!! free signals",
            "join room 7 now - free\u200b signals",
            "Lunch at 12:30?",
            "Bund futures up 20 ticks since the open",
        ]
        assert make_chatspam.near_duplicates(texts) == [0, 1]

    def test_obfuscation_keeps_links_and_jids_intact(self, make_chatspam: ModuleType) -> None:
        text = "Claim your reward at room@conference.quickjab.top today, whitelist closes tonight"
        rng = random.Random(1)
        for _ in range(200):
            changed, trick = make_chatspam.obfuscate(text, rng)
            if trick == "link":
                assert "quickjab.top" not in changed
            else:
                assert "room@conference.quickjab.top" in changed
                assert changed != text
