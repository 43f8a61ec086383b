"""WebSocket and BOSH front ends against the TCP front end: throughput and added latency.

One run, one throwaway Prosody, one proxy process serving all three front ends with the
pass-through hook (the transport alone, as benchmarks/bench_transport.py measures it). The
sender (alice) connects through each front end in turn; the receiver (bob) is always a TCP
client of the same proxy, so the three paths differ only in the sender's front end.

- Throughput: `--count` one-line chat messages per round, `--repeats` rounds per front end,
  rounds interleaved; at most `--window` messages in flight. TCP and WebSocket senders write
  one message per write / per frame (RFC 7395 allows no more); the BOSH sender puts up to 64
  in one `<body/>` and keeps two requests open (hold=1, requests=2), as BOSH clients do.
- Latency: `--latency-count` messages at `--rate` msgs/s, each id carrying its monotonic send
  time, slices alternating the front ends; the figure is send→receive through the proxy.
- Proxy CPU per message: utime+stime of the proxy process around each throughput round.

    .venv/bin/python benchmarks/bench_web_frontends.py [--count 5000] [--repeats 3]

The machine may be shared: the figures are noisy; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from benchmarks import xmppload
from benchmarks._services import (
    LOOPBACK,
    Prosody,
    cpu_seconds,
    free_port,
    make_cert,
    stop_pid,
    wait_for_port,
)

DOMAIN = "localhost"
USERS = {"alice": "alice-bench-pw", "bob": "bob-bench-pw"}
BODY = xmppload.BODY
FRAMING_NS = "urn:ietf:params:xml:ns:xmpp-framing"
BOSH_NS = "http://jabber.org/protocol/httpbind"
BOSH_BATCH = 64
FRONT_ENDS = ("tcp", "websocket", "bosh")


def message(to: str, ident: str, n: int) -> bytes:
    return (
        f"<message xmlns='jabber:client' to='{to}' type='chat' id='{ident}'>"
        f"<body>{BODY} {n}</body></message>"
    ).encode()


def _plain(user: str) -> str:
    token = base64.b64encode(f"\0{user}\0{USERS[user]}".encode()).decode()
    return f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>"


_BIND = (
    "<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
    "<resource>{}</resource></bind></iq>"
)


# -- senders ----------------------------------------------------------------------------------


class Sender(Protocol):
    async def send(self, stanzas: list[bytes]) -> None: ...
    async def close(self) -> None: ...


class TcpSender:
    def __init__(self, session: xmppload.Session) -> None:
        self.session = session

    async def send(self, stanzas: list[bytes]) -> None:
        self.session.writer.write(b"".join(stanzas))
        await self.session.writer.drain()

    async def close(self) -> None:
        await self.session.close()


class WsSender:
    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket

    @classmethod
    async def open(cls, url: str, resource: str) -> WsSender:
        socket = await connect(
            url,
            subprotocols=[Subprotocol("xmpp")],
            ssl=xmppload.insecure_context(),
            compression=None,
            max_size=None,
        )

        async def until(marker: str) -> None:
            while marker not in str(await socket.recv()):
                pass

        opening = f"<open xmlns='{FRAMING_NS}' to='{DOMAIN}' version='1.0'/>"
        await socket.send(opening)
        await until("features")
        await socket.send(_plain("alice"))
        await until("success")
        await socket.send(opening)
        await until("features")
        await socket.send(_BIND.format(resource))
        await until("</bind>")
        return cls(socket)

    async def send(self, stanzas: list[bytes]) -> None:
        for stanza in stanzas:  # one element per frame (RFC 7395)
            await self.socket.send(stanza.decode())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.socket.send(f"<close xmlns='{FRAMING_NS}'/>")
            await self.socket.close()


class BoshSender:
    """Two requests open at a time (hold=1): each new one releases the held one."""

    def __init__(self, url: str) -> None:
        self.url = url
        # aiohttp's client sets TCP_NODELAY, as browsers do (httpx measured ~20 ms slower
        # per held request here).
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False, limit=4))
        self.rid = 10_000
        self.sid = ""
        self.slots = asyncio.Semaphore(2)
        self.tasks: set[asyncio.Task[None]] = set()

    async def _post(self, payload: str, **attrs: str) -> str:
        self.rid += 1
        rendered = "".join(f" {k.replace('__', ':')}='{v}'" for k, v in attrs.items())
        body = (
            f"<body xmlns='{BOSH_NS}' xmlns:xmpp='urn:xmpp:xbosh' rid='{self.rid}'"
            f"{f' sid={chr(39)}{self.sid}{chr(39)}' if self.sid else ''}{rendered}>{payload}</body>"
        )
        async with self.http.post(self.url, data=body.encode()) as response:
            return await response.text()

    @classmethod
    async def open(cls, url: str, resource: str) -> BoshSender:
        sender = cls(url)
        created = await sender._post(
            "", to=DOMAIN, wait="5", hold="1", ver="1.6", xmpp__version="1.0"
        )
        found = re.search(r"\bsid=['\"]([^'\"]+)", created)
        assert found is not None, created
        sender.sid = found.group(1)
        reply = created
        while "mechanisms" not in reply:
            reply = await sender._post("")
        reply = await sender._post(_plain("alice"))
        while "success" not in reply:
            reply = await sender._post("")
        reply = await sender._post("", to=DOMAIN, xmpp__restart="true")
        while "bind" not in reply:
            reply = await sender._post("")
        reply = await sender._post(_BIND.format(resource))
        while "</jid>" not in reply:
            reply = await sender._post("")
        return sender

    async def send(self, stanzas: list[bytes]) -> None:
        for first in range(0, len(stanzas), BOSH_BATCH):
            payload = b"".join(stanzas[first : first + BOSH_BATCH]).decode()
            await self.slots.acquire()
            task = asyncio.create_task(self._send_one(payload))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            await asyncio.sleep(0)  # let it go out before the next takes the other slot

    async def _send_one(self, payload: str) -> None:
        try:
            await self._post(payload)
        finally:
            self.slots.release()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._post("", type="terminate")
        await self.http.close()


# -- rounds -----------------------------------------------------------------------------------


@dataclass
class Urls:
    tcp_port: int
    websocket: str
    bosh: str


async def open_sender(kind: str, urls: Urls, tag: str) -> Sender:
    if kind == "tcp":
        session = await xmppload.connect(
            LOOPBACK, urls.tcp_port, "alice", USERS["alice"], domain=DOMAIN, resource=tag
        )
        return TcpSender(session)
    if kind == "websocket":
        return await WsSender.open(urls.websocket, tag)
    return await BoshSender.open(urls.bosh, tag)


@dataclass
class Results:
    rates: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in FRONT_ENDS})
    cpu_us: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in FRONT_ENDS})
    latencies: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in FRONT_ENDS})


async def receiver(urls: Urls, tag: str) -> xmppload.Session:
    return await xmppload.connect(
        LOOPBACK,
        urls.tcp_port,
        "bob",
        USERS["bob"],
        domain=DOMAIN,
        resource=tag,
        presence=True,
    )


async def throughput_round(
    kind: str, urls: Urls, count: int, window: int, proxy_pid: int, tag: str
) -> tuple[float, float]:
    bob = await receiver(urls, f"r-{tag}")
    sender = await open_sender(kind, urls, f"s-{tag}")
    to = f"bob@{DOMAIN}/r-{tag}"
    receipt = xmppload.Receipt()
    try:
        cpu_before = cpu_seconds(proxy_pid)
        reading = asyncio.create_task(
            xmppload.receive(bob, count, receipt, paced=False, stall_s=60.0)
        )
        start = time.monotonic_ns()
        for first in range(0, count, BOSH_BATCH):
            last = min(count, first + BOSH_BATCH)
            while last - receipt.count > window:
                receipt.progress.clear()
                await receipt.progress.wait()
            await sender.send([message(to, f"m{i}", i) for i in range(first, last)])
        await reading
        elapsed = (receipt.last_ns - start) / 1e9
        cpu = cpu_seconds(proxy_pid) - cpu_before
        return count / elapsed, cpu / count * 1e6
    finally:
        await sender.close()
        await bob.close()


async def latency_slice(kind: str, urls: Urls, count: int, rate: float, tag: str) -> list[int]:
    bob = await receiver(urls, f"r-{tag}")
    sender = await open_sender(kind, urls, f"s-{tag}")
    to = f"bob@{DOMAIN}/r-{tag}"
    receipt = xmppload.Receipt()
    try:
        reading = asyncio.create_task(
            xmppload.receive(bob, count, receipt, paced=True, stall_s=60.0)
        )
        start = time.monotonic()
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await sender.send([message(to, f"L{i}_{time.monotonic_ns()}", i)])
        await reading
        return receipt.latencies_ns
    finally:
        await sender.close()
        await bob.close()


# -- the proxy process ------------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    from proxy.bosh import BoshConfig, BoshFrontEnd
    from proxy.c2s import C2SProxy
    from proxy.hook import PassThroughHook
    from proxy.websocket import WebSocketConfig, WebSocketFrontEnd
    from stanzaguard.settings import load_settings
    from stanzaguard.tls import server_context
    from stanzaguard.wiring import build_proxy_config, tune_tls_buffers

    settings = load_settings(
        None,
        domain=[DOMAIN],
        upstream=args.upstream,
        cert=Path(args.cert),
        key=Path(args.key),
        listen=f"{LOOPBACK}:{args.tcp_port}",
    )
    tune_tls_buffers(settings)
    proxy = C2SProxy(build_proxy_config(settings), PassThroughHook())
    await proxy.start((LOOPBACK, args.tcp_port), None)
    web_tls = server_context(Path(args.cert), Path(args.key), alpn=False)
    websocket = WebSocketFrontEnd(proxy, WebSocketConfig(tls=web_tls))
    await websocket.start(LOOPBACK, args.ws_port)
    bosh = BoshFrontEnd(proxy, BoshConfig(tls=web_tls))
    await bosh.start(LOOPBACK, args.bosh_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await websocket.stop()
    await bosh.stop()
    await proxy.stop()


def machine() -> str:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def start_proxy(
    log: Path,
    upstream_port: int,
    cert: Path,
    key: Path,
    tcp_port: int,
    ws_port: int,
    bosh_port: int,
) -> subprocess.Popen[bytes]:
    """This script in --serve mode: the proxy with all three front ends, in its own process."""
    argv = [
        sys.executable,
        __file__,
        "--serve",
        "--upstream",
        f"{LOOPBACK}:{upstream_port}",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--tcp-port",
        str(tcp_port),
        "--ws-port",
        str(ws_port),
        "--bosh-port",
        str(bosh_port),
    ]
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def run(args: argparse.Namespace, work: Path) -> Results:
    cert, key = make_cert(work / "prosody" / "certs", DOMAIN)
    prosody = Prosody(work / "prosody", cert, key)
    for user, password in USERS.items():
        prosody.register(user, password)
    prosody.start()
    tcp_port, ws_port, bosh_port = free_port(), free_port(), free_port()
    log = work / "proxy.log"
    proc = start_proxy(log, prosody.port, cert, key, tcp_port, ws_port, bosh_port)
    try:
        for port in (tcp_port, ws_port, bosh_port):
            wait_for_port(port, proc, 30.0, log)
        urls = Urls(
            tcp_port,
            f"wss://{LOOPBACK}:{ws_port}/xmpp-websocket",
            f"https://{LOOPBACK}:{bosh_port}/http-bind",
        )
        results = Results()
        for kind in FRONT_ENDS:  # warm-up
            await throughput_round(kind, urls, args.count // 5, args.window, proc.pid, "warm")
        for i in range(args.repeats):
            for kind in FRONT_ENDS:
                rate, cpu = await throughput_round(
                    kind, urls, args.count, args.window, proc.pid, f"{kind}{i}"
                )
                results.rates[kind].append(rate)
                results.cpu_us[kind].append(cpu)
                print(f"throughput {kind} round {i}: {rate:,.0f} msgs/s, {cpu:.0f} µs/msg")
        per_slice = max(1, args.latency_count // args.latency_slices)
        for i in range(args.latency_slices):
            for kind in FRONT_ENDS:
                results.latencies[kind] += await latency_slice(
                    kind, urls, per_slice, args.rate, f"lat{kind}{i}"
                )
        return results
    finally:
        stop_pid(proc)
        prosody.stop()


def report(results: Results, args: argparse.Namespace, started: datetime) -> str:
    tcp_rate = statistics.median(results.rates["tcp"])
    tcp_lat = xmppload.latency_summary(results.latencies["tcp"])
    lines = [
        f"date: {started:%Y-%m-%d %H:%M} UTC; machine: {machine()}",
        f"count {args.count} x {args.repeats} rounds, window {args.window}; latency "
        f"{args.latency_count} msgs at {args.rate:.0f}/s",
        "",
        "| front end | msgs/s (median) | vs TCP | proxy CPU µs/msg | p50 ms | p99 ms | "
        "p50 added vs TCP |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in FRONT_ENDS:
        rate = statistics.median(results.rates[kind])
        cpu = statistics.median(results.cpu_us[kind])
        lat = xmppload.latency_summary(results.latencies[kind])
        lines.append(
            f"| {kind} | {rate:,.0f} | {rate / tcp_rate:.2f} | {cpu:.0f} | {lat['p50']:.2f} | "
            f"{lat['p99']:.2f} | {lat['p50'] - tcp_lat['p50']:+.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else "")
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--latency-count", type=int, default=1500)
    parser.add_argument("--latency-slices", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    for name in ("--upstream", "--cert", "--key"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--tcp-port", "--ws-port", "--bosh-port"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return 0
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="sg-bench-web-") as work:
        Path(work).chmod(0o755)  # Prosody runs as its own user and must read its directory
        results = asyncio.run(run(args, Path(work)))
    print(report(results, args, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
