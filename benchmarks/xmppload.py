"""A lean asyncio XMPP load client for measuring servers and the proxy (not a real client).

It does the least a c2s session needs (stream header, STARTTLS accepting any certificate or
direct TLS, SASL PLAIN, resource binding, optional presence) by scanning bytes rather than
parsing XML, so nearly all of a benchmark's CPU goes to the server and the proxy, not here.

Two senders:
- burst: N one-line chat messages as fast as the socket takes them, written in batches with
  ``drain()`` between batches (optionally with at most ``window`` messages in flight);
- paced: R messages/s, each carrying its send time (CLOCK_MONOTONIC ns) in its id, so the
  receiver can record per-message latency.

The receiver counts ``<message`` in the byte stream (a stanza boundary never splits the
count) and, in paced mode, reads the send time back out of each id.

Standalone use (prints one JSON line):

    python benchmarks/xmppload.py --port 5222 --sender alice:pw --receiver bob:pw --count 20000
    python benchmarks/xmppload.py --port 5222 --sender alice:pw --receiver bob:pw \
        --rate 1000 --count 10000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import secrets
import ssl
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

STREAM_HEADER = (
    "<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)
FEATURES_END = b"</stream:features>"
READ_SIZE = 256 * 1024
BODY = "benchmark message with a one-line body of ordinary length"

# A paced message's id is L<seq>_<monotonic ns at send time>; Prosody keeps ids as sent.
_PACED_ID = re.compile(rb"<message\b[^>]*?\bid=['\"]L(\d+)_(\d+)['\"]")


class XmppError(RuntimeError):
    """The server (or proxy) said no, or said something this client does not expect."""


_CONTEXT: ssl.SSLContext | None = None


def insecure_context() -> ssl.SSLContext:
    """Client TLS that accepts the benchmark's self-signed certificate.

    Built once and without the system CA store: loading that costs ~40 ms per context,
    which would dominate connection set-up.
    """
    global _CONTEXT
    if _CONTEXT is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _CONTEXT = context
    return _CONTEXT


@dataclass
class Session:
    """One bound c2s session: its streams plus whatever was read past the last handshake step."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    jid: str
    buffer: bytes = b""

    async def close(self) -> None:
        try:
            self.writer.write(b"</stream:stream>")
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (OSError, TimeoutError, ssl.SSLError, RuntimeError):
            pass


class _Negotiator:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.buffer = b""

    async def until(self, *markers: bytes) -> tuple[bytes, bytes]:
        """Read until one of ``markers``; return (text up to and incl. it, which marker)."""
        deadline = time.monotonic() + self.timeout
        while True:
            best = -1
            found = b""
            for marker in markers:
                index = self.buffer.find(marker)
                if index >= 0 and (best < 0 or index < best):
                    best, found = index, marker
            if best >= 0:
                end = best + len(found)
                if found in (b"<success", b"<failure", b"<proceed"):
                    # Take the whole element (self-closing or with content).
                    close = self.buffer.find(b">", best)
                    if close < 0:
                        best = -1
                    else:
                        end = close + 1
                        if self.buffer[close - 1 : close] != b"/":
                            tail = b"</" + found[1:] + b">"
                            stop = self.buffer.find(tail, end)
                            if stop < 0:
                                best = -1
                            else:
                                end = stop + len(tail)
                if best >= 0:
                    text, self.buffer = self.buffer[:end], self.buffer[end:]
                    return text, found
            if b"<stream:error" in self.buffer:
                raise XmppError(f"stream error: {self.buffer[-400:]!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise XmppError(f"timed out waiting for {markers!r}; have {self.buffer[-300:]!r}")
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), remaining)
            if not data:
                raise XmppError(f"connection closed waiting for {markers!r}: {self.buffer!r}")
            self.buffer += data

    def send(self, data: str | bytes) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)


async def connect(
    host: str,
    port: int,
    user: str,
    password: str,
    *,
    domain: str = "localhost",
    resource: str = "load",
    tls: str = "starttls",
    presence: bool = False,
    setup_s: float = 20.0,
) -> Session:
    """Open a bound session. ``tls`` is "starttls", "direct" or "none"."""
    context = insecure_context()
    if tls == "direct":
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=domain), setup_s
        )
    else:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), setup_s)
    try:
        return await _negotiate(
            reader, writer, user, password, domain, resource, tls, presence, setup_s
        )
    except BaseException:
        writer.close()
        raise


async def _negotiate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    user: str,
    password: str,
    domain: str,
    resource: str,
    tls: str,
    presence: bool,
    setup_s: float,
) -> Session:
    n = _Negotiator(reader, writer, setup_s)
    header = STREAM_HEADER.format(domain=domain)
    n.send(header)
    features, _ = await n.until(FEATURES_END)
    if tls == "starttls":
        if b"<starttls" not in features:
            raise XmppError(f"no STARTTLS offered: {features!r}")
        n.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        _, marker = await n.until(b"<proceed", b"<failure")
        if marker != b"<proceed":
            raise XmppError("STARTTLS refused")
        if n.buffer:
            raise XmppError("data after <proceed/> before TLS")
        await writer.start_tls(insecure_context(), server_hostname=domain)
        n.send(header)
        features, _ = await n.until(FEATURES_END)
    if b">PLAIN<" not in features:
        raise XmppError(f"PLAIN not offered: {features!r}")
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    n.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    _, marker = await n.until(b"<success", b"<failure")
    if marker != b"<success":
        raise XmppError(f"authentication failed for {user}")
    n.send(header)
    await n.until(FEATURES_END)
    n.send(
        "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        f"<resource>{resource}</resource></bind></iq>"
    )
    text, _ = await n.until(b"</iq>")
    match = re.search(rb"<jid>([^<]+)</jid>", text)
    if match is None:
        raise XmppError(f"bind failed: {text!r}")
    jid = match.group(1).decode()
    if presence:
        n.send("<presence/>")
    # A ping round trip: once it returns, the server has handled everything sent before it
    # (in particular the presence that makes this resource available for bare-JID messages).
    n.send(f"<iq type='get' id='sync1' to='{domain}'><ping xmlns='urn:xmpp:ping'/></iq>")
    text, _ = await n.until(b"id='sync1'", b'id="sync1"')
    await n.until(b">")
    # Drop any presence echo and whatever else came before the ping result.
    return Session(reader, writer, jid, b"")


# -- receiving ------------------------------------------------------------------------------


@dataclass
class Receipt:
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    progress: asyncio.Event = field(default_factory=asyncio.Event)


async def receive(
    session: Session, expected: int, receipt: Receipt, *, paced: bool, stall_s: float
) -> Receipt:
    """Read until ``expected`` messages arrived (or nothing arrived for ``stall_s`` s)."""
    reader = session.reader
    tail = b""
    buf = b""
    while receipt.count < expected:
        try:
            data = await asyncio.wait_for(reader.read(READ_SIZE), stall_s)
        except TimeoutError:
            raise XmppError(
                f"receiver stalled: {receipt.count} of {expected} messages after {stall_s}s"
            ) from None
        now = time.monotonic_ns()
        if not data:
            raise XmppError(f"receiver closed after {receipt.count} of {expected} messages")
        if paced:
            buf += data
            last_end = 0
            for match in _PACED_ID.finditer(buf):
                receipt.latencies_ns.append(now - int(match.group(2)))
                receipt.count += 1
                last_end = match.end()
            cut = buf.rfind(b"<message")
            buf = buf[cut:] if cut >= last_end else buf[-7:]
        else:
            chunk = tail + data
            n = chunk.count(b"<message")
            tail = chunk[-7:]  # too short to hold a whole "<message": no double count
            receipt.count += n
        if receipt.count:
            if not receipt.first_ns:
                receipt.first_ns = now
            receipt.last_ns = now
        receipt.progress.set()
    return receipt


# -- sending --------------------------------------------------------------------------------


def _burst_template(to: str) -> bytes:
    # A fresh id prefix per burst: an archiving proxy treats a repeated id and body as another
    # sighting of a message it already decided (an observation, far cheaper), so bursts that
    # reused ids measured that path from the second round on.
    burst = secrets.token_hex(4)
    return (
        f"<message to='{to}' type='chat' id='m{burst}-%d'><body>{BODY} %d</body></message>"
    ).encode()


async def send_burst(
    session: Session,
    to: str,
    count: int,
    *,
    batch: int = 64,
    window: int = 0,
    receipt: Receipt | None = None,
) -> int:
    """Send ``count`` messages as fast as possible; return the monotonic ns of the first write.

    With ``window`` > 0 (and the receiver's ``receipt``), at most ``window`` messages are in
    flight: end-to-end flow control, so no queue grows without bound anywhere.
    """
    template = _burst_template(to)
    writer = session.writer
    start = time.monotonic_ns()
    for first in range(0, count, batch):
        last = min(count, first + batch)
        if window and receipt is not None:
            while last - receipt.count > window:
                receipt.progress.clear()
                await receipt.progress.wait()
        writer.write(b"".join(template % (i, i) for i in range(first, last)))
        await writer.drain()
    return start


async def send_paced(session: Session, to: str, count: int, rate: float) -> int:
    """Send ``count`` messages at ``rate``/s, each stamped with its send time; return start."""
    writer = session.writer
    interval = 1e9 / rate
    start = time.monotonic_ns()
    for i in range(count):
        due = start + int(i * interval)
        now = time.monotonic_ns()
        if due > now:
            await asyncio.sleep((due - now) / 1e9)
        ts = time.monotonic_ns()
        stanza = f"<message to='{to}' type='chat' id='L{i}_{ts}'><body>{BODY} {i}</body></message>"
        writer.write(stanza.encode())
        if writer.transport.get_write_buffer_size() > 64 * 1024:
            await writer.drain()
    await writer.drain()
    return start


# -- one measured run -----------------------------------------------------------------------


@dataclass
class RunResult:
    mode: str
    sent: int
    delivered: int
    seconds: float
    msgs_per_s: float
    latency_ms: dict[str, float] | None = None
    latencies_ns: list[int] | None = field(default=None, repr=False)


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def latency_summary(latencies_ns: Iterable[int]) -> dict[str, float]:
    values = sorted(latencies_ns)
    return {
        "p50": percentile(values, 50) / 1e6,
        "p90": percentile(values, 90) / 1e6,
        "p99": percentile(values, 99) / 1e6,
        "p999": percentile(values, 99.9) / 1e6,
        "max": (values[-1] / 1e6) if values else float("nan"),
        "mean": (sum(values) / len(values) / 1e6) if values else float("nan"),
    }


async def run_burst(
    sender: Session,
    receiver: Session,
    to: str,
    count: int,
    *,
    window: int = 0,
    batch: int = 64,
    stall_s: float = 30.0,
) -> RunResult:
    receipt = Receipt()
    recv_task = asyncio.create_task(receive(receiver, count, receipt, paced=False, stall_s=stall_s))
    try:
        start = await send_burst(sender, to, count, batch=batch, window=window, receipt=receipt)
        await recv_task
    finally:
        recv_task.cancel()
    seconds = (receipt.last_ns - start) / 1e9
    return RunResult("burst", count, receipt.count, seconds, receipt.count / seconds)


async def run_paced(
    sender: Session,
    receiver: Session,
    to: str,
    count: int,
    rate: float,
    *,
    stall_s: float = 30.0,
) -> RunResult:
    receipt = Receipt()
    recv_task = asyncio.create_task(receive(receiver, count, receipt, paced=True, stall_s=stall_s))
    try:
        start = await send_paced(sender, to, count, rate)
        await recv_task
    finally:
        recv_task.cancel()
    seconds = (receipt.last_ns - start) / 1e9
    return RunResult(
        "paced",
        count,
        receipt.count,
        seconds,
        receipt.count / seconds,
        latency_summary(receipt.latencies_ns),
        receipt.latencies_ns,
    )


def _credentials(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD")
    return user, password


async def _main(args: argparse.Namespace) -> dict[str, object]:
    s_user, s_pass = args.sender
    r_user, r_pass = args.receiver
    receiver = await connect(
        args.host,
        args.port,
        r_user,
        r_pass,
        domain=args.domain,
        resource="recv",
        tls=args.tls,
        presence=True,
    )
    sender = await connect(
        args.host, args.port, s_user, s_pass, domain=args.domain, resource="send", tls=args.tls
    )
    try:
        to = f"{r_user}@{args.domain}"
        if args.rate:
            result = await run_paced(sender, receiver, to, args.count, args.rate)
        else:
            result = await run_burst(sender, receiver, to, args.count, window=args.window)
    finally:
        await sender.close()
        await receiver.close()
    out = dict(result.__dict__)
    out.pop("latencies_ns", None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--domain", default="localhost")
    parser.add_argument("--tls", choices=("starttls", "direct", "none"), default="starttls")
    parser.add_argument("--sender", type=_credentials, required=True, help="USER:PASSWORD")
    parser.add_argument("--receiver", type=_credentials, required=True, help="USER:PASSWORD")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=0.0, help="msgs/s; 0 = burst")
    parser.add_argument("--window", type=int, default=0, help="max in flight (burst); 0 = none")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(asyncio.run(_main(args))))
    except XmppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONASYNCIODEBUG", "0")
    raise SystemExit(main())
