"""Build ``datasets/chatspam.jsonl`` from the hand-written messages in ``chatspam_pieces.txt``.

Every message text was written by hand by the StanzaGuard team (see the pieces file); this
script only adds what is tedious to do by hand, deterministically from a fixed seed:

- obfuscation of about a quarter of the English spam, the way SPIM dodges word filters
  (s p a c e d letters, l33t digits, Cyrillic lookalike letters, zero-width characters inside
  words, mangled link hosts);
- senders: throwaway JIDs on a handful of invented spammy domains for spam (some reused, as
  spammers do), colleagues and partners at invented corporate domains for ham;
- the order (shuffled) and the ids ``cs-0001`` ... in that order.

It then measures the near-duplicate rate and refuses to write a file above
`MAX_NEAR_DUPLICATE_RATE`. The output is byte-identical on every run (CPython 3.11+):

    .venv/bin/python datasets/make_chatspam.py           # write datasets/chatspam.jsonl
    .venv/bin/python datasets/make_chatspam.py --check   # exit 1 if the file is not current
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIECES_PATH = HERE / "chatspam_pieces.txt"
OUTPUT_PATH = HERE / "chatspam.jsonl"

SEED = 20251122
#: Share of English spam lines that get one obfuscation.
OBFUSCATED_SHARE = 0.25
#: Share of spam lines sent from a JID that already sent an earlier spam line.
REUSED_SENDER_SHARE = 0.3
#: Two lines are near-duplicates when their normalised texts are equal, or when the Jaccard
#: similarity of their character 5-gram sets reaches this value.
NEAR_DUPLICATE_JACCARD = 0.8
MAX_NEAR_DUPLICATE_RATE = 0.05
#: Far above any chat message; a longer line in the pieces file is a mistake.
MAX_PIECE_CHARS = 4000

LABELS = ("spam", "ham")
_SECTION = re.compile(r"\[(spam|ham):([a-z][a-z_]*)\]")
_LANGUAGE_TAG = re.compile(r"\{([a-z]{2})\}(?: |$)")
_ESCAPE = re.compile(r"\\(?:u\{([0-9a-fA-F]{1,6})\}|(.)|$)")
_ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\u2060")
#: Latin letter -> the Cyrillic letter that looks the same (named, as they are indistinguishable).
_HOMOGLYPHS = str.maketrans(
    {
        latin: unicodedata.lookup(f"CYRILLIC {name}")
        for latin, name in {
            "a": "SMALL LETTER A",
            "e": "SMALL LETTER IE",
            "o": "SMALL LETTER O",
            "p": "SMALL LETTER ER",
            "c": "SMALL LETTER ES",
            "x": "SMALL LETTER HA",
            "y": "SMALL LETTER U",
            "i": "SMALL LETTER BYELORUSSIAN-UKRAINIAN I",
            "A": "CAPITAL LETTER A",
            "E": "CAPITAL LETTER IE",
            "O": "CAPITAL LETTER O",
            "P": "CAPITAL LETTER ER",
            "C": "CAPITAL LETTER ES",
            "X": "CAPITAL LETTER HA",
            "H": "CAPITAL LETTER EN",
            "K": "CAPITAL LETTER KA",
            "M": "CAPITAL LETTER EM",
            "T": "CAPITAL LETTER TE",
        }.items()
    }
)
_LEET = str.maketrans("aeiostAEIOST", "431057431057")
_URL = re.compile(r"(https?://)?([a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:top|xyz|click|cc|ru|biz))\b")
_PLAIN_WORD = re.compile(r"[A-Za-z]{4,}")

SPAM_DOMAINS = (
    "quickjab.top",
    "freexmpp.click",
    "anonchat24.xyz",
    "jabberfree.cc",
    "im-zone.ru",
    "jmsg.biz",
    "jabb3r.top",
    "xmpp24.top",
    "anonjab.xyz",
)
#: Local-part stems spammers pick, per kind; a random junk string is used as often.
SPAM_STEMS: dict[str, tuple[str, ...]] = {
    "crypto_scam": ("btc.mentor", "cryptoqueen", "yield.pro", "invest", "lisa.trade", "mr.profit"),
    "pump_dump": ("pumpking", "moon.signals", "whale.alert", "gem.hunter"),
    "account_sale": ("seller", "accshop", "bulk.sender", "jabshop", "xmpp.store"),
    "group_promo": ("promo", "channel.admin", "vip.group", "free.stuff"),
    "phishing": ("admin", "support", "security", "noreply", "service.desk", "abuse"),
    "dating": ("anna", "katya", "mia.sweet", "alina", "emily", "jessica"),
    "job_scam": ("hr.recruit", "jobs", "sarah.hr", "career", "hiring.team"),
    "market_ad": ("shop", "vendor", "docs", "cc.seller", "market"),
    "muc_join": ("botmaster", "room.admin", "inviter", "party"),
    "prize_scam": ("winner.desk", "claims", "lottery", "reward", "barrister"),
    "service_ad": ("seo.pro", "boost", "loans", "casino.vip", "traffic"),
}
CORPORATE_DOMAINS = ("harbourline.example", "harbourline.example", "ops.harbourline.example")
PARTNER_DOMAINS = ("kestrelbank.example", "brightwater-legal.example")
#: Colleagues by the language they write in ("en" also stands for every other language).
COLLEAGUES: dict[str, tuple[str, ...]] = {
    "en": (
        "olivia.grant",
        "sam.okoro",
        "priya.nair",
        "tom.hughes",
        "marta.lopez",
        "jonas.berg",
        "clara.visser",
        "pieter.dekker",
        "anke.jansen",
        "david.cohen",
        "aisha.rahman",
        "liam.byrne",
        "sanne.smit",
        "kenji.sato",
        "emma.walsh",
        "ruben.meijer",
    ),
    "de": ("katrin.vogel", "felix.hartmann", "sabine.krause", "lukas.brandt"),
    "es": ("lucia.moreno", "javier.ruiz", "carmen.ortega"),
    "fr": ("camille.durand", "julien.petit"),
    "ru": ("irina.sokolova", "dmitri.volkov", "olga.petrova"),
    "zh": ("wei.zhang", "li.na", "chen.hao"),
    "nl": ("bram.devries", "lotte.bakker"),
    "pt": ("joao.silva",),
    "it": ("giulia.rossi",),
    "pl": ("marek.nowak",),
}
#: Ham kinds in which partner firms write too, not only colleagues.
PARTNER_KINDS = frozenset({"trading_desk", "meeting", "muc_legit"})


class PiecesError(ValueError):
    """The pieces file is malformed; the message names the line."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(f"{PIECES_PATH.name}:{line}: {message}")
        self.line = line


@dataclass(frozen=True, slots=True)
class Piece:
    label: str
    kind: str
    language: str
    text: str
    line: int


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    text: str
    label: str
    sender: str
    kind: str

    def to_json(self) -> str:
        fields = {
            "id": self.id,
            "text": self.text,
            "label": self.label,
            "sender": self.sender,
            "kind": self.kind,
        }
        return json.dumps(fields, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Build:
    records: list[Record]
    pieces: list[Piece]
    obfuscations: Counter[str]
    near_duplicates: list[int]

    @property
    def near_duplicate_rate(self) -> float:
        return len(self.near_duplicates) / len(self.records)

    def jsonl(self) -> bytes:
        return "".join(record.to_json() + "\n" for record in self.records).encode("utf-8")


# -- reading the pieces ---------------------------------------------------------------------


def unescape(raw: str, line: int) -> str:
    r"""Resolve ``\n``, ``\\`` and ``\u{hex}``; any other backslash is an error."""

    def replace(match: re.Match[str]) -> str:
        code, char = match.group(1), match.group(2)
        if code is not None:
            value = int(code, 16)
            if value > sys.maxunicode or 0xD800 <= value <= 0xDFFF:
                raise PiecesError(f"\\u{{{code}}} is not a character", line)
            return chr(value)
        if char == "n":
            return "\n"
        if char == "\\":
            return "\\"
        shown = "\\" + (char or "")
        raise PiecesError(f"unknown escape {shown!r} (use \\n, \\\\ or \\u{{hex}})", line)

    return _ESCAPE.sub(replace, raw)


def parse_pieces(source: str) -> list[Piece]:
    """The messages of a pieces file, in file order; `PiecesError` on the first problem."""
    pieces: list[Piece] = []
    section: tuple[str, str] | None = None
    in_section = 0
    for number, raw in enumerate(source.splitlines(), start=1):
        line = raw.rstrip()
        if not line or line.startswith("//"):
            continue
        header = _SECTION.fullmatch(line)
        if header is not None:
            if section is not None and in_section == 0:
                raise PiecesError(f"section [{section[0]}:{section[1]}] is empty", number)
            section, in_section = (header.group(1), header.group(2)), 0
            continue
        if line.startswith("[") and line.endswith("]"):
            raise PiecesError(f"bad section header {line!r}: use [spam:kind] or [ham:kind]", number)
        if section is None:
            raise PiecesError("message before the first [spam:kind] or [ham:kind] header", number)
        if len(line) > MAX_PIECE_CHARS:
            raise PiecesError(f"message is {len(line):,} characters; at most 4,000", number)
        language = "en"
        tag = _LANGUAGE_TAG.match(line)
        if tag is not None:
            language, line = tag.group(1), line[tag.end() :]
        text = unescape(line, number).strip()
        if not text:
            raise PiecesError("empty message", number)
        pieces.append(Piece(section[0], section[1], language, text, number))
        in_section += 1
    if section is not None and in_section == 0:
        raise PiecesError(f"section [{section[0]}:{section[1]}] is empty", len(source.splitlines()))
    if not pieces:
        raise PiecesError("no messages", 1)
    seen: dict[str, int] = {}
    for piece in pieces:
        if piece.text in seen:
            raise PiecesError(f"same message as line {seen[piece.text]}", piece.line)
        seen[piece.text] = piece.line
    return pieces


# -- obfuscation ----------------------------------------------------------------------------


def _spaced(word: str, rng: random.Random) -> str:
    return " ".join(word)


def _leet(word: str, rng: random.Random) -> str:
    return word.translate(_LEET)


def _homoglyphs(word: str, rng: random.Random) -> str:
    return word.translate(_HOMOGLYPHS)


def _zero_width(word: str, rng: random.Random) -> str:
    mark = rng.choice(_ZERO_WIDTH)
    cuts = sorted(rng.sample(range(1, len(word)), k=min(2, len(word) - 1)))
    parts = [word[a:b] for a, b in zip([0, *cuts], [*cuts, len(word)], strict=True)]
    return mark.join(parts)


_WORD_TRICKS = {
    "spaced": _spaced,
    "leet": _leet,
    "homoglyph": _homoglyphs,
    "zero_width": _zero_width,
}


def _mangle_link(match: re.Match[str], rng: random.Random) -> str:
    scheme, host = match.group(1) or "", match.group(2)
    style = rng.choice(("dot", "bracket", "space"))
    if style == "dot":
        host = host.replace(".", "(dot)")
    elif style == "bracket":
        host = host.replace(".", "[.]")
    else:
        host = host.replace(".", " . ")
    return ("hxxps://" if scheme == "https://" else scheme.replace("http", "hxxp")) + host


def obfuscate(text: str, rng: random.Random) -> tuple[str, str]:
    """``text`` with one trick applied, and the trick's name (``""`` when none fits)."""
    tricks = list(_WORD_TRICKS)
    if _URL.search(text):
        tricks.append("link")
    trick = rng.choice(tricks)
    if trick == "link":
        return _URL.sub(lambda match: _mangle_link(match, rng), text, count=1), trick
    tokens = text.split(" ")
    # Only whole plain words: never a URL, JID, number or a word with punctuation attached.
    candidates = [i for i, token in enumerate(tokens) if _PLAIN_WORD.fullmatch(token)]
    if not candidates:
        return text, ""
    # Spammers disguise the words a filter would look for, which are the longer ones.
    candidates.sort(key=lambda i: (-len(tokens[i]), i))
    chosen = rng.sample(candidates[:4], k=min(len(candidates[:4]), rng.randint(1, 2)))
    for index in chosen:
        tokens[index] = _WORD_TRICKS[trick](tokens[index], rng)
    return " ".join(tokens), trick


# -- senders --------------------------------------------------------------------------------


def _junk_localpart(rng: random.Random) -> str:
    alphabet = string.ascii_lowercase + string.digits
    return rng.choice(string.ascii_lowercase) + "".join(
        rng.choice(alphabet) for _ in range(rng.randint(5, 9))
    )


def spam_senders(pieces: Sequence[Piece], rng: random.Random) -> list[str]:
    senders: list[str] = []
    used: dict[str, list[str]] = {}
    for piece in pieces:
        earlier = used.setdefault(piece.kind, [])
        if earlier and rng.random() < REUSED_SENDER_SHARE:
            senders.append(rng.choice(earlier))
            continue
        if rng.random() < 0.5:
            local = _junk_localpart(rng)
        else:
            stem = rng.choice(SPAM_STEMS.get(piece.kind, ("user",)))
            local = f"{stem}{rng.choice(('', '.', '_'))}{rng.randint(1, 9999)}"
        sender = f"{local}@{rng.choice(SPAM_DOMAINS)}"
        earlier.append(sender)
        senders.append(sender)
    return senders


def ham_sender(piece: Piece, rng: random.Random) -> str:
    names = COLLEAGUES.get(piece.language, COLLEAGUES["en"])
    if piece.kind in PARTNER_KINDS and piece.language == "en" and rng.random() < 0.25:
        return f"{rng.choice(names)}@{rng.choice(PARTNER_DOMAINS)}"
    return f"{rng.choice(names)}@{rng.choice(CORPORATE_DOMAINS)}"


# -- near-duplicates ------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lower case, letters only: digits, punctuation, symbols, emoji and format characters go."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = (
        char if unicodedata.category(char).startswith("L") else " "
        for char in folded
        if unicodedata.category(char) != "Cf"
    )
    return " ".join("".join(kept).split())


def _shingles(text: str, size: int = 5) -> frozenset[str]:
    if len(text) <= size:
        return frozenset({text})
    return frozenset(text[i : i + size] for i in range(len(text) - size + 1))


def near_duplicates(texts: Iterable[str]) -> list[int]:
    """Indexes of the texts that have a near-duplicate elsewhere in ``texts``."""
    normal = [normalise(text) for text in texts]
    shingles = [_shingles(text) for text in normal]
    # Equal normalised texts have equal shingle sets, so Jaccard alone decides. Jaccard is at
    # most the ratio of the two set sizes: walking the texts by size, the inner loop can stop
    # at the first one too large to reach the threshold.
    by_size = sorted(range(len(shingles)), key=lambda i: len(shingles[i]))
    found: set[int] = set()
    for position, i in enumerate(by_size):
        a = shingles[i]
        for j in by_size[position + 1 :]:
            b = shingles[j]
            if len(a) < NEAR_DUPLICATE_JACCARD * len(b):
                break
            # Shingle sets are never empty (a short text is its own shingle).
            if len(a & b) >= NEAR_DUPLICATE_JACCARD * len(a | b):
                found.update((i, j))
    return sorted(found)


# -- the build ------------------------------------------------------------------------------


def build(source: str, seed: int = SEED) -> Build:
    pieces = parse_pieces(source)
    rng = random.Random(seed)
    texts = [piece.text for piece in pieces]
    obfuscations: Counter[str] = Counter()
    eligible = [
        i for i, piece in enumerate(pieces) if piece.label == "spam" and piece.language == "en"
    ]
    for i in sorted(rng.sample(eligible, k=round(len(eligible) * OBFUSCATED_SHARE))):
        texts[i], trick = obfuscate(texts[i], rng)
        if trick:
            obfuscations[trick] += 1
    spam = [piece for piece in pieces if piece.label == "spam"]
    spam_from = iter(spam_senders(spam, rng))
    senders = [
        next(spam_from) if piece.label == "spam" else ham_sender(piece, rng) for piece in pieces
    ]
    order = list(range(len(pieces)))
    rng.shuffle(order)
    records = [
        Record(
            id=f"cs-{position:04d}",
            text=texts[i],
            label=pieces[i].label,
            sender=senders[i],
            kind=pieces[i].kind,
        )
        for position, i in enumerate(order, start=1)
    ]
    shuffled_pieces = [pieces[i] for i in order]
    duplicates = near_duplicates(record.text for record in records)
    return Build(records, shuffled_pieces, obfuscations, duplicates)


def summary(result: Build, digest: str) -> str:
    records = result.records
    by_label = Counter(record.label for record in records)
    by_kind = Counter((record.label, record.kind) for record in records)
    by_language = Counter((piece.label, piece.language) for piece in result.pieces)
    lines = [
        f"rows {len(records)}, spam {by_label['spam']} ({by_label['spam'] / len(records):.1%}),"
        f" ham {by_label['ham']}",
        f"sha256 {digest}",
        f"near-duplicates {len(result.near_duplicates)} lines"
        f" ({result.near_duplicate_rate:.1%}; at most {MAX_NEAR_DUPLICATE_RATE:.0%})",
        "obfuscated spam: "
        + ", ".join(f"{name} {count}" for name, count in sorted(result.obfuscations.items())),
        "",
        "| label | kind | rows |",
        "|---|---|---:|",
    ]
    lines += [f"| {label} | {kind} | {n} |" for (label, kind), n in sorted(by_kind.items())]
    lines += ["", "| label | language | rows |", "|---|---|---:|"]
    lines += [f"| {label} | {lang} | {n} |" for (label, lang), n in sorted(by_language.items())]
    duplicates = [records[i] for i in result.near_duplicates]
    if duplicates:
        lines += ["", "near-duplicate lines:"]
        lines += [f"  {record.id} {record.label}: {record.text[:70]!r}" for record in duplicates]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=OUTPUT_PATH, help="where to write the JSONL")
    parser.add_argument(
        "--check", action="store_true", help="only compare --out with a fresh build; exit 1 if not"
    )
    args = parser.parse_args(argv)
    try:
        result = build(PIECES_PATH.read_text(encoding="utf-8"))
    except PiecesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = result.jsonl()
    digest = hashlib.sha256(data).hexdigest()
    print(summary(result, digest))
    if result.near_duplicate_rate > MAX_NEAR_DUPLICATE_RATE:
        print("error: too many near-duplicates; nothing written", file=sys.stderr)
        return 2
    out: Path = args.out
    if args.check:
        current = out.read_bytes() if out.exists() else b""
        if current != data:
            print(f"error: {out} differs from a fresh build; run without --check", file=sys.stderr)
            return 1
        print(f"{out} is current")
        return 0
    out.write_bytes(data)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
