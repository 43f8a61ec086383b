"""The text model: hashed word and character n-grams, TF-IDF, a linear model, Platt scaling.

Pure: no file or network I/O, and nothing but numpy and the standard library at scoring time
(scikit-learn is a training dependency only, see ``classifier.train``).

Features. A text is cut to `FeatureConfig.max_chars` characters and split on whitespace. Each
whitespace-separated word (lowercased on its own) yields three kinds of features, each kind in
its own *block*:

- ``char``: the character n-grams (``char_ngrams``, default 1-5) of the word padded with one
  space on each side (scikit-learn's ``char_wb``); 1-grams skip the two padding spaces.
- ``word``: its tokens (``\\w+`` runs and single punctuation characters). Token n-grams
  (``word_ngrams``, default 1-2) run across the whole text, joined with one space.
- ``shape``: ``digits:N`` per run of N digits (N capped at 8), ``caps`` for a word of two or
  more characters in capitals, ``url`` and ``money`` for words that look like a link or carry
  a currency sign; plus two per-text features bucketing its length and word count.

Every feature string is hashed (CRC-32 with a per-block seed, then a multiplicative mix) to a
bucket in ``[0, 2**bits)`` of its block and a sign. Features are grouped per (bucket, sign)
and counted; a group's value is ``sign * (1 + log count) * idf[bucket]``, where ``idf`` is the
smoothed inverse document frequency ``log((1 + n) / (1 + df)) + 1`` of the training data.
Buckets never seen in training have no idf: they are dropped before normalisation, exactly as
a fitted ``TfidfVectorizer`` ignores words outside its vocabulary. (Keeping them shrank every
unfamiliar message's score toward "ham" and cost about two points of spam caught.) Each block
is l2-normalised over its groups and scaled by its block weight. Groups that share a bucket
add up, so the model sees one value per bucket: ``decision = intercept + weights . x``, and
``P(spam) = 1 / (1 + exp(-(slope * decision + offset)))``.

Scoring is exact (the same floating-point operations as the training vectoriser's sparse
matrix fed to scikit-learn, up to the order of additions) and fast: the features of each
distinct word (as written) and of each bigram spanning two words are computed once and kept
in bounded per-model caches, so scoring a message is a few dictionary look-ups plus about
fifteen numpy calls on a few hundred integers. A word never seen before is hashed in Python,
one CRC-32 per n-gram (short n-grams are memoised too): tens of microseconds per new word.
The caches make a model object stateful but not order-dependent: results never depend on
what was scored before.
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from classifier.errors import ClassifierError

FORMAT_NAME: Final = "stanzaguard-text-model"
FORMAT_VERSION: Final = 1
HASH_NAME: Final = "crc32-fib-v1"

#: Bounds a model must respect to be accepted: generous for real models, small enough that
#: a hostile file cannot make the loader allocate gigabytes.
MAX_BITS: Final = 24
MIN_BITS: Final = 8
MAX_MAX_CHARS: Final = 1_000_000
MAX_NGRAM: Final = 8
MAX_FEATURES: Final = 4_000_000

INT64 = npt.NDArray[np.int64]
FLOAT64 = npt.NDArray[np.float64]
#: Global bucket -> slot in the model's arrays, or None for a bucket unseen in training.
SlotOf = Callable[[int], int | None]

# \w runs and single punctuation characters: "win £100!" -> ["win", "£", "100", "!"].
_TOKEN = re.compile(r"\w+|[^\w\s]")
_DIGITS = re.compile(r"\d+")
_URL = re.compile(r"www\.|https?:|://|\.(?:com|net|org|info|biz|co\.uk|ly)\b")
_CURRENCY = frozenset("£$€¥₹")

# Odd 32-bit constant (2**32 / golden ratio): multiplying by it spreads every bit of the
# CRC into the top bits, which become the bucket.
_FIB32: Final = 0x9E3779B1
_MASK32: Final = 0xFFFFFFFF
# Caches are cleared wholesale when full: cheaper per call than LRU bookkeeping, and a
# refill costs only the first sighting of each word again.
_WORD_CACHE_MAX: Final = 100_000
_BIGRAM_CACHE_MAX: Final = 200_000
_GRAM_MEMO_MAX: Final = 200_000
_TF_TABLE: Final = 4096
# Words longer than this are not cached (hostile input must not fill memory).
_CACHEABLE_WORD_CHARS: Final = 64


class ModelError(ClassifierError, ValueError):
    """A model's arrays or metadata are not valid."""


class Block(IntEnum):
    """The feature blocks; each has its own hash seed, bucket range and normalisation."""

    WORD = 0
    CHAR = 1
    SHAPE = 2


_SEEDS: Final = {Block.WORD: 0x5747_0001, Block.CHAR: 0x5747_0002, Block.SHAPE: 0x5747_0003}


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """How text becomes features; stored in the model's metadata and checked on load.

    Attributes:
        bits: Buckets per block are ``2**bits``.
        word_ngrams: Smallest and largest token n-gram.
        char_ngrams: Smallest and largest character n-gram (within padded words).
        block_weights: Scale of the word, char and shape blocks after normalisation.
        sublinear_tf: ``1 + log(count)`` instead of the raw count.
        max_chars: Only this many leading characters of a text are looked at.
    """

    bits: int = 20
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (1, 5)
    block_weights: tuple[float, float, float] = (1.0, 1.0, 0.5)
    sublinear_tf: bool = True
    max_chars: int = 20_000

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ModelError(f"features.bits must be an integer in [{MIN_BITS}, {MAX_BITS}]")
        low, high = self.word_ngrams
        if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high <= 2):
            # Bigrams at most: the scorer caches the one bigram that spans two words.
            raise ModelError("features.word_ngrams must be [1, 1], [1, 2] or [2, 2]")
        low, high = self.char_ngrams
        if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high <= MAX_NGRAM):
            raise ModelError(
                f"features.char_ngrams must be [low, high] with 1 <= low <= high <= {MAX_NGRAM}"
            )
        if len(self.block_weights) != len(Block) or not all(
            isinstance(w, float) and math.isfinite(w) and 0.0 <= w <= 1e3
            for w in self.block_weights
        ):
            raise ModelError(f"features.block_weights must be {len(Block)} numbers in [0, 1000]")
        if not isinstance(self.max_chars, int) or not 1 <= self.max_chars <= MAX_MAX_CHARS:
            raise ModelError(f"features.max_chars must be an integer in [1, {MAX_MAX_CHARS}]")
        if not isinstance(self.sublinear_tf, bool):
            raise ModelError("features.sublinear_tf must be true or false")

    @property
    def n_buckets(self) -> int:
        """Buckets over all blocks."""
        return len(Block) << self.bits

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["hash"] = HASH_NAME
        data["word_ngrams"] = list(self.word_ngrams)
        data["char_ngrams"] = list(self.char_ngrams)
        data["block_weights"] = list(self.block_weights)
        return data

    @classmethod
    def from_json(cls, data: object) -> FeatureConfig:
        if not isinstance(data, Mapping):
            raise ModelError("metadata 'features' must be an object")
        if data.get("hash") != HASH_NAME:
            raise ModelError(
                f"unsupported feature hash {data.get('hash')!r}; expected {HASH_NAME!r}"
            )
        known = {"bits", "word_ngrams", "char_ngrams", "block_weights", "sublinear_tf", "max_chars"}
        unknown = set(data) - known - {"hash"}
        if unknown:
            raise ModelError(f"unknown feature settings: {', '.join(sorted(unknown))}")
        missing = known - set(data)
        if missing:
            raise ModelError(f"missing feature settings: {', '.join(sorted(missing))}")
        try:
            return cls(
                bits=_json_int(data["bits"], "bits"),
                word_ngrams=_pair(data["word_ngrams"], "word_ngrams"),
                char_ngrams=_pair(data["char_ngrams"], "char_ngrams"),
                block_weights=_weights(data["block_weights"]),
                sublinear_tf=data["sublinear_tf"],
                max_chars=_json_int(data["max_chars"], "max_chars"),
            )
        except TypeError as exc:
            raise ModelError(f"invalid feature settings: {exc}") from None


def _json_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"features.{name} must be an integer")
    return value


def _pair(value: object, name: str) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ModelError(f"features.{name} must be a list of two integers")
    return (_json_int(value[0], name), _json_int(value[1], name))


def _weights(value: object) -> tuple[float, float, float]:
    if not isinstance(value, list | tuple) or len(value) != len(Block):
        raise ModelError(f"features.block_weights must be a list of {len(Block)} numbers")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise ModelError("features.block_weights must hold numbers")
        out.append(float(item))
    return (out[0], out[1], out[2])


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Probability thresholds chosen during training (see ``classifier.train``).

    ``block``: the operating point for stopping a message (kept blocked ham at the target rate
    on held-out data); ``flag``: a looser point for queueing messages for review.
    """

    block: float
    flag: float

    def __post_init__(self) -> None:
        for name in ("block", "flag"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, float) or not 0.0 <= value <= 1.0:
                raise ModelError(f"thresholds.{name} must be a number in [0, 1]")
        if self.flag > self.block:
            raise ModelError("thresholds.flag must not exceed thresholds.block")

    def to_json(self) -> dict[str, float]:
        return {"block": self.block, "flag": self.flag}

    @classmethod
    def from_json(cls, data: object) -> Thresholds:
        if not isinstance(data, Mapping) or set(data) != {"block", "flag"}:
            raise ModelError("metadata 'thresholds' must be an object with 'block' and 'flag'")
        values = []
        for name in ("block", "flag"):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ModelError(f"thresholds.{name} must be a number in [0, 1]")
            values.append(float(value))
        return cls(block=values[0], flag=values[1])


# --- hashing ------------------------------------------------------------------------------


class Featurizer:
    """Turns text into hashed feature codes, ``bucket * 2 + sign_bit`` (global buckets).

    This is the one definition of the features: training builds its matrix from
    `occurrences`, and `TextModel` reuses `word_codes` and `ngram_code` for its cached path.
    """

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config
        bits = config.bits
        self._bucket_shift = 32 - bits
        self._sign_shift = 31 - bits
        self._bases = {block: int(block) << bits for block in Block}
        self._unigrams = config.word_ngrams[0] == 1
        self.bigrams = config.word_ngrams[1] == 2
        self._char_n = config.char_ngrams
        # The per-text shape features come from a small closed set: hash them once.
        self.length_codes = [self.ngram_code(Block.SHAPE, f"chars:{i}") for i in range(9)]
        self.count_codes = [self.ngram_code(Block.SHAPE, f"words:{i}") for i in range(9)]
        self.caps_code = self.ngram_code(Block.SHAPE, "caps")

    def ngram_code(self, block: Block, feature: str) -> int:
        """The code of one feature string in ``block``."""
        # surrogatepass: a lone surrogate (valid in a Python str, not in UTF-8) must hash,
        # not raise.
        crc = zlib.crc32(feature.encode("utf-8", "surrogatepass"), _SEEDS[block])
        mixed = (crc * _FIB32) & _MASK32
        bucket = self._bases[block] | (mixed >> self._bucket_shift)
        return (bucket << 1) | ((mixed >> self._sign_shift) & 1)

    def codes(
        self, block: Block, features: Iterable[str], slot_of: SlotOf | None = None
    ) -> list[int]:
        """`ngram_code` of many features (the same arithmetic, without per-call overhead)."""
        encoded = [f.encode("utf-8", "surrogatepass") for f in features]
        return self.byte_codes(block, encoded, slot_of)

    def byte_codes(
        self,
        block: Block,
        features: Iterable[bytes],
        slot_of: SlotOf | None = None,
        memo: dict[bytes, int] | None = None,
    ) -> list[int]:
        """Codes of features given as their UTF-8 bytes.

        With ``slot_of`` (global bucket -> slot, or None), compact codes ``slot * 2 + sign``
        of the features in known buckets instead: the scorer's cache misses take this path,
        and mapping inside the hashing loop saves a second pass. ``memo`` remembers compact
        codes (-1: unknown) of features seen before; short n-grams recur across words.
        """
        crc = zlib.crc32
        seed = _SEEDS[block]
        base = self._bases[block]
        bucket_shift = self._bucket_shift
        sign_shift = self._sign_shift
        out: list[int] = []
        append = out.append
        if slot_of is None:
            for feature in features:
                mixed = (crc(feature, seed) * _FIB32) & _MASK32
                append(((base | (mixed >> bucket_shift)) << 1) | ((mixed >> sign_shift) & 1))
            return out
        if memo is None:
            for feature in features:
                mixed = (crc(feature, seed) * _FIB32) & _MASK32
                slot = slot_of(base | (mixed >> bucket_shift))
                if slot is not None:
                    append((slot << 1) | ((mixed >> sign_shift) & 1))
            return out
        remembered = memo.get
        for feature in features:
            code = remembered(feature)
            if code is None:
                mixed = (crc(feature, seed) * _FIB32) & _MASK32
                slot = slot_of(base | (mixed >> bucket_shift))
                code = -1 if slot is None else (slot << 1) | ((mixed >> sign_shift) & 1)
                if len(memo) >= _GRAM_MEMO_MAX:
                    memo.clear()
                memo[feature] = code
            if code >= 0:
                append(code)
        return out

    def word_codes(
        self, lower: str, slot_of: SlotOf | None = None, memo: dict[bytes, int] | None = None
    ) -> tuple[list[int], list[str]]:
        """Codes of one lowercased whitespace-separated word's features, and its tokens.

        Includes the token bigrams inside the word ("£100!" -> "£ 100", "100 !"), not those
        spanning two words, nor ``caps`` (which needs the original case). With ``slot_of``,
        compact codes of the known features only (see `byte_codes`).
        """
        low, high = self._char_n
        padded = f" {lower} "
        size = len(padded)
        # For ASCII, character n-grams are byte n-grams: slicing the encoded word once saves
        # encoding every n-gram (most words of most chats take this path).
        text: str | bytes = padded.encode("ascii") if padded.isascii() else padded
        grams: list[Any] = []
        for n in range(low, high + 1):
            # 1-grams skip the padding spaces: they are not features of their own.
            first, last = (1, size - 1) if n == 1 else (0, size - n + 1)
            grams.extend([text[i : i + n] for i in range(first, last)])
        if isinstance(text, bytes):
            codes = self.byte_codes(Block.CHAR, grams, slot_of, memo)
        else:
            codes = self.codes(Block.CHAR, grams, slot_of)
        tokens = _TOKEN.findall(lower)
        if self._unigrams:
            codes += self.codes(Block.WORD, tokens, slot_of)
        if self.bigrams and len(tokens) > 1:
            bigrams = [f"{a} {b}" for a, b in itertools.pairwise(tokens)]
            codes += self.codes(Block.WORD, bigrams, slot_of)
        shapes = [f"digits:{min(len(run), 8)}" for run in _DIGITS.findall(lower)]
        if _URL.search(lower):
            shapes.append("url")
        if not _CURRENCY.isdisjoint(lower):
            shapes.append("money")
        if shapes:
            codes += self.codes(Block.SHAPE, shapes, slot_of)
        return codes, tokens

    def text_shape_codes(self, n_chars: int, n_words: int) -> tuple[int, int]:
        """The two per-text shape features: length in 20s of characters, words in 4s."""
        return self.length_codes[min(n_chars // 20, 8)], self.count_codes[min(n_words // 4, 8)]

    def occurrences(self, text: str) -> INT64:
        """Every feature occurrence of ``text`` as a code, for building the training matrix.

        Written independently of `TextModel`'s cached path (whole-text token bigrams here;
        per word and across word boundaries there), so tests comparing the two check the
        cache logic too.
        """
        text = text[: self.config.max_chars]
        words = text.split()
        codes: list[int] = []
        tokens: list[str] = []
        low, high = self._char_n
        for word in words:
            lower = word.lower()
            padded = f" {lower} "
            for n in range(low, high + 1):
                if n == 1:
                    codes += self.codes(Block.CHAR, lower)
                else:
                    grams = [padded[i : i + n] for i in range(len(padded) - n + 1)]
                    codes += self.codes(Block.CHAR, grams)
            tokens += _TOKEN.findall(lower)
            for run in _DIGITS.findall(lower):
                codes.append(self.ngram_code(Block.SHAPE, f"digits:{min(len(run), 8)}"))
            if len(word) >= 2 and word.isupper():
                codes.append(self.ngram_code(Block.SHAPE, "caps"))
            if _URL.search(lower):
                codes.append(self.ngram_code(Block.SHAPE, "url"))
            if not _CURRENCY.isdisjoint(lower):
                codes.append(self.ngram_code(Block.SHAPE, "money"))
        if self._unigrams:
            codes += self.codes(Block.WORD, tokens)
        if self.bigrams:
            codes += self.codes(
                Block.WORD, [" ".join(tokens[i : i + 2]) for i in range(len(tokens) - 1)]
            )
        codes.extend(self.text_shape_codes(len(text), len(words)))
        return np.array(codes, dtype=np.int64)


def tf_weight(counts: INT64, sublinear: bool) -> FLOAT64:
    """Term-frequency weight of a count: ``1 + log(count)`` when sublinear (0 stays 0)."""
    if not sublinear:
        return counts.astype(np.float64)
    out = np.zeros(counts.shape, dtype=np.float64)
    positive = counts > 0
    out[positive] = np.log(counts[positive].astype(np.float64)) + 1.0
    return out


def idf_from_df(df: npt.NDArray[np.integer[Any]], n_docs: int) -> FLOAT64:
    """Smoothed inverse document frequency, as ``TfidfTransformer(smooth_idf=True)``."""
    return np.log((1.0 + n_docs) / (1.0 + df.astype(np.float64))) + 1.0


# --- the model ----------------------------------------------------------------------------


# What scoring keeps of one distinct word: the compact codes (slot * 2 + sign bit) of its
# features in seen buckets, and its first and last token (for the bigrams that span into the
# neighbouring words). A plain tuple: zip(*entries) transposes a message's entries in C.
_Word = tuple[INT64, str, str]


@dataclass(eq=False)
class TextModel:
    """A trained text model: ``model.score(text)`` (or ``model(text)``) is P(spam).

    Attributes:
        features: How text becomes features.
        buckets: Sorted global bucket numbers seen in training (uint32).
        df: Document frequency of each seen bucket in the training data (uint32).
        weights: Linear weight of each seen bucket (float32, as shipped).
        intercept: The linear model's intercept.
        calibration: ``(slope, offset)`` of the logistic map from decision value to P(spam).
        n_docs: Number of training documents (for the idf).
        thresholds: Operating points chosen in training.
        info: Everything else the metadata says (created, training data, metrics, ...).
    """

    features: FeatureConfig
    buckets: npt.NDArray[np.uint32]
    df: npt.NDArray[np.uint32]
    weights: npt.NDArray[np.float32]
    intercept: float
    calibration: tuple[float, float]
    n_docs: int
    thresholds: Thresholds
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)
        self._featurizer = Featurizer(self.features)
        n = self.buckets.size
        idf = idf_from_df(self.df, self.n_docs)
        idf_w = idf * self.weights.astype(np.float64)
        # Lookup tables indexed by compact code (slot * 2 + sign bit), so that scoring needs
        # no sign arithmetic. One extra entry at the end serves the high sentinel.
        # Real part idf, imaginary part idf * weight * sign (see _decision_from_codes).
        self._idf_and_w = np.zeros(2 * n + 1, dtype=np.complex128)
        self._idf_and_w.real[0:-1:2] = idf
        self._idf_and_w.real[1:-1:2] = idf
        self._idf_and_w.imag[0:-1:2] = idf_w
        self._idf_and_w.imag[1:-1:2] = -idf_w
        self._block = np.zeros(2 * n + 1, dtype=np.intp)
        self._block[:-1] = np.repeat((self.buckets.astype(np.int64) >> self.features.bits), 2)
        # Global bucket -> slot. A dict, because cache misses look buckets up one by one and
        # a dict look-up costs a fraction of a numpy call.
        self._slot: dict[int, int] = dict(zip(self.buckets.tolist(), range(n), strict=True))
        # Sentinel codes below and above every real one make the run-length step branch-free.
        self._high = 2 * n
        # 1 + log(count) for every count a message of fewer codes can have: a look-up is
        # cheaper than the log itself.
        self._tf = tf_weight(np.arange(_TF_TABLE, dtype=np.int64), self.features.sublinear_tf)
        # Keyed by the word as written (case included: it decides the caps feature).
        self._words: dict[str, _Word] = {}
        self._bigrams: dict[tuple[str, str], int] = {}
        self._grams: dict[bytes, int] = {}  # ASCII character n-grams, for cache misses
        self._length = [self._compact(c) for c in self._featurizer.length_codes]
        self._count = [self._compact(c) for c in self._featurizer.count_codes]
        self._caps = self._compact(self._featurizer.caps_code)
        self._slope, self._offset = self.calibration
        self._max_chars = self.features.max_chars
        self._bigrams_on = self._featurizer.bigrams
        self._block_weights = self.features.block_weights

    # -- scoring ------------------------------------------------------------------------

    def __call__(self, text: str) -> float:
        return self.score(text)

    def score(self, text: str) -> float:
        """P(spam) of ``text``; never raises for any ``str``."""
        return self._probability(self.decision(text))

    def decision(self, text: str) -> float:
        """The linear model's decision value (``intercept + weights . x``)."""
        # Every step here was measured: map/zip over C-level getters instead of Python-level
        # loops, one numpy call less wherever possible. numpy's per-call overhead (about a
        # microsecond) is most of the cost of a message.
        text = text[: self._max_chars]
        words = text.split()
        n = len(words)
        extra = [-1, self._high, self._length[min(len(text) // 20, 8)], self._count[min(n // 4, 8)]]
        if not words:
            return self._decision_from_codes(np.array(extra, dtype=np.int64))
        cache = self._words
        try:
            entries = list(map(cache.__getitem__, words))
        except KeyError:
            entries = [cache.get(word) or self._word_entry(word) for word in words]
        codes, firsts, lasts = zip(*entries, strict=True)
        if self._bigrams_on and n > 1:
            # The token bigram spanning each pair of adjacent words.
            try:
                extra += map(self._bigrams.__getitem__, zip(lasts, firsts[1:], strict=False))
            except KeyError:
                del extra[4:]  # the map may have added some before it failed
                extra += [self._bigram(a, b) for a, b in zip(lasts, firsts[1:], strict=False)]
        return self._decision_from_codes(np.concatenate([*codes, extra]))

    def _decision_from_codes(self, codes: INT64) -> float:
        codes.sort()
        # Unseen features are -1, like the low sentinel: after sorting they form one run in
        # front, and the high sentinel closes the last real run. No branches, no appends.
        ends = (codes[1:] != codes[:-1]).nonzero()[0]
        run_ends = ends[1:]
        unique = codes[run_ends]
        if unique.size == 0:
            return self.intercept
        counts = run_ends - ends[:-1]
        # A message with fewer codes than the table has no count beyond it.
        tf = self._tf[counts] if codes.size < self._tf.size else self._tf_of(counts)
        # One complex gather and product give both tf * idf (real) and tf * idf * w * sign
        # (imaginary), one numpy call fewer than two real ones.
        z = self._idf_and_w[unique] * tf
        value = z.real
        blocks = self._block[unique]
        dots = np.bincount(blocks, z.imag, 3).tolist()
        norms = np.bincount(blocks, value * value, 3).tolist()
        total = self.intercept
        for dot, norm2, scale in zip(dots, norms, self._block_weights, strict=False):
            if norm2 > 0.0:
                total += scale * dot / math.sqrt(norm2)
        return total

    def _tf_of(self, counts: INT64) -> FLOAT64:
        return tf_weight(counts, self.features.sublinear_tf)

    def _probability(self, decision: float) -> float:
        t = self._slope * decision + self._offset
        # Two branches so that exp never overflows, whatever the decision value.
        if t >= 0:
            return 1.0 / (1.0 + math.exp(-t))
        e = math.exp(t)
        return e / (1.0 + e)

    def _compact(self, code: int) -> int:
        """Global code -> compact code (slot * 2 + sign bit), or -1 for an unseen bucket."""
        slot = self._slot.get(code >> 1)
        return -1 if slot is None else (slot << 1) | (code & 1)

    def _bigram(self, last: str, first: str) -> int:
        """Compact code of the bigram ``last first`` spanning two words (-1: unseen)."""
        key = (last, first)
        compact = self._bigrams.get(key)
        if compact is None:
            compact = self._compact(self._featurizer.ngram_code(Block.WORD, f"{last} {first}"))
            if len(last) + len(first) <= 2 * _CACHEABLE_WORD_CHARS:
                if len(self._bigrams) >= _BIGRAM_CACHE_MAX:
                    self._bigrams.clear()
                self._bigrams[key] = compact
        return compact

    def _word_entry(self, word: str) -> _Word:
        compact, tokens = self._featurizer.word_codes(word.lower(), self._slot.get, self._grams)
        if self._caps >= 0 and len(word) > 1 and word.isupper():
            compact.append(self._caps)
        # Every non-empty run of non-space characters holds at least one token (a \w run or
        # a single other character; checked over all of Unicode), so both ends exist.
        entry = (np.array(compact, dtype=np.int64), tokens[0], tokens[-1])
        if len(word) <= _CACHEABLE_WORD_CHARS:
            if len(self._words) >= _WORD_CACHE_MAX:
                self._words.clear()
            self._words[word] = entry
        return entry

    # -- serialisation ------------------------------------------------------------------

    def to_arrays(self) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
        """The model as plain numeric arrays plus JSON-ready metadata (never pickled)."""
        arrays: dict[str, npt.NDArray[Any]] = {
            "buckets": self.buckets,
            "df": self.df,
            "weights": self.weights,
            "intercept": np.array([self.intercept], dtype=np.float64),
            "calibration": np.array(self.calibration, dtype=np.float64),
            "n_docs": np.array([self.n_docs], dtype=np.int64),
        }
        metadata: dict[str, Any] = dict(self.info)
        metadata.update(
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "features": self.features.to_json(),
                "thresholds": self.thresholds.to_json(),
                "nonzero_buckets": int(self.buckets.size),
            }
        )
        return arrays, metadata

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, npt.NDArray[Any]], metadata: Mapping[str, Any]
    ) -> TextModel:
        """Rebuild a model from `to_arrays` output; `ModelError` says what is wrong."""
        if not isinstance(metadata, Mapping):
            raise ModelError("metadata must be a JSON object")
        if metadata.get("format") != FORMAT_NAME:
            raise ModelError(f"metadata 'format' must be {FORMAT_NAME!r}")
        version = metadata.get("version")
        if version != FORMAT_VERSION:
            raise ModelError(
                f"unsupported model version {version!r}; this build reads {FORMAT_VERSION}"
            )
        features = FeatureConfig.from_json(metadata.get("features"))
        thresholds = Thresholds.from_json(metadata.get("thresholds"))
        expected = {"buckets", "df", "weights", "intercept", "calibration", "n_docs"}
        names = set(arrays)
        if names != expected:
            missing = ", ".join(sorted(expected - names)) or "none"
            extra = ", ".join(sorted(names - expected)) or "none"
            raise ModelError(f"model arrays: missing {missing}; unexpected {extra}")
        intercept = _scalar(arrays["intercept"], np.float64, "intercept")
        n_docs = _scalar(arrays["n_docs"], np.int64, "n_docs")
        calibration = arrays["calibration"]
        _check_array(calibration, np.float64, "calibration")
        if calibration.shape != (2,):
            raise ModelError(f"array 'calibration' must have shape (2,), got {calibration.shape}")
        info = {
            k: v
            for k, v in metadata.items()
            if k not in {"format", "version", "features", "thresholds", "nonzero_buckets"}
        }
        return cls(
            features=features,
            buckets=_vector(arrays["buckets"], np.uint32, "buckets"),
            df=_vector(arrays["df"], np.uint32, "df"),
            weights=_vector(arrays["weights"], np.float32, "weights"),
            intercept=float(intercept),
            calibration=(float(calibration[0]), float(calibration[1])),
            n_docs=int(n_docs),
            thresholds=thresholds,
            info=info,
        )


def _check_array(array: object, dtype: type[np.generic], name: str) -> None:
    if not isinstance(array, np.ndarray):
        raise ModelError(f"array {name!r} is not a numpy array")
    if array.dtype != np.dtype(dtype):
        raise ModelError(f"array {name!r} must be {np.dtype(dtype).name}, got {array.dtype}")


def _vector(array: npt.NDArray[Any], dtype: type[np.generic], name: str) -> npt.NDArray[Any]:
    _check_array(array, dtype, name)
    if array.ndim != 1:
        raise ModelError(f"array {name!r} must be one-dimensional, got shape {array.shape}")
    if array.size > MAX_FEATURES:
        raise ModelError(f"array {name!r} has {array.size} entries; at most {MAX_FEATURES}")
    return np.ascontiguousarray(array)


def _scalar(array: npt.NDArray[Any], dtype: type[np.generic], name: str) -> np.generic:
    _check_array(array, dtype, name)
    if array.shape != (1,):
        raise ModelError(f"array {name!r} must have shape (1,), got {array.shape}")
    value: np.generic = array[0]
    return value


def _validate(model: TextModel) -> None:
    """Checks every invariant scoring relies on, so a bad model fails at load, not per call."""
    if not isinstance(model.features, FeatureConfig):
        raise ModelError("features must be a FeatureConfig")
    if not isinstance(model.thresholds, Thresholds):
        raise ModelError("thresholds must be Thresholds")
    buckets = _vector(model.buckets, np.uint32, "buckets")
    df = _vector(model.df, np.uint32, "df")
    weights = _vector(model.weights, np.float32, "weights")
    if not (buckets.size == df.size == weights.size):
        raise ModelError(
            f"arrays 'buckets', 'df' and 'weights' must be the same length, got "
            f"{buckets.size}, {df.size} and {weights.size}"
        )
    if buckets.size and int(buckets[-1]) >= model.features.n_buckets:
        raise ModelError(f"array 'buckets' holds a bucket beyond {model.features.n_buckets - 1}")
    if buckets.size > 1 and not bool(np.all(buckets[1:] > buckets[:-1])):
        raise ModelError("array 'buckets' must be strictly increasing")
    if isinstance(model.n_docs, bool) or not isinstance(model.n_docs, int) or model.n_docs < 1:
        raise ModelError("n_docs must be a positive integer")
    if df.size and (int(df.min()) < 1 or int(df.max()) > model.n_docs):
        raise ModelError("array 'df' must hold document counts in [1, n_docs]")
    if not bool(np.all(np.isfinite(weights))) or (
        weights.size and float(np.abs(weights).max()) > 1e6
    ):
        raise ModelError("array 'weights' must hold finite numbers within ±1e6")
    numbers = (model.intercept, *model.calibration)
    if len(model.calibration) != 2 or not all(
        isinstance(x, float) and math.isfinite(x) and abs(x) <= 1e6 for x in numbers
    ):
        raise ModelError("intercept and calibration must be finite numbers within ±1e6")
