"""The model registry: versions, activation, rollback, history, and damaged or hostile files."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from classifier.clock import ManualClock
from classifier.model import TextModel
from classifier.train import TrainConfig, fit_model
from stanzaguard.models import ModelFileError, model_files
from stanzaguard.registry import (
    CONFIGURED,
    MAX_REGISTRY_BYTES,
    ActivationKind,
    ModelRegistry,
    RegistryError,
    Serving,
    VersionSummary,
)
from tests.support.textdata import synthetic_corpus


@pytest.fixture(scope="module")
def model() -> TextModel:
    fitted = fit_model(synthetic_corpus(), TrainConfig(inner_folds=3), info={"note": "test"})
    return fitted.model


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def registry(tmp_path: Path, clock: ManualClock) -> ModelRegistry:
    return ModelRegistry.of(tmp_path / "data", clock)


def with_versions(registry: ModelRegistry, model: TextModel, count: int) -> list[str]:
    return [registry.add_version(model) for _ in range(count)]


def test_versions_are_numbered_and_listed_oldest_first(
    registry: ModelRegistry, model: TextModel
) -> None:
    assert registry.versions() == []
    names = with_versions(registry, model, 3)
    assert names == ["v0001", "v0002", "v0003"]
    listed = registry.versions()
    assert [v.version for v in listed] == names
    assert all(v.metadata is not None and v.metadata["note"] == "test" for v in listed)
    assert registry.load("v0002").n_docs == model.n_docs
    # Nothing half-written is left behind.
    assert sorted(p.name for p in registry.root.iterdir()) == names


def test_numbering_sorts_past_four_digits(registry: ModelRegistry, model: TextModel) -> None:
    registry.add_version(model)
    (registry.root / "v0001").rename(registry.root / "v9999")
    assert registry.add_version(model) == "v10000"
    assert [v.version for v in registry.versions()] == ["v9999", "v10000"]


def test_concurrent_retrains_never_share_a_version(
    registry: ModelRegistry, model: TextModel
) -> None:
    made: list[str] = []
    lock = threading.Lock()

    def add() -> None:
        name = registry.add_version(model)
        with lock:
            made.append(name)

    threads = [threading.Thread(target=add) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(made) == [f"v{i:04d}" for i in range(1, 7)]


def test_activate_and_roll_back_step_by_step(
    registry: ModelRegistry, model: TextModel, clock: ManualClock
) -> None:
    with_versions(registry, model, 3)
    assert registry.read_state().active is None
    for version in ("v0001", "v0002", "v0003"):
        registry.activate(version, "olivia")
        clock.current += timedelta(minutes=1)
    assert registry.read_state().active == "v0003"

    back = registry.rollback("oscar")
    assert (back.version, back.previous, back.action) == ("v0002", "v0003", ActivationKind.ROLLBACK)
    assert registry.rollback("oscar").version == "v0001"
    assert registry.rollback("oscar").version is None  # the configured model
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback("oscar")

    state = registry.read_state()
    assert [(a.action.value, a.actor, a.version, a.previous) for a in state.history] == [
        ("activate", "olivia", "v0001", None),
        ("activate", "olivia", "v0002", "v0001"),
        ("activate", "olivia", "v0003", "v0002"),
        ("rollback", "oscar", "v0002", "v0003"),
        ("rollback", "oscar", "v0001", "v0002"),
        ("rollback", "oscar", None, "v0001"),
    ]
    assert state.history[1].at == clock.current - timedelta(minutes=2)


def test_rollback_returns_to_whatever_preceded_the_latest_activation(
    registry: ModelRegistry, model: TextModel
) -> None:
    with_versions(registry, model, 2)
    registry.activate("v0001", "olivia")
    registry.activate("v0002", "olivia")
    registry.activate("v0001", "olivia")  # back by name
    registry.activate("v0001", "olivia")  # again: changes nothing, not even rollback
    assert registry.rollback("olivia").version == "v0002"
    registry.activate(CONFIGURED, "olivia")
    assert registry.read_state().active is None
    assert registry.rollback("olivia").version == "v0002"


def test_a_damaged_or_missing_version_is_refused_and_nothing_changes(
    registry: ModelRegistry, model: TextModel
) -> None:
    with_versions(registry, model, 2)
    registry.activate("v0001", "olivia")
    before = registry.registry_file.read_bytes()
    files = model_files(registry.root / "v0002")
    files.npz.write_bytes(files.npz.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match="SHA-256 differs"):
        registry.activate("v0002", "olivia")
    with pytest.raises(RegistryError, match="no model version v0007"):
        registry.activate("v0007", "olivia")
    for hostile in ("../v0001", "v0001/../../etc", "", "v1", "V0001", "v0001\n"):
        with pytest.raises(RegistryError, match="not a version name"):
            registry.activate(hostile, "olivia")
    assert registry.registry_file.read_bytes() == before


@pytest.mark.parametrize("actor", ["", "   ", "x" * 201, "ol\nivia", "bell\x07"])
def test_actor_must_be_named_and_printable(
    registry: ModelRegistry, model: TextModel, actor: str
) -> None:
    with_versions(registry, model, 1)
    with pytest.raises(RegistryError, match="--actor"):
        registry.activate("v0001", actor)
    assert not registry.registry_file.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{", "invalid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "JSON object"),
        (b'{"format": "other", "version": 1}', "'format'"),
        (b'{"format": "stanzaguard-model-registry", "version": 9}', "unsupported registry"),
        (b'{"format": "stanzaguard-model-registry", "version": 1, "x": 1}', "unknown keys"),
        (
            b'{"format": "stanzaguard-model-registry", "version": 1, "active": "../../etc"}',
            "not a version name",
        ),
        (
            b'{"format": "stanzaguard-model-registry", "version": 1, "active": 3}',
            "not a version name",
        ),
        (b'{"format": "stanzaguard-model-registry", "version": 1, "history": {}}', "list"),
        (
            b'{"format": "stanzaguard-model-registry", "version": 1, "history": '
            b'[{"at": "2026-01-01T00:00:00", "actor": "a", "action": "activate"}]}',
            "time zone",
        ),
        (
            b'{"format": "stanzaguard-model-registry", "version": 1, "history": '
            b'[{"at": "2026-01-01T00:00:00+00:00", "actor": "a", "action": "explode"}]}',
            "'action'",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|JSON object"),
        (b" " * (MAX_REGISTRY_BYTES + 1), "larger than"),
    ],
)
def test_a_malformed_registry_is_a_clear_error(
    registry: ModelRegistry, model: TextModel, content: bytes, message: str
) -> None:
    with_versions(registry, model, 1)
    registry.root.mkdir(parents=True, exist_ok=True)
    registry.registry_file.write_bytes(content)
    with pytest.raises(RegistryError, match=message) as raised:
        registry.read_state()
    assert str(registry.registry_file) in str(raised.value)
    # Nothing overwrites a registry nobody can read (its history would be lost).
    with pytest.raises(RegistryError):
        registry.activate("v0001", "olivia")
    assert registry.registry_file.read_bytes() == content


def test_listing_shows_metrics_and_damaged_versions(
    registry: ModelRegistry, model: TextModel
) -> None:
    with_versions(registry, model, 2)
    (registry.root / "v0002" / "model.json").write_text("{broken")
    (registry.root / "not-a-version").mkdir()
    registry.activate("v0001", "olivia")
    state = registry.read_state()
    rows = [VersionSummary.of(v, state.active, "v0001") for v in registry.versions()]
    assert [(r.version, r.active, r.serving) for r in rows] == [
        ("v0001", True, True),
        ("v0002", False, False),
    ]
    assert rows[0].error is None and rows[0].block is None  # trained without metrics
    assert rows[1].error is not None and "invalid JSON" in rows[1].error
    json.dumps([r.to_json() for r in rows])


def test_serving_report_round_trip_and_damage(registry: ModelRegistry, clock: ManualClock) -> None:
    assert registry.read_serving() is None
    serving = Serving("v0001", "v0001", clock.now(), {"version": "v0002", "message": "x"})
    registry.write_serving(serving)
    assert registry.read_serving() == serving
    registry.serving_file.write_text('{"since": 5}')
    with pytest.raises(RegistryError, match="since"):
        registry.read_serving()
    registry.serving_file.write_bytes(b" " * (MAX_REGISTRY_BYTES + 1))
    with pytest.raises(RegistryError, match="too large"):
        registry.read_serving()
    registry.serving_file.write_text('{"since": "2026-01-01T00:00:00+00:00", "error": [1]}')
    with pytest.raises(RegistryError, match="'error'"):
        registry.read_serving()
    assert registry.wait_serving("v0001", clock.now(), timeout=0) is None
