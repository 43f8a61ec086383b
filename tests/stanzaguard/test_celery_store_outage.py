"""The store unreachable for 30 s during a burst, with every part real.

`stanzaguard run` (indexing=celery, store=elasticsearch) in front of a real Prosody, a real
redis-server, a real `stanzaguard worker`, and osmem-server as the Elasticsearch store. The
proxy and the worker reach the store through a TCP relay owned by the test: cutting it
closes every open connection and refuses new ones, as a store behind a failed network link
would; restoring it listens again on the same port (osmem-server keeps its data in memory,
so stopping the server itself would lose the archive rather than make it unreachable).

- Outage during a burst: alice keeps sending through the proxy for 30 s while the store is
  cut off; bob (straight on Prosody) receives every message, the shipper's tasks fail and are
  retried, and once the relay is back the archive holds every delivered message exactly once.
- Spool full while the store is down (`spool_max_bytes` at its 1 MiB minimum): the proxy
  fails closed, alice gets `resource-constraint` errors, and nothing bounced is delivered;
  everything that was delivered is archived once the store is back.

About a minute of wall time for the first, including the deliberate 30 s; run once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from elasticsearch import Elasticsearch

from tests.stanzaguard.es_support import EsLocation, es_client, es_location, osmem_server
from tests.support.clients import ChatClient, ReceivedMessage
from tests.support.prosody import ProsodyServer
from tests.support.proxy import StanzaguardProcess, start_stanzaguard
from tests.support.redis import RedisServer
from tests.support.services import ManagedProcess, start_process

__all__ = ["es_client", "es_location", "osmem_server"]  # fixtures used here

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

OUTAGE_SECONDS = 30.0
HOST = "127.0.0.1"


# -- a TCP relay the test can cut ------------------------------------------------------------


class TcpRelay:
    """Forwards loopback connections to `target`; `cut()` drops them all and refuses new
    ones until `restore()` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        await self.start()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            # The other side ended: pass the end on (abort when cut, so nothing lingers).
            if self._server is None:
                dst.transport.abort()
            else:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.discard(writer)
            self._writers.discard(up_writer)


@pytest.fixture
async def relay(es_location: EsLocation) -> AsyncIterator[TcpRelay]:
    relay = TcpRelay(int(es_location.url.rsplit(":", 1)[1]))
    await relay.start()
    try:
        yield relay
    finally:
        await relay.cut()


# -- the deployment --------------------------------------------------------------------------


@dataclass
class Deployment:
    guard: StanzaguardProcess
    worker: ManagedProcess
    alice: ChatClient
    bob: ChatClient


def store_env(es_location: EsLocation, relay: TcpRelay) -> dict[str, str]:
    return {
        "STANZAGUARD_STORE": "elasticsearch",
        "STANZAGUARD_ES_URL": relay.url,
        "STANZAGUARD_ES_INDEX_PREFIX": es_location.prefix,
    }


@contextlib.asynccontextmanager
async def deployment(
    tmp_path: Path,
    prosody: ProsodyServer,
    redis_server: RedisServer,
    es_location: EsLocation,
    relay: TcpRelay,
    **proxy_env: str,
) -> AsyncIterator[Deployment]:
    env = store_env(es_location, relay)
    worker = start_process(
        [
            sys.executable,
            "-m",
            "stanzaguard.cli",
            "worker",
            "--data-dir",
            str(tmp_path / "worker"),
            "--redis-url",
            redis_server.url,
            "--concurrency",
            "1",
        ],
        log_path=tmp_path / "worker.log",
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("STANZAGUARD_")},
            "STANZAGUARD_LOG_FORMAT": "text",
            **env,
        },
    )
    try:
        # In a thread: the relay runs on this event loop, and the proxy opens its store at start.
        guard = await asyncio.to_thread(
            start_stanzaguard,
            prosody,
            directory=tmp_path / "guard",
            env={
                **env,
                "STANZAGUARD_INDEXING": "celery",
                "STANZAGUARD_REDIS_URL": redis_server.url,
                "STANZAGUARD_INDEX_TASK_TIMEOUT": "5",
                "STANZAGUARD_API_LISTEN": "off",
                **proxy_env,
            },
        )
    except BaseException:
        worker.stop()
        raise
    alice = ChatClient(prosody.jid("alice"), prosody.users["alice"], port=guard.port)
    bob = ChatClient(prosody.jid("bob"), prosody.users["bob"], port=prosody.c2s_port)
    try:
        await alice.connect()
        await bob.connect()
        yield Deployment(guard, worker, alice, bob)
    finally:
        for client in (alice, bob):
            with contextlib.suppress(Exception):
                await client.disconnect()
        await asyncio.to_thread(guard.stop)
        await asyncio.to_thread(worker.stop)


async def collect(client: ChatClient, tag: str, into: list[ReceivedMessage]) -> None:
    """Keep what `client` receives whose body carries `tag` (bob: deliveries; alice: errors)."""
    while True:
        message = await client.next_message(timeout=3600)
        if tag in (message.body or "") or message.error_condition is not None:
            into.append(message)


def archived_bodies(client: Elasticsearch, prefix: str, tag: str) -> collections.Counter[str]:
    """Bodies carrying `tag` in the store's records, each with how many records hold it."""
    client.indices.refresh(index=f"{prefix}-records")
    found = client.search(
        index=f"{prefix}-records",
        query={"match": {"body": tag}},
        size=10_000,
        source_includes=["body"],
    )
    return collections.Counter(
        str(hit["_source"]["body"])
        for hit in found["hits"]["hits"]
        if tag in str(hit["_source"].get("body", ""))
    )


async def wait_archived(
    client: Elasticsearch, prefix: str, tag: str, expected: set[str], limit: float
) -> collections.Counter[str]:
    deadline = time.monotonic() + limit
    while True:
        bodies = await asyncio.to_thread(archived_bodies, client, prefix, tag)
        if expected <= set(bodies) or time.monotonic() > deadline:
            return bodies
        await asyncio.sleep(0.5)


# -- the tests -------------------------------------------------------------------------------


async def test_a_30_second_store_outage_during_a_burst_loses_and_doubles_nothing(
    tmp_path: Path,
    prosody: ProsodyServer,
    redis_server: RedisServer,
    es_location: EsLocation,
    es_client: Elasticsearch,
    relay: TcpRelay,
) -> None:
    tag = f"outage{uuid.uuid4().hex[:8]}"
    async with deployment(tmp_path, prosody, redis_server, es_location, relay) as d:
        delivered: list[ReceivedMessage] = []
        errors: list[ReceivedMessage] = []
        readers = [
            asyncio.create_task(collect(d.bob, tag, delivered)),
            asyncio.create_task(collect(d.alice, tag, errors)),
        ]
        sent: list[str] = []

        def send(n: int) -> None:
            body = f"{tag} message {n}"
            d.alice.send_chat(prosody.jid("bob"), body)
            sent.append(body)

        try:
            for n in range(40):  # before: indexed as it goes
                send(n)
                await asyncio.sleep(0.02)
            before = await wait_archived(es_client, es_location.prefix, tag, set(sent), 60)
            assert set(before) == set(sent), d.guard.log_tail()

            await relay.cut()
            outage_started = time.monotonic()
            n = len(sent)
            while time.monotonic() - outage_started < OUTAGE_SECONDS:
                send(n)
                n += 1
                await asyncio.sleep(0.05)
            during = sent[40:]
            # Nothing of the outage's messages reached the store while it was cut off...
            await relay.restore()
            for _ in range(40):
                send(n)
                n += 1
                await asyncio.sleep(0.02)

            # ...and everything delivered is archived once it is back.
            for _ in range(600):
                if len(delivered) >= len(sent):
                    break
                await asyncio.sleep(0.05)
            bodies = await wait_archived(es_client, es_location.prefix, tag, set(sent), 90)
        finally:
            for reader in readers:
                reader.cancel()
        log = d.guard.log_tail(200_000)

    assert not errors, [(e.error_condition, e.error_text) for e in errors]
    delivered_bodies = collections.Counter(m.body for m in delivered)
    # The proxy kept delivering through the outage: every message, once.
    assert delivered_bodies == collections.Counter(sent)
    assert len(during) >= 100  # a real burst went through while the store was unreachable
    # Exactly once in the archive: none missing, none doubled by the retried tasks.
    assert bodies == collections.Counter(sent), sorted(set(sent) - set(bodies))[:5]
    # The shipper did meet the outage (its tasks failed and were sent again).
    assert "shipping a spool batch failed" in log


async def test_a_full_spool_while_the_store_is_down_fails_closed(
    tmp_path: Path,
    prosody: ProsodyServer,
    redis_server: RedisServer,
    es_location: EsLocation,
    es_client: Elasticsearch,
    relay: TcpRelay,
) -> None:
    tag = f"full{uuid.uuid4().hex[:8]}"
    padding = "x" * 16_000  # with its raw stanza, ~35 kB of spool a message
    async with deployment(
        tmp_path,
        prosody,
        redis_server,
        es_location,
        relay,
        STANZAGUARD_SPOOL_MAX_BYTES=str(1024 * 1024),
        STANZAGUARD_SPOOL_SEGMENT_BYTES=str(64 * 1024),
    ) as d:
        delivered: list[ReceivedMessage] = []
        errors: list[ReceivedMessage] = []
        readers = [
            asyncio.create_task(collect(d.bob, tag, delivered)),
            asyncio.create_task(collect(d.alice, tag, errors)),
        ]
        sent: list[str] = []
        try:
            await relay.cut()
            for n in range(80):  # ~2.8 MB: far past the 1 MiB spool
                body = f"{tag} message {n} {padding}"
                d.alice.send_chat(prosody.jid("bob"), body)
                sent.append(body)
                await asyncio.sleep(0.03)
            for _ in range(200):
                if len(delivered) + len(errors) >= len(sent):
                    break
                await asyncio.sleep(0.05)
            assert errors, d.guard.log_tail()
            assert {e.error_condition for e in errors} == {"resource-constraint"}
            assert len(delivered) + len(errors) == len(sent)
            delivered_bodies = {m.body for m in delivered}
            bounced = set(sent) - delivered_bodies
            assert len(bounced) == len(errors)
            # Not one message past the first bounce slipped through unarchived: the
            # delivered ones are exactly those sent before the spool filled.
            assert sent[: len(delivered)] == [m.body for m in delivered]

            await relay.restore()
            bodies = await wait_archived(es_client, es_location.prefix, tag, delivered_bodies, 90)
        finally:
            for reader in readers:
                reader.cancel()
    assert set(bodies) == delivered_bodies  # every delivered one archived, no bounced one
    assert all(count == 1 for count in bodies.values())
