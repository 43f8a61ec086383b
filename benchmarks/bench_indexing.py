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

With ``--pipeline``, instead: the same entries are spooled once (not timed) and indexed from
that spool twice, in one run: by the embedded indexer (`proxy.indexer.Indexer`, in this
process, into a SQLite file) and by the distributed pipeline (`CeleryIndexer` shipping
2,000-entry `index_batch` tasks over a real redis-server to one `stanzaguard worker`
process writing a SQLite file, then the Elasticsearch store on osmem-server). Prints
entries/s of each and the ratios, and the CPU per entry of the shipper, the worker and
osmem-server.

    .venv/bin/python benchmarks/bench_indexing.py [--count 200000] [--quick]
        [--batch 256 --batch 1000 ...] [--dir /tmp]
    .venv/bin/python benchmarks/bench_indexing.py --pipeline [--count 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sqlite3
import subprocess
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


# --- embedded indexer vs the Celery pipeline (--pipeline) ---------------------------------------


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(v) for v in fields[11:15]) / ticks


def _child_named(word: str) -> int | None:
    """A direct child of this process whose command line mentions `word` (osmem-server)."""
    me = os.getpid()
    for child in Path(f"/proc/{me}/task/{me}/children").read_text().split():
        if word in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
            return int(child)
    return None


def _tree_cpu(pid: int) -> float:
    total = _proc_cpu(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            total += _tree_cpu(int(child))
    return total


def start_worker(root: Path, redis_url: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """One `stanzaguard worker` process (concurrency 1: one batch per chain is in flight)."""
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


async def pipeline(count: int, root: Path) -> None:
    """Spool once; index it embedded (SQLite) and through Celery (into SQLite, and into
    osmem-server); compare."""
    from classifier.clock import ManualClock
    from proxy.indexer import Indexer
    from proxy.spool import Spool
    from tests.support.es_subprocess import osmem_python_path
    from tests.support.opensearch import running_osmem
    from tests.support.redis import running_redis

    entries = make_entries(count)
    payloads = [e.payload() for e in entries]
    del entries
    gc.collect()
    spool_dir = root / "spool"
    spool = await Spool.open(spool_dir, clock=ManualClock(), fsync=False)
    for i in range(0, len(payloads), 5000):
        await spool.append(payloads[i : i + 5000])
    await spool.close()
    mean = sum(map(len, payloads)) / len(payloads)
    print(f"spooled {count:,} entries once (mean payload {mean:,.0f} B)")

    # The embedded indexer: the proxy's process applies spool batches to SQLite.
    spool_copy = root / "spool-embedded"
    shutil.copytree(spool_dir, spool_copy)
    spool = await Spool.open(spool_copy, clock=ManualClock(), fsync=False)
    store = await SqliteStore.open(root / "embedded.sqlite3")
    indexer = Indexer(spool, store, batch_size=2000)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await indexer.drain()
    embedded = Run(time.perf_counter() - wall0, time.process_time() - cpu0, count)
    assert await store.last_seq() == count
    await store.close()
    await spool.close()
    print(
        f"embedded Indexer -> SQLite:          {embedded.rate:>9,.0f} entries/s, "
        f"{embedded.cpu_us:>6.1f} µs CPU/entry (one process)"
    )

    # The pipeline: shipper here, redis-server, one worker process; into SQLite (the
    # pipeline's own cost) and into osmem-server (the Elasticsearch store's path).
    with running_redis(root / "redis") as redis_server, running_osmem() as search:
        base = {k: v for k, v in os.environ.items() if not k.startswith("STANZAGUARD_")}
        base["STANZAGUARD_LOG_LEVEL"] = "warning"
        targets = {
            "SQLite": dict(base),
            "osmem": dict(
                base,
                STANZAGUARD_STORE="elasticsearch",
                STANZAGUARD_ES_URL=search.url,
                STANZAGUARD_ES_INDEX_PREFIX="bench",
                PYTHONPATH=osmem_python_path(base),
            ),
        }
        runs: dict[str, Run] = {}
        for label, env in targets.items():
            runs[label] = await celery_run(
                root / label, spool_dir, redis_server.url, env, payloads[:10], count, label
            )
    for label, run in runs.items():
        print(f"ratio pipeline into {label}/embedded: {run.rate / embedded.rate:.3f} (throughput)")


async def celery_run(
    root: Path,
    spool_dir: Path,
    redis_url: str,
    env: dict[str, str],
    warm_payloads: list[bytes],
    count: int,
    label: str,
) -> Run:
    """Ship a copy of the spool through one fresh worker writing the store `env` names."""
    from archive_api.tasks import create_celery_app
    from classifier.clock import ManualClock
    from proxy.spool import Spool
    from stanzaguard.celery_indexer import CeleryIndexer

    root.mkdir()
    copy = root / "spool"
    shutil.copytree(spool_dir, copy)
    worker = start_worker(root, redis_url, env)
    try:
        app = create_celery_app(redis_url)
        # Warm-up: the worker starts, opens the store and creates its tables or indices.
        warm = await Spool.open(root / "warm", clock=ManualClock(), chain_name="warm")
        await warm.append(warm_payloads)
        await CeleryIndexer(warm, app, task_timeout=120.0).drain()
        await warm.close()
        spool = await Spool.open(copy, clock=ManualClock(), fsync=False)
        shipper = CeleryIndexer(spool, app, batch_size=2000, task_timeout=120.0)
        osmem_pid = _child_named("osmem")
        osmem_cpu0 = _proc_cpu(osmem_pid) if osmem_pid else 0.0
        worker_cpu0 = _tree_cpu(worker.pid)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await shipper.drain()
        run = Run(time.perf_counter() - wall0, time.process_time() - cpu0, count)
        worker_cpu = _tree_cpu(worker.pid) - worker_cpu0
        store_cpu = (_proc_cpu(osmem_pid) if osmem_pid else 0.0) - osmem_cpu0
        await shipper.stop()
        await spool.close()
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    store_part = f", {store_cpu / count * 1e6:>6.1f} µs in osmem-server" if label == "osmem" else ""
    print(
        f"CeleryIndexer -> worker -> {label + ':':<8} {run.rate:>9,.0f} entries/s, "
        f"{run.cpu_us:>6.1f} µs CPU/entry in the shipper, "
        f"{worker_cpu / count * 1e6:>6.1f} µs in the worker{store_part}",
        flush=True,
    )
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000, help="spool entries per run")
    parser.add_argument("--quick", action="store_true", help="20,000 entries, one batch size")
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable)")
    parser.add_argument("--dir", type=Path, default=None, help="where the test files go")
    parser.add_argument(
        "--pipeline", action="store_true", help="embedded indexer vs the Celery pipeline"
    )
    args = parser.parse_args()
    if args.pipeline:
        print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-pipeline-") as where:
            asyncio.run(pipeline(args.count if args.count != 200_000 else 20_000, Path(where)))
        return 0
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
