"""The `event_loop` setting: uvloop by default, the standard loop on request, both for real."""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import pytest

from stanzaguard.errors import StanzaGuardError
from stanzaguard.event_loop import loop_factory, run_on, running_loop_name
from stanzaguard.settings import Settings
from tests.conftest import ProsodyFactory
from tests.stanzaguard.conftest import StanzaguardRun, run_cli
from tests.support.rawxmpp import RawXmppClient


async def _loop_module() -> str:
    return running_loop_name()


async def test_the_suite_runs_on_the_loop_the_services_default_to() -> None:
    # The proxy under test shares this loop, so this is what the e2e tests exercised.
    wanted = os.environ.get("STANZAGUARD_EVENT_LOOP", Settings.model_fields["event_loop"].default)
    assert await _loop_module() == wanted


def test_run_on_gives_each_named_loop() -> None:
    assert run_on("uvloop", _loop_module()) == "uvloop"
    assert run_on("asyncio", _loop_module()) == "asyncio"


def test_run_on_passes_the_coroutines_exception_through() -> None:
    async def fails() -> None:
        raise LookupError("inside")

    with pytest.raises(LookupError, match="inside"):
        run_on("uvloop", fails())


def test_a_missing_uvloop_is_a_clear_error_and_the_coroutine_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError
    with pytest.raises(StanzaGuardError, match="uvloop is not installed"):
        loop_factory("uvloop")
    main = _loop_module()
    with pytest.raises(StanzaGuardError, match="event_loop = 'asyncio'"):
        run_on("uvloop", main)
    assert inspect.getcoroutinestate(main) == inspect.CORO_CLOSED  # no "never awaited" later


@pytest.mark.parametrize("source", ["config", "environment"])
def test_an_unknown_loop_is_refused_by_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    config = tmp_path / "stanzaguard.toml"
    if source == "config":
        config.write_text('event_loop = "trio"\n')
        # The suite's own choice is passed on to commands and would win over the file.
        monkeypatch.delenv("STANZAGUARD_EVENT_LOOP", raising=False)
    else:
        config.write_text("")
        monkeypatch.setenv("STANZAGUARD_EVENT_LOOP", "trio")
    result = run_cli("run", "--config", str(config), "--data-dir", str(tmp_path), timeout=30)
    assert result.returncode != 0
    assert "event_loop" in result.stdout + result.stderr


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_the_proxy_forwards_on_either_loop(
    prosody_factory: ProsodyFactory, tmp_path: Path, loop: str
) -> None:
    prosody = prosody_factory()
    data_dir = tmp_path / "data"
    log = tmp_path / "stanzaguard.log"
    run = StanzaguardRun.start(
        prosody,
        data_dir,
        log_path=log,
        env={"STANZAGUARD_EVENT_LOOP": loop, "STANZAGUARD_LOG_FORMAT": "json"},
    )
    clients: list[RawXmppClient] = []
    try:
        for user in ("bob", "alice"):
            client = RawXmppClient(run.host, run.port, prosody.domain)
            clients.append(client)
            await client.login(user, prosody.users[user], resource="loop")
            await client.presence()
        receiver, sender = clients
        sender.send_message(receiver.jid or "", f"over {loop}", id="on-the-loop")
        await receiver.wait_for(lambda e: e.get("id") == "on-the-loop", timeout=10)
        for client in clients:
            await client.close()
        assert run.stop() == 0, run.log_tail()
    finally:
        for client in clients:
            client.abort()
        if run.running:
            run.stop()
    started = [
        json.loads(line)
        for line in log.read_text().splitlines()
        if line.startswith("{") and '"proxy listening"' in line
    ]
    assert [entry["event_loop"] for entry in started] == [loop]
