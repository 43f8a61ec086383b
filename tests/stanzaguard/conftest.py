"""The whole archiving service in front of a real Prosody: in-process, or as `stanzaguard run`.

In-process (`archiving_factory` / `archiving`): an `ArchivingService` on free loopback ports,
upstream plain TCP to the `prosody` fixture's c2s port, TLS with the Prosody's own certificate,
data in a fresh directory. The test reaches into `service.store`, `service.indexer`,
`service.spool`; clients made with `running.client(...)` are disconnected and the service stopped
at teardown.

As a subprocess (`StanzaguardRun`): the real console script, for crash tests (`kill -9`) and the
CLI commands (`verify`, `reindex`, `search`), which `run_cli` runs to completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pytest

from archive_api.store.sqlite import SqliteStore
from proxy.indexer import IndexControl
from stanzaguard.settings import load_settings
from stanzaguard.wiring import ArchivingService
from tests.support.clients import ChatClient, ReceivedMessage, TlsMode
from tests.support.prosody import LOOPBACK, ProsodyServer
from tests.support.proxy import run_argv, stanzaguard_command
from tests.support.services import (
    ManagedProcess,
    ProcessExitedError,
    free_port,
    start_process,
    wait_for_port,
)
from tests.support.upstream import XmppUpstream

# -- in-process ------------------------------------------------------------------------------


@dataclass
class ArchivingProxy:
    """A started `ArchivingService` in front of one Prosody."""

    service: ArchivingService
    prosody: ProsodyServer
    data_dir: Path
    policy_path: Path | None
    host: str
    port: int  # STARTTLS
    tls_port: int  # direct TLS
    clients: list[ChatClient] = field(default_factory=list)
    stopped: bool = False

    @property
    def store(self) -> SqliteStore:
        store = self.service.store
        assert isinstance(store, SqliteStore), "these tests run the embedded store"
        return store

    @property
    def indexer(self) -> IndexControl:
        return self.service.indexer

    def client(self, user: str, **kwargs: Any) -> ChatClient:
        """An unconnected client for ``user`` through the proxy (STARTTLS by default)."""
        password = kwargs.pop("password", self.prosody.users[user])
        kwargs.setdefault("tls", TlsMode.STARTTLS)
        port = self.tls_port if kwargs["tls"] is TlsMode.DIRECT else self.port
        client = ChatClient(self.prosody.jid(user), password, host=self.host, port=port, **kwargs)
        self.clients.append(client)
        return client

    async def drain(self) -> None:
        """Index everything spooled so far."""
        await self.service.indexer.drain()

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for client in self.clients:
            await client.disconnect()
        await self.service.stop()


async def start_archiving_service(
    server: XmppUpstream, *, data_dir: Path, policy_path: Path | None, **settings: Any
) -> ArchivingService:
    """A started `ArchivingService` on free loopback ports in front of ``server``.

    Any ``XmppUpstream`` (Prosody, ejabberd): plain TCP to its c2s port, its own certificate.
    """
    # The text model's reason would join every remote sender's verdict these tests pin;
    # tests of the model pass model="default" (the service's own default) or a path.
    settings.setdefault("model", "off")
    loaded = load_settings(
        domain=[server.domain],
        upstream=f"{server.host}:{server.c2s_port}",
        cert=server.tls.cert,
        key=server.tls.key,
        listen=f"{LOOPBACK}:0",
        listen_tls=f"{LOOPBACK}:0",
        data_dir=data_dir,
        policy=policy_path,
        **settings,
    )
    service = ArchivingService(loaded)
    await service.start()
    return service


class ArchivingFactory(Protocol):
    async def __call__(
        self, *, policy: str | None = None, data_dir: Path | None = None, **settings: Any
    ) -> ArchivingProxy: ...


@pytest.fixture
async def archiving_factory(
    prosody: ProsodyServer, tmp_path: Path
) -> AsyncIterator[ArchivingFactory]:
    """Start `ArchivingService`s in front of ``prosody``.

    ``policy`` is TOML text written to a file the service watches (``running.policy_path``);
    ``data_dir`` defaults to a fresh directory under ``tmp_path``; other keyword arguments are
    settings (``fail_open=True``, ``spool_max_bytes=...``).
    """
    running: list[ArchivingProxy] = []

    async def factory(
        *, policy: str | None = None, data_dir: Path | None = None, **settings: Any
    ) -> ArchivingProxy:
        index = len(running)
        chosen = data_dir or tmp_path / f"stanzaguard-{index}"
        policy_path: Path | None = None
        if policy is not None:
            policy_path = tmp_path / f"policy-{index}.toml"
            policy_path.write_text(policy)
        service = await start_archiving_service(
            prosody, data_dir=chosen, policy_path=policy_path, **settings
        )
        (host, port), (_, tls_port) = service.bound
        started = ArchivingProxy(service, prosody, chosen, policy_path, host, port, tls_port)
        running.append(started)
        return started

    try:
        yield factory
    finally:
        for started in reversed(running):
            await started.stop()


@pytest.fixture
async def archiving(archiving_factory: ArchivingFactory) -> ArchivingProxy:
    """One archiving service with the default (allow-all) policy."""
    return await archiving_factory()


# -- what clients received ---------------------------------------------------------------------

STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def stanza_error(message: ReceivedMessage) -> tuple[str, str, str]:
    """(error type, condition, text) read from the received bytes.

    Read from the XML: slixmpp's ``Error`` predates RFC 6120 and does not know
    ``policy-violation`` (its ``condition`` comes back empty).
    """
    # slixmpp prints the stanza without its default namespace; accept either spelling.
    error = message.element.find("error")
    if error is None:
        error = message.element.find("{jabber:client}error")
    assert error is not None, message.xml
    conditions = [c.tag for c in error if c.tag.startswith(f"{{{STANZAS_NS}}}")]
    text = error.findtext(f"{{{STANZAS_NS}}}text") or ""
    names = [tag.split("}", 1)[1] for tag in conditions if not tag.endswith("}text")]
    assert len(names) == 1, message.xml
    return error.get("type", ""), names[0], text


def server_archived_bodies(prosody: ProsodyServer, user: str) -> list[str]:
    """Bodies in ``user``'s MAM archive at Prosody: what the server itself got and routed.

    The test Prosody archives every message (``default_archive_policy = true``), the sender's
    outgoing ones included, so a body missing here never reached the server.
    """
    bodies = []
    for element in prosody.archive_items(user):
        body = element.find("body")
        if body is None:
            body = element.find("{jabber:client}body")
        if body is not None and body.text:
            bodies.append(body.text)
    return bodies


Outcome = tuple[Literal["delivered", "bounced"], ReceivedMessage]


async def send(
    sender: ChatClient, recipient: ChatClient, body: str, *, timeout: float = 10.0
) -> Outcome:
    """Send ``body``; return whether the recipient got it or the sender got an error."""
    message_id = sender.send_chat(recipient.bare_jid, body)
    delivered = asyncio.ensure_future(
        recipient.next_message(timeout, where=lambda m: m.body == body)
    )
    bounced = asyncio.ensure_future(
        sender.next_message(timeout, where=lambda m: m.type == "error" and m.id == message_id)
    )
    done, pending = await asyncio.wait(
        {delivered, bounced}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    assert done, f"{body!r}: neither delivered nor bounced within {timeout}s"
    if bounced in done and bounced.exception() is None:
        return "bounced", bounced.result()
    return "delivered", delivered.result()


async def receive(
    client: ChatClient, body: str, *, carbon: bool = False, timeout: float = 10.0
) -> ReceivedMessage:
    """The next message (or carbon, with ``carbon``) with exactly ``body``."""
    return await client.next_message(
        timeout, where=lambda m: m.body == body and m.is_carbon == carbon
    )


# -- the real command --------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    # No STANZAGUARD_* of the developer's shell leaks into the command under test, but for
    # the event loop the whole suite runs on (tests/conftest.py).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STANZAGUARD_") or k == "STANZAGUARD_EVENT_LOOP"
    }
    env["STANZAGUARD_LOG_FORMAT"] = "text"
    return env


@dataclass
class StanzaguardRun:
    """``stanzaguard run`` in front of a Prosody, on fresh loopback ports, data in ``data_dir``."""

    process: ManagedProcess
    port: int
    tls_port: int
    data_dir: Path
    host: str = LOOPBACK

    @classmethod
    def start(
        cls,
        prosody: ProsodyServer,
        data_dir: Path,
        *,
        log_path: Path,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> StanzaguardRun:
        port, tls_port = free_port(), free_port()
        argv = run_argv(prosody, data_dir, port, tls_port, extra_args)
        process = start_process(
            argv, log_path=log_path, cwd=data_dir.parent, env={**_clean_env(), **(env or {})}
        )
        try:
            for listener in (port, tls_port):
                wait_for_port(LOOPBACK, listener, timeout, process=process.popen)
        except (TimeoutError, ProcessExitedError) as exc:
            process.stop()
            raise RuntimeError(f"stanzaguard did not start: {exc}\n{process.log_tail()}") from exc
        return cls(process, port, tls_port, data_dir)

    @property
    def running(self) -> bool:
        return self.process.running

    def kill9(self) -> int | None:
        """SIGKILL: no shutdown code runs (no flush, no indexer drain, no close)."""
        os.kill(self.process.pid, signal.SIGKILL)
        return self.process.popen.wait(timeout=10)

    def stop(self) -> int | None:
        return self.process.stop(grace=15.0)

    def log_tail(self, max_chars: int = 4000) -> str:
        return self.process.log_tail(max_chars)


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``stanzaguard ARGS`` to completion; the result carries exit status and output."""
    return subprocess.run(
        [*stanzaguard_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_clean_env(), "COLUMNS": "200"},
        check=False,
    )


@contextlib.asynccontextmanager
async def remote_clients(
    prosody: ProsodyServer, domain: str, passwords: Mapping[str, str]
) -> AsyncIterator[Callable[[str], Awaitable[ChatClient]]]:
    """Connect users of a second host of `prosody` straight to it, as remote senders would.

    The test Prosody has no s2s; a host the policy does not list as local stands in for a
    federated server. Every client made is disconnected on exit.
    """
    clients: list[ChatClient] = []

    async def connect(user: str) -> ChatClient:
        client = ChatClient(
            f"{user}@{domain}",
            passwords[user],
            host=prosody.host,
            port=prosody.c2s_port,
            tls=TlsMode.PLAIN,
        )
        clients.append(client)
        await client.connect()
        return client

    try:
        yield connect
    finally:
        for client in clients:
            await client.disconnect()
