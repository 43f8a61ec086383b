"""`stanzaguard retrain` and the model version commands, on a slice of the SMS collection.

The base data set is the first 500 lines of the SMS Spam Collection (copied, so that tests can
change or remove it); labelled examples are written the way the service writes them. Two
outer folds keep the cross-validation quick; the recipe is otherwise the shipped model's.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from classifier.clock import ManualClock
from stanzaguard.cli import app
from stanzaguard.datasets import DatasetError
from stanzaguard.learning import Label, LabelledExample, LabelledExamples, Source
from stanzaguard.models import load_default_model, load_model
from stanzaguard.registry import ModelRegistry
from stanzaguard.retrain import RetrainError, load_base, retrain, training_set
from tests.support.textdata import REPO_ROOT, SMS_SHA256, sms_collection

BASE_ROWS = 500
CAMPAIGN = [
    f"Join my crypto signals channel t.me/pumpzone{n}, moonshot gains guaranteed daily"
    for n in range(12)
]
PROBE = "crypto signals channel t.me/pumpzone moonshot gains"
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    lines = sms_collection().read_bytes().split(b"\n")[:BASE_ROWS]
    path = tmp_path / "sms-slice.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def example(
    n: int, text: str | None, label: Label, source: Source, actor: str, record: str | None
) -> LabelledExample:
    return LabelledExample(
        example_id=f"ex{n}",
        at=T0 + timedelta(minutes=n),
        label=label,
        source=source,
        actor=actor,
        sender="spammer@remote.example",
        record_id=record,
        text=text,
    )


def write_examples(data_dir: Path) -> LabelledExamples:
    """Reports of the campaign by two users (one of whom an officer contradicts once), an
    officer's ham label, a duplicate report and a report of nothing archived."""
    examples = LabelledExamples(data_dir / "learning" / "examples.jsonl")
    n = 0
    for i, text in enumerate(CAMPAIGN):
        reporter = "bob@corp.example" if i % 2 else "carol@corp.example"
        examples.append(example(n, text, Label.SPAM, Source.REPORT, reporter, f"rec{i}"))
        n += 1
    examples.append(
        example(n, CAMPAIGN[0], Label.SPAM, Source.REPORT, "carol@corp.example", "rec0")
    )
    examples.append(
        example(n + 1, "lunch at noon?", Label.SPAM, Source.REPORT, "bob@corp.example", "recH")
    )
    examples.append(example(n + 2, "lunch at noon?", Label.HAM, Source.OFFICER, "olivia", "recH"))
    examples.append(example(n + 3, None, Label.SPAM, Source.REPORT, "dave@corp.example", None))
    return examples


def test_a_version_from_base_data_and_weighted_examples(base: Path, data_dir: Path) -> None:
    examples = write_examples(data_dir)
    # bob was contradicted once by an officer: his reports weigh 1/2.
    assert examples.reporter_weight("bob@corp.example") == pytest.approx(0.5)
    clock = ManualClock(T0)
    outcome = retrain(
        data_dir,
        clock=clock,
        command="test",
        base_path=base,
        base_format="sms",
        folds=2,
    )
    assert outcome.version == "v0001" and outcome.activation is None
    stored = load_model(data_dir / "models" / "v0001")
    training = stored.info["training"]
    assert training["data"]["sha256"] == outcome.base.sha256
    assert training["data"]["rows"] == BASE_ROWS
    assert training["data"]["path"] == str(base.absolute())
    assert training["started_from"] == "default"
    used = training["examples"]
    # 12 campaign reports + the officer's ham; the duplicate, the overruled report and the
    # report without text do not count.
    assert (used["used"], used["spam"], used["ham"], used["without_text"]) == (13, 12, 1, 1)
    assert used["weight_sum"] == pytest.approx(6 * 1.0 + 6 * 0.5 + 1.0)
    assert used["by_source"] == {"officer": 1, "report": 12}
    metrics = stored.info["metrics"]
    assert metrics["samples"] == BASE_ROWS + 13
    assert metrics["block"]["tp"] + metrics["block"]["fn"] == metrics["spam"]
    assert stored.info["created"] == T0.isoformat(timespec="seconds")
    # The recipe is the shipped model's.
    assert stored.features == load_default_model().features
    assert ModelRegistry.of(data_dir, clock).read_state().active is None


def test_the_examples_move_the_model(base: Path, data_dir: Path, tmp_path: Path) -> None:
    clock = ManualClock(T0)
    without = retrain(
        tmp_path / "without", clock=clock, command="t", base_path=base, folds=None
    ).model
    write_examples(data_dir)
    with_reports = retrain(data_dir, clock=clock, command="t", base_path=base, folds=None).model
    assert with_reports.score(PROBE) > without.score(PROBE) + 0.2, (
        with_reports.score(PROBE),
        without.score(PROBE),
    )


def test_the_next_retrain_finds_the_recorded_base_and_checks_it(base: Path, data_dir: Path) -> None:
    clock = ManualClock(T0)
    retrain(data_dir, clock=clock, command="t", base_path=base, folds=None, activate_as="olivia")
    again = retrain(data_dir, clock=clock, command="t", folds=None)
    assert again.version == "v0002"
    assert again.model.info["training"]["started_from"] == "v0001"
    assert again.base.path == base.absolute()

    base.write_bytes(base.read_bytes() + b"ham\tone more line\n")
    with pytest.raises(RetrainError, match="has changed since"):
        retrain(data_dir, clock=clock, command="t", folds=None)
    base.unlink()
    with pytest.raises(RetrainError, match="is not there: give --base"):
        retrain(data_dir, clock=clock, command="t", folds=None)


def test_the_shipped_model_names_the_sms_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    sms_collection()
    monkeypatch.chdir(REPO_ROOT)  # the recorded path is relative to the repository
    dataset = load_base(load_default_model(), None, None)
    assert (dataset.sha256, len(dataset.samples)) == (SMS_SHA256, 5574)


def test_hand_edited_examples_with_unusable_weights_are_left_out(base: Path) -> None:
    from stanzaguard.datasets import load_dataset

    dataset = load_dataset(base, "sms")
    good = example(1, "spam text", Label.SPAM, Source.OFFICER, "olivia", "r1")
    odd = [
        dataclasses.replace(good, weight=w, example_id=f"w{i}")
        for i, w in enumerate([float("nan"), float("inf"), -1.0, 1e9])
    ]
    rows = training_set(dataset, [good, *odd])
    assert rows.examples["used"] == 1 and rows.examples["unusable_weight"] == 4
    assert len(rows.samples) == len(rows.weights) == BASE_ROWS + 1


def test_hostile_lines_in_the_examples_file_do_not_stop_retraining(
    base: Path, data_dir: Path
) -> None:
    path = data_dir / "learning" / "examples.jsonl"
    path.parent.mkdir(parents=True)
    good = example(1, CAMPAIGN[0], Label.SPAM, Source.REPORT, "bob@corp.example", "r1")
    lines = [
        json.dumps(good.to_json()),
        "{not json",
        json.dumps({**good.to_json(), "label": "maybe"}),
        json.dumps({**good.to_json(), "text": 12345, "example_id": "x2", "record_id": "r2"}),
        json.dumps([1, 2, 3]),
        "\x00" * 100,
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    outcome = retrain(data_dir, clock=ManualClock(T0), command="t", base_path=base, folds=None)
    used = outcome.training.examples
    assert (used["used"], used["without_text"]) == (1, 1)


def test_a_base_that_is_not_labelled_data_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("ham\tfine\nspam without a tab\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.txt:2: no tab"):
        retrain(tmp_path / "d", clock=ManualClock(), command="t", base_path=bad, folds=None)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ham\tok\nspam\twin\n", encoding="utf-8")
    with pytest.raises(RetrainError, match="distinct"):
        retrain(tmp_path / "d", clock=ManualClock(), command="t", base_path=tiny, folds=None)
    assert not (tmp_path / "d" / "models").exists() or not any(
        p.name.startswith("v") for p in (tmp_path / "d" / "models").iterdir()
    )


# -- the commands ------------------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, " ".join(result.output.split())


def test_retrain_list_activate_rollback_commands(base: Path, data_dir: Path) -> None:
    write_examples(data_dir)
    d = str(data_dir)
    code, out = invoke(
        "retrain", "--data-dir", d, "--base", str(base), "--format", "sms", "--folds", "2",
        "--activate", "--actor", "olivia",
    )  # fmt: skip
    assert code == 0, out
    assert "version v0001 stored" in out and "labelled examples: 13 (12 spam, 1 ham" in out
    assert "spam caught" in out and "v0001 is active" in out
    # The next one starts from the active version and finds its base data by itself.
    code, out = invoke("retrain", "--data-dir", d, "--folds", "2")
    assert code == 0, out
    assert f"base {base.absolute()}: {BASE_ROWS} messages" in out and "v0002 stored" in out

    listed = CliRunner().invoke(app, ["model", "list", "--data-dir", d, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["version"], r["active"], r["base_rows"], r["examples"]) for r in rows] == [
        ("v0001", True, BASE_ROWS, 13),
        ("v0002", False, BASE_ROWS, 13),
    ]
    assert all(0 < r["block"]["mcc"] <= 1 for r in rows)
    code, out = invoke("model", "list", "--data-dir", d)
    assert code == 0 and "v0002" in out and "active" in out, out

    code, out = invoke("model", "activate", "v0002", "--actor", "oscar", "--data-dir", d)
    assert code == 0 and "active: v0002 (was v0001)" in out, out
    code, out = invoke("model", "rollback", "--actor", "oscar", "--data-dir", d)
    assert code == 0 and "active: v0001 (was v0002)" in out, out
    history = json.loads((data_dir / "models" / "registry.json").read_text())["history"]
    assert [(h["action"], h["actor"], h["version"]) for h in history] == [
        ("activate", "olivia", "v0001"),
        ("activate", "oscar", "v0002"),
        ("rollback", "oscar", "v0001"),
    ]
    # Without a running service, --wait says so (exit 3) after the change is made.
    code, out = invoke(
        "model", "activate", "v0002", "--actor", "oscar", "--data-dir", d, "--wait", "0.3"
    )
    assert code == 3 and "not switched yet" in out, out
    assert json.loads((data_dir / "models" / "registry.json").read_text())["active"] == "v0002"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model", "activate", "v0009", "--actor", "o"], "no model version v0009"),
        (["model", "activate", "../../etc", "--actor", "o"], "not a version name"),
        (["model", "activate", "v0001", "--actor", " "], "--actor"),
        (["model", "rollback", "--actor", "o"], "nothing to roll back"),
        (["retrain", "--activate"], "--activate needs --actor"),
        (["retrain", "--base", "/nonexistent/data.txt"], "cannot read"),
        (["retrain", "--base", "/dev/null", "--format", "xml"], "unknown format"),
    ],
)
def test_command_errors_are_clear(data_dir: Path, args: list[str], message: str) -> None:
    code, out = invoke(*args, "--data-dir", str(data_dir))
    assert code == 2, out
    assert message in out, out


def test_list_reports_a_damaged_registry(data_dir: Path) -> None:
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / "registry.json").write_text("{}")
    code, out = invoke("model", "list", "--data-dir", str(data_dir))
    assert code == 2 and "registry.json" in out and "'format'" in out, out
