"""The sans-IO parts shared by the WebSocket and BOSH front ends (proxy/framing.py)."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

import pytest

from proxy.errors import FramingError
from proxy.framing import (
    Closed,
    ElementChecker,
    Opened,
    Reframer,
    Standalone,
    memory_stream,
    standalone,
    stream_header,
)
from proxy.stream import Element, Framer, FramingLimits, StreamOpen

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' from='localhost' id='abc' version='1.0'>"
)


def test_stream_header_carries_only_the_client_attributes_quoted() -> None:
    header = stream_header(
        {"to": "a'b", "version": "1.0", "xml:lang": "en", "xmlns": "x", "id": "nope"}
    )
    frames = Framer().feed(header)
    assert len(frames) == 1 and isinstance(frames[0], StreamOpen)
    assert frames[0].attrs == {"to": "a'b", "version": "1.0", "xml:lang": "en"}


def test_reframer_makes_every_element_standalone() -> None:
    reframer = Reframer(FramingLimits())
    out = reframer.feed(
        HEADER + b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
        b"<mechanism>PLAIN</mechanism></mechanisms></stream:features>"
        b"<message to='a@b'><body>hi</body></message>"
        b"<iq xmlns='jabber:client' type='result' id='1'/>"
    )
    assert isinstance(out[0], Opened) and out[0].attrs["id"] == "abc"
    features, message, iq = out[1:]
    assert isinstance(features, Standalone) and isinstance(message, Standalone)
    assert isinstance(iq, Standalone)
    # Each parses on its own, with the names it had inside the stream.
    assert ET.fromstring(features.data).tag == "{http://etherx.jabber.org/streams}features"
    assert ET.fromstring(message.data).tag == "{jabber:client}message"
    assert iq.data == b"<iq xmlns='jabber:client' type='result' id='1'/>"  # nothing to add
    assert b"xmlns:stream" not in message.data  # a prefix it never uses is not declared


def test_reframer_restarts_after_sasl_success_and_reports_the_close() -> None:
    reframer = Reframer(FramingLimits())
    first = reframer.feed(HEADER + b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    assert [type(item) for item in first] == [Opened, Standalone]
    second = reframer.feed(HEADER + b"<stream:features/></stream:stream>")
    assert [type(item) for item in second] == [Opened, Standalone, Closed]


def test_standalone_keeps_an_own_default_namespace() -> None:
    frames = Framer().feed(HEADER + b"<a xmlns='urn:x'><b/></a>")
    element = frames[-1]
    assert isinstance(element, Element)
    assert standalone(element) == b"<a xmlns='urn:x'><b/></a>"


@pytest.mark.parametrize(
    ("data", "condition"),
    [
        (b"<a xmlns='x'/><b xmlns='x'/>", "not-well-formed"),
        (b"<a xmlns='x'>", "not-well-formed"),
        (b"", "not-well-formed"),
        (b"text", "not-well-formed"),
        (b"<message><body>no namespace</body></message>", "not-well-formed"),
        (b"<a xmlns='x'><!-- c --></a>", "restricted-xml"),
        (b"<a xmlns='x'><?pi?></a>", "restricted-xml"),
        (b"<a xmlns='x'>&lol;</a>", "not-well-formed"),
        (b"<a xmlns='x'>" + b"<b>" * 40 + b"</b>" * 40 + b"</a>", "policy-violation"),
        (
            b"<a xmlns='x' " + b" ".join(b"a%d='1'" % i for i in range(70)) + b"/>",
            "policy-violation",
        ),
        (b"<a xmlns='x'>" + b"x" * 2048 + b"</a>", "policy-violation"),
        (b"<a xmlns='x'/></stream:stream>", "not-well-formed"),
        (b"\xff\xfe<a/>", "not-well-formed"),
    ],
)
def test_element_checker_refuses_hostile_frames(data: bytes, condition: str) -> None:
    checker = ElementChecker(FramingLimits(max_stanza_bytes=1024))
    with pytest.raises(FramingError) as refused:
        checker.one(data)
    assert refused.value.condition == condition


def test_element_checker_takes_one_element_after_another() -> None:
    checker = ElementChecker(FramingLimits())
    assert checker.one(b" <a xmlns='x'/>\n").name == "a"
    assert checker.one(b"<b xmlns='y'><c/></b>").namespace == "y"
    assert [e.name for e in checker.many(b"<c xmlns='x'/> <d xmlns='x'/>")] == ["c", "d"]


async def test_memory_stream_relays_both_ways_with_back_pressure() -> None:
    delivered: list[bytes] = []
    closed: list[bool] = []
    queued = 0

    def deliver(data: bytes) -> int:
        nonlocal queued
        delivered.append(data)
        queued += len(data)
        return queued

    stream = memory_stream(deliver, lambda: closed.append(True), peer=("192.0.2.1", 4242))
    assert stream.writer.get_extra_info("peername") == ("192.0.2.1", 4242)
    stream.feed(b"hello")
    assert await stream.reader.read(100) == b"hello"
    stream.writer.write(b"x" * (300 * 1024))  # above the high-water mark: drain must wait
    drained = asyncio.ensure_future(stream.writer.drain())
    await asyncio.sleep(0.01)
    assert not drained.done()
    queued = 0
    stream.transport.sent(0)
    await asyncio.wait_for(drained, 1.0)
    stream.feed_eof()
    assert await stream.reader.read(100) == b""
    stream.writer.close()
    await asyncio.wait_for(stream.writer.wait_closed(), 1.0)
    assert closed == [True] and b"".join(delivered) == b"x" * (300 * 1024)
