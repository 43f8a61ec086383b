"""Issue 3: crash safety and tamper evidence, through the real `stanzaguard` command.

- `kill -9` in the middle of a burst: everything the receiver got before the kill (and what
  Prosody redelivers from offline storage afterwards) is in the archive exactly once, with the
  receiver's delivery observed (but for the newest sightings, written behind), and
  `stanzaguard verify` is happy after a restart on the same
  data directory.
- `stanzaguard verify` finds an edited record, a deleted ledger row and swapped payloads, and
  names the sequence number; `stanzaguard reindex --replace` rebuilds a store from the spool
  that verifies and answers searches as the original did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from archive_api.store.records import ArchiveRecord, Direction, ObservationVia
from archive_api.store.sqlite import SqliteStore
from stanzaguard import operations
from tests.conftest import ProsodyFactory
from tests.stanzaguard.conftest import ArchivingFactory, StanzaguardRun, receive, run_cli
from tests.support.prosody import ProsodyConfig, ProsodyServer
from tests.support.rawxmpp import CLIENT_NS, RawClientError, RawXmppClient

#: The receiver's count at which the proxy is killed; the sender keeps sending past it.
KILL_AFTER = 2000
#: How far the sender may run ahead of what the receiver got, so it is still sending at the
#: kill instead of having written everything into socket buffers long before.
WINDOW = 400
#: The sender stops here if the proxy somehow survives (then the test fails: no kill).
MAX_MESSAGES = 20_000
BATCH = 50
SEQ_MASK = (1 << 40) - 1


def burst_id(n: int) -> str:
    return f"burst-{n}"


async def raw_login(
    run: StanzaguardRun, prosody: ProsodyServer, user: str, resource: str
) -> RawXmppClient:
    client = RawXmppClient(run.host, run.port, prosody.domain)
    await client.login(user, prosody.users[user], resource=resource)
    await client.presence()
    return client


async def blast(
    sender: RawXmppClient, to: str, sent: list[str], got: list[str], stop: asyncio.Event
) -> None:
    """Send numbered messages in batches until the connection dies (or ``stop``)."""
    n = 0
    try:
        while n < MAX_MESSAGES and not stop.is_set():
            if len(sent) - len(got) > WINDOW:
                await asyncio.sleep(0.002)
                continue
            for _ in range(BATCH):
                sent.append(sender.send_message(to, f"burst message {n}", id=burst_id(n)))
                n += 1
            await sender.drain()
            await asyncio.sleep(0)  # let the receiver read
    except (ConnectionError, RawClientError, OSError):
        pass  # the proxy was killed


async def collect(
    receiver: RawXmppClient, got: list[str], on_message: Callable[[int], None]
) -> None:
    """Record the id of every message received, until the stream ends."""
    try:
        while True:
            element = await receiver.next_element(timeout=30.0)
            if element.tag == f"{{{CLIENT_NS}}}message" and element.get("type") != "error":
                got.append(element.get("id", ""))
                on_message(len(got))
    except RawClientError:  # StreamEnded is one: the proxy is gone
        pass


async def collect_quietly(receiver: RawXmppClient, quiet_for: float) -> list[str]:
    """Ids of the messages that arrive until none has for ``quiet_for`` seconds."""
    ids: list[str] = []
    while True:
        try:
            element = await receiver.next_element(timeout=quiet_for)
        except RawClientError:
            return ids
        if element.tag == f"{{{CLIENT_NS}}}message" and element.get("type") != "error":
            ids.append(element.get("id", ""))


async def every_message(store: SqliteStore) -> list[ArchiveRecord]:
    records: list[ArchiveRecord] = []
    cursor = None
    while True:
        page = await store.search("type:chat", limit=1000, cursor=cursor, sort="time_asc")
        records += [hit.record for hit in page.hits]
        cursor = page.next_cursor
        if cursor is None:
            return records


async def test_kill_9_mid_burst_loses_nothing_delivered_and_duplicates_nothing(
    prosody_factory: ProsodyFactory, tmp_path: Path
) -> None:
    # Prosody's own MAM on file storage would make it, not the proxy, the bottleneck.
    prosody = prosody_factory(ProsodyConfig(extra_global="default_archive_policy = false"))
    data_dir = tmp_path / "data"
    log = tmp_path / "stanzaguard.log"
    first = StanzaguardRun.start(prosody, data_dir, log_path=log)
    runs = [first]
    clients: list[RawXmppClient] = []
    try:
        receiver = await raw_login(first, prosody, "bob", "rx")
        sender = await raw_login(first, prosody, "alice", "tx")
        clients += [receiver, sender]
        sent: list[str] = []
        got: list[str] = []
        stop = asyncio.Event()
        killed: list[int | None] = []

        def maybe_kill(count: int) -> None:
            if count >= KILL_AFTER and not killed:
                killed.append(first.kill9())
                stop.set()

        await asyncio.gather(
            blast(sender, receiver.jid or "", sent, got, stop),
            collect(receiver, got, maybe_kill),
        )
        assert killed == [-9], f"the proxy was not killed: {first.log_tail()}"
        # Mid-burst: the sender was still sending when the proxy died.
        assert KILL_AFTER <= len(got) < len(sent), (len(got), len(sent))
        assert len(set(got)) == len(got), "the receiver got a message twice"
        for client in clients:
            client.abort()

        second = StanzaguardRun.start(prosody, data_dir, log_path=log)
        runs.append(second)
        # Bob comes back. What Prosody kept for him comes from offline storage; what it was
        # still routing from the proxy's last writes (its own storage is slow) arrives live.
        receiver = await raw_login(second, prosody, "bob", "rx2")
        sender = await raw_login(second, prosody, "alice", "tx2")
        clients += [receiver, sender]
        later = await collect_quietly(receiver, 1.0)
        sender.send_message(receiver.jid or "", "after the restart", id="after-restart")
        await receiver.wait_for(lambda e: e.get("id") == "after-restart", keep_others=True)
        later += [e.get("id", "") for e in receiver.inbox if e.tag == f"{{{CLIENT_NS}}}message"]
        for client in clients:
            await client.close()
        assert second.stop() == 0, second.log_tail()
    finally:
        for client in clients:
            client.abort()
        for run in runs:
            if run.running:
                run.stop()

    store = await SqliteStore.open(data_dir / "archive.sqlite3")
    try:
        records = await every_message(store)
    finally:
        await store.close()
    per_id = Counter(r.message_id for r in records)
    duplicates = {i: n for i, n in per_id.items() if n > 1}
    assert duplicates == {}, f"archived more than once: {list(duplicates.items())[:10]}"
    per_body = Counter(r.body for r in records)
    assert max(per_body.values()) == 1
    by_id = {r.message_id: r for r in records}
    # Everything delivered before the kill is archived, with the sender's sighting.
    missing = [i for i in got if i not in by_id]
    assert missing == [], f"{len(missing)} delivered but not archived, e.g. {missing[:5]}"
    unobserved = []
    for message_id in got:
        seen = {(o.jid, o.via, o.direction) for o in by_id[message_id].observations}
        assert ("alice@localhost/tx", ObservationVia.LIVE, Direction.FROM_CLIENT) in seen
        if ("bob@localhost/rx", ObservationVia.LIVE, Direction.TO_CLIENT) not in seen:
            unobserved.append(message_id)
    # The receiver's sightings of records already durable are written behind (with the next
    # group commit, within 20 ms): the kill may lose the newest of them, never older ones.
    assert unobserved == got[len(got) - len(unobserved) :], "a sighting lost before the tail"
    assert len(unobserved) <= 500, f"{len(unobserved)} sightings lost"
    # Delivered after the restart (offline redelivery, or live): the same records, one more
    # observation each, made by a process that never saw the original.
    assert len(set(later)) == len(later)
    assert not set(later) & set(got)
    vias: Counter[ObservationVia] = Counter()
    for message_id in later:
        assert message_id in by_id, f"{message_id} delivered after the restart but not archived"
        via = {
            o.via
            for o in by_id[message_id].observations
            if (o.jid, o.direction) == ("bob@localhost/rx2", Direction.TO_CLIENT)
        }
        assert len(via) == 1, (message_id, by_id[message_id].observations)
        vias.update(via)
    assert set(vias) <= {ObservationVia.OFFLINE, ObservationVia.LIVE}
    # Nothing the sender never sent, nothing past what it sent.
    assert set(by_id) <= {*sent, "after-restart"}
    assert "after-restart" in by_id

    verified = run_cli("verify", "--data-dir", str(data_dir))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout


# -- tampering --------------------------------------------------------------------------------


def ledger_seq(conn: sqlite3.Connection, record_id: str) -> int:
    (entry,) = conn.execute(
        "SELECT entry FROM records WHERE record_id = ?", (record_id,)
    ).fetchone()
    return int(entry) & SEQ_MASK


def message_seqs(conn: sqlite3.Connection) -> list[tuple[str, int, str]]:
    """(record_id, seq of its RECORD entry, body) of every chat message, oldest first."""
    rows = conn.execute(
        "SELECT record_id, entry, body FROM records WHERE rtype = 'chat' ORDER BY id"
    ).fetchall()
    return [(rid, int(entry) & SEQ_MASK, body) for rid, entry, body in rows]


def edit_record_body(conn: sqlite3.Connection) -> int:
    record_id, seq, _ = message_seqs(conn)[2]
    conn.execute(
        "UPDATE records SET body = 'nothing to see here' WHERE record_id = ?", (record_id,)
    )
    return seq


def edit_payload_body(conn: sqlite3.Connection) -> int:
    _, seq, body = message_seqs(conn)[3]
    entry = conn.execute("SELECT id, payload FROM ledger WHERE id & ? = ?", (SEQ_MASK, seq))
    ledger_id, payload = entry.fetchone()
    document = json.loads(payload)
    assert document["record"]["body"] == body
    document["record"]["body"] = "nothing to see here"
    edited = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    conn.execute("UPDATE ledger SET payload = ? WHERE id = ?", (edited, ledger_id))
    return seq


def delete_ledger_row(conn: sqlite3.Connection) -> int:
    _, seq, _ = message_seqs(conn)[1]
    conn.execute("DELETE FROM ledger WHERE id & ? = ?", (SEQ_MASK, seq))
    return seq


def swap_payloads(conn: sqlite3.Connection) -> int:
    (_, low, _), (_, high, _) = message_seqs(conn)[1], message_seqs(conn)[4]
    rows = dict(
        conn.execute(
            "SELECT id & ?, payload FROM ledger WHERE id & ? IN (?, ?)",
            (SEQ_MASK, SEQ_MASK, low, high),
        ).fetchall()
    )
    for seq, other in ((low, high), (high, low)):
        conn.execute("UPDATE ledger SET payload = ? WHERE id & ? = ?", (rows[other], SEQ_MASK, seq))
    return min(low, high)


TAMPERINGS: dict[str, Callable[[sqlite3.Connection], int]] = {
    "edit-record-body": edit_record_body,
    "edit-payload-body": edit_payload_body,
    "delete-ledger-row": delete_ledger_row,
    "swap-payloads": swap_payloads,
}


@pytest.fixture
async def archive_dir(archiving_factory: ArchivingFactory, tmp_path: Path) -> Path:
    """A stopped service's data directory holding a short conversation."""
    running = await archiving_factory(data_dir=tmp_path / "pristine")
    alice = running.client("alice", resource="laptop")
    bob = running.client("bob", resource="desk")
    await alice.connect()
    await bob.connect()
    for n in range(8):
        sender, recipient = (alice, bob) if n % 2 == 0 else (bob, alice)
        body = f"quarterly figures, part {n}"
        sender.send_chat(recipient.bare_jid, body)
        await receive(recipient, body)
    await running.stop()
    # The untouched archive verifies (in-process here; the tests below go through the CLI).
    outcome = await operations.verify(operations.Paths(running.data_dir))
    assert outcome.ok, (outcome.store.problems, outcome.spool_problems)
    assert outcome.spool_entries_checked == outcome.store.entries_checked > 8
    return running.data_dir


async def search(data_dir: Path, query: str) -> list[ArchiveRecord]:
    page = await operations.search(operations.Paths(data_dir), query, limit=1000)
    assert page.next_cursor is None
    return [hit.record for hit in page.hits]


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
async def test_verify_names_the_seq_of_a_tampered_entry(
    archive_dir: Path, tmp_path: Path, tampering: str
) -> None:
    copy = tmp_path / f"copy-{tampering}"
    shutil.copytree(archive_dir, copy)
    with contextlib.closing(sqlite3.connect(copy / "archive.sqlite3")) as conn, conn:
        seq = TAMPERINGS[tampering](conn)
    result = run_cli("verify", "--data-dir", str(copy))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    first_break = next(line for line in output.splitlines() if "first break" in line)
    assert re.search(rf"\bseq {seq}\b", first_break), output


async def test_reindex_replace_rebuilds_a_store_that_verifies_and_searches_the_same(
    archive_dir: Path,
) -> None:
    queries = ("quarterly", "type:session", "from:bob@localhost", '"part 3"')
    expected = {query: await search(archive_dir, query) for query in queries}
    assert len(expected["quarterly"]) == 8
    assert len(expected["type:session"]) == 4  # two logins, two logouts
    # Break the store first (search shows the edited text): the rebuild comes from the spool.
    with contextlib.closing(sqlite3.connect(archive_dir / "archive.sqlite3")) as conn, conn:
        edit_payload_body(conn)
    assert await search(archive_dir, "quarterly") != expected["quarterly"]

    rebuilt = run_cli("reindex", "--data-dir", str(archive_dir), "--replace")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert (archive_dir / "archive.sqlite3.old").exists()
    verified = run_cli("verify", "--data-dir", str(archive_dir))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for query in queries:
        assert await search(archive_dir, query) == expected[query], query
    # And the command-line search answers from the rebuilt store.
    found = run_cli("search", "--data-dir", str(archive_dir), "--json", '"part 3"')
    assert found.returncode == 0, found.stdout + found.stderr
    (line,) = found.stdout.splitlines()
    assert json.loads(line)["body"] == "quarterly figures, part 3"
