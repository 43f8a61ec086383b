"""Sample weights in training: neutral when all 1, effective when not, exact either way."""

from __future__ import annotations

import math

import numpy as np
import pytest

from classifier.train import MAX_WEIGHT, TrainConfig, TrainingError, cross_validate, fit_model
from tests.support.textdata import synthetic_corpus

CONFIG = TrainConfig(inner_folds=3, folds=3)
# A campaign the synthetic corpus does not know: words of its own, labelled spam.
CAMPAIGN = [
    (f"join my crypto signals channel {n} moonshot pump guaranteed gains", 1) for n in range(8)
]
PROBE = "crypto signals channel moonshot pump guaranteed gains"


def test_unit_weights_are_no_weights() -> None:
    samples = synthetic_corpus()
    plain = fit_model(samples, CONFIG).model
    unit = fit_model(samples, CONFIG, weights=[1.0] * len(samples)).model
    assert np.array_equal(plain.weights, unit.weights)
    assert (plain.intercept, plain.calibration, plain.thresholds) == (
        unit.intercept,
        unit.calibration,
        unit.thresholds,
    )


def test_heavier_examples_pull_the_model_further() -> None:
    samples = synthetic_corpus() + CAMPAIGN
    base = [1.0] * (len(samples) - len(CAMPAIGN))
    light = fit_model(samples, CONFIG, weights=base + [0.05] * len(CAMPAIGN)).model
    heavy = fit_model(samples, CONFIG, weights=base + [5.0] * len(CAMPAIGN)).model
    assert heavy.score(PROBE) > light.score(PROBE) + 0.05, (heavy.score(PROBE), light.score(PROBE))


def test_weighted_model_is_exactly_its_scikit_learn_reference() -> None:
    samples = synthetic_corpus() + CAMPAIGN
    weights = [0.3 + (i % 7) / 3 for i in range(len(samples))]
    fitted = fit_model(samples, CONFIG, weights=weights)
    texts = [text for text, _ in samples] + [PROBE, "", "unseen words entirely 🙂"]
    reference = fitted.reference_proba(texts)
    ours = np.array([fitted.model.score(t) for t in texts])
    assert float(np.max(np.abs(reference - ours))) <= 1e-9


def test_cross_validation_weighs_training_rows_and_counts_every_test_row_once() -> None:
    samples = synthetic_corpus() + CAMPAIGN
    weights = [1.0] * (len(samples) - len(CAMPAIGN)) + [0.5] * len(CAMPAIGN)
    result = cross_validate(samples, CONFIG, weights=weights)
    block = result.block
    assert block.tp + block.fp + block.tn + block.fn == len(samples)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "one per sample"),
        ("many", "numbers"),
        ([math.nan], "finite"),
        ([-1.0], "finite"),
        ([math.inf], "finite"),
        ([MAX_WEIGHT * 10], "finite"),
        ([object()], "numbers"),
        ([0.0], "more than 0"),
    ],
)
def test_unusable_weights_are_refused(weights: object, message: str) -> None:
    samples = synthetic_corpus()
    if isinstance(weights, list) and len(weights) == 1 and weights != [1.0]:
        weights = weights * len(samples)
    with pytest.raises(TrainingError, match=message):
        fit_model(samples, CONFIG, weights=weights)  # type: ignore[arg-type]
    with pytest.raises(TrainingError, match=message):
        cross_validate(samples, CONFIG, weights=weights)  # type: ignore[arg-type]
