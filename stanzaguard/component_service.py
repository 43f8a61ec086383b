"""Composition of component mode (`stanzaguard component`): the server forwards, we archive.

The same parts as `stanzaguard run` (`stanzaguard.wiring`) minus the c2s proxy: policy and
text model, the pipeline, a spool, the indexer, learning from spam reports, the published
block list (`stanzaguard.rtbl_publishing`: listing rule and pubsub publisher, with
``blocklist_learning``), and the policy file watcher; plus `proxy.component.ComponentLink`
in place of the listener, and `ComponentAdmin` behind its ad-hoc commands.

Layout under the data directory, chosen so that the inline proxy (`stanzaguard run`) and the
component may run side by side on one data directory and one archive:
- the archive store, the signing key and the learning examples are the shared ones;
- the component has its own spool (``DATA/component/spool``), evidence
  (``EVIDENCE/component``) and hash chain (`component_chain_name`, default ``component``);
- record ids are derived from the message alone (`proxy.stanza.dedupe_key`), so a message
  both modes saw is one record in the store with an observation from each.

Nothing here can block: the decider is wrapped in `ObserveOnlyDecider`. What the component
learns is enforced elsewhere, by the servers and rooms that subscribe to the list it publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from prometheus_client import start_http_server
from tomlkit.exceptions import TOMLKitError

from archive_api.audit import Actor, AuditAction, AuditLog, AuditOutcome
from archive_api.context import PolicyConflict, PolicyInvalid
from archive_api.errors import AuditError
from archive_api.store.base import ArchiveStore
from archive_api.store.errors import QuerySyntaxError, StoreError
from classifier.clock import Clock
from classifier.errors import PolicyError
from classifier.jid import normalise_bare, normalise_domain
from classifier.policy import ActivePolicy, PolicyHolder
from classifier.reputation import ReputationLedger
from classifier.verdict import Reason
from proxy.component import (
    NODE_DENY,
    NODE_RECENT,
    ComponentConfig,
    ComponentError,
    ComponentLink,
    ObserveOnlyDecider,
    VerdictLine,
)
from proxy.indexer import IndexControl, Indexer
from proxy.pipeline import Pipeline, PipelineConfig
from proxy.policy_source import PolicyFileWatcher, load_policy
from proxy.spool import Spool
from stanzaguard.api_wiring import POLICY_HISTORY_DIR, FilePolicyStore
from stanzaguard.clock import SystemClock
from stanzaguard.errors import SettingsError
from stanzaguard.index_worker import IndexWorker
from stanzaguard.keys import load_or_create_signer
from stanzaguard.learning import Learning
from stanzaguard.model_runtime import MODEL_OFF, ModelWatcher, configured_model
from stanzaguard.registry import ModelRegistry
from stanzaguard.rtbl_publishing import RtblPublishing, build_publish_config
from stanzaguard.settings import Settings, split_host_port
from stanzaguard.stores import spec_from_settings
from stanzaguard.wiring import PLACEHOLDER_SECRETS, DataLayout, open_store, stop_archive_path

log = logging.getLogger(__name__)

COMPONENT_DIR = "component"
MAX_DOMAIN_CHARS = 253


def build_component_config(settings: Settings) -> ComponentConfig:
    """The component's connection settings, checked; SettingsError names the bad key."""
    if not settings.domain:
        raise SettingsError(
            "domain: the server's domains are required (forwards are believed only from them)"
        )
    jid = (settings.component_jid or "").strip().lower()
    if not jid or "@" in jid or "/" in jid:
        raise SettingsError("component_jid: give the component's domain, e.g. archive.example")
    if settings.component_secret is None:
        raise SettingsError("component_secret: required in component mode")
    secret = settings.component_secret.get_secret_value()
    if settings.environment == "production" and secret.strip().lower() in PLACEHOLDER_SECRETS:
        raise SettingsError(
            "component_secret: a default or placeholder secret is refused outside "
            "environment=development"
        )
    admins = []
    for admin in settings.component_admins:
        bare = normalise_bare(admin)
        if bare.localpart is None or "/" in admin:
            raise SettingsError(f"component_admins: {admin[:80]!r} is not a bare user JID")
        admins.append(str(bare))
    host, port = split_host_port(settings.component_server)
    return ComponentConfig(
        jid=jid,
        secret=secret,
        host=host,
        port=port,
        server_domains=frozenset(settings.domain),
        admins=frozenset(admins),
        max_stanza_bytes=settings.max_stanza_bytes,
    )


@dataclass(frozen=True, slots=True)
class ComponentLayout:
    """Where the component's own files live (the store and keys are the shared ones)."""

    settings: Settings

    @property
    def root(self) -> Path:
        return self.settings.data_dir / COMPONENT_DIR

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def evidence(self) -> Path:
        return DataLayout(self.settings.data_dir).evidence(self.settings) / COMPONENT_DIR


async def open_component_spool(settings: Settings, clock: Clock) -> Spool:
    layout = ComponentLayout(settings)
    try:
        return await Spool.open(
            layout.spool,
            clock=clock,
            signer=load_or_create_signer(DataLayout(settings.data_dir).keys),
            checkpoint_every=settings.checkpoint_every,
            max_spool_bytes=settings.spool_max_bytes,
            segment_max_bytes=settings.spool_segment_bytes,
            keep_evidence=settings.keep_evidence,
            evidence_dir=layout.evidence,
            chain_name=settings.component_chain_name,
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


# --- the admin commands --------------------------------------------------------------------------


def _actor(admin: str) -> Actor:
    return Actor(f"xmpp:{str(normalise_bare(admin))[:3000]}", "admin")


def _reasons(reasons: Sequence[Reason]) -> str:
    return "; ".join(f"{r.rule_id}: {r.detail}" for r in reasons)[:500]


def add_block_domain(text: str, domain: str) -> str | None:
    """The policy text with `domain` added to ``[blocklists] domains``; None if already there.

    Edited with tomlkit, so the officer's comments and layout survive. Raises ComponentError
    when the text is not TOML or its ``blocklists`` is not what the format allows.
    """
    try:
        doc = tomlkit.parse(text) if text.strip() else tomlkit.document()
    except (TOMLKitError, ValueError) as exc:
        raise ComponentError(f"the policy file is not valid TOML: {exc}") from None
    if "version" not in doc:
        doc["version"] = 1
    section: Any = doc.get("blocklists")
    if section is None:
        section = tomlkit.table()
        doc["blocklists"] = section
    if not isinstance(section, dict):
        raise ComponentError("the policy's blocklists is not a table")
    domains: Any = section.get("domains")
    if domains is None:
        section["domains"] = [domain]
        return tomlkit.dumps(doc)
    if not isinstance(domains, list):
        raise ComponentError("the policy's blocklists.domains is not a list")
    if domain in [str(d).lower() for d in domains]:
        return None
    domains.append(domain)
    return tomlkit.dumps(doc)


class ComponentAdmin:
    """`proxy.component.AdminCommands` over the archive store, the policy file and the audit log.

    Each command is audited before its answer goes out: a read as ``search``, a block-list
    addition as ``policy-change`` (with the policy versions before and after), a non-admin's
    attempt as ``denied``. If the audit log cannot record, the command fails.
    """

    def __init__(self, store: ArchiveStore, audit: AuditLog, policy: FilePolicyStore) -> None:
        self.store = store
        self.audit = audit
        self.policy = policy

    async def recent_verdicts(self, admin: str, sender: str, limit: int) -> Sequence[VerdictLine]:
        bare = normalise_bare(sender)
        if bare.localpart is None or not bare.domain or len(sender) > 3071 or "/" in sender:
            await self._record(
                admin,
                AuditAction.SEARCH,
                NODE_RECENT,
                {"sender": sender[:200]},
                outcome=AuditOutcome.INVALID,
            )
            raise ComponentError(f"not a bare JID: {sender[:80]!r}")
        query = f"from:{bare}"
        try:
            page = await self.store.search(query, limit=limit, sort="time")
        except (QuerySyntaxError, ValueError) as exc:
            await self._record(
                admin,
                AuditAction.SEARCH,
                NODE_RECENT,
                {"query": query},
                outcome=AuditOutcome.INVALID,
            )
            raise ComponentError(f"cannot search for {sender[:80]!r}: {exc}") from None
        except StoreError:
            await self._record(
                admin,
                AuditAction.SEARCH,
                NODE_RECENT,
                {"query": query},
                outcome=AuditOutcome.FAILED,
            )
            raise ComponentError("the archive is unavailable; try again later") from None
        lines = [
            VerdictLine(
                at=hit.record.occurred_at.isoformat(),
                recipient=hit.record.recipient,
                action=hit.record.verdict.action.value,
                score=hit.record.verdict.score,
                reasons=_reasons(hit.record.verdict.reasons),
            )
            for hit in page.hits
        ]
        await self._record(
            admin, AuditAction.SEARCH, NODE_RECENT, {"query": query}, count=len(lines)
        )
        return lines

    async def deny_domain(self, admin: str, domain: str) -> str:
        wanted = normalise_domain(domain.strip().rstrip(".")) if domain.strip() else ""
        params: dict[str, Any] = {"domain": domain[:300], "section": "blocklists.domains"}
        if (
            not wanted
            or len(wanted) > MAX_DOMAIN_CHARS
            or any(c in wanted for c in "@/*")
            or "." not in wanted
        ):
            await self._record(
                admin, AuditAction.POLICY_CHANGE, NODE_DENY, params, outcome=AuditOutcome.INVALID
            )
            raise ComponentError(f"not a domain: {domain[:80]!r}")
        before = await self.policy.current()
        params.update(old_version=before.version, old_sha256=before.sha256)
        try:
            text = add_block_domain(before.text, wanted)
        except ComponentError:
            await self._record(
                admin, AuditAction.POLICY_CHANGE, NODE_DENY, params, outcome=AuditOutcome.FAILED
            )
            raise
        if text is None:
            await self._record(admin, AuditAction.POLICY_CHANGE, NODE_DENY, params, count=0)
            return f"{wanted} is on the block list already"
        try:
            version = await self.policy.write(
                text,
                actor=_actor(admin).name,
                base_version=before.version,
                comment=f"ad-hoc command {NODE_DENY}: block {wanted}",
            )
        except (PolicyInvalid, PolicyConflict) as exc:
            await self._record(
                admin, AuditAction.POLICY_CHANGE, NODE_DENY, params, outcome=AuditOutcome.INVALID
            )
            raise ComponentError(f"the policy was not changed: {exc}") from None
        params["new_version"] = version.version
        await self._record(admin, AuditAction.POLICY_CHANGE, NODE_DENY, params, count=1)
        return f"{wanted} added to the block list (policy version {version.version})"

    async def refused(self, who: str, node: str) -> None:
        await self.audit.record(
            Actor(f"xmpp:{who[:3000]}"),
            AuditAction.POLICY_CHANGE if node == NODE_DENY else AuditAction.SEARCH,
            {"via": "xmpp-adhoc", "command": node},
            outcome=AuditOutcome.DENIED,
        )

    async def _record(
        self,
        admin: str,
        action: AuditAction,
        node: str,
        params: dict[str, Any],
        *,
        count: int | None = None,
        outcome: AuditOutcome = AuditOutcome.OK,
    ) -> None:
        try:
            await self.audit.record(
                _actor(admin),
                action,
                {"via": "xmpp-adhoc", "command": node, **params},
                result_count=count,
                outcome=outcome,
            )
        except AuditError as exc:
            raise ComponentError("the audit log is unavailable; nothing was done") from exc


# --- the service ---------------------------------------------------------------------------------


class ComponentService:
    """Component mode on one machine: component link → pipeline → spool → indexer → store."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.config = build_component_config(settings)
        # Checked before anything is opened: a wrong rtbl_publish_* stops start-up cleanly.
        build_publish_config(settings)
        self.reputation = ReputationLedger()
        self.model_watcher: ModelWatcher | None = None
        self.policy_watcher: PolicyFileWatcher | None = None
        self.learning: Learning | None = None
        self.rtbl_publishing: RtblPublishing | None = None  # docs/rtbl-publishing.md
        self.audit: AuditLog | None = None
        self.link: ComponentLink | None = None
        self._local_cache: tuple[ActivePolicy, frozenset[str]] | None = None

    async def start(self) -> None:
        settings = self.settings
        domains = frozenset(settings.domain)
        layout = DataLayout(settings.data_dir)
        model = None
        if settings.model != MODEL_OFF:
            self.model_watcher = ModelWatcher(
                ModelRegistry(layout.models, self.clock),
                configured_model(settings.model),
                self.clock,
            )
            model = self.model_watcher.initial()
        try:
            self.policy = PolicyHolder(
                load_policy(settings.policy, domains), reputation=self.reputation, model=model
            )
        except PolicyError as exc:
            raise SettingsError(f"policy: {exc}") from None
        if self.model_watcher is not None:
            self.model_watcher.attach(self.policy)
        self.store = await open_store(settings)
        self.spool = await open_component_spool(settings, self.clock)
        self.indexer: IndexControl
        if settings.index_worker:
            self.indexer = IndexWorker(
                self.spool,
                spec_from_settings(settings, layout.store),
                priority=settings.index_worker_priority,
                boost_backlog=settings.index_worker_boost_backlog,
                notify_interval=settings.index_worker_batch_interval,
            )
        else:
            self.indexer = Indexer(self.spool, self.store)
        self.learning = Learning(
            layout.examples,
            reputation=self.reputation,
            store=self.store,
            indexer=self.indexer,
            clock=self.clock,
        )
        self.learning.start()
        # Component mode cannot block: the list it publishes is how its reports take effect.
        if settings.blocklist_learning:
            self.rtbl_publishing = await RtblPublishing.open(
                settings,
                self.store,
                self.learning.examples,
                self.clock,
                sqlite_path=layout.store,
                extra_own=self._policy_local_domains(),
            )
            await self.rtbl_publishing.start()
        self.pipeline = Pipeline(
            PipelineConfig(
                local_domains=domains,
                upload_hosts=frozenset(settings.upload_hosts),
                ibb_archive_max_bytes=settings.ibb_archive_max_bytes,
            ),
            decider=ObserveOnlyDecider(self.policy),
            spool=self.spool,
            clock=self.clock,
            on_spooled=self.indexer.notify,
            local_domains=self._policy_local_domains,
            report_observer=self.learning,
        )
        self.indexer.start()
        if settings.policy is not None:
            self.policy_watcher = PolicyFileWatcher(settings.policy, self.policy, domains)
            self.policy_watcher.start()
        if self.model_watcher is not None:
            self.model_watcher.start()
        admin = None
        if self.config.admins:
            self.audit = AuditLog(self.store, load_or_create_signer(layout.keys), self.clock)
            watcher = self.policy_watcher
            admin = ComponentAdmin(
                self.store,
                self.audit,
                FilePolicyStore(
                    settings.policy,
                    settings.data_dir / POLICY_HISTORY_DIR,
                    domains,
                    self.clock,
                    # In force here at once, not at the watcher's next look.
                    on_written=watcher.check if watcher is not None else None,
                ),
            )
        self.link = ComponentLink(self.config, self.pipeline, admin=admin)
        await self.link.start()

    def _policy_local_domains(self) -> frozenset[str]:
        active = self.policy.current
        if self._local_cache is None or self._local_cache[0] is not active:
            self._local_cache = (active, frozenset(active.policy.local_domains))
        return self._local_cache[1]

    async def stop(self) -> None:
        if self.link is not None:  # first: it hands what is queued to the pipeline
            await self.link.stop()
        if self.policy_watcher is not None:
            await self.policy_watcher.stop()
        if self.model_watcher is not None:
            await self.model_watcher.stop()
        if self.audit is not None:
            with contextlib.suppress(AuditError):
                await self.audit.close()
        await stop_archive_path(self)


async def serve_component(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run component mode until SIGINT or SIGTERM."""
    service = ComponentService(settings)
    await service.start()
    if settings.metrics_listen:
        # The component's metrics (docs/integrations/component.md, "Settings"); in Kubernetes
        # also what the probes ask.
        metrics_host, metrics_port = split_host_port(settings.metrics_listen)
        start_http_server(metrics_port, metrics_host)
    log.info(
        "component mode: archiving and scoring forwarded copies (no blocking)",
        extra={"jid": service.config.jid, "server": settings.component_server},
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
        await service.stop()
