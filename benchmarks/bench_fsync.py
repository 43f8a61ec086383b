"""What one durable append costs on this disk: growing the file vs writing into room ahead.

The spool makes every stanza durable before it is forwarded, so at a paced rate each stanza
pays one `write` + `fsync`. This measures that on the directory given (default: a temporary
directory beside the current one, i.e. on the same filesystem as a data directory there),
side by side in one run, alternating the modes:

- grow + fsync: each append extends the file (the spool before session 6; the baseline);
- grow + fdatasync;
- hole room + fsync: the file was extended ahead with `ftruncate` (what the spool does now);
- allocated room + fdatasync: extended ahead with `posix_fallocate`.

Prints CPU µs (user + system of this process), wall µs and p50 / p99 per append, and each
mode's ratio to the baseline.

    .venv/bin/python benchmarks/bench_fsync.py [--count 4000] [--size 600] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOM = 4 * 1024 * 1024


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(
    directory: Path, count: int, size: int, sync: Callable[[int], None], room: str | None
) -> tuple[float, float, float, float]:
    path = directory / "append.log"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    data = b"x" * size
    room_end = offset = 0
    latencies: list[float] = []
    try:
        c0, t0 = cpu(), time.perf_counter()
        for _ in range(count):
            start = time.perf_counter()
            if room is not None and offset + size > room_end:
                if room == "hole":
                    os.ftruncate(fd, room_end + ROOM)
                else:
                    os.posix_fallocate(fd, room_end, ROOM)
                room_end += ROOM
            os.pwrite(fd, data, offset)
            offset += size
            sync(fd)
            latencies.append(time.perf_counter() - start)
        c1, t1 = cpu(), time.perf_counter()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    latencies.sort()
    return (
        (c1 - c0) / count * 1e6,
        (t1 - t0) / count * 1e6,
        statistics.median(latencies) * 1e3,
        latencies[int(count * 0.99)] * 1e3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--size", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    modes: list[tuple[str, Callable[[int], None], str | None]] = [
        ("grow + fsync (baseline)", os.fsync, None),
        ("grow + fdatasync", os.fdatasync, None),
        ("hole room + fsync (spool)", os.fsync, "hole"),
        ("allocated room + fdatasync", os.fdatasync, "allocate"),
    ]
    with tempfile.TemporaryDirectory(prefix="sg-bench-fsync-", dir=args.dir or Path.cwd()) as tmp:
        results: dict[str, list[tuple[float, float, float, float]]] = {m[0]: [] for m in modes}
        for _ in range(args.rounds):
            for name, sync, room in modes:
                results[name].append(run(Path(tmp), args.count, args.size, sync, room))
    base_cpu = statistics.median(r[0] for r in results[modes[0][0]])
    base_wall = statistics.median(r[1] for r in results[modes[0][0]])
    print(f"{args.count:,} appends of {args.size} bytes, {args.rounds} rounds, median of rounds")
    print(f"{'mode':30} {'CPU us':>8} {'wall us':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU x':>6}")
    for name, rows in results.items():
        c, w, p50, p99 = (statistics.median(r[i] for r in rows) for i in range(4))
        print(f"{name:30} {c:8.1f} {w:8.1f} {p50:7.3f} {p99:7.3f} {c / base_cpu:6.2f}")
    spool_wall = statistics.median(r[1] for r in results[modes[2][0]])
    print(f"wall ratio, spool mode / baseline: {spool_wall / base_wall:.2f}")


if __name__ == "__main__":
    main()
