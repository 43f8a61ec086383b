"""The work behind ``stanzaguard train`` and ``stanzaguard evaluate``.

Reads the data (`stanzaguard.datasets`), runs the pure recipe (`classifier.train`), and writes
what comes out: model files (`stanzaguard.models`), a JSON report and a PNG of the
precision-recall and ROC curves. scikit-learn and matplotlib are imported only here and only
when a command runs: they are the ``train`` extra, not dependencies of the proxy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from classifier.model import TextModel
from stanzaguard.datasets import Dataset
from stanzaguard.errors import StanzaGuardError

if TYPE_CHECKING:
    from classifier.train import CrossValidation, RepeatedCrossValidation, TrainConfig

REPORT_JSON = "evaluation.json"
REPORT_PNG = "curves.png"

#: ``progress(done, total, description)``
Progress = Callable[[int, int, str], None]


class TrainingUnavailableError(StanzaGuardError):
    """scikit-learn or matplotlib is missing: install the ``train`` extra."""


def _train_module() -> Any:
    try:
        import classifier.train as train  # optional dependency: imported on use
    except ImportError as exc:
        raise TrainingUnavailableError(
            f"training needs scikit-learn ({exc}); install stanzaguard[train]"
        ) from None
    return train


def train_config(model: TextModel | None = None, *, folds: int = 10, seed: int = 0) -> TrainConfig:
    """The default recipe, or the one recorded in ``model``'s metadata."""
    train = _train_module()
    if model is None:
        config: TrainConfig = train.TrainConfig(folds=folds, seed=seed)
        return config
    recorded = model.info.get("training", {}).get("config", {})
    if not isinstance(recorded, dict):
        recorded = {}
    fields = (
        "c",
        "ridge_alpha",
        "ridge_share",
        "spam_weight",
        "inner_folds",
        "block_fpr",
        "flag_fpr",
        "max_iter",
    )
    kwargs = {k: recorded[k] for k in fields if k in recorded}
    # Models from before the ridge blend record no share: they were the SVM alone.
    kwargs.setdefault("ridge_share", 0.0)
    try:
        config = train.TrainConfig(features=model.features, folds=folds, seed=seed, **kwargs)
    except (TypeError, ValueError) as exc:
        raise StanzaGuardError(
            f"the model's recorded training settings are unusable: {exc}"
        ) from None
    return config


@dataclass(frozen=True, slots=True)
class TrainOutcome:
    model: TextModel
    repeated: RepeatedCrossValidation | None

    @property
    def evaluation(self) -> CrossValidation | None:
        """The first (``--seed``) cross-validation, the one the metadata's metrics are."""
        return self.repeated.runs[0] if self.repeated is not None else None


def train_model(
    dataset: Dataset,
    *,
    command: str,
    created: datetime,
    config: TrainConfig | None = None,
    evaluate: bool = True,
    repeats: int = 1,
    progress: Progress | None = None,
) -> TrainOutcome:
    """Cross-validate the recipe on ``dataset`` (for the metrics), then fit on all of it.

    With ``repeats`` > 1 the cross-validation runs that many times (fold seeds from
    ``config.seed``); ``metrics`` stays the first run's and ``metrics.repetitions`` holds each
    seed's and the pooled figures.
    """
    train = _train_module()
    config = config or train.TrainConfig()
    cv_steps = repeats * config.folds * (config.inner_folds + 1) if evaluate else 0
    total = cv_steps + config.inner_folds + 1

    def step(offset: int) -> Callable[[int, int, str], None]:
        def report(done: int, _total: int, what: str) -> None:
            if progress is not None:
                progress(offset + done, total, what)

        return report

    try:
        repeated: RepeatedCrossValidation | None = (
            train.repeated_cross_validate(
                dataset.samples, config, repeats=repeats, progress=step(0)
            )
            if evaluate
            else None
        )
        info: dict[str, Any] = {
            "created": created.isoformat(timespec="seconds"),
            "training": {"command": command, "data": dataset.describe()},
            "metrics": None,
        }
        if repeated is not None:
            first = repeated.runs[0]
            info["metrics"] = {**first.to_json(), "curves": first.curves.to_json()}
            if len(repeated.runs) > 1:
                info["metrics"]["repetitions"] = repeated.to_json()
        fitted = train.fit_model(
            dataset.samples,
            config,
            progress=step(cv_steps),
            info=info,
        )
    except train.TrainingError as exc:
        raise StanzaGuardError(str(exc)) from None
    return TrainOutcome(fitted.model, repeated)


def evaluate_dataset(
    dataset: Dataset,
    config: TrainConfig,
    *,
    repeats: int = 1,
    progress: Progress | None = None,
) -> RepeatedCrossValidation:
    """The recipe's cross-validation, ``repeats`` times with fold seeds from ``config.seed``."""
    train = _train_module()
    try:
        evaluation: RepeatedCrossValidation = train.repeated_cross_validate(
            dataset.samples, config, repeats=repeats, progress=progress
        )
    except train.TrainingError as exc:
        raise StanzaGuardError(str(exc)) from None
    return evaluation


def fixed_model_metrics(model: TextModel, samples: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """How a trained model does on ``samples`` as it is, with its own thresholds."""
    train = _train_module()
    y = np.array([label for _, label in samples], dtype=np.int64)
    proba = np.array([model.score(text) for text, _ in samples], dtype=np.float64)
    block = train.BinaryMetrics.of(y, proba >= model.thresholds.block)
    flag = train.BinaryMetrics.of(y, proba >= model.thresholds.flag)
    return {
        "note": (
            "the given model applied as it is; optimistic if these texts overlap its training data"
        ),
        "thresholds": model.thresholds.to_json(),
        "block": block.to_json(),
        "flag": flag.to_json(),
    }


def write_report(
    repeated: RepeatedCrossValidation,
    directory: Path,
    *,
    dataset: Dataset,
    command: str,
    created: datetime,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """``evaluation.json`` and ``curves.png`` in ``directory``.

    ``metrics`` and the curves are the first repetition's (fold seed ``--seed``); with more
    than one, ``repetitions`` lists each seed's figures and the pooled ones.
    """
    directory.mkdir(parents=True, exist_ok=True)
    evaluation = repeated.runs[0]
    report: dict[str, Any] = {
        "created": created.isoformat(timespec="seconds"),
        "command": command,
        "data": dataset.describe(),
        "config": {
            **evaluation.config.to_json(),
            "features": evaluation.config.features.to_json(),
        },
        "metrics": evaluation.to_json(),
        "curves": evaluation.curves.to_json(max_points=1000),
    }
    if len(repeated.runs) > 1:
        report["repetitions"] = repeated.to_json()
    if extra:
        report.update(extra)
    json_path = directory / REPORT_JSON
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    png_path = directory / REPORT_PNG
    plot_curves(evaluation, png_path, title=dataset.path.name)
    return json_path, png_path


def plot_curves(evaluation: CrossValidation, path: Path, *, title: str) -> None:
    """Precision-recall and ROC curves side by side, with the block operating point."""
    try:
        import matplotlib  # optional dependency: imported on use

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise TrainingUnavailableError(
            f"plots need matplotlib ({exc}); install stanzaguard[train]"
        ) from None
    curves = evaluation.curves
    block = evaluation.block
    fig, (pr_ax, roc_ax) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110)
    try:
        pr_ax.plot(curves.recall, curves.precision, lw=1.5)
        pr_ax.plot([block.spam_caught], [block.precision], "o", color="crimson", label="block")
        pr_ax.set(
            xlabel="recall (spam caught)",
            ylabel="precision",
            title=f"precision-recall (AP {curves.average_precision:.4f})",
            xlim=(0.5, 1.005),
            ylim=(0.5, 1.005),
        )
        roc_ax.plot(curves.fpr, curves.tpr, lw=1.5)
        roc_ax.plot([block.blocked_ham], [block.spam_caught], "o", color="crimson", label="block")
        target = evaluation.config.block_fpr
        roc_ax.axvline(target, ls=":", color="gray", label=f"blocked-ham target {target:.1%}")
        roc_ax.set_xscale("symlog", linthresh=1e-3)
        roc_ax.set(
            xlabel="false-positive rate (blocked ham), symlog",
            ylabel="true-positive rate (spam caught)",
            title=f"ROC (AUC {curves.roc_auc:.4f})",
            xlim=(0, 1),
            ylim=(0.5, 1.005),
        )
        for ax in (pr_ax, roc_ax):
            ax.grid(True, alpha=0.3)
            ax.legend(loc="lower right")
        fig.suptitle(
            f"{title}: {evaluation.config.folds}-fold CV, duplicates grouped — spam caught "
            f"{block.spam_caught:.2%}, blocked ham {block.blocked_ham:.3%}, MCC {block.mcc:.3f}"
        )
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
