"""A leg's output hold: what a stream-management mapping covers leaves only after it is saved.

`Leg` (proxy/c2s.py) over a real socket pair: while held, flushing keeps the bytes buffered
in order; the last release lets them out; closing the stream writes them regardless.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from archive_api.store.records import Direction
from proxy.c2s import Leg


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Leg, asyncio.StreamReader]]:
    left, right = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=left)
    reader, peer_writer = await asyncio.open_connection(sock=right)
    yield Leg(writer, Direction.TO_CLIENT), reader
    writer.close()
    peer_writer.close()


async def nothing_arrives(reader: asyncio.StreamReader) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(100), 0.2)


async def test_held_output_waits_for_the_last_release(
    pair: tuple[Leg, asyncio.StreamReader],
) -> None:
    leg, reader = pair
    leg.holds += 2  # two saves under way, e.g. the relay's and a delivery's
    leg.push(b"<a/>")
    leg.flush()
    await leg.drain()
    await nothing_arrives(reader)
    leg.push(b"<b/>")
    leg.holds -= 1
    leg.flush()
    await nothing_arrives(reader)
    leg.holds -= 1
    leg.flush()
    assert await asyncio.wait_for(reader.readexactly(8), 5) == b"<a/><b/>"


async def test_closing_writes_what_a_hold_kept(pair: tuple[Leg, asyncio.StreamReader]) -> None:
    leg, reader = pair
    leg.holds = 1
    leg.push(b"</stream:stream>")
    await leg.close()
    assert await asyncio.wait_for(reader.read(), 5) == b"</stream:stream>"
