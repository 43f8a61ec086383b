"""Fixtures shared by the whole suite: real Prosody servers, TLS material, test clients."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, cast, get_args

import pytest

from proxy.hook import StanzaHook
from proxy.sm import SmStore
from stanzaguard.event_loop import EventLoopName, loop_factory
from stanzaguard.logs import CurrentStderrHandler
from stanzaguard.native import native_status
from stanzaguard.settings import Settings
from tests.support.certs import TlsPair, make_self_signed
from tests.support.clients import ChatClient
from tests.support.ejabberd import EjabberdServer, make_ejabberd
from tests.support.native import native_module_names
from tests.support.prosody import DEFAULT_USERS, ProsodyConfig, ProsodyServer, make_prosody
from tests.support.proxy import RunningProxy, start_proxy
from tests.support.redis import RedisServer, running_redis
from tests.support.services import REQUIRE_SERVICES_ENV, services_required
from tests.support.upstream import ServerUnderTest, XmppUpstream


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test compiled modules not built from their source (docs/native.md).

    `make test` rebuilds them first; a bare ``pytest`` after an edit would otherwise test the
    code as it was. Under STANZAGUARD_REQUIRE_SERVICES=1 (CI) the hot path must also be
    compiled, as shipped, unless STANZAGUARD_PURE_PYTHON=1 asks for pure Python.
    """
    if hasattr(config, "workerinput"):  # xdist workers: the controller checked already
        return
    names = native_module_names()
    for name in names:
        importlib.import_module(name)
    status = native_status(names)
    if status.stale:
        raise pytest.UsageError(
            f"compiled modules not built from their source: {', '.join(status.stale)}; "
            "run `make native` (or STANZAGUARD_PURE_PYTHON=1 make native for pure Python)"
        )
    interpreted = sorted(set(names) - set(status.compiled))
    if interpreted and services_required() and os.environ.get("STANZAGUARD_PURE_PYTHON") != "1":
        raise pytest.UsageError(
            f"not compiled: {', '.join(interpreted)}; run `make native` "
            f"({REQUIRE_SERVICES_ENV}=1 tests the hot path as shipped)"
        )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run async tests on the loop the services run on (the `event_loop` setting).

    The proxy and its clients share the test's loop, so the suite tests uvloop, the
    default; ``STANZAGUARD_EVENT_LOOP=asyncio`` runs it (and the services it starts) on
    the standard library's loop instead.
    """
    name = os.environ.get("STANZAGUARD_EVENT_LOOP", Settings.model_fields["event_loop"].default)
    if name not in get_args(EventLoopName):
        raise pytest.UsageError(f"STANZAGUARD_EVENT_LOOP={name!r}: uvloop or asyncio")
    return {name: loop_factory(cast("EventLoopName", name))}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Remember each phase's outcome on the item, so fixtures can add server logs on failure.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Undo what a command run in-process did to the root logger (`configure_logging`).

    Otherwise its JSON handler and level outlive the test, and a later test's library
    warnings (with their tracebacks) show up in that test's captured command output.
    """
    root = logging.getLogger()
    level = root.level
    yield
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, CurrentStderrHandler)]
    root.setLevel(level)


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


@pytest.fixture
def tls_pair(tmp_path: Path) -> TlsPair:
    """A self-signed certificate and key for ``localhost`` (EC P-256)."""
    return make_self_signed(tmp_path / "tls", "localhost")


class ProsodyFactory(Protocol):
    def __call__(
        self,
        config: ProsodyConfig | None = None,
        *,
        users: dict[str, str] | None = None,
        tls: TlsPair | None = None,
        start: bool = True,
    ) -> ProsodyServer: ...


@pytest.fixture
def prosody_factory(request: pytest.FixtureRequest) -> Iterator[ProsodyFactory]:
    """Make started Prosody servers (users alice, bob, carol unless ``users`` says otherwise).

    Every server is stopped by PID and its directory removed at teardown; when the test failed,
    the tail of each server's log is printed first (pytest shows it with the failure).
    """
    servers: list[ProsodyServer] = []

    def factory(
        config: ProsodyConfig | None = None,
        *,
        users: dict[str, str] | None = None,
        tls: TlsPair | None = None,
        start: bool = True,
    ) -> ProsodyServer:
        chosen = DEFAULT_USERS if users is None else users
        server = make_prosody(config, users=chosen, tls=tls, start=start)
        servers.append(server)
        return server

    try:
        yield factory
    finally:
        failed = _failed(request)
        for server in servers:
            if failed:
                print(f"\n=== Prosody {server.directory} ===\n{server.diagnostics()}")
            server.cleanup()


@pytest.fixture
def prosody(prosody_factory: ProsodyFactory) -> ProsodyServer:
    """A fresh, started Prosody with users alice, bob and carol (see ``DEFAULT_USERS``)."""
    return prosody_factory()


ClientFactory = Callable[..., ChatClient]


@pytest.fixture
async def make_client(prosody: ProsodyServer) -> AsyncIterator[ClientFactory]:
    """Build ``ChatClient``s for users of the ``prosody`` fixture; disconnects them afterwards.

    ``make_client("alice", resource="laptop", carbons=True)``: the port defaults to the
    server's STARTTLS c2s port and the password to the registered one; anything else is passed
    to :class:`ChatClient`. The client is returned unconnected: ``await client.connect()``.
    """
    clients: list[ChatClient] = []

    def factory(user: str, **kwargs: Any) -> ChatClient:
        kwargs.setdefault("port", prosody.c2s_port)
        kwargs.setdefault("host", prosody.host)
        password = kwargs.pop("password", prosody.users[user])
        client = ChatClient(prosody.jid(user), password, **kwargs)
        clients.append(client)
        return client

    try:
        yield factory
    finally:
        for client in clients:
            await client.disconnect()


# -- the inline proxy in front of the ``prosody`` fixture (tests/support/proxy.py) ---------------


class ProxyFactory(Protocol):
    async def __call__(
        self,
        hook: StanzaHook | None = None,
        *,
        server: ProsodyServer | None = None,
        sm_registry: SmStore | None = None,
        **config_overrides: Any,
    ) -> RunningProxy: ...


@pytest.fixture
async def proxy_factory(prosody: ProsodyServer) -> AsyncIterator[ProxyFactory]:
    """Start in-process ``C2SProxy``s on free loopback ports in front of ``prosody``.

    ``await proxy_factory(hook, auth_timeout=2.0)``: the hook defaults to a fresh
    ``RecordingHook``; keyword arguments override ``ProxyConfig`` fields; ``server=`` puts the
    proxy in front of another Prosody. Clients made with ``running.client(...)`` are
    disconnected and the proxies stopped at teardown.
    """
    running: list[RunningProxy] = []

    async def factory(
        hook: StanzaHook | None = None,
        *,
        server: ProsodyServer | None = None,
        sm_registry: SmStore | None = None,
        **config_overrides: Any,
    ) -> RunningProxy:
        started = await start_proxy(
            server or prosody, hook, sm_registry=sm_registry, **config_overrides
        )
        running.append(started)
        return started

    try:
        yield factory
    finally:
        for started in reversed(running):
            await started.stop()


@pytest.fixture
async def c2s_proxy(proxy_factory: ProxyFactory) -> RunningProxy:
    """One proxy with a ``RecordingHook`` (passes everything) in front of ``prosody``."""
    return await proxy_factory()


# -- ejabberd as a second upstream (tests/support/ejabberd.py) ---------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free loopback port (tests/support/redis.py)."""
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="session")
def ejabberd_server() -> Iterator[EjabberdServer]:
    """One ejabberd for the whole run, started on first use (an Erlang VM takes seconds)."""
    server = make_ejabberd()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def ejabberd(
    request: pytest.FixtureRequest, ejabberd_server: EjabberdServer
) -> Iterator[EjabberdServer]:
    """The shared ejabberd, with its log tail printed when the test fails.

    Tests must not depend on its state: each registers its own accounts with
    ``ejabberd.register_fresh("alice", "bob")``.
    """
    yield ejabberd_server
    if _failed(request):
        server = ejabberd_server
        print(f"\n=== ejabberd {server.directory} ===\n{server.diagnostics()}")


# -- scenarios that must hold on every test server ---------------------------------------------


@pytest.fixture(params=["prosody", "ejabberd"])
def upstream(request: pytest.FixtureRequest) -> ServerUnderTest:
    """Prosody, then ejabberd: a test using this runs against each (ids ``[prosody]``, ...).

    Prosody is the test's own (``prosody``), ejabberd the one shared by the run
    (``ejabberd``), so a scenario makes its accounts with ``upstream.register_fresh(...)``.
    """
    server = request.getfixturevalue(request.param)
    assert isinstance(server, ProsodyServer | EjabberdServer)
    return server


class ProxyStarter(Protocol):
    async def __call__(
        self, server: XmppUpstream, hook: StanzaHook | None = None, **config_overrides: Any
    ) -> RunningProxy: ...


@pytest.fixture
async def proxy_for() -> AsyncIterator[ProxyStarter]:
    """Start in-process ``C2SProxy``s in front of any server: ``await proxy_for(upstream)``.

    The hook defaults to a fresh ``RecordingHook``; keyword arguments override ``ProxyConfig``
    fields. At teardown each proxy, last started first, disconnects the clients made with
    ``running.client(...)`` and stops.
    """
    async with contextlib.AsyncExitStack() as started:

        async def start(
            server: XmppUpstream, hook: StanzaHook | None = None, **config_overrides: Any
        ) -> RunningProxy:
            running = await start_proxy(server, hook, **config_overrides)
            started.push_async_callback(running.stop)
            return running

        yield start


@pytest.fixture
async def upstream_proxy(upstream: ServerUnderTest, proxy_for: ProxyStarter) -> RunningProxy:
    """One proxy with a ``RecordingHook`` (passes everything) in front of ``upstream``."""
    return await proxy_for(upstream)
