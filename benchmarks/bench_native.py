"""The hot path compiled by mypyc against the same code run as pure Python, side by side.

Each pair runs the same benchmark twice, once with the compiled modules (`make native`) and
once from the ``.py`` sources (``benchmarks/pure_python`` on PYTHONPATH; children such as the
index worker inherit it), the order alternating between pairs so that both see the same drift
of a shared machine. Prints each run, the medians and the ratio compiled / pure.

- pipeline (default): `bench_pipeline.py` - the per-stanza pipeline without the network; CPU
  µs per message of the service process and of its index worker.
- ``--transport``: also `bench_transport.py --proxy service` - the whole `stanzaguard run`
  behind a real Prosody, STARTTLS clients; throughput, proxy CPU per message, latency.

    .venv/bin/python benchmarks/bench_native.py [--pairs 5] [--count 8000] [--batch 32]
    .venv/bin/python benchmarks/bench_native.py --pairs 2 --transport --transport-count 10000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PURE_PYTHON = HERE / "pure_python"
MODES = ("compiled", "pure")


def env_for(mode: str) -> dict[str, str]:
    env = dict(os.environ)
    path = str(REPO) if mode == "compiled" else f"{PURE_PYTHON}{os.pathsep}{REPO}"
    env["PYTHONPATH"] = path
    return env


def figure(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"no {pattern!r} in the output:\n{text}")
    return float(found.group(1).replace(",", ""))


def pipeline_run(mode: str, args: argparse.Namespace) -> dict[str, float]:
    command = [
        sys.executable,
        str(HERE / "bench_pipeline.py"),
        f"--count={args.count}",
        f"--warmup={args.warmup}",
        f"--batch={args.batch}",
    ]
    out = subprocess.run(
        command, env=env_for(mode), capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    expected = "compiled (mypyc)" if mode == "compiled" else "pure Python"
    if f"hot path: {expected}" not in out:
        raise RuntimeError(f"{mode} run did not run {expected}:\n{out}")
    return {
        "pipeline_us": figure(r"pipeline, this process CPU :\s+([\d.]+)", out),
        "worker_us": figure(r"index worker CPU\s+:\s+([\d.]+)", out),
    }


def transport_run(mode: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    out_json = work / f"transport-{mode}-{len(list(work.iterdir()))}.json"
    command = [
        sys.executable,
        str(HERE / "bench_transport.py"),
        "--proxy=service",
        f"--count={args.transport_count}",
        f"--repeats={args.transport_repeats}",
        f"--json={out_json}",
        *(["--pure"] if mode == "pure" else []),
        *args.transport_arg,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"bench_transport ({mode}) failed:\n{done.stdout}\n{done.stderr}")
    res = json.loads(out_json.read_text())
    direct, via = res["direct"], res["proxy"]
    latency = res.get("latency", {})
    return {
        "ratio": statistics.median(via["rates"]) / statistics.median(direct["rates"]),
        "proxy_msgs_s": statistics.median(via["rates"]),
        "proxy_us": via["proxy_us_per_msg"],
        "loop_us": via["proxy_loop_thread_us_per_msg"],
        "prosody_us": via["prosody_us_per_msg"],
        "worker_us": via["index_worker_us_per_msg"],
        "p99_added_ms": latency.get("proxy", {}).get("p99", float("nan"))
        - latency.get("direct", {}).get("p99", float("nan")),
    }


def table(title: str, runs: dict[str, list[dict[str, float]]], lower_is_better: set[str]) -> None:
    keys = list(runs["compiled"][0])
    print(f"\n{title}")
    print(f"{'':10}" + "".join(f"{k:>16}" for k in keys))
    for mode in MODES:
        for i, run in enumerate(runs[mode]):
            print(f"{mode + ' ' + str(i):10}" + "".join(f"{run[k]:16.2f}" for k in keys))
    medians = {m: {k: statistics.median(r[k] for r in runs[m]) for k in keys} for m in MODES}
    for mode in MODES:
        print(f"{'median ' + mode:10}" + "".join(f"{medians[mode][k]:16.2f}" for k in keys))
    ratios = [medians["compiled"][k] / medians["pure"][k] for k in keys]
    print(f"{'compiled/pure':10}" + "".join(f"{r:16.2f}" for r in ratios))
    better = [k for k in keys if k in lower_is_better]
    if better:
        print("(for " + ", ".join(better) + " lower is better)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--count", type=int, default=8_000, help="messages per pipeline run")
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=32, help="stanzas per hook call")
    parser.add_argument("--transport", action="store_true", help="also the end-to-end runs")
    parser.add_argument("--transport-count", type=int, default=10_000)
    parser.add_argument("--transport-repeats", type=int, default=3)
    parser.add_argument(
        "--transport-arg", action="append", default=[], help="passed to bench_transport.py"
    )
    args = parser.parse_args()
    from benchmarks._services import native_state

    state = native_state()
    print(f"compiled side: {state}")
    if not state.startswith("compiled (mypyc) ") or " 0/" in state:
        print("nothing is compiled: run `make native` first", file=sys.stderr)
        return 2
    pipeline: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    transport: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="sg-native-") as tmp:
        for i in range(args.pairs):
            order = MODES if i % 2 == 0 else MODES[::-1]
            for mode in order:
                pipeline[mode].append(pipeline_run(mode, args))
                print(f"pipeline pair {i} {mode}: {pipeline[mode][-1]}", flush=True)
            if args.transport:
                for mode in order:
                    transport[mode].append(transport_run(mode, args, Path(tmp)))
                    print(f"transport pair {i} {mode}: {transport[mode][-1]}", flush=True)
    table(
        f"pipeline (bench_pipeline --count {args.count} --batch {args.batch}), µs CPU per msg",
        pipeline,
        {"pipeline_us", "worker_us"},
    )
    if args.transport:
        table(
            f"transport (bench_transport --proxy service --count {args.transport_count})",
            transport,
            {"proxy_us", "loop_us", "prosody_us", "worker_us", "p99_added_ms"},
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
