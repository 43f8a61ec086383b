"""Record proofs: what is checked, a purged neighbour, no checkpoint yet, a forged checkpoint."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from archive_api.proofs import record_proof
from archive_api.store.base import ChainPosition, RetentionAssignment
from archive_api.store.chain import Checkpoint, CheckpointSigner
from archive_api.store.sqlite import SqliteStore
from tests.archive_api.store.conformance import T0, ChainWriter, record


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "archive.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


async def seeded(store: SqliteStore, signer: CheckpointSigner | None) -> ChainWriter:
    writer = ChainWriter()
    await store.apply(
        writer.records(*(record(f"r{n}", at=T0 + timedelta(minutes=n)) for n in range(5)))
    )
    if signer is not None:
        await store.add_checkpoint(signer.sign("spool", 4, writer.links[3].hash))
    return writer


async def test_a_proof_up_to_the_covering_checkpoint(store: SqliteStore) -> None:
    signer = CheckpointSigner.generate()
    await seeded(store, signer)
    proof = await record_proof(store, "r1", ChainPosition("spool", 2), signer.public_key)
    assert proof.verified and proof.covered
    assert proof.checkpoint is not None and proof.checkpoint.seq == 4
    assert (proof.previous and proof.previous.seq, proof.next and proof.next.seq) == (1, 3)
    assert proof.links_hashed == 4  # seqs 1..4
    # Another key: the signature check fails, nothing else.
    other = await record_proof(
        store, "r1", ChainPosition("spool", 2), CheckpointSigner.generate().public_key
    )
    assert [c.name for c in other.checks if not c.ok] == ["checkpoint-signature"]
    # The wrong record for the position.
    wrong = await record_proof(store, "r3", ChainPosition("spool", 2), signer.public_key)
    assert [c.name for c in wrong.checks if not c.ok] == ["payload"]


async def test_past_the_last_checkpoint_the_proof_hashes_forward_from_it(
    store: SqliteStore,
) -> None:
    signer = CheckpointSigner.generate()
    await seeded(store, signer)
    proof = await record_proof(store, "r4", ChainPosition("spool", 5), signer.public_key)
    assert proof.verified and not proof.covered
    assert proof.checkpoint is not None and proof.checkpoint.seq == 4 and proof.next is None


async def test_without_any_checkpoint_only_the_links_are_checked(store: SqliteStore) -> None:
    await seeded(store, None)
    proof = await record_proof(store, "r0", ChainPosition("spool", 1), None)
    assert proof.verified and not proof.covered and proof.checkpoint is None
    assert {c.name for c in proof.checks} == {"payload", "link-hash", "previous", "next", "path"}


async def test_a_checkpoint_that_signs_another_head_fails(
    store: SqliteStore, tmp_path: Path
) -> None:
    signer = CheckpointSigner.generate()
    await seeded(store, None)
    forged = signer.sign("spool", 3, b"\x01" * 32)
    other = await SqliteStore.open(tmp_path / "other.sqlite3")
    try:
        await seeded(other, None)
        # The store refuses a checkpoint that disagrees with it; write it around the store.
        with sqlite3.connect(other.path) as conn:
            conn.execute(
                "INSERT INTO checkpoints (chain, seq, head, signature) VALUES (?, ?, ?, ?)",
                (forged.chain_name, forged.seq, forged.head, forged.signature),
            )
        proof = await record_proof(other, "r1", ChainPosition("spool", 2), signer.public_key)
        assert [c.name for c in proof.checks if not c.ok] == ["checkpoint-head"]
        assert isinstance(proof.checkpoint, Checkpoint)
    finally:
        await other.close()


async def test_a_purged_neighbour_keeps_the_proof_whole(store: SqliteStore) -> None:
    signer = CheckpointSigner.generate()
    await seeded(store, signer)
    await store.set_retention(
        [RetentionAssignment("r2", "short", T0 + timedelta(days=1))], assigned_at=T0
    )
    batch = await store.purge(T0 + timedelta(days=2))
    assert [p.record_id for p in batch.purged] == ["r2"]
    proof = await record_proof(store, "r1", ChainPosition("spool", 2), signer.public_key)
    assert proof.verified and proof.covered
