"""Indexing cost: `SqliteStore.apply` against the raw SQLite FTS5 insert rate, in one run.

Generates realistic spool entries first (not timed): chat, groupchat and headline messages
as the pipeline archives them (`ArchiveRecord` with bodies of realistic lengths, 1-3
observations, verdicts with reasons, the raw stanza of ~300-600 bytes), a few subscription
requests, spam reports and session records, and the OBSERVE / STATUS / repeated RECORD
entries that carbons, MAM replays and officer releases add, among thousands of users, dozens
of rooms and domains, over weeks, a few of them arriving late. Fixed seed, so every run
indexes the same bytes. They are hash-chained into `ChainLink`s exactly as the spool does.

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
import itertools
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archive_api.store.chain import GENESIS, ChainLink, link_hash
from archive_api.store.records import (
    ArchiveRecord,
    Attachment,
    Direction,
    EntryOp,
    Observation,
    ObservationVia,
    RecordKind,
    RecordStatus,
    SpoolEntry,
    StanzaIdRef,
    deterministic_record_id,
)
from archive_api.store.sqlite import SqliteStore
from classifier.verdict import Action, Reason, Verdict

SEED = 20260115
START = datetime(2026, 1, 5, 7, 0, tzinfo=UTC)

# --- corpus ------------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_SYLLABLES = _words(
    "ka ro mi te su na lo pe ri ta ve do an el or is un et ar om "
    "qu st pr tr ch sh th br gr pl fl cl"
)
_COMMON = _words(
    "the a to and of is in it you that for on we this be are have with not can will at "
    "just so but do if me my your what ok yes no thanks please meeting call today tomorrow "
    "deal price client report trade market order risk team update send check let know "
    "lunch coffee friday monday morning later soon now sure great good fine again quick"
)
_TLDS = ("com", "net", "org", "io", "de", "co.uk")
_ACCENTED = ["café", "résumé", "naïve", "Zürich", "São", "crème", "déjà", "façade"]


@dataclass(frozen=True, slots=True)
class World:
    local_domains: tuple[str, ...]
    remote_domains: tuple[str, ...]
    local_users: tuple[str, ...]
    remote_users: tuple[str, ...]
    rooms: tuple[str, ...]
    vocabulary: tuple[str, ...]
    cum_weights: tuple[float, ...]


def make_world(rng: random.Random) -> World:
    local_domains = ("corp.example", "eu.corp.example", "ops.corp.example")
    remote_domains = tuple(
        f"{rng.choice(_SYLLABLES)}{rng.choice(_SYLLABLES)}{i}.{rng.choice(_TLDS)}"
        for i in range(80)
    )
    names = [f"{rng.choice(_SYLLABLES)}{rng.choice(_SYLLABLES)}{i}" for i in range(6000)]
    local_users = tuple(f"{names[i]}@{rng.choice(local_domains)}" for i in range(3000))
    remote_users = tuple(f"{names[3000 + i]}@{rng.choice(remote_domains)}" for i in range(3000))
    rooms = tuple(f"desk{i}@conference.{rng.choice(local_domains)}" for i in range(60))
    invented = {
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(20000)
    }
    vocabulary = tuple(_COMMON) + tuple(_ACCENTED) + tuple(sorted(invented))
    # Zipf-like: word n is 1/n as frequent as the first.
    cum_weights = tuple(itertools.accumulate(1.0 / (n + 1) for n in range(len(vocabulary))))
    return World(
        local_domains, remote_domains, local_users, remote_users, rooms, vocabulary, cum_weights
    )


def body_text(rng: random.Random, world: World) -> str:
    """A chat line: mostly short, sometimes a paragraph, rarely a pasted page."""
    roll = rng.random()
    if roll < 0.6:
        words = rng.randint(1, 10)
    elif roll < 0.92:
        words = rng.randint(10, 30)
    elif roll < 0.995:
        words = rng.randint(30, 120)
    else:
        words = rng.randint(120, 400)
    text = " ".join(rng.choices(world.vocabulary, cum_weights=world.cum_weights, k=words))
    if rng.random() < 0.2:
        text = text[0].upper() + text[1:] + rng.choice(["?", "!", ".", " :)"])
    if rng.random() < 0.05:
        text += f" https://files.{rng.choice(world.local_domains)}/s/{rng.getrandbits(48):x}"
    return text


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")


def stanza_xml(
    sender_full: str,
    recipient: str,
    stanza_type: str,
    msg_id: str,
    body: str | None,
    extra: str = "",
) -> bytes:
    parts = [
        f"<message xmlns='jabber:client' from='{_esc(sender_full)}' to='{_esc(recipient)}' "
        f"type='{stanza_type}' id='{msg_id}' xml:lang='en'>"
    ]
    if body is not None:
        parts.append(f"<body>{_esc(body)}</body>")
    parts.append(
        f"<origin-id xmlns='urn:xmpp:sid:0' id='{msg_id}'/>"
        "<request xmlns='urn:xmpp:receipts'/><markable xmlns='urn:xmpp:chat-markers:0'/>"
        "<active xmlns='http://jabber.org/protocol/chatstates'/>"
    )
    parts.append(extra)
    parts.append("</message>")
    return "".join(parts).encode()


def _verdict(rng: random.Random) -> Verdict:
    roll = rng.random()
    if roll < 0.90:
        reasons: tuple[Reason, ...] = ()
        if rng.random() < 0.5:
            reasons = (Reason("roster.trusted", "sender in recipient's roster", -0.2),)
        return Verdict(Action.ALLOW, round(rng.random() * 0.2, 4), reasons, "pol-3f9a1c2e")
    action = rng.choice([Action.FLAG, Action.FLAG, Action.QUARANTINE, Action.REJECT, Action.DROP])
    return Verdict(
        action,
        round(0.5 + rng.random() * 0.5, 4),
        (
            Reason("model.text", "spam score 0.87 from the text model", 0.6, Action.FLAG),
            Reason("rate.sender", "47 distinct recipients in 10 minutes", 0.3, action),
        ),
        "pol-3f9a1c2e",
    )


def _resource(rng: random.Random) -> str:
    return rng.choice(["phone", "laptop", "desktop", "gajim.X1", "conversations.Q2", "web"])


def make_entries(count: int, seed: int = SEED) -> list[SpoolEntry]:
    """`count` spool entries: ~95% new RECORDs, the rest OBSERVE, STATUS, replayed RECORDs."""
    rng = random.Random(seed)
    world = make_world(rng)
    entries: list[SpoolEntry] = []
    recent: list[ArchiveRecord] = []
    now = START
    for n in range(count):
        # ~4 messages a second in office hours, nothing at night: spans days to weeks.
        now += timedelta(microseconds=int(rng.expovariate(1 / 250_000)))
        if now.hour >= 19:
            now = (now + timedelta(days=1)).replace(hour=7, minute=0)
        roll = rng.random()
        if recent and roll < 0.03:
            # A carbon or another device: a new observation of a recent record.
            rec = rng.choice(recent)
            obs = Observation(
                now,
                f"{rec.recipient}/{_resource(rng)}",
                ObservationVia.CARBON_RECEIVED,
                Direction.TO_CLIENT,
            )
            entries.append(SpoolEntry(EntryOp.OBSERVE, rec.record_id, observation=obs))
            continue
        if recent and roll < 0.035:
            rec = rng.choice(recent)
            entries.append(
                SpoolEntry(
                    EntryOp.STATUS,
                    rec.record_id,
                    status=RecordStatus.RELEASED,
                    actor="officer@corp.example",
                    at=now,
                )
            )
            continue
        if recent and roll < 0.045:
            # A MAM replay or offline redelivery of a record seen before: same id.
            rec = rng.choice(recent)
            obs = Observation(now, rec.recipient_full, ObservationVia.MAM, Direction.TO_CLIENT)
            entries.append(
                SpoolEntry(EntryOp.RECORD, rec.record_id, record=rec.with_observation(obs))
            )
            continue
        rec = make_record(rng, world, n, now)
        recent.append(rec)
        if len(recent) > 500:
            recent.pop(0)
        entries.append(SpoolEntry(EntryOp.RECORD, rec.record_id, record=rec))
    return entries


def make_record(rng: random.Random, world: World, n: int, now: datetime) -> ArchiveRecord:
    # 2% arrive late (delayed delivery, another proxy's backlog): up to an hour back.
    occurred = now - timedelta(seconds=rng.uniform(0, 3600)) if rng.random() < 0.02 else now
    roll = rng.random()
    msg_id = f"{rng.getrandbits(64):016x}-{n}"
    sender_res = _resource(rng)
    if roll < 0.005:  # session start/end
        user = rng.choice(world.local_users)
        return ArchiveRecord(
            record_id=deterministic_record_id("session", msg_id),
            kind=RecordKind.SESSION,
            occurred_at=occurred,
            direction=Direction.FROM_CLIENT,
            sender=user,
            sender_full=f"{user}/{sender_res}",
            stanza_type="start",
            client_address=f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        )
    if roll < 0.01:  # subscription request from a stranger
        sender, recipient = rng.choice(world.remote_users), rng.choice(world.local_users)
        raw = (
            f"<presence xmlns='jabber:client' from='{sender}' to='{recipient}' "
            f"type='subscribe' id='{msg_id}'><status>Hi, add me please</status>"
            f"<nick xmlns='http://jabber.org/protocol/nick'>New friend</nick></presence>"
        ).encode()
        return ArchiveRecord(
            record_id=deterministic_record_id("sub", msg_id),
            kind=RecordKind.SUBSCRIPTION,
            occurred_at=occurred,
            direction=Direction.TO_CLIENT,
            sender=sender,
            sender_full=sender,
            recipient=recipient,
            recipient_full=recipient,
            stanza_type="subscribe",
            body="Hi, add me please",
            subject="New friend",
            message_id=msg_id,
            verdict=_verdict(rng),
            raw=raw,
            observations=(
                Observation(occurred, recipient, ObservationVia.LIVE, Direction.TO_CLIENT),
            ),
        )
    if roll < 0.012:  # spam report
        reporter, reported = rng.choice(world.local_users), rng.choice(world.remote_users)
        return ArchiveRecord(
            record_id=deterministic_record_id("report", msg_id),
            kind=RecordKind.REPORT,
            occurred_at=occurred,
            direction=Direction.FROM_CLIENT,
            sender=reporter,
            sender_full=f"{reporter}/{sender_res}",
            recipient=reported,
            recipient_full=reported,
            stanza_type="report",
            message_id=msg_id,
            reported_jid=reported,
            report_reason="urn:xmpp:reporting:spam",
            report_text="unsolicited offers",
            raw=(
                f"<iq type='set' id='{msg_id}'><block xmlns='urn:xmpp:blocking'>"
                f"<item jid='{reported}'><report xmlns='urn:xmpp:reporting:1' "
                "reason='urn:xmpp:reporting:spam'/></item></block></iq>"
            ).encode(),
            observations=(
                Observation(
                    occurred, f"{reporter}/{sender_res}", ObservationVia.LIVE, Direction.FROM_CLIENT
                ),
            ),
        )
    body = body_text(rng, world)
    room = None
    subject = None
    if roll < 0.30:  # groupchat
        room = rng.choice(world.rooms)
        sender = rng.choice(world.local_users)
        direction = Direction.FROM_CLIENT if rng.random() < 0.3 else Direction.TO_CLIENT
        stanza_type = "groupchat"
        recipient = room
        sender_full = f"{room}/{sender.split('@')[0]}"
        recipient_full = room
        if rng.random() < 0.01:
            subject = "Desk topic: " + " ".join(rng.choices(world.vocabulary, k=4))
    else:
        stanza_type = "chat" if roll < 0.97 else ("normal" if roll < 0.99 else "headline")
        local = rng.choice(world.local_users)
        other = (
            rng.choice(world.remote_users) if rng.random() < 0.4 else rng.choice(world.local_users)
        )
        direction = Direction.FROM_CLIENT if rng.random() < 0.5 else Direction.TO_CLIENT
        sender, recipient = (local, other) if direction is Direction.FROM_CLIENT else (other, local)
        sender_full = f"{sender}/{sender_res}"
        recipient_full = f"{recipient}/{_resource(rng)}" if rng.random() < 0.5 else recipient
    attachments: tuple[Attachment, ...] = ()
    extra = ""
    if rng.random() < 0.03:
        url = f"https://upload.{rng.choice(world.local_domains)}/{rng.getrandbits(64):x}/scan.pdf"
        attachments = (Attachment(url, "oob", "application/pdf", "scan.pdf", 48213),)
        extra = f"<x xmlns='jabber:x:oob'><url>{url}</url></x>"
    replaces = retracts = None
    if rng.random() < 0.01:
        replaces = f"{rng.getrandbits(64):016x}-{max(n - rng.randint(1, 50), 0)}"
        extra += f"<replace xmlns='urn:xmpp:message-correct:0' id='{replaces}'/>"
    elif rng.random() < 0.003:
        retracts = f"{rng.getrandbits(64):016x}-{max(n - rng.randint(1, 50), 0)}"
        extra += f"<retract xmlns='urn:xmpp:message-retract:1' id='{retracts}'/>"
    encryption = "omemo" if rng.random() < 0.02 else None
    raw = stanza_xml(sender_full, recipient_full, stanza_type, msg_id, body, extra)
    observations = [
        Observation(
            occurred,
            sender_full if direction is Direction.FROM_CLIENT else recipient_full,
            ObservationVia.LIVE,
            direction,
        )
    ]
    if rng.random() < 0.3:
        observations.append(
            Observation(
                occurred,
                f"{sender}/{_resource(rng)}",
                ObservationVia.CARBON_SENT,
                Direction.TO_CLIENT,
            )
        )
    stanza_ids = (StanzaIdRef(f"{rng.getrandbits(60):x}", recipient.split("/")[0]),)
    return ArchiveRecord(
        record_id=deterministic_record_id("msg", sender_full, recipient, msg_id),
        kind=RecordKind.MESSAGE,
        occurred_at=occurred,
        direction=direction,
        sender=sender,
        sender_full=sender_full,
        recipient=recipient,
        recipient_full=recipient_full,
        stanza_type=stanza_type,
        room=room,
        body=body,
        subject=subject,
        thread=None,
        message_id=msg_id,
        origin_id=msg_id,
        stanza_ids=stanza_ids,
        attachments=attachments,
        encryption=encryption,
        replaces_id=replaces,
        retracts_id=retracts,
        client_address=f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        verdict=_verdict(rng),
        raw=raw,
        observations=tuple(observations),
    )


def chain(entries: Sequence[SpoolEntry]) -> list[ChainLink]:
    links = []
    head = GENESIS
    for seq, entry in enumerate(entries, 1):
        payload = entry.payload()
        digest = link_hash(head, seq, payload)
        links.append(ChainLink(seq, head, digest, payload))
        head = digest
    return links


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
