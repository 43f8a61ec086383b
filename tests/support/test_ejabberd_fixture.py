"""The ejabberd fixture itself (tests/support/ejabberd.py), straight against ejabberd.

Also the executable record of what Debian's ejabberd 23.01 does with that config: which SASL
mechanisms it offers on the plain loopback port, that the VM we start is the one we stop, and
that it leaves no Erlang port mapper behind.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import ejabberd as ejabberd_module
from tests.support.ejabberd import (
    EjabberdError,
    EjabberdServer,
    erlang_libs_dir,
    erlang_string,
    make_ejabberd,
)
from tests.support.rawxmpp import RawXmppClient
from tests.support.services import REQUIRE_SERVICES_ENV, pid_alive

pytestmark = pytest.mark.integration


def test_erlang_string_escapes_what_would_end_the_literal() -> None:
    assert erlang_string("/tmp/plain") == '"/tmp/plain"'
    assert erlang_string('a"b\\c') == '"a\\"b\\\\c"'


def test_missing_ejabberd_skips_and_fails_when_services_are_required(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ejabberd_module, "EJABBERD_APP_GLOB", str(tmp_path / "none" / "*.app"))
    monkeypatch.delenv(REQUIRE_SERVICES_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="ejabberd is not installed"):
        erlang_libs_dir()
    monkeypatch.setenv(REQUIRE_SERVICES_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="ejabberd is not installed"):
        erlang_libs_dir()


def test_api_errors_are_translated(ejabberd: EjabberdServer) -> None:
    users = ejabberd.register_fresh("taken")
    with pytest.raises(EjabberdError, match="register failed"):
        ejabberd.register(users["taken"], "another-password")
    with pytest.raises(EjabberdError, match="no_such_command"):
        ejabberd.api("no_such_command", {})


async def test_plain_port_offers_every_scram_and_no_plus(ejabberd: EjabberdServer) -> None:
    raw = RawXmppClient(ejabberd.host, ejabberd.c2s_port, ejabberd.domain)
    try:
        await raw.connect()
        await raw.open_stream()
        assert sorted(raw.mechanisms()) == [
            "PLAIN",
            "SCRAM-SHA-1",
            "SCRAM-SHA-256",
            "SCRAM-SHA-512",
        ]
    finally:
        await raw.close()


def test_stop_by_pid_leaves_nothing_running() -> None:
    server = make_ejabberd()
    try:
        pid = server.pid
        assert pid is not None and pid_alive(pid)
        status = server.stop()
        # SIGTERM makes OTP shut down cleanly and exit by itself (no SIGKILL was needed).
        assert status is not None and status >= 0
        assert not pid_alive(pid)
        assert "is stopped in the node" in server.log_text()
        with pytest.raises(EjabberdError, match="unreachable"):
            server.api("status", {}, timeout=2.0)
    finally:
        server.cleanup()
    assert not server.directory.exists()
    # No distribution, so no epmd was started on our behalf.
    epmd = subprocess.run(["pgrep", "-x", "epmd"], capture_output=True, check=False)
    assert epmd.returncode == 1, epmd.stdout
