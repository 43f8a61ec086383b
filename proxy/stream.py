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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
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


class Element:
    """One top-level element: a stanza (message, presence, iq) or a nonza."""

    __slots__ = ("_attrs", "_flat", "_tree", "data", "name", "namespace", "namespaces")

    def __init__(
        self,
        data: bytes,
        namespace: str,
        name: str,
        attrs: dict[str, str] | None,
        namespaces: dict[str, str],
        flat: list[str] | None = None,
    ) -> None:
        self.data = data
        self.namespace = namespace
        self.name = name
        self.namespaces = namespaces
        self._attrs = attrs
        self._flat = flat
        self._tree: ET.Element | None = None

    def __repr__(self) -> str:
        return f"Element({self.namespace!r}, {self.name!r}, {self.data[:80]!r})"

    @property
    def attrs(self) -> dict[str, str]:
        """The element's own attributes, as written (prefixed names stay prefixed)."""
        if self._attrs is None:
            flat = self._flat or []
            self._attrs = dict(zip(flat[::2], flat[1::2], strict=True))
        return self._attrs

    @property
    def is_stanza(self) -> bool:
        return self.namespace == CLIENT_NS and self.name in ("message", "presence", "iq")

    def tree(self) -> ET.Element:
        """The element parsed into an ElementTree tree, with the stream's namespaces in scope.

        Parsed on first use only: most elements are forwarded without ever being looked at.
        """
        if self._tree is None:
            self._tree = _parse_in_scope(self.data, self.namespaces)
        return self._tree


class _ScopedParser:
    """A parser left open inside a wrapper element that declares a stream's namespaces.

    Creating an expat parser costs about three times as much as parsing a short stanza, so
    one parser serves every stanza of streams with the same declarations; it is replaced
    after `_PARSER_BUDGET` bytes because expat keeps every distinct name it met.

    The tree builder is ElementTree's C one, and no event is reported: each stanza is fed
    with a sentinel element after it and read as the wrapper's last child but one, then
    dropped from the wrapper. The sentinel proves the stanza closed: had it not, the
    sentinel would have become its child (a pull parser's last "end" event could be a child
    of an unclosed stanza). Per stanza it costs about what the pull parser did
    (`benchmarks/bench_framing.py`).
    """

    __slots__ = ("fed", "parser", "wrapper")

    def __init__(self, namespaces: tuple[tuple[str, str], ...]) -> None:
        decls = " ".join(
            f"xmlns={quoteattr(uri)}" if prefix == "" else f"xmlns:{prefix}={quoteattr(uri)}"
            for prefix, uri in namespaces
        )
        # Safe on hostile input: only what the framer passed gets here, and it refuses DTDs,
        # entity declarations and processing instructions (see the module docstring).
        self.parser = ET.XMLParser(target=ET.TreeBuilder())  # noqa: S314
        # The wrapper comes out of the one start event asked for; events then stay off.
        # `_setevents` is what `ET.XMLPullParser` itself uses to ask the C parser for events.
        started: list[tuple[str, ET.Element]] = []
        events_of: Any = self.parser
        events_of._setevents(started, ("start",))
        self.parser.feed(b"<w " + decls.encode() + b">")
        events_of._setevents(started, ())
        self.wrapper: ET.Element = started[0][1]
        self.fed = 0


_PARSER_BUDGET = 1024 * 1024
_MAX_SCOPED_PARSERS = 64
_scoped_parsers: dict[tuple[tuple[str, str], ...], _ScopedParser] = {}
_SENTINEL_NS: Final = "urn:stanzaguard:parser"
_SENTINEL: Final = f"<sg:end xmlns:sg='{_SENTINEL_NS}'/>".encode()
_SENTINEL_TAG: Final = f"{{{_SENTINEL_NS}}}end"


def _parse_in_scope(data: bytes, namespaces: dict[str, str]) -> ET.Element:
    key = tuple(namespaces.items())
    scoped = _scoped_parsers.get(key)
    if scoped is None or scoped.fed > _PARSER_BUDGET:
        if len(_scoped_parsers) >= _MAX_SCOPED_PARSERS:
            _scoped_parsers.clear()
        scoped = _scoped_parsers[key] = _ScopedParser(key)
    wrapper = scoped.wrapper
    try:
        scoped.parser.feed(data + _SENTINEL)
    except ET.ParseError as exc:
        # The framer checks well-formedness but not prefixes inside a stanza (that would
        # cost a callback per element); an undeclared one surfaces here. The parser is
        # spoiled: the next stanza gets a fresh one.
        _scoped_parsers.pop(key, None)
        raise FramingError("not-well-formed", f"stanza does not parse: {exc}") from None
    scoped.fed += len(data)
    complete = len(wrapper) >= 2 and wrapper[-1].tag == _SENTINEL_TAG
    element = wrapper[-2] if complete else None
    del wrapper[:]
    if element is None:  # the framer hands over whole elements only
        _scoped_parsers.pop(key, None)
        raise FramingError("not-well-formed", "stanza does not parse: incomplete")
    return element


@dataclass(frozen=True, slots=True)
class Whitespace:
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamClose:
    data: bytes


Frame = StreamOpen | Element | Whitespace | StreamClose


class Framer:
    """Splits one direction of an XMPP stream into frames.

    Call `reset()` whenever the stream restarts (after STARTTLS and after SASL success).

    The per-element work runs in closures over local state: expat calls back for every
    element of every stanza, and attribute look-ups on `self` there cost more than the
    parsing itself.
    """

    feed: Callable[[bytes], list[Frame]]
    """Parse more bytes; return the frames they completed (possibly none)."""
    namespaces: dict[str, str]
    """The namespace declarations of the current stream header (prefix "" is the default)."""

    def __init__(self, limits: FramingLimits | None = None) -> None:
        self._limits = limits or FramingLimits()
        self.bytes_in = 0
        self.reset()

    def reset(self) -> None:
        # No namespace processing and attributes as flat lists: both cut expat's cost per
        # element; names are resolved only for top-level elements, which is all we need.
        parser = expat.ParserCreate(encoding="UTF-8")
        parser.ordered_attributes = True
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        if hasattr(parser, "SetReparseDeferralEnabled"):
            # Deferral would hold back a complete small stanza until more bytes arrive.
            parser.SetReparseDeferralEnabled(False)
        limits = self._limits
        max_depth = limits.max_depth + 1  # the stream element itself is depth 1
        max_attribute_items = 2 * limits.max_attributes
        max_pending = limits.max_stanza_bytes
        buffer = bytearray()
        frames: list[Frame] = []
        stream_namespaces: dict[str, str] = {}
        depth = 0
        base = 0  # absolute offset of buffer[0] in this parser's input
        consumed = 0  # absolute offset just past the last emitted frame
        fed = 0
        element_start = -1
        element_flat: list[str] = []

        def tag_end(start: int) -> int:
            match = _TAG_END.match(buffer, start - base)
            if match is None:  # pragma: no cover - expat saw a whole tag, so there is a '>'
                raise FramingError("not-well-formed", "unterminated tag")
            return match.end() + base

        def gap(upto: int) -> None:
            nonlocal consumed
            if upto > consumed:
                between = bytes(buffer[consumed - base : upto - base])
                if between.strip():
                    raise FramingError("not-well-formed", "text between top-level elements")
                frames.append(Whitespace(between))
                consumed = upto

        def resolve(name: str, flat: list[str]) -> tuple[str, str]:
            if ":" not in name:
                if "xmlns" in flat:
                    return flat[flat.index("xmlns") + 1], name
                namespace = stream_namespaces.get("")
                if namespace is None:
                    raise FramingError("not-well-formed", "no default namespace")
                return namespace, name
            prefix, _, local = name.partition(":")
            key = "xmlns:" + prefix
            if key in flat:
                return flat[flat.index(key) + 1], local
            namespace = stream_namespaces.get(prefix)
            if namespace is None:
                if prefix == "xml":
                    return XML_NS, local
                raise FramingError("not-well-formed", f"undeclared namespace prefix {prefix!r}")
            return namespace, local

        def on_start(name: str, flat: list[str]) -> None:
            nonlocal depth, consumed, element_start, element_flat, stream_namespaces
            depth += 1
            if len(flat) > max_attribute_items:
                raise FramingError("policy-violation", "too many attributes")
            if depth > 2:
                if depth > max_depth:
                    raise FramingError("policy-violation", f"nesting deeper than {max_depth - 1}")
                return
            start = parser.CurrentByteIndex
            if depth == 2:
                if start > consumed:
                    gap(start)
                element_start = start
                element_flat = flat
                return
            attrs = dict(zip(flat[::2], flat[1::2], strict=True))
            stream_namespaces = {
                (key[6:] if key.startswith("xmlns:") else ""): value
                for key, value in attrs.items()
                if key == "xmlns" or key.startswith("xmlns:")
            }
            self.namespaces = stream_namespaces
            namespace, local = resolve(name, flat)
            if namespace != STREAM_NS or local != "stream":
                raise FramingError("invalid-namespace", "not an XMPP stream header")
            end = tag_end(start)
            plain = {k: v for k, v in attrs.items() if k != "xmlns" and not k.startswith("xmlns:")}
            frames.append(
                StreamOpen(bytes(buffer[consumed - base : end - base]), plain, stream_namespaces)
            )
            consumed = end
            self.opened = True

        def on_end(name: str) -> None:
            nonlocal depth, consumed
            depth -= 1
            if depth > 1:
                return
            index = parser.CurrentByteIndex
            at = index - base
            if depth == 1:
                start = element_start
                # For <x>…</x> expat reports the end at "</x>"; for <x/> just past the tag.
                # Only when the bytes before the event end in "/>" can the two be confused.
                end = -1
                if buffer[at - 2 : at] == b"/>":
                    start_tag_end = tag_end(start)
                    if buffer[start_tag_end - 2 - base] == 0x2F:  # "/"
                        end = start_tag_end
                if end < 0:
                    end = buffer.index(b">", at) + 1 + base
                namespace, local = resolve(name, element_flat)
                frames.append(
                    Element(
                        bytes(buffer[start - base : end - base]),
                        namespace,
                        local,
                        None,
                        stream_namespaces,
                        element_flat,
                    )
                )
                consumed = end
            else:
                if index > consumed:
                    gap(index)
                end = buffer.index(b">", at) + 1 + base
                frames.append(StreamClose(bytes(buffer[at : end - base])))
                consumed = end

        def feed(data: bytes) -> list[Frame]:
            nonlocal fed, base
            self.bytes_in += len(data)
            buffer.extend(data)
            fed += len(data)
            try:
                parser.Parse(data, False)
            except expat.ExpatError as exc:
                raise FramingError("not-well-formed", expat.errors.messages[exc.code]) from None
            if fed - consumed > max_pending:
                raise FramingError("policy-violation", f"stanza larger than {max_pending} bytes")
            # Keep only what the element still being parsed needs.
            if consumed > base:
                del buffer[: consumed - base]
                base = consumed
            self.buffered = fed - consumed
            if not frames:
                return []
            done = frames[:]
            frames.clear()
            return done

        parser.StartElementHandler = on_start
        parser.EndElementHandler = on_end
        parser.StartDoctypeDeclHandler = _refuse("document type declarations")
        parser.EntityDeclHandler = _refuse("entity declarations")
        parser.ProcessingInstructionHandler = _refuse("processing instructions")
        parser.CommentHandler = _refuse("comments")
        self._parser = parser
        self._buffer = buffer
        self.feed = feed
        self.namespaces = {}
        self.buffered = 0
        """Bytes of an element not yet complete (what a slow client has left hanging)."""
        self.opened = False


def _refuse(what: str) -> Callable[..., None]:
    def refuse(*_: object) -> None:
        raise FramingError("restricted-xml", f"{what} are not allowed")

    return refuse


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
