"""Celery tasks of the archive: indexing spool batches sent by the proxies' shippers.

A proxy's shipper (`stanzaguard/celery_indexer.py`) reads durable batches from its own spool and
sends each one as an `index_batch` task over Redis; a worker applies it to the archive store and
returns the store's last applied seq of that chain. The shipper moves its spool cursor only on
that answer, so a batch lost anywhere on the way (a killed worker, a Redis restart that forgot
its queue) is simply sent again. That is safe because `ArchiveStore.apply` is idempotent by
sequence number and verifies every hash: a batch applied twice changes nothing.

The messages are JSON only (never pickle: a broker is shared infrastructure, and unpickling
what arrives there would run code). Acknowledged late, rejected back to the queue when the
worker process dies, one task prefetched at a time: a task is gone from the queue only once
its batch is committed.

This module does not import the composition root: the worker's process is given a
`StoreOpener` (a callable opening its store: SQLite file, Elasticsearch, from the settings),
and each worker process opens its own store on its first task.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from celery import Celery

from archive_api.errors import InvalidInput
from archive_api.store.base import ArchiveStore
from archive_api.store.chain import ChainLink, Checkpoint
from archive_api.store.errors import ChainGap

#: The tasks' registered names (the wire contract between shippers and workers).
INDEX_BATCH = "stanzaguard.index_batch"
ADD_CHECKPOINTS = "stanzaguard.add_checkpoints"
#: Most links one task may carry, and most payload bytes in all; a larger batch is refused.
MAX_BATCH_LINKS = 20_000
MAX_BATCH_BYTES = 64 * 1024 * 1024
#: Largest single entry (as the spool allows).
MAX_ENTRY_BYTES = 16 * 1024 * 1024
MAX_CHAIN_NAME = 128
#: Most signed chain heads one `add_checkpoints` task may carry.
MAX_CHECKPOINTS = 1000
_HASH_HEX = 64
_SIGNATURE_HEX = 128  # Ed25519

StoreOpener = Callable[[], Awaitable[ArchiveStore]]
_T = TypeVar("_T")


class InvalidBatch(InvalidInput):
    """An `index_batch` message is not a well-formed batch of chain links."""


# --- the wire format ---------------------------------------------------------------------------


def links_to_json(links: Sequence[ChainLink]) -> list[list[int | str]]:
    """Links as JSON-safe lists: ``[seq, prev_hash hex, hash hex, payload base64]``."""
    return [
        [
            link.seq,
            link.prev_hash.hex(),
            link.hash.hex(),
            base64.b64encode(link.payload).decode("ascii"),
        ]
        for link in links
    ]


def _hash_field(value: object, what: str, digits: int = _HASH_HEX) -> bytes:
    if not isinstance(value, str) or len(value) != digits:
        raise InvalidBatch(f"{what} must be {digits} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise InvalidBatch(f"{what} must be {digits} hex digits") from None


def _chain_field(chain: object) -> str:
    if not isinstance(chain, str) or not chain or len(chain) > MAX_CHAIN_NAME:
        raise InvalidBatch(f"the chain name must be 1 to {MAX_CHAIN_NAME} characters")
    if not chain.isprintable():
        raise InvalidBatch("the chain name must be printable")
    return chain


def checkpoints_to_json(checkpoints: Sequence[Checkpoint]) -> list[list[int | str]]:
    """Signed chain heads as JSON-safe lists: ``[seq, head hex, signature hex]``."""
    return [[c.seq, c.head.hex(), c.signature.hex()] for c in checkpoints]


def checkpoints_from_json(chain: object, data: object) -> tuple[str, list[Checkpoint]]:
    """Check and decode an `add_checkpoints` message (one chain's signed heads).

    The signatures are not checked here (the worker has no proxy's key); the store checks
    each head against its stored hash, and `stanzaguard verify` checks the signatures.
    """
    name = _chain_field(chain)
    if not isinstance(data, list) or not data:
        raise InvalidBatch("checkpoints come as a non-empty list")
    if len(data) > MAX_CHECKPOINTS:
        raise InvalidBatch(f"at most {MAX_CHECKPOINTS} checkpoints a task, not {len(data)}")
    checkpoints: list[Checkpoint] = []
    for index, item in enumerate(data):
        where = f"checkpoint {index}"
        if not isinstance(item, list) or len(item) != 3:
            raise InvalidBatch(f"{where}: expected [seq, head, signature]")
        seq, head_hex, signature_hex = item
        if type(seq) is not int or not 1 <= seq < 2**63:
            raise InvalidBatch(f"{where}: seq must be a positive integer")
        head = _hash_field(head_hex, f"{where}: head")
        signature = _hash_field(signature_hex, f"{where}: signature", _SIGNATURE_HEX)
        checkpoints.append(Checkpoint(name, seq, head, signature))
    return name, checkpoints


def links_from_json(chain: object, data: object) -> tuple[str, list[ChainLink]]:
    """Check and decode an `index_batch` message; raise `InvalidBatch` naming the problem.

    Only the shape is checked here; the store verifies sequence and hashes when applying.
    """
    chain = _chain_field(chain)
    if not isinstance(data, list) or not data:
        raise InvalidBatch("a batch is a non-empty list of links")
    if len(data) > MAX_BATCH_LINKS:
        raise InvalidBatch(f"a batch holds at most {MAX_BATCH_LINKS} links, not {len(data)}")
    links: list[ChainLink] = []
    total = 0
    for index, item in enumerate(data):
        where = f"link {index}"
        if not isinstance(item, list) or len(item) != 4:
            raise InvalidBatch(f"{where}: expected [seq, prev_hash, hash, payload]")
        seq, prev_hex, hash_hex, payload_b64 = item
        if type(seq) is not int or not 1 <= seq < 2**63:
            raise InvalidBatch(f"{where}: seq must be a positive integer")
        if not isinstance(payload_b64, str) or len(payload_b64) > (MAX_ENTRY_BYTES // 3 + 1) * 4:
            raise InvalidBatch(
                f"{where}: payload must be base64 of at most {MAX_ENTRY_BYTES} bytes"
            )
        try:
            payload = base64.b64decode(payload_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidBatch(f"{where}: payload is not base64") from None
        total += len(payload)
        if total > MAX_BATCH_BYTES:
            raise InvalidBatch(f"a batch carries at most {MAX_BATCH_BYTES} payload bytes")
        links.append(
            ChainLink(
                seq,
                _hash_field(prev_hex, f"{where}: prev_hash"),
                _hash_field(hash_hex, f"{where}: hash"),
                payload,
            )
        )
    return chain, links


# --- the worker's side -------------------------------------------------------------------------


class _ProcessStore:
    """One event loop and one open store per worker process, opened on the first task.

    A prefork worker forks its children after the app was built: whatever the parent opened
    must not be shared, so the store belongs to the process id that opened it.
    """

    def __init__(self, opener: StoreOpener | None) -> None:
        self._opener = opener
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: ArchiveStore | None = None

    def run(self, work: Callable[[ArchiveStore], Coroutine[Any, Any, _T]]) -> _T:
        if self._opener is None:
            raise RuntimeError("this Celery app was built without a store (not a worker)")
        if self._pid != os.getpid() or self._loop is None:
            self._pid = os.getpid()
            self._loop = asyncio.new_event_loop()
            self._store = None
        loop = self._loop
        if self._store is None:
            self._store = loop.run_until_complete(self._opener())
        return loop.run_until_complete(work(self._store))

    def close(self) -> None:
        if self._pid == os.getpid() and self._loop is not None:
            if self._store is not None:
                self._loop.run_until_complete(self._store.close())
            self._loop.close()
        self._loop = self._store = self._pid = None


async def apply_batch(store: ArchiveStore, chain: str, links: Sequence[ChainLink]) -> int:
    """Apply one batch; return the store's last applied seq of `chain` afterwards.

    A batch that starts past the store's head (the store lost commits in a power cut, or
    batches arrived out of order) is not an error of the batch: the answer, below the batch's
    first seq, tells the shipper where to resume.
    """
    with contextlib.suppress(ChainGap):
        await store.apply(links, chain=chain)
    return await store.last_seq(chain=chain)


async def add_checkpoints(
    store: ArchiveStore, chain: str, checkpoints: Sequence[Checkpoint]
) -> int:
    """Store signed heads of `chain` the store does not hold yet; return how many were new.

    A checkpoint past the store's head is refused (`stanzaguard verify` would report it as
    lying past the end of the chain): the shipper sends only what the store has indexed.
    A head that differs from the stored hash raises `ChainConflict` (tampering or a
    mix-up of chains): the task fails and the operator hears of it.
    """
    last = await store.last_seq(chain=chain)
    beyond = [c.seq for c in checkpoints if c.seq > last]
    if beyond:
        raise InvalidBatch(
            f"checkpoint at seq {beyond[0]} is past the store's head of {chain!r} ({last})"
        )
    known = {c.seq for c in await store.checkpoints(chain)}
    added = 0
    for checkpoint in checkpoints:
        if checkpoint.seq not in known:
            await store.add_checkpoint(checkpoint)
            known.add(checkpoint.seq)
            added += 1
    return added


def create_celery_app(
    broker_url: str,
    *,
    store_opener: StoreOpener | None = None,
    result_url: str | None = None,
    visibility_timeout: float = 3600.0,
    beat_schedule: Mapping[str, Mapping[str, Any]] | None = None,
    main: str = "stanzaguard",
) -> Celery:
    """The Celery app shared by shippers (which only send) and workers (which need a store).

    Args:
        broker_url: Redis URL of the broker; the result backend too unless `result_url`.
        store_opener: opens the archive store in a worker process; None in a shipper.
        visibility_timeout: seconds before Redis hands an unacknowledged task to another
            worker (the shipper resends much sooner; the late copy is a no-op).
        beat_schedule: Celery beat entries (the composition root registers those tasks).
    """
    app = Celery(main, broker=broker_url, backend=result_url or broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            "socket_connect_timeout": 5,
        },
        # A lost result-backend connection is retried a few times, not Celery's 20 s: the
        # shipper's own timeout and backoff take over, and a worker's lost answer only means
        # the batch is sent (and applied as a no-op) again.
        result_backend_transport_options={
            "retry_policy": {
                "max_retries": 3,
                "interval_start": 0,
                "interval_step": 0.5,
                "interval_max": 1,
            }
        },
        redis_socket_connect_timeout=5,
        redis_backend_health_check_interval=5,
        worker_hijack_root_logger=False,
        beat_schedule=dict(beat_schedule or {}),
    )
    process_store = _ProcessStore(store_opener)
    # shared=False on every task: Celery's default adds each task to every app finalized
    # later in the process, where the first closure registered under a name would win (a
    # second app's store or settings silently ignored).

    @app.task(name=INDEX_BATCH, shared=False, acks_late=True, reject_on_worker_lost=True)
    def index_batch(chain: object, links_as_json: object) -> int:
        """Apply a batch of chain links to the store; return the store's last seq of `chain`."""
        name, links = links_from_json(chain, links_as_json)
        return process_store.run(lambda store: apply_batch(store, name, links))

    @app.task(name=ADD_CHECKPOINTS, shared=False, acks_late=True, reject_on_worker_lost=True)
    def add_checkpoints_task(chain: object, checkpoints_as_json: object) -> int:
        """Store a proxy's signed chain heads (its spool's checkpoints); return how many new."""
        name, checkpoints = checkpoints_from_json(chain, checkpoints_as_json)
        return process_store.run(lambda store: add_checkpoints(store, name, checkpoints))

    return app
