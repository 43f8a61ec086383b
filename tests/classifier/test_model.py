"""The text model: exact agreement with scikit-learn, robustness, serialisation, validation."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classifier.model import (
    Block,
    FeatureConfig,
    Featurizer,
    ModelError,
    TextModel,
    Thresholds,
)
from classifier.scoring import TextScorer
from classifier.train import FittedModel, TrainConfig, fit_model
from tests.support.protocols import implements
from tests.support.textdata import read_sms, synthetic_corpus

# Texts that exercise every path of the scorer: cached and uncached words, repeated
# n-grams across words, punctuation-only words, digits, capitals, URLs, currency, scripts
# without spaces, combining marks, emoji, lone surrogates, whitespace of every kind.
TRICKY = [
    "",
    " ",
    "\t\n\r\x0b\x0c\x1c\u2028\u3000",
    "a",
    "free",
    "FREE FREE FREE free free",
    "win win win a £1000 prize!!! call 09061701461 now",
    "Call 0800 123 4567 or visit www.example.com/claim?x=1 — €50 bonus",
    "lunch at 12:30? ok :)",
    "e e e e e e e e e e e e",
    "ab ab ab ab abab ababab",
    "x" * 65,
    "y" * 200 + " short " + "y" * 200,
    "—!?.,;:" * 5,
    "日本語のテキストは空白で区切られません",
    "Ελληνικά ΣΟΦΟΣ σοφος",
    "İstanbul ǅemal ß ẞ ﬁ",
    "emoji 🙂🙃 👍🏽 family 👨‍👩‍👧",
    "e\u0301 combining marks a\u0308",
    "lone \ud800 surrogate \udfff here",
    "NUL\x00inside",
    "tab\tseparated\tvalues",
    "word " * 500,
    "Are we still on for lunch tomorrow? I will call you later",
    "CONGRATULATIONS you have been selected for a guaranteed cash award, txt CLAIM to 87121",
]


@pytest.fixture(scope="module")
def fitted() -> FittedModel:
    config = TrainConfig(inner_folds=3)
    return fit_model(synthetic_corpus(), config)


def assert_matches_sklearn(fitted: FittedModel, texts: list[str]) -> None:
    reference = fitted.reference_proba(texts)
    ours = np.array([fitted.model.score(t) for t in texts])
    worst = int(np.argmax(np.abs(reference - ours)))
    assert abs(reference[worst] - ours[worst]) <= 1e-9, texts[worst][:80]


class TestExactness:
    def test_training_texts(self, fitted: FittedModel) -> None:
        assert_matches_sklearn(fitted, [t for t, _ in synthetic_corpus()])

    def test_unseen_and_tricky_texts(self, fitted: FittedModel) -> None:
        assert_matches_sklearn(fitted, TRICKY)

    def test_second_pass_uses_the_caches_and_agrees(self, fitted: FittedModel) -> None:
        first = [fitted.model.score(t) for t in TRICKY]
        second = [fitted.model.score(t) for t in TRICKY]
        fresh = TextModel.from_arrays(*fitted.model.to_arrays())
        assert first == second == [fresh.score(t) for t in TRICKY]

    def test_truncates_at_max_chars(self) -> None:
        config = TrainConfig(inner_folds=3, features=FeatureConfig(max_chars=30))
        small = fit_model(synthetic_corpus(), config)
        long_text = "free prize " * 10 + "lunch tomorrow " * 50
        assert small.model.score(long_text) == small.model.score(long_text[:30])
        assert_matches_sklearn(small, [long_text, long_text[:29] + " x"])

    @pytest.mark.parametrize("share", [0.0, 1.0])
    def test_svm_alone_and_ridge_alone(self, share: float) -> None:
        other = fit_model(synthetic_corpus(), TrainConfig(inner_folds=3, ridge_share=share))
        assert_matches_sklearn(other, TRICKY + [t for t, _ in synthetic_corpus()[:50]])

    def test_without_sublinear_tf_and_unigrams_only(self) -> None:
        features = FeatureConfig(sublinear_tf=False, word_ngrams=(1, 1), char_ngrams=(2, 4))
        other = fit_model(synthetic_corpus(), TrainConfig(inner_folds=3, features=features))
        assert_matches_sklearn(other, TRICKY + [t for t, _ in synthetic_corpus()[:50]])

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.text(alphabet=st.characters(exclude_categories=()), max_size=300))
    def test_random_text_matches_sklearn(self, fitted: FittedModel, text: str) -> None:
        assert_matches_sklearn(fitted, [text])


def test_sms_model_matches_sklearn_on_many_texts() -> None:
    samples = read_sms()
    n = 600
    fitted = fit_model(samples[:n], TrainConfig(inner_folds=3))
    # Held-out texts: most of their words are new to the model and to its caches.
    assert_matches_sklearn(fitted, [t for t, _ in samples[n : n + 1500]])
    assert_matches_sklearn(fitted, [t for t, _ in samples[:n]])


class TestRobustness:
    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.characters(exclude_categories=())))
    def test_any_text_scores(self, fitted: FittedModel, text: str) -> None:
        p = fitted.model.score(text)
        assert isinstance(p, float)
        assert 0.0 <= p <= 1.0
        assert math.isfinite(fitted.model.decision(text))

    @settings(max_examples=20, deadline=None)
    @given(
        st.text(alphabet=st.characters(exclude_categories=()), min_size=1, max_size=5).map(
            lambda s: s * 40_000
        ),
        st.sampled_from(["", " ", "\n"]),
    )
    def test_huge_text_scores(self, fitted: FittedModel, chunk: str, sep: str) -> None:
        p = fitted.model.score(chunk + sep + chunk)
        assert 0.0 <= p <= 1.0

    def test_huge_single_word_and_many_words(self, fitted: FittedModel) -> None:
        for text in ("z" * 2_000_000, "ab " * 700_000, "\u00e9" * 100_000):
            assert 0.0 <= fitted.model.score(text) <= 1.0

    def test_is_a_text_scorer(self, fitted: FittedModel) -> None:
        model = fitted.model
        assert implements(model, TextScorer)
        assert model("free prize") == model.score("free prize")

    def test_spam_scores_above_ham(self, fitted: FittedModel) -> None:
        model = fitted.model
        spam = model.score("WIN a guaranteed £1000 cash prize! txt CLAIM to 87121 now")
        ham = model.score("are we still on for lunch tomorrow? call you later")
        assert spam > model.thresholds.block > ham

    def test_caches_stay_bounded(
        self, fitted: FittedModel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import classifier.model as module

        monkeypatch.setattr(module, "_WORD_CACHE_MAX", 50)
        monkeypatch.setattr(module, "_BIGRAM_CACHE_MAX", 50)
        monkeypatch.setattr(module, "_GRAM_MEMO_MAX", 50)
        model = TextModel.from_arrays(*fitted.model.to_arrays())
        text = " ".join(f"w{i}" for i in range(400))
        assert model.score(text) == fitted.model.score(text)
        assert len(model._words) <= 50
        assert len(model._bigrams) <= 50
        assert len(model._grams) <= 50


class TestFeaturizer:
    def test_hash_is_stable(self) -> None:
        # Pinned values: a change of hash breaks every shipped model, so it must be deliberate.
        f = Featurizer(FeatureConfig())
        codes = [f.ngram_code(block, "free") for block in Block]
        assert codes == [1311613, 3800625, 5934099]

    def test_occurrences_cover_each_kind(self) -> None:
        f = Featurizer(FeatureConfig(char_ngrams=(1, 2)))
        codes = f.occurrences("Hi £5")
        # chars: h, i, " h", "hi", "i " | £, 5, " £", "£5", "5 "; tokens hi, £, 5;
        # bigrams "hi £", "£ 5"; shapes digits:1, money, chars:0, words:0
        assert codes.size == 10 + 3 + 2 + 4

    def test_word_ngrams_are_at_most_bigrams(self) -> None:
        with pytest.raises(ModelError, match="word_ngrams"):
            FeatureConfig(word_ngrams=(1, 3))


class TestSerialisation:
    def test_round_trip(self, fitted: FittedModel) -> None:
        model = fitted.model
        arrays, metadata = model.to_arrays()
        assert {a.dtype.name for a in arrays.values()} <= {"uint32", "float32", "float64", "int64"}
        assert metadata["version"] == 1 and metadata["features"]["hash"] == "crc32-fib-v1"
        copy = TextModel.from_arrays(arrays, metadata)
        assert [copy.score(t) for t in TRICKY] == [model.score(t) for t in TRICKY]
        assert copy.thresholds == model.thresholds
        assert copy.info["training"]["config"] == model.info["training"]["config"]

    def test_only_seen_buckets_are_stored(self, fitted: FittedModel) -> None:
        arrays, _ = fitted.model.to_arrays()
        assert arrays["buckets"].size == arrays["weights"].size == arrays["df"].size
        assert arrays["buckets"].size < fitted.model.features.n_buckets // 100

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (lambda a, m: a.update(weights=a["weights"].astype(np.float64)), "float32"),
            (lambda a, m: a.update(buckets=a["buckets"][::-1].copy()), "increasing"),
            (lambda a, m: a.update(df=a["df"][:-1].copy()), "same length"),
            (lambda a, m: a.update(n_docs=np.array([1], dtype=np.int64)), "df"),
            (lambda a, m: a.update(intercept=np.array([np.nan])), "finite"),
            (lambda a, m: a["weights"].__setitem__(0, np.inf), "finite"),
            (lambda a, m: a.update(buckets=a["buckets"] + np.uint32(3 << 20)), "beyond"),
            (lambda a, m: a.update(calibration=np.zeros(3)), "calibration"),
            (lambda a, m: a.update(extra=np.zeros(1)), "unexpected extra"),
            (lambda a, m: a.pop("df"), "missing df"),
            (lambda a, m: a.update(weights=a["weights"].reshape(1, -1)), "one-dimensional"),
            (lambda a, m: m.update(version=2), "version"),
            (lambda a, m: m.update(format="pickle"), "format"),
            (lambda a, m: m["features"].update(bits=40), "bits"),
            (lambda a, m: m["features"].update(hash="md5"), "hash"),
            (lambda a, m: m["features"].update(surprise=1), "unknown"),
            (lambda a, m: m["features"].pop("max_chars"), "missing"),
            (lambda a, m: m.update(thresholds={"block": 0.2, "flag": 0.5}), "flag"),
            (lambda a, m: m.update(thresholds={"block": "high", "flag": 0.1}), "block"),
            (lambda a, m: m.update(thresholds=None), "thresholds"),
        ],
    )
    def test_rejects_bad_models(self, fitted: FittedModel, change: Any, message: str) -> None:
        arrays, metadata = fitted.model.to_arrays()
        arrays = {k: v.copy() for k, v in arrays.items()}
        metadata = {**metadata, "features": dict(metadata["features"])}
        change(arrays, metadata)
        with pytest.raises(ModelError, match=message):
            TextModel.from_arrays(arrays, metadata)

    def test_thresholds_validate(self) -> None:
        with pytest.raises(ModelError):
            Thresholds(block=1.5, flag=0.1)
        with pytest.raises(ModelError):
            replace(Thresholds(block=0.5, flag=0.1), flag=-0.1)
