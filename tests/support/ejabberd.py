"""A throwaway ejabberd (Debian package) on free loopback ports, as a second upstream.

Facts this module relies on (ejabberd 23.01 and Erlang/OTP 25 on Debian 12):

- ``ejabberdctl`` is a bash wrapper that ``su``s to the ``ejabberd`` user and reads
  ``/etc/ejabberd/ejabberdctl.cfg``; we bypass it and run ``erl ... -s ejabberd`` ourselves,
  with ``ERL_LIBS`` pointing at the directory that holds ``ejabberd-23.01/`` (on amd64
  ``/usr/lib/x86_64-linux-gnu``). ``erl`` is a shell script that ``exec``s ``erlexec``, which
  ``exec``s ``beam.smp``: the PID we start is the VM's own, so we stop it by PID (SIGTERM
  makes OTP run ``init:stop()``, a clean shutdown in one to three seconds).
- Without ``-sname``/``-name`` the node is ``nonode@nohost``: no Erlang distribution, so no
  ``epmd`` daemon outlives the test, no cookie, and no node-name clash between parallel
  instances. Mnesia works the same in a non-distributed node; its directory is ours.
- Accounts are created, and offline queues counted, through ``mod_http_api`` on a loopback
  HTTP listener (``api_permissions`` grant every command to 127.0.0.1 only): one HTTP request
  instead of starting a second Erlang VM for each ``ejabberdctl register``.
- ``auth_password_format: plain`` keeps the password, so PLAIN, SCRAM-SHA-1, SCRAM-SHA-256
  and SCRAM-SHA-512 are all offered (with ``scram`` only the configured hash's SCRAM is). The
  ``-PLUS`` variants appear only on TLS.
- ``mod_stream_mgmt`` sends ``<r/>`` after stanzas whenever no ack request is outstanding,
  follows ``<resumed/>`` with ``<r/>``, and closes the stream with ``undefined-condition``
  ("Client acknowledged more stanzas than sent by server") when an ``<a h/>`` exceeds what it
  sent; it logs that as "... acknowledged N stanzas, but only M were sent".
- The config file is JSON, which YAML 1.2 (ejabberd's ``fast_yaml``) reads as flow style:
  rendering through :func:`json.dumps` quotes every path and name correctly.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.certs import TlsPair, make_self_signed
from tests.support.localserver import LOOPBACK, LocalXmppServer
from tests.support.services import (
    ManagedProcess,
    ProcessExitedError,
    claim_directory,
    free_port,
    reap_abandoned,
    record_server_pid,
    require_binary,
    service_unavailable,
    start_process,
    wait_for_port,
)

DIRECTORY_PREFIX = "sg-ejabberd-"
EJABBERD_USER = "ejabberd"
#: What ejabberd logs when it has started every host and module (ejabberd_app:start/2).
STARTED_LOG = "is started in the node"
#: ejabberd's warning when a client's ``<a h/>`` is larger than what the server sent.
ACK_MISMATCH_LOG = "were sent"
#: Debian installs the OTP applications of ejabberd (and its deps) under /usr/lib/<triplet>/.
EJABBERD_APP_GLOB = "/usr/lib/*/ejabberd-*/ebin/ejabberd.app"


class EjabberdError(RuntimeError):
    """ejabberd did not start, or refused an admin command."""


@dataclass(frozen=True)
class EjabberdConfig:
    """What shapes one server's ``ejabberd.yml``; ``extra_modules`` merge into ``modules``.

    ``components`` maps an XEP-0114 component's domain to its secret (an ``ejabberd_service``
    listener on loopback); ``service_log_to`` lists the domains ``mod_service_log`` sends a
    copy of every stanza to (StanzaGuard's component mode, docs/integrations/ejabberd.md).
    """

    domain: str = "localhost"
    log_level: str = "info"
    extra_modules: Mapping[str, Any] | None = None
    components: Mapping[str, str] = field(default_factory=dict)
    service_log_to: tuple[str, ...] = ()


def erlang_libs_dir() -> str:
    """The directory to put in ``ERL_LIBS`` so ``-s ejabberd`` finds the application."""
    found = sorted(glob.glob(EJABBERD_APP_GLOB))
    if not found:
        service_unavailable("ejabberd is not installed (see scripts/install-deps.sh)")
    return str(Path(found[-1]).parent.parent.parent)


def listener_port(host: str = LOOPBACK) -> int:
    """A free port below the kernel's ephemeral range, else any free port.

    ejabberd binds seconds after it was told the port; an outgoing connection of any other
    process gets its local port from the ephemeral range and, in that window, could take a
    port that ``free_port`` handed out. Ports below the range are never picked that way.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return free_port(host)
    rng = random.Random()
    for _ in range(50):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)


def erlang_string(value: str) -> str:
    """``value`` as an Erlang string literal (for ``-mnesia dir "..."`` on the command line)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EjabberdServer(LocalXmppServer):
    """One ejabberd VM with its config, Mnesia data and logs in ``directory``.

    Same surface as ``ProsodyServer`` where the proxy fixtures and the scenarios run on both
    servers need it (``tests/support/upstream.py``), plus the HTTP admin API.
    """

    #: SIGTERM makes OTP run ``init:stop()``, which takes a few seconds.
    stop_grace = 15.0

    def __init__(self, directory: Path, config: EjabberdConfig | None = None) -> None:
        self.directory = directory
        self.config = config or EjabberdConfig()
        self.domain = self.config.domain
        self.muc_domain = f"conference.{self.domain}"
        self.config_path = directory / "ejabberd.yml"
        self.mnesia_dir = directory / "mnesia"
        self.log_path = directory / "ejabberd.log"
        self.console_log_path = directory / "console.log"
        self._choose_ports()
        self.tls: TlsPair = make_self_signed(
            directory / "certs", self.domain, extra_names=(self.muc_domain,)
        )
        # ejabberd wants certificate and key in one PEM file.
        self.pem_path = directory / "certs" / "server.pem"
        self.pem_path.write_bytes(self.tls.cert.read_bytes() + self.tls.key.read_bytes())
        self.users: dict[str, str] = {}
        self._process: ManagedProcess | None = None
        self._erl = require_binary("erl")
        self._erl_libs = erlang_libs_dir()
        self._run_user = _run_user()
        self.mnesia_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config())

    # -- config ---------------------------------------------------------------------------

    def config_data(self) -> dict[str, Any]:
        modules: dict[str, Any] = {
            "mod_http_api": {},
            "mod_admin_extra": {},
            "mod_roster": {},
            "mod_disco": {},
            "mod_ping": {},
            "mod_carboncopy": {},
            "mod_offline": {},
            "mod_stream_mgmt": {},
            "mod_blocking": {},
            "mod_privacy": {},
            "mod_muc": {"host": f"conference.{self.domain}", "access_create": "all"},
            # Archive every message, like the Prosody fixture's default_archive_policy.
            "mod_mam": {"default": "always"},
        }
        if self.config.service_log_to:
            modules["mod_service_log"] = {"loggers": list(self.config.service_log_to)}
        modules.update(self.config.extra_modules or {})
        listeners = self._listeners()
        return {
            "loglevel": self.config.log_level,
            "log_rotate_count": 0,
            "hosts": [self.domain],
            "certfiles": [str(self.pem_path)],
            "auth_method": "internal",
            "auth_password_format": "plain",
            "disable_sasl_mechanisms": ["digest-md5", "x-oauth2"],
            "listen": listeners,
            "api_permissions": {
                "loopback admin": {"who": {"ip": "127.0.0.1/8"}, "what": ["*"]},
            },
            "shaper_rules": {"max_user_sessions": 10, "max_user_offline_messages": 1000},
            "modules": modules,
        }

    def _listeners(self) -> list[dict[str, Any]]:
        listeners: list[dict[str, Any]] = [
            {
                # The proxy's upstream: plain TCP on loopback; STARTTLS offered, not
                # required (the proxy strips the offer; sendxmpp may use it directly).
                "port": self.c2s_port,
                "ip": LOOPBACK,
                "module": "ejabberd_c2s",
                "starttls": True,
                "starttls_required": False,
                "max_stanza_size": 262144,
            },
            {
                "port": self.c2s_direct_tls_port,
                "ip": LOOPBACK,
                "module": "ejabberd_c2s",
                "tls": True,
                "max_stanza_size": 262144,
            },
            {
                "port": self.http_port,
                "ip": LOOPBACK,
                "module": "ejabberd_http",
                "request_handlers": {"/api": "mod_http_api"},
            },
        ]
        if self.config.components:
            listeners.append(
                {
                    "port": self.component_port,
                    "ip": LOOPBACK,
                    "module": "ejabberd_service",
                    "hosts": {
                        domain: {"password": secret}
                        for domain, secret in self.config.components.items()
                    },
                }
            )
        return listeners

    def _choose_ports(self) -> None:
        self.c2s_port = listener_port()
        self.c2s_direct_tls_port = listener_port()
        self.http_port = listener_port()
        self.component_port = listener_port()

    def render_config(self) -> str:
        header = "# Written by tests/support/ejabberd.py for one test module; JSON is YAML.\n"
        return header + json.dumps(self.config_data(), indent=2) + "\n"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Start the VM and wait until ejabberd says it is up.

        ejabberd binds its listeners seconds after the VM starts; should another process
        have taken one of the ports meanwhile (``eaddrinuse``), it is started again on fresh
        ports, up to ``attempts`` times.
        """
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout)
                return
            except EjabberdError as exc:
                if attempt == attempts or "eaddrinuse" not in str(exc):
                    raise
                self._choose_ports()
                self.config_path.write_text(self.render_config())
                self.log_path.unlink(missing_ok=True)

    def _start_once(self, timeout: float) -> None:
        if self.running:
            return
        self._hand_over_directory()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.directory),
            "LANG": "C.UTF-8",
            "ERL_LIBS": self._erl_libs,
            "EJABBERD_CONFIG_PATH": str(self.config_path),
            "EJABBERD_LOG_PATH": str(self.log_path),
            "ERL_CRASH_DUMP": str(self.directory / "erl_crash.dump"),
            "ERL_CRASH_DUMP_BYTES": "0",
        }
        argv = [
            self._erl,
            "-noinput",
            "-noshell",
            # The directory in the command line also lets reap_abandoned recognise the VM.
            "-mnesia",
            "dir",
            erlang_string(str(self.mnesia_dir)),
            "-s",
            "ejabberd",
        ]
        self._process = start_process(
            argv,
            log_path=self.console_log_path,
            cwd=self.directory,
            env=env,
            user=self._run_user,
            group=self._run_user,
        )
        record_server_pid(self.directory, self._process.pid)
        deadline = time.monotonic() + timeout
        try:
            ports = [self.c2s_port, self.c2s_direct_tls_port, self.http_port]
            if self.config.components:
                ports.append(self.component_port)
            for port in ports:
                wait_for_port(self.host, port, timeout, process=self._process.popen)
            # A listening socket is not readiness: ejabberd binds its ports while Mnesia is
            # still creating tables and accepts only later; the connections wait in the
            # backlog meanwhile. Stopping it in that window crashes Mnesia. The last line of
            # ejabberd_app:start/2 is the signal that it is up.
            while STARTED_LOG not in self.log_text():
                if not self._process.running:
                    raise ProcessExitedError(f"ejabberd exited with {self._process.popen.poll()}")
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no {STARTED_LOG!r} in the log after {timeout}s")
                time.sleep(0.05)
        except (TimeoutError, ProcessExitedError) as exc:
            self.stop()
            raise EjabberdError(f"ejabberd did not start: {exc}\n{self.diagnostics()}") from exc

    def diagnostic_logs(self) -> tuple[Path, ...]:
        return (*super().diagnostic_logs(), self.directory / "error.log")

    def ack_complaints(self, users: Iterable[str]) -> list[str]:
        """Lines where ejabberd logged that one of ``users`` acknowledged too many stanzas.

        The line names the session's JID, so tests sharing the server see only their own.
        """
        prefixes = tuple(f"{user}@{self.domain}" for user in users)
        return [
            line
            for line in self.log_text().splitlines()
            if ACK_MISMATCH_LOG in line and any(prefix in line for prefix in prefixes)
        ]

    # -- admin API -------------------------------------------------------------------------

    def api(self, command: str, arguments: Mapping[str, object], timeout: float = 30.0) -> Any:
        """Run one ``mod_http_api`` command; its decoded JSON result."""
        url = f"http://{self.host}:{self.http_port}/api/{command}"
        try:
            response = httpx.post(url, json=dict(arguments), timeout=timeout)
        except httpx.HTTPError as exc:
            raise EjabberdError(f"ejabberd API {command} unreachable: {exc}") from exc
        if response.status_code != 200:
            raise EjabberdError(
                f"ejabberd API {command} failed ({response.status_code}): {response.text}"
            )
        body = response.content
        return json.loads(body) if body else None

    # -- accounts --------------------------------------------------------------------------

    def register(self, user: str, password: str) -> None:
        """Create ``user`` (the server must be running)."""
        self.api("register", {"user": user, "host": self.domain, "password": password})
        self.users[user] = password

    def offline_count(self, user: str) -> int:
        """How many messages ``mod_offline`` holds for ``user``."""
        result = self.api("get_offline_count", {"user": user, "server": self.domain})
        value = result.get("value") if isinstance(result, dict) else result
        if not isinstance(value, int):
            raise EjabberdError(f"unexpected get_offline_count result: {result!r}")
        return value


def _run_user() -> str | None:
    """As root, run as Debian's ``ejabberd`` user (if it exists); otherwise as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(EJABBERD_USER)
    except KeyError:
        return None
    return EJABBERD_USER


def make_ejabberd(
    config: EjabberdConfig | None = None,
    *,
    users: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    start: bool = True,
) -> EjabberdServer:
    """Write a config into a fresh directory, start the server and register ``users``.

    The caller owns the server: call ``cleanup()``. A directory left by a test run that died
    without teardown is reaped first (its VM stopped by PID).
    """
    require_binary("erl")
    erlang_libs_dir()
    reap_abandoned(base_dir or Path(tempfile.gettempdir()), DIRECTORY_PREFIX)
    directory = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir=base_dir))
    # mkdtemp gives 0700; the ejabberd user needs to traverse into it.
    directory.chmod(0o755)
    claim_directory(directory)
    server: EjabberdServer | None = None
    try:
        server = EjabberdServer(directory, config)
        if start:
            server.start()
            if users:
                server.register_many(users)
    except BaseException:
        if server is not None:
            server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return server
