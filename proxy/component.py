"""Component mode: an XEP-0114 external component that archives copies the server forwards.

The server (Prosody `mod_firewall` `FORWARD=`, see docs/integrations/component.md) wraps a
copy of each chat message and subscription request in XEP-0297
``<message from='SERVER DOMAIN' to='COMPONENT'><forwarded><message .../></forwarded></message>``
and sends it to this component. The copies go through the same pipeline as the inline proxy
(`proxy.pipeline`: normalisation, decision, spool, indexer) on the `Direction.COPY` leg, with
the same deterministic record ids, so a message that the inline proxy also saw is one record.

What this mode can and cannot do:
- it archives and scores, but cannot block: the stanza has been delivered by the time its copy
  arrives. `ObserveOnlyDecider` turns what would have been a refusal into FLAG with a reason
  saying so, so the record says "delivered" (the truth) and lands in the review queue;
- a forward is believed only when its outer ``from`` is exactly one of the server's own
  domains: any user can send a ``<forwarded/>`` to the component, and Prosody stamps the
  user's JID as ``from`` on it. Anything else sent to the component (chat, forged forwards,
  forwards without a stanza, oversized copies) is counted and dropped, never archived;
- XEP-0377 spam reports (an XEP-0191 ``<block/>`` iq carrying ``<report/>``) sent to the
  component's JID by a local user are archived and learned from exactly as through the
  inline proxy; the iq is answered only once the report is durable;
- XEP-0050 ad-hoc commands (`AdminCommands`) are open to the configured admin JIDs only;
  every command stanza from anyone else is refused (``forbidden``) before slixmpp sees it,
  and the refusal is audited too.

The connection is kept by `ComponentLink`: it reconnects with exponential backoff (jittered)
whenever the server goes away, and forwards from the server are queued to one worker that
hands them to the pipeline in batches (one group commit each). The spool is the durability
point: when the archive store is down, copies stay in the spool until the indexer can move
them; if the spool itself is down, the copies of that batch are logged as lost (the server has
delivered them already; this mode cannot refuse anything).

Only this module (and the RTBL client) imports slixmpp's connection classes; slixmpp objects
are turned into `ForwardedCopy` / `Element` values right where they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from prometheus_client import Counter, Gauge
from slixmpp import ComponentXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.jid import JID, InvalidJID
from slixmpp.xmlstream import tostring
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from archive_api.store.records import Direction
from classifier.context import DecisionContext
from classifier.verdict import Action, Reason, Verdict
from proxy.errors import ProxyError
from proxy.hook import DecisionKind, SessionInfo, StanzaHook
from proxy.pipeline import Decider
from proxy.reconnect import ReconnectingTask, SessionEnded, SessionWatch, close_connection
from proxy.stream import Element

log = logging.getLogger(__name__)

CLIENT_NS: Final = "jabber:client"
COMPONENT_NS: Final = "jabber:component:accept"
SERVER_NS: Final = "jabber:server"
FORWARD_NS: Final = "urn:xmpp:forward:0"
BLOCKING_NS: Final = "urn:xmpp:blocking"
COMMANDS_NS: Final = "http://jabber.org/protocol/commands"
DATA_FORMS_NS: Final = "jabber:x:data"
PING_NS: Final = "urn:xmpp:ping"
CARBONS_NS: Final = "urn:xmpp:carbons:2"
MAM_NS: Final = "urn:xmpp:mam:2"
#: What is refused routinely (a server copying everything): counted, logged at debug only.
_QUIET: Final = frozenset({"ignored", "history"})
_STANZA_NAMESPACES: Final = frozenset({CLIENT_NS, COMPONENT_NS, SERVER_NS})
#: How long `ComponentLink.stop` waits for received copies and reports to be spooled.
STOP_DRAIN_SECONDS: Final = 10.0

COPIES = Counter(
    "stanzaguard_component_copies_total",
    "Stanzas sent to the component, by what became of them",
    ["outcome"],
)
CONNECTED = Gauge("stanzaguard_component_connected", "1 while the component is connected")

#: Ad-hoc command nodes.
NODE_RECENT: Final = "recent-verdicts"
NODE_DENY: Final = "deny-domain"
MAX_RECENT: Final = 50


class ComponentError(ProxyError):
    """The component could not do what was asked (a bad setting, an admin command refused)."""


@dataclass(frozen=True, slots=True)
class ComponentConfig:
    """How to reach the server and whom to believe.

    Attributes:
        jid: The component's domain (``archive.example``).
        secret: The shared secret of the server's ``Component`` section (XEP-0114 handshake).
        host, port: The server's component port (Prosody: 5347 on loopback).
        server_domains: The server's own domains: forwards are believed only from these.
        admins: Bare JIDs allowed to run the ad-hoc commands.
        max_stanza_bytes: Largest forwarded copy accepted (serialised); bigger ones are
            counted and dropped.
        queue_limit: Copies waiting for the pipeline; beyond it new ones are dropped (logged).
        batch_size: Copies handed to the pipeline in one group commit at most.
    """

    jid: str
    secret: str = field(repr=False)
    host: str
    port: int
    server_domains: frozenset[str]
    admins: frozenset[str] = frozenset()
    max_stanza_bytes: int = 256 * 1024
    queue_limit: int = 10_000
    batch_size: int = 256
    connect_timeout: float = 30.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    ping_interval: float = 60.0
    request_timeout: float = 20.0


# --- the edge: slixmpp elements in, our values out -----------------------------------------------


@dataclass(frozen=True, slots=True)
class ForwardedCopy:
    """One stanza the server forwarded, re-serialised in ``jabber:client``."""

    forwarder: str  # the outer `from`: one of the server's domains
    name: str  # message or presence
    data: bytes = field(repr=False)
    attrs: dict[str, str] = field(default_factory=dict)

    def element(self) -> Element:
        return Element(self.data, CLIENT_NS, self.name, dict(self.attrs), {})


@dataclass(frozen=True, slots=True)
class Refused:
    """Why something sent to the component was not taken (a metric label and a log detail)."""

    outcome: str
    detail: str


def _local_name(tag: object) -> tuple[str, str]:
    if not isinstance(tag, str):
        return "", ""
    if tag.startswith("{"):
        namespace, _, name = tag[1:].partition("}")
        return namespace, name
    return "", tag


def as_client_stanza(element: ET.Element) -> ET.Element:
    """A copy of a stanza with its stream namespace (component, server) made ``jabber:client``.

    Only the stanza's own elements in a stream namespace are renamed; payloads keep theirs.
    """
    clone = copy.deepcopy(element)
    for node in clone.iter():
        namespace, name = _local_name(node.tag)
        if namespace in _STANZA_NAMESPACES:
            node.tag = f"{{{CLIENT_NS}}}{name}"
    return clone


def _bare_domain(text: str | None) -> str | None:
    """The JID's domain if the JID is a bare domain (no node, no resource), else None."""
    if not text:
        return None
    try:
        jid = JID(text)
    except (InvalidJID, ValueError, UnicodeError):
        return None
    if jid.user or jid.resource:
        return None
    return jid.domain.lower()


def read_forward(
    outer: ET.Element, server_domains: frozenset[str], max_stanza_bytes: int
) -> ForwardedCopy | Refused:
    """The copy inside a server's forward, or why it is refused.

    Believed only when the outer ``from`` is exactly one of `server_domains` (a user's forged
    forward carries the user's JID, stamped by the server), with exactly one ``<forwarded/>``
    holding exactly one message or presence, no bigger than `max_stanza_bytes`.

    Servers that copy every stanza (ejabberd's ``mod_service_log``) also send iqs and the
    copies they make themselves: carbons (the account to its own resources) and MAM results
    (the account's or a room's archive answering). Those are ``ignored`` and ``history``: the
    message itself was copied when it was sent or delivered. A carbon or MAM wrapper from
    anyone else is a forgery and goes through as a message, so the pipeline archives it as
    evidence (`proxy.stanza` flags it).
    """
    forwarder = _bare_domain(outer.get("from"))
    if forwarder is None or forwarder not in server_domains:
        return Refused("forged", f"forward from {str(outer.get('from'))[:200]!r}")
    wrappers = [c for c in outer if _local_name(c.tag) == (FORWARD_NS, "forwarded")]
    if len(wrappers) != 1:
        return Refused("malformed", f"{len(wrappers)} <forwarded/> elements")
    stanzas = [c for c in wrappers[0] if _local_name(c.tag)[0] in _STANZA_NAMESPACES]
    if len(stanzas) != 1:
        return Refused("malformed", f"{len(stanzas)} stanzas inside <forwarded/>")
    _, name = _local_name(stanzas[0].tag)
    if name == "iq":
        return Refused("ignored", "iq")
    if name not in ("message", "presence"):
        return Refused("malformed", f"<{name[:40]}/> inside <forwarded/>")
    if name == "message" and _server_history(stanzas[0]):
        return Refused("history", "a carbon or archive result made by the server")
    inner = as_client_stanza(stanzas[0])
    data = tostring(inner, top_level=True).encode("utf-8", "surrogatepass")
    if len(data) > max_stanza_bytes:
        return Refused("oversized", f"{len(data)} bytes")
    attrs = {k: v for k, v in inner.attrib.items() if not k.startswith("{")}
    return ForwardedCopy(forwarder=forwarder, name=name, data=data, attrs=attrs)


def _server_history(message: ET.Element) -> bool:
    """A carbon from the account to itself, or a MAM result from an archive's bare JID."""
    kinds = {_local_name(child.tag) for child in message}
    carbon = (CARBONS_NS, "sent") in kinds or (CARBONS_NS, "received") in kinds
    archive = (MAM_NS, "result") in kinds
    if not (carbon or archive):
        return False
    sender, to = message.get("from") or "", message.get("to") or ""
    if not sender:
        return True
    try:
        source, target = JID(sender), JID(to)
    except (InvalidJID, ValueError, UnicodeError):
        return False
    if source.resource:
        return False
    return source.bare == target.bare or archive


# --- deciding without blocking -------------------------------------------------------------------


class ObserveOnlyDecider:
    """The policy's verdict, except that nothing is refused: the copy was delivered already.

    A verdict that would hold, bounce or drop becomes FLAG (same score, same reasons, plus
    one saying what it would have been), so the record truthfully says "delivered" and an
    officer sees it in the review queue.
    """

    def __init__(self, inner: Decider) -> None:
        self.inner = inner

    def evaluate(self, ctx: DecisionContext) -> Verdict:
        verdict = self.inner.evaluate(ctx)
        if verdict.action.delivers:
            return verdict
        note = Reason(
            "component",
            f"component mode cannot block (would be {verdict.action.value})",
            0.0,
            Action.FLAG,
        )
        return Verdict(Action.FLAG, verdict.score, (*verdict.reasons, note))


# --- admin commands ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerdictLine:
    """One archived stanza of a sender, as the recent-verdicts command shows it."""

    at: str  # ISO 8601
    recipient: str
    action: str
    score: float
    reasons: str


class AdminCommands(Protocol):
    """What the ad-hoc commands do; the composition root implements it (store, policy, audit).

    Each method audits what it did (or that it failed) before returning. Raise
    `ComponentError` with a message fit for the admin on a bad request.
    """

    async def recent_verdicts(
        self, admin: str, sender: str, limit: int
    ) -> Sequence[VerdictLine]: ...

    async def deny_domain(self, admin: str, domain: str) -> str:
        """Put `domain` on the policy's block list; return a confirmation for the admin."""
        ...

    async def refused(self, who: str, node: str) -> None:
        """Someone who is not an admin tried a command (audited as denied)."""
        ...


# --- the connection ------------------------------------------------------------------------------


@dataclass(slots=True)
class ComponentStats:
    sessions: int = 0
    archived: int = 0  # copies handed to the pipeline and spooled
    refused: dict[str, int] = field(default_factory=dict)
    reports: int = 0
    lost: int = 0  # copies the pipeline could not spool (logged)

    def refuse(self, outcome: str) -> None:
        self.refused[outcome] = self.refused.get(outcome, 0) + 1


class ComponentLink:
    """Keeps the XEP-0114 connection and feeds what arrives to the pipeline.

    `start` returns at once; the connection is made (and remade, with backoff) in the
    background. `connected` is set while a session is up.
    """

    def __init__(
        self,
        config: ComponentConfig,
        hook: StanzaHook,
        *,
        admin: AdminCommands | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.hook = hook
        self.admin = admin
        self.domain = config.jid.lower()
        self.admins = frozenset(a.lower() for a in config.admins)
        self.stats = ComponentStats()
        self.connected = asyncio.Event()
        self._queue: asyncio.Queue[ForwardedCopy] = asyncio.Queue(config.queue_limit)
        self._connection = ReconnectingTask(
            self._session,
            name="component-link",
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
            on_session_end=self._session_ended,
            rand=rand,
        )
        self._feeder: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self._xmpp: ComponentXMPP | None = None
        self._copy_session = SessionInfo(
            session_id=f"component:{self.domain}",
            client_address="component",
            domain=self.domain,
        )

    async def start(self) -> None:
        self._connection.start()
        self._feeder = asyncio.create_task(self._feed(), name="component-feed")

    async def stop(self) -> None:
        """Disconnect, then hand what is still queued to the pipeline."""
        await self._connection.stop()
        feed, self._feeder = self._feeder, None
        # Nothing arrives any more: let the worker finish what was received (bounded).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), STOP_DRAIN_SECONDS)
        if self._reports:
            await asyncio.wait(self._reports, timeout=STOP_DRAIN_SECONDS)
        if feed is not None:
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
        await self._drain_queue()

    async def idle(self) -> None:
        """Return once every copy received so far went through the pipeline (tests, shutdown)."""
        await self._queue.join()

    # -- connecting ---------------------------------------------------------------------------

    def _session_ended(self, error: Exception, delay: float) -> None:
        """`proxy.reconnect` reports each ended session here (then backs off)."""
        if isinstance(error, SessionEnded):
            log.warning("component connection ended", extra={"reason": str(error)})
        else:
            log.error("component connection failed", exc_info=error)
        log.info("component reconnecting", extra={"delay_seconds": round(delay, 2)})

    def _build(self) -> ComponentXMPP:
        cfg = self.config
        xmpp = ComponentXMPP(cfg.jid, cfg.secret, cfg.host, cfg.port)  # type: ignore[no-untyped-call]
        xmpp.whitespace_keepalive = False  # our pings detect a dead connection
        for plugin in ("xep_0030", "xep_0004", "xep_0050"):
            xmpp.register_plugin(plugin)
        ns = xmpp.default_ns
        xmpp.register_handler(
            Callback(
                "component forward",
                MatchXPath(f"{{{ns}}}message/{{{FORWARD_NS}}}forwarded"),
                self._on_forward,
            )
        )
        xmpp.register_handler(
            Callback(
                "component report",
                MatchXPath(f"{{{ns}}}iq/{{{BLOCKING_NS}}}block"),
                self._on_report,
            )
        )
        xmpp.add_filter("in", self._only_admins)
        adhoc: Any = xmpp.plugin["xep_0050"]
        adhoc.add_command(
            node=NODE_RECENT, name="Recent verdicts of a sender", handler=self._cmd_recent
        )
        adhoc.add_command(
            node=NODE_DENY, name="Add a domain to the block list", handler=self._cmd_deny
        )
        return xmpp

    async def _session(self) -> None:
        """One connection: handshake, then serve until it drops (always `SessionEnded`)."""
        cfg = self.config
        xmpp = self._xmpp = self._build()
        watch = SessionWatch()
        started, ended, end, on_session_start = watch.started, watch.ended, watch.end, watch.start

        def on_connection_failed(error: object) -> None:
            xmpp.cancel_connection_attempt()  # our loop does the backoff, not slixmpp's
            end(f"cannot connect: {error}")

        def on_disconnected(reason: object) -> None:
            end(f"disconnected: {reason or 'connection closed'}")

        def on_stream_error(error: Any) -> None:
            # Prosody answers a wrong secret with <not-authorized/>.
            end(f"stream error: {error['condition'] if error is not None else error}")

        handlers: list[tuple[str, Callable[[Any], None]]] = [
            ("session_start", on_session_start),
            ("connection_failed", on_connection_failed),
            ("disconnected", on_disconnected),
            ("stream_error", on_stream_error),
        ]
        for name, handler in handlers:
            xmpp.add_event_handler(name, handler)
        ping: asyncio.Task[None] | None = None
        try:
            xmpp.connect(cfg.host, cfg.port)
            try:
                await asyncio.wait_for(started, cfg.connect_timeout)
            except TimeoutError:
                raise SessionEnded(f"no session within {cfg.connect_timeout}s") from None
            self._connection.session_started()
            self.stats.sessions += 1
            self.connected.set()
            CONNECTED.set(1)
            log.info("component connected", extra={"jid": cfg.jid, "server": cfg.host})
            ping = asyncio.create_task(self._ping(xmpp, end), name="component-ping")
            reason = await ended
            raise SessionEnded(reason)
        finally:
            if ping is not None:
                ping.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ping
            if self.connected.is_set():
                self.connected.clear()
                CONNECTED.set(0)
            for name, handler in handlers:
                xmpp.del_event_handler(name, handler)
            await close_connection(xmpp)
            self._xmpp = None

    async def _ping(self, xmpp: ComponentXMPP, end: Callable[[str], None]) -> None:
        cfg = self.config
        server = sorted(cfg.server_domains)[0] if cfg.server_domains else cfg.host
        while True:
            await asyncio.sleep(cfg.ping_interval)
            iq: Any = xmpp.make_iq_get(ito=server, ifrom=cfg.jid)
            iq.append(ET.Element(f"{{{PING_NS}}}ping"))
            try:
                await iq.send(timeout=cfg.request_timeout)
            except IqTimeout:
                end(f"no answer to a ping within {cfg.request_timeout}s")
                xmpp.abort()
                return
            except IqError:
                pass  # an error reply still proves the connection is alive

    # -- copies ------------------------------------------------------------------------------

    def _on_forward(self, message: Any) -> None:
        read = read_forward(message.xml, self.config.server_domains, self.config.max_stanza_bytes)
        if isinstance(read, Refused):
            self._refuse(read)
            return
        try:
            self._queue.put_nowait(read)
        except asyncio.QueueFull:
            self._refuse(Refused("overflow", f"more than {self.config.queue_limit} queued"))

    def _refuse(self, refused: Refused) -> None:
        self.stats.refuse(refused.outcome)
        COPIES.labels(refused.outcome).inc()
        log.log(
            logging.DEBUG if refused.outcome in _QUIET else logging.WARNING,
            "stanza sent to the component not archived",
            extra={"outcome": refused.outcome, "detail": refused.detail},
        )

    async def _feed(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.config.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._process(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _drain_queue(self) -> None:
        batch: list[ForwardedCopy] = []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
            self._queue.task_done()
        if batch:
            await self._process(batch)

    async def _process(self, batch: Sequence[ForwardedCopy]) -> None:
        elements = [item.element() for item in batch]
        try:
            decisions = await self.hook.process(self._copy_session, Direction.COPY, elements)
        except Exception:
            self.stats.lost += len(batch)
            COPIES.labels("lost").inc(len(batch))
            log.exception("the pipeline failed on %d forwarded copies", len(batch))
            return
        # The pipeline answers "drop" only when the spool could not take the batch.
        lost = sum(1 for d in decisions if d.kind is DecisionKind.DROP)
        self.stats.lost += lost
        self.stats.archived += len(batch) - lost
        COPIES.labels("taken").inc(len(batch) - lost)
        if lost:
            COPIES.labels("lost").inc(lost)
            log.error("spool unavailable: %d forwarded copies not archived", lost)

    # -- reports (XEP-0377) ---------------------------------------------------------------------

    def _on_report(self, iq: Any) -> None:
        xml: ET.Element = iq.xml
        if xml.get("type") == "get":
            self._reply_error(iq, "modify", "bad-request", "a report is an iq of type set")
            return
        if xml.get("type") != "set":
            return  # results and errors are answers to nothing we asked
        sender = str(xml.get("from") or "")
        try:
            reporter = JID(sender)
        except (InvalidJID, ValueError, UnicodeError):
            return
        if not reporter.user or reporter.domain.lower() not in self.config.server_domains:
            self._refuse(Refused("report-refused", f"report from {sender[:200]!r}"))
            self._reply_error(iq, "auth", "forbidden", "only local users may report here")
            return
        stanza = as_client_stanza(xml)
        data = tostring(stanza, top_level=True).encode("utf-8", "surrogatepass")
        if len(data) > self.config.max_stanza_bytes:
            self._refuse(Refused("oversized", f"report of {len(data)} bytes"))
            self._reply_error(iq, "modify", "not-acceptable", "report too large")
            return
        attrs = {k: v for k, v in stanza.attrib.items() if not k.startswith("{")}
        element = Element(data, CLIENT_NS, "iq", attrs, {})
        session = SessionInfo(
            session_id=f"component-report:{reporter.full}",
            client_address="component",
            domain=reporter.domain,
            bound_jid=reporter.full,
            authenticated=True,
        )
        task = asyncio.get_running_loop().create_task(self._take_report(iq, session, element))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)
        task.add_done_callback(_log_failure)

    async def _take_report(self, iq: Any, session: SessionInfo, element: Element) -> None:
        try:
            (decision,) = await self.hook.process(session, Direction.FROM_CLIENT, [element])
        except Exception:
            log.exception("the pipeline failed on a spam report")
            self._reply_error(iq, "wait", "internal-server-error", "report not recorded")
            return
        if decision.kind is not DecisionKind.PASS:
            self._reply_error(
                iq, "wait", "resource-constraint", "the archive is unavailable; try again later"
            )
            return
        self.stats.reports += 1
        COPIES.labels("report").inc()
        iq.reply(clear=True).send()

    def _reply_error(self, iq: Any, etype: str, condition: str, text: str) -> None:
        reply: Any = iq.reply(clear=True)
        reply["error"]["type"] = etype
        reply["error"]["condition"] = condition
        reply["error"]["text"] = text
        reply.send()

    # -- ad-hoc commands (XEP-0050) ---------------------------------------------------------------

    def _only_admins(self, stanza: Any) -> Any:
        """Every command stanza from a non-admin is refused before slixmpp's plugin sees it."""
        xml: ET.Element = stanza.xml
        _, name = _local_name(xml.tag)
        if name != "iq" or xml.find(f"{{{COMMANDS_NS}}}command") is None:
            return stanza
        if xml.get("type") not in ("set", "get"):
            return stanza
        sender = str(xml.get("from") or "")
        try:
            bare = JID(sender).bare.lower()
        except (InvalidJID, ValueError, UnicodeError):
            bare = ""
        if bare and bare in self.admins and self.admin is not None:
            return stanza
        command = xml.find(f"{{{COMMANDS_NS}}}command")
        node = (command.get("node") or "")[:200] if command is not None else ""
        self._refuse(Refused("command-refused", f"{node!r} from {sender[:200]!r}"))
        if self.admin is not None:
            task = asyncio.get_running_loop().create_task(self.admin.refused(sender[:3071], node))
            task.add_done_callback(_log_failure)
        self._reply_error(stanza, "auth", "forbidden", "ad-hoc commands are for admins only")
        return None

    def _forms(self) -> Any:
        assert self._xmpp is not None
        return self._xmpp.plugin["xep_0004"]

    def _form(self, title: str, var: str, label: str) -> Any:
        assert self._xmpp is not None
        form: Any = self._forms().make_form(ftype="form", title=title)
        form.add_field(var=var, ftype="text-single", label=label, required=True)
        return form

    def _cmd_recent(self, iq: Any, session: dict[str, Any]) -> dict[str, Any]:
        session["payload"] = self._form("Recent verdicts", "jid", "Sender (bare JID)")
        session["next"] = self._cmd_recent_result
        session["has_next"] = False
        return session

    async def _cmd_recent_result(self, payload: Any, session: dict[str, Any]) -> dict[str, Any]:
        assert self.admin is not None
        sender = _field(payload, "jid")
        admin = str(session["from"])
        try:
            lines = await self.admin.recent_verdicts(admin, sender, MAX_RECENT)
        except ComponentError as exc:
            return _done(session, str(exc), error=True)
        if not lines:
            return _done(session, f"no archived stanzas from {sender}")
        assert self._xmpp is not None
        form: Any = self._forms().make_form(ftype="result", title=f"Recent verdicts of {sender}")
        columns = ("at", "recipient", "action", "score", "reasons")
        for column in columns:
            form.add_reported(column, label=column)
        for line in lines:
            form.add_item(
                {
                    "at": line.at,
                    "recipient": line.recipient,
                    "action": line.action,
                    "score": f"{line.score:.2f}",
                    "reasons": line.reasons,
                }
            )
        session["payload"] = form
        session["next"] = None
        session["notes"] = [("info", f"{len(lines)} most recent")]
        return session

    def _cmd_deny(self, iq: Any, session: dict[str, Any]) -> dict[str, Any]:
        session["payload"] = self._form("Block a domain", "domain", "Domain to block")
        session["next"] = self._cmd_deny_result
        session["has_next"] = False
        return session

    async def _cmd_deny_result(self, payload: Any, session: dict[str, Any]) -> dict[str, Any]:
        assert self.admin is not None
        domain = _field(payload, "domain")
        try:
            text = await self.admin.deny_domain(str(session["from"]), domain)
        except ComponentError as exc:
            return _done(session, str(exc), error=True)
        return _done(session, text)


def _field(payload: Any, var: str) -> str:
    """A text field of a submitted form (or '' when there is none)."""
    forms = payload if isinstance(payload, list) else [payload]
    for form in forms:
        try:
            values = form.get_values()
        except (AttributeError, KeyError, TypeError):
            continue
        value = values.get(var)
        if isinstance(value, list):
            value = value[0] if value else ""
        if isinstance(value, str):
            return value.strip()[:3071]
    return ""


def _done(session: dict[str, Any], text: str, *, error: bool = False) -> dict[str, Any]:
    session["payload"] = None
    session["next"] = None
    session["notes"] = [("error" if error else "info", text)]
    return session


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("component task failed", exc_info=task.exception())


__all__ = [
    "NODE_DENY",
    "NODE_RECENT",
    "AdminCommands",
    "ComponentConfig",
    "ComponentError",
    "ComponentLink",
    "ForwardedCopy",
    "ObserveOnlyDecider",
    "Refused",
    "VerdictLine",
    "as_client_stanza",
    "read_forward",
]
