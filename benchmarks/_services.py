"""Processes the transport benchmark starts: a throwaway Prosody and `stanzaguard run`.

Self-contained on purpose (no pytest, no test fixtures): the benchmark config differs from the
test config (no MAM, no PEP, nothing that writes to disk per message), and benchmarks must run
where the test tree is not importable. Every process is started with its own PID (no wrapper
such as runuser, which would hold the PID and SIGKILL its child after two seconds) and stopped
by that PID.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
# On PYTHONPATH, makes a Python load our modules from source (see its sitecustomize.py).
PURE_PYTHON = Path(__file__).resolve().parent / "pure_python"
PROSODY_MODULES = ("roster", "saslauth", "tls", "disco", "ping", "offline", "carbons", "smacks")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}):\n{_tail(log)}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {LOOPBACK}:{port} after {timeout}s:\n{_tail(log)}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def stop_pid(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """SIGTERM the process by its PID, SIGKILL it after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


# -- /proc readings -------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``, in seconds."""
    return sum(_split_of(f"/proc/{pid}/stat"))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of every thread of ``pid``."""
    return _split_of(f"/proc/{pid}/stat")


def main_thread_cpu(pid: int) -> float:
    """utime + stime of ``pid``'s main thread alone (where asyncio's loop runs), in seconds."""
    return sum(_split_of(f"/proc/{pid}/task/{pid}/stat"))


def _split_of(path: str) -> tuple[float, float]:
    with open(path, "rb") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# -- certificates ---------------------------------------------------------------------------


def make_cert(directory: Path, domain: str) -> tuple[Path, Path]:
    from stanzaguard.tls import write_dev_cert

    return write_dev_cert(domain, directory, datetime.now(UTC))


# -- Prosody --------------------------------------------------------------------------------


def _lua(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Prosody:
    directory: Path
    cert: Path
    key: Path
    domain: str = "localhost"
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.port = free_port()
        self.config_path = self.directory / "prosody.cfg.lua"
        self.log_path = self.directory / "prosody.log"
        self.console_path = self.directory / "prosody.console.log"
        self.data_dir = self.directory / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.prosody = shutil.which("prosody") or "/usr/bin/prosody"
        self.prosodyctl = shutil.which("prosodyctl") or "/usr/bin/prosodyctl"
        try:
            pwd.getpwnam("prosody")
            self.user: str | None = "prosody" if os.geteuid() == 0 else None
        except KeyError:
            self.user = None
        self.config_path.write_text(self.render())

    def render(self) -> str:
        modules = "{ " + "; ".join(_lua(m) for m in PROSODY_MODULES) + " }"
        ssl = f"{{ certificate = {_lua(str(self.cert))}; key = {_lua(str(self.key))} }}"
        return "\n".join(
            [
                "-- StanzaGuard transport benchmark; not a production config.",
                f"pidfile = {_lua(str(self.directory / 'prosody.pid'))}",
                f"data_path = {_lua(str(self.data_dir))}",
                "daemonize = false",
                f"run_as_root = {'false' if self.user else 'true'}",
                f"log = {{ {self.log_level} = {_lua(str(self.log_path))} }}",
                f"c2s_ports = {{ {self.port} }}",
                f"c2s_interfaces = {{ {_lua(LOOPBACK)} }}",
                "s2s_ports = { }",
                "component_ports = { }",
                "http_ports = { }",
                "https_ports = { }",
                "c2s_require_encryption = false",
                "allow_unencrypted_plain_auth = true",
                'authentication = "internal_hashed"',
                "network_settings = { nagle = false }",
                # mod_limits is not loaded (Debian's default config loads it with 10kb/s, about
                # 60 one-line messages/s); the limit is raised too, in case somebody loads it.
                'limits = { c2s = { rate = "100mb/s" } }',
                f"modules_enabled = {modules}",
                f"ssl = {ssl}",
                f"VirtualHost {_lua(self.domain)}",
                f"    ssl = {ssl}",
                "",
            ]
        )

    def _chown(self) -> None:
        if self.user is None:
            return
        entry = pwd.getpwnam(self.user)
        for root, dirs, files in os.walk(self.directory):
            os.chown(root, entry.pw_uid, entry.pw_gid)
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)

    def _as_user(self) -> dict[str, object]:
        if self.user is None:
            return {}
        return {"user": self.user, "group": self.user, "extra_groups": []}

    def register(self, user: str, password: str) -> None:
        self._chown()
        result = subprocess.run(
            [
                self.prosodyctl,
                "--config",
                str(self.config_path),
                "register",
                user,
                self.domain,
                password,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.directory,
            check=False,
            **self._as_user(),  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            raise RuntimeError(f"prosodyctl register {user}: {result.stdout}{result.stderr}")

    def start(self) -> None:
        self._chown()
        with self.console_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.prosody, "--config", str(self.config_path), "-F"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
                **self._as_user(),  # type: ignore[arg-type]
            )
        wait_for_port(self.port, self.proc, 20.0, self.console_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def version(self) -> str:
        try:
            out = subprocess.run(
                [self.prosodyctl, "about"], capture_output=True, text=True, timeout=20, check=False
            ).stdout
        except OSError:
            return "unknown"
        for line in out.splitlines():
            if line.startswith("Prosody "):
                return line.strip()
        return "unknown"

    def stop(self) -> None:
        stop_pid(self.proc)


# -- the proxy ------------------------------------------------------------------------------


@dataclass
class Proxy:
    directory: Path
    upstream_port: int
    cert: Path
    key: Path
    domain: str = "localhost"
    name: str = "proxy"
    kind: str = "passthrough"  # or "service": the full `stanzaguard run`
    ssl_buffer_kib: int = 0  # passthrough only: experiment with asyncio's TLS read buffer
    cprofile: str = ""  # passthrough only: cProfile (CPU time) stats file written on exit
    pure: bool = False  # run from the .py sources even where compiled modules exist
    event_loop: str = "uvloop"  # the event_loop setting: "uvloop" or "asyncio"

    def __post_init__(self) -> None:
        self.port = free_port()
        self.tls_port = free_port()
        self.log_path = self.directory / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        common = [
            "--domain",
            self.domain,
            "--upstream",
            f"{LOOPBACK}:{self.upstream_port}",
            "--cert",
            str(self.cert),
            "--key",
            str(self.key),
            "--listen",
            f"{LOOPBACK}:{self.port}",
            "--listen-tls",
            f"{LOOPBACK}:{self.tls_port}",
        ]
        if self.kind == "passthrough":
            runner = Path(__file__).resolve().parent / "_passthrough_proxy.py"
            extra = ["--ssl-buffer-kib", str(self.ssl_buffer_kib)] if self.ssl_buffer_kib else []
            if self.cprofile:
                extra += ["--cprofile", self.cprofile]
            return [sys.executable, str(runner), *common, *extra]
        exe = Path(sys.executable).parent / "stanzaguard"
        return [str(exe), "run", *common, "--data-dir", str(self.directory / f"{self.name}-data")]

    def start(self) -> None:
        env = dict(os.environ)
        env.setdefault("STANZAGUARD_LOG_LEVEL", "info")
        env["PYTHONPATH"] = str(REPO)
        env["STANZAGUARD_EVENT_LOOP"] = self.event_loop
        if self.pure:
            env["PYTHONPATH"] = f"{PURE_PYTHON}{os.pathsep}{REPO}"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=env,
                start_new_session=True,
            )
        wait_for_port(self.port, self.proc, 30.0, self.log_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_pid(self.proc)


def native_state() -> str:
    """How many of the modules pyproject.toml lists are compiled (`make native`)."""
    with (REPO / "pyproject.toml").open("rb") as file:
        names = tomllib.load(file)["tool"]["stanzaguard"]["native"]["modules"]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    built = [n for n in names if (REPO / (n.replace(".", "/") + suffix)).exists()]
    return f"compiled (mypyc) {len(built)}/{len(names)} hot-path modules"


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (from the first line of /proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (not guest)
    return (total - idle) / _TICK


def own_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of this process (and its reaped children) plus the given PIDs."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


class OtherLoad:
    """How many cores processes other than ours kept busy between start() and stop()."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = self.busy0 = self.own0 = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = system_busy_seconds()
        self.own0 = own_cpu_seconds(self.pids)

    def stop(self) -> float:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        other = (system_busy_seconds() - self.busy0) - (own_cpu_seconds(self.pids) - self.own0)
        return max(other, 0.0) / elapsed


def wait_quiet(pids: list[int], threshold: float, timeout: float, window: float = 2.0) -> float:
    """Wait (at most ``timeout`` s) until others use < ``threshold`` cores over ``window`` s.

    Returns the last measured load of other processes; the machine may be shared.
    """
    deadline = time.monotonic() + timeout
    load = OtherLoad(pids)
    while True:
        load.start()
        time.sleep(window)
        other = load.stop()
        if other < threshold or time.monotonic() >= deadline:
            return other
