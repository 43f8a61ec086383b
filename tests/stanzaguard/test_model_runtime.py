"""Which model the service scores with, and swapping versions live (no proxy needed here).

The watcher is driven by calling `check()` (what its one-second loop does); the holder is the
real `PolicyHolder`, so each verdict shows which model produced it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from classifier.clock import ManualClock
from classifier.model import TextModel
from classifier.policy import PolicyHolder, parse_policy
from classifier.train import TrainConfig, fit_model
from stanzaguard.errors import SettingsError
from stanzaguard.model_runtime import ModelWatcher, ScoredModel, configured_model
from stanzaguard.models import load_default_model, model_files, save_model
from stanzaguard.registry import ModelRegistry
from stanzaguard.settings import load_settings
from tests.classifier.helpers import make_ctx
from tests.support.textdata import synthetic_corpus

POLICY = 'version = 1\nlocal_domains = ["corp.example"]'
SPAM = "WINNER!! You have won a £1000 cash prize. To claim call 09061701461 now. T&C 18+"
# Ham to the shipped model (p about 0.04), spam to the one trained on the synthetic corpus.
PROBE = "claim your guaranteed bonus prize"


@pytest.fixture(scope="module")
def retrained() -> TextModel:
    return fit_model(synthetic_corpus(), TrainConfig(inner_folds=3)).model


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def registry(tmp_path: Path, clock: ManualClock) -> ModelRegistry:
    return ModelRegistry.of(tmp_path / "data", clock)


def reason(holder: PolicyHolder, text: str = PROBE) -> tuple[float, str]:
    """The text-model reason's probability and model name for a stranger's ``text``."""
    verdict = holder.evaluate(make_ctx(body=text))
    (found,) = [r for r in verdict.reasons if r.rule_id == "text-model"]
    match = re.fullmatch(r"spam probability ([0-9.]+)\b.*\(model (\S+)\)", found.detail)
    assert match is not None, found.detail
    return float(match.group(1)), match.group(2)


def started(registry: ModelRegistry, clock: ManualClock) -> tuple[ModelWatcher, PolicyHolder]:
    watcher = ModelWatcher(registry, configured_model("default"), clock)
    holder = PolicyHolder(parse_policy(POLICY), model=watcher.initial())
    watcher.attach(holder)
    return watcher, holder


# -- the setting -------------------------------------------------------------------------------


def test_the_setting_defaults_to_the_shipped_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STANZAGUARD_MODEL", raising=False)
    assert load_settings().model == "default"
    assert load_settings(model=" OFF ").model == "off"
    monkeypatch.setenv("STANZAGUARD_MODEL", "/srv/models/mine")
    assert load_settings().model == "/srv/models/mine"


@pytest.mark.parametrize("value", ["", "   ", 3, ["default"]])
def test_an_empty_or_odd_model_setting_is_refused(value: object) -> None:
    with pytest.raises(SettingsError, match="model"):
        load_settings(model=value)


def test_configured_models(tmp_path: Path, retrained: TextModel) -> None:
    assert configured_model("off") is None
    shipped = configured_model("default")
    assert shipped is not None and shipped.model_version == "default"
    assert shipped(SPAM) == load_default_model().score(SPAM)
    save_model(retrained, tmp_path / "mine")
    mine = configured_model(str(tmp_path / "mine"))
    assert mine is not None and mine.model_version == str(tmp_path / "mine")
    with pytest.raises(SettingsError, match=r"model: .*no such file"):
        configured_model(str(tmp_path / "missing"))
    model_files(tmp_path / "mine").json.write_text("[]")
    with pytest.raises(SettingsError, match=r"model: .*JSON object"):
        configured_model(str(tmp_path / "mine"))


# -- swapping ----------------------------------------------------------------------------------


async def test_activating_a_version_swaps_it_in_and_rolling_back_swaps_it_out(
    registry: ModelRegistry, clock: ManualClock, retrained: TextModel
) -> None:
    registry.add_version(retrained)
    watcher, holder = started(registry, clock)
    before, name = reason(holder)
    assert name == "default" and before == pytest.approx(
        load_default_model().score(PROBE), abs=1e-3
    )
    assert not await watcher.check()  # nothing changed

    registry.activate("v0001", "olivia")
    assert await watcher.check()
    after, name = reason(holder)
    assert name == "v0001"
    assert after == pytest.approx(retrained.score(PROBE), abs=1e-3)
    assert after - before > 0.5
    serving = registry.read_serving()
    assert serving is not None and (serving.version, serving.label) == ("v0001", "v0001")

    registry.rollback("olivia")
    assert await watcher.check()
    assert reason(holder)[1] == "default"
    serving = registry.read_serving()
    assert serving is not None and (serving.version, serving.label) == (None, "default")


async def test_the_service_starts_with_the_active_version(
    registry: ModelRegistry, clock: ManualClock, retrained: TextModel
) -> None:
    registry.add_version(retrained)
    registry.activate("v0001", "olivia")
    _, holder = started(registry, clock)
    assert reason(holder)[1] == "v0001"


async def test_a_malformed_registry_keeps_the_model_in_force(
    registry: ModelRegistry,
    clock: ManualClock,
    retrained: TextModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry.add_version(retrained)
    registry.activate("v0001", "olivia")
    watcher, holder = started(registry, clock)
    registry.registry_file.write_text('{"format": "stanzaguard-model-registry", "active": ')
    with caplog.at_level(logging.ERROR, "stanzaguard.model_runtime"):
        assert not await watcher.check()
    assert "the model registry could not be loaded" in caplog.text
    assert "invalid JSON" in caplog.text
    assert reason(holder)[1] == "v0001"
    serving = registry.read_serving()
    assert serving is not None and serving.version == "v0001"
    assert serving.error is not None and "invalid JSON" in serving.error["message"]
    # The same broken file is not reported again every second.
    caplog.clear()
    assert not await watcher.check()
    assert caplog.text == ""
    # Repaired (removed, v0001 activated again): the error is cleared, nothing is swapped.
    registry.registry_file.unlink()
    registry.activate("v0001", "olivia")
    assert not await watcher.check()
    serving = registry.read_serving()
    assert serving is not None and serving.error is None and serving.version == "v0001"


async def test_a_version_that_fails_to_load_keeps_the_model_in_force(
    registry: ModelRegistry,
    clock: ManualClock,
    retrained: TextModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry.add_version(retrained)
    registry.add_version(retrained)
    watcher, holder = started(registry, clock)
    registry.activate("v0002", "olivia")  # it loads now; then its arrays are damaged
    files = model_files(registry.version_dir("v0002"))
    files.npz.write_bytes(b"PK\x03\x04 not really a zip")
    with caplog.at_level(logging.ERROR, "stanzaguard.model_runtime"):
        assert not await watcher.check()
    assert "model version v0002 could not be loaded; the model in force stays" in caplog.text
    assert reason(holder)[1] == "default"
    serving = registry.read_serving()
    assert serving is not None and serving.error is not None
    assert serving.error["version"] == "v0002" and "SHA-256" in serving.error["message"]
    waited = registry.wait_serving("v0002", clock.now(), timeout=0)
    assert waited is not None and waited.version is None  # the command learns it failed

    registry.activate("v0001", "olivia")  # a good one goes in
    assert await watcher.check()
    assert reason(holder)[1] == "v0001"
    serving = registry.read_serving()
    assert serving is not None and serving.error is None


async def test_a_broken_active_version_at_start_up_falls_back_to_the_configured_model(
    registry: ModelRegistry,
    clock: ManualClock,
    retrained: TextModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry.add_version(retrained)
    registry.activate("v0001", "olivia")
    model_files(registry.version_dir("v0001")).json.write_text("{}")
    with caplog.at_level(logging.ERROR, "stanzaguard.model_runtime"):
        _, holder = started(registry, clock)
    assert "model version v0001 could not be loaded at start-up" in caplog.text
    assert reason(holder)[1] == "default"


async def test_with_the_model_off_the_rule_does_not_exist(
    registry: ModelRegistry, clock: ManualClock
) -> None:
    watcher = ModelWatcher(registry, None, clock)
    holder = PolicyHolder(parse_policy(POLICY), model=watcher.initial())
    verdict = holder.evaluate(make_ctx(body=SPAM))
    assert "text-model" not in [r.rule_id for r in verdict.reasons]


def test_a_scored_model_is_the_model() -> None:
    model = load_default_model()
    scored = ScoredModel(model, "v0042")
    for text in (SPAM, "", "lunch?", "\ud800" * 3):
        assert scored(text) == model.score(text)
