"""Training and evaluation: grouping, thresholds, metrics, and a quick cross-validation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import RidgeClassifier
from sklearn.metrics import matthews_corrcoef
from sklearn.svm import LinearSVC

from classifier.train import (
    BinaryMetrics,
    HashedCorpus,
    TrainConfig,
    TrainingError,
    _fit_linear,
    choose_threshold,
    cross_validate,
    duplicate_groups,
    fit_model,
    normalise_for_grouping,
    repeated_cross_validate,
)
from tests.support.textdata import read_sms, synthetic_corpus


class TestGrouping:
    def test_case_and_whitespace_do_not_make_a_new_text(self) -> None:
        assert normalise_for_grouping("  Free\tPRIZE \n now ") == "free prize now"
        groups = duplicate_groups(["Free prize", "free  prize", "FREE PRIZE ", "free prizes"])
        assert groups.tolist() == [0, 0, 0, 1]


class TestThresholds:
    def test_allows_at_most_the_target_rate_of_ham(self) -> None:
        ham = np.linspace(0.0, 0.5, 1000)
        spam = np.array([0.45, 0.8, 0.9])
        proba = np.concatenate([ham, spam])
        y = np.array([0] * 1000 + [1] * 3)
        t = choose_threshold(proba, y, 0.002)
        assert np.sum(ham >= t) == 2
        assert np.all(spam[1:] >= t)

    def test_zero_rate_sits_above_every_ham(self) -> None:
        proba = np.array([0.1, 0.2, 0.3, 0.9])
        y = np.array([0, 0, 0, 1])
        t = choose_threshold(proba, y, 0.0)
        assert 0.3 < t <= 0.9

    def test_degenerate_inputs(self) -> None:
        assert choose_threshold(np.array([0.5, 0.5]), np.array([0, 0]), 0.0) > 0.5
        assert choose_threshold(np.array([0.2, 0.9]), np.array([0, 1]), 1.0) == 0.0


class TestMetrics:
    @pytest.mark.parametrize("seed", range(5))
    def test_mcc_agrees_with_sklearn(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, 300)
        predicted = rng.random(300) < 0.4
        ours = BinaryMetrics.of(y, predicted)
        assert ours.mcc == pytest.approx(matthews_corrcoef(y, predicted), abs=1e-12)
        assert ours.tp + ours.fp + ours.tn + ours.fn == 300

    def test_pooled_adds_the_confusion_matrices(self) -> None:
        pooled = BinaryMetrics.pooled([BinaryMetrics(95, 1, 999, 5), BinaryMetrics(90, 2, 998, 10)])
        assert pooled == BinaryMetrics(tp=185, fp=3, tn=1997, fn=15)
        assert pooled.blocked_ham == 3 / 2000
        assert BinaryMetrics.pooled([]) == BinaryMetrics(0, 0, 0, 0)

    def test_rates(self) -> None:
        m = BinaryMetrics(tp=95, fp=1, tn=999, fn=5)
        assert m.spam_caught == 0.95
        assert m.blocked_ham == 0.001
        assert m.precision == pytest.approx(95 / 96)
        assert BinaryMetrics(0, 0, 10, 0).mcc == 0.0


class TestFitting:
    def test_model_carries_its_recipe_and_sane_thresholds(self) -> None:
        fitted = fit_model(synthetic_corpus(), TrainConfig(inner_folds=3), info={"x": 1})
        model = fitted.model
        assert model.info["x"] == 1
        assert model.info["training"]["config"]["inner_folds"] == 3
        assert 0.0 <= model.thresholds.flag <= model.thresholds.block <= 1.0
        assert fitted.oof_proba.shape == fitted.oof_labels.shape == (len(synthetic_corpus()),)

    def test_progress_is_reported_per_fit(self) -> None:
        seen: list[tuple[int, int]] = []
        fit_model(
            synthetic_corpus(),
            TrainConfig(inner_folds=3),
            progress=lambda done, total, _: seen.append((done, total)),
        )
        assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    @pytest.mark.parametrize(
        ("samples", "message"),
        [
            ([("a", 0), ("b", 0), ("c", 0), ("d", 0)], "spam"),
            ([(f"ham {i}", 0) for i in range(10)] + [("spam", 1)] * 5, "distinct spam"),
            ([("text", 2)], "label"),
            ([(b"bytes", 1)], "str"),
        ],
    )
    def test_refuses_unusable_data(self, samples: list[tuple[object, int]], message: str) -> None:
        with pytest.raises(TrainingError, match=message):
            fit_model(samples, TrainConfig(inner_folds=3))  # type: ignore[arg-type]

    def test_config_validation(self) -> None:
        with pytest.raises(TrainingError):
            TrainConfig(c=0.0)
        with pytest.raises(TrainingError):
            TrainConfig(block_fpr=0.1, flag_fpr=0.01)
        with pytest.raises(TrainingError):
            TrainConfig(folds=1)
        for share in (-0.1, 1.5, float("nan")):
            with pytest.raises(TrainingError, match="ridge_share"):
                TrainConfig(ridge_share=share)
        for alpha in (0.0, -1.0, float("inf")):
            with pytest.raises(TrainingError, match="ridge_alpha"):
                TrainConfig(ridge_alpha=alpha)


class TestBlend:
    """The recipe's linear model: SVM and ridge fits blended by ``ridge_share``."""

    def fits(self) -> tuple[sp.csr_matrix, np.ndarray]:
        samples = synthetic_corpus()
        texts = [t for t, _ in samples]
        y = np.array([label for _, label in samples])
        corpus = HashedCorpus.build(texts, TrainConfig().features)
        rows = np.arange(len(texts), dtype=np.int64)
        buckets, df = corpus.vocabulary(rows)
        return corpus.matrix(rows, buckets, df, rows.size), y

    @pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 1.0])
    def test_decision_is_the_weighted_sum_of_both_fits(self, share: float) -> None:
        x, y = self.fits()
        config = TrainConfig(ridge_share=share, c=0.5, ridge_alpha=0.3)
        svm = LinearSVC(C=0.5, class_weight={0: 1.0, 1: 1.0}, max_iter=20_000, random_state=0)
        ridge = RidgeClassifier(alpha=0.3, solver="sparse_cg", class_weight={0: 1.0, 1: 1.0})
        expected = share * ridge.fit(x, y).decision_function(x) + (1 - share) * svm.fit(
            x, y
        ).decision_function(x)
        blended = _fit_linear(x, y, config, None)
        assert np.allclose(blended.decision_function(x), expected, atol=1e-9)
        assert isinstance(blended, RidgeClassifier if share == 1.0 else LinearSVC)

    def test_the_two_fits_rank_differently(self) -> None:
        # Otherwise the blend would be a rescaled SVM and the setting would mean nothing.
        x, y = self.fits()
        svm = _fit_linear(x, y, TrainConfig(ridge_share=0.0), None).decision_function(x)
        ridge = _fit_linear(x, y, TrainConfig(ridge_share=1.0), None).decision_function(x)
        assert not np.array_equal(np.argsort(svm), np.argsort(ridge))

    def test_recorded_in_the_metadata(self) -> None:
        config = TrainConfig()
        recorded = config.to_json()
        assert recorded["ridge_share"] == 0.5 and recorded["ridge_alpha"] == 0.3
        assert recorded["c"] == 0.5
        assert "blend" in recorded["classifier"]
        assert "ridge" not in TrainConfig(ridge_share=0.0).to_json()["classifier"]


class TestCrossValidation:
    def test_quick_cv_on_synthetic_data_keeps_duplicates_together(self) -> None:
        samples = synthetic_corpus()
        cv = cross_validate(samples, TrainConfig(folds=3, inner_folds=3))
        groups = duplicate_groups([t for t, _ in samples])
        for group in np.unique(groups):
            assert np.unique(cv.fold_of[groups == group]).size == 1
        assert len(cv.folds) == 3
        assert sum(f.test_size for f in cv.folds) == len(samples)
        assert cv.block.tp + cv.block.fp + cv.block.tn + cv.block.fn == len(samples)
        assert cv.curves.roc_auc > 0.9
        report = cv.to_json()
        assert report["samples"] == len(samples)
        assert report["distinct_texts"] < len(samples)
        curves = cv.curves.to_json(max_points=50)
        assert len(curves["pr"]) <= 50 and len(curves["roc"]) <= 50

    def test_repeated_cv_uses_consecutive_seeds_and_pools(self) -> None:
        samples = synthetic_corpus()
        progress: list[tuple[int, int, str]] = []
        repeated = repeated_cross_validate(
            samples,
            TrainConfig(folds=3, inner_folds=3, seed=7),
            repeats=2,
            progress=lambda done, total, what: progress.append((done, total, what)),
        )
        assert repeated.seeds == [7, 8]
        single = cross_validate(samples, TrainConfig(folds=3, inner_folds=3, seed=8))
        assert repeated.runs[1].block == single.block
        assert repeated.block == BinaryMetrics.pooled([repeated.runs[0].block, single.block])
        assert [done for done, _, _ in progress] == list(range(1, 2 * 3 * 4 + 1))
        assert {total for _, total, _ in progress} == {24}
        assert progress[0][2].startswith("seed 7: ") and progress[-1][2].startswith("seed 8: ")
        report = repeated.to_json()
        assert report["seeds"] == [7, 8] and report["pooled"]["block"]["tp"] == repeated.block.tp
        with pytest.raises(TrainingError, match="repeats"):
            repeated_cross_validate(samples, repeats=0)

    def test_quick_cv_on_an_sms_subset(self) -> None:
        samples = read_sms(limit=1200)
        progress: list[str] = []
        cv = cross_validate(
            samples,
            TrainConfig(folds=3, inner_folds=3),
            progress=lambda done, total, what: progress.append(what),
        )
        assert len(progress) == 3 * (3 + 1)
        assert progress[-1].startswith("fold 3/3")
        # Even on a fifth of the data the recipe must be useful, with thresholds per fold.
        assert cv.block.spam_caught > 0.8
        assert cv.block.blocked_ham < 0.01
        assert cv.curves.roc_auc > 0.98
        assert len({f.thresholds.block for f in cv.folds}) == 3
