"""Single-message scoring cost of the text model against scikit-learn's ``predict_proba``.

Trains the default recipe on the SMS Spam Collection (or ``--data``), then scores every
message one call at a time (no batching: the proxy scores each stanza as it arrives) with:

- ``TextModel.score`` - text in, probability out - first with empty caches (every word is
  new once: the cost right after start-up) and then warm (the steady state);
- scikit-learn, same model: ``LinearSVC.decision_function`` + the calibrating
  ``LogisticRegression.predict_proba`` on the message's precomputed one-row sparse matrix
  (vectorising not even counted, so this is a lower bound for scikit-learn);
- scikit-learn, the conventional pipeline: ``FeatureUnion`` of word 1-2-gram and char_wb
  1-5-gram ``TfidfVectorizer``s + ``CalibratedClassifierCV(LinearSVC)``, ``predict_proba``
  on the raw text.

Prints median, p90 and p99 microseconds per message, messages per second of a
single-message loop, and the ratio to ``TextModel.score`` warm; checks that the scores of
our model and of scikit-learn's equal to 1e-9.

    .venv/bin/python benchmarks/bench_model.py [--data PATH] [--passes 3] [--limit N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from classifier.model import TextModel
from classifier.train import TrainConfig, fit_model
from stanzaguard.datasets import load_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "SMSSpamCollection"


Run = tuple[list[float], float, float]


def per_call(fn: Callable[[int], object], n: int) -> Run:
    """Wall µs of each call ``fn(i)``, the loop's wall seconds and its CPU seconds."""
    times: list[float] = []
    clock = time.perf_counter_ns
    cpu = time.process_time()
    start = clock()
    for i in range(n):
        t0 = clock()
        fn(i)
        times.append((clock() - t0) / 1000)
    return times, (clock() - start) / 1e9, time.process_time() - cpu


def summary(name: str, run: Run, baseline: float | None) -> float:
    times, total, cpu = run
    median = statistics.median(times)
    q = np.percentile(times, [90, 99])
    rate = len(times) / total
    cpu_us = cpu / len(times) * 1e6
    ratio = f"{median / baseline:8.1f}x" if baseline else "       1x"
    print(f"{name:44s} {median:8.1f} {q[0]:8.1f} {q[1]:8.1f} {cpu_us:8.1f} {rate:10,.0f} {ratio}")
    return median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--format", default="sms")
    parser.add_argument("--passes", type=int, default=3, help="warm passes; the best counts")
    parser.add_argument("--limit", type=int, default=None, help="score only this many")
    parser.add_argument("--skip-pipeline", action="store_true", help="no TF-IDF pipeline")
    args = parser.parse_args()

    dataset = load_dataset(args.data, args.format)
    samples = dataset.samples
    texts = [t for t, _ in samples][: args.limit]
    labels = [y for _, y in samples]
    n = len(texts)
    print(f"data: {args.data} ({len(samples)} messages, scoring {n}); training...", flush=True)
    fitted = fit_model(samples, TrainConfig())
    arrays, metadata = fitted.model.to_arrays()

    rows = fitted.matrix(texts)
    reference = fitted.reference_proba(texts)
    fresh = TextModel.from_arrays(arrays, metadata)
    ours = np.array([fresh.score(t) for t in texts])
    print(f"max |ours - scikit-learn| over {n} messages: {np.max(np.abs(ours - reference)):.2e}")
    print(f"model: {arrays['buckets'].size:,} non-zero buckets\n")

    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    header = f"{'per single message':44s} {'median':>8s} {'p90':>8s} {'p99':>8s} {'CPU/msg':>8s}"
    print(f"{header} {'msgs/s':>10s} {'vs ours':>9s}")
    print(f"{'':44s} {'µs':>8s} {'µs':>8s} {'µs':>8s} {'µs':>8s}")

    cold_model = TextModel.from_arrays(arrays, metadata)
    cold = per_call(lambda i: cold_model.score(texts[i]), n)
    warm_model = cold_model
    best: Run | None = None
    for _ in range(args.passes):
        run = per_call(lambda i: warm_model.score(texts[i]), n)
        if best is None or statistics.median(run[0]) < statistics.median(best[0]):
            best = run
    assert best is not None
    base = summary("TextModel.score, warm caches", best, None)
    summary("TextModel.score, cold (first sight, in order)", cold, base)

    # Held-out steady state: caches warmed by the first half, timed on the unseen second half.
    half = TextModel.from_arrays(arrays, metadata)
    for t in texts[: n // 2]:
        half.score(t)
    later = texts[n // 2 :]
    summary(
        "TextModel.score, 2nd half after 1st half",
        per_call(lambda i: half.score(later[i]), len(later)),
        base,
    )

    svm, calibrator = fitted.estimator, fitted.calibrator
    single = [rows[i] for i in range(n)]

    def sklearn_same(i: int) -> object:
        decision = svm.decision_function(single[i])
        return calibrator.predict_proba(decision.reshape(-1, 1))[0, 1]

    summary("sklearn same model, matrix given", per_call(sklearn_same, n), base)

    if not args.skip_pipeline:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import make_pipeline, make_union
        from sklearn.svm import LinearSVC

        pipeline = make_pipeline(
            make_union(
                TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 5), sublinear_tf=True),
            ),
            CalibratedClassifierCV(LinearSVC(), ensemble=False),
        )
        pipeline.fit([t for t, _ in samples], labels)
        run = per_call(lambda i: pipeline.predict_proba([texts[i]])[0, 1], n)
        summary("sklearn TF-IDF pipeline, text in", run, base)
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
