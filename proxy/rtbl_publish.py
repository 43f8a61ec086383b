"""Publishing StanzaGuard's block list to XEP-0060 pubsub nodes, as xmppbl.org does.

The counterpart of `proxy.rtbl` (the subscriber). The list itself lives in the store
(`archive_api.blocklist`); this module keeps pubsub nodes equal to it:

- Nodes of domains (default ``spam_source_domains``) get one item per listed domain, nodes
  of JID hashes (default ``spam_source_jids_sha256`` and ``muc_bans_sha256``, the names
  Prosody's ``mod_anti_spam`` and ``mod_muc_rtbl`` read by default) one item per hex SHA-256
  of a listed bare JID. The item id is the entry; the payload, which subscribers ignore, is a
  XEP-0377 ``<report reason='urn:xmpp:reporting:spam'/>`` as xmppbl.org suggests.
- On every (re)connection each node is created if missing (``pubsub#max_items = max``,
  open access, persistent items; an existing node is reconfigured the same way, since
  Prosody keeps only 20 items by default), its items are fetched, and the difference to the
  wanted ids is published and retracted (retractions with ``notify``, so subscribers hear).
  After that the publisher re-reads the wanted ids whenever the list's version changes
  (polled every ``poll_interval``, or at once on `notify`) and applies the difference, and
  re-fetches the nodes every ``refresh_interval`` to repair anything changed behind its back.
- The nodes are StanzaGuard's own: an item it did not publish is retracted.
- When the service is unreachable nothing is lost: the wanted list is in the store and the
  next session reconciles; reconnection backs off exponentially with jitter.

Only this module, `proxy.rtbl` and `proxy.component` import slixmpp's connection classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge
from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout

from classifier.blocklists import RTBL_NODE_KINDS, ListKind
from classifier.jid import normalise_bare
from proxy.reconnect import ReconnectingTask, SessionEnded, SessionWatch, close_connection
from proxy.rtbl import (
    MAX_ITEMS_PER_NODE,
    MAX_PAGES,
    PUBSUB_NS,
    RtblError,
    TlsMode,
    install_sasl_redaction,
    items_request,
    parse_items_page,
)

log = logging.getLogger(__name__)

PUBSUB_OWNER_NS = "http://jabber.org/protocol/pubsub#owner"
DATA_FORMS_NS = "jabber:x:data"
REPORTING_NS = "urn:xmpp:reporting:1"
SPAM_REASON = "urn:xmpp:reporting:spam"
NODE_CONFIG_FORM = "http://jabber.org/protocol/pubsub#node_config"
#: Requests in flight at once while publishing or retracting a batch.
PIPELINE = 32

PUBLISHED = Counter(
    "stanzaguard_rtbl_published_items", "Items the RTBL publisher sent, by change", ["change"]
)
PUBLISH_CONNECTED = Gauge("stanzaguard_rtbl_publisher_connected", "1 while the publisher is up")


class PublishError(Exception):
    """The pubsub service refused or did not answer; the session is restarted."""


@dataclass(frozen=True, slots=True)
class PublishConfig:
    """Where and how to publish.

    Attributes:
        jid, password: The publishing account (it must be allowed to create nodes: on
            Prosody, a server admin).
        service: The pubsub service JID (``pubsub.example.org``).
        nodes: Node name → kind of its ids (``domains`` or ``jid_sha256``).
        host, port, tls, ssl_context: As for the subscriber (`proxy.rtbl.RtblConfig`).
        poll_interval: Seconds between checks of the list's version.
        refresh_interval: Seconds between full re-fetches of the nodes.
    """

    jid: str
    password: str = field(repr=False)
    service: str
    nodes: Mapping[str, ListKind]
    host: str | None = None
    port: int | None = None
    tls: TlsMode = TlsMode.STARTTLS
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    request_timeout: float = 30.0
    connect_timeout: float = 30.0
    poll_interval: float = 2.0
    refresh_interval: float = 3600.0


def publish_nodes(domain_nodes: Iterable[str], jid_nodes: Iterable[str]) -> dict[str, ListKind]:
    """Node name → kind; a well-known name must keep its kind (the subscribers assume it).

    Raises:
        PublishError: a name used twice, empty, or a well-known name of the other kind.
    """
    nodes: dict[str, ListKind] = {}
    for names, kind in ((domain_nodes, ListKind.DOMAINS), (jid_nodes, ListKind.JID_SHA256)):
        for name in names:
            if not name or len(name) > 200 or name.strip() != name:
                raise PublishError(f"invalid node name {name[:40]!r}")
            known = RTBL_NODE_KINDS.get(name)
            if known is not None and known is not kind:
                raise PublishError(f"node {name} holds {known.value}, not {kind.value}")
            if name in nodes:
                raise PublishError(f"node {name} named twice")
            nodes[name] = kind
    if not nodes:
        raise PublishError("no nodes to publish to")
    return nodes


# --- requests (pure) --------------------------------------------------------------------------


def _form(fields: Mapping[str, str]) -> ET.Element:
    form = ET.Element(f"{{{DATA_FORMS_NS}}}x", type="submit")
    hidden = ET.SubElement(form, f"{{{DATA_FORMS_NS}}}field", var="FORM_TYPE", type="hidden")
    ET.SubElement(hidden, f"{{{DATA_FORMS_NS}}}value").text = NODE_CONFIG_FORM
    for var, value in fields.items():
        item = ET.SubElement(form, f"{{{DATA_FORMS_NS}}}field", var=var)
        ET.SubElement(item, f"{{{DATA_FORMS_NS}}}value").text = value
    return form


NODE_CONFIG = {
    "pubsub#max_items": "max",
    "pubsub#persist_items": "1",
    "pubsub#access_model": "open",
}


def create_request(node: str) -> ET.Element:
    pubsub = ET.Element(f"{{{PUBSUB_NS}}}pubsub")
    ET.SubElement(pubsub, f"{{{PUBSUB_NS}}}create", node=node)
    configure = ET.SubElement(pubsub, f"{{{PUBSUB_NS}}}configure")
    configure.append(_form(NODE_CONFIG))
    return pubsub


def configure_request(node: str) -> ET.Element:
    pubsub = ET.Element(f"{{{PUBSUB_OWNER_NS}}}pubsub")
    configure = ET.SubElement(pubsub, f"{{{PUBSUB_OWNER_NS}}}configure", node=node)
    configure.append(_form(NODE_CONFIG))
    return pubsub


def publish_request(node: str, item_id: str) -> ET.Element:
    pubsub = ET.Element(f"{{{PUBSUB_NS}}}pubsub")
    publish = ET.SubElement(pubsub, f"{{{PUBSUB_NS}}}publish", node=node)
    item = ET.SubElement(publish, f"{{{PUBSUB_NS}}}item", id=item_id)
    ET.SubElement(item, f"{{{REPORTING_NS}}}report", reason=SPAM_REASON)
    return pubsub


def retract_request(node: str, item_id: str) -> ET.Element:
    pubsub = ET.Element(f"{{{PUBSUB_NS}}}pubsub")
    retract = ET.SubElement(pubsub, f"{{{PUBSUB_NS}}}retract", node=node, notify="true")
    ET.SubElement(retract, f"{{{PUBSUB_NS}}}item", id=item_id)
    return pubsub


# --- the publisher ----------------------------------------------------------------------------

WantedIds = Callable[[ListKind], Awaitable[frozenset[str]]]
ListVersion = Callable[[], Awaitable[int]]


class RtblPublisher:
    """Keeps the pubsub nodes equal to the wanted ids, reconnecting with backoff.

    ``wanted(kind)`` gives the ids that should be on every node of that kind (the listed
    entries); ``version()`` a number that changes when they may have. `start` returns at
    once. `published` is what the nodes are known to hold (for tests and metrics);
    `in_sync` is set while they hold exactly what is wanted.
    """

    def __init__(
        self,
        config: PublishConfig,
        wanted: WantedIds,
        version: ListVersion,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not config.nodes:
            raise PublishError("no nodes to publish to")
        self.config = config
        self._wanted = wanted
        self._version = version
        self._bare = str(normalise_bare(config.jid))
        self._connection = ReconnectingTask(
            self._session,
            name="rtbl-publisher",
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
            on_session_end=self._session_ended,
            rand=rand,
        )
        self._changed = asyncio.Event()
        self.published: dict[str, set[str]] = {}
        self.in_sync = asyncio.Event()
        self.connected = False
        self.sessions = 0
        self.failures = 0

    async def start(self) -> None:
        install_sasl_redaction()
        self._connection.start()

    async def stop(self) -> None:
        await self._connection.stop()

    def notify(self) -> None:
        """The list may have changed: reconcile now rather than at the next poll."""
        self._changed.set()

    def _session_ended(self, error: Exception, _delay: float) -> None:
        """`proxy.reconnect` reports each ended session here (then backs off)."""
        self.failures += 1
        if isinstance(error, (SessionEnded, PublishError)):
            log.warning("RTBL publisher session ended", extra={"reason": str(error)[:300]})
        else:
            log.error("RTBL publisher failed", exc_info=error)

    def _build(self) -> ClientXMPP:
        cfg = self.config
        plain = cfg.tls is TlsMode.PLAIN
        xmpp = ClientXMPP(
            f"{self._bare}/stanzaguard-rtbl-publisher-{secrets.token_hex(4)}",
            cfg.password,
            plugin_config={
                "feature_mechanisms": {"unencrypted_plain": plain, "unencrypted_scram": plain}
            },
            ssl_context=cfg.ssl_context,
        )
        xmpp.enable_direct_tls = cfg.tls is TlsMode.DIRECT
        xmpp.enable_starttls = cfg.tls is TlsMode.STARTTLS
        xmpp.enable_plaintext = plain
        xmpp.whitespace_keepalive = True
        return xmpp

    async def _session(self) -> None:
        cfg = self.config
        xmpp = self._build()
        watch = SessionWatch()
        started, ended, end, on_start = watch.started, watch.ended, watch.end, watch.start

        def on_failed_connection(error: object) -> None:
            xmpp.cancel_connection_attempt()
            end(f"cannot connect: {error}")

        handlers: list[tuple[str, Callable[[Any], None]]] = [
            ("session_start", on_start),
            ("failed_all_auth", lambda _e: end("authentication failed")),
            ("connection_failed", on_failed_connection),
            ("disconnected", lambda reason: end(f"disconnected: {reason or 'closed'}")),
            ("stream_error", lambda _e: end("stream error")),
            ("ssl_invalid_chain", lambda error: end(f"TLS certificate rejected: {error}")),
        ]
        for name, handler in handlers:
            xmpp.add_event_handler(name, handler)
        work: asyncio.Task[None] | None = None
        try:
            if cfg.host is not None and cfg.port is not None:
                xmpp.connect(cfg.host, cfg.port)
            else:
                xmpp.connect()
            try:
                await asyncio.wait_for(started, cfg.connect_timeout)
            except TimeoutError:
                raise SessionEnded(f"no session within {cfg.connect_timeout}s") from None
            self._connection.session_started()
            self.sessions += 1
            self.connected = True
            PUBLISH_CONNECTED.set(1)
            log.info("RTBL publisher connected", extra={"service": cfg.service})
            work = asyncio.create_task(self._keep_in_sync(xmpp), name="rtbl-publish-sync")
            waiters: set[asyncio.Future[Any]] = {work, ended}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()  # raises PublishError; a clean return cannot happen
            raise SessionEnded(ended.result())
        finally:
            if work is not None:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
            self.connected = False
            self.in_sync.clear()
            PUBLISH_CONNECTED.set(0)
            for name, handler in handlers:
                xmpp.del_event_handler(name, handler)
            await close_connection(xmpp)

    async def _keep_in_sync(self, xmpp: ClientXMPP) -> None:
        cfg = self.config
        for node in cfg.nodes:
            await self._ensure_node(xmpp, node)
        while True:
            for node in cfg.nodes:
                self.published[node] = set(await self._fetch(xmpp, node))
            refresh_at = time.monotonic() + cfg.refresh_interval
            while time.monotonic() < refresh_at:
                version = await self._version()
                await self._reconcile(xmpp)
                # Wait for a change: a notify, or a new version at the next poll.
                while time.monotonic() < refresh_at:
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), cfg.poll_interval)
                    if self._changed.is_set() or await self._version() != version:
                        break

    async def _reconcile(self, xmpp: ClientXMPP) -> None:
        wanted: dict[ListKind, frozenset[str]] = {}
        for kind in set(self.config.nodes.values()):
            wanted[kind] = await self._wanted(kind)
        for node, kind in self.config.nodes.items():
            have = self.published.setdefault(node, set())
            add = sorted(wanted[kind] - have)
            remove = sorted(have - wanted[kind])
            if add or remove:
                self.in_sync.clear()
            await self._batch(xmpp, node, add, publish=True)
            await self._batch(xmpp, node, remove, publish=False)
            if add or remove:
                log.info(
                    "RTBL node updated",
                    extra={"node": node, "published": len(add), "retracted": len(remove)},
                )
        self.in_sync.set()

    async def _batch(self, xmpp: ClientXMPP, node: str, ids: list[str], *, publish: bool) -> None:
        have = self.published[node]
        for start in range(0, len(ids), PIPELINE):
            chunk = ids[start : start + PIPELINE]
            make = publish_request if publish else retract_request
            what = "publishing to" if publish else "retracting from"
            await asyncio.gather(
                *(self._set(xmpp, make(node, item), f"{what} {node}") for item in chunk)
            )
            if publish:
                have.update(chunk)
            else:
                have.difference_update(chunk)
            PUBLISHED.labels("publish" if publish else "retract").inc(len(chunk))

    async def _set(self, xmpp: ClientXMPP, payload: ET.Element, what: str) -> ET.Element:
        iq: Any = xmpp.make_iq_set(payload, ito=self.config.service)
        return await self._send(iq, what)

    async def _send(self, iq: Any, what: str) -> ET.Element:
        try:
            result = await iq.send(timeout=self.config.request_timeout)
        except IqTimeout:
            raise PublishError(f"{what}: no answer in {self.config.request_timeout}s") from None
        except IqError as exc:
            error = exc.iq["error"]
            raise PublishError(f"{what}: refused: {error['type']}/{error['condition']}") from None
        element: ET.Element = result.xml
        return element

    async def _ensure_node(self, xmpp: ClientXMPP, node: str) -> None:
        iq: Any = xmpp.make_iq_set(create_request(node), ito=self.config.service)
        try:
            await iq.send(timeout=self.config.request_timeout)
            log.info("RTBL node created", extra={"node": node})
            return
        except IqTimeout:
            raise PublishError(f"creating {node}: no answer") from None
        except IqError as exc:
            if exc.iq["error"]["condition"] != "conflict":
                error = exc.iq["error"]
                raise PublishError(
                    f"creating {node}: refused: {error['type']}/{error['condition']}"
                ) from None
        # It exists: make sure it keeps every item (Prosody's default is 20).
        await self._set_owner(xmpp, node)

    async def _set_owner(self, xmpp: ClientXMPP, node: str) -> None:
        iq: Any = xmpp.make_iq_set(configure_request(node), ito=self.config.service)
        await self._send(iq, f"configuring {node}")

    async def _fetch(self, xmpp: ClientXMPP, node: str) -> list[str]:
        ids: list[str] = []
        after: str | None = None
        for _ in range(MAX_PAGES):
            iq: Any = xmpp.make_iq_get(ito=self.config.service)
            iq.append(items_request(node, after))
            try:
                page = parse_items_page(await self._send(iq, f"fetching {node}"), node)
            except RtblError as exc:
                raise PublishError(str(exc)) from None
            ids.extend(page.ids)
            if len(ids) > MAX_ITEMS_PER_NODE:
                raise PublishError(f"{node} has more than {MAX_ITEMS_PER_NODE} items")
            if page.next_after is None or page.next_after == after:
                return ids
            after = page.next_after
        raise PublishError(f"{node}: more than {MAX_PAGES} pages")
