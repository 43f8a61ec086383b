"""Proxy throughput with the distributed shipper vs the embedded index worker, in one run.

One throwaway Prosody (benchmark config: no rate limit, Nagle off) and, one after the other,
two `stanzaguard run` processes in front of it, the full service with its default policy:

  embedded   indexing=process: the index worker child indexes the spool into SQLite;
  celery     indexing=celery: the proxy's `CeleryIndexer` ships spool batches over a real
             redis-server to one `stanzaguard worker` process writing its own SQLite file.

For each: N one-line chat messages, one sender -> one receiver, through the proxy, in a few
rounds; delivered msgs/s and CPU per delivered message of the proxy's process (and its
index worker child), then how long after the last delivery the archive held every message
(the indexing lag at the end of a burst). The machine may be shared: figures are noisy.

    .venv/bin/python benchmarks/bench_distributed_proxy.py [--count 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import xmppload
from benchmarks._services import Prosody, Proxy, cpu_seconds, make_cert, stop_pid
from benchmarks.bench_indexing import machine
from tests.support.redis import running_redis

DOMAIN = "localhost"
LAG_LIMIT = 300.0
USERS = {"alice": "alice-bench-pw", "bob": "bob-bench-pw"}


def tree_cpu(pid: int) -> float:
    total = cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            total += tree_cpu(int(child))
    return total


def archived(path: Path) -> int:
    """Spool entries a SQLite archive has applied, all chains (0 while it does not exist).

    Not records: the load client reuses its stanza ids every round, so later rounds are
    the same messages (observed again), which the store collapses into the same records.
    """
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT coalesce(sum(last_seq), 0) FROM chains").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`Proxy.start` passes this process's environment on: set the mode's settings there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def measure(
    proxy: Proxy, archive: Path, count: int, rounds: int, window: int, worker: int | None = None
) -> tuple[list[float], float, float, float]:
    """(msgs/s per round, proxy CPU µs per message incl. its children, the Celery worker's
    CPU µs per message (settled after the lag), seconds of lag)."""
    rates: list[float] = []
    cpu = 0.0
    total = 0
    worker0 = tree_cpu(worker) if worker is not None else 0.0
    before_rounds = archived(archive)
    for index in range(rounds + 1):  # round 0 warms up
        receiver = await xmppload.connect(
            "127.0.0.1",
            proxy.port,
            "bob",
            USERS["bob"],
            domain=DOMAIN,
            resource=f"r{index}",
            presence=True,
        )
        sender = await xmppload.connect(
            "127.0.0.1", proxy.port, "alice", USERS["alice"], domain=DOMAIN, resource=f"s{index}"
        )
        try:
            cpu0 = tree_cpu(proxy.pid)
            result = await xmppload.run_burst(
                sender, receiver, f"bob@{DOMAIN}", count, window=window
            )
            spent = tree_cpu(proxy.pid) - cpu0
        finally:
            await sender.close()
            await receiver.close()
        if result.delivered != count:
            raise RuntimeError(f"delivered {result.delivered} of {count}")
        print(f"  {proxy.name} round {index}: {result.msgs_per_s:,.0f} msgs/s", flush=True)
        if index == 0:
            continue
        rates.append(result.msgs_per_s)
        cpu += spent
        total += count
    # The lag: from the end of the last burst until the archive stops moving (unchanged for
    # two seconds): when the last spooled entry was applied.
    done = time.perf_counter()
    last, changed = archived(archive), done
    while time.perf_counter() - changed < 2.0 and time.perf_counter() - done < LAG_LIMIT:
        await asyncio.sleep(0.02)
        now = archived(archive)
        if now != last:
            last, changed = now, time.perf_counter()
    lag = changed - done
    worker_us = (tree_cpu(worker) - worker0) / ((rounds + 1) * count) * 1e6 if worker else 0.0
    print(f"  {proxy.name}: archive applied {last - before_rounds:,} entries", flush=True)
    return rates, cpu / total * 1e6, worker_us, lag


def start_worker(root: Path, redis_url: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANZAGUARD_")}
    env["STANZAGUARD_LOG_LEVEL"] = "warning"
    argv = [sys.executable, "-m", "stanzaguard.cli", "worker", "--data-dir", str(root / "worker")]
    argv += ["--redis-url", redis_url, "--concurrency", "1"]
    with (root / "worker.log").open("wb") as log:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def run(args: argparse.Namespace, root: Path) -> None:
    cert, key = make_cert(root / "prosody" / "certs", DOMAIN)
    prosody = Prosody(root / "prosody", cert, key)
    for user, password in USERS.items():
        prosody.register(user, password)
    prosody.start()
    results: dict[str, tuple[list[float], float, float, float]] = {}
    try:
        # Embedded: the index worker child of `stanzaguard run`.
        proxy = Proxy(root, prosody.port, cert, key, name="embedded", kind="service")
        with environment({"STANZAGUARD_API_LISTEN": "off", "STANZAGUARD_LOG_LEVEL": "warning"}):
            proxy.start()
        try:
            results["embedded"] = await measure(
                proxy,
                root / "embedded-data" / "archive.sqlite3",
                args.count,
                args.rounds,
                args.window,
            )
        finally:
            proxy.stop()

        # Distributed: the Celery shipper, one worker process, real Redis.
        with running_redis(root / "redis") as redis_server:
            worker = start_worker(root, redis_server.url)
            try:
                proxy = Proxy(root, prosody.port, cert, key, name="celery", kind="service")
                settings = {
                    "STANZAGUARD_API_LISTEN": "off",
                    "STANZAGUARD_LOG_LEVEL": "warning",
                    "STANZAGUARD_INDEXING": "celery",
                    "STANZAGUARD_REDIS_URL": redis_server.url,
                }
                with environment(settings):
                    proxy.start()
                try:
                    results["celery"] = await measure(
                        proxy,
                        root / "worker" / "archive.sqlite3",
                        args.count,
                        args.rounds,
                        args.window,
                        worker.pid,
                    )
                finally:
                    proxy.stop()
            finally:
                stop_pid(worker)
    finally:
        prosody.stop()

    print()
    print(
        f"{'mode':<10} {'msgs/s (median)':>16} {'rounds':>24} {'proxy CPU µs/msg':>17} "
        f"{'worker CPU µs/msg':>18} {'archive lag':>12}"
    )
    for mode, (rates, cpu_us, worker_us, lag) in results.items():
        listed = ", ".join(f"{r:,.0f}" for r in rates)
        print(
            f"{mode:<10} {statistics.median(rates):>16,.0f} {listed:>24} {cpu_us:>17.1f} "
            f"{worker_us:>18.1f} {lag:>10.2f} s"
        )
    print(
        "(proxy CPU includes the embedded mode's index worker child; the Celery worker's CPU "
        "is counted over every round and the lag)"
    )
    ratio = statistics.median(results["celery"][0]) / statistics.median(results["embedded"][0])
    print(f"throughput ratio celery/embedded: {ratio:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per mode")
    parser.add_argument("--window", type=int, default=200, help="messages in flight")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-distributed-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # Prosody's user must reach its directory inside
        asyncio.run(run(args, root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
