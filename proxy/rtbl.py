"""Real-time block lists: a XEP-0060 subscriber that keeps the live `BlockList` current.

An RTBL is a pubsub node whose *item ids are the entries*; the payload is not used. What the
publishers and consumers do (read in prosody-modules' ``mod_anti_spam.lua``, ``rtbl.lib.lua``
and ``mod_muc_rtbl`` README, ejabberd's ``mod_antispam_rtbl.erl``, xmppbl.org's pages as
summarised in the project's anti-spam reference; see docs/policy.md):

- xmppbl.org (service JID ``xmppbl.org``) publishes ``spam_source_domains`` (item id = a
  domain, e.g. ``spam.example``) and ``muc_bans_sha256`` (item id = lower-case hex SHA-256 of
  a bare JID).
- Prosody's ``mod_anti_spam`` (prosody-modules) takes only service JIDs
  (``anti_spam_services = { "xmppbl.org" }``) and subscribes on each to three fixed nodes:
  ``spam_source_domains`` (matched exactly against the sending server's domain),
  ``spam_source_jids_sha256`` (``sha256(bare JID)`` in hex) and ``spam_source_ips`` (CIDR
  ranges of server addresses). It fetches all items at start (``<items node=…/>``) and
  applies publish, retract and purge notifications.
- Prosody's ``mod_muc_rtbl`` (``muc_rtbl_jid``, ``muc_rtbl_node = "muc_bans_sha256"``): "one
  item per blocked JID. The item id should be the SHA256 hash of the JID".
- ejabberd's ``mod_antispam`` (``rtbl_services``, default node ``spam_source_domains``) reads
  item ids as domains, the same way.

So a node name says what its ids are (`RTBL_NODE_KINDS`); any other node needs its kind
given (``jid_sha256:rtbl.example/my_node``). ``spam_source_ips`` is refused: an inline c2s
proxy never sees the address of the remote server a stanza came from.

Rules of this edge:

- Entries of one node are the source ``SERVICE/NODE`` of the `BlockList`, so a policy can
  give one RTBL its own action (``source_actions``) and retracting from one node never
  unblocks what another source still lists.
- Domain items are exact domains (as every consumer above matches them); a ``*.`` pattern in
  an item id is treated as invalid rather than blocking a whole tree.
- Events are accepted only from the configured service JID; anyone can send us a message
  that looks like a pubsub notification.
- On every (re)connection the subscriber subscribes first and then fetches all items, so a
  publish or retract that happens in between is reflected either in the fetched list or in a
  notification; notifications handled while a fetch is under way are replayed on top of the
  fetched list (one may overtake the result it postdates). The whole list is fetched again
  every `refresh_interval` to repair anything missed. Entries stay in force while
  disconnected (a stale list beats an empty one) and are replaced by the next full fetch.
- It subscribes the account's *bare* JID and sends available presence with priority 0, so
  notifications reach whichever connection is up (several proxies may share one account), and
  no subscription of a dead full JID is left behind.
- Only this module and `proxy.component` import slixmpp's connection classes; slixmpp
  objects are turned into `NodeUpdate` / `ItemsPage` values right where they arrive.
- The password is never logged; slixmpp's own stream log of the SASL exchange is redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from prometheus_client import Counter, Gauge
from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.jid import JID, InvalidJID
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from classifier.blocklists import (
    MAX_SOURCE_NAME,
    RTBL_NODE_KINDS,
    BlockList,
    ListKind,
)
from classifier.errors import RuleError
from classifier.jid import normalise_bare
from proxy.reconnect import ReconnectingTask, SessionEnded, SessionWatch, close_connection
from proxy.reconnect import backoff_delay as backoff_delay  # its old home; tests import it here

log = logging.getLogger(__name__)

PUBSUB_NS = "http://jabber.org/protocol/pubsub"
EVENT_NS = "http://jabber.org/protocol/pubsub#event"
RSM_NS = "http://jabber.org/protocol/rsm"
PING_NS = "urn:xmpp:ping"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"

#: Node names whose entries the proxy cannot use, with the reason.
UNSUPPORTED_NODES = {
    "spam_source_ips": "IP ranges of remote servers: a c2s proxy never sees those addresses",
}
MAX_ITEMS_PER_NODE = 1_000_000
MAX_PAGES = 10_000

UPDATES = Counter("stanzaguard_rtbl_updates", "RTBL changes applied, by kind of change", ["change"])
INVALID = Counter("stanzaguard_rtbl_invalid_items", "RTBL item ids that are not valid entries")
CONNECTED = Gauge("stanzaguard_rtbl_connected", "1 while the RTBL client has a session")
CONNECTS = Counter("stanzaguard_rtbl_connects", "RTBL connection attempts, by result", ["result"])


class RtblError(Exception):
    """A configuration or protocol problem of the RTBL client, with a readable message."""


class TlsMode(StrEnum):
    STARTTLS = "starttls"
    DIRECT = "direct"
    PLAIN = "plain"


@dataclass(frozen=True, slots=True)
class RtblNode:
    """One subscription: pubsub service JID, node name and the kind of its item ids."""

    service: str
    node: str
    kind: ListKind

    @property
    def source(self) -> str:
        """The `BlockList` source name of this node's entries: ``SERVICE/NODE``."""
        return f"{self.service}/{self.node}"

    def __str__(self) -> str:
        return self.source


def parse_rtbl_node(spec: str) -> RtblNode:
    """Parse ``[KIND:]SERVICE/NODE`` (``xmppbl.org/spam_source_domains``).

    KIND (``domains``, ``jids``, ``jid_sha256``) may be left out for the well-known node
    names of `RTBL_NODE_KINDS`. The service is a JID without resource (normally a domain).

    Raises:
        RtblError: naming what is wrong.
    """
    text = spec.strip()
    kind: ListKind | None = None
    head, colon, rest = text.partition(":")
    if colon and "/" not in head and head in {k.value for k in ListKind}:
        kind, text = ListKind(head), rest.strip()
    service_text, slash, node = text.partition("/")
    if not slash or not service_text or not node:
        raise RtblError(f"{spec!r}: expected SERVICE/NODE, e.g. xmppbl.org/spam_source_domains")
    if node in UNSUPPORTED_NODES:
        raise RtblError(f"{spec!r}: node {node} is not supported ({UNSUPPORTED_NODES[node]})")
    try:
        JID(service_text)
    except InvalidJID as exc:
        raise RtblError(f"{spec!r}: invalid service JID: {exc}") from None
    service = str(normalise_bare(service_text))
    if kind is None:
        known = RTBL_NODE_KINDS.get(node)
        if known is None:
            names = ", ".join(sorted(RTBL_NODE_KINDS))
            raise RtblError(
                f"{spec!r}: unknown node name; give its kind as KIND:{service}/{node} "
                f"(domains, jids or jid_sha256), or use one of {names}"
            )
        kind = known
    if kind is ListKind.URL_HOSTS:
        raise RtblError(f"{spec!r}: RTBL nodes of URL hosts are not supported")
    result = RtblNode(service, node, kind)
    if len(result.source) > MAX_SOURCE_NAME:
        raise RtblError(f"{spec!r}: longer than {MAX_SOURCE_NAME} characters")
    return result


# --- our own types for what arrives (the edge) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeUpdate:
    """One notification's effect on one node: items published, retracted, or all removed."""

    node: str
    published: tuple[str, ...] = ()
    retracted: tuple[str, ...] = ()
    purged: bool = False


@dataclass(frozen=True, slots=True)
class ItemsPage:
    """Item ids of an items result, and where the next page starts (RSM), if there is one."""

    ids: tuple[str, ...]
    next_after: str | None = None


def parse_event(message: ET.Element) -> tuple[NodeUpdate, ...]:
    """The node updates a ``<message>`` carrying a pubsub ``<event/>`` announces.

    ``<items>`` with ``<item id/>`` (publish) and ``<retract id/>``; ``<purge/>``; and
    ``<delete/>`` (the node is gone: its entries go too). Items without an id are skipped.
    """
    updates: list[NodeUpdate] = []
    for event in message.iter(f"{{{EVENT_NS}}}event"):
        for child in event:
            node = child.get("node")
            if not node:
                continue
            if child.tag == f"{{{EVENT_NS}}}items":
                published = [
                    i for i in (e.get("id") for e in child.iter(f"{{{EVENT_NS}}}item")) if i
                ]
                retracted = [
                    i for i in (e.get("id") for e in child.iter(f"{{{EVENT_NS}}}retract")) if i
                ]
                if published or retracted:
                    updates.append(NodeUpdate(node, tuple(published), tuple(retracted)))
            elif child.tag in (f"{{{EVENT_NS}}}purge", f"{{{EVENT_NS}}}delete"):
                updates.append(NodeUpdate(node, purged=True))
    return tuple(updates)


def parse_items_page(iq: ET.Element, node: str) -> ItemsPage:
    """The item ids of an items result for ``node``.

    Raises:
        RtblError: if the result has no ``<pubsub><items node=NODE>``.
    """
    items = iq.find(f"{{{PUBSUB_NS}}}pubsub/{{{PUBSUB_NS}}}items")
    if items is None or items.get("node") != node:
        raise RtblError(f"items result for {node} has no <items node='{node}'/>")
    ids = tuple(i for i in (e.get("id") for e in items.findall(f"{{{PUBSUB_NS}}}item")) if i)
    page = iq.find(f"{{{PUBSUB_NS}}}pubsub/{{{RSM_NS}}}set")
    next_after = None
    if page is not None and ids:
        last = page.findtext(f"{{{RSM_NS}}}last")
        count = page.findtext(f"{{{RSM_NS}}}count")
        first = page.find(f"{{{RSM_NS}}}first")
        index = first.get("index") if first is not None else None
        seen = int(index) + len(ids) if index and index.isdigit() else None
        more = count is not None and count.isdigit() and seen is not None and seen < int(count)
        if last and more:
            next_after = last
    return ItemsPage(ids, next_after)


def items_request(node: str, after: str | None = None) -> ET.Element:
    """``<pubsub><items node=…/></pubsub>``, with an RSM ``<after>`` for a next page."""
    pubsub = ET.Element(f"{{{PUBSUB_NS}}}pubsub")
    ET.SubElement(pubsub, f"{{{PUBSUB_NS}}}items", node=node)
    if after is not None:
        rsm = ET.SubElement(pubsub, f"{{{RSM_NS}}}set")
        ET.SubElement(rsm, f"{{{RSM_NS}}}after").text = after
    return pubsub


def subscribe_request(node: str, jid: str) -> ET.Element:
    pubsub = ET.Element(f"{{{PUBSUB_NS}}}pubsub")
    ET.SubElement(pubsub, f"{{{PUBSUB_NS}}}subscribe", node=node, jid=jid)
    return pubsub


# --- applying updates to the block list ------------------------------------------------------


def _valid_item(kind: ListKind, item_id: str) -> bool:
    # RTBL domain items are exact domains; a wildcard would block a whole tree.
    return not (kind is ListKind.DOMAINS and item_id.lstrip().startswith("*"))


def apply_update(
    blocklist: BlockList, node: RtblNode, update: NodeUpdate, *, count: bool = True
) -> int:
    """Apply one notification to ``blocklist``; return the number of invalid item ids.

    ``count=False`` (a replay) leaves the metrics alone.
    """
    invalid = 0
    if update.purged:
        blocklist.on_purge(node.source)
        if count:
            UPDATES.labels("purge").inc()
        return 0
    for item_id in update.retracted:
        blocklist.on_retract(node.source, node.kind, item_id)
    valid = 0
    for item_id in update.published:
        if _valid_item(node.kind, item_id) and blocklist.on_publish(
            node.source, node.kind, item_id
        ):
            valid += 1
        else:
            invalid += 1
    if count:
        UPDATES.labels("retract").inc(len(update.retracted))
        UPDATES.labels("publish").inc(valid)
        INVALID.inc(invalid)
    return invalid


def apply_items(blocklist: BlockList, node: RtblNode, item_ids: Sequence[str]) -> tuple[str, ...]:
    """Make ``item_ids`` the whole list of ``node``; return the invalid ids left out."""
    wildcards = [i for i in item_ids if not _valid_item(node.kind, i)]
    valid = [i for i in item_ids if _valid_item(node.kind, i)]
    invalid = wildcards + list(blocklist.on_items(node.source, node.kind, valid))
    UPDATES.labels("sync").inc()
    INVALID.inc(len(invalid))
    return tuple(invalid)


# --- the client ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RtblConfig:
    """How to reach the RTBL services.

    Attributes:
        jid: The account (bare JID) the subscriber logs in as.
        password: Its password (never logged, not in ``repr``).
        nodes: The subscriptions.
        host, port: Where to connect; ``None`` resolves the JID's domain (SRV records).
        tls: ``starttls`` (default), ``direct`` (XEP-0368) or ``plain`` (development only).
        ssl_context: Verifies the server; ``None`` uses the system CAs.
        backoff_initial, backoff_max: Reconnection delays in seconds (doubling, jittered).
        request_timeout: Seconds to wait for a pubsub or ping answer.
        connect_timeout: Seconds from connecting to a started session.
        refresh_interval: Seconds between full re-fetches of every node.
        ping_interval: Seconds between pings that detect a dead connection.
    """

    jid: str
    password: str = field(repr=False)
    nodes: tuple[RtblNode, ...]
    host: str | None = None
    port: int | None = None
    tls: TlsMode = TlsMode.STARTTLS
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    request_timeout: float = 60.0
    connect_timeout: float = 60.0
    refresh_interval: float = 3600.0
    ping_interval: float = 120.0


class _SaslRedaction(logging.Filter):
    """Hide the SASL exchange in slixmpp's SEND/RECV debug log (it carries the password)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            isinstance(record.msg, str)
            and record.msg.startswith(("SEND:", "RECV:"))
            and any(SASL_NS in str(arg) for arg in record.args or ())
        ):
            record.args = ("<SASL exchange redacted>",)
        return True


_REDACTION = _SaslRedaction()


def install_sasl_redaction() -> None:
    """Hide SASL exchanges in slixmpp's stream log (the RTBL publisher uses it too)."""
    stream_log = logging.getLogger("slixmpp.xmlstream.xmlstream")
    if _REDACTION not in stream_log.filters:
        stream_log.addFilter(_REDACTION)


class RtblSubscriber:
    """Subscribes to RTBL nodes and applies them to a `BlockList`, reconnecting with backoff.

    `start` returns at once; the service does not wait for the RTBL server. `synced` is set
    once every node has been fetched in the current session (cleared on disconnection).
    """

    def __init__(
        self,
        config: RtblConfig,
        blocklist: BlockList,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not config.nodes:
            raise RtblError("no RTBL nodes to subscribe to")
        self.config = config
        self.blocklist = blocklist
        self._rand = rand
        self._bare = str(normalise_bare(config.jid))
        self._by_service_node = {(n.service, n.node): n for n in config.nodes}
        self._connection = ReconnectingTask(
            self._session,
            name="rtbl-subscriber",
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
            on_session_end=self._session_ended,
            rand=rand,
        )
        self._xmpp: ClientXMPP | None = None
        self.synced = asyncio.Event()
        self._synced_nodes: set[RtblNode] = set()
        # Notifications seen while a node's items are being fetched, to replay after.
        self._buffers: dict[RtblNode, list[NodeUpdate]] = {}
        self.connected = False
        self.sessions = 0
        self.failures = 0
        self.invalid_items = 0

    @property
    def synced_nodes(self) -> frozenset[RtblNode]:
        return frozenset(self._synced_nodes)

    async def start(self) -> None:
        install_sasl_redaction()
        self._connection.start()

    async def stop(self) -> None:
        await self._connection.stop()

    # -- the connection loop (`proxy.reconnect`) ----------------------------------------------

    def _session_ended(self, error: Exception, delay: float) -> None:
        if isinstance(error, SessionEnded):
            log.warning("RTBL connection ended", extra={"jid": self._bare, "reason": str(error)})
        else:
            log.error("RTBL client failed", extra={"jid": self._bare}, exc_info=error)
        log.info("RTBL reconnecting", extra={"jid": self._bare, "delay_seconds": delay})

    def _build(self) -> ClientXMPP:
        cfg = self.config
        plain = cfg.tls is TlsMode.PLAIN
        # A resource of our own per connection: several proxies may share the account.
        full = f"{self._bare}/stanzaguard-rtbl-{secrets.token_hex(4)}"
        xmpp = ClientXMPP(
            full,
            cfg.password,
            plugin_config={
                "feature_mechanisms": {"unencrypted_plain": plain, "unencrypted_scram": plain}
            },
            ssl_context=cfg.ssl_context,
        )
        xmpp.enable_direct_tls = cfg.tls is TlsMode.DIRECT
        xmpp.enable_starttls = cfg.tls is TlsMode.STARTTLS
        xmpp.enable_plaintext = plain
        xmpp.whitespace_keepalive = False  # our pings detect dead connections
        xmpp.register_handler(
            Callback(
                "RTBL pubsub event",
                MatchXPath(f"{{{xmpp.default_ns}}}message/{{{EVENT_NS}}}event"),
                self._on_event_message,
            )
        )
        return xmpp

    async def _session(self) -> None:
        """One connection: log in, sync every node, then serve notifications until it drops."""
        cfg = self.config
        xmpp = self._xmpp = self._build()
        watch = SessionWatch()
        started, ended, end, on_session_start = watch.started, watch.ended, watch.end, watch.start

        def on_failed_all_auth(_event: object) -> None:
            end("authentication failed (check rtbl_jid and rtbl_password)")

        def on_connection_failed(error: object) -> None:
            xmpp.cancel_connection_attempt()  # our loop does the backoff, not slixmpp's
            end(f"cannot connect: {error}")

        def on_disconnected(reason: object) -> None:
            end(f"disconnected: {reason or 'connection closed'}")

        def on_stream_error(error: Any) -> None:
            end(f"stream error: {error['condition'] if error is not None else error}")

        def on_invalid_chain(error: object) -> None:
            end(f"TLS certificate rejected: {error}")

        handlers: list[tuple[str, Callable[[Any], None]]] = [
            ("session_start", on_session_start),
            ("failed_all_auth", on_failed_all_auth),
            ("connection_failed", on_connection_failed),
            ("disconnected", on_disconnected),
            ("stream_error", on_stream_error),
            ("ssl_invalid_chain", on_invalid_chain),
        ]
        for name, handler in handlers:
            xmpp.add_event_handler(name, handler)
        tasks: list[asyncio.Task[None]] = []
        try:
            if cfg.host is not None and cfg.port is not None:
                xmpp.connect(cfg.host, cfg.port)
            else:
                xmpp.connect()
            try:
                await asyncio.wait_for(started, cfg.connect_timeout)
            except TimeoutError:
                CONNECTS.labels("failed").inc()
                raise SessionEnded(f"no session within {cfg.connect_timeout}s") from None
            except SessionEnded:
                CONNECTS.labels("failed").inc()
                raise
            CONNECTS.labels("ok").inc()
            self._connection.session_started()
            self.sessions += 1
            self.connected = True
            CONNECTED.set(1)
            log.info(
                "RTBL session started",
                extra={"jid": self._bare, "nodes": [n.source for n in cfg.nodes]},
            )
            # Notifications go to the bare JID; they reach a connection with presence.
            xmpp.send_presence(ppriority=0)
            tasks = [
                asyncio.create_task(self._keep_node(xmpp, node), name=f"rtbl-{node.source}")
                for node in cfg.nodes
            ]
            tasks.append(asyncio.create_task(self._ping(xmpp, end), name="rtbl-ping"))
            reason = await ended
            raise SessionEnded(reason)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.connected:
                self.connected = False
                CONNECTED.set(0)
            self.synced.clear()
            self._synced_nodes.clear()
            self._buffers.clear()
            for name, handler in handlers:
                xmpp.del_event_handler(name, handler)
            await close_connection(xmpp)
            self._xmpp = None

    async def _ping(self, xmpp: ClientXMPP, end: Callable[[str], None]) -> None:
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.ping_interval)
            iq: Any = xmpp.make_iq_get(ito=xmpp.boundjid.domain)
            iq.append(ET.Element(f"{{{PING_NS}}}ping"))
            try:
                await iq.send(timeout=cfg.request_timeout)
            except IqTimeout:
                end(f"no answer to a ping within {cfg.request_timeout}s")
                xmpp.abort()
                return
            except IqError:
                pass  # an error reply still proves the connection is alive

    # -- one node ---------------------------------------------------------------------------

    async def _keep_node(self, xmpp: ClientXMPP, node: RtblNode) -> None:
        """Subscribe, fetch all items; retry on failure; re-fetch every refresh interval."""
        cfg = self.config
        subscribed = False
        attempt = 0
        while True:
            try:
                if not subscribed:
                    await self._subscribe(xmpp, node)
                    subscribed = True
                self._begin_fetch(node)
                ids = await self._fetch(xmpp, node)
            except RtblError as exc:
                self._buffers.pop(node, None)
                self.failures += 1
                delay = backoff_delay(attempt, cfg.backoff_initial, cfg.backoff_max, self._rand)
                attempt += 1
                log.error(
                    "RTBL node not available; retrying",
                    extra={"source": node.source, "error": str(exc), "delay_seconds": delay},
                )
                await asyncio.sleep(delay)
                continue
            attempt = 0
            invalid = self._finish_fetch(node, ids)
            self._mark_synced(node)
            log.info(
                "RTBL list fetched",
                extra={
                    "source": node.source,
                    "items": len(ids),
                    "invalid": len(invalid),
                    "invalid_examples": [i[:100] for i in invalid[:3]],
                },
            )
            await asyncio.sleep(cfg.refresh_interval)

    def _begin_fetch(self, node: RtblNode) -> None:
        """Note notifications from now on: they may postdate the items result."""
        self._buffers[node] = []

    def _finish_fetch(self, node: RtblNode, ids: Sequence[str]) -> tuple[str, ...]:
        """Replace the node's entries with ``ids``, then replay what was notified meanwhile.

        A notification can arrive after the service built the items result but be handled
        before the result is (the result only wakes this task up). Replaying every update
        seen since the request went out is correct either way: each sets an id's presence
        (or clears the node) in the order the service made the changes.
        """
        invalid = apply_items(self.blocklist, node, ids)
        self.invalid_items += len(invalid)
        for update in self._buffers.pop(node, ()):
            apply_update(self.blocklist, node, update, count=False)
        return invalid

    def _handle_update(self, node: RtblNode, update: NodeUpdate) -> int:
        buffer = self._buffers.get(node)
        if buffer is not None:
            buffer.append(update)
        invalid = apply_update(self.blocklist, node, update)
        self.invalid_items += invalid
        return invalid

    def _mark_synced(self, node: RtblNode) -> None:
        self._synced_nodes.add(node)
        if len(self._synced_nodes) == len(self.config.nodes):
            self.synced.set()

    async def _request(self, xmpp: ClientXMPP, iq: Any, node: RtblNode, what: str) -> ET.Element:
        try:
            result = await iq.send(timeout=self.config.request_timeout)
        except IqTimeout:
            raise RtblError(f"{what}: no answer within {self.config.request_timeout}s") from None
        except IqError as exc:
            error = exc.iq["error"]
            detail = f"{error['type']}/{error['condition']}"
            if error["text"]:
                detail += f" ({str(error['text'])[:200]})"
            raise RtblError(f"{what}: refused: {detail}") from None
        element: ET.Element = result.xml
        sender = element.get("from") or ""
        if _bare_or_none(sender) != node.service:
            raise RtblError(f"{what}: answer from {sender[:100]!r}, not {node.service}")
        return element

    async def _subscribe(self, xmpp: ClientXMPP, node: RtblNode) -> None:
        iq = xmpp.make_iq_set(subscribe_request(node.node, self._bare), ito=node.service)
        result = await self._request(xmpp, iq, node, f"subscribing to {node.source}")
        sub = result.find(f"{{{PUBSUB_NS}}}pubsub/{{{PUBSUB_NS}}}subscription")
        state = sub.get("subscription") if sub is not None else None
        if state not in (None, "subscribed"):
            log.warning(
                "RTBL subscription not active yet",
                extra={"source": node.source, "subscription": state},
            )

    async def _fetch(self, xmpp: ClientXMPP, node: RtblNode) -> list[str]:
        ids: list[str] = []
        after: str | None = None
        for _ in range(MAX_PAGES):
            iq = xmpp.make_iq_get(ito=node.service)
            iq.append(items_request(node.node, after))
            result = await self._request(xmpp, iq, node, f"fetching {node.source}")
            page = parse_items_page(result, node.node)
            ids.extend(page.ids)
            if len(ids) > MAX_ITEMS_PER_NODE:
                raise RtblError(f"{node.source} has more than {MAX_ITEMS_PER_NODE} items")
            if page.next_after is None or page.next_after == after:
                return ids
            after = page.next_after
        raise RtblError(f"{node.source}: more than {MAX_PAGES} pages")

    # -- notifications ------------------------------------------------------------------------

    def _on_event_message(self, message: Any) -> None:
        element: ET.Element = message.xml
        service = _bare_or_none(element.get("from") or "")
        if service is None:
            return
        for update in parse_event(element):
            node = self._by_service_node.get((service, update.node))
            if node is None:
                log.debug(
                    "RTBL notification for a node not subscribed here",
                    extra={"service": service[:100], "node": update.node[:100]},
                )
                continue
            invalid = self._handle_update(node, update)
            if invalid:
                log.info(
                    "RTBL items ignored (not valid entries)",
                    extra={"source": node.source, "invalid": invalid},
                )


def _bare_or_none(jid: str) -> str | None:
    try:
        return str(normalise_bare(jid)) if jid else None
    except (RuleError, ValueError):
        return None


def rtbl_nodes(specs: Iterable[str]) -> tuple[RtblNode, ...]:
    """Parse every spec; refuse duplicates.

    Raises:
        RtblError: naming the first bad spec.
    """
    nodes: dict[tuple[str, str], RtblNode] = {}
    for spec in specs:
        node = parse_rtbl_node(spec)
        if (node.service, node.node) in nodes:
            raise RtblError(f"{spec!r}: listed twice")
        nodes[(node.service, node.node)] = node
    return tuple(nodes.values())
