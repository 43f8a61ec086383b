"""The recipe a trained model records, read back for `stanzaguard evaluate --model`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from classifier.train import TrainConfig, fit_model
from stanzaguard.errors import StanzaGuardError
from stanzaguard.textmodel import train_config
from tests.support.textdata import synthetic_corpus


@pytest.fixture(scope="module")
def recorded() -> dict[str, object]:
    model = fit_model(synthetic_corpus(), TrainConfig(inner_folds=3, c=0.7, ridge_share=0.25))
    config: dict[str, object] = model.model.info["training"]["config"]
    return config


def test_the_recorded_recipe_comes_back(recorded: dict[str, object]) -> None:
    model = fit_model(synthetic_corpus(), TrainConfig(inner_folds=3)).model
    again = train_config(replace(model, info={"training": {"config": recorded}}), folds=4, seed=2)
    assert (again.c, again.ridge_share, again.ridge_alpha) == (0.7, 0.25, 0.3)
    assert (again.folds, again.seed, again.inner_folds) == (4, 2, 3)


def test_a_model_from_before_the_blend_is_the_svm_alone(recorded: dict[str, object]) -> None:
    model = fit_model(synthetic_corpus(), TrainConfig(inner_folds=3)).model
    older = {k: v for k, v in recorded.items() if k not in ("ridge_share", "ridge_alpha")}
    config = train_config(replace(model, info={"training": {"config": older}}))
    assert config.ridge_share == 0.0
    assert config.c == 0.7


def test_the_default_recipe_without_a_model() -> None:
    assert train_config() == TrainConfig()


def test_unusable_recorded_settings_are_a_clear_error(recorded: dict[str, object]) -> None:
    model = fit_model(synthetic_corpus(), TrainConfig(inner_folds=3)).model
    broken = {**recorded, "ridge_share": 7}
    with pytest.raises(StanzaGuardError, match="ridge_share"):
        train_config(replace(model, info={"training": {"config": broken}}))
