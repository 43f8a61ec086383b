"""Archive operations behind the CLI: search, verify, rebuild. Composition of store and spool."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from archive_api.store.base import SearchPage, Tombstone, VerifyReport
from archive_api.store.chain import ChainLink
from archive_api.store.sqlite import SqliteStore
from proxy.errors import SpoolCorrupt
from proxy.spool import iter_evidence, iter_spool_segments, read_checkpoints
from stanzaguard.errors import StanzaGuardError
from stanzaguard.keys import load_public_key


@dataclass(frozen=True, slots=True)
class Paths:
    data_dir: Path
    evidence_dir: Path | None = None

    @property
    def store(self) -> Path:
        return self.data_dir / "archive.sqlite3"

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool"

    @property
    def keys(self) -> Path:
        return self.data_dir / "keys"

    @property
    def evidence(self) -> Path:
        return self.evidence_dir or self.data_dir / "evidence"


def public_key(paths: Paths) -> Ed25519PublicKey | None:
    pem = load_public_key(paths.keys)
    if pem is None:
        return None
    key = load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise StanzaGuardError(f"{paths.keys} holds a public key that is not Ed25519")
    return key


async def open_existing_store(paths: Paths) -> SqliteStore:
    if not paths.store.exists():
        raise StanzaGuardError(f"no archive at {paths.store} (is --data-dir right?)")
    return await SqliteStore.open(paths.store)


async def search(paths: Paths, query: str, *, limit: int, sort: str = "time") -> SearchPage:
    store = await open_existing_store(paths)
    try:
        return await store.search(query, limit=limit, sort=sort)  # type: ignore[arg-type]
    finally:
        await store.close()


@dataclass
class VerifyOutcome:
    store: VerifyReport
    spool_problems: list[str] = field(default_factory=list)
    spool_entries_checked: int = 0
    not_yet_indexed: int = 0

    @property
    def ok(self) -> bool:
        return self.store.ok and not self.spool_problems


def spooled_links(paths: Paths, key: Ed25519PublicKey | None) -> Iterator[ChainLink]:
    """Evidence first, then what is still in the spool; each seq once, in order."""
    last = 0
    sources: list[Iterator[ChainLink]] = []
    if paths.evidence.is_dir():
        sources.append(iter_evidence(paths.evidence, public_key=key))
    if paths.spool.is_dir():
        sources.append(iter_spool_segments(paths.spool))
    for link in itertools.chain(*sources):
        if link.seq > last:
            last = link.seq
            yield link


async def verify(paths: Paths) -> VerifyOutcome:
    key = public_key(paths)
    store = await open_existing_store(paths)
    try:
        for checkpoint in read_checkpoints(paths.spool) if paths.spool.is_dir() else []:
            if key is not None and not checkpoint.verify(key):
                raise StanzaGuardError(
                    f"spool checkpoint at seq {checkpoint.seq} is not signed by this archive's key"
                )
        outcome = VerifyOutcome(await store.verify(public_key=key))
        last_indexed = await store.last_seq()
        stored = store.chain_links(1)
        try:
            await _compare(spooled_links(paths, key), stored, last_indexed, outcome)
        except SpoolCorrupt as exc:
            outcome.spool_problems.append(f"spool or evidence: {exc}")
        return outcome
    finally:
        await store.close()


async def _compare(
    spooled: Iterator[ChainLink],
    stored: AsyncIterator[ChainLink],
    last_indexed: int,
    outcome: VerifyOutcome,
) -> None:
    current: ChainLink | None = None
    for link in spooled:
        outcome.spool_entries_checked += 1
        if link.seq > last_indexed:
            outcome.not_yet_indexed += 1
            continue
        while current is None or current.seq < link.seq:
            try:
                current = await anext(stored)
            except StopAsyncIteration:
                outcome.spool_problems.append(f"seq {link.seq}: spooled but not in the archive")
                return
        if current.seq != link.seq:
            outcome.spool_problems.append(f"seq {link.seq}: spooled but missing from the archive")
            if len(outcome.spool_problems) > 20:
                return
            continue
        # A purged entry keeps its hash but not its payload (the store's verify checks the
        # tombstone itself); the evidence copy still has the original bytes.
        purged = current.payload != link.payload and _is_tombstone(current.payload)
        if current.hash != link.hash or (current.payload != link.payload and not purged):
            outcome.spool_problems.append(
                f"seq {link.seq}: the archive's entry differs from the spooled one"
            )
            if len(outcome.spool_problems) > 20:
                return


def _is_tombstone(payload: bytes) -> bool:
    try:
        return Tombstone.from_payload(payload) is not None
    except ValueError:
        return False  # a malformed tombstone is no excuse for a differing entry


async def rebuild(
    paths: Paths,
    target: Path,
    *,
    batch_size: int = 5000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Build a fresh store at `target` from the evidence and spool segments; return entries."""
    if target.exists():
        raise StanzaGuardError(f"{target} exists; refusing to overwrite it")
    key = public_key(paths)
    store = await SqliteStore.open(target)
    applied = 0
    try:
        batch: list[ChainLink] = []
        for link in spooled_links(paths, key):
            batch.append(link)
            if len(batch) >= batch_size:
                await store.apply(batch)
                applied += len(batch)
                batch = []
                if progress is not None:
                    progress(applied)
        if batch:
            await store.apply(batch)
            applied += len(batch)
            if progress is not None:
                progress(applied)
        for checkpoint in read_checkpoints(paths.spool) if paths.spool.is_dir() else []:
            if checkpoint.seq <= applied:
                await store.add_checkpoint(checkpoint)
    except SpoolCorrupt as exc:
        raise StanzaGuardError(f"cannot rebuild: {exc}") from None
    finally:
        await store.close()
    return applied
