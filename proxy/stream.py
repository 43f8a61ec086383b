"""Hardened incremental framing of an XMPP stream, sans I/O.

Bytes go in; frames come out: the stream header, each top-level element with its exact
byte span (so it can be forwarded without re-serialisation), whitespace keep-alives and the
stream close. expat does the tokenising; only start and end tags call back into Python, and
an element is parsed into a tree only when somebody asks for it.

What is refused, and with which RFC 6120 stream error:
- DTDs, entity declarations, comments and processing instructions: `restricted-xml`;
- malformed XML and invalid UTF-8: `not-well-formed`;
- a stanza larger than `max_stanza_bytes`, deeper than `max_depth`, or with more than
  `max_attributes` attributes on one element: `policy-violation`;
- a stream header in the wrong namespace: `invalid-namespace`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Final
from xml.parsers import expat
from xml.sax.saxutils import quoteattr

from proxy.errors import FramingError

STREAM_NS: Final = "http://etherx.jabber.org/streams"
CLIENT_NS: Final = "jabber:client"
XML_NS: Final = "http://www.w3.org/XML/1998/namespace"

# Inside a start tag '>' can only appear within a quoted attribute value.
_TAG_END = re.compile(rb"""(?:[^'">]|"[^"]*"|'[^']*')*>""")


@dataclass(frozen=True, slots=True)
class FramingLimits:
    """Per-stream limits; a stream that breaks one is closed with `policy-violation`."""

    max_stanza_bytes: int = 256 * 1024
    max_depth: int = 32
    max_attributes: int = 64


@dataclass(frozen=True, slots=True)
class StreamOpen:
    """The stream header, with any XML declaration before it."""

    data: bytes
    attrs: dict[str, str]
    namespaces: dict[str, str]


@dataclass(slots=True)
class Element:
    """One top-level element: a stanza (message, presence, iq) or a nonza."""

    data: bytes
    namespace: str
    name: str
    attrs: dict[str, str]
    namespaces: dict[str, str]
    _tree: ET.Element | None = field(default=None, repr=False)

    @property
    def is_stanza(self) -> bool:
        return self.namespace == CLIENT_NS and self.name in ("message", "presence", "iq")

    def tree(self) -> ET.Element:
        """The element parsed into an ElementTree tree, with the stream's namespaces in scope.

        Parsed on first use only: most elements are forwarded without ever being looked at.
        """
        if self._tree is None:
            decls = " ".join(
                f"xmlns={quoteattr(uri)}" if prefix == "" else f"xmlns:{prefix}={quoteattr(uri)}"
                for prefix, uri in self.namespaces.items()
            )
            wrapper = b"<w " + decls.encode() + b">" + self.data + b"</w>"
            self._tree = ET.fromstring(wrapper)[0]  # noqa: S314 - expat already vetted it
        return self._tree


@dataclass(frozen=True, slots=True)
class Whitespace:
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamClose:
    data: bytes


Frame = StreamOpen | Element | Whitespace | StreamClose


def _split(name: str) -> tuple[str, str]:
    namespace, _, local = name.rpartition(" ")
    return namespace, local


def _attributes(raw: dict[str, str]) -> dict[str, str]:
    # expat reports namespaced attributes as "uri local"; keep plain ones as they are and
    # give xml:lang its familiar spelling.
    if not any(" " in key for key in raw):
        return raw
    out: dict[str, str] = {}
    for key, value in raw.items():
        namespace, local = _split(key)
        if namespace == XML_NS:
            out[f"xml:{local}"] = value
        elif namespace:
            out[f"{{{namespace}}}{local}"] = value
        else:
            out[local] = value
    return out


class Framer:
    """Splits one direction of an XMPP stream into frames.

    Call `reset()` whenever the stream restarts (after STARTTLS and after SASL success).
    """

    def __init__(self, limits: FramingLimits | None = None) -> None:
        self._limits = limits or FramingLimits()
        self.bytes_in = 0
        self.reset()

    def reset(self) -> None:
        parser = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        if hasattr(parser, "SetReparseDeferralEnabled"):
            # Deferral would hold back a complete small stanza until more bytes arrive.
            parser.SetReparseDeferralEnabled(False)
        parser.StartElementHandler = self._on_start
        parser.EndElementHandler = self._on_end
        parser.StartNamespaceDeclHandler = self._on_namespace
        parser.StartDoctypeDeclHandler = self._refuse_doctype
        parser.EntityDeclHandler = self._refuse_entity
        parser.ProcessingInstructionHandler = self._refuse_pi
        parser.CommentHandler = self._refuse_comment
        self._parser = parser
        self._buffer = bytearray()
        self._base = 0  # absolute offset of _buffer[0] in this parser's input
        self._consumed = 0  # absolute offset just past the last emitted frame
        self._fed = 0
        self._depth = 0
        self._element_start = -1
        self._element_name = ""
        self._element_attrs: dict[str, str] = {}
        self._pending_namespaces: dict[str, str] = {}
        self._stream_namespaces: dict[str, str] = {}
        self._frames: list[Frame] = []
        self.opened = False

    @property
    def namespaces(self) -> dict[str, str]:
        return self._stream_namespaces

    def feed(self, data: bytes) -> list[Frame]:
        """Parse more bytes; return the frames they completed (possibly none)."""
        self.bytes_in += len(data)
        self._buffer += data
        self._fed += len(data)
        try:
            self._parser.Parse(data, False)
        except expat.ExpatError as exc:
            raise FramingError("not-well-formed", expat.errors.messages[exc.code]) from None
        frames = self._frames
        self._frames = []
        if self._fed - self._consumed > self._limits.max_stanza_bytes:
            raise FramingError(
                "policy-violation",
                f"stanza larger than {self._limits.max_stanza_bytes} bytes",
            )
        # Keep only what the element still being parsed needs.
        if self._consumed > self._base:
            del self._buffer[: self._consumed - self._base]
            self._base = self._consumed
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an element not yet complete (what a slow client has left hanging)."""
        return self._fed - self._consumed

    # expat callbacks -------------------------------------------------------------------

    def _slice(self, start: int, end: int) -> bytes:
        return bytes(self._buffer[start - self._base : end - self._base])

    def _gap(self, upto: int) -> None:
        if upto > self._consumed:
            gap = self._slice(self._consumed, upto)
            if gap.strip():
                raise FramingError("not-well-formed", "text between top-level elements")
            self._frames.append(Whitespace(gap))
            self._consumed = upto

    def _tag_end(self, start: int) -> int:
        match = _TAG_END.match(self._buffer, start - self._base)
        if match is None:  # pragma: no cover - expat saw a whole tag, so there is a '>'
            raise FramingError("not-well-formed", "unterminated tag")
        return match.end() + self._base

    def _on_namespace(self, prefix: str | None, uri: str) -> None:
        self._pending_namespaces[prefix or ""] = uri

    def _on_start(self, name: str, attrs: dict[str, str]) -> None:
        depth = self._depth
        self._depth = depth + 1
        if len(attrs) > self._limits.max_attributes:
            raise FramingError("policy-violation", "too many attributes")
        if depth == 0:
            namespace, local = _split(name)
            if namespace != STREAM_NS or local != "stream":
                raise FramingError("invalid-namespace", "not an XMPP stream header")
            start = self._parser.CurrentByteIndex
            end = self._tag_end(start)
            self._stream_namespaces = dict(self._pending_namespaces)
            self._pending_namespaces.clear()
            self._frames.append(
                StreamOpen(
                    self._slice(self._consumed, end), _attributes(attrs), self._stream_namespaces
                )
            )
            self._consumed = end
            self.opened = True
        elif depth == 1:
            start = self._parser.CurrentByteIndex
            self._gap(start)
            self._element_start = start
            self._element_name = name
            self._element_attrs = attrs
            self._pending_namespaces.clear()
        elif depth > self._limits.max_depth:
            raise FramingError("policy-violation", f"nesting deeper than {self._limits.max_depth}")

    def _element_end(self, start: int, end_event_index: int) -> int:
        start_tag_end = self._tag_end(start)
        if self._buffer[start_tag_end - 2 - self._base] == ord("/"):
            return start_tag_end  # <x/>: expat reports the end event past the tag
        return self._buffer.index(b">", end_event_index - self._base) + 1 + self._base

    def _on_end(self, name: str) -> None:
        self._depth -= 1
        depth = self._depth
        if depth == 1:
            start = self._element_start
            end = self._element_end(start, self._parser.CurrentByteIndex)
            namespace, local = _split(name)
            self._frames.append(
                Element(
                    self._slice(start, end),
                    namespace,
                    local,
                    _attributes(self._element_attrs),
                    self._stream_namespaces,
                )
            )
            self._consumed = end
        elif depth == 0:
            index = self._parser.CurrentByteIndex
            self._gap(index)
            end = self._buffer.index(b">", index - self._base) + 1 + self._base
            self._frames.append(StreamClose(self._slice(index, end)))
            self._consumed = end

    def _refuse_doctype(self, *_: object) -> None:
        raise FramingError("restricted-xml", "document type declarations are not allowed")

    def _refuse_entity(self, *_: object) -> None:
        raise FramingError("restricted-xml", "entity declarations are not allowed")

    def _refuse_pi(self, *_: object) -> None:
        raise FramingError("restricted-xml", "processing instructions are not allowed")

    def _refuse_comment(self, *_: object) -> None:
        raise FramingError("restricted-xml", "comments are not allowed")


def stream_error(condition: str, text: str | None = None) -> bytes:
    """A stream error followed by the stream close, ready to send."""
    body = f"<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
    if text:
        body += f"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>{_escape(text)}</text>"
    return f"<stream:error>{body}</stream:error></stream:stream>".encode()


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")
    )
