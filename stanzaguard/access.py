"""API tokens and the audit log from the command line: `stanzaguard token ...`, `verify --audit`.

Composition only: opens the configured store (the data directory's SQLite file, or
Elasticsearch when the settings say `store = "elasticsearch"`), builds the `AuditLog` with the
data directory's checkpoint signing key and the system clock, and acts as the local operator.
Whoever runs the command on the server can read the store and the signing key anyway, so the
command acts with the admin role, under the audited name ``cli:<unix user>``.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from archive_api.audit import AuditLog
from archive_api.auth import AuthMethod, Identity, IssuedToken, Role, TokenService
from archive_api.store.audit import AuditVerifyReport
from archive_api.store.base import ArchiveStore
from archive_api.store.sqlite import SqliteStore
from archive_api.store.tokens import StoredToken
from stanzaguard.clock import SystemClock
from stanzaguard.errors import StanzaGuardError
from stanzaguard.keys import load_or_create_signer
from stanzaguard.operations import Paths, open_chosen_store, public_key
from stanzaguard.stores import SqliteSpec, StoreSpec, open_store_spec


def cli_identity() -> Identity:
    """The operator running this command, named by the unix account (not $USER, which lies)."""
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return Identity(f"cli:{user}", f"{user} (command line)", Role.ADMIN, AuthMethod.CLI)


async def _open_store(paths: Paths, store_spec: StoreSpec | None) -> ArchiveStore:
    """The configured store; the data directory's SQLite file is created if the directory
    exists but has no archive yet (a token may be made before the service first ran)."""
    if not paths.data_dir.is_dir():
        raise StanzaGuardError(f"no data directory at {paths.data_dir} (is --data-dir right?)")
    if store_spec is None or (
        isinstance(store_spec, SqliteSpec) and store_spec.path == paths.store
    ):
        return await SqliteStore.open(paths.store)
    return await open_store_spec(store_spec, create=False)


@asynccontextmanager
async def token_service(
    paths: Paths, store_spec: StoreSpec | None = None
) -> AsyncIterator[TokenService]:
    """A TokenService on the configured store (`store_spec`; None: the data directory's
    SQLite); the audit head is signed, with the data directory's key, on the way out."""
    store = await _open_store(paths, store_spec)
    try:
        clock = SystemClock()
        audit = AuditLog(store, load_or_create_signer(paths.keys), clock)
        try:
            yield TokenService(store, audit, clock)
        finally:
            await audit.close()
    finally:
        await store.close()


async def create_token(
    paths: Paths,
    *,
    name: str,
    role: Role,
    expires_days: int | None,
    store_spec: StoreSpec | None = None,
) -> IssuedToken:
    expires_in = timedelta(days=expires_days) if expires_days is not None else None
    async with token_service(paths, store_spec) as tokens:
        return await tokens.create(cli_identity(), name=name, role=role, expires_in=expires_in)


async def list_tokens(paths: Paths, store_spec: StoreSpec | None = None) -> tuple[StoredToken, ...]:
    store = await open_chosen_store(paths, store_spec)
    try:
        return await store.tokens()
    finally:
        await store.close()


async def revoke_token(paths: Paths, name: str, store_spec: StoreSpec | None = None) -> StoredToken:
    async with token_service(paths, store_spec) as tokens:
        return await tokens.revoke(cli_identity(), name)


@dataclass(frozen=True, slots=True)
class AuditVerification:
    report: AuditVerifyReport
    key_found: bool  # False: no public key in DATA/keys, so signatures were not checked


async def verify_audit(paths: Paths, store_spec: StoreSpec | None = None) -> AuditVerification:
    key = public_key(paths)
    store = await open_chosen_store(paths, store_spec)
    try:
        return AuditVerification(await store.verify_audit(public_key=key), key is not None)
    finally:
        await store.close()
