"""Archive operations behind the CLI: search, verify, rebuild, move between stores.

Composition of store and spool.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from archive_api.store.audit import MAX_APPEND_BATCH
from archive_api.store.base import (
    ArchiveStore,
    HoldRecord,
    RetentionAssignment,
    RetentionState,
    SearchPage,
    Tombstone,
    VerifyProblem,
    VerifyReport,
    tombstones_in,
)
from archive_api.store.chain import ChainLink
from archive_api.store.errors import (
    AlreadyExists,
    InvalidEntry,
    InvalidRequest,
    StoreError,
    StoreUnavailable,
)
from archive_api.store.sqlite import SqliteStore
from proxy.errors import SpoolCorrupt
from proxy.spool import (
    LEGACY_CHAIN_NAME,
    iter_evidence,
    iter_spool_segments,
    read_chain_name,
    read_checkpoints,
)
from stanzaguard.errors import StanzaGuardError
from stanzaguard.keys import load_public_key
from stanzaguard.stores import EsSpec, SqliteSpec, StoreSpec, open_store_spec


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


async def open_chosen_store(paths: Paths, spec: StoreSpec | None) -> ArchiveStore:
    """The store `spec` names (the settings' choice), else the data directory's SQLite."""
    if spec is None or (isinstance(spec, SqliteSpec) and spec.path == paths.store):
        return await open_existing_store(paths)
    return await open_store_spec(spec, create=False)


async def search(
    paths: Paths,
    query: str,
    *,
    limit: int,
    sort: str = "time",
    store_spec: StoreSpec | None = None,
) -> SearchPage:
    opened = await open_chosen_store(paths, store_spec)
    try:
        return await opened.search(query, limit=limit, sort=sort)  # type: ignore[arg-type]
    finally:
        await opened.close()


@dataclass
class VerifyOutcome:
    store: VerifyReport
    spool_problems: list[str] = field(default_factory=list)
    spool_entries_checked: int = 0
    not_yet_indexed: int = 0
    #: Chains whose checkpoints another key signed (another proxy's, on its own volume):
    #: checked against their hashes, their signatures only from that proxy's data directory.
    foreign_signatures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.store.ok and not self.spool_problems


def spool_chain(paths: Paths, configured: str = LEGACY_CHAIN_NAME) -> str:
    """The chain this data directory's spool writes: the name its spool records, else
    `configured` (the chain_name setting; a spool made before names were recorded is the
    default chain)."""
    try:
        recorded = read_chain_name(paths.spool) if paths.spool.is_dir() else None
    except SpoolCorrupt as exc:
        raise StanzaGuardError(f"cannot tell the spool's chain: {exc}") from None
    return recorded or configured


def spooled_links(
    paths: Paths, key: Ed25519PublicKey | None, chain: str = LEGACY_CHAIN_NAME
) -> Iterator[ChainLink]:
    """Evidence first, then what is still in the spool; each seq once, in order."""
    last = 0
    sources: list[Iterator[ChainLink]] = []
    if paths.evidence.is_dir():
        sources.append(iter_evidence(paths.evidence, public_key=key, chain_name=chain))
    if paths.spool.is_dir():
        sources.append(iter_spool_segments(paths.spool))
    for link in itertools.chain(*sources):
        if link.seq > last:
            last = link.seq
            yield link


async def verify(
    paths: Paths, *, store_spec: StoreSpec | None = None, chain_name: str = LEGACY_CHAIN_NAME
) -> VerifyOutcome:
    """The store's own verify (every chain), then this data directory's spool and evidence
    against the store's copy of their chain (`spool_chain`: recorded, else `chain_name`)."""
    key = public_key(paths)
    chain = spool_chain(paths, chain_name)
    store = await open_chosen_store(paths, store_spec)
    try:
        for checkpoint in read_checkpoints(paths.spool) if paths.spool.is_dir() else []:
            if key is not None and not checkpoint.verify(key):
                raise StanzaGuardError(
                    f"spool checkpoint at seq {checkpoint.seq} is not signed by this archive's key"
                )
        outcome = await _verify_store(store, key, chain)
        last_indexed = await store.last_seq(chain=chain)
        stored = store.chain_links(1, chain=chain)
        try:
            await _compare(spooled_links(paths, key, chain), stored, last_indexed, outcome)
        except SpoolCorrupt as exc:
            outcome.spool_problems.append(f"spool or evidence: {exc}")
        return outcome
    finally:
        await store.close()


async def _verify_store(
    store: ArchiveStore, key: Ed25519PublicKey | None, own_chain: str
) -> VerifyOutcome:
    """The store's own verify, signatures checked with this data directory's key.

    Proxies sharing a store each sign their chain with the key on their own volume. When the
    store holds other chains, their checkpoints are checked with this key only if it signed
    them (then all must verify); a chain signed by another key is left to that proxy's
    `verify` and named in `foreign_signatures`. This data directory's chain must verify.
    """
    chains = await store.chains()
    if key is None or all(chain == own_chain for chain in chains):
        return VerifyOutcome(await store.verify(public_key=key))
    report = await store.verify()  # every chain's links, records and checkpoint hashes
    bad: list[VerifyProblem] = []
    foreign: list[str] = []
    for chain in chains:
        checkpoints = await store.checkpoints(chain)
        valid = [checkpoint.verify(key) for checkpoint in checkpoints]
        if chain != own_chain and not any(valid):
            if checkpoints:
                foreign.append(chain)
            continue
        bad.extend(
            VerifyProblem("checkpoint signature does not verify", chain=chain, seq=checkpoint.seq)
            for checkpoint, ok in zip(checkpoints, valid, strict=True)
            if not ok
        )
    report = dataclasses.replace(report, problems=(*bad, *report.problems))
    return VerifyOutcome(report, foreign_signatures=foreign)


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
    chain_name: str = LEGACY_CHAIN_NAME,
) -> int:
    """Build a fresh store at `target` from the evidence and spool segments; return entries.

    The entries go in as the spool's chain (`spool_chain`: recorded, else `chain_name`)."""
    if target.exists():
        raise StanzaGuardError(f"{target} exists; refusing to overwrite it")
    key = public_key(paths)
    chain = spool_chain(paths, chain_name)
    store = await SqliteStore.open(target)
    applied = 0
    try:
        batch: list[ChainLink] = []
        for link in spooled_links(paths, key, chain):
            batch.append(link)
            if len(batch) >= batch_size:
                await store.apply(batch, chain=chain)
                applied += len(batch)
                batch = []
                if progress is not None:
                    progress(applied)
        if batch:
            await store.apply(batch, chain=chain)
            applied += len(batch)
            if progress is not None:
                progress(applied)
        for checkpoint in read_checkpoints(paths.spool) if paths.spool.is_dir() else []:
            if checkpoint.chain_name == chain and checkpoint.seq <= applied:
                await store.add_checkpoint(checkpoint)
    except SpoolCorrupt as exc:
        raise StanzaGuardError(f"cannot rebuild: {exc}") from None
    finally:
        await store.close()
    return applied


# --- moving an archive between stores (`stanzaguard reindex --from SPEC --to SPEC`) ---


@dataclass(frozen=True, slots=True)
class ChainMove:
    chain: str
    entries: int  # the source's last seq
    already_there: int  # entries the target held before (a re-run continues after them)
    head: bytes


@dataclass
class MoveOutcome:
    chains: list[ChainMove]
    copied: int
    checkpoints_copied: int
    source_records: int
    target_records: int
    target_report: VerifyReport
    problems: list[str] = field(default_factory=list)
    tokens_copied: int = 0  # API tokens (their secrets' hashes) added or revoked in the target
    audit_copied: int = 0  # audit events appended to the target's log, as they were
    audit_checkpoints_copied: int = 0
    holds_copied: int = 0  # holds added to the target, or released there as in the source
    retention_copied: int = 0  # records whose retention class and expiry the target took

    @property
    def ok(self) -> bool:
        return not self.problems and self.target_report.ok


def _same_store(a: StoreSpec, b: StoreSpec) -> bool:
    if isinstance(a, SqliteSpec) and isinstance(b, SqliteSpec):
        return a.path.resolve() == b.path.resolve()
    if isinstance(a, EsSpec) and isinstance(b, EsSpec):
        return bool(set(a.urls) & set(b.urls)) and a.index_prefix == b.index_prefix
    return False


async def _link_at(store: ArchiveStore, chain: str, seq: int) -> ChainLink | None:
    async for link in store.chain_links(seq, seq, chain=chain):
        return link
    return None


async def _open_end(spec: StoreSpec, role: str, *, create: bool) -> ArchiveStore:
    try:
        return await open_store_spec(spec, create=create)
    except StoreUnavailable as exc:
        raise StanzaGuardError(f"cannot reach the {role} {spec}: {exc}") from None
    except StoreError as exc:
        raise StanzaGuardError(f"cannot open the {role} {spec}: {exc}") from None


async def _plan(
    source: ArchiveStore, target: ArchiveStore, target_spec: StoreSpec
) -> list[ChainMove]:
    """Per chain: how far the source goes and where the target stands; refuses a target
    holding another archive's chain (it could never verify with this one's entries)."""
    plan = []
    for chain in sorted(await source.chains()):
        last = await source.last_seq(chain=chain)
        there = await target.last_seq(chain=chain)
        if there > last:
            raise StanzaGuardError(
                f"the target {target_spec} holds {there} entries of chain {chain!r}, the source "
                f"only {last}: it holds a different archive"
            )
        if there:
            theirs, ours = (
                await _link_at(target, chain, there),
                await _link_at(source, chain, there),
            )
            if theirs is None or ours is None or theirs.hash != ours.hash:
                raise StanzaGuardError(
                    f"the target {target_spec} holds a different chain {chain!r} (its entry "
                    f"{there} differs from the source's)"
                )
        head = await _link_at(source, chain, last)
        if head is None:
            raise StanzaGuardError(f"the source's chain {chain!r} has no entry {last}")
        plan.append(ChainMove(chain, last, there, head.hash))
    return plan


async def move_archive(
    source_spec: StoreSpec,
    target_spec: StoreSpec,
    *,
    batch_size: int = 1000,
    public_key: Ed25519PublicKey | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MoveOutcome:
    """Copy every chain (and signed checkpoint) of one store into another, then check it.

    Entries go through the target's `apply` in batches, read from the source with
    `chain_links`; what the target already holds of a chain is skipped, so a re-run after a
    failure continues where the last one stopped. At the end each chain's entry count and
    head hash must be equal on both sides, the record counts equal, and the target's own
    `verify` must pass; the outcome lists every difference.
    """
    if batch_size < 1:
        raise StanzaGuardError("--batch-size must be at least 1")
    if _same_store(source_spec, target_spec):
        raise StanzaGuardError("the source and the target are the same store")
    source = await _open_end(source_spec, "source", create=False)
    try:
        target = await _open_end(target_spec, "target", create=True)
        try:
            return await _move(source, target, target_spec, batch_size, public_key, progress)
        except StoreUnavailable as exc:
            raise StanzaGuardError(f"a store became unreachable: {exc}") from None
        finally:
            await target.close()
    finally:
        await source.close()


async def _move(
    source: ArchiveStore,
    target: ArchiveStore,
    target_spec: StoreSpec,
    batch_size: int,
    key: Ed25519PublicKey | None,
    progress: Callable[[int, int], None] | None,
) -> MoveOutcome:
    plan = await _plan(source, target, target_spec)
    # Holds first: from its first record on, the target must never purge what is held.
    holds_copied, hold_problems = await _move_holds(source, target)
    total = sum(move.entries - move.already_there for move in plan)
    copied = 0
    if progress is not None:
        progress(copied, total)
    purges = _PurgeMover(source, target)
    for move in plan:
        batch: list[ChainLink] = []
        async for link in source.chain_links(
            move.already_there + 1, move.entries, chain=move.chain
        ):
            batch.append(link)
            if len(batch) >= batch_size:
                await purges.apply(batch, move.chain)
                copied += len(batch)
                batch = []
                if progress is not None:
                    progress(copied, total)
        if batch:
            await purges.apply(batch, move.chain)
            copied += len(batch)
            if progress is not None:
                progress(copied, total)
    known = {(c.chain_name, c.seq, c.signature) for c in await target.checkpoints()}
    checkpoints_copied = 0
    for checkpoint in await source.checkpoints():
        if (checkpoint.chain_name, checkpoint.seq, checkpoint.signature) not in known:
            await target.add_checkpoint(checkpoint)
            checkpoints_copied += 1
    retention_copied, retention_problems = await _move_retention(source, target, batch_size)
    audit_copied, audit_checkpoints_copied, audit_problems = await _move_audit(source, target)
    tokens_copied, token_problems = await _move_tokens(source, target)
    outcome = MoveOutcome(
        chains=plan,
        copied=copied,
        checkpoints_copied=checkpoints_copied,
        holds_copied=holds_copied,
        retention_copied=retention_copied,
        problems=[*hold_problems, *retention_problems, *audit_problems, *token_problems],
        tokens_copied=tokens_copied,
        audit_copied=audit_copied,
        audit_checkpoints_copied=audit_checkpoints_copied,
        source_records=await source.count(""),
        target_records=await target.count(""),
        target_report=await target.verify(public_key=key),
    )
    for move in plan:
        there = await target.last_seq(chain=move.chain)
        head = await _link_at(target, move.chain, there) if there else None
        if there != move.entries:
            outcome.problems.append(
                f"chain {move.chain!r}: the target has {there} entries, the source {move.entries}"
            )
        elif head is None or head.hash != move.head:
            outcome.problems.append(f"chain {move.chain!r}: the target's head differs")
    if outcome.source_records != outcome.target_records:
        outcome.problems.append(
            f"the target has {outcome.target_records} records, the source {outcome.source_records}"
        )
    outcome.problems.extend(str(problem) for problem in outcome.target_report.problems)
    if not audit_problems:
        audit_report = await target.verify_audit(public_key=key)
        outcome.problems.extend(f"audit log: {problem}" for problem in audit_report.problems)
    return outcome


async def _move_audit(source: ArchiveStore, target: ArchiveStore) -> tuple[int, int, list[str]]:
    """Append the source's audit events the target lacks, seqs and hashes unchanged, and its
    signed audit checkpoints. The target's log must be empty or a beginning of the source's
    (a re-run); a target with a log of its own keeps it and the move reports it (the source's
    log then stays verifiable in the source)."""
    there = await target.audit_head()
    copied = 0
    cursor: str | None = None
    while True:
        page = await source.audit_events(limit=MAX_APPEND_BATCH, cursor=cursor, newest_first=False)
        fresh = [event for event in page.events if event.seq > there.seq]
        known = [event for event in page.events if event.seq == there.seq]
        if known and known[0].hash != there.hash:
            return 0, 0, ["audit log: the target has an audit log of its own; not copied"]
        if fresh:
            try:
                copied += await target.import_audit(fresh)
            except InvalidRequest as exc:
                return copied, 0, [f"audit log: {exc}"]
        cursor = page.next_cursor
        if cursor is None:
            break
    if copied == 0 and there.seq > (await source.audit_head()).seq:
        return 0, 0, ["audit log: the target has an audit log of its own; not copied"]
    theirs = {(c.seq, c.signature) for c in await target.audit_checkpoints()}
    checkpoints = 0
    for checkpoint in await source.audit_checkpoints():
        if (checkpoint.seq, checkpoint.signature) not in theirs:
            await target.add_audit_checkpoint(checkpoint)
            checkpoints += 1
    return copied, checkpoints, []


async def _move_tokens(source: ArchiveStore, target: ArchiveStore) -> tuple[int, list[str]]:
    """Copy the API tokens (names, roles, secret hashes, times), so that the clients of the
    moved archive keep working; a revocation in the source after an earlier move is repeated.
    A token the target has under that name with other fields is reported and left alone."""
    copied = 0
    problems: list[str] = []
    for token in await source.tokens():
        there = await target.token_by_name(token.name)
        if there == token:
            continue
        active = dataclasses.replace(token, revoked_at=None)
        if there is None:
            try:
                await target.add_token(active)
            except AlreadyExists:
                problems.append(
                    f"token {token.name!r}: its secret is another token's in the target"
                )
                continue
        elif dataclasses.replace(there, revoked_at=None) != active or there.revoked_at:
            problems.append(f"token {token.name!r}: the target holds a different token")
            continue
        if token.revoked_at is not None:
            await target.revoke_token(token.name, at=token.revoked_at)
        copied += 1
    return copied, problems


class _PurgeMover:
    """Applies batches of a moved chain; entries the source purged by retention (tombstones)
    go over with their purge: the source's record of it is checked against the tombstone,
    recorded in the target (`import_purges`), and the tombstone applied without its hash."""

    def __init__(self, source: ArchiveStore, target: ArchiveStore) -> None:
        self._source = source
        self._target = target
        self._imported: set[str] = set()

    async def apply(self, batch: list[ChainLink], chain: str) -> None:
        try:
            found = tombstones_in(batch, chain)
        except InvalidEntry as exc:
            raise StanzaGuardError(f"the source is damaged: {exc}") from None
        if not found:
            await self._target.apply(batch, chain=chain)
            return
        named: dict[str, tuple[int, Tombstone]] = {}
        for seq, tombstone in found.items():
            if tombstone.record_id not in self._imported:
                named.setdefault(tombstone.record_id, (seq, tombstone))
        states: list[RetentionState] = []
        for record_id, (seq, tombstone) in named.items():
            state = await self._source.retention_of(record_id)
            recorded = (
                None
                if state is None or state.purged_at is None
                else Tombstone(record_id, state.purged_at, state.retention_class, state.expires_at)
            )
            if recorded != tombstone:
                raise StanzaGuardError(
                    f"chain {chain!r} entry {seq}: a tombstone the source has no matching "
                    "purge for (run `stanzaguard verify` on the source)"
                )
            assert state is not None
            states.append(state)
        try:
            await self._target.import_purges(states)
        except InvalidRequest as exc:
            raise StanzaGuardError(f"the target cannot take the source's purges: {exc}") from None
        self._imported.update(named)
        await self._target.apply(batch, chain=chain, tombstones=True)


def _unreleased(hold: HoldRecord) -> HoldRecord:
    return dataclasses.replace(hold, released_at=None, released_by=None, release_reason=None)


async def _move_holds(source: ArchiveStore, target: ArchiveStore) -> tuple[int, list[str]]:
    """Copy every legal hold, with its id, author, times and release. A hold the target has
    already is left alone if it is the same (a re-run), released if the source released it
    since, and reported if it differs in anything else."""
    theirs = {hold.hold_id: hold for hold in await target.list_holds()}
    copied = 0
    problems: list[str] = []
    for hold in await source.list_holds():
        there = theirs.get(hold.hold_id)
        if there == hold:
            continue
        if there is None:
            await target.add_hold(_unreleased(hold))
        elif _unreleased(there) != _unreleased(hold) or not there.active:
            problems.append(f"hold {hold.hold_id!r}: the target holds a different hold")
            continue
        if hold.released_at is not None:
            await target.release_hold(
                hold.hold_id,
                released_by=hold.released_by or "",
                released_at=hold.released_at,
                reason=hold.release_reason,
            )
        copied += 1
    return copied, problems


async def _move_retention(
    source: ArchiveStore, target: ArchiveStore, batch_size: int
) -> tuple[int, list[str]]:
    """Copy each record's retention class, expiry and assignment time, then read them back.

    `set_retention` only ever extends, so a re-run changes nothing, and a target that already
    kept a record longer (its own policy ran) keeps it longer: reported, never shortened.
    """
    copied = 0
    problems: list[str] = []
    cursor: str | None = None
    while True:
        page = await source.retention_subjects(cursor=cursor, limit=batch_size)
        wanted: dict[str, RetentionState] = {}
        by_time: dict[datetime, list[RetentionAssignment]] = {}
        for subject in page.subjects:
            if subject.retention_class is None:
                continue
            state = await source.retention_of(subject.record_id)
            if state is None or state.purged_at is not None:
                continue
            wanted[state.record_id] = state
            by_time.setdefault(state.assigned_at, []).append(
                RetentionAssignment(state.record_id, state.retention_class, state.expires_at)
            )
        for assigned_at, assignments in by_time.items():
            update = await target.set_retention(assignments, assigned_at=assigned_at)
            copied += update.assigned + update.extended
        for record_id, state in wanted.items():
            there = await target.retention_of(record_id)
            if there is None:
                problems.append(f"record {record_id!r}: the target has no retention for it")
            elif (there.retention_class, there.expires_at) != (
                state.retention_class,
                state.expires_at,
            ):
                problems.append(
                    f"record {record_id!r}: retention {there.retention_class} until "
                    f"{there.expires_at.isoformat()} in the target, {state.retention_class} "
                    f"until {state.expires_at.isoformat()} in the source"
                )
        cursor = page.next_cursor
        if cursor is None:
            return copied, problems
