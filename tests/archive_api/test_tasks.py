"""The `index_batch` and `add_checkpoints` wire formats and their application to a real
SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from archive_api.store.chain import GENESIS, ChainLink, CheckpointSigner, link_hash
from archive_api.store.errors import ChainConflict
from archive_api.store.sqlite import SqliteStore
from archive_api.tasks import (
    MAX_BATCH_LINKS,
    MAX_CHECKPOINTS,
    InvalidBatch,
    add_checkpoints,
    apply_batch,
    checkpoints_from_json,
    checkpoints_to_json,
    create_celery_app,
    links_from_json,
    links_to_json,
)
from tests.proxy.test_spool import entry_payload


def chain_of(count: int) -> list[ChainLink]:
    links, prev = [], GENESIS
    for seq in range(1, count + 1):
        payload = entry_payload(seq)
        digest = link_hash(prev, seq, payload)
        links.append(ChainLink(seq, prev, digest, payload))
        prev = digest
    return links


def test_round_trip() -> None:
    links = chain_of(5)
    assert links_from_json("spool", links_to_json(links)) == ("spool", links)


GOOD = links_to_json(chain_of(1))[0]
GOOD_PREV = str(GOOD[1])


@pytest.mark.parametrize(
    ("chain", "data"),
    [
        (None, [GOOD]),
        ("", [GOOD]),
        ("x" * 129, [GOOD]),
        ("bad\nname", [GOOD]),
        ("spool", []),
        ("spool", {"seq": 1}),
        ("spool", "[]"),
        ("spool", [GOOD] * (MAX_BATCH_LINKS + 1)),
        ("spool", [GOOD[:3]]),
        ("spool", [[True, *GOOD[1:]]]),
        ("spool", [[0, *GOOD[1:]]]),
        ("spool", [[2**63, *GOOD[1:]]]),
        ("spool", [["1", *GOOD[1:]]]),
        ("spool", [[1, "zz" * 32, GOOD[2], GOOD[3]]]),
        ("spool", [[1, GOOD_PREV[:-2], GOOD[2], GOOD[3]]]),
        ("spool", [[1, GOOD[1], 7, GOOD[3]]]),
        ("spool", [[1, GOOD[1], GOOD[2], "not base64!"]]),
        ("spool", [[1, GOOD[1], GOOD[2], "A" * (30 * 1024 * 1024)]]),
        ("spool", [[1, GOOD[1], GOOD[2], None]]),
    ],
)
def test_malformed_batches_are_refused(chain: Any, data: Any) -> None:
    with pytest.raises(InvalidBatch):
        links_from_json(chain, data)


async def test_apply_is_idempotent_and_reports_a_gap(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "archive.sqlite3")
    try:
        links = chain_of(30)
        assert await apply_batch(store, "spool", links[:10]) == 10
        assert await apply_batch(store, "spool", links[:10]) == 10  # again: a no-op
        # A batch past the head is not applied: the answer says where the store stands.
        assert await apply_batch(store, "spool", links[20:]) == 10
        assert await apply_batch(store, "spool", links[5:20]) == 20
        assert await store.count("") == 20
    finally:
        await store.close()


def test_the_app_speaks_json_only_and_acknowledges_late() -> None:
    app = create_celery_app("redis://127.0.0.1:1/0")
    assert app.conf.accept_content == ["json"]
    assert app.conf.result_accept_content == ["json"]
    assert app.conf.task_serializer == "json"
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    task = app.tasks["stanzaguard.index_batch"]
    with pytest.raises(RuntimeError, match="without a store"):
        task.run("spool", links_to_json(chain_of(1)))


# -- add_checkpoints -----------------------------------------------------------------------------

SIGNER = CheckpointSigner.generate()


def test_checkpoints_round_trip() -> None:
    links = chain_of(3)
    checkpoints = [SIGNER.sign("proxy-1", link.seq, link.hash) for link in links]
    assert checkpoints_from_json("proxy-1", checkpoints_to_json(checkpoints)) == (
        "proxy-1",
        checkpoints,
    )


GOOD_CP = checkpoints_to_json([SIGNER.sign("spool", 1, chain_of(1)[0].hash)])[0]


@pytest.mark.parametrize(
    ("chain", "data"),
    [
        (None, [GOOD_CP]),
        ("", [GOOD_CP]),
        ("x" * 129, [GOOD_CP]),
        ("tab\tname", [GOOD_CP]),
        ("spool", []),
        ("spool", "[]"),
        ("spool", {"seq": 1}),
        ("spool", [GOOD_CP] * (MAX_CHECKPOINTS + 1)),
        ("spool", [GOOD_CP[:2]]),
        ("spool", [[*GOOD_CP, "extra"]]),
        ("spool", [[True, *GOOD_CP[1:]]]),
        ("spool", [[0, *GOOD_CP[1:]]]),
        ("spool", [[-5, *GOOD_CP[1:]]]),
        ("spool", [[2**63, *GOOD_CP[1:]]]),
        ("spool", [[1.0, *GOOD_CP[1:]]]),
        ("spool", [[1, "zz" * 32, GOOD_CP[2]]]),
        ("spool", [[1, GOOD_CP[1], str(GOOD_CP[2])[:-2]]]),
        ("spool", [[1, GOOD_CP[1], str(GOOD_CP[2]) + "00"]]),
        ("spool", [[1, GOOD_CP[1], "x" * 10_000_000]]),
        ("spool", [[1, None, GOOD_CP[2]]]),
    ],
)
def test_malformed_checkpoints_are_refused(chain: Any, data: Any) -> None:
    with pytest.raises(InvalidBatch):
        checkpoints_from_json(chain, data)


async def test_checkpoints_are_stored_once_and_only_over_stored_entries(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "archive.sqlite3")
    try:
        links = chain_of(10)
        await apply_batch(store, "proxy-1", links[:6])
        at_5 = SIGNER.sign("proxy-1", 5, links[4].hash)
        assert await add_checkpoints(store, "proxy-1", [at_5]) == 1
        assert await add_checkpoints(store, "proxy-1", [at_5]) == 0  # again: a no-op
        # Past the store's head: refused, so verify never meets a checkpoint beyond the chain.
        with pytest.raises(InvalidBatch, match="past the store's head"):
            await add_checkpoints(store, "proxy-1", [SIGNER.sign("proxy-1", 8, links[7].hash)])
        # A head that is not the stored hash (a forged or mixed-up checkpoint) is a conflict.
        with pytest.raises(ChainConflict):
            await add_checkpoints(store, "proxy-1", [SIGNER.sign("proxy-1", 6, links[2].hash)])
        assert [c.seq for c in await store.checkpoints("proxy-1")] == [5]
        report = await store.verify(public_key=SIGNER.public_key)
        assert report.ok, report.problems
    finally:
        await store.close()


def test_two_apps_in_one_process_each_use_their_own_store(tmp_path: Path) -> None:
    """Tasks are not shared between apps: each app's `index_batch` writes its own store."""
    paths = [tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"]

    def opener(path: Path) -> Any:
        async def open_store() -> SqliteStore:
            return await SqliteStore.open(path)

        return open_store

    apps = [create_celery_app("redis://127.0.0.1:1/0", store_opener=opener(p)) for p in paths]
    links = chain_of(6)
    assert apps[0].tasks["stanzaguard.index_batch"].run("spool", links_to_json(links[:2])) == 2
    assert apps[1].tasks["stanzaguard.index_batch"].run("spool", links_to_json(links)) == 6

    async def last_seqs() -> list[int]:
        seqs = []
        for path in paths:
            store = await SqliteStore.open(path)
            try:
                seqs.append(await store.last_seq())
            finally:
                await store.close()
        return seqs

    assert asyncio.run(last_seqs()) == [2, 6]
