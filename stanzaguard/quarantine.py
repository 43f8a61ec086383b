"""Quarantine review: release held messages, confirm spam, deliver what was released.

A QUARANTINE verdict archives the message with status ``held`` and delivers nothing. From
there, each of these appends an audited STATUS entry (status, actor, time) to the spool:

- an officer *releases* it (`release`): status ``released``; the held stanza is delivered to
  the recipient's live sessions through the proxy, each copy addressed to that session's
  full JID and stamped with a XEP-0203 ``<delay from='DOMAIN' stamp='ORIGINAL TIME'/>``.
  A recipient with no live session gets it at their next login, when their client sends its
  initial presence (where servers deliver offline messages too); until then it waits in
  ``DATA/review/pending-deliveries.json``. Every copy delivered is also recorded as an
  observation (via ``release``) of the record;
- the recipient *adds the sender* (a roster push for that JID with subscription ``to`` or
  ``both``, or ``ask='subscribe'``): every message held from that sender to that recipient
  is released the same way, with actor ``roster:RECIPIENT``;
- an officer *confirms spam* (`confirm_spam`): status ``confirmed-spam``; never delivered.

Officers' verdicts are also labelled examples and count for the sender's reputation
(`stanzaguard.learning`).

The CLI runs in another process than the service and cannot reach the service's sessions,
so every officer action goes through a durable mailbox in ``DATA/review/``: the command
writes a request file into ``requests/`` (atomically: temporary file, fsync, rename), the
running service looks every second, applies each request in order and writes its outcome
to ``done/REQUEST_ID.json`` before removing the request. A request made while the service is
stopped is applied when it starts. Applying a request twice (a crash between the STATUS
entry and the outcome file) is harmless: the second attempt finds the record released.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from xml.sax.saxutils import quoteattr

from archive_api.store.base import ArchiveStore
from archive_api.store.errors import StoreUnavailable
from archive_api.store.query import JidKind, JidPattern, Party, PartyTerm, Query, VerdictTerm
from archive_api.store.records import (
    ArchiveRecord,
    Direction,
    EntryOp,
    Observation,
    ObservationVia,
    RecordKind,
    RecordStatus,
    SpoolEntry,
)
from classifier.clock import Clock
from classifier.verdict import Action
from proxy.errors import SpoolUnavailable
from proxy.hook import Decision, SessionInfo, StanzaHook
from proxy.indexer import IndexControl
from proxy.metrics import SHARED_REVIEW
from proxy.pipeline import SpoolWriter
from proxy.redis_state import (
    RedisReviewBus,
    SharedDelivery,
    SharedReviewRequest,
    SharedStateUnavailable,
)
from proxy.stanza import RosterEvent
from proxy.stream import Element
from proxy.trust import adds_contact
from stanzaguard.errors import StanzaGuardError
from stanzaguard.learning import Label, Learning

if TYPE_CHECKING:
    from proxy.c2s import C2SProxy, ClientSession

log = logging.getLogger(__name__)

DELAY_NS = "urn:xmpp:delay"
MAX_ACTOR_CHARS = 200
ROSTER_ACTOR_PREFIX = "roster:"
#: The delivery mark of a released message a local user sent: it goes to the server once.
SERVER_DESTINATION = "@server"
_PAGE = 500

_RECORD_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")
_REQUEST_ID = re.compile(r"[0-9a-f]{16}")

# Inside a start tag '>' can only appear within a quoted attribute value.
_START_TAG = re.compile(rb"""<message\b(?:[^'">]|"[^"]*"|'[^']*')*>""")
_TO_ATTR = re.compile(rb"""\sto\s*=\s*(?:"[^"]*"|'[^']*')""")
_END_TAG = re.compile(rb"</(?:[A-Za-z_][\w.-]*:)?message\s*>\s*$")


class RequestKind(StrEnum):
    RELEASE = "release"
    CONFIRM_SPAM = "confirm-spam"
    LABEL_SPAM = "label-spam"
    LABEL_HAM = "label-ham"


@dataclass(frozen=True, slots=True)
class Request:
    """One officer action waiting for the service."""

    request_id: str
    kind: RequestKind
    record_id: str
    actor: str
    requested_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "kind": self.kind.value,
            "record_id": self.record_id,
            "actor": self.actor,
            "requested_at": self.requested_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Request:
        return cls(
            request_id=str(data["request_id"]),
            kind=RequestKind(data["kind"]),
            record_id=str(data["record_id"]),
            actor=str(data["actor"]),
            requested_at=datetime.fromisoformat(data["requested_at"]),
        )

    @classmethod
    def new(cls, kind: RequestKind, record_id: str, actor: str) -> Request:
        """A fresh request, its record id and actor checked."""
        record_id = record_id.strip()
        if not _RECORD_ID.fullmatch(record_id):
            raise StanzaGuardError(f"not a record id: {record_id[:60]!r}")
        return cls(
            request_id=secrets.token_hex(8),
            kind=kind,
            record_id=record_id,
            actor=check_actor(actor),
            requested_at=datetime.now(UTC),
        )

    @classmethod
    def parse(cls, raw: bytes) -> Request:
        """A request from a shared queue (anyone who can write there wrote it).

        Raises:
            StanzaGuardError: for anything but a well-formed request.
        """
        try:
            request = cls.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise StanzaGuardError("unreadable review request") from None
        if not _REQUEST_ID.fullmatch(request.request_id):
            raise StanzaGuardError("unreadable review request: bad request id")
        if not _RECORD_ID.fullmatch(request.record_id):
            raise StanzaGuardError("unreadable review request: bad record id")
        check_actor(request.actor)
        return request


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a request (or of a direct call).

    ``ok`` is False when the request was refused (unknown record, not held...); ``status`` is
    the record's status afterwards; ``delivered_to`` the full JIDs a released copy went to
    now (empty when it waits for the recipient's next login).
    """

    ok: bool
    detail: str
    record_id: str
    status: RecordStatus | None = None
    delivered_to: tuple[str, ...] = ()
    pending: bool = False
    request_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "detail": self.detail,
            "record_id": self.record_id,
            "status": self.status.value if self.status is not None else None,
            "delivered_to": list(self.delivered_to),
            "pending": self.pending,
            "request_id": self.request_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        status = data.get("status")
        return cls(
            ok=bool(data["ok"]),
            detail=str(data.get("detail", "")),
            record_id=str(data.get("record_id", "")),
            status=RecordStatus(status) if status else None,
            delivered_to=tuple(data.get("delivered_to", ())),
            pending=bool(data.get("pending", False)),
            request_id=data.get("request_id"),
        )


def check_actor(actor: str) -> str:
    actor = actor.strip()
    if not actor:
        raise StanzaGuardError("--actor: say who you are (it goes into the audit trail)")
    if len(actor) > MAX_ACTOR_CHARS or any(ord(ch) < 32 for ch in actor):
        raise StanzaGuardError(f"--actor: at most {MAX_ACTOR_CHARS} printable characters")
    return actor


# --- durable files -------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _dump(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, sort_keys=True, indent=1).encode()


@dataclass(frozen=True, slots=True)
class ReviewPaths:
    """Where review state lives: ``DATA/review``."""

    root: Path

    @classmethod
    def of(cls, data_dir: Path) -> ReviewPaths:
        return cls(data_dir / "review")

    @property
    def requests(self) -> Path:
        return self.root / "requests"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def pending_deliveries(self) -> Path:
        return self.root / "pending-deliveries.json"


class RequestQueue:
    """The mailbox between officers' commands and the running service."""

    def __init__(self, paths: ReviewPaths) -> None:
        self.paths = paths

    def submit(self, kind: RequestKind, record_id: str, actor: str) -> Request:
        request = Request.new(kind, record_id, actor)
        stamp = time.time_ns()
        name = f"{stamp:020d}-{request.request_id}.json"
        _write_atomic(self.paths.requests / name, _dump(request.to_json()))
        return request

    def pending(self) -> list[tuple[Path, Request | None]]:
        """Waiting requests in the order they were made (None: an unreadable file)."""
        try:
            names = sorted(
                n
                for n in os.listdir(self.paths.requests)
                if n.endswith(".json") and not n.startswith(".")
            )
        except FileNotFoundError:
            return []
        out: list[tuple[Path, Request | None]] = []
        for name in names:
            path = self.paths.requests / name
            try:
                out.append((path, Request.from_json(json.loads(path.read_bytes()))))
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError, OSError):
                out.append((path, None))
        return out

    def finish(self, path: Path, outcome: Outcome) -> None:
        if outcome.request_id is not None:
            _write_atomic(self.paths.done / f"{outcome.request_id}.json", _dump(outcome.to_json()))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def outcome(self, request_id: str) -> Outcome | None:
        try:
            return Outcome.from_json(
                json.loads((self.paths.done / f"{request_id}.json").read_bytes())
            )
        except FileNotFoundError:
            return None

    def wait(self, request_id: str, timeout: float, interval: float = 0.2) -> Outcome | None:
        """The outcome once the service has applied the request (None: not within timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.outcome(request_id)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(interval)


class ReviewQueueUnavailable(StanzaGuardError):
    """The queue between officers and the service (files or Redis) cannot take a request."""


class ReviewChannel(Protocol):
    """How an officer's request reaches the service that applies it, and its outcome back."""

    async def submit(self, kind: RequestKind, record_id: str, actor: str) -> Request: ...

    async def wait(self, request_id: str, within: float) -> Outcome | None: ...

    async def close(self) -> None: ...


class FileChannel:
    """Requests through the mailbox in DATA/review (one machine: the proxy reads it)."""

    def __init__(self, data_dir: Path) -> None:
        self.queue = RequestQueue(ReviewPaths.of(data_dir))

    async def submit(self, kind: RequestKind, record_id: str, actor: str) -> Request:
        try:
            return await asyncio.to_thread(self.queue.submit, kind, record_id, actor)
        except OSError as exc:
            raise ReviewQueueUnavailable(f"the review mailbox is unavailable: {exc}") from None

    async def wait(self, request_id: str, within: float) -> Outcome | None:
        try:
            return await asyncio.to_thread(self.queue.wait, request_id, within)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReviewQueueUnavailable(f"the review mailbox is unavailable: {exc}") from None

    async def close(self) -> None:
        return None


class RedisChannel:
    """Requests through the replicas' shared stream in Redis (review_queue = "redis"): any
    proxy replica applies each one, wherever the API or the command runs."""

    def __init__(self, bus: RedisReviewBus, *, interval: float = 0.1) -> None:
        self.bus = bus
        self.interval = interval

    async def close(self) -> None:
        await self.bus.close()

    async def submit(self, kind: RequestKind, record_id: str, actor: str) -> Request:
        request = Request.new(kind, record_id, actor)
        payload = json.dumps(request.to_json(), ensure_ascii=False).encode()
        try:
            await self.bus.submit(payload)
        except SharedStateUnavailable as exc:
            raise ReviewQueueUnavailable(f"the review queue is unavailable: {exc}") from None
        return request

    async def wait(self, request_id: str, within: float) -> Outcome | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                raw = await self.bus.outcome(request_id)
            except SharedStateUnavailable as exc:
                raise ReviewQueueUnavailable(f"the review queue is unavailable: {exc}") from None
            if raw is not None:
                try:
                    return Outcome.from_json(json.loads(raw))
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise ReviewQueueUnavailable("unreadable review outcome") from None
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(self.interval)


@dataclass(slots=True)
class _Pending:
    record_id: str
    target: str  # bare JID whose next session gets it
    direction: Direction  # TO_CLIENT: into the client leg; FROM_CLIENT: to the server


class PendingDeliveries:
    """Released messages waiting for their recipient's next login (a small JSON file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._items: list[_Pending] = []
        self._targets: set[str] = set()

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            data = []
        self._items = [
            _Pending(str(d["record_id"]), str(d["target"]), Direction(d["direction"])) for d in data
        ]
        self._targets = {p.target for p in self._items}

    def _save(self) -> None:
        _write_atomic(
            self.path,
            _dump(
                [
                    {"record_id": p.record_id, "target": p.target, "direction": p.direction.value}
                    for p in self._items
                ]
            ),
        )

    def __len__(self) -> int:
        return len(self._items)

    def has(self, target: str | None) -> bool:
        return target is not None and target.lower() in self._targets

    def add(self, record_id: str, target: str, direction: Direction) -> None:
        target = target.lower()
        if any(p.record_id == record_id and p.target == target for p in self._items):
            return
        self._items.append(_Pending(record_id, target, direction))
        self._targets.add(target)
        self._save()

    def of(self, target: str) -> list[_Pending]:
        target = target.lower()
        return [p for p in self._items if p.target == target]

    def remove(self, done: Iterable[_Pending]) -> None:
        gone = {(p.record_id, p.target) for p in done}
        if not gone:
            return
        self._items = [p for p in self._items if (p.record_id, p.target) not in gone]
        self._targets = {p.target for p in self._items}
        self._save()


# --- the released stanza ---------------------------------------------------------------------


def delay_stamp(at: datetime) -> str:
    """XEP-0082 date-time in UTC with milliseconds, as XEP-0203 delays carry it."""
    at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def released_stanza(raw: bytes, *, to: str | None, domain: str, stamp: datetime) -> bytes:
    """The held stanza's original bytes, readdressed to ``to`` (when given) and delayed.

    Only the start tag's ``to`` changes and one ``<delay/>`` is added before the end tag;
    everything else (id, from, body, other payloads) stays byte for byte.

    Raises:
        StanzaGuardError: if ``raw`` is not a message stanza with an end tag.
    """
    data = raw.strip()
    start = _START_TAG.match(data)
    end = _END_TAG.search(data)
    if start is None or end is None or start.end() > end.start():
        raise StanzaGuardError("the held stanza is not a message this proxy can release")
    head = data[: start.end()]
    if to is not None:
        new_to = b" to=" + quoteattr(to).encode()
        if _TO_ATTR.search(head):
            head = _TO_ATTR.sub(lambda _: new_to, head, count=1)
        else:
            head = head[:-1] + new_to + b">"
    delay = (
        f"<delay xmlns='{DELAY_NS}' from={quoteattr(domain)} "
        f"stamp='{delay_stamp(stamp)}'>Released from quarantine</delay>"
    ).encode()
    return head + data[start.end() : end.start()] + delay + data[end.start() :]


# --- the service -------------------------------------------------------------------------------


class QuarantineService:
    """Status changes of held records and the delivery of released ones."""

    def __init__(
        self,
        data_dir: Path,
        *,
        spool: SpoolWriter,
        store: ArchiveStore,
        indexer: IndexControl | None,
        clock: Clock,
        domains: Sequence[str],
        learning: Learning | None = None,
        on_spooled: Callable[[], None] | None = None,
        poll_interval: float = 1.0,
        shared: RedisReviewBus | None = None,
        sweep_interval: float = 5.0,
        delivery_wait: float = 1.0,
    ) -> None:
        self.paths = ReviewPaths.of(data_dir)
        self.requests = RequestQueue(self.paths)
        self.pending = PendingDeliveries(self.paths.pending_deliveries)
        self.spool = spool
        self.store = store
        self.indexer = indexer
        self.clock = clock
        self.domains = tuple(sorted(domains))
        self.learning = learning
        self.on_spooled = on_spooled
        self.poll_interval = poll_interval
        self.shared = shared
        self.sweep_interval = sweep_interval
        self.delivery_wait = delivery_wait
        self.proxy: C2SProxy | None = None
        self._lock = asyncio.Lock()
        # Statuses set by this process, ahead of the store (the indexer runs behind).
        self._decided: dict[str, RecordStatus] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._shared_tasks: list[asyncio.Task[None]] = []
        # Released while Redis could not take the announcement: retried by the sweep.
        self._unannounced: list[SharedDelivery] = []
        # Sessions whose pending deliveries were already looked up in Redis.
        self._looked_up: set[str] = set()

    # -- lifecycle --

    def attach(self, proxy: C2SProxy) -> None:
        self.proxy = proxy

    async def start(self) -> None:
        await asyncio.to_thread(self.pending.load)
        self._poller = asyncio.create_task(self._poll())
        if self.shared is not None:
            self._shared_tasks = [
                asyncio.create_task(self._take_shared_requests()),
                asyncio.create_task(self._listen_announcements()),
                asyncio.create_task(self._sweep_forever()),
            ]

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for task in self._shared_tasks:
            task.cancel()
        for task in self._shared_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._shared_tasks = []
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the background work started so far (auto-releases, deliveries)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- records --

    async def _record(self, record_id: str) -> ArchiveRecord | None:
        record = await self.store.get(record_id)
        if record is None and self.indexer is not None:
            await self.indexer.drain()
            record = await self.store.get(record_id)
        return record

    def _status(self, record: ArchiveRecord) -> RecordStatus:
        return self._decided.get(record.record_id, record.status)

    async def _append(self, entries: Sequence[SpoolEntry]) -> None:
        await self.spool.append([entry.payload() for entry in entries])
        if self.on_spooled is not None:
            self.on_spooled()

    # -- officer actions --

    async def release(self, record_id: str, actor: str, *, label: bool = True) -> Outcome:
        """Release a held message: audited STATUS entry, then delivery (now or at login)."""
        actor = check_actor(actor)
        async with self._lock:
            record = await self._record(record_id)
            refused = self._refuse(record, record_id, "release")
            if refused is not None:
                return refused
            assert record is not None
            if self._status(record) == RecordStatus.RELEASED:
                return await self._already_released(record)
            before = await self._claim(record_id, RecordStatus.RELEASED)
            if before == RecordStatus.RELEASED:
                self._decided[record_id] = before
                return await self._already_released(record)
            if before is not None:
                self._decided[record_id] = before
                return Outcome(False, "confirmed spam is never delivered", record_id, before)
            try:
                done = await self._release(record, actor)
            except SpoolUnavailable:
                await self._drop_claim(record_id, RecordStatus.RELEASED)
                raise
        # Outside the lock: the replica holding the session may be this one, and it takes the
        # lock to deliver.
        outcome = done if isinstance(done, Outcome) else await self._announced(done)
        if label and self.learning is not None:
            await self.learning.officer_label(record, Label.HAM, actor)
        return outcome

    async def confirm_spam(self, record_id: str, actor: str) -> Outcome:
        """Confirm a held message as spam: audited STATUS entry; it is never delivered."""
        actor = check_actor(actor)
        async with self._lock:
            record = await self._record(record_id)
            refused = self._refuse(record, record_id, "confirm as spam")
            if refused is not None:
                return refused
            assert record is not None
            status = self._status(record)
            if status == RecordStatus.CONFIRMED_SPAM:
                return Outcome(True, "already confirmed spam", record_id, status)
            if status != RecordStatus.HELD:
                return Outcome(False, f"the message is {status.value}, not held", record_id, status)
            before = await self._claim(record_id, RecordStatus.CONFIRMED_SPAM)
            if before is not None:
                self._decided[record_id] = before
                if before == RecordStatus.CONFIRMED_SPAM:
                    return Outcome(True, "already confirmed spam", record_id, before)
                return Outcome(False, f"the message is {before.value}, not held", record_id, before)
            now = self.clock.now()
            entry = SpoolEntry(
                EntryOp.STATUS,
                record_id,
                status=RecordStatus.CONFIRMED_SPAM,
                actor=actor,
                at=now,
            )
            try:
                await self._append([entry])
            except SpoolUnavailable:
                await self._drop_claim(record_id, RecordStatus.CONFIRMED_SPAM)
                raise
            self._decided[record_id] = RecordStatus.CONFIRMED_SPAM
        if self.learning is not None:
            await self.learning.officer_label(record, Label.SPAM, actor)
        log.info("quarantine: confirmed spam", extra={"record": record_id, "actor": actor})
        return Outcome(
            True,
            "confirmed spam; it will never be delivered",
            record_id,
            RecordStatus.CONFIRMED_SPAM,
        )

    async def label(self, record_id: str, label: Label, actor: str) -> Outcome:
        """An officer labels any archived message spam or ham (a training example)."""
        actor = check_actor(actor)
        if self.learning is None:
            return Outcome(False, "learning is not enabled", record_id)
        record = await self._record(record_id)
        if record is None or record.kind is not RecordKind.MESSAGE:
            return Outcome(False, "no such message in the archive", record_id)
        await self.learning.officer_label(record, label, actor)
        return Outcome(True, f"labelled {label.value}", record_id, self._status(record))

    def _refuse(self, record: ArchiveRecord | None, record_id: str, what: str) -> Outcome | None:
        if record is None:
            return Outcome(False, "no such record in the archive", record_id)
        status = self._status(record)
        if record.kind is not RecordKind.MESSAGE or record.verdict.action is not Action.QUARANTINE:
            return Outcome(False, f"cannot {what}: the message was not quarantined", record_id)
        if status == RecordStatus.CONFIRMED_SPAM and what == "release":
            return Outcome(
                False, "confirmed spam is never delivered", record_id, RecordStatus.CONFIRMED_SPAM
            )
        if status not in (RecordStatus.HELD, RecordStatus.RELEASED, RecordStatus.CONFIRMED_SPAM):
            return Outcome(False, f"the message is {status.value}, not held", record_id, status)
        return None

    async def _claim(self, record_id: str, status: RecordStatus) -> RecordStatus | None:
        """Across replicas, the first decision on a held record wins (None: this one)."""
        if self.shared is None:
            return None
        before = await self.shared.claim_status(record_id, status.value)
        if before is None:
            return None
        try:
            return RecordStatus(before)
        except ValueError:
            log.error("quarantine: unreadable shared status", extra={"record": record_id})
            return RecordStatus.HELD  # refuse rather than guess

    async def _drop_claim(self, record_id: str, status: RecordStatus) -> None:
        if self.shared is not None:
            with contextlib.suppress(SharedStateUnavailable):
                await self.shared.drop_claim(record_id, status.value)

    async def _release(self, record: ArchiveRecord, actor: str) -> Outcome | _Announced:
        if self.shared is not None:
            return await self._release_shared(record, actor, self.shared)
        now = self.clock.now()
        record_id = record.record_id
        target, direction = _delivery_target(record)
        sessions = self._sessions(target, direction)
        entries = [
            SpoolEntry(
                EntryOp.STATUS, record_id, status=RecordStatus.RELEASED, actor=actor, at=now
            ),
            *_observations(record_id, sessions, now),
        ]
        await self._append(entries)
        self._decided[record_id] = RecordStatus.RELEASED
        log.info("quarantine: released", extra={"record": record_id, "actor": actor})
        if not sessions:
            await asyncio.to_thread(self.pending.add, record_id, target, direction)
            return _released(record_id, target, ())
        return _released(record_id, target, self._inject(record, sessions, direction))

    async def _release_shared(
        self, record: ArchiveRecord, actor: str, shared: RedisReviewBus
    ) -> Outcome | _Announced:
        """Released on one replica, delivered by whichever holds the recipient's sessions."""
        record_id = record.record_id
        entry = SpoolEntry(
            EntryOp.STATUS,
            record_id,
            status=RecordStatus.RELEASED,
            actor=actor,
            at=self.clock.now(),
        )
        await self._append([entry])
        self._decided[record_id] = RecordStatus.RELEASED
        log.info("quarantine: released", extra={"record": record_id, "actor": actor})
        delivery = _shared_delivery(record)
        try:
            await shared.add_pending(delivery)
        except SharedStateUnavailable as exc:
            log.error("quarantine: release not announced yet; retried", extra={"error": str(exc)})
            SHARED_REVIEW.labels("announce_postponed").inc()
            self._unannounced.append(delivery)
            return Outcome(
                True,
                "released; its delivery is announced to the proxies when Redis answers",
                record_id,
                RecordStatus.RELEASED,
                pending=True,
            )
        SHARED_REVIEW.labels("announced").inc()
        return _Announced(record_id, delivery.target)

    async def _announced(self, announced: _Announced) -> Outcome:
        """The outcome of an announced release, once some replica delivered it (or not)."""
        delivered = await self._delivered_within(announced.record_id, self.delivery_wait)
        return _released(announced.record_id, announced.target, delivered)

    async def _already_released(self, record: ArchiveRecord) -> Outcome:
        """A release repeated. Across replicas, a delivery that was lost (Redis lost its data
        before anyone delivered it: no delivery mark, no release observation) is announced
        again; otherwise nothing happens."""
        record_id = record.record_id
        shared = self.shared
        if shared is None or any(o.via is ObservationVia.RELEASE for o in record.observations):
            return Outcome(True, "already released", record_id, RecordStatus.RELEASED)
        if await shared.delivered_to(record_id):
            return Outcome(True, "already released", record_id, RecordStatus.RELEASED)
        await shared.add_pending(_shared_delivery(record))
        SHARED_REVIEW.labels("announced").inc()
        return Outcome(
            True,
            "already released, never delivered: its delivery is announced again",
            record_id,
            RecordStatus.RELEASED,
            pending=True,
        )

    async def _delivered_within(self, record_id: str, within: float) -> list[str]:
        """Where the proxies delivered a released record, waiting up to `within` seconds."""
        if self.shared is None:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                found = await self.shared.delivered_to(record_id)
            except SharedStateUnavailable:
                return []
            if found or loop.time() >= deadline:
                return [jid for jid in found if jid != SERVER_DESTINATION]
            await asyncio.sleep(0.05)

    # -- delivery --

    def _sessions(self, target: str, direction: Direction) -> list[ClientSession]:
        if self.proxy is None or not target:
            return []
        sessions = [
            s
            for s in self.proxy.sessions_of(target)
            if s.info.bound_jid and not s.client.closed and s.server is not None
        ]
        sessions.sort(key=lambda s: s.info.bound_jid or "")
        if direction == Direction.FROM_CLIENT:
            return sessions[:1]  # an outgoing message goes to the server once
        return sessions

    def _inject(
        self, record: ArchiveRecord, sessions: Sequence[ClientSession], direction: Direction
    ) -> list[str]:
        delivered: list[str] = []
        domain = self._domain_for(record)
        for session in sessions:
            to = session.info.bound_jid if direction == Direction.TO_CLIENT else None
            try:
                data = released_stanza(record.raw, to=to, domain=domain, stamp=record.occurred_at)
            except StanzaGuardError:
                log.error("quarantine: held stanza unreadable", extra={"record": record.record_id})
                return delivered
            session.deliver(direction, data)
            delivered.append(session.info.bound_jid or "")
        return delivered

    def _domain_for(self, record: ArchiveRecord) -> str:
        local = record.recipient if record.direction == Direction.TO_CLIENT else record.sender
        domain = local.rpartition("@")[2]
        if domain in self.domains or not self.domains:
            return domain
        return self.domains[0]

    def may_have_pending(self, bare_jid: str | None, full_jid: str | None) -> bool:
        """Whether a session's initial presence should look for released messages."""
        if self.pending.has(bare_jid):
            return True
        return self.shared is not None and full_jid is not None and full_jid not in self._looked_up

    def session_ready(self, info: SessionInfo) -> None:
        """The client sent its initial presence: deliver what was released for it."""
        if self.pending.has(info.bare_jid):
            self._spawn(self._deliver_pending(info))
        if self.shared is not None and info.bound_jid and info.bound_jid not in self._looked_up:
            self._looked_up.add(info.bound_jid)
            self._spawn(self._deliver_shared_at_login(info))

    def session_gone(self, info: SessionInfo) -> None:
        if info.bound_jid is not None:
            self._looked_up.discard(info.bound_jid)

    async def _deliver_pending(self, info: SessionInfo) -> None:
        bare = info.bare_jid
        if bare is None or self.proxy is None:
            return
        session = next((s for s in self.proxy.sessions_of(bare) if s.info is info), None)
        if session is None:
            return
        async with self._lock:
            waiting = self.pending.of(bare)
            done: list[_Pending] = []
            for item in waiting:
                record = await self._record(item.record_id)
                if record is None or self._status(record) != RecordStatus.RELEASED:
                    done.append(item)  # gone or no longer releasable: nothing to deliver
                    continue
                now = self.clock.now()
                try:
                    await self._append(_observations(item.record_id, [session], now))
                except SpoolUnavailable:
                    log.error("quarantine: spool unavailable; delivery postponed")
                    break
                self._inject(record, [session], item.direction)
                done.append(item)
            await asyncio.to_thread(self.pending.remove, done)

    # -- deliveries across replicas (review_queue = "redis") --

    async def _deliver_shared_at_login(self, info: SessionInfo) -> None:
        if self.shared is None or info.bare_jid is None:
            return
        try:
            waiting = await self.shared.pending_for(info.bare_jid.lower())
        except SharedStateUnavailable as exc:
            log.warning("quarantine: pending deliveries unavailable", extra={"error": str(exc)})
            self.session_gone(info)  # looked up again at the next presence or sweep
            return
        for delivery in waiting:
            await self.deliver_shared(delivery, only=info)

    async def deliver_shared(
        self, delivery: SharedDelivery, *, only: SessionInfo | None = None
    ) -> list[str]:
        """Deliver an announced release to this replica's live sessions of its target (or to
        `only`); each session gets it once, whichever replica got there first."""
        shared = self.shared
        if shared is None or self.proxy is None:
            return []
        try:
            direction = Direction(delivery.direction)
        except ValueError:
            log.error("quarantine: bad delivery direction", extra={"record": delivery.record_id})
            return []
        sessions = self._sessions(delivery.target, Direction.TO_CLIENT)  # every live one
        if only is not None:
            sessions = [s for s in sessions if s.info is only]
        if direction == Direction.FROM_CLIENT:
            sessions = sessions[:1]  # an outgoing message goes to the server once
        if not sessions:
            return []
        async with self._lock:
            record = await self._record(delivery.record_id)
            if record is None:  # not indexed here yet: the sweep or the next login tries again
                log.warning(
                    "quarantine: announced release not in the archive yet",
                    extra={"record": delivery.record_id},
                )
                return []
            if (
                record.kind is not RecordKind.MESSAGE
                or record.verdict.action is not Action.QUARANTINE
                or self._status(record) == RecordStatus.CONFIRMED_SPAM
            ):
                log.error(
                    "quarantine: announced release not deliverable",
                    extra={"record": delivery.record_id},
                )
                await shared.remove_pending(delivery)
                return []
            claimed: list[tuple[ClientSession, str]] = []
            for session in sessions:
                destination = (
                    SERVER_DESTINATION
                    if direction == Direction.FROM_CLIENT
                    else session.info.bound_jid or ""
                )
                if await shared.claim_delivery(record.record_id, destination):
                    claimed.append((session, destination))
            if not claimed:
                return []
            chosen = [session for session, _ in claimed]
            try:
                await self._append(_observations(record.record_id, chosen, self.clock.now()))
            except SpoolUnavailable:
                # Not delivered after all: the sessions may get it from the next attempt.
                await shared.drop_delivery_claims(record.record_id, [d for _, d in claimed])
                raise
            delivered = self._inject(record, chosen, direction)
            await shared.remove_pending(delivery)
        SHARED_REVIEW.labels("delivered").inc(len(delivered))
        log.info(
            "quarantine: released message delivered",
            extra={"record": record.record_id, "sessions": len(delivered)},
        )
        return delivered

    def _live_here(self, target: str) -> bool:
        return bool(self._sessions(target, Direction.TO_CLIENT))

    async def sweep(self) -> int:
        """Announce what Redis could not take before, and deliver every pending release whose
        target has a live session here (announcements missed while unsubscribed)."""
        shared = self.shared
        if shared is None:
            return 0
        while self._unannounced:
            await shared.add_pending(self._unannounced[0])
            self._unannounced.pop(0)
        delivered = 0
        for target in sorted(await shared.pending_targets()):
            if not self._live_here(target):
                continue
            for delivery in await shared.pending_for(target):
                delivered += len(await self.deliver_shared(delivery))
        return delivered

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except (SharedStateUnavailable, SpoolUnavailable) as exc:
                log.warning("quarantine: delivery sweep failed", extra={"error": str(exc)})
            except Exception:
                log.exception("quarantine: delivery sweep failed")

    async def _listen_announcements(self) -> None:
        shared = self.shared
        assert shared is not None
        while True:
            try:
                pubsub = await shared.announcements()
            except SharedStateUnavailable as exc:
                log.warning("quarantine: delivery channel unavailable", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
                continue
            try:
                with contextlib.suppress(SharedStateUnavailable, SpoolUnavailable):
                    await self.sweep()  # what was announced while not subscribed
                while True:
                    raw = await shared.next_announcement(pubsub, 1.0)
                    if raw is None:
                        continue
                    try:
                        delivery = SharedDelivery.from_json(raw)
                    except SharedStateUnavailable:
                        log.error("quarantine: unreadable delivery announcement ignored")
                        continue
                    if self._live_here(delivery.target):
                        self._spawn(self._deliver_announced(delivery))
            except SharedStateUnavailable as exc:
                log.warning("quarantine: delivery channel lost", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
            finally:
                await shared.close_announcements(pubsub)

    async def _deliver_announced(self, delivery: SharedDelivery) -> None:
        try:
            await self.deliver_shared(delivery)
        except (SharedStateUnavailable, SpoolUnavailable) as exc:
            log.warning("quarantine: delivery postponed to the sweep", extra={"error": str(exc)})

    async def _take_shared_requests(self) -> None:
        shared = self.shared
        assert shared is not None
        while True:
            try:
                batch = await shared.take(block=self.poll_interval)
            except SharedStateUnavailable as exc:
                log.warning("quarantine: review queue unavailable", extra={"error": str(exc)})
                await asyncio.sleep(self.poll_interval)
                continue
            try:
                await self.apply_shared(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("quarantine: applying shared requests failed; retrying")
                await asyncio.sleep(self.poll_interval)

    async def apply_shared(self, batch: Sequence[SharedReviewRequest]) -> int:
        """Apply requests read from the shared queue; return how many were finished. One
        that cannot be applied now (spool or Redis unavailable) stays unacknowledged and is
        taken again later, by this replica or another."""
        shared = self.shared
        if shared is None or not batch:
            return 0
        if self.indexer is not None:
            await self.indexer.drain()
        finished = 0
        for item in batch:
            try:
                request = Request.parse(item.payload)
            except StanzaGuardError as exc:
                log.error("quarantine: %s; removed", exc)
                await shared.finish(item.entry_id, None, b"")
                SHARED_REVIEW.labels("request_dropped").inc()
                finished += 1
                continue
            try:
                outcome = await self.apply(request)
            except (SpoolUnavailable, SharedStateUnavailable, StoreUnavailable) as exc:
                log.error("quarantine: request postponed", extra={"error": str(exc)})
                SHARED_REVIEW.labels("request_postponed").inc()
                break
            except StanzaGuardError as exc:
                outcome = Outcome(False, str(exc), request.record_id)
            except Exception:
                # Answered, not retried: a request that keeps failing must not come back
                # every claim interval for ever. The officer sees the failure and may retry.
                log.exception("quarantine: request failed", extra={"record": request.record_id})
                outcome = Outcome(
                    False, "the request failed; see the proxy's log", request.record_id
                )
            answer = dataclasses.replace(outcome, request_id=request.request_id)
            payload = json.dumps(answer.to_json(), ensure_ascii=False).encode()
            await shared.finish(item.entry_id, request.request_id, payload)
            SHARED_REVIEW.labels("request_applied").inc()
            finished += 1
        return finished

    # -- the recipient adds the sender --

    def roster_seen(self, owner: str, event: RosterEvent) -> None:
        """A roster push adding a contact releases what was held from that contact."""
        if not event.is_push:
            return
        for entry in event.items:
            if adds_contact(entry):
                self._spawn(self.release_from(owner, entry.jid))

    async def release_from(self, owner: str, contact: str) -> list[Outcome]:
        """Release every message held from ``contact`` to ``owner`` (actor ``roster:OWNER``)."""
        if self.indexer is not None:
            await self.indexer.drain()
        held = await self.held(sender=contact, recipient=owner)
        outcomes = []
        for record in held:
            try:
                outcomes.append(
                    await self.release(
                        record.record_id, ROSTER_ACTOR_PREFIX + owner.lower(), label=False
                    )
                )
            except (SpoolUnavailable, SharedStateUnavailable):
                log.error("quarantine: spool or shared state unavailable; release postponed")
                break
        return outcomes

    async def held(
        self, *, sender: str | None = None, recipient: str | None = None, limit: int = 10_000
    ) -> list[ArchiveRecord]:
        """Held messages (oldest first), optionally from one sender and/or to one recipient."""
        records = await held_records(self.store, sender=sender, recipient=recipient, limit=limit)
        return [r for r in records if self._status(r) == RecordStatus.HELD]

    # -- the mailbox --

    async def _poll(self) -> None:
        while True:
            try:
                await self.process_requests()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("quarantine: processing requests failed; retrying")
            await asyncio.sleep(self.poll_interval)

    async def process_requests(self) -> int:
        """Apply every waiting request; return how many were finished."""
        waiting = await asyncio.to_thread(self.requests.pending)
        if not waiting:
            return 0
        if self.indexer is not None:
            await self.indexer.drain()
        done: list[tuple[Path, Outcome]] = []
        for path, request in waiting:
            if request is None:
                log.error("quarantine: unreadable request %s; removed", path.name)
                done.append((path, Outcome(False, "", "")))
                continue
            try:
                outcome = await self.apply(request)
            except (SpoolUnavailable, SharedStateUnavailable):
                log.error("quarantine: spool or shared state unavailable; requests wait")
                break
            except StanzaGuardError as exc:
                outcome = Outcome(False, str(exc), request.record_id)
            outcome = Outcome(
                outcome.ok,
                outcome.detail,
                outcome.record_id,
                outcome.status,
                outcome.delivered_to,
                outcome.pending,
                request.request_id,
            )
            done.append((path, outcome))
        if done and self.indexer is not None:
            # The requester (the CLI, an API in another process) reads the store next: the
            # statuses just spooled must be in it, not a batch interval behind.
            await self.indexer.drain()
        for path, outcome in done:
            await asyncio.to_thread(self.requests.finish, path, outcome)
        return len(done)

    async def apply(self, request: Request) -> Outcome:
        match request.kind:
            case RequestKind.RELEASE:
                return await self.release(request.record_id, request.actor)
            case RequestKind.CONFIRM_SPAM:
                return await self.confirm_spam(request.record_id, request.actor)
            case RequestKind.LABEL_SPAM:
                return await self.label(request.record_id, Label.SPAM, request.actor)
            case RequestKind.LABEL_HAM:
                return await self.label(request.record_id, Label.HAM, request.actor)


@dataclass(frozen=True, slots=True)
class _Announced:
    """A release announced to the replicas; its outcome waits for their delivery marks."""

    record_id: str
    target: str


def _released(record_id: str, target: str, delivered: Sequence[str]) -> Outcome:
    """The outcome of a release: delivered to these sessions, or at the target's next login."""
    if not delivered:
        return Outcome(
            True,
            f"released; {target} has no live session: delivered at their next login",
            record_id,
            RecordStatus.RELEASED,
            pending=True,
        )
    return Outcome(
        True,
        f"released and delivered to {len(delivered)} session(s)",
        record_id,
        RecordStatus.RELEASED,
        delivered_to=tuple(delivered),
    )


def _shared_delivery(record: ArchiveRecord) -> SharedDelivery:
    """A released record's delivery as the replicas share it."""
    target, direction = _delivery_target(record)
    return SharedDelivery(record.record_id, target.lower(), direction.value)


def _delivery_target(record: ArchiveRecord) -> tuple[str, Direction]:
    """Whose session delivers a released message, and into which leg.

    A message that arrived for a local user goes into that user's client leg; one a local
    user sent (held on the way out) goes to the server through one of the sender's sessions.
    """
    if record.direction == Direction.FROM_CLIENT:
        return record.sender, Direction.FROM_CLIENT
    return record.recipient, Direction.TO_CLIENT


def _observations(
    record_id: str, sessions: Sequence[ClientSession], now: datetime
) -> list[SpoolEntry]:
    return [
        SpoolEntry(
            EntryOp.OBSERVE,
            record_id,
            observation=Observation(
                at=now,
                jid=s.info.bound_jid or "",
                via=ObservationVia.RELEASE,
                direction=Direction.TO_CLIENT,
            ),
        )
        for s in sessions
    ]


async def held_records(
    store: ArchiveStore,
    *,
    sender: str | None = None,
    recipient: str | None = None,
    limit: int = 10_000,
    include_decided: bool = False,
) -> list[ArchiveRecord]:
    """Quarantined messages in the archive, oldest first (held ones unless asked for all)."""
    terms: list[PartyTerm | VerdictTerm] = [VerdictTerm(Action.QUARANTINE)]
    if sender is not None:
        terms.append(PartyTerm(Party.FROM, JidPattern(JidKind.BARE, _bare(sender))))
    if recipient is not None:
        terms.append(PartyTerm(Party.TO, JidPattern(JidKind.BARE, _bare(recipient))))
    query = Query.of(*terms)
    out: list[ArchiveRecord] = []
    cursor: str | None = None
    while len(out) < limit:
        page = await store.search(query, limit=_PAGE, cursor=cursor, sort="time_asc")
        for hit in page.hits:
            record = hit.record
            if record.kind is not RecordKind.MESSAGE:
                continue
            if include_decided or record.status == RecordStatus.HELD:
                out.append(record)
        cursor = page.next_cursor
        if cursor is None:
            break
    return out[:limit]


def _bare(jid: str) -> str:
    return jid.split("/", 1)[0].lower()


# --- the hook around the pipeline --------------------------------------------------------------


class DeliveryHook:
    """The pipeline, plus one watch: a client's initial presence triggers pending deliveries.

    Servers deliver offline messages when the client announces itself (initial presence), not
    at bind, when the client has not even read its JID yet; released messages follow suit.
    """

    def __init__(self, inner: StanzaHook, quarantine: QuarantineService) -> None:
        self.inner = inner
        self.quarantine = quarantine

    async def process(
        self, session: SessionInfo, direction: Direction, stanzas: Sequence[Element]
    ) -> Sequence[Decision]:
        decisions = await self.inner.process(session, direction, stanzas)
        quarantine = self.quarantine
        if direction == Direction.FROM_CLIENT and quarantine.may_have_pending(
            session.bare_jid, session.bound_jid
        ):
            for element in stanzas:
                attrs = element.attrs
                if element.name == "presence" and "to" not in attrs and "type" not in attrs:
                    self.quarantine.session_ready(session)
                    break
        return decisions

    async def session_bound(self, session: SessionInfo) -> None:
        await self.inner.session_bound(session)

    async def session_ended(self, session: SessionInfo) -> None:
        self.quarantine.session_gone(session)
        await self.inner.session_ended(session)


# --- entry points for code holding a running service -------------------------------------------


class _HasQuarantine(Protocol):
    @property
    def quarantine(self) -> QuarantineService | None: ...


def _of(service: _HasQuarantine) -> QuarantineService:
    if service.quarantine is None:
        raise StanzaGuardError("the service is not started")
    return service.quarantine


async def release(service: _HasQuarantine, record_id: str, actor: str) -> Outcome:
    """Release a held message of a running service (see `QuarantineService.release`)."""
    return await _of(service).release(record_id, actor)


async def confirm_spam(service: _HasQuarantine, record_id: str, actor: str) -> Outcome:
    """Confirm a held message of a running service as spam; it is never delivered."""
    return await _of(service).confirm_spam(record_id, actor)
