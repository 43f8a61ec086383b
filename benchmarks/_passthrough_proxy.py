"""Run the inline c2s proxy with the pass-through hook: the transport alone, for benchmarks.

`stanzaguard run` wires the whole archiving service (pipeline, spool, SQLite indexer); this
runs only `C2SProxy` + `PassThroughHook`, built from the same settings by the same
`build_proxy_config`, so what it measures is the transport a deployment runs.

    python benchmarks/_passthrough_proxy.py --domain localhost --upstream 127.0.0.1:5222 \
        --cert F --key F --listen 127.0.0.1:P --listen-tls 127.0.0.1:P2
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import contextlib
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.c2s import C2SProxy
from proxy.hook import PassThroughHook
from stanzaguard.event_loop import run_on
from stanzaguard.logs import configure_logging
from stanzaguard.settings import Settings, load_settings, split_host_port
from stanzaguard.wiring import build_proxy_config, tune_tls_buffers


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(
        None,
        domain=[args.domain],
        upstream=args.upstream,
        cert=Path(args.cert),
        key=Path(args.key),
        listen=args.listen,
        listen_tls=args.listen_tls,
    )


async def serve(args: argparse.Namespace, settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    if not args.ssl_buffer_kib:
        tune_tls_buffers(settings)  # what `stanzaguard run` does
    proxy = C2SProxy(build_proxy_config(settings), PassThroughHook())
    await proxy.start(split_host_port(args.listen), split_host_port(args.listen_tls))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--domain", "--upstream", "--cert", "--key", "--listen", "--listen-tls"):
        parser.add_argument(name, required=True)
    parser.add_argument(
        "--ssl-buffer-kib",
        type=int,
        default=0,
        help="experiment: size of asyncio's per-TLS-connection read buffer "
        "(default: the tls_buffer_bytes setting, as `stanzaguard run`; CPython's own is 256)",
    )
    parser.add_argument(
        "--cprofile",
        metavar="FILE",
        help="profile with cProfile on CPU time (time.thread_time) and dump stats here on exit",
    )
    args = parser.parse_args()
    settings = settings_of(args)
    if args.ssl_buffer_kib:
        asyncio.sslproto.SSLProtocol.max_size = args.ssl_buffer_kib * 1024
    if not args.cprofile:
        run_on(settings.event_loop, serve(args, settings))
        return
    import cProfile
    import time

    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        run_on(settings.event_loop, serve(args, settings))
    finally:
        profiler.disable()
        profiler.dump_stats(args.cprofile)


if __name__ == "__main__":
    main()
