"""The proxy's shipper in distributed mode: spool batches go to Celery workers over Redis.

Same face as `proxy.indexer.Indexer` and `stanzaguard.index_worker.IndexWorker`
(`IndexControl`): `notify()` after spooling, `drain()`, `start()`, `stop()`.

One batch is in flight at a time, per spool: the store applies a chain in sequence order, so
batch n+1 sent before batch n is stored would only come back as a gap. The shipper reads a
durable batch from the spool, sends it as an `index_batch` task, waits for the worker's answer
(the store's last seq of the chain) and only then moves the spool cursor and seals. Anything
that goes wrong on the way (Redis down or restarted, no worker, a worker killed mid-batch,
the store refusing) leaves the cursor where it was; the batch is sent again after a backoff,
and a copy that was delivered late anyway is a no-op in the store. Meanwhile the proxy keeps
spooling, and fails closed only when the spool is full (`spool_max_bytes`).

The spool's signed checkpoints (every `checkpoint_every` entries and at each seal) follow as
`add_checkpoints` tasks once the store holds their seq, as the embedded indexers copy them:
the store then carries each proxy's signed heads and `stanzaguard verify` checks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery

from archive_api.store.chain import ChainLink, Checkpoint
from archive_api.tasks import (
    ADD_CHECKPOINTS,
    INDEX_BATCH,
    MAX_CHECKPOINTS,
    checkpoints_to_json,
    links_to_json,
)
from proxy.spool import Spool, read_checkpoints
from stanzaguard.errors import StanzaGuardError

log = logging.getLogger(__name__)

#: How often a publish is retried inside one attempt before the shipper's own backoff.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 1}


class ShippingFailed(StanzaGuardError):
    """A batch could not be sent or was not reported stored (it is sent again later)."""


class CeleryIndexer:
    """Ships spool batches to Celery workers; moves the cursor only on their answer."""

    def __init__(
        self,
        spool: Spool,
        app: Celery,
        *,
        batch_size: int = 2000,
        batch_bytes: int = 8 * 1024 * 1024,
        task_timeout: float = 30.0,
        idle_wait: float = 0.5,
        max_backoff: float = 30.0,
        seal: bool = True,
        stop_timeout: float = 30.0,
    ) -> None:
        if batch_size < 1 or batch_bytes < 1 or task_timeout <= 0 or idle_wait <= 0:
            raise ValueError("batch_size, batch_bytes, task_timeout and idle_wait must be positive")
        self.spool = spool
        self.app = app
        # The spool's own chain, never another: one proxy's entries under another name would
        # break both chains in the store.
        self.chain = spool.chain_name
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.task_timeout = task_timeout
        self.idle_wait = idle_wait
        self.max_backoff = max_backoff
        self.seal = seal
        self.stop_timeout = stop_timeout
        self.indexed = 0
        self.failures = 0
        self.rewinds = 0
        #: (first seq, last seq) of the batch sent and not yet answered, for operators and tests.
        self.in_flight: tuple[int, int] | None = None
        self._next: int | None = None
        #: Checkpoints the store acknowledged since start (a restarted shipper sends every
        #: one again: a no-op for those it has); its place in the spool's checkpoint file;
        #: whether that file may hold checkpoints not yet sent.
        self.checkpoints_sent = 0
        self._checkpoints_read = 0
        self._checkpoints_due = True
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # Celery's result backend is not thread-safe: every broker call goes through one thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="celery-shipper")

    # -- IndexControl ------------------------------------------------------------------------

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="celery shipper")

    async def stop(self) -> None:
        """Stop shipping, after trying for `stop_timeout` s to ship what is spooled (what is
        left stays in the spool for the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.drain(), self.stop_timeout)
        # A thread blocked waiting for a result ends at its timeout; nobody waits for it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def drain(self) -> None:
        """Ship until the store has every entry spooled before the call (raises on failure)."""
        await self.spool.flush()
        target = self.spool.head()[0]
        while self.spool.cursor() < target:
            await self.ship_once()
        async with self._lock:
            if self.seal:
                await self._seal()
            await self._ship_checkpoints()

    # -- shipping ----------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self.idle_wait
        while True:
            try:
                moved = await self.ship_once()
                backoff = self.idle_wait
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis, the workers or the store are away: the spool keeps everything.
                self.failures += 1
                log.warning("shipping a spool batch failed; retrying in %.1f s: %s", backoff, exc)
                moved = 0
                backoff = min(backoff * 2, self.max_backoff)
            if moved == 0:
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait((waiter,), timeout=backoff)
                finally:
                    waiter.cancel()

    async def ship_once(self) -> int:
        """Send one batch and wait for it to be stored; return how many entries moved."""
        async with self._lock:
            start = self._next if self._next is not None else self.spool.cursor() + 1
            links = self._limit_bytes(await self.spool.read_from(start, self.batch_size))
            if not links:
                if self.seal:
                    await self._seal()
                await self._ship_checkpoints()
                return 0
            first, last = links[0].seq, links[-1].seq
            self.in_flight = (first, last)
            try:
                stored = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._send_and_wait, links_to_json(links)
                )
            finally:
                self.in_flight = None
            if stored < first - 1:
                # The store is behind the cursor (it lost commits): resend from its head.
                self.rewinds += 1
                log.warning("the store holds %s only through seq %d; resending", self.chain, stored)
                self._next = stored + 1
                return 0
            through = min(stored, last)
            if through > self.spool.cursor():
                await self.spool.commit_cursor(through)
            self._next = through + 1
            self.indexed += through - first + 1
            self._checkpoints_due = True
            if self.seal and (len(links) < self.batch_size or through < last):
                await self._seal()
            await self._ship_checkpoints()
            return through - first + 1

    def _limit_bytes(self, links: list[ChainLink]) -> list[ChainLink]:
        total = 0
        for index, link in enumerate(links):
            total += len(link.payload)
            if total > self.batch_bytes and index > 0:
                return links[:index]
        return links

    def _send_and_wait(self, payload: list[list[int | str]]) -> int:
        """In the shipper's thread: publish the batch and wait for the worker's answer."""
        value = self._call(INDEX_BATCH, [self.chain, payload])
        if type(value) is not int or value < 0:
            raise ShippingFailed(f"the worker answered {str(value)[:80]!r}, not a seq")
        return value

    def _call(self, task: str, args: list[Any]) -> Any:
        """In the shipper's thread: publish one task and wait for its result."""
        try:
            result = self.app.send_task(task, args=args, retry=True, retry_policy=_PUBLISH_RETRY)
            try:
                value: Any = result.get(timeout=self.task_timeout, propagate=True)
            finally:
                with contextlib.suppress(Exception):
                    result.forget()
        except Exception as exc:  # the broker's, the backend's or the worker's error
            raise ShippingFailed(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        return value

    async def _seal(self) -> None:
        sealed = await self.spool.seal_indexed()
        if sealed:
            self._checkpoints_due = True  # each seal signs a checkpoint
            log.info("sealed spool segments", extra={"count": len(sealed)})

    async def _ship_checkpoints(self) -> None:
        """Send the spool's checkpoints the store has indexed and not yet acknowledged.

        The checkpoint file is append-only but not in seq order (a seal signs a segment's
        last seq after later periodic checkpoints), so the shipper keeps its place as a
        position in the file: it moves past the longest run of checkpoints the store has
        the entries for, and stops at the first one it has not.
        """
        if not self._checkpoints_due:
            return
        indexed = self.spool.cursor()
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._executor, read_checkpoints, self.spool.directory)
        unread = found[self._checkpoints_read :]
        ready = 0
        while ready < len(unread) and unread[ready].seq <= indexed:
            ready += 1
        ours = [c for c in unread[:ready] if c.chain_name == self.chain]
        for start in range(0, len(ours), MAX_CHECKPOINTS):
            part = ours[start : start + MAX_CHECKPOINTS]
            await loop.run_in_executor(self._executor, self._send_checkpoints, part)
            self.checkpoints_sent += len(part)
        self._checkpoints_read += ready
        # What is left waits for its entries to be stored.
        self._checkpoints_due = ready < len(unread)

    def _send_checkpoints(self, checkpoints: list[Checkpoint]) -> None:
        self._call(ADD_CHECKPOINTS, [self.chain, checkpoints_to_json(checkpoints)])
