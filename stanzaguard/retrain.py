"""The work behind ``stanzaguard retrain``: a new model version from the base data set plus
what users and officers have labelled.

The training rows are the base data set (each row weight 1) and the *effective* labelled
examples of ``DATA/learning/examples.jsonl`` (`stanzaguard.learning`: one per reporter and
message, an officer's label winning over reports, each report weighted by its reporter's
track record), the weights going to the SVM and the calibration as sample weights. The recipe
(features, C, inner folds, blocked-ham targets) is the one recorded in the model in use (the
registry's active version, else the shipped model), so a retrained model differs from it by
its data only. The base data set defaults to the file that model records, checked against its
SHA-256: the SMS Spam Collection is not shipped with the package, so a model trained on it
names the file and its digest, and ``--base`` points elsewhere when it has moved.

Each run cross-validates first (duplicate-grouped, as ``stanzaguard evaluate``) so the
version's ``model.json`` keeps honest metrics, then fits on every row and stores the model as
the next version in ``DATA/models/`` (`stanzaguard.registry`); it becomes active only when
asked (``--activate``) or later with ``stanzaguard model activate``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from classifier.clock import Clock
from classifier.model import TextModel
from stanzaguard.datasets import Dataset, DatasetFormat, load_dataset
from stanzaguard.errors import StanzaGuardError
from stanzaguard.learning import Label, LabelledExample, LabelledExamples
from stanzaguard.models import load_default_model
from stanzaguard.registry import Activation, ModelRegistry, check_actor
from stanzaguard.textmodel import TrainingUnavailableError, train_config

if TYPE_CHECKING:
    from classifier.train import CrossValidation

#: ``progress(done, total, description)``
Progress = Callable[[int, int, str], None]

HAM = 0
SPAM = 1
#: Examples weigh at most what a base row weighs times this (the service writes <= 1).
MAX_EXAMPLE_WEIGHT = 100.0


class RetrainError(StanzaGuardError):
    """The base data or the examples cannot make a model; the message says why."""


def examples_path(data_dir: Path) -> Path:
    """Where the service keeps labelled examples (as ``stanzaguard.wiring.DataLayout``)."""
    return data_dir / "learning" / "examples.jsonl"


# --- the base data set ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordedBase:
    """The training data a model's metadata names."""

    path: Path
    format: DatasetFormat
    sha256: str


def recorded_base(model: TextModel) -> RecordedBase | None:
    """The base data set ``model`` was trained on, if its metadata says (None otherwise)."""
    training = model.info.get("training")
    data = training.get("data") if isinstance(training, dict) else None
    if not isinstance(data, dict):
        return None
    path, fmt, digest = data.get("path"), data.get("format"), data.get("sha256")
    if not (isinstance(path, str) and isinstance(fmt, str) and isinstance(digest, str)):
        return None
    try:
        return RecordedBase(Path(path), DatasetFormat(fmt), digest)
    except ValueError:
        return None


def load_base(model: TextModel, path: Path | None, fmt: str | None) -> Dataset:
    """The base data set: ``path`` (format ``fmt``, default sms), else the one ``model`` names.

    Raises:
        RetrainError: no base given or recorded, or the recorded file is gone or changed.
        DatasetError: the file cannot be read.
    """
    if path is not None:
        # Recorded absolute: the next retrain, from any directory, finds it again.
        return load_dataset(path.absolute(), fmt or DatasetFormat.SMS)
    recorded = recorded_base(model)
    if recorded is None:
        raise RetrainError(
            "the model in use does not name its training data: give --base PATH --format FMT"
        )
    if not recorded.path.is_file():
        raise RetrainError(
            f"the base data set {recorded.path} (recorded in the model in use, SHA-256 "
            f"{recorded.sha256[:12]}…) is not there: give --base PATH --format FMT"
        )
    dataset = load_dataset(recorded.path, fmt or recorded.format)
    if dataset.sha256 != recorded.sha256:
        raise RetrainError(
            f"{recorded.path} has changed since the model in use was trained on it (SHA-256 "
            f"{dataset.sha256[:12]}…, recorded {recorded.sha256[:12]}…): give --base "
            "explicitly to train on it as it is now"
        )
    return dataset


# --- base + examples --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainingSet:
    """Rows to train on, their sample weights, and a summary of the examples for metadata."""

    samples: list[tuple[str, int]]
    weights: list[float]
    examples: dict[str, Any]


def training_set(
    base: Dataset, examples: Sequence[LabelledExample], *, source: Path | None = None
) -> TrainingSet:
    """The base rows (weight 1) followed by the examples that have text (their weights)."""
    samples = list(base.samples)
    weights = [1.0] * len(samples)
    used: list[tuple[str, int, float]] = []
    by_source: dict[str, int] = {}
    without_text = unusable = 0
    for example in examples:
        if not isinstance(example.text, str) or not example.text.strip():
            without_text += 1  # a report of something the proxy never archived
            continue
        if not (math.isfinite(example.weight) and 0.0 <= example.weight <= MAX_EXAMPLE_WEIGHT):
            unusable += 1  # a hand-edited line; one bad line must not stop retraining
            continue
        label = SPAM if example.label is Label.SPAM else HAM
        used.append((example.text, label, example.weight))
        by_source[example.source.value] = by_source.get(example.source.value, 0) + 1
    for text, label, weight in used:
        samples.append((text, label))
        weights.append(weight)
    canonical = json.dumps(used, ensure_ascii=False, separators=(",", ":")).encode()
    summary: dict[str, Any] = {
        "path": str(source) if source is not None else None,
        "effective": len(examples),
        "used": len(used),
        "without_text": without_text,
        "unusable_weight": unusable,
        "spam": sum(1 for _, label, _ in used if label == SPAM),
        "ham": sum(1 for _, label, _ in used if label == HAM),
        "weight_sum": sum(weight for _, _, weight in used),
        "by_source": dict(sorted(by_source.items())),
        # Of the (text, label, weight) triples trained on: ties a version to its examples.
        "sha256": hashlib.sha256(canonical).hexdigest(),
    }
    return TrainingSet(samples, weights, summary)


# --- the whole command ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetrainOutcome:
    version: str
    model: TextModel
    evaluation: CrossValidation | None
    training: TrainingSet
    base: Dataset
    activation: Activation | None


def current_model(registry: ModelRegistry) -> tuple[TextModel, str]:
    """The model whose recipe and base data a retrain starts from, and its name."""
    active = registry.read_state().active
    if active is not None:
        return registry.load(active), active
    return load_default_model(), "default"


def retrain(
    data_dir: Path,
    *,
    clock: Clock,
    command: str,
    base_path: Path | None = None,
    base_format: str | None = None,
    folds: int | None = 10,
    seed: int = 0,
    activate_as: str | None = None,
    progress: Progress | None = None,
) -> RetrainOutcome:
    """Train and store a new version in ``data_dir``; see the module docstring.

    Args:
        folds: Outer folds of the cross-validation whose metrics the version keeps;
            None skips it (the metrics are then null; for experiments that measure on
            data of their own).
        activate_as: Activate the new version in the name of this actor.

    Raises:
        StanzaGuardError: (its subclasses) the data, the registry or the recipe is unusable.
    """
    try:
        import classifier.train as train  # the `train` extra: imported on use
    except ImportError as exc:
        raise TrainingUnavailableError(
            f"retraining needs scikit-learn ({exc}); install stanzaguard[train]"
        ) from None
    if activate_as is not None:
        activate_as = check_actor(activate_as)  # before a minute of training, not after
    registry = ModelRegistry.of(data_dir, clock)
    start_model, start_name = current_model(registry)
    base = load_base(start_model, base_path, base_format)
    path = examples_path(data_dir)
    examples = LabelledExamples.load(path).effective()
    rows = training_set(base, examples, source=path)
    config = train_config(start_model, folds=folds or 10, seed=seed)
    cv_steps = config.folds * (config.inner_folds + 1) if folds is not None else 0
    total = cv_steps + config.inner_folds + 1

    def step(offset: int) -> Progress:
        def report(done: int, _total: int, what: str) -> None:
            if progress is not None:
                progress(offset + done, total, what)

        return report

    try:
        evaluation = None
        if folds is not None:
            evaluation = train.cross_validate(
                rows.samples, config, weights=rows.weights, progress=step(0)
            )
        info: dict[str, Any] = {
            "created": clock.now().isoformat(timespec="seconds"),
            "training": {
                "command": command,
                "data": base.describe(),
                "examples": rows.examples,
                "started_from": start_name,
            },
            "metrics": (
                None
                if evaluation is None
                else {**evaluation.to_json(), "curves": evaluation.curves.to_json()}
            ),
        }
        fitted = train.fit_model(
            rows.samples, config, weights=rows.weights, progress=step(cv_steps), info=info
        )
    except train.TrainingError as exc:
        raise RetrainError(str(exc)) from None
    version = registry.add_version(fitted.model)
    activation = registry.activate(version, activate_as) if activate_as is not None else None
    return RetrainOutcome(version, fitted.model, evaluation, rows, base, activation)
