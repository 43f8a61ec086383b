"""XMPP clients for tests: a slixmpp wrapper, and the Debian command-line senders.

``ChatClient`` drives slixmpp the way a real client would (TLS, SASL, bind, presence) but with
the knobs tests need: which port and TLS mode, which SASL mechanism, whether to trust the
self-signed certificate, and stream management, carbons and MUC on demand. Received messages
land in a queue as :class:`ReceivedMessage` values, so tests await them instead of wiring
event handlers.

``go_sendxmpp`` and ``sendxmpp`` run clients nobody in this project wrote, which is the point:
they catch the things a slixmpp-only suite would agree with itself about.
"""

from __future__ import annotations

import asyncio
import enum
import os
import ssl
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slixmpp import JID, ClientXMPP
from slixmpp.stanza import Message

from tests.support.services import require_binary

DEFAULT_TIMEOUT = 10.0


class TlsMode(enum.StrEnum):
    STARTTLS = "starttls"
    DIRECT = "direct"  # XEP-0368 style: TLS from the first byte
    PLAIN = "plain"  # no TLS at all, as on the proxy's loopback upstream leg


class CarbonKind(enum.StrEnum):
    RECEIVED = "received"
    SENT = "sent"


class ClientConnectError(ConnectionError):
    """The client could not reach a bound, started session."""


class AuthenticationFailed(ClientConnectError):
    """Every SASL mechanism the client was allowed to try was rejected."""


@dataclass(frozen=True)
class ReceivedMessage:
    """A message as the test client saw it.

    For a carbon, ``from_``/``to``/``body``/``type``/``id`` describe the forwarded (inner)
    message and ``carbon`` says which kind; ``xml`` is always the whole stanza as received.
    """

    from_: str
    to: str
    body: str
    type: str
    id: str
    xml: str
    carbon: CarbonKind | None = None
    error_condition: str | None = None
    error_text: str | None = None
    delayed: bool = False

    @property
    def is_carbon(self) -> bool:
        return self.carbon is not None

    @property
    def element(self) -> ET.Element:
        return ET.fromstring(self.xml)


def _ssl_context(ca_file: Path | None, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    if ca_file is not None:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    else:
        # Test servers use throwaway self-signed certificates; verifying them proves nothing.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def _message_fields(msg: Message) -> dict[str, Any]:
    return {
        "from_": str(msg["from"]),
        "to": str(msg["to"]),
        "body": str(msg["body"]),
        "type": str(msg["type"]),
        "id": str(msg["id"]),
    }


class ChatClient:
    """An asyncio slixmpp client connected to an explicit host and port.

    ``mechanism`` restricts SASL to one mechanism (``"PLAIN"``, ``"SCRAM-SHA-1"``,
    ``"SCRAM-SHA-256"``, ...); by default slixmpp picks the strongest offered, which over TLS
    means a ``-PLUS`` mechanism when the server offers one. ``ca_file`` turns certificate
    verification on (against that CA, with host name ``jid``'s domain); without it, any
    certificate is accepted. ``tls_max_version=ssl.TLSVersion.TLSv1_2`` matters for channel
    binding: Prosody 0.12 binds with ``tls-unique`` only, so it offers ``SCRAM-*-PLUS`` on
    TLS 1.2 connections and on none over TLS 1.3.
    """

    def __init__(
        self,
        jid: str,
        password: str,
        *,
        host: str = "127.0.0.1",
        port: int,
        tls: TlsMode = TlsMode.STARTTLS,
        mechanism: str | None = None,
        ca_file: Path | None = None,
        tls_max_version: ssl.TLSVersion | None = None,
        resource: str | None = None,
        stream_management: bool = False,
        carbons: bool = False,
        muc: bool = False,
        initial_presence: bool = True,
        plugins: Sequence[str] = (),
    ) -> None:
        full = JID(jid)
        if resource is not None:
            full.resource = resource
        self.requested_jid = full
        self.password = password
        self.host = host
        self.port = port
        self.tls = tls
        self.mechanism = mechanism
        self.ca_file = ca_file
        self.tls_max_version = tls_max_version
        self.stream_management = stream_management
        self.carbons = carbons
        self.muc = muc
        self.initial_presence = initial_presence
        self.plugins = tuple(plugins)
        self.messages: asyncio.Queue[ReceivedMessage] = asyncio.Queue()
        #: Messages that ``next_message(where=...)`` passed over, kept for failure messages.
        self.skipped: list[ReceivedMessage] = []
        self._xmpp: ClientXMPP | None = None

    # -- connection ------------------------------------------------------------------------

    @property
    def xmpp(self) -> ClientXMPP:
        if self._xmpp is None:
            raise RuntimeError("ChatClient is not connected; await connect() first")
        return self._xmpp

    @property
    def jid(self) -> str:
        """The full JID the server bound (only known after connect())."""
        return str(self.xmpp.boundjid.full)

    @property
    def bare_jid(self) -> str:
        return str(self.requested_jid.bare)

    @property
    def mechanism_used(self) -> str | None:
        mech = getattr(self.xmpp.plugin["feature_mechanisms"], "mech", None)
        return str(mech.name) if mech is not None else None

    @property
    def offered_mechanisms(self) -> frozenset[str]:
        """The SASL mechanisms the server offered on the last stream that had any."""
        return frozenset(self.xmpp.plugin["feature_mechanisms"].mech_list)

    @property
    def sm_enabled(self) -> bool:
        if not self.stream_management:
            return False
        return bool(self.xmpp.plugin["xep_0198"].enabled_in)

    @property
    def tls_active(self) -> bool:
        return isinstance(self.xmpp.socket, ssl.SSLSocket | ssl.SSLObject)

    @property
    def tls_version(self) -> str | None:
        """``"TLSv1.3"``, ``"TLSv1.2"``... or None without TLS."""
        sock = self.xmpp.socket
        if isinstance(sock, ssl.SSLSocket | ssl.SSLObject):
            return sock.version()
        return None

    def _build(self) -> ClientXMPP:
        plain = self.tls is TlsMode.PLAIN
        xmpp = ClientXMPP(
            str(self.requested_jid),
            self.password,
            sasl_mech=self.mechanism,
            plugin_config={
                "feature_mechanisms": {
                    # Plaintext auth is only for the loopback upstream leg and tests of it.
                    "unencrypted_plain": plain,
                    "unencrypted_scram": plain,
                },
            },
            ssl_context=_ssl_context(self.ca_file, self.tls_max_version),
        )
        xmpp.enable_direct_tls = self.tls is TlsMode.DIRECT
        xmpp.enable_starttls = self.tls is TlsMode.STARTTLS
        xmpp.enable_plaintext = plain
        # A keepalive space every few minutes would only add noise to byte-level tests.
        xmpp.whitespace_keepalive = False
        for plugin in ("xep_0030", "xep_0199", *self.plugins):
            xmpp.register_plugin(plugin)
        if self.stream_management:
            xmpp.register_plugin("xep_0198")
        if self.carbons:
            xmpp.register_plugin("xep_0280")
        if self.muc:
            xmpp.register_plugin("xep_0045")
        xmpp.add_event_handler("message", self._on_message)
        xmpp.add_event_handler("message_error", self._on_message)
        xmpp.add_event_handler("carbon_received", self._on_carbon_received)
        xmpp.add_event_handler("carbon_sent", self._on_carbon_sent)
        return xmpp

    async def connect(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Connect, authenticate, bind and (by default) send initial presence.

        Returns once the session started (and carbons are enabled, if asked for). Raises
        :class:`AuthenticationFailed` on SASL failure and :class:`ClientConnectError` when the
        TCP/TLS connection fails or the stream closes first; never retries.
        """
        xmpp = self._xmpp = self._build()
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()

        def fail(exc: BaseException) -> None:
            if not started.done():
                started.set_exception(exc)

        def on_session_start(_event: object) -> None:
            if not started.done():
                started.set_result(None)

        sasl_failures: list[str] = []

        def on_failed_auth(failure: Any) -> None:
            sasl_failures.append(str(failure["condition"]))

        def on_failed_all_auth(_event: object) -> None:
            sasl = xmpp.plugin["feature_mechanisms"]
            offered = sorted(sasl.mech_list)
            if sasl_failures:
                why = f"server said {', '.join(sasl_failures)}"
            else:
                wanted = self.mechanism or "any supported mechanism"
                why = f"no acceptable mechanism: wanted {wanted}, offered {offered}"
            fail(AuthenticationFailed(f"{self.requested_jid}: SASL failed; {why}"))

        def on_connection_failed(error: object) -> None:
            # slixmpp would retry forever with a growing delay; a test wants the error now.
            xmpp.cancel_connection_attempt()
            fail(ClientConnectError(f"cannot connect to {self.host}:{self.port}: {error}"))

        def on_disconnected(reason: object) -> None:
            fail(ClientConnectError(f"stream closed before session start: {reason}"))

        def on_stream_error(error: object) -> None:
            fail(ClientConnectError(f"stream error before session start: {error}"))

        def on_invalid_chain(error: object) -> None:
            fail(ClientConnectError(f"TLS certificate rejected: {error}"))

        handlers: list[tuple[str, Callable[[Any], None]]] = [
            ("session_start", on_session_start),
            ("failed_auth", on_failed_auth),
            ("failed_all_auth", on_failed_all_auth),
            ("connection_failed", on_connection_failed),
            ("disconnected", on_disconnected),
            ("stream_error", on_stream_error),
            ("ssl_invalid_chain", on_invalid_chain),
        ]
        for name, handler in handlers:
            xmpp.add_event_handler(name, handler)
        try:
            xmpp.connect(self.host, self.port)
            try:
                await asyncio.wait_for(started, timeout)
            except TimeoutError:
                raise ClientConnectError(
                    f"{self.requested_jid}: no session within {timeout}s "
                    f"at {self.host}:{self.port} ({self.tls})"
                ) from None
        except BaseException:
            await self._teardown()
            raise
        finally:
            for name, handler in handlers:
                xmpp.del_event_handler(name, handler)

        if self.initial_presence:
            await self._announce(timeout)
        if self.carbons:
            await xmpp.plugin["xep_0280"].enable(timeout=timeout)

    async def _announce(self, timeout: float) -> None:
        """Send initial presence and wait for the server to echo it back to us.

        Until the server has processed it, a message to our bare JID goes to offline storage
        and comes back later as a delayed copy; the echo (RFC 6121 4.2.2) proves the server now
        counts this resource as available.
        """
        xmpp = self.xmpp
        echoed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_presence(presence: Any) -> None:
            if presence["from"] == xmpp.boundjid and not echoed.done():
                echoed.set_result(None)

        xmpp.add_event_handler("presence_available", on_presence)
        try:
            xmpp.send_presence()
            await asyncio.wait_for(echoed, timeout)
        finally:
            xmpp.del_event_handler("presence_available", on_presence)

    async def disconnect(self, timeout: float = 5.0) -> None:
        """Close the stream politely, or abort the connection after ``timeout``."""
        if self._xmpp is None:
            return
        xmpp = self._xmpp
        try:
            await asyncio.wait_for(xmpp.disconnect(wait=timeout), timeout + 1)
        except TimeoutError:
            xmpp.abort()
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        xmpp = self._xmpp
        if xmpp is None:
            return
        xmpp.cancel_connection_attempt()
        if xmpp.transport is not None:
            xmpp.abort()
        # Let slixmpp's connection_lost callbacks run before the loop goes away.
        await asyncio.sleep(0)

    async def __aenter__(self) -> ChatClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    # -- sending ---------------------------------------------------------------------------

    def send_chat(
        self,
        to: str,
        body: str,
        *,
        mtype: str = "chat",
        id: str | None = None,
        payload: Iterable[ET.Element] = (),
        **interfaces: str,
    ) -> str:
        """Send a message and return its id.

        ``payload`` elements are appended as children; ``interfaces`` set slixmpp stanza
        interfaces (``thread=``, ``subject=``, ``nick=``...).
        """
        return self._send(to, body, mtype, id, payload, interfaces)

    def send_groupchat(
        self,
        room: str,
        body: str,
        *,
        id: str | None = None,
        payload: Iterable[ET.Element] = (),
        **interfaces: str,
    ) -> str:
        return self._send(room, body, "groupchat", id, payload, interfaces)

    def _send(
        self,
        to: str,
        body: str,
        mtype: str,
        id: str | None,
        payload: Iterable[ET.Element],
        interfaces: Mapping[str, str],
    ) -> str:
        msg = self.xmpp.make_message(mto=JID(to), mbody=body, mtype=mtype)  # type: ignore[arg-type]
        msg["id"] = id or self.xmpp.new_id()
        for key, value in interfaces.items():
            msg[key] = value
        for element in payload:
            msg.xml.append(element)
        msg.send()
        return str(msg["id"])

    def send_raw(self, data: str) -> None:
        """Write ``data`` to the stream unchanged (for malformed or hand-made stanzas)."""
        self.xmpp.send_raw(data)

    async def join_room(self, room: str, nick: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Join (creating if needed) a MUC room, without history; needs ``muc=True``."""
        if not self.muc:
            raise RuntimeError("create the ChatClient with muc=True to join rooms")
        await self.xmpp.plugin["xep_0045"].join_muc_wait(
            JID(room), nick, maxstanzas=0, timeout=timeout
        )

    # -- receiving -------------------------------------------------------------------------

    async def next_message(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        where: Callable[[ReceivedMessage], bool] | None = None,
    ) -> ReceivedMessage:
        """The next received message (matching ``where``, if given; others go to ``skipped``).

        Raises ``TimeoutError`` naming what was skipped, so a failure shows what did arrive.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(self.messages.get(), remaining)
            except TimeoutError:
                raise TimeoutError(
                    f"{self.requested_jid}: no matching message within {timeout}s; "
                    f"skipped: {[m.body for m in self.skipped]}"
                ) from None
            if where is None or where(message):
                return message
            self.skipped.append(message)

    async def ids_until(
        self, expected: Iterable[str], timeout: float = DEFAULT_TIMEOUT
    ) -> list[str]:
        """Ids of the messages received until every id in ``expected`` has arrived, then of
        any arriving within :meth:`drain`'s quiet window, so that a duplicate still shows.

        Raises ``TimeoutError`` (naming what did arrive) when one is still missing.
        """
        wanted = set(expected)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        got: list[str] = []
        while not wanted <= set(got):
            try:
                got.append((await self.next_message(deadline - loop.time())).id)
            except TimeoutError:
                raise TimeoutError(
                    f"{self.requested_jid}: {sorted(wanted - set(got))} missing after "
                    f"{timeout}s; received {got}"
                ) from None
        return got + [m.id for m in await self.drain()]

    async def drain(self, quiet_for: float = 0.3) -> list[ReceivedMessage]:
        """Collect messages until none arrives for ``quiet_for`` seconds.

        For asserting that something was *not* delivered; a positive wait should use
        :meth:`next_message` instead.
        """
        collected: list[ReceivedMessage] = []
        while True:
            try:
                collected.append(await asyncio.wait_for(self.messages.get(), quiet_for))
            except TimeoutError:
                return collected

    def _on_message(self, msg: Message) -> None:
        error = msg["error"] if msg["type"] == "error" else None
        self.messages.put_nowait(
            ReceivedMessage(
                **_message_fields(msg),
                xml=str(msg),
                error_condition=str(error["condition"]) if error is not None else None,
                error_text=str(error["text"]) if error is not None else None,
                delayed=msg.xml.find("{urn:xmpp:delay}delay") is not None,
            )
        )

    def _on_carbon(self, msg: Message, kind: CarbonKind) -> None:
        inner = msg[f"carbon_{kind.value}"]
        self.messages.put_nowait(
            ReceivedMessage(**_message_fields(inner), xml=str(msg), carbon=kind)
        )

    def _on_carbon_received(self, msg: Message) -> None:
        self._on_carbon(msg, CarbonKind.RECEIVED)

    def _on_carbon_sent(self, msg: Message) -> None:
        self._on_carbon(msg, CarbonKind.SENT)


# -- command-line clients from Debian ----------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    """A finished command-line client run (``returncode``, ``stdout``, ``stderr``)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        # Never print argv: it carries the password.
        return (
            f"{Path(self.argv[0]).name} exited {self.returncode}"
            f"{' (timed out)' if self.timed_out else ''}\n"
            f"stdout: {self.stdout}\nstderr: {self.stderr}"
        )


def _run_cli(argv: Sequence[str], message: str, timeout: float) -> CliResult:
    # An empty HOME keeps a developer's own ~/.sendxmpprc or go-sendxmpp config out of tests.
    with tempfile.TemporaryDirectory(prefix="sg-cli-home-") as home:
        env = {**os.environ, "HOME": home, "XDG_CONFIG_HOME": home}
        try:
            done = subprocess.run(
                list(argv),
                input=message,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            return CliResult(
                tuple(argv),
                returncode=-1,
                stdout=_text(exc.stdout),
                stderr=_text(exc.stderr),
                timed_out=True,
            )
    return CliResult(tuple(argv), done.returncode, done.stdout, done.stderr)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def go_sendxmpp(
    *,
    jid: str,
    password: str,
    recipient: str,
    message: str,
    port: int,
    host: str = "127.0.0.1",
    direct_tls: bool = False,
    chatroom: bool = False,
    timeout: float = 30.0,
    extra_args: Sequence[str] = (),
) -> CliResult:
    """Send ``message`` with go-sendxmpp, skipping certificate verification (``-n``).

    STARTTLS by default, direct TLS with ``direct_tls``. go-sendxmpp has no plaintext mode:
    it refuses to authenticate without TLS.
    """
    binary = require_binary("go-sendxmpp")
    argv = [binary, "-u", jid, "-p", password, "-j", f"{host}:{port}", "-n"]
    argv += ["--timeout", str(max(1, int(timeout) - 1))]
    if direct_tls:
        argv.append("-t")
    if chatroom:
        argv.append("-c")
    argv += [*extra_args, recipient]
    return _run_cli(argv, message, timeout)


def sendxmpp(
    *,
    user: str,
    domain: str,
    password: str,
    recipient: str,
    message: str,
    port: int,
    host: str = "127.0.0.1",
    tls: TlsMode = TlsMode.STARTTLS,
    message_type: str | None = None,
    timeout: float = 30.0,
    extra_args: Sequence[str] = (),
) -> CliResult:
    """Send ``message`` with sendxmpp (Perl, Net::XMPP), skipping certificate verification.

    ``TlsMode.STARTTLS`` is ``-t``, ``TlsMode.DIRECT`` is ``-e`` (legacy SSL) and
    ``TlsMode.PLAIN`` sends no TLS option, so PLAIN auth crosses the wire unencrypted.
    """
    binary = require_binary("sendxmpp")
    argv = [binary, "-j", f"{host}:{port}", "-o", domain, "-u", user, "-p", password]
    if tls is TlsMode.STARTTLS:
        argv += ["-t", "-n"]
    elif tls is TlsMode.DIRECT:
        argv += ["-e", "-n"]
    if message_type is not None:
        argv += ["--message-type", message_type]
    argv += [*extra_args, recipient]
    return _run_cli(argv, message, timeout)
