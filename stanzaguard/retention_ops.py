"""Purge and export from the command line: `stanzaguard purge`, `stanzaguard export`.

Composition only: opens the configured store (the data directory's SQLite file, or
Elasticsearch with `store = "elasticsearch"`), reads the retention policy file, builds the
audit log with the data directory's checkpoint signing key and the clock, and acts as the local
operator (`stanzaguard.access.cli_identity`, the admin role under ``cli:<unix user>``).

Every purge batch is audited *before* it runs: a dry run plans the batch (at most
`PURGE_BATCH` records, so the record ids fit in one audit event), the plan is recorded, and
then exactly those records are purged if they are still due and unheld; a record a hold
caught in between is reported in a second event. An export is audited when its manifest is
written; if the audit log refuses the event, the export's files are removed again.
"""

from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from archive_api.audit import AuditAction, AuditLog, AuditOutcome
from archive_api.auth import Identity
from archive_api.errors import ArchiveApiError, RetentionPolicyError
from archive_api.exports import ExportFormat, ExportResult, ExportSource, export_records
from archive_api.holds import HoldService
from archive_api.retention import ApplyOutcome, RetentionPolicy, apply_policy, parse_retention
from archive_api.store.base import ArchiveStore
from archive_api.store.errors import StoreError
from classifier.clock import Clock
from classifier.errors import PolicyError
from classifier.patterns import UserGroup
from proxy.policy_source import load_policy
from stanzaguard.access import cli_identity
from stanzaguard.errors import StanzaGuardError
from stanzaguard.keys import load_or_create_signer
from stanzaguard.operations import Paths, open_chosen_store
from stanzaguard.stores import StoreSpec

PURGE_BATCH = 250  # record ids per audited batch: ~10 KiB of ids, under the audit size cap


def load_retention(
    retention_file: Path,
    policy_file: Path | None = None,
    local_domains: frozenset[str] = frozenset(),
) -> RetentionPolicy:
    """The `[retention]` section of `retention_file`; rules may name the `[groups]` of the
    policy file.

    ``local_domains``: the served domains, local when the policy file does not list
    `local_domains` itself (as the proxy reads the same file).
    """
    groups: dict[str, UserGroup] = {}
    if policy_file is not None:
        try:
            policy = load_policy(policy_file, local_domains)
        except PolicyError as exc:
            reason = str(exc)
            where = "" if str(policy_file) in reason else f"{policy_file}: "
            raise StanzaGuardError(f"{where}{reason}") from None
        groups = {g.name: UserGroup.of(g.name, g.members) for g in policy.groups}
    try:
        return parse_retention(retention_file.read_bytes(), groups=groups)
    except OSError as exc:
        raise StanzaGuardError(f"cannot read {retention_file}: {exc.strerror or exc}") from None
    except RetentionPolicyError as exc:
        raise StanzaGuardError(f"{retention_file}: {exc}") from None


@asynccontextmanager
async def _audited_store(
    paths: Paths, clock: Clock, store_spec: StoreSpec | None
) -> AsyncIterator[tuple[ArchiveStore, AuditLog]]:
    """The configured store (None: the data directory's SQLite) and its audit log."""
    store = await open_chosen_store(paths, store_spec)
    try:
        audit = AuditLog(store, load_or_create_signer(paths.keys), clock)
        try:
            yield store, audit
        finally:
            await audit.close()
    finally:
        await store.close()


# --- purge -------------------------------------------------------------------------------------


@dataclass
class PurgeOutcome:
    dry_run: bool
    classified: ApplyOutcome | None = None  # records that had no retention class yet
    rechecked: ApplyOutcome | None = None  # due records re-examined under the current policy
    purged: int = 0  # records purged (dry run: that would be)
    held_back: int = 0  # past expiry but under a legal hold
    batches: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)  # planned, then held or extended meanwhile


async def purge(
    paths: Paths,
    *,
    clock: Clock,
    retention: RetentionPolicy | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
    identity: Identity | None = None,
    store_spec: StoreSpec | None = None,
) -> PurgeOutcome:
    """Apply the retention policy (new records, and due records re-checked, extend-only),
    then purge what is past its expiry and under no hold, one audited batch at a time.

    `identity`: who acts (the audit log's actor); the operator at the command line unless the
    service's own retention job calls. `store_spec`: the configured store (None: the data
    directory's SQLite)."""
    identity = identity or cli_identity()
    outcome = PurgeOutcome(dry_run)
    async with _audited_store(paths, clock, store_spec) as (store, audit):
        now = clock.now()
        if retention is not None:
            outcome.classified = await apply_policy(store, retention, now=now, which="unassigned")
            outcome.rechecked = await apply_policy(store, retention, now=now, which="due")
            changed = {
                "assigned": outcome.classified.update.assigned,
                "extended": outcome.rechecked.update.extended + outcome.classified.update.extended,
            }
            if any(changed.values()):
                await audit.record(
                    identity.actor,
                    AuditAction.RETENTION_CHANGE,
                    {"as_of": now, **changed},
                    result_count=sum(changed.values()),
                )
        if dry_run:
            plan = await store.purge(now, dry_run=True, limit=PURGE_BATCH, counts=True)
            outcome.purged, outcome.held_back = plan.due or 0, plan.held_back or 0
            outcome.by_class.update(p.retention_class for p in plan.purged)
            await audit.record(
                identity.actor,
                AuditAction.PURGE,
                {"as_of": now, "dry_run": True, "held_back": plan.held_back},
                result_count=plan.due,
            )
            return outcome
        while True:
            plan = await store.purge(now, dry_run=True, limit=PURGE_BATCH)
            if not plan.purged:
                left = await store.purge(now, dry_run=True, limit=1, counts=True)
                outcome.held_back = left.held_back or 0
                return outcome
            planned = [p.record_id for p in plan.purged]
            outcome.batches += 1
            await audit.record(
                identity.actor,
                AuditAction.PURGE,
                {
                    "as_of": now,
                    "batch": outcome.batches,
                    "record_ids": planned,
                    "classes": dict(Counter(p.retention_class for p in plan.purged)),
                },
                result_count=len(planned),
            )
            done = await store.purge(now, limit=PURGE_BATCH, record_ids=planned)
            outcome.purged += len(done.purged)
            outcome.by_class.update(p.retention_class for p in done.purged)
            missed = sorted(set(planned) - {p.record_id for p in done.purged})
            if missed:
                outcome.skipped.extend(missed)
                await audit.record(
                    identity.actor,
                    AuditAction.PURGE,
                    {"as_of": now, "batch": outcome.batches, "not_purged": missed},
                    result_count=0,
                    outcome=AuditOutcome.FAILED,
                )
            if progress is not None:
                progress(outcome.purged)
            if len(missed) == len(planned):
                # Nothing moved: do not plan the same batch again.
                left = await store.purge(now, dry_run=True, limit=1, counts=True)
                outcome.held_back = left.held_back or 0
                return outcome


# --- export ------------------------------------------------------------------------------------


async def export(
    paths: Paths,
    *,
    clock: Clock,
    out: Path,
    export_format: str,
    query: str | None = None,
    hold_id: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    store_spec: StoreSpec | None = None,
) -> ExportResult:
    """Export the records of a search or of a legal hold into `out`, audited; from the
    configured store (`store_spec`; None: the data directory's SQLite)."""
    if (query is None) == (hold_id is None):
        raise StanzaGuardError("give either --query or --hold")
    try:
        fmt = ExportFormat(export_format)
    except ValueError:
        known = ", ".join(f.value for f in ExportFormat)
        raise StanzaGuardError(f"unknown format {export_format[:40]!r}; use {known}") from None
    identity = cli_identity()
    async with _audited_store(paths, clock, store_spec) as (store, audit):
        params: dict[str, object] = {"format": fmt.value, "directory": str(out)}
        try:
            if hold_id is not None:
                params["hold_id"] = hold_id
                source = ExportSource.of_hold(await HoldService(store, clock).get(hold_id))
            else:
                params["query"] = query
                source = ExportSource.of_query(query or "")
            params["source"] = source.to_json()
            result = await export_records(
                store, source, fmt, out, actor=identity.subject, clock=clock, progress=progress
            )
        except (ArchiveApiError, StoreError) as exc:
            await audit.record(
                identity.actor,
                AuditAction.EXPORT,
                {**params, "error": str(exc)[:500]},
                outcome=AuditOutcome.INVALID,
            )
            raise
        params.update(files=len(result.files), manifest_sha256=result.manifest_sha256)
        try:
            await audit.record(
                identity.actor, AuditAction.EXPORT, params, result_count=result.record_count
            )
        except ArchiveApiError:
            _remove_contents(out)  # an export nobody can account for must not stay behind
            raise
        return result


def _remove_contents(directory: Path) -> None:
    for child in directory.iterdir():
        with contextlib.suppress(OSError):
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
