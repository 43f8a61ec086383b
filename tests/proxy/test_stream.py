"""Framing: byte-exact spans, every limit, and hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import FramingError
from proxy.stream import Element, Framer, FramingLimits, StreamClose, StreamOpen, Whitespace

HEADER = (
    b"<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)
BODY = (
    b"<message to='bob@localhost' id='1'><body>hi &amp; &lt;x&gt; '&gt;'</body></message>"
    b"<r xmlns='urn:xmpp:sm:3'/><a xmlns='urn:xmpp:sm:3' h='5' x='&gt;&apos;/>'/>"
    b"\n <iq type='get' id='2'><query xmlns='jabber:iq:roster'></query></iq>"
    b"<presence/></stream:stream>"
)


def feed_in_chunks(data: bytes, size: int, framer: Framer | None = None) -> list[object]:
    framer = framer or Framer()
    frames: list[object] = []
    for i in range(0, len(data), size):
        frames.extend(framer.feed(data[i : i + size]))
    return frames


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 100_000])
def test_frames_concatenate_to_the_exact_input(chunk: int) -> None:
    frames = feed_in_chunks(HEADER + BODY, chunk)
    assert b"".join(f.data for f in frames) == HEADER + BODY  # type: ignore[attr-defined]
    kinds = [type(f).__name__ for f in frames]
    assert kinds == [
        "StreamOpen",
        "Element",
        "Element",
        "Element",
        "Whitespace",
        "Element",
        "Element",
        "StreamClose",
    ]


def test_elements_carry_names_attributes_and_a_lazy_tree() -> None:
    frames = feed_in_chunks(HEADER + BODY, 5)
    header = frames[0]
    assert isinstance(header, StreamOpen)
    assert header.attrs["to"] == "localhost"
    message = frames[1]
    assert isinstance(message, Element)
    assert (message.namespace, message.name, message.is_stanza) == (
        "jabber:client",
        "message",
        True,
    )
    assert message.tree().findtext("{jabber:client}body") == "hi & <x> '>'"
    ack = frames[3]
    assert isinstance(ack, Element)
    assert ack.namespace == "urn:xmpp:sm:3" and ack.attrs["h"] == "5" and not ack.is_stanza
    assert isinstance(frames[4], Whitespace) and isinstance(frames[-1], StreamClose)


def test_reset_starts_a_new_stream() -> None:
    framer = Framer()
    framer.feed(HEADER)
    framer.reset()
    frames = framer.feed(HEADER + b"<presence/>")
    assert isinstance(frames[0], StreamOpen) and isinstance(frames[1], Element)


@pytest.mark.parametrize(
    ("payload", "condition"),
    [
        (b"<!DOCTYPE x [<!ENTITY a 'aaaa'>]>", "not-well-formed"),  # a DTD inside the root
        (b"<message><body>&lol;</body></message>", "not-well-formed"),
        (b"<!-- hi --><presence/>", "restricted-xml"),
        (b"<?php evil ?><presence/>", "restricted-xml"),
        (b"<message><body>\xff\xfe</body></message>", "not-well-formed"),
        (b"<message><body></message>", "not-well-formed"),
        (b"stray text<presence/>", "not-well-formed"),
    ],
)
def test_hostile_xml_is_refused_with_the_right_condition(payload: bytes, condition: str) -> None:
    framer = Framer()
    with pytest.raises(FramingError) as info:
        feed_in_chunks(HEADER + payload, 3, framer)
    assert info.value.condition == condition


def test_doctype_before_the_stream_header_is_restricted() -> None:
    with pytest.raises(FramingError) as info:
        Framer().feed(b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>]>" + HEADER)
    assert info.value.condition == "restricted-xml"


def test_wrong_stream_namespace() -> None:
    with pytest.raises(FramingError) as info:
        Framer().feed(b"<stream xmlns='jabber:client'>")
    assert info.value.condition == "invalid-namespace"


def test_oversized_stanza_is_a_policy_violation_before_it_is_buffered_whole() -> None:
    framer = Framer(FramingLimits(max_stanza_bytes=10_000))
    framer.feed(HEADER + b"<message><body>")
    with pytest.raises(FramingError) as info:
        for _ in range(10_000):
            framer.feed(b"x" * 1000)
    assert info.value.condition == "policy-violation"
    assert framer.bytes_in < 20_000 + len(HEADER)


def test_an_unterminated_start_tag_counts_against_the_limit() -> None:
    framer = Framer(FramingLimits(max_stanza_bytes=4096))
    framer.feed(HEADER + b"<message to='")
    with pytest.raises(FramingError):
        for _ in range(100):
            framer.feed(b"a" * 100)


def test_deep_nesting_is_refused() -> None:
    framer = Framer(FramingLimits(max_depth=32))
    with pytest.raises(FramingError) as info:
        framer.feed(HEADER + b"<message>" + b"<x>" * 10_000)
    assert info.value.condition == "policy-violation"


def test_too_many_attributes() -> None:
    attrs = b" ".join(b"a%d='1'" % i for i in range(100))
    with pytest.raises(FramingError) as info:
        Framer().feed(HEADER + b"<presence " + attrs + b"/>")
    assert info.value.condition == "policy-violation"


def test_buffer_is_released_after_each_element() -> None:
    framer = Framer()
    framer.feed(HEADER)
    for _ in range(1000):
        framer.feed(b"<presence/>")
    assert framer.buffered == 0
    assert len(framer._buffer) == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_arbitrary_bytes_either_frame_or_raise_framing_error(data: bytes, chunk: int) -> None:
    framer = Framer(FramingLimits(max_stanza_bytes=2048, max_depth=8))
    try:
        frames = feed_in_chunks(HEADER + data, chunk, framer)
    except FramingError:
        return
    joined = b"".join(f.data for f in frames)  # type: ignore[attr-defined]
    assert (HEADER + data).startswith(joined)
