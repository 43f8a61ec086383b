"""Composition of the search, review and audit API: settings → `ApiContext` → a served app.

- `ApiService.open(settings, clock, ...)` opens the API's own connection to the archive
  store, the audit log (signed with the archive's key), authentication, tokens, holds, the
  review actions and the policy store, and builds the FastAPI app (with the web UI's router
  when the `archive_api.web` package provides one as `router`).
- Review actions: beside a running proxy (`stanzaguard run`) they call its quarantine
  service directly (`ServiceReview`); alone (`stanzaguard api`) they go through the review
  mailbox in DATA/review that the proxy polls every second, or with review_queue = "redis"
  through the queue in Redis that every proxy replica takes requests from (`MailboxReview`).
- The policy store (`FilePolicyStore`) is the policy file the proxy already reloads on
  change, plus a versioned history in DATA/policy-history; writing a version replaces the
  file atomically, and running proxies pick it up within a second.
- `ApiServer` runs uvicorn programmatically on a socket bound here (so a taken port is an
  error we report, not a `sys.exit` inside uvicorn) and leaves signals to us.
- `serve_api` is `stanzaguard api`; `start_beside` is what `stanzaguard run` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import tomllib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import uvicorn
from fastapi import APIRouter, FastAPI
from prometheus_client import REGISTRY, CollectorRegistry

from archive_api.app import create_app
from archive_api.audit import AuditLog
from archive_api.auth import Authenticator, SessionCodec, TokenService
from archive_api.context import (
    ApiConfig,
    ApiContext,
    PolicyConflict,
    PolicyDocument,
    PolicyInvalid,
    PolicyProblem,
    PolicyVersion,
    ReviewLabel,
    ReviewOutcome,
    ReviewUnavailable,
)
from archive_api.errors import AuditError, AuthConfigError
from archive_api.holds import HoldService
from archive_api.store.base import ArchiveStore
from archive_api.store.errors import NotFound
from archive_api.store.records import ArchiveRecord
from archive_api.store.sqlite import SqliteStore
from classifier.clock import Clock
from classifier.errors import ClassifierError
from classifier.policy import MAX_POLICY_CHARS, build_chain, policy_from_dict
from classifier.verdict import Action
from proxy.errors import SpoolUnavailable
from proxy.redis_state import SharedStateUnavailable
from stanzaguard.clock import SystemClock
from stanzaguard.errors import SettingsError, StanzaGuardError
from stanzaguard.keys import load_or_create_signer
from stanzaguard.learning import Label
from stanzaguard.quarantine import (
    FileChannel,
    Outcome,
    QuarantineService,
    RedisChannel,
    RequestKind,
    ReviewChannel,
    ReviewQueueUnavailable,
)
from stanzaguard.rtbl_publishing import blocklist_routers
from stanzaguard.settings import Settings, split_host_port
from stanzaguard.stores import open_store_spec, spec_from_settings

if TYPE_CHECKING:
    from stanzaguard.wiring import ArchivingService

log = logging.getLogger(__name__)

POLICY_HISTORY_DIR: Final = "policy-history"
EXPORTS_DIR: Final = "exports"
MAILBOX_WAIT: Final = 5.0
"""Seconds a review action waits for the running proxy to apply it before answering 202."""


# --- review actions ---------------------------------------------------------------------------


def _review_outcome(outcome: Outcome, *, queued: bool = False) -> ReviewOutcome:
    return ReviewOutcome(
        ok=outcome.ok,
        detail=outcome.detail,
        record_id=outcome.record_id,
        status=outcome.status.value if outcome.status is not None else None,
        queued=queued,
        delivered_to=outcome.delivered_to,
    )


def _quarantined(record: ArchiveRecord | None) -> bool:
    return record is not None and record.verdict.action is Action.QUARANTINE


class ServiceReview:
    """Review actions applied by the quarantine service of a proxy in this process."""

    def __init__(self, quarantine: QuarantineService, store: ArchiveStore) -> None:
        self._quarantine = quarantine
        self._store = store

    async def _do(self, record_id: str, work: Awaitable[Outcome]) -> ReviewOutcome:
        try:
            outcome = await work
        except SpoolUnavailable as exc:
            raise ReviewUnavailable(f"the spool is unavailable: {exc}") from None
        except SharedStateUnavailable as exc:
            raise ReviewUnavailable(f"the replicas' shared review state: {exc}") from None
        except StanzaGuardError as exc:
            return ReviewOutcome(False, str(exc), record_id)
        return _review_outcome(outcome)

    async def release(self, record_id: str, actor: str) -> ReviewOutcome:
        return await self._do(record_id, self._quarantine.release(record_id, actor))

    async def confirm_spam(self, record_id: str, actor: str) -> ReviewOutcome:
        quarantine = self._quarantine
        if _quarantined(await self._store.get(record_id)):
            return await self._do(record_id, quarantine.confirm_spam(record_id, actor))
        return await self._do(record_id, quarantine.label(record_id, Label.SPAM, actor))

    async def not_spam(self, record_id: str, actor: str) -> ReviewOutcome:
        quarantine = self._quarantine
        if _quarantined(await self._store.get(record_id)):
            return await self._do(record_id, quarantine.release(record_id, actor))
        return await self._do(record_id, quarantine.label(record_id, Label.HAM, actor))

    async def label(self, record_id: str, label: ReviewLabel, actor: str) -> ReviewOutcome:
        work = self._quarantine.label(record_id, Label(label.value), actor)
        return await self._do(record_id, work)


def review_channel(settings: Settings) -> ReviewChannel:
    """Where officers' requests go when no proxy runs in this process: DATA/review, or the
    replicas' queue in Redis (review_queue = "redis")."""
    if settings.review_queue != "redis" or settings.redis_url is None:
        return FileChannel(settings.data_dir)
    from proxy.redis_state import RedisReviewBus, SharedStateUnavailable

    try:
        bus = RedisReviewBus.from_url(settings.redis_url.get_secret_value(), consumer="api")
    except SharedStateUnavailable as exc:
        raise SettingsError(f"redis_url: {exc}") from None
    return RedisChannel(bus)


class MailboxReview:
    """Review actions handed to the running proxies through a `ReviewChannel` (the mailbox in
    DATA/review that the `stanzaguard quarantine` commands use too, or the replicas' queue in
    Redis); answered once applied, or as queued."""

    def __init__(
        self, channel: ReviewChannel, store: ArchiveStore, *, wait: float = MAILBOX_WAIT
    ) -> None:
        self._channel = channel
        self._store = store
        self._wait = wait

    async def _submit(self, kind: RequestKind, record_id: str, actor: str) -> ReviewOutcome:
        try:
            request = await self._channel.submit(kind, record_id, actor)
            outcome = await self._channel.wait(request.request_id, self._wait)
        except ReviewQueueUnavailable as exc:
            raise ReviewUnavailable(str(exc)) from None
        except StanzaGuardError as exc:
            return ReviewOutcome(False, str(exc), record_id)
        if outcome is None:
            return ReviewOutcome(
                True,
                f"queued as request {request.request_id}: a running proxy applies it "
                "within a second of seeing it (or when it starts)",
                record_id,
                queued=True,
            )
        return _review_outcome(outcome)

    async def release(self, record_id: str, actor: str) -> ReviewOutcome:
        return await self._submit(RequestKind.RELEASE, record_id, actor)

    async def confirm_spam(self, record_id: str, actor: str) -> ReviewOutcome:
        quarantined = _quarantined(await self._store.get(record_id))
        kind = RequestKind.CONFIRM_SPAM if quarantined else RequestKind.LABEL_SPAM
        return await self._submit(kind, record_id, actor)

    async def not_spam(self, record_id: str, actor: str) -> ReviewOutcome:
        quarantined = _quarantined(await self._store.get(record_id))
        kind = RequestKind.RELEASE if quarantined else RequestKind.LABEL_HAM
        return await self._submit(kind, record_id, actor)

    async def label(self, record_id: str, label: ReviewLabel, actor: str) -> ReviewOutcome:
        kind = RequestKind.LABEL_SPAM if label is ReviewLabel.SPAM else RequestKind.LABEL_HAM
        return await self._submit(kind, record_id, actor)


# --- policy validation ------------------------------------------------------------------------

_TOML_POSITION: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_HEADER: Final = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_TOML_NAME: Final = r"""(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)"""
_KEY_LINE: Final = re.compile(rf"^\s*({_TOML_NAME}(?:\s*\.\s*{_TOML_NAME})*)\s*=")
_KEY_PART: Final = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")

KeyPath = tuple[tuple[str, int | None], ...]


def _names(dotted: str) -> list[str]:
    parts = []
    for piece in re.finditer(r"""("[^"]*"|'[^']*'|[^.\s]+)""", dotted):
        parts.append(piece.group(1).strip("\"'"))
    return parts


def _key_segments(key: str) -> KeyPath:
    out: list[tuple[str, int | None]] = []
    for match in _KEY_PART.finditer(key):
        indexes = re.findall(r"\[(\d+)\]", match.group(2))
        out.append((match.group(1), int(indexes[0]) if indexes else None))
    return tuple(out)


def _matches(line_path: KeyPath, key: KeyPath) -> int:
    """How many leading segments of `key` the line's path accounts for (0: not this one)."""
    if len(line_path) > len(key):
        return 0
    for (name, index), (want, want_index) in zip(line_path, key, strict=False):
        if name != want or (index is not None and want_index is not None and index != want_index):
            return 0
    return len(line_path)


def locate_key(text: str, key: str | None) -> tuple[int | None, int | None]:
    """Best guess of the line and column (1-based) where a dotted policy key is written."""
    if not key:
        return None, None
    wanted = _key_segments(key)
    current: KeyPath = ()
    counts: dict[tuple[str, ...], int] = {}
    best: tuple[int, int, int] | None = None  # depth, line, column
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header is not None:
            names = _names(header.group(2))
            if header.group(1) == "[[":
                index = counts.get(tuple(names), -1) + 1
                counts[tuple(names)] = index
                current = (*((n, None) for n in names[:-1]), (names[-1], index))
            else:
                current = tuple((n, None) for n in names)
            path = current
        else:
            found = _KEY_LINE.match(line)
            if found is None:
                continue
            path = (*current, *((n, None) for n in _names(found.group(1))))
        depth = _matches(path, wanted)
        if depth and (best is None or depth > best[0]):
            best = (depth, number, len(line) - len(line.lstrip()) + 1)
    return (best[1], best[2]) if best is not None else (None, None)


def policy_problems(text: str, local_domains: frozenset[str]) -> tuple[PolicyProblem, ...]:
    """Why `text` is not a policy the proxy would load (empty: it is one).

    The same steps as the proxy's own loading (proxy/policy_source.py): TOML, the served
    domains as `local_domains` when the document names none, `policy_from_dict`, and the
    rule chain built from it.
    """
    if len(text) > MAX_POLICY_CHARS:
        return (PolicyProblem(f"the policy is larger than {MAX_POLICY_CHARS} characters"),)
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        where = _TOML_POSITION.search(message)
        if where is None:
            if message.endswith("(at end of document)"):
                lines = text.split("\n")
                return (
                    PolicyProblem(
                        f"not valid TOML: {message.removesuffix('(at end of document)').strip()}"
                        " (at the end of the document)",
                        len(lines),
                        len(lines[-1]) + 1,
                    ),
                )
            return (PolicyProblem(f"not valid TOML: {message}"),)
        return (
            PolicyProblem(
                f"not valid TOML: {message[: where.start()]}",
                int(where.group(1)),
                int(where.group(2)),
            ),
        )
    except (ValueError, RecursionError) as exc:
        return (PolicyProblem(f"the policy could not be read ({type(exc).__name__})"),)
    if "local_domains" not in data:
        data["local_domains"] = sorted(local_domains)
    try:
        build_chain(policy_from_dict(data))
    except ClassifierError as exc:
        key = getattr(exc, "key", None)
        line, column = locate_key(text, key)
        return (PolicyProblem(str(exc), line, column, key),)
    except (ValueError, TypeError, RecursionError) as exc:
        return (PolicyProblem(f"the policy is not valid ({type(exc).__name__}: {exc})"),)
    return ()


# --- the policy store ---------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Write a new file beside `path`, flush it to disk, rename it over `path`, sync the
    directory: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock across processes (two API processes writing at once)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FilePolicyStore:
    """`PolicyStore` over the policy file, with every version kept in `history`:
    `v000001.toml` (the text) and `v000001.json` (who, when, sha256), the JSON written last
    so a version without it is one that was never completed."""

    def __init__(
        self,
        path: Path | None,
        history: Path,
        local_domains: frozenset[str],
        clock: Clock,
        *,
        on_written: Callable[[], object] | None = None,
    ) -> None:
        self.path = path
        self.history = history
        self.local_domains = local_domains
        self._clock = clock
        self._on_written = on_written
        self._lock = asyncio.Lock()

    def _text(self) -> str:
        if self.path is None:
            return ""
        try:
            return self.path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _versions(self) -> list[PolicyVersion]:
        out = []
        for meta in sorted(self.history.glob("v*.json")) if self.history.is_dir() else []:
            try:
                data = json.loads(meta.read_bytes())
                out.append(
                    PolicyVersion(
                        version=int(data["version"]),
                        sha256=str(data["sha256"]),
                        created_at=datetime.fromisoformat(data["created_at"]),
                        actor=str(data["actor"]),
                        size=int(data["size"]),
                        comment=data.get("comment"),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("policy history: unreadable %s; skipped", meta.name)
        return sorted(out, key=lambda v: v.version)

    def _current(self) -> PolicyDocument:
        text = self._text()
        digest = _sha256(text)
        version = next((v.version for v in reversed(self._versions()) if v.sha256 == digest), None)
        return PolicyDocument(
            text, digest, version, str(self.path) if self.path else None, self.path is not None
        )

    async def current(self) -> PolicyDocument:
        return await asyncio.to_thread(self._current)

    async def validate(self, text: str) -> tuple[PolicyProblem, ...]:
        return await asyncio.to_thread(policy_problems, text, self.local_domains)

    def _keep(self, number: int, text: str, actor: str, comment: str | None) -> PolicyVersion:
        data = text.encode("utf-8", "surrogatepass")
        version = PolicyVersion(number, _sha256(text), self._clock.now(), actor, len(data), comment)
        _write_atomic(self.history / f"v{number:06d}.toml", data)
        _write_atomic(
            self.history / f"v{number:06d}.json",
            (json.dumps(version.to_json(), ensure_ascii=False, indent=1) + "\n").encode(),
        )
        return version

    def _write(
        self, text: str, actor: str, base_version: int | None, comment: str | None
    ) -> PolicyVersion:
        assert self.path is not None
        with _locked(self.history):
            current = self._current()
            if base_version is not None and current.version != base_version:
                shown = "an unversioned edit" if current.version is None else current.version
                raise PolicyConflict(
                    f"the policy is at {shown}, not version {base_version}: someone changed "
                    "it meanwhile; reload it and edit again"
                )
            versions = self._versions()
            number = (versions[-1].version if versions else 0) + 1
            if current.version is None and current.text.strip():
                # Changed outside the API (or never versioned): keep it in the history too.
                self._keep(number, current.text, "file", "found on disk, not written by the API")
                number += 1
            version = self._keep(number, text, actor, comment)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.path, text.encode("utf-8", "surrogatepass"))
            return version

    async def write(
        self, text: str, *, actor: str, base_version: int | None = None, comment: str | None = None
    ) -> PolicyVersion:
        if self.path is None:
            raise PolicyConflict(
                "no policy file is configured (setting `policy`): the policy in force is the "
                "built-in allow-all one and cannot be edited here"
            )
        problems = await self.validate(text)
        if problems:
            raise PolicyInvalid(problems)
        async with self._lock:
            version = await asyncio.to_thread(self._write, text, actor, base_version, comment)
        if self._on_written is not None:
            self._on_written()
        return version

    async def versions(self) -> tuple[PolicyVersion, ...]:
        return tuple(await asyncio.to_thread(self._versions))

    async def version_text(self, version: int) -> str:
        path = self.history / f"v{version:06d}.toml"
        meta = self.history / f"v{version:06d}.json"
        try:
            if not meta.is_file():
                raise FileNotFoundError(meta)
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFound(f"no policy version {version}") from None
        return data.decode("utf-8", "replace")


# --- the service --------------------------------------------------------------------------------


def _web_routers() -> tuple[APIRouter, ...]:
    """The web UI's router, when the `archive_api.web` package provides one as `router`."""
    try:
        web = importlib.import_module("archive_api.web")
    except ImportError:
        return ()
    router = getattr(web, "router", None)
    return (router,) if isinstance(router, APIRouter) else ()


def api_config(settings: Settings) -> ApiConfig:
    development = settings.environment == "development"
    return ApiConfig(
        export_dir=settings.data_dir / EXPORTS_DIR,
        development=development,
        secure_cookies=not development,
        session_max_age=timedelta(seconds=settings.session_max_age),
    )


def session_codec(settings: Settings, clock: Clock) -> SessionCodec | None:
    """The UI's session signer; None (UI sign-in off, API tokens still work) when no secret
    is set outside development. A short or placeholder secret is a settings error."""
    development = settings.environment == "development"
    secret = settings.session_secret.get_secret_value() if settings.session_secret else None
    if secret is None and not development:
        log.warning("session_secret is not set: web UI sign-in is off (API tokens still work)")
        return None
    try:
        return SessionCodec.from_secret(
            secret,
            development=development,
            clock=clock,
            max_age=timedelta(seconds=settings.session_max_age),
        )
    except AuthConfigError as exc:
        raise SettingsError(str(exc)) from None


@dataclass
class ApiService:
    """The API's parts, opened from the settings; `close()` after the server stopped."""

    context: ApiContext
    app: FastAPI
    store: ArchiveStore
    # The service's own SQLite database, for what lives there even when the archive is in
    # Elasticsearch (the published block list); the archive itself when that is SQLite.
    local: SqliteStore | None = None
    channel: ReviewChannel | None = None  # officers' requests to the proxies, when it is not

    @classmethod
    async def open(
        cls,
        settings: Settings,
        clock: Clock,
        *,
        quarantine: QuarantineService | None = None,
        on_policy_written: Callable[[], object] | None = None,
        metrics: CollectorRegistry | None = None,
        routers: Sequence[APIRouter] | None = None,
    ) -> ApiService:
        data_dir = settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        sessions = session_codec(settings, clock)
        signer = load_or_create_signer(data_dir / "keys")
        # The archive the settings choose: its audit log, tokens and holds live beside it.
        store = await open_store_spec(spec_from_settings(settings, data_dir / "archive.sqlite3"))
        local: SqliteStore | None = store if isinstance(store, SqliteStore) else None
        channel: ReviewChannel | None = None
        try:
            if local is None and settings.blocklist_learning:
                local = await SqliteStore.open(data_dir / "archive.sqlite3")
            audit = AuditLog(store, signer, clock)
            review: ServiceReview | MailboxReview
            if quarantine is not None:
                review = ServiceReview(quarantine, store)
            else:
                channel = review_channel(settings)
                review = MailboxReview(channel, store)
            ctx = ApiContext(
                config=api_config(settings),
                store=store,
                audit=audit,
                authenticator=Authenticator(store, clock, sessions),
                tokens=TokenService(store, audit, clock),
                clock=clock,
                holds=HoldService(store, clock),
                review=review,
                policy=FilePolicyStore(
                    settings.policy,
                    data_dir / POLICY_HISTORY_DIR,
                    frozenset(settings.domain),
                    clock,
                    on_written=on_policy_written,
                ),
                metrics=metrics if metrics is not None else CollectorRegistry(auto_describe=True),
            )
            app = create_app(
                ctx,
                routers=(
                    # the published block list's routes (docs/rtbl-publishing.md)
                    *(blocklist_routers(settings, local, clock) if local is not None else ()),
                    *(_web_routers() if routers is None else routers),
                ),
            )
        except BaseException:
            await store.close()
            if local is not None and local is not store:
                await local.close()
            if channel is not None:
                await channel.close()
            raise
        return cls(ctx, app, store, local, channel)

    async def close(self) -> None:
        try:
            if self.context.export_jobs is not None:
                await self.context.export_jobs.close()
            await self.context.audit.close()
        except AuditError as exc:
            # The events are durable already; only the closing checkpoint is missing.
            log.warning("the audit log's head was not signed at shutdown: %s", exc)
        finally:
            await self.store.close()
            if self.local is not None and self.local is not self.store:
                await self.local.close()
            if self.channel is not None:
                await self.channel.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the composition root owns SIGINT and SIGTERM


class ApiServer:
    """uvicorn serving one app on a socket bound here; started and stopped from asyncio."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> tuple[str, int]:
        """Bind and serve; returns the bound address. OSError when the port is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        config = uvicorn.Config(
            self.app,
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=5,
            server_header=False,
            proxy_headers=False,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="api-server")
        while not self._server.started:
            if self._task.done():
                sock.close()
                self._task.result()  # raises what stopped it
                raise StanzaGuardError("the API server stopped while starting")
            await asyncio.sleep(0.02)
        bound = sock.getsockname()
        return str(bound[0]), int(bound[1])

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = self._task = None


@dataclass
class RunningApi:
    service: ApiService
    server: ApiServer
    address: tuple[str, int]

    async def stop(self) -> None:
        try:
            await self.server.stop()
        finally:
            await self.service.close()


async def start_api(
    settings: Settings,
    clock: Clock,
    listen: str,
    *,
    quarantine: QuarantineService | None = None,
    on_policy_written: Callable[[], object] | None = None,
    metrics: CollectorRegistry | None = None,
) -> RunningApi:
    """Open the API's parts and serve them on `listen` (HOST:PORT)."""
    host, port = split_host_port(listen)
    service = await ApiService.open(
        settings,
        clock,
        quarantine=quarantine,
        on_policy_written=on_policy_written,
        metrics=metrics,
    )
    server = ApiServer(service.app, host, port)
    try:
        address = await server.start()
    except OSError as exc:
        await service.close()
        raise SettingsError(
            f"api_listen: cannot listen on {listen}: {exc.strerror or exc}"
        ) from None
    except BaseException:
        await service.close()
        raise
    log.info("api listening", extra={"address": f"{address[0]}:{address[1]}"})
    return RunningApi(service, server, address)


async def start_beside(settings: Settings, service: ArchivingService) -> RunningApi | None:
    """The API beside a running proxy (`stanzaguard run`), when `api_listen` is set.

    Review actions use the proxy's quarantine service, a policy written through the API is
    loaded at once, and `/metrics` includes the proxy's own metrics. If the API cannot
    start (its port is taken) the proxy keeps running and the error is logged: every
    message passes through the proxy, while the API can be started alone later.
    """
    if settings.api_listen is None:
        return None
    watcher = service.policy_watcher
    try:
        return await start_api(
            settings,
            service.clock,
            settings.api_listen,
            quarantine=service.quarantine,
            on_policy_written=watcher.check if watcher is not None else None,
            metrics=REGISTRY,
        )
    except StanzaGuardError as exc:
        log.error("the API is not served: %s", exc)
        return None


async def serve_api(settings: Settings, listen: str, ready: asyncio.Event | None = None) -> None:
    """`stanzaguard api`: serve the API alone until SIGINT or SIGTERM."""
    running = await start_api(settings, SystemClock(), listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("stopping the API")
        await running.stop()
