"""A throwaway Prosody (Debian package) per test, on free loopback ports.

Facts this module relies on (Prosody 0.12.3 and prosody-modules 0.0~hg20230223 on Debian 12):

- ``mod_smacks``, ``mod_mam``, ``mod_pubsub``, ``mod_muc_mam`` and ``mod_blocklist`` ship with
  ``prosody`` itself in /usr/lib/prosody/modules; ``prosody-modules`` installs into the same
  directory (e.g. ``mod_firewall``), so no ``plugin_paths`` is needed for either.
- ``internal_hashed`` stores SCRAM keys for exactly one hash, chosen by ``password_hash``
  (default ``"SHA-1"``): it offers PLAIN plus SCRAM-SHA-1, or PLAIN plus SCRAM-SHA-256 with
  ``password_hash = "SHA-256"``, never both SCRAMs. ``internal_plain`` keeps the password and
  offers PLAIN, SCRAM-SHA-1 and SCRAM-SHA-256. The ``-PLUS`` variants appear only on TLS.
- Direct TLS: ``c2s_direct_tls_ports`` (``legacy_ssl_ports`` is the deprecated alias). The
  port's own TLS context comes from the global ``ssl`` option, SNI contexts from the hosts.
- ``mod_limits`` is only active when listed in ``modules_enabled``; Debian's default config
  lists it with ``limits = { c2s = { rate = "10kb/s" } }``. This config does not load it and
  also raises the limit, so a test that adds ``limits`` still gets no throttling by accident.
- As root, Prosody refuses to run unless ``run_as_root = true``; we run it as the ``prosody``
  user instead. Offline messages are in ``DATA/<host>/offline/<user>.list`` (see
  :meth:`ProsodyServer.offline_messages`), where host and user are percent-encoded by
  ``util.datamanager`` (every non-alphanumeric byte becomes ``%xx``, so ``localhost`` stays and
  ``conference.localhost`` becomes ``conference%2elocalhost``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.certs import TlsPair, make_self_signed
from tests.support.localserver import LOOPBACK as LOOPBACK  # re-exported
from tests.support.localserver import LocalXmppServer
from tests.support.luadata import LuaTable, parse_item_list, stanza_to_element
from tests.support.services import (
    ManagedProcess,
    ProcessExitedError,
    claim_directory,
    free_port,
    reap_abandoned,
    record_server_pid,
    require_binary,
    start_process,
    wait_for_port,
)

DIRECTORY_PREFIX = "sg-prosody-"
PROSODY_USER = "prosody"
#: What mod_smacks logs when a client's ``<a h/>`` does not match what the server sent.
ACK_MISMATCH_LOGS = (
    "acknowledged more stanzas",
    "The client says it handled",
    "acknowledged less stanzas",
)

#: The accounts the ``prosody`` fixture registers. Passwords differ per user on purpose, so a
#: client that sends the wrong user's password fails instead of passing by accident.
DEFAULT_USERS: dict[str, str] = {
    "alice": "alice-secret",
    "bob": "bob-secret",
    "carol": "carol-secret",
}

#: Modules every test server loads. ``offline``, ``c2s``, ``s2s`` and ``posix`` are loaded by
#: Prosody itself. ``pep`` backs per-user pubsub (and bookmarks); ``blocklist`` is XEP-0191.
BASE_MODULES: tuple[str, ...] = (
    "roster",
    "saslauth",
    "tls",
    "disco",
    "ping",
    "carbons",
    "smacks",
    "blocklist",
    "mam",
    "pep",
    "private",
    "version",
    "time",
)


def lua_string(value: str) -> str:
    """Quote ``value`` as a Lua string literal for the config file."""
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\0", "\\0")
    )
    return f'"{escaped}"'


def lua_list(values: Iterable[str | int]) -> str:
    items = [lua_string(v) if isinstance(v, str) else str(v) for v in values]
    return "{ " + "; ".join(items) + (" }" if items else "}")


def encode_path_part(value: str) -> str:
    """Prosody's ``util.datamanager`` encoding of a host or user name in a data path.

    Lua's ``%W`` class in the C locale: every byte but ASCII letters and digits is ``%xx``.
    """
    return "".join(
        chr(b) if chr(b).isascii() and chr(b).isalnum() else f"%{b:02x}" for b in value.encode()
    )


@dataclass(frozen=True)
class OfflineMessage:
    """One stanza from Prosody's offline store, as Prosody saved it."""

    sender: str
    to: str
    type: str
    id: str
    body: str | None
    when: int | float | None
    element: ET.Element = field(compare=False, repr=False)

    @property
    def xml(self) -> str:
        return ET.tostring(self.element, encoding="unicode")


class ProsodyShellUnavailable(RuntimeError):
    """``prosodyctl shell`` could not reach the server's console socket."""


@dataclass(frozen=True)
class ProsodyConfig:
    """Everything that shapes one server's config file.

    ``extra_global`` is inserted among the global options (before any host), ``extra_host`` at
    the end of the ``VirtualHost`` block, and ``extra_config`` at the very end of the file, so
    it must open its own ``VirtualHost``/``Component`` section if it has any host options.
    ``components`` maps an external component's domain to its secret (XEP-0114).
    """

    domain: str = "localhost"
    extra_modules: tuple[str, ...] = ()
    extra_global: str = ""
    extra_host: str = ""
    extra_config: str = ""
    components: Mapping[str, str] = field(default_factory=dict)
    plugin_paths: tuple[str, ...] = ()
    password_hash: str = "SHA-1"
    authentication: str = "internal_hashed"
    log_level: str = "info"
    direct_tls: bool = True
    #: A mod_firewall script (prosody-modules): written beside the config and loaded with
    #: ``firewall`` on every VirtualHost (``firewall_scripts``).
    firewall_script: str = ""


class ProsodyServer(LocalXmppServer):
    """One Prosody process with its config, data and log in ``directory``.

    Create it with :func:`make_prosody` (or the ``prosody``/``prosody_factory`` fixtures),
    which also starts it. All ports listen on 127.0.0.1 only.
    """

    def __init__(
        self, directory: Path, config: ProsodyConfig, *, tls: TlsPair | None = None
    ) -> None:
        self.directory = directory
        self.config = config
        self.domain = config.domain
        self.muc_domain = f"conference.{config.domain}"
        self.pubsub_domain = f"pubsub.{config.domain}"
        self.data_dir = directory / "data"
        self.config_path = directory / "prosody.cfg.lua"
        self.log_path = directory / "prosody.log"
        self.console_log_path = directory / "console.log"
        self.pidfile = directory / "prosody.pid"
        self.firewall_path = directory / "firewall.pfw"
        self.c2s_port = free_port()
        self.c2s_direct_tls_port: int | None = free_port() if config.direct_tls else None
        self.component_port = free_port()
        if tls is None:
            tls = make_self_signed(
                directory / "certs",
                config.domain,
                extra_names=(self.muc_domain, self.pubsub_domain),
            )
        else:
            # Copy: the caller's files may sit where the prosody user cannot read them
            # (pytest's tmp_path is under a 0700 directory when running as root).
            (directory / "certs").mkdir(exist_ok=True)
            cert, key = directory / "certs" / "server.crt", directory / "certs" / "server.key"
            shutil.copyfile(tls.cert, cert)
            shutil.copyfile(tls.key, key)
            tls = TlsPair(cert=cert, key=key, domain=tls.domain)
        self.tls = tls
        self.users: dict[str, str] = {}
        self._process: ManagedProcess | None = None
        self._prosody = require_binary("prosody")
        self._prosodyctl = require_binary("prosodyctl")
        self._run_user, self._run_as_root = _identity()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config())

    # -- config ---------------------------------------------------------------------------

    def render_config(self) -> str:
        cfg = self.config
        firewall = ("firewall",) if cfg.firewall_script else ()
        modules = list(dict.fromkeys((*BASE_MODULES, *cfg.extra_modules, *firewall)))
        lines = [
            "-- Written by tests/support/prosody.py for one test; not a production config.",
            f"pidfile = {lua_string(str(self.pidfile))}",
            f"data_path = {lua_string(str(self.data_dir))}",
            "daemonize = false",
            f"run_as_root = {'true' if self._run_as_root else 'false'}",
            f"log = {{ {cfg.log_level} = {lua_string(str(self.log_path))} }}",
            "",
            f"c2s_ports = {lua_list([self.c2s_port])}",
            f"c2s_interfaces = {lua_list([LOOPBACK])}",
            f"component_ports = {lua_list([self.component_port])}",
            f"component_interfaces = {lua_list([LOOPBACK])}",
            "s2s_ports = {}",
            "http_ports = {}",
            "https_ports = {}",
        ]
        if self.c2s_direct_tls_port is not None:
            lines += [
                f"c2s_direct_tls_ports = {lua_list([self.c2s_direct_tls_port])}",
                f"c2s_direct_tls_interfaces = {lua_list([LOOPBACK])}",
            ]
        ssl = (
            f"{{ certificate = {lua_string(str(self.tls.cert))}; "
            f"key = {lua_string(str(self.tls.key))} }}"
        )
        lines += [
            # Global ssl: the direct-TLS port's own context is built from it.
            f"ssl = {ssl}",
            "",
            # The proxy's upstream leg is plain TCP on loopback (see DESIGN.md), and sendxmpp
            # without -t logs in without TLS: both need plaintext auth allowed.
            "c2s_require_encryption = false",
            "allow_unencrypted_plain_auth = true",
            "s2s_require_encryption = false",
            f"authentication = {lua_string(cfg.authentication)}",
            f"password_hash = {lua_string(cfg.password_hash)}",
            # Nagle adds 20-40 ms tails to small writes; the c2s limit throttles to ~60 msg/s.
            "network_settings = { nagle = false }",
            'limits = { c2s = { rate = "100mb/s" }; s2sin = { rate = "100mb/s" } }',
            "",
            # Archive everything by default, so MAM has history without per-user prefs.
            "default_archive_policy = true",
            'archive_expires_after = "1w"',
            "max_archive_query_results = 250",
            "",
            f"modules_enabled = {lua_list(modules)}",
        ]
        if cfg.plugin_paths:
            lines.append(f"plugin_paths = {lua_list(cfg.plugin_paths)}")
        if cfg.firewall_script:
            self.firewall_path.write_text(cfg.firewall_script)
            lines.append(f"firewall_scripts = {lua_list([str(self.firewall_path)])}")
        if cfg.extra_global:
            lines += ["", "-- extra global options", cfg.extra_global]
        lines += [
            "",
            f"VirtualHost {lua_string(self.domain)}",
            f"    ssl = {ssl}",
        ]
        if cfg.extra_host:
            lines += ["    -- extra host options", cfg.extra_host]
        lines += [
            "",
            f'Component {lua_string(self.muc_domain)} "muc"',
            '    modules_enabled = { "muc_mam" }',
            # Prosody 0.12 locks a new room until its owner submits the configuration form;
            # others who join meanwhile get an error. Tests want a joinable room at once.
            "    muc_room_locking = false",
            "    muc_room_default_persistent = false",
            "    muc_room_default_public = true",
            "",
            f'Component {lua_string(self.pubsub_domain)} "pubsub"',
        ]
        for component, secret in cfg.components.items():
            lines += [
                "",
                f"Component {lua_string(component)}",
                f"    component_secret = {lua_string(secret)}",
            ]
        if cfg.extra_config:
            lines += ["", "-- extra config", cfg.extra_config]
        return "\n".join(lines) + "\n"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        self._hand_over_directory()
        self._process = start_process(
            [self._prosody, "--config", str(self.config_path), "-F"],
            log_path=self.console_log_path,
            cwd=self.directory,
            user=self._run_user,
            group=self._run_user,
        )
        record_server_pid(self.directory, self._process.pid)
        ports = [self.c2s_port]
        if self.c2s_direct_tls_port is not None:
            ports.append(self.c2s_direct_tls_port)
        if self.config.components:
            # mod_component, which owns the port, loads only for an external Component.
            ports.append(self.component_port)
        try:
            # Prosody activates every host before its event loop runs, so once the sockets
            # accept, the hosts are ready to serve what was accepted.
            for port in ports:
                wait_for_port(self.host, port, timeout, process=self._process.popen)
        except (TimeoutError, ProcessExitedError) as exc:
            self.stop()
            raise RuntimeError(f"Prosody did not start: {exc}\n{self.diagnostics()}") from exc

    def ack_complaints(self, users: Iterable[str]) -> list[str]:
        """Lines where mod_smacks logged that a client's ``<a h/>`` did not match.

        mod_smacks names the session, not the account, in these lines, so every complaint
        counts whatever ``users`` says: each test has a Prosody of its own.
        """
        return [
            line
            for line in self.log_text().splitlines()
            if any(marker in line for marker in ACK_MISMATCH_LOGS)
        ]

    # -- accounts --------------------------------------------------------------------------

    def register(self, user: str, password: str) -> None:
        """Create (or re-password) ``user`` with ``prosodyctl register``.

        Works whether or not the server runs: internal storage is read from disk on each login.
        """
        self.register_on_host(self.domain, user, password)
        self.users[user] = password

    def register_on_host(self, host: str, user: str, password: str) -> str:
        """Create ``user@host`` on a ``VirtualHost`` of this server; return the JID.

        A host other than ``domain`` must be declared in the config (e.g. with
        ``extra_config``); its accounts are not in ``users``, which holds the main domain's.
        """
        self._hand_over_directory()
        result = subprocess.run(
            [self._prosodyctl, "--config", str(self.config_path), "register", user, host, password],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.directory,
            user=self._run_user,
            group=self._run_user,
            extra_groups=[] if self._run_user else None,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"prosodyctl register {user} {host} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return f"{user}@{host}"

    # -- console ---------------------------------------------------------------------------

    def shell(self, *command: str, timeout: float = 30.0) -> str:
        """Run one console command on the running server (``prosodyctl shell``); its output.

        ``shell("module", "reload", "muc_rtbl", "rooms.localhost")`` is the console's
        ``module:reload("muc_rtbl", "rooms.localhost")``. The server needs ``admin_shell`` in
        its modules: it opens the console socket (``DATA/prosody.sock``).

        Raises:
            ProsodyShellUnavailable: the console socket cannot be reached.
            RuntimeError: the command failed.
        """
        result = subprocess.run(
            [self._prosodyctl, "--config", str(self.config_path), "shell", *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.directory,
            user=self._run_user,
            group=self._run_user,
            extra_groups=[] if self._run_user else None,
            check=False,
        )
        output = f"{result.stdout}{result.stderr}"
        if "Unable to connect to server" in output or "unix socket support" in output:
            raise ProsodyShellUnavailable(output.strip()[-500:])
        if result.returncode != 0:
            raise RuntimeError(
                f"prosodyctl shell {' '.join(command)} failed ({result.returncode}):\n{output}"
            )
        return result.stdout

    # -- storage ---------------------------------------------------------------------------

    def store_path(self, store: str, user: str, ext: str, host: str | None = None) -> Path:
        host_part = encode_path_part(host or self.domain)
        return self.data_dir / host_part / store / f"{encode_path_part(user)}.{ext}"

    def offline_file(self, user: str) -> Path:
        return self.store_path("offline", user, "list")

    def offline_count(self, user: str) -> int:
        """How many messages Prosody holds for ``user`` while no resource is online."""
        return len(self.offline_messages(user))

    def offline_messages(self, user: str) -> list[OfflineMessage]:
        """Messages Prosody holds for ``user`` while no resource is online, oldest first."""
        try:
            data = self.offline_file(user).read_bytes()
        except FileNotFoundError:
            return []
        return [_offline_message(item) for item in parse_item_list(data)]

    def archive_items(self, user: str) -> list[ET.Element]:
        """The user's MAM archive (``archive`` store) as elements, oldest first."""
        try:
            data = self.store_path("archive", user, "list").read_bytes()
        except FileNotFoundError:
            return []
        return [stanza_to_element(item) for item in parse_item_list(data)]


def _identity() -> tuple[str | None, bool]:
    """(user to run Prosody as, whether it must be told it may run as root)."""
    if os.geteuid() != 0:
        return None, False
    try:
        pwd.getpwnam(PROSODY_USER)
    except KeyError:
        return None, True
    return PROSODY_USER, False


def _offline_message(item: LuaTable) -> OfflineMessage:
    element = stanza_to_element(item)
    # Internal archive storage adds its own ``stamp`` attribute to the stored stanza; it is
    # storage bookkeeping (the same instant as ``when``), not part of what was sent.
    element.attrib.pop("stamp", None)
    body = element.find("{jabber:client}body")
    if body is None:
        body = element.find("body")
    when = item.get("when")
    return OfflineMessage(
        sender=element.get("from", ""),
        to=element.get("to", ""),
        type=element.get("type", "normal"),
        id=element.get("id", ""),
        body=body.text if body is not None else None,
        when=when if isinstance(when, int | float) and not isinstance(when, bool) else None,
        element=element,
    )


def make_prosody(
    config: ProsodyConfig | None = None,
    *,
    users: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    tls: TlsPair | None = None,
    start: bool = True,
) -> ProsodyServer:
    """Write a config into a fresh directory, register ``users`` and start the server.

    The directory is made with ``mkdtemp`` rather than under pytest's ``tmp_path``, because
    pytest makes ``/tmp/pytest-of-root`` mode 0700 and Prosody, running as ``prosody``, could
    not reach it. The caller owns the server: call ``cleanup()`` (the fixtures do).
    """
    reap_abandoned(base_dir or Path(tempfile.gettempdir()), DIRECTORY_PREFIX)
    directory = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir=base_dir))
    # mkdtemp gives 0700; the prosody user needs to traverse into it.
    directory.chmod(0o755)
    claim_directory(directory)
    try:
        server = ProsodyServer(directory, config or ProsodyConfig(), tls=tls)
        if users:
            server.register_many(users)
        if start:
            server.start()
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return server
