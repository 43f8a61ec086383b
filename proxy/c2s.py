"""The inline client-to-server proxy: TLS toward clients, a splice toward the server.

One `ClientSession` per client connection:
1. On the STARTTLS port the proxy answers the first stream header itself and offers only
   `<starttls/>` (plaintext is refused unless allowed); on the direct-TLS port (XEP-0368)
   TLS comes first.
2. After TLS the client's next stream header opens the upstream leg; from then on every
   top-level element is relayed byte for byte. The server's features lose only what cannot
   survive two TLS sessions (`<starttls/>`, `SCRAM-*-PLUS`, channel-binding lists).
3. SASL is relayed untouched; the bound JID is read from the bind (or SASL2) result.
4. Stanzas of an authenticated session go through the `StanzaHook`; XEP-0198 acks are
   rewritten so that drops and injections do not break stream management.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

from archive_api.store.records import Direction
from proxy import metrics
from proxy.errors import FramingError, StreamClosed, UpstreamError
from proxy.hook import Decision, DecisionKind, SessionInfo, StanzaHook
from proxy.sm import (
    DirectionLedger,
    SmRegistry,
    SmState,
    SmStateCorrupt,
    SmStore,
    SmStoreUnavailable,
)
from proxy.stream import (
    STREAM_NS,
    Element,
    Frame,
    Framer,
    FramingLimits,
    StreamClose,
    StreamOpen,
    Whitespace,
    stream_error,
)

log = logging.getLogger(__name__)

CLOSE_GRACE = 2.0  # seconds the server gets to answer a client's </stream:stream>

SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
SASL2_NS = "urn:xmpp:sasl:2"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SM_NAMESPACES = frozenset({"urn:xmpp:sm:3", "urn:xmpp:sm:2"})
STANZA_ERRORS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
BIND_MARKER = b"urn:ietf:params:xml:ns:xmpp-bind"

_STARTTLS = re.compile(rb"<starttls\b[^>]*?(?:/>|>.*?</starttls>)", re.S)
_PLUS_MECHANISM = re.compile(rb"<mechanism>[^<]*-PLUS</mechanism>")
_CHANNEL_BINDING = re.compile(
    rb"<sasl-channel-binding\b[^>]*?(?:/>|>.*?</sasl-channel-binding>)", re.S
)
_JID = re.compile(rb"<jid>([^<]{1,3071})</jid>")
_AUTHZ_ID = re.compile(rb"<authorization-identifier>([^<]{1,3071})</authorization-identifier>")
_H_ATTRIBUTE = re.compile(rb"""\sh=(?:'[^']*'|"[^"]*")""")


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything the transport needs; built by the composition root from the settings."""

    domains: frozenset[str]
    upstream_host: str
    upstream_port: int
    server_tls: ssl.SSLContext | None
    upstream_tls: ssl.SSLContext | None = None  # direct TLS to the server, no channel binding
    allow_plaintext: bool = False
    limits: FramingLimits = field(default_factory=FramingLimits)
    auth_timeout: float = 60.0  # seconds to authenticate after connecting
    idle_timeout: float = 600.0  # seconds without a byte from the client
    stanza_timeout: float = 30.0  # seconds to finish an element once started
    max_sessions: int = 50_000
    read_size: int = 64 * 1024
    connect_timeout: float = 10.0
    # Stanza batches per direction whose decisions may be pending at once. Reading goes on
    # while earlier batches wait for their spool fsync (their group commits then merge), and
    # they are forwarded strictly in order. 0: decide one batch at a time.
    pipeline_depth: int = 64


class Leg:
    """One side's writer with write-combining; counts what crosses it."""

    __slots__ = ("closed", "direction", "holds", "out", "writer")

    def __init__(self, writer: asyncio.StreamWriter, direction: Direction) -> None:
        self.writer = writer
        self.direction = direction
        self.out = bytearray()
        self.closed = False
        # While above zero, a stream-management mapping that covers what is buffered is being
        # saved: flushing waits (the bytes stay in order in `out`) until the last hold ends.
        self.holds = 0

    def push(self, data: bytes) -> None:
        self.out += data

    def flush(self) -> None:
        if self.holds:
            return
        if self.out and not self.closed:
            metrics.BYTES_BY[self.direction].inc(len(self.out))
            self.writer.write(bytes(self.out))
        self.out.clear()

    async def drain(self) -> None:
        self.flush()
        if not self.closed:
            await self.writer.drain()

    def abort(self) -> None:
        """Drop the connection at once: nothing more is sent, not even a closing tag."""
        self.closed = True
        self.out.clear()
        self.writer.transport.abort()

    async def close(self) -> None:
        if self.closed:
            return
        self.holds = 0  # the stream ends: what is buffered goes now or never
        self.flush()
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)


def _stream_header(domain: str, stream_id: str) -> bytes:
    return (
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        f"xmlns:stream='http://etherx.jabber.org/streams' from={quoteattr(domain)} "
        f"id='{stream_id}' version='1.0' xml:lang='en'>"
    ).encode()


def rewrite_features(data: bytes, *, strip_starttls: bool = True) -> bytes:
    """Remove what cannot survive a second TLS session; leave every other byte alone."""
    if strip_starttls and b"starttls" in data:
        data = _STARTTLS.sub(b"", data)
    if b"-PLUS" in data:
        data = _PLUS_MECHANISM.sub(b"", data)
    if b"sasl-channel-binding" in data:
        data = _CHANNEL_BINDING.sub(b"", data)
    return data


def _sm_nonza(name: str, namespace: str, **attrs: str) -> bytes:
    rendered = "".join(f" {key}={quoteattr(value)}" for key, value in attrs.items())
    return f"<{name} xmlns='{namespace}'{rendered}/>".encode()


class _InFlight:
    """One direction's batches handed to the hook and not yet forwarded, oldest first."""

    def __init__(self, depth: int) -> None:
        self._queue: asyncio.Queue[tuple[Sequence[Element], asyncio.Future[Sequence[Decision]]]]
        self._queue = asyncio.Queue(depth)
        self._pending: set[asyncio.Future[Sequence[Decision]]] = set()

    async def put(
        self, batch: Sequence[Element], pending: asyncio.Future[Sequence[Decision]]
    ) -> None:
        self._pending.add(pending)
        pending.add_done_callback(self._pending.discard)
        await self._queue.put((batch, pending))

    async def next(self) -> tuple[Sequence[Element], asyncio.Future[Sequence[Decision]]]:
        return await self._queue.get()

    def done(self) -> None:
        self._queue.task_done()

    async def settled(self) -> None:
        await self._queue.join()

    def cancel_pending(self) -> None:
        for pending in list(self._pending):
            pending.cancel()


class ClientSession:
    def __init__(
        self,
        proxy: C2SProxy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        direct_tls: bool,
    ) -> None:
        self.proxy = proxy
        self.config = proxy.config
        self.hook = proxy.hook
        peer = writer.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.info = SessionInfo(
            session_id=secrets.token_hex(8), client_address=address, tls=direct_tls
        )
        self.client_reader = reader
        self.client = Leg(writer, Direction.TO_CLIENT)
        self.server: Leg | None = None
        self.server_reader: asyncio.StreamReader | None = None
        self.client_framer = Framer(self.config.limits)
        self.server_framer = Framer(self.config.limits)
        self.direct_tls = direct_tls
        self.client_header_sent = False
        self.sm: SmState | None = None
        self.started = time.monotonic()
        self.last_client_read = self.started
        self.partial_since: float | None = None
        self._closing = False
        self._timed_out = False
        self._pending_frames: list[Frame] = []
        self._resuming: SmState | None = None
        self._resume_pending: list[bytes] = []
        self._enable_pending = False  # the client sent <enable/>, the server has not answered
        self._client_closed_stream = False  # the client sent </stream:stream>
        self._server_stream_ended = False  # we sent the server </stream:stream>
        self._connection_lost = False  # the client's TCP connection died without a close
        # Per direction: batches handed to the hook, in arrival order, with their decisions.
        self._inflight: dict[Direction, _InFlight] = {}
        self._saves: set[asyncio.Task[None]] = set()  # SM writes after a delivery (`deliver`)

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        reason = "closed"
        try:
            # On the STARTTLS port an allowed plaintext session is spliced during negotiation.
            if self.direct_tls or await self._negotiate_tls():
                await self._open_upstream()
            await self._relay()
        except StreamClosed as exc:
            reason = exc.condition
            log.info(
                "stream closed",
                extra={
                    "session": self.info.session_id,
                    "condition": exc.condition,
                    "detail": exc.detail,
                },
            )
            await self._send_client_error(exc.condition, exc.detail)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError) as exc:
            reason = "connection-timeout" if self._timed_out else "connection-lost"
            self._connection_lost = not self._timed_out
            log.info(
                "connection lost",
                extra={"session": self.info.session_id, "error": type(exc).__name__},
            )
        except UpstreamError as exc:
            reason = "remote-connection-failed"
            log.warning(
                "upstream failed", extra={"session": self.info.session_id, "error": str(exc)}
            )
            await self._send_client_error("remote-connection-failed", "")
        except Exception:
            # A bug here or in the hook costs this stream only, with an error the client can
            # see, and is logged with its traceback instead of vanishing with the task.
            reason = "internal-server-error"
            log.exception("session failed", extra={"session": self.info.session_id})
            await self._send_client_error("internal-server-error", "")
        finally:
            metrics.CLOSED.labels(reason).inc()
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._closing = True
        if self._saves:
            # A delivery's SM write still under way must not land after the detached state.
            await asyncio.gather(*self._saves, return_exceptions=True)
        await self._keep_sm_for_resumption()
        if self.server is not None:
            if self._connection_lost:
                # The client vanished without closing its stream: the server must see the
                # same (an abrupt end), or it would end a stream-management session that the
                # client is about to resume; a </stream:stream> ends it for good.
                self.server.abort()
            else:
                if not self._client_closed_stream:  # the client's own close went through
                    self._end_server_stream()
                await self.server.close()
        await self.client.close()
        if self.info.authenticated:
            try:
                await self.hook.session_ended(self.info)
            except Exception:
                log.exception("hook failed at session end")

    async def _send_client_error(self, condition: str, detail: str) -> None:
        if self.client.closed:
            return
        if not self.client_header_sent:
            self.client.push(_stream_header(self._domain_or_default(), secrets.token_hex(8)))
            self.client_header_sent = True
        self.client.push(stream_error(condition, detail or None))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.drain(), 2.0)

    def _domain_or_default(self) -> str:
        return self.info.domain or next(iter(sorted(self.config.domains)), "localhost")

    def check_timeouts(self, now: float) -> str | None:
        """Called by the proxy's watchdog: which timeout, if any, this session has hit."""
        if not self.info.authenticated and now - self.started > self.config.auth_timeout:
            return "authentication took too long"
        if now - self.last_client_read > self.config.idle_timeout:
            return "idle for too long"
        if self.partial_since is not None and now - self.partial_since > self.config.stanza_timeout:
            return "stanza took too long to arrive"
        return None

    # -- client reading with the limits -------------------------------------------------

    async def _read_client(self) -> list[Frame]:
        if self._pending_frames:
            frames, self._pending_frames = self._pending_frames, []
            return frames
        data = await self.client_reader.read(self.config.read_size)
        if not data:
            raise ConnectionResetError("client closed the connection")
        now = time.monotonic()
        self.last_client_read = now
        metrics.BYTES_BY[Direction.FROM_CLIENT].inc(len(data))
        frames = self.client_framer.feed(data)
        if self.client_framer.buffered:
            if self.partial_since is None:
                self.partial_since = now
        else:
            self.partial_since = None
        return frames

    # -- phase 1: our own stream until TLS ----------------------------------------------

    async def _read_significant(self) -> list[Frame]:
        """The next frames that are not whitespace (clients send newlines between elements)."""
        while True:
            frames: list[Frame] = [
                f for f in await self._read_client() if not isinstance(f, Whitespace)
            ]
            if frames:
                return frames

    async def _read_header(self) -> StreamOpen:
        frames = await self._read_significant()
        header = frames[0]
        if not isinstance(header, StreamOpen):
            raise StreamClosed("not-well-formed", "expected a stream header")
        self._check_header(header)
        self._pending_frames = frames[1:]
        return header

    def _check_header(self, header: StreamOpen) -> None:
        to = header.attrs.get("to", "").lower()
        if to not in self.config.domains:
            raise StreamClosed("host-unknown", "this service does not host that domain")
        self.info.domain = to

    async def _negotiate_tls(self) -> bool:
        """STARTTLS. True once TLS is up; False when an allowed plaintext session was spliced."""
        header = await self._read_header()
        if self.config.allow_plaintext:
            return not await self._splice_plaintext(header)
        self.client.push(_stream_header(self.info.domain, secrets.token_hex(8)))
        self.client_header_sent = True
        self.client.push(
            b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
            b"<required/></starttls></stream:features>"
        )
        await self.client.drain()
        frames = await self._read_significant()
        if not _is_starttls(frames[0]):
            raise StreamClosed("policy-violation", "TLS is required")
        await self._start_tls(frames)
        return True

    async def _start_tls(self, frames: Sequence[Frame]) -> None:
        if len(frames) > 1:
            raise StreamClosed("policy-violation", "data after <starttls/> before TLS")
        if self.config.server_tls is None:
            raise StreamClosed("policy-violation", "TLS is not configured")
        self.client.push(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await self.client.drain()
        await self.client.writer.start_tls(self.config.server_tls)
        self.info.tls = True
        self.client_framer.reset()
        self.client_header_sent = False

    async def _splice_plaintext(self, header: StreamOpen) -> bool:
        """`allow_plaintext`: splice at once; True if the client then stays unencrypted.

        A plaintext client needs the server's features (its SASL mechanisms) on this very
        stream, so the upstream leg opens now and the client sees the server's features with
        the proxy's own optional `<starttls/>` in place of the server's. A client that takes
        it gets TLS from the proxy and, after the handshake, a fresh upstream connection
        (the server's stream cannot restart on a TLS layer the server never saw).
        """
        await self._connect_upstream(header)
        features = await self._upstream_features()
        offer = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        self.client.push(
            _add_feature(rewrite_features(features), offer if self.config.server_tls else b"")
        )
        await self.client.drain()
        frames = await self._read_significant()
        if not _is_starttls(frames[0]):
            self._pending_frames = frames
            return True
        server = self.server
        assert server is not None
        server.push(b"</stream:stream>")
        await server.close()
        self.server = self.server_reader = None
        self.server_framer.reset()
        await self._start_tls(frames)
        return False

    async def _upstream_features(self) -> bytes:
        """Relay the server's stream header to the client; return its features, unsent."""
        reader = self.server_reader
        assert reader is not None
        while True:
            try:
                data = await reader.read(self.config.read_size)
                frames = self.server_framer.feed(data) if data else None
            except (ConnectionError, OSError) as exc:
                raise UpstreamError(f"server connection lost: {exc}") from None
            except FramingError as exc:
                raise UpstreamError(f"server sent bad XML: {exc}") from None
            if frames is None:
                raise UpstreamError("server closed the stream before its features")
            for frame in frames:
                if isinstance(frame, StreamOpen):
                    self.client.push(frame.data)
                    self.client_header_sent = True
                elif isinstance(frame, Element):
                    if frame.namespace == STREAM_NS and frame.name == "features":
                        return frame.data
                    raise UpstreamError(f"server sent <{frame.name}/> instead of features")

    # -- phase 2: splice ----------------------------------------------------------------

    async def _open_upstream(self) -> None:
        await self._connect_upstream(await self._read_header())

    async def _connect_upstream(self, header: StreamOpen) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.config.upstream_host,
                    self.config.upstream_port,
                    ssl=self.config.upstream_tls,
                    server_hostname=self.info.domain if self.config.upstream_tls else None,
                ),
                self.config.connect_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot reach the XMPP server: {exc}") from None
        self.server_reader = reader
        self.server = Leg(writer, Direction.FROM_CLIENT)
        self.server.push(header.data)
        await self.server.drain()

    async def _relay(self) -> None:
        assert self.server is not None
        appliers: list[asyncio.Task[None]] = []
        if self.config.pipeline_depth > 0:
            for direction in (Direction.FROM_CLIENT, Direction.TO_CLIENT):
                flow = _InFlight(self.config.pipeline_depth)
                self._inflight[direction] = flow
                appliers.append(asyncio.create_task(self._apply_in_order(direction, flow)))
        to_server = asyncio.create_task(self._pump_from_client())
        to_client = asyncio.create_task(self._pump_from_server())
        pumps = (to_server, to_client, *appliers)
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if to_server in done and self._client_closed_stream and not to_client.done():
                # RFC 6120 §4.4: the client closed its stream; the server answers with what
                # it still has (XEP-0198's last <a/>) and its own close. Let that through.
                await asyncio.wait((to_client,), timeout=CLOSE_GRACE)
        finally:
            # Also when this session is cancelled (proxy stopping): a pump left running
            # would outlive the session and fail on the closed connection, unobserved.
            for task in pumps:
                task.cancel()
            for flow in self._inflight.values():
                flow.cancel_pending()
            await asyncio.gather(*pumps, return_exceptions=True)
        for task in pumps:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc

    async def _pump_from_client(self) -> None:
        server = self.server
        assert server is not None
        while True:
            try:
                frames = await self._read_client()
            except Exception:
                # What the client sent before its connection died still goes through.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._settle(Direction.FROM_CLIENT), CLOSE_GRACE)
                raise
            batch: list[Element] = []
            for frame in frames:
                if isinstance(frame, Element) and frame.is_stanza and self.info.authenticated:
                    batch.append(frame)
                    continue
                if batch:
                    await self._submit(Direction.FROM_CLIENT, batch)
                    batch = []
                if not isinstance(frame, Whitespace):  # whitespace may overtake stanzas
                    await self._settle(Direction.FROM_CLIENT)
                if isinstance(frame, StreamClose):
                    self._client_closed_stream = True
                    server.push(frame.data)
                    server.flush()
                    return
                if isinstance(frame, StreamOpen):
                    self._check_header(frame)
                    server.push(frame.data)
                elif isinstance(frame, Element):
                    await self._client_element(frame)
                elif isinstance(frame, Whitespace):
                    server.push(frame.data)
            if batch:
                await self._submit(Direction.FROM_CLIENT, batch)
            self.client.flush()
            await server.drain()

    async def _pump_from_server(self) -> None:
        reader = self.server_reader
        assert reader is not None
        framer = self.server_framer
        while True:
            try:
                data = await reader.read(self.config.read_size)
            except (ConnectionError, OSError) as exc:
                raise UpstreamError(f"server connection lost: {exc}") from None
            if not data:
                await self._settle(Direction.TO_CLIENT)
                return
            try:
                frames = framer.feed(data)
            except FramingError as exc:
                raise UpstreamError(f"server sent bad XML: {exc}") from None
            batch: list[Element] = []
            for frame in frames:
                if isinstance(frame, Element) and frame.is_stanza and self.info.authenticated:
                    batch.append(frame)
                    continue
                if batch:
                    await self._submit(Direction.TO_CLIENT, batch)
                    batch = []
                if not isinstance(frame, Whitespace):  # whitespace may overtake stanzas
                    await self._settle(Direction.TO_CLIENT)
                if isinstance(frame, StreamClose):
                    self.client.push(frame.data)
                    self.client.flush()
                    return
                if isinstance(frame, StreamOpen):
                    self.client.push(frame.data)
                    self.client_header_sent = True
                elif isinstance(frame, Element):
                    await self._server_element(frame)
                elif isinstance(frame, Whitespace):
                    self.client.push(frame.data)
            if batch:
                await self._submit(Direction.TO_CLIENT, batch)
            if self.server is not None:
                self.server.flush()
            await self.client.drain()

    # -- nonzas and the few stanzas the transport itself must read ------------------------

    async def _client_element(self, element: Element) -> None:
        server = self.server
        assert server is not None
        if element.namespace in SM_NAMESPACES:
            server.push(await self._sm_from_client(element))
        elif element.namespace == TLS_NS:
            raise StreamClosed("policy-violation", "TLS is already in place")
        else:
            if element.is_stanza:
                # Stanzas before authentication (rare: iq register) are not the hook's.
                metrics.STANZAS_BY[Direction.FROM_CLIENT].inc()
            server.push(element.data)

    async def _server_element(self, element: Element) -> None:
        ns, name = element.namespace, element.name
        if ns == "http://etherx.jabber.org/streams" and name == "features":
            self.client.push(rewrite_features(element.data))
        elif ns == SASL_NS and name == "success":
            self.client.push(element.data)
            self._authenticated()
            # Both ends restart the stream after SASL success.
            self.server_framer.reset()
            self.client_framer.reset()
        elif ns == SASL2_NS and name == "success":
            self.client.push(element.data)
            self._authenticated()
            match = _AUTHZ_ID.search(element.data)
            if match:
                await self._bound(match.group(1).decode("utf-8", "replace"))
        elif ns in SM_NAMESPACES:
            self.client.push(await self._sm_from_server(element))
        else:
            if element.is_stanza:
                metrics.STANZAS_BY[Direction.TO_CLIENT].inc()
            self.client.push(element.data)

    def _authenticated(self) -> None:
        self.info.authenticated = True
        metrics.AUTHENTICATED.inc()

    async def _bound(self, jid: str) -> None:
        self.info.bound_jid = jid
        self.proxy.register_bound(self)
        self.flush_all()
        await self.hook.session_bound(self.info)

    def flush_all(self) -> None:
        self.client.flush()
        if self.server is not None:
            self.server.flush()

    # -- the hook -----------------------------------------------------------------------

    async def _submit(self, direction: Direction, batch: Sequence[Element]) -> None:
        """Hand a batch to the hook; it is forwarded in order once decided and durable."""
        flow = self._inflight.get(direction)
        if flow is None or (direction == Direction.TO_CLIENT and self.info.bound_jid is None):
            # Before the bind result the session has no JID yet: decide in step.
            await self._settle(direction)
            await self._decide(direction, batch)
            return
        pending = asyncio.ensure_future(self.hook.process(self.info, direction, batch))
        await flow.put(batch, pending)

    async def _settle(self, direction: Direction) -> None:
        """Wait until every batch handed to the hook in this direction was forwarded."""
        flow = self._inflight.get(direction)
        if flow is not None:
            await flow.settled()

    async def _apply_in_order(self, direction: Direction, flow: _InFlight) -> None:
        while True:
            batch, pending = await flow.next()
            decisions = await pending
            if len(decisions) != len(batch):
                raise StreamClosed("internal-server-error", "hook returned the wrong count")
            if direction == Direction.FROM_CLIENT:
                self._apply(batch, decisions, forward=self.server, ledger=self._ledger_to_server())
            else:
                self._apply(batch, decisions, forward=self.client, ledger=self._ledger_to_client())
            await self._save_changed_sm()
            self.flush_all()
            flow.done()

    async def _decide(self, direction: Direction, batch: Sequence[Element]) -> None:
        if direction == Direction.TO_CLIENT and self.info.bound_jid is None:
            await self._learn_bind(batch)
        self.flush_all()  # what was counted before this await must be on the wire first
        decisions = await self.hook.process(self.info, direction, batch)
        if len(decisions) != len(batch):
            raise StreamClosed("internal-server-error", "hook returned the wrong count")
        if direction == Direction.FROM_CLIENT:
            self._apply(batch, decisions, forward=self.server, ledger=self._ledger_to_server())
        else:
            self._apply(batch, decisions, forward=self.client, ledger=self._ledger_to_client())
        await self._save_changed_sm()

    async def _learn_bind(self, batch: Sequence[Element]) -> None:
        for element in batch:
            if element.name == "iq" and BIND_MARKER in element.data:
                match = _JID.search(element.data)
                if match and element.attrs.get("type") == "result":
                    await self._bound(match.group(1).decode("utf-8", "replace"))
                    return

    def _ledger_to_server(self) -> DirectionLedger | None:
        return self.sm.to_server if self.sm is not None else None

    def _ledger_to_client(self) -> DirectionLedger | None:
        return self.sm.to_client if self.sm is not None else None

    def _apply(
        self,
        batch: Sequence[Element],
        decisions: Sequence[Decision],
        *,
        forward: Leg | None,
        ledger: DirectionLedger | None,
    ) -> None:
        assert forward is not None
        forwarded = dropped = 0
        for element, decision in zip(batch, decisions, strict=True):
            if decision.kind == DecisionKind.PASS:
                forward.push(element.data)
                forwarded += 1
                if ledger is not None:
                    ledger.forwarded()
            elif decision.kind == DecisionKind.REPLACE:
                forward.push(decision.replacement or element.data)
                forwarded += 1
                if ledger is not None:
                    ledger.forwarded()
            else:
                dropped += 1
                if ledger is not None:
                    ledger.dropped()
            for data in decision.inject_to_client:
                self.inject(Direction.TO_CLIENT, data)
            for data in decision.inject_to_server:
                self.inject(Direction.FROM_CLIENT, data)
        # One increment per batch: each takes a lock.
        if forwarded:
            metrics.STANZAS_BY[forward.direction].inc(forwarded)
        if dropped:
            metrics.DROPPED_BY[forward.direction].inc(dropped)

    def deliver(self, direction: Direction, data: bytes) -> None:
        """Send a stanza of the proxy's own from outside the relay (a released message).

        Like the relay, nothing it sends leaves before the stream-management mapping that
        counts it is saved: both legs hold their output until the write is done. A failed
        write ends the server's stream cleanly (so the server ends the SM session and no
        replica can resume it with the stale mapping), as a failed write in the relay does.
        """
        self.inject(direction, data)
        state = self.sm
        if state is None or not state.sm_id or not state.changed:
            self.flush_all()
            return
        held = self._hold_output()
        task = asyncio.create_task(self._save_after_delivery(held))
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)

    async def _save_after_delivery(self, held: list[Leg]) -> None:
        try:
            await self._save_changed_sm()
        except StreamClosed:
            self._end_server_stream()
        finally:
            self._release_output(held)

    def _end_server_stream(self) -> None:
        """Send the server our `</stream:stream>`, once: it ends the SM session there too."""
        server = self.server
        if server is None or server.closed or self._server_stream_ended:
            return
        self._server_stream_ended = True
        server.holds = 0
        server.push(b"</stream:stream>")
        server.flush()

    def _hold_output(self) -> list[Leg]:
        held = [leg for leg in (self.client, self.server) if leg is not None]
        for leg in held:
            leg.holds += 1
        return held

    def _release_output(self, held: list[Leg]) -> None:
        for leg in held:
            leg.holds = max(0, leg.holds - 1)
            leg.flush()

    def inject(self, direction: Direction, data: bytes) -> None:
        """Send a stanza of the proxy's own into one leg, keeping the SM counts right."""
        if direction == Direction.TO_CLIENT:
            self.client.push(data)
            if self.sm is not None:
                self.sm.to_client.injected(data)
        else:
            assert self.server is not None
            self.server.push(data)
            if self.sm is not None:
                self.sm.to_server.injected(data)
        metrics.INJECTED_BY[direction].inc()

    # -- XEP-0198 -----------------------------------------------------------------------

    async def _save_changed_sm(self) -> None:
        """Write a changed mapping before the stanzas it covers go out.

        Another replica may resume this session at any later moment; if it could read a
        mapping older than what the peers already saw, it would translate `h` wrongly. When
        the write fails the stream ends with a close to the server, which ends the SM session
        there too: no replica can resume it with a stale mapping.
        """
        state = self.sm
        if state is None or not state.sm_id or not state.changed:
            return
        # The other direction's pump flushes both legs too; without the hold it could send
        # what this mapping covers while the write is still under way.
        held = self._hold_output()
        try:
            await self.proxy.sm_registry.save(state)
        except SmStoreUnavailable as exc:
            log.warning(
                "cannot save the stream-management state",
                extra={"session": self.info.session_id, "error": str(exc)},
            )
            raise StreamClosed("internal-server-error", "stream state unavailable") from None
        finally:
            self._release_output(held)

    async def _save_new_sm(self, state: SmState) -> None:
        """Write a state just enabled or resumed; a failure is retried with the next change.

        Without a record another replica refuses to resume (it cannot translate), which is
        safe; after a resumption the ledger counts as changed until a write succeeds.
        """
        try:
            await self.proxy.sm_registry.save(state)
        except SmStoreUnavailable as exc:
            log.warning(
                "cannot save the stream-management state",
                extra={"session": self.info.session_id, "error": str(exc)},
            )

    async def _keep_sm_for_resumption(self) -> None:
        state = self.sm
        if state is None or not state.sm_id or state.owner != self.info.session_id:
            return  # no SM id, or the session was resumed on another connection meanwhile
        try:
            if self._client_closed_stream:  # the SM session ends with the stream
                await self.proxy.sm_registry.discard(state.sm_id)
            else:
                await self.proxy.sm_registry.save(state, detached=True)
        except SmStoreUnavailable as exc:
            log.warning(
                "cannot save the stream-management state at the end of the connection",
                extra={"session": self.info.session_id, "error": str(exc)},
            )

    def _refuse_resumption(self, ns: str, condition: str) -> bytes:
        """Answer `<resume/>` with `<failed/>` ourselves; the server sees nothing of it.

        The client may then bind a fresh session on this stream (XEP-0198 §5).
        """
        self.client.push(
            f"<failed xmlns='{ns}'><{condition} xmlns='{STANZA_ERRORS_NS}'/></failed>".encode()
        )
        return b""

    async def _resume(self, element: Element) -> bytes:
        ns, previd = element.namespace, element.attrs["previd"]
        client_h = _parse_h(element.attrs["h"])
        try:
            state = await self.proxy.sm_registry.fetch(previd)
        except (SmStoreUnavailable, SmStateCorrupt) as exc:
            log.warning(
                "resumption refused: stream-management state unavailable",
                extra={"session": self.info.session_id, "error": str(exc)},
            )
            return self._refuse_resumption(ns, "internal-server-error")
        if state is None:
            # Unknown here means the mapping is unknown: passing the client's `h` on as it
            # is could acknowledge stanzas the server never sent (or miss dropped ones).
            return self._refuse_resumption(ns, "item-not-found")
        ledger = state.to_client
        position = ledger.unwrap_near(client_h)
        if position < 0 or (state.exact and position > ledger.sink_count):
            return self._refuse_resumption(ns, "unexpected-request")  # not what it was sent
        source_h, pending = ledger.restart_at(client_h)
        self._resume_pending = pending
        self._resuming = state
        return _sm_nonza("resume", ns, previd=previd, h=str(source_h))

    async def _sm_from_client(self, element: Element) -> bytes:
        name, ns, attrs = element.name, element.namespace, element.attrs
        if name == "enable" and self.sm is None:
            # XEP-0198 §4: the client numbers what it sends, and the server what it receives,
            # from <enable/> on; the client need not wait for <enabled/> before sending
            # stanzas (slixmpp sends its presence right after bind). So the client→server
            # count starts here; the server→client count starts at <enabled/>.
            self.sm = SmState("")
            self._enable_pending = True
        elif name == "a" and self.sm is not None and "h" in attrs:
            h = self.sm.to_client.acknowledge(_parse_h(attrs["h"]))
            return _sm_nonza("a", ns, h=str(h))
        elif name == "resume" and "previd" in attrs and "h" in attrs:
            return await self._resume(element)
        return element.data

    async def _sm_from_server(self, element: Element) -> bytes:
        name, ns, attrs = element.name, element.namespace, element.attrs
        if name == "enabled":
            sm_id = attrs.get("id")
            counted = self.sm.to_server if self.sm is not None and self._enable_pending else None
            self._enable_pending = False
            if sm_id:
                self.sm = self.proxy.sm_registry.create(sm_id)
                self.info.sm_id = sm_id
            else:
                self.sm = SmState("")
            if counted is not None:
                self.sm.to_server = counted  # counted since the client's <enable/>
            # Kept with the SM state: a resumption on a new connection has no bind result.
            self.sm.bound_jid = self.info.bound_jid
            if sm_id:
                self.sm.owner = self.info.session_id
                await self._save_new_sm(self.sm)
        elif name == "a" and self.sm is not None and "h" in attrs:
            h = self.sm.to_server.acknowledge(_parse_h(attrs["h"]))
            return _sm_nonza("a", ns, h=str(h))
        elif name == "resumed":
            state = self._resuming
            if state is not None and "h" in attrs:
                self.sm = state
                self.info.sm_id = state.sm_id
                source_h, _ = state.to_server.restart_at(_parse_h(attrs["h"]))
                state.epoch += 1  # writes from the connection it left no longer count
                state.exact = True
                state.owner = self.info.session_id
                out = _sm_nonza("resumed", ns, previd=attrs.get("previd", ""), h=str(source_h))
                previous = self.proxy.resumed(self, state.sm_id)
                self.client.push(out)
                for data in self._resume_pending:
                    self.inject(Direction.TO_CLIENT, data)
                self._resume_pending = []
                await self._save_new_sm(state)  # with the injections sent again
                # The previous connection is usually gone by now (it ended when the client's
                # TCP connection died), so the JID comes from the SM state, not from it.
                jid = state.bound_jid or (previous.info.bound_jid if previous else None)
                if jid:
                    await self._bound(jid)
                return b""
        elif name == "failed":
            resuming, self._resuming = self._resuming, None
            if self._enable_pending:  # <enable/> refused: nothing is counted after all
                self._enable_pending = False
                self.sm = None
            if "h" in attrs:
                return _failed_with_h(element.data, resuming)
        return element.data


def _failed_with_h(data: bytes, resuming: SmState | None) -> bytes:
    """`<failed h/>` carries the server's count of what it received, in its numbering.

    Translated when the mapping of the session being resumed is known; left out otherwise
    (it is optional), since an untranslated one could be wrong for the client.
    """
    end = data.index(b">")
    if data[end - 1 : end] == b"/":
        end -= 1
    start_tag = _H_ATTRIBUTE.sub(b"", data[:end], count=1)
    h_match = re.search(rb"""\sh=['"](\d{1,10})['"]""", data[:end])
    if resuming is not None and h_match is not None and int(h_match.group(1)) < 2**32:
        h = resuming.to_server.translate_near(int(h_match.group(1)))
        start_tag += f" h='{h}'".encode()
    return start_tag + data[end:]


def _is_starttls(frame: Frame) -> bool:
    return isinstance(frame, Element) and frame.namespace == TLS_NS and frame.name == "starttls"


def _add_feature(features: bytes, feature: bytes) -> bytes:
    """Insert `feature` first inside a `<stream:features>` element."""
    if not feature:
        return features
    end = features.index(b">") + 1
    if features[end - 2 : end] != b"/>":
        return features[:end] + feature + features[end:]
    name = re.match(rb"<([^\s/>]+)", features)
    assert name is not None
    return features[: end - 2] + b">" + feature + b"</" + name.group(1) + b">"


def _parse_h(value: str) -> int:
    # ASCII digits only: int() would also take "1_0", " 7" and other scripts' digits.
    if not (0 < len(value) <= 10 and value.isascii() and value.isdigit()):
        raise StreamClosed("invalid-xml", "h is not a number")
    h = int(value)
    if not 0 <= h < 2**32:
        raise StreamClosed("invalid-xml", "h out of range")
    return h


class C2SProxy:
    """The listeners, the live sessions, and the stream-management registry."""

    def __init__(
        self, config: ProxyConfig, hook: StanzaHook, sm_registry: SmStore | None = None
    ) -> None:
        self.config = config
        self.hook = hook
        self.sm_registry: SmStore = sm_registry if sm_registry is not None else SmRegistry()
        self.sessions: set[ClientSession] = set()
        self._by_bare_jid: dict[str, set[ClientSession]] = {}
        self._by_sm_id: dict[str, ClientSession] = {}
        self._servers: list[asyncio.Server] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self, listen: tuple[str, int] | None, listen_tls: tuple[str, int] | None
    ) -> list[tuple[str, int]]:
        """Start the listeners; return the bound addresses (port 0 picks a free port)."""
        bound: list[tuple[str, int]] = []
        if listen is not None:
            server = await asyncio.start_server(
                self._accept_starttls, listen[0], listen[1], limit=self.config.read_size * 2
            )
            self._servers.append(server)
            bound.append(server.sockets[0].getsockname()[:2])
        if listen_tls is not None:
            if self.config.server_tls is None:
                raise ValueError("direct TLS needs a certificate and key")
            server = await asyncio.start_server(
                self._accept_direct_tls,
                listen_tls[0],
                listen_tls[1],
                ssl=self.config.server_tls,
                limit=self.config.read_size * 2,
            )
            self._servers.append(server)
            bound.append(server.sockets[0].getsockname()[:2])
        self._watchdog = asyncio.create_task(self._watch())
        return bound

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def _accept_starttls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._spawn(ClientSession(self, reader, writer, direct_tls=False))

    def _accept_direct_tls(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._spawn(ClientSession(self, reader, writer, direct_tls=True))

    def adopt(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> asyncio.Task[None] | None:
        """Run a session over a connection a front end has already secured and translated.

        The WebSocket and BOSH front ends (proxy/websocket.py, proxy/bosh.py) terminate TLS
        themselves and hand over the classic stream: no STARTTLS is offered on it. None when
        the proxy is full (the refusal was written to `writer`).
        """
        return self._spawn(ClientSession(self, reader, writer, direct_tls=True))

    def _spawn(self, session: ClientSession) -> asyncio.Task[None] | None:
        if len(self.sessions) >= self.config.max_sessions:
            session.client.push(_stream_header(session._domain_or_default(), "full"))
            session.client.push(stream_error("resource-constraint", "too many sessions"))
            session.client.flush()
            session.client.writer.close()
            metrics.CLOSED.labels("resource-constraint").inc()
            return None
        self.sessions.add(session)
        metrics.SESSIONS.inc()
        metrics.ACTIVE.inc()
        task = asyncio.create_task(self._run(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, session: ClientSession) -> None:
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            metrics.ACTIVE.dec()
            bare = session.info.bare_jid
            if bare is not None:
                peers = self._by_bare_jid.get(bare)
                if peers is not None:
                    peers.discard(session)
                    if not peers:
                        del self._by_bare_jid[bare]
            sm_id = session.info.sm_id
            if sm_id and self._by_sm_id.get(sm_id) is session:
                del self._by_sm_id[sm_id]

    def register_bound(self, session: ClientSession) -> None:
        bare = session.info.bare_jid
        if bare is not None:
            self._by_bare_jid.setdefault(bare, set()).add(session)
        if session.info.sm_id:
            self._by_sm_id[session.info.sm_id] = session

    def resumed(self, session: ClientSession, sm_id: str) -> ClientSession | None:
        previous = self._by_sm_id.get(sm_id)
        self._by_sm_id[sm_id] = session
        return previous

    def sessions_of(self, bare_jid: str) -> list[ClientSession]:
        """Live, bound sessions of one user (for delivering released messages)."""
        return list(self._by_bare_jid.get(bare_jid, ()))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session in list(self.sessions):
                problem = session.check_timeouts(now)
                if problem is not None and not session._closing:
                    session._closing = True
                    task = asyncio.create_task(self._timeout(session, problem))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _timeout(self, session: ClientSession, problem: str) -> None:
        log.info("stream timed out", extra={"session": session.info.session_id, "detail": problem})
        session._timed_out = True
        await session._send_client_error("connection-timeout", problem)
        await session.client.close()
        if session.server is not None:
            await session.server.close()
