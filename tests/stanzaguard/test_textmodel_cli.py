"""`stanzaguard train` and `stanzaguard evaluate` on a small synthetic data set."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from stanzaguard.cli import app
from stanzaguard.models import load_model
from tests.support.textdata import synthetic_corpus


def write_jsonl(path: Path) -> Path:
    lines = [
        json.dumps({"label": "spam" if label else "ham", "text": text})
        for text, label in synthetic_corpus()
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_train_then_evaluate(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl")
    runner = CliRunner()
    out = tmp_path / "model"
    result = runner.invoke(
        app,
        ["train", "--data", str(data), "--format", "jsonl", "--out", str(out), "--folds", "3"],
    )
    assert result.exit_code == 0, result.output
    assert "spam caught" in result.output
    model = load_model(out)
    training = model.info["training"]
    assert training["data"]["format"] == "jsonl"
    assert training["data"]["rows"] == len(synthetic_corpus())
    assert training["command"].startswith("stanzaguard train --data ")
    assert model.info["metrics"]["block"]["tp"] > 0
    assert 0 < model.thresholds.block <= 1

    report = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--data",
            str(data),
            "--format",
            "jsonl",
            "--report",
            str(report),
            "--model",
            str(out),
            "--folds",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "MCC" in result.output and "given model as is" in result.output
    written = json.loads((report / "evaluation.json").read_text())
    assert written["metrics"]["samples"] == len(synthetic_corpus())
    assert written["data"]["sha256"] == training["data"]["sha256"]
    assert written["given_model"]["block"]["tp"] > 0
    assert (report / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_evaluate_repeats_prints_each_seed_and_the_pooled_figures(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl")
    report = tmp_path / "report"
    args = ["evaluate", "--data", str(data), "--format", "jsonl", "--report", str(report)]
    result = CliRunner().invoke(app, [*args, "--folds", "3", "--seed", "4", "--repeats", "2"])
    assert result.exit_code == 0, result.output
    for row in ("seed 4", "seed 5", "pooled"):
        assert row in result.output
    written = json.loads((report / "evaluation.json").read_text())
    assert written["command"].endswith("--folds 3 --seed 4 --repeats 2")
    repetitions = written["repetitions"]
    assert repetitions["seeds"] == [4, 5]
    per_seed = [run["block"] for run in repetitions["per_seed"]]
    pooled = repetitions["pooled"]["block"]
    for cell in ("tp", "fp", "tn", "fn"):
        assert pooled[cell] == sum(run[cell] for run in per_seed)
    assert pooled["tp"] + pooled["fp"] + pooled["tn"] + pooled["fn"] == 2 * len(synthetic_corpus())
    # The headline metrics stay the first repetition's, as without --repeats.
    assert written["metrics"]["block"] == per_seed[0]

    refused = CliRunner().invoke(app, [*args, "--repeats", "0"])
    assert refused.exit_code == 2
    assert "--repeats" in refused.output


def test_train_repeats_records_every_seed_in_the_metadata(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl")
    out = tmp_path / "model"
    args = ["train", "--data", str(data), "--format", "jsonl", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--folds", "3", "--repeats", "2"])
    assert result.exit_code == 0, result.output
    assert "seed 0" in result.output and "seed 1" in result.output and "pooled" in result.output
    metrics = load_model(out).info["metrics"]
    assert metrics["repetitions"]["seeds"] == [0, 1]
    assert metrics["block"] == metrics["repetitions"]["per_seed"][0]["block"]
    assert load_model(out).info["training"]["command"].endswith("--folds 3 --seed 0 --repeats 2")


def test_bad_data_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "bad.txt"
    data.write_text("ham\tfine\nspam without a tab\n", encoding="utf-8")
    result = CliRunner().invoke(
        app, ["evaluate", "--data", str(data), "--report", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    # The console may wrap the line; the words are what matter.
    assert "bad.txt:2: no tab" in " ".join(result.output.split())
