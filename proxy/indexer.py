"""The indexer: moves durable spool entries into the archive store, at least once.

The store applies entries idempotently (by sequence number), so the cursor in the spool moves
only after the store acknowledged a batch: a crash between the two re-applies a batch, which
changes nothing. Fully indexed segments are sealed and then removed or kept as evidence.

One batch at a time: the loop and `drain()` (which the quarantine and learning services call
on a running service) take turns through one lock around "read from the spool, apply,
advance the cursor", so a drain waits for the loop's batch in flight and then applies only
what remains. Two overlapping applies of the same links would be refused by a store that
checks its chain head on write (Elasticsearch: `ChainConflict`), and on SQLite be done twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from archive_api.store.base import ArchiveStore
from proxy.spool import Spool, read_checkpoints

log = logging.getLogger(__name__)


class IndexControl(Protocol):
    """What the proxy's side needs of an indexer, in this process or in a worker process."""

    indexed: int
    failures: int

    def notify(self) -> None:
        """New entries are in the spool (must not wait)."""
        ...

    async def drain(self) -> None:
        """Return once the store has every entry spooled before the call."""
        ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class Indexer:
    def __init__(
        self,
        spool: Spool,
        store: ArchiveStore,
        *,
        batch_size: int = 5000,
        idle_wait: float = 0.5,
        seal: bool = True,
    ) -> None:
        self.spool = spool
        self.store = store
        self.batch_size = batch_size
        self.idle_wait = idle_wait
        self.seal = seal
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Held from reading a batch to advancing the cursor past it (see the module doc).
        self._batch_lock = asyncio.Lock()
        self.indexed = 0
        self.failures = 0

    def notify(self) -> None:
        """New entries are in the spool."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        backoff = self.idle_wait
        while True:
            try:
                moved = await self.index_once()
                backoff = self.idle_wait
            except asyncio.CancelledError:
                raise
            except Exception:
                # The store is unreachable or refused: the spool keeps everything; retry.
                self.failures += 1
                log.exception("indexing failed; retrying")
                moved = 0
                backoff = min(backoff * 2, 30.0)
            if moved == 0:
                self._wake.clear()
                # Not asyncio.wait_for: on Python 3.11 it swallows a cancel that races with
                # the wake-up (a stanza spooled during shutdown), and stop() then waits forever.
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait((waiter,), timeout=backoff)
                finally:
                    waiter.cancel()

    async def index_once(self) -> int:
        """Index one batch; return how many entries moved.

        Waits for a batch another caller (the loop, a drain) has in flight, then starts
        from where the store is, so no entry is applied twice at once.
        """
        async with self._batch_lock:
            return await self._index_batch()

    async def _index_batch(self) -> int:
        # The store's own last seq, not the cursor: a power loss can roll back the store's
        # newest commits (synchronous=NORMAL), and those entries must be applied again.
        start = await self.store.last_seq(chain=self.spool.chain_name) + 1
        links = await self.spool.read_from(start, self.batch_size)
        if not links:
            if self.seal:
                await self._seal()
            return 0
        await self.store.apply(links, chain=self.spool.chain_name)
        await self.spool.commit_cursor(links[-1].seq)
        self.indexed += len(links)
        if len(links) < self.batch_size and self.seal:
            await self._seal()
        return len(links)

    async def drain(self) -> None:
        """Index until the store has everything the spool holds (for tests and shutdown).

        Safe while the loop runs: batch by batch, it takes turns with the loop.
        """
        await self.spool.flush()
        while await self.index_once():
            pass

    async def _seal(self) -> None:
        sealed = await self.spool.seal_indexed()
        if sealed:
            log.info("sealed spool segments", extra={"count": len(sealed)})
        await self.copy_checkpoints()

    async def copy_checkpoints(self) -> None:
        known = {(c.chain_name, c.seq) for c in await self.store.checkpoints()}
        for checkpoint in read_checkpoints(self.spool.directory):
            if (checkpoint.chain_name, checkpoint.seq) not in known:
                await self.store.add_checkpoint(checkpoint)
