"""The WebSocket front end (RFC 7395): one XML element per text frame, subprotocol `xmpp`.

Each WebSocket connection becomes an ordinary `ClientSession` of the `C2SProxy` (see
proxy/framing.py): `<open/>` is turned into a stream header, `<close/>` into the stream's
close, every other frame is relayed as it came; the session's output is split back into one
standalone element per frame. TLS is this listener's (or a reverse proxy's), so the session
offers no STARTTLS; everything after that — SASL relayed to the server, the per-stanza
decisions, the spool, XEP-0198 — is the TCP front end's code.

What a web client can get wrong, and what it gets back (a stream error frame, `<close/>`,
then a WebSocket close):
- no `xmpp` subprotocol, or another path: the HTTP upgrade is refused (400 / 404);
- a binary frame: `unsupported-encoding`;
- a first frame other than `<open/>`: `invalid-namespace`;
- a frame that is not exactly one well-formed element, or has a DTD, entity, comment or
  processing instruction, or breaks the framing limits: the TCP stream's conditions;
- a frame larger than the limit: the WebSocket layer closes with 1009 (message too big).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final
from xml.sax.saxutils import quoteattr

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from proxy.c2s import C2SProxy
from proxy.errors import FramingError
from proxy.framing import (
    FRAMING_NS,
    Closed,
    ElementChecker,
    MemoryStream,
    Opened,
    Reframer,
    Standalone,
    memory_stream,
    stream_header,
)
from proxy.stream import FramingLimits, stream_error

log = logging.getLogger(__name__)

SUBPROTOCOL: Final = Subprotocol("xmpp")
DEFAULT_PATH: Final = "/xmpp-websocket"
CLOSE_FRAME: Final = f"<close xmlns='{FRAMING_NS}'/>"
KEEPALIVE_EVERY: Final = 60.0  # seconds
_STREAM_NS_DECL = b" xmlns:stream='http://etherx.jabber.org/streams'"


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    path: str = DEFAULT_PATH
    tls: ssl.SSLContext | None = None
    ping_interval: float | None = 20.0  # WebSocket pings replace whitespace keep-alives
    open_timeout: float = 10.0  # seconds for the HTTP upgrade
    close_timeout: float = 5.0
    session_grace: float = 5.0  # seconds the session gets to end after the socket closed


def open_frame(attrs: dict[str, str]) -> str:
    """The RFC 7395 `<open/>` equivalent to a server's stream header."""
    rendered = "".join(
        f" {name}={quoteattr(attrs[name])}"
        for name in ("from", "to", "id", "version", "xml:lang")
        if name in attrs
    )
    return f"<open xmlns='{FRAMING_NS}'{rendered}/>"


class _Connection:
    """One WebSocket connection bridged to one `ClientSession`."""

    def __init__(self, front: WebSocketFrontEnd, socket: ServerConnection) -> None:
        self.front = front
        self.socket = socket
        limits = front.proxy.config.limits
        self.checker = ElementChecker(limits)
        self.reframer = Reframer(limits)
        self.outbox: deque[str | None] = deque()  # None: close the socket after what is before
        self.queued = 0
        self.wakeup = asyncio.Event()
        self.server_opened = False
        self.client_opened = False
        self.client_closed = False
        self.failed = False
        self.stream: MemoryStream = memory_stream(
            self._deliver, self._session_closed, peer=socket.remote_address
        )

    # -- session → web client -------------------------------------------------------------------

    def _deliver(self, data: bytes) -> int:
        if self.failed:
            return self.queued
        try:
            reframed = self.reframer.feed(data)
        except FramingError as exc:  # the session wrote something that is not XMPP: a bug
            log.error("cannot reframe session output", extra={"error": str(exc)})
            self._fail("internal-server-error", "")
            return self.queued
        for item in reframed:
            if isinstance(item, Opened):
                self.server_opened = True
                self._push(open_frame(item.attrs))
            elif isinstance(item, Standalone):
                self._push(item.data.decode("utf-8"))
            elif isinstance(item, Closed):
                self._push(CLOSE_FRAME)
                self._push(None)
        return self.queued

    def _session_closed(self) -> None:
        self._push(None)

    def _push(self, frame: str | None) -> None:
        self.outbox.append(frame)
        if frame is not None:
            self.queued += len(frame)
        self.wakeup.set()

    async def send_loop(self) -> None:
        while True:
            while not self.outbox:
                self.wakeup.clear()
                await self.wakeup.wait()
            frame = self.outbox.popleft()
            if frame is None:
                await self.socket.close()
                return
            self.queued -= len(frame)
            await self.socket.send(frame)
            self.stream.transport.sent(self.queued)

    # -- web client → session -------------------------------------------------------------------

    async def receive_loop(self) -> None:
        try:
            async for message in self.socket:
                if self.failed or self.client_closed:
                    continue
                if isinstance(message, bytes):
                    self._fail("unsupported-encoding", "binary frames are not XMPP (RFC 7395)")
                    continue
                self._frame(message.encode("utf-8"))
        except ConnectionClosed:
            pass
        if not self.client_closed:
            # Gone without <close/>: the session sees a dropped connection, so a stream
            # management session stays resumable, as with TCP.
            self.stream.feed_eof()

    def _frame(self, data: bytes) -> None:
        try:
            element = self.checker.one(data)
        except FramingError as exc:
            self._fail(exc.condition, exc.detail)
            return
        if element.namespace == FRAMING_NS and element.name == "open":
            self.client_opened = True
            self.stream.feed(stream_header(element.attrs))
        elif not self.client_opened:
            self._fail("invalid-namespace", "the first frame must be <open/> (RFC 7395)")
        elif element.namespace == FRAMING_NS and element.name == "close":
            self.client_closed = True
            self.stream.feed(b"</stream:stream>")
        elif element.namespace == FRAMING_NS:
            self._fail("unsupported-stanza-type", f"unknown framing element <{element.name}/>")
        else:
            self.stream.feed(element.data)

    async def keepalive_loop(self, every: float) -> None:
        """WebSocket pings keep the socket alive, but the session cannot see them; a space
        between elements tells its idle timer (and the server) that the client is there."""
        while True:
            await asyncio.sleep(every)
            if self.client_opened and not (self.client_closed or self.failed):
                self.stream.feed(b" ")

    def _fail(self, condition: str, detail: str) -> None:
        """A stream error from the front end itself; the session is ended as if dropped."""
        if self.failed:
            return
        log.info("websocket stream error", extra={"condition": condition, "detail": detail})
        if not self.server_opened:
            domain = next(iter(sorted(self.front.proxy.config.domains)), "localhost")
            self._push(open_frame({"from": domain, "id": secrets.token_hex(8), "version": "1.0"}))
        error = stream_error(condition, detail or None).removesuffix(b"</stream:stream>")
        error = error.replace(b"<stream:error", b"<stream:error" + _STREAM_NS_DECL, 1)
        self._push(error.decode("utf-8"))
        self._push(CLOSE_FRAME)
        self._push(None)
        self.failed = True
        self.stream.feed_eof()


class WebSocketFrontEnd:
    """The WebSocket listener; every connection is a session of `proxy`."""

    def __init__(self, proxy: C2SProxy, config: WebSocketConfig | None = None) -> None:
        self.proxy = proxy
        self.config = config or WebSocketConfig()
        self._server: Server | None = None

    @property
    def limits(self) -> FramingLimits:
        return self.proxy.config.limits

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0 picks a free port); return the bound address."""
        config = self.config
        self._server = await serve(
            self._handle,
            host,
            port,
            ssl=config.tls,
            subprotocols=[SUBPROTOCOL],
            process_request=self._check_path,
            # A frame holds one element: the stanza limit plus room for its framing.
            max_size=self.limits.max_stanza_bytes + 4096,
            max_queue=16,
            compression=None,  # compression and TLS leak secrets together (CRIME, BREACH)
            ping_interval=config.ping_interval,
            open_timeout=config.open_timeout,
            close_timeout=config.close_timeout,
            server_header=None,
        )
        address = next(iter(self._server.sockets)).getsockname()
        return str(address[0]), int(address[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != self.config.path:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def _handle(self, socket: ServerConnection) -> None:
        if socket.subprotocol != SUBPROTOCOL:  # pragma: no cover - the handshake refuses it
            await socket.close(1002, "the xmpp subprotocol is required")
            return
        bridge = _Connection(self, socket)
        session = self.proxy.adopt(bridge.stream.reader, bridge.stream.writer)
        sender = asyncio.create_task(bridge.send_loop())
        keepalive = asyncio.create_task(
            bridge.keepalive_loop(min(KEEPALIVE_EVERY, self.proxy.config.idle_timeout / 2))
        )
        try:
            await bridge.receive_loop()
            if session is not None:
                # The session ends on its own (the stream closed, or the dropped connection).
                await asyncio.wait((session, sender), timeout=self.config.session_grace)
        finally:
            keepalive.cancel()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            bridge.stream.writer.close()
