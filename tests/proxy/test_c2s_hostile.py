"""Hostile input costs only its own stream (DESIGN.md, "Guarantees").

Each test runs two bystanders (alice and bob, slixmpp) chatting through the proxy while an
attacker misbehaves on another connection. The attacker's stream must end with the right
RFC 6120 stream error, read here from the raw bytes the proxy sent back, the closing counter
must move for that reason, and the bystanders must go on chatting through the same proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from proxy.stream import FramingLimits
from tests.conftest import ProxyFactory
from tests.support.prosody import ProsodyServer
from tests.support.proxy import Chatter, RunningProxy, closed_count, metric, wait_until
from tests.support.rawxmpp import RawXmppClient, stream_header

pytestmark = pytest.mark.integration

STANZA_TIMEOUT = 2.0
AUTH_TIMEOUT = 2.0
MAX_STANZA_BYTES = 256 * 1024

BILLION_LAUGHS = (
    b"<?xml version='1.0'?>"
    b"<!DOCTYPE lolz [<!ENTITY lol 'lol'>"
    + b"".join(
        f"<!ENTITY lol{i} '{('&lol' + (str(i - 1) if i > 1 else '') + ';') * 10}'>".encode()
        for i in range(1, 10)
    )
    + b"]>"
)


@dataclass
class Arena:
    running: RunningProxy
    prosody: ProsodyServer
    chatter: Chatter

    def attacker(self, *, direct_tls: bool = False) -> RawXmppClient:
        port = self.running.tls_port if direct_tls else self.running.port
        return RawXmppClient(self.running.host, port, self.prosody.domain)

    async def logged_in_attacker(self) -> RawXmppClient:
        raw = self.attacker()
        await raw.login("carol", self.prosody.users["carol"], resource="attacker")
        return raw

    async def still_fine(self) -> None:
        """The bystanders' sessions are untouched and they still chat; the attacker's is gone."""
        rounds = await self.chatter.stop()
        assert rounds >= 1
        for user in ("alice", "bob"):
            assert len(self.running.sessions_of(f"{user}@localhost")) == 1
        await wait_until(lambda: self.running.sessions_of("carol@localhost") == [])


@pytest.fixture
async def arena(prosody: ProsodyServer, proxy_factory: ProxyFactory) -> AsyncIterator[Arena]:
    running = await proxy_factory(
        stanza_timeout=STANZA_TIMEOUT,
        auth_timeout=AUTH_TIMEOUT,
        limits=FramingLimits(max_stanza_bytes=MAX_STANZA_BYTES),
    )
    alice = running.client("alice", resource="bystander")
    bob = running.client("bob", resource="bystander", direct_tls=True)
    await alice.connect()
    await bob.connect()
    chatter = Chatter(alice, bob)
    chatter.start()
    yield Arena(running, prosody, chatter)
    with contextlib.suppress(Exception):
        await chatter.stop()


def stream_error_in(data: bytes, condition: str) -> bool:
    """The proxy sent `<stream:error><CONDITION/>…</stream:error></stream:stream>` last."""
    error = data.rfind(b"<stream:error>")
    return (
        error >= 0
        and data.find(f"<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>".encode(), error)
        > error
        and data.rstrip().endswith(b"</stream:error></stream:stream>")
    )


async def expect_stream_error(raw: RawXmppClient, condition: str, timeout: float = 10.0) -> bytes:
    data = await raw.read_until_closed(timeout)
    assert stream_error_in(data, condition), data[-600:]
    return data


# -- DTDs and entities ---------------------------------------------------------------------------


def laughing_stream(domain: str) -> bytes:
    """A stream header behind a DTD whose entities would expand to a billion 'lol's."""
    return BILLION_LAUGHS + stream_header(domain)[len(b"<?xml version='1.0'?>") :]


async def test_billion_laughs_is_restricted_xml_before_and_after_tls(arena: Arena) -> None:
    before = closed_count("restricted-xml")
    for mode in ("plaintext", "starttls", "direct-tls"):
        raw = arena.attacker(direct_tls=mode == "direct-tls")
        await raw.connect(direct_tls=mode == "direct-tls")
        if mode == "starttls":
            await raw.starttls()
        assert raw.tls_active == (mode != "plaintext")
        raw.send(laughing_stream(arena.prosody.domain))
        await expect_stream_error(raw, "restricted-xml")
    await wait_until(lambda: closed_count("restricted-xml") == before + 3)
    await arena.still_fine()


MARKUP_IN_A_SESSION = [
    (b"<message to='bob@localhost'><body>&lol9;</body></message>", "not-well-formed"),
    (b"<!DOCTYPE lolz [<!ENTITY lol 'lol'>]><message/>", "not-well-formed"),
    (b"<!-- a comment --><message/>", "restricted-xml"),
    (b"<?evil processing-instruction?>", "restricted-xml"),
]


async def test_entities_and_markup_declarations_in_a_session(arena: Arena) -> None:
    """Undefined entities, a DTD mid-stream, comments, PIs: each from an authenticated user."""
    before = {c: closed_count(c) for c in ("not-well-formed", "restricted-xml")}
    for payload, condition in MARKUP_IN_A_SESSION:
        raw = await arena.logged_in_attacker()
        raw.send(payload)
        data = await raw.read_until_closed()
        assert stream_error_in(data, condition), (payload, data[-300:])
        await wait_until(lambda: arena.running.sessions_of("carol@localhost") == [])
    await wait_until(
        lambda: (
            {c: closed_count(c) - n for c, n in before.items()}
            == {"not-well-formed": 2, "restricted-xml": 2}
        )
    )
    await arena.still_fine()


# -- size, depth, encoding ---------------------------------------------------------------------


async def test_a_ten_megabyte_stanza_is_refused_before_it_is_buffered(arena: Arena) -> None:
    before = closed_count("policy-violation")
    raw = await arena.logged_in_attacker()
    read_before = metric("stanzaguard_bytes_total", direction="from-client")
    total = 10 * 1024 * 1024
    sent = 0

    async def flood() -> None:
        nonlocal sent
        raw.send(b"<message to='bob@localhost' type='chat'><body>")
        chunk = b"a" * 65536
        while sent < total:
            raw.send(chunk)
            await raw.drain()
            sent += len(chunk)

    writer = asyncio.create_task(flood())
    try:
        await expect_stream_error(raw, "policy-violation")
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
            await writer
    await wait_until(lambda: closed_count("policy-violation") == before + 1)
    # The proxy read little more than the limit (plus one read) before it gave up: it never
    # held the whole stanza. The bystanders' chatter is a few kilobytes at most.
    read = metric("stanzaguard_bytes_total", direction="from-client") - read_before
    assert read < MAX_STANZA_BYTES + 4 * 65536 + 64 * 1024, read
    assert read < total
    await arena.still_fine()


async def test_ten_thousand_deep_nesting_is_a_policy_violation(arena: Arena) -> None:
    before = closed_count("policy-violation")
    raw = await arena.logged_in_attacker()
    raw.send(b"<message to='bob@localhost'>" + b"<x>" * 10_000)
    await expect_stream_error(raw, "policy-violation")
    await wait_until(lambda: closed_count("policy-violation") == before + 1)
    await arena.still_fine()


async def test_invalid_utf8_is_not_well_formed(arena: Arena) -> None:
    before = closed_count("not-well-formed")
    raw = await arena.logged_in_attacker()
    raw.send(b"<message to='bob@localhost' type='chat'><body>caf\xc3\x28 \xff\xfe</body></message>")
    await expect_stream_error(raw, "not-well-formed")
    await wait_until(lambda: closed_count("not-well-formed") == before + 1)
    await arena.still_fine()


# -- slow and silent clients ---------------------------------------------------------------------


async def test_one_byte_a_second_is_a_connection_timeout(arena: Arena) -> None:
    before = closed_count("connection-timeout")
    raw = await arena.logged_in_attacker()
    rounds_before = arena.chatter.rounds

    async def trickle() -> None:
        for byte in b"<message to='bob@localhost' type='chat'><body>" + b"z" * 1000:
            raw.send(bytes([byte]))
            await raw.drain()
            await asyncio.sleep(1.0)

    writer = asyncio.create_task(trickle())
    try:
        await expect_stream_error(raw, "connection-timeout", timeout=STANZA_TIMEOUT + 10)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
            await writer
    await wait_until(lambda: closed_count("connection-timeout") == before + 1)
    assert arena.chatter.rounds > rounds_before  # chat went on while the attacker trickled
    await arena.still_fine()


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def test_five_hundred_silent_connections_time_out(arena: Arena) -> None:
    count = 500
    raise_fd_limit(4 * count + 256)  # both ends of each connection live in this process
    before = closed_count("connection-timeout")
    accepted = metric("stanzaguard_sessions_total")
    rounds_before = arena.chatter.rounds
    silent: list[RawXmppClient] = []
    for start in range(0, count, 50):  # in batches: the listen backlog is 100
        batch = [arena.attacker() for _ in range(start, min(start + 50, count))]
        await asyncio.gather(*(raw.connect() for raw in batch))
        silent += batch
    results = await asyncio.gather(
        *(raw.read_until_closed(AUTH_TIMEOUT + 20) for raw in silent), return_exceptions=True
    )
    failures = [r for r in results if not (isinstance(r, bytes) and _timed_out(r))]
    assert failures == [], failures[:3]
    assert metric("stanzaguard_sessions_total") - accepted == count
    await wait_until(lambda: closed_count("connection-timeout") == before + count)
    assert arena.chatter.rounds > rounds_before  # chat went on meanwhile
    await wait_until(lambda: len(arena.running.proxy.sessions) == 2)
    await arena.still_fine()


def _timed_out(data: bytes) -> bool:
    # Silent on the STARTTLS port: the proxy's own stream header, then the error.
    return data.startswith(b"<?xml") and stream_error_in(data, "connection-timeout")
