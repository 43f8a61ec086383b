"""Shared rate counters: what a counted stanza costs the proxy's event loop, in one run.

The same workload, a `RateLimitRule` (per sender) and a fan-out `add_distinct` evaluated for N
stanzas from a few hundred senders, against:

  memory     `InMemoryCounterStore` (one proxy, no sharing): the baseline;
  exact      `RedisCounterStore` (counters=redis, counters_flush_interval=0): one blocking
             round trip to a real loopback redis-server per counted event;
  buffered   `BufferedRedisCounters` (counters_flush_interval=0.05): own events counted in
             memory, written to the same Redis by a background thread every 50 ms.

Prints, per store, the calling thread's CPU µs and wall µs per stanza (two counted events each;
for the proxy, the time its event loop is held), the ratio to the baseline, and the process's
CPU per stanza (for `buffered` that includes the background writer, also its last flush).
Loopback Redis is the best case for `exact`: over a network each round trip adds its latency.

    .venv/bin/python benchmarks/bench_counters.py [--count 20000] [--senders 300]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_indexing import machine
from classifier.limits import CounterStore, InMemoryCounterStore, LimitKind, RateLimitRule
from proxy.redis_state import BufferedRedisCounters, RedisCounterStore
from tests.classifier.helpers import CLOCK, make_ctx
from tests.support.redis import running_redis


def workload(store: CounterStore, count: int, senders: int) -> Callable[[], None]:
    rule = RateLimitRule(LimitKind.SENDER, 1_000_000, store)
    start = CLOCK.now()
    contexts = [
        make_ctx(
            timestamp=start + timedelta(milliseconds=i),
            sender=f"user{i % senders}@corp.example",
            recipient=f"peer{i % 97}@partner.example",
        )
        for i in range(count)
    ]

    def run() -> None:
        for i, ctx in enumerate(contexts):
            rule.evaluate(ctx)
            store.add_distinct(
                f"fanout:{ctx.sender}", ctx.recipient or "", i / 1000.0, 60.0, 10_000
            )

    return run


def measure(name: str, store: CounterStore, count: int, senders: int) -> tuple[float, float, float]:
    run = workload(store, count, senders)
    workload(store, min(count, 2000), senders)()  # warm-up: scripts loaded, keys made
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    thread0, wall0 = time.thread_time(), time.perf_counter()
    run()
    thread1, wall1 = time.thread_time(), time.perf_counter()
    if isinstance(store, BufferedRedisCounters):
        store.flush()  # the writes still queued: the background thread's work, counted below
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    process = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    per = 1e6 / count
    print(
        f"  {name:9} caller CPU {(thread1 - thread0) * per:8.2f} us/stanza   "
        f"wall {(wall1 - wall0) * per:8.2f} us/stanza   process CPU {process * per:8.2f}"
    )
    return (thread1 - thread0) * per, (wall1 - wall0) * per, process * per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--senders", type=int, default=300)
    args = parser.parse_args()
    print(machine())
    print(f"{args.count:,} stanzas from {args.senders} senders, 2 counted events each")
    with tempfile.TemporaryDirectory() as work, running_redis(Path(work) / "redis") as server:
        base = measure("memory", InMemoryCounterStore(), args.count, args.senders)
        exact_store = RedisCounterStore.from_url(server.url)
        exact = measure("exact", exact_store, args.count, args.senders)
        exact_store.close()
        buffered_store = BufferedRedisCounters(
            RedisCounterStore.from_url(server.url), interval=0.05
        )
        buffered = measure("buffered", buffered_store, args.count, args.senders)
        buffered_store.close()
    print("ratios to memory (caller CPU / wall):")
    for name, figures in (("exact", exact), ("buffered", buffered)):
        print(f"  {name:9} {figures[0] / base[0]:6.1f}x / {figures[1] / base[1]:6.1f}x")
    print(f"buffered vs exact, wall per stanza: {buffered[1] / exact[1]:.2f}x")


if __name__ == "__main__":
    main()
