"""The BOSH front end (XEP-0124 with XEP-0206): XMPP over long-polled HTTP requests.

Each BOSH session (a `sid`) becomes an ordinary `ClientSession` of the `C2SProxy` over an
in-memory transport (proxy/framing.py), like a WebSocket connection: the session request
opens a stream, `xmpp:restart='true'` restarts it, the stanzas inside each `<body/>` are
relayed in `rid` order, and what the session sends back is split into standalone elements
that wait for the next request to carry them. Decisions, archiving and XEP-0198 are the TCP
front end's code.

What the connection manager does (XEP-0124 section numbers in brackets):
- requests are processed strictly in `rid` order; one that arrives early waits for the
  missing ones (up to `wait`); a repeated `rid` gets the response it had (kept for the last
  `requests` rids, or until the client's `ack` says it has it) [§14];
- a request is held until there is something to send or `wait` seconds pass; when more than
  `hold` are held the oldest is answered at once (empty) [§7, §10];
- responses carry `ack` when they answer a request other than the highest one processed, if
  the client asked for acknowledgements [§9];
- no request for `inactivity` seconds ends the session as a dropped connection would, so a
  stream management session stays resumable [§12];
- terminal errors [§17] are `<body type='terminate' condition='…'/>`: `bad-request`
  (malformed body, bad `rid`, missing `xmpp:version`), `item-not-found` (unknown `sid`, a
  `rid` out of the window or whose predecessors never came), `policy-violation` (more
  simultaneous requests than `requests`), `host-unknown`, `remote-stream-error` (the stream
  ended with an error, which is inside).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Final
from xml.sax.saxutils import quoteattr

from aiohttp import web

from proxy.c2s import C2SProxy
from proxy.errors import FramingError
from proxy.framing import (
    Closed,
    ElementChecker,
    MemoryStream,
    Opened,
    Reframer,
    Standalone,
    memory_stream,
    standalone,
    stream_header,
)
from proxy.stream import STREAM_NS, Element, FramingLimits

log = logging.getLogger(__name__)

BOSH_NS: Final = "http://jabber.org/protocol/httpbind"
XBOSH_NS: Final = "urn:xmpp:xbosh"
DEFAULT_PATH: Final = "/http-bind"
MAX_RID: Final = 2**53 - 1  # XEP-0124 §14.1: a rid never exceeds 9007199254740991
KEEPALIVE_EVERY: Final = 60.0  # seconds: empty polls tell the session the client is alive

_TAG_END = re.compile(rb"""(?:[^'">]|"[^"]*"|'[^']*')*>""")


class BoshError(Exception):
    """A terminal binding condition (XEP-0124 §17) for one request."""

    def __init__(self, condition: str, detail: str = "", *, status: int = 200) -> None:
        super().__init__(f"{condition}: {detail}")
        self.condition = condition
        self.detail = detail
        self.status = status


@dataclass(frozen=True, slots=True)
class BoshConfig:
    path: str = DEFAULT_PATH
    tls: ssl.SSLContext | None = None
    max_wait: int = 60  # seconds a request may be held (the client's `wait` is capped here)
    max_hold: int = 1  # requests held at once (the client's `hold` is capped here)
    inactivity: int = 60  # seconds without any request before the session ends
    polling: int = 2  # advertised shortest interval between empty polls
    max_body_bytes: int = 0  # 0: the stanza limit plus room for the wrapper
    allow_origin: str = "*"  # CORS: XMPP authenticates in-band, no cookies are involved
    max_sessions: int = 50_000


@dataclass(frozen=True, slots=True)
class ParsedBody:
    attrs: dict[str, str]
    xbosh_prefix: str | None
    children: list[Element]

    def xbosh(self, name: str) -> str | None:
        if self.xbosh_prefix is None:
            return None
        return self.attrs.get(f"{self.xbosh_prefix}:{name}")


def parse_body(data: bytes, limits: FramingLimits, stanza_limits: FramingLimits) -> ParsedBody:
    """One `<body/>` wrapper and its children, checked by the hardened framer.

    The children are made standalone against the body's declarations, so they mean in the
    classic stream exactly what they meant inside `<body/>`. `limits` bound the whole body,
    `stanza_limits` each child.
    """
    try:
        body = ElementChecker(limits).one(data)
    except FramingError as exc:
        raise BoshError("bad-request", exc.detail, status=400) from None
    if body.namespace != BOSH_NS or body.name != "body":
        raise BoshError("bad-request", "the root element must be <body/> of httpbind", status=400)
    attrs = body.attrs
    declared = {
        (key[6:] if key.startswith("xmlns:") else ""): value
        for key, value in attrs.items()
        if key == "xmlns" or key.startswith("xmlns:")
    }
    prefix = next((p for p, uri in declared.items() if uri == XBOSH_NS and p), None)
    children: list[Element] = []
    raw = body.data
    start_tag = _TAG_END.match(raw)
    assert start_tag is not None
    if not raw[: start_tag.end()].endswith(b"/>"):
        inner = raw[start_tag.end() : raw.rindex(b"</")]
        if inner.strip():
            try:
                children = ElementChecker(stanza_limits, declared).many(inner)
            except FramingError as exc:
                # Well-formed but over a limit (size, depth, attributes): policy, not syntax.
                condition = "policy-violation" if exc.condition == "policy-violation" else None
                raise BoshError(condition or "bad-request", exc.detail, status=400) from None
    plain = {k: v for k, v in attrs.items() if k != "xmlns" and not k.startswith("xmlns:")}
    return ParsedBody(plain, prefix, children)


def _number(value: str | None, name: str, *, upper: int) -> int:
    if value is None or not value.isdigit() or len(value) > 16:
        raise BoshError("bad-request", f"{name} must be a number")
    number = int(value)
    if number > upper:
        raise BoshError("bad-request", f"{name} out of range")
    return number


def body_bytes(attrs: dict[str, str], payload: list[bytes] | None = None) -> bytes:
    rendered = "".join(f" {name}={quoteattr(value)}" for name, value in attrs.items())
    head = f"<body xmlns='{BOSH_NS}'{rendered}".encode()
    if not payload:
        return head + b"/>"
    return head + b">" + b"".join(payload) + b"</body>"


def terminate_bytes(condition: str | None, payload: list[bytes] | None = None) -> bytes:
    attrs = {"type": "terminate"}
    if condition:
        attrs["condition"] = condition
    if payload:
        attrs["xmlns:stream"] = STREAM_NS
    return body_bytes(attrs, payload)


class _Held:
    __slots__ = ("future", "rid")

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()


class BoshSession:
    """One BOSH session bridged to one `ClientSession`."""

    def __init__(
        self,
        front: BoshFrontEnd,
        *,
        sid: str,
        first_rid: int,
        wait: int,
        hold: int,
        acks: bool,
        peer: object,
    ) -> None:
        self.front = front
        self.sid = sid
        self.wait = wait
        self.hold = hold
        self.requests = hold + 1
        self.acks = acks
        self.next_rid = first_rid
        self.first_rid = first_rid
        self.reframer = Reframer(front.limits)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.held: deque[_Held] = deque()
        self.responses: dict[int, bytes] = {}
        self.outstanding = 0
        self.turn = asyncio.Condition()
        self.stream_attrs: dict[str, str] | None = None
        self.stream_error = False
        self.closed = False  # the stream ended; the next response terminates the session
        self.ended = False  # the session is gone from the front end
        self.created = False  # the session creation response was sent
        self._inactivity: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.last_fed = loop.time()
        self.stream: MemoryStream = memory_stream(self._deliver, self._session_closed, peer=peer)
        self.task: asyncio.Task[None] | None = None

    # -- session → client --------------------------------------------------------------------

    def _deliver(self, data: bytes) -> int:
        if self.ended:
            return 0
        try:
            reframed = self.reframer.feed(data)
        except FramingError as exc:  # the session wrote something that is not XMPP: a bug
            log.error("cannot reframe session output", extra={"error": str(exc)})
            self.end("internal-server-error")
            return 0
        for item in reframed:
            if isinstance(item, Opened):
                # XEP-0206: the stream header is not sent; its id is the session's authid.
                if self.stream_attrs is None:
                    self.stream_attrs = item.attrs
            elif isinstance(item, Standalone):
                self.pending.append(item.data)
                self.pending_bytes += len(item.data)
                self.stream_error = self.stream_error or item.is_stream_error
            elif isinstance(item, Closed):
                self.closed = True
        self._release_ready()
        return self.pending_bytes

    def _session_closed(self) -> None:
        self.closed = True
        self._release_ready()

    def _release_ready(self) -> None:
        if self.closed:
            while self.held:
                self._answer(self.held.popleft())
        elif self.pending and self.held and (self.created or self.stream_attrs is not None):
            self._answer(self.held.popleft())

    def _answer(self, held: _Held) -> None:
        if not held.future.done():
            held.future.set_result(self._response_for(held.rid))

    def _response_for(self, rid: int) -> bytes:
        """The body answering `rid`, carrying everything pending."""
        payload, self.pending, self.pending_bytes = self.pending, [], 0
        self.stream.transport.sent(0)
        if self.closed:
            condition = "remote-stream-error" if self.stream_error else None
            self._forget()
            return terminate_bytes(condition, payload)
        attrs: dict[str, str] = {}
        if not self.created:
            self.created = True
            attrs = self._creation_attrs(rid)
        if payload:
            attrs["xmlns:stream"] = STREAM_NS
        if self.acks and rid != self.next_rid - 1:
            attrs["ack"] = str(self.next_rid - 1)
        return body_bytes(attrs, payload)

    def _creation_attrs(self, rid: int) -> dict[str, str]:
        header = self.stream_attrs or {}
        attrs = {
            "sid": self.sid,
            "wait": str(self.wait),
            "hold": str(self.hold),
            "requests": str(self.requests),
            "inactivity": str(self.front.config.inactivity),
            "polling": str(self.front.config.polling),
            "ver": "1.6",
            "from": header.get("from", self.front.default_domain),
            "secure": "true",
            "xmlns:xmpp": XBOSH_NS,
            "xmpp:version": "1.0",
            "xmpp:restartlogic": "true",
        }
        if "id" in header:
            attrs["authid"] = header["id"]
        if self.acks:
            attrs["ack"] = str(rid)
        return attrs

    # -- client → session --------------------------------------------------------------------

    async def request(self, rid: int, body: ParsedBody) -> bytes:
        self.outstanding += 1
        self._stop_inactivity()
        try:
            if self.ended:
                raise BoshError("item-not-found", "the session has ended")
            if self.outstanding > self.requests:
                raise BoshError("policy-violation", f"more than {self.requests} requests")
            if rid < self.next_rid:
                cached = self.responses.get(rid)
                if cached is None:
                    raise BoshError("item-not-found", "rid already answered and forgotten")
                return cached
            if rid - self.next_rid >= self.requests:
                raise BoshError("item-not-found", "rid outside the window")
            await self._wait_for_turn(rid)
            response = await self._process(rid, body)
        except BoshError as exc:
            self.end(exc.condition)
            raise
        finally:
            self.outstanding -= 1
            if self.outstanding == 0 and not self.ended:
                self._start_inactivity()
        if not self.ended:
            self.responses[rid] = response
            for old in [r for r in self.responses if r <= rid - self.requests]:
                del self.responses[old]
        return response

    async def _wait_for_turn(self, rid: int) -> None:
        async with self.turn:
            try:
                await asyncio.wait_for(
                    self.turn.wait_for(lambda: self.next_rid >= rid or self.ended), self.wait
                )
            except TimeoutError:
                raise BoshError("item-not-found", "earlier requests never arrived") from None
        if self.ended:
            raise BoshError("item-not-found", "the session has ended")

    async def _advance(self, rid: int) -> None:
        self.next_rid = rid + 1
        async with self.turn:
            self.turn.notify_all()

    async def _process(self, rid: int, body: ParsedBody) -> bytes:
        ack = body.attrs.get("ack")
        if ack is not None and ack.isdigit():
            for old in [r for r in self.responses if r <= int(ack)]:
                del self.responses[old]
        if body.xbosh("restart") == "true":
            to = body.attrs.get("to", "")
            lang = body.attrs.get("xml:lang")
            header = {"to": to, "version": "1.0"} | ({"xml:lang": lang} if lang else {})
            self._feed(stream_header(header))
        for child in body.children:
            self._feed(standalone(child))
        if not body.children and body.xbosh("restart") != "true":
            self._keepalive()
        await self._advance(rid)
        if body.attrs.get("type") == "terminate":
            self._feed(b"</stream:stream>")
            self.end(None, dropped=False)
            return terminate_bytes(None)
        return await self._hold(rid)

    def _feed(self, data: bytes) -> None:
        self.last_fed = self._loop.time()
        self.stream.feed(data)

    def _keepalive(self) -> None:
        """Empty polls are the client's keep-alive; the session's idle timer must see one."""
        every = min(KEEPALIVE_EVERY, self.front.proxy.config.idle_timeout / 2)
        if self.stream_attrs is not None and self._loop.time() - self.last_fed > every:
            self._feed(b" ")

    async def _hold(self, rid: int) -> bytes:
        if self.closed or (self.pending and self.created):
            return self._response_for(rid)
        held = _Held(rid)
        self.held.append(held)
        while len(self.held) > self.hold and self.created:
            self._answer(self.held.popleft())  # §10: the oldest goes back at once
        try:
            return await asyncio.wait_for(asyncio.shield(held.future), self.wait)
        except TimeoutError:
            with contextlib.suppress(ValueError):
                self.held.remove(held)
            if not held.future.done():
                held.future.set_result(self._response_for(rid))
            return held.future.result()

    # -- lifetime --------------------------------------------------------------------------------

    def _start_inactivity(self) -> None:
        self._inactivity = self._loop.call_later(
            self.front.config.inactivity, self.end, "inactivity"
        )

    def _stop_inactivity(self) -> None:
        if self._inactivity is not None:
            self._inactivity.cancel()
            self._inactivity = None

    def end(self, condition: str | None, *, dropped: bool = True) -> None:
        """End the BOSH session; held requests get a terminate body with `condition`."""
        if self.ended:
            return
        log.info("bosh session ended", extra={"sid": self.sid, "condition": condition})
        self._forget()
        while self.held:
            held = self.held.popleft()
            if not held.future.done():
                held.future.set_result(terminate_bytes(condition))
        if dropped:
            # As a dropped TCP connection: the server keeps a resumable XEP-0198 session.
            self.stream.feed_eof()
        self._loop.create_task(self._wake_waiters())

    def _forget(self) -> None:
        self.ended = True
        self._stop_inactivity()
        self.front.sessions.pop(self.sid, None)

    async def _wake_waiters(self) -> None:
        async with self.turn:
            self.turn.notify_all()


class BoshFrontEnd:
    """The BOSH HTTP listener (aiohttp); every BOSH session is a session of `proxy`."""

    def __init__(self, proxy: C2SProxy, config: BoshConfig | None = None) -> None:
        self.proxy = proxy
        self.config = config or BoshConfig()
        self.limits = proxy.config.limits
        self.sessions: dict[str, BoshSession] = {}
        self.default_domain = next(iter(sorted(proxy.config.domains)), "localhost")
        self._runner: web.AppRunner | None = None
        max_body = self.config.max_body_bytes or self.limits.max_stanza_bytes + 8192
        # A body may hold several stanzas; each is held to the stanza limit by the session.
        self._body_limits = FramingLimits(
            max_stanza_bytes=max_body,
            max_depth=self.limits.max_depth + 1,
            max_attributes=self.limits.max_attributes,
        )
        self._max_body = max_body

    async def start(self, host: str, port: int) -> tuple[str, int]:
        app = web.Application(client_max_size=self._max_body)
        app.router.add_post(self.config.path, self._post)
        app.router.add_route("OPTIONS", self.config.path, self._preflight)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.config.tls)
        await site.start()
        # The runner's public list of bound addresses (the port, when 0 was asked for); it
        # also works on uvloop, whose server is not an asyncio.Server.
        address = self._runner.addresses[0]
        return str(address[0]), int(address[1])

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            session.end("system-shutdown")
        if self._runner is not None:
            await self._runner.cleanup()

    def _cors(self) -> dict[str, str]:
        return {
            "Access-Control-Allow-Origin": self.config.allow_origin,
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type",
            "Access-Control-Max-Age": "86400",
        }

    async def _preflight(self, _request: web.Request) -> web.Response:
        return web.Response(status=204, headers=self._cors())

    def _reply(self, data: bytes, status: int = 200) -> web.Response:
        return web.Response(
            body=data,
            status=status,
            content_type="text/xml",
            charset="utf-8",
            headers=self._cors(),
        )

    async def _post(self, request: web.Request) -> web.Response:
        try:
            data = await request.read()
            body = parse_body(data, self._body_limits, self.limits)
            rid = _number(body.attrs.get("rid"), "rid", upper=MAX_RID)
            sid = body.attrs.get("sid")
            if sid is None:
                return self._reply(await self._create(rid, body, request))
            session = self.sessions.get(sid)
            if session is None:
                raise BoshError("item-not-found", "unknown sid", status=404)
            return self._reply(await session.request(rid, body))
        except BoshError as exc:
            log.info(
                "bosh request refused", extra={"condition": exc.condition, "detail": exc.detail}
            )
            return self._reply(terminate_bytes(exc.condition), exc.status)
        except web.HTTPRequestEntityTooLarge:
            return self._reply(terminate_bytes("policy-violation"), 413)

    async def _create(self, rid: int, body: ParsedBody, request: web.Request) -> bytes:
        attrs = body.attrs
        if body.xbosh("version") is None:
            raise BoshError("bad-request", "xmpp:version is required (XEP-0206)")
        to = attrs.get("to", "").lower()
        if to not in self.proxy.config.domains:
            raise BoshError("host-unknown", "this service does not host that domain")
        if len(self.sessions) >= self.config.max_sessions:
            raise BoshError("remote-connection-failed", "too many sessions")
        wait = min(_number(attrs.get("wait", "60"), "wait", upper=3600), self.config.max_wait)
        hold = min(_number(attrs.get("hold", "1"), "hold", upper=100), self.config.max_hold)
        session = BoshSession(
            self,
            sid=secrets.token_urlsafe(18),
            first_rid=rid + 1,
            wait=max(wait, 1),
            hold=hold,
            acks=attrs.get("ack") == "1",
            peer=request.remote,
        )
        session.task = self.proxy.adopt(session.stream.reader, session.stream.writer)
        self.sessions[session.sid] = session
        lang = attrs.get("xml:lang")
        session.stream.feed(
            stream_header({"to": to, "version": "1.0"} | ({"xml:lang": lang} if lang else {}))
        )
        session.outstanding += 1
        try:
            return await session._hold(rid)
        finally:
            session.outstanding -= 1
            if session.outstanding == 0 and not session.ended:
                session._start_inactivity()
