"""Composition: turn the settings into running parts and connect them."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import gc
import logging
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from prometheus_client import start_http_server

from archive_api.store.base import ArchiveStore
from classifier.blocklists import BlockList
from classifier.clock import Clock
from classifier.errors import PolicyError
from classifier.limits import CounterStore
from classifier.policy import ActivePolicy, PolicyHolder
from classifier.reputation import ReputationLedger
from classifier.trust import InMemoryTrustStore
from proxy.attachments import AttachmentFetcher, FetcherConfig
from proxy.blocklist_files import (
    BlocklistFileError,
    BlocklistFileWatcher,
    ListFile,
    parse_list_file_specs,
)
from proxy.bosh import BoshConfig, BoshFrontEnd
from proxy.c2s import C2SProxy, ProxyConfig
from proxy.hook import StanzaHook
from proxy.indexer import IndexControl, Indexer
from proxy.pipeline import Pipeline, PipelineConfig
from proxy.policy_source import PolicyFileWatcher, load_policy
from proxy.rtbl import RtblConfig, RtblError, RtblSubscriber, TlsMode, rtbl_nodes
from proxy.sm import SmRegistry, SmStore, SmStoreUnavailable
from proxy.spool import Spool
from proxy.stream import FramingLimits
from proxy.trust import RosterObservers, TrustRosterObserver
from proxy.websocket import WebSocketConfig, WebSocketFrontEnd
from stanzaguard.api_wiring import start_beside
from stanzaguard.clock import SystemClock
from stanzaguard.errors import SettingsError, StanzaGuardError
from stanzaguard.event_loop import running_loop_name
from stanzaguard.index_worker import IndexWorker
from stanzaguard.keys import load_or_create_signer
from stanzaguard.learning import Learning
from stanzaguard.model_runtime import MODEL_OFF, ModelWatcher, configured_model
from stanzaguard.native import native_status
from stanzaguard.operations import Paths
from stanzaguard.quarantine import DeliveryHook, QuarantineService
from stanzaguard.registry import ModelRegistry
from stanzaguard.retention_job import RetentionJob
from stanzaguard.rtbl_publishing import RtblPublishing
from stanzaguard.settings import Settings, split_host_port
from stanzaguard.stores import open_store_spec, spec_from_settings
from stanzaguard.tls import server_context, upstream_context

if TYPE_CHECKING:
    from proxy.redis_state import PolicySync, RedisReviewBus, SharedRecentIds

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DataLayout:
    """Where things live under the data directory."""

    root: Path

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def store(self) -> Path:
        return self.root / "archive.sqlite3"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def attachments(self) -> Path:
        return self.root / "attachments"

    @property
    def examples(self) -> Path:
        return self.root / "learning" / "examples.jsonl"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def evidence(self, settings: Settings) -> Path:
        return settings.evidence_dir or self.root / "evidence"


def tune_tls_buffers(settings: Settings) -> None:
    """Shrink asyncio's TLS read buffer, allocated zero-filled for every connection.

    Python 3.11 gives each TLS connection a 256 KiB buffer (`SSLProtocol.max_size`): with
    50,000 idle clients that is 12 GiB. A TLS record is at most 16 KiB, so a 16 KiB buffer
    costs at most extra reads, never data. Measured: 326 → 86 KiB per idle connection.
    """
    asyncio.sslproto.SSLProtocol.max_size = settings.tls_buffer_bytes


def build_proxy_config(settings: Settings) -> ProxyConfig:
    if not settings.domain:
        raise SettingsError("domain: at least one domain is required (--domain)")
    if (settings.cert is None) != (settings.key is None):
        raise SettingsError("cert/key: give both a certificate and its key")
    tls = None
    if settings.cert is not None and settings.key is not None:
        tls = server_context(settings.cert, settings.key, alpn=True)
    elif not settings.allow_plaintext:
        raise SettingsError("cert/key: a certificate and key are required (--cert, --key)")
    if settings.allow_plaintext and settings.environment == "production":
        raise SettingsError("allow_plaintext: refused outside environment=development")
    host, port = split_host_port(settings.upstream)
    return ProxyConfig(
        domains=frozenset(settings.domain),
        upstream_host=host,
        upstream_port=port,
        server_tls=tls,
        upstream_tls=upstream_context(settings.upstream_ca_file) if settings.upstream_tls else None,
        allow_plaintext=settings.allow_plaintext,
        limits=FramingLimits(
            max_stanza_bytes=settings.max_stanza_bytes,
            max_depth=settings.max_depth,
            max_attributes=settings.max_attributes,
        ),
        auth_timeout=settings.auth_timeout,
        idle_timeout=settings.idle_timeout,
        stanza_timeout=settings.stanza_timeout,
        max_sessions=settings.max_sessions,
    )


def build_web_tls(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the WebSocket and BOSH listeners (None: off, or a reverse proxy terminates it)."""
    if settings.listen_websocket is None and settings.listen_bosh is None:
        return None
    if not settings.web_tls:
        return None
    if settings.cert is None or settings.key is None:
        raise SettingsError("web_tls: the web listeners need cert and key, or web_tls=false")
    return server_context(settings.cert, settings.key, alpn=False)


def build_fetcher_config(settings: Settings) -> FetcherConfig | None:
    """How upload-service attachments are fetched; None when no upload host is configured."""
    if settings.attachment_allow_http and settings.environment == "production":
        raise SettingsError("attachment_allow_http: refused outside environment=development")
    if not settings.upload_hosts:
        return None
    return FetcherConfig(
        directory=DataLayout(settings.data_dir).attachments,
        upload_hosts=frozenset(settings.upload_hosts),
        max_bytes=settings.attachment_max_bytes,
        timeout=settings.attachment_timeout,
        connect_timeout=min(10.0, settings.attachment_timeout),
        retries=settings.attachment_retries,
        allow_http=settings.attachment_allow_http,
    )


#: Passwords refused for rtbl_password outside environment=development (examples, defaults).
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "password", "secret", "stanzaguard"})


def build_rtbl_config(settings: Settings) -> RtblConfig | None:
    """The RTBL subscriber's configuration; None when no RTBL node is configured."""
    if not settings.rtbl_nodes:
        return None
    try:
        nodes = rtbl_nodes(settings.rtbl_nodes)
    except RtblError as exc:
        raise SettingsError(f"rtbl_nodes: {exc}") from None
    jid = (settings.rtbl_jid or "").strip()
    local, at, rest = jid.partition("@")
    if not at or not local or not rest or "/" in rest:
        raise SettingsError("rtbl_jid: give the RTBL account as a bare JID user@domain")
    if settings.rtbl_password is None:
        raise SettingsError("rtbl_password: required with rtbl_nodes")
    password = settings.rtbl_password.get_secret_value()
    production = settings.environment == "production"
    if production and password.strip().lower() in PLACEHOLDER_SECRETS:
        raise SettingsError(
            "rtbl_password: a default or placeholder password is refused outside "
            "environment=development"
        )
    if production and settings.rtbl_tls == "plain":
        raise SettingsError("rtbl_tls: plain is refused outside environment=development")
    host: str | None = None
    port: int | None = None
    if settings.rtbl_server:
        host, port = split_host_port(settings.rtbl_server)
    return RtblConfig(
        jid=jid,
        password=password,
        nodes=nodes,
        host=host,
        port=port,
        tls=TlsMode(settings.rtbl_tls),
        ssl_context=upstream_context(settings.rtbl_ca_file),
    )


def build_blocklist_files(settings: Settings) -> tuple[ListFile, ...]:
    try:
        return parse_list_file_specs(settings.blocklist_files)
    except BlocklistFileError as exc:
        raise SettingsError(f"blocklist_files: {exc}") from None


async def open_store(settings: Settings) -> ArchiveStore:
    """The archive store the settings choose (`store`): SQLite in the data directory, or
    Elasticsearch (`es_url`, ...; stanzaguard/stores.py)."""
    layout = DataLayout(settings.data_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    return await open_store_spec(spec_from_settings(settings, layout.store))


def build_counter_store(settings: Settings) -> CounterStore | None:
    """Rate and fan-out counters: None (the policy's own, in memory) or shared in Redis."""
    if settings.counters != "redis" or settings.redis_url is None:
        return None
    from proxy.redis_state import BufferedRedisCounters, RedisCounterStore, SharedStateUnavailable

    try:
        remote = RedisCounterStore.from_url(settings.redis_url.get_secret_value())
    except SharedStateUnavailable as exc:
        raise SettingsError(f"redis_url: {exc}") from None
    if settings.counters_flush_interval > 0:  # no round trip per counted stanza
        return BufferedRedisCounters(remote, interval=settings.counters_flush_interval)
    return remote


def build_seen_ids(settings: Settings, clock: Clock) -> SharedRecentIds | None:
    """With seen_ledger=redis: the record ids every proxy spooled, shared in Redis."""
    if settings.seen_ledger != "redis" or settings.redis_url is None:
        return None
    from proxy.pipeline import RECENT_IDS, RecentIds
    from proxy.redis_state import RedisSeenLedger, SharedRecentIds, SharedStateUnavailable

    try:
        ledger = RedisSeenLedger.from_url(
            settings.redis_url.get_secret_value(), ttl=settings.seen_ledger_ttl
        )
    except SharedStateUnavailable as exc:
        raise SettingsError(f"redis_url: {exc}") from None
    return SharedRecentIds(RecentIds(RECENT_IDS), ledger, clock=clock)


def build_review_bus(settings: Settings) -> RedisReviewBus | None:
    """With review_queue=redis: officers' requests, status claims and released-message
    deliveries shared by every proxy replica (stanzaguard/quarantine.py)."""
    if settings.review_queue != "redis" or settings.redis_url is None:
        return None
    from proxy.redis_state import RedisReviewBus, SharedStateUnavailable

    try:
        return RedisReviewBus.from_url(
            settings.redis_url.get_secret_value(), consumer=settings.chain_name
        )
    except SharedStateUnavailable as exc:
        raise SettingsError(f"redis_url: {exc}") from None


def build_sm_store(settings: Settings, clock: Clock) -> SmStore:
    """XEP-0198 states: this process's own, or shared in Redis so clients resume anywhere."""
    if settings.sm_store != "redis" or settings.redis_url is None:
        return SmRegistry(ttl=settings.sm_resume_timeout, monotonic=clock.monotonic)
    from proxy.redis_state import RedisSmStore

    try:
        return RedisSmStore.from_url(
            settings.redis_url.get_secret_value(), ttl=settings.sm_resume_timeout
        )
    except SmStoreUnavailable as exc:
        raise SettingsError(f"redis_url: {exc}") from None


async def start_policy_sync(settings: Settings, holder: PolicyHolder) -> PolicySync | None:
    """With policy_sync=redis: publish this replica's policy, follow newer shared ones."""
    if settings.policy_sync != "redis" or settings.redis_url is None:
        return None
    from proxy.redis_state import (
        PolicySync,
        RedisPolicyVersion,
        SharedPolicyInvalid,
        SharedStateUnavailable,
    )

    try:
        shared = RedisPolicyVersion.from_url(settings.redis_url.get_secret_value())
    except SharedStateUnavailable as exc:
        raise SettingsError(f"redis_url: {exc}") from None
    sync = PolicySync(shared, holder, settings.policy)
    try:
        await sync.check()
    except (SharedStateUnavailable, SharedPolicyInvalid) as exc:
        # The local policy is in force; the loop keeps trying.
        log.warning("policy sync unavailable at start-up", extra={"error": str(exc)})
    sync.start()
    return sync


async def open_spool(settings: Settings, clock: Clock) -> Spool:
    layout = DataLayout(settings.data_dir)
    signer = load_or_create_signer(layout.keys)
    try:
        return await Spool.open(
            layout.spool,
            clock=clock,
            signer=signer,
            checkpoint_every=settings.checkpoint_every,
            max_spool_bytes=settings.spool_max_bytes,
            segment_max_bytes=settings.spool_segment_bytes,
            keep_evidence=settings.keep_evidence,
            evidence_dir=layout.evidence(settings),
            chain_name=settings.chain_name,
        )
    except ValueError as exc:  # the spool's own checks of these settings (chain_name, sizes)
        raise SettingsError(str(exc)) from None


class ArchivePath(Protocol):
    """The back half `ArchivingService` and `ComponentService` share: pipeline to store.

    `start` sets these one after another, so a start that failed half-way leaves some unset.
    """

    rtbl_publishing: RtblPublishing | None
    learning: Learning | None
    indexer: IndexControl
    spool: Spool
    store: ArchiveStore


async def stop_archive_path(service: ArchivePath) -> None:
    """Stop the shared back half, after the service has stopped what feeds it.

    The publisher and learning read the store, so they go before it closes; the indexer moves
    what is spooled into the store (the in-process one is drained here once its loop stopped;
    the worker indexes what is spooled before it exits), then the spool closes, then the
    store. Parts a failed start never made are skipped.
    """
    if service.rtbl_publishing is not None:
        await service.rtbl_publishing.stop()
    if service.learning is not None:  # before the store closes: it reads reported messages
        await service.learning.stop()
    if hasattr(service, "indexer"):
        await service.indexer.stop()
        if isinstance(service.indexer, Indexer):
            with contextlib.suppress(Exception):
                await service.indexer.drain()
    if hasattr(service, "spool"):
        await service.spool.close()
    if hasattr(service, "store"):
        await service.store.close()


class ArchivingService:
    """The one-machine service: proxy → pipeline → spool → indexer → store (SQLite or
    Elasticsearch, `store`)."""

    def __init__(
        self, settings: Settings, clock: Clock | None = None, hook: StanzaHook | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        tune_tls_buffers(settings)
        self.proxy_config = build_proxy_config(settings)
        self.fetcher_config = build_fetcher_config(settings)
        self.attachments: AttachmentFetcher | None = None
        self._hook_override = hook
        self.policy_watcher: PolicyFileWatcher | None = None
        self.policy_sync: PolicySync | None = None
        self.seen_ids: SharedRecentIds | None = None
        self.counters: CounterStore | None = None
        self.retention: RetentionJob | None = None
        self.bound: list[tuple[str, int]] = []
        self._local_cache: tuple[ActivePolicy, frozenset[str]] | None = None
        # Learned state the policy's rules consult; it outlives policy reloads.
        self.trust = InMemoryTrustStore()
        self.reputation = ReputationLedger()
        self.learning: Learning | None = None
        self.quarantine: QuarantineService | None = None
        self.model_watcher: ModelWatcher | None = None
        # -- block lists fed by the edge (RTBLs, list files); the policy's rule consults them --
        self.rtbl_config = build_rtbl_config(settings)
        self.blocklist_files = build_blocklist_files(settings)
        self.blocklist: BlockList | None = None
        if self.rtbl_config is not None or self.blocklist_files:
            self.blocklist = BlockList()
        self.blocklist_watcher: BlocklistFileWatcher | None = None
        self.rtbl: RtblSubscriber | None = None
        self.websocket: WebSocketFrontEnd | None = None
        self.bosh: BoshFrontEnd | None = None
        self.web_bound: dict[str, tuple[str, int]] = {}  # "websocket"/"bosh" -> bound address
        self.web_tls = build_web_tls(settings)
        self.rtbl_publishing: RtblPublishing | None = None  # docs/rtbl-publishing.md

    async def start(self) -> None:
        settings = self.settings
        domains = frozenset(settings.domain)
        # -- text model: the configured one, or the registry's active version (swapped live) --
        model = None
        if settings.model != MODEL_OFF:
            self.model_watcher = ModelWatcher(
                ModelRegistry(DataLayout(settings.data_dir).models, self.clock),
                configured_model(settings.model),  # a model that does not load stops start-up
                self.clock,
            )
            model = self.model_watcher.initial()
        log.info("text model", extra={"model": model.model_version if model else None})
        # -- end text model --
        self.counters = build_counter_store(settings)
        try:
            self.policy = PolicyHolder(
                load_policy(settings.policy, domains),
                trust=self.trust,
                reputation=self.reputation,
                blocklists=self.blocklist,
                model=model,
                counters=self.counters,
            )
        except PolicyError as exc:
            raise SettingsError(f"policy: {exc}") from None
        if self.model_watcher is not None:
            self.model_watcher.attach(self.policy)
        if self.blocklist is not None and self.blocklist_files:
            watcher = BlocklistFileWatcher(self.blocklist_files, self.blocklist)
            try:
                watcher.load_all()  # a missing or broken list stops start-up
            except BlocklistFileError as exc:
                raise SettingsError(f"blocklist_files: {exc}") from None
            self.blocklist_watcher = watcher
        self.store = await open_store(settings)
        self.spool = await open_spool(settings, self.clock)
        self.indexer: IndexControl
        if settings.indexing == "celery":  # distributed mode (docs/distributed.md)
            from stanzaguard.celery_app import build_celery_app
            from stanzaguard.celery_indexer import CeleryIndexer

            self.indexer = CeleryIndexer(
                self.spool, build_celery_app(settings), task_timeout=settings.index_task_timeout
            )
        elif settings.index_worker:
            self.indexer = IndexWorker(
                self.spool,
                spec_from_settings(settings, DataLayout(settings.data_dir).store),
                priority=settings.index_worker_priority,
                boost_backlog=settings.index_worker_boost_backlog,
                notify_interval=settings.index_worker_batch_interval,
            )
        else:
            self.indexer = Indexer(self.spool, self.store)
        # -- attachments: fetch upload-service files of new records in the background --
        if self.fetcher_config is not None:
            self.attachments = AttachmentFetcher(
                self.fetcher_config,
                spool=self.spool,
                clock=self.clock,
                on_spooled=self.indexer.notify,
            )
            await self.attachments.start()
        # -- end attachments --
        # -- review and learning: reports become examples and reputation; held messages are
        # released (officers, the mailbox in DATA/review, the recipient adding the sender) --
        self.learning = Learning(
            DataLayout(settings.data_dir).examples,
            reputation=self.reputation,
            store=self.store,
            indexer=self.indexer,
            clock=self.clock,
        )
        self.learning.start()
        self.quarantine = QuarantineService(
            settings.data_dir,
            spool=self.spool,
            store=self.store,
            indexer=self.indexer,
            clock=self.clock,
            domains=sorted(domains),
            learning=self.learning,
            on_spooled=self.indexer.notify,
            shared=build_review_bus(settings),
        )
        # -- end review and learning --
        if settings.blocklist_learning:  # the published block list (docs/rtbl-publishing.md)
            self.rtbl_publishing = await RtblPublishing.open(
                settings,
                self.store,
                self.learning.examples,
                self.clock,
                sqlite_path=DataLayout(settings.data_dir).store,
                extra_own=self._policy_local_domains(),
            )
            await self.rtbl_publishing.start()
        self.seen_ids = build_seen_ids(settings, self.clock)
        self.pipeline = Pipeline(
            PipelineConfig(
                local_domains=domains,
                upload_hosts=frozenset(settings.upload_hosts),
                fail_open=settings.fail_open,
                ibb_archive_max_bytes=settings.ibb_archive_max_bytes,
            ),
            decider=self.policy,
            spool=self.spool,
            clock=self.clock,
            on_spooled=self.indexer.notify,
            # The policy in force says which domains are local (its `local_domains`), not
            # only the served domains: a MUC service listed there is not federation.
            local_domains=self._policy_local_domains,
            attachments=self.attachments,
            trust=self.trust,
            roster_observer=RosterObservers(
                TrustRosterObserver(self.trust).roster_seen, self.quarantine.roster_seen
            ),
            report_observer=self.learning,
            recent=self.seen_ids,
        )
        if settings.fail_open:
            log.warning("FAIL-OPEN is on: stanzas are delivered even when they cannot be archived")
        self.indexer.start()
        if settings.retention_file is not None:
            self.retention = RetentionJob(
                Paths(settings.data_dir, DataLayout(settings.data_dir).evidence(settings)),
                settings.retention_file,
                policy_file=settings.policy,
                clock=self.clock,
                interval=settings.retention_interval,
                purge_due=settings.retention_purge,
                # The configured store, Elasticsearch too: never a SQLite file beside it.
                store_spec=spec_from_settings(settings, DataLayout(settings.data_dir).store),
                local_domains=frozenset(settings.domain),
            )
            try:
                self.retention.check()
            except StanzaGuardError as exc:
                raise SettingsError(f"retention_file: {exc}") from None
            self.retention.start()
        if settings.policy is not None:
            self.policy_watcher = PolicyFileWatcher(settings.policy, self.policy, domains)
            self.policy_watcher.start()
        self.policy_sync = await start_policy_sync(settings, self.policy)
        if self.model_watcher is not None:
            self.model_watcher.start()
        if self.blocklist_watcher is not None:
            self.blocklist_watcher.start()
        if self.rtbl_config is not None and self.blocklist is not None:
            # Connects in the background: the proxy does not wait for the RTBL server.
            self.rtbl = RtblSubscriber(self.rtbl_config, self.blocklist)
            await self.rtbl.start()
        self.hook = DeliveryHook(self.pipeline, self.quarantine)
        self.sm_store = build_sm_store(settings, self.clock)
        self.proxy = C2SProxy(self.proxy_config, self._hook_override or self.hook, self.sm_store)
        self.quarantine.attach(self.proxy)
        await self.quarantine.start()
        listen = split_host_port(settings.listen) if settings.listen else None
        listen_tls = split_host_port(settings.listen_tls) if settings.listen_tls else None
        if self.proxy_config.server_tls is None:
            listen_tls = None
        try:
            self.bound = await self.proxy.start(listen, listen_tls)
            await self._start_web_front_ends()
        except OSError as exc:
            await self.stop()
            raise SettingsError(f"listen: cannot listen: {exc}") from None

    async def _start_web_front_ends(self) -> None:
        """WebSocket and BOSH listeners: sessions of the same proxy (same hook, spool, SM)."""
        settings = self.settings
        tls = self.web_tls
        if settings.listen_websocket is not None:
            self.websocket = WebSocketFrontEnd(self.proxy, WebSocketConfig(tls=tls))
            address = split_host_port(settings.listen_websocket)
            self.web_bound["websocket"] = await self.websocket.start(*address)
        if settings.listen_bosh is not None:
            config = BoshConfig(
                tls=tls,
                max_wait=settings.bosh_max_wait,
                inactivity=settings.bosh_inactivity,
                max_sessions=settings.max_sessions,
            )
            self.bosh = BoshFrontEnd(self.proxy, config)
            address = split_host_port(settings.listen_bosh)
            self.web_bound["bosh"] = await self.bosh.start(*address)

    def _policy_local_domains(self) -> frozenset[str]:
        active = self.policy.current
        if self._local_cache is None or self._local_cache[0] is not active:
            self._local_cache = (active, frozenset(active.policy.local_domains))
        return self._local_cache[1]

    async def stop(self) -> None:
        if self.websocket is not None:
            await self.websocket.stop()
        if self.bosh is not None:
            await self.bosh.stop()
        if hasattr(self, "proxy"):
            await self.proxy.stop()
        if hasattr(self, "sm_store"):
            await self.sm_store.close()
        if self.seen_ids is not None:  # writes what the proxy spooled last
            await asyncio.to_thread(self.seen_ids.close)
        close_counters = getattr(self.counters, "close", None)
        if close_counters is not None:  # shared counters: writes what is still queued
            await asyncio.to_thread(close_counters)
        if self.quarantine is not None:  # before the spool closes: its tasks append to it
            await self.quarantine.stop()
            if self.quarantine.shared is not None:
                await self.quarantine.shared.close()
        if self.attachments is not None:  # before the spool closes: it records results
            await self.attachments.stop()
        if self.policy_watcher is not None:
            await self.policy_watcher.stop()
        if self.policy_sync is not None:
            await self.policy_sync.stop()
            await self.policy_sync.shared.close()
        if self.retention is not None:
            await self.retention.stop()
        if self.model_watcher is not None:
            await self.model_watcher.stop()
        if self.rtbl is not None:
            await self.rtbl.stop()
        if self.blocklist_watcher is not None:
            await self.blocklist_watcher.stop()
        await stop_archive_path(self)


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run the service until SIGINT or SIGTERM."""
    service = ArchivingService(settings)
    await service.start()
    # The search, review and audit API beside the proxy (api_listen; stanzaguard/api_wiring.py).
    api = await start_beside(settings, service)
    # What start-up built (policy, model, caches) lives as long as the process: keep it out
    # of every collection, and collect young objects less often (the pipeline makes many).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    if settings.metrics_listen:
        metrics_host, metrics_port = split_host_port(settings.metrics_listen)
        start_http_server(metrics_port, metrics_host)
    native = native_status()
    log.info(
        "proxy listening",
        extra={
            "addresses": [f"{h}:{p}" for h, p in service.bound],
            "web": {name: f"{h}:{p}" for name, (h, p) in service.web_bound.items()},
            "upstream": settings.upstream,
            "compiled_modules": list(native.compiled),
            "event_loop": running_loop_name(),
        },
    )
    if native.stale:
        log.warning(
            "compiled modules were not built from the source beside them: edits to it are "
            "not running (rebuild with `make native`)",
            extra={"stale_modules": list(native.stale)},
        )
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
        log.info("stopping")
        if api is not None:
            await api.stop()
        await service.stop()
