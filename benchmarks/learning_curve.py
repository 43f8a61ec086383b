"""Learning curve on chat spam that is not SMS: the shipped SMS model, then after 25, 50 and
100 reports from the chat set, measured on the rest of it.

1. The SMS-only model (the one shipped in the package, trained on the SMS Spam Collection) is
   scored on the whole chat set (``datasets/chatspam.jsonl``): MCC, spam caught and blocked
   ham at its own block and flag thresholds.
2. For each size N and each repeat (fixed seed): N messages are drawn from the chat set,
   stratified (spam and ham in the set's proportions, at least one of each; the draws of one
   repeat are nested, 25 within 50 within 100), written to a fresh data directory's
   ``learning/examples.jsonl`` as XEP-0377 report examples (`LabelledExample`, source
   ``report``, one reporter each, so every weight is 1; a ham "report" stands for an officer
   releasing or labelling a message, which trains the same way), and the model is retrained
   by the code behind ``stanzaguard retrain`` (`stanzaguard.retrain.retrain`: SMS base data +
   effective examples, sample weights, the shipped recipe; the version's cross-validation is
   skipped because this script measures on held-out chat data instead). The stored version
   is loaded back from ``DATA/models/`` and scored on the chat messages not drawn (minus any
   whose text equals a drawn one), next to the SMS-only model on the very same messages.
3. The 0-reports row retrains with no examples through the same path; it should be the
   shipped model itself (the script says whether the weights are identical).

Prints the curve as a table (mean ± standard deviation over repeats) and, with ``--json``,
every repeat's figures. About 15 s per retrain on one core (SMS collection, 6 fits of the
SVM and ridge blend).

    .venv/bin/python benchmarks/learning_curve.py [--sms PATH] [--chat PATH]
        [--sizes 25 50 100] [--repeats 5] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from classifier.clock import ManualClock
from classifier.model import TextModel
from classifier.policy import ModelPolicy
from classifier.train import BinaryMetrics, normalise_for_grouping
from stanzaguard.datasets import load_dataset
from stanzaguard.learning import Label, LabelledExample, LabelledExamples, Source
from stanzaguard.models import load_default_model
from stanzaguard.registry import ModelRegistry
from stanzaguard.retrain import examples_path, retrain

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SMS = Path("/work/shared/data/SMSSpamCollection")
DEFAULT_CHAT = REPO / "datasets" / "chatspam.jsonl"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ChatRow:
    row_id: str
    text: str
    label: int
    sender: str


def read_chat(path: Path) -> list[ChatRow]:
    """The chat set, through the project's reader (labels, UTF-8, line checks) plus its ids."""
    samples = load_dataset(path, "jsonl").samples  # validates every line
    rows = []
    for (text, label), line in zip(
        samples, (ln for ln in path.read_text("utf-8").splitlines() if ln.strip()), strict=True
    ):
        record = json.loads(line)
        rows.append(ChatRow(str(record.get("id")), text, label, str(record.get("sender", ""))))
    return rows


#: What the service does with the model by default: hold a stranger's message from this
#: probability (policy ``[model] strangers_quarantine_at``); chat spam comes from strangers.
POLICY_THRESHOLD: float = ModelPolicy().strangers_quarantine_at or 0.7


@dataclass(frozen=True, slots=True)
class Figures:
    block: BinaryMetrics
    flag: BinaryMetrics
    policy: BinaryMetrics

    def to_json(self) -> dict[str, Any]:
        return {
            "block": self.block.to_json(),
            "flag": self.flag.to_json(),
            "policy": self.policy.to_json(),
        }


def measure(model: TextModel, rows: list[ChatRow]) -> Figures:
    y = np.array([r.label for r in rows], dtype=np.int64)
    p = np.array([model.score(r.text) for r in rows], dtype=np.float64)
    return Figures(
        BinaryMetrics.of(y, p >= model.thresholds.block),
        BinaryMetrics.of(y, p >= model.thresholds.flag),
        BinaryMetrics.of(y, p >= POLICY_THRESHOLD),
    )


def draws(rows: list[ChatRow], sizes: list[int], rng: random.Random) -> dict[int, list[ChatRow]]:
    """Nested stratified draws: the set's spam share, at least one of each class."""
    spam = [r for r in rows if r.label == 1]
    ham = [r for r in rows if r.label == 0]
    rng.shuffle(spam)
    rng.shuffle(ham)
    share = len(spam) / len(rows)
    out = {}
    for n in sizes:
        n_spam = min(max(1, round(n * share)), n - 1)
        out[n] = spam[:n_spam] + ham[: n - n_spam]
    return out


def as_reports(data_dir: Path, drawn: list[ChatRow]) -> None:
    """The drawn messages as the service records reports: one line each in examples.jsonl."""
    examples = LabelledExamples(examples_path(data_dir))
    for i, row in enumerate(drawn):
        examples.append(
            LabelledExample(
                example_id=f"curve-{row.row_id}",
                at=T0 + timedelta(seconds=i),
                label=Label.SPAM if row.label == 1 else Label.HAM,
                source=Source.REPORT,
                actor=f"reporter{i}@harbourline.example",
                sender=row.sender,
                record_id=row.row_id,
                text=row.text,
            )
        )


def retrained(work: Path, name: str, sms: Path, drawn: list[ChatRow]) -> TextModel:
    data_dir = work / name
    as_reports(data_dir, drawn)
    clock = ManualClock(T0)
    outcome = retrain(
        data_dir,
        clock=clock,
        command=f"benchmarks/learning_curve.py ({name})",
        base_path=sms,
        base_format="sms",
        folds=None,
    )
    assert outcome.training.examples["used"] == len(drawn), outcome.training.examples
    return ModelRegistry.of(data_dir, clock).load(outcome.version)


COLUMNS = (("mcc", ".3f"), ("spam_caught", ".1%"), ("blocked_ham", ".1%"))


def mean_sd(values: list[float], fmt: str) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {sd:{fmt}}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=Path, default=DEFAULT_SMS, help="SMS Spam Collection")
    parser.add_argument("--chat", type=Path, default=DEFAULT_CHAT, help="labelled chat set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every repeat's figures here")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes))
    chat = read_chat(args.chat)
    if sizes[0] < 2 or sizes[-1] >= len(chat) - 2:
        parser.error(f"sizes must be in [2, {len(chat) - 3}]")
    shipped = load_default_model()
    sms_sha = load_dataset(args.sms, "sms").sha256
    print(
        f"chat set: {args.chat} ({len(chat)} messages, {sum(r.label for r in chat)} spam); "
        f"SMS base: {args.sms} (sha256 {sms_sha[:12]}…, shipped model trained on "
        f"{shipped.info['training']['data']['sha256'][:12]}…)"
    )
    results: dict[str, Any] = {"sizes": sizes, "repeats": args.repeats, "seed": args.seed}
    whole = measure(shipped, chat)
    results["sms_only_whole_set"] = whole.to_json()

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with (
        tempfile.TemporaryDirectory(prefix="learning-curve-") as tmp,
        Progress(*columns, TimeElapsedColumn()) as progress,
    ):
        work = Path(tmp)
        task = progress.add_task("retraining", total=1 + len(sizes) * args.repeats)
        zero = retrained(work, "zero", args.sms, [])
        progress.advance(task)
        same = bool(
            np.array_equal(zero.weights, shipped.weights)
            and zero.thresholds == shipped.thresholds
            and zero.intercept == shipped.intercept
        )
        results["zero_reports_equals_shipped"] = same
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
        for repeat in range(args.repeats):
            drawn_by_size = draws(chat, sizes, random.Random(args.seed * 1000 + repeat))
            for n, drawn in drawn_by_size.items():
                progress.update(task, description=f"repeat {repeat + 1}: {n} reports")
                taken = {normalise_for_grouping(r.text) for r in drawn}
                rest = [r for r in chat if normalise_for_grouping(r.text) not in taken]
                model = retrained(work, f"r{repeat}-n{n}", args.sms, drawn)
                runs[n].append(
                    {
                        "repeat": repeat,
                        "reports": n,
                        "reported_spam": sum(r.label for r in drawn),
                        "rest": len(rest),
                        "sms_only": measure(shipped, rest).to_json(),
                        "retrained": measure(model, rest).to_json(),
                        "thresholds": model.thresholds.to_json(),
                    }
                )
                progress.advance(task)
    results["runs"] = {str(n): runs[n] for n in sizes}

    print("\nSMS-only model on the whole chat set:")
    for name, metrics in (
        ("block", whole.block),
        ("flag", whole.flag),
        (f"p >= {POLICY_THRESHOLD:g}", whole.policy),
    ):
        print(
            f"  {name}: MCC {metrics.mcc:.3f}, spam caught {metrics.spam_caught:.1%}, "
            f"blocked ham {metrics.blocked_ham:.1%}"
        )
    print(f"0 reports through the retrain path == shipped model: {same}")
    print(
        f"\nMeasured on the chat messages not reported; mean ± sd over {args.repeats} "
        f"repeats (seed {args.seed}). block / flag: the model's own thresholds; "
        f"p >= {POLICY_THRESHOLD:g}: the default policy's hold threshold for strangers."
    )
    for points in (("block", "flag"), ("policy",)):
        names = [f"p >= {POLICY_THRESHOLD:g}" if p == "policy" else p for p in points]
        header = "| reports | model |" + "".join(
            f" {name} MCC | spam caught | blocked ham |" for name in names
        )
        print("\n" + header)
        print("|" + "---|" * (2 + 3 * len(points)))
        for n in sizes:
            for which in ("sms_only", "retrained"):
                label = "SMS only" if which == "sms_only" else f"SMS + {n} reports"
                cells = []
                for point in points:
                    for key, fmt in COLUMNS:
                        values = [run[which][point][key] for run in runs[n]]
                        cells.append(mean_sd(values, fmt))
                print(f"| {n} | {label} | " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(f"\n{args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
