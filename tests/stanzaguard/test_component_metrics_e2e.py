"""`stanzaguard component` serves its metrics on `metrics_listen` (what the Helm chart probes).

The real command against a real Prosody that declares the component: /metrics answers once
the component has started and says whether its link to the server is up.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import ProsodyFactory
from tests.stanzaguard.test_component_e2e import COMPONENT, SECRET, component_config
from tests.support.prosody import ProsodyServer
from tests.support.proxy import stanzaguard_command
from tests.support.services import free_port, start_process

pytestmark = pytest.mark.integration

TIMEOUT = 60.0


@pytest.fixture
def prosody(prosody_factory: ProsodyFactory) -> ProsodyServer:
    return prosody_factory(component_config())


async def test_the_component_command_serves_its_metrics(
    prosody: ProsodyServer, tmp_path: Path
) -> None:
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANZAGUARD_")}
    env.update(
        STANZAGUARD_COMPONENT_SECRET=SECRET,
        STANZAGUARD_LOG_FORMAT="text",
        STANZAGUARD_MODEL="off",
        STANZAGUARD_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
    )
    argv = [
        *stanzaguard_command(),
        "component",
        "--domain",
        prosody.domain,
        "--jid",
        COMPONENT,
        "--server",
        f"{prosody.host}:{prosody.component_port}",
        "--data-dir",
        str(tmp_path / "data"),
    ]
    process = start_process(argv, log_path=tmp_path / "component.log", env=env)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        text = ""
        async with httpx.AsyncClient() as http:
            while "stanzaguard_component_connected 1.0" not in text:
                assert process.running, process.log_tail()
                assert loop.time() < deadline, f"no connected component in /metrics:\n{text}"
                try:
                    answer = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
                    text = answer.text
                except httpx.TransportError:
                    text = ""  # not listening yet
                await asyncio.sleep(0.2)
    finally:
        status = process.stop(grace=15.0)
    assert status == 0, process.log_tail()
