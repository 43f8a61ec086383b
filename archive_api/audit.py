"""The audit log as the service uses it: `await audit.record(actor, action, params, ...)`.

Every search, view, export, hold, release, label, policy change, purge and token change is
recorded here *before* its result goes out: if `record` raises `AuditError`, the route
must fail the request rather than answer unaudited.

`AuditLog` wraps an `AuditStore` (any `ArchiveStore`), a clock and the checkpoint signer:

- times come from the injected clock; the store gives each event its seq and links it to
  the one before under its own write lock, so several processes (the service, a CLI
  command) can append to one log without forking it;
- concurrent `record` calls share one durable write (group commit): each returns once its
  event is on disk, and a burst of N requests costs about one fsync instead of N;
- the head is signed (Ed25519, chain name `audit`) whenever an event's seq is a multiple
  of `checkpoint_every`, on `checkpoint()` and on `close()`;
- parameters are made JSON-safe first (enums, datetimes, lone surrogates, NaN), and
  parameters too big to keep (over `MAX_RECORDED_PARAMS_BYTES`) are replaced by their size
  and SHA-256, so a hostile request can neither bloat the log nor escape it.

The record format, hashing and verification live in `archive_api.store.audit`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import Enum, StrEnum
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive_api.errors import AuditError
from archive_api.store.audit import (
    AUDIT_CHAIN,
    MAX_APPEND_BATCH,
    AuditEntry,
    AuditEvent,
    AuditFilter,
    AuditPage,
    AuditVerifyReport,
    canonical_params,
    check_entry,
)
from archive_api.store.base import AuditStore
from archive_api.store.chain import Checkpoint, CheckpointSigner
from archive_api.store.errors import StoreError
from classifier.clock import Clock

log = logging.getLogger(__name__)

MAX_RECORDED_PARAMS_BYTES: Final = 16 * 1024
MAX_PARAMS_DEPTH: Final = 32
DEFAULT_CHECKPOINT_EVERY: Final = 100


class AuditAction(StrEnum):
    """What was done. Stored as its value; new actions may be added, never renamed."""

    SEARCH = "search"
    VIEW = "view"  # one message
    CONVERSATION = "conversation"  # a 1:1 pair or a room over a time window
    EXPORT = "export"
    HOLD = "hold"  # a legal hold placed
    HOLD_RELEASE = "hold-release"
    RELEASE = "release"  # a quarantined message released
    CONFIRM_SPAM = "confirm-spam"
    NOT_SPAM = "not-spam"
    LABEL = "label"
    POLICY_CHANGE = "policy-change"
    RETENTION_CHANGE = "retention-change"
    PURGE = "purge"
    TOKEN_CREATE = "token-create"  # noqa: S105 (an action name, not a secret)
    TOKEN_REVOKE = "token-revoke"  # noqa: S105
    LOGIN = "login"
    LOGOUT = "logout"
    AUDIT_READ = "audit-read"
    AUDIT_VERIFY = "audit-verify"
    RTBL_READ = "rtbl-read"  # the published block list's entries, with their JIDs
    RTBL_DECIDE = "rtbl-decide"  # an entry approved, rejected, added or retracted


class AuditOutcome(StrEnum):
    OK = "ok"
    DENIED = "denied"  # authenticated, but the role does not allow it; or sign-in refused
    INVALID = "invalid"  # the request itself was bad (4xx)
    FAILED = "failed"  # it could not be done (5xx)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acted, as the audit log names them.

    `name` is an identity's stable subject (`token:ci-export`, `cli:root`, later
    `oidc:...`); `role` the role they acted in, None when they had none (a refused sign-in).
    `archive_api.auth.Identity.actor` makes one from a signed-in identity.
    """

    name: str
    role: str | None = None


ANONYMOUS: Final = Actor("anonymous")


def audit_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """`params` as a JSON-safe dict, or a summary (size, SHA-256, keys) when too large.

    Enums become their values, datetimes and dates ISO 8601 text, tuples lists, non-finite
    floats text, non-string keys text, and lone surrogates U+FFFD. Raises AuditError for a
    value that has no JSON form (a programming error in the caller) or nesting deeper than
    MAX_PARAMS_DEPTH.
    """
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise AuditError(f"audit parameters must be a mapping, not {type(params).__name__}")
    plain = _plain(params, 0)
    assert isinstance(plain, dict)
    text = canonical_params(plain).encode()
    if len(text) <= MAX_RECORDED_PARAMS_BYTES:
        return plain
    return {
        "oversized": {
            "bytes": len(text),
            "sha256": hashlib.sha256(text).hexdigest(),
            "keys": sorted(plain)[:50],
        }
    }


def _text(value: str) -> str:
    try:
        value.encode()
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in value)
    return value


def _plain(value: Any, depth: int) -> Any:
    if depth > MAX_PARAMS_DEPTH:
        raise AuditError(f"audit parameters nested deeper than {MAX_PARAMS_DEPTH} levels")
    if isinstance(value, Enum):
        value = value.value
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {
            _text(key) if isinstance(key, str) else str(_plain(key, depth + 1)): _plain(
                item, depth + 1
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_plain(item, depth + 1) for item in value]
    raise AuditError(f"audit parameter of type {type(value).__name__} has no JSON form")


class AuditLog:
    """Records audit events durably, in one unbroken chain, and signs its head."""

    def __init__(
        self,
        store: AuditStore,
        signer: CheckpointSigner,
        clock: Clock,
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self._store = store
        self._signer = signer
        self._clock = clock
        self._every = checkpoint_every
        self._pending: list[tuple[AuditEntry, asyncio.Future[AuditEvent]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._signer.public_key

    async def record(
        self,
        actor: Actor,
        action: AuditAction,
        params: Mapping[str, Any] | None = None,
        *,
        result_count: int | None = None,
        outcome: AuditOutcome = AuditOutcome.OK,
    ) -> AuditEvent:
        """Append one event and return it once it is durable.

        Raises AuditError when the event cannot be recorded (bad actor or parameters, store
        unavailable, log closed); the caller must then not carry out or answer the action.
        """
        if self._closed:
            raise AuditError("the audit log is closed")
        entry = AuditEntry(
            at=self._clock.now(),
            actor=actor.name,
            role=actor.role,
            action=AuditAction(action).value,
            params=audit_params(params),
            outcome=AuditOutcome(outcome).value,
            result_count=result_count,
        )
        try:
            check_entry(entry)  # here, so one bad event cannot fail a whole batch
        except StoreError as exc:
            raise AuditError(f"audit event refused: {exc}") from None
        future: asyncio.Future[AuditEvent] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="audit-writer")
        # A cancelled caller does not unwrite its event: it may already be in the batch.
        return await asyncio.shield(future)

    async def _write(self) -> None:
        """Drain the queue in batches: one store append (one durable commit) per batch."""
        try:
            while self._pending:
                batch = self._pending[:MAX_APPEND_BATCH]
                del self._pending[: len(batch)]
                try:
                    events = await self._store.append_audit([entry for entry, _ in batch])
                except Exception as exc:  # every caller hears of it, whatever it was
                    detail = str(exc) if isinstance(exc, StoreError) else type(exc).__name__
                    for _, future in batch:
                        if not future.done():
                            failure = AuditError(f"audit log unavailable: {detail}")
                            failure.__cause__ = exc
                            future.set_exception(failure)
                    continue
                for (_, future), event in zip(batch, events, strict=True):
                    if not future.done():
                        future.set_result(event)
                await self._sign_due(events)
        finally:
            self._writer = None

    async def _sign_due(self, events: Sequence[AuditEvent]) -> None:
        for event in events:
            if event.seq % self._every == 0:
                try:
                    await self._sign(event.seq, event.hash)
                except StoreError as exc:
                    # The events are safe; only this checkpoint is missing (verify does not
                    # require one at every multiple), so the request is not failed for it.
                    log.warning("audit checkpoint at seq %d not stored: %s", event.seq, exc)

    async def _sign(self, seq: int, head: bytes) -> Checkpoint:
        checkpoint = self._signer.sign(AUDIT_CHAIN, seq, head)
        await self._store.add_audit_checkpoint(checkpoint)
        return checkpoint

    async def flush(self) -> None:
        """Wait until every event recorded so far is written (or has failed)."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def checkpoint(self) -> Checkpoint | None:
        """Sign the current head (None when the log is empty). Signing it twice is harmless:
        Ed25519 signatures are deterministic, so the store keeps one."""
        await self.flush()
        try:
            head = await self._store.audit_head()
            if head.seq == 0:
                return None
            return await self._sign(head.seq, head.hash)
        except StoreError as exc:
            raise AuditError(f"audit checkpoint failed: {exc}") from exc

    async def close(self) -> None:
        """Refuse new events, write the pending ones and sign the head. Leaves the store open."""
        if self._closed:
            return
        self._closed = True
        await self.flush()
        await self.checkpoint()

    async def events(
        self,
        where: AuditFilter = AuditFilter(),  # noqa: B008 (frozen, so a shared default is safe)
        *,
        limit: int = 50,
        cursor: str | None = None,
        newest_first: bool = True,
    ) -> AuditPage:
        """A page of the log (see `AuditStore.audit_events`); store errors pass through."""
        return await self._store.audit_events(
            where, limit=limit, cursor=cursor, newest_first=newest_first
        )

    async def verify(self, public_key: Ed25519PublicKey | None = None) -> AuditVerifyReport:
        """Verify the whole log, checking signatures with `public_key` (default: this log's)."""
        await self.flush()
        return await self._store.verify_audit(public_key=public_key or self.public_key)
