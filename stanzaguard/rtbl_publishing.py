"""Wiring of the published block list: learning → listing rule → store → pubsub and HTTP.

- `evidence_by_sender` turns the labelled examples (`stanzaguard.learning`: officers'
  confirmations and releases, users' spam reports with their reporters' weights) into the
  `classifier.listing.SenderEvidence` the rule reads.
- `BlocklistLearner` watches the examples (append-only, in memory in the service) and, when
  they grew, applies the rule to every sender whose evidence changed, through the
  `archive_api.blocklist.BlocklistService` (which keeps the entries in the SQLite store).
- `RtblPublishing` owns the parts in the proxy's process: the service on the store, the
  learner, and the pubsub publisher (`proxy.rtbl_publish`) when ``rtbl_publish_service``
  is set. The HTTP lists are routes of the API (`archive_api.routes.blocklist`), built by
  `blocklist_routers` for whichever process serves the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from pathlib import Path

from fastapi import APIRouter

from archive_api.audit import AuditAction, AuditLog, AuditOutcome
from archive_api.blocklist import BlocklistPolicy, BlocklistService
from archive_api.errors import InvalidInput
from archive_api.routes.blocklist import blocklist_router
from archive_api.store.base import BlocklistEntry, BlocklistStore
from archive_api.store.errors import NotFound
from archive_api.store.sqlite import SqliteStore
from classifier.blocklists import ListKind
from classifier.clock import Clock
from classifier.errors import PolicyError, RuleError
from classifier.jid import normalise_domain
from classifier.listing import (
    Decision,
    EntryKind,
    EntryState,
    ListingRule,
    ReviewMode,
    SenderEvidence,
)
from proxy.rtbl import TlsMode
from proxy.rtbl_publish import PublishConfig, PublishError, RtblPublisher, publish_nodes
from stanzaguard.errors import SettingsError
from stanzaguard.learning import Label, LabelledExamples, Source
from stanzaguard.settings import Settings, split_host_port
from stanzaguard.tls import upstream_context

log = logging.getLogger(__name__)

#: Passwords refused for rtbl_publish_password outside environment=development.
WEAK_PASSWORDS = frozenset({"", "changeme", "password", "secret", "example"})


def listing_rule(settings: Settings, extra_own: Iterable[str] = ()) -> ListingRule:
    own: set[str] = set()
    for domain in (*settings.domain, *extra_own):
        with contextlib.suppress(RuleError, ValueError):
            own.add(normalise_domain(domain))
    return ListingRule(
        own_domains=frozenset(own),
        jid_officer_spam=settings.blocklist_jid_officer_spam,
        jid_report_weight=settings.blocklist_jid_report_weight,
        domain_listed_jids=settings.blocklist_domain_listed_jids,
    )


def blocklist_policy(settings: Settings, extra_own: Iterable[str] = ()) -> BlocklistPolicy:
    return BlocklistPolicy(listing_rule(settings, extra_own), ReviewMode(settings.blocklist_review))


def blocklist_routers(
    settings: Settings, store: BlocklistStore, clock: Clock
) -> tuple[APIRouter, ...]:
    """The API's block list routes, or none when ``blocklist_learning`` is off."""
    if not settings.blocklist_learning:
        return ()
    policy = blocklist_policy(settings, _policy_local_domains(settings))
    service = BlocklistService(store, clock, policy)
    return (
        blocklist_router(
            service, lists=settings.blocklist_http, plain_jids=settings.blocklist_http_plain_jids
        ),
    )


def build_publish_config(settings: Settings) -> PublishConfig | None:
    """The publisher's configuration, or None when ``rtbl_publish_service`` is unset.

    Raises:
        SettingsError: naming the setting that is missing or wrong.
    """
    if not settings.rtbl_publish_service:
        return None
    if not settings.blocklist_learning:
        raise SettingsError("rtbl_publish_service: needs blocklist_learning = true")
    jid = (settings.rtbl_publish_jid or "").strip()
    if "@" not in jid or "/" in jid:
        raise SettingsError("rtbl_publish_jid: give the publishing account as user@domain")
    if settings.rtbl_publish_password is None:
        raise SettingsError("rtbl_publish_password: required with rtbl_publish_service")
    password = settings.rtbl_publish_password.get_secret_value()
    production = settings.environment != "development"
    if production and password.strip().lower() in WEAK_PASSWORDS:
        raise SettingsError("rtbl_publish_password: a placeholder password is refused")
    if production and settings.rtbl_publish_tls == "plain":
        raise SettingsError("rtbl_publish_tls: plain is refused outside environment=development")
    try:
        nodes = publish_nodes(settings.rtbl_publish_domain_nodes, settings.rtbl_publish_jid_nodes)
    except PublishError as exc:
        raise SettingsError(f"rtbl_publish nodes: {exc}") from None
    host: str | None = None
    port: int | None = None
    if settings.rtbl_publish_server:
        host, port = split_host_port(settings.rtbl_publish_server)
    return PublishConfig(
        jid=jid,
        password=password,
        service=settings.rtbl_publish_service.strip(),
        nodes=nodes,
        host=host,
        port=port,
        tls=TlsMode(settings.rtbl_publish_tls),
        ssl_context=upstream_context(settings.rtbl_publish_ca_file),
    )


def evidence_by_sender(examples: LabelledExamples) -> dict[str, SenderEvidence]:
    """What reports and officers say about each sender (bare JID), per the rule's terms."""
    officer_spam: dict[str, set[str]] = defaultdict(set)
    newest_officer: dict[str, tuple[datetime, int, Label]] = {}
    reporters: dict[str, set[str]] = defaultdict(set)
    for position, example in enumerate(examples.lines):
        sender = example.sender
        if not sender:
            continue
        if example.source is Source.OFFICER:
            previous = newest_officer.get(sender)
            if previous is None or (previous[0], previous[1]) <= (example.at, position):
                newest_officer[sender] = (example.at, position, example.label)
            if example.record_id is not None and (
                examples.officer_label(example.record_id) is Label.SPAM
            ):
                officer_spam[sender].add(example.record_id)
        elif example.label is Label.SPAM:
            rid = example.record_id
            if rid is not None and examples.officer_label(rid) is Label.HAM:
                continue  # an officer said this message was not spam
            reporters[sender].add(example.actor)
    senders = set(officer_spam) | set(newest_officer) | set(reporters)
    result: dict[str, SenderEvidence] = {}
    for sender in senders:
        newest = newest_officer.get(sender)
        result[sender] = SenderEvidence(
            officer_spam=len(officer_spam.get(sender, ())),
            report_weight=sum(
                examples.reporter_weight(reporter) for reporter in reporters.get(sender, ())
            ),
            cleared=newest is not None and newest[2] is Label.HAM,
        )
    return result


class BlocklistLearner:
    """Applies the listing rule when the labelled examples change (checked every
    ``interval`` seconds; `check` does it at once)."""

    def __init__(
        self,
        examples: LabelledExamples,
        service: BlocklistService,
        *,
        interval: float = 1.0,
    ) -> None:
        self.examples = examples
        self.service = service
        self.interval = interval
        self._seen = -1
        self._last: dict[str, SenderEvidence] = {}
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[RtblPublisher] = []
        self._lock = asyncio.Lock()

    def notify_to(self, publisher: RtblPublisher) -> None:
        self._listeners.append(publisher)

    async def check(self) -> int:
        """Apply the rule to senders whose evidence changed; return how many entries changed."""
        async with self._lock:
            count = len(self.examples)
            if count == self._seen:
                return 0
            evidence = evidence_by_sender(self.examples)
            changed = 0
            for sender, found in sorted(evidence.items()):
                if self._last.get(sender) == found:
                    continue
                changed += len(await self.service.consider_jid(sender, found))
            self._last = evidence
            self._seen = count
        if changed:
            for listener in self._listeners:
                listener.notify()
        return changed

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.create_task(self._run(), name="blocklist-learner")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("block list: applying the listing rule failed; retrying")


class RtblPublishing:
    """The block list's parts in the proxy's process (learner and publisher)."""

    def __init__(
        self,
        settings: Settings,
        store: BlocklistStore,
        examples: LabelledExamples,
        clock: Clock,
        *,
        extra_own: Iterable[str] = (),
        learn_interval: float = 1.0,
    ) -> None:
        self._owned_store: SqliteStore | None = None
        self.service = BlocklistService(store, clock, blocklist_policy(settings, extra_own))
        self.learner = BlocklistLearner(examples, self.service, interval=learn_interval)
        self.publish_config = build_publish_config(settings)
        self.publisher: RtblPublisher | None = None
        if self.publish_config is not None:
            self.publisher = RtblPublisher(
                self.publish_config, self._wanted, self.service.store.blocklist_version
            )
            self.learner.notify_to(self.publisher)

    async def _wanted(self, kind: ListKind) -> frozenset[str]:
        entry_kind = EntryKind.DOMAIN if kind is ListKind.DOMAINS else EntryKind.JID
        return await self.service.published_ids(entry_kind)

    async def start(self) -> None:
        await self.learner.start()
        if self.publisher is not None:
            await self.publisher.start()  # connects in the background

    async def stop(self) -> None:
        await self.learner.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        if self._owned_store is not None:
            await self._owned_store.close()

    @classmethod
    async def open(
        cls,
        settings: Settings,
        store: object,
        examples: LabelledExamples,
        clock: Clock,
        *,
        sqlite_path: Path,
        extra_own: Iterable[str] = (),
    ) -> RtblPublishing:
        """Use the archive store when it is SQLite; otherwise (Elasticsearch) the SQLite file
        in the data directory, where the API keeps its audit log and this list too."""
        if isinstance(store, SqliteStore):
            return cls(settings, store, examples, clock, extra_own=extra_own)
        own = await SqliteStore.open(sqlite_path)
        try:
            made = cls(settings, own, examples, clock, extra_own=extra_own)
        except BaseException:
            await own.close()
            raise
        made._owned_store = own
        return made


# --- the command line (`stanzaguard rtbl ...`) --------------------------------------------------


async def cli_entries(
    settings: Settings, state: EntryState | None, kind: EntryKind | None
) -> tuple[BlocklistEntry, ...]:
    """Entries for `stanzaguard rtbl list`; audited like the API's listing (rtbl-read)."""
    from stanzaguard.access import cli_identity

    async with _cli_parts(settings) as (service, audit):
        params = {
            "state": None if state is None else state.value,
            "kind": None if kind is None else kind.value,
        }
        found = await service.entries(kind=kind, state=state)
        await audit.record(
            cli_identity().actor, AuditAction.RTBL_READ, params, result_count=len(found)
        )
        return found


async def cli_decide(
    settings: Settings, kind: EntryKind, value: str, decision: Decision, reason: str | None
) -> tuple[BlocklistEntry, ...]:
    """An operator's decision (`stanzaguard rtbl decide`), audited with its outcome as the
    API's (rtbl-decide). A running service publishes it within its poll interval."""
    from stanzaguard.access import cli_identity

    identity = cli_identity()
    params = {
        "kind": kind.value,
        "value": value[:300],
        "decision": decision.value,
        "reason": (reason or "")[:300],
    }
    async with _cli_parts(settings) as (service, audit):
        try:
            changed = await service.decide(kind, value, decision, identity.subject, reason)
        except (InvalidInput, NotFound) as exc:
            failed = {**params, "error": type(exc).__name__}
            await audit.record(
                identity.actor, AuditAction.RTBL_DECIDE, failed, outcome=AuditOutcome.INVALID
            )
            raise
        await audit.record(
            identity.actor, AuditAction.RTBL_DECIDE, params, result_count=len(changed)
        )
        return changed


@contextlib.asynccontextmanager
async def _cli_parts(
    settings: Settings,
) -> AsyncIterator[tuple[BlocklistService, AuditLog]]:
    from stanzaguard.clock import SystemClock
    from stanzaguard.keys import load_or_create_signer

    data_dir = settings.data_dir
    if not data_dir.is_dir():
        raise SettingsError(f"no data directory at {data_dir} (is data_dir right?)")
    store = await SqliteStore.open(data_dir / "archive.sqlite3")
    try:
        clock = SystemClock()
        audit = AuditLog(store, load_or_create_signer(data_dir / "keys"), clock)
        try:
            policy = blocklist_policy(settings, _policy_local_domains(settings))
            yield BlocklistService(store, clock, policy), audit
        finally:
            await audit.close()
    finally:
        await store.close()


def _policy_local_domains(settings: Settings) -> frozenset[str]:
    """The policy file's ``local_domains`` too (never listed), when there is a policy."""
    if settings.policy is None:
        return frozenset()
    from proxy.policy_source import load_policy

    try:
        return frozenset(load_policy(settings.policy, frozenset(settings.domain)).local_domains)
    except PolicyError:  # a broken policy file must not stop a retraction
        log.warning("rtbl: the policy file could not be read; using only the served domains")
        return frozenset()
