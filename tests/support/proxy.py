"""Run StanzaGuard's inline c2s proxy in front of a test Prosody.

Two ways:

- in-process: :func:`start_proxy` (and the ``proxy_factory`` / ``c2s_proxy`` fixtures) start a
  :class:`proxy.c2s.C2SProxy` on free loopback ports, in the test's own event loop, with the
  hook a test chooses (``RecordingHook`` records what the transport hands it and can drop or
  inject); the test can then reach into ``running.proxy`` (sessions, SM registry);
- as the real command: :func:`start_stanzaguard` runs ``stanzaguard run`` as a subprocess on
  free ports, for tests of the CLI and of the whole composition.

The proxy's TLS certificate is the Prosody's own (``localhost`` plus its components), so a
client sees the same names either way. The upstream leg is plain TCP to Prosody's c2s port,
the recommended set-up (see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from archive_api.store.records import Direction
from proxy.c2s import C2SProxy, ClientSession, ProxyConfig
from proxy.hook import PASS, Decision, SessionInfo, StanzaHook
from proxy.sm import SmStore
from proxy.stream import Element
from tests.support.certs import TlsPair
from tests.support.clients import ChatClient, ReceivedMessage, TlsMode
from tests.support.prosody import LOOPBACK, ProsodyServer
from tests.support.services import (
    ManagedProcess,
    ProcessExitedError,
    free_port,
    start_process,
    wait_for_port,
)
from tests.support.upstream import XmppUpstream


def proxy_tls_context(tls: TlsPair) -> ssl.SSLContext:
    """The proxy's server-side TLS context: the certificate clients see, ALPN xmpp-client."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["xmpp-client"])
    return context


def proxy_config_for(prosody: XmppUpstream, **overrides: Any) -> ProxyConfig:
    """A ``ProxyConfig`` in front of ``prosody`` (plain TCP upstream); ``overrides`` win.

    Any ``XmppUpstream`` will do: Prosody, or ejabberd (``tests/support/ejabberd.py``).
    """
    base = ProxyConfig(
        domains=frozenset({prosody.domain}),
        upstream_host=prosody.host,
        upstream_port=prosody.c2s_port,
        server_tls=proxy_tls_context(prosody.tls),
    )
    return replace(base, **overrides)


# -- hooks for tests ---------------------------------------------------------------------------

#: A rule gets the session, the direction and one stanza; it returns a decision or None (pass).
Rule = Callable[[SessionInfo, Direction, Element], Decision | None]


@dataclass
class Seen:
    """One stanza the transport handed to the hook."""

    session_id: str
    bound_jid: str | None
    direction: Direction
    data: bytes
    decision: Decision


@dataclass
class RecordingHook:
    """A ``StanzaHook`` that records every call and applies optional ``rules`` in order.

    The first rule that returns a decision wins; with no rules every stanza passes. Sessions
    are recorded as snapshots (copies of ``SessionInfo`` when the event happened).
    """

    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    bound: list[SessionInfo] = field(default_factory=list)
    ended: list[SessionInfo] = field(default_factory=list)
    batches: int = 0

    async def process(
        self, session: SessionInfo, direction: Direction, stanzas: Sequence[Element]
    ) -> Sequence[Decision]:
        self.batches += 1
        decisions: list[Decision] = []
        for element in stanzas:
            decision = PASS
            for rule in self.rules:
                chosen = rule(session, direction, element)
                if chosen is not None:
                    decision = chosen
                    break
            decisions.append(decision)
            self.seen.append(
                Seen(session.session_id, session.bound_jid, direction, element.data, decision)
            )
        return decisions

    async def session_bound(self, session: SessionInfo) -> None:
        self.bound.append(replace(session, extras=dict(session.extras)))

    async def session_ended(self, session: SessionInfo) -> None:
        self.ended.append(replace(session, extras=dict(session.extras)))

    def stanzas(self, direction: Direction, needle: bytes) -> list[Seen]:
        """What the hook saw in ``direction`` whose bytes contain ``needle``."""
        return [s for s in self.seen if s.direction is direction and needle in s.data]


# -- in-process proxy ------------------------------------------------------------------------------


@dataclass
class RunningProxy:
    """A started ``C2SProxy`` in front of one Prosody (or another ``XmppUpstream``)."""

    proxy: C2SProxy
    prosody: XmppUpstream
    hook: StanzaHook
    host: str
    port: int  # STARTTLS listener
    tls_port: int  # direct TLS listener (XEP-0368)
    clients: list[ChatClient] = field(default_factory=list)

    @property
    def config(self) -> ProxyConfig:
        return self.proxy.config

    def client(self, user: str, *, direct_tls: bool = False, **kwargs: Any) -> ChatClient:
        """An unconnected ``ChatClient`` for ``user`` of the Prosody, through this proxy.

        ``stop()`` disconnects every client made here before it stops the proxy.
        """
        password = kwargs.pop("password", self.prosody.users[user])
        kwargs.setdefault("tls", TlsMode.DIRECT if direct_tls else TlsMode.STARTTLS)
        client = ChatClient(
            self.prosody.jid(user),
            password,
            host=self.host,
            port=self.tls_port if direct_tls else self.port,
            **kwargs,
        )
        self.clients.append(client)
        return client

    def sessions_of(self, bare_jid: str) -> list[ClientSession]:
        return self.proxy.sessions_of(bare_jid)

    async def stop(self) -> None:
        for client in self.clients:
            await client.disconnect()
        await self.proxy.stop()


async def start_proxy(
    prosody: XmppUpstream,
    hook: StanzaHook | None = None,
    *,
    sm_registry: SmStore | None = None,
    **config_overrides: Any,
) -> RunningProxy:
    """Start a proxy on free loopback ports (both listeners) in the running event loop."""
    config = proxy_config_for(prosody, **config_overrides)
    chosen = hook if hook is not None else RecordingHook()
    proxy = C2SProxy(config, chosen, sm_registry)
    tls_listener = (LOOPBACK, 0) if config.server_tls is not None else None
    bound = await proxy.start((LOOPBACK, 0), tls_listener)
    port = bound[0][1]
    tls_port = bound[1][1] if len(bound) > 1 else 0
    return RunningProxy(proxy, prosody, chosen, LOOPBACK, port, tls_port)


# -- metrics ---------------------------------------------------------------------------------------


def metric(name: str, **labels: str) -> float:
    """The current value of one of the proxy's Prometheus samples (0 when never touched)."""
    value = REGISTRY.get_sample_value(name, labels)
    return float(value) if value is not None else 0.0


def closed_count(reason: str) -> float:
    """``stanzaguard_streams_closed_total{reason=...}``."""
    return metric("stanzaguard_streams_closed_total", reason=reason)


# -- the real command as a subprocess ------------------------------------------------------------


def run_argv(
    prosody: ProsodyServer,
    data_dir: Path,
    port: int,
    tls_port: int,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """`stanzaguard run` in front of `prosody`, listening on loopback `port`/`tls_port`."""
    return [
        *stanzaguard_command(),
        "run",
        "--domain",
        prosody.domain,
        "--upstream",
        f"{prosody.host}:{prosody.c2s_port}",
        "--cert",
        str(prosody.tls.cert),
        "--key",
        str(prosody.tls.key),
        "--listen",
        f"{LOOPBACK}:{port}",
        "--listen-tls",
        f"{LOOPBACK}:{tls_port}",
        "--data-dir",
        str(data_dir),
        *extra_args,
    ]


def stanzaguard_command() -> list[str]:
    """How to run the ``stanzaguard`` console script of this environment."""
    script = Path(sys.executable).parent / "stanzaguard"
    if script.exists():
        return [str(script)]
    found = shutil.which("stanzaguard")
    if found is not None:
        return [found]
    return [sys.executable, "-m", "stanzaguard.cli"]


@dataclass
class StanzaguardProcess:
    """``stanzaguard run`` in front of a Prosody, on free loopback ports."""

    process: ManagedProcess
    host: str
    port: int
    tls_port: int
    data_dir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.running

    def log_tail(self, max_chars: int = 4000) -> str:
        return self.process.log_tail(max_chars)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM (then SIGKILL after ``grace``); the exit status."""
        return self.process.stop(grace)


def start_stanzaguard(
    prosody: ProsodyServer,
    *,
    directory: Path | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> StanzaguardProcess:
    """Start ``stanzaguard run`` with Prosody's certificate, waiting until both ports accept.

    Logs go to ``DIRECTORY/stanzaguard.log``; data to ``DIRECTORY/data``. The caller stops it
    (``stop()``, by PID).
    """
    base = directory or Path(tempfile.mkdtemp(prefix="sg-cli-"))
    base.mkdir(parents=True, exist_ok=True)
    data_dir = base / "data"
    port, tls_port = free_port(), free_port()
    argv = run_argv(prosody, data_dir, port, tls_port, extra_args)
    # Only what the command needs: no STANZAGUARD_* of the developer's shell leaks in.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STANZAGUARD_")}
    clean["STANZAGUARD_LOG_FORMAT"] = "text"
    clean.update(env or {})
    process = start_process(argv, log_path=base / "stanzaguard.log", cwd=base, env=clean)
    try:
        for listener in (port, tls_port):
            wait_for_port(LOOPBACK, listener, timeout, process=process.popen)
    except (TimeoutError, ProcessExitedError) as exc:
        process.stop()
        raise RuntimeError(f"stanzaguard did not start: {exc}\n{process.log_tail()}") from exc
    return StanzaguardProcess(process, LOOPBACK, port, tls_port, data_dir)


async def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``condition`` until it holds; ``TimeoutError`` otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def _body_is(body: str) -> Callable[[ReceivedMessage], bool]:
    return lambda message: message.body == body


class Chatter:
    """Two connected clients that keep exchanging messages in the background.

    ``start()`` begins rounds (a → b, then b → a, each awaited); ``stop()`` ends them and
    raises whatever went wrong (a lost message times out). ``rounds`` counts completed rounds,
    so a test can check that chat went on while something else happened.
    """

    def __init__(self, a: ChatClient, b: ChatClient, *, pause: float = 0.02) -> None:
        self.a = a
        self.b = b
        self.pause = pause
        self.rounds = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def round(self) -> None:
        n = self.rounds
        for sender, receiver in ((self.a, self.b), (self.b, self.a)):
            body = f"chatter {n} from {sender.requested_jid.user}"
            sender.send_chat(receiver.jid, body)
            got = await receiver.next_message(where=_body_is(body))
            assert got.body == body
        self.rounds += 1

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.round()
            await asyncio.sleep(self.pause)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> int:
        """Stop after the current round; one more round proves the pair still works."""
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.round()
        return self.rounds
