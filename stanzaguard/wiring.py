"""Composition: turn the settings into running parts and connect them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from prometheus_client import start_http_server

from proxy.c2s import C2SProxy, ProxyConfig
from proxy.hook import PassThroughHook, StanzaHook
from proxy.stream import FramingLimits
from stanzaguard.errors import SettingsError
from stanzaguard.settings import Settings, split_host_port
from stanzaguard.tls import server_context, upstream_context

log = logging.getLogger(__name__)


def build_proxy_config(settings: Settings) -> ProxyConfig:
    if not settings.domain:
        raise SettingsError("domain: at least one domain is required (--domain)")
    if (settings.cert is None) != (settings.key is None):
        raise SettingsError("cert/key: give both a certificate and its key")
    tls = None
    if settings.cert is not None and settings.key is not None:
        tls = server_context(settings.cert, settings.key, alpn=True)
    elif not settings.allow_plaintext:
        raise SettingsError("cert/key: a certificate and key are required (--cert, --key)")
    if settings.allow_plaintext and settings.environment == "production":
        raise SettingsError("allow_plaintext: refused outside environment=development")
    host, port = split_host_port(settings.upstream)
    return ProxyConfig(
        domains=frozenset(settings.domain),
        upstream_host=host,
        upstream_port=port,
        server_tls=tls,
        upstream_tls=upstream_context(settings.upstream_ca_file) if settings.upstream_tls else None,
        allow_plaintext=settings.allow_plaintext,
        limits=FramingLimits(
            max_stanza_bytes=settings.max_stanza_bytes,
            max_depth=settings.max_depth,
            max_attributes=settings.max_attributes,
        ),
        auth_timeout=settings.auth_timeout,
        idle_timeout=settings.idle_timeout,
        stanza_timeout=settings.stanza_timeout,
        max_sessions=settings.max_sessions,
    )


async def serve(
    settings: Settings, hook: StanzaHook | None = None, ready: asyncio.Event | None = None
) -> None:
    """Run the proxy until SIGINT or SIGTERM."""
    config = build_proxy_config(settings)
    proxy = C2SProxy(config, hook or PassThroughHook())
    listen = split_host_port(settings.listen) if settings.listen else None
    listen_tls = split_host_port(settings.listen_tls) if settings.listen_tls else None
    if config.server_tls is None:
        listen_tls = None
    try:
        bound = await proxy.start(listen, listen_tls)
    except OSError as exc:
        raise SettingsError(f"listen: cannot listen: {exc}") from None
    if settings.metrics_listen:
        metrics_host, metrics_port = split_host_port(settings.metrics_listen)
        start_http_server(metrics_port, metrics_host)
    log.info(
        "proxy listening",
        extra={"addresses": [f"{h}:{p}" for h, p in bound], "upstream": settings.upstream},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("proxy stopping")
        await proxy.stop()
