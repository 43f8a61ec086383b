"""The shared ArchiveStore conformance suite, run on the SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from archive_api.store.base import ArchiveStore
from archive_api.store.sqlite import SqliteStore
from tests.archive_api.store.conformance import ArchiveStoreConformance, StoreFactory


@pytest.fixture(params=["file", "memory"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    opened: list[SqliteStore] = []
    counter = iter(range(1_000_000))

    async def factory() -> ArchiveStore:
        where = (
            ":memory:" if request.param == "memory" else tmp_path / f"archive-{next(counter)}.db"
        )
        store = await SqliteStore.open(where)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


class TestSqliteConformance(ArchiveStoreConformance):
    pass
