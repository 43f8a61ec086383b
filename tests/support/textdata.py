"""Labelled texts for the text-model tests: the real SMS collection and a synthetic corpus.

The SMS Spam Collection lives outside the repository, in ``../shared/data/`` next to it. Tests
that need it skip when it is absent, and fail under ``STANZAGUARD_REQUIRE_SERVICES=1`` (CI),
so a missing file cannot quietly turn them into skips.
"""

from __future__ import annotations

import random
from pathlib import Path

from tests.support.services import service_unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
SMS_COLLECTION = REPO_ROOT.parent / "shared" / "data" / "SMSSpamCollection"
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"


def sms_collection() -> Path:
    """The SMS Spam Collection's path, or skip (fail in CI) when it is not there."""
    if not SMS_COLLECTION.is_file():
        service_unavailable(f"the SMS Spam Collection is not at {SMS_COLLECTION}")
    return SMS_COLLECTION


def read_sms(limit: int | None = None) -> list[tuple[str, int]]:
    """``(text, label)`` pairs of the collection (first tab splits), without our loader."""
    samples: list[tuple[str, int]] = []
    with sms_collection().open(encoding="utf-8", newline="\n") as handle:
        for line in handle:
            label, _, text = line.rstrip("\n").partition("\t")
            samples.append((text, 1 if label == "spam" else 0))
            if limit is not None and len(samples) >= limit:
                break
    return samples


_HAM_WORDS = (
    "are",
    "we",
    "still",
    "on",
    "for",
    "lunch",
    "tomorrow",
    "i",
    "will",
    "call",
    "you",
    "later",
    "ok",
    "see",
    "you",
    "at",
    "home",
    "can",
    "you",
    "pick",
    "up",
    "milk",
    "running",
    "late",
    "sorry",
    "the",
    "meeting",
    "moved",
    "to",
    "three",
    "thanks",
    "love",
    "you",
    "mum",
    "dad",
    "how",
    "was",
    "the",
    "exam",
    "did",
    "you",
    "sleep",
    "well",
    "traffic",
    "is",
    "bad",
    "let",
    "me",
    "know",
    "when",
    "you",
    "get",
    "there",
    "happy",
    "birthday",
    "dinner",
    "tonight",
)
_SPAM_WORDS = (
    "free",
    "win",
    "winner",
    "prize",
    "claim",
    "now",
    "urgent",
    "txt",
    "reply",
    "stop",
    "call",
    "cash",
    "award",
    "guaranteed",
    "£1000",
    "ringtone",
    "offer",
    "mobile",
    "bonus",
    "draw",
    "selected",
    "congratulations",
    "www.win-big.example",
    "18+",
    "only",
    "150p/msg",
    "customer",
    "service",
)


def synthetic_corpus(n: int = 240, seed: int = 7) -> list[tuple[str, int]]:
    """A small separable-but-noisy corpus with repeated texts, like real campaigns."""
    rng = random.Random(seed)
    samples: list[tuple[str, int]] = []
    for i in range(n):
        spam = i % 4 == 0
        words = [rng.choice(_HAM_WORDS) for _ in range(rng.randint(3, 12))]
        if spam:
            for _ in range(rng.randint(2, 5)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(_SPAM_WORDS))
            if rng.random() < 0.5:
                words.append(f"{rng.randint(10000, 99999)}")
            if rng.random() < 0.3:
                words = [w.upper() for w in words]
        samples.append((" ".join(words), int(spam)))
    # Campaigns repeat: a few exact and near-exact (case, spacing) copies.
    for text, label in samples[:12]:
        samples.append((text.upper() if label else f"  {text}  ", label))
    return samples
