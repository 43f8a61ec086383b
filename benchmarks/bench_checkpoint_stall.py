"""How long the spool's durable appends stall while the archive's SQLite WAL is checkpointed.

The paced-latency tail of `bench_transport.py --proxy service` comes from the index worker's
WAL checkpoint: ~128 MiB of WAL and then the database pages are flushed to the disk in one go,
and the spool's `fdatasync` waits behind them. This reproduces that on the directory given
(default: a temporary directory under the current one, i.e. on the data directory's disk)
without the proxy: one thread appends 600 bytes with `fdatasync` every millisecond into room
made ahead with `ftruncate` (as the spool does), while SQLite commits 5,000 random-keyed rows of
700 bytes every 0.3 s with the store's page size, WAL and `synchronous = NORMAL`. Modes,
alternated, each with the appender's own latencies:

- autocheckpoint (the baseline, as shipped): `wal_autocheckpoint` at 128 MiB;
- WAL written behind: the same, plus `sync_file_range(SYNC_FILE_RANGE_WRITE)` on the WAL after
  every commit, so its pages go to the disk a commit at a time instead of at the checkpoint;
- paced checkpoint: no autocheckpoint and no writing behind; at 128 MiB of WAL the WAL is
  written out 4 MiB at a time with a 5 ms pause, fsynced, then checkpointed with
  `synchronous = OFF` while another connection holds the write lock (so the WAL cannot
  restart), the database written out the same paced way and fsynced, and only then the lock
  released.

Prints p50 / p99 / p99.9 / max of the appends, how many took over 5 and 20 ms, and each mode's
p99 and max as a ratio to the baseline's.

    .venv/bin/python benchmarks/bench_checkpoint_stall.py [--batches 60] [--rounds 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PAGE_SIZE = 8192
CHECKPOINT_BYTES = 128 << 20
PACE_STEP = 4 << 20
PACE_PAUSE_S = 0.005
APPEND = b"x" * 600
SYNC_WAIT_BEFORE, SYNC_WRITE, SYNC_WAIT_AFTER = 1, 2, 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]


def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    if _libc.sync_file_range(fd, offset, length, flags) != 0:
        raise OSError(ctypes.get_errno(), "sync_file_range")


def paced_write_out(fd: int) -> None:
    """Write a file's dirty pages a step at a time, pausing between steps, then fdatasync."""
    size = os.fstat(fd).st_size
    for offset in range(0, size, PACE_STEP):
        sync_file_range(fd, offset, PACE_STEP, SYNC_WAIT_BEFORE | SYNC_WRITE | SYNC_WAIT_AFTER)
        time.sleep(PACE_PAUSE_S)
    os.fdatasync(fd)


@dataclass
class Appender:
    """The spool's stand-in: a durable 600-byte append every millisecond."""

    path: Path
    latencies_ms: list[float]
    stop: threading.Event

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 64 << 20)
            offset = 0
            while not self.stop.is_set():
                start = time.monotonic()
                os.pwrite(fd, APPEND, offset)
                os.fdatasync(fd)
                self.latencies_ms.append((time.monotonic() - start) * 1000)
                offset += len(APPEND)
                time.sleep(0.001)
        finally:
            os.close(fd)


def open_store(path: Path, autocheckpoint: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    pages = CHECKPOINT_BYTES // PAGE_SIZE if autocheckpoint else 0
    conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")
    conn.execute("CREATE TABLE rows (key TEXT PRIMARY KEY, value BLOB)")
    conn.execute("CREATE INDEX rows_prefix ON rows (substr(value, 1, 16))")
    return conn


def paced_checkpoint(path: Path, conn: sqlite3.Connection, wal_fd: int) -> None:
    paced_write_out(wal_fd)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        # While the write lock is held no writer can restart the WAL over frames whose
        # pages are not yet durable in the database file.
        holder.execute("BEGIN IMMEDIATE")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        conn.execute("PRAGMA synchronous = NORMAL")
        db_fd = os.open(path, os.O_RDONLY)
        try:
            paced_write_out(db_fd)
        finally:
            os.close(db_fd)
        holder.execute("ROLLBACK")
    finally:
        holder.close()


def run_mode(directory: Path, mode: str, batches: int) -> list[float]:
    work = Path(tempfile.mkdtemp(prefix="sg-ckpt-", dir=directory))
    try:
        latencies: list[float] = []
        stop = threading.Event()
        appender = Appender(work / "spool", latencies, stop)
        thread = threading.Thread(target=appender.run)
        thread.start()
        db = work / "archive.db"
        conn = open_store(db, autocheckpoint=mode != "paced checkpoint")
        wal_fd: int | None = None
        rng = random.Random(1)
        try:
            time.sleep(0.5)
            for _ in range(batches):
                rows = [(repr(rng.random()), rng.randbytes(700)) for _ in range(5000)]
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO rows VALUES (?, ?)", rows)
                conn.execute("COMMIT")
                if mode != "autocheckpoint":
                    if wal_fd is None:
                        wal_fd = os.open(str(db) + "-wal", os.O_RDONLY)
                    if mode == "WAL written behind":
                        sync_file_range(wal_fd, 0, 0, SYNC_WRITE)
                    elif os.fstat(wal_fd).st_size > CHECKPOINT_BYTES:
                        paced_checkpoint(db, conn, wal_fd)
                        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                time.sleep(0.3)
        finally:
            stop.set()
            thread.join()
            if wal_fd is not None:
                os.close(wal_fd)
            conn.close()
        return latencies
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quantile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * q))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=60, help="commits of 5,000 rows per mode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    args = parser.parse_args()
    modes = ("autocheckpoint", "WAL written behind", "paced checkpoint")
    figures: dict[str, list[tuple[float, float, float, float, int, int]]] = {m: [] for m in modes}
    for round_no in range(args.rounds):
        for mode in modes:
            ms = sorted(run_mode(args.dir, mode, args.batches))
            row = (
                quantile(ms, 0.5),
                quantile(ms, 0.99),
                quantile(ms, 0.999),
                ms[-1],
                sum(v > 5 for v in ms),
                sum(v > 20 for v in ms),
            )
            figures[mode].append(row)
            print(
                f"round {round_no} {mode}: {len(ms):,} appends; "
                f"p99 {row[1]:.2f} max {row[3]:.1f} ms"
            )
    print(
        f"\n{args.batches} commits of 5,000 rows per mode, appends of 600 bytes + fdatasync every "
        f"ms, {args.rounds} rounds, median of rounds"
    )
    print(
        f"{'mode':22} {'p50 ms':>7} {'p99 ms':>7} {'p99.9':>7} {'max ms':>7} {'>5ms':>5} "
        f"{'>20ms':>5} {'p99 x':>6} {'max x':>6}"
    )

    def median(mode: str, column: int) -> float:
        return statistics.median(row[column] for row in figures[mode])

    base_p99, base_max = median(modes[0], 1), median(modes[0], 3)
    for mode in modes:
        p50, p99, p999, worst = (median(mode, i) for i in range(4))
        over5, over20 = median(mode, 4), median(mode, 5)
        print(
            f"{mode:22} {p50:7.3f} {p99:7.3f} {p999:7.3f} {worst:7.1f} {over5:5.0f} {over20:5.0f} "
            f"{p99 / base_p99:6.2f} {worst / base_max:6.2f}"
        )


if __name__ == "__main__":
    main()
