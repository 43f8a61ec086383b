"""Issue 3: when the spool cannot be written, nothing is delivered, and it recovers by itself.

The spool directory is a real 2 MiB tmpfs. Filling it with a filler file makes the next append
fail with ENOSPC, as a full disk would: the sender must get `<wait/>` `resource-constraint`,
the recipient nothing, and the server must never see the message (Prosody's own MAM archive is
the witness). Once the filler is gone, the next message is delivered and archived, with no
restart and no operator action.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from archive_api.store.records import Direction, ObservationVia, RecordStatus
from tests.conftest import ClientFactory
from tests.stanzaguard.conftest import (
    ArchivingFactory,
    receive,
    server_archived_bodies,
    stanza_error,
)
from tests.support.services import service_unavailable

TMPFS_SIZE = "2m"


@pytest.fixture
def tmpfs_data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory whose ``spool`` is a small tmpfs of its own (unmounted afterwards)."""
    data_dir = tmp_path / "data"
    spool = data_dir / "spool"
    spool.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(spool)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        service_unavailable(f"cannot mount a tmpfs for the spool: {mounted.stderr.strip()}")
    try:
        yield data_dir
    finally:
        done = subprocess.run(["umount", str(spool)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(spool)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem is full; return its path."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as handle:
        while True:
            try:
                handle.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    # Byte by byte into what is left of the last page, so nothing at all fits any more.
    with filler.open("ab", buffering=0) as handle:
        while True:
            try:
                handle.write(b"\0")
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return filler


async def test_full_spool_fails_closed_and_recovers(
    tmpfs_data_dir: Path, archiving_factory: ArchivingFactory, make_client: ClientFactory
) -> None:
    running = await archiving_factory(data_dir=tmpfs_data_dir)
    prosody = running.prosody
    alice = running.client("alice", resource="laptop")
    bob = running.client("bob", resource="desk")
    # Carol talks to Prosody directly: her messages reach Bob only on the proxy's server leg.
    carol = make_client("carol", resource="direct")
    await alice.connect()
    await bob.connect()
    await carol.connect()

    alice.send_chat("bob@localhost", "before the disk filled up")
    await receive(bob, "before the disk filled up")

    filler = fill(tmpfs_data_dir / "spool")
    during = "sent while the spool is full"
    during_id = alice.send_chat("bob@localhost", during)
    bounce = await alice.next_message(where=lambda m: m.type == "error")
    assert bounce.id == during_id
    error_type, condition, text = stanza_error(bounce)
    assert (error_type, condition) == ("wait", "resource-constraint")
    assert "archive is unavailable" in text
    # Neither the recipient nor the server ever saw it.
    assert [m.body for m in await bob.drain(quiet_for=1.0)] == []
    assert during not in server_archived_bodies(prosody, "alice")
    # The same again: the proxy stays closed while the disk is full, it does not give up.
    again_id = alice.send_chat("bob@localhost", during + ", again")
    bounce = await alice.next_message(where=lambda m: m.type == "error")
    assert bounce.id == again_id
    assert stanza_error(bounce)[1] == "resource-constraint"

    # Inbound: a message for Bob that cannot be archived is not delivered to him either; the
    # proxy bounces it back through the server to its sender.
    inbound = "for bob while the spool is full"
    inbound_id = carol.send_chat(bob.jid, inbound)
    bounce = await carol.next_message(where=lambda m: m.type == "error")
    assert bounce.id == inbound_id
    assert stanza_error(bounce)[:2] == ("wait", "resource-constraint")
    assert [m.body for m in await bob.drain(quiet_for=1.0)] == []

    filler.unlink()
    after = "sent once there is room again"
    alice.send_chat("bob@localhost", after)
    await receive(bob, after)
    assert [m.xml for m in await alice.drain(quiet_for=0.5) if m.type == "error"] == []

    await running.drain()
    store = running.store
    assert await store.count('"while the spool is full"') == 0
    assert await store.count('"for bob while the spool is full"') == 0
    for body in ("before the disk filled up", after):
        page = await store.search(f'"{body}"')
        assert len(page.hits) == 1, body
        record = page.hits[0].record
        assert record.status is RecordStatus.DELIVERED
        assert {(o.jid, o.via, o.direction) for o in record.observations} == {
            (alice.jid, ObservationVia.LIVE, Direction.FROM_CLIENT),
            (bob.jid, ObservationVia.LIVE, Direction.TO_CLIENT),
        }
        assert body in server_archived_bodies(prosody, "alice")
    report = await store.verify()
    assert report.ok, report.problems
