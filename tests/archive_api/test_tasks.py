"""The `index_batch` wire format and its application to a real SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from archive_api.store.chain import GENESIS, ChainLink, link_hash
from archive_api.store.sqlite import SqliteStore
from archive_api.tasks import (
    MAX_BATCH_LINKS,
    InvalidBatch,
    apply_batch,
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
