"""What the WebSocket (RFC 7395) and BOSH (XEP-0124/0206) front ends share.

Both translate their framing into the classic XMPP stream at the edge and run an ordinary
`ClientSession` over an in-memory transport, so decisions, archiving and stream management
are the TCP front end's code, not a copy:

- `memory_stream()` gives the session a real `asyncio.StreamReader`/`StreamWriter` pair whose
  transport hands what the session writes to the front end, with flow control;
- `stream_header()` turns an RFC 7395 `<open/>` (or a BOSH session request) into the stream
  header the session expects;
- `ElementChecker` accepts exactly one well-formed top-level element at a time from the web
  client, under the same hardened framer and limits as the TCP stream;
- `Reframer` splits what the session sends toward the client back into standalone elements,
  each carrying the namespace declarations it inherited from the stream header.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from xml.sax.saxutils import quoteattr

from proxy.errors import FramingError
from proxy.stream import (
    CLIENT_NS,
    STREAM_NS,
    Element,
    Framer,
    FramingLimits,
    StreamClose,
    StreamOpen,
)

FRAMING_NS: Final = "urn:ietf:params:xml:ns:xmpp-framing"
SASL_NS: Final = "urn:ietf:params:xml:ns:xmpp-sasl"

# The first name in a start tag ends at whitespace, '/' or '>'.
_START_TAG_NAME = re.compile(rb"<[^\s/>]+")


# -- the in-memory transport a session runs over ------------------------------------------------


class MemoryTransport(asyncio.Transport):
    """The session's side of a front-end connection: writes go to `deliver`, in order.

    `deliver` returns how many bytes the front end has queued and not yet sent; above
    `high_water` the session's `drain()` blocks until the front end calls `sent()` enough
    to get under `low_water` again (the same back-pressure a socket gives).
    """

    def __init__(
        self,
        deliver: Callable[[bytes], int],
        on_close: Callable[[], None],
        extra: Mapping[str, Any],
        *,
        high_water: int = 256 * 1024,
    ) -> None:
        super().__init__(dict(extra))
        self._deliver = deliver
        self._on_close = on_close
        self._high = high_water
        self._low = high_water // 4
        self._queued = 0
        self._paused = False
        self._closing = False
        self._protocol: asyncio.StreamReaderProtocol | None = None

    def bind(self, protocol: asyncio.StreamReaderProtocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)

    # -- what the session calls ---------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._queued = self._deliver(bytes(data))
        if not self._paused and self._queued > self._high and self._protocol is not None:
            self._paused = True
            self._protocol.pause_writing()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._shut()

    def abort(self) -> None:
        self._shut()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._queued

    def pause_reading(self) -> None:
        """Reading is driven by the front end feeding the protocol; nothing to pause."""

    def resume_reading(self) -> None:
        """See `pause_reading`."""

    def is_reading(self) -> bool:
        return not self._closing

    # -- what the front end calls -------------------------------------------------------------

    def sent(self, queued: int) -> None:
        """The front end sent some output; `queued` bytes are still waiting."""
        self._queued = queued
        if self._paused and queued <= self._low and self._protocol is not None:
            self._paused = False
            self._protocol.resume_writing()

    def _shut(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._on_close()
        protocol = self._protocol
        if protocol is not None:
            # As a socket transport does: tell the protocol on the next loop iteration.
            asyncio.get_running_loop().call_soon(protocol.connection_lost, None)


@dataclass(frozen=True, slots=True)
class MemoryStream:
    """The reader and writer a `ClientSession` gets, and the handles the front end keeps."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: asyncio.StreamReaderProtocol
    transport: MemoryTransport

    def feed(self, data: bytes) -> None:
        """Bytes from the web client, already translated into the classic stream."""
        if not self.transport.is_closing():
            self.protocol.data_received(data)

    def feed_eof(self) -> None:
        """The web client is gone without closing its stream (as a dropped TCP connection)."""
        if not self.transport.is_closing():
            self.protocol.eof_received()


def memory_stream(
    deliver: Callable[[bytes], int],
    on_close: Callable[[], None],
    *,
    peer: object,
    limit: int = 128 * 1024,
) -> MemoryStream:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = MemoryTransport(deliver, on_close, {"peername": peer})
    transport.bind(protocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return MemoryStream(reader, writer, protocol, transport)


# -- web client → classic stream ------------------------------------------------------------------


def stream_header(attrs: Mapping[str, str]) -> bytes:
    """The classic stream header equivalent to an `<open/>` (or BOSH request) with `attrs`.

    Only the attributes RFC 6120 defines for a client's header are carried over.
    """
    rendered = "".join(
        f" {name}={quoteattr(attrs[name])}"
        for name in ("to", "from", "version", "xml:lang")
        if name in attrs
    )
    return f"<stream:stream xmlns='{CLIENT_NS}' xmlns:stream='{STREAM_NS}'{rendered}>".encode()


def _declarations(namespaces: Mapping[str, str]) -> str:
    return " ".join(
        f"xmlns={quoteattr(uri)}" if prefix == "" else f"xmlns:{prefix}={quoteattr(uri)}"
        for prefix, uri in namespaces.items()
    )


class ElementChecker:
    """Accepts one complete top-level element per call, checked by the hardened framer.

    The element is parsed as if inside a stream whose header declares `namespaces` (none by
    default: a WebSocket frame must declare its own, RFC 7395 §3.3.3). DTDs, entities,
    comments, processing instructions, the size, depth and attribute limits are refused as on
    the TCP stream, with the same stream-error conditions.
    """

    def __init__(self, limits: FramingLimits, namespaces: Mapping[str, str] | None = None) -> None:
        declared = {"stream": STREAM_NS, **(namespaces or {})}
        self._max_bytes = limits.max_stanza_bytes
        self._framer = Framer(limits)
        self._framer.feed(f"<stream:stream {_declarations(declared)}>".encode())

    def one(self, data: bytes) -> Element:
        """The single element in `data` (whitespace around it is allowed)."""
        elements = self.many(data)
        if len(elements) != 1:
            raise FramingError("not-well-formed", "a frame must hold exactly one element")
        return elements[0]

    def many(self, data: bytes) -> list[Element]:
        """The whole elements in `data`, in order (whitespace between them is allowed)."""
        # Whitespace after the last element would wait in the framer for the next element.
        frames = self._framer.feed(data.strip(b" \t\r\n"))
        if self._framer.buffered or any(isinstance(f, StreamClose | StreamOpen) for f in frames):
            raise FramingError("not-well-formed", "a frame must hold whole elements")
        elements = [frame for frame in frames if isinstance(frame, Element)]
        # The framer bounds what it has to buffer; a whole element arriving at once is
        # bounded here, so a frame or body cannot carry a stanza over the limit.
        if any(len(element.data) > self._max_bytes for element in elements):
            raise FramingError("policy-violation", f"stanza larger than {self._max_bytes} bytes")
        return elements


# -- classic stream → standalone elements ---------------------------------------------------------


def standalone(element: Element) -> bytes:
    """The element's bytes with every stream-level namespace it relies on declared on it.

    Adding the header's declarations that the element does not redeclare itself changes no
    name's meaning: they are exactly what was in scope.
    """
    own = element.attrs
    data = element.data
    missing = {
        prefix: uri
        for prefix, uri in element.namespaces.items()
        if ("xmlns" if prefix == "" else f"xmlns:{prefix}") not in own
        # A prefix the element never writes needs no declaration (nor archive bytes).
        and (prefix == "" or f"{prefix}:".encode() in data)
    }
    if not missing:
        return data
    match = _START_TAG_NAME.match(data)
    if match is None:  # pragma: no cover - the framer hands over elements only
        raise FramingError("not-well-formed", "not an element")
    at = match.end()
    return data[:at] + b" " + _declarations(missing).encode() + data[at:]


@dataclass(frozen=True, slots=True)
class Opened:
    """The server's stream header (or the proxy's own, before an error)."""

    attrs: dict[str, str]


@dataclass(frozen=True, slots=True)
class Standalone:
    """One top-level element, self-contained (see `standalone`)."""

    data: bytes
    element: Element

    @property
    def is_stream_error(self) -> bool:
        return self.element.namespace == STREAM_NS and self.element.name == "error"


@dataclass(frozen=True, slots=True)
class Closed:
    """The stream ended (`</stream:stream>`)."""


Reframed = Opened | Standalone | Closed


class Reframer:
    """Splits the session's output toward the client into headers, elements and the close.

    Whitespace keep-alives are dropped (both framings have their own). The stream restarts
    after SASL success; the session never sends anything after `<success/>` before the
    client has sent its new header, so the framer restarts there.
    """

    def __init__(self, limits: FramingLimits) -> None:
        # The server's stanzas may be larger than what clients may send; the session's own
        # framer has already held them to the configured limit.
        self._framer = Framer(
            FramingLimits(
                max_stanza_bytes=max(limits.max_stanza_bytes, 1 << 20) * 4,
                max_depth=limits.max_depth * 2,
                max_attributes=limits.max_attributes * 2,
            )
        )

    def feed(self, data: bytes) -> list[Reframed]:
        out: list[Reframed] = []
        for frame in self._framer.feed(data):
            if isinstance(frame, StreamOpen):
                out.append(Opened(dict(frame.attrs)))
            elif isinstance(frame, Element):
                out.append(Standalone(standalone(frame), frame))
                if frame.namespace == SASL_NS and frame.name == "success":
                    self._framer.reset()
                    break
            elif isinstance(frame, StreamClose):
                out.append(Closed())
                self._framer.reset()
                break
        return out
