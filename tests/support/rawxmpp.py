"""A minimal XMPP client over asyncio streams, for tests that need byte-level control.

slixmpp hides exactly what transport tests must see or break: the raw bytes a server sends
back before it closes, the stream-management counters, the moment a TCP connection dies. This
client does only what a test asks for, one step at a time: STARTTLS or direct TLS, SASL PLAIN,
bind, XEP-0198 enable/resume with its own counters, raw writes and an abrupt abort.

Incoming XML is parsed with the standard library's ``XMLPullParser`` (not the proxy's own
framer), so a framing bug in the proxy cannot agree with itself here. Every byte received is
also kept in ``received`` for assertions on exactly what came back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

STREAM_NS = "http://etherx.jabber.org/streams"
CLIENT_NS = "jabber:client"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
SM_NS = "urn:xmpp:sm:3"
STREAMS_ERROR_NS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZA_NAMES = frozenset({"message", "presence", "iq"})

DEFAULT_TIMEOUT = 10.0


class RawClientError(AssertionError):
    """The peer did not answer the way the step expected (a test failure, with context)."""


class StreamEnded(RawClientError):
    """The stream or the connection ended while the client waited for something else."""


def client_ssl_context() -> ssl.SSLContext:
    """Accept the throwaway self-signed certificates of tests; ALPN as XEP-0368 asks."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["xmpp-client"])
    return ctx


def stream_header(domain: str) -> bytes:
    return (
        f"<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' "
        "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    ).encode()


def local(tag: str) -> tuple[str, str]:
    """``{ns}name`` → ``(ns, name)``."""
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return "", tag


def is_stanza(element: ET.Element) -> bool:
    ns, name = local(element.tag)
    return ns == CLIENT_NS and name in STANZA_NAMES


def stream_error_condition(element: ET.Element) -> str | None:
    """The condition of a ``<stream:error/>``, or None for any other element."""
    if element.tag != f"{{{STREAM_NS}}}error":
        return None
    for child in element:
        ns, name = local(child.tag)
        if ns == STREAMS_ERROR_NS and name != "text":
            return name
    return ""


@dataclass
class SmCounters:
    """This client's XEP-0198 view: what it sent and what it handled since enable/resume."""

    sm_id: str | None = None
    outbound: int = 0  # stanzas sent since <enable/> (or resumed from <resumed h/>)
    inbound: int = 0  # stanzas received since <enabled/> (what our <a h/> reports)
    last_ack: int = 0  # the h of the last <a/> (or <resumed/>) the server sent us
    unacked: list[bytes] = field(default_factory=list)  # sent, not yet covered by an ack


class RawXmppClient:
    """One connection. Steps raise :class:`RawClientError` on anything unexpected."""

    def __init__(
        self, host: str, port: int, domain: str, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.host = host
        self.port = port
        self.domain = domain
        self.timeout = timeout
        self.received = bytearray()
        self.stream_attrs: dict[str, str] = {}
        self.features: ET.Element | None = None
        self.jid: str | None = None
        self.sm: SmCounters | None = None
        self.ended = False  # the peer sent </stream:stream> or closed the connection
        self.inbox: list[ET.Element] = []  # elements the steps did not consume, in order
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser: ET.XMLPullParser[ET.Element] = self._new_parser()
        self._depth = 0
        self._root: ET.Element | None = None
        self._queue: list[ET.Element] = []

    # -- connection -------------------------------------------------------------------------

    async def connect(self, *, direct_tls: bool = False) -> None:
        """Open TCP (and TLS from the first byte with ``direct_tls``)."""
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host,
                self.port,
                ssl=client_ssl_context() if direct_tls else None,
                server_hostname=self.domain if direct_tls else None,
            ),
            self.timeout,
        )

    async def starttls(self) -> None:
        """Open the first stream, ask for STARTTLS and do the TLS handshake."""
        await self.open_stream()
        assert self.features is not None
        if self.features.find(f"{{{TLS_NS}}}starttls") is None:
            raise RawClientError(f"no <starttls/> offered: {ET.tostring(self.features)!r}")
        self.send(f"<starttls xmlns='{TLS_NS}'/>".encode())
        answer = await self.next_element()
        if answer.tag != f"{{{TLS_NS}}}proceed":
            raise RawClientError(f"expected <proceed/>, got {ET.tostring(answer)!r}")
        await self.start_tls()

    async def start_tls(self) -> None:
        """The TLS handshake on the open connection (after ``<proceed/>``)."""
        if self._writer is None:
            raise RawClientError("not connected")
        await self._writer.start_tls(client_ssl_context(), server_hostname=self.domain)

    @property
    def tls_active(self) -> bool:
        return self._writer is not None and self._writer.get_extra_info("ssl_object") is not None

    async def open_stream(self) -> ET.Element:
        """Send a stream header; return the features that come back."""
        self._restart_parser()
        self.send(stream_header(self.domain))
        features = await self.next_element()
        if features.tag != f"{{{STREAM_NS}}}features":
            raise RawClientError(f"expected stream features, got {ET.tostring(features)!r}")
        self.features = features
        return features

    def mechanisms(self) -> list[str]:
        assert self.features is not None
        return [
            m.text or ""
            for m in self.features.iter(f"{{{SASL_NS}}}mechanism")
            if m.text is not None
        ]

    async def auth_plain(self, user: str, password: str) -> None:
        """SASL PLAIN, then the stream restart."""
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{token}</auth>".encode())
        answer = await self.next_element()
        if answer.tag != f"{{{SASL_NS}}}success":
            raise RawClientError(f"SASL PLAIN failed: {ET.tostring(answer)!r}")
        await self.open_stream()

    async def bind(self, resource: str = "raw") -> str:
        iq_id = uuid.uuid4().hex[:8]
        self.send(
            f"<iq type='set' id='{iq_id}'><bind xmlns='{BIND_NS}'>"
            f"<resource>{resource}</resource></bind></iq>".encode()
        )
        result = await self.wait_for(
            lambda e: e.tag == f"{{{CLIENT_NS}}}iq" and e.get("id") == iq_id
        )
        jid = result.findtext(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid")
        if result.get("type") != "result" or not jid:
            raise RawClientError(f"bind failed: {ET.tostring(result)!r}")
        self.jid = jid
        return jid

    async def login(
        self, user: str, password: str, *, resource: str = "raw", direct_tls: bool = False
    ) -> str:
        """Connect, TLS, PLAIN, bind: a session ready for stanzas; returns the full JID."""
        await self.connect(direct_tls=direct_tls)
        if direct_tls:
            await self.open_stream()
        else:
            await self.starttls()
            await self.open_stream()
        await self.auth_plain(user, password)
        return await self.bind(resource)

    async def presence(self) -> None:
        """Send initial presence and wait for its echo (the server now routes to us)."""
        self.send_stanza(b"<presence/>")
        await self.wait_for(
            lambda e: e.tag == f"{{{CLIENT_NS}}}presence" and e.get("from") == self.jid
        )

    # -- stream management ------------------------------------------------------------------

    async def enable_sm(self, *, resume: bool = True, then: bytes = b"") -> SmCounters:
        """``<enable/>``, optionally followed at once (same write) by ``then`` stanzas."""
        self.sm = SmCounters()
        attr = " resume='true'" if resume else ""
        self.send(f"<enable xmlns='{SM_NS}'{attr}/>".encode())
        if then:
            self.send_stanza(then)
        enabled = await self.wait_for(lambda e: local(e.tag) in {(SM_NS, "enabled")})
        self.sm.sm_id = enabled.get("id")
        return self.sm

    async def resume(self, previd: str, h: int) -> int:
        """``<resume/>`` on a fresh, authenticated stream; returns the server's ``h``."""
        self.send(f"<resume xmlns='{SM_NS}' previd='{previd}' h='{h}'/>".encode())
        answer = await self.wait_for(lambda e: local(e.tag)[0] == SM_NS)
        if local(answer.tag)[1] != "resumed":
            raise RawClientError(f"resumption failed: {ET.tostring(answer)!r}")
        return int(answer.get("h", "-1"))

    async def request_ack(self) -> int:
        """Send ``<r/>``; return the ``h`` of the ``<a/>`` that answers it."""
        self.send(f"<r xmlns='{SM_NS}'/>".encode())
        ack = await self.wait_for(lambda e: local(e.tag) == (SM_NS, "a"), keep_others=True)
        return int(ack.get("h", "-1"))

    # -- sending ----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write bytes unchanged (no counting: for nonzas and hostile input)."""
        if self._writer is None:
            raise RawClientError("not connected")
        self._writer.write(data)

    def send_stanza(self, data: bytes) -> None:
        """Write one stanza and count it for stream management."""
        self.send(data)
        if self.sm is not None:
            self.sm.outbound += 1
            self.sm.unacked.append(data)

    def send_message(self, to: str, body: str, *, id: str | None = None) -> str:
        msg_id = id or uuid.uuid4().hex[:12]
        self.send_stanza(
            f"<message to='{to}' type='chat' id='{msg_id}'><body>{body}</body></message>".encode()
        )
        return msg_id

    async def drain(self) -> None:
        if self._writer is not None:
            await self._writer.drain()

    # -- receiving --------------------------------------------------------------------------

    async def next_element(self, timeout: float | None = None) -> ET.Element:
        """The next top-level element, answering the server's ``<r/>`` and counting on the way.

        SM nonzas the server sends (``<r/>``, ``<a/>``) are handled here and also returned,
        so a step that waits for an ``<a/>`` can see it.
        """
        while not self._queue:
            if self.ended:
                raise StreamEnded(f"stream ended; received so far: {bytes(self.received)!r}")
            await self._read_more(timeout if timeout is not None else self.timeout)
        element = self._queue.pop(0)
        self._account(element)
        condition = stream_error_condition(element)
        if condition is not None:
            self.ended = True
            raise StreamEnded(f"stream error <{condition}/>: {ET.tostring(element)!r}")
        return element

    async def wait_for(
        self,
        predicate: Callable[[ET.Element], bool],
        timeout: float | None = None,
        *,
        keep_others: bool = True,
    ) -> ET.Element:
        """The next element matching ``predicate``; the others go to ``inbox`` (if kept)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self.timeout)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RawClientError(
                    f"nothing matching within the timeout; inbox: "
                    f"{[ET.tostring(e)[:200] for e in self.inbox]}"
                )
            element = await self.next_element(remaining)
            if predicate(element):
                return element
            if keep_others:
                self.inbox.append(element)

    async def messages(self, count: int, timeout: float | None = None) -> list[ET.Element]:
        """Collect ``count`` messages (from ``inbox`` first, then the stream)."""
        found = [e for e in self.inbox if e.tag == f"{{{CLIENT_NS}}}message"]
        self.inbox = [e for e in self.inbox if e.tag != f"{{{CLIENT_NS}}}message"]
        while len(found) < count:
            found.append(await self.wait_for(lambda e: e.tag == f"{{{CLIENT_NS}}}message", timeout))
        return found

    async def read_until_closed(self, timeout: float | None = None) -> bytes:
        """Read until the peer closes the connection; return everything received, ever."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self.timeout)
        assert self._reader is not None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RawClientError(f"connection still open; received: {bytes(self.received)!r}")
            try:
                data = await asyncio.wait_for(self._reader.read(65536), remaining)
            except (ConnectionError, ssl.SSLError):
                return bytes(self.received)
            if not data:
                return bytes(self.received)
            self.received += data

    def _account(self, element: ET.Element) -> None:
        sm = self.sm
        if sm is None:
            return
        ns, name = local(element.tag)
        if is_stanza(element):
            sm.inbound += 1
        elif ns == SM_NS and name == "r":
            self.send(f"<a xmlns='{SM_NS}' h='{sm.inbound % 2**32}'/>".encode())
        elif ns == SM_NS and name in {"a", "resumed"}:
            h = int(element.get("h", "0"))
            acked = (h - sm.last_ack) % 2**32
            del sm.unacked[:acked]
            sm.last_ack = h
        elif ns == SM_NS and name == "enabled":
            sm.inbound = 0

    async def _read_more(self, timeout: float) -> None:
        assert self._reader is not None
        try:
            data = await asyncio.wait_for(self._reader.read(65536), timeout)
        except TimeoutError:
            raise RawClientError(
                f"no data within {timeout}s; received so far: {bytes(self.received)[-500:]!r}"
            ) from None
        except (ConnectionError, ssl.SSLError) as exc:
            self.ended = True
            raise StreamEnded(f"connection lost: {exc!r}") from None
        if not data:
            self.ended = True
            return
        self.received += data
        self._parser.feed(data)
        for entry in self._parser.read_events():
            if len(entry) != 2 or not isinstance(entry[1], ET.Element):
                continue  # only start/end events were asked for
            event, element = entry[0], entry[1]
            if event == "start":
                self._depth += 1
                if self._depth == 1:
                    self._root = element
                    self.stream_attrs = dict(element.attrib)
            elif event == "end":
                self._depth -= 1
                if self._depth == 1:
                    self._queue.append(element)
                    if self._root is not None:
                        self._root.remove(element)  # a long stream must not grow a tree
                elif self._depth == 0:
                    self.ended = True

    # -- parser -----------------------------------------------------------------------------

    @staticmethod
    def _new_parser() -> ET.XMLPullParser[ET.Element]:
        return ET.XMLPullParser(events=("start", "end"))

    def _restart_parser(self) -> None:
        self._parser = self._new_parser()
        self._depth = 0
        self._root = None
        self._queue.clear()

    # -- closing ----------------------------------------------------------------------------

    def abort(self) -> None:
        """Cut the TCP connection at once: no closing tag, no TLS close_notify."""
        if self._writer is not None:
            self._writer.transport.abort()
            self._writer = None

    async def close(self) -> None:
        """Close the stream politely (if still open) and the connection."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        with contextlib.suppress(Exception):
            if not self.ended and not writer.is_closing():
                writer.write(b"</stream:stream>")
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2.0)
