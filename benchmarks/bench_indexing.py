"""Indexing cost: `SqliteStore.apply` against the raw SQLite FTS5 insert rate, in one run.

Generates realistic spool entries first (not timed; the generator is shared with
bench_search in `benchmarks/_archive_gen.py`): chat, groupchat and headline messages as the
pipeline archives them (`ArchiveRecord` with bodies of realistic lengths, 1-3 observations,
verdicts with reasons, the raw stanza of ~300-600 bytes), a few subscription requests, spam
reports and session records, and the OBSERVE / STATUS / repeated RECORD entries that carbons,
MAM replays and officer releases add, among thousands of users, dozens of rooms and domains,
over weeks, a few of them arriving late. Fixed seed, so every run indexes the same bytes.
They are hash-chained into `ChainLink`s exactly as the spool does.

Then, per batch size (256, 1000, 5000 by default), on a fresh file each:

- baseline: the same bodies and subjects inserted into a bare FTS5 table (same tokenizer,
  WAL, synchronous=NORMAL), one transaction per batch: the DESIGN.md figure, as reference;
- store: `SqliteStore.apply` of the same links in the same batches through its public async
  API (one worker thread, one transaction per batch), as the indexer calls it;

and prints wall-clock records/s, CPU µs per record (process CPU time: every thread, event
loop included) and the ratio store/baseline. Finally the archive's size on disk after a WAL
checkpoint, per table, extrapolated linearly to one million messages.

    .venv/bin/python benchmarks/bench_indexing.py [--count 200000] [--quick]
        [--batch 256 --batch 1000 ...] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archive_api.store.chain import ChainLink
from archive_api.store.records import EntryOp
from archive_api.store.sqlite import SqliteStore
from benchmarks._archive_gen import chain, make_entries

# --- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    wall: float
    cpu: float
    count: int

    @property
    def rate(self) -> float:
        return self.count / self.wall

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.count * 1e6


def baseline(path: Path, texts: Sequence[tuple[str | None, str | None]], batch: int) -> Run:
    """A bare FTS5 table, the same text, the same transactions: the reference rate."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(
        "CREATE VIRTUAL TABLE fts USING fts5 (body, subject, "
        "tokenize = 'unicode61 remove_diacritics 2')"
    )
    rows = [(i + 1, body, subject) for i, (body, subject) in enumerate(texts)]
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(0, len(rows), batch):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO fts (rowid, body, subject) VALUES (?, ?, ?)", rows[i : i + batch]
        )
        conn.execute("COMMIT")
    run = Run(time.perf_counter() - wall0, time.process_time() - cpu0, len(rows))
    conn.close()
    return run


async def store_run(path: Path, links: Sequence[ChainLink], batch: int) -> Run:
    store = await SqliteStore.open(path)
    try:
        gc.collect()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(0, len(links), batch):
            await store.apply(links[i : i + batch])
        run = Run(time.perf_counter() - wall0, time.process_time() - cpu0, len(links))
        assert await store.last_seq() == len(links)
    finally:
        await store.close()
    return run


def sizes(path: Path) -> tuple[int, list[tuple[str, int]], int]:
    """File size after a full checkpoint (WAL folded in and truncated), and bytes per table."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        wal = Path(f"{path}-wal")
        total = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        per = conn.execute(
            "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
        ).fetchall()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    return total, [(str(n), int(s)) for n, s in per], int(page_size)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        mem = 0
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {mem / 1024 / 1024:.0f} GiB RAM, "
        f"Linux {os.uname().release}, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000, help="spool entries per run")
    parser.add_argument("--quick", action="store_true", help="20,000 entries, one batch size")
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable)")
    parser.add_argument("--dir", type=Path, default=None, help="where the test files go")
    args = parser.parse_args()
    count = 20_000 if args.quick else args.count
    batches = args.batch or ([1000] if args.quick else [256, 1000, 5000])

    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    t0 = time.perf_counter()
    entries = make_entries(count)
    links = chain(entries)
    records = [e.record for e in entries if e.record is not None and e.op is EntryOp.RECORD]
    unique = {r.record_id: r for r in records}
    texts = [(r.body, r.subject) for r in unique.values()]
    payload = sum(len(link.payload) for link in links) / len(links)
    raw = sum(len(r.raw) for r in unique.values()) / len(unique)
    body = sum(len(r.body or "") for r in unique.values()) / len(unique)
    print(
        f"generated {count:,} spool entries in {time.perf_counter() - t0:.1f} s: "
        f"{len(unique):,} distinct records ({count - len(unique):,} OBSERVE/STATUS/repeats); "
        f"mean payload {payload:,.0f} B, raw stanza {raw:,.0f} B, body {body:,.0f} chars"
    )

    del entries, records, unique
    # What the generator left behind (200,000 links) is not what a proxy holds while it
    # indexes; keep the collector from walking it during the timed runs.
    gc.collect()
    gc.freeze()

    tmp = tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-indexing-")
    root = Path(tmp.name)
    print()
    print(
        f"{'batch':>6} | {'FTS5 baseline':>19} | {'SqliteStore.apply':>19} | "
        f"{'ratio store/base':>16}"
    )
    print(
        f"{'':>6} | {'rows/s':>9} {'CPU µs':>9} | {'entries/s':>9} {'CPU µs':>9} | "
        f"{'rate':>7} {'CPU':>8}"
    )
    store_files: dict[int, Path] = {}
    for batch in batches:
        base = baseline(root / f"baseline-{batch}.db", texts, batch)
        path = root / f"store-{batch}.db"
        run = asyncio.run(store_run(path, links, batch))
        store_files[batch] = path
        print(
            f"{batch:>6} | {base.rate:>9,.0f} {base.cpu_us:>9.1f} | "
            f"{run.rate:>9,.0f} {run.cpu_us:>9.1f} | "
            f"{run.rate / base.rate:>7.3f} {run.cpu_us / base.cpu_us:>7.1f}x"
        )
    total, per, page_size = sizes(store_files[batches[-1]])
    scale = 1_000_000 / count
    print()
    print(
        f"archive on disk after {count:,} entries (batch {batches[-1]}, {page_size} B pages, "
        f"WAL checkpointed and truncated): {total / 1e6:,.1f} MB = {total / count:,.0f} "
        f"B/entry; extrapolated linearly: {total * scale / 1e9:,.2f} GB per million messages"
    )
    for name, size in per[:12]:
        print(f"  {name:<28} {size / 1e6:>8.1f} MB  {size / count:>6,.0f} B/entry")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
