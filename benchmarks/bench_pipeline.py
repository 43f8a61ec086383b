"""The per-stanza pipeline's CPU cost without the network: where `stanzaguard run` spends it.

Starts the one-machine service (`ArchivingService`: policy, spool with fsync, index worker)
on a fresh data directory, frames realistic one-line chat messages the way the proxy does,
and hands them to the service's hook exactly as the proxy's two legs would: the sender's
message (client -> server) and the same message delivered to the recipient (server ->
client), one stanza per call (the latency case) or in batches (a burst). Baseline, in the
same run: the same stanzas through a pass-through hook (framing only).

Prints CPU µs per message of this process (every thread: event loop and spool writer), the
index worker's CPU separately, and with --cprofile the top functions.

    .venv/bin/python benchmarks/bench_pipeline.py [--count 20000] [--batch 1] [--cprofile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archive_api.store.records import Direction
from proxy.hook import PASS, SessionInfo
from proxy.stream import Element, Framer, FramingLimits
from stanzaguard.settings import Settings
from stanzaguard.wiring import ArchivingService

DOMAIN = "bench.example"
HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='bench.example' version='1.0'>"
)


def stanzas(count: int, direction: Direction) -> list[Element]:
    framer = Framer(FramingLimits())
    framer.feed(HEADER)
    out: list[Element] = []
    for i in range(count):
        if direction == Direction.FROM_CLIENT:
            data = (
                f"<message to='bob@{DOMAIN}' id='m{i}' type='chat'>"
                f"<body>message {i}: shall we meet at three to go over the numbers?</body>"
                f"<origin-id xmlns='urn:xmpp:sid:0' id='o{i}'/></message>"
            )
        else:
            data = (
                f"<message from='alice@{DOMAIN}/phone' to='bob@{DOMAIN}/desk' id='m{i}' "
                f"type='chat'><body>message {i}: shall we meet at three to go over the "
                f"numbers?</body><origin-id xmlns='urn:xmpp:sid:0' id='o{i}'/>"
                f"<stanza-id xmlns='urn:xmpp:sid:0' by='bob@{DOMAIN}' id='s{i}'/></message>"
            )
        (frame,) = framer.feed(data.encode())
        assert isinstance(frame, Element)
        out.append(frame)
    return out


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode()
        fields = stat[stat.rindex(b")") + 2 :].split()
        out[f"{name}/{tid} u={int(fields[11]) / tick:.1f}s s={int(fields[12]) / tick:.1f}s"] = (
            int(fields[11]) + int(fields[12])
        ) / tick
    return out


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="sg-bench-pipeline-"))
    settings = Settings(
        environment="development",
        domain=[DOMAIN],
        data_dir=work,
        listen="127.0.0.1:0",
        allow_plaintext=True,
    )
    service = ArchivingService(settings)
    await service.start()
    alice = SessionInfo("s-alice", "127.0.0.1:1", DOMAIN, f"alice@{DOMAIN}/phone")
    bob = SessionInfo("s-bob", "127.0.0.1:2", DOMAIN, f"bob@{DOMAIN}/desk")
    alice.authenticated = bob.authenticated = True
    sent = stanzas(args.count + args.warmup, Direction.FROM_CLIENT)
    delivered = stanzas(args.count + args.warmup, Direction.TO_CLIENT)
    hook = service.hook
    batch = args.batch

    async def feed(lo: int, hi: int) -> None:
        for start in range(lo, hi, batch):
            end = min(start + batch, hi)
            decisions = await hook.process(alice, Direction.FROM_CLIENT, sent[start:end])
            assert all(d is PASS for d in decisions), decisions
            await hook.process(bob, Direction.TO_CLIENT, delivered[start:end])

    await feed(0, args.warmup)
    await service.indexer.drain()
    worker = getattr(service.indexer, "_proc", None)
    worker_pid = worker.pid if worker is not None else None
    profiler = cProfile.Profile(time.thread_time) if args.cprofile else None
    w0 = child_cpu(worker_pid) if worker_pid else 0.0
    c0, t0 = cpu(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    await feed(args.warmup, args.warmup + args.count)
    if profiler is not None:
        profiler.disable()
    c1, t1 = cpu(), time.perf_counter()
    threads = thread_cpu()
    await service.indexer.drain()
    w1 = child_cpu(worker_pid) if worker_pid else 0.0
    await service.stop()

    # Baseline: framing alone, the same bytes.
    b0 = cpu()
    framer = Framer(FramingLimits())
    framer.feed(HEADER)
    for element in sent[: args.count]:
        framer.feed(element.data)
    b1 = cpu()

    n = args.count
    print(f"hot path: {'compiled (mypyc)' if runs_compiled() else 'pure Python'}")
    print(f"messages: {n:,} (each seen on both legs), batch {batch}")
    print(f"  pipeline, this process CPU : {(c1 - c0) / n * 1e6:8.1f} us/msg")
    print(f"  wall                       : {(t1 - t0) / n * 1e6:8.1f} us/msg")
    if worker_pid:
        print(f"  index worker CPU           : {(w1 - w0) / n * 1e6:8.1f} us/msg")
    print(f"  baseline, framing only     : {(b1 - b0) / n * 1e6:8.1f} us/msg")
    print(f"  ratio pipeline/framing     : {(c1 - c0) / max(b1 - b0, 1e-9):8.1f}")
    for name, seconds in sorted(threads.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  thread {name:22}: {seconds / n * 1e6:8.1f} us/msg (whole run)")
    if profiler is not None:
        stats = pstats.Stats(profiler)
        stats.sort_stats(args.sort).print_stats(args.top)


def runs_compiled() -> bool:
    """Whether the normaliser this process runs is mypyc's (benchmarks/bench_native.py)."""
    import types

    from proxy import stanza

    return not isinstance(stanza.normalise, types.FunctionType)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--sort", default="tottime")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
