"""Minimal WebSocket (RFC 7395) and BOSH (XEP-0206) XMPP clients for protocol tests.

They do one step at a time what a test asks for, and parse what comes back with the standard
library's ElementTree (not the proxy's framer), so a framing bug cannot agree with itself.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

FRAMING_NS = "urn:ietf:params:xml:ns:xmpp-framing"
BOSH_NS = "http://jabber.org/protocol/httpbind"
XBOSH_NS = "urn:xmpp:xbosh"
CLIENT_NS = "jabber:client"
STREAM_NS = "http://etherx.jabber.org/streams"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
STREAMS_ERROR_NS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZAS_ERROR_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
TIMEOUT = 10.0


def insecure_context() -> ssl.SSLContext:
    """Accept the tests' self-signed certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def plain_auth(user: str, password: str) -> str:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{token}</auth>"


def bind_request(resource: str) -> str:
    return (
        f"<iq xmlns='{CLIENT_NS}' type='set' id='bind-1'><bind xmlns='{BIND_NS}'>"
        f"<resource>{resource}</resource></bind></iq>"
    )


def chat(to: str, body: str, *, id: str | None = None) -> str:
    return (
        f"<message xmlns='{CLIENT_NS}' to='{to}' type='chat' id='{id or uuid.uuid4().hex}'>"
        f"<body>{body}</body></message>"
    )


def stream_error_condition(element: ET.Element) -> str | None:
    if element.tag != f"{{{STREAM_NS}}}error":
        return None
    for child in element:
        if child.tag.startswith(f"{{{STREAMS_ERROR_NS}}}") and not child.tag.endswith("}text"):
            return child.tag.split("}", 1)[1]
    return None


def bound_jid(result: ET.Element) -> str:
    jid = result.find(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid")
    assert jid is not None and jid.text, ET.tostring(result)
    return jid.text


# -- WebSocket ------------------------------------------------------------------------------------


@dataclass
class WsXmppClient:
    url: str
    domain: str
    frames: list[str] = field(default_factory=list)  # every text frame received
    socket: ClientConnection | None = None

    async def connect(self, subprotocols: list[str] | None = None, **kwargs: Any) -> None:
        chosen = [Subprotocol(p) for p in (["xmpp"] if subprotocols is None else subprotocols)]
        options: dict[str, Any] = {"subprotocols": chosen or None, "open_timeout": TIMEOUT}
        if self.url.startswith("wss:"):
            options["ssl"] = insecure_context()
        options.update(kwargs)
        self.socket = await connect(self.url, **options)

    async def send(self, data: str | bytes) -> None:
        assert self.socket is not None
        await self.socket.send(data)

    async def frame(self, timeout: float = TIMEOUT) -> str:
        assert self.socket is not None
        message = await asyncio.wait_for(self.socket.recv(), timeout)
        assert isinstance(message, str), f"binary frame from the server: {message!r}"
        self.frames.append(message)
        return message

    async def element(self, timeout: float = TIMEOUT) -> ET.Element:
        return ET.fromstring(await self.frame(timeout))

    async def wait_for(
        self, wanted: Callable[[ET.Element], bool], timeout: float = TIMEOUT
    ) -> ET.Element:
        async with asyncio.timeout(timeout):
            while True:
                element = await self.element(timeout)
                if wanted(element):
                    return element

    async def open(self) -> ET.Element:
        """Send `<open/>`; return the server's features (after its `<open/>`)."""
        await self.send(
            f"<open xmlns='{FRAMING_NS}' to='{self.domain}' version='1.0' xml:lang='en'/>"
        )
        opened = await self.element()
        assert opened.tag == f"{{{FRAMING_NS}}}open", ET.tostring(opened)
        features = await self.element()
        assert features.tag == f"{{{STREAM_NS}}}features", ET.tostring(features)
        return features

    async def login(self, user: str, password: str, resource: str = "ws") -> str:
        await self.open()
        await self.send(plain_auth(user, password))
        success = await self.element()
        assert success.tag == f"{{{SASL_NS}}}success", ET.tostring(success)
        await self.open()
        await self.send(bind_request(resource))
        jid = bound_jid(await self.wait_for(lambda e: e.get("id") == "bind-1"))
        await self.send(f"<presence xmlns='{CLIENT_NS}'/>")
        return jid

    async def close_code(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server closes the socket; its close code."""
        assert self.socket is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.socket.recv()
                    if isinstance(message, str):
                        self.frames.append(message)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else None

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()


# -- BOSH -----------------------------------------------------------------------------------------


@dataclass
class BoshReply:
    status: int
    body: ET.Element | None
    text: str

    @property
    def children(self) -> list[ET.Element]:
        return list(self.body) if self.body is not None else []

    @property
    def terminated(self) -> bool:
        return self.body is not None and self.body.get("type") == "terminate"

    @property
    def condition(self) -> str | None:
        return self.body.get("condition") if self.body is not None else None


@dataclass
class BoshXmppClient:
    url: str
    domain: str
    rid: int = 1_000_000
    sid: str | None = None
    http: httpx.AsyncClient = field(
        default_factory=lambda: httpx.AsyncClient(verify=False, timeout=60.0)  # noqa: S501
    )
    inbox: list[ET.Element] = field(default_factory=list)

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    async def post(self, body: str | bytes) -> BoshReply:
        content = body.encode() if isinstance(body, str) else body
        response = await self.http.post(
            self.url, content=content, headers={"Content-Type": "text/xml; charset=utf-8"}
        )
        parsed = ET.fromstring(response.content) if response.content.strip() else None
        reply = BoshReply(response.status_code, parsed, response.text)
        if parsed is not None:
            self.inbox.extend(parsed)
        return reply

    def wrap(self, payload: str = "", rid: int | None = None, **attrs: str) -> str:
        rendered = "".join(f" {k.replace('__', ':')}='{v}'" for k, v in attrs.items())
        return (
            f"<body xmlns='{BOSH_NS}' xmlns:xmpp='{XBOSH_NS}' rid='{rid or self.next_rid()}' "
            f"sid='{self.sid}'{rendered}>{payload}</body>"
        )

    async def create(self, *, wait: int = 5, hold: int = 1, **extra: str) -> BoshReply:
        rendered = "".join(f" {k.replace('__', ':')}='{v}'" for k, v in extra.items())
        reply = await self.post(
            f"<body xmlns='{BOSH_NS}' xmlns:xmpp='{XBOSH_NS}' content='text/xml; charset=utf-8' "
            f"hold='{hold}' rid='{self.next_rid()}' to='{self.domain}' ver='1.6' wait='{wait}' "
            f"xml:lang='en' xmpp:version='1.0'{rendered}/>"
        )
        if reply.body is not None and reply.body.get("sid"):
            self.sid = reply.body.get("sid")
        return reply

    async def send(self, *payload: str, **attrs: str) -> BoshReply:
        return await self.post(self.wrap("".join(payload), None, **attrs))

    async def wait_for(
        self, wanted: Callable[[ET.Element], bool], timeout: float = TIMEOUT
    ) -> ET.Element:
        async with asyncio.timeout(timeout):
            while True:
                for index, element in enumerate(self.inbox):
                    if wanted(element):
                        del self.inbox[: index + 1]
                        return element
                reply = await self.send()
                assert reply.status == 200 and not reply.terminated, reply.text

    async def features(self) -> ET.Element:
        return await self.wait_for(lambda e: e.tag == f"{{{STREAM_NS}}}features")

    async def login(self, user: str, password: str, resource: str = "bosh") -> str:
        created = await self.create()
        assert created.status == 200 and self.sid, created.text
        await self.features()
        await self.send(plain_auth(user, password))
        await self.wait_for(lambda e: e.tag == f"{{{SASL_NS}}}success")
        await self.send(
            to=self.domain, xml__lang="en", xmpp__restart="true"
        )  # the restart's reply carries the new features, or a later poll does
        await self.features()
        await self.send(bind_request(resource))
        jid = bound_jid(await self.wait_for(lambda e: e.get("id") == "bind-1"))
        await self.send(f"<presence xmlns='{CLIENT_NS}'/>")
        return jid

    async def close(self) -> None:
        await self.http.aclose()
